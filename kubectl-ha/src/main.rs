use clap::Parser;

fn main() -> anyhow::Result<()> {
    kubectl_ha::run(kubectl_ha::Cli::parse())
}
