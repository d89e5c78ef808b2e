use std::collections::BTreeSet;

use k8s_openapi::api::coordination::v1::Lease;
use kubeha_crds::service::HAServiceStatus;
use kubeha_crds::testing::{service_spec, status_entry};

use super::*;

/// A service Lease as the agents read it, from its JSON.
fn lease(holder: &str, standby: Option<&str>, cleared: Option<&str>) -> Lease {
    let mut annotations = serde_json::Map::new();
    for (key, node) in [
        (leases::STANDBY_ANNOTATION, standby),
        (leases::CLEARED_NODE_ANNOTATION, cleared),
    ] {
        if let Some(node) = node {
            annotations.insert(key.to_owned(), node.into());
        }
    }
    serde_json::from_value(json!({
        "metadata": { "annotations": annotations },
        "spec": { "holderIdentity": holder, "leaseTransitions": 3 },
    }))
    .expect("a service Lease parses")
}

fn service(entries: Vec<kubeha_crds::service::ServiceNodeStatus>) -> HAService {
    let mut svc = HAService::new("web", service_spec("c", &["198.18.0.10/24"]));
    svc.status = Some(HAServiceStatus {
        nodes: entries,
        ..Default::default()
    });
    svc
}

fn set(nodes: &[&str]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.to_string()).collect()
}

/// Holder, standby and the node last cleared are needed; of the status
/// entries, those that have not shown that they left.
#[test]
fn needed_are_the_lease_s_nodes_and_those_not_yet_gone() {
    let mut failed = status_entry("n5", Role::None, NodeServiceState::Stopped, 2, Some(2));
    failed.fail_count = 1;
    let mut unclean = status_entry("n6", Role::None, NodeServiceState::Stopped, 2, Some(2));
    unclean.unclean_epoch = Some(2);
    let svc = service(vec![
        status_entry("n1", Role::Master, NodeServiceState::Running, 3, Some(2)),
        status_entry("n3", Role::None, NodeServiceState::Stopping, 2, None),
        status_entry("n4", Role::None, NodeServiceState::Stopped, 2, Some(2)),
        failed,
        unclean,
    ]);
    let l = lease("n1", Some("n2"), Some("n7"));
    assert_eq!(
        needed_nodes(&svc, Some(&l)),
        set(&["n1", "n2", "n3", "n5", "n6", "n7"])
    );
    // No Lease yet: only the entries.
    assert_eq!(needed_nodes(&svc, None), set(&["n1", "n3", "n5", "n6"]));
    // An empty standby or cleared node names nobody.
    let l = lease("n1", Some(""), Some(""));
    assert_eq!(needed_nodes(&service(vec![]), Some(&l)), set(&["n1"]));
}

/// Only node-scope labels are added or removed; the service's other
/// labels are never touched.
#[test]
fn changes_touch_only_scope_labels() {
    let mut svc = service(vec![]);
    svc.metadata.labels = Some(
        [
            ("app", "web"),
            ("node.kubeha.io/n1", "true"),
            ("node.kubeha.io/n9", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    let current = scope_labels(&svc);
    assert_eq!(current, set(&["node.kubeha.io/n1", "node.kubeha.io/n9"]));
    let (add, remove) = label_changes(&current, &set(&["n1", "n2"]));
    assert_eq!(add, set(&["node.kubeha.io/n2"]));
    assert_eq!(remove, set(&["node.kubeha.io/n9"]));
    let patch = label_patch(&add, &remove).unwrap();
    assert_eq!(
        patch,
        json!({"metadata": {"labels": {"node.kubeha.io/n2": "true", "node.kubeha.io/n9": null}}})
    );
    assert_eq!(label_patch(&BTreeSet::new(), &BTreeSet::new()), None);
}

/// A service Lease written by an older operator (without the node-scope
/// labels of the nodes it names) gets them, at its resourceVersion; other
/// labels stay (the handover's waited-on nodes), and a Lease labelled
/// right is left alone.
#[test]
fn a_lease_labelled_for_other_nodes_is_relabelled_at_its_version() {
    let mut old = lease("n1", Some("n2"), None);
    old.metadata.resource_version = Some("42".into());
    old.metadata.labels = Some(
        [("node.kubeha.io/n3".to_owned(), "true".to_owned())]
            .into_iter()
            .collect(),
    );
    let patch = lease_label_patch(&old, &service(Vec::new())).expect("labels to fix");
    assert_eq!(
        patch,
        json!({"metadata": {
            "resourceVersion": "42",
            "labels": {
                "node.kubeha.io/n1": "true",
                "node.kubeha.io/n2": "true",
            },
        }})
    );
    let mut right = old.clone();
    leases::set_scope_labels(&mut right, [node_scope_label("n3")]);
    assert_eq!(lease_label_patch(&right, &service(Vec::new())), None);
    // A node whose entry is of an earlier epoch (3 is the Lease's) is
    // shown the Lease until it reports it; one at the epoch is not.
    let behind = service(vec![
        status_entry("n4", Role::None, NodeServiceState::Stopped, 2, Some(2)),
        status_entry("n5", Role::None, NodeServiceState::Stopped, 3, None),
    ]);
    let patch = lease_label_patch(&right, &behind).expect("n4 to be shown the Lease");
    assert_eq!(
        patch["metadata"]["labels"],
        json!({"node.kubeha.io/n4": "true"})
    );
}
