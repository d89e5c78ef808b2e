//! The operator's watches, one per kind, each feeding a reflector store the
//! controllers read, and the dispatcher that turns their events into
//! reconcile requests and heartbeat observations.
//!
//! Objects are watched untyped and parsed one by one: a malformed object
//! is logged and skipped instead of failing the whole list (a typed list
//! fails as a whole when one item does not deserialize), so it never stops
//! the watch of the others.
//!
//! | watch | selector | feeds |
//! |---|---|---|
//! | HAService, all namespaces | - | the service itself, its cluster |
//! | HACluster | - | the cluster; its services when the spec or the release annotation changed |
//! | Lease, operator namespace | `kubeha.io/lease in (service,claim)` | the service named by `kubeha.io/service` |
//! | Lease, operator namespace | `kubeha.io/lease=heartbeat` | heartbeat view; cluster and services when a member's state changed |
//! | Node | - | every cluster and service when cordon, labels or addresses changed |
//!
//! Nodes are stored as [`WatchedNode`]s (name and [`NodeInfo`] only). A
//! delete, or a re-list that no longer shows an object, of an HAService or
//! HACluster frees what the operator kept for it ([`Ctx::forget_deleted`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use kubeha_crds::{HACluster, HAService, leases};

use crate::context::Ctx;
use crate::heartbeat_view::{Fingerprint, Timing};
use crate::members::{NodeInfo, WatchedNode};

/// The reflector stores the controllers read.
#[derive(Clone)]
pub struct Stores {
    /// Every HAService.
    pub services: Store<HAService>,
    /// Every HACluster.
    pub clusters: Store<HACluster>,
    /// Service and claim Leases (operator namespace).
    pub service_leases: Store<Lease>,
    /// Heartbeat Leases (operator namespace).
    pub heartbeat_leases: Store<Lease>,
    /// Nodes, as much of them as the operator reads.
    pub nodes: Store<WatchedNode>,
    /// The operator's namespace, where the Leases are.
    pub namespace: String,
}

impl Stores {
    /// The service Lease of `svc`, as the watch shows it.
    pub fn service_lease(&self, svc: &HAService) -> Option<std::sync::Arc<Lease>> {
        let name =
            leases::service_lease_name(&svc.namespace().unwrap_or_default(), &svc.name_any());
        self.service_leases
            .get(&ObjectRef::new(&name).within(&self.namespace))
    }

    /// The VIP claim Lease of `svc`, as the watch shows it.
    pub fn claim_lease(&self, svc: &HAService) -> Option<std::sync::Arc<Lease>> {
        let name = leases::claim_lease_name(&svc.namespace().unwrap_or_default(), &svc.name_any());
        self.service_leases
            .get(&ObjectRef::new(&name).within(&self.namespace))
    }

    /// What every Node says, by name.
    pub fn node_infos(&self) -> BTreeMap<String, NodeInfo> {
        self.nodes
            .state()
            .iter()
            .map(|n| (n.name_any(), n.info.clone()))
            .collect()
    }
}

type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// The reflected event streams; [`dispatch`] drives them.
pub struct Streams {
    services: Events<HAService>,
    clusters: Events<HACluster>,
    service_leases: Events<Lease>,
    heartbeat_leases: Events<Lease>,
    nodes: Events<WatchedNode>,
}

/// Starts the watches (lazily: nothing runs until [`dispatch`] polls them).
pub fn start(client: &Client, namespace: &str) -> (Stores, Streams) {
    let (services, s1) =
        kubeha_runtime::watch::reflect::<HAService>(client, None, watcher::Config::default());
    let (clusters, s2) =
        kubeha_runtime::watch::reflect::<HACluster>(client, None, watcher::Config::default());
    let (service_leases, s3) = kubeha_runtime::watch::reflect::<Lease>(
        client,
        Some(namespace),
        watcher::Config::default().labels(&leases::service_and_claim_lease_selector()),
    );
    let (heartbeat_leases, s4) = kubeha_runtime::watch::reflect::<Lease>(
        client,
        Some(namespace),
        watcher::Config::default().labels(&leases::heartbeat_lease_selector()),
    );
    let (nodes, s5) =
        kubeha_runtime::watch::reflect::<WatchedNode>(client, None, watcher::Config::default());
    (
        Stores {
            services,
            clusters,
            service_leases,
            heartbeat_leases,
            nodes,
            namespace: namespace.to_owned(),
        },
        Streams {
            services: s1.boxed(),
            clusters: s2.boxed(),
            service_leases: s3.boxed(),
            heartbeat_leases: s4.boxed(),
            nodes: s5.boxed(),
        },
    )
}

fn object<K>(event: &watcher::Event<K>) -> Option<&K> {
    use watcher::Event::*;
    match event {
        Apply(o) | InitApply(o) | Delete(o) => Some(o),
        Init | InitDone => None,
    }
}

/// Whether `ev` is a delete or the end of a (re-)list: the events after
/// which a store may no longer hold an object it held before.
fn may_have_removed<K>(ev: &Result<watcher::Event<K>, watcher::Error>) -> bool {
    matches!(ev, Ok(watcher::Event::Delete(_) | watcher::Event::InitDone))
}

/// Drops the entries of a map by object name (cluster-scoped kinds) whose
/// object `store` no longer holds: a re-list yields no delete for what went
/// while the watch was down. Returns the names dropped.
fn drop_unlisted<K, V>(map: &mut HashMap<String, V>, store: &Store<K>) -> Vec<String>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let gone: Vec<String> = map
        .keys()
        .filter(|name| store.get(&ObjectRef::new(name)).is_none())
        .cloned()
        .collect();
    for name in &gone {
        map.remove(name);
    }
    gone
}

/// Which watches have listed their objects once; the operator is ready when
/// all five have.
///
/// Tracked from the events the watches yield, not with
/// `Store::wait_until_ready`: that future keeps only the last waker of a
/// store, and the controllers already wait on the HAService and HACluster
/// stores, so a second waiter could sleep forever (seen in the lab: a
/// replica that never became ready).
#[derive(Default)]
struct Synced(std::sync::atomic::AtomicU8);

impl Synced {
    const ALL: u8 = 0b1_1111;

    /// Marks watch `bit` as listed when `ev` ends its initial list; returns
    /// true exactly once, when the last of the five does.
    fn note<K>(&self, bit: u8, ev: &Result<watcher::Event<K>, watcher::Error>) -> bool {
        use std::sync::atomic::Ordering;
        if !matches!(ev, Ok(watcher::Event::InitDone)) {
            return false;
        }
        let before = self.0.fetch_or(1 << bit, Ordering::SeqCst);
        before != Self::ALL && before | (1 << bit) == Self::ALL
    }
}

/// Marks the operator ready, frees what it kept for objects the lists did
/// not show, and reconciles everything once.
fn became_ready(ctx: &Ctx) {
    ctx.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!("watches synced");
    ctx.forget_deleted();
    ctx.trigger_everything();
}

/// Drives every watch until they end (never, in practice): keeps the stores
/// up to date, observes heartbeat Leases the instant they arrive, and asks
/// the controllers to reconcile what an event concerns.
pub async fn dispatch(ctx: Arc<Ctx>, streams: Streams) {
    let Streams {
        services,
        clusters,
        service_leases,
        heartbeat_leases,
        nodes,
    } = streams;
    let synced = Arc::new(Synced::default());

    let (c, sy) = (ctx.clone(), synced.clone());
    let services = services.for_each(move |ev| {
        c.metrics
            .set_watched_objects("HAService", c.stores.services.len());
        if sy.note(0, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        async move {
            if may_have_removed(&ev) {
                c.forget_deleted();
            }
            match ev {
                Ok(ev) => {
                    if let Some(svc) = object(&ev) {
                        c.trigger_service(ObjectRef::from_obj(svc));
                        c.trigger_cluster(ObjectRef::new(&svc.spec.cluster_ref));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "HAService watch error (retrying)"),
            }
        }
    });

    let (c, sy) = (ctx.clone(), synced.clone());
    // Per cluster, what its services depend on: the generation (the spec)
    // and the release annotation (kubeha.io/release-node, metadata only).
    let mut generations: HashMap<String, (Option<i64>, Option<String>)> = HashMap::new();
    let clusters = clusters.for_each(move |ev| {
        c.metrics
            .set_watched_objects("HACluster", c.stores.clusters.len());
        if sy.note(1, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        let changed = match &ev {
            Ok(ev) => object(ev).is_some_and(|cl| {
                let deleted = matches!(ev, watcher::Event::Delete(_));
                let now = (
                    cl.metadata.generation,
                    cl.annotations()
                        .get(kubeha_crds::annotations::RELEASE_NODE)
                        .cloned(),
                );
                let before = generations.insert(cl.name_any(), now.clone());
                if deleted {
                    generations.remove(&cl.name_any());
                }
                deleted || before != Some(now)
            }),
            Err(_) => false,
        };
        // Clusters deleted while the watch was down.
        let gone = match &ev {
            Ok(watcher::Event::InitDone) => drop_unlisted(&mut generations, &c.stores.clusters),
            _ => Vec::new(),
        };
        async move {
            if may_have_removed(&ev) {
                c.forget_deleted();
            }
            for name in &gone {
                c.trigger_services_of(name);
            }
            match ev {
                Ok(ev) => {
                    if let Some(cl) = object(&ev) {
                        let name = cl.name_any();
                        if !matches!(ev, watcher::Event::Delete(_)) {
                            c.set_timing(&name, Timing::from(&cl.spec.heartbeat));
                        }
                        c.trigger_cluster(ObjectRef::new(&name));
                        if changed {
                            c.trigger_services_of(&name);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "HACluster watch error (retrying)"),
            }
        }
    });

    let (c, sy) = (ctx.clone(), synced.clone());
    let service_leases = service_leases.for_each(move |ev| {
        c.metrics
            .set_watched_objects("ServiceLease", c.stores.service_leases.len());
        if sy.note(2, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        async move {
            match ev {
                Ok(ev) => {
                    if let Some((ns, svc)) = object(&ev).and_then(leases::service_of) {
                        c.trigger_service(ObjectRef::new(svc).within(ns));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "service Lease watch error (retrying)"),
            }
        }
    });

    let (c, sy) = (ctx.clone(), synced.clone());
    let heartbeat_leases = heartbeat_leases.for_each(move |ev| {
        c.metrics
            .set_watched_objects("HeartbeatLease", c.stores.heartbeat_leases.len());
        if sy.note(3, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        async move {
            match ev {
                Ok(ev) => {
                    let now = Instant::now();
                    if matches!(ev, watcher::Event::Init) {
                        // A (re-)list: what happened while the watch was
                        // down has to be read again from etcd.
                        c.open_gap(now, "heartbeat watch listing again");
                    }
                    let Some(lease) = object(&ev) else { return };
                    let Some((cluster, node)) = leases::heartbeat_of(lease) else {
                        return;
                    };
                    match ev {
                        watcher::Event::Delete(_) => {
                            // No more renews: it expires by itself.
                            c.trigger_cluster(ObjectRef::new(cluster));
                        }
                        _ => {
                            let obs =
                                c.observe_heartbeat(cluster, node, Fingerprint::of(lease), now);
                            if obs.changes_state() {
                                tracing::info!(%cluster, %node, ?obs, "heartbeat state changed");
                                c.trigger_cluster(ObjectRef::new(cluster));
                                c.trigger_services_of(cluster);
                            } else if c.is_peerdown(cluster, node) {
                                c.trigger_cluster(ObjectRef::new(cluster));
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat Lease watch error (retrying)");
                    c.open_gap(Instant::now(), "heartbeat watch failed");
                }
            }
        }
    });

    let (c, sy) = (ctx.clone(), synced.clone());
    let mut seen: HashMap<String, NodeInfo> = HashMap::new();
    let nodes = nodes.for_each(move |ev| {
        c.metrics.set_watched_objects("Node", c.stores.nodes.len());
        if sy.note(4, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        let changed = match &ev {
            Ok(watcher::Event::InitDone) => !drop_unlisted(&mut seen, &c.stores.nodes).is_empty(),
            Ok(ev) => object(ev).is_some_and(|n| {
                let deleted = matches!(ev, watcher::Event::Delete(_));
                let before = if deleted {
                    seen.remove(&n.name_any())
                } else {
                    seen.insert(n.name_any(), n.info.clone())
                };
                deleted || before.as_ref() != Some(&n.info)
            }),
            Err(_) => false,
        };
        async move {
            match ev {
                Ok(_) if changed => c.trigger_everything(),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Node watch error (retrying)"),
            }
        }
    });

    futures::join!(services, clusters, service_leases, heartbeat_leases, nodes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_when_the_last_of_five_watches_has_listed() {
        let synced = Synced::default();
        let done: Result<watcher::Event<WatchedNode>, watcher::Error> =
            Ok(watcher::Event::InitDone);
        let other: Result<watcher::Event<WatchedNode>, watcher::Error> = Ok(watcher::Event::Init);
        assert!(!synced.note(4, &other));
        for bit in 0..4 {
            assert!(!synced.note(bit, &done), "watch {bit} alone is not all");
        }
        assert!(!synced.note(3, &done), "the same watch twice is not all");
        assert!(synced.note(4, &done), "the fifth completes it");
        assert!(
            !synced.note(4, &done),
            "a re-list later is not a second time"
        );
        assert!(!synced.note(0, &done));
    }

    #[test]
    fn what_a_relist_no_longer_shows_is_dropped() {
        let (stores, mut w) = crate::context::testing::stores();
        let node = |name: &str| WatchedNode {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            info: NodeInfo::default(),
        };
        w.nodes
            .apply_watcher_event(&watcher::Event::Apply(node("node-1")));
        let mut seen: HashMap<String, NodeInfo> = ["node-1", "node-2"]
            .into_iter()
            .map(|n| (n.to_owned(), NodeInfo::default()))
            .collect();
        assert_eq!(drop_unlisted(&mut seen, &stores.nodes), vec!["node-2"]);
        assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["node-1"]);
    }

    /// Waits (a little) until `done`.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn a_delete_or_a_relist_frees_what_was_kept_for_the_object() {
        use crate::context::testing::{cluster, ctx, service, stores};
        use futures::channel::mpsc;
        use kube::runtime::reflector::reflector;
        use watcher::Event::*;

        type Tx<K> = mpsc::UnboundedSender<Result<watcher::Event<K>, watcher::Error>>;
        fn list<K>(tx: &Tx<K>, objects: Vec<K>) {
            tx.unbounded_send(Ok(Init)).unwrap();
            for o in objects {
                tx.unbounded_send(Ok(InitApply(o))).unwrap();
            }
            tx.unbounded_send(Ok(InitDone)).unwrap();
        }

        let (stores, w) = stores();
        let ctx = Arc::new(ctx(stores));
        let (services, s1) = mpsc::unbounded();
        let (clusters, s2) = mpsc::unbounded();
        let (service_leases, s3) = mpsc::unbounded();
        let (heartbeat_leases, s4) = mpsc::unbounded();
        let (nodes, s5) = mpsc::unbounded();
        let streams = Streams {
            services: reflector(w.services, s1).boxed(),
            clusters: reflector(w.clusters, s2).boxed(),
            service_leases: reflector(w.service_leases, s3).boxed(),
            heartbeat_leases: reflector(w.heartbeat_leases, s4).boxed(),
            nodes: reflector(w.nodes, s5).boxed(),
        };
        let task = tokio::spawn(dispatch(ctx.clone(), streams));

        let (web, db) = (service("app", "web", "demo"), service("app", "db", "demo"));
        list(&services, vec![web.clone(), db.clone()]);
        list(&clusters, vec![cluster("demo"), cluster("other")]);
        list(&service_leases, vec![]);
        list(&heartbeat_leases, vec![]);
        list(&nodes, vec![]);
        eventually("ready", || ctx.is_ready()).await;
        for key in ["app/web", "app/db"] {
            ctx.with_service_memory(key, |_| ());
        }
        ctx.touch_cluster("demo");
        ctx.touch_cluster("other");

        services.unbounded_send(Ok(Delete(web))).unwrap();
        eventually("web forgotten", || !ctx.keeps_service("app/web")).await;
        assert!(ctx.keeps_service("app/db"));

        clusters
            .unbounded_send(Ok(Delete(cluster("other"))))
            .unwrap();
        eventually("other forgotten", || ctx.keeps_cluster("other") == 0).await;
        assert_eq!(ctx.keeps_cluster("demo"), 3);

        // db goes while the watch is down: the re-list does not show it,
        // and demo, deleted meanwhile too, has no service left.
        list(&services, vec![]);
        eventually("db forgotten", || !ctx.keeps_service("app/db")).await;
        assert_eq!(ctx.keeps_cluster("demo"), 3, "demo still exists");
        list(&clusters, vec![]);
        eventually("demo forgotten", || ctx.keeps_cluster("demo") == 0).await;
        let text = ctx.metrics.encode(&ctx.stores.services);
        for line in [
            "kubeha_operator_watched_objects{kind=\"HAService\"} 0\n",
            "kubeha_operator_watched_objects{kind=\"HACluster\"} 0\n",
            "kubeha_operator_memory_entries{map=\"service\"} 0\n",
            "kubeha_operator_memory_entries{map=\"cluster\"} 0\n",
            "kubeha_operator_memory_entries{map=\"heartbeat_view\"} 0\n",
            "kubeha_operator_memory_entries{map=\"first_seen\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }

        drop((services, clusters, service_leases, heartbeat_leases, nodes));
        task.await.unwrap();
    }
}
