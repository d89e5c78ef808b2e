use super::*;
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::Instant;
use tempfile::TempDir;

/// Writes a `/bin/sh` script with the given mode.
fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

fn ctx(action: Action) -> HookContext {
    HookContext {
        action,
        role: Role::Master,
        transition: transition(action, Role::Master, false),
        service: "shop/nfs".into(),
        cluster: "prod".into(),
        node: "node-b".into(),
        primary_node: "node-a".into(),
        peers: vec!["node-a".into(), "node-c".into()],
        vips: vec!["198.18.0.10/24".into(), "2001:db8::10/64".into()],
        interface: "eth0".into(),
        epoch: 7,
        config_checksum: "sha256:abc $(touch /tmp/kubeha-pwned) ;x".into(),
        params: vec![
            kubeha_crds::service::HookEnvVar {
                name: "DB_PORT".into(),
                value: "5432".into(),
            },
            kubeha_crds::service::HookEnvVar {
                name: "APP_ARGS".into(),
                value: "-v 'two words' $(touch /tmp/kubeha-pwned) ;x".into(),
            },
        ],
        run_as_user: None,
    }
}

fn dir_set(dir: &Path) -> HookSet {
    HookSet {
        dir: dir.to_owned(),
        layout: HookLayout::Directory,
    }
}

fn names(results: &[HookResult]) -> Vec<&str> {
    results.iter().map(|r| r.script.as_str()).collect()
}

/// Whether a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Whether a process is gone (or a zombie) within a second: SIGKILL is
/// delivered asynchronously, so a just-killed process may take a moment.
async fn dies(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    !alive(pid)
}

fn read_pid(path: &Path) -> i32 {
    fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

struct Fixture {
    hooks: TempDir,
    out: TempDir,
    _logs: TempDir,
    runner: HookRunner,
}

fn fixture() -> Fixture {
    let logs = tempfile::tempdir().expect("tempdir");
    Fixture {
        hooks: tempfile::tempdir().expect("tempdir"),
        out: tempfile::tempdir().expect("tempdir"),
        runner: HookRunner::new(logs.path().join("logs")),
        _logs: logs,
    }
}

/// Writes enter script `name` with `body` into the fixture's hook folder
/// and runs it once within `timeout`.
async fn run_enter(f: &Fixture, name: &str, body: &str, timeout: Duration) -> HookResult {
    let path = script(f.hooks.path(), name, body, 0o755);
    let s = Script {
        path,
        name: name.into(),
        action: Action::Enter,
    };
    f.runner.run_script(&s, &ctx(Action::Enter), timeout).await
}

#[test]
fn transitions_follow_the_node_and_the_action() {
    let master = Role::Master;
    assert_eq!(
        transition(Action::Enter, master, true),
        Some(Transition::TakeBack)
    );
    assert_eq!(
        transition(Action::Enter, master, false),
        Some(Transition::TakeOver)
    );
    assert_eq!(
        transition(Action::Leave, master, true),
        Some(Transition::GiveAway)
    );
    assert_eq!(
        transition(Action::Leave, master, false),
        Some(Transition::GiveBack)
    );
    assert_eq!(transition(Action::Monitor, master, true), None);
    assert_eq!(transition(Action::Periodic, master, false), None);
    // Standby starts and stops nothing: the primary node entering standby
    // is no takeback.
    for role in [Role::Vicemaster, Role::None] {
        for primary in [true, false] {
            for action in Action::ALL {
                assert_eq!(transition(action, role, primary), None, "{action} {role:?}");
            }
        }
    }
    assert_eq!(Transition::TakeOver.as_str(), "takeover");
    assert_eq!(Transition::GiveBack.to_string(), "giveback");
}

#[test]
fn actions_have_words_and_letters() {
    let words: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(words, ["enter", "leave", "monitor", "periodic"]);
    let letters: String = Action::ALL.iter().map(|a| a.prefix()).collect();
    assert_eq!(letters, "ELMP");
    for a in Action::ALL {
        assert_eq!(a.as_str().parse::<Action>().ok(), Some(a));
    }
    let err = "start".parse::<Action>().expect_err("unknown action");
    assert!(err.to_string().contains("\"start\""), "{err}");
    assert_eq!(role_str(Role::Vicemaster), "vicemaster");
    assert_eq!(role_str(Role::None), "none");
}

#[test]
fn overall_and_permanence() {
    let r = |outcome| HookResult {
        script: "E01x".into(),
        action: "enter".into(),
        exit_code: None,
        outcome,
        duration_ms: 0,
        finished_at: None,
        output_tail: vec![],
    };
    assert_eq!(overall(&[]), HookOutcome::Success);
    assert_eq!(
        overall(&[r(HookOutcome::Success), r(HookOutcome::Success)]),
        HookOutcome::Success
    );
    assert_eq!(
        overall(&[
            r(HookOutcome::Success),
            r(HookOutcome::ConfigError),
            r(HookOutcome::Failed)
        ]),
        HookOutcome::ConfigError
    );
    assert!(is_permanent(HookOutcome::IllegalCall));
    assert!(is_permanent(HookOutcome::ConfigError));
    for o in [
        HookOutcome::Success,
        HookOutcome::NotRunning,
        HookOutcome::Failed,
        HookOutcome::TimedOut,
        HookOutcome::Refused,
    ] {
        assert!(!is_permanent(o), "{o:?}");
    }
}

#[test]
fn a_permanent_outcome_raises_the_fail_count_to_the_migration_threshold() {
    // Exit 1 or 2: no retry on this node, whatever the threshold.
    for o in [HookOutcome::IllegalCall, HookOutcome::ConfigError] {
        assert_eq!(fail_count_after(o, 1, 3), 3, "{o:?}");
        assert_eq!(fail_count_after(o, 1, 1), 1, "{o:?}");
        assert_eq!(fail_count_after(o, 5, 3), 5, "{o:?}");
    }
    // Any other failure counts once: the operator may retry here until
    // the threshold is reached.
    for o in [
        HookOutcome::Failed,
        HookOutcome::TimedOut,
        HookOutcome::Refused,
        HookOutcome::NotRunning,
    ] {
        assert_eq!(fail_count_after(o, 1, 3), 1, "{o:?}");
    }
}

#[test]
fn log_paths_replace_slashes_and_stay_inside() {
    let runner = HookRunner::new("/var/log/kubeha");
    assert_eq!(
        runner.log_path("shop/nfs", "E01server"),
        Path::new("/var/log/kubeha/shop_nfs/E01server.log")
    );
    assert_eq!(
        runner.log_path("..", "E01x"),
        Path::new("/var/log/kubeha/_../E01x.log")
    );
    assert_eq!(runner.log_cap_bytes, 1024 * 1024);
    assert_eq!(runner.tail_lines, 10);
    assert_eq!(runner.kill_grace, Duration::from_secs(2));
}

#[tokio::test]
async fn directory_scripts_run_in_lexical_order_and_others_are_ignored() {
    let f = fixture();
    let trace = f.out.path().join("order");
    for name in [
        "E02client",
        "E01server",
        "E01backup",
        "L01stop",
        "M01check",
        "P01sweep",
        "README",
        "E1x",
        "E01",
        "E01server~",
        "E01server.bak",
        "e01lower",
    ] {
        script(
            f.hooks.path(),
            name,
            &format!("echo {name} >> '{}'", trace.display()),
            0o755,
        );
    }
    fs::create_dir(f.hooks.path().join("E03dir")).expect("mkdir");
    let set = dir_set(f.hooks.path());
    let listed = |a| -> Vec<String> {
        set.scripts(a)
            .expect("list")
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    assert_eq!(
        listed(Action::Enter),
        ["E01backup", "E01server", "E02client"]
    );
    assert_eq!(listed(Action::Leave), ["L01stop"]);
    assert_eq!(listed(Action::Monitor), ["M01check"]);
    assert_eq!(listed(Action::Periodic), ["P01sweep"]);

    let results = f
        .runner
        .run(&set, &ctx(Action::Enter), Duration::from_secs(5))
        .await;
    assert_eq!(names(&results), ["E01backup", "E01server", "E02client"]);
    assert!(results.iter().all(|r| r.outcome == HookOutcome::Success
        && r.exit_code == Some(0)
        && r.action == "enter"
        && r.finished_at.is_some()));
    assert_eq!(
        fs::read_to_string(&trace).expect("trace"),
        "E01backup\nE01server\nE02client\n"
    );
}

#[tokio::test]
async fn a_parameter_named_like_ours_cannot_replace_path_or_a_kubeha_variable() {
    // The API server and validate refuse these names; a spec stored before
    // the rules still must not change what the agent tells the scripts.
    let f = fixture();
    let out = f.out.path();
    script(
        f.hooks.path(),
        "E01env",
        &format!("env > '{}/env'", out.display()),
        0o755,
    );
    let mut c = ctx(Action::Enter);
    for (name, value) in [("PATH", "/tmp"), ("KUBEHA_NODE", "forged")] {
        c.params.push(kubeha_crds::service::HookEnvVar {
            name: name.into(),
            value: value.into(),
        });
    }
    let results = f
        .runner
        .run(&dir_set(f.hooks.path()), &c, Duration::from_secs(5))
        .await;
    assert_eq!(overall(&results), HookOutcome::Success, "{results:?}");
    let env = fs::read_to_string(out.join("env")).expect("env");
    assert!(
        env.lines().any(|l| l == format!("PATH={HOOK_PATH}")),
        "{env}"
    );
    assert!(env.lines().any(|l| l == "KUBEHA_NODE=node-b"), "{env}");
    assert!(
        !env.contains("forged") && !env.contains("PATH=/tmp"),
        "{env}"
    );
}

#[tokio::test]
async fn scripts_get_argv_the_kubeha_environment_and_the_services_parameters_only() {
    let f = fixture();
    let out = f.out.path();
    let path = script(
        f.hooks.path(),
        "E01env",
        &format!(
            "printf '%s\\n' \"$0\" \"$@\" > '{0}/argv'\nenv > '{0}/env'",
            out.display()
        ),
        0o755,
    );
    let results = f
        .runner
        .run(
            &dir_set(f.hooks.path()),
            &ctx(Action::Enter),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(overall(&results), HookOutcome::Success, "{results:?}");

    let argv = fs::read_to_string(out.join("argv")).expect("argv");
    assert_eq!(argv, format!("{}\nenter\nmaster\n", path.display()));

    let env: HashMap<String, String> = fs::read_to_string(out.join("env"))
        .expect("env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let want = [
        ("PATH", HOOK_PATH),
        ("KUBEHA_TRANSITION", "takeover"),
        ("KUBEHA_SERVICE", "shop/nfs"),
        ("KUBEHA_CLUSTER", "prod"),
        ("KUBEHA_NODE", "node-b"),
        ("KUBEHA_PRIMARY_NODE", "node-a"),
        ("KUBEHA_PEERS", "node-a,node-c"),
        ("KUBEHA_VIPS", "198.18.0.10/24,2001:db8::10/64"),
        ("KUBEHA_INTERFACE", "eth0"),
        ("KUBEHA_EPOCH", "7"),
        (
            "KUBEHA_CONFIG_CHECKSUM",
            "sha256:abc $(touch /tmp/kubeha-pwned) ;x",
        ),
        // The service's parameters (spec.hooks.env), as given.
        ("DB_PORT", "5432"),
        ("APP_ARGS", "-v 'two words' $(touch /tmp/kubeha-pwned) ;x"),
    ];
    for (k, v) in want {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    // Only what the shell itself adds may appear besides ours.
    for k in env.keys() {
        assert!(
            want.iter().any(|(w, _)| w == k)
                || ["PWD", "OLDPWD", "SHLVL", "_"].contains(&k.as_str()),
            "unexpected variable {k}"
        );
    }
    assert!(
        !Path::new("/tmp/kubeha-pwned").exists(),
        "a value went through a shell"
    );

    // No transition: the variable is there, empty.
    script(
        f.hooks.path(),
        "M01env",
        &format!("env > '{}/menv'", out.display()),
        0o755,
    );
    let results = f
        .runner
        .run(
            &dir_set(f.hooks.path()),
            &ctx(Action::Monitor),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(overall(&results), HookOutcome::Success, "{results:?}");
    let menv = fs::read_to_string(out.join("menv")).expect("menv");
    assert!(menv.lines().any(|l| l == "KUBEHA_TRANSITION="), "{menv}");
}

#[tokio::test]
async fn log_has_header_and_output_and_is_rotated_at_the_cap() {
    let mut f = fixture();
    f.runner.log_cap_bytes = 300;
    let body = "echo \"run-$KUBEHA_EPOCH $(printf 'x%.0s' $(seq 1 100))\"\necho to-stderr >&2";
    let path = script(f.hooks.path(), "E01log", body, 0o755);
    let s = Script {
        path,
        name: "E01log".into(),
        action: Action::Enter,
    };
    let log = f.runner.log_path("shop/nfs", "E01log");
    let old = log.with_file_name("E01log.log.1");
    let mut c = ctx(Action::Enter);

    c.epoch = 1;
    let r1 = f.runner.run_script(&s, &c, Duration::from_secs(5)).await;
    assert_eq!(r1.outcome, HookOutcome::Success, "{r1:?}");
    let text = fs::read_to_string(&log).expect("log");
    let header = text.lines().next().expect("header");
    assert!(
        header.contains(" enter master epoch=1 transition=takeover service=shop/nfs"),
        "{header}"
    );
    assert!(text.contains("run-1 xxxx"), "{text}");
    assert!(text.contains("to-stderr"), "{text}");
    assert!(!old.exists());
    assert_eq!(r1.output_tail.len(), 2, "{:?}", r1.output_tail);
    assert!(r1.output_tail[0].starts_with("run-1 "));
    assert_eq!(r1.output_tail[1], "to-stderr");

    c.epoch = 2;
    let r2 = f.runner.run_script(&s, &c, Duration::from_secs(5)).await;
    assert_eq!(r2.outcome, HookOutcome::Success);
    let text = fs::read_to_string(&log).expect("log");
    let rotated = fs::read_to_string(&old).expect("rotated log");
    assert!(text.contains("run-2") && !text.contains("run-1"), "{text}");
    assert!(
        rotated.contains("run-1") && !rotated.contains("run-2"),
        "{rotated}"
    );
    // The tail is this run's output only.
    assert!(r2.output_tail.iter().all(|l| !l.contains("run-1")));

    c.epoch = 3;
    f.runner.run_script(&s, &c, Duration::from_secs(5)).await;
    let rotated = fs::read_to_string(&old).expect("rotated log");
    assert!(
        rotated.contains("run-2") && !rotated.contains("run-1"),
        "one old file only"
    );
    assert!(fs::metadata(&log).expect("log").len() <= 300);
}

#[tokio::test]
async fn tail_keeps_the_last_lines_and_at_most_the_schema_limit() {
    let f = fixture();
    let r = run_enter(&f, "E01many", "seq 1 30", Duration::from_secs(5)).await;
    let want: Vec<String> = (21..=30).map(|n| n.to_string()).collect();
    assert_eq!(r.output_tail, want);

    let wide = Fixture {
        runner: f.runner.clone().with_tail_lines(100),
        ..f
    };
    let r = run_enter(&wide, "E01many", "seq 1 30", Duration::from_secs(5)).await;
    assert_eq!(r.output_tail.len(), MAX_TAIL_LINES);
    assert_eq!(r.output_tail.last().map(String::as_str), Some("30"));
}

#[tokio::test]
async fn exit_codes_map_onto_outcomes() {
    let f = fixture();
    let cases = [
        (Action::Enter, 0, HookOutcome::Success),
        (Action::Enter, 1, HookOutcome::IllegalCall),
        (Action::Enter, 2, HookOutcome::ConfigError),
        (Action::Enter, 3, HookOutcome::Failed),
        (Action::Enter, 7, HookOutcome::Failed),
        (Action::Leave, 42, HookOutcome::Failed),
        (Action::Monitor, 0, HookOutcome::Success),
        (Action::Monitor, 7, HookOutcome::NotRunning),
        (Action::Monitor, 3, HookOutcome::Failed),
        (Action::Monitor, 2, HookOutcome::ConfigError),
    ];
    for (action, code, want) in cases {
        let name = format!("{}01exit{code}", action.prefix());
        let path = script(f.hooks.path(), &name, &format!("exit {code}"), 0o755);
        let s = Script { path, name, action };
        let r = f
            .runner
            .run_script(&s, &ctx(action), Duration::from_secs(5))
            .await;
        assert_eq!(
            (r.outcome, r.exit_code),
            (want, Some(code)),
            "{action} exit {code}"
        );
        assert_eq!(r.action, action.as_str());
    }
    let r = run_enter(&f, "E01signal", "kill -KILL $$", Duration::from_secs(5)).await;
    assert_eq!((r.outcome, r.exit_code), (HookOutcome::Failed, None));
    assert!(r.output_tail.iter().any(|l| l.contains("SIGKILL")), "{r:?}");
}

#[tokio::test]
async fn enter_stops_at_the_first_failure_and_leave_goes_on() {
    let f = fixture();
    let out = f.out.path();
    for (name, code) in [
        ("E01ok", 0),
        ("E02bad", 3),
        ("E03late", 0),
        ("L01bad", 3),
        ("L02late", 0),
    ] {
        script(
            f.hooks.path(),
            name,
            &format!("touch '{}/{name}'\nexit {code}", out.display()),
            0o755,
        );
    }
    let set = dir_set(f.hooks.path());
    let t = Duration::from_secs(5);
    let enter = f.runner.run(&set, &ctx(Action::Enter), t).await;
    assert_eq!(names(&enter), ["E01ok", "E02bad"]);
    assert_eq!(overall(&enter), HookOutcome::Failed);
    assert!(!out.join("E03late").exists(), "E03late must not run");

    let leave = f.runner.run(&set, &ctx(Action::Leave), t).await;
    assert_eq!(names(&leave), ["L01bad", "L02late"]);
    assert_eq!(leave[1].outcome, HookOutcome::Success);
    assert_eq!(overall(&leave), HookOutcome::Failed);
    assert!(out.join("L02late").exists(), "L02late must run");
}

/// Runs a hanging script with a 1 s timeout; returns the result, how long
/// it took, and the pid of the child it spawned.
async fn run_hanging(f: &Fixture, name: &str, body: &str) -> (HookResult, Duration, i32) {
    let pidfile = f.out.path().join(format!("{name}.child"));
    let body = body.replace("PIDFILE", &pidfile.display().to_string());
    let path = script(f.hooks.path(), name, &body, 0o755);
    let s = Script {
        path,
        name: name.into(),
        action: Action::Enter,
    };
    let started = Instant::now();
    let r = f
        .runner
        .run_script(&s, &ctx(Action::Enter), Duration::from_secs(1))
        .await;
    (r, started.elapsed(), read_pid(&pidfile))
}

#[tokio::test]
async fn timeout_kills_the_script_and_its_children() {
    let f = fixture();
    let (r, took, child) = run_hanging(
        &f,
        "E01hang",
        "sleep 1000 &\necho $! > 'PIDFILE'\nsleep 1000\nwait",
    )
    .await;
    assert_eq!(
        (r.outcome, r.exit_code),
        (HookOutcome::TimedOut, None),
        "{r:?}"
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_millis(1000 + 2000 + 1500), "{took:?}");
    assert!(dies(child).await, "child {child} survived");
    assert!(
        r.output_tail.iter().any(|l| l.contains("timed out")),
        "{r:?}"
    );
    assert_eq!(f.runner.running(), 0);
}

#[tokio::test]
async fn timeout_escalates_to_sigkill_when_sigterm_is_ignored() {
    let f = fixture();
    let (r, took, child) = run_hanging(
        &f,
        "E01deaf",
        "trap '' TERM\nsleep 1000 &\necho $! > 'PIDFILE'\nsleep 1000\nwait",
    )
    .await;
    assert_eq!(r.outcome, HookOutcome::TimedOut, "{r:?}");
    // Default grace 2 s: SIGKILL only after it.
    assert!(took >= Duration::from_millis(2900), "{took:?}");
    assert!(took < Duration::from_millis(1000 + 2000 + 1500), "{took:?}");
    assert!(dies(child).await, "child {child} survived");
}

#[tokio::test]
async fn leftover_group_members_are_killed_when_the_script_exits_on_sigterm() {
    let f = fixture();
    let (r, took, child) = run_hanging(
        &f,
        "E01orphan",
        "(trap '' TERM; exec sleep 1000) &\necho $! > 'PIDFILE'\nsleep 1000",
    )
    .await;
    assert_eq!(r.outcome, HookOutcome::TimedOut, "{r:?}");
    // The script died at SIGTERM: no need to wait for the whole grace.
    assert!(took < Duration::from_millis(1000 + 1500), "{took:?}");
    assert!(dies(child).await, "child {child} survived");
}

#[tokio::test]
async fn unsafe_scripts_are_refused_and_never_run() {
    let f = fixture();
    let marker = f.out.path().join("ran");
    let path = script(
        f.hooks.path(),
        "E01open",
        &format!("touch '{}'", marker.display()),
        0o775,
    );
    let results = f
        .runner
        .run(
            &dir_set(f.hooks.path()),
            &ctx(Action::Enter),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!((r.outcome, r.exit_code), (HookOutcome::Refused, None));
    let reason = r.output_tail.join("\n");
    assert!(reason.contains(&path.display().to_string()), "{reason}");
    assert!(reason.contains("group-writable"), "{reason}");
    assert!(reason.contains("chmod g-w,o-w"), "{reason}");
    assert!(!marker.exists(), "a refused script ran");
    let log = fs::read_to_string(f.runner.log_path("shop/nfs", "E01open")).expect("log");
    assert!(log.contains("refused"), "{log}");
}

#[test]
fn check_script_names_each_problem_and_its_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let good = script(d, "good", "true", 0o755);
    check_script(&good).expect("a root-owned 0755 script is fine");

    let err = |p: &Path| check_script(p).expect_err("refused").to_string();
    let noexec = script(d, "noexec", "true", 0o644);
    let e = err(&noexec);
    assert!(
        e.contains("not executable") && e.contains("chmod u+x"),
        "{e}"
    );

    let world = script(d, "world", "true", 0o757);
    let e = err(&world);
    assert!(
        e.contains("writable by others") && !e.contains("group"),
        "{e}"
    );

    let both = script(d, "both", "true", 0o777);
    assert!(err(&both).contains("group-writable and writable by others"));

    let owned = script(d, "owned", "true", 0o755);
    std::os::unix::fs::chown(&owned, Some(1000), None).expect("chown");
    let e = err(&owned);
    assert!(e.contains("uid 1000") && e.contains("chown root"), "{e}");

    let link = d.join("link");
    symlink(&good, &link).expect("symlink");
    check_script(&link).expect("a symlink to a good script is fine");

    let sub = d.join("sub");
    fs::create_dir(&sub).expect("mkdir");
    let to_dir = d.join("to-dir");
    symlink(&sub, &to_dir).expect("symlink");
    assert!(err(&to_dir).contains("directory"));

    let dangling = d.join("dangling");
    symlink(d.join("nowhere"), &dangling).expect("symlink");
    assert!(matches!(
        check_script(&dangling),
        Err(HookError::NotFound { .. })
    ));
    assert!(matches!(
        check_script(&d.join("absent")),
        Err(HookError::NotFound { .. })
    ));

    // The directory holding the script must not be writable by others,
    // unless it is sticky.
    let inner = script(&sub, "inner", "true", 0o755);
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o777)).expect("chmod");
    let e = err(&inner);
    assert!(e.contains(&format!("directory {}", sub.display())), "{e}");
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o1777)).expect("chmod");
    check_script(&inner).expect("sticky directory is fine");
}

#[tokio::test]
async fn single_script_is_called_with_action_and_role() {
    let f = fixture();
    let calls = f.out.path().join("calls");
    script(
        f.hooks.path(),
        "ha.sh",
        &format!("echo \"$@\" >> '{}'", calls.display()),
        0o755,
    );
    let set = HookSet {
        dir: f.hooks.path().to_owned(),
        layout: HookLayout::SingleScript("ha.sh".into()),
    };
    let mut leave = ctx(Action::Leave);
    leave.role = Role::Vicemaster;
    let r = f.runner.run(&set, &leave, Duration::from_secs(5)).await;
    assert_eq!(names(&r), ["ha.sh"]);
    assert_eq!(r[0].outcome, HookOutcome::Success);
    let r = f
        .runner
        .run(&set, &ctx(Action::Monitor), Duration::from_secs(5))
        .await;
    assert_eq!(r[0].action, "monitor");
    assert_eq!(
        fs::read_to_string(&calls).expect("calls"),
        "leave vicemaster\nmonitor master\n"
    );

    for bad in ["", "../ha.sh", "a/b", ".."] {
        let set = HookSet {
            dir: f.hooks.path().to_owned(),
            layout: HookLayout::SingleScript(bad.into()),
        };
        assert!(matches!(
            set.scripts(Action::Enter),
            Err(HookError::InvalidScriptName { .. })
        ));
        let r = f
            .runner
            .run(&set, &ctx(Action::Enter), Duration::from_secs(5))
            .await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].outcome, HookOutcome::Refused);
    }
}

#[tokio::test]
async fn listing_and_start_failures_are_refusals() {
    let f = fixture();
    let missing = f.hooks.path().join("missing");
    let r = f
        .runner
        .run(
            &dir_set(&missing),
            &ctx(Action::Enter),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].outcome, HookOutcome::Refused);
    assert!(r[0].output_tail[0].contains(&missing.display().to_string()));

    // No interpreter line: execve fails, nothing is run through a shell.
    let path = f.hooks.path().join("E01noshebang");
    fs::write(&path, "echo hi\n").expect("write");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    let r = f
        .runner
        .run(
            &dir_set(f.hooks.path()),
            &ctx(Action::Enter),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(r[0].outcome, HookOutcome::Refused, "{r:?}");
    assert!(r[0].output_tail[0].contains("could not start"), "{r:?}");
    assert_eq!(f.runner.running(), 0);
}

async fn wait_running(runner: &HookRunner, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while runner.running() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kill_all_fences_running_hooks_and_stops_the_run() {
    let f = fixture();
    let out = f.out.path();
    script(
        f.hooks.path(),
        "L01hang",
        &format!(
            "sleep 1000 &\necho $! > '{}/child'\nsleep 1000",
            out.display()
        ),
        0o755,
    );
    script(
        f.hooks.path(),
        "L02after",
        &format!("touch '{}/after'", out.display()),
        0o755,
    );
    let set = dir_set(f.hooks.path());
    let started = Instant::now();
    let leave = ctx(Action::Leave);
    let (results, killed) =
        tokio::join!(f.runner.run(&set, &leave, Duration::from_secs(30)), async {
            wait_running(&f.runner, 1).await;
            // Let the script get as far as writing its child's pid.
            tokio::time::sleep(Duration::from_millis(200)).await;
            f.runner.clone().kill_all()
        });
    assert_eq!(killed, 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(names(&results), ["L01hang", "L02after"]);
    assert_eq!(
        (results[0].outcome, results[0].exit_code),
        (HookOutcome::Failed, None)
    );
    assert_eq!(results[1].outcome, HookOutcome::Refused);
    assert!(results[1].output_tail[0].contains("fenced"));
    assert!(
        !out.join("after").exists(),
        "a script started after the fence"
    );
    assert!(dies(read_pid(&out.join("child"))).await);
    assert_eq!(f.runner.running(), 0);
    assert_eq!(f.runner.kill_all(), 0);

    // A new run after the fence works again.
    let r = f
        .runner
        .run(&set, &ctx(Action::Enter), Duration::from_secs(5))
        .await;
    assert!(r.is_empty());
    let s = Script {
        path: f.hooks.path().join("L02after"),
        name: "L02after".into(),
        action: Action::Leave,
    };
    let r = f
        .runner
        .run_script(&s, &ctx(Action::Leave), Duration::from_secs(5))
        .await;
    assert_eq!(r.outcome, HookOutcome::Success);
}

#[tokio::test]
async fn dropping_a_run_kills_its_process_group() {
    let f = fixture();
    let pidfile = f.out.path().join("pid");
    let path = script(
        f.hooks.path(),
        "E01slow",
        &format!("echo $$ > '{}'\nsleep 1000", pidfile.display()),
        0o755,
    );
    let s = Script {
        path,
        name: "E01slow".into(),
        action: Action::Enter,
    };
    let c = ctx(Action::Enter);
    let abandoned = tokio::time::timeout(
        Duration::from_millis(500),
        f.runner.run_script(&s, &c, Duration::from_secs(30)),
    )
    .await;
    assert!(abandoned.is_err());
    assert_eq!(f.runner.running(), 0);
    let pid = read_pid(&pidfile);
    assert!(dies(pid).await, "abandoned hook {pid} still runs");
}

/// A "host" for the test: a process in mount, UTS and IPC namespaces of its
/// own (hostname `kubeha-host`), in this test's PID namespace, as the host's
/// init is for an agent pod with `hostPID`. Killed on drop.
struct FakeHost(std::process::Child);

impl FakeHost {
    fn start() -> Option<FakeHost> {
        let child = std::process::Command::new("unshare")
            .args(["--mount", "--uts", "--ipc", "--propagation", "private"])
            .args(["sh", "-c", "hostname kubeha-host && exec sleep 60"])
            .spawn()
            .ok()?;
        let host = FakeHost(child);
        // Ready once `exec sleep` replaced the shell, after `hostname` ran.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let cmd =
                fs::read_to_string(format!("/proc/{}/cmdline", host.pid())).unwrap_or_default();
            if cmd.starts_with("sleep") {
                return Some(host);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("pid")
    }

    fn ns(&self, kind: &str) -> String {
        fs::read_link(format!("/proc/{}/ns/{kind}", self.pid()))
            .expect("namespace link")
            .display()
            .to_string()
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs one enter script, whose body `body(out)` writes into the folder
/// `out`, through a runner placed with `namespaces` and `host`; asserts it
/// succeeded and returns `out`.
async fn enter_placed(
    namespaces: crate::host_namespaces::HookNamespaces,
    host: &FakeHost,
    body: impl Fn(&Path) -> String,
) -> TempDir {
    let placement = HookPlacement {
        cgroup: None,
        namespaces,
        host_pid: host.pid(),
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let runner = placement
        .runner(logs.path().join("logs"))
        .expect("host namespaces open");
    let hooks = tempfile::tempdir().expect("tempdir");
    let out = tempfile::tempdir().expect("tempdir");
    script(hooks.path(), "E01where", &body(out.path()), 0o755);
    let results = runner
        .run(
            &dir_set(hooks.path()),
            &ctx(Action::Enter),
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(overall(&results), HookOutcome::Success, "{results:?}");
    out
}

#[tokio::test]
async fn hooks_run_in_the_host_namespaces_and_the_daemon_they_start_is_a_host_process() {
    let host = FakeHost::start()
        .expect("unshare (util-linux) starts a process in new namespaces; needs root");
    // The script reports where it runs, and starts a daemon that leaves its
    // process group, as an init script does.
    let out = enter_placed(crate::host_namespaces::HookNamespaces::Host, &host, |o| {
        let o = o.display();
        format!(
            "hostname > '{o}/hostname'\n\
             for n in mnt uts ipc net pid; do echo \"$n $(readlink /proc/self/ns/$n)\"; done > '{o}/ns'\n\
             pwd > '{o}/pwd'\n\
             setsid sh -c 'echo $$ > {o}/daemon; exec sleep 60' </dev/null >/dev/null 2>&1 &\n\
             while [ ! -s '{o}/daemon' ]; do sleep 0.01; done"
        )
    })
    .await;

    assert_eq!(
        fs::read_to_string(out.path().join("hostname"))
            .unwrap()
            .trim(),
        "kubeha-host"
    );
    assert_eq!(
        fs::read_to_string(out.path().join("pwd")).unwrap().trim(),
        "/"
    );
    let ns: HashMap<String, String> = fs::read_to_string(out.path().join("ns"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let own = |kind: &str| {
        fs::read_link(format!("/proc/self/ns/{kind}"))
            .unwrap()
            .display()
            .to_string()
    };
    for kind in ["mnt", "uts", "ipc"] {
        assert_eq!(ns[kind], host.ns(kind), "{kind}: the host's");
        assert_ne!(ns[kind], own(kind), "{kind}: not the agent's");
    }
    // The network namespace stays the agent's (hostNetwork: the host's).
    assert_eq!(ns["net"], own("net"));
    assert_eq!(ns["pid"], own("pid"));
    // The daemon the hook started lives on in the host's namespaces after
    // the hook ended.
    let daemon = read_pid(&out.path().join("daemon"));
    assert!(alive(daemon), "the daemon outlives its hook");
    let daemon_mnt = fs::read_link(format!("/proc/{daemon}/ns/mnt"))
        .unwrap()
        .display()
        .to_string();
    assert_eq!(daemon_mnt, host.ns("mnt"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[tokio::test]
async fn container_mode_keeps_hooks_in_the_agent_namespaces() {
    let host = FakeHost::start().expect("unshare starts a process in new namespaces; needs root");
    let out = enter_placed(
        crate::host_namespaces::HookNamespaces::Container,
        &host,
        |o| format!("readlink /proc/self/ns/uts > '{}/uts'", o.display()),
    )
    .await;
    let own = fs::read_link("/proc/self/ns/uts")
        .unwrap()
        .display()
        .to_string();
    assert_eq!(
        fs::read_to_string(out.path().join("uts")).unwrap().trim(),
        own
    );
}

#[test]
fn host_mode_without_the_host_pid_namespace_fails_naming_the_fix() {
    // A process in a PID namespace of its own stands for a host the agent
    // does not share PIDs with (no hostPID).
    let mut child = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "sleep", "60"])
        .spawn()
        .expect("unshare");
    // The forked `sleep` is the one in the new PID namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut inner = None;
    while inner.is_none() && Instant::now() < deadline {
        inner = fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))
            .ok()
            .and_then(|c| {
                c.split_whitespace()
                    .next()
                    .and_then(|p| p.parse::<i32>().ok())
            });
        std::thread::sleep(Duration::from_millis(10));
    }
    let placement = HookPlacement {
        cgroup: None,
        namespaces: crate::host_namespaces::HookNamespaces::Host,
        host_pid: inner.expect("the forked child of unshare"),
    };
    let err = placement
        .runner("/tmp/kubeha-test-logs".into())
        .unwrap_err()
        .to_string();
    let _ = child.kill();
    let _ = child.wait();
    assert!(err.contains("another PID namespace"), "{err}");
    assert!(err.contains("hostPID"), "{err}");
    assert!(err.contains("--hook-namespaces container"), "{err}");
}

#[tokio::test]
async fn the_reset_hook_is_checked_runs_in_the_host_namespaces_with_a_clean_environment_and_a_timeout()
 {
    let host = FakeHost::start().expect("unshare starts a process in new namespaces; needs root");
    let placement = HookPlacement {
        cgroup: None,
        namespaces: crate::host_namespaces::HookNamespaces::Host,
        host_pid: host.pid(),
    };
    let logs = tempfile::tempdir().expect("tempdir");
    let runner = placement.runner(logs.path().join("logs")).expect("runner");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("reset-hook.log");
    let reset = script(
        dir.path(),
        "reset",
        "echo \"args=$* uts=$(readlink /proc/self/ns/uts) vars=$(env | grep -cv '^PWD=\\|^SHLVL=\\|^_=')\"",
        0o755,
    );
    let ended = runner.run_reset(&reset, &log, Duration::from_secs(5)).await;
    assert!(ended.contains("exit status: 0"), "{ended}");
    let out = fs::read_to_string(&log).unwrap();
    assert!(out.contains("args=fence "), "{out}");
    assert!(out.contains(&format!("uts={}", host.ns("uts"))), "{out}");
    // PATH only (the shell adds PWD, SHLVL and _ itself).
    assert!(out.trim_end().ends_with("vars=1"), "{out}");

    let unsafe_reset = script(
        dir.path(),
        "reset-writable",
        "touch /tmp/kubeha-reset-ran",
        0o777,
    );
    let ended = runner
        .run_reset(&unsafe_reset, &log, Duration::from_secs(5))
        .await;
    assert!(ended.starts_with("refused, not run"), "{ended}");

    let hanging = script(dir.path(), "reset-hangs", "sleep 600", 0o755);
    let started = Instant::now();
    let ended = runner
        .run_reset(&hanging, &log, Duration::from_millis(300))
        .await;
    assert!(ended.contains("timed out after 300 ms"), "{ended}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

// ---- Trust boundaries (issue 9): the path walk, the source gate, the
// ---- output cap, ConfigMap scripts per namespace/name.

#[test]
fn the_check_walks_every_directory_from_the_root_and_refuses_symlinks_out_of_it() {
    let top = tempfile::tempdir().expect("tempdir");
    let root = top.path().join("hooks");
    let team = root.join("team-a").join("nfs");
    fs::create_dir_all(&team).expect("mkdir");
    let good = script(&team, "E01start", "true", 0o755);
    check_script_at(Path::new("/"), &good, Some(&root)).expect("a clean path is fine");

    // A group-writable directory two levels up is named with its fix.
    let team_a = root.join("team-a");
    fs::set_permissions(&team_a, fs::Permissions::from_mode(0o775)).expect("chmod");
    let e = check_script_at(Path::new("/"), &good, Some(&root))
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains(&format!("directory {} on the way", team_a.display()))
            && e.contains("group-writable")
            && e.contains("chmod g-w,o-w"),
        "{e}"
    );
    fs::set_permissions(&team_a, fs::Permissions::from_mode(0o755)).expect("chmod");

    // The hook root itself owned by someone else.
    std::os::unix::fs::chown(&root, Some(1000), None).expect("chown");
    let e = check_script_at(Path::new("/"), &good, Some(&root))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("uid 1000") && e.contains("chown root"), "{e}");
    std::os::unix::fs::chown(&root, Some(0), None).expect("chown");

    // A symlink out of the root, to a script that is fine in itself.
    let outside = top.path().join("elsewhere");
    fs::create_dir(&outside).expect("mkdir");
    let foreign = script(&outside, "E01x", "true", 0o755);
    let link = team.join("E02link");
    symlink(&foreign, &link).expect("symlink");
    let e = check_script_at(Path::new("/"), &link, Some(&root))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("leads out of the hook root"), "{e}");
    // A directory symlink out of the root is caught the same way.
    let dir_link = root.join("team-b");
    symlink(&outside, &dir_link).expect("symlink");
    assert!(
        check_script_at(Path::new("/"), &dir_link.join("E01x"), Some(&root)).is_err(),
        "a directory link out of the root"
    );
    // A symlink that stays inside the root is fine.
    let inside = team.join("E03inside");
    symlink("E01start", &inside).expect("symlink");
    check_script_at(Path::new("/"), &inside, Some(&root)).expect("inside the root");
}

#[test]
fn the_check_reads_the_hosts_files_through_a_base_and_resolves_links_inside_it() {
    // `base` stands for /proc/<pid>/root: an absolute link target starts
    // again at base, not at the agent's own `/`.
    let base = tempfile::tempdir().expect("tempdir");
    let b = base.path();
    fs::create_dir_all(b.join("usr/sbin")).expect("mkdir");
    script(&b.join("usr/sbin"), "reset", "true", 0o755);
    symlink("/usr/sbin", b.join("sbin")).expect("symlink");
    check_script_at(b, Path::new("/sbin/reset"), None).expect("through the base");
    fs::set_permissions(b.join("usr"), fs::Permissions::from_mode(0o757)).expect("chmod");
    let e = check_script_at(b, Path::new("/sbin/reset"), None)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("directory /usr on the way"), "{e}");
    assert!(matches!(
        check_script_at(b, Path::new("/sbin/absent"), None),
        Err(HookError::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_hook_printing_without_end_logs_only_the_cap_and_is_not_blocked() {
    let mut f = fixture();
    f.runner.log_cap_bytes = 64 * 1024;
    // 50 MB, then a last line: the script must get through all of it.
    let body = "head -c 50000000 /dev/zero | tr '\\0' y\necho; echo last-line";
    let started = Instant::now();
    let r = run_enter(&f, "E01loud", body, Duration::from_secs(60)).await;
    assert_eq!(r.outcome, HookOutcome::Success, "{r:?}");
    let log = f.runner.log_path("shop/nfs", "E01loud");
    let size = fs::metadata(&log).expect("log").len();
    assert!(
        size <= 64 * 1024 + 1024,
        "log is {size} bytes, over the 64 KiB cap (+ header and footer)"
    );
    let note = r
        .output_tail
        .iter()
        .find(|l| l.contains("past the log cap"))
        .unwrap_or_else(|| panic!("no cap note in {:?}", r.output_tail));
    assert!(note.contains("65536 bytes logged"), "{note}");
    // The tail is the end of the output, not of the log.
    assert!(
        r.output_tail.iter().any(|l| l == "last-line"),
        "{:?}",
        r.output_tail
    );
    for line in &r.output_tail {
        assert!(line.len() <= MAX_LINE_BYTES, "{} bytes", line.len());
    }
    eprintln!(
        "50 MB of output: {size} bytes logged, run took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn tails_are_cut_by_bytes_on_character_boundaries_and_escaped() {
    let f = fixture();
    let body = "i=0; while [ $i -lt 1500 ]; do printf 'é'; i=$((i+1)); done; echo\nprintf 'red:\\033[31m bell:\\007 bidi:\\342\\200\\256 end\\n'";
    let r = run_enter(&f, "E01odd", body, Duration::from_secs(10)).await;
    assert_eq!(r.output_tail.len(), 2, "{:?}", r.output_tail);
    let long = &r.output_tail[0];
    assert!(long.len() <= MAX_LINE_BYTES && long.len() > MAX_LINE_BYTES - 8);
    assert!(long.ends_with('…') && long.starts_with("éé"), "{long}");
    assert_eq!(
        r.output_tail[1],
        "red:\\x1b[31m bell:\\x07 bidi:\\u{202e} end"
    );
    // Clipping never splits a character, however small the limit.
    for max in 0..12 {
        let c = runlog::clip_to("ééééé\u{7}é", max);
        assert!(c.len() <= max.max(3), "{max}: {c:?}");
    }
}

/// A runner whose gate is on: hook root `root`, ConfigMaps under `state`,
/// no API client, cluster `prod` granting namespace `shop` the directory
/// `shop` and its own ConfigMap `hooks`.
fn gated(f: &Fixture, state: &Path) -> HookRunner {
    use kubeha_crds::cluster::AllowedHookSources;
    use kubeha_crds::hook_policy::NamespaceHookSources;
    let runner = f.runner.clone();
    runner.configure_sources(SourceRoots {
        hook_root: f.hooks.path().to_owned(),
        state_dir: state.to_owned(),
        operator_namespace: "kubeha-system".into(),
        client: None,
    });
    runner.set_hook_policy(
        "prod",
        &AllowedHookSources {
            namespaces: vec![NamespaceHookSources {
                namespace: "shop".into(),
                host_paths: vec!["shop".into()],
                config_maps: Vec::new(),
                own_config_maps: vec!["hooks".into()],
                run_as_users: vec!["65534".into()],
            }],
        },
    );
    runner
}

#[tokio::test]
async fn the_gate_runs_nothing_from_a_directory_or_configmap_the_policy_did_not_give() {
    let f = fixture();
    let state = tempfile::tempdir().expect("tempdir");
    let runner = gated(&f, state.path());
    let ran = f.out.path().join("ran");
    let body = format!("echo \"$0\" >> '{}'", ran.display());
    for dir in ["shop", "other-team"] {
        let d = f.hooks.path().join(dir);
        fs::create_dir(&d).expect("mkdir");
        script(&d, "E01mark", &body, 0o755);
    }
    let t = Duration::from_secs(5);

    let other = runner
        .run(
            &dir_set(&f.hooks.path().join("other-team")),
            &ctx(Action::Enter),
            t,
        )
        .await;
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].outcome, HookOutcome::Refused, "{other:?}");
    assert!(
        other[0].output_tail[0].contains("does not give that directory to namespace shop"),
        "{other:?}"
    );
    assert!(!ran.exists(), "a refused source ran a script");

    // Another cluster's service: no policy known, nothing runs.
    let mut c = ctx(Action::Enter);
    c.cluster = "unknown".into();
    let r = runner
        .run(&dir_set(&f.hooks.path().join("shop")), &c, t)
        .await;
    assert_eq!(r[0].outcome, HookOutcome::Refused);
    assert!(r[0].output_tail[0].contains("not known"), "{r:?}");
    assert!(!ran.exists());

    // A ConfigMap the policy does not give, and one it gives that cannot
    // be fetched (no client): nothing runs either way.
    let named = state.path().join("configmap-hooks");
    let r = runner
        .run(
            &dir_set(&named.join("team-b-hooks")),
            &ctx(Action::Enter),
            t,
        )
        .await;
    assert!(
        r[0].output_tail[0].contains("does not give that ConfigMap"),
        "{r:?}"
    );
    let r = runner
        .run(&dir_set(&named.join("hooks")), &ctx(Action::Enter), t)
        .await;
    assert_eq!(r[0].outcome, HookOutcome::Refused);
    assert!(r[0].output_tail[0].contains("cannot be fetched"), "{r:?}");
    assert!(!ran.exists());

    // The granted directory runs.
    let ok = runner
        .run(
            &dir_set(&f.hooks.path().join("shop")),
            &ctx(Action::Enter),
            t,
        )
        .await;
    assert_eq!(ok[0].outcome, HookOutcome::Success, "{ok:?}");
    assert!(ran.exists());
}

fn config_map(data: &[(&str, &str)]) -> k8s_openapi::api::core::v1::ConfigMap {
    k8s_openapi::api::core::v1::ConfigMap {
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[test]
fn configmap_scripts_get_a_directory_per_namespace_and_name_replaced_whole() {
    let state = tempfile::tempdir().expect("tempdir");
    let root = state.path().join("hook-configmaps");
    let a = write_config_map(&root, "team-a", "hooks", &config_map(&[("E01a", "echo a")]))
        .expect("written");
    let b = write_config_map(&root, "team-b", "hooks", &config_map(&[("E01b", "echo b")]))
        .expect("written");
    assert_ne!(a, b);
    assert_eq!(fs::read_to_string(a.join("E01a")).unwrap(), "echo a");
    assert_eq!(fs::read_to_string(b.join("E01b")).unwrap(), "echo b");
    assert!(
        !a.join("E01b").exists(),
        "one namespace's scripts in another's"
    );
    check_script_at(Path::new("/"), &a.join("E01a"), Some(&root)).expect("written safe");

    // A new version replaces the whole directory: a key gone is gone.
    let a2 = write_config_map(
        &root,
        "team-a",
        "hooks",
        &config_map(&[("E02new", "echo 2")]),
    )
    .expect("written");
    assert_eq!(a2, a);
    assert!(!a.join("E01a").exists() && a.join("E02new").exists());
    let leftovers: Vec<_> = fs::read_dir(root.join("team-a"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("hooks")]);

    // Refused whole, nothing written: binaryData, odd keys, big scripts.
    let mut binary = config_map(&[("E01a", "echo a")]);
    binary.binary_data = Some(
        [("E02bin".to_string(), k8s_openapi::ByteString(vec![0, 1, 2]))]
            .into_iter()
            .collect(),
    );
    let e = write_config_map(&root, "team-c", "hooks", &binary).expect_err("refused");
    assert!(e.contains("binaryData") && e.contains("E02bin"), "{e}");
    let big = "#".repeat(MAX_CONFIG_MAP_SCRIPT_BYTES + 1);
    let e = write_config_map(&root, "team-c", "hooks", &config_map(&[("E01big", &big)]))
        .expect_err("refused");
    assert!(e.contains("E01big") && e.contains("bytes"), "{e}");
    let e = write_config_map(&root, "team-c", "hooks", &config_map(&[(".hidden", "x")]))
        .expect_err("refused");
    assert!(e.contains(".hidden"), "{e}");
    assert!(!root.join("team-c").join("hooks").exists());
}

/// `spec.hooks.runAsUser`: the script runs with the user's id, its primary
/// group alone (no supplementary groups) and `HOME` its home; a script the
/// user cannot read and execute is refused naming the field and the fix;
/// an id the policy does not allow runs nothing. The agent keeps writing
/// the log (it reads the script's output through pipes).
#[tokio::test]
async fn scripts_run_as_the_allowed_user_with_its_group_alone_and_its_home() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let f = fixture();
    let state = tempfile::tempdir().expect("tempdir");
    let runner = gated(&f, state.path());
    // The user must reach the script: the folders are 0755 (a tempdir is 0700).
    let shop = f.hooks.path().join("shop");
    fs::create_dir(&shop).expect("mkdir");
    for d in [f.hooks.path(), shop.as_path()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    script(
        &shop,
        "E01id",
        "echo \"uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME\"",
        0o755,
    );
    let mut c = ctx(Action::Enter);
    c.run_as_user = Some(65534);
    let want = RunAs::of(65534);
    let t = Duration::from_secs(5);
    let r = runner.run(&dir_set(&shop), &c, t).await;
    assert_eq!(r[0].outcome, HookOutcome::Success, "{r:?}");
    assert_eq!(
        r[0].output_tail,
        [format!(
            "uid=65534 gid={} groups={} home={}",
            want.gid,
            want.gid,
            want.home.display()
        )]
    );
    let log = fs::read_to_string(runner.log_path(&c.service, "E01id")).expect("log");
    assert!(log.contains("uid=65534"), "{log}");

    // Not readable and executable by the user: refused, not run.
    script(&shop, "E01id", "echo ran", 0o750);
    let r = runner.run(&dir_set(&shop), &c, t).await;
    assert_eq!(r[0].outcome, HookOutcome::Refused, "{r:?}");
    assert!(
        r[0].output_tail[0].contains("spec.hooks.runAsUser")
            && r[0].output_tail[0].contains("chmod o+rx"),
        "{r:?}"
    );

    // An id the policy does not give namespace shop: nothing runs.
    script(&shop, "E01id", "echo ran", 0o755);
    c.run_as_user = Some(1000);
    let r = runner.run(&dir_set(&shop), &c, t).await;
    assert_eq!(r[0].outcome, HookOutcome::Refused, "{r:?}");
    assert!(
        r[0].output_tail[0].contains("spec.hooks.runAsUser 1000")
            && r[0].output_tail[0].contains("runAsUsers"),
        "{r:?}"
    );
}
