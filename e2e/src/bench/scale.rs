//! `bench scale`: many nodes and HAServices spread over them. The steady
//! state at each service count (API writes per second from the API
//! server's own counters, operator and agent RSS and CPU over the same
//! window), then a power-off of the node holding the most services, timed
//! per service to the first ARP answer from another node as the client
//! sees it, with the API server's request rate meanwhile.
//!
//! The lab's segment (198.18.0.0/24) holds no 1,000 VIPs: the services'
//! VIPs come from [`POOL`], on the nodes' segment interface by name (a
//! VIP's `interface`), the way a VIP lives in a prefix of its own on a
//! shared link. The client's ARP probe needs no address in it: a node
//! answers an RFC 5227 probe (sender 0.0.0.0) for any address it holds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{ApiRequests, cpu_seconds, operator_lab, rss_mb};
use crate::arp_probe::ArpProbe;
use crate::ha::{self, Timing};
use crate::lab::Lab;
use crate::nodes;

/// The cluster's VIP pool: 1,022 addresses, four /24s from 198.18.8.0.
pub const POOL: &str = "198.18.8.0/22";
/// The most services the pool gives a VIP each (250 per /24).
pub const MAX_SERVICES: usize = 1000;
/// Label every benchmark service carries, valued with its cluster's name.
const BENCH_LABEL: &str = "kubeha.io/bench";

/// How often the power-off's client probe asks for each VIP: every request
/// is a broadcast all 20 nodes' kernels handle, and at 50 VIPs every 10 ms
/// (the failover bench's rate) that is 100,000 frames a second on the
/// machine measured. The answer times are at most this late.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// What `bench scale` measures.
#[derive(Debug, Clone)]
pub struct ScalePlan {
    /// Lab nodes, every one a member of the cluster.
    pub nodes: u8,
    /// Service counts at which the steady state is measured, ascending:
    /// services are added up to each; the failover runs at the last.
    pub services: Vec<usize>,
    /// Seconds of each steady-state window.
    pub steady_secs: u64,
    /// Services applied at once, each wave Active before the next is
    /// applied (0: every service of a count at once).
    pub wave: usize,
}

/// Median and maximum of a sample.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct MedianMax {
    /// Median.
    pub median: f64,
    /// Maximum.
    pub max: f64,
}

impl MedianMax {
    fn of(samples: &[f64]) -> MedianMax {
        MedianMax {
            median: super::summarize(samples).median,
            max: samples.iter().copied().reduce(f64::max).unwrap_or(f64::NAN),
        }
    }
}

/// The steady state at one service count.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Steady {
    /// HAServices, all Active.
    pub services: usize,
    /// Seconds from the first apply of this step to every service Active.
    pub settle_s: f64,
    /// Write requests per second the API server served (its
    /// `apiserver_request_total`), nothing changing.
    pub writes_per_s: f64,
    /// All requests per second, reads and watches included.
    pub requests_per_s: f64,
    /// `writes_per_s` by `resource verb`, the busiest first.
    pub writes_by: Vec<(String, f64)>,
    /// API writes per service added in this step, from its first apply to
    /// every service Active, by `resource verb` (the busiest first): what
    /// creating a service costs the API server.
    pub created_writes_by: Vec<(String, f64)>,
    /// Resident memory of the operator, MiB.
    pub operator_rss_mb: f64,
    /// CPU of the operator, percent of one core.
    pub operator_cpu_pct: f64,
    /// Resident memory of the agents, MiB, over the nodes.
    pub agent_rss_mb: MedianMax,
    /// HAService watch events the API server sent (to the operator and
    /// the agents) from this step's first apply to the end of its steady
    /// window, per service added in the step: the fan-out of each write.
    pub haservice_watch_events_per_service: f64,
    /// CPU of the agents, percent of one core, over the nodes.
    pub agent_cpu_pct: MedianMax,
}

impl Steady {
    /// [`Steady::writes_by`] as one line: `leases APPLY 20.00, ...`.
    pub fn writes_by_text(&self) -> String {
        rates_text(&self.writes_by)
    }

    /// [`Steady::created_writes_by`] as one line.
    pub fn created_writes_by_text(&self) -> String {
        rates_text(&self.created_writes_by)
    }
}

/// Figures by `resource verb` as one line: `leases APPLY 20.00, ...`.
fn rates_text(rates: &[(String, f64)]) -> String {
    rates
        .iter()
        .map(|(k, r)| format!("{k} {r:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The power-off of the node holding the most services.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failover {
    /// The node powered off.
    pub node: String,
    /// Services it held.
    pub services: usize,
    /// Per service: power-off to the first ARP answer (or announcement)
    /// for its VIP from another node's MAC, ms.
    pub answer_ms: MedianMax,
    /// The same, per service.
    pub answer_ms_by_service: BTreeMap<String, f64>,
    /// Services whose VIP no other node answered for.
    pub unanswered: Vec<String>,
    /// Windows in which two MACs answered for one VIP.
    pub two_mac_windows: usize,
    /// Power-off to the moment every VIP was seen on another node (the
    /// window of the request rates), ms.
    pub window_ms: f64,
    /// API requests per second in that window, reads and watches included.
    pub requests_per_s: f64,
    /// API write requests per second in that window.
    pub writes_per_s: f64,
    /// The writes of that window by resource and verb, per service moved
    /// (the heartbeats' renewals included).
    pub writes_by_per_service: Vec<(String, f64)>,
    /// Power-off to every one of those services reported Active on another
    /// node in its status, s.
    pub status_settled_s: f64,
}

impl Failover {
    /// [`Failover::writes_by_per_service`] as text.
    pub fn writes_by_text(&self) -> String {
        rates_text(&self.writes_by_per_service)
    }
}

/// Results of `bench scale`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleReport {
    /// Lab nodes, every one a member.
    pub nodes: u8,
    /// The cluster's timing, `D/R/RD/skew ms`.
    pub timing: String,
    /// What the steady write rate is judged against: nodes / R + 1.
    pub writes_target_per_s: f64,
    /// What the slowest service's answer is judged against: D + 1.5 s, ms.
    pub answer_target_ms: f64,
    /// The steady state at each service count.
    pub steady: Vec<Steady>,
    /// The power-off, at the last service count.
    pub failover: Option<Failover>,
    /// What failed, when a step did: the figures before it stand, none
    /// after it was measured.
    pub error: Option<String>,
}

/// HAService `k` of `cluster` on `nodes` nodes: the `k`-th VIP of [`POOL`]
/// on the nodes' segment interface, preferring node `k % nodes + 1`, then
/// another node that differs with `k / nodes`, so both the services and
/// the failovers of one node's services spread over the nodes.
pub fn service(cluster: &str, k: usize, nodes: u8) -> Value {
    let n = usize::from(nodes);
    let first = k % n;
    let second = (first + 1 + (k / n) % (n - 1).max(1)) % n;
    let vip = format!("{}/22", vip(k));
    let mut s = ha::service(&format!("{cluster}-{k}"), cluster, &[&vip], None, (1, 100));
    s["metadata"]["labels"] = json!({ BENCH_LABEL: cluster });
    s["spec"]["vips"][0]["interface"] = json!(nodes::NS_IFACE);
    s["spec"]["preferredNodes"] = json!([
        nodes::node_name(first as u8 + 1),
        nodes::node_name(second as u8 + 1)
    ]);
    s
}

/// The VIP of service `k`: 198.18.(8 + k / 250).(1 + k % 250).
pub fn vip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 8 + (k / 250) as u8, 1 + (k % 250) as u8)
}

/// The HACluster of the benchmark: nodes 1..=`count`, `timing`, [`POOL`].
pub fn cluster(name: &str, count: u8, timing: Timing) -> Value {
    let members: Vec<u8> = (1..=count).collect();
    let mut c = ha::cluster(name, &members, timing);
    c["spec"]["vipPool"] = json!([POOL]);
    c
}

/// Applies services `range` of `cluster`: Lists of 100 objects, one
/// kubectl per List, two at a time.
pub fn apply_services(
    lab: &Lab,
    cluster: &str,
    range: Range<usize>,
    nodes: u8,
) -> anyhow::Result<()> {
    let lists: Vec<Value> = range
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|ks| {
            json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": ks.iter().map(|k| service(cluster, *k, nodes)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let halves: Vec<&[Value]> = lists.chunks(lists.len().div_ceil(2).max(1)).collect();
    std::thread::scope(|s| {
        let applying: Vec<_> = halves
            .iter()
            .map(|half| {
                s.spawn(move || {
                    half.iter()
                        .try_for_each(|list| ha::apply(lab, list).context("applying HAServices"))
                })
            })
            .collect();
        applying
            .into_iter()
            .try_for_each(|a| a.join().expect("an apply thread panicked"))
    })
}

/// HAService watch events the API server has sent so far, from its own
/// `apiserver_watch_events_total` (labelled by kind or by resource,
/// depending on the version).
pub fn haservice_watch_events(lab: &Lab) -> anyhow::Result<f64> {
    let text = lab
        .kubectl_ok(&["get", "--raw", "/metrics"])
        .context("reading the API server's metrics")?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("apiserver_watch_events_total{"))
        .filter(|l| l.contains("\"HAService\"") || l.contains("\"haservices\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Phase and active node of every service of `cluster`, by name.
fn phases(lab: &Lab, cluster: &str) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let out = lab.kubectl_ok(&[
        "get",
        "haservices",
        "-n",
        ha::SERVICE_NAMESPACE,
        "-l",
        &format!("{BENCH_LABEL}={cluster}"),
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}={.status.phase}={.status.activeNode}{\"\\n\"}{end}",
    ])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, '=');
            let name = parts.next()?.to_owned();
            let phase = parts.next().unwrap_or_default().to_owned();
            let node = parts.next().unwrap_or_default().to_owned();
            Some((name, (phase, node)))
        })
        .collect())
}

/// Waits (polling every 2 s, up to `timeout`) until `count` services of
/// `cluster` are Active; their active nodes by service name. Fails with
/// how many were and a few that were not.
pub fn wait_active(
    lab: &Lab,
    cluster: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, u8>> {
    // The last list that succeeded, and the last failure to list.
    let (mut seen, mut failed) = (BTreeMap::new(), None);
    let done = ha::wait_every(timeout, Duration::from_secs(2), || {
        match phases(lab, cluster) {
            Ok(p) => (seen, failed) = (p, None),
            Err(e) => failed = Some(e),
        }
        failed.is_none() && seen.len() == count && seen.values().all(|(p, _)| p == "Active")
    });
    if done.is_none() {
        let active = seen.values().filter(|(p, _)| p == "Active").count();
        let others: Vec<String> = seen
            .iter()
            .filter(|(_, (p, _))| p != "Active")
            .take(5)
            .map(|(n, (p, _))| format!("{n}: {}", if p.is_empty() { "no phase" } else { p }))
            .collect();
        let overloaded = ApiRequests::now(lab).map_or(f64::NAN, |r| r.overloaded);
        let listing = failed.map_or(String::new(), |e| {
            format!(", as last listed; the listing since failed: {e:#}")
        });
        bail!(
            "{active} of {count} services of {cluster} Active after {} s ({} exist){listing}; not Active: {}; \
             the API server has answered {overloaded:.0} requests with 429 (overloaded) or 504 (timed out)",
            timeout.as_secs(),
            seen.len(),
            others.join(", ")
        );
    }
    seen.into_iter()
        .map(|(name, (_, node))| {
            let i = nodes::node_index(&node)
                .with_context(|| format!("{name} is Active on {node:?}, not a lab node"))?;
            Ok((name, i))
        })
        .collect()
}

/// Deletes every service of `cluster` and waits (up to 10 minutes) until
/// they are gone, then their Leases (the lab has no garbage collector)
/// and the cluster.
pub fn remove_services(lab: &Lab, cluster: &str) -> anyhow::Result<()> {
    let selector = format!("{BENCH_LABEL}={cluster}");
    lab.kubectl_ok(&[
        "delete",
        "haservices",
        "-n",
        ha::SERVICE_NAMESPACE,
        "-l",
        &selector,
        "--wait=false",
    ])?;
    let gone = ha::wait_every(Duration::from_secs(600), Duration::from_secs(2), || {
        phases(lab, cluster).is_ok_and(|p| p.is_empty())
    });
    if gone.is_none() {
        bail!("services of {cluster} still exist 10 minutes after their deletion");
    }
    let leases = lab.kubectl_ok(&[
        "get",
        "leases",
        "-n",
        ha::OPERATOR_NAMESPACE,
        "-l",
        "kubeha.io/lease in (service,claim)",
        "-o",
        "name",
    ])?;
    let ours = [
        format!(
            "lease.coordination.k8s.io/{}",
            ha::service_lease_name(&format!("{cluster}-"))
        ),
        format!(
            "lease.coordination.k8s.io/{}",
            kubeha_crds::leases::claim_lease_name(ha::SERVICE_NAMESPACE, &format!("{cluster}-"))
        ),
    ];
    let mut args = vec!["delete", "-n", ha::OPERATOR_NAMESPACE, "--wait=false"];
    args.extend(
        leases
            .lines()
            .filter(|l| ours.iter().any(|o| l.starts_with(o.as_str()))),
    );
    if args.len() > 4 {
        lab.kubectl_ok(&args)?;
    }
    ha::delete(lab, "hacluster", cluster, None);
    Ok(())
}

/// `bench scale`: the plan's nodes, one cluster at the default timing, the
/// steady state at each service count, then the failover.
pub fn scale(lab: &Lab, plan: &ScalePlan) -> anyhow::Result<ScaleReport> {
    let (count, last) = (
        plan.nodes,
        *plan.services.last().context("no service count")?,
    );
    if !(2..=nodes::MAX_NODES).contains(&count) {
        bail!(
            "bench scale runs 2 to {} nodes, not {count}",
            nodes::MAX_NODES
        );
    }
    if plan.services.windows(2).any(|w| w[0] >= w[1]) || plan.services[0] == 0 {
        bail!(
            "service counts must be positive and ascending, not {:?}",
            plan.services
        );
    }
    if last > MAX_SERVICES {
        bail!(
            "bench scale runs at most {MAX_SERVICES} services (one VIP each from {POOL}), not {last}"
        );
    }
    let (name, timing) = ("bench-scale", Timing::DEFAULT);
    operator_lab(lab, count)?;
    // What an earlier run left.
    remove_services(lab, name)?;
    ha::apply(lab, &cluster(name, count, timing))?;
    if ha::wait_every(Duration::from_secs(60), Duration::from_secs(1), || {
        ha::members_ready(lab, name, count)
    })
    .is_none()
    {
        bail!("{name}: not every one of {count} members heartbeats within 60 s");
    }
    let mut report = ScaleReport {
        nodes: count,
        timing: timing.label(),
        writes_target_per_s: f64::from(count) * 1000.0 / f64::from(timing.renew_ms) + 1.0,
        answer_target_ms: f64::from(timing.lease_ms) + 1500.0,
        steady: Vec::new(),
        failover: None,
        error: None,
    };
    // What was measured before a step failed stands.
    // The services stay after the failover: deleting 1,000 of them takes
    // the API server longer than the whole measurement, and the next run
    // removes what an earlier one left (or `cargo xtask lab down` does).
    match measure(lab, plan, name, &mut report.steady) {
        Ok(failover) => report.failover = Some(failover),
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    Ok(report)
}

/// The steady state at each count of `plan` (into `steady`), then the
/// power-off of the busiest node.
fn measure(
    lab: &Lab,
    plan: &ScalePlan,
    name: &str,
    steady: &mut Vec<Steady>,
) -> anyhow::Result<Failover> {
    let count = plan.nodes;
    let mut active = BTreeMap::new();
    let mut created = 0;
    let wave = if plan.wave == 0 {
        MAX_SERVICES
    } else {
        plan.wave
    };
    for &services in &plan.services {
        let started = Instant::now();
        let (events0, created0) = (haservice_watch_events(lab)?, created);
        let requests0 = ApiRequests::now(lab)?;
        eprintln!("scale: {services} services on {count} nodes: applying {wave} at a time");
        while created < services {
            let to = services.min(created + wave);
            apply_services(lab, name, created..to, count)?;
            // Generous: 2 minutes, and half a second per service added.
            let timeout =
                Duration::from_secs(120) + Duration::from_millis(500) * (to - created) as u32;
            active = wait_active(lab, name, to, timeout)?;
            created = to;
        }
        let settle_s = started.elapsed().as_secs_f64();
        let created_writes_by = requests0
            .write_rates_since(&ApiRequests::now(lab)?, (services - created0).max(1) as f64);
        eprintln!("scale: {services} services Active after {settle_s:.0} s; steady window");
        let mut step = measure_steady(lab, count, services, settle_s, plan.steady_secs)?;
        step.created_writes_by = created_writes_by;
        step.haservice_watch_events_per_service =
            (haservice_watch_events(lab)? - events0) / (services - created0).max(1) as f64;
        eprintln!(
            "scale: {services} services: {:.1} writes/s ({}), {:.0} HAService watch events per service added; writes per service added: {}",
            step.writes_per_s,
            step.writes_by_text(),
            step.haservice_watch_events_per_service,
            step.created_writes_by_text()
        );
        steady.push(step);
    }
    power_off_busiest(lab, name, &active)
}

/// Ten seconds to settle, then `secs` of nothing changing: the API
/// server's request rates and the operator's and every agent's CPU over
/// that window, their RSS at its end.
fn measure_steady(
    lab: &Lab,
    count: u8,
    services: usize,
    settle_s: f64,
    secs: u64,
) -> anyhow::Result<Steady> {
    std::thread::sleep(Duration::from_secs(10));
    let operator = lab
        .operator_pid(0)
        .context("operator replica 0 has no pid")? as u32;
    let agents: Vec<u32> = (1..=count)
        .map(|i| {
            lab.agent_pid(i)
                .filter(|_| lab.agent_running(i))
                .map(|p| p as u32)
                .with_context(|| format!("the agent of node-{i} does not run"))
        })
        .collect::<anyhow::Result<_>>()?;
    let cpu = |pids: &[u32]| -> anyhow::Result<Vec<f64>> {
        pids.iter().map(|p| cpu_seconds(*p)).collect()
    };
    let (op0, agents0) = (cpu_seconds(operator)?, cpu(&agents)?);
    let (api0, t0) = (ApiRequests::now(lab)?, Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let api1 = ApiRequests::now(lab)?;
    let elapsed = t0.elapsed().as_secs_f64();
    let (op1, agents1) = (cpu_seconds(operator)?, cpu(&agents)?);
    let pct = |a: f64, b: f64| (b - a) / elapsed * 100.0;
    let agent_cpu: Vec<f64> = agents0
        .iter()
        .zip(&agents1)
        .map(|(a, b)| pct(*a, *b))
        .collect();
    let agent_rss: Vec<f64> = agents
        .iter()
        .map(|p| rss_mb(*p))
        .collect::<anyhow::Result<_>>()?;
    Ok(Steady {
        services,
        settle_s,
        writes_per_s: (api1.writes - api0.writes) / elapsed,
        requests_per_s: (api1.all - api0.all) / elapsed,
        writes_by: api0.write_rates_since(&api1, elapsed),
        created_writes_by: Vec::new(),
        operator_rss_mb: rss_mb(operator)?,
        operator_cpu_pct: pct(op0, op1),
        agent_rss_mb: MedianMax::of(&agent_rss),
        haservice_watch_events_per_service: f64::NAN,
        agent_cpu_pct: MedianMax::of(&agent_cpu),
    })
}

/// Powers off the node holding the most of `active` (services by their
/// active node; the lowest-numbered on a tie) and times each of its
/// services, from the power-off, to the first ARP answer for its VIP from
/// another node's MAC; the API server's request rates from the power-off
/// until every VIP is on another node; then the time until every status
/// says so. Powers the node on again (its agent starts) before returning.
fn power_off_busiest(
    lab: &Lab,
    cluster: &str,
    active: &BTreeMap<String, u8>,
) -> anyhow::Result<Failover> {
    let mut per_node: BTreeMap<u8, usize> = BTreeMap::new();
    for node in active.values() {
        *per_node.entry(*node).or_default() += 1;
    }
    let (&victim, &held) = per_node
        .iter()
        .max_by_key(|(i, n)| (**n, std::cmp::Reverse(**i)))
        .context("no service is active anywhere")?;
    let services: Vec<(&String, Ipv4Addr)> = active
        .iter()
        .filter(|(_, node)| **node == victim)
        .map(|(name, _)| {
            let k: usize = name
                .rsplit('-')
                .next()
                .and_then(|k| k.parse().ok())
                .with_context(|| format!("{name} is not named {cluster}-K"))?;
            Ok((name, vip(k)))
        })
        .collect::<anyhow::Result<_>>()?;
    let vips: Vec<String> = services.iter().map(|(_, v)| v.to_string()).collect();
    let vip_refs: Vec<&str> = vips.iter().map(String::as_str).collect();
    let victim_mac = ha::mac_of(&nodes::node_ns(victim), nodes::NS_IFACE)?;
    eprintln!(
        "scale: powering off node-{victim}, which holds {held} of {} services (client ARP probe every {} ms per VIP)",
        active.len(),
        PROBE_EVERY.as_millis()
    );
    let probe = ArpProbe::start_every(&vip_refs, PROBE_EVERY)?;
    // The probe hears the victim answer before it loses power.
    std::thread::sleep(Duration::from_millis(500));
    let api0 = ApiRequests::now(lab)?;
    // The link goes down first thing in the call.
    let (off, off_at) = (jiff::Timestamp::now(), Instant::now());
    lab.power_off(victim)?;
    // Every VIP answered for by another node, as the probe hears it (no
    // API request nor process of ours in the window: listing 20 nodes'
    // addresses every half second was 40 processes a second on the
    // machine measured).
    let targets: Vec<Ipv4Addr> = services.iter().map(|(_, v)| *v).collect();
    let moved = ha::wait_every(Duration::from_secs(120), Duration::from_millis(100), || {
        probe.answered_by_other(&targets, &victim_mac)
    });
    let api1 = ApiRequests::now(lab)?;
    let window = off_at.elapsed().as_secs_f64();
    // Answers the probe has yet to hear from the last ones.
    std::thread::sleep(Duration::from_secs(2));
    let probed = probe.stop();
    if moved.is_none() {
        let addresses = ha::node_addresses();
        let missing: Vec<&String> = vips
            .iter()
            .filter(|v| !addresses.iter().any(|(i, a)| *i != victim && a.contains(v)))
            .take(10)
            .collect();
        let overloaded = ApiRequests::now(lab).map_or(f64::NAN, |r| r.overloaded - api0.overloaded);
        lab.power_on(victim)?;
        lab.start_agent(victim, &[] as &[&str])?;
        bail!(
            "120 s after node-{victim} lost power, VIPs of its services are on no other node, e.g. {missing:?}; \
             the API server answered {overloaded:.0} requests with 429 (overloaded) or 504 (timed out) meanwhile"
        );
    }
    if !probed
        .answers
        .keys()
        .any(|(_, mac)| mac.eq_ignore_ascii_case(&victim_mac))
    {
        bail!(
            "the client's ARP probe heard node-{victim} answer for none of its {held} VIPs before the power-off: the probe does not work here"
        );
    }
    let mut answer_ms = BTreeMap::new();
    let mut unanswered = Vec::new();
    for (name, vip) in &services {
        let first = probed
            .answers
            .iter()
            .filter(|((v, mac), _)| v == vip && !mac.eq_ignore_ascii_case(&victim_mac))
            .map(|(_, (first, _))| *first)
            .min();
        match first {
            Some(first) => {
                let ms = first.duration_since(off).as_secs_f64() * 1000.0;
                answer_ms.insert((*name).clone(), ms.max(0.0));
            }
            None => unanswered.push((*name).clone()),
        }
    }
    let status = ha::wait_every(Duration::from_secs(180), Duration::from_secs(2), || {
        phases(lab, cluster).is_ok_and(|p| {
            services.iter().all(|(name, _)| {
                p.get(*name).is_some_and(|(phase, node)| {
                    phase == "Active" && nodes::node_index(node).is_some_and(|i| i != victim)
                })
            })
        })
    });
    let status_settled_s = match status {
        Some(_) => off_at.elapsed().as_secs_f64(),
        None => f64::NAN,
    };
    lab.power_on(victim)?;
    lab.start_agent(victim, &[] as &[&str])?;
    Ok(Failover {
        node: nodes::node_name(victim),
        services: held,
        answer_ms: MedianMax::of(&answer_ms.values().copied().collect::<Vec<_>>()),
        answer_ms_by_service: answer_ms,
        unanswered,
        two_mac_windows: probed.windows.len(),
        window_ms: window * 1000.0,
        requests_per_s: (api1.all - api0.all) / window,
        writes_per_s: (api1.writes - api0.writes) / window,
        writes_by_per_service: api0.write_rates_since(&api1, held.max(1) as f64),
        status_settled_s,
    })
}
