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
//! - `status`: clusters, members, services.

pub mod patches;
pub mod render;

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use k8s_openapi::serde::de::DeserializeOwned;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use kubeha_crds::service::NodeServiceState;
use kubeha_crds::{HACluster, HAService, Mode, annotations};

/// Field manager of the plugin's writes.
pub const FIELD_MANAGER: &str = "kubectl-ha";

/// Command line of `kubectl-ha`.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-ha",
    version,
    about = "kubectl ha: kubeha admin commands (move, clear, modes, status)"
)]
pub struct Cli {
    /// Seconds to wait for the operator and agents to act before printing
    /// the resulting status (0: print at once).
    #[arg(long, global = true, default_value_t = 10)]
    pub wait: u64,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The admin commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Planned switchover: run SERVICE on NODE (annotation
    /// kubeha.io/move-to). The preference stays until `kubectl ha clear`.
    Move {
        /// The HAService.
        service: String,
        /// The member node to run it on.
        #[arg(long)]
        to: String,
        /// Namespace of the HAService (default: the kubeconfig's).
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Clear SERVICE's failures (annotation kubeha.io/clear) and withdraw a
    /// move request (removes kubeha.io/move-to).
    Clear {
        /// The HAService.
        service: String,
        /// Namespace of the HAService (default: the kubeconfig's).
        #[arg(short, long)]
        namespace: Option<String>,
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
    /// Clusters (members' modes and heartbeats) and services (phase, active,
    /// standby, epoch).
    Status {
        /// Only this HACluster and its services.
        #[arg(long)]
        cluster: Option<String>,
        /// Only services in this namespace (default: all namespaces).
        #[arg(short, long)]
        namespace: Option<String>,
    },
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

/// Runs the plugin.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(cli))
}

async fn run_async(cli: Cli) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow!("cannot load a kubeconfig or in-cluster configuration: {e}; set KUBECONFIG or the current context")
    })?;
    let wait = Duration::from_secs(cli.wait);
    match cli.command {
        Command::Move {
            service,
            to,
            namespace,
        } => {
            let ns = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
            move_service(&client, &ns, &service, &to, wait).await
        }
        Command::Clear { service, namespace } => {
            let ns = namespace.unwrap_or_else(|| client.default_namespace().to_owned());
            clear_service(&client, &ns, &service, wait).await
        }
        Command::Mode {
            node,
            mode,
            cluster,
            force,
        } => {
            if mode == Mode::Peerdown && !force {
                refuse_peerdown_of_alive(&client, &cluster, &node).await?;
            }
            set_mode(&client, &cluster, &node, mode, None, wait).await
        }
        Command::Peerdown {
            node,
            cluster,
            force,
        } => {
            if !force {
                refuse_peerdown_of_alive(&client, &cluster, &node).await?;
            }
            eprintln!(
                "warning: peerdown certifies that {node} is powered off; its services start elsewhere at once. If {node} still runs, two nodes may run the same service."
            );
            set_mode(&client, &cluster, &node, Mode::Peerdown, None, wait).await
        }
        Command::Peerup { node, cluster } => {
            set_mode(
                &client,
                &cluster,
                &node,
                Mode::Default,
                Some(Mode::Peerdown),
                wait,
            )
            .await
        }
        Command::Status { cluster, namespace } => {
            print_status(&client, cluster.as_deref(), namespace.as_deref()).await
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

async fn move_service(
    client: &Client,
    ns: &str,
    name: &str,
    to: &str,
    wait: Duration,
) -> anyhow::Result<()> {
    let (what, api, svc) = read_service(client, ns, name).await?;
    // A node that is certainly no member is refused here; members picked by
    // a selector (or a cluster this user may not read) are judged by the
    // operator, which reports in the Moved condition.
    let clusters: Api<HACluster> = Api::all(client.clone());
    if let Some(c) = clusters.get_opt(&svc.spec.cluster_ref).await.ok().flatten()
        && c.spec.members.selector.is_none()
        && !c.spec.members.nodes.iter().any(|m| m.name == to)
    {
        let listed: Vec<&str> = c
            .spec
            .members
            .nodes
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        anyhow::bail!(
            "{to} is not a member of HACluster {} that {what} runs on (members: {}); move it to one of them",
            svc.spec.cluster_ref,
            listed.join(", ")
        );
    }
    api.patch(name, &params(), &Patch::Merge(&patches::move_patch(to)))
        .await
        .map_err(|e| api_error(e, &what, "patch"))?;
    println!("{what}: {}={to} set", annotations::MOVE_TO);
    let (last, done) = poll(&api, name, wait, |s: &HAService| {
        moved_condition(s)
            .is_some_and(|(status, reason, _)| status == "True" || reason == "TargetNotEligible")
    })
    .await;
    if let Some((status, reason, message)) = last.as_ref().and_then(moved_condition)
        && status == "False"
        && reason == "TargetNotEligible"
    {
        eprintln!("warning: {message}");
    } else if !done && !wait.is_zero() {
        eprintln!(
            "note: {what} has not reached {to} within {} s; the status below is the latest",
            wait.as_secs()
        );
    }
    print_after(client, last, &svc.spec.cluster_ref).await
}

async fn clear_service(
    client: &Client,
    ns: &str,
    name: &str,
    wait: Duration,
) -> anyhow::Result<()> {
    let (what, api, svc) = read_service(client, ns, name).await?;
    let token = patches::clear_token(jiff::Timestamp::now());
    api.patch(
        name,
        &params(),
        &Patch::Merge(&patches::clear_patch(&token)),
    )
    .await
    .map_err(|e| api_error(e, &what, "patch"))?;
    println!(
        "{what}: {}={token} set, {} removed",
        annotations::CLEAR,
        annotations::MOVE_TO
    );
    let (last, done) = poll(&api, name, wait, |s: &HAService| {
        s.status.as_ref().is_none_or(|st| {
            st.nodes
                .iter()
                .all(|e| e.fail_count == 0 && e.state != NodeServiceState::Failed)
        })
    })
    .await;
    if !done && !wait.is_zero() {
        eprintln!(
            "note: not every agent has reported its failures cleared within {} s (an agent that is down clears when it returns); the status below is the latest",
            wait.as_secs()
        );
    }
    print_after(client, last, &svc.spec.cluster_ref).await
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
    client: &Client,
    cluster: &str,
    node: &str,
    mode: Mode,
    only_from: Option<Mode>,
    wait: Duration,
) -> anyhow::Result<()> {
    let what = format!("HACluster {cluster}");
    let api: Api<HACluster> = Api::all(client.clone());
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
    println!("{what}: {node} set to mode {mode}");
    let (_, done) = poll(&api, cluster, wait, |c: &HACluster| {
        c.status
            .as_ref()
            .is_some_and(|s| s.members.iter().any(|m| m.node == node && m.mode == mode))
    })
    .await;
    if !done && !wait.is_zero() {
        eprintln!(
            "note: the operator has not reported {node} in mode {mode} within {} s; the status below is the latest",
            wait.as_secs()
        );
    }
    print_status(client, Some(cluster), None).await
}

/// Prints the cluster of a service and that service as last read.
async fn print_after(client: &Client, svc: Option<HAService>, cluster: &str) -> anyhow::Result<()> {
    let clusters: Api<HACluster> = Api::all(client.clone());
    let mut out = String::new();
    match clusters.get_opt(cluster).await {
        Ok(Some(c)) => out.push_str(&render::cluster(&c)),
        Ok(None) => out.push_str(&format!(
            "HACluster {cluster} does not exist; create it or fix spec.clusterRef\n"
        )),
        Err(e) => out.push_str(&format!(
            "HACluster {cluster}: {:#}\n",
            api_error(e, &format!("HACluster {cluster}"), "read")
        )),
    }
    if let Some(s) = svc {
        out.push_str(&render::service(&s));
    }
    print!("{out}");
    Ok(())
}

async fn print_status(
    client: &Client,
    cluster: Option<&str>,
    namespace: Option<&str>,
) -> anyhow::Result<()> {
    let clusters_api: Api<HACluster> = Api::all(client.clone());
    let clusters: Vec<HACluster> = match cluster {
        Some(name) => vec![
            clusters_api
                .get(name)
                .await
                .map_err(|e| api_error(e, &format!("HACluster {name}"), "read"))?,
        ],
        None => {
            clusters_api
                .list(&ListParams::default())
                .await
                .map_err(|e| api_error(e, "HAClusters", "list"))?
                .items
        }
    };
    let services_api: Api<HAService> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
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
    print!("{}", render::status(&clusters, &services));
    Ok(())
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
            r#"Move { service: "svc", to: "node-2", namespace: Some("ns") }"#
        );
        assert_eq!(cli.wait, 10);
        let cli = Cli::parse_from(["kubectl-ha", "mode", "node-1", "locked", "--cluster", "c"]);
        assert!(matches!(
            cli.command,
            Command::Mode {
                mode: Mode::Locked,
                ..
            }
        ));
        let cli = Cli::parse_from(["kubectl-ha", "status", "--wait", "0"]);
        assert_eq!(cli.wait, 0);
        assert!(
            Cli::try_parse_from(["kubectl-ha", "mode", "n", "sideways", "--cluster", "c"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["kubectl-ha", "peerdown", "n"]).is_err(),
            "--cluster is required"
        );
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
