//! The packet fence: a VIP stops answering at the end of its lease, to the
//! millisecond, even when the agent is frozen or killed.
//!
//! An address lifetime (`valid_lft`) counts whole seconds, so alone it would
//! keep a frozen node answering for up to a second past its lease, or forbid
//! a lease shorter than a couple of seconds. The packet fence keeps, per VIP
//! this node holds, two elements in nftables sets in the node's network
//! namespace ([`TABLES`]):
//!
//! - `held`: the address may be on an interface here. Its timeout outlasts
//!   the address lifetime by [`HELD_SLACK`], so it never ends while the
//!   kernel may still have the address, and a crashed agent's entries clean
//!   themselves up.
//! - `live`: the node may answer for it. Its timeout is the end of the lease
//!   less a margin ([`kubeha_crds::timing`]), set on entry and reset on every
//!   successful renew.
//!
//! Rules drop, for a VIP that is `held` and not `live`: ARP requests and
//! replies to it and ARP sent from it, IPv6 traffic to and from it (neighbour
//! advertisements the kernel sends for it carry it as source), and IPv4
//! traffic to and from it. The kernel expires `live` by itself: no process
//! has to run for the fence to close.
//!
//! A renew extends `live` only while it has not expired: the batch deletes
//! the element first, and nftables applies a batch atomically, so an expired
//! element (ENOENT) fails the whole batch and nothing is extended. An agent
//! that resumes after its lease ended therefore cannot open the fence again
//! behind the back of the node that took over; it gives the role up.
//!
//! Why nftables sets, chosen after measuring: the fence must close with no
//! process of ours running (DESIGN's kernel fence: a frozen or killed agent
//! cannot hold a VIP past its lease), at millisecond granularity, and be
//! extendable atomically only while still open. A set element's timeout is
//! all three: one with a 1.5 s timeout expired on time to the jiffy (4 ms
//! here), and a batch that deletes an expired element fails whole. The
//! address lifetime counts whole seconds; a route or rule change would need
//! a process to make it at the lease end; tc or eBPF would need a program
//! of ours loaded into the kernel.
//!
//! The tables, sets and rules are installed once, when the agent starts,
//! through the `nft` binary (`nft -f -`). Element changes go straight to
//! the kernel as one nf_tables netlink batch each ([`nf_netlink`]): a
//! timeout computed right before the send is the one the kernel applies,
//! microseconds later. An earlier version ran `nft` for every change too;
//! under load nft took 30-200 ms to apply a batch after it was written,
//! so a fence could end that much after the instant asked.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;

use super::VipError;
use super::nf_netlink::{self, FAMILY_ARP, FAMILY_INET, Op, Outcome, Set};

/// How much longer than the address lifetime a `held` element lasts: the
/// kernel removes an expired address up to about a second late.
pub const HELD_SLACK: Duration = Duration::from_secs(5);

/// Name of the nftables tables (family `arp` and family `inet`).
pub const TABLE: &str = "kubeha";

/// Everything the fence needs, idempotent: an agent that restarts keeps the
/// elements of the VIPs it re-adopts (sets are only added, never flushed)
/// and replaces its rules.
pub const TABLES: &str = "\
add table arp kubeha
add set arp kubeha held { type ipv4_addr; flags timeout; }
add set arp kubeha live { type ipv4_addr; flags timeout; }
add chain arp kubeha input { type filter hook input priority 0; policy accept; }
add chain arp kubeha output { type filter hook output priority 0; policy accept; }
flush chain arp kubeha input
flush chain arp kubeha output
add rule arp kubeha input arp daddr ip @held arp daddr ip != @live drop
add rule arp kubeha output arp saddr ip @held arp saddr ip != @live drop
add table inet kubeha
add set inet kubeha held4 { type ipv4_addr; flags timeout; }
add set inet kubeha live4 { type ipv4_addr; flags timeout; }
add set inet kubeha held6 { type ipv6_addr; flags timeout; }
add set inet kubeha live6 { type ipv6_addr; flags timeout; }
add chain inet kubeha input { type filter hook prerouting priority -300; policy accept; }
add chain inet kubeha output { type filter hook output priority -300; policy accept; }
flush chain inet kubeha input
flush chain inet kubeha output
add rule inet kubeha input ip daddr @held4 ip daddr != @live4 drop
add rule inet kubeha input ip6 daddr @held6 ip6 daddr != @live6 drop
add rule inet kubeha output ip saddr @held4 ip saddr != @live4 drop
add rule inet kubeha output ip6 saddr @held6 ip6 saddr != @live6 drop
";

const fn set(family: u8, name: &'static str) -> Set {
    Set {
        family,
        table: TABLE,
        name,
    }
}

/// The sets an address's `live` or `held` element sits in.
fn sets(addr: IpAddr, live: bool) -> &'static [Set] {
    const ARP_LIVE: Set = set(FAMILY_ARP, "live");
    const ARP_HELD: Set = set(FAMILY_ARP, "held");
    const LIVE4: Set = set(FAMILY_INET, "live4");
    const HELD4: Set = set(FAMILY_INET, "held4");
    const LIVE6: Set = set(FAMILY_INET, "live6");
    const HELD6: Set = set(FAMILY_INET, "held6");
    match (addr, live) {
        (IpAddr::V4(_), true) => &[ARP_LIVE, LIVE4],
        (IpAddr::V4(_), false) => &[ARP_HELD, HELD4],
        (IpAddr::V6(_), true) => &[LIVE6],
        (IpAddr::V6(_), false) => &[HELD6],
    }
}

/// Sets `addr`'s element in the `live` or `held` sets to `timeout`, whether
/// or not it exists (added, then deleted and added again: no ENOENT).
fn reset(out: &mut Vec<Op>, addr: IpAddr, live: bool, timeout: Duration) {
    for s in sets(addr, live) {
        out.push(Op::Add(*s, addr, Duration::from_millis(1)));
        out.push(Op::Delete(*s, addr));
        out.push(Op::Add(*s, addr, timeout));
    }
}

/// Removes `addr`'s element from the `live` or `held` sets, if there.
fn remove(out: &mut Vec<Op>, addr: IpAddr, live: bool) {
    for s in sets(addr, live) {
        out.push(Op::Add(*s, addr, Duration::from_millis(1)));
        out.push(Op::Delete(*s, addr));
    }
}

/// The batch that opens the fence of `addr` for `live` and marks it held
/// for `held` (entry).
pub fn open_batch(addr: IpAddr, live: Duration, held: Duration) -> Vec<Op> {
    let mut out = Vec::new();
    reset(&mut out, addr, false, held);
    reset(&mut out, addr, true, live);
    out
}

/// The batch that extends an open fence of `addr` (a renew): it fails, as a
/// whole, when the `live` element expired.
pub fn extend_batch(addr: IpAddr, live: Duration, held: Duration) -> Vec<Op> {
    let mut out = Vec::new();
    for s in sets(addr, true) {
        out.push(Op::Delete(*s, addr));
        out.push(Op::Add(*s, addr, live));
    }
    reset(&mut out, addr, false, held);
    out
}

/// The batch that closes the fence of `addr` (it stops answering at once).
pub fn close_batch(addr: IpAddr) -> Vec<Op> {
    let mut out = Vec::new();
    remove(&mut out, addr, true);
    out
}

/// The batch that forgets `addr` once its address is gone.
pub fn forget_batch(addr: IpAddr) -> Vec<Op> {
    let mut out = Vec::new();
    remove(&mut out, addr, true);
    remove(&mut out, addr, false);
    out
}

/// The packet fence of this node's network namespace.
#[derive(Debug, Default)]
pub struct PacketFence {
    installed: OnceCell<()>,
    /// The nf_tables socket every element change goes through.
    netlink: nf_netlink::Connection,
}

impl PacketFence {
    /// Installs the tables, sets and rules ([`TABLES`]) unless this fence
    /// already did.
    pub async fn install(&self) -> Result<(), VipError> {
        self.installed
            .get_or_try_init(install_tables)
            .await
            .map(|_| ())
    }

    /// Opens the fence of `addr` until `until` (entry).
    pub async fn open(&self, addr: IpAddr, until: Instant, held: Duration) -> Result<(), VipError> {
        self.install().await?;
        let op = format!("open the packet fence of {addr}");
        match apply(&self.netlink, &op, open_batch(addr, left(until)?, held))? {
            Outcome::Applied => Ok(()),
            Outcome::Missing => Err(missing(&op)),
        }
    }

    /// Extends the fence of `addr` until `until`; `false`, changing
    /// nothing, when it had expired (the lease ended before this renew).
    pub async fn extend(
        &self,
        addr: IpAddr,
        until: Instant,
        held: Duration,
    ) -> Result<bool, VipError> {
        self.install().await?;
        let op = format!("extend the packet fence of {addr}");
        Ok(apply(&self.netlink, &op, extend_batch(addr, left(until)?, held))? == Outcome::Applied)
    }

    /// Extends the fences of every address of `addrs` until `until` in one
    /// batch: `true` when all were extended; `false`, changing nothing,
    /// when any of them had expired (then extend them one by one with
    /// [`PacketFence::extend`] to learn which).
    pub async fn extend_all(
        &self,
        addrs: &[IpAddr],
        until: Instant,
        held: Duration,
    ) -> Result<bool, VipError> {
        self.install().await?;
        let live = left(until)?;
        let ops = addrs
            .iter()
            .flat_map(|a| extend_batch(*a, live, held))
            .collect();
        let op = format!("extend the packet fences of {} VIPs", addrs.len());
        Ok(apply(&self.netlink, &op, ops)? == Outcome::Applied)
    }

    /// Closes the fence of `addr`: it stops answering at once.
    pub async fn close(&self, addr: IpAddr) -> Result<(), VipError> {
        self.install().await?;
        apply(
            &self.netlink,
            &format!("close the packet fence of {addr}"),
            close_batch(addr),
        )
        .map(|_| ())
    }

    /// Forgets `addr` (its address is gone).
    pub async fn forget(&self, addr: IpAddr) -> Result<(), VipError> {
        self.install().await?;
        apply(
            &self.netlink,
            &format!("forget {addr} in the packet fence"),
            forget_batch(addr),
        )
        .map(|_| ())
    }
}

/// Sends one batch of element changes on `netlink` (see [`nf_netlink`]).
fn apply(netlink: &nf_netlink::Connection, op: &str, ops: Vec<Op>) -> Result<Outcome, VipError> {
    netlink.apply(&ops).map_err(|e| VipError::Fence {
        op: op.to_owned(),
        reason: if e.raw_os_error() == Some(nix::libc::EPERM) {
            "operation not permitted (the agent needs CAP_NET_ADMIN)".into()
        } else {
            format!("nf_tables netlink: {e}")
        },
    })
}

/// What is left until `until` (whole milliseconds, at least one), as the
/// kernel calls count it.
fn left(until: Instant) -> Result<Duration, VipError> {
    super::kernel_lifetime_until(until).map(|(fence, _)| fence)
}

fn missing(op: &str) -> VipError {
    VipError::Fence {
        op: op.to_owned(),
        reason: "nftables reported a missing table, set or element".into(),
    }
}

/// Installs [`TABLES`] through `nft -f -`.
async fn install_tables() -> Result<(), VipError> {
    let fail = |reason: String| VipError::Fence {
        op: "install the packet fence".to_owned(),
        reason,
    };
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            fail(if e.kind() == std::io::ErrorKind::NotFound {
                "the nft binary is not on PATH: install nftables on the node (the agent's \
                 image must carry it)"
                    .into()
            } else {
                format!("cannot run nft: {e}")
            })
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(TABLES.as_bytes())
            .await
            .map_err(|e| fail(format!("writing the tables to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| fail(format!("waiting for nft: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or("").trim().to_owned();
    Err(fail(if stderr.contains("Operation not permitted") {
        "operation not permitted (the agent needs CAP_NET_ADMIN)".into()
    } else {
        format!("nft exited with {}: {first}", out.status)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(ops: Vec<Op>) -> String {
        ops.iter().map(|o| format!("{o}\n")).collect()
    }

    #[test]
    fn a_renew_extends_only_a_live_element() {
        let b = text(extend_batch(
            "198.18.0.100".parse().unwrap(),
            Duration::from_millis(980),
            Duration::from_secs(6),
        ));
        // The strict delete comes first, in each live set: ENOENT there
        // fails the whole batch.
        let lines: Vec<&str> = b.lines().collect();
        assert_eq!(lines[0], "delete element arp kubeha live { 198.18.0.100 }");
        assert_eq!(
            lines[1],
            "add element arp kubeha live { 198.18.0.100 timeout 980ms }"
        );
        assert_eq!(
            lines[2],
            "delete element inet kubeha live4 { 198.18.0.100 }"
        );
        assert!(!b.contains("live { 198.18.0.100 timeout 1ms }"));
        assert!(b.ends_with("add element inet kubeha held4 { 198.18.0.100 timeout 6000ms }\n"));
    }

    #[test]
    fn entry_and_leave_never_fail_on_a_missing_element() {
        let a: IpAddr = "2001:db8::100".parse().unwrap();
        for batch in [
            text(open_batch(
                a,
                Duration::from_millis(700),
                Duration::from_secs(6),
            )),
            text(close_batch(a)),
            text(forget_batch(a)),
        ] {
            let lines: Vec<&str> = batch.lines().collect();
            for (i, l) in lines.iter().enumerate() {
                if l.starts_with("delete") {
                    assert!(
                        lines[i - 1].starts_with("add element")
                            && lines[i - 1].ends_with("timeout 1ms }")
                    );
                }
            }
            assert!(!batch.contains("arp kubeha"), "IPv6 has no ARP: {batch}");
        }
        assert!(
            text(open_batch(a, Duration::ZERO, Duration::from_secs(6)))
                .contains("live6 { 2001:db8::100 timeout 1ms }")
        );
    }
}
