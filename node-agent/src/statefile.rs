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
    /// Epoch whose enter failed here (not retried).
    pub failed_epoch: Option<i64>,
    /// The spec acted on, so hooks can be run by hand without the API server.
    pub spec: HAServiceSpec,
    /// Checksum of that spec (`KUBEHA_CONFIG_CHECKSUM`).
    pub config_checksum: String,
    /// Last hook results.
    pub last_hooks: Vec<HookResult>,
}

/// Path of the status file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATUS_FILE)
}

/// Reads the status file; `None` when absent or unreadable (a corrupt file
/// is logged and ignored: the agent then starts without re-adoption).
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

/// Writes the status file atomically: a temporary file, fsync, rename.
pub fn write(state_dir: &Path, status: &NodeStatus) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{STATUS_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(state_dir))?;
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
