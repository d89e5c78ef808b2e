//! The lab's nodes on the real kernel and the real API server: the segment
//! carries IPv4 and IPv6 between namespaces, Node objects carry the nodes'
//! addresses, each node's credentials get exactly the chart's agent RBAC,
//! a partition cuts one node off the API server, processes start and stop
//! inside a node's namespace, and teardown by prefix leaves nothing behind.
//!
//! The tests share one lab and change it (partition, power-off, teardown),
//! so they run one at a time.

use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kubeha_e2e::ha;
use kubeha_e2e::lab::{Lab, StopSignal};
use kubeha_e2e::nodes::{self, Segment};

const NODES: u8 = 3;

static SERIAL: Mutex<()> = Mutex::new(());

/// The lab with three nodes, and the right to change it until the guard drops.
fn lab() -> (MutexGuard<'static, ()>, Lab) {
    let guard = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let lab = Lab::of_this_checkout();
    lab.ensure_up_with_nodes(NODES)
        .expect("the lab with nodes must come up");
    (guard, lab)
}

/// Runs `cmd`, killing it after `limit`; its output (killed: not success).
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// One echo request from `ns` to `addr`, retried for up to five seconds.
fn pings(ns: &str, addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = output_within(
            &mut nodes::exec_in(ns, &["ping", "-n", "-c1", "-W1", addr]),
            Duration::from_secs(3),
        );
        if out.status.success() {
            return true;
        }
        if String::from_utf8_lossy(&out.stderr).contains("exec of \"ping\" failed") {
            panic!("`ping` is not installed; install it (e.g. `apt-get install iputils-ping`)");
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// One ping attempt, no retries (for "must not answer").
fn pings_once(ns: &str, addr: &str) -> bool {
    output_within(
        &mut nodes::exec_in(ns, &["ping", "-n", "-c1", "-W1", addr]),
        Duration::from_secs(3),
    )
    .status
    .success()
}

/// Whether node `i` gets an answer from the API server's `/readyz`.
fn node_reaches_apiserver(lab: &Lab, i: u8) -> Output {
    output_within(
        lab.node_kubectl(i)
            .unwrap()
            .args(["get", "--raw", "/readyz", "--request-timeout=2s"]),
        Duration::from_secs(10),
    )
}

fn can_i(lab: &Lab, i: u8, args: &[&str]) -> String {
    let out = output_within(
        lab.node_kubectl(i)
            .unwrap()
            .args(["auth", "can-i"])
            .args(args),
        Duration::from_secs(20),
    );
    // can-i exits 1 for "no"; anything else on stderr than a warning is a failure.
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        stdout == "yes" || stdout == "no",
        "kubectl auth can-i {args:?} from node-{i}: {stdout} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_client_pings_every_node_over_ipv4_and_ipv6() {
    let (_serial, _lab) = lab();
    for i in 1..=NODES {
        let v4 = nodes::node_ip(i).unwrap().to_string();
        let v6 = nodes::node_ip6(i).unwrap().to_string();
        assert!(pings(nodes::client_ns(), &v4), "client -> node-{i} {v4}");
        assert!(pings(nodes::client_ns(), &v6), "client -> node-{i} {v6}");
    }
    // Nodes reach each other and the host's address on the bridge.
    assert!(pings(
        &nodes::node_ns(1),
        &nodes::node_ip(2).unwrap().to_string()
    ));
    assert!(pings(&nodes::node_ns(2), &nodes::HOST_IP6.to_string()));
    // No namespace has a way off the segment.
    for ns in [nodes::node_ns(1), nodes::client_ns().to_string()] {
        for family in ["-4", "-6"] {
            let routes = output_within(
                Command::new("ip").args(["-n", &ns, family, "route", "show", "default"]),
                Duration::from_secs(5),
            );
            assert!(routes.status.success());
            assert!(
                routes.stdout.is_empty(),
                "{ns} has a default route: {}",
                String::from_utf8_lossy(&routes.stdout)
            );
        }
    }
}

#[test]
fn nodes_are_registered_with_their_addresses_and_the_lab_label() {
    let (_serial, lab) = lab();
    let names = lab
        .kubectl_ok(&["get", "nodes", "-l", "kubeha.io/lab=true", "-o", "name"])
        .unwrap();
    for i in 1..=NODES {
        assert!(names.contains(&format!("node/node-{i}\n")), "{names}");
        let addrs = lab
            .kubectl_ok(&[
                "get",
                "node",
                &nodes::node_name(i),
                "-o",
                "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
            ])
            .unwrap();
        assert_eq!(
            addrs,
            format!(
                "{} {}",
                nodes::node_ip(i).unwrap(),
                nodes::node_ip6(i).unwrap()
            )
        );
    }
    let table = lab.kubectl_ok(&["get", "nodes"]).unwrap();
    for i in 1..=NODES {
        assert!(table.contains(&format!("node-{i} ")), "{table}");
    }
}

#[test]
fn each_node_gets_its_own_token_and_exactly_the_charts_agent_rbac() {
    let (_serial, lab) = lab();
    // Granted by the chart's agent Role and ClusterRole.
    assert_eq!(
        can_i(&lab, 1, &["create", "leases", "-n", "kubeha-system"]),
        "yes"
    );
    assert_eq!(can_i(&lab, 1, &["watch", "haservices", "-A"]), "yes");
    assert_eq!(
        can_i(
            &lab,
            2,
            &["patch", "haservices", "--subresource=status", "-A"]
        ),
        "yes"
    );
    // Not granted: the agent never deletes Leases nor touches specs.
    assert_eq!(can_i(&lab, 1, &["delete", "haclusters"]), "no");
    assert_eq!(
        can_i(&lab, 1, &["delete", "leases", "-n", "kubeha-system"]),
        "no"
    );
    assert_eq!(can_i(&lab, 3, &["update", "haservices", "-A"]), "no");
    assert_eq!(
        can_i(&lab, 3, &["get", "secrets", "-n", "kubeha-system"]),
        "no"
    );

    let whoami = output_within(
        lab.node_kubectl(1).unwrap().args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "system:serviceaccount:kubeha-system:kubeha-agent"
    );
    let token = |i: u8| {
        let config = std::fs::read_to_string(lab.node_kubeconfig(i)).unwrap();
        assert!(config.contains("server: https://198.18.0.1:"), "{config}");
        config
            .lines()
            .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_owned))
            .unwrap()
    };
    assert_ne!(token(1), token(2), "one token per node");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(lab.node_kubeconfig(1))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "a node kubeconfig holds a token: owner only"
    );
    for i in 1..=NODES {
        for sub in ["hooks", "logs", "run"] {
            assert!(lab.node_dir(i).join(sub).is_dir(), "node-{i}/{sub}");
        }
    }
}

#[test]
fn a_partition_cuts_one_node_off_the_api_server_and_heal_restores_it() {
    let (_serial, lab) = lab();
    let ok = node_reaches_apiserver(&lab, 1);
    assert!(
        ok.status.success(),
        "node-1 before the partition: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    lab.partition(1).unwrap();
    lab.partition(1).unwrap(); // idempotent
    let cut = node_reaches_apiserver(&lab, 1);
    let other = node_reaches_apiserver(&lab, 2);
    // The segment itself still works for the partitioned node.
    let client_sees_node1 = pings(nodes::client_ns(), &nodes::node_ip(1).unwrap().to_string());
    lab.heal(1).unwrap();
    lab.heal(1).unwrap(); // idempotent
    let healed = node_reaches_apiserver(&lab, 1);

    assert!(
        !cut.status.success(),
        "node-1 reached the API server while partitioned"
    );
    assert!(
        other.status.success(),
        "node-2 lost the API server: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert!(
        client_sees_node1,
        "a partition from the API server must not cut the segment"
    );
    assert!(
        healed.status.success(),
        "node-1 after heal: {}",
        String::from_utf8_lossy(&healed.stderr)
    );
}

#[test]
fn agent_processes_start_and_stop_inside_their_node_namespace() {
    let (_serial, lab) = lab();
    // The agent is not built yet: `sleep` stands in for it on the same path.
    let _ = lab.stop_agent(2, StopSignal::Kill);
    let pid = lab.start_agent_program(2, "sleep", &["600"]).unwrap();
    assert!(lab.agent_running(2));
    assert_eq!(lab.agent_pid(2), Some(pid));
    assert!(nodes::pid_in_ns(pid, &nodes::node_ns(2)));
    assert!(!nodes::pid_in_ns(pid, &nodes::node_ns(1)));
    assert!(nodes::ns_pids(&nodes::node_ns(2)).contains(&pid));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let node_dir = lab.node_dir(2).display().to_string();
    for expected in [
        "NODE_NAME=node-2".to_string(),
        "POD_NAMESPACE=kubeha-system".to_string(),
        format!("KUBECONFIG={node_dir}/kubeconfig"),
        format!("KUBEHA_HOOK_ROOT={node_dir}/hooks"),
        format!("KUBEHA_LOG_DIR={node_dir}/logs"),
        format!("KUBEHA_STATE_DIR={node_dir}/run"),
        "RUST_LOG=info".to_string(),
    ] {
        assert!(
            environ.contains(&expected),
            "{expected} missing: {environ:?}"
        );
    }
    let err = lab
        .start_agent_program(2, "sleep", &["600"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("already runs"), "{err}");

    assert!(lab.stop_agent(2, StopSignal::Term).unwrap());
    assert!(!lab.agent_running(2));
    assert!(nodes::is_dead(pid));
    assert!(
        !lab.stop_agent(2, StopSignal::Term).unwrap(),
        "nothing left to stop"
    );

    let pid = lab.start_agent_program(2, "sleep", &["600"]).unwrap();
    assert!(lab.stop_agent(2, StopSignal::Kill).unwrap());
    assert!(nodes::is_dead(pid) && !lab.agent_running(2));

    // A program that cannot start is reported with its log.
    let err = lab
        .start_agent_program(2, "/nonexistent/kubeha-agent", &[] as &[&str])
        .unwrap_err()
        .to_string();
    assert!(err.contains("exited at once"), "{err}");
    assert_eq!(
        lab.agent_pid(2),
        None,
        "no pid file for an agent that never ran"
    );
    assert!(
        std::fs::read_to_string(lab.agent_log(2))
            .unwrap()
            .contains("--- lab: starting sleep in kubeha-node-2")
    );
    // Unknown nodes are refused, not guessed.
    assert!(lab.start_agent_program(0, "sleep", &["1"]).is_err());
    assert!(
        lab.start_agent_program(nodes::MAX_NODES, "sleep", &["1"])
            .is_err()
    );
}

#[test]
fn power_off_kills_everything_in_the_node_and_cuts_its_link() {
    let (_serial, lab) = lab();
    let _ = lab.stop_agent(3, StopSignal::Kill);
    let agent = lab.start_agent_program(3, "sleep", &["600"]).unwrap();
    // Something else the node runs (a hook, say), started outside the lab's
    // bookkeeping.
    let mut other = nodes::exec_in(&nodes::node_ns(3), &["sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let other_pid = other.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !nodes::ns_pids(&nodes::node_ns(3)).contains(&other_pid) {
        assert!(
            Instant::now() < deadline,
            "the second process never entered the namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let node3 = nodes::node_ip(3).unwrap().to_string();
    let node3_v6 = nodes::node_ip6(3).unwrap().to_string();
    assert!(pings(nodes::client_ns(), &node3));
    // Addresses the node holds besides its own (VIPs, say): a boot does not
    // bring them back.
    let (extra, extra_v6) = ("198.18.0.250", "2001:db8::fa");
    let in_node3 = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["-n", &nodes::node_ns(3)])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?} in node-3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    in_node3(&["addr", "replace", &format!("{extra}/24"), "dev", "eth0"]);
    in_node3(&[
        "-6",
        "addr",
        "replace",
        &format!("{extra_v6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);

    let killed = lab.power_off(3).unwrap();
    let _ = other.wait();
    let answered_while_off = pings_once(nodes::client_ns(), &node3);
    let left = nodes::ns_pids(&nodes::node_ns(3));
    let kept_while_off = ha::vip_on_node(3, extra) && ha::vip_on_node(3, extra_v6);
    lab.power_on(3).unwrap();
    let after_boot = [node3.as_str(), &node3_v6, extra, extra_v6].map(|a| ha::vip_on_node(3, a));
    // A node that is on is left as it is.
    in_node3(&["addr", "replace", &format!("{extra}/24"), "dev", "eth0"]);
    lab.power_on(3).unwrap();
    let kept_while_on = ha::vip_on_node(3, extra);
    in_node3(&["addr", "del", &format!("{extra}/24"), "dev", "eth0"]);

    assert!(killed >= 2, "killed {killed}");
    assert!(nodes::is_dead(agent) && !lab.agent_running(3));
    assert!(left.is_empty(), "still in the namespace: {left:?}");
    assert!(!answered_while_off, "a powered-off node answered");
    assert!(
        kept_while_off,
        "power-off keeps the addresses configured, off the wire"
    );
    assert_eq!(
        after_boot,
        [true, true, false, false],
        "after power on, node-3 must have its own {node3} and {node3_v6} and neither {extra} nor {extra_v6}"
    );
    assert!(
        kept_while_on,
        "power on of a running node removed an address"
    );
    assert!(pings(nodes::client_ns(), &node3), "node-3 after power on");
    assert!(
        pings(nodes::client_ns(), &node3_v6),
        "node-3 over IPv6 after power on"
    );
}

#[test]
fn teardown_by_prefix_leaves_no_namespace_link_or_process_even_from_a_killed_run() {
    let (_serial, lab) = lab();
    // What a killed run could leave: a namespace with a process in it, a
    // stray link.
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let _ = Command::new("ip")
        .args(["netns", "delete", "kubeha-leftover"])
        .stderr(Stdio::null())
        .status();
    ip(&["netns", "add", "kubeha-leftover"]);
    ip(&[
        "link",
        "add",
        "kh-leftover",
        "type",
        "veth",
        "peer",
        "name",
        "kh-leftover-p",
    ]);
    let mut stray = nodes::exec_in("kubeha-leftover", &["sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let stray_pid = stray.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !nodes::pid_in_ns(stray_pid, "kubeha-leftover") {
        assert!(
            Instant::now() < deadline,
            "the stray process never entered its namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let done = Segment::down().unwrap();
    let _ = stray.wait();
    let again = Segment::down().unwrap();
    let links = ip(&["-o", "link"]);
    let namespaces = ip(&["netns", "list"]);
    let stray_dead = nodes::is_dead(stray_pid);
    // Put the shared lab back for the other tests.
    lab.ensure_up_with_nodes(NODES).unwrap();

    assert!(
        done.namespaces.contains(&"kubeha-leftover".to_string()),
        "{done:?}"
    );
    assert!(
        done.namespaces.contains(&"kubeha-node-1".to_string()),
        "{done:?}"
    );
    assert!(done.links.contains(&"kh-leftover".to_string()), "{done:?}");
    assert!(done.links.contains(&nodes::BRIDGE.to_string()), "{done:?}");
    assert!(stray_dead && done.processes >= 1, "{done:?}");
    assert_eq!(again, Default::default(), "a second teardown finds nothing");
    for line in links.lines() {
        let name = line.split(": ").nth(1).unwrap_or_default();
        assert!(
            !name.starts_with("kubeha-") && !name.starts_with("kh-"),
            "left behind: {line}"
        );
    }
    for line in namespaces.lines() {
        assert!(!line.starts_with("kubeha-"), "left behind: {line}");
    }
    // And the lab is whole again.
    assert!(pings(
        nodes::client_ns(),
        &nodes::node_ip(1).unwrap().to_string()
    ));
    assert!(node_reaches_apiserver(&lab, 1).status.success());
}

/// In a child process (see below) without root or without `ip`: the lab
/// refuses, naming what is missing.
fn child_expects_refusal(missing: &str) {
    let err = Lab::of_this_checkout()
        .ensure_up_with_nodes(NODES)
        .unwrap_err()
        .to_string();
    match missing {
        "root" => assert!(
            err.contains("missing: root") && err.contains("uid 65534"),
            "{err}"
        ),
        _ => assert!(
            err.contains("iproute2")
                && err.contains("`ip` is not on PATH")
                && !err.contains("root:"),
            "{err}"
        ),
    }
    println!("CHILD-REFUSED: {err}");
}

#[test]
fn without_root_or_iproute2_the_lab_says_what_is_missing() {
    const CHILD: &str = "KUBEHA_E2E_PREREQ_CHILD";
    const NAME: &str = "without_root_or_iproute2_the_lab_says_what_is_missing";
    if let Ok(missing) = std::env::var(CHILD) {
        child_expects_refusal(&missing);
        return;
    }
    let missing = nodes::missing_prerequisites(1000, Some("/nonexistent".as_ref()));
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(nodes::missing_prerequisites(0, std::env::var_os("PATH").as_deref()).is_empty());
    // The whole lab's list names every tool and one command installing all.
    let missing = nodes::missing_lab_prerequisites(1000, Some("/nonexistent".as_ref()));
    assert_eq!(missing.len(), 8, "{missing:?}");
    assert_eq!(
        missing.last().unwrap(),
        "install with `apt-get install -y iproute2 golang-go openssl nftables tcpdump iputils-ping`"
    );
    assert!(
        missing
            .iter()
            .any(|m| m.starts_with("golang-go: `go` is not on PATH")),
        "{missing:?}"
    );
    assert!(nodes::missing_lab_prerequisites(0, std::env::var_os("PATH").as_deref()).is_empty());
    if nix::unistd::geteuid().as_raw() != 0 {
        // Not root here: the lab itself must say so (and setpriv could not
        // switch users anyway).
        let err = Lab::of_this_checkout()
            .ensure_up_with_nodes(NODES)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing: root"), "{err}");
        return;
    }

    // The same test binary, run again as nobody, and as root without `ip`.
    let exe = std::env::current_exe().unwrap();
    let empty = std::env::temp_dir().join(format!("kubeha-no-tools-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let runs = [
        (
            "root",
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(&exe)
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, "root")
                .output(),
        ),
        (
            "ip",
            Command::new(&exe)
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, "ip")
                .env("PATH", &empty)
                .output(),
        ),
    ];
    let _ = std::fs::remove_dir(&empty);
    for (missing, out) in runs {
        let out = out.expect("setpriv (util-linux) runs the test as nobody");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("CHILD-REFUSED"),
            "without {missing}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The safety detector itself: a VIP put on two nodes for 50 ms, and one
/// that the kernel removes when its lifetime runs out while another node
/// already holds it, are both reported with the nodes and a window; a VIP
/// that moves cleanly is not.
#[test]
fn the_split_brain_detector_reports_every_double_holder_and_nothing_else() {
    let (_serial, lab) = lab();
    let _ = &lab;
    let (short, expiring, clean) = ("198.18.0.125", "198.18.0.126", "198.18.0.127");
    // A handover as the protocol makes one: the next holder adds the VIP
    // well after the last one removed it (the client's ARP view resolves
    // 10 ms; the instant move of `clean` is for the address view only).
    let handover = "198.18.0.124";
    let ip = |i: u8, args: &[&str]| {
        let ns = nodes::node_ns(i);
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(&all).output().unwrap();
        assert!(
            out.status.success(),
            "ip {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let add = |i: u8, vip: &str, lifetime: Option<&str>| {
        let cidr = format!("{vip}/24");
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", nodes::NS_IFACE];
        if let Some(l) = lifetime {
            args.extend_from_slice(&["valid_lft", l, "preferred_lft", l]);
        }
        ip(i, &args);
    };
    let del = |i: u8, vip: &str| {
        let cidr = format!("{vip}/24");
        ip(i, &["addr", "del", cidr.as_str(), "dev", nodes::NS_IFACE]);
    };
    let detector = ha::SplitBrain::start_many(&[short, expiring, clean, handover], &[]);
    let arp = kubeha_e2e::arp_probe::ArpProbe::start(&[short, expiring, clean, handover]).unwrap();
    add(1, handover, None);
    std::thread::sleep(Duration::from_millis(300));
    // Two holders for 50 ms. The detector applies each node's address
    // events in the order they arrive, one `ip monitor` pipe per node, so
    // an overlap shorter than the delivery jitter between two pipes (a few
    // ms, more on a busy machine) can go unseen: CI missed a
    // back-to-back one (no pause) once. The 100 ms snapshots and the
    // client's ARP view cover what is shorter.
    add(1, short, None);
    add(2, short, None);
    std::thread::sleep(Duration::from_millis(50));
    del(1, short);
    del(2, short);
    // node-1's lifetime runs out 1 s after node-2 took the address.
    add(1, expiring, Some("2"));
    std::thread::sleep(Duration::from_secs(1));
    add(2, expiring, None);
    // A clean move.
    add(1, clean, None);
    del(1, clean);
    add(3, clean, None);
    del(1, handover);
    std::thread::sleep(Duration::from_millis(50));
    add(2, handover, None);
    std::thread::sleep(Duration::from_millis(2500));
    del(2, expiring);
    del(3, clean);
    del(2, handover);
    std::thread::sleep(Duration::from_millis(300));
    let seen = detector.stop();
    let probed = arp.stop();
    // The client's view: two MACs answered for the VIP held twice for 1 s,
    // never for the clean move.
    let macs: Vec<String> = [1u8, 2]
        .iter()
        .map(|i| ha::mac_of(&nodes::node_ns(*i), nodes::NS_IFACE).unwrap())
        .collect();
    let twice = probed
        .windows
        .iter()
        .find(|w| w.vip.to_string() == expiring)
        .unwrap_or_else(|| panic!("the client never heard two MACs for {expiring}: {probed:?}"));
    let mut heard = twice.macs.clone();
    heard.sort();
    let mut want = macs.clone();
    want.sort();
    assert_eq!(heard, want, "{probed:?}");
    assert!(
        twice.to - twice.from >= Duration::from_millis(500),
        "{expiring} was answered twice for about 1 s: {twice:?}"
    );
    assert!(
        !probed.windows.iter().any(|w| w.vip.to_string() == handover),
        "the client heard two MACs for a handover: {probed:?}"
    );
    assert!(probed.requests > 100 && probed.replies > 100, "{probed:?}");
    let window = |vip: &str| seen.windows.iter().find(|w| w.vip == vip).cloned();
    let w = window(short).unwrap_or_else(|| panic!("two holders of {short} not seen: {seen:?}"));
    assert_eq!(w.nodes, vec![1, 2]);
    let w =
        window(expiring).unwrap_or_else(|| panic!("two holders of {expiring} not seen: {seen:?}"));
    assert_eq!(w.nodes, vec![1, 2]);
    assert!(
        (Duration::from_millis(500)..Duration::from_millis(1600)).contains(&(w.to - w.from)),
        "{expiring} was held twice for about 1 s until node-1's lifetime ran out: {w:?}"
    );
    assert!(
        window(clean).is_none() && window(handover).is_none(),
        "a clean move was reported: {seen:?}"
    );
    assert!(seen.max_gap < ha::MAX_SAMPLE_GAP, "{seen:?}");
}
