//! The Helm chart renders, keeps CRDs behind `crds.install`, and every object
//! it renders is accepted by the real API server (server-side dry run).

use std::process::Command;

use kubeha_e2e::deps::Binaries;
use kubeha_e2e::lab::Lab;

fn helm_template(lab: &Lab, extra: &[&str]) -> String {
    let chart = lab.root().join("charts").join("kubeha");
    let out = Command::new(Binaries::cached().helm)
        .args([
            "template",
            "kubeha",
            chart.to_str().unwrap(),
            "--namespace",
            "kubeha-system",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn chart_renders_and_the_api_server_accepts_it() {
    let lab = Lab::of_this_checkout();
    lab.ensure_up().unwrap();
    let chart = lab.root().join("charts").join("kubeha");
    let lint = Command::new(Binaries::cached().helm)
        .args(["lint", chart.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&lint.stdout)
    );

    let with_crds = helm_template(&lab, &[]);
    assert_eq!(
        with_crds.matches("kind: CustomResourceDefinition").count(),
        2
    );
    assert!(
        with_crds.contains("helm.sh/resource-policy: keep"),
        "CRDs must survive helm uninstall"
    );
    assert!(with_crds.contains("kind: DaemonSet") && with_crds.contains("kind: Deployment"));
    let without = helm_template(&lab, &["--set", "crds.install=false"]);
    assert_eq!(without.matches("kind: CustomResourceDefinition").count(), 0);

    let _ = lab.kubectl_output(&["create", "namespace", "kubeha-system"]);
    let file = std::env::temp_dir().join(format!("kubeha-chart-{}.yaml", std::process::id()));
    std::fs::write(&file, without).unwrap();
    let out = lab
        .kubectl_ok(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()])
        .unwrap();
    assert!(
        out.contains("daemonset.apps/kubeha-agent created (server dry run)"),
        "{out}"
    );
    let _ = std::fs::remove_file(file);
}

/// Every object `helm template` rendered with `extra`, parsed.
fn rendered_objects(lab: &Lab, extra: &[&str]) -> Vec<serde_yaml::Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(&helm_template(lab, extra))
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The rendered object of `kind` named `name`.
fn object<'a>(objects: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

/// `(apiGroups, resources, verbs)` of every rule of a Role or ClusterRole.
fn rules(role: &serde_yaml::Value) -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    role["rules"]
        .as_sequence()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (
                        strings(&r["apiGroups"]),
                        strings(&r["resources"]),
                        strings(&r["verbs"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The verbs `role` grants on `resource` (any group), sorted.
fn verbs_on(role: &serde_yaml::Value, resource: &str) -> Vec<String> {
    let mut verbs: Vec<String> = rules(role)
        .into_iter()
        .filter(|(_, resources, _)| resources.iter().any(|r| r == resource))
        .flat_map(|(_, _, verbs)| verbs)
        .collect();
    verbs.sort();
    verbs.dedup();
    verbs
}

fn sorted(verbs: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = verbs.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Every CEL expression (match conditions, variables, validations) of the
/// rendered node identity policy, one a line.
fn policy_expressions(objects: &[serde_yaml::Value]) -> String {
    expressions_of(objects, "kubeha-agent-node-identity")
}

/// Every CEL expression (match conditions, variables, validations and
/// message expressions) of the rendered ValidatingAdmissionPolicy `name`,
/// one a line.
fn expressions_of(objects: &[serde_yaml::Value], name: &str) -> String {
    let spec = &object(objects, "ValidatingAdmissionPolicy", name)["spec"];
    ["matchConditions", "variables", "validations"]
        .iter()
        .flat_map(|k| spec[*k].as_sequence().cloned().unwrap_or_default())
        .flat_map(|e| {
            ["expression", "messageExpression"]
                .iter()
                .filter_map(|k| e[*k].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The chart rendered without CRDs, with value `set` (`key=value`).
fn rendered_with(lab: &Lab, set: &str) -> Vec<serde_yaml::Value> {
    rendered_objects(lab, &["--set", "crds.install=false", "--set", set])
}

/// Rendered in release namespace ha-ops with account value `account`
/// (`serviceAccount.<which>=<name>`), policy `policy` matches that
/// namespace and has `expected_user`, and names kubeha-system nowhere.
fn assert_keyed_on_elsewhere(lab: &Lab, policy: &str, account: &str, expected_user: &str) {
    let elsewhere = rendered_objects(
        lab,
        &[
            "--set",
            "crds.install=false",
            "--namespace",
            "ha-ops",
            "--set",
            account,
        ],
    );
    let text = expressions_of(&elsewhere, policy);
    assert!(
        text.contains(expected_user),
        "no {expected_user:?} in:\n{text}"
    );
    assert!(text.contains("request.namespace == 'ha-ops'"), "{text}");
    assert!(!text.contains("kubeha-system"), "{text}");
}

/// Whether a ValidatingAdmissionPolicy or its binding named `name` is
/// rendered.
fn renders_policy(objects: &[serde_yaml::Value], name: &str) -> bool {
    objects.iter().any(|o| {
        o["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
            && o["metadata"]["name"].as_str() == Some(name)
    })
}

/// The service Lease policy: on by default, it matches Lease creates and
/// updates (never deletes) in the release namespace of a Lease labelled
/// or named as a service Lease, old or new object, and lets only the
/// operator's account through, with a message that says what to do.
#[test]
fn the_service_lease_policy_is_on_by_default_and_lets_only_the_operator_write() {
    let lab = Lab::of_this_checkout();
    let objects = rendered_objects(&lab, &["--set", "crds.install=false"]);
    let name = "kubeha-service-lease-writer";
    let policy = object(&objects, "ValidatingAdmissionPolicy", name);
    let binding = object(&objects, "ValidatingAdmissionPolicyBinding", name);
    assert_eq!(policy["spec"]["failurePolicy"].as_str(), Some("Fail"));
    assert_eq!(binding["spec"]["policyName"].as_str(), Some(name));
    assert_eq!(
        binding["spec"]["validationActions"][0].as_str(),
        Some("Deny")
    );
    let rules = policy["spec"]["matchConstraints"]["resourceRules"]
        .as_sequence()
        .unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["resources"][0].as_str(), Some("leases"));
    let operations: Vec<&str> = rules[0]["operations"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|o| o.as_str())
        .collect();
    assert_eq!(
        operations,
        ["CREATE", "UPDATE"],
        "a delete must stay allowed (namespace controller)"
    );
    let text = expressions_of(&objects, name);
    for expected in [
        "request.namespace == 'kubeha-system'",
        "object.metadata.?labels[?'kubeha.io/lease'].orValue('') in ['service', 'claim']",
        "oldObject.metadata.?labels[?'kubeha.io/lease'].orValue('') in ['service', 'claim']",
        "request.name.startsWith('kubeha-svc-')",
        "request.name.startsWith('kubeha-claim-')",
        "request.userInfo.username == 'system:serviceaccount:kubeha-system:kubeha-operator'",
        "service and claim Leases are written only by the kubeha operator (system:serviceaccount:kubeha-system:kubeha-operator)",
        "kubectl ha move / the kubeha.io/move-to annotation",
        // The agent is left to the node identity policy's own refusal.
        "request.userInfo.username != 'system:serviceaccount:kubeha-system:kubeha-agent'",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }

    assert_keyed_on_elsewhere(
        &lab,
        name,
        "serviceAccount.operator=ha-op",
        "request.userInfo.username == 'system:serviceaccount:ha-ops:ha-op'",
    );

    // Without the node identity policy the agent is refused here too.
    let alone = rendered_with(&lab, "rbac.nodeIdentityPolicy=false");
    assert!(!renders_policy(&alone, "kubeha-agent-node-identity"));
    let text = expressions_of(&alone, name);
    assert!(!text.contains("kubeha-agent"), "{text}");

    let off = rendered_with(&lab, "rbac.serviceLeasePolicy=false");
    assert!(
        !renders_policy(&off, name),
        "rbac.serviceLeasePolicy=false must render no service Lease policy"
    );
    assert!(renders_policy(&off, "kubeha-agent-node-identity"));
}

#[test]
fn the_node_identity_policy_is_on_by_default_and_keyed_on_the_agent_account() {
    let lab = Lab::of_this_checkout();
    let objects = rendered_objects(&lab, &["--set", "crds.install=false"]);
    let policy = object(
        &objects,
        "ValidatingAdmissionPolicy",
        "kubeha-agent-node-identity",
    );
    let binding = object(
        &objects,
        "ValidatingAdmissionPolicyBinding",
        "kubeha-agent-node-identity",
    );
    assert_eq!(policy["spec"]["failurePolicy"].as_str(), Some("Fail"));
    assert_eq!(
        binding["spec"]["policyName"].as_str(),
        Some("kubeha-agent-node-identity")
    );
    assert_eq!(
        binding["spec"]["validationActions"][0].as_str(),
        Some("Deny")
    );
    let text = policy_expressions(&objects);
    assert!(
        text.contains("system:serviceaccount:kubeha-system:kubeha-agent"),
        "{text}"
    );
    assert!(
        text.contains("authentication.kubernetes.io/node-name"),
        "{text}"
    );
    assert!(
        text.contains("request.namespace == 'kubeha-system'"),
        "{text}"
    );

    // Another release namespace and agent account name are the ones matched.
    assert_keyed_on_elsewhere(
        &lab,
        "kubeha-agent-node-identity",
        "serviceAccount.agent=ha-node",
        "system:serviceaccount:ha-ops:ha-node",
    );

    let off = rendered_with(&lab, "rbac.nodeIdentityPolicy=false");
    assert!(
        !renders_policy(&off, "kubeha-agent-node-identity"),
        "rbac.nodeIdentityPolicy=false must render no node identity policy"
    );
}

/// A status field the policy does not compare would be one any node's
/// token can forge: every field of the HAService status but `nodes` must
/// be held unchanged, including fields added later.
#[test]
fn the_node_identity_policy_holds_every_operator_status_field() {
    let lab = Lab::of_this_checkout();
    let crd: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(lab.root().join("crds/manifests/haservices.kubeha.io.yaml"))
            .unwrap(),
    )
    .unwrap();
    let status = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    let fields: Vec<&str> = status
        .as_mapping()
        .expect("HAService status properties")
        .keys()
        .filter_map(|k| k.as_str())
        .filter(|k| *k != "nodes")
        .collect();
    assert!(
        fields.contains(&"phase") && fields.contains(&"epoch"),
        "{fields:?}"
    );
    let objects = rendered_objects(&lab, &["--set", "crds.install=false"]);
    let text = policy_expressions(&objects);
    for field in fields {
        let held = format!("object.?status.?{field} == oldObject.?status.?{field}");
        assert!(
            text.contains(&held),
            "the policy lets agents change status.{field}: add `{held}`"
        );
    }
}

#[test]
fn rbac_gives_each_account_only_what_its_code_uses() {
    let lab = Lab::of_this_checkout();
    let objects = rendered_objects(&lab, &["--set", "crds.install=false"]);
    let agent_cluster = object(&objects, "ClusterRole", "kubeha-agent");
    let agent_ns = object(&objects, "Role", "kubeha-agent");
    let operator_cluster = object(&objects, "ClusterRole", "kubeha-operator");
    let operator_ns = object(&objects, "Role", "kubeha-operator");

    // Agent: Leases only in the release namespace; writes by apply (patch,
    // create), never update or delete.
    assert!(
        verbs_on(agent_cluster, "leases").is_empty(),
        "agent leases cluster-wide"
    );
    assert_eq!(
        verbs_on(agent_ns, "leases"),
        sorted(&["get", "list", "watch", "create", "patch"])
    );
    assert_eq!(
        verbs_on(agent_cluster, "haservices/status"),
        sorted(&["patch"])
    );
    assert_eq!(
        verbs_on(agent_cluster, "haservices"),
        sorted(&["get", "list", "watch"])
    );
    assert_eq!(
        verbs_on(agent_cluster, "haclusters"),
        sorted(&["get", "list", "watch"])
    );
    assert_eq!(
        verbs_on(agent_cluster, "events"),
        sorted(&["create", "patch"])
    );
    assert_eq!(verbs_on(agent_ns, "configmaps"), sorted(&["get"]));
    assert!(
        verbs_on(agent_cluster, "configmaps").is_empty(),
        "agent ConfigMaps cluster-wide by default"
    );
    for role in [agent_cluster, agent_ns] {
        for (_, resources, verbs) in rules(role) {
            for verb in ["update", "delete", "deletecollection", "*"] {
                assert!(
                    !verbs.iter().any(|v| v == verb),
                    "agent may {verb} {resources:?}"
                );
            }
        }
    }

    // Operator: status by apply only, no ConfigMaps.
    assert_eq!(
        verbs_on(operator_cluster, "haservices/status"),
        sorted(&["patch"])
    );
    assert_eq!(
        verbs_on(operator_cluster, "haclusters/status"),
        sorted(&["patch"])
    );
    assert!(verbs_on(operator_cluster, "configmaps").is_empty());
    assert!(verbs_on(operator_ns, "configmaps").is_empty());
    // Never a Lease written outside the release namespace (kube-node-lease,
    // kube-system, tenants' leader elections): every kubeha Lease is there.
    assert!(
        verbs_on(operator_cluster, "leases").is_empty(),
        "operator Lease rules cluster-wide"
    );
    for role in [agent_cluster, agent_ns, operator_cluster, operator_ns] {
        for (groups, resources, verbs) in rules(role) {
            assert!(
                !groups
                    .iter()
                    .chain(&resources)
                    .chain(&verbs)
                    .any(|s| s == "*"),
                "wildcard rule {groups:?} {resources:?} {verbs:?}"
            );
        }
    }

    // The cluster-wide ConfigMap read is the agent's, and only on request.
    let wide = rendered_objects(
        &lab,
        &[
            "--set",
            "crds.install=false",
            "--set",
            "rbac.configMapsAllNamespaces=true",
        ],
    );
    assert_eq!(
        verbs_on(object(&wide, "ClusterRole", "kubeha-agent"), "configmaps"),
        sorted(&["get"])
    );
    assert!(
        verbs_on(
            object(&wide, "ClusterRole", "kubeha-operator"),
            "configmaps"
        )
        .is_empty()
    );
}

/// The lab's agents authenticate as their node, the way the kubelet's
/// projected token of a DaemonSet pod does: the API server's view of
/// node-3's kubeconfig names node-3.
#[test]
fn lab_agent_tokens_name_their_node() {
    let lab = Lab::of_this_checkout();
    lab.ensure_up_with_nodes(3).unwrap();
    for i in [1u8, 3] {
        let out = lab
            .node_kubectl(i)
            .unwrap()
            .args(["auth", "whoami", "-o", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let user = &review["status"]["userInfo"];
        assert_eq!(
            user["username"],
            "system:serviceaccount:kubeha-system:kubeha-agent"
        );
        assert_eq!(
            user["extra"]["authentication.kubernetes.io/node-name"],
            serde_json::json!([format!("node-{i}")]),
            "{user}"
        );
        assert_eq!(
            user["extra"]["authentication.kubernetes.io/pod-name"],
            serde_json::json!([Lab::identity_pod_name(i)]),
            "{user}"
        );
    }
}
