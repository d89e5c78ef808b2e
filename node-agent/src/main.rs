use clap::Parser;

fn main() -> anyhow::Result<()> {
    Ok(kubeha_agent::run(kubeha_agent::Cli::parse())?)
}
