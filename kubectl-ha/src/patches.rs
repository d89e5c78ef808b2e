//! The patches the commands send, as pure functions returning JSON, so what
//! goes to the API server is tested without one.

use kubeha_crds::annotations;
use kubeha_crds::{HACluster, Mode};
use serde_json::{Value, json};

/// JSON merge patch for `kubectl ha move`: sets the HAService annotation
/// [`annotations::MOVE_TO`] to `node`.
pub fn move_patch(node: &str) -> Value {
    json!({ "metadata": { "annotations": { annotations::MOVE_TO: node } } })
}

/// JSON merge patch for `kubectl ha clear`: sets the HAService annotation
/// [`annotations::CLEAR`] to `token` (a new value means "clear now") and
/// removes [`annotations::MOVE_TO`] (a null in a merge patch deletes).
/// [`annotations::FORCE_START`] is removed after the failures are cleared
/// (`node_ops::end_force_start`).
pub fn clear_patch(token: &str) -> Value {
    json!({
        "metadata": {
            "annotations": {
                annotations::CLEAR: token,
                annotations::MOVE_TO: null,
            }
        }
    })
}

/// The token `kubectl ha clear` writes: the time as RFC 3339.
pub fn clear_token(now: jiff::Timestamp) -> String {
    now.to_string()
}

/// Why a mode change cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModePatchError {
    /// The node is not in `spec.members.nodes`: only listed members carry a
    /// mode.
    NotListed {
        /// The HACluster.
        cluster: String,
        /// The node asked for.
        node: String,
        /// The listed members.
        listed: Vec<String>,
    },
}

impl std::fmt::Display for ModePatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModePatchError::NotListed {
                cluster,
                node,
                listed,
            } => write!(
                f,
                "node {node} is not listed in spec.members.nodes of HACluster {cluster} (listed: {}); only listed members have a mode: add it there first (kubectl edit hacluster {cluster})",
                if listed.is_empty() {
                    "none".to_owned()
                } else {
                    listed.join(", ")
                }
            ),
        }
    }
}

impl std::error::Error for ModePatchError {}

/// JSON patch (RFC 6902) for `kubectl ha mode`: sets the mode of the entry
/// of `node` in `spec.members.nodes` of `cluster`, after a `test` that the
/// entry is still at the index read, so a concurrent reordering makes the
/// patch fail instead of changing another member. The API server's CEL
/// rules then judge the combination of modes.
pub fn mode_patch(cluster: &HACluster, node: &str, mode: Mode) -> Result<Value, ModePatchError> {
    let nodes = &cluster.spec.members.nodes;
    let Some(index) = nodes.iter().position(|m| m.name == node) else {
        return Err(ModePatchError::NotListed {
            cluster: cluster.metadata.name.clone().unwrap_or_default(),
            node: node.to_owned(),
            listed: nodes.iter().map(|m| m.name.clone()).collect(),
        });
    };
    let path = format!("/spec/members/nodes/{index}");
    Ok(json!([
        { "op": "test", "path": format!("{path}/name"), "value": node },
        { "op": "add", "path": format!("{path}/mode"), "value": mode },
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeha_crds::testing::members;

    fn cluster(nodes: &[(&str, Mode)]) -> HACluster {
        kubeha_crds::testing::cluster("c", members(nodes, None))
    }

    /// Applies a JSON merge patch (RFC 7386) to `target`.
    fn merge(target: &mut Value, patch: &Value) {
        let Value::Object(p) = patch else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = Value::Object(Default::default());
        }
        let Value::Object(t) = target else {
            unreachable!()
        };
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }

    #[test]
    fn move_sets_only_the_annotation() {
        let p = move_patch("node-2");
        assert_eq!(
            p,
            json!({"metadata": {"annotations": {"kubeha.io/move-to": "node-2"}}})
        );
        let mut obj = json!({"metadata": {"name": "svc", "annotations": {"other": "x"}}, "spec": {"clusterRef": "c"}});
        merge(&mut obj, &p);
        assert_eq!(obj["metadata"]["annotations"]["other"], "x");
        assert_eq!(
            obj["metadata"]["annotations"]["kubeha.io/move-to"],
            "node-2"
        );
        assert_eq!(obj["spec"]["clusterRef"], "c");
    }

    #[test]
    fn clear_sets_the_token_and_drops_the_move() {
        let token = clear_token(jiff::Timestamp::from_second(1_700_000_000).unwrap());
        assert_eq!(token, "2023-11-14T22:13:20Z");
        let p = clear_patch(&token);
        let mut obj = json!({"metadata": {"annotations": {
            "kubeha.io/move-to": "node-2",
            "kubeha.io/clear": "older",
            "other": "x",
        }}});
        merge(&mut obj, &p);
        assert_eq!(
            obj["metadata"]["annotations"],
            json!({"kubeha.io/clear": "2023-11-14T22:13:20Z", "other": "x"})
        );
        // Without any annotation yet.
        let mut bare = json!({"metadata": {"name": "svc"}});
        merge(&mut bare, &p);
        assert_eq!(
            bare["metadata"]["annotations"],
            json!({"kubeha.io/clear": "2023-11-14T22:13:20Z"})
        );
    }

    #[test]
    fn mode_patch_tests_the_entry_and_sets_its_mode() {
        let c = cluster(&[("node-1", Mode::Default), ("node-2", Mode::Default)]);
        let p = mode_patch(&c, "node-2", Mode::Peerdown).unwrap();
        assert_eq!(
            p,
            json!([
                {"op": "test", "path": "/spec/members/nodes/1/name", "value": "node-2"},
                {"op": "add", "path": "/spec/members/nodes/1/mode", "value": "peerdown"},
            ])
        );
        // It is a valid JSON patch and does what it says.
        let patch: json_patch::Patch = serde_json::from_value(p).unwrap();
        let mut doc = serde_json::to_value(&c).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        let after: HACluster = serde_json::from_value(doc).unwrap();
        assert_eq!(after.spec.members.nodes[0].mode, Mode::Default);
        assert_eq!(after.spec.members.nodes[1].mode, Mode::Peerdown);
        // Reordered meanwhile: the test fails, nothing changes.
        let reordered = cluster(&[("node-2", Mode::Default), ("node-1", Mode::Default)]);
        let mut doc = serde_json::to_value(&reordered).unwrap();
        assert!(json_patch::patch(&mut doc, &patch).is_err());
    }

    #[test]
    fn mode_patch_refuses_unlisted_nodes_with_the_fix() {
        let c = cluster(&[("node-1", Mode::Default)]);
        let e = mode_patch(&c, "node-9", Mode::Locked).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("node node-9 is not listed"), "{text}");
        assert!(text.contains("HACluster c"), "{text}");
        assert!(text.contains("listed: node-1"), "{text}");
        assert!(text.contains("kubectl edit hacluster c"), "{text}");
    }
}
