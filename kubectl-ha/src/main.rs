//! `kubectl-ha`: parses the command line and runs the plugin
//! ([`kubectl_ha::run`]); errors exit non-zero.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match kubectl_ha::run(kubectl_ha::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
