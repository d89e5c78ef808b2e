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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::ha::{self, Timing};
use crate::lab::{Lab, StopSignal};
use crate::nodes;

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
    /// Whether the run found nothing.
    pub fn clean(&self) -> bool {
        self.safety_violations.is_empty() && self.liveness_violations.is_empty()
    }
}

/// xorshift64*: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `[lo, hi)`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Service `k`'s name.
fn service_name(k: usize) -> String {
    format!("chaos-{k}")
}

/// Service `k`'s VIPs without prefix: IPv4, and IPv6 for even `k`.
fn service_vips(k: usize) -> (String, Option<String>) {
    (
        format!("198.18.0.{}", 100 + k),
        k.is_multiple_of(2)
            .then(|| format!("2001:db8::{:x}", 0x140 + k)),
    )
}

/// Service `k`'s extra VIP for [`Kind::VipEdit`] (IPv6, inside the lab's
/// pool, apart from every service's own VIPs).
fn extra_vip(k: usize) -> String {
    format!("2001:db8::{:x}", 0x180 + k)
}

/// Service `k` as the run applies it, with its extra VIP or without.
fn service_spec(k: usize, extra: bool) -> serde_json::Value {
    let (v4, v6) = service_vips(k);
    let mut vips = vec![format!("{v4}/24")];
    vips.extend(v6.map(|v| format!("{v}/64")));
    if extra {
        vips.push(format!("{}/64", extra_vip(k)));
    }
    let vips: Vec<&str> = vips.iter().map(String::as_str).collect();
    let mut spec = ha::service(&service_name(k), CLUSTER, &vips, Some(HOOK_DIR), (3, 100));
    spec["spec"]["hooks"]["monitor"] =
        serde_json::json!({"intervalSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 2});
    // A node where the monitor failed may serve again a minute later, so
    // hook faults never use up the members for good.
    spec["spec"]["failureTimeoutSeconds"] = serde_json::json!(60);
    spec
}

/// Where the chaos keeps its fault markers: `<dir>/<node>/<service>.<fault>`.
fn faults_dir(lab: &Lab) -> std::path::PathBuf {
    lab.dir().join("chaos").join("faults")
}

/// Where the chaos services' servers keep their pid files:
/// `<dir>/<node>/<service>/`.
fn servers_dir(lab: &Lab) -> std::path::PathBuf {
    lab.dir().join("chaos").join("servers")
}

/// The marker that makes `service`'s monitor on node `i` misbehave
/// (`monitor-fail`, `monitor-hang`, or `monitor-slow` holding the seconds
/// to sleep).
fn fault_marker(lab: &Lab, i: u8, service: &str, fault: &str) -> std::path::PathBuf {
    faults_dir(lab)
        .join(nodes::node_name(i))
        .join(format!("{service}.{fault}"))
}

/// The chaos services' hook scripts `(file name, body)`:
/// - `E01server` starts, unless it runs, a TCP server on the first VIP
///   (IPv4) and port [`SERVER_PORT`] that answers every connection with the
///   node's name and closes it;
/// - `L01server` stops it;
/// - `M01server` checks it (0 running, 7 not), unless a fault marker makes
///   it fail (exit 3), hang, or sleep first.
///
/// A server is recognised by its command line, never by a pid alone, so a
/// recycled pid is neither trusted nor killed.
fn hook_scripts(lab: &Lab) -> Vec<(&'static str, String)> {
    let servers = servers_dir(lab);
    let faults = faults_dir(lab);
    let prelude = format!(
        r#"#!/bin/sh
set -u
# KUBEHA_SERVICE is namespace/name.
service=${{KUBEHA_SERVICE##*/}}
state={servers}/$KUBEHA_NODE/$service
vip=${{KUBEHA_VIPS%%/*}}
# The server of this node and service, recognised by its command line.
running() {{
    [ -f "$state/pid" ] || return 1
    pid=$(cat "$state/pid")
    {{ tr '\0' ' ' < "/proc/$pid/cmdline"; }} 2>/dev/null | grep -q "kubeha-chaos-server $vip $KUBEHA_NODE"
}}
"#,
        servers = servers.display()
    );
    let server = format!(
        "import socket,sys\n\
         s=socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind((sys.argv[2],{SERVER_PORT}))\n\
         s.listen(64)\n\
         r=sys.argv[3].encode()\n\
         while 1:\n \
         c=s.accept()[0]\n \
         try:c.sendall(r)\n \
         except OSError:pass\n \
         c.close()\n"
    );
    let enter = format!(
        r#"{prelude}mkdir -p "$state"
if running; then
    echo "already running"
    exit 0
fi
setsid python3 -S -c '{server}' kubeha-chaos-server "$vip" "$KUBEHA_NODE" >"$state/log" 2>&1 </dev/null &
echo $! > "$state/pid"
echo "started on $vip:{SERVER_PORT} ($KUBEHA_TRANSITION, epoch $KUBEHA_EPOCH)"
"#
    );
    let leave = format!(
        r#"{prelude}if running; then
    kill "$pid"
fi
rm -f "$state/pid"
echo "stopped ($KUBEHA_TRANSITION)"
"#
    );
    let monitor = format!(
        r#"{prelude}fault={faults}/$KUBEHA_NODE/$service
if [ -e "$fault.monitor-fail" ]; then
    echo "chaos: this monitor fails"
    exit 3
fi
if [ -e "$fault.monitor-hang" ]; then
    echo "chaos: this monitor hangs"
    exec sleep 3600
fi
if [ -e "$fault.monitor-slow" ]; then
    sleep "$(cat "$fault.monitor-slow")"
fi
running && exit 0
exit 7
"#,
        faults = faults.display()
    );
    vec![
        ("E01server", enter),
        ("L01server", leave),
        ("M01server", monitor),
    ]
}

/// The cluster as the run applies it: every node a member, `locked` the
/// one in mode locked, with `timing`.
fn cluster_spec(nodes: u8, locked: Option<u8>, timing: Timing) -> serde_json::Value {
    let modes: Vec<(u8, &str)> = (1..=nodes)
        .map(|i| {
            (
                i,
                if Some(i) == locked {
                    "locked"
                } else {
                    "default"
                },
            )
        })
        .collect();
    ha::cluster_with_modes(CLUSTER, &modes, timing)
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

/// How often a wait on a service's status polls (each poll is a kubectl
/// call).
const KUBECTL_POLL: Duration = Duration::from_millis(250);

/// The node service `k`'s status names active (phase Active), if any.
fn active_node(lab: &Lab, k: usize) -> Option<u8> {
    let status = ha::service_status(lab, &service_name(k));
    if status["phase"] != "Active" {
        return None;
    }
    status["activeNode"]
        .as_str()?
        .strip_prefix("node-")?
        .parse()
        .ok()
}

/// The node service `k`'s status names active, waiting up to `timeout`
/// for one.
fn wait_active(lab: &Lab, k: usize, timeout: Duration) -> Option<u8> {
    let mut on = None;
    ha::wait_every(timeout, KUBECTL_POLL, || {
        on = active_node(lab, k);
        on.is_some()
    })?;
    on
}

/// Service `k`'s fail count on node `i`, from its status.
fn fail_count(lab: &Lab, k: usize, i: u8) -> i64 {
    let status = ha::service_status(lab, &service_name(k));
    status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["node"] == nodes::node_name(i).as_str())
        .and_then(|e| e["failCount"].as_i64())
        .unwrap_or(0)
}

fn inject(lab: &Lab, cfg: &Config, timing: Timing) -> anyhow::Result<Report> {
    let d = Duration::from_millis(u64::from(timing.lease_ms));
    let deadline = d + Duration::from_millis(u64::from(timing.skew_ms)) + Duration::from_secs(3);
    let mut rng = Rng::new(cfg.seed);
    let mut report = Report {
        seed: cfg.seed,
        ..Report::default()
    };
    let vips: Vec<String> = (0..cfg.services)
        .flat_map(|k| {
            let (v4, v6) = service_vips(k);
            std::iter::once(v4).chain(v6).chain([extra_vip(k)])
        })
        .collect();
    let vip_refs: Vec<&str> = vips.iter().map(String::as_str).collect();
    let sampler = ha::SplitBrain::start_many(&vip_refs, &[]);
    let arp = crate::arp_probe::ArpProbe::start(&vip_refs)?;
    let started = Instant::now();
    let stamp = |report: &mut Report, line: String| {
        let line = format!("[{:8.2} s] {line}", started.elapsed().as_secs_f64());
        eprintln!("chaos: {line}");
        report.log.push(line);
    };
    for n in 1..=cfg.injections {
        std::thread::sleep(d.mul_f64(rng.between(0.2, 1.5)));
        let kind = cfg.kinds[rng.below(cfg.kinds.len())];
        let node = 1 + rng.below(usize::from(cfg.nodes)) as u8;
        let what = match kind {
            Kind::AgentKill => {
                lab.stop_agent(node, StopSignal::Kill)?;
                let down = d.mul_f64(rng.between(0.0, 1.0));
                std::thread::sleep(down);
                lab.start_agent(node, &[] as &[&str])?;
                format!("node-{node}'s agent killed, started {down:.1?} later")
            }
            Kind::AgentStop => {
                let stall = d.mul_f64(rng.between(0.5, 3.0));
                lab.freeze_agent(node, true)?;
                std::thread::sleep(stall);
                lab.freeze_agent(node, false)?;
                format!("node-{node}'s agent stalled for {stall:.1?}")
            }
            Kind::PowerOff => {
                let off = d.mul_f64(rng.between(1.0, 3.0));
                lab.power_off(node)?;
                // Its addresses stay configured off the wire: not counted.
                sampler.set_off(&[node]);
                std::thread::sleep(off);
                lab.power_on(node)?;
                sampler.set_off(&[]);
                lab.start_agent(node, &[] as &[&str])?;
                format!("node-{node} powered off for {off:.1?}")
            }
            Kind::Partition => {
                let cut = d.mul_f64(rng.between(0.5, 3.0));
                lab.partition(node)?;
                std::thread::sleep(cut);
                lab.heal(node)?;
                format!("node-{node} cut off from the API server for {cut:.1?}")
            }
            Kind::ApiserverStop => {
                let stall = Duration::from_secs_f64(rng.between(1.0, 5.0));
                lab.freeze_process("kube-apiserver", true)?;
                std::thread::sleep(stall);
                lab.freeze_process("kube-apiserver", false)?;
                format!("kube-apiserver stalled for {stall:.1?}")
            }
            Kind::OperatorLeaderKill => {
                let leader = (0..=1u8)
                    .find(|r| ha::operator_metric(*r, "kubeha_operator_leader") == 1.0)
                    .unwrap_or(0);
                lab.stop_operator(leader, StopSignal::Kill)?;
                let down = d.mul_f64(rng.between(0.0, 1.0));
                std::thread::sleep(down);
                lab.start_operator(leader, &[])?;
                format!("operator replica {leader} (leader) killed, started {down:.1?} later")
            }
            Kind::EtcdRestart => {
                let down = Duration::from_secs_f64(rng.between(0.5, 2.0));
                lab.restart_etcd(down)?;
                format!("etcd killed, started {down:.1?} later")
            }
            Kind::VipEdit => {
                let k = rng.below(cfg.services);
                let hold = d.mul_f64(rng.between(0.5, 1.5));
                ha::apply(lab, &service_spec(k, true))?;
                std::thread::sleep(hold);
                ha::apply(lab, &service_spec(k, false))?;
                format!(
                    "{} got VIP {} for {hold:.1?}",
                    service_name(k),
                    extra_vip(k)
                )
            }
            Kind::TimingChange => {
                let lowered = Timing {
                    lease_ms: 2000,
                    renew_ms: 600,
                    deadline_ms: 1400,
                    skew_ms: timing.skew_ms,
                };
                let hold = d.mul_f64(rng.between(1.0, 3.0));
                ha::apply(lab, &cluster_spec(cfg.nodes, None, lowered))?;
                std::thread::sleep(hold);
                ha::apply(lab, &cluster_spec(cfg.nodes, None, timing))?;
                format!("D lowered to 2 s for {hold:.1?}, then back to 3 s")
            }
            Kind::ModeChange => {
                let hold = d.mul_f64(rng.between(1.0, 3.0));
                ha::apply(lab, &cluster_spec(cfg.nodes, Some(node), timing))?;
                std::thread::sleep(hold);
                ha::apply(lab, &cluster_spec(cfg.nodes, None, timing))?;
                format!("node-{node} locked for {hold:.1?}, then default again")
            }
            Kind::HookFail | Kind::HookHang => {
                let k = rng.below(cfg.services);
                let (fault, does) = if kind == Kind::HookFail {
                    ("monitor-fail", "failed")
                } else {
                    ("monitor-hang", "hung")
                };
                'what: {
                    let Some(on) = wait_active(lab, k, d * 2) else {
                        break 'what format!(
                            "{}: no active node for 2 x D, nothing to fail",
                            service_name(k)
                        );
                    };
                    let marker = fault_marker(lab, on, &service_name(k), fault);
                    std::fs::write(&marker, "")?;
                    let left = ha::wait_every(Duration::from_secs(40), KUBECTL_POLL, || {
                        active_node(lab, k) != Some(on)
                    });
                    let _ = std::fs::remove_file(&marker);
                    if let Some(after) = left {
                        break 'what format!(
                            "{}'s monitor {does} on node-{on}; the service left it after {after:.1?}",
                            service_name(k)
                        );
                    }
                    let what = format!(
                        "{}'s monitor {does} on node-{on} for 40 s and the service never left it",
                        service_name(k)
                    );
                    report
                        .liveness_violations
                        .push(format!("injection #{n}: {what}"));
                    what
                }
            }
            Kind::SlowMonitor => {
                let k = rng.below(cfg.services);
                let hold = d.mul_f64(rng.between(1.0, 3.0));
                let slow = rng.between(2.0, 2.8);
                'what: {
                    let Some(on) = wait_active(lab, k, d * 2) else {
                        break 'what format!(
                            "{}: no active node for 2 x D, no monitor to slow",
                            service_name(k)
                        );
                    };
                    let before = fail_count(lab, k, on);
                    let marker = fault_marker(lab, on, &service_name(k), "monitor-slow");
                    std::fs::write(&marker, format!("{slow:.2}"))?;
                    std::thread::sleep(hold);
                    let _ = std::fs::remove_file(&marker);
                    // A run that started slow ends within its timeout.
                    std::thread::sleep(Duration::from_secs(3));
                    let after = fail_count(lab, k, on);
                    let what = format!(
                        "{}'s monitor on node-{on} took {slow:.1} s a run for {hold:.1?}",
                        service_name(k)
                    );
                    if after > before {
                        report.liveness_violations.push(format!(
                            "injection #{n}: {what}, within its 3 s timeout, and node-{on}'s fail count went from {before} to {after}"
                        ));
                    }
                    what
                }
            }
            Kind::Move => {
                let k = rng.below(cfg.services);
                let to = nodes::node_name(node);
                let out = lab
                    .kubectl_ha()?
                    .args([
                        "--wait",
                        "0",
                        "move",
                        &service_name(k),
                        "--to",
                        &to,
                        "-n",
                        ha::SERVICE_NAMESPACE,
                    ])
                    .output()?;
                format!(
                    "kubectl ha move {} --to {to}: {}",
                    service_name(k),
                    if out.status.success() {
                        "accepted".to_owned()
                    } else {
                        String::from_utf8_lossy(&out.stderr).trim().to_owned()
                    }
                )
            }
        };
        *report.by_kind.entry(kind.name()).or_default() += 1;
        report.injections += 1;
        stamp(&mut report, format!("#{n} {}: {what}", kind.name()));

        if n % cfg.checkpoint_every.max(1) == 0 || n == cfg.injections {
            let first = wait_live(lab, cfg.services, deadline);
            let late: Vec<usize> = (0..cfg.services)
                .filter(|k| first[*k].is_none_or(|t| t > deadline))
                .collect();
            let took = first.iter().flatten().max().copied().unwrap_or_default();
            if late.is_empty() {
                report.longest_outage_ms = report.longest_outage_ms.max(took.as_secs_f64() * 1e3);
                stamp(
                    &mut report,
                    format!(
                        "checkpoint: every service answers from its active node; the last {took:.1?} after the last fault"
                    ),
                );
                continue;
            }
            let healthy: Vec<usize> = (0..cfg.services).filter(|k| !late.contains(k)).collect();
            for v in unhealthy(lab, cfg.services, &healthy) {
                report
                    .liveness_violations
                    .push(format!("after injection #{n}: {v}"));
            }
            // Give it a minute more before injecting again, so one
            // violation does not cascade into many; record how long.
            let waited = deadline.max(took);
            let later = wait_live(lab, cfg.services, Duration::from_secs(60));
            let still: Vec<usize> = late
                .iter()
                .copied()
                .filter(|k| later[*k].is_none())
                .collect();
            let live_later: Vec<usize> = (0..cfg.services).filter(|k| !still.contains(k)).collect();
            for v in unhealthy(lab, cfg.services, &live_later) {
                report.stuck.push(format!("after injection #{n}: {v}"));
            }
            let more = late
                .iter()
                .filter_map(|k| later[*k])
                .max()
                .unwrap_or_default();
            report.longest_outage_ms = report
                .longest_outage_ms
                .max((waited + more).as_secs_f64() * 1e3);
            stamp(
                &mut report,
                format!(
                    "checkpoint: LIVENESS VIOLATION, {} of {} services answered within {deadline:.1?} ({}); {} of them after {more:.1?} more",
                    healthy.len(),
                    cfg.services,
                    late.iter()
                        .map(|k| format!(
                            "{} {}",
                            service_name(*k),
                            first[*k].map_or("not answering".to_owned(), |t| format!("at {t:.1?}"))
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    late.len() - still.len(),
                ),
            );
        }
    }
    let seen = sampler.stop();
    report.safety_samples = seen.samples;
    report.safety_max_gap_ms = seen.max_gap.as_secs_f64() * 1e3;
    for w in &seen.windows {
        report.safety_violations.push(window(
            format!("{} held by nodes {:?}", w.vip, w.nodes),
            w.from,
            w.to,
        ));
    }
    let probed = arp.stop();
    report.arp_requests = probed.requests;
    report.arp_replies = probed.replies;
    for w in &probed.windows {
        report.safety_violations.push(
            window(
                format!("{} answered by MACs {:?}", w.vip, w.macs),
                w.from,
                w.to,
            ) + " (client ARP)",
        );
    }
    for (detector, gap) in [
        ("the safety detector", seen.max_gap),
        ("the client's ARP probe", probed.max_gap),
    ] {
        if gap >= ha::MAX_SAMPLE_GAP {
            report.safety_violations.push(format!(
                "{detector} could not keep pace: {gap:?} between two rounds (limit {:?})",
                ha::MAX_SAMPLE_GAP
            ));
        }
    }
    Ok(report)
}

/// `WHAT from F s to T s`: a window in which a VIP had two holders.
fn window(what: String, from: Duration, to: Duration) -> String {
    format!(
        "{what} from {:.2} s to {:.2} s",
        from.as_secs_f64(),
        to.as_secs_f64()
    )
}

/// Waits up to `timeout` for every service to answer on its VIP from the
/// node its status names active (phase Active, that node alone holds the
/// VIP, the client's ping is answered from that node's MAC, and the
/// service's TCP server answers the client with that node's name). Returns, per
/// service, when its first such answer came (`None`: not within
/// `timeout`). One pass reads every status with one call and every node's
/// addresses at once, and pings the candidates in parallel, so a pass takes
/// a ping's round trip, not one per service.
fn wait_live(lab: &Lab, services: usize, timeout: Duration) -> Vec<Option<Duration>> {
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
                let active = status["activeNode"]
                    .as_str()?
                    .strip_prefix("node-")?
                    .parse::<u8>()
                    .ok()?;
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
fn unhealthy(lab: &Lab, services: usize, healthy: &[usize]) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_choices() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..50).map(|_| rng.below(7)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let mut rng = Rng::new(0);
        let mut kinds = [0usize; 7];
        for _ in 0..7000 {
            kinds[rng.below(7)] += 1;
            let x = rng.between(0.2, 1.5);
            assert!((0.2..1.5).contains(&x), "{x}");
        }
        assert!(
            kinds.iter().all(|c| *c > 700),
            "every kind is drawn: {kinds:?}"
        );
    }

    #[test]
    fn services_have_distinct_vips_inside_the_lab_pool() {
        let mut all = Vec::new();
        for k in 0..20 {
            let (v4, v6) = service_vips(k);
            let last: u8 = v4.rsplit('.').next().unwrap().parse().unwrap();
            assert!((96..128).contains(&last), "{v4} outside 198.18.0.96/27");
            all.push(v4);
            all.extend(v6);
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate VIPs");
    }
}
