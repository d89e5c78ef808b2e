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
//! The agent drives nftables through the `nft` binary's batch input
//! (`nft -f -`), one process per change, about 5 ms each on an idle machine
//! and tens of ms on a busy one: the batch grammar is nftables' stable
//! interface, where its netlink messages are not. A timeout is computed
//! when the batch is written, less the delay nft took last time, so it
//! counts from about when nft applies it.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;

use super::VipError;

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

/// The sets (`family table set`) an address's `live` or `held` element sits in.
fn sets(addr: IpAddr, live: bool) -> &'static [&'static str] {
    match (addr, live) {
        (IpAddr::V4(_), true) => &["arp kubeha live", "inet kubeha live4"],
        (IpAddr::V4(_), false) => &["arp kubeha held", "inet kubeha held4"],
        (IpAddr::V6(_), true) => &["inet kubeha live6"],
        (IpAddr::V6(_), false) => &["inet kubeha held6"],
    }
}

/// Timeout text nftables accepts, at least 1 ms.
fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Sets `addr`'s element in the `live` or `held` sets to `timeout`, whether
/// or not it exists (added, then deleted and added again: no ENOENT).
fn reset(out: &mut String, addr: IpAddr, live: bool, timeout: Duration) {
    for set in sets(addr, live) {
        out.push_str(&format!("add element {set} {{ {addr} timeout 1ms }}\n"));
        out.push_str(&format!("delete element {set} {{ {addr} }}\n"));
        out.push_str(&format!(
            "add element {set} {{ {addr} timeout {} }}\n",
            ms(timeout)
        ));
    }
}

/// Removes `addr`'s element from the `live` or `held` sets, if there.
fn remove(out: &mut String, addr: IpAddr, live: bool) {
    for set in sets(addr, live) {
        out.push_str(&format!("add element {set} {{ {addr} timeout 1ms }}\n"));
        out.push_str(&format!("delete element {set} {{ {addr} }}\n"));
    }
}

/// The batch that opens the fence of `addr` for `live` and marks it held
/// for `held` (entry).
pub fn open_batch(addr: IpAddr, live: Duration, held: Duration) -> String {
    let mut out = String::new();
    reset(&mut out, addr, false, held);
    reset(&mut out, addr, true, live);
    out
}

/// The batch that extends an open fence of `addr` (a renew): it fails, as a
/// whole, when the `live` element expired.
pub fn extend_batch(addr: IpAddr, live: Duration, held: Duration) -> String {
    let mut out = String::new();
    for set in sets(addr, true) {
        out.push_str(&format!("delete element {set} {{ {addr} }}\n"));
        out.push_str(&format!(
            "add element {set} {{ {addr} timeout {} }}\n",
            ms(live)
        ));
    }
    reset(&mut out, addr, false, held);
    out
}

/// The batch that closes the fence of `addr` (it stops answering at once).
pub fn close_batch(addr: IpAddr) -> String {
    let mut out = String::new();
    remove(&mut out, addr, true);
    out
}

/// The batch that forgets `addr` once its address is gone.
pub fn forget_batch(addr: IpAddr) -> String {
    let mut out = String::new();
    remove(&mut out, addr, true);
    remove(&mut out, addr, false);
    out
}

/// The packet fence of this node's network namespace.
#[derive(Debug)]
pub struct PacketFence {
    installed: OnceCell<()>,
    /// How long `nft` took from its batch being written to its exit, last
    /// time (decaying slowly): taken off the next timeout, so a fence that
    /// nft applies late still ends by the instant asked.
    apply_delay_us: AtomicU64,
}

impl Default for PacketFence {
    fn default() -> Self {
        Self {
            installed: OnceCell::new(),
            apply_delay_us: AtomicU64::new(INITIAL_APPLY_DELAY.as_micros() as u64),
        }
    }
}

/// How an `nft` batch ended.
enum Applied {
    Done,
    /// An element or table it names is missing (ENOENT): nothing was applied.
    Missing,
}

/// The apply delay assumed before `nft` was ever timed.
const INITIAL_APPLY_DELAY: Duration = Duration::from_millis(10);

/// The most taken off a timeout for nft's delay.
const MAX_APPLY_DELAY: Duration = Duration::from_millis(100);

impl PacketFence {
    /// Installs the tables, sets and rules ([`TABLES`]) unless this fence
    /// already did.
    pub async fn install(&self) -> Result<(), VipError> {
        self.installed
            .get_or_try_init(|| async {
                let op = "install the packet fence";
                match self.run(op, |_| Ok(TABLES.to_owned())).await? {
                    Applied::Done => Ok(()),
                    Applied::Missing => Err(missing(op)),
                }
            })
            .await
            .map(|_| ())
    }

    /// Opens the fence of `addr` until `until` (entry).
    pub async fn open(&self, addr: IpAddr, until: Instant, held: Duration) -> Result<(), VipError> {
        self.install().await?;
        let op = format!("open the packet fence of {addr}");
        match self
            .run(&op, |delay| Ok(open_batch(addr, left(until, delay)?, held)))
            .await?
        {
            Applied::Done => Ok(()),
            Applied::Missing => Err(missing(&op)),
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
        Ok(matches!(
            self.run(&op, |delay| Ok(extend_batch(
                addr,
                left(until, delay)?,
                held
            )))
            .await?,
            Applied::Done
        ))
    }

    /// Closes the fence of `addr`: it stops answering at once.
    pub async fn close(&self, addr: IpAddr) -> Result<(), VipError> {
        self.install().await?;
        let op = format!("close the packet fence of {addr}");
        self.run(&op, |_| Ok(close_batch(addr))).await.map(|_| ())
    }

    /// Forgets `addr` (its address is gone).
    pub async fn forget(&self, addr: IpAddr) -> Result<(), VipError> {
        self.install().await?;
        let op = format!("forget {addr} in the packet fence");
        self.run(&op, |_| Ok(forget_batch(addr))).await.map(|_| ())
    }

    /// Runs one batch through `nft -f -`. The batch is made only once `nft`
    /// runs, right before it is written, from the delay nft is expected to
    /// take to apply it (its last one, decaying, at most
    /// [`MAX_APPLY_DELAY`]), so a timeout in it counts from when nft applies
    /// it. A batch applied later than expected by more than the fence's
    /// margin is logged: the fence may end late by the difference.
    async fn run(
        &self,
        op: &str,
        batch: impl FnOnce(Duration) -> Result<String, VipError>,
    ) -> Result<Applied, VipError> {
        let fail = |reason: String| VipError::Fence {
            op: op.to_owned(),
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
        let expected =
            Duration::from_micros(self.apply_delay_us.load(Ordering::Relaxed)).min(MAX_APPLY_DELAY);
        let text = batch(expected)?;
        let written = Instant::now();
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(|e| fail(format!("writing the batch to nft: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fail(format!("waiting for nft: {e}")))?;
        let took = written.elapsed();
        let decayed = expected.as_micros() as u64 * 3 / 4;
        self.apply_delay_us
            .store((took.as_micros() as u64).max(decayed), Ordering::Relaxed);
        if took > expected + Duration::from_millis(kubeha_crds::timing::FENCE_MARGIN_MS as u64) {
            tracing::warn!(
                op,
                took_ms = took.as_millis() as u64,
                expected_ms = expected.as_millis() as u64,
                "nft applied a packet fence batch late: a timeout in it may end late by the difference"
            );
        }
        if out.status.success() {
            return Ok(Applied::Done);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok(Applied::Missing);
        }
        let first = stderr.lines().next().unwrap_or("").trim().to_owned();
        Err(fail(if stderr.contains("Operation not permitted") {
            "operation not permitted (the agent needs CAP_NET_ADMIN)".into()
        } else {
            format!("nft exited with {}: {first}", out.status)
        }))
    }
}

/// What is left until `until` once nft applies a batch `delay` from now,
/// at least a millisecond.
fn left(until: Instant, delay: Duration) -> Result<Duration, VipError> {
    match until.checked_duration_since(Instant::now() + delay) {
        Some(d) if d >= Duration::from_millis(1) => Ok(d),
        _ => Err(VipError::PastLeaseEnd),
    }
}

fn missing(op: &str) -> VipError {
    VipError::Fence {
        op: op.to_owned(),
        reason: "nftables reported a missing table, set or element".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renew_extends_only_a_live_element() {
        let b = extend_batch(
            "198.18.0.100".parse().unwrap(),
            Duration::from_millis(980),
            Duration::from_secs(6),
        );
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
            open_batch(a, Duration::from_millis(700), Duration::from_secs(6)),
            close_batch(a),
            forget_batch(a),
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
            open_batch(a, Duration::ZERO, Duration::from_secs(6))
                .contains("live6 { 2001:db8::100 timeout 1ms }")
        );
    }
}
