//! The state the reconcilers share: the client, the watch stores, the
//! heartbeat views, the in-memory memory of each object, leadership, the
//! Event recorder, metrics and the channels that request reconciles.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use kubeha_crds::{HACluster, HAService, Mode};

use crate::heartbeat_view::{Fingerprint, HeartbeatView, Observation, Timing};
use crate::memory::{ClusterMemory, ServiceMemory};
use crate::metrics::Metrics;
use crate::watch::Stores;

/// Field manager of every operator write (status apply, Lease writes).
pub const FIELD_MANAGER: &str = "kubeha-operator";

/// The channels that ask the controllers to reconcile one object, or all.
#[derive(Clone)]
pub struct Triggers {
    /// HAService reconciles.
    pub services: UnboundedSender<ObjectRef<HAService>>,
    /// HACluster reconciles.
    pub clusters: UnboundedSender<ObjectRef<HACluster>>,
    /// Reconcile every HAService.
    pub all_services: UnboundedSender<()>,
    /// Reconcile every HACluster.
    pub all_clusters: UnboundedSender<()>,
}

/// Shared reconciler state.
pub struct Ctx {
    /// Kubernetes client.
    pub client: Client,
    /// The operator's namespace (heartbeat Leases, leader Lease).
    pub namespace: String,
    /// The watch stores.
    pub stores: Stores,
    /// Heartbeat view per cluster.
    views: Mutex<HashMap<String, HeartbeatView>>,
    /// Memory per service (`namespace/name`).
    services: Mutex<HashMap<String, ServiceMemory>>,
    /// Memory per cluster.
    clusters: Mutex<HashMap<String, ClusterMemory>>,
    /// When this operator first saw each cluster (startup grace).
    first_seen: Mutex<HashMap<String, Instant>>,
    leader: AtomicBool,
    /// The last instant the process was seen running (see [`crate::gaps`]).
    pulse: Mutex<Instant>,
    /// Counts the gaps opened; a quorum read closes those opened before it
    /// began.
    gaps: AtomicU64,
    /// Wakes the quorum read of [`crate::gaps::run`].
    gap_opened: tokio::sync::Notify,
    /// Every watch has listed once.
    pub ready: Arc<AtomicBool>,
    recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    triggers: Triggers,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ctx {
    /// Builds the context. `instance` names this replica in Events.
    pub fn new(
        client: Client,
        namespace: String,
        instance: String,
        stores: Stores,
        metrics: Metrics,
        triggers: Triggers,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(instance),
            },
        );
        Self {
            client,
            namespace,
            stores,
            views: Default::default(),
            services: Default::default(),
            clusters: Default::default(),
            first_seen: Default::default(),
            leader: AtomicBool::new(false),
            pulse: Mutex::new(Instant::now()),
            gaps: AtomicU64::new(0),
            gap_opened: tokio::sync::Notify::new(),
            ready: Arc::new(AtomicBool::new(false)),
            recorder,
            metrics,
            triggers,
        }
    }

    /// Whether this replica may write.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// Records leadership; becoming leader reconciles everything.
    pub fn set_leader(&self, leader: bool) {
        let was = self.leader.swap(leader, Ordering::SeqCst);
        self.metrics.set_leader(leader);
        if leader && !was {
            tracing::info!("became the leader: reconciling everything");
            // What this replica saw as a follower is not proof enough.
            self.open_gap(Instant::now(), "leadership acquired");
            self.trigger_everything();
        } else if !leader && was {
            tracing::warn!("lost leadership: writing nothing from now on");
        }
    }

    /// Whether every watch has listed once.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Runs `f` on the heartbeat view of `cluster`, creating it (judging
    /// from now) with the cluster's timing if it does not exist. Checks the
    /// pulse first, so a view is never read right after a pause as if none
    /// happened.
    pub fn with_view<R>(&self, cluster: &str, f: impl FnOnce(&mut HeartbeatView) -> R) -> R {
        self.check_pulse(Instant::now());
        let mut views = lock(&self.views);
        f(self.view_in(&mut views, cluster))
    }

    /// The view of `cluster` in the locked map, created if missing.
    fn view_in<'a>(
        &self,
        views: &'a mut HashMap<String, HeartbeatView>,
        cluster: &str,
    ) -> &'a mut HeartbeatView {
        views.entry(cluster.to_owned()).or_insert_with(|| {
            let timing = self
                .stores
                .clusters
                .get(&ObjectRef::new(cluster))
                .map(|c| Timing::from(&c.spec.heartbeat))
                .unwrap_or_default();
            HeartbeatView::new(timing, Instant::now())
        })
    }

    /// Refreshes the pulse at `now`; a pulse older than
    /// [`crate::gaps::GAP_AFTER`] means the process did not run since it:
    /// a gap that began then.
    pub fn check_pulse(&self, now: Instant) {
        let last = {
            let mut pulse = lock(&self.pulse);
            let last = *pulse;
            *pulse = last.max(now);
            last
        };
        let paused = now.saturating_duration_since(last);
        if paused > crate::gaps::GAP_AFTER {
            tracing::warn!(?paused, "the operator did not run for a while");
            self.open_gap(last, "process paused");
        }
    }

    /// Opens a gap that began at `since` in every heartbeat view and wakes
    /// the quorum read that closes it.
    pub fn open_gap(&self, since: Instant, why: &str) {
        let mut views = lock(&self.views);
        for view in views.values_mut() {
            view.open_gap(since);
        }
        self.gaps.fetch_add(1, Ordering::SeqCst);
        drop(views);
        tracing::info!(
            why,
            "gap in the operator's view: re-reading every heartbeat before judging"
        );
        self.gap_opened.notify_one();
    }

    /// Waits until a gap opens (one wake-up per burst of gaps).
    pub async fn gap_opened(&self) {
        self.gap_opened.notified().await;
    }

    /// How many gaps have opened so far.
    pub fn gap_generation(&self) -> u64 {
        self.gaps.load(Ordering::SeqCst)
    }

    /// Observes the heartbeat Leases of a quorum read (cluster, node,
    /// fingerprint) that returned at `now`, and closes every gap unless one
    /// opened after `generation` (the read began before it: read again).
    /// Returns whether the gaps closed.
    pub fn close_gaps(
        &self,
        generation: u64,
        read: Vec<(String, String, Fingerprint)>,
        now: Instant,
    ) -> bool {
        let mut views = lock(&self.views);
        for (cluster, node, fingerprint) in read {
            self.view_in(&mut views, &cluster)
                .observe(&node, fingerprint, now);
        }
        if self.gaps.load(Ordering::SeqCst) != generation {
            return false;
        }
        for view in views.values_mut() {
            view.close_gap();
        }
        true
    }

    /// Whether `cluster`'s view waits for the quorum read after a gap: the
    /// leader writes nothing about it until then.
    pub fn in_gap(&self, cluster: &str) -> bool {
        self.with_view(cluster, |v| v.in_gap())
    }

    /// Sets a cluster's heartbeat timing.
    pub fn set_timing(&self, cluster: &str, timing: Timing) {
        self.with_view(cluster, |v| v.set_timing(timing));
    }

    /// Observes a heartbeat Lease.
    pub fn observe_heartbeat(
        &self,
        cluster: &str,
        node: &str,
        fingerprint: Fingerprint,
        now: Instant,
    ) -> Observation {
        self.with_view(cluster, |v| v.observe(node, fingerprint, now))
    }

    /// Whether `node` is a listed member of `cluster` in mode `peerdown`.
    pub fn is_peerdown(&self, cluster: &str, node: &str) -> bool {
        self.stores
            .clusters
            .get(&ObjectRef::new(cluster))
            .is_some_and(|c| {
                c.spec
                    .members
                    .nodes
                    .iter()
                    .any(|m| m.name == node && m.mode == Mode::Peerdown)
            })
    }

    /// Runs `f` on the memory of the service `key`.
    pub fn with_service_memory<R>(&self, key: &str, f: impl FnOnce(&mut ServiceMemory) -> R) -> R {
        f(lock(&self.services).entry(key.to_owned()).or_default())
    }

    /// Forgets a deleted service.
    pub fn forget_service(&self, key: &str) {
        lock(&self.services).remove(key);
    }

    /// Runs `f` on the memory of the cluster `name`.
    pub fn with_cluster_memory<R>(&self, name: &str, f: impl FnOnce(&mut ClusterMemory) -> R) -> R {
        f(lock(&self.clusters).entry(name.to_owned()).or_default())
    }

    /// When this operator first saw `cluster`.
    pub fn first_seen(&self, cluster: &str, now: Instant) -> Instant {
        *lock(&self.first_seen)
            .entry(cluster.to_owned())
            .or_insert(now)
    }

    /// Asks for a reconcile of one service.
    pub fn trigger_service(&self, r: ObjectRef<HAService>) {
        let _ = self.triggers.services.unbounded_send(r);
    }

    /// Asks for a reconcile of one cluster.
    pub fn trigger_cluster(&self, r: ObjectRef<HACluster>) {
        let _ = self.triggers.clusters.unbounded_send(r);
    }

    /// Asks for a reconcile of every service bound to `cluster`.
    pub fn trigger_services_of(&self, cluster: &str) {
        for svc in self
            .stores
            .services
            .state()
            .into_iter()
            .filter(|s| s.spec.cluster_ref == cluster)
        {
            self.trigger_service(ObjectRef::from_obj(svc.as_ref()));
        }
    }

    /// Asks for a reconcile of everything.
    pub fn trigger_everything(&self) {
        let _ = self.triggers.all_services.unbounded_send(());
        let _ = self.triggers.all_clusters.unbounded_send(());
    }

    /// Publishes an Event about `reference` (leader only; best effort).
    pub async fn publish(
        &self,
        reference: &ObjectReference,
        reason: &str,
        warning: bool,
        note: String,
    ) {
        if !self.is_leader() {
            return;
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_owned(),
            secondary: None,
        };
        // Best effort, and never for long: a reconcile waits for it.
        match tokio::time::timeout(EVENT_TIMEOUT, self.recorder.publish(&event, reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, reason, "publishing an Event failed"),
            Err(_) => tracing::warn!(reason, "publishing an Event timed out"),
        }
    }
}

/// How long publishing one Event may take.
pub const EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `namespace/name` of a service.
pub fn service_key(svc: &HAService) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}
