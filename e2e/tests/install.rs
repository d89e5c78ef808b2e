//! Issue 13: kubeha as what it claims to be. `helm install` of the chart in
//! the kubelet lab (three nodes, each with containerd, a kubelet and
//! kube-proxy) runs the operator Deployment (two replicas, leader election)
//! and the agent DaemonSet as real pods from the images `cargo xtask images`
//! builds, with the chart's RBAC; hooks run in the host's namespaces. On
//! those pods: a rolling restart of every agent is no outage (no enter hook
//! again, the hook-started server keeps its PID), a planned move and a power
//! failure of the active node with the operator leader's pod deleted at the
//! same time both complete, and two nodes never answer for the VIP at once.
//!
//! One test: it owns the lab from start to teardown.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use kubeha_e2e::arp_probe::{ArpProbe, Probed};
use kubeha_e2e::ha::{self, Timing};
use kubeha_e2e::lab::{Lab, StopSignal, wait_for};
use kubeha_e2e::nodes;

const NODES: u8 = 3;
const RELEASE: &str = "kubeha";
const SYSTEM: &str = "kubeha-system";
const CLUSTER: &str = "pods";
const SERVICE: &str = "web";
const VIP: &str = "198.18.0.110";
/// The longest a client may go unanswered while every agent restarts.
const RESTART_GAP: Duration = Duration::from_millis(200);

/// The chart's pods by component: (pod name, node, phase, ready).
fn pods(lab: &Lab, component: &str) -> Vec<(String, String, String, bool)> {
    let list = lab
        .kubectl_json(&[
            "get",
            "pods",
            "-n",
            SYSTEM,
            "-l",
            &format!("app.kubernetes.io/component={component}"),
        ])
        .unwrap_or_default();
    let mut pods: Vec<_> = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            let ready = p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            (
                s(&p["metadata"]["name"]),
                s(&p["spec"]["nodeName"]),
                s(&p["status"]["phase"]),
                ready,
            )
        })
        .collect();
    pods.sort();
    pods
}

/// Whether every one of `want` pods of `component` runs and is ready, on
/// as many distinct nodes as `nodes` says (the agent: one per node).
fn all_ready(lab: &Lab, component: &str, want: usize, nodes: Option<usize>) -> bool {
    let pods = pods(lab, component);
    let spread: std::collections::BTreeSet<_> = pods.iter().map(|p| p.1.clone()).collect();
    pods.len() == want
        && pods.iter().all(|p| p.2 == "Running" && p.3)
        && nodes.is_none_or(|n| spread.len() == n)
}

/// The service's hook scripts under `root`: the enter script starts a
/// server in a session of its own (as an init script does) and records its
/// pid in `run`, per node; the leave script stops it. Both append to
/// `trace`.
fn install_hooks(root: &Path, trace: &Path, run: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(SERVICE);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(run).unwrap();
    let enter = format!(
        "#!/bin/sh\n\
         echo \"enter $KUBEHA_NODE $2 $KUBEHA_TRANSITION\" >> {trace}\n\
         pidfile={run}/server-$KUBEHA_NODE.pid\n\
         if [ -s $pidfile ] && kill -0 $(cat $pidfile) 2>/dev/null; then exit 0; fi\n\
         setsid sleep 86400 </dev/null >/dev/null 2>&1 &\n\
         echo $! > $pidfile\n",
        trace = trace.display(),
        run = run.display(),
    );
    let leave = format!(
        "#!/bin/sh\n\
         echo \"leave $KUBEHA_NODE $2 $KUBEHA_TRANSITION\" >> {trace}\n\
         pidfile={run}/server-$KUBEHA_NODE.pid\n\
         [ -s $pidfile ] && kill $(cat $pidfile) 2>/dev/null\n\
         rm -f $pidfile\n\
         exit 0\n",
        trace = trace.display(),
        run = run.display(),
    );
    for (name, body) in [("E01server", enter), ("L01server", leave)] {
        let file = dir.join(name);
        fs::write(&file, body).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn server_pid(run: &Path, node: u8) -> Option<i32> {
    fs::read_to_string(run.join(format!("server-{}.pid", nodes::node_name(node))))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn ns_of(pid: i32, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|l| l.display().to_string())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

fn enters(trace: &Path) -> usize {
    fs::read_to_string(trace)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("enter ") && l.contains(" master "))
        .count()
}

/// The active node, once the service is Active there and only there.
fn wait_active(lab: &Lab, limit: Duration, not: Option<u8>) -> u8 {
    wait_for(
        &format!("{SERVICE} Active on one node (not {not:?})"),
        limit,
        || ha::active_node(lab, SERVICE, VIP).filter(|n| Some(*n) != not),
    )
}

/// The holder of the operator's leader Lease: a pod name.
fn operator_leader(lab: &Lab) -> Option<String> {
    lab.kubectl_ok(&[
        "get",
        "lease",
        "kubeha-operator-leader",
        "-n",
        SYSTEM,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])
    .ok()
    .map(|h| h.trim().to_owned())
    .filter(|h| !h.is_empty())
}

fn assert_one_holder(what: &str, seen: &Probed) {
    assert!(
        seen.windows.is_empty(),
        "{what}: two nodes answered for {VIP} at once: {:?}",
        seen.windows
    );
    assert!(seen.replies > 0, "{what}: nobody answered for {VIP}");
}

fn helm(lab: &Lab, args: &[&str]) -> String {
    let out = std::process::Command::new(lab.dir().join("bin").join("helm"))
        .args(args)
        .env("KUBECONFIG", lab.kubeconfig())
        .current_dir(lab.root())
        .output()
        .expect("running the lab's helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn helm_install_runs_kubeha_as_pods_that_survive_restarts_and_fail_over() {
    let lab = Lab::of_this_checkout();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| lab.root().join(t))
        .unwrap_or_else(|| lab.root().join("target"));
    let started = Instant::now();
    let built = kubeha_e2e::images::build(lab.root(), &target.join("images"))
        .expect("cargo xtask images: release builds and buildah");
    for b in &built {
        println!("image {} {} ({} bytes)", b.reference, b.digest, b.bytes);
    }
    println!("images built in {:.0} s", started.elapsed().as_secs_f64());

    // The pods are the agents and the operator: none of the lab's host
    // processes may run beside them.
    if lab.dir().exists() {
        for i in 1..=nodes::MAX_NODES {
            let _ = lab.stop_agent(i, StopSignal::Term);
        }
        for r in 0..=1 {
            let _ = lab.stop_operator(r, StopSignal::Term);
        }
    }
    let started = Instant::now();
    lab.ensure_up_with_kubelets(NODES)
        .expect("the kubelet lab with three nodes comes up");
    lab.import_built_images().expect("images imported");
    println!("kubelet lab up in {:.0} s", started.elapsed().as_secs_f64());

    let pods_dir = lab.dir().join("pods");
    let hook_root = pods_dir.join("hooks");
    let trace = pods_dir.join("trace");
    let _ = fs::remove_file(&trace);
    // agent.perNodePaths: node-i's agent finds its hooks under
    // `<hook root>/node-i`, as each real node has its own files.
    let run = pods_dir.join("run");
    for i in 1..=NODES {
        install_hooks(&hook_root.join(nodes::node_name(i)), &trace, &run);
    }
    let anchor = lab.host_anchor().unwrap();
    let set = [
        "image.pullPolicy=Never".to_owned(),
        "crds.install=false".to_owned(),
        format!("agent.hookRoot={}", hook_root.display()),
        format!("agent.logDir={}", pods_dir.join("logs").display()),
        format!("agent.stateDir={}", pods_dir.join("state").display()),
        "agent.perNodePaths=true".to_owned(),
        format!("agent.hooks.hostPid={anchor}"),
        "agent.hooks.cgroup=unified/kubeha-lab-node-hooks".to_owned(),
        "operator.leaderElection.leaseSeconds=6".to_owned(),
        "operator.leaderElection.graceSeconds=4".to_owned(),
    ];
    let mut args = vec![
        "install",
        RELEASE,
        "charts/kubeha",
        "-n",
        SYSTEM,
        "--create-namespace",
        // The lab applied the chart's RBAC before (for its host-process
        // agents); the release takes those objects over.
        "--take-ownership",
    ];
    for s in &set {
        args.extend(["--set", s]);
    }
    helm(&lab, &args);
    wait_for(
        "two operator pods Running and Ready",
        Duration::from_secs(180),
        || all_ready(&lab, "operator", 2, None).then_some(()),
    );
    wait_for(
        "one agent pod Running and Ready on every node",
        Duration::from_secs(180),
        || all_ready(&lab, "agent", NODES.into(), Some(NODES.into())).then_some(()),
    );
    println!(
        "{}",
        lab.kubectl_ok(&["get", "pods", "-n", SYSTEM, "-o", "wide"])
            .unwrap()
    );

    // A cluster of the three nodes and a service with a VIP and hooks.
    ha::apply(&lab, &ha::cluster(CLUSTER, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    ha::apply(
        &lab,
        &ha::service(
            SERVICE,
            CLUSTER,
            &[&format!("{VIP}/24")],
            Some(SERVICE),
            (3, 100),
        ),
    )
    .unwrap();
    let first = wait_active(&lab, Duration::from_secs(60), None);
    let server = wait_for(
        "the enter hook's server pid",
        Duration::from_secs(10),
        || server_pid(&run, first),
    );
    assert!(
        nodes::is_alive(server),
        "the server (pid {server}) never ran"
    );
    // A host process: the host's mount namespace (the lab's anchor stands
    // for the host's init), the node's network.
    assert_eq!(ns_of(server, "mnt"), ns_of(anchor, "mnt"));
    assert!(
        nodes::pid_in_ns(server, &nodes::node_ns(first)),
        "the server is not in {}'s network namespace",
        nodes::node_name(first)
    );
    assert_eq!(
        enters(&trace),
        1,
        "{}",
        fs::read_to_string(&trace).unwrap_or_default()
    );

    // 1. Every agent pod restarts, one node at a time: no outage, no enter
    // hook again, the same server process.
    let before: BTreeMap<_, _> = pods(&lab, "agent")
        .into_iter()
        .map(|p| (p.0, p.1))
        .collect();
    let probe = ArpProbe::start(&[VIP]).unwrap();
    lab.kubectl_ok(&["rollout", "restart", "ds/kubeha-agent", "-n", SYSTEM])
        .unwrap();
    lab.kubectl_ok(&[
        "rollout",
        "status",
        "ds/kubeha-agent",
        "-n",
        SYSTEM,
        "--timeout=300s",
    ])
    .expect("the agents' rolling restart completes");
    std::thread::sleep(Duration::from_secs(3));
    let seen = probe.stop();
    let after: BTreeMap<_, _> = pods(&lab, "agent")
        .into_iter()
        .map(|p| (p.0, p.1))
        .collect();
    assert!(
        before.keys().all(|p| !after.contains_key(p)),
        "not every agent pod was replaced: before {before:?}, after {after:?}"
    );
    assert_one_holder("rolling restart", &seen);
    let gap = seen
        .longest_silence
        .values()
        .copied()
        .max()
        .unwrap_or_default();
    println!(
        "rolling restart of {} agents: longest client gap {} ms ({} requests, {} replies)",
        after.len(),
        gap.as_millis(),
        seen.requests,
        seen.replies
    );
    assert!(
        gap <= RESTART_GAP,
        "the VIP went unanswered for {gap:?} during the rolling restart"
    );
    assert_eq!(
        ha::active_node(&lab, SERVICE, VIP),
        Some(first),
        "the service moved"
    );
    assert_eq!(
        enters(&trace),
        1,
        "an enter hook ran again: {}",
        fs::read_to_string(&trace).unwrap_or_default()
    );
    assert!(
        nodes::is_alive(server),
        "the server (pid {server}) died in the rolling restart"
    );
    assert_eq!(server_pid(&run, first), Some(server));

    // 2. A planned move to another node.
    let target_node = (1..=NODES).find(|n| *n != first).unwrap();
    let probe = ArpProbe::start(&[VIP]).unwrap();
    ha::request_move(&lab, SERVICE, target_node).unwrap();
    let moved = wait_active(&lab, Duration::from_secs(30), Some(first));
    std::thread::sleep(Duration::from_secs(1));
    let seen = probe.stop();
    assert_eq!(moved, target_node);
    assert_one_holder("planned move", &seen);
    assert!(
        !nodes::is_alive(server),
        "the leave hook did not stop the server on {}",
        nodes::node_name(first)
    );

    // 3. The active node loses power while the operator leader's pod is
    // deleted: the other replica takes over and the service fails over.
    let leader = wait_for("an operator leader", Duration::from_secs(30), || {
        operator_leader(&lab)
    });
    println!(
        "operator leader: {leader}; powering off {}",
        nodes::node_name(moved)
    );
    let probe = ArpProbe::start(&[VIP]).unwrap();
    let off = Instant::now();
    lab.power_off(moved).unwrap();
    lab.kubectl_ok(&["delete", "pod", &leader, "-n", SYSTEM, "--wait=false"])
        .unwrap();
    let survivor = wait_active(&lab, Duration::from_secs(90), Some(moved));
    let took = off.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let seen = probe.stop();
    assert_one_holder("power-off with the operator leader deleted", &seen);
    let new_leader = operator_leader(&lab);
    println!(
        "failover to {} {:.1} s after the power-off; operator leader now {new_leader:?}",
        nodes::node_name(survivor),
        took.as_secs_f64()
    );
    assert_ne!(new_leader.as_deref(), Some(leader.as_str()));

    // Teardown: the release, then the lab.
    lab.power_on(moved).unwrap();
    ha::delete_service(&lab, SERVICE);
    ha::delete(&lab, "hacluster", CLUSTER, None);
    helm(
        &lab,
        &[
            "uninstall",
            RELEASE,
            "-n",
            SYSTEM,
            "--wait",
            "--timeout",
            "120s",
        ],
    );
    lab.down().unwrap();
}
