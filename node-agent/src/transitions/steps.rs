//! The steps of a transition (enter and leave master, a VIP edit on a running
//! master, adoption after a restart) and the leave of a fence.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kubeha_crds::service::{HookOutcome, NodeServiceState, Role};

use kubeha_crds::roles::Transition;

use super::scripts::HookCall;
use super::{EnterError, LocalNode, TransitionCluster, TransitionService, refused};
use crate::assignments::{Assignment, Step};
use crate::hooks::{self, Action};
use crate::statefile::ServiceRecord;
use crate::vip::{Netlink, Vip};

impl<N: Netlink> LocalNode<N> {
    /// Carries out one step on `record`, updating it. Returns whether the
    /// step succeeded.
    pub async fn step(
        &self,
        step: Step,
        record: &mut ServiceRecord,
        svc: &TransitionService,
        cluster: &TransitionCluster,
        wanted: Assignment,
    ) -> bool {
        match step {
            Step::LeaveMaster => self.leave_master(record, svc, cluster).await,
            Step::LeaveVicemaster => {
                record.state = NodeServiceState::Stopping;
                // The hooks the standby role was entered with.
                let entered = TransitionService {
                    key: svc.key.clone(),
                    spec: record.spec.clone(),
                    checksum: record.config_checksum.clone(),
                };
                let results = self
                    .run_hooks(
                        &entered,
                        cluster,
                        HookCall::new(Action::Leave, Role::Vicemaster, record.epoch),
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
                        HookCall::new(Action::Enter, Role::Vicemaster, wanted.epoch),
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
                    record.count_hook_failure(
                        hooks::overall(&record.last_hooks),
                        svc.spec.migration_threshold,
                    );
                }
                ok
            }
        }
    }

    pub(super) async fn enter_master(
        &self,
        record: &mut ServiceRecord,
        svc: &TransitionService,
        cluster: &TransitionCluster,
        epoch: i64,
    ) -> bool {
        record.state = NodeServiceState::Starting;
        record.epoch = epoch;
        record.spec = svc.spec.clone();
        record.config_checksum = svc.checksum.clone();
        let vips = Self::vips(&svc.spec);
        let placed = match self.add_vips(&svc.key, &vips, cluster).await {
            Ok(p) => p,
            Err(EnterError::HeartbeatTooOld) => {
                // Refused before any add: nothing started, and nothing
                // failed. Entered again once a renew makes room for a
                // lifetime (a heartbeat just back from a stalled API
                // server counts from a renew sent before the stall).
                tracing::warn!(
                    epoch,
                    "heartbeat too old to add VIPs: entering after the next renew"
                );
                record.state = NodeServiceState::Stopped;
                record.role = Role::None;
                record.last_hooks = vec![refused(&EnterError::HeartbeatTooOld.to_string())];
                return false;
            }
            Err(e) => {
                tracing::error!(epoch, error = %e, "cannot enter master");
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
        // Announced first, before anything else of the entry: the VIPs
        // answer ARP from the moment they are added anyway, so the hooks
        // gain nothing by running before the announcement, and the clients
        // lose the time they take. An entry that fails after this leaves
        // (the VIPs removed, the rest of the burst stops) and the next
        // holder announces itself.
        self.announce(&placed, &svc.spec).await;
        record.interface = placed.first().map(|(i, _)| i.clone());
        record.vips = placed.iter().map(|(_, v)| v.to_string()).collect();
        record.role = Role::Master;
        if let Some(route) = &svc.spec.default_route
            && let Ok(gw) = route.gateway.parse::<IpAddr>()
            && let Err(e) = self.netlink.add_default_route(gw).await
        {
            tracing::warn!(error = %e, "default route not added");
        }
        let results = self
            .run_hooks(
                svc,
                cluster,
                HookCall::new(Action::Enter, Role::Master, epoch),
            )
            .await;
        let outcome = hooks::overall(&results);
        record.last_hooks = results;
        if outcome != HookOutcome::Success || cluster.fenced.load(Ordering::SeqCst) {
            // An enter failure: leave again, report, let the operator move it.
            tracing::warn!(epoch, ?outcome, "enter failed; leaving again");
            let enter_results = std::mem::take(&mut record.last_hooks);
            self.leave_master(record, svc, cluster).await;
            let mut all = enter_results;
            all.append(&mut record.last_hooks);
            record.last_hooks = all;
            record.state = NodeServiceState::Failed;
            record.failed_epoch = Some(epoch);
            // Exit 1 or 2 of an enter script: no retry on this node.
            record.count_hook_failure(outcome, svc.spec.migration_threshold);
            return false;
        }
        record.state = NodeServiceState::Running;
        self.metrics
            .transition(Transition::of(true, self.is_primary(svc, cluster)).as_str());
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
        svc: &TransitionService,
        cluster: &TransitionCluster,
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
        match self.add_vips(&svc.key, &new, cluster).await {
            Ok(placed) => {
                self.announce(&placed, &svc.spec).await;
                record.vips = wanted.iter().map(Vip::to_string).collect();
                if record.interface.is_none() {
                    record.interface = placed.first().map(|(i, _)| i.clone());
                }
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
    /// must not change what stops the service). Returns whether it
    /// succeeded.
    pub async fn leave_master(
        &self,
        record: &mut ServiceRecord,
        svc: &TransitionService,
        cluster: &TransitionCluster,
    ) -> bool {
        let entered = TransitionService {
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
        record.vips.clear();
        let results = self
            .run_hooks(
                svc,
                cluster,
                HookCall::new(Action::Leave, Role::Master, record.epoch),
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
        self.metrics
            .transition(Transition::of(false, self.is_primary(svc, cluster)).as_str());
        ok
    }

    /// Re-adopts a service this node held before a restart and still holds:
    /// VIP lifetimes extended, one GARP burst, no enter hooks. When the VIPs
    /// cannot be held again, the master role is given up as a fence does.
    /// `service` is the service's `namespace/name`.
    pub async fn adopt(
        &self,
        service: &str,
        record: &mut ServiceRecord,
        cluster: &TransitionCluster,
    ) -> bool {
        let vips = Self::vips(&record.spec);
        match self.add_vips(service, &vips, cluster).await {
            Ok(placed) => {
                self.announce(&placed, &record.spec).await;
                record.state = NodeServiceState::Running;
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

    /// After the VIPs were dropped: the leave scripts within the time left
    /// before D (the service is given away as cleanly as time allows).
    pub async fn fence_leave(
        &self,
        record: &mut ServiceRecord,
        svc: &TransitionService,
        cluster: &TransitionCluster,
        left: Duration,
    ) {
        let results = if left.is_zero() {
            Vec::new()
        } else {
            let call = HookCall::new(Action::Leave, Role::Master, record.epoch);
            self.run_hooks_within(svc, cluster, call, left).await
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
