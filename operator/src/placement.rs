//! Placement: which member runs each service (the master) and which one
//! stands by for it (the vicemaster).
//!
//! [`place`] is a pure function of the cluster view (members, their modes,
//! heartbeat states, cordons), the services (preferred nodes, failback,
//! fail counts, current assignment) and the time, which is passed in as
//! durations. It does no I/O and reads no clock, so the same input always
//! gives the same decisions; the reconciler gathers the views, calls it and
//! carries out what it returns (service Lease, status, Events, requeue).
//!
//! The rules, in the order they are applied to each service:
//!
//! 1. **Latched error**: a service an admin has not cleared since it was
//!    `Errored` stays stopped ([`Reason::ErrorLatched`]). This is checked
//!    before the mode rules because stopping never risks two active nodes.
//!    **Cluster stopped** (`spec.stopped`, `kubectl ha stop`): no master, no
//!    standby, phase `Suspended` ([`Reason::ClusterStopped`]); the holder
//!    leaves through the ordinary handover, so nothing is fenced.
//! 2. **Prohibited modes** ([`check_modes`]): the assignment is frozen as it
//!    is (master, standby and phase unchanged) and the reason is
//!    [`Reason::ProhibitedModes`], so the operator reports the state and
//!    moves the cluster back to a valid one; placement itself moves nothing
//!    while the admin's intent is contradictory.
//! 3. **Leave failed**: while a node whose leave failed is not certainly
//!    fenced (heartbeat `Lost` or `Fenced`, or mode `peerdown`), no other node
//!    may become master. The service waits stopped
//!    ([`Reason::WaitingForFence`]) unless that very node is still the
//!    master and still eligible, in which case it stays there.
//! 4. **Current master eligible**: it stays, unless failback is `Automatic`
//!    and the node placement would choose from scratch ranks before it and
//!    has been eligible for the failback delay ([`Reason::Failback`]); before
//!    that the decision asks to be requeued when the delay runs out.
//! 5. **Current master not eligible**: the first eligible candidate takes
//!    over ([`Reason::Failover`]).
//! 6. **No master**: a service that has never been active waits during the
//!    startup grace for its primary node to heartbeat
//!    ([`Reason::StartupGrace`]); otherwise it goes to the first eligible
//!    candidate ([`Reason::Initial`]).
//! 7. **Nowhere to go**: see [`Reason::AllFailed`], [`Reason::Locked`] and
//!    [`Reason::NoEligibleNode`].
//!
//! Candidates are ordered by the service's preferred nodes (in their order,
//! names that are not members ignored), then by the cluster's placement
//! order (`Alphabetical`: member names sorted; `Ordered`: member order). The
//! standby is the first eligible candidate other than the master: the node
//! a failover would pick. Services are placed independently of each other
//! (no spreading, no colocation).

use std::collections::BTreeMap;
use std::time::Duration;

use kubeha_crds::cluster::{Failback, FailbackPolicy, HeartbeatState, Placement};
use kubeha_crds::mode::{Mode, check_modes};
use kubeha_crds::service::Phase;

/// What placement knows about one member node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Name of the Kubernetes Node.
    pub name: String,
    /// The administrative mode in force.
    pub mode: Mode,
    /// The heartbeat state as judged by the operator's own clock.
    pub heartbeat: HeartbeatState,
    /// Whether the node is cordoned for a drain (no new or kept services).
    pub cordoned: bool,
    /// How long the node has been continuously `Alive`, uncordoned and in a
    /// mode that allows services; drives the failback delay. Ignored while
    /// the node is not eligible.
    pub eligible_for: Duration,
}

/// What placement knows about the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterView {
    /// The members, in `spec.members.nodes` order (selected members after
    /// the listed ones). A name appearing twice counts once, first entry
    /// wins.
    pub members: Vec<NodeView>,
    /// How the cluster orders candidates after the preferred nodes.
    pub placement: Placement,
    /// The cluster's default failback policy; a service may override it.
    pub failback: Failback,
    /// How long a never-active service waits for its primary node to
    /// heartbeat before it is placed elsewhere.
    pub startup_grace: Duration,
    /// Time since the operator started or the cluster was created,
    /// whichever is later.
    pub since_start: Duration,
    /// The cluster is stopped on purpose (`spec.stopped`): nothing is placed.
    pub stopped: bool,
}

/// Failures counted against one node for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failures {
    /// Failures counted (failed enter, failed monitor).
    pub count: i32,
    /// Time since the last of them.
    pub last_failure_ago: Duration,
    /// The node reports a master role it may not have left cleanly
    /// (`uncleanEpoch`): it enters nothing until a leave succeeds there or
    /// an admin clears it, so it is not eligible, whatever the count and
    /// the timeout say.
    pub unclean: bool,
}

/// What placement knows about one service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceView {
    /// The service, as `namespace/name`; copied into its [`Decision`].
    pub key: String,
    /// Nodes to prefer, best first, before the cluster's order.
    pub preferred_nodes: Vec<String>,
    /// The service's failback override; `None` uses the cluster's.
    pub failback: Option<Failback>,
    /// Failures on one node after which that node is ineligible for this
    /// service. Values below 1 count as 1.
    pub migration_threshold: i32,
    /// Time after the last failure at which a node's failures stop counting.
    /// `None`: never (the API's `failureTimeoutSeconds: 0`); only an admin's
    /// clear resets them.
    pub failure_timeout: Option<Duration>,
    /// Failures per node name; nodes without an entry have none.
    pub failures: BTreeMap<String, Failures>,
    /// The node the service is assigned to now (the service Lease holder).
    pub current_master: Option<String>,
    /// The designated standby now.
    pub current_standby: Option<String>,
    /// The phase reported in status now; `None` before the first status.
    pub current_phase: Option<Phase>,
    /// Whether the service has ever been active anywhere (ends the startup
    /// grace for it).
    pub ever_active: bool,
    /// The service went `Errored` and an admin has not cleared it yet: it
    /// stays stopped whatever else changes.
    pub errored: bool,
    /// A node whose leave failed: it may still run the service, so no other
    /// node may take it until this one is certainly fenced. The operator
    /// clears it when the node acknowledges a successful leave, when an
    /// admin clears the service, or after the fence.
    pub leave_failed_on: Option<String>,
}

/// Why placement decided what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The master stays where it is (the standby may still change).
    Unchanged,
    /// The service had no master and gets one: first placement, or placed
    /// again after it was stopped.
    Initial,
    /// The master is not eligible any more; the first eligible candidate
    /// takes over.
    Failover,
    /// Automatic failback: a better node has been eligible for the delay.
    Failback,
    /// A never-active service waits, within the startup grace, for its
    /// primary node to heartbeat.
    StartupGrace,
    /// No node is eligible for now (heartbeats not Alive, cordons), but
    /// nothing says the service has failed: it stays `Pending`.
    NoEligibleNode,
    /// A node whose leave failed may still run the service: wait until its
    /// heartbeat is `Lost` or `Fenced`, or an admin sets it `peerdown`.
    WaitingForFence,
    /// The members' modes form a prohibited combination; the assignment is
    /// frozen until the modes are valid again.
    ProhibitedModes,
    /// No member is in a mode that allows services (all `locked` or
    /// `peerdown`, or no members): the service is `Suspended`.
    Locked,
    /// Every member whose mode allows services has reached the migration
    /// threshold for this service: the service is `Errored`.
    AllFailed,
    /// The service is latched `Errored` until an admin clears it.
    ErrorLatched,
    /// The whole cluster is stopped (`spec.stopped`): the service is
    /// `Suspended` on every node until `kubectl ha start`.
    ClusterStopped,
}

impl Reason {
    /// A stable name for logs, Events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unchanged => "Unchanged",
            Reason::Initial => "Initial",
            Reason::Failover => "Failover",
            Reason::Failback => "Failback",
            Reason::StartupGrace => "StartupGrace",
            Reason::NoEligibleNode => "NoEligibleNode",
            Reason::WaitingForFence => "WaitingForFence",
            Reason::ProhibitedModes => "ProhibitedModes",
            Reason::Locked => "Locked",
            Reason::AllFailed => "AllFailed",
            Reason::ErrorLatched => "ErrorLatched",
            Reason::ClusterStopped => "ClusterStopped",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Placement's decision for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The service, as `namespace/name`.
    pub key: String,
    /// The node that should run the service; `None`: stopped everywhere.
    pub master: Option<String>,
    /// The designated standby (vicemaster).
    pub standby: Option<String>,
    /// The phase to report. A new master gives `Starting`; a kept master
    /// keeps `Active` if the service was `Active`, otherwise `Starting` (the
    /// operator turns `Starting` into `Active` once the agent reports the
    /// service running).
    pub phase: Phase,
    /// Why.
    pub reason: Reason,
    /// Evaluate again after this long even if nothing is observed to change:
    /// a failback delay, the startup grace or a failure timeout runs out.
    /// With phase `Errored` and reason [`Reason::AllFailed`], `Some` means
    /// the error lifts by itself when a failure expires; latch the service
    /// (`errored`) only when it is `None`.
    pub requeue_after: Option<Duration>,
}

/// Whether `node` may run `svc` now: it is a member of `cluster`, its mode
/// allows services (`default`, `single`, `config`), its heartbeat is
/// `Alive`, it is not cordoned, and it has not failed for this service
/// (fail count at or above the migration threshold, not yet expired by the
/// failure timeout).
pub fn eligible(cluster: &ClusterView, svc: &ServiceView, node: &NodeView) -> bool {
    cluster.members.iter().any(|m| m.name == node.name) && capable(node) && !failed(svc, &node.name)
}

/// Decides master, standby and phase for every service, in input order.
/// See the module documentation for the rules.
pub fn place(cluster: &ClusterView, services: &[ServiceView]) -> Vec<Decision> {
    let modes_valid = check_modes(
        unique_members(cluster)
            .iter()
            .map(|n| (n.name.as_str(), n.mode)),
    )
    .is_ok();
    services
        .iter()
        .map(|svc| place_one(cluster, svc, modes_valid))
        .collect()
}

/// Alive, uncordoned, in a mode that allows services: eligible but for this
/// service's failures.
fn capable(node: &NodeView) -> bool {
    node.mode.allows_services() && node.heartbeat == HeartbeatState::Alive && !node.cordoned
}

/// Whether the node's failures for this service make it ineligible now.
fn failed(svc: &ServiceView, node: &str) -> bool {
    svc.failures.get(node).is_some_and(|f| {
        f.unclean || (f.count >= svc.migration_threshold.max(1) && !expired(svc, f))
    })
}

fn expired(svc: &ServiceView, f: &Failures) -> bool {
    svc.failure_timeout
        .is_some_and(|timeout| f.last_failure_ago >= timeout)
}

/// Members with duplicates removed (first entry wins), in member order.
fn unique_members(cluster: &ClusterView) -> Vec<&NodeView> {
    let mut out: Vec<&NodeView> = Vec::with_capacity(cluster.members.len());
    for node in &cluster.members {
        if !out.iter().any(|n| n.name == node.name) {
            out.push(node);
        }
    }
    out
}

fn member<'a>(cluster: &'a ClusterView, name: &str) -> Option<&'a NodeView> {
    cluster.members.iter().find(|n| n.name == name)
}

/// Preferred nodes (members only, in their order), then the cluster order.
fn candidates<'a>(cluster: &'a ClusterView, svc: &ServiceView) -> Vec<&'a NodeView> {
    let mut order = unique_members(cluster);
    if cluster.placement == Placement::Alphabetical {
        order.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let mut out: Vec<&NodeView> = Vec::with_capacity(order.len());
    for name in &svc.preferred_nodes {
        if let Some(node) = order.iter().find(|n| &n.name == name)
            && !out.iter().any(|n| n.name == node.name)
        {
            out.push(node);
        }
    }
    for node in order {
        if !out.iter().any(|n| n.name == node.name) {
            out.push(node);
        }
    }
    out
}

/// A node is certainly not running anything: its heartbeat expired (it
/// fenced itself) or was fenced, or an admin certified it powered off.
/// A name that is not a member cannot be judged and is not fenced.
fn fenced(cluster: &ClusterView, name: &str) -> bool {
    member(cluster, name).is_some_and(|n| {
        n.mode == Mode::Peerdown
            || matches!(n.heartbeat, HeartbeatState::Lost | HeartbeatState::Fenced)
    })
}

fn failback_delay(fb: &Failback) -> Option<Duration> {
    match fb.policy {
        FailbackPolicy::Never => None,
        FailbackPolicy::Automatic => Some(Duration::from_secs(
            u64::try_from(fb.delay_seconds).unwrap_or(0),
        )),
    }
}

/// The shortest time after which a failure that alone keeps a node
/// ineligible expires.
fn failure_requeue(cluster: &ClusterView, svc: &ServiceView) -> Option<Duration> {
    let timeout = svc.failure_timeout?;
    unique_members(cluster)
        .into_iter()
        .filter(|n| capable(n) && failed(svc, &n.name))
        .filter_map(|n| svc.failures.get(&n.name))
        .filter(|f| !f.unclean)
        .map(|f| timeout.saturating_sub(f.last_failure_ago))
        .min()
}

fn min_requeue(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn kept_phase(svc: &ServiceView) -> Phase {
    if svc.current_phase == Some(Phase::Active) {
        Phase::Active
    } else {
        Phase::Starting
    }
}

fn place_one(cluster: &ClusterView, svc: &ServiceView, modes_valid: bool) -> Decision {
    let decide = |master: Option<String>,
                  standby: Option<String>,
                  phase: Phase,
                  reason: Reason,
                  requeue_after: Option<Duration>| Decision {
        key: svc.key.clone(),
        master,
        standby,
        phase,
        reason,
        requeue_after,
    };

    // 1. A latched error keeps the service stopped until an admin clears it.
    if svc.errored {
        return decide(None, None, Phase::Errored, Reason::ErrorLatched, None);
    }

    // 1b. A stopped cluster places nothing (stopping never risks two holders).
    if cluster.stopped {
        return decide(None, None, Phase::Suspended, Reason::ClusterStopped, None);
    }

    // 2. Prohibited modes: freeze the assignment as it is.
    if !modes_valid {
        let phase = svc
            .current_phase
            .unwrap_or(if svc.current_master.is_some() {
                Phase::Starting
            } else {
                Phase::Pending
            });
        return decide(
            svc.current_master.clone(),
            svc.current_standby.clone(),
            phase,
            Reason::ProhibitedModes,
            None,
        );
    }

    let order = candidates(cluster, svc);
    let eligible_order: Vec<&NodeView> = order
        .iter()
        .copied()
        .filter(|n| !failed(svc, &n.name) && capable(n))
        .collect();
    let standby_for = |master: &str| {
        eligible_order
            .iter()
            .find(|n| n.name != master)
            .map(|n| n.name.clone())
    };
    let current = svc
        .current_master
        .as_deref()
        .and_then(|name| member(cluster, name));
    let current_eligible = current.filter(|n| eligible(cluster, svc, n));

    // 3. A failed leave: nobody else may take the service before the fence.
    let fence_pending = svc
        .leave_failed_on
        .as_deref()
        .filter(|name| !fenced(cluster, name));
    if let Some(unfenced) = fence_pending {
        return match current_eligible {
            Some(node) if node.name == unfenced => decide(
                Some(node.name.clone()),
                standby_for(&node.name),
                kept_phase(svc),
                Reason::Unchanged,
                None,
            ),
            _ => decide(None, None, Phase::Stopping, Reason::WaitingForFence, None),
        };
    }

    let expiry = failure_requeue(cluster, svc);

    // 4. The master is still eligible: keep it, or fail back.
    if let Some(node) = current_eligible {
        let best = eligible_order.first().copied().unwrap_or(node);
        let delay = failback_delay(svc.failback.as_ref().unwrap_or(&cluster.failback));
        if let Some(delay) = delay
            && best.name != node.name
        {
            if best.eligible_for >= delay {
                return decide(
                    Some(best.name.clone()),
                    standby_for(&best.name),
                    Phase::Starting,
                    Reason::Failback,
                    expiry,
                );
            }
            let wait = delay.saturating_sub(best.eligible_for);
            return decide(
                Some(node.name.clone()),
                standby_for(&node.name),
                kept_phase(svc),
                Reason::Unchanged,
                min_requeue(Some(wait), expiry),
            );
        }
        return decide(
            Some(node.name.clone()),
            standby_for(&node.name),
            kept_phase(svc),
            Reason::Unchanged,
            expiry,
        );
    }

    // 5. The master is not eligible any more: fail over.
    // 6. No master: startup grace, then the first eligible candidate.
    let reason = if svc.current_master.is_some() || svc.leave_failed_on.is_some() {
        Reason::Failover
    } else {
        if !svc.ever_active && cluster.since_start < cluster.startup_grace {
            let primary = order
                .iter()
                .find(|n| n.mode.allows_services() && !n.cordoned && !failed(svc, &n.name));
            if let Some(primary) = primary
                && primary.heartbeat != HeartbeatState::Alive
            {
                let wait = cluster.startup_grace.saturating_sub(cluster.since_start);
                return decide(
                    None,
                    None,
                    Phase::Pending,
                    Reason::StartupGrace,
                    min_requeue(Some(wait), expiry),
                );
            }
        }
        Reason::Initial
    };
    if let Some(first) = eligible_order.first() {
        return decide(
            Some(first.name.clone()),
            standby_for(&first.name),
            Phase::Starting,
            reason,
            expiry,
        );
    }

    // 7. Nowhere to go.
    let by_mode: Vec<&NodeView> = unique_members(cluster)
        .into_iter()
        .filter(|n| n.mode.allows_services())
        .collect();
    if by_mode.is_empty() {
        decide(None, None, Phase::Suspended, Reason::Locked, expiry)
    } else if by_mode.iter().all(|n| failed(svc, &n.name)) {
        decide(None, None, Phase::Errored, Reason::AllFailed, expiry)
    } else {
        decide(None, None, Phase::Pending, Reason::NoEligibleNode, expiry)
    }
}
