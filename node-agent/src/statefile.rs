//! The node-local status file (`<state dir>/status.json`): what this agent
//! holds and did, readable without the API server (`kubeha-agent status`),
//! and what a restarted agent re-adopts from. Written atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kubeha_crds::HAServiceSpec;
use kubeha_crds::service::{HookResult, NodeServiceState, Role};
use serde::{Deserialize, Serialize};

/// File name of the status file inside the state directory.
pub const STATUS_FILE: &str = "status.json";

/// Everything the status file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// This node.
    pub node: String,
    /// When the file was written (RFC 3339).
    pub updated_at: String,
    /// Heartbeat per cluster.
    pub clusters: BTreeMap<String, ClusterRecord>,
    /// State per service (`namespace/name`).
    pub services: BTreeMap<String, ServiceRecord>,
}

/// Heartbeat of one cluster as last seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
    /// Milliseconds since the last successful renew when written.
    pub last_renew_age_ms: Option<u64>,
    /// Failed renews since the agent started.
    pub renew_failures: u64,
    /// Whether the node fenced itself for this cluster and has not renewed since.
    pub fenced: bool,
}

/// One service as this node runs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRecord {
    /// The HACluster it runs on.
    pub cluster: String,
    /// Role held now.
    pub role: Role,
    /// Epoch the role was taken for.
    pub epoch: i64,
    /// What the node is doing with it.
    pub state: NodeServiceState,
    /// VIPs added here (when master), as `address/prefix`.
    pub vips: Vec<String>,
    /// Interface the VIPs are on.
    pub interface: Option<String>,
    /// Last epoch this node acknowledged leaving.
    pub acked_epoch: Option<i64>,
    /// Failures counted here.
    pub fail_count: i32,
    /// When the last of them happened (RFC 3339, to the second): the
    /// status entry's `lastFailureTime`, from which the operator lets a
    /// failure expire (`failureTimeoutSeconds`), also after it restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Epoch whose enter failed here (not retried).
    pub failed_epoch: Option<i64>,
    /// The spec acted on, so hooks can be run by hand without the API server.
    pub spec: HAServiceSpec,
    /// Checksum of that spec (`KUBEHA_CONFIG_CHECKSUM`).
    pub config_checksum: String,
    /// Last hook results.
    pub last_hooks: Vec<HookResult>,
    /// The value of the HAService's `kubeha.io/clear` annotation last
    /// applied here (see [`ServiceRecord::apply_clear`]). Absent in status
    /// files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_token: Option<String>,
    /// An epoch of the master role this node may not have left cleanly:
    /// its leave scripts failed, its enter was refused after VIPs may have
    /// been added, or it fenced itself. The service (or a VIP, until its
    /// lifetime ends) may still be up here, so the record does not take on
    /// later epochs it merely observes (see
    /// [`ServiceRecord::observe_epoch`]). Cleared by the next successful
    /// leave of master. Absent in status files written before it existed
    /// (see [`ServiceRecord::assume_unclean_if_unknown`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclean_epoch: Option<i64>,
    /// This node fenced itself while it held the master role: the VIPs were
    /// dropped and the leave scripts got only the time left before D. Once
    /// the node is in contact again the leave runs once more (scripts are
    /// idempotent); its success ends the `Failed` state and the
    /// [`ServiceRecord::unclean_epoch`] without an admin, for a fence is not
    /// a failure of the service. Cleared by the next leave of master,
    /// whatever its outcome.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fenced: bool,
}

/// What applying an admin's clear request reset on a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleared {
    /// The fail count before the reset.
    pub fail_count: i32,
    /// Whether the record was `Failed` (it is `Stopped` now).
    pub was_failed: bool,
    /// The epoch whose enter had failed here and may now be entered again.
    pub failed_epoch: Option<i64>,
}

impl Cleared {
    /// Whether there was anything to clear.
    pub fn changed(&self) -> bool {
        self.fail_count != 0 || self.was_failed || self.failed_epoch.is_some()
    }
}

impl ServiceRecord {
    /// A record for a service this node has not run: role none, epoch 0,
    /// stopped, no failures. `config_checksum` is the spec's checksum and
    /// `clear_token` the clear request already on the service (nothing to
    /// clear on a new record).
    pub fn fresh(
        cluster: &str,
        spec: &HAServiceSpec,
        config_checksum: String,
        clear_token: Option<String>,
    ) -> Self {
        ServiceRecord {
            cluster: cluster.to_owned(),
            role: Role::None,
            epoch: 0,
            state: NodeServiceState::Stopped,
            vips: Vec::new(),
            interface: None,
            acked_epoch: None,
            fail_count: 0,
            last_failure: None,
            failed_epoch: None,
            spec: spec.clone(),
            config_checksum,
            last_hooks: Vec::new(),
            clear_token,
            unclean_epoch: None,
            fenced: false,
        }
    }

    /// Counts one failure here, now.
    pub fn count_failure(&mut self) {
        self.fail_count += 1;
        let now = jiff::Timestamp::now();
        self.last_failure = Some(
            jiff::Timestamp::from_second(now.as_second())
                .unwrap_or(now)
                .to_string(),
        );
    }

    /// Applies the HAService's `kubeha.io/clear` annotation (`token`): when
    /// it is set and differs from the value applied last, the failures of
    /// this service on this node are cleared (fail count 0, the failed epoch
    /// forgotten so it may be entered again, a `Failed` state back to
    /// `Stopped`) and the token is remembered. Returns what was reset, or
    /// `None` when there is no new request. Role, epoch, VIPs and the
    /// acknowledged epoch are left alone: a clear proves nothing about a
    /// leave that failed, so the operator still waits for this node's
    /// acknowledgement or fence before clearing another node to enter.
    pub fn apply_clear(&mut self, token: Option<&str>) -> Option<Cleared> {
        let token = token?;
        if self.clear_token.as_deref() == Some(token) {
            return None;
        }
        self.clear_token = Some(token.to_owned());
        let cleared = Cleared {
            fail_count: self.fail_count,
            was_failed: self.state == NodeServiceState::Failed,
            failed_epoch: self.failed_epoch,
        };
        self.fail_count = 0;
        self.last_failure = None;
        self.failed_epoch = None;
        // A leave that failed stays Failed: only a leave that succeeds (the
        // daemon runs it again on a clear) or a fence ends it.
        if cleared.was_failed && self.unclean_epoch.is_none() {
            self.state = NodeServiceState::Stopped;
        }
        Some(cleared)
    }

    /// Takes on `lease_epoch`, the epoch of the service Lease this node
    /// sees, when it is later than the record's and the node certainly runs
    /// nothing of the service: no master role, no transition under way
    /// (`Stopped` or `Failed`) and no master role left uncleanly
    /// ([`ServiceRecord::unclean_epoch`]). Reported as the status entry's
    /// `epoch`, a later epoch in a role other than master, stopped or
    /// failed, is the operator's "moved on" proof that this node runs
    /// nothing of any earlier epoch; the agent never acts on an older epoch
    /// again ([`crate::assignments::not_older`]). Returns whether the record
    /// changed (and so needs reporting).
    pub fn observe_epoch(&mut self, lease_epoch: i64) -> bool {
        if self.would_observe(lease_epoch) {
            self.epoch = lease_epoch;
            return true;
        }
        false
    }

    /// Whether [`ServiceRecord::observe_epoch`] would take on `lease_epoch`.
    pub fn would_observe(&self, lease_epoch: i64) -> bool {
        let idle = self.role != Role::Master
            && matches!(
                self.state,
                NodeServiceState::Stopped | NodeServiceState::Failed
            )
            && self.unclean_epoch.is_none();
        idle && lease_epoch > self.epoch
    }

    /// For a record read from a status file written before
    /// [`ServiceRecord::unclean_epoch`] existed: a failed record without an
    /// acknowledgement of its epoch may be a failed leave, so it counts as
    /// unclean. Returns whether it was marked.
    pub fn assume_unclean_if_unknown(&mut self) -> bool {
        let maybe_failed_leave = self.unclean_epoch.is_none()
            && self.role != Role::Master
            && self.state == NodeServiceState::Failed
            && self.acked_epoch.is_none_or(|a| a < self.epoch);
        if maybe_failed_leave {
            self.unclean_epoch = Some(self.epoch);
        }
        maybe_failed_leave
    }
}

/// Path of the status file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATUS_FILE)
}

/// Reads the status file at start: `Ok(None)` when there is none, an error
/// naming the file and the reason when it exists but cannot be read or
/// parsed (the agent then cannot know what it ran before).
pub fn read_at_start(state_dir: &Path) -> Result<Option<NodeStatus>, String> {
    let file = path(state_dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", file.display()))
}

/// Reads the status file; `None` when absent or unreadable (a corrupt file
/// is logged and ignored).
pub fn read(state_dir: &Path) -> Option<NodeStatus> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    match serde_json::from_str(&text) {
        Ok(status) => Some(status),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring unreadable status file");
            None
        }
    }
}

/// Writes the status file atomically and durably: a temporary file, fsync,
/// rename, then fsync of the folder (without it, a power loss can keep the
/// old name and so an older record).
pub fn write(state_dir: &Path, status: &NodeStatus) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{STATUS_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(state_dir))?;
    std::fs::File::open(state_dir)?.sync_all()
}

/// Appends one line to a log and fsyncs it before returning: the fence log
/// line must be on disk before the fence action runs.
pub fn append_synced(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let mut status = NodeStatus {
            node: "node-1".into(),
            ..Default::default()
        };
        write(dir.path(), &status).unwrap();
        status.clusters.insert(
            "c".into(),
            ClusterRecord {
                renew_failures: 2,
                ..Default::default()
            },
        );
        write(dir.path(), &status).unwrap();
        assert_eq!(read(dir.path()), Some(status));
        assert!(!dir.path().join(".status.json.tmp").exists());
    }

    fn record() -> ServiceRecord {
        ServiceRecord {
            cluster: "c".into(),
            role: Role::None,
            epoch: 3,
            state: NodeServiceState::Failed,
            vips: Vec::new(),
            interface: None,
            acked_epoch: Some(3),
            fail_count: 2,
            last_failure: Some("2026-12-06T13:39:15Z".into()),
            failed_epoch: Some(3),
            spec: serde_json::from_value(serde_json::json!({
                "clusterRef": "c",
                "vips": [{"address": "198.18.0.100/24"}],
            }))
            .unwrap(),
            config_checksum: "x".into(),
            last_hooks: Vec::new(),
            clear_token: None,
            unclean_epoch: None,
            fenced: false,
        }
    }

    #[test]
    fn a_counted_failure_is_dated_to_the_second_for_the_status_entry() {
        let mut r = record();
        r.count_failure();
        assert_eq!(r.fail_count, 3);
        let at: jiff::Timestamp = r.last_failure.as_deref().unwrap().parse().unwrap();
        assert_eq!(at.subsec_nanosecond(), 0);
        let ago = jiff::Timestamp::now().duration_since(at);
        assert!(ago.as_secs() <= 2, "{ago:?}");
        let entry = crate::daemon::status_entry("n1", &r);
        let applied: kubeha_crds::service::ServiceNodeStatus =
            serde_json::from_value(entry).unwrap();
        assert_eq!(applied.last_failure_time.map(|t| t.0), Some(at));
    }

    #[test]
    fn a_new_clear_token_resets_the_failures_once() {
        let mut r = record();
        // No annotation: nothing happens.
        assert_eq!(r.apply_clear(None), None);
        assert_eq!(r.fail_count, 2);
        let c = r.apply_clear(Some("2025-01-01T00:00:00Z")).unwrap();
        assert_eq!(
            c,
            Cleared {
                fail_count: 2,
                was_failed: true,
                failed_epoch: Some(3)
            }
        );
        assert!(c.changed());
        assert_eq!(
            r.last_failure, None,
            "a clear forgets when the last failure was"
        );
        assert_eq!(r.fail_count, 0);
        assert_eq!(r.failed_epoch, None);
        assert_eq!(r.state, NodeServiceState::Stopped);
        assert_eq!(r.clear_token.as_deref(), Some("2025-01-01T00:00:00Z"));
        // Role, epoch and acknowledgement untouched.
        assert_eq!((r.role, r.epoch, r.acked_epoch), (Role::None, 3, Some(3)));
        // The same token again: already applied, even after new failures.
        r.fail_count = 1;
        r.state = NodeServiceState::Failed;
        assert_eq!(r.apply_clear(Some("2025-01-01T00:00:00Z")), None);
        assert_eq!(r.fail_count, 1);
        // The annotation removed: the token is kept, nothing happens.
        assert_eq!(r.apply_clear(None), None);
        assert_eq!(r.clear_token.as_deref(), Some("2025-01-01T00:00:00Z"));
        // A new value clears again.
        assert!(r.apply_clear(Some("again")).unwrap().changed());
        assert_eq!((r.fail_count, r.state), (0, NodeServiceState::Stopped));
    }

    #[test]
    fn a_clear_leaves_a_healthy_record_alone() {
        let mut r = record();
        r.fail_count = 0;
        r.last_failure = None;
        r.failed_epoch = None;
        r.role = Role::Master;
        r.state = NodeServiceState::Running;
        r.vips = vec!["198.18.0.100/24".into()];
        let before = r.clone();
        let c = r.apply_clear(Some("t")).unwrap();
        assert!(!c.changed());
        assert_eq!(
            r,
            ServiceRecord {
                clear_token: Some("t".into()),
                ..before
            }
        );
    }

    #[test]
    fn status_files_without_a_clear_token_still_load() {
        let mut value = serde_json::to_value(record()).unwrap();
        assert!(value.get("clearToken").is_none(), "absent when unset");
        value.as_object_mut().unwrap().remove("clearToken");
        let r: ServiceRecord = serde_json::from_value(value).unwrap();
        assert_eq!(r, record());
        let mut with = record();
        with.clear_token = Some("t".into());
        let text = serde_json::to_string(&with).unwrap();
        assert!(text.contains("\"clearToken\":\"t\""), "{text}");
        assert_eq!(serde_json::from_str::<ServiceRecord>(&text).unwrap(), with);
    }

    #[test]
    fn an_idle_record_takes_on_later_lease_epochs_only() {
        // Stopped, no role: takes on a later epoch once, never an older one.
        let mut r = ServiceRecord {
            state: NodeServiceState::Stopped,
            acked_epoch: None,
            failed_epoch: None,
            ..record()
        };
        assert!(r.observe_epoch(5));
        assert_eq!(r.epoch, 5);
        assert!(!r.observe_epoch(5), "unchanged: nothing to report");
        assert!(!r.observe_epoch(4));
        assert_eq!(r.epoch, 5);
        // The standby too.
        r.role = Role::Vicemaster;
        assert!(r.observe_epoch(6));
        // Failed after an enter that was left again (acknowledged): idle.
        let mut failed = record();
        assert!(failed.observe_epoch(4));
        assert_eq!(failed.epoch, 4);
    }

    #[test]
    fn a_record_that_may_run_something_keeps_its_epoch() {
        // The master, and any record in a transition.
        for (role, state) in [
            (Role::Master, NodeServiceState::Running),
            (Role::Master, NodeServiceState::Failed),
            (Role::None, NodeServiceState::Starting),
            (Role::None, NodeServiceState::Stopping),
            (Role::Vicemaster, NodeServiceState::Stopping),
        ] {
            let mut r = ServiceRecord {
                role,
                state,
                ..record()
            };
            assert!(!r.observe_epoch(9), "{role:?} {state:?}");
            assert_eq!(r.epoch, 3);
        }
        // A master role left uncleanly (failed leave, refused enter, fence),
        // even once an admin's clear made the record Stopped.
        let mut r = ServiceRecord {
            unclean_epoch: Some(3),
            acked_epoch: Some(2),
            ..record()
        };
        assert!(!r.observe_epoch(9));
        r.apply_clear(Some("t"));
        assert_eq!(
            r.state,
            NodeServiceState::Failed,
            "a clear does not end a leave that failed (the daemon runs the leave again)"
        );
        assert_eq!(r.fail_count, 0);
        assert!(!r.observe_epoch(9));
        assert_eq!(r.epoch, 3);
    }

    #[test]
    fn old_status_files_count_an_unacknowledged_failure_as_unclean() {
        // Acknowledged: clean.
        let mut r = record();
        assert!(!r.assume_unclean_if_unknown());
        assert_eq!(r.unclean_epoch, None);
        // Failed without an acknowledgement of its epoch: maybe a failed
        // leave.
        let mut r = ServiceRecord {
            acked_epoch: Some(2),
            ..record()
        };
        assert!(r.assume_unclean_if_unknown());
        assert_eq!(r.unclean_epoch, Some(3));
        // Stopped: clean.
        let mut r = ServiceRecord {
            acked_epoch: None,
            state: NodeServiceState::Stopped,
            ..record()
        };
        assert!(!r.assume_unclean_if_unknown());
        // The field round-trips and is absent when unset.
        let value = serde_json::to_value(record()).unwrap();
        assert!(value.get("uncleanEpoch").is_none());
        let with = ServiceRecord {
            unclean_epoch: Some(3),
            ..record()
        };
        let text = serde_json::to_string(&with).unwrap();
        assert!(text.contains("\"uncleanEpoch\":3"), "{text}");
        assert_eq!(serde_json::from_str::<ServiceRecord>(&text).unwrap(), with);
    }

    #[test]
    fn corrupt_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{not json").unwrap();
        assert_eq!(read(dir.path()), None);
    }

    #[test]
    fn fence_log_appends() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/fence.log");
        append_synced(&log, "one").unwrap();
        append_synced(&log, "two").unwrap();
        assert_eq!(std::fs::read_to_string(log).unwrap(), "one\ntwo\n");
    }
}
