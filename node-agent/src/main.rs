//! `kubeha-agent`: parses the command line and runs the agent
//! ([`kubeha_agent::run`]).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    Ok(kubeha_agent::run(kubeha_agent::Cli::parse())?)
}
