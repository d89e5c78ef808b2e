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
                (ip != vip.addr
                    && kubeha_crds::cidr::subnet_contains(ip, m.header.prefix_len, vip.addr))
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

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
