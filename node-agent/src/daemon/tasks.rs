//! The tasks a pass starts per service, one at a time under the service's
//! record lock: transition steps (with their intent written first), VIP edits
//! on a running master, adoption after a restart, monitors and periodic hooks.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use kubeha_crds::HAServiceSpec;
use kubeha_crds::service::{NodeServiceState, Role};
use tokio::sync::OwnedMutexGuard;
use tracing::Instrument;

use kubeha_crds::roles::Transition;

use super::fence::escalate;
use super::report::{event, report};
use super::{Shared, Target};
use crate::assignments::{self, Assignment};
use crate::statefile::{self, ServiceRecord};
use crate::transitions::{TransitionCluster, TransitionService};

#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_steps(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    steps: Vec<assignments::Step>,
    service: TransitionService,
    view: TransitionCluster,
    wanted: Assignment,
    target: Target,
) {
    let span = task_span(&service.key, wanted.epoch, "steps");
    let task = async move {
        tracing::info!(?steps, "transition");
        let primary = shared.node.is_primary(&service, &view);
        let last = steps.last().copied();
        for step in steps {
            // The intent without an fsync (statefile::write_unsynced): it
            // is on the latency path of every entry, and what it guards
            // does not outlive the page cache.
            if let Some(intent) = intent(step, &record, &service.spec, wanted)
                && let Err(e) = persist_unsynced(&shared, &service.key, &intent)
                && step == assignments::Step::EnterMaster
            {
                // Without the intent on disk, an agent that dies while
                // entering would not know after a restart that it may hold
                // a VIP or a started service: nothing is entered. A failure
                // that started nothing: the operator moves the service.
                record.epoch = wanted.epoch;
                record.state = NodeServiceState::Failed;
                record.failed_epoch = Some(wanted.epoch);
                record.count_failure();
                record.last_hooks = vec![crate::transitions::refused(&format!(
                    "the status file cannot be written ({e}): not entering"
                ))];
                report(&shared, &target, &record).await;
                let note = format!(
                    "not entering at epoch {}: status file not writable: {e}",
                    wanted.epoch
                );
                event(&shared, &target, true, "StatusFileFailed", note).await;
                break;
            }
            let ok = shared
                .node
                .step(step, &mut record, &service, &view, wanted)
                .await;
            let _ = persist(&shared, &service.key, &record);
            // Reported before the next step only when the operator waits
            // for it (a leave of master acknowledges the epoch) or nothing
            // follows: a report to a slow API server takes up to its
            // timeout, and the next step (an enter) must not wait for it.
            if step == assignments::Step::LeaveMaster || !ok || Some(step) == last {
                report(&shared, &target, &record).await;
            }
            if let Some((warning, reason, note)) = step_event(step, ok, &record, primary) {
                tokio::spawn({
                    let (shared, target) = (shared.clone(), target.clone());
                    async move { event(&shared, &target, warning, reason, note).await }
                });
            }
            if !ok {
                tracing::warn!(?step, "step failed");
                if step == assignments::Step::LeaveMaster && record.unclean_epoch.is_some() {
                    escalate(&shared, &target, &view).await;
                }
                break;
            }
        }
        drop(record);
        shared.notify.notify_one();
    };
    tokio::spawn(task.instrument(span));
}

/// The span of one service task: its log lines, and those of the
/// transitions and hooks it runs, name the service, the epoch and the work
/// (`steps`, `revip`, `adopt`, `monitor`, `periodic`). A root span: the
/// task outlives the pass that started it.
fn task_span(key: &str, epoch: i64, work: &'static str) -> tracing::Span {
    tracing::info_span!(parent: None, "service", service = %key, epoch, work)
}

/// What the status file says while `step` runs, so an agent that dies in
/// the middle leaves first on restart: master at the epoch entered or left,
/// `Starting` or `Stopping`, unclean, with the spec whose VIPs it adds.
/// `None` for standby steps.
pub(super) fn intent(
    step: assignments::Step,
    record: &ServiceRecord,
    spec: &HAServiceSpec,
    wanted: Assignment,
) -> Option<ServiceRecord> {
    let (epoch, state) = match step {
        assignments::Step::EnterMaster => (wanted.epoch, NodeServiceState::Starting),
        assignments::Step::LeaveMaster => (record.epoch, NodeServiceState::Stopping),
        _ => return None,
    };
    let mut intent = record.clone();
    if step == assignments::Step::EnterMaster {
        // The leave on restart removes what this spec names.
        intent.spec = spec.clone();
    }
    intent.role = Role::Master;
    intent.epoch = epoch;
    intent.state = state;
    intent.unclean_epoch = Some(epoch);
    Some(intent)
}

/// Writes `record` for service `key` into the status file at once, on disk
/// when this returns. The fsync runs after the status-file lock is let go:
/// other writers (another service's intent on its way to a VIP) do not
/// wait for this disk flush, and a flush that finds a newer file flushes
/// that one, which holds this record or a later one.
/// Returns the write error, if any.
pub(super) fn persist(
    shared: &Shared,
    key: &str,
    record: &ServiceRecord,
) -> Result<(), std::io::Error> {
    tokio::task::block_in_place(|| {
        {
            let _file = shared.state_file.lock().unwrap_or_else(|e| e.into_inner());
            persist_locked(shared, key, record)?;
        }
        statefile::sync(&shared.config.state_dir).inspect_err(|e| {
            tracing::error!(service = key, error = %e, "flushing the status file failed");
        })
    })
}

/// Writes `record` for service `key` into the status file at once without
/// waiting for the disk ([`statefile::write_unsynced`]): a transition's
/// intent, on the latency path of every entry, guarding what does not
/// outlive the page cache. Returns the write error, if any.
pub(super) fn persist_unsynced(
    shared: &Shared,
    key: &str,
    record: &ServiceRecord,
) -> Result<(), std::io::Error> {
    with_state_file(shared, || persist_locked(shared, key, record))
}

/// Runs `f` holding the status-file lock, with this worker thread handed
/// back to the runtime first: a hung disk (or a writer waiting for the lock
/// behind it) then stalls only its caller, never the other tasks: renewers,
/// reports, other services' transitions.
pub(super) fn with_state_file<R>(shared: &Shared, f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(|| {
        let _file = shared.state_file.lock().unwrap_or_else(|e| e.into_inner());
        f()
    })
}

/// Puts `record` into the status file (read, changed, replaced atomically,
/// not flushed); the caller holds the status-file lock.
fn persist_locked(
    shared: &Shared,
    key: &str,
    record: &ServiceRecord,
) -> Result<(), std::io::Error> {
    let mut status = statefile::read(&shared.config.state_dir).unwrap_or_default();
    if status.node.is_empty() {
        status.node = shared.config.node.clone();
    }
    status.services.insert(key.to_owned(), record.clone());
    *shared.written.lock().unwrap_or_else(|e| e.into_inner()) = None;
    statefile::write_unsynced(&shared.config.state_dir, &status).inspect_err(|e| {
        tracing::error!(service = key, error = %e, "writing the status file failed");
    })
}

/// Changes the running master's VIPs to the spec's
/// ([`LocalNode::revip`]), then persists and reports the record.
pub(super) fn spawn_revip(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    service: TransitionService,
    view: TransitionCluster,
    target: Target,
) {
    let span = task_span(&service.key, record.epoch, "revip");
    let task = async move {
        let ok = shared.node.revip(&mut record, &service, &view).await;
        let _ = persist(&shared, &service.key, &record);
        report(&shared, &target, &record).await;
        let note = format!("VIPs at epoch {} now {:?}", record.epoch, record.vips);
        let (warning, reason) = if ok {
            (false, "VipsChanged")
        } else {
            (true, "VipFailed")
        };
        event(&shared, &target, warning, reason, note).await;
        drop(record);
        shared.notify.notify_one();
    };
    tokio::spawn(task.instrument(span));
}

/// Re-adopts a master role held before the agent restarted (same boot):
/// the service's monitor runs once first, and a service it finds down is
/// left (leave hooks, VIPs dropped, the epoch acknowledged) so that the
/// operator has it entered again with its hooks, never served by a VIP
/// alone.
pub(super) fn spawn_adopt(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    service: TransitionService,
    view: TransitionCluster,
    target: Target,
) {
    let span = task_span(&service.key, record.epoch, "adopt");
    let task = async move {
        if shared.node.monitor(&mut record, &service, &view).await == Some(false) {
            tracing::warn!(
                epoch = record.epoch,
                "held before the restart but its monitor fails: leaving it, to be entered again"
            );
            shared.node.leave_master(&mut record, &service, &view).await;
            report(&shared, &target, &record).await;
            drop(record);
            shared.notify.notify_one();
            return;
        }
        let ok = shared.node.adopt(&service.key, &mut record, &view).await;
        tracing::info!(
            epoch = record.epoch,
            ok,
            "re-adopted a service held before the restart"
        );
        report(&shared, &target, &record).await;
        drop(record);
        shared.notify.notify_one();
    };
    tokio::spawn(task.instrument(span));
}

#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_monitor(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    service: TransitionService,
    view: TransitionCluster,
    threshold: i32,
    failures: Arc<AtomicI32>,
    target: Target,
) {
    let span = task_span(&service.key, record.epoch, "monitor");
    let task = async move {
        let failures_counter = failures.clone();
        let Some(ok) = shared.node.monitor(&mut record, &service, &view).await else {
            drop(record);
            shared.notify.notify_one();
            return;
        };
        let failures = if ok {
            0
        } else {
            failures.load(Ordering::SeqCst) + 1
        };
        let counter = failures_counter.clone();
        counter.store(failures, Ordering::SeqCst);
        // Exit 1 or 2 of a monitor script is permanent at once: no waiting
        // for the failure threshold, no retry on this node.
        let outcome = crate::hooks::overall(&record.last_hooks);
        let permanent = !ok && crate::hooks::is_permanent(outcome);
        if permanent || failures >= threshold.max(1) {
            counter.store(0, Ordering::SeqCst);
            tracing::warn!(
                failures,
                ?outcome,
                "monitor failed for good or past its threshold: leaving"
            );
            let epoch = record.epoch;
            let monitor_results = record.last_hooks.clone();
            shared.node.leave_master(&mut record, &service, &view).await;
            record.state = NodeServiceState::Failed;
            record.failed_epoch = Some(epoch);
            // The monitor's results first, so the status shows why.
            let mut all = monitor_results;
            all.append(&mut record.last_hooks);
            record.last_hooks = all;
            record.count_hook_failure(outcome, service.spec.migration_threshold);
            report(&shared, &target, &record).await;
            if record.unclean_epoch.is_some() {
                escalate(&shared, &target, &view).await;
            }
        } else if failures > 0 {
            tracing::warn!(failures, threshold, "monitor failed");
        }
        drop(record);
        shared.notify.notify_one();
    };
    tokio::spawn(task.instrument(span));
}

pub(super) fn spawn_periodic(
    shared: Arc<Shared>,
    mut record: OwnedMutexGuard<ServiceRecord>,
    service: TransitionService,
    view: TransitionCluster,
) {
    let span = task_span(&service.key, record.epoch, "periodic");
    tokio::spawn(
        async move {
            shared.node.periodic(&mut record, &service, &view).await;
            drop(record);
            shared.notify.notify_one();
        }
        .instrument(span),
    );
}

/// The Event a finished step makes: reason and whether it is a warning.
pub(super) fn step_event(
    step: assignments::Step,
    ok: bool,
    record: &ServiceRecord,
    primary: bool,
) -> Option<(bool, &'static str, String)> {
    use assignments::Step::*;
    let tail = || {
        record
            .last_hooks
            .iter()
            .filter(|h| h.outcome != kubeha_crds::service::HookOutcome::Success)
            .map(|h| {
                format!(
                    "{} {} {:?}: {}",
                    h.script,
                    h.action,
                    h.outcome,
                    h.output_tail.join(" | ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !ok && record.last_hooks.iter().any(|h| h.script == "-") {
        // Not a hook: the VIPs could not be placed (missing interface, ...).
        return Some((
            true,
            "VipFailed",
            format!("{step:?} failed at epoch {}: {}", record.epoch, tail()),
        ));
    }
    if !ok {
        return Some((
            true,
            "HookFailed",
            format!("{step:?} failed at epoch {}: {}", record.epoch, tail()),
        ));
    }
    // A standby step that succeeded is only logged (the status shows the
    // role): after a power-off, every service the node held or stood by
    // for changes standby, and those Events were most of the agents'
    // writes beside their status reports (issue 11).
    let reason = match step {
        EnterMaster => Transition::of(true, primary).reason(),
        LeaveMaster => Transition::of(false, primary).reason(),
        EnterVicemaster | LeaveVicemaster => return None,
    };
    Some((
        false,
        reason,
        format!(
            "{step:?} done at epoch {} (VIPs {:?})",
            record.epoch, record.vips
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_master_steps_and_failures_are_told_in_events() {
        use assignments::Step::*;
        let record = ServiceRecord::fresh("c", &spec("198.18.0.10/24"), "sum".into(), None);
        for step in [EnterVicemaster, LeaveVicemaster] {
            assert_eq!(step_event(step, true, &record, true), None, "{step:?}");
            let (warning, reason, _) = step_event(step, false, &record, true).unwrap();
            assert!(
                warning && reason == "HookFailed",
                "{step:?} failed: {reason}"
            );
        }
        for step in [EnterMaster, LeaveMaster] {
            let (warning, reason, note) = step_event(step, true, &record, true).unwrap();
            assert!(!warning, "{step:?}");
            assert!(note.contains("done at epoch"), "{note}");
            assert!(!reason.is_empty());
        }
    }

    fn spec(vip: &str) -> HAServiceSpec {
        kubeha_crds::testing::service_spec("c", &[vip])
    }

    /// The API server's copy of an entry the agent applied reads back with
    /// the record's digest, so a report is sent again only when the copy
    /// really differs (a late, older report applied over it).

    #[test]
    fn the_intent_of_a_master_step_is_unclean_master_at_its_epoch() {
        let mut record = ServiceRecord::fresh("c", &spec("198.18.0.100/24"), "x".into(), None);
        record.epoch = 4;
        let wanted = Assignment {
            role: Role::Master,
            epoch: 5,
            may_enter: true,
        };
        let new_spec = spec("198.18.0.101/24");
        let enter = intent(assignments::Step::EnterMaster, &record, &new_spec, wanted).unwrap();
        assert_eq!(
            (enter.role, enter.epoch, enter.state, enter.unclean_epoch),
            (Role::Master, 5, NodeServiceState::Starting, Some(5))
        );
        assert_eq!(
            enter.spec, new_spec,
            "a leave on restart removes the VIPs being added"
        );
        let leave = intent(assignments::Step::LeaveMaster, &record, &new_spec, wanted).unwrap();
        assert_eq!(
            (leave.role, leave.epoch, leave.state, leave.unclean_epoch),
            (Role::Master, 4, NodeServiceState::Stopping, Some(4))
        );
        assert_eq!(leave.spec, record.spec);
        for step in [
            assignments::Step::EnterVicemaster,
            assignments::Step::LeaveVicemaster,
        ] {
            assert!(intent(step, &record, &new_spec, wanted).is_none());
        }
    }
}
