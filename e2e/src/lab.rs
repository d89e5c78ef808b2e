//! The lab: a real etcd and kube-apiserver started as processes, with RBAC, a
//! client-certificate admin and service-account signing keys; the generated
//! CRDs installed; the admin kubeconfig in `.lab/kubeconfig` and the lab's
//! kubectl and helm linked into `.lab/bin/`.
//!
//! Every process the lab starts carries the lab folder's path on its command
//! line, so `down` finds and stops them even after a killed run.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::deps::Binaries;

/// Port of the lab's etcd client endpoint (loopback only).
pub const ETCD_CLIENT_PORT: u16 = 23790;
/// Port of the lab's etcd peer endpoint (loopback only).
pub const ETCD_PEER_PORT: u16 = 23800;
/// Secure port of the lab's kube-apiserver.
pub const APISERVER_PORT: u16 = 16443;

const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

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
            .current_dir(&self.root);
        cmd
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

    /// What a user exports to use the lab from a shell.
    pub fn usage(&self) -> String {
        format!(
            "lab is up: kube-apiserver https://127.0.0.1:{APISERVER_PORT}\n\
             export KUBECONFIG={} PATH={}:$PATH\n\
             kubectl get haclusters,haservices -A",
            self.kubeconfig().display(),
            self.dir.join("bin").display()
        )
    }

    /// `up`, serialised on a lock file so many tests may call it at once; the
    /// first starts the lab, the others reuse it.
    pub fn ensure_up(&self) -> anyhow::Result<()> {
        let lock = File::create(self.root.join(".lab.lock")).context("creating .lab.lock")?;
        lock.lock().context("locking .lab.lock")?;
        self.up()
    }

    /// Builds what is missing, starts etcd and kube-apiserver, waits for
    /// readiness and installs the CRDs. Idempotent: a running lab is reused.
    pub fn up(&self) -> anyhow::Result<()> {
        let bins = Binaries::ensure(&self.root)?;
        for sub in ["pki", "logs", "pids", "bin"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        link(&bins.kubectl, &self.dir.join("bin/kubectl"))?;
        link(&bins.helm, &self.dir.join("bin/helm"))?;
        if !self.apiserver_ready() {
            // Leftovers of a killed run would hold the ports.
            self.stop_processes();
            ports_free()?;
            self.write_pki()?;
            self.write_kubeconfig()?;
            self.start_etcd(&bins)?;
            self.start_apiserver(&bins)?;
            self.wait_ready(Duration::from_secs(90))?;
        }
        self.install_crds()
    }

    /// Stops every lab process and removes the lab's files.
    pub fn down(&self) -> anyhow::Result<()> {
        let stopped = self.stop_processes();
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)
                .with_context(|| format!("removing {}", self.dir.display()))?;
        }
        let _ = fs::remove_file(self.root.join(".lab.lock"));
        println!(
            "lab down: stopped {stopped} process(es), removed {}",
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
        s
    }

    fn pki(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(name)
    }

    fn write_pki(&self) -> anyhow::Result<()> {
        if self.pki("admin.crt").exists() {
            return Ok(());
        }
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
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
        )?;
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

    fn write_kubeconfig(&self) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: https://127.0.0.1:{APISERVER_PORT}\n    certificate-authority: {ca}\n\
             users:\n- name: kubeha-lab-admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
             contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: kubeha-lab-admin\ncurrent-context: kubeha-lab\n",
            ca = self.pki("ca.crt").display(),
            crt = self.pki("admin.crt").display(),
            key = self.pki("admin.key").display(),
        );
        fs::write(self.kubeconfig(), config)?;
        Ok(())
    }

    fn start_etcd(&self, bins: &Binaries) -> anyhow::Result<()> {
        let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
        let client = format!("http://127.0.0.1:{ETCD_CLIENT_PORT}");
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

    fn start_apiserver(&self, bins: &Binaries) -> anyhow::Result<()> {
        let p = |n: &str| self.pki(n).display().to_string();
        let mut cmd = Command::new(&bins.kube_apiserver);
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}"
        ))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={APISERVER_PORT}"))
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
        let log = File::create(self.dir.join("logs").join(format!("{name}.log")))?;
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
        fs::read_to_string(self.dir.join("pids").join(format!("{name}.pid")))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| !is_dead(pid as i32))
    }

    /// The last `n` lines of a lab process's log.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        let text = fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn install_crds(&self) -> anyhow::Result<()> {
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
        Ok(())
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
        signal_all(&pids, "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && pids.iter().any(|p| !is_dead(*p)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        signal_all(&pids, "KILL");
        pids.len()
    }
}

/// Gone, or a zombie (exited, not yet reaped).
fn is_dead(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn signal_all(pids: &[i32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(|p| p.to_string()))
        .stderr(Stdio::null())
        .status();
}

/// Fails with a clear message when a lab port is taken (another lab, from
/// another checkout, still running).
fn ports_free() -> anyhow::Result<()> {
    for port in [ETCD_CLIENT_PORT, ETCD_PEER_PORT, APISERVER_PORT] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!(
                "port 127.0.0.1:{port} is in use: another lab (from another checkout?) still runs; \
                 run `cargo xtask lab down` there, or stop whatever listens on it"
            );
        }
    }
    Ok(())
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
