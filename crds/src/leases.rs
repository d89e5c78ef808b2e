//! Names, labels and annotations of the Lease objects operator and agents
//! share: one heartbeat Lease per (HACluster, member node), and per
//! HAService one leadership Lease and one VIP claim Lease, all in the
//! operator's namespace, where tenants cannot write (the operator writes
//! service and claim Leases, each agent only its own heartbeat: the chart's
//! RBAC and admission policy).
//!
//! A service Lease carries the node-scope label
//! ([`crate::annotations::node_scope_label`]) of every node it names
//! ([`named_nodes`]), and each agent watches only the service Leases
//! labelled for it ([`service_lease_selector_for`]): a failover's Lease
//! writes reach the nodes involved, not every node (issue 11). The claim
//! Leases, written only when a service is created or its VIPs change, are
//! what every agent watches to re-check an assignment's VIPs against every
//! older service's ([`claim_of`]).
//!
//! Names are built so that two different inputs never give one name:
//! cluster and namespace names are DNS labels (no `.`), so the first `.`
//! after the prefix always separates them from the node or service name.

/// Label on every kubeha Lease saying which kind it is.
pub const LEASE_KIND_LABEL: &str = "kubeha.io/lease";
/// [`LEASE_KIND_LABEL`] value of a node heartbeat Lease.
pub const HEARTBEAT: &str = "heartbeat";
/// [`LEASE_KIND_LABEL`] value of a service leadership Lease.
pub const SERVICE: &str = "service";
/// [`LEASE_KIND_LABEL`] value of a service's VIP claim Lease.
pub const CLAIM: &str = "claim";
/// Label: the HACluster a Lease belongs to.
pub const CLUSTER_LABEL: &str = "kubeha.io/cluster";
/// Label: the node a heartbeat Lease belongs to.
pub const NODE_LABEL: &str = "kubeha.io/node";
/// Label: the name of the HAService a service Lease belongs to.
pub const SERVICE_LABEL: &str = "kubeha.io/service";
/// Label: the namespace of the HAService a service Lease belongs to.
pub const SERVICE_NAMESPACE_LABEL: &str = "kubeha.io/service-namespace";
/// Label: the UID of the HAService a service Lease was written for. An
/// agent enters only when it equals the UID of the HAService it reads: a
/// Lease left from an earlier service of the same name, or written for
/// another one, assigns nothing.
pub const SERVICE_UID_LABEL: &str = "kubeha.io/service-uid";

/// Annotation on a service Lease: the node in the vicemaster role.
pub const STANDBY_ANNOTATION: &str = "kubeha.io/standby";
/// Annotation on a service Lease: the epoch the holder may enter. The
/// operator sets it equal to `leaseTransitions` once the previous holder
/// acknowledged leaving the previous epoch, or was certainly fenced; until
/// then the new holder waits.
pub const ENTER_EPOCH_ANNOTATION: &str = "kubeha.io/enter-epoch";
/// Annotation on a service Lease: the node that was cleared to enter at the
/// epoch in [`ENTER_EPOCH_ANNOTATION`] (the operator's record: the holder
/// may have changed since). While it names a node that is no longer the
/// holder, the operator waits for that node's proof that it runs nothing,
/// so that node's agent reports its entry even if it never ran the service.
pub const CLEARED_NODE_ANNOTATION: &str = "kubeha.io/cleared-node";

/// Annotation of a heartbeat Lease: E = D + clock-skew allowance, in
/// milliseconds, of the timing the agent renewed under. The agent holds
/// nothing for longer than E after a renew it sent, whatever timing it
/// learns later; observers judge this renew by it (never by a lower E the
/// cluster spec says now).
pub const EXPIRY_MS_ANNOTATION: &str = "kubeha.io/expiry-ms";

/// Annotation of a heartbeat Lease: the agent's own mode when it is
/// `single` or `config` (absent otherwise). In those modes HA monitoring is
/// off (StorNext): an agent whose last successful renew carried this
/// annotation does not fence itself when it loses the API server, it keeps
/// its roles and VIPs as under `noQuorumPolicy: Freeze`. So observers never
/// count such a node's Lost heartbeat as a fence: only `peerdown` (or the
/// node's own acknowledgement) lets another node in. The annotation is
/// what the node knew when it renewed, which an admin's later mode change
/// cannot alter while the node is cut off.
pub const EXCLUSIVE_MODE_ANNOTATION: &str = "kubeha.io/exclusive-mode";

/// Annotation of a service Lease: the `renewTime` of the holder's
/// heartbeat Lease as the operator had seen it when it wrote the Lease. An
/// agent back from a fence enters only on a Lease written after the
/// operator saw it renew again (this value at least the `renewTime` of its
/// first renew after the fence): a clearance from before the fence may
/// have been given away meanwhile by a write its stale watch has not shown.
pub const HOLDER_RENEW_ANNOTATION: &str = "kubeha.io/holder-renew-time";

/// Annotation of a claim Lease: the service's VIP addresses, comma
/// separated, as the operator read them from its spec. With
/// [`SERVICE_CREATED_ANNOTATION`] it is the service's VIP claim
/// ([`claim_of`]): agents check an assignment against the claims of every
/// claim Lease, since they watch only the HAServices of their own node.
pub const VIPS_ANNOTATION: &str = "kubeha.io/vips";

/// Annotation of a claim Lease: the HAService's `creationTimestamp` (the
/// older claim of a VIP wins).
pub const SERVICE_CREATED_ANNOTATION: &str = "kubeha.io/service-created";

/// The annotations carrying `claim` on a claim Lease
/// ([`VIPS_ANNOTATION`], and [`SERVICE_CREATED_ANNOTATION`] when the
/// creation time is known).
pub fn claim_annotations(claim: &crate::validate::Claim) -> Vec<(String, String)> {
    let vips: Vec<String> = claim.addresses.iter().map(ToString::to_string).collect();
    let mut annotations = vec![(VIPS_ANNOTATION.to_owned(), vips.join(","))];
    if let Some(created) = claim.created {
        annotations.push((SERVICE_CREATED_ANNOTATION.to_owned(), created.to_string()));
    }
    annotations
}

/// The VIP claim a claim Lease carries: keyed `namespace/name` by its
/// labels, its addresses and creation time from [`claim_annotations`].
/// `None` for a Lease without the labels or the VIPs annotation;
/// addresses that do not parse are skipped.
pub fn claim_of(
    lease: &k8s_openapi::api::coordination::v1::Lease,
) -> Option<crate::validate::Claim> {
    let (namespace, name) = service_of(lease)?;
    let annotations = lease.metadata.annotations.as_ref()?;
    let vips = annotations.get(VIPS_ANNOTATION)?;
    Some(crate::validate::Claim {
        key: format!("{namespace}/{name}"),
        created: annotations
            .get(SERVICE_CREATED_ANNOTATION)
            .and_then(|t| t.parse().ok()),
        addresses: vips
            .split(',')
            .filter_map(|a| a.trim().parse().ok())
            .collect(),
    })
}

/// The value of [`HOLDER_RENEW_ANNOTATION`], if the Lease has a valid one.
pub fn holder_renew_time(
    lease: &k8s_openapi::api::coordination::v1::Lease,
) -> Option<k8s_openapi::jiff::Timestamp> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(HOLDER_RENEW_ANNOTATION)?
        .parse()
        .ok()
}

/// Whether a Lease whose [`HOLDER_RENEW_ANNOTATION`] says `seen` was
/// written before the operator saw the renew made at `renewed`. Compared
/// at the microsecond, the precision of a Lease's `renewTime`: the renew's
/// own clock reading has nanoseconds the API server never stored.
pub fn seen_before(
    seen: k8s_openapi::jiff::Timestamp,
    renewed: k8s_openapi::jiff::Timestamp,
) -> bool {
    seen.as_microsecond() < renewed.as_microsecond()
}

/// The value of [`EXPIRY_MS_ANNOTATION`], if the Lease has a valid one.
pub fn heartbeat_expiry(
    lease: &k8s_openapi::api::coordination::v1::Lease,
) -> Option<std::time::Duration> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(EXPIRY_MS_ANNOTATION)?
        .trim()
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_millis)
}

/// Whether a heartbeat Lease says its node renewed in mode `single` or
/// `config` ([`EXCLUSIVE_MODE_ANNOTATION`], any value).
pub fn heartbeat_exclusive(lease: &k8s_openapi::api::coordination::v1::Lease) -> bool {
    lease
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(EXCLUSIVE_MODE_ANNOTATION))
}

/// Name of the heartbeat Lease of `node` in `cluster` (in the operator's
/// namespace): `kubeha-hb-<cluster>.<node>`. The cluster name has no `.`
/// (the HACluster CRD requires a DNS label), so `a-b`/`c` and `a`/`b-c`
/// get different names.
pub fn heartbeat_lease_name(cluster: &str, node: &str) -> String {
    format!("kubeha-hb-{cluster}.{node}")
}

/// Name of the leadership Lease of the HAService `namespace/service` (in
/// the operator's namespace): `kubeha-svc-<namespace>.<service>`; a
/// namespace name has no `.`, so no two services share a name.
pub fn service_lease_name(namespace: &str, service: &str) -> String {
    format!("kubeha-svc-{namespace}.{service}")
}

/// Name of the VIP claim Lease of the HAService `namespace/service` (in
/// the operator's namespace): `kubeha-claim-<namespace>.<service>`.
pub fn claim_lease_name(namespace: &str, service: &str) -> String {
    format!("kubeha-claim-{namespace}.{service}")
}

/// The (cluster, node) of a heartbeat Lease: its labels, when its name is
/// the one [`heartbeat_lease_name`] gives them. Any other Lease, a
/// labelled copy under another name included, is nobody's heartbeat.
pub fn heartbeat_of(lease: &k8s_openapi::api::coordination::v1::Lease) -> Option<(&str, &str)> {
    let labels = lease.metadata.labels.as_ref()?;
    let cluster = labels.get(CLUSTER_LABEL)?;
    let node = labels.get(NODE_LABEL)?;
    (labels.get(LEASE_KIND_LABEL).map(String::as_str) == Some(HEARTBEAT)
        && lease.metadata.name.as_deref() == Some(heartbeat_lease_name(cluster, node).as_str()))
    .then_some((cluster.as_str(), node.as_str()))
}

/// The HAService (`namespace`, `name`) a service Lease's labels name.
pub fn service_of(lease: &k8s_openapi::api::coordination::v1::Lease) -> Option<(&str, &str)> {
    let labels = lease.metadata.labels.as_ref()?;
    Some((
        labels.get(SERVICE_NAMESPACE_LABEL)?.as_str(),
        labels.get(SERVICE_LABEL)?.as_str(),
    ))
}

/// The HAService UID a service Lease was written for ([`SERVICE_UID_LABEL`]).
pub fn service_uid(lease: &k8s_openapi::api::coordination::v1::Lease) -> Option<&str> {
    lease
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_UID_LABEL)
        .map(String::as_str)
}

/// Label selector for every service Lease.
pub fn service_lease_selector() -> String {
    format!("{LEASE_KIND_LABEL}={SERVICE}")
}

/// Label selector of the service Leases `node`'s agent watches: those
/// labelled for it (its node-scope label, set for every node the Lease
/// names).
pub fn service_lease_selector_for(node: &str) -> String {
    format!(
        "{},{}",
        service_lease_selector(),
        crate::annotations::node_scope_selector(node)
    )
}

/// Label selector of every VIP claim Lease.
pub fn claim_lease_selector() -> String {
    format!("{LEASE_KIND_LABEL}={CLAIM}")
}

/// Label selector of every service and claim Lease (the operator's watch).
pub fn service_and_claim_lease_selector() -> String {
    format!("{LEASE_KIND_LABEL} in ({SERVICE},{CLAIM})")
}

/// Whether a Lease is a claim Lease (by its kind label).
pub fn is_claim(lease: &k8s_openapi::api::coordination::v1::Lease) -> bool {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LEASE_KIND_LABEL))
        .is_some_and(|k| k == CLAIM)
}

/// The node-scope labels `lease` should carry: one per node it names
/// ([`named_nodes`]).
pub fn wanted_scope_labels(
    lease: &k8s_openapi::api::coordination::v1::Lease,
) -> std::collections::BTreeSet<String> {
    named_nodes(lease)
        .iter()
        .map(|n| crate::annotations::node_scope_label(n))
        .collect()
}

/// The node-scope labels an object (a service Lease, an HAService)
/// carries now.
pub fn scope_labels_of(object: &impl kube::ResourceExt) -> std::collections::BTreeSet<String> {
    object
        .labels()
        .keys()
        .filter(|k| k.starts_with(crate::annotations::NODE_SCOPE_LABEL_PREFIX))
        .cloned()
        .collect()
}

/// Gives `lease` exactly the node-scope labels of the nodes it names
/// ([`wanted_scope_labels`]) and the label keys in `also` (of the nodes the
/// operator waits on or still shows it to): adds the missing ones, removes
/// the others.
pub fn set_scope_labels(
    lease: &mut k8s_openapi::api::coordination::v1::Lease,
    also: impl IntoIterator<Item = String>,
) {
    let mut wanted = wanted_scope_labels(lease);
    wanted.extend(also);
    let labels = lease.metadata.labels.get_or_insert_with(Default::default);
    labels.retain(|k, _| {
        !k.starts_with(crate::annotations::NODE_SCOPE_LABEL_PREFIX) || wanted.contains(k)
    });
    for key in wanted {
        labels.insert(key, crate::annotations::NODE_SCOPE_LABEL_VALUE.to_owned());
    }
}

/// Label selector of every heartbeat Lease.
pub fn heartbeat_lease_selector() -> String {
    format!("{LEASE_KIND_LABEL}={HEARTBEAT}")
}

/// Server-side-apply field manager of the agent on `node`: one per node, so
/// each agent owns exactly its own entry of `status.nodes`.
pub fn agent_field_manager(node: &str) -> String {
    format!("kubeha-agent-{node}")
}

/// What a service Lease says, read the one way operator and agent both read
/// it: an empty holder or standby is nobody, a negative `leaseTransitions`
/// is 0, and the enter-epoch annotation is a decimal number with any
/// surrounding whitespace ignored (anything else is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceLeaseFields {
    /// `spec.holderIdentity`: the master.
    pub holder: Option<String>,
    /// `spec.leaseTransitions`: the epoch, when the Lease has one.
    pub epoch: Option<i64>,
    /// [`STANDBY_ANNOTATION`]: the vicemaster.
    pub standby: Option<String>,
    /// [`ENTER_EPOCH_ANNOTATION`]: the last epoch a holder was cleared to enter.
    pub enter_epoch: Option<i64>,
}

impl ServiceLeaseFields {
    /// Reads a service Lease; missing or malformed fields read as absent.
    pub fn read(lease: &k8s_openapi::api::coordination::v1::Lease) -> Self {
        let spec = lease.spec.as_ref();
        let annotation = |key: &str| lease.metadata.annotations.as_ref().and_then(|a| a.get(key));
        let non_empty = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
        Self {
            holder: non_empty(spec.and_then(|s| s.holder_identity.as_ref())),
            epoch: spec
                .and_then(|s| s.lease_transitions)
                .map(|e| i64::from(e).max(0)),
            standby: non_empty(annotation(STANDBY_ANNOTATION)),
            enter_epoch: annotation(ENTER_EPOCH_ANNOTATION).and_then(|v| parse_epoch(v)),
        }
    }

    /// Whether the holder is cleared to enter the Lease's epoch (0 when
    /// the Lease has none).
    pub fn holder_may_enter(&self) -> bool {
        self.holder.is_some() && self.enter_epoch == Some(self.epoch.unwrap_or(0))
    }
}

/// The nodes a service Lease names: its holder, its standby and the node
/// last cleared to enter ([`CLEARED_NODE_ANNOTATION`], whose proof the
/// operator waits for). The nodes whose agents act on this Lease.
pub fn named_nodes(lease: &k8s_openapi::api::coordination::v1::Lease) -> Vec<String> {
    let fields = ServiceLeaseFields::read(lease);
    let cleared = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CLEARED_NODE_ANNOTATION))
        .filter(|n| !n.is_empty())
        .cloned();
    fields
        .holder
        .into_iter()
        .chain(fields.standby)
        .chain(cleared)
        .collect()
}

/// An epoch as written in an annotation: a non-negative decimal number,
/// surrounding whitespace ignored.
pub fn parse_epoch(value: &str) -> Option<i64> {
    value.trim().parse::<i64>().ok().filter(|e| *e >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::Lease;

    use crate::testing::lease;

    #[test]
    fn a_lease_names_its_holder_standby_and_cleared_node() {
        let l = lease(
            "n1",
            Some(3),
            &[(STANDBY_ANNOTATION, "n2"), (CLEARED_NODE_ANNOTATION, "n3")],
        );
        assert_eq!(named_nodes(&l), ["n1", "n2", "n3"]);
        // Empty values name nobody.
        let l = lease("", Some(3), &[(CLEARED_NODE_ANNOTATION, "")]);
        assert!(named_nodes(&l).is_empty());
    }

    /// A Lease is labelled for exactly the nodes it names: a node it no
    /// longer names loses its label (its agent's scoped watch then sees
    /// the Lease leave, which reads as "no role"), foreign labels stay.
    #[test]
    fn a_lease_is_labelled_for_exactly_the_nodes_it_names() {
        let mut l = lease("n1", Some(3), &[(STANDBY_ANNOTATION, "n2")]);
        l.metadata.labels = Some(crate::testing::labels(&[
            ("node.kubeha.io/n9", "true"),
            ("node.kubeha.io/n1", "false"),
            ("team", "web"),
        ]));
        set_scope_labels(&mut l, []);
        let labels = l.metadata.labels.as_ref().unwrap();
        assert_eq!(
            scope_labels_of(&l).into_iter().collect::<Vec<_>>(),
            ["node.kubeha.io/n1", "node.kubeha.io/n2"]
        );
        assert_eq!(labels["node.kubeha.io/n1"], "true");
        assert_eq!(labels["team"], "web");
        assert_eq!(scope_labels_of(&l), wanted_scope_labels(&l));
        // And the nodes the operator waits on, named or not.
        set_scope_labels(&mut l, [crate::annotations::node_scope_label("n5")]);
        assert_eq!(
            scope_labels_of(&l).into_iter().collect::<Vec<_>>(),
            [
                "node.kubeha.io/n1",
                "node.kubeha.io/n2",
                "node.kubeha.io/n5"
            ]
        );
        assert_eq!(
            service_lease_selector_for("n1"),
            "kubeha.io/lease=service,node.kubeha.io/n1"
        );
    }

    /// Names that used to collide (`kubeha-hb-a-b-c` twice) no longer do,
    /// and a service's Lease name tells its namespace from its name.
    #[test]
    fn lease_names_never_collide() {
        assert_ne!(
            heartbeat_lease_name("a-b", "c"),
            heartbeat_lease_name("a", "b-c")
        );
        assert_eq!(
            heartbeat_lease_name("web", "node-1"),
            "kubeha-hb-web.node-1"
        );
        assert_ne!(
            service_lease_name("a-b", "c"),
            service_lease_name("a", "b-c")
        );
        assert_eq!(service_lease_name("shop", "web"), "kubeha-svc-shop.web");
    }

    /// Chaos-found: an agent back from a fence remembered its first renew
    /// with nanoseconds, the Lease (and so the operator's annotation) keeps
    /// microseconds, and every first clearance after a return was refused.
    #[test]
    fn a_renew_read_back_from_its_lease_is_not_seen_before_itself() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let renewed: k8s_openapi::jiff::Timestamp =
            "2026-11-30T01:03:44.118753339Z".parse().unwrap();
        // Written by the agent, read by the operator, annotated by it.
        let wire = serde_json::to_value(MicroTime(renewed)).unwrap();
        let read: MicroTime = serde_json::from_value(wire).unwrap();
        let annotated = lease(
            "n1",
            Some(3),
            &[(HOLDER_RENEW_ANNOTATION, &read.0.to_string())],
        );
        let seen = holder_renew_time(&annotated).unwrap();
        assert!(!seen_before(seen, renewed), "{seen} vs {renewed}");
        let earlier: k8s_openapi::jiff::Timestamp =
            "2026-11-30T01:03:44.118752999Z".parse().unwrap();
        assert!(seen_before(earlier, renewed));
    }

    /// A claim written on a Lease reads back as the same claim, keyed by
    /// the Lease's service labels; a Lease without it claims nothing.
    #[test]
    fn a_claim_round_trips_through_a_lease() {
        let claim = crate::validate::Claim {
            key: "shop/web".into(),
            created: Some("2026-12-07T09:00:00Z".parse().unwrap()),
            addresses: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        };
        let mut l = lease("n1", Some(1), &[]);
        assert!(claim_of(&l).is_none(), "no labels");
        l.metadata.labels = Some(
            [(SERVICE_NAMESPACE_LABEL, "shop"), (SERVICE_LABEL, "web")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        assert!(claim_of(&l).is_none(), "no VIPs annotation");
        l.metadata.annotations = Some(claim_annotations(&claim).into_iter().collect());
        let read = claim_of(&l).unwrap();
        assert_eq!(
            (read.key, read.created, read.addresses),
            (claim.key, claim.created, claim.addresses)
        );
    }

    #[test]
    fn one_reading_of_a_service_lease() {
        let cases: &[(&str, Lease, ServiceLeaseFields)] = &[
            (
                "cleared",
                lease(
                    "n1",
                    Some(4),
                    &[(ENTER_EPOCH_ANNOTATION, "4"), (STANDBY_ANNOTATION, "n2")],
                ),
                ServiceLeaseFields {
                    holder: Some("n1".into()),
                    epoch: Some(4),
                    standby: Some("n2".into()),
                    enter_epoch: Some(4),
                },
            ),
            (
                "whitespace around the enter epoch",
                lease("n1", Some(4), &[(ENTER_EPOCH_ANNOTATION, " 4\n")]),
                ServiceLeaseFields {
                    holder: Some("n1".into()),
                    epoch: Some(4),
                    enter_epoch: Some(4),
                    ..Default::default()
                },
            ),
            (
                "malformed or negative enter epoch, empty standby",
                lease(
                    "n1",
                    Some(4),
                    &[(ENTER_EPOCH_ANNOTATION, "4x"), (STANDBY_ANNOTATION, "")],
                ),
                ServiceLeaseFields {
                    holder: Some("n1".into()),
                    epoch: Some(4),
                    ..Default::default()
                },
            ),
            (
                "empty holder, negative transitions",
                lease("", Some(-3), &[(ENTER_EPOCH_ANNOTATION, "-3")]),
                ServiceLeaseFields {
                    epoch: Some(0),
                    ..Default::default()
                },
            ),
            (
                "no transitions",
                lease("n1", None, &[(ENTER_EPOCH_ANNOTATION, "0")]),
                ServiceLeaseFields {
                    holder: Some("n1".into()),
                    enter_epoch: Some(0),
                    ..Default::default()
                },
            ),
        ];
        for (what, lease, want) in cases {
            assert_eq!(&ServiceLeaseFields::read(lease), want, "{what}");
        }
        assert!(ServiceLeaseFields::read(&cases[1].1).holder_may_enter());
        assert!(!ServiceLeaseFields::read(&cases[2].1).holder_may_enter());
        assert!(
            ServiceLeaseFields::read(&cases[4].1).holder_may_enter(),
            "no transitions is epoch 0"
        );
    }
}
