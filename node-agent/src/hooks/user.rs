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
    /// Its primary group: the user database's, else [`UNKNOWN_USER_GID`].
    pub gid: u32,
    /// `HOME` for the script: the user's home directory, else `/`.
    pub home: PathBuf,
}

/// The group a uid that no user database knows runs with: `nogroup`, not
/// the uid taken as a gid (gid 6 is `disk` on Debian: raw block devices).
pub const UNKNOWN_USER_GID: u32 = 65534;

/// The host's user database when the agent runs in a container that sees
/// the host's processes (`hostPID`): PID 1's root. In the lab the agent runs
/// on the host and this is `/etc/passwd` itself.
const HOST_PASSWD: &str = "/proc/1/root/etc/passwd";

impl RunAs {
    /// The credentials of `uid` as the host's user database knows them
    /// ([`HOST_PASSWD`], else the agent's own `/etc/passwd` and NSS); a
    /// uid neither knows gets group [`UNKNOWN_USER_GID`] and home `/`.
    pub fn of(uid: u32) -> Self {
        let host = std::fs::read_to_string(HOST_PASSWD).unwrap_or_default();
        Self::from_passwd(uid, &host)
            .or_else(|| match User::from_uid(Uid::from_raw(uid)) {
                Ok(Some(user)) => Some(RunAs {
                    uid,
                    gid: user.gid.as_raw(),
                    home: home_or_root(user.dir),
                }),
                _ => None,
            })
            .unwrap_or(RunAs {
                uid,
                gid: UNKNOWN_USER_GID,
                home: PathBuf::from("/"),
            })
    }

    /// `uid`'s entry in `passwd` (the `/etc/passwd` format), if any.
    fn from_passwd(uid: u32, passwd: &str) -> Option<Self> {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 || fields[2].parse::<u32>().ok()? != uid {
                return None;
            }
            Some(RunAs {
                uid,
                gid: fields[3].parse().ok()?,
                home: home_or_root(PathBuf::from(fields[5])),
            })
        })
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

/// `dir`, or `/` when it is empty.
fn home_or_root(dir: PathBuf) -> PathBuf {
    if dir.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_database_gives_group_and_home_and_an_unknown_uid_gets_nogroup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      man:x:6:12:man:/var/cache/man:/usr/sbin/nologin\n\
                      odd:x:7\n\
                      svc:x:1500:1500::/:/bin/sh\n";
        assert_eq!(
            RunAs::from_passwd(6, passwd),
            Some(RunAs {
                uid: 6,
                gid: 12,
                home: PathBuf::from("/var/cache/man"),
            }),
            "uid 6 runs with its own group 12, not gid 6 (disk)"
        );
        assert_eq!(
            RunAs::from_passwd(7, passwd),
            None,
            "a short line is no entry"
        );
        assert_eq!(
            RunAs::from_passwd(1500, passwd).map(|r| r.home),
            Some(PathBuf::from("/"))
        );
        assert_eq!(RunAs::from_passwd(4242, passwd), None);
        // Neither the host nor the agent knows 4242424: nogroup, not 4242424.
        let unknown = RunAs::of(4_242_424);
        assert_eq!(
            (unknown.gid, unknown.home),
            (UNKNOWN_USER_GID, PathBuf::from("/"))
        );
    }
}
