//! The lab's nodes: an isolated L2 segment on this machine.
//!
//! A bridge, [`BRIDGE`], that no uplink joins; one network namespace per node
//! (`kubeha-node-1..N`) and one for the client that probes the VIPs
//! ([`CLIENT_NS`]), each joined to the bridge by a veth pair whose host end is
//! named `kh-nI` (`kh-cl` for the client) and whose namespace end is `eth0`.
//! Addresses come from 198.18.0.0/24 and 2001:db8::/64: the host end of the
//! bridge (where the API server listens) is [`HOST_IP`]/[`HOST_IP6`], node `i`
//! is `.10+i`, the client `.200`. No namespace gets a default route, so no
//! traffic leaves the segment.
//!
//! Everything is named by prefix (`kubeha-` for the bridge and namespaces,
//! `kh-` for host-side links), so [`Segment::down`] removes it all, also what a
//! killed run left behind. Built with iproute2's `ip`; needs root.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Prefix of every network namespace and of the bridge the lab creates.
pub const NS_PREFIX: &str = "kubeha-";
/// Prefix of the host-side veth ends the lab creates.
pub const LINK_PREFIX: &str = "kh-";
/// The segment's bridge (no uplink joins it).
pub const BRIDGE: &str = "kubeha-br0";
/// The client network namespace (probes VIPs from inside the segment).
pub const CLIENT_NS: &str = "kubeha-client";
/// Host-side veth end of the client namespace.
pub const CLIENT_LINK: &str = "kh-cl";
/// Name of the segment's interface inside every namespace.
pub const NS_IFACE: &str = "eth0";
/// The host's IPv4 address on the bridge; the API server listens here.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The host's IPv6 address on the bridge.
pub const HOST_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// IPv4 prefix length of the segment (198.18.0.0/24).
pub const PREFIX_LEN_V4: u8 = 24;
/// IPv6 prefix length of the segment (2001:db8::/64).
pub const PREFIX_LEN_V6: u8 = 64;
/// The most nodes a segment holds (node addresses stay below the client's).
pub const MAX_NODES: u8 = 100;

const CLIENT_HOST_PART: u8 = 200;
const NETNS_DIR: &str = "/run/netns";

/// Kubernetes Node name of lab node `i` (`node-i`).
pub fn node_name(i: u8) -> String {
    format!("node-{i}")
}

/// Network namespace of lab node `i` (`kubeha-node-i`).
pub fn node_ns(i: u8) -> String {
    format!("{NS_PREFIX}node-{i}")
}

/// Host-side veth end of lab node `i` (`kh-ni`); its peer is `eth0` inside
/// the node's namespace.
pub fn node_link(i: u8) -> String {
    format!("{LINK_PREFIX}n{i}")
}

/// The client network namespace.
pub fn client_ns() -> &'static str {
    CLIENT_NS
}

/// IPv4 address of lab node `i`: 198.18.0.(10+i).
pub fn node_ip(i: u8) -> anyhow::Result<Ipv4Addr> {
    check_index(i)?;
    Ok(Ipv4Addr::new(198, 18, 0, 10 + i))
}

/// IPv6 address of lab node `i`: 2001:db8::(10+i), e.g. `2001:db8::b`.
pub fn node_ip6(i: u8) -> anyhow::Result<Ipv6Addr> {
    check_index(i)?;
    Ok(Ipv6Addr::new(
        0x2001,
        0xdb8,
        0,
        0,
        0,
        0,
        0,
        10 + u16::from(i),
    ))
}

/// IPv4 address of the client namespace: 198.18.0.200.
pub fn client_ip() -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, CLIENT_HOST_PART)
}

/// IPv6 address of the client namespace: 2001:db8::c8.
pub fn client_ip6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(CLIENT_HOST_PART))
}

/// Fails unless `i` names a node a segment can hold (1..=[`MAX_NODES`]).
pub fn check_index(i: u8) -> anyhow::Result<()> {
    if i == 0 || i > MAX_NODES {
        bail!("lab nodes are numbered 1..={MAX_NODES}; there is no node {i}");
    }
    Ok(())
}

/// Moves the calling thread into network namespace `ns` (for good: use a
/// thread of its own).
pub fn enter_ns(ns: &str) -> anyhow::Result<()> {
    let path = format!("{NETNS_DIR}/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {ns}"))
}

/// `ip netns exec NS argv...`: a command that runs `argv` inside network
/// namespace `ns`. Empty `argv` gives a command that fails when run.
pub fn exec_in<S: AsRef<OsStr>>(ns: &str, argv: &[S]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(argv);
    cmd
}

/// Whether network namespace `ns` exists.
pub fn ns_exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// What stops this process from building the segment, given its effective
/// uid and `PATH`: one sentence per missing piece, empty when nothing is.
pub fn missing_prerequisites(euid: u32, path: Option<&OsStr>) -> Vec<String> {
    let mut missing = Vec::new();
    if euid != 0 {
        missing.push(format!(
            "root: the lab creates a bridge and network namespaces and this process runs as uid {euid}; \
             run it as root (e.g. `sudo -E env PATH=$PATH cargo xtask lab up`)"
        ));
    }
    if find_on_path("ip", path).is_none() {
        missing.push(
            "iproute2: `ip` is not on PATH; install it (e.g. `apt-get install iproute2`)".into(),
        );
    }
    missing
}

/// Fails with a message naming what is missing (root, iproute2's `ip`) when
/// this process cannot build the segment.
pub fn check_prerequisites() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH");
    let missing = missing_prerequisites(nix::unistd::geteuid().as_raw(), path.as_deref());
    if !missing.is_empty() {
        bail!(
            "the lab's network segment cannot be built; missing: {}",
            missing.join("; ")
        );
    }
    Ok(())
}

/// The tools the whole lab runs besides the segment's (see
/// [`missing_prerequisites`]): a command that must be on `PATH` (any one of
/// several names), the Debian package that brings it, and what it is for.
const LAB_TOOLS: &[(&[&str], &str, &str)] = &[
    (
        &["go"],
        "golang-go",
        "builds etcd, kube-apiserver, kubectl and helm",
    ),
    (
        &["openssl"],
        "openssl",
        "makes the control plane's certificates",
    ),
    (&["nft", "iptables"], "nftables", "partitions nodes"),
    (
        &["tcpdump"],
        "tcpdump",
        "watches gratuitous ARP and neighbour advertisements",
    ),
    (&["ping"], "iputils-ping", "probes the VIPs"),
];

/// Everything the lab (demo, tests, benchmarks) needs that this process
/// lacks, given its effective uid and `PATH`: the segment's prerequisites,
/// then one sentence per missing tool naming its package, then one install
/// command for all of them. Empty when nothing is missing.
pub fn missing_lab_prerequisites(euid: u32, path: Option<&OsStr>) -> Vec<String> {
    let mut missing = missing_prerequisites(euid, path);
    let mut packages: Vec<&str> = Vec::new();
    if find_on_path("ip", path).is_none() {
        packages.push("iproute2");
    }
    for (commands, package, purpose) in LAB_TOOLS {
        if commands.iter().all(|c| find_on_path(c, path).is_none()) {
            missing.push(format!(
                "{package}: `{}` is not on PATH (it {purpose})",
                commands.join("` or `")
            ));
            packages.push(package);
        }
    }
    if !packages.is_empty() {
        missing.push(format!(
            "install with `apt-get install -y {}`",
            packages.join(" ")
        ));
    }
    missing
}

/// Fails, before anything is built or started, with a message naming every
/// missing prerequisite of the lab and the command that installs them.
pub fn check_lab_prerequisites() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH");
    let missing = missing_lab_prerequisites(nix::unistd::geteuid().as_raw(), path.as_deref());
    if !missing.is_empty() {
        bail!("the lab cannot run; missing: {}", missing.join("; "));
    }
    Ok(())
}

/// The first executable file called `name` in the folders of `path`.
pub fn find_on_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The packet filter used to partition nodes: `nft` when installed (the
/// `nftables` package `.ci/run` installs), else `iptables`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firewall {
    /// nftables' `nft`.
    Nft,
    /// `iptables` (legacy or nf_tables backend).
    Iptables,
}

impl Firewall {
    /// The filter available on this machine; fails naming the package when
    /// there is none.
    pub fn detect() -> anyhow::Result<Self> {
        let path = std::env::var_os("PATH");
        if find_on_path("nft", path.as_deref()).is_some() {
            Ok(Self::Nft)
        } else if find_on_path("iptables", path.as_deref()).is_some() {
            Ok(Self::Iptables)
        } else {
            bail!(
                "partitioning a lab node needs a packet filter and neither `nft` nor `iptables` is on PATH; \
                 install nftables (e.g. `apt-get install nftables`)"
            )
        }
    }
}

const PARTITION_TABLE: &str = "kubeha_partition";

/// Drops, inside namespace `ns`, every TCP packet to or from `peer:port`
/// (the node can no longer reach the API server; the rest of the segment
/// still works). Idempotent.
pub fn partition_ns(ns: &str, peer: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    match Firewall::detect()? {
        Firewall::Nft => {
            // Declaring then deleting the table makes the script idempotent.
            let script = format!(
                "table inet {t}\ndelete table inet {t}\n\
                 table inet {t} {{\n\
                 \x20 chain output {{ type filter hook output priority 0; policy accept; ip daddr {peer} tcp dport {port} drop; }}\n\
                 \x20 chain input {{ type filter hook input priority 0; policy accept; ip saddr {peer} tcp sport {port} drop; }}\n\
                 }}\n",
                t = PARTITION_TABLE
            );
            run_with_stdin(exec_in(ns, &["nft", "-f", "-"]), &script)
        }
        Firewall::Iptables => {
            for rule in iptables_rules(peer, port) {
                let check = exec_in(ns, &["iptables", "-C"])
                    .args(&rule)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .context("running iptables")?;
                if !check.success() {
                    run(exec_in(ns, &["iptables", "-A"]).args(&rule))?;
                }
            }
            Ok(())
        }
    }
}

/// Removes what [`partition_ns`] added in `ns`. Idempotent.
pub fn heal_ns(ns: &str, peer: Ipv4Addr, port: u16) -> anyhow::Result<()> {
    match Firewall::detect()? {
        Firewall::Nft => {
            let script = format!(
                "table inet {t}\ndelete table inet {t}\n",
                t = PARTITION_TABLE
            );
            run_with_stdin(exec_in(ns, &["nft", "-f", "-"]), &script)
        }
        Firewall::Iptables => {
            for rule in iptables_rules(peer, port) {
                // -D removes one copy per call; stop when none is left.
                while exec_in(ns, &["iptables", "-D"])
                    .args(&rule)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .context("running iptables")?
                    .success()
                {}
            }
            Ok(())
        }
    }
}

fn iptables_rules(peer: Ipv4Addr, port: u16) -> [Vec<String>; 2] {
    let (peer, port) = (peer.to_string(), port.to_string());
    let rule = |chain: &str, addr: &str, port_flag: &str| -> Vec<String> {
        [
            chain, addr, &peer, "-p", "tcp", port_flag, &port, "-j", "DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    [
        rule("OUTPUT", "-d", "--dport"),
        rule("INPUT", "-s", "--sport"),
    ]
}

/// The lab's segment: bridge, client namespace and `nodes` node namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    nodes: u8,
}

/// What [`Segment::down`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Teardown {
    /// Processes stopped because they ran inside a lab namespace.
    pub processes: usize,
    /// Network namespaces deleted.
    pub namespaces: Vec<String>,
    /// Host links deleted (veth peers inside namespaces go with them).
    pub links: Vec<String>,
}

impl Segment {
    /// Builds (or completes) the bridge, the client namespace and node
    /// namespaces `1..=nodes`. Idempotent: what exists and is configured is
    /// reused untouched (a powered-off or partitioned node stays so); nodes
    /// above `nodes` from an earlier call are left in place.
    pub fn up(nodes: u8) -> anyhow::Result<Self> {
        check_prerequisites()?;
        if nodes > MAX_NODES {
            bail!("a lab segment holds at most {MAX_NODES} nodes, not {nodes}");
        }
        ensure_bridge()?;
        ensure_member(CLIENT_NS, CLIENT_LINK, client_ip(), client_ip6())?;
        for i in 1..=nodes {
            ensure_member(&node_ns(i), &node_link(i), node_ip(i)?, node_ip6(i)?)?;
        }
        Ok(Self { nodes })
    }

    /// How many nodes this segment was brought up with.
    pub fn nodes(&self) -> u8 {
        self.nodes
    }

    /// Removes every network namespace named `kubeha-*` (stopping the
    /// processes inside first) and every host link named `kubeha-*` or
    /// `kh-*`: this segment, and what a killed run left. Idempotent; fails if
    /// something with the prefix is still there afterwards.
    pub fn down() -> anyhow::Result<Teardown> {
        let mut done = Teardown::default();
        let namespaces = lab_namespaces();
        let links = lab_links();
        if namespaces.is_empty() && links.is_empty() {
            return Ok(done);
        }
        check_prerequisites()?;
        for ns in &namespaces {
            done.processes += stop_pids(&ns_pids(ns), Duration::from_secs(5));
        }
        for link in &links {
            // Deleting one veth end deletes its peer; a link gone already is fine.
            let _ = quiet(Command::new("ip").args(["link", "delete", link]));
            done.links.push(link.clone());
        }
        for ns in &namespaces {
            let _ = quiet(Command::new("ip").args(["netns", "delete", ns]));
            done.namespaces.push(ns.clone());
        }
        let (ns_left, links_left) = (lab_namespaces(), lab_links());
        if !ns_left.is_empty() || !links_left.is_empty() {
            bail!(
                "tearing down the lab segment left namespaces {ns_left:?} and links {links_left:?}"
            );
        }
        Ok(done)
    }
}

/// Creates the bridge with the host addresses, or reuses it. The API server
/// binds [`HOST_IP`], so this runs before it starts.
pub fn ensure_bridge() -> anyhow::Result<()> {
    check_prerequisites()?;
    if !link_exists(BRIDGE) {
        // No STP, no forwarding delay, no multicast snooping: a port forwards
        // the moment it joins, and neighbour discovery is never filtered.
        run(Command::new("ip").args([
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ]))?;
    }
    run(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;
    run(Command::new("ip").args([
        "addr",
        "replace",
        &format!("{HOST_IP}/{PREFIX_LEN_V4}"),
        "dev",
        BRIDGE,
    ]))?;
    run(Command::new("ip").args([
        "-6",
        "addr",
        "replace",
        &format!("{HOST_IP6}/{PREFIX_LEN_V6}"),
        "dev",
        BRIDGE,
        "nodad",
    ]))?;
    Ok(())
}

/// One namespace on the segment: `link` on the bridge, `eth0` inside with
/// the two addresses, loopback up, IPv6 DAD off. Reused untouched when `eth0`
/// is up with its IPv4 address and `link` is a port of the bridge.
fn ensure_member(ns: &str, link: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> anyhow::Result<()> {
    if !ns_exists(ns) {
        run(Command::new("ip").args(["netns", "add", ns]))?;
    }
    if member_configured(ns, link, v4) {
        return Ok(());
    }
    run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]))?;
    if !ns_link_exists(ns, NS_IFACE) {
        // A host end without its peer (killed run) would block the name.
        let _ = quiet(Command::new("ip").args(["link", "delete", link]));
        run(Command::new("ip").args([
            "link", "add", link, "type", "veth", "peer", "name", NS_IFACE, "netns", ns,
        ]))?;
    }
    // Before any address exists: addresses (link-local included) are usable at
    // once instead of after duplicate address detection.
    run(&mut exec_in(
        ns,
        &[
            "sh",
            "-c",
            &format!("echo 0 > /proc/sys/net/ipv6/conf/{NS_IFACE}/accept_dad"),
        ],
    ))?;
    run(Command::new("ip").args(["link", "set", link, "master", BRIDGE, "up"]))?;
    run(Command::new("ip").args([
        "-n",
        ns,
        "addr",
        "replace",
        &format!("{v4}/{PREFIX_LEN_V4}"),
        "dev",
        NS_IFACE,
    ]))?;
    run(Command::new("ip").args([
        "-n",
        ns,
        "-6",
        "addr",
        "replace",
        &format!("{v6}/{PREFIX_LEN_V6}"),
        "dev",
        NS_IFACE,
        "nodad",
    ]))?;
    run(Command::new("ip").args(["-n", ns, "link", "set", NS_IFACE, "up"]))?;
    Ok(())
}

fn member_configured(ns: &str, link: &str, v4: Ipv4Addr) -> bool {
    // The host end must still be a port of the bridge (a bridge deleted and
    // created again has no ports).
    let on_bridge = Command::new("ip")
        .args(["-j", "link", "show", "dev", link])
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
        .is_some_and(|v| v[0]["master"] == BRIDGE);
    if !on_bridge {
        return false;
    }
    let Ok(out) = Command::new("ip")
        .args(["-n", ns, "-j", "addr", "show", "dev", NS_IFACE])
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return false;
    };
    let want = v4.to_string();
    json.as_array().into_iter().flatten().any(|iface| {
        let up = iface["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "UP"));
        let has_addr = iface["addr_info"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["local"] == want.as_str()));
        up && has_addr
    })
}

/// Whether host link `name` exists.
pub fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ns_link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sets host link `name` up or down.
pub fn set_link(name: &str, up: bool) -> anyhow::Result<()> {
    run(Command::new("ip").args(["link", "set", name, if up { "up" } else { "down" }]))
}

/// Network namespaces whose name starts with [`NS_PREFIX`].
pub fn lab_namespaces() -> Vec<String> {
    ip_json_names(&["-j", "netns", "list"], "name", |n| {
        n.starts_with(NS_PREFIX)
    })
}

/// Host links whose name starts with [`NS_PREFIX`] or [`LINK_PREFIX`].
pub fn lab_links() -> Vec<String> {
    ip_json_names(&["-j", "link", "show"], "ifname", |n| {
        n.starts_with(NS_PREFIX) || n.starts_with(LINK_PREFIX)
    })
}

/// The `key` field of every object `ip ARGS` prints as JSON, kept when
/// `keep` says so, sorted. Nothing when `ip` fails.
fn ip_json_names(args: &[&str], key: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(args).stderr(Stdio::null()).output() else {
        return Vec::new();
    };
    let mut names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|o| o[key].as_str().map(str::to_owned))
        .filter(|n| keep(n))
        .collect();
    names.sort();
    names
}

/// Processes running inside network namespace `ns` (`ip netns pids`).
pub fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|p| *p != std::process::id() as i32)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` lives and runs inside network namespace `ns`.
pub fn pid_in_ns(pid: i32, ns: &str) -> bool {
    if is_dead(pid) {
        return false;
    }
    match (
        std::fs::metadata(format!("/proc/{pid}/ns/net")),
        std::fs::metadata(Path::new(NETNS_DIR).join(ns)),
    ) {
        (Ok(proc_ns), Ok(named)) => proc_ns.dev() == named.dev() && proc_ns.ino() == named.ino(),
        _ => false,
    }
}

/// Gone, or a zombie (exited, not yet reaped).
pub fn is_dead(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Sends `signal` to each of `pids`, ignoring those already gone.
pub fn signal_pids(pids: &[i32], signal: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
    }
}

/// Waits up to `timeout` for every one of `pids` to be dead; whether they are.
pub fn wait_dead(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|p| is_dead(*p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then SIGKILL after `grace`, to `pids`. Returns how many there were.
pub fn stop_pids(pids: &[i32], grace: Duration) -> usize {
    use nix::sys::signal::Signal;
    if pids.is_empty() {
        return 0;
    }
    signal_pids(pids, Signal::SIGTERM);
    if !wait_dead(pids, grace) {
        signal_pids(pids, Signal::SIGKILL);
        wait_dead(pids, Duration::from_secs(5));
    }
    pids.len()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn quiet(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

fn run_with_stdin(mut cmd: Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", describe(&cmd)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(node_ip(1).unwrap(), Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(node_ip6(1).unwrap().to_string(), "2001:db8::b");
        assert_eq!(node_ip6(3).unwrap().to_string(), "2001:db8::d");
        assert_eq!(client_ip6().to_string(), "2001:db8::c8");
        assert_eq!(node_ip(MAX_NODES).unwrap(), Ipv4Addr::new(198, 18, 0, 110));
        assert!(node_ip(0).is_err());
        assert!(node_ip6(MAX_NODES + 1).is_err());
        assert_eq!(node_ns(2), "kubeha-node-2");
        assert_eq!(node_link(2), "kh-n2");
        assert!(node_link(MAX_NODES).len() <= 15, "IFNAMSIZ");
    }

    #[test]
    fn exec_in_wraps_ip_netns_exec() {
        let cmd = exec_in("kubeha-client", &["ping", "-c1", "198.18.0.11"]);
        assert_eq!(
            describe(&cmd),
            "ip netns exec kubeha-client ping -c1 198.18.0.11"
        );
    }
}
