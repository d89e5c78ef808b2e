//! The hook cgroups of the lab's agents: a cgroup v2 mount of the lab's own
//! (outside `/sys`), one folder per node, removed by `lab down`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::nodes;

/// Where the lab mounts the cgroup v2 filesystem: outside `/sys`, which
/// `ip netns exec` replaces (with a sysfs of the namespace's own and no
/// cgroup mounts), so agents in node namespaces see it.
const CGROUP_MOUNT: &str = "/run/kubeha-lab-cgroup";

/// Whether `path` is a mount point of a cgroup2 filesystem here.
fn cgroup2_mounted_at(path: &str) -> bool {
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|line| {
            line.split_once(" - ").is_some_and(|(left, right)| {
                right.split_whitespace().next() == Some("cgroup2")
                    && left.split_whitespace().nth(4) == Some(path)
            })
        })
}

/// The lab's hook cgroups: one folder per node, on the cgroup v2
/// filesystem mounted at [`CGROUP_MOUNT`] (mounted here when it is not
/// yet); `None` when this machine has no cgroup v2.
fn hook_cgroups() -> Option<PathBuf> {
    if !cgroup2_mounted_at(CGROUP_MOUNT) {
        fs::create_dir_all(CGROUP_MOUNT).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "cgroup2", "cgroup2", CGROUP_MOUNT])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = fs::remove_dir(CGROUP_MOUNT);
            return None;
        }
    }
    Some(Path::new(CGROUP_MOUNT).join("kubeha-lab"))
}

/// Node `i`'s hook cgroup (its agent creates it), if this machine has
/// cgroup v2.
pub(super) fn hook_cgroup(i: u8) -> Option<PathBuf> {
    Some(hook_cgroups()?.join(nodes::node_name(i)))
}

/// Removes the lab's hook cgroups (killing what is left in them: `lab
/// down` already stopped the node namespaces' processes) and unmounts the
/// lab's cgroup v2 mount.
pub(super) fn remove_hook_cgroups() {
    if !cgroup2_mounted_at(CGROUP_MOUNT) {
        return;
    }
    let root = Path::new(CGROUP_MOUNT).join("kubeha-lab");
    // node-N/<cluster>/ are the cgroups with processes; deepest first.
    let mut dirs = Vec::new();
    for node in fs::read_dir(&root).into_iter().flatten().flatten() {
        for cluster in fs::read_dir(node.path()).into_iter().flatten().flatten() {
            if cluster.path().join("cgroup.procs").is_file() {
                dirs.push(cluster.path());
            }
        }
        dirs.push(node.path());
    }
    dirs.push(root);
    for dir in dirs {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
        // A cgroup is removable once its last process is gone.
        for _ in 0..50 {
            if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = Command::new("umount").arg(CGROUP_MOUNT).status();
    let _ = fs::remove_dir(CGROUP_MOUNT);
}
