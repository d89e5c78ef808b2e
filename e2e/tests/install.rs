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
use kubeha_e2e::lab::{Lab, wait_for};
use kubeha_e2e::nodes;
use kubeha_e2e::pods::{self, RELEASE, SYSTEM};

const NODES: u8 = 3;
const CLUSTER: &str = "pods";
const SERVICE: &str = "web";
const VIP: &str = "198.18.0.110";
/// The longest a client may go unanswered while every agent restarts.
const RESTART_GAP: Duration = Duration::from_millis(200);

/// The service's hook scripts under `root`: the enter script starts a
/// server in a session of its own (as an init script does) and records its
/// pid in `run`, per node; the leave script stops it. Both append to
/// `trace`.
fn install_hooks(root: &Path, trace: &Path, run: &Path) {
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
    ha::write_scripts(
        &root.join(SERVICE),
        &[("E01server", &enter), ("L01server", &leave)],
    )
    .unwrap();
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
    let active = || ha::active_node(lab, SERVICE, VIP).filter(|n| Some(*n) != not);
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(n) = active() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Not Active in time: what the API server, the operator and the
    // agents say, so a failure in CI can be read afterwards.
    let show = |args: &[&str]| {
        let out = lab.kubectl_ok(args).unwrap_or_else(|e| e.to_string());
        println!("$ kubectl {}\n{out}", args.join(" "));
    };
    show(&[
        "get",
        "haservice",
        SERVICE,
        "-n",
        ha::SERVICE_NAMESPACE,
        "-o",
        "yaml",
    ]);
    show(&["get", "hacluster", CLUSTER, "-o", "yaml"]);
    show(&["get", "leases", "-n", SYSTEM, "-o", "wide"]);
    show(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
    show(&["get", "pods", "-n", SYSTEM, "-o", "wide"]);
    show(&[
        "logs",
        "-n",
        SYSTEM,
        "-l",
        "app.kubernetes.io/component=operator",
        "--tail=60",
        "--prefix",
    ]);
    show(&[
        "logs",
        "-n",
        SYSTEM,
        "-l",
        "app.kubernetes.io/component=agent",
        "--tail=40",
        "--prefix",
    ]);
    active().unwrap_or_else(|| {
        panic!("timed out after {limit:?}: {SERVICE} Active on one node (not {not:?})")
    })
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

#[test]
fn helm_install_runs_kubeha_as_pods_that_survive_restarts_and_fail_over() {
    let lab = Lab::of_this_checkout();
    // From a clean lab: what the tests before it left in the API server
    // (the hostile catalogue's objects, the host-process lab's identity
    // Pods) is not part of a fresh install. In CI, after the catalogue,
    // the service never became Active; from a clean lab it does.
    lab.down().unwrap();
    let files = lab.dir().join("pods");
    let hook_root = files.join("hooks");
    let trace = files.join("trace");
    let run = files.join("run");
    let _ = fs::remove_file(&trace);
    // agent.perNodePaths: node-i's agent finds its hooks under
    // `<hook root>/node-i`, as each real node has its own files.
    for i in 1..=NODES {
        install_hooks(&hook_root.join(nodes::node_name(i)), &trace, &run);
    }
    let installed = pods::install(
        &lab,
        NODES,
        &hook_root,
        &[
            "operator.leaderElection.leaseSeconds=6",
            "operator.leaderElection.graceSeconds=4",
        ],
    )
    .expect("images, the kubelet lab and helm install: every pod ready");
    println!(
        "images, kubelet lab and release ready in {:.0} s",
        installed.took.as_secs_f64()
    );
    let anchor = installed.host_pid;
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
    let first = wait_active(&lab, Duration::from_secs(120), None);
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
    let before: BTreeMap<_, _> = pods::pods(&lab, "agent")
        .into_iter()
        .map(|p| (p.name, p.node))
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
    let after: BTreeMap<_, _> = pods::pods(&lab, "agent")
        .into_iter()
        .map(|p| (p.name, p.node))
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
    lab.helm_ok(&[
        "uninstall",
        RELEASE,
        "-n",
        SYSTEM,
        "--wait",
        "--timeout",
        "120s",
    ])
    .unwrap();
    lab.down().unwrap();
}
