//! The operator writes exactly what the agent reads: service Leases built
//! by the operator (from [`handover`] decisions) are read back with the
//! agent's own `assignments` functions, and heartbeat Leases built by the
//! agent are routed and fingerprinted by the operator's rules.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use kubeha_agent::assignments::{self, Assignment, Step};
use kubeha_agent::heartbeat::{self, Timing as AgentTiming};
use kubeha_crds::cluster::HeartbeatTiming;
use kubeha_crds::service::{NodeServiceState, Role};
use kubeha_crds::{HAService, Mode, leases};
use kubeha_operator::context::FIELD_MANAGER;
use kubeha_operator::handover::{self, Input, NodeFacts, Progress};
use kubeha_operator::heartbeat_view::Fingerprint;
use kubeha_operator::service_controller::service_lease;

const NS: &str = "apps";
/// The operator's namespace, where it writes the service Leases.
const OPERATOR_NS: &str = "kubeha-system";

fn service() -> HAService {
    let mut svc: HAService = serde_json::from_value(serde_json::json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "metadata": { "name": "web", "namespace": NS, "uid": "uid-web" },
        "spec": { "clusterRef": "c1", "vips": [{ "address": "198.18.0.100/24" }] },
    }))
    .unwrap();
    svc.metadata.generation = Some(1);
    svc
}

/// One operator decision written as the operator writes it.
fn decide(
    current: Option<&Lease>,
    master: Option<&str>,
    standby: Option<&str>,
    facts: &BTreeMap<String, NodeFacts>,
) -> (Lease, Progress) {
    let state = current.map(handover::LeaseState::from_lease);
    let h = handover::handover(Input {
        current: state.as_ref(),
        master,
        standby,
        facts,
    });
    assert!(h.write, "the decision changes the Lease");
    let lease = service_lease(
        current,
        OPERATOR_NS,
        &service(),
        &h.lease,
        h.holder_changed,
        h.progress.waiting_on(),
        jiff::Timestamp::UNIX_EPOCH,
    );
    (lease, h.progress)
}

/// What the agent on `node` makes of the Lease.
fn agent(node: &str, lease: &Lease) -> Assignment {
    assignments::assignment(node, Some(lease), Some(Mode::Default))
}

fn entry(
    node: &str,
    role: Role,
    state: NodeServiceState,
    epoch: i64,
    acked: Option<i64>,
) -> NodeFacts {
    NodeFacts {
        entry: Some(kubeha_crds::testing::status_entry(
            node, role, state, epoch, acked,
        )),
        ..Default::default()
    }
}

#[test]
fn the_agent_finds_the_service_lease_where_the_operator_writes_it() {
    let (lease, _) = decide(None, Some("a"), Some("b"), &BTreeMap::new());
    // The agent on each node watches the operator's namespace with its
    // own selector (`key=value` and `key` terms) and looks the Lease up
    // by service_lease_name(service namespace, name): the holder's and
    // the standby's agents see it, another node's does not.
    let labels = lease.metadata.labels.as_ref().unwrap();
    let selects = |selector: String| {
        selector.split(',').all(|term| match term.split_once('=') {
            Some((k, v)) => labels.get(k).map(String::as_str) == Some(v),
            None => labels.contains_key(term),
        })
    };
    assert!(selects(leases::service_lease_selector_for("a")));
    assert!(selects(leases::service_lease_selector_for("b")));
    assert!(!selects(leases::service_lease_selector_for("c")));
    // Neither is it a claim Lease, which no agent takes a role from.
    assert!(!selects(leases::claim_lease_selector()));
    assert_eq!(
        lease.metadata.name,
        Some(leases::service_lease_name(NS, "web"))
    );
    assert_eq!(lease.metadata.namespace.as_deref(), Some(OPERATOR_NS));
    assert_eq!(leases::service_of(&lease), Some((NS, "web")));
    assert_eq!(leases::service_uid(&lease), Some("uid-web"));
    // The agent's own check accepts what the operator wrote for this
    // service, and refuses it for the same name created again.
    let cluster = kubeha_crds::HACluster::new(
        "c1",
        kubeha_crds::testing::cluster_spec(kubeha_crds::cluster::Members::default()),
    );
    let mut cluster = cluster;
    cluster.spec.vip_pool = vec!["198.18.0.0/24".into()];
    cluster.spec.allowed_namespaces = vec![NS.into()];
    assert_eq!(assignments::vet(&service(), &lease, &cluster, &[]), Ok(()));
    let mut again = service();
    again.metadata.uid = Some("uid-web-2".into());
    assert!(matches!(
        assignments::vet(&again, &lease, &cluster, &[]),
        Err(assignments::Refusal::LeaseNotForService { .. })
    ));
}

#[test]
fn a_handover_read_by_the_agents() {
    let none = BTreeMap::new();

    // First placement: a is master and cleared at once, b stands by.
    let (l1, p) = decide(None, Some("a"), Some("b"), &none);
    assert_eq!(p, Progress::Cleared);
    let a = agent("a", &l1);
    assert_eq!((a.role, a.epoch, a.may_enter), (Role::Master, 1, true));
    assert_eq!(
        assignments::steps_between(Role::None, a, None),
        vec![Step::EnterMaster]
    );
    let b = agent("b", &l1);
    assert_eq!((b.role, b.epoch), (Role::Vicemaster, 1));
    assert_eq!(
        assignments::steps_between(Role::None, b, None),
        vec![Step::EnterVicemaster]
    );
    assert_eq!(agent("c", &l1).role, Role::None);

    // Move to b while a still runs epoch 1: b gets epoch 2 but may not
    // enter; a sees it must leave.
    let running: BTreeMap<String, NodeFacts> = [
        (
            "a".into(),
            entry("a", Role::Master, NodeServiceState::Running, 1, None),
        ),
        (
            "b".into(),
            entry("b", Role::Vicemaster, NodeServiceState::Stopped, 1, None),
        ),
    ]
    .into();
    let (l2, p) = decide(Some(&l1), Some("b"), Some("a"), &running);
    assert!(matches!(p, Progress::Waiting { ref nodes, epoch: 1 } if nodes == &["a"]));
    let b = agent("b", &l2);
    assert_eq!((b.role, b.epoch, b.may_enter), (Role::Master, 2, false));
    assert!(
        !assignments::steps_between(Role::Vicemaster, b, None).contains(&Step::EnterMaster),
        "not cleared: b must not enter"
    );
    let a = agent("a", &l2);
    assert_eq!(a.role, Role::Vicemaster);
    assert_eq!(
        assignments::steps_between(Role::Master, a, None),
        vec![Step::LeaveMaster, Step::EnterVicemaster]
    );

    // a reports as the agent does after those steps: it acknowledged the
    // epoch it left (1) and stands by at 2. Now b is cleared.
    let acked: BTreeMap<String, NodeFacts> = [
        (
            "a".into(),
            entry("a", Role::Vicemaster, NodeServiceState::Stopped, 2, Some(1)),
        ),
        (
            "b".into(),
            entry("b", Role::None, NodeServiceState::Stopped, 1, None),
        ),
    ]
    .into();
    let (l3, p) = decide(Some(&l2), Some("b"), Some("a"), &acked);
    assert_eq!(p, Progress::Cleared);
    let b = agent("b", &l3);
    assert_eq!((b.role, b.epoch, b.may_enter), (Role::Master, 2, true));
    assert_eq!(
        assignments::steps_between(Role::None, b, None),
        vec![Step::EnterMaster]
    );
    assert_eq!(l3.spec.as_ref().unwrap().lease_transitions, Some(2));

    // Nobody: b leaves, a leaves standby; nobody may enter anything.
    let (l4, _) = decide(Some(&l3), None, None, &acked);
    assert_eq!(l4.spec.as_ref().unwrap().holder_identity, None);
    let b = agent("b", &l4);
    assert_eq!(b.role, Role::None);
    assert_eq!(
        assignments::steps_between(Role::Master, b, None),
        vec![Step::LeaveMaster]
    );
    assert_eq!(
        assignments::steps_between(Role::Vicemaster, agent("a", &l4), None),
        vec![Step::LeaveVicemaster]
    );
}

#[test]
fn the_operator_routes_and_times_the_agents_heartbeat_lease() {
    let timing = AgentTiming::from(&HeartbeatTiming::default());
    let lease = heartbeat::heartbeat_lease("c1", "node-1", &timing, None);
    assert_eq!(
        lease.metadata.name,
        Some(leases::heartbeat_lease_name("c1", "node-1"))
    );
    let labels = lease.metadata.labels.clone().unwrap();
    // The operator watches its namespace with kubeha.io/lease=heartbeat and
    // routes by the cluster and node labels.
    assert_eq!(
        labels.get(leases::LEASE_KIND_LABEL).map(String::as_str),
        Some(leases::HEARTBEAT)
    );
    assert_eq!(
        labels.get(leases::CLUSTER_LABEL).map(String::as_str),
        Some("c1")
    );
    assert_eq!(
        labels.get(leases::NODE_LABEL).map(String::as_str),
        Some("node-1")
    );
    // A renew changes the fingerprint (renewTime and resourceVersion).
    let mut first = lease.clone();
    first.metadata.resource_version = Some("10".into());
    let mut next = heartbeat::heartbeat_lease("c1", "node-1", &timing, None);
    next.metadata.resource_version = Some("11".into());
    assert_ne!(Fingerprint::of(&first), Fingerprint::of(&next));
    assert!(Fingerprint::of(&next).renew_time.is_some());
}

#[test]
fn status_field_managers_never_collide() {
    for node in ["node-1", "operator", "kubeha-operator", ""] {
        assert_ne!(leases::agent_field_manager(node), FIELD_MANAGER);
    }
}

/// An agent's record, idle at `epoch`, as a fresh agent creates it.
fn idle_record(epoch: i64) -> kubeha_agent::statefile::ServiceRecord {
    kubeha_agent::statefile::ServiceRecord {
        epoch,
        ..kubeha_agent::statefile::ServiceRecord::fresh("c1", &service().spec, "x".into(), None)
    }
}

/// The operator's facts from the entry the agent applies for `record`.
fn reported(node: &str, record: &kubeha_agent::statefile::ServiceRecord) -> NodeFacts {
    let entry = kubeha_agent::daemon::status_entry(node, record);
    NodeFacts {
        entry: Some(serde_json::from_value(entry).expect("the entry is a ServiceNodeStatus")),
        ..Default::default()
    }
}

#[test]
fn an_idle_node_reporting_the_epoch_it_observed_has_moved_on() {
    // a was cleared at epoch 1 but never entered (say its heartbeat was
    // too old); the service moves to b at epoch 2, which waits for a.
    let (l1, _) = decide(None, Some("a"), None, &BTreeMap::new());
    let mut a = idle_record(0);
    let facts: BTreeMap<String, NodeFacts> = [("a".into(), reported("a", &a))].into();
    let (l2, p) = decide(Some(&l1), Some("b"), None, &facts);
    assert!(matches!(p, Progress::Waiting { ref nodes, epoch: 1 } if nodes == &["a"]));

    // a's agent, idle (no role at epoch 2), takes on the Lease's epoch and
    // reports it: that is the operator's "moved on" proof, b is cleared.
    let wanted = agent("a", &l2);
    assert_eq!(
        assignments::steps_between(a.role, wanted, a.failed_epoch),
        vec![]
    );
    let epoch = assignments::lease_epoch(&l2).unwrap();
    assert!(a.observe_epoch(epoch));
    let facts: BTreeMap<String, NodeFacts> = [("a".into(), reported("a", &a))].into();
    let state = handover::LeaseState::from_lease(&l2);
    assert_eq!(
        handover::proof("a", 1, &facts),
        Some(handover::Proof::MovedOn)
    );
    let h = handover::handover(Input {
        current: Some(&state),
        master: Some("b"),
        standby: None,
        facts: &facts,
    });
    assert_eq!(h.progress, Progress::Cleared);

    // A node whose leave failed at 1 does not take on epoch 2: no proof.
    let mut unclean = kubeha_agent::statefile::ServiceRecord {
        epoch: 1,
        state: NodeServiceState::Failed,
        unclean_epoch: Some(1),
        ..idle_record(1)
    };
    assert!(!unclean.observe_epoch(epoch));
    let facts: BTreeMap<String, NodeFacts> = [("a".into(), reported("a", &unclean))].into();
    assert_eq!(handover::proof("a", 1, &facts), None);
}

/// Hand-edited or odd Leases (whitespace in the enter epoch, a malformed or
/// negative one, an empty holder, a negative or missing epoch) read the
/// same on both sides: the operator's "the holder may enter" is the
/// agent's, and so is the epoch.
#[test]
fn operator_and_agent_read_any_service_lease_alike() {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    let lease = |holder: &str, transitions: Option<i32>, enter: Option<&str>| Lease {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            annotations: enter.map(|e| {
                BTreeMap::from([(leases::ENTER_EPOCH_ANNOTATION.to_owned(), e.to_owned())])
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_transitions: transitions,
            ..Default::default()
        }),
    };
    for holder in ["n1", ""] {
        for transitions in [None, Some(-1), Some(0), Some(4), Some(i32::MAX)] {
            for enter in [
                None,
                Some("4"),
                Some(" 4 "),
                Some("4\n"),
                Some("x"),
                Some("-1"),
                Some("0"),
                Some("2147483647"),
            ] {
                let l = lease(holder, transitions, enter);
                let op = handover::LeaseState::from_lease(&l);
                let ag = agent("n1", &l);
                let what =
                    format!("holder {holder:?}, leaseTransitions {transitions:?}, enter {enter:?}");
                assert_eq!(
                    op.holder_may_enter(),
                    ag.may_enter && ag.role == Role::Master,
                    "{what}"
                );
                assert_eq!(op.epoch, ag.epoch, "{what}");
            }
        }
    }
}
