//! Validation of an HAService against its cluster and the rest of the
//! world: the checks the API server cannot make because they span several
//! objects. Pure: the caller gathers the facts.
//!
//! A service with any [`Problem`] is refused: it is never assigned (a
//! running one is stopped) and reports `Stalled` until its spec, its
//! cluster or the conflicting object changes.

use std::net::IpAddr;

use crate::cidr::{self, IpNet};
use crate::cluster::HAClusterSpec;
use crate::service::HAServiceSpec;

/// One reason a service is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The service's namespace may not bind to the cluster.
    #[error(
        "namespace {namespace} may not bind HAServices to HACluster {cluster}; the cluster admin adds it (or \"*\") to spec.allowedNamespaces"
    )]
    NamespaceNotAllowed {
        /// The service's namespace.
        namespace: String,
        /// The cluster.
        cluster: String,
    },
    /// A VIP that does not parse.
    #[error("spec.vips: {0}")]
    BadVip(String),
    /// A VIP listed twice.
    #[error("spec.vips: address {0} is listed twice")]
    DuplicateVip(String),
    /// A VIP outside every range of the cluster's pool.
    #[error(
        "spec.vips: {address} is outside the VIP pool {pool:?} of HACluster {cluster}; pick an address inside it or ask the cluster admin to widen spec.vipPool"
    )]
    VipOutsidePool {
        /// The VIP.
        address: String,
        /// The cluster's pool.
        pool: Vec<String>,
        /// The cluster.
        cluster: String,
    },
    /// A VIP equal to a node's own address.
    #[error(
        "spec.vips: {address} is an address of node {node}; a VIP must not be any node's own address"
    )]
    VipIsNodeAddress {
        /// The VIP.
        address: String,
        /// The node owning that address.
        node: String,
    },
    /// A VIP an older service already claims.
    #[error(
        "spec.vips: {address} is already claimed by the older HAService {by}; pick another address"
    )]
    VipClaimed {
        /// The VIP.
        address: String,
        /// The older service, `namespace/name`.
        by: String,
    },
    /// A hook source the cluster's `spec.allowedHookSources` does not give
    /// the service's namespace ([`crate::hook_policy`]); the message names
    /// the field and the fix.
    #[error("{0}")]
    HookSourceNotAllowed(crate::hook_policy::HookSourceRefused),
    /// The cluster's timing lets no agent enter (a cluster stored before
    /// the API server checked it): placing the service would only make
    /// every member refuse it.
    #[error(
        "HACluster {cluster}: no agent could ever enter under its spec.heartbeat timing; the cluster admin fixes it (see the cluster's Stalled condition)"
    )]
    TimingNeverEnters {
        /// The cluster.
        cluster: String,
    },
}

/// The service being validated.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// `namespace/name`.
    pub key: &'a str,
    /// Its creation time (older services keep contested VIPs).
    pub created: Option<jiff::Timestamp>,
    /// Its spec.
    pub spec: &'a HAServiceSpec,
}

/// Another service's claim on VIPs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// `namespace/name`.
    pub key: String,
    /// Its creation time.
    pub created: Option<jiff::Timestamp>,
    /// Its VIP addresses.
    pub addresses: Vec<IpAddr>,
}

impl Claim {
    /// The claim of a service spec (unparsable VIPs claim nothing).
    pub fn of(key: String, created: Option<jiff::Timestamp>, spec: &HAServiceSpec) -> Self {
        Self {
            key,
            created,
            addresses: spec
                .vips
                .iter()
                .filter_map(|v| cidr::parse(&v.address).ok())
                .map(|c| c.addr())
                .collect(),
        }
    }
}

/// Orders claims: older first; ties (or unknown times) by key.
fn older(a: (Option<jiff::Timestamp>, &str), b: (Option<jiff::Timestamp>, &str)) -> bool {
    let rank = |t: Option<jiff::Timestamp>| t.unwrap_or(jiff::Timestamp::MAX);
    (rank(a.0), a.1) < (rank(b.0), b.1)
}

/// Checks a service against its cluster (`cluster_name`, `cluster`), the
/// nodes' own addresses (`(node, address)`) and the other services' claims
/// (the subject's own claim may be among them; it is skipped).
pub fn validate(
    subject: Subject<'_>,
    cluster_name: &str,
    cluster: &HAClusterSpec,
    node_addresses: &[(String, IpAddr)],
    claims: &[Claim],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    if !cluster.heartbeat.lets_agents_enter() {
        problems.push(Problem::TimingNeverEnters {
            cluster: cluster_name.to_owned(),
        });
    }
    let allowed = cluster
        .allowed_namespaces
        .iter()
        .any(|n| n == "*" || n == subject.namespace);
    if !allowed {
        problems.push(Problem::NamespaceNotAllowed {
            namespace: subject.namespace.to_owned(),
            cluster: cluster_name.to_owned(),
        });
    }

    let pool: Vec<IpNet> = cluster
        .vip_pool
        .iter()
        .filter_map(|p| cidr::parse(p).ok())
        .collect();
    let mut seen: Vec<IpAddr> = Vec::new();
    for vip in &subject.spec.vips {
        let net = match cidr::parse(&vip.address) {
            Ok(c) => c,
            Err(e) => {
                problems.push(Problem::BadVip(e.to_string()));
                continue;
            }
        };
        let ip = net.addr();
        if seen.contains(&ip) {
            problems.push(Problem::DuplicateVip(ip.to_string()));
            continue;
        }
        seen.push(ip);
        if !pool.iter().any(|p| p.contains(&ip)) {
            problems.push(Problem::VipOutsidePool {
                address: ip.to_string(),
                pool: cluster.vip_pool.clone(),
                cluster: cluster_name.to_owned(),
            });
        }
        if let Some((node, _)) = node_addresses.iter().find(|(_, a)| *a == ip) {
            problems.push(Problem::VipIsNodeAddress {
                address: ip.to_string(),
                node: node.clone(),
            });
        }
        let contender = claims
            .iter()
            .filter(|c| c.key != subject.key && c.addresses.contains(&ip))
            .filter(|c| older((c.created, &c.key), (subject.created, subject.key)))
            .min_by(|a, b| {
                if older((a.created, &a.key), (b.created, &b.key)) {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            });
        if let Some(c) = contender {
            problems.push(Problem::VipClaimed {
                address: ip.to_string(),
                by: c.key.clone(),
            });
        }
    }

    if let Some(source) = subject.spec.hooks.as_ref().map(|h| &h.source)
        && let Err(refused) = crate::hook_policy::check(
            &cluster.allowed_hook_sources,
            cluster_name,
            subject.namespace,
            source,
        )
    {
        problems.push(Problem::HookSourceNotAllowed(refused));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{AllowedHookSources, Members};
    use crate::service::{HookSource, Hooks};
    use crate::testing::{cluster_spec, service_spec};

    fn cluster(pool: &[&str], namespaces: &[&str]) -> HAClusterSpec {
        let mut c = cluster_spec(Members::default());
        c.vip_pool = pool.iter().map(|s| s.to_string()).collect();
        c.allowed_namespaces = namespaces.iter().map(|s| s.to_string()).collect();
        c
    }

    fn spec(vips: &[&str]) -> HAServiceSpec {
        service_spec("c", vips)
    }

    fn subject<'a>(spec: &'a HAServiceSpec, key: &'a str, created: i64) -> Subject<'a> {
        Subject {
            namespace: key.split('/').next().unwrap(),
            key,
            created: Some(jiff::Timestamp::from_second(created).unwrap()),
            spec,
        }
    }

    #[test]
    fn a_valid_service_has_no_problems() {
        let s = spec(&["198.18.0.100/24", "2001:db8::100/64"]);
        let c = cluster(&["198.18.0.96/28", "2001:db8::/64"], &["apps"]);
        assert_eq!(
            validate(subject(&s, "apps/nfs", 1), "c", &c, &[], &[]),
            vec![]
        );
        let c = cluster(&["198.18.0.96/28", "2001:db8::/64"], &["*"]);
        assert_eq!(
            validate(subject(&s, "other/nfs", 1), "c", &c, &[], &[]),
            vec![]
        );
    }

    #[test]
    fn a_cluster_timing_no_agent_can_enter_under_is_a_problem_of_its_services() {
        let s = spec(&["198.18.0.100/24"]);
        let mut c = cluster(&["198.18.0.0/24"], &["apps"]);
        // D = 1 s with 100 ms of skew, but renewed only every 900 ms.
        c.heartbeat.lease_duration_ms = 1000;
        c.heartbeat.renew_interval_ms = 900;
        c.heartbeat.renew_deadline_ms = 950;
        c.heartbeat.clock_skew_ms = 100;
        let p = validate(subject(&s, "apps/nfs", 1), "c", &c, &[], &[]);
        assert!(
            matches!(&p[..], [Problem::TimingNeverEnters { .. }]),
            "{p:?}"
        );
        assert!(p[0].to_string().contains("HACluster c"), "{}", p[0]);
    }

    #[test]
    fn namespace_must_be_allowed() {
        let s = spec(&["198.18.0.100/24"]);
        let c = cluster(&["198.18.0.0/24"], &["apps"]);
        let p = validate(subject(&s, "dev/nfs", 1), "c", &c, &[], &[]);
        assert!(
            matches!(&p[..], [Problem::NamespaceNotAllowed { .. }]),
            "{p:?}"
        );
        let c = cluster(&["198.18.0.0/24"], &[]);
        assert_eq!(
            validate(subject(&s, "apps/nfs", 1), "c", &c, &[], &[]).len(),
            1
        );
    }

    #[test]
    fn vip_outside_pool_or_on_a_node_is_refused() {
        let s = spec(&["198.18.0.200/24", "198.18.0.11/24"]);
        let c = cluster(&["198.18.0.0/25"], &["*"]);
        let nodes = vec![("node-1".to_owned(), "198.18.0.11".parse().unwrap())];
        let p = validate(subject(&s, "a/x", 1), "c", &c, &nodes, &[]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            matches!(&p[0], Problem::VipOutsidePool { address, .. } if address == "198.18.0.200")
        );
        assert!(matches!(&p[1], Problem::VipIsNodeAddress { node, .. } if node == "node-1"));
        assert!(p[0].to_string().contains("spec.vipPool"));
    }

    #[test]
    fn the_older_service_keeps_a_contested_vip() {
        let c = cluster(&["198.18.0.0/24"], &["*"]);
        let old = spec(&["198.18.0.100/24"]);
        let young = spec(&["198.18.0.100/32"]);
        let claims = vec![
            Claim::of(
                "a/old".into(),
                Some(jiff::Timestamp::from_second(1).unwrap()),
                &old,
            ),
            Claim::of(
                "b/young".into(),
                Some(jiff::Timestamp::from_second(2).unwrap()),
                &young,
            ),
        ];
        assert_eq!(
            validate(subject(&old, "a/old", 1), "c", &c, &[], &claims),
            vec![]
        );
        let p = validate(subject(&young, "b/young", 2), "c", &c, &[], &claims);
        assert_eq!(
            p,
            vec![Problem::VipClaimed {
                address: "198.18.0.100".into(),
                by: "a/old".into()
            }]
        );
        // Same creation second: the key decides, deterministically.
        let p = validate(subject(&young, "b/young", 1), "c", &c, &[], &claims);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn duplicate_and_bad_vips() {
        let c = cluster(&["198.18.0.0/24"], &["*"]);
        let s = spec(&["198.18.0.5/24", "198.18.0.5/32", "nonsense"]);
        let p = validate(subject(&s, "a/x", 1), "c", &c, &[], &[]);
        assert!(p.contains(&Problem::DuplicateVip("198.18.0.5".into())));
        assert!(p.iter().any(|p| matches!(p, Problem::BadVip(_))));
    }

    #[test]
    fn hook_sources_must_be_granted_to_the_services_namespace() {
        use crate::hook_policy::{HookSourceRefused, NamespaceHookSources};
        let mut c = cluster(&["198.18.0.0/24"], &["*"]);
        c.allowed_hook_sources = AllowedHookSources {
            namespaces: vec![NamespaceHookSources {
                namespace: "a".into(),
                host_paths: vec!["a".into()],
                config_maps: vec!["a/hooks".into()],
            }],
        };
        let mut s = spec(&["198.18.0.5/24"]);
        s.hooks = Some(Hooks {
            source: HookSource {
                host_path: Some("b/nfs".into()),
                config_map: None,
            },
            script: None,
            timeout_seconds: 60,
            monitor: None,
            periodic: None,
        });
        // Another team's directory.
        let p = validate(subject(&s, "a/x", 1), "c", &c, &[], &[]);
        assert!(
            matches!(
                &p[..],
                [Problem::HookSourceNotAllowed(
                    HookSourceRefused::HostPathNotGranted { .. }
                )]
            ),
            "{p:?}"
        );
        assert!(p[0].to_string().contains("spec.hooks.source.hostPath"));
        s.hooks.as_mut().unwrap().source.host_path = Some("a/nfs".into());
        assert_eq!(validate(subject(&s, "a/x", 1), "c", &c, &[], &[]), vec![]);
        // Its own ConfigMap, granted; the same name from namespace b is not.
        s.hooks.as_mut().unwrap().source = HookSource {
            host_path: None,
            config_map: Some("hooks".into()),
        };
        assert_eq!(validate(subject(&s, "a/x", 1), "c", &c, &[], &[]), vec![]);
        let p = validate(subject(&s, "b/x", 1), "c", &c, &[], &[]);
        assert!(
            matches!(
                &p[..],
                [Problem::HookSourceNotAllowed(
                    HookSourceRefused::ConfigMapNotGranted { .. }
                )]
            ),
            "{p:?}"
        );
        // The default policy grants nothing.
        c.allowed_hook_sources = AllowedHookSources::default();
        assert_eq!(validate(subject(&s, "a/x", 1), "c", &c, &[], &[]).len(), 1);
    }
}
