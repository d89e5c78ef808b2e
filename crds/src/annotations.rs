//! Annotations an admin (or `kubectl ha`) puts on an HAService ([`MOVE_TO`],
//! [`CLEAR`], [`FORCE_START`]) or, for what only the cluster admin may ask
//! (tenants cannot write HAClusters), on an HACluster ([`RELEASE_NODE`],
//! [`RESET_NODE`]) to ask for the actions of the classic HA managers. They
//! live in the metadata, not the spec: they are requests to the operator
//! and the agents, not part of the desired state, and setting one never
//! bumps the generation.
//!
//! Also the node-scope labels the operator keeps on each HAService
//! ([`node_scope_label`]): which nodes' agents see it at all.

/// Annotation on an HAService: the node the service should run on, like
/// Pacemaker's `crm resource move`. A location preference that stays until
/// it is removed: while the named node is eligible (a member whose mode
/// allows services, heartbeat Alive, not cordoned, not failed for this
/// service) the operator puts it first in the service's candidate order and
/// moves the service there at once, whatever the failback policy (as with
/// `Automatic` failback and no delay, toward that node only), through the
/// ordinary handover: the current master leaves and acknowledges before the
/// new one is cleared to enter, so no two nodes ever hold the service. If
/// the node fails later the service fails over as usual, and comes back as
/// soon as the node is eligible again. While the node is not eligible the
/// service stays where it is, and the `Moved` condition and a
/// `MoveNotPossible` Event say why. Remove it with
/// `kubectl annotate haservice NAME kubeha.io/move-to-` or `kubectl ha clear`.
pub const MOVE_TO: &str = "kubeha.io/move-to";

/// Annotation on an HAService: clear the service's failures, like
/// Pacemaker's `crm resource cleanup`. Any string; writing a value different
/// from the one last applied means "clear now" (`kubectl ha clear` writes
/// the current time). Each member's agent then sets its fail count for the
/// service to 0, forgets the epoch whose enter failed (so it may enter it
/// again), turns a `Failed` entry back to `Stopped`, and reports its entry;
/// the operator then sees the node eligible again and an `Errored` service
/// is placed. A clear is not a fence: a node whose leave failed has not
/// proved that it stopped, so the service still waits for that node's
/// acknowledgement, its heartbeat expiring, or an admin's `peerdown`.
pub const CLEAR: &str = "kubeha.io/clear";

/// Annotation on an HAService: start the service on the node it names even
/// though its failures there would keep placement off it, like FreeHA's
/// `kill -USR1` (force start) and StorNext's manual start: the emergency
/// when every node has failed and the admin knows which one to trust. It
/// overrides only this service's failures (fail count at the migration
/// threshold, the `Errored` phase) on that one node, and nothing else: the
/// node must still be a member whose mode allows services, heartbeat
/// Alive, not cordoned, and a node that may not have left the service
/// cleanly (`uncleanEpoch`) is not forced (clear it first). The start goes
/// through the ordinary handover, so the old holder leaves (or is fenced)
/// before the node enters at the next epoch; the agent enters an epoch
/// once, so a forced start whose enter fails is not retried. A tenant who
/// may write HAServices gains nothing from it: only its own service's
/// failures are overridden, on a node the cluster admin already lets run
/// services. While it stands the service carries the `ForceStarted`
/// condition and the operator announces a `ForceStarted` Warning Event;
/// `kubectl ha clear` removes it (with the failures).
pub const FORCE_START: &str = "kubeha.io/force-start";

/// Annotation on an HAService, beside [`FORCE_START`]: the forced node's
/// fail count for the service when the force was asked (`kubectl ha
/// force-start` writes both). Only failures up to that count are
/// overridden: a failure there after the force (a higher count) ends the
/// override, so a forced start that fails is not retried at every new
/// epoch and the service can fail over again. Without it, every failure
/// on the node is overridden while the request stands.
pub const FORCE_START_FAIL_COUNT: &str = "kubeha.io/force-start-fail-count";

/// Annotation on an HACluster (cluster-admin only: tenants cannot write
/// HAClusters): release the node it names, like FreeHA's `kill -HUP`. Every
/// service of the cluster that runs there leaves it through the ordinary
/// handover and is placed on the first other eligible node; the node's
/// agent keeps heartbeating. While the annotation stands the node counts as
/// cordoned for this cluster's services; the operator removes it (a JSON
/// patch that tests the value first) once no service of the cluster has
/// the node as its holder, and then the node is eligible again: a service
/// with nowhere else to go was stopped and starts again on it, as FreeHA
/// restarts on the first node still visible, and failback `Automatic`
/// brings services back after its delay.
pub const RELEASE_NODE: &str = "kubeha.io/release-node";

/// Annotation on an HACluster (cluster-admin only): reset a node now, like
/// StorNext's `force smith`. The value is `NODE/REQUEST-ID` ([`reset_request`]);
/// the request id is any string and a new one is a new request. That node's
/// agent acts once per request id (it keeps the last id it acted on in its
/// state directory, written before it acts, so a restart does not fence
/// again): it writes a fence-log line naming the request, withholds its
/// heartbeat for the cluster for D + skew + R + 500 ms, and runs the
/// cluster's fence action at once, as it does at the renew deadline (VIPs
/// dropped, leave scripts within what is left of D, hook process groups
/// and the hook cgroup killed, then the reset hook with action
/// `ResetHook`). The operator then sees the heartbeat Lost and fails the
/// services over; the agent reports the reset as a `Reset` Warning Event on
/// the HACluster. With action `KillHooks` the node heartbeats again after
/// the hold and is a member like any other (failback decides whether
/// services return).
pub const RESET_NODE: &str = "kubeha.io/reset-node";

/// Splits a [`RESET_NODE`] value `NODE/REQUEST-ID` into the node and the
/// request id; `None` when either part is empty or the `/` is missing.
pub fn reset_request(value: &str) -> Option<(&str, &str)> {
    let (node, id) = value.trim().split_once('/')?;
    (!node.is_empty() && !id.is_empty()).then_some((node, id))
}

/// Prefix of the node-scope labels: the operator puts
/// `node.kubeha.io/<node key>` ([`node_scope_label`]) on an HAService for
/// every node whose agent needs to see it (the Lease's holder and standby,
/// the node last cleared to enter, and every node whose status entry does
/// not yet show that it left), and each agent watches HAServices with its
/// own node's label only, so a status write reaches the operator and those
/// few agents instead of every node. A service the agent does not see is
/// one it has no role in: it leaves it if it held it.
pub const NODE_SCOPE_LABEL_PREFIX: &str = "node.kubeha.io/";

/// The value of every node-scope label (only the key is selected on).
pub const NODE_SCOPE_LABEL_VALUE: &str = "true";

/// The node-scope label key of `node`: `node.kubeha.io/<node>` when the
/// node name is a valid label name (at most 63 characters, alphanumerics,
/// `-`, `_` and `.`, alphanumeric at both ends), else
/// `node.kubeha.io/h-<FNV-1a 64 of the name, 16 hex digits>`. The hash
/// is fixed (not the standard library's hasher, whose output may change
/// between Rust versions): operator and agent builds of different versions
/// agree. Two names sharing a key only make an agent see more services.
pub fn node_scope_label(node: &str) -> String {
    let valid_name = !node.is_empty()
        && node.len() <= 63
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && node.as_bytes()[0].is_ascii_alphanumeric()
        && node.as_bytes()[node.len() - 1].is_ascii_alphanumeric();
    if valid_name {
        format!("{NODE_SCOPE_LABEL_PREFIX}{node}")
    } else {
        let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        format!("{NODE_SCOPE_LABEL_PREFIX}h-{hash:016x}")
    }
}

/// Label selector of the HAServices `node`'s agent watches: those with its
/// node-scope label.
pub fn node_scope_selector(node: &str) -> String {
    node_scope_label(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_scope_labels_are_valid_label_keys() {
        assert_eq!(node_scope_label("node-1"), "node.kubeha.io/node-1");
        assert_eq!(
            node_scope_label("worker.example.com"),
            "node.kubeha.io/worker.example.com"
        );
        let long = "n".repeat(64);
        let hashed = node_scope_label(&long);
        assert!(hashed.starts_with("node.kubeha.io/h-"), "{hashed}");
        assert_eq!(hashed.len(), "node.kubeha.io/h-".len() + 16);
        assert_eq!(hashed, node_scope_label(&long), "stable");
        assert_ne!(hashed, node_scope_label(&"m".repeat(64)));
        for odd in ["", "-a", "a-", "UPPER.case-but ok?", "é"] {
            let key = node_scope_label(odd);
            let name = key.strip_prefix(NODE_SCOPE_LABEL_PREFIX).unwrap();
            assert!(
                name.len() <= 63 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{odd:?} gave {key}"
            );
        }
        assert_eq!(node_scope_selector("node-1"), "node.kubeha.io/node-1");
    }

    #[test]
    fn reset_requests_name_a_node_and_an_id() {
        assert_eq!(reset_request("node-1/42"), Some(("node-1", "42")));
        assert_eq!(
            reset_request(" node-1/2026-12-07T12:00:00Z/x "),
            Some(("node-1", "2026-12-07T12:00:00Z/x"))
        );
        for bad in ["node-1", "node-1/", "/42", "", " "] {
            assert_eq!(reset_request(bad), None, "{bad:?}");
        }
    }
}
