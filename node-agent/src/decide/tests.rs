use super::*;
use Step::*;

const VIP: &str = "198.18.0.100/24";

fn record(role: Role, epoch: i64, state: NodeServiceState) -> ServiceRecord {
    let spec = kubeha_crds::testing::service_spec("c", &[VIP]);
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
