use super::*;

#[test]
fn round_trip_and_atomic_replace() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(read(dir.path()), None);
    let mut status = NodeStatus {
        node: "node-1".into(),
        ..Default::default()
    };
    write(dir.path(), &status).unwrap();
    status.clusters.insert(
        "c".into(),
        ClusterRecord {
            renew_failures: 2,
            ..Default::default()
        },
    );
    write(dir.path(), &status).unwrap();
    assert_eq!(read(dir.path()), Some(status));
    assert!(!dir.path().join(".status.json.tmp").exists());
}

#[test]
fn an_unsynced_write_replaces_the_file_as_a_synced_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut status = NodeStatus {
        node: "node-1".into(),
        ..Default::default()
    };
    write(dir.path(), &status).unwrap();
    status.services.insert("ns/web".into(), record());
    write_unsynced(dir.path(), &status).unwrap();
    sync(dir.path()).unwrap();
    assert_eq!(read(dir.path()), Some(status));
    assert!(!dir.path().join(".status.json.tmp").exists());
}

fn record() -> ServiceRecord {
    ServiceRecord {
        cluster: "c".into(),
        role: Role::None,
        epoch: 3,
        state: NodeServiceState::Failed,
        vips: Vec::new(),
        interface: None,
        acked_epoch: Some(3),
        fail_count: 2,
        last_failure: Some("2026-12-06T13:39:15Z".into()),
        failed_epoch: Some(3),
        spec: kubeha_crds::testing::service_spec("c", &["198.18.0.100/24"]),
        config_checksum: "x".into(),
        last_hooks: Vec::new(),
        clear_token: None,
        unclean_epoch: None,
        fenced: false,
        permanent_failure: false,
        refused: None,
    }
}

#[test]
fn a_counted_failure_is_dated_to_the_second_for_the_status_entry() {
    let mut r = record();
    r.count_failure();
    assert_eq!(r.fail_count, 3);
    let at: jiff::Timestamp = r.last_failure.as_deref().unwrap().parse().unwrap();
    assert_eq!(at.subsec_nanosecond(), 0);
    let ago = jiff::Timestamp::now().duration_since(at);
    assert!(ago.as_secs() <= 2, "{ago:?}");
    let entry = crate::daemon::status_entry("n1", &r);
    let applied: kubeha_crds::service::ServiceNodeStatus = serde_json::from_value(entry).unwrap();
    assert_eq!(applied.last_failure_time.map(|t| t.0), Some(at));
}

#[test]
fn a_new_clear_token_resets_the_failures_once() {
    let mut r = record();
    // No annotation: nothing happens.
    assert_eq!(r.apply_clear(None), None);
    assert_eq!(r.fail_count, 2);
    let c = r.apply_clear(Some("2025-01-01T00:00:00Z")).unwrap();
    assert_eq!(
        c,
        Cleared {
            fail_count: 2,
            was_failed: true,
            failed_epoch: Some(3)
        }
    );
    assert!(c.changed());
    assert_eq!(
        r.last_failure, None,
        "a clear forgets when the last failure was"
    );
    assert_eq!(r.fail_count, 0);
    assert_eq!(r.failed_epoch, None);
    assert_eq!(r.state, NodeServiceState::Stopped);
    assert_eq!(r.clear_token.as_deref(), Some("2025-01-01T00:00:00Z"));
    // Role, epoch and acknowledgement untouched.
    assert_eq!((r.role, r.epoch, r.acked_epoch), (Role::None, 3, Some(3)));
    // The same token again: already applied, even after new failures.
    r.fail_count = 1;
    r.state = NodeServiceState::Failed;
    assert_eq!(r.apply_clear(Some("2025-01-01T00:00:00Z")), None);
    assert_eq!(r.fail_count, 1);
    // The annotation removed: the token is kept, nothing happens.
    assert_eq!(r.apply_clear(None), None);
    assert_eq!(r.clear_token.as_deref(), Some("2025-01-01T00:00:00Z"));
    // A new value clears again.
    assert!(r.apply_clear(Some("again")).unwrap().changed());
    assert_eq!((r.fail_count, r.state), (0, NodeServiceState::Stopped));
}

#[test]
fn a_clear_leaves_a_healthy_record_alone() {
    let mut r = record();
    r.fail_count = 0;
    r.last_failure = None;
    r.failed_epoch = None;
    r.role = Role::Master;
    r.state = NodeServiceState::Running;
    r.vips = vec!["198.18.0.100/24".into()];
    let before = r.clone();
    let c = r.apply_clear(Some("t")).unwrap();
    assert!(!c.changed());
    assert_eq!(
        r,
        ServiceRecord {
            clear_token: Some("t".into()),
            ..before
        }
    );
}

#[test]
fn status_files_without_a_clear_token_still_load() {
    let mut value = serde_json::to_value(record()).unwrap();
    assert!(value.get("clearToken").is_none(), "absent when unset");
    value.as_object_mut().unwrap().remove("clearToken");
    let r: ServiceRecord = serde_json::from_value(value).unwrap();
    assert_eq!(r, record());
    let mut with = record();
    with.clear_token = Some("t".into());
    let text = serde_json::to_string(&with).unwrap();
    assert!(text.contains("\"clearToken\":\"t\""), "{text}");
    assert_eq!(serde_json::from_str::<ServiceRecord>(&text).unwrap(), with);
}

#[test]
fn an_idle_record_takes_on_later_lease_epochs_only() {
    // Stopped, no role: takes on a later epoch once, never an older one.
    let mut r = ServiceRecord {
        state: NodeServiceState::Stopped,
        acked_epoch: None,
        failed_epoch: None,
        ..record()
    };
    assert!(r.observe_epoch(5));
    assert_eq!(r.epoch, 5);
    assert!(!r.observe_epoch(5), "unchanged: nothing to report");
    assert!(!r.observe_epoch(4));
    assert_eq!(r.epoch, 5);
    // The standby too.
    r.role = Role::Vicemaster;
    assert!(r.observe_epoch(6));
    // Failed after an enter that was left again (acknowledged): idle.
    let mut failed = record();
    assert!(failed.observe_epoch(4));
    assert_eq!(failed.epoch, 4);
}

#[test]
fn a_record_that_may_run_something_keeps_its_epoch() {
    // The master, and any record in a transition.
    for (role, state) in [
        (Role::Master, NodeServiceState::Running),
        (Role::Master, NodeServiceState::Failed),
        (Role::None, NodeServiceState::Starting),
        (Role::None, NodeServiceState::Stopping),
        (Role::Vicemaster, NodeServiceState::Stopping),
    ] {
        let mut r = ServiceRecord {
            role,
            state,
            ..record()
        };
        assert!(!r.observe_epoch(9), "{role:?} {state:?}");
        assert_eq!(r.epoch, 3);
    }
    // A master role left uncleanly (failed leave, refused enter, fence),
    // even once an admin's clear made the record Stopped.
    let mut r = ServiceRecord {
        unclean_epoch: Some(3),
        acked_epoch: Some(2),
        ..record()
    };
    assert!(!r.observe_epoch(9));
    r.apply_clear(Some("t"));
    assert_eq!(
        r.state,
        NodeServiceState::Failed,
        "a clear does not end a leave that failed (the daemon runs the leave again)"
    );
    assert_eq!(r.fail_count, 0);
    assert!(!r.observe_epoch(9));
    assert_eq!(r.epoch, 3);
}

#[test]
fn old_status_files_count_an_unacknowledged_failure_as_unclean() {
    // Acknowledged: clean.
    let mut r = record();
    assert!(!r.assume_unclean_if_unknown());
    assert_eq!(r.unclean_epoch, None);
    // Failed without an acknowledgement of its epoch: maybe a failed
    // leave.
    let mut r = ServiceRecord {
        acked_epoch: Some(2),
        ..record()
    };
    assert!(r.assume_unclean_if_unknown());
    assert_eq!(r.unclean_epoch, Some(3));
    // Stopped: clean.
    let mut r = ServiceRecord {
        acked_epoch: None,
        state: NodeServiceState::Stopped,
        ..record()
    };
    assert!(!r.assume_unclean_if_unknown());
    // The field round-trips and is absent when unset.
    let value = serde_json::to_value(record()).unwrap();
    assert!(value.get("uncleanEpoch").is_none());
    let with = ServiceRecord {
        unclean_epoch: Some(3),
        ..record()
    };
    let text = serde_json::to_string(&with).unwrap();
    assert!(text.contains("\"uncleanEpoch\":3"), "{text}");
    assert_eq!(serde_json::from_str::<ServiceRecord>(&text).unwrap(), with);
}

#[test]
fn corrupt_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(path(dir.path()), "{not json").unwrap();
    assert_eq!(read(dir.path()), None);
}

#[test]
fn fence_log_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("sub/fence.log");
    append_synced(&log, "one").unwrap();
    append_synced(&log, "two").unwrap();
    assert_eq!(std::fs::read_to_string(log).unwrap(), "one\ntwo\n");
}

#[test]
fn a_file_from_another_boot_is_recognised_and_one_naming_none_is_this_boots() {
    let mut status = NodeStatus::default();
    assert!(status.same_boot("b1"), "a file from before boot ids");
    status.boot_id = Some("b1".into());
    assert!(status.same_boot("b1"));
    assert!(!status.same_boot("b2"));
    assert_eq!(boot_id(Some(" b3\n")).as_deref(), Some("b3"));
    assert_eq!(boot_id(Some("")), None);
    let kernel = boot_id(None).expect("Linux publishes a boot id");
    assert_eq!(kernel.len(), 36, "a UUID: {kernel}");
}

#[test]
fn after_a_reboot_nothing_is_held_and_failures_are_kept() {
    let mut master = ServiceRecord {
        role: Role::Master,
        state: NodeServiceState::Running,
        vips: vec!["198.18.0.100/24".into()],
        interface: Some("eth0".into()),
        acked_epoch: Some(2),
        failed_epoch: None,
        unclean_epoch: Some(3),
        ..record()
    };
    assert!(master.forget_after_reboot());
    assert_eq!(master.role, Role::None);
    assert_eq!(master.state, NodeServiceState::Stopped);
    assert!(master.vips.is_empty() && master.interface.is_none());
    assert_eq!(master.unclean_epoch, None);
    assert_eq!(
        (master.epoch, master.acked_epoch),
        (3, Some(2)),
        "epoch 3 not acknowledged as left: entered again if still asked"
    );
    // A failure of the service survives the reboot; a fence's does not.
    let mut failed = record();
    assert!(!failed.forget_after_reboot());
    assert_eq!(failed.state, NodeServiceState::Failed);
    assert_eq!((failed.fail_count, failed.failed_epoch), (2, Some(3)));
    let mut fenced = ServiceRecord {
        fenced: true,
        ..record()
    };
    assert!(fenced.forget_after_reboot());
    assert_eq!(fenced.state, NodeServiceState::Stopped);
    assert!(!fenced.fenced);
}

#[test]
fn exit_1_or_2_is_a_permanent_failure_until_a_clear() {
    use kubeha_crds::service::HookOutcome;
    let mut r = ServiceRecord {
        fail_count: 0,
        ..record()
    };
    // An ordinary failure counts one and is not permanent.
    r.count_hook_failure(HookOutcome::Failed, 3);
    assert_eq!((r.fail_count, r.permanent_failure), (1, false));
    // Exit 2: at least the migration threshold, and permanent.
    r.count_hook_failure(HookOutcome::ConfigError, 3);
    assert_eq!((r.fail_count, r.permanent_failure), (3, true));
    assert!(r.last_failure.is_some());
    // A later ordinary failure does not end it.
    r.count_hook_failure(HookOutcome::NotRunning, 3);
    assert!(r.permanent_failure);
    // Only an admin's clear does.
    r.apply_clear(Some("t1"));
    assert_eq!((r.fail_count, r.permanent_failure), (0, false));
}
