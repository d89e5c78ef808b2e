//! Which clusters this node is a member of, and their heartbeats: the own
//! Node's labels, the renewer task per cluster, the view of a cluster the
//! transitions use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use kubeha_crds::HACluster;
use tokio::sync::mpsc;

use super::{Shared, fenced_flag};
use crate::assignments::{self, Membership};
use crate::heartbeat::{self, Timing};
use crate::transitions::TransitionCluster;

/// What the agent knows of its own Node object.
pub(super) struct OwnNode {
    name: String,
    /// Its labels; `None` when there is no such Node (or not known yet).
    labels: Option<BTreeMap<String, String>>,
    /// Whether the Node watch has listed once.
    known: bool,
}

impl OwnNode {
    pub(super) fn read(store: &Store<KubeNode>, name: &str, synced: &AtomicBool) -> Self {
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

    pub(super) fn membership(&self, cluster: &HACluster) -> Membership {
        assignments::membership(cluster, &self.name, self.labels.as_ref(), self.known)
    }
}

/// The clusters this node is a member of, with their membership (members
/// and, with `undecided`, those whose selector membership is not known yet).
pub(super) fn member_of<'a>(
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

pub(super) fn sync_heartbeats(
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
            let exclusive = match m {
                Membership::Member(mode) if mode.is_exclusive() => Some(mode),
                _ => None,
            };
            wanted.insert(c.name_any(), (Timing::from(&c.spec.heartbeat), exclusive));
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
    for (name, (timing, exclusive)) in wanted {
        // The mode reaches the renew loop through the beat: no restart.
        shared.beats.set_timing(&name, timing, exclusive);
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

pub(super) fn cluster_view(shared: &Shared, cluster: &HACluster) -> TransitionCluster {
    let name = cluster.name_any();
    // The hook runner checks every run against the cluster's policy and
    // fetches ConfigMap sources itself (hooks::sources).
    let runner = &shared.node.runner;
    runner.configure_sources(crate::hooks::SourceRoots {
        hook_root: shared.config.hook_root.clone(),
        state_dir: shared.config.state_dir.clone(),
        operator_namespace: shared.config.namespace.clone(),
        client: Some(shared.client.clone()),
    });
    runner.set_hook_policy(&name, &cluster.spec.allowed_hook_sources);
    TransitionCluster {
        members: kubeha_crds::roles::known_members(cluster),
        beat: shared.beats.get(&name),
        fenced: fenced_flag(shared, &name),
        name,
    }
}

/// The view of cluster `name` after its HACluster was deleted, for leaving
/// the services this node still runs for it: no members; the hook runner
/// keeps the cluster's last hook policy, so the leave scripts still run.
pub(super) fn deleted_cluster_view(shared: &Shared, name: &str) -> TransitionCluster {
    TransitionCluster {
        members: Vec::new(),
        beat: shared.beats.get(name),
        fenced: fenced_flag(shared, name),
        name: name.to_owned(),
    }
}
