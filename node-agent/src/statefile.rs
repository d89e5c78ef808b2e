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

/// Where the kernel publishes the id of the current boot.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";

/// The id of the current boot: `configured` (tests emulate a reboot with
/// it), else [`BOOT_ID_FILE`]; `None` when neither gives one.
pub fn boot_id(configured: Option<&str>) -> Option<String> {
    configured
        .map(str::to_owned)
        .or_else(|| std::fs::read_to_string(BOOT_ID_FILE).ok())
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// Everything the status file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// This node.
    pub node: String,
    /// When the file was written (RFC 3339). It is written when what it
    /// says changed, not periodically.
    pub updated_at: String,
    /// Heartbeat per cluster.
    pub clusters: BTreeMap<String, ClusterRecord>,
    /// State per service (`namespace/name`).
    pub services: BTreeMap<String, ServiceRecord>,
    /// The kernel's boot id when the file was written
    /// (`/proc/sys/kernel/random/boot_id`): a restarted agent re-adopts
    /// only records of its own boot. Absent in files written before it
    /// existed, which count as this boot's (on a real host the state folder
    /// is a tmpfs a reboot empties).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// When the agent that wrote the file started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_started: Option<String>,
}

impl NodeStatus {
    /// Whether the file was written during the boot `boot_id`: a file that
    /// names no boot counts as this boot's (see [`NodeStatus::boot_id`]).
    pub fn same_boot(&self, boot_id: &str) -> bool {
        self.boot_id.as_deref().is_none_or(|b| b == boot_id)
    }
}

/// Heartbeat of one cluster as last seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRecord {
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
    /// A hook exited 1 or 2 here ([`crate::hooks::is_permanent`]): the
    /// status entry's `permanentFailure`, which keeps the service off this
    /// node past `failureTimeoutSeconds`. Ended only by an admin's clear
    /// ([`ServiceRecord::apply_clear`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent_failure: bool,
    /// Why this node refuses the role the service Lease gives it
    /// ([`crate::assignments::vet`]), for its status entry; `None` when it
    /// takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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
            permanent_failure: false,
            refused: None,
        }
    }

    /// Whether this node never did anything with the service: no role, no
    /// hook run, no failure, nothing acknowledged or left uncleanly. Its
    /// status entry would tell the operator nothing that a missing entry
    /// does not (a node that never reported never ran the service), so it
    /// is not sent ([`crate::daemon`]): with many services, idle members
    /// would otherwise write an entry per service and per epoch.
    pub fn never_ran(&self) -> bool {
        self.role == Role::None
            && self.state == NodeServiceState::Stopped
            && self.last_hooks.is_empty()
            && self.acked_epoch.is_none()
            && self.fail_count == 0
            && self.failed_epoch.is_none()
            && self.unclean_epoch.is_none()
            && !self.fenced
            && self.refused.is_none()
    }

    /// Counts one failure of hooks whose overall outcome is `outcome`,
    /// here, now: a permanent outcome (exit 1 or 2) raises the count to at
    /// least `migration_threshold` ([`crate::hooks::fail_count_after`]) and
    /// marks the record [`ServiceRecord::permanent_failure`].
    pub fn count_hook_failure(
        &mut self,
        outcome: kubeha_crds::service::HookOutcome,
        migration_threshold: i32,
    ) {
        self.count_failure();
        self.fail_count =
            crate::hooks::fail_count_after(outcome, self.fail_count, migration_threshold);
        self.permanent_failure |= crate::hooks::is_permanent(outcome);
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
        self.permanent_failure = false;
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

    /// For a record read from the status file of another boot: nothing it
    /// ran survived the reboot (processes, addresses), so it holds no role
    /// and no VIP, nothing is left to leave, and a master role still asked
    /// of this node is entered again, with its hooks. Failures of the
    /// service (count, failed epoch) are kept; a fence's `Failed` is not
    /// one. Returns whether the record held or was doing anything.
    pub fn forget_after_reboot(&mut self) -> bool {
        let held = self.role != Role::None
            || !self.vips.is_empty()
            || self.unclean_epoch.is_some()
            || self.fenced
            || matches!(
                self.state,
                NodeServiceState::Running | NodeServiceState::Starting | NodeServiceState::Stopping
            );
        if self.state != NodeServiceState::Failed || self.fenced {
            self.state = NodeServiceState::Stopped;
        }
        self.role = Role::None;
        self.vips.clear();
        self.interface = None;
        self.unclean_epoch = None;
        self.fenced = false;
        held
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
    write_with(state_dir, status, true)
}

/// Writes the status file atomically (a temporary file, then a rename) but
/// without waiting for the disk: whatever reads it after this returns, an
/// agent restarted after a crash or a kill included, reads the new content;
/// only a power loss or a kernel crash can lose it. Meant for a transition's
/// intent, written on the latency path just before a VIP is added: what it
/// guards (a VIP added or a service half started by an agent that died
/// before writing the outcome) lives in the running kernel only, and a
/// power loss or kernel crash ends both along with the page cache, so the
/// file after a reboot counts every service as stopped whatever it says
/// ([`ServiceRecord::forget_after_reboot`]). The outcome that follows is
/// flushed ([`sync`]).
pub fn write_unsynced(state_dir: &Path, status: &NodeStatus) -> std::io::Result<()> {
    write_with(state_dir, status, false)
}

/// Flushes the status file as it is now, and its folder's entry of it, to
/// the disk: after [`write_unsynced`], what [`write`] does, minus the write.
pub fn sync(state_dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(path(state_dir))?.sync_all()?;
    std::fs::File::open(state_dir)?.sync_all()
}

fn write_with(state_dir: &Path, status: &NodeStatus, sync: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{STATUS_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path(state_dir))?;
    if sync {
        std::fs::File::open(state_dir)?.sync_all()?;
    }
    Ok(())
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
mod tests;
