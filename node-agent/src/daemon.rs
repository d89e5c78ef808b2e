//! The agent daemon: watches HAClusters, HAServices, service Leases and its
//! own Node object (for `spec.members.selector`),
//! renews heartbeats, runs transitions one at a time per service, extends VIP
//! lifetimes on every renew, fences itself when a heartbeat passes RD, and
//! keeps the node-local status file.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as KubeNode, ObjectReference};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kubeha_crds::cluster::NoQuorumPolicy;
use kubeha_crds::service::{NodeServiceState, Role};
use kubeha_crds::{HACluster, HAService, HAServiceSpec, annotations, leases};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, mpsc};

use crate::assignments::{self, Assignment, Membership, plan};
use crate::decide::{self, Facts, Work};
use crate::heartbeat::{self, Heartbeats, Timing};
use crate::hooks::HookRunner;
use crate::metrics::Metrics;
use crate::statefile::{self, ClusterRecord, NodeStatus, ServiceRecord};
use crate::transitions::{ClusterView, Node, ServiceView};
use crate::vip::RtNetlink;

/// Where the agent keeps things and whom it serves.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's Kubernetes name.
    pub node: String,
    /// Namespace of the heartbeat Leases (the operator's).
    pub namespace: String,
    /// Root of host-path hook sources.
    pub hook_root: PathBuf,
    /// Hook logs and the fence log.
    pub log_dir: PathBuf,
    /// Status file and materialised ConfigMap hooks.
    pub state_dir: PathBuf,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: std::net::SocketAddr,
    /// The cgroup v2 directory hooks run in (the fence kills all in it);
    /// `None`: hooks are contained by their process groups only.
    pub hook_cgroup: Option<PathBuf>,
}

impl Config {
    /// The fence log.
    pub fn fence_log(&self) -> PathBuf {
        self.log_dir.join("fence.log")
    }
}

/// Checksum of a spec (`KUBEHA_CONFIG_CHECKSUM`): SHA-256 of its JSON.
pub fn spec_checksum(spec: &HAServiceSpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    Sha256::digest(&json)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Slot {
    record: Arc<Mutex<ServiceRecord>>,
    /// A record loaded from the status file, held before a restart: adopt
    /// it instead of entering again.
    adopt: bool,
    next_monitor: Instant,
    /// Consecutive failed monitor runs.
    monitor_failures: Arc<AtomicI32>,
    next_periodic: Instant,
    next_refresh: Instant,
    /// What was last reported to the API server successfully, and what a
    /// report in flight carries: a failed report is retried.
    reported: Arc<std::sync::Mutex<Reported>>,
    /// Loaded from the status file in the middle of entering or leaving
    /// master: leave first (idempotent), whatever the Lease says.
    recover: bool,
    /// The stale epoch last warned about (see [`assignments::not_older`]).
    stale_warned: Option<i64>,
    /// The cluster of a fence that found this record busy (a transition
    /// held it) and could not mark it: its VIPs were dropped under it, so
    /// once the record is free it is marked as a fence does.
    fenced_while_busy: Arc<std::sync::Mutex<Option<String>>>,
}

/// Report bookkeeping of one service: the digest the API server has, and
/// the one a report in flight carries.
#[derive(Default)]
struct Reported {
    done: Option<String>,
    pending: Option<String>,
    /// When the last report was sent.
    sent: Option<Instant>,
}

/// How long after a report the API server's copy of the entry may still
/// differ (watch lag) before it is sent again.
const REPORT_RECHECK: Duration = Duration::from_secs(2);

/// The HAService a task reports on: status entry and Events.
#[derive(Clone)]
struct Target {
    api: Api<HAService>,
    name: String,
    reference: ObjectReference,
}

struct Shared {
    config: Config,
    client: Client,
    node: Node<RtNetlink>,
    beats: Heartbeats,
    metrics: Metrics,
    fenced: std::sync::Mutex<HashMap<String, Arc<AtomicBool>>>,
    notify: Notify,
    recorder: Recorder,
    /// Serializes writes of the status file (the periodic writer and the
    /// transitions' intents).
    state_file: std::sync::Mutex<()>,
    /// The status file was unreadable at start: services without a record
    /// leave first.
    past_unknown: AtomicBool,
    /// Per cluster, the `renewTime` of the first renew after this node's
    /// last fence: a clearance written before the operator saw it is not
    /// entered ([`leases::HOLDER_RENEW_ANNOTATION`]).
    returned: std::sync::Mutex<HashMap<String, jiff::Timestamp>>,
    /// Per service (`namespace/name`), when to send the status entry again
    /// after a report that timed out: the API server may still apply that
    /// one later, over a newer report.
    resend: std::sync::Mutex<HashMap<String, Vec<Instant>>>,
}

/// Runs the daemon until a signal ends it.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Metrics::default();
    let beats = Heartbeats::default();
    let netlink = RtNetlink::new()?;
    let mut runner = HookRunner::new(config.log_dir.clone());
    match &config.hook_cgroup {
        Some(dir) => {
            let cgroup = crate::cgroup::HookCgroup::create(dir)
                .map_err(|e| anyhow::anyhow!("--hook-cgroup: {e}"))?;
            tracing::info!(cgroup = %dir.display(), "hooks run in their own cgroup");
            runner = runner.with_cgroup(cgroup);
        }
        None => tracing::warn!(
            "no --hook-cgroup: a fence stops the hooks' process groups only, not daemons that left them"
        ),
    }
    let node = Node {
        name: config.node.clone(),
        netlink,
        runner,
        hook_root: config.hook_root.clone(),
        state_dir: config.state_dir.clone(),
        metrics: metrics.clone(),
        held: Default::default(),
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        client: client.clone(),
        node,
        beats: beats.clone(),
        metrics: metrics.clone(),
        fenced: Default::default(),
        notify: Notify::new(),
        state_file: std::sync::Mutex::new(()),
        past_unknown: AtomicBool::new(false),
        returned: Default::default(),
        resend: Default::default(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "kubeha-agent".into(),
                instance: Some(config.node.clone()),
            },
        ),
    });

    tokio::spawn({
        let (m, b, addr) = (metrics.clone(), beats.clone(), config.metrics_addr);
        async move {
            if let Err(e) = crate::metrics::serve(addr, m, b).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        }
    });

    let clusters = watch::<HACluster>(&client, watcher::Config::default(), &shared);
    let services = watch::<HAService>(&client, watcher::Config::default(), &shared);
    let service_leases = watch::<Lease>(
        &client,
        watcher::Config::default().labels(&leases::service_lease_selector()),
        &shared,
    );
    // This node's own Node object: its labels decide membership in clusters
    // that pick members with `spec.members.selector`.
    let own_node = watch::<KubeNode>(
        &client,
        watcher::Config::default().fields(&format!("metadata.name={}", config.node)),
        &shared,
    );
    // Not part of the sync below: without it (e.g. RBAC without nodes) only
    // membership by selector stays undecided, listed clusters go on.
    let node_synced = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let (n, node_synced, shared) = (own_node.clone(), node_synced.clone(), shared.clone());
        async move {
            if n.wait_until_ready().await.is_ok() {
                node_synced.store(true, Ordering::SeqCst);
                shared.notify.notify_one();
                tracing::info!("own Node object watched");
            }
        }
    });

    // No plan before every store has its first full list: a restarted
    // holder that saw its service but not yet its Lease would leave it.
    let synced = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let (c, s, l) = (clusters.clone(), services.clone(), service_leases.clone());
        let (synced, shared) = (synced.clone(), shared.clone());
        async move {
            if tokio::try_join!(
                c.wait_until_ready(),
                s.wait_until_ready(),
                l.wait_until_ready()
            )
            .is_ok()
            {
                synced.store(true, Ordering::SeqCst);
                shared.notify.notify_one();
                tracing::info!("watches synced");
            }
        }
    });

    let mut slots: BTreeMap<String, Slot> = BTreeMap::new();
    // A status file that exists but cannot be read: what ran here before is
    // unknown, so no later epoch may be reported as "moved on" before a
    // leave ran. Every service this node is a member of leaves first (the
    // scripts are idempotent); the file is kept aside for the admin.
    let saved = match statefile::read_at_start(&config.state_dir) {
        Ok(saved) => saved,
        Err(reason) => {
            let aside = statefile::path(&config.state_dir)
                .with_extension(format!("unreadable-{}", jiff::Timestamp::now().as_second()));
            let _ = std::fs::rename(statefile::path(&config.state_dir), &aside);
            tracing::error!(%reason, aside = %aside.display(), "the status file is unreadable: every service leaves first");
            shared.past_unknown.store(true, Ordering::SeqCst);
            None
        }
    };
    if let Some(saved) = saved {
        for (key, mut record) in saved.services {
            if record.assume_unclean_if_unknown() {
                tracing::info!(service = %key, epoch = record.epoch, "failed without acknowledgement before the restart: counted as a leave that failed");
            }
            // Written just before entering or leaving master (the intent),
            // and the agent died before the outcome was written: the service
            // may be half started or half stopped. Leave first.
            let recover = matches!(
                record.state,
                NodeServiceState::Starting | NodeServiceState::Stopping
            );
            if recover {
                tracing::warn!(service = %key, epoch = record.epoch, state = ?record.state, "died in the middle of a transition: leaving master first");
            }
            // A master role that may not have been left cleanly (a leave
            // that failed, or a refusal the old-file rule above cannot tell
            // from one): the leave runs again once in contact. Its success
            // ends the state; without it nothing would, as this node keeps
            // heartbeating and reports no later epoch.
            let recover =
                recover || (record.role != Role::Master && record.unclean_epoch.is_some());
            let adopt = record.role == Role::Master && !recover;
            let mut slot = new_slot(record, adopt);
            slot.recover = recover;
            slots.insert(key, slot);
        }
        tracing::info!(services = slots.len(), "loaded the status file");
    }

    let (renewed_tx, mut renewed_rx) = mpsc::unbounded_channel::<String>();
    let mut renewers: HashMap<String, (Timing, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last_write = Instant::now() - Duration::from_secs(10);
    let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = shared.notify.notified() => {}
            _ = tick.tick() => {}
            Some(cluster) = renewed_rx.recv() => {
                on_renewed(&shared, &cluster).await;
            }
            _ = &mut shutdown => break,
            _ = term.recv() => break,
        }
        let clusters_now = clusters.state();
        let me = OwnNode::read(&own_node, &config.node, &node_synced);
        sync_heartbeats(
            &shared,
            &clusters_now,
            &me,
            &mut renewers,
            &renewed_tx,
            &client,
        );
        fence_if_cut_off(&shared, &clusters_now, &me, &slots).await;
        if !synced.load(Ordering::SeqCst) {
            shared.beats.mark_progress(Instant::now());
            continue;
        }
        reconcile(
            &shared,
            &clusters_now,
            &me,
            &services,
            &service_leases,
            &mut slots,
        )
        .await;
        if last_write.elapsed() >= Duration::from_millis(500) {
            write_status(&shared, &slots).await;
            last_write = Instant::now();
        }
        shared.beats.mark_progress(Instant::now());
    }
    // Shutting down is not a failover: keep VIPs (their lifetime runs out
    // unless a restarted agent re-adopts them) and the status file.
    write_status(&shared, &slots).await;
    for (_, (_, h)) in renewers {
        h.abort();
    }
    tracing::info!("agent stopped; VIPs left to their lifetime for re-adoption");
    Ok(())
}

fn new_slot(record: ServiceRecord, adopt: bool) -> Slot {
    let now = Instant::now();
    Slot {
        record: Arc::new(Mutex::new(record)),
        adopt,
        next_monitor: now,
        monitor_failures: Arc::default(),
        next_periodic: now,
        next_refresh: now,
        reported: Arc::default(),
        recover: false,
        stale_warned: None,
        fenced_while_busy: Arc::default(),
    }
}

/// A reflector whose every event wakes the main loop. A malformed object is
/// skipped ([`kubeha_crds::watch::reflect`]); errors are logged and retried
/// with backoff: the watch goes on.
fn watch<K>(client: &Client, config: watcher::Config, shared: &Arc<Shared>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, stream) = kubeha_crds::watch::reflect::<K>(client, None, config);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, kind = %std::any::type_name::<K>(), "watch error (retrying)");
            }
            shared.notify.notify_one();
        }
    });
    reader
}

fn fenced_flag(shared: &Shared, cluster: &str) -> Arc<AtomicBool> {
    shared
        .fenced
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(cluster.to_owned())
        .or_default()
        .clone()
}

/// What the agent knows of its own Node object.
struct OwnNode {
    name: String,
    /// Its labels; `None` when there is no such Node (or not known yet).
    labels: Option<BTreeMap<String, String>>,
    /// Whether the Node watch has listed once.
    known: bool,
}

impl OwnNode {
    fn read(store: &Store<KubeNode>, name: &str, synced: &AtomicBool) -> Self {
        Self {
            name: name.to_owned(),
            labels: store
                .state()
                .iter()
                .find(|n| n.name_any() == name)
                .map(|n| n.labels().clone()),
            known: synced.load(Ordering::SeqCst),
        }
    }

    fn membership(&self, cluster: &HACluster) -> Membership {
        assignments::membership(cluster, &self.name, self.labels.as_ref(), self.known)
    }
}

/// The clusters this node is a member of, with their membership (members
/// and, with `undecided`, those whose selector membership is not known yet).
fn member_of<'a>(
    clusters: &'a [Arc<HACluster>],
    me: &'a OwnNode,
    undecided: bool,
) -> impl Iterator<Item = (&'a Arc<HACluster>, Membership)> {
    clusters
        .iter()
        .map(move |c| (c, me.membership(c)))
        .filter(move |(_, m)| match m {
            Membership::Member(_) => true,
            Membership::Unknown => undecided,
            Membership::NotMember => false,
        })
}

fn sync_heartbeats(
    shared: &Arc<Shared>,
    clusters: &[Arc<HACluster>],
    me: &OwnNode,
    renewers: &mut HashMap<String, (Timing, tokio::task::JoinHandle<()>)>,
    renewed: &mpsc::UnboundedSender<String>,
    client: &Client,
) {
    let node = &shared.config.node;
    let mut wanted = HashMap::new();
    // Undecided membership keeps a renewer that runs but starts none.
    let mut undecided = std::collections::HashSet::new();
    for (c, m) in member_of(clusters, me, true) {
        if m == Membership::Unknown {
            undecided.insert(c.name_any());
        } else {
            wanted.insert(c.name_any(), Timing::from(&c.spec.heartbeat));
        }
    }
    renewers.retain(|name, (_, handle)| {
        let keep = wanted.contains_key(name) || undecided.contains(name);
        if !keep {
            handle.abort();
            shared.beats.remove(name);
        }
        keep
    });
    for (name, timing) in wanted {
        shared.beats.set_timing(&name, timing);
        if renewers
            .get(&name)
            .is_some_and(|(t, h)| *t == timing && !h.is_finished())
        {
            continue;
        }
        if let Some((_, h)) = renewers.remove(&name) {
            h.abort();
        }
        let api: Api<Lease> = Api::namespaced(client.clone(), &shared.config.namespace);
        let handle = tokio::spawn(heartbeat::renew_loop(
            api,
            name.clone(),
            node.clone(),
            shared.beats.clone(),
            shared.metrics.clone(),
            renewed.clone(),
        ));
        renewers.insert(name, (timing, handle));
    }
}

fn cluster_view(shared: &Shared, cluster: &HACluster) -> ClusterView {
    let name = cluster.name_any();
    ClusterView {
        members: cluster
            .spec
            .members
            .nodes
            .iter()
            .map(|m| m.name.clone())
            .collect(),
        beat: shared.beats.get(&name),
        fenced: fenced_flag(shared, &name),
        config_maps_in_service_namespace: cluster
            .spec
            .allowed_hook_sources
            .config_map_in_service_namespace,
        name,
    }
}

/// After a successful renew: clear the fence mark and extend the lifetimes
/// of the VIPs held for that cluster.
async fn on_renewed(shared: &Arc<Shared>, cluster: &str) {
    let flag = fenced_flag(shared, cluster);
    if flag.swap(false, Ordering::SeqCst) {
        let renewed = shared.beats.get(cluster).and_then(|b| b.renew_time);
        tracing::info!(%cluster, ?renewed, "heartbeat renewed again after a fence");
        if let Some(t) = renewed {
            shared
                .returned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(cluster.to_owned(), t);
        }
    }
    let view = ClusterView {
        name: cluster.to_owned(),
        members: Vec::new(),
        beat: shared.beats.get(cluster),
        fenced: flag,
        config_maps_in_service_namespace: false,
    };
    shared.node.extend(&view).await;
}

/// The self-fence: for every cluster whose heartbeat passed RD, write the
/// fence log line, drop the VIPs at once, run the leave scripts in the time
/// left before D, then kill the hooks (and run the reset hook).
async fn fence_if_cut_off(
    shared: &Arc<Shared>,
    clusters: &[Arc<HACluster>],
    me: &OwnNode,
    slots: &BTreeMap<String, Slot>,
) {
    let now = Instant::now();
    for (cluster, _) in member_of(clusters, me, true) {
        let name = cluster.name_any();
        let Some(beat) = shared.beats.get(&name) else {
            continue;
        };
        // Never renewed since start: nothing can be held but adopted records,
        // whose VIP lifetime runs out by itself.
        if beat.last_success.is_none() || !beat.past_deadline(now) {
            continue;
        }
        let flag = fenced_flag(shared, &name);
        if flag.load(Ordering::SeqCst) {
            continue;
        }
        if cluster.spec.fence.no_quorum_policy == NoQuorumPolicy::Freeze {
            freeze(shared, &name).await;
            continue;
        }
        flag.store(true, Ordering::SeqCst);
        let age = beat.age(now).unwrap_or_default();
        let line = format!(
            "{} node={} cluster={} fence: no heartbeat renew for {} ms (renew deadline {} ms)",
            jiff::Timestamp::now(),
            shared.config.node,
            name,
            age.as_millis(),
            beat.timing.renew_deadline.as_millis()
        );
        if let Err(e) = statefile::append_synced(&shared.config.fence_log(), &line) {
            tracing::error!(error = %e, "writing the fence log failed");
        }
        tracing::error!(cluster = %name, age_ms = age.as_millis() as u64, "heartbeat past its deadline: fencing");
        shared.metrics.fenced();
        // 1. Drop every VIP of this cluster at once, without waiting for a
        //    transition's lock.
        let dropped = shared.node.drop_held(&name).await;
        tracing::error!(cluster = %name, dropped, "VIPs dropped");
        let mut masters = Vec::new();
        for (key, slot) in slots {
            let (vips, iface, cluster_of) = match slot.record.try_lock() {
                Ok(r) => (r.vips.clone(), r.interface.clone(), r.cluster.clone()),
                // Busy: drop every VIP its spec names.
                Err(_) => (Vec::new(), None, String::new()),
            };
            if !cluster_of.is_empty() && cluster_of != name {
                continue;
            }
            shared.node.drop_vips(&vips, iface.as_deref()).await;
            masters.push(key.clone());
        }
        // Also VIPs of records in the middle of a transition: kill their hooks
        // so the transition ends and sees the fence mark.
        shared.node.runner.kill_all();
        // 2. Leave scripts within what is left before D.
        let view = cluster_view(shared, cluster);
        for key in masters {
            let slot = &slots[&key];
            let left = beat.left_before_lease_end(Instant::now());
            let Ok(mut record) = tokio::time::timeout(left, slot.record.clone().lock_owned()).await
            else {
                *slot
                    .fenced_while_busy
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(name.clone());
                continue;
            };
            if record.cluster != name {
                continue;
            }
            shared
                .node
                .drop_vips(&record.vips.clone(), record.interface.clone().as_deref())
                .await;
            if record.role == Role::Master {
                let svc = ServiceView {
                    key: key.clone(),
                    spec: record.spec.clone(),
                    checksum: record.config_checksum.clone(),
                };
                let left = beat.left_before_lease_end(Instant::now());
                shared
                    .node
                    .fence_leave(&mut record, &svc, &view, left)
                    .await;
            }
        }
        // 3. The fence action: the hooks' process groups, then everything
        // in the hook cgroup (the daemons hooks started).
        let killed = shared.node.runner.kill_all() + shared.node.runner.kill_contained(&name);
        if let Some(reset) = &cluster.spec.fence.reset_hook
            && cluster.spec.fence.action == kubeha_crds::cluster::FenceAction::ResetHook
        {
            tracing::error!(%reset, "running the reset hook");
            let _ = tokio::process::Command::new(reset)
                .arg("fence")
                .status()
                .await;
        }
        tracing::error!(cluster = %name, killed, "fenced");
    }
}

/// `noQuorumPolicy: Freeze`: keep roles and VIPs without the API server
/// (the split-brain risk the admin accepted), extending VIP lifetimes here.
async fn freeze(shared: &Arc<Shared>, cluster: &str) {
    let Some(mut beat) = shared.beats.get(cluster) else {
        return;
    };
    beat.last_success = Some(Instant::now());
    let view = ClusterView {
        name: cluster.to_owned(),
        members: Vec::new(),
        beat: Some(beat),
        fenced: Arc::default(),
        config_maps_in_service_namespace: false,
    };
    shared.node.extend(&view).await;
}

async fn reconcile(
    shared: &Arc<Shared>,
    clusters: &[Arc<HACluster>],
    me: &OwnNode,
    services: &Store<HAService>,
    service_leases: &Store<Lease>,
    slots: &mut BTreeMap<String, Slot>,
) {
    let node = shared.config.node.clone();
    let by_name: HashMap<String, &Arc<HACluster>> =
        clusters.iter().map(|c| (c.name_any(), c)).collect();
    let lease_of: HashMap<(String, String), Arc<Lease>> = service_leases
        .state()
        .into_iter()
        .map(|l| ((l.namespace().unwrap_or_default(), l.name_any()), l))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for svc in services.state() {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let Some(cluster) = by_name.get(&svc.spec.cluster_ref) else {
            continue;
        };
        let mode = match me.membership(cluster) {
            Membership::Member(mode) => mode,
            Membership::NotMember => continue,
            // Selector membership not known yet: keep what is held as it
            // is (counts as seen, so it is not left either).
            Membership::Unknown => {
                seen.insert(key.clone());
                continue;
            }
        };
        seen.insert(key.clone());
        let lease = lease_of.get(&(
            svc.namespace().unwrap_or_default(),
            leases::service_lease_name(&svc.name_any()),
        ));
        let wanted = assignments::assignment(&node, lease.map(|l| l.as_ref()), Some(mode));
        // A clearance the operator wrote before it saw this node renew
        // again after its last fence.
        let cleared_before_return = shared
            .returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&cluster.name_any())
            .is_some_and(|back| {
                lease
                    .and_then(|l| leases::holder_renew_time(l))
                    .is_none_or(|seen| leases::seen_before(seen, *back))
            });
        let lease_epoch = lease.and_then(|l| assignments::lease_epoch(l));
        let view = cluster_view(shared, cluster);
        let slot = slots.entry(key.clone()).or_insert_with(|| {
            let mut slot = new_slot(
                ServiceRecord::fresh(
                    &cluster.name_any(),
                    &svc.spec,
                    spec_checksum(&svc.spec),
                    svc.annotations().get(annotations::CLEAR).cloned(),
                ),
                false,
            );
            slot.recover = shared.past_unknown.load(Ordering::SeqCst);
            slot
        });
        let Ok(mut guard) = slot.record.clone().try_lock_owned() else {
            continue;
        };
        let fenced_busy = slot
            .fenced_while_busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if fenced_busy.as_deref() == Some(guard.cluster.as_str()) && guard.role == Role::Master {
            tracing::error!(service = %key, epoch = guard.epoch, "a fence found this service in a transition: its VIPs were dropped under it; leaving as a fence does");
            shared
                .node
                .drop_vips(&guard.vips.clone(), guard.interface.clone().as_deref())
                .await;
            crate::transitions::Node::<RtNetlink>::mark_fenced(&mut guard);
        }
        // An admin's clear request (a new `kubeha.io/clear` value): reset
        // this node's failures; the report below (or the next step's)
        // tells the operator.
        let token = svc
            .annotations()
            .get(annotations::CLEAR)
            .map(String::as_str);
        if let Some(cleared) = guard.apply_clear(token) {
            slot.monitor_failures.store(0, Ordering::SeqCst);
            // A clear proves nothing about a leave that failed here: run the
            // leave again (scripts are idempotent); only its success
            // acknowledges the epoch and lets this node enter again.
            if guard.unclean_epoch.is_some() {
                slot.recover = true;
            }
            tracing::info!(service = %key, token, ?cleared, "clear request applied");
            if cleared.changed() {
                let note = format!(
                    "failures cleared ({} {}): fail count {} -> 0{}{}",
                    annotations::CLEAR,
                    token.unwrap_or_default(),
                    cleared.fail_count,
                    if cleared.was_failed {
                        ", state Failed -> Stopped"
                    } else {
                        ""
                    },
                    cleared.failed_epoch.map_or(String::new(), |e| format!(
                        ", epoch {e} may be entered again"
                    )),
                );
                let (shared, reference) = (shared.clone(), svc.object_ref(&()));
                let target = Target {
                    api: Api::namespaced(
                        shared.client.clone(),
                        &svc.namespace().unwrap_or_default(),
                    ),
                    name: svc.name_any(),
                    reference,
                };
                tokio::spawn(async move {
                    event(&shared, &target, false, "FailuresCleared", note).await;
                });
            }
        }
        // Nothing is entered while this node is cut off from the API
        // server, or while its last renew leaves no whole second of VIP
        // lifetime (just after a stalled API server answers a renew sent
        // before the stall).
        let cut_off = view.fenced.load(Ordering::SeqCst)
            || view.beat.is_none_or(|b| {
                let now = Instant::now();
                b.past_deadline(now) || Node::<RtNetlink>::allowed_lifetime(&b, now).is_none()
            });
        let service = ServiceView {
            key: key.clone(),
            spec: svc.spec.clone(),
            checksum: spec_checksum(&svc.spec),
        };
        let target = Target {
            api: Api::namespaced(shared.client.clone(), &svc.namespace().unwrap_or_default()),
            name: svc.name_any(),
            reference: svc.object_ref(&()),
        };

        let fresh = assignments::not_older(wanted, guard.role, guard.epoch);
        if fresh != wanted && slot.stale_warned != Some(wanted.epoch) {
            slot.stale_warned = Some(wanted.epoch);
            tracing::warn!(service = %key, lease_epoch = wanted.epoch, recorded_epoch = guard.epoch, "the Lease clears this node at an epoch older than one it already saw: not entering (stale view, or a hand-edited Lease)");
        }
        let spec_vips: std::collections::BTreeSet<String> = Node::<RtNetlink>::vips(&svc.spec)
            .iter()
            .map(ToString::to_string)
            .collect();
        let hooks = svc.spec.hooks.as_ref();
        let now = Instant::now();
        let api_digest = svc
            .status
            .as_ref()
            .and_then(|s| s.nodes.iter().find(|e| e.node == node))
            .map(applied_digest);
        // Bookkeeping work is applied and the service decided again; every
        // rule of it changes what it decided on, so this ends.
        for _ in 0..8 {
            let digest = report_digest(&guard);
            let resend_due = {
                let mut resend = shared.resend.lock().unwrap_or_else(|e| e.into_inner());
                let due = resend.get_mut(&key).is_some_and(|at| {
                    let before = at.len();
                    at.retain(|t| *t > now);
                    at.len() < before
                });
                if resend.get(&key).is_some_and(Vec::is_empty) {
                    resend.remove(&key);
                }
                due
            };
            let report_due = {
                let mut r = slot.reported.lock().unwrap_or_else(|e| e.into_inner());
                if resend_due {
                    r.done = None;
                }
                // Reported and taken, but the API server's copy says
                // otherwise long after: a report that timed out here was
                // applied late, over a newer one. Sent again.
                let overwritten = api_digest.as_deref() != Some(&digest)
                    && r.sent
                        .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_RECHECK);
                r.pending.as_deref() != Some(&digest)
                    && (r.done.as_deref() != Some(&digest) || overwritten)
            };
            let work = decide::next(&Facts {
                wanted,
                lease_epoch,
                record: &guard,
                spec_vips: spec_vips.clone(),
                adopt: slot.adopt,
                recover: slot.recover,
                cleared_before_return,
                cut_off,
                vip_expired: shared.node.held.any_expired(&guard.vips),
                monitor_due: hooks.is_some_and(|h| h.monitor.is_some()) && now >= slot.next_monitor,
                periodic_due: hooks.is_some_and(|h| h.periodic.is_some())
                    && now >= slot.next_periodic,
                refresh_due: svc.spec.garp.refresh_seconds > 0 && now >= slot.next_refresh,
                report_due,
            });
            if work != Work::Idle && work != Work::Report {
                tracing::debug!(service = %key, ?work, "decided");
            }
            match work {
                Work::Wait | Work::Idle => {}
                Work::Adopt => {
                    slot.adopt = false;
                    spawn_adopt(shared.clone(), guard, view, target);
                }
                Work::ForgetAdoption => {
                    // Held before the restart but no longer ours: the steps
                    // leave it.
                    slot.adopt = false;
                    continue;
                }
                Work::GiveUp => {
                    shared.node.give_up_if_expired(&mut guard).await;
                    shared.notify.notify_one();
                    continue;
                }
                Work::Recover => {
                    if guard.fenced {
                        tracing::info!(service = %key, epoch = guard.epoch, "left by a fence: running the leave again");
                    }
                    slot.recover = false;
                    spawn_steps(
                        shared.clone(),
                        guard,
                        vec![assignments::Step::LeaveMaster],
                        service,
                        view,
                        fresh,
                        target,
                    );
                }
                Work::Refuse { epoch, acknowledge } => {
                    let why = if cleared_before_return {
                        "cleared before the operator saw this node back from a fence"
                    } else {
                        "already left on this node"
                    };
                    guard.state = NodeServiceState::Failed;
                    guard.failed_epoch = Some(epoch);
                    guard.last_hooks = vec![crate::transitions::refused(&format!(
                        "epoch {epoch} was {why}; waiting for a new epoch"
                    ))];
                    // Never entered here and no VIP of it on this node: the
                    // acknowledgement is true, and spares the operator the
                    // wait for a VIP's lifetime ("started nothing").
                    let mut vips = guard.vips.clone();
                    vips.extend(spec_vips.iter().cloned());
                    let acked = acknowledge
                        && !shared
                            .node
                            .holds_any(&vips, guard.interface.as_deref())
                            .await;
                    if acked {
                        guard.acked_epoch = guard.acked_epoch.max(Some(epoch));
                    }
                    tracing::warn!(service = %key, epoch, why, acked, "clearance refused: waiting for a new epoch");
                    continue;
                }
                Work::Steps(steps) => {
                    spawn_steps(shared.clone(), guard, steps, service, view, fresh, target);
                }
                Work::Revip => spawn_revip(shared.clone(), guard, service, view, target),
                Work::Observe { epoch } => {
                    if guard.observe_epoch(epoch) {
                        tracing::debug!(service = %key, epoch, role = ?guard.role, "observed a new epoch");
                    }
                    continue;
                }
                Work::Monitor => {
                    let m = hooks.and_then(|h| h.monitor.as_ref());
                    let (interval, threshold) =
                        m.map_or((1, 1), |m| (m.interval_seconds, m.failure_threshold));
                    slot.next_monitor = now + Duration::from_secs(interval.max(1) as u64);
                    let failures = slot.monitor_failures.clone();
                    spawn_monitor(
                        shared.clone(),
                        guard,
                        service,
                        view,
                        threshold,
                        failures,
                        target,
                    );
                }
                Work::Periodic => {
                    let interval = hooks
                        .and_then(|h| h.periodic.as_ref())
                        .map_or(1, |p| p.interval_seconds);
                    slot.next_periodic = now + Duration::from_secs(interval.max(1) as u64);
                    spawn_periodic(shared.clone(), guard, service, view);
                }
                Work::Refresh => {
                    slot.next_refresh =
                        now + Duration::from_secs(svc.spec.garp.refresh_seconds as u64);
                    // A copy: the burst takes a while and needs no lock.
                    let record = guard.clone();
                    drop(guard);
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let placed: Vec<_> = record
                            .vips
                            .iter()
                            .filter_map(|v| crate::vip::Vip::parse(v, None).ok())
                            .map(|v| (record.interface.clone().unwrap_or_default(), v))
                            .collect();
                        shared.node.garp(&placed, &record.spec).await;
                    });
                }
                Work::Report => {
                    {
                        let mut r = slot.reported.lock().unwrap_or_else(|e| e.into_inner());
                        r.pending = Some(digest.clone());
                        r.sent = Some(now);
                    }
                    // A copy: a slow API server must not hold the record
                    // (and every decision on it) for the report's timeout.
                    let record = guard.clone();
                    drop(guard);
                    let (shared, reported) = (shared.clone(), slot.reported.clone());
                    tokio::spawn(async move {
                        let outcome = report(&shared, &target, &record).await;
                        {
                            let mut r = reported.lock().unwrap_or_else(|e| e.into_inner());
                            if r.pending.as_deref() == Some(&digest) {
                                r.pending = None;
                            }
                            if outcome == Some(true) {
                                r.done = Some(digest);
                            }
                        }
                    });
                }
            }
            break;
        }
    }
    // Services gone (deleted, or this node no longer a member): leave.
    let gone: Vec<String> = slots
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        let slot = &slots[&key];
        let Ok(guard) = slot.record.clone().try_lock_owned() else {
            continue;
        };
        if guard.role == Role::None {
            drop(guard);
            slots.remove(&key);
            continue;
        }
        let Some(cluster) = by_name.get(&guard.cluster) else {
            continue;
        };
        let view = cluster_view(shared, cluster);
        let (ns, name) = key.split_once('/').unwrap_or(("", &key));
        let service = ServiceView {
            key: key.clone(),
            spec: guard.spec.clone(),
            checksum: guard.config_checksum.clone(),
        };
        let steps = plan(guard.role, Assignment::NONE, None);
        let target = Target {
            api: Api::namespaced(shared.client.clone(), ns),
            name: name.to_owned(),
            reference: ObjectReference {
                api_version: Some("kubeha.io/v1alpha1".into()),
                kind: Some("HAService".into()),
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                ..Default::default()
            },
        };
        spawn_steps(
            shared.clone(),
            guard,
            steps,
            service,
            view,
            Assignment::NONE,
            target,
        );
    }
}

/// What the API server's status entry is compared with: a report is due
/// when it differs.
fn report_digest(record: &ServiceRecord) -> String {
    let hooks = &record.last_hooks[record.last_hooks.len().saturating_sub(8)..];
    entry_digest(
        record.role,
        record.state,
        Some(record.epoch),
        record.acked_epoch,
        record.fail_count,
        hooks,
    )
}

/// The digest of an entry as the API server has it.
fn applied_digest(e: &kubeha_crds::service::ServiceNodeStatus) -> String {
    entry_digest(
        e.role,
        e.state,
        e.epoch,
        e.acked_epoch,
        e.fail_count,
        &e.hooks,
    )
}

/// What a status entry says that the operator acts on (the last hook
/// result stands for the hooks: a refusal marker or not).
fn entry_digest(
    role: Role,
    state: NodeServiceState,
    epoch: Option<i64>,
    acked: Option<i64>,
    fail_count: i32,
    hooks: &[kubeha_crds::service::HookResult],
) -> String {
    let last = hooks
        .last()
        .map(|h| (h.script.as_str(), h.action.as_str(), h.outcome));
    format!(
        "{role:?} {state:?} {epoch:?} {acked:?} {fail_count} {} {last:?}",
        hooks.len()
    )
}

/// Writes the scripts of a ConfigMap hook source into `dir` (mode 0755,
/// owned by the agent's user, root), removing scripts the ConfigMap no longer
/// has. The first namespace holding the ConfigMap wins.
async fn materialize_config_map(
    client: &Client,
    namespaces: &[String],
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::os::unix::fs::PermissionsExt;
    let mut found = None;
    for ns in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        if let Ok(Some(cm)) = tokio::time::timeout(Duration::from_secs(3), api.get_opt(name))
            .await
            .unwrap_or(Ok(None))
        {
            found = Some(cm);
            break;
        }
    }
    let Some(cm) = found else {
        anyhow::bail!("hook ConfigMap {name} not found in namespaces {namespaces:?}");
    };
    std::fs::create_dir_all(dir)?;
    let data = cm.data.unwrap_or_default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !data.contains_key(entry.file_name().to_string_lossy().as_ref()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    for (key, script) in data {
        if key.contains('/') || key.starts_with('.') {
            tracing::warn!(
                configmap = name,
                key,
                "skipping a ConfigMap key that is not a plain file name"
            );
            continue;
        }
        let tmp = dir.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, script)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, dir.join(&key))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn spawn_steps(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    steps: Vec<assignments::Step>,
    service: ServiceView,
    view: ClusterView,
    wanted: Assignment,
    target: Target,
) {
    tokio::spawn(async move {
        tracing::info!(service = %service.key, ?steps, epoch = wanted.epoch, "transition");
        if let Some(cm) = service
            .spec
            .hooks
            .as_ref()
            .and_then(|h| h.source.config_map.clone())
        {
            let mut namespaces = vec![shared.config.namespace.clone()];
            if view.config_maps_in_service_namespace
                && let Some((ns, _)) = service.key.split_once('/')
            {
                namespaces.push(ns.to_owned());
            }
            let dir = shared.config.state_dir.join("configmap-hooks").join(&cm);
            if let Err(e) = materialize_config_map(&shared.client, &namespaces, &cm, &dir).await {
                tracing::warn!(service = %service.key, error = %e, "hook ConfigMap not written out");
            }
        }
        let primary = service
            .spec
            .preferred_nodes
            .first()
            .or(view.members.first())
            == Some(&shared.config.node);
        let last = steps.last().copied();
        for step in steps {
            if let Some(intent) = intent(step, &record, &service.spec, wanted)
                && let Err(e) = persist(&shared, &service.key, &intent)
                && step == assignments::Step::EnterMaster
            {
                // Without the intent on disk, an agent that dies while
                // entering would not know after a restart that it may hold
                // a VIP or a started service: nothing is entered. A failure
                // that started nothing: the operator moves the service.
                record.epoch = wanted.epoch;
                record.state = NodeServiceState::Failed;
                record.failed_epoch = Some(wanted.epoch);
                record.count_failure();
                record.last_hooks = vec![crate::transitions::refused(&format!(
                    "the status file cannot be written ({e}): not entering"
                ))];
                report(&shared, &target, &record).await;
                let note = format!(
                    "not entering at epoch {}: status file not writable: {e}",
                    wanted.epoch
                );
                event(&shared, &target, true, "StatusFileFailed", note).await;
                break;
            }
            let ok = shared
                .node
                .step(step, &mut record, &service, &view, wanted)
                .await;
            let _ = persist(&shared, &service.key, &record);
            // Reported before the next step only when the operator waits
            // for it (a leave of master acknowledges the epoch) or nothing
            // follows: a report to a slow API server takes up to its
            // timeout, and the next step (an enter) must not wait for it.
            if step == assignments::Step::LeaveMaster || !ok || Some(step) == last {
                report(&shared, &target, &record).await;
            }
            let (warning, reason, note) = step_event(step, ok, &record, primary);
            tokio::spawn({
                let (shared, target) = (shared.clone(), target.clone());
                async move { event(&shared, &target, warning, reason, note).await }
            });
            if !ok {
                tracing::warn!(service = %service.key, ?step, "step failed");
                if step == assignments::Step::LeaveMaster && record.unclean_epoch.is_some() {
                    escalate(&shared, &target, &view).await;
                }
                break;
            }
        }
        drop(record);
        shared.notify.notify_one();
    });
}

/// A leave of master that failed: the service may still run here, and the
/// next node waits for this one's acknowledgement or fence. As Pacemaker
/// fences a node whose stop failed, the agent fences itself for the
/// cluster: it withholds its heartbeat for E + R, so the watchdog fences at
/// RD (VIPs dropped, leave scripts, hooks killed, the reset hook) and the
/// operator sees the node Lost, which lets the next node in. No admin
/// action is needed; the failed record stays unclean, so this node enters
/// nothing until a leave succeeds here.
async fn escalate(shared: &Shared, target: &Target, view: &ClusterView) {
    let Some(beat) = view.beat else {
        return;
    };
    let timing = beat.guard();
    let hold = timing.expiry() + timing.renew_interval + Duration::from_millis(500);
    shared.beats.suspend(&view.name, Instant::now() + hold);
    tracing::error!(cluster = %view.name, hold_ms = hold.as_millis() as u64, "a leave failed: fencing this node for the cluster (heartbeat withheld)");
    let note = format!(
        "leave failed: this node fences itself for cluster {} (heartbeat withheld for {} ms)",
        view.name,
        hold.as_millis()
    );
    event(shared, target, true, "FenceEscalated", note).await;
}

/// What the status file says while `step` runs, so an agent that dies in
/// the middle leaves first on restart: master at the epoch entered or left,
/// `Starting` or `Stopping`, unclean, with the spec whose VIPs it adds.
/// `None` for standby steps.
fn intent(
    step: assignments::Step,
    record: &ServiceRecord,
    spec: &HAServiceSpec,
    wanted: Assignment,
) -> Option<ServiceRecord> {
    let (epoch, state) = match step {
        assignments::Step::EnterMaster => (wanted.epoch, NodeServiceState::Starting),
        assignments::Step::LeaveMaster => (record.epoch, NodeServiceState::Stopping),
        _ => return None,
    };
    let mut intent = record.clone();
    if step == assignments::Step::EnterMaster {
        // The leave on restart removes what this spec names.
        intent.spec = spec.clone();
    }
    intent.role = Role::Master;
    intent.epoch = epoch;
    intent.state = state;
    intent.unclean_epoch = Some(epoch);
    Some(intent)
}

/// Writes `record` for service `key` into the status file at once (fsync'd).
/// Returns the write error, if any.
fn persist(shared: &Shared, key: &str, record: &ServiceRecord) -> Result<(), std::io::Error> {
    with_state_file(shared, || persist_locked(shared, key, record))
}

/// Runs `f` holding the status-file lock, with this worker thread handed
/// back to the runtime first: a hung disk (or a writer waiting for the lock
/// behind it) then stalls only its caller, never the other tasks: renewers,
/// reports, other services' transitions.
fn with_state_file<R>(shared: &Shared, f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(|| {
        let _file = shared.state_file.lock().unwrap_or_else(|e| e.into_inner());
        f()
    })
}

fn persist_locked(
    shared: &Shared,
    key: &str,
    record: &ServiceRecord,
) -> Result<(), std::io::Error> {
    let mut status = statefile::read(&shared.config.state_dir).unwrap_or_default();
    if status.node.is_empty() {
        status.node = shared.config.node.clone();
    }
    status.services.insert(key.to_owned(), record.clone());
    statefile::write(&shared.config.state_dir, &status).inspect_err(|e| {
        tracing::error!(service = key, error = %e, "writing the status file failed");
    })
}

/// Changes the running master's VIPs to the spec's
/// ([`Node::revip`]), then persists and reports the record.
fn spawn_revip(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    service: ServiceView,
    view: ClusterView,
    target: Target,
) {
    tokio::spawn(async move {
        let ok = shared.node.revip(&mut record, &service, &view).await;
        let _ = persist(&shared, &service.key, &record);
        report(&shared, &target, &record).await;
        let note = format!("VIPs at epoch {} now {:?}", record.epoch, record.vips);
        let (warning, reason) = if ok {
            (false, "VipsChanged")
        } else {
            (true, "VipFailed")
        };
        event(&shared, &target, warning, reason, note).await;
        drop(record);
        shared.notify.notify_one();
    });
}

fn spawn_adopt(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    view: ClusterView,
    target: Target,
) {
    tokio::spawn(async move {
        let ok = shared.node.adopt(&mut record, &view).await;
        tracing::info!(
            epoch = record.epoch,
            ok,
            "re-adopted a service held before the restart"
        );
        report(&shared, &target, &record).await;
        drop(record);
        shared.notify.notify_one();
    });
}

#[allow(clippy::too_many_arguments)]
fn spawn_monitor(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    service: ServiceView,
    view: ClusterView,
    threshold: i32,
    failures: Arc<AtomicI32>,
    target: Target,
) {
    tokio::spawn(async move {
        let failures_counter = failures.clone();
        let Some(ok) = shared.node.monitor(&mut record, &service, &view).await else {
            return;
        };
        let failures = if ok {
            0
        } else {
            failures.load(Ordering::SeqCst) + 1
        };
        let counter = failures_counter.clone();
        counter.store(failures, Ordering::SeqCst);
        if failures >= threshold.max(1) {
            counter.store(0, Ordering::SeqCst);
            tracing::warn!(service = %service.key, failures, "monitor failed past its threshold: leaving");
            let epoch = record.epoch;
            shared
                .node
                .step(
                    assignments::Step::LeaveMaster,
                    &mut record,
                    &service,
                    &view,
                    Assignment::NONE,
                )
                .await;
            record.state = NodeServiceState::Failed;
            record.failed_epoch = Some(epoch);
            record.count_failure();
            report(&shared, &target, &record).await;
            if record.unclean_epoch.is_some() {
                escalate(&shared, &target, &view).await;
            }
        } else if failures > 0 {
            tracing::warn!(service = %service.key, failures, threshold, "monitor failed");
        }
        drop(record);
        shared.notify.notify_one();
    });
}

fn spawn_periodic(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    service: ServiceView,
    view: ClusterView,
) {
    tokio::spawn(async move {
        shared.node.periodic(&mut record, &service, &view).await;
    });
}

/// Publishes an Event on the HAService (best effort).
async fn event(shared: &Shared, target: &Target, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(
            format!("{}: {note}", shared.config.node)
                .chars()
                .take(1000)
                .collect(),
        ),
        action: reason.to_owned(),
        secondary: None,
    };
    // Best effort, and never for long: an Event is no reason to hold up
    // anything (a publish to a stalled API server has no timeout of its own).
    match tokio::time::timeout(
        Duration::from_secs(2),
        shared.recorder.publish(&ev, &target.reference),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, reason, "publishing an Event failed"),
        Err(_) => tracing::warn!(reason, "publishing an Event timed out"),
    }
}

/// The Event a finished step makes: reason and whether it is a warning.
fn step_event(
    step: assignments::Step,
    ok: bool,
    record: &ServiceRecord,
    primary: bool,
) -> (bool, &'static str, String) {
    use assignments::Step::*;
    let tail = || {
        record
            .last_hooks
            .iter()
            .filter(|h| h.outcome != kubeha_crds::service::HookOutcome::Success)
            .map(|h| {
                format!(
                    "{} {} {:?}: {}",
                    h.script,
                    h.action,
                    h.outcome,
                    h.output_tail.join(" | ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !ok && record.last_hooks.iter().any(|h| h.script == "-") {
        // Not a hook: the VIPs could not be placed (missing interface, ...).
        return (
            true,
            "VipFailed",
            format!("{step:?} failed at epoch {}: {}", record.epoch, tail()),
        );
    }
    if !ok {
        return (
            true,
            "HookFailed",
            format!("{step:?} failed at epoch {}: {}", record.epoch, tail()),
        );
    }
    let reason = match (step, primary) {
        (EnterMaster, true) => "TakeBack",
        (EnterMaster, false) => "TakeOver",
        (LeaveMaster, true) => "GiveAway",
        (LeaveMaster, false) => "GiveBack",
        (EnterVicemaster, _) => "EnteredStandby",
        (LeaveVicemaster, _) => "LeftStandby",
    };
    (
        false,
        reason,
        format!(
            "{step:?} done at epoch {} (VIPs {:?})",
            record.epoch, record.vips
        ),
    )
}

/// This node's entry of `status.nodes` for a record, as the agent applies
/// it. `epoch` is the record's: the epoch of the role taken or, for a node
/// idle here, the latest epoch observed ([`ServiceRecord::observe_epoch`]).
pub fn status_entry(node: &str, record: &ServiceRecord) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "node": node,
        "role": record.role,
        "state": record.state,
        "epoch": record.epoch,
        "failCount": record.fail_count,
        "hooks": record.last_hooks.iter().rev().take(8).rev().collect::<Vec<_>>(),
    });
    // Only fields with a value: in an apply, a null would ask to remove one.
    if let Some(acked) = record.acked_epoch {
        entry["ackedEpoch"] = acked.into();
    }
    if let Some(at) = &record.last_failure {
        entry["lastFailureTime"] = at.clone().into();
    }
    entry
}

/// Applies this node's entry of `status.nodes` (server-side apply with the
/// node's own field manager). Best effort: the API server may be away.
/// Applies this node's status entry: `Some(true)` when the API server took
/// it, `Some(false)` when it refused it, `None` when the call timed out (it
/// may still be applied later).
async fn report(shared: &Shared, target: &Target, record: &ServiceRecord) -> Option<bool> {
    let (api, name) = (&target.api, target.name.as_str());
    let entry = status_entry(&shared.config.node, record);
    let patch = serde_json::json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "status": { "nodes": [entry] },
    });
    let params = PatchParams::apply(&leases::agent_field_manager(&shared.config.node)).force();
    match tokio::time::timeout(
        Duration::from_secs(2),
        api.patch_status(name, &params, &Patch::Apply(&patch)),
    )
    .await
    {
        Ok(Ok(_)) => Some(true),
        Ok(Err(e)) => {
            tracing::warn!(service = name, error = %e, "status report failed");
            Some(false)
        }
        Err(_) => {
            tracing::warn!(service = name, "status report timed out");
            let key = format!(
                "{}/{name}",
                target.reference.namespace.as_deref().unwrap_or_default()
            );
            let now = Instant::now();
            shared
                .resend
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    key,
                    [3, 10, 30].map(|s| now + Duration::from_secs(s)).into(),
                );
            None
        }
    }
}

async fn write_status(shared: &Shared, slots: &BTreeMap<String, Slot>) {
    let now = Instant::now();
    let mut status = NodeStatus {
        node: shared.config.node.clone(),
        updated_at: jiff::Timestamp::now().to_string(),
        ..Default::default()
    };
    for (cluster, beat) in shared.beats.all() {
        status.clusters.insert(
            cluster.clone(),
            ClusterRecord {
                last_renew_age_ms: beat.age(now).map(|a| a.as_millis() as u64),
                renew_failures: beat.failures,
                fenced: fenced_flag(shared, &cluster).load(Ordering::SeqCst),
            },
        );
    }
    // A record in a transition keeps what the file said of it (its intent,
    // written by the transition under the same lock).
    with_state_file(shared, || {
        let mut previous: Option<NodeStatus> = None;
        for (key, slot) in slots {
            if let Ok(r) = slot.record.try_lock() {
                status.services.insert(key.clone(), r.clone());
            } else {
                let previous = previous.get_or_insert_with(|| {
                    statefile::read(&shared.config.state_dir).unwrap_or_default()
                });
                if let Some(old) = previous.services.get(key) {
                    status.services.insert(key.clone(), old.clone());
                }
            }
        }
        if let Err(e) = statefile::write(&shared.config.state_dir, &status) {
            tracing::warn!(error = %e, "writing the status file failed");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vip: &str) -> HAServiceSpec {
        serde_json::from_value(serde_json::json!({
            "clusterRef": "c",
            "vips": [{"address": vip}],
        }))
        .unwrap()
    }

    /// The API server's copy of an entry the agent applied reads back with
    /// the record's digest, so a report is sent again only when the copy
    /// really differs (a late, older report applied over it).
    #[test]
    fn an_applied_entry_reads_back_with_the_records_digest() {
        let mut record = ServiceRecord::fresh("c", &spec("198.18.0.100/24"), "x".into(), None);
        record.role = Role::Master;
        record.state = NodeServiceState::Running;
        record.epoch = 7;
        record.acked_epoch = Some(5);
        record.fail_count = 1;
        record.last_hooks = (0..10)
            .map(|i| crate::transitions::refused(&format!("r{i}")))
            .collect();
        let applied: kubeha_crds::service::ServiceNodeStatus =
            serde_json::from_value(status_entry("n1", &record)).unwrap();
        let read_back = applied_digest;
        assert_eq!(read_back(&applied), report_digest(&record));
        // An older report applied late reads differently.
        let mut older = record.clone();
        older.role = Role::None;
        older.state = NodeServiceState::Stopped;
        let late: kubeha_crds::service::ServiceNodeStatus =
            serde_json::from_value(status_entry("n1", &older)).unwrap();
        assert_ne!(read_back(&late), report_digest(&record));
        // So does a refusal marker replaced by other results.
        let mut refused = record.clone();
        refused.last_hooks.truncate(1);
        let mut plain = refused.clone();
        plain.last_hooks[0].script = "L01stop".into();
        assert_ne!(report_digest(&refused), report_digest(&plain));
    }

    #[test]
    fn the_intent_of_a_master_step_is_unclean_master_at_its_epoch() {
        let mut record = ServiceRecord::fresh("c", &spec("198.18.0.100/24"), "x".into(), None);
        record.epoch = 4;
        let wanted = Assignment {
            role: Role::Master,
            epoch: 5,
            may_enter: true,
        };
        let new_spec = spec("198.18.0.101/24");
        let enter = intent(assignments::Step::EnterMaster, &record, &new_spec, wanted).unwrap();
        assert_eq!(
            (enter.role, enter.epoch, enter.state, enter.unclean_epoch),
            (Role::Master, 5, NodeServiceState::Starting, Some(5))
        );
        assert_eq!(
            enter.spec, new_spec,
            "a leave on restart removes the VIPs being added"
        );
        let leave = intent(assignments::Step::LeaveMaster, &record, &new_spec, wanted).unwrap();
        assert_eq!(
            (leave.role, leave.epoch, leave.state, leave.unclean_epoch),
            (Role::Master, 4, NodeServiceState::Stopping, Some(4))
        );
        assert_eq!(leave.spec, record.spec);
        for step in [
            assignments::Step::EnterVicemaster,
            assignments::Step::LeaveVicemaster,
        ] {
            assert!(intent(step, &record, &new_spec, wanted).is_none());
        }
    }
}
