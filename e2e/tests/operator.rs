//! The operator with the real agent on three lab nodes (real kernel, real API
//! server): failover on power-off, planned moves, modes, hook failures and
//! operator HA. Tests share the lab's agents and operator replicas and run one
//! at a time; each uses its own cluster and service names.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kubeha_e2e::ha::{self, Timing};
use kubeha_e2e::lab::{Lab, StopSignal};

static SERIAL: Mutex<()> = Mutex::new(());

/// The lab with three nodes, an agent on each and operator replica 0.
fn lab() -> Lab {
    let lab = Lab::of_this_checkout();
    lab.ensure_up_with_nodes(3)
        .expect("the lab with three nodes must come up");
    for i in 1..=3 {
        // A node an earlier test powered off comes back.
        lab.power_on(i).unwrap();
        if !lab.agent_running(i) {
            lab.start_agent(i, &[] as &[&str]).expect("agent starts");
        }
    }
    if !lab.operator_running(0) {
        lab.start_operator(0, &[])
            .expect("operator replica 0 starts");
    }
    lab
}

/// A cluster of nodes 1..=3 and a service with one IPv4 VIP, both named
/// `name`, after removing what an earlier run left.
fn fresh(lab: &Lab, name: &str, vip: &str, hooks: Option<&str>, timing: Timing) {
    fresh_on(lab, name, vip, &[1, 2, 3], hooks, timing);
}

/// [`fresh`] with the cluster's members given.
fn fresh_on(lab: &Lab, name: &str, vip: &str, members: &[u8], hooks: Option<&str>, timing: Timing) {
    ha::delete_service(lab, name);
    assert!(
        ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty()).is_some(),
        "{vip} still held from an earlier run"
    );
    ha::apply(lab, &ha::cluster(name, members, timing)).unwrap();
    // Every member heartbeats before the service exists, so placement is
    // the ordered one (the first member active, the second standby).
    let count = members.len() as u8;
    assert!(
        ha::wait_until(Duration::from_secs(20), || ha::members_ready(
            lab, name, count
        ))
        .is_some(),
        "cluster {name} never had {count}/{count} members ready"
    );
    ha::apply(
        lab,
        &ha::service(name, name, &[&format!("{vip}/24")], hooks, (3, 100)),
    )
    .unwrap();
}

/// Deletes the service (the operator gives it away first: finalizer) and
/// its cluster; the VIP must be gone everywhere.
fn cleanup(lab: &Lab, name: &str, vip: &str) {
    ha::delete(lab, "haservice", name, Some(ha::SERVICE_NAMESPACE));
    let gone = ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty());
    let removed = ha::wait_until(Duration::from_secs(20), || {
        lab.kubectl_output(&["get", "haservice", name, "-n", ha::SERVICE_NAMESPACE])
            .is_ok_and(|o| !o.status.success())
    });
    ha::delete_service(lab, name);
    ha::delete(lab, "hacluster", name, None);
    assert!(
        gone.is_some(),
        "{vip} still held after the service was deleted"
    );
    assert!(removed.is_some(), "the finalizer never let {name} go");
}

/// Whether every member of cluster `name` heartbeats (`ready` 3/3) within
/// `timeout`.
fn all_ready(lab: &Lab, name: &str, timeout: Duration) -> bool {
    ha::wait_until(timeout, || ha::members_ready(lab, name, 3)).is_some()
}

/// Waits until the status calls node `node` active, the phase is Active and
/// exactly that node holds the VIP: after a change was asked for, the
/// status may still show the node before it for a moment.
fn wait_active_on(lab: &Lab, name: &str, vip: &str, node: u8, timeout: Duration) {
    let ok = ha::wait_until(timeout, || ha::active_node(lab, name, vip) == Some(node));
    assert!(
        ok.is_some(),
        "{name} never became Active on node-{node} alone within {timeout:?}: status {}, holders {:?}",
        ha::service_status(lab, name),
        ha::vip_holders(vip)
    );
}

/// The node the status calls active once the phase is Active and exactly
/// that node holds the VIP.
fn wait_active(lab: &Lab, name: &str, vip: &str, timeout: Duration) -> u8 {
    let mut seen = None;
    let ok = ha::wait_until(timeout, || {
        seen = ha::active_node(lab, name, vip);
        seen.is_some()
    });
    assert!(
        ok.is_some(),
        "{name} never became Active with its VIP on the active node: status {}, holders {:?}",
        ha::service_status(lab, name),
        ha::vip_holders(vip)
    );
    seen.unwrap()
}

/// Installs, on nodes 1..=3, an enter and a leave hook for service `name`
/// that append to `trace-NAME` in the lab folder, the leave failing on the
/// nodes in `leave_fails`; returns the trace file (emptied).
fn tracing_hooks(lab: &Lab, name: &str, leave_fails: &[u8]) -> std::path::PathBuf {
    let trace = lab.dir().join(format!("trace-{name}"));
    let _ = std::fs::remove_file(&trace);
    for i in 1..=3 {
        let code = i32::from(leave_fails.contains(&i));
        ha::install_hooks(
            lab,
            i,
            name,
            &[
                ("E01server", &ha::tracing_script(&trace, 0)),
                ("L01server", &ha::tracing_script(&trace, code)),
            ],
        )
        .unwrap();
    }
    trace
}

fn set_modes(lab: &Lab, name: &str, modes: &[(u8, &str)], timing: Timing) {
    ha::apply(lab, &ha::cluster_with_modes(name, modes, timing)).unwrap();
}

#[test]
fn power_off_moves_the_vip_to_the_next_node_and_status_events_metrics_record_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-poweroff", "198.18.0.110");
    fresh(&lab, name, vip, None, Timing::DEFAULT);
    assert_eq!(
        wait_active(&lab, name, vip, Duration::from_secs(30)),
        1,
        "ordered placement starts on the first member"
    );
    assert!(
        ha::wait_until(Duration::from_secs(5), || ha::client_reaches(vip, 1)).is_some(),
        "the client never reached {vip} on node-1"
    );
    let failovers = ha::operator_metric(0, "kubeha_operator_failovers_total");

    // Every node is counted throughout, node-1 while off too: its VIP stays
    // configured there until its kernel lifetime (D + skew) ends, and the
    // operator clears node-2 only once node-1 is fenced, after that.
    let sampler = ha::SplitBrain::start(vip, &[]);
    lab.power_off(1).unwrap();
    let off = Instant::now();
    let moved = ha::wait_until(Duration::from_secs(20), || {
        ha::vip_holders(vip).into_iter().filter(|i| *i != 1).eq([2])
    });
    let reached = ha::wait_until(Duration::from_secs(10), || ha::client_reaches(vip, 2));
    assert!(moved.is_some(), "the VIP never reached node-2");
    assert!(
        reached.is_some(),
        "the client never got answers from node-2's MAC"
    );
    eprintln!(
        "power-off to first reply from node-2: {:?} (D = {} ms)",
        off.elapsed(),
        Timing::DEFAULT.lease_ms
    );

    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(10)), 2);
    ha::wait_event_reasons(&lab, ha::SERVICE_NAMESPACE, name, |r| {
        ha::has_reason(r, "TakeOver")
    })
    .unwrap_or_else(|reasons| panic!("no TakeOver Event: {reasons:?}"));
    assert!(
        ha::wait_until(Duration::from_secs(5), || ha::operator_metric(
            0,
            "kubeha_operator_failovers_total"
        ) > failovers)
        .is_some(),
        "kubeha_operator_failovers_total did not grow"
    );

    // node-1 boots and its agent restarts, still sampled with every node
    // counted: a returning node holding the VIP shows as a second holder.
    // Failback Never: the service stays on node-2.
    lab.power_on(1).unwrap();
    lab.start_agent(1, &[] as &[&str]).unwrap();
    assert!(
        all_ready(&lab, name, Duration::from_secs(20)),
        "node-1 never heartbeat again after power-on"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(10)), 2);
    sampler.stop().assert_single_holder(
        vip,
        "power-off of node-1, failover to node-2 and node-1's return",
    );
    cleanup(&lab, name, vip);
}

#[test]
fn a_move_switches_the_service_over_with_never_two_holders() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-move", "198.18.0.111");
    fresh(&lab, name, vip, None, Timing::DEFAULT);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);

    let sampler = ha::SplitBrain::start(vip, &[]);
    let asked = Instant::now();
    let printed = lab
        .kubectl_ha_ok(&["move", name, "--to", "node-3", "-n", ha::SERVICE_NAMESPACE])
        .unwrap();
    assert!(
        printed.contains(name),
        "kubectl ha move prints the status:\n{printed}"
    );
    let moved = ha::wait_until(Duration::from_secs(20), || ha::client_reaches(vip, 3));
    let seen = sampler.stop();
    assert!(moved.is_some(), "the VIP never reached node-3");
    eprintln!("move to first reply from node-3: {:?}", asked.elapsed());
    seen.assert_single_holder(vip, "kubectl ha move node-1 -> node-3");
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(10)), 3);
    ha::wait_event_reasons(&lab, ha::SERVICE_NAMESPACE, name, |r| {
        ha::has_reason(r, "GiveAway") || ha::has_reason(r, "GiveBack")
    })
    .unwrap_or_else(|reasons| {
        panic!("no GiveAway/GiveBack Event for the planned move: {reasons:?}")
    });
    cleanup(&lab, name, vip);
}

#[test]
fn locked_stops_and_keeps_services_off_and_single_runs_them_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-modes", "198.18.0.112");
    let timing = Timing::DEFAULT;
    fresh(&lab, name, vip, None, timing);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);

    let sampler = ha::SplitBrain::start(vip, &[]);
    lab.kubectl_ha_ok(&["--wait", "0", "mode", "node-1", "locked", "--cluster", name])
        .unwrap();
    // Locking node-1 moves its service to the next member.
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(20));
    // Kept off: node-1 still heartbeats, the service does not come back.
    std::thread::sleep(Duration::from_millis(2 * timing.lease_ms as u64));
    assert!(
        !ha::vip_on_node(1, vip),
        "a locked node took the service back"
    );
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(1)), 2);

    // single on node-3 with the others locked: the service runs there.
    set_modes(
        &lab,
        name,
        &[(1, "locked"), (2, "locked"), (3, "single")],
        timing,
    );
    wait_active_on(&lab, name, vip, 3, Duration::from_secs(20));
    // The API server refuses single next to a default member.
    let refused = ha::apply(
        &lab,
        &ha::cluster_with_modes(
            name,
            &[(1, "default"), (2, "locked"), (3, "single")],
            timing,
        ),
    );
    assert!(
        refused.is_err(),
        "single beside a default member was accepted"
    );

    set_modes(
        &lab,
        name,
        &[(1, "default"), (2, "default"), (3, "default")],
        timing,
    );
    std::thread::sleep(Duration::from_secs(2));
    sampler
        .stop()
        .assert_single_holder(vip, "mode changes locked / single / default");
    assert_eq!(ha::vip_holders(vip).len(), 1);
    ha::wait_event_reasons(&lab, "", name, |r| ha::has_reason(r, "ModeChanged"))
        .unwrap_or_else(|reasons| panic!("no ModeChanged Event on the cluster: {reasons:?}"));
    cleanup(&lab, name, vip);
}

#[test]
fn peerdown_lets_the_survivor_take_over_at_once_and_a_returning_node_loses_the_mark() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-peerdown", "198.18.0.113");
    // A long lease, so "without waiting for the lease" shows.
    let timing = Timing {
        lease_ms: 15_000,
        renew_ms: 2_000,
        deadline_ms: 8_000,
        skew_ms: 500,
    };
    fresh(&lab, name, vip, None, timing);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);

    let sampler = ha::SplitBrain::start(vip, &[]);
    lab.power_off(1).unwrap();
    // Off, node-1 keeps its VIP configured (off the wire) for its whole
    // lifetime, longer than the takeover takes: not counted while off.
    sampler.set_off(&[1]);
    let off = Instant::now();
    lab.kubectl_ha_ok(&["--wait", "0", "peerdown", "node-1", "--cluster", name])
        .unwrap();
    let moved = ha::wait_until(Duration::from_secs(20), || ha::client_reaches(vip, 2));
    assert!(moved.is_some(), "the survivor never took over");
    let took = off.elapsed();
    eprintln!("power-off + peerdown to first reply from node-2: {took:?}");
    assert!(
        took < Duration::from_millis(timing.lease_ms as u64),
        "took {took:?}: the survivor waited for the lease (D = {} ms)",
        timing.lease_ms
    );

    // node-1 comes back and heartbeats: the mark is erased. Counted again
    // from power-on, which comes before its VIP's lifetime (D + skew) would
    // have ended: had it come back with the VIP, two nodes would hold it.
    lab.power_on(1).unwrap();
    sampler.set_off(&[]);
    lab.start_agent(1, &[] as &[&str]).unwrap();
    let erased = ha::wait_until(Duration::from_secs(20), || {
        lab.kubectl_ok(&[
            "get",
            "hacluster",
            name,
            "-o",
            "jsonpath={.spec.members.nodes[0].mode}",
        ])
        .is_ok_and(|m| m.trim() != "peerdown")
    });
    assert!(
        erased.is_some(),
        "the peerdown mark of a returning node stayed"
    );
    ha::wait_event_reasons(&lab, "", name, |r| ha::has_reason(r, "PeerReturned"))
        .unwrap_or_else(|reasons| panic!("no PeerReturned Event: {reasons:?}"));
    // The service ends up on exactly one node.
    wait_active(&lab, name, vip, Duration::from_secs(40));
    sampler.stop().assert_single_holder(
        vip,
        "power-off and peerdown of node-1, takeover by node-2 and node-1's return",
    );
    cleanup(&lab, name, vip);
}

#[test]
fn an_enter_failure_moves_on_and_a_failure_everywhere_is_errored_until_cleared() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-hookfail", "198.18.0.114");
    let trace = lab.dir().join("trace-op-hookfail");
    let install = |failing: &[u8]| {
        for i in 1..=3 {
            let code = if failing.contains(&i) { 1 } else { 0 };
            ha::install_hooks(
                &lab,
                i,
                name,
                &[("E01server", &ha::tracing_script(&trace, code))],
            )
            .unwrap();
        }
    };
    install(&[1]);
    fresh(&lab, name, vip, Some(name), Timing::DEFAULT);
    assert_eq!(
        wait_active(&lab, name, vip, Duration::from_secs(40)),
        2,
        "the enter hook fails on node-1: the service moves to node-2"
    );
    ha::wait_event_reasons(&lab, ha::SERVICE_NAMESPACE, name, |r| {
        ha::has_reason(r, "HookFailed")
    })
    .unwrap_or_else(|reasons| panic!("no HookFailed Event: {reasons:?}"));

    // Now the hooks fail everywhere: moved to node-3, it fails there, then
    // on node-2 (node-1 is still failed): no node is left.
    install(&[1, 2, 3]);
    ha::request_move(&lab, name, 3).unwrap();
    let errored = ha::wait_until(Duration::from_secs(40), || {
        ha::service_status(&lab, name)["phase"] == "Errored"
    });
    assert!(
        errored.is_some(),
        "never Errored: {}",
        ha::service_status(&lab, name)
    );
    assert!(
        ha::vip_holders(vip).is_empty(),
        "an Errored service holds its VIP"
    );
    // Stays Errored: nothing runs while nobody clears it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ha::service_status(&lab, name)["phase"], "Errored");
    assert!(ha::vip_holders(vip).is_empty());

    // Fixed and cleared: it runs again.
    install(&[]);
    lab.kubectl_ha_ok(&["--wait", "0", "clear", name, "-n", ha::SERVICE_NAMESPACE])
        .unwrap();
    wait_active(&lab, name, vip, Duration::from_secs(40));
    cleanup(&lab, name, vip);
}

#[test]
fn killing_the_operator_leader_hands_over_and_a_failover_meanwhile_completes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    if !lab.operator_running(1) {
        lab.start_operator(1, &[])
            .expect("operator replica 1 starts");
    }
    let (name, vip) = ("op-leader", "198.18.0.115");
    fresh(&lab, name, vip, None, Timing::DEFAULT);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    let leader = |r: u8| ha::operator_metric(r, "kubeha_operator_leader") == 1.0;
    let l = (0..=1).find(|r| leader(*r)).expect("one replica leads");
    let other = 1 - l;

    // The leader dies and, at the same moment, the active node loses power.
    lab.stop_operator(l, StopSignal::Kill).unwrap();
    lab.power_off(1).unwrap();
    let t0 = Instant::now();
    let moved = ha::wait_until(Duration::from_secs(40), || ha::client_reaches(vip, 2));
    assert!(
        moved.is_some(),
        "the failover never completed without the old leader"
    );
    eprintln!(
        "leader killed + power-off to first reply from node-2: {:?}",
        t0.elapsed()
    );
    assert!(leader(other), "replica {other} did not take the lead");
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(10)), 2);

    lab.power_on(1).unwrap();
    lab.start_agent(1, &[] as &[&str]).unwrap();
    // Back to replica 0 alone for the other tests.
    lab.stop_operator(1, StopSignal::Term).unwrap();
    if !lab.operator_running(0) {
        lab.start_operator(0, &[]).unwrap();
    }
    cleanup(&lab, name, vip);
}

#[test]
fn members_picked_by_a_node_selector_heartbeat_and_run_the_service() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-selector", "198.18.0.116");
    ha::delete_service(&lab, name);
    // No listed member: the lab's Nodes carry kubeha.io/lab=true.
    let mut cluster = ha::cluster(name, &[], Timing::DEFAULT);
    cluster["spec"]["members"] =
        serde_json::json!({"selector": {"matchLabels": {"kubeha.io/lab": "true"}}});
    cluster["spec"]["placement"] = serde_json::json!("Alphabetical");
    ha::apply(&lab, &cluster).unwrap();
    assert!(
        all_ready(&lab, name, Duration::from_secs(20)),
        "selected members never all heartbeat: {}",
        lab.kubectl_ok(&["get", "hacluster", name, "-o", "yaml"])
            .unwrap_or_default()
    );
    ha::apply(
        &lab,
        &ha::service(name, name, &[&format!("{vip}/24")], None, (3, 100)),
    )
    .unwrap();
    assert_eq!(
        wait_active(&lab, name, vip, Duration::from_secs(30)),
        1,
        "alphabetical placement among the selected nodes"
    );
    cleanup(&lab, name, vip);
}

/// Faults in sequence: node-1, active, is cut off from the API server past
/// RD and fences itself; the service moves to node-2. The cut heals. Then
/// node-2's agent stalls (SIGSTOP) for 2 x D. node-1 is the only other
/// member, so the service must come back there, with no admin action.
/// Before the fence left a record that re-ran its leave once in contact,
/// node-1 stayed `Failed` from its fence and refused every later epoch: the
/// service was down until `kubectl ha clear`.
#[test]
fn a_node_that_fenced_itself_runs_the_service_again_when_the_next_fault_comes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-fence-stall", "198.18.0.117");
    let timing = Timing::DEFAULT;
    fresh_on(&lab, name, vip, &[1, 2], None, timing);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    let sampler = ha::SplitBrain::start(vip, &[]);

    // 1. node-1 loses the API server (L2 stays up): it fences, node-2 takes over.
    lab.partition(1).unwrap();
    let moved = ha::wait_until(Duration::from_secs(30), || {
        ha::active_node(&lab, name, vip) == Some(2)
    });
    let fenced_entry = ha::node_entry(&lab, name, 1);
    lab.heal(1).unwrap();
    assert!(
        moved.is_some(),
        "the service never moved off the cut-off node-1: {}",
        ha::service_status(&lab, name)
    );
    // Back in contact, node-1 is no longer Failed: the fence was not a
    // failure of the service.
    let recovered = ha::wait_until(Duration::from_secs(20), || {
        ha::members_ready(&lab, name, 2) && ha::node_entry(&lab, name, 1)["state"] != "Failed"
    });
    assert!(
        recovered.is_some(),
        "node-1 stayed {} after the cut healed (at the fence: {fenced_entry})",
        ha::node_entry(&lab, name, 1)
    );

    // 2. node-2's agent stalls for 2 x D: the service comes back on node-1.
    assert!(lab.freeze_agent(2, true).unwrap(), "node-2's agent runs");
    let stalled = Instant::now();
    let back = ha::wait_until(Duration::from_secs(30), || ha::client_reaches(vip, 1));
    let stall = Duration::from_millis(2 * u64::from(timing.lease_ms));
    std::thread::sleep(stall.saturating_sub(stalled.elapsed()));
    lab.freeze_agent(2, false).unwrap();
    assert!(
        back.is_some(),
        "nothing answered on {vip} from node-1 within 30 s of node-2's stall: {}",
        ha::service_status(&lab, name)
    );
    eprintln!("stall of node-2's agent to first reply from node-1: {back:?}");
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    sampler.stop().assert_single_holder(
        vip,
        "a fence of node-1, its return, then a stall of node-2's agent",
    );
    cleanup(&lab, name, vip);
}

/// Hole found by reading (issue 8): a VIP list edit on the running master
/// kept the old VIP forever and never added the new one. The master now
/// changes its addresses as a keepalived reload does, at the same epoch and
/// without hooks. Fails on the commit before this test (the new VIP never
/// appears).
#[test]
fn a_vip_list_edit_changes_the_addresses_of_the_running_master() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, old, new) = ("op-vip-edit", "198.18.0.118", "198.18.0.119");
    ha::delete_service(&lab, name);
    assert!(ha::wait_until(Duration::from_secs(20), || ha::vip_holders(new).is_empty()).is_some());
    fresh(&lab, name, old, None, Timing::DEFAULT);
    assert_eq!(wait_active(&lab, name, old, Duration::from_secs(30)), 1);
    let epoch = ha::node_entry(&lab, name, 1)["epoch"].clone();
    let sampler = ha::SplitBrain::start_many(&[old, new], &[]);

    let edit = |vips: &[&str]| {
        let with_prefix: Vec<String> = vips.iter().map(|v| format!("{v}/24")).collect();
        let refs: Vec<&str> = with_prefix.iter().map(String::as_str).collect();
        ha::apply(&lab, &ha::service(name, name, &refs, None, (3, 100))).unwrap();
    };
    // Added: both on node-1.
    edit(&[old, new]);
    let both = ha::wait_until(Duration::from_secs(10), || {
        ha::vip_holders(old) == [1] && ha::vip_holders(new) == [1]
    });
    assert!(
        both.is_some(),
        "after adding {new}: holders of {old} {:?}, of {new} {:?}",
        ha::vip_holders(old),
        ha::vip_holders(new)
    );
    assert!(
        ha::client_reaches(new, 1),
        "the client does not reach the added VIP on node-1"
    );
    // Replaced: the old one goes, the new one stays.
    edit(&[new]);
    let moved = ha::wait_until(Duration::from_secs(10), || {
        ha::vip_holders(old).is_empty() && ha::vip_holders(new) == [1]
    });
    assert!(
        moved.is_some(),
        "after removing {old}: holders of {old} {:?}, of {new} {:?}",
        ha::vip_holders(old),
        ha::vip_holders(new)
    );
    assert_eq!(
        ha::node_entry(&lab, name, 1)["epoch"],
        epoch,
        "a VIP edit is not a failover: the epoch stays"
    );
    assert_eq!(ha::active_node(&lab, name, new), Some(1));
    // The edited VIP moves with the service.
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, new, 2, Duration::from_secs(30));
    assert!(ha::vip_holders(old).is_empty(), "the removed VIP came back");
    sampler.stop().assert_single_holder(
        &format!("{old} and {new}"),
        "VIP list edits on the running master, then a move",
    );
    cleanup(&lab, name, new);
}

/// Hole found by reading (issue 8): the leave ran the hooks of the current
/// spec, so removing `spec.hooks` before a move stopped nothing. The leave
/// now runs the hooks the service was entered with. Fails on the commit
/// before this test (no leave line in the trace).
#[test]
fn a_leave_runs_the_hooks_the_service_was_entered_with() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-hooks-edit", "198.18.0.120");
    let trace = tracing_hooks(&lab, name, &[]);
    fresh(&lab, name, vip, Some(name), Timing::DEFAULT);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    let read = || std::fs::read_to_string(&trace).unwrap_or_default();
    assert!(
        read()
            .lines()
            .any(|l| l.contains(" enter master ") && l.contains("node=node-1")),
        "node-1 never ran its enter hook: {}",
        read()
    );
    // The hooks are taken out of the spec, then the service moves.
    ha::apply(
        &lab,
        &ha::service(name, name, &[&format!("{vip}/24")], None, (3, 100)),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(30));
    let left = ha::wait_until(Duration::from_secs(10), || {
        read()
            .lines()
            .any(|l| l.contains(" leave master ") && l.contains("node=node-1"))
    });
    assert!(
        left.is_some(),
        "node-1 left master without running the leave hook it entered with: {}",
        read()
    );
    assert!(
        !read()
            .lines()
            .any(|l| l.contains(" master ") && l.contains("node=node-2")),
        "node-2 entered master with the new spec (no hooks) yet ran a master hook: {}",
        read()
    );
    assert!(
        read()
            .lines()
            .any(|l| l.contains(" leave vicemaster ") && l.contains("node=node-2")),
        "node-2 left the standby role it entered with hooks without its leave hook: {}",
        read()
    );
    cleanup(&lab, name, vip);
}

/// Hole found by reading (issue 8): a lowered `leaseDurationMs` was applied
/// backwards. The operator judged the last renew of a frozen node by the
/// new, shorter D and let the next node in while the frozen node's VIP
/// still had the lifetime of the old D: two holders. Renews now announce
/// the E they were made under and are judged by it. Fails on the commit
/// before this test (two holders about 4 s after the freeze).
#[test]
fn a_lowered_lease_duration_never_lets_a_second_node_in_before_the_old_one_ran_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-lower-d", "198.18.0.121");
    let long = Timing {
        lease_ms: 10_000,
        renew_ms: 1000,
        deadline_ms: 5000,
        skew_ms: 500,
    };
    fresh(&lab, name, vip, None, long);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    // Renewed at least once more with the long timing in place.
    std::thread::sleep(Duration::from_secs(2));
    let sampler = ha::SplitBrain::start(vip, &[]);
    assert!(lab.freeze_agent(1, true).unwrap(), "node-1's agent runs");
    let frozen = Instant::now();
    ha::apply(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    let moved = ha::wait_until(Duration::from_secs(25), || {
        ha::vip_holders(vip).contains(&2) || ha::vip_holders(vip).contains(&3)
    });
    let took = frozen.elapsed();
    let holders = ha::vip_holders(vip);
    lab.freeze_agent(1, false).unwrap();
    sampler.stop().assert_single_holder(
        vip,
        "the active node frozen, then D lowered from 10 s to 3 s",
    );
    assert!(
        moved.is_some(),
        "no other node took over within 25 s of node-1's freeze: holders {holders:?}, status {}",
        ha::service_status(&lab, name)
    );
    eprintln!("another node held {vip} {took:?} after node-1 froze (renewed under D = 10 s)");
    wait_active(&lab, name, vip, Duration::from_secs(30));
    cleanup(&lab, name, vip);
}

/// Hole found by reading (issue 8): under `noQuorumPolicy: Freeze` the
/// agent of a node cut off from the API server keeps its VIPs, while the
/// operator took the Lost heartbeat as a fence and cleared the next node:
/// two holders. A Lost node of a Freeze cluster now proves nothing; only
/// its acknowledgement or `peerdown` lets another node in. Fails on the
/// commit before this test (two holders about D + skew after the cut).
#[test]
fn under_freeze_a_node_cut_off_from_the_api_server_keeps_its_vip_alone() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-freeze", "198.18.0.122");
    let timing = Timing::DEFAULT;
    ha::delete_service(&lab, name);
    let mut cluster = ha::cluster(name, &[1, 2, 3], timing);
    cluster["spec"]["fence"] = serde_json::json!({"noQuorumPolicy": "Freeze"});
    ha::apply(&lab, &cluster).unwrap();
    assert!(all_ready(&lab, name, Duration::from_secs(20)));
    ha::apply(
        &lab,
        &ha::service(name, name, &[&format!("{vip}/24")], None, (3, 100)),
    )
    .unwrap();
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    let sampler = ha::SplitBrain::start(vip, &[]);
    lab.partition(1).unwrap();
    // Three times D + skew: well past the point where the operator sees
    // node-1 Lost.
    std::thread::sleep(Duration::from_millis(
        3 * u64::from(timing.lease_ms + timing.skew_ms),
    ));
    let holders = ha::vip_holders(vip);
    let reached = ha::client_reaches(vip, 1);
    let status = ha::service_status(&lab, name);
    lab.heal(1).unwrap();
    let after_heal = ha::wait_until(Duration::from_secs(30), || {
        ha::active_node(&lab, name, vip).is_some()
    });
    sampler.stop().assert_single_holder(
        vip,
        "node-1 of a Freeze cluster cut off from the API server, then healed",
    );
    assert_eq!(
        holders,
        [1],
        "frozen node-1 alone holds the VIP while cut off"
    );
    assert!(reached, "the client lost the frozen service on node-1");
    assert!(
        after_heal.is_some(),
        "no node ran the service after the heal: {} (while cut off: {status})",
        ha::service_status(&lab, name)
    );
    cleanup(&lab, name, vip);
}

/// Hole found by reading (issue 8): a leave that failed left the next node
/// waiting for a fence that nothing started while the failed node kept
/// heartbeating: the service stayed down until an admin acted. The agent
/// now fences itself for the cluster (heartbeat withheld for E + R), as
/// Pacemaker fences a node whose stop failed, and the operator lets the
/// next node in once it sees the node Lost. Fails on the commit before this
/// test (the move never completes).
#[test]
fn a_leave_that_fails_fences_its_node_and_the_service_moves_without_an_admin() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-leave-fails", "198.18.0.123");
    tracing_hooks(&lab, name, &[1]);
    fresh(&lab, name, vip, Some(name), Timing::DEFAULT);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    let sampler = ha::SplitBrain::start(vip, &[]);
    let asked = Instant::now();
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(30));
    let took = asked.elapsed();
    sampler.stop().assert_single_holder(
        vip,
        "a move whose leave fails on node-1, then node-1's fence and node-2's entry",
    );
    eprintln!("move with a failing leave to node-2 active: {took:?}");
    ha::wait_event_reasons(&lab, ha::SERVICE_NAMESPACE, name, |r| {
        ha::has_reason(r, "FenceEscalated")
    })
    .unwrap_or_else(|reasons| panic!("no FenceEscalated Event: {reasons:?}"));
    // node-1 heartbeats again after its fence.
    assert!(
        all_ready(&lab, name, Duration::from_secs(30)),
        "node-1 never heartbeat again after the escalated fence"
    );
    tracing_hooks(&lab, name, &[]);
    cleanup(&lab, name, vip);
}

/// Hole found by reading (issue 8): a status file that could not be written
/// was only logged, so a node entered master without its intent on disk
/// (after a crash it would not know it may hold a VIP or a started
/// service). Now it does not enter, reports a failure that started nothing,
/// and the service runs elsewhere. Fails on the commit before this test
/// (node-1 enters and holds the VIP).
#[test]
fn a_node_that_cannot_write_its_status_file_does_not_enter() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-ro-state", "198.18.0.124");
    let run = lab.node_dir(1).join("run");
    lab.stop_agent(1, StopSignal::Term).unwrap();
    let mount = |args: &[&str]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let dir = run.display().to_string();
    mount(&["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", &dir]);
    let started = lab.start_agent(1, &[] as &[&str]);
    // The mount is undone whatever happens in between.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        started.expect("agent starts");
        fresh_on(&lab, name, vip, &[1, 2], None, Timing::DEFAULT);
        let active = wait_active(&lab, name, vip, Duration::from_secs(40));
        (active, ha::node_entry(&lab, name, 1))
    }));
    lab.stop_agent(1, StopSignal::Term).unwrap();
    mount(&["umount", &dir]);
    lab.start_agent(1, &[] as &[&str]).unwrap();
    let (active, entry) = outcome.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert_eq!(
        active, 2,
        "node-1 cannot write its status file: node-2 runs the service"
    );
    assert!(
        entry.to_string().contains("status file cannot be written"),
        "node-1 does not say why it refused: {entry}"
    );
    cleanup(&lab, name, vip);
}

/// Hole found by reading (issue 8): an unreadable status file was ignored,
/// so a restarted agent reported later epochs as "moved on" without
/// knowing what it ran before. Now every service of its clusters leaves
/// first (the leave scripts run) and the file is kept aside. Fails on the
/// commit before this test (no leave runs).
#[test]
fn an_unreadable_status_file_makes_the_node_leave_first() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-bad-state", "198.18.0.125");
    let trace = tracing_hooks(&lab, name, &[]);
    fresh(&lab, name, vip, Some(name), Timing::DEFAULT);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    // node-3 (idle here) restarts with a corrupt status file. The operator
    // shows a service only to the nodes that need it (node-scope labels);
    // shown to node-3 by hand, as the service of a node that held it is.
    ha::show_service_to(&lab, ha::SERVICE_NAMESPACE, name, &["node-3"]).unwrap();
    lab.stop_agent(3, StopSignal::Term).unwrap();
    let file = lab.node_dir(3).join("run").join("status.json");
    std::fs::write(&file, "{ not json").unwrap();
    let before = std::fs::read_to_string(&trace).unwrap_or_default();
    lab.start_agent(3, &[] as &[&str]).unwrap();
    let left = ha::wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .strip_prefix(before.as_str())
            .is_some_and(|new| {
                new.lines()
                    .any(|l| l.contains(" leave master ") && l.contains("node=node-3"))
            })
    });
    assert!(
        left.is_some(),
        "node-3 restarted with an unreadable status file and ran no leave: {}",
        std::fs::read_to_string(&trace).unwrap_or_default()
    );
    let aside = std::fs::read_dir(lab.node_dir(3).join("run"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("unreadable"));
    assert!(aside, "the unreadable status file was not kept aside");
    // The service on node-1 is untouched.
    assert_eq!(ha::active_node(&lab, name, vip), Some(1));
    cleanup(&lab, name, vip);
}

/// Hole found by `cargo xtask chaos --seed 4` (injection #58): an agent
/// restarted with a record that refused an epoch (Failed at it, never
/// acknowledged) read it as a leave that failed, and nothing ever ended
/// that state: the node kept heartbeating, never reported a later epoch,
/// and the operator waited for its proof forever (four services down).
/// Such a record now runs the leave again once in contact. Fails on the
/// commit before this test (node-3 stays Failed at the old epoch).
#[test]
fn a_restarted_agent_with_a_refused_epoch_leaves_again_and_moves_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-refused-restart", "198.18.0.126");
    fresh(&lab, name, vip, None, Timing::DEFAULT);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    let epoch = ha::service_status(&lab, name)["epoch"].as_i64().unwrap();
    // node-3 is idle: the operator shows the service only to its holder
    // and standby (node-scope labels). A node that refused an epoch has a
    // status entry saying so, which keeps the service shown to it; the
    // test forges the record in node-3's file only, so it shows the
    // service to node-3 by hand, as that entry would.
    let file = lab.node_dir(3).join("run").join("status.json");
    let show_to_node_3 =
        || ha::show_service_to(&lab, ha::SERVICE_NAMESPACE, name, &["node-3"]).unwrap();
    show_to_node_3();
    let key = format!("{}/{name}", ha::SERVICE_NAMESPACE);
    let recorded = ha::wait_until(Duration::from_secs(15), || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .is_some_and(|status| status["services"][key.as_str()].is_object())
    });
    assert!(
        recorded.is_some(),
        "node-3 never recorded {name} once shown it"
    );
    // node-3 stops; its record says it refused the current epoch.
    lab.stop_agent(3, StopSignal::Term).unwrap();
    let mut status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let record = &mut status["services"][format!("{}/{name}", ha::SERVICE_NAMESPACE)];
    assert!(
        record.is_object(),
        "node-3 has no record of {name}: {status}"
    );
    record["role"] = "none".into();
    record["state"] = "Failed".into();
    record["epoch"] = epoch.into();
    record["failedEpoch"] = epoch.into();
    let obj = record.as_object_mut().unwrap();
    obj.remove("ackedEpoch");
    obj.remove("uncleanEpoch");
    obj.remove("fenced");
    std::fs::write(&file, serde_json::to_vec(&status).unwrap()).unwrap();
    // Meanwhile the service moves on to a later epoch.
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(30));
    let later = ha::service_status(&lab, name)["epoch"].as_i64().unwrap();
    assert!(later > epoch);
    show_to_node_3();
    lab.start_agent(3, &[] as &[&str]).unwrap();
    let moved_on = ha::wait_until(Duration::from_secs(20), || {
        let entry = ha::node_entry(&lab, name, 3);
        entry["state"] != "Failed" && entry["epoch"].as_i64().is_some_and(|e| e >= later)
    });
    assert!(
        moved_on.is_some(),
        "node-3 stayed stuck on the refused epoch {epoch}: {}",
        ha::node_entry(&lab, name, 3)
    );
    cleanup(&lab, name, vip);
}

/// Chaos-found (issue 8, seed 1, injection #16): kube-apiserver stalled for
/// longer than the renew deadline, so every node fenced itself; a standby
/// then cleared as master with a clearance written before its return
/// refused it, and leaving the standby role replaced the refusal's marker
/// with the (empty) leave results, so the operator never read "started
/// nothing" and waited on that node forever. Every service must run again
/// after the stall, with never two holders.
#[test]
fn every_service_runs_again_after_an_api_server_stall_past_the_renew_deadline() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let cluster = "op-stall";
    let timing = Timing::DEFAULT;
    let services: Vec<(String, String)> = (0..4)
        .map(|i| (format!("op-stall-{i}"), format!("198.18.0.{}", 105 + i)))
        .collect();
    for (name, _) in &services {
        ha::delete_service(&lab, name);
    }
    ha::apply(&lab, &ha::cluster(cluster, &[1, 2, 3], timing)).unwrap();
    assert!(all_ready(&lab, cluster, Duration::from_secs(20)));
    for (name, vip) in &services {
        ha::apply(
            &lab,
            &ha::service(name, cluster, &[&format!("{vip}/24")], None, (3, 100)),
        )
        .unwrap();
    }
    for (name, vip) in &services {
        wait_active(&lab, name, vip, Duration::from_secs(30));
    }
    let vips: Vec<&str> = services.iter().map(|(_, v)| v.as_str()).collect();
    let mut report = Vec::new();
    // Twice: the second stall finds the nodes back from the first fence.
    for round in 1..=2 {
        let sampler = ha::SplitBrain::start_many(&vips, &[]);
        lab.freeze_process("kube-apiserver", true).unwrap();
        std::thread::sleep(Duration::from_millis(
            u64::from(timing.lease_ms + timing.skew_ms) + 1_300,
        ));
        lab.freeze_process("kube-apiserver", false).unwrap();
        let back = Instant::now();
        for (name, vip) in &services {
            let up = ha::wait_until(Duration::from_secs(45), || {
                ha::active_node(&lab, name, vip).is_some()
            });
            assert!(
                up.is_some(),
                "round {round}: {name} did not run again within 45 s of the stall's end: status {}, holders {:?}",
                ha::service_status(&lab, name),
                ha::vip_holders(vip)
            );
        }
        report.push(back.elapsed());
        let sampled = sampler.stop();
        for vip in &vips {
            sampled.assert_single_holder(vip, &format!("round {round} of an API server stall"));
        }
    }
    eprintln!("every service active again after the stall's end: {report:?}");
    for (name, vip) in &services {
        ha::delete(&lab, "haservice", name, Some(ha::SERVICE_NAMESPACE));
        assert!(
            ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty()).is_some(),
            "{vip} still held after {name} was deleted"
        );
        ha::delete_service(&lab, name);
    }
    ha::delete(&lab, "hacluster", cluster, None);
}

/// Chaos-found (issue 8, seed 1, after injection #16): a fence that found
/// a service in the middle of entering (its GARP burst held the record)
/// dropped its VIPs but could not mark the record; the entry then finished
/// as master Running with no VIP, and nothing ever noticed: the status said
/// Active and nothing answered. The record is now marked as a fence does
/// once it is free, so the node leaves again and the service moves on.
#[test]
fn a_fence_during_an_entry_leaves_no_master_without_its_vip() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-fence-entering", "198.18.0.109");
    // E = 6.5 s: a 3.5 s cut never makes the operator see node-2 Lost, so
    // the Lease still names it after the heal (the state that stuck).
    let timing = Timing {
        lease_ms: 6_000,
        ..Timing::DEFAULT
    };
    fresh(&lab, name, vip, None, timing);
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    // A long announcement burst: 8 s during which the entry holds the
    // record, past the fence's wait for it (until E).
    let mut svc = ha::service(name, name, &[&format!("{vip}/24")], None, (40, 200));
    svc["spec"]["preferredNodes"] = serde_json::json!([]);
    ha::apply(&lab, &svc).unwrap();
    let sampler = ha::SplitBrain::start(vip, &[]);
    ha::request_move(&lab, name, 2).unwrap();
    let entering = ha::wait_until(Duration::from_secs(20), || ha::vip_on_node(2, vip));
    assert!(entering.is_some(), "node-2 never started entering");
    // Cut off while it announces: the fence comes RD later, mid-burst.
    lab.partition(2).unwrap();
    std::thread::sleep(Duration::from_millis(3_500));
    lab.heal(2).unwrap();
    let back = ha::wait_until(Duration::from_secs(40), || {
        ha::active_node(&lab, name, vip).is_some()
    });
    sampler
        .stop()
        .assert_single_holder(vip, "a fence during an entry, then the heal");
    assert!(
        back.is_some(),
        "no node runs {name} with its VIP after the heal: status {}, holders {:?}",
        ha::service_status(&lab, name),
        ha::vip_holders(vip)
    );
    cleanup(&lab, name, vip);
}

/// Issue 14: an operator that stalls (SIGSTOP) for 3 x D with every node
/// healthy, then continues, moves nothing: after any gap in its own view it
/// re-reads the heartbeats before it judges anybody Lost. Ten times over,
/// the service keeps its epoch and its master, and no hook runs.
#[test]
fn an_operator_frozen_for_three_lease_durations_moves_nothing_when_it_continues() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-freeze", "198.18.0.105");
    let trace = tracing_hooks(&lab, name, &[]);
    fresh(&lab, name, vip, Some(name), Timing::DEFAULT);
    let active = wait_active(&lab, name, vip, Duration::from_secs(30));
    // The entry's hooks have run; from here on nothing may run.
    let entered = ha::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&trace).is_ok_and(|t| t.contains("E01server"))
    });
    assert!(entered.is_some(), "the enter hook never ran");
    std::thread::sleep(Duration::from_secs(1));
    let hooks_before = std::fs::read_to_string(&trace).unwrap_or_default();
    let epoch = ha::service_status(&lab, name)["epoch"].as_i64();
    assert!(epoch.is_some(), "no epoch in the status");
    let freeze = Duration::from_millis(3 * u64::from(Timing::DEFAULT.lease_ms));
    for round in 1..=10 {
        assert!(lab.freeze_operator(0, true).unwrap(), "operator 0 runs");
        std::thread::sleep(freeze);
        lab.freeze_operator(0, false).unwrap();
        // A wrong decision is written within milliseconds of the resume;
        // wait past E as well, for one taken on a timer.
        let left = ha::wait_every(
            Duration::from_millis(4_500),
            Duration::from_millis(100),
            || ha::vip_holders(vip) != [active],
        );
        let status = ha::service_status(&lab, name);
        assert!(
            left.is_none(),
            "round {round}: the VIP left node-{active}: holders {:?}, status {status}",
            ha::vip_holders(vip)
        );
        assert_eq!(
            status["epoch"].as_i64(),
            epoch,
            "round {round}: the epoch moved: status {status}"
        );
        assert_eq!(
            std::fs::read_to_string(&trace).unwrap_or_default(),
            hooks_before,
            "round {round}: a hook ran"
        );
    }
    cleanup(&lab, name, vip);
}

/// Issue 14: every node loses power at once and all come back together.
/// The service enters (with its enter hook) on exactly one node, and no
/// node holds the VIP without its enter hook having run since that boot.
/// Twice: first a short loss (less than E: the Lease still names the old
/// master) on hosts whose status folder survives the reboot (only the boot
/// id tells the agent), then a long one (past 2E) with `/run` emptied.
#[test]
fn after_a_whole_cluster_power_loss_the_service_enters_with_its_hooks_on_one_node() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-blackout", "198.18.0.106");
    let trace = tracing_hooks(&lab, name, &[]);
    fresh(&lab, name, vip, Some(name), Timing::DEFAULT);
    wait_active(&lab, name, vip, Duration::from_secs(30));
    for (off, keep_state) in [
        (Duration::from_secs(2), true),
        (Duration::from_secs(8), false),
    ] {
        let what = if keep_state {
            "short loss, status kept"
        } else {
            "long loss, /run emptied"
        };
        for i in 1..=3 {
            lab.power_off(i).unwrap();
        }
        std::thread::sleep(off);
        let booted = std::fs::read_to_string(&trace).unwrap_or_default().len();
        for i in 1..=3 {
            if keep_state {
                lab.power_on_keeping_state(i).unwrap();
            } else {
                lab.power_on(i).unwrap();
            }
        }
        for i in 1..=3 {
            lab.start_agent(i, &[] as &[&str]).unwrap();
        }
        // Every holder of the VIP from the boot until the service settles.
        let mut held_by = std::collections::BTreeSet::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            held_by.extend(ha::vip_holders(vip));
            std::thread::sleep(Duration::from_millis(50));
        }
        let active = wait_active(&lab, name, vip, Duration::from_secs(20));
        let since_boot = std::fs::read_to_string(&trace).unwrap_or_default()[booted..].to_owned();
        let enters: Vec<&str> = since_boot
            .lines()
            .filter(|l| l.starts_with("E01server enter master"))
            .collect();
        assert_eq!(
            enters.len(),
            1,
            "{what}: the service must enter on exactly one node; hooks since the boot:\n{since_boot}"
        );
        for node in &held_by {
            assert!(
                enters[0].contains(&format!("node=node-{node} ")),
                "{what}: node-{node} held the VIP without its enter hook since the boot; hooks:\n{since_boot}"
            );
        }
        assert!(held_by.contains(&active), "{what}: {held_by:?}");
    }
    cleanup(&lab, name, vip);
}

/// Issue 14: an agent restarted within the same boot runs the service's
/// monitor once before it re-adopts the master role. Here the service died
/// while the agent was down: the restarted agent leaves it (no VIP kept
/// for a service that does not run) and it is entered again, with its
/// hooks. Before, the VIP was re-adopted and served until the monitor had
/// failed `failureThreshold` (5) times.
#[test]
fn a_restarted_agent_runs_the_monitor_before_it_re_adopts_its_service() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-readopt", "198.18.0.107");
    let trace = lab.dir().join(format!("trace-{name}"));
    let _ = std::fs::remove_file(&trace);
    // The "service" of node i runs while its marker exists.
    let running = |i: u8| lab.dir().join(format!("running-{name}-node-{i}"));
    for i in 1..=3 {
        let marker = running(i);
        let _ = std::fs::remove_file(&marker);
        let enter = ha::tracing_script(&trace, 0)
            .replace("exit 0", &format!("touch {}\nexit 0", marker.display()));
        let leave = ha::tracing_script(&trace, 0)
            .replace("exit 0", &format!("rm -f {}\nexit 0", marker.display()));
        let monitor = format!("#!/bin/sh\ntest -e {}\n", marker.display());
        ha::install_hooks(
            &lab,
            i,
            name,
            &[
                ("E01server", &enter),
                ("L01server", &leave),
                ("M01server", &monitor),
            ],
        )
        .unwrap();
    }
    ha::delete_service(&lab, name);
    ha::apply(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    assert!(all_ready(&lab, name, Duration::from_secs(20)));
    let mut spec = ha::service(name, name, &[&format!("{vip}/24")], Some(name), (3, 100));
    spec["spec"]["hooks"]["monitor"] =
        serde_json::json!({"intervalSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 5});
    ha::apply(&lab, &spec).unwrap();
    let active = wait_active(&lab, name, vip, Duration::from_secs(30));
    assert!(running(active).exists(), "the enter hook started nothing");

    // The agent dies, and the service with it; the agent comes back within
    // the VIP's lifetime.
    lab.stop_agent(active, StopSignal::Kill).unwrap();
    std::fs::remove_file(running(active)).unwrap();
    lab.start_agent(active, &[] as &[&str]).unwrap();
    let started = Instant::now();
    // A node holding the VIP while its service is down, for a whole second
    // (an entry adds the VIP a moment before its hook starts the service).
    let mut down_since: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(12) {
        let down = ha::vip_holders(vip)
            .into_iter()
            .any(|i| !running(i).exists());
        match (down, down_since) {
            (true, None) => down_since = Some(Instant::now()),
            (false, _) => down_since = None,
            _ => {}
        }
        // Before the agent has started, what the kernel still holds from
        // before the kill is beyond it.
        if started.elapsed() > Duration::from_secs(4)
            && let Some(since) = down_since
        {
            assert!(
                since.elapsed() < Duration::from_secs(1),
                "the VIP was served for a second without its service, {:?} after the agent's restart: holders {:?}",
                started.elapsed(),
                ha::vip_holders(vip)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let now_active = wait_active(&lab, name, vip, Duration::from_secs(20));
    assert!(
        running(now_active).exists(),
        "node-{now_active} is active but its service does not run"
    );
    cleanup(&lab, name, vip);
}

/// Found by the chaos run (seed 8): a node whose leave failed enters
/// nothing until its leave succeeds or an admin clears it, but once its
/// failure had expired (`failureTimeoutSeconds`) it was placed again, and
/// the service stayed down. Now it reports `uncleanEpoch` and is no
/// candidate: here node-1's leave fails, node-2 runs the service, node-1's
/// failure expires, node-2 loses power, and node-3 (not node-1, first in
/// order) takes the service.
#[test]
fn a_node_whose_leave_failed_is_not_placed_again_when_its_failure_expires() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-unclean", "198.18.0.99");
    tracing_hooks(&lab, name, &[1]);
    ha::delete_service(&lab, name);
    ha::apply(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    assert!(all_ready(&lab, name, Duration::from_secs(20)));
    let mut spec = ha::service(name, name, &[&format!("{vip}/24")], Some(name), (3, 100));
    spec["spec"]["failureTimeoutSeconds"] = serde_json::json!(5);
    ha::apply(&lab, &spec).unwrap();
    assert_eq!(wait_active(&lab, name, vip, Duration::from_secs(30)), 1);
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(30));
    assert!(all_ready(&lab, name, Duration::from_secs(30)));
    let unclean = ha::wait_until(Duration::from_secs(10), || {
        ha::node_entry(&lab, name, 1)["uncleanEpoch"].is_i64()
    });
    assert!(
        unclean.is_some(),
        "node-1 does not report the leave that failed: {}",
        ha::node_entry(&lab, name, 1)
    );
    // The failure expires; node-1 still has not left cleanly.
    std::thread::sleep(Duration::from_secs(6));
    lab.power_off(2).unwrap();
    wait_active_on(&lab, name, vip, 3, Duration::from_secs(30));
    lab.power_on(2).unwrap();
    lab.start_agent(2, &[] as &[&str]).unwrap();
    tracing_hooks(&lab, name, &[]);
    cleanup(&lab, name, vip);
}

/// Issue 15: every timing at the edge of what the API server accepts
/// (the floors, R just inside the entry rule, RD next to R or to D, a
/// configured VIP lifetime at its floor) enters, fails over when the
/// active node loses power, and never leaves the service down while an
/// eligible node is up, with never two holders (fences counted). The
/// timing is changed on the running cluster, as an admin does.
#[test]
fn every_timing_at_the_edge_of_what_the_api_accepts_enters_and_fails_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-grid", "198.18.0.109");
    let t = |lease_ms, renew_ms, deadline_ms, skew_ms| Timing {
        lease_ms,
        renew_ms,
        deadline_ms,
        skew_ms,
    };
    // (timing, vipLifetimeSeconds)
    let grid: Vec<(Timing, Option<u32>)> = vec![
        (t(1000, 300, 600, 100), None),
        (t(500, 100, 200, 0), None),
        (t(500, 190, 290, 0), None),
        (t(500, 100, 499, 0), None),
        (t(500, 100, 300, 50), None),
        (t(500, 240, 340, 50), None),
        (t(600, 150, 400, 50), None),
        (t(700, 200, 500, 0), None),
        (t(800, 490, 700, 0), None),
        (t(1000, 100, 200, 0), None),
        (t(1000, 300, 999, 0), None),
        (t(1000, 690, 900, 0), None),
        (t(1000, 790, 990, 100), None),
        (t(1000, 300, 600, 100), Some(1)),
        (t(1000, 300, 600, 2000), None),
        (t(1500, 1190, 1400, 0), None),
        (t(2000, 1690, 1900, 0), None),
        (t(2000, 800, 1500, 0), Some(1)),
        (t(3000, 2690, 2900, 0), None),
        (t(3000, 1000, 2000, 500), Some(3)),
        (Timing::DEFAULT, None),
    ];
    assert!(grid.len() >= 20);
    fresh(&lab, name, vip, None, grid[0].0);
    let mut figures = Vec::new();
    for (timing, lifetime) in &grid {
        let label = match lifetime {
            Some(l) => format!("{} vipLifetimeSeconds {l}", timing.label()),
            None => timing.label(),
        };
        let mut cluster = ha::cluster(name, &[1, 2, 3], *timing);
        if let Some(l) = lifetime {
            cluster["spec"]["heartbeat"]["vipLifetimeSeconds"] = serde_json::json!(l);
        }
        ha::apply(&lab, &cluster).unwrap_or_else(|e| panic!("{label}: refused: {e}"));
        // Renewing at the new timing, the service running.
        assert!(
            all_ready(&lab, name, Duration::from_secs(20)),
            "{label}: members not ready"
        );
        let active = wait_active(&lab, name, vip, Duration::from_secs(30));
        let sampler = ha::SplitBrain::start(vip, &[]);
        // A renew at the new timing seen by the detector, then some.
        std::thread::sleep(Duration::from_millis(u64::from(timing.renew_ms) + 500));
        lab.power_off(active).unwrap();
        let expiry = Duration::from_millis(u64::from(timing.lease_ms + timing.skew_ms));
        let bound = expiry + Duration::from_millis(6500);
        let moved = ha::wait_until(bound, || {
            let holders = ha::vip_holders(vip);
            holders.iter().any(|h| *h != active)
                && ha::active_node(&lab, name, vip).is_some_and(|n| n != active)
        });
        let Some(moved) = moved else {
            panic!(
                "{label}: the service was down {bound:?} after node-{active} lost power, with two eligible nodes up: status {}, holders {:?}",
                ha::service_status(&lab, name),
                ha::vip_holders(vip)
            );
        };
        figures.push(format!(
            "{label}: {} ms (E = {} ms)",
            moved.as_millis(),
            expiry.as_millis()
        ));
        eprintln!("{}", figures.last().unwrap());
        lab.power_on(active).unwrap();
        lab.start_agent(active, &[] as &[&str]).unwrap();
        assert!(
            all_ready(&lab, name, Duration::from_secs(20)),
            "{label}: node-{active} never heartbeat again after power-on"
        );
        sampler.stop().assert_single_holder(
            vip,
            &format!("{label}: power-off of node-{active} and its return"),
        );
    }
    eprintln!(
        "power-off to the service active elsewhere:\n  {}",
        figures.join("\n  ")
    );
    cleanup(&lab, name, vip);
}

/// The value of every series of replica 0's `/metrics` named `metric`
/// with label `label="value"`, by that label's value.
fn operator_series(metric: &str, label: &str) -> std::collections::BTreeMap<String, f64> {
    let (_, body) =
        kubeha_e2e::lab::http_get(&Lab::operator_metrics_addr(0), "/metrics").unwrap_or_default();
    let prefix = format!("{metric}{{{label}=\"");
    body.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (value_of_label, rest) = rest.split_once('"')?;
            let value = rest.rsplit(' ').next()?.parse().ok()?;
            Some((value_of_label.to_owned(), value))
        })
        .collect()
}

/// The operator's memory entries by map and its cached HAServices.
fn operator_memory() -> (std::collections::BTreeMap<String, f64>, f64) {
    let entries = operator_series("kubeha_operator_memory_entries", "map");
    let watched = operator_series("kubeha_operator_watched_objects", "kind");
    (entries, watched.get("HAService").copied().unwrap_or(-1.0))
}

/// Resident set size of operator replica 0, MiB (for the log).
fn operator_rss(lab: &Lab) -> String {
    lab.operator_pid(0)
        .and_then(|pid| kubeha_e2e::bench::rss_mb(pid as u32).ok())
        .map_or("?".to_owned(), |mb| format!("{mb:.1} MiB"))
}

/// A batch of HAServices that come and go in one cluster, and what the
/// operator keeps meanwhile.
struct Churn {
    /// Name of the cluster, prefix of the services' names, and the value of
    /// the label the services carry.
    name: &'static str,
    /// How many services.
    count: usize,
    /// The cluster's members (lab node numbers; ones the lab does not run
    /// leave the services Pending).
    members: &'static [u8],
    /// The cluster's VIP pool and each service's VIP (with its prefix).
    pool: &'static str,
    vip: fn(usize) -> String,
    /// Whether every service must become Active before they are deleted.
    active: bool,
}

impl Churn {
    /// Creates the services, waits until the operator remembers every one
    /// (and they are Active when asked), deletes them and then the cluster,
    /// and asserts that the operator's memory is back where it was at each
    /// step. Logs the operator's RSS.
    fn run(&self, lab: &Lab) {
        let Churn { name, count, .. } = *self;
        let selector = format!("kubeha-e2e/test={name}");
        let delete_all = || {
            let _ = lab.kubectl_output(&[
                "delete",
                "haservice",
                "-n",
                ha::SERVICE_NAMESPACE,
                "-l",
                &selector,
                "--wait=false",
            ]);
        };
        let listed = || {
            lab.kubectl_output(&[
                "get",
                "haservice",
                "-n",
                ha::SERVICE_NAMESPACE,
                "-l",
                &selector,
                "-o",
                "name",
            ])
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(usize::MAX)
        };
        let gone_within = |secs| {
            ha::wait_every(
                Duration::from_secs(secs),
                Duration::from_millis(500),
                || listed() == 0,
            )
            .is_some()
        };
        delete_all();
        assert!(gone_within(120), "services of an earlier run never went");
        let mut cluster = ha::cluster(name, self.members, Timing::DEFAULT);
        cluster["spec"]["vipPool"] = serde_json::json!([self.pool]);
        ha::apply(lab, &cluster).unwrap();
        if self.active {
            assert!(
                all_ready(lab, name, Duration::from_secs(20)),
                "cluster {name} never had its members ready"
            );
        }

        // What the operator keeps with no service of this batch: one entry
        // per service, and this cluster in each per-cluster map.
        let mut before = (Default::default(), 0.0);
        let settled = ha::wait_every(Duration::from_secs(20), Duration::from_millis(200), || {
            before = operator_memory();
            let (entries, services) = &before;
            entries.get("service") == Some(services)
                && ["cluster", "heartbeat_view", "first_seen"]
                    .iter()
                    .all(|m| entries.get(*m).is_some_and(|n| *n >= 1.0))
        });
        assert!(
            settled.is_some(),
            "the operator's memory never matched its objects: {before:?}"
        );
        let rss_before = operator_rss(lab);
        let active = || {
            operator_series("kubeha_operator_services", "phase")
                .get("Active")
                .copied()
                .unwrap_or(0.0)
        };
        let active_before = active();

        let services: Vec<serde_json::Value> = (0..count)
            .map(|i| {
                let mut svc = ha::service(
                    &format!("{name}-{i}"),
                    name,
                    &[&(self.vip)(i)],
                    None,
                    (1, 100),
                );
                svc["metadata"]["labels"] = serde_json::json!({"kubeha-e2e/test": name});
                svc
            })
            .collect();
        for chunk in services.chunks(100) {
            ha::apply(
                lab,
                &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": chunk}),
            )
            .unwrap();
        }
        let n = count as f64;
        let mut during = (Default::default(), 0.0);
        let grown = ha::wait_every(Duration::from_secs(300), Duration::from_millis(500), || {
            during = operator_memory();
            during.1 >= before.1 + n
                && during.0.get("service") == Some(&during.1)
                && (!self.active || active() >= active_before + n)
        });
        assert!(
            grown.is_some(),
            "the {count} services were never all remembered (and Active: {}): {during:?}, phases {:?}",
            self.active,
            operator_series("kubeha_operator_services", "phase")
        );
        let rss_during = operator_rss(lab);

        delete_all();
        assert!(
            gone_within(300),
            "the finalizers never let the {count} services go"
        );
        if self.active {
            assert!(
                ha::wait_until(Duration::from_secs(20), || (0..count)
                    .all(|i| ha::vip_holders(&vip_address(&(self.vip)(i))).is_empty()))
                .is_some(),
                "a VIP was still held after its service was deleted"
            );
        }
        let mut after = (Default::default(), 0.0);
        let shrunk = ha::wait_until(Duration::from_secs(10), || {
            after = operator_memory();
            after == before
        });
        assert!(
            shrunk.is_some(),
            "the operator still keeps entries of deleted services: before {before:?}, after {after:?}"
        );
        let rss_after = operator_rss(lab);

        ha::delete(lab, "hacluster", name, None);
        let cluster_gone = ha::wait_until(Duration::from_secs(20), || {
            let (entries, _) = operator_memory();
            ["cluster", "heartbeat_view", "first_seen"]
                .iter()
                .all(|m| entries.get(*m).copied() == before.0.get(*m).map(|n| n - 1.0))
        });
        assert!(
            cluster_gone.is_some(),
            "the operator still keeps the deleted cluster: before {before:?}, now {:?}",
            operator_memory()
        );
        eprintln!(
            "operator RSS: {rss_before} before, {rss_during} with {count} more services{}, {rss_after} after they were deleted",
            if self.active { " Active" } else { " Pending" }
        );
    }
}

/// The address of a VIP written with its prefix.
fn vip_address(vip: &str) -> String {
    vip.split('/').next().unwrap_or(vip).to_owned()
}

#[test]
fn fifty_services_created_then_deleted_leave_nothing_in_the_operators_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    Churn {
        name: "op-memory",
        count: 50,
        members: &[1, 2, 3],
        pool: "198.18.0.0/24",
        vip: |i| format!("198.18.0.{}/24", 140 + i),
        active: true,
    }
    .run(&lab);
}

/// A measurement more than a test (run it on purpose, with
/// `KUBEHA_OPERATOR_BIN=target/release/kubeha-operator` for a release
/// figure): the operator with 1,000 HAServices cached and remembered, and
/// none of it left once they are deleted. The services stay Pending (their
/// cluster's members are nodes the lab does not run), so the agents and
/// the API server do no more than hold the objects.
#[test]
#[ignore = "a measurement: 1,000 HAServices in the lab"]
fn a_thousand_services_created_then_deleted_leave_nothing_in_the_operators_memory() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    Churn {
        name: "op-memory-1000",
        count: 1000,
        members: &[61, 62, 63],
        pool: "198.18.8.0/22",
        vip: |i| format!("198.18.{}.{}/22", 8 + (i + 1) / 256, (i + 1) % 256),
        active: false,
    }
    .run(&lab);
}

/// Issue 10: a monitor script exiting 2 (configuration error) fails the
/// service on that node at once, without waiting for `failureThreshold`,
/// and for good: the node reports `permanentFailure`, its fail count is
/// raised to `migrationThreshold`, and it is not placed again when
/// `failureTimeoutSeconds` has passed, only after `kubectl ha clear`.
#[test]
fn a_monitor_exiting_2_fails_for_good_at_once_and_outlives_the_failure_timeout() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-monperm", "198.18.0.135");
    let trace = lab.dir().join(format!("trace-{name}"));
    let install = |node_1_monitor: i32| {
        for i in 1..=3 {
            let code = if i == 1 { node_1_monitor } else { 0 };
            ha::install_hooks(
                &lab,
                i,
                name,
                &[
                    ("E01server", &ha::tracing_script(&trace, 0)),
                    ("L01server", &ha::tracing_script(&trace, 0)),
                    ("M01server", &ha::tracing_script(&trace, code)),
                ],
            )
            .unwrap();
        }
    };
    install(2);
    ha::delete_service(&lab, name);
    ha::apply(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    assert!(all_ready(&lab, name, Duration::from_secs(20)));
    let mut spec = ha::service(name, name, &[&format!("{vip}/24")], Some(name), (3, 100));
    spec["spec"]["hooks"]["monitor"] =
        serde_json::json!({"intervalSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 5});
    spec["spec"]["migrationThreshold"] = serde_json::json!(3);
    spec["spec"]["failureTimeoutSeconds"] = serde_json::json!(4);
    ha::apply(&lab, &spec).unwrap();
    // Node-1 enters first (Ordered), its first monitor run exits 2: the
    // service moves on without four more runs.
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(30));
    let entry = ha::node_entry(&lab, name, 1);
    assert_eq!(entry["permanentFailure"], true, "node-1: {entry}");
    assert_eq!(
        entry["failCount"], 3,
        "one monitor exit 2 counts as migrationThreshold failures: {entry}"
    );
    assert!(
        entry["hooks"].to_string().contains("\"ConfigError\""),
        "{entry}"
    );
    let monitor_runs_on_node_1 = std::fs::read_to_string(&trace)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("M01server monitor") && l.contains("node=node-1 "))
        .count();
    assert_eq!(
        monitor_runs_on_node_1, 1,
        "node-1 left after its first monitor run, not after failureThreshold (5)"
    );

    // The failure timeout passes; node-2 loses power: node-3 takes over,
    // node-1 (failed for good) does not.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        ha::node_entry(&lab, name, 1)["permanentFailure"],
        true,
        "the failure timeout ended a permanent failure"
    );
    lab.power_off(2).unwrap();
    wait_active_on(&lab, name, vip, 3, Duration::from_secs(30));
    assert!(!ha::vip_on_node(1, vip), "node-1 took the service again");
    lab.power_on(2).unwrap();
    lab.start_agent(2, &[] as &[&str]).unwrap();
    assert!(all_ready(&lab, name, Duration::from_secs(30)));

    // Fixed and cleared: node-1 may run it again.
    install(0);
    lab.kubectl_ha_ok(&["--wait", "0", "clear", name, "-n", ha::SERVICE_NAMESPACE])
        .unwrap();
    let cleared = ha::wait_until(Duration::from_secs(20), || {
        let e = ha::node_entry(&lab, name, 1);
        e["permanentFailure"].is_null() && e["failCount"] == 0
    });
    assert!(
        cleared.is_some(),
        "the clear did not end node-1's failure: {}",
        ha::node_entry(&lab, name, 1)
    );
    ha::request_move(&lab, name, 1).unwrap();
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(30));
    cleanup(&lab, name, vip);
}

/// Issue 10: enter scripts exiting 1 or 2 on every node make the service
/// `Errored`: stopped, no VIP anywhere, also once `failureTimeoutSeconds`
/// has passed; fixed and cleared (`kubectl ha clear`), it runs again.
#[test]
fn enter_scripts_exiting_1_or_2_everywhere_keep_the_service_errored_until_cleared() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-errored", "198.18.0.136");
    let trace = lab.dir().join(format!("trace-{name}"));
    let install = |codes: [i32; 3]| {
        for i in 1..=3u8 {
            ha::install_hooks(
                &lab,
                i,
                name,
                &[
                    (
                        "E01server",
                        &ha::tracing_script(&trace, codes[usize::from(i) - 1]),
                    ),
                    ("L01server", &ha::tracing_script(&trace, 0)),
                ],
            )
            .unwrap();
        }
    };
    install([1, 2, 2]);
    ha::delete_service(&lab, name);
    ha::apply(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    assert!(all_ready(&lab, name, Duration::from_secs(20)));
    let mut spec = ha::service(name, name, &[&format!("{vip}/24")], Some(name), (3, 100));
    spec["spec"]["migrationThreshold"] = serde_json::json!(2);
    spec["spec"]["failureTimeoutSeconds"] = serde_json::json!(3);
    ha::apply(&lab, &spec).unwrap();
    let errored = ha::wait_until(Duration::from_secs(60), || {
        ha::service_status(&lab, name)["phase"] == "Errored"
    });
    assert!(
        errored.is_some(),
        "never Errored: {}",
        ha::service_status(&lab, name)
    );
    assert!(
        ha::vip_holders(vip).is_empty(),
        "an Errored service holds its VIP"
    );
    for i in 1..=3 {
        let entry = ha::node_entry(&lab, name, i);
        assert_eq!(entry["permanentFailure"], true, "node-{i}: {entry}");
        assert!(entry["failCount"].as_i64() >= Some(2), "node-{i}: {entry}");
    }
    // Past the failure timeout: still stopped, nothing entered again.
    let entries = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("E01server enter"))
            .count()
    };
    let before = entries();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(ha::service_status(&lab, name)["phase"], "Errored");
    assert!(ha::vip_holders(vip).is_empty());
    assert_eq!(
        entries(),
        before,
        "a node entered again after the failure timeout"
    );

    // Fixed and cleared: it runs again.
    install([0, 0, 0]);
    lab.kubectl_ha_ok(&["--wait", "0", "clear", name, "-n", ha::SERVICE_NAMESPACE])
        .unwrap();
    wait_active(&lab, name, vip, Duration::from_secs(40));
    cleanup(&lab, name, vip);
}

/// Issue 10: the primary node (`KUBEHA_PRIMARY_NODE`, takeback/giveaway on
/// it, takeover/giveback elsewhere) is the node placement puts first among
/// the actual members, and `KUBEHA_PEERS` the other members in that order:
/// under `Alphabetical` with members listed as node-3, node-1, node-2 it
/// is node-1, and it stays node-1 when the members come from a selector.
#[test]
fn the_primary_node_is_the_first_in_placement_order_for_listed_and_selected_members() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("op-primary", "198.18.0.137");
    let trace = lab.dir().join(format!("trace-{name}"));
    let script = format!(
        "#!/bin/sh\necho \"$(basename \"$0\") $1 $2 node=$KUBEHA_NODE primary=$KUBEHA_PRIMARY_NODE \
         peers=$KUBEHA_PEERS transition=$KUBEHA_TRANSITION\" >> {}\n",
        trace.display()
    );
    for i in 1..=3 {
        ha::install_hooks(&lab, i, name, &[("E01env", &script), ("L01env", &script)]).unwrap();
    }
    let _ = std::fs::remove_file(&trace);
    ha::delete_service(&lab, name);
    let mut cluster = ha::cluster(name, &[3, 1, 2], Timing::DEFAULT);
    cluster["spec"]["placement"] = serde_json::json!("Alphabetical");
    ha::apply(&lab, &cluster).unwrap();
    assert!(all_ready(&lab, name, Duration::from_secs(20)));
    ha::apply(
        &lab,
        &ha::service(name, name, &[&format!("{vip}/24")], Some(name), (3, 100)),
    )
    .unwrap();
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(30));
    let read = || std::fs::read_to_string(&trace).unwrap_or_default();
    let seen = |line: &str| {
        ha::wait_until(Duration::from_secs(10), || {
            read().lines().any(|l| l == line)
        })
        .is_some()
    };
    for line in [
        "E01env enter master node=node-1 primary=node-1 peers=node-2,node-3 transition=takeback",
        "E01env enter vicemaster node=node-2 primary=node-1 peers=node-1,node-3 transition=",
    ] {
        assert!(seen(line), "listed members: no {line:?} in:\n{}", read());
    }

    // The same nodes as selected members (no list).
    cluster["spec"]["members"] =
        serde_json::json!({"selector": {"matchLabels": {"kubeha.io/lab": "true"}}});
    ha::apply(&lab, &cluster).unwrap();
    let selected = ha::wait_until(Duration::from_secs(20), || {
        lab.kubectl_ok(&[
            "get",
            "hacluster",
            name,
            "-o",
            "jsonpath={.spec.members.nodes}",
        ])
        .is_ok_and(|n| n.trim().is_empty())
            && ha::members_ready(&lab, name, 3)
    });
    assert!(
        selected.is_some(),
        "the selected members never all heartbeat"
    );
    let _ = std::fs::remove_file(&trace);
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(30));
    for line in [
        "L01env leave master node=node-1 primary=node-1 peers=node-2,node-3 transition=giveaway",
        "E01env enter master node=node-2 primary=node-1 peers=node-1,node-3 transition=takeover",
    ] {
        assert!(seen(line), "selected members: no {line:?} in:\n{}", read());
    }
    cleanup(&lab, name, vip);
}
