//! The members of an HACluster: the listed nodes in order, then the nodes a
//! label selector picks (alphabetically, mode `default`), with what the
//! Node objects say about them (cordon, addresses). Pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kubeha_crds::Mode;
use kubeha_crds::cluster::HAClusterSpec;
/// The selector matcher lives in kubeha-crds so the agent decides its own
/// membership by the same rule.
pub use kubeha_crds::members::selector_matches;

/// One member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Its mode (`default` for members picked only by the selector).
    pub mode: Mode,
    /// Whether it is listed in `spec.members.nodes` (only listed members
    /// have a mode the operator can patch).
    pub listed: bool,
    /// Index in `spec.members.nodes` when listed.
    pub index: Option<usize>,
}

/// What the operator reads from a Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.unschedulable`: cordoned.
    pub cordoned: bool,
    /// `status.addresses` that parse as IP addresses.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// Reads a Node object.
    pub fn of(node: &Node) -> Self {
        Self {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            cordoned: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            addresses: node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .map(|a| {
                    a.iter()
                        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
                        .filter_map(|a| a.address.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// A Node as the operator's watch store keeps it: its name and its
/// [`NodeInfo`], nothing else. A full Node carries managed fields, images,
/// conditions and more that the operator never reads; the watch parses each
/// Node event into this and drops the rest at once.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(from = "Node")]
pub struct WatchedNode {
    /// The name only.
    pub metadata: ObjectMeta,
    /// What the operator reads of it.
    pub info: NodeInfo,
}

impl From<Node> for WatchedNode {
    fn from(node: Node) -> Self {
        let info = NodeInfo::of(&node);
        Self {
            metadata: ObjectMeta {
                name: node.metadata.name,
                ..Default::default()
            },
            info,
        }
    }
}

impl k8s_openapi::Resource for WatchedNode {
    const API_VERSION: &'static str = Node::API_VERSION;
    const GROUP: &'static str = Node::GROUP;
    const KIND: &'static str = Node::KIND;
    const VERSION: &'static str = Node::VERSION;
    const URL_PATH_SEGMENT: &'static str = Node::URL_PATH_SEGMENT;
    type Scope = <Node as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for WatchedNode {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The members of a cluster given the Node objects by name. Listed names
/// count once (first entry wins); selected nodes follow alphabetically.
pub fn resolve(spec: &HAClusterSpec, nodes: &BTreeMap<String, NodeInfo>) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    for (i, m) in spec.members.nodes.iter().enumerate() {
        if out.iter().any(|o| o.name == m.name) {
            continue;
        }
        out.push(Member {
            name: m.name.clone(),
            mode: m.mode,
            listed: true,
            index: Some(i),
        });
    }
    if let Some(selector) = &spec.members.selector {
        for (name, info) in nodes {
            if !out.iter().any(|o| &o.name == name) && selector_matches(selector, &info.labels) {
                out.push(Member {
                    name: name.clone(),
                    mode: Mode::Default,
                    listed: false,
                    index: None,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeha_crds::members::member_mode;
    use kubeha_crds::testing::{cluster_spec, labels, members};

    #[test]
    fn listed_then_selected_alphabetically() {
        let nodes: BTreeMap<String, NodeInfo> = [
            ("n-c", labels(&[("ha", "yes")])),
            ("n-a", labels(&[("ha", "yes")])),
            ("n-b", labels(&[])),
            ("n-z", labels(&[("ha", "yes")])),
        ]
        .into_iter()
        .map(|(n, l)| {
            (
                n.to_string(),
                NodeInfo {
                    labels: l,
                    ..Default::default()
                },
            )
        })
        .collect();
        let s = cluster_spec(members(
            &[
                ("n-z", Mode::Locked),
                ("n-b", Mode::Default),
                ("n-z", Mode::Single),
            ],
            Some(&[("ha", "yes")]),
        ));
        let m = resolve(&s, &nodes);
        let names: Vec<(&str, Mode, bool)> = m
            .iter()
            .map(|m| (m.name.as_str(), m.mode, m.listed))
            .collect();
        assert_eq!(
            names,
            vec![
                ("n-z", Mode::Locked, true),
                ("n-b", Mode::Default, true),
                ("n-a", Mode::Default, false),
                ("n-c", Mode::Default, false),
            ]
        );
        assert_eq!(m[1].index, Some(1));
        // The agent decides its own membership with
        // `kubeha_crds::members::member_mode`: it must agree node by node.
        for (name, info) in &nodes {
            let resolved = m.iter().find(|m| &m.name == name).map(|m| m.mode);
            assert_eq!(
                member_mode(&s.members, name, Some(&info.labels)),
                resolved,
                "{name}"
            );
        }
    }

    #[test]
    fn node_info_reads_cordon_and_addresses() {
        use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
        let node = Node {
            spec: Some(NodeSpec {
                unschedulable: Some(true),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        address: "198.18.0.11".into(),
                        type_: "InternalIP".into(),
                    },
                    NodeAddress {
                        address: "node-1".into(),
                        type_: "Hostname".into(),
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let info = NodeInfo::of(&node);
        assert!(info.cordoned);
        assert_eq!(
            info.addresses,
            vec!["198.18.0.11".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn a_watched_node_keeps_only_its_name_and_info() {
        // As the watch hands it over: an untyped object parsed one by one.
        let full: kube::core::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "node-1",
                "labels": {"ha": "yes"},
                "annotations": {"big": "x".repeat(4096)},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
                "resourceVersion": "7",
            },
            "spec": {"unschedulable": true, "podCIDR": "10.0.0.0/24"},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "198.18.0.11"}],
                "images": [{"names": ["registry/big:1"], "sizeBytes": 1}],
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }))
        .unwrap();
        let node: WatchedNode = full.try_parse().unwrap();
        assert_eq!(
            node.metadata,
            ObjectMeta {
                name: Some("node-1".into()),
                ..Default::default()
            }
        );
        assert_eq!(node.info.labels, labels(&[("ha", "yes")]));
        assert!(node.info.cordoned);
        assert_eq!(node.info.addresses, vec![IpAddr::from([198, 18, 0, 11])]);
        assert_eq!(
            kube::core::ApiResource::erase::<WatchedNode>(&()),
            kube::core::ApiResource::erase::<Node>(&()),
            "watched as Nodes"
        );
    }
}
