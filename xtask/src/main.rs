//! `cargo xtask`: project automation. `crdgen` writes the CRD YAML from the
//! Rust types; `lab up|down|status` drives the local lab; `test` runs the
//! whole test suite against the lab; `hostile` runs the hostile-input
//! catalogue.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kubeha_e2e::lab::{Lab, Profile};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "kubeha project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write crds/manifests/*.yaml and the chart's CRD template from the Rust types.
    Crdgen {
        /// Fail instead of writing when a file would change (for CI).
        #[arg(long)]
        check: bool,
    },
    /// The local lab: a real etcd and kube-apiserver, and nodes on an
    /// isolated network segment (needs root).
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
    /// Run every test (unit and lab) and tear the lab down afterwards.
    Test {
        /// Leave the lab running after the tests.
        #[arg(long)]
        keep_lab: bool,
    },
    /// The hostile-input catalogue (issue 9): builds the debug binaries,
    /// runs every case of `kubeha_e2e::hostile` against the lab
    /// (`cargo test -p kubeha-e2e --test hostile`), prints the table case |
    /// expected | outcome | passed and the figures; fails if any case failed.
    Hostile {
        /// Also write the report as JSON to this file: {"cases", "passed",
        /// "failed", "results": [{"case", "expected", "outcome", "passed"}]}.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run only the cases whose name contains this (or one of its
        /// comma-separated parts).
        #[arg(long)]
        filter: Option<String>,
    },
    /// The local demo: the lab with three nodes, the operator, the example
    /// cluster and service, and a failover you can watch. Leaves the lab up.
    Demo {
        /// Run kubeha as processes the lab starts in its node namespaces,
        /// not as pods of the kubelet lab (quicker; no images, no kubelets).
        #[arg(long)]
        host_processes: bool,
    },
    /// A seeded, randomized run of faults over the lab (5 nodes, services
    /// with IPv4 and IPv6 VIPs) with a safety and a liveness detector; fails
    /// when either found a violation, printing the seed and the log.
    Chaos(ChaosArgs),
    /// The container images kubeha/kubeha-operator and kubeha/kubeha-agent
    /// (images/*.Dockerfile), built without Docker: release builds of the
    /// binaries, then buildah (vfs, chroot) into OCI archives, tagged with
    /// the chart's appVersion. Needs root; installs buildah, nftables and
    /// busybox-static with apt-get when missing.
    Images {
        /// Folder of the archives kubeha-operator.tar and kubeha-agent.tar.
        #[arg(long, default_value = "target/images")]
        out: PathBuf,
    },
    /// Benchmarks on the lab, with release builds of the binaries (built
    /// first, outside any timing); they print their figures (nothing is
    /// asserted).
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
}

// The options of `cargo xtask chaos` (its help is the variant's doc).
#[derive(clap::Args)]
struct ChaosArgs {
    /// Faults to inject.
    #[arg(long, default_value_t = 40)]
    injections: usize,
    /// Seed of the random choices (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Lab nodes, all cluster members (at least 5).
    #[arg(long, default_value_t = 5)]
    nodes: u8,
    /// HAServices (1 to 20).
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// A liveness checkpoint after this many injections.
    #[arg(long, default_value_t = 4)]
    checkpoint_every: usize,
    /// Draw only these kinds of fault, comma-separated (default: every
    /// kind), e.g. `etcd_restart,apiserver_stop`.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl ChaosArgs {
    /// The run these options ask for, the seed drawn from the clock when
    /// none is given.
    fn config(&self) -> anyhow::Result<kubeha_e2e::chaos::Config> {
        let kinds = if self.kinds.is_empty() {
            kubeha_e2e::chaos::Kind::ALL.to_vec()
        } else {
            self.kinds
                .iter()
                .map(|k| kubeha_e2e::chaos::Kind::parse(k))
                .collect::<anyhow::Result<Vec<_>>>()?
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or_default()
        });
        Ok(kubeha_e2e::chaos::Config {
            injections: self.injections,
            seed,
            nodes: self.nodes,
            services: self.services,
            checkpoint_every: self.checkpoint_every,
            kinds,
        })
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Unplanned failover (default and tight timing, each with keepalived
    /// beside it: `advert_int 1` and `0.1`) and planned switchover to the
    /// client's first reply, and the steady API write rate.
    Failover {
        /// Runs per figure.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Measure unplanned failovers at this timing only, `D,R,RD,SKEW`
        /// in milliseconds (repeatable), instead of the default and tight
        /// ones, the switchover and the write rate.
        #[arg(long = "timing")]
        timings: Vec<String>,
        /// keepalived's VRRP advertisement interval in seconds beside each
        /// kubeha timing, in order (repeatable; the i-th runs beside the
        /// i-th timing, on its own VIP, over the same power-offs). Default
        /// without `--timing`: `1` beside the default timing and `0.1`
        /// beside the tight one; with `--timing`: none. keepalived is
        /// installed (`apt-get install -y keepalived`) when missing.
        #[arg(long = "keepalived")]
        keepalived: Vec<f64>,
        /// Run no keepalived beside kubeha.
        #[arg(long, conflicts_with = "keepalived")]
        no_keepalived: bool,
        /// Measure the planned switchover only: no power-off, no
        /// keepalived, no steady write rate.
        #[arg(long, conflicts_with_all = ["timings", "keepalived"])]
        switchover_only: bool,
        /// HAServices for the steady-state write rate.
        #[arg(long, default_value_t = 100)]
        services: usize,
        /// Seconds over which the steady write rate is measured.
        #[arg(long, default_value_t = 30)]
        steady_seconds: u64,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Many nodes and HAServices spread over them: steady API writes/s,
    /// operator and agent RSS and CPU at each service count, then the
    /// power-off of the node holding the most services, timed per service
    /// to its first answer from another node, and the API request rate
    /// meanwhile.
    Scale {
        /// Lab nodes, every one a cluster member.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(2..=i64::from(kubeha_e2e::nodes::MAX_NODES)))]
        nodes: u8,
        /// HAServices; a comma-separated ascending list (e.g. `100,1000`)
        /// measures the steady state at each count in one lab, adding
        /// services up to the next, and powers off at the last.
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        services: Vec<usize>,
        /// Seconds of each steady-state window.
        #[arg(long, default_value_t = 30)]
        steady_seconds: u64,
        /// Services applied at once, each wave Active before the next (0:
        /// all of a count at once, as one `kubectl apply` of many would).
        #[arg(long, default_value_t = 50)]
        wave: usize,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Lease change to first GARP seen by the client, agent RSS and idle CPU.
    Agent {
        /// Planned transitions to time.
        #[arg(long, default_value_t = 50)]
        transitions: usize,
        /// Seconds of idle CPU sampling.
        #[arg(long, default_value_t = 20)]
        idle_seconds: u64,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build (once, cached) and start the control plane, install the CRDs,
    /// bring up the network segment and register the nodes.
    Up {
        /// How many nodes (network namespaces `kubeha-node-1..N`, Node
        /// objects `node-1..N`). Nodes are only added: a lower number than
        /// a running lab has removes none.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(0..=i64::from(kubeha_e2e::nodes::MAX_NODES)))]
        nodes: u8,
        /// Real nodes: kube-controller-manager and kube-scheduler on the
        /// host and, in every node namespace, containerd, a kubelet with its
        /// own node certificate and kube-proxy (nftables), with a local
        /// pause image and `target/images/*.tar` imported (build them with
        /// `cargo xtask images`). Starts no agent processes: install the
        /// chart to run the agents as pods.
        #[arg(long)]
        kubelet: bool,
    },
    /// Stop every lab process and agent, tear down the network segment (by
    /// name prefix) and remove the lab's files.
    Down,
    /// Print what runs.
    Status,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ sits in the repo root")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    let root = repo_root();
    match Cli::parse().command {
        Cmd::Crdgen { check } => crdgen(&root, check),
        Cmd::Lab { command } => {
            let lab = Lab::new(&root);
            match command {
                LabCmd::Up {
                    nodes,
                    kubelet: true,
                } => {
                    lab.up_with_kubelets(nodes)?;
                    println!("{}", lab.usage(nodes));
                    Ok(())
                }
                LabCmd::Up { nodes, .. } => {
                    if nodes > 0 {
                        build_binaries(&root, lab.profile())?;
                    }
                    lab.up_with_nodes(nodes)?;
                    for i in 1..=nodes {
                        if !lab.agent_running(i) {
                            lab.start_agent(i, &[] as &[&str])?;
                        }
                    }
                    println!("{}", lab.usage(nodes));
                    Ok(())
                }
                LabCmd::Down => lab.down(),
                LabCmd::Status => {
                    print!("{}", lab.status());
                    Ok(())
                }
            }
        }
        Cmd::Test { keep_lab } => test(&root, keep_lab),
        Cmd::Hostile { json, filter } => hostile(&root, json, filter),
        Cmd::Demo { host_processes } => {
            build_binaries(&root, Profile::Debug)?;
            let (mode, why) = kubeha_e2e::demo::mode(host_processes);
            println!("demo: kubeha as {mode:?}: {why}");
            kubeha_e2e::demo::run(&Lab::new(&root), mode)
        }
        Cmd::Chaos(args) => {
            let config = args.config()?;
            build_binaries(&root, Profile::Debug)?;
            let report = kubeha_e2e::chaos::run(&Lab::new(&root), &config)?;
            print_chaos(&report, config.nodes, config.services);
            if let Some(path) = args.json {
                let value = serde_json::json!({
                    "seed": report.seed,
                    "injections": report.injections,
                    "by_kind": report.by_kind,
                    "safety_violations": report.safety_violations.len(),
                    "liveness_violations": report.liveness_violations.len(),
                    "stuck": report.stuck.len(),
                    "spurious_moves": report.spurious_moves,
                    "master_changes": report.master_changes,
                    "master_polls": report.master_polls,
                    "master_poll_failures": report.master_poll_failures,
                    "master_max_gap_ms": report.master_max_gap_ms,
                    "longest_outage_ms": report.longest_outage_ms,
                    "safety_samples": report.safety_samples,
                    "safety_max_gap_ms": report.safety_max_gap_ms,
                    "violations": report.safety_violations.iter().chain(&report.liveness_violations).chain(&report.spurious_moves).collect::<Vec<_>>(),
                    "log": report.log,
                });
                std::fs::write(&path, serde_json::to_string_pretty(&value)?)?;
                println!("wrote {}", path.display());
            }
            if !report.clean() {
                println!("\ninjection log (replay with --seed {}):", config.seed);
                for line in &report.log {
                    println!("  {line}");
                }
                bail!("chaos found violations (seed {})", config.seed);
            }
            Ok(())
        }
        Cmd::Bench { command } => bench(&root, command),
        Cmd::Images { out } => {
            let started = std::time::Instant::now();
            for image in kubeha_e2e::images::build(&root, &root.join(out))? {
                println!(
                    "{}\n  archive {} ({:.1} MB; root file system {:.1} MB)\n  digest {}",
                    image.reference,
                    image.archive.display(),
                    image.bytes as f64 / 1e6,
                    image.rootfs_bytes as f64 / 1e6,
                    image.digest
                );
            }
            println!("built in {:.1} s", started.elapsed().as_secs_f64());
            Ok(())
        }
    }
}

/// The lab benchmarks run on: release binaries, built here first (the
/// build is never inside a timing).
fn bench_lab(root: &Path) -> anyhow::Result<Lab> {
    let lab = Lab::new(root).with_profile(Profile::Release);
    build_binaries(root, lab.profile())?;
    Ok(lab)
}

/// Writes `value` as JSON to `path`, with `"build": "release"` added.
fn write_bench_json(path: &Path, mut value: serde_json::Value) -> anyhow::Result<()> {
    value["build"] = "release".into();
    std::fs::write(path, serde_json::to_string_pretty(&value)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn bench(root: &Path, command: BenchCmd) -> anyhow::Result<()> {
    match command {
        BenchCmd::Failover {
            runs,
            timings,
            keepalived,
            no_keepalived,
            switchover_only,
            services,
            steady_seconds,
            json,
        } => {
            let keepalived = match (no_keepalived, keepalived.is_empty(), timings.is_empty()) {
                (true, _, _) => Vec::new(),
                _ if switchover_only => Vec::new(),
                (false, true, true) => vec![1.0, 0.1],
                (false, _, _) => keepalived,
            };
            let plan = kubeha_e2e::bench::FailoverPlan {
                runs,
                timings: timings
                    .iter()
                    .map(|t| kubeha_e2e::ha::Timing::parse_list(t))
                    .collect::<anyhow::Result<_>>()?,
                keepalived,
                services,
                steady_secs: steady_seconds,
                switchover_only,
            };
            if !plan.keepalived.is_empty() {
                kubeha_e2e::keepalived::Keepalived::ensure_installed()?;
            }
            let r = kubeha_e2e::bench::failover(&bench_lab(root)?, &plan)?;
            println!(
                "\nfailover benchmark (release build, {} runs each, 3 nodes; D/R/RD/skew; keepalived beside the kubeha timing above it, same power-offs)",
                r.runs
            );
            println!("| figure | median | p95 | double-holder checks |\n|---|---|---|---|");
            for f in &r.unplanned {
                println!(
                    "| unplanned, {}: power-off -> first reply from the new node | {:.0} ms | {:.0} ms | {} |",
                    f.what, f.ms.median, f.ms.p95, f.double_holder_checks
                );
            }
            for f in r
                .unplanned
                .iter()
                .filter(|f| !f.double_holder_windows.is_empty())
            {
                println!(
                    "{}: two holders: {}",
                    f.what,
                    f.double_holder_windows.join("; ")
                );
            }
            if let Some(s) = r.switchover_ms {
                println!(
                    "| planned switchover (default timing): command -> first reply | {:.0} ms | {:.0} ms |",
                    s.median, s.p95
                );
            }
            if let Some(rate) = r.steady_writes_per_s {
                println!("| API writes/s at steady state ({services} HAServices) | {rate:.1} | |");
            }
            println!(
                "| split-brain checks with two holders ({} checks, longest snapshot gap {:.1} ms) | {} | |",
                r.split_brain_samples, r.split_brain_max_gap_ms, r.split_brain_instants
            );
            if let Some(path) = json {
                write_bench_json(&path, serde_json::to_value(&r)?)?;
            }
            Ok(())
        }
        BenchCmd::Scale {
            nodes,
            services,
            steady_seconds,
            wave,
            json,
        } => {
            let plan = kubeha_e2e::bench::ScalePlan {
                nodes,
                services,
                steady_secs: steady_seconds,
                wave,
            };
            let r = kubeha_e2e::bench::scale(&bench_lab(root)?, &plan)?;
            print_scale(&r, steady_seconds);
            if let Some(path) = json {
                write_bench_json(&path, serde_json::to_value(&r)?)?;
            }
            if let Some(e) = &r.error {
                bail!("bench scale stopped (the figures above stand): {e}");
            }
            Ok(())
        }
        BenchCmd::Agent {
            transitions,
            idle_seconds,
            json,
        } => {
            let report = kubeha_e2e::bench::agent(&bench_lab(root)?, transitions, idle_seconds)?;
            println!(
                "\nagent benchmark (release build, {} transitions, node-1 <-> node-2, D = 3 s)",
                report.transitions
            );
            println!("| figure | value |\n|---|---|");
            println!(
                "| lease change -> first GARP, median | {:.1} ms |",
                report.lease_to_garp_ms.median
            );
            println!(
                "| lease change -> first GARP, p95 | {:.1} ms |",
                report.lease_to_garp_ms.p95
            );
            println!(
                "| agent RSS, holding {} VIPs | {:.1} MiB |",
                report.idle_vips, report.agent_rss_mb
            );
            println!(
                "| agent idle CPU, holding {} VIPs | {:.2} % of one core |",
                report.idle_vips, report.agent_idle_cpu_pct
            );
            if let Some(path) = json {
                write_bench_json(
                    &path,
                    serde_json::json!({
                        "lease_to_garp_ms": {"median": report.lease_to_garp_ms.median, "p95": report.lease_to_garp_ms.p95},
                        "agent_rss_mb": report.agent_rss_mb,
                        "agent_idle_cpu_pct": report.agent_idle_cpu_pct,
                        "idle_vips": report.idle_vips,
                    }),
                )?;
            }
            Ok(())
        }
    }
}

/// The figures of `bench scale`: one row per service count, so the steady
/// rates at 100 and 1,000 services stand side by side, then the failover.
fn print_scale(r: &kubeha_e2e::bench::ScaleReport, steady_seconds: u64) {
    println!(
        "\nscale benchmark (release build, {} nodes, timing {}, steady windows of {steady_seconds} s)",
        r.nodes, r.timing
    );
    println!(
        "| services | settled after | API writes/s (target <= {:.0}, flat) | API requests/s | operator RSS (target <= 200 MiB) | operator CPU | agent RSS median / max | agent CPU median / max |",
        r.writes_target_per_s
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in &r.steady {
        println!(
            "| {} | {:.0} s | {:.1} | {:.1} | {:.1} MiB | {:.1} % | {:.1} / {:.1} MiB | {:.2} / {:.2} % |",
            s.services,
            s.settle_s,
            s.writes_per_s,
            s.requests_per_s,
            s.operator_rss_mb,
            s.operator_cpu_pct,
            s.agent_rss_mb.median,
            s.agent_rss_mb.max,
            s.agent_cpu_pct.median,
            s.agent_cpu_pct.max
        );
    }
    for s in &r.steady {
        println!(
            "writes/s at {} services by resource and verb: {}",
            s.services,
            s.writes_by_text()
        );
        println!(
            "writes per service added on the way to {}: {}",
            s.services,
            s.created_writes_by_text()
        );
    }
    let Some(f) = &r.failover else {
        println!(
            "\nno further figure: {}",
            r.error.as_deref().unwrap_or("no error recorded")
        );
        return;
    };
    println!(
        "\npower-off of {} ({} services): first answer from another node per service: median {:.0} ms, max {:.0} ms (target max <= {:.0} ms); {} unanswered, {} two-MAC windows",
        f.node,
        f.services,
        f.answer_ms.median,
        f.answer_ms.max,
        r.answer_target_ms,
        f.unanswered.len(),
        f.two_mac_windows
    );
    println!(
        "API during the failover ({:.0} ms from power-off to every VIP on another node): {:.1} requests/s, {:.1} writes/s; every status Active elsewhere after {:.1} s",
        f.window_ms, f.requests_per_s, f.writes_per_s, f.status_settled_s
    );
    println!(
        "writes in that window per service moved (heartbeat renewals included): {}",
        f.writes_by_text()
    );
    if !f.unanswered.is_empty() {
        println!("unanswered: {}", f.unanswered.join(", "));
    }
}

fn crdgen(root: &Path, check: bool) -> anyhow::Result<()> {
    let files = kubeha_crds::manifests::generated_files();
    if check {
        let drifted = kubeha_crds::manifests::drifted(root);
        if !drifted.is_empty() {
            bail!(
                "generated CRD YAML is out of date: {drifted:?}; run `cargo xtask crdgen` and commit"
            );
        }
        println!("CRD YAML matches the types");
        return Ok(());
    }
    for f in files {
        let path = root.join(f.path);
        std::fs::create_dir_all(path.parent().expect("generated files live in folders"))?;
        std::fs::write(&path, &f.contents)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", f.path);
    }
    Ok(())
}

/// Builds the binaries the lab runs (agent, operator, the kubectl plugin)
/// in `profile`, after checking every prerequisite of the lab: whatever is
/// missing is named before minutes of building.
fn build_binaries(root: &Path, profile: Profile) -> anyhow::Result<()> {
    kubeha_e2e::nodes::check_lab_prerequisites()?;
    let status = Command::new(env!("CARGO"))
        .arg("build")
        .args(profile.cargo_flags())
        .args([
            "--locked",
            "--bins",
            "-p",
            "kubeha-agent",
            "-p",
            "kubeha-operator",
            "-p",
            "kubectl-ha",
        ])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build ({}) of the binaries failed", profile.dir());
    }
    Ok(())
}

/// The figures of a chaos run, and each violation.
fn print_chaos(report: &kubeha_e2e::chaos::Report, nodes: u8, services: usize) {
    println!(
        "\nchaos: seed {}, {} injections over {nodes} nodes and {services} services",
        report.seed, report.injections
    );
    println!("| kind | injected |\n|---|---|");
    for (kind, n) in &report.by_kind {
        println!("| {kind} | {n} |");
    }
    println!(
        "safety violations: {}; liveness violations: {} ({} services still down a minute later); longest outage after a checkpoint's last fault: {:.0} ms; safety samples {} (longest gap {:.1} ms); client ARP: {} requests, {} replies",
        report.safety_violations.len(),
        report.liveness_violations.len(),
        report.stuck.len(),
        report.longest_outage_ms,
        report.safety_samples,
        report.safety_max_gap_ms,
        report.arp_requests,
        report.arp_replies
    );
    println!(
        "spurious moves: {} of {} master changes; {} polls of the service Leases ({} failed, longest gap {:.0} ms)",
        report.spurious_moves.len(),
        report.master_changes,
        report.master_polls,
        report.master_poll_failures,
        report.master_max_gap_ms
    );
    for v in report
        .safety_violations
        .iter()
        .chain(&report.liveness_violations)
    {
        println!("  {v}");
    }
    for v in &report.spurious_moves {
        println!("  spurious move: {v}");
    }
}

/// The CI-sized chaos run of `cargo xtask test`: 40 faults over 5 nodes
/// and 10 services (seed 1, or `KUBEHA_CHAOS_SEED`). It fails on any safety
/// violation (two holders of one VIP, or a detector that could not keep
/// pace), on a spurious move (a service's master changed without a fault
/// that explains it) and on a service still down a minute after a
/// checkpoint (it would need an admin). A service late past D + skew + 3 s
/// is printed, not gated: on a machine that also builds and runs other
/// tests a bound of a few seconds measures the machine as much as the code.
fn ci_chaos(root: &Path) -> anyhow::Result<()> {
    let seed = std::env::var("KUBEHA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let config = kubeha_e2e::chaos::Config {
        injections: 40,
        seed,
        nodes: 5,
        services: 10,
        checkpoint_every: 4,
        kinds: kubeha_e2e::chaos::Kind::ALL.to_vec(),
    };
    let report = kubeha_e2e::chaos::run(&Lab::new(root), &config)?;
    print_chaos(&report, config.nodes, config.services);
    if report.injections != config.injections
        || report.safety_samples == 0
        || report.master_polls == 0
    {
        bail!("the chaos run did not run as configured (seed {seed})");
    }
    for v in &report.liveness_violations {
        println!("  late (not gated): {v}");
    }
    if !report.safety_violations.is_empty()
        || !report.spurious_moves.is_empty()
        || !report.stuck.is_empty()
    {
        println!("\ninjection log (replay with cargo xtask chaos --injections 40 --seed {seed}):");
        for line in &report.log {
            println!("  {line}");
        }
        for v in &report.stuck {
            println!("  still down a minute later: {v}");
        }
        bail!(
            "chaos found safety violations, spurious moves or services down for good (seed {seed})"
        );
    }
    Ok(())
}

/// `cargo xtask hostile`: the catalogue's lab test with its report in
/// `json` (else in target/hostile.json), then the figures from it.
fn hostile(root: &Path, json: Option<PathBuf>, filter: Option<String>) -> anyhow::Result<()> {
    build_binaries(root, Profile::Debug)?;
    let cwd = std::env::current_dir()?;
    let report = cwd.join(json.unwrap_or_else(|| root.join("target").join("hostile.json")));
    let _ = std::fs::remove_file(&report);
    let status = Command::new(env!("CARGO"))
        .args([
            "test",
            "--locked",
            "-p",
            "kubeha-e2e",
            "--test",
            "hostile",
            "--",
            "--nocapture",
        ])
        .env("KUBEHA_HOSTILE_JSON", &report)
        .env("KUBEHA_HOSTILE_FILTER", filter.unwrap_or_default())
        .current_dir(root)
        .status()
        .context("running cargo test --test hostile")?;
    let figures = std::fs::read_to_string(&report)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    match &figures {
        Some(r) => println!(
            "\nhostile: {} cases, {} passed, {} failed; report in {}",
            r["cases"],
            r["passed"],
            r["failed"],
            report.display()
        ),
        None => println!("\nhostile: no report written (the run stopped before its end)"),
    }
    if !status.success() {
        bail!("hostile cases failed (or the run did not complete)");
    }
    Ok(())
}

fn test(root: &Path, keep_lab: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    build_binaries(root, Profile::Debug)?;
    // The tests start from a clean lab: one left up by the demo (its service
    // holds the example VIP), by `--keep-lab` or by a killed run would leak
    // into them.
    Lab::new(root).down()?;
    // The lab's Go binaries before any test: their build (the first time,
    // or after a recipe change) shows here rather than inside one test's
    // captured output, and tests that only run a binary (helm) find it.
    let started = std::time::Instant::now();
    let bins = kubeha_e2e::deps::Binaries::ensure()?;
    println!(
        "lab binaries ready in {:.0} s: {}, {}, {}, {}",
        started.elapsed().as_secs_f64(),
        bins.etcd.display(),
        bins.kube_apiserver.display(),
        bins.kubectl.display(),
        bins.helm.display()
    );
    // The kubelet lab's (kubelet, kube-proxy, kube-scheduler,
    // kube-controller-manager), for the kubelet and install tests.
    let started = std::time::Instant::now();
    let node_bins = kubeha_e2e::deps::NodeBinaries::ensure()?;
    println!(
        "kubelet lab binaries ready in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        node_bins.kubelet.display()
    );
    // cargo test's own closing line belongs to the last crate's doc-tests;
    // read every `test result:` line and close with the workspace total.
    let mut child = Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--locked", "--color=never"])
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        std::io::stdout().flush()?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
            ignored += count("ignored");
        }
    }
    let status = child.wait()?;
    // After the lab tests (it adds nodes 4 and 5, which the three-node
    // tests would see).
    let chaos = if status.success() {
        ci_chaos(root)
    } else {
        Ok(())
    };
    if !keep_lab {
        Lab::new(root).down()?;
    }
    println!("\nworkspace: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    chaos
}
