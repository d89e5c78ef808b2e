use super::*;
use crate::vip::fake::FakeNetlink;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kubeha_crds::service::{NodeServiceState, Role};

use crate::assignments::{Assignment, Step};
use crate::heartbeat::Timing;
use crate::statefile::ServiceRecord;

fn beat(age_ms: u64, d_ms: u64, skew_ms: u64) -> (Beat, Instant) {
    let now = Instant::now();
    let timing = Timing {
        lease_duration: Duration::from_millis(d_ms),
        renew_interval: Duration::from_millis(d_ms / 3),
        renew_deadline: Duration::from_millis(d_ms * 2 / 3),
        clock_skew: Duration::from_millis(skew_ms),
        vip_lifetime_seconds: None,
    };
    (
        Beat {
            renewed_under: None,
            renew_time: None,
            exclusive: None,
            renewed_exclusive: false,
            timing,
            last_success: Some(now - Duration::from_millis(age_ms)),
            failures: 0,
        },
        now,
    )
}

#[test]
fn lifetime_never_outlives_the_lease() {
    let allowed = LocalNode::<crate::vip::RtNetlink>::allowed_until;
    let ms = Duration::from_millis;
    // D 3 s + skew 0.5 s: a fresh renew allows 3.4 s (E less the 100 ms
    // margin); 1.2 s later 2.2 s.
    let (b, now) = beat(0, 3000, 500);
    assert_eq!(allowed(&b, now), Some(now + ms(3400)));
    let (b, now) = beat(1200, 3000, 500);
    assert_eq!(allowed(&b, now), Some(now + ms(2200)));
    // Still 0.7 s at 2.7 s old; nothing once E less the margin has passed.
    let (b, now) = beat(2700, 3000, 500);
    assert_eq!(allowed(&b, now), Some(now + ms(700)));
    let (b, now) = beat(3400, 3000, 500);
    assert_eq!(allowed(&b, now), None);
    // The tight end, D = 1 s + 0.1 s skew: 900 ms right after a renew.
    let (b, now) = beat(100, 1000, 100);
    assert_eq!(allowed(&b, now), Some(now + ms(900)));
}

fn record(spec: &HAServiceSpec) -> ServiceRecord {
    ServiceRecord::fresh("c", spec, "x".into(), None)
}

fn master(epoch: i64) -> Assignment {
    Assignment {
        role: Role::Master,
        epoch,
        may_enter: true,
    }
}

/// A node `n1` with a fake netlink and hooks `svc/E01ok` (exit 0) and
/// `svc/L01maybe` (exit 3 while the file `flag` exists), a service with
/// one VIP and a cluster with a fresh heartbeat. The temporary folders
/// live as long as the fixture.
struct Fixture {
    node: LocalNode<FakeNetlink>,
    spec: HAServiceSpec,
    svc: TransitionService,
    cluster: TransitionCluster,
    flag: std::path::PathBuf,
    _dirs: [tempfile::TempDir; 3],
}

fn fixture() -> Fixture {
    use std::os::unix::fs::PermissionsExt;
    let (hook_root, state, logs) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let dir = hook_root.path().join("svc");
    std::fs::create_dir(&dir).unwrap();
    let flag = state.path().join("leave-fails");
    for (name, body) in [
        ("E01ok", "exit 0".to_owned()),
        (
            "L01maybe",
            format!("[ -e {} ] && exit 3; exit 0", flag.display()),
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let node = LocalNode {
        name: "n1".into(),
        netlink: FakeNetlink::default(),
        runner: HookRunner::new(logs.path()),
        hook_root: hook_root.path().to_owned(),
        state_dir: state.path().to_owned(),
        metrics: Metrics::default(),
        held: Default::default(),
    };
    let spec: HAServiceSpec = serde_json::from_value(serde_json::json!({
        "clusterRef": "c",
        "vips": [{"address": "198.18.0.100/24"}],
        "hooks": {"source": {"hostPath": "svc"}, "timeoutSeconds": 10},
    }))
    .unwrap();
    let svc = TransitionService {
        key: "ns/svc".into(),
        spec: spec.clone(),
        checksum: "x".into(),
    };
    let (b, _) = beat(0, 60_000, 500);
    let cluster = TransitionCluster {
        name: "c".into(),
        members: vec!["n1".into()],
        beat: Some(b),
        fenced: Arc::default(),
    };
    Fixture {
        node,
        spec,
        svc,
        cluster,
        flag,
        _dirs: [hook_root, state, logs],
    }
}

/// A fence cuts the leave short: the record is Failed and unclean and
/// marked `fenced`, which makes the daemon run the leave again once in
/// contact; that leave's success ends it all without an admin and
/// without counting a failure.
#[tokio::test]
async fn a_fence_is_undone_by_the_next_clean_leave_and_counts_no_failure() {
    let fx = fixture();
    let (node, spec, svc, cluster) = (&fx.node, &fx.spec, &fx.svc, &fx.cluster);
    let mut r = record(spec);
    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(2))
            .await
    );
    node.drop_vips(&r.vips.clone(), r.interface.clone().as_deref())
        .await;
    node.fence_leave(&mut r, svc, cluster, Duration::ZERO).await;
    assert_eq!((r.role, r.state), (Role::None, NodeServiceState::Failed));
    assert_eq!(
        (r.unclean_epoch, r.fenced, r.fail_count),
        (Some(2), true, 0)
    );
    assert!(!r.observe_epoch(3), "a fenced record is not idle yet");

    assert!(
        node.step(Step::LeaveMaster, &mut r, svc, cluster, Assignment::NONE)
            .await
    );
    assert_eq!(
        (r.state, r.unclean_epoch, r.fenced),
        (NodeServiceState::Stopped, None, false)
    );
    assert_eq!((r.acked_epoch, r.fail_count), (Some(2), 0));
    assert!(r.observe_epoch(4), "idle again: later epochs are taken on");
}

/// Extension never adds a VIP back: one the kernel expired (renewals
/// missed past its lifetime) gives the master role up as a fence does,
/// while a present one is extended and the service runs on.
#[tokio::test]
async fn extension_never_re_adds_an_expired_vip_and_gives_the_role_up() {
    let fx = fixture();
    let (node, spec, svc, cluster) = (&fx.node, &fx.spec, &fx.svc, &fx.cluster);
    let held = |node: &LocalNode<FakeNetlink>| node.netlink.addrs.lock().unwrap().len();
    let mut r = record(spec);
    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(3))
            .await
    );
    assert_eq!(held(node), 1);
    // Extended without the record (a transition may hold its lock).
    node.extend(cluster).await;
    assert_eq!(held(node), 1, "a present VIP is extended, once");
    assert!(!node.give_up_if_expired(&mut r).await);
    assert_eq!((r.role, r.state), (Role::Master, NodeServiceState::Running));

    // The kernel expires it (the agent was stalled past its lifetime).
    node.netlink.addrs.lock().unwrap().clear();
    node.extend(cluster).await;
    assert_eq!(held(node), 0, "an expired VIP was added back");
    node.extend(cluster).await;
    assert_eq!(held(node), 0, "an expired VIP was added back later");
    assert!(node.give_up_if_expired(&mut r).await);
    assert_eq!((r.role, r.state), (Role::None, NodeServiceState::Failed));
    assert_eq!(
        (r.unclean_epoch, r.failed_epoch, r.fenced, r.fail_count),
        (Some(3), Some(3), true, 0)
    );
    assert!(r.vips.is_empty());

    // Entered again and left: a released VIP is never extended.
    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(4))
            .await
    );
    assert!(
        node.step(Step::LeaveMaster, &mut r, svc, cluster, Assignment::NONE)
            .await
    );
    node.extend(cluster).await;
    assert_eq!(held(node), 0);
    assert!(
        !node.give_up_if_expired(&mut r).await,
        "nothing held, nothing expired"
    );
}

/// Chaos-found (seed 1, an API server stall past RD): a standby
/// cleared as master by a clearance from before its return refused it,
/// then left the standby role, and the leave's results replaced the
/// refusal's marker: the operator never read "started nothing" and
/// waited on it forever. The refusal stands, marker included.
#[tokio::test]
async fn leaving_the_standby_role_keeps_a_refusal_of_the_epoch_asked_for() {
    let fx = fixture();
    let (node, svc, cluster) = (&fx.node, &fx.svc, &fx.cluster);
    let mut r = record(&fx.spec);
    let standby = Assignment {
        role: Role::Vicemaster,
        epoch: 2,
        may_enter: false,
    };
    assert!(
        node.step(Step::EnterVicemaster, &mut r, svc, cluster, standby)
            .await
    );
    // What the daemon records for Work::Refuse { epoch: 3 }.
    r.state = NodeServiceState::Failed;
    r.failed_epoch = Some(3);
    r.last_hooks = vec![refused("cleared before this node came back")];
    node.step(Step::LeaveVicemaster, &mut r, svc, cluster, master(3))
        .await;
    assert_eq!((r.role, r.state), (Role::None, NodeServiceState::Failed));
    assert!(
        !r.last_hooks.is_empty() && r.last_hooks.iter().all(|h| h.script == "-"),
        "the refusal's marker was replaced: {:?}",
        r.last_hooks
    );
    // Without a refusal the standby leaves as Stopped.
    let mut r = record(&fx.spec);
    node.step(Step::EnterVicemaster, &mut r, svc, cluster, standby)
        .await;
    node.step(Step::LeaveVicemaster, &mut r, svc, cluster, master(3))
        .await;
    assert_eq!((r.role, r.state), (Role::None, NodeServiceState::Stopped));
}

/// Hole found by reading (issue 8): an extension held up in flight (the
/// agent stopped after it computed the lifetime, before the kernel took
/// it) must not set a lifetime that runs past E. The calls take an end,
/// not a length, and turn it into a timeout only when the kernel takes it.
#[tokio::test]
async fn a_lifetime_set_late_still_ends_within_the_lease() {
    let fx = fixture();
    let (node, svc) = (&fx.node, &fx.svc);
    let (b, _) = beat(0, 3_000, 500);
    let cluster = TransitionCluster {
        beat: Some(b),
        ..fx.cluster.clone()
    };
    let mut r = record(&fx.spec);
    assert!(
        node.step(Step::EnterMaster, &mut r, svc, &cluster, master(2))
            .await
    );
    let lifetimes = || node.netlink.lifetimes.lock().unwrap().clone();
    let ms = Duration::from_millis;
    // E 3.5 s less the 100 ms margin, less the few ms the entry took.
    assert!(
        (ms(3230)..=ms(3400)).contains(&lifetimes()[0]),
        "{:?}",
        lifetimes()
    );
    // Stalled 400 ms in the next extension's call: 3.4 s from before
    // the stall would end 3.8 s after the renew; the kernel is given
    // what is left when it takes it.
    node.netlink.add_delay_ms.store(400, Ordering::SeqCst);
    node.extend(&cluster).await;
    let set = lifetimes()[1];
    assert!(set <= ms(3000), "{set:?}: set past the lease end");
    assert_eq!(node.netlink.addrs.lock().unwrap().len(), 1);
    assert!(!node.give_up_if_expired(&mut r).await);
    // Stalled past the lease end: nothing set, and the role given up as
    // a fence does.
    node.netlink.add_delay_ms.store(3_600, Ordering::SeqCst);
    let (b, _) = beat(0, 3_000, 500);
    let cluster = TransitionCluster {
        beat: Some(b),
        ..fx.cluster.clone()
    };
    node.extend(&cluster).await;
    assert_eq!(lifetimes().len(), 2, "nothing set after the lease end");
    assert!(node.give_up_if_expired(&mut r).await);
    assert!(node.netlink.addrs.lock().unwrap().is_empty(), "still held");
}

/// Chaos-found (CI, a Freeze cluster healed): an extension that had
/// seen the VIP present re-added it after a leave removed it, so it
/// stayed on the old node, unheld, for its whole lifetime while the
/// next node took it. A removal now waits for the extension in flight
/// and removes last.
#[tokio::test]
async fn an_extension_in_flight_never_re_adds_a_vip_a_leave_removed() {
    let fx = fixture();
    let node = Arc::new(fx.node);
    let (svc, cluster) = (&fx.svc, &fx.cluster);
    let mut r = record(&fx.spec);
    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(2))
            .await
    );
    node.netlink.present_delay_ms.store(300, Ordering::SeqCst);
    let extension = tokio::spawn({
        let (node, cluster) = (node.clone(), cluster.clone());
        async move { node.extend(&cluster).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        node.step(Step::LeaveMaster, &mut r, svc, cluster, Assignment::NONE)
            .await
    );
    extension.await.unwrap();
    assert_eq!(
        *node.netlink.addrs.lock().unwrap(),
        [],
        "the VIP is back on the node after its leave"
    );
}

/// A re-adoption whose VIPs cannot be held again gives the role up as a
/// fence does, rather than report Running with no VIP.
#[tokio::test]
async fn a_failed_re_adoption_gives_the_role_up() {
    let fx = fixture();
    let (node, spec, cluster) = (&fx.node, &fx.spec, &fx.cluster);
    let mut r = record(spec);
    r.role = Role::Master;
    r.state = NodeServiceState::Running;
    r.epoch = 6;
    r.spec.vips[0].address = "203.0.113.5/24".into();
    r.vips = vec!["203.0.113.5/24".into()];
    assert!(!node.adopt("ns/svc", &mut r, cluster).await);
    assert_eq!((r.role, r.state), (Role::None, NodeServiceState::Failed));
    assert_eq!((r.unclean_epoch, r.fenced), (Some(6), true));

    let mut ok = record(spec);
    ok.role = Role::Master;
    ok.state = NodeServiceState::Running;
    assert!(node.adopt("ns/svc", &mut ok, cluster).await);
    assert_eq!(
        (ok.role, ok.state),
        (Role::Master, NodeServiceState::Running)
    );
}

/// A failed leave (or a refused enter) marks the record unclean, so it
/// does not take on later epochs it observes (which the operator would
/// read as "moved on"); a later clean leave clears the mark.
#[tokio::test]
async fn an_unclean_leave_keeps_the_record_from_moving_on() {
    let fx = fixture();
    let (node, spec, svc, cluster, flag) = (&fx.node, &fx.spec, &fx.svc, &fx.cluster, &fx.flag);
    let mut r = record(spec);

    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(1))
            .await
    );
    assert_eq!((r.role, r.state), (Role::Master, NodeServiceState::Running));
    std::fs::write(flag, "").unwrap();
    assert!(
        !node
            .step(Step::LeaveMaster, &mut r, svc, cluster, Assignment::NONE)
            .await
    );
    assert_eq!((r.role, r.state), (Role::None, NodeServiceState::Failed));
    assert_eq!((r.acked_epoch, r.unclean_epoch), (None, Some(1)));
    assert!(!r.observe_epoch(2), "a failed leave must not look moved on");
    assert_eq!(r.epoch, 1);

    // Scripts fine but a VIP the kernel would not remove: unclean too,
    // no acknowledgement.
    std::fs::remove_file(flag).unwrap();
    let mut stuck = record(spec);
    assert!(
        node.step(Step::EnterMaster, &mut stuck, svc, cluster, master(2))
            .await
    );
    node.netlink.refuse_del.store(true, Ordering::SeqCst);
    assert!(
        !node
            .step(
                Step::LeaveMaster,
                &mut stuck,
                svc,
                cluster,
                Assignment::NONE
            )
            .await,
        "a leave that could not remove its VIP failed"
    );
    assert_eq!(
        (stuck.state, stuck.acked_epoch, stuck.unclean_epoch),
        (NodeServiceState::Failed, None, Some(2))
    );
    node.netlink.refuse_del.store(false, Ordering::SeqCst);
    assert!(
        node.step(
            Step::LeaveMaster,
            &mut stuck,
            svc,
            cluster,
            Assignment::NONE
        )
        .await
    );

    // Cleared there again, left cleanly: clean, and idle epochs count.
    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(3))
            .await
    );
    assert!(
        node.step(Step::LeaveMaster, &mut r, svc, cluster, Assignment::NONE)
            .await
    );
    assert_eq!((r.acked_epoch, r.unclean_epoch), (Some(3), None));
    assert!(r.observe_epoch(4));
    assert_eq!(r.epoch, 4);

    // A refused enter (no interface holds the VIP) is unclean too.
    let mut refused_spec = spec.clone();
    refused_spec.vips[0].address = "203.0.113.5/24".into();
    let refused = TransitionService {
        spec: refused_spec,
        ..svc.clone()
    };
    assert!(
        !node
            .step(Step::EnterMaster, &mut r, &refused, cluster, master(5))
            .await
    );
    assert_eq!(
        (r.state, r.unclean_epoch),
        (NodeServiceState::Failed, Some(5))
    );
    assert!(!r.observe_epoch(6));
}

/// The VIP's series follows the VIP: there once the enter added it, gone
/// once the leave removed it, and gone when the kernel expired it before
/// an extension.
#[tokio::test]
async fn the_vip_held_series_follows_enter_leave_and_expiry() {
    let fx = fixture();
    let (node, spec, svc, cluster) = (&fx.node, &fx.spec, &fx.svc, &fx.cluster);
    let text = || {
        node.metrics
            .encode(&crate::heartbeat::Heartbeats::default())
    };
    let series = "kubeha_agent_vip_held{service=\"ns/svc\",address=\"198.18.0.100\",interface=";
    let mut r = record(spec);
    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(2))
            .await
    );
    assert!(text().contains(series), "{}", text());
    assert!(text().contains("kubeha_agent_vips_held 1\n"), "{}", text());
    assert!(
        node.step(Step::LeaveMaster, &mut r, svc, cluster, Assignment::NONE)
            .await
    );
    assert!(!text().contains(series), "{}", text());
    assert!(text().contains("kubeha_agent_vips_held 0\n"), "{}", text());

    assert!(
        node.step(Step::EnterMaster, &mut r, svc, cluster, master(3))
            .await
    );
    assert!(text().contains(series), "{}", text());
    node.netlink.addrs.lock().unwrap().clear();
    node.extend(cluster).await;
    assert!(!text().contains(series), "an expired VIP kept its series");
}
