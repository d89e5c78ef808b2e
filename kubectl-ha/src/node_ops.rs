//! `kubectl ha release NODE`, `reset NODE force smith` and `force-start
//! SERVICE --on NODE`: the node-level requests of the classic managers.
//!
//! - `release` (FreeHA's `kill -HUP`): HACluster annotation
//!   [`annotations::RELEASE_NODE`]; the operator moves every service off the
//!   node through the handover and removes the annotation once none has the
//!   node as its holder. Cluster admins only (tenants cannot write
//!   HAClusters).
//! - `reset` (StorNext's `force smith`): HACluster annotation
//!   [`annotations::RESET_NODE`] `NODE/REQUEST-ID`; that node's agent fences
//!   itself at once, once per request. Two words of confirmation.
//! - `force-start` (FreeHA's `kill -USR1`): HAService annotation
//!   [`annotations::FORCE_START`]; the operator starts the service on the
//!   node even though its failures there would keep placement off it, with
//!   a loud warning, a `ForceStarted` condition and Event, until
//!   `kubectl ha clear`.

use anyhow::anyhow;
use kube::Api;
use kube::api::Patch;
use kubeha_crds::cluster::HeartbeatState;
use kubeha_crds::{HACluster, HAService, Mode, annotations};
use serde_json::{Value, json};

use crate::{
    Ctx, Outcome, api_error, params, poll, print_after, print_status, read_cluster, read_service,
};

/// The two words `kubectl ha reset NODE` wants after the node, as
/// StorNext's `force smith`: a reset is never fired by accident.
pub const RESET_CONFIRMATION: [&str; 2] = ["force", "smith"];

/// JSON merge patch of an annotation of an object (`null` removes it).
pub fn annotation_patch(key: &str, value: Option<&str>) -> Value {
    json!({ "metadata": { "annotations": { key: value } } })
}

/// The [`annotations::RESET_NODE`] value for a reset of `node` with
/// request id `id` (`NODE/ID`, as [`annotations::reset_request`] reads it).
pub fn reset_value(node: &str, id: &str) -> String {
    format!("{node}/{id}")
}

/// Why `node` cannot be the subject of `command` in `cluster`: not a member
/// (when the cluster lists its members and selects none), or, with
/// `need_default`, a listed member whose mode is not `default`.
pub fn member_problem(
    cluster: &HACluster,
    node: &str,
    command: &str,
    need_default: bool,
) -> Option<String> {
    let name = kube::ResourceExt::name_any(cluster);
    let listed = cluster.spec.members.nodes.iter().find(|m| m.name == node);
    match listed {
        None if cluster.spec.members.selector.is_none() => {
            let members: Vec<&str> = cluster
                .spec
                .members
                .nodes
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            Some(format!(
                "{node} is not a member of HACluster {name} (members: {}); {command} one of them",
                members.join(", ")
            ))
        }
        Some(m) if need_default && m.mode != Mode::Default => Some(format!(
            "{node} is in mode {} in HACluster {name}; {command} acts only on a member in mode default (as StorNext's force smith); set it with kubectl ha mode {node} default --cluster {name} first",
            m.mode
        )),
        _ => None,
    }
}

/// The heartbeat the operator reports for `node` in `c`'s status.
fn heartbeat(c: &HACluster, node: &str) -> Option<HeartbeatState> {
    c.status
        .as_ref()?
        .members
        .iter()
        .find(|m| m.node == node)
        .map(|m| m.heartbeat)
}

/// `kubectl ha release NODE`: every service of `cluster` that runs on
/// `node` moves to the first other eligible node; the agent stays.
pub async fn release(ctx: &Ctx, cluster: &str, node: &str) -> anyhow::Result<Outcome> {
    let (api, c) = read_cluster(ctx, cluster).await?;
    let what = format!("HACluster {cluster}");
    if let Some(why) = member_problem(&c, node, "release", false) {
        anyhow::bail!(why);
    }
    if let Some(other) = c
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::RELEASE_NODE))
        && other != node
    {
        anyhow::bail!(
            "{what}: a release of {other} is in progress ({}={other}); wait until the operator removes it (kubectl ha status --cluster {cluster}), then release {node}",
            annotations::RELEASE_NODE
        );
    }
    api.patch(
        cluster,
        &params(),
        &Patch::Merge(&annotation_patch(annotations::RELEASE_NODE, Some(node))),
    )
    .await
    .map_err(|e| api_error(e, &what, "patch"))?;
    ctx.say(&format!(
        "{what}: {}={node} set; its services move to the next eligible node, its agent keeps running",
        annotations::RELEASE_NODE
    ));
    let (_, done) = poll(&api, cluster, ctx.wait, |c: &HACluster| {
        c.metadata
            .annotations
            .as_ref()
            .is_none_or(|a| !a.contains_key(annotations::RELEASE_NODE))
    })
    .await;
    let outcome = if done {
        Outcome::Done
    } else {
        ctx.not_reached(&format!(
            "the release of {node} has not finished (a service still has it as its holder)"
        ))
    };
    print_status(ctx, Some(cluster)).await?;
    Ok(outcome)
}

/// `kubectl ha reset NODE force smith`: `node`'s agent fences itself for
/// `cluster` now. `confirm` must be [`RESET_CONFIRMATION`].
pub async fn reset(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
    confirm: &[String],
) -> anyhow::Result<Outcome> {
    if confirm.len() != RESET_CONFIRMATION.len()
        || confirm.iter().zip(RESET_CONFIRMATION).any(|(a, b)| a != b)
    {
        return Err(anyhow!(
            "a reset fences {node} at once: its VIPs are dropped, its hooks killed and the fence action run, and its services fail over. To confirm, add the two words {}: kubectl ha reset {node} {}",
            RESET_CONFIRMATION.join(" "),
            RESET_CONFIRMATION.join(" ")
        ));
    }
    let (api, c) = read_cluster(ctx, cluster).await?;
    let what = format!("HACluster {cluster}");
    if let Some(why) = member_problem(&c, node, "reset", true) {
        anyhow::bail!(why);
    }
    let id = crate::patches::clear_token(jiff::Timestamp::now());
    let value = reset_value(node, &id);
    api.patch(
        cluster,
        &params(),
        &Patch::Merge(&annotation_patch(annotations::RESET_NODE, Some(&value))),
    )
    .await
    .map_err(|e| api_error(e, &what, "patch"))?;
    eprintln!(
        "WARNING: {node} fences itself now (fence action {:?}); its services fail over once the operator sees its heartbeat Lost",
        c.spec.fence.action
    );
    ctx.say(&format!("{what}: {}={value} set", annotations::RESET_NODE));
    let (_, done) = poll(&api, cluster, ctx.wait, |c: &HACluster| {
        heartbeat(c, node).is_some_and(|h| h != HeartbeatState::Alive)
    })
    .await;
    let outcome = if done {
        Outcome::Done
    } else {
        ctx.not_reached(&format!(
            "the operator has not seen {node}'s heartbeat stop"
        ))
    };
    print_status(ctx, Some(cluster)).await?;
    Ok(outcome)
}

fn force_condition(s: &HAService) -> Option<(String, String, String)> {
    s.status
        .iter()
        .flat_map(|st| &st.conditions)
        .find(|c| c.type_ == "ForceStarted")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// `kubectl ha force-start SERVICE --on NODE`: start the service on `node`
/// even though its failures there keep placement off it.
pub async fn force_start(ctx: &Ctx, name: &str, node: &str) -> anyhow::Result<Outcome> {
    let (what, api, svc) = read_service(&ctx.client, &ctx.namespace, name).await?;
    if let Ok((_, c)) = read_cluster(ctx, &svc.spec.cluster_ref).await
        && let Some(why) = member_problem(&c, node, "force-start on", false)
    {
        anyhow::bail!(why);
    }
    eprintln!(
        "WARNING: FORCE START of {what} on {node}: its failures there are overridden and it starts there even though placement would not choose it. Make sure {node} can run it. The ForceStarted condition stays until: kubectl ha clear {name} -n {}",
        ctx.namespace
    );
    // The failures the force overrides: those counted so far on the node.
    let fail_count = svc
        .status
        .as_ref()
        .and_then(|st| st.nodes.iter().find(|e| e.node == node))
        .map_or(0, |e| e.fail_count);
    let patch = json!({ "metadata": { "annotations": {
        annotations::FORCE_START: node,
        annotations::FORCE_START_FAIL_COUNT: fail_count.to_string(),
    } } });
    api.patch(name, &params(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &what, "patch"))?;
    ctx.say(&format!(
        "{what}: {}={node} set ({}={fail_count})",
        annotations::FORCE_START,
        annotations::FORCE_START_FAIL_COUNT
    ));
    let settled = |s: &HAService| {
        force_condition(s).is_some_and(|(status, reason, _)| {
            status == "True" || reason == "TargetNotEligible" || reason == "ForcedStartFailed"
        })
    };
    let (last, _) = poll(&api, name, ctx.wait, settled).await;
    let outcome = match last.as_ref().and_then(force_condition) {
        Some((status, _, _)) if status == "True" => Outcome::Done,
        Some((_, reason, message)) if reason != "Starting" => {
            eprintln!("warning: {message}");
            ctx.not_reached(&format!("{what} was not started by force on {node}"))
        }
        _ => ctx.not_reached(&format!("{what} has not started on {node}")),
    };
    print_after(ctx, last, &svc.spec.cluster_ref).await?;
    Ok(outcome)
}

/// The last step of `kubectl ha clear` on a service started by force:
/// removes [`annotations::FORCE_START`] only once every agent reported its
/// failures cleared (`cleared`). Removed together with the clear request,
/// the operator could see the request gone while the forced node still
/// reports its old failures, and fail the running service over.
pub async fn end_force_start(
    ctx: &Ctx,
    api: &Api<HAService>,
    svc: &HAService,
    cleared: bool,
) -> anyhow::Result<()> {
    let name = kube::ResourceExt::name_any(svc);
    if !kube::ResourceExt::annotations(svc).contains_key(annotations::FORCE_START) {
        return Ok(());
    }
    if !cleared {
        eprintln!(
            "note: {} kept: the failures are not all reported cleared yet (removing it now could move the service off the node it was forced on); run kubectl ha clear {name} again",
            annotations::FORCE_START
        );
        return Ok(());
    }
    let patch = json!({ "metadata": { "annotations": {
        annotations::FORCE_START: null,
        annotations::FORCE_START_FAIL_COUNT: null,
    } } });
    api.patch(&name, &params(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &format!("HAService {name}"), "patch"))?;
    ctx.say(&format!("{}: removed", annotations::FORCE_START));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(members: &[(&str, Mode)]) -> HACluster {
        kubeha_crds::testing::cluster("c", kubeha_crds::testing::members(members, None))
    }

    #[test]
    fn the_patches_set_and_remove_one_annotation() {
        assert_eq!(
            annotation_patch(annotations::FORCE_START, Some("node-2")),
            json!({"metadata": {"annotations": {"kubeha.io/force-start": "node-2"}}})
        );
        assert_eq!(
            annotation_patch(annotations::RELEASE_NODE, None),
            json!({"metadata": {"annotations": {"kubeha.io/release-node": null}}})
        );
        let v = reset_value("node-1", "2026-12-07T12:00:00Z");
        assert_eq!(
            annotations::reset_request(&v),
            Some(("node-1", "2026-12-07T12:00:00Z"))
        );
    }

    #[test]
    fn only_members_and_for_reset_default_members_are_accepted() {
        let c = cluster(&[("a", Mode::Default), ("b", Mode::Locked)]);
        assert_eq!(member_problem(&c, "a", "reset", true), None);
        assert_eq!(member_problem(&c, "b", "release", false), None);
        let why = member_problem(&c, "z", "release", false).unwrap();
        assert!(
            why.contains("z is not a member of HACluster c (members: a, b)"),
            "{why}"
        );
        let why = member_problem(&c, "b", "reset", true).unwrap();
        assert!(why.contains("mode locked"), "{why}");
        assert!(
            why.contains("kubectl ha mode b default --cluster c"),
            "{why}"
        );
    }
}
