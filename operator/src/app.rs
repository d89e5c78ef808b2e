//! The command line and the top-level run: watches, dispatcher, leader
//! election, the two controllers and the metrics endpoint.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use futures::channel::mpsc;
use kube::Client;
use kube::runtime::controller::{self, Controller};
use kube::runtime::watcher;
use kubeha_crds::{HACluster, HAService};
use kubeha_runtime::logging::LogFormat;

use crate::context::{Ctx, Triggers};
use crate::error::Result;
use crate::metrics::{self, Metrics};
use crate::{cluster_controller, leader, service_controller, watch};

/// Command line of `kubeha-operator`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "kubeha-operator",
    version,
    about = "kubeha operator: places HAServices on HACluster members and hands them over safely"
)]
pub struct Cli {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBEHA_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: std::net::SocketAddr,
    /// Log format.
    #[arg(long, env = "KUBEHA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The operator's namespace: the agents' heartbeat Leases and the leader
    /// Lease (service Leases live in each HAService's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubeha-system")]
    pub namespace: String,
    /// This replica's identity in the leader Lease and in Events.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Take part in leader election (off: this replica always writes; only
    /// for a single replica).
    #[arg(long, env = "KUBEHA_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Seconds the leader's lock stays valid without renewal: how long
    /// services wait for a new leader after the leader dies.
    #[arg(long, default_value_t = 15)]
    pub leader_lease_seconds: u64,
    /// Seconds before expiry at which the leader renews its lock: the
    /// longest API-server stall the leader keeps its lock through. A stall
    /// is when the agents fence and every service needs the operator at
    /// once, so losing the lock then (the other replica takes it only after
    /// a random pause) delays every recovery.
    #[arg(long, default_value_t = 10)]
    pub leader_grace_seconds: u64,
    /// Reconciles run at once per controller.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
}

impl Cli {
    /// This replica's identity: `--pod-name`, else the host name, else a
    /// fixed name.
    pub fn identity(&self) -> String {
        self.pod_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "kubeha-operator".to_owned())
    }
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(cli: Cli) -> Result<()> {
    let client = Client::try_default().await?;
    let identity = cli.identity();
    tracing::info!(namespace = %cli.namespace, %identity, metrics = %cli.metrics_addr, "kubeha-operator starting");

    let (stores, streams) = watch::start(&client, &cli.namespace);
    let (svc_tx, svc_rx) = mpsc::unbounded();
    let (cl_tx, cl_rx) = mpsc::unbounded();
    let (all_svc_tx, all_svc_rx) = mpsc::unbounded();
    let (all_cl_tx, all_cl_rx) = mpsc::unbounded();
    let metrics = Metrics::default();
    let ctx = Arc::new(Ctx::new(
        client.clone(),
        cli.namespace.clone(),
        identity.clone(),
        stores.clone(),
        metrics.clone(),
        Triggers {
            services: svc_tx,
            clusters: cl_tx,
            all_services: all_svc_tx,
            all_clusters: all_cl_tx,
        },
    ));

    // Also marks the operator ready once every watch has listed.
    tokio::spawn(watch::dispatch(ctx.clone(), streams));
    tokio::spawn(crate::gaps::pulse(ctx.clone()));
    tokio::spawn(crate::gaps::run(ctx.clone()));
    // Which nodes' agents see each HAService (node-scope labels).
    tokio::spawn(crate::scope::run(ctx.clone()));
    {
        let (addr, m, ready) = (cli.metrics_addr, metrics.clone(), ctx.ready.clone());
        let services = stores.services.clone();
        tokio::spawn(async move {
            let probes = metrics::Probes {
                metrics: m,
                services,
                ready,
            };
            if let Err(e) = kubeha_runtime::http::serve(addr, probes).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }

    let election = if cli.leader_election {
        let settings = leader::Settings {
            namespace: cli.namespace.clone(),
            identity,
            duration_seconds: cli.leader_lease_seconds.max(2),
            grace_seconds: cli
                .leader_grace_seconds
                .clamp(1, cli.leader_lease_seconds.max(2) - 1),
        };
        let (client, ctx) = (client.clone(), ctx.clone());
        tokio::spawn(async move { leader::run(client, settings, ctx).await })
    } else {
        tracing::warn!("leader election off: this replica writes as the only one");
        ctx.set_leader(true);
        tokio::spawn(std::future::pending())
    };

    let config = controller::Config::default().concurrency(cli.concurrency);
    let services = Controller::for_stream(
        futures::stream::pending::<std::result::Result<HAService, watcher::Error>>(),
        stores.services.clone(),
    )
    .with_config(config.clone())
    .reconcile_on(svc_rx)
    .reconcile_all_on(all_svc_rx)
    .shutdown_on_signal()
    .run(
        service_controller::reconcile,
        service_controller::error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "HAService controller");
        }
    });
    let clusters = Controller::for_stream(
        futures::stream::pending::<std::result::Result<HACluster, watcher::Error>>(),
        stores.clusters.clone(),
    )
    .with_config(config)
    .reconcile_on(cl_rx)
    .reconcile_all_on(all_cl_rx)
    .shutdown_on_signal()
    .run(
        cluster_controller::reconcile,
        cluster_controller::error_policy,
        ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "HACluster controller");
        }
    });

    let controllers = async { futures::join!(services, clusters) };
    tokio::select! {
        _ = controllers => {
            tracing::info!("controllers stopped");
        }
        res = election => {
            ctx.set_leader(false);
            match res {
                Ok(Ok(())) => tracing::error!("leader election ended"),
                Ok(Err(e)) => tracing::error!(error = %e, "leader election failed"),
                Err(e) => tracing::error!(error = %e, "leader election task failed"),
            }
            return Err(crate::Error::LeaderElectionStopped);
        }
    }
    ctx.set_leader(false);
    // Give the lease manager a moment to release the lock for a fast
    // handover to a standby replica.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments the chart's operator Deployment passes, with its
    /// template expressions filled in with sample values.
    fn chart_args() -> Vec<String> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/kubeha/templates/operator-deployment.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines = text.lines().skip_while(|l| l.trim() != "args:").skip(1);
        let mut args = Vec::new();
        for line in lines.by_ref() {
            let Some(arg) = line.trim().strip_prefix("- ") else {
                break;
            };
            // The chart's defaults (values.yaml), in the template's words.
            let filled = [
                ("{{ .Values.metrics.operatorPort }}", "9464"),
                (
                    r#"{{ include "kubeha.logFormat" .Values.operator.logFormat }}"#,
                    "json",
                ),
                ("{{ $le.enabled }}", "true"),
                ("{{ $le.leaseSeconds }}", "15"),
                ("{{ $le.graceSeconds }}", "10"),
                ("{{ .Values.operator.concurrency }}", "16"),
            ]
            .iter()
            .fold(arg.to_owned(), |a, (from, to)| a.replace(from, to));
            args.push(filled);
        }
        args
    }

    #[test]
    fn accepts_what_the_chart_passes() {
        let args = chart_args();
        assert!(args.iter().any(|a| a.starts_with("--metrics-addr")));
        assert!(
            args.iter().all(|a| !a.contains("{{")),
            "a chart argument this test does not fill in: {args:?}"
        );
        let cli =
            Cli::try_parse_from(std::iter::once("kubeha-operator".to_owned()).chain(args)).unwrap();
        assert_eq!(cli.metrics_addr, "0.0.0.0:9464".parse().unwrap());
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(cli.leader_election);
    }

    #[test]
    fn help_and_version_render() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--metrics-addr",
            "--log-format",
            "--namespace",
            "--pod-name",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
    }
}
