//! The `spendflow` binary: a thin command line over the `spendflow-engine` library.

mod cli;
mod cli_images;
mod cli_run;

fn main() -> std::process::ExitCode {
    cli::main()
}
