//! What the services show: the node each status names active, fail
//! counts, and the liveness check (every service answers the client from
//! its active node).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::SERVER_PORT;
use super::services::{service_name, service_vips};
use crate::ha;
use crate::lab::Lab;
use crate::nodes;

/// How often a wait on a service's status polls (each poll is a kubectl
/// call).
pub(super) const KUBECTL_POLL: Duration = Duration::from_millis(250);

/// The node service `k`'s status names active (phase Active), if any.
pub(super) fn active_node(lab: &Lab, k: usize) -> Option<u8> {
    let status = ha::service_status(lab, &service_name(k));
    if status["phase"] != "Active" {
        return None;
    }
    nodes::node_index(status["activeNode"].as_str()?)
}

/// The node service `k`'s status names active, waiting up to `timeout`
/// for one.
pub(super) fn wait_active(lab: &Lab, k: usize, timeout: Duration) -> Option<u8> {
    let mut on = None;
    ha::wait_every(timeout, KUBECTL_POLL, || {
        on = active_node(lab, k);
        on.is_some()
    })?;
    on
}

/// Service `k`'s fail count on node `i`, from its status.
pub(super) fn fail_count(lab: &Lab, k: usize, i: u8) -> i64 {
    let status = ha::service_status(lab, &service_name(k));
    status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["node"] == nodes::node_name(i).as_str())
        .and_then(|e| e["failCount"].as_i64())
        .unwrap_or(0)
}

/// Waits up to `timeout` for every service to answer on its VIP from the
/// node its status names active (phase Active, that node alone holds the
/// VIP, the client's ping is answered from that node's MAC, and the
/// service's TCP server answers the client with that node's name). Returns, per
/// service, when its first such answer came (`None`: not within
/// `timeout`). One pass reads every status with one call and every node's
/// addresses at once, and pings the candidates in parallel, so a pass takes
/// a ping's round trip, not one per service.
pub(super) fn wait_live(lab: &Lab, services: usize, timeout: Duration) -> Vec<Option<Duration>> {
    let start = Instant::now();
    let mut first: Vec<Option<Duration>> = vec![None; services];
    while start.elapsed() < timeout && first.iter().any(Option::is_none) {
        let statuses = service_statuses(lab);
        let addresses = ha::node_addresses();
        let holders = |vip: &str| -> Vec<u8> {
            addresses
                .iter()
                .filter(|(_, a)| a.iter().any(|x| x == vip))
                .map(|(i, _)| *i)
                .collect()
        };
        let candidates: Vec<(usize, String, u8)> = (0..services)
            .filter(|k| first[*k].is_none())
            .filter_map(|k| {
                let status = statuses.get(&service_name(k))?;
                let active = nodes::node_index(status["activeNode"].as_str()?)?;
                let (v4, _) = service_vips(k);
                (status["phase"] == "Active" && holders(&v4) == [active]).then_some((k, v4, active))
            })
            .collect();
        let answered: Vec<(usize, Option<Duration>)> = std::thread::scope(|scope| {
            let pings: Vec<_> = candidates
                .iter()
                .map(|(k, v4, active)| {
                    scope.spawn(move || {
                        // When the client asked: the answer proves the
                        // service was live then (a busy API server can make
                        // the pass itself slow).
                        let asked = start.elapsed();
                        let live = ha::client_reaches(v4, *active)
                            && ha::client_tcp_reply(v4, SERVER_PORT).as_deref()
                                == Some(nodes::node_name(*active).as_str());
                        (*k, live.then_some(asked))
                    })
                })
                .collect();
            pings.into_iter().filter_map(|p| p.join().ok()).collect()
        });
        for (k, at) in answered {
            if at.is_some() {
                first[k] = at;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    first
}

/// The status of every HAService in the services' namespace, by name.
fn service_statuses(lab: &Lab) -> BTreeMap<String, serde_json::Value> {
    let list: serde_json::Value = ha::get_services(lab, "json")
        .ok()
        .and_then(|out| serde_json::from_str(&out).ok())
        .unwrap_or_default();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            Some((
                item["metadata"]["name"].as_str()?.to_owned(),
                item["status"].clone(),
            ))
        })
        .collect()
}

/// What the services not in `healthy` show: status phase, active node,
/// holders, conditions.
pub(super) fn unhealthy(lab: &Lab, services: usize, healthy: &[usize]) -> Vec<String> {
    (0..services)
        .filter(|k| !healthy.contains(k))
        .map(|k| {
            let (v4, _) = service_vips(k);
            let status = ha::service_status(lab, &service_name(k));
            // What the client sees: its ping, and the MAC it resolved.
            let ping = nodes::exec_in(nodes::CLIENT_NS, &["ping", "-c", "1", "-W", "1", &v4])
                .output()
                .is_ok_and(|o| o.status.success());
            let neigh = nodes::exec_in(nodes::CLIENT_NS, &["ip", "neigh", "show", &v4])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            format!(
                "{} ({v4}): phase {}, active {}, holders {:?}, client ping {}, client neighbour [{neigh}], node entries {}, conditions {}",
                service_name(k),
                status["phase"],
                status["activeNode"],
                ha::vip_holders(&v4),
                if ping { "answered" } else { "unanswered" },
                status["nodes"],
                status["conditions"]
            )
        })
        .collect()
}
