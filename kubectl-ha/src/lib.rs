//! `kubectl ha`: the admin commands of the classic HA managers, as a kubectl
//! plugin. Each command writes what the operator and the agents act on
//! (annotations on an HAService, a member's mode in an HACluster), waits a
//! little for them to act, and prints the resulting status.
//!
//! - `move SERVICE --to NODE`: annotation `kubeha.io/move-to` (planned
//!   switchover; the preference stays until `clear`).
//! - `clear SERVICE`: annotation `kubeha.io/clear` (reset the failures) and
//!   removes `kubeha.io/move-to`.
//! - `mode NODE MODE --cluster C`, `peerdown NODE`, `peerup NODE`: the mode
//!   of a member in `spec.members.nodes`; the API server's CEL rules reject
//!   prohibited combinations.
//! - `status`: clusters, members, services (`--watch`: again on each
//!   change).
//!
//! Conventions every command follows (kubectl's): the global options
//! ([`GlobalArgs`]: `--kubeconfig`, `--context`, `-n`, `-A`, `-o json|yaml`,
//! `--wait`) go before or after the command; a command is an
//! `async fn(ctx: &Ctx, ..) -> anyhow::Result<Outcome>`: it says what it
//! wrote with [`Ctx::say`], waits with `ctx.wait`, reports a wait that ran
//! out with [`Ctx::not_reached`], and prints objects with
//! [`print_objects`] (text, or a kubectl List as JSON/YAML). The exit code
//! is the [`Outcome`]'s, 1 on an error ([`exit`] lists them).

pub mod cluster_ops;
pub mod patches;
pub mod render;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::serde::de::DeserializeOwned;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use kubeha_crds::service::NodeServiceState;
use kubeha_crds::{HACluster, HAService, Mode, annotations};

pub mod node_ops;

/// Field manager of the plugin's writes.
pub const FIELD_MANAGER: &str = "kubectl-ha";

/// The exit codes, as `kubectl ha --help` lists them.
pub mod exit {
    /// The command did what was asked; `status`: every service shown is
    /// healthy.
    pub const OK: u8 = 0;
    /// An error: the API server refused or could not be reached, an object
    /// was not found, the command refused the request (the message says
    /// why and what to run).
    pub const ERROR: u8 = 1;
    /// The command line is wrong (unknown flag, missing argument, bad
    /// value); clap's own code.
    pub const USAGE: u8 = 2;
    /// `status`: a service shown is Errored (phase) or Degraded (condition
    /// Degraded=True).
    pub const ATTENTION: u8 = 3;
    /// The change was written but the operator and agents did not reach
    /// the requested state within `--wait` (`move`: the service is not
    /// Active on the target, or the target is not eligible).
    pub const NOT_REACHED: u8 = 4;
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  done; status: every service shown is healthy
  1  error: API server refused or unreachable, object not found, request refused (the message says why)
  2  usage: unknown flag, missing argument or bad value
  3  status: a service shown is Errored (phase) or Degraded (condition Degraded=True)
  4  written, but the requested state was not reached within --wait (move: not Active on the target, or the target is not eligible); --wait 0 never waits, so never 4";

/// What a command that ran to its end found; errors are the `Err` of its
/// result and exit with [`exit::ERROR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Done, nothing needs attention.
    Done,
    /// `status`: a service is Errored or Degraded ([`exit::ATTENTION`]).
    Attention,
    /// Written, but not reached within `--wait` ([`exit::NOT_REACHED`]).
    NotReached,
}

impl Outcome {
    /// The process exit code of this outcome.
    pub fn code(self) -> u8 {
        match self {
            Outcome::Done => exit::OK,
            Outcome::Attention => exit::ATTENTION,
            Outcome::NotReached => exit::NOT_REACHED,
        }
    }
}

/// `-o`: the machine-readable formats; without it the plugin prints text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A kubectl `List` (apiVersion v1, kind List) of the objects shown, as
    /// JSON.
    Json,
    /// The same `List` as YAML.
    Yaml,
}

/// The options every command takes, spelled as kubectl spells them.
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,

    /// Namespace of the HAServices (default: the context's namespace).
    #[arg(short, long, global = true, value_name = "NS")]
    pub namespace: Option<String>,

    /// `status`: HAServices in every namespace.
    #[arg(short = 'A', long, global = true, conflicts_with = "namespace")]
    pub all_namespaces: bool,

    /// Output format: json or yaml (a kubectl List of the objects shown;
    /// messages go to stderr). Default: text.
    #[arg(short, long, global = true, value_enum, value_name = "FORMAT")]
    pub output: Option<Output>,

    /// Seconds to wait for the operator and agents to act before printing
    /// the resulting status (0: print at once).
    #[arg(long, global = true, default_value_t = 10, value_name = "SECONDS")]
    pub wait: u64,
}

/// Command line of `kubectl-ha`.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-ha",
    bin_name = "kubectl ha",
    version,
    about = "kubectl ha: kubeha admin commands (status, move, clear, modes, release, reset, force-start, stop, start, config)",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// The options every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The admin commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Planned switchover: run SERVICE on NODE (annotation
    /// kubeha.io/move-to). The preference stays until `kubectl ha clear`.
    /// Exits 4 when SERVICE is not Active on NODE within --wait.
    Move {
        /// The HAService (in -n, default the context's namespace).
        service: String,
        /// The member node to run it on.
        #[arg(long)]
        to: String,
    },
    /// Clear SERVICE's failures (annotation kubeha.io/clear) and withdraw a
    /// move request (removes kubeha.io/move-to).
    Clear {
        /// The HAService (in -n, default the context's namespace).
        service: String,
    },
    /// Release NODE (FreeHA's HUP): every service of the cluster that runs
    /// there moves to the next eligible node through the handover; its
    /// agent keeps running (HACluster annotation kubeha.io/release-node,
    /// which the operator removes when done). Exits 4 when not done within
    /// --wait.
    Release {
        /// The member node.
        node: String,
        /// The HACluster (default: the only one that has NODE as member).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Reset NODE now (StorNext's force smith): its agent fences itself
    /// (VIPs dropped, leave scripts, hooks killed, the fence action) and
    /// withholds its heartbeat, so its services fail over (HACluster
    /// annotation kubeha.io/reset-node, acted on once). Only a member in
    /// mode default; confirm with the two words `force smith` after NODE.
    /// Exits 4 when the operator has not seen the heartbeat stop within
    /// --wait.
    Reset {
        /// The member node.
        node: String,
        /// The two words of confirmation: force smith.
        #[arg(num_args = 0..)]
        confirm: Vec<String>,
        /// The HACluster (default: the only one that has NODE as member).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Emergency (FreeHA's USR1): start SERVICE on NODE even though its
    /// failures there (Errored) keep placement off it; the old holder still
    /// leaves first. NODE must be a member in a mode that runs services,
    /// heartbeat Alive. Prints a loud warning; the ForceStarted condition
    /// and Event stay until `kubectl ha clear`. Exits 4 when it is not
    /// running there within --wait.
    ForceStart {
        /// The HAService (in -n, default the context's namespace).
        service: String,
        /// The member node to start it on.
        #[arg(long)]
        on: String,
    },
    /// Set the administrative mode of a member: default, single, config,
    /// locked or peerdown.
    Mode {
        /// The member node.
        node: String,
        /// The mode.
        #[arg(value_parser = parse_mode)]
        mode: Mode,
        /// With mode peerdown: set it even though the node's heartbeat is
        /// Alive (see `peerdown --force`).
        #[arg(long)]
        force: bool,
        /// The HACluster.
        #[arg(long)]
        cluster: String,
    },
    /// Certify that NODE is powered off (mode peerdown): it counts as fenced
    /// at once and its services move. Only for a node that is really off.
    Peerdown {
        /// The member node.
        node: String,
        /// The HACluster.
        #[arg(long)]
        cluster: String,
        /// Certify it even though the operator sees the node's heartbeat
        /// Alive (only when you know the heartbeat is stale: the node is
        /// off and the status not yet updated).
        #[arg(long)]
        force: bool,
    },
    /// Withdraw a peerdown: NODE returns to mode default.
    Peerup {
        /// The member node.
        node: String,
        /// The HACluster.
        #[arg(long)]
        cluster: String,
    },
    /// Stop the whole cluster safely: no service placed anywhere, every
    /// node leaves (no failover, no fence), every member back to default
    /// but peerdown ones. Returns once every leave returned (exit 4 when
    /// not within --wait).
    Stop {
        /// The HACluster (default: the only one).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Start a stopped cluster: placement picks the nodes again. Exit 4
    /// when a service is not Active within --wait.
    Start {
        /// The HACluster (default: the only one).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Put NODE in mode config (monitoring off, for reconfiguration), after
    /// checking that every other member is locked or peerdown.
    Config {
        /// The member node.
        node: String,
        /// The HACluster (default: the only one that has NODE as member).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Clusters (members' modes and heartbeats) and services (phase, active,
    /// standby, epoch) of the namespace (-n, default the context's; -A: all).
    /// Exits 3 when a service shown is Errored or Degraded.
    Status {
        /// Only this HACluster and its services.
        #[arg(long)]
        cluster: Option<String>,
        /// Keep printing: the whole status again each time a cluster or
        /// service changes (until interrupted).
        #[arg(short, long)]
        watch: bool,
    },
}

/// What every command receives: the client and the global options,
/// resolved.
#[derive(Clone)]
pub struct Ctx {
    /// Client for the kubeconfig and context chosen.
    pub client: Client,
    /// `-o`; `None`: text.
    pub output: Option<Output>,
    /// `-n`, else the context's namespace.
    pub namespace: String,
    /// `-A`.
    pub all_namespaces: bool,
    /// `--wait`.
    pub wait: Duration,
}

impl Ctx {
    /// Connects as `args` say: `--kubeconfig` and `--context` as kubectl
    /// reads them.
    pub async fn connect(args: &GlobalArgs) -> anyhow::Result<Self> {
        let config = load_config(args).await?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config)
            .map_err(|e| anyhow!("cannot build a client from the kubeconfig: {e}"))?;
        Ok(Ctx {
            client,
            output: args.output,
            namespace,
            all_namespaces: args.all_namespaces,
            wait: Duration::from_secs(args.wait),
        })
    }

    /// The namespace a list of HAServices covers: `None` with `-A`.
    pub fn list_namespace(&self) -> Option<&str> {
        (!self.all_namespaces).then_some(self.namespace.as_str())
    }

    /// After a wait that did not see `what_failed` come true: says so
    /// (stderr) and returns [`Outcome::NotReached`], exit 4; with
    /// `--wait 0` nothing was awaited, so [`Outcome::Done`].
    pub fn not_reached(&self, what_failed: &str) -> Outcome {
        if self.wait.is_zero() {
            return Outcome::Done;
        }
        eprintln!(
            "note: {what_failed} within {} s; the status below is the latest",
            self.wait.as_secs()
        );
        Outcome::NotReached
    }

    /// Prints a line saying what a command did: to stdout in text, to
    /// stderr with `-o json|yaml` so that stdout stays one document.
    pub fn say(&self, line: &str) {
        if self.output.is_some() {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

/// The client configuration `--kubeconfig` and `--context` select, else
/// kube's inference (KUBECONFIG, ~/.kube/config, in-cluster).
async fn load_config(args: &GlobalArgs) -> anyhow::Result<Config> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path).map_err(|e| {
                anyhow!(
                    "--kubeconfig {}: cannot read it: {e}; pass the path of a kubeconfig file",
                    path.display()
                )
            })?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| {
                    anyhow!(
                        "--kubeconfig {}{}: {e}; check the file and the context name (kubectl config get-contexts)",
                        path.display(),
                        args.context
                            .as_deref()
                            .map(|c| format!(" --context {c}"))
                            .unwrap_or_default()
                    )
                })
        }
        (None, Some(context)) => Config::from_kubeconfig(&options).await.map_err(|e| {
            anyhow!(
                "--context {context}: {e}; list the contexts with kubectl config get-contexts"
            )
        }),
        (None, None) => Config::infer().await.map_err(|e| {
            anyhow!("cannot load a kubeconfig or in-cluster configuration: {e}; set KUBECONFIG, pass --kubeconfig, or set the current context")
        }),
    }
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    }
}

/// Parses a mode name as the API spells it.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!("unknown mode {s:?}; use one of default, single, config, locked, peerdown")
    })
}

/// Turns an API error about `what` into a message naming the object and
/// the fix.
fn api_error(e: kube::Error, what: &str, verb: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => match s.code {
            404 => anyhow!(
                "{what} not found; check the name and namespace (kubectl get haclusters; kubectl get haservices -A)"
            ),
            401 | 403 => anyhow!(
                "not allowed to {verb} {what}: {}; ask a cluster admin for RBAC on kubeha.io haclusters/haservices",
                s.message
            ),
            409 => anyhow!(
                "{what} changed while it was being written ({}); run the command again",
                s.message
            ),
            422 => anyhow!(
                "the API server rejected the change to {what}: {}",
                s.message
            ),
            _ => anyhow!("{verb} {what} failed: {} ({})", s.message, s.code),
        },
        other => anyhow!(
            "{verb} {what}: cannot talk to the API server: {other}; check KUBECONFIG and the current context"
        ),
    }
}

/// Runs the plugin; the outcome gives the exit code ([`Outcome::code`]).
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(cli))
}

async fn run_async(cli: Cli) -> anyhow::Result<Outcome> {
    let ctx = Ctx::connect(&cli.global).await?;
    match cli.command {
        Command::Move { service, to } => move_service(&ctx, &service, &to).await,
        Command::Clear { service } => clear_service(&ctx, &service).await,
        Command::Release { node, cluster } => {
            let cluster =
                cluster_ops::resolve_cluster(&ctx, cluster.as_deref(), Some(&node)).await?;
            node_ops::release(&ctx, &cluster, &node).await
        }
        Command::Reset {
            node,
            confirm,
            cluster,
        } => {
            let cluster =
                cluster_ops::resolve_cluster(&ctx, cluster.as_deref(), Some(&node)).await?;
            node_ops::reset(&ctx, &cluster, &node, &confirm).await
        }
        Command::ForceStart { service, on } => node_ops::force_start(&ctx, &service, &on).await,
        Command::Mode {
            node,
            mode,
            cluster,
            force,
        } => {
            if mode == Mode::Peerdown && !force {
                refuse_peerdown_of_alive(&ctx.client, &cluster, &node).await?;
            }
            cluster_ops::check_mode_change(&ctx, &cluster, &node, mode).await?;
            set_mode(&ctx, &cluster, &node, mode, None).await
        }
        Command::Peerdown {
            node,
            cluster,
            force,
        } => {
            if !force {
                refuse_peerdown_of_alive(&ctx.client, &cluster, &node).await?;
            }
            eprintln!(
                "warning: peerdown certifies that {node} is powered off; its services start elsewhere at once. If {node} still runs, two nodes may run the same service."
            );
            set_mode(&ctx, &cluster, &node, Mode::Peerdown, None).await
        }
        Command::Peerup { node, cluster } => {
            set_mode(&ctx, &cluster, &node, Mode::Default, Some(Mode::Peerdown)).await
        }
        Command::Stop { cluster } => {
            let cluster = cluster_ops::resolve_cluster(&ctx, cluster.as_deref(), None).await?;
            cluster_ops::stop(&ctx, &cluster).await
        }
        Command::Start { cluster } => {
            let cluster = cluster_ops::resolve_cluster(&ctx, cluster.as_deref(), None).await?;
            cluster_ops::start(&ctx, &cluster).await
        }
        Command::Config { node, cluster } => {
            let cluster =
                cluster_ops::resolve_cluster(&ctx, cluster.as_deref(), Some(&node)).await?;
            cluster_ops::config(&ctx, &cluster, &node).await
        }
        Command::Status { cluster, watch } => {
            if watch {
                watch_status(&ctx, cluster.as_deref()).await
            } else {
                print_status(&ctx, cluster.as_deref()).await
            }
        }
    }
}

/// Re-reads object `name` every half second until `done` holds or `wait`
/// passed; returns the last object read and whether `done` held.
async fn poll<K>(
    api: &Api<K>,
    name: &str,
    wait: Duration,
    done: impl Fn(&K) -> bool,
) -> (Option<K>, bool)
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + wait;
    loop {
        let last = api.get_opt(name).await.ok().flatten();
        if last.as_ref().is_some_and(&done) {
            return (last, true);
        }
        if Instant::now() >= deadline {
            return (last, false);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads HACluster `cluster` before a command writes it: its API and the
/// object (a missing or forbidden one named with the fix).
async fn read_cluster(ctx: &Ctx, cluster: &str) -> anyhow::Result<(Api<HACluster>, HACluster)> {
    let api: Api<HACluster> = Api::all(ctx.client.clone());
    let c = api
        .get(cluster)
        .await
        .map_err(|e| api_error(e, &format!("HACluster {cluster}"), "read"))?;
    Ok((api, c))
}

/// Reads HAService `ns/name` before a command writes it: how messages name
/// it, its API and the object.
async fn read_service(
    client: &Client,
    ns: &str,
    name: &str,
) -> anyhow::Result<(String, Api<HAService>, HAService)> {
    let what = format!("HAService {ns}/{name}");
    let api: Api<HAService> = Api::namespaced(client.clone(), ns);
    let svc = api
        .get(name)
        .await
        .map_err(|e| api_error(e, &what, "read"))?;
    Ok((what, api, svc))
}

fn moved_condition(s: &HAService) -> Option<(String, String, String)> {
    s.status
        .iter()
        .flat_map(|st| &st.conditions)
        .find(|c| c.type_ == "Moved")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Whether `s` runs on `to` as a move request asked: Active there, with
/// condition Moved True.
fn moved_to(s: &HAService, to: &str) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.active_node.as_deref() == Some(to)
            && st.phase == Some(kubeha_crds::service::Phase::Active)
    }) && moved_condition(s).is_some_and(|(status, _, _)| status == "True")
}

/// Whether the operator judged `to` not eligible for `s`'s move request.
fn move_refused(s: &HAService, to: &str) -> bool {
    moved_condition(s).is_some_and(|(status, reason, message)| {
        status == "False" && reason == "TargetNotEligible" && message.contains(to)
    })
}

async fn move_service(ctx: &Ctx, name: &str, to: &str) -> anyhow::Result<Outcome> {
    let (what, api, svc) = read_service(&ctx.client, &ctx.namespace, name).await?;
    // A node that is certainly no member is refused here; members picked by
    // a selector (or a cluster this user may not read) are judged by the
    // operator, which reports in the Moved condition.
    let clusters: Api<HACluster> = Api::all(ctx.client.clone());
    if let Some(c) = clusters.get_opt(&svc.spec.cluster_ref).await.ok().flatten()
        && let Some(why) = node_ops::member_problem(&c, to, "move it to", false)
    {
        anyhow::bail!("{what}: {why}");
    }
    api.patch(name, &params(), &Patch::Merge(&patches::move_patch(to)))
        .await
        .map_err(|e| api_error(e, &what, "patch"))?;
    ctx.say(&format!("{what}: {}={to} set", annotations::MOVE_TO));
    let (last, _) = poll(&api, name, ctx.wait, |s: &HAService| {
        moved_to(s, to) || move_refused(s, to)
    })
    .await;
    let refused = last
        .as_ref()
        .filter(|s| move_refused(s, to))
        .and_then(moved_condition);
    let outcome = if let Some((_, _, message)) = refused {
        eprintln!("warning: {message}");
        ctx.not_reached(&format!("{what} cannot move to {to}"))
    } else if last.as_ref().is_some_and(|s| moved_to(s, to)) {
        Outcome::Done
    } else {
        ctx.not_reached(&format!("{what} has not reached {to}"))
    };
    print_after(ctx, last, &svc.spec.cluster_ref).await?;
    Ok(outcome)
}

async fn clear_service(ctx: &Ctx, name: &str) -> anyhow::Result<Outcome> {
    let (what, api, svc) = read_service(&ctx.client, &ctx.namespace, name).await?;
    let token = patches::clear_token(jiff::Timestamp::now());
    api.patch(
        name,
        &params(),
        &Patch::Merge(&patches::clear_patch(&token)),
    )
    .await
    .map_err(|e| api_error(e, &what, "patch"))?;
    ctx.say(&format!(
        "{what}: {}={token} set, {} removed",
        annotations::CLEAR,
        annotations::MOVE_TO
    ));
    let (last, done) = poll(&api, name, ctx.wait, |s: &HAService| {
        s.status.as_ref().is_none_or(|st| {
            st.nodes
                .iter()
                .all(|e| e.fail_count == 0 && e.state != NodeServiceState::Failed)
        })
    })
    .await;
    node_ops::end_force_start(ctx, &api, &svc, done).await?;
    let outcome = if done {
        Outcome::Done
    } else {
        ctx.not_reached(
            "not every agent has reported its failures cleared (an agent that is down clears when it returns)",
        )
    };
    print_after(ctx, last, &svc.spec.cluster_ref).await?;
    Ok(outcome)
}

/// Fails, saying why, when `node` still renews its heartbeat in `cluster`:
/// its heartbeat Lease is watched for two renew intervals (and half a
/// second), and a renew in that time proves its agent runs. Certifying a
/// running node powered off would start its services elsewhere while it
/// still runs them. A node that never heartbeated passes.
async fn refuse_peerdown_of_alive(
    client: &Client,
    cluster: &str,
    node: &str,
) -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    use kubeha_crds::leases;
    let what = format!("HACluster {cluster}");
    let c = Api::<HACluster>::all(client.clone())
        .get(cluster)
        .await
        .map_err(|e| api_error(e, &what, "read"))?;
    let renew =
        Duration::from_millis(u64::try_from(c.spec.heartbeat.renew_interval_ms).unwrap_or(0));
    let name = leases::heartbeat_lease_name(cluster, node);
    let params = ListParams::default().labels(&format!(
        "{}={},{}={cluster},{}={node}",
        leases::LEASE_KIND_LABEL,
        leases::HEARTBEAT,
        leases::CLUSTER_LABEL,
        leases::NODE_LABEL
    ));
    let api: Api<Lease> = Api::all(client.clone());
    let renewed = || async {
        let list = api
            .list(&params)
            .await
            .map_err(|e| api_error(e, &format!("the heartbeat Lease {name}"), "read"))?;
        anyhow::Ok(
            list.items
                .into_iter()
                .find(|l| l.name_any() == name)
                .and_then(|l| l.spec?.renew_time)
                .map(|t| t.0),
        )
    };
    let Some(first) = renewed().await? else {
        return Ok(());
    };
    let until = Instant::now() + 2 * renew + Duration::from_millis(500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Some(again) = renewed().await?
            && again != first
        {
            anyhow::bail!(
                "{node} is alive: it renewed its heartbeat in {what} just now ({again}), so its agent runs. peerdown certifies a node that is powered off, and would start its services elsewhere while it still runs them. Power it off (or stop its agent) first, or pass --force"
            );
        }
    }
    Ok(())
}

async fn set_mode(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
    mode: Mode,
    only_from: Option<Mode>,
) -> anyhow::Result<Outcome> {
    let what = format!("HACluster {cluster}");
    let api: Api<HACluster> = Api::all(ctx.client.clone());
    let c = api
        .get(cluster)
        .await
        .map_err(|e| api_error(e, &what, "read"))?;
    if let Some(from) = only_from
        && let Some(current) = render::spec_mode(&c, node)
        && current != from
    {
        anyhow::bail!(
            "{node} is in mode {current} in {what}, not {from}; to change it anyway use: kubectl ha mode {node} {mode} --cluster {cluster}"
        );
    }
    let patch = patches::mode_patch(&c, node, mode)?;
    let patch: json_patch::Patch =
        serde_json::from_value(patch).context("building the JSON patch")?;
    match api
        .patch(cluster, &params(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s))
            if s.code == 422
                && (s.message.contains("testing value") || s.message.contains("test failed")) =>
        {
            anyhow::bail!(
                "{what}: spec.members.nodes changed while the mode was being set ({}); run the command again",
                s.message
            )
        }
        Err(kube::Error::Api(s)) if s.code == 422 => anyhow::bail!(
            "{what} refused mode {mode} for {node}: {}\nfix the other members' modes first (see kubectl ha status --cluster {cluster})",
            s.message
        ),
        Err(e) => return Err(api_error(e, &what, "patch")),
    }
    ctx.say(&format!("{what}: {node} set to mode {mode}"));
    let (_, done) = poll(&api, cluster, ctx.wait, |c: &HACluster| {
        c.status
            .as_ref()
            .is_some_and(|s| s.members.iter().any(|m| m.node == node && m.mode == mode))
    })
    .await;
    let outcome = if done {
        Outcome::Done
    } else {
        ctx.not_reached(&format!(
            "the operator has not reported {node} in mode {mode}"
        ))
    };
    print_cluster_after(ctx, cluster).await?;
    Ok(outcome)
}

/// Prints `clusters` and `services` as `-o` asks: text (the status), or a
/// kubectl List as JSON or YAML.
pub fn print_objects(
    ctx: &Ctx,
    clusters: &[HACluster],
    services: &[HAService],
) -> anyhow::Result<()> {
    print!("{}", format_objects(ctx.output, clusters, services)?);
    Ok(())
}

/// `clusters` and `services` in format `output` (`None`: text).
fn format_objects(
    output: Option<Output>,
    clusters: &[HACluster],
    services: &[HAService],
) -> anyhow::Result<String> {
    Ok(match output {
        None => render::status(clusters, services),
        Some(Output::Json) => {
            let mut text = serde_json::to_string_pretty(&render::list(clusters, services))
                .context("writing JSON")?;
            text.push('\n');
            text
        }
        Some(Output::Yaml) => {
            serde_yaml::to_string(&render::list(clusters, services)).context("writing YAML")?
        }
    })
}

/// Prints the cluster of a service and that service as last read (text:
/// a missing cluster is said; JSON/YAML: it is left out of the List).
async fn print_after(ctx: &Ctx, svc: Option<HAService>, cluster: &str) -> anyhow::Result<()> {
    let clusters: Api<HACluster> = Api::all(ctx.client.clone());
    let what = format!("HACluster {cluster}");
    let (found, missing) = match clusters.get_opt(cluster).await {
        Ok(Some(c)) => (vec![c], None),
        Ok(None) => (
            vec![],
            Some(format!(
                "{what} does not exist; create it or fix spec.clusterRef"
            )),
        ),
        Err(e) => (
            vec![],
            Some(format!("{what}: {:#}", api_error(e, &what, "read"))),
        ),
    };
    let services: Vec<HAService> = svc.into_iter().collect();
    if ctx.output.is_some() {
        if let Some(m) = missing {
            eprintln!("{m}");
        }
        return print_objects(ctx, &found, &services);
    }
    let mut out = String::new();
    for c in &found {
        out.push_str(&render::cluster(c));
    }
    if let Some(m) = missing {
        out.push_str(&m);
        out.push('\n');
    }
    for s in &services {
        out.push_str(&render::service(s));
    }
    print!("{out}");
    Ok(())
}

/// Reads the clusters (one with `cluster`) and the services `ctx` lists
/// (`-n`/`-A`), of that cluster only with `cluster`, sorted.
async fn read_status(
    ctx: &Ctx,
    cluster: Option<&str>,
    namespace: Option<&str>,
) -> anyhow::Result<(Vec<HACluster>, Vec<HAService>)> {
    let clusters_api: Api<HACluster> = Api::all(ctx.client.clone());
    let clusters: Vec<HACluster> = match cluster {
        Some(name) => vec![
            clusters_api
                .get(name)
                .await
                .map_err(|e| api_error(e, &format!("HACluster {name}"), "read"))?,
        ],
        None => {
            let mut all = clusters_api
                .list(&ListParams::default())
                .await
                .map_err(|e| api_error(e, "HAClusters", "list"))?
                .items;
            all.sort_by_key(ResourceExt::name_any);
            all
        }
    };
    let services_api: Api<HAService> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let mut services: Vec<HAService> = services_api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "HAServices", "list"))?
        .items
        .into_iter()
        .filter(|s| cluster.is_none_or(|c| s.spec.cluster_ref == c))
        .collect();
    services.sort_by_key(|s| (s.namespace(), s.name_any()));
    Ok((clusters, services))
}

/// After a mode change: the cluster and its services in every namespace
/// (the status of the cluster the command changed).
async fn print_cluster_after(ctx: &Ctx, cluster: &str) -> anyhow::Result<()> {
    let (clusters, services) = read_status(ctx, Some(cluster), None).await?;
    print_objects(ctx, &clusters, &services)
}

/// `kubectl ha status`: prints once; [`Outcome::Attention`] when a
/// service shown needs it ([`render::needs_attention`]).
async fn print_status(ctx: &Ctx, cluster: Option<&str>) -> anyhow::Result<Outcome> {
    let (clusters, services) = read_status(ctx, cluster, ctx.list_namespace()).await?;
    print_objects(ctx, &clusters, &services)?;
    if services.is_empty() && !ctx.all_namespaces && ctx.output.is_none() {
        eprintln!(
            "note: HAServices were listed in namespace {} only; -A lists every namespace",
            ctx.namespace
        );
    }
    Ok(status_outcome(&services))
}

/// [`Outcome::Attention`] when one of `services` is Errored or Degraded.
fn status_outcome(services: &[HAService]) -> Outcome {
    if services.iter().any(render::needs_attention) {
        Outcome::Attention
    } else {
        Outcome::Done
    }
}

/// `kubectl ha status --watch`: prints the status, then again each time a
/// watched HACluster or HAService changes it (what is printed, not any
/// write: a status heartbeat that changes nothing shown prints nothing).
/// Runs until interrupted; a watch that cannot be re-established is an
/// error.
async fn watch_status(ctx: &Ctx, cluster: Option<&str>) -> anyhow::Result<Outcome> {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let clusters = watcher(
        Api::<HACluster>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| e.map(|_| ()));
    let services_api: Api<HAService> = match ctx.list_namespace() {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let services = watcher(services_api, watcher::Config::default())
        .default_backoff()
        .map(|e| e.map(|_| ()));
    let mut changes = std::pin::pin!(futures::stream::select(clusters, services));
    let mut last = String::new();
    loop {
        // A later read that fails (the API server restarting, say) is
        // said and the watch goes on; the next change reads again.
        let now = match read_status(ctx, cluster, ctx.list_namespace()).await {
            Ok((clusters, services)) => format_objects(ctx.output, &clusters, &services)?,
            // The first read fails as `status` without --watch does (a
            // wrong --cluster, no RBAC).
            Err(e) if last.is_empty() => return Err(e),
            Err(e) => {
                eprintln!("note: {e:#}; the status is read again on the next change");
                last.clone()
            }
        };
        if now != last {
            if !last.is_empty() {
                println!(
                    "{}",
                    if ctx.output == Some(Output::Yaml) {
                        "---"
                    } else {
                        ""
                    }
                );
            }
            print!("{now}");
            last = now;
        }
        // Wait for a change, then let a burst of them settle (a transition
        // writes the Lease and several statuses within milliseconds).
        match changes.next().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                eprintln!("note: the watch broke ({e}); it is re-established");
            }
            None => anyhow::bail!("the watch of HAClusters and HAServices ended"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Some(Some(_)) = futures::FutureExt::now_or_never(changes.next()) {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_parses_the_commands() {
        Cli::command().debug_assert();
        let cli = Cli::parse_from(["kubectl-ha", "move", "svc", "--to", "node-2", "-n", "ns"]);
        assert_eq!(
            format!("{:?}", cli.command),
            r#"Move { service: "svc", to: "node-2" }"#
        );
        assert_eq!(cli.global.namespace.as_deref(), Some("ns"));
        assert_eq!(cli.global.wait, 10);
        assert_eq!(cli.global.output, None);
        let cli = Cli::parse_from(["kubectl-ha", "mode", "node-1", "locked", "--cluster", "c"]);
        assert!(matches!(
            cli.command,
            Command::Mode {
                mode: Mode::Locked,
                ..
            }
        ));
        let cli = Cli::parse_from(["kubectl-ha", "status", "--wait", "0"]);
        assert_eq!(cli.global.wait, 0);
        assert!(
            Cli::try_parse_from(["kubectl-ha", "mode", "n", "sideways", "--cluster", "c"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["kubectl-ha", "peerdown", "n"]).is_err(),
            "--cluster is required"
        );
    }

    #[test]
    fn global_options_are_spelled_as_kubectl_spells_them_before_or_after_the_command() {
        let cli = Cli::parse_from([
            "kubectl-ha",
            "--kubeconfig",
            "/tmp/k",
            "--context",
            "lab",
            "status",
            "-A",
            "-o",
            "yaml",
            "-w",
        ]);
        assert_eq!(cli.global.kubeconfig, Some(PathBuf::from("/tmp/k")));
        assert_eq!(cli.global.context.as_deref(), Some("lab"));
        assert!(cli.global.all_namespaces);
        assert_eq!(cli.global.output, Some(Output::Yaml));
        assert!(matches!(cli.command, Command::Status { watch: true, .. }));
        let cli = Cli::parse_from([
            "kubectl-ha",
            "-o",
            "json",
            "clear",
            "svc",
            "--namespace",
            "x",
        ]);
        assert_eq!(cli.global.output, Some(Output::Json));
        assert_eq!(cli.global.namespace.as_deref(), Some("x"));
        let e = Cli::try_parse_from(["kubectl-ha", "status", "-o", "wide"]).unwrap_err();
        assert_eq!(e.exit_code(), i32::from(exit::USAGE));
        assert!(e.to_string().contains("json"), "{e}");
        let e = Cli::try_parse_from(["kubectl-ha", "status", "-A", "-n", "x"]).unwrap_err();
        assert_eq!(
            e.exit_code(),
            i32::from(exit::USAGE),
            "-A conflicts with -n"
        );
    }

    #[test]
    fn help_lists_every_exit_code() {
        let help = Cli::command().render_long_help().to_string();
        for code in [
            exit::OK,
            exit::ERROR,
            exit::USAGE,
            exit::ATTENTION,
            exit::NOT_REACHED,
        ] {
            assert!(
                help.contains(&format!("\n  {code}  ")),
                "{code} in:\n{help}"
            );
        }
        assert_eq!(Outcome::Done.code(), 0);
        assert_eq!(Outcome::Attention.code(), 3);
        assert_eq!(Outcome::NotReached.code(), 4);
    }

    #[test]
    fn modes_parse_as_the_api_spells_them() {
        assert_eq!(parse_mode("peerdown"), Ok(Mode::Peerdown));
        assert_eq!(parse_mode("default"), Ok(Mode::Default));
        let e = parse_mode("Peerdown").unwrap_err();
        assert!(
            e.contains("default, single, config, locked, peerdown"),
            "{e}"
        );
    }
}
