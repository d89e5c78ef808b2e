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

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::deps::Binaries;
use crate::nodes::{self, HOST_IP, Segment};

/// Port of the lab's etcd client endpoint (loopback only).
pub const ETCD_CLIENT_PORT: u16 = 23790;
/// Port of the lab's etcd peer endpoint (loopback only).
pub const ETCD_PEER_PORT: u16 = 23800;
/// Secure port of the lab's kube-apiserver.
pub const APISERVER_PORT: u16 = 16443;

const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Namespace of the chart's service accounts (and the agents' Leases).
pub const SYSTEM_NAMESPACE: &str = "kubeha-system";
/// The agents' service account, as the chart renders it for release `kubeha`.
pub const AGENT_SERVICE_ACCOUNT: &str = "kubeha-agent";
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

/// A lab rooted in a repository checkout (its files live in `<root>/.lab`).
#[derive(Debug, Clone)]
pub struct Lab {
    root: PathBuf,
    dir: PathBuf,
}

impl Lab {
    /// The lab of the repository at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            dir: root.join(".lab"),
        }
    }

    /// The lab of this checkout (for tests: the repository holding this crate).
    pub fn of_this_checkout() -> Self {
        Self::new(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("e2e/ sits in the repo root"),
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

    /// A `kubectl` command (the lab's own build) pointed at the lab.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(Binaries::cached().kubectl);
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("KUBECACHEDIR", self.kube_cache_dir())
            .current_dir(&self.root);
        cmd
    }

    /// kubectl's discovery and HTTP cache for this lab, `.lab/kube-cache`.
    /// It goes with the lab: the shared `~/.kube/cache` keeps what an
    /// earlier lab at the same address served, and `kubectl explain` was
    /// seen to fail on a fresh lab because of it.
    pub fn kube_cache_dir(&self) -> PathBuf {
        self.dir.join("kube-cache")
    }

    /// Runs kubectl with `args` and returns its output, whatever its exit code.
    pub fn kubectl_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.kubectl()
            .args(args)
            .output()
            .context("running the lab's kubectl")
    }

    /// Runs kubectl with `args`, fails with its stderr unless it succeeds,
    /// and returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl_output(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
                 ip netns exec {n1} env KUBECONFIG={nkc} kubectl auth can-i create leases -n {SYSTEM_NAMESPACE}\n\
                 kubeha-agent runs in each node namespace (logs in {logs}, \
                 node-local status in .lab/nodes/node-N/run/status.json)\n",
                br = nodes::BRIDGE,
                first = nodes::node_ip(1)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default(),
                client = nodes::client_ip(),
                cl = nodes::CLIENT_NS,
                n1 = nodes::node_ns(1),
                nkc = self.node_kubeconfig(1).display(),
                logs = self.dir.join("logs").display(),
            );
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
        // Node namespaces first: their processes (agents, hooks) may still
        // talk to the API server while they shut down.
        let segment = Segment::down();
        let stopped = self.stop_processes();
        remove_hook_cgroups();
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing {}", self.dir.display()))?;
        }
        let _ = fs::remove_file(self.root.join(".lab.lock"));
        let segment = segment.context("tearing down the lab's network segment")?;
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
        s
    }

    fn pki(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(name)
    }

    fn write_pki(&self) -> anyhow::Result<()> {
        let fresh = !self.pki("admin.crt").exists();
        if fresh {
            self.write_ca_and_admin()?;
        }
        // A lab folder from before the segment has a certificate without the
        // bridge address: sign a new one.
        let san = format!("IP:{HOST_IP},");
        let current = fs::read_to_string(self.pki("apiserver.ext")).is_ok_and(|e| e.contains(&san));
        if fresh || !current {
            self.sign(
                "apiserver",
                "/CN=kube-apiserver",
                &format!(
                    "subjectAltName={san}IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
                ),
            )?;
        }
        Ok(())
    }

    fn write_ca_and_admin(&self) -> anyhow::Result<()> {
        let ca_key = self.pki("ca.key");
        let ca_crt = self.pki("ca.crt");
        openssl(&["genrsa", "-out", s(&ca_key), "2048"])?;
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            s(&ca_key),
            "-out",
            s(&ca_crt),
            "-days",
            "365",
            "-subj",
            "/CN=kubeha-lab-ca",
        ])?;
        self.sign(
            "admin",
            "/O=system:masters/CN=kubeha-lab-admin",
            "extendedKeyUsage=clientAuth\n",
        )?;
        openssl(&["genrsa", "-out", s(&self.pki("sa.key")), "2048"])?;
        openssl(&[
            "rsa",
            "-in",
            s(&self.pki("sa.key")),
            "-pubout",
            "-out",
            s(&self.pki("sa.pub")),
        ])?;
        Ok(())
    }

    /// A key and a certificate signed by the lab CA.
    fn sign(&self, name: &str, subject: &str, extensions: &str) -> anyhow::Result<()> {
        let key = self.pki(&format!("{name}.key"));
        let csr = self.pki(&format!("{name}.csr"));
        let crt = self.pki(&format!("{name}.crt"));
        let ext = self.pki(&format!("{name}.ext"));
        fs::write(&ext, extensions)?;
        openssl(&["genrsa", "-out", s(&key), "2048"])?;
        openssl(&[
            "req",
            "-new",
            "-key",
            s(&key),
            "-out",
            s(&csr),
            "-subj",
            subject,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&self.pki("ca.crt")),
            "-CAkey",
            s(&self.pki("ca.key")),
            "-CAcreateserial",
            "-out",
            s(&crt),
            "-days",
            "365",
            "-extfile",
            s(&ext),
        ])?;
        Ok(())
    }

    fn write_kubeconfig(&self, ports: &Ports) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
             users:\n- name: kubeha-lab-admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
             contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: kubeha-lab-admin\ncurrent-context: kubeha-lab\n",
            url = ports.apiserver_url(),
            ca = self.pki("ca.crt").display(),
            crt = self.pki("admin.crt").display(),
            key = self.pki("admin.key").display(),
        );
        fs::write(self.kubeconfig(), config)?;
        Ok(())
    }

    fn start_etcd(&self, bins: &Binaries, ports: &Ports) -> anyhow::Result<()> {
        // Loopback only: the nodes' namespaces must reach the API server, never etcd.
        let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
        let client = format!("http://127.0.0.1:{}", ports.etcd_client);
        let mut cmd = Command::new(&bins.etcd);
        cmd.arg("--name=kubeha-lab")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=kubeha-lab={peer}"))
            // A throwaway test store: fsync buys nothing here and costs latency.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        self.spawn("etcd", cmd)
    }

    fn start_apiserver(&self, bins: &Binaries, ports: &Ports) -> anyhow::Result<()> {
        let p = |n: &str| self.pki(n).display().to_string();
        let mut cmd = Command::new(&bins.kube_apiserver);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            ports.etcd_client
        ))
        // The host's address on the lab bridge, so the node namespaces reach
        // it; no address of the host's own uplinks is bound.
        .arg(format!("--bind-address={HOST_IP}"))
        .arg(format!("--advertise-address={HOST_IP}"))
        .arg(format!("--secure-port={}", ports.apiserver))
        .arg(format!("--cert-dir={}", self.dir.join("pki").display()))
        .arg(format!("--tls-cert-file={}", p("apiserver.crt")))
        .arg(format!("--tls-private-key-file={}", p("apiserver.key")))
        .arg(format!("--client-ca-file={}", p("ca.crt")))
        .arg("--authorization-mode=RBAC")
        .arg(format!("--service-account-issuer={SA_ISSUER}"))
        .arg(format!("--api-audiences={SA_ISSUER}"))
        .arg(format!("--service-account-key-file={}", p("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            p("sa.key")
        ))
        .arg("--service-cluster-ip-range=10.96.0.0/16")
        .arg("--allow-privileged=true")
        .arg("--profiling=false")
        .arg("--v=1");
        self.spawn("kube-apiserver", cmd)
    }

    /// Starts a long-lived lab process in its own process group, output to
    /// `.lab/logs/NAME.log`, pid to `.lab/pids/NAME.pid`.
    fn spawn(&self, name: &str, mut cmd: Command) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        fs::write(
            self.dir.join("pids").join(format!("{name}.pid")),
            child.id().to_string(),
        )?;
        Ok(())
    }

    /// Whether the API server answers `/readyz` with the admin credentials.
    pub fn apiserver_ready(&self) -> bool {
        self.kubeconfig().exists()
            && Binaries::cached().kubectl.exists()
            && self
                .kubectl()
                .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.apiserver_ready() {
                eprintln!(
                    "lab: kube-apiserver ready after {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            for name in ["etcd", "kube-apiserver"] {
                if !self.process_alive(name) {
                    bail!(
                        "{name} exited during start-up; last lines of its log:\n{}",
                        self.log_tail(name, 30)
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "kube-apiserver not ready after {} s; last lines of its log:\n{}",
            timeout.as_secs(),
            self.log_tail("kube-apiserver", 30)
        )
    }

    fn process_alive(&self, name: &str) -> bool {
        self.process_pid(name).is_some()
    }

    /// The pid of lab process `name` while it runs.
    fn process_pid(&self, name: &str) -> Option<i32> {
        read_pid(&self.dir.join("pids").join(format!("{name}.pid")))
            .filter(|pid| !nodes::is_dead(*pid))
    }

    /// The last `n` lines of a lab process's log.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        tail(&self.dir.join("logs").join(format!("{name}.log")), n)
    }

    /// Applies the CRDs and waits until they are established and published;
    /// `fresh`: the control plane was just started.
    fn install_crds(&self, fresh: bool) -> anyhow::Result<()> {
        let manifests = self.root.join("crds").join("manifests");
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            s(&manifests),
        ])?;
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/haclusters.kubeha.io",
            "crd/haservices.kubeha.io",
        ])?;
        // kubectl caches the OpenAPI v3 index (`/openapi/v3`) and revalidates
        // it with If-Modified-Since, which has one-second resolution: an index
        // cached before the CRDs were published, in the same second, stays
        // "not modified", and `kubectl explain` then fails with "couldn't find
        // resource" (seen on fresh labs, about one in three). So wait until
        // the API server publishes the CRDs' schemas (`--raw` bypasses the
        // cache), then drop what kubectl cached before.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut waited = false;
        loop {
            let index = self.kubectl_output(&["get", "--raw", "/openapi/v3"])?;
            let group =
                self.kubectl_output(&["get", "--raw", "/openapi/v3/apis/kubeha.io/v1alpha1"])?;
            let group_doc = String::from_utf8_lossy(&group.stdout);
            if index.status.success()
                && group.status.success()
                && String::from_utf8_lossy(&index.stdout).contains("\"apis/kubeha.io/v1alpha1\"")
                && group_doc.contains("\"io.kubeha.v1alpha1.HACluster\"")
                && group_doc.contains("\"io.kubeha.v1alpha1.HAService\"")
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the API server did not publish the CRDs' OpenAPI schemas within 60 s: {}{}",
                    String::from_utf8_lossy(&index.stderr),
                    String::from_utf8_lossy(&group.stderr)
                );
            }
            waited = true;
            std::thread::sleep(Duration::from_millis(200));
        }
        if fresh || waited {
            // Past the second in which the index may have changed, so that
            // no revalidation can match the old one.
            std::thread::sleep(Duration::from_millis(1100));
            let _ = fs::remove_dir_all(self.kube_cache_dir());
        }
        Ok(())
    }

    /// Folder of lab node `i`: `.lab/nodes/node-i` (its kubeconfig, and the
    /// `hooks`, `logs` and `run` folders of its agent).
    pub fn node_dir(&self, i: u8) -> PathBuf {
        self.dir.join("nodes").join(nodes::node_name(i))
    }

    /// Kubeconfig of lab node `i`: its own `kubeha-agent` token, the lab CA,
    /// the API server on the bridge.
    pub fn node_kubeconfig(&self, i: u8) -> PathBuf {
        self.node_dir(i).join("kubeconfig")
    }

    /// The lab's kubectl run inside node `i`'s namespace with that node's
    /// kubeconfig: what the node's agent is allowed to do, from where it runs.
    pub fn node_kubectl(&self, i: u8) -> anyhow::Result<Command> {
        self.check_node(i)?;
        let mut cmd = nodes::exec_in(&nodes::node_ns(i), &[Binaries::cached().kubectl]);
        cmd.env("KUBECONFIG", self.node_kubeconfig(i))
            .env("KUBECACHEDIR", self.kube_cache_dir())
            .current_dir(&self.root);
        Ok(cmd)
    }

    /// Fails unless node `i` is part of the running lab (its namespace and
    /// kubeconfig exist).
    fn check_node(&self, i: u8) -> anyhow::Result<()> {
        nodes::check_index(i)?;
        let ns = nodes::node_ns(i);
        if !nodes::ns_exists(&ns) || !self.node_kubeconfig(i).exists() {
            bail!(
                "{} is not part of the lab (no namespace {ns} or no {}); \
                 bring it up with `cargo xtask lab up --nodes {i}` or Lab::ensure_up_with_nodes({i})",
                nodes::node_name(i),
                self.node_kubeconfig(i).display()
            );
        }
        Ok(())
    }

    /// Node objects, the system namespace, the chart's RBAC and a token and
    /// folders per node.
    fn register_nodes(&self, count: u8, bins: &Binaries, ports: &Ports) -> anyhow::Result<()> {
        let dir = self.dir.join("nodes");
        fs::create_dir_all(&dir)?;
        let mut items = vec![serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": SYSTEM_NAMESPACE },
        })];
        for i in 1..=count {
            items.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": nodes::node_name(i),
                    "labels": {
                        NODE_LABEL: "true",
                        "kubernetes.io/hostname": nodes::node_name(i),
                        "kubernetes.io/os": "linux",
                    },
                },
            }));
        }
        let objects = dir.join("objects.json");
        fs::write(
            &objects,
            serde_json::to_string_pretty(&serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": items,
            }))?,
        )?;
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=kubeha-lab",
            "-f",
            s(&objects),
        ])?;
        for i in 1..=count {
            // No kubelet reports addresses here; the lab does, as a kubelet
            // would: both families' InternalIP and the hostname.
            let status = serde_json::json!({
                "status": { "addresses": [
                    { "type": "InternalIP", "address": nodes::node_ip(i)?.to_string() },
                    { "type": "InternalIP", "address": nodes::node_ip6(i)?.to_string() },
                    { "type": "Hostname", "address": nodes::node_name(i) },
                ]},
            });
            self.kubectl_ok(&[
                "patch",
                "node",
                &nodes::node_name(i),
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ])?;
        }
        // The chart's own RBAC, so an agent gets exactly what the chart gives it.
        let chart = self.root.join("charts").join("kubeha");
        let out = Command::new(&bins.helm)
            .args([
                "template",
                "kubeha",
                s(&chart),
                "--namespace",
                SYSTEM_NAMESPACE,
            ])
            .args([
                "--set",
                "crds.install=false",
                "--show-only",
                "templates/rbac.yaml",
            ])
            .output()
            .context("running the lab's helm")?;
        if !out.status.success() {
            bail!(
                "helm template of the chart's RBAC failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rbac = dir.join("rbac.yaml");
        fs::write(&rbac, &out.stdout)?;
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kubeha-lab",
            "-f",
            s(&rbac),
        ])?;
        for i in 1..=count {
            let node_dir = self.node_dir(i);
            for sub in ["hooks", "logs", "run"] {
                fs::create_dir_all(node_dir.join(sub))?;
            }
            // A fresh token on every `up`: valid whatever happened since
            // (signing key or service account recreated).
            let token = self.kubectl_ok(&[
                "create",
                "token",
                AGENT_SERVICE_ACCOUNT,
                "-n",
                SYSTEM_NAMESPACE,
                &format!("--duration={NODE_TOKEN_DURATION}"),
            ])?;
            let token = token.trim();
            if token.is_empty() || token.contains(char::is_whitespace) {
                bail!(
                    "kubectl create token returned no usable token for {}",
                    nodes::node_name(i)
                );
            }
            let user = format!("{AGENT_SERVICE_ACCOUNT}-{}", nodes::node_name(i));
            let config = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
                 users:\n- name: {user}\n  user:\n    token: {token}\n\
                 contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: {user}\n    namespace: {SYSTEM_NAMESPACE}\n\
                 current-context: kubeha-lab\n",
                url = ports.apiserver_url(),
                ca = self.pki("ca.crt").display(),
            );
            write_private(&self.node_kubeconfig(i), &config)?;
        }
        Ok(())
    }

    /// The agent binary: `$KUBEHA_AGENT_BIN`, else `debug/kubeha-agent` under
    /// `$CARGO_TARGET_DIR`, else `<repo>/target/debug/kubeha-agent`. Fails,
    /// saying how to build it, when that file does not exist.
    pub fn agent_binary(&self) -> anyhow::Result<PathBuf> {
        binary_from(
            "kubeha-agent",
            "KUBEHA_AGENT_BIN",
            &self.root,
            std::env::var_os("KUBEHA_AGENT_BIN"),
            std::env::var_os("CARGO_TARGET_DIR"),
        )
    }

    /// Pid file of node `i`'s agent.
    fn agent_pid_file(&self, i: u8) -> PathBuf {
        self.dir
            .join("pids")
            .join(format!("agent-{}.pid", nodes::node_name(i)))
    }

    /// Log of node `i`'s agent (stdout and stderr, appended across restarts).
    pub fn agent_log(&self, i: u8) -> PathBuf {
        self.dir
            .join("logs")
            .join(format!("agent-{}.log", nodes::node_name(i)))
    }

    /// Starts `kubeha-agent` ([`Lab::agent_binary`]) with `extra_args` inside
    /// node `i`'s namespace, as that node: `NODE_NAME`, `POD_NAMESPACE`, its
    /// own `KUBECONFIG`, hook, log and state folders under
    /// `.lab/nodes/node-i/`, `RUST_LOG=info`; output to [`Lab::agent_log`].
    /// Returns its pid.
    pub fn start_agent<S: AsRef<OsStr>>(&self, i: u8, extra_args: &[S]) -> anyhow::Result<i32> {
        let bin = self.agent_binary()?;
        self.start_agent_program(i, &bin, extra_args)
    }

    /// [`Lab::start_agent`] with another program in place of the agent binary
    /// (looked up on `PATH` when it has no `/`): the same namespace,
    /// environment, log and pid file. For tests of the lab itself, which
    /// cannot rely on the agent.
    pub fn start_agent_program<P: AsRef<OsStr>, S: AsRef<OsStr>>(
        &self,
        i: u8,
        program: P,
        args: &[S],
    ) -> anyhow::Result<i32> {
        use std::io::Write as _;
        use std::os::unix::process::CommandExt as _;
        self.check_node(i)?;
        if let Some(pid) = self.agent_pid(i)
            && self.agent_running(i)
        {
            bail!(
                "the agent of {} already runs (pid {pid})",
                nodes::node_name(i)
            );
        }
        let ns = nodes::node_ns(i);
        let node_dir = self.node_dir(i);
        for sub in ["hooks", "logs", "run"] {
            fs::create_dir_all(node_dir.join(sub))?;
        }
        fs::create_dir_all(self.dir.join("logs"))?;
        fs::create_dir_all(self.dir.join("pids"))?;
        let log_path = self.agent_log(i);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(
            log,
            "--- lab: starting {} in {ns}",
            Path::new(program.as_ref()).display()
        )?;
        let mut cmd = nodes::exec_in(&ns, &[program.as_ref()]);
        cmd.args(args)
            .env("NODE_NAME", nodes::node_name(i))
            .env("POD_NAMESPACE", SYSTEM_NAMESPACE)
            .env("KUBECONFIG", self.node_kubeconfig(i))
            .env("KUBEHA_HOOK_ROOT", node_dir.join("hooks"))
            .env("KUBEHA_LOG_DIR", node_dir.join("logs"))
            .env("KUBEHA_STATE_DIR", node_dir.join("run"))
            .env("RUST_LOG", "info")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the test runner does
            // not reach it.
            .process_group(0);
        // Hooks in a cgroup of the node's own, where this machine has
        // cgroup v2; else contained by their process groups only.
        if let Some(cgroup) = hook_cgroup(i) {
            cmd.env("KUBEHA_HOOK_CGROUP", cgroup);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the agent of {}", nodes::node_name(i)))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        fs::write(self.agent_pid_file(i), pid.to_string())?;
        // Reap it whenever it exits, so it never lingers as a zombie of ours.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        // `ip netns exec` enters the namespace, then executes the program.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if nodes::is_dead(pid) {
                let _ = fs::remove_file(self.agent_pid_file(i));
                bail!(
                    "the agent of {} exited at once; last lines of {}:\n{}",
                    nodes::node_name(i),
                    log_path.display(),
                    tail(&log_path, 20)
                );
            }
            if nodes::pid_in_ns(pid, &ns) && !is_still_ip(pid) {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                nodes::signal_pids(&[pid], nix::sys::signal::Signal::SIGKILL);
                let _ = fs::remove_file(self.agent_pid_file(i));
                bail!(
                    "the agent of {} (pid {pid}) did not start inside {ns} within 10 s; killed it",
                    nodes::node_name(i)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pid recorded for node `i`'s agent, whether or not it still runs.
    pub fn agent_pid(&self, i: u8) -> Option<i32> {
        read_pid(&self.agent_pid_file(i))
    }

    /// Whether node `i`'s agent runs (its recorded pid lives, inside the
    /// node's namespace).
    pub fn agent_running(&self, i: u8) -> bool {
        nodes::check_index(i).is_ok()
            && self
                .agent_pid(i)
                .is_some_and(|pid| nodes::pid_in_ns(pid, &nodes::node_ns(i)))
    }

    /// Sends `signal` to node `i`'s agent (only the agent: what it started
    /// keeps running) and waits for it to exit (30 s after SIGTERM, 5 s after
    /// SIGKILL). Returns whether an agent was running.
    pub fn stop_agent(&self, i: u8, signal: StopSignal) -> anyhow::Result<bool> {
        nodes::check_index(i)?;
        let Some(pid) = self.agent_pid(i).filter(|_| self.agent_running(i)) else {
            let _ = fs::remove_file(self.agent_pid_file(i));
            return Ok(false);
        };
        let (sig, timeout) = match signal {
            StopSignal::Term => (nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30)),
            StopSignal::Kill => (nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5)),
        };
        nodes::signal_pids(&[pid], sig);
        if !nodes::wait_dead(&[pid], timeout) {
            bail!(
                "the agent of {} (pid {pid}) still runs {} s after {sig}",
                nodes::node_name(i),
                timeout.as_secs()
            );
        }
        let _ = fs::remove_file(self.agent_pid_file(i));
        Ok(true)
    }

    /// Stops (SIGSTOP, `true`) or continues (SIGCONT, `false`) node `i`'s
    /// agent: a process that stalls, as under memory pressure or a stuck
    /// disk; what it started keeps running. Returns whether an agent runs.
    pub fn freeze_agent(&self, i: u8, frozen: bool) -> anyhow::Result<bool> {
        nodes::check_index(i)?;
        let Some(pid) = self.agent_pid(i).filter(|_| self.agent_running(i)) else {
            return Ok(false);
        };
        freeze_pid(pid, frozen);
        Ok(true)
    }

    /// Restarts etcd as a crash would: SIGKILL, `down` without it, then
    /// started again on its data directory. Returns once it is healthy (the
    /// fault's end); the API server reconnects by itself.
    pub fn restart_etcd(&self, down: Duration) -> anyhow::Result<()> {
        let ports = Ports::from_env()?;
        let bins = Binaries::ensure()?;
        if let Some(pid) = self.process_pid("etcd") {
            nodes::signal_pids(&[pid], nix::sys::signal::Signal::SIGKILL);
            if !nodes::wait_dead(&[pid], Duration::from_secs(5)) {
                bail!("etcd survived SIGKILL for 5 s");
            }
        }
        std::thread::sleep(down);
        self.start_etcd(&bins, &ports)?;
        let started = Instant::now();
        while !etcd_healthy(ports.etcd_client) {
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "etcd not healthy 30 s after its restart; last lines of its log:\n{}",
                    self.log_tail("etcd", 30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// [`Lab::freeze_agent`] for a control-plane process, `etcd` or
    /// `kube-apiserver`.
    pub fn freeze_process(&self, name: &str, frozen: bool) -> anyhow::Result<bool> {
        if !["etcd", "kube-apiserver"].contains(&name) {
            bail!("no lab process {name:?}: etcd or kube-apiserver");
        }
        let Some(pid) = self.process_pid(name) else {
            return Ok(false);
        };
        freeze_pid(pid, frozen);
        Ok(true)
    }

    /// Cuts node `i` off from the API server: inside its namespace, a packet
    /// filter drops TCP to and from the API server's address and port (nft
    /// when installed, else iptables). The rest of the segment still works.
    /// Idempotent; undone by [`Lab::heal`].
    pub fn partition(&self, i: u8) -> anyhow::Result<()> {
        self.check_node(i)?;
        nodes::partition_ns(&nodes::node_ns(i), HOST_IP, Ports::from_env()?.apiserver)
    }

    /// Undoes [`Lab::partition`] for node `i`. Idempotent.
    pub fn heal(&self, i: u8) -> anyhow::Result<()> {
        self.check_node(i)?;
        nodes::heal_ns(&nodes::node_ns(i), HOST_IP, Ports::from_env()?.apiserver)
    }

    /// Node `i` loses power: every process in its namespace (agent, hooks,
    /// whatever else) is killed at once and its link to the bridge goes down.
    /// Returns how many processes were killed. Its addresses stay configured
    /// meanwhile, off the wire (the kernel still expires a VIP's lifetime);
    /// [`Lab::power_on`] boots it with its own addresses only and starts
    /// nothing.
    pub fn power_off(&self, i: u8) -> anyhow::Result<usize> {
        self.check_node(i)?;
        let ns = nodes::node_ns(i);
        let pids = nodes::ns_pids(&ns);
        nodes::signal_pids(&pids, nix::sys::signal::Signal::SIGKILL);
        if !nodes::wait_dead(&pids, Duration::from_secs(5)) {
            bail!("processes in {ns} survived SIGKILL for 5 s");
        }
        let _ = fs::remove_file(self.agent_pid_file(i));
        nodes::set_link(&nodes::node_link(i), false)?;
        Ok(pids.len())
    }

    /// Node `i` boots after [`Lab::power_off`]: like a machine after power
    /// loss it comes back with only its own addresses (a VIP it held is
    /// gone), then its link to the bridge comes up. Every address on its
    /// interface other than [`nodes::node_ip`], [`nodes::node_ip6`] and IPv6
    /// link-local (fe80::/10) is removed before the link is up, so nothing
    /// it held before the power loss reaches the wire again. Starts nothing
    /// (no agent). A node that is on (its link up) is left untouched.
    pub fn power_on(&self, i: u8) -> anyhow::Result<()> {
        self.check_node(i)?;
        let link = nodes::node_link(i);
        if host_link_up(&link)? {
            return Ok(());
        }
        let ns = nodes::node_ns(i);
        let (v4, v6) = (nodes::node_ip(i)?, nodes::node_ip6(i)?);
        let own = |a: &IpAddr| *a == IpAddr::V4(v4) || *a == IpAddr::V6(v6) || is_link_local(a);
        for (addr, prefix) in ns_iface_addresses(&ns)? {
            if !own(&addr) {
                // May fail when deleting an earlier (primary) address took
                // this one with it: checked below.
                let _ = ip_ok(&[
                    "-n",
                    &ns,
                    "addr",
                    "del",
                    &format!("{addr}/{prefix}"),
                    "dev",
                    nodes::NS_IFACE,
                ]);
            }
        }
        let left = ns_iface_addresses(&ns)?;
        let foreign: Vec<String> = left
            .iter()
            .filter(|(a, _)| !own(a))
            .map(|(a, p)| format!("{a}/{p}"))
            .collect();
        if !foreign.is_empty() {
            bail!(
                "powering on {}: addresses {foreign:?} are still on {} in {ns}; the link stays down",
                nodes::node_name(i),
                nodes::NS_IFACE
            );
        }
        // Its own configuration comes back with the boot, should anything
        // have removed it.
        if !left.iter().any(|(a, _)| *a == IpAddr::V4(v4)) {
            ip_ok(&[
                "-n",
                &ns,
                "addr",
                "replace",
                &format!("{v4}/{}", nodes::PREFIX_LEN_V4),
                "dev",
                nodes::NS_IFACE,
            ])?;
        }
        if !left.iter().any(|(a, _)| *a == IpAddr::V6(v6)) {
            ip_ok(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "replace",
                &format!("{v6}/{}", nodes::PREFIX_LEN_V6),
                "dev",
                nodes::NS_IFACE,
                "nodad",
            ])?;
        }
        nodes::set_link(&link, true)
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

/// Runs `ip ARGS`; fails with its stderr unless it succeeds; its stdout.
fn ip_ok(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// Whether host link `name` is administratively up.
fn host_link_up(name: &str) -> anyhow::Result<bool> {
    let out = ip_ok(&["-j", "link", "show", "dev", name])?;
    let links: serde_json::Value =
        serde_json::from_slice(&out).context("parsing `ip -j link show`")?;
    Ok(links[0]["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == "UP")))
}

/// Every address on [`nodes::NS_IFACE`] inside namespace `ns`, with its
/// prefix length.
fn ns_iface_addresses(ns: &str) -> anyhow::Result<Vec<(IpAddr, u8)>> {
    let out = ip_ok(&["-n", ns, "-j", "addr", "show", "dev", nodes::NS_IFACE])?;
    parse_addresses(&out)
}

/// The addresses (with prefix lengths) in `ip -j addr show` output.
fn parse_addresses(json: &[u8]) -> anyhow::Result<Vec<(IpAddr, u8)>> {
    let ifaces: serde_json::Value =
        serde_json::from_slice(json).context("parsing `ip -j addr show`")?;
    let mut found = Vec::new();
    for info in ifaces
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["addr_info"].as_array())
        .flatten()
    {
        let (Some(local), Some(prefix)) = (info["local"].as_str(), info["prefixlen"].as_u64())
        else {
            continue;
        };
        let addr: IpAddr = local
            .parse()
            .with_context(|| format!("`ip` printed {local:?} as an address"))?;
        let prefix = u8::try_from(prefix).context("prefix length out of range")?;
        found.push((addr, prefix));
    }
    Ok(found)
}

/// IPv6 link-local, fe80::/10.
fn is_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// SIGSTOP (`frozen`) or SIGCONT to `pid`.
fn freeze_pid(pid: i32, frozen: bool) {
    let sig = if frozen {
        nix::sys::signal::Signal::SIGSTOP
    } else {
        nix::sys::signal::Signal::SIGCONT
    };
    nodes::signal_pids(&[pid], sig);
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

/// Fails with a clear message when a lab port is taken (another lab, from
/// another checkout, still running). Run once the bridge carries [`HOST_IP`].
fn ports_free(ports: &Ports) -> anyhow::Result<()> {
    let loopback = Ipv4Addr::LOCALHOST;
    for (ip, port) in [
        (loopback, ports.etcd_client),
        (loopback, ports.etcd_peer),
        (HOST_IP, ports.apiserver),
    ] {
        if let Err(e) = std::net::TcpListener::bind((ip, port)) {
            bail!(
                "cannot listen on {ip}:{port} ({e}): another lab (from another checkout?) still runs; \
                 run `cargo xtask lab down` there, stop whatever listens on it, or move this lab with \
                 KUBEHA_LAB_ETCD_CLIENT_PORT / KUBEHA_LAB_ETCD_PEER_PORT / KUBEHA_LAB_APISERVER_PORT"
            );
        }
    }
    Ok(())
}

/// Whether `pid` still runs `ip` (`ip netns exec` before it executes the
/// program).
fn is_still_ip(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
        raw.split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0 == b"ip" || argv0.ends_with(b"/ip"))
    })
}

fn tail(file: &Path, n: usize) -> String {
    let text = fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

/// Service account of the operator in the chart's RBAC.
pub const OPERATOR_SERVICE_ACCOUNT: &str = "kubeha-operator";

/// Operator replicas run as host processes (the lab has no kubelet), like the
/// Deployment's pods would: the chart's service-account token, `POD_NAME`
/// `operator-R`, `POD_NAMESPACE`, metrics on `127.0.0.1:19090+R`.
impl Lab {
    /// The operator binary: `$KUBEHA_OPERATOR_BIN`, else `debug/kubeha-operator`
    /// under `$CARGO_TARGET_DIR` or `<repo>/target`.
    pub fn operator_binary(&self) -> anyhow::Result<PathBuf> {
        binary_from(
            "kubeha-operator",
            "KUBEHA_OPERATOR_BIN",
            &self.root,
            std::env::var_os("KUBEHA_OPERATOR_BIN"),
            std::env::var_os("CARGO_TARGET_DIR"),
        )
    }

    /// Address of replica `r`'s `/metrics`, `/healthz` and `/readyz`.
    pub fn operator_metrics_addr(r: u8) -> String {
        format!("127.0.0.1:{}", 19090 + u16::from(r))
    }

    fn operator_pid_file(&self, r: u8) -> PathBuf {
        self.dir.join("pids").join(format!("operator-{r}.pid"))
    }

    /// Log of operator replica `r` (appended across restarts).
    pub fn operator_log(&self, r: u8) -> PathBuf {
        self.dir.join("logs").join(format!("operator-{r}.log"))
    }

    /// Pid recorded for operator replica `r`.
    pub fn operator_pid(&self, r: u8) -> Option<i32> {
        read_pid(&self.operator_pid_file(r))
    }

    /// Whether operator replica `r` runs.
    pub fn operator_running(&self, r: u8) -> bool {
        self.operator_pid(r).is_some_and(|pid| !nodes::is_dead(pid))
    }

    /// Starts operator replica `r` with `extra_args` (the lab uses a short
    /// leader lock, 4 s renewed 2 s before expiry, unless overridden) and
    /// waits until its `/readyz` answers 200 (30 s).
    pub fn start_operator(&self, r: u8, extra_args: &[&str]) -> anyhow::Result<i32> {
        use std::io::Write as _;
        use std::os::unix::process::CommandExt as _;
        if self.operator_running(r) {
            bail!("operator replica {r} already runs");
        }
        let bin = self.operator_binary()?;
        let kubeconfig = self.dir.join(format!("operator-{r}.kubeconfig"));
        let token = self.kubectl_ok(&[
            "create",
            "token",
            OPERATOR_SERVICE_ACCOUNT,
            "-n",
            SYSTEM_NAMESPACE,
            &format!("--duration={NODE_TOKEN_DURATION}"),
        ])?;
        let ports = Ports::from_env().unwrap_or_default();
        write_private(
            &kubeconfig,
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
                 users:\n- name: operator-{r}\n  user:\n    token: {token}\n\
                 contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: operator-{r}\n    namespace: {SYSTEM_NAMESPACE}\n\
                 current-context: kubeha-lab\n",
                url = ports.apiserver_url(),
                ca = self.pki("ca.crt").display(),
                token = token.trim(),
            ),
        )?;
        fs::create_dir_all(self.dir.join("logs"))?;
        fs::create_dir_all(self.dir.join("pids"))?;
        let log_path = self.operator_log(r);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        writeln!(log, "--- lab: starting operator replica {r}")?;
        let addr = Self::operator_metrics_addr(r);
        let mut child = Command::new(&bin)
            // argv[0] names the lab, so `lab down` finds it like every lab process.
            .arg0(self.dir.join(format!("kubeha-operator-{r}")))
            .args([
                "--metrics-addr",
                &addr,
                // A new leader within 8 s of a kill (a killed replica that
                // restarts leads again at once: same identity), and the lock
                // kept through an API-server stall of up to 6 s (renewed
                // every second).
                "--leader-lease-seconds",
                "8",
                "--leader-grace-seconds",
                "7",
            ])
            .args(extra_args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", SYSTEM_NAMESPACE)
            .env("POD_NAME", format!("operator-{r}"))
            .env("RUST_LOG", "info")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        fs::write(self.operator_pid_file(r), pid.to_string())?;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if nodes::is_dead(pid) {
                bail!(
                    "operator replica {r} exited at once; last lines of {}:\n{}",
                    log_path.display(),
                    tail(&log_path, 20)
                );
            }
            if http_get(&addr, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                bail!(
                    "operator replica {r} not ready on {addr}/readyz within 30 s; last lines of {}:\n{}",
                    log_path.display(),
                    tail(&log_path, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to operator replica `r` and waits for it to exit.
    /// Returns whether it was running.
    pub fn stop_operator(&self, r: u8, signal: StopSignal) -> anyhow::Result<bool> {
        let Some(pid) = self.operator_pid(r).filter(|_| self.operator_running(r)) else {
            return Ok(false);
        };
        let sig = match signal {
            StopSignal::Term => nix::sys::signal::Signal::SIGTERM,
            StopSignal::Kill => nix::sys::signal::Signal::SIGKILL,
        };
        nodes::signal_pids(&[pid], sig);
        if !nodes::wait_dead(&[pid], Duration::from_secs(30)) {
            bail!("operator replica {r} (pid {pid}) still runs 30 s after {sig}");
        }
        let _ = fs::remove_file(self.operator_pid_file(r));
        Ok(true)
    }
}

impl Lab {
    /// The `kubectl ha` plugin binary: `$KUBECTL_HA_BIN`, else
    /// `debug/kubectl-ha` under the target folder.
    pub fn kubectl_ha_binary(&self) -> anyhow::Result<PathBuf> {
        binary_from(
            "kubectl-ha",
            "KUBECTL_HA_BIN",
            &self.root,
            std::env::var_os("KUBECTL_HA_BIN"),
            std::env::var_os("CARGO_TARGET_DIR"),
        )
    }

    /// The `kubectl ha` plugin pointed at the lab as its admin.
    pub fn kubectl_ha(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(self.kubectl_ha_binary()?);
        cmd.env("KUBECONFIG", self.kubeconfig())
            .current_dir(&self.root);
        Ok(cmd)
    }

    /// Runs `kubectl ha ARGS`; fails with its output unless it succeeds.
    pub fn kubectl_ha_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl_ha()?.args(args).output()?;
        if !out.status.success() {
            bail!(
                "kubectl ha {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Where the lab mounts the cgroup v2 filesystem: outside `/sys`, which
/// `ip netns exec` replaces (with a sysfs of the namespace's own and no
/// cgroup mounts), so agents in node namespaces see it.
const CGROUP_MOUNT: &str = "/run/kubeha-lab-cgroup";

/// Whether `path` is a mount point of a cgroup2 filesystem here.
fn cgroup2_mounted_at(path: &str) -> bool {
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            line.split_once(" - ").is_some_and(|(left, right)| {
                right.split_whitespace().next() == Some("cgroup2")
                    && left.split_whitespace().nth(4) == Some(path)
            })
        })
}

/// The lab's hook cgroups: one folder per node, on the cgroup v2
/// filesystem mounted at [`CGROUP_MOUNT`] (mounted here when it is not
/// yet); `None` when this machine has no cgroup v2.
fn hook_cgroups() -> Option<PathBuf> {
    if !cgroup2_mounted_at(CGROUP_MOUNT) {
        fs::create_dir_all(CGROUP_MOUNT).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "cgroup2", "cgroup2", CGROUP_MOUNT])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = fs::remove_dir(CGROUP_MOUNT);
            return None;
        }
    }
    Some(Path::new(CGROUP_MOUNT).join("kubeha-lab"))
}

/// Node `i`'s hook cgroup (its agent creates it), if this machine has
/// cgroup v2.
fn hook_cgroup(i: u8) -> Option<PathBuf> {
    Some(hook_cgroups()?.join(nodes::node_name(i)))
}

/// Removes the lab's hook cgroups (killing what is left in them: `lab
/// down` already stopped the node namespaces' processes) and unmounts the
/// lab's cgroup v2 mount.
fn remove_hook_cgroups() {
    if !cgroup2_mounted_at(CGROUP_MOUNT) {
        return;
    }
    let root = Path::new(CGROUP_MOUNT).join("kubeha-lab");
    // node-N/<cluster>/ are the cgroups with processes; deepest first.
    let mut dirs = Vec::new();
    for node in fs::read_dir(&root).into_iter().flatten().flatten() {
        for cluster in fs::read_dir(node.path()).into_iter().flatten().flatten() {
            if cluster.path().join("cgroup.procs").is_file() {
                dirs.push(cluster.path());
            }
        }
        dirs.push(node.path());
    }
    dirs.push(root);
    for dir in dirs {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
        // A cgroup is removable once its last process is gone.
        for _ in 0..50 {
            if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = Command::new("umount").arg(CGROUP_MOUNT).status();
    let _ = fs::remove_dir(CGROUP_MOUNT);
}

/// Whether etcd on loopback port `port` answers its health check healthy
/// (it has a leader and serves).
fn etcd_healthy(port: u16) -> bool {
    http_get(&format!("127.0.0.1:{port}"), "/health")
        .is_ok_and(|(code, body)| code == 200 && body.contains(r#""health":"true""#))
}

/// A plain HTTP/1.0 GET on loopback: status code and body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Where binary `name` of the workspace is, given its override variable
/// `env_var` (its value `bin`) and `$CARGO_TARGET_DIR`; fails, saying how to
/// build it, when it is missing.
fn binary_from(
    name: &str,
    env_var: &str,
    root: &Path,
    bin: Option<OsString>,
    target_dir: Option<OsString>,
) -> anyhow::Result<PathBuf> {
    let (path, from) = match (bin, target_dir) {
        (Some(bin), _) => (PathBuf::from(bin), format!("from {env_var}")),
        (None, Some(target)) => (
            root.join(target).join("debug").join(name),
            "under CARGO_TARGET_DIR".to_owned(),
        ),
        (None, None) => (
            root.join("target").join("debug").join(name),
            "the default".to_owned(),
        ),
    };
    if !path.is_file() {
        bail!(
            "the {name} binary is missing: no file {} ({from}); build it with \
             `cargo build -p {name}`, or set {env_var} to its path",
            path.display()
        );
    }
    Ok(path)
}

fn link(target: &Path, link: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").args(args).output().context(
        "running openssl (the lab makes its certificates with it; install it with `apt-get install openssl`)",
    )?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("lab paths are UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_agent_binary_says_how_to_build_it() {
        let root = Path::new("/nonexistent-kubeha-repo");
        let err = binary_from("kubeha-agent", "KUBEHA_AGENT_BIN", root, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent-kubeha-repo/target/debug/kubeha-agent"),
            "{err}"
        );
        assert!(err.contains("cargo build -p kubeha-agent"), "{err}");
        let err = binary_from(
            "kubeha-agent",
            "KUBEHA_AGENT_BIN",
            root,
            Some("/nope/agent".into()),
            Some("/t".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nope/agent (from KUBEHA_AGENT_BIN)"), "{err}");
        let err = binary_from(
            "kubeha-agent",
            "KUBEHA_AGENT_BIN",
            root,
            None,
            Some("/t".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/t/debug/kubeha-agent (under CARGO_TARGET_DIR)"),
            "{err}"
        );
        let found = binary_from(
            "kubeha-agent",
            "KUBEHA_AGENT_BIN",
            root,
            Some("/bin/sh".into()),
            None,
        )
        .unwrap();
        assert_eq!(found, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn addresses_are_read_from_ip_json_and_link_local_is_recognised() {
        let json = br#"[{"ifindex":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP"],"addr_info":[
            {"family":"inet","local":"198.18.0.11","prefixlen":24,"scope":"global"},
            {"family":"inet","local":"198.18.0.110","prefixlen":24,"scope":"global","secondary":true},
            {"family":"inet6","local":"2001:db8::100","prefixlen":64,"scope":"global"},
            {"family":"inet6","local":"fe80::1c2b:3cff:fe4d:5e6f","prefixlen":64,"scope":"link"},
            {}]}]"#;
        let found = parse_addresses(json).unwrap();
        let text: Vec<String> = found.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        assert_eq!(
            text,
            [
                "198.18.0.11/24",
                "198.18.0.110/24",
                "2001:db8::100/64",
                "fe80::1c2b:3cff:fe4d:5e6f/64"
            ]
        );
        assert!(parse_addresses(b"[]").unwrap().is_empty());
        assert!(parse_addresses(b"not json").is_err());
        let ll = |a: &str| is_link_local(&a.parse().unwrap());
        assert!(ll("fe80::1") && ll("febf::1"));
        assert!(!ll("fec0::1") && !ll("2001:db8::b") && !ll("198.18.0.11"));
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
