//! The HACluster reconciler: member heartbeats by the operator's clock,
//! modes, roles, the cluster state string and conditions into the status
//! (server-side apply by `kubeha-operator`); prohibited mode combinations
//! reported (condition, Event `ProhibitedState`); `peerdown` marks of nodes
//! that heartbeat again erased (Event `PeerReturned`), prohibited states
//! moved to valid ones ([`cluster_plan`]); `ModeChanged` Events;
//! heartbeat Leases of former members removed once they are Fenced.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use kubeha_crds::cluster::{HeartbeatState, MemberStatus};
use kubeha_crds::{HACluster, Mode, annotations, leases};
use serde_json::json;

use crate::cluster_plan::{self, Facts, ServiceSummary, StatusFields};
use crate::conditions;
use crate::context::{Ctx, FIELD_MANAGER, service_key};
use crate::error::{Error, Result};
use crate::handover::LeaseState;
use crate::heartbeat_view::Timing;
use crate::members;
use crate::memory::ModeEvent;

const EXPIRY_MARGIN: Duration = Duration::from_millis(5);

/// Reconciles one HACluster (the controller's reconcile function), in a
/// span that names it.
#[tracing::instrument(skip_all, fields(cluster = %cluster.name_any()))]
pub async fn reconcile(cluster: Arc<HACluster>, ctx: Arc<Ctx>) -> Result<Action> {
    let started = Instant::now();
    let result = crate::error::within_timeout(reconcile_inner(&cluster, &ctx)).await;
    ctx.metrics
        .reconciled("hacluster", result.is_ok(), started.elapsed());
    result
}

/// What to do after a failed reconcile.
#[tracing::instrument(skip_all, fields(cluster = %cluster.name_any()))]
pub fn error_policy(cluster: Arc<HACluster>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(%error, "reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

fn status_patch(
    fields: &StatusFields,
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
) -> serde_json::Value {
    let mut s = serde_json::Map::new();
    s.insert("ready".into(), json!(fields.ready));
    s.insert("state".into(), json!(fields.state));
    s.insert("servicesActive".into(), json!(fields.services_active));
    s.insert("members".into(), json!(fields.members));
    s.insert("conditions".into(), json!(conditions));
    if let Some(g) = generation {
        s.insert("observedGeneration".into(), json!(g));
    }
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HACluster",
        "status": serde_json::Value::Object(s),
    })
}

async fn reconcile_inner(cluster: &HACluster, ctx: &Ctx) -> Result<Action> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let now = Instant::now();
    let name = cluster.name_any();
    let infos = ctx.stores.node_infos();
    let members = members::resolve(&cluster.spec, &infos);
    ctx.first_seen(&name, now);

    let peerdown_since: BTreeMap<String, Instant> = ctx.with_cluster_memory(&name, |m| {
        members
            .iter()
            .filter_map(|n| m.peerdown_since(&n.name).map(|t| (n.name.clone(), t)))
            .collect()
    });
    let member_names: BTreeSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let released = cluster
        .annotations()
        .get(annotations::RELEASE_NODE)
        .map(|n| n.trim().to_owned());
    let (heartbeats, returned, next_expiry, orphans) = ctx.with_view(&name, |view| {
        view.set_timing(Timing::from(&cluster.spec.heartbeat));
        view.retain_capable(|n| member_names.contains(n));
        let mut heartbeats = BTreeMap::new();
        for m in &members {
            // A released node counts as cordoned: its time eligible starts
            // again when the release ends, so a failback waits its delay.
            let cordoned = infos.get(&m.name).is_some_and(|i| i.cordoned)
                || released.as_deref() == Some(m.name.as_str());
            view.note_capable(&m.name, m.mode.allows_services() && !cordoned, now);
            heartbeats.insert(m.name.clone(), view.state(&m.name, now));
        }
        let returned: BTreeSet<String> = members
            .iter()
            .filter(|m| m.mode == Mode::Peerdown)
            .filter(|m| {
                peerdown_since
                    .get(&m.name)
                    .is_some_and(|t| view.changed_since(&m.name, *t))
            })
            .map(|m| m.name.clone())
            .collect();
        let orphans: Vec<String> = view
            .nodes()
            .filter(|n| !member_names.contains(n))
            .filter(|n| view.state(n, now) == HeartbeatState::Fenced)
            .map(str::to_owned)
            .collect();
        let next = view.next_expiry(member_names.iter().copied(), now);
        (heartbeats, returned, next, orphans)
    });

    let services: Vec<ServiceSummary> = ctx
        .stores
        .services
        .state()
        .iter()
        .filter(|s| s.spec.cluster_ref == name)
        .map(|s| {
            let lease = ctx.stores.service_lease(s);
            let state = lease.as_deref().map(LeaseState::from_lease);
            ServiceSummary {
                key: service_key(s),
                phase: s.status.as_ref().and_then(|st| st.phase),
                master: state.as_ref().and_then(|l| l.holder.clone()),
                standby: state.as_ref().and_then(|l| l.standby.clone()),
            }
        })
        .collect();

    let plan = cluster_plan::plan(&Facts {
        members: &members,
        heartbeats: &heartbeats,
        services: &services,
        returned: &returned,
        timing_lets_agents_enter: cluster.spec.heartbeat.lets_agents_enter(),
        stopped: cluster.spec.stopped,
    });
    let modes: Vec<(String, Mode)> = members.iter().map(|m| (m.name.clone(), m.mode)).collect();
    let mode_events = ctx.with_cluster_memory(&name, |m| {
        m.observe(&modes, plan.prohibited.as_deref(), now)
    });

    // A former member whose Lease is gone already (deleted by the leader,
    // or by an admin) has nothing left to wait for: every replica forgets
    // it, followers included, which never delete Leases themselves.
    let (orphans, gone): (Vec<String>, Vec<String>) = orphans.into_iter().partition(|node| {
        let lease =
            ObjectRef::new(&leases::heartbeat_lease_name(&name, node)).within(&ctx.namespace);
        ctx.stores.heartbeat_leases.get(&lease).is_some()
    });
    if !gone.is_empty() {
        ctx.with_view(&name, |v| gone.iter().for_each(|node| v.forget(node)));
    }

    let expiry_in = next_expiry.map(|t| t.saturating_duration_since(now) + EXPIRY_MARGIN);
    let requeue = match expiry_in {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    };
    if !ctx.is_leader() {
        return Ok(requeue);
    }
    if ctx.in_gap(&name) {
        return Ok(Action::requeue(crate::gaps::WAIT_IN_GAP));
    }
    let reference = cluster.object_ref(&());
    let api: Api<HACluster> = Api::all(ctx.client.clone());

    if let Some(patch) = &plan.mode_patch {
        let patch: json_patch::Patch = serde_json::from_value(patch.clone())?;
        match api
            .patch(
                &name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                    ..Default::default()
                },
                &Patch::Json::<()>(patch),
            )
            .await
        {
            Ok(_) => {
                for node in &plan.returned {
                    tracing::warn!(%node, "peerdown member heartbeats again: mark erased");
                    ctx.publish(
                        &reference,
                        "PeerReturned",
                        true,
                        format!(
                            "{node} was marked peerdown but heartbeats again: the mark is erased (mode default) and members in single or config return to default"
                        ),
                    );
                }
                if plan.returned.is_empty() && !plan.reset.is_empty() {
                    let msg = format!(
                        "{}; moved to a valid state: {} set to mode default{}",
                        plan.prohibited.as_deref().unwrap_or("prohibited modes"),
                        plan.reset
                            .iter()
                            .map(|(n, m)| format!("{n} (was {m})"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        if plan.stops {
                            ", services stopped (spec.stopped); start them with kubectl ha start"
                        } else {
                            ""
                        }
                    );
                    tracing::warn!(%msg, "prohibited mode combination repaired");
                    ctx.publish(&reference, "ProhibitedState", true, msg);
                } else if plan.stops {
                    ctx.publish(
                        &reference,
                        "ClusterStopped",
                        true,
                        "a returning peer reset a member in single or config to default: the services are stopped (spec.stopped); start them with kubectl ha start".to_owned(),
                    );
                }
                // The spec change triggers the next reconcile.
                return Ok(Action::await_change());
            }
            // The spec moved on since it was read (the JSON patch tests
            // failed): decide again on the new one.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            Err(e) => return Err(e.into()),
        }
    }

    let generation = cluster.meta().generation;
    let old = cluster.status.clone().unwrap_or_default();
    let conds = conditions::settle(
        &old.conditions,
        &plan.status.conditions,
        generation,
        Time(jiff::Timestamp::now()),
    );
    // Everything but the members' roles and the active count: a change of
    // those alone waits until ROLES_WRITE_INTERVAL after the last write (a
    // requeue then writes what is current); heartbeats, modes, readiness,
    // state and conditions go out at once.
    let same_but_roles = old.ready.as_deref() == Some(plan.status.ready.as_str())
        && old.state.as_deref() == Some(plan.status.state.as_str())
        && old.observed_generation == generation
        && conditions::same(&old.conditions, &conds)
        && same_members_but_roles(&old.members, &plan.status.members);
    let unchanged = same_but_roles
        && old.services_active == Some(plan.status.services_active)
        && old.members == plan.status.members;
    let write_at = (!unchanged && same_but_roles)
        .then(|| ctx.with_cluster_memory(&name, |m| m.roles_write_at(now)))
        .filter(|at| *at > now);
    let mut requeue = requeue;
    if let Some(at) = write_at {
        let wait = at - now;
        requeue = Action::requeue(expiry_in.map_or(wait, |d| d.min(wait)));
    } else if !unchanged {
        let patch = status_patch(&plan.status, &conds, generation);
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.with_cluster_memory(&name, |m| m.note_status_written(Instant::now()));
    }

    for e in mode_events {
        match e {
            ModeEvent::Changed { node, from, to } => ctx.publish(
                &reference,
                "ModeChanged",
                false,
                format!("{node}: mode {from} -> {to}"),
            ),
            ModeEvent::Prohibited(msg) => {
                tracing::warn!(%msg, "prohibited mode combination");
                ctx.publish(&reference, "ProhibitedState", true, msg)
            }
        }
    }

    // A release (FreeHA's HUP) ends once no service of the cluster has the
    // node as its holder and the node's own entries show it left every
    // role: the services moved (or, with nowhere else to go, stopped), and
    // the node is eligible again.
    if let Some(node) = cluster.annotations().get(annotations::RELEASE_NODE)
        && !services
            .iter()
            .any(|s| s.master.as_deref() == Some(node.trim()))
        && !ctx.stores.services.state().iter().any(|s| {
            s.spec.cluster_ref == name
                && s.status.as_ref().is_some_and(|st| {
                    st.nodes
                        .iter()
                        .any(|e| e.node == node.trim() && e.role != kubeha_crds::Role::None)
                })
        })
        && remove_annotation_if(&api, &name, annotations::RELEASE_NODE, node).await?
    {
        tracing::info!(%node, "release done: no service runs there");
        ctx.publish(
            &reference,
            "Released",
            false,
            format!(
                "{node} released: no service of this cluster has it as its holder any more ({} removed); it is eligible again",
                annotations::RELEASE_NODE
            ),
        );
    }

    // A reset (`kubectl ha reset`) ends once the node's heartbeat shows
    // it stopped renewing (its agent fenced itself and withholds its
    // heartbeat), or the node is no member any more: the request is not
    // left for a node whose reset log was lost to act on again.
    if let Some(value) = cluster.annotations().get(annotations::RESET_NODE)
        && let Some((node, _)) = annotations::reset_request(value)
        && (!member_names.contains(node)
            || matches!(
                heartbeats.get(node),
                Some(HeartbeatState::Lost | HeartbeatState::Fenced)
            ))
        && remove_annotation_if(&api, &name, annotations::RESET_NODE, value).await?
    {
        tracing::info!(%node, "reset done: the node stopped heartbeating");
        ctx.publish(
            &reference,
            "ResetDone",
            false,
            format!(
                "{node} stopped heartbeating after its reset ({} {value} removed)",
                annotations::RESET_NODE
            ),
        );
    }

    // Heartbeat Leases of nodes that are no longer members, once Fenced.
    let leases_api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for node in orphans {
        let lease_name = leases::heartbeat_lease_name(&name, &node);
        match leases_api
            .delete(&lease_name, &DeleteParams::default())
            .await
        {
            Ok(_) => {
                tracing::info!(%node, "removed the heartbeat Lease of a former member")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(%node, error = %e, "removing a stale heartbeat Lease failed")
            }
        }
        ctx.with_view(&name, |v| v.forget(&node));
    }

    Ok(requeue)
}

/// Whether two member lists say the same but for their service roles:
/// the same nodes in the same order, with the same heartbeat and mode.
fn same_members_but_roles(a: &[MemberStatus], b: &[MemberStatus]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.node == y.node && x.heartbeat == y.heartbeat && x.mode == y.mode)
}

/// Removes annotation `key` of cluster `name` if it still has `value` (a
/// JSON patch that tests the value first, so an admin's newer request is
/// not lost); whether it removed it.
async fn remove_annotation_if(
    api: &Api<HACluster>,
    name: &str,
    key: &str,
    value: &str,
) -> Result<bool> {
    let path = format!(
        "/metadata/annotations/{}",
        key.replace('~', "~0").replace('/', "~1")
    );
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": path, "value": value},
        {"op": "remove", "path": path},
    ]))?;
    match api
        .patch(
            name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..Default::default()
            },
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        // Changed or removed meanwhile: the next reconcile sees the new one.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_change_of_roles_is_told_from_other_member_changes() {
        use kubeha_crds::cluster::ServiceRole;
        let member = |node: &str, heartbeat, roles: usize| MemberStatus {
            node: node.into(),
            heartbeat,
            mode: Mode::Default,
            roles: (0..roles)
                .map(|i| ServiceRole {
                    service: format!("ns/s{i}"),
                    role: kubeha_crds::Role::Master,
                })
                .collect(),
        };
        let before = [
            member("a", HeartbeatState::Alive, 1),
            member("b", HeartbeatState::Alive, 0),
        ];
        let roles = [
            member("a", HeartbeatState::Alive, 2),
            member("b", HeartbeatState::Alive, 1),
        ];
        assert!(same_members_but_roles(&before, &roles));
        let lost = [
            member("a", HeartbeatState::Alive, 1),
            member("b", HeartbeatState::Lost, 0),
        ];
        assert!(!same_members_but_roles(&before, &lost));
        let mut locked = before.clone();
        locked[1].mode = Mode::Locked;
        assert!(!same_members_but_roles(&before, &locked));
        assert!(!same_members_but_roles(&before, &before[..1]));
    }

    #[test]
    fn status_patch_shape() {
        let fields = StatusFields {
            ready: "1/2".into(),
            state: "default-locked".into(),
            services_active: 1,
            members: vec![],
            conditions: vec![],
        };
        let p = status_patch(&fields, &[], Some(2));
        assert_eq!(p["status"]["ready"], "1/2");
        assert_eq!(p["status"]["servicesActive"], 1);
        assert_eq!(p["status"]["observedGeneration"], 2);
        assert_eq!(p["kind"], "HACluster");
        let parsed: kubeha_crds::HAClusterStatus =
            serde_json::from_value(p["status"].clone()).unwrap();
        assert_eq!(parsed.ready.as_deref(), Some("1/2"));
        assert_eq!(parsed.state.as_deref(), Some("default-locked"));
        assert_eq!(parsed.services_active, Some(1));
        assert_eq!(parsed.observed_generation, Some(2));
    }
}
