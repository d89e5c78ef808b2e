//! Agent behaviours of the seed manuals that unit tests alone proved (issue
//! 10), each shown here against the real API server and kernel, with the
//! operator and a real agent on three lab nodes: what a user sees (VIP
//! holders, routes in the node's namespace, what the scripts record, the
//! service's status, the agents' `/metrics`). Tests share the lab and run
//! one at a time; each has its own cluster, service and VIPs
//! (198.18.0.180-189, 2001:db8::180-189).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use kubeha_e2e::ha::{self, Timing};
use kubeha_e2e::lab::Lab;
use kubeha_e2e::nodes;

static SERIAL: Mutex<()> = Mutex::new(());

/// The lab with three nodes, an agent on each and operator replica 0.
fn lab() -> Lab {
    ha::operator_lab(3).expect("the lab with three nodes and the operator must come up")
}

/// Applies `cluster` (an HACluster of nodes 1..=3) and, once every member
/// heartbeats, `service`; what an earlier run left of the service goes
/// first, and its VIPs `vips` must be free.
fn fresh(lab: &Lab, cluster: &Value, service: &Value, vips: &[&str]) {
    let name = service["metadata"]["name"].as_str().unwrap();
    ha::delete_service(lab, name);
    assert!(
        ha::wait_until(Duration::from_secs(20), || vips
            .iter()
            .all(|v| ha::vip_holders(v).is_empty()))
        .is_some(),
        "{vips:?} still held from an earlier run"
    );
    ha::apply(lab, cluster).unwrap();
    let cluster_name = cluster["metadata"]["name"].as_str().unwrap();
    assert!(
        ha::wait_until(Duration::from_secs(20), || ha::members_ready(
            lab,
            cluster_name,
            3
        ))
        .is_some(),
        "cluster {cluster_name} never had 3/3 members ready"
    );
    ha::apply(lab, service).unwrap();
}

/// Deletes service and cluster `name` (the operator gives the service
/// away first); none of `vips` may stay held.
fn cleanup(lab: &Lab, name: &str, vips: &[&str]) {
    ha::remove_services_and_cluster(lab, &[name], name, vips).unwrap();
}

/// [`ha::wait_active_on`], failing the test when it does not happen.
fn wait_active_on(lab: &Lab, name: &str, vip: &str, node: u8, timeout: Duration) {
    ha::wait_active_on(lab, name, vip, node, timeout).unwrap();
}

/// A trace file the test's scripts append one line to per run.
struct Trace(PathBuf);

impl Trace {
    /// `trace-NAME` in the lab folder, emptied.
    fn new(lab: &Lab, name: &str) -> Trace {
        let path = lab.dir().join(format!("trace-{name}"));
        let _ = std::fs::remove_file(&path);
        Trace(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Every line written so far.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Index of the first line at or after `from` that contains every one
    /// of `parts`.
    fn find_from(&self, from: usize, parts: &[&str]) -> Option<usize> {
        self.lines()
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| parts.iter().all(|p| l.contains(p)))
            .map(|(i, _)| i)
    }

    /// How many lines contain every one of `parts`.
    fn count(&self, parts: &[&str]) -> usize {
        self.lines()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// Waits up to `timeout` for a line at or after `from` with every one
    /// of `parts`; returns its index or fails naming what was written.
    fn wait_for(&self, from: usize, parts: &[&str], timeout: Duration) -> usize {
        let mut found = None;
        ha::wait_until(timeout, || {
            found = self.find_from(from, parts);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no line with {parts:?} after line {from} within {timeout:?}:\n{}",
                self.lines().join("\n")
            )
        })
    }
}

/// A hook script appending `NAME ACTION ROLE node=... transition=...
/// epoch=... checksum=... service=...` to `trace` (plus `extra`, a shell
/// line run after), exit 0.
fn trace_script(trace: &Trace, extra: &str) -> String {
    format!(
        "#!/bin/sh\necho \"$(basename \"$0\") $1 $2 node=$KUBEHA_NODE transition=$KUBEHA_TRANSITION \
         epoch=$KUBEHA_EPOCH checksum=$KUBEHA_CONFIG_CHECKSUM service=$KUBEHA_SERVICE\" >> '{}'\n\
         echo \"ran $(basename \"$0\") $1 $2\"\n{extra}\nexit 0\n",
        trace.path().display()
    )
}

/// The usual setup of a test: trace `trace-NAME`, a hook folder `name` on
/// nodes 1..=3 holding `scripts` (file name, [`trace_script`] extra line),
/// and cluster and service `name` (default timing, IPv4 VIP `vip`/24,
/// hooks from that folder, one GARP), to adjust and pass to [`fresh`].
fn traced(lab: &Lab, name: &str, vip: &str, scripts: &[(&str, &str)]) -> (Trace, Value, Value) {
    let trace = Trace::new(lab, name);
    let bodies: Vec<(&str, String)> = scripts
        .iter()
        .map(|(file, extra)| (*file, trace_script(&trace, extra)))
        .collect();
    let files: Vec<(&str, &str)> = bodies.iter().map(|(f, b)| (*f, b.as_str())).collect();
    for i in 1..=3 {
        ha::install_hooks(lab, i, name, &files).unwrap();
    }
    let cluster = ha::cluster(name, &[1, 2, 3], Timing::DEFAULT);
    let service = ha::service(name, name, &[&format!("{vip}/24")], Some(name), (1, 100));
    (trace, cluster, service)
}

/// `ip route show default` in node `i`'s namespace.
fn default_routes(i: u8) -> String {
    let out = Command::new("ip")
        .args(["-n", &nodes::node_ns(i), "route", "show", "default"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Node `i`'s agent's `/metrics` text (empty when it does not answer).
fn agent_metrics(i: u8) -> String {
    kubeha_e2e::lab::http_get(&format!("{}:9465", nodes::node_ip(i).unwrap()), "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// The value of the sample of `metric` in `text` whose labels include
/// every `(name, value)` of `labels`; `None` when there is no such series.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(metric))
        .find(|l| {
            let set = l.split_once('{').map_or("", |(_, r)| r);
            let set = set.rsplit_once('}').map_or("", |(s, _)| s);
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The checksum the agent gives scripts for HAService `name`'s spec as the
/// API server has it now (`KUBEHA_CONFIG_CHECKSUM`).
fn spec_checksum(lab: &Lab, name: &str) -> String {
    let svc = lab
        .kubectl_json(&["get", "haservice", name, "-n", ha::SERVICE_NAMESPACE])
        .unwrap();
    kubeha_agent::daemon::spec_checksum(&serde_json::from_value(svc["spec"].clone()).unwrap())
}

/// Issue 10, items 1 and 10: monitor failures reaching `failureThreshold`
/// in a row move the service (one failure followed by a success does not),
/// and each agent's `/metrics` shows its role, the VIPs it holds with their
/// address and interface, and the fail count the status has.
#[test]
fn monitor_failures_reaching_the_threshold_move_the_service_and_the_agent_metrics_follow() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, v4, v6) = ("seed-monitor", "198.18.0.180", "2001:db8::180");
    let key = format!("{}/{name}", ha::SERVICE_NAMESPACE);
    let trace = Trace::new(&lab, name);
    // The "service" of node i runs while its marker exists.
    let running = |i: u8| lab.dir().join(format!("running-{name}-node-{i}"));
    let markers = lab.dir().join(format!("running-{name}-"));
    for i in 1..=3 {
        let _ = std::fs::remove_file(running(i));
        let monitor = format!(
            "#!/bin/sh\nif test -e '{m}'$KUBEHA_NODE; then r=ok; else r=fail; fi\n\
             echo \"M01check $1 $2 node=$KUBEHA_NODE result=$r\" >> '{t}'\ntest $r = ok || exit 7\n",
            m = markers.display(),
            t = trace.path().display()
        );
        ha::install_hooks(
            &lab,
            i,
            name,
            &[
                (
                    "E01server",
                    &trace_script(
                        &trace,
                        &format!("touch '{}'$KUBEHA_NODE", markers.display()),
                    ),
                ),
                (
                    "L01server",
                    &trace_script(
                        &trace,
                        &format!("rm -f '{}'$KUBEHA_NODE", markers.display()),
                    ),
                ),
                ("M01check", &monitor),
            ],
        )
        .unwrap();
    }
    let cluster = ha::cluster(name, &[1, 2, 3], Timing::DEFAULT);
    let mut service = ha::service(
        name,
        name,
        &[&format!("{v4}/24"), &format!("{v6}/64")],
        Some(name),
        (1, 100),
    );
    service["spec"]["hooks"]["monitor"] =
        json!({"intervalSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 3});
    fresh(&lab, &cluster, &service, &[v4, v6]);
    wait_active_on(&lab, name, v4, 1, Duration::from_secs(30));
    assert!(ha::vip_on_node(1, v6), "node-1 lacks the IPv6 VIP");
    assert!(running(1).exists(), "the enter hook started nothing");

    // The metrics of the active node and of the standby.
    let role = |text: &str, role: &str| {
        sample(
            text,
            "kubeha_agent_service_role",
            &[("service", &key), ("cluster", name), ("role", role)],
        )
    };
    let vip_held = |text: &str, addr: &str| {
        sample(
            text,
            "kubeha_agent_vip_held",
            &[("service", &key), ("address", addr), ("interface", "eth0")],
        )
    };
    let fail_count = |text: &str| {
        sample(
            text,
            "kubeha_agent_service_fail_count",
            &[("service", &key), ("cluster", name)],
        )
    };
    let settled = ha::wait_until(Duration::from_secs(10), || {
        let (one, two) = (agent_metrics(1), agent_metrics(2));
        role(&one, "master") == Some(1.0) && role(&two, "vicemaster") == Some(1.0)
    });
    let (one, two) = (agent_metrics(1), agent_metrics(2));
    assert!(
        settled.is_some(),
        "roles never showed in /metrics:\nnode-1:\n{one}\nnode-2:\n{two}"
    );
    assert_eq!(
        (role(&one, "vicemaster"), role(&one, "none")),
        (Some(0.0), Some(0.0)),
        "{one}"
    );
    assert_eq!(
        (role(&two, "master"), role(&two, "none")),
        (Some(0.0), Some(0.0)),
        "{two}"
    );
    assert_eq!(vip_held(&one, v4), Some(1.0), "{one}");
    assert_eq!(vip_held(&one, v6), Some(1.0), "{one}");
    assert!(
        sample(&one, "kubeha_agent_vips_held", &[]).is_some_and(|n| n >= 2.0),
        "{one}"
    );
    assert_eq!(
        (vip_held(&two, v4), vip_held(&two, v6)),
        (None, None),
        "the standby exports no VIP of the service:\n{two}"
    );
    assert_eq!((fail_count(&one), fail_count(&two)), (Some(0.0), Some(0.0)));

    // One failure, then the service runs again: no move.
    std::fs::remove_file(running(1)).unwrap();
    let failed = trace.wait_for(
        0,
        &["M01check monitor master node=node-1 result=fail"],
        Duration::from_secs(5),
    );
    std::fs::write(running(1), "").unwrap();
    let ok = trace.wait_for(
        failed + 1,
        &["M01check monitor master node=node-1 result=ok"],
        Duration::from_secs(5),
    );
    let between = trace.lines()[failed..ok].to_vec();
    assert!(
        between.iter().filter(|l| l.contains("result=fail")).count() < 3,
        "{between:#?}"
    );
    assert_eq!(
        ha::active_node(&lab, name, v4),
        Some(1),
        "one failed monitor run moved the service"
    );

    // Down for good: the third failure in a row moves it.
    let before = trace.lines().len();
    std::fs::remove_file(running(1)).unwrap();
    let down = Instant::now();
    wait_active_on(&lab, name, v4, 2, Duration::from_secs(30));
    let moved = down.elapsed();
    let lines = trace.lines();
    let leave = trace.wait_for(
        before,
        &["L01server leave master node=node-1"],
        Duration::from_secs(1),
    );
    // A run that read the marker just before it went may still say ok.
    let runs: Vec<&String> = lines[before..leave]
        .iter()
        .filter(|l| l.contains("M01check") && l.contains("node=node-1"))
        .collect();
    let last_ok = runs.iter().rposition(|l| l.ends_with("result=ok"));
    let fails = &runs[last_ok.map_or(0, |i| i + 1)..];
    assert_eq!(
        fails.len(),
        3,
        "node-1 must leave after exactly failureThreshold (3) failed runs:\n{}",
        lines.join("\n")
    );
    assert!(
        fails.iter().all(|l| l.ends_with("result=fail")),
        "{fails:#?}"
    );
    assert!(
        moved >= Duration::from_secs(2),
        "three runs one second apart took {moved:?}"
    );
    assert!(ha::vip_on_node(2, v6) && !ha::vip_on_node(1, v6));
    let entry = ha::node_entry(&lab, name, 1);
    assert_eq!(entry["state"], "Failed", "{entry}");
    let count = entry["failCount"].as_f64().unwrap_or_default();
    assert!(count >= 1.0, "{entry}");

    // The metrics follow: node-2 master with both VIPs, node-1 without
    // them and with the status's fail count.
    let followed = ha::wait_until(Duration::from_secs(10), || {
        let (one, two) = (agent_metrics(1), agent_metrics(2));
        role(&two, "master") == Some(1.0)
            && vip_held(&two, v4) == Some(1.0)
            && vip_held(&two, v6) == Some(1.0)
            && vip_held(&one, v4).is_none()
            && vip_held(&one, v6).is_none()
            && role(&one, "master") != Some(1.0)
            && fail_count(&one) == Some(count)
    });
    assert!(
        followed.is_some(),
        "metrics did not follow the move (node-1 failCount {count}):\nnode-1:\n{}\nnode-2:\n{}",
        agent_metrics(1),
        agent_metrics(2)
    );
    cleanup(&lab, name, &[v4, v6]);
    for i in 1..=3 {
        let _ = std::fs::remove_file(running(i));
    }
}

/// Issue 10, items 2 and 9: periodic scripts run on the active node with
/// `master` and on the standby with `vicemaster`, and follow a move; every
/// script sees `KUBEHA_CONFIG_CHECKSUM` of the spec the agent acts on (a
/// spec edit changes it); leaving master on the backup node is a
/// `giveback`, as IRIS FailSafe names it (giveaway on the primary,
/// takeover and takeback for the entries).
#[test]
fn periodic_hooks_run_with_each_role_and_scripts_see_giveback_and_the_config_checksum() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("seed-periodic", "198.18.0.181");
    let (trace, cluster, mut service) = traced(
        &lab,
        name,
        vip,
        &[("E01server", ""), ("L01server", ""), ("P01check", "")],
    );
    service["spec"]["hooks"]["periodic"] = json!({"intervalSeconds": 1, "timeoutSeconds": 3});
    fresh(&lab, &cluster, &service, &[vip]);
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(30));
    let first = spec_checksum(&lab, name);
    for (node, role) in [("node=node-1", "master"), ("node=node-2", "vicemaster")] {
        let at = trace.wait_for(
            0,
            &[&format!("P01check periodic {role} "), node],
            Duration::from_secs(5),
        );
        trace.wait_for(
            at + 1,
            &[&format!("P01check periodic {role} "), node],
            Duration::from_secs(5),
        );
    }
    assert_eq!(
        trace.count(&["P01check periodic vicemaster", "node=node-1"])
            + trace.count(&["P01check periodic master", "node=node-2"]),
        0,
        "{:#?}",
        trace.lines()
    );
    let lines = trace.lines();
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!("checksum={first} "))),
        "every script sees the checksum of the spec ({first}):\n{}",
        lines.join("\n")
    );

    // A planned move to node-2: the roles of the periodic scripts follow.
    let mark = trace.lines().len();
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(20));
    trace.wait_for(
        mark,
        &[
            "L01server leave master",
            "node=node-1",
            "transition=giveaway ",
        ],
        Duration::from_secs(5),
    );
    trace.wait_for(
        mark,
        &[
            "E01server enter master",
            "node=node-2",
            "transition=takeover ",
        ],
        Duration::from_secs(5),
    );
    let entered = trace.lines().len();
    trace.wait_for(
        entered,
        &["P01check periodic master", "node=node-2"],
        Duration::from_secs(5),
    );
    trace.wait_for(
        entered,
        &["P01check periodic vicemaster", "node=node-1"],
        Duration::from_secs(5),
    );

    // A spec edit changes the checksum the next transition's scripts see;
    // the move back makes node-2's leave a giveback.
    service["spec"]["hooks"]["env"] = json!([{"name": "SEED", "value": "2"}]);
    ha::apply(&lab, &service).unwrap();
    let second = spec_checksum(&lab, name);
    assert_ne!(first, second, "a spec edit must change the checksum");
    let mark = trace.lines().len();
    ha::request_move(&lab, name, 1).unwrap();
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(20));
    trace.wait_for(
        mark,
        &[
            "L01server leave master",
            "node=node-2",
            "transition=giveback ",
        ],
        Duration::from_secs(5),
    );
    trace.wait_for(
        mark,
        &[
            "E01server enter master",
            "node=node-1",
            "transition=takeback ",
            &format!("checksum={second} "),
        ],
        Duration::from_secs(5),
    );
    let after = trace.lines().len();
    trace.wait_for(
        after,
        &[
            "P01check periodic master",
            "node=node-1",
            &format!("checksum={second} "),
        ],
        Duration::from_secs(5),
    );
    // Monitor and periodic scripts never carry a transition.
    assert!(
        trace
            .lines()
            .iter()
            .filter(|l| l.contains(" periodic "))
            .all(|l| l.contains(" transition= ")),
        "{:#?}",
        trace.lines()
    );
    cleanup(&lab, name, &[vip]);
}

/// Issue 10, items 3 and 8: `spec.defaultRoute` is added in the active
/// node's namespace on entry and removed on leave; the IPv6 VIP leaves
/// with the IPv4 one, on a planned move and when the service is deleted.
#[test]
fn the_default_route_and_the_ipv6_vip_follow_the_active_node_and_go_on_leave() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, v4, v6, gateway) = (
        "seed-route",
        "198.18.0.182",
        "2001:db8::182",
        "198.18.0.254",
    );
    let cluster = ha::cluster(name, &[1, 2, 3], Timing::DEFAULT);
    let mut service = ha::service(
        name,
        name,
        &[&format!("{v4}/24"), &format!("{v6}/64")],
        None,
        (1, 100),
    );
    service["spec"]["defaultRoute"] = json!({"gateway": gateway});
    let via = format!("default via {gateway} ");
    let routes = || (1..=3).map(default_routes).collect::<Vec<_>>();
    ha::delete_service(&lab, name);
    assert!(
        ha::wait_until(Duration::from_secs(20), || routes()
            .iter()
            .all(String::is_empty))
        .is_some(),
        "a lab node has a default route before the test: {:?}",
        routes()
    );
    fresh(&lab, &cluster, &service, &[v4, v6]);
    wait_active_on(&lab, name, v4, 1, Duration::from_secs(30));
    assert!(
        ha::wait_until(Duration::from_secs(5), || default_routes(1).contains(&via)).is_some(),
        "node-1 never got the default route: {:?}",
        routes()
    );
    assert!(ha::vip_on_node(1, v6), "node-1 lacks {v6}");
    assert_eq!(
        routes()[1..],
        ["", ""],
        "only the active node has the route"
    );

    let sampler = ha::SplitBrain::start_many(&[v4, v6], &[]);
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, v4, 2, Duration::from_secs(20));
    let moved = ha::wait_until(Duration::from_secs(5), || {
        ha::vip_holders(v6) == [2] && default_routes(2).contains(&via)
    });
    let sampled = sampler.stop();
    sampled.assert_single_holder(v4, "planned move node-1 -> node-2");
    sampled.assert_single_holder(v6, "planned move node-1 -> node-2");
    assert!(
        moved.is_some(),
        "{v6} holders {:?}, routes {:?}",
        ha::vip_holders(v6),
        routes()
    );
    let routes_now = routes();
    assert!(
        routes_now[0].is_empty() && routes_now[2].is_empty(),
        "node-1 left master but kept its default route: {routes_now:?}"
    );
    assert!(!ha::vip_on_node(1, v6), "node-1 kept {v6} after leaving");

    cleanup(&lab, name, &[v4, v6]);
    assert!(
        ha::wait_until(Duration::from_secs(5), || routes()
            .iter()
            .all(String::is_empty))
        .is_some(),
        "a default route outlived the service: {:?}",
        routes()
    );
}

/// Issue 10, item 4: hooks from a ConfigMap of the operator's namespace
/// that the cluster grants the service's namespace: the enter and leave
/// scripts run from it, and an edited ConfigMap is what the next
/// transition runs. (The hostile catalogue's
/// `hooks-configmap-same-name-two-namespaces` covers ConfigMaps of the
/// service's own namespace.)
#[test]
fn configmap_hooks_run_and_an_edited_configmap_runs_at_the_next_transition() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("seed-configmap", "198.18.0.183");
    let cm = "seed-configmap-hooks";
    let trace = Trace::new(&lab, name);
    let config_map = |version: &str| {
        let script = format!(
            "#!/bin/sh\necho \"{version} $(basename \"$0\") $1 $2 node=$KUBEHA_NODE\" >> '{}'\n",
            trace.path().display()
        );
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": cm, "namespace": ha::OPERATOR_NAMESPACE},
            "data": {"E01trace": script, "L01trace": script},
        })
    };
    ha::apply(&lab, &config_map("v1")).unwrap();
    let mut cluster = ha::cluster(name, &[1, 2, 3], Timing::DEFAULT);
    cluster["spec"]["allowedHookSources"] = json!({"namespaces": [
        {"namespace": ha::SERVICE_NAMESPACE, "configMaps": [cm]}
    ]});
    let mut service = ha::service(name, name, &[&format!("{vip}/24")], None, (1, 100));
    service["spec"]["hooks"] = json!({"source": {"configMap": cm}, "timeoutSeconds": 5});
    fresh(&lab, &cluster, &service, &[vip]);
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(30));
    trace.wait_for(
        0,
        &["v1 E01trace enter master node=node-1"],
        Duration::from_secs(5),
    );
    trace.wait_for(
        0,
        &["v1 E01trace enter vicemaster node=node-2"],
        Duration::from_secs(5),
    );

    ha::apply(&lab, &config_map("v2")).unwrap();
    let mark = trace.lines().len();
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(20));
    trace.wait_for(
        mark,
        &["L01trace leave master node=node-1"],
        Duration::from_secs(5),
    );
    trace.wait_for(
        mark,
        &["v2 E01trace enter master node=node-2"],
        Duration::from_secs(5),
    );
    assert_eq!(
        trace.count(&["v1 E01trace enter master node=node-2"]),
        0,
        "node-2 ran the ConfigMap's old script:\n{}",
        trace.lines().join("\n")
    );
    cleanup(&lab, name, &[vip]);
    ha::delete(&lab, "configmap", cm, Some(ha::OPERATOR_NAMESPACE));
}

/// Issue 10, item 5: the single-script layout (`spec.hooks.script`): the
/// one script is called `ACTION ROLE` for enter, leave, monitor and
/// periodic with the role of each node; other files of the folder never
/// run.
#[test]
fn a_single_script_is_called_with_action_and_role_for_every_hook() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("seed-single", "198.18.0.184");
    let (trace, cluster, mut service) = traced(
        &lab,
        name,
        vip,
        &[("ha.sh", ""), ("E01decoy", ""), ("L01decoy", "")],
    );
    service["spec"]["hooks"]["script"] = json!("ha.sh");
    service["spec"]["hooks"]["monitor"] =
        json!({"intervalSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 3});
    service["spec"]["hooks"]["periodic"] = json!({"intervalSeconds": 1, "timeoutSeconds": 3});
    fresh(&lab, &cluster, &service, &[vip]);
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(30));
    for (call, node) in [
        ("ha.sh enter master ", "node=node-1"),
        ("ha.sh monitor master ", "node=node-1"),
        ("ha.sh periodic master ", "node=node-1"),
        ("ha.sh enter vicemaster ", "node=node-2"),
        ("ha.sh periodic vicemaster ", "node=node-2"),
    ] {
        trace.wait_for(0, &[call, node], Duration::from_secs(5));
    }
    let mark = trace.lines().len();
    ha::request_move(&lab, name, 2).unwrap();
    wait_active_on(&lab, name, vip, 2, Duration::from_secs(20));
    let leave = trace.wait_for(
        mark,
        &["ha.sh leave master ", "node=node-1"],
        Duration::from_secs(5),
    );
    trace.wait_for(
        leave,
        &["ha.sh enter vicemaster ", "node=node-1"],
        Duration::from_secs(5),
    );
    let leave = trace.wait_for(
        mark,
        &["ha.sh leave vicemaster ", "node=node-2"],
        Duration::from_secs(5),
    );
    trace.wait_for(
        leave,
        &["ha.sh enter master ", "node=node-2"],
        Duration::from_secs(5),
    );
    trace.wait_for(
        leave,
        &["ha.sh monitor master ", "node=node-2"],
        Duration::from_secs(5),
    );
    let lines = trace.lines();
    assert!(
        lines.iter().all(|l| l.starts_with("ha.sh ")),
        "only the named script runs:\n{}",
        lines.join("\n")
    );
    assert_eq!(
        trace.count(&["ha.sh monitor", "node=node-3"]) + trace.count(&["ha.sh monitor vicemaster"]),
        0,
        "monitors run on the active node only:\n{}",
        lines.join("\n")
    );
    cleanup(&lab, name, &[vip]);
}

/// `kubeha-agent ARGS` in node `i`'s namespace with that node's
/// environment, as the lab starts its agent (`KUBECONFIG` replaced by
/// `kubeconfig`); its exit status and output (stdout then stderr).
fn agent_cli(lab: &Lab, i: u8, kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let node_dir = lab.node_dir(i);
    let out = nodes::exec_in(&nodes::node_ns(i), &[lab.agent_binary().unwrap()])
        .args(args)
        .env("NODE_NAME", nodes::node_name(i))
        .env("POD_NAMESPACE", ha::OPERATOR_NAMESPACE)
        .env("KUBECONFIG", kubeconfig)
        .env("KUBEHA_HOOK_ROOT", node_dir.join("hooks"))
        .env("KUBEHA_LOG_DIR", node_dir.join("logs"))
        .env("KUBEHA_STATE_DIR", node_dir.join("run"))
        .env("KUBEHA_HOOK_NAMESPACES", "host")
        .env("KUBEHA_HOST_PID", lab.host_anchor().unwrap().to_string())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Issue 10, item 6: `kubeha-agent hooks run SERVICE ACTION` runs a hook
/// set by hand as the daemon would (its scripts, argv, environment and
/// checks), from the API server's spec, or from the status file when the
/// API server does not answer; a failing script fails the command; it
/// never touches the VIP; bad arguments are named.
#[test]
fn hooks_run_by_hand_runs_the_scripts_as_the_daemon_would() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("seed-byhand", "198.18.0.185");
    let key = format!("{}/{name}", ha::SERVICE_NAMESPACE);
    let (trace, cluster, service) = traced(
        &lab,
        name,
        vip,
        &[
            ("E01first", ""),
            ("E02second", ""),
            ("L01server", ""),
            ("M01check", "exit 3"),
        ],
    );
    fresh(&lab, &cluster, &service, &[vip]);
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(30));
    let own = |i: u8| lab.node_kubeconfig(i);

    // On node-3, which has no role for the service: enter as master at
    // epoch 42, by hand.
    let mark = trace.lines().len();
    let (ok, out) = agent_cli(
        &lab,
        3,
        &own(3),
        &[
            "hooks", "run", &key, "enter", "--role", "master", "--epoch", "42",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("E01first enter -> Success")
            && out.contains("E02second enter -> Success")
            && out.contains("ran E02second enter master"),
        "{out}"
    );
    let lines = trace.lines()[mark..].to_vec();
    assert_eq!(
        lines,
        [
            format!(
                "E01first enter master node=node-3 transition=takeover epoch=42 checksum={} service={key}",
                spec_checksum(&lab, name)
            ),
            format!(
                "E02second enter master node=node-3 transition=takeover epoch=42 checksum={} service={key}",
                spec_checksum(&lab, name)
            ),
        ],
        "the scripts in order, with the daemon's argv and environment"
    );
    assert!(
        !ha::vip_on_node(3, vip),
        "running hooks by hand added the VIP"
    );
    assert_eq!(ha::vip_holders(vip), [1]);

    // A failing monitor fails the command, naming the script and its exit.
    let (ok, out) = agent_cli(&lab, 3, &own(3), &["hooks", "run", &key, "monitor"]);
    assert!(!ok, "a failed script must fail the command: {out}");
    assert!(out.contains("M01check monitor -> Failed"), "{out}");
    assert!(out.contains("Some(3)"), "{out}");

    // No API server: node-2 runs from its status file, at its epoch.
    let nowhere = lab.dir().join("seed-byhand-no-such-kubeconfig");
    let epoch = agent_status_epoch(&lab, 2, &key);
    let mark = trace.lines().len();
    let (ok, out) = agent_cli(
        &lab,
        2,
        &nowhere,
        &["hooks", "run", &key, "leave", "--role", "vicemaster"],
    );
    assert!(ok, "{out}");
    let lines = trace.lines()[mark..].to_vec();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with(&format!(
            "L01server leave vicemaster node=node-2 transition= epoch={epoch} "
        )),
        "{lines:#?}"
    );
    // Node-3's status file does not know the service.
    let (ok, out) = agent_cli(&lab, 3, &nowhere, &["hooks", "run", &key, "enter"]);
    assert!(!ok && out.contains("not found"), "{out}");

    // Bad arguments are named with the fix.
    let (ok, out) = agent_cli(&lab, 3, &own(3), &["hooks", "run", name, "enter"]);
    assert!(!ok && out.contains("namespace/name"), "{out}");
    let (ok, out) = agent_cli(&lab, 3, &own(3), &["hooks", "run", &key, "start"]);
    assert!(
        !ok && out.contains("use enter, leave, monitor or periodic"),
        "{out}"
    );
    let (ok, out) = agent_cli(
        &lab,
        3,
        &own(3),
        &["hooks", "run", &key, "enter", "--role", "primary"],
    );
    assert!(
        !ok && out.contains("use master, vicemaster or none"),
        "{out}"
    );
    assert_eq!(ha::vip_holders(vip), [1], "the service was not disturbed");
    cleanup(&lab, name, &[vip]);
}

/// The epoch node `i`'s status file records for service `key`.
fn agent_status_epoch(lab: &Lab, i: u8, key: &str) -> i64 {
    let status = ha::agent_status(lab, i).expect("node's status file");
    status["services"][key]["epoch"]
        .as_i64()
        .unwrap_or_else(|| panic!("no epoch for {key} in node-{i}'s status file: {status}"))
}

/// Issue 10, item 7: with `fence.action: ResetHook`, an active node cut
/// off from the API server drops its VIP, runs its leave scripts, and
/// then its reset hook (`PATH` alone in its environment, `fence` as its
/// argument, in the node's network namespace, output in
/// `reset-hook.log`); the service moves, never with two holders.
#[test]
fn a_fenced_node_runs_its_reset_hook_after_its_vip_and_leave_scripts_and_the_service_moves() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("seed-reset", "198.18.0.186");
    let (trace, mut cluster, service) =
        traced(&lab, name, vip, &[("E01server", ""), ("L01server", "")]);
    let reset = lab.dir().join("seed-reset-hook");
    ha::write_scripts(
        &reset,
        &[(
            "reset",
            &format!(
                "#!/bin/sh\necho \"reset $1 ns=$(ip netns identify $$) vip=$(ip -o addr show | grep -c ' {vip}/') \
                 env=$(env | cut -d= -f1 | grep -v -x -e PWD -e OLDPWD -e SHLVL -e _ | sort | tr '\\n' ,)\" >> '{}'\n\
                 echo reset output\n",
                trace.path().display()
            ),
        )],
    )
    .unwrap();
    let reset = reset.join("reset");
    cluster["spec"]["fence"] = json!({"action": "ResetHook", "resetHook": reset});
    fresh(&lab, &cluster, &service, &[vip]);
    wait_active_on(&lab, name, vip, 1, Duration::from_secs(30));
    let reset_log = lab.node_dir(1).join("logs/reset-hook.log");
    let log_before = std::fs::read_to_string(&reset_log)
        .unwrap_or_default()
        .len();

    let sampler = ha::SplitBrain::start(vip, &[]);
    let mark = trace.lines().len();
    lab.partition(1).unwrap();
    let reset_at = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let at = trace.wait_for(mark, &["reset fence"], Duration::from_secs(15));
        wait_active_on(&lab, name, vip, 2, Duration::from_secs(20));
        at
    }));
    lab.heal(1).unwrap();
    let reset_at = reset_at.unwrap_or_else(|e| std::panic::resume_unwind(e));
    sampler
        .stop()
        .assert_single_holder(vip, "node-1 fenced with its reset hook");
    let lines = trace.lines();
    assert_eq!(
        lines[reset_at],
        "reset fence ns=kubeha-node-1 vip=0 env=PATH,",
        "the reset hook runs once the VIP is gone, with PATH alone, in node-1's namespace:\n{}",
        lines.join("\n")
    );
    let leave = trace.find_from(mark, &["L01server leave master node=node-1"]);
    assert!(
        leave.is_some_and(|l| l < reset_at),
        "the leave scripts run before the reset hook:\n{}",
        lines.join("\n")
    );
    assert_eq!(
        trace.count(&["reset "]),
        1,
        "only the fenced node resets:\n{}",
        lines.join("\n")
    );
    let log = std::fs::read_to_string(&reset_log).unwrap_or_default();
    assert!(
        log.get(log_before..)
            .is_some_and(|l| l.contains("reset output")),
        "the reset hook's output is not in {}: {log:?}",
        reset_log.display()
    );
    let fence_log =
        std::fs::read_to_string(lab.node_dir(1).join("logs/fence.log")).unwrap_or_default();
    assert!(
        fence_log
            .lines()
            .any(|l| l.contains(&format!("cluster={name} fence:"))),
        "{fence_log}"
    );
    cleanup(&lab, name, &[vip]);
}
