//! Hostile cases: api. Odd values in the admin annotations
//! `kubeha.io/move-to` and `kubeha.io/clear`, `kubectl ha peerdown` on a
//! node that is Alive, an HACluster deleted under Active services, and a
//! service whose cluster does not exist. Each must be refused with a
//! reason or ignored as documented, leave the running service where it
//! is, and leave the operator reconciling the next valid change.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{ACTIVE_WITHIN, Case, Ctx, Scenario, clip, condition, events_about};
use crate::ha;
use crate::nodes;

/// How long a case watches a service that must stay where it is.
const UNDISTURBED_FOR: Duration = Duration::from_secs(6);

/// How long the operator may take to report a refusal (condition or Event).
const REPORTED_WITHIN: Duration = Duration::from_secs(20);

/// A value longer than any node name (100,000 bytes; annotations may hold
/// 256 KiB in all).
fn huge() -> String {
    "n".repeat(100_000)
}

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "move-to-huge",
            expected: "kubeha.io/move-to of 100,000 bytes: refused (Moved=False TargetNotEligible or a MoveNotPossible Event), service stays on node-1, a following move to node-2 completes",
            run: move_to_huge,
        },
        Case {
            name: "move-to-unicode",
            expected: "kubeha.io/move-to \"nöde-1✓\": refused (Moved=False TargetNotEligible or a MoveNotPossible Event), service stays on node-1, a following move to node-2 completes",
            run: move_to_unicode,
        },
        Case {
            name: "move-to-empty",
            expected: "kubeha.io/move-to \"\": ignored as documented (no request, no Moved condition), service stays on node-1, a following move to node-2 completes",
            run: move_to_empty,
        },
        Case {
            name: "move-to-non-member",
            expected: "kubeha.io/move-to node-9 (not a member): refused naming it not a member (Moved=False TargetNotEligible or a MoveNotPossible Event), service stays on node-1, a following move to node-2 completes",
            run: move_to_non_member,
        },
        Case {
            name: "move-to-padded",
            expected: "kubeha.io/move-to \" node-2 \": the value is trimmed as documented and the service moves to node-2, never two holders",
            run: move_to_padded,
        },
        Case {
            name: "clear-huge",
            expected: "kubeha.io/clear of 100,000 bytes: taken as a clear, service undisturbed on node-1, a following move to node-2 completes",
            run: clear_huge,
        },
        Case {
            name: "clear-unicode",
            expected: "kubeha.io/clear \"jetzt ✓ 現在\": taken as a clear, service undisturbed on node-1, a following move to node-2 completes",
            run: clear_unicode,
        },
        Case {
            name: "clear-empty",
            expected: "kubeha.io/clear \"\": service undisturbed on node-1, a following move to node-2 completes",
            run: clear_empty,
        },
        Case {
            name: "peerdown-alive-node",
            expected: "kubectl ha peerdown of node-2 whose heartbeat is Alive: refused (non-zero exit naming the heartbeat), its mode stays default, service undisturbed",
            run: peerdown_alive_node,
        },
        Case {
            name: "cluster-deleted-with-active-service",
            expected: "the HACluster deleted while its service is Active: the leave hook runs on node-1, the VIP is gone from every node, the service's status says why",
            run: cluster_deleted_with_active_service,
        },
        Case {
            name: "service-of-missing-cluster",
            expected: "an HAService whose clusterRef names no HACluster: refused with ClusterNotFound in its status, and a move of another service is still reconciled",
            run: service_of_missing_cluster,
        },
    ]
}

/// Sets (`Some`) or removes (`None`) annotation `key` of HAService `name`
/// with a merge patch read from a file (a huge value does not fit in one
/// command-line argument).
fn annotate(ctx: &Ctx, name: &str, key: &str, value: Option<&str>) -> anyhow::Result<()> {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    let file = ctx.lab.dir().join(format!("patch-{name}.json"));
    std::fs::write(&file, patch.to_string())
        .with_context(|| format!("writing {}", file.display()))?;
    let result = ctx.lab.kubectl_ok(&[
        "patch",
        "haservice",
        name,
        "-n",
        ha::SERVICE_NAMESPACE,
        "--type",
        "merge",
        "--patch-file",
        &file.to_string_lossy(),
    ]);
    let _ = std::fs::remove_file(&file);
    result.map(|_| ())
}

/// Fails if the service of `scenario` left node `on` or had two holders
/// within [`UNDISTURBED_FOR`].
fn stays_on(scenario: &Scenario<'_>, on: u8) -> anyhow::Result<usize> {
    let ((), seen) = super::single_holder_through(&scenario.vip, "the hostile request", || {
        let start = Instant::now();
        while start.elapsed() < UNDISTURBED_FOR {
            let holders = ha::vip_holders(&scenario.vip);
            if holders != [on] {
                bail!(
                    "{} left node-{on} {:.1} s after the request: holders {holders:?}, status {}",
                    scenario.name,
                    start.elapsed().as_secs_f64(),
                    scenario.status()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    })?;
    Ok(seen.samples)
}

/// The operator still acts on a valid request: `kubectl ha clear` (which
/// also withdraws a move request), then a move to node-2, Active there
/// within [`ACTIVE_WITHIN`] with never two holders. Returns how long the
/// move took.
fn still_reconciles(ctx: &Ctx, scenario: &Scenario<'_>) -> anyhow::Result<Duration> {
    ctx.lab.kubectl_ha_ok(&[
        "--wait",
        "0",
        "clear",
        &scenario.name,
        "-n",
        ha::SERVICE_NAMESPACE,
    ])?;
    let (took, _) = super::single_holder_through(
        &scenario.vip,
        "the following valid move",
        || {
            let start = Instant::now();
            ha::request_move(ctx.lab, &scenario.name, 2)?;
            if ha::wait_every(ACTIVE_WITHIN, Duration::from_millis(200), || {
                ha::active_node(ctx.lab, &scenario.name, &scenario.vip) == Some(2)
            })
            .is_none()
            {
                bail!(
                    "after the hostile request, a valid move of {} to node-2 was not done within {} s: status {}",
                    scenario.name,
                    ACTIVE_WITHIN.as_secs(),
                    scenario.status()
                );
            }
            Ok(start.elapsed())
        },
    )?;
    Ok(took)
}

/// The refusal of a move request as the operator reports it: the Moved
/// condition when it is False with reason TargetNotEligible, else a
/// MoveNotPossible Event; waits up to [`REPORTED_WITHIN`].
fn move_refusal(ctx: &Ctx, scenario: &Scenario<'_>) -> Option<String> {
    let mut found = None;
    ha::wait_every(REPORTED_WITHIN, Duration::from_millis(300), || {
        let status = scenario.status();
        if let Some(c) = condition(&status, "Moved")
            && c["status"] == "False"
            && c["reason"] == "TargetNotEligible"
        {
            found = Some(format!(
                "Moved=False TargetNotEligible: {}",
                clip(c["message"].as_str().unwrap_or_default())
            ));
            return true;
        }
        if let Some((_, message)) = events_about(ctx.lab, ha::SERVICE_NAMESPACE, &scenario.name)
            .into_iter()
            .find(|(reason, _)| reason == "MoveNotPossible")
        {
            found = Some(format!("Event MoveNotPossible: {}", clip(&message)));
            return true;
        }
        false
    });
    found
}

/// A move request naming a node that is not an eligible member must be
/// refused with a reason (containing `why` when given), the service
/// staying on node-1, and a following valid move must complete.
fn refused_move(
    ctx: &Ctx,
    name: &str,
    vip: &str,
    target: &str,
    why: Option<&str>,
) -> anyhow::Result<String> {
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    annotate(ctx, name, "kubeha.io/move-to", Some(target))?;
    let checks = stays_on(&scenario, 1)?;
    let Some(refusal) = move_refusal(ctx, &scenario) else {
        bail!(
            "no refusal of kubeha.io/move-to ({} bytes) within {} s: status {}",
            target.len(),
            REPORTED_WITHIN.as_secs(),
            scenario.status()
        );
    };
    if let Some(why) = why
        && !refusal.contains(why)
    {
        bail!("the refusal does not say {why:?}: {refusal}");
    }
    then_a_valid_move(
        ctx,
        scenario,
        format!("{refusal}; stayed on node-1 ({checks} checks, never two holders)"),
    )
}

/// Ends a case whose hostile request left the service alone: every agent
/// and the operator still run, a valid move ([`still_reconciles`])
/// completes, and the service is removed; `seen` and the move's time are
/// the outcome.
fn then_a_valid_move(ctx: &Ctx, scenario: Scenario<'_>, seen: String) -> anyhow::Result<String> {
    super::processes_running(ctx.lab).map_err(anyhow::Error::msg)?;
    let took = still_reconciles(ctx, &scenario)?;
    scenario.finish()?;
    Ok(format!(
        "{seen}; a following move to node-2 took {:.1} s",
        took.as_secs_f64()
    ))
}

fn move_to_huge(ctx: &Ctx) -> anyhow::Result<String> {
    refused_move(ctx, "hostile-move-huge", "198.18.0.112", &huge(), None)
}

fn move_to_unicode(ctx: &Ctx) -> anyhow::Result<String> {
    refused_move(
        ctx,
        "hostile-move-unicode",
        "198.18.0.114",
        "nöde-1✓",
        Some("not a member"),
    )
}

fn move_to_non_member(ctx: &Ctx) -> anyhow::Result<String> {
    refused_move(
        ctx,
        "hostile-move-stranger",
        "198.18.0.115",
        "node-9",
        Some("node-9 is not a member"),
    )
}

fn move_to_empty(ctx: &Ctx) -> anyhow::Result<String> {
    let (name, vip) = ("hostile-move-empty", "198.18.0.116");
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    annotate(ctx, name, "kubeha.io/move-to", Some(""))?;
    let checks = stays_on(&scenario, 1)?;
    if let Some(c) = condition(&scenario.status(), "Moved") {
        bail!("an empty kubeha.io/move-to is documented as no request, yet the status has {c}");
    }
    then_a_valid_move(
        ctx,
        scenario,
        format!("ignored: no Moved condition, stayed on node-1 ({checks} checks)"),
    )
}

fn move_to_padded(ctx: &Ctx) -> anyhow::Result<String> {
    let (name, vip) = ("hostile-move-padded", "198.18.0.117");
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    let (took, seen) = super::single_holder_through(vip, "the padded move", || {
        let start = Instant::now();
        annotate(ctx, name, "kubeha.io/move-to", Some(" node-2 "))?;
        if ha::wait_every(ACTIVE_WITHIN, Duration::from_millis(200), || {
            ha::active_node(ctx.lab, name, vip) == Some(2)
        })
        .is_none()
        {
            bail!(
                "kubeha.io/move-to \" node-2 \" did not move {name} to node-2 within {} s: status {}",
                ACTIVE_WITHIN.as_secs(),
                scenario.status()
            );
        }
        Ok(start.elapsed())
    })?;
    let moved = condition(&scenario.status(), "Moved")
        .cloned()
        .unwrap_or_default();
    super::processes_running(ctx.lab).map_err(anyhow::Error::msg)?;
    scenario.finish()?;
    Ok(format!(
        "moved to node-2 in {:.1} s, never two holders ({} checks); Moved={} {}",
        took.as_secs_f64(),
        seen.samples,
        moved["status"].as_str().unwrap_or("?"),
        moved["reason"].as_str().unwrap_or("?")
    ))
}

/// A clear with value `value` leaves the running service on node-1, and a
/// following valid move completes.
fn odd_clear(ctx: &Ctx, name: &str, vip: &str, value: &str) -> anyhow::Result<String> {
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    annotate(ctx, name, "kubeha.io/clear", Some(value))?;
    let checks = stays_on(&scenario, 1)?;
    let phase = scenario.status()["phase"].clone();
    if phase != "Active" {
        bail!("after the clear the phase is {phase}, want Active");
    }
    then_a_valid_move(
        ctx,
        scenario,
        format!("stayed Active on node-1 ({checks} checks, never two holders)"),
    )
}

fn clear_huge(ctx: &Ctx) -> anyhow::Result<String> {
    odd_clear(ctx, "hostile-clear-huge", "198.18.0.118", &huge())
}

fn clear_unicode(ctx: &Ctx) -> anyhow::Result<String> {
    odd_clear(ctx, "hostile-clear-unicode", "198.18.0.119", "jetzt ✓ 現在")
}

fn clear_empty(ctx: &Ctx) -> anyhow::Result<String> {
    odd_clear(ctx, "hostile-clear-empty", "198.18.0.121", "")
}

/// The mode HACluster `cluster`'s spec gives `node` (`default` when the
/// member has none).
fn member_mode(ctx: &Ctx, cluster: &str, node: &str) -> anyhow::Result<String> {
    let cluster = ctx.lab.kubectl_json(&["get", "hacluster", cluster])?;
    let members = cluster["spec"]["members"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let member = members
        .iter()
        .find(|m| m["name"] == node)
        .with_context(|| format!("{node} is no member of the cluster any more"))?;
    Ok(member["mode"].as_str().unwrap_or("default").to_owned())
}

fn peerdown_alive_node(ctx: &Ctx) -> anyhow::Result<String> {
    let (name, vip) = ("hostile-peerdown-alive", "198.18.0.122");
    let node = nodes::node_name(2);
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    let out = ctx
        .lab
        .kubectl_ha()?
        .args(["--wait", "0", "peerdown", &node, "--cluster", name])
        .output()
        .context("running kubectl ha peerdown")?;
    let said = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mode = member_mode(ctx, name, &node)?;
    let checks = stays_on(&scenario, 1);
    // Withdraw a mark that went through, whatever the outcome.
    if mode == "peerdown" {
        let _ = ctx
            .lab
            .kubectl_ha_ok(&["--wait", "0", "peerup", &node, "--cluster", name]);
    }
    let checks = checks?;
    if out.status.success() {
        bail!(
            "kubectl ha peerdown of {node}, whose heartbeat is Alive, exited 0 and set its mode to {mode:?} ({said:?}); it must refuse and name the Alive heartbeat"
        );
    }
    if mode != "default" {
        bail!("peerdown exited non-zero ({said:?}) but {node}'s mode is {mode:?}, want default");
    }
    if !said.contains("Alive") && !said.contains("alive") {
        bail!("peerdown was refused but its message does not say {node} is Alive: {said:?}");
    }
    super::processes_running(ctx.lab).map_err(anyhow::Error::msg)?;
    scenario.finish()?;
    Ok(format!(
        "exit {}: {}; mode stayed default, service stayed on node-1 ({checks} checks)",
        out.status.code().unwrap_or(-1),
        clip(&said)
    ))
}

fn cluster_deleted_with_active_service(ctx: &Ctx) -> anyhow::Result<String> {
    let (name, vip) = ("hostile-cluster-deleted", "198.18.0.123");
    let trace = ctx.lab.dir().join(format!("trace-{name}"));
    let _ = std::fs::remove_file(&trace);
    for i in 1..=3 {
        ha::install_hooks(
            ctx.lab,
            i,
            name,
            &[
                ("E01server", &ha::tracing_script(&trace, 0)),
                ("L01server", &ha::tracing_script(&trace, 0)),
            ],
        )?;
    }
    let result = (|| -> anyhow::Result<String> {
        let scenario = ctx.active_service_with_hooks(name, vip, &[1, 2, 3], Some(name))?;
        let read = || std::fs::read_to_string(&trace).unwrap_or_default();
        let ran = |what: &str, i: u8| {
            read()
                .lines()
                .any(|l| l.contains(what) && l.contains(&format!("node=node-{i}")))
        };
        if ha::wait_until(Duration::from_secs(10), || ran(" enter master ", 1)).is_none() {
            bail!("node-1 never ran its enter hook: {:?}", read());
        }
        ha::delete(ctx.lab, "hacluster", name, None);
        let deleted = Instant::now();
        let gone = ha::wait_every(ACTIVE_WITHIN, Duration::from_millis(200), || {
            ha::vip_holders(vip).is_empty()
        });
        let Some(gone) = gone else {
            bail!(
                "{vip} still held on {:?} {} s after its HACluster was deleted: status {}",
                ha::vip_holders(vip),
                ACTIVE_WITHIN.as_secs(),
                scenario.status()
            );
        };
        if ha::wait_until(Duration::from_secs(10), || ran(" leave master ", 1)).is_none() {
            bail!(
                "the VIP went away {:.1} s after the cluster's deletion but node-1 never ran its leave hook: {:?}",
                gone.as_secs_f64(),
                read()
            );
        }
        let mut why = None;
        ha::wait_every(REPORTED_WITHIN, Duration::from_millis(300), || {
            let status = scenario.status();
            why = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| {
                    c["reason"] == "ClusterNotFound"
                        || c["message"].as_str().is_some_and(|m| m.contains(name))
                })
                .map(|c| {
                    format!(
                        "{}={} {}: {}",
                        c["type"].as_str().unwrap_or("?"),
                        c["status"].as_str().unwrap_or("?"),
                        c["reason"].as_str().unwrap_or("?"),
                        clip(c["message"].as_str().unwrap_or_default())
                    )
                });
            why.is_some()
        });
        let Some(why) = why else {
            bail!(
                "the service's status never said its cluster is gone: {}",
                scenario.status()
            );
        };
        let phase = scenario.status()["phase"].clone();
        super::processes_running(ctx.lab).map_err(anyhow::Error::msg)?;
        scenario.finish()?;
        Ok(format!(
            "VIP gone from every node {:.1} s after the deletion ({:.1} s measured from the delete call), leave hook ran on node-1; phase {phase}, {why}",
            gone.as_secs_f64(),
            deleted.elapsed().as_secs_f64()
        ))
    })();
    let _ = std::fs::remove_file(&trace);
    for i in 1..=3 {
        let _ = std::fs::remove_dir_all(ha::hook_root(ctx.lab, i).join(name));
    }
    result
}

fn service_of_missing_cluster(ctx: &Ctx) -> anyhow::Result<String> {
    let (name, vip) = ("hostile-orphan-neighbour", "198.18.0.124");
    let orphan = "hostile-orphan";
    let scenario = ctx.active_service(name, vip, &[1, 2, 3])?;
    ha::delete(ctx.lab, "haservice", orphan, Some(ha::SERVICE_NAMESPACE));
    let orphan_vip = "198.18.0.125";
    let result = (|| -> anyhow::Result<String> {
        ha::apply(
            ctx.lab,
            &ha::service(
                orphan,
                "hostile-no-such-cluster",
                &[&format!("{orphan_vip}/24")],
                None,
                (3, 100),
            ),
        )?;
        let mut refusal: Option<Value> = None;
        ha::wait_every(REPORTED_WITHIN, Duration::from_millis(300), || {
            refusal = ha::service_status(ctx.lab, orphan)["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["reason"] == "ClusterNotFound")
                .cloned();
            refusal.is_some()
        });
        let Some(refusal) = refusal else {
            bail!(
                "HAService {orphan} of a missing cluster got no ClusterNotFound condition within {} s: status {}",
                REPORTED_WITHIN.as_secs(),
                ha::service_status(ctx.lab, orphan)
            );
        };
        if !ha::vip_holders(orphan_vip).is_empty() {
            bail!(
                "{orphan_vip} of the service without a cluster is held on {:?}",
                ha::vip_holders(orphan_vip)
            );
        }
        let took = still_reconciles(ctx, &scenario)?;
        super::processes_running(ctx.lab).map_err(anyhow::Error::msg)?;
        Ok(format!(
            "{}={} ClusterNotFound: {}; another service's move to node-2 took {:.1} s",
            refusal["type"].as_str().unwrap_or("?"),
            refusal["status"].as_str().unwrap_or("?"),
            clip(refusal["message"].as_str().unwrap_or_default()),
            took.as_secs_f64()
        ))
    })();
    ha::delete_service(ctx.lab, orphan);
    let orphan_gone = ha::wait_every(Duration::from_secs(20), Duration::from_millis(200), || {
        ctx.lab
            .kubectl_output(&["get", "haservice", orphan, "-n", ha::SERVICE_NAMESPACE])
            .is_ok_and(|o| !o.status.success())
    });
    let seen = result?;
    scenario.finish()?;
    if orphan_gone.is_none() {
        bail!("{seen}; but HAService {orphan} (no cluster) could not be deleted within 20 s");
    }
    Ok(seen)
}
