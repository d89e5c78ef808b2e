//! Virtual IPs through netlink.
//!
//! Every VIP is added with a finite valid lifetime (`valid_lft`) that the
//! agent extends on each successful heartbeat renew: the kernel fence of
//! DESIGN.md ("Leases, election and fencing"). A frozen or killed agent
//! cannot hold a VIP longer than that lifetime, because the kernel deletes
//! the address itself when it expires.
//!
//! The kernel operations sit behind the [`Netlink`] trait so that the
//! transition logic can be tested against a fake; [`RtNetlink`] is the real
//! implementation over an `rtnetlink` handle ([`kernel`]).

mod kernel;
pub mod nf_netlink;
pub mod packet_fence;

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

pub use kernel::RtNetlink;
pub use packet_fence::PacketFence;

/// The address protocol (`IFA_PROTO`, `ip address ... proto 107`) every
/// VIP is added with: how the agent tells its own addresses from the
/// node's. An address of the VIP's IP that the kernel holds with another
/// protocol (the node's own address, DHCP, another program) is never
/// replaced, extended or deleted: [`VipError::ForeignAddress`]. 107 is `k`
/// in ASCII; the kernel's own protocols are 1 to 3.
pub const KUBEHA_ADDRESS_PROTOCOL: u8 = 107;

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// Errors of VIP parsing and VIP netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// A VIP string or interface name that is not acceptable.
    #[error("invalid VIP {input:?}: {reason}")]
    Parse {
        /// The text as given.
        input: String,
        /// Why it was refused.
        reason: String,
    },
    /// The named interface does not exist on this node.
    #[error(
        "interface {0:?} does not exist on this node; fix spec.vips[].interface or create the interface"
    )]
    InterfaceMissing(String),
    /// No interface on this node holds an address whose subnet contains the VIP.
    #[error(
        "no interface on this node holds an address whose subnet contains VIP {0}; \
         name the interface in spec.vips[].interface"
    )]
    NoInterface(String),
    /// The VIP's address is already on the host and kubeha did not add it
    /// (no [`KUBEHA_ADDRESS_PROTOCOL`]): taking it over would turn the
    /// node's own address into a VIP that expires and is deleted on leave.
    #[error(
        "address {address} is already on interface {interface} and kubeha did not add it (the node's own address, or another program's); refusing to take it over: pick another VIP or remove the address from the node"
    )]
    ForeignAddress {
        /// The address.
        address: IpAddr,
        /// The interface holding it.
        interface: String,
    },
    /// The interface has no usable Ethernet MAC address (loopback, tunnel, ...).
    #[error(
        "interface {0:?} has no Ethernet MAC address; VIPs with GARP need an Ethernet-like interface"
    )]
    NoMac(String),
    /// A VIP lifetime that would break the kernel fence or that the kernel refuses.
    #[error("invalid VIP lifetime: {0}")]
    InvalidLifetime(String),
    /// A default route to a different gateway already exists.
    #[error(
        "a default route via {existing} already exists, refusing to add one via {gateway}; \
         remove it or drop spec.defaultRoute"
    )]
    DefaultRouteConflict {
        /// The gateway we were asked to install.
        gateway: IpAddr,
        /// A gateway of the default route already present.
        existing: String,
    },
    /// `RtNetlink::new` was called outside a tokio runtime.
    #[error("the netlink connection needs a running tokio runtime")]
    NoRuntime,
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink route socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel refused the request for lack of privilege.
    #[error("netlink {op} refused: operation not permitted (the agent needs CAP_NET_ADMIN)")]
    PermissionDenied {
        /// The operation, e.g. `add address 198.18.0.100/24 on eth0`.
        op: String,
    },
    /// The end a VIP was to be held until had passed when the kernel was
    /// about to take it (the agent stalled in the call): nothing was set.
    #[error(
        "the lease end the VIP was to be held until passed before the kernel took it (the agent stalled)"
    )]
    PastLeaseEnd,
    /// The packet fence (nftables) could not be changed.
    #[error("packet fence: {op} failed: {reason}")]
    Fence {
        /// The operation, e.g. `open the packet fence of 198.18.0.100`.
        op: String,
        /// Why, with the fix where there is one.
        reason: String,
    },
    /// Any other netlink failure.
    #[error("netlink {op} failed: {source}")]
    Netlink {
        /// The operation, e.g. `add address 198.18.0.100/24 on eth0`.
        op: String,
        /// The error rtnetlink reported.
        #[source]
        source: rtnetlink::Error,
    },
}

/// One virtual IP: address, prefix length and optionally the interface it
/// must be added to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Vip {
    /// The address itself.
    pub addr: IpAddr,
    /// Prefix length of the subnet the address belongs to.
    pub prefix_len: u8,
    /// Interface to add the VIP to; `None`: the interface whose subnet holds it.
    pub interface: Option<String>,
}

impl Vip {
    /// Parses a VIP in CIDR notation (`198.18.0.100/24`, `2001:db8::100/64`)
    /// with an optional interface name.
    ///
    /// Refuses a missing or out-of-range prefix length, the unspecified,
    /// loopback, multicast and IPv4 limited-broadcast addresses, and
    /// interface names the kernel would refuse.
    pub fn parse(cidr: &str, interface: Option<&str>) -> Result<Vip, VipError> {
        let fail = |reason: &str| VipError::Parse {
            input: cidr.to_string(),
            reason: reason.to_string(),
        };
        let net = kubeha_crds::cidr::parse(cidr).map_err(|_| {
            fail(
                "expected ADDRESS/PREFIX with a decimal prefix length within the family's \
                 (0-32, 0-128), e.g. 198.18.0.100/24 or 2001:db8::100/64",
            )
        })?;
        let (addr, prefix_len) = (net.addr(), net.prefix_len());
        if addr.is_unspecified() {
            return Err(fail("the unspecified address cannot be a VIP"));
        }
        if addr.is_loopback() {
            return Err(fail("a loopback address cannot be a VIP"));
        }
        if addr.is_multicast() {
            return Err(fail("a multicast address cannot be a VIP"));
        }
        if addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Err(fail("the broadcast address cannot be a VIP"));
        }
        let interface = match interface {
            None => None,
            Some(name) => {
                validate_ifname(name).map_err(|reason| VipError::Parse {
                    input: cidr.to_string(),
                    reason: format!("interface {name:?}: {reason}"),
                })?;
                Some(name.to_string())
            }
        };
        Ok(Vip {
            addr,
            prefix_len,
            interface,
        })
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Checks an interface name against the kernel's rules (`dev_valid_name`).
fn validate_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("interface name is empty");
    }
    if name.len() > IFNAME_MAX {
        return Err("interface name is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("interface name cannot be . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("interface name contains '/', ':', whitespace or control characters");
    }
    Ok(())
}

/// The longest a VIP may be held after a renew, for lease duration D and
/// clock-skew allowance S: `configured` (whole seconds) if set, which must
/// be at least 1 and strictly below D + S, else D + S itself. The fences'
/// margins ([`kubeha_crds::timing`]) come off it when a lifetime is given.
pub fn lifetime_cap(
    lease_duration: Duration,
    clock_skew: Duration,
    configured: Option<u32>,
) -> Result<Duration, VipError> {
    let bound = lease_duration.checked_add(clock_skew).ok_or_else(|| {
        VipError::InvalidLifetime("lease duration plus clock skew overflows".to_string())
    })?;
    match configured {
        Some(0) => Err(VipError::InvalidLifetime(
            "a configured VIP lifetime of 0 s is not allowed; use at least 1 s".to_string(),
        )),
        Some(secs) if Duration::from_secs(u64::from(secs)) < bound => {
            Ok(Duration::from_secs(u64::from(secs)))
        }
        Some(secs) => Err(VipError::InvalidLifetime(format!(
            "configured VIP lifetime {secs} s is not below lease duration + clock skew ({} ms); \
             a VIP could outlive the lease",
            bound.as_millis()
        ))),
        None => Ok(bound),
    }
}

/// What the kernel is given for a VIP held until `until`, judged now: the
/// packet fence's timeout (to the millisecond), and the address lifetime in
/// whole seconds ([`kubeha_crds::timing::address_lifetime_secs`]).
fn kernel_lifetime_until(until: Instant) -> Result<(Duration, u32), VipError> {
    match until.checked_duration_since(Instant::now()) {
        Some(left) if left >= Duration::from_millis(1) => kernel_lifetime(left),
        _ => Err(VipError::PastLeaseEnd),
    }
}

/// What the kernel is given for a VIP held for `fence`: the packet fence's
/// timeout (whole milliseconds, rounded down) and the address lifetime.
fn kernel_lifetime(fence: Duration) -> Result<(Duration, u32), VipError> {
    let ms = fence.as_millis();
    if ms == 0 {
        return Err(VipError::InvalidLifetime(format!(
            "{fence:?} is below one millisecond; nothing may be held for that long"
        )));
    }
    match i64::try_from(ms) {
        Ok(ms) if ms < i64::from(u32::MAX - 1) * 1000 => Ok((
            Duration::from_millis(ms as u64),
            kubeha_crds::timing::address_lifetime_secs(ms),
        )),
        _ => Err(VipError::InvalidLifetime(format!(
            "{fence:?} is too long; a VIP must have a finite lifetime"
        ))),
    }
}

/// The kernel operations the agent needs for VIPs and the default route.
///
/// Every operation is idempotent, so a transition can be retried after a
/// crash: adding an existing VIP extends its lifetime, removing a missing
/// VIP or route succeeds.
pub trait Netlink: Send + Sync {
    /// Adds `vip` to interface `iface`, held until `until` (to the
    /// millisecond, turned into a timeout at the last moment, so a call held
    /// up in flight never sets a later end; [`VipError::PastLeaseEnd`] when
    /// it passed): its packet fence ([`packet_fence`]) is opened until then,
    /// and the address gets the matching whole-second lifetime
    /// ([`kubeha_crds::timing::address_lifetime_secs`]). The address is
    /// marked with [`KUBEHA_ADDRESS_PROTOCOL`]; if kubeha's address exists
    /// it is replaced (`NLM_F_REPLACE`), which extends its lifetime. If the
    /// IP is on the host without that mark (any interface, any prefix),
    /// nothing changes: [`VipError::ForeignAddress`]. IPv6 VIPs are added
    /// with `IFA_F_NODAD`, usable at once.
    fn add_vip(
        &self,
        iface: &str,
        vip: &Vip,
        until: Instant,
    ) -> impl Future<Output = Result<(), VipError>> + Send;

    /// Extends the lifetime of `vip` on `iface` to `until` only if the
    /// address is still there and its packet fence still open; returns
    /// `false`, adding nothing, when either ended (the holder missed its
    /// renewals, and the operator may have cleared another node). The
    /// kernel creates a missing address even without `NLM_F_CREATE`, so
    /// presence is checked first; the kernel expires addresses from a
    /// periodic task, not between the check and the replace of a running
    /// agent.
    fn extend_vip(
        &self,
        iface: &str,
        vip: &Vip,
        until: Instant,
    ) -> impl Future<Output = Result<bool, VipError>> + Send {
        async move {
            if !self.vip_present(iface, vip).await? {
                return Ok(false);
            }
            self.add_vip(iface, vip, until).await?;
            Ok(true)
        }
    }

    /// [`Netlink::extend_vip`] for every `(iface, vip)` of `vips`, in
    /// order, with one result each. The kernel implementation reads the
    /// addresses once for all of them (a renew extends every held VIP), not
    /// once per VIP.
    fn extend_vips(
        &self,
        vips: &[(String, Vip)],
        until: Instant,
    ) -> impl Future<Output = Vec<Result<bool, VipError>>> + Send {
        async move {
            let mut out = Vec::with_capacity(vips.len());
            for (iface, vip) in vips {
                out.push(self.extend_vip(iface, vip, until).await);
            }
            out
        }
    }

    /// Removes `vip` from `iface`, closing its packet fence first. A VIP
    /// that is not there counts as removed, and so does one whose interface
    /// no longer exists. An address of that IP kubeha did not add is left
    /// alone, fence and all (it was never kubeha's to remove).
    fn del_vip(&self, iface: &str, vip: &Vip) -> impl Future<Output = Result<(), VipError>> + Send;

    /// Whether `vip` (address and prefix length) is on `iface` as kubeha's
    /// address ([`KUBEHA_ADDRESS_PROTOCOL`]).
    fn vip_present(
        &self,
        iface: &str,
        vip: &Vip,
    ) -> impl Future<Output = Result<bool, VipError>> + Send;

    /// The interface `vip` belongs on: `vip.interface` if set (it must
    /// exist), else the interface holding another address whose subnet
    /// contains the VIP (longest prefix wins, then permanent addresses, then
    /// the lowest interface index).
    fn interface_for(&self, vip: &Vip) -> impl Future<Output = Result<String, VipError>> + Send;

    /// The Ethernet MAC address of `iface`.
    fn mac_of(&self, iface: &str) -> impl Future<Output = Result<[u8; 6], VipError>> + Send;

    /// Installs a default route via `gateway` in the main table. Succeeds if
    /// that route is already there; fails with
    /// [`VipError::DefaultRouteConflict`] if a default route via another
    /// gateway exists.
    fn add_default_route(
        &self,
        gateway: IpAddr,
    ) -> impl Future<Output = Result<(), VipError>> + Send;

    /// Removes the default route via `gateway` that [`Netlink::add_default_route`]
    /// installed (protocol `static`). Succeeds if there is none; never
    /// removes a default route via another gateway, nor one via the same
    /// gateway that someone else installed with another protocol (e.g. `boot`).
    fn del_default_route(
        &self,
        gateway: IpAddr,
    ) -> impl Future<Output = Result<(), VipError>> + Send;
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
