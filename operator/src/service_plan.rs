//! What one reconcile of an HAService decides, as a pure function of what
//! the reconciler gathered: placement's decision, the handover (the service
//! Lease to write) and the operator-owned part of the status (phase, active
//! and standby node, epoch, VIPs, conditions).
//!
//! An admin's move request (annotation [`annotations::MOVE_TO`]) is applied
//! here, before placement: while the node it names is eligible, it goes
//! first in the service's preferred nodes and the failback policy becomes
//! `Automatic` with no delay, so placement moves the service there at once
//! (a `Failback` through the ordinary handover). While it is not eligible
//! nothing changes and the `Moved` condition says why.
//!
//! A force start (annotation [`annotations::FORCE_START`], FreeHA's USR1)
//! is applied here too, and this is the one place where the `Errored` state
//! (FreeHA's ERRORED, the classic managers' failed-everywhere latch) is
//! overridden: for the node it names only, this service's failures there
//! are left out of placement's view, and the node goes first as with a
//! move. Nothing else is overridden: the node must be a member whose mode
//! allows services, Alive and not cordoned, and not unclean (it may still
//! run the service from an earlier epoch); the start goes through the
//! ordinary handover at a new epoch. The failures stay counted in the
//! status; `kubectl ha clear` resets them and withdraws the request. While
//! it stands the `ForceStarted` condition says where it stands.
//!
//! A release of a node (HACluster annotation
//! [`annotations::RELEASE_NODE`], FreeHA's HUP) counts that node as
//! cordoned for placement while it stands, so every service it runs moves
//! to the first other eligible node through the handover.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kubeha_crds::annotations;
use kubeha_crds::cluster::{Failback, FailbackPolicy, HeartbeatState};
use kubeha_crds::service::{
    HAServiceSpec, HAServiceStatus, NodeServiceState, Phase, ServiceNodeStatus,
};

use crate::conditions::{Cond, DEGRADED, FORCE_STARTED, MOVED, READY, RECONCILING, STALLED};
use crate::handover::{self, Fence, Handover, LeaseState, NodeFacts, Progress};
use crate::placement::{self, ClusterView, Decision, Failures, Reason, ServiceView};

/// Why a service is not placed at all: it is stopped and `Stalled`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `InvalidSpec` or `ClusterNotFound`.
    pub reason: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// What the reconciler gathered about one service.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The spec.
    pub spec: &'a HAServiceSpec,
    /// The status as it is (agents' entries included).
    pub status: Option<&'a HAServiceStatus>,
    /// Set when the service is refused (invalid, no cluster).
    pub refusal: Option<Refusal>,
    /// The service is being deleted: stop it everywhere.
    pub deleting: bool,
    /// Placement's view of the cluster.
    pub cluster: &'a ClusterView,
    /// The service Lease as it is.
    pub lease: Option<&'a LeaseState>,
    /// How each relevant node is fenced (members, nodes with entries, the
    /// Lease's holder and cleared node).
    pub fences: &'a BTreeMap<String, Fence>,
    /// Failures per node, with the time the operator saw them.
    pub failures: BTreeMap<String, Failures>,
    /// Nodes whose failure started nothing, long enough ago (see
    /// [`NodeFacts::started_nothing`]).
    pub started_nothing: &'a BTreeSet<String>,
    /// The node an admin asked the service to run on (annotation
    /// [`annotations::MOVE_TO`]); `None` or blank: no request.
    pub move_to: Option<&'a str>,
    /// The node an admin asked to start the service on by force
    /// (annotation [`annotations::FORCE_START`]); `None` or blank: none.
    pub force_start: Option<&'a str>,
    /// The forced node's fail count when the force was asked (annotation
    /// [`annotations::FORCE_START_FAIL_COUNT`]): a higher count there now
    /// means the forced start failed, and its failures are no longer
    /// overridden. `None`: every failure is.
    pub force_fail_count: Option<i32>,
    /// The node the cluster's admin asked to release (HACluster annotation
    /// [`annotations::RELEASE_NODE`]); `None` or blank: none.
    pub released: Option<&'a str>,
}

/// The operator-owned part of an HAService status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusFields {
    /// The phase.
    pub phase: Phase,
    /// The master (the Lease holder).
    pub active_node: Option<String>,
    /// The standby.
    pub standby_node: Option<String>,
    /// The epoch (the Lease's leaseTransitions), once there is a Lease.
    pub epoch: Option<i64>,
    /// The spec's VIPs, comma-separated.
    pub vips: String,
    /// Ready, Degraded, Reconciling, Stalled.
    pub conditions: Vec<Cond>,
}

/// The result of [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Placement's decision; `None` when the service is refused or being
    /// deleted (then it is stopped).
    pub decision: Option<Decision>,
    /// The service Lease to write, and where the handover stands.
    pub handover: Handover,
    /// The status to publish.
    pub status: StatusFields,
    /// Re-evaluate after this long even without a change (placement's
    /// timers: failback delay, startup grace, failure expiry).
    pub requeue_after: Option<Duration>,
    /// Set when an admin's move request cannot be carried out now: why, and
    /// the fix (also the `Moved` condition's message; announce it as an
    /// Event when it is new).
    pub move_blocked: Option<String>,
    /// Set when a force start cannot be carried out on the node it names:
    /// why, and the fix (the `ForceStarted` condition's message; announce
    /// it as a `ForceStartNotPossible` Event when it is new).
    pub force_blocked: Option<String>,
    /// Set while a force start is in effect (its node's failures are
    /// overridden): the loud warning to announce as a `ForceStarted`
    /// Warning Event the first time.
    pub forced: Option<String>,
}

impl Plan {
    /// Whether the service is stopped everywhere (no holder and nobody may
    /// still run it): a deleted service may be released.
    pub fn stopped(&self) -> bool {
        self.handover.lease.holder.is_none() && self.handover.progress == Progress::Stopped
    }
}

/// Whether an entry reports a failure before anything was started: its
/// only hook results are the agent's refusal marker (script `-`), which the
/// agent writes when the VIPs could not be placed and no hook ran.
pub fn refused_before_start(entry: &ServiceNodeStatus) -> bool {
    entry.state == NodeServiceState::Failed
        && !entry.hooks.is_empty()
        && entry.hooks.iter().all(|h| h.script == "-")
}

/// The handover facts per node: fences, status entries, and which failed
/// entries started nothing.
pub fn node_facts(
    fences: &BTreeMap<String, Fence>,
    status: Option<&HAServiceStatus>,
    started_nothing: &BTreeSet<String>,
) -> BTreeMap<String, NodeFacts> {
    let mut out: BTreeMap<String, NodeFacts> = fences
        .iter()
        .map(|(n, f)| {
            (
                n.clone(),
                NodeFacts {
                    fence: *f,
                    ..Default::default()
                },
            )
        })
        .collect();
    for e in status.map(|s| s.nodes.as_slice()).unwrap_or_default() {
        let f = out.entry(e.node.clone()).or_default();
        f.entry = Some(e.clone());
        f.started_nothing = started_nothing.contains(&e.node) && refused_before_start(e);
    }
    out
}

fn join(nodes: &[String]) -> String {
    nodes.join(", ")
}

/// `kubectl ha ... NAME -n NAMESPACE` arguments for the service `ns/name`.
fn kubectl_target(key: &str) -> String {
    match key.split_once('/') {
        Some((ns, name)) if !ns.is_empty() => format!("{name} -n {ns}"),
        _ => key.to_owned(),
    }
}

/// Why the service cannot be moved to `target` now, as one sentence that
/// names the annotation and the fix; `None` when `target` is eligible (a
/// member whose mode allows services, heartbeat Alive, not cordoned, not
/// failed for this service).
pub fn move_blocker(
    cluster: &ClusterView,
    svc: &ServiceView,
    cluster_name: &str,
    target: &str,
) -> Option<String> {
    blocker(annotations::MOVE_TO, cluster, svc, cluster_name, target)
}

/// Why the service cannot be started by force on `target` now (see
/// [`annotations::FORCE_START`]), naming the annotation and the fix; `None`
/// when it can: `target` is eligible once this service's failures there
/// are left out, and it is not `unclean` (its status entry reports an
/// `uncleanEpoch`: a node that may still run the service from an earlier
/// epoch is never forced, as that could make two holders).
pub fn force_blocker(
    cluster: &ClusterView,
    svc: &ServiceView,
    cluster_name: &str,
    target: &str,
    unclean: bool,
) -> Option<String> {
    let svc_args = kubectl_target(&svc.key);
    if unclean {
        return Some(format!(
            "{} asks for {target}, but {target} may not have left the service cleanly (uncleanEpoch), so it is not forced: a leave must succeed there first (or clear it: kubectl ha clear {svc_args}, which also withdraws the request), or withdraw the request (kubectl annotate haservice {svc_args} {}-)",
            annotations::FORCE_START,
            annotations::FORCE_START
        ));
    }
    let mut forced = svc.clone();
    forced.failures.remove(target);
    blocker(
        annotations::FORCE_START,
        cluster,
        &forced,
        cluster_name,
        target,
    )
}

/// [`move_blocker`] for the request in annotation `annotation`.
fn blocker(
    annotation: &str,
    cluster: &ClusterView,
    svc: &ServiceView,
    cluster_name: &str,
    target: &str,
) -> Option<String> {
    let svc_args = kubectl_target(&svc.key);
    let (why, fix) = match cluster.members.iter().find(|n| n.name == target) {
        None => (
            format!("{target} is not a member of HACluster {cluster_name}"),
            format!("name a member (kubectl ha status --cluster {cluster_name})"),
        ),
        Some(node) if placement::eligible(cluster, svc, node) => return None,
        Some(node) if !node.mode.allows_services() => (
            format!("{target} is in mode {}, which runs no services", node.mode),
            format!(
                "set it to default (kubectl ha mode {target} default --cluster {cluster_name})"
            ),
        ),
        Some(node) if node.heartbeat != HeartbeatState::Alive => (
            format!("{target}'s heartbeat is {:?}", node.heartbeat),
            "make sure its kubeha-agent runs and renews its heartbeat".to_owned(),
        ),
        Some(node) if node.cordoned => (
            format!("{target} is cordoned"),
            format!("uncordon it (kubectl uncordon {target})"),
        ),
        Some(_) => (
            format!(
                "{target} has failed for this service (fail count {}, migration threshold {})",
                svc.failures.get(target).map_or(0, |f| f.count),
                svc.migration_threshold.max(1)
            ),
            format!(
                "clear its failures (kubectl ha clear {svc_args}; that also drops the move request) and move again"
            ),
        ),
    };
    Some(format!(
        "{annotation} asks for {target}, but {why}, so the service stays where it is; {fix}, or withdraw the request (kubectl annotate haservice {svc_args} {annotation}-)"
    ))
}

/// `cluster` with `released` (if a member) counted as cordoned: no service
/// is kept or placed there while the release stands.
fn with_release(cluster: &ClusterView, released: Option<&str>) -> Option<ClusterView> {
    let node = released.map(str::trim).filter(|n| !n.is_empty())?;
    let mut view = cluster.clone();
    view.members
        .iter_mut()
        .filter(|m| m.name == node)
        .for_each(|m| m.cordoned = true);
    Some(view)
}

/// Decides placement, handover and status for one service.
pub fn plan(f: &Facts<'_>) -> Plan {
    let released_view = with_release(f.cluster, f.released);
    let cluster = released_view.as_ref().unwrap_or(f.cluster);
    let force_start = f.force_start.map(str::trim).filter(|n| !n.is_empty());
    let mut force_blocked = None;
    let facts = node_facts(f.fences, f.status, f.started_nothing);
    let entries = f.status.map(|s| s.nodes.as_slice()).unwrap_or_default();
    let entry = |n: &str| entries.iter().find(|e| e.node == n);
    // The forced node failed again since the force was asked: its
    // failures are no longer overridden (no retry at every new epoch, and
    // the service may fail over again).
    let force_failed = force_start.is_some_and(|t| {
        f.force_fail_count
            .is_some_and(|n| entry(t).is_some_and(|e| e.fail_count > n))
    });
    let move_to = f.move_to.map(str::trim).filter(|n| !n.is_empty());
    let mut move_blocked = None;

    let decision = if f.refusal.is_some() || f.deleting {
        None
    } else {
        let view = ServiceView {
            key: f.key.to_owned(),
            preferred_nodes: f.spec.preferred_nodes.clone(),
            failback: f.spec.failback.clone(),
            migration_threshold: f.spec.migration_threshold,
            failure_timeout: (f.spec.failure_timeout_seconds > 0).then(|| {
                Duration::from_secs(u64::try_from(f.spec.failure_timeout_seconds).unwrap_or(0))
            }),
            failures: f.failures.clone(),
            current_master: f.lease.and_then(|l| l.holder.clone()),
            current_standby: f.lease.and_then(|l| l.standby.clone()),
            current_phase: f.status.and_then(|s| s.phase),
            ever_active: f.lease.is_some_and(|l| l.enter_epoch.is_some()),
            errored: false,
            leave_failed_on: handover::leave_failed_on(f.lease, &facts),
        };
        let mut view = view;
        if let Some(target) = move_to {
            move_blocked = move_blocker(cluster, &view, &f.spec.cluster_ref, target);
            if move_blocked.is_none() {
                // First choice, and moved there at once whatever the
                // failback policy: only toward this node, since it now
                // ranks first among the eligible ones.
                view.preferred_nodes.retain(|n| n != target);
                view.preferred_nodes.insert(0, target.to_owned());
                view.failback = Some(Failback {
                    policy: FailbackPolicy::Automatic,
                    delay_seconds: 0,
                });
            }
        }
        if let Some(target) = force_start.filter(|_| !force_failed) {
            let unclean = entry(target).is_some_and(|e| e.unclean_epoch.is_some());
            force_blocked = match f.force_fail_count {
                // Without the fail count at the request, a failure after
                // it could not be told from one before: every failure
                // would be overridden, at every new epoch.
                None => Some(format!(
                    "{} asks for {target}, but {} is missing or not a number, so a failure after the force could not be told from the ones it overrides and it is not forced: ask with kubectl ha force-start {} --on {target}, which writes both",
                    annotations::FORCE_START,
                    annotations::FORCE_START_FAIL_COUNT,
                    kubectl_target(f.key)
                )),
                Some(_) => force_blocker(cluster, &view, &f.spec.cluster_ref, target, unclean),
            };
            if force_blocked.is_none() {
                // The override of the Errored state: this node's failures
                // for this service do not count, and it goes first, as
                // with a move (a force start wins over a move request).
                view.failures.remove(target);
                view.errored = false;
                view.preferred_nodes.retain(|n| n != target);
                view.preferred_nodes.insert(0, target.to_owned());
                view.failback = Some(Failback {
                    policy: FailbackPolicy::Automatic,
                    delay_seconds: 0,
                });
            }
        }
        placement::place(cluster, std::slice::from_ref(&view))
            .into_iter()
            .next()
    };

    let (master, standby) = match &decision {
        Some(d) => (d.master.as_deref(), d.standby.as_deref()),
        None => (None, None),
    };
    let h = handover::handover(handover::Input {
        current: f.lease,
        master,
        standby,
        facts: &facts,
    });

    let epoch = h.lease.epoch;
    let holder = h.lease.holder.clone();
    let running_here = holder
        .as_deref()
        .and_then(entry)
        .is_some_and(|e| e.state == NodeServiceState::Running && e.epoch == Some(epoch));
    let phase = match (&holder, &h.progress) {
        (Some(_), Progress::Cleared) if running_here => Phase::Active,
        (Some(_), _) => Phase::Starting,
        (None, Progress::Stopping { .. }) => Phase::Stopping,
        (None, _) => match &decision {
            Some(d) if d.phase != Phase::Active && d.phase != Phase::Starting => d.phase,
            _ => Phase::Pending,
        },
    };

    let mut conditions = Vec::new();
    // Stalled: nothing progresses until someone changes something.
    let stalled = Cond::first_problem(
        STALLED,
        [
            f.refusal.as_ref().map(|r| (r.reason, r.message.clone())),
            decision
                .as_ref()
                .filter(|d| d.reason == Reason::ProhibitedModes)
                .map(|d| {
                    (
                        d.reason.as_str(),
                        "the members' modes of the cluster form a prohibited combination; the assignment is frozen until an admin fixes them (see the HACluster's conditions)".to_owned(),
                    )
                }),
            (phase == Phase::Errored).then(|| {
                (
                    "AllFailed",
                    "every member that may run the service has reached the migration threshold; it stays stopped until a failure expires (failureTimeoutSeconds) or an admin clears the failures".to_owned(),
                )
            }),
        ],
        "Progressing",
    );
    conditions.push(stalled);

    let ready = match phase {
        Phase::Active => Cond::yes(
            READY,
            "Active",
            format!(
                "running on {} at epoch {epoch}",
                holder.clone().unwrap_or_default()
            ),
        ),
        other => {
            // A holder being entered is told by holder and epoch, not by
            // placement's reason: that reason says why this very evaluation
            // changed the holder (Failback, Failover, ...) and reads
            // Unchanged on the next one, and a message that flips costs a
            // status write between the Lease write and the old master's
            // acknowledgement, on the way of every switchover.
            let why = match (&decision, &f.refusal, &holder) {
                (_, Some(r), _) => r.message.clone(),
                (Some(_), None, Some(hn)) => format!("{hn} enters at epoch {epoch}"),
                (Some(d), None, None) => format!("placement: {}", d.reason),
                (None, None, _) => "being deleted".to_owned(),
            };
            Cond::no(READY, format!("{other:?}"), why)
        }
    };
    conditions.push(ready);

    let reconciling = match (&holder, &h.progress) {
        (Some(hn), Progress::Waiting { nodes, epoch: e }) => Cond::yes(
            RECONCILING,
            "WaitingForLeave",
            format!(
                "{hn} enters at epoch {epoch} once {} left epoch {e} (acknowledged) or is fenced",
                join(nodes)
            ),
        ),
        (Some(hn), Progress::Cleared) if !running_here => Cond::yes(
            RECONCILING,
            "Entering",
            format!("{hn} is cleared to enter at epoch {epoch}; waiting for it to report Running"),
        ),
        (None, Progress::Stopping { nodes, epoch: e }) => Cond::yes(
            RECONCILING,
            "Stopping",
            format!(
                "waiting for {} to leave epoch {e} (acknowledge) or be fenced",
                join(nodes)
            ),
        ),
        _ => Cond::no(RECONCILING, "Settled", ""),
    };
    conditions.push(reconciling);

    let failed: Vec<String> = entries
        .iter()
        .filter(|e| e.state == NodeServiceState::Failed)
        .map(|e| format!("{} (fail count {})", e.node, e.fail_count))
        .collect();
    let degraded = Cond::first_problem(
        DEGRADED,
        [
            decision
                .as_ref()
                .filter(|d| d.reason == Reason::WaitingForFence)
                .map(|d| {
                    let node = handover::leave_failed_on(f.lease, &facts).unwrap_or_default();
                    (
                        d.reason.as_str(),
                        format!(
                            "{node} failed to leave and may still run the service; it moves once {node}'s heartbeat is Lost or an admin sets it peerdown"
                        ),
                    )
                }),
            (!failed.is_empty())
                .then(|| ("NodeFailed", format!("failed on {}", failed.join(", ")))),
            (matches!(phase, Phase::Active | Phase::Starting) && h.lease.standby.is_none())
                .then(|| ("NoStandby", "no other eligible member can take over".to_owned())),
        ],
        "Redundant",
    );
    conditions.push(degraded);

    // Moved: only while an admin's move request stands.
    if let (Some(target), Some(d)) = (move_to, &decision) {
        let moved = if let Some(why) = &move_blocked {
            Cond::no(MOVED, "TargetNotEligible", why.clone())
        } else if holder.as_deref() == Some(target) && phase == Phase::Active {
            Cond::yes(
                MOVED,
                "OnTarget",
                format!(
                    "runs on {target} as {} asks; the request stays until it is removed (kubectl annotate haservice {} {}-)",
                    annotations::MOVE_TO,
                    kubectl_target(f.key),
                    annotations::MOVE_TO
                ),
            )
        } else if holder.as_deref() == Some(target) {
            // Stable from the Lease write to the report of Running (see
            // Ready above).
            Cond::no(
                MOVED,
                "Moving",
                format!(
                    "moving to {target} as {} asks: it enters there at epoch {epoch}",
                    annotations::MOVE_TO
                ),
            )
        } else {
            Cond::no(
                MOVED,
                "Moving",
                format!(
                    "moving to {target} as {} asks (placement: {})",
                    annotations::MOVE_TO,
                    d.reason
                ),
            )
        };
        conditions.push(moved);
    }

    // ForceStarted: only while a force start request stands.
    let mut forced = None;
    if let (Some(target), Some(_)) = (force_start, &decision) {
        let cond = if force_failed {
            Cond::no(
                FORCE_STARTED,
                "ForcedStartFailed",
                format!(
                    "{target} failed again after the force start ({} {}), so its failures are no longer overridden and the service is placed as usual; fix the service there and clear it (kubectl ha clear {}), then force again",
                    annotations::FORCE_START_FAIL_COUNT,
                    f.force_fail_count.unwrap_or_default(),
                    kubectl_target(f.key)
                ),
            )
        } else if let Some(why) = &force_blocked {
            Cond::no(FORCE_STARTED, "TargetNotEligible", why.clone())
        } else if holder.as_deref() == Some(target) && phase == Phase::Active {
            Cond::yes(
                FORCE_STARTED,
                "ForceStarted",
                format!(
                    "started by force on {target} at epoch {epoch} ({}), its failures there overridden; this stays until kubectl ha clear {}",
                    annotations::FORCE_START,
                    kubectl_target(f.key)
                ),
            )
        } else {
            Cond::no(
                FORCE_STARTED,
                "Starting",
                format!(
                    "starting by force on {target} ({}): the current holder leaves (or is fenced) first, then {target} enters at a new epoch",
                    annotations::FORCE_START
                ),
            )
        };
        if force_blocked.is_none() && !force_failed {
            forced = Some(format!(
                "FORCE START of {} on {target} ({}): its failures there are overridden and it starts there through the handover even though placement would not choose it; make sure {target} can run it. Withdraw with kubectl ha clear {}",
                f.key,
                annotations::FORCE_START,
                kubectl_target(f.key)
            ));
        }
        conditions.push(cond);
    }

    let has_lease = f.lease.is_some() || h.write;
    Plan {
        requeue_after: decision.as_ref().and_then(|d| d.requeue_after),
        status: StatusFields {
            phase,
            active_node: holder,
            standby_node: h.lease.standby.clone(),
            epoch: has_lease.then_some(epoch),
            vips: f
                .spec
                .vips
                .iter()
                .map(|v| v.address.as_str())
                .collect::<Vec<_>>()
                .join(","),
            conditions,
        },
        decision,
        handover: h,
        move_blocked,
        force_blocked,
        forced,
    }
}

#[cfg(test)]
mod tests;
