//! Node faults: a node cut off from the API server and healed, powered off
//! and booted again with only its own addresses.

use std::fs;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::{Lab, Ports};
use crate::nodes::{self, HOST_IP};

impl Lab {
    /// Cuts node `i` off from the API server: inside its namespace, a packet
    /// filter drops TCP to and from the API server's address and port (nft
    /// when installed, else iptables). The rest of the segment still works.
    /// Idempotent; undone by [`Lab::heal`].
    pub fn partition(&self, i: u8) -> anyhow::Result<()> {
        self.check_node(i)?;
        nodes::partition_ns(&nodes::node_ns(i), HOST_IP, Ports::from_env()?.apiserver)
    }

    /// Undoes [`Lab::partition`] for node `i`. Idempotent.
    pub fn heal(&self, i: u8) -> anyhow::Result<()> {
        self.check_node(i)?;
        nodes::heal_ns(&nodes::node_ns(i), HOST_IP, Ports::from_env()?.apiserver)
    }

    /// Node `i` loses power: its link to the bridge goes down, then every
    /// process in its namespace (agent, hooks, whatever else) is killed at
    /// once. The link goes first, so nothing a dying process sends reaches
    /// the wire (a keepalived whose VRRP child sees its parent die sends a
    /// priority-0 advertisement, a goodbye no powered-off machine sends).
    /// Returns how many processes were killed. Its addresses stay
    /// configured meanwhile, off the wire (the kernel still expires a VIP's
    /// lifetime); [`Lab::power_on`] boots it with its own addresses only and
    /// starts nothing.
    pub fn power_off(&self, i: u8) -> anyhow::Result<usize> {
        self.check_node(i)?;
        let ns = nodes::node_ns(i);
        nodes::set_link(&nodes::node_link(i), false)?;
        // A kubelet node: its kubelet, containerd, shims and pods (those
        // with a network namespace of their own too) die with it.
        let killed = if self.has_kubelet(i) {
            self.kill_node_services(i)
        } else {
            0
        };
        let pids = nodes::ns_pids(&ns);
        nodes::signal_pids(&pids, nix::sys::signal::Signal::SIGKILL);
        if !nodes::wait_dead(&pids, Duration::from_secs(5)) {
            bail!("processes in {ns} survived SIGKILL for 5 s");
        }
        let _ = fs::remove_file(self.agent_pid_file(i));
        Ok(killed + pids.len())
    }

    /// Node `i` boots after [`Lab::power_off`]: like a machine after power
    /// loss it comes back with only its own addresses (a VIP it held is
    /// gone) and no nftables tables of the agent's, then its link to the
    /// bridge comes up. Every address on its
    /// interface other than [`nodes::node_ip`], [`nodes::node_ip6`] and IPv6
    /// link-local (fe80::/10) is removed before the link is up, so nothing
    /// it held before the power loss reaches the wire again. The boot gets a
    /// new boot id (the next agent started gets it as `KUBEHA_BOOT_ID`),
    /// and the agent's state folder is emptied, as a reboot empties the
    /// tmpfs `/run`. Starts nothing (no agent), except on a kubelet node
    /// ([`Lab::up_with_kubelets`]): there containerd, the kubelet and
    /// kube-proxy start again, and the kubelet its pods. A node that is on
    /// (its link up) is left untouched.
    pub fn power_on(&self, i: u8) -> anyhow::Result<()> {
        self.boot(i, false)
    }

    /// [`Lab::power_on`] for a host whose agent state folder is on a disk:
    /// the status file from before the power loss is still there, and only
    /// the boot id tells the agent it is from another boot.
    pub fn power_on_keeping_state(&self, i: u8) -> anyhow::Result<()> {
        self.boot(i, true)
    }

    /// The file holding node `i`'s emulated boot id.
    pub(super) fn boot_id_file(&self, i: u8) -> std::path::PathBuf {
        self.node_dir(i).join("boot_id")
    }

    fn boot(&self, i: u8, keep_state: bool) -> anyhow::Result<()> {
        self.check_node(i)?;
        let link = nodes::node_link(i);
        if host_link_up(&link)? {
            return Ok(());
        }
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .context("reading a new UUID from the kernel")?;
        fs::create_dir_all(self.node_dir(i))?;
        fs::write(self.boot_id_file(i), boot_id.trim())?;
        if !keep_state {
            let run = self.node_dir(i).join("run");
            if run.exists() {
                fs::remove_dir_all(&run).with_context(|| format!("emptying {}", run.display()))?;
            }
            fs::create_dir_all(&run)?;
        }
        let ns = nodes::node_ns(i);
        // A reboot empties nftables too: the agents' packet fences go.
        for family in ["arp", "inet"] {
            let _ = nodes::exec_in(&ns, &["nft", "delete", "table", family, "kubeha"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let (v4, v6) = (nodes::node_ip(i)?, nodes::node_ip6(i)?);
        let own = |a: &IpAddr| *a == IpAddr::V4(v4) || *a == IpAddr::V6(v6) || is_link_local(a);
        for (addr, prefix) in ns_iface_addresses(&ns)? {
            if !own(&addr) {
                // May fail when deleting an earlier (primary) address took
                // this one with it: checked below.
                let _ = ip_ok(&[
                    "-n",
                    &ns,
                    "addr",
                    "del",
                    &format!("{addr}/{prefix}"),
                    "dev",
                    nodes::NS_IFACE,
                ]);
            }
        }
        let left = ns_iface_addresses(&ns)?;
        let foreign: Vec<String> = left
            .iter()
            .filter(|(a, _)| !own(a))
            .map(|(a, p)| format!("{a}/{p}"))
            .collect();
        if !foreign.is_empty() {
            bail!(
                "powering on {}: addresses {foreign:?} are still on {} in {ns}; the link stays down",
                nodes::node_name(i),
                nodes::NS_IFACE
            );
        }
        // Its own configuration comes back with the boot, should anything
        // have removed it.
        if !left.iter().any(|(a, _)| *a == IpAddr::V4(v4)) {
            ip_ok(&[
                "-n",
                &ns,
                "addr",
                "replace",
                &format!("{v4}/{}", nodes::PREFIX_LEN_V4),
                "dev",
                nodes::NS_IFACE,
            ])?;
        }
        if !left.iter().any(|(a, _)| *a == IpAddr::V6(v6)) {
            ip_ok(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "replace",
                &format!("{v6}/{}", nodes::PREFIX_LEN_V6),
                "dev",
                nodes::NS_IFACE,
                "nodad",
            ])?;
        }
        nodes::set_link(&link, true)?;
        if self.has_kubelet(i) {
            // Its services start with the boot, as a machine's init starts
            // them; the kubelet then runs the node's pods again.
            self.boot_node_services(i)?;
        }
        Ok(())
    }
}

/// Runs `ip ARGS`; fails with its stderr unless it succeeds; its stdout.
fn ip_ok(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Whether host link `name` is administratively up.
fn host_link_up(name: &str) -> anyhow::Result<bool> {
    let out = ip_ok(&["-j", "link", "show", "dev", name])?;
    let links: serde_json::Value =
        serde_json::from_slice(&out).context("parsing `ip -j link show`")?;
    Ok(links[0]["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "UP")))
}

/// Every address on [`nodes::NS_IFACE`] inside namespace `ns`, with its
/// prefix length.
fn ns_iface_addresses(ns: &str) -> anyhow::Result<Vec<(IpAddr, u8)>> {
    let out = ip_ok(&["-n", ns, "-j", "addr", "show", "dev", nodes::NS_IFACE])?;
    parse_addresses(&out)
}

/// The addresses (with prefix lengths) in `ip -j addr show` output.
fn parse_addresses(json: &[u8]) -> anyhow::Result<Vec<(IpAddr, u8)>> {
    let ifaces: serde_json::Value =
        serde_json::from_slice(json).context("parsing `ip -j addr show`")?;
    let mut found = Vec::new();
    for info in ifaces
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["addr_info"].as_array())
        .flatten()
    {
        let (Some(local), Some(prefix)) = (info["local"].as_str(), info["prefixlen"].as_u64())
        else {
            continue;
        };
        let addr: IpAddr = local
            .parse()
            .with_context(|| format!("`ip` printed {local:?} as an address"))?;
        let prefix = u8::try_from(prefix).context("prefix length out of range")?;
        found.push((addr, prefix));
    }
    Ok(found)
}

/// IPv6 link-local, fe80::/10.
fn is_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_from_ip_json_and_link_local_is_recognised() {
        let json = br#"[{"ifindex":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP"],"addr_info":[
            {"family":"inet","local":"198.18.0.11","prefixlen":24,"scope":"global"},
            {"family":"inet","local":"198.18.0.110","prefixlen":24,"scope":"global","secondary":true},
            {"family":"inet6","local":"2001:db8::100","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1c2b:3cff:fe4d:5e6f","prefixlen":64,"scope":"link"},
            {}]}]"#;
        let found = parse_addresses(json).unwrap();
        let text: Vec<String> = found.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        assert_eq!(
            text,
            [
                "198.18.0.11/24",
                "198.18.0.110/24",
                "2001:db8::100/64",
                "fe80::1c2b:3cff:fe4d:5e6f/64"
            ]
        );
        assert!(parse_addresses(b"[]").unwrap().is_empty());
        assert!(parse_addresses(b"not json").is_err());
        let ll = |a: &str| is_link_local(&a.parse().unwrap());
        assert!(ll("fe80::1") && ll("febf::1"));
        assert!(!ll("fec0::1") && !ll("2001:db8::b") && !ll("198.18.0.11"));
    }
}
