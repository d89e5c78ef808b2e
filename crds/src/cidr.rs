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
}
