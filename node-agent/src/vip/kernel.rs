//! The kernel's side: `RtNetlink`, the `Netlink` implementation over rtnetlink
//! (addresses with lifetimes, the interface whose subnet holds a VIP, MAC
//! addresses, default routes), and the netlink messages it builds and reads.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol,
    AddressScope, CacheInfo,
};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType, RouteVia,
};
use nix::errno::Errno;
use rtnetlink::{AddressMessageBuilder, Handle, RouteMessageBuilder};

use super::packet_fence::{HELD_SLACK, PacketFence};
use super::{
    KUBEHA_ADDRESS_PROTOCOL, Netlink, Vip, VipError, kernel_lifetime_until, validate_ifname,
};

/// [`Netlink`] over an rtnetlink connection in the agent's network namespace.
///
/// Clones share one socket. The kernel runs one dump at a time per socket
/// and refuses a second one meanwhile (EBUSY), so dumps (addresses,
/// routes) on a connection take turns behind `dumps`.
#[derive(Clone)]
pub struct RtNetlink {
    handle: Handle,
    dumps: std::sync::Arc<tokio::sync::Mutex<()>>,
    fence: std::sync::Arc<PacketFence>,
}

impl fmt::Debug for RtNetlink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RtNetlink").finish_non_exhaustive()
    }
}

/// The negative errno in a netlink error, as a positive `Errno`.
pub(super) fn errno_of(err: &rtnetlink::Error) -> Option<Errno> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// Wraps an rtnetlink error with the operation that failed.
pub(super) fn nl_err(op: impl Into<String>, source: rtnetlink::Error) -> VipError {
    let op = op.into();
    match errno_of(&source) {
        Some(Errno::EPERM) | Some(Errno::EACCES) => VipError::PermissionDenied { op },
        _ => VipError::Netlink { op, source },
    }
}

/// The local address of an address message (IFA_LOCAL, else IFA_ADDRESS).
pub(super) fn local_addr(msg: &AddressMessage) -> Option<IpAddr> {
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

/// Whether a kernel of release `release` (`uname -r`, e.g.
/// `6.1.0-18-amd64`) keeps an address's protocol (`IFA_PROTO`, Linux 5.18):
/// older ones drop the attribute without an error. An unreadable release
/// counts as a recent kernel.
pub(super) fn release_keeps_address_protocol(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (5, 18),
        _ => true,
    }
}

/// [`release_keeps_address_protocol`] for the running kernel, read once.
fn kernel_keeps_address_protocol() -> bool {
    static KEEPS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KEEPS.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let keeps = release_keeps_address_protocol(release.trim());
        if !keeps {
            tracing::warn!(
                release = release.trim(),
                "this kernel drops address protocols (before Linux 5.18): only permanent addresses count as the host's own; another program's address with a lifetime is not told from a VIP"
            );
        }
        keeps
    })
}

/// Whether an address message is one kubeha added: it carries
/// [`KUBEHA_ADDRESS_PROTOCOL`]; on a kernel that drops address protocols,
/// whether it has a finite lifetime (every VIP has one; the node's own
/// permanent addresses never do).
pub(super) fn is_kubeha_address(msg: &AddressMessage) -> bool {
    is_kubeha_address_on(msg, kernel_keeps_address_protocol())
}

/// [`is_kubeha_address`] on a kernel that keeps address protocols (`marks`)
/// or not.
pub(super) fn is_kubeha_address_on(msg: &AddressMessage, marks: bool) -> bool {
    if !marks {
        return !is_permanent(msg);
    }
    msg.attributes.iter().any(
        |a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == KUBEHA_ADDRESS_PROTOCOL),
    )
}

/// Who holds an IP on the host, from one address dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Holders {
    /// kubeha's addresses of the IP: (interface index, prefix length).
    pub(super) ours: Vec<(u32, u8)>,
    /// The interface index of the first address of the IP that kubeha
    /// did not add.
    pub(super) foreign: Option<u32>,
}

/// Who holds `addr` among `addrs` (every interface).
pub(super) fn holders(addrs: &[AddressMessage], addr: IpAddr) -> Holders {
    let mut out = Holders::default();
    for m in addrs.iter().filter(|m| local_addr(m) == Some(addr)) {
        if is_kubeha_address(m) {
            out.ours.push((m.header.index, m.header.prefix_len));
        } else if out.foreign.is_none() {
            out.foreign = Some(m.header.index);
        }
    }
    out
}

/// Whether an address message carries the permanent flag.
pub(super) fn is_permanent(msg: &AddressMessage) -> bool {
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
pub(super) fn route_gateways(msg: &RouteMessage) -> Vec<IpAddr> {
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
pub(super) fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// The message for "default via GATEWAY" in the main table, protocol static.
pub(super) fn default_route_message(gateway: IpAddr) -> RouteMessage {
    match gateway {
        IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build(),
        IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new().gateway(gw).build(),
    }
}

/// The address message identifying `vip` on interface `index`.
pub(super) fn address_message(index: u32, vip: &Vip) -> AddressMessage {
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
            fence: Default::default(),
        })
    }

    /// Installs the packet fence's tables now, so that a node without
    /// nftables is reported when the agent starts, not at its first entry.
    pub async fn install_fence(&self) -> Result<(), VipError> {
        self.fence.install().await
    }

    /// Removes the address of `vip` from `iface`, if there.
    async fn del_address(&self, iface: &str, vip: &Vip) -> Result<(), VipError> {
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

    /// Replaces (adds or extends) the address of `vip` with lifetime `secs`.
    async fn replace_address(&self, iface: &str, vip: &Vip, secs: u32) -> Result<(), VipError> {
        let index = self.index_of(iface).await?;
        self.replace_address_at(index, iface, vip, secs).await
    }

    /// [`Self::replace_address`] on the interface with index `index`
    /// (named `iface` in errors).
    async fn replace_address_at(
        &self,
        index: u32,
        iface: &str,
        vip: &Vip,
        secs: u32,
    ) -> Result<(), VipError> {
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
        msg.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(
                KUBEHA_ADDRESS_PROTOCOL,
            )));
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
        })
    }

    /// Extends `vip`, known to be on `iface`: its packet fence only while
    /// open (`false`, nothing extended, once it ended), then the address.
    async fn extend_present(
        &self,
        iface: &str,
        vip: &Vip,
        until: Instant,
    ) -> Result<bool, VipError> {
        let (fence, secs) = kernel_lifetime_until(until)?;
        let held = Duration::from_secs(u64::from(secs)) + HELD_SLACK;
        if !self.fence.extend(vip.addr, until, held).await? {
            tracing::warn!(%vip, iface, "the packet fence of a VIP expired before its renew");
            return Ok(false);
        }
        self.replace_address(iface, vip, secs).await?;
        tracing::debug!(%vip, iface, fence_ms = fence.as_millis() as u64, valid_lft = secs, "VIP extended");
        Ok(true)
    }

    /// [`VipError::ForeignAddress`] when an address of the VIP's IP that
    /// kubeha did not add is on the host (`addrs`, one dump of every
    /// interface); nothing is changed either way.
    async fn refuse_foreign(&self, addrs: &[AddressMessage], vip: &Vip) -> Result<(), VipError> {
        match holders(addrs, vip.addr).foreign {
            None => Ok(()),
            Some(index) => {
                let interface = self
                    .name_of(index)
                    .await
                    .unwrap_or_else(|_| format!("#{index}"));
                tracing::warn!(%vip, interface, "the VIP's address is the host's own; not taking it over");
                Err(VipError::ForeignAddress {
                    address: vip.addr,
                    interface,
                })
            }
        }
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
    async fn add_vip(&self, iface: &str, vip: &Vip, until: Instant) -> Result<(), VipError> {
        // Never the host's own address: checked before anything changes.
        let addrs = self.addresses(None).await?;
        self.refuse_foreign(&addrs, vip).await?;
        let (fence, secs) = kernel_lifetime_until(until)?;
        let held = Duration::from_secs(u64::from(secs)) + HELD_SLACK;
        // The fence opens first: the address answers from the moment it is
        // added, and never past the fence.
        self.fence.open(vip.addr, until, held).await?;
        if let Err(e) = self.replace_address(iface, vip, secs).await {
            let _ = self.fence.forget(vip.addr).await;
            return Err(e);
        }
        tracing::debug!(%vip, iface, fence_ms = fence.as_millis() as u64, valid_lft = secs, "VIP added or extended");
        Ok(())
    }

    async fn extend_vip(&self, iface: &str, vip: &Vip, until: Instant) -> Result<bool, VipError> {
        let index = self.index_of(iface).await?;
        let addrs = self.addresses(None).await?;
        self.refuse_foreign(&addrs, vip).await?;
        if !holders(&addrs, vip.addr)
            .ours
            .contains(&(index, vip.prefix_len))
        {
            return Ok(false);
        }
        self.extend_present(iface, vip, until).await
    }

    async fn extend_vips(
        &self,
        vips: &[(String, Vip)],
        until: Instant,
    ) -> Vec<Result<bool, VipError>> {
        let mut out = Vec::with_capacity(vips.len());
        // One dump for all: which (interface index, address, prefix) exist.
        let Ok(addrs) = self.addresses(None).await else {
            // Each call dumps again and reports its own error.
            for (iface, vip) in vips {
                out.push(self.extend_vip(iface, vip, until).await);
            }
            return out;
        };
        // kubeha's addresses only: the host's own are never extended.
        let present: std::collections::HashSet<(u32, IpAddr, u8)> = addrs
            .iter()
            .filter(|m| is_kubeha_address(m))
            .filter_map(|m| Some((m.header.index, local_addr(m)?, m.header.prefix_len)))
            .collect();
        let mut index: std::collections::HashMap<&str, Option<u32>> = Default::default();
        // Per VIP: its result now, or the interface index of a present VIP
        // still to extend.
        let mut pending: Vec<Result<u32, Result<bool, VipError>>> = Vec::with_capacity(vips.len());
        for (iface, vip) in vips {
            let i = match index.get(iface.as_str()) {
                Some(i) => *i,
                None => {
                    let i = self.index_of(iface).await.ok();
                    index.insert(iface, i);
                    i
                }
            };
            if let Err(e) = self.refuse_foreign(&addrs, vip).await {
                pending.push(Err(Err(e)));
                continue;
            }
            pending.push(match i {
                // The single call reports why (e.g. the interface is gone).
                None => Err(self.extend_vip(iface, vip, until).await),
                Some(i) if !present.contains(&(i, vip.addr, vip.prefix_len)) => Err(Ok(false)),
                Some(i) => Ok(i),
            });
        }
        // The present VIPs' fences in one batch; when one of them ended
        // (the batch fails whole, nothing extended), one at a time.
        let present_addrs: Vec<IpAddr> = vips
            .iter()
            .zip(&pending)
            .filter(|(_, p)| p.is_ok())
            .map(|((_, v), _)| v.addr)
            .collect();
        let together = match kernel_lifetime_until(until) {
            Ok((_, secs)) if !present_addrs.is_empty() => {
                let held = Duration::from_secs(u64::from(secs)) + HELD_SLACK;
                match self.fence.extend_all(&present_addrs, until, held).await {
                    Ok(true) => Some(secs),
                    _ => None,
                }
            }
            _ => None,
        };
        for ((iface, vip), p) in vips.iter().zip(pending) {
            out.push(match (p, together) {
                (Err(done), _) => done,
                (Ok(i), Some(secs)) => self
                    .replace_address_at(i, iface, vip, secs)
                    .await
                    .map(|()| true),
                (Ok(_), None) => self.extend_present(iface, vip, until).await,
            });
        }
        out
    }

    async fn del_vip(&self, iface: &str, vip: &Vip) -> Result<(), VipError> {
        // The host's own address of that IP, and none of kubeha's: nothing
        // of it is kubeha's to silence or remove.
        let held = holders(&self.addresses(None).await?, vip.addr);
        if held.ours.is_empty() && held.foreign.is_some() {
            tracing::warn!(%vip, iface, "the VIP's address is the host's own, not kubeha's; left alone");
            return Ok(());
        }
        // Silent at once, even when removing the address fails.
        if let Err(e) = self.fence.close(vip.addr).await {
            tracing::warn!(%vip, iface, error = %e, "closing a VIP's packet fence failed");
        }
        self.del_address(iface, vip).await?;
        if let Err(e) = self.fence.forget(vip.addr).await {
            tracing::warn!(%vip, iface, error = %e, "forgetting a VIP in the packet fence failed");
        }
        Ok(())
    }

    async fn vip_present(&self, iface: &str, vip: &Vip) -> Result<bool, VipError> {
        let index = self.index_of(iface).await?;
        let addrs = self.addresses(Some(index)).await?;
        Ok(addrs.iter().any(|m| {
            m.header.index == index
                && m.header.prefix_len == vip.prefix_len
                && local_addr(m) == Some(vip.addr)
                && is_kubeha_address(m)
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
