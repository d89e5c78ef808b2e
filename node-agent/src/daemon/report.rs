//! What the agent tells others: the service's status entry (server-side apply,
//! resent until the API server's copy matches), Events, and the node-local
//! status file.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kubeha_crds::leases;
use kubeha_crds::service::{NodeServiceState, Role};

use super::tasks::with_state_file;
use super::{Shared, Slot, Target, fenced_flag};
use crate::statefile::{self, ClusterRecord, NodeStatus, ServiceRecord};

/// What the API server's status entry is compared with: a report is due
/// when it differs.
pub(super) fn report_digest(record: &ServiceRecord) -> String {
    let hooks = &record.last_hooks[record.last_hooks.len().saturating_sub(8)..];
    entry_digest(
        record.role,
        record.state,
        Some(record.epoch),
        record.acked_epoch,
        record.fail_count,
        hooks,
    )
}

/// The digest of an entry as the API server has it.
pub(super) fn applied_digest(e: &kubeha_crds::service::ServiceNodeStatus) -> String {
    entry_digest(
        e.role,
        e.state,
        e.epoch,
        e.acked_epoch,
        e.fail_count,
        &e.hooks,
    )
}

/// What a status entry says that the operator acts on (the last hook
/// result stands for the hooks: a refusal marker or not).
pub(super) fn entry_digest(
    role: Role,
    state: NodeServiceState,
    epoch: Option<i64>,
    acked: Option<i64>,
    fail_count: i32,
    hooks: &[kubeha_crds::service::HookResult],
) -> String {
    let last = hooks
        .last()
        .map(|h| (h.script.as_str(), h.action.as_str(), h.outcome));
    format!(
        "{role:?} {state:?} {epoch:?} {acked:?} {fail_count} {} {last:?}",
        hooks.len()
    )
}

/// Publishes an Event on the HAService (best effort).
pub(super) async fn event(
    shared: &Shared,
    target: &Target,
    warning: bool,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(
            format!("{}: {note}", shared.config.node)
                .chars()
                .take(1000)
                .collect(),
        ),
        action: reason.to_owned(),
        secondary: None,
    };
    // Best effort, and never for long: an Event is no reason to hold up
    // anything (a publish to a stalled API server has no timeout of its own).
    match tokio::time::timeout(
        Duration::from_secs(2),
        shared.recorder.publish(&ev, &target.reference),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, reason, "publishing an Event failed"),
        Err(_) => tracing::warn!(reason, "publishing an Event timed out"),
    }
}

/// This node's entry of `status.nodes` for a record, as the agent applies
/// it. `epoch` is the record's: the epoch of the role taken or, for a node
/// idle here, the latest epoch observed ([`ServiceRecord::observe_epoch`]).
pub fn status_entry(node: &str, record: &ServiceRecord) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "node": node,
        "role": record.role,
        "state": record.state,
        "epoch": record.epoch,
        "failCount": record.fail_count,
        "hooks": record.last_hooks.iter().rev().take(8).rev().collect::<Vec<_>>(),
    });
    // Only fields with a value: in an apply, a null would ask to remove one.
    if let Some(acked) = record.acked_epoch {
        entry["ackedEpoch"] = acked.into();
    }
    if let Some(at) = &record.last_failure {
        entry["lastFailureTime"] = at.clone().into();
    }
    if let Some(epoch) = record.unclean_epoch {
        entry["uncleanEpoch"] = epoch.into();
    }
    entry
}

/// Applies this node's entry of `status.nodes` (server-side apply with the
/// node's own field manager). Best effort: the API server may be away.
/// Returns `Some(true)` when the API server took it, `Some(false)` when it
/// refused it, `None` when the call timed out (it may still be applied
/// later). The outcome settles in the service's report bookkeeping
/// ([`super::Reported::settle`]): a taken entry is not sent again, a
/// failure delays the next routine report.
pub(super) async fn report(
    shared: &Shared,
    target: &Target,
    record: &ServiceRecord,
) -> Option<bool> {
    let (api, name) = (&target.api, target.name.as_str());
    let entry = status_entry(&shared.config.node, record);
    let patch = serde_json::json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "status": { "nodes": [entry] },
    });
    let params = PatchParams::apply(&leases::agent_field_manager(&shared.config.node)).force();
    let outcome = tokio::time::timeout(
        Duration::from_secs(2),
        api.patch_status(name, &params, &Patch::Apply(&patch)),
    )
    .await;
    target
        .reported
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .settle(
            &report_digest(record),
            matches!(outcome, Ok(Ok(_))),
            Instant::now(),
        );
    match outcome {
        Ok(Ok(_)) => Some(true),
        Ok(Err(e)) => {
            tracing::warn!(service = name, error = %e, "status report failed");
            Some(false)
        }
        Err(_) => {
            tracing::warn!(service = name, "status report timed out");
            let key = format!(
                "{}/{name}",
                target.reference.namespace.as_deref().unwrap_or_default()
            );
            let now = Instant::now();
            shared
                .resend
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    key,
                    [3, 10, 30].map(|s| now + Duration::from_secs(s)).into(),
                );
            None
        }
    }
}

/// Writes the status file when what it says changed since it was last
/// written here ([`Shared::written`]). A record in a transition keeps what
/// the file said of it (its intent, written by the transition under the
/// same lock, which also forgets [`Shared::written`]). Every pass, also
/// what the metrics say of each service's role and fail count.
pub(super) async fn write_status(shared: &Shared, slots: &BTreeMap<String, Slot>) {
    let mut status = NodeStatus {
        node: shared.config.node.clone(),
        boot_id: shared.config.boot_id.clone(),
        agent_started: Some(shared.config.started.clone()),
        ..Default::default()
    };
    for (cluster, beat) in shared.beats.all() {
        status.clusters.insert(
            cluster.clone(),
            ClusterRecord {
                renew_failures: beat.failures,
                fenced: fenced_flag(shared, &cluster).load(Ordering::SeqCst),
            },
        );
    }
    with_state_file(shared, || {
        let mut previous: Option<NodeStatus> = None;
        for (key, slot) in slots {
            if let Ok(r) = slot.record.try_lock() {
                status.services.insert(key.clone(), r.clone());
            } else {
                let previous = previous.get_or_insert_with(|| {
                    statefile::read(&shared.config.state_dir).unwrap_or_default()
                });
                if let Some(old) = previous.services.get(key) {
                    status.services.insert(key.clone(), old.clone());
                }
            }
        }
        // The role and fail count of each service as the file says them; a
        // service gone from this node loses its series.
        for (key, record) in &status.services {
            shared.metrics.service(key, record);
        }
        shared
            .metrics
            .retain_services(|key| slots.contains_key(key));
        let mut written = shared.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.as_ref() == Some(&status) {
            return;
        }
        let unstamped = status.clone();
        status.updated_at = jiff::Timestamp::now().to_string();
        match statefile::write(&shared.config.state_dir, &status) {
            Ok(()) => *written = Some(unstamped),
            Err(e) => tracing::warn!(error = %e, "writing the status file failed"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vip: &str) -> HAServiceSpec {
        kubeha_crds::testing::service_spec("c", &[vip])
    }
    use kubeha_crds::HAServiceSpec;

    /// The API server's copy of an entry the agent applied reads back with
    /// the record's digest, so a report is sent again only when the copy
    /// really differs (a late, older report applied over it).

    #[test]
    fn an_applied_entry_reads_back_with_the_records_digest() {
        let mut record = ServiceRecord::fresh("c", &spec("198.18.0.100/24"), "x".into(), None);
        record.role = Role::Master;
        record.state = NodeServiceState::Running;
        record.epoch = 7;
        record.acked_epoch = Some(5);
        record.fail_count = 1;
        record.last_hooks = (0..10)
            .map(|i| crate::transitions::refused(&format!("r{i}")))
            .collect();
        let applied: kubeha_crds::service::ServiceNodeStatus =
            serde_json::from_value(status_entry("n1", &record)).unwrap();
        let read_back = applied_digest;
        assert_eq!(read_back(&applied), report_digest(&record));
        // An older report applied late reads differently.
        let mut older = record.clone();
        older.role = Role::None;
        older.state = NodeServiceState::Stopped;
        let late: kubeha_crds::service::ServiceNodeStatus =
            serde_json::from_value(status_entry("n1", &older)).unwrap();
        assert_ne!(read_back(&late), report_digest(&record));
        // So does a refusal marker replaced by other results.
        let mut refused = record.clone();
        refused.last_hooks.truncate(1);
        let mut plain = refused.clone();
        plain.last_hooks[0].script = "L01stop".into();
        assert_ne!(report_digest(&refused), report_digest(&plain));
    }
}
