//! kubeha node agent: renews this node's heartbeat, derives its role per
//! service from the service Leases, and carries out transitions (VIPs with a
//! kernel-enforced lifetime, hooks, gratuitous ARP), fencing itself when it
//! loses the API server.

pub mod assignments;
pub mod heartbeat;
pub mod metrics;
pub mod statefile;

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
