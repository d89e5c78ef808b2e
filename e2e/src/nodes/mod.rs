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

mod partition;
mod prerequisites;
mod processes;
mod segment;

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

pub use partition::{Firewall, heal_ns, partition_ns};
pub use prerequisites::{
    check_lab_prerequisites, check_prerequisites, find_on_path, missing_lab_prerequisites,
    missing_prerequisites,
};
pub use processes::{is_alive, is_dead, ns_pids, pid_in_ns, signal_pids, stop_pids, wait_dead};
pub use segment::{
    Segment, Teardown, ensure_bridge, lab_links, lab_namespaces, link_exists, set_link,
};

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

/// The lab node a Kubernetes Node name names (`node-i` gives `i`), if any.
pub fn node_index(name: &str) -> Option<u8> {
    name.strip_prefix("node-")?.parse().ok()
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
        assert_eq!(node_index(&node_name(7)), Some(7));
        assert_eq!(node_index("node-"), None);
        assert_eq!(node_index("worker-1"), None);
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
