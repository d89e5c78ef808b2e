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

mod context;
mod runlog;
mod runner;
mod scripts;
mod sources;
mod user;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use kubeha_crds::service::{HookOutcome, HookResult, Role};
use serde::{Deserialize, Serialize};

pub use context::{HookContext, params_of, run_as_user_of};
pub use kubeha_crds::roles::Transition;
pub use runlog::clip_to;
pub use runner::HookRunner;
pub use scripts::{HookLayout, HookSet, Script, check_script, check_script_at};
pub use sources::{
    CONFIG_MAP_FETCH_TIMEOUT, MAX_CONFIG_MAP_SCRIPT_BYTES, SourceRoots, refuse_content,
    write_config_map,
};
pub use user::RunAs;

/// Where hook processes run: the cgroup they join and the namespaces they
/// enter (`--hook-cgroup`, `--hook-namespaces`, `--host-pid`). The daemon
/// and `kubeha-agent hooks run` build their runner from it, so a hook run by
/// hand runs where the daemon would run it.
#[derive(Debug, Clone)]
pub struct HookPlacement {
    /// The cgroup v2 directory hooks run in (the fence kills all in it);
    /// `None`: hooks are contained by their process groups only.
    pub cgroup: Option<PathBuf>,
    /// The host's namespaces, or the agent's own.
    pub namespaces: crate::host_namespaces::HookNamespaces,
    /// The process whose namespaces are the host's (host mode only).
    pub host_pid: i32,
}

impl HookPlacement {
    /// A runner logging under `log_dir` that runs hooks as placed here;
    /// fails, naming the flag and the fix, when the cgroup or the host's
    /// namespaces cannot be used.
    pub fn runner(&self, log_dir: PathBuf) -> crate::Result<HookRunner> {
        use crate::host_namespaces::{HookNamespaces, HostNamespaces};
        let mut runner = HookRunner::new(log_dir);
        match &self.cgroup {
            Some(dir) => {
                let cgroup = crate::cgroup::HookCgroup::create(dir).map_err(|source| {
                    crate::Error::HookCgroup {
                        path: dir.clone(),
                        source,
                    }
                })?;
                tracing::info!(cgroup = %dir.display(), "hooks run in their own cgroup");
                runner = runner.with_cgroup(cgroup);
            }
            None => tracing::warn!(
                "no --hook-cgroup: a fence stops the hooks' process groups only, not daemons that left them"
            ),
        }
        match self.namespaces {
            HookNamespaces::Host => {
                let host = HostNamespaces::open(self.host_pid)
                    .map_err(|e| crate::Error::Usage(format!("--hook-namespaces host: {e}")))?;
                if host.differ() {
                    tracing::info!(host_pid = host.pid(), entered = ?host.differing(), "hooks run in the host's namespaces");
                    runner = runner.with_host_namespaces(host);
                } else {
                    tracing::info!(
                        host_pid = host.pid(),
                        "hooks run in the host's namespaces (the agent's own already)"
                    );
                }
            }
            HookNamespaces::Container => tracing::info!(
                "--hook-namespaces container: hooks run in the agent's namespaces and end with its container"
            ),
        }
        Ok(runner)
    }
}

/// The `PATH` every hook script gets (the rest of the environment is cleared).
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Default log cap (1 MiB): the most output one run writes to its script's
/// log (the rest is read and discarded), and the size at which the log is
/// rotated to `.log.1` before a run.
pub const DEFAULT_LOG_CAP_BYTES: u64 = 1024 * 1024;

/// Default number of output lines kept in a [`HookResult`].
pub const DEFAULT_TAIL_LINES: usize = 10;

/// Default time between SIGTERM and SIGKILL when a script overruns.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// Most output lines a [`HookResult`] may carry (the API schema's limit).
pub const MAX_TAIL_LINES: usize = 20;

/// Longest output line (in bytes, after escaping control characters) kept
/// in a [`HookResult`]; longer lines are cut on a character boundary and
/// end in `…`.
pub const MAX_LINE_BYTES: usize = 1024;

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

/// The transition an action of a role means on this node. Only the master
/// role starts and stops the service: entering master on the primary node
/// is a takeback, on a backup node a takeover; leaving master on the
/// primary node is a giveaway, on a backup node a giveback. Entering or
/// leaving standby (vicemaster, none) starts and stops nothing, so it is no
/// transition (`KUBEHA_TRANSITION` empty): an IRIS-style script that starts
/// the service on `takeback` must not start it on the primary node when it
/// becomes the standby. Monitor and periodic runs are no transition either.
pub fn transition(action: Action, role: Role, node_is_primary: bool) -> Option<Transition> {
    if role != Role::Master {
        return None;
    }
    match action {
        Action::Enter => Some(Transition::of(true, node_is_primary)),
        Action::Leave => Some(Transition::of(false, node_is_primary)),
        Action::Monitor | Action::Periodic => None,
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

/// The fail count to report after a failure whose outcome is `outcome`,
/// `count` already including that failure. A permanent outcome (exit 1,
/// an illegal call, or exit 2, a wrong or changed configuration) means no
/// retry on this node: the count is raised to at least the service's
/// `migration_threshold`, and the record reports `permanentFailure`
/// ([`crate::statefile::ServiceRecord::count_hook_failure`]), so the
/// operator no longer places the service here until an admin clears it
/// (`kubectl ha clear`); `failureTimeoutSeconds` does not end it. Any
/// other outcome keeps `count` (and such a failure expires).
pub fn fail_count_after(outcome: HookOutcome, count: i32, migration_threshold: i32) -> i32 {
    if is_permanent(outcome) {
        count.max(migration_threshold)
    } else {
        count
    }
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

#[cfg(test)]
mod tests;
