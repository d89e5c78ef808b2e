use super::*;
use kubeha_crds::service::{HookResult, Role};

fn entry(
    node: &str,
    state: NodeServiceState,
    epoch: i64,
    acked: Option<i64>,
    fails: i32,
) -> ServiceNodeStatus {
    let mut e = kubeha_crds::testing::status_entry(node, Role::None, state, epoch, acked);
    e.fail_count = fails;
    e
}

fn lease(holder: &str, epoch: i64) -> LeaseState {
    LeaseState::for_test(holder, epoch, Some(epoch), Some(holder))
}

fn reasons(s: &Seen) -> Vec<(&'static str, &str)> {
    s.announcements
        .iter()
        .map(|t| (t.reason, t.node.as_str()))
        .collect()
}

#[test]
fn first_look_only_seeds() {
    let mut m = ServiceMemory::default();
    let t0 = Instant::now();
    let entries = vec![
        entry("a", NodeServiceState::Running, 3, Some(1), 0),
        entry("b", NodeServiceState::Failed, 2, Some(2), 1),
    ];
    let lost = BTreeSet::from(["c".to_owned()]);
    let s = m.observe(&entries, Some(&lease("a", 3)), Some("a"), &lost, t0);
    assert_eq!(s, Seen::default());
    // Nothing changed: still nothing.
    let s = m.observe(&entries, Some(&lease("a", 3)), Some("a"), &lost, t0);
    assert_eq!(s, Seen::default());
}

#[test]
fn a_failover_is_announced_once_with_its_duration() {
    let mut m = ServiceMemory::default();
    let t0 = Instant::now();
    let none = BTreeSet::new();
    let before = vec![
        entry("a", NodeServiceState::Running, 3, None, 0),
        entry("b", NodeServiceState::Stopped, 0, None, 0),
    ];
    m.observe(&before, Some(&lease("a", 3)), Some("a"), &none, t0);
    m.note_written("b", 4, "Failover", t0);
    // a leaves cleanly, b runs.
    let after = vec![
        entry("a", NodeServiceState::Stopped, 3, Some(3), 0),
        entry("b", NodeServiceState::Running, 4, None, 0),
    ];
    let s = m.observe(
        &after,
        Some(&lease("b", 4)),
        Some("a"),
        &none,
        t0 + Duration::from_millis(700),
    );
    assert_eq!(reasons(&s), vec![("TakeOver", "b"), ("GiveAway", "a")]);
    assert_eq!(
        s.completed,
        Some(Completed {
            reason: "Failover".into(),
            duration: Duration::from_millis(700)
        })
    );
    let s = m.observe(&after, Some(&lease("b", 4)), Some("a"), &none, t0);
    assert!(s.announcements.is_empty() && s.completed.is_none());
    // Back on the primary.
    let back = vec![
        entry("a", NodeServiceState::Running, 5, Some(3), 0),
        entry("b", NodeServiceState::Stopped, 4, Some(4), 0),
    ];
    let s = m.observe(&back, Some(&lease("a", 5)), Some("a"), &none, t0);
    assert_eq!(reasons(&s), vec![("TakeBack", "a"), ("GiveBack", "b")]);
}

/// chaos seed 5: every operator leader kill restarted the failure
/// timeout of every failure from zero, so a service failed once on each
/// node stayed Errored for good under `failureTimeoutSeconds: 60`.
#[test]
fn a_fresh_memory_dates_a_failure_from_the_entrys_last_failure_time() {
    let mut m = ServiceMemory::default();
    let now = Instant::now();
    let wall: jiff::Timestamp = "2026-12-06T13:40:00Z".parse().unwrap();
    let mut e = entry("a", NodeServiceState::Stopped, 3, None, 1);
    e.last_failure_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-12-06T13:39:15Z".parse().unwrap(),
    ));
    let mut ahead = entry("b", NodeServiceState::Stopped, 3, None, 2);
    ahead.last_failure_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-12-06T13:40:02Z".parse().unwrap(),
    ));
    let bare = entry("c", NodeServiceState::Stopped, 3, None, 1);
    m.note_failures(&[e, ahead, bare], now, wall);
    let f = m.failures(now);
    assert_eq!(f["a"].last_failure_ago, Duration::from_secs(45));
    assert_eq!(
        f["b"].last_failure_ago,
        Duration::ZERO,
        "a node clock ahead counts as now"
    );
    assert_eq!(f["c"].last_failure_ago, Duration::ZERO);
}

#[test]
fn failures_and_fences_are_announced() {
    let mut m = ServiceMemory::default();
    let t0 = Instant::now();
    let mut e = entry("a", NodeServiceState::Running, 3, None, 0);
    m.note_failures(std::slice::from_ref(&e), t0, jiff::Timestamp::UNIX_EPOCH);
    m.observe(
        std::slice::from_ref(&e),
        Some(&lease("a", 3)),
        None,
        &BTreeSet::new(),
        t0,
    );
    e.state = NodeServiceState::Failed;
    e.fail_count = 1;
    e.hooks = vec![HookResult {
        script: "E10start".into(),
        action: "enter".into(),
        exit_code: Some(3),
        outcome: HookOutcome::Failed,
        duration_ms: 5,
        finished_at: None,
        output_tail: vec!["cannot mount".into()],
    }];
    let t1 = t0 + Duration::from_secs(2);
    m.note_failures(std::slice::from_ref(&e), t1, jiff::Timestamp::UNIX_EPOCH);
    let lost = BTreeSet::from(["a".to_owned()]);
    let s = m.observe(
        std::slice::from_ref(&e),
        Some(&lease("a", 3)),
        None,
        &lost,
        t1,
    );
    assert_eq!(reasons(&s), vec![("HookFailed", "a"), ("Fenced", "a")]);
    assert!(
        s.announcements[0].message.contains("cannot mount"),
        "{}",
        s.announcements[0].message
    );
    assert!(s.announcements.iter().all(|t| t.warning));
    assert_eq!(
        m.failed_for("a", t1 + Duration::from_secs(3)),
        Some(Duration::from_secs(3))
    );
    let f = m.failures(t1 + Duration::from_secs(5));
    assert_eq!(f["a"].count, 1);
    assert_eq!(f["a"].last_failure_ago, Duration::from_secs(5));
    // The same count again keeps its time; a reset forgets it.
    m.note_failures(
        std::slice::from_ref(&e),
        t1 + Duration::from_secs(9),
        jiff::Timestamp::UNIX_EPOCH,
    );
    assert_eq!(
        m.failures(t1 + Duration::from_secs(10))["a"].last_failure_ago,
        Duration::from_secs(10)
    );
    e.fail_count = 0;
    m.note_failures(std::slice::from_ref(&e), t1, jiff::Timestamp::UNIX_EPOCH);
    assert!(m.failures(t1).is_empty());
    // An admin's clear: count 0 and the entry Stopped again.
    assert!(m.failed_for("a", t1).is_some(), "still Failed");
    e.state = NodeServiceState::Stopped;
    m.note_failures(std::slice::from_ref(&e), t1, jiff::Timestamp::UNIX_EPOCH);
    assert_eq!(m.failed_for("a", t1), None);
}

#[test]
fn cluster_modes_and_peerdown_marks() {
    let mut m = ClusterMemory::default();
    let t0 = Instant::now();
    let modes = vec![
        ("a".to_owned(), Mode::Default),
        ("b".to_owned(), Mode::Peerdown),
    ];
    assert!(m.observe(&modes, None, t0).is_empty());
    assert_eq!(m.peerdown_since("b"), Some(t0));
    let t1 = t0 + Duration::from_secs(1);
    let modes = vec![
        ("a".to_owned(), Mode::Single),
        ("b".to_owned(), Mode::Peerdown),
    ];
    assert_eq!(
        m.observe(&modes, None, t1),
        vec![ModeEvent::Changed {
            node: "a".into(),
            from: Mode::Default,
            to: Mode::Single
        }]
    );
    assert_eq!(m.peerdown_since("b"), Some(t0), "mark time kept");
    let modes = vec![
        ("a".to_owned(), Mode::Single),
        ("b".to_owned(), Mode::Default),
    ];
    let ev = m.observe(&modes, Some("bad"), t1);
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1], ModeEvent::Prohibited("bad".into()));
    assert_eq!(m.peerdown_since("b"), None);
    // The same prohibited state is reported once.
    assert!(m.observe(&modes, Some("bad"), t1).is_empty());
}
