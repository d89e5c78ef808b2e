//! Scenario helpers for lab tests and benchmarks: HACluster and HAService
//! manifests, hook scripts on the lab nodes, the service Lease written as the
//! operator would (for the agent tests that run without it), and
//! observing VIPs and GARP frames from the lab's namespaces.

mod capture;
mod network;
mod operated;

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use crate::lab::Lab;
use crate::nodes;

pub use crate::split_brain::{DoubleHolder, MAX_SAMPLE_GAP, Sampled, SplitBrain};
pub use capture::{Capture, Frame, parse_tcpdump};
pub use network::{
    client_reaches, client_tcp_reply, mac_of, node_addresses, vip_holders, vip_on_node,
};
pub use operated::{
    ServiceLease, operator_lab, remove_services_and_cluster, service_lease, wait_active_on,
};

/// Namespace of the test HAServices.
pub const SERVICE_NAMESPACE: &str = "default";
/// Namespace of heartbeat Leases (the operator's).
pub const OPERATOR_NAMESPACE: &str = "kubeha-system";

/// Applies a JSON object with server-side apply (field manager `kubeha-e2e`).
pub fn apply(lab: &Lab, object: &Value) -> anyhow::Result<()> {
    apply_with(lab.kubectl(), object)
}

/// Like [`apply`], as the operator's service account: the only identity
/// the chart's admission policy (rbac.serviceLeasePolicy) lets create or
/// update a service Lease.
pub fn apply_as_operator(lab: &Lab, object: &Value) -> anyhow::Result<()> {
    apply_with(lab.kubectl_as_operator()?, object)
}

/// Server-side apply of `object` with the kubectl command `kubectl`.
fn apply_with(mut kubectl: std::process::Command, object: &Value) -> anyhow::Result<()> {
    let mut child = kubectl
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kubeha-e2e",
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(object.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Deletes an object if it exists.
pub fn delete(lab: &Lab, kind: &str, name: &str, namespace: Option<&str>) {
    let mut args = vec!["delete", kind, name, "--ignore-not-found", "--wait=false"];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    let _ = lab.kubectl_output(&args);
}

/// Deletes HAService `name` in [`SERVICE_NAMESPACE`] and its leadership
/// and claim Leases (the operator deletes them when it releases the
/// finalizer, but a test may run without the operator).
pub fn delete_service(lab: &Lab, name: &str) {
    delete(lab, "haservice", name, Some(SERVICE_NAMESPACE));
    for lease in [
        service_lease_name(name),
        kubeha_crds::leases::claim_lease_name(SERVICE_NAMESPACE, name),
    ] {
        delete(lab, "lease", &lease, Some(OPERATOR_NAMESPACE));
    }
}

/// Name of the leadership Lease (in [`OPERATOR_NAMESPACE`]) of HAService
/// `service` in [`SERVICE_NAMESPACE`].
pub fn service_lease_name(service: &str) -> String {
    format!("kubeha-svc-{SERVICE_NAMESPACE}.{service}")
}

/// The metadata the operator gives `service`'s Lease (name, namespace and
/// labels, the HAService's UID read from the API server), for tests that
/// write the Lease in its place; `annotations` are added.
pub fn service_lease_metadata(
    lab: &Lab,
    service: &str,
    annotations: Value,
) -> anyhow::Result<Value> {
    let svc = lab.kubectl_json(&["get", "haservice", service, "-n", SERVICE_NAMESPACE])?;
    let (uid, cluster) = (&svc["metadata"]["uid"], &svc["spec"]["clusterRef"]);
    Ok(json!({
        "name": service_lease_name(service),
        "namespace": OPERATOR_NAMESPACE,
        "labels": {
            "kubeha.io/lease": "service",
            "kubeha.io/cluster": cluster,
            "kubeha.io/service-namespace": SERVICE_NAMESPACE,
            "kubeha.io/service": service,
            "kubeha.io/service-uid": uid,
        },
        "annotations": annotations,
    }))
}

/// Requests the API server's priority and fairness has dispatched through
/// FlowSchema `flow_schema` since it started (its
/// `apiserver_flowcontrol_dispatched_requests_total`).
pub fn flow_dispatched(lab: &Lab, flow_schema: &str) -> anyhow::Result<f64> {
    let text = lab.kubectl_ok(&["get", "--raw", "/metrics"])?;
    let wanted = format!("flow_schema=\"{flow_schema}\"");
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_dispatched_requests_total{"))
        .filter(|l| l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// `lease` (a service Lease as JSON, written by hand) with the node-scope
/// label of every node it names, as the operator labels it: each agent
/// watches only the service Leases labelled for its node.
pub fn scoped_lease(mut lease: Value) -> Value {
    let parsed: k8s_openapi::api::coordination::v1::Lease =
        serde_json::from_value(lease.clone()).unwrap_or_default();
    for key in kubeha_crds::leases::wanted_scope_labels(&parsed) {
        lease["metadata"]["labels"][key] = json!("true");
    }
    lease
}

/// Shows HAService `namespace/service` to the agents of `nodes` as the
/// operator does, by their node-scope labels `node.kubeha.io/<node>`
/// (each agent watches only the HAServices labelled for its node): for
/// tests and benches that write service Leases by hand. Adds only.
pub fn show_service_to(
    lab: &Lab,
    namespace: &str,
    service: &str,
    nodes: &[&str],
) -> anyhow::Result<()> {
    let labels: Vec<String> = nodes
        .iter()
        .filter(|n| !n.is_empty())
        .map(|n| format!("node.kubeha.io/{n}=true"))
        .collect();
    if labels.is_empty() {
        return Ok(());
    }
    let mut args = vec![
        "label",
        "--overwrite",
        "haservice",
        service,
        "-n",
        namespace,
    ];
    args.extend(labels.iter().map(String::as_str));
    lab.kubectl_ok(&args)?;
    Ok(())
}

/// Heartbeat timing in milliseconds: D, R, RD, skew.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// D.
    pub lease_ms: u32,
    /// R.
    pub renew_ms: u32,
    /// RD.
    pub deadline_ms: u32,
    /// Skew allowance.
    pub skew_ms: u32,
}

impl Timing {
    /// The defaults: D = 3 s, R = 1 s, RD = 2 s, skew 0.1 s.
    pub const DEFAULT: Timing = Timing {
        lease_ms: 3000,
        renew_ms: 1000,
        deadline_ms: 2000,
        skew_ms: 100,
    };
    /// The tight timing the failover benchmark measures beside keepalived
    /// at `advert_int 0.1`: D = 1 s, R = 300 ms, RD = 600 ms, skew 100 ms
    /// (E = 1.1 s; about 3.3 heartbeat writes a second per node; an API
    /// server slower than 300 ms for one renew fences the node). Shorter
    /// still works (D = 600 ms, R = 150 ms, RD = 400 ms, skew 50 ms:
    /// `bench failover --timing 600,150,400,50`).
    pub const TIGHT: Timing = Timing {
        lease_ms: 1000,
        renew_ms: 300,
        deadline_ms: 600,
        skew_ms: 100,
    };
}

/// An HACluster of lab nodes `members` (all in mode default).
pub fn cluster(name: &str, members: &[u8], timing: Timing) -> Value {
    let members: Vec<(u8, &str)> = members.iter().map(|i| (*i, "default")).collect();
    cluster_with_modes(name, &members, timing)
}

/// An HACluster of lab nodes with their modes, `(node, mode)`; services of
/// [`SERVICE_NAMESPACE`] may bind and use any hook directory.
pub fn cluster_with_modes(name: &str, members: &[(u8, &str)], timing: Timing) -> Value {
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HACluster",
        "metadata": {"name": name},
        "spec": {
            "members": {"nodes": members.iter().map(|(i, mode)| json!({"name": nodes::node_name(*i), "mode": mode})).collect::<Vec<_>>()},
            "placement": "Ordered",
            "heartbeat": {
                "leaseDurationMs": timing.lease_ms,
                "renewIntervalMs": timing.renew_ms,
                "renewDeadlineMs": timing.deadline_ms,
                "clockSkewMs": timing.skew_ms
            },
            "startupGraceSeconds": 0,
            "vipPool": ["198.18.0.0/24", "2001:db8::/64"],
            "allowedNamespaces": [SERVICE_NAMESPACE],
            // The tests' namespace may use every hook directory of the lab
            // nodes (each test installs its own).
            "allowedHookSources": {"namespaces": [{"namespace": SERVICE_NAMESPACE, "hostPaths": ["*"]}]}
        }
    })
}

/// An HAService with `vips` and, when `hook_dir` is set, host-path hooks.
pub fn service(
    name: &str,
    cluster: &str,
    vips: &[&str],
    hook_dir: Option<&str>,
    garp: (u32, u32),
) -> Value {
    let mut spec = json!({
        "clusterRef": cluster,
        "vips": vips.iter().map(|v| json!({"address": v})).collect::<Vec<_>>(),
        "garp": {"count": garp.0, "intervalMs": garp.1},
    });
    if let Some(dir) = hook_dir {
        spec["hooks"] = json!({"source": {"hostPath": dir}, "timeoutSeconds": 5});
    }
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "metadata": {"name": name, "namespace": SERVICE_NAMESPACE},
        "spec": spec
    })
}

/// Writes the service Lease as the operator does: holder and epoch, cleared
/// for entry (`enter-epoch`) or not, and the standby node.
pub fn set_service_lease(
    lab: &Lab,
    service: &str,
    holder: Option<&str>,
    epoch: i32,
    cleared: bool,
    standby: Option<&str>,
) -> anyhow::Result<()> {
    let mut annotations = serde_json::Map::new();
    if cleared {
        annotations.insert("kubeha.io/enter-epoch".into(), json!(epoch.to_string()));
    } else {
        annotations.insert("kubeha.io/enter-epoch".into(), json!("-1"));
    }
    annotations.insert("kubeha.io/standby".into(), json!(standby.unwrap_or("")));
    show_service_to(
        lab,
        SERVICE_NAMESPACE,
        service,
        &[holder.unwrap_or(""), standby.unwrap_or("")],
    )?;
    apply_as_operator(
        lab,
        &scoped_lease(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": service_lease_metadata(lab, service, Value::Object(annotations))?,
            "spec": {"holderIdentity": holder.unwrap_or(""), "leaseTransitions": epoch}
        })),
    )
}

/// The hook root of lab node `i`.
pub fn hook_root(lab: &Lab, i: u8) -> PathBuf {
    lab.dir()
        .join("nodes")
        .join(nodes::node_name(i))
        .join("hooks")
}

/// Installs hook scripts `(file name, body)` into `<hook root of i>/<dir>`
/// ([`write_scripts`]).
pub fn install_hooks(
    lab: &Lab,
    i: u8,
    dir: &str,
    scripts: &[(&str, &str)],
) -> anyhow::Result<PathBuf> {
    let path = hook_root(lab, i).join(dir);
    write_scripts(&path, scripts)?;
    Ok(path)
}

/// Writes hook scripts `(file name, body)` into the folder `path`,
/// root-owned, mode 0755 (as the agent requires), replacing the folder.
pub fn write_scripts(path: &std::path::Path, scripts: &[(&str, &str)]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path)?;
    for (name, body) in scripts {
        let file = path.join(name);
        std::fs::write(&file, body)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// A hook script that appends `NAME ACTION ROLE transition=... epoch=...`
/// to `trace` and exits with `code`.
pub fn tracing_script(trace: &std::path::Path, code: i32) -> String {
    format!(
        "#!/bin/sh\necho \"$(basename \"$0\") $1 $2 transition=$KUBEHA_TRANSITION epoch=$KUBEHA_EPOCH node=$KUBEHA_NODE \
         service=$KUBEHA_SERVICE vips=$KUBEHA_VIPS\" >> {}\necho \"ran $(basename \"$0\") $1 $2\"\nexit {code}\n",
        trace.display()
    )
}

/// `kubectl get haservices` in [`SERVICE_NAMESPACE`], printed as `output`
/// (`-o`) says.
pub fn get_services(lab: &Lab, output: &str) -> anyhow::Result<String> {
    lab.kubectl_ok(&["get", "haservices", "-n", SERVICE_NAMESPACE, "-o", output])
}

/// `status` of HAService `name` in [`SERVICE_NAMESPACE`] (null when absent).
pub fn service_status(lab: &Lab, name: &str) -> Value {
    lab.kubectl_ok(&[
        "get",
        "haservice",
        name,
        "-n",
        SERVICE_NAMESPACE,
        "-o",
        "json",
    ])
    .ok()
    .and_then(|out| serde_json::from_str::<Value>(&out).ok())
    .map(|v| v["status"].clone())
    .unwrap_or_default()
}

/// The lab node the status of `service` calls active, when its phase is
/// Active and exactly that node holds `vip`.
pub fn active_node(lab: &Lab, service: &str, vip: &str) -> Option<u8> {
    let status = service_status(lab, service);
    let active = status["activeNode"].as_str().and_then(nodes::node_index)?;
    (status["phase"] == "Active" && vip_holders(vip) == [active]).then_some(active)
}

/// Whether HACluster `cluster` reports all `members` heartbeating
/// (`status.ready` is `members/members`).
pub fn members_ready(lab: &Lab, cluster: &str, members: u8) -> bool {
    lab.kubectl_ok(&[
        "get",
        "hacluster",
        cluster,
        "-o",
        "jsonpath={.status.ready}",
    ])
    .is_ok_and(|r| r.trim() == format!("{members}/{members}"))
}

/// `kubectl ha move SERVICE --to node-I --wait 0` for a service in
/// [`SERVICE_NAMESPACE`]: asks for the move and returns at once.
pub fn request_move(lab: &Lab, service: &str, i: u8) -> anyhow::Result<String> {
    lab.kubectl_ha_ok(&[
        "--wait",
        "0",
        "move",
        service,
        "--to",
        &nodes::node_name(i),
        "-n",
        SERVICE_NAMESPACE,
    ])
}

/// Node `i`'s entry in the status of service `service` (null when absent).
pub fn node_entry(lab: &Lab, service: &str, i: u8) -> Value {
    service_status(lab, service)["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|e| e["node"] == nodes::node_name(i)).cloned())
        .unwrap_or_default()
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns the
/// time it took, or `None`.
pub fn wait_until(timeout: Duration, f: impl FnMut() -> bool) -> Option<Duration> {
    wait_every(timeout, Duration::from_millis(20), f)
}

/// [`wait_until`] polling every `interval` (for a costly `f`, such as a
/// kubectl call).
pub fn wait_every(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(interval);
    }
    None
}

/// The agent's status file of lab node `i`, parsed.
pub fn agent_status(lab: &Lab, i: u8) -> Option<Value> {
    let path = lab
        .dir()
        .join("nodes")
        .join(nodes::node_name(i))
        .join("run")
        .join("status.json");
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Sum of every sample of `metric` (any labels) on operator replica `r`
/// (0 when it does not answer).
pub fn operator_metric(r: u8, metric: &str) -> f64 {
    let (_, body) =
        crate::lab::http_get(&Lab::operator_metrics_addr(r), "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits up to 10 s until the reasons of the Events about object `name` in
/// `namespace` satisfy `done` (the operator sends its Events from a queue,
/// after the writes they tell of); else the reasons last seen.
pub fn wait_event_reasons(
    lab: &Lab,
    namespace: &str,
    name: &str,
    done: impl Fn(&[String]) -> bool,
) -> Result<(), Vec<String>> {
    let mut seen = Vec::new();
    let found = wait_every(Duration::from_secs(10), Duration::from_millis(250), || {
        seen = events_about(lab, namespace, name)
            .into_iter()
            .map(|(reason, _)| reason)
            .collect();
        done(&seen)
    });
    found.map(|_| ()).ok_or(seen)
}

/// Whether `reasons` has `reason`.
pub fn has_reason(reasons: &[String], reason: &str) -> bool {
    reasons.iter().any(|r| r == reason)
}

/// `(reason, message)` of every Event about object `name` in `namespace`.
pub fn events_about(lab: &Lab, namespace: &str, name: &str) -> Vec<(String, String)> {
    lab.kubectl_json(&[
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        &format!("involvedObject.name={name}"),
    ])
    .ok()
    .and_then(|v| v["items"].as_array().cloned())
    .unwrap_or_default()
    .iter()
    .map(|e| {
        (
            e["reason"].as_str().unwrap_or_default().to_owned(),
            e["message"].as_str().unwrap_or_default().to_owned(),
        )
    })
    .collect()
}
