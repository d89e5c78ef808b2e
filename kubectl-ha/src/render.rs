//! `kubectl ha status` output: clusters with their members' modes and
//! heartbeats, services with phase, active and standby node, epoch and
//! per-node entries, and the conditions that need attention. Pure: it
//! formats objects already read.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kubeha_crds::annotations;
use kubeha_crds::{HACluster, HAService, Mode};

/// Aligns rows into columns separated by two spaces, each line indented by
/// `indent` spaces.
fn table(rows: &[Vec<String>], indent: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = " ".repeat(indent);
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(s: Option<impl ToString>) -> String {
    s.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Whether a condition is worth showing: it says something is wrong or
/// under way (Ready False, Degraded/Stalled/Reconciling True, any Moved).
fn notable(c: &Condition) -> bool {
    matches!(
        (c.type_.as_str(), c.status.as_str()),
        ("Ready", "False") | ("Degraded" | "Stalled" | "Reconciling", "True") | ("Moved", _)
    )
}

fn conditions(conds: &[Condition], indent: usize) -> String {
    let mut out = String::new();
    for c in conds.iter().filter(|c| notable(c)) {
        out.push_str(&format!(
            "{}{}={} {}{}\n",
            " ".repeat(indent),
            c.type_,
            c.status,
            c.reason,
            if c.message.is_empty() {
                String::new()
            } else {
                format!(": {}", c.message)
            }
        ));
    }
    out
}

/// The mode `spec.members.nodes` of `c` gives `node`, when it lists it.
pub(crate) fn spec_mode(c: &HACluster, node: &str) -> Option<Mode> {
    c.spec
        .members
        .nodes
        .iter()
        .find(|m| m.name == node)
        .map(|m| m.mode)
}

/// One cluster: its state line, then a row per member (spec mode, the mode
/// in force if it differs, heartbeat, roles), then notable conditions.
pub fn cluster(c: &HACluster) -> String {
    let status = c.status.clone().unwrap_or_default();
    let mut out = format!(
        "HACluster {}: state {}, ready {}, services active {}\n",
        c.name_any(),
        or_dash(status.state.as_ref()),
        or_dash(status.ready.as_ref()),
        status.services_active.unwrap_or(0),
    );
    let mut rows = vec![vec![
        "NODE".to_owned(),
        "MODE".to_owned(),
        "HEARTBEAT".to_owned(),
        "ROLES".to_owned(),
    ]];
    let mut names: Vec<String> = c
        .spec
        .members
        .nodes
        .iter()
        .map(|m| m.name.clone())
        .collect();
    for m in &status.members {
        if !names.contains(&m.node) {
            names.push(m.node.clone());
        }
    }
    for name in names {
        let spec_mode = spec_mode(c, &name);
        let seen = status.members.iter().find(|m| m.node == name);
        let mode = match (spec_mode, seen.map(|m| m.mode)) {
            (Some(s), Some(f)) if s != f => format!("{s} (in force: {f})"),
            (Some(s), _) => s.to_string(),
            (None, Some(f)) => format!("{f} (selected)"),
            (None, None) => "-".to_owned(),
        };
        // Sorted: the operator lists them in the order it learned them.
        let roles = seen
            .map(|m| {
                let mut roles: Vec<String> = m
                    .roles
                    .iter()
                    .map(|r| format!("{}={}", r.service, role_name(r.role)))
                    .collect();
                roles.sort();
                roles.join(",")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".to_owned());
        rows.push(vec![
            name,
            mode,
            or_dash(seen.map(|m| format!("{:?}", m.heartbeat))),
            roles,
        ]);
    }
    if c.spec.members.selector.is_some() {
        out.push_str("  (members also picked by spec.members.selector)\n");
    }
    out.push_str(&table(&rows, 2));
    out.push_str(&conditions(&status.conditions, 2));
    out
}

fn role_name(r: kubeha_crds::Role) -> &'static str {
    match r {
        kubeha_crds::Role::Master => "master",
        kubeha_crds::Role::Vicemaster => "vicemaster",
        kubeha_crds::Role::None => "none",
    }
}

/// One service: its summary line (phase, active, standby, epoch, VIPs), a
/// row per node entry (role, state, epoch, acknowledged epoch, fail count),
/// a standing move request, and notable conditions.
pub fn service(s: &HAService) -> String {
    let status = s.status.clone().unwrap_or_default();
    let mut out = format!(
        "HAService {}/{} (cluster {}): phase {}, active {}, standby {}, epoch {}, VIPs {}\n",
        s.namespace().unwrap_or_default(),
        s.name_any(),
        s.spec.cluster_ref,
        or_dash(status.phase.map(|p| format!("{p:?}"))),
        or_dash(status.active_node.as_ref()),
        or_dash(status.standby_node.as_ref()),
        or_dash(status.epoch),
        or_dash(status.vips.as_ref()),
    );
    if !status.nodes.is_empty() {
        let mut rows = vec![vec![
            "NODE".to_owned(),
            "ROLE".to_owned(),
            "STATE".to_owned(),
            "EPOCH".to_owned(),
            "ACKED".to_owned(),
            "FAILS".to_owned(),
        ]];
        // By node name: the entries stand in the order the agents first
        // reported.
        let mut entries: Vec<_> = status.nodes.iter().collect();
        entries.sort_by(|a, b| a.node.cmp(&b.node));
        for e in entries {
            rows.push(vec![
                e.node.clone(),
                role_name(e.role).to_owned(),
                format!("{:?}", e.state),
                or_dash(e.epoch),
                or_dash(e.acked_epoch),
                e.fail_count.to_string(),
            ]);
        }
        out.push_str(&table(&rows, 2));
    }
    if let Some(to) = s.annotations().get(annotations::MOVE_TO) {
        out.push_str(&format!(
            "  move request: {}={to} (stays until removed: kubectl ha clear {} -n {})\n",
            annotations::MOVE_TO,
            s.name_any(),
            s.namespace().unwrap_or_default()
        ));
    }
    out.push_str(&conditions(&status.conditions, 2));
    out
}

/// The whole status: every cluster, then every service (callers filter).
pub fn status(clusters: &[HACluster], services: &[HAService]) -> String {
    let mut out = String::new();
    for c in clusters {
        out.push_str(&cluster(c));
    }
    if clusters.is_empty() {
        out.push_str("no HACluster found\n");
    }
    if services.is_empty() {
        out.push_str("no HAService found\n");
    }
    for s in services {
        out.push_str(&service(s));
    }
    out
}

/// Whether `s` needs attention, which makes `kubectl ha status` exit 3:
/// phase Errored, or condition Degraded True.
pub fn needs_attention(s: &HAService) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.phase == Some(kubeha_crds::service::Phase::Errored)
            || st
                .conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True")
    })
}

/// The objects as `kubectl get -o json` prints several: a `v1` `List`
/// whose items are the clusters then the services, without
/// `metadata.managedFields` (kubectl hides them too).
pub fn list(clusters: &[HACluster], services: &[HAService]) -> serde_json::Value {
    fn item(obj: impl serde::Serialize) -> serde_json::Value {
        let mut v = serde_json::to_value(obj).unwrap_or(serde_json::Value::Null);
        if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
        }
        v
    }
    let items: Vec<serde_json::Value> = clusters
        .iter()
        .map(item)
        .chain(services.iter().map(item))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster_obj() -> HACluster {
        serde_json::from_value(json!({
            "apiVersion": "kubeha.io/v1alpha1",
            "kind": "HACluster",
            "metadata": {"name": "c"},
            "spec": {
                "members": {"nodes": [
                    {"name": "node-1", "mode": "default"},
                    {"name": "node-2", "mode": "locked"},
                ]},
                "vipPool": ["198.18.0.96/28"],
            },
            "status": {
                "ready": "1/2",
                "state": "default-default",
                "servicesActive": 1,
                "members": [
                    {"node": "node-1", "heartbeat": "Alive", "mode": "default",
                     "roles": [{"service": "ns/zz", "role": "vicemaster"},
                               {"service": "ns/svc", "role": "master"}]},
                    {"node": "node-2", "heartbeat": "Lost", "mode": "default"},
                ],
            },
        }))
        .unwrap()
    }

    fn service_obj() -> HAService {
        serde_json::from_value(json!({
            "apiVersion": "kubeha.io/v1alpha1",
            "kind": "HAService",
            "metadata": {"name": "svc", "namespace": "ns",
                         "annotations": {"kubeha.io/move-to": "node-2"}},
            "spec": {"clusterRef": "c", "vips": [{"address": "198.18.0.100/24"}]},
            "status": {
                "phase": "Active",
                "activeNode": "node-1",
                "epoch": 4,
                "vips": "198.18.0.100/24",
                "nodes": [
                    {"node": "node-2", "role": "none", "state": "Failed", "epoch": 3, "ackedEpoch": 2, "failCount": 1},
                    {"node": "node-1", "role": "master", "state": "Running", "epoch": 4, "failCount": 0},
                ],
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Active", "message": "running",
                     "lastTransitionTime": "2025-01-01T00:00:00Z"},
                    {"type": "Moved", "status": "False", "reason": "TargetNotEligible",
                     "message": "kubeha.io/move-to asks for node-2, but ...",
                     "lastTransitionTime": "2025-01-01T00:00:00Z"},
                ],
            },
        }))
        .unwrap()
    }

    #[test]
    fn cluster_shows_modes_heartbeats_and_roles() {
        let text = cluster(&cluster_obj());
        assert!(
            text.starts_with("HACluster c: state default-default, ready 1/2, services active 1\n"),
            "{text}"
        );
        assert!(text.contains("NODE    MODE"), "{text}");
        let line = |n: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(n))
                .unwrap()
        };
        assert!(line("node-1").contains("Alive"));
        assert!(
            line("node-1").ends_with("ns/svc=master,ns/zz=vicemaster"),
            "roles sorted:\n{text}"
        );
        assert!(line("node-2").contains("locked (in force: default)"));
        assert!(line("node-2").contains("Lost"));
    }

    #[test]
    fn service_shows_phase_entries_move_and_conditions() {
        let text = service(&service_obj());
        assert!(text.starts_with(
            "HAService ns/svc (cluster c): phase Active, active node-1, standby -, epoch 4, VIPs 198.18.0.100/24\n"
        ), "{text}");
        let line = |n: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(n))
                .unwrap()
        };
        let order: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("node-"))
            .collect();
        assert_eq!(order.len(), 2, "{text}");
        assert!(order[0] < order[1], "node entries sorted by name:\n{text}");
        let cells: Vec<&str> = line("node-2").split_whitespace().collect();
        assert_eq!(cells, ["node-2", "none", "Failed", "3", "2", "1"]);
        assert!(
            text.contains("move request: kubeha.io/move-to=node-2"),
            "{text}"
        );
        assert!(
            text.contains("Moved=False TargetNotEligible: kubeha.io/move-to asks for node-2"),
            "{text}"
        );
        assert!(
            !text.contains("Ready=True"),
            "healthy conditions are not shown"
        );
    }

    #[test]
    fn empty_status_says_so() {
        assert_eq!(status(&[], &[]), "no HACluster found\nno HAService found\n");
    }
}
