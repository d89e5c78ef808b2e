//! VIP lifetimes bounded by the heartbeat: until when a renew allows a VIP,
//! extending every held VIP after a renew, and giving a master role up when the
//! kernel expired its VIP (or closed its packet fence) first.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kubeha_crds::service::Role;

use super::{FENCE_MARGIN, LocalNode, TransitionCluster, refused};
use crate::heartbeat::Beat;
use crate::statefile::ServiceRecord;
use crate::vip::{self, Netlink, Vip};

impl<N: Netlink> LocalNode<N> {
    /// Until when a VIP may be held, judged `now`: never past D plus the skew
    /// allowance less the packet fence's margin after the last successful
    /// renew (counted from when it was sent), so a VIP cannot outlive the
    /// lease, and at most the configured lifetime from now. `None` when
    /// less than a millisecond is left. The kernel calls turn it into a
    /// timeout at the last moment, so a call held up in flight (the agent
    /// stopped in it) never sets a fence that ends later.
    pub fn allowed_until(beat: &Beat, now: Instant) -> Option<Instant> {
        let age = beat.age(now)?;
        let t = &beat.guard();
        let cap = vip::lifetime_cap(t.lease_duration, t.clock_skew, t.vip_lifetime_seconds).ok()?;
        let left = (t.lease_duration + t.clock_skew).checked_sub(age + FENCE_MARGIN)?;
        let allowed = cap.min(left);
        (allowed >= Duration::from_millis(1)).then(|| now + allowed)
    }

    /// Extends the lifetime of every VIP held for `cluster` after a renew;
    /// never adds one back. A VIP the kernel already expired means this
    /// node missed its renewals for longer than the lifetime (a stall, a
    /// cut-off whose fence has not run yet) and another node may hold the
    /// service now: it is set aside, and the record holding it gives the
    /// master role up ([`LocalNode::give_up_if_expired`]). The kernel's
    /// addresses are read once for the whole round ([`Netlink::extend_vips`]).
    pub async fn extend(&self, cluster: &TransitionCluster) {
        let Some(beat) = cluster.beat else {
            return;
        };
        if cluster.fenced.load(Ordering::SeqCst) {
            return;
        }
        // Removals wait until the round ends: what was released since the
        // list was taken is not extended.
        let _gate = self.held.gate.lock().await;
        let (addrs, vips): (Vec<String>, Vec<(String, Vip)>) = self
            .held
            .of_cluster(&cluster.name)
            .into_iter()
            .filter(|(addr, _)| self.held.is_held(addr))
            .filter_map(|(addr, iface)| {
                let v = Vip::parse(&addr, Some(&iface)).ok()?;
                Some((addr, (iface, v)))
            })
            .unzip();
        if vips.is_empty() {
            return;
        }
        let Some(until) = Self::allowed_until(&beat, Instant::now()) else {
            return;
        };
        let results = self.netlink.extend_vips(&vips, until).await;
        for ((addr, (iface, _)), result) in addrs.iter().zip(&vips).zip(results) {
            match result {
                Ok(true) => {}
                Ok(false) | Err(vip::VipError::PastLeaseEnd) => {
                    tracing::error!(vip = %addr, %iface, "a VIP expired before it was extended (missed renewals)");
                    self.held.expire(addr);
                    self.metrics.vip_released(addr);
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
