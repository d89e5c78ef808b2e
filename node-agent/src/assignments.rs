//! Assignments: this node's role and epoch per service, derived from the
//! service leadership Lease (written only by the operator) and the cluster's
//! member list. Pure functions, so the rules are tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use kubeha_crds::members::member_mode;
use kubeha_crds::service::Role;
use kubeha_crds::{HACluster, Mode, leases};

/// What the Lease asks of this node for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The role this node should hold.
    pub role: Role,
    /// The epoch (fencing token): the Lease's `leaseTransitions`.
    pub epoch: i64,
    /// For master: whether the operator has cleared this epoch for entry
    /// (the previous holder acknowledged leaving, or is certainly fenced).
    pub may_enter: bool,
}

impl Assignment {
    /// No role.
    pub const NONE: Assignment = Assignment {
        role: Role::None,
        epoch: 0,
        may_enter: false,
    };
}

/// Whether this node is a member of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A member in this mode: listed in `spec.members.nodes` (its mode
    /// there), or picked by `spec.members.selector` (mode `default`).
    Member(Mode),
    /// Not a member.
    NotMember,
    /// Not listed, and the cluster has a selector but this node's Node
    /// object has not been read yet: neither join nor leave.
    Unknown,
}

impl Membership {
    /// The mode, for a member.
    pub fn mode(self) -> Option<Mode> {
        match self {
            Membership::Member(m) => Some(m),
            _ => None,
        }
    }
}

/// Whether `node` is a member of `cluster`, by the rule the operator
/// resolves members with ([`kubeha_crds::members::member_mode`]).
/// `node_labels` are the labels of this node's Node object, `None` when it
/// is absent; `node_known` says whether the Node watch has listed yet.
pub fn membership(
    cluster: &HACluster,
    node: &str,
    node_labels: Option<&BTreeMap<String, String>>,
    node_known: bool,
) -> Membership {
    let members = &cluster.spec.members;
    match member_mode(members, node, node_labels) {
        Some(mode) => Membership::Member(mode),
        None if members.selector.is_some() && !node_known => Membership::Unknown,
        None => Membership::NotMember,
    }
}

/// The epoch of a service Lease (its `leaseTransitions`), if it has one.
pub fn lease_epoch(lease: &Lease) -> Option<i64> {
    leases::ServiceLeaseFields::read(lease).epoch
}

/// The assignment of `node` from a service Lease. A node whose mode does not
/// allow services gets no role whatever the Lease says.
pub fn assignment(node: &str, lease: Option<&Lease>, mode: Option<Mode>) -> Assignment {
    let Some(lease) = lease else {
        return Assignment::NONE;
    };
    if !mode.is_some_and(Mode::allows_services) {
        return Assignment::NONE;
    }
    let fields = leases::ServiceLeaseFields::read(lease);
    let epoch = fields.epoch.unwrap_or(0);
    if fields.holder.as_deref() == Some(node) {
        return Assignment {
            role: Role::Master,
            epoch,
            may_enter: fields.holder_may_enter(),
        };
    }
    if fields.standby.as_deref() == Some(node) {
        return Assignment {
            role: Role::Vicemaster,
            epoch,
            may_enter: true,
        };
    }
    Assignment {
        role: Role::None,
        epoch,
        may_enter: false,
    }
}

/// A master assignment this node would enter at an epoch older than the
/// one it has recorded (a stale view of the Lease, e.g. a re-list served by
/// a lagging API server cache) is not cleared for entry: an agent never
/// acts on an older epoch again, which is what makes a later epoch in its
/// status entry proof that it left the older one (the operator's "moved
/// on"). A master already running keeps its role.
pub fn not_older(wanted: Assignment, held: Role, recorded_epoch: i64) -> Assignment {
    if wanted.role == Role::Master && held != Role::Master && wanted.epoch < recorded_epoch {
        return Assignment {
            may_enter: false,
            ..wanted
        };
    }
    wanted
}

/// One step of a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Remove the VIPs, then run the leave scripts with role master.
    LeaveMaster,
    /// Run the leave scripts with role vicemaster.
    LeaveVicemaster,
    /// Add the VIPs, run the enter scripts with role master, send GARP.
    EnterMaster,
    /// Run the enter scripts with role vicemaster.
    EnterVicemaster,
}

/// The steps from the role held to the role wanted: always leave the old
/// role before entering the new one. A master assignment not yet cleared for
/// entry, or whose epoch already failed here, is not entered (the old role
/// is still left).
pub fn steps_between(held: Role, wanted: Assignment, failed_epoch: Option<i64>) -> Vec<Step> {
    let target = match wanted.role {
        Role::Master if !wanted.may_enter || failed_epoch == Some(wanted.epoch) => Role::None,
        r => r,
    };
    if held == target {
        return Vec::new();
    }
    let mut steps = Vec::new();
    match held {
        Role::Master => steps.push(Step::LeaveMaster),
        Role::Vicemaster => steps.push(Step::LeaveVicemaster),
        Role::None => {}
    }
    match target {
        Role::Master => steps.push(Step::EnterMaster),
        Role::Vicemaster => steps.push(Step::EnterVicemaster),
        Role::None => {}
    }
    steps
}

#[cfg(test)]
mod tests;
