//! Hooks run as a non-root user (`spec.hooks.runAsUser`): the user's
//! primary group and home directory, the check that the user can run the
//! script, and the switch to the user between fork and exec.
//!
//! What was chosen: the script keeps every other property of a root run
//! (its cgroup, the host's namespaces, its own process group, working
//! directory `/`); only its credentials change, after the agent (still
//! root in the child) has joined the cgroup and entered the namespaces.
//! Its output still goes through pipes to the agent, which writes the log
//! as root, so logs need nothing from the user. Files the script works on
//! (a pid file, a state folder) must be the user's to write: the agent
//! creates none for it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;

/// The credentials a script runs with when its service sets
/// `spec.hooks.runAsUser`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The user id.
    pub uid: u32,
    /// Its primary group: the user database's, else the uid itself.
    pub gid: u32,
    /// `HOME` for the script: the user's home directory, else `/`.
    pub home: PathBuf,
}

impl RunAs {
    /// The credentials of `uid` as the agent's user database
    /// (`/etc/passwd`, NSS) knows them; a uid it does not know gets its own
    /// id as group and `/` as home.
    pub fn of(uid: u32) -> Self {
        match User::from_uid(Uid::from_raw(uid)) {
            Ok(Some(user)) => RunAs {
                uid,
                gid: user.gid.as_raw(),
                home: if user.dir.as_os_str().is_empty() {
                    PathBuf::from("/")
                } else {
                    user.dir
                },
            },
            _ => RunAs {
                uid,
                gid: uid,
                home: PathBuf::from("/"),
            },
        }
    }

    /// Whether the user may read and execute `script` (a shell script
    /// needs both): by the file's other bits, or its group bits when the
    /// file's group is the user's group. `Err` names the field and the fix.
    pub fn check_script(&self, script: &Path) -> Result<(), String> {
        let meta = std::fs::metadata(script)
            .map_err(|e| format!("cannot inspect hook script {}: {e}", script.display()))?;
        let mode = meta.mode();
        let by_other = mode & 0o005 == 0o005;
        let by_group = meta.gid() == self.gid && mode & 0o050 == 0o050;
        if by_other || by_group {
            Ok(())
        } else {
            Err(format!(
                "hook script {} (mode {:o}) is not readable and executable by user {} (spec.hooks.runAsUser); run chmod o+rx {} (its folders need o+x too), or unset spec.hooks.runAsUser",
                script.display(),
                mode & 0o7777,
                self.uid,
                script.display()
            ))
        }
    }

    /// Makes `cmd` drop to these credentials between fork and exec: no
    /// supplementary groups, then the group, then the user. Registered
    /// after every other pre-exec step, which still need root (the cgroup,
    /// the namespaces). A step that fails fails the spawn.
    pub fn apply(&self, cmd: &mut Command) {
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        cmd.env("HOME", &self.home);
        #[allow(unsafe_code)]
        // SAFETY: the closure runs in the child between fork and exec and
        // makes only async-signal-safe calls (setgroups, setgid, setuid)
        // on values copied before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                Ok(())
            });
        }
    }
}
