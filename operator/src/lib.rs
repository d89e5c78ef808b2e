//! kubeha operator. `placement` (the pure scheduling function) is built; the
//! reconcilers, leases and leader election are not yet, so the binary only
//! answers --help and --version.

use clap::Parser;

pub mod placement;

/// Command line of `kubeha-operator`.
#[derive(Parser, Debug)]
#[command(
    name = "kubeha-operator",
    version,
    about = "kubeha operator (reconciler not built yet)"
)]
pub struct Cli {}

/// Runs the operator.
pub fn run(_cli: Cli) -> anyhow::Result<()> {
    anyhow::bail!(
        "kubeha-operator: the reconciler is not built yet; this binary only answers --help and --version"
    )
}
