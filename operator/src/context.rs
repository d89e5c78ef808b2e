//! The state the reconcilers share: the client, the watch stores, the
//! heartbeat views, the in-memory memory of each object, leadership, the
//! Event recorder, metrics and the channels that request reconciles.

use std::collections::{HashMap, HashSet};
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
    /// Heartbeat view per cluster. This and the other per-object maps
    /// hold only objects the stores hold (see [`Ctx::forget_deleted`]).
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
    /// Fresh heartbeat reads shared by the reconciles that wait for them.
    pub(crate) heartbeat_reads: crate::service_controller::HeartbeatReads,
    /// Events for the publisher task ([`publish_events`]).
    events: tokio::sync::mpsc::Sender<(Event, ObjectReference)>,
    /// Metrics.
    pub metrics: Metrics,
    triggers: Triggers,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The per-object maps of [`Ctx`], as the `map` label of
/// `kubeha_operator_memory_entries` names them.
const SERVICE_MAP: &str = "service";
const CLUSTER_MAP: &str = "cluster";
const VIEW_MAP: &str = "heartbeat_view";
const FIRST_SEEN_MAP: &str = "first_seen";

/// Runs `f` on the entry `key` of a per-object map, first creating it
/// with `make` if `wanted` says the object is one to remember (then
/// `counted` learns the map's new size); for any other key `f` runs on a
/// fresh value that is not kept. Deciding under the map's lock is what
/// makes [`Ctx::forget_deleted`] certain: an entry is either created before
/// the object left its store (and the sweep after that removal frees it)
/// or never.
fn with_entry<V, R>(
    map: &mut HashMap<String, V>,
    key: &str,
    wanted: impl FnOnce() -> bool,
    make: impl FnOnce() -> V,
    counted: impl FnOnce(usize),
    f: impl FnOnce(&mut V) -> R,
) -> R {
    if let Some(v) = map.get_mut(key) {
        return f(v);
    }
    let mut fresh = make();
    if wanted() {
        // `key` is not in the map (looked up above, under the same lock).
        counted(map.len() + 1);
        f(map.entry(key.to_owned()).or_insert(fresh))
    } else {
        f(&mut fresh)
    }
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
        let (events, queued) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        tokio::spawn(publish_events(recorder, queued));
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
            heartbeat_reads: Default::default(),
            events,
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
    /// from now) with the cluster's timing if it does not exist (only for
    /// a cluster that exists or that a service refers to: see
    /// [`Ctx::forget_deleted`]). Checks the
    /// pulse first, so a view is never read right after a pause as if none
    /// happened.
    pub fn with_view<R>(&self, cluster: &str, f: impl FnOnce(&mut HeartbeatView) -> R) -> R {
        self.check_pulse(Instant::now());
        self.view_in(&mut lock(&self.views), cluster, f)
    }

    /// Runs `f` on the view of `cluster` in the locked map, created if
    /// missing and the cluster is one to remember
    /// ([`Ctx::cluster_wanted`]); else on a fresh view judging from now
    /// that is not kept (it knows nobody: nobody Alive, nobody Lost).
    fn view_in<R>(
        &self,
        views: &mut HashMap<String, HeartbeatView>,
        cluster: &str,
        f: impl FnOnce(&mut HeartbeatView) -> R,
    ) -> R {
        let make = || {
            let timing = self
                .stores
                .clusters
                .get(&ObjectRef::new(cluster))
                .map(|c| Timing::from(&c.spec.heartbeat))
                .unwrap_or_default();
            HeartbeatView::new(timing, Instant::now())
        };
        let counted = |n| self.metrics.set_memory_entries(VIEW_MAP, n);
        with_entry(
            views,
            cluster,
            || self.cluster_wanted(cluster),
            make,
            counted,
            f,
        )
    }

    /// Whether the per-cluster maps keep an entry for `cluster`: the
    /// HACluster exists, or an HAService still refers to it (its view
    /// judges that service's nodes while the service is released), or the
    /// watches have not listed yet (then nothing is known to be gone).
    fn cluster_wanted(&self, cluster: &str) -> bool {
        !self.is_ready()
            || self.stores.clusters.get(&ObjectRef::new(cluster)).is_some()
            || self
                .stores
                .services
                .find(|s| s.spec.cluster_ref == cluster)
                .is_some()
    }

    /// Whether the per-service map keeps an entry for the service `key`
    /// (`namespace/name`): it exists, or the watches have not listed yet.
    fn service_wanted(&self, key: &str) -> bool {
        !self.is_ready()
            || key.split_once('/').is_some_and(|(ns, name)| {
                let r = ObjectRef::new(name).within(ns);
                self.stores.services.get(&r).is_some()
            })
    }

    /// Frees what is kept for HAServices and HAClusters the stores no
    /// longer hold (deleted; a cluster also no longer referred to): their
    /// memory, heartbeat view and first sighting. Runs after every delete
    /// and every re-list of either watch ([`crate::watch::dispatch`]);
    /// nothing before the watches have listed.
    pub fn forget_deleted(&self) {
        if !self.is_ready() {
            return;
        }
        lock(&self.services).retain(|key, _| self.service_wanted(key));
        let referred: HashSet<String> = self
            .stores
            .services
            .state()
            .iter()
            .map(|s| s.spec.cluster_ref.clone())
            .collect();
        let kept = |name: &String| {
            referred.contains(name) || self.stores.clusters.get(&ObjectRef::new(name)).is_some()
        };
        lock(&self.views).retain(|name, _| kept(name));
        lock(&self.clusters).retain(|name, _| kept(name));
        lock(&self.first_seen).retain(|name, _| kept(name));
        self.count_entries();
    }

    /// Publishes the size of every per-object map
    /// (`kubeha_operator_memory_entries`).
    fn count_entries(&self) {
        let m = &self.metrics;
        m.set_memory_entries(SERVICE_MAP, lock(&self.services).len());
        m.set_memory_entries(CLUSTER_MAP, lock(&self.clusters).len());
        m.set_memory_entries(VIEW_MAP, lock(&self.views).len());
        m.set_memory_entries(FIRST_SEEN_MAP, lock(&self.first_seen).len());
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
            self.view_in(&mut views, &cluster, |v| v.observe(&node, fingerprint, now));
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

    /// Runs `f` on the memory of the service `key` (a fresh one, not kept,
    /// once the service is gone from the store).
    pub fn with_service_memory<R>(&self, key: &str, f: impl FnOnce(&mut ServiceMemory) -> R) -> R {
        let wanted = || self.service_wanted(key);
        let counted = |n| self.metrics.set_memory_entries(SERVICE_MAP, n);
        let mut services = lock(&self.services);
        with_entry(&mut services, key, wanted, Default::default, counted, f)
    }

    /// Runs `f` on the memory of the cluster `name` (see
    /// [`Ctx::with_view`] for which clusters are remembered).
    pub fn with_cluster_memory<R>(&self, name: &str, f: impl FnOnce(&mut ClusterMemory) -> R) -> R {
        let wanted = || self.cluster_wanted(name);
        let counted = |n| self.metrics.set_memory_entries(CLUSTER_MAP, n);
        let mut clusters = lock(&self.clusters);
        with_entry(&mut clusters, name, wanted, Default::default, counted, f)
    }

    /// When this operator first saw `cluster`.
    pub fn first_seen(&self, cluster: &str, now: Instant) -> Instant {
        let wanted = || self.cluster_wanted(cluster);
        let counted = |n| self.metrics.set_memory_entries(FIRST_SEEN_MAP, n);
        let mut first_seen = lock(&self.first_seen);
        with_entry(&mut first_seen, cluster, wanted, || now, counted, |t| *t)
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

    /// Publishes an Event about `reference` (leader only; best effort): it
    /// is queued for the publisher task, in order, so no reconcile waits
    /// for it (after a power-off, each service's Events held its turn for
    /// up to [`EVENT_TIMEOUT`] each while the next services' Lease writes
    /// waited). A full queue drops it.
    pub fn publish(&self, reference: &ObjectReference, reason: &str, warning: bool, note: String) {
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
        if self.events.try_send((event, reference.clone())).is_err() {
            tracing::warn!(reason, "the Event queue is full: Event dropped");
        }
    }
}

/// Publishes the queued Events, at most [`EVENTS_IN_FLIGHT`] at once, each
/// given at most [`EVENT_TIMEOUT`]; ends when the context is dropped.
async fn publish_events(
    recorder: Recorder,
    mut queued: tokio::sync::mpsc::Receiver<(Event, ObjectReference)>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(EVENTS_IN_FLIGHT));
    while let Some((event, reference)) = queued.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let reason = event.reason.as_str();
            match tokio::time::timeout(EVENT_TIMEOUT, recorder.publish(&event, &reference)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, reason, "publishing an Event failed"),
                Err(_) => tracing::warn!(reason, "publishing an Event timed out"),
            }
            drop(permit);
        });
    }
}

/// How many Events are sent at once: few, as an Event is never urgent and
/// a failover's burst of them competes with its Lease writes.
pub const EVENTS_IN_FLIGHT: usize = 2;

/// How many Events may wait for the publisher task.
pub const EVENT_QUEUE: usize = 4096;

/// How long publishing one Event may take.
pub const EVENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// `namespace/name` of a service.
pub fn service_key(svc: &HAService) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// A context on stores the test fills by hand and a client that reaches
/// nothing (for tests of what the context keeps; needs a Tokio runtime).
#[cfg(test)]
pub(crate) mod testing {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::runtime::reflector::{self, store::Writer};
    use kube::runtime::watcher;

    use super::*;
    use crate::members::WatchedNode;

    /// The writing halves of [`Stores`].
    pub(crate) struct Writers {
        pub(crate) services: Writer<HAService>,
        pub(crate) clusters: Writer<HACluster>,
        pub(crate) service_leases: Writer<Lease>,
        pub(crate) heartbeat_leases: Writer<Lease>,
        pub(crate) nodes: Writer<WatchedNode>,
    }

    /// Empty stores and their writers.
    pub(crate) fn stores() -> (Stores, Writers) {
        let (services, ws) = reflector::store();
        let (clusters, wc) = reflector::store();
        let (service_leases, wsl) = reflector::store();
        let (heartbeat_leases, whl) = reflector::store();
        let (nodes, wn) = reflector::store();
        (
            Stores {
                services,
                clusters,
                service_leases,
                heartbeat_leases,
                nodes,
                namespace: "kubeha-system".into(),
            },
            Writers {
                services: ws,
                clusters: wc,
                service_leases: wsl,
                heartbeat_leases: whl,
                nodes: wn,
            },
        )
    }

    /// A context on `stores`, not leader, not ready.
    pub(crate) fn ctx(stores: Stores) -> Ctx {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let (services, _) = futures::channel::mpsc::unbounded();
        let (clusters, _) = futures::channel::mpsc::unbounded();
        let (all_services, _) = futures::channel::mpsc::unbounded();
        let (all_clusters, _) = futures::channel::mpsc::unbounded();
        Ctx::new(
            client,
            "kubeha-system".into(),
            "test".into(),
            stores,
            Metrics::default(),
            Triggers {
                services,
                clusters,
                all_services,
                all_clusters,
            },
        )
    }

    /// HAService `ns/name` of `cluster`.
    pub(crate) fn service(ns: &str, name: &str, cluster: &str) -> HAService {
        let mut svc = HAService::new(
            name,
            kubeha_crds::testing::service_spec(cluster, &["198.18.0.100/24"]),
        );
        svc.metadata.namespace = Some(ns.to_owned());
        svc
    }

    /// HACluster `name` with one member.
    pub(crate) fn cluster(name: &str) -> HACluster {
        kubeha_crds::testing::cluster(
            name,
            kubeha_crds::testing::members(&[("node-1", Mode::Default)], None),
        )
    }

    /// Applies `ev` to `w`, as the watch does before the dispatcher sees it.
    pub(crate) fn apply<K>(w: &mut Writer<K>, ev: watcher::Event<K>)
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        w.apply_watcher_event(&ev);
    }

    impl Ctx {
        /// Whether anything is kept for the service `key`.
        pub(crate) fn keeps_service(&self, key: &str) -> bool {
            lock(&self.services).contains_key(key)
        }

        /// How many of the per-cluster maps keep an entry for `name`.
        pub(crate) fn keeps_cluster(&self, name: &str) -> usize {
            usize::from(lock(&self.views).contains_key(name))
                + usize::from(lock(&self.clusters).contains_key(name))
                + usize::from(lock(&self.first_seen).contains_key(name))
        }

        /// Uses every per-cluster map for `name`, as the reconcilers do.
        pub(crate) fn touch_cluster(&self, name: &str) {
            let now = Instant::now();
            self.first_seen(name, now);
            self.with_view(name, |_| ());
            self.with_cluster_memory(name, |_| ());
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;

    use super::testing::{apply, cluster, ctx, service, stores};
    use super::*;

    #[tokio::test]
    async fn a_deleted_service_is_forgotten() {
        let (stores, mut w) = stores();
        let ctx = ctx(stores);
        let svc = service("app", "web", "demo");
        apply(&mut w.services, Event::Apply(svc.clone()));
        ctx.ready.store(true, Ordering::SeqCst);
        ctx.with_service_memory("app/web", |_| ());
        assert!(ctx.keeps_service("app/web"));

        apply(&mut w.services, Event::Delete(svc));
        ctx.forget_deleted();
        assert!(!ctx.keeps_service("app/web"));
        // A reconcile still running for it keeps nothing either.
        let ran = ctx.with_service_memory("app/web", |_| true);
        assert!(ran && !ctx.keeps_service("app/web"));
    }

    #[tokio::test]
    async fn a_deleted_cluster_is_forgotten_once_no_service_refers_to_it() {
        let (stores, mut w) = stores();
        let ctx = ctx(stores);
        let (cl, svc) = (cluster("demo"), service("app", "web", "demo"));
        apply(&mut w.clusters, Event::Apply(cl.clone()));
        apply(&mut w.services, Event::Apply(svc.clone()));
        ctx.ready.store(true, Ordering::SeqCst);
        ctx.touch_cluster("demo");
        assert_eq!(ctx.keeps_cluster("demo"), 3);

        apply(&mut w.clusters, Event::Delete(cl));
        ctx.forget_deleted();
        assert_eq!(
            ctx.keeps_cluster("demo"),
            3,
            "its service is still released on its view"
        );

        apply(&mut w.services, Event::Delete(svc));
        ctx.forget_deleted();
        assert_eq!(ctx.keeps_cluster("demo"), 0);
        ctx.touch_cluster("demo");
        ctx.observe_heartbeat("demo", "node-1", Default::default(), Instant::now());
        assert_eq!(ctx.keeps_cluster("demo"), 0, "nothing new is kept for it");
    }

    /// The value of `kubeha_operator_memory_entries{map}` on a scrape.
    fn entries_gauge(ctx: &Ctx, map: &str) -> i64 {
        let text = ctx.metrics.encode(&ctx.stores.services);
        let series = format!("kubeha_operator_memory_entries{{map=\"{map}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[tokio::test]
    async fn the_memory_gauge_grows_with_objects_and_falls_back_when_they_go() {
        let (stores, mut w) = stores();
        let ctx = ctx(stores);
        let cl = cluster("demo");
        let services: Vec<HAService> = (0..50)
            .map(|i| service("app", &format!("web-{i}"), "demo"))
            .collect();
        apply(&mut w.clusters, Event::Apply(cl.clone()));
        for svc in &services {
            apply(&mut w.services, Event::Apply(svc.clone()));
        }
        ctx.ready.store(true, Ordering::SeqCst);
        for svc in &services {
            ctx.with_service_memory(&service_key(svc), |_| ());
        }
        ctx.touch_cluster("demo");
        assert_eq!(entries_gauge(&ctx, SERVICE_MAP), 50);
        for map in [CLUSTER_MAP, VIEW_MAP, FIRST_SEEN_MAP] {
            assert_eq!(entries_gauge(&ctx, map), 1, "{map}");
        }

        for svc in &services[..20] {
            apply(&mut w.services, Event::Delete(svc.clone()));
            ctx.forget_deleted();
        }
        assert_eq!(entries_gauge(&ctx, SERVICE_MAP), 30);
        for svc in &services[20..] {
            apply(&mut w.services, Event::Delete(svc.clone()));
        }
        apply(&mut w.clusters, Event::Delete(cl));
        ctx.forget_deleted();
        for map in [SERVICE_MAP, CLUSTER_MAP, VIEW_MAP, FIRST_SEEN_MAP] {
            assert_eq!(entries_gauge(&ctx, map), 0, "{map}");
        }
        assert!(services.iter().all(|s| !ctx.keeps_service(&service_key(s))));
        assert_eq!(ctx.keeps_cluster("demo"), 0);
    }

    #[tokio::test]
    async fn nothing_is_forgotten_before_the_watches_have_listed() {
        let (stores, _w) = stores();
        let ctx = ctx(stores);
        ctx.with_service_memory("app/web", |_| ());
        ctx.touch_cluster("demo");
        ctx.forget_deleted();
        assert!(ctx.keeps_service("app/web"));
        assert_eq!(ctx.keeps_cluster("demo"), 3);

        ctx.ready.store(true, Ordering::SeqCst);
        ctx.forget_deleted();
        assert!(!ctx.keeps_service("app/web"));
        assert_eq!(ctx.keeps_cluster("demo"), 0);
    }
}
