//! The lab: a real etcd and kube-apiserver started as processes, with RBAC, a
//! client-certificate admin and service-account signing keys; the generated
//! CRDs installed; the admin kubeconfig in `.lab/kubeconfig` and the lab's
//! kubectl and helm linked into `.lab/bin/`.
//!
//! The API server listens on the host's address on the lab's network segment
//! ([`crate::nodes`]), so the nodes' namespaces reach it. With nodes, the lab
//! also registers a Node object per node, applies the chart's RBAC, gives
//! each node a service-account token of its own in
//! `.lab/nodes/node-i/kubeconfig`, and starts and stops that node's agent
//! inside its namespace.
//!
//! Every control-plane process the lab starts carries the lab folder's path
//! on its command line, and everything that runs on a node runs inside a
//! `kubeha-` namespace, so `down` finds and stops them even after a killed run.

mod agents;
mod cgroups;
mod control_plane;
mod kubectl;
mod kubelet;
mod operator;
mod pki;
mod power;
mod registration;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::deps::Binaries;
use crate::nodes::{self, HOST_IP, Segment};
use cgroups::remove_hook_cgroups;
use control_plane::ports_free;

pub use control_plane::http_get;
pub use kubelet::{PAUSE_IMAGE, SERVICE_CIDR};

/// Port of the lab's etcd client endpoint (loopback only).
pub const ETCD_CLIENT_PORT: u16 = 23790;
/// Port of the lab's etcd peer endpoint (loopback only).
pub const ETCD_PEER_PORT: u16 = 23800;
/// Secure port of the lab's kube-apiserver.
pub const APISERVER_PORT: u16 = 16443;

/// Namespace of the chart's service accounts (and the agents' Leases).
pub const SYSTEM_NAMESPACE: &str = "kubeha-system";
/// The agents' service account, as the chart renders it for release `kubeha`.
pub const AGENT_SERVICE_ACCOUNT: &str = "kubeha-agent";
/// Service account of the operator in the chart's RBAC.
pub const OPERATOR_SERVICE_ACCOUNT: &str = "kubeha-operator";
/// Label on every Node object the lab registers (`kubeha.io/lab=true`).
pub const NODE_LABEL: &str = "kubeha.io/lab";
/// How long each node's service-account token lasts.
pub const NODE_TOKEN_DURATION: &str = "48h";

/// The ports the lab listens on: the constants above, unless overridden with
/// `KUBEHA_LAB_ETCD_CLIENT_PORT`, `KUBEHA_LAB_ETCD_PEER_PORT` or
/// `KUBEHA_LAB_APISERVER_PORT` (to run two labs side by side; every command
/// touching the lab must then see the same overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// etcd client endpoint, on 127.0.0.1.
    pub etcd_client: u16,
    /// etcd peer endpoint, on 127.0.0.1.
    pub etcd_peer: u16,
    /// kube-apiserver's secure port, on [`HOST_IP`].
    pub apiserver: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            etcd_client: ETCD_CLIENT_PORT,
            etcd_peer: ETCD_PEER_PORT,
            apiserver: APISERVER_PORT,
        }
    }
}

impl Ports {
    /// The defaults with the environment's overrides; fails on a value that
    /// is not a port number.
    pub fn from_env() -> anyhow::Result<Self> {
        let get = |var: &str, default: u16| -> anyhow::Result<u16> {
            match std::env::var_os(var) {
                None => Ok(default),
                Some(v) => v
                    .to_str()
                    .and_then(|v| v.trim().parse::<u16>().ok())
                    .filter(|p| *p != 0)
                    .with_context(|| format!("{var}={v:?} is not a port number (1-65535)")),
            }
        };
        Ok(Self {
            etcd_client: get("KUBEHA_LAB_ETCD_CLIENT_PORT", ETCD_CLIENT_PORT)?,
            etcd_peer: get("KUBEHA_LAB_ETCD_PEER_PORT", ETCD_PEER_PORT)?,
            apiserver: get("KUBEHA_LAB_APISERVER_PORT", APISERVER_PORT)?,
        })
    }

    /// The API server's URL, as the admin and every node reach it.
    pub fn apiserver_url(&self) -> String {
        format!("https://{HOST_IP}:{}", self.apiserver)
    }
}

/// How [`Lab::stop_agent`] stops an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: the agent may shut down in order.
    Term,
    /// SIGKILL: the agent dies at once, as in a crash.
    Kill,
}

/// The cargo profile whose workspace binaries (agent, operator, `kubectl
/// ha`) the lab runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Profile {
    /// `target/debug`, as `cargo build` leaves them (tests, demo, chaos).
    #[default]
    Debug,
    /// `target/release`, as `cargo build --release` leaves them (benchmarks).
    Release,
}

impl Profile {
    /// The profile's folder under the target folder, which is also its name.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }

    /// The `cargo build` flags that build this profile.
    pub fn cargo_flags(self) -> &'static [&'static str] {
        match self {
            Profile::Debug => &[],
            Profile::Release => &["--release"],
        }
    }
}

/// A lab rooted in a repository checkout (its files live in `<root>/.lab`).
#[derive(Debug, Clone)]
pub struct Lab {
    root: PathBuf,
    dir: PathBuf,
    profile: Profile,
}

impl Lab {
    /// The lab of the repository at `root`, running the debug binaries.
    pub fn new(root: &Path) -> Self {
        keep_inherited_fds_from_children();
        Self {
            root: root.to_path_buf(),
            dir: root.join(".lab"),
            profile: Profile::Debug,
        }
    }

    /// This lab running the workspace binaries of `profile` (an override
    /// variable such as `KUBEHA_AGENT_BIN` still wins).
    pub fn with_profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// The profile whose workspace binaries this lab runs.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The lab of this checkout (for tests: the repository holding this crate).
    pub fn of_this_checkout() -> Self {
        Self::new(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("e2e/ sits in the repo root"),
        )
    }

    /// Where binary `name` of the workspace is: [`binary_from`] with this
    /// checkout's root, the lab's profile and the environment's `env_var`
    /// and `CARGO_TARGET_DIR`.
    fn workspace_binary(&self, name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
        binary_from(
            name,
            env_var,
            &self.root,
            self.profile,
            std::env::var_os(env_var),
            std::env::var_os("CARGO_TARGET_DIR"),
        )
    }

    /// The lab's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// What a user exports to use the lab from a shell, and how to look at
    /// its first `nodes` nodes.
    pub fn usage(&self, nodes: u8) -> String {
        let ports = Ports::from_env().unwrap_or_default();
        let mut s = format!(
            "lab is up: kube-apiserver {url}\n\
             export KUBECONFIG={kc} KUBECACHEDIR={cache} PATH={bin}:$PATH\n\
             kubectl get haclusters,haservices -A\n",
            url = ports.apiserver_url(),
            kc = self.kubeconfig().display(),
            cache = self.kube_cache_dir().display(),
            bin = self.dir.join("bin").display()
        );
        if nodes > 0 {
            let last = nodes::node_ip(nodes)
                .map(|ip| ip.to_string())
                .unwrap_or_default();
            let _ = write!(
                s,
                "{nodes} node(s) on bridge {br}: node-1..node-{nodes} = {first}..{last} \
                 (2001:db8::b..), client {client}\n\
                 kubectl get nodes -o wide\n\
                 ip netns exec {cl} ping -c1 {first}\n\
                 ip netns exec {cl} ping -6 -c1 2001:db8::b\n\
                 ip netns exec {n1} env KUBECONFIG={nkc} kubectl auth can-i create leases -n {SYSTEM_NAMESPACE}\n",
                br = nodes::BRIDGE,
                first = nodes::node_ip(1)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                client = nodes::client_ip(),
                cl = nodes::CLIENT_NS,
                n1 = nodes::node_ns(1),
                nkc = self.node_kubeconfig(1).display(),
            );
            let logs = self.dir.join("logs");
            if self.has_kubelet(1) {
                let _ = write!(
                    s,
                    "kubelet nodes: containerd, kubelet and kube-proxy in each node namespace \
                     (logs in {logs}/node-N-*.log); no agent processes: install the chart to run \
                     the agents as pods\n\
                     kubectl get nodes -o wide; kubectl get pods -A -o wide\n\
                     ctr --address {ctr} -n k8s.io images ls -q\n",
                    logs = logs.display(),
                    ctr = self.containerd_socket(1).display(),
                );
            } else {
                let _ = writeln!(
                    s,
                    "kubeha-agent runs in each node namespace (logs in {}, \
                     node-local status in .lab/nodes/node-N/run/status.json)",
                    logs.display()
                );
            }
        }
        s.push_str("cargo xtask lab status; cargo xtask lab down");
        s
    }

    /// `up`, serialised on a lock file so many tests may call it at once; the
    /// first starts the lab, the others reuse it.
    pub fn ensure_up(&self) -> anyhow::Result<()> {
        self.ensure_up_with_nodes(0)
    }

    /// [`Lab::up_with_nodes`], serialised on the same lock file as
    /// [`Lab::ensure_up`].
    pub fn ensure_up_with_nodes(&self, nodes: u8) -> anyhow::Result<()> {
        // Before the lock file: without root it could not even be created,
        // and the message would hide what is missing.
        nodes::check_lab_prerequisites()?;
        let lock = File::create(self.root.join(".lab.lock")).context("creating .lab.lock")?;
        lock.lock().context("locking .lab.lock")?;
        self.up_with_nodes(nodes)
    }

    /// The control plane without nodes: [`Lab::up_with_nodes`] with 0.
    pub fn up(&self) -> anyhow::Result<()> {
        self.up_with_nodes(0)
    }

    /// Builds what is missing, brings up the network segment (bridge, client
    /// namespace, `nodes` node namespaces), starts etcd and kube-apiserver,
    /// waits for readiness, installs the CRDs and, with nodes, registers them
    /// (Node objects, the chart's RBAC, one token per node). Idempotent: a
    /// running lab is reused; nodes are only ever added, never removed.
    pub fn up_with_nodes(&self, nodes: u8) -> anyhow::Result<()> {
        nodes::check_lab_prerequisites()?;
        if nodes > nodes::MAX_NODES {
            bail!(
                "the lab holds at most {} nodes, not {nodes}",
                nodes::MAX_NODES
            );
        }
        let ports = Ports::from_env()?;
        let bins = Binaries::ensure()?;
        for sub in ["pki", "logs", "pids", "bin"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        link(&bins.kubectl, &self.dir.join("bin/kubectl"))?;
        link(&bins.helm, &self.dir.join("bin/helm"))?;
        // The plugin, when built: `kubectl ha ...` works with the PATH above.
        if let Ok(plugin) = self.kubectl_ha_binary() {
            link(&plugin, &self.dir.join("bin/kubectl-ha"))?;
        }
        // The API server binds the host's address on the bridge.
        Segment::up(nodes)?;
        let fresh = !self.control_plane_current(&ports);
        if fresh {
            // Leftovers of a killed run would hold the ports.
            self.stop_processes();
            ports_free(&ports)?;
            self.write_pki()?;
            self.write_kubeconfig(&ports)?;
            self.start_etcd(&bins, &ports)?;
            self.start_apiserver(&bins, &ports)?;
            self.wait_ready(Duration::from_secs(90))?;
        }
        self.install_crds(fresh)?;
        if nodes > 0 {
            self.register_nodes(nodes, &bins, &ports)?;
        }
        Ok(())
    }

    /// Whether the running control plane is this lab's and up to date: the
    /// admin kubeconfig names the URL these ports give, and it answers.
    fn control_plane_current(&self, ports: &Ports) -> bool {
        let wanted = format!("server: {}\n", ports.apiserver_url());
        fs::read_to_string(self.kubeconfig()).is_ok_and(|k| k.contains(&wanted))
            && self.apiserver_ready()
    }

    /// Stops every agent and lab process, removes the network segment (by
    /// name prefix, also a killed run's leftovers) and the lab's files.
    pub fn down(&self) -> anyhow::Result<()> {
        // The kubelet lab's nodes first, at once: a kubelet left running
        // would restart the pods being stopped.
        let killed = self.kill_kubelet_nodes();
        // Node namespaces next: their processes (agents, hooks) may still
        // talk to the API server while they shut down.
        let segment = Segment::down();
        let stopped = self.stop_processes();
        remove_hook_cgroups();
        // Only now, with every process gone: the mounts the kubelets and
        // containerd left under the lab folder, and the kubelets' cgroups.
        let (mounts, cgroups) = self.remove_kubelet_leftovers();
        let left = kubelet::mounts_under(&self.dir);
        if !left.is_empty() {
            bail!(
                "lab down: mounts under {} would not go: {left:?}",
                self.dir.display()
            );
        }
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing {}", self.dir.display()))?;
        }
        let _ = fs::remove_file(self.root.join(".lab.lock"));
        let segment = segment.context("tearing down the lab's network segment")?;
        if killed + mounts + cgroups > 0 {
            println!(
                "lab down: killed {killed} kubelet-node process(es) and pod(s), removed {mounts} mount(s) \
                 and {cgroups} cgroup(s)"
            );
        }
        println!(
            "lab down: stopped {stopped} control-plane process(es) and {} in node namespaces, \
             removed namespaces [{}], links [{}] and {}",
            segment.processes,
            segment.namespaces.join(" "),
            segment.links.join(" "),
            self.dir.display()
        );
        Ok(())
    }

    /// A few lines on what runs.
    pub fn status(&self) -> String {
        let mut s = String::new();
        let pids = self.lab_processes();
        let _ = writeln!(
            s,
            "lab folder: {} ({})",
            self.dir.display(),
            if self.dir.exists() {
                "present"
            } else {
                "absent"
            }
        );
        let _ = writeln!(s, "processes: {}", pids.len());
        for (pid, cmd) in &pids {
            let _ = writeln!(s, "  {pid} {}", cmd.chars().take(100).collect::<String>());
        }
        let ready = self.apiserver_ready();
        let _ = writeln!(
            s,
            "kube-apiserver: {}",
            if ready { "ready" } else { "not ready" }
        );
        if ready && let Ok(out) = self.kubectl_ok(&["get", "crd", "-o", "name"]) {
            let _ = writeln!(
                s,
                "CRDs: {}",
                out.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
        let namespaces = nodes::lab_namespaces();
        let _ = writeln!(s, "namespaces: {}", none_if_empty(&namespaces));
        let _ = writeln!(s, "links: {}", none_if_empty(&nodes::lab_links()));
        let mut agents = Vec::new();
        for ns in &namespaces {
            let Some(i) = ns
                .strip_prefix(nodes::NS_PREFIX)
                .and_then(|n| n.strip_prefix("node-"))
                .and_then(|n| n.parse::<u8>().ok())
            else {
                continue;
            };
            agents.push(
                match self.agent_pid(i).filter(|p| nodes::pid_in_ns(*p, ns)) {
                    Some(pid) => format!("{} running (pid {pid})", nodes::node_name(i)),
                    None => format!("{} not running", nodes::node_name(i)),
                },
            );
        }
        let _ = writeln!(s, "agents: {}", none_if_empty(&agents));
        let kubelets: Vec<String> = (1..=nodes::MAX_NODES)
            .filter(|i| self.has_kubelet(*i))
            .map(|i| {
                let state = if self.kubelet_running(i) {
                    "running"
                } else {
                    "not running"
                };
                format!("{} {state}", nodes::node_name(i))
            })
            .collect();
        if !kubelets.is_empty() {
            let _ = writeln!(s, "kubelets: {}", kubelets.join(", "));
        }
        s
    }

    /// Processes whose command line names the lab folder: (pid, command line).
    fn lab_processes(&self) -> Vec<(i32, String)> {
        let marker = self.dir.display().to_string();
        let me = std::process::id() as i32;
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid != me)
            .filter_map(|pid| {
                let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                cmd.contains(&marker).then_some((pid, cmd))
            })
            .collect()
    }

    /// SIGTERM, then SIGKILL after a grace period, to every lab process.
    /// Returns how many there were.
    fn stop_processes(&self) -> usize {
        let pids: Vec<i32> = self.lab_processes().into_iter().map(|(p, _)| p).collect();
        nodes::stop_pids(&pids, Duration::from_secs(10))
    }
}

/// Runs `cmd` with stdin closed and its output collected, killing it after
/// `limit`; its output (a killed command's status is not success).
pub fn output_within(cmd: &mut std::process::Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return std::process::Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
                stdout: Vec::new(),
                stderr: format!("cannot run {:?}: {e}", cmd.get_program()).into_bytes(),
            };
        }
    };
    let deadline = std::time::Instant::now() + limit;
    while matches!(child.try_wait(), Ok(None)) {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| std::process::Output {
            status: std::os::unix::process::ExitStatusExt::from_raw(127 << 8),
            stdout: Vec::new(),
            stderr: e.to_string().into_bytes(),
        })
}

/// Retries `check` every half second until it gives `Some`; panics naming
/// `what` once `limit` has passed (for tests).
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Installs Debian `packages` with `apt-get install -y` (after an
/// `apt-get update` if the first try fails); `purpose` names who needs them
/// in the messages.
pub fn apt_install(packages: &[&str], purpose: &str) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        eprintln!("{purpose} needs: apt-get {}", args.join(" "));
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = [&["install", "-y"], packages].concat();
    if !(apt(&install) || (apt(&["update"]) && apt(&install))) {
        bail!(
            "{purpose} needs {} and `apt-get install -y {}` failed; install them by hand",
            packages.join(", "),
            packages.join(" ")
        );
    }
    Ok(())
}

/// SIGSTOP (`frozen`) or SIGCONT to `pid`.
pub(super) fn freeze_pid(pid: i32, frozen: bool) {
    let sig = if frozen {
        nix::sys::signal::Signal::SIGSTOP
    } else {
        nix::sys::signal::Signal::SIGCONT
    };
    nodes::signal_pids(&[pid], sig);
}

/// Records the pid of `child` in `pid_file` and reaps it whenever it exits,
/// so it never lingers as a zombie of ours; its pid.
fn record_and_reap(mut child: Child, pid_file: &Path) -> anyhow::Result<i32> {
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    fs::write(pid_file, pid.to_string())?;
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

fn read_pid(file: &Path) -> Option<i32> {
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn none_if_empty(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn tail(file: &Path, n: usize) -> String {
    let text = fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Lab {
    /// A kubeconfig for this lab's API server at `url` (its CA, namespace
    /// [`SYSTEM_NAMESPACE`]) that authenticates as `user` with `token`.
    fn token_kubeconfig(&self, url: &str, user: &str, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
             users:\n- name: {user}\n  user:\n    token: {token}\n\
             contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: {user}\n    namespace: {SYSTEM_NAMESPACE}\n\
             current-context: kubeha-lab\n",
            ca = self.pki("ca.crt").display(),
        )
    }
}

/// Writes `contents` readable by the owner only, replacing `path` atomically.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Where binary `name` of the workspace is, given its override variable
/// `env_var` (its value `bin`), the profile built and `$CARGO_TARGET_DIR`;
/// fails, saying how to build it, when it is missing.
fn binary_from(
    name: &str,
    env_var: &str,
    root: &Path,
    profile: Profile,
    bin: Option<OsString>,
    target_dir: Option<OsString>,
) -> anyhow::Result<PathBuf> {
    let (path, from) = match (bin, target_dir) {
        (Some(bin), _) => (PathBuf::from(bin), format!("from {env_var}")),
        (None, Some(target)) => (
            root.join(target).join(profile.dir()).join(name),
            "under CARGO_TARGET_DIR".to_owned(),
        ),
        (None, None) => (
            root.join("target").join(profile.dir()).join(name),
            "the default".to_owned(),
        ),
    };
    if !path.is_file() {
        let flags: String = profile
            .cargo_flags()
            .iter()
            .map(|f| format!("{f} "))
            .collect();
        bail!(
            "the {name} binary is missing: no file {} ({from}); build it with \
             `cargo build {flags}-p {name}`, or set {env_var} to its path",
            path.display()
        );
    }
    Ok(path)
}

fn link(target: &Path, link: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("lab paths are UTF-8")
}

/// Marks every file descriptor this process inherited (beyond stdin,
/// stdout and stderr) close-on-exec, once: the lab's daemons (etcd, the API
/// server, agents) outlive the test or command that started them, and one
/// that inherited, say, the lock of a `flock` wrapped around that command
/// would hold it for as long as the lab runs.
#[allow(unsafe_code)]
fn keep_inherited_fds_from_children() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            return;
        };
        let fds: Vec<i32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|fd| *fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: F_GETFD/F_SETFD only change the descriptor's flags; a
            // descriptor closed meanwhile (the directory's own) fails
            // harmlessly with EBADF.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_agent_binary_says_how_to_build_it() {
        let root = Path::new("/nonexistent-kubeha-repo");
        let find = |profile, bin: Option<&str>, target: Option<&str>| {
            binary_from(
                "kubeha-agent",
                "KUBEHA_AGENT_BIN",
                root,
                profile,
                bin.map(Into::into),
                target.map(Into::into),
            )
        };
        let err = find(Profile::Debug, None, None).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent-kubeha-repo/target/debug/kubeha-agent"),
            "{err}"
        );
        assert!(err.contains("cargo build -p kubeha-agent"), "{err}");
        let err = find(Profile::Debug, Some("/nope/agent"), Some("/t"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nope/agent (from KUBEHA_AGENT_BIN)"), "{err}");
        let err = find(Profile::Debug, None, Some("/t"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/t/debug/kubeha-agent (under CARGO_TARGET_DIR)"),
            "{err}"
        );
        let err = find(Profile::Release, None, None).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent-kubeha-repo/target/release/kubeha-agent"),
            "{err}"
        );
        assert!(
            err.contains("cargo build --release -p kubeha-agent"),
            "{err}"
        );
        let found = find(Profile::Debug, Some("/bin/sh"), None).unwrap();
        assert_eq!(found, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn ports_default_to_the_constants() {
        let p = Ports::default();
        assert_eq!(
            (p.etcd_client, p.etcd_peer, p.apiserver),
            (23790, 23800, 16443)
        );
        assert_eq!(p.apiserver_url(), "https://198.18.0.1:16443");
    }
}
