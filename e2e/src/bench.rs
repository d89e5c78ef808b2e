//! Benchmarks on the lab (`cargo xtask bench ...`). They print their figures;
//! no timing is asserted anywhere.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::ha::{self, Capture, Timing};
use crate::lab::Lab;
use crate::nodes;

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
    /// CPU of one idle agent (holding one VIP, heartbeating), percent of one core.
    pub agent_idle_cpu_pct: f64,
    /// Transitions measured.
    pub transitions: usize,
}

/// Writes service Leases straight through the API (not kubectl), so the
/// instant a write is sent is known to the millisecond.
struct LeaseWriter {
    runtime: tokio::runtime::Runtime,
    api: kube::Api<k8s_openapi::api::coordination::v1::Lease>,
}

impl LeaseWriter {
    fn new(lab: &Lab) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let api = runtime.block_on(async {
            let kubeconfig = kube::config::Kubeconfig::read_from(lab.kubeconfig())?;
            let config = kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            anyhow::Ok(kube::Api::namespaced(
                kube::Client::try_from(config)?,
                ha::SERVICE_NAMESPACE,
            ))
        })?;
        Ok(Self { runtime, api })
    }

    /// Applies the service Lease; returns the wall-clock instant the request
    /// was sent, in seconds since the epoch (tcpdump's time base).
    fn write(&self, service: &str, holder: &str, epoch: i32, cleared: bool) -> anyhow::Result<f64> {
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": format!("kubeha-svc-{service}"),
                "labels": {"kubeha.io/lease": "service", "kubeha.io/service": service},
                "annotations": {"kubeha.io/enter-epoch": if cleared { epoch.to_string() } else { "-1".into() }}
            },
            "spec": {"holderIdentity": holder, "leaseTransitions": epoch}
        });
        let params = kube::api::PatchParams::apply("kubeha-e2e").force();
        let sent = now_epoch_secs();
        self.runtime
            .block_on(self.api.patch(
                &format!("kubeha-svc-{service}"),
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
/// (holder written uncleared, the old holder leaves and acknowledges, then
/// the clearance is written: that write starts the clock), timed to the first
/// GARP from the new holder seen in the client namespace; then the agent's
/// RSS and idle CPU.
pub fn agent(lab: &Lab, transitions: usize, idle_secs: u64) -> anyhow::Result<AgentReport> {
    lab.ensure_up_with_nodes(3)?;
    for i in 1..=3 {
        if !lab.agent_running(i) {
            lab.start_agent(i, &[] as &[&str])?;
        }
    }
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
        writer.write(name, &nodes::node_name(new), k, false)?;
        if ha::wait_until(Duration::from_secs(15), || !ha::vip_on_node(old, vip)).is_none() {
            bail!("transition {k}: node-{old} never gave the VIP away");
        }
        // The old holder's acknowledgement (or, at k = 1, nothing to wait for).
        std::thread::sleep(Duration::from_millis(300));
        let sent = writer.write(name, &nodes::node_name(new), k, true)?;
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
    // Idle: the last holder keeps its VIP and heartbeats.
    let holder = if transitions % 2 == 1 { 1 } else { 2 };
    let pid = lab.agent_pid(holder).context("agent pid")? as u32;
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, t0) = (cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let cpu = (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_mb(pid)?;
    ha::delete_service(lab, name);
    ha::wait_until(Duration::from_secs(15), || {
        !ha::vip_on_node(1, vip) && !ha::vip_on_node(2, vip)
    });
    ha::delete(lab, "hacluster", name, None);
    Ok(AgentReport {
        lease_to_garp_ms: summarize(&samples),
        agent_rss_mb: rss,
        agent_idle_cpu_pct: cpu,
        transitions: samples.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p95() {
        let s = summarize(&(1..=100).map(f64::from).collect::<Vec<_>>());
        assert_eq!((s.median, s.p95), (50.5, 95.0));
        let s = summarize(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.p95), (2.0, 3.0));
    }
}
