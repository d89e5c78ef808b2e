//! Processes in the lab's namespaces: which run where, signalled, waited
//! for and stopped.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::NETNS_DIR;

/// Processes running inside network namespace `ns` (`ip netns pids`).
pub fn ns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|p| *p != std::process::id() as i32)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` lives and runs inside network namespace `ns`.
pub fn pid_in_ns(pid: i32, ns: &str) -> bool {
    if is_dead(pid) {
        return false;
    }
    match (
        std::fs::metadata(format!("/proc/{pid}/ns/net")),
        std::fs::metadata(Path::new(NETNS_DIR).join(ns)),
    ) {
        (Ok(proc_ns), Ok(named)) => proc_ns.dev() == named.dev() && proc_ns.ino() == named.ino(),
        _ => false,
    }
}

/// Gone, or a zombie (exited, not yet reaped).
pub fn is_dead(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn is_alive(pid: i32) -> bool {
    !is_dead(pid)
}

/// Sends `signal` to each of `pids`, ignoring those already gone.
pub fn signal_pids(pids: &[i32], signal: nix::sys::signal::Signal) {
    for pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), signal);
    }
}

/// Waits up to `timeout` for every one of `pids` to be dead; whether they are.
pub fn wait_dead(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|p| is_dead(*p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM, then SIGKILL after `grace`, to `pids`. Returns how many there were.
pub fn stop_pids(pids: &[i32], grace: Duration) -> usize {
    use nix::sys::signal::Signal;
    if pids.is_empty() {
        return 0;
    }
    signal_pids(pids, Signal::SIGTERM);
    if !wait_dead(pids, grace) {
        signal_pids(pids, Signal::SIGKILL);
        wait_dead(pids, Duration::from_secs(5));
    }
    pids.len()
}
