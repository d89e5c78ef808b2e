//! What the lab needs on this machine (root, iproute2, the tools of the
//! control plane and the tests), checked before anything is built.

use std::ffi::OsStr;
use std::path::PathBuf;

use anyhow::bail;

/// What stops this process from building the segment, given its effective
/// uid and `PATH`: one sentence per missing piece, empty when nothing is.
pub fn missing_prerequisites(euid: u32, path: Option<&OsStr>) -> Vec<String> {
    let mut missing = Vec::new();
    if euid != 0 {
        missing.push(format!(
            "root: the lab creates a bridge and network namespaces and this process runs as uid {euid}; \
             run it as root (e.g. `sudo -E env PATH=$PATH cargo xtask lab up`)"
        ));
    }
    if find_on_path("ip", path).is_none() {
        missing.push(
            "iproute2: `ip` is not on PATH; install it (e.g. `apt-get install iproute2`)".into(),
        );
    }
    missing
}

/// Fails with a message naming what is missing (root, iproute2's `ip`) when
/// this process cannot build the segment.
pub fn check_prerequisites() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH");
    let missing = missing_prerequisites(nix::unistd::geteuid().as_raw(), path.as_deref());
    if !missing.is_empty() {
        bail!(
            "the lab's network segment cannot be built; missing: {}",
            missing.join("; ")
        );
    }
    Ok(())
}

/// The tools the whole lab runs besides the segment's (see
/// [`missing_prerequisites`]): a command that must be on `PATH` (any one of
/// several names), the Debian package that brings it, and what it is for.
const LAB_TOOLS: &[(&[&str], &str, &str)] = &[
    (
        &["go"],
        "golang-go",
        "builds etcd, kube-apiserver, kubectl and helm",
    ),
    (
        &["openssl"],
        "openssl",
        "makes the control plane's certificates",
    ),
    (
        &["nft"],
        "nftables",
        "is the agents' packet fence, and partitions nodes",
    ),
    (
        &["tcpdump"],
        "tcpdump",
        "watches gratuitous ARP and neighbour advertisements",
    ),
    (&["ping"], "iputils-ping", "probes the VIPs"),
];

/// Everything the lab (demo, tests, benchmarks) needs that this process
/// lacks, given its effective uid and `PATH`: the segment's prerequisites,
/// then one sentence per missing tool naming its package, then one install
/// command for all of them. Empty when nothing is missing.
pub fn missing_lab_prerequisites(euid: u32, path: Option<&OsStr>) -> Vec<String> {
    let mut missing = missing_prerequisites(euid, path);
    let mut packages: Vec<&str> = Vec::new();
    if find_on_path("ip", path).is_none() {
        packages.push("iproute2");
    }
    for (commands, package, purpose) in LAB_TOOLS {
        if commands.iter().all(|c| find_on_path(c, path).is_none()) {
            missing.push(format!(
                "{package}: `{}` is not on PATH (it {purpose})",
                commands.join("` or `")
            ));
            packages.push(package);
        }
    }
    if !packages.is_empty() {
        missing.push(format!(
            "install with `apt-get install -y {}`",
            packages.join(" ")
        ));
    }
    missing
}

/// Fails, before anything is built or started, with a message naming every
/// missing prerequisite of the lab and the command that installs them.
pub fn check_lab_prerequisites() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH");
    let missing = missing_lab_prerequisites(nix::unistd::geteuid().as_raw(), path.as_deref());
    if !missing.is_empty() {
        bail!("the lab cannot run; missing: {}", missing.join("; "));
    }
    Ok(())
}

/// The first executable file called `name` in the folders of `path`.
pub fn find_on_path(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
