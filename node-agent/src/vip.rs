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
//! implementation over an `rtnetlink` [`Handle`].

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope, CacheInfo,
};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType, RouteVia,
};
use nix::errno::Errno;
use rtnetlink::{AddressMessageBuilder, Handle, RouteMessageBuilder};

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
        let (addr, len) = cidr
            .split_once('/')
            .ok_or_else(|| fail("expected CIDR notation ADDRESS/PREFIX, e.g. 198.18.0.100/24"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| fail("the address part is not an IPv4 or IPv6 address"))?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(fail("the prefix length must be a decimal number"));
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = len
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| fail(&format!("the prefix length must be 0..={max}")))?;
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

/// The VIP valid lifetime in whole seconds for lease duration D and clock-skew
/// allowance S.
///
/// With `configured` set, that value is returned if it is at least 1 and
/// strictly below D + S, and refused otherwise. Unset, the result is the
/// largest whole number of seconds strictly below D + S; an error if that is
/// not at least 1 (D + S of one second or less).
pub fn lifetime_secs(
    lease_duration: Duration,
    clock_skew: Duration,
    configured: Option<u32>,
) -> Result<u32, VipError> {
    let bound = lease_duration.checked_add(clock_skew).ok_or_else(|| {
        VipError::InvalidLifetime("lease duration plus clock skew overflows".to_string())
    })?;
    match configured {
        Some(0) => Err(VipError::InvalidLifetime(
            "a configured VIP lifetime of 0 s is not allowed; use at least 1 s".to_string(),
        )),
        Some(secs) if Duration::from_secs(u64::from(secs)) < bound => Ok(secs),
        Some(secs) => Err(VipError::InvalidLifetime(format!(
            "configured VIP lifetime {secs} s is not below lease duration + clock skew ({} ms); \
             a VIP could outlive the lease",
            bound.as_millis()
        ))),
        None => {
            // Largest whole number of seconds strictly below `bound`:
            // ceil(bound) - 1, i.e. (bound - 1 ns) truncated to seconds.
            let below = bound
                .checked_sub(Duration::from_nanos(1))
                .map(|d| d.as_secs())
                .unwrap_or(0);
            match u32::try_from(below) {
                Ok(secs) if secs >= 1 => Ok(secs),
                Ok(_) => Err(VipError::InvalidLifetime(format!(
                    "lease duration + clock skew ({} ms) leaves no whole second below it; \
                     raise leaseDurationMs or clockSkewMs",
                    bound.as_millis()
                ))),
                Err(_) => Err(VipError::InvalidLifetime(format!(
                    "lease duration + clock skew ({} s) is too long for a VIP lifetime",
                    bound.as_secs()
                ))),
            }
        }
    }
}

/// Converts a requested lifetime into the whole seconds given to the kernel,
/// rounding down (the fence must never be longer than asked).
fn kernel_lifetime(valid_lft: Duration) -> Result<u32, VipError> {
    match u32::try_from(valid_lft.as_secs()) {
        // u32::MAX is INFINITY_LIFE_TIME: a permanent address, no fence.
        Ok(secs) if (1..u32::MAX).contains(&secs) => Ok(secs),
        Ok(0) => Err(VipError::InvalidLifetime(format!(
            "{valid_lft:?} is below one second; the kernel needs a whole number of seconds >= 1"
        ))),
        _ => Err(VipError::InvalidLifetime(format!(
            "{valid_lft:?} is too long; a VIP must have a finite lifetime"
        ))),
    }
}

/// The kernel operations the agent needs for VIPs and the default route.
///
/// Every operation is idempotent, so a transition can be retried after a
/// crash: adding an existing VIP extends its lifetime, removing a missing
/// VIP or route succeeds.
pub trait Netlink: Send + Sync {
    /// Adds `vip` to interface `iface` with valid and preferred lifetime
    /// `valid_lft` (whole seconds, rounded down, at least 1). If the address
    /// exists it is replaced (`NLM_F_REPLACE`), which extends its lifetime.
    /// IPv6 VIPs are added with `IFA_F_NODAD`, usable at once.
    fn add_vip(
        &self,
        iface: &str,
        vip: &Vip,
        valid_lft: Duration,
    ) -> impl Future<Output = Result<(), VipError>> + Send;

    /// Extends the lifetime of `vip` on `iface` to `valid_lft` only if the
    /// address is still there; returns `false`, adding nothing, when it is
    /// gone (the kernel expired it: the holder missed its renewals, and the
    /// operator may have cleared another node). The kernel creates a missing
    /// address even without `NLM_F_CREATE`, so presence is checked first;
    /// the kernel expires addresses from a periodic task, not between the
    /// check and the replace of a running agent.
    fn extend_vip(
        &self,
        iface: &str,
        vip: &Vip,
        valid_lft: Duration,
    ) -> impl Future<Output = Result<bool, VipError>> + Send {
        async move {
            if !self.vip_present(iface, vip).await? {
                return Ok(false);
            }
            self.add_vip(iface, vip, valid_lft).await?;
            Ok(true)
        }
    }

    /// Removes `vip` from `iface`. A VIP that is not there counts as removed,
    /// and so does one whose interface no longer exists.
    fn del_vip(&self, iface: &str, vip: &Vip) -> impl Future<Output = Result<(), VipError>> + Send;

    /// Whether `vip` (address and prefix length) is on `iface`.
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

/// [`Netlink`] over an rtnetlink connection in the agent's network namespace.
///
/// Clones share one socket. The kernel runs one dump at a time per socket
/// and refuses a second one meanwhile (EBUSY), so dumps (addresses,
/// routes) on a connection take turns behind `dumps`.
#[derive(Clone)]
pub struct RtNetlink {
    handle: Handle,
    dumps: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for RtNetlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RtNetlink").finish_non_exhaustive()
    }
}

/// The negative errno in a netlink error, as a positive `Errno`.
fn errno_of(err: &rtnetlink::Error) -> Option<Errno> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// Wraps an rtnetlink error with the operation that failed.
fn nl_err(op: impl Into<String>, source: rtnetlink::Error) -> VipError {
    let op = op.into();
    match errno_of(&source) {
        Some(Errno::EPERM) | Some(Errno::EACCES) => VipError::PermissionDenied { op },
        _ => VipError::Netlink { op, source },
    }
}

/// The local address of an address message (IFA_LOCAL, else IFA_ADDRESS).
fn local_addr(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// Whether an address message carries the permanent flag.
fn is_permanent(msg: &AddressMessage) -> bool {
    let attr_flags = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Flags(f) => Some(*f),
        _ => None,
    });
    match attr_flags {
        Some(flags) => flags.contains(AddressFlags::Permanent),
        None => msg.header.flags.contains(AddressHeaderFlags::Permanent),
    }
}

/// Whether `addr` lies in the subnet `net/len`.
fn subnet_contains(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// The gateways of a route message, including those of multipath next hops.
fn route_gateways(msg: &RouteMessage) -> Vec<IpAddr> {
    fn from_attrs(attrs: &[RouteAttribute], out: &mut Vec<IpAddr>) {
        for attr in attrs {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => out.push(IpAddr::V4(*a)),
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => out.push(IpAddr::V6(*a)),
                RouteAttribute::Via(RouteVia::Inet(a)) => out.push(IpAddr::V4(*a)),
                RouteAttribute::Via(RouteVia::Inet6(a)) => out.push(IpAddr::V6(*a)),
                RouteAttribute::MultiPath(hops) => {
                    for hop in hops {
                        from_attrs(&hop.attributes, out);
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    from_attrs(&msg.attributes, &mut out);
    out
}

/// The routing table of a route message (RTA_TABLE wins over the header).
fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// The message for "default via GATEWAY" in the main table, protocol static.
fn default_route_message(gateway: IpAddr) -> RouteMessage {
    match gateway {
        IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build(),
        IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new().gateway(gw).build(),
    }
}

/// The address message identifying `vip` on interface `index`.
fn address_message(index: u32, vip: &Vip) -> AddressMessage {
    match vip.addr {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, vip.prefix_len)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, vip.prefix_len)
            .build(),
    }
}

impl RtNetlink {
    /// Opens a netlink route socket in the calling thread's network namespace
    /// and spawns its connection task on the current tokio runtime.
    pub fn new() -> Result<Self, VipError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| VipError::NoRuntime)?;
        let (connection, handle, _messages) =
            rtnetlink::new_connection().map_err(VipError::Socket)?;
        runtime.spawn(connection);
        Ok(RtNetlink {
            handle,
            dumps: Default::default(),
        })
    }

    /// The link message of `iface`, `None` if there is no such interface.
    async fn link_by_name(&self, iface: &str) -> Result<Option<LinkMessage>, VipError> {
        if validate_ifname(iface).is_err() {
            // The kernel could not hold such a name: there is no such link.
            return Ok(None);
        }
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(iface.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(e) if matches!(errno_of(&e), Some(Errno::ENODEV)) => Ok(None),
            Err(e) => Err(nl_err(format!("get link {iface}"), e)),
        }
    }

    /// The interface index of `iface`, or [`VipError::InterfaceMissing`].
    async fn index_of(&self, iface: &str) -> Result<u32, VipError> {
        match self.link_by_name(iface).await? {
            Some(link) => Ok(link.header.index),
            None => Err(VipError::InterfaceMissing(iface.to_string())),
        }
    }

    /// The name of the interface with index `index`.
    async fn name_of(&self, index: u32) -> Result<String, VipError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(|e| nl_err(format!("get link #{index}"), e))?;
        link.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .ok_or_else(|| VipError::InterfaceMissing(format!("#{index}")))
    }

    /// All addresses, optionally of one interface (one dump at a time on
    /// this connection).
    async fn addresses(&self, index: Option<u32>) -> Result<Vec<AddressMessage>, VipError> {
        let _turn = self.dumps.lock().await;
        let mut req = self.handle.address().get();
        if let Some(index) = index {
            req = req.set_link_index_filter(index);
        }
        req.execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump addresses", e))
    }

    /// The gateways of the default routes of `gateway`'s family in the main table.
    async fn default_gateways(&self, gateway: IpAddr) -> Result<Vec<IpAddr>, VipError> {
        let filter = match gateway {
            IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let _turn = self.dumps.lock().await;
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump routes", e))?;
        Ok(routes
            .iter()
            .filter(|r| {
                r.header.destination_prefix_length == 0
                    && r.header.kind == RouteType::Unicast
                    && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
            })
            .flat_map(route_gateways)
            .collect())
    }
}

impl Netlink for RtNetlink {
    async fn add_vip(&self, iface: &str, vip: &Vip, valid_lft: Duration) -> Result<(), VipError> {
        let secs = kernel_lifetime(valid_lft)?;
        let index = self.index_of(iface).await?;
        let mut req = self
            .handle
            .address()
            .add(index, vip.addr, vip.prefix_len)
            .replace();
        let msg = req.message_mut();
        let mut cache_info = CacheInfo::default();
        cache_info.ifa_valid = secs;
        cache_info.ifa_preferred = secs;
        msg.attributes.push(AddressAttribute::CacheInfo(cache_info));
        if vip.addr.is_ipv6() {
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute().await.map_err(|e| {
            nl_err(
                format!("add address {vip} on {iface} (valid_lft {secs}s)"),
                e,
            )
        })?;
        tracing::debug!(%vip, iface, valid_lft = secs, "VIP added or extended");
        Ok(())
    }

    async fn del_vip(&self, iface: &str, vip: &Vip) -> Result<(), VipError> {
        let index = match self.link_by_name(iface).await? {
            Some(link) => link.header.index,
            None => {
                tracing::warn!(%vip, iface, "interface is gone, so is the VIP on it");
                return Ok(());
            }
        };
        match self
            .handle
            .address()
            .del(address_message(index, vip))
            .execute()
            .await
        {
            Ok(()) => {
                tracing::debug!(%vip, iface, "VIP removed");
                Ok(())
            }
            Err(e)
                if matches!(
                    errno_of(&e),
                    Some(Errno::EADDRNOTAVAIL | Errno::ENOENT | Errno::ENODEV)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(nl_err(format!("delete address {vip} from {iface}"), e)),
        }
    }

    async fn vip_present(&self, iface: &str, vip: &Vip) -> Result<bool, VipError> {
        let index = self.index_of(iface).await?;
        let addrs = self.addresses(Some(index)).await?;
        Ok(addrs.iter().any(|m| {
            m.header.index == index
                && m.header.prefix_len == vip.prefix_len
                && local_addr(m) == Some(vip.addr)
        }))
    }

    async fn interface_for(&self, vip: &Vip) -> Result<String, VipError> {
        if let Some(name) = &vip.interface {
            self.index_of(name).await?;
            return Ok(name.clone());
        }
        let addrs = self.addresses(None).await?;
        // (prefix length, permanent, lower index wins) of the best match.
        let best = addrs
            .iter()
            .filter(|m| m.header.scope != AddressScope::Host)
            .filter_map(|m| {
                let ip = local_addr(m)?;
                (ip != vip.addr && subnet_contains(ip, m.header.prefix_len, vip.addr))
                    .then(|| (m.header.prefix_len, is_permanent(m), m.header.index))
            })
            .max_by(|a, b| {
                (a.0, a.1, std::cmp::Reverse(a.2)).cmp(&(b.0, b.1, std::cmp::Reverse(b.2)))
            });
        match best {
            Some((_, _, index)) => self.name_of(index).await,
            None => Err(VipError::NoInterface(vip.to_string())),
        }
    }

    async fn mac_of(&self, iface: &str) -> Result<[u8; 6], VipError> {
        let link = self
            .link_by_name(iface)
            .await?
            .ok_or_else(|| VipError::InterfaceMissing(iface.to_string()))?;
        if link.header.link_layer_type != LinkLayerType::Ether {
            return Err(VipError::NoMac(iface.to_string()));
        }
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .filter(|mac| mac.iter().any(|b| *b != 0))
            .ok_or_else(|| VipError::NoMac(iface.to_string()))
    }

    async fn add_default_route(&self, gateway: IpAddr) -> Result<(), VipError> {
        let result = self
            .handle
            .route()
            .add(default_route_message(gateway))
            .execute()
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno_of(&e), Some(Errno::EEXIST)) => {
                let existing = self.default_gateways(gateway).await?;
                if existing.contains(&gateway) {
                    Ok(())
                } else {
                    let existing = existing
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ");
                    Err(VipError::DefaultRouteConflict {
                        gateway,
                        existing: if existing.is_empty() {
                            "another gateway".to_string()
                        } else {
                            existing
                        },
                    })
                }
            }
            Err(e) => Err(nl_err(format!("add default route via {gateway}"), e)),
        }
    }

    async fn del_default_route(&self, gateway: IpAddr) -> Result<(), VipError> {
        match self
            .handle
            .route()
            .del(default_route_message(gateway))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno_of(&e), Some(Errno::ESRCH | Errno::ENOENT)) => Ok(()),
            Err(e) => Err(nl_err(format!("delete default route via {gateway}"), e)),
        }
    }
}

/// Throwaway network namespaces for the real-kernel tests of this crate.
///
/// A parent test creates a namespace named `kubeha-ut-...` (deleted by a
/// drop guard, also when the test fails), sets up interfaces with `ip -n`,
/// and re-executes the test binary inside it with `ip netns exec`, selecting
/// one case through an environment variable. Every thread of that child
/// process lives in the namespace, so netlink and packet sockets (and the
/// frames they send) stay in it.
#[cfg(test)]
pub(crate) mod netns_harness {
    use std::fmt;
    use std::io::{Read, Seek};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    /// Name prefix of every namespace the tests create.
    pub(crate) const NS_PREFIX: &str = "kubeha-ut-";
    /// Selects the case a child process runs.
    const CASE_ENV: &str = "KUBEHA_NETNS_CASE";
    /// The namespace a child process must find itself in.
    const NS_ENV: &str = "KUBEHA_NETNS_NAME";
    /// Printed by a child whose case passed.
    const OK_MARKER: &str = "KUBEHA-NETNS-CASE-OK";
    /// How long one child may run.
    const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

    /// A test failure whose Debug output is the plain message, so a test
    /// returning `Err` prints something readable.
    pub(crate) struct Failure(pub(crate) String);

    impl fmt::Debug for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl From<String> for Failure {
        fn from(s: String) -> Self {
            Failure(s)
        }
    }

    impl From<&str> for Failure {
        fn from(s: &str) -> Self {
            Failure(s.to_string())
        }
    }

    impl From<super::VipError> for Failure {
        fn from(e: super::VipError) -> Self {
            Failure(format!("VipError: {e}"))
        }
    }

    impl From<crate::garp::GarpError> for Failure {
        fn from(e: crate::garp::GarpError) -> Self {
            Failure(format!("GarpError: {e}"))
        }
    }

    impl From<std::io::Error> for Failure {
        fn from(e: std::io::Error) -> Self {
            Failure(format!("I/O error: {e}"))
        }
    }

    /// Result of a test or case.
    pub(crate) type TestResult = Result<(), Failure>;

    /// `check!(cond, "fmt", args)`: return a [`Failure`] unless `cond`.
    macro_rules! check {
        ($cond:expr, $($msg:tt)+) => {
            if !$cond {
                return Err($crate::vip::netns_harness::Failure(format!($($msg)+)));
            }
        };
    }
    pub(crate) use check;

    /// Fails clearly unless we are root and iproute2's `ip` is installed.
    pub(crate) fn require_root_and_ip() -> TestResult {
        if !nix::unistd::geteuid().is_root() {
            return Err(Failure(
                "kernel tests need root: they create network namespaces, interfaces and \
                 addresses; run `cargo test -p kubeha-agent` as root"
                    .to_string(),
            ));
        }
        match Command::new("ip").arg("-V").output() {
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(Failure(format!(
                "`ip -V` failed ({}); kernel tests need a working iproute2",
                out.status
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Failure(
                "iproute2 `ip` is not in PATH; kernel tests need iproute2 (apt-get install iproute2)"
                    .to_string(),
            )),
            Err(e) => Err(Failure(format!("cannot run `ip`: {e}"))),
        }
    }

    /// Runs a command, returning its stdout or a failure with its stderr.
    pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, Failure> {
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Failure(format!("cannot run {program} {}: {e}", args.join(" "))))?;
        if !out.status.success() {
            return Err(Failure(format!(
                "`{program} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -j ARGS` in the current namespace, parsed.
    pub(crate) fn ip_json(args: &[&str]) -> Result<serde_json::Value, Failure> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = run("ip", &full)?;
        if out.trim().is_empty() {
            return Ok(serde_json::Value::Array(Vec::new()));
        }
        serde_json::from_str(&out).map_err(|e| {
            Failure(format!(
                "`ip {}` printed no JSON ({e}): {out}",
                full.join(" ")
            ))
        })
    }

    /// The `addr_info` entry of `addr` on `dev` in the current namespace.
    pub(crate) fn addr_entry(
        dev: &str,
        addr: std::net::IpAddr,
    ) -> Result<Option<serde_json::Value>, Failure> {
        let links = ip_json(&["addr", "show", "dev", dev])?;
        let wanted = addr.to_string();
        Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.get("addr_info").and_then(|a| a.as_array()))
            .flatten()
            .find(|a| a.get("local").and_then(|l| l.as_str()) == Some(wanted.as_str()))
            .cloned())
    }

    /// A network namespace deleted on drop.
    pub(crate) struct NetNs {
        name: String,
    }

    impl NetNs {
        /// Creates an empty namespace `kubeha-ut-TAG-PID-N` with `lo` up.
        pub(crate) fn new(tag: &str) -> Result<NetNs, Failure> {
            require_root_and_ip()?;
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "{NS_PREFIX}{tag}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            run("ip", &["netns", "add", &name])?;
            let ns = NetNs { name };
            ns.ip(&["link", "set", "lo", "up"])?;
            Ok(ns)
        }

        /// A namespace with the test segment: veth0 (198.18.0.1/24,
        /// 2001:db8::1/64) paired with veth1 (no address), and dummy0
        /// (198.19.0.1/24, 2001:db8:1::1/64) paired with dummy1. Nothing
        /// connects it to any other namespace.
        pub(crate) fn with_lab_links(tag: &str) -> Result<NetNs, Failure> {
            let ns = NetNs::new(tag)?;
            ns.ip(&[
                "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
            ])?;
            // A second pair stands in for a dummy interface (not every
            // kernel has the dummy module).
            ns.ip(&[
                "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1",
            ])?;
            for dev in ["veth0", "veth1", "dummy0", "dummy1"] {
                ns.ip(&["link", "set", dev, "up"])?;
            }
            ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "veth0"])?;
            ns.ip(&["addr", "add", "2001:db8::1/64", "dev", "veth0", "nodad"])?;
            ns.ip(&["addr", "add", "198.19.0.1/24", "dev", "dummy0"])?;
            ns.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "dummy0", "nodad"])?;
            Ok(ns)
        }

        /// `ip -n NAME ARGS`.
        pub(crate) fn ip(&self, args: &[&str]) -> Result<String, Failure> {
            let mut full = vec!["-n", self.name.as_str()];
            full.extend_from_slice(args);
            run("ip", &full)
        }

        /// Runs `case` of the child test `test_path` (as libtest names it,
        /// e.g. `vip::tests::netns_child`) inside this namespace.
        pub(crate) fn run_case(&self, test_path: &str, case: &str) -> TestResult {
            let exe = std::env::current_exe()
                .map_err(|e| Failure(format!("cannot find the test binary: {e}")))?;
            let mut log = tempfile::tempfile()?;
            let mut child = Command::new("ip")
                .args(["netns", "exec", &self.name])
                .arg(&exe)
                .args([
                    test_path,
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CASE_ENV, case)
                .env(NS_ENV, &self.name)
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log.try_clone()?))
                .spawn()
                .map_err(|e| Failure(format!("cannot start `ip netns exec`: {e}")))?;
            let deadline = Instant::now() + CHILD_TIMEOUT;
            let status = loop {
                if let Some(status) = child.try_wait()? {
                    break Some(status);
                }
                if Instant::now() > deadline {
                    // Our own child: end it by its id.
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let mut output = String::new();
            log.rewind()?;
            log.read_to_string(&mut output)?;
            match status {
                None => Err(Failure(format!(
                    "case {case} in {} timed out after {CHILD_TIMEOUT:?}; output:\n{output}",
                    self.name
                ))),
                Some(s) if s.success() && output.contains(&format!("{OK_MARKER} {case}")) => {
                    // Captured by libtest; shown with --nocapture.
                    println!("case {case} in {}:\n{output}", self.name);
                    Ok(())
                }
                Some(s) => Err(Failure(format!(
                    "case {case} in namespace {} failed ({s}); child output:\n{output}",
                    self.name
                ))),
            }
        }
    }

    impl Drop for NetNs {
        fn drop(&mut self) {
            if let Err(e) = run("ip", &["netns", "del", &self.name]) {
                eprintln!(
                    "warning: could not delete test namespace {}: {e:?}",
                    self.name
                );
            }
        }
    }

    /// The entry of a child test: does nothing in a normal test run; in a
    /// child started by [`NetNs::run_case`], checks it is inside its
    /// `kubeha-ut-` namespace, runs the selected case on a tokio runtime and
    /// reports success with a marker, failure with a panic carrying the message.
    pub(crate) fn child_entry<F, Fut>(run_case: F)
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = TestResult>,
    {
        let Ok(case) = std::env::var(CASE_ENV) else {
            return;
        };
        let expected = std::env::var(NS_ENV).unwrap_or_default();
        let here = run("ip", &["netns", "identify"]).unwrap_or_default();
        if !expected.starts_with(NS_PREFIX) || !here.split_whitespace().any(|n| n == expected) {
            panic!(
                "refusing to run kernel test case {case}: not inside a {NS_PREFIX} namespace \
                 (expected {expected:?}, `ip netns identify` says {here:?})"
            );
        }
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("case {case}: cannot build a tokio runtime: {e}"),
        };
        match runtime.block_on(run_case(case.clone())) {
            Ok(()) => println!("{OK_MARKER} {case}"),
            Err(f) => panic!("case {case} failed: {}", f.0),
        }
    }

    /// The libtest path of `name` in the module `module` (from `module_path!()`).
    pub(crate) fn test_path(module: &str, name: &str) -> String {
        let module = module.split_once("::").map_or("", |(_, rest)| rest);
        format!("{module}::{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::netns_harness::{
        NetNs, TestResult, addr_entry, check, child_entry, ip_json, test_path,
    };
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    // ---- parsing -------------------------------------------------------

    #[test]
    fn parse_accepts_ipv4_and_ipv6_cidrs() {
        let v4 = Vip::parse("198.18.0.100/24", None).unwrap();
        assert_eq!(v4.addr, "198.18.0.100".parse::<IpAddr>().unwrap());
        assert_eq!(v4.prefix_len, 24);
        assert_eq!(v4.interface, None);
        assert_eq!(v4.to_string(), "198.18.0.100/24");

        let v6 = Vip::parse("2001:db8::100/64", Some("eth0")).unwrap();
        assert_eq!(v6.addr, "2001:db8::100".parse::<IpAddr>().unwrap());
        assert_eq!(v6.prefix_len, 64);
        assert_eq!(v6.interface.as_deref(), Some("eth0"));
        assert_eq!(v6.to_string(), "2001:db8::100/64");

        assert_eq!(Vip::parse("198.18.0.100/32", None).unwrap().prefix_len, 32);
        assert_eq!(Vip::parse("2001:db8::1/128", None).unwrap().prefix_len, 128);
        // Display round-trips.
        for s in ["198.18.0.100/24", "2001:db8::100/64", "10.0.0.1/0"] {
            assert_eq!(Vip::parse(s, None).unwrap().to_string(), s);
        }
    }

    #[test]
    fn parse_refuses_bad_input_without_panicking() {
        let bad = [
            "",
            "/",
            "198.18.0.100",
            "198.18.0.100/",
            "/24",
            "abc/24",
            "198.18.0.100/33",
            "198.18.0.100/-1",
            "198.18.0.100/+4",
            "198.18.0.100/ 24",
            "198.18.0.100/24/1",
            "198.18.0.100/999999999999999999999",
            "2001:db8::1/129",
            " 198.18.0.100/24",
            "0.0.0.0/0",
            "::/0",
            "127.0.0.1/8",
            "::1/128",
            "224.0.0.1/4",
            "ff02::1/16",
            "255.255.255.255/32",
            "198.18.0.300/24",
        ];
        for input in bad {
            match Vip::parse(input, None) {
                Err(VipError::Parse { input: i, reason }) => {
                    assert_eq!(i, input);
                    assert!(!reason.is_empty());
                }
                other => panic!("{input:?} should be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn parse_refuses_bad_interface_names() {
        for name in [
            "",
            ".",
            "..",
            "a/b",
            "eth 0",
            "eth0:1",
            "sixteen-chars-xx",
            "tab\t",
        ] {
            let err = Vip::parse("198.18.0.100/24", Some(name)).unwrap_err();
            assert!(
                err.to_string().contains("interface"),
                "{name:?}: unexpected message {err}"
            );
        }
        assert!(Vip::parse("198.18.0.100/24", Some("fifteen-chars-x")).is_ok());
    }

    #[test]
    fn subnet_contains_matches_prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(subnet_contains(ip("198.18.0.1"), 24, ip("198.18.0.200")));
        assert!(!subnet_contains(ip("198.18.0.1"), 24, ip("198.18.1.1")));
        assert!(subnet_contains(ip("198.18.0.1"), 0, ip("203.0.113.1")));
        assert!(subnet_contains(ip("198.18.0.1"), 32, ip("198.18.0.1")));
        assert!(!subnet_contains(ip("198.18.0.1"), 32, ip("198.18.0.2")));
        assert!(subnet_contains(ip("2001:db8::1"), 64, ip("2001:db8::ffff")));
        assert!(!subnet_contains(ip("2001:db8::1"), 64, ip("2001:db8:1::1")));
        assert!(subnet_contains(ip("2001:db8::1"), 0, ip("2001:db9::1")));
        assert!(subnet_contains(ip("2001:db8::1"), 128, ip("2001:db8::1")));
        // Mixed families and impossible prefixes never match.
        assert!(!subnet_contains(ip("198.18.0.1"), 0, ip("2001:db8::1")));
        assert!(!subnet_contains(ip("198.18.0.1"), 33, ip("198.18.0.1")));
        assert!(!subnet_contains(ip("2001:db8::1"), 129, ip("2001:db8::1")));
    }

    // ---- lifetimes -----------------------------------------------------

    #[test]
    fn lifetime_defaults_to_largest_whole_second_below_bound() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        // The CRD defaults: D = 3 s, skew 500 ms.
        assert_eq!(lifetime_secs(s(3), ms(500), None).unwrap(), 3);
        // With 1 s skew the bound is 4 s.
        assert_eq!(lifetime_secs(s(3), s(1), None).unwrap(), 3);
        // Exact whole bound: strictly below it.
        assert_eq!(lifetime_secs(s(3), s(0), None).unwrap(), 2);
        assert_eq!(lifetime_secs(s(2), s(0), None).unwrap(), 1);
        // Fractional bound: truncate.
        assert_eq!(lifetime_secs(ms(2500), s(0), None).unwrap(), 2);
        assert_eq!(lifetime_secs(s(1), ms(500), None).unwrap(), 1);
        assert_eq!(lifetime_secs(s(1), ms(1), None).unwrap(), 1);
        assert_eq!(lifetime_secs(s(300), s(10), None).unwrap(), 309);
    }

    #[test]
    fn lifetime_refuses_bounds_without_a_whole_second() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (d, skew) in [
            (s(1), s(0)),
            (ms(999), ms(1)),
            (s(0), s(0)),
            (ms(500), ms(300)),
        ] {
            let err = lifetime_secs(d, skew, None).unwrap_err();
            assert!(
                matches!(err, VipError::InvalidLifetime(_)),
                "{d:?}+{skew:?}: {err}"
            );
        }
    }

    #[test]
    fn lifetime_takes_configured_value_only_below_bound() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(lifetime_secs(s(3), s(1), Some(3)).unwrap(), 3);
        assert_eq!(lifetime_secs(s(3), s(1), Some(1)).unwrap(), 1);
        assert_eq!(lifetime_secs(s(1), ms(1), Some(1)).unwrap(), 1);
        for (d, skew, c) in [
            (s(3), s(1), 4),
            (s(3), s(1), 5),
            (s(1), s(0), 1),
            (s(3), s(1), 0),
        ] {
            let err = lifetime_secs(d, skew, Some(c)).unwrap_err();
            assert!(
                matches!(err, VipError::InvalidLifetime(_)),
                "{d:?}+{skew:?} configured {c}: {err}"
            );
        }
        let msg = lifetime_secs(s(3), s(1), Some(4)).unwrap_err().to_string();
        assert!(msg.contains("outlive the lease"), "{msg}");
    }

    #[test]
    fn lifetime_handles_overflow() {
        assert!(lifetime_secs(Duration::MAX, Duration::from_secs(1), None).is_err());
        assert!(lifetime_secs(Duration::from_secs(u64::MAX / 2), Duration::ZERO, None).is_err());
        assert!(
            lifetime_secs(
                Duration::from_secs(u64::MAX / 2),
                Duration::ZERO,
                Some(u32::MAX)
            )
            .is_ok()
        );
    }

    #[test]
    fn kernel_lifetime_is_finite_and_at_least_one_second() {
        assert_eq!(kernel_lifetime(Duration::from_millis(2999)).unwrap(), 2);
        assert_eq!(kernel_lifetime(Duration::from_secs(1)).unwrap(), 1);
        assert!(kernel_lifetime(Duration::from_millis(999)).is_err());
        assert!(kernel_lifetime(Duration::ZERO).is_err());
        assert!(kernel_lifetime(Duration::from_secs(u64::from(u32::MAX))).is_err());
        assert!(kernel_lifetime(Duration::MAX).is_err());
    }

    #[test]
    fn error_messages_name_the_fix() {
        let vip = Vip::parse("203.0.113.5/24", None).unwrap();
        let msg = VipError::NoInterface(vip.to_string()).to_string();
        assert!(
            msg.contains("203.0.113.5/24") && msg.contains("spec.vips[].interface"),
            "{msg}"
        );
        let msg = VipError::InterfaceMissing("eth9".into()).to_string();
        assert!(msg.contains("\"eth9\""), "{msg}");
    }

    #[test]
    fn rtnetlink_new_outside_a_runtime_is_an_error() {
        assert!(matches!(RtNetlink::new(), Err(VipError::NoRuntime)));
    }

    // ---- the trait is usable with a fake --------------------------------

    /// An in-memory [`Netlink`]: what transition tests will use.
    #[derive(Default)]
    struct FakeNetlink {
        /// (interface, address) -> (prefix length, valid lifetime in s).
        addrs: Mutex<HashMap<(String, IpAddr), (u8, u64)>>,
        interfaces: Vec<(String, IpAddr, u8)>,
    }

    impl Netlink for FakeNetlink {
        async fn add_vip(&self, iface: &str, vip: &Vip, lft: Duration) -> Result<(), VipError> {
            if !self.interfaces.iter().any(|(n, _, _)| n == iface) {
                return Err(VipError::InterfaceMissing(iface.into()));
            }
            let secs = u64::from(kernel_lifetime(lft)?);
            let mut addrs = self.addrs.lock().map_err(|_| VipError::NoRuntime)?;
            addrs.insert((iface.into(), vip.addr), (vip.prefix_len, secs));
            Ok(())
        }
        async fn del_vip(&self, iface: &str, vip: &Vip) -> Result<(), VipError> {
            let mut addrs = self.addrs.lock().map_err(|_| VipError::NoRuntime)?;
            addrs.remove(&(iface.to_string(), vip.addr));
            Ok(())
        }
        async fn vip_present(&self, iface: &str, vip: &Vip) -> Result<bool, VipError> {
            let addrs = self.addrs.lock().map_err(|_| VipError::NoRuntime)?;
            Ok(addrs
                .get(&(iface.to_string(), vip.addr))
                .is_some_and(|(len, _)| *len == vip.prefix_len))
        }
        async fn interface_for(&self, vip: &Vip) -> Result<String, VipError> {
            self.interfaces
                .iter()
                .find(|(_, ip, len)| subnet_contains(*ip, *len, vip.addr))
                .map(|(n, _, _)| n.clone())
                .ok_or_else(|| VipError::NoInterface(vip.to_string()))
        }
        async fn mac_of(&self, _iface: &str) -> Result<[u8; 6], VipError> {
            Ok([0x02, 0, 0, 0, 0, 1])
        }
        async fn add_default_route(&self, _gateway: IpAddr) -> Result<(), VipError> {
            Ok(())
        }
        async fn del_default_route(&self, _gateway: IpAddr) -> Result<(), VipError> {
            Ok(())
        }
    }

    /// A transition-like routine generic over the trait.
    async fn hold_all<N: Netlink>(nl: &N, vips: &[Vip], lft: Duration) -> Result<usize, VipError> {
        for vip in vips {
            let iface = nl.interface_for(vip).await?;
            nl.add_vip(&iface, vip, lft).await?;
        }
        Ok(vips.len())
    }

    #[tokio::test]
    async fn netlink_trait_supports_fakes_and_spawned_tasks() {
        let fake = std::sync::Arc::new(FakeNetlink {
            interfaces: vec![("eth0".into(), "198.18.0.1".parse().unwrap(), 24)],
            ..FakeNetlink::default()
        });
        let vips = vec![Vip::parse("198.18.0.100/24", None).unwrap()];
        // The futures are Send: the routine runs on a spawned task.
        let task = tokio::spawn({
            let fake = fake.clone();
            let vips = vips.clone();
            async move { hold_all(fake.as_ref(), &vips, Duration::from_secs(3)).await }
        });
        assert_eq!(task.await.unwrap().unwrap(), 1);
        assert!(fake.vip_present("eth0", &vips[0]).await.unwrap());
        let uncovered = Vip::parse("203.0.113.5/24", None).unwrap();
        assert!(matches!(
            hold_all(fake.as_ref(), &[uncovered], Duration::from_secs(3)).await,
            Err(VipError::NoInterface(_))
        ));
    }

    // ---- real kernel, inside throwaway namespaces -------------------------

    /// Runs `case` of [`netns_child`] in a fresh namespace with the test links.
    fn kernel_case(case: &str) -> TestResult {
        let ns = NetNs::with_lab_links(case)?;
        ns.run_case(&test_path(module_path!(), "netns_child"), case)
    }

    #[test]
    fn kernel_add_vip_sets_and_extends_lifetime() -> TestResult {
        kernel_case("add-extend")
    }

    #[test]
    fn kernel_del_vip_is_idempotent() -> TestResult {
        kernel_case("del-idempotent")
    }

    #[test]
    fn kernel_interface_for_picks_the_subnet_interface() -> TestResult {
        kernel_case("interface-for")
    }

    #[test]
    fn kernel_fence_expires_vips_by_themselves() -> TestResult {
        kernel_case("kernel-fence")
    }

    #[test]
    fn kernel_mac_of_reads_the_link_address() -> TestResult {
        kernel_case("mac-of")
    }

    #[test]
    fn kernel_default_route_add_and_del_are_idempotent() -> TestResult {
        kernel_case("default-route")
    }

    #[test]
    fn kernel_address_reads_over_one_connection_never_collide() -> TestResult {
        kernel_case("dump-under-churn")
    }

    /// Child side: does nothing unless started by [`NetNs::run_case`].
    /// Ignored in a normal run: it is an entry point, not a test of its own.
    #[test]
    #[ignore = "entry point of the namespace child process"]
    fn netns_child() {
        child_entry(|case| async move {
            match case.as_str() {
                "add-extend" => case_add_extend().await,
                "del-idempotent" => case_del_idempotent().await,
                "interface-for" => case_interface_for().await,
                "kernel-fence" => case_kernel_fence().await,
                "mac-of" => case_mac_of().await,
                "default-route" => case_default_route().await,
                "dump-under-churn" => case_dump_under_churn().await,
                other => Err(format!("unknown case {other}").into()),
            }
        });
    }

    fn lifetimes(entry: &serde_json::Value) -> (u64, u64) {
        let get = |k: &str| entry.get(k).and_then(|v| v.as_u64()).unwrap_or(u64::MAX);
        (get("valid_life_time"), get("preferred_life_time"))
    }

    /// The on-link routes of the base addresses on veth0 survive VIP removal.
    fn base_routes_intact() -> TestResult {
        for (family, prefix) in [("-4", "198.18.0.0/24"), ("-6", "2001:db8::/64")] {
            let routes = ip_json(&[family, "route", "show", prefix, "dev", "veth0"])?;
            let n = routes.as_array().map_or(0, Vec::len);
            check!(n == 1, "route {prefix} on veth0: {routes}");
            check!(
                routes.get(0).and_then(|r| r.get("expires")).is_none(),
                "route {prefix} got an expiry from the VIP: {routes}"
            );
        }
        Ok(())
    }

    fn flag(entry: &serde_json::Value, name: &str) -> bool {
        entry.get(name).and_then(|v| v.as_bool()).unwrap_or(false)
    }

    async fn case_add_extend() -> TestResult {
        let nl = RtNetlink::new()?;
        for cidr in ["198.18.0.100/24", "2001:db8::100/64"] {
            let vip = Vip::parse(cidr, None)?;
            check!(
                !nl.vip_present("veth0", &vip).await?,
                "{vip} present before add"
            );

            nl.add_vip("veth0", &vip, Duration::from_secs(30)).await?;
            let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} not added"))?;
            let (valid, preferred) = lifetimes(&entry);
            check!(
                (25..=30).contains(&valid),
                "{vip}: valid_life_time {valid}, asked 30"
            );
            check!(
                (25..=30).contains(&preferred),
                "{vip}: preferred_life_time {preferred}"
            );
            check!(
                entry.get("prefixlen").and_then(|p| p.as_u64()) == Some(u64::from(vip.prefix_len)),
                "{vip}: wrong prefix in {entry}"
            );
            check!(
                nl.vip_present("veth0", &vip).await?,
                "vip_present false after add"
            );
            if vip.addr.is_ipv6() {
                check!(
                    !flag(&entry, "tentative"),
                    "{vip} is tentative (DAD ran): {entry}"
                );
                check!(flag(&entry, "nodad"), "{vip} lacks nodad: {entry}");
            }

            // Renew: the address exists, the lifetime is replaced (extended).
            nl.add_vip("veth0", &vip, Duration::from_secs(60)).await?;
            let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} vanished"))?;
            let (valid, preferred) = lifetimes(&entry);
            check!(
                (55..=60).contains(&valid),
                "{vip}: after renew valid {valid}, asked 60"
            );
            check!(
                (55..=60).contains(&preferred),
                "{vip}: after renew preferred {preferred}"
            );
            if vip.addr.is_ipv6() {
                check!(!flag(&entry, "tentative"), "{vip} tentative after renew");
            }

            // The lifetime is set, not maxed: a shorter renewal shortens it.
            nl.add_vip("veth0", &vip, Duration::from_secs(10)).await?;
            let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} vanished"))?;
            let (valid, _) = lifetimes(&entry);
            check!(valid <= 10, "{vip}: valid {valid} after asking 10");

            // Exactly one copy of the address.
            let count = ip_json(&["addr", "show", "dev", "veth0"])?
                .to_string()
                .matches(&format!("\"{}\"", vip.addr))
                .count();
            check!(count == 1, "{vip} appears {count} times");
        }

        let vip = Vip::parse("198.18.0.101/24", None)?;
        let err = nl.add_vip("nosuch0", &vip, Duration::from_secs(5)).await;
        check!(
            matches!(&err, Err(VipError::InterfaceMissing(n)) if n == "nosuch0"),
            "add on a missing interface: {err:?}"
        );
        let err = nl.add_vip("veth0", &vip, Duration::from_millis(500)).await;
        check!(
            matches!(err, Err(VipError::InvalidLifetime(_))),
            "sub-second lifetime: {err:?}"
        );
        check!(
            addr_entry("veth0", vip.addr)?.is_none(),
            "{vip} added despite the error"
        );
        Ok(())
    }

    /// Twenty VIPs of each family come and go in bursts while ten tasks
    /// read the addresses over one connection (as when many services enter
    /// one node at once): every read succeeds, though the kernel refuses a
    /// second dump on a socket while one runs (EBUSY).
    async fn case_dump_under_churn() -> TestResult {
        let nl = RtNetlink::new()?;
        let churner = RtNetlink::new()?;
        let vips: Vec<Vip> = (0..20)
            .flat_map(|k| {
                [
                    format!("198.18.0.{}/24", 150 + k),
                    format!("2001:db8::{:x}/64", 0x150 + k),
                ]
            })
            .map(|c| Vip::parse(&c, None))
            .collect::<Result<_, _>>()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            let vips = vips.clone();
            tokio::spawn(async move {
                let mut rounds = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for vip in &vips {
                        churner
                            .add_vip("veth0", vip, Duration::from_secs(30))
                            .await?;
                    }
                    for vip in &vips {
                        churner.del_vip("veth0", vip).await?;
                    }
                    rounds += 1;
                    // Bursts, not a storm: a pause as between two handovers.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok::<u32, VipError>(rounds)
            })
        };
        // Ten readers share one connection, as the tasks of ten services
        // entering one node at once do.
        let readers: Vec<_> = (0..10)
            .map(|r| {
                let nl = nl.clone();
                let probe = vips[r].clone();
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    for _ in 0..200 {
                        if let Err(e) = nl.vip_present("veth0", &probe).await {
                            failures.push(e.to_string());
                        }
                    }
                    failures
                })
            })
            .collect();
        let mut failures = Vec::new();
        for r in readers {
            failures.extend(r.await.map_err(|e| e.to_string())?);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = churn.await.map_err(|e| e.to_string())??;
        check!(rounds > 0, "the churn never ran a round");
        check!(
            failures.is_empty(),
            "{} of 2000 address reads failed during {rounds} rounds of churn, e.g. {}",
            failures.len(),
            failures[0]
        );
        Ok(())
    }

    async fn case_del_idempotent() -> TestResult {
        let nl = RtNetlink::new()?;
        for cidr in ["198.18.0.100/24", "2001:db8::100/64"] {
            let vip = Vip::parse(cidr, None)?;
            nl.add_vip("veth0", &vip, Duration::from_secs(30)).await?;
            check!(addr_entry("veth0", vip.addr)?.is_some(), "{vip} not added");
            nl.del_vip("veth0", &vip).await?;
            check!(
                addr_entry("veth0", vip.addr)?.is_none(),
                "{vip} still there after del"
            );
            check!(
                !nl.vip_present("veth0", &vip).await?,
                "vip_present after del"
            );
            nl.del_vip("veth0", &vip).await?;
            // Never added, and an interface that does not exist.
            let other = Vip::parse(
                if vip.addr.is_ipv4() {
                    "198.18.0.222/24"
                } else {
                    "2001:db8::222/64"
                },
                None,
            )?;
            nl.del_vip("veth0", &other).await?;
            nl.del_vip("nosuch0", &vip).await?;
        }
        base_routes_intact()?;
        // The base addresses are untouched.
        check!(
            addr_entry("veth0", "198.18.0.1".parse().map_err(|_| "ip")?)?.is_some(),
            "base v4 gone"
        );
        check!(
            addr_entry("veth0", "2001:db8::1".parse().map_err(|_| "ip")?)?.is_some(),
            "base v6 gone"
        );
        Ok(())
    }

    async fn case_interface_for() -> TestResult {
        let nl = RtNetlink::new()?;
        let expect = [
            ("198.18.0.100/24", "veth0"),
            ("2001:db8::100/64", "veth0"),
            ("198.19.0.7/24", "dummy0"),
            ("2001:db8:1::7/64", "dummy0"),
        ];
        for (cidr, want) in expect {
            let got = nl.interface_for(&Vip::parse(cidr, None)?).await?;
            check!(got == want, "{cidr}: got {got}, want {want}");
        }
        // A named interface wins over the subnet.
        let named = Vip::parse("198.18.0.100/24", Some("dummy0"))?;
        let got = nl.interface_for(&named).await?;
        check!(got == "dummy0", "named interface: got {got}");
        let missing = Vip::parse("198.18.0.100/24", Some("nosuch0"))?;
        let err = nl.interface_for(&missing).await;
        check!(
            matches!(&err, Err(VipError::InterfaceMissing(n)) if n == "nosuch0"),
            "missing named interface: {err:?}"
        );

        // Uncovered: a clear error naming the VIP and the fix.
        let uncovered = Vip::parse("203.0.113.5/24", None)?;
        match nl.interface_for(&uncovered).await {
            Err(e @ VipError::NoInterface(_)) => {
                let msg = e.to_string();
                check!(
                    msg.contains("203.0.113.5/24") && msg.contains("spec.vips[].interface"),
                    "unclear message: {msg}"
                );
            }
            other => return Err(format!("uncovered VIP: {other:?}").into()),
        }
        // A VIP does not cover itself: adding it somewhere changes nothing.
        nl.add_vip("dummy0", &uncovered, Duration::from_secs(30))
            .await?;
        let err = nl.interface_for(&uncovered).await;
        check!(
            matches!(err, Err(VipError::NoInterface(_))),
            "VIP covered itself: {err:?}"
        );

        // A VIP already held keeps resolving to the interface of its subnet.
        let held = Vip::parse("198.18.0.100/24", None)?;
        nl.add_vip("veth0", &held, Duration::from_secs(30)).await?;
        let got = nl.interface_for(&held).await?;
        check!(got == "veth0", "held VIP: got {got}");

        // Longest prefix wins.
        super::netns_harness::run("ip", &["addr", "add", "198.18.0.129/25", "dev", "dummy0"])?;
        let got = nl
            .interface_for(&Vip::parse("198.18.0.200/24", None)?)
            .await?;
        check!(got == "dummy0", "longest prefix: got {got}");
        let got = nl
            .interface_for(&Vip::parse("198.18.0.20/24", None)?)
            .await?;
        check!(got == "veth0", "outside the /25: got {got}");
        Ok(())
    }

    async fn case_kernel_fence() -> TestResult {
        let nl = RtNetlink::new()?;
        let vips = [
            Vip::parse("198.18.0.100/24", None)?,
            Vip::parse("2001:db8::100/64", None)?,
        ];
        let start = std::time::Instant::now();
        for vip in &vips {
            nl.add_vip("veth0", vip, Duration::from_secs(2)).await?;
        }
        let mut gone_at = [None, None];
        while start.elapsed() < Duration::from_secs(6) && gone_at.iter().any(Option::is_none) {
            for (i, vip) in vips.iter().enumerate() {
                if gone_at[i].is_none() && !nl.vip_present("veth0", vip).await? {
                    gone_at[i] = Some(start.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (vip, gone) in vips.iter().zip(gone_at) {
            let gone = gone.ok_or(format!("{vip} still present 6 s after a 2 s lifetime"))?;
            println!("{vip}: expired by the kernel after {gone:?}");
            check!(
                gone >= Duration::from_millis(1500),
                "{vip} vanished too early: {gone:?}"
            );
            check!(
                gone <= Duration::from_millis(4000),
                "{vip} outlived its lifetime: {gone:?}"
            );
            // An extension never brings an expired VIP back.
            check!(
                !nl.extend_vip("veth0", vip, Duration::from_secs(30)).await?,
                "extending the expired {vip} reported it present"
            );
            check!(
                !nl.vip_present("veth0", vip).await?,
                "extending the expired {vip} added it back"
            );
            // A present one is extended.
            nl.add_vip("veth0", vip, Duration::from_secs(2)).await?;
            check!(
                nl.extend_vip("veth0", vip, Duration::from_secs(30)).await?,
                "extending the present {vip} reported it gone"
            );
            let entry = addr_entry("veth0", vip.addr)?.ok_or(format!("{vip} vanished"))?;
            let (valid, _) = lifetimes(&entry);
            check!(
                (25..=30).contains(&valid),
                "{vip}: valid {valid} after extending to 30"
            );
            nl.del_vip("veth0", vip).await?;
        }
        base_routes_intact()
    }

    async fn case_mac_of() -> TestResult {
        let nl = RtNetlink::new()?;
        let links = ip_json(&["link", "show", "dev", "veth0"])?;
        let want = links
            .get(0)
            .and_then(|l| l.get("address"))
            .and_then(|a| a.as_str())
            .ok_or("no address in ip -j link")?
            .to_string();
        let mac = nl.mac_of("veth0").await?;
        let got = mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        check!(got == want, "mac_of veth0 = {got}, ip says {want}");
        let err = nl.mac_of("lo").await;
        check!(matches!(err, Err(VipError::NoMac(_))), "mac_of lo: {err:?}");
        let err = nl.mac_of("nosuch0").await;
        check!(
            matches!(err, Err(VipError::InterfaceMissing(_))),
            "mac_of nosuch0: {err:?}"
        );
        Ok(())
    }

    async fn case_default_route() -> TestResult {
        let nl = RtNetlink::new()?;
        for (family, gw, other) in [
            ("-4", "198.18.0.254", "198.18.0.253"),
            ("-6", "2001:db8::fe", "2001:db8::fd"),
        ] {
            let gw: IpAddr = gw.parse().map_err(|_| "gateway")?;
            let other: IpAddr = other.parse().map_err(|_| "gateway")?;
            let gateways = || -> Result<Vec<String>, super::netns_harness::Failure> {
                Ok(ip_json(&[family, "route", "show", "default"])?
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.get("gateway").and_then(|g| g.as_str()).map(String::from))
                    .collect())
            };
            check!(
                gateways()?.is_empty(),
                "a default route exists before the test"
            );
            nl.add_default_route(gw).await?;
            nl.add_default_route(gw).await?;
            check!(
                gateways()? == vec![gw.to_string()],
                "after add: {:?}",
                gateways()?
            );
            let err = nl.add_default_route(other).await;
            check!(
                matches!(&err, Err(VipError::DefaultRouteConflict { existing, .. }) if existing.contains(&gw.to_string())),
                "conflicting default route: {err:?}"
            );
            // Deleting a default route via another gateway leaves ours alone.
            nl.del_default_route(other).await?;
            check!(
                gateways()? == vec![gw.to_string()],
                "del of other removed ours"
            );
            nl.del_default_route(gw).await?;
            nl.del_default_route(gw).await?;
            check!(gateways()?.is_empty(), "after del: {:?}", gateways()?);

            // A default route the admin installed (protocol boot) via the same
            // gateway is adopted by add and left alone by del.
            let gw_s = gw.to_string();
            let admin = [
                family, "route", "add", "default", "via", &gw_s, "proto", "boot",
            ];
            super::netns_harness::run("ip", &admin)?;
            nl.add_default_route(gw).await?;
            nl.del_default_route(gw).await?;
            check!(
                gateways()? == vec![gw_s.clone()],
                "the admin's default route was removed"
            );
            super::netns_harness::run("ip", &[family, "route", "del", "default", "via", &gw_s])?;
        }
        Ok(())
    }
}
