//! An in-memory [`Netlink`] for the tests of this crate: interfaces with a
//! subnet each (by default `kh-fake0` holding 198.18.0.1/24, the host's
//! own address, which no VIP may take over), addresses created or replaced
//! as the kernel does, no MAC address (so no GARP
//! leaves a test), and knobs for a kernel that refuses or is slow.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Netlink, Vip, VipError, kernel_lifetime_until};

/// See the module doc.
pub(crate) struct FakeNetlink {
    /// The interfaces: name, address, prefix length.
    pub(crate) interfaces: Vec<(String, IpAddr, u8)>,
    /// The addresses held: interface, address, prefix length.
    pub(crate) addrs: Mutex<Vec<(String, IpAddr, u8)>>,
    /// Every removal fails (a kernel that refuses).
    pub(crate) refuse_del: AtomicBool,
    /// How long a presence check takes after it looked (a slow netlink
    /// round trip), in ms.
    pub(crate) present_delay_ms: AtomicU64,
    /// How long an add waits before the kernel takes it (an agent stopped
    /// in the call), in ms.
    pub(crate) add_delay_ms: AtomicU64,
    /// Every lifetime set (the packet fence's timeout, as the kernel took
    /// it), in order.
    pub(crate) lifetimes: Mutex<Vec<Duration>>,
}

impl Default for FakeNetlink {
    fn default() -> Self {
        Self {
            interfaces: vec![("kh-fake0".into(), IpAddr::from([198, 18, 0, 1]), 24)],
            addrs: Mutex::default(),
            refuse_del: AtomicBool::default(),
            present_delay_ms: AtomicU64::default(),
            add_delay_ms: AtomicU64::default(),
            lifetimes: Mutex::default(),
        }
    }
}

impl FakeNetlink {
    fn addrs(&self) -> std::sync::MutexGuard<'_, Vec<(String, IpAddr, u8)>> {
        self.addrs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Netlink for FakeNetlink {
    async fn add_vip(&self, iface: &str, vip: &Vip, until: Instant) -> Result<(), VipError> {
        let delay = self.add_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if !self.interfaces.iter().any(|(n, _, _)| n == iface) {
            return Err(VipError::InterfaceMissing(iface.into()));
        }
        // The interfaces' own addresses are the host's, never a VIP's.
        if let Some((name, _, _)) = self.interfaces.iter().find(|(_, a, _)| *a == vip.addr) {
            return Err(VipError::ForeignAddress {
                address: vip.addr,
                interface: name.clone(),
            });
        }
        let (lifetime, _) = kernel_lifetime_until(until)?;
        self.lifetimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(lifetime);
        let mut addrs = self.addrs();
        addrs.retain(|(i, a, _)| !(i == iface && *a == vip.addr));
        addrs.push((iface.into(), vip.addr, vip.prefix_len));
        Ok(())
    }

    async fn del_vip(&self, iface: &str, vip: &Vip) -> Result<(), VipError> {
        if self.refuse_del.load(Ordering::SeqCst) {
            return Err(VipError::InterfaceMissing(iface.into()));
        }
        self.addrs()
            .retain(|(i, a, _)| !(i == iface && *a == vip.addr));
        Ok(())
    }

    async fn vip_present(&self, iface: &str, vip: &Vip) -> Result<bool, VipError> {
        let present = self
            .addrs()
            .iter()
            .any(|(i, a, len)| i == iface && *a == vip.addr && *len == vip.prefix_len);
        let delay = self.present_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        Ok(present)
    }

    async fn interface_for(&self, vip: &Vip) -> Result<String, VipError> {
        self.interfaces
            .iter()
            .find(|(_, ip, len)| kubeha_crds::cidr::subnet_contains(*ip, *len, vip.addr))
            .map(|(n, _, _)| n.clone())
            .ok_or_else(|| VipError::NoInterface(vip.to_string()))
    }

    async fn mac_of(&self, iface: &str) -> Result<[u8; 6], VipError> {
        Err(VipError::InterfaceMissing(iface.into()))
    }

    async fn add_default_route(&self, _: IpAddr) -> Result<(), VipError> {
        Ok(())
    }

    async fn del_default_route(&self, _: IpAddr) -> Result<(), VipError> {
        Ok(())
    }
}
