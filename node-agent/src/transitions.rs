//! Transitions of one service on this node: leave the old role, enter the new
//! one; enter master = add VIPs (with a lifetime bounded by the heartbeat),
//! run the enter scripts, send the GARP burst; leave master = remove the VIPs,
//! run the leave scripts. Also re-adoption after a restart, VIP lifetime
//! extension, monitor and periodic hooks, and the self-fence of one cluster.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kubeha_crds::HAServiceSpec;
use kubeha_crds::service::{HookOutcome, HookResult, NodeServiceState, Role};

use crate::assignments::{Assignment, Step};
use crate::garp::{self, GarpBurst};
use crate::heartbeat::Beat;
use crate::hooks::{self, Action, HookContext, HookLayout, HookRunner, HookSet};
use crate::metrics::Metrics;
use crate::statefile::ServiceRecord;
use crate::vip::{self, Netlink, Vip};

/// Everything a transition needs besides the service itself.
pub struct Node<N: Netlink> {
    /// This node's name.
    pub name: String,
    /// Netlink access.
    pub netlink: N,
    /// Hook runner (shared registry of running hooks, for the fence).
    pub runner: HookRunner,
    /// Root of host-path hook sources.
    pub hook_root: PathBuf,
    /// Where ConfigMap hook sources are written out.
    pub state_dir: PathBuf,
    /// Metrics.
    pub metrics: Metrics,
    /// The VIPs this agent holds, extended after every renew.
    pub held: HeldVips,
}

/// The VIPs this agent added and has not removed, by address
/// (`address/prefix`), with the interface and cluster of each. Lifetimes are
/// extended from here after every renew, without the service's record lock:
/// a transition's hooks, a monitor or a status report hold that lock for
/// seconds, longer than a lifetime may be. VIPs the kernel expired before an
/// extension are kept aside until the record holding them gives its master
/// role up ([`Node::give_up_if_expired`]).
#[derive(Debug, Default)]
pub struct HeldVips {
    held: std::sync::Mutex<std::collections::BTreeMap<String, (String, String)>>,
    expired: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Orders an extension's check-then-add against every removal: an
    /// extension that saw a VIP held and present must not re-add it after
    /// a leave or fence removed it (it would stay, unheld and unseen, for
    /// its whole lifetime while another node takes it).
    gate: tokio::sync::Mutex<()>,
}

impl HeldVips {
    fn hold(&self, iface: &str, vip: &Vip, cluster: &str) {
        let key = vip.to_string();
        lock(&self.expired).remove(&key);
        lock(&self.held).insert(key, (iface.to_owned(), cluster.to_owned()));
    }

    fn release(&self, vip: &Vip) {
        lock(&self.held).remove(&vip.to_string());
    }

    fn is_held(&self, vip: &str) -> bool {
        lock(&self.held).contains_key(vip)
    }

    /// The held VIPs of `cluster`, with their interfaces.
    fn of_cluster(&self, cluster: &str) -> Vec<(String, String)> {
        lock(&self.held)
            .iter()
            .filter(|(_, (_, c))| c == cluster)
            .map(|(v, (i, _))| (v.clone(), i.clone()))
            .collect()
    }

    fn expire(&self, vip: &str) {
        lock(&self.held).remove(vip);
        lock(&self.expired).insert(vip.to_owned());
    }

    /// Whether any of `vips` expired before it was extended.
    pub fn any_expired(&self, vips: &[String]) -> bool {
        let expired = lock(&self.expired);
        vips.iter().any(|v| expired.contains(v))
    }

    /// Takes the expired VIPs among `vips` out of the expired set.
    fn take_expired(&self, vips: &[String]) -> Vec<String> {
        let mut expired = lock(&self.expired);
        vips.iter()
            .filter(|v| expired.remove(*v))
            .cloned()
            .collect()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Facts about the service's cluster a transition uses.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// Cluster name.
    pub name: String,
    /// Members in order.
    pub members: Vec<String>,
    /// The heartbeat of this node in that cluster.
    pub beat: Option<Beat>,
    /// Set when this node fenced itself for the cluster and has not renewed since.
    pub fenced: Arc<AtomicBool>,
    /// Whether hook ConfigMaps may also come from the service's namespace.
    pub config_maps_in_service_namespace: bool,
}

/// A service as one transition sees it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// `namespace/name`.
    pub key: String,
    /// The spec acted on.
    pub spec: HAServiceSpec,
    /// Checksum of the spec.
    pub checksum: String,
}

/// Why entering failed.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// No VIP interface (missing or no subnet holds the VIP).
    #[error("VIP {vip}: {source}")]
    Interface {
        /// The VIP.
        vip: String,
        /// The netlink error.
        source: vip::VipError,
    },
    /// The heartbeat is too old to give the VIP any lifetime.
    #[error("heartbeat too old to add VIPs safely (renew first)")]
    HeartbeatTooOld,
    /// Fenced while entering.
    #[error("fenced while entering")]
    Fenced,
    /// The agent stalled while it added the VIP, so long that no lifetime
    /// within the lease was left: the VIP was removed again.
    #[error("VIP {0}: the agent stalled while adding it, past what the heartbeat allows; removed")]
    StalledInCall(String),
    /// Another host kept answering for the VIP (address conflict
    /// detection) for longer than [`CONFLICT_WAIT`].
    #[error(
        "VIP {vip} is still answered on {iface} by {mac}: another host holds it; \
         remove it there (or give this service another VIP)"
    )]
    StillAnswered {
        /// The VIP.
        vip: String,
        /// The interface probed.
        iface: String,
        /// The MAC that answered.
        mac: String,
    },
}

/// The longest an entering node waits for another host to stop answering
/// for a VIP: a previous holder's address can outlive its kernel lifetime
/// by up to a second (the kernel checks lifetimes at least a second apart
/// after any address change).
pub const CONFLICT_WAIT: Duration = Duration::from_secs(2);

/// How long one round of ARP probes listens for answers.
const PROBE_WINDOW: Duration = Duration::from_millis(30);

/// Kept between a VIP's kernel lifetime and the end of E (D + skew) after
/// the renew it was extended from: the kernel removes an expired address
/// up to about 250 ms late when nothing else changes.
pub const LIFETIME_MARGIN: Duration = Duration::from_millis(300);

impl<N: Netlink> Node<N> {
    /// The VIPs of a spec, parsed (invalid ones are skipped: the API server
    /// already rejects them).
    pub fn vips(spec: &HAServiceSpec) -> Vec<Vip> {
        spec.vips
            .iter()
            .filter_map(|v| Vip::parse(&v.address, v.interface.as_deref()).ok())
            .collect()
    }

    /// The hook set of a spec, if it has hooks.
    pub fn hook_set(&self, svc: &ServiceView) -> Option<HookSet> {
        let hooks = svc.spec.hooks.as_ref()?;
        let dir = match (&hooks.source.host_path, &hooks.source.config_map) {
            (Some(p), _) => self.hook_root.join(p),
            (None, Some(cm)) => self.state_dir.join("configmap-hooks").join(cm),
            (None, None) => return None,
        };
        let layout = match &hooks.script {
            Some(s) => HookLayout::SingleScript(s.clone()),
            None => HookLayout::Directory,
        };
        Some(HookSet { dir, layout })
    }

    fn context(
        &self,
        svc: &ServiceView,
        cluster: &ClusterView,
        action: Action,
        role: Role,
        epoch: i64,
    ) -> HookContext {
        let primary = svc
            .spec
            .preferred_nodes
            .first()
            .or(cluster.members.first())
            .cloned()
            .unwrap_or_default();
        let is_primary = primary == self.name;
        HookContext {
            action,
            role,
            transition: hooks::transition(action, is_primary),
            service: svc.key.clone(),
            cluster: cluster.name.clone(),
            node: self.name.clone(),
            primary_node: primary,
            peers: cluster
                .members
                .iter()
                .filter(|m| **m != self.name)
                .cloned()
                .collect(),
            vips: svc.spec.vips.iter().map(|v| v.address.clone()).collect(),
            interface: svc
                .spec
                .vips
                .first()
                .and_then(|v| v.interface.clone())
                .unwrap_or_default(),
            epoch,
            config_checksum: svc.checksum.clone(),
        }
    }

    async fn run_hooks(
        &self,
        svc: &ServiceView,
        cluster: &ClusterView,
        action: Action,
        role: Role,
        epoch: i64,
        timeout: Duration,
    ) -> Vec<HookResult> {
        let Some(set) = self.hook_set(svc) else {
            return Vec::new();
        };
        let mut ctx = self.context(svc, cluster, action, role, epoch);
        if let Some(iface) = Self::vips(&svc.spec)
            .first()
            .and_then(|v| v.interface.clone())
        {
            ctx.interface = iface;
        }
        let results = self.runner.run(&set, &ctx, timeout).await;
        for r in &results {
            self.metrics.hook_run(
                action.as_str(),
                &format!("{:?}", r.outcome),
                r.duration_ms as f64 / 1000.0,
            );
        }
        results
    }

    /// Runs one action's hooks by hand (`kubeha-agent hooks run`), with the
    /// daemon's context and timeouts.
    pub async fn run_hooks_by_hand(
        &self,
        svc: &ServiceView,
        cluster: &ClusterView,
        action: Action,
        role: Role,
        epoch: i64,
    ) -> anyhow::Result<Vec<HookResult>> {
        if self.hook_set(svc).is_none() {
            anyhow::bail!("service {} has no hooks", svc.key);
        }
        let timeout = match action {
            Action::Monitor => svc
                .spec
                .hooks
                .as_ref()
                .and_then(|h| h.monitor.as_ref())
                .map(|m| m.timeout_seconds),
            Action::Periodic => svc
                .spec
                .hooks
                .as_ref()
                .and_then(|h| h.periodic.as_ref())
                .map(|p| p.timeout_seconds),
            _ => None,
        }
        .map_or(Self::hook_timeout(svc), |s| {
            Duration::from_secs(s.max(1) as u64)
        });
        Ok(self
            .run_hooks(svc, cluster, action, role, epoch, timeout)
            .await)
    }

    fn hook_timeout(svc: &ServiceView) -> Duration {
        Duration::from_secs(
            svc.spec
                .hooks
                .as_ref()
                .map_or(60, |h| h.timeout_seconds.max(1) as u64),
        )
    }

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
    fn lifetime_fits(beat: &Beat, secs: u32, now: Instant) -> bool {
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
    async fn settle_lifetime(&self, iface: &str, v: &Vip, beat: &Beat, secs: u32) -> bool {
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

    /// Adds (or re-adds, extending the lifetime) every VIP; returns the
    /// interface used per VIP.
    async fn add_vips(
        &self,
        vips: &[Vip],
        cluster: &ClusterView,
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
        let secs =
            Self::allowed_lifetime(&beat, Instant::now()).ok_or(EnterError::HeartbeatTooOld)?;
        for (iface, v) in &placed {
            let added = if cluster.fenced.load(Ordering::SeqCst) {
                Err(EnterError::Fenced)
            } else {
                match self
                    .netlink
                    .add_vip(iface, v, Duration::from_secs(secs as u64))
                    .await
                {
                    Ok(()) if self.settle_lifetime(iface, v, &beat, secs).await => Ok(()),
                    Ok(()) => Err(EnterError::StalledInCall(v.to_string())),
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
                }
                return Err(e);
            }
            self.held.hold(iface, v, &cluster.name);
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
    async fn remove_vip(&self, iface: &str, v: &Vip) -> Result<(), vip::VipError> {
        self.held.release(v);
        let _gate = self.held.gate.lock().await;
        self.netlink.del_vip(iface, v).await
    }

    /// Address conflict detection before adding: waits while another host
    /// answers ARP for an IPv4 VIP not on this node yet, at most
    /// [`CONFLICT_WAIT`]. A probe that cannot run (no MAC, no packet
    /// socket) is logged and skipped: the lifetimes still bound the old
    /// holder. IPv6 VIPs are not probed.
    async fn wait_until_unanswered(&self, placed: &[(String, Vip)]) -> Result<(), EnterError> {
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
    async fn del_vips(&self, placed: &[(String, Vip)]) -> bool {
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
    async fn placed(&self, record: &ServiceRecord) -> Vec<(String, Vip)> {
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

    /// One GARP burst for the VIPs placed, on their interfaces.
    pub async fn garp(&self, placed: &[(String, Vip)], spec: &HAServiceSpec) -> usize {
        let burst = GarpBurst {
            count: spec.garp.count.max(1) as u32,
            interval: Duration::from_millis(spec.garp.interval_ms.max(1) as u64),
        };
        let mut by_iface: std::collections::BTreeMap<String, Vec<IpAddr>> = Default::default();
        for (iface, v) in placed {
            by_iface.entry(iface.clone()).or_default().push(v.addr);
        }
        let mut sent = 0;
        for (iface, addrs) in by_iface {
            let mac = match self.netlink.mac_of(&iface).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%iface, error = %e, "no MAC for GARP");
                    continue;
                }
            };
            let iface2 = iface.clone();
            match tokio::task::spawn_blocking(move || {
                garp::send_burst(&iface2, mac, &addrs, &burst)
            })
            .await
            {
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => tracing::warn!(%iface, error = %e, "GARP failed"),
                Err(e) => tracing::warn!(%iface, error = %e, "GARP task failed"),
            }
        }
        self.metrics.garps_sent(sent);
        sent
    }

    /// Carries out one step on `record`, updating it. Returns whether the
    /// step succeeded.
    pub async fn step(
        &self,
        step: Step,
        record: &mut ServiceRecord,
        svc: &ServiceView,
        cluster: &ClusterView,
        wanted: Assignment,
    ) -> bool {
        match step {
            Step::LeaveMaster => self.leave_master(record, svc, cluster).await,
            Step::LeaveVicemaster => {
                record.state = NodeServiceState::Stopping;
                // The hooks the standby role was entered with.
                let entered = ServiceView {
                    key: svc.key.clone(),
                    spec: record.spec.clone(),
                    checksum: record.config_checksum.clone(),
                };
                let results = self
                    .run_hooks(
                        &entered,
                        cluster,
                        Action::Leave,
                        Role::Vicemaster,
                        record.epoch,
                        Self::hook_timeout(svc),
                    )
                    .await;
                let ok = hooks::overall(&results) == HookOutcome::Success;
                record.role = Role::None;
                // A refusal of the epoch now asked for stands: leaving the
                // standby role must not turn that Failed into a Stopped,
                // which the operator would read as "cleared, not yet
                // running" and wait on forever, nor replace the refusal's
                // marker, which the operator reads as "started nothing"
                // (its proof to move on).
                let refused = record.failed_epoch == Some(wanted.epoch);
                if !(ok && refused) {
                    record.last_hooks = results;
                }
                record.state = if ok && !refused {
                    NodeServiceState::Stopped
                } else {
                    NodeServiceState::Failed
                };
                self.metrics.transition("giveback");
                ok
            }
            Step::EnterMaster => self.enter_master(record, svc, cluster, wanted.epoch).await,
            Step::EnterVicemaster => {
                record.spec = svc.spec.clone();
                record.config_checksum = svc.checksum.clone();
                let results = self
                    .run_hooks(
                        svc,
                        cluster,
                        Action::Enter,
                        Role::Vicemaster,
                        wanted.epoch,
                        Self::hook_timeout(svc),
                    )
                    .await;
                let ok = hooks::overall(&results) == HookOutcome::Success;
                record.last_hooks = results;
                record.epoch = wanted.epoch;
                if ok {
                    record.role = Role::Vicemaster;
                    record.state = NodeServiceState::Stopped;
                } else {
                    record.state = NodeServiceState::Failed;
                    record.count_failure();
                }
                ok
            }
        }
    }

    async fn enter_master(
        &self,
        record: &mut ServiceRecord,
        svc: &ServiceView,
        cluster: &ClusterView,
        epoch: i64,
    ) -> bool {
        record.state = NodeServiceState::Starting;
        record.epoch = epoch;
        record.spec = svc.spec.clone();
        record.config_checksum = svc.checksum.clone();
        let vips = Self::vips(&svc.spec);
        let placed = match self.add_vips(&vips, cluster).await {
            Ok(p) => p,
            Err(EnterError::HeartbeatTooOld) => {
                // Refused before any add: nothing started, and nothing
                // failed. Entered again once a renew makes room for a
                // lifetime (a heartbeat just back from a stalled API
                // server counts from a renew sent before the stall).
                tracing::warn!(service = %svc.key, epoch, "heartbeat too old to add VIPs: entering after the next renew");
                record.state = NodeServiceState::Stopped;
                record.role = Role::None;
                record.last_hooks = vec![refused(&EnterError::HeartbeatTooOld.to_string())];
                return false;
            }
            Err(e) => {
                tracing::error!(service = %svc.key, epoch, error = %e, "cannot enter master");
                record.state = NodeServiceState::Failed;
                record.failed_epoch = Some(epoch);
                record.last_hooks = vec![refused(&e.to_string())];
                if let EnterError::StillAnswered { .. } = e {
                    // Refused before any add, and not this node's failure.
                    record.role = Role::None;
                    return false;
                }
                if !matches!(e, EnterError::Fenced | EnterError::StalledInCall(_)) {
                    record.count_failure();
                }
                // A VIP added before the refusal stays until its lifetime
                // ends.
                record.unclean_epoch = Some(epoch);
                return false;
            }
        };
        record.interface = placed.first().map(|(i, _)| i.clone());
        record.vips = placed.iter().map(|(_, v)| v.to_string()).collect();
        record.role = Role::Master;
        self.metrics.set_vips_held(placed.len());
        if let Some(route) = &svc.spec.default_route
            && let Ok(gw) = route.gateway.parse::<IpAddr>()
            && let Err(e) = self.netlink.add_default_route(gw).await
        {
            tracing::warn!(service = %svc.key, error = %e, "default route not added");
        }
        let results = self
            .run_hooks(
                svc,
                cluster,
                Action::Enter,
                Role::Master,
                epoch,
                Self::hook_timeout(svc),
            )
            .await;
        let outcome = hooks::overall(&results);
        record.last_hooks = results;
        if outcome != HookOutcome::Success || cluster.fenced.load(Ordering::SeqCst) {
            // An enter failure: leave again, report, let the operator move it.
            tracing::warn!(service = %svc.key, epoch, ?outcome, "enter failed; leaving again");
            let enter_results = std::mem::take(&mut record.last_hooks);
            self.leave_master(record, svc, cluster).await;
            let mut all = enter_results;
            all.append(&mut record.last_hooks);
            record.last_hooks = all;
            record.state = NodeServiceState::Failed;
            record.failed_epoch = Some(epoch);
            record.count_failure();
            return false;
        }
        self.garp(&placed, &svc.spec).await;
        record.state = NodeServiceState::Running;
        let primary = svc.spec.preferred_nodes.first().or(cluster.members.first());
        self.metrics.transition(if primary == Some(&self.name) {
            "takeback"
        } else {
            "takeover"
        });
        true
    }

    /// Puts the VIPs of a running master in line with a spec whose VIP
    /// list changed, as a keepalived reload does: the VIPs no longer named
    /// are removed, the new ones added (with the lifetime the heartbeat
    /// allows) and announced; no hook runs and the epoch stays. A VIP that
    /// cannot be added fails the master role as an enter that failed does
    /// (left, `Failed` at its epoch), so the operator moves the service.
    /// Returns whether the VIPs are now the spec's.
    pub async fn revip(
        &self,
        record: &mut ServiceRecord,
        svc: &ServiceView,
        cluster: &ClusterView,
    ) -> bool {
        let wanted = Self::vips(&svc.spec);
        let held = self.placed(record).await;
        let named = |v: &Vip, list: &[Vip]| list.iter().any(|w| w.to_string() == v.to_string());
        let gone: Vec<(String, Vip)> = held
            .iter()
            .filter(|(_, v)| !named(v, &wanted))
            .cloned()
            .collect();
        let held_vips: Vec<Vip> = held.iter().map(|(_, v)| v.clone()).collect();
        let new: Vec<Vip> = wanted
            .iter()
            .filter(|v| !named(v, &held_vips))
            .cloned()
            .collect();
        let removed = self.del_vips(&gone).await;
        // From here on the record names the new list: a leave (or a restart
        // that leaves first) removes every VIP the new spec names.
        record.spec.vips = svc.spec.vips.clone();
        match self.add_vips(&new, cluster).await {
            Ok(placed) => {
                self.garp(&placed, &svc.spec).await;
                record.vips = wanted.iter().map(Vip::to_string).collect();
                if record.interface.is_none() {
                    record.interface = placed.first().map(|(i, _)| i.clone());
                }
                self.metrics.set_vips_held(record.vips.len());
                tracing::info!(
                    epoch = record.epoch,
                    removed = gone.len(),
                    added = placed.len(),
                    "VIP list changed on the running master"
                );
                if !removed {
                    record.unclean_epoch = Some(record.epoch);
                }
                removed
            }
            Err(e) => {
                tracing::error!(epoch = record.epoch, error = %e, "a new VIP cannot be added: leaving master");
                let epoch = record.epoch;
                self.leave_master(record, svc, cluster).await;
                record.last_hooks.insert(0, refused(&e.to_string()));
                record.state = NodeServiceState::Failed;
                record.failed_epoch = Some(epoch);
                record.count_failure();
                false
            }
        }
    }

    /// Leaves master: VIPs removed, then the leave scripts of the spec the
    /// role was entered with (the record's: an edit of the hooks since then
    /// must not change what stops the service).
    async fn leave_master(
        &self,
        record: &mut ServiceRecord,
        svc: &ServiceView,
        cluster: &ClusterView,
    ) -> bool {
        let entered = ServiceView {
            key: svc.key.clone(),
            spec: record.spec.clone(),
            checksum: record.config_checksum.clone(),
        };
        let svc = &entered;
        record.state = NodeServiceState::Stopping;
        let placed = self.placed(record).await;
        let removed = self.del_vips(&placed).await;
        if let Some(route) = &record.spec.default_route
            && let Ok(gw) = route.gateway.parse::<IpAddr>()
        {
            let _ = self.netlink.del_default_route(gw).await;
        }
        self.metrics.set_vips_held(0);
        record.vips.clear();
        let results = self
            .run_hooks(
                svc,
                cluster,
                Action::Leave,
                Role::Master,
                record.epoch,
                Self::hook_timeout(svc),
            )
            .await;
        // A VIP that could not be removed may still answer: as unclean as
        // a leave script that failed.
        let ok = removed && hooks::overall(&results) == HookOutcome::Success;
        record.last_hooks = results;
        record.role = Role::None;
        // This was the leave a fence asked for, if it did.
        record.fenced = false;
        if ok {
            record.state = NodeServiceState::Stopped;
            record.acked_epoch = Some(record.epoch);
            // The leave scripts stopped the service, whatever epoch it was
            // started at.
            record.unclean_epoch = None;
        } else {
            // The service may still run here: no acknowledgement, so nobody
            // enters until this node is certainly fenced.
            record.state = NodeServiceState::Failed;
            record.unclean_epoch = Some(record.epoch);
        }
        let primary = svc.spec.preferred_nodes.first().or(cluster.members.first());
        self.metrics.transition(if primary == Some(&self.name) {
            "giveaway"
        } else {
            "giveback"
        });
        ok
    }

    /// Re-adopts a service this node held before a restart and still holds:
    /// VIP lifetimes extended, one GARP burst, no enter hooks. When the VIPs
    /// cannot be held again, the master role is given up as a fence does.
    pub async fn adopt(&self, record: &mut ServiceRecord, cluster: &ClusterView) -> bool {
        let vips = Self::vips(&record.spec);
        match self.add_vips(&vips, cluster).await {
            Ok(placed) => {
                self.garp(&placed, &record.spec).await;
                record.state = NodeServiceState::Running;
                self.metrics.set_vips_held(placed.len());
                self.metrics.transition("adopt");
                true
            }
            Err(e) => {
                // Held before the restart, not held now: whatever is left
                // expires by itself; the role is given up as a fence does.
                tracing::warn!(error = %e, "re-adoption failed: giving the master role up");
                self.drop_vips(&record.vips, record.interface.as_deref())
                    .await;
                record.last_hooks = vec![refused(&format!("re-adoption failed: {e}"))];
                Self::mark_fenced(record);
                false
            }
        }
    }

    /// Extends the lifetime of every VIP held for `cluster` after a renew;
    /// never adds one back. A VIP the kernel already expired means this
    /// node missed its renewals for longer than the lifetime (a stall, a
    /// cut-off whose fence has not run yet) and another node may hold the
    /// service now: it is set aside, and the record holding it gives the
    /// master role up ([`Node::give_up_if_expired`]).
    pub async fn extend(&self, cluster: &ClusterView) {
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
    /// ([`Node::extend`]): gives the master role up as a fence does (the
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
        self.metrics.set_vips_held(0);
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

    /// Runs the monitor scripts once; `Some(true)` when the service runs.
    pub async fn monitor(
        &self,
        record: &mut ServiceRecord,
        svc: &ServiceView,
        cluster: &ClusterView,
    ) -> Option<bool> {
        let monitor = svc.spec.hooks.as_ref()?.monitor.as_ref()?;
        let timeout = Duration::from_secs(monitor.timeout_seconds.max(1) as u64);
        let results = self
            .run_hooks(
                svc,
                cluster,
                Action::Monitor,
                Role::Master,
                record.epoch,
                timeout,
            )
            .await;
        if results.is_empty() {
            return None;
        }
        let ok = hooks::overall(&results) == HookOutcome::Success;
        record.last_hooks = results;
        Some(ok)
    }

    /// Runs the periodic scripts once with the node's current role.
    pub async fn periodic(
        &self,
        record: &mut ServiceRecord,
        svc: &ServiceView,
        cluster: &ClusterView,
    ) {
        let Some(p) = svc.spec.hooks.as_ref().and_then(|h| h.periodic.as_ref()) else {
            return;
        };
        let timeout = Duration::from_secs(p.timeout_seconds.max(1) as u64);
        let results = self
            .run_hooks(
                svc,
                cluster,
                Action::Periodic,
                record.role,
                record.epoch,
                timeout,
            )
            .await;
        if !results.is_empty() {
            record.last_hooks = results;
        }
    }

    /// After the VIPs were dropped: the leave scripts within the time left
    /// before D (the service is given away as cleanly as time allows).
    pub async fn fence_leave(
        &self,
        record: &mut ServiceRecord,
        svc: &ServiceView,
        cluster: &ClusterView,
        left: Duration,
    ) {
        let results = if left.is_zero() {
            Vec::new()
        } else {
            self.run_hooks(
                svc,
                cluster,
                Action::Leave,
                Role::Master,
                record.epoch,
                left,
            )
            .await
        };
        record.last_hooks = results;
        Self::mark_fenced(record);
    }

    /// The record of a master role given up by a fence (its VIPs dropped):
    /// no role, Failed, the epoch burned (a fenced node never acts on it
    /// again), and unclean and `fenced`, for the leave scripts may not have
    /// run (or finished): they run again once the node is in contact.
    pub fn mark_fenced(record: &mut ServiceRecord) {
        record.role = Role::None;
        record.vips.clear();
        record.state = NodeServiceState::Failed;
        record.failed_epoch = Some(record.epoch);
        record.unclean_epoch = Some(record.epoch);
        record.fenced = true;
    }
}

/// A hook result standing for a step that could not run.
pub fn refused(reason: &str) -> HookResult {
    HookResult {
        script: "-".into(),
        action: "enter".into(),
        exit_code: None,
        outcome: HookOutcome::Refused,
        duration_ms: 0,
        finished_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        )),
        output_tail: vec![reason.to_owned()],
    }
}

#[cfg(test)]
mod tests;
