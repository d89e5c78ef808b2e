use super::*;
use kubeha_crds::testing::{labels, members};

fn cluster(listed: &[(&str, Mode)], selector: Option<&[(&str, &str)]>) -> HACluster {
    kubeha_crds::testing::cluster("c", members(listed, selector))
}
use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn lease(holder: &str, epoch: i32, cleared: Option<i32>, standby: Option<&str>) -> Lease {
    let mut annotations = std::collections::BTreeMap::new();
    if let Some(e) = cleared {
        annotations.insert(leases::ENTER_EPOCH_ANNOTATION.to_owned(), e.to_string());
    }
    if let Some(s) = standby {
        annotations.insert(leases::STANDBY_ANNOTATION.to_owned(), s.to_owned());
    }
    Lease {
        metadata: ObjectMeta {
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_transitions: Some(epoch),
            ..Default::default()
        }),
    }
}

const D: Option<Mode> = Some(Mode::Default);

#[test]
fn listed_members_have_their_mode_whatever_the_labels() {
    let c = cluster(
        &[("node-1", Mode::Locked), ("node-2", Mode::Default)],
        Some(&[("ha", "yes")]),
    );
    let no = labels(&[("ha", "no")]);
    for (labels, known) in [(None, false), (None, true), (Some(&no), true)] {
        assert_eq!(
            membership(&c, "node-1", labels, known),
            Membership::Member(Mode::Locked)
        );
    }
    assert_eq!(
        membership(&c, "node-2", None, false).mode(),
        Some(Mode::Default)
    );
}

#[test]
fn selected_members_are_default_members() {
    let c = cluster(&[("node-1", Mode::Locked)], Some(&[("ha", "yes")]));
    let yes = labels(&[("ha", "yes"), ("zone", "a")]);
    let no = labels(&[("zone", "a")]);
    assert_eq!(
        membership(&c, "node-3", Some(&yes), true),
        Membership::Member(Mode::Default)
    );
    assert_eq!(
        membership(&c, "node-3", Some(&no), true),
        Membership::NotMember
    );
    // Node object gone (listed before): not a member.
    assert_eq!(membership(&c, "node-3", None, true), Membership::NotMember);
    // Node watch not listed yet: undecided, neither join nor leave.
    assert_eq!(membership(&c, "node-3", None, false), Membership::Unknown);
    assert_eq!(membership(&c, "node-3", None, false).mode(), None);
    // A selector-only cluster.
    let only = cluster(&[], Some(&[("ha", "yes")]));
    assert_eq!(
        membership(&only, "node-3", Some(&yes), true),
        Membership::Member(Mode::Default)
    );
}

#[test]
fn without_a_selector_only_listed_nodes_are_members() {
    let c = cluster(&[("node-1", Mode::Default)], None);
    let any = labels(&[("ha", "yes")]);
    assert_eq!(
        membership(&c, "node-3", Some(&any), true),
        Membership::NotMember
    );
    // Nothing to wait for: no selector.
    assert_eq!(membership(&c, "node-3", None, false), Membership::NotMember);
}

#[test]
fn selected_members_get_roles_from_the_lease() {
    let c = cluster(&[], Some(&[("ha", "yes")]));
    let yes = labels(&[("ha", "yes")]);
    let mode = membership(&c, "node-3", Some(&yes), true).mode();
    let l = lease("node-3", 2, Some(2), None);
    assert_eq!(
        assignment("node-3", Some(&l), mode),
        Assignment {
            role: Role::Master,
            epoch: 2,
            may_enter: true
        }
    );
}

#[test]
fn an_older_epoch_is_never_entered_again() {
    let m = |epoch| Assignment {
        role: Role::Master,
        epoch,
        may_enter: true,
    };
    // Recorded 5 (entered or observed): a stale Lease at 4 is not entered.
    let stale = not_older(m(4), Role::None, 5);
    assert!(!stale.may_enter);
    assert_eq!(steps_between(Role::None, stale, None), vec![]);
    assert_eq!(
        steps_between(Role::Vicemaster, not_older(m(4), Role::Vicemaster, 5), None),
        vec![Step::LeaveVicemaster]
    );
    // The recorded epoch itself, or a later one, is.
    assert_eq!(not_older(m(5), Role::None, 5), m(5));
    assert_eq!(not_older(m(6), Role::None, 5), m(6));
    // A running master is not made to leave by a stale view.
    assert_eq!(
        steps_between(Role::Master, not_older(m(4), Role::Master, 5), None),
        vec![]
    );
    // Other roles pass through.
    let vice = Assignment {
        role: Role::Vicemaster,
        epoch: 4,
        may_enter: true,
    };
    assert_eq!(not_older(vice, Role::None, 5), vice);
}

#[test]
fn lease_epoch_is_lease_transitions() {
    assert_eq!(lease_epoch(&lease("a", 7, None, None)), Some(7));
    assert_eq!(lease_epoch(&Lease::default()), None);
}

#[test]
fn holder_is_master_once_cleared() {
    let l = lease("node-1", 4, Some(4), Some("node-2"));
    assert_eq!(
        assignment("node-1", Some(&l), D),
        Assignment {
            role: Role::Master,
            epoch: 4,
            may_enter: true
        }
    );
    assert_eq!(assignment("node-2", Some(&l), D).role, Role::Vicemaster);
    assert_eq!(
        assignment("node-3", Some(&l), D),
        Assignment {
            role: Role::None,
            epoch: 4,
            may_enter: false
        }
    );
}

#[test]
fn holder_waits_for_clearance_of_its_own_epoch() {
    let waiting = lease("node-2", 5, Some(4), None);
    let a = assignment("node-2", Some(&waiting), D);
    assert_eq!((a.role, a.may_enter), (Role::Master, false));
    assert_eq!(steps_between(Role::None, a, None), vec![]);
}

#[test]
fn modes_without_services_get_nothing() {
    let l = lease("node-1", 1, Some(1), None);
    for mode in [None, Some(Mode::Locked), Some(Mode::Peerdown)] {
        assert_eq!(
            assignment("node-1", Some(&l), mode),
            Assignment::NONE,
            "{mode:?}"
        );
    }
    assert_eq!(
        assignment("node-1", Some(&l), Some(Mode::Single)).role,
        Role::Master
    );
    assert_eq!(assignment("node-1", None, D), Assignment::NONE);
}

#[test]
fn leave_before_enter() {
    let master = Assignment {
        role: Role::Master,
        epoch: 2,
        may_enter: true,
    };
    let vice = Assignment {
        role: Role::Vicemaster,
        epoch: 2,
        may_enter: true,
    };
    assert_eq!(
        steps_between(Role::Vicemaster, master, None),
        vec![Step::LeaveVicemaster, Step::EnterMaster]
    );
    assert_eq!(
        steps_between(Role::Master, vice, None),
        vec![Step::LeaveMaster, Step::EnterVicemaster]
    );
    assert_eq!(
        steps_between(Role::Master, Assignment::NONE, None),
        vec![Step::LeaveMaster]
    );
    assert_eq!(
        steps_between(Role::None, master, None),
        vec![Step::EnterMaster]
    );
    assert_eq!(steps_between(Role::Master, master, None), vec![]);
}

#[test]
fn a_failed_epoch_is_not_retried_but_a_new_one_is() {
    let master = Assignment {
        role: Role::Master,
        epoch: 2,
        may_enter: true,
    };
    assert_eq!(steps_between(Role::None, master, Some(2)), vec![]);
    assert_eq!(
        steps_between(Role::None, Assignment { epoch: 3, ..master }, Some(2)),
        vec![Step::EnterMaster]
    );
}

/// The agent sees only its own node's HAServices and service Leases: a
/// VIP an older service it does not see claims on its claim Lease is still
/// refused, and the service's own claim is no contender.
#[test]
fn a_vip_claimed_on_an_older_service_s_claim_lease_is_refused() {
    let c = cluster(&[("node-1", Mode::Default)], None);
    let at = |t: &str| {
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            t.parse().unwrap(),
        ))
    };
    let service_lease_for = |svc: &HAService| {
        let mut l = lease("node-1", 1, Some(1), None);
        l.metadata.labels = Some(
            [
                (leases::SERVICE_NAMESPACE_LABEL, "shop"),
                (leases::SERVICE_LABEL, svc.name_any().as_str()),
                (leases::SERVICE_UID_LABEL, "uid-1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        );
        l
    };
    let claim_lease_for = |svc: &HAService| {
        let mut l = service_lease_for(svc);
        l.spec = None;
        l.metadata.annotations = None;
        l.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(leases::LEASE_KIND_LABEL.into(), leases::CLAIM.into());
        let claim = validate::Claim::of(
            String::new(),
            svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
            &svc.spec,
        );
        l.metadata.annotations = Some(leases::claim_annotations(&claim).into_iter().collect());
        l
    };
    let service = |name: &str, created: &str| {
        let mut s = HAService::new(
            name,
            kubeha_crds::testing::service_spec("c", &["198.18.0.10/24"]),
        );
        s.metadata.namespace = Some("shop".into());
        s.metadata.uid = Some("uid-1".into());
        s.metadata.creation_timestamp = at(created);
        s
    };
    let older = service("old", "2026-12-01T00:00:00Z");
    let newer = service("new", "2026-12-02T00:00:00Z");
    let newer_lease = service_lease_for(&newer);
    let (older_claim, newer_claim) = (claim_lease_for(&older), claim_lease_for(&newer));
    // This node sees only `newer` (and its Lease), and every claim Lease.
    let claims = contending_claims(
        &newer,
        &lease_claims([&older_claim, &newer_claim]),
        &seen_claims([&newer]),
    );
    match vet(&newer, &newer_lease, &c, &claims) {
        Err(Refusal::Invalid(problems)) => assert_eq!(
            problems,
            vec![validate::Problem::VipClaimed {
                address: "198.18.0.10".into(),
                by: "shop/old".into(),
            }]
        ),
        other => panic!("expected the older Lease's claim to win: {other:?}"),
    }
    // Without the older service's claim, nothing contends.
    let claims = contending_claims(
        &newer,
        &lease_claims([&newer_claim]),
        &seen_claims([&newer]),
    );
    assert_eq!(vet(&newer, &newer_lease, &c, &claims), Ok(()));
}

#[test]
fn a_service_out_of_view_keeps_its_record_and_the_role_its_lease_still_gives() {
    let ms = Some(Mode::Default);
    let l = lease("node-1", 4, Some(4), Some("node-2"));
    // Role none: the record stays (its epochs) whatever the Lease says.
    assert!(kept_out_of_view(
        Role::None,
        3,
        assignment("node-3", Some(&l), ms)
    ));
    // The holder and the standby named at that epoch keep their roles.
    assert!(kept_out_of_view(
        Role::Master,
        4,
        assignment("node-1", Some(&l), ms)
    ));
    assert!(kept_out_of_view(
        Role::Vicemaster,
        4,
        assignment("node-2", Some(&l), ms)
    ));
    // A Lease that moved on (another epoch, another role) is left.
    assert!(!kept_out_of_view(
        Role::Master,
        3,
        assignment("node-1", Some(&l), ms)
    ));
    assert!(!kept_out_of_view(
        Role::Master,
        4,
        assignment("node-2", Some(&l), ms)
    ));
    // A mode without services, or no Lease at all: left.
    assert!(!kept_out_of_view(
        Role::Master,
        4,
        assignment("node-1", Some(&l), Some(Mode::Locked))
    ));
    assert!(!kept_out_of_view(
        Role::Master,
        4,
        assignment("node-1", None, ms)
    ));
}
