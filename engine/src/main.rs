//! The `spendflow` binary: a thin command line over the `spendflow-engine` library.

mod cli;
mod cli_images;
mod cli_run;
mod cli_security;
mod cli_token;

fn main() -> std::process::ExitCode {
    cli::main()
}
