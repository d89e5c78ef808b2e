//! What the segment shows: the addresses on each node, the holders of a
//! VIP, MACs, and what the client reaches.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::nodes;

/// Whether `vip` (address without prefix) is on any interface of lab node `i`.
pub fn vip_on_node(i: u8, vip: &str) -> bool {
    addresses_of(i).iter().any(|a| a == vip)
}

/// Every address configured on lab node `i` now, without prefixes.
fn addresses_of(i: u8) -> Vec<String> {
    list_addresses(addr_command(i).output().ok())
}

/// `ip -o addr show` in node `i`'s namespace.
fn addr_command(i: u8) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &nodes::node_ns(i), "-o", "addr", "show"]);
    cmd
}

/// The addresses, without prefixes, in the output of `ip -o addr show`.
fn list_addresses(out: Option<std::process::Output>) -> Vec<String> {
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter(|w| w.contains('/'))
            .filter_map(|w| w.split('/').next().map(str::to_owned))
            .collect()
    })
    .unwrap_or_default()
}

/// Every address configured on each existing lab node now (without
/// prefixes): one `ip` call per node, all started at once.
pub fn node_addresses() -> Vec<(u8, Vec<String>)> {
    let running: Vec<(u8, Option<Child>)> = (1..=nodes::MAX_NODES)
        .filter(|i| nodes::ns_exists(&nodes::node_ns(*i)))
        .map(|i| {
            let child = addr_command(i)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok();
            (i, child)
        })
        .collect();
    running
        .into_iter()
        .map(|(i, child)| {
            (
                i,
                list_addresses(child.and_then(|c| c.wait_with_output().ok())),
            )
        })
        .collect()
}

/// Lab nodes on which `vip` (address without prefix) is configured now.
pub fn vip_holders(vip: &str) -> Vec<u8> {
    node_addresses()
        .into_iter()
        .filter(|(_, addrs)| addrs.iter().any(|a| a == vip))
        .map(|(i, _)| i)
        .collect()
}

/// Whether the client reaches `vip` and resolved it to node `i`'s MAC.
pub fn client_reaches(vip: &str, i: u8) -> bool {
    let ping = nodes::exec_in(nodes::CLIENT_NS, &["ping", "-c", "1", "-W", "1", vip])
        .output()
        .is_ok_and(|o| o.status.success());
    let mac = mac_of(&nodes::node_ns(i), nodes::NS_IFACE).unwrap_or_default();
    let neigh = nodes::exec_in(nodes::CLIENT_NS, &["ip", "neigh", "show", vip])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_lowercase())
        .unwrap_or_default();
    ping && !mac.is_empty() && neigh.contains(&mac)
}

/// What a TCP server on `vip:port` sends the client namespace before it
/// closes the connection (at most 1 KiB, within 1 s), or `None` if nothing
/// accepted the connection.
pub fn client_tcp_reply(vip: &str, port: u16) -> Option<String> {
    use std::io::Read;
    let addr: std::net::SocketAddr = format!("{vip}:{port}").parse().ok()?;
    // A thread of its own enters the client's network namespace.
    std::thread::spawn(move || {
        nodes::enter_ns(nodes::CLIENT_NS).ok()?;
        let stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .ok()?;
        let mut reply = Vec::new();
        stream.take(1024).read_to_end(&mut reply).ok()?;
        Some(String::from_utf8_lossy(&reply).into_owned())
    })
    .join()
    .ok()
    .flatten()
}

/// The MAC address of `iface` in network namespace `ns`, lowercase.
pub fn mac_of(ns: &str, iface: &str) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", iface])
        .output()?;
    let links: Value = serde_json::from_slice(&out.stdout).context("parsing `ip -j link`")?;
    links[0]["address"]
        .as_str()
        .map(str::to_lowercase)
        .context("no MAC address")
}
