use super::*;
use kubeha_crds::Mode;
use kubeha_crds::cluster::{Failback, HeartbeatState, Placement};
use kubeha_crds::service::{HookOutcome, HookResult, Role};
use kubeha_crds::testing::status_entry as entry;

use crate::placement::NodeView;

const HOUR: Duration = Duration::from_secs(3600);

fn cluster(nodes: &[(&str, HeartbeatState)]) -> ClusterView {
    ClusterView {
        members: nodes
            .iter()
            .map(|(n, hb)| NodeView {
                name: n.to_string(),
                mode: Mode::Default,
                heartbeat: *hb,
                cordoned: false,
                eligible_for: HOUR,
            })
            .collect(),
        placement: Placement::Alphabetical,
        failback: Failback::default(),
        startup_grace: Duration::from_secs(30),
        since_start: HOUR,
        stopped: false,
    }
}

fn spec() -> HAServiceSpec {
    let mut spec =
        kubeha_crds::testing::service_spec("c", &["198.18.0.100/24", "2001:db8::100/64"]);
    spec.migration_threshold = 1;
    spec.failure_timeout_seconds = 0;
    spec
}

fn status(entries: Vec<ServiceNodeStatus>) -> HAServiceStatus {
    HAServiceStatus {
        nodes: entries,
        ..Default::default()
    }
}

fn cond<'a>(p: &'a Plan, t: &str) -> &'a Cond {
    p.status.conditions.iter().find(|c| c.type_ == t).unwrap()
}

struct Case {
    spec: HAServiceSpec,
    cluster: ClusterView,
    lease: Option<LeaseState>,
    status: Option<HAServiceStatus>,
    fences: BTreeMap<String, Fence>,
    refusal: Option<Refusal>,
    deleting: bool,
    failures: BTreeMap<String, Failures>,
    move_to: Option<String>,
    force_start: Option<String>,
    force_fail_count: Option<i32>,
    released: Option<String>,
}

impl Case {
    fn new(nodes: &[(&str, HeartbeatState)]) -> Self {
        Self {
            spec: spec(),
            cluster: cluster(nodes),
            lease: None,
            status: None,
            fences: nodes
                .iter()
                .map(|(n, hb)| {
                    let f = if matches!(hb, HeartbeatState::Lost | HeartbeatState::Fenced) {
                        Fence::Heartbeat
                    } else {
                        Fence::None
                    };
                    (n.to_string(), f)
                })
                .collect(),
            refusal: None,
            deleting: false,
            failures: BTreeMap::new(),
            move_to: None,
            force_start: None,
            force_fail_count: None,
            released: None,
        }
    }
    fn plan(&self) -> Plan {
        plan(&Facts {
            key: "ns/svc",
            generation: Some(1),
            spec: &self.spec,
            status: self.status.as_ref(),
            refusal: self.refusal.clone(),
            deleting: self.deleting,
            cluster: &self.cluster,
            lease: self.lease.as_ref(),
            fences: &self.fences,
            failures: self.failures.clone(),
            started_nothing: &BTreeSet::new(),
            move_to: self.move_to.as_deref(),
            force_start: self.force_start.as_deref(),
            force_fail_count: self.force_fail_count,
            released: self.released.as_deref(),
        })
    }
}

fn cleared(holder: &str, epoch: i64) -> LeaseState {
    LeaseState {
        holder: Some(holder.into()),
        epoch,
        standby: None,
        enter_epoch: Some(epoch),
        cleared_node: Some(holder.into()),
    }
}

use HeartbeatState::*;

#[test]
fn first_placement_starts_on_the_first_node() {
    let p = Case::new(&[("a", Alive), ("b", Alive)]).plan();
    assert!(p.handover.write && p.handover.cleared_now);
    assert_eq!(p.status.phase, Phase::Starting);
    assert_eq!(p.status.active_node.as_deref(), Some("a"));
    assert_eq!(p.status.standby_node.as_deref(), Some("b"));
    assert_eq!(p.status.epoch, Some(1));
    assert_eq!(p.status.vips, "198.18.0.100/24,2001:db8::100/64");
    assert!(cond(&p, RECONCILING).status);
    assert!(!cond(&p, READY).status);
}

#[test]
fn running_holder_is_active_and_ready() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(LeaseState {
        standby: Some("b".into()),
        ..cleared("a", 1)
    });
    c.status = Some(status(vec![entry(
        "a",
        Role::Master,
        NodeServiceState::Running,
        1,
        None,
    )]));
    let p = c.plan();
    assert!(!p.handover.write);
    assert_eq!(p.status.phase, Phase::Active);
    assert!(cond(&p, READY).status);
    assert!(!cond(&p, DEGRADED).status);
    assert!(!cond(&p, RECONCILING).status);
    assert!(!cond(&p, STALLED).status);
}

#[test]
fn failover_waits_for_the_lost_master_then_clears() {
    let mut c = Case::new(&[("a", Lost), ("b", Alive)]);
    c.lease = Some(cleared("a", 1));
    c.status = Some(status(vec![entry(
        "a",
        Role::Master,
        NodeServiceState::Running,
        1,
        None,
    )]));
    let p = c.plan();
    assert_eq!(p.decision.as_ref().unwrap().reason, Reason::Failover);
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert!(p.handover.cleared_now, "a is Lost: fenced");
    assert_eq!(p.handover.relies_on_heartbeat, vec!["a".to_owned()]);
    assert_eq!(p.status.phase, Phase::Starting);
    assert!(cond(&p, DEGRADED).status, "no standby left");
}

#[test]
fn failed_monitor_moves_after_the_ack() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(cleared("a", 1));
    let mut failed = entry("a", Role::None, NodeServiceState::Failed, 1, Some(1));
    failed.fail_count = 1;
    c.status = Some(status(vec![failed.clone()]));
    let mut p_facts = Case::new(&[("a", Alive), ("b", Alive)]);
    p_facts.lease = c.lease.clone();
    p_facts.status = c.status.clone();
    let failures = BTreeMap::from([(
        "a".to_owned(),
        Failures {
            count: 1,
            last_failure_ago: Duration::from_secs(1),
            unclean: false,
        },
    )]);
    let p = plan(&Facts {
        key: "ns/svc",
        generation: Some(1),
        spec: &c.spec,
        status: c.status.as_ref(),
        refusal: None,
        deleting: false,
        cluster: &c.cluster,
        lease: c.lease.as_ref(),
        fences: &c.fences,
        failures,
        started_nothing: &BTreeSet::new(),
        move_to: None,
        force_start: None,
        force_fail_count: None,
        released: None,
    });
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert!(p.handover.cleared_now, "a acknowledged epoch 1");
    assert!(cond(&p, DEGRADED).status);
    assert_eq!(cond(&p, DEGRADED).reason, "NodeFailed");
}

#[test]
fn failed_leave_waits_for_the_fence() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(cleared("a", 1));
    let mut failed = entry("a", Role::None, NodeServiceState::Failed, 1, None);
    failed.fail_count = 1;
    c.status = Some(status(vec![failed]));
    c.spec.migration_threshold = 5;
    let p = c.plan();
    // a is still eligible (threshold 5) and still the master: it stays.
    assert_eq!(p.handover.lease.holder.as_deref(), Some("a"));
    // Once a is not eligible (cordoned), nobody may take it before the fence.
    c.cluster.members[0].cordoned = true;
    let p = c.plan();
    assert_eq!(p.decision.as_ref().unwrap().reason, Reason::WaitingForFence);
    assert_eq!(p.handover.lease.holder, None);
    assert_eq!(p.status.phase, Phase::Stopping);
    assert_eq!(cond(&p, DEGRADED).reason, "WaitingForFence");
    // a's heartbeat Lost: the service moves to b at once.
    c.cluster.members[0].heartbeat = Lost;
    c.fences.insert("a".into(), Fence::Heartbeat);
    let p = c.plan();
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert!(p.handover.cleared_now);
}

#[test]
fn refused_services_are_stopped_and_stalled() {
    let mut c = Case::new(&[("a", Alive)]);
    c.lease = Some(cleared("a", 2));
    c.status = Some(status(vec![entry(
        "a",
        Role::Master,
        NodeServiceState::Running,
        2,
        None,
    )]));
    c.refusal = Some(Refusal {
        reason: "InvalidSpec",
        message: "spec.vips: outside the pool".into(),
    });
    let p = c.plan();
    assert_eq!(p.handover.lease.holder, None);
    assert_eq!(p.handover.lease.epoch, 3);
    assert_eq!(p.status.phase, Phase::Stopping);
    assert!(cond(&p, STALLED).status);
    assert_eq!(cond(&p, STALLED).reason, "InvalidSpec");
    assert!(!p.stopped());
    // After the ack: Pending, stopped.
    c.lease = Some(p.handover.lease.clone());
    c.status = Some(status(vec![entry(
        "a",
        Role::None,
        NodeServiceState::Stopped,
        2,
        Some(2),
    )]));
    let p = c.plan();
    assert!(!p.handover.write);
    assert_eq!(p.status.phase, Phase::Pending);
    assert!(p.stopped());
    // A refused service that never ran writes no Lease.
    let mut c = Case::new(&[("a", Alive)]);
    c.refusal = Some(Refusal {
        reason: "ClusterNotFound",
        message: "no HACluster c".into(),
    });
    let p = c.plan();
    assert!(!p.handover.write);
    assert_eq!(p.status.epoch, None);
}

#[test]
fn deleting_stops_then_releases() {
    let mut c = Case::new(&[("a", Alive)]);
    c.lease = Some(cleared("a", 1));
    c.deleting = true;
    let p = c.plan();
    assert_eq!(p.handover.lease.holder, None);
    assert!(!p.stopped());
    c.lease = Some(p.handover.lease);
    c.fences.insert("a".into(), Fence::Heartbeat);
    assert!(c.plan().stopped(), "Lost counts as left");
}

#[test]
fn all_failed_is_errored_and_stalled() {
    let c = Case::new(&[("a", Alive)]);
    let failures = BTreeMap::from([(
        "a".to_owned(),
        Failures {
            count: 1,
            last_failure_ago: Duration::ZERO,
            unclean: false,
        },
    )]);
    let p = plan(&Facts {
        key: "ns/svc",
        generation: Some(1),
        spec: &c.spec,
        status: None,
        refusal: None,
        deleting: false,
        cluster: &c.cluster,
        lease: None,
        fences: &c.fences,
        failures,
        started_nothing: &BTreeSet::new(),
        move_to: None,
        force_start: None,
        force_fail_count: None,
        released: None,
    });
    assert_eq!(p.status.phase, Phase::Errored);
    assert_eq!(cond(&p, STALLED).reason, "AllFailed");
}

#[test]
fn a_refused_enter_moves_once_its_vips_expired() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(cleared("a", 1));
    let mut e = entry("a", Role::None, NodeServiceState::Failed, 1, None);
    e.fail_count = 1;
    e.hooks = vec![HookResult {
        script: "-".into(),
        action: "enter".into(),
        exit_code: None,
        outcome: HookOutcome::Refused,
        duration_ms: 0,
        finished_at: None,
        output_tail: vec!["no interface holds 198.18.0.100/24".into()],
    }];
    assert!(refused_before_start(&e));
    c.status = Some(status(vec![e]));
    let failures = BTreeMap::from([(
        "a".to_owned(),
        Failures {
            count: 1,
            last_failure_ago: Duration::ZERO,
            unclean: false,
        },
    )]);
    let run = |started: &BTreeSet<String>| {
        plan(&Facts {
            key: "ns/svc",
            generation: Some(1),
            spec: &c.spec,
            status: c.status.as_ref(),
            refusal: None,
            deleting: false,
            cluster: &c.cluster,
            lease: c.lease.as_ref(),
            fences: &c.fences,
            failures: failures.clone(),
            started_nothing: started,
            move_to: None,
            force_start: None,
            force_fail_count: None,
            released: None,
        })
    };
    let p = run(&BTreeSet::new());
    assert_eq!(p.decision.unwrap().reason, Reason::WaitingForFence);
    let p = run(&BTreeSet::from(["a".to_owned()]));
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert!(p.handover.cleared_now);
}

fn running(node: &str, epoch: i64) -> ServiceNodeStatus {
    entry(node, Role::Master, NodeServiceState::Running, epoch, None)
}

fn moved(p: &Plan) -> Option<&Cond> {
    p.status.conditions.iter().find(|c| c.type_ == MOVED)
}

#[test]
fn move_under_failback_never_hands_over_without_two_holders() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    assert_eq!(c.cluster.failback.policy, FailbackPolicy::Never);
    c.lease = Some(LeaseState {
        standby: Some("b".into()),
        ..cleared("a", 1)
    });
    c.status = Some(status(vec![running("a", 1)]));
    // Without a request a stays (a is first anyway, failback Never).
    let p = c.plan();
    assert!(!p.handover.write);
    assert!(moved(&p).is_none(), "no request, no Moved condition");

    c.move_to = Some("b".into());
    let p = c.plan();
    let d = p.decision.as_ref().unwrap();
    assert_eq!(
        (d.master.as_deref(), d.reason),
        (Some("b"), Reason::Failback)
    );
    assert_eq!(d.standby.as_deref(), Some("a"));
    assert!(p.handover.write && p.handover.holder_changed);
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert_eq!(p.handover.lease.epoch, 2);
    assert!(!p.handover.cleared_now, "b waits until a left epoch 1");
    assert!(!p.handover.lease.holder_may_enter());
    assert_eq!(
        p.handover.progress,
        Progress::Waiting {
            nodes: vec!["a".into()],
            epoch: 1
        }
    );
    assert_eq!(p.move_blocked, None);
    assert_eq!(moved(&p).unwrap().reason, "Moving");
    assert!(!moved(&p).unwrap().status);

    // a acknowledges epoch 1: b is cleared.
    c.lease = Some(p.handover.lease.clone());
    c.status = Some(status(vec![entry(
        "a",
        Role::Vicemaster,
        NodeServiceState::Stopped,
        2,
        Some(1),
    )]));
    let p = c.plan();
    assert!(p.handover.write && p.handover.cleared_now);
    assert!(p.handover.lease.holder_may_enter());
    assert_eq!(p.handover.lease.epoch, 2);

    // b runs: Moved, and it stays there (a would rank first without
    // the request, but the request keeps b first).
    c.lease = Some(p.handover.lease.clone());
    c.status = Some(status(vec![
        entry("a", Role::Vicemaster, NodeServiceState::Stopped, 2, Some(1)),
        running("b", 2),
    ]));
    let p = c.plan();
    assert!(!p.handover.write);
    assert_eq!(p.status.phase, Phase::Active);
    assert!(moved(&p).unwrap().status);
    assert_eq!(moved(&p).unwrap().reason, "OnTarget");
}

#[test]
fn a_standing_move_returns_to_its_node_once_eligible_again() {
    // The service failed over from b (Lost) to a; b is back.
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.spec.preferred_nodes = vec!["a".into()];
    c.lease = Some(cleared("a", 3));
    c.status = Some(status(vec![
        running("a", 3),
        entry("b", Role::None, NodeServiceState::Failed, 2, None),
    ]));
    c.move_to = Some("b".into());
    let p = c.plan();
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert_eq!(p.decision.unwrap().reason, Reason::Failback);
    // While b is Lost the request cannot be honoured: a keeps it.
    c.cluster.members[1].heartbeat = Lost;
    c.fences.insert("b".into(), Fence::Heartbeat);
    let p = c.plan();
    assert!(!p.handover.write);
    assert_eq!(p.status.active_node.as_deref(), Some("a"));
    assert!(
        p.move_blocked
            .as_deref()
            .unwrap()
            .contains("heartbeat is Lost")
    );
}

#[test]
fn move_to_an_ineligible_node_reports_and_stays() {
    let base = || {
        let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
        c.lease = Some(LeaseState {
            standby: Some("b".into()),
            ..cleared("a", 1)
        });
        c.status = Some(status(vec![running("a", 1)]));
        c
    };
    let stays = |c: &Case, expect: &[&str]| {
        let p = c.plan();
        // The standby may change (b may not stand by), the master not.
        assert!(!p.handover.holder_changed, "{:?}", p.handover);
        assert_eq!(p.handover.lease.epoch, 1);
        assert_eq!(p.status.active_node.as_deref(), Some("a"));
        assert_eq!(p.decision.as_ref().unwrap().reason, Reason::Unchanged);
        let why = p.move_blocked.clone().expect("blocked");
        let m = moved(&p).unwrap();
        assert!(!m.status);
        assert_eq!(m.reason, "TargetNotEligible");
        assert_eq!(m.message, why);
        assert!(why.starts_with("kubeha.io/move-to asks for "), "{why}");
        assert!(why.contains("stays where it is"), "{why}");
        assert!(
            why.contains("kubectl annotate haservice svc -n ns kubeha.io/move-to-"),
            "{why}"
        );
        for e in expect {
            assert!(why.contains(e), "{why} lacks {e}");
        }
        // Ready is not affected: the service runs.
        assert!(cond(&p, READY).status);
    };

    let mut c = base();
    c.move_to = Some("z".into());
    stays(
        &c,
        &[
            "z is not a member of HACluster c",
            "kubectl ha status --cluster c",
        ],
    );

    let mut c = base();
    c.move_to = Some("b".into());
    c.cluster.members[1].mode = Mode::Locked;
    stays(
        &c,
        &["mode locked", "kubectl ha mode b default --cluster c"],
    );

    let mut c = base();
    c.move_to = Some("b".into());
    c.cluster.members[1].cordoned = true;
    stays(&c, &["kubectl uncordon b"]);

    let mut c = base();
    c.move_to = Some("b".into());
    c.failures.insert(
        "b".into(),
        Failures {
            count: 1,
            last_failure_ago: Duration::ZERO,
            unclean: false,
        },
    );
    stays(&c, &["fail count 1", "kubectl ha clear svc -n ns"]);
}

#[test]
fn move_to_the_current_master_is_a_no_op() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(LeaseState {
        standby: Some("b".into()),
        ..cleared("a", 1)
    });
    c.status = Some(status(vec![running("a", 1)]));
    let before = c.plan();
    c.move_to = Some(" a ".into());
    let p = c.plan();
    assert!(!p.handover.write);
    assert_eq!(p.handover, before.handover);
    assert_eq!(p.decision.as_ref().unwrap().reason, Reason::Unchanged);
    assert_eq!(p.move_blocked, None);
    assert!(moved(&p).unwrap().status);
    // A blank annotation is no request at all.
    c.move_to = Some("".into());
    assert!(moved(&c.plan()).is_none());
}

#[test]
fn cleared_failures_make_an_errored_service_placeable() {
    let mut c = Case::new(&[("a", Alive)]);
    c.failures.insert(
        "a".into(),
        Failures {
            count: 1,
            last_failure_ago: Duration::ZERO,
            unclean: false,
        },
    );
    assert_eq!(c.plan().status.phase, Phase::Errored);
    // The agent reset its count: the operator's memory forgets it.
    c.failures.clear();
    let p = c.plan();
    assert_eq!(p.status.phase, Phase::Starting);
    assert_eq!(p.handover.lease.holder.as_deref(), Some("a"));
    assert!(!cond(&p, STALLED).status);
}

/// Seed 8 of the chaos run: node-3's leave at epoch 13 was cut short by
/// its own fence; a minute later its failure had expired and it was
/// chosen master, but an agent that may not have left cleanly enters
/// nothing, and the service stayed down until an admin acted. A node
/// that reports `uncleanEpoch` is no candidate, however old its failure.
#[test]
fn a_node_that_may_not_have_left_cleanly_is_no_candidate_after_its_failure_expired() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.spec.failure_timeout_seconds = 60;
    let expired = Failures {
        count: 1,
        last_failure_ago: Duration::from_secs(120),
        unclean: false,
    };
    c.failures.insert("a".into(), expired.clone());
    assert_eq!(
        c.plan().handover.lease.holder.as_deref(),
        Some("a"),
        "an expired failure alone lets a run it again"
    );
    c.failures.insert(
        "a".into(),
        Failures {
            unclean: true,
            ..expired
        },
    );
    let p = c.plan();
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    // With no other member it stays stopped, and nothing asks to look
    // again at once (an unclean node does not expire).
    let mut alone = Case::new(&[("a", Alive)]);
    alone.spec.failure_timeout_seconds = 60;
    alone.failures = c.failures.clone();
    let p = alone.plan();
    assert_eq!(p.handover.lease.holder, None);
    assert_ne!(p.requeue_after, Some(Duration::ZERO));
}

/// The status an evaluation publishes when it writes a new holder is the
/// one the next evaluation (which reads that Lease back, placement's
/// reason now Unchanged) publishes too, up to the old master's
/// acknowledgement: no second status write between the Lease write and the
/// acknowledgement, for a move as for a failover.
#[test]
fn the_status_written_with_a_new_holder_stands_until_the_acknowledgement() {
    for (a_heartbeat, move_to) in [(Alive, Some("b")), (Lost, None)] {
        let mut c = Case::new(&[("a", a_heartbeat), ("b", Alive)]);
        c.lease = Some(LeaseState {
            standby: Some("b".into()),
            ..cleared("a", 1)
        });
        c.status = Some(status(vec![running("a", 1)]));
        c.move_to = move_to.map(str::to_owned);
        let written = c.plan();
        assert!(written.handover.holder_changed, "{a_heartbeat:?}");
        assert_ne!(written.decision.as_ref().unwrap().reason, Reason::Unchanged);

        c.lease = Some(written.handover.lease.clone());
        let next = c.plan();
        assert_eq!(next.decision.as_ref().unwrap().reason, Reason::Unchanged);
        assert_eq!(next.status, written.status, "{a_heartbeat:?}");
    }
}

fn forced_cond(p: &Plan) -> Option<&Cond> {
    p.status
        .conditions
        .iter()
        .find(|c| c.type_ == FORCE_STARTED)
}

fn failed_once(unclean: bool) -> Failures {
    Failures {
        count: 1,
        last_failure_ago: Duration::ZERO,
        unclean,
    }
}

/// FreeHA's USR1: an Errored service (failed on every node) starts on the
/// node an admin forces, at a new epoch through the handover, and the
/// ForceStarted condition follows it to Active; the other node's failures
/// still count.
#[test]
fn a_force_start_overrides_the_failures_on_its_node_only() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(LeaseState {
        holder: None,
        ..cleared("a", 3)
    });
    c.status = Some(status(vec![
        entry("a", Role::None, NodeServiceState::Failed, 3, Some(3)),
        entry("b", Role::None, NodeServiceState::Failed, 2, Some(2)),
    ]));
    c.failures.insert("a".into(), failed_once(false));
    c.failures.insert("b".into(), failed_once(false));
    let p = c.plan();
    assert_eq!(p.status.phase, Phase::Errored);
    assert!(forced_cond(&p).is_none(), "no request, no condition");
    assert_eq!(p.forced, None);

    c.force_start = Some("b".into());
    let p = c.plan();
    let why = p.force_blocked.clone().expect("no fail count, no force");
    assert!(
        why.contains("kubeha.io/force-start-fail-count is missing"),
        "{why}"
    );
    assert!(
        why.contains("kubectl ha force-start svc -n ns --on b"),
        "{why}"
    );
    assert_eq!(p.forced, None);
    assert_eq!(p.status.phase, Phase::Errored, "still errored");
    c.force_fail_count = Some(1);
    let p = c.plan();
    let d = p.decision.as_ref().unwrap();
    assert_eq!(d.master.as_deref(), Some("b"));
    assert_eq!(d.standby, None, "a's failures still count");
    assert!(p.handover.write);
    assert_eq!(p.handover.lease.epoch, 4, "a new epoch");
    assert_eq!(p.force_blocked, None);
    assert!(
        p.forced
            .as_deref()
            .unwrap()
            .starts_with("FORCE START of ns/svc on b")
    );
    let fc = forced_cond(&p).unwrap();
    assert_eq!((fc.status, fc.reason.as_str()), (false, "Starting"));
    assert!(!cond(&p, STALLED).status);

    // b runs at epoch 4: ForceStarted True, until the request is removed.
    c.lease = Some(p.handover.lease.clone());
    c.status = Some(status(vec![
        entry("a", Role::None, NodeServiceState::Failed, 3, Some(3)),
        running("b", 4),
    ]));
    let p = c.plan();
    assert_eq!(p.status.phase, Phase::Active);
    let fc = forced_cond(&p).unwrap();
    assert!(fc.status, "{fc:?}");
    assert!(fc.message.contains("kubectl ha clear svc -n ns"), "{fc:?}");
}

/// A forced start keeps the handover: the running holder leaves and
/// acknowledges before the forced node is cleared to enter.
#[test]
fn a_force_start_away_from_a_running_holder_waits_for_its_leave() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(cleared("a", 1));
    c.status = Some(status(vec![running("a", 1)]));
    c.failures.insert("b".into(), failed_once(false));
    c.force_start = Some("b".into());
    c.force_fail_count = Some(1);
    let p = c.plan();
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert_eq!(p.handover.lease.epoch, 2);
    assert!(!p.handover.cleared_now, "b waits until a left epoch 1");
    assert!(!p.handover.lease.holder_may_enter());
}

/// What a tenant cannot get from a force start: a node that is not a
/// member, not Alive, in a mode that runs no services, cordoned, or that
/// may not have left the service cleanly.
#[test]
fn a_force_start_never_overrides_membership_heartbeat_mode_cordon_or_unclean() {
    let base = || {
        let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
        c.lease = Some(cleared("a", 1));
        c.status = Some(status(vec![running("a", 1)]));
        c.failures.insert("b".into(), failed_once(false));
        c.force_start = Some("b".into());
        c.force_fail_count = Some(1);
        c
    };
    let blocked = |c: &Case, expect: &str| {
        let p = c.plan();
        assert!(!p.handover.holder_changed, "{:?}", p.handover);
        assert_eq!(p.status.active_node.as_deref(), Some("a"));
        let why = p.force_blocked.clone().expect("blocked");
        assert!(why.starts_with("kubeha.io/force-start asks for "), "{why}");
        assert!(why.contains(expect), "{why} lacks {expect}");
        assert_eq!(p.forced, None);
        let fc = forced_cond(&p).unwrap();
        assert_eq!(
            (fc.status, fc.reason.as_str()),
            (false, "TargetNotEligible")
        );
    };
    let mut c = base();
    c.force_start = Some("z".into());
    blocked(&c, "z is not a member of HACluster c");
    let mut c = base();
    c.cluster.members[1].heartbeat = Lost;
    blocked(&c, "heartbeat is Lost");
    let mut c = base();
    c.cluster.members[1].mode = Mode::Locked;
    blocked(&c, "mode locked");
    let mut c = base();
    c.cluster.members[1].cordoned = true;
    blocked(&c, "b is cordoned");
    let mut c = base();
    c.failures.insert("b".into(), failed_once(true));
    let mut unclean = entry("b", Role::None, NodeServiceState::Failed, 1, None);
    unclean.unclean_epoch = Some(1);
    c.status = Some(status(vec![running("a", 1), unclean]));
    blocked(&c, "may not have left the service cleanly");
}

/// FreeHA's HUP: while the cluster's release names a node, the service it
/// runs moves to the first other eligible node through the handover; a
/// service with nowhere else to go is stopped.
#[test]
fn a_released_node_gives_its_service_to_the_next_node() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.lease = Some(LeaseState {
        standby: Some("b".into()),
        ..cleared("a", 1)
    });
    c.status = Some(status(vec![running("a", 1)]));
    c.released = Some("a".into());
    let p = c.plan();
    assert_eq!(p.handover.lease.holder.as_deref(), Some("b"));
    assert_eq!(p.handover.lease.standby, None, "a stands by for nothing");
    assert_eq!(p.handover.lease.epoch, 2);
    assert!(!p.handover.cleared_now, "b waits for a's leave");

    let mut c = Case::new(&[("a", Alive)]);
    c.lease = Some(cleared("a", 1));
    c.status = Some(status(vec![running("a", 1)]));
    c.released = Some("a".into());
    let p = c.plan();
    assert_eq!(p.handover.lease.holder, None, "stopped on a");
    // Released: placed again on a.
    c.released = None;
    c.lease = Some(LeaseState {
        holder: None,
        ..cleared("a", 1)
    });
    c.status = Some(status(vec![entry(
        "a",
        Role::None,
        NodeServiceState::Stopped,
        1,
        Some(1),
    )]));
    let p = c.plan();
    assert_eq!(p.handover.lease.holder.as_deref(), Some("a"));
}

/// A forced start that fails again on its node is not retried at every new
/// epoch: failures past the count the force was asked at end the
/// override, and the service is placed as usual (review finding).
#[test]
fn a_force_start_that_fails_again_ends_its_override() {
    let mut c = Case::new(&[("a", Alive), ("b", Alive)]);
    c.spec.preferred_nodes = vec!["a".into()];
    let mut failed_b = entry("b", Role::None, NodeServiceState::Failed, 2, Some(2));
    failed_b.fail_count = 1;
    c.lease = Some(cleared("a", 3));
    c.status = Some(status(vec![running("a", 3), failed_b.clone()]));
    c.failures.insert("b".into(), failed_once(false));
    c.force_start = Some("b".into());
    c.force_fail_count = Some(1);
    let p = c.plan();
    assert_eq!(p.decision.as_ref().unwrap().master.as_deref(), Some("b"));
    assert!(p.forced.is_some());

    // b entered at epoch 4 and failed there: its count is 2 now.
    let mut again = entry("b", Role::None, NodeServiceState::Failed, 4, Some(4));
    again.fail_count = 2;
    c.lease = Some(LeaseState {
        holder: None,
        ..cleared("b", 4)
    });
    c.status = Some(status(vec![
        entry("a", Role::None, NodeServiceState::Stopped, 3, Some(3)),
        again,
    ]));
    c.failures.insert(
        "b".into(),
        Failures {
            count: 2,
            ..failed_once(false)
        },
    );
    let p = c.plan();
    assert_eq!(
        p.decision.as_ref().unwrap().master.as_deref(),
        Some("a"),
        "placed as usual, not on b again"
    );
    assert_eq!(p.forced, None, "no warning while not overriding");
    let fc = forced_cond(&p).unwrap();
    assert_eq!(
        (fc.status, fc.reason.as_str()),
        (false, "ForcedStartFailed")
    );
    assert!(fc.message.contains("kubectl ha clear svc -n ns"), "{fc:?}");
}
