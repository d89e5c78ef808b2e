//! The built `kubectl ha` plugin against the lab (real API server, operator
//! and agents on three nodes): `status` compared with a golden file, the
//! machine-readable output, kubectl's global options and the exit codes.
//!
//! The golden file is `e2e/tests/golden/kubectl_ha_status.txt`. Before the
//! comparison [`mask`] replaces what is inherently variable: RFC 3339
//! timestamps and ages (`12s`, `3m4s`), should any appear in a condition
//! message. Nothing else is masked: names, modes, heartbeats, roles,
//! phases, epochs, acknowledged epochs and fail counts are what the steps
//! of the test make them. `KUBEHA_BLESS=1` rewrites the golden file from
//! the output seen (review the diff before committing it).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kubeha_e2e::ha::{self, Timing};
use kubeha_e2e::lab::Lab;
use serde_json::Value;

const CLUSTER: &str = "kubectl-golden";
const SERVICE_A: &str = "kubectl-golden-a";
const SERVICE_B: &str = "kubectl-golden-b";
const VIP_A: &str = "198.18.0.160";
const VIP_B: &str = "198.18.0.161";

/// What one run of the plugin returned.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` (a `kubectl ha` command) to its end.
fn run_cmd(mut cmd: Command) -> Run {
    let out = cmd.output().expect("kubectl ha runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `kubectl ha ARGS` as the lab's admin (KUBECONFIG set).
fn ha_run(lab: &Lab, args: &[&str]) -> Run {
    let mut cmd = lab.kubectl_ha().unwrap();
    cmd.args(args);
    run_cmd(cmd)
}

/// Masks what is inherently variable in `kubectl ha status`: RFC 3339
/// timestamps become `<TIME>`, ages such as `12s`, `3m4s` or `2h` become
/// `<AGE>`. Everything else is compared as printed.
fn mask(text: &str) -> String {
    text.split_inclusive(char::is_whitespace)
        .map(|word| {
            let core = word.trim_end();
            let tail = &word[core.len()..];
            let token = core
                .trim_start_matches('(')
                .trim_end_matches([',', ')', ';', ':']);
            let start = core.len() - core.trim_start_matches('(').len();
            let (open, close) = (&core[..start], &core[start + token.len()..]);
            if is_timestamp(token) {
                format!("{open}<TIME>{close}{tail}")
            } else if is_age(token) {
                format!("{open}<AGE>{close}{tail}")
            } else {
                word.to_owned()
            }
        })
        .collect()
}

/// `2026-12-07T13:05:00Z` and the like.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
}

/// `12s`, `3m4s`, `1h2m`, `250ms`: digits and the units h, m, s (only).
fn is_age(s: &str) -> bool {
    let s = s.strip_suffix("ms").unwrap_or(s);
    !s.is_empty()
        && s.chars().next().is_some_and(|c| c.is_ascii_digit())
        && s.chars()
            .last()
            .is_some_and(|c| matches!(c, 'h' | 'm' | 's'))
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, 'h' | 'm' | 's'))
}

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kubectl_ha_status.txt")
}

/// Starts `kubectl ha status --watch --cluster CLUSTER`; what it prints
/// gathers in the returned buffer.
fn start_watch(lab: &Lab) -> (std::process::Child, Arc<Mutex<String>>) {
    let mut child = lab
        .kubectl_ha()
        .unwrap()
        .args(["status", "--watch", "--cluster", CLUSTER])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl ha status --watch starts");
    let seen = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (child, seen)
}

#[test]
fn status_matches_its_golden_file_and_the_plugin_follows_kubectl_conventions() {
    let lab = ha::operator_lab(3).expect("the lab with three nodes and the operator");
    let services = [SERVICE_A, SERVICE_B];
    let vips = [VIP_A, VIP_B];
    ha::remove_services_and_cluster(&lab, &services, CLUSTER, &vips).unwrap();

    // Every member heartbeats before the services exist, so placement is
    // the ordered one: node-1 active, node-2 standby.
    ha::apply(&lab, &ha::cluster(CLUSTER, &[1, 2, 3], Timing::DEFAULT)).unwrap();
    assert!(
        ha::wait_until(Duration::from_secs(20), || ha::members_ready(
            &lab, CLUSTER, 3
        ))
        .is_some(),
        "{CLUSTER} never had 3/3 members ready"
    );
    for (name, vip) in services.iter().zip(vips) {
        ha::apply(
            &lab,
            &ha::service(name, CLUSTER, &[&format!("{vip}/24")], None, (3, 100)),
        )
        .unwrap();
        ha::wait_active_on(&lab, name, vip, 1, Duration::from_secs(30)).unwrap();
    }

    // A move that reaches its target exits 0.
    let moved = ha_run(&lab, &["--wait", "30", "move", SERVICE_B, "--to", "node-3"]);
    assert_eq!(moved.code, 0, "move to node-3:\n{moved}");
    ha::wait_active_on(&lab, SERVICE_B, VIP_B, 3, Duration::from_secs(10)).unwrap();

    // The golden status: eventually (the agents' acknowledgements and the
    // operator's conditions settle within seconds of the move) the output,
    // masked, is the golden file.
    let golden_file = golden_path();
    let bless = std::env::var_os("KUBEHA_BLESS").is_some();
    let golden = match std::fs::read_to_string(&golden_file) {
        Ok(text) => text,
        Err(_) if bless => String::new(),
        Err(e) => panic!(
            "{}: {e}; record it with KUBEHA_BLESS=1 (and review it)",
            golden_file.display()
        ),
    };
    let mut last = None;
    let matched = ha::wait_every(Duration::from_secs(30), Duration::from_millis(500), || {
        let run = ha_run(&lab, &["status", "--cluster", CLUSTER]);
        let same = run.code == 0 && mask(&run.stdout) == golden;
        last = Some(run);
        same
    });
    let last = last.unwrap();
    if bless {
        std::fs::create_dir_all(golden_file.parent().unwrap()).unwrap();
        std::fs::write(&golden_file, mask(&last.stdout)).unwrap();
    } else if matched.is_none() {
        assert_eq!(
            mask(&last.stdout),
            golden,
            "kubectl ha status --cluster {CLUSTER} differs from {} (exit {}, stderr {})",
            golden_file.display(),
            last.code,
            last.stderr
        );
        assert_eq!(last.code, 0, "a healthy status exits 0:\n{last}");
    }
    let text = last.stdout;

    // -o json: a kubectl List of the cluster, then its services by name,
    // without managedFields; -o yaml: the same List.
    let json = ha_run(&lab, &["status", "--cluster", CLUSTER, "-o", "json"]);
    assert_eq!(json.code, 0, "{json}");
    let list: Value = serde_json::from_str(&json.stdout).expect("-o json prints JSON");
    assert_eq!(
        (list["apiVersion"].as_str(), list["kind"].as_str()),
        (Some("v1"), Some("List"))
    );
    let items: Vec<(String, String)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert!(i["metadata"].get("managedFields").is_none(), "{i}");
            (
                i["kind"].as_str().unwrap().to_owned(),
                i["metadata"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        items,
        [
            ("HACluster".to_owned(), CLUSTER.to_owned()),
            ("HAService".to_owned(), SERVICE_A.to_owned()),
            ("HAService".to_owned(), SERVICE_B.to_owned()),
        ]
    );
    assert_eq!(list["items"][2]["status"]["activeNode"], "node-3");
    let yaml = ha_run(&lab, &["status", "--cluster", CLUSTER, "-o", "yaml"]);
    let from_yaml: Value = serde_yaml::from_str(&yaml.stdout).expect("-o yaml prints YAML");
    assert_eq!(from_yaml["kind"], "List");
    assert_eq!(
        from_yaml["items"].as_array().map(Vec::len),
        Some(3),
        "{yaml}"
    );

    // --kubeconfig and --context, with no KUBECONFIG in the environment,
    // print the same status; an unknown context is an error naming it.
    let kubeconfig = lab.kubeconfig();
    let kubeconfig = kubeconfig.to_str().unwrap();
    let explicit = |args: &[&str]| {
        let mut cmd = Command::new(lab.kubectl_ha_binary().unwrap());
        cmd.env_remove("KUBECONFIG")
            .env("HOME", "/nonexistent")
            .args(args);
        run_cmd(cmd)
    };
    let same = explicit(&[
        "--kubeconfig",
        kubeconfig,
        "--context",
        "kubeha-lab",
        "status",
        "--cluster",
        CLUSTER,
    ]);
    assert_eq!((same.code, mask(&same.stdout)), (0, mask(&text)), "{same}");
    let wrong = explicit(&["status", "--kubeconfig", kubeconfig, "--context", "nope"]);
    assert_eq!(wrong.code, 1, "{wrong}");
    assert!(wrong.stderr.contains("--context nope"), "{wrong}");
    let usage = ha_run(&lab, &["status", "-o", "wide"]);
    assert_eq!(
        usage.code, 2,
        "an unknown -o value is a usage error:\n{usage}"
    );

    // -n lists that namespace only (the services are in default, the
    // kubeconfig's namespace); -A every namespace.
    let other = ha_run(&lab, &["status", "--cluster", CLUSTER, "-n", "kube-system"]);
    assert_eq!(other.code, 0, "{other}");
    assert!(other.stdout.contains("no HAService found"), "{other}");
    assert!(other.stderr.contains("-A lists every namespace"), "{other}");
    let all = ha_run(&lab, &["status", "--cluster", CLUSTER, "-A"]);
    assert_eq!(mask(&all.stdout), mask(&text), "{all}");

    // --watch prints the status, then again when it changes.
    let (mut watch, watched) = start_watch(&lab);
    assert!(
        ha::wait_until(Duration::from_secs(10), || watched
            .lock()
            .unwrap()
            .contains(SERVICE_B))
        .is_some(),
        "status --watch printed nothing: {}",
        watched.lock().unwrap()
    );

    // Locking node-2 and node-3 leaves SERVICE_A without a standby
    // (Degraded True, NoStandby): status exits 3. The watch shows it.
    for node in ["node-2", "node-3"] {
        let locked = ha_run(
            &lab,
            &["--wait", "20", "mode", node, "locked", "--cluster", CLUSTER],
        );
        assert_eq!(locked.code, 0, "mode {node} locked:\n{locked}");
    }
    let mut degraded = None;
    let attention = ha::wait_every(Duration::from_secs(30), Duration::from_millis(500), || {
        let run = ha_run(&lab, &["status", "--cluster", CLUSTER]);
        let three = run.code == 3;
        degraded = Some(run);
        three
    });
    let degraded = degraded.unwrap();
    assert!(
        attention.is_some(),
        "status with a service lacking a standby exits 3:\n{degraded}"
    );
    assert!(degraded.stdout.contains("Degraded=True"), "{degraded}");
    assert!(
        ha::wait_until(Duration::from_secs(10), || watched
            .lock()
            .unwrap()
            .contains("locked"))
        .is_some(),
        "status --watch did not print the change: {}",
        watched.lock().unwrap()
    );
    assert!(
        watch.try_wait().unwrap().is_none(),
        "status --watch keeps running"
    );
    watch.kill().unwrap();
    watch.wait().unwrap();

    // A move to a locked node is refused by the operator (Moved False,
    // TargetNotEligible): written, not reached, exit 4.
    let refused = ha_run(&lab, &["--wait", "15", "move", SERVICE_A, "--to", "node-2"]);
    assert_eq!(refused.code, 4, "move to a locked node:\n{refused}");
    assert!(
        refused.stdout.contains(SERVICE_A),
        "the status is printed:\n{refused}"
    );

    ha::remove_services_and_cluster(&lab, &services, CLUSTER, &vips).unwrap();
    if bless {
        panic!(
            "KUBEHA_BLESS: {} written from the output seen; review it and run again without KUBEHA_BLESS",
            golden_file.display()
        );
    }
}

#[test]
fn mask_hides_times_and_ages_only() {
    assert_eq!(
        mask("Moved=True OnTarget: since 2026-12-07T13:05:00Z, 12s ago (3m4s)\n"),
        "Moved=True OnTarget: since <TIME>, <AGE> ago (<AGE>)\n"
    );
    let kept = "node-1  master  Running  4  4  0\nphase Active, epoch 2, VIPs 198.18.0.160/24\n";
    assert_eq!(mask(kept), kept);
}
