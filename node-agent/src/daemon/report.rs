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

/// Hook results a status entry carries: the latest ones.
pub const REPORTED_HOOKS: usize = 3;

/// Output lines a reported hook result keeps: its last ones.
pub const REPORTED_TAIL_LINES: usize = 3;

/// Bytes a reported output line keeps (escaped, cut on a character
/// boundary, see [`crate::hooks::clip_to`]).
pub const REPORTED_LINE_BYTES: usize = 120;

/// Bytes a reported refusal ([`ServiceRecord::refused`]) keeps.
pub const REPORTED_REFUSAL_BYTES: usize = 512;

/// Bytes a reported script name keeps.
pub const REPORTED_SCRIPT_BYTES: usize = 96;

/// The hook results of a record as its status entry reports them: the last
/// [`REPORTED_HOOKS`], each with its last [`REPORTED_TAIL_LINES`] output
/// lines of at most [`REPORTED_LINE_BYTES`] and its script name cut to
/// [`REPORTED_SCRIPT_BYTES`], so that no entry exceeds 5 KiB of JSON
/// (the full results stay in the node's status file and the hook logs).
pub fn reported_hooks(record: &ServiceRecord) -> Vec<kubeha_crds::service::HookResult> {
    let hooks = &record.last_hooks;
    hooks
        .get(hooks.len().saturating_sub(REPORTED_HOOKS)..)
        .unwrap_or_default()
        .iter()
        .map(|h| {
            let tail = &h.output_tail;
            kubeha_crds::service::HookResult {
                script: crate::hooks::clip_to(&h.script, REPORTED_SCRIPT_BYTES),
                action: crate::hooks::clip_to(&h.action, 16),
                output_tail: tail
                    .get(tail.len().saturating_sub(REPORTED_TAIL_LINES)..)
                    .unwrap_or_default()
                    .iter()
                    .map(|l| crate::hooks::clip_to(l, REPORTED_LINE_BYTES))
                    .collect(),
                ..h.clone()
            }
        })
        .collect()
}

/// What the API server's status entry is compared with: a report is due
/// when it differs.
pub(super) fn report_digest(record: &ServiceRecord) -> String {
    entry_digest(
        record.role,
        record.state,
        Some(record.epoch),
        record.acked_epoch,
        record.fail_count,
        &reported_hooks(record),
        record.refused.as_deref(),
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
        e.refused.as_deref(),
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
    refused: Option<&str>,
) -> String {
    let last = hooks
        .last()
        .map(|h| (h.script.as_str(), h.action.as_str(), h.outcome));
    format!(
        "{role:?} {state:?} {epoch:?} {acked:?} {fail_count} {} {last:?} {refused:?}",
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
    event_about(shared, &target.reference, warning, reason, note).await;
}

/// [`event`] about any object (an HACluster: a reset).
pub(super) async fn event_about(
    shared: &Shared,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
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
        shared.recorder.publish(&ev, reference),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, reason, "publishing an Event failed"),
        Err(_) => tracing::warn!(reason, "publishing an Event timed out"),
    }
}

/// This node's entry of `status.nodes` for a record, as the agent applies
/// it, at most 5 KiB of JSON ([`reported_hooks`]). `epoch` is the record's: the epoch of the role taken or, for a node
/// idle here, the latest epoch observed ([`ServiceRecord::observe_epoch`]).
pub fn status_entry(node: &str, record: &ServiceRecord) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "node": node,
        "role": record.role,
        "state": record.state,
        "epoch": record.epoch,
        "failCount": record.fail_count,
        "hooks": reported_hooks(record),
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
    if record.permanent_failure {
        entry["permanentFailure"] = true.into();
    }
    if let Some(why) = &record.refused {
        entry["refused"] = crate::hooks::clip_to(why, REPORTED_REFUSAL_BYTES).into();
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
    report_within(shared, target, record, STEP_REPORT_TIMEOUT).await
}

/// How long a report sent under the service's record lock (a transition's,
/// which the next step or decision waits for) may take before it counts as
/// timed out.
pub(super) const STEP_REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a routine report (sent from a copy, holding no lock) may take:
/// longer than a step's, so that an API server slow to apply is not sent
/// the same entry again while the first is still on its way (issue 11:
/// 2 s timeouts and their re-sends fed an overloaded API server).
pub(super) const ROUTINE_REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// [`report`] with its own timeout.
pub(super) async fn report_within(
    shared: &Shared,
    target: &Target,
    record: &ServiceRecord,
    timeout: Duration,
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
        timeout,
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

    /// The most a status entry this agent applies takes as JSON, whatever
    /// its hook results hold.
    const MAX_ENTRY_BYTES: usize = 5 * 1024;

    /// Nodes a service's `status.nodes` may list: a cluster has at most
    /// this many members (the operator refuses more). For the object to
    /// stay under etcd's request limit (1.5 MiB) with room for the rest of
    /// the object, their entries of [`MAX_ENTRY_BYTES`] take at most 1 MiB.
    const MAX_STATUS_NODES: usize = kubeha_crds::validate::MAX_MEMBERS;
    const _: () = assert!(MAX_ENTRY_BYTES * MAX_STATUS_NODES <= 1024 * 1024);

    /// The worst case of an entry: the longest node name, every number at
    /// its widest, and 32 hook results whose script names and 20 output
    /// lines of 1 KiB are all characters JSON doubles (`"` and `\\`).
    #[test]
    fn an_entry_never_exceeds_its_bound_and_a_full_status_stays_under_etcds_limit() {
        use kubeha_crds::service::{HookOutcome, HookResult};
        let mut record = ServiceRecord::fresh("c", &spec("198.18.0.100/24"), "x".into(), None);
        record.role = Role::Vicemaster;
        record.state = NodeServiceState::Stopping;
        record.epoch = i64::MAX;
        record.acked_epoch = Some(i64::MIN);
        record.unclean_epoch = Some(i64::MIN);
        record.fail_count = i32::MIN;
        record.last_failure = Some("9999-01-01T00:00:00Z".into());
        let doubled = |n: usize| "\"\\".repeat(n / 2);
        record.refused = Some(doubled(4096));
        let result = HookResult {
            script: doubled(255),
            action: "periodic".into(),
            exit_code: Some(i32::MIN),
            outcome: HookOutcome::IllegalCall,
            duration_ms: i64::MAX,
            finished_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "9999-01-01T00:00:00.999999999Z".parse().unwrap(),
            )),
            output_tail: vec![doubled(1024); 20],
        };
        record.last_hooks = vec![result; 32];
        let node = "n".repeat(253);
        let entry = serde_json::to_vec(&status_entry(&node, &record)).unwrap();
        eprintln!(
            "worst-case entry: {} bytes (bound {MAX_ENTRY_BYTES}); {MAX_STATUS_NODES} of them: {} bytes",
            entry.len(),
            entry.len() * MAX_STATUS_NODES
        );
        assert!(entry.len() <= MAX_ENTRY_BYTES, "{} bytes", entry.len());
        // It still parses as an entry, with the bounded results.
        let parsed: kubeha_crds::service::ServiceNodeStatus =
            serde_json::from_slice(&entry).unwrap();
        assert_eq!(parsed.hooks.len(), REPORTED_HOOKS);
        assert!(
            parsed
                .hooks
                .iter()
                .all(|h| h.output_tail.len() == REPORTED_TAIL_LINES
                    && h.output_tail.iter().all(|l| l.len() <= REPORTED_LINE_BYTES))
        );
    }

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
