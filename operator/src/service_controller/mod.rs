//! The HAService reconciler: gathers the facts (cluster, members, heartbeat
//! view, service Lease, agents' entries, failures), asks
//! [`service_plan::plan`] what to do, then carries it out: the service Lease
//! write (optimistic, on the version read), the status (server-side apply
//! by `kubeha-operator`, never touching `status.nodes`), Events, metrics,
//! and a requeue at the next instant something changes by time alone.
//!
//! A finalizer holds a deleted HAService until its master has left (or is
//! fenced): the Lease is set to nobody first, then released.
//! Non-leaders run the same evaluation to keep their memory warm and write
//! nothing.

mod evaluate;
mod lease;
mod status;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Resource, ResourceExt};
use kubeha_crds::HAService;

use crate::context::{Ctx, service_key};
use crate::error::{Error, Result};

use evaluate::{Evaluation, evaluate, requeue};
pub use lease::{HeartbeatReads, service_lease};
use lease::{Written, heartbeat_moved, refresh_heartbeat, write_lease};
use status::{condition_is_new, move_blocked_is_new, publish_status, stall_is_new};

/// The finalizer the operator puts on every HAService.
pub const FINALIZER: &str = "kubeha.io/release";

/// A little past an expiry instant, so the state has flipped when the
/// reconcile runs.
const EXPIRY_MARGIN: Duration = Duration::from_millis(5);

/// Reconciles one HAService (the controller's reconcile function), in a
/// span that names it.
#[tracing::instrument(skip_all, fields(service = %service_key(&svc)))]
pub async fn reconcile(svc: Arc<HAService>, ctx: Arc<Ctx>) -> Result<Action> {
    let started = Instant::now();
    let result = crate::error::within_timeout(reconcile_inner(svc, ctx.clone())).await;
    let ok = match &result {
        Ok(_) => true,
        Err(e) => e.is_wait(),
    };
    ctx.metrics.reconciled("haservice", ok, started.elapsed());
    result
}

/// What to do after a failed reconcile.
#[tracing::instrument(skip_all, fields(service = %service_key(&svc)))]
pub fn error_policy(svc: Arc<HAService>, error: &Error, _ctx: Arc<Ctx>) -> Action {
    if error.is_wait() {
        tracing::debug!(%error, "waiting");
        Action::requeue(Duration::from_millis(500))
    } else if matches!(error, Error::Timeout(_)) {
        tracing::warn!(%error, "reconcile timed out");
        Action::requeue(Duration::from_millis(200))
    } else {
        tracing::warn!(%error, "reconcile failed");
        Action::requeue(Duration::from_secs(2))
    }
}

async fn reconcile_inner(svc: Arc<HAService>, ctx: Arc<Ctx>) -> Result<Action> {
    if !ctx.is_ready() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    if !ctx.is_leader() {
        let deleting = svc.meta().deletion_timestamp.is_some();
        let ev = evaluate(&svc, &ctx, deleting, Instant::now());
        return Ok(requeue(&ev, Instant::now()));
    }
    if ctx.in_gap(&svc.spec.cluster_ref) {
        return Ok(Action::requeue(crate::gaps::WAIT_IN_GAP));
    }
    let api: Api<HAService> = Api::namespaced(ctx.client.clone(), &ns);
    // What the operator keeps for the service is freed when the watch
    // shows it gone ([`Ctx::forget_deleted`]), on every replica.
    finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            FinalizerEvent::Apply(svc) => apply(&svc, &ctx, false).await,
            FinalizerEvent::Cleanup(svc) => apply(&svc, &ctx, true).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(svc: &HAService, ctx: &Ctx, deleting: bool) -> Result<Action> {
    let key = service_key(svc);
    let mut now = Instant::now();
    let mut ev = evaluate(svc, ctx, deleting, now);

    // A clearance that rests on a Lost heartbeat is confirmed first, and so
    // is every Lost heartbeat when the holder changes: right after an API
    // server stall the watch still shows every node Lost although their
    // agents renew again, and a service stopped or moved for that waits for
    // one more handover. The holder's heartbeat is read afresh too when it
    // is cleared, so the Lease carries its latest renew (the
    // holder-renew-time an agent back from a fence waits for), not what a
    // watch still behind a busy API server shows: else the agent refuses
    // the clearance and the service waits for one more epoch. A read that
    // changed the view changes the plan: the new plan is confirmed in turn,
    // and one still unconfirmed after three rounds is decided again
    // shortly instead of written.
    let mut rounds = 0;
    // The cleared holder's renewTime as just read, for the annotation (a
    // watch event arriving late may still put an older one in the view).
    let mut holder_renew: Option<(String, String)> = None;
    loop {
        let h = &ev.plan.handover;
        if !(h.write && (h.cleared_now || h.holder_changed)) {
            break;
        }
        if rounds == 3 {
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
        rounds += 1;
        let mut confirm: BTreeSet<String> = h.relies_on_heartbeat.iter().cloned().collect();
        if h.holder_changed {
            confirm.extend(ev.lost.iter().cloned());
        }
        let holder = h
            .lease
            .holder
            .clone()
            .filter(|holder| h.cleared_now && !confirm.contains(holder));
        // All the reads at once: each one is a round trip to the API
        // server on the way to the Lease write (after a power-off, the
        // lost master's confirmation and the new holder's renew).
        let confirmations = futures::future::try_join_all(
            confirm
                .iter()
                .map(|node| heartbeat_moved(ctx, &ev.cluster, node, now)),
        );
        let refresh = async {
            match &holder {
                Some(holder) => refresh_heartbeat(ctx, &ev.cluster, holder, now)
                    .await
                    .map(Some),
                None => Ok(None),
            }
        };
        let (confirmed, refreshed) = futures::try_join!(confirmations, refresh)?;
        let mut moved = confirmed.into_iter().any(|moved| moved);
        if let (Some(holder), Some((changed, renewed))) = (holder, refreshed) {
            moved |= changed;
            holder_renew = renewed.map(|r| (holder, r));
        }
        if !moved {
            break;
        }
        now = Instant::now();
        ev = evaluate(svc, ctx, deleting, now);
    }

    let h = &ev.plan.handover;
    if h.write && ctx.in_gap(&ev.cluster) {
        // A gap opened while the heartbeats were being confirmed.
        return Ok(Action::requeue(crate::gaps::WAIT_IN_GAP));
    }
    let mut new_holder_written = false;
    if h.write {
        let renewed = holder_renew
            .filter(|(holder, _)| h.lease.holder.as_ref() == Some(holder))
            .map(|(_, r)| r);
        match write_lease(
            ctx,
            svc,
            ev.lease.as_deref(),
            &h.lease,
            h.holder_changed,
            h.progress.waiting_on(),
            renewed,
        )
        .await?
        {
            Written::Conflict => return Ok(Action::requeue(Duration::from_millis(200))),
            Written::Done => {
                let reason = ev
                    .plan
                    .decision
                    .as_ref()
                    .map_or("Deleted", |d| d.reason.as_str());
                tracing::info!(
                    holder = ?h.lease.holder,
                    epoch = h.lease.epoch,
                    enter_epoch = ?h.lease.enter_epoch,
                    standby = ?h.lease.standby,
                    progress = ?h.progress,
                    reason,
                    "service Lease written"
                );
                if h.holder_changed
                    && let Some(holder) = &h.lease.holder
                {
                    new_holder_written = true;
                    let reason = placement_reason(svc, reason, holder);
                    ctx.metrics.placed(reason);
                    ctx.with_service_memory(&key, |m| {
                        m.note_written(holder, h.lease.epoch, reason, now)
                    });
                }
            }
        }
    }

    if new_holder_written && !deleting {
        // The new holder's agent needs only the Lease. What this service
        // has to announce is queued; its status (and the claim check) waits
        // for the next reconcile, which the Lease's watch event starts once
        // the store shows the write (a second at the latest): after a
        // power-off, 50 services each wrote their status before the next
        // one's Lease could go.
        announce(ctx, &ev);
        return Ok(Action::requeue(STATUS_AFTER_NEW_HOLDER));
    }

    if !deleting {
        lease::write_claim(ctx, svc).await?;
    }

    publish_status(ctx, svc, &ev.plan.status).await?;

    if let Some(stalled) = stall_is_new(svc, &ev.plan) {
        ctx.publish(
            &ev.reference,
            &stalled.reason,
            true,
            stalled.message.clone(),
        );
    }

    if let Some(why) = &ev.plan.move_blocked
        && move_blocked_is_new(svc, why)
    {
        ctx.publish(&ev.reference, "MoveNotPossible", true, why.clone());
    }

    if let Some(why) = &ev.plan.force_blocked
        && condition_is_new(svc, crate::conditions::FORCE_STARTED, Some(why))
    {
        ctx.publish(&ev.reference, "ForceStartNotPossible", true, why.clone());
    }
    // Announced once per request: when the status shows no ForceStarted
    // condition yet, or only a blocked one.
    if let Some(warning) = &ev.plan.forced
        && condition_is_new(svc, crate::conditions::FORCE_STARTED, None)
    {
        tracing::warn!(%warning, "force start");
        ctx.publish(&ev.reference, "ForceStarted", true, warning.clone());
    }

    announce(ctx, &ev);

    if deleting {
        if ev.plan.stopped() {
            tracing::info!("stopped everywhere: deleting its Leases and releasing");
            lease::delete_leases(ctx, svc).await?;
            return Ok(Action::await_change());
        }
        return Err(Error::WaitingForRelease(format!(
            "{key}: {:?}",
            ev.plan.handover.progress
        )));
    }
    Ok(requeue(&ev, Instant::now()))
}

/// The latest a service's status follows the write of a new holder (the
/// Lease's watch event usually starts that reconcile first).
const STATUS_AFTER_NEW_HOLDER: Duration = Duration::from_secs(1);

/// What the service memory saw in this evaluation (observed once, so never
/// skipped): a completed placement's metric, and its Events.
fn announce(ctx: &Ctx, ev: &Evaluation) {
    if let Some(done) = &ev.seen.completed {
        ctx.metrics.placement_completed(&done.reason, done.duration);
    }
    for t in &ev.seen.announcements {
        ctx.publish(&ev.reference, t.reason, t.warning, t.message.clone());
    }
}

/// The reason a new master `holder` was written for: placement's, except a
/// `Failback` to the node the service's `kubeha.io/move-to` names, which an
/// admin asked for ([`crate::metrics::MOVE`]).
fn placement_reason<'a>(svc: &HAService, placement: &'a str, holder: &str) -> &'a str {
    let asked = svc
        .annotations()
        .get(kubeha_crds::annotations::MOVE_TO)
        .map(|n| n.trim());
    if placement == "Failback" && asked == Some(holder) {
        crate::metrics::MOVE
    } else {
        placement
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(move_to: Option<&str>) -> HAService {
        let mut svc: HAService = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubeha.io/v1alpha1",
            "kind": "HAService",
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {
                "clusterRef": "c",
                "vips": [{"address": "198.18.0.100/24"}],
                "hooks": {"source": {"hostPath": "svc"}},
            },
        }))
        .unwrap();
        if let Some(n) = move_to {
            svc.annotations_mut()
                .insert(kubeha_crds::annotations::MOVE_TO.into(), n.into());
        }
        svc
    }

    /// A failback to the node move-to names is a move; a failover there,
    /// or a failback elsewhere, keeps placement's reason.
    #[test]
    fn a_failback_to_the_node_an_admin_asked_for_counts_as_a_move() {
        assert_eq!(placement_reason(&svc(Some(" b ")), "Failback", "b"), "Move");
        assert_eq!(
            placement_reason(&svc(Some("b")), "Failover", "b"),
            "Failover"
        );
        assert_eq!(
            placement_reason(&svc(Some("b")), "Failback", "a"),
            "Failback"
        );
        assert_eq!(placement_reason(&svc(None), "Failback", "b"), "Failback");
        assert_eq!(placement_reason(&svc(None), "Initial", "b"), "Initial");
    }
}
