//! Heartbeat: the agent renews its node's Lease for every HACluster it is a
//! member of, every R, and tracks the time since its last successful renew on
//! a monotonic clock. A renew counts from the instant its request was sent,
//! so the agent's view is never more optimistic than the API server's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams};
use kubeha_crds::Mode;
use kubeha_crds::cluster::HeartbeatTiming;
use kubeha_crds::leases;

/// Heartbeat timing of one cluster as durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// D: lease duration.
    pub lease_duration: Duration,
    /// R: renew interval.
    pub renew_interval: Duration,
    /// RD: renew deadline, after which the agent fences itself.
    pub renew_deadline: Duration,
    /// Skew allowance added to D by observers.
    pub clock_skew: Duration,
    /// Configured VIP lifetime, if any.
    pub vip_lifetime_seconds: Option<u32>,
}

impl From<&HeartbeatTiming> for Timing {
    fn from(t: &HeartbeatTiming) -> Self {
        let ms = |v: i32| Duration::from_millis(v.max(0) as u64);
        Self {
            lease_duration: ms(t.lease_duration_ms),
            renew_interval: ms(t.renew_interval_ms),
            renew_deadline: ms(t.renew_deadline_ms),
            clock_skew: ms(t.clock_skew_ms),
            vip_lifetime_seconds: t.vip_lifetime_seconds.map(|s| s.max(1) as u32),
        }
    }
}

/// What the agent knows of its own heartbeat in one cluster.
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    /// Timing in force.
    pub timing: Timing,
    /// When the last successful renew was sent (monotonic).
    pub last_success: Option<Instant>,
    /// Failed renews since the start.
    pub failures: u64,
    /// The timing the last successful renew was sent under.
    pub renewed_under: Option<Timing>,
    /// The `renewTime` the last successful renew wrote.
    pub renew_time: Option<jiff::Timestamp>,
    /// This node's mode in the cluster when it is `single` or `config`
    /// (renews announce it, [`leases::EXCLUSIVE_MODE_ANNOTATION`]).
    pub exclusive: Option<Mode>,
    /// Whether the last successful renew announced `single` or `config`,
    /// and no renew sent since (answered or not: it may have been applied)
    /// announced anything else. Then observers wait for `peerdown` instead
    /// of counting this node's Lost heartbeat as a fence, and this node
    /// keeps its roles and VIPs when cut off instead of fencing itself (HA
    /// monitoring off, StorNext).
    pub renewed_exclusive: bool,
}

impl Timing {
    /// E = D + clock-skew allowance: how long after a renew observers may
    /// take the node to hold anything.
    pub fn expiry(&self) -> Duration {
        self.lease_duration + self.clock_skew
    }

    /// The stricter of two timings, field by field (the shorter D, skew,
    /// RD, R and VIP lifetime).
    pub fn stricter(self, other: Timing) -> Timing {
        Timing {
            lease_duration: self.lease_duration.min(other.lease_duration),
            renew_interval: self.renew_interval.min(other.renew_interval),
            renew_deadline: self.renew_deadline.min(other.renew_deadline),
            clock_skew: self.clock_skew.min(other.clock_skew),
            vip_lifetime_seconds: match (self.vip_lifetime_seconds, other.vip_lifetime_seconds) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

impl Beat {
    /// The timing that bounds what the node may hold now: the stricter of
    /// the timing in force and the one the last successful renew was sent
    /// under. A raised D counts only from the first renew that announced
    /// it; a lowered one counts at once.
    pub fn guard(&self) -> Timing {
        self.renewed_under
            .map_or(self.timing, |t| self.timing.stricter(t))
    }

    /// Time since the last successful renew (`None` before the first).
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.last_success.map(|t| now.saturating_duration_since(t))
    }

    /// Whether the agent must consider itself cut off: no successful renew
    /// for RD (or none at all yet).
    pub fn past_deadline(&self, now: Instant) -> bool {
        self.age(now)
            .is_none_or(|age| age >= self.guard().renew_deadline)
    }

    /// Time left before D since the last successful renew.
    pub fn left_before_lease_end(&self, now: Instant) -> Duration {
        match self.age(now) {
            Some(age) => self.guard().lease_duration.saturating_sub(age),
            None => Duration::ZERO,
        }
    }
}

/// The heartbeat state of every cluster, shared between the renew loops, the
/// fence watchdog, the transitions and the metrics; with the progress of the
/// agent's main loop, which a renew vouches for.
#[derive(Debug, Clone, Default)]
pub struct Heartbeats {
    beats: Arc<Mutex<HashMap<String, Beat>>>,
    /// When the main loop last finished a pass.
    progress: Arc<Mutex<Option<Instant>>>,
    /// Per cluster: no renew before this instant (an escalated fence).
    suspended: Arc<Mutex<HashMap<String, Instant>>>,
}

/// Why a renew is not sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withheld {
    /// The main loop has not finished a pass for this long (at least RD): a
    /// renew would tell the operator that an agent which no longer extends
    /// VIPs, acknowledges handovers or fences is alive.
    Stalled(Duration),
    /// Renewals are suspended for the cluster until then (see
    /// [`Heartbeats::suspend`]).
    Suspended(Instant),
}

impl Heartbeats {
    /// The main loop finished a pass.
    pub fn mark_progress(&self, now: Instant) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }

    /// How long since the main loop last finished a pass (`None` before
    /// the first).
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| now.saturating_duration_since(t))
    }

    /// Stops renewing `cluster`'s heartbeat until `until`: the escalation
    /// of a leave that failed. The watchdog then fences this node for the
    /// cluster at RD, and the operator sees it Lost (so fenced) at E.
    pub fn suspend(&self, cluster: &str, until: Instant) {
        self.suspended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cluster.to_owned(), until);
    }

    /// Whether a renew of `cluster` may be sent at `now`, given RD.
    pub fn withheld(
        &self,
        cluster: &str,
        renew_deadline: Duration,
        now: Instant,
    ) -> Option<Withheld> {
        if let Some(until) = self
            .suspended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
            .copied()
            .filter(|u| *u > now)
        {
            return Some(Withheld::Suspended(until));
        }
        self.stalled_for(now)
            .filter(|d| *d >= renew_deadline)
            .map(Withheld::Stalled)
    }

    /// A snapshot of one cluster's heartbeat.
    pub fn get(&self, cluster: &str) -> Option<Beat> {
        self.lock().get(cluster).copied()
    }

    /// A snapshot of every cluster's heartbeat.
    pub fn all(&self) -> HashMap<String, Beat> {
        self.lock().clone()
    }

    /// Sets (or updates) a cluster's timing and this node's exclusive mode
    /// there (`single` or `config`, else `None`), keeping its history.
    pub fn set_timing(&self, cluster: &str, timing: Timing, exclusive: Option<Mode>) {
        self.lock()
            .entry(cluster.to_owned())
            .and_modify(|b| {
                b.timing = timing;
                b.exclusive = exclusive;
            })
            .or_insert(Beat {
                timing,
                last_success: None,
                failures: 0,
                renewed_under: None,
                renew_time: None,
                exclusive,
                renewed_exclusive: false,
            });
    }

    /// Forgets a cluster the node is no longer a member of.
    pub fn remove(&self, cluster: &str) {
        self.lock().remove(cluster);
    }

    fn record(&self, cluster: &str, sent: Instant, renew: Renew, ok: bool) {
        if let Some(b) = self.lock().get_mut(cluster) {
            if ok {
                // Renews may complete out of order; keep the latest send.
                if b.last_success.is_none_or(|t| sent >= t) {
                    b.renewed_under = Some(renew.timing);
                    b.renew_time = renew.written;
                    b.renewed_exclusive = renew.exclusive.is_some();
                }
                b.last_success = Some(b.last_success.map_or(sent, |t| t.max(sent)));
            } else {
                b.failures += 1;
                // A renew whose answer was lost may still have been applied:
                // once one without the exclusive mode was sent, observers
                // may count a Lost heartbeat as a fence, so this node must
                // fence itself again.
                if renew.exclusive.is_none() {
                    b.renewed_exclusive = false;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Beat>> {
        self.beats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one renew sent: the timing it announced, the `renewTime` it
/// wrote and the exclusive mode it announced.
#[derive(Debug, Clone, Copy)]
struct Renew {
    timing: Timing,
    written: Option<jiff::Timestamp>,
    exclusive: Option<Mode>,
}

/// The heartbeat Lease as the agent applies it (server-side apply, the
/// node's own field manager): holder = node, duration = D rounded up, and
/// the node's mode when it is `single` or `config`.
pub fn heartbeat_lease(
    cluster: &str,
    node: &str,
    timing: &Timing,
    exclusive: Option<Mode>,
) -> Lease {
    let mut annotations = std::collections::BTreeMap::from([(
        leases::EXPIRY_MS_ANNOTATION.to_owned(),
        timing.expiry().as_millis().to_string(),
    )]);
    if let Some(mode) = exclusive {
        annotations.insert(
            leases::EXCLUSIVE_MODE_ANNOTATION.to_owned(),
            mode.as_str().to_owned(),
        );
    }
    Lease {
        metadata: ObjectMeta {
            name: Some(leases::heartbeat_lease_name(cluster, node)),
            annotations: Some(annotations),
            labels: Some(
                [
                    (
                        leases::LEASE_KIND_LABEL.to_owned(),
                        leases::HEARTBEAT.to_owned(),
                    ),
                    (leases::CLUSTER_LABEL.to_owned(), cluster.to_owned()),
                    (leases::NODE_LABEL.to_owned(), node.to_owned()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_owned()),
            lease_duration_seconds: Some(timing.lease_duration.as_millis().div_ceil(1000) as i32),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..Default::default()
        }),
    }
}

/// Renews one cluster's heartbeat every R until the task is aborted.
/// `on_renew` runs after each successful renew (to extend VIP lifetimes).
pub async fn renew_loop(
    api: Api<Lease>,
    cluster: String,
    node: String,
    beats: Heartbeats,
    metrics: crate::metrics::Metrics,
    on_renew: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let params = PatchParams::apply(&leases::agent_field_manager(&node)).force();
    let name = leases::heartbeat_lease_name(&cluster, &node);
    loop {
        let Some(beat) = beats.get(&cluster) else {
            return;
        };
        let (timing, exclusive) = (beat.timing, beat.exclusive);
        let sent = Instant::now();
        if let Some(why) = beats.withheld(&cluster, beat.guard().renew_deadline, sent) {
            let renew = Renew {
                timing,
                written: None,
                exclusive,
            };
            beats.record(&cluster, sent, renew, false);
            metrics.renew_failure(&cluster);
            tracing::warn!(%cluster, ?why, "heartbeat renew withheld");
            tokio::time::sleep_until((sent + timing.renew_interval).into()).await;
            continue;
        }
        let lease = heartbeat_lease(&cluster, &node, &timing, exclusive);
        // A renew slower than R is useless: the next one is due.
        let result = tokio::time::timeout(
            timing.renew_interval,
            api.patch(&name, &params, &Patch::Apply(&lease)),
        )
        .await;
        let ok = matches!(result, Ok(Ok(_)));
        let renew = Renew {
            timing,
            exclusive,
            written: lease
                .spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0),
        };
        beats.record(&cluster, sent, renew, ok);
        if ok {
            let _ = on_renew.send(cluster.clone());
        } else {
            metrics.renew_failure(&cluster);
            match result {
                Ok(Err(e)) => tracing::warn!(%cluster, error = %e, "heartbeat renew failed"),
                _ => tracing::warn!(%cluster, "heartbeat renew timed out"),
            }
        }
        tokio::time::sleep_until((sent + timing.renew_interval).into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renew that wrote no `renewTime` worth keeping.
    fn renew(timing: Timing) -> Renew {
        Renew {
            timing,
            written: None,
            exclusive: None,
        }
    }

    fn timing() -> Timing {
        Timing::from(&HeartbeatTiming::default())
    }

    #[test]
    fn deadline_and_time_left() {
        let t0 = Instant::now();
        let mut beat = Beat {
            timing: timing(),
            last_success: None,
            failures: 0,
            renewed_under: None,
            renew_time: None,
            exclusive: None,
            renewed_exclusive: false,
        };
        assert!(beat.past_deadline(t0), "no renew yet means cut off");
        beat.last_success = Some(t0);
        assert!(!beat.past_deadline(t0 + Duration::from_millis(1999)));
        assert!(beat.past_deadline(t0 + Duration::from_millis(2000)));
        assert_eq!(
            beat.left_before_lease_end(t0 + Duration::from_millis(2500)),
            Duration::from_millis(500)
        );
        assert_eq!(
            beat.left_before_lease_end(t0 + Duration::from_secs(9)),
            Duration::ZERO
        );
    }

    #[test]
    fn renews_keep_the_latest_send() {
        let beats = Heartbeats::default();
        beats.set_timing("c", timing(), None);
        let t0 = Instant::now();
        beats.record("c", t0 + Duration::from_millis(5), renew(timing()), true);
        beats.record("c", t0, renew(timing()), true);
        beats.record("c", t0, renew(timing()), false);
        let b = beats.get("c").unwrap();
        assert_eq!(b.last_success, Some(t0 + Duration::from_millis(5)));
        assert_eq!(b.failures, 1);
    }

    #[test]
    fn only_renews_that_all_announced_single_or_config_let_the_node_freeze() {
        let beats = Heartbeats::default();
        beats.set_timing("c", timing(), Some(Mode::Single));
        let t0 = Instant::now();
        let sent = |ms: u64| t0 + Duration::from_millis(ms);
        let with = |exclusive: Option<Mode>| Renew {
            exclusive,
            ..renew(timing())
        };
        assert!(
            !beats.get("c").unwrap().renewed_exclusive,
            "nothing renewed"
        );
        beats.record("c", sent(0), with(Some(Mode::Single)), true);
        assert!(beats.get("c").unwrap().renewed_exclusive);
        // A lost answer to a renew in single changes nothing.
        beats.record("c", sent(1000), with(Some(Mode::Single)), false);
        assert!(beats.get("c").unwrap().renewed_exclusive);
        // Back to default: a renew whose answer was lost may have been
        // applied, so the node fences again even before one succeeds.
        beats.set_timing("c", timing(), None);
        beats.record("c", sent(2000), with(None), false);
        assert!(!beats.get("c").unwrap().renewed_exclusive);
        // In config again: only a successful renew announcing it counts.
        beats.set_timing("c", timing(), Some(Mode::Config));
        beats.record("c", sent(3000), with(Some(Mode::Config)), false);
        assert!(!beats.get("c").unwrap().renewed_exclusive);
        beats.record("c", sent(4000), with(Some(Mode::Config)), true);
        assert!(beats.get("c").unwrap().renewed_exclusive);
        let lease = heartbeat_lease("c", "node-1", &timing(), Some(Mode::Config));
        assert!(leases::heartbeat_exclusive(&lease));
        assert!(!leases::heartbeat_exclusive(&heartbeat_lease(
            "c",
            "node-1",
            &timing(),
            None
        )));
    }

    #[test]
    fn a_lowered_d_counts_at_once_and_a_raised_one_from_the_renew_that_announced_it() {
        let beats = Heartbeats::default();
        let long = Timing {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            ..timing()
        };
        beats.set_timing("c", long, None);
        let t0 = Instant::now();
        beats.record("c", t0, renew(long), true);
        // Lowered: the short D bounds the node at once.
        beats.set_timing("c", timing(), None);
        let b = beats.get("c").unwrap();
        assert_eq!(b.guard().lease_duration, Duration::from_secs(3));
        assert!(b.past_deadline(t0 + Duration::from_secs(2)));
        // Raised again: the renew sent under the short D still bounds it.
        beats.record("c", t0 + Duration::from_secs(1), renew(timing()), true);
        beats.set_timing("c", long, None);
        let b = beats.get("c").unwrap();
        assert_eq!(b.guard().lease_duration, Duration::from_secs(3));
        assert!(b.past_deadline(t0 + Duration::from_secs(3)));
        // Until a renew is sent under the long D.
        beats.record("c", t0 + Duration::from_secs(2), renew(long), true);
        assert_eq!(beats.get("c").unwrap().guard(), long);
    }

    #[test]
    fn renews_wait_for_the_main_loop_and_for_a_suspension_to_end() {
        let beats = Heartbeats::default();
        let rd = Duration::from_secs(2);
        let t0 = Instant::now();
        assert_eq!(beats.withheld("c", rd, t0), None, "before the first pass");
        beats.mark_progress(t0);
        assert_eq!(
            beats.withheld("c", rd, t0 + Duration::from_millis(1999)),
            None
        );
        assert_eq!(
            beats.withheld("c", rd, t0 + rd),
            Some(Withheld::Stalled(rd)),
            "a main loop stuck for RD stops the heartbeat"
        );
        beats.mark_progress(t0 + rd);
        let until = t0 + Duration::from_secs(5);
        beats.suspend("c", until);
        assert_eq!(
            beats.withheld("c", rd, t0 + Duration::from_secs(3)),
            Some(Withheld::Suspended(until))
        );
        assert_eq!(
            beats.withheld("other", rd, t0 + Duration::from_secs(3)),
            None
        );
        beats.mark_progress(until);
        assert_eq!(beats.withheld("c", rd, until), None);
    }

    #[test]
    fn the_lease_announces_the_expiry_of_its_timing() {
        // E = D + skew allowance, whatever the defaults are.
        let mut t = timing();
        (t.lease_duration, t.clock_skew) =
            (Duration::from_millis(3000), Duration::from_millis(500));
        let lease = heartbeat_lease("c", "node-1", &t, None);
        assert_eq!(
            leases::heartbeat_expiry(&lease),
            Some(Duration::from_millis(3500))
        );
    }

    #[test]
    fn lease_rounds_duration_up() {
        let mut t = timing();
        t.lease_duration = Duration::from_millis(1500);
        let lease = heartbeat_lease("c", "node-1", &t, None);
        assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(2));
        assert_eq!(lease.metadata.name.as_deref(), Some("kubeha-hb-c.node-1"));
    }
}
