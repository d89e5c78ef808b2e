//! Hostile cases: identity. A stolen agent token is one node's token: the
//! chart's admission policy (`kubeha-agent-node-identity`, keyed on the
//! token's `authentication.kubernetes.io/node-name`) and RBAC let node-3's
//! token write node-3's heartbeat Leases and node-3's entry of an
//! HAService's `status.nodes`, and nothing else: not another node's entry
//! or heartbeat, not the operator's status fields, service Leases or leader
//! Lease, no delete, no Lease outside the operator's namespace; and a token
//! of the agent's account that names no node writes nothing. Every case
//! runs kubectl inside node-3's namespace with node-3's kubeconfig (the
//! token its agent uses, bound to a Pod on node-3), asserts the API
//! server's refusal text and that the object is unchanged.

use std::io::Write as _;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Case, Ctx, Scenario, service_lease};
use crate::ha;
use crate::lab::{Lab, SYSTEM_NAMESPACE};
use crate::nodes;

/// The node whose token the cases use.
const NODE: u8 = 3;

/// What the API server says when the admission policy refuses a request.
const POLICY_DENIED: &str = "ValidatingAdmissionPolicy 'kubeha-agent-node-identity' with binding 'kubeha-agent-node-identity' denied request";

/// What the API server says when the service Lease policy
/// (rbac.serviceLeasePolicy) refuses a request.
const SERVICE_LEASE_POLICY_DENIED: &str = "ValidatingAdmissionPolicy 'kubeha-service-lease-writer' with binding 'kubeha-service-lease-writer' denied request";

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "identity-status-other-node-entry",
            expected: "node-3's token applies node-1's status.nodes entry (forged ackedEpoch, node-1's field manager): denied by the admission policy (\"may change only its own entry\"), node-1's entry unchanged",
            run: status_other_node_entry,
        },
        Case {
            name: "identity-status-phase",
            expected: "node-3's token applies status.phase Errored and activeNode node-3: denied by the admission policy (\"not the operator's status fields\"), phase and activeNode unchanged",
            run: status_phase,
        },
        Case {
            name: "identity-status-own-entry",
            expected: "node-3's token applies node-3's own status.nodes entry: accepted (the policy is not deny-all), node-1's entry unchanged",
            run: status_own_entry,
        },
        Case {
            name: "identity-service-lease",
            expected: "node-3's token makes itself holder of a service's leadership Lease: denied by the admission policy (\"may write only heartbeat Leases\"), holder unchanged",
            run: service_lease_write,
        },
        Case {
            name: "identity-admin-service-lease",
            expected: "the cluster admin's kubectl patch makes node-2 holder of the active service's Lease with a matching kubeha.io/enter-epoch: denied by the service Lease policy (\"written only by the kubeha operator\"), the Lease unchanged, the VIP still on the active node alone",
            run: admin_service_lease_patch,
        },
        Case {
            name: "identity-heartbeat-other-node",
            expected: "node-3's token applies node-1's heartbeat Lease (renewTime an hour ahead): denied by the admission policy (\"may write only its own heartbeat Leases\"), node-1's Lease not renewed by it",
            run: heartbeat_other_node,
        },
        Case {
            name: "identity-heartbeat-fake-node",
            expected: "node-3's token creates a labelled heartbeat Lease for node-9, no member and no node: denied by the admission policy, no such Lease",
            run: heartbeat_fake_node,
        },
        Case {
            name: "identity-heartbeat-renamed",
            expected: "node-3's token writes a Lease labelled as node-3's heartbeat under node-1's heartbeat name (denied by the admission policy: the Lease is node-1's), and under the old colliding name kubeha-hb-<cluster>-node-3 (denied: \"only under the name kubeha-hb-<cluster>.<node>\"): node-1's Lease unchanged, no Lease of the old name",
            run: heartbeat_renamed,
        },
        Case {
            name: "identity-leader-lease",
            expected: "node-3's token makes itself holder of the operator's leader Lease: denied by the admission policy, holder unchanged",
            run: leader_lease,
        },
        Case {
            name: "identity-lease-delete",
            expected: "node-3's token deletes node-1's heartbeat Lease and its own: denied (RBAC: no delete on Leases), both Leases still there",
            run: lease_delete,
        },
        Case {
            name: "identity-lease-outside-namespace",
            expected: "node-3's token creates a heartbeat-labelled Lease in the service namespace: denied (RBAC: Leases only in the operator's namespace), no such Lease",
            run: lease_outside_namespace,
        },
        Case {
            name: "identity-unbound-token",
            expected: "a token of the agent's service account bound to no Pod (no node-name claim) applies node-3's own heartbeat: denied by the admission policy (\"names no node\"), the Lease not renewed by it",
            run: unbound_token,
        },
        Case {
            name: "identity-heartbeat-own",
            expected: "node-3's token applies node-3's own heartbeat Lease: accepted (the policy is not deny-all)",
            run: heartbeat_own,
        },
    ]
}

/// Runs kubectl `args` as lab node `i`'s agent (its namespace, its
/// kubeconfig), with `stdin` as the input when given; `token` replaces the
/// kubeconfig's token.
fn kubectl_as_node(
    lab: &Lab,
    i: u8,
    token: Option<&str>,
    args: &[&str],
    stdin: Option<&Value>,
) -> anyhow::Result<Output> {
    let mut cmd = lab.node_kubectl(i)?;
    if let Some(t) = token {
        cmd.arg(format!("--token={t}"));
    }
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running kubectl as a node")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("kubectl's stdin")?
            .write_all(input.to_string().as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Server-side apply of `object` as node `i`'s agent would send it (field
/// manager `manager`, conflicts forced), to the status subresource when
/// `status`.
fn apply_as_node(
    lab: &Lab,
    i: u8,
    token: Option<&str>,
    manager: &str,
    status: bool,
    object: &Value,
) -> anyhow::Result<Output> {
    let manager = format!("--field-manager={manager}");
    let mut args = vec!["apply", "--server-side", "--force-conflicts", &manager];
    if status {
        args.push("--subresource=status");
    }
    args.extend(["-f", "-"]);
    kubectl_as_node(lab, i, token, &args, Some(object))
}

/// Server-side apply of Lease `object` with [`NODE`]'s token under its
/// agent's field manager.
fn apply_lease_as_node(lab: &Lab, object: &Value) -> anyhow::Result<Output> {
    apply_as_node(lab, NODE, None, &agent_manager(NODE), false, object)
}

/// The refusal text of `out`; an error when the request was accepted or
/// refused without every one of `expected` in the text.
fn refused(out: &Output, expected: &[&str]) -> anyhow::Result<String> {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if out.status.success() {
        bail!(
            "the API server accepted it: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    if let Some(missing) = expected.iter().find(|e| !stderr.contains(**e)) {
        bail!("refused, but not with {missing:?}: {stderr}");
    }
    Ok(stderr)
}

/// A refusal by the admission policy, naming `because`.
fn refused_by_policy(out: &Output, because: &str) -> anyhow::Result<String> {
    refused(out, &[POLICY_DENIED, because])
}

/// The agent's field manager on node `i`.
fn agent_manager(i: u8) -> String {
    format!("kubeha-agent-{}", nodes::node_name(i))
}

/// Name of node `i`'s heartbeat Lease of `cluster`.
fn heartbeat_name(cluster: &str, i: u8) -> String {
    heartbeat_name_of(cluster, &nodes::node_name(i))
}

fn heartbeat_name_of(cluster: &str, node: &str) -> String {
    format!("kubeha-hb-{cluster}.{node}")
}

/// A heartbeat Lease of `node` in `cluster` named `name`, holder `node`,
/// renewed at `renew_time`, as an agent applies it.
fn heartbeat(name: &str, cluster: &str, node: &str, renew_time: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": SYSTEM_NAMESPACE,
            "labels": {
                "kubeha.io/lease": "heartbeat",
                "kubeha.io/cluster": cluster,
                "kubeha.io/node": node,
            },
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": 3,
            "renewTime": renew_time,
        },
    })
}

/// A `renewTime` an hour from now, which no agent writes.
fn an_hour_ahead() -> String {
    let t = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    t.strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}

/// `renewTime` now.
fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

/// Lease `name` of the operator's namespace, `None` when absent.
fn lease(lab: &Lab, name: &str) -> anyhow::Result<Option<Value>> {
    let out = lab.kubectl_output(&[
        "get",
        "lease",
        name,
        "-n",
        SYSTEM_NAMESPACE,
        "-o",
        "json",
        "--ignore-not-found",
    ])?;
    if !out.status.success() {
        bail!(
            "kubectl get lease {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&text)?))
}

/// HACluster `name` of nodes 1..=3, its members' heartbeats renewed (ready
/// 3/3), removed when dropped.
struct Cluster<'a> {
    lab: &'a Lab,
    name: String,
}

impl<'a> Cluster<'a> {
    fn up(ctx: &Ctx<'a>, name: &str) -> anyhow::Result<Cluster<'a>> {
        let lab = ctx.lab;
        ha::delete(lab, "hacluster", name, None);
        ha::apply(lab, &ha::cluster(name, &[1, 2, 3], ha::Timing::DEFAULT))?;
        let cluster = Cluster {
            lab,
            name: name.to_owned(),
        };
        if ha::wait_until(Duration::from_secs(30), || ha::members_ready(lab, name, 3)).is_none() {
            bail!("cluster {name} never had 3/3 members ready");
        }
        Ok(cluster)
    }

    /// Node `i`'s heartbeat Lease, which its agent renews.
    fn heartbeat(&self, i: u8) -> anyhow::Result<Value> {
        let name = heartbeat_name(&self.name, i);
        lease(self.lab, &name)?.with_context(|| format!("no heartbeat Lease {name}"))
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        ha::delete(self.lab, "hacluster", &self.name, None);
    }
}

/// An Active service on nodes 1, [`NODE`] and 2 in this order (node-1
/// master, node-3 vicemaster: only those two have a status entry), both
/// entries written by their agents.
fn service_with_entries<'a>(ctx: &'a Ctx, name: &str, vip: &str) -> anyhow::Result<Scenario<'a>> {
    let scenario = ctx.active_service(name, vip, &[1, NODE, 2])?;
    if ha::wait_until(Duration::from_secs(20), || {
        !ha::node_entry(ctx.lab, name, 1).is_null()
            && !ha::node_entry(ctx.lab, name, NODE).is_null()
    })
    .is_none()
    {
        bail!(
            "{name}: no status entry of node-1 and node-{NODE}: {}",
            scenario.status()
        );
    }
    Ok(scenario)
}

/// An HAService apply body of service `name` with `status`.
fn status_body(name: &str, status: Value) -> Value {
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "metadata": {"name": name, "namespace": ha::SERVICE_NAMESPACE},
        "status": status,
    })
}

/// Server-side apply of `status` to HAService `name`'s status with
/// [`NODE`]'s token, under the field manager of node `manager`'s agent.
fn apply_status_as_node(
    lab: &Lab,
    manager: u8,
    name: &str,
    status: Value,
) -> anyhow::Result<Output> {
    apply_as_node(
        lab,
        NODE,
        None,
        &agent_manager(manager),
        true,
        &status_body(name, status),
    )
}

/// Fails unless node `i`'s entry of service `name` is still `before`
/// (entries of a steady Active service do not change on their own).
fn entry_unchanged(lab: &Lab, name: &str, i: u8, before: &Value) -> anyhow::Result<()> {
    let after = ha::node_entry(lab, name, i);
    if &after != before {
        bail!("node-{i}'s entry changed: {before} -> {after}");
    }
    Ok(())
}

fn status_other_node_entry(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-identity-other-entry";
    let scenario = service_with_entries(ctx, name, "198.18.0.97")?;
    let before = ha::node_entry(ctx.lab, name, 1);
    let mut forged = before.clone();
    forged["ackedEpoch"] = json!(before["ackedEpoch"].as_i64().unwrap_or(0) + 5);
    forged["state"] = json!("Stopped");
    let out = apply_status_as_node(ctx.lab, 1, name, json!({"nodes": [forged]}))?;
    let text = refused_by_policy(&out, "may change only its own entry (node node-3)")?;
    entry_unchanged(ctx.lab, name, 1, &before)?;
    scenario.finish()?;
    Ok(format!("{text}; node-1's entry unchanged ({before})"))
}

fn status_phase(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-identity-phase";
    let scenario = service_with_entries(ctx, name, "198.18.0.110")?;
    let before = scenario.status();
    let own = ha::node_entry(ctx.lab, name, NODE);
    let out = apply_status_as_node(
        ctx.lab,
        NODE,
        name,
        json!({"phase": "Errored", "activeNode": "node-3", "nodes": [own]}),
    )?;
    let text = refused_by_policy(&out, "not the operator's status fields")?;
    let after = scenario.status();
    if after["phase"] != before["phase"] || after["activeNode"] != before["activeNode"] {
        bail!(
            "phase/activeNode changed: {} {} -> {} {}",
            before["phase"],
            before["activeNode"],
            after["phase"],
            after["activeNode"]
        );
    }
    scenario.finish()?;
    Ok(format!(
        "{text}; phase {} and activeNode {} unchanged",
        after["phase"], after["activeNode"]
    ))
}

fn status_own_entry(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-identity-own-entry";
    let scenario = service_with_entries(ctx, name, "198.18.0.99")?;
    let other = ha::node_entry(ctx.lab, name, 1);
    let own = ha::node_entry(ctx.lab, name, NODE);
    let out = apply_status_as_node(ctx.lab, NODE, name, json!({"nodes": [own]}))?;
    if !out.status.success() {
        bail!(
            "node-3's own entry was refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    entry_unchanged(ctx.lab, name, 1, &other)?;
    scenario.finish()?;
    Ok(format!(
        "accepted: {}; node-1's entry unchanged",
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}

fn service_lease_write(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-identity-service-lease";
    let scenario = ctx.active_service(name, "198.18.0.113", &[1, 2, 3])?;
    let before = service_lease(ctx.lab, name)?;
    let out = apply_lease_as_node(
        ctx.lab,
        &json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": before.name, "namespace": before.namespace},
            "spec": {"holderIdentity": nodes::node_name(NODE)},
        }),
    )?;
    let text = refused_by_policy(&out, "may write only heartbeat Leases")?;
    let after = service_lease(ctx.lab, name)?;
    if after.holder() != before.holder() {
        bail!(
            "the service Lease's holder changed: {:?} -> {:?}",
            before.holder(),
            after.holder()
        );
    }
    scenario.finish()?;
    Ok(format!(
        "{text}; holder still {}",
        after.holder().unwrap_or("(none)")
    ))
}

/// A hand edit of a service Lease by the cluster admin would move the
/// service around the operator's handover; the chart's service Lease
/// policy lets only the operator's account write one.
fn admin_service_lease_patch(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-identity-admin-service-lease";
    let scenario = ctx.active_service(name, "198.18.0.131", &[1, 2, 3])?;
    let before = service_lease(ctx.lab, name)?;
    let epoch = before.epoch() + 1;
    let patch = json!({
        "metadata": {"annotations": {"kubeha.io/enter-epoch": epoch.to_string()}},
        "spec": {"holderIdentity": nodes::node_name(2), "leaseTransitions": epoch},
    });
    let out = ctx
        .lab
        .kubectl()
        .args([
            "patch",
            "lease",
            &before.name,
            "-n",
            &before.namespace,
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ])
        .output()?;
    let text = refused(
        &out,
        &[
            SERVICE_LEASE_POLICY_DENIED,
            "service and claim Leases are written only by the kubeha operator (system:serviceaccount:kubeha-system:kubeha-operator)",
            "kubectl ha move",
        ],
    )?;
    let after = service_lease(ctx.lab, name)?;
    let enter_epoch = |l: &super::ServiceLease| {
        l.object["metadata"]["annotations"]["kubeha.io/enter-epoch"].clone()
    };
    if after.holder() != before.holder()
        || after.epoch() != before.epoch()
        || enter_epoch(&after) != enter_epoch(&before)
    {
        bail!(
            "the service Lease changed: holder {:?} -> {:?}, epoch {} -> {}, enter-epoch {} -> {}",
            before.holder(),
            after.holder(),
            before.epoch(),
            after.epoch(),
            enter_epoch(&before),
            enter_epoch(&after)
        );
    }
    let holders = ha::vip_holders(&scenario.vip);
    if holders != [scenario.active] {
        bail!(
            "after the refused patch {} is held by {holders:?}, not node-{} alone",
            scenario.vip,
            scenario.active
        );
    }
    scenario.finish()?;
    Ok(format!(
        "{text}; holder still {}, epoch {}",
        after.holder().unwrap_or("(none)"),
        after.epoch()
    ))
}

fn heartbeat_other_node(ctx: &Ctx) -> anyhow::Result<String> {
    let cluster = Cluster::up(ctx, "hostile-identity-hb-other")?;
    let name = heartbeat_name(&cluster.name, 1);
    let forged_time = an_hour_ahead();
    let out = apply_as_node(
        ctx.lab,
        NODE,
        None,
        &agent_manager(1),
        false,
        &heartbeat(&name, &cluster.name, "node-1", &forged_time),
    )?;
    let text = refused_by_policy(&out, "may write only its own heartbeat Leases")?;
    let after = cluster.heartbeat(1)?;
    if after["spec"]["renewTime"] == forged_time.as_str() {
        bail!("node-1's heartbeat carries the forged renewTime {forged_time}");
    }
    Ok(format!(
        "{text}; {name} renewed by node-1 only (renewTime {})",
        after["spec"]["renewTime"]
    ))
}

fn heartbeat_fake_node(ctx: &Ctx) -> anyhow::Result<String> {
    let cluster = Cluster::up(ctx, "hostile-identity-hb-fake")?;
    let name = heartbeat_name_of(&cluster.name, "node-9");
    let out = apply_as_node(
        ctx.lab,
        NODE,
        None,
        "kubeha-agent-node-9",
        false,
        &heartbeat(&name, &cluster.name, "node-9", &an_hour_ahead()),
    )?;
    let text = refused_by_policy(&out, "may write only its own heartbeat Leases")?;
    if let Some(l) = lease(ctx.lab, &name)? {
        bail!("the fake heartbeat Lease exists: {l}");
    }
    Ok(format!("{text}; no Lease {name}"))
}

fn heartbeat_renamed(ctx: &Ctx) -> anyhow::Result<String> {
    let cluster = Cluster::up(ctx, "hostile-identity-hb-renamed")?;
    let name = heartbeat_name(&cluster.name, 1);
    let forged_time = an_hour_ahead();
    let out = apply_lease_as_node(
        ctx.lab,
        &heartbeat(&name, &cluster.name, &nodes::node_name(NODE), &forged_time),
    )?;
    let over_node_1 = refused_by_policy(&out, "may write only its own heartbeat Leases")?;
    let after = cluster.heartbeat(1)?;
    let labels = &after["metadata"]["labels"];
    if labels["kubeha.io/node"] != "node-1"
        || after["spec"]["holderIdentity"] != "node-1"
        || after["spec"]["renewTime"] == forged_time.as_str()
    {
        bail!("node-1's heartbeat Lease was rewritten: {after}");
    }
    // The name heartbeats had before, under which clusters `a-b`/node `c`
    // and `a`/`b-c` shared one Lease.
    let dashed = format!("kubeha-hb-{}-{}", cluster.name, nodes::node_name(NODE));
    let out = apply_lease_as_node(
        ctx.lab,
        &heartbeat(
            &dashed,
            &cluster.name,
            &nodes::node_name(NODE),
            &forged_time,
        ),
    )?;
    let dashed_text = refused_by_policy(&out, "only under the name kubeha-hb-<cluster>.<node>")?;
    if let Some(l) = lease(ctx.lab, &dashed)? {
        bail!("a Lease of the old name exists: {l}");
    }
    Ok(format!(
        "{over_node_1}; {name} still node-1's (label, holder, renewTime); {dashed_text}; no Lease {dashed}"
    ))
}

fn leader_lease(ctx: &Ctx) -> anyhow::Result<String> {
    const LEADER: &str = "kubeha-operator-leader";
    let before = lease(ctx.lab, LEADER)?
        .with_context(|| format!("no leader Lease {LEADER} in {SYSTEM_NAMESPACE}"))?;
    let holder = before["spec"]["holderIdentity"].clone();
    let out = apply_lease_as_node(
        ctx.lab,
        &json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEADER, "namespace": SYSTEM_NAMESPACE},
            "spec": {"holderIdentity": nodes::node_name(NODE), "leaseDurationSeconds": 3600},
        }),
    )?;
    let text = refused_by_policy(&out, "may write only heartbeat Leases")?;
    let after = lease(ctx.lab, LEADER)?.context("the leader Lease is gone")?;
    if after["spec"]["holderIdentity"] != holder {
        bail!(
            "the leader Lease's holder changed: {holder} -> {}",
            after["spec"]["holderIdentity"]
        );
    }
    Ok(format!("{text}; holder still {holder}"))
}

fn lease_delete(ctx: &Ctx) -> anyhow::Result<String> {
    let cluster = Cluster::up(ctx, "hostile-identity-delete")?;
    let mut texts = Vec::new();
    for i in [1, NODE] {
        let before = cluster.heartbeat(i)?;
        let name = heartbeat_name(&cluster.name, i);
        let out = kubectl_as_node(
            ctx.lab,
            NODE,
            None,
            &[
                "delete",
                "lease",
                &name,
                "-n",
                SYSTEM_NAMESPACE,
                "--wait=false",
            ],
            None,
        )?;
        texts.push(refused(&out, &["cannot delete resource \"leases\""])?);
        let after = cluster.heartbeat(i)?;
        if after["metadata"]["uid"] != before["metadata"]["uid"]
            || !after["metadata"]["deletionTimestamp"].is_null()
        {
            bail!("{name} was deleted");
        }
    }
    Ok(format!("{}; both Leases still there", texts.join("; ")))
}

fn lease_outside_namespace(ctx: &Ctx) -> anyhow::Result<String> {
    let cluster = "hostile-identity-outside";
    let name = heartbeat_name(cluster, NODE);
    let mut lease = heartbeat(&name, cluster, &nodes::node_name(NODE), &now());
    lease["metadata"]["namespace"] = json!(ha::SERVICE_NAMESPACE);
    let out = apply_lease_as_node(ctx.lab, &lease)?;
    let text = refused(&out, &["cannot", "leases", ha::SERVICE_NAMESPACE])?;
    let left = ctx.lab.kubectl_ok(&[
        "get",
        "lease",
        &name,
        "-n",
        ha::SERVICE_NAMESPACE,
        "--ignore-not-found",
        "-o",
        "name",
    ])?;
    if !left.trim().is_empty() {
        bail!("the Lease was created in {}: {left}", ha::SERVICE_NAMESPACE);
    }
    Ok(format!(
        "{text}; no Lease {name} in {}",
        ha::SERVICE_NAMESPACE
    ))
}

fn unbound_token(ctx: &Ctx) -> anyhow::Result<String> {
    let cluster = Cluster::up(ctx, "hostile-identity-unbound")?;
    let token = ctx.lab.unbound_agent_token()?;
    let name = heartbeat_name(&cluster.name, NODE);
    let forged_time = an_hour_ahead();
    let out = apply_as_node(
        ctx.lab,
        NODE,
        Some(&token),
        &agent_manager(NODE),
        false,
        &heartbeat(&name, &cluster.name, &nodes::node_name(NODE), &forged_time),
    )?;
    let text = refused_by_policy(&out, "token names no node")?;
    let after = cluster.heartbeat(NODE)?;
    if after["spec"]["renewTime"] == forged_time.as_str() {
        bail!("{name} carries the renewTime the unbound token sent");
    }
    Ok(format!("{text}; {name} not renewed by it"))
}

fn heartbeat_own(ctx: &Ctx) -> anyhow::Result<String> {
    let cluster = Cluster::up(ctx, "hostile-identity-hb-own")?;
    let name = heartbeat_name(&cluster.name, NODE);
    let sent = now();
    // Under a field manager of its own: under the agent's, this apply
    // would drop the annotations the agent's last renew set.
    let out = apply_as_node(
        ctx.lab,
        NODE,
        None,
        "kubeha-hostile-identity",
        false,
        &heartbeat(&name, &cluster.name, &nodes::node_name(NODE), &sent),
    )?;
    if !out.status.success() {
        bail!(
            "node-3's own heartbeat was refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(format!(
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ))
}
