//! Addresses with a prefix length (`198.18.0.10/24`, `2001:db8::10/64`),
//! parsed and matched one way for the operator and the agent, with
//! [`ipnet`].

use std::net::IpAddr;

pub use ipnet::IpNet;

/// Why a string is not a CIDR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address with a prefix length such as 198.18.0.10/24")]
pub struct BadCidr(pub String);

/// Parses `ADDRESS/PREFIX` exactly (no blanks, a decimal prefix length
/// within the family's); the address keeps its host bits (`IpNet::addr`).
pub fn parse(s: &str) -> Result<IpNet, BadCidr> {
    s.parse().map_err(|_| BadCidr(s.to_owned()))
}

/// Whether `addr` lies in the subnet `net/len` (false for a length the
/// family does not have, or for two families).
pub fn subnet_contains(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    IpNet::new(net, len).is_ok_and(|n| n.contains(&addr))
}

/// Shortest prefix length an IPv4 VIP or pool range may have. A VIP's prefix
/// becomes an on-link route on the node while it holds the address, so a
/// short prefix claims that whole range as directly reachable: `/0` makes
/// every destination on-link and cuts the node off its gateway. No single
/// link is larger than the largest private block, 10.0.0.0/8.
pub const MIN_PREFIX_V4: u8 = 8;

/// Shortest prefix length an IPv6 VIP or pool range may have, for the same
/// reason as [`MIN_PREFIX_V4`]: a link is a /64, a site a /48, and even the
/// regional registries' allocations are /12 to /23; /16 refuses only
/// prefixes no network assigns to anything reachable on one link.
pub const MIN_PREFIX_V6: u8 = 16;

/// Why an address may not be a VIP or a pool range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutOfBounds {
    /// The prefix is shorter than [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`].
    #[error(
        "its prefix length is shorter than /{min}: a VIP's prefix becomes an on-link route on the node (a /0 cuts it off its gateway); write the prefix of the subnet, at least /8 for IPv4 and /16 for IPv6"
    )]
    PrefixTooShort {
        /// The shortest allowed for the family.
        min: u8,
    },
    /// 127.0.0.0/8 or ::1.
    #[error("it is a loopback address (127.0.0.0/8, ::1), which never leaves the node")]
    Loopback,
    /// 169.254.0.0/16 (with the metadata address 169.254.169.254) or fe80::/10.
    #[error(
        "it is a link-local address (169.254.0.0/16, including the cloud metadata address 169.254.169.254, or fe80::/10)"
    )]
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8 or 255.255.255.255.
    #[error("it is a multicast (224.0.0.0/4, ff00::/8) or broadcast address")]
    Multicast,
    /// 0.0.0.0 or ::.
    #[error("it is the unspecified address (0.0.0.0, ::)")]
    Unspecified,
    /// An IPv4 address whose host bits are all zero (prefix /30 or shorter).
    #[error(
        "it is the network address of its own prefix (host bits all zero); pick a host address of the subnet"
    )]
    NetworkAddress,
    /// An IPv4 address whose host bits are all one (prefix /30 or shorter).
    #[error(
        "it is the broadcast address of its own prefix (host bits all one); pick a host address of the subnet"
    )]
    BroadcastAddress,
}

/// What kind of address [`check_address`] and [`check_pool_range`] have
/// found, shared by both.
fn address_kind(ip: IpAddr) -> Option<OutOfBounds> {
    let ip = ip.to_canonical();
    let link_local = match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    };
    let broadcast = ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST);
    if ip.is_unspecified() {
        Some(OutOfBounds::Unspecified)
    } else if ip.is_loopback() {
        Some(OutOfBounds::Loopback)
    } else if link_local {
        Some(OutOfBounds::LinkLocal)
    } else if ip.is_multicast() || broadcast {
        Some(OutOfBounds::Multicast)
    } else {
        None
    }
}

fn min_prefix(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => MIN_PREFIX_V4,
        IpNet::V6(_) => MIN_PREFIX_V6,
    }
}

/// Whether `net` (a VIP with its prefix) may be a VIP: a unicast address
/// that is not loopback, link-local, multicast or unspecified, a prefix of
/// at least [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`], and for IPv4 prefixes up
/// to /30 neither the network nor the broadcast address of that prefix. The
/// CEL rules of `spec.vips[].address` ([`vip_address_rules`]) say the same.
pub fn check_address(net: &IpNet) -> Result<(), OutOfBounds> {
    if net.prefix_len() < min_prefix(net) {
        return Err(OutOfBounds::PrefixTooShort {
            min: min_prefix(net),
        });
    }
    if let Some(kind) = address_kind(net.addr()) {
        return Err(kind);
    }
    if let IpNet::V4(v4) = net
        && v4.prefix_len() <= 30
    {
        if v4.addr() == v4.network() {
            return Err(OutOfBounds::NetworkAddress);
        }
        if v4.addr() == v4.broadcast() {
            return Err(OutOfBounds::BroadcastAddress);
        }
    }
    Ok(())
}

/// Whether `net` may be a range of `spec.vipPool`: a prefix of at least
/// [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`] whose address is not loopback,
/// link-local, multicast or unspecified ([`pool_range_rules`]).
pub fn check_pool_range(net: &IpNet) -> Result<(), OutOfBounds> {
    if net.prefix_len() < min_prefix(net) {
        return Err(OutOfBounds::PrefixTooShort {
            min: min_prefix(net),
        });
    }
    address_kind(net.addr()).map_or(Ok(()), Err)
}

/// CEL: `ADDR` (a CEL `IP` expression) is unicast or one of the kinds
/// refused by their own rules; false only for multicast and broadcast.
fn cel_unicast_or_refused_elsewhere(addr: &str) -> String {
    format!(
        "{addr}.isGlobalUnicast() || {addr}.isLoopback() || {addr}.isLinkLocalUnicast() || {addr}.isUnspecified()"
    )
}

fn rule(rule: String, message: String) -> serde_json::Value {
    serde_json::json!({ "rule": rule, "message": message })
}

/// The CEL rules shared by a VIP and a pool range: `field` names the field
/// in the messages, `fix` says what to write instead.
fn common_rules(field: &str, fix: &str) -> Vec<serde_json::Value> {
    let ip = "cidr(self).ip()";
    vec![
        rule(
            format!(
                "!isCIDR(self) || cidr(self).prefixLength() >= ({ip}.family() == 4 ? {MIN_PREFIX_V4} : {MIN_PREFIX_V6})"
            ),
            format!(
                "{field}: the prefix length must be at least /{MIN_PREFIX_V4} for IPv4 and /{MIN_PREFIX_V6} for IPv6 (a VIP's prefix becomes an on-link route on the node, and a /0 cuts it off its gateway); {fix}"
            ),
        ),
        rule(
            format!("!isCIDR(self) || !{ip}.isLoopback()"),
            format!("{field}: a loopback address (127.0.0.0/8, ::1) never leaves the node; {fix}"),
        ),
        rule(
            format!("!isCIDR(self) || !{ip}.isLinkLocalUnicast()"),
            format!(
                "{field}: a link-local address (169.254.0.0/16, including the cloud metadata address 169.254.169.254, or fe80::/10) is not allowed; {fix}"
            ),
        ),
        rule(
            format!("!isCIDR(self) || {}", cel_unicast_or_refused_elsewhere(ip)),
            format!(
                "{field}: a multicast (224.0.0.0/4, ff00::/8) or broadcast address is not allowed; {fix}"
            ),
        ),
        rule(
            format!("!isCIDR(self) || !{ip}.isUnspecified()"),
            format!("{field}: the unspecified address (0.0.0.0, ::) is not allowed; {fix}"),
        ),
    ]
}

/// The CEL rules of `spec.vips[].address` ([`check_address`] in Rust).
pub fn vip_address_rules() -> serde_json::Value {
    let field = "spec.vips[].address";
    let fix = "write a unicast host address of the service's subnet with that subnet's prefix, inside the cluster's spec.vipPool, e.g. 198.18.0.100/24";
    let mut rules = common_rules(field, fix);
    // No IP arithmetic and no cel.bind in the API server's CEL: the dotted
    // quad in integers, modulo 2^(32 - prefix) from a list.
    let small_v4 =
        "!isCIDR(self) || cidr(self).ip().family() != 4 || cidr(self).prefixLength() > 30";
    let octet = |i: usize| format!("int(self.split('/')[0].split('.')[{i}])");
    let value = format!(
        "({} * 16777216 + {} * 65536 + {} * 256 + {})",
        octet(0),
        octet(1),
        octet(2),
        octet(3)
    );
    let powers: Vec<String> = (0..=32).map(|i| (1u64 << i).to_string()).collect();
    let hosts = format!("[{}][32 - cidr(self).prefixLength()]", powers.join(", "));
    rules.push(rule(
        format!("{small_v4} || {value} % {hosts} != 0"),
        format!(
            "{field}: an IPv4 VIP may not be the network address of its own prefix (host bits all zero, e.g. 198.18.0.0/24); pick a host address of the subnet"
        ),
    ));
    rules.push(rule(
        format!("{small_v4} || {value} % {hosts} != {hosts} - 1"),
        format!(
            "{field}: an IPv4 VIP may not be the broadcast address of its own prefix (host bits all one, e.g. 198.18.0.255/24); pick a host address of the subnet"
        ),
    ));
    serde_json::Value::Array(rules)
}

/// The CEL rules of each range of `spec.vipPool` ([`check_pool_range`]).
pub fn pool_range_rules() -> serde_json::Value {
    serde_json::Value::Array(common_rules(
        "spec.vipPool[]",
        "write the range of the subnet the VIPs live in, e.g. 198.18.0.96/28",
    ))
}

/// The CEL rule of `spec.defaultRoute.gateway`: an address a route can
/// point at.
pub fn gateway_rules() -> serde_json::Value {
    serde_json::json!([
        {
            "rule": "isIP(self)",
            "message": "spec.defaultRoute.gateway must be an IP address such as 198.18.0.1, without a prefix length"
        },
        {
            "rule": "!isIP(self) || ip(self).isGlobalUnicast() || ip(self).isLinkLocalUnicast()",
            "message": "spec.defaultRoute.gateway must be a unicast router address: not unspecified (0.0.0.0, ::), loopback (127.0.0.0/8, ::1), multicast or broadcast; write the subnet's router, e.g. 198.18.0.1"
        }
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_both_families_and_keeps_host_bits() {
        let n = parse("198.18.0.10/24").unwrap();
        assert_eq!((n.addr(), n.prefix_len()), (ip("198.18.0.10"), 24));
        let n = parse("2001:db8::10/64").unwrap();
        assert_eq!((n.addr(), n.prefix_len()), (ip("2001:db8::10"), 64));
        for bad in [
            "",
            "198.18.0.10",
            "198.18.0.10/33",
            "2001:db8::/129",
            "x/24",
            "1.2.3.4/-1",
        ] {
            assert_eq!(parse(bad), Err(BadCidr(bad.to_owned())), "{bad}");
        }
    }

    #[test]
    fn subnet_contains_matches_prefixes() {
        assert!(subnet_contains(ip("198.18.0.1"), 24, ip("198.18.0.200")));
        assert!(!subnet_contains(ip("198.18.0.1"), 24, ip("198.18.1.1")));
        assert!(subnet_contains(ip("198.18.0.1"), 0, ip("203.0.113.1")));
        assert!(subnet_contains(ip("198.18.0.1"), 32, ip("198.18.0.1")));
        assert!(!subnet_contains(ip("198.18.0.1"), 32, ip("198.18.0.2")));
        assert!(subnet_contains(ip("2001:db8::1"), 64, ip("2001:db8::ffff")));
        assert!(!subnet_contains(ip("2001:db8::1"), 64, ip("2001:db8:1::1")));
        assert!(!subnet_contains(ip("198.18.0.1"), 0, ip("2001:db8::1")));
        assert!(!subnet_contains(ip("198.18.0.1"), 33, ip("198.18.0.1")));
    }

    fn net(s: &str) -> IpNet {
        parse(s).unwrap()
    }

    #[test]
    fn vip_bounds_refuse_every_special_kind() {
        for ok in [
            "198.18.0.100/24",
            "198.18.0.1/31",
            "198.18.0.0/31",
            "198.18.0.7/32",
            "10.1.2.3/8",
            "2001:db8::100/64",
            "2001:db8::/64",
            "2001:db8::1/16",
        ] {
            assert_eq!(check_address(&net(ok)), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("198.18.0.100/0", OutOfBounds::PrefixTooShort { min: 8 }),
            ("198.18.0.100/7", OutOfBounds::PrefixTooShort { min: 8 }),
            ("2001:db8::1/0", OutOfBounds::PrefixTooShort { min: 16 }),
            ("2001:db8::1/15", OutOfBounds::PrefixTooShort { min: 16 }),
            ("127.0.0.2/8", OutOfBounds::Loopback),
            ("::1/128", OutOfBounds::Loopback),
            ("169.254.169.254/32", OutOfBounds::LinkLocal),
            ("169.254.10.1/16", OutOfBounds::LinkLocal),
            ("fe80::10/64", OutOfBounds::LinkLocal),
            ("224.0.0.18/24", OutOfBounds::Multicast),
            ("239.1.1.1/8", OutOfBounds::Multicast),
            ("ff02::1/64", OutOfBounds::Multicast),
            ("255.255.255.255/32", OutOfBounds::Multicast),
            ("0.0.0.0/8", OutOfBounds::Unspecified),
            ("::/64", OutOfBounds::Unspecified),
            ("198.18.0.0/24", OutOfBounds::NetworkAddress),
            ("198.18.0.96/28", OutOfBounds::NetworkAddress),
            ("198.18.0.255/24", OutOfBounds::BroadcastAddress),
            ("198.18.0.3/30", OutOfBounds::BroadcastAddress),
            ("::ffff:127.0.0.1/120", OutOfBounds::Loopback),
        ] {
            assert_eq!(check_address(&net(bad)), Err(why), "{bad}");
        }
    }

    #[test]
    fn pool_bounds_refuse_short_and_special_ranges() {
        for ok in ["198.18.0.96/28", "10.0.0.0/8", "2001:db8::/64", "2001::/16"] {
            assert_eq!(check_pool_range(&net(ok)), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0/0", OutOfBounds::PrefixTooShort { min: 8 }),
            ("0.0.0.0/8", OutOfBounds::Unspecified),
            ("198.18.0.0/0", OutOfBounds::PrefixTooShort { min: 8 }),
            ("::/0", OutOfBounds::PrefixTooShort { min: 16 }),
            ("127.0.0.0/8", OutOfBounds::Loopback),
            ("169.254.0.0/16", OutOfBounds::LinkLocal),
            ("fe80::/64", OutOfBounds::LinkLocal),
            ("239.0.0.0/8", OutOfBounds::Multicast),
        ] {
            assert_eq!(check_pool_range(&net(bad)), Err(why), "{bad}");
        }
    }

    #[test]
    fn cel_rules_name_their_field_and_cover_every_bound() {
        let rules = vip_address_rules();
        let rules = rules.as_array().unwrap();
        assert_eq!(rules.len(), 7);
        for r in rules {
            let message = r["message"].as_str().unwrap();
            assert!(message.starts_with("spec.vips[].address: "), "{message}");
            assert!(r["rule"].as_str().unwrap().starts_with("!isCIDR(self) || "));
        }
        let broadcast = rules[6]["rule"].as_str().unwrap();
        assert!(broadcast.contains("[1, 2, 4, 8,") && broadcast.contains("4294967296]"));
        for r in pool_range_rules().as_array().unwrap() {
            assert!(
                r["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("spec.vipPool[]: ")
            );
        }
    }
}
