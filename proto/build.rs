//! Generates the gRPC code and the descriptor set used by server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use the protoc shipped in protoc-bin-vendored unless the user points PROTOC elsewhere,
    // so building needs no system protobuf compiler.
    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
        #[allow(unsafe_code)]
        unsafe {
            env::set_var("PROTOC", protoc)
        };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("spendflow_descriptor.bin"))
        .compile_protos(&["proto/spendflow/v1/spendflow.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
