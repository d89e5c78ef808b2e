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
    /// A VIP of a kind no VIP may be (loopback, link-local, /0, ...): a
    /// service stored before the API server checked it
    /// ([`cidr::check_address`]).
    #[error("spec.vips: {address} may not be a VIP: {why}")]
    VipOutOfBounds {
        /// The VIP with its prefix.
        address: String,
        /// Which bound it breaks.
        why: cidr::OutOfBounds,
    },
    /// A pool range of a kind no range may be: a cluster stored before the
    /// API server checked it ([`cidr::check_pool_range`]). It holds no VIP.
    #[error(
        "HACluster {cluster}: spec.vipPool range {range} may not hold VIPs: {why}; the cluster admin fixes spec.vipPool"
    )]
    PoolRangeOutOfBounds {
        /// The range.
        range: String,
        /// Which bound it breaks.
        why: cidr::OutOfBounds,
        /// The cluster.
        cluster: String,
    },
    /// A VIP whose prefix is shorter than that of every pool range holding
    /// it: its on-link route would reach outside the pool.
    #[error(
        "spec.vips: {address} has a shorter prefix than the range {range} of HACluster {cluster}'s spec.vipPool that holds it; the VIP's prefix becomes an on-link route on the node and may not reach outside the pool: write /{range_prefix} or longer"
    )]
    VipPrefixShorterThanPool {
        /// The VIP with its prefix.
        address: String,
        /// The longest-prefix pool range holding the address.
        range: String,
        /// That range's prefix length.
        range_prefix: u8,
        /// The cluster.
        cluster: String,
    },
    /// A member node whose name cannot be a label value, so it could never
    /// heartbeat nor be named in a Lease's labels.
    #[error(
        "HACluster {cluster}: member node {node} has a name of {len} characters; kubeha labels carry node names and take at most 63, so that node could never heartbeat: relabel it so spec.members.selector does not pick it, or use nodes with shorter names"
    )]
    MemberNameTooLong {
        /// The node's name.
        node: String,
        /// Its length in characters.
        len: usize,
        /// The cluster.
        cluster: String,
    },
    /// More members than a service's `status.nodes` can list under etcd's
    /// object size limit (each agent reports an entry of at most 5 KiB).
    #[error(
        "HACluster {cluster}: {count} member nodes, at most {MAX_MEMBERS}; every member reports into each service's status, which must stay under etcd's object size: narrow spec.members.selector or split the nodes into several HAClusters"
    )]
    TooManyMembers {
        /// The number of members.
        count: usize,
        /// The cluster.
        cluster: String,
    },
    /// A hook source the cluster's `spec.allowedHookSources` does not give
    /// the service's namespace ([`crate::hook_policy`]); the message names
    /// the field and the fix.
    #[error("{0}")]
    HookSourceNotAllowed(crate::hook_policy::HookSourceRefused),
    /// A `spec.hooks.env` entry the agent may not pass to the scripts
    /// ([`crate::service::hook_env_problems`]): a service stored before the
    /// API server checked it. The message names the field and the fix.
    #[error("{0}")]
    BadHookEnv(String),
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

/// Claims by address, so that the claims contending with a spec are found
/// without going through every claim: an agent checks each service it
/// holds a role in against every service's claim, on every pass.
#[derive(Clone, Debug, Default)]
pub struct ClaimIndex {
    by_address: std::collections::HashMap<IpAddr, Vec<Claim>>,
}

impl ClaimIndex {
    /// The index of `claims`.
    pub fn new(claims: impl IntoIterator<Item = Claim>) -> Self {
        let mut by_address: std::collections::HashMap<IpAddr, Vec<Claim>> = Default::default();
        for claim in claims {
            for address in &claim.addresses {
                by_address.entry(*address).or_default().push(claim.clone());
            }
        }
        Self { by_address }
    }

    /// The claims that share an address with `spec`'s VIPs, each once:
    /// the only ones [`validate`] can find contending.
    pub fn sharing(&self, spec: &HAServiceSpec) -> Vec<Claim> {
        let mut found: Vec<Claim> = Vec::new();
        for address in Claim::of(String::new(), None, spec).addresses {
            for claim in self.by_address.get(&address).into_iter().flatten() {
                if !found.contains(claim) {
                    found.push(claim.clone());
                }
            }
        }
        found
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

    let mut pool: Vec<IpNet> = Vec::new();
    for range in cluster.vip_pool.iter() {
        let Ok(net) = cidr::parse(range) else {
            continue;
        };
        match cidr::check_pool_range(&net) {
            Ok(()) => pool.push(net),
            Err(why) => problems.push(Problem::PoolRangeOutOfBounds {
                range: range.clone(),
                why,
                cluster: cluster_name.to_owned(),
            }),
        }
    }
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
        if let Err(why) = cidr::check_address(&net) {
            problems.push(Problem::VipOutOfBounds {
                address: net.to_string(),
                why,
            });
        }
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

    if let Some(hooks) = subject.spec.hooks.as_ref()
        && let Err(refused) = crate::hook_policy::check(
            &cluster.allowed_hook_sources,
            cluster_name,
            subject.namespace,
            hooks,
        )
    {
        problems.push(Problem::HookSourceNotAllowed(refused));
    }
    if let Some(hooks) = &subject.spec.hooks {
        problems.extend(
            crate::service::hook_env_problems(&hooks.env)
                .into_iter()
                .map(Problem::BadHookEnv),
        );
    }
    problems.extend(vip_prefix_problems(cluster_name, cluster, subject.spec));
    problems
}

/// The VIPs of `spec` whose prefix is shorter than that of the most
/// specific range of the cluster's pool holding them (`cluster_name`,
/// `cluster`): such a VIP's on-link route reaches outside the pool. VIPs
/// that do not parse or lie outside every range are [`validate`]'s.
pub fn vip_prefix_problems(
    cluster_name: &str,
    cluster: &HAClusterSpec,
    spec: &HAServiceSpec,
) -> Vec<Problem> {
    let pool: Vec<IpNet> = cluster
        .vip_pool
        .iter()
        .filter_map(|p| cidr::parse(p).ok())
        .filter(|p| cidr::check_pool_range(p).is_ok())
        .collect();
    spec.vips
        .iter()
        .filter_map(|v| cidr::parse(&v.address).ok())
        .filter_map(|net| {
            // The most specific range holding the address bounds its prefix.
            let range = pool
                .iter()
                .filter(|p| p.contains(&net.addr()))
                .max_by_key(|p| p.prefix_len())?;
            (net.prefix_len() < range.prefix_len()).then(|| Problem::VipPrefixShorterThanPool {
                address: net.to_string(),
                range: range.to_string(),
                range_prefix: range.prefix_len(),
                cluster: cluster_name.to_owned(),
            })
        })
        .collect()
}

/// The most members a cluster may have: 200 status entries of at most
/// 5 KiB each (the agent's bound) keep a service's status under 1 MiB,
/// within etcd's object size with room for the rest of the object.
pub const MAX_MEMBERS: usize = 200;

/// The longest a node name may be: the value of the `kubeha.io/node`
/// label (a label value takes at most 63 characters).
pub const MAX_NODE_NAME_LEN: usize = 63;

/// The members of a cluster (`cluster_name`, the resolved member names,
/// selected ones included) whose names are too long for the labels they
/// feed ([`MAX_NODE_NAME_LEN`]). The API server bounds the listed names;
/// a label selector can pick any Node.
pub fn member_problems<'a>(
    cluster_name: &str,
    members: impl IntoIterator<Item = &'a str>,
) -> Vec<Problem> {
    let members: Vec<&str> = members.into_iter().collect();
    let mut problems: Vec<Problem> = members
        .iter()
        .filter(|n| n.len() > MAX_NODE_NAME_LEN)
        .map(|n| Problem::MemberNameTooLong {
            node: (*n).to_owned(),
            len: n.chars().count(),
            cluster: cluster_name.to_owned(),
        })
        .collect();
    if members.len() > MAX_MEMBERS {
        problems.push(Problem::TooManyMembers {
            count: members.len(),
            cluster: cluster_name.to_owned(),
        });
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

    /// The index finds exactly the claims sharing an address, once each,
    /// and validation over them finds what it finds over every claim.
    #[test]
    fn the_claim_index_finds_the_claims_sharing_an_address() {
        let at = |s: i64| Some(jiff::Timestamp::from_second(s).unwrap());
        let old = Claim::of(
            "a/old".into(),
            at(1),
            &spec(&["198.18.0.10/24", "198.18.0.11/24"]),
        );
        let other = Claim::of("a/other".into(), at(1), &spec(&["198.18.0.99/24"]));
        let all = vec![old.clone(), other.clone()];
        let index = ClaimIndex::new(all.clone());
        let young = spec(&["198.18.0.10/24", "198.18.0.11/24"]);
        assert_eq!(index.sharing(&young), vec![old]);
        assert!(index.sharing(&spec(&["198.18.0.50/24"])).is_empty());
        let c = cluster(&["198.18.0.0/24"], &[]);
        assert_eq!(
            validate(
                subject(&young, "a/young", 2),
                "c",
                &c,
                &[],
                &index.sharing(&young)
            ),
            validate(subject(&young, "a/young", 2), "c", &c, &[], &all)
        );
    }

    #[test]
    fn a_valid_service_has_no_problems() {
        let s = spec(&["198.18.0.100/28", "2001:db8::100/64"]);
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
        let s = spec(&["198.18.0.200/25", "198.18.0.11/25"]);
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

    /// Hooks from the host directory `path`, with the defaults.
    fn host_path_hooks(path: &str) -> Hooks {
        Hooks {
            source: HookSource {
                host_path: Some(path.into()),
                config_map: None,
            },
            script: None,
            timeout_seconds: 60,
            monitor: None,
            periodic: None,
            env: Vec::new(),
            run_as_user: None,
        }
    }

    #[test]
    fn hook_env_names_values_and_counts_are_checked() {
        use crate::service::HookEnvVar;
        let c = cluster(&["198.18.0.0/24"], &["*"]);
        let mut s = spec(&["198.18.0.5/24"]);
        let var = |name: &str, value: &str| HookEnvVar {
            name: name.into(),
            value: value.into(),
        };
        s.hooks = Some(Hooks {
            env: vec![
                var("DB_PORT", "5432"),
                var("_x1", ""),
                var("a", "$(rm -rf /)"),
            ],
            ..host_path_hooks("nfs")
        });
        let mut c = c;
        c.allowed_hook_sources.namespaces = vec![crate::hook_policy::NamespaceHookSources {
            namespace: "*".into(),
            host_paths: vec!["*".into()],
            ..Default::default()
        }];
        assert_eq!(validate(subject(&s, "a/x", 1), "c", &c, &[], &[]), vec![]);
        let refused = |env: Vec<HookEnvVar>| {
            let mut s = s.clone();
            s.hooks.as_mut().unwrap().env = env;
            validate(subject(&s, "a/x", 1), "c", &c, &[], &[])
                .into_iter()
                .map(|p| match p {
                    Problem::BadHookEnv(why) => why,
                    other => panic!("not a hook env problem: {other}"),
                })
                .collect::<Vec<_>>()
        };
        for (name, says) in [
            ("1ABC", "DB_PORT"),
            ("DB-PORT", "DB_PORT"),
            ("", "DB_PORT"),
            ("KUBEHA_NODE", "agent's own"),
            ("PATH", "may not be set"),
            ("LD_PRELOAD", "may not be set"),
            ("BASH_ENV", "may not be set"),
            ("IFS", "may not be set"),
            ("GLIBC_TUNABLES", "may not be set"),
        ] {
            let p = refused(vec![var(name, "v")]);
            assert!(
                p.len() == 1 && p[0].starts_with("spec.hooks.env[].name: ") && p[0].contains(says),
                "{name:?}: {p:?}"
            );
        }
        let p = refused(vec![var("A", "1"), var("A", "2")]);
        assert!(p.len() == 1 && p[0].contains("A is given twice"), "{p:?}");
        let p = refused(vec![var("A", "a\0b")]);
        assert!(p.len() == 1 && p[0].contains("NUL"), "{p:?}");
        let long = "x".repeat(crate::service::MAX_HOOK_ENV_VALUE_BYTES + 1);
        let p = refused(vec![var("A", &long)]);
        assert!(
            p.len() == 1 && p[0].starts_with("spec.hooks.env[A].value: 4097 bytes"),
            "{p:?}"
        );
        let p = refused(vec![var(&"N".repeat(129), "")]);
        assert!(
            p.len() == 1 && p[0].contains("129 bytes, at most 128"),
            "{p:?}"
        );
        let many = (0..=crate::service::MAX_HOOK_ENV)
            .map(|i| var(&format!("P{i}"), ""))
            .collect();
        let p = refused(many);
        assert!(
            p.len() == 1 && p[0].contains("33 entries, at most 32"),
            "{p:?}"
        );
    }

    #[test]
    fn hook_sources_must_be_granted_to_the_services_namespace() {
        use crate::hook_policy::{HookSourceRefused, NamespaceHookSources};
        let mut c = cluster(&["198.18.0.0/24"], &["*"]);
        c.allowed_hook_sources = AllowedHookSources {
            namespaces: vec![NamespaceHookSources {
                namespace: "a".into(),
                host_paths: vec!["a".into()],
                config_maps: Vec::new(),
                own_config_maps: vec!["hooks".into()],
                run_as_users: Vec::new(),
            }],
        };
        let mut s = spec(&["198.18.0.5/24"]);
        s.hooks = Some(host_path_hooks("b/nfs"));
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

    #[test]
    fn a_vip_prefix_may_not_reach_outside_its_pool_range() {
        let c = cluster(
            &["198.18.0.96/28", "198.18.0.0/24", "2001:db8::100/120"],
            &["*"],
        );
        // Inside the /28 and the /24: the /28 bounds it.
        let s = spec(&["198.18.0.100/24"]);
        let p = vip_prefix_problems("c", &c, &s);
        assert_eq!(
            p,
            vec![Problem::VipPrefixShorterThanPool {
                address: "198.18.0.100/24".into(),
                range: "198.18.0.96/28".into(),
                range_prefix: 28,
                cluster: "c".into(),
            }]
        );
        assert!(p[0].to_string().contains("write /28 or longer"), "{}", p[0]);
        // Only in the /24: fine at /24, refused at /16 (also too short for
        // the /24 range).
        let s = spec(&["198.18.0.20/24", "198.18.0.100/28", "198.18.0.101/32"]);
        assert_eq!(vip_prefix_problems("c", &c, &s), vec![]);
        assert_eq!(validate(subject(&s, "a/x", 1), "c", &c, &[], &[]), vec![]);
        let s = spec(&["198.18.0.20/16", "2001:db8::101/64", "203.0.113.1/8"]);
        let p = vip_prefix_problems("c", &c, &s);
        assert!(
            matches!(
                &p[..],
                [
                    Problem::VipPrefixShorterThanPool {
                        range_prefix: 24,
                        ..
                    },
                    Problem::VipPrefixShorterThanPool {
                        range_prefix: 120,
                        ..
                    },
                ]
            ),
            "{p:?}"
        );
    }

    #[test]
    fn vips_and_pool_ranges_out_of_bounds_are_refused_even_when_stored_before_the_rules() {
        let c = cluster(&["0.0.0.0/0", "169.254.0.0/16", "198.18.0.0/24"], &["*"]);
        let s = spec(&["169.254.169.254/16", "198.18.0.0/24", "198.18.0.50/24"]);
        let p = validate(subject(&s, "a/x", 1), "c", &c, &[], &[]);
        let texts: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(
            &p[..2],
            &[
                Problem::PoolRangeOutOfBounds {
                    range: "0.0.0.0/0".into(),
                    why: cidr::OutOfBounds::PrefixTooShort { min: 8 },
                    cluster: "c".into(),
                },
                Problem::PoolRangeOutOfBounds {
                    range: "169.254.0.0/16".into(),
                    why: cidr::OutOfBounds::LinkLocal,
                    cluster: "c".into(),
                },
            ],
            "{texts:#?}"
        );
        // The metadata address: out of bounds, and outside every usable range.
        assert!(p.contains(&Problem::VipOutOfBounds {
            address: "169.254.169.254/16".into(),
            why: cidr::OutOfBounds::LinkLocal,
        }));
        assert!(p.iter().any(
            |p| matches!(p, Problem::VipOutsidePool { address, .. } if address == "169.254.169.254")
        ));
        assert!(p.contains(&Problem::VipOutOfBounds {
            address: "198.18.0.0/24".into(),
            why: cidr::OutOfBounds::NetworkAddress,
        }));
        assert_eq!(p.len(), 5, "{texts:#?}");
        assert!(texts.iter().all(|t| t.contains("spec.v")), "{texts:#?}");
    }

    #[test]
    fn member_names_longer_than_a_label_value_are_problems() {
        let long = "n".repeat(64);
        let ok = "n".repeat(63);
        let p = member_problems("c", [ok.as_str(), long.as_str(), "node-1"]);
        assert_eq!(
            p,
            vec![Problem::MemberNameTooLong {
                node: long.clone(),
                len: 64,
                cluster: "c".into(),
            }]
        );
        assert!(
            p[0].to_string().contains("spec.members.selector"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn more_members_than_the_status_can_list_are_a_problem() {
        let names: Vec<String> = (0..=MAX_MEMBERS).map(|i| format!("node-{i}")).collect();
        assert!(member_problems("c", names[..MAX_MEMBERS].iter().map(String::as_str)).is_empty());
        let p = member_problems("c", names.iter().map(String::as_str));
        assert_eq!(
            p,
            vec![Problem::TooManyMembers {
                count: MAX_MEMBERS + 1,
                cluster: "c".into()
            }]
        );
        assert!(
            p[0].to_string().contains("spec.members.selector"),
            "{}",
            p[0]
        );
    }
}
