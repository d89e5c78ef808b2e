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
    let mut steps = assignments::plan(record.role, wanted, record.failed_epoch);
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
mod tests {
    use super::*;
    use Step::*;
    use kubeha_crds::HAServiceSpec;

    const VIP: &str = "198.18.0.100/24";

    fn record(role: Role, epoch: i64, state: NodeServiceState) -> ServiceRecord {
        let spec: HAServiceSpec = serde_json::from_value(serde_json::json!({
            "clusterRef": "c", "vips": [{"address": VIP}],
        }))
        .unwrap();
        let mut r = ServiceRecord::fresh("c", &spec, "x".into(), None);
        r.role = role;
        r.epoch = epoch;
        r.state = state;
        if role == Role::Master {
            r.vips = vec![VIP.into()];
        }
        r
    }

    fn master(epoch: i64, may_enter: bool) -> Assignment {
        Assignment {
            role: Role::Master,
            epoch,
            may_enter,
        }
    }

    fn none(epoch: i64) -> Assignment {
        Assignment {
            role: Role::None,
            epoch,
            may_enter: false,
        }
    }

    fn facts(wanted: Assignment, record: &ServiceRecord) -> Facts<'_> {
        Facts {
            wanted,
            lease_epoch: Some(wanted.epoch),
            record,
            spec_vips: [VIP.to_owned()].into(),
            adopt: false,
            recover: false,
            cleared_before_return: false,
            cut_off: false,
            vip_expired: false,
            monitor_due: false,
            periodic_due: false,
            refresh_due: false,
            report_due: false,
        }
    }

    use NodeServiceState::{Failed, Running, Stopped};

    /// One row: a name, the facts (built from a base by a tweak), the work.
    struct Row {
        rule: &'static str,
        record: ServiceRecord,
        wanted: Assignment,
        tweak: fn(&mut Facts),
        work: Work,
    }

    fn row(
        rule: &'static str,
        record: ServiceRecord,
        wanted: Assignment,
        tweak: fn(&mut Facts),
        work: Work,
    ) -> Row {
        Row {
            rule,
            record,
            wanted,
            tweak,
            work,
        }
    }

    fn with(mut r: ServiceRecord, f: fn(&mut ServiceRecord)) -> ServiceRecord {
        f(&mut r);
        r
    }

    #[test]
    fn every_rule_of_the_agent() {
        let rows = vec![
            // 1. Adoption after a restart.
            row(
                "restart as master, Lease unchanged: re-adopt",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| f.adopt = true,
                Work::Adopt,
            ),
            row(
                "restart as master while cut off: wait for contact (the VIP lifetime runs out meanwhile)",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| {
                    f.adopt = true;
                    f.cut_off = true
                },
                Work::Wait,
            ),
            row(
                "restart as master, the Lease moved on: forget the adoption",
                record(Role::Master, 4, Running),
                master(5, true),
                |f| f.adopt = true,
                Work::ForgetAdoption,
            ),
            row(
                "restart as master, now assigned elsewhere: forget the adoption",
                record(Role::Master, 4, Running),
                none(5),
                |f| f.adopt = true,
                Work::ForgetAdoption,
            ),
            row(
                "restart as master, the epoch not cleared for entry: forget the adoption",
                record(Role::Master, 4, Running),
                master(4, false),
                |f| f.adopt = true,
                Work::ForgetAdoption,
            ),
            row(
                "an adoption forgotten: the master role is left",
                record(Role::Master, 4, Running),
                none(5),
                |_| {},
                Work::Steps(vec![LeaveMaster]),
            ),
            // 2. VIP expired before its extension.
            row(
                "a VIP expired before it was extended: give the role up",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| f.vip_expired = true,
                Work::GiveUp,
            ),
            row(
                "a VIP expired while cut off: give the role up all the same",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| {
                    f.vip_expired = true;
                    f.cut_off = true
                },
                Work::GiveUp,
            ),
            row(
                "an expired VIP of a node that is no longer master: nothing to give up",
                record(Role::None, 4, Stopped),
                none(4),
                |f| f.vip_expired = true,
                Work::Idle,
            ),
            // 3. A leave to run again.
            row(
                "died in the middle of a transition: leave first, whatever the Lease says",
                record(Role::Master, 4, NodeServiceState::Starting),
                master(4, true),
                |f| f.recover = true,
                Work::Recover,
            ),
            row(
                "died in the middle of a transition, cut off: wait for contact",
                record(Role::Master, 4, NodeServiceState::Stopping),
                master(4, true),
                |f| {
                    f.recover = true;
                    f.cut_off = true
                },
                Work::Wait,
            ),
            row(
                "left by a fence (or a given-up VIP): the leave runs again once in contact",
                with(record(Role::None, 4, Failed), |r| {
                    r.fenced = true;
                    r.failed_epoch = Some(4);
                    r.unclean_epoch = Some(4);
                }),
                master(5, true),
                |_| {},
                Work::Recover,
            ),
            row(
                "left by a fence, still cut off: nothing",
                with(record(Role::None, 4, Failed), |r| r.fenced = true),
                master(5, true),
                |f| f.cut_off = true,
                Work::Wait,
            ),
            // 4. An epoch already left.
            row(
                "cleared for an epoch already left here: refuse it",
                with(record(Role::None, 4, Stopped), |r| r.acked_epoch = Some(4)),
                master(4, true),
                |_| {},
                Work::Refuse {
                    epoch: 4,
                    acknowledge: true,
                },
            ),
            row(
                "cleared for an epoch older than one left here (stale Lease): not entered",
                with(record(Role::None, 6, Stopped), |r| r.acked_epoch = Some(6)),
                master(5, true),
                |f| f.lease_epoch = Some(5),
                Work::Idle,
            ),
            row(
                "an epoch refused once is not refused again: wait for a new one",
                with(record(Role::None, 4, Failed), |r| {
                    r.acked_epoch = Some(4);
                    r.failed_epoch = Some(4);
                }),
                master(4, true),
                |_| {},
                Work::Idle,
            ),
            row(
                "back from a fence, cleared by a Lease written before the operator saw the return: refuse",
                record(Role::None, 4, Stopped),
                master(5, true),
                |f| f.cleared_before_return = true,
                Work::Refuse {
                    epoch: 5,
                    acknowledge: true,
                },
            ),
            row(
                "a refusal while a leave is left unclean here acknowledges nothing",
                with(record(Role::None, 4, Failed), |r| r.unclean_epoch = Some(4)),
                master(5, true),
                |f| f.cleared_before_return = true,
                Work::Refuse {
                    epoch: 5,
                    acknowledge: false,
                },
            ),
            row(
                "back from a fence, a stale clearance refused once: wait for a new one",
                with(record(Role::None, 5, Failed), |r| r.failed_epoch = Some(5)),
                master(5, true),
                |f| f.cleared_before_return = true,
                Work::Idle,
            ),
            row(
                "a new epoch after an acknowledged one: enter",
                with(record(Role::None, 4, Stopped), |r| r.acked_epoch = Some(4)),
                master(5, true),
                |_| {},
                Work::Steps(vec![EnterMaster]),
            ),
            // 5. The steps.
            row(
                "cleared to enter: enter master",
                record(Role::None, 3, Stopped),
                master(4, true),
                |_| {},
                Work::Steps(vec![EnterMaster]),
            ),
            row(
                "named holder but not cleared yet: nothing entered, the epoch taken on",
                record(Role::None, 3, Stopped),
                master(4, false),
                |_| {},
                Work::Observe { epoch: 4 },
            ),
            row(
                "named holder, not cleared, epoch known: report where it stands",
                record(Role::None, 4, Stopped),
                master(4, false),
                |f| f.report_due = true,
                Work::Report,
            ),
            row(
                "cleared to enter but cut off: never enter without contact",
                record(Role::None, 3, Stopped),
                master(4, true),
                |f| f.cut_off = true,
                Work::Idle,
            ),
            row(
                "an epoch whose enter failed here: not entered again",
                with(record(Role::None, 4, Failed), |r| r.failed_epoch = Some(4)),
                master(4, true),
                |_| {},
                Work::Idle,
            ),
            row(
                "the master role moved elsewhere: leave, even when cut off",
                record(Role::Master, 4, Running),
                none(5),
                |f| f.cut_off = true,
                Work::Steps(vec![LeaveMaster]),
            ),
            row(
                "master to standby: leave master, then enter standby",
                record(Role::Master, 4, Running),
                Assignment {
                    role: Role::Vicemaster,
                    epoch: 5,
                    may_enter: true,
                },
                |_| {},
                Work::Steps(vec![LeaveMaster, EnterVicemaster]),
            ),
            row(
                "after a leave that failed: nothing is entered, not even standby",
                with(record(Role::None, 4, Failed), |r| r.unclean_epoch = Some(4)),
                Assignment {
                    role: Role::Vicemaster,
                    epoch: 5,
                    may_enter: true,
                },
                |_| {},
                Work::Idle,
            ),
            row(
                "after a leave that failed, cleared as master at a new epoch: not entered",
                with(record(Role::None, 4, Failed), |r| r.unclean_epoch = Some(4)),
                master(5, true),
                |_| {},
                Work::Idle,
            ),
            // 6. VIP list edits.
            row(
                "the spec names another VIP: change the VIPs of the running master",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| f.spec_vips = ["198.18.0.101/24".to_owned()].into(),
                Work::Revip,
            ),
            row(
                "the spec adds a VIP: change the VIPs",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| {
                    f.spec_vips.insert("198.18.0.101/24".to_owned());
                },
                Work::Revip,
            ),
            row(
                "a VIP edit while cut off: nothing is added without contact",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| {
                    f.spec_vips = ["198.18.0.101/24".to_owned()].into();
                    f.cut_off = true
                },
                Work::Idle,
            ),
            // 7. The moved-on proof.
            row(
                "idle, the Lease has a later epoch: take it on",
                record(Role::None, 3, Stopped),
                none(5),
                |_| {},
                Work::Observe { epoch: 5 },
            ),
            row(
                "failed here (not uncleanly): take on a later epoch",
                with(record(Role::None, 3, Failed), |r| r.failed_epoch = Some(3)),
                none(5),
                |_| {},
                Work::Observe { epoch: 5 },
            ),
            row(
                "after a leave that failed: a later epoch is not taken on (it would read as moved on)",
                with(record(Role::None, 3, Failed), |r| r.unclean_epoch = Some(3)),
                none(5),
                |_| {},
                Work::Idle,
            ),
            row(
                "a standby runs nothing of the master role: it takes on later epochs",
                record(Role::Vicemaster, 3, Stopped),
                Assignment {
                    role: Role::Vicemaster,
                    epoch: 3,
                    may_enter: true,
                },
                |f| f.lease_epoch = Some(5),
                Work::Observe { epoch: 5 },
            ),
            row(
                "a master is not idle: no moved-on proof from it",
                record(Role::Master, 3, Running),
                master(3, true),
                |f| f.lease_epoch = Some(5),
                Work::Idle,
            ),
            // 8. Routine work.
            row(
                "running master, monitor due: monitor",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| {
                    f.monitor_due = true;
                    f.periodic_due = true;
                    f.report_due = true
                },
                Work::Monitor,
            ),
            row(
                "no monitor on a node that is not the running master",
                record(Role::None, 4, Stopped),
                none(4),
                |f| f.monitor_due = true,
                Work::Idle,
            ),
            row(
                "periodic hook due: run it (on any node)",
                record(Role::None, 4, Stopped),
                none(4),
                |f| {
                    f.periodic_due = true;
                    f.report_due = true
                },
                Work::Periodic,
            ),
            row(
                "GARP refresh due on the running master",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| {
                    f.refresh_due = true;
                    f.report_due = true
                },
                Work::Refresh,
            ),
            row(
                "GARP refresh is never sent from a node that is not master",
                record(Role::None, 4, Stopped),
                none(4),
                |f| f.refresh_due = true,
                Work::Idle,
            ),
            row(
                "the API server's entry differs: report",
                record(Role::Master, 4, Running),
                master(4, true),
                |f| f.report_due = true,
                Work::Report,
            ),
            row(
                "running master, everything in line: idle",
                record(Role::Master, 4, Running),
                master(4, true),
                |_| {},
                Work::Idle,
            ),
        ];
        let mut failures = Vec::new();
        for r in &rows {
            let mut f = facts(r.wanted, &r.record);
            (r.tweak)(&mut f);
            let got = next(&f);
            if got != r.work {
                failures.push(format!("{}: expected {:?}, got {:?}", r.rule, r.work, got));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn bookkeeping_work_is_applied_in_the_same_pass() {
        for w in [
            Work::ForgetAdoption,
            Work::GiveUp,
            Work::Refuse {
                epoch: 1,
                acknowledge: true,
            },
            Work::Observe { epoch: 1 },
        ] {
            assert!(w.is_bookkeeping(), "{w:?}");
        }
        for w in [
            Work::Wait,
            Work::Adopt,
            Work::Recover,
            Work::Steps(vec![LeaveMaster]),
            Work::Revip,
            Work::Monitor,
            Work::Periodic,
            Work::Refresh,
            Work::Report,
            Work::Idle,
        ] {
            assert!(!w.is_bookkeeping(), "{w:?}");
        }
    }
}
