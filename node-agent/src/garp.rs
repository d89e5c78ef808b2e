//! Gratuitous ARP and unsolicited IPv6 neighbour advertisements.
//!
//! When a node takes over a VIP, hosts and switches on the segment still map
//! the address to the old holder's MAC. The new holder announces itself with
//! raw Ethernet frames sent through a pnet datalink channel:
//!
//! - IPv4: an ARP request and an ARP reply per VIP, both broadcast, both with
//!   sender and target protocol address equal to the VIP (RFC 5227 § 3 calls
//!   the request form an "ARP Announcement"; some old stacks only honour the
//!   reply form, so both are sent);
//! - IPv6: an unsolicited Neighbor Advertisement (RFC 4861 § 7.2.6) to the
//!   all-nodes group with the Override flag and the Target Link-Layer Address
//!   option, so neighbours replace their cache entries at once.
//!
//! [`send_burst`] is blocking; call it from `tokio::task::spawn_blocking`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use pnet::datalink::{self, Channel, Config, NetworkInterface};
use pnet::packet::arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket};
use pnet::packet::ethernet::{EtherTypes, MutableEthernetPacket};
use pnet::packet::icmpv6::ndp::{
    MutableNeighborAdvertPacket, NdpOption, NdpOptionTypes, NeighborAdvertFlags,
};
use pnet::packet::icmpv6::{Icmpv6Code, Icmpv6Types};
use pnet::packet::ip::IpNextHeaderProtocols;
use pnet::packet::ipv6::MutableIpv6Packet;
use pnet::util::{MacAddr, ipv6_checksum};

/// Ethernet header length.
const ETH_HEADER_LEN: usize = 14;
/// ARP payload length for IPv4 over Ethernet.
const ARP_LEN: usize = 28;
/// Minimum Ethernet frame length without the FCS; ARP frames are padded to it.
const ETH_MIN_FRAME_LEN: usize = 60;
/// IPv6 header length.
const IPV6_HEADER_LEN: usize = 40;
/// Neighbor Advertisement: 24 bytes of message plus an 8-byte TLLA option.
const NA_LEN: usize = 24 + 8;
/// The all-nodes multicast group, destination of unsolicited advertisements.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// The Ethernet multicast address of ff02::1 (33:33 + low 32 bits).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];
/// Hop limit that neighbour discovery messages must carry (RFC 4861 § 7.1.2).
const ND_HOP_LIMIT: u8 = 255;
/// Bound on one blocking send, so a wedged interface cannot hang a transition.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors of [`send_burst`].
#[derive(Debug, thiserror::Error)]
pub enum GarpError {
    /// No interface of that name in this network namespace.
    #[error("interface {0:?} does not exist on this node")]
    InterfaceMissing(String),
    /// The interface cannot carry Ethernet frames (loopback, no MAC, ...).
    #[error(
        "interface {0:?} is not an Ethernet interface (loopback or no MAC address); \
         cannot send gratuitous ARP on it"
    )]
    NotEthernet(String),
    /// The sender MAC is not a unicast Ethernet address.
    #[error("{0} is not a unicast MAC address; refusing to announce VIPs with it")]
    InvalidMac(String),
    /// The datalink channel could not be opened.
    #[error("cannot open a packet socket on {iface}: {source} (the agent needs CAP_NET_RAW)")]
    Channel {
        /// The interface.
        iface: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// pnet returned a channel type other than Ethernet.
    #[error("pnet opened a non-Ethernet channel on {0}")]
    UnsupportedChannel(String),
    /// A frame could not be sent; `sent` frames went out before.
    #[error("sending on {iface} failed after {sent} frames: {source}")]
    Send {
        /// The interface.
        iface: String,
        /// Frames sent before the failure.
        sent: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// How many announcements to send and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GarpBurst {
    /// Rounds; each round sends every form for every VIP once.
    pub count: u32,
    /// Pause between two rounds.
    pub interval: Duration,
}

impl Default for GarpBurst {
    /// Three rounds, 200 ms apart.
    fn default() -> Self {
        GarpBurst {
            count: 3,
            interval: Duration::from_millis(200),
        }
    }
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: [u8; 6]) -> String {
    MacAddr::from(mac).to_string()
}

/// Builds one broadcast ARP frame announcing `v4` at `mac`.
fn arp_frame(mac: [u8; 6], v4: Ipv4Addr, request: bool) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; ETH_MIN_FRAME_LEN];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf)?;
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(MacAddr::from(mac));
        eth.set_ethertype(EtherTypes::Arp);
    }
    let mut arp = MutableArpPacket::new(buf.get_mut(ETH_HEADER_LEN..ETH_HEADER_LEN + ARP_LEN)?)?;
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_sender_hw_addr(MacAddr::from(mac));
    arp.set_sender_proto_addr(v4);
    arp.set_target_proto_addr(v4);
    if request {
        arp.set_operation(ArpOperations::Request);
        arp.set_target_hw_addr(MacAddr::zero());
    } else {
        arp.set_operation(ArpOperations::Reply);
        arp.set_target_hw_addr(MacAddr::broadcast());
    }
    Some(buf)
}

/// The two gratuitous ARP frames for `v4` sent from `mac`, padded to the
/// 60-byte Ethernet minimum:
///
/// - `[0]`: ARP request, sender = target = `v4`, target MAC 00:00:00:00:00:00;
/// - `[1]`: ARP reply, sender = target = `v4`, target MAC ff:ff:ff:ff:ff:ff.
///
/// Both go to the Ethernet broadcast address.
pub fn arp_frames(mac: [u8; 6], v4: Ipv4Addr) -> [Vec<u8>; 2] {
    // The buffers are sized for the packets, so the builders cannot fail;
    // an empty frame would be caught by the unit tests.
    [
        arp_frame(mac, v4, true).unwrap_or_default(),
        arp_frame(mac, v4, false).unwrap_or_default(),
    ]
}

/// Builds the unsolicited Neighbor Advertisement frame; `None` only if a
/// buffer were too small.
fn na_frame(mac: [u8; 6], v6: Ipv6Addr) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; ETH_HEADER_LEN + IPV6_HEADER_LEN + NA_LEN];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf)?;
        eth.set_destination(MacAddr::from(ALL_NODES_MAC));
        eth.set_source(MacAddr::from(mac));
        eth.set_ethertype(EtherTypes::Ipv6);
    }
    {
        let mut ip = MutableIpv6Packet::new(buf.get_mut(ETH_HEADER_LEN..)?)?;
        ip.set_version(6);
        ip.set_traffic_class(0);
        ip.set_flow_label(0);
        ip.set_payload_length(u16::try_from(NA_LEN).ok()?);
        ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip.set_hop_limit(ND_HOP_LIMIT);
        // The kernel's own unsolicited NA uses the target as source.
        ip.set_source(v6);
        ip.set_destination(ALL_NODES);
    }
    let icmp = buf.get_mut(ETH_HEADER_LEN + IPV6_HEADER_LEN..)?;
    {
        let mut na = MutableNeighborAdvertPacket::new(icmp)?;
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_icmpv6_code(Icmpv6Code(0));
        na.set_checksum(0);
        na.set_flags(NeighborAdvertFlags::Override);
        na.set_reserved(0);
        na.set_target_addr(v6);
        na.set_options(&[NdpOption {
            option_type: NdpOptionTypes::TargetLLAddr,
            length: 1,
            data: mac.to_vec(),
        }]);
    }
    // Checksum over the pseudo-header and the whole ICMPv6 message; word 1
    // (the checksum field itself) is skipped.
    let sum = ipv6_checksum(icmp, 1, &[], &v6, &ALL_NODES, IpNextHeaderProtocols::Icmpv6);
    let mut na = MutableNeighborAdvertPacket::new(icmp)?;
    na.set_checksum(sum);
    Some(buf)
}

/// The unsolicited Neighbor Advertisement for `v6` sent from `mac`: to ff02::1
/// (Ethernet 33:33:00:00:00:01), source `v6`, hop limit 255, flags Override
/// (Solicited and Router clear), target `v6`, option Target Link-Layer
/// Address = `mac`, with a valid ICMPv6 checksum.
pub fn unsolicited_na(mac: [u8; 6], v6: Ipv6Addr) -> Vec<u8> {
    // See arp_frames: the builder cannot fail with the buffer it sizes.
    na_frame(mac, v6).unwrap_or_default()
}

/// All frames of one round: two ARP forms per IPv4 VIP, one NA per IPv6 VIP.
fn round_frames(mac: [u8; 6], vips: &[IpAddr]) -> Vec<Vec<u8>> {
    vips.iter()
        .flat_map(|vip| match vip {
            IpAddr::V4(v4) => arp_frames(mac, *v4).to_vec(),
            IpAddr::V6(v6) => vec![unsolicited_na(mac, *v6)],
        })
        .collect()
}

/// The pnet interface `iface`, checked to be Ethernet-like.
fn ethernet_interface(iface: &str) -> Result<NetworkInterface, GarpError> {
    let found = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .ok_or_else(|| GarpError::InterfaceMissing(iface.to_string()))?;
    let has_mac = found.mac.is_some_and(|m| m != MacAddr::zero());
    if found.is_loopback() || !has_mac {
        return Err(GarpError::NotEthernet(iface.to_string()));
    }
    Ok(found)
}

/// Sends `burst.count` rounds of announcements for `vips` on `iface` from
/// `mac`, sleeping `burst.interval` between rounds, and returns the number of
/// frames sent. Each round sends, per IPv4 VIP, the ARP request and the ARP
/// reply form and, per IPv6 VIP, one unsolicited Neighbor Advertisement.
///
/// Blocking: run it with `spawn_blocking`. Nothing is sent (and `Ok(0)`
/// returned) when `vips` is empty or `count` is 0.
pub fn send_burst(
    iface: &str,
    mac: [u8; 6],
    vips: &[IpAddr],
    burst: &GarpBurst,
) -> Result<usize, GarpError> {
    // Multicast bit set (includes broadcast) or all zero: not a unicast MAC.
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(GarpError::InvalidMac(mac_string(mac)));
    }
    if vips.is_empty() || burst.count == 0 {
        return Ok(0);
    }
    let interface = ethernet_interface(iface)?;
    let frames = round_frames(mac, vips);
    let config = Config {
        promiscuous: false,
        read_buffer_size: 2048,
        write_timeout: Some(WRITE_TIMEOUT),
        ..Config::default()
    };
    let (mut tx, rx) = match datalink::channel(&interface, config) {
        Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
        Ok(_) => return Err(GarpError::UnsupportedChannel(iface.to_string())),
        Err(source) => {
            return Err(GarpError::Channel {
                iface: iface.to_string(),
                source,
            });
        }
    };
    let result = send_rounds(&mut *tx, iface, &frames, burst);
    close_in_background(tx, rx);
    let sent = result?;
    tracing::debug!(iface, vips = vips.len(), sent, "GARP burst sent");
    Ok(sent)
}

/// The rounds of [`send_burst`] on an open channel; the number of frames
/// sent.
fn send_rounds(
    tx: &mut dyn datalink::DataLinkSender,
    iface: &str,
    frames: &[Vec<u8>],
    burst: &GarpBurst,
) -> Result<usize, GarpError> {
    let mut sent = 0usize;
    for round in 0..burst.count {
        if round > 0 && !burst.interval.is_zero() {
            std::thread::sleep(burst.interval);
        }
        for frame in frames {
            let result = tx.send_to(frame, None).unwrap_or_else(|| {
                Err(std::io::Error::other(
                    "pnet had no buffer space for the frame",
                ))
            });
            if let Err(source) = result {
                return Err(GarpError::Send {
                    iface: iface.to_string(),
                    sent,
                    source,
                });
            }
            sent += 1;
        }
    }
    Ok(sent)
}

/// Closes a packet channel on a thread of its own: closing a packet socket
/// waits for an RCU grace period (about 10 ms measured here), which the
/// caller (a probe or a GARP round on an entry's latency path) must not.
fn close_in_background(
    tx: Box<dyn datalink::DataLinkSender>,
    rx: Box<dyn datalink::DataLinkReceiver>,
) {
    let spawned = std::thread::Builder::new()
        .name("packet-close".into())
        .spawn(move || drop((tx, rx)));
    // No thread to spare: closed here, late but closed.
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "closing a packet socket in place");
    }
}

/// An ARP probe for `v4` from `mac` (RFC 5227 § 2.1.1: sender protocol
/// address 0.0.0.0, so no neighbour learns anything from it), broadcast.
pub fn arp_probe(mac: [u8; 6], v4: Ipv4Addr) -> Vec<u8> {
    let mut frame = arp_frame(mac, v4, true).unwrap_or_default();
    if let Some(mut arp) = frame
        .get_mut(ETH_HEADER_LEN..ETH_HEADER_LEN + ARP_LEN)
        .and_then(MutableArpPacket::new)
    {
        arp.set_sender_proto_addr(Ipv4Addr::UNSPECIFIED);
    }
    frame
}

/// The VIP another host claims in `frame` and its MAC: an ARP reply or
/// announcement whose sender protocol address is one of `vips`, sent from
/// a MAC other than `mine`.
pub fn claim(frame: &[u8], vips: &[Ipv4Addr], mine: [u8; 6]) -> Option<(Ipv4Addr, [u8; 6])> {
    let eth = pnet::packet::ethernet::EthernetPacket::new(frame)?;
    if eth.get_ethertype() != EtherTypes::Arp {
        return None;
    }
    let arp = pnet::packet::arp::ArpPacket::new(frame.get(ETH_HEADER_LEN..)?)?;
    let sender = arp.get_sender_proto_addr();
    let from: [u8; 6] = arp.get_sender_hw_addr().octets();
    (vips.contains(&sender) && from != mine).then_some((sender, from))
}

/// Address conflict detection before a VIP is added (RFC 5227 § 2.1):
/// probes for `vips` on `iface` from `mac`, sent twice half of `window`
/// apart, and every claim heard within `window`. Returns the VIPs another
/// host still answers for, with its MAC: a previous holder whose address
/// the kernel has not expired yet (its removal can lag the lifetime by up
/// to a second), or a host that was never told. Blocking: run it with
/// `spawn_blocking`.
pub fn still_answered(
    iface: &str,
    mac: [u8; 6],
    vips: &[Ipv4Addr],
    window: Duration,
) -> Result<Vec<(Ipv4Addr, [u8; 6])>, GarpError> {
    if vips.is_empty() {
        return Ok(Vec::new());
    }
    let interface = ethernet_interface(iface)?;
    let config = Config {
        promiscuous: false,
        read_buffer_size: 65536,
        // Short, so the window ends on time.
        read_timeout: Some(Duration::from_millis(1)),
        write_timeout: Some(WRITE_TIMEOUT),
        ..Config::default()
    };
    let (mut tx, mut rx) = match datalink::channel(&interface, config) {
        Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
        Ok(_) => return Err(GarpError::UnsupportedChannel(iface.to_string())),
        Err(source) => {
            return Err(GarpError::Channel {
                iface: iface.to_string(),
                source,
            });
        }
    };
    let probes: Vec<Vec<u8>> = vips.iter().map(|v| arp_probe(mac, *v)).collect();
    let found = listen_for_claims(&mut *tx, &mut *rx, iface, mac, vips, &probes, window);
    close_in_background(tx, rx);
    found
}

/// The probe rounds and the listening of [`still_answered`].
fn listen_for_claims(
    tx: &mut dyn datalink::DataLinkSender,
    rx: &mut dyn datalink::DataLinkReceiver,
    iface: &str,
    mac: [u8; 6],
    vips: &[Ipv4Addr],
    probes: &[Vec<u8>],
    window: Duration,
) -> Result<Vec<(Ipv4Addr, [u8; 6])>, GarpError> {
    let started = std::time::Instant::now();
    let mut found: Vec<(Ipv4Addr, [u8; 6])> = Vec::new();
    let mut sent_rounds = 0;
    while started.elapsed() < window {
        if sent_rounds < 2 && started.elapsed() >= window / 2 * sent_rounds {
            sent_rounds += 1;
            for (sent, frame) in probes.iter().enumerate() {
                if let Some(Err(source)) = tx.send_to(frame, None) {
                    return Err(GarpError::Send {
                        iface: iface.to_string(),
                        sent,
                        source,
                    });
                }
            }
        }
        // A timeout (nothing heard for a while) just loops.
        if let Ok(frame) = rx.next()
            && let Some(c) = claim(frame, vips, mac)
            && !found.contains(&c)
        {
            found.push(c);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
