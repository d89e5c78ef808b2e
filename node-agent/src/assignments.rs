//! Assignments: this node's role and epoch per service, derived from the
//! service leadership Lease (written only by the operator) and the cluster's
//! member list. Pure functions, so the rules are tested without a cluster.

use k8s_openapi::api::coordination::v1::Lease;
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

/// This node's mode in `cluster`, or `None` when it is not a listed member.
/// (Members picked only by a selector are in mode `default`.)
pub fn mode_of(cluster: &HACluster, node: &str) -> Option<Mode> {
    cluster
        .spec
        .members
        .nodes
        .iter()
        .find(|m| m.name == node)
        .map(|m| m.mode)
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
    let spec = lease.spec.as_ref();
    let epoch = spec.and_then(|s| s.lease_transitions).unwrap_or(0) as i64;
    let annotations = lease.metadata.annotations.as_ref();
    let holder = spec.and_then(|s| s.holder_identity.as_deref());
    if holder == Some(node) {
        let cleared = annotations
            .and_then(|a| a.get(leases::ENTER_EPOCH_ANNOTATION))
            .and_then(|v| v.parse::<i64>().ok());
        return Assignment {
            role: Role::Master,
            epoch,
            may_enter: cleared == Some(epoch),
        };
    }
    if annotations
        .and_then(|a| a.get(leases::STANDBY_ANNOTATION))
        .map(String::as_str)
        == Some(node)
    {
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
pub fn plan(held: Role, wanted: Assignment, failed_epoch: Option<i64>) -> Vec<Step> {
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
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn lease(holder: &str, epoch: i32, cleared: Option<i32>, standby: Option<&str>) -> Lease {
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(e) = cleared {
            annotations.insert(leases::ENTER_EPOCH_ANNOTATION.to_owned(), e.to_string());
        }
        if let Some(s) = standby {
            annotations.insert(leases::STANDBY_ANNOTATION.to_owned(), s.to_owned());
        }
        Lease {
            metadata: ObjectMeta {
                annotations: Some(annotations),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.to_owned()),
                lease_transitions: Some(epoch),
                ..Default::default()
            }),
        }
    }

    const D: Option<Mode> = Some(Mode::Default);

    #[test]
    fn holder_is_master_once_cleared() {
        let l = lease("node-1", 4, Some(4), Some("node-2"));
        assert_eq!(
            assignment("node-1", Some(&l), D),
            Assignment {
                role: Role::Master,
                epoch: 4,
                may_enter: true
            }
        );
        assert_eq!(assignment("node-2", Some(&l), D).role, Role::Vicemaster);
        assert_eq!(
            assignment("node-3", Some(&l), D),
            Assignment {
                role: Role::None,
                epoch: 4,
                may_enter: false
            }
        );
    }

    #[test]
    fn holder_waits_for_clearance_of_its_own_epoch() {
        let waiting = lease("node-2", 5, Some(4), None);
        let a = assignment("node-2", Some(&waiting), D);
        assert_eq!((a.role, a.may_enter), (Role::Master, false));
        assert_eq!(plan(Role::None, a, None), vec![]);
    }

    #[test]
    fn modes_without_services_get_nothing() {
        let l = lease("node-1", 1, Some(1), None);
        for mode in [None, Some(Mode::Locked), Some(Mode::Peerdown)] {
            assert_eq!(
                assignment("node-1", Some(&l), mode),
                Assignment::NONE,
                "{mode:?}"
            );
        }
        assert_eq!(
            assignment("node-1", Some(&l), Some(Mode::Single)).role,
            Role::Master
        );
        assert_eq!(assignment("node-1", None, D), Assignment::NONE);
    }

    #[test]
    fn leave_before_enter() {
        let master = Assignment {
            role: Role::Master,
            epoch: 2,
            may_enter: true,
        };
        let vice = Assignment {
            role: Role::Vicemaster,
            epoch: 2,
            may_enter: true,
        };
        assert_eq!(
            plan(Role::Vicemaster, master, None),
            vec![Step::LeaveVicemaster, Step::EnterMaster]
        );
        assert_eq!(
            plan(Role::Master, vice, None),
            vec![Step::LeaveMaster, Step::EnterVicemaster]
        );
        assert_eq!(
            plan(Role::Master, Assignment::NONE, None),
            vec![Step::LeaveMaster]
        );
        assert_eq!(plan(Role::None, master, None), vec![Step::EnterMaster]);
        assert_eq!(plan(Role::Master, master, None), vec![]);
    }

    #[test]
    fn a_failed_epoch_is_not_retried_but_a_new_one_is() {
        let master = Assignment {
            role: Role::Master,
            epoch: 2,
            may_enter: true,
        };
        assert_eq!(plan(Role::None, master, Some(2)), vec![]);
        assert_eq!(
            plan(Role::None, Assignment { epoch: 3, ..master }, Some(2)),
            vec![Step::EnterMaster]
        );
    }
}
