//! Fencing: what a renew ends (a fence lifted), the watchdog that fences a
//! cluster whose heartbeat passed RD, the Freeze policy, and the escalation of
//! a leave that failed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kube::{Resource, ResourceExt};
use kubeha_crds::HACluster;
use kubeha_crds::cluster::NoQuorumPolicy;
use kubeha_crds::service::Role;

use super::membership::{OwnNode, cluster_view, member_of};
use super::report::{event, event_about};
use super::{Shared, Slot, Target, fenced_flag};
use crate::statefile::{self};
use crate::transitions::{TransitionCluster, TransitionService};

/// How long the reset hook may run before its process group is killed:
/// the long timeout the classic failover scripts give a stop (a reset that
/// reboots the node never gets there).
const RESET_HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// After a successful renew: clear the fence mark and extend the lifetimes
/// of the VIPs held for that cluster.
pub(super) async fn on_renewed(shared: &Arc<Shared>, cluster: &str) {
    let flag = fenced_flag(shared, cluster);
    if flag.swap(false, Ordering::SeqCst) {
        let renewed = shared.beats.get(cluster).and_then(|b| b.renew_time);
        tracing::info!(%cluster, ?renewed, "heartbeat renewed again after a fence");
        if let Some(t) = renewed {
            shared
                .returned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(cluster.to_owned(), t);
        }
    }
    let view = TransitionCluster {
        name: cluster.to_owned(),
        members: Vec::new(),
        beat: shared.beats.get(cluster),
        fenced: flag,
    };
    shared.node.extend(&view).await;
}

/// The self-fence: for every cluster whose heartbeat passed RD, and every
/// cluster in `resets` (an admin's reset of this node: cluster -> request
/// id, [`super::reset`]), write the fence log line, drop the VIPs at once,
/// run the leave scripts in the time left before D, then kill the hooks
/// (and run the reset hook). A reset fences whatever the heartbeat and the
/// `noQuorumPolicy`, and first withholds the heartbeat for E + R + 500 ms
/// (as [`escalate`] does), so the operator sees the node Lost and moves its
/// services; the agent reports it as a `Reset` Event on the HACluster.
pub(super) async fn fence_if_cut_off(
    shared: &Arc<Shared>,
    clusters: &[Arc<HACluster>],
    me: &OwnNode,
    slots: &BTreeMap<String, Slot>,
    resets: &BTreeMap<String, String>,
) {
    let now = Instant::now();
    for (cluster, _) in member_of(clusters, me, true) {
        let name = cluster.name_any();
        let Some(beat) = shared.beats.get(&name) else {
            continue;
        };
        let reset = resets.get(&name);
        let flag = fenced_flag(shared, &name);
        // A reset's Event, published once the VIPs are dropped.
        let mut reset_note = None;
        let line = if let Some(id) = reset {
            let timing = beat.guard();
            let hold = timing.expiry() + timing.renew_interval + Duration::from_millis(500);
            shared.beats.suspend(&name, now + hold);
            let note = format!(
                "reset requested ({} request {id}): fenced now (fence action {:?}), heartbeat withheld for {} ms",
                kubeha_crds::annotations::RESET_NODE,
                cluster.spec.fence.action,
                hold.as_millis()
            );
            reset_note = Some(note.clone());
            format!(
                "{} node={} cluster={} fence: {note}",
                jiff::Timestamp::now(),
                shared.config.node,
                name,
            )
        } else {
            // Never renewed since start: nothing can be held but adopted
            // records, whose VIP lifetime runs out by itself.
            if beat.last_success.is_none() || !beat.past_deadline(now) {
                continue;
            }
            if flag.load(Ordering::SeqCst) {
                continue;
            }
            // Freeze, or HA monitoring off: the last renew announced mode
            // single or config, so observers wait for peerdown instead of
            // counting this node's Lost heartbeat as a fence.
            if cluster.spec.fence.no_quorum_policy == NoQuorumPolicy::Freeze
                || beat.renewed_exclusive
            {
                freeze(shared, &name).await;
                continue;
            }
            let age = beat.age(now).unwrap_or_default();
            format!(
                "{} node={} cluster={} fence: no heartbeat renew for {} ms (renew deadline {} ms)",
                jiff::Timestamp::now(),
                shared.config.node,
                name,
                age.as_millis(),
                beat.timing.renew_deadline.as_millis()
            )
        };
        flag.store(true, Ordering::SeqCst);
        let age = beat.age(now).unwrap_or_default();
        if let Err(e) = statefile::append_synced(&shared.config.fence_log(), &line) {
            tracing::error!(error = %e, "writing the fence log failed");
        }
        tracing::error!(cluster = %name, age_ms = age.as_millis() as u64, reset = ?reset, "fencing");
        shared.metrics.fenced();
        // 1. Drop every VIP of this cluster at once, without waiting for a
        //    transition's lock.
        let dropped = shared.node.drop_held(&name).await;
        tracing::error!(cluster = %name, dropped, "VIPs dropped");
        if let Some(note) = reset_note {
            // Not waited for: the leave scripts below run in the time
            // left before D.
            let (shared, reference) = (shared.clone(), cluster.object_ref(&()));
            tokio::spawn(async move {
                event_about(&shared, &reference, true, "Reset", note).await;
            });
        }
        let mut masters = Vec::new();
        for (key, slot) in slots {
            let (vips, iface, cluster_of) = match slot.record.try_lock() {
                Ok(r) => (r.vips.clone(), r.interface.clone(), r.cluster.clone()),
                // Busy: drop every VIP its spec names.
                Err(_) => (Vec::new(), None, String::new()),
            };
            if !cluster_of.is_empty() && cluster_of != name {
                continue;
            }
            shared.node.drop_vips(&vips, iface.as_deref()).await;
            masters.push(key.clone());
        }
        // Also VIPs of records in the middle of a transition: kill their hooks
        // so the transition ends and sees the fence mark.
        shared.node.runner.kill_all();
        // 2. Leave scripts within what is left before D.
        let view = cluster_view(shared, cluster);
        for key in masters {
            let slot = &slots[&key];
            let left = beat.left_before_lease_end(Instant::now());
            let Ok(mut record) = tokio::time::timeout(left, slot.record.clone().lock_owned()).await
            else {
                *slot
                    .fenced_while_busy
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(name.clone());
                continue;
            };
            if record.cluster != name {
                continue;
            }
            shared
                .node
                .drop_vips(&record.vips.clone(), record.interface.clone().as_deref())
                .await;
            if record.role == Role::Master {
                let svc = TransitionService {
                    key: key.clone(),
                    spec: record.spec.clone(),
                    checksum: record.config_checksum.clone(),
                };
                let left = beat.left_before_lease_end(Instant::now());
                shared
                    .node
                    .fence_leave(&mut record, &svc, &view, left)
                    .await;
            }
        }
        // 3. The fence action: the hooks' process groups, then everything
        // in the hook cgroup (the daemons hooks started).
        let killed = shared.node.runner.kill_all() + shared.node.runner.kill_contained(&name);
        if let Some(reset) = &cluster.spec.fence.reset_hook
            && cluster.spec.fence.action == kubeha_crds::cluster::FenceAction::ResetHook
        {
            tracing::error!(%reset, "running the reset hook");
            let ended = shared
                .node
                .runner
                .run_reset(
                    std::path::Path::new(reset),
                    &shared.config.log_dir.join("reset-hook.log"),
                    RESET_HOOK_TIMEOUT,
                )
                .await;
            tracing::error!(%reset, ended, "reset hook done");
        }
        tracing::error!(cluster = %name, killed, "fenced");
    }
}

/// `noQuorumPolicy: Freeze`: keep roles and VIPs without the API server
/// (the split-brain risk the admin accepted), extending VIP lifetimes here.
pub(super) async fn freeze(shared: &Arc<Shared>, cluster: &str) {
    let Some(mut beat) = shared.beats.get(cluster) else {
        return;
    };
    beat.last_success = Some(Instant::now());
    let view = TransitionCluster {
        name: cluster.to_owned(),
        members: Vec::new(),
        beat: Some(beat),
        fenced: Arc::default(),
    };
    shared.node.extend(&view).await;
}

/// A leave of master that failed: the service may still run here, and the
/// next node waits for this one's acknowledgement or fence. As Pacemaker
/// fences a node whose stop failed, the agent fences itself for the
/// cluster: it withholds its heartbeat for E + R, so the watchdog fences at
/// RD (VIPs dropped, leave scripts, hooks killed, the reset hook) and the
/// operator sees the node Lost, which lets the next node in. No admin
/// action is needed; the failed record stays unclean, so this node enters
/// nothing until a leave succeeds here.
pub(super) async fn escalate(shared: &Shared, target: &Target, view: &TransitionCluster) {
    let Some(beat) = view.beat else {
        return;
    };
    let timing = beat.guard();
    let hold = timing.expiry() + timing.renew_interval + Duration::from_millis(500);
    shared.beats.suspend(&view.name, Instant::now() + hold);
    tracing::error!(cluster = %view.name, hold_ms = hold.as_millis() as u64, "a leave failed: fencing this node for the cluster (heartbeat withheld)");
    let note = format!(
        "leave failed: this node fences itself for cluster {} (heartbeat withheld for {} ms)",
        view.name,
        hold.as_millis()
    );
    event(shared, target, true, "FenceEscalated", note).await;
}
