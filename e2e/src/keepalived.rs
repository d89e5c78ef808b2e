//! keepalived on the lab nodes: the reference the failover benchmark measures
//! kubeha against, side by side on the same segment, with the same client
//! and the same power-offs. One VRRP instance per node, VRRPv3 (so an
//! advertisement interval below a second is allowed), unicast-free
//! multicast adverts on the node's segment interface, no checks.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, bail};

use crate::lab::Lab;
use crate::nodes;

/// The configuration of node `i`'s instance: priority falls with the node
/// number, so node-1 is master first, and preempts when it returns.
pub fn config(i: u8, vip: &str, advert_secs: f64) -> String {
    format!(
        "global_defs {{\n  router_id {node}\n  vrrp_version 3\n  enable_script_security\n  max_auto_priority -1\n}}\n\
         vrrp_instance bench {{\n  state BACKUP\n  interface {iface}\n  virtual_router_id 51\n  priority {prio}\n  advert_int {advert_secs}\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n",
        node = nodes::node_name(i),
        iface = nodes::NS_IFACE,
        prio = 200 - u32::from(i) * 10,
    )
}

/// keepalived instances started by [`Keepalived::start`].
pub struct Keepalived {
    dir: PathBuf,
    vip: String,
    advert_secs: f64,
}

impl Keepalived {
    /// Fails with the install command when keepalived is not on `PATH`.
    pub fn check_installed() -> anyhow::Result<()> {
        let path = std::env::var_os("PATH");
        if nodes::find_on_path("keepalived", path.as_deref()).is_none() {
            bail!(
                "the keepalived comparison needs keepalived: install it with `apt-get install -y keepalived`"
            );
        }
        Ok(())
    }

    /// Starts keepalived on nodes 1..=`count` for `vip` (address without
    /// prefix), advertising every `advert_secs`.
    pub fn start(lab: &Lab, count: u8, vip: &str, advert_secs: f64) -> anyhow::Result<Keepalived> {
        Self::check_installed()?;
        let k = Keepalived {
            dir: lab.dir().join("keepalived"),
            vip: vip.to_owned(),
            advert_secs,
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
        std::fs::write(&conf, config(i, &self.vip, self.advert_secs))?;
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
        for i in 1..=count {
            let pids = Self::pids(i);
            nodes::signal_pids(&pids, nix::sys::signal::Signal::SIGTERM);
            nodes::wait_dead(&pids, std::time::Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_config_is_vrrpv3_with_its_priority_and_the_vip() {
        let c = config(2, "198.18.0.123", 0.1);
        assert!(c.contains("vrrp_version 3"), "{c}");
        assert!(c.contains("advert_int 0.1\n"), "{c}");
        assert!(c.contains("priority 180\n"), "{c}");
        assert!(c.contains("198.18.0.123/24"), "{c}");
        assert!(c.contains("interface eth0\n"), "{c}");
    }
}
