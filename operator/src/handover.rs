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

pub use kubeha_crds::leases::CLEARED_NODE_ANNOTATION;

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

#[cfg(test)]
impl LeaseState {
    /// A Lease held by `holder` (none when empty) at `epoch`, cleared to
    /// enter at `enter` for `cleared`, without a standby.
    pub(crate) fn for_test(
        holder: &str,
        epoch: i64,
        enter: Option<i64>,
        cleared: Option<&str>,
    ) -> Self {
        Self {
            holder: (!holder.is_empty()).then(|| holder.to_owned()),
            epoch,
            standby: None,
            enter_epoch: enter,
            cleared_node: cleared.map(str::to_owned),
        }
    }
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

impl Progress {
    /// The nodes the handover waits on (whose proof that they run nothing
    /// it needs): they must see the Lease, whether or not it names them.
    pub fn waiting_on(&self) -> &[String] {
        match self {
            Progress::Waiting { nodes, .. } | Progress::Stopping { nodes, .. } => nodes,
            Progress::Cleared | Progress::Stopped => &[],
        }
    }
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
mod tests;
