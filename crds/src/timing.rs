//! The one rule that ties a cluster's heartbeat timing to the VIPs an agent
//! may hold under it, stated once: the CEL rule of
//! [`crate::cluster::HeartbeatTiming`], the agent's lifetimes and the
//! operator's check all come from here.
//!
//! An agent gives each VIP a kernel lifetime in whole seconds (`valid_lft`)
//! that ends at least [`LIFETIME_MARGIN_MS`] before its lease does: E = D +
//! skew after the renew it extends from. Right after a renew that took
//! [`RENEW_LATENCY_MS`], that leaves `(E - margin - latency)` rounded down
//! to whole seconds, the *entry lifetime*. An agent that renews on time can
//! enter (and keep its VIPs until the next renew extends them) only when the
//! entry lifetime is at least a second and outlasts the next renew: it must
//! exceed R + latency. A timing that breaks the rule makes every entry a
//! refusal ("heartbeat too old to add VIPs safely"), on every node, so the
//! API server refuses it instead.

/// Kept between a VIP's kernel lifetime and the end of E after the renew it
/// was extended from: the kernel removes an expired address up to about
/// 250 ms late when nothing else changes.
pub const LIFETIME_MARGIN_MS: i64 = 300;

/// What the rule leaves for one renew, from sending it to the agent knowing
/// it succeeded.
pub const RENEW_LATENCY_MS: i64 = 100;

/// The CEL rule on `spec.heartbeat` ([`lets_agents_enter`] in CEL's integer
/// arithmetic); the CRD carries exactly this text.
pub const ENTRY_RULE: &str = "(self.leaseDurationMs + self.clockSkewMs - 400) / 1000 * 1000 > self.renewIntervalMs + 100 && (!has(self.vipLifetimeSeconds) || self.vipLifetimeSeconds * 1000 > self.renewIntervalMs + 100)";

/// The message of [`ENTRY_RULE`]: the fields, and the fix.
pub const ENTRY_RULE_MESSAGE: &str = "spec.heartbeat: no agent could ever enter under this timing: right after a renew it may give a VIP only leaseDurationMs + clockSkewMs - 400 ms, in whole seconds (and at most vipLifetimeSeconds), and that must outlast the next renew (renewIntervalMs + 100 ms); raise leaseDurationMs or clockSkewMs, or lower renewIntervalMs";

/// The entry lifetime in milliseconds (whole seconds) for lease duration
/// `d_ms`, clock skew `skew_ms` and the configured VIP lifetime, if any.
pub fn entry_lifetime_ms(d_ms: i64, skew_ms: i64, configured_secs: Option<i64>) -> i64 {
    let left = (d_ms + skew_ms - LIFETIME_MARGIN_MS - RENEW_LATENCY_MS).max(0) / 1000 * 1000;
    configured_secs.map_or(left, |c| left.min(c * 1000))
}

/// Whether an agent that renews every `r_ms` can enter and keep its VIPs
/// until the next renew (see the module docs).
pub fn lets_agents_enter(d_ms: i64, r_ms: i64, skew_ms: i64, configured_secs: Option<i64>) -> bool {
    entry_lifetime_ms(d_ms, skew_ms, configured_secs) > r_ms + RENEW_LATENCY_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_in_numbers() {
        // Defaults: 3 s of lifetime after a renew, renewed every second.
        assert_eq!(entry_lifetime_ms(3000, 500, None), 3000);
        assert!(lets_agents_enter(3000, 1000, 500, None));
        // The bench's tight timing: one second, renewed every 300 ms.
        assert!(lets_agents_enter(1000, 300, 500, None));
        // D = 1 s with 100 ms of skew leaves 700 ms: no whole second.
        assert_eq!(entry_lifetime_ms(1000, 100, None), 0);
        assert!(!lets_agents_enter(1000, 300, 100, None));
        // The smallest E that works at R = 300 ms: 1.4 s.
        assert!(lets_agents_enter(1000, 300, 400, None));
        assert!(!lets_agents_enter(1000, 300, 399, None));
        // One second of lifetime cannot outlast a renew every 900 ms + 100.
        assert!(!lets_agents_enter(1000, 900, 500, None));
        // A configured lifetime caps it.
        assert!(!lets_agents_enter(5000, 1000, 500, Some(1)));
        assert!(lets_agents_enter(5000, 1000, 500, Some(2)));
    }

    /// CEL's integer arithmetic on the rule's text, evaluated by hand, over
    /// a grid of timings: the CRD and the agent agree everywhere.
    #[test]
    fn the_cel_rule_is_the_same_rule() {
        let cel = |d: i64, r: i64, skew: i64, lifetime: Option<i64>| {
            (d + skew - 400) / 1000 * 1000 > r + 100 && lifetime.is_none_or(|l| l * 1000 > r + 100)
        };
        assert!(ENTRY_RULE.contains(&format!(
            "- {}) / 1000 * 1000 > self.renewIntervalMs + {}",
            LIFETIME_MARGIN_MS + RENEW_LATENCY_MS,
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
