//! Running hooks: each script as argv in a process group (and cgroup) of its
//! own, its timeout enforced on the whole group, the fence's kill of everything
//! hooks started.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kubeha_crds::service::{HookOutcome, HookResult};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tokio::process::Command;

use super::context::HookContext;
use super::runlog::{Capture, clip, open_log};
use super::scripts::{HookLayout, HookSet, Script, check_script_at};
use super::sources::Sources;
use super::{
    Action, DEFAULT_KILL_GRACE, DEFAULT_LOG_CAP_BYTES, DEFAULT_TAIL_LINES, MAX_TAIL_LINES,
    Transition, outcome_for_code, role_str,
};
use crate::cgroup::HookCgroup;
use crate::host_namespaces::HostNamespaces;

/// How long a run waits, once its script has ended, for the rest of its
/// output: daemons it started may hold its pipes open for good.
pub(super) const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// Prefix of the lines the agent itself adds to a result's output tail.
pub(super) const NOTE: &str = "kubeha:";

/// The process groups of the hooks running now, and the fence generation
/// (bumped by every [`HookRunner::kill_all`]).
#[derive(Debug, Default)]
pub(super) struct Registry {
    generation: u64,
    groups: BTreeMap<i32, PathBuf>,
}

/// Runs hook scripts. Cheap to clone; clones share the registry of running
/// process groups, so [`HookRunner::kill_all`] on any clone fences the hooks
/// started through all of them.
#[derive(Clone, Debug)]
pub struct HookRunner {
    /// Root of the log files: `log_dir/<service, '/' -> '_'>/<script>.log`.
    pub log_dir: PathBuf,
    /// Size at which a log file is rotated to `.log.1` before a run.
    pub log_cap_bytes: u64,
    /// Output lines kept in a result (at most [`MAX_TAIL_LINES`]).
    pub tail_lines: usize,
    /// Time between SIGTERM and SIGKILL when a script overruns.
    pub kill_grace: Duration,
    /// The cgroup every hook (and what it starts) runs in, if any.
    cgroup: Option<Arc<HookCgroup>>,
    /// The host's namespaces every hook enters, if any.
    host: Option<Arc<HostNamespaces>>,
    registry: Arc<Mutex<Registry>>,
    /// The hook-source gate ([`super::sources`]).
    pub(super) sources: Arc<Mutex<Sources>>,
}

/// Removes a hook's process group from the registry when the run finishes;
/// if the run is abandoned (its future dropped), kills the group first so no
/// hook runs unsupervised.
pub(super) struct GroupGuard {
    registry: Arc<Mutex<Registry>>,
    pgid: i32,
    done: bool,
}

impl GroupGuard {
    fn finish(mut self) {
        self.done = true;
        lock(&self.registry).groups.remove(&self.pgid);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if !self.done {
            let mut reg = lock(&self.registry);
            // Still registered means the leader is not reaped: the group id
            // cannot have been reused.
            if reg.groups.remove(&self.pgid).is_some() {
                let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
            }
        }
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the process ended, before mapping to an outcome.
pub(super) enum Ending {
    Exited(ExitStatus),
    WaitFailed(io::Error),
    /// Did not die even after SIGKILL (uninterruptible sleep); left to
    /// background reaping.
    Stuck,
}

impl HookRunner {
    /// A runner logging under `log_dir`, with the default cap (1 MiB), tail
    /// (10 lines) and kill grace (2 s).
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        HookRunner {
            log_dir: log_dir.into(),
            log_cap_bytes: DEFAULT_LOG_CAP_BYTES,
            tail_lines: DEFAULT_TAIL_LINES,
            kill_grace: DEFAULT_KILL_GRACE,
            cgroup: None,
            host: None,
            registry: Arc::default(),
            sources: Arc::default(),
        }
    }

    /// Runs every hook in `cgroup`, so [`HookRunner::kill_contained`] stops
    /// what hooks started even outside their process groups.
    pub fn with_cgroup(mut self, cgroup: HookCgroup) -> Self {
        self.cgroup = Some(Arc::new(cgroup));
        self
    }

    /// Runs every hook in the host's namespaces (entered between fork and
    /// exec, before the script is looked up), so what hooks start are host
    /// processes.
    pub fn with_host_namespaces(mut self, host: HostNamespaces) -> Self {
        self.host = Some(Arc::new(host));
        self
    }

    /// Sets the log size cap.
    pub fn with_log_cap_bytes(mut self, bytes: u64) -> Self {
        self.log_cap_bytes = bytes;
        self
    }

    /// Sets how many output lines a result keeps.
    pub fn with_tail_lines(mut self, lines: usize) -> Self {
        self.tail_lines = lines;
        self
    }

    /// Sets the time between SIGTERM and SIGKILL.
    pub fn with_kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = grace;
        self
    }

    /// The log file of a script of a service.
    pub fn log_path(&self, service: &str, script_name: &str) -> PathBuf {
        let mut dir = service.replace('/', "_");
        if dir.is_empty() || dir == "." || dir == ".." {
            dir.insert(0, '_');
        }
        self.log_dir.join(dir).join(format!("{script_name}.log"))
    }

    /// How many hooks (process groups) are running now.
    pub fn running(&self) -> usize {
        lock(&self.registry).groups.len()
    }

    /// The fence action: SIGKILL to the process group of every hook running
    /// now. Runs already under way do not start any further script (those are
    /// reported as refused). Returns how many groups were signalled.
    pub fn kill_all(&self) -> usize {
        let mut reg = lock(&self.registry);
        reg.generation = reg.generation.wrapping_add(1);
        let mut killed = 0;
        for (pgid, path) in &reg.groups {
            match killpg(Pid::from_raw(*pgid), Signal::SIGKILL) {
                Ok(()) => {
                    killed += 1;
                    tracing::warn!(pgid, script = %path.display(), "fence: killed hook process group");
                }
                Err(e) => {
                    tracing::warn!(pgid, script = %path.display(), error = %e, "fence: cannot kill hook process group");
                }
            }
        }
        killed
    }

    /// The last step of `cluster`'s fence: SIGKILL to every process in its
    /// hook cgroup, the daemons its hooks started included (those that left
    /// their hook's process group too). Returns how many there were; 0
    /// without a cgroup.
    pub fn kill_contained(&self, cluster: &str) -> usize {
        let Some(cgroup) = &self.cgroup else {
            return 0;
        };
        let killed = cgroup.kill(cluster);
        if killed > 0 {
            tracing::warn!(killed, cluster, cgroup = %cgroup.dir().display(), "fence: killed every process in the cluster's hook cgroup");
        }
        killed
    }

    /// Makes `cmd` run where hooks run: between fork and exec it enters the
    /// host's cgroup namespace, joins the cgroups whose `cgroup.procs` are
    /// `procs` (in order), then enters the host's other namespaces (each
    /// step only when configured). A step that fails fails the spawn.
    fn place(&self, cmd: &mut Command, procs: Vec<CString>) {
        let host = self.host.clone();
        if procs.is_empty() && host.is_none() {
            return;
        }
        let root = c"/".to_owned();
        #[allow(unsafe_code)]
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only async-signal-safe calls (setns, open, write, close,
        // chdir) on values allocated before the fork; it allocates nothing
        // and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(host) = &host {
                    host.enter_cgroup()?;
                }
                for procs in &procs {
                    crate::cgroup::join(procs)?;
                }
                if let Some(host) = &host {
                    host.enter_rest(&root)?;
                }
                Ok(())
            });
        }
    }

    /// Where the agent reads the files its hooks run: with the hooks in
    /// the host's namespaces, the host's `/` (`/proc/<pid>/root`), since
    /// the script and every directory on its way are the host's (in a pod,
    /// the agent's own `/tmp` or `/etc` are other directories); otherwise
    /// `/`.
    fn host_root(&self) -> PathBuf {
        self.host
            .as_ref()
            .map_or_else(|| PathBuf::from("/"), |h| h.host_path(Path::new("/")))
    }

    /// The fence's reset hook (`fence.resetHook`, action `ResetHook`):
    /// `path fence`, checked like every hook script ([`check_script`], on
    /// the host's file), in
    /// the host's namespaces like every hook (outside the hook cgroup, which
    /// the fence has just emptied), with only `PATH` in its environment,
    /// its output appended to `log`, and killed with its process group past
    /// `timeout`. Returns how it ended, in words, for the fence log.
    pub async fn run_reset(&self, path: &Path, log: &Path, timeout: Duration) -> String {
        // The script is the host's file: checked where the agent sees it,
        // every directory from the host's `/` down to it.
        if let Err(e) = check_script_at(&self.host_root(), path, None) {
            return format!("refused, not run: {e}");
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log);
        let (stdout, stderr) = match out.as_ref().map(|f| (f.try_clone(), f.try_clone())) {
            Ok((Ok(a), Ok(b))) => (Stdio::from(a), Stdio::from(b)),
            _ => (Stdio::null(), Stdio::null()),
        };
        let mut cmd = Command::new(path);
        cmd.arg("fence")
            .env_clear()
            .env("PATH", super::HOOK_PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(true);
        self.place(&mut cmd, Vec::new());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return format!("could not start: {e}"),
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(Ok(status)) => format!("ended: {status}"),
            Ok(Err(e)) => format!("cannot collect its exit status: {e}"),
            Err(_) => {
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = child.wait().await;
                format!(
                    "timed out after {} ms; its process group was killed",
                    timeout.as_millis()
                )
            }
        }
    }

    /// Runs the action's scripts of a hook set in order, each with `timeout`.
    ///
    /// Enter and monitor stop at the first result that is not a success (the
    /// later scripts are not run); leave and periodic run every script even
    /// after a failure (stopping must go as far as it can). When the scripts
    /// cannot be listed, the one result is a refusal naming the problem. When
    /// [`HookRunner::kill_all`] fences the hooks during the run, the scripts
    /// not started yet are reported as refused and not run.
    pub async fn run(
        &self,
        set: &HookSet,
        ctx: &HookContext,
        timeout: Duration,
    ) -> Vec<HookResult> {
        let generation = lock(&self.registry).generation;
        let admitted = match self.admit(set, ctx).await {
            Ok(a) => a,
            Err(reason) => {
                tracing::warn!(action = %ctx.action, reason, "hook source refused; nothing run");
                return vec![refused(&set_name(set), ctx.action, Instant::now(), reason)];
            }
        };
        let set = &admitted.set;
        let root = admitted.root.as_deref();
        let scripts = match set.scripts(ctx.action) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(action = %ctx.action, error = %e, "hook scripts cannot be listed");
                return vec![refused(
                    &set_name(set),
                    ctx.action,
                    Instant::now(),
                    e.to_string(),
                )];
            }
        };
        let stop_on_failure = matches!(ctx.action, Action::Enter | Action::Monitor);
        let mut results = Vec::with_capacity(scripts.len());
        for script in &scripts {
            if lock(&self.registry).generation != generation {
                results.push(refused(
                    &script.name,
                    script.action,
                    Instant::now(),
                    format!("{NOTE} not run: the hooks were fenced (kill_all) during this run"),
                ));
                continue;
            }
            let result = self
                .run_script_in(script, ctx, timeout, generation, root)
                .await;
            let failed = result.outcome != HookOutcome::Success;
            results.push(result);
            if failed && stop_on_failure {
                break;
            }
        }
        results
    }

    /// Runs one script and reports how it ended. Never panics and never
    /// returns an error: problems become the result's outcome and tail.
    ///
    /// The script is checked with [`check_script_at`] as the namespaces it
    /// runs in see it ([`HookRunner::host_root`]; refused and not run when
    /// unsafe), then run as `[path, ACTION, ROLE]` (its own action, and the
    /// context's role) in its own process group, with stdin from /dev/null,
    /// working directory `/`, and only `PATH` and the `KUBEHA_*` variables in
    /// its environment. Its stdout and stderr are appended to its log file
    /// after a header line. Past `timeout` the whole group gets SIGTERM, then
    /// after the kill grace (or as soon as the script itself has exited)
    /// SIGKILL, and the outcome is `TimedOut`. Processes the script leaves
    /// behind in its group after a normal exit (daemons it started) are left
    /// alone. Dropping the returned future kills the script's process group.
    pub async fn run_script(
        &self,
        script: &Script,
        ctx: &HookContext,
        timeout: Duration,
    ) -> HookResult {
        let generation = lock(&self.registry).generation;
        self.run_script_in(script, ctx, timeout, generation, None)
            .await
    }

    /// [`HookRunner::run_script`], the script checked to stay inside
    /// `root` when set.
    async fn run_script_in(
        &self,
        script: &Script,
        ctx: &HookContext,
        timeout: Duration,
        generation: u64,
        root: Option<&Path>,
    ) -> HookResult {
        let started = Instant::now();
        let action = script.action;
        let role = role_str(ctx.role);
        let header = format!(
            "===== {} {action} {role} epoch={} transition={} service={} =====\n",
            jiff::Timestamp::now(),
            ctx.epoch,
            ctx.transition.map(Transition::as_str).unwrap_or("-"),
            ctx.service,
        );
        let log_path = self.log_path(&ctx.service, &script.name);
        let mut log = match open_log(&log_path, self.log_cap_bytes, &header) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(path = %log_path.display(), error = %e, "hook log unavailable; output discarded");
                None
            }
        };

        if let Err(e) = check_script_at(&self.host_root(), &script.path, root) {
            let reason = e.to_string();
            tracing::warn!(script = %script.path.display(), reason, "hook script refused");
            if let Some(l) = &mut log {
                let _ = writeln!(l.file, "{NOTE} refused, not run: {reason}");
            }
            return refused(&script.name, action, started, reason);
        }

        // Output goes through pipes the agent reads (hooks::runlog::Capture):
        // at most the log cap per run reaches the disk, the rest is read
        // and dropped, so neither the disk nor the script's writes fill up.
        let capture = Capture::new(
            log.as_ref().and_then(|l| l.file.try_clone().ok()),
            self.log_cap_bytes,
        );
        // argv[0] is the path itself (Command sets it from the program).
        let mut cmd = Command::new(&script.path);
        cmd.args(script.argv(ctx.role).into_iter().skip(1))
            .env_clear()
            .envs(ctx.env())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // Into the cluster's hook cgroup between fork and exec, so nothing
        // the script starts is ever outside it. When it cannot be created the
        // script still runs, contained by its process group only; when the
        // child cannot join it, the script is not started (refused).
        let procs = match self.cgroup.as_ref().map(|c| (c, c.procs(&ctx.cluster))) {
            None => Vec::new(),
            Some((c, Ok(path))) => std::iter::once(path)
                .chain(c.v1_roots().iter().cloned())
                .collect(),
            Some((c, Err(e))) => {
                tracing::warn!(cgroup = %c.dir().display(), error = %e, "hook cgroup unavailable: this hook runs outside it");
                Vec::new()
            }
        };
        self.place(&mut cmd, procs);
        // A non-root user (spec.hooks.runAsUser, allowed by the policy in
        // admit): its credentials are taken last, after the steps above.
        if let Some(uid) = ctx.run_as_user {
            let run_as = match u32::try_from(uid) {
                Ok(uid) => super::RunAs::of(uid),
                Err(_) => {
                    let reason = format!(
                        "{NOTE} refused, not run: spec.hooks.runAsUser {uid} is no user id; give one from 1 to 2147483647"
                    );
                    return refused(&script.name, action, started, reason);
                }
            };
            if let Err(why) = run_as.check_script(&script.path) {
                tracing::warn!(script = %script.path.display(), why, "hook script refused");
                if let Some(l) = &mut log {
                    let _ = writeln!(l.file, "{NOTE} refused, not run: {why}");
                }
                return refused(&script.name, action, started, why);
            }
            run_as.apply(&mut cmd);
        }

        // Spawn and register under the lock, so kill_all either sees this
        // group or has already fenced (and then nothing is started).
        let spawned = {
            let mut reg = lock(&self.registry);
            if reg.generation != generation {
                Err(format!(
                    "{NOTE} not run: the hooks were fenced (kill_all) before it started"
                ))
            } else {
                match cmd.spawn() {
                    Err(e) => Err(format!(
                        "{NOTE} could not start {}: {e}",
                        script.path.display()
                    )),
                    Ok(child) => match child.id().map(i32::try_from) {
                        Some(Ok(pid)) => {
                            reg.groups.insert(pid, script.path.clone());
                            Ok((child, pid))
                        }
                        _ => Err(format!(
                            "{NOTE} could not start {}: no pid",
                            script.path.display()
                        )),
                    },
                }
            }
        };
        // The parent's copies of the pipes' write ends close with the
        // command, so the relays see the end of the output.
        drop(cmd);
        let (mut child, pid) = match spawned {
            Ok(c) => c,
            Err(reason) => {
                tracing::warn!(script = %script.path.display(), reason, "hook script not started");
                if let Some(l) = &mut log {
                    let _ = writeln!(l.file, "{reason}");
                }
                return refused(&script.name, action, started, reason);
            }
        };
        let guard = GroupGuard {
            registry: self.registry.clone(),
            pgid: pid,
            done: false,
        };
        tracing::info!(script = %script.path.display(), %action, role, pid, "hook started");
        let relays: Vec<_> = [
            child
                .stdout
                .take()
                .map(|o| tokio::spawn(super::runlog::relay(o, capture.clone()))),
            child
                .stderr
                .take()
                .map(|e| tokio::spawn(super::runlog::relay(e, capture.clone()))),
        ]
        .into_iter()
        .flatten()
        .collect();

        let mut exited = LeaderExit::watch(Pid::from_raw(pid));
        let mut notes = Vec::new();
        let mut timed_out = false;
        let mut stuck = false;
        if !exited.wait(timeout).await {
            timed_out = true;
            let group = Pid::from_raw(pid);
            let _ = killpg(group, Signal::SIGTERM);
            exited.wait(self.kill_grace).await;
            // Leftovers (and a leader that ignored SIGTERM) get SIGKILL; the
            // leader is alive or a zombie, so the group id is still ours.
            let _ = killpg(group, Signal::SIGKILL);
            notes.push(format!(
                "{NOTE} timed out after {} ms; sent SIGTERM, then SIGKILL, to process group {pid}",
                timeout.as_millis()
            ));
            if !exited
                .wait(self.kill_grace.max(Duration::from_secs(1)))
                .await
            {
                stuck = true;
            }
            tracing::warn!(script = %script.path.display(), pid, "hook timed out; process group killed");
        }
        guard.finish();
        let ending = if stuck {
            // Dropping the child hands it to tokio's background reaper.
            drop(child);
            Ending::Stuck
        } else {
            match child.wait().await {
                Ok(status) => Ending::Exited(status),
                Err(e) => Ending::WaitFailed(e),
            }
        };

        let (exit_code, mut outcome) = match &ending {
            Ending::Exited(status) => match (status.code(), status.signal()) {
                (Some(code), _) => (Some(code), outcome_for_code(action, code)),
                (None, sig) => {
                    if !timed_out {
                        let name = sig
                            .and_then(|s| Signal::try_from(s).ok())
                            .map(Signal::as_str)
                            .unwrap_or("unknown signal");
                        notes.push(format!("{NOTE} killed by {name}"));
                    }
                    (None, HookOutcome::Failed)
                }
            },
            Ending::WaitFailed(e) => {
                notes.push(format!("{NOTE} cannot collect exit status: {e}"));
                (None, HookOutcome::Failed)
            }
            Ending::Stuck => {
                notes.push(format!(
                    "{NOTE} process {pid} still alive after SIGKILL (uninterruptible sleep?)"
                ));
                (None, HookOutcome::Failed)
            }
        };
        if timed_out {
            outcome = HookOutcome::TimedOut;
        }
        let elapsed = started.elapsed();

        // The output still in the pipes; daemons the script started keep
        // them open (their output is relayed on, within this run's cap).
        let _ = tokio::time::timeout(OUTPUT_DRAIN, futures::future::join_all(relays)).await;
        let (tail_text, (logged, discarded)) = {
            let c = lock(&capture);
            let keep = self.tail_lines.min(MAX_TAIL_LINES);
            (c.tail_lines(keep), c.counts())
        };
        if discarded > 0 {
            notes.push(format!(
                "{NOTE} output past the log cap of {} bytes: {logged} bytes logged, {discarded} more read and discarded",
                self.log_cap_bytes
            ));
        }
        if log.is_none() {
            notes.push(format!(
                "{NOTE} log file {} unavailable; output not logged",
                log_path.display()
            ));
        }
        let keep = self.tail_lines.min(MAX_TAIL_LINES);
        let mut tail: Vec<String> = tail_text
            .into_iter()
            .rev()
            .take(keep.saturating_sub(notes.len()))
            .rev()
            .collect();
        tail.extend(notes.iter().map(|n| clip(n)));
        let skip = tail.len().saturating_sub(keep);
        let output_tail: Vec<String> = tail.into_iter().skip(skip).collect();

        let summary = match exit_code {
            Some(c) => format!("exit {c}"),
            None => "no exit code".to_owned(),
        };
        if let Some(l) = &mut log {
            for n in &notes {
                let _ = writeln!(l.file, "{n}");
            }
            let _ = writeln!(
                l.file,
                "===== {} {summary}, {outcome:?} after {} ms =====",
                jiff::Timestamp::now(),
                elapsed.as_millis()
            );
        }
        tracing::info!(script = %script.path.display(), %action, ?outcome, ?exit_code, ms = elapsed.as_millis() as u64, "hook finished");

        HookResult {
            script: script.name.clone(),
            action: action.as_str().to_owned(),
            exit_code,
            outcome,
            duration_ms: millis(elapsed),
            finished_at: Some(Time(jiff::Timestamp::now())),
            output_tail,
        }
    }
}

/// What a result names a hook set by when no script of it was listed: its
/// single script, or its directory.
fn set_name(set: &HookSet) -> String {
    match &set.layout {
        HookLayout::SingleScript(n) => n.clone(),
        HookLayout::Directory => set.dir.display().to_string(),
    }
}

/// A result for a script that was not run.
pub(super) fn refused(name: &str, action: Action, started: Instant, reason: String) -> HookResult {
    HookResult {
        script: name.to_owned(),
        action: action.as_str().to_owned(),
        exit_code: None,
        outcome: HookOutcome::Refused,
        duration_ms: millis(started.elapsed()),
        finished_at: Some(Time(jiff::Timestamp::now())),
        output_tail: vec![clip(&reason)],
    }
}

pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Watches a child for its exit without reaping it: while it is a zombie its
/// pid, and so its process group id, cannot be reused.
pub(super) struct LeaderExit {
    handle: tokio::task::JoinHandle<()>,
    exited: bool,
}

impl LeaderExit {
    fn watch(pid: Pid) -> Self {
        LeaderExit {
            handle: tokio::task::spawn_blocking(move || wait_exited(pid)),
            exited: false,
        }
    }

    /// Waits up to `limit`; whether the child has exited.
    async fn wait(&mut self, limit: Duration) -> bool {
        if !self.exited {
            // A join error (the runtime shutting down) counts as exited: the
            // reap that follows then tells.
            self.exited = tokio::time::timeout(limit, &mut self.handle).await.is_ok();
        }
        self.exited
    }
}

/// Blocks until the process has exited, without reaping it.
pub(super) fn wait_exited(pid: Pid) {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(Errno::EINTR) => continue,
            // A zombie now, or (ECHILD) already reaped.
            _ => return,
        }
    }
}
