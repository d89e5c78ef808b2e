//! Node scope: which nodes' agents see which HAService. Each agent watches
//! only the HAServices carrying its node-scope label
//! ([`kubeha_crds::annotations::node_scope_label`]), so a status write
//! reaches the operator and the few agents that need it instead of every
//! node (issue 11: the fan-out of HAService watch events saturated the API
//! server at 20 nodes and a few hundred services).
//!
//! A node needs a service while its service Lease names it (holder or
//! standby), while it is the node last cleared to enter (the operator waits
//! for its proof that it runs nothing), and while its status entry does not
//! show that it left (a role, a state other than `Stopped`, an unclean
//! epoch, or failures an admin's clear must reach). [`needed_nodes`] says
//! which; [`run`] adds the missing labels and removes the others, one
//! metadata merge patch per service under its own field manager.
//!
//! Order and safety: the Lease writer labels a new holder before the
//! Lease names it ([`label_nodes`], from `service_controller::lease`), so
//! the agent sees the service no later than its assignment. A label is
//! removed only after the node was not needed for [`REMOVAL_GRACE`] with
//! the service's Lease unchanged, so a store that lags a Lease write does
//! not hide a service from its new holder. Hiding a service can never make
//! two nodes hold a VIP: to its agent a service it does not see is one it
//! has no role in, which it leaves (if it held it) and never enters.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use kubeha_crds::annotations::{NODE_SCOPE_LABEL_VALUE, node_scope_label};
use kubeha_crds::service::{NodeServiceState, Role};
use kubeha_crds::{HAService, leases};
use serde_json::{Map, Value, json};

use crate::context::{Ctx, service_key};
use crate::error::{Error, Result};

/// Field manager of the node-scope labels.
pub const SCOPE_FIELD_MANAGER: &str = "kubeha-operator-scope";

/// How often [`run`] compares every service's labels with what it needs.
pub const PASS_INTERVAL: Duration = Duration::from_secs(1);

/// How long a node stays labelled after it was last needed, with the
/// service's Lease unchanged meanwhile.
pub const REMOVAL_GRACE: Duration = Duration::from_secs(10);

/// The nodes whose agents need to see `svc`, given its service Lease.
pub fn needed_nodes(svc: &HAService, lease: Option<&Lease>) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    if let Some(lease) = lease {
        nodes.extend(leases::named_nodes(lease));
    }
    if let Some(status) = &svc.status {
        nodes.extend(
            status
                .nodes
                .iter()
                .filter(|e| {
                    e.role != Role::None
                        || e.state != NodeServiceState::Stopped
                        || e.unclean_epoch.is_some()
                        || e.fail_count > 0
                })
                .map(|e| e.node.clone()),
        );
    }
    nodes
}

/// The node-scope labels `svc` carries now.
pub fn scope_labels(svc: &HAService) -> BTreeSet<String> {
    leases::scope_labels_of(svc)
}

/// The changes from the scope labels `current` to those of `needed`
/// nodes: labels to add and labels to remove.
pub fn label_changes(
    current: &BTreeSet<String>,
    needed: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let wanted: BTreeSet<String> = needed.iter().map(|n| node_scope_label(n)).collect();
    let add = wanted.difference(current).cloned().collect();
    let remove = current.difference(&wanted).cloned().collect();
    (add, remove)
}

/// The metadata merge patch that adds `add` and removes `remove`; `None`
/// when both are empty.
pub fn label_patch(add: &BTreeSet<String>, remove: &BTreeSet<String>) -> Option<Value> {
    if add.is_empty() && remove.is_empty() {
        return None;
    }
    let mut labels = Map::new();
    for key in add {
        labels.insert(key.clone(), Value::from(NODE_SCOPE_LABEL_VALUE));
    }
    for key in remove {
        labels.insert(key.clone(), Value::Null);
    }
    Some(json!({ "metadata": { "labels": labels } }))
}

async fn patch_labels(ctx: &Ctx, svc: &HAService, patch: &Value) -> Result<()> {
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    let api: Api<HAService> = Api::namespaced(ctx.client.clone(), &ns);
    let params = PatchParams {
        field_manager: Some(SCOPE_FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api
        .patch(&svc.name_any(), &params, &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Deleted meanwhile: nothing to label.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Labels `nodes` on `svc` when it lacks the label of any of them (as the
/// store shows it): called before a Lease write names them, so each sees
/// the service no later than its assignment. Adds only.
pub async fn label_nodes(ctx: &Ctx, svc: &HAService, nodes: &[&str]) -> Result<()> {
    let current = scope_labels(svc);
    let add: BTreeSet<String> = nodes
        .iter()
        .map(|n| node_scope_label(n))
        .filter(|k| !current.contains(k))
        .collect();
    match label_patch(&add, &BTreeSet::new()) {
        Some(patch) => {
            tracing::debug!(service = %service_key(svc), labels = ?add, "labelling nodes before the Lease names them");
            patch_labels(ctx, svc, &patch).await
        }
        None => Ok(()),
    }
}

/// Since when a scope label has not been needed, and the service Lease's
/// resourceVersion then.
type Unneeded = HashMap<(String, String), (Instant, Option<String>)>;

/// One pass over every service: adds the labels of needed nodes at once,
/// removes a label once [`REMOVAL_GRACE`] passed with the node unneeded
/// and the Lease unchanged. `unneeded` carries that memory between passes
/// (only for labels present and unneeded, so it stays small).
pub async fn pass(ctx: &Ctx, unneeded: &mut Unneeded, now: Instant) {
    let mut still_unneeded = Unneeded::new();
    for svc in ctx.stores.services.state() {
        if svc.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let lease = ctx.stores.service_lease(&svc);
        let lease_version = lease.as_ref().and_then(|l| l.resource_version());
        let needed = needed_nodes(&svc, lease.as_deref());
        let (add, candidates) = label_changes(&scope_labels(&svc), &needed);
        let key = service_key(&svc);
        let mut remove = BTreeSet::new();
        for label in candidates {
            let id = (key.clone(), label.clone());
            let since = match unneeded.remove(&id) {
                Some((since, version)) if version == lease_version => since,
                _ => now,
            };
            if now.duration_since(since) >= REMOVAL_GRACE {
                remove.insert(label);
            } else {
                still_unneeded.insert(id, (since, lease_version.clone()));
            }
        }
        if let Some(patch) = label_patch(&add, &remove) {
            tracing::debug!(service = %key, add = ?add, remove = ?remove, "node-scope labels");
            if let Err(e) = patch_labels(ctx, &svc, &patch).await {
                tracing::warn!(service = %key, error = %e, "could not update the node-scope labels");
            }
        }
        if let Some(lease) = &lease
            && let Some(patch) = lease_label_patch(lease, &svc)
        {
            tracing::info!(service = %key, "labelling the service Lease for the nodes it names");
            if let Err(e) = patch_lease(ctx, &lease.name_any(), &patch).await {
                tracing::warn!(service = %key, error = %e, "could not label the service Lease");
            }
        }
    }
    *unneeded = still_unneeded;
}

/// The metadata merge patch that adds to a service Lease the missing
/// node-scope labels of the nodes it names, and of the nodes whose status
/// entry in `svc` is of an earlier epoch (a node that restarted with an
/// older record, or reported after the Lease moved on: it sees the Lease
/// until it reports its epoch, as [`crate::service_controller::service_lease`]
/// keeps them), at its resourceVersion (a precondition: a newer write is
/// never relabelled from this copy); `None` when it has them all.
pub fn lease_label_patch(lease: &Lease, svc: &HAService) -> Option<Value> {
    let have = leases::scope_labels_of(lease);
    let mut want = leases::wanted_scope_labels(lease);
    if let Some(epoch) = leases::ServiceLeaseFields::read(lease).epoch {
        want.extend(
            svc.status
                .iter()
                .flat_map(|s| &s.nodes)
                .filter(|e| e.epoch.is_some_and(|e| e < epoch))
                .map(|e| node_scope_label(&e.node)),
        );
    }
    let add: BTreeSet<String> = want.difference(&have).cloned().collect();
    let mut patch = label_patch(&add, &BTreeSet::new())?;
    patch["metadata"]["resourceVersion"] = Value::from(lease.resource_version()?);
    Some(patch)
}

async fn patch_lease(ctx: &Ctx, name: &str, patch: &Value) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let params = PatchParams {
        field_manager: Some(SCOPE_FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api.patch(name, &params, &Patch::Merge(patch)).await {
        Ok(_) => Ok(()),
        // Deleted or written again meanwhile: the next pass reads it anew.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Keeps every HAService's node-scope labels up to date while this replica
/// leads and its stores have listed, one [`pass`] every [`PASS_INTERVAL`].
pub async fn run(ctx: Arc<Ctx>) {
    let mut unneeded = Unneeded::new();
    let mut tick = tokio::time::interval(PASS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if ctx.is_leader() && ctx.is_ready() {
            pass(&ctx, &mut unneeded, Instant::now()).await;
        } else {
            unneeded.clear();
        }
    }
}

#[cfg(test)]
mod tests;
