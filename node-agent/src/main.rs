use clap::Parser;

fn main() -> anyhow::Result<()> {
    kubeha_agent::run(kubeha_agent::Cli::parse())
}
