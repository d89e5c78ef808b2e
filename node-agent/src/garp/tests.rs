use super::*;
use crate::netns_harness::{
    Failure, NetNs, TestResult, check, child_entry, ip_json, run, test_path,
};
use crate::vip::{Netlink, RtNetlink};
use pnet::packet::Packet;
use pnet::packet::arp::ArpPacket;
use pnet::packet::ethernet::EthernetPacket;
use pnet::packet::icmpv6::ndp::NeighborAdvertPacket;
use pnet::packet::icmpv6::{self, Icmpv6Packet};
use pnet::packet::ipv6::Ipv6Packet;
use std::time::Instant;

const MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];

/// Independent RFC 1071 check: the one's-complement sum over the
/// pseudo-header and the message (checksum included) must be 0xffff.
fn icmpv6_checksum_verifies(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> bool {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&src.octets());
    bytes.extend_from_slice(&dst.octets());
    bytes.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    bytes.extend_from_slice(&[0, 0, 0, 58]);
    bytes.extend_from_slice(msg);
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// Checks every field of an ARP announcement frame.
fn check_arp(frame: &[u8], mac: [u8; 6], v4: Ipv4Addr, request: bool) -> TestResult {
    check!(
        frame.len() == ETH_MIN_FRAME_LEN,
        "ARP frame length {}",
        frame.len()
    );
    let eth = EthernetPacket::new(frame).ok_or("short Ethernet frame")?;
    check!(
        eth.get_destination() == MacAddr::broadcast(),
        "dst {}",
        eth.get_destination()
    );
    check!(
        eth.get_source() == MacAddr::from(mac),
        "src {}",
        eth.get_source()
    );
    check!(
        eth.get_ethertype() == EtherTypes::Arp,
        "ethertype {}",
        eth.get_ethertype()
    );
    let arp = ArpPacket::new(eth.payload()).ok_or("short ARP packet")?;
    check!(
        arp.get_hardware_type() == ArpHardwareTypes::Ethernet,
        "htype"
    );
    check!(arp.get_protocol_type() == EtherTypes::Ipv4, "ptype");
    check!(
        arp.get_hw_addr_len() == 6 && arp.get_proto_addr_len() == 4,
        "lengths"
    );
    let (op, tha) = if request {
        (ArpOperations::Request, MacAddr::zero())
    } else {
        (ArpOperations::Reply, MacAddr::broadcast())
    };
    check!(
        arp.get_operation() == op,
        "operation {:?}",
        arp.get_operation()
    );
    check!(arp.get_sender_hw_addr() == MacAddr::from(mac), "sha");
    check!(
        arp.get_sender_proto_addr() == v4,
        "spa {}",
        arp.get_sender_proto_addr()
    );
    check!(
        arp.get_target_hw_addr() == tha,
        "tha {}",
        arp.get_target_hw_addr()
    );
    check!(
        arp.get_target_proto_addr() == v4,
        "tpa {}",
        arp.get_target_proto_addr()
    );
    check!(
        frame[ETH_HEADER_LEN + ARP_LEN..].iter().all(|b| *b == 0),
        "padding is not zero"
    );
    Ok(())
}

/// Checks every field of an unsolicited Neighbor Advertisement frame.
fn check_na(frame: &[u8], mac: [u8; 6], v6: Ipv6Addr) -> TestResult {
    check!(frame.len() == 86, "NA frame length {}", frame.len());
    let eth = EthernetPacket::new(frame).ok_or("short Ethernet frame")?;
    check!(
        eth.get_destination() == MacAddr::from(ALL_NODES_MAC),
        "dst {}",
        eth.get_destination()
    );
    check!(
        eth.get_source() == MacAddr::from(mac),
        "src {}",
        eth.get_source()
    );
    check!(
        eth.get_ethertype() == EtherTypes::Ipv6,
        "ethertype {}",
        eth.get_ethertype()
    );
    let ip = Ipv6Packet::new(eth.payload()).ok_or("short IPv6 packet")?;
    check!(ip.get_version() == 6, "version");
    check!(
        ip.get_traffic_class() == 0 && ip.get_flow_label() == 0,
        "tc/flow"
    );
    check!(
        ip.get_payload_length() == 32,
        "payload length {}",
        ip.get_payload_length()
    );
    check!(
        ip.get_next_header() == IpNextHeaderProtocols::Icmpv6,
        "next header"
    );
    check!(
        ip.get_hop_limit() == 255,
        "hop limit {}",
        ip.get_hop_limit()
    );
    check!(ip.get_source() == v6, "source {}", ip.get_source());
    check!(
        ip.get_destination() == ALL_NODES,
        "destination {}",
        ip.get_destination()
    );
    let icmp = Icmpv6Packet::new(ip.payload()).ok_or("short ICMPv6")?;
    let expected = icmpv6::checksum(&icmp, &v6, &ALL_NODES);
    check!(
        icmp.get_checksum() == expected,
        "checksum {:#x} != {expected:#x}",
        icmp.get_checksum()
    );
    check!(
        icmpv6_checksum_verifies(v6, ALL_NODES, ip.payload()),
        "checksum does not verify"
    );
    let na = NeighborAdvertPacket::new(ip.payload()).ok_or("short NA")?;
    check!(na.get_icmpv6_type() == Icmpv6Types::NeighborAdvert, "type");
    check!(na.get_icmpv6_code() == Icmpv6Code(0), "code");
    check!(
        na.get_flags() == NeighborAdvertFlags::Override,
        "flags {:#04x}: want Override only (Router and Solicited clear)",
        na.get_flags()
    );
    check!(na.get_reserved() == 0, "reserved");
    check!(
        na.get_target_addr() == v6,
        "target {}",
        na.get_target_addr()
    );
    let options = na.get_options();
    check!(options.len() == 1, "{} options", options.len());
    check!(
        options[0].option_type == NdpOptionTypes::TargetLLAddr,
        "option type"
    );
    check!(
        options[0].length == 1,
        "option length {}",
        options[0].length
    );
    check!(options[0].data == mac, "TLLA {:?}", options[0].data);
    Ok(())
}

#[test]
fn arp_frames_are_request_and_reply_announcements() -> TestResult {
    for v4 in [
        Ipv4Addr::new(198, 18, 0, 100),
        Ipv4Addr::new(10, 255, 255, 1),
    ] {
        let [request, reply] = arp_frames(MAC, v4);
        check_arp(&request, MAC, v4, true)?;
        check_arp(&reply, MAC, v4, false)?;
    }
    Ok(())
}

#[test]
fn unsolicited_na_fields_and_checksum() -> TestResult {
    for v6 in [
        "2001:db8::100",
        "fe80::1",
        "2001:db8:ffff:ffff:ffff:ffff:ffff:fffe",
    ] {
        let v6: Ipv6Addr = v6.parse().map_err(|_| "address")?;
        check_na(&unsolicited_na(MAC, v6), MAC, v6)?;
    }
    // A corrupted frame must not verify.
    let v6: Ipv6Addr = "2001:db8::100".parse().map_err(|_| "address")?;
    let mut frame = unsolicited_na(MAC, v6);
    frame[ETH_HEADER_LEN + IPV6_HEADER_LEN + 10] ^= 1;
    check!(
        !icmpv6_checksum_verifies(v6, ALL_NODES, &frame[ETH_HEADER_LEN + IPV6_HEADER_LEN..]),
        "corrupted NA still verifies"
    );
    Ok(())
}

#[test]
fn a_round_has_two_arp_forms_per_v4_and_one_na_per_v6() {
    let vips: Vec<IpAddr> = ["198.18.0.100", "198.18.0.101", "2001:db8::100"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    assert_eq!(round_frames(MAC, &vips).len(), 5);
    assert!(round_frames(MAC, &[]).is_empty());
}

#[test]
fn send_burst_refuses_bad_input_without_sending() {
    let vips: Vec<IpAddr> = vec![Ipv4Addr::new(198, 18, 0, 100).into()];
    let burst = GarpBurst::default();
    for mac in [
        [0u8; 6],
        [0xff; 6],
        [0x01, 0x00, 0x5e, 0, 0, 1],
        [0x33, 0x33, 0, 0, 0, 1],
    ] {
        assert!(
            matches!(
                send_burst("lo", mac, &vips, &burst),
                Err(GarpError::InvalidMac(_))
            ),
            "{mac:?}"
        );
    }
    // Nothing to send: no socket is even opened.
    assert_eq!(send_burst("nosuch0", MAC, &[], &burst).unwrap(), 0);
    let none = GarpBurst { count: 0, ..burst };
    assert_eq!(send_burst("nosuch0", MAC, &vips, &none).unwrap(), 0);
    // Interface checks come before any socket.
    let err = send_burst("nosuch0", MAC, &vips, &burst).unwrap_err();
    assert!(matches!(err, GarpError::InterfaceMissing(_)), "{err}");
    let err = send_burst("lo", MAC, &vips, &burst).unwrap_err();
    assert!(matches!(err, GarpError::NotEthernet(_)), "{err}");
}

// ---- real kernel, inside throwaway namespaces -------------------------

/// Runs `case` of [`netns_child`] in a fresh namespace with the test links.
fn kernel_case(case: &str) -> TestResult {
    let ns = NetNs::with_lab_links(case)?;
    ns.run_case(&test_path(module_path!(), "netns_child"), case)
}

#[test]
fn kernel_burst_is_captured_on_the_veth_peer() -> TestResult {
    kernel_case("garp-burst")
}

#[test]
fn kernel_burst_on_a_down_link_reports_the_error() -> TestResult {
    kernel_case("garp-link-down")
}

#[test]
fn kernel_probe_hears_a_holder_until_it_lets_go() -> TestResult {
    kernel_case("arp-probe")
}

#[test]
fn a_probe_claims_nothing_and_claims_are_other_hosts_answers() {
    let v4 = Ipv4Addr::new(198, 18, 0, 100);
    let probe = arp_probe(MAC, v4);
    let arp = ArpPacket::new(&probe[ETH_HEADER_LEN..]).unwrap();
    assert_eq!(arp.get_operation(), ArpOperations::Request);
    assert_eq!(arp.get_sender_proto_addr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(arp.get_target_proto_addr(), v4);
    assert_eq!(claim(&probe, &[v4], MAC), None, "a probe claims nothing");
    let other = [0x02, 0, 0, 0, 0, 0x09];
    let [announce, reply] = arp_frames(other, v4);
    assert_eq!(claim(&announce, &[v4], MAC), Some((v4, other)));
    assert_eq!(claim(&reply, &[v4], MAC), Some((v4, other)));
    assert_eq!(claim(&reply, &[Ipv4Addr::new(198, 18, 0, 101)], MAC), None);
    let [ours, _] = arp_frames(MAC, v4);
    assert_eq!(claim(&ours, &[v4], MAC), None, "our own frame");
    assert_eq!(
        claim(
            &unsolicited_na(other, "2001:db8::1".parse().unwrap()),
            &[v4],
            MAC
        ),
        None
    );
}

/// Child side: does nothing unless started by [`NetNs::run_case`].
/// Ignored in a normal run: it is an entry point, not a test of its own.
#[test]
#[ignore = "entry point of the namespace child process"]
fn netns_child() {
    child_entry(|case| async move {
        match case.as_str() {
            "garp-burst" => case_burst().await,
            "garp-link-down" => case_link_down().await,
            "arp-probe" => case_probe().await,
            other => Err(format!("unknown case {other}").into()),
        }
    });
}

/// The peer (veth1) holds a VIP: a probe from veth0 hears it, with the
/// peer's MAC; an address nobody holds is quiet; once the peer lets go,
/// the VIP is quiet too.
async fn case_probe() -> TestResult {
    let netlink = RtNetlink::new()?;
    let (mac, peer) = (
        netlink.mac_of("veth0").await?,
        netlink.mac_of("veth1").await?,
    );
    let (held, free) = (
        Ipv4Addr::new(198, 18, 0, 100),
        Ipv4Addr::new(198, 18, 0, 101),
    );
    run("ip", &["addr", "add", "198.18.0.100/24", "dev", "veth1"])?;
    let probe = move |vips: Vec<Ipv4Addr>| {
        tokio::task::spawn_blocking(move || {
            still_answered("veth0", mac, &vips, Duration::from_millis(30))
        })
    };
    let heard = probe(vec![held, free])
        .await
        .map_err(|e| Failure(e.to_string()))??;
    check!(heard == [(held, peer)], "holder not heard: {heard:?}");
    let heard = probe(vec![free])
        .await
        .map_err(|e| Failure(e.to_string()))??;
    check!(heard.is_empty(), "a free address was answered: {heard:?}");
    run("ip", &["addr", "del", "198.18.0.100/24", "dev", "veth1"])?;
    let heard = probe(vec![held])
        .await
        .map_err(|e| Failure(e.to_string()))??;
    check!(
        heard.is_empty(),
        "answered after the holder let go: {heard:?}"
    );
    Ok(())
}

/// What the peer saw, by kind.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    requests: usize,
    replies: usize,
    nas: usize,
}

async fn case_burst() -> TestResult {
    let mac = RtNetlink::new()?.mac_of("veth0").await?;
    let v4 = Ipv4Addr::new(198, 18, 0, 100);
    let v6: Ipv6Addr = "2001:db8::100".parse().map_err(|_| "address")?;
    let vips = [IpAddr::V4(v4), IpAddr::V6(v6)];
    let burst = GarpBurst {
        count: 3,
        interval: Duration::from_millis(100),
    };
    // The peer's neighbour cache holds stale entries for the VIPs (as a
    // router would after a failover): the announcements must override
    // them. Entries younger than the ARP locktime (1 s) are not updated.
    let stale = "02:00:00:00:00:99";
    for args in [
        vec!["addr", "add", "198.18.0.2/24", "dev", "veth1"],
        vec!["addr", "add", "2001:db8::2/64", "dev", "veth1", "nodad"],
        vec![
            "neigh",
            "replace",
            "198.18.0.100",
            "lladdr",
            stale,
            "dev",
            "veth1",
            "nud",
            "stale",
        ],
        vec![
            "neigh",
            "replace",
            "2001:db8::100",
            "lladdr",
            stale,
            "dev",
            "veth1",
            "nud",
            "stale",
        ],
    ] {
        run("ip", &args)?;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;

    tokio::task::spawn_blocking(move || capture_burst(mac, v4, v6, &vips, &burst))
        .await
        .map_err(|e| Failure(format!("capture task: {e}")))??;

    // The peer kernel accepted the frames (checksum, hop limit, flags)
    // and now maps both VIPs to our MAC.
    let ours = MacAddr::from(mac).to_string();
    let neigh = ip_json(&["neigh", "show", "dev", "veth1"])?;
    for vip in ["198.18.0.100", "2001:db8::100"] {
        let lladdr = neigh
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n.get("dst").and_then(|d| d.as_str()) == Some(vip))
            .and_then(|n| n.get("lladdr"))
            .and_then(|l| l.as_str())
            .unwrap_or("none");
        check!(
            lladdr == ours,
            "peer maps {vip} to {lladdr}, want {ours}; neigh: {neigh}"
        );
    }
    Ok(())
}

/// Opens a receiver on veth1, sends the burst on veth0, and checks that
/// exactly the expected frames arrived, byte for byte.
fn capture_burst(
    mac: [u8; 6],
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    vips: &[IpAddr],
    burst: &GarpBurst,
) -> TestResult {
    let peer = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == "veth1")
        .ok_or("veth1 not found")?;
    let config = Config {
        read_timeout: Some(Duration::from_millis(50)),
        ..Config::default()
    };
    let mut rx = match datalink::channel(&peer, config)? {
        Channel::Ethernet(_tx, rx) => rx,
        _ => return Err("non-Ethernet channel on veth1".into()),
    };

    let start = Instant::now();
    let sent = send_burst("veth0", mac, vips, burst)?;
    let took = start.elapsed();
    check!(
        sent == 9,
        "send_burst reported {sent} frames, want 3 rounds x 3 forms"
    );
    check!(
        took >= Duration::from_millis(200),
        "3 rounds 100 ms apart took only {took:?}"
    );

    let [request, reply] = arp_frames(mac, v4);
    let na = unsolicited_na(mac, v6);
    let mut seen = Seen::default();
    let want = Seen {
        requests: 3,
        replies: 3,
        nas: 3,
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last_match = Instant::now();
    while Instant::now() < deadline && last_match.elapsed() < Duration::from_millis(500) {
        let frame = match rx.next() {
            Ok(frame) => frame,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => return Err(format!("receive on veth1: {e}").into()),
        };
        let from_us =
            EthernetPacket::new(frame).is_some_and(|e| e.get_source() == MacAddr::from(mac));
        if !from_us {
            continue; // the kernel's own IPv6 chatter (MLD, RS)
        }
        if frame == request.as_slice() {
            check_arp(frame, mac, v4, true)?;
            seen.requests += 1;
        } else if frame == reply.as_slice() {
            check_arp(frame, mac, v4, false)?;
            seen.replies += 1;
        } else if frame == na.as_slice() {
            check_na(frame, mac, v6)?;
            seen.nas += 1;
        } else {
            // Not ours unless it claims one of our VIPs.
            let eth = EthernetPacket::new(frame).ok_or("short frame")?;
            let claims_vip = eth.get_ethertype() == EtherTypes::Arp
                && ArpPacket::new(eth.payload()).is_some_and(|a| a.get_sender_proto_addr() == v4);
            check!(
                !claims_vip,
                "unexpected ARP frame for the VIP: {frame:02x?}"
            );
            continue;
        }
        last_match = Instant::now();
    }
    println!("captured on veth1: {seen:?} (send took {took:?})");
    check!(seen == want, "captured {seen:?}, want {want:?}");
    Ok(())
}

async fn case_link_down() -> TestResult {
    let mac = RtNetlink::new()?.mac_of("dummy0").await?;
    run("ip", &["link", "set", "dummy0", "down"])?;
    let vips = [IpAddr::V4(Ipv4Addr::new(198, 19, 0, 100))];
    let burst = GarpBurst {
        count: 2,
        interval: Duration::from_millis(10),
    };
    let result = tokio::task::spawn_blocking(move || send_burst("dummy0", mac, &vips, &burst))
        .await
        .map_err(|e| Failure(format!("send task: {e}")))?;
    match result {
        Err(e @ GarpError::Send { sent: 0, .. }) => {
            println!("down link: {e}");
            check!(
                e.to_string().contains("dummy0"),
                "message lacks the interface: {e}"
            );
            Ok(())
        }
        other => Err(format!("send on a down link: {other:?}").into()),
    }
}
