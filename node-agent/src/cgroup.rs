//! The hook cgroup: every hook the daemon runs, and so every process a hook
//! starts, lives in a cgroup v2 directory of this agent's, one per cluster.
//! A daemon that
//! leaves its hook's process group (`setsid`, a double fork) is still in
//! it, so the fence stops it too (`cgroup.kill`): "Lost" means the node
//! runs nothing of its services, not only no hook.
//!
//! The directory is created outside the agent's own cgroup (e.g. under the
//! host's `/sys/fs/cgroup`), so the services that hooks start outlive an
//! agent restart, as they must (a restart is not a failover).

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// The cgroup v2 directory the hooks run in: one child cgroup per cluster
/// (`<dir>/<cluster>`), since a fence is per cluster.
///
/// On a hybrid host (cgroup v1 hierarchies beside the v2 one) the container
/// runtime tracks a pod's processes by its v1 cgroups too, and kills
/// everything in them when the pod stops; so a hook also leaves the
/// agent's v1 cgroups, for the root of each v1 hierarchy mounted whole
/// (`v1_roots`), or a service it starts would die with the agent's pod.
#[derive(Debug)]
pub struct HookCgroup {
    dir: PathBuf,
    v1_roots: Vec<CString>,
}

impl HookCgroup {
    /// `dir`, created when missing; it must be on a cgroup v2 filesystem
    /// (it then has `cgroup.procs`).
    pub fn create(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create the hook cgroup {}: {e}", dir.display()),
            )
        })?;
        if !dir.join("cgroup.procs").is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a cgroup v2 directory (no cgroup.procs): give a directory under a cgroup2 mount, e.g. /sys/fs/cgroup/kubeha",
                    dir.display()
                ),
            ));
        }
        let v1_roots = fs::read_to_string("/proc/self/mountinfo")
            .map(|m| v1_roots(&m))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| CString::new(p.into_os_string().into_vec()).ok())
            .collect();
        Ok(HookCgroup { dir, v1_roots })
    }

    /// `cgroup.procs` of the root of every cgroup v1 hierarchy a hook
    /// joins besides its v2 cgroup (none on a cgroup v2 host).
    pub fn v1_roots(&self) -> &[CString] {
        &self.v1_roots
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The child cgroup of `cluster`'s hooks (a cluster name is a DNS name:
    /// a valid directory name).
    fn of(&self, cluster: &str) -> PathBuf {
        self.dir
            .join(if cluster.is_empty() { "_" } else { cluster })
    }

    /// `cgroup.procs` of `cluster`'s child cgroup (created when missing),
    /// for a child process to join with [`join`]. A path, not an open
    /// file: the kernel checks a migration against the cgroup namespace the
    /// file was opened in, and a hook in the host's namespaces joins after
    /// entering the host's cgroup namespace.
    pub fn procs(&self, cluster: &str) -> io::Result<CString> {
        let dir = self.of(cluster);
        fs::create_dir_all(&dir)?;
        CString::new(dir.join("cgroup.procs").into_os_string().into_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    /// The processes in `cluster`'s child cgroup now.
    pub fn pids(&self, cluster: &str) -> Vec<i32> {
        fs::read_to_string(self.of(cluster).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILL to every process in `cluster`'s child cgroup: with
    /// `cgroup.kill` (Linux 5.14+), else to each process listed now (one
    /// pass: a process forked meanwhile may escape). Returns how many there
    /// were.
    pub fn kill(&self, cluster: &str) -> usize {
        let pids = self.pids(cluster);
        if fs::write(self.of(cluster).join("cgroup.kill"), "1").is_err() {
            for pid in &pids {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
        pids.len()
    }
}

/// `cgroup.procs` at the root of every cgroup v1 hierarchy that
/// `mountinfo` (the text of `/proc/self/mountinfo`) shows mounted whole
/// (mount root `/`; a container's own view of a hierarchy is rooted at its
/// cgroup and is left out), one mount per hierarchy.
pub fn v1_roots(mountinfo: &str) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    let mut roots = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let fstype = right.split(' ').next();
        let (Some(device), Some(root), Some(point)) = (left.get(2), left.get(3), left.get(4))
        else {
            continue;
        };
        if fstype != Some("cgroup") || *root != "/" || seen.contains(device) {
            continue;
        }
        seen.push(*device);
        roots.push(Path::new(point).join("cgroup.procs"));
    }
    roots
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs`. Made for a child between fork and exec: open(2), write(2) and
/// close(2), which are async-signal-safe, and no allocation.
pub fn join(procs: &CStr) -> io::Result<()> {
    let file = nix::fcntl::open(procs, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    nix::unistd::write(&file, b"0")
        .map(drop)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_roots_are_whole_v1_hierarchies_once_each() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw shared:9 - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
40 39 0:28 /kubepods/pod1/c1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
41 39 0:28 / /host/sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
42 39 0:30 / /host/sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            v1_roots(mountinfo),
            [
                "/sys/fs/cgroup/memory/cgroup.procs",
                "/sys/fs/cgroup/pids/cgroup.procs",
                "/host/sys/fs/cgroup/cpu/cgroup.procs",
            ]
            .map(PathBuf::from)
        );
        assert!(v1_roots("31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n").is_empty());
    }

    #[test]
    fn a_directory_outside_cgroup2_is_refused_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = HookCgroup::create(dir.path().join("hooks")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string().contains("not a cgroup v2 directory"),
            "{err}"
        );
        assert!(err.to_string().contains("/sys/fs/cgroup"), "{err}");
    }
}
