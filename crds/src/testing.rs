//! Builders of API objects for the tests of every crate (feature
//! `testing`): specs as the API server would default them, with the few
//! fields a test names.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::cluster::{MemberNode, Members};
use crate::service::{NodeServiceState, Role, ServiceNodeStatus};
use crate::{HACluster, HAClusterSpec, HAServiceSpec, Mode};

/// A label map from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Members listed by name with their modes, and optionally selected by the
/// labels `selector` (every pair must match).
pub fn members(listed: &[(&str, Mode)], selector: Option<&[(&str, &str)]>) -> Members {
    Members {
        nodes: listed
            .iter()
            .map(|(name, mode)| MemberNode {
                name: name.to_string(),
                mode: *mode,
            })
            .collect(),
        selector: selector.map(|pairs| LabelSelector {
            match_labels: Some(labels(pairs)),
            match_expressions: None,
        }),
    }
}

/// A cluster spec with these members, VIP pool 198.18.0.0/16 and
/// 2001:db8::/32, every namespace allowed and given every hook directory
/// (`allowedHookSources`: `*` may use hostPath `*`), the rest defaulted.
pub fn cluster_spec(members: Members) -> HAClusterSpec {
    let mut spec: HAClusterSpec = serde_json::from_value(serde_json::json!({
        "members": {"nodes": [{"name": "seed"}]},
        "vipPool": ["198.18.0.0/16", "2001:db8::/32"],
        "allowedNamespaces": ["*"],
        "allowedHookSources": {"namespaces": [{"namespace": "*", "hostPaths": ["*"]}]},
    }))
    .expect("a minimal HACluster spec parses");
    spec.members = members;
    spec
}

/// Cluster `name` with [`cluster_spec`].
pub fn cluster(name: &str, members: Members) -> HACluster {
    HACluster::new(name, cluster_spec(members))
}

/// A service spec of cluster `cluster` with these VIPs (`address/prefix`),
/// the rest defaulted.
pub fn service_spec(cluster: &str, vips: &[&str]) -> HAServiceSpec {
    let vips: Vec<_> = vips
        .iter()
        .map(|v| serde_json::json!({"address": v}))
        .collect();
    serde_json::from_value(serde_json::json!({"clusterRef": cluster, "vips": vips}))
        .expect("a minimal HAService spec parses")
}

/// An agent's status entry for `node`: `role` and `state` at `epoch`,
/// `acked` the last epoch it acknowledged; no failures, no hook results.
pub fn status_entry(
    node: &str,
    role: Role,
    state: NodeServiceState,
    epoch: i64,
    acked: Option<i64>,
) -> ServiceNodeStatus {
    ServiceNodeStatus {
        node: node.to_owned(),
        role,
        state,
        epoch: Some(epoch),
        acked_epoch: acked,
        fail_count: 0,
        last_failure_time: None,
        unclean_epoch: None,
        permanent_failure: false,
        hooks: Vec::new(),
        refused: None,
    }
}

/// A Lease held by `holder` (empty: nobody) at `transitions`, with
/// `annotations`.
pub fn lease(
    holder: &str,
    transitions: Option<i32>,
    annotations: &[(&str, &str)],
) -> k8s_openapi::api::coordination::v1::Lease {
    k8s_openapi::api::coordination::v1::Lease {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            annotations: Some(labels(annotations)),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_transitions: transitions,
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_fill_what_they_name_and_default_the_rest() {
        let c = cluster(
            "c",
            members(&[("n1", Mode::Single)], Some(&[("ha", "yes")])),
        );
        assert_eq!(c.spec.members.nodes[0].name, "n1");
        assert_eq!(c.spec.members.nodes[0].mode, Mode::Single);
        let selector = c.spec.members.selector.as_ref().unwrap();
        assert_eq!(selector.match_labels, Some(labels(&[("ha", "yes")])));
        assert_eq!(c.spec.allowed_namespaces, ["*"]);
        let s = service_spec("c", &["198.18.0.100/24", "2001:db8::100/64"]);
        assert_eq!(s.cluster_ref, "c");
        assert_eq!(s.vips.len(), 2);
        assert_eq!(s.vips[1].address, "2001:db8::100/64");
    }
}
