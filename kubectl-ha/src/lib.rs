//! `kubectl ha`: the admin commands of the classic HA managers. The commands
//! arrive with the operator issue; for now the crate only wires the CLI.

use clap::Parser;

/// Command line of `kubectl-ha`.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-ha",
    version,
    about = "kubectl ha: kubeha admin commands (not built yet)"
)]
pub struct Cli {}

/// Runs the plugin.
pub fn run(_cli: Cli) -> anyhow::Result<()> {
    anyhow::bail!(
        "kubectl-ha: the admin commands are not built yet; this binary only answers --help and --version"
    )
}
