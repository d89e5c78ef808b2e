//! Partitions: a packet filter inside a node's namespace (nft, else
//! iptables) that cuts it off from the API server, and its removal.

use std::net::Ipv4Addr;
use std::process::Stdio;

use anyhow::{Context, bail};

use super::{exec_in, find_on_path, run, run_with_stdin};

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
