use clap::Parser;

fn main() -> anyhow::Result<()> {
    kubeha_operator::run(kubeha_operator::Cli::parse())
}
