//! The HAService reconciler: gathers the facts (cluster, members, heartbeat
//! view, service Lease, agents' entries, failures), asks
//! [`service_plan::plan`] what to do, then carries it out: the service Lease
//! write (optimistic, on the version read), the status (server-side apply
//! by `kubeha-operator`, never touching `status.nodes`), Events, metrics,
//! and a requeue at the next instant something changes by time alone.
//!
//! A finalizer holds a deleted HAService until its master has left (or is
//! fenced): the Lease is set to nobody first, then released.
//! Non-leaders run the same evaluation to keep their memory warm and write
//! nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use kubeha_crds::cluster::{HeartbeatState, NoQuorumPolicy};
use kubeha_crds::{HACluster, HAService, Mode, annotations, leases};
use serde_json::json;

use crate::conditions;
use crate::context::{Ctx, FIELD_MANAGER, service_key};
use crate::error::{Error, Result};
use crate::handover::{self, CLEARED_NODE_ANNOTATION, Fence, LeaseState};
use crate::heartbeat_view::{Fingerprint, Timing, with_mode};
use crate::members::{self, Member, NodeInfo};
use crate::memory::Seen;
use crate::placement::{ClusterView, NodeView};
use crate::service_plan::{self, Facts, Plan, Refusal, StatusFields};
use crate::validate::{self, Claim, Subject};

/// The finalizer the operator puts on every HAService.
pub const FINALIZER: &str = "kubeha.io/release";

/// A little past an expiry instant, so the state has flipped when the
/// reconcile runs.
const EXPIRY_MARGIN: Duration = Duration::from_millis(5);

/// Reconciles one HAService (the controller's reconcile function), in a
/// span that names it.
#[tracing::instrument(skip_all, fields(service = %service_key(&svc)))]
pub async fn reconcile(svc: Arc<HAService>, ctx: Arc<Ctx>) -> Result<Action> {
    let started = Instant::now();
    let result = crate::error::within_timeout(reconcile_inner(svc, ctx.clone())).await;
    let ok = match &result {
        Ok(_) => true,
        Err(e) => e.is_wait(),
    };
    ctx.metrics.reconciled("haservice", ok, started.elapsed());
    result
}

/// What to do after a failed reconcile.
#[tracing::instrument(skip_all, fields(service = %service_key(&svc)))]
pub fn error_policy(svc: Arc<HAService>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    if error.is_wait() {
        tracing::debug!(%error, "waiting");
        Action::requeue(Duration::from_millis(500))
    } else if matches!(error, Error::Timeout(_)) {
        tracing::warn!(%error, "reconcile timed out");
        Action::requeue(Duration::from_millis(200))
    } else {
        tracing::warn!(%error, "reconcile failed");
        Action::requeue(Duration::from_secs(2))
    }
}

async fn reconcile_inner(svc: Arc<HAService>, ctx: Arc<Ctx>) -> Result<Action> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    if !ctx.is_leader() {
        let deleting = svc.meta().deletion_timestamp.is_some();
        let ev = evaluate(&svc, &ctx, deleting, Instant::now());
        return Ok(requeue(&ev, Instant::now()));
    }
    let api: Api<HAService> = Api::namespaced(ctx.client.clone(), &ns);
    let key = service_key(&svc);
    let deleting = svc.meta().deletion_timestamp.is_some();
    let result = finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            FinalizerEvent::Apply(svc) => apply(&svc, &ctx, false).await,
            FinalizerEvent::Cleanup(svc) => apply(&svc, &ctx, true).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if deleting && result.is_ok() {
        ctx.forget_service(&key);
    }
    result
}

/// Everything one evaluation produced.
struct Evaluation {
    plan: Plan,
    seen: Seen,
    lease: Option<Arc<Lease>>,
    cluster: String,
    /// Nodes of the service whose heartbeat the view shows Lost or Fenced.
    lost: Vec<String>,
    next_expiry: Option<Instant>,
    reference: ObjectReference,
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn requeue(ev: &Evaluation, now: Instant) -> Action {
    let by_expiry = ev
        .next_expiry
        .map(|t| t.saturating_duration_since(now) + EXPIRY_MARGIN);
    let refused_and_stopped = ev
        .plan
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == conditions::STALLED && c.status)
        && ev.plan.stopped();
    if refused_and_stopped {
        // Invalid or unbound: wait for a change of the spec or the world.
        return Action::await_change();
    }
    match (by_expiry, ev.plan.requeue_after) {
        (Some(a), Some(b)) => Action::requeue(a.min(b)),
        (Some(a), None) | (None, Some(a)) => Action::requeue(a),
        (None, None) => Action::await_change(),
    }
}

fn node_infos(ctx: &Ctx) -> BTreeMap<String, NodeInfo> {
    ctx.stores
        .nodes
        .state()
        .iter()
        .map(|n| (n.name_any(), NodeInfo::of(n)))
        .collect()
}

/// The primary node of a service: its first preferred node, else the
/// cluster's first listed member (as the agents judge takeover/takeback).
fn primary(svc: &HAService, cluster: Option<&HACluster>) -> Option<String> {
    let members = cluster
        .into_iter()
        .flat_map(|c| c.spec.members.nodes.iter().map(|m| m.name.as_str()));
    kubeha_crds::roles::primary_node(&svc.spec, members).map(str::to_owned)
}

fn refusal_for(
    svc: &HAService,
    ctx: &Ctx,
    cluster: Option<&HACluster>,
    infos: &BTreeMap<String, NodeInfo>,
) -> Option<Refusal> {
    let Some(cluster) = cluster else {
        return Some(Refusal {
            reason: "ClusterNotFound",
            message: format!(
                "HACluster {} does not exist; create it or fix spec.clusterRef",
                svc.spec.cluster_ref
            ),
        });
    };
    let key = service_key(svc);
    let namespace = svc.namespace().unwrap_or_default();
    let addresses: Vec<(String, IpAddr)> = infos
        .iter()
        .flat_map(|(n, i)| i.addresses.iter().map(move |a| (n.clone(), *a)))
        .collect();
    let claims: Vec<Claim> = ctx
        .stores
        .services
        .state()
        .iter()
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .map(|s| {
            Claim::of(
                service_key(s),
                s.meta().creation_timestamp.as_ref().map(|t| t.0),
                &s.spec,
            )
        })
        .collect();
    let problems = validate::validate(
        Subject {
            namespace: &namespace,
            key: &key,
            created: svc.meta().creation_timestamp.as_ref().map(|t| t.0),
            spec: &svc.spec,
        },
        &cluster.name_any(),
        &cluster.spec,
        &addresses,
        &claims,
    );
    (!problems.is_empty()).then(|| Refusal {
        reason: "InvalidSpec",
        message: problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

fn evaluate(svc: &HAService, ctx: &Ctx, deleting: bool, now: Instant) -> Evaluation {
    let key = service_key(svc);
    let ns = svc.namespace().unwrap_or_default();
    let cluster_name = svc.spec.cluster_ref.clone();
    let cluster = ctx.stores.clusters.get(&ObjectRef::new(&cluster_name));
    let infos = node_infos(ctx);
    let members: Vec<Member> = cluster
        .as_ref()
        .map(|c| members::resolve(&c.spec, &infos))
        .unwrap_or_default();
    let refusal = refusal_for(svc, ctx, cluster.as_deref(), &infos);
    let lease = ctx
        .stores
        .service_leases
        .get(&ObjectRef::new(&leases::service_lease_name(&svc.name_any())).within(&ns));
    let lease_state = match lease.as_deref() {
        Some(l) => Some(LeaseState::from_lease(l)),
        // Gone although the service was placed before: assume the worst.
        None => svc.status.as_ref().and_then(handover::assumed_after_loss),
    };
    let entries = svc
        .status
        .as_ref()
        .map(|s| s.nodes.clone())
        .unwrap_or_default();

    // Every node whose heartbeat matters here.
    let mut relevant: BTreeSet<String> = members.iter().map(|m| m.name.clone()).collect();
    relevant.extend(entries.iter().map(|e| e.node.clone()));
    if let Some(l) = &lease_state {
        relevant.extend(l.holder.clone());
        relevant.extend(l.standby.clone());
        relevant.extend(l.cleared_node.clone());
    }
    let mode_of = |n: &str| members.iter().find(|m| m.name == n).map(|m| m.mode);

    let first_seen = ctx.first_seen(&cluster_name, now);
    let (node_views, states, next_expiry) = ctx.with_view(&cluster_name, |view| {
        if let Some(c) = &cluster {
            view.set_timing(Timing::from(&c.spec.heartbeat));
        }
        let node_views: Vec<NodeView> = members
            .iter()
            .map(|m| {
                let cordoned = infos.get(&m.name).is_some_and(|i| i.cordoned);
                view.note_capable(&m.name, m.mode.allows_services() && !cordoned, now);
                NodeView {
                    name: m.name.clone(),
                    mode: m.mode,
                    heartbeat: with_mode(view.state(&m.name, now), m.mode),
                    cordoned,
                    eligible_for: view.eligible_for(&m.name, now),
                }
            })
            .collect();
        let states: BTreeMap<String, HeartbeatState> = relevant
            .iter()
            .map(|n| (n.clone(), view.state(n, now)))
            .collect();
        let next = view.next_expiry(relevant.iter().map(String::as_str), now);
        (node_views, states, next)
    });
    // Under `noQuorumPolicy: Freeze` a node cut off from the API server
    // keeps its roles and VIPs (its agent extends them itself): its Lost
    // heartbeat proves nothing, only `peerdown` (or its own acknowledgement)
    // lets another node in.
    let lost_means_fenced = cluster
        .as_ref()
        .is_none_or(|c| c.spec.fence.no_quorum_policy == NoQuorumPolicy::Stop);
    let fences: BTreeMap<String, Fence> = states
        .iter()
        .map(|(n, s)| {
            let fence = if mode_of(n) == Some(Mode::Peerdown) {
                Fence::Peerdown
            } else if lost_means_fenced
                && matches!(s, HeartbeatState::Lost | HeartbeatState::Fenced)
            {
                Fence::Heartbeat
            } else {
                Fence::None
            };
            (n.clone(), fence)
        })
        .collect();

    let view = ClusterView {
        members: node_views,
        placement: cluster
            .as_ref()
            .map(|c| c.spec.placement)
            .unwrap_or_default(),
        failback: cluster
            .as_ref()
            .map(|c| c.spec.failback.clone())
            .unwrap_or_default(),
        startup_grace: Duration::from_secs(
            cluster
                .as_ref()
                .map(|c| u64::try_from(c.spec.startup_grace_seconds).unwrap_or(0))
                .unwrap_or(0),
        ),
        since_start: now.saturating_duration_since(first_seen),
    };

    let lost: BTreeSet<String> = lease_state
        .iter()
        .flat_map(|l| [l.holder.clone(), l.cleared_node.clone()])
        .flatten()
        .filter(|n| fences.get(n) == Some(&Fence::Heartbeat))
        .collect();
    let primary = primary(svc, cluster.as_deref());
    let expiry = cluster
        .as_ref()
        .map(|c| Timing::from(&c.spec.heartbeat))
        .unwrap_or_default()
        .expiry();
    let (failures, seen, started_nothing, refusal_wait) = ctx.with_service_memory(&key, |m| {
        m.note_failures(&entries, now, jiff::Timestamp::now());
        let seen = m.observe(
            &entries,
            lease_state.as_ref(),
            primary.as_deref(),
            &lost,
            now,
        );
        let started_nothing: BTreeSet<String> = entries
            .iter()
            .filter(|e| service_plan::refused_before_start(e))
            .filter(|e| m.failed_for(&e.node, now).is_some_and(|d| d >= expiry))
            .map(|e| e.node.clone())
            .collect();
        // A refusal not yet old enough: look again when it is.
        let refusal_wait = entries
            .iter()
            .filter(|e| service_plan::refused_before_start(e))
            .filter_map(|e| m.failed_for(&e.node, now))
            .filter(|d| *d < expiry)
            .map(|d| expiry - d)
            .min();
        (m.failures(now), seen, started_nothing, refusal_wait)
    });

    let plan = service_plan::plan(&Facts {
        key: &key,
        generation: svc.meta().generation,
        spec: &svc.spec,
        status: svc.status.as_ref(),
        refusal,
        deleting,
        cluster: &view,
        lease: lease_state.as_ref(),
        fences: &fences,
        failures,
        started_nothing: &started_nothing,
        move_to: svc
            .annotations()
            .get(annotations::MOVE_TO)
            .map(String::as_str),
    });
    let lost = states
        .iter()
        .filter(|(_, s)| matches!(s, HeartbeatState::Lost | HeartbeatState::Fenced))
        .map(|(n, _)| n.clone())
        .collect();
    Evaluation {
        plan,
        seen,
        lease,
        cluster: cluster_name,
        lost,
        next_expiry: earliest(next_expiry, refusal_wait.map(|d| now + d)),
        reference: svc.object_ref(&()),
    }
}

/// Confirms with a fresh read that `node`'s heartbeat really stopped: if
/// its Lease changed since the watch last showed it (a stalled watch), the
/// change is observed now and `true` is returned.
async fn heartbeat_moved(ctx: &Ctx, cluster: &str, node: &str) -> Result<bool> {
    let (moved, _) = refresh_heartbeat(ctx, cluster, node).await?;
    if moved {
        tracing::warn!(%cluster, %node, "heartbeat Lease changed although the watch showed none: not fenced");
    }
    Ok(moved)
}

/// Reads `node`'s heartbeat Lease afresh and records it in the view when
/// it differs from what the watch showed: whether it did, and the Lease's
/// `renewTime` as read.
async fn refresh_heartbeat(ctx: &Ctx, cluster: &str, node: &str) -> Result<(bool, Option<String>)> {
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
enum Written {
    Done,
    /// Someone else changed the Lease since it was read: decide again.
    Conflict,
}

/// The service Lease as the operator writes it: `current` (or a new one)
/// with the kubeha labels, the annotations of `state`, the HAService as
/// controlling owner, `holderIdentity` = master and `leaseTransitions` =
/// epoch; `acquireTime` moves to `now` when the holder changes. Other fields
/// of `current` (resourceVersion, foreign labels and annotations) are kept.
/// Pure: this is exactly what the agents read (see `tests/agent_protocol.rs`).
pub fn service_lease(
    current: Option<&Lease>,
    svc: &HAService,
    state: &LeaseState,
    holder_changed: bool,
    now: jiff::Timestamp,
) -> Lease {
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(leases::service_lease_name(&svc.name_any())),
            namespace: svc.namespace(),
            ..Default::default()
        },
        spec: None,
    });
    let labels = lease.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(leases::LEASE_KIND_LABEL.into(), leases::SERVICE.into());
    labels.insert(leases::SERVICE_LABEL.into(), svc.name_any());
    labels.insert(leases::CLUSTER_LABEL.into(), svc.spec.cluster_ref.clone());
    let annotations = lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    if state.cleared_node.is_none() {
        annotations.remove(CLEARED_NODE_ANNOTATION);
    }
    annotations.extend(state.annotations());
    if let Some(owner) = svc.controller_owner_ref(&())
        && !lease
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == owner.uid)
    {
        lease
            .metadata
            .owner_references
            .get_or_insert_with(Vec::new)
            .push(owner);
    }
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = state.holder.clone();
    spec.lease_transitions = Some(state.lease_transitions());
    if holder_changed {
        spec.acquire_time = Some(MicroTime(now));
    }
    lease
}

async fn write_lease(
    ctx: &Ctx,
    svc: &HAService,
    current: Option<&Lease>,
    state: &LeaseState,
    holder_changed: bool,
    holder_renew: Option<String>,
) -> Result<Written> {
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    let name = leases::service_lease_name(&svc.name_any());
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    let mut lease = service_lease(current, svc, state, holder_changed, jiff::Timestamp::now());
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

/// A Lease of that name exists but the watch (by label) does not show it:
/// label it (nothing else) so the next reconcile sees it and decides on
/// what it says.
async fn adopt_unlabelled_lease(api: &Api<Lease>, name: &str, svc: &HAService) -> Result<()> {
    let patch = json!({
        "metadata": {
            "labels": {
                leases::LEASE_KIND_LABEL: leases::SERVICE,
                leases::SERVICE_LABEL: svc.name_any(),
                leases::CLUSTER_LABEL: svc.spec.cluster_ref,
            }
        }
    });
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

/// The status apply patch (operator-owned fields only).
fn status_patch(
    status: &StatusFields,
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
) -> serde_json::Value {
    let mut s = serde_json::Map::new();
    s.insert("phase".into(), json!(status.phase));
    if let Some(a) = &status.active_node {
        s.insert("activeNode".into(), json!(a));
    }
    if let Some(b) = &status.standby_node {
        s.insert("standbyNode".into(), json!(b));
    }
    if let Some(e) = status.epoch {
        s.insert("epoch".into(), json!(e));
    }
    s.insert("vips".into(), json!(status.vips));
    s.insert("conditions".into(), json!(conditions));
    if let Some(g) = generation {
        s.insert("observedGeneration".into(), json!(g));
    }
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "status": serde_json::Value::Object(s),
    })
}

async fn publish_status(ctx: &Ctx, svc: &HAService, fields: &StatusFields) -> Result<()> {
    let generation = svc.meta().generation;
    let old = svc.status.clone().unwrap_or_default();
    let conditions = conditions::settle(
        &old.conditions,
        &fields.conditions,
        generation,
        Time(jiff::Timestamp::now()),
    );
    let unchanged = old.phase == Some(fields.phase)
        && old.active_node == fields.active_node
        && old.standby_node == fields.standby_node
        && old.epoch == fields.epoch
        && old.vips.as_deref() == Some(fields.vips.as_str())
        && old.observed_generation == generation
        && conditions::same(&old.conditions, &conditions);
    if unchanged {
        return Ok(());
    }
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    let api: Api<HAService> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = status_patch(fields, &conditions, generation);
    api.patch_status(
        &svc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Whether the status does not yet say that the move request is blocked
/// for this reason (so the Event is published once per reason).
fn move_blocked_is_new(svc: &HAService, why: &str) -> bool {
    !svc.status
        .iter()
        .flat_map(|s| &s.conditions)
        .any(|c| c.type_ == conditions::MOVED && c.status == "False" && c.message == why)
}

async fn apply(svc: &HAService, ctx: &Ctx, deleting: bool) -> Result<Action> {
    let key = service_key(svc);
    let mut now = Instant::now();
    let mut ev = evaluate(svc, ctx, deleting, now);

    // A clearance that rests on a Lost heartbeat is confirmed first, and so
    // is every Lost heartbeat when the holder changes: right after an API
    // server stall the watch still shows every node Lost although their
    // agents renew again, and a service stopped or moved for that waits for
    // one more handover. The holder's heartbeat is read afresh too when it
    // is cleared, so the Lease carries its latest renew (the
    // holder-renew-time an agent back from a fence waits for), not what a
    // watch still behind a busy API server shows: else the agent refuses
    // the clearance and the service waits for one more epoch. A read that
    // changed the view changes the plan: the new plan is confirmed in turn,
    // and one still unconfirmed after three rounds is decided again
    // shortly instead of written.
    let mut rounds = 0;
    // The cleared holder's renewTime as just read, for the annotation (a
    // watch event arriving late may still put an older one in the view).
    let mut holder_renew: Option<(String, String)> = None;
    loop {
        let h = &ev.plan.handover;
        if !(h.write && (h.cleared_now || h.holder_changed)) {
            break;
        }
        if rounds == 3 {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        rounds += 1;
        let mut confirm: BTreeSet<String> = h.relies_on_heartbeat.iter().cloned().collect();
        if h.holder_changed {
            confirm.extend(ev.lost.iter().cloned());
        }
        let holder = h.lease.holder.clone().filter(|_| h.cleared_now);
        let mut moved = false;
        for node in &confirm {
            moved |= heartbeat_moved(ctx, &ev.cluster, node).await?;
        }
        if let Some(holder) = holder.filter(|h| !confirm.contains(h)) {
            let (changed, renewed) = refresh_heartbeat(ctx, &ev.cluster, &holder).await?;
            moved |= changed;
            holder_renew = renewed.map(|r| (holder, r));
        }
        if !moved {
            break;
        }
        now = Instant::now();
        ev = evaluate(svc, ctx, deleting, now);
    }

    let h = &ev.plan.handover;
    if h.write {
        let renewed = holder_renew
            .filter(|(holder, _)| h.lease.holder.as_ref() == Some(holder))
            .map(|(_, r)| r);
        match write_lease(
            ctx,
            svc,
            ev.lease.as_deref(),
            &h.lease,
            h.holder_changed,
            renewed,
        )
        .await?
        {
            Written::Conflict => return Ok(Action::requeue(Duration::from_millis(200))),
            Written::Done => {
                let reason = ev
                    .plan
                    .decision
                    .as_ref()
                    .map_or("Deleted", |d| d.reason.as_str());
                tracing::info!(
                    holder = ?h.lease.holder,
                    epoch = h.lease.epoch,
                    enter_epoch = ?h.lease.enter_epoch,
                    standby = ?h.lease.standby,
                    progress = ?h.progress,
                    reason,
                    "service Lease written"
                );
                if h.holder_changed
                    && let Some(holder) = &h.lease.holder
                {
                    ctx.metrics.failover(reason);
                    ctx.with_service_memory(&key, |m| {
                        m.note_written(holder, h.lease.epoch, reason, now)
                    });
                }
            }
        }
    }

    publish_status(ctx, svc, &ev.plan.status).await?;

    if let Some(why) = &ev.plan.move_blocked
        && move_blocked_is_new(svc, why)
    {
        ctx.publish(&ev.reference, "MoveNotPossible", true, why.clone())
            .await;
    }

    if let Some(done) = &ev.seen.completed {
        ctx.metrics.failover_completed(&done.reason, done.duration);
    }
    for t in &ev.seen.announcements {
        ctx.publish(&ev.reference, t.reason, t.warning, t.message.clone())
            .await;
    }

    if deleting {
        if ev.plan.stopped() {
            tracing::info!("stopped everywhere: releasing");
            return Ok(Action::await_change());
        }
        return Err(Error::WaitingForRelease(format!(
            "{key}: {:?}",
            ev.plan.handover.progress
        )));
    }
    Ok(requeue(&ev, Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeha_crds::service::Phase;

    #[test]
    fn status_patch_has_only_operator_fields() {
        let fields = StatusFields {
            phase: Phase::Active,
            active_node: Some("a".into()),
            standby_node: None,
            epoch: Some(3),
            vips: "198.18.0.100/24".into(),
            conditions: vec![],
        };
        let p = status_patch(&fields, &[], Some(7));
        let s = &p["status"];
        assert_eq!(s["phase"], "Active");
        assert_eq!(s["activeNode"], "a");
        assert!(s.get("standbyNode").is_none());
        assert_eq!(s["epoch"], 3);
        assert_eq!(s["observedGeneration"], 7);
        assert!(s.get("nodes").is_none(), "agents own status.nodes");
        assert_eq!(p["kind"], "HAService");
    }

    #[test]
    fn status_patch_matches_the_api_types() {
        let fields = StatusFields {
            phase: Phase::Starting,
            active_node: Some("a".into()),
            standby_node: Some("b".into()),
            epoch: Some(2),
            vips: "198.18.0.100/24".into(),
            conditions: vec![conditions::Cond::yes(conditions::READY, "Active", "m")],
        };
        let conds = conditions::settle(
            &[],
            &fields.conditions,
            Some(1),
            Time(jiff::Timestamp::UNIX_EPOCH),
        );
        let p = status_patch(&fields, &conds, Some(1));
        let parsed: kubeha_crds::HAServiceStatus =
            serde_json::from_value(p["status"].clone()).unwrap();
        assert_eq!(parsed.phase, Some(Phase::Starting));
        assert_eq!(parsed.active_node.as_deref(), Some("a"));
        assert_eq!(parsed.standby_node.as_deref(), Some("b"));
        assert_eq!(parsed.epoch, Some(2));
        assert_eq!(parsed.vips.as_deref(), Some("198.18.0.100/24"));
        assert_eq!(parsed.conditions, conds);
        assert_eq!(parsed.observed_generation, Some(1));
        assert!(parsed.nodes.is_empty());
    }
}
