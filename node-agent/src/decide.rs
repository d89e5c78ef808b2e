//! The agent's decision for one service, as a pure function of what the
//! daemon gathered: [`next`] maps [`Facts`] (the Lease's assignment, the
//! record, contact with the API server, what is due) to one piece of
//! [`Work`]. The daemon gathers, calls [`next`], and acts; work that only
//! changes the record ([`Work::is_bookkeeping`]) is applied at once and the
//! service decided again, so one pass ends with at most one task started.
//!
//! Every safety and liveness rule of the agent is a branch here, named in
//! the comments, and a row in the table test below.

use std::collections::BTreeSet;

use kubeha_crds::service::{NodeServiceState, Role};

use crate::assignments::{self, Assignment, Step};
use crate::statefile::ServiceRecord;

/// What the daemon knows of one service when it decides.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// What the service Lease asks of this node (no role when this node's
    /// mode allows no services).
    pub wanted: Assignment,
    /// The Lease's epoch, if there is a Lease.
    pub lease_epoch: Option<i64>,
    /// This node's record of the service.
    pub record: &'a ServiceRecord,
    /// The VIPs the current spec names (`address/prefix`).
    pub spec_vips: BTreeSet<String>,
    /// The record was loaded from the status file as master, and has not
    /// been re-adopted or set aside yet.
    pub adopt: bool,
    /// The agent died in the middle of a transition (or an admin cleared a
    /// leave that failed): leave master first, whatever the Lease says.
    pub recover: bool,
    /// This node fenced itself since start, and the Lease was written
    /// before the operator saw its first renew after the fence (see
    /// [`kubeha_crds::leases::HOLDER_RENEW_ANNOTATION`]).
    pub cleared_before_return: bool,
    /// The heartbeat of this node in the service's cluster is past RD (or
    /// the node fenced itself and has not renewed since).
    pub cut_off: bool,
    /// A VIP of the record expired in the kernel before it was extended.
    pub vip_expired: bool,
    /// The monitor hook is due (the spec has one and its interval passed).
    pub monitor_due: bool,
    /// The periodic hook is due.
    pub periodic_due: bool,
    /// The GARP refresh is due (the spec asks for refreshes).
    pub refresh_due: bool,
    /// The status entry the API server has differs from the record.
    pub report_due: bool,
}

/// What the daemon does next for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Something must be done that needs contact with the API server (a
    /// leave to run again, a service to re-adopt): nothing until then.
    Wait,
    /// Re-adopt the master role held before a restart: extend the VIPs,
    /// one GARP burst, no hooks.
    Adopt,
    /// Held as master before the restart, but not asked for at that epoch
    /// any more: forget the adoption (the steps then leave it).
    ForgetAdoption,
    /// A VIP expired before it was extended: give the master role up as a
    /// fence does (VIPs dropped at once, the leave run once in contact).
    GiveUp,
    /// Leave master again: after a death in the middle of a transition, a
    /// fence, or a clear of a leave that failed.
    Recover,
    /// The Lease clears this node at an epoch it already left, or with a
    /// clearance written before the operator saw it back from a fence:
    /// refuse it (recorded as `Failed` at that epoch, which the operator
    /// reads as "started nothing" and answers with a new epoch).
    Refuse {
        /// The refused epoch.
        epoch: i64,
        /// Nothing was left unclean here: the refusal also acknowledges the
        /// epoch once the daemon finds none of the service's VIPs on this
        /// node, so the operator moves on at once instead of waiting E for
        /// any VIP to run out.
        acknowledge: bool,
    },
    /// The steps from the role held to the role wanted.
    Steps(Vec<Step>),
    /// The running master's VIPs differ from the spec's (a VIP list edit):
    /// remove the ones no longer named, add the new ones, no hooks.
    Revip,
    /// Idle here: take on the Lease's later epoch (the "moved on" proof).
    Observe {
        /// The Lease's epoch.
        epoch: i64,
    },
    /// Run the monitor hook.
    Monitor,
    /// Run the periodic hook.
    Periodic,
    /// Send the GARP refresh burst.
    Refresh,
    /// Apply the status entry.
    Report,
    /// Nothing to do.
    Idle,
}

impl Work {
    /// Work that only changes the record or the daemon's flags: the daemon
    /// applies it and decides again in the same pass.
    pub fn is_bookkeeping(&self) -> bool {
        matches!(
            self,
            Work::ForgetAdoption | Work::GiveUp | Work::Refuse { .. } | Work::Observe { .. }
        )
    }
}

/// The decision for one service. Rules, in order:
/// 1. A record held before a restart is re-adopted only in contact, only
///    when the Lease still clears this node as master at the record's epoch;
///    otherwise the adoption is forgotten and the steps below leave it.
/// 2. An expired VIP gives the master role up (never extended back).
/// 3. A leave to run again (death mid-transition, a fence, a cleared failed
///    leave) runs first, and only in contact.
/// 4. An epoch already left here is refused, never entered again; so is a
///    clearance written before the operator saw this node back from a fence.
/// 5. The steps from the role held to the role wanted; after a leave that
///    failed nothing is entered; nothing is entered while cut off.
/// 6. A running master whose spec names other VIPs changes them.
/// 7. Idle, a later Lease epoch is taken on.
/// 8. Monitor, periodic hook, GARP refresh, report, in that order.
pub fn next(facts: &Facts) -> Work {
    let record = facts.record;
    // 1. Adoption after a restart.
    if facts.adopt {
        if facts.cut_off {
            return Work::Wait;
        }
        let adoptable = facts.wanted.role == Role::Master
            && facts.wanted.may_enter
            && facts.wanted.epoch == record.epoch;
        return if adoptable {
            Work::Adopt
        } else {
            Work::ForgetAdoption
        };
    }
    // A Lease older than what this node recorded is not entered.
    let wanted = assignments::not_older(facts.wanted, record.role, record.epoch);
    // 2. A VIP that expired before its extension.
    if facts.vip_expired && record.role == Role::Master {
        return Work::GiveUp;
    }
    // 3. A leave to run again.
    if facts.recover || record.fenced {
        return if facts.cut_off {
            Work::Wait
        } else {
            Work::Recover
        };
    }
    // 4. An epoch already left here, or cleared before the operator saw
    //    this node back from a fence (a watch that lagged through the cut
    //    may not show yet that it was given to another node since).
    if wanted.role == Role::Master
        && wanted.may_enter
        && record.role != Role::Master
        && (record.acked_epoch.is_some_and(|a| wanted.epoch <= a) || facts.cleared_before_return)
        && record.failed_epoch != Some(wanted.epoch)
    {
        return Work::Refuse {
            epoch: wanted.epoch,
            acknowledge: record.unclean_epoch.is_none(),
        };
    }
    // 5. The steps.
    let mut steps = assignments::steps_between(record.role, wanted, record.failed_epoch);
    if record.unclean_epoch.is_some() {
        steps.retain(|s| !matches!(s, Step::EnterMaster | Step::EnterVicemaster));
    }
    let entering = steps
        .iter()
        .any(|s| matches!(s, Step::EnterMaster | Step::EnterVicemaster));
    if !(steps.is_empty() || entering && facts.cut_off) {
        return Work::Steps(steps);
    }
    let running_master = record.role == Role::Master && record.state == NodeServiceState::Running;
    // 6. A VIP list edit on the running master.
    if running_master && !facts.cut_off {
        let held: BTreeSet<&String> = record.vips.iter().collect();
        if held != facts.spec_vips.iter().collect() {
            return Work::Revip;
        }
    }
    // 7. The moved-on proof.
    if steps.is_empty()
        && let Some(epoch) = facts.lease_epoch
        && record.would_observe(epoch)
    {
        return Work::Observe { epoch };
    }
    // 8. Routine work.
    if running_master && facts.monitor_due {
        return Work::Monitor;
    }
    if facts.periodic_due {
        return Work::Periodic;
    }
    if running_master && facts.refresh_due {
        return Work::Refresh;
    }
    if facts.report_due {
        return Work::Report;
    }
    Work::Idle
}

#[cfg(test)]
mod tests;
