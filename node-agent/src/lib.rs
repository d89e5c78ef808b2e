//! kubeha node agent: renews this node's heartbeat, derives its role per
//! service from the service Leases, and carries out transitions (VIPs with a
//! kernel-enforced lifetime, hooks, gratuitous ARP), fencing itself when it
//! loses the API server.

pub mod assignments;
pub mod cgroup;
pub mod daemon;
pub mod decide;
pub mod error;
pub mod garp;
pub mod heartbeat;
pub mod hooks;
pub mod host_namespaces;
pub mod metrics;
#[cfg(test)]
pub(crate) mod netns_harness;
pub mod statefile;
pub mod transitions;
pub mod vip;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kubeha_runtime::logging::LogFormat;

pub use error::{Error, Result};

/// Command line of `kubeha-agent`.
#[derive(Parser, Debug)]
#[command(name = "kubeha-agent", version, about = "kubeha node agent")]
pub struct Cli {
    #[command(flatten)]
    paths: Paths,
    /// Log format.
    #[arg(long, env = "KUBEHA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
struct Paths {
    /// This node's Kubernetes name (downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME", global = true)]
    node_name: Option<String>,
    /// Namespace of the heartbeat Leases (the operator's namespace).
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "kubeha-system",
        global = true
    )]
    namespace: String,
    /// Root of host-path hook sources.
    #[arg(long, env = "KUBEHA_HOOK_ROOT", default_value = kubeha_crds::HOOK_ROOT, global = true)]
    hook_root: PathBuf,
    /// Hook logs and the fence log.
    #[arg(
        long,
        env = "KUBEHA_LOG_DIR",
        default_value = "/var/log/kubeha",
        global = true
    )]
    log_dir: PathBuf,
    /// Status file (status.json) and materialised ConfigMap hooks.
    #[arg(
        long,
        env = "KUBEHA_STATE_DIR",
        default_value = "/run/kubeha",
        global = true
    )]
    state_dir: PathBuf,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "KUBEHA_METRICS_ADDR",
        default_value = "0.0.0.0:9465",
        global = true
    )]
    metrics_addr: std::net::SocketAddr,
    /// A cgroup v2 directory (created when missing) to run every hook in,
    /// e.g. /sys/fs/cgroup/kubeha: the fence then stops the daemons hooks
    /// started, also those that left their process group. Put it outside
    /// the agent's own cgroup, so services outlive an agent restart.
    /// Unset: hooks are contained by their process groups only.
    #[arg(long, env = "KUBEHA_HOOK_CGROUP", global = true)]
    hook_cgroup: Option<PathBuf>,
    /// Where hooks run: `host` enters the mount, UTS, IPC and cgroup
    /// namespaces of `--host-pid` (needs the host's PID namespace, e.g.
    /// `hostPID: true`, and the privilege to enter namespaces), so services
    /// hooks start are host processes that outlive the agent; `container`
    /// keeps them in the agent's own namespaces.
    #[arg(long, env = "KUBEHA_HOOK_NAMESPACES", value_enum, default_value_t = host_namespaces::HookNamespaces::Host, global = true)]
    hook_namespaces: host_namespaces::HookNamespaces,
    /// The process whose namespaces are the host's, for `--hook-namespaces
    /// host`.
    #[arg(long, env = "KUBEHA_HOST_PID", default_value_t = 1, global = true)]
    host_pid: i32,
    /// The boot id to record in the status file instead of the kernel's
    /// (/proc/sys/kernel/random/boot_id). Only for tests that emulate a
    /// reboot: a status file of another boot is never re-adopted.
    #[arg(long, env = "KUBEHA_BOOT_ID", global = true, hide = true)]
    boot_id: Option<String>,
}

impl Paths {
    fn hook_placement(&self) -> hooks::HookPlacement {
        hooks::HookPlacement {
            cgroup: self.hook_cgroup.clone(),
            namespaces: self.hook_namespaces,
            host_pid: self.host_pid,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Print the node-local status file; works without the API server.
    Status,
    /// Hook sets by hand.
    Hooks {
        #[command(subcommand)]
        command: HooksCommand,
    },
}

#[derive(Subcommand, Debug)]
enum HooksCommand {
    /// Run a service's hook set exactly as the daemon would (no daemon needed).
    Run {
        /// The service, `namespace/name`.
        service: String,
        /// enter, leave, monitor or periodic.
        action: String,
        /// Role to pass: master, vicemaster or none.
        #[arg(long, default_value = "master")]
        role: String,
        /// Epoch to pass in KUBEHA_EPOCH (default: the status file's).
        #[arg(long)]
        epoch: Option<i64>,
    },
}

/// Runs the agent.
pub fn run(cli: Cli) -> Result<()> {
    kubeha_runtime::logging::init(cli.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => runtime.block_on(daemon::run(daemon_config(&cli.paths)?)),
        Command::Status => {
            let path = statefile::path(&cli.paths.state_dir);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::Usage(format!(
                    "no status file at {} (has the agent run on this node?): {e}",
                    path.display()
                ))
            })?;
            println!("{text}");
            Ok(())
        }
        Command::Hooks {
            command:
                HooksCommand::Run {
                    service,
                    action,
                    role,
                    epoch,
                },
        } => runtime.block_on(hooks_by_hand(&cli.paths, &service, &action, &role, epoch)),
    }
}

fn daemon_config(paths: &Paths) -> Result<daemon::Config> {
    let Some(node) = paths.node_name.clone() else {
        return Err(Error::Usage(
            "the node name is unknown: set NODE_NAME (downward API spec.nodeName) or --node-name"
                .to_owned(),
        ));
    };
    Ok(daemon::Config {
        node,
        namespace: paths.namespace.clone(),
        hook_root: paths.hook_root.clone(),
        log_dir: paths.log_dir.clone(),
        state_dir: paths.state_dir.clone(),
        metrics_addr: paths.metrics_addr,
        hooks: paths.hook_placement(),
        boot_id: statefile::boot_id(paths.boot_id.as_deref()),
        started: jiff::Timestamp::now().to_string(),
    })
}

/// `kubeha-agent hooks run`: the spec comes from the API server when it
/// answers, else from the status file; the scripts run through the same
/// runner, context and checks as in the daemon.
async fn hooks_by_hand(
    paths: &Paths,
    service: &str,
    action: &str,
    role: &str,
    epoch: Option<i64>,
) -> Result<()> {
    use kubeha_crds::service::{HookOutcome, Role};
    let action = match action {
        "enter" => hooks::Action::Enter,
        "leave" => hooks::Action::Leave,
        "monitor" => hooks::Action::Monitor,
        "periodic" => hooks::Action::Periodic,
        other => {
            return Err(Error::Usage(format!(
                "unknown action {other:?}: use enter, leave, monitor or periodic"
            )));
        }
    };
    let role = match role {
        "master" => Role::Master,
        "vicemaster" => Role::Vicemaster,
        "none" => Role::None,
        other => {
            return Err(Error::Usage(format!(
                "unknown role {other:?}: use master, vicemaster or none"
            )));
        }
    };
    let (ns, name) = service
        .split_once('/')
        .ok_or_else(|| Error::Usage(format!("{service:?}: name the service as namespace/name")))?;
    let saved = statefile::read(&paths.state_dir).and_then(|s| s.services.get(service).cloned());
    let from_api = async {
        let client = kube::Client::try_default().await.ok()?;
        let api: kube::Api<kubeha_crds::HAService> = kube::Api::namespaced(client.clone(), ns);
        let svc = tokio::time::timeout(Duration::from_secs(3), api.get(name))
            .await
            .ok()?
            .ok()?;
        let clusters: kube::Api<kubeha_crds::HACluster> = kube::Api::all(client);
        let cluster =
            tokio::time::timeout(Duration::from_secs(3), clusters.get(&svc.spec.cluster_ref))
                .await
                .ok()?
                .ok();
        Some((svc.spec, cluster))
    }
    .await;
    let (spec, members, cluster_name) = match (from_api, &saved) {
        (Some((spec, cluster)), _) => {
            let members = cluster.as_ref().map(kubeha_crds::roles::known_members);
            let name = spec.cluster_ref.clone();
            (spec, members.unwrap_or_default(), name)
        }
        (None, Some(record)) => (record.spec.clone(), Vec::new(), record.cluster.clone()),
        (None, None) => {
            return Err(Error::Usage(format!(
                "service {service} not found: the API server did not answer and the status file does not know it"
            )));
        }
    };
    let node_name = paths
        .node_name
        .clone()
        .unwrap_or_else(|| "localhost".into());
    let node = transitions::LocalNode {
        name: node_name,
        netlink: vip::RtNetlink::new()?,
        runner: paths.hook_placement().runner(paths.log_dir.clone())?,
        hook_root: paths.hook_root.clone(),
        state_dir: paths.state_dir.clone(),
        metrics: metrics::Metrics::default(),
        held: Default::default(),
    };
    let checksum = daemon::spec_checksum(&spec);
    let svc = transitions::TransitionService {
        key: service.to_owned(),
        spec,
        checksum,
    };
    let cluster = transitions::TransitionCluster {
        name: cluster_name,
        members,
        beat: None,
        fenced: Default::default(),
    };
    let epoch = epoch.or(saved.map(|r| r.epoch)).unwrap_or(0);
    let results = node
        .run_hooks_by_hand(
            &svc,
            &cluster,
            transitions::HookCall::new(action, role, epoch),
        )
        .await?;
    let mut failed = false;
    for r in &results {
        println!(
            "{} {} -> {:?} (exit {:?}, {} ms)",
            r.script, r.action, r.outcome, r.exit_code, r.duration_ms
        );
        for line in &r.output_tail {
            println!("    {line}");
        }
        failed |= r.outcome != HookOutcome::Success;
    }
    if results.is_empty() {
        println!("no {} scripts", action.as_str());
    }
    if failed {
        return Err(Error::HookFailed);
    }
    Ok(())
}
