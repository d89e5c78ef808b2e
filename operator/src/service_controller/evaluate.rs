//! Gathering a service's facts from the watches and deciding on them (the pure
//! plan): refusals, placement, handover, conditions; and when to look again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use kubeha_crds::cluster::{HeartbeatState, NoQuorumPolicy};
use kubeha_crds::{HACluster, HAService, Mode, annotations};

use super::EXPIRY_MARGIN;
use crate::conditions;
use crate::context::{Ctx, service_key};
use crate::handover::{self, Fence, LeaseState};
use crate::heartbeat_view::{Timing, with_mode};
use crate::members::{self, Member, NodeInfo};
use crate::memory::Seen;
use crate::placement::{ClusterView, NodeView};
use crate::service_plan::{self, Facts, Plan, Refusal};
use crate::validate::{self, Claim, Subject};

/// Everything one evaluation produced.
pub(super) struct Evaluation {
    /// What to write.
    pub(super) plan: Plan,
    /// What changed since the last look, to announce.
    pub(super) seen: Seen,
    /// The service Lease as the watch has it.
    pub(super) lease: Option<Arc<Lease>>,
    /// The service's cluster.
    pub(super) cluster: String,
    /// Nodes of the service whose heartbeat the view shows Lost or Fenced.
    pub(super) lost: Vec<String>,
    /// When a state of the view expires next (a look then).
    pub(super) next_expiry: Option<Instant>,
    /// The HAService, for Events.
    pub(super) reference: ObjectReference,
}

pub(super) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

pub(super) fn requeue(ev: &Evaluation, now: Instant) -> Action {
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

/// The primary node of a service: its first preferred node among the
/// actual `members` (listed and selected), else the first of them in the
/// cluster's placement order (as the agents judge takeover/takeback).
pub(super) fn primary(
    svc: &HAService,
    cluster: Option<&HACluster>,
    members: &[Member],
) -> Option<String> {
    let cluster = cluster?;
    let order = kubeha_crds::roles::placement_order(
        cluster.spec.placement,
        members.iter().map(|m| m.name.as_str()),
    );
    kubeha_crds::roles::primary_node(&svc.spec, order).map(str::to_owned)
}

pub(super) fn refusal_for(
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
    // Only the services that share an address with this one can contend:
    // the others' claims are never built (a reconcile stays linear in the
    // number of services).
    let mine = Claim::of(String::new(), None, &svc.spec).addresses;
    let claims: Vec<Claim> = ctx
        .stores
        .services
        .state()
        .iter()
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .filter(|s| {
            s.spec
                .vips
                .iter()
                .filter_map(|v| kubeha_crds::cidr::parse(&v.address).ok())
                .any(|c| mine.contains(&c.addr()))
        })
        .map(|s| {
            Claim::of(
                service_key(s),
                s.meta().creation_timestamp.as_ref().map(|t| t.0),
                &s.spec,
            )
        })
        .collect();
    let mut problems = validate::validate(
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
    // Selected members whose names no label can carry (issue 9 bounds).
    let members = members::resolve(&cluster.spec, infos);
    problems.extend(validate::member_problems(
        &cluster.name_any(),
        members.iter().map(|m| m.name.as_str()),
    ));
    (!problems.is_empty()).then(|| Refusal {
        reason: "InvalidSpec",
        message: problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

pub(super) fn evaluate(svc: &HAService, ctx: &Ctx, deleting: bool, now: Instant) -> Evaluation {
    let key = service_key(svc);
    let cluster_name = svc.spec.cluster_ref.clone();
    let cluster = ctx.stores.clusters.get(&ObjectRef::new(&cluster_name));
    let infos = ctx.stores.node_infos();
    let members: Vec<Member> = cluster
        .as_ref()
        .map(|c| members::resolve(&c.spec, &infos))
        .unwrap_or_default();
    let refusal = refusal_for(svc, ctx, cluster.as_deref(), &infos);
    let lease = ctx.stores.service_lease(svc);
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
    let released_node = cluster
        .as_ref()
        .and_then(|c| c.annotations().get(annotations::RELEASE_NODE))
        .map(|n| n.trim().to_owned());
    let (node_views, states, next_expiry, frozen) = ctx.with_view(&cluster_name, |view| {
        if let Some(c) = &cluster {
            view.set_timing(Timing::from(&c.spec.heartbeat));
        }
        let node_views: Vec<NodeView> = members
            .iter()
            .map(|m| {
                let cordoned = infos.get(&m.name).is_some_and(|i| i.cordoned);
                // A released node is not capable either (as in the cluster
                // reconciler): a failback to it waits its delay afterwards.
                let released = released_node.as_deref() == Some(m.name.as_str());
                view.note_capable(
                    &m.name,
                    m.mode.allows_services() && !cordoned && !released,
                    now,
                );
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
        let frozen: BTreeSet<String> = relevant
            .iter()
            .filter(|n| view.renewed_exclusive(n))
            .cloned()
            .collect();
        (node_views, states, next, frozen)
    });
    // Under `noQuorumPolicy: Freeze` a node cut off from the API server
    // keeps its roles and VIPs (its agent extends them itself): its Lost
    // heartbeat proves nothing, only `peerdown` (or its own acknowledgement)
    // lets another node in. The same for a node whose last renew seen
    // announced mode single or config (`frozen`): HA monitoring is off
    // there, so it does not fence itself; what it knew when it renewed
    // counts, not a mode an admin set since.
    let lost_means_fenced = cluster
        .as_ref()
        .is_none_or(|c| c.spec.fence.no_quorum_policy == NoQuorumPolicy::Stop);
    let fences: BTreeMap<String, Fence> = states
        .iter()
        .map(|(n, s)| {
            let fence = if mode_of(n) == Some(Mode::Peerdown) {
                Fence::Peerdown
            } else if lost_means_fenced
                && !frozen.contains(n)
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
        stopped: cluster.as_ref().is_some_and(|c| c.spec.stopped),
    };

    let lost: BTreeSet<String> = lease_state
        .iter()
        .flat_map(|l| [l.holder.clone(), l.cleared_node.clone()])
        .flatten()
        .filter(|n| fences.get(n) == Some(&Fence::Heartbeat))
        .collect();
    let primary = primary(svc, cluster.as_deref(), &members);
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
        let mut failures = m.failures(now);
        // A node that may not have left cleanly enters nothing: never a
        // candidate until it has (or an admin cleared it). Nor is a node
        // where a hook exited 1 or 2 (`permanentFailure`): that failure
        // does not expire with `failureTimeoutSeconds`, only a clear ends it.
        for e in entries
            .iter()
            .filter(|e| e.unclean_epoch.is_some() || e.permanent_failure)
        {
            failures.entry(e.node.clone()).or_default().unclean = true;
        }
        (failures, seen, started_nothing, refusal_wait)
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
        force_start: svc
            .annotations()
            .get(annotations::FORCE_START)
            .map(String::as_str),
        force_fail_count: svc
            .annotations()
            .get(annotations::FORCE_START_FAIL_COUNT)
            .and_then(|v| v.trim().parse().ok()),
        released: cluster
            .as_ref()
            .and_then(|c| c.annotations().get(annotations::RELEASE_NODE))
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
