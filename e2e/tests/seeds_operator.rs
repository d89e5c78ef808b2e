//! The operator's placement rules and status seen from outside, against the
//! real API server, the real operator and the real agents on three lab
//! nodes: the cluster's placement order, a service's preferred nodes,
//! failback and its delay, the startup grace, the migration threshold and
//! the failure timeout, and the conditions with `observedGeneration` of
//! both kinds. Each test reads what a user reads: the status, the service
//! Lease and which node holds the VIP. Tests run one at a time and each
//! uses its own cluster, service and VIP names (198.18.0.220-229).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kubeha_e2e::ha::{self, Timing};
use kubeha_e2e::lab::{Lab, StopSignal};
use serde_json::{Value, json};

static SERIAL: Mutex<()> = Mutex::new(());

fn lab() -> Lab {
    ha::operator_lab(3).expect("the lab with three nodes, their agents and the operator")
}

/// Applies `cluster` and waits until `ready` of its members heartbeat
/// ([`wait_ready`]).
fn apply_cluster(lab: &Lab, cluster: &Value, ready: &str) {
    ha::apply(lab, cluster).unwrap();
    wait_ready(lab, cluster["metadata"]["name"].as_str().unwrap(), ready);
}

/// Waits until HACluster `name` reports `ready` (`status.ready`, e.g.
/// `3/3`: members heartbeating over members).
fn wait_ready(lab: &Lab, name: &str, ready: &str) {
    let seen = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
        lab.kubectl_ok(&["get", "hacluster", name, "-o", "jsonpath={.status.ready}"])
            .is_ok_and(|r| r.trim() == ready)
    });
    assert!(
        seen.is_some(),
        "HACluster {name} never reported {ready} members ready: {}",
        lab.kubectl_ok(&["get", "hacluster", name, "-o", "yaml"])
            .unwrap_or_default()
    );
}

/// A service of `cluster` with one IPv4 VIP (/24) and no hooks.
fn plain_service(name: &str, cluster: &str, vip: &str) -> Value {
    ha::service(name, cluster, &[&format!("{vip}/24")], None, (3, 100))
}

/// Waits until the service Lease names `holder` and `standby` (node names;
/// empty for none), and returns its epoch.
fn wait_lease(lab: &Lab, service: &str, holder: &str, standby: &str) -> i64 {
    let mut last = None;
    let ok = ha::wait_every(Duration::from_secs(20), Duration::from_millis(100), || {
        last = ha::service_lease(lab, service);
        last.as_ref()
            .is_some_and(|l| l.holder == holder && l.standby == standby)
    });
    assert!(
        ok.is_some(),
        "{service}'s Lease never read holder {holder:?}, standby {standby:?}: {last:?}"
    );
    last.unwrap().epoch
}

/// Waits until the status of `service` names `standby` as its standby.
fn wait_status_standby(lab: &Lab, service: &str, standby: &str) {
    let ok = ha::wait_every(Duration::from_secs(20), Duration::from_millis(100), || {
        ha::service_status(lab, service)["standbyNode"] == standby
    });
    assert!(
        ok.is_some(),
        "{service}'s status never named {standby} standby: {}",
        ha::service_status(lab, service)
    );
}

/// The condition of type `type_` in `status` (null when absent).
fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or_default()
}

/// Whether `object`'s status was computed from its current generation:
/// `status.observedGeneration` and each condition's equal
/// `metadata.generation`, and the four kstatus conditions are there.
fn status_observes_generation(object: &Value) -> bool {
    let generation = &object["metadata"]["generation"];
    let status = &object["status"];
    status["observedGeneration"] == *generation
        && ["Ready", "Degraded", "Reconciling", "Stalled"]
            .iter()
            .all(|t| condition(status, t)["observedGeneration"] == *generation)
}

/// Waits until `kind/name` (in `namespace` when namespaced) has a status
/// computed from its current generation that satisfies `ok`; returns the
/// object.
fn wait_object(
    lab: &Lab,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    what: &str,
    mut ok: impl FnMut(&Value) -> bool,
) -> Value {
    let mut args = vec!["get", kind, name];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    let mut last = Value::Null;
    let seen = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
        last = lab.kubectl_json(&args).unwrap_or_default();
        status_observes_generation(&last) && ok(&last)
    });
    assert!(
        seen.is_some(),
        "{kind} {name} never showed {what} at its generation: {last}"
    );
    last
}

/// Issue 10 (1): `Ordered` takes the members in list order, `Alphabetical`
/// in name order. The list is node-2, node-3, node-1, so the two orders
/// differ at every rank: the Ordered cluster's service runs on node-2 with
/// node-3 standing by, the Alphabetical one's on node-1 with node-2. When
/// node-2 loses power the Ordered service goes to node-3 (the list's next,
/// where name order would say node-1), and the Alphabetical one stays on
/// node-1 with node-3, the next name, standing by.
#[test]
fn ordered_placement_follows_the_member_list_and_alphabetical_the_node_names() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (ordered, alpha) = ("so-ordered", "so-alpha");
    let (vip_o, vip_a) = ("198.18.0.220", "198.18.0.221");
    ha::remove_services_and_cluster(&lab, &[ordered], ordered, &[vip_o]).unwrap();
    ha::remove_services_and_cluster(&lab, &[alpha], alpha, &[vip_a]).unwrap();

    let members = [2, 3, 1];
    apply_cluster(
        &lab,
        &ha::cluster(ordered, &members, Timing::DEFAULT),
        "3/3",
    );
    let mut cluster = ha::cluster(alpha, &members, Timing::DEFAULT);
    cluster["spec"]["placement"] = json!("Alphabetical");
    apply_cluster(&lab, &cluster, "3/3");
    ha::apply(&lab, &plain_service(ordered, ordered, vip_o)).unwrap();
    ha::apply(&lab, &plain_service(alpha, alpha, vip_a)).unwrap();

    ha::wait_active_on(&lab, ordered, vip_o, 2, Duration::from_secs(30)).unwrap();
    ha::wait_active_on(&lab, alpha, vip_a, 1, Duration::from_secs(30)).unwrap();
    let epoch_o = wait_lease(&lab, ordered, "node-2", "node-3");
    let epoch_a = wait_lease(&lab, alpha, "node-1", "node-2");
    wait_status_standby(&lab, ordered, "node-3");
    wait_status_standby(&lab, alpha, "node-2");

    let sampler = ha::SplitBrain::start_many(&[vip_o, vip_a], &[]);
    lab.power_off(2).unwrap();
    // Off, node-2 keeps its VIP configured off the wire until its lifetime
    // ends: not counted while off.
    sampler.set_off(&[2]);
    ha::wait_active_on(&lab, ordered, vip_o, 3, Duration::from_secs(30)).unwrap();
    let after_o = wait_lease(&lab, ordered, "node-3", "node-1");
    assert!(
        after_o > epoch_o,
        "the failover to node-3 kept epoch {epoch_o}"
    );
    let after_a = wait_lease(&lab, alpha, "node-1", "node-3");
    assert_eq!(
        after_a, epoch_a,
        "a standby change moved the Alphabetical service's epoch"
    );
    assert_eq!(
        ha::vip_holders(vip_a),
        [1],
        "the Alphabetical service moved"
    );
    lab.power_on(2).unwrap();
    sampler.set_off(&[]);
    lab.start_agent(2, &[] as &[&str]).unwrap();
    let sampled = sampler.stop();
    sampled.assert_single_holder(vip_o, "node-2's power-off");
    sampled.assert_single_holder(vip_a, "node-2's power-off");

    ha::remove_services_and_cluster(&lab, &[ordered], ordered, &[vip_o]).unwrap();
    ha::remove_services_and_cluster(&lab, &[alpha], alpha, &[vip_a]).unwrap();
}

/// Issue 10 (2): `preferredNodes` go first, in their order, before the
/// cluster's order, and a name that is no member is skipped. The cluster
/// is Ordered node-1, node-2, node-3; the service prefers node-9 (no
/// member), node-3, node-2: it runs on node-3 with node-2 standing by.
/// Preferring node-1 instead under failback `Never` keeps it on node-3 at
/// the same epoch (node-1 becomes the standby); failback `Automatic` with
/// no delay then moves it to node-1.
#[test]
fn preferred_nodes_go_first_and_a_name_that_is_no_member_is_skipped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("so-preferred", "198.18.0.222");
    ha::remove_services_and_cluster(&lab, &[name], name, &[vip]).unwrap();
    apply_cluster(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT), "3/3");
    let mut svc = plain_service(name, name, vip);
    svc["spec"]["preferredNodes"] = json!(["node-9", "node-3", "node-2"]);
    ha::apply(&lab, &svc).unwrap();
    ha::wait_active_on(&lab, name, vip, 3, Duration::from_secs(30)).unwrap();
    let epoch = wait_lease(&lab, name, "node-3", "node-2");
    wait_status_standby(&lab, name, "node-2");

    // Failback Never (the cluster's default): the new first choice only
    // becomes the standby.
    svc["spec"]["preferredNodes"] = json!(["node-1"]);
    ha::apply(&lab, &svc).unwrap();
    assert_eq!(wait_lease(&lab, name, "node-3", "node-1"), epoch);
    wait_status_standby(&lab, name, "node-1");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ha::active_node(&lab, name, vip), Some(3));
    assert_eq!(ha::service_lease(&lab, name).map(|l| l.epoch), Some(epoch));

    let sampler = ha::SplitBrain::start(vip, &[]);
    svc["spec"]["failback"] = json!({"policy": "Automatic", "delaySeconds": 0});
    ha::apply(&lab, &svc).unwrap();
    ha::wait_active_on(&lab, name, vip, 1, Duration::from_secs(30)).unwrap();
    let moved = wait_lease(&lab, name, "node-1", "node-2");
    assert!(moved > epoch, "the move to node-1 kept epoch {epoch}");
    sampler
        .stop()
        .assert_single_holder(vip, "the failback to the preferred node");
    ha::remove_services_and_cluster(&lab, &[name], name, &[vip]).unwrap();
}

/// Issue 10 (3): failback `Automatic` moves a service back to the better
/// node once that node has been eligible for `delaySeconds`, not before;
/// `Never` (here a service's override of the cluster's Automatic) keeps
/// it where it runs. Both services run on node-1, which loses power; both
/// go to node-2. node-1 boots and its agent starts: the Automatic service
/// returns no sooner than the delay after the agent started, the Never one
/// stays on node-2 at the same epoch.
#[test]
fn automatic_failback_waits_its_delay_and_never_keeps_the_service_where_it_runs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, auto, never) = ("so-failback", "so-fb-auto", "so-fb-never");
    let (vip_auto, vip_never) = ("198.18.0.223", "198.18.0.224");
    let delay = Duration::from_secs(8);
    ha::remove_services_and_cluster(&lab, &[auto, never], name, &[vip_auto, vip_never]).unwrap();
    let mut cluster = ha::cluster(name, &[1, 2, 3], Timing::DEFAULT);
    cluster["spec"]["failback"] = json!({"policy": "Automatic", "delaySeconds": delay.as_secs()});
    apply_cluster(&lab, &cluster, "3/3");
    ha::apply(&lab, &plain_service(auto, name, vip_auto)).unwrap();
    let mut svc = plain_service(never, name, vip_never);
    svc["spec"]["failback"] = json!({"policy": "Never"});
    ha::apply(&lab, &svc).unwrap();
    ha::wait_active_on(&lab, auto, vip_auto, 1, Duration::from_secs(30)).unwrap();
    ha::wait_active_on(&lab, never, vip_never, 1, Duration::from_secs(30)).unwrap();

    let sampler = ha::SplitBrain::start_many(&[vip_auto, vip_never], &[]);
    lab.power_off(1).unwrap();
    sampler.set_off(&[1]);
    ha::wait_active_on(&lab, auto, vip_auto, 2, Duration::from_secs(30)).unwrap();
    ha::wait_active_on(&lab, never, vip_never, 2, Duration::from_secs(30)).unwrap();
    let never_epoch = ha::service_lease(&lab, never).unwrap().epoch;

    lab.power_on(1).unwrap();
    sampler.set_off(&[]);
    let started = Instant::now();
    lab.start_agent(1, &[] as &[&str]).unwrap();
    wait_ready(&lab, name, "3/3");
    let alive_seen = started.elapsed();
    let back = ha::wait_every(Duration::from_secs(30), Duration::from_millis(100), || {
        ha::service_lease(&lab, auto).is_some_and(|l| l.holder == "node-1")
    })
    .map(|_| started.elapsed());
    let back = back.unwrap_or_else(|| {
        panic!(
            "{auto} never went back to node-1: {}",
            ha::service_status(&lab, auto)
        )
    });
    eprintln!(
        "node-1's agent started; ready 3/3 seen after {alive_seen:?}, {auto} given back to node-1 after {back:?} (delay {delay:?})"
    );
    assert!(
        back >= delay,
        "{auto} went back after {back:?}, before node-1 could have been eligible for {delay:?}"
    );
    assert!(
        back <= alive_seen + delay + Duration::from_secs(6),
        "{auto} went back {back:?} after node-1's agent started, long after the delay from its first heartbeat ({alive_seen:?} + {delay:?})"
    );
    ha::wait_active_on(&lab, auto, vip_auto, 1, Duration::from_secs(20)).unwrap();

    // Never: node-1 has been eligible longer than the delay by now.
    assert_eq!(ha::active_node(&lab, never, vip_never), Some(2));
    assert_eq!(
        ha::service_lease(&lab, never).map(|l| l.epoch),
        Some(never_epoch),
        "the Never service changed epoch while it stayed"
    );
    let sampled = sampler.stop();
    sampled.assert_single_holder(vip_auto, "failover and failback");
    sampled.assert_single_holder(vip_never, "failover");
    ha::remove_services_and_cluster(&lab, &[auto, never], name, &[vip_auto, vip_never]).unwrap();
}

/// Issue 10 (4): startup grace. node-1, the primary of both clusters, is
/// slow: its agent is not running when they are created. A never-active
/// service waits, Pending and held by nobody, for the primary during the
/// grace: the short cluster's (8 s) goes to node-2 once its grace ends,
/// not before; the long cluster's (30 s) still waits then, and goes to
/// node-1 as soon as node-1's agent heartbeats, before its grace ends.
#[test]
fn startup_grace_waits_for_a_slow_primary_and_places_elsewhere_when_it_ends() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (short, long) = ("so-grace-short", "so-grace-long");
    let (vip_short, vip_long) = ("198.18.0.225", "198.18.0.226");
    let (grace_short, grace_long) = (Duration::from_secs(8), Duration::from_secs(30));
    ha::remove_services_and_cluster(&lab, &[short], short, &[vip_short]).unwrap();
    ha::remove_services_and_cluster(&lab, &[long], long, &[vip_long]).unwrap();
    lab.stop_agent(1, StopSignal::Kill).unwrap();

    let created = Instant::now();
    for (name, grace) in [(short, grace_short), (long, grace_long)] {
        let mut cluster = ha::cluster(name, &[1, 2, 3], Timing::DEFAULT);
        cluster["spec"]["startupGraceSeconds"] = json!(grace.as_secs());
        ha::apply(&lab, &cluster).unwrap();
    }
    ha::apply(&lab, &plain_service(short, short, vip_short)).unwrap();
    ha::apply(&lab, &plain_service(long, long, vip_long)).unwrap();

    // Within the short grace both wait, Pending, and nobody holds a VIP.
    let waiting = |name: &str| {
        let status = ha::service_status(&lab, name);
        status["phase"] == "Pending"
            && condition(&status, "Ready")["message"]
                .as_str()
                .is_some_and(|m| m.contains("StartupGrace"))
    };
    let seen_waiting = ha::wait_every(grace_short, Duration::from_millis(200), || {
        waiting(short) && waiting(long)
    })
    .map(|_| created.elapsed());
    assert!(
        seen_waiting.is_some_and(|t| t < grace_short),
        "the services were not seen waiting out the grace: {} / {}",
        ha::service_status(&lab, short),
        ha::service_status(&lab, long)
    );
    assert!(ha::vip_holders(vip_short).is_empty() && ha::vip_holders(vip_long).is_empty());

    let placed = ha::wait_every(Duration::from_secs(30), Duration::from_millis(100), || {
        ha::service_lease(&lab, short).is_some_and(|l| l.holder == "node-2")
    })
    .map(|_| created.elapsed());
    let placed = placed.unwrap_or_else(|| {
        panic!(
            "{short} was never placed on node-2: {}",
            ha::service_status(&lab, short)
        )
    });
    eprintln!(
        "{short} placed on node-2 {placed:?} after its cluster was created (grace {grace_short:?})"
    );
    assert!(
        placed >= grace_short,
        "{short} was placed {placed:?} after its cluster was created, within its grace"
    );
    ha::wait_active_on(&lab, short, vip_short, 2, Duration::from_secs(20)).unwrap();
    assert!(
        waiting(long) && ha::vip_holders(vip_long).is_empty(),
        "{long} did not wait for its primary: {}",
        ha::service_status(&lab, long)
    );

    lab.start_agent(1, &[] as &[&str]).unwrap();
    ha::wait_active_on(&lab, long, vip_long, 1, grace_long).unwrap();
    let active = created.elapsed();
    eprintln!(
        "{long} active on node-1 {active:?} after its cluster was created (grace {grace_long:?})"
    );
    assert!(
        active < grace_long,
        "{long} reached node-1 only after its grace ended ({active:?})"
    );
    ha::remove_services_and_cluster(&lab, &[short], short, &[vip_short]).unwrap();
    ha::remove_services_and_cluster(&lab, &[long], long, &[vip_long]).unwrap();
}

/// Issue 10 (5): `migrationThreshold: 2` lets node-1's enter fail twice,
/// each at its own epoch, before the service moves to node-2; node-1's
/// entry counts 2. The failures expire `failureTimeoutSeconds` after the
/// last one: then node-1 is eligible again and failback `Automatic` with
/// no delay takes the service back there (its enter works by then), no
/// sooner than the timeout after the last failure's time.
#[test]
fn a_node_fails_migration_threshold_times_before_the_service_moves_and_its_failures_expire() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, vip) = ("so-threshold", "198.18.0.227");
    let timeout = Duration::from_secs(12);
    ha::remove_services_and_cluster(&lab, &[name], name, &[vip]).unwrap();
    let trace = lab.dir().join(format!("trace-{name}"));
    let _ = std::fs::remove_file(&trace);
    // Exit 3: the enter failed and may be retried (1 and 2 fail for good).
    let install = |node1_code: i32| {
        for i in 1..=3 {
            let code = if i == 1 { node1_code } else { 0 };
            ha::install_hooks(
                &lab,
                i,
                name,
                &[
                    ("E01server", &ha::tracing_script(&trace, code)),
                    ("L01server", &ha::tracing_script(&trace, 0)),
                ],
            )
            .unwrap();
        }
    };
    install(3);
    apply_cluster(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT), "3/3");
    let mut svc = ha::service(name, name, &[&format!("{vip}/24")], Some(name), (3, 100));
    svc["spec"]["migrationThreshold"] = json!(2);
    svc["spec"]["failureTimeoutSeconds"] = json!(timeout.as_secs());
    svc["spec"]["failback"] = json!({"policy": "Automatic", "delaySeconds": 0});
    ha::apply(&lab, &svc).unwrap();
    ha::wait_active_on(&lab, name, vip, 2, Duration::from_secs(60)).unwrap();

    let trace_text = std::fs::read_to_string(&trace).unwrap_or_default();
    let epochs_on_1: Vec<&str> = trace_text
        .lines()
        .filter(|l| l.starts_with("E01server") && l.contains("node=node-1 "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("epoch=")))
        .collect();
    assert_eq!(
        epochs_on_1.len(),
        2,
        "node-1's enter did not run exactly twice before the move:\n{trace_text}"
    );
    assert_ne!(
        epochs_on_1[0], epochs_on_1[1],
        "the retry on node-1 reused its epoch"
    );
    let entry = ha::node_entry(&lab, name, 1);
    assert_eq!(entry["failCount"], 2, "node-1's entry: {entry}");
    let last_failure: jiff::Timestamp = entry["lastFailureTime"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("node-1's entry has no lastFailureTime: {entry}"));

    // node-1's enter works from now on; the service goes back only once
    // the failures expired.
    install(0);
    let back = ha::wait_every(Duration::from_secs(40), Duration::from_millis(100), || {
        ha::service_lease(&lab, name).is_some_and(|l| l.holder == "node-1")
    });
    assert!(
        back.is_some(),
        "{name} never went back to node-1 after its failures expired: {}",
        ha::service_status(&lab, name)
    );
    let after = jiff::Timestamp::now().duration_since(last_failure);
    let after = Duration::try_from(after).unwrap_or_default();
    eprintln!("{name} given back to node-1 {after:?} after the last failure (timeout {timeout:?})");
    assert!(
        after >= timeout,
        "{name} went back to node-1 {after:?} after its last failure, before the failure timeout {timeout:?}"
    );
    assert!(
        after <= timeout + Duration::from_secs(10),
        "{name} went back to node-1 {after:?} after its last failure, long after the timeout {timeout:?}"
    );
    ha::wait_active_on(&lab, name, vip, 1, Duration::from_secs(30)).unwrap();
    ha::remove_services_and_cluster(&lab, &[name], name, &[vip]).unwrap();
}

/// Issue 10 (6): conditions and `observedGeneration` on both kinds. An
/// HACluster whose selector matches no node is `Stalled` (NoMembers) with
/// a message naming `spec.members`; listing the nodes (generation 2)
/// makes it Ready, not Stalled, with generation 2 observed. An HAService
/// whose VIP is outside the pool is `Stalled` (InvalidSpec) with a message
/// naming `spec.vips` and the pool, and runs nowhere; a VIP inside the pool
/// (generation 2) makes it Ready and Active, generation 2 observed.
#[test]
fn conditions_follow_the_generation_and_a_bad_spec_names_its_field() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab();
    let (name, bad_vip, vip) = ("so-conditions", "198.19.0.5", "198.18.0.228");
    ha::remove_services_and_cluster(&lab, &[name], name, &[vip]).unwrap();

    let mut cluster = ha::cluster(name, &[], Timing::DEFAULT);
    cluster["spec"]["members"] =
        json!({"selector": {"matchLabels": {"kubeha.io/no-such-label": "true"}}});
    ha::apply(&lab, &cluster).unwrap();
    let stalled = wait_object(&lab, "hacluster", name, None, "Stalled NoMembers", |c| {
        condition(&c["status"], "Stalled")["reason"] == "NoMembers"
    });
    assert_eq!(stalled["metadata"]["generation"], 1);
    let cond = condition(&stalled["status"], "Stalled");
    assert_eq!(cond["status"], "True", "{cond}");
    assert!(
        cond["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.members")),
        "the NoMembers message names no field: {cond}"
    );
    assert_eq!(condition(&stalled["status"], "Ready")["status"], "False");

    apply_cluster(&lab, &ha::cluster(name, &[1, 2, 3], Timing::DEFAULT), "3/3");
    let fixed = wait_object(&lab, "hacluster", name, None, "Ready, not Stalled", |c| {
        condition(&c["status"], "Ready")["status"] == "True"
            && condition(&c["status"], "Stalled")["status"] == "False"
    });
    assert_eq!(fixed["metadata"]["generation"], 2);
    assert_eq!(condition(&fixed["status"], "Degraded")["status"], "False");

    let ns = Some(ha::SERVICE_NAMESPACE);
    ha::apply(&lab, &plain_service(name, name, bad_vip)).unwrap();
    let refused = wait_object(&lab, "haservice", name, ns, "Stalled InvalidSpec", |s| {
        condition(&s["status"], "Stalled")["reason"] == "InvalidSpec"
    });
    assert_eq!(refused["metadata"]["generation"], 1);
    let cond = condition(&refused["status"], "Stalled");
    let message = cond["message"].as_str().unwrap_or_default();
    assert_eq!(cond["status"], "True", "{cond}");
    assert!(
        message.contains("spec.vips")
            && message.contains("spec.vipPool")
            && message.contains(bad_vip),
        "the InvalidSpec message does not name the field, the address and the pool: {cond}"
    );
    assert_eq!(condition(&refused["status"], "Ready")["status"], "False");
    assert!(
        ha::service_lease(&lab, name).is_none_or(|l| l.holder.is_empty()),
        "a refused service was given a holder"
    );
    assert!(ha::vip_holders(bad_vip).is_empty());

    ha::apply(&lab, &plain_service(name, name, vip)).unwrap();
    ha::wait_active_on(&lab, name, vip, 1, Duration::from_secs(30)).unwrap();
    let running = wait_object(&lab, "haservice", name, ns, "Ready, not Stalled", |s| {
        condition(&s["status"], "Ready")["status"] == "True"
            && condition(&s["status"], "Stalled")["status"] == "False"
    });
    assert_eq!(running["metadata"]["generation"], 2);
    assert_eq!(condition(&running["status"], "Ready")["reason"], "Active");
    assert!(ha::vip_holders(bad_vip).is_empty());
    ha::remove_services_and_cluster(&lab, &[name], name, &[vip]).unwrap();
}
