//! kubeha as pods: the images `cargo xtask images` builds, imported into the
//! kubelet lab, and the chart installed there with `helm install`, so the
//! operator Deployment and the agent DaemonSet run as real pods with the
//! chart's RBAC. Used by `cargo xtask demo` (when the machine fits) and by
//! the install lab test.
//!
//! The lab's nodes share this machine's files, so the release sets
//! `agent.perNodePaths` (node-i's agent uses `<dir>/node-i` for its hooks,
//! logs, state and hook cgroup), `agent.hooks.hostPid` to the lab's host
//! anchor (PID 1's namespaces are not readable here) and the hook cgroup
//! under this machine's cgroup v2 mount.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::lab::{Lab, StopSignal};
use crate::nodes;

/// The helm release.
pub const RELEASE: &str = "kubeha";
/// The release's namespace.
pub const SYSTEM: &str = "kubeha-system";
/// The hook cgroup's name under this machine's cgroup v2 mount: it starts
/// with the kubelet lab's cgroup prefix, so `lab down` removes it.
const HOOK_CGROUP: &str = "kubeha-lab-node-hooks";

/// One pod of the release: name, node, phase, ready.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Node it runs on.
    pub node: String,
    /// Its phase.
    pub phase: String,
    /// Whether its Ready condition is true.
    pub ready: bool,
}

/// Where the release's agents keep their files: the hook root holds one
/// folder per node (`<hooks>/node-i/<hostPath>`).
#[derive(Debug, Clone)]
pub struct Installed {
    /// The hook root (`agent.hookRoot`).
    pub hooks: PathBuf,
    /// The process whose namespaces the hooks enter (`agent.hooks.hostPid`).
    pub host_pid: i32,
    /// Seconds it took, from nothing to every pod ready (images included).
    pub took: Duration,
}

/// Why this machine cannot run kubeha as pods in the lab, if it cannot: the
/// kubelet lab needs about 250 MB per node and the hook cgroup needs cgroup
/// v2 (else a service a hook starts dies with the agent's pod).
pub fn unfit(nodes: u8) -> Option<String> {
    if hook_cgroup().is_none() {
        return Some("no cgroup v2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified".into());
    }
    let available_kib = fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?;
    let needed_kib = (u64::from(nodes) * 250 + 1024) * 1024;
    (available_kib < needed_kib).then(|| {
        format!(
            "{} MiB of memory available, {} MiB needed",
            available_kib / 1024,
            needed_kib / 1024
        )
    })
}

/// `agent.hooks.cgroup` for this machine: under `/sys/fs/cgroup` when it
/// is cgroup v2, under `unified/` on a hybrid host.
fn hook_cgroup() -> Option<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let cgroup2_at = |point: &str| {
        mountinfo.lines().any(|l| {
            l.split_once(" - ").is_some_and(|(left, right)| {
                right.starts_with("cgroup2 ") && left.split(' ').nth(4) == Some(point)
            })
        })
    };
    if cgroup2_at("/sys/fs/cgroup") {
        Some(HOOK_CGROUP.to_owned())
    } else if cgroup2_at("/sys/fs/cgroup/unified") {
        Some(format!("unified/{HOOK_CGROUP}"))
    } else {
        None
    }
}

/// The release's pods of `component` (`operator` or `agent`), not being
/// deleted, sorted.
pub fn pods(lab: &Lab, component: &str) -> Vec<Pod> {
    let list = lab
        .kubectl_json(&[
            "get",
            "pods",
            "-n",
            SYSTEM,
            "-l",
            &format!("app.kubernetes.io/component={component}"),
        ])
        .unwrap_or_default();
    let mut pods: Vec<Pod> = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            Pod {
                name: s(&p["metadata"]["name"]),
                node: s(&p["spec"]["nodeName"]),
                phase: s(&p["status"]["phase"]),
                ready: p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                }),
            }
        })
        .collect();
    pods.sort();
    pods
}

/// Whether `want` pods of `component` run and are ready, on `spread`
/// distinct nodes when given.
pub fn all_ready(lab: &Lab, component: &str, want: usize, spread: Option<usize>) -> bool {
    let pods = pods(lab, component);
    let on: std::collections::BTreeSet<_> = pods.iter().map(|p| p.node.as_str()).collect();
    pods.len() == want
        && pods.iter().all(|p| p.phase == "Running" && p.ready)
        && spread.is_none_or(|n| on.len() == n)
}

/// Builds the images (release builds), brings the kubelet lab up with
/// `nodes` nodes (stopping the lab's host-process agents and operators:
/// the pods replace them), imports the images, and installs the chart
/// with `extra` `--set` values on top of the lab's; returns once both
/// operator replicas and one agent per node are ready. `hooks` is the hook
/// root the agents get; put node-i's scripts under `<hooks>/node-i/`.
pub fn install(lab: &Lab, nodes: u8, hooks: &Path, extra: &[&str]) -> anyhow::Result<Installed> {
    let started = Instant::now();
    let Some(cgroup) = hook_cgroup() else {
        bail!("kubeha as pods needs a cgroup v2 mount for the hook cgroup");
    };
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| lab.root().join(t))
        .unwrap_or_else(|| lab.root().join("target"));
    for built in crate::images::build(lab.root(), &target.join("images"))? {
        println!(
            "image {} {} ({} bytes)",
            built.reference, built.digest, built.bytes
        );
    }
    if lab.dir().exists() {
        for i in 1..=nodes::MAX_NODES {
            lab.stop_agent(i, StopSignal::Term)?;
        }
        for r in 0..=1 {
            lab.stop_operator(r, StopSignal::Term)?;
        }
    }
    lab.ensure_up_with_kubelets(nodes)?;
    lab.import_built_images()?;
    let host_pid = lab.host_anchor()?;
    let files = lab.dir().join("pods");
    fs::create_dir_all(hooks)?;
    let mut set = vec![
        "image.pullPolicy=Never".to_owned(),
        // The lab installed the CRDs.
        "crds.install=false".to_owned(),
        format!("agent.hookRoot={}", hooks.display()),
        format!("agent.logDir={}", files.join("logs").display()),
        format!("agent.stateDir={}", files.join("state").display()),
        "agent.perNodePaths=true".to_owned(),
        format!("agent.hooks.hostPid={host_pid}"),
        format!("agent.hooks.cgroup={cgroup}"),
    ];
    set.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut args = vec![
        "upgrade",
        "--install",
        RELEASE,
        "charts/kubeha",
        "-n",
        SYSTEM,
        "--create-namespace",
        // The lab applied the chart's RBAC for its host-process agents;
        // the release takes those objects over.
        "--take-ownership",
    ];
    for s in &set {
        args.extend(["--set", s]);
    }
    lab.helm_ok(&args)?;
    let deadline = Instant::now() + Duration::from_secs(240);
    while !(all_ready(lab, "operator", 2, None)
        && all_ready(lab, "agent", nodes.into(), Some(nodes.into())))
    {
        if Instant::now() > deadline {
            // A taint (disk pressure, say) keeps the operator pods Pending.
            bail!(
                "the release's pods are not all ready after 240 s:\n{}\nnode taints:\n{}",
                lab.kubectl_ok(&["get", "pods", "-n", SYSTEM, "-o", "wide"])
                    .unwrap_or_default(),
                lab.kubectl_ok(&[
                    "get",
                    "nodes",
                    "-o",
                    "custom-columns=NODE:.metadata.name,TAINTS:.spec.taints[*].key"
                ])
                .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(Installed {
        hooks: hooks.to_owned(),
        host_pid,
        took: started.elapsed(),
    })
}
