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
/// change is observed now and `true` is returned.
pub(super) async fn heartbeat_moved(ctx: &Ctx, cluster: &str, node: &str) -> Result<bool> {
    let (moved, _) = refresh_heartbeat(ctx, cluster, node).await?;
    if moved {
        tracing::warn!(%cluster, %node, "heartbeat Lease changed although the watch showed none: not fenced");
    }
    Ok(moved)
}

/// Reads `node`'s heartbeat Lease afresh and records it in the view when
/// it differs from what the watch showed: whether it did, and the Lease's
/// `renewTime` as read.
pub(super) async fn refresh_heartbeat(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
) -> Result<(bool, Option<String>)> {
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
/// Pure: this is exactly what the agents read (see `tests/agent_protocol.rs`).
pub fn service_lease(
    current: Option<&Lease>,
    namespace: &str,
    svc: &HAService,
    state: &LeaseState,
    holder_changed: bool,
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
    // The service's VIP claim, for the agents' re-check (they do not see
    // every HAService, but every service Lease).
    annotations.extend(leases::claim_annotations(&Claim::of(
        String::new(),
        svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        &svc.spec,
    )));
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = state.holder.clone();
    spec.lease_transitions = Some(state.lease_transitions());
    if holder_changed {
        spec.acquire_time = Some(MicroTime(now));
    }
    lease
}

/// The annotations that bring `current`'s VIP claim up to `svc`'s spec,
/// when they differ: a service Lease is written again only when its
/// assignment changes, and a claim left stale by a VIP edit (the holder
/// kept) would make every agent refuse a newer service that takes the
/// address the older one gave up.
pub(super) fn stale_claim(current: &Lease, svc: &HAService) -> Option<serde_json::Value> {
    let want = leases::claim_annotations(&Claim::of(
        String::new(),
        svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        &svc.spec,
    ));
    let have = current.metadata.annotations.as_ref();
    let stale = want
        .iter()
        .any(|(k, v)| have.and_then(|a| a.get(k)) != Some(v));
    stale.then(|| {
        let annotations: serde_json::Map<String, serde_json::Value> = want
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        json!({"metadata": {"annotations": annotations}})
    })
}

/// Writes the VIP claim annotations of [`stale_claim`] onto the service
/// Lease `name` (a merge patch of those annotations only: the assignment
/// and the holder's renew mark stay as they are).
pub(super) async fn refresh_claim(ctx: &Ctx, name: &str, patch: &serde_json::Value) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    api.patch(name, &params, &Patch::Merge(patch)).await?;
    ctx.metrics.lease_written();
    Ok(())
}

pub(super) async fn write_lease(
    ctx: &Ctx,
    svc: &HAService,
    current: Option<&Lease>,
    state: &LeaseState,
    holder_changed: bool,
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
    // not labelled yet is labelled right after the write (it is not on
    // the failover path; until then it just takes no role). Hiding or
    // showing a service never makes a node enter: only the Lease does.
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
            if holder_unlabelled.is_none()
                && let Some(standby) = &standby_unlabelled
                && let Err(e) = crate::scope::label_nodes(ctx, svc, &[standby]).await
            {
                // The scope pass labels it within a second.
                tracing::debug!(%standby, error = %e, "could not label the standby");
            }
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

/// Deletes `svc`'s Lease once the service is stopped everywhere and its
/// finalizer is about to go: a Lease in another namespace cannot be owned
/// by the HAService, so garbage collection would never remove it.
pub(super) async fn delete_lease(ctx: &Ctx, svc: &HAService) -> Result<()> {
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match api
        .delete(
            &leases::service_lease_name(&ns, &svc.name_any()),
            &Default::default(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A Lease of that name exists but the watch (by label) does not show it:
/// label it (nothing else) so the next reconcile sees it and decides on
/// what it says.
pub(super) async fn adopt_unlabelled_lease(
    api: &Api<Lease>,
    name: &str,
    svc: &HAService,
) -> Result<()> {
    let patch = json!({ "metadata": { "labels": service_lease_labels(svc) } });
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
    fn a_claim_left_stale_by_a_vip_edit_is_refreshed_and_a_current_one_is_not() {
        let lease = service_lease(
            None,
            "kubeha-system",
            &svc(&["198.18.0.10/24"]),
            &LeaseState::default(),
            false,
            jiff::Timestamp::UNIX_EPOCH,
        );
        assert_eq!(stale_claim(&lease, &svc(&["198.18.0.10/24"])), None);
        let patch = stale_claim(&lease, &svc(&["198.18.0.11/24"])).expect("stale");
        assert_eq!(
            patch["metadata"]["annotations"][leases::VIPS_ANNOTATION],
            "198.18.0.11"
        );
        // A Lease from an operator that wrote no claim gets one.
        let mut bare = lease.clone();
        bare.metadata.annotations = None;
        assert!(stale_claim(&bare, &svc(&["198.18.0.10/24"])).is_some());
    }
}
