//! The node-level admin requests against the real API server, operator and
//! agents on three lab nodes: `kubectl ha release NODE` (FreeHA's HUP),
//! `kubectl ha force-start SERVICE --on NODE` (FreeHA's USR1) and
//! `kubectl ha reset NODE force smith` (StorNext's force smith). Tests run
//! one at a time and use their own cluster, service names and VIPs.

use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use kubeha_e2e::ha::{self, Timing};
use kubeha_e2e::lab::{Lab, StopSignal};

static SERIAL: Mutex<()> = Mutex::new(());
static RESTART: Once = Once::new();

/// The lab with three nodes, an agent on each and operator replica 0, all
/// started from the binaries on disk once per run of this file (a lab left
/// up by an earlier build runs older code).
fn lab() -> Lab {
    let lab = Lab::of_this_checkout();
    lab.ensure_up_with_nodes(3)
        .expect("the lab with three nodes must come up");
    RESTART.call_once(|| {
        for i in 1..=3 {
            lab.stop_agent(i, StopSignal::Term).unwrap();
        }
        lab.stop_operator(0, StopSignal::Term).unwrap();
    });
    for i in 1..=3 {
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

/// Cluster `name` of nodes 1..=3 (all heartbeating) and one service per
/// VIP, named `name-<index>`, after removing what an earlier run left;
/// returns the service names.
fn fresh(lab: &Lab, name: &str, vips: &[&str], hooks: Option<&str>) -> Vec<String> {
    let services: Vec<String> = (0..vips.len()).map(|i| format!("{name}-{i}")).collect();
    for s in &services {
        ha::delete_service(lab, s);
    }
    for vip in vips {
        assert!(
            ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty()).is_some(),
            "{vip} still held from an earlier run"
        );
    }
    ha::apply(lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    assert!(
        ha::wait_until(Duration::from_secs(20), || ha::members_ready(lab, name, 3)).is_some(),
        "cluster {name} never had 3/3 members ready"
    );
    for (s, vip) in services.iter().zip(vips) {
        ha::apply(
            lab,
            &ha::service(s, name, &[&format!("{vip}/24")], hooks, (3, 100)),
        )
        .unwrap();
    }
    services
}

fn cleanup(lab: &Lab, name: &str, services: &[String], vips: &[&str]) {
    for s in services {
        ha::delete(lab, "haservice", s, Some(ha::SERVICE_NAMESPACE));
    }
    for vip in vips {
        let gone = ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty());
        assert!(
            gone.is_some(),
            "{vip} still held after the service was deleted"
        );
    }
    for s in services {
        ha::delete_service(lab, s);
    }
    ha::delete(lab, "hacluster", name, None);
}

fn wait_active_on(lab: &Lab, service: &str, vip: &str, node: u8, timeout: Duration) {
    let ok = ha::wait_until(timeout, || ha::active_node(lab, service, vip) == Some(node));
    assert!(
        ok.is_some(),
        "{service} never became Active on node-{node} alone within {timeout:?}: status {}, holders {:?}",
        ha::service_status(lab, service),
        ha::vip_holders(vip)
    );
}

/// The HACluster `name` as JSON.
fn cluster_json(lab: &Lab, name: &str) -> serde_json::Value {
    lab.kubectl_json(&["get", "hacluster", name]).unwrap()
}

/// Node `i`'s heartbeat in the status of cluster `name`.
fn heartbeat(lab: &Lab, name: &str, i: u8) -> String {
    cluster_json(lab, name)["status"]["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["node"] == format!("node-{i}"))
        .and_then(|m| m["heartbeat"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn condition(lab: &Lab, service: &str, type_: &str) -> Option<serde_json::Value> {
    ha::service_status(lab, service)["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// FreeHA's HUP: both services of node-1 move to node-2 through the
/// handover (never two holders), node-1 keeps heartbeating, and the
/// operator ends the release (annotation removed, Event Released).
#[test]
fn release_moves_every_service_of_the_node_elsewhere_and_its_agent_keeps_heartbeating() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "adm-release";
    let vips = ["198.18.0.171", "198.18.0.172"];
    let services = fresh(&lab, name, &vips, None);
    for (s, vip) in services.iter().zip(vips) {
        wait_active_on(&lab, s, vip, 1, Duration::from_secs(30));
    }

    let sampler = ha::SplitBrain::start_many(&vips, &[]);
    let asked = Instant::now();
    let printed = lab
        .kubectl_ha_ok(&["--wait", "30", "release", "node-1", "--cluster", name])
        .unwrap();
    let took = asked.elapsed();
    assert!(
        printed.contains("kubeha.io/release-node=node-1 set"),
        "kubectl ha release says what it wrote:\n{printed}"
    );
    for (s, vip) in services.iter().zip(vips) {
        wait_active_on(&lab, s, vip, 2, Duration::from_secs(20));
    }
    let seen = sampler.stop();
    for vip in vips {
        seen.assert_single_holder(vip, "kubectl ha release node-1");
    }
    eprintln!("release of node-1 with two services: kubectl returned after {took:?}");

    // The agent stayed: node-1 heartbeats, and the release is over.
    assert_eq!(heartbeat(&lab, name, 1), "Alive");
    assert!(ha::members_ready(&lab, name, 3));
    let annotations = cluster_json(&lab, name)["metadata"]["annotations"].clone();
    assert!(
        annotations.get("kubeha.io/release-node").is_none(),
        "the operator removes the release once done: {annotations}"
    );
    ha::wait_event_reasons(&lab, "default", name, |r| ha::has_reason(r, "Released"))
        .unwrap_or_else(|events| panic!("no Released Event: {events:?}"));
    // Failback Never: they stay on node-2 although node-1 is eligible again.
    std::thread::sleep(Duration::from_secs(3));
    for (s, vip) in services.iter().zip(vips) {
        assert_eq!(ha::active_node(&lab, s, vip), Some(2), "{s} moved back");
    }

    // Not a member: refused before anything is written.
    let out = lab
        .kubectl_ha()
        .unwrap()
        .args(["release", "node-9", "--cluster", name])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node-9 is not a member of HACluster"), "{err}");
    cleanup(&lab, name, &services, &vips);
}

/// FreeHA's USR1: node-1's enter hook failed, so placement keeps the
/// service off node-1; a force start runs it there anyway (node-2 leaves
/// first: never two holders), with the loud warning, the ForceStarted
/// condition and Event, until `kubectl ha clear` removes them.
#[test]
fn force_start_runs_the_service_on_a_failed_node_until_clear() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "adm-force";
    let vip = "198.18.0.173";
    let trace = lab.dir().join(format!("trace-{name}"));
    let install = |failing: &[u8]| {
        for i in 1..=3 {
            // Exit 3: an ordinary failure (1 and 2 are permanent for the node).
            let code = if failing.contains(&i) { 3 } else { 0 };
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
    let services = fresh(&lab, name, &[vip], Some(name));
    let svc = services[0].as_str();
    wait_active_on(&lab, svc, vip, 2, Duration::from_secs(40));
    assert!(
        ha::node_entry(&lab, svc, 1)["failCount"].as_i64() >= Some(1),
        "node-1 failed: {}",
        ha::service_status(&lab, svc)
    );

    // Fixed on node-1, but its failure still keeps placement off it.
    install(&[]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ha::active_node(&lab, svc, vip), Some(2));

    let sampler = ha::SplitBrain::start(vip, &[]);
    let out = lab
        .kubectl_ha()
        .unwrap()
        .args([
            "--wait",
            "30",
            "force-start",
            svc,
            "--on",
            "node-1",
            "-n",
            ha::SERVICE_NAMESPACE,
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("WARNING: FORCE START"),
        "loud warning: {stderr}"
    );
    wait_active_on(&lab, svc, vip, 1, Duration::from_secs(20));
    let seen = sampler.stop();
    seen.assert_single_holder(vip, "force start on node-1");
    let forced = condition(&lab, svc, "ForceStarted").expect("a ForceStarted condition");
    assert_eq!(forced["status"], "True", "{forced}");
    ha::wait_event_reasons(&lab, ha::SERVICE_NAMESPACE, svc, |r| {
        ha::has_reason(r, "ForceStarted")
    })
    .unwrap_or_else(|events| panic!("no ForceStarted Event: {events:?}"));
    // It stays: a while later the condition is still there.
    std::thread::sleep(Duration::from_secs(2));
    assert!(condition(&lab, svc, "ForceStarted").is_some());

    // A node that is not a member is refused by kubectl.
    let out = lab
        .kubectl_ha()
        .unwrap()
        .args([
            "force-start",
            svc,
            "--on",
            "node-9",
            "-n",
            ha::SERVICE_NAMESPACE,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // clear: the request, the condition and the failures go; it stays on
    // node-1 (failback Never).
    lab.kubectl_ha_ok(&["--wait", "20", "clear", svc, "-n", ha::SERVICE_NAMESPACE])
        .unwrap();
    let gone = ha::wait_until(Duration::from_secs(20), || {
        condition(&lab, svc, "ForceStarted").is_none()
    });
    assert!(
        gone.is_some(),
        "ForceStarted stays after clear: {}",
        ha::service_status(&lab, svc)
    );
    let svc_json = lab
        .kubectl_json(&["get", "haservice", svc, "-n", ha::SERVICE_NAMESPACE])
        .unwrap();
    assert!(
        svc_json["metadata"]["annotations"]
            .get("kubeha.io/force-start")
            .is_none()
    );
    assert_eq!(
        ha::node_entry(&lab, svc, 1)["failCount"]
            .as_i64()
            .unwrap_or(0),
        0
    );
    assert_eq!(ha::active_node(&lab, svc, vip), Some(1));
    cleanup(&lab, name, &services, &[vip]);
}

/// StorNext's force smith: without the two words nothing is written; with
/// them node-1 fences itself at once (its VIP gone long before its
/// heartbeat expires), the operator sees it Lost/Fenced and the service
/// moves to node-2; node-1 heartbeats again after the hold, and a
/// restarted agent does not act on the same request again.
#[test]
fn reset_fences_the_node_at_once_and_the_service_moves() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let name = "adm-reset";
    let vip = "198.18.0.174";
    let services = fresh(&lab, name, &[vip], None);
    let svc = services[0].as_str();
    wait_active_on(&lab, svc, vip, 1, Duration::from_secs(30));

    let out = lab
        .kubectl_ha()
        .unwrap()
        .args(["reset", "node-1", "--cluster", name])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kubectl ha reset node-1 force smith"), "{err}");
    assert!(
        cluster_json(&lab, name)["metadata"]["annotations"]
            .get("kubeha.io/reset-node")
            .is_none(),
        "nothing written without the confirmation"
    );

    let sampler = ha::SplitBrain::start(vip, &[]);
    let asked = Instant::now();
    let child = lab
        .kubectl_ha()
        .unwrap()
        .args([
            "--wait",
            "20",
            "reset",
            "node-1",
            "force",
            "smith",
            "--cluster",
            name,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The VIP leaves node-1 at once, well before D (3 s) would fence it.
    let dropped = ha::wait_until(Duration::from_secs(3), || {
        !ha::vip_holders(vip).contains(&1)
    });
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dropped = dropped.expect("node-1 kept its VIP after the reset");
    eprintln!(
        "reset: node-1's VIP gone {dropped:?} after kubectl ha reset started; kubectl returned after {:?}",
        asked.elapsed()
    );
    wait_active_on(&lab, svc, vip, 2, Duration::from_secs(20));
    let seen = sampler.stop();
    seen.assert_single_holder(vip, "kubectl ha reset node-1");
    ha::wait_event_reasons(&lab, "default", name, |r| ha::has_reason(r, "Reset"))
        .unwrap_or_else(|events| panic!("no Reset Event: {events:?}"));

    // The hold ends: node-1 heartbeats again; the service stays on node-2.
    assert!(
        ha::wait_until(Duration::from_secs(20), || heartbeat(&lab, name, 1)
            == "Alive")
        .is_some(),
        "node-1 never heartbeat again after the reset"
    );
    // The operator removes the request once node-1 stopped heartbeating,
    // so a node whose reset log is lost does not act on it again.
    let annotation = || {
        cluster_json(&lab, name)["metadata"]["annotations"]
            .get("kubeha.io/reset-node")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    assert!(
        ha::wait_until(Duration::from_secs(10), || annotation().is_none()).is_some(),
        "the reset request stayed: {:?}",
        annotation()
    );
    ha::wait_event_reasons(&lab, "default", name, |r| ha::has_reason(r, "ResetDone"))
        .unwrap_or_else(|events| panic!("no ResetDone Event: {events:?}"));
    // Once per request: the request written again by hand (the id the
    // agent's reset log recorded), a restarted agent sees it and does not
    // fence again.
    let log = std::fs::read_to_string(lab.node_dir(1).join("logs").join("reset-requests.log"))
        .expect("node-1's reset log");
    let id = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .expect("the request in node-1's reset log")
        .to_owned();
    lab.kubectl_ok(&[
        "annotate",
        "hacluster",
        name,
        &format!("kubeha.io/reset-node=node-1/{id}"),
    ])
    .unwrap();
    lab.stop_agent(1, StopSignal::Term).unwrap();
    lab.start_agent(1, &[] as &[&str]).unwrap();
    assert!(
        ha::wait_until(Duration::from_secs(20), || heartbeat(&lab, name, 1)
            == "Alive")
        .is_some()
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            heartbeat(&lab, name, 1),
            "Alive",
            "node-1 fenced again for the same request"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(ha::active_node(&lab, svc, vip), Some(2));
    cleanup(&lab, name, &services, &[vip]);
}
