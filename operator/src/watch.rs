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
//! | HACluster | - | the cluster; its services when the spec changed |
//! | Lease, all namespaces | `kubeha.io/lease=service` | the service named by `kubeha.io/service` |
//! | Lease, operator namespace | `kubeha.io/lease=heartbeat` | heartbeat view; cluster and services when a member's state changed |
//! | Node | - | every cluster and service when cordon, labels or addresses changed |

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use kubeha_crds::{HACluster, HAService, leases};

use crate::context::Ctx;
use crate::heartbeat_view::{Fingerprint, Timing};
use crate::members::NodeInfo;

/// The reflector stores the controllers read.
#[derive(Clone)]
pub struct Stores {
    /// Every HAService.
    pub services: Store<HAService>,
    /// Every HACluster.
    pub clusters: Store<HACluster>,
    /// Service Leases (every namespace).
    pub service_leases: Store<Lease>,
    /// Heartbeat Leases (operator namespace).
    pub heartbeat_leases: Store<Lease>,
    /// Nodes.
    pub nodes: Store<Node>,
}

type Events<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// The reflected event streams; [`dispatch`] drives them.
pub struct Streams {
    services: Events<HAService>,
    clusters: Events<HACluster>,
    service_leases: Events<Lease>,
    heartbeat_leases: Events<Lease>,
    nodes: Events<Node>,
}

/// Starts the watches (lazily: nothing runs until [`dispatch`] polls them).
pub fn start(client: &Client, namespace: &str) -> (Stores, Streams) {
    let (services, s1) =
        kubeha_runtime::watch::reflect::<HAService>(client, None, watcher::Config::default());
    let (clusters, s2) =
        kubeha_runtime::watch::reflect::<HACluster>(client, None, watcher::Config::default());
    let (service_leases, s3) = kubeha_runtime::watch::reflect::<Lease>(
        client,
        None,
        watcher::Config::default().labels(&leases::service_lease_selector()),
    );
    let (heartbeat_leases, s4) = kubeha_runtime::watch::reflect::<Lease>(
        client,
        Some(namespace),
        watcher::Config::default().labels(&leases::heartbeat_lease_selector()),
    );
    let (nodes, s5) =
        kubeha_runtime::watch::reflect::<Node>(client, None, watcher::Config::default());
    (
        Stores {
            services,
            clusters,
            service_leases,
            heartbeat_leases,
            nodes,
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

/// What of a Node matters to placement and validation.
fn node_fingerprint(node: &Node) -> NodeInfo {
    NodeInfo::of(node)
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

/// Marks the operator ready and reconciles everything once.
fn became_ready(ctx: &Ctx) {
    ctx.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!("watches synced");
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
        if sy.note(0, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        async move {
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
    let mut generations: HashMap<String, Option<i64>> = HashMap::new();
    let clusters = clusters.for_each(move |ev| {
        if sy.note(1, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        let changed = match &ev {
            Ok(ev) => object(ev).is_some_and(|cl| {
                let deleted = matches!(ev, watcher::Event::Delete(_));
                let before = generations.insert(cl.name_any(), cl.metadata.generation);
                if deleted {
                    generations.remove(&cl.name_any());
                }
                deleted || before != Some(cl.metadata.generation)
            }),
            Err(_) => false,
        };
        async move {
            match ev {
                Ok(ev) => {
                    if let Some(cl) = object(&ev) {
                        let name = cl.name_any();
                        c.set_timing(&name, Timing::from(&cl.spec.heartbeat));
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
        if sy.note(2, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        async move {
            match ev {
                Ok(ev) => {
                    if let Some(lease) = object(&ev)
                        && let (Some(ns), Some(svc)) =
                            (lease.namespace(), lease.labels().get(leases::SERVICE_LABEL))
                    {
                        c.trigger_service(ObjectRef::new(svc).within(&ns));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "service Lease watch error (retrying)"),
            }
        }
    });

    let (c, sy) = (ctx.clone(), synced.clone());
    let heartbeat_leases = heartbeat_leases.for_each(move |ev| {
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
                    let labels = lease.labels();
                    let (Some(cluster), Some(node)) = (
                        labels.get(leases::CLUSTER_LABEL),
                        labels.get(leases::NODE_LABEL),
                    ) else {
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
        if sy.note(4, &ev) {
            became_ready(&c);
        }
        let c = c.clone();
        let changed = match &ev {
            Ok(ev) => object(ev).is_some_and(|n| {
                let info = node_fingerprint(n);
                let deleted = matches!(ev, watcher::Event::Delete(_));
                let before = if deleted {
                    seen.remove(&n.name_any())
                } else {
                    seen.insert(n.name_any(), info.clone())
                };
                deleted || before.as_ref() != Some(&info)
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
        let done: Result<watcher::Event<Node>, watcher::Error> = Ok(watcher::Event::InitDone);
        let other: Result<watcher::Event<Node>, watcher::Error> = Ok(watcher::Event::Init);
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
}
