//! Hooks in the host's namespaces. The scripts a service's hooks run start
//! and stop the node's own services (a database, a file server), which live
//! on the host: they must not inherit the agent container's mount table,
//! limits and lifetime, or an agent restart would kill them. So each hook
//! process enters the mount, UTS, IPC and cgroup namespaces of a host
//! process (PID 1 by default, `--host-pid`) between fork and exec, joins a
//! cgroup outside the agent's (`--hook-cgroup`), and then executes the
//! script as a host process. The network namespace is the agent's own: with
//! `hostNetwork` it is the host's.
//!
//! The PID namespace cannot be entered by the process itself (`setns` on a
//! PID namespace applies to its children only), so host mode requires the
//! agent to share it (the chart's `hostPID: true`); it is checked when the
//! agent starts, so a misconfigured pod fails at once with the fix instead
//! of running hooks inside the container.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// Where hook scripts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HookNamespaces {
    /// In the host's mount, UTS, IPC, PID and cgroup namespaces: services a
    /// hook starts are host processes that outlive the agent.
    #[default]
    Host,
    /// In the agent's own namespaces (inside its container, if any).
    Container,
}

/// The namespaces a hook enters, in this order: cgroup first (so the cgroup
/// join that follows is checked against the host's cgroup namespace), then
/// IPC and UTS, and mount last (it changes the root and working directory).
const ENTERED: [(&str, CloneFlags); 4] = [
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Open handles on the host process's namespaces that differ from the
/// agent's; a hook process enters them with [`HostNamespaces::enter_cgroup`]
/// and [`HostNamespaces::enter_rest`]. The handles stay valid even after
/// the host process exits.
#[derive(Debug)]
pub struct HostNamespaces {
    pid: i32,
    cgroup: Option<File>,
    rest: Vec<(CloneFlags, File)>,
}

/// Device and inode of a namespace file: its identity.
fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// The fix named in every error of [`HostNamespaces::open`].
const FIX: &str = "run the agent with the host's PID namespace and the privileges to enter \
     namespaces (chart: agent.hooks.namespaces=host sets hostPID and privileged), give \
     --host-pid a process in the host's namespaces, or run the hooks in the agent's own \
     namespaces with --hook-namespaces container";

impl HostNamespaces {
    /// Opens `/proc/<pid>/ns/*` of the host process `pid`. Refused when
    /// `pid` is this agent itself, or in another PID namespace than the
    /// agent (no `hostPID`), or its namespaces cannot be read.
    pub fn open(pid: i32) -> Result<Self, String> {
        if pid <= 0 {
            return Err(format!(
                "--host-pid {pid}: give a process id (1 is the host's init)"
            ));
        }
        if u32::try_from(pid).is_ok_and(|p| p == std::process::id()) {
            return Err(format!(
                "--host-pid {pid} is this agent itself (without hostPID the agent is PID 1 of its \
                 container): {FIX}"
            ));
        }
        let ns = Path::new("/proc").join(pid.to_string()).join("ns");
        let own = Path::new("/proc/self/ns");
        let read = |kind: &str| {
            identity(&ns.join(kind))
                .map_err(|e| format!("cannot read {}: {e}: {FIX}", ns.join(kind).display()))
        };
        let host_pid_ns = read("pid")?;
        let own_pid_ns =
            identity(&own.join("pid")).map_err(|e| format!("/proc/self/ns/pid: {e}"))?;
        if host_pid_ns != own_pid_ns {
            return Err(format!(
                "process {pid} is in another PID namespace than this agent, so hooks could not \
                 run as host processes: {FIX}"
            ));
        }
        let mut cgroup = None;
        let mut rest = Vec::new();
        for (kind, flag) in ENTERED {
            let path = ns.join(kind);
            let theirs = read(kind)?;
            let mine = identity(&own.join(kind)).ok();
            if mine == Some(theirs) {
                continue;
            }
            let file = File::open(&path)
                .map_err(|e| format!("cannot open {}: {e}: {FIX}", path.display()))?;
            if flag == CloneFlags::CLONE_NEWCGROUP {
                cgroup = Some(file);
            } else {
                rest.push((flag, file));
            }
        }
        Ok(HostNamespaces { pid, cgroup, rest })
    }

    /// The host process whose namespaces hooks enter.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether any namespace differs from the agent's (false when the agent
    /// already runs in the host's namespaces, e.g. outside a container).
    pub fn differ(&self) -> bool {
        self.cgroup.is_some() || !self.rest.is_empty()
    }

    /// The namespaces that differ, by name (for the log).
    pub fn differing(&self) -> Vec<&'static str> {
        ENTERED
            .iter()
            .filter(|(_, flag)| {
                (*flag == CloneFlags::CLONE_NEWCGROUP && self.cgroup.is_some())
                    || self.rest.iter().any(|(f, _)| f == flag)
            })
            .map(|(kind, _)| *kind)
            .collect()
    }

    /// Where the agent sees the host's file `path`: through the host
    /// process's root (`/proc/<pid>/root/...`) when the mount namespaces
    /// differ, else `path` itself.
    pub fn host_path(&self, path: &Path) -> std::path::PathBuf {
        if self.rest.iter().any(|(f, _)| *f == CloneFlags::CLONE_NEWNS) {
            Path::new("/proc")
                .join(self.pid.to_string())
                .join("root")
                .join(path.strip_prefix("/").unwrap_or(path))
        } else {
            path.to_owned()
        }
    }

    /// Enters the host's cgroup namespace. For a child between fork and
    /// exec: one setns(2), no allocation.
    pub fn enter_cgroup(&self) -> io::Result<()> {
        if let Some(file) = &self.cgroup {
            setns(file.as_fd(), CloneFlags::CLONE_NEWCGROUP)?;
        }
        Ok(())
    }

    /// Enters the host's IPC, UTS and mount namespaces, then changes to the
    /// host's root directory. For a child between fork and exec: setns(2)
    /// and chdir(2) only, no allocation.
    pub fn enter_rest(&self, root: &CString) -> io::Result<()> {
        for (flag, file) in &self.rest {
            setns(file.as_fd(), *flag)?;
        }
        nix::unistd::chdir(root.as_c_str())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_itself_is_refused_naming_the_fix() {
        let own = i32::try_from(std::process::id()).unwrap();
        let err = HostNamespaces::open(own).unwrap_err();
        assert!(err.contains("this agent itself"), "{err}");
        assert!(err.contains("--hook-namespaces container"), "{err}");
    }

    #[test]
    fn a_missing_process_is_refused_naming_the_path() {
        // PIDs are below 2^22 on Linux.
        let err = HostNamespaces::open(i32::MAX).unwrap_err();
        assert!(err.contains(&format!("/proc/{}/ns/pid", i32::MAX)), "{err}");
        assert!(err.contains("--host-pid"), "{err}");
        assert!(
            HostNamespaces::open(0)
                .unwrap_err()
                .contains("--host-pid 0")
        );
    }

    #[test]
    fn a_process_in_our_namespaces_needs_nothing_entered() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let host = HostNamespaces::open(i32::try_from(child.id()).unwrap());
        let _ = child.kill();
        let _ = child.wait();
        let host = host.unwrap();
        assert!(!host.differ(), "{:?}", host.differing());
    }
}
