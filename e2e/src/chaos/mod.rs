//! `cargo xtask chaos`: a seeded, randomized run of ordinary faults over the
//! lab (at least 5 nodes, 10 HAServices with IPv4 and IPv6 VIPs), with two
//! detectors running the whole time.
//!
//! - Safety: every node's address events and 100 ms snapshots
//!   ([`ha::SplitBrain`] over every VIP, the edits' extra VIPs too); any
//!   instant at which two powered nodes hold one VIP is a violation,
//!   reported as a window (VIP, nodes, from, to). A detector that could not
//!   keep pace is a violation too.
//! - Liveness: at every checkpoint (every few injections, and at the end)
//!   the injecting stops; every service must then, within D + skew + 3 s of
//!   the last fault's end, be Active on the node its status names, hold its
//!   VIP there only, and answer the client from that node's MAC.
//! - Moves: every change of a service's master (its Lease's holder, polled
//!   the whole run) must have a cause: a fault on the node it left, on the
//!   service, or on the control plane, running or ended at most 2 x E + 5 s
//!   before ([`moves`]). A move without one (after an operator restart, a
//!   slow monitor, a VIP edit, a timing change, or nothing) is a violation.
//!
//! Every service runs hooks ([`hook_scripts`]): its enter hook starts a
//! small TCP server on the service's IPv4 VIP that answers with the node's
//! name, its leave hook stops it, its monitor checks it every second. A
//! service is live when that server answers the client with the name of the
//! node the status names active.
//!
//! Faults ([`Kind`]: agent kill and stall, power-off, partition from the
//! API server, API server stall, etcd restart, operator leader kill, moves,
//! VIP list edits, D lowered then raised, a node locked then back, a monitor
//! that fails, hangs or is slow) are
//! injected one at a time, in random order, with random gaps of 0.2-1.5 x D
//! between them: shorter than D, so the next fault lands while the system
//! still recovers from the last.

mod inject;
mod liveness;
mod moves;
mod services;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;

use crate::ha::{self, Timing};
use crate::lab::Lab;
use crate::nodes;
use inject::inject;
use liveness::{unhealthy, wait_live};
use services::{cluster_spec, faults_dir, hook_scripts, service_name, service_spec};

/// The HACluster the run creates (and removes afterwards).
pub const CLUSTER: &str = "chaos";

/// The hook folder of the chaos services (`hooks.source.hostPath`).
pub const HOOK_DIR: &str = "chaos";

/// The port of the TCP server the chaos services' enter hook starts.
pub const SERVER_PORT: u16 = 8080;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Faults to inject.
    pub injections: usize,
    /// Seed of the random choices: the same seed replays the same choices.
    pub seed: u64,
    /// Lab nodes, all members of the cluster (at least 5).
    pub nodes: u8,
    /// HAServices (at most 20: the lab's VIP pool).
    pub services: usize,
    /// A liveness checkpoint after this many injections.
    pub checkpoint_every: usize,
    /// The kinds of fault drawn from (every kind: [`Kind::ALL`]).
    pub kinds: Vec<Kind>,
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The agent is killed (SIGKILL) and started again after up to D.
    AgentKill,
    /// The agent stalls (SIGSTOP) for 0.5-3 x D, then continues.
    AgentStop,
    /// The node loses power for 1-3 x D, boots and starts its agent.
    PowerOff,
    /// The node is cut off from the API server for 0.5-3 x D (L2 stays up).
    Partition,
    /// kube-apiserver stalls (SIGSTOP) for 1-5 s.
    ApiserverStop,
    /// The operator replica that leads is killed, and started again after up to D.
    OperatorLeaderKill,
    /// `kubectl ha move` of a random service to a random node.
    Move,
    /// etcd is killed and started again after 0.5-2 s.
    EtcdRestart,
    /// A random service gets a second (IPv6) VIP for 0.5-1.5 x D, then its
    /// VIP list is back as it was.
    VipEdit,
    /// The cluster's lease duration is lowered to 2 s for 1-3 x D, then
    /// raised back.
    TimingChange,
    /// A random node is put in mode `locked` for 1-3 x D, then back to
    /// `default`.
    ModeChange,
    /// A random service's monitor fails (exit 3) on its active node until
    /// the service has left that node (it must, within 40 s).
    HookFail,
    /// A random service's monitor hangs on its active node (past its
    /// timeout, so the agent kills it and counts a failure) until the
    /// service has left that node (it must, within 40 s).
    HookHang,
    /// A random service's monitor takes 2-2.8 s on its active node (longer
    /// than its 1 s interval, within its 3 s timeout) for 1-3 x D: the
    /// service must stay there with its VIP, and no failure is counted.
    SlowMonitor,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 14] = [
        Kind::AgentKill,
        Kind::AgentStop,
        Kind::PowerOff,
        Kind::Partition,
        Kind::ApiserverStop,
        Kind::OperatorLeaderKill,
        Kind::Move,
        Kind::EtcdRestart,
        Kind::VipEdit,
        Kind::TimingChange,
        Kind::ModeChange,
        Kind::HookFail,
        Kind::HookHang,
        Kind::SlowMonitor,
    ];

    /// The name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::AgentKill => "agent_kill",
            Kind::AgentStop => "agent_stop",
            Kind::PowerOff => "power_off",
            Kind::Partition => "partition",
            Kind::ApiserverStop => "apiserver_stop",
            Kind::OperatorLeaderKill => "operator_leader_kill",
            Kind::Move => "move",
            Kind::EtcdRestart => "etcd_restart",
            Kind::VipEdit => "vip_edit",
            Kind::TimingChange => "timing_change",
            Kind::ModeChange => "mode_change",
            Kind::HookFail => "hook_fail",
            Kind::HookHang => "hook_hang",
            Kind::SlowMonitor => "slow_monitor",
        }
    }

    /// The kind named `name` (as [`Kind::name`] writes it).
    pub fn parse(name: &str) -> anyhow::Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .with_context(|| {
                format!(
                    "no fault kind {name:?}; the kinds are {}",
                    Kind::ALL.map(Kind::name).join(", ")
                )
            })
    }
}

/// What a run found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// The seed (replays the run).
    pub seed: u64,
    /// Faults injected.
    pub injections: usize,
    /// Faults injected per kind.
    pub by_kind: BTreeMap<&'static str, usize>,
    /// Safety violations: two holders of one VIP (windows), or a sampler
    /// that could not keep pace.
    pub safety_violations: Vec<String>,
    /// Liveness violations: a service not answering from its active node
    /// within D + skew + 3 s of a checkpoint's last fault.
    pub liveness_violations: Vec<String>,
    /// Services that did not answer even a minute after that: down until an
    /// admin acts, as far as this run can tell.
    pub stuck: Vec<String>,
    /// Spurious moves: changes of a service's master (to another node, or
    /// to none) that no injected fault explains.
    pub spurious_moves: Vec<String>,
    /// Changes of a service's master the move detector saw, spurious or not.
    pub master_changes: usize,
    /// Polls of the services' Leases that the move detector made.
    pub master_polls: usize,
    /// Polls of the services' Leases that failed (skipped).
    pub master_poll_failures: usize,
    /// Longest gap between two polls of the services' Leases, ms.
    pub master_max_gap_ms: f64,
    /// The longest time, over checkpoints, from the last fault's end until
    /// every service answered from its active node.
    pub longest_outage_ms: f64,
    /// Samples the safety detector took, and the longest gap between two.
    pub safety_samples: usize,
    /// Longest gap between two safety samples, ms.
    pub safety_max_gap_ms: f64,
    /// ARP probes the client sent for the IPv4 VIPs.
    pub arp_requests: usize,
    /// Answers to those probes.
    pub arp_replies: usize,
    /// Every injection and checkpoint, with its time since the start.
    pub log: Vec<String>,
}

impl Report {
    /// Whether the run found nothing: no safety or liveness violation and
    /// no spurious move.
    pub fn clean(&self) -> bool {
        self.safety_violations.is_empty()
            && self.liveness_violations.is_empty()
            && self.spurious_moves.is_empty()
    }
}

/// Runs the chaos: sets up the cluster and services, injects, checks,
/// and removes what it created. Every fault is undone before it returns,
/// also on an error.
pub fn run(lab: &Lab, cfg: &Config) -> anyhow::Result<Report> {
    anyhow::ensure!(cfg.nodes >= 5, "chaos needs at least 5 nodes");
    anyhow::ensure!(
        (1..=20).contains(&cfg.services),
        "chaos runs 1 to 20 services (the lab's VIP pool)"
    );
    anyhow::ensure!(
        !cfg.kinds.is_empty(),
        "chaos needs at least one kind of fault"
    );
    let timing = Timing::DEFAULT;
    setup(lab, cfg, timing)?;
    let result = inject(lab, cfg, timing);
    restore(lab, cfg.nodes);
    teardown(lab, cfg);
    result
}

/// Every node powered, in contact and running its agent; operator replicas
/// 0 and 1 (so a leader kill hands over); the cluster and the services,
/// each Active.
fn setup(lab: &Lab, cfg: &Config, timing: Timing) -> anyhow::Result<()> {
    lab.ensure_up_with_nodes(cfg.nodes)?;
    restore(lab, cfg.nodes);
    for r in 0..=1 {
        if !lab.operator_running(r) {
            lab.start_operator(r, &[])?;
        }
    }
    teardown(lab, cfg);
    let scripts = hook_scripts(lab);
    let scripts: Vec<(&str, &str)> = scripts.iter().map(|(n, b)| (*n, b.as_str())).collect();
    for i in 1..=cfg.nodes {
        ha::install_hooks(lab, i, HOOK_DIR, &scripts)?;
        std::fs::create_dir_all(faults_dir(lab).join(nodes::node_name(i)))?;
    }
    ha::apply(lab, &cluster_spec(cfg.nodes, None, timing))?;
    ha::wait_until(Duration::from_secs(30), || {
        ha::members_ready(lab, CLUSTER, cfg.nodes)
    })
    .context("the chaos cluster never had every member ready")?;
    for k in 0..cfg.services {
        ha::apply(lab, &service_spec(k, false))?;
    }
    let first = wait_live(lab, cfg.services, Duration::from_secs(60));
    let healthy: Vec<usize> = (0..cfg.services).filter(|k| first[*k].is_some()).collect();
    anyhow::ensure!(
        healthy.len() == cfg.services,
        "chaos services never all became Active: {:?}",
        unhealthy(lab, cfg.services, &healthy)
    );
    Ok(())
}

/// Removes the chaos services and cluster (the operator gives each service
/// away first), whatever an earlier run left.
fn teardown(lab: &Lab, cfg: &Config) {
    for k in 0..20.max(cfg.services) {
        ha::delete_service(lab, &service_name(k));
    }
    ha::delete(lab, "hacluster", CLUSTER, None);
}

/// Undoes every fault the run may have left: control plane continued, every
/// node powered on, healed, its agent continued or started; operator
/// replica 0 runs, replica 1 stops (as the other lab tests expect).
fn restore(lab: &Lab, nodes: u8) {
    clear_faults(lab);
    let _ = lab.freeze_process("kube-apiserver", false);
    for i in 1..=nodes {
        let _ = lab.power_on(i);
        let _ = lab.heal(i);
        let _ = lab.freeze_agent(i, false);
        if !lab.agent_running(i) {
            let _ = lab.start_agent(i, &[] as &[&str]);
        }
    }
    if !lab.operator_running(0) {
        let _ = lab.start_operator(0, &[]);
    }
}

/// Removes every fault marker (the monitors behave again).
fn clear_faults(lab: &Lab) {
    let Ok(nodes) = std::fs::read_dir(faults_dir(lab)) else {
        return;
    };
    for node in nodes.flatten() {
        for marker in std::fs::read_dir(node.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_file(marker.path());
        }
    }
}
