//! Assignments: this node's role and epoch per service, derived from the
//! service leadership Lease (written only by the operator) and the cluster's
//! member list. Pure functions, so the rules are tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kubeha_crds::members::member_mode;
use kubeha_crds::service::Role;
use kubeha_crds::validate::ClaimIndex;
use kubeha_crds::{HACluster, HAService, Mode, leases, validate};

/// What the Lease asks of this node for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The role this node should hold.
    pub role: Role,
    /// The epoch (fencing token): the Lease's `leaseTransitions`.
    pub epoch: i64,
    /// For master: whether the operator has cleared this epoch for entry
    /// (the previous holder acknowledged leaving, or is certainly fenced).
    pub may_enter: bool,
}

impl Assignment {
    /// No role.
    pub const NONE: Assignment = Assignment {
        role: Role::None,
        epoch: 0,
        may_enter: false,
    };
}

/// Whether this node is a member of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A member in this mode: listed in `spec.members.nodes` (its mode
    /// there), or picked by `spec.members.selector` (mode `default`).
    Member(Mode),
    /// Not a member.
    NotMember,
    /// Not listed, and the cluster has a selector but this node's Node
    /// object has not been read yet: neither join nor leave.
    Unknown,
}

impl Membership {
    /// The mode, for a member.
    pub fn mode(self) -> Option<Mode> {
        match self {
            Membership::Member(m) => Some(m),
            _ => None,
        }
    }
}

/// Whether `node` is a member of `cluster`, by the rule the operator
/// resolves members with ([`kubeha_crds::members::member_mode`]).
/// `node_labels` are the labels of this node's Node object, `None` when it
/// is absent; `node_known` says whether the Node watch has listed yet.
pub fn membership(
    cluster: &HACluster,
    node: &str,
    node_labels: Option<&BTreeMap<String, String>>,
    node_known: bool,
) -> Membership {
    let members = &cluster.spec.members;
    match member_mode(members, node, node_labels) {
        Some(mode) => Membership::Member(mode),
        None if members.selector.is_some() && !node_known => Membership::Unknown,
        None => Membership::NotMember,
    }
}

/// The epoch of a service Lease (its `leaseTransitions`), if it has one.
pub fn lease_epoch(lease: &Lease) -> Option<i64> {
    leases::ServiceLeaseFields::read(lease).epoch
}

/// The assignment of `node` from a service Lease. A node whose mode does not
/// allow services gets no role whatever the Lease says.
pub fn assignment(node: &str, lease: Option<&Lease>, mode: Option<Mode>) -> Assignment {
    let Some(lease) = lease else {
        return Assignment::NONE;
    };
    if !mode.is_some_and(Mode::allows_services) {
        return Assignment::NONE;
    }
    let fields = leases::ServiceLeaseFields::read(lease);
    let epoch = fields.epoch.unwrap_or(0);
    if fields.holder.as_deref() == Some(node) {
        return Assignment {
            role: Role::Master,
            epoch,
            may_enter: fields.holder_may_enter(),
        };
    }
    if fields.standby.as_deref() == Some(node) {
        return Assignment {
            role: Role::Vicemaster,
            epoch,
            may_enter: true,
        };
    }
    Assignment {
        role: Role::None,
        epoch,
        may_enter: false,
    }
}

/// Why this node takes no role in a service although its Lease names it:
/// the agent re-checks what the operator checked before it wrote the
/// Lease, so a forged or stale assignment runs nothing here even if it got
/// past the operator (defence in depth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The Lease was written for another HAService (its labels name
    /// another namespace, name or UID, e.g. one deleted and created again).
    LeaseNotForService {
        /// What the Lease's labels name: `namespace/name (uid)`.
        lease_for: String,
    },
    /// The service breaks a rule of its cluster
    /// ([`kubeha_crds::validate`]: namespace not allowed, VIP outside the
    /// pool or claimed by an older service, hook source not allowed, ...).
    Invalid(Vec<validate::Problem>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::LeaseNotForService { lease_for } => write!(
                f,
                "the service Lease names {lease_for}, not this HAService: it assigns nothing here until the operator writes it for this one"
            ),
            Refusal::Invalid(problems) => {
                let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
                write!(f, "{}", problems.join("; "))
            }
        }
    }
}

/// Checks a service and its Lease before this node takes any role in it:
/// the Lease's labels name this HAService (namespace, name and UID), and
/// the service passes the operator's own validation against `cluster` and
/// the VIP `claims` of every service this agent sees. Node addresses are
/// not passed here: the VIP layer refuses an address the host already has
/// that kubeha did not add. Who wrote the Lease is the API server's to
/// enforce (only the operator's account may write service Leases in the
/// operator's namespace: the chart's RBAC and admission policy); a Lease's
/// own fields cannot prove it, field managers are chosen by the client.
pub fn vet(
    svc: &HAService,
    lease: &Lease,
    cluster: &HACluster,
    claims: &[validate::Claim],
) -> Result<(), Refusal> {
    let namespace = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let uid = svc.uid().unwrap_or_default();
    let named = leases::service_of(lease);
    let lease_uid = leases::service_uid(lease);
    if named != Some((namespace.as_str(), name.as_str())) || lease_uid != Some(uid.as_str()) {
        let (ns, n) = named.unwrap_or(("?", "?"));
        return Err(Refusal::LeaseNotForService {
            lease_for: format!("{ns}/{n} ({})", lease_uid.unwrap_or("no uid")),
        });
    }
    let key = format!("{namespace}/{name}");
    let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let problems = validate::validate(
        validate::Subject {
            namespace: &namespace,
            key: &key,
            created,
            spec: &svc.spec,
        },
        &cluster.name_any(),
        &cluster.spec,
        &[],
        claims,
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refusal::Invalid(problems))
    }
}

/// The VIP claims every claim Lease carries ([`leases::claim_of`]; the
/// agent sees every claim Lease, written by the operator only), indexed by
/// address: built again only when a claim Lease changed.
pub fn lease_claims<'a>(claim_leases: impl IntoIterator<Item = &'a Lease>) -> ClaimIndex {
    ClaimIndex::new(claim_leases.into_iter().filter_map(leases::claim_of))
}

/// The VIP claims of the `services` this agent sees (only its own node's,
/// by the node-scope label), indexed by address: one whose claim Lease is
/// not written yet still claims.
pub fn seen_claims<'a>(services: impl IntoIterator<Item = &'a HAService>) -> ClaimIndex {
    ClaimIndex::new(services.into_iter().map(|s| {
        validate::Claim::of(
            format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
            s.metadata.creation_timestamp.as_ref().map(|t| t.0),
            &s.spec,
        )
    }))
}

/// The claims for [`vet`] of `svc`: those of `leases` ([`lease_claims`])
/// and of `seen` ([`seen_claims`]) that share an address with it, so a VIP
/// claimed by an older service this node does not see is still refused. A
/// service claiming both ways claims twice, which changes nothing.
pub fn contending_claims(
    svc: &HAService,
    leases: &ClaimIndex,
    seen: &ClaimIndex,
) -> Vec<validate::Claim> {
    let mut claims = leases.sharing(&svc.spec);
    claims.extend(seen.sharing(&svc.spec));
    claims
}

/// A master assignment this node would enter at an epoch older than the
/// one it has recorded (a stale view of the Lease, e.g. a re-list served by
/// a lagging API server cache) is not cleared for entry: an agent never
/// acts on an older epoch again, which is what makes a later epoch in its
/// status entry proof that it left the older one (the operator's "moved
/// on"). A master already running keeps its role.
pub fn not_older(wanted: Assignment, held: Role, recorded_epoch: i64) -> Assignment {
    if wanted.role == Role::Master && held != Role::Master && wanted.epoch < recorded_epoch {
        return Assignment {
            may_enter: false,
            ..wanted
        };
    }
    wanted
}

/// One step of a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Remove the VIPs, then run the leave scripts with role master.
    LeaveMaster,
    /// Run the leave scripts with role vicemaster.
    LeaveVicemaster,
    /// Add the VIPs, run the enter scripts with role master, send GARP.
    EnterMaster,
    /// Run the enter scripts with role vicemaster.
    EnterVicemaster,
}

/// Whether a service this node no longer sees (out of its node-scope label
/// selection) but whose service Lease still exists keeps its record, and
/// the role it holds: always with role none (its record keeps the epochs
/// it left, so an epoch left is never entered again when the service
/// shows up again, and a fenced or unclean record still runs its recovery
/// then), and with a role while the Lease still gives this node that role
/// at that epoch (a label missing for a moment, such as a tenant's
/// `kubectl replace` without it or a lagging operator store, is not a
/// reason to leave; a Lease that moves on still is). A deleted service's
/// Lease goes with it, and then everything it held is left.
pub fn kept_out_of_view(held: Role, held_epoch: i64, wanted: Assignment) -> bool {
    held == Role::None || (wanted.role == held && wanted.epoch == held_epoch)
}

/// The steps from the role held to the role wanted: always leave the old
/// role before entering the new one. A master assignment not yet cleared for
/// entry, or whose epoch already failed here, is not entered (the old role
/// is still left).
pub fn steps_between(held: Role, wanted: Assignment, failed_epoch: Option<i64>) -> Vec<Step> {
    let target = match wanted.role {
        Role::Master if !wanted.may_enter || failed_epoch == Some(wanted.epoch) => Role::None,
        r => r,
    };
    if held == target {
        return Vec::new();
    }
    let mut steps = Vec::new();
    match held {
        Role::Master => steps.push(Step::LeaveMaster),
        Role::Vicemaster => steps.push(Step::LeaveVicemaster),
        Role::None => {}
    }
    match target {
        Role::Master => steps.push(Step::EnterMaster),
        Role::Vicemaster => steps.push(Step::EnterVicemaster),
        Role::None => {}
    }
    steps
}

#[cfg(test)]
mod tests;
