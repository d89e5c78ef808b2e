//! kubeha node agent. Heartbeat, transitions, hooks, VIPs and GARP arrive
//! with the agent issue; for now the crate only wires the CLI.

use clap::Parser;

/// Command line of `kubeha-agent`.
#[derive(Parser, Debug)]
#[command(
    name = "kubeha-agent",
    version,
    about = "kubeha node agent (not built yet)"
)]
pub struct Cli {}

/// Runs the agent.
pub fn run(_cli: Cli) -> anyhow::Result<()> {
    anyhow::bail!(
        "kubeha-agent: the agent is not built yet; this binary only answers --help and --version"
    )
}
