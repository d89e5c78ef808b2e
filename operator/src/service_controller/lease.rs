//! The service Lease: building it from a decision, writing it (create, adopt an
//! unlabelled one, or replace at a resourceVersion), and the fresh heartbeat
//! reads that confirm a node is gone before its clearance is dropped.

use std::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use kubeha_crds::annotations::node_scope_label;
use kubeha_crds::validate::Claim;
use kubeha_crds::{HAService, leases};
use serde_json::json;

use crate::context::{Ctx, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::handover::{CLEARED_NODE_ANNOTATION, LeaseState};
use crate::heartbeat_view::Fingerprint;

/// Confirms with a fresh read that `node`'s heartbeat really stopped: if
/// its Lease changed since the watch last showed it (a stalled watch), the
/// change is observed now and `true` is returned. `decided` is when the
/// plan to confirm was made: a read begun since then serves (see
/// [`HeartbeatReads`]).
pub(super) async fn heartbeat_moved(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
    decided: Instant,
) -> Result<bool> {
    let (moved, _) = refresh_heartbeat(ctx, cluster, node, decided).await?;
    if moved {
        tracing::warn!(%cluster, %node, "heartbeat Lease changed although the watch showed none: not fenced");
    }
    Ok(moved)
}

/// Reads `node`'s heartbeat Lease afresh and records it in the view when
/// it differs from what the watch showed: whether it did, and the Lease's
/// `renewTime` as read. A read of the same Lease begun at or after
/// `decided` (another service's, in flight or just done) is shared.
pub(super) async fn refresh_heartbeat(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
    decided: Instant,
) -> Result<(bool, Option<String>)> {
    let read = ctx.heartbeat_reads.since(cluster, node, decided);
    // Its failure too is shared: every sharer retries with backoff, none
    // runs the read again in turn behind the others.
    read.outcome
        .get_or_init(|| async {
            read_heartbeat(ctx, cluster, node)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .clone()
        .map_err(Error::HeartbeatRead)
}

async fn read_heartbeat(ctx: &Ctx, cluster: &str, node: &str) -> Result<(bool, Option<String>)> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let Some(lease) = api
        .get_opt(&leases::heartbeat_lease_name(cluster, node))
        .await?
    else {
        return Ok((false, None));
    };
    let fp = Fingerprint::of(&lease);
    let renewed = fp.renew_time.clone();
    let moved = ctx.with_view(cluster, |v| {
        if v.fingerprint(node) == Some(&fp) {
            false
        } else {
            v.observe(node, fp, Instant::now());
            true
        }
    });
    Ok((moved, renewed))
}

/// Fresh heartbeat reads, one per (cluster, node) at a time. After a
/// power-off every service the lost node held confirms the same heartbeat
/// (and its new holder's) before its Lease write: 50 services made 100
/// reads of two Leases, each a round trip to an API server already loaded
/// by the failover. A reconcile that decided before a read began takes
/// that read's outcome: it is as fresh as one of its own (`true` still
/// means the view it decided on was behind). Reads older than
/// [`HeartbeatReads::KEPT`] are dropped, so clusters and nodes that went
/// leave nothing behind.
#[derive(Default)]
pub struct HeartbeatReads {
    reads: std::sync::Mutex<
        std::collections::HashMap<(String, String), std::sync::Arc<HeartbeatRead>>,
    >,
}

/// One fresh read of a heartbeat Lease: when it began, and its outcome
/// once there is one (a failure as its message).
pub(crate) struct HeartbeatRead {
    began: Instant,
    outcome: tokio::sync::OnceCell<std::result::Result<(bool, Option<String>), String>>,
}

impl HeartbeatReads {
    /// How long a read is kept for sharing.
    const KEPT: std::time::Duration = std::time::Duration::from_secs(10);

    /// The read of `node`'s heartbeat in `cluster` begun at or after
    /// `decided`, or a new one (begun now).
    fn since(&self, cluster: &str, node: &str, decided: Instant) -> std::sync::Arc<HeartbeatRead> {
        let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
        let key = (cluster.to_owned(), node.to_owned());
        if let Some(read) = reads.get(&key)
            && read.began >= decided
        {
            return read.clone();
        }
        let now = Instant::now();
        reads.retain(|_, r| now.duration_since(r.began) < Self::KEPT);
        let read = std::sync::Arc::new(HeartbeatRead {
            began: now,
            outcome: tokio::sync::OnceCell::new(),
        });
        reads.insert(key, read.clone());
        read
    }
}

/// The outcome of a Lease write.
pub(super) enum Written {
    Done,
    /// Someone else changed the Lease since it was read: decide again.
    Conflict,
}

/// The service Lease as the operator writes it, in the operator's
/// `namespace`: `current` (or a new one) with the kubeha labels (the
/// HAService's namespace, name and UID), the annotations of `state`,
/// `holderIdentity` = master and `leaseTransitions` = epoch; `acquireTime` moves to `now` when the holder changes. Other fields
/// of `current` (resourceVersion, foreign labels and annotations) are kept.
/// It carries the node-scope label of every node it names, of the nodes
/// in `waiting_on` (the handover's, [`crate::handover::Progress::waiting_on`])
/// and of the nodes it stops naming until they report its epoch.
/// Pure: this is exactly what the agents read (see `tests/agent_protocol.rs`).
pub fn service_lease(
    current: Option<&Lease>,
    namespace: &str,
    svc: &HAService,
    state: &LeaseState,
    holder_changed: bool,
    waiting_on: &[String],
    now: jiff::Timestamp,
) -> Lease {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(leases::service_lease_name(
                &svc.namespace().unwrap_or_default(),
                &svc.name_any(),
            )),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: None,
    });
    lease
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .extend(service_lease_labels(svc));
    let annotations = lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    if state.cleared_node.is_none() {
        annotations.remove(CLEARED_NODE_ANNOTATION);
    }
    annotations.extend(state.annotations());
    // The VIP claim is the claim Lease's ([`claim_lease`]); an older
    // operator wrote it here.
    annotations.remove(leases::VIPS_ANNOTATION);
    annotations.remove(leases::SERVICE_CREATED_ANNOTATION);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = state.holder.clone();
    spec.lease_transitions = Some(state.lease_transitions());
    if holder_changed {
        spec.acquire_time = Some(MicroTime(now));
    }
    // Each agent watches only the Leases labelled for its node: label the
    // nodes this Lease names, those whose proof the handover waits for (a
    // node it cannot attribute a clearance to proves it moved on by
    // reporting the epoch it sees), and those it stopped naming until they
    // report its epoch. A Lease that leaves a node's watch reads there as
    // "no role" at the last epoch the node saw.
    let waited_on = waiting_on.iter().map(|n| node_scope_label(n));
    let dropped = dropped_unacknowledged(current, svc, state.epoch);
    leases::set_scope_labels(&mut lease, waited_on.chain(dropped));
    lease
}

/// The node-scope labels of `current` whose node has not reported `epoch`
/// on `svc` yet (no status entry maps to the label at `epoch` or later): a
/// Lease that stops naming a node stays shown to it until it reports the
/// Lease's epoch (role none), so a node dropped at an epoch learns that
/// epoch, as it did when every agent saw every Lease. The label goes with
/// the next write after that report; no write is made for it alone. A node
/// that never reports again (powered off, removed) keeps its label: it
/// learns the epoch if it comes back.
fn dropped_unacknowledged(current: Option<&Lease>, svc: &HAService, epoch: i64) -> Vec<String> {
    let Some(current) = current else {
        return Vec::new();
    };
    let reported: std::collections::BTreeSet<String> = svc
        .status
        .iter()
        .flat_map(|s| &s.nodes)
        .filter(|n| n.epoch.is_some_and(|e| e >= epoch))
        .map(|n| node_scope_label(&n.node))
        .collect();
    leases::scope_labels_of(current)
        .into_iter()
        .filter(|l| !reported.contains(l))
        .collect()
}

/// `svc`'s VIP claim Lease as the operator writes it (server-side apply,
/// in the operator's `namespace`): the kubeha labels of the service
/// Lease with kind [`leases::CLAIM`], and the claim annotations (its VIP
/// addresses and creation time). Every agent watches these (they see only
/// the HAServices and service Leases of their own node) to refuse an
/// assignment of a VIP an older service claims. Pure.
pub fn claim_lease(namespace: &str, svc: &HAService) -> Lease {
    let mut labels = service_lease_labels(svc);
    labels.insert(
        leases::LEASE_KIND_LABEL.to_owned(),
        leases::CLAIM.to_owned(),
    );
    Lease {
        metadata: ObjectMeta {
            name: Some(leases::claim_lease_name(
                &svc.namespace().unwrap_or_default(),
                &svc.name_any(),
            )),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(
                leases::claim_annotations(&Claim::of(
                    String::new(),
                    svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    &svc.spec,
                ))
                .into_iter()
                .collect(),
            ),
            ..Default::default()
        },
        spec: Some(LeaseSpec::default()),
    }
}

/// Whether `current` (the claim Lease as the watch shows it) already says
/// what [`claim_lease`] would write for `svc`: its claim is written when
/// the service is created and again only when its VIPs change (a claim
/// left stale by a VIP edit would make every agent refuse a newer service
/// that takes the address the older one gave up).
pub fn claim_is_current(current: Option<&Lease>, want: &Lease) -> bool {
    let Some(current) = current else {
        return false;
    };
    let has_all = |want: &Option<std::collections::BTreeMap<String, String>>,
                   have: &Option<std::collections::BTreeMap<String, String>>| {
        want.iter()
            .flatten()
            .all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    has_all(&want.metadata.labels, &current.metadata.labels)
        && has_all(&want.metadata.annotations, &current.metadata.annotations)
}

/// Writes `svc`'s claim Lease ([`claim_lease`]) unless the store shows it
/// current: one server-side apply, creating it or bringing it up to date.
pub(super) async fn write_claim(ctx: &Ctx, svc: &HAService) -> Result<()> {
    let want = claim_lease(&ctx.namespace, svc);
    let current = ctx.stores.claim_lease(svc);
    if claim_is_current(current.as_deref(), &want) {
        return Ok(());
    }
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut body = serde_json::to_value(&want)?;
    body["apiVersion"] = json!("coordination.k8s.io/v1");
    body["kind"] = json!("Lease");
    api.patch(
        &want.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    ctx.metrics.lease_written();
    Ok(())
}

pub(super) async fn write_lease(
    ctx: &Ctx,
    svc: &HAService,
    current: Option<&Lease>,
    state: &LeaseState,
    holder_changed: bool,
    waiting_on: &[String],
    holder_renew: Option<String>,
) -> Result<Written> {
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    let name = leases::service_lease_name(&ns, &svc.name_any());
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut lease = service_lease(
        current,
        &ctx.namespace,
        svc,
        state,
        holder_changed,
        waiting_on,
        jiff::Timestamp::now(),
    );
    // The holder's heartbeat as seen now (as just read, else as the view
    // shows it): an agent back from a fence enters only on a Lease written
    // after its return.
    if let Some(holder) = &state.holder
        && let Some(renewed) = holder_renew.or_else(|| {
            ctx.with_view(&svc.spec.cluster_ref, |v| {
                v.fingerprint(holder).and_then(|f| f.renew_time.clone())
            })
        })
    {
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(leases::HOLDER_RENEW_ANNOTATION.to_owned(), renewed);
    }
    // A new holder's agent must see the service (its node-scope label)
    // no later than the Lease that names it: label it first. A standby
    // not labelled yet is left to the scope pass (`crate::scope::run`,
    // within a second): until then it just takes no role, and the next
    // services' failovers do not wait for its label. Hiding or showing a
    // service never makes a node enter: only the Lease does.
    let fields = leases::ServiceLeaseFields::read(&lease);
    let scope = crate::scope::scope_labels(svc);
    let unlabelled = |n: &Option<String>| {
        n.as_deref()
            .filter(|n| !scope.contains(&node_scope_label(n)))
            .map(str::to_owned)
    };
    let (holder_unlabelled, standby_unlabelled) =
        (unlabelled(&fields.holder), unlabelled(&fields.standby));
    if holder_unlabelled.is_some() {
        // With the standby: one patch for both.
        let nodes: Vec<&str> = [&holder_unlabelled, &standby_unlabelled]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        crate::scope::label_nodes(ctx, svc, &nodes).await?;
    }
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    let result = if current.is_some() {
        api.replace(&name, &params, &lease).await
    } else {
        lease.metadata.resource_version = None;
        api.create(&params, &lease).await
    };
    match result {
        Ok(_) => {
            ctx.metrics.lease_written();
            Ok(Written::Done)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            if current.is_none() {
                adopt_unlabelled_lease(&api, &name, svc).await?;
            }
            Ok(Written::Conflict)
        }
        Err(e) => Err(e.into()),
    }
}

/// The labels of `svc`'s Lease: its kind, cluster, and the HAService's
/// namespace, name and UID.
fn service_lease_labels(svc: &HAService) -> std::collections::BTreeMap<String, String> {
    [
        (leases::LEASE_KIND_LABEL, leases::SERVICE.to_owned()),
        (leases::CLUSTER_LABEL, svc.spec.cluster_ref.clone()),
        (
            leases::SERVICE_NAMESPACE_LABEL,
            svc.namespace().unwrap_or_default(),
        ),
        (leases::SERVICE_LABEL, svc.name_any()),
        (leases::SERVICE_UID_LABEL, svc.uid().unwrap_or_default()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Deletes `svc`'s service Lease, then its claim Lease, once the service
/// is stopped everywhere and its finalizer is about to go: a Lease in
/// another namespace cannot be owned by the HAService, so garbage
/// collection would never remove them.
pub(super) async fn delete_leases(ctx: &Ctx, svc: &HAService) -> Result<()> {
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for name in [
        leases::service_lease_name(&ns, &svc.name_any()),
        leases::claim_lease_name(&ns, &svc.name_any()),
    ] {
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A Lease of that name exists but the watch (by label) does not show it:
/// label it (nothing else) so the next reconcile sees it and decides on
/// what it says.
pub(super) async fn adopt_unlabelled_lease(
    api: &Api<Lease>,
    name: &str,
    svc: &HAService,
) -> Result<()> {
    let labels = service_lease_labels(svc);
    // Usually a Lease this operator just created, not in its store yet (a
    // reconcile of the same service soon after the create): nothing to do.
    if let Some(lease) = api.get_opt(name).await?
        && labels.iter().all(|(k, v)| lease.labels().get(k) == Some(v))
    {
        return Ok(());
    }
    let patch = json!({ "metadata": { "labels": labels } });
    tracing::warn!(
        lease = name,
        "a service Lease exists without the kubeha labels: labelling it"
    );
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    api.patch(name, &params, &Patch::Merge(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeha_crds::testing::service_spec;

    fn svc(vips: &[&str]) -> HAService {
        let mut svc = HAService::new("web", service_spec("c", vips));
        svc.metadata.namespace = Some("default".into());
        svc
    }

    #[test]
    fn a_heartbeat_read_is_shared_only_with_reconciles_that_decided_before_it_began() {
        let reads = HeartbeatReads::default();
        let decided = Instant::now();
        let first = reads.since("c", "n1", decided);
        // Decided before the read began: the same read.
        assert!(std::sync::Arc::ptr_eq(
            &first,
            &reads.since("c", "n1", decided)
        ));
        // Another node, another cluster: other reads.
        assert!(!std::sync::Arc::ptr_eq(
            &first,
            &reads.since("c", "n2", decided)
        ));
        assert!(!std::sync::Arc::ptr_eq(
            &first,
            &reads.since("d", "n1", decided)
        ));
        // Decided after it began: a read of its own, which later callers share.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = Instant::now();
        let second = reads.since("c", "n1", later);
        assert!(!std::sync::Arc::ptr_eq(&first, &second));
        assert!(std::sync::Arc::ptr_eq(
            &second,
            &reads.since("c", "n1", decided)
        ));
    }

    #[test]
    fn a_claim_is_written_when_missing_or_stale_and_not_again_when_current() {
        let claim = claim_lease("kubeha-system", &svc(&["198.18.0.10/24"]));
        assert_eq!(claim.name_any(), "kubeha-claim-default.web");
        assert_eq!(
            claim.labels()[leases::LEASE_KIND_LABEL],
            leases::CLAIM,
            "a claim, not a service Lease: no agent takes a role from it"
        );
        assert_eq!(claim.annotations()[leases::VIPS_ANNOTATION], "198.18.0.10");
        let read = leases::claim_of(&claim).expect("a claim");
        assert_eq!(read.key, "default/web");
        assert!(!claim_is_current(None, &claim));
        assert!(claim_is_current(Some(&claim), &claim));
        // A VIP edit makes it stale.
        let edited = claim_lease("kubeha-system", &svc(&["198.18.0.11/24"]));
        assert!(!claim_is_current(Some(&claim), &edited));
        // Extra fields on the stored copy do not.
        let mut stored = claim.clone();
        stored.labels_mut().insert("other".into(), "x".into());
        assert!(claim_is_current(Some(&stored), &claim));
    }

    #[test]
    fn a_service_lease_carries_no_claim_and_is_labelled_for_the_nodes_it_names() {
        let mut old = service_lease(
            None,
            "kubeha-system",
            &svc(&["198.18.0.10/24"]),
            &LeaseState::default(),
            false,
            &[],
            jiff::Timestamp::UNIX_EPOCH,
        );
        // As an older operator wrote it: the claim, and a node it named.
        old.annotations_mut()
            .insert(leases::VIPS_ANNOTATION.into(), "198.18.0.10".into());
        old.labels_mut()
            .insert("node.kubeha.io/gone".into(), "true".into());
        let state = LeaseState {
            holder: Some("n1".into()),
            standby: Some("n2".into()),
            ..Default::default()
        };
        // The node it named has reported this epoch: its label goes.
        let mut service = svc(&["198.18.0.10/24"]);
        service.status = Some(kubeha_crds::HAServiceStatus {
            nodes: vec![kubeha_crds::testing::status_entry(
                "gone",
                kubeha_crds::service::Role::None,
                kubeha_crds::service::NodeServiceState::Stopped,
                0,
                None,
            )],
            ..Default::default()
        });
        let lease = service_lease(
            Some(&old),
            "kubeha-system",
            &service,
            &state,
            true,
            &["n3".into()],
            jiff::Timestamp::UNIX_EPOCH,
        );
        assert!(!lease.annotations().contains_key(leases::VIPS_ANNOTATION));
        assert_eq!(
            leases::scope_labels_of(&lease)
                .into_iter()
                .collect::<Vec<_>>(),
            [
                "node.kubeha.io/n1",
                "node.kubeha.io/n2",
                "node.kubeha.io/n3"
            ],
            "the named nodes and the one the handover waits on"
        );
    }

    #[test]
    fn a_node_the_lease_stops_naming_sees_it_until_it_reports_its_epoch() {
        use kubeha_crds::service::{NodeServiceState, Role};
        use kubeha_crds::testing::status_entry;
        let labels = |l: &Lease| leases::scope_labels_of(l).into_iter().collect::<Vec<_>>();
        let mut service = svc(&["198.18.0.10/24"]);
        let at = |holder: &str, standby: &str, epoch| LeaseState {
            holder: Some(holder.into()),
            standby: Some(standby.into()),
            epoch,
            ..Default::default()
        };
        let write = |current: Option<&Lease>, service: &HAService, state: &LeaseState| {
            service_lease(
                current,
                "kubeha-system",
                service,
                state,
                true,
                &[],
                jiff::Timestamp::UNIX_EPOCH,
            )
        };
        let first = write(None, &service, &at("n1", "n2", 1));
        assert_eq!(labels(&first), ["node.kubeha.io/n1", "node.kubeha.io/n2"]);
        service.status = Some(kubeha_crds::HAServiceStatus {
            nodes: vec![
                status_entry("n1", Role::Master, NodeServiceState::Running, 1, None),
                status_entry("n2", Role::Vicemaster, NodeServiceState::Stopped, 1, None),
                status_entry("n3", Role::None, NodeServiceState::Stopped, 0, None),
            ],
            ..Default::default()
        });
        // Moved to n3 at epoch 2: n2 has not seen epoch 2 yet.
        let moved = write(Some(&first), &service, &at("n3", "n1", 2));
        assert_eq!(
            labels(&moved),
            [
                "node.kubeha.io/n1",
                "node.kubeha.io/n2",
                "node.kubeha.io/n3"
            ],
            "n2, dropped at epoch 2, still sees the Lease"
        );
        // Still not reported: kept on the next write of the same epoch.
        let again = write(Some(&moved), &service, &at("n3", "n1", 2));
        assert!(labels(&again).contains(&"node.kubeha.io/n2".to_owned()));
        // A node that has not reported at all is kept the same way.
        let mut unreported = service.clone();
        unreported.status.as_mut().unwrap().nodes.remove(1);
        let again = write(Some(&again), &unreported, &at("n3", "n1", 2));
        assert!(labels(&again).contains(&"node.kubeha.io/n2".to_owned()));
        // Reported (role none at epoch 2): the next write drops it.
        service.status.as_mut().unwrap().nodes[1] =
            status_entry("n2", Role::None, NodeServiceState::Stopped, 2, None);
        let after = write(Some(&again), &service, &at("n3", "n1", 2));
        assert_eq!(labels(&after), ["node.kubeha.io/n1", "node.kubeha.io/n3"]);
    }
}
