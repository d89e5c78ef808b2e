//! Hostile cases: bounds (issue 9 item 5). Addresses no VIP may be (a /0
//! prefix, link-local, the metadata address, loopback, multicast, the
//! network or broadcast address of its prefix, a node's own address), pool
//! ranges no pool may hold, and names too long for the labels and Lease
//! names they feed. The API server rejects what one object shows (CEL,
//! naming the field); the operator refuses what needs other objects (the
//! Nodes, the members a selector picks) with a Stalled condition, and no
//! address appears on any node.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use super::{Case, Ctx, Residue, clip, condition};
use crate::lab::Lab;
use crate::{ha, nodes};

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "bounds-vip-prefix-zero",
            expected: "a VIP 198.18.0.100/0 (an on-link default route) is rejected by the API server naming spec.vips[0].address and the /8 floor",
            run: vip_prefix_zero,
        },
        Case {
            name: "bounds-vip-ipv6-prefix-too-short",
            expected: "a VIP 2001:db8::100/12 is rejected by the API server naming spec.vips[0].address and the /16 floor",
            run: vip_ipv6_prefix_too_short,
        },
        Case {
            name: "bounds-vip-link-local",
            expected: "a link-local VIP 169.254.10.1/16 is rejected by the API server naming spec.vips[0].address",
            run: vip_link_local,
        },
        Case {
            name: "bounds-vip-metadata-address",
            expected: "the metadata address 169.254.169.254/32 as a VIP is rejected by the API server naming spec.vips[0].address",
            run: vip_metadata_address,
        },
        Case {
            name: "bounds-vip-ipv6-link-local",
            expected: "a VIP fe80::10/64 is rejected by the API server naming spec.vips[0].address",
            run: vip_ipv6_link_local,
        },
        Case {
            name: "bounds-vip-loopback",
            expected: "a loopback VIP 127.0.0.2/8 is rejected by the API server naming spec.vips[0].address",
            run: vip_loopback,
        },
        Case {
            name: "bounds-vip-multicast",
            expected: "a multicast VIP 224.0.0.18/24 (VRRP's group) is rejected by the API server naming spec.vips[0].address",
            run: vip_multicast,
        },
        Case {
            name: "bounds-vip-network-address",
            expected: "a VIP 198.18.0.96/27 (the network address of its prefix) is rejected by the API server naming spec.vips[0].address",
            run: vip_network_address,
        },
        Case {
            name: "bounds-vip-broadcast-address",
            expected: "a VIP 198.18.0.127/27 (the broadcast address of its prefix) is rejected by the API server naming spec.vips[0].address",
            run: vip_broadcast_address,
        },
        Case {
            name: "bounds-gateway-multicast",
            expected: "a default-route gateway 224.0.0.1 is rejected by the API server naming spec.defaultRoute.gateway",
            run: gateway_multicast,
        },
        Case {
            name: "bounds-pool-prefix-zero",
            expected: "an HACluster with vipPool 0.0.0.0/0 is rejected by the API server naming spec.vipPool[0]",
            run: pool_prefix_zero,
        },
        Case {
            name: "bounds-pool-link-local",
            expected: "an HACluster with vipPool 169.254.0.0/16 is rejected by the API server naming spec.vipPool[0]",
            run: pool_link_local,
        },
        Case {
            name: "bounds-cluster-name-64",
            expected: "a 64-character HACluster name (the kubeha.io/cluster label takes 63) is rejected by the API server naming metadata.name",
            run: cluster_name_64,
        },
        Case {
            name: "bounds-cluster-name-with-dot",
            expected: "an HACluster name with a dot (heartbeat Leases are kubeha-hb-<cluster>.<node>) is rejected by the API server naming metadata.name",
            run: cluster_name_with_dot,
        },
        Case {
            name: "bounds-service-name-64",
            expected: "a 64-character HAService name (the kubeha.io/service label takes 63) is rejected by the API server naming metadata.name",
            run: service_name_64,
        },
        Case {
            name: "bounds-member-name-64",
            expected: "a listed member node name of 64 characters is rejected by the API server naming spec.members.nodes[0].name",
            run: member_name_64,
        },
        Case {
            name: "bounds-vip-prefix-shorter-than-pool",
            expected: "a VIP 198.18.0.100/24 in a cluster whose pool is 198.18.0.96/27 (its on-link route would reach outside the pool) is refused by the operator (Stalled, InvalidSpec, naming the range and /27); no address appears",
            run: vip_prefix_shorter_than_pool,
        },
        Case {
            name: "bounds-vip-is-node-address",
            expected: "a VIP equal to node-2's own address (in the pool) is refused by the operator (Stalled, InvalidSpec, naming node-2); node-2's address stays permanent, no address appears anywhere",
            run: vip_is_node_address,
        },
        Case {
            name: "bounds-vip-already-on-host",
            expected: "a VIP that node-1 already has as a permanent address of its own (not in its Node status, so the operator places it there) is refused by node-1's agent, naming the address and eth0; the address stays permanent through the entry and the service's deletion",
            run: vip_already_on_host,
        },
        Case {
            name: "bounds-vip-claimed-by-older-service",
            expected: "a second HAService claiming the VIP an Active older one holds is refused by the operator (Stalled, InvalidSpec, naming the older service); the older stays Active with the VIP on its node alone",
            run: vip_claimed_by_older_service,
        },
        Case {
            name: "bounds-selected-member-name-64",
            expected: "a Node with a 64-character name picked by the cluster's selector makes the operator refuse the cluster's service (Stalled, InvalidSpec, naming the node and spec.members.selector); no address appears",
            run: selected_member_name_64,
        },
        Case {
            name: "bounds-prefix-related-cluster-names",
            expected: "HAClusters hostile-hb and hostile-hb-node over the same nodes are both accepted and heartbeat separately: all members Ready in both, one Lease kubeha-hb-<cluster>.<node> per cluster and node",
            run: prefix_related_cluster_names,
        },
    ]
}

/// A name of exactly `len` characters starting with `prefix`.
fn long_name(prefix: &str, len: usize) -> String {
    format!("{prefix}{}", "x".repeat(len.saturating_sub(prefix.len())))
}

/// An HAService `name` of cluster `cluster` with one VIP `vip`.
fn service(name: &str, cluster: &str, vip: &str) -> Value {
    ha::service(name, cluster, &[vip], None, (3, 100))
}

/// An HACluster `name` of nodes 1 and 2 with pool `pool`.
fn cluster(name: &str, pool: &[&str]) -> Value {
    let mut c = ha::cluster(name, &[1, 2], ha::Timing::DEFAULT);
    c["spec"]["vipPool"] = json!(pool);
    c
}

/// `kind` as kubectl takes it, and the namespace flag an object needs.
fn locate(object: &Value) -> (String, String, Option<String>) {
    (
        object["kind"].as_str().unwrap_or_default().to_lowercase(),
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        object["metadata"]["namespace"].as_str().map(str::to_owned),
    )
}

/// Whether `object` is stored.
fn stored(lab: &Lab, object: &Value) -> bool {
    let (kind, name, namespace) = locate(object);
    let mut args = vec!["get", kind.as_str(), name.as_str()];
    if let Some(ns) = namespace.as_deref() {
        args.extend(["-n", ns]);
    }
    lab.kubectl_output(&args).is_ok_and(|o| o.status.success())
}

/// Applies `object` and expects the API server to reject it with a message
/// naming `field` and containing `words`; nothing may be stored.
fn rejected(ctx: &Ctx, object: &Value, field: &str, words: &str) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let (kind, name, namespace) = locate(object);
    let message = match ha::apply(lab, object) {
        Ok(()) => {
            ha::delete(lab, &kind, &name, namespace.as_deref());
            bail!("the API server accepted {kind} {name}");
        }
        Err(e) => format!("{e:#}"),
    };
    if !message.contains(field) || !message.contains(words) {
        bail!("rejected, but the message lacks {field:?} or {words:?}: {message}");
    }
    if stored(lab, object) {
        ha::delete(lab, &kind, &name, namespace.as_deref());
        bail!("rejected, yet {kind} {name} is stored");
    }
    let shown = message
        .split_once("is invalid: ")
        .map_or(message.as_str(), |(_, m)| m)
        .trim();
    Ok(format!("rejected by the API server: {}", clip(shown)))
}

fn vip_rejected(ctx: &Ctx, case: &str, vip: &str, words: &str) -> anyhow::Result<String> {
    let name = format!("hostile-{case}");
    rejected(
        ctx,
        &service(&name, &name, vip),
        "spec.vips[0].address",
        words,
    )
}

/// One case function per rejected VIP: `fn NAME(ctx)` applies a service
/// (named after `case`) with VIP `vip` and expects `words` in the rejection.
macro_rules! vip_rejected_case {
    ($($fn_name:ident: $case:literal, $vip:literal, $words:literal;)*) => {
        $(
            fn $fn_name(ctx: &Ctx) -> anyhow::Result<String> {
                vip_rejected(ctx, $case, $vip, $words)
            }
        )*
    };
}

vip_rejected_case! {
    vip_prefix_zero: "vip-prefix-zero", "198.18.0.100/0", "at least /8 for IPv4";
    vip_ipv6_prefix_too_short: "vip-ipv6-short", "2001:db8::100/12", "/16 for IPv6";
    vip_link_local: "vip-link-local", "169.254.10.1/16", "link-local";
    vip_metadata_address: "vip-metadata", "169.254.169.254/32", "metadata address 169.254.169.254";
    vip_ipv6_link_local: "vip-ipv6-link-local", "fe80::10/64", "fe80::/10";
    vip_loopback: "vip-loopback", "127.0.0.2/8", "loopback";
    vip_multicast: "vip-multicast", "224.0.0.18/24", "multicast";
    vip_network_address: "vip-network", "198.18.0.96/27", "network address of its own prefix";
    vip_broadcast_address: "vip-broadcast", "198.18.0.127/27", "broadcast address of its own prefix";
}

fn gateway_multicast(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-gateway-multicast";
    let mut svc = service(name, name, "198.18.0.100/24");
    svc["spec"]["defaultRoute"] = json!({"gateway": "224.0.0.1"});
    rejected(
        ctx,
        &svc,
        "spec.defaultRoute.gateway",
        "unicast router address",
    )
}

fn pool_prefix_zero(ctx: &Ctx) -> anyhow::Result<String> {
    rejected(
        ctx,
        &cluster("hostile-pool-prefix-zero", &["0.0.0.0/0"]),
        "spec.vipPool[0]",
        "at least /8 for IPv4",
    )
}

fn pool_link_local(ctx: &Ctx) -> anyhow::Result<String> {
    rejected(
        ctx,
        &cluster("hostile-pool-link-local", &["169.254.0.0/16"]),
        "spec.vipPool[0]",
        "link-local",
    )
}

fn cluster_name_64(ctx: &Ctx) -> anyhow::Result<String> {
    rejected(
        ctx,
        &cluster(&long_name("hostile-", 64), &["198.18.0.96/27"]),
        "metadata.name",
        "at most 63 characters",
    )
}

fn cluster_name_with_dot(ctx: &Ctx) -> anyhow::Result<String> {
    rejected(
        ctx,
        &cluster("hostile.dotted", &["198.18.0.96/27"]),
        "metadata.name",
        "DNS label",
    )
}

fn service_name_64(ctx: &Ctx) -> anyhow::Result<String> {
    let name = long_name("hostile-", 64);
    rejected(
        ctx,
        &service(&name, "hostile-service-name-64", "198.18.0.100/24"),
        "metadata.name",
        "at most 63 characters",
    )
}

fn member_name_64(ctx: &Ctx) -> anyhow::Result<String> {
    let mut c = cluster("hostile-member-name-64", &["198.18.0.96/27"]);
    c["spec"]["members"]["nodes"] = json!([{"name": long_name("node-", 64)}, {"name": "node-2"}]);
    rejected(ctx, &c, "spec.members.nodes[0].name", "63")
}

/// `status.ready` of HACluster `name` (`alive/members`), empty when unknown.
fn cluster_ready(lab: &Lab, name: &str) -> String {
    lab.kubectl_ok(&["get", "hacluster", name, "-o", "jsonpath={.status.ready}"])
        .map(|r| r.trim().to_owned())
        .unwrap_or_default()
}

/// Applies `cluster` (until its `status.ready` is `ready`) and then `svc`,
/// and expects the operator to refuse the service: a Stalled condition
/// with reason InvalidSpec whose message contains every one of `words`,
/// no active node, `vip` held by the nodes that held it before and no new
/// address or process anywhere. Removes both objects whatever happens.
fn refused_by_operator(
    ctx: &Ctx,
    cluster: &Value,
    svc: &Value,
    ready: &str,
    vip: &str,
    words: &[&str],
) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let (_, cluster_name, _) = locate(cluster);
    let (_, name, _) = locate(svc);
    let cleanup = || {
        ha::delete_service(lab, &name);
        ha::delete(lab, "hacluster", &cluster_name, None);
    };
    cleanup();
    let result = (|| {
        let holders_before = ha::vip_holders(vip);
        let before = Residue::of(lab);
        ha::apply(lab, cluster)?;
        if ha::wait_until(Duration::from_secs(30), || {
            cluster_ready(lab, &cluster_name) == ready
        })
        .is_none()
        {
            bail!(
                "cluster {cluster_name} never had {ready} members ready (it shows {:?})",
                cluster_ready(lab, &cluster_name)
            );
        }
        ha::apply(lab, svc)?;
        let mut stalled = Value::Null;
        let seen = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
            let status = ha::service_status(lab, &name);
            stalled = condition(&status, "Stalled").cloned().unwrap_or_default();
            let message = stalled["message"].as_str().unwrap_or_default();
            stalled["status"] == "True"
                && stalled["reason"] == "InvalidSpec"
                && words.iter().all(|w| message.contains(w))
        });
        if seen.is_none() {
            bail!(
                "no Stalled condition with reason InvalidSpec naming {words:?} within 30 s; Stalled is {stalled}"
            );
        }
        // Give a wrong assignment time to show.
        std::thread::sleep(Duration::from_secs(3));
        let status = ha::service_status(lab, &name);
        if status["activeNode"].is_string() || status["phase"] == "Active" {
            bail!("refused, yet placed: status {status}");
        }
        let holders = ha::vip_holders(vip);
        if holders != holders_before {
            bail!("{vip} was held by {holders_before:?}, now by {holders:?}");
        }
        if let Some(left) = Residue::of(lab).left_since(&before) {
            bail!("refused, but {left}");
        }
        // Told once as a Warning Event too.
        let events = super::events_about(lab, ha::SERVICE_NAMESPACE, &name);
        if !events.iter().any(|(reason, _)| reason == "InvalidSpec") {
            bail!("refused, but no InvalidSpec Event about the service: {events:?}");
        }
        Ok(format!(
            "refused by the operator: Stalled/InvalidSpec \"{}\" and an InvalidSpec Event; {vip} held by {holders:?} as before, no new address or process",
            clip(stalled["message"].as_str().unwrap_or_default())
        ))
    })();
    cleanup();
    result
}

/// `valid_life_time` of `address` on lab node `i` (`u32::MAX`: forever).
fn valid_lifetime(i: u8, address: &str) -> Option<u64> {
    let out = std::process::Command::new("ip")
        .args(["-n", &nodes::node_ns(i), "-j", "addr", "show"])
        .output()
        .ok()?;
    let links: Value = serde_json::from_slice(&out.stdout).ok()?;
    links
        .as_array()?
        .iter()
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
        .find(|a| a["local"] == address)
        .and_then(|a| a["valid_life_time"].as_u64())
}

fn vip_prefix_shorter_than_pool(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-vip-prefix-pool";
    refused_by_operator(
        ctx,
        &cluster(name, &["198.18.0.96/27"]),
        &service(name, name, "198.18.0.100/24"),
        "2/2",
        "198.18.0.100",
        &["198.18.0.96/27", "/27"],
    )
}

fn vip_is_node_address(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-vip-is-node-address";
    let own = nodes::node_ip(2)?.to_string();
    let forever = u64::from(u32::MAX);
    if valid_lifetime(2, &own) != Some(forever) {
        bail!(
            "node-2's address {own} is not permanent before the case: {:?}",
            valid_lifetime(2, &own)
        );
    }
    let outcome = refused_by_operator(
        ctx,
        &cluster(name, &["198.18.0.0/24"]),
        &service(name, name, &format!("{own}/24")),
        "2/2",
        &own,
        &[&format!("{own} is an address of node node-2")],
    )?;
    match valid_lifetime(2, &own) {
        Some(l) if l == forever => Ok(format!("{outcome}; node-2's {own} still permanent")),
        other => bail!("{outcome}, but node-2's {own} now has valid_lft {other:?}"),
    }
}

fn selected_member_name_64(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-selected-member-name-64";
    let node = long_name("hostile-node-", 64);
    let label = "kubeha.io/hostile-long-name";
    let remove_node = || ha::delete(lab, "node", &node, None);
    remove_node();
    ha::apply(
        lab,
        &json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node, "labels": {label: "yes"}},
        }),
    )?;
    let mut c = cluster(name, &["198.18.0.96/27"]);
    c["spec"]["members"]["selector"] = json!({"matchLabels": {label: "yes"}});
    let result = refused_by_operator(
        ctx,
        &c,
        &service(name, name, "198.18.0.120/27"),
        // The listed nodes heartbeat; the selected one has no agent.
        "2/3",
        "198.18.0.120",
        &[&node, "spec.members.selector"],
    );
    remove_node();
    result
}

fn prefix_related_cluster_names(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let names = ["hostile-hb", "hostile-hb-node"];
    let cleanup = || {
        for n in names {
            ha::delete(lab, "hacluster", n, None);
        }
    };
    cleanup();
    let result = (|| {
        for n in names {
            ha::apply(lab, &ha::cluster(n, &[1, 2, 3], ha::Timing::DEFAULT))
                .map_err(|e| anyhow::anyhow!("{n} was not accepted: {e:#}"))?;
        }
        if ha::wait_until(Duration::from_secs(30), || {
            names.iter().all(|n| ha::members_ready(lab, n, 3))
        })
        .is_none()
        {
            let ready: Vec<String> = names
                .iter()
                .map(|n| format!("{n} {}", cluster_ready(lab, n)))
                .collect();
            bail!("not every member Ready in both clusters within 30 s: {ready:?}");
        }
        let leases = lab.kubectl_json(&[
            "get",
            "leases",
            "-n",
            ha::OPERATOR_NAMESPACE,
            "-l",
            "kubeha.io/lease=heartbeat",
        ])?;
        let have: std::collections::BTreeSet<String> = leases["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        let want: Vec<String> = names
            .iter()
            .flat_map(|c| (1..=3).map(move |i| format!("kubeha-hb-{c}.{}", nodes::node_name(i))))
            .collect();
        let missing: Vec<&String> = want.iter().filter(|w| !have.contains(*w)).collect();
        if !missing.is_empty() {
            bail!("heartbeat Leases missing: {missing:?} (have {have:?})");
        }
        Ok(format!(
            "both accepted, 3/3 Ready in each; six separate heartbeat Leases: {}",
            want.join(", ")
        ))
    })();
    cleanup();
    result
}

fn vip_already_on_host(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-vip-already-on-host";
    let own = "198.18.0.98";
    let ns = nodes::node_ns(1);
    let forever = u64::from(u32::MAX);
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["-n", &ns])
            .args(args)
            .output()
    };
    let cleanup = || {
        ha::delete_service(lab, name);
        ha::delete(lab, "hacluster", name, None);
        let _ = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
            !stored(lab, &service(name, name, "198.18.0.98/24"))
        });
        let _ = ip(&["addr", "del", &format!("{own}/24"), "dev", "eth0"]);
    };
    cleanup();
    let result = (|| {
        let out = ip(&["addr", "add", &format!("{own}/24"), "dev", "eth0"])?;
        if !out.status.success() {
            bail!(
                "could not give node-1 its own {own}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ha::apply(lab, &ha::cluster(name, &[1, 2], ha::Timing::DEFAULT))?;
        if ha::wait_until(Duration::from_secs(30), || ha::members_ready(lab, name, 2)).is_none() {
            bail!("cluster {name} never had 2/2 members ready");
        }
        ha::apply(lab, &service(name, name, &format!("{own}/24")))?;
        let mut refusal = String::new();
        let seen = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
            let entry = ha::node_entry(lab, name, 1);
            refusal = entry["hooks"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|h| h["outputTail"].as_array().cloned().unwrap_or_default())
                .filter_map(|l| l.as_str().map(str::to_owned))
                .find(|l| l.contains("kubeha did not add it"))
                .unwrap_or_default();
            !refusal.is_empty()
        });
        if seen.is_none() {
            bail!(
                "node-1 never reported refusing {own} within 30 s: its entry {}",
                ha::node_entry(lab, name, 1)
            );
        }
        if !refusal.contains(own) || !refusal.contains("eth0") {
            bail!("the refusal does not name {own} and eth0: {refusal}");
        }
        let during = valid_lifetime(1, own);
        ha::delete_service(lab, name);
        let gone = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
            ha::vip_holders(own) == [1]
        });
        let after = valid_lifetime(1, own);
        if during != Some(forever) || after != Some(forever) {
            bail!(
                "node-1's own {own} lost its permanence: valid_lft {during:?} while refused, {after:?} after the service's deletion"
            );
        }
        if gone.is_none() {
            bail!(
                "{own} still held by {:?} 30 s after the service's deletion",
                ha::vip_holders(own)
            );
        }
        Ok(format!(
            "refused by node-1's agent: \"{}\"; node-1's {own} permanent during and after",
            clip(&refusal)
        ))
    })();
    cleanup();
    result
}

fn vip_claimed_by_older_service(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let vip = "198.18.0.121";
    let older = ctx.active_service("hostile-vip-claimed", vip, &[1, 2])?;
    let newer = "hostile-vip-claimed-newer";
    ha::delete_service(lab, newer);
    let result = (|| {
        ha::apply(lab, &service(newer, &older.name, &format!("{vip}/24")))?;
        let mut stalled = Value::Null;
        let by = format!("{}/{}", ha::SERVICE_NAMESPACE, older.name);
        let seen = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
            stalled = condition(&ha::service_status(lab, newer), "Stalled")
                .cloned()
                .unwrap_or_default();
            stalled["reason"] == "InvalidSpec"
                && stalled["message"].as_str().is_some_and(|m| {
                    m.contains(&format!("already claimed by the older HAService {by}"))
                })
        });
        if seen.is_none() {
            bail!("{newer} was not refused for claiming {vip} within 30 s; Stalled is {stalled}");
        }
        std::thread::sleep(Duration::from_secs(3));
        let status = ha::service_status(lab, newer);
        if status["activeNode"].is_string() {
            bail!("{newer} was refused, yet placed: {status}");
        }
        let still = older.wait_active(Duration::from_secs(5))?;
        if still != older.active {
            bail!(
                "the older service moved from node-{} to node-{still}",
                older.active
            );
        }
        Ok(format!(
            "refused by the operator: Stalled/InvalidSpec \"{}\"; {} still Active on node-{still}, {vip} on that node alone",
            clip(stalled["message"].as_str().unwrap_or_default()),
            older.name
        ))
    })();
    ha::delete_service(lab, newer);
    let finished = older.finish();
    let outcome = result?;
    finished?;
    Ok(outcome)
}
