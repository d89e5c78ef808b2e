//! The VIPs on this node's interfaces: adding them (after the address conflict
//! check), removing them, finding where a record's VIPs sit, announcing them
//! with gratuitous ARP and unsolicited NA.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kubeha_crds::HAServiceSpec;

use super::{CONFLICT_WAIT, EnterError, LocalNode, PROBE_WINDOW, TransitionCluster};
use crate::garp::{self, GarpBurst};
use crate::statefile::ServiceRecord;
use crate::vip::{self, Netlink, Vip};

impl<N: Netlink> LocalNode<N> {
    /// The VIPs of a spec, parsed (invalid ones are skipped: the API server
    /// already rejects them).
    pub fn vips(spec: &HAServiceSpec) -> Vec<Vip> {
        spec.vips
            .iter()
            .filter_map(|v| Vip::parse(&v.address, v.interface.as_deref()).ok())
            .collect()
    }

    /// Adds (or re-adds, extending the lifetime) every VIP of `service`;
    /// returns the interface used per VIP.
    pub(super) async fn add_vips(
        &self,
        service: &str,
        vips: &[Vip],
        cluster: &TransitionCluster,
    ) -> Result<Vec<(String, Vip)>, EnterError> {
        let mut placed = Vec::new();
        for v in vips {
            let iface =
                self.netlink
                    .interface_for(v)
                    .await
                    .map_err(|source| EnterError::Interface {
                        vip: v.to_string(),
                        source,
                    })?;
            placed.push((iface, v.clone()));
        }
        self.wait_until_unanswered(&placed).await?;
        let beat = cluster.beat.ok_or(EnterError::HeartbeatTooOld)?;
        let until =
            Self::allowed_until(&beat, Instant::now()).ok_or(EnterError::HeartbeatTooOld)?;
        for (iface, v) in &placed {
            let added = if cluster.fenced.load(Ordering::SeqCst) {
                Err(EnterError::Fenced)
            } else {
                match self.netlink.add_vip(iface, v, until).await {
                    Ok(()) => Ok(()),
                    Err(crate::vip::VipError::PastLeaseEnd) => {
                        Err(EnterError::StalledInCall(v.to_string()))
                    }
                    Err(source) => Err(EnterError::Interface {
                        vip: v.to_string(),
                        source,
                    }),
                }
            };
            if let Err(e) = added {
                // What was added stays until its lifetime ends, never
                // extended.
                for (_, v) in &placed {
                    self.held.release(v);
                    self.metrics.vip_released(&v.to_string());
                }
                return Err(e);
            }
            self.held.hold(iface, v, &cluster.name);
            self.metrics.vip_held(service, iface, v);
        }
        // The fence sets its flag before it deletes: a VIP added in the
        // meantime is caught here.
        if cluster.fenced.load(Ordering::SeqCst) {
            self.del_vips(&placed).await;
            return Err(EnterError::Fenced);
        }
        Ok(placed)
    }

    /// Removes one VIP, never extended again whether or not the removal
    /// succeeds; ordered after any extension in flight (see the gate).
    pub(super) async fn remove_vip(&self, iface: &str, v: &Vip) -> Result<(), vip::VipError> {
        self.held.release(v);
        self.metrics.vip_released(&v.to_string());
        let _gate = self.held.gate.lock().await;
        self.netlink.del_vip(iface, v).await
    }

    /// Address conflict detection before adding: waits while another host
    /// answers ARP for an IPv4 VIP not on this node yet, at most
    /// [`CONFLICT_WAIT`]. A probe that cannot run (no MAC, no packet
    /// socket) is logged and skipped: the lifetimes still bound the old
    /// holder. IPv6 VIPs are not probed.
    pub(super) async fn wait_until_unanswered(
        &self,
        placed: &[(String, Vip)],
    ) -> Result<(), EnterError> {
        let mut by_iface: std::collections::BTreeMap<String, Vec<std::net::Ipv4Addr>> =
            Default::default();
        for (iface, v) in placed {
            if let IpAddr::V4(a) = v.addr
                && !self.netlink.vip_present(iface, v).await.unwrap_or(false)
            {
                by_iface.entry(iface.clone()).or_default().push(a);
            }
        }
        let started = Instant::now();
        for (iface, addrs) in by_iface {
            let Ok(mac) = self.netlink.mac_of(&iface).await else {
                continue;
            };
            loop {
                let (i, a) = (iface.clone(), addrs.clone());
                let heard = tokio::task::spawn_blocking(move || {
                    garp::still_answered(&i, mac, &a, PROBE_WINDOW)
                })
                .await;
                let heard = match heard {
                    Ok(Ok(h)) => h,
                    Ok(Err(e)) => {
                        tracing::warn!(%iface, error = %e, "ARP probe before adding VIPs failed");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%iface, error = %e, "ARP probe task failed");
                        break;
                    }
                };
                let Some((vip, from)) = heard.first() else {
                    break;
                };
                let from = garp::mac_string(*from);
                if started.elapsed() >= CONFLICT_WAIT {
                    return Err(EnterError::StillAnswered {
                        vip: vip.to_string(),
                        iface,
                        mac: from,
                    });
                }
                tracing::warn!(%vip, %iface, mac = %from, "VIP still answered by another host: waiting for it to go");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Removes the VIPs (absent ones count as removed); returns whether
    /// every one is gone.
    pub(super) async fn del_vips(&self, placed: &[(String, Vip)]) -> bool {
        let mut all = true;
        for (iface, v) in placed {
            if let Err(e) = self.remove_vip(iface, v).await {
                tracing::error!(vip = %v, %iface, error = %e, "removing VIP failed");
                all = false;
            }
        }
        all
    }

    /// Where the VIPs of a record are: its interface, else resolved now.
    pub(super) async fn placed(&self, record: &ServiceRecord) -> Vec<(String, Vip)> {
        let mut placed = Vec::new();
        for v in Self::vips(&record.spec) {
            let iface = match (&record.interface, self.netlink.interface_for(&v).await) {
                (_, Ok(i)) => i,
                (Some(i), Err(_)) => i.clone(),
                (None, Err(_)) => continue,
            };
            placed.push((iface, v));
        }
        placed
    }

    /// One GARP burst for the VIPs placed, on their interfaces, sent whole
    /// before this returns (the periodic refresh).
    pub async fn garp(&self, placed: &[(String, Vip)], spec: &HAServiceSpec) -> usize {
        let burst = burst_of(spec);
        let mut sent = 0;
        for (iface, addrs) in by_interface(placed) {
            let Some(mac) = self.mac_for_garp(&iface).await else {
                continue;
            };
            let addrs = addrs.into_iter().map(|v| v.addr).collect();
            sent += send_burst(iface, mac, addrs, burst).await;
        }
        self.metrics.garps_sent(sent);
        sent
    }

    /// Announces VIPs just added: the first round of the spec's GARP burst
    /// is sent when this returns, the other rounds follow in the background
    /// (the enter hooks do not wait for them), each for the VIPs still held
    /// when it is due: a VIP removed since (a leave, a fence) is not
    /// announced again.
    pub async fn announce(&self, placed: &[(String, Vip)], spec: &HAServiceSpec) {
        let burst = burst_of(spec);
        let first = GarpBurst { count: 1, ..burst };
        for (iface, vips) in by_interface(placed) {
            let Some(mac) = self.mac_for_garp(&iface).await else {
                continue;
            };
            let addrs = vips.iter().map(|v| v.addr).collect();
            let sent = send_burst(iface.clone(), mac, addrs, first).await;
            self.metrics.garps_sent(sent);
            if burst.count <= 1 {
                continue;
            }
            let (held, metrics) = (self.held.clone(), self.metrics.clone());
            tokio::spawn(async move {
                for _ in 1..burst.count {
                    tokio::time::sleep(burst.interval).await;
                    let still: Vec<IpAddr> = vips
                        .iter()
                        .filter(|v| held.is_held(&v.to_string()))
                        .map(|v| v.addr)
                        .collect();
                    if still.is_empty() {
                        break;
                    }
                    metrics.garps_sent(send_burst(iface.clone(), mac, still, first).await);
                }
            });
        }
    }

    /// The MAC of `iface` to announce VIPs from; `None` (logged) when it
    /// cannot be read.
    async fn mac_for_garp(&self, iface: &str) -> Option<[u8; 6]> {
        match self.netlink.mac_of(iface).await {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(%iface, error = %e, "no MAC for GARP");
                None
            }
        }
    }

    /// Whether any of `vips` (`address/prefix`) is on this node, as far as
    /// netlink says; a VIP whose interface or presence cannot be read
    /// counts as held.
    pub async fn holds_any(&self, vips: &[String], iface: Option<&str>) -> bool {
        for v in vips {
            let Ok(v) = Vip::parse(v, iface) else {
                continue;
            };
            let on = match (iface, self.netlink.interface_for(&v).await) {
                (Some(i), _) => i.to_owned(),
                (None, Ok(i)) => i,
                (None, Err(_)) => return true,
            };
            if self.netlink.vip_present(&on, &v).await.unwrap_or(true) {
                return true;
            }
        }
        false
    }

    /// Removes the VIPs of a record at once (the fence's first act; takes no
    /// lock and runs no hook).
    pub async fn drop_vips(&self, record_vips: &[String], record_iface: Option<&str>) {
        for v in record_vips
            .iter()
            .filter_map(|v| Vip::parse(v, record_iface).ok())
        {
            let iface = match (record_iface, self.netlink.interface_for(&v).await) {
                (Some(i), _) => i.to_owned(),
                (None, Ok(i)) => i,
                (None, Err(_)) => continue,
            };
            let _ = self.remove_vip(&iface, &v).await;
        }
    }

    /// Removes every VIP held for `cluster` at once, from the registry of
    /// held VIPs: the fence's first act, which takes no record lock (a
    /// transition, monitor or report may hold one for seconds). Returns how
    /// many were removed.
    pub async fn drop_held(&self, cluster: &str) -> usize {
        let held = self.held.of_cluster(cluster);
        for (addr, iface) in &held {
            let Ok(v) = Vip::parse(addr, Some(iface)) else {
                continue;
            };
            if let Err(e) = self.remove_vip(iface, &v).await {
                tracing::error!(vip = %addr, %iface, error = %e, "removing a VIP at the fence failed");
            }
        }
        held.len()
    }
}

/// The GARP burst a spec asks for (at least one round, 1 ms apart).
fn burst_of(spec: &HAServiceSpec) -> GarpBurst {
    GarpBurst {
        count: spec.garp.count.max(1) as u32,
        interval: Duration::from_millis(spec.garp.interval_ms.max(1) as u64),
    }
}

/// The VIPs placed, by interface.
fn by_interface(placed: &[(String, Vip)]) -> std::collections::BTreeMap<String, Vec<Vip>> {
    let mut by_iface: std::collections::BTreeMap<String, Vec<Vip>> = Default::default();
    for (iface, v) in placed {
        by_iface.entry(iface.clone()).or_default().push(v.clone());
    }
    by_iface
}

/// Sends `burst` for `addrs` on `iface` from `mac` on a blocking thread;
/// the number of frames sent (failures are logged).
async fn send_burst(iface: String, mac: [u8; 6], addrs: Vec<IpAddr>, burst: GarpBurst) -> usize {
    let name = iface.clone();
    match tokio::task::spawn_blocking(move || garp::send_burst(&name, mac, &addrs, &burst)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            tracing::warn!(%iface, error = %e, "GARP failed");
            0
        }
        Err(e) => {
            tracing::warn!(%iface, error = %e, "GARP task failed");
            0
        }
    }
}
