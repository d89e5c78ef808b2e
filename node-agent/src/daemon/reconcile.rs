//! One pass over the services: gathers each one's facts, asks the pure plan
//! ([`decide::next`]) what to do, and starts it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::Instrument;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use kubeha_crds::service::{NodeServiceState, Role};
use kubeha_crds::{HACluster, HAService, annotations, leases};

use super::membership::{OwnNode, cluster_view, deleted_cluster_view};
use super::report::{ROUTINE_REPORT_TIMEOUT, applied_digest, event, report_digest, report_within};
use super::tasks::{spawn_adopt, spawn_monitor, spawn_periodic, spawn_revip, spawn_steps};
use super::{REPORT_RECHECK, Shared, Slot, Target, new_slot, spec_checksum};
use crate::assignments::{self, Assignment, Membership, steps_between};
use crate::decide::{self, Facts, Work};
use crate::statefile::ServiceRecord;
use crate::transitions::{LocalNode, TransitionService};
use crate::vip::RtNetlink;

pub(super) async fn reconcile(
    shared: &Arc<Shared>,
    clusters: &[Arc<HACluster>],
    me: &OwnNode,
    services: &Store<HAService>,
    service_leases: &Store<Lease>,
    claims: Claims<'_>,
    slots: &mut BTreeMap<String, Slot>,
) {
    let Claims {
        leases: claim_leases,
        index: lease_claims,
    } = claims;
    let node = shared.config.node.clone();
    let by_name: HashMap<String, &Arc<HACluster>> =
        clusters.iter().map(|c| (c.name_any(), c)).collect();
    // Every service Lease is in the operator's namespace: by name (those
    // labelled for this node).
    let lease_of: HashMap<String, Arc<Lease>> = service_leases
        .state()
        .into_iter()
        .map(|l| (l.name_any(), l))
        .collect();
    let all_services = services.state();
    let seen_claims = assignments::seen_claims(all_services.iter().map(|s| s.as_ref()));
    let mut seen = std::collections::HashSet::new();
    let pass = Pass {
        node: &node,
        by_name: &by_name,
        lease_of: &lease_of,
        lease_claims,
        seen_claims: &seen_claims,
        me,
    };
    for svc in all_services {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let span = tracing::info_span!("service", service = %key);
        reconcile_service(shared, &pass, &svc, key, slots, &mut seen)
            .instrument(span)
            .await;
    }
    // Services gone (deleted, or this node no longer a member): leave.
    let gone: Vec<String> = slots
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        let slot = &slots[&key];
        let Ok(guard) = slot.record.clone().try_lock_owned() else {
            continue;
        };
        let (ns, name) = key.split_once('/').unwrap_or(("", &key));
        // Not deleted (its claim Lease, or its service Lease, is still
        // there), only out of this node's view: keep the record, and what
        // the Lease still gives (nothing once it no longer names this node
        // and so left this node's watch).
        let lease = lease_of.get(&leases::service_lease_name(ns, name));
        let claimed = claim_leases
            .get(
                &kube::runtime::reflector::ObjectRef::new(&leases::claim_lease_name(ns, name))
                    .within(&shared.config.namespace),
            )
            .is_some();
        if lease.is_some() || claimed {
            let mode = by_name
                .get(&guard.cluster)
                .and_then(|c| me.membership(c).mode());
            let wanted = assignments::assignment(&node, lease.map(|l| l.as_ref()), mode);
            if assignments::kept_out_of_view(guard.role, guard.epoch, wanted) {
                continue;
            }
        }
        if guard.role == Role::None {
            drop(guard);
            slots.remove(&key);
            continue;
        }
        // A deleted HACluster: its services are left all the same (leave
        // scripts, VIPs), as a node that stopped being a member leaves.
        let view = match by_name.get(&guard.cluster) {
            Some(cluster) => cluster_view(shared, cluster),
            None => deleted_cluster_view(shared, &guard.cluster),
        };
        let service = TransitionService {
            key: key.clone(),
            spec: guard.spec.clone(),
            checksum: guard.config_checksum.clone(),
        };
        let steps = steps_between(guard.role, Assignment::NONE, None);
        let target = Target {
            api: Api::namespaced(shared.client.clone(), ns),
            name: name.to_owned(),
            reference: ObjectReference {
                api_version: Some("kubeha.io/v1alpha1".into()),
                kind: Some("HAService".into()),
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                ..Default::default()
            },
            reported: slot.reported.clone(),
        };
        spawn_steps(
            shared.clone(),
            guard,
            steps,
            service,
            view,
            Assignment::NONE,
            target,
        );
    }
    // The Leases whose events wake the next pass (`super::lease_wakes`).
    let recorded = slots
        .keys()
        .map(|key| {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            leases::service_lease_name(ns, name)
        })
        .collect();
    *shared
        .recorded_leases
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = recorded;
}

/// Every service's claim Lease (whether a service exists) and their VIP
/// claims, indexed ([`assignments::lease_claims`]).
#[derive(Clone, Copy)]
pub(super) struct Claims<'a> {
    /// The claim Leases.
    pub leases: &'a Store<Lease>,
    /// Their claims, by address.
    pub index: &'a kubeha_crds::validate::ClaimIndex,
}

/// What one pass knows of every service alike.
struct Pass<'a> {
    node: &'a str,
    by_name: &'a HashMap<String, &'a Arc<HACluster>>,
    lease_of: &'a HashMap<String, Arc<Lease>>,
    /// Every claim Lease's VIP claim, for [`assignments::vet`].
    lease_claims: &'a kubeha_crds::validate::ClaimIndex,
    /// The VIP claims of the services this node sees.
    seen_claims: &'a kubeha_crds::validate::ClaimIndex,
    me: &'a OwnNode,
}

/// One service in a pass (in its span): gathers its facts, decides, and
/// starts the work; notes it in `seen` while this node is (or may be) a
/// member.
async fn reconcile_service(
    shared: &Arc<Shared>,
    pass: &Pass<'_>,
    svc: &Arc<HAService>,
    key: String,
    slots: &mut BTreeMap<String, Slot>,
    seen: &mut std::collections::HashSet<String>,
) {
    let Pass {
        node,
        by_name,
        lease_of,
        lease_claims,
        seen_claims,
        me,
    } = *pass;
    let Some(cluster) = by_name.get(&svc.spec.cluster_ref) else {
        return;
    };
    let mode = match me.membership(cluster) {
        Membership::Member(mode) => mode,
        Membership::NotMember => return,
        // Selector membership not known yet: keep what is held as it
        // is (counts as seen, so it is not left either).
        Membership::Unknown => {
            seen.insert(key.clone());
            return;
        }
    };
    seen.insert(key.clone());
    let lease = lease_of.get(&leases::service_lease_name(
        &svc.namespace().unwrap_or_default(),
        &svc.name_any(),
    ));
    let mut wanted = assignments::assignment(node, lease.map(|l| l.as_ref()), Some(mode));
    // Before taking any role, the same checks the operator made before it
    // wrote the Lease: a forged or stale assignment runs nothing here.
    let refusal = match lease {
        Some(l) if wanted.role != Role::None => {
            let claims = assignments::contending_claims(svc, lease_claims, seen_claims);
            assignments::vet(svc, l, cluster, &claims)
                .err()
                .map(|r| r.to_string())
        }
        _ => None,
    };
    // A clearance the operator wrote before it saw this node renew
    // again after its last fence.
    let cleared_before_return = shared
        .returned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&cluster.name_any())
        .is_some_and(|back| {
            lease
                .and_then(|l| leases::holder_renew_time(l))
                .is_none_or(|seen| leases::seen_before(seen, *back))
        });
    let lease_epoch = lease.and_then(|l| assignments::lease_epoch(l));
    let view = cluster_view(shared, cluster);
    let slot = slots.entry(key.clone()).or_insert_with(|| {
        let mut slot = new_slot(
            ServiceRecord::fresh(
                &cluster.name_any(),
                &svc.spec,
                spec_checksum(&svc.spec),
                svc.annotations().get(annotations::CLEAR).cloned(),
            ),
            false,
        );
        slot.recover = shared.past_unknown.load(Ordering::SeqCst);
        slot
    });
    let Ok(mut guard) = slot.record.clone().try_lock_owned() else {
        return;
    };
    let fenced_busy = slot
        .fenced_while_busy
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if fenced_busy.as_deref() == Some(guard.cluster.as_str()) && guard.role == Role::Master {
        tracing::error!(
            epoch = guard.epoch,
            "a fence found this service in a transition: its VIPs were dropped under it; leaving as a fence does"
        );
        shared
            .node
            .drop_vips(&guard.vips.clone(), guard.interface.clone().as_deref())
            .await;
        crate::transitions::LocalNode::<RtNetlink>::mark_fenced(&mut guard);
    }
    // An admin's clear request (a new `kubeha.io/clear` value): reset
    // this node's failures; the report below (or the next step's)
    // tells the operator.
    let token = svc
        .annotations()
        .get(annotations::CLEAR)
        .map(String::as_str);
    if let Some(cleared) = guard.apply_clear(token) {
        slot.monitor_failures.store(0, Ordering::SeqCst);
        // A clear proves nothing about a leave that failed here: run the
        // leave again (scripts are idempotent); only its success
        // acknowledges the epoch and lets this node enter again.
        if guard.unclean_epoch.is_some() {
            slot.recover = true;
        }
        tracing::info!(token, ?cleared, "clear request applied");
        if cleared.changed() {
            let note = format!(
                "failures cleared ({} {}): fail count {} -> 0{}{}",
                annotations::CLEAR,
                token.unwrap_or_default(),
                cleared.fail_count,
                if cleared.was_failed {
                    ", state Failed -> Stopped"
                } else {
                    ""
                },
                cleared.failed_epoch.map_or(String::new(), |e| format!(
                    ", epoch {e} may be entered again"
                )),
            );
            let (shared, reference) = (shared.clone(), svc.object_ref(&()));
            let target = Target {
                api: Api::namespaced(shared.client.clone(), &svc.namespace().unwrap_or_default()),
                name: svc.name_any(),
                reference,
                reported: slot.reported.clone(),
            };
            tokio::spawn(async move {
                event(&shared, &target, false, "FailuresCleared", note).await;
            });
        }
    }
    // Nothing is entered while this node is cut off from the API
    // server, or while its last renew leaves no time to hold a VIP
    // (just after a stalled API server answers a renew sent before the
    // stall).
    let cut_off = view.fenced.load(Ordering::SeqCst)
        || view.beat.is_none_or(|b| {
            let now = Instant::now();
            b.past_deadline(now) || LocalNode::<RtNetlink>::allowed_until(&b, now).is_none()
        });
    let service = TransitionService {
        key: key.clone(),
        spec: svc.spec.clone(),
        checksum: slot.checksum(svc),
    };
    let target = Target {
        api: Api::namespaced(shared.client.clone(), &svc.namespace().unwrap_or_default()),
        name: svc.name_any(),
        reference: svc.object_ref(&()),
        reported: slot.reported.clone(),
    };

    if let Some(why) = &refusal {
        wanted = Assignment {
            role: Role::None,
            may_enter: false,
            ..wanted
        };
        if slot.refused.as_ref() != Some(why) {
            tracing::warn!(reason = %why, "refusing the assignment the service Lease gives this node");
            let (shared, target, note) = (shared.clone(), target.clone(), why.clone());
            tokio::spawn(async move {
                event(&shared, &target, true, "AssignmentRefused", note).await;
            });
        }
    } else if slot.refused.is_some() {
        tracing::info!("the service passes the checks again: its assignment is taken");
    }
    slot.refused = refusal.clone();
    guard.refused = refusal;
    let fresh = assignments::not_older(wanted, guard.role, guard.epoch);
    if fresh != wanted && slot.stale_warned != Some(wanted.epoch) {
        slot.stale_warned = Some(wanted.epoch);
        tracing::warn!(
            lease_epoch = wanted.epoch,
            recorded_epoch = guard.epoch,
            "the Lease clears this node at an epoch older than one it already saw: not entering (stale view, or a hand-edited Lease)"
        );
    }
    let spec_vips: std::collections::BTreeSet<String> = LocalNode::<RtNetlink>::vips(&svc.spec)
        .iter()
        .map(ToString::to_string)
        .collect();
    let hooks = svc.spec.hooks.as_ref();
    let now = Instant::now();
    let api_digest = svc
        .status
        .as_ref()
        .and_then(|s| s.nodes.iter().find(|e| e.node == node))
        .map(applied_digest);
    // The operator waits for a proof from the node it last cleared (this
    // one, if the Lease names it and another holder now).
    let owes_proof = lease.is_some_and(|l| {
        l.annotations().get(leases::CLEARED_NODE_ANNOTATION) == Some(&node.to_owned())
    });
    // Bookkeeping work is applied and the service decided again; every
    // rule of it changes what it decided on, so this ends.
    for _ in 0..8 {
        let digest = report_digest(&guard);
        let resend_due = {
            let mut resend = shared.resend.lock().unwrap_or_else(|e| e.into_inner());
            let due = resend.get_mut(&key).is_some_and(|at| {
                let before = at.len();
                at.retain(|t| *t > now);
                at.len() < before
            });
            if resend.get(&key).is_some_and(Vec::is_empty) {
                resend.remove(&key);
            }
            due
        };
        let report_due = {
            let mut r = slot.reported.lock().unwrap_or_else(|e| e.into_inner());
            // A report that timed out may have been applied late, over a
            // newer one: looked at again then, and sent again only when the
            // API server's copy differs (not once more for nothing to an
            // API server that was only slow).
            if resend_due && api_digest.as_deref() != Some(&digest) {
                r.done = None;
            }
            // Reported and taken, but the API server's copy says
            // otherwise long after: a report that timed out here was
            // applied late, over a newer one. Sent again.
            let overwritten = api_digest.as_deref() != Some(&digest)
                && r.sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_RECHECK);
            r.pending.as_deref() != Some(&digest)
                && (r.done.as_deref() != Some(&digest) || overwritten)
                && r.retry_at.is_none_or(|t| now >= t)
                && entry_wanted(&guard, api_digest.is_some(), owes_proof)
        };
        // In single and config HA monitoring is off (StorNext), and a
        // stopped cluster's services are leaving: no monitor runs. The
        // next one is due a whole interval after monitoring comes back, not
        // at once (a node just back from config to default would otherwise
        // run it before the services it reconfigured have stopped).
        let monitoring_off = mode.is_exclusive() || cluster.spec.stopped;
        if monitoring_off && let Some(m) = hooks.and_then(|h| h.monitor.as_ref()) {
            slot.next_monitor = now + Duration::from_secs(m.interval_seconds.max(1) as u64);
        }
        let work = decide::next(&Facts {
            wanted,
            lease_epoch,
            record: &guard,
            spec_vips: spec_vips.clone(),
            adopt: slot.adopt,
            recover: slot.recover,
            cleared_before_return,
            cut_off,
            vip_expired: shared.node.held.any_expired(&guard.vips),
            // No monitor failure moves the service while monitoring is
            // off (above); the self-fence is off too in single and config
            // when the last renew said so (`heartbeat::Beat`).
            monitor_due: !monitoring_off
                && hooks.is_some_and(|h| h.monitor.is_some())
                && now >= slot.next_monitor,
            periodic_due: hooks.is_some_and(|h| h.periodic.is_some()) && now >= slot.next_periodic,
            refresh_due: svc.spec.garp.refresh_seconds > 0 && now >= slot.next_refresh,
            report_due,
        });
        if work != Work::Idle && work != Work::Report {
            tracing::debug!(?work, "decided");
        }
        match work {
            Work::Wait | Work::Idle => {}
            Work::Adopt => {
                slot.adopt = false;
                spawn_adopt(shared.clone(), guard, service, view, target);
            }
            Work::ForgetAdoption => {
                // Held before the restart but no longer ours: the steps
                // leave it.
                slot.adopt = false;
                continue;
            }
            Work::GiveUp => {
                shared.node.give_up_if_expired(&mut guard).await;
                shared.notify.notify_one();
                continue;
            }
            Work::Recover => {
                if guard.fenced {
                    tracing::info!(
                        epoch = guard.epoch,
                        "left by a fence: running the leave again"
                    );
                }
                slot.recover = false;
                spawn_steps(
                    shared.clone(),
                    guard,
                    vec![assignments::Step::LeaveMaster],
                    service,
                    view,
                    fresh,
                    target,
                );
            }
            Work::Refuse { epoch, acknowledge } => {
                let why = if cleared_before_return {
                    "cleared before the operator saw this node back from a fence"
                } else {
                    "already left on this node"
                };
                guard.state = NodeServiceState::Failed;
                guard.failed_epoch = Some(epoch);
                guard.last_hooks = vec![crate::transitions::refused(&format!(
                    "epoch {epoch} was {why}; waiting for a new epoch"
                ))];
                // Never entered here and no VIP of it on this node: the
                // acknowledgement is true, and spares the operator the
                // wait for a VIP's lifetime ("started nothing").
                let mut vips = guard.vips.clone();
                vips.extend(spec_vips.iter().cloned());
                let acked = acknowledge
                    && !shared
                        .node
                        .holds_any(&vips, guard.interface.as_deref())
                        .await;
                if acked {
                    guard.acked_epoch = guard.acked_epoch.max(Some(epoch));
                }
                tracing::warn!(
                    epoch,
                    why,
                    acked,
                    "clearance refused: waiting for a new epoch"
                );
                continue;
            }
            Work::Steps(steps) => {
                spawn_steps(shared.clone(), guard, steps, service, view, fresh, target);
            }
            Work::Revip => spawn_revip(shared.clone(), guard, service, view, target),
            Work::Observe { epoch } => {
                if guard.observe_epoch(epoch) {
                    tracing::debug!(epoch, role = ?guard.role, "observed a new epoch");
                }
                continue;
            }
            Work::Monitor => {
                let m = hooks.and_then(|h| h.monitor.as_ref());
                let (interval, threshold) =
                    m.map_or((1, 1), |m| (m.interval_seconds, m.failure_threshold));
                slot.next_monitor = now + Duration::from_secs(interval.max(1) as u64);
                let failures = slot.monitor_failures.clone();
                spawn_monitor(
                    shared.clone(),
                    guard,
                    service,
                    view,
                    threshold,
                    failures,
                    target,
                );
            }
            Work::Periodic => {
                let interval = hooks
                    .and_then(|h| h.periodic.as_ref())
                    .map_or(1, |p| p.interval_seconds);
                slot.next_periodic = now + Duration::from_secs(interval.max(1) as u64);
                spawn_periodic(shared.clone(), guard, service, view);
            }
            Work::Refresh => {
                slot.next_refresh = now + Duration::from_secs(svc.spec.garp.refresh_seconds as u64);
                // A copy: the burst takes a while and needs no lock.
                let record = guard.clone();
                drop(guard);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let placed: Vec<_> = record
                        .vips
                        .iter()
                        .filter_map(|v| crate::vip::Vip::parse(v, None).ok())
                        .map(|v| (record.interface.clone().unwrap_or_default(), v))
                        .collect();
                    shared.node.garp(&placed, &record.spec).await;
                });
            }
            Work::Report => {
                // A few reports in flight at a time: with many services, a
                // report for each at once would queue up at the API server
                // and time out together. The others stay due; each report
                // that ends wakes the loop, which then sends the record as
                // it is by then.
                let Ok(permit) = shared.report_permits.clone().try_acquire_owned() else {
                    break;
                };
                {
                    let mut r = slot.reported.lock().unwrap_or_else(|e| e.into_inner());
                    r.pending = Some(digest.clone());
                    r.sent = Some(now);
                }
                // A copy: a slow API server must not hold the record
                // (and every decision on it) for the report's timeout.
                let record = guard.clone();
                drop(guard);
                let shared = shared.clone();
                tokio::spawn(async move {
                    report_within(&shared, &target, &record, ROUTINE_REPORT_TIMEOUT).await;
                    drop(permit);
                    shared.notify.notify_one();
                });
            }
        }
        break;
    }
}

/// Whether this node's status entry for a service is worth sending: once it
/// has one in the API server, it keeps it current (the operator may wait
/// for its proofs); before that, only when the node did something with the
/// service ([`ServiceRecord::never_ran`]) or the operator waits for its
/// proof (the Lease names it as the node last cleared).
fn entry_wanted(record: &ServiceRecord, has_entry: bool, owes_proof: bool) -> bool {
    has_entry || owes_proof || !record.never_ran()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_member_reports_only_what_the_operator_can_use() {
        let spec = kubeha_crds::testing::service_spec("c", &["198.18.0.100/24"]);
        let mut idle = ServiceRecord::fresh("c", &spec, "x".into(), None);
        // Observed a later epoch, never ran the service: nothing to say.
        idle.observe_epoch(4);
        assert!(!entry_wanted(&idle, false, false));
        // The Lease names it as cleared: its moved-on proof is awaited.
        assert!(entry_wanted(&idle, false, true));
        // It has an entry already: kept current.
        assert!(entry_wanted(&idle, true, false));
        let mut standby = idle.clone();
        standby.role = Role::Vicemaster;
        assert!(entry_wanted(&standby, false, false));
        let mut refused = idle.clone();
        refused.state = NodeServiceState::Failed;
        refused.failed_epoch = Some(4);
        assert!(entry_wanted(&refused, false, false));
        let mut acked = idle;
        acked.acked_epoch = Some(3);
        assert!(entry_wanted(&acked, false, false));
    }
}
