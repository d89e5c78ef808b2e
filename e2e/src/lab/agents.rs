//! The node agents: started inside their node's namespace, as that node,
//! and stopped, killed or stalled.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::cgroups::hook_cgroup;
use super::{Lab, SYSTEM_NAMESPACE, StopSignal, freeze_pid, read_pid, record_and_reap, tail};
use crate::nodes;

impl Lab {
    /// The agent binary: `$KUBEHA_AGENT_BIN`, else `<profile>/kubeha-agent`
    /// (the lab's [`Profile`](super::Profile), `debug` unless set) under
    /// `$CARGO_TARGET_DIR`, else under `<repo>/target`. Fails, saying how to
    /// build it, when that file does not exist.
    pub fn agent_binary(&self) -> anyhow::Result<PathBuf> {
        self.workspace_binary("kubeha-agent", "KUBEHA_AGENT_BIN")
    }

    /// Pid file of node `i`'s agent.
    pub(super) fn agent_pid_file(&self, i: u8) -> PathBuf {
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
        // Hooks in the host's namespaces, as in a pod with hostPID: the
        // lab's nodes share this machine, so "the host" is the lab's
        // anchor (this machine's mount, UTS and IPC namespaces; the node's
        // network namespace stays the agent's). Tests tell the nodes'
        // services apart by their network namespace.
        cmd.env("KUBEHA_HOOK_NAMESPACES", "host")
            .env("KUBEHA_HOST_PID", self.host_anchor()?.to_string());
        // Hooks in a cgroup of the node's own, where this machine has
        // cgroup v2; else contained by their process groups only.
        if let Some(cgroup) = hook_cgroup(i) {
            cmd.env("KUBEHA_HOOK_CGROUP", cgroup);
        }
        // The node's boot, as the lab's power-on emulates it (the nodes
        // share this machine's kernel and so its boot id).
        if let Ok(id) = fs::read_to_string(self.boot_id_file(i)) {
            cmd.env("KUBEHA_BOOT_ID", id.trim());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the agent of {}", nodes::node_name(i)))?;
        let pid = record_and_reap(child, &self.agent_pid_file(i))?;
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

    /// The lab's stand-in for the host's init, started when not running: a
    /// process in this machine's namespaces whose namespaces the agents'
    /// hooks enter (`--host-pid`). PID 1 cannot serve: its namespaces are
    /// not readable where the lab runs without every capability PID 1 has.
    /// Its command line names the lab folder, so `lab down` stops it.
    pub fn host_anchor(&self) -> anyhow::Result<i32> {
        use std::os::unix::process::CommandExt as _;
        let pid_file = self.dir.join("pids").join("host-anchor.pid");
        let argv0 = self.dir.join("host-anchor");
        if let Some(pid) = read_pid(&pid_file)
            && fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(argv0.as_os_str().as_encoded_bytes()))
            && !nodes::is_dead(pid)
        {
            return Ok(pid);
        }
        fs::create_dir_all(self.dir.join("pids"))?;
        let child = std::process::Command::new("sleep")
            .arg0(&argv0)
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the lab's host anchor (sleep infinity)")?;
        record_and_reap(child, &pid_file)
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
