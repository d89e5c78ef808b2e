//! The agent daemon: watches HAClusters, HAServices, service Leases and its
//! own Node object (for `spec.members.selector`),
//! renews heartbeats, runs transitions one at a time per service, extends VIP
//! lifetimes on every renew, fences itself when a heartbeat passes RD, and
//! keeps the node-local status file.

mod fence;
mod membership;
mod reconcile;
mod report;
mod reset;
mod tasks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as KubeNode, ObjectReference};
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use kubeha_crds::annotations::node_scope_selector;
use kubeha_crds::service::{NodeServiceState, Role};
use kubeha_crds::{HACluster, HAService, HAServiceSpec, leases};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Notify, mpsc};

use crate::heartbeat::{Heartbeats, Timing};
use crate::metrics::Metrics;
use crate::statefile::{self, NodeStatus, ServiceRecord};
use crate::transitions::LocalNode;
use crate::vip::RtNetlink;

use fence::{fence_if_cut_off, on_renewed};
use membership::{OwnNode, sync_heartbeats};
use reconcile::reconcile;
pub use report::status_entry;
use report::write_status;

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
    /// Where hook processes run: their cgroup and namespaces.
    pub hooks: crate::hooks::HookPlacement,
    /// The kernel's boot id ([`statefile::boot_id`]); `None` when unknown,
    /// and then no record of an earlier agent is re-adopted.
    pub boot_id: Option<String>,
    /// When this agent started (RFC 3339).
    pub started: String,
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
    /// Why this node last refused the service's assignment
    /// ([`assignments::vet`]), once told in an Event.
    refused: Option<String>,
    /// The cluster of a fence that found this record busy (a transition
    /// held it) and could not mark it: its VIPs were dropped under it, so
    /// once the record is free it is marked as a fence does.
    fenced_while_busy: Arc<std::sync::Mutex<Option<String>>>,
    /// The spec's checksum ([`spec_checksum`]) and the object (UID and
    /// generation) it was computed for: a pass hashes a spec only when it
    /// changed, or when the service was deleted and created again.
    checksum: Option<(String, i64, String)>,
}

impl Slot {
    /// [`spec_checksum`] of `svc`'s spec, computed again only when its
    /// generation changed.
    fn checksum(&mut self, svc: &HAService) -> String {
        let (Some(uid), Some(generation)) = (&svc.metadata.uid, svc.metadata.generation) else {
            return spec_checksum(&svc.spec);
        };
        match &self.checksum {
            Some((u, g, sum)) if u == uid && *g == generation => sum.clone(),
            _ => {
                let sum = spec_checksum(&svc.spec);
                self.checksum = Some((uid.clone(), generation, sum.clone()));
                sum
            }
        }
    }
}

/// Report bookkeeping of one service: the digest the API server has, and
/// the one a report in flight carries.
#[derive(Default)]
struct Reported {
    done: Option<String>,
    pending: Option<String>,
    /// When the last report was sent.
    sent: Option<Instant>,
    /// Reports in a row the API server did not take (refused, overloaded,
    /// timed out).
    failures: u32,
    /// No report before this instant: the backoff after failures, so an
    /// overloaded API server is not sent the same entry again at once by
    /// every node (a storm it would not come out of).
    retry_at: Option<Instant>,
}

/// The first wait after a report that failed; it doubles with each failure
/// in a row, up to [`REPORT_BACKOFF_MAX`].
const REPORT_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between reports that fail.
const REPORT_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Status reports in flight at once, per agent.
const REPORTS_IN_FLIGHT: usize = 8;

impl Reported {
    /// Records how the report of `digest` ended at `now`: taken, or a
    /// failure that delays the next report by the backoff (with up to a
    /// quarter of it added at random, so nodes that failed together do not
    /// retry together).
    fn settle(&mut self, digest: &str, taken: bool, now: Instant) {
        if self.pending.as_deref() == Some(digest) {
            self.pending = None;
        }
        if taken {
            // The API server's copy may lag behind for a while (the watch):
            // not read as overwritten before REPORT_RECHECK from now.
            self.sent = Some(self.sent.map_or(now, |t| t.max(now)));
            self.done = Some(digest.to_owned());
            self.failures = 0;
            self.retry_at = None;
            return;
        }
        self.failures = self.failures.saturating_add(1);
        let wait = REPORT_BACKOFF
            .saturating_mul(1 << self.failures.min(16).saturating_sub(1))
            .min(REPORT_BACKOFF_MAX);
        let jitter = wait.mul_f64(jitter_fraction() / 4.0);
        self.retry_at = Some(now + wait + jitter);
    }
}

/// A number in [0, 1) that differs between calls and processes.
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
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
    /// The service's report bookkeeping: every report settles in it.
    reported: Arc<std::sync::Mutex<Reported>>,
}

struct Shared {
    config: Config,
    client: Client,
    node: LocalNode<RtNetlink>,
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
    /// What the main loop last wrote to the status file (without its
    /// `updatedAt`), so it writes only a change; `None` after another
    /// writer ([`tasks::persist`]) changed the file.
    written: std::sync::Mutex<Option<NodeStatus>>,
    /// Permits for routine status reports ([`REPORTS_IN_FLIGHT`]).
    report_permits: Arc<tokio::sync::Semaphore>,
    /// The service Lease names of every service this node has a record
    /// for, as of the last pass: an event of one of them wakes the main
    /// loop ([`lease_wakes`]).
    recorded_leases: std::sync::Mutex<HashSet<String>>,
    /// Bumped on every claim Lease event: the main loop indexes the VIP
    /// claims again only when it moved (not on every pass over every
    /// service: at 1,000 services that was the agents' CPU in a failover).
    claims_version: AtomicU64,
}

impl Shared {
    /// Every instant a status entry is due to be sent again.
    fn resend_times(&self) -> Vec<Instant> {
        self.resend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .copied()
            .collect()
    }
}

/// Runs the daemon until a signal ends it.
pub async fn run(config: Config) -> crate::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Metrics::default();
    let beats = Heartbeats::default();
    let netlink = RtNetlink::new()?;
    netlink.install_fence().await?;
    tracing::info!("packet fence installed (nftables tables kubeha)");
    let runner = config.hooks.runner(config.log_dir.clone())?;
    let node = LocalNode {
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
        written: Default::default(),
        report_permits: Arc::new(tokio::sync::Semaphore::new(REPORTS_IN_FLIGHT)),
        recorded_leases: Default::default(),
        claims_version: AtomicU64::new(0),
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
            let probes = crate::metrics::Probes {
                metrics: m,
                beats: b,
            };
            if let Err(e) = kubeha_runtime::http::serve(addr, probes).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        }
    });

    // Of a cluster's status the agent reads the members, never their
    // service roles (a list as long as the cluster's services).
    let clusters = watch::<HACluster>(
        &client,
        None,
        watcher::Config::default(),
        &shared,
        |c: &mut HACluster| {
            if let Some(status) = c.status.as_mut() {
                status.members.iter_mut().for_each(|m| m.roles.clear());
            }
        },
        |_| true,
    );
    // Only the services that carry this node's node-scope label (the
    // operator labels the nodes a service needs; one that leaves the
    // selection is one this node has no role in), and of a service's
    // status, the agent reads its own node's entry only.
    // Another node's or the operator's status write changes nothing this
    // agent reads: it does not wake the main loop ([`ServiceFaces`]).
    let scope = watcher::Config::default().labels(&node_scope_selector(&config.node));
    let faces = std::sync::Mutex::new(ServiceFaces::default());
    let services = watch::<HAService>(
        &client,
        None,
        scope,
        &shared,
        {
            let node = config.node.clone();
            move |svc: &mut HAService| {
                if let Some(status) = svc.status.as_mut() {
                    status.nodes.retain(|e| e.node == node);
                }
            }
        },
        move |event: &watcher::Event<HAService>| {
            faces.lock().unwrap_or_else(|e| e.into_inner()).wakes(event)
        },
    );
    // In the operator's namespace (where only the operator may write
    // them), never in a tenant's; only those labelled for this node (the
    // operator labels every node a Lease names: a failover's Lease writes
    // reach the nodes involved, not every node), and of those, only the
    // ones this node acts on wake the main loop. A Lease that stops naming
    // this node stays in the selection until this node reports its epoch
    // (role none), then leaves it: a delete event, read as "no role".
    let service_leases = watch::<Lease>(
        &client,
        Some(&config.namespace),
        watcher::Config::default().labels(&leases::service_lease_selector_for(&config.node)),
        &shared,
        |_| {},
        {
            let (shared, node) = (shared.clone(), config.node.clone());
            move |event: &watcher::Event<Lease>| {
                let recorded = shared
                    .recorded_leases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                lease_wakes(&recorded, &node, event)
            }
        },
    );
    // Every service's VIP claim (written when a service is created or its
    // VIPs change, so almost no events): the agent's re-check of the
    // operator, `assignments::claims_of`. Read at the next pass, never a
    // reason for one.
    let claim_leases = watch::<Lease>(
        &client,
        Some(&config.namespace),
        watcher::Config::default().labels(&leases::claim_lease_selector()),
        &shared,
        |_| {},
        {
            let shared = shared.clone();
            move |_: &watcher::Event<Lease>| {
                shared.claims_version.fetch_add(1, Ordering::SeqCst);
                false
            }
        },
    );
    // The claim Leases' index, built again only after one changed.
    let mut lease_claims: (u64, kubeha_crds::validate::ClaimIndex) = (u64::MAX, Default::default());
    // This node's own Node object: its labels decide membership in clusters
    // that pick members with `spec.members.selector`.
    let own_node = watch::<KubeNode>(
        &client,
        None,
        watcher::Config::default().fields(&format!("metadata.name={}", config.node)),
        &shared,
        |_| {},
        |_| true,
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
        let claims = claim_leases.clone();
        let (synced, shared) = (synced.clone(), shared.clone());
        async move {
            if tokio::try_join!(
                c.wait_until_ready(),
                s.wait_until_ready(),
                l.wait_until_ready(),
                claims.wait_until_ready()
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
        // A file from another boot (a status folder on disk, or a boot id
        // the agent cannot read): nothing it names runs here any more.
        let rebooted = !config
            .boot_id
            .as_deref()
            .is_some_and(|id| saved.same_boot(id));
        if rebooted {
            tracing::warn!(
                written_in = ?saved.boot_id,
                now = ?config.boot_id,
                "the status file is from another boot: every service counts as stopped here"
            );
        }
        for (key, mut record) in saved.services {
            // No await below: the span is left before the next service.
            let _span =
                tracing::info_span!("service", service = %key, epoch = record.epoch).entered();
            if rebooted && record.forget_after_reboot() {
                tracing::info!(
                    "held before the reboot: entered again with its hooks if still asked"
                );
            }
            if record.assume_unclean_if_unknown() {
                tracing::info!(
                    "failed without acknowledgement before the restart: counted as a leave that failed"
                );
            }
            // Written just before entering or leaving master (the intent),
            // and the agent died before the outcome was written: the service
            // may be half started or half stopped. Leave first.
            let recover = matches!(
                record.state,
                NodeServiceState::Starting | NodeServiceState::Stopping
            );
            if recover {
                tracing::warn!(state = ?record.state, "died in the middle of a transition: leaving master first");
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
    let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // A pass runs on an event (a watch, a renew, a task that ended) or at
    // the next instant something falls due without one.
    let mut wake = Instant::now();
    loop {
        tokio::select! {
            _ = shared.notify.notified() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
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
        let resets = reset::take_requests(&shared, &clusters_now, &me);
        fence_if_cut_off(&shared, &clusters_now, &me, &slots, &resets).await;
        if synced.load(Ordering::SeqCst) {
            let version = shared.claims_version.load(Ordering::SeqCst);
            if lease_claims.0 != version {
                let state = claim_leases.state();
                lease_claims = (
                    version,
                    crate::assignments::lease_claims(state.iter().map(|l| l.as_ref())),
                );
            }
            reconcile(
                &shared,
                &clusters_now,
                &me,
                &services,
                &service_leases,
                reconcile::Claims {
                    leases: &claim_leases,
                    index: &lease_claims.1,
                },
                &mut slots,
            )
            .await;
            write_status(&shared, &slots).await;
        }
        let now = Instant::now();
        shared.beats.mark_progress(now);
        wake = next_pass(now, &shared.beats.all(), &slots, &shared.resend_times());
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

/// The longest a pass waits for an event: the loop's progress vouches for
/// the renewals ([`Heartbeats::withheld`]), so it never sleeps for half an
/// RD, and reports that wait for a recheck are looked at again.
const IDLE_PASS: Duration = Duration::from_secs(1);

/// When the main loop runs next if no event comes first: the earliest of a
/// heartbeat reaching RD (the fence) or its lease end, a service's monitor,
/// periodic hook or GARP refresh, and a status report to send again (after
/// a timeout, or at the end of its backoff); at
/// most [`IDLE_PASS`] (or half the shortest RD; while a cluster is cut off,
/// a quarter of the time a frozen VIP is extended for) after `now`. Instants
/// already past are left out: what fell due ran in the pass just done, or
/// waits for a task whose end wakes the loop.
fn next_pass(
    now: Instant,
    beats: &HashMap<String, crate::heartbeat::Beat>,
    slots: &BTreeMap<String, Slot>,
    resend: &[Instant],
) -> Instant {
    let idle = beats
        .values()
        .map(|b| {
            let t = b.guard();
            // Cut off (past RD): under `noQuorumPolicy: Freeze` each pass
            // extends the VIPs for at most their lifetime from then, so the
            // next pass must come well within it.
            if b.last_success.is_some() && b.past_deadline(now) {
                let life = t.vip_lifetime_seconds.map_or(t.expiry(), |s| {
                    t.expiry().min(Duration::from_secs(s.into()))
                });
                (life / 4).min(t.renew_deadline / 2)
            } else {
                t.renew_deadline / 2
            }
        })
        .fold(IDLE_PASS, Duration::min);
    let beat_deadlines = beats.values().filter_map(|b| {
        let sent = b.last_success?;
        let t = b.guard();
        Some([sent + t.renew_deadline, sent + t.expiry()])
    });
    let slot_deadlines = slots.values().map(|s| {
        let retry = s
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retry_at;
        [
            Some(s.next_monitor),
            Some(s.next_periodic),
            Some(s.next_refresh),
            retry,
        ]
    });
    beat_deadlines
        .flatten()
        .chain(slot_deadlines.flatten().flatten())
        .chain(resend.iter().copied())
        .filter(|t| *t > now)
        .fold(now + idle, Instant::min)
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
        refused: None,
        fenced_while_busy: Arc::default(),
        checksum: None,
    }
}

/// A reflector whose events wake the main loop when `wakes` says so (every
/// error does); `trim` drops what the agent never reads before an object
/// is stored. A malformed object is skipped
/// ([`kubeha_runtime::watch::reflect_trimmed`]); errors are logged and
/// retried with backoff: the watch goes on.
fn watch<K>(
    client: &Client,
    namespace: Option<&str>,
    config: watcher::Config,
    shared: &Arc<Shared>,
    trim: impl Fn(&mut K) + Send + Sync + 'static,
    wakes: impl Fn(&watcher::Event<K>) -> bool + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, stream) = kubeha_runtime::watch::reflect_trimmed(client, namespace, config, trim);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(e) if !wakes(&e) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, kind = %std::any::type_name::<K>(), "watch error (retrying)");
                }
            }
            shared.notify.notify_one();
        }
    });
    reader
}

/// Whether a service Lease event wakes the main loop: one that names this
/// node ([`leases::named_nodes`]) or is the Lease of a service this node
/// has a record for (a Lease that stops naming it, or is deleted), and the
/// end of a (re)list. With many services, the others' Lease writes would
/// otherwise run a pass over every service of this node each (issue 11:
/// 20 agents at 1,000 services took the API server's CPU); the store keeps
/// them all the same, and the next pass reads them.
fn lease_wakes(recorded: &HashSet<String>, node: &str, event: &watcher::Event<Lease>) -> bool {
    match event {
        watcher::Event::Apply(lease) | watcher::Event::Delete(lease) => {
            leases::named_nodes(lease).iter().any(|n| n == node)
                || recorded.contains(&lease.name_any())
        }
        watcher::Event::Init | watcher::Event::InitApply(_) => false,
        watcher::Event::InitDone => true,
    }
}

/// What the agent reads of an HAService (its status trimmed to this
/// node's entry): an event that changes none of it wakes nothing. At 1,000
/// services, every status write of another node or of the operator on any
/// of this node's services ran a pass over all of them.
#[derive(Clone, Debug, PartialEq)]
struct ServiceFace {
    uid: Option<String>,
    deleting: bool,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    spec: HAServiceSpec,
    own_entry: Option<kubeha_crds::service::ServiceNodeStatus>,
}

impl ServiceFace {
    fn of(svc: &HAService) -> Self {
        ServiceFace {
            uid: svc.metadata.uid.clone(),
            deleting: svc.metadata.deletion_timestamp.is_some(),
            labels: svc.labels().clone(),
            annotations: svc.annotations().clone(),
            spec: svc.spec.clone(),
            own_entry: svc.status.as_ref().and_then(|s| s.nodes.first().cloned()),
        }
    }
}

/// The [`ServiceFace`] of every HAService in view, by `namespace/name`.
#[derive(Default)]
struct ServiceFaces {
    faces: HashMap<String, ServiceFace>,
    /// Faces of a relist under way (they replace all others at its end).
    relisted: HashMap<String, ServiceFace>,
}

impl ServiceFaces {
    /// Whether `event` wakes the main loop: a service's face changed or it
    /// left the view, or a (re)list ended; records the face.
    fn wakes(&mut self, event: &watcher::Event<HAService>) -> bool {
        let key =
            |svc: &HAService| format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        match event {
            watcher::Event::Apply(svc) => {
                let face = ServiceFace::of(svc);
                self.faces.insert(key(svc), face.clone()) != Some(face)
            }
            watcher::Event::Delete(svc) => {
                self.faces.remove(&key(svc));
                true
            }
            watcher::Event::Init => {
                self.relisted.clear();
                false
            }
            watcher::Event::InitApply(svc) => {
                self.relisted.insert(key(svc), ServiceFace::of(svc));
                false
            }
            watcher::Event::InitDone => {
                self.faces = std::mem::take(&mut self.relisted);
                true
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::Beat;

    #[test]
    fn only_a_change_of_what_the_agent_reads_of_a_service_wakes_it() {
        use kubeha_crds::service::{HAServiceStatus, NodeServiceState, Role};
        use kubeha_crds::testing::{service_spec, status_entry};
        let mut svc = HAService::new("web", service_spec("c", &["198.18.0.10/24"]));
        svc.metadata.namespace = Some("default".into());
        svc.metadata.uid = Some("u1".into());
        let entry = |state| status_entry("n1", Role::Master, state, 1, None);
        svc.status = Some(HAServiceStatus {
            nodes: vec![entry(NodeServiceState::Running)],
            ..Default::default()
        });
        let mut faces = ServiceFaces::default();
        let apply = |faces: &mut ServiceFaces, svc: &HAService| {
            faces.wakes(&watcher::Event::Apply(svc.clone()))
        };
        assert!(apply(&mut faces, &svc), "first seen");
        // Another node's or the operator's write (trimmed away but for the
        // resourceVersion and the operator's fields): nothing to do.
        svc.metadata.resource_version = Some("2".into());
        svc.status.as_mut().unwrap().phase = Some(kubeha_crds::service::Phase::Active);
        assert!(!apply(&mut faces, &svc));
        // This node's entry, an annotation, the spec, a label: a pass.
        svc.status.as_mut().unwrap().nodes = vec![entry(NodeServiceState::Stopped)];
        assert!(apply(&mut faces, &svc));
        svc.annotations_mut()
            .insert("kubeha.io/clear".into(), "1".into());
        assert!(apply(&mut faces, &svc));
        svc.spec = service_spec("c", &["198.18.0.11/24"]);
        assert!(apply(&mut faces, &svc));
        svc.labels_mut()
            .insert("node.kubeha.io/n1".into(), "true".into());
        assert!(apply(&mut faces, &svc));
        assert!(!apply(&mut faces, &svc));
        // Leaving the view, and the end of a relist, always do.
        assert!(faces.wakes(&watcher::Event::Delete(svc.clone())));
        assert!(!faces.wakes(&watcher::Event::Init));
        assert!(!faces.wakes(&watcher::Event::InitApply(svc.clone())));
        assert!(faces.wakes(&watcher::Event::InitDone));
        assert!(!apply(&mut faces, &svc), "the relist recorded it");
    }

    fn beat(sent: Option<Instant>, rd_ms: u64) -> Beat {
        let ms = Duration::from_millis;
        Beat {
            timing: Timing {
                lease_duration: ms(3000),
                renew_interval: ms(1000),
                renew_deadline: ms(rd_ms),
                clock_skew: ms(500),
                vip_lifetime_seconds: None,
            },
            last_success: sent,
            failures: 0,
            renewed_under: None,
            renew_time: None,
            exclusive: None,
            renewed_exclusive: false,
        }
    }

    fn slot(next: Instant) -> Slot {
        let spec = kubeha_crds::testing::service_spec("c", &["198.18.0.100/24"]);
        let mut slot = new_slot(ServiceRecord::fresh("c", &spec, "x".into(), None), false);
        (slot.next_monitor, slot.next_periodic, slot.next_refresh) = (next, next, next);
        slot
    }

    /// Only the service Leases this node acts on wake the main loop: one
    /// naming it (holder, standby, cleared), one of a service it has a
    /// record for (it may stop naming this node), and the end of a list.
    #[test]
    fn only_the_leases_this_node_acts_on_wake_the_loop() {
        let lease = |name: &str, holder: &str, annotations: &[(&str, &str)]| {
            let mut l = kubeha_crds::testing::lease(holder, None, annotations);
            l.metadata.name = Some(name.into());
            l
        };
        let recorded: HashSet<String> = ["ours".to_owned()].into();
        let wakes = |e: watcher::Event<Lease>| lease_wakes(&recorded, "n1", &e);
        let apply = |l: Lease| watcher::Event::Apply(l);
        assert!(wakes(apply(lease("a", "n1", &[]))), "holder");
        assert!(wakes(apply(lease(
            "b",
            "n2",
            &[(leases::STANDBY_ANNOTATION, "n1")]
        ))));
        assert!(wakes(apply(lease(
            "c",
            "n2",
            &[(leases::CLEARED_NODE_ANNOTATION, "n1")]
        ))));
        assert!(
            wakes(apply(lease("ours", "n2", &[]))),
            "recorded, moved away"
        );
        assert!(wakes(watcher::Event::Delete(lease("ours", "n2", &[]))));
        assert!(!wakes(apply(lease("other", "n2", &[]))), "not ours");
        assert!(!wakes(watcher::Event::Delete(lease("other", "n2", &[]))));
        assert!(!wakes(watcher::Event::InitApply(lease("a", "n1", &[]))));
        assert!(!wakes(watcher::Event::Init));
        assert!(wakes(watcher::Event::InitDone));
    }

    #[test]
    fn with_nothing_due_the_loop_sleeps_until_the_idle_pass() {
        let now = Instant::now();
        let slots = BTreeMap::from([("a/b".to_owned(), slot(now))]);
        assert_eq!(
            next_pass(now, &HashMap::new(), &slots, &[]),
            now + IDLE_PASS,
            "a monitor already due ran in the pass just done"
        );
    }

    #[test]
    fn the_loop_wakes_for_the_earliest_fence_monitor_or_resend() {
        let ms = Duration::from_millis;
        let now = Instant::now();
        // Renewed 1.5 s ago with RD 2 s: the fence is due in 500 ms.
        let beats = HashMap::from([("c".to_owned(), beat(Some(now - ms(1500)), 2000))]);
        let slots = BTreeMap::from([("a/b".to_owned(), slot(now + ms(700)))]);
        assert_eq!(next_pass(now, &beats, &slots, &[]), now + ms(500));
        let slots = BTreeMap::from([("a/b".to_owned(), slot(now + ms(300)))]);
        assert_eq!(next_pass(now, &beats, &slots, &[]), now + ms(300));
        assert_eq!(
            next_pass(now, &beats, &slots, &[now + ms(100)]),
            now + ms(100)
        );
        // Past RD: the lease end (D + skew after the renew) is next, unless
        // a cut-off node's shorter idle pass comes first.
        let beats = HashMap::from([("c".to_owned(), beat(Some(now - ms(3000)), 2000))]);
        assert_eq!(next_pass(now, &beats, &BTreeMap::new(), &[]), now + ms(500));
    }

    #[test]
    fn a_report_that_fails_waits_longer_each_time_and_one_taken_ends_the_wait() {
        let now = Instant::now();
        let mut r = Reported {
            pending: Some("d1".into()),
            ..Default::default()
        };
        let mut waits = Vec::new();
        for _ in 0..8 {
            r.settle("d1", false, now);
            waits.push(r.retry_at.unwrap() - now);
        }
        assert_eq!(r.pending, None);
        for (i, w) in waits.iter().enumerate() {
            let base = (REPORT_BACKOFF * (1 << i)).min(REPORT_BACKOFF_MAX);
            assert!(*w >= base && *w <= base.mul_f64(1.25), "{i}: {w:?}");
        }
        // The backoff joins the loop's deadlines.
        let mut slot = slot(now);
        slot.reported = Arc::new(std::sync::Mutex::new(Reported {
            retry_at: Some(now + Duration::from_millis(40)),
            ..Default::default()
        }));
        let slots = BTreeMap::from([("a/b".to_owned(), slot)]);
        assert_eq!(
            next_pass(now, &HashMap::new(), &slots, &[]),
            now + Duration::from_millis(40)
        );
        r.settle("d2", true, now);
        assert_eq!(
            (r.done.as_deref(), r.failures, r.retry_at),
            (Some("d2"), 0, None)
        );
    }

    #[test]
    fn a_cut_off_node_passes_often_enough_to_extend_frozen_vips_in_time() {
        let ms = Duration::from_millis;
        let now = Instant::now();
        // RD 2 s passed 5 s ago: the fence and the lease end are behind.
        let mut b = beat(Some(now - ms(7000)), 2000);
        assert_eq!(
            next_pass(
                now,
                &HashMap::from([("c".to_owned(), b)]),
                &BTreeMap::new(),
                &[]
            ),
            now + ms(875),
            "a quarter of E (3.5 s)"
        );
        // A one-second VIP lifetime under Freeze: extended every 250 ms.
        b.timing.vip_lifetime_seconds = Some(1);
        assert_eq!(
            next_pass(
                now,
                &HashMap::from([("c".to_owned(), b)]),
                &BTreeMap::new(),
                &[]
            ),
            now + ms(250)
        );
    }

    #[test]
    fn a_service_created_again_under_its_name_is_hashed_again() {
        let spec = |vip: &str| kubeha_crds::testing::service_spec("c", &[vip]);
        let svc = |uid: &str, vip: &str| {
            let mut s = HAService::new("web", spec(vip));
            s.metadata.uid = Some(uid.into());
            s.metadata.generation = Some(1);
            s
        };
        let mut slot = slot(Instant::now());
        let first = slot.checksum(&svc("u1", "198.18.0.100/24"));
        assert_eq!(first, spec_checksum(&spec("198.18.0.100/24")));
        let again = slot.checksum(&svc("u2", "198.18.0.101/24"));
        assert_eq!(again, spec_checksum(&spec("198.18.0.101/24")));
        assert_ne!(first, again);
    }

    #[test]
    fn the_loop_never_sleeps_half_an_rd_without_a_pass() {
        let now = Instant::now();
        // Never renewed: no fence deadline, but the renewer waits for the
        // loop's progress, so the idle pass comes within RD / 2.
        let beats = HashMap::from([("c".to_owned(), beat(None, 400))]);
        assert_eq!(
            next_pass(now, &beats, &BTreeMap::new(), &[]),
            now + Duration::from_millis(200)
        );
    }
}
