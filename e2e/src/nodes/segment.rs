//! The segment itself: the bridge, one namespace per member joined to it
//! by a veth pair, and its teardown by name prefix.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::bail;

use super::{
    BRIDGE, CLIENT_LINK, CLIENT_NS, HOST_IP, HOST_IP6, LINK_PREFIX, MAX_NODES, NS_IFACE, NS_PREFIX,
    PREFIX_LEN_V4, PREFIX_LEN_V6, check_prerequisites, client_ip, client_ip6, exec_in, node_ip,
    node_ip6, node_link, node_ns, ns_exists, ns_pids, quiet, run, stop_pids,
};

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
