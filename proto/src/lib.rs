//! The spendflow wire contract: package `spendflow.v1`, generated with tonic/prost.
//!
//! The `.proto` file under `proto/spendflow/v1/` is the source of truth; this crate only
//! compiles it. [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection, so tools such as
//! `grpcurl` can list and describe the services without the `.proto` file.

/// Generated messages, clients and servers of `spendflow.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("spendflow.v1");
}

/// The encoded descriptor set of every file in this crate, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("spendflow_descriptor");
