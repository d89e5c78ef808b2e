//! VIP lifetimes bounded by the heartbeat: what lifetime a renew allows,
//! extending every held VIP after a renew, and giving a master role up when the
//! kernel expired its VIP first.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kubeha_crds::service::Role;

use super::{LIFETIME_MARGIN, LocalNode, TransitionCluster, refused};
use crate::heartbeat::Beat;
use crate::statefile::ServiceRecord;
use crate::vip::{self, Netlink, Vip};

impl<N: Netlink> LocalNode<N> {
    /// Seconds of VIP lifetime allowed now: the configured or derived
    /// lifetime, but never past D plus the skew allowance since the last
    /// successful renew, so a VIP cannot outlive the lease.
    pub fn allowed_lifetime(beat: &Beat, now: Instant) -> Option<u32> {
        let age = beat.age(now)?;
        let t = &beat.guard();
        let full =
            vip::lifetime_secs(t.lease_duration, t.clock_skew, t.vip_lifetime_seconds).ok()?;
        let left = (t.lease_duration + t.clock_skew).checked_sub(age + LIFETIME_MARGIN)?;
        // Whole seconds within what is left.
        let left_secs = (left.as_millis() / 1000) as u32;
        let secs = full.min(left_secs);
        (secs >= 1).then_some(secs)
    }

    /// Whether a lifetime of `secs` set by a netlink call that returned at
    /// `now` ends within what the heartbeat allows (E less the margin,
    /// since the last renew).
    pub(super) fn lifetime_fits(beat: &Beat, secs: u32, now: Instant) -> bool {
        let t = beat.guard();
        beat.age(now).is_some_and(|age| {
            age + Duration::from_secs(u64::from(secs)) + LIFETIME_MARGIN
                <= t.lease_duration + t.clock_skew
        })
    }

    /// After a VIP was given `secs` of lifetime: a call held up in flight
    /// (the agent stopped between computing the lifetime and the kernel
    /// taking it) may have set it to end past what the heartbeat allows.
    /// Then it is set again with what is allowed now, or removed when
    /// nothing is. Returns whether the VIP stays.
    pub(super) async fn settle_lifetime(
        &self,
        iface: &str,
        v: &Vip,
        beat: &Beat,
        secs: u32,
    ) -> bool {
        let mut secs = secs;
        for _ in 0..3 {
            if Self::lifetime_fits(beat, secs, Instant::now()) {
                return true;
            }
            let Some(allowed) = Self::allowed_lifetime(beat, Instant::now()) else {
                break;
            };
            tracing::warn!(vip = %v, %iface, set = secs, allowed, "a VIP lifetime was set late (the agent stalled in the call): setting it again");
            secs = allowed;
            if self
                .netlink
                .add_vip(iface, v, Duration::from_secs(u64::from(secs)))
                .await
                .is_err()
            {
                break;
            }
        }
        tracing::error!(vip = %v, %iface, "a VIP lifetime could not be kept within the lease: removing the VIP");
        let _ = self.netlink.del_vip(iface, v).await;
        false
    }

    /// Extends the lifetime of every VIP held for `cluster` after a renew;
    /// never adds one back. A VIP the kernel already expired means this
    /// node missed its renewals for longer than the lifetime (a stall, a
    /// cut-off whose fence has not run yet) and another node may hold the
    /// service now: it is set aside, and the record holding it gives the
    /// master role up ([`LocalNode::give_up_if_expired`]).
    pub async fn extend(&self, cluster: &TransitionCluster) {
        let Some(beat) = cluster.beat else {
            return;
        };
        for (addr, iface) in self.held.of_cluster(&cluster.name) {
            if cluster.fenced.load(Ordering::SeqCst) {
                return;
            }
            let Ok(v) = Vip::parse(&addr, Some(&iface)) else {
                continue;
            };
            // Released since the list was taken: a removal ran or waits.
            let _gate = self.held.gate.lock().await;
            if !self.held.is_held(&addr) {
                continue;
            }
            // Computed right before the call, checked right after it.
            let Some(secs) = Self::allowed_lifetime(&beat, Instant::now()) else {
                return;
            };
            match self
                .netlink
                .extend_vip(&iface, &v, Duration::from_secs(secs as u64))
                .await
            {
                Ok(true) => {
                    if !self.settle_lifetime(&iface, &v, &beat, secs).await {
                        self.held.expire(&addr);
                    }
                }
                Ok(false) => {
                    tracing::error!(vip = %addr, %iface, "a VIP expired before it was extended (missed renewals)");
                    self.held.expire(&addr);
                }
                Err(e) => {
                    tracing::warn!(vip = %addr, %iface, error = %e, "extending a VIP lifetime failed")
                }
            }
        }
    }

    /// When a VIP of this master record expired before it was extended
    /// ([`LocalNode::extend`]): gives the master role up as a fence does (the
    /// other VIPs dropped at once, the leave scripts run once in contact).
    /// Returns whether it did.
    pub async fn give_up_if_expired(&self, record: &mut ServiceRecord) -> bool {
        let gone = self.held.take_expired(&record.vips);
        if gone.is_empty() || record.role != Role::Master {
            return false;
        }
        tracing::error!(
            epoch = record.epoch,
            ?gone,
            "a VIP expired before it was extended: giving the master role up as a fence does"
        );
        self.drop_vips(&record.vips, record.interface.as_deref())
            .await;
        record.last_hooks = vec![refused(&format!(
            "VIP {} expired before its lifetime was extended (missed renewals): left as a fence does",
            gone.join(", ")
        ))];
        Self::mark_fenced(record);
        true
    }
}
