//! Administrative modes as StorNext's HA manager defines them, and the
//! whole-cluster commands `kubectl ha stop`, `start` and `config`, against
//! the real operator and agents on three lab nodes. Tests share the lab and
//! run one at a time; each uses its own cluster and service names.

use std::sync::{Mutex, Once};
use std::time::Duration;

use kubeha_e2e::ha::{self, SERVICE_NAMESPACE, Timing};
use kubeha_e2e::lab::{Lab, StopSignal};

static SERIAL: Mutex<()> = Mutex::new(());

static RESTART: Once = Once::new();

/// The lab with three nodes, their agents and operator replica 0, which is
/// restarted once per run, as are the agents, so they are the binaries
/// just built (the lab's processes outlive a test run).
fn lab() -> Lab {
    let lab = ha::operator_lab(3).expect("the lab with three nodes and the operator must come up");
    RESTART.call_once(|| {
        lab.stop_operator(0, StopSignal::Term).unwrap();
        lab.start_operator(0, &[])
            .expect("operator replica 0 starts");
        for i in 1..=3 {
            lab.stop_agent(i, StopSignal::Term).unwrap();
            lab.start_agent(i, &[] as &[&str]).expect("agent starts");
        }
    });
    lab
}

/// A fresh cluster `name` of `members` with their modes, every member
/// heartbeating, then the services `(name, vip, preferred node)`.
fn fresh(lab: &Lab, name: &str, members: &[(u8, &str)], services: &[(&str, &str, Option<&str>)]) {
    let names: Vec<&str> = services.iter().map(|s| s.0).collect();
    let vips: Vec<&str> = services.iter().map(|s| s.1).collect();
    ha::remove_services_and_cluster(lab, &names, name, &vips).unwrap();
    ha::apply(lab, &ha::cluster_with_modes(name, members, Timing::DEFAULT)).unwrap();
    let count = members.len() as u8;
    assert!(
        ha::wait_until(Duration::from_secs(20), || ha::members_ready(
            lab, name, count
        ))
        .is_some(),
        "cluster {name} never had {count}/{count} members ready"
    );
    for (svc, vip, preferred) in services {
        let mut object = ha::service(svc, name, &[&format!("{vip}/24")], None, (3, 100));
        if let Some(p) = preferred {
            object["spec"]["preferredNodes"] = serde_json::json!([p]);
        }
        ha::apply(lab, &object).unwrap();
    }
}

/// `kubectl ha ARGS`: (exit code, stdout, stderr).
fn kubectl_ha(lab: &Lab, args: &[&str]) -> (i32, String, String) {
    let out = lab.kubectl_ha().unwrap().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spec_field(lab: &Lab, cluster: &str, path: &str) -> String {
    lab.kubectl_ok(&[
        "get",
        "hacluster",
        cluster,
        "-o",
        &format!("jsonpath={path}"),
    ])
    .unwrap_or_default()
    .trim()
    .to_owned()
}

/// Event reasons about `name` (cluster: namespace ""; service: the
/// services' namespace).
fn reasons(lab: &Lab, namespace: &str, name: &str) -> Vec<String> {
    ha::events_about(lab, namespace, name)
        .into_iter()
        .map(|(r, _)| r)
        .collect()
}

/// Lines in each node's fence log (the agent writes one per self-fence).
fn fence_lines(lab: &Lab) -> Vec<usize> {
    (1..=3)
        .map(|i| {
            std::fs::read_to_string(lab.dir().join(format!("nodes/node-{i}/logs/fence.log")))
                .map(|t| t.lines().count())
                .unwrap_or(0)
        })
        .collect()
}

/// Phase Suspended, no active node, every node's entry Stopped.
fn every_entry_stopped(lab: &Lab, svc: &str) -> bool {
    let st = ha::service_status(lab, svc);
    st["phase"] == "Suspended"
        && st["activeNode"].is_null()
        && st["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().all(|e| e["state"] == "Stopped"))
}

#[test]
fn stop_then_start_a_three_node_cluster_with_two_services() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "md-stop";
    let (a, b) = (("md-stop-a", "198.18.0.121"), ("md-stop-b", "198.18.0.122"));
    fresh(
        &lab,
        name,
        &[(1, "default"), (2, "default"), (3, "locked")],
        &[(a.0, a.1, None), (b.0, b.1, Some("node-2"))],
    );
    ha::wait_active_on(&lab, a.0, a.1, 1, Duration::from_secs(30)).unwrap();
    ha::wait_active_on(&lab, b.0, b.1, 2, Duration::from_secs(30)).unwrap();
    let sampler = ha::SplitBrain::start_many(&[a.1, b.1], &[]);
    let fenced_before = fence_lines(&lab);

    let (code, out, err) = kubectl_ha(&lab, &["--wait", "60", "stop", "--cluster", name]);
    assert_eq!(code, 0, "kubectl ha stop failed: {out}\n{err}");
    // When stop returns, every leave has returned: nobody holds a VIP and
    // every node reports the services Stopped.
    for (svc, vip) in [a, b] {
        assert!(
            ha::vip_holders(vip).is_empty(),
            "{vip} still held after stop: {:?}",
            ha::vip_holders(vip)
        );
        assert!(
            every_entry_stopped(&lab, svc),
            "{svc} after stop: {}",
            ha::service_status(&lab, svc)
        );
    }
    assert_eq!(spec_field(&lab, name, "{.spec.stopped}"), "true");
    assert_eq!(
        spec_field(&lab, name, "{.spec.members.nodes[*].mode}"),
        "default default default",
        "every member back to default"
    );
    // Stopped stays stopped: nothing is placed again.
    std::thread::sleep(Duration::from_secs(5));
    for (svc, vip) in [a, b] {
        assert!(ha::vip_holders(vip).is_empty(), "{vip} taken while stopped");
        assert!(
            every_entry_stopped(&lab, svc),
            "{svc} while stopped: {}",
            ha::service_status(&lab, svc)
        );
    }
    assert!(
        ha::members_ready(&lab, name, 3),
        "members keep heartbeating while stopped"
    );

    let (code, out, err) = kubectl_ha(&lab, &["--wait", "60", "start", "--cluster", name]);
    assert_eq!(code, 0, "kubectl ha start failed: {out}\n{err}");
    // Placement picks again: Ordered, node-1 first; b prefers node-2.
    ha::wait_active_on(&lab, a.0, a.1, 1, Duration::from_secs(30)).unwrap();
    ha::wait_active_on(&lab, b.0, b.1, 2, Duration::from_secs(30)).unwrap();
    assert_eq!(spec_field(&lab, name, "{.spec.stopped}"), "");

    sampler
        .stop()
        .assert_single_holder(&format!("{} and {}", a.1, b.1), "kubectl ha stop and start");
    // No fence, no failure.
    assert_eq!(fence_lines(&lab), fenced_before, "a node fenced itself");
    for svc in [a.0, b.0] {
        let r = reasons(&lab, SERVICE_NAMESPACE, svc);
        assert!(
            !r.iter()
                .any(|r| r == "Fenced" || r == "HookFailed" || r == "Errored"),
            "{svc}: {r:?}"
        );
        let st = ha::service_status(&lab, svc);
        assert!(
            st["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["state"] != "Failed"),
            "{svc}: {st}"
        );
    }
    ha::remove_services_and_cluster(&lab, &[a.0, b.0], name, &[a.1, b.1]).unwrap();
}

#[test]
fn config_is_refused_while_a_peer_is_default_and_accepted_once_it_is_locked() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "md-config";
    let (svc, vip) = ("md-config", "198.18.0.123");
    fresh(
        &lab,
        name,
        &[(1, "default"), (2, "default")],
        &[(svc, vip, None)],
    );
    ha::wait_active_on(&lab, svc, vip, 1, Duration::from_secs(30)).unwrap();

    let (code, out, err) = kubectl_ha(
        &lab,
        &["--wait", "5", "config", "node-1", "--cluster", name],
    );
    assert_ne!(code, 0, "config accepted while node-2 is default: {out}");
    assert!(
        err.contains("node-2 is in mode default")
            && err.contains(&format!("kubectl ha mode node-2 locked --cluster {name}")),
        "the refusal must name node-2 and the command: {err}"
    );
    assert_eq!(
        spec_field(&lab, name, "{.spec.members.nodes[0].mode}"),
        "default"
    );

    lab.kubectl_ha_ok(&[
        "--wait",
        "10",
        "mode",
        "node-2",
        "locked",
        "--cluster",
        name,
    ])
    .unwrap();
    let (code, out, err) = kubectl_ha(
        &lab,
        &["--wait", "10", "config", "node-1", "--cluster", name],
    );
    assert_eq!(
        code, 0,
        "config refused after node-2 was locked: {out}\n{err}"
    );
    assert_eq!(
        spec_field(&lab, name, "{.spec.members.nodes[0].mode}"),
        "config"
    );
    ha::wait_active_on(&lab, svc, vip, 1, Duration::from_secs(10)).unwrap();

    // config returns to default only with the services stopped.
    let (code, _, err) = kubectl_ha(
        &lab,
        &[
            "--wait",
            "5",
            "mode",
            "node-1",
            "default",
            "--cluster",
            name,
        ],
    );
    assert_ne!(
        code, 0,
        "config -> default accepted with the service running"
    );
    assert!(
        err.contains(&format!("kubectl ha stop --cluster {name}")),
        "{err}"
    );
    let (code, out, err) = kubectl_ha(&lab, &["--wait", "60", "stop", "--cluster", name]);
    assert_eq!(code, 0, "stop: {out}\n{err}");
    ha::remove_services_and_cluster(&lab, &[svc], name, &[vip]).unwrap();
}

#[test]
fn a_locked_peer_that_stops_heartbeating_moves_config_to_default_and_stops_the_services() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "md-lostlock";
    let (svc, vip) = ("md-lostlock", "198.18.0.124");
    fresh(
        &lab,
        name,
        &[(1, "config"), (2, "locked")],
        &[(svc, vip, None)],
    );
    ha::wait_active_on(&lab, svc, vip, 1, Duration::from_secs(30)).unwrap();
    let sampler = ha::SplitBrain::start(vip, &[]);

    lab.power_off(2).unwrap();
    sampler.set_off(&[2]);
    // D + skew, then the operator repairs: config-locked with the locked
    // peer silent is config-default, a prohibited state.
    let repaired = ha::wait_until(Duration::from_secs(20), || {
        spec_field(&lab, name, "{.spec.members.nodes[0].mode}") == "default"
    });
    assert!(
        repaired.is_some(),
        "node-1 stayed in config beside a silent locked peer"
    );
    assert_eq!(
        spec_field(&lab, name, "{.spec.members.nodes[1].mode}"),
        "locked"
    );
    assert_eq!(
        spec_field(&lab, name, "{.spec.stopped}"),
        "true",
        "config returns to default stopped"
    );
    let left = ha::wait_until(Duration::from_secs(30), || {
        every_entry_stopped(&lab, svc) && ha::vip_holders(vip).is_empty()
    });
    assert!(
        left.is_some(),
        "the service did not stop: {}",
        ha::service_status(&lab, svc)
    );
    ha::wait_event_reasons(&lab, "", name, |r| ha::has_reason(r, "ProhibitedState"))
        .unwrap_or_else(|r| panic!("no ProhibitedState Event: {r:?}"));

    lab.power_on(2).unwrap();
    sampler.set_off(&[]);
    lab.start_agent(2, &[] as &[&str]).unwrap();
    sampler
        .stop()
        .assert_single_holder(vip, "a locked peer lost beside config");
    ha::remove_services_and_cluster(&lab, &[svc], name, &[vip]).unwrap();
}

/// In single (and config) HA monitoring is off: a failing monitor runs
/// not at all and moves nothing; back in default it runs and fails the
/// service on that node.
#[test]
fn no_monitor_runs_in_single_and_it_runs_again_in_default() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "md-monitor";
    let (svc, vip) = ("md-monitor", "198.18.0.125");
    let trace = lab.dir().join(format!("trace-{name}"));
    let _ = std::fs::remove_file(&trace);
    for i in 1..=2 {
        ha::install_hooks(
            &lab,
            i,
            name,
            &[
                ("E01server", &ha::tracing_script(&trace, 0)),
                ("L01server", &ha::tracing_script(&trace, 0)),
                ("M01server", &ha::tracing_script(&trace, 3)),
            ],
        )
        .unwrap();
    }
    ha::remove_services_and_cluster(&lab, &[svc], name, &[vip]).unwrap();
    ha::apply(
        &lab,
        &ha::cluster_with_modes(name, &[(1, "single"), (2, "locked")], Timing::DEFAULT),
    )
    .unwrap();
    assert!(ha::wait_until(Duration::from_secs(20), || ha::members_ready(&lab, name, 2)).is_some());
    let mut spec = ha::service(svc, name, &[&format!("{vip}/24")], Some(name), (3, 100));
    spec["spec"]["hooks"]["monitor"] =
        serde_json::json!({"intervalSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 2});
    ha::apply(&lab, &spec).unwrap();
    ha::wait_active_on(&lab, svc, vip, 1, Duration::from_secs(30)).unwrap();
    let monitors = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("M01server monitor"))
            .count()
    };
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(monitors(), 0, "a monitor ran in single mode");
    assert_eq!(
        ha::active_node(&lab, svc, vip),
        Some(1),
        "{}",
        ha::service_status(&lab, svc)
    );
    assert_eq!(
        ha::node_entry(&lab, svc, 1)["failCount"]
            .as_i64()
            .unwrap_or(0),
        0
    );

    // single -> default needs no stop; monitoring is on again.
    lab.kubectl_ha_ok(&[
        "--wait",
        "5",
        "mode",
        "node-1",
        "default",
        "--cluster",
        name,
    ])
    .unwrap();
    let ran = ha::wait_until(Duration::from_secs(15), || monitors() >= 2);
    assert!(ran.is_some(), "no monitor ran back in default");
    let failed = ha::wait_until(Duration::from_secs(15), || {
        ha::node_entry(&lab, svc, 1)["state"] == "Failed"
    });
    assert!(
        failed.is_some(),
        "the failing monitor did not fail the service in default: {}",
        ha::service_status(&lab, svc)
    );
    ha::remove_services_and_cluster(&lab, &[svc], name, &[vip]).unwrap();
}

/// A peerdown peer that starts heartbeating: its mark is erased, the
/// member in single goes to default, and the services stop (StorNext shuts
/// them down); `kubectl ha start` brings them back.
#[test]
fn a_returning_peerdown_peer_beside_single_resets_it_and_stops_the_services() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "md-return";
    let (svc, vip) = ("md-return", "198.18.0.126");
    ha::remove_services_and_cluster(&lab, &[svc], name, &[vip]).unwrap();
    lab.power_off(2).unwrap();
    let sampler = ha::SplitBrain::start(vip, &[2]);
    ha::apply(
        &lab,
        &ha::cluster_with_modes(name, &[(1, "single"), (2, "peerdown")], Timing::DEFAULT),
    )
    .unwrap();
    ha::apply(
        &lab,
        &ha::service(svc, name, &[&format!("{vip}/24")], None, (3, 100)),
    )
    .unwrap();
    ha::wait_active_on(&lab, svc, vip, 1, Duration::from_secs(30)).unwrap();

    lab.power_on(2).unwrap();
    sampler.set_off(&[]);
    lab.start_agent(2, &[] as &[&str]).unwrap();
    let reset = ha::wait_until(Duration::from_secs(20), || {
        spec_field(&lab, name, "{.spec.members.nodes[*].mode}") == "default default"
    });
    assert!(
        reset.is_some(),
        "modes after node-2 returned: {}",
        spec_field(&lab, name, "{.spec.members.nodes[*].mode}")
    );
    assert_eq!(spec_field(&lab, name, "{.spec.stopped}"), "true");
    let left = ha::wait_until(Duration::from_secs(30), || {
        every_entry_stopped(&lab, svc) && ha::vip_holders(vip).is_empty()
    });
    assert!(
        left.is_some(),
        "still running: {}",
        ha::service_status(&lab, svc)
    );
    ha::wait_event_reasons(&lab, "", name, |r| {
        ha::has_reason(r, "PeerReturned") && ha::has_reason(r, "ClusterStopped")
    })
    .unwrap_or_else(|r| panic!("{r:?}"));
    lab.kubectl_ha_ok(&["--wait", "30", "start", "--cluster", name])
        .unwrap();
    let active = ha::wait_until(Duration::from_secs(30), || {
        ha::active_node(&lab, svc, vip).is_some()
    });
    assert!(active.is_some(), "{}", ha::service_status(&lab, svc));
    sampler
        .stop()
        .assert_single_holder(vip, "a peerdown peer returning beside single");
    ha::remove_services_and_cluster(&lab, &[svc], name, &[vip]).unwrap();
}

/// StorNext: in single (and config) HA monitoring is off, so a node cut
/// off from the API server does not fence itself; it keeps the service.
/// Its peers must then never be let in on its Lost heartbeat alone, even
/// after an admin makes one eligible meanwhile: only a peerdown does.
#[test]
fn a_node_in_single_cut_off_keeps_its_service_and_a_peer_enters_only_after_peerdown() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "md-frozen";
    let (svc, vip) = ("md-frozen", "198.18.0.127");
    fresh(
        &lab,
        name,
        &[(1, "single"), (2, "locked")],
        &[(svc, vip, None)],
    );
    ha::wait_active_on(&lab, svc, vip, 1, Duration::from_secs(30)).unwrap();
    let sampler = ha::SplitBrain::start(vip, &[]);
    let fence_log = lab.dir().join("nodes/node-1/logs/fence.log");
    let fences = || {
        std::fs::read_to_string(&fence_log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let fences_before = fences();

    lab.partition(1).unwrap();
    // Past RD and past E: a node in default would have fenced itself and
    // be Lost by now.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        ha::vip_holders(vip),
        [1],
        "node-1 dropped its VIP in single"
    );
    assert_eq!(fences(), fences_before, "node-1 fenced itself in single");

    // An admin makes node-2 eligible while node-1 is cut off: node-1 still
    // believes it is in single and keeps the service, so node-2 must not
    // enter on node-1's Lost heartbeat.
    ha::apply(
        &lab,
        &ha::cluster_with_modes(name, &[(1, "default"), (2, "default")], Timing::DEFAULT),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(
        ha::vip_holders(vip),
        [1],
        "node-2 entered on the Lost heartbeat of a node that renewed in single: {}",
        ha::service_status(&lab, svc)
    );

    // The admin powers node-1 off and certifies it: node-2 takes over.
    lab.power_off(1).unwrap();
    sampler.set_off(&[1]);
    lab.kubectl_ha_ok(&["--wait", "0", "peerdown", "node-1", "--cluster", name])
        .unwrap();
    let moved = ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip) == [2]);
    assert!(moved.is_some(), "{}", ha::service_status(&lab, svc));
    sampler
        .stop()
        .assert_single_holder(vip, "a node in single cut off from the API server");

    lab.heal(1).unwrap();
    lab.power_on(1).unwrap();
    lab.start_agent(1, &[] as &[&str]).unwrap();
    ha::remove_services_and_cluster(&lab, &[svc], name, &[vip]).unwrap();
}
