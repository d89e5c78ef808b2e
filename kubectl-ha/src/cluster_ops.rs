//! The whole-cluster commands of StorNext's HA manager: `kubectl ha stop`,
//! `start` and `config NODE`, and the rule that a member leaves `config`
//! for `default` only with the services stopped.
//!
//! - `stop`: sets `spec.stopped` (the operator places nothing, every holder
//!   leaves through the ordinary handover, nothing fails over and nothing is
//!   fenced) and, in the same tested JSON patch, every listed member in
//!   `single`, `config` or `locked` back to `default`; `peerdown` marks stay
//!   (they certify power, which a stop does not change). StorNext locks the
//!   standby and puts the active node in config so that no monitor triggers
//!   a failover while it stops; `spec.stopped` gives the same guarantee in
//!   one write, since placement chooses no node at all. The command returns
//!   once every service of the cluster reports no active node and every
//!   node's entry `Stopped` (each leave returned), or when `--wait` runs
//!   out (exit 4).
//! - `start`: clears `spec.stopped`; placement picks the nodes again. It
//!   returns once every service is Active (exit 4 otherwise).
//! - `config NODE`: checks first that every other member is `locked` (and
//!   heartbeating) or `peerdown`, and that no service runs on another node,
//!   naming the member and the command to run otherwise; then sets NODE to
//!   mode `config`.

use anyhow::anyhow;
use kube::api::{ListParams, Patch};
use kube::{Api, ResourceExt};
use kubeha_crds::cluster::HeartbeatState;
use kubeha_crds::service::{NodeServiceState, Phase};
use kubeha_crds::{HACluster, HAService, Mode};
use serde_json::{Value, json};

use crate::{Ctx, Outcome, api_error, params, print_cluster_after, read_cluster, set_mode};

/// The cluster a command acts on: `cluster` when given, else the only
/// HACluster (the only one listing `node`, when a node is named).
pub async fn resolve_cluster(
    ctx: &Ctx,
    cluster: Option<&str>,
    node: Option<&str>,
) -> anyhow::Result<String> {
    if let Some(c) = cluster {
        return Ok(c.to_owned());
    }
    let all = Api::<HACluster>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "HAClusters", "list"))?
        .items;
    let names: Vec<String> = all
        .iter()
        .filter(|c| node.is_none_or(|n| member_mode(c, n).is_some()))
        .map(ResourceExt::name_any)
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(anyhow!(
            "no HACluster{} exists; create one or name it with --cluster",
            node.map(|n| format!(" with member {n}"))
                .unwrap_or_default()
        )),
        many => Err(anyhow!(
            "several HAClusters could be meant ({}); name one with --cluster",
            many.join(", ")
        )),
    }
}

/// The mode of `node` in `c`: the listed entry, else the status (members
/// picked by the selector); `None` when it is no member.
fn member_mode(c: &HACluster, node: &str) -> Option<Mode> {
    crate::render::spec_mode(c, node).or_else(|| {
        c.status
            .iter()
            .flat_map(|s| &s.members)
            .find(|m| m.node == node)
            .map(|m| m.mode)
    })
}

/// Every member of `c` (listed, then those only the status names) with its
/// mode and the heartbeat the operator last reported.
fn members(c: &HACluster) -> Vec<(String, Mode, Option<HeartbeatState>)> {
    let status: Vec<_> = c.status.iter().flat_map(|s| &s.members).collect();
    let heartbeat = |n: &str| status.iter().find(|m| m.node == n).map(|m| m.heartbeat);
    let mut out: Vec<(String, Mode, Option<HeartbeatState>)> = c
        .spec
        .members
        .nodes
        .iter()
        .map(|m| (m.name.clone(), m.mode, heartbeat(&m.name)))
        .collect();
    for m in &status {
        if !out.iter().any(|(n, _, _)| *n == m.node) {
            out.push((m.node.clone(), m.mode, Some(m.heartbeat)));
        }
    }
    out
}

/// Why `node` may not enter mode `config` in cluster `c` whose services
/// are `services`: the first member that is not locked and heartbeating
/// or peerdown, or a service running on another node; each message names
/// it and the command to run. `None`: it may.
pub fn config_refusal(c: &HACluster, node: &str, services: &[HAService]) -> Option<String> {
    let name = c.name_any();
    if member_mode(c, node).is_none() {
        return Some(format!(
            "{node} is not a member of HACluster {name}; list it in spec.members.nodes first"
        ));
    }
    for (peer, mode, heartbeat) in members(c) {
        if peer == node {
            continue;
        }
        match (mode, heartbeat) {
            (Mode::Peerdown, _) => {}
            (Mode::Locked, Some(HeartbeatState::Lost | HeartbeatState::Fenced)) => {
                return Some(format!(
                    "cannot put {node} in mode config: {peer} is locked but does not heartbeat (a locked member that stops communicating counts as default); if it is powered off, certify it with: kubectl ha peerdown {peer} --cluster {name}"
                ));
            }
            (Mode::Locked, _) => {}
            (mode, _) => {
                return Some(format!(
                    "cannot put {node} in mode config: {peer} is in mode {mode}; every other member must be locked or peerdown first: run kubectl ha mode {peer} locked --cluster {name} (or kubectl ha peerdown {peer} --cluster {name} if it is powered off)"
                ));
            }
        }
    }
    if let Some((svc, on)) = services.iter().find_map(|s| {
        let on = s.status.as_ref()?.active_node.clone()?;
        (on != node).then(|| {
            (
                format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
                on,
            )
        })
    }) {
        return Some(format!(
            "cannot put {node} in mode config: HAService {svc} is still active on {on}; wait until it has left (kubectl ha status --cluster {name}) and run the command again"
        ));
    }
    None
}

/// Why setting `node` to `mode` must wait: `config` returns to `default`
/// only with the services stopped (StorNext). `None` when the change may
/// go ahead: another transition, the cluster is stopped, or no service
/// of the cluster is active on `node`.
pub fn mode_change_refusal(
    c: &HACluster,
    node: &str,
    mode: Mode,
    services: &[HAService],
) -> Option<String> {
    let name = c.name_any();
    if mode != Mode::Default || member_mode(c, node) != Some(Mode::Config) || c.spec.stopped {
        return None;
    }
    let held: Vec<String> = services
        .iter()
        .filter(|s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.active_node.as_deref() == Some(node))
        })
        .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    // The API server refuses it too (the CRD's rule): only a write that
    // leaves the cluster stopped takes a member from config to default.
    let runs = if held.is_empty() {
        String::new()
    } else {
        format!(", and it runs {}", held.join(", "))
    };
    Some(format!(
        "{node} leaves mode config for default only with the cluster's services stopped{runs}; run kubectl ha stop --cluster {name} (it also sets every member back to default), then kubectl ha start --cluster {name}"
    ))
}

/// The JSON patch (RFC 6902) of `kubectl ha stop`: `spec.stopped` true and
/// every listed member in single, config or locked back to default, each
/// after a `test` of its name and mode at the index read.
pub fn stop_patch(c: &HACluster) -> Value {
    let mut ops = vec![json!({"op": "add", "path": "/spec/stopped", "value": true})];
    for (i, m) in c.spec.members.nodes.iter().enumerate() {
        if matches!(m.mode, Mode::Single | Mode::Config | Mode::Locked) {
            let base = format!("/spec/members/nodes/{i}");
            ops.push(json!({"op": "test", "path": format!("{base}/name"), "value": m.name}));
            ops.push(
                json!({"op": "test", "path": format!("{base}/mode"), "value": m.mode.as_str()}),
            );
            ops.push(json!({"op": "replace", "path": format!("{base}/mode"), "value": "default"}));
        }
    }
    Value::Array(ops)
}

/// Whether a service has left everywhere: no active node, phase
/// Suspended, and every node's entry Stopped, or Failed with no role and
/// nothing left unclean (an old failure, such as a permanent one, that no
/// leave will ever turn into Stopped).
pub fn left_everywhere(s: &HAService) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.active_node.is_none()
            && st.phase == Some(Phase::Suspended)
            && st.nodes.iter().all(|e| {
                e.state == NodeServiceState::Stopped
                    || e.state == NodeServiceState::Failed
                        && e.role == kubeha_crds::Role::None
                        && e.unclean_epoch.is_none()
            })
    })
}

fn running(s: &HAService) -> bool {
    s.status
        .as_ref()
        .is_some_and(|st| st.phase == Some(Phase::Active) && st.active_node.is_some())
}

async fn cluster_services(ctx: &Ctx, cluster: &str) -> anyhow::Result<Vec<HAService>> {
    Ok(Api::<HAService>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "HAServices", "list"))?
        .items
        .into_iter()
        .filter(|s| s.spec.cluster_ref == cluster)
        .collect())
}

/// Re-reads the cluster's services every half second until `done` holds
/// for each, or `ctx.wait` passed; the services not done at the end.
async fn wait_services(
    ctx: &Ctx,
    cluster: &str,
    done: impl Fn(&HAService) -> bool,
) -> anyhow::Result<Vec<String>> {
    let deadline = std::time::Instant::now() + ctx.wait;
    loop {
        let pending: Vec<String> = cluster_services(ctx, cluster)
            .await?
            .iter()
            .filter(|s| !done(s))
            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
            .collect();
        if pending.is_empty() || std::time::Instant::now() >= deadline {
            return Ok(pending);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `kubectl ha stop`: see the module documentation.
pub async fn stop(ctx: &Ctx, cluster: &str) -> anyhow::Result<Outcome> {
    let what = format!("HACluster {cluster}");
    let (api, c) = read_cluster(ctx, cluster).await?;
    let patch: json_patch::Patch = serde_json::from_value(stop_patch(&c))?;
    match api
        .patch(cluster, &params(), &Patch::Json::<()>(patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("test") => {
            anyhow::bail!(
                "{what}: spec.members.nodes changed while the cluster was being stopped ({}); run the command again",
                s.message
            )
        }
        Err(e) => return Err(api_error(e, &what, "patch")),
    }
    ctx.say(&format!(
        "{what}: stopped (spec.stopped=true); every member in mode default but peerdown ones; waiting for every service to leave"
    ));
    let pending = wait_services(ctx, cluster, left_everywhere).await?;
    let outcome = if pending.is_empty() {
        Outcome::Done
    } else {
        ctx.not_reached(&format!("{} have not left every node", pending.join(", ")))
    };
    print_cluster_after(ctx, cluster).await?;
    Ok(outcome)
}

/// `kubectl ha start`: see the module documentation.
pub async fn start(ctx: &Ctx, cluster: &str) -> anyhow::Result<Outcome> {
    let what = format!("HACluster {cluster}");
    let api: Api<HACluster> = Api::all(ctx.client.clone());
    api.patch(
        cluster,
        &params(),
        &Patch::Merge(&json!({"spec": {"stopped": null}})),
    )
    .await
    .map_err(|e| api_error(e, &what, "patch"))?;
    ctx.say(&format!(
        "{what}: started (spec.stopped removed); placement picks the nodes"
    ));
    let pending = wait_services(ctx, cluster, running).await?;
    let outcome = if pending.is_empty() {
        Outcome::Done
    } else {
        ctx.not_reached(&format!("{} are not Active", pending.join(", ")))
    };
    print_cluster_after(ctx, cluster).await?;
    Ok(outcome)
}

/// `kubectl ha config NODE`: see the module documentation.
pub async fn config(ctx: &Ctx, cluster: &str, node: &str) -> anyhow::Result<Outcome> {
    let (_, c) = read_cluster(ctx, cluster).await?;
    let services = cluster_services(ctx, cluster).await?;
    if let Some(why) = config_refusal(&c, node, &services) {
        anyhow::bail!(why);
    }
    set_mode(ctx, cluster, node, Mode::Config, None).await
}

/// Before `kubectl ha mode NODE MODE`: refuses what
/// [`mode_change_refusal`] refuses.
pub async fn check_mode_change(
    ctx: &Ctx,
    cluster: &str,
    node: &str,
    mode: Mode,
) -> anyhow::Result<()> {
    if mode != Mode::Default {
        return Ok(());
    }
    let (_, c) = read_cluster(ctx, cluster).await?;
    let services = cluster_services(ctx, cluster).await?;
    match mode_change_refusal(&c, node, mode, &services) {
        Some(why) => Err(anyhow!(why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeha_crds::cluster::MemberStatus;
    use kubeha_crds::testing::{cluster, members};

    fn c(modes: &[(&str, Mode)]) -> HACluster {
        cluster("c", members(modes, None))
    }

    fn svc_on(node: Option<&str>) -> HAService {
        let mut s = HAService::new("web", kubeha_crds::testing::service_spec("c", &[]));
        s.metadata.namespace = Some("ns".into());
        s.status = Some(kubeha_crds::service::HAServiceStatus {
            active_node: node.map(str::to_owned),
            ..Default::default()
        });
        s
    }

    #[test]
    fn config_is_refused_while_a_peer_is_default_naming_it_and_the_fix() {
        let cl = c(&[
            ("node-1", Mode::Default),
            ("node-2", Mode::Default),
            ("node-3", Mode::Locked),
        ]);
        let why = config_refusal(&cl, "node-1", &[]).unwrap();
        assert!(why.contains("node-2 is in mode default"), "{why}");
        assert!(
            why.contains("kubectl ha mode node-2 locked --cluster c"),
            "{why}"
        );
        let ok = c(&[
            ("node-1", Mode::Default),
            ("node-2", Mode::Locked),
            ("node-3", Mode::Peerdown),
        ]);
        assert_eq!(
            config_refusal(&ok, "node-1", &[svc_on(Some("node-1"))]),
            None
        );
        let why = config_refusal(&ok, "node-1", &[svc_on(Some("node-2"))]).unwrap();
        assert!(why.contains("ns/web is still active on node-2"), "{why}");
        assert!(
            config_refusal(&ok, "node-9", &[])
                .unwrap()
                .contains("not a member")
        );
    }

    #[test]
    fn a_locked_peer_that_does_not_heartbeat_counts_as_default() {
        let mut cl = c(&[("node-1", Mode::Default), ("node-2", Mode::Locked)]);
        cl.status = Some(kubeha_crds::HAClusterStatus {
            members: vec![MemberStatus {
                node: "node-2".into(),
                heartbeat: HeartbeatState::Lost,
                mode: Mode::Locked,
                roles: vec![],
            }],
            ..Default::default()
        });
        let why = config_refusal(&cl, "node-1", &[]).unwrap();
        assert!(
            why.contains("kubectl ha peerdown node-2 --cluster c"),
            "{why}"
        );
    }

    #[test]
    fn an_old_failure_with_no_role_counts_as_left_but_an_unclean_one_does_not() {
        let entry = |state, unclean: Option<i64>| {
            let mut e = kubeha_crds::testing::status_entry(
                "node-1",
                kubeha_crds::Role::None,
                state,
                2,
                Some(2),
            );
            e.unclean_epoch = unclean;
            e
        };
        let mut s = svc_on(None);
        let st = s.status.as_mut().unwrap();
        st.phase = Some(Phase::Suspended);
        st.nodes = vec![
            entry(NodeServiceState::Stopped, None),
            entry(NodeServiceState::Failed, None),
        ];
        assert!(left_everywhere(&s));
        s.status.as_mut().unwrap().nodes[1].unclean_epoch = Some(3);
        assert!(!left_everywhere(&s), "a node that may still run it");
        s.status.as_mut().unwrap().nodes[1] = entry(NodeServiceState::Running, None);
        assert!(!left_everywhere(&s));
    }

    #[test]
    fn config_returns_to_default_only_stopped() {
        let mut cl = c(&[("node-1", Mode::Config), ("node-2", Mode::Locked)]);
        let why =
            mode_change_refusal(&cl, "node-1", Mode::Default, &[svc_on(Some("node-1"))]).unwrap();
        assert!(why.contains("kubectl ha stop --cluster c"), "{why}");
        // Refused too with nothing running there: the cluster is not stopped.
        let why = mode_change_refusal(&cl, "node-1", Mode::Default, &[svc_on(None)]).unwrap();
        assert!(why.contains("kubectl ha stop --cluster c"), "{why}");
        assert_eq!(
            mode_change_refusal(&cl, "node-2", Mode::Default, &[svc_on(Some("node-1"))]),
            None
        );
        cl.spec.stopped = true;
        assert_eq!(
            mode_change_refusal(&cl, "node-1", Mode::Default, &[svc_on(Some("node-1"))]),
            None
        );
    }

    #[test]
    fn stop_patch_stops_and_resets_modes_but_peerdown() {
        let cl = c(&[
            ("node-1", Mode::Config),
            ("node-2", Mode::Locked),
            ("node-3", Mode::Peerdown),
        ]);
        let p = stop_patch(&cl);
        let ops = p.as_array().unwrap();
        assert_eq!(
            ops[0],
            json!({"op": "add", "path": "/spec/stopped", "value": true})
        );
        assert_eq!(ops.len(), 7, "{p}");
        assert_eq!(ops[3]["path"], "/spec/members/nodes/0/mode");
        assert_eq!(ops[6]["value"], "default");
        assert!(!p.to_string().contains("nodes/2"), "peerdown stays: {p}");
        let _: json_patch::Patch = serde_json::from_value(p).unwrap();
    }
}
