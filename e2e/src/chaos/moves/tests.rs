use serde_json::json;

use super::*;

fn s(secs: f64) -> Duration {
    Duration::from_secs_f64(secs)
}

fn lease(service: &str, holder: Option<&str>, epoch: i64) -> Value {
    let mut spec = json!({"leaseTransitions": epoch});
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({"metadata": {"labels": {"kubeha.io/service": service}}, "spec": spec})
}

#[test]
fn masters_come_from_the_leases_of_the_chaos_services() {
    let list = json!({"items": [
        lease("chaos-0", Some("node-2"), 4),
        lease("chaos-1", Some(""), 7),
        lease("chaos-2", None, 1),
        // No lab node, another service, beyond the run's services.
        lease("chaos-3", Some("worker"), 2),
        lease("web", Some("node-1"), 1),
        lease("chaos-9", Some("node-1"), 1),
        json!({"metadata": {}}),
    ]});
    let want: Masters = [(0, (Some(2), 4)), (1, (None, 7)), (2, (None, 1))].into();
    assert_eq!(masters(&list, 5), want);
    assert_eq!(masters(&json!("garbage"), 5), Masters::new());
}

/// What one poll shows: `(service, holder)`.
type Shown<'a> = &'a [(usize, Option<u8>)];

/// Runs polls `(asked, shown)`, each answered 0.1 s after it was
/// asked, through a tracker; the epoch is the poll's index.
fn track(polls: &[(f64, Shown)]) -> Vec<Change> {
    let mut tracker = Tracker::default();
    for (epoch, (asked, shown)) in polls.iter().enumerate() {
        let shown: Masters = shown
            .iter()
            .map(|(k, h)| (*k, (*h, epoch as i64)))
            .collect();
        tracker.observe(s(*asked), s(asked + 0.1), &shown);
    }
    tracker.changes
}

fn change(service: usize, from: u8, to: Option<u8>, epoch: i64, after: f64, seen: f64) -> Change {
    Change {
        service,
        from,
        to,
        epoch,
        after: s(after),
        seen: s(seen),
    }
}

#[test]
fn a_change_is_a_new_holder_or_none_and_a_start_after_a_stop_ends_it() {
    let none: Shown = &[];
    for (what, polls, want) in [
        (
            "a holder change",
            vec![(0.0, &[(0, Some(1))][..]), (0.3, &[(0, Some(2))])],
            vec![change(0, 1, Some(2), 1, 0.0, 0.4)],
        ),
        (
            "stop, then start elsewhere: one change",
            vec![
                (0.0, &[(0, Some(1))][..]),
                (0.3, &[(0, None)]),
                (0.6, &[(0, None)]),
                (0.9, &[(0, Some(3))]),
            ],
            vec![change(0, 1, Some(3), 1, 0.0, 0.4)],
        ),
        (
            "stop, then start on the same node",
            vec![
                (0.0, &[(0, Some(1))][..]),
                (0.3, &[(0, None)]),
                (0.6, &[(0, Some(1))]),
            ],
            vec![change(0, 1, Some(1), 1, 0.0, 0.4)],
        ),
        (
            "a stop not ended",
            vec![(0.0, &[(0, Some(1))][..]), (0.3, &[(0, None)])],
            vec![change(0, 1, None, 1, 0.0, 0.4)],
        ),
        (
            "nobody at the first poll: a start is no change",
            vec![(0.0, &[(0, None)][..]), (0.3, &[(0, Some(2))])],
            vec![],
        ),
        (
            "a service missing from a poll keeps its master",
            vec![
                (0.0, &[(0, Some(1)), (1, Some(2))][..]),
                (0.3, &[(1, Some(2))]),
                (0.6, &[(0, Some(1)), (1, Some(3))]),
                (0.9, none),
                (1.2, &[(0, Some(4))]),
            ],
            vec![
                change(1, 2, Some(3), 2, 0.3, 0.7),
                change(0, 1, Some(4), 4, 0.6, 1.3),
            ],
        ),
    ] {
        assert_eq!(track(&polls), want, "{what}");
    }
}

#[test]
fn the_grace_is_twice_the_largest_expiry_plus_five_seconds() {
    let lowered = Timing {
        lease_ms: 2000,
        ..Timing::DEFAULT
    };
    // E = D + skew: 3.1 s at the defaults, 2.1 s lowered.
    assert_eq!(grace(&[Timing::DEFAULT, lowered]), s(11.2));
    assert_eq!(grace(&[lowered]), s(9.2));
}

fn fault(kind: Kind, node: u8, service: Option<usize>, start: f64, end: f64) -> Fault {
    Fault::new(1, kind, node, service, s(start), s(end))
}

#[test]
fn only_a_fault_on_the_node_left_the_service_or_the_control_plane_causes_a_move() {
    // chaos-3 leaves node-2 for node-4.
    let moved = change(3, 2, Some(4), 5, 10.0, 10.3);
    let node_faults = [
        Kind::AgentKill,
        Kind::AgentStop,
        Kind::PowerOff,
        Kind::Partition,
        Kind::ModeChange,
    ];
    for kind in Kind::ALL {
        let on_node = node_faults.contains(&kind);
        let on_service = matches!(kind, Kind::Move | Kind::HookFail | Kind::HookHang);
        let control_plane = matches!(kind, Kind::ApiserverStop | Kind::EtcdRestart);
        for (node, service, want) in [
            (2, None, on_node || control_plane),
            (2, Some(3), on_node || on_service || control_plane),
            (4, Some(3), on_service || control_plane),
            (4, Some(1), control_plane),
            (1, None, control_plane),
        ] {
            let f = fault(kind, node, service, 9.0, 9.5);
            assert_eq!(
                spurious(std::slice::from_ref(&moved), &[f], s(12.0)).is_empty(),
                want,
                "{} on node-{node}, service {service:?}",
                kind.name()
            );
        }
    }
}

#[test]
fn a_service_going_back_to_the_node_its_last_move_asked_for_is_caused() {
    // chaos-8 was moved to node-4 at 30 s; node-4 was cut off and the
    // service ran on node-1; at 70 s, long after, it goes back.
    let moved = fault(Kind::Move, 4, Some(8), 30.0, 30.1);
    let back = change(8, 1, Some(4), 6, 69.2, 70.6);
    assert!(
        spurious(
            std::slice::from_ref(&back),
            std::slice::from_ref(&moved),
            s(12.0)
        )
        .is_empty()
    );
    // Elsewhere, or stopped, it is not explained by that request.
    for other in [
        change(8, 1, Some(2), 6, 69.2, 70.6),
        change(8, 1, None, 6, 69.2, 70.6),
    ] {
        assert_eq!(
            spurious(
                std::slice::from_ref(&other),
                std::slice::from_ref(&moved),
                s(12.0)
            )
            .len(),
            1
        );
    }
    // A later move to another node replaces the request.
    let again = fault(Kind::Move, 2, Some(8), 50.0, 50.1);
    assert_eq!(
        spurious(
            std::slice::from_ref(&back),
            &[moved.clone(), again],
            s(12.0)
        )
        .len(),
        1
    );
    // A move of another service says nothing about this one.
    let other = fault(Kind::Move, 4, Some(3), 30.0, 30.1);
    assert_eq!(
        spurious(std::slice::from_ref(&back), &[other], s(12.0)).len(),
        1
    );
}

#[test]
fn a_cause_counts_from_its_start_to_the_grace_after_its_end() {
    let grace = s(12.0);
    let kill = fault(Kind::AgentKill, 2, None, 20.0, 22.0);
    for (after, seen, caused) in [
        (19.0, 19.8, false),
        (19.8, 20.1, true),
        (21.0, 21.3, true),
        (33.7, 34.0, true),
        (34.0, 34.3, true),
        (34.1, 34.4, false),
        (40.0, 40.3, false),
    ] {
        let c = change(0, 2, Some(1), 3, after, seen);
        assert_eq!(
            spurious(std::slice::from_ref(&c), std::slice::from_ref(&kill), grace).is_empty(),
            caused,
            "change between {after} s and {seen} s"
        );
    }
}

#[test]
fn a_spurious_move_names_the_faults_around_it() {
    let grace = s(12.0);
    let faults = [
        Fault::new(4, Kind::PowerOff, 1, None, s(1.0), s(5.0)),
        Fault::new(5, Kind::OperatorLeaderKill, 3, None, s(10.0), s(11.25)),
        Fault::new(6, Kind::Move, 5, Some(0), s(40.0), s(40.1)),
    ];
    let changes = [
        change(2, 1, Some(4), 8, 12.0, 12.5),
        change(2, 4, None, 9, 13.0, 13.25),
        change(0, 2, Some(5), 10, 40.5, 40.75),
    ];
    let found: Vec<String> = spurious(&changes, &faults, grace)
        .into_iter()
        .map(|c| describe(c, &faults, grace))
        .collect();
    assert_eq!(
        found,
        [
            "chaos-2 left node-4 and stopped (epoch 9) between 13.00 s and 13.25 s; no fault explains it \
             (faults within 12.0s: #4 power_off 1.00-5.00 s, #5 operator_leader_kill 10.00-11.25 s)"
        ]
    );
    assert_eq!(
        Fault::new(1, Kind::VipEdit, 3, Some(1), s(0.0), s(1.0)).node,
        None
    );
}
