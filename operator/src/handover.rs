//! Handover: the service Lease the operator writes, computed from the Lease
//! as it is, placement's decision and what the operator knows of each node.
//! Pure, so the protocol is tested without a cluster.
//!
//! # The protocol (agents side, fixed)
//!
//! The service Lease says who should be master (`spec.holderIdentity`), the
//! epoch (`spec.leaseTransitions`), the standby (annotation
//! `kubeha.io/standby`) and the epoch the holder may enter (annotation
//! `kubeha.io/enter-epoch`). An agent enters master only when it is the
//! holder and enter-epoch equals leaseTransitions; a master that stops being
//! the holder leaves and reports the epoch it left as `ackedEpoch` in its
//! status entry.
//!
//! # Clearance
//!
//! At most one node at a time holds a clearance: the node named in the
//! operator's own annotation [`CLEARED_NODE_ANNOTATION`] was cleared to
//! enter at epoch c = enter-epoch. A new holder H at epoch E > c is cleared
//! (enter-epoch := E, cleared-node := H, in one write) only when that
//! previous node P certainly runs nothing ([`Proof`]):
//!
//! - P acknowledged: its entry's `ackedEpoch >= c`;
//! - P is fenced: heartbeat Lost or Fenced by the operator's clock, or mode
//!   `peerdown`;
//! - P moved on: its entry reports a later epoch than c in a role other
//!   than master, stopped or failed (an agent never acts on an older epoch
//!   again, and it reports its role after each step);
//! - P started nothing: its entry reports a failure at epoch c or later
//!   whose only results are the agent's refusal marker (script `-`: the
//!   VIPs could not be placed, no hook ran), and the operator has seen that
//!   entry for at least E = D + skew, so any VIP added before the refusal
//!   has outlived its kernel lifetime (the reconciler computes this as
//!   [`NodeFacts::started_nothing`]);
//! - nobody was ever cleared (no Lease yet): the first placement writes
//!   holder, epoch 1 and enter-epoch 1 at once.
//!
//! Otherwise enter-epoch stays at its old value (it is never cleared or
//! lowered) and the new holder waits. Even when the service moves back to
//! P itself, P must prove it left c first: an agent that is still running
//! at c and is cleared again would keep c as its own epoch and later
//! acknowledge c, not the new epoch, so the operator makes it leave and
//! enter again (its hooks run once more) to keep epochs and
//! acknowledgements in step. A Lease whose clearance the operator
//! cannot attribute (annotations edited by hand) is treated as if any node
//! could have been cleared at any epoch up to the current one: every node
//! but H must give a proof.
//!
//! # State machine
//!
//! ```text
//!               master A, no Lease
//!   (none) ─────────────────────────────▶ Cleared(A, e=1)
//!
//!   Cleared(A, e) ── master B ──▶ Waiting(B, e+1, for A@e) ── A proves ──▶ Cleared(B, e+1)
//!        │                               │  master C: Waiting(C, e+2, for A@e)
//!        │                               └─ master A: Waiting(A, e+2, for A@e)
//!        └── master none ──▶ Stopping(e+1, A@e) ── A proves ──▶ Stopped(e+1)
//!
//!   Stopped(e) ── master B ──▶ Cleared(B, e+1)   (the last cleared node proved)
//!   any state ── standby change only ──▶ same epoch, annotation rewritten
//! ```
//!
//! The holder changing always bumps the epoch; the standby changing alone
//! does not. Nothing is written when nothing changes.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use kubeha_crds::leases;
use kubeha_crds::service::{HAServiceStatus, NodeServiceState, Role, ServiceNodeStatus};

/// Operator-private annotation on a service Lease: the node that was cleared
/// to enter at the epoch in `kubeha.io/enter-epoch`. Agents ignore it; the
/// operator needs it because the holder may have changed since.
pub const CLEARED_NODE_ANNOTATION: &str = "kubeha.io/cleared-node";

/// The handover-relevant content of a service Lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// `spec.holderIdentity`: the master; `None` (or empty) is nobody.
    pub holder: Option<String>,
    /// `spec.leaseTransitions`: the epoch.
    pub epoch: i64,
    /// Annotation `kubeha.io/standby`: the vicemaster.
    pub standby: Option<String>,
    /// Annotation `kubeha.io/enter-epoch`: the last epoch a holder was
    /// cleared to enter.
    pub enter_epoch: Option<i64>,
    /// Annotation [`CLEARED_NODE_ANNOTATION`]: who was cleared then.
    pub cleared_node: Option<String>,
}

fn non_empty(s: Option<&String>) -> Option<String> {
    s.filter(|s| !s.is_empty()).cloned()
}

impl LeaseState {
    /// Reads a Lease; missing or malformed fields read as absent.
    /// The fields the agent reads too come from the one codec,
    /// [`leases::ServiceLeaseFields`].
    pub fn from_lease(lease: &Lease) -> Self {
        let fields = leases::ServiceLeaseFields::read(lease);
        let annotations = lease.metadata.annotations.as_ref();
        Self {
            holder: fields.holder,
            epoch: fields.epoch.unwrap_or(0),
            standby: fields.standby,
            enter_epoch: fields.enter_epoch,
            cleared_node: non_empty(annotations.and_then(|a| a.get(CLEARED_NODE_ANNOTATION))),
        }
    }

    /// Whether the holder may enter (what the agent checks).
    pub fn holder_may_enter(&self) -> bool {
        self.holder.is_some() && self.enter_epoch == Some(self.epoch)
    }

    /// The three annotations as written (empty string for none).
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(
            leases::STANDBY_ANNOTATION.to_owned(),
            self.standby.clone().unwrap_or_default(),
        );
        if let Some(e) = self.enter_epoch {
            out.insert(leases::ENTER_EPOCH_ANNOTATION.to_owned(), e.to_string());
        }
        if let Some(n) = &self.cleared_node {
            out.insert(CLEARED_NODE_ANNOTATION.to_owned(), n.clone());
        }
        out
    }

    /// The epoch as `leaseTransitions` (saturating).
    pub fn lease_transitions(&self) -> i32 {
        i32::try_from(self.epoch).unwrap_or(i32::MAX)
    }
}

/// How a node may still run a service, as far as fencing goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fence {
    /// Not fenced: it may run what it was cleared for.
    #[default]
    None,
    /// Its heartbeat is Lost or Fenced by the operator's clock.
    Heartbeat,
    /// An admin certified it powered off (`peerdown`).
    Peerdown,
}

/// What the operator knows about one node for one service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFacts {
    /// Whether and how it is fenced.
    pub fence: Fence,
    /// Its entry in the service's `status.nodes`, if any.
    pub entry: Option<ServiceNodeStatus>,
    /// Its entry reports a failure before anything was started (the VIPs
    /// were refused; no hook ran), seen by the operator for at least
    /// D + skew: nothing of it can still be up.
    pub started_nothing: bool,
}

/// Why a node certainly runs nothing of an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Its `ackedEpoch` reached the epoch.
    Acked,
    /// Its heartbeat is Lost or Fenced (so it fenced itself).
    Fenced,
    /// It is `peerdown`.
    Peerdown,
    /// It failed before starting anything (VIPs refused), long enough ago
    /// that any VIP it added has expired.
    StartedNothing,
    /// It reports a later epoch in a role other than master, not running.
    MovedOn,
}

/// Whether `node`, which may have been cleared to enter at `epoch` (or
/// earlier), certainly runs nothing now.
pub fn proof(node: &str, epoch: i64, facts: &BTreeMap<String, NodeFacts>) -> Option<Proof> {
    let f = facts.get(node);
    match f.map(|f| f.fence).unwrap_or_default() {
        Fence::Peerdown => return Some(Proof::Peerdown),
        Fence::Heartbeat => return Some(Proof::Fenced),
        Fence::None => {}
    }
    let entry = f.and_then(|f| f.entry.as_ref())?;
    if entry.acked_epoch.is_some_and(|a| a >= epoch) {
        return Some(Proof::Acked);
    }
    if f.is_some_and(|f| f.started_nothing)
        && entry.state == NodeServiceState::Failed
        && entry.epoch.is_some_and(|e| e >= epoch)
    {
        return Some(Proof::StartedNothing);
    }
    if entry.epoch.is_some_and(|e| e > epoch)
        && entry.role != Role::Master
        && matches!(
            entry.state,
            NodeServiceState::Stopped | NodeServiceState::Failed
        )
    {
        return Some(Proof::MovedOn);
    }
    None
}

/// Who may have been cleared to enter before now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Previous {
    /// Nobody was ever cleared (no Lease, or a fresh one).
    Nobody,
    /// This node was cleared at this epoch.
    Known {
        /// The cleared node.
        node: String,
        /// The epoch it was cleared for.
        epoch: i64,
    },
    /// The annotations do not say who; any node may have been cleared at
    /// any epoch up to this one.
    Unknown {
        /// The highest epoch anybody may have entered.
        epoch: i64,
    },
}

/// The Lease as it must be assumed when it is gone (deleted by hand) but
/// the service's status shows it was placed before: nobody holds it, the
/// epoch is the highest one the status knows (so the next holder gets a
/// higher one than any agent has seen), and the node the operator last
/// published as active counts as cleared at that epoch (or, if none was,
/// anybody who reported may have been). `None` when the status shows no
/// past placement.
pub fn assumed_after_loss(status: &HAServiceStatus) -> Option<LeaseState> {
    let seen = status
        .nodes
        .iter()
        .flat_map(|e| [e.epoch, e.acked_epoch])
        .chain([status.epoch])
        .flatten()
        // Agents report epoch 0 before anything was assigned.
        .filter(|e| *e > 0)
        .max()?;
    let epoch = seen;
    Some(LeaseState {
        holder: None,
        epoch,
        standby: None,
        enter_epoch: status.active_node.as_ref().map(|_| epoch),
        cleared_node: status.active_node.clone(),
    })
}

/// Who may have been cleared before, from the Lease as it is.
pub fn previous(current: Option<&LeaseState>) -> Previous {
    let Some(l) = current else {
        return Previous::Nobody;
    };
    match (l.enter_epoch, &l.cleared_node) {
        (Some(c), Some(p)) if c <= l.epoch && c >= 0 => Previous::Known {
            node: p.clone(),
            epoch: c,
        },
        (None, None) if l.epoch == 0 => Previous::Nobody,
        (Some(c), Some(_)) | (Some(c), None) => Previous::Unknown {
            epoch: c.max(l.epoch),
        },
        (None, _) => Previous::Unknown { epoch: l.epoch },
    }
}

/// Where the handover stands after the write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The holder is cleared to enter the current epoch.
    Cleared,
    /// The holder waits until these nodes leave `epoch` (acknowledge it)
    /// or are fenced.
    Waiting {
        /// Nodes that may still run the service.
        nodes: Vec<String>,
        /// The epoch they may run.
        epoch: i64,
    },
    /// Nobody holds the service, but these nodes may still run it until
    /// they acknowledge `epoch` or are fenced.
    Stopping {
        /// Nodes that may still run the service.
        nodes: Vec<String>,
        /// The epoch they may run.
        epoch: i64,
    },
    /// Nobody holds the service and nobody may still run it.
    Stopped,
}

/// The input of [`handover`].
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The service Lease as it is; `None` when there is none yet.
    pub current: Option<&'a LeaseState>,
    /// Placement's master.
    pub master: Option<&'a str>,
    /// Placement's standby.
    pub standby: Option<&'a str>,
    /// What the operator knows of each node (members, nodes with status
    /// entries, the previously cleared node).
    pub facts: &'a BTreeMap<String, NodeFacts>,
}

/// The result of [`handover`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The Lease content as it should be.
    pub lease: LeaseState,
    /// Whether it differs from the Lease as it is (or there is none yet and
    /// there is something to say): write it.
    pub write: bool,
    /// Whether the holder changes (and so the epoch).
    pub holder_changed: bool,
    /// Whether this write clears the holder to enter.
    pub cleared_now: bool,
    /// Where the handover stands once written.
    pub progress: Progress,
    /// Nodes whose heartbeat being Lost is what allows this clearance: the
    /// caller confirms them with a fresh read before writing.
    pub relies_on_heartbeat: Vec<String>,
}

/// Computes the service Lease to write. See the module documentation.
pub fn handover(input: Input<'_>) -> Handover {
    let cur = input.current.cloned().unwrap_or_default();
    let master = input.master.filter(|m| !m.is_empty());
    let standby = input
        .standby
        .filter(|s| !s.is_empty() && Some(*s) != master);
    let prev = previous(input.current);

    let mut next = cur.clone();
    let holder_changed = master != cur.holder.as_deref();
    // The holder, cleared at the current epoch, proves by its own entry that
    // it runs nothing of it (it acknowledged leaving it after a fence or a
    // monitor failure, moved on, or started nothing), and placement keeps
    // it: it never enters an epoch it left again, so it gets a new one,
    // cleared at once (its proof stands for the old one).
    let holder_left = !holder_changed
        && matches!(&prev, Previous::Known { node, epoch }
        if Some(node.as_str()) == master
            && *epoch == cur.epoch
            && matches!(
                proof(node, *epoch, input.facts),
                Some(Proof::Acked | Proof::MovedOn | Proof::StartedNothing)
            ));
    if holder_changed || holder_left {
        let floor = cur.epoch.max(cur.enter_epoch.unwrap_or(0));
        next.holder = master.map(str::to_owned);
        next.epoch = floor.saturating_add(1);
    }
    next.standby = standby.map(str::to_owned);

    // Nodes that may still run the service, and the epoch they may run.
    let (pending, pending_epoch, relied): (Vec<String>, i64, Vec<String>) = match &prev {
        Previous::Nobody => (Vec::new(), 0, Vec::new()),
        Previous::Known { node, epoch } => match proof(node, *epoch, input.facts) {
            Some(p) => (
                Vec::new(),
                *epoch,
                if p == Proof::Fenced {
                    vec![node.clone()]
                } else {
                    Vec::new()
                },
            ),
            None => (vec![node.clone()], *epoch, Vec::new()),
        },
        Previous::Unknown { epoch } => {
            let mut pending = Vec::new();
            let mut relied = Vec::new();
            // A node that never reported anything for this service never
            // ran it (an agent reports after every step, and re-adopts and
            // reports after a restart).
            let reported = input.facts.iter().filter(|(_, f)| f.entry.is_some());
            for (node, _) in reported {
                match proof(node, *epoch, input.facts) {
                    None => pending.push(node.clone()),
                    Some(Proof::Fenced) => relied.push(node.clone()),
                    Some(_) => {}
                }
            }
            (pending, *epoch, relied)
        }
    };

    let mut cleared_now = false;
    let mut relies_on_heartbeat = Vec::new();
    let progress = match &next.holder {
        Some(h) => {
            if next.enter_epoch == Some(next.epoch) && !holder_changed {
                // Already cleared; make sure the attribution is recorded.
                next.cleared_node = Some(h.clone());
                Progress::Cleared
            } else if pending.is_empty() {
                next.enter_epoch = Some(next.epoch);
                next.cleared_node = Some(h.clone());
                cleared_now = true;
                relies_on_heartbeat = relied;
                Progress::Cleared
            } else {
                Progress::Waiting {
                    nodes: pending,
                    epoch: pending_epoch,
                }
            }
        }
        None if pending.is_empty() => Progress::Stopped,
        None => Progress::Stopping {
            nodes: pending,
            epoch: pending_epoch,
        },
    };

    let write = match input.current {
        Some(_) => next != cur,
        None => next.holder.is_some() || next.standby.is_some(),
    };
    Handover {
        lease: next,
        write,
        holder_changed,
        cleared_now,
        progress,
        relies_on_heartbeat,
    }
}

/// The node whose leave failed: the last cleared node reports `Failed` for
/// the epoch it was cleared at (or later) without having acknowledged it,
/// so it may still run the service. Placement keeps everybody else out
/// until it is fenced.
pub fn leave_failed_on(
    current: Option<&LeaseState>,
    facts: &BTreeMap<String, NodeFacts>,
) -> Option<String> {
    let Previous::Known { node, epoch } = previous(current) else {
        return None;
    };
    let f = facts.get(&node)?;
    let entry = f.entry.as_ref()?;
    let failed = !f.started_nothing
        && entry.state == NodeServiceState::Failed
        && entry.acked_epoch.is_none_or(|a| a < epoch)
        && entry.epoch.is_some_and(|e| e >= epoch);
    failed.then_some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, epoch: i64, enter: Option<i64>, cleared: Option<&str>) -> LeaseState {
        LeaseState {
            holder: (!holder.is_empty()).then(|| holder.to_owned()),
            epoch,
            standby: None,
            enter_epoch: enter,
            cleared_node: cleared.map(str::to_owned),
        }
    }

    fn entry(
        node: &str,
        role: Role,
        state: NodeServiceState,
        epoch: i64,
        acked: Option<i64>,
    ) -> ServiceNodeStatus {
        ServiceNodeStatus {
            node: node.to_owned(),
            role,
            state,
            epoch: Some(epoch),
            acked_epoch: acked,
            fail_count: 0,
            last_failure_time: None,
            hooks: Vec::new(),
        }
    }

    /// Facts builder: `alive` nodes with optional entries.
    #[derive(Default)]
    struct F(BTreeMap<String, NodeFacts>);
    impl F {
        fn node(mut self, n: &str) -> Self {
            self.0.entry(n.to_owned()).or_default();
            self
        }
        fn lost(mut self, n: &str) -> Self {
            self.0.entry(n.to_owned()).or_default().fence = Fence::Heartbeat;
            self
        }
        fn peerdown(mut self, n: &str) -> Self {
            self.0.entry(n.to_owned()).or_default().fence = Fence::Peerdown;
            self
        }
        fn entry(mut self, e: ServiceNodeStatus) -> Self {
            let node = e.node.clone();
            self.0.entry(node).or_default().entry = Some(e);
            self
        }
    }

    fn run(cur: Option<&LeaseState>, master: Option<&str>, facts: &F) -> Handover {
        handover(Input {
            current: cur,
            master,
            standby: None,
            facts: &facts.0,
        })
    }

    use NodeServiceState::*;

    #[test]
    fn initial_placement_is_one_cleared_write() {
        let h = run(None, Some("a"), &F::default().node("a"));
        assert!(h.write && h.holder_changed && h.cleared_now);
        assert_eq!(h.lease, lease("a", 1, Some(1), Some("a")));
        assert_eq!(h.progress, Progress::Cleared);
        assert!(h.lease.holder_may_enter());
    }

    #[test]
    fn nothing_to_say_without_a_lease_writes_nothing() {
        let h = run(None, None, &F::default());
        assert!(!h.write);
        assert_eq!(h.progress, Progress::Stopped);
    }

    #[test]
    fn steady_state_writes_nothing() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let h = run(Some(&cur), Some("a"), &F::default().node("a"));
        assert!(!h.write);
        assert_eq!(h.progress, Progress::Cleared);
    }

    #[test]
    fn master_change_waits_for_the_previous_holder() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let facts = F::default().entry(entry("a", Role::Master, Running, 3, Some(1)));
        let h = run(Some(&cur), Some("b"), &facts);
        assert!(h.write && h.holder_changed && !h.cleared_now);
        // enter-epoch stays at its old value, not cleared.
        assert_eq!(h.lease, lease("b", 4, Some(3), Some("a")));
        assert_eq!(
            h.progress,
            Progress::Waiting {
                nodes: vec!["a".into()],
                epoch: 3
            }
        );
        assert!(!h.lease.holder_may_enter());
        // Asked again before the ack: nothing new to write.
        let again = run(Some(&h.lease), Some("b"), &facts);
        assert!(!again.write);
    }

    #[test]
    fn the_ack_clears_the_new_holder() {
        let cur = lease("b", 4, Some(3), Some("a"));
        let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
        let h = run(Some(&cur), Some("b"), &facts);
        assert!(h.write && !h.holder_changed && h.cleared_now);
        assert_eq!(h.lease, lease("b", 4, Some(4), Some("b")));
        assert!(h.relies_on_heartbeat.is_empty());
    }

    #[test]
    fn a_holder_that_left_its_epoch_gets_a_new_one_at_once() {
        // a was cleared at 3, fenced itself (or its monitor failed), left 3
        // and acknowledged it; placement keeps a: epoch 4, cleared now.
        let cur = lease("a", 3, Some(3), Some("a"));
        let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
        let h = run(Some(&cur), Some("a"), &facts);
        assert!(h.write && !h.holder_changed && h.cleared_now);
        assert_eq!(h.lease, lease("a", 4, Some(4), Some("a")));
        // Running at 3 with an older acknowledgement: nothing changes.
        let facts = F::default().entry(entry("a", Role::Master, Running, 3, Some(2)));
        let h = run(Some(&cur), Some("a"), &facts);
        assert!(!h.write);
        assert_eq!(h.progress, Progress::Cleared);
    }

    #[test]
    fn an_old_ack_is_not_an_ack() {
        let cur = lease("b", 8, Some(7), Some("a"));
        let facts = F::default().entry(entry("a", Role::Master, Running, 7, Some(3)));
        let h = run(Some(&cur), Some("b"), &facts);
        assert!(!h.write);
        assert!(matches!(h.progress, Progress::Waiting { .. }));
    }

    #[test]
    fn a_lost_previous_holder_clears_at_once_but_must_be_confirmed() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let h = run(Some(&cur), Some("b"), &F::default().lost("a"));
        assert_eq!(h.lease, lease("b", 4, Some(4), Some("b")));
        assert!(h.cleared_now);
        assert_eq!(h.relies_on_heartbeat, vec!["a".to_owned()]);
    }

    #[test]
    fn peerdown_clears_without_confirmation() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let h = run(Some(&cur), Some("b"), &F::default().peerdown("a"));
        assert!(h.cleared_now);
        assert!(h.relies_on_heartbeat.is_empty());
    }

    #[test]
    fn master_to_nobody_bumps_the_epoch_and_keeps_the_clearance() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let facts = F::default().entry(entry("a", Role::Master, Running, 3, None));
        let h = run(Some(&cur), None, &facts);
        assert_eq!(h.lease, lease("", 4, Some(3), Some("a")));
        assert_eq!(
            h.progress,
            Progress::Stopping {
                nodes: vec!["a".into()],
                epoch: 3
            }
        );
        // Once a acknowledges: stopped, and nothing to write.
        let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
        let h2 = run(Some(&h.lease), None, &facts);
        assert!(!h2.write);
        assert_eq!(h2.progress, Progress::Stopped);
        // Placing it again later clears at once.
        let h3 = run(Some(&h.lease), Some("b"), &facts);
        assert_eq!(h3.lease, lease("b", 5, Some(5), Some("b")));
    }

    #[test]
    fn moving_back_to_the_cleared_node_waits_for_its_own_ack() {
        // a was cleared at 3; b took the holder at 4 but waited; back to a.
        let cur = lease("b", 4, Some(3), Some("a"));
        let facts = F::default().entry(entry("a", Role::Master, Running, 3, None));
        let h = run(Some(&cur), Some("a"), &facts);
        assert_eq!(h.lease, lease("a", 5, Some(3), Some("a")));
        assert!(!h.cleared_now, "a leaves 3 first, so it acknowledges 3");
        let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(3)));
        let h = run(Some(&h.lease), Some("a"), &facts);
        assert_eq!(h.lease, lease("a", 5, Some(5), Some("a")));
    }

    #[test]
    fn a_refused_enter_proves_nothing_started_once_vips_expired() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let refused = entry("a", Role::None, Failed, 3, Some(1));
        let mut facts = F::default().entry(refused);
        // Not yet long enough: a leave failure as far as anyone knows.
        assert_eq!(leave_failed_on(Some(&cur), &facts.0), Some("a".into()));
        assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
        facts.0.get_mut("a").unwrap().started_nothing = true;
        assert_eq!(leave_failed_on(Some(&cur), &facts.0), None);
        let h = run(Some(&cur), Some("b"), &facts);
        assert!(h.cleared_now);
        assert!(h.relies_on_heartbeat.is_empty());
    }

    #[test]
    fn chain_of_moves_waits_for_the_last_node_that_could_enter() {
        // a cleared at 3; b holder at 4 never cleared; now c at 5.
        let cur = lease("b", 4, Some(3), Some("a"));
        let facts = F::default()
            .entry(entry("a", Role::Master, Running, 3, None))
            .node("b");
        let h = run(Some(&cur), Some("c"), &facts);
        assert_eq!(h.lease, lease("c", 5, Some(3), Some("a")));
        assert_eq!(
            h.progress,
            Progress::Waiting {
                nodes: vec!["a".into()],
                epoch: 3
            }
        );
        // b never entered, so only a's ack matters.
        let facts = F::default()
            .entry(entry("a", Role::None, Stopped, 3, Some(3)))
            .node("b");
        let h = run(Some(&h.lease), Some("c"), &facts);
        assert_eq!(h.lease, lease("c", 5, Some(5), Some("c")));
    }

    #[test]
    fn a_node_that_moved_on_to_standby_proves_it_left() {
        let cur = lease("b", 4, Some(3), Some("a"));
        // a reports vicemaster at epoch 4: it never acts on 3 again.
        let facts = F::default().entry(entry("a", Role::Vicemaster, Stopped, 4, Some(1)));
        let h = run(Some(&cur), Some("b"), &facts);
        assert!(h.cleared_now);
        // But the same epoch as master, or running, is no proof.
        let facts = F::default().entry(entry("a", Role::Master, Running, 4, Some(1)));
        assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
        let facts = F::default().entry(entry("a", Role::None, Stopped, 3, Some(1)));
        assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
    }

    #[test]
    fn standby_change_alone_keeps_the_epoch() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let facts = F::default().node("a").node("b");
        let h = handover(Input {
            current: Some(&cur),
            master: Some("a"),
            standby: Some("b"),
            facts: &facts.0,
        });
        assert!(h.write && !h.holder_changed && !h.cleared_now);
        assert_eq!(h.lease.epoch, 3);
        assert_eq!(h.lease.standby.as_deref(), Some("b"));
        assert_eq!(h.lease.enter_epoch, Some(3));
        // The standby is never the master.
        let h = handover(Input {
            current: Some(&cur),
            master: Some("a"),
            standby: Some("a"),
            facts: &facts.0,
        });
        assert!(!h.write);
        assert_eq!(h.lease.standby, None);
    }

    #[test]
    fn hand_edited_leases_are_treated_conservatively() {
        // No cleared-node annotation: anybody may have entered up to 5.
        let cur = lease("a", 5, Some(5), None);
        let facts = F::default()
            .entry(entry("a", Role::Master, Running, 5, None))
            .entry(entry("c", Role::None, Stopped, 2, Some(2)));
        let h = run(Some(&cur), Some("b"), &facts);
        assert_eq!(h.lease.epoch, 6);
        assert_eq!(
            h.progress,
            Progress::Waiting {
                nodes: vec!["a".into(), "c".into()],
                epoch: 5
            }
        );
        // An enter-epoch above the epoch is jumped over, never reached by
        // accident.
        let cur = lease("a", 3, Some(9), Some("a"));
        let h = run(Some(&cur), Some("b"), &F::default().lost("a"));
        assert_eq!(h.lease.epoch, 10);
        // No annotations at all on a used Lease: not "nobody".
        let cur = lease("a", 2, None, None);
        let facts = F::default().entry(entry("a", Role::Master, Running, 2, None));
        assert!(!run(Some(&cur), Some("b"), &facts).cleared_now);
        // A fresh hand-made Lease with epoch 0: nobody was cleared.
        let cur = lease("", 0, None, None);
        assert!(run(Some(&cur), Some("b"), &F::default()).cleared_now);
    }

    #[test]
    fn a_lost_lease_is_assumed_from_the_status() {
        let status = HAServiceStatus {
            active_node: Some("a".into()),
            epoch: Some(6),
            nodes: vec![
                entry("a", Role::Master, Running, 7, Some(3)),
                entry("b", Role::Vicemaster, Stopped, 5, None),
            ],
            ..Default::default()
        };
        let assumed = assumed_after_loss(&status).unwrap();
        assert_eq!(assumed, lease("", 7, Some(7), Some("a")));
        // Whoever comes next gets a fresh epoch and waits for a.
        let facts = F::default()
            .entry(status.nodes[0].clone())
            .entry(status.nodes[1].clone());
        let h = run(Some(&assumed), Some("a"), &facts);
        assert_eq!(h.lease.epoch, 8);
        assert!(h.write && !h.cleared_now);
        // a leaves (the Lease vanished, so it has no role): cleared.
        let facts = F::default().entry(entry("a", Role::None, Stopped, 7, Some(7)));
        assert!(run(Some(&assumed), Some("a"), &facts).cleared_now);
        // Never placed: nothing assumed, even with agents' first reports.
        assert_eq!(assumed_after_loss(&HAServiceStatus::default()), None);
        let fresh = HAServiceStatus {
            nodes: vec![entry("a", Role::None, Stopped, 0, None)],
            ..Default::default()
        };
        assert_eq!(assumed_after_loss(&fresh), None);
        // Nobody published as active: anybody who reported must prove.
        let status = HAServiceStatus {
            epoch: Some(4),
            nodes: vec![entry("b", Role::None, Stopped, 4, Some(4))],
            ..Default::default()
        };
        let assumed = assumed_after_loss(&status).unwrap();
        let facts = F::default().entry(status.nodes[0].clone()).node("c");
        let h = run(Some(&assumed), Some("c"), &facts);
        assert!(h.cleared_now, "b acknowledged 4; c never reported");
    }

    #[test]
    fn leave_failed_is_the_cleared_node_failed_without_ack() {
        let cur = lease("a", 3, Some(3), Some("a"));
        let failed = F::default().entry(entry("a", Role::None, Failed, 3, Some(1)));
        assert_eq!(leave_failed_on(Some(&cur), &failed.0), Some("a".into()));
        // Failed but acknowledged (enter failed, leave succeeded): not.
        let ok = F::default().entry(entry("a", Role::None, Failed, 3, Some(3)));
        assert_eq!(leave_failed_on(Some(&cur), &ok.0), None);
        // An old failure from before this clearance: not.
        let old = F::default().entry(entry("a", Role::None, Failed, 2, Some(1)));
        assert_eq!(leave_failed_on(Some(&cur), &old.0), None);
        assert_eq!(leave_failed_on(None, &failed.0), None);
        // And the handover waits for it.
        let h = run(Some(&cur), Some("b"), &failed);
        assert!(!h.cleared_now);
    }

    #[test]
    fn lease_round_trip() {
        let state = LeaseState {
            holder: Some("a".into()),
            epoch: 4,
            standby: Some("b".into()),
            enter_epoch: Some(3),
            cleared_node: Some("c".into()),
        };
        let l = Lease {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(state.annotations()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: state.holder.clone(),
                lease_transitions: Some(state.lease_transitions()),
                ..Default::default()
            }),
        };
        assert_eq!(LeaseState::from_lease(&l), state);
        // Empty strings are nobody; garbage enter-epoch is absent.
        let mut l = l;
        l.spec.as_mut().unwrap().holder_identity = Some(String::new());
        l.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(leases::ENTER_EPOCH_ANNOTATION.into(), "x".into());
        let s = LeaseState::from_lease(&l);
        assert_eq!((s.holder, s.enter_epoch), (None, None));
    }

    // ------------------------------------------------------------------
    // Simulation: random placements, agents that lag, fail to leave, lose
    // their heartbeat and come back; at no step may two nodes run.

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Clone, Debug, Default)]
    struct Agent {
        /// The epoch it runs the service at (holds the VIPs).
        running: Option<i64>,
        role: Role,
        state: Option<NodeServiceState>,
        epoch: i64,
        acked: Option<i64>,
        failed_epoch: Option<i64>,
        /// Cut off: does nothing, will be fenced.
        partitioned: bool,
        /// The operator sees the heartbeat Lost (only after the fence).
        lost: bool,
        /// What the operator sees of it (reports lag).
        reported: Option<ServiceNodeStatus>,
        /// The last enter was refused before starting anything.
        refused: bool,
        /// `refused` as last reported.
        reported_refused: bool,
    }

    impl Agent {
        fn snapshot(&self, name: &str) -> ServiceNodeStatus {
            ServiceNodeStatus {
                node: name.to_owned(),
                role: self.role,
                state: self.state.unwrap_or(Stopped),
                epoch: Some(self.epoch),
                acked_epoch: self.acked,
                fail_count: 0,
                last_failure_time: None,
                hooks: Vec::new(),
            }
        }

        /// One reconcile of the agent against the Lease it sees.
        fn sync(&mut self, name: &str, lease: &LeaseState, rng: &mut Rng) {
            if self.partitioned {
                return;
            }
            let holder = lease.holder.as_deref() == Some(name);
            let standby = lease.standby.as_deref() == Some(name);
            if let Some(e) = self.running
                && !(holder && lease.holder_may_enter())
            {
                // Not (or not yet) cleared as master: leave; sometimes the
                // leave hook fails.
                if rng.below(6) == 0 {
                    self.role = Role::None;
                    self.state = Some(Failed);
                    // still running: the service may be up here
                } else {
                    self.running = None;
                    self.role = Role::None;
                    self.state = Some(Stopped);
                    self.acked = Some(e);
                }
                return;
            }
            if holder
                && lease.holder_may_enter()
                && self.running.is_none()
                && self.failed_epoch != Some(lease.epoch)
            {
                self.refused = false;
                if rng.below(10) == 0 {
                    // VIPs refused: nothing started, no ack.
                    self.epoch = lease.epoch;
                    self.failed_epoch = Some(lease.epoch);
                    self.role = Role::None;
                    self.state = Some(Failed);
                    self.refused = true;
                } else if rng.below(8) == 0 {
                    // Enter fails, leave succeeds.
                    self.epoch = lease.epoch;
                    self.acked = Some(lease.epoch);
                    self.failed_epoch = Some(lease.epoch);
                    self.role = Role::None;
                    self.state = Some(Failed);
                } else {
                    self.running = Some(lease.epoch);
                    self.epoch = lease.epoch;
                    self.role = Role::Master;
                    self.state = Some(Running);
                }
                return;
            }
            if holder && self.running.is_some() && lease.holder_may_enter() {
                // Same node cleared again at a newer epoch: keeps running.
                self.epoch = lease.epoch;
                return;
            }
            if standby && self.running.is_none() && self.role != Role::Vicemaster {
                self.role = Role::Vicemaster;
                self.epoch = lease.epoch;
                if self.state != Some(Failed) {
                    self.state = Some(Stopped);
                }
            }
        }
    }

    fn simulate(seed: u64, steps: usize) {
        let names = ["a", "b", "c"];
        let mut rng = Rng(seed | 1);
        let mut agents: BTreeMap<&str, Agent> =
            names.iter().map(|n| (*n, Agent::default())).collect();
        let mut lease: Option<LeaseState> = None;
        let mut peerdown: BTreeMap<&str, bool> = BTreeMap::new();
        for step in 0..steps {
            match rng.below(10) {
                // The operator reconciles with an arbitrary placement.
                0..=2 => {
                    let pick = rng.below(4) as usize;
                    let master = names.get(pick).copied();
                    let standby = names.get(rng.below(4) as usize).copied();
                    let facts: BTreeMap<String, NodeFacts> = names
                        .iter()
                        .map(|n| {
                            let a = &agents[n];
                            let fence = if peerdown.get(n).copied().unwrap_or(false) {
                                Fence::Peerdown
                            } else if a.lost {
                                Fence::Heartbeat
                            } else {
                                Fence::None
                            };
                            (
                                n.to_string(),
                                NodeFacts {
                                    fence,
                                    entry: a.reported.clone(),
                                    started_nothing: a.reported_refused,
                                },
                            )
                        })
                        .collect();
                    let h = handover(Input {
                        current: lease.as_ref(),
                        master,
                        standby,
                        facts: &facts,
                    });
                    if h.write {
                        lease = Some(h.lease);
                    }
                }
                // An agent acts on the Lease.
                3..=5 => {
                    let n = names[rng.below(3) as usize];
                    if let Some(l) = &lease {
                        agents.get_mut(n).unwrap().sync(n, l, &mut rng);
                    }
                }
                // An agent reports.
                6 | 7 => {
                    let n = names[rng.below(3) as usize];
                    let a = agents.get_mut(n).unwrap();
                    if !a.partitioned {
                        a.reported = Some(a.snapshot(n));
                        a.reported_refused = a.refused;
                    }
                }
                // Partition: the agent fences itself (drops everything)
                // before the operator can see it Lost.
                8 => {
                    let n = names[rng.below(3) as usize];
                    let a = agents.get_mut(n).unwrap();
                    if !a.partitioned {
                        a.partitioned = true;
                    } else if !a.lost {
                        a.running = None; // self-fence at RD
                        a.role = Role::None;
                        a.state = Some(Failed);
                        a.failed_epoch = Some(a.epoch);
                        a.lost = true; // the operator sees it only after D + skew
                    } else if rng.below(3) == 0 {
                        // An admin certifies it powered off.
                        peerdown.insert(n, true);
                    }
                }
                // A fenced node returns.
                _ => {
                    let n = names[rng.below(3) as usize];
                    let a = agents.get_mut(n).unwrap();
                    if a.lost {
                        a.partitioned = false;
                        a.lost = false;
                        peerdown.insert(n, false);
                    }
                }
            }
            let running: Vec<&str> = agents
                .iter()
                .filter(|(_, a)| a.running.is_some())
                .map(|(n, _)| *n)
                .collect();
            assert!(
                running.len() <= 1,
                "seed {seed} step {step}: {running:?} both run; lease {lease:?}; agents {agents:#?}"
            );
        }
    }

    #[test]
    fn at_no_step_could_two_nodes_both_be_cleared() {
        for seed in 1..400u64 {
            simulate(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 400);
        }
    }

    #[test]
    fn the_simulation_makes_progress() {
        // Without failures the protocol moves the service: check that the
        // scenario above is not vacuous (some clearance happens often).
        let facts = F::default().node("a").node("b");
        let mut lease = run(None, Some("a"), &facts).lease;
        for (i, target) in ["b", "a", "b"].iter().enumerate() {
            let prev = lease.cleared_node.clone().unwrap();
            let epoch = lease.enter_epoch.unwrap();
            let waiting = run(Some(&lease), Some(target), &facts).lease;
            assert!(!waiting.holder_may_enter(), "step {i}");
            let acked = F::default()
                .entry(entry(&prev, Role::None, Stopped, epoch, Some(epoch)))
                .node(target);
            lease = run(Some(&waiting), Some(target), &acked).lease;
            assert!(lease.holder_may_enter(), "step {i}");
            assert_eq!(lease.holder.as_deref(), Some(*target));
        }
        assert_eq!(lease.epoch, 4);
    }
}
