//! Operator replicas as host processes of the lab, started with the
//! chart's service-account token and stopped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{
    Lab, NODE_TOKEN_DURATION, OPERATOR_SERVICE_ACCOUNT, Ports, SYSTEM_NAMESPACE, StopSignal,
    http_get, read_pid, record_and_reap, tail, write_private,
};
use crate::nodes;

/// Operator replicas run as host processes (the lab has no kubelet), like the
/// Deployment's pods would: the chart's service-account token, `POD_NAME`
/// `operator-R`, `POD_NAMESPACE`, metrics on `127.0.0.1:19090+R`.
impl Lab {
    /// The operator binary: `$KUBEHA_OPERATOR_BIN`, else
    /// `<profile>/kubeha-operator` (the lab's [`Profile`](super::Profile))
    /// under `$CARGO_TARGET_DIR` or `<repo>/target`.
    pub fn operator_binary(&self) -> anyhow::Result<PathBuf> {
        self.workspace_binary("kubeha-operator", "KUBEHA_OPERATOR_BIN")
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

    /// Writes a kubeconfig at `path` that authenticates as the operator's
    /// service account (a fresh token), user `user`, namespace
    /// kubeha-system.
    fn write_operator_kubeconfig(&self, path: &Path, user: &str) -> anyhow::Result<()> {
        let token = self.service_account_token(
            OPERATOR_SERVICE_ACCOUNT,
            &[&format!("--duration={NODE_TOKEN_DURATION}")],
        )?;
        let url = Ports::from_env().unwrap_or_default().apiserver_url();
        write_private(path, &self.token_kubeconfig(&url, user, &token))
    }

    /// A kubeconfig (`.lab/operator-e2e.kubeconfig`, with a freshly minted
    /// token) that authenticates as the operator's service account: what
    /// tests use to write service Leases, which the chart's admission policy
    /// (rbac.serviceLeasePolicy) allows the operator's identity only.
    pub fn operator_kubeconfig(&self) -> anyhow::Result<PathBuf> {
        let path = self.dir.join("operator-e2e.kubeconfig");
        self.write_operator_kubeconfig(&path, "operator-e2e")?;
        Ok(path)
    }

    /// kubectl as the operator's service account (see
    /// [`Lab::operator_kubeconfig`]).
    pub fn kubectl_as_operator(&self) -> anyhow::Result<Command> {
        let mut cmd = self.kubectl();
        cmd.env("KUBECONFIG", self.operator_kubeconfig()?);
        Ok(cmd)
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
        self.write_operator_kubeconfig(&kubeconfig, &format!("operator-{r}"))?;
        fs::create_dir_all(self.dir.join("logs"))?;
        fs::create_dir_all(self.dir.join("pids"))?;
        let log_path = self.operator_log(r);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        writeln!(log, "--- lab: starting operator replica {r}")?;
        let addr = Self::operator_metrics_addr(r);
        let child = Command::new(&bin)
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
        let pid = record_and_reap(child, &self.operator_pid_file(r))?;
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

    /// Stops (SIGSTOP, `true`) or continues (SIGCONT, `false`) operator
    /// replica `r`: a process that stalls (a paused VM, a throttled pod).
    /// Returns whether the replica runs.
    pub fn freeze_operator(&self, r: u8, frozen: bool) -> anyhow::Result<bool> {
        let Some(pid) = self.operator_pid(r).filter(|_| self.operator_running(r)) else {
            return Ok(false);
        };
        super::freeze_pid(pid, frozen);
        Ok(true)
    }
}
