//! The control-plane processes: etcd and kube-apiserver started, waited
//! for, restarted and stalled; the CRDs installed; the ports checked.

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Lab, Ports, freeze_pid, read_pid, s, tail};
use crate::deps::Binaries;
use crate::nodes::{self, HOST_IP};

const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

impl Lab {
    pub(super) fn start_etcd(&self, bins: &Binaries, ports: &Ports) -> anyhow::Result<()> {
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

    pub(super) fn start_apiserver(&self, bins: &Binaries, ports: &Ports) -> anyhow::Result<()> {
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
        // As a real cluster: the Node authorizer and NodeRestriction
        // confine each kubelet (a `system:node:NAME` certificate, in the
        // kubelet lab) to its own node; nothing else is affected by them.
        .arg("--authorization-mode=Node,RBAC")
        .arg("--enable-admission-plugins=NodeRestriction")
        .arg("--kubelet-preferred-address-types=InternalIP")
        .arg(format!(
            "--kubelet-client-certificate={}",
            p("apiserver-kubelet-client.crt")
        ))
        .arg(format!(
            "--kubelet-client-key={}",
            p("apiserver-kubelet-client.key")
        ))
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
    pub(super) fn spawn(&self, name: &str, mut cmd: Command) -> anyhow::Result<()> {
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

    pub(super) fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
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
    pub(super) fn process_pid(&self, name: &str) -> Option<i32> {
        read_pid(&self.dir.join("pids").join(format!("{name}.pid")))
            .filter(|pid| !nodes::is_dead(*pid))
    }

    /// The last `n` lines of a lab process's log.
    pub fn log_tail(&self, name: &str, n: usize) -> String {
        tail(&self.dir.join("logs").join(format!("{name}.log")), n)
    }

    /// Applies the CRDs and waits until they are established and published;
    /// `fresh`: the control plane was just started.
    pub(super) fn install_crds(&self, fresh: bool) -> anyhow::Result<()> {
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
}

/// Fails with a clear message when a lab port is taken (another lab, from
/// another checkout, still running). Run once the bridge carries [`HOST_IP`].
pub(super) fn ports_free(ports: &Ports) -> anyhow::Result<()> {
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
