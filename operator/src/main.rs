//! `kubeha-operator`: parses the command line and runs the operator
//! ([`kubeha_operator::app`]).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = kubeha_operator::Cli::parse();
    kubeha_runtime::logging::init(cli.log_format);
    kubeha_operator::run(cli).await?;
    Ok(())
}
