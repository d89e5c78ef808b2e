//! `kubectl-ha`: parses the command line and runs the plugin
//! ([`kubectl_ha::run`]); the exit code is the outcome's
//! ([`kubectl_ha::exit`]: 0 done, 1 error, 2 usage, 3 a service needs
//! attention, 4 not reached within --wait).

use clap::Parser;

fn main() -> std::process::ExitCode {
    match kubectl_ha::run(kubectl_ha::Cli::parse()) {
        Ok(outcome) => std::process::ExitCode::from(outcome.code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(kubectl_ha::exit::ERROR)
        }
    }
}
