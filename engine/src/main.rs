//! The `spendflow` binary: a thin command line over the `spendflow-engine` library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
