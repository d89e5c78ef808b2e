//! keepalived on the lab nodes: the reference the failover benchmark measures
//! kubeha against, side by side on the same segment, with the same client
//! and the same power-offs of the node that masters both. One VRRP instance
//! per node, keepalived's default VRRPv2 at a whole-second advertisement
//! interval and VRRPv3 below (v2 allows no fraction), multicast adverts on
//! the node's segment interface, no checks, `nopreempt`: like kubeha at its
//! default failback (`Never`), a returning node leaves the master where it
//! is, so the two keep the same master.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::ha;
use crate::lab::Lab;
use crate::nodes;

/// The configuration of node `i`'s instance: node `leader` has the highest
/// priority, the others' falls with the node number (the order of kubeha's
/// `Ordered` placement), so an election picks the node kubeha's placement
/// picks.
pub fn config(i: u8, leader: u8, vip: &str, advert_secs: f64) -> String {
    let version = if advert_secs.fract() == 0.0 { 2 } else { 3 };
    format!(
        "global_defs {{\n  router_id {node}\n  vrrp_version {version}\n  enable_script_security\n  max_auto_priority -1\n}}\n\
         vrrp_instance bench {{\n  state BACKUP\n  nopreempt\n  interface {iface}\n  virtual_router_id 51\n  priority {prio}\n  advert_int {advert_secs}\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n",
        node = nodes::node_name(i),
        iface = nodes::NS_IFACE,
        prio = if i == leader {
            250
        } else {
            200 - u32::from(i) * 10
        },
    )
}

/// keepalived instances started by [`Keepalived::start`].
pub struct Keepalived {
    dir: PathBuf,
    vip: String,
    advert_secs: f64,
    leader: u8,
}

impl Keepalived {
    /// Whether keepalived is on `PATH`.
    fn installed() -> bool {
        let path = std::env::var_os("PATH");
        nodes::find_on_path("keepalived", path.as_deref()).is_some()
    }

    /// Installs keepalived (Debian's package, `apt-get install -y
    /// keepalived`, after an `apt-get update` if the first try fails) when
    /// it is not on `PATH`.
    pub fn ensure_installed() -> anyhow::Result<()> {
        if Self::installed() {
            return Ok(());
        }
        let apt = |args: &[&str]| {
            eprintln!("keepalived is missing: apt-get {}", args.join(" "));
            std::process::Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let install = ["install", "-y", "keepalived"];
        let installed = apt(&install) || (apt(&["update"]) && apt(&install));
        if !installed {
            bail!(
                "the keepalived comparison needs keepalived and `apt-get install -y keepalived` failed; install it by hand"
            );
        }
        if !Self::installed() {
            bail!("apt-get installed keepalived, yet it is not on PATH");
        }
        Ok(())
    }

    /// Starts keepalived on nodes 1..=`count` for `vip` (address without
    /// prefix), advertising every `advert_secs`, node-1 first in priority.
    pub fn start(lab: &Lab, count: u8, vip: &str, advert_secs: f64) -> anyhow::Result<Keepalived> {
        Self::ensure_installed()?;
        let k = Keepalived {
            dir: lab.dir().join("keepalived"),
            vip: vip.to_owned(),
            advert_secs,
            leader: 1,
        };
        std::fs::create_dir_all(&k.dir)?;
        for i in 1..=count {
            k.start_on(i)?;
        }
        Ok(k)
    }

    /// Starts (again) the instance of node `i`, after a power-on.
    pub fn start_on(&self, i: u8) -> anyhow::Result<()> {
        let name = nodes::node_name(i);
        let conf = self.dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config(i, self.leader, &self.vip, self.advert_secs))?;
        let pid = |what: &str| self.dir.join(format!("{name}-{what}.pid"));
        // A power-off killed the last instance: its pid files would make
        // this one think it still runs.
        for what in ["main", "vrrp", "checkers"] {
            let _ = std::fs::remove_file(pid(what));
        }
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        nodes::exec_in(&nodes::node_ns(i), &["keepalived"])
            .args([
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--vrrp",
                "--use-file",
            ])
            .arg(&conf)
            .arg("--pid")
            .arg(pid("main"))
            .arg("--vrrp_pid")
            .arg(pid("vrrp"))
            .arg("--checkers_pid")
            .arg(pid("checkers"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting keepalived on {name}"))?;
        Ok(())
    }

    /// The keepalived processes in node `i`'s namespace.
    fn pids(i: u8) -> Vec<i32> {
        nodes::ns_pids(&nodes::node_ns(i))
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "keepalived")
            })
            .collect()
    }

    /// Whether keepalived runs on node `i`.
    pub fn running(i: u8) -> bool {
        !Self::pids(i).is_empty()
    }

    /// Stops every instance (SIGTERM to the keepalived processes of each
    /// node's namespace; a VRRP master removes its VIP as it stops).
    pub fn stop(self, count: u8) {
        Self::stop_all(count);
    }

    fn stop_all(count: u8) {
        for i in 1..=count {
            let pids = Self::pids(i);
            nodes::signal_pids(&pids, nix::sys::signal::Signal::SIGTERM);
            nodes::wait_dead(&pids, Duration::from_secs(5));
        }
    }

    /// Makes sure node `i` is the VRRP master of nodes 1..=`count`, with
    /// every instance running and settled, as before a power-off of the
    /// node that masters kubeha's service too: waits for one holder of the
    /// VIP; when it is another node (kubeha's placement picked otherwise),
    /// restarts every instance with node `i` first in priority and waits
    /// for it to win.
    pub fn master_on(&mut self, i: u8, count: u8) -> anyhow::Result<()> {
        let one_holder = |wait: Duration| {
            let mut holders = Vec::new();
            ha::wait_until(wait, || {
                holders = ha::vip_holders(&self.vip);
                holders.len() == 1
            });
            holders
        };
        let holders = one_holder(Duration::from_secs(30));
        if holders != [i] {
            eprintln!(
                "keepalived: holders of {} are {holders:?}, kubeha's service is on {}: restarting every instance with that node first",
                self.vip,
                nodes::node_name(i)
            );
            Self::stop_all(count);
            self.leader = i;
            for n in 1..=count {
                self.start_on(n)?;
            }
            one_holder(Duration::from_secs(30));
        }
        // A restarted instance settles as backup meanwhile.
        std::thread::sleep(Duration::from_secs(2));
        let holders = ha::vip_holders(&self.vip);
        if holders != [i] {
            bail!(
                "keepalived: holders of {} are {holders:?}, not {} alone",
                self.vip,
                nodes::node_name(i)
            );
        }
        if let Some(n) = (1..=count).find(|n| !Self::running(*n)) {
            bail!(
                "keepalived does not run on node-{n} (see its log in {})",
                self.dir.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_config_has_its_priority_the_vip_and_no_preemption() {
        let c = config(2, 1, "198.18.0.123", 0.1);
        assert!(c.contains("vrrp_version 3"), "{c}");
        assert!(c.contains("advert_int 0.1\n"), "{c}");
        assert!(c.contains("priority 180\n"), "{c}");
        assert!(c.contains("nopreempt\n"), "{c}");
        assert!(c.contains("198.18.0.123/24"), "{c}");
        assert!(c.contains("interface eth0\n"), "{c}");
        let c = config(3, 3, "198.18.0.123", 1.0);
        assert!(c.contains("vrrp_version 2"), "{c}");
        assert!(c.contains("advert_int 1\n"), "{c}");
        assert!(c.contains("priority 250\n"), "{c}");
    }
}
