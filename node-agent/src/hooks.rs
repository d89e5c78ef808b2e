//! The hook runner: finds a service's hook scripts, checks that they are safe
//! to run as root, runs them as argv (never through a shell) in their own
//! process group with a cleared environment, logs their output to one
//! size-capped file per script, enforces their timeout by signalling the whole
//! process group, and maps their exit codes onto [`HookOutcome`].
//!
//! The contract (DESIGN.md, "Roles, transitions and hooks"): every script is
//! called as `script ACTION ROLE`; the `KUBEHA_*` environment describes the
//! transition; exit 0 is success, 1 an illegal call, 2 a wrong or changed
//! configuration (both permanent), 7 from a monitor script means "not
//! running", anything else is a failure.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kubeha_crds::service::{HookOutcome, HookResult, Role};

use crate::cgroup::HookCgroup;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// The `PATH` every hook script gets (the rest of the environment is cleared).
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Default size at which a script's log file is rotated (1 MiB).
pub const DEFAULT_LOG_CAP_BYTES: u64 = 1024 * 1024;

/// Default number of output lines kept in a [`HookResult`].
pub const DEFAULT_TAIL_LINES: usize = 10;

/// Default time between SIGTERM and SIGKILL when a script overruns.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// Most output lines a [`HookResult`] may carry (the API schema's limit).
pub const MAX_TAIL_LINES: usize = 20;

/// Longest output line (in characters) kept in a [`HookResult`]; longer lines
/// are cut and end in `…`.
pub const MAX_LINE_CHARS: usize = 1024;

/// How much of a run's output is read back to find its last lines.
const TAIL_READ_MAX: u64 = 64 * 1024;

/// Prefix of the lines the agent itself adds to a result's output tail.
const NOTE: &str = "kubeha:";

/// What a hook script is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Enter a role (start the service when entering master).
    Enter,
    /// Leave a role (stop the service when leaving master).
    Leave,
    /// Check that the service runs (on the active node, every interval).
    Monitor,
    /// Periodic check on every member with its current role.
    Periodic,
}

impl Action {
    /// Every action, in the order of the contract.
    pub const ALL: [Action; 4] = [
        Action::Enter,
        Action::Leave,
        Action::Monitor,
        Action::Periodic,
    ];

    /// The word passed as the script's first argument: `enter`, `leave`,
    /// `monitor` or `periodic`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Enter => "enter",
            Action::Leave => "leave",
            Action::Monitor => "monitor",
            Action::Periodic => "periodic",
        }
    }

    /// The letter that starts this action's script names in a hook directory
    /// (`E01name`, `L01name`, `M01name`, `P01name`).
    pub fn prefix(self) -> char {
        match self {
            Action::Enter => 'E',
            Action::Leave => 'L',
            Action::Monitor => 'M',
            Action::Periodic => 'P',
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = HookError;

    /// Parses `enter`, `leave`, `monitor` or `periodic` (as `kubeha-agent
    /// hooks run SERVICE ACTION` takes them).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| HookError::UnknownAction(s.to_owned()))
    }
}

/// The kind of role change, as the classic failover scripts name it
/// (exported to scripts as `KUBEHA_TRANSITION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transition {
    /// Start the service on a backup node.
    TakeOver,
    /// Start the service on its primary node.
    TakeBack,
    /// Stop the service on its primary node.
    GiveAway,
    /// Stop the service on a backup node.
    GiveBack,
}

impl Transition {
    /// `takeover`, `takeback`, `giveaway` or `giveback`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::TakeOver => "takeover",
            Transition::TakeBack => "takeback",
            Transition::GiveAway => "giveaway",
            Transition::GiveBack => "giveback",
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transition an action means on this node: entering on the primary node
/// is a takeback, on a backup node a takeover; leaving on the primary node is a
/// giveaway, on a backup node a giveback. Monitor and periodic runs are no
/// transition.
pub fn transition(action: Action, node_is_primary: bool) -> Option<Transition> {
    match (action, node_is_primary) {
        (Action::Enter, true) => Some(Transition::TakeBack),
        (Action::Enter, false) => Some(Transition::TakeOver),
        (Action::Leave, true) => Some(Transition::GiveAway),
        (Action::Leave, false) => Some(Transition::GiveBack),
        (Action::Monitor | Action::Periodic, _) => None,
    }
}

/// The script argument for a role: `master`, `vicemaster` or `none` (the same
/// words `Role` serialises to).
pub fn role_str(role: Role) -> &'static str {
    match role {
        Role::Master => "master",
        Role::Vicemaster => "vicemaster",
        Role::None => "none",
    }
}

/// Why a hook could not be listed or is not safe to run.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook directory could not be read.
    #[error("cannot read hook directory {}: {source}; check the service's hook source", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The script does not exist (or is a dangling symlink).
    #[error("hook script {} does not exist (or is a dangling symlink); create it or fix the hook configuration", path.display())]
    NotFound {
        /// The script's path.
        path: PathBuf,
    },
    /// The script could not be inspected.
    #[error("cannot inspect hook script {}: {source}", path.display())]
    Io {
        /// The script's path.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The script (or the directory holding it) is not safe to run as root.
    /// Every reason names the path and the command that fixes it.
    #[error("hook script refused: {}", reasons.join("; "))]
    Unsafe {
        /// The script's path as configured.
        path: PathBuf,
        /// What is wrong, each with its fix.
        reasons: Vec<String>,
    },
    /// A single-script layout names something other than a plain file name.
    #[error(
        "invalid hook script name {name:?}: give a plain file name inside the hook directory (no '/', not '.' or '..')"
    )]
    InvalidScriptName {
        /// The name as configured.
        name: String,
    },
    /// An action word that is not part of the contract.
    #[error("unknown hook action {0:?}; expected enter, leave, monitor or periodic")]
    UnknownAction(String),
}

/// How a service's hook scripts are laid out in its hook directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookLayout {
    /// Scripts named `<Letter><two digits><name>` (`E01server`, `L01server`,
    /// `M01check`, `P01stopped`), run in lexical order.
    Directory,
    /// One script (`ha.sh` style) in the hook directory, called for every
    /// action with the action as its first argument.
    SingleScript(String),
}

/// A service's hook scripts: where they are and how they are laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookSet {
    /// The directory holding the scripts.
    pub dir: PathBuf,
    /// Directory of `E<nn>`/`L<nn>`/`M<nn>`/`P<nn>` scripts, or one script.
    pub layout: HookLayout,
}

/// One script to run for one action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    /// Where the script is.
    pub path: PathBuf,
    /// Its file name (names its log file and its [`HookResult`]).
    pub name: String,
    /// The action it is run for (its first argument).
    pub action: Action,
}

impl Script {
    /// The argv the script is run with: `[path, ACTION, ROLE]`, for both
    /// layouts.
    pub fn argv(&self, role: Role) -> Vec<OsString> {
        vec![
            self.path.clone().into_os_string(),
            OsString::from(self.action.as_str()),
            OsString::from(role_str(role)),
        ]
    }
}

impl HookSet {
    /// The scripts to run for `action`, in the order to run them.
    ///
    /// Directory layout: the entries named `<Letter><two digits><name>` (the
    /// letter of `action`, a non-empty name) in lexical byte order, so
    /// `E01backup`, `E01server`, `E02client`. Other names (`README`, `E1x`,
    /// lower-case letters) and editor or package-manager leftovers
    /// (`E01server~`, `.bak`, `.orig`, `.swp`, `.rpmnew`, `.rpmsave`,
    /// `.rpmorig`, `.dpkg-*`) are ignored, as are directories. Anything else
    /// that matches (a regular file, but also a dangling symlink or a FIFO) is
    /// listed so that [`check_script`] refuses it loudly rather than a start
    /// script being skipped in silence.
    ///
    /// Single-script layout: that one file, whatever the action.
    pub fn scripts(&self, action: Action) -> Result<Vec<Script>, HookError> {
        match &self.layout {
            HookLayout::SingleScript(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(HookError::InvalidScriptName { name: name.clone() });
                }
                Ok(vec![Script {
                    path: self.dir.join(name),
                    name: name.clone(),
                    action,
                }])
            }
            HookLayout::Directory => {
                let read_err = |source| HookError::ReadDir {
                    path: self.dir.clone(),
                    source,
                };
                let mut found = Vec::new();
                for entry in fs::read_dir(&self.dir).map_err(read_err)? {
                    let entry = entry.map_err(read_err)?;
                    let Ok(name) = entry.file_name().into_string() else {
                        continue;
                    };
                    if !matches_script_name(&name, action.prefix()) {
                        continue;
                    }
                    let path = entry.path();
                    // Follows symlinks; a dangling one stays listed.
                    if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
                        continue;
                    }
                    found.push(Script { path, name, action });
                }
                found.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
                Ok(found)
            }
        }
    }
}

/// Whether `name` is `<letter><digit><digit><name>` and not a backup copy.
fn matches_script_name(name: &str, letter: char) -> bool {
    let [first, d1, d2, rest @ ..] = name.as_bytes() else {
        return false;
    };
    if char::from(*first) != letter
        || !d1.is_ascii_digit()
        || !d2.is_ascii_digit()
        || rest.is_empty()
    {
        return false;
    }
    const LEFTOVERS: [&str; 7] = [
        ".bak", ".orig", ".swp", ".rpmnew", ".rpmsave", ".rpmorig", "~",
    ];
    !(LEFTOVERS.iter().any(|s| name.ends_with(s)) || name.contains(".dpkg-"))
}

/// Checks that a script is safe to run as root: the file (after following
/// symlinks) is a regular file, owned by root, not writable by group or
/// others, and executable; and the directory holding it is owned by root and
/// not writable by group or others (unless sticky), so that nobody else can
/// replace it. Every problem found is reported with the command that fixes it.
pub fn check_script(path: &Path) -> Result<(), HookError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(HookError::NotFound {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(HookError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let target = fs::canonicalize(path).map_err(|source| HookError::Io {
        path: path.to_owned(),
        source,
    })?;
    let shown = if target == path {
        path.display().to_string()
    } else {
        format!("{} (-> {})", path.display(), target.display())
    };
    let fixed = target.display();
    let mut reasons = Vec::new();

    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        reasons.push(format!(
            "{shown} is {kind}; a hook must be a regular executable file"
        ));
        return Err(HookError::Unsafe {
            path: path.to_owned(),
            reasons,
        });
    }
    if meta.uid() != 0 {
        reasons.push(format!(
            "{shown} is owned by uid {}, not root; run chown root {fixed}",
            meta.uid()
        ));
    }
    if let Some(who) = writable_by(meta.mode()) {
        reasons.push(format!("{shown} is {who}; run chmod g-w,o-w {fixed}"));
    }
    if meta.mode() & 0o111 == 0 {
        reasons.push(format!("{shown} is not executable; run chmod u+x {fixed}"));
    }
    if let Some(dir) = target.parent() {
        match fs::metadata(dir) {
            Ok(d) => {
                if d.uid() != 0 {
                    reasons.push(format!(
                        "directory {} holding {shown} is owned by uid {}, not root; run chown root {}",
                        dir.display(),
                        d.uid(),
                        dir.display()
                    ));
                }
                let sticky = d.mode() & 0o1000 != 0;
                if let (false, Some(who)) = (sticky, writable_by(d.mode())) {
                    reasons.push(format!(
                        "directory {} holding {shown} is {who}; run chmod g-w,o-w {}",
                        dir.display(),
                        dir.display()
                    ));
                }
            }
            Err(source) => {
                return Err(HookError::Io {
                    path: dir.to_owned(),
                    source,
                });
            }
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(HookError::Unsafe {
            path: path.to_owned(),
            reasons,
        })
    }
}

/// "group-writable", "writable by others", both, or nothing.
fn writable_by(mode: u32) -> Option<&'static str> {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => Some("group-writable and writable by others"),
        (true, false) => Some("group-writable"),
        (false, true) => Some("writable by others"),
        (false, false) => None,
    }
}

/// What a hook run is about; becomes the script's `KUBEHA_*` environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookContext {
    /// The action (picks the scripts in [`HookRunner::run`]).
    pub action: Action,
    /// The role entered, left or held (the script's second argument).
    pub role: Role,
    /// The transition (`KUBEHA_TRANSITION`, empty when none).
    pub transition: Option<Transition>,
    /// The service, `namespace/name` (`KUBEHA_SERVICE`).
    pub service: String,
    /// The HACluster (`KUBEHA_CLUSTER`).
    pub cluster: String,
    /// This node (`KUBEHA_NODE`).
    pub node: String,
    /// The service's primary node (`KUBEHA_PRIMARY_NODE`).
    pub primary_node: String,
    /// The other members (`KUBEHA_PEERS`, comma-separated).
    pub peers: Vec<String>,
    /// The service's virtual IPs (`KUBEHA_VIPS`, comma-separated).
    pub vips: Vec<String>,
    /// The interface the VIPs go on (`KUBEHA_INTERFACE`).
    pub interface: String,
    /// The epoch acted on (`KUBEHA_EPOCH`).
    pub epoch: i64,
    /// Hash of the spec acted on (`KUBEHA_CONFIG_CHECKSUM`).
    pub config_checksum: String,
}

impl HookContext {
    /// The whole environment a script gets: `PATH` and the `KUBEHA_*`
    /// variables, nothing else.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PATH", HOOK_PATH.to_owned()),
            (
                "KUBEHA_TRANSITION",
                self.transition
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
            ),
            ("KUBEHA_SERVICE", self.service.clone()),
            ("KUBEHA_CLUSTER", self.cluster.clone()),
            ("KUBEHA_NODE", self.node.clone()),
            ("KUBEHA_PRIMARY_NODE", self.primary_node.clone()),
            ("KUBEHA_PEERS", self.peers.join(",")),
            ("KUBEHA_VIPS", self.vips.join(",")),
            ("KUBEHA_INTERFACE", self.interface.clone()),
            ("KUBEHA_EPOCH", self.epoch.to_string()),
            ("KUBEHA_CONFIG_CHECKSUM", self.config_checksum.clone()),
        ]
    }
}

/// Success when every result is a success (or there are none), else the
/// first outcome that is not.
pub fn overall(results: &[HookResult]) -> HookOutcome {
    results
        .iter()
        .map(|r| r.outcome)
        .find(|o| *o != HookOutcome::Success)
        .unwrap_or(HookOutcome::Success)
}

/// Whether an outcome is permanent for this node (illegal call, configuration
/// error): no retry here.
pub fn is_permanent(outcome: HookOutcome) -> bool {
    matches!(outcome, HookOutcome::IllegalCall | HookOutcome::ConfigError)
}

/// Maps an exit code onto the contract's outcomes.
fn outcome_for_code(action: Action, code: i32) -> HookOutcome {
    match (code, action) {
        (0, _) => HookOutcome::Success,
        (1, _) => HookOutcome::IllegalCall,
        (2, _) => HookOutcome::ConfigError,
        (7, Action::Monitor) => HookOutcome::NotRunning,
        _ => HookOutcome::Failed,
    }
}

/// The process groups of the hooks running now, and the fence generation
/// (bumped by every [`HookRunner::kill_all`]).
#[derive(Debug, Default)]
struct Registry {
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
    registry: Arc<Mutex<Registry>>,
}

/// Removes a hook's process group from the registry when the run finishes;
/// if the run is abandoned (its future dropped), kills the group first so no
/// hook runs unsupervised.
struct GroupGuard {
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

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

/// An open log file and where this run's output starts in it.
struct RunLog {
    file: File,
    path: PathBuf,
    start: u64,
}

/// How the process ended, before mapping to an outcome.
enum Ending {
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
            registry: Arc::default(),
        }
    }

    /// Runs every hook in `cgroup`, so [`HookRunner::kill_contained`] stops
    /// what hooks started even outside their process groups.
    pub fn with_cgroup(mut self, cgroup: HookCgroup) -> Self {
        self.cgroup = Some(Arc::new(cgroup));
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
        let scripts = match set.scripts(ctx.action) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(service = %ctx.service, action = %ctx.action, error = %e, "hook scripts cannot be listed");
                let name = match &set.layout {
                    HookLayout::SingleScript(n) => n.clone(),
                    HookLayout::Directory => set.dir.display().to_string(),
                };
                return vec![refused(&name, ctx.action, Instant::now(), e.to_string())];
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
            let result = self.run_script_in(script, ctx, timeout, generation).await;
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
    /// The script is checked with [`check_script`] (refused and not run when
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
        self.run_script_in(script, ctx, timeout, generation).await
    }

    async fn run_script_in(
        &self,
        script: &Script,
        ctx: &HookContext,
        timeout: Duration,
        generation: u64,
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

        if let Err(e) = check_script(&script.path) {
            let reason = e.to_string();
            tracing::warn!(service = %ctx.service, script = %script.path.display(), reason, "hook script refused");
            if let Some(l) = &mut log {
                let _ = writeln!(l.file, "{NOTE} refused, not run: {reason}");
            }
            return refused(&script.name, action, started, reason);
        }

        let (stdout, stderr) = match &log {
            Some(l) => match (l.file.try_clone(), l.file.try_clone()) {
                (Ok(a), Ok(b)) => (Stdio::from(a), Stdio::from(b)),
                _ => (Stdio::null(), Stdio::null()),
            },
            None => (Stdio::null(), Stdio::null()),
        };
        // argv[0] is the path itself (Command sets it from the program).
        let mut cmd = Command::new(&script.path);
        cmd.args(script.argv(ctx.role).into_iter().skip(1))
            .env_clear()
            .envs(ctx.env())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        // Into the cluster's hook cgroup between fork and exec, so nothing
        // the script starts is ever outside it. When it cannot be opened the
        // script still runs, contained by its process group only; when the
        // child cannot join it, the script is not started (refused).
        let procs = self.cgroup.as_ref().and_then(|c| match c.procs(&ctx.cluster) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(cgroup = %c.dir().display(), error = %e, "hook cgroup unavailable: this hook runs outside it");
                None
            }
        });
        if let Some(procs) = &procs {
            let fd = procs.as_raw_fd();
            #[allow(unsafe_code)]
            // SAFETY: the closure runs in the child between fork and exec and
            // makes one write(2) (async-signal-safe, no allocation, no lock)
            // to a descriptor the parent keeps open until after the spawn.
            unsafe {
                cmd.pre_exec(move || crate::cgroup::join(fd));
            }
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
        drop(procs);
        let (mut child, pid) = match spawned {
            Ok(c) => c,
            Err(reason) => {
                tracing::warn!(service = %ctx.service, script = %script.path.display(), reason, "hook script not started");
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
        tracing::info!(service = %ctx.service, script = %script.path.display(), %action, role, pid, "hook started");

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
            tracing::warn!(service = %ctx.service, script = %script.path.display(), pid, "hook timed out; process group killed");
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

        let keep = self.tail_lines.min(MAX_TAIL_LINES);
        let mut tail = match &log {
            Some(l) => read_tail(&l.file, l.start, keep.saturating_sub(notes.len()))
                .unwrap_or_else(|e| vec![format!("{NOTE} cannot read {}: {e}", l.path.display())]),
            None => vec![format!(
                "{NOTE} log file {} unavailable; output discarded",
                log_path.display()
            )],
        };
        tail.extend(notes.iter().cloned());
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
        tracing::info!(service = %ctx.service, script = %script.path.display(), %action, ?outcome, ?exit_code, ms = elapsed.as_millis() as u64, "hook finished");

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

/// A result for a script that was not run.
fn refused(name: &str, action: Action, started: Instant, reason: String) -> HookResult {
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

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Watches a child for its exit without reaping it: while it is a zombie its
/// pid, and so its process group id, cannot be reused.
struct LeaderExit {
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
fn wait_exited(pid: Pid) {
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Err(Errno::EINTR) => continue,
            // A zombie now, or (ECHILD) already reaped.
            _ => return,
        }
    }
}

/// Opens (creating) a script's log file for appending, rotating it to
/// `.log.1` first when the header would take it past the cap, and writes the
/// header. Symlinks are not followed.
fn open_log(path: &Path, cap: u64, header: &str) -> io::Result<RunLog> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
    }
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.len() > 0
        && meta.len().saturating_add(header.len() as u64) > cap
    {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        fs::rename(path, PathBuf::from(old))?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    file.write_all(header.as_bytes())?;
    let start = file.metadata()?.len();
    Ok(RunLog {
        file,
        path: path.to_owned(),
        start,
    })
}

/// The last `max_lines` lines written to `file` after `start` (this run's
/// output), each cut at [`MAX_LINE_CHARS`].
fn read_tail(file: &File, start: u64, max_lines: usize) -> io::Result<Vec<String>> {
    if max_lines == 0 {
        return Ok(Vec::new());
    }
    let end = file.metadata()?.len();
    if end <= start {
        return Ok(Vec::new());
    }
    let from = start.max(end - TAIL_READ_MAX.min(end));
    let len = usize::try_from(end - from).unwrap_or(0);
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match file.read_at(rest, from + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.split('\n').collect();
    if from > start && !lines.is_empty() {
        // Started mid-line.
        lines.remove(0);
    }
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let skip = lines.len().saturating_sub(max_lines);
    Ok(lines
        .into_iter()
        .skip(skip)
        .map(|l| clip(l.trim_end_matches('\r')))
        .collect())
}

/// Cuts a line at [`MAX_LINE_CHARS`] characters.
fn clip(line: &str) -> String {
    match line.char_indices().nth(MAX_LINE_CHARS) {
        Some((at, _)) => format!("{}…", line.get(..at).unwrap_or(line)),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use tempfile::TempDir;

    /// Writes a `/bin/sh` script with the given mode.
    fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    fn ctx(action: Action) -> HookContext {
        HookContext {
            action,
            role: Role::Master,
            transition: transition(action, false),
            service: "shop/nfs".into(),
            cluster: "prod".into(),
            node: "node-b".into(),
            primary_node: "node-a".into(),
            peers: vec!["node-a".into(), "node-c".into()],
            vips: vec!["198.18.0.10/24".into(), "2001:db8::10/64".into()],
            interface: "eth0".into(),
            epoch: 7,
            config_checksum: "sha256:abc $(touch /tmp/kubeha-pwned) ;x".into(),
        }
    }

    fn dir_set(dir: &Path) -> HookSet {
        HookSet {
            dir: dir.to_owned(),
            layout: HookLayout::Directory,
        }
    }

    fn names(results: &[HookResult]) -> Vec<&str> {
        results.iter().map(|r| r.script.as_str()).collect()
    }

    /// Whether a process exists and is not a zombie.
    fn alive(pid: i32) -> bool {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('Z' | 'X') | None)
    }

    /// Whether a process is gone (or a zombie) within a second: SIGKILL is
    /// delivered asynchronously, so a just-killed process may take a moment.
    async fn dies(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(1);
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !alive(pid)
    }

    fn read_pid(path: &Path) -> i32 {
        fs::read_to_string(path)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid")
    }

    struct Fixture {
        hooks: TempDir,
        out: TempDir,
        _logs: TempDir,
        runner: HookRunner,
    }

    fn fixture() -> Fixture {
        let logs = tempfile::tempdir().expect("tempdir");
        Fixture {
            hooks: tempfile::tempdir().expect("tempdir"),
            out: tempfile::tempdir().expect("tempdir"),
            runner: HookRunner::new(logs.path().join("logs")),
            _logs: logs,
        }
    }

    #[test]
    fn transitions_follow_the_node_and_the_action() {
        assert_eq!(transition(Action::Enter, true), Some(Transition::TakeBack));
        assert_eq!(transition(Action::Enter, false), Some(Transition::TakeOver));
        assert_eq!(transition(Action::Leave, true), Some(Transition::GiveAway));
        assert_eq!(transition(Action::Leave, false), Some(Transition::GiveBack));
        assert_eq!(transition(Action::Monitor, true), None);
        assert_eq!(transition(Action::Periodic, false), None);
        assert_eq!(Transition::TakeOver.as_str(), "takeover");
        assert_eq!(Transition::GiveBack.to_string(), "giveback");
    }

    #[test]
    fn actions_have_words_and_letters() {
        let words: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(words, ["enter", "leave", "monitor", "periodic"]);
        let letters: String = Action::ALL.iter().map(|a| a.prefix()).collect();
        assert_eq!(letters, "ELMP");
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>().ok(), Some(a));
        }
        let err = "start".parse::<Action>().expect_err("unknown action");
        assert!(err.to_string().contains("\"start\""), "{err}");
        assert_eq!(role_str(Role::Vicemaster), "vicemaster");
        assert_eq!(role_str(Role::None), "none");
    }

    #[test]
    fn overall_and_permanence() {
        let r = |outcome| HookResult {
            script: "E01x".into(),
            action: "enter".into(),
            exit_code: None,
            outcome,
            duration_ms: 0,
            finished_at: None,
            output_tail: vec![],
        };
        assert_eq!(overall(&[]), HookOutcome::Success);
        assert_eq!(
            overall(&[r(HookOutcome::Success), r(HookOutcome::Success)]),
            HookOutcome::Success
        );
        assert_eq!(
            overall(&[
                r(HookOutcome::Success),
                r(HookOutcome::ConfigError),
                r(HookOutcome::Failed)
            ]),
            HookOutcome::ConfigError
        );
        assert!(is_permanent(HookOutcome::IllegalCall));
        assert!(is_permanent(HookOutcome::ConfigError));
        for o in [
            HookOutcome::Success,
            HookOutcome::NotRunning,
            HookOutcome::Failed,
            HookOutcome::TimedOut,
            HookOutcome::Refused,
        ] {
            assert!(!is_permanent(o), "{o:?}");
        }
    }

    #[test]
    fn log_paths_replace_slashes_and_stay_inside() {
        let runner = HookRunner::new("/var/log/kubeha");
        assert_eq!(
            runner.log_path("shop/nfs", "E01server"),
            Path::new("/var/log/kubeha/shop_nfs/E01server.log")
        );
        assert_eq!(
            runner.log_path("..", "E01x"),
            Path::new("/var/log/kubeha/_../E01x.log")
        );
        assert_eq!(runner.log_cap_bytes, 1024 * 1024);
        assert_eq!(runner.tail_lines, 10);
        assert_eq!(runner.kill_grace, Duration::from_secs(2));
    }

    #[tokio::test]
    async fn directory_scripts_run_in_lexical_order_and_others_are_ignored() {
        let f = fixture();
        let trace = f.out.path().join("order");
        for name in [
            "E02client",
            "E01server",
            "E01backup",
            "L01stop",
            "M01check",
            "P01sweep",
            "README",
            "E1x",
            "E01",
            "E01server~",
            "E01server.bak",
            "e01lower",
        ] {
            script(
                f.hooks.path(),
                name,
                &format!("echo {name} >> '{}'", trace.display()),
                0o755,
            );
        }
        fs::create_dir(f.hooks.path().join("E03dir")).expect("mkdir");
        let set = dir_set(f.hooks.path());
        let listed = |a| -> Vec<String> {
            set.scripts(a)
                .expect("list")
                .into_iter()
                .map(|s| s.name)
                .collect()
        };
        assert_eq!(
            listed(Action::Enter),
            ["E01backup", "E01server", "E02client"]
        );
        assert_eq!(listed(Action::Leave), ["L01stop"]);
        assert_eq!(listed(Action::Monitor), ["M01check"]);
        assert_eq!(listed(Action::Periodic), ["P01sweep"]);

        let results = f
            .runner
            .run(&set, &ctx(Action::Enter), Duration::from_secs(5))
            .await;
        assert_eq!(names(&results), ["E01backup", "E01server", "E02client"]);
        assert!(results.iter().all(|r| r.outcome == HookOutcome::Success
            && r.exit_code == Some(0)
            && r.action == "enter"
            && r.finished_at.is_some()));
        assert_eq!(
            fs::read_to_string(&trace).expect("trace"),
            "E01backup\nE01server\nE02client\n"
        );
    }

    #[tokio::test]
    async fn scripts_get_argv_and_only_the_kubeha_environment() {
        let f = fixture();
        let out = f.out.path();
        let path = script(
            f.hooks.path(),
            "E01env",
            &format!(
                "printf '%s\\n' \"$0\" \"$@\" > '{0}/argv'\nenv > '{0}/env'",
                out.display()
            ),
            0o755,
        );
        let results = f
            .runner
            .run(
                &dir_set(f.hooks.path()),
                &ctx(Action::Enter),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(overall(&results), HookOutcome::Success, "{results:?}");

        let argv = fs::read_to_string(out.join("argv")).expect("argv");
        assert_eq!(argv, format!("{}\nenter\nmaster\n", path.display()));

        let env: HashMap<String, String> = fs::read_to_string(out.join("env"))
            .expect("env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let want = [
            ("PATH", HOOK_PATH),
            ("KUBEHA_TRANSITION", "takeover"),
            ("KUBEHA_SERVICE", "shop/nfs"),
            ("KUBEHA_CLUSTER", "prod"),
            ("KUBEHA_NODE", "node-b"),
            ("KUBEHA_PRIMARY_NODE", "node-a"),
            ("KUBEHA_PEERS", "node-a,node-c"),
            ("KUBEHA_VIPS", "198.18.0.10/24,2001:db8::10/64"),
            ("KUBEHA_INTERFACE", "eth0"),
            ("KUBEHA_EPOCH", "7"),
            (
                "KUBEHA_CONFIG_CHECKSUM",
                "sha256:abc $(touch /tmp/kubeha-pwned) ;x",
            ),
        ];
        for (k, v) in want {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        // Only what the shell itself adds may appear besides ours.
        for k in env.keys() {
            assert!(
                want.iter().any(|(w, _)| w == k)
                    || ["PWD", "OLDPWD", "SHLVL", "_"].contains(&k.as_str()),
                "unexpected variable {k}"
            );
        }
        assert!(
            !Path::new("/tmp/kubeha-pwned").exists(),
            "a value went through a shell"
        );

        // No transition: the variable is there, empty.
        script(
            f.hooks.path(),
            "M01env",
            &format!("env > '{}/menv'", out.display()),
            0o755,
        );
        let results = f
            .runner
            .run(
                &dir_set(f.hooks.path()),
                &ctx(Action::Monitor),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(overall(&results), HookOutcome::Success, "{results:?}");
        let menv = fs::read_to_string(out.join("menv")).expect("menv");
        assert!(menv.lines().any(|l| l == "KUBEHA_TRANSITION="), "{menv}");
    }

    #[tokio::test]
    async fn log_has_header_and_output_and_is_rotated_at_the_cap() {
        let mut f = fixture();
        f.runner.log_cap_bytes = 300;
        let body = "echo \"run-$KUBEHA_EPOCH $(printf 'x%.0s' $(seq 1 100))\"\necho to-stderr >&2";
        let path = script(f.hooks.path(), "E01log", body, 0o755);
        let s = Script {
            path,
            name: "E01log".into(),
            action: Action::Enter,
        };
        let log = f.runner.log_path("shop/nfs", "E01log");
        let old = log.with_file_name("E01log.log.1");
        let mut c = ctx(Action::Enter);

        c.epoch = 1;
        let r1 = f.runner.run_script(&s, &c, Duration::from_secs(5)).await;
        assert_eq!(r1.outcome, HookOutcome::Success, "{r1:?}");
        let text = fs::read_to_string(&log).expect("log");
        let header = text.lines().next().expect("header");
        assert!(
            header.contains(" enter master epoch=1 transition=takeover service=shop/nfs"),
            "{header}"
        );
        assert!(text.contains("run-1 xxxx"), "{text}");
        assert!(text.contains("to-stderr"), "{text}");
        assert!(!old.exists());
        assert_eq!(r1.output_tail.len(), 2, "{:?}", r1.output_tail);
        assert!(r1.output_tail[0].starts_with("run-1 "));
        assert_eq!(r1.output_tail[1], "to-stderr");

        c.epoch = 2;
        let r2 = f.runner.run_script(&s, &c, Duration::from_secs(5)).await;
        assert_eq!(r2.outcome, HookOutcome::Success);
        let text = fs::read_to_string(&log).expect("log");
        let rotated = fs::read_to_string(&old).expect("rotated log");
        assert!(text.contains("run-2") && !text.contains("run-1"), "{text}");
        assert!(
            rotated.contains("run-1") && !rotated.contains("run-2"),
            "{rotated}"
        );
        // The tail is this run's output only.
        assert!(r2.output_tail.iter().all(|l| !l.contains("run-1")));

        c.epoch = 3;
        f.runner.run_script(&s, &c, Duration::from_secs(5)).await;
        let rotated = fs::read_to_string(&old).expect("rotated log");
        assert!(
            rotated.contains("run-2") && !rotated.contains("run-1"),
            "one old file only"
        );
        assert!(fs::metadata(&log).expect("log").len() <= 300);
    }

    #[tokio::test]
    async fn tail_keeps_the_last_lines_and_at_most_the_schema_limit() {
        let f = fixture();
        let path = script(f.hooks.path(), "E01many", "seq 1 30", 0o755);
        let s = Script {
            path,
            name: "E01many".into(),
            action: Action::Enter,
        };
        let r = f
            .runner
            .run_script(&s, &ctx(Action::Enter), Duration::from_secs(5))
            .await;
        let want: Vec<String> = (21..=30).map(|n| n.to_string()).collect();
        assert_eq!(r.output_tail, want);

        let wide = f.runner.clone().with_tail_lines(100);
        let r = wide
            .run_script(&s, &ctx(Action::Enter), Duration::from_secs(5))
            .await;
        assert_eq!(r.output_tail.len(), MAX_TAIL_LINES);
        assert_eq!(r.output_tail.last().map(String::as_str), Some("30"));
    }

    #[tokio::test]
    async fn exit_codes_map_onto_outcomes() {
        let f = fixture();
        let cases = [
            (Action::Enter, 0, HookOutcome::Success),
            (Action::Enter, 1, HookOutcome::IllegalCall),
            (Action::Enter, 2, HookOutcome::ConfigError),
            (Action::Enter, 3, HookOutcome::Failed),
            (Action::Enter, 7, HookOutcome::Failed),
            (Action::Leave, 42, HookOutcome::Failed),
            (Action::Monitor, 0, HookOutcome::Success),
            (Action::Monitor, 7, HookOutcome::NotRunning),
            (Action::Monitor, 3, HookOutcome::Failed),
            (Action::Monitor, 2, HookOutcome::ConfigError),
        ];
        for (action, code, want) in cases {
            let name = format!("{}01exit{code}", action.prefix());
            let path = script(f.hooks.path(), &name, &format!("exit {code}"), 0o755);
            let s = Script { path, name, action };
            let r = f
                .runner
                .run_script(&s, &ctx(action), Duration::from_secs(5))
                .await;
            assert_eq!(
                (r.outcome, r.exit_code),
                (want, Some(code)),
                "{action} exit {code}"
            );
            assert_eq!(r.action, action.as_str());
        }
        let path = script(f.hooks.path(), "E01signal", "kill -KILL $$", 0o755);
        let s = Script {
            path,
            name: "E01signal".into(),
            action: Action::Enter,
        };
        let r = f
            .runner
            .run_script(&s, &ctx(Action::Enter), Duration::from_secs(5))
            .await;
        assert_eq!((r.outcome, r.exit_code), (HookOutcome::Failed, None));
        assert!(r.output_tail.iter().any(|l| l.contains("SIGKILL")), "{r:?}");
    }

    #[tokio::test]
    async fn enter_stops_at_the_first_failure_and_leave_goes_on() {
        let f = fixture();
        let out = f.out.path();
        for (name, code) in [
            ("E01ok", 0),
            ("E02bad", 3),
            ("E03late", 0),
            ("L01bad", 3),
            ("L02late", 0),
        ] {
            script(
                f.hooks.path(),
                name,
                &format!("touch '{}/{name}'\nexit {code}", out.display()),
                0o755,
            );
        }
        let set = dir_set(f.hooks.path());
        let t = Duration::from_secs(5);
        let enter = f.runner.run(&set, &ctx(Action::Enter), t).await;
        assert_eq!(names(&enter), ["E01ok", "E02bad"]);
        assert_eq!(overall(&enter), HookOutcome::Failed);
        assert!(!out.join("E03late").exists(), "E03late must not run");

        let leave = f.runner.run(&set, &ctx(Action::Leave), t).await;
        assert_eq!(names(&leave), ["L01bad", "L02late"]);
        assert_eq!(leave[1].outcome, HookOutcome::Success);
        assert_eq!(overall(&leave), HookOutcome::Failed);
        assert!(out.join("L02late").exists(), "L02late must run");
    }

    /// Runs a hanging script with a 1 s timeout; returns the result, how long
    /// it took, and the pid of the child it spawned.
    async fn run_hanging(f: &Fixture, name: &str, body: &str) -> (HookResult, Duration, i32) {
        let pidfile = f.out.path().join(format!("{name}.child"));
        let body = body.replace("PIDFILE", &pidfile.display().to_string());
        let path = script(f.hooks.path(), name, &body, 0o755);
        let s = Script {
            path,
            name: name.into(),
            action: Action::Enter,
        };
        let started = Instant::now();
        let r = f
            .runner
            .run_script(&s, &ctx(Action::Enter), Duration::from_secs(1))
            .await;
        (r, started.elapsed(), read_pid(&pidfile))
    }

    #[tokio::test]
    async fn timeout_kills_the_script_and_its_children() {
        let f = fixture();
        let (r, took, child) = run_hanging(
            &f,
            "E01hang",
            "sleep 1000 &\necho $! > 'PIDFILE'\nsleep 1000\nwait",
        )
        .await;
        assert_eq!(
            (r.outcome, r.exit_code),
            (HookOutcome::TimedOut, None),
            "{r:?}"
        );
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert!(took < Duration::from_millis(1000 + 2000 + 1500), "{took:?}");
        assert!(dies(child).await, "child {child} survived");
        assert!(
            r.output_tail.iter().any(|l| l.contains("timed out")),
            "{r:?}"
        );
        assert_eq!(f.runner.running(), 0);
    }

    #[tokio::test]
    async fn timeout_escalates_to_sigkill_when_sigterm_is_ignored() {
        let f = fixture();
        let (r, took, child) = run_hanging(
            &f,
            "E01deaf",
            "trap '' TERM\nsleep 1000 &\necho $! > 'PIDFILE'\nsleep 1000\nwait",
        )
        .await;
        assert_eq!(r.outcome, HookOutcome::TimedOut, "{r:?}");
        // Default grace 2 s: SIGKILL only after it.
        assert!(took >= Duration::from_millis(2900), "{took:?}");
        assert!(took < Duration::from_millis(1000 + 2000 + 1500), "{took:?}");
        assert!(dies(child).await, "child {child} survived");
    }

    #[tokio::test]
    async fn leftover_group_members_are_killed_when_the_script_exits_on_sigterm() {
        let f = fixture();
        let (r, took, child) = run_hanging(
            &f,
            "E01orphan",
            "(trap '' TERM; exec sleep 1000) &\necho $! > 'PIDFILE'\nsleep 1000",
        )
        .await;
        assert_eq!(r.outcome, HookOutcome::TimedOut, "{r:?}");
        // The script died at SIGTERM: no need to wait for the whole grace.
        assert!(took < Duration::from_millis(1000 + 1500), "{took:?}");
        assert!(dies(child).await, "child {child} survived");
    }

    #[tokio::test]
    async fn unsafe_scripts_are_refused_and_never_run() {
        let f = fixture();
        let marker = f.out.path().join("ran");
        let path = script(
            f.hooks.path(),
            "E01open",
            &format!("touch '{}'", marker.display()),
            0o775,
        );
        let results = f
            .runner
            .run(
                &dir_set(f.hooks.path()),
                &ctx(Action::Enter),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(results.len(), 1);
        let r = &results[0];
        assert_eq!((r.outcome, r.exit_code), (HookOutcome::Refused, None));
        let reason = r.output_tail.join("\n");
        assert!(reason.contains(&path.display().to_string()), "{reason}");
        assert!(reason.contains("group-writable"), "{reason}");
        assert!(reason.contains("chmod g-w,o-w"), "{reason}");
        assert!(!marker.exists(), "a refused script ran");
        let log = fs::read_to_string(f.runner.log_path("shop/nfs", "E01open")).expect("log");
        assert!(log.contains("refused"), "{log}");
    }

    #[test]
    fn check_script_names_each_problem_and_its_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let good = script(d, "good", "true", 0o755);
        check_script(&good).expect("a root-owned 0755 script is fine");

        let err = |p: &Path| check_script(p).expect_err("refused").to_string();
        let noexec = script(d, "noexec", "true", 0o644);
        let e = err(&noexec);
        assert!(
            e.contains("not executable") && e.contains("chmod u+x"),
            "{e}"
        );

        let world = script(d, "world", "true", 0o757);
        let e = err(&world);
        assert!(
            e.contains("writable by others") && !e.contains("group"),
            "{e}"
        );

        let both = script(d, "both", "true", 0o777);
        assert!(err(&both).contains("group-writable and writable by others"));

        let owned = script(d, "owned", "true", 0o755);
        std::os::unix::fs::chown(&owned, Some(1000), None).expect("chown");
        let e = err(&owned);
        assert!(e.contains("uid 1000") && e.contains("chown root"), "{e}");

        let link = d.join("link");
        symlink(&good, &link).expect("symlink");
        check_script(&link).expect("a symlink to a good script is fine");

        let sub = d.join("sub");
        fs::create_dir(&sub).expect("mkdir");
        let to_dir = d.join("to-dir");
        symlink(&sub, &to_dir).expect("symlink");
        assert!(err(&to_dir).contains("directory"));

        let dangling = d.join("dangling");
        symlink(d.join("nowhere"), &dangling).expect("symlink");
        assert!(matches!(
            check_script(&dangling),
            Err(HookError::NotFound { .. })
        ));
        assert!(matches!(
            check_script(&d.join("absent")),
            Err(HookError::NotFound { .. })
        ));

        // The directory holding the script must not be writable by others,
        // unless it is sticky.
        let inner = script(&sub, "inner", "true", 0o755);
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = err(&inner);
        assert!(e.contains(&format!("directory {}", sub.display())), "{e}");
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o1777)).expect("chmod");
        check_script(&inner).expect("sticky directory is fine");
    }

    #[tokio::test]
    async fn single_script_is_called_with_action_and_role() {
        let f = fixture();
        let calls = f.out.path().join("calls");
        script(
            f.hooks.path(),
            "ha.sh",
            &format!("echo \"$@\" >> '{}'", calls.display()),
            0o755,
        );
        let set = HookSet {
            dir: f.hooks.path().to_owned(),
            layout: HookLayout::SingleScript("ha.sh".into()),
        };
        let mut leave = ctx(Action::Leave);
        leave.role = Role::Vicemaster;
        let r = f.runner.run(&set, &leave, Duration::from_secs(5)).await;
        assert_eq!(names(&r), ["ha.sh"]);
        assert_eq!(r[0].outcome, HookOutcome::Success);
        let r = f
            .runner
            .run(&set, &ctx(Action::Monitor), Duration::from_secs(5))
            .await;
        assert_eq!(r[0].action, "monitor");
        assert_eq!(
            fs::read_to_string(&calls).expect("calls"),
            "leave vicemaster\nmonitor master\n"
        );

        for bad in ["", "../ha.sh", "a/b", ".."] {
            let set = HookSet {
                dir: f.hooks.path().to_owned(),
                layout: HookLayout::SingleScript(bad.into()),
            };
            assert!(matches!(
                set.scripts(Action::Enter),
                Err(HookError::InvalidScriptName { .. })
            ));
            let r = f
                .runner
                .run(&set, &ctx(Action::Enter), Duration::from_secs(5))
                .await;
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].outcome, HookOutcome::Refused);
        }
    }

    #[tokio::test]
    async fn listing_and_start_failures_are_refusals() {
        let f = fixture();
        let missing = f.hooks.path().join("missing");
        let r = f
            .runner
            .run(
                &dir_set(&missing),
                &ctx(Action::Enter),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].outcome, HookOutcome::Refused);
        assert!(r[0].output_tail[0].contains(&missing.display().to_string()));

        // No interpreter line: execve fails, nothing is run through a shell.
        let path = f.hooks.path().join("E01noshebang");
        fs::write(&path, "echo hi\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        let r = f
            .runner
            .run(
                &dir_set(f.hooks.path()),
                &ctx(Action::Enter),
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(r[0].outcome, HookOutcome::Refused, "{r:?}");
        assert!(r[0].output_tail[0].contains("could not start"), "{r:?}");
        assert_eq!(f.runner.running(), 0);
    }

    async fn wait_running(runner: &HookRunner, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while runner.running() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn kill_all_fences_running_hooks_and_stops_the_run() {
        let f = fixture();
        let out = f.out.path();
        script(
            f.hooks.path(),
            "L01hang",
            &format!(
                "sleep 1000 &\necho $! > '{}/child'\nsleep 1000",
                out.display()
            ),
            0o755,
        );
        script(
            f.hooks.path(),
            "L02after",
            &format!("touch '{}/after'", out.display()),
            0o755,
        );
        let set = dir_set(f.hooks.path());
        let started = Instant::now();
        let leave = ctx(Action::Leave);
        let (results, killed) =
            tokio::join!(f.runner.run(&set, &leave, Duration::from_secs(30)), async {
                wait_running(&f.runner, 1).await;
                // Let the script get as far as writing its child's pid.
                tokio::time::sleep(Duration::from_millis(200)).await;
                f.runner.clone().kill_all()
            });
        assert_eq!(killed, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(names(&results), ["L01hang", "L02after"]);
        assert_eq!(
            (results[0].outcome, results[0].exit_code),
            (HookOutcome::Failed, None)
        );
        assert_eq!(results[1].outcome, HookOutcome::Refused);
        assert!(results[1].output_tail[0].contains("fenced"));
        assert!(
            !out.join("after").exists(),
            "a script started after the fence"
        );
        assert!(dies(read_pid(&out.join("child"))).await);
        assert_eq!(f.runner.running(), 0);
        assert_eq!(f.runner.kill_all(), 0);

        // A new run after the fence works again.
        let r = f
            .runner
            .run(&set, &ctx(Action::Enter), Duration::from_secs(5))
            .await;
        assert!(r.is_empty());
        let s = Script {
            path: f.hooks.path().join("L02after"),
            name: "L02after".into(),
            action: Action::Leave,
        };
        let r = f
            .runner
            .run_script(&s, &ctx(Action::Leave), Duration::from_secs(5))
            .await;
        assert_eq!(r.outcome, HookOutcome::Success);
    }

    #[tokio::test]
    async fn dropping_a_run_kills_its_process_group() {
        let f = fixture();
        let pidfile = f.out.path().join("pid");
        let path = script(
            f.hooks.path(),
            "E01slow",
            &format!("echo $$ > '{}'\nsleep 1000", pidfile.display()),
            0o755,
        );
        let s = Script {
            path,
            name: "E01slow".into(),
            action: Action::Enter,
        };
        let c = ctx(Action::Enter);
        let abandoned = tokio::time::timeout(
            Duration::from_millis(500),
            f.runner.run_script(&s, &c, Duration::from_secs(30)),
        )
        .await;
        assert!(abandoned.is_err());
        assert_eq!(f.runner.running(), 0);
        let pid = read_pid(&pidfile);
        assert!(dies(pid).await, "abandoned hook {pid} still runs");
    }
}
