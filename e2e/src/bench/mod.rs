//! Benchmarks on the lab (`cargo xtask bench ...`), run with the release
//! binaries (a [`Lab`] of [`crate::lab::Profile::Release`]; `xtask` builds
//! them first, outside any timing). They print their figures; no timing is
//! asserted anywhere.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::ha::{self, Capture, Timing};
use crate::lab::Lab;
use crate::nodes;

pub mod scale;

pub use scale::{ScalePlan, ScaleReport, scale};

/// Median and 95th percentile of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    /// Median.
    pub median: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
}

/// Median and p95 (nearest rank) of `samples`.
pub fn summarize(samples: &[f64]) -> Summary {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return Summary {
            median: f64::NAN,
            p95: f64::NAN,
        };
    }
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    let rank = ((0.95 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Summary {
        median,
        p95: s[rank - 1],
    }
}

/// Results of `bench agent`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentReport {
    /// Lease change written (cleared for entry) to the first GARP seen by the client.
    pub lease_to_garp_ms: Summary,
    /// Resident memory of one agent, MiB.
    pub agent_rss_mb: f64,
    /// CPU of one idle agent (holding [`AgentReport::idle_vips`] VIPs,
    /// heartbeating), percent of one core.
    pub agent_idle_cpu_pct: f64,
    /// VIPs the agent held while its idle CPU and RSS were measured.
    pub idle_vips: usize,
    /// Transitions measured.
    pub transitions: usize,
}

/// Writes service Leases straight through the API (not kubectl), so the
/// instant a write is sent is known to the millisecond; as the operator's
/// service account, the only identity the chart's admission policy
/// (rbac.serviceLeasePolicy) lets write them.
struct LeaseWriter {
    runtime: tokio::runtime::Runtime,
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    /// Each service's Lease metadata (with its HAService's UID), read once.
    metadata: std::sync::Mutex<std::collections::HashMap<String, serde_json::Value>>,
}

impl LeaseWriter {
    fn new(lab: &Lab) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let api = runtime.block_on(async {
            let kubeconfig = kube::config::Kubeconfig::read_from(lab.operator_kubeconfig()?)?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            anyhow::Ok(kube::Api::namespaced(
                kube::Client::try_from(config)?,
                ha::OPERATOR_NAMESPACE,
            ))
        })?;
        Ok(Self {
            runtime,
            api,
            metadata: Default::default(),
        })
    }

    /// Applies the service Lease; returns the wall-clock instant the request
    /// was sent, in seconds since the epoch (tcpdump's time base).
    fn write(
        &self,
        lab: &Lab,
        service: &str,
        holder: &str,
        epoch: i32,
        cleared: bool,
    ) -> anyhow::Result<f64> {
        let mut metadata = {
            let mut known = self.metadata.lock().unwrap_or_else(|e| e.into_inner());
            match known.get(service) {
                Some(m) => m.clone(),
                None => {
                    let m = ha::service_lease_metadata(lab, service, json!({}))?;
                    known.insert(service.to_owned(), m.clone());
                    m
                }
            }
        };
        metadata["annotations"] = json!({
            "kubeha.io/enter-epoch": if cleared { epoch.to_string() } else { "-1".into() }
        });
        let lease = ha::scoped_lease(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {"holderIdentity": holder, "leaseTransitions": epoch}
        }));
        // The holder's agent sees only services labelled for its node
        // (before the timed write; a no-op once labelled).
        ha::show_service_to(lab, ha::SERVICE_NAMESPACE, service, &[holder])?;
        let params = kube::api::PatchParams::apply("kubeha-e2e").force();
        let sent = now_epoch_secs();
        self.runtime
            .block_on(self.api.patch(
                &ha::service_lease_name(service),
                &params,
                &kube::api::Patch::Apply(&lease),
            ))
            .context("writing the service Lease")?;
        Ok(sent)
    }
}

fn now_epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Resident set size of a process, MiB.
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// CPU time (user + system) of a process, seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based).
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// `bench agent`: `transitions` planned handovers between node-1 and node-2
/// (holder written uncleared, the old holder leaves and reports `ackedEpoch`
/// in its status entry, then the clearance is written: that write starts the
/// clock), timed to the first GARP from the new holder seen in the client
/// namespace; then the agent's RSS and idle CPU.
pub fn agent(lab: &Lab, transitions: usize, idle_secs: u64) -> anyhow::Result<AgentReport> {
    // This benchmark plays the operator: a real one would fight over the Lease.
    for r in 0..=1 {
        lab.stop_operator(r, crate::lab::StopSignal::Term)?;
    }
    nodes_lab(lab, 3)?;
    let (name, vip) = ("bench-agent", "198.18.0.110");
    ha::apply(lab, &ha::cluster(name, &[1, 2], Timing::DEFAULT))?;
    ha::apply(
        lab,
        &ha::service(name, name, &["198.18.0.110/24"], None, (3, 100)),
    )?;
    let writer = LeaseWriter::new(lab)?;
    let macs = [
        ha::mac_of(&nodes::node_ns(1), "eth0")?,
        ha::mac_of(&nodes::node_ns(2), "eth0")?,
    ];
    let capture = Capture::start(lab, name)?;
    let mut samples = Vec::new();
    // Wait for heartbeats (agents join the cluster on their next watch event).
    std::thread::sleep(Duration::from_secs(3));
    for k in 1..=transitions as i32 {
        let (new, old) = if k % 2 == 1 { (1u8, 2u8) } else { (2, 1) };
        writer.write(lab, name, &nodes::node_name(new), k, false)?;
        if ha::wait_until(Duration::from_secs(15), || !ha::vip_on_node(old, vip)).is_none() {
            bail!("transition {k}: node-{old} never gave the VIP away");
        }
        // The handover protocol: the clearance waits for the old holder to
        // report that it left epoch k-1 (at k = 1 nobody held the service).
        if k > 1
            && ha::wait_until(Duration::from_secs(15), || {
                ha::node_entry(lab, name, old)["ackedEpoch"] == k - 1
            })
            .is_none()
        {
            bail!(
                "transition {k}: node-{old} never acknowledged epoch {} (its status entry: {})",
                k - 1,
                ha::node_entry(lab, name, old)
            );
        }
        let sent = writer.write(lab, name, &nodes::node_name(new), k, true)?;
        let mac = &macs[usize::from(new) - 1];
        let seen = ha::wait_until(Duration::from_secs(15), || {
            capture
                .frames()
                .iter()
                .any(|f| f.time >= sent && &f.mac == mac && f.address == vip)
        });
        if seen.is_none() {
            bail!("transition {k}: no GARP from node-{new}");
        }
        let first = capture
            .frames()
            .into_iter()
            .filter(|f| f.time >= sent && &f.mac == mac && f.address == vip)
            .map(|f| f.time)
            .fold(f64::INFINITY, f64::min);
        samples.push((first - sent) * 1000.0);
        eprintln!(
            "transition {k:>3}: node-{old} -> node-{new}: {:.1} ms",
            samples.last().unwrap()
        );
    }
    drop(capture);
    // Idle: the last holder keeps its VIP, takes a second service with
    // nine more (ten VIPs in all, each extended on every renew), and
    // heartbeats.
    let holder = if transitions % 2 == 1 { 1 } else { 2 };
    let idle = "bench-agent-idle";
    let more: Vec<String> = (161..=169).map(|h| format!("198.18.0.{h}/24")).collect();
    let refs: Vec<&str> = more.iter().map(String::as_str).collect();
    ha::apply(lab, &ha::service(idle, name, &refs, None, (3, 100)))?;
    writer.write(lab, idle, &nodes::node_name(holder), 1, true)?;
    let all_held = ha::wait_until(Duration::from_secs(15), || {
        ha::vip_on_node(holder, vip)
            && more
                .iter()
                .all(|v| ha::vip_on_node(holder, v.trim_end_matches("/24")))
    });
    if all_held.is_none() {
        bail!("node-{holder} never held the ten VIPs of the idle measurement");
    }
    let pid = lab.agent_pid(holder).context("agent pid")? as u32;
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let cpu = (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_mb(pid)?;
    ha::delete_service(lab, idle);
    ha::delete_service(lab, name);
    ha::wait_until(Duration::from_secs(15), || {
        !ha::vip_on_node(1, vip) && !ha::vip_on_node(2, vip)
    });
    ha::delete(lab, "hacluster", name, None);
    Ok(AgentReport {
        lease_to_garp_ms: summarize(&samples),
        agent_rss_mb: rss,
        agent_idle_cpu_pct: cpu,
        idle_vips: 1 + more.len(),
        transitions: samples.len(),
    })
}

/// One unplanned-failover figure: what ran, and the summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverFigure {
    /// What ran: `kubeha D/R/RD/skew ms` or `keepalived advert_int S s`.
    pub what: String,
    /// Power-off of the active node to the first ping reply from another
    /// node's MAC, ms.
    pub ms: Summary,
    /// The samples, ms, in run order.
    pub samples: Vec<f64>,
    /// Checks of the split-brain detector that found two holders.
    pub double_holder_checks: usize,
    /// Each window with two holders: `VIP nodes [a, b] for N ms`.
    pub double_holder_windows: Vec<String>,
}

/// The double-holder figures of a [`FailoverFigure`] from what the
/// detector saw.
fn double_holders(seen: &ha::Sampled) -> (usize, Vec<String>) {
    let windows = seen
        .windows
        .iter()
        .map(|w| {
            format!(
                "{} nodes {:?} for {} ms",
                w.vip,
                w.nodes,
                w.to.saturating_sub(w.from).as_millis()
            )
        })
        .collect();
    (seen.double, windows)
}

/// Results of `bench failover`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    /// Unplanned failovers, one figure per timing (kubeha), each followed
    /// by keepalived's when it ran beside it, in the order they ran.
    pub unplanned: Vec<FailoverFigure>,
    /// keepalived at its default `advert_int 1`, timed over the same
    /// power-offs as the kubeha timing it ran beside (kubeha's defaults
    /// unless `--timing` says otherwise); absent when it did not run.
    pub keepalived_ms: Option<Summary>,
    /// keepalived at `advert_int 0.1` (VRRPv3), beside kubeha's tight
    /// timing unless `--timing` says otherwise; absent when it did not run.
    pub keepalived_tight_ms: Option<Summary>,
    /// `kubectl ha move` started to the first ping reply from the target
    /// node's MAC, default timing (not measured with `--timing`).
    pub switchover_ms: Option<Summary>,
    /// Write requests per second the API server served at steady state
    /// (3 nodes, `steady_services` HAServices, nothing changing; not
    /// measured with `--timing`).
    pub steady_writes_per_s: Option<f64>,
    /// Checks (address events and snapshots) at which two powered nodes
    /// held the same VIP, kubeha and keepalived alike.
    pub split_brain_instants: usize,
    /// Checks the split-brain detector made.
    pub split_brain_samples: usize,
    /// The longest time between two consecutive snapshots, ms.
    pub split_brain_max_gap_ms: f64,
    /// Runs per figure.
    pub runs: usize,
}

/// What `bench failover` measures.
#[derive(Debug, Clone)]
pub struct FailoverPlan {
    /// Runs per figure.
    pub runs: usize,
    /// The kubeha timings to fail over at; empty: the default and the tight
    /// timing, then the switchover and the steady write rate.
    pub timings: Vec<Timing>,
    /// keepalived advertisement intervals: the i-th runs beside the i-th
    /// timing (at most one per timing), on its own VIP, over the same
    /// power-offs.
    pub keepalived: Vec<f64>,
    /// HAServices for the steady write rate.
    pub services: usize,
    /// Seconds over which the steady write rate is measured.
    pub steady_secs: u64,
    /// Only the planned switchovers: no unplanned failover, no keepalived,
    /// no steady write rate.
    pub switchover_only: bool,
}

impl Timing {
    /// `D,R,RD,SKEW` in milliseconds, as `--timing` takes it.
    pub fn parse_list(text: &str) -> anyhow::Result<Timing> {
        let parts: Vec<u32> = text
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!(
                    "--timing {text:?}: expected D,R,RD,SKEW in milliseconds, e.g. 1000,300,600,100"
                )
            })?;
        let [lease_ms, renew_ms, deadline_ms, skew_ms] = parts[..] else {
            bail!(
                "--timing {text:?}: expected four numbers D,R,RD,SKEW in milliseconds, e.g. 1000,300,600,100"
            );
        };
        Ok(Timing {
            lease_ms,
            renew_ms,
            deadline_ms,
            skew_ms,
        })
    }

    /// `D/R/RD/skew ms`.
    pub fn label(&self) -> String {
        format!(
            "{}/{}/{}/{} ms",
            self.lease_ms, self.renew_ms, self.deadline_ms, self.skew_ms
        )
    }
}

/// Whether process `pid` runs the file `bin` as it is now (not another
/// build, nor one that was replaced since it started).
fn runs_binary(pid: i32, bin: &std::path::Path) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    std::fs::canonicalize(bin).is_ok_and(|bin| bin == exe)
}

/// The lab with `count` powered nodes, each running an agent of the lab's
/// profile (one from another build is restarted).
fn nodes_lab(lab: &Lab, count: u8) -> anyhow::Result<()> {
    lab.ensure_up_with_nodes(count)?;
    let bin = lab.agent_binary()?;
    for i in 1..=count {
        lab.power_on(i)?;
        if let Some(pid) = lab.agent_pid(i).filter(|_| lab.agent_running(i))
            && !runs_binary(pid, &bin)
        {
            lab.stop_agent(i, crate::lab::StopSignal::Term)?;
        }
        if !lab.agent_running(i) {
            lab.start_agent(i, &[] as &[&str])?;
        }
    }
    Ok(())
}

/// [`nodes_lab`] and operator replica 0 alone, of the lab's profile too.
fn operator_lab(lab: &Lab, count: u8) -> anyhow::Result<()> {
    nodes_lab(lab, count)?;
    lab.stop_operator(1, crate::lab::StopSignal::Term)?;
    let bin = lab.operator_binary()?;
    if let Some(pid) = lab.operator_pid(0).filter(|_| lab.operator_running(0))
        && !runs_binary(pid, &bin)
    {
        lab.stop_operator(0, crate::lab::StopSignal::Term)?;
    }
    if !lab.operator_running(0) {
        lab.start_operator(0, &[])?;
    }
    Ok(())
}

/// The active node of `name` once its phase is Active, its VIP is on that
/// node only and every member heartbeats (`ready` 3/3).
fn settled(lab: &Lab, name: &str, vip: &str) -> anyhow::Result<u8> {
    let mut active = None;
    let ok = ha::wait_until(Duration::from_secs(60), || {
        active = ha::active_node(lab, name, vip);
        active.is_some() && ha::members_ready(lab, name, 3)
    });
    if ok.is_none() {
        bail!(
            "{name} did not settle: status {}, holders {:?}",
            ha::service_status(lab, name),
            ha::vip_holders(vip)
        );
    }
    Ok(active.unwrap())
}

/// A ping from the client namespace every 10 ms to each of some VIPs,
/// with the replies captured: the client-side probe every figure of
/// `bench failover` is timed with.
struct Pinger {
    pings: Vec<std::process::Child>,
    capture: Capture,
}

impl Pinger {
    fn start(lab: &Lab, name: &str, vips: &[&str]) -> anyhow::Result<Pinger> {
        let sources: Vec<String> = vips.iter().map(|v| format!("src host {v}")).collect();
        let capture = Capture::start_filtered(
            lab,
            name,
            &format!(
                "icmp and icmp[icmptype] == icmp-echoreply and ({})",
                sources.join(" or ")
            ),
        )?;
        let mut pinger = Pinger {
            pings: Vec::new(),
            capture,
        };
        for vip in vips {
            let ping = nodes::exec_in(nodes::CLIENT_NS, &["ping", "-n", "-q", "-i", "0.01", vip])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .with_context(|| format!("starting ping {vip} in the client namespace"))?;
            pinger.pings.push(ping);
        }
        Ok(pinger)
    }

    /// Epoch seconds of the first reply for `vip` captured so far at or
    /// after `since` from one of `macs`.
    fn reply_since(&self, vip: &str, since: f64, macs: &[&String]) -> Option<f64> {
        self.capture
            .frames()
            .into_iter()
            .filter(|f| {
                f.kind == "echo-reply"
                    && f.address == vip
                    && f.time >= since
                    && macs.contains(&&f.mac)
            })
            .map(|f| f.time)
            .reduce(f64::min)
    }

    /// [`Pinger::reply_since`], waiting up to `timeout` for one.
    fn first_reply(
        &self,
        vip: &str,
        since: f64,
        macs: &[&String],
        timeout: Duration,
    ) -> Option<f64> {
        let mut first = None;
        ha::wait_until(timeout, || {
            first = self.reply_since(vip, since, macs);
            first.is_some()
        });
        first
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        for ping in &mut self.pings {
            let _ = ping.kill();
            let _ = ping.wait();
        }
    }
}

/// One VIP timed over the power-offs of a figure: what serves it, the
/// samples so far and what the split-brain detector saw of it.
struct Timed<'a> {
    vip: &'a str,
    what: String,
    samples: Vec<f64>,
    seen: ha::Sampled,
}

impl<'a> Timed<'a> {
    fn new(vip: &'a str, what: String) -> Self {
        Timed {
            vip,
            what,
            samples: Vec::new(),
            seen: ha::Sampled::default(),
        }
    }

    /// The figure, and what the split-brain detector saw.
    fn figure(self) -> (FailoverFigure, ha::Sampled) {
        let (double_holder_checks, double_holder_windows) = double_holders(&self.seen);
        let figure = FailoverFigure {
            what: self.what,
            ms: summarize(&self.samples),
            samples: self.samples,
            double_holder_checks,
            double_holder_windows,
        };
        (figure, self.seen)
    }
}

/// Powers node `active` off and times it, for each of `timed`, to the
/// first ping reply for its VIP from another node's MAC (`macs` by node),
/// in ms; what the split-brain detector saw meanwhile goes into each one's
/// `seen`.
fn power_off_to_replies(
    lab: &Lab,
    pinger: &Pinger,
    macs: &[String],
    active: u8,
    run: usize,
    timed: &mut [Timed],
) -> anyhow::Result<()> {
    let samplers: Vec<ha::SplitBrain> = timed
        .iter()
        .map(|t| ha::SplitBrain::start(t.vip, &[active]))
        .collect();
    // The link goes down first thing in the call.
    let off = now_epoch_secs();
    lab.power_off(active)?;
    let others: Vec<&String> = (1..=3u8)
        .filter(|i| *i != active)
        .map(|i| &macs[usize::from(i) - 1])
        .collect();
    // The capture keeps every reply: waiting for one VIP loses none of
    // the others'.
    let firsts: Vec<Option<f64>> = timed
        .iter()
        .map(|t| pinger.first_reply(t.vip, off, &others, Duration::from_secs(30)))
        .collect();
    for (t, sampler) in timed.iter_mut().zip(samplers) {
        t.seen.absorb(sampler.stop());
    }
    for (t, first) in timed.iter_mut().zip(firsts) {
        let Some(first) = first else {
            bail!(
                "{} run {run}: no reply for {} from another node within 30 s of powering off node-{active}",
                t.what,
                t.vip
            );
        };
        let ms = (first - off) * 1000.0;
        eprintln!(
            "unplanned ({}) run {run:>2}: node-{active} off -> {ms:.0} ms",
            t.what
        );
        t.samples.push(ms);
    }
    Ok(())
}

/// Unplanned failovers of kubeha's service `name` on `vip` at `timing`
/// and, with `keepalived` (its VIP and advertisement interval), of
/// keepalived beside it on the same nodes, mastered by the same node: power
/// off that node, time both VIPs to the first reply from another node's
/// MAC, power it back on (its agent and keepalived start again) and wait
/// for both to settle on one node. Returns kubeha's figure, then
/// keepalived's, each with what the split-brain detector saw.
fn unplanned(
    lab: &Lab,
    name: &str,
    vip: &str,
    timing: Timing,
    keepalived: Option<(&str, f64)>,
    runs: usize,
) -> anyhow::Result<Vec<(FailoverFigure, ha::Sampled)>> {
    ha::delete_service(lab, name);
    ha::apply(lab, &ha::cluster(name, &[1, 2, 3], timing))?;
    ha::apply(
        lab,
        &ha::service(name, name, &[&format!("{vip}/24")], None, (3, 100)),
    )?;
    let macs: Vec<String> = (1..=3)
        .map(|i| ha::mac_of(&nodes::node_ns(i), nodes::NS_IFACE))
        .collect::<anyhow::Result<_>>()?;
    let mut timed = vec![Timed::new(vip, format!("kubeha {}", timing.label()))];
    let mut vrrp = None;
    if let Some((kvip, advert)) = keepalived {
        timed.push(Timed::new(
            kvip,
            format!("keepalived advert_int {advert} s"),
        ));
        vrrp = Some(crate::keepalived::Keepalived::start(lab, 3, kvip, advert)?);
    }
    let vips: Vec<&str> = timed.iter().map(|t| t.vip).collect();
    let pinger = Pinger::start(lab, name, &vips)?;
    let result = (|| {
        for run in 1..=runs {
            let active = settled(lab, name, vip)?;
            if let Some(vrrp) = &mut vrrp {
                vrrp.master_on(active, 3)
                    .with_context(|| format!("keepalived run {run}"))?;
            }
            power_off_to_replies(lab, &pinger, &macs, active, run, &mut timed)?;
            lab.power_on(active)?;
            lab.start_agent(active, &[] as &[&str])?;
            if let Some(vrrp) = &vrrp {
                vrrp.start_on(active)?;
            }
        }
        anyhow::Ok(())
    })();
    drop(pinger);
    if let (Some(vrrp), Some((kvip, _))) = (vrrp, keepalived) {
        vrrp.stop(3);
        ha::wait_until(Duration::from_secs(10), || ha::vip_holders(kvip).is_empty());
    }
    result?;
    settled(lab, name, vip)?;
    ha::delete(lab, "haservice", name, Some(ha::SERVICE_NAMESPACE));
    ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty());
    ha::delete_service(lab, name);
    ha::delete(lab, "hacluster", name, None);
    Ok(timed.into_iter().map(Timed::figure).collect())
}

/// Planned switchovers: `kubectl ha move` to the next node, timed from the
/// command's start to that node's first reply.
fn switchover(
    lab: &Lab,
    name: &str,
    vip: &str,
    runs: usize,
) -> anyhow::Result<(Vec<f64>, ha::Sampled)> {
    ha::delete_service(lab, name);
    ha::apply(lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT))?;
    ha::apply(
        lab,
        &ha::service(name, name, &[&format!("{vip}/24")], None, (3, 100)),
    )?;
    let pinger = Pinger::start(lab, name, &[vip])?;
    let (mut samples, mut seen) = (Vec::new(), ha::Sampled::default());
    for run in 1..=runs {
        let active = settled(lab, name, vip)?;
        let target = active % 3 + 1;
        let mac = ha::mac_of(&nodes::node_ns(target), nodes::NS_IFACE)?;
        let sampler = ha::SplitBrain::start(vip, &[]);
        let asked = now_epoch_secs();
        ha::request_move(lab, name, target)?;
        let first = pinger.first_reply(vip, asked, &[&mac], Duration::from_secs(30));
        seen.absorb(sampler.stop());
        let Some(first) = first else {
            bail!("run {run}: no reply from node-{target} within 30 s of the move");
        };
        samples.push((first - asked) * 1000.0);
        eprintln!(
            "switchover run {run:>2}: node-{active} -> node-{target}: {:.0} ms",
            samples.last().unwrap()
        );
    }
    drop(pinger);
    ha::delete(lab, "haservice", name, Some(ha::SERVICE_NAMESPACE));
    ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty());
    ha::delete_service(lab, name);
    ha::delete(lab, "hacluster", name, None);
    Ok((samples, seen))
}

/// Requests the API server has served so far, from its own
/// `apiserver_request_total`.
#[derive(Debug, Clone)]
pub struct ApiRequests {
    /// Every request, reads and watches included.
    pub all: f64,
    /// Write requests: POST, PUT, PATCH, APPLY, DELETE.
    pub writes: f64,
    /// Requests refused for overload (429) or timed out (504).
    pub overloaded: f64,
    /// Write requests by `resource verb` (`leases APPLY`), to tell which
    /// writers a steady rate is made of.
    pub writes_by: std::collections::BTreeMap<String, f64>,
}

/// The value of label `name` in one Prometheus text line.
fn label_value<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

impl ApiRequests {
    /// Writes per second by `resource verb` between `self` and a later
    /// reading, over `secs`, the busiest first; rates under 0.05/s left out.
    pub fn write_rates_since(&self, later: &ApiRequests, secs: f64) -> Vec<(String, f64)> {
        let mut rates: Vec<(String, f64)> = later
            .writes_by
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    (v - self.writes_by.get(k).unwrap_or(&0.0)) / secs,
                )
            })
            .filter(|(_, r)| *r >= 0.05)
            .collect();
        rates.sort_by(|a, b| b.1.total_cmp(&a.1));
        rates
    }

    /// The API server's counters now.
    pub fn now(lab: &Lab) -> anyhow::Result<ApiRequests> {
        let text = lab
            .kubectl_ok(&["get", "--raw", "/metrics"])
            .context("reading the API server's metrics")?;
        let mut counted = ApiRequests {
            all: 0.0,
            writes: 0.0,
            overloaded: 0.0,
            writes_by: Default::default(),
        };
        for line in text
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
        {
            let Some(n) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            counted.all += n;
            if let Some(verb) = ["POST", "PUT", "PATCH", "APPLY", "DELETE"]
                .into_iter()
                .find(|v| line.contains(&format!("verb=\"{v}\"")))
            {
                counted.writes += n;
                let resource = label_value(line, "resource").unwrap_or("?");
                let subresource = label_value(line, "subresource")
                    .filter(|s| !s.is_empty())
                    .map_or(String::new(), |s| format!("/{s}"));
                *counted
                    .writes_by
                    .entry(format!("{resource}{subresource} {verb}"))
                    .or_default() += n;
            }
            if line.contains("code=\"429\"") || line.contains("code=\"504\"") {
                counted.overloaded += n;
            }
        }
        Ok(counted)
    }
}

/// Steady state: `services` HAServices spread over a 3-node cluster, all
/// Active; API writes per second over `secs`.
fn steady(lab: &Lab, services: usize, secs: u64) -> anyhow::Result<f64> {
    let name = "bench-steady";
    scale::remove_services(lab, name)?;
    ha::apply(lab, &scale::cluster(name, 3, Timing::DEFAULT))?;
    scale::apply_services(lab, name, 0..services, 3)?;
    scale::wait_active(lab, name, services, Duration::from_secs(180))?;
    std::thread::sleep(Duration::from_secs(10));
    let (w0, t0) = (ApiRequests::now(lab)?.writes, Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let rate = (ApiRequests::now(lab)?.writes - w0) / t0.elapsed().as_secs_f64();
    scale::remove_services(lab, name)?;
    Ok(rate)
}

/// `bench failover`: unplanned failovers at each timing of the plan (or
/// the default and the tight one, then planned switchovers and the steady
/// API write rate), each with keepalived beside it when the plan pairs one.
pub fn failover(lab: &Lab, plan: &FailoverPlan) -> anyhow::Result<FailoverReport> {
    let timings = if plan.timings.is_empty() {
        vec![Timing::DEFAULT, Timing::TIGHT]
    } else {
        plan.timings.clone()
    };
    if plan.keepalived.len() > timings.len() {
        bail!(
            "{} keepalived intervals for {} kubeha timings: each keepalived runs beside one timing",
            plan.keepalived.len(),
            timings.len()
        );
    }
    operator_lab(lab, 3)?;
    let runs = plan.runs;
    let mut report = FailoverReport {
        unplanned: Vec::new(),
        keepalived_ms: None,
        keepalived_tight_ms: None,
        switchover_ms: None,
        steady_writes_per_s: None,
        split_brain_instants: 0,
        split_brain_samples: 0,
        split_brain_max_gap_ms: 0.0,
        runs,
    };
    let absorb = |report: &mut FailoverReport, seen: &ha::Sampled| {
        report.split_brain_instants += seen.double;
        report.split_brain_samples += seen.samples;
        report.split_brain_max_gap_ms = report
            .split_brain_max_gap_ms
            .max(seen.max_gap.as_secs_f64() * 1000.0);
    };
    let timings = if plan.switchover_only {
        Vec::new()
    } else {
        timings
    };
    for (n, timing) in timings.iter().enumerate() {
        let name = format!("bench-fo-{n}");
        let keepalived = plan.keepalived.get(n).map(|a| ("198.18.0.123", *a));
        let figures = unplanned(lab, &name, "198.18.0.120", *timing, keepalived, runs)?;
        for (figure, seen) in figures {
            absorb(&mut report, &seen);
            report.unplanned.push(figure);
        }
        if let Some((_, advert)) = keepalived {
            let ms = report.unplanned.last().map(|f| f.ms);
            if advert == 1.0 {
                report.keepalived_ms = ms;
            } else if advert == 0.1 {
                report.keepalived_tight_ms = ms;
            }
        }
    }
    if plan.timings.is_empty() {
        let (switch, seen) = switchover(lab, "bench-move", "198.18.0.122", runs)?;
        absorb(&mut report, &seen);
        report.switchover_ms = Some(summarize(&switch));
        if plan.switchover_only {
            return Ok(report);
        }
        report.steady_writes_per_s = Some(steady(lab, plan.services, plan.steady_secs)?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timing_is_four_numbers_in_milliseconds() {
        let t = Timing::parse_list("1000, 300,600,100").unwrap();
        assert_eq!(
            (t.lease_ms, t.renew_ms, t.deadline_ms, t.skew_ms),
            (1000, 300, 600, 100)
        );
        assert_eq!(t.label(), "1000/300/600/100 ms");
        let e = Timing::parse_list("1000,300,600").unwrap_err().to_string();
        assert!(e.contains("D,R,RD,SKEW"), "{e}");
        assert!(Timing::parse_list("1s,300,600,100").is_err());
    }

    #[test]
    fn median_and_p95() {
        let s = summarize(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!((s.median, s.p95), (50.5, 95.0));
        let s = summarize(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p95), (2.0, 3.0));
    }
}
