//! Scenario table for the placement function, in the spirit of Pacemaker's
//! scheduler regression tests: each test names what it checks, builds a
//! cluster and services with the small builders below, and states the
//! expected master, standby, phase, reason and requeue of every service.
//!
//! Defaults of the builders: every node `default`, `Alive`, not cordoned,
//! eligible for an hour; placement `Alphabetical`; failback `Never`; startup
//! grace 30 s with the operator started an hour ago. A service has no
//! preferred nodes, migration threshold 1, no failure timeout, no failures
//! and no master.

use std::collections::BTreeMap;
use std::time::Duration;

use kubeha_crds::cluster::{Failback, FailbackPolicy, HeartbeatState, Placement};
use kubeha_crds::mode::Mode;
use kubeha_crds::service::Phase;
use kubeha_operator::placement::{
    ClusterView, Decision, Failures, NodeView, Reason, ServiceView, eligible, place,
};

const HOUR: Duration = Duration::from_secs(3600);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn automatic(delay_seconds: i32) -> Failback {
    Failback {
        policy: FailbackPolicy::Automatic,
        delay_seconds,
    }
}

fn never() -> Failback {
    Failback {
        policy: FailbackPolicy::Never,
        delay_seconds: 0,
    }
}

// ---------------------------------------------------------------- builders

/// Cluster builder.
struct C(ClusterView);

/// A cluster of these members, in this member order.
fn nodes(names: &[&str]) -> C {
    C(ClusterView {
        members: names
            .iter()
            .map(|n| NodeView {
                name: n.to_string(),
                mode: Mode::Default,
                heartbeat: HeartbeatState::Alive,
                cordoned: false,
                eligible_for: HOUR,
            })
            .collect(),
        placement: Placement::Alphabetical,
        failback: never(),
        startup_grace: secs(30),
        since_start: HOUR,
        stopped: false,
    })
}

impl C {
    fn node(&mut self, name: &str) -> &mut NodeView {
        self.0
            .members
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("scenario names unknown node {name}"))
    }
    fn ordered(mut self) -> Self {
        self.0.placement = Placement::Ordered;
        self
    }
    fn mode(mut self, name: &str, mode: Mode) -> Self {
        self.node(name).mode = mode;
        self
    }
    fn hb(mut self, name: &str, hb: HeartbeatState) -> Self {
        self.node(name).heartbeat = hb;
        self
    }
    fn cordon(mut self, name: &str) -> Self {
        self.node(name).cordoned = true;
        self
    }
    /// How long `name` has been eligible (for the failback delay).
    fn up_for(mut self, name: &str, s: u64) -> Self {
        self.node(name).eligible_for = secs(s);
        self
    }
    fn failback(mut self, fb: Failback) -> Self {
        self.0.failback = fb;
        self
    }
    /// The operator started `s` seconds ago; grace `grace` seconds.
    fn started(mut self, s: u64, grace: u64) -> Self {
        self.0.since_start = secs(s);
        self.0.startup_grace = secs(grace);
        self
    }
}

/// Service builder.
struct S(ServiceView);

fn svc(key: &str) -> S {
    S(ServiceView {
        key: key.to_string(),
        preferred_nodes: Vec::new(),
        failback: None,
        migration_threshold: 1,
        failure_timeout: None,
        failures: BTreeMap::new(),
        current_master: None,
        current_standby: None,
        current_phase: None,
        ever_active: false,
        errored: false,
        leave_failed_on: None,
    })
}

/// The usual service of a scenario.
fn web() -> S {
    svc("default/web")
}

impl S {
    /// Runs on `name` now (Active, has been active).
    fn on(mut self, name: &str) -> Self {
        self.0.current_master = Some(name.to_string());
        self.0.current_phase = Some(Phase::Active);
        self.0.ever_active = true;
        self
    }
    fn standby(mut self, name: &str) -> Self {
        self.0.current_standby = Some(name.to_string());
        self
    }
    fn phase(mut self, phase: Phase) -> Self {
        self.0.current_phase = Some(phase);
        self
    }
    fn prefer(mut self, names: &[&str]) -> Self {
        self.0.preferred_nodes = names.iter().map(|n| n.to_string()).collect();
        self
    }
    fn failback(mut self, fb: Failback) -> Self {
        self.0.failback = Some(fb);
        self
    }
    fn threshold(mut self, t: i32) -> Self {
        self.0.migration_threshold = t;
        self
    }
    fn timeout(mut self, s: u64) -> Self {
        self.0.failure_timeout = Some(secs(s));
        self
    }
    /// `count` failures on `name`, the last `ago` seconds ago.
    fn failed(mut self, name: &str, count: i32, ago: u64) -> Self {
        self.0.failures.insert(
            name.to_string(),
            Failures {
                count,
                last_failure_ago: secs(ago),
                unclean: false,
            },
        );
        self
    }
    fn ever_active(mut self) -> Self {
        self.0.ever_active = true;
        self
    }
    /// Stopped with no master, after having run.
    fn stopped(mut self) -> Self {
        self.0.ever_active = true;
        self.0.current_phase = Some(Phase::Pending);
        self
    }
    fn errored(mut self) -> Self {
        self.0.errored = true;
        self.0.ever_active = true;
        self.0.current_phase = Some(Phase::Errored);
        self
    }
    fn leave_failed(mut self, name: &str) -> Self {
        self.0.leave_failed_on = Some(name.to_string());
        self
    }
}

/// Expected decision (master, standby, phase, reason, requeue).
struct Want {
    master: Option<&'static str>,
    standby: Option<&'static str>,
    phase: Phase,
    reason: Reason,
    requeue: Option<Duration>,
}

fn want(
    master: Option<&'static str>,
    standby: Option<&'static str>,
    phase: Phase,
    reason: Reason,
) -> Want {
    Want {
        master,
        standby,
        phase,
        reason,
        requeue: None,
    }
}

impl Want {
    fn requeue(mut self, s: u64) -> Self {
        self.requeue = Some(secs(s));
        self
    }
}

/// Runs placement and compares every decision with what is wanted.
fn check(cluster: C, services: Vec<S>, wants: Vec<Want>) {
    let services: Vec<ServiceView> = services.into_iter().map(|s| s.0).collect();
    let got = place(&cluster.0, &services);
    assert_eq!(got.len(), wants.len(), "one decision per service: {got:#?}");
    for ((d, w), s) in got.iter().zip(&wants).zip(&services) {
        assert_eq!(d.key, s.key, "decisions come in input order");
        let got_t = (
            d.master.as_deref(),
            d.standby.as_deref(),
            d.phase,
            d.reason,
            d.requeue_after,
        );
        let want_t = (w.master, w.standby, w.phase, w.reason, w.requeue);
        assert_eq!(
            got_t, want_t,
            "service {} (master, standby, phase, reason, requeue)\ncluster: {:#?}\nservice: {s:#?}",
            s.key, cluster.0
        );
    }
}

/// Shorthand for the common one-service scenario.
fn check1(cluster: C, service: S, w: Want) {
    check(cluster, vec![service], vec![w]);
}

use Phase::{Active, Errored, Pending, Starting, Suspended};

// ------------------------------------------------------- placement order

#[test]
fn alphabetical_picks_first_name_not_member_order() {
    check1(
        nodes(&["c", "a", "b"]),
        web(),
        want(Some("a"), Some("b"), Starting, Reason::Initial),
    );
}

#[test]
fn ordered_picks_first_member_not_first_name() {
    check1(
        nodes(&["c", "a", "b"]).ordered(),
        web(),
        want(Some("c"), Some("a"), Starting, Reason::Initial),
    );
}

#[test]
fn alphabetical_skips_lost_first_node() {
    check1(
        nodes(&["a", "b", "c"]).hb("a", HeartbeatState::Lost),
        web(),
        want(Some("b"), Some("c"), Starting, Reason::Initial),
    );
}

#[test]
fn preferred_node_beats_cluster_order() {
    check1(
        nodes(&["a", "b", "c"]),
        web().prefer(&["c"]),
        want(Some("c"), Some("a"), Starting, Reason::Initial),
    );
}

#[test]
fn preferred_nodes_in_their_order_then_cluster_order() {
    check1(
        nodes(&["a", "b", "c", "d"]).hb("c", HeartbeatState::Lost),
        web().prefer(&["c", "d"]),
        want(Some("d"), Some("a"), Starting, Reason::Initial),
    );
}

#[test]
fn preferred_node_not_a_member_is_ignored() {
    check1(
        nodes(&["a", "b"]),
        web().prefer(&["zz", "b"]),
        want(Some("b"), Some("a"), Starting, Reason::Initial),
    );
}

#[test]
fn preferred_node_cordoned_falls_back_to_cluster_order() {
    check1(
        nodes(&["a", "b", "c"]).cordon("c"),
        web().prefer(&["c"]),
        want(Some("a"), Some("b"), Starting, Reason::Initial),
    );
}

#[test]
fn preferred_nodes_with_ordered_cluster() {
    check1(
        nodes(&["p", "q", "r"]).ordered(),
        web().prefer(&["r"]),
        want(Some("r"), Some("p"), Starting, Reason::Initial),
    );
}

#[test]
fn active_service_with_master_in_place_is_unchanged() {
    check1(
        nodes(&["a", "b"]),
        web().on("a").standby("b"),
        want(Some("a"), Some("b"), Active, Reason::Unchanged),
    );
}

#[test]
fn kept_master_still_starting_stays_starting() {
    check1(
        nodes(&["a", "b"]),
        web().on("a").phase(Phase::Starting),
        want(Some("a"), Some("b"), Starting, Reason::Unchanged),
    );
}

// --------------------------------------------------------------- failback

#[test]
fn failback_never_keeps_service_on_backup() {
    check1(
        nodes(&["a", "b"]),
        web().on("b"),
        want(Some("b"), Some("a"), Active, Reason::Unchanged),
    );
}

#[test]
fn failback_automatic_before_delay_keeps_and_requeues() {
    check1(
        nodes(&["a", "b"]).failback(automatic(60)).up_for("a", 20),
        web().on("b"),
        want(Some("b"), Some("a"), Active, Reason::Unchanged).requeue(40),
    );
}

#[test]
fn failback_automatic_after_delay_moves_back() {
    check1(
        nodes(&["a", "b"]).failback(automatic(60)).up_for("a", 60),
        web().on("b"),
        want(Some("a"), Some("b"), Starting, Reason::Failback),
    );
}

#[test]
fn failback_automatic_zero_delay_moves_at_once() {
    check1(
        nodes(&["a", "b"]).failback(automatic(0)).up_for("a", 0),
        web().on("b"),
        want(Some("a"), Some("b"), Starting, Reason::Failback),
    );
}

#[test]
fn failback_service_never_overrides_cluster_automatic() {
    check1(
        nodes(&["a", "b"]).failback(automatic(0)),
        web().on("b").failback(never()),
        want(Some("b"), Some("a"), Active, Reason::Unchanged),
    );
}

#[test]
fn failback_service_automatic_overrides_cluster_never() {
    check1(
        nodes(&["a", "b"]).up_for("a", 5),
        web().on("b").failback(automatic(10)),
        want(Some("b"), Some("a"), Active, Reason::Unchanged).requeue(5),
    );
}

#[test]
fn failback_waits_for_best_node_not_an_intermediate_one() {
    // a is the best node but returned 10 s ago; b has been up for an hour.
    // The service stays on c until a has been eligible for the delay, then
    // moves once, straight to a.
    check1(
        nodes(&["a", "b", "c"])
            .failback(automatic(30))
            .up_for("a", 10),
        web().on("c"),
        want(Some("c"), Some("a"), Active, Reason::Unchanged).requeue(20),
    );
}

#[test]
fn failback_to_preferred_node() {
    check1(
        nodes(&["a", "b"]).failback(automatic(30)),
        web().on("a").prefer(&["b"]),
        want(Some("b"), Some("a"), Starting, Reason::Failback),
    );
}

#[test]
fn failback_not_needed_when_master_is_best() {
    check1(
        nodes(&["a", "b"]).failback(automatic(30)).up_for("b", 1),
        web().on("a"),
        want(Some("a"), Some("b"), Active, Reason::Unchanged),
    );
}

#[test]
fn failback_ignores_better_node_that_is_not_eligible() {
    check1(
        nodes(&["a", "b"]).failback(automatic(0)).cordon("a"),
        web().on("b"),
        want(Some("b"), None, Active, Reason::Unchanged),
    );
}

// ----------------------------------------------------------- startup grace

#[test]
fn startup_grace_waits_for_slow_primary() {
    check1(
        nodes(&["p", "b"])
            .ordered()
            .hb("p", HeartbeatState::Lost)
            .started(10, 30),
        web(),
        want(None, None, Pending, Reason::StartupGrace).requeue(20),
    );
}

#[test]
fn startup_grace_over_places_on_backup() {
    check1(
        nodes(&["p", "b"])
            .ordered()
            .hb("p", HeartbeatState::Lost)
            .started(30, 30),
        web(),
        want(Some("b"), None, Starting, Reason::Initial),
    );
}

#[test]
fn startup_primary_heartbeats_in_time_and_gets_service() {
    check1(
        nodes(&["p", "b"]).ordered().started(10, 30),
        web(),
        want(Some("p"), Some("b"), Starting, Reason::Initial),
    );
}

#[test]
fn startup_grace_waits_for_preferred_node() {
    check1(
        nodes(&["a", "b"])
            .hb("b", HeartbeatState::Lost)
            .started(5, 30),
        web().prefer(&["b"]),
        want(None, None, Pending, Reason::StartupGrace).requeue(25),
    );
}

#[test]
fn startup_grace_does_not_hold_a_service_that_was_active() {
    check1(
        nodes(&["p", "b"])
            .ordered()
            .hb("p", HeartbeatState::Lost)
            .started(10, 30),
        web().stopped(),
        want(Some("b"), None, Starting, Reason::Initial),
    );
}

#[test]
fn startup_grace_skips_locked_primary() {
    check1(
        nodes(&["p", "b"])
            .ordered()
            .mode("p", Mode::Locked)
            .started(1, 30),
        web(),
        want(Some("b"), None, Starting, Reason::Initial),
    );
}

#[test]
fn startup_grace_with_no_node_up_yet() {
    check1(
        nodes(&["a", "b"])
            .hb("a", HeartbeatState::Lost)
            .hb("b", HeartbeatState::Lost)
            .started(0, 30),
        web(),
        want(None, None, Pending, Reason::StartupGrace).requeue(30),
    );
}

// ------------------------------------------------------------------ modes

#[test]
fn mode_default_default_master_and_standby() {
    check1(
        nodes(&["a", "b"]),
        web(),
        want(Some("a"), Some("b"), Starting, Reason::Initial),
    );
}

#[test]
fn mode_default_locked_never_uses_locked_node() {
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Locked),
        web(),
        want(Some("b"), None, Starting, Reason::Initial),
    );
}

#[test]
fn mode_locked_master_fails_over() {
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Locked),
        web().on("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn mode_default_peerdown_runs_on_default() {
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Peerdown),
        web(),
        want(Some("b"), None, Starting, Reason::Initial),
    );
}

#[test]
fn mode_single_locked_runs_on_single_without_standby() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Locked)
            .mode("b", Mode::Single),
        web(),
        want(Some("b"), None, Starting, Reason::Initial),
    );
}

#[test]
fn mode_single_peerdown_keeps_service_on_single() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Single)
            .mode("b", Mode::Peerdown)
            .hb("b", HeartbeatState::Fenced),
        web().on("a"),
        want(Some("a"), None, Active, Reason::Unchanged),
    );
}

#[test]
fn mode_config_peerdown_runs_on_config_node() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Peerdown)
            .hb("a", HeartbeatState::Lost)
            .mode("b", Mode::Config),
        web().on("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn mode_config_locked_runs_on_config_node() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Config)
            .mode("b", Mode::Locked),
        web(),
        want(Some("a"), None, Starting, Reason::Initial),
    );
}

#[test]
fn mode_all_locked_suspends() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Locked)
            .mode("b", Mode::Locked),
        web().on("a"),
        want(None, None, Suspended, Reason::Locked),
    );
}

#[test]
fn mode_locked_and_peerdown_suspends() {
    check1(
        nodes(&["a", "b", "c"])
            .mode("a", Mode::Locked)
            .mode("b", Mode::Peerdown)
            .mode("c", Mode::Locked),
        web(),
        want(None, None, Suspended, Reason::Locked),
    );
}

#[test]
fn prohibited_single_default_freezes_running_assignment() {
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Single),
        web().on("b").standby("a"),
        want(Some("b"), Some("a"), Active, Reason::ProhibitedModes),
    );
}

#[test]
fn prohibited_single_default_does_not_fail_over_either() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Single)
            .hb("b", HeartbeatState::Lost),
        web().on("b").standby("a"),
        want(Some("b"), Some("a"), Active, Reason::ProhibitedModes),
    );
}

#[test]
fn prohibited_config_config_leaves_unplaced_service_pending() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Config)
            .mode("b", Mode::Config),
        web(),
        want(None, None, Pending, Reason::ProhibitedModes),
    );
}

#[test]
fn prohibited_all_peerdown_freezes() {
    check1(
        nodes(&["a", "b"])
            .mode("a", Mode::Peerdown)
            .mode("b", Mode::Peerdown),
        web().stopped(),
        want(None, None, Pending, Reason::ProhibitedModes),
    );
}

// ------------------------------------------------------ fencing, peerdown

#[test]
fn peerdown_master_fails_over_at_once() {
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Peerdown),
        web().on("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn leave_failed_waits_for_fence() {
    check1(
        nodes(&["a", "b"]).cordon("a"),
        web().on("a").leave_failed("a"),
        want(None, None, Phase::Stopping, Reason::WaitingForFence),
    );
}

#[test]
fn leave_failed_proceeds_once_lost() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Lost),
        web().on("a").leave_failed("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn leave_failed_proceeds_once_fenced() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Fenced),
        web().on("a").leave_failed("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn leave_failed_proceeds_when_admin_sets_peerdown() {
    // peerdown counts as fenced even though the heartbeat still looks Alive.
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Peerdown),
        web().on("a").leave_failed("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn leave_failed_with_stopping_heartbeat_still_waits() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Stopping),
        web().on("a").leave_failed("a").failed("a", 1, 0),
        want(None, None, Phase::Stopping, Reason::WaitingForFence),
    );
}

#[test]
fn leave_failed_keeps_waiting_after_master_was_cleared() {
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Locked),
        web().stopped().phase(Phase::Stopping).leave_failed("a"),
        want(None, None, Phase::Stopping, Reason::WaitingForFence),
    );
}

#[test]
fn leave_failed_fenced_without_master_counts_as_failover() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Lost),
        web().stopped().phase(Phase::Stopping).leave_failed("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn leave_failed_on_eligible_master_keeps_it_and_skips_failback() {
    check1(
        nodes(&["a", "b"]).failback(automatic(0)),
        web().on("b").leave_failed("b"),
        want(Some("b"), Some("a"), Active, Reason::Unchanged),
    );
}

#[test]
fn leave_failed_on_old_master_withholds_new_master() {
    // The operator had moved the service to a; b failed to give it away.
    check1(
        nodes(&["a", "b"]),
        web().on("a").phase(Phase::Starting).leave_failed("b"),
        want(None, None, Phase::Stopping, Reason::WaitingForFence),
    );
}

#[test]
fn leave_failed_on_removed_member_waits() {
    check1(
        nodes(&["a", "b"]),
        web().on("gone").leave_failed("gone"),
        want(None, None, Phase::Stopping, Reason::WaitingForFence),
    );
}

// ------------------------------------------------------------- failures

#[test]
fn fail_count_below_threshold_keeps_master() {
    check1(
        nodes(&["a", "b"]),
        web().on("a").threshold(3).failed("a", 2, 5),
        want(Some("a"), Some("b"), Active, Reason::Unchanged),
    );
}

#[test]
fn fail_count_at_threshold_moves_service() {
    check1(
        nodes(&["a", "b"]),
        web().on("a").threshold(3).failed("a", 3, 5),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn failure_timeout_not_expired_requeues_for_expiry() {
    check1(
        nodes(&["a", "b"]),
        web().on("b").timeout(60).failed("a", 1, 20),
        want(Some("b"), None, Active, Reason::Unchanged).requeue(40),
    );
}

#[test]
fn failure_timeout_expired_node_is_eligible_again() {
    check1(
        nodes(&["a", "b"]),
        web().on("b").timeout(60).failed("a", 1, 60),
        want(Some("b"), Some("a"), Active, Reason::Unchanged),
    );
}

#[test]
fn failure_without_timeout_never_expires() {
    check1(
        nodes(&["a", "b"]),
        web().on("b").failed("a", 1, 86_400 * 365),
        want(Some("b"), None, Active, Reason::Unchanged),
    );
}

#[test]
fn failed_node_is_skipped_for_initial_placement() {
    check1(
        nodes(&["a", "b", "c"]),
        web().ever_active().failed("a", 1, 0),
        want(Some("b"), Some("c"), Starting, Reason::Initial),
    );
}

#[test]
fn failed_everywhere_is_errored() {
    check1(
        nodes(&["a", "b"]),
        web().on("b").failed("a", 1, 100).failed("b", 1, 0),
        want(None, None, Errored, Reason::AllFailed),
    );
}

#[test]
fn failed_everywhere_with_timeouts_requeues_for_first_expiry() {
    check1(
        nodes(&["a", "b"]),
        web()
            .on("b")
            .timeout(300)
            .failed("a", 1, 100)
            .failed("b", 1, 0),
        want(None, None, Errored, Reason::AllFailed).requeue(200),
    );
}

#[test]
fn failed_on_capable_nodes_and_locked_elsewhere_is_errored() {
    check1(
        nodes(&["a", "b"]).mode("b", Mode::Locked),
        web().on("a").failed("a", 1, 0),
        want(None, None, Errored, Reason::AllFailed),
    );
}

#[test]
fn failed_on_one_node_and_other_lost_is_pending() {
    check1(
        nodes(&["a", "b"]).hb("b", HeartbeatState::Lost),
        web().on("a").failed("a", 1, 0),
        want(None, None, Pending, Reason::NoEligibleNode),
    );
}

#[test]
fn errored_latched_stays_stopped_on_healthy_cluster() {
    check1(
        nodes(&["a", "b"]),
        web().errored(),
        want(None, None, Errored, Reason::ErrorLatched),
    );
}

#[test]
fn errored_latched_wins_over_prohibited_modes() {
    check1(
        nodes(&["a", "b"]).mode("a", Mode::Single),
        web().errored(),
        want(None, None, Errored, Reason::ErrorLatched),
    );
}

#[test]
fn failed_node_is_not_standby() {
    check1(
        nodes(&["a", "b", "c"]),
        web().on("a").failed("b", 1, 0),
        want(Some("a"), Some("c"), Active, Reason::Unchanged),
    );
}

#[test]
fn failure_requeue_is_the_minimum_over_nodes() {
    check1(
        nodes(&["a", "b", "c", "d"]),
        web()
            .on("d")
            .timeout(100)
            .failed("a", 1, 10)
            .failed("b", 1, 70)
            .failed("c", 1, 40),
        want(Some("d"), None, Active, Reason::Unchanged).requeue(30),
    );
}

#[test]
fn failure_on_lost_node_does_not_requeue() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Lost),
        web().on("b").timeout(100).failed("a", 1, 10),
        want(Some("b"), None, Active, Reason::Unchanged),
    );
}

#[test]
fn migration_threshold_below_one_counts_as_one() {
    check1(
        nodes(&["a", "b"]),
        web().threshold(0).failed("a", 0, 0).failed("b", 1, 0),
        want(Some("a"), None, Starting, Reason::Initial),
    );
}

#[test]
fn failback_and_failure_expiry_requeue_takes_the_sooner() {
    check1(
        nodes(&["a", "b", "c"])
            .failback(automatic(60))
            .up_for("a", 30),
        web().on("c").timeout(100).failed("b", 1, 90),
        want(Some("c"), Some("a"), Active, Reason::Unchanged).requeue(10),
    );
}

// ---------------------------------------------------- heartbeats, cordon

#[test]
fn cordoned_master_fails_over() {
    check1(
        nodes(&["a", "b"]).cordon("a"),
        web().on("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn cordoned_node_is_not_standby() {
    check1(
        nodes(&["a", "b"]).cordon("b"),
        web().on("a"),
        want(Some("a"), None, Active, Reason::Unchanged),
    );
}

#[test]
fn lost_master_fails_over() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Lost),
        web().on("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn stopping_master_fails_over() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Stopping),
        web().on("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn fenced_master_fails_over() {
    check1(
        nodes(&["a", "b"]).hb("a", HeartbeatState::Fenced),
        web().on("a"),
        want(Some("b"), None, Starting, Reason::Failover),
    );
}

#[test]
fn all_lost_is_pending_with_no_eligible_node() {
    check1(
        nodes(&["a", "b"])
            .hb("a", HeartbeatState::Lost)
            .hb("b", HeartbeatState::Fenced),
        web().on("a"),
        want(None, None, Pending, Reason::NoEligibleNode),
    );
}

#[test]
fn all_cordoned_is_pending_with_no_eligible_node() {
    check1(
        nodes(&["a", "b"]).cordon("a").cordon("b"),
        web().stopped(),
        want(None, None, Pending, Reason::NoEligibleNode),
    );
}

#[test]
fn master_removed_from_members_fails_over() {
    check1(
        nodes(&["a", "b"]),
        web().on("gone"),
        want(Some("a"), Some("b"), Starting, Reason::Failover),
    );
}

#[test]
fn no_members_suspends() {
    check1(
        nodes(&[]),
        web(),
        want(None, None, Suspended, Reason::Locked),
    );
}

// ------------------------------------------- bigger clusters, many services

#[test]
fn three_nodes_ordered_primary_lost_backup_and_third() {
    check1(
        nodes(&["n3", "n1", "n2"])
            .ordered()
            .hb("n3", HeartbeatState::Lost),
        web().on("n3"),
        want(Some("n1"), Some("n2"), Starting, Reason::Failover),
    );
}

#[test]
fn three_nodes_failback_never_keeps_third_when_both_return() {
    check1(
        nodes(&["n1", "n2", "n3"]).ordered(),
        web().on("n3"),
        want(Some("n3"), Some("n1"), Active, Reason::Unchanged),
    );
}

#[test]
fn five_nodes_skip_lost_locked_cordoned_and_failed() {
    check1(
        nodes(&["e", "d", "c", "b", "a"])
            .hb("a", HeartbeatState::Lost)
            .mode("b", Mode::Locked)
            .cordon("c"),
        web().failed("d", 1, 0).ever_active(),
        want(Some("e"), None, Starting, Reason::Initial),
    );
}

#[test]
fn five_nodes_ordered_first_eligible_and_next_as_standby() {
    check1(
        nodes(&["n5", "n4", "n3", "n2", "n1"])
            .ordered()
            .hb("n5", HeartbeatState::Lost)
            .mode("n4", Mode::Locked),
        web().on("n5"),
        want(Some("n3"), Some("n2"), Starting, Reason::Failover),
    );
}

#[test]
fn five_nodes_failback_before_delay() {
    check1(
        nodes(&["a", "b", "c", "d", "e"])
            .failback(automatic(120))
            .up_for("a", 100),
        web().on("d"),
        want(Some("d"), Some("a"), Active, Reason::Unchanged).requeue(20),
    );
}

#[test]
fn several_services_are_placed_independently() {
    check(
        nodes(&["a", "b", "c"]).hb("a", HeartbeatState::Lost),
        vec![
            svc("ns1/nfs").on("a"),
            svc("ns1/proxy").prefer(&["c"]),
            svc("ns2/licence").on("b").failed("c", 1, 0),
            svc("ns2/db").errored(),
            svc("ns3/legacy").on("a").leave_failed("a"),
        ],
        vec![
            want(Some("b"), Some("c"), Starting, Reason::Failover),
            want(Some("c"), Some("b"), Starting, Reason::Initial),
            want(Some("b"), None, Active, Reason::Unchanged),
            want(None, None, Errored, Reason::ErrorLatched),
            want(Some("b"), Some("c"), Starting, Reason::Failover),
        ],
    );
}

#[test]
fn several_services_under_prohibited_modes_all_freeze() {
    check(
        nodes(&["a", "b"]).mode("b", Mode::Config),
        vec![svc("x/one").on("a"), svc("x/two")],
        vec![
            want(Some("a"), None, Active, Reason::ProhibitedModes),
            want(None, None, Pending, Reason::ProhibitedModes),
        ],
    );
}

#[test]
fn no_services_no_decisions() {
    check(nodes(&["a"]), vec![], vec![]);
}

// ------------------------------------------------------------- eligible()

#[test]
fn eligible_checks_each_condition() {
    let c = nodes(&["a", "b", "c", "d", "e", "f"])
        .mode("b", Mode::Locked)
        .hb("c", HeartbeatState::Stopping)
        .cordon("d")
        .mode("f", Mode::Single)
        .0;
    let s = web().threshold(2).failed("e", 2, 0).failed("a", 1, 0).0;
    let verdict: Vec<(&str, bool)> = c
        .members
        .iter()
        .map(|n| (n.name.as_str(), eligible(&c, &s, n)))
        .collect();
    assert_eq!(
        verdict,
        [
            ("a", true),
            ("b", false),
            ("c", false),
            ("d", false),
            ("e", false),
            ("f", true)
        ]
    );
    let stranger = NodeView {
        name: "x".into(),
        ..c.members[0].clone()
    };
    assert!(!eligible(&c, &s, &stranger), "non-members are not eligible");
}

// --------------------------------------------------- exhaustive invariants

/// Every combination of mode and heartbeat on three nodes, with several
/// service states: placement never panics and keeps its safety rules.
#[test]
fn invariants_hold_for_every_mode_and_heartbeat_combination() {
    let modes = [
        Mode::Default,
        Mode::Single,
        Mode::Config,
        Mode::Locked,
        Mode::Peerdown,
    ];
    let hbs = [
        HeartbeatState::Alive,
        HeartbeatState::Stopping,
        HeartbeatState::Lost,
        HeartbeatState::Fenced,
    ];
    let names = ["a", "b", "c"];
    // 20 (mode, heartbeat) states per node, 8000 clusters.
    let per_node = modes.len() * hbs.len();
    let mut checked = 0usize;
    for i in 0..per_node.pow(3) {
        let pick = [
            i % per_node,
            (i / per_node) % per_node,
            i / (per_node * per_node),
        ];
        let mut c = nodes(&names).failback(automatic(10)).started(5, 30);
        for (n, p) in names.iter().zip(pick) {
            c = c
                .mode(n, modes[p / hbs.len()])
                .hb(n, hbs[p % hbs.len()])
                .up_for(n, 20);
        }
        let services = vec![
            web().0,
            web().on("b").0,
            web().on("c").leave_failed("c").0,
            web().on("a").failed("b", 1, 0).prefer(&["b"]).0,
            web().stopped().leave_failed("a").0,
        ];
        let decisions: Vec<Decision> = place(&c.0, &services);
        assert_eq!(decisions.len(), services.len());
        let modes_ok =
            kubeha_crds::mode::check_modes(c.0.members.iter().map(|n| (n.name.as_str(), n.mode)))
                .is_ok();
        for (d, s) in decisions.iter().zip(&services) {
            checked += 1;
            let ctx = || format!("{d:?} for {s:?} on {:?}", c.0.members);
            if d.reason == Reason::ProhibitedModes {
                assert!(!modes_ok, "{}", ctx());
                assert_eq!(d.master, s.current_master, "{}", ctx());
                continue;
            }
            if d.master.is_some() {
                assert_ne!(d.master, d.standby, "{}", ctx());
            } else {
                assert_eq!(d.standby, None, "{}", ctx());
            }
            for n in [&d.master, &d.standby].into_iter().flatten() {
                let node = c.0.members.iter().find(|m| &m.name == n);
                assert!(
                    node.is_some_and(|m| eligible(&c.0, s, m)),
                    "assigned node {n} not eligible: {}",
                    ctx()
                );
            }
            // A node whose leave failed and which is not fenced keeps every
            // other node from becoming master.
            if let Some(lf) = &s.leave_failed_on {
                let node = c.0.members.iter().find(|m| &m.name == lf);
                let fenced = node.is_some_and(|m| {
                    m.mode == Mode::Peerdown
                        || matches!(m.heartbeat, HeartbeatState::Lost | HeartbeatState::Fenced)
                });
                if !fenced {
                    assert!(
                        d.master.is_none() || d.master.as_ref() == Some(lf),
                        "{}",
                        ctx()
                    );
                }
            }
            // New masters start; kept ones keep their phase.
            match d.reason {
                Reason::Initial | Reason::Failover | Reason::Failback => {
                    assert_eq!(d.phase, Starting, "{}", ctx());
                    assert!(d.master.is_some(), "{}", ctx());
                }
                Reason::Unchanged => assert_eq!(d.master, s.current_master, "{}", ctx()),
                _ => assert!(d.master.is_none(), "{}", ctx()),
            }
        }
    }
    assert_eq!(checked, per_node.pow(3) * 5);
}

#[test]
fn cluster_stopped_places_nothing_even_on_an_eligible_master() {
    let mut c = nodes(&["a", "b"]);
    c.0.stopped = true;
    check1(
        c,
        web().on("a").standby("b"),
        want(None, None, Suspended, Reason::ClusterStopped),
    );
    let mut c = nodes(&["a", "b"])
        .mode("a", Mode::Single)
        .mode("b", Mode::Default);
    c.0.stopped = true;
    check1(
        c,
        web().on("a"),
        want(None, None, Suspended, Reason::ClusterStopped),
    );
}
