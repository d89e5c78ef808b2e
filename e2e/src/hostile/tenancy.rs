//! Hostile cases: tenancy. A namespace the cluster admin never allowed, a
//! VIP another service holds or outside the pool, and service Leases
//! forged where a tenant can write (its own namespace) or written for
//! another HAService. Several cases stop the operator first, so that only
//! the agents' own checks stand between the forged Lease and the node:
//! either side alone must keep a forged assignment out.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Case, Ctx, events_about, single_holder_through};
use crate::ha;
use crate::lab::{Lab, StopSignal};

/// A namespace no lab cluster allows.
const TENANT: &str = "hostile-tenant";
/// How long a forged assignment is watched for an address or a hook run.
const WATCH: Duration = Duration::from_secs(8);

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "tenancy-namespace-not-allowed-forged-lease-operator-down",
            expected: "a service in a namespace not in allowedNamespaces, with a hand-written Lease in the operator's namespace clearing node-1 (operator stopped): no address and no hook run on any node; node-1's agent refuses with an AssignmentRefused Event naming spec.allowedNamespaces",
            run: namespace_not_allowed_operator_down,
        },
        Case {
            name: "tenancy-namespace-not-allowed-forged-lease-operator-up",
            expected: "the same forged Lease with the operator running: the service reports the namespace refusal in its status, no address and no hook run on any node",
            run: namespace_not_allowed_operator_up,
        },
        Case {
            name: "tenancy-lease-in-tenant-namespace-ignored",
            expected: "a Lease at the old place (the service's own namespace) naming node-2 cleared at epoch 99: ignored, the VIP stays on the active node alone, node-2 runs nothing",
            run: lease_in_tenant_namespace,
        },
        Case {
            name: "tenancy-vip-claimed-forged-lease-operator-down",
            expected: "a second service claiming an Active service's VIP, its forged Lease clearing node-2 (operator stopped): node-2 refuses (AssignmentRefused naming the older claim), the VIP never on two nodes",
            run: vip_claimed_operator_down,
        },
        Case {
            name: "tenancy-vip-outside-pool-forged-lease-operator-down",
            expected: "a service whose VIP is outside the cluster's vipPool, its forged Lease clearing node-1 (operator stopped): no address anywhere, AssignmentRefused naming spec.vipPool",
            run: vip_outside_pool_operator_down,
        },
        Case {
            name: "tenancy-lease-for-another-uid-operator-down",
            expected: "a Lease with the right name but another HAService UID clearing node-1 (operator stopped, e.g. left from a service deleted and created again): no address, no hook, AssignmentRefused saying the Lease names another HAService",
            run: lease_for_another_uid_operator_down,
        },
    ]
}

/// A service named `name` in `namespace` on cluster `cluster`, with
/// tracing host-path hooks from folder `name`, and the trace file they
/// append to (absent until a hook runs).
struct Tenant<'a> {
    lab: &'a Lab,
    name: String,
    namespace: String,
    cluster: String,
    vip: String,
    trace: PathBuf,
}

impl<'a> Tenant<'a> {
    /// Creates cluster `cluster` (nodes 1..=3, lab defaults: only the
    /// service namespace allowed), the hooks and the service; waits until
    /// the cluster has its members ready.
    fn create(
        lab: &'a Lab,
        name: &str,
        namespace: &str,
        cluster: &str,
        vip: &str,
    ) -> anyhow::Result<Self> {
        let trace = lab.dir().join(format!("{name}.trace"));
        let _ = std::fs::remove_file(&trace);
        for i in 1..=3 {
            ha::install_hooks(
                lab,
                i,
                name,
                &[("E01trace", &ha::tracing_script(&trace, 0))],
            )?;
        }
        if namespace != ha::SERVICE_NAMESPACE {
            let _ = lab.kubectl_output(&["create", "namespace", namespace]);
        }
        let existing = lab
            .kubectl_output(&["get", "hacluster", cluster])
            .is_ok_and(|o| o.status.success());
        if !existing {
            ha::apply(lab, &ha::cluster(cluster, &[1, 2, 3], ha::Timing::DEFAULT))?;
        }
        if ha::wait_until(Duration::from_secs(30), || {
            ha::members_ready(lab, cluster, 3)
        })
        .is_none()
        {
            bail!("cluster {cluster} never had 3/3 members ready");
        }
        let mut svc = ha::service(name, cluster, &[&format!("{vip}/24")], Some(name), (3, 100));
        svc["metadata"]["namespace"] = json!(namespace);
        ha::apply(lab, &svc)?;
        Ok(Self {
            lab,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            cluster: cluster.to_owned(),
            vip: vip.to_owned(),
            trace,
        })
    }

    /// The service's UID.
    fn uid(&self) -> anyhow::Result<String> {
        let uid = self.lab.kubectl_ok(&[
            "get",
            "haservice",
            &self.name,
            "-n",
            &self.namespace,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?;
        Ok(uid.trim().to_owned())
    }

    /// Writes the service Lease the operator would write to clear lab node
    /// `node` at `epoch`: in the operator's namespace (labelled with `uid`)
    /// as the operator's own identity, the only one the chart's service
    /// Lease policy lets write there (a compromised or buggy operator: the
    /// agent's own checks must refuse it); or, when `in_tenant_namespace`,
    /// at the old place in the service's own namespace as the cluster admin
    /// (the operator has no Lease access there). Either way the service is
    /// labelled for `node`'s agent first, so that agent sees it.
    fn forge(
        &self,
        node: u8,
        epoch: i64,
        uid: &str,
        in_tenant_namespace: bool,
    ) -> anyhow::Result<()> {
        let (name, namespace) = if in_tenant_namespace {
            (format!("kubeha-svc-{}", self.name), self.namespace.clone())
        } else {
            (
                format!("kubeha-svc-{}.{}", self.namespace, self.name),
                ha::OPERATOR_NAMESPACE.to_owned(),
            )
        };
        let write = if in_tenant_namespace {
            ha::apply
        } else {
            ha::apply_as_operator
        };
        // Show the service to the node's agent as the operator would (its
        // node-scope label; a compromised operator writes that too): the
        // agent's own checks, not its watch selection, must refuse.
        ha::show_service_to(
            self.lab,
            &self.namespace,
            &self.name,
            &[&crate::nodes::node_name(node)],
        )?;
        // Labelled for the node it names, as the operator labels a Lease:
        // each agent watches only the service Leases labelled for it.
        write(
            self.lab,
            &ha::scoped_lease(json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {
                        "kubeha.io/lease": "service",
                        "kubeha.io/cluster": self.cluster,
                        "kubeha.io/service-namespace": self.namespace,
                        "kubeha.io/service": self.name,
                        "kubeha.io/service-uid": uid,
                    },
                    "annotations": {
                        "kubeha.io/enter-epoch": epoch.to_string(),
                        "kubeha.io/standby": "",
                    },
                },
                "spec": {
                    "holderIdentity": crate::nodes::node_name(node),
                    "leaseTransitions": epoch,
                },
            })),
        )
    }

    /// Fails if during [`WATCH`] any node holds the VIP or any hook runs.
    fn nothing_runs(&self) -> anyhow::Result<()> {
        let held = ha::wait_every(WATCH, Duration::from_millis(100), || {
            !ha::vip_holders(&self.vip).is_empty() || self.trace.exists()
        });
        if held.is_some() {
            bail!(
                "the forged assignment ran: {} held by {:?}, hook trace {:?}",
                self.vip,
                ha::vip_holders(&self.vip),
                std::fs::read_to_string(&self.trace).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The message of the first `AssignmentRefused` Event about the
    /// service, waiting up to 10 s for it.
    fn refusal(&self) -> anyhow::Result<String> {
        let mut found = None;
        ha::wait_every(Duration::from_secs(10), Duration::from_millis(250), || {
            found = events_about(self.lab, &self.namespace, &self.name)
                .into_iter()
                .find(|(reason, _)| reason == "AssignmentRefused")
                .map(|(_, message)| message);
            found.is_some()
        });
        found.context("no AssignmentRefused Event about the service within 10 s")
    }

    /// Forges a Lease labelled `uid` clearing node-1 while the operator is
    /// stopped (`_stopped`) and checks that nothing runs and node-1's agent
    /// refuses, naming `must_name`: the refusal.
    fn refused(
        &self,
        _stopped: &OperatorStopped,
        uid: &str,
        must_name: &str,
    ) -> anyhow::Result<String> {
        self.forge(1, 1, uid, false)?;
        self.nothing_runs()?;
        let why = self.refusal()?;
        // The refusal is in node-1's status entry too.
        let mut entry = Value::Null;
        ha::wait_every(Duration::from_secs(10), Duration::from_millis(250), || {
            entry = self
                .lab
                .kubectl_json(&["get", "haservice", &self.name, "-n", &self.namespace])
                .ok()
                .and_then(|v| {
                    v["status"]["nodes"]
                        .as_array()?
                        .iter()
                        .find(|e| e["node"] == "node-1")
                        .cloned()
                })
                .unwrap_or(Value::Null);
            entry["refused"]
                .as_str()
                .is_some_and(|r| r.contains(must_name))
        })
        .with_context(|| format!("node-1's status entry never carried the refusal: {entry}"))?;
        if !why.contains(must_name) {
            bail!("the refusal does not name {must_name}: {why}");
        }
        Ok(format!(
            "no address, no hook for {} s; node-1 refused: {why}",
            WATCH.as_secs()
        ))
    }

    /// Deletes the service, its Leases (both places) and, when `cluster`,
    /// the cluster; the VIP must be free afterwards.
    fn remove(&self, cluster: bool) -> anyhow::Result<()> {
        ha::delete(self.lab, "haservice", &self.name, Some(&self.namespace));
        ha::delete(
            self.lab,
            "lease",
            &format!("kubeha-svc-{}.{}", self.namespace, self.name),
            Some(ha::OPERATOR_NAMESPACE),
        );
        ha::delete(
            self.lab,
            "lease",
            &format!("kubeha-svc-{}", self.name),
            Some(&self.namespace),
        );
        if cluster {
            ha::delete(self.lab, "hacluster", &self.cluster, None);
        }
        if ha::wait_until(Duration::from_secs(20), || {
            ha::vip_holders(&self.vip).is_empty()
        })
        .is_none()
        {
            bail!("{} still held after the case", self.vip);
        }
        Ok(())
    }
}

/// Stops operator replica 0 until dropped (then starts it again).
struct OperatorStopped<'a>(&'a Lab);

impl<'a> OperatorStopped<'a> {
    fn new(lab: &'a Lab) -> anyhow::Result<Self> {
        lab.stop_operator(0, StopSignal::Term)?;
        Ok(Self(lab))
    }
}

impl Drop for OperatorStopped<'_> {
    fn drop(&mut self) {
        if !self.0.operator_running(0)
            && let Err(e) = self.0.start_operator(0, &[])
        {
            eprintln!("operator replica 0 did not start again: {e:#}");
        }
    }
}

/// Runs `body` on a fresh [`Tenant`] and removes it whatever happened.
fn with_tenant(
    lab: &Lab,
    name: &str,
    namespace: &str,
    vip: &str,
    body: impl FnOnce(&Tenant) -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let tenant = Tenant::create(lab, name, namespace, name, vip)?;
    let result = body(&tenant);
    let removed = tenant.remove(true);
    let outcome = result?;
    removed?;
    Ok(outcome)
}

fn namespace_not_allowed_operator_down(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    with_tenant(
        lab,
        "hostile-tenancy-ns-down",
        TENANT,
        "198.18.0.120",
        |t| {
            let stopped = OperatorStopped::new(lab)?;
            t.refused(&stopped, &t.uid()?, "spec.allowedNamespaces")
        },
    )
}

fn namespace_not_allowed_operator_up(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    with_tenant(lab, "hostile-tenancy-ns-up", TENANT, "198.18.0.121", |t| {
        let uid = t.uid()?;
        t.forge(1, 1, &uid, false)?;
        t.nothing_runs()?;
        let mut said = String::new();
        ha::wait_every(Duration::from_secs(10), Duration::from_millis(250), || {
            let status = lab
                .kubectl_json(&["get", "haservice", &t.name, "-n", &t.namespace])
                .map(|v| v["status"].clone())
                .unwrap_or(Value::Null);
            said = status.to_string();
            said.contains("allowedNamespaces")
        })
        .with_context(|| format!("the status never named spec.allowedNamespaces: {said}"))?;
        Ok(format!(
            "no address, no hook for {} s; the operator refused the service in its status",
            WATCH.as_secs()
        ))
    })
}

fn lease_in_tenant_namespace(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let scenario = ctx.active_service("hostile-tenancy-old-place", "198.18.0.122", &[1, 2, 3])?;
    let active = scenario.active;
    let other = if active == 2 { 3 } else { 2 };
    let uid = lab
        .kubectl_ok(&[
            "get",
            "haservice",
            &scenario.name,
            "-n",
            ha::SERVICE_NAMESPACE,
            "-o",
            "jsonpath={.metadata.uid}",
        ])?
        .trim()
        .to_owned();
    let tenant = Tenant {
        lab,
        name: scenario.name.clone(),
        namespace: ha::SERVICE_NAMESPACE.to_owned(),
        cluster: scenario.name.clone(),
        vip: scenario.vip.clone(),
        trace: lab.dir().join("unused.trace"),
    };
    let (_, seen) = single_holder_through(
        &scenario.vip,
        "a Lease forged in the tenant's namespace",
        || {
            tenant.forge(other, 99, &uid, true)?;
            std::thread::sleep(WATCH);
            let holders = ha::vip_holders(&scenario.vip);
            if holders != [active] {
                bail!(
                    "after the forged Lease the VIP is held by {holders:?}, not node-{active} alone"
                );
            }
            Ok(())
        },
    )?;
    ha::delete(
        lab,
        "lease",
        &format!("kubeha-svc-{}", scenario.name),
        Some(ha::SERVICE_NAMESPACE),
    );
    scenario.finish()?;
    Ok(format!(
        "ignored: the VIP stayed on node-{active} alone ({} checks, none with two holders)",
        seen.samples
    ))
}

fn vip_claimed_operator_down(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let scenario = ctx.active_service("hostile-tenancy-claim", "198.18.0.123", &[1, 2, 3])?;
    let active = scenario.active;
    let other = if active == 2 { 3 } else { 2 };
    // The second service on the same cluster, same VIP, newer.
    let second = Tenant::create(
        lab,
        "hostile-tenancy-claim-2",
        ha::SERVICE_NAMESPACE,
        &scenario.name,
        &scenario.vip,
    )?;
    let result = (|| {
        let uid = second.uid()?;
        let stopped = OperatorStopped::new(lab)?;
        let (why, seen) = single_holder_through(
            &scenario.vip,
            "a forged Lease for the second claimant",
            || {
                second.forge(other, 1, &uid, false)?;
                std::thread::sleep(WATCH);
                if second.trace.exists() {
                    bail!("the second service's hooks ran on a node");
                }
                let holders = ha::vip_holders(&scenario.vip);
                if holders != [active] {
                    bail!("the VIP is held by {holders:?}, not node-{active} alone");
                }
                second.refusal()
            },
        )?;
        drop(stopped);
        if !why.contains("claimed") {
            bail!("the refusal does not name the older claim: {why}");
        }
        Ok(format!(
            "node-{other} refused ({why}); the VIP stayed on node-{active} alone ({} checks)",
            seen.samples
        ))
    })();
    // Not the VIP check of `remove`: the first service still holds it.
    ha::delete(lab, "haservice", &second.name, Some(ha::SERVICE_NAMESPACE));
    ha::delete(
        lab,
        "lease",
        &format!("kubeha-svc-{}.{}", second.namespace, second.name),
        Some(ha::OPERATOR_NAMESPACE),
    );
    let outcome = result?;
    scenario.finish()?;
    Ok(outcome)
}

fn vip_outside_pool_operator_down(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    // The lab clusters' pool is 198.18.0.0/24: 198.19.0.200 is outside it.
    with_tenant(
        lab,
        "hostile-tenancy-pool",
        ha::SERVICE_NAMESPACE,
        "198.19.0.200",
        |t| t.refused(&OperatorStopped::new(lab)?, &t.uid()?, "spec.vipPool"),
    )
}

fn lease_for_another_uid_operator_down(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    with_tenant(
        lab,
        "hostile-tenancy-uid",
        ha::SERVICE_NAMESPACE,
        "198.18.0.124",
        |t| {
            // Valid, so the operator may have placed it: with the operator
            // stopped, its Lease goes (the holder leaves), then a Lease
            // written for another HAService of the same name is forged.
            let stopped = OperatorStopped::new(lab)?;
            ha::delete(
                lab,
                "lease",
                &format!("kubeha-svc-{}.{}", t.namespace, t.name),
                Some(ha::OPERATOR_NAMESPACE),
            );
            if ha::wait_until(Duration::from_secs(15), || {
                ha::vip_holders(&t.vip).is_empty()
            })
            .is_none()
            {
                bail!("{} still held after its Lease was deleted", t.vip);
            }
            let _ = std::fs::remove_file(&t.trace);
            t.refused(
                &stopped,
                "00000000-0000-0000-0000-000000000000",
                "not this HAService",
            )
        },
    )
}
