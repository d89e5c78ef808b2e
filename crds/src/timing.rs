//! The one rule that ties a cluster's heartbeat timing to the VIPs an agent
//! may hold under it, stated once: the CEL rule of
//! [`crate::cluster::HeartbeatTiming`], the agent's fences and the
//! operator's check all come from here.
//!
//! An agent fences every VIP it holds twice, both measured from the instant
//! it *sent* the last successful renew, so both end before E = D + skew
//! after it, the instant an observer may declare the node Lost:
//!
//! - the **packet fence**, to the millisecond: an nftables element per VIP
//!   whose kernel timeout ends [`FENCE_MARGIN_MS`] before E. Once it expires
//!   the node neither answers nor sends ARP, neighbour discovery or traffic
//!   for that VIP, although the address may still be on the interface;
//! - the **address lifetime** (`valid_lft`), in whole seconds, the coarse
//!   backstop that removes the address itself: [`address_lifetime_secs`],
//!   which ends [`LIFETIME_MARGIN_MS`] before the packet fence when there is
//!   a whole second to give (the default timing: the address never outlives
//!   the lease either), and otherwise the packet fence rounded *up* to whole
//!   seconds: the address then outlives the fence by less than a second,
//!   silent behind it, and never goes before it, so the packet fence alone
//!   decides when the node stops answering.
//!
//! Right after a renew that took [`RENEW_LATENCY_MS`], the packet fence can
//! be given `E - margin - latency`, the *entry fence* (at most the
//! configured VIP lifetime). An agent that renews on time can enter, and
//! keep its VIPs until the next renew extends them, only when the entry
//! fence outlasts the next renew: it must exceed R + latency. A timing that
//! breaks the rule would make every entry a refusal ("heartbeat too old to
//! add VIPs safely") on every node, so the API server refuses it instead.

/// Kept between the end of a VIP's packet fence and the end of E after the
/// renew it was extended from: nftables timeouts count in jiffies (4 ms at
/// 250 Hz), and the kernel takes a batch a little after its timeout was
/// computed (an agent sets a timeout again when that took longer than this
/// margin). A renew is stamped when it is sent, before the API server (and
/// so any observer) sees it. 100 ms (30 ms until the agent's entry got
/// fast): once a new holder enters within a few tens of milliseconds of
/// E, this margin is most of what separates the old holder's fence from
/// the new holder's first packet, and it costs no failover time (E alone
/// decides when the next holder may enter).
pub const FENCE_MARGIN_MS: i64 = 100;

/// Kept between a VIP's address lifetime and the end of its packet fence
/// when the lifetime is longer than its one-second minimum: the kernel
/// removes an expired address up to about 250 ms late when nothing else
/// changes.
pub const LIFETIME_MARGIN_MS: i64 = 300;

/// What the rule leaves for one renew, from sending it to the agent knowing
/// it succeeded (the CRD also keeps RD at least this far above R, so one
/// renew of this latency never fences the agent).
pub const RENEW_LATENCY_MS: i64 = 100;

/// The CEL rule on `spec.heartbeat` ([`lets_agents_enter`] in CEL's integer
/// arithmetic); the CRD carries exactly this text.
pub const ENTRY_RULE: &str = "self.leaseDurationMs + self.clockSkewMs - 200 > self.renewIntervalMs + 100 && (!has(self.vipLifetimeSeconds) || self.vipLifetimeSeconds * 1000 > self.renewIntervalMs + 100)";

/// The message of [`ENTRY_RULE`]: the fields, and the fix.
pub const ENTRY_RULE_MESSAGE: &str = "spec.heartbeat: no agent could ever enter under this timing: right after a renew it may hold a VIP for leaseDurationMs + clockSkewMs - 200 ms (and at most vipLifetimeSeconds), and that must outlast the next renew (renewIntervalMs + 100 ms); raise leaseDurationMs or clockSkewMs, or lower renewIntervalMs";

/// The entry fence in milliseconds for lease duration `d_ms`, clock skew
/// `skew_ms` and the configured VIP lifetime, if any.
pub fn entry_fence_ms(d_ms: i64, skew_ms: i64, configured_secs: Option<i64>) -> i64 {
    let left = (d_ms + skew_ms - FENCE_MARGIN_MS - RENEW_LATENCY_MS).max(0);
    configured_secs.map_or(left, |c| left.min(c * 1000))
}

/// Whether an agent that renews every `r_ms` can enter and keep its VIPs
/// until the next renew (see the module docs).
pub fn lets_agents_enter(d_ms: i64, r_ms: i64, skew_ms: i64, configured_secs: Option<i64>) -> bool {
    entry_fence_ms(d_ms, skew_ms, configured_secs) > r_ms + RENEW_LATENCY_MS
}

/// The address lifetime (`valid_lft`, whole seconds, at least 1) that goes
/// with a packet fence of `fence_ms`: [`LIFETIME_MARGIN_MS`] shorter,
/// rounded down, when that leaves a whole second; else the fence rounded up.
pub fn address_lifetime_secs(fence_ms: i64) -> u32 {
    let within = (fence_ms - LIFETIME_MARGIN_MS).max(0) / 1000;
    let secs = if within >= 1 {
        within
    } else {
        (fence_ms.max(1) + 999) / 1000
    };
    u32::try_from(secs).unwrap_or(u32::MAX - 1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_in_numbers() {
        // Defaults: 2.9 s of packet fence after a renew, renewed every second.
        assert_eq!(entry_fence_ms(3000, 100, None), 2900);
        assert!(lets_agents_enter(3000, 1000, 100, None));
        // The old default skew: 3.3 s.
        assert_eq!(entry_fence_ms(3000, 500, None), 3300);
        assert!(lets_agents_enter(3000, 1000, 500, None));
        // The bench's old tight timing: one second, renewed every 300 ms.
        assert!(lets_agents_enter(1000, 300, 500, None));
        // D = 1 s with 100 ms of skew leaves 900 ms: enough for R = 300 ms,
        // no longer refused for want of a whole second.
        assert_eq!(entry_fence_ms(1000, 100, None), 900);
        assert!(lets_agents_enter(1000, 300, 100, None));
        assert!(lets_agents_enter(1000, 300, 0, None));
        // A renew every 900 ms cannot be outlasted by D = 1 s without skew.
        assert!(!lets_agents_enter(1000, 900, 0, None));
        assert!(lets_agents_enter(1000, 900, 300, None));
        assert!(!lets_agents_enter(1000, 900, 200, None));
        // A configured lifetime caps it.
        assert!(!lets_agents_enter(5000, 1000, 500, Some(1)));
        assert!(lets_agents_enter(5000, 1000, 500, Some(2)));
    }

    #[test]
    fn the_address_lifetime_is_the_coarse_backstop() {
        // The old default skew (3.3 s of fence): 3 s of address after a
        // fresh renew, so the address itself never outlives the lease; the
        // default (2.9 s of fence) gets 2 s.
        assert_eq!(address_lifetime_secs(3300), 3);
        assert_eq!(address_lifetime_secs(2900), 2);
        assert_eq!(address_lifetime_secs(3299), 2);
        assert_eq!(address_lifetime_secs(1300), 1);
        // Below 1.3 s of fence: the fence rounded up, outliving it, silent.
        assert_eq!(address_lifetime_secs(1299), 2);
        assert_eq!(address_lifetime_secs(1001), 2);
        assert_eq!(address_lifetime_secs(1000), 1);
        assert_eq!(address_lifetime_secs(970), 1);
        assert_eq!(address_lifetime_secs(1), 1);
        assert_eq!(address_lifetime_secs(0), 1);
        assert_eq!(address_lifetime_secs(300_000), 299);
    }

    /// CEL's integer arithmetic on the rule's text, evaluated by hand, over
    /// a grid of timings: the CRD and the agent agree everywhere.
    #[test]
    fn the_cel_rule_is_the_same_rule() {
        let cel = |d: i64, r: i64, skew: i64, lifetime: Option<i64>| {
            d + skew - 200 > r + 100 && lifetime.is_none_or(|l| l * 1000 > r + 100)
        };
        assert!(ENTRY_RULE.contains(&format!(
            "self.leaseDurationMs + self.clockSkewMs - {} > self.renewIntervalMs + {}",
            FENCE_MARGIN_MS + RENEW_LATENCY_MS,
            RENEW_LATENCY_MS
        )));
        for d in (1000..=12_000).step_by(100) {
            for r in (100..d.min(6000)).step_by(100) {
                for skew in (0..=2000).step_by(50) {
                    for lifetime in [None, Some(1), Some(2), Some(5)] {
                        assert_eq!(
                            cel(d, r, skew, lifetime),
                            lets_agents_enter(d, r, skew, lifetime),
                            "D {d} R {r} skew {skew} lifetime {lifetime:?}"
                        );
                    }
                }
            }
        }
    }
}
