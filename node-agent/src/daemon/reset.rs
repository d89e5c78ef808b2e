//! An admin's reset of this node (`kubectl ha reset NODE`, StorNext's
//! `force smith`): the HACluster annotation
//! [`kubeha_crds::annotations::RESET_NODE`] names a node and a request id.
//! Only the cluster admin writes HAClusters, so a tenant cannot fence a
//! node. The named node's agent acts once per request id: it appends the
//! id to its reset log (synced, in the log directory, which outlives a
//! reboot, so neither a restarted agent nor a node the reset hook rebooted
//! fences again for the same request) before it acts, and then fences
//! itself for that cluster at once ([`super::fence`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kube::ResourceExt;
use kubeha_crds::HACluster;
use kubeha_crds::annotations::{RESET_NODE, reset_request};

use super::Shared;
use super::membership::{OwnNode, member_of};
use crate::statefile;

/// The reset log: one line `CLUSTER REQUEST-ID` per request acted on.
pub(super) fn reset_log(log_dir: &Path) -> PathBuf {
    log_dir.join("reset-requests.log")
}

/// Whether the reset log records request `id` of `cluster`.
fn acted_on(log: &Path, cluster: &str, id: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|text| {
        text.lines()
            .any(|l| l.split_once(' ') == Some((cluster, id)))
    })
}

/// The reset requests for this node not yet acted on, by cluster (of
/// the clusters this node is a member of): each is recorded in the reset
/// log before it is returned, so it is acted on once. A request whose id
/// cannot be recorded is not acted on (and retried on the next pass).
pub(super) fn take_requests(
    shared: &Shared,
    clusters: &[Arc<HACluster>],
    me: &OwnNode,
) -> BTreeMap<String, String> {
    let log = reset_log(&shared.config.log_dir);
    let mut out = BTreeMap::new();
    for (cluster, _) in member_of(clusters, me, false) {
        let Some((node, id)) = cluster
            .annotations()
            .get(RESET_NODE)
            .and_then(|v| reset_request(v))
        else {
            continue;
        };
        let name = cluster.name_any();
        // A request id is one token of the log line.
        let id = id.replace(char::is_whitespace, "_");
        if node != shared.config.node || acted_on(&log, &name, &id) {
            continue;
        }
        if let Err(e) = statefile::append_synced(&log, &format!("{name} {id}")) {
            tracing::error!(error = %e, log = %log.display(), cluster = %name, "cannot record the reset request: not acted on");
            continue;
        }
        tracing::warn!(cluster = %name, request = %id, "reset requested by an admin: fencing now");
        out.insert(name, id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_recorded_once_per_cluster_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let log = reset_log(dir.path());
        assert!(!acted_on(&log, "c", "1"), "no log yet");
        statefile::append_synced(&log, "c 1").unwrap();
        statefile::append_synced(&log, "d 2").unwrap();
        assert!(acted_on(&log, "c", "1"));
        assert!(acted_on(&log, "d", "2"));
        assert!(!acted_on(&log, "c", "2"), "a new id is a new request");
        assert!(!acted_on(&log, "d", "1"), "ids are per cluster");
    }
}
