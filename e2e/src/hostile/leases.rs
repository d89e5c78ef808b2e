//! Hostile cases: leases. Hand edits of a running service's leadership
//! Lease (forged clearances, holders, epochs, the Lease deleted during a
//! handover) and a forged heartbeat for a powered-off node. Whoever can
//! write a Lease must not get two nodes holding one VIP, must not get a
//! node the operator did not clear to take the address, and must not keep
//! a dead node Alive; the service is back Active on one node within
//! [`ACTIVE_WITHIN`].

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{ACTIVE_WITHIN, Case, Ctx, ServiceLease, clip, patch_lease, service_lease};
use crate::ha;
use crate::nodes;

/// How long a case watches after its tampering before it waits for the
/// service to be Active again: several renew intervals and one lease
/// duration of the default timing, so agents and operator have acted.
const WATCH_AFTER_TAMPERING: Duration = Duration::from_secs(8);

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "lease-enter-epoch-whitespace",
            expected: "a hand-written handover to node-2 with enter-epoch \" N+1\": node-2 takes no address, never two holders, Active on one node again",
            run: enter_epoch_whitespace,
        },
        Case {
            name: "lease-enter-epoch-decimal",
            expected: "a hand-written handover to node-2 with enter-epoch \"N+1.0\": node-2 takes no address, never two holders, Active on one node again",
            run: enter_epoch_decimal,
        },
        Case {
            name: "lease-enter-epoch-negative",
            expected: "a hand-written handover to node-2 with enter-epoch \"-1\": node-2 takes no address, never two holders, Active on one node again",
            run: enter_epoch_negative,
        },
        Case {
            name: "lease-enter-epoch-huge",
            expected: "a hand-written handover to node-2 with a 30-digit enter-epoch: node-2 takes no address, never two holders, Active on one node again",
            run: enter_epoch_huge,
        },
        Case {
            name: "lease-enter-epoch-non-numeric",
            expected: "a hand-written handover to node-2 with enter-epoch \"three\": node-2 takes no address, never two holders, Active on one node again",
            run: enter_epoch_non_numeric,
        },
        Case {
            name: "lease-holder-other-member",
            expected: "holderIdentity edited from node-1 to member node-2 (epoch and enter-epoch unchanged): node-2 takes no address, never two holders, Active on one node again",
            run: holder_other_member,
        },
        Case {
            name: "lease-holder-non-member",
            expected: "holderIdentity edited to node-3, not a member of the cluster: node-3 takes no address, never two holders, Active on one member again",
            run: holder_non_member,
        },
        Case {
            name: "lease-transitions-max",
            expected: "leaseTransitions set to 2147483647 (i32::MAX): no crash, never two holders, Active on one node again",
            run: transitions_max,
        },
        Case {
            name: "lease-deleted-mid-handover",
            expected: "the service Lease deleted right after a move to node-2 was asked: never two holders, Active on one node again",
            run: deleted_mid_handover,
        },
        Case {
            name: "lease-fake-heartbeat-dead-node",
            expected: "labelled heartbeat Leases renewed by hand for powered-off node-3 (in the service namespace and under another name in the operator's): the operator reports node-3 not Alive and ready 2/3",
            run: fake_heartbeat_for_dead_node,
        },
    ]
}

/// A forged handover of service `name` (cluster of nodes 1..=3, Active on
/// node-1): holder node-2, epoch N+1 and enter-epoch `enter(N+1)`.
fn forged_handover(
    ctx: &Ctx,
    name: &str,
    vip: &str,
    enter: fn(i64) -> String,
) -> anyhow::Result<String> {
    tamper(ctx, name, vip, &[1, 2, 3], Some(2), |lease| {
        let next = lease.epoch() + 1;
        json!({
            "metadata": {"annotations": {"kubeha.io/enter-epoch": enter(next)}},
            "spec": {"holderIdentity": nodes::node_name(2), "leaseTransitions": next}
        })
    })
}

fn enter_epoch_whitespace(ctx: &Ctx) -> anyhow::Result<String> {
    forged_handover(ctx, "hostile-lease-epoch-space", "198.18.0.101", |e| {
        format!(" {e}")
    })
}

fn enter_epoch_decimal(ctx: &Ctx) -> anyhow::Result<String> {
    forged_handover(ctx, "hostile-lease-epoch-decimal", "198.18.0.102", |e| {
        format!("{e}.0")
    })
}

fn enter_epoch_negative(ctx: &Ctx) -> anyhow::Result<String> {
    forged_handover(ctx, "hostile-lease-epoch-negative", "198.18.0.103", |_| {
        "-1".to_owned()
    })
}

fn enter_epoch_huge(ctx: &Ctx) -> anyhow::Result<String> {
    forged_handover(ctx, "hostile-lease-epoch-huge", "198.18.0.104", |_| {
        "999999999999999999999999999999".to_owned()
    })
}

fn enter_epoch_non_numeric(ctx: &Ctx) -> anyhow::Result<String> {
    forged_handover(ctx, "hostile-lease-epoch-nan", "198.18.0.105", |_| {
        "three".to_owned()
    })
}

fn holder_other_member(ctx: &Ctx) -> anyhow::Result<String> {
    tamper(
        ctx,
        "hostile-lease-holder-member",
        "198.18.0.106",
        &[1, 2, 3],
        Some(2),
        |_| json!({"spec": {"holderIdentity": nodes::node_name(2)}}),
    )
}

fn holder_non_member(ctx: &Ctx) -> anyhow::Result<String> {
    tamper(
        ctx,
        "hostile-lease-holder-stranger",
        "198.18.0.107",
        &[1, 2],
        Some(3),
        |_| json!({"spec": {"holderIdentity": nodes::node_name(3)}}),
    )
}

fn transitions_max(ctx: &Ctx) -> anyhow::Result<String> {
    tamper(
        ctx,
        "hostile-lease-epoch-max",
        "198.18.0.108",
        &[1, 2, 3],
        None,
        |_| json!({"spec": {"leaseTransitions": i32::MAX}}),
    )
}

/// Starts service `name` on `members` (Active on the first), patches its
/// Lease with `forge(lease)` as a hand edit, and checks the outcome: no two
/// nodes ever hold the VIP from the edit until the service is Active on
/// one node again (within [`WATCH_AFTER_TAMPERING`] + [`ACTIVE_WITHIN`]),
/// `forged` (the node the edit names, which the operator never cleared)
/// never holds it, and the operator and every agent still run.
fn tamper(
    ctx: &Ctx,
    name: &str,
    vip: &str,
    members: &[u8],
    forged: Option<u8>,
    forge: impl FnOnce(&ServiceLease) -> Value,
) -> anyhow::Result<String> {
    let scenario = ctx.active_service(name, vip, members)?;
    if scenario.active != members[0] {
        bail!(
            "ordered placement put {name} on node-{} instead of node-{}",
            scenario.active,
            members[0]
        );
    }
    let before = service_lease(ctx.lab, name)?;
    let patch = forge(&before);
    let (((forged_held, active), denied), seen) =
        super::single_holder_through(vip, "the Lease edit and the recovery", || {
            // An admission policy may deny the edit: then nothing was
            // forged, and the service must still be where it was.
            let denied = patch_lease(ctx.lab, &before, &patch).err();
            watch_recovery(&scenario, forged).map(|seen| (seen, denied))
        })?;
    let after = service_lease(ctx.lab, name).ok();
    super::processes_running(ctx.lab).map_err(anyhow::Error::msg)?;
    if let (Some(node), Some(at)) = (forged, forged_held) {
        bail!(
            "node-{node}, named by the hand edit {patch} and never cleared by the operator, held {vip} {:.1} s after the edit",
            at.as_secs_f64()
        );
    }
    if let Some(node) = forged
        && Some(active) == Some(node)
    {
        bail!("the service ended Active on node-{node}, the node the hand edit named");
    }
    scenario.finish()?;
    let edit = match denied {
        Some(e) => format!(
            "edit {patch} denied by the API server ({})",
            clip(&format!("{e:#}"))
        ),
        None => format!("edit {patch} accepted"),
    };
    Ok(format!(
        "{edit}: never two holders ({} checks), {}Active on node-{active} again; Lease then holder {:?}, epoch {}",
        seen.samples,
        forged.map_or(String::new(), |n| format!("node-{n} held nothing, ")),
        after.as_ref().and_then(|l| l.holder().map(str::to_owned)),
        after.as_ref().map_or(0, ServiceLease::epoch)
    ))
}

/// Watches `scenario`'s VIP for [`WATCH_AFTER_TAMPERING`], then until the
/// service is Active on one node (at most [`ACTIVE_WITHIN`] more): when
/// node `forged` was first seen holding the VIP (since the call; `None`:
/// never), and the node the service is Active on.
fn watch_recovery(
    scenario: &super::Scenario<'_>,
    forged: Option<u8>,
) -> anyhow::Result<(Option<Duration>, u8)> {
    let start = Instant::now();
    let mut forged_held = None;
    while start.elapsed() < WATCH_AFTER_TAMPERING + ACTIVE_WITHIN {
        if let Some(i) = forged
            && forged_held.is_none()
            && ha::vip_on_node(i, &scenario.vip)
        {
            forged_held = Some(start.elapsed());
        }
        if start.elapsed() >= WATCH_AFTER_TAMPERING
            && let Some(active) = ha::active_node(scenario.lab, &scenario.name, &scenario.vip)
        {
            return Ok((forged_held, active));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "{} was not Active with its VIP on one node {} s after the edit: status {}, holders {:?}{}",
        scenario.name,
        (WATCH_AFTER_TAMPERING + ACTIVE_WITHIN).as_secs(),
        scenario.status(),
        ha::vip_holders(&scenario.vip),
        forged_held.map_or(String::new(), |t| format!(
            "; the forged node held it {:.1} s after the edit",
            t.as_secs_f64()
        ))
    )
}

fn deleted_mid_handover(ctx: &Ctx) -> anyhow::Result<String> {
    let (name, vip) = ("hostile-lease-deleted", "198.18.0.109");
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    let lease = service_lease(ctx.lab, name)?;
    let (denied, seen) =
        super::single_holder_through(vip, "the move and the Lease deletion", || {
            ha::request_move(ctx.lab, name, 2)?;
            let denied = ctx
                .lab
                .kubectl_ok(&[
                    "delete",
                    "lease",
                    &lease.name,
                    "-n",
                    &lease.namespace,
                    "--wait=false",
                ])
                .err();
            std::thread::sleep(WATCH_AFTER_TAMPERING);
            Ok(denied)
        })?;
    let ((active, took), more) = super::single_holder_through(vip, "the recovery", || {
        let start = Instant::now();
        let active = scenario.wait_active(ACTIVE_WITHIN)?;
        Ok((active, start.elapsed()))
    })?;
    let recreated =
        service_lease(ctx.lab, name).context("the operator never wrote the service Lease again")?;
    super::processes_running(ctx.lab).map_err(anyhow::Error::msg)?;
    scenario.finish()?;
    Ok(format!(
        "deletion {}; never two holders ({} checks); Active on node-{active} {:.1} s after the watch window; Lease then at epoch {}",
        denied.map_or("accepted".to_owned(), |e| format!(
            "denied ({})",
            clip(&format!("{e:#}"))
        )),
        seen.samples + more.samples,
        took.as_secs_f64(),
        recreated.epoch()
    ))
}

/// A heartbeat Lease for `node` of `cluster`, labelled as the agent labels
/// its own, renewed now, in `namespace` under `lease_name`.
fn fake_heartbeat(namespace: &str, lease_name: &str, cluster: &str, node: &str) -> Value {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name,
            "namespace": namespace,
            "labels": {
                "kubeha.io/lease": "heartbeat",
                "kubeha.io/cluster": cluster,
                "kubeha.io/node": node
            },
            "annotations": {"kubeha.io/expiry-ms": "3500"}
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": 3,
            "renewTime": now,
            "acquireTime": now
        }
    })
}

/// The heartbeat state the HACluster `cluster` reports for `node`.
fn member_heartbeat(ctx: &Ctx, cluster: &str, node: &str) -> Option<String> {
    let status = ctx.lab.kubectl_json(&["get", "hacluster", cluster]).ok()?["status"].clone();
    status["members"]
        .as_array()?
        .iter()
        .find(|m| m["node"] == node)?["heartbeat"]
        .as_str()
        .map(str::to_owned)
}

fn fake_heartbeat_for_dead_node(ctx: &Ctx) -> anyhow::Result<String> {
    let (name, vip) = ("hostile-lease-fake-heartbeat", "198.18.0.111");
    let node = nodes::node_name(3);
    let fakes = [
        (ha::SERVICE_NAMESPACE, format!("hostile-hb-{name}")),
        (ha::OPERATOR_NAMESPACE, format!("kubeha-hb-fake-{name}")),
    ];
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    let result = (|| -> anyhow::Result<String> {
        ctx.lab.power_off(3)?;
        let off = Instant::now();
        // The forgery starts at once and keeps renewing, as an agent would.
        let mut states = Vec::new();
        let mut lost_at = None;
        let mut denials = std::collections::BTreeSet::new();
        while off.elapsed() < Duration::from_secs(20) {
            for (ns, lease) in &fakes {
                // An admission policy may deny a forgery: that is a pass too.
                if let Err(e) = ha::apply(ctx.lab, &fake_heartbeat(ns, lease, name, &node)) {
                    denials.insert(format!("{ns}/{lease}: {}", clip(&format!("{e:#}"))));
                }
            }
            // A failed read says nothing either way.
            if let Some(state) = member_heartbeat(ctx, name, &node) {
                if state != "Alive" && lost_at.is_none() {
                    lost_at = Some(off.elapsed());
                }
                if lost_at.is_some() {
                    states.push(state);
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let Some(lost_at) = lost_at else {
            bail!(
                "the operator kept {node} Alive for 20 s after its power-off while forged heartbeat Leases renewed"
            );
        };
        if let Some(alive) = states.iter().position(|s| s == "Alive") {
            bail!(
                "{node} was reported not Alive {:.1} s after its power-off, then Alive again ({} polls later) from the forged heartbeat Leases: {states:?}",
                lost_at.as_secs_f64(),
                alive
            );
        }
        let ready =
            ctx.lab
                .kubectl_ok(&["get", "hacluster", name, "-o", "jsonpath={.status.ready}"])?;
        if ready.trim() != "2/3" {
            bail!("HACluster {name} reports ready {ready:?} with node-3 off, want 2/3");
        }
        Ok(format!(
            "{node} {} {:.1} s after its power-off and stayed so ({} polls) while forged Leases renewed; ready {}; forgeries denied: [{}]",
            states.last().map_or("not Alive", String::as_str),
            lost_at.as_secs_f64(),
            states.len(),
            ready.trim(),
            denials.into_iter().collect::<Vec<_>>().join("; ")
        ))
    })();
    for (ns, lease) in &fakes {
        ha::delete(ctx.lab, "lease", lease, Some(ns));
    }
    ctx.lab.power_on(3)?;
    if !ctx.lab.agent_running(3) {
        ctx.lab.start_agent(3, &[] as &[&str])?;
    }
    let seen = result?;
    let active = scenario.wait_active(ACTIVE_WITHIN)?;
    scenario.finish()?;
    Ok(format!("{seen}; service stayed Active on node-{active}"))
}
