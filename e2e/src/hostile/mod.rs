//! The hostile-input catalogue (issue 9): cases a hostile tenant, a stolen
//! node token or plain bad input try against a running lab, each with the
//! outcome it must have (rejected by the API server naming the field,
//! refused by the operator or agent with a condition and Event, denied by
//! the admission policy, ...) and the check that nothing was left half
//! assigned: no address, no hook run, no crash.
//!
//! Each area keeps its cases in its own module; [`all`] lists them in a
//! fixed order. `e2e/tests/hostile.rs` runs them against one lab, and
//! `cargo xtask hostile [--json PATH]` prints the table and writes the
//! report.

use std::time::Duration;

use anyhow::bail;
use serde_json::Value;

use crate::ha;
pub use crate::ha::events_about;
use crate::lab::Lab;

pub mod api;
pub mod bounds;
pub mod hooks;
pub mod identity;
pub mod leases;
pub mod tenancy;

/// One hostile input and the outcome it must have.
pub struct Case {
    /// Unique, stable id, kebab-case: `vip-prefix-zero`.
    pub name: &'static str,
    /// The outcome the case asserts, in words a reader of the table
    /// understands: "rejected by the API server naming spec.vips[0].address".
    pub expected: &'static str,
    /// Runs the case. `Ok(outcome)`: the expected outcome was observed,
    /// described as seen (the error text, the condition, the figure).
    /// `Err`: what happened instead. A case cleans up what it created,
    /// whatever its result, and leaves the lab as [`Ctx`] describes it.
    pub run: fn(&Ctx) -> anyhow::Result<String>,
}

/// What every case runs against: the lab with three nodes, an agent on
/// each (node-bound tokens, the chart's RBAC and admission policy) and
/// operator replica 0. Cases name their objects after themselves
/// (`hostile-<case>`), so no two cases share an object.
pub struct Ctx<'a> {
    /// The lab.
    pub lab: &'a Lab,
}

/// Every case, in catalogue order.
pub fn all() -> Vec<Case> {
    [
        api::cases(),
        bounds::cases(),
        tenancy::cases(),
        leases::cases(),
        identity::cases(),
        hooks::cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// How long one case may run before the runner calls it failed and moves
/// on (`KUBEHA_HOSTILE_CASE_SECONDS` overrides it).
pub const CASE_TIME_LIMIT: Duration = Duration::from_secs(240);

/// What one case did, as the table and the JSON report show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CaseResult {
    /// [`Case::name`].
    pub case: String,
    /// [`Case::expected`].
    pub expected: String,
    /// What was seen: the case's own description when it passed, else the
    /// error, the panic message or the time limit.
    pub outcome: String,
    /// Whether the expected outcome was observed.
    pub passed: bool,
}

/// Names used by more than one case (each once, sorted).
pub fn duplicate_names(cases: &[Case]) -> Vec<&'static str> {
    let mut seen = std::collections::BTreeSet::new();
    let mut twice = std::collections::BTreeSet::new();
    for c in cases {
        if !seen.insert(c.name) {
            twice.insert(c.name);
        }
    }
    twice.into_iter().collect()
}

/// The cases whose name contains `filter`, or one of its comma-separated
/// parts (every case when it is empty).
pub fn filtered(cases: Vec<Case>, filter: &str) -> Vec<Case> {
    let parts: Vec<&str> = filter.split(',').map(str::trim).collect();
    cases
        .into_iter()
        .filter(|c| parts.iter().any(|p| c.name.contains(p)))
        .collect()
}

/// Runs `case` on its own thread against `lab`, within `limit`: a case
/// that panics is a failed case whose outcome is the panic message, one
/// still running at `limit` is failed (its thread is left to finish on its
/// own), and the run goes on either way.
pub fn run_case(lab: &'static Lab, case: &Case, limit: Duration) -> CaseResult {
    let run = case.run;
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("hostile-{}", case.name))
        .spawn(move || {
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&Ctx { lab })));
            let _ = tx.send(result);
        });
    let (outcome, passed) = match spawned {
        Err(e) => (format!("could not start the case's thread: {e}"), false),
        Ok(_) => match rx.recv_timeout(limit) {
            Ok(Ok(Ok(seen))) => (seen, true),
            Ok(Ok(Err(e))) => (format!("{e:#}"), false),
            Ok(Err(panic)) => (format!("panicked: {}", panic_message(&*panic)), false),
            Err(_) => (
                format!(
                    "did not finish within {} s (still running; later cases may see what it leaves)",
                    limit.as_secs()
                ),
                false,
            ),
        },
    };
    CaseResult {
        case: case.name.to_owned(),
        expected: case.expected.to_owned(),
        outcome,
        passed,
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// The report `cargo xtask hostile --json` writes:
/// `{"cases", "passed", "failed", "results": [{"case", "expected", "outcome", "passed"}]}`.
pub fn report_json(results: &[CaseResult]) -> serde_json::Value {
    let passed = results.iter().filter(|r| r.passed).count();
    serde_json::json!({
        "cases": results.len(),
        "passed": passed,
        "failed": results.len() - passed,
        "results": results,
    })
}

/// The results as a Markdown table, case | expected | outcome | passed,
/// with `|` and line breaks in the texts escaped so every case stays one row.
pub fn table(results: &[CaseResult]) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace(['\n', '\r'], " ");
    let mut out = String::from("| case | expected | outcome | passed |\n|---|---|---|---|\n");
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            cell(&r.case),
            cell(&r.expected),
            cell(&r.outcome),
            if r.passed { "yes" } else { "NO" }
        ));
    }
    out
}

/// What the lab runs and holds between cases, to find what a case left
/// behind: the addresses on each node and the processes in each node's
/// namespace other than its agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Residue {
    /// `(node, address)` of every address but IPv6 link-local ones.
    pub addresses: std::collections::BTreeSet<(u8, String)>,
    /// `(node, pid)` of every process in a node's namespace but its agent.
    pub processes: std::collections::BTreeSet<(u8, i32)>,
}

impl Residue {
    /// What the lab holds now.
    pub fn of(lab: &Lab) -> Residue {
        let by_node = ha::node_addresses();
        let processes = by_node
            .iter()
            .map(|(i, _)| *i)
            .flat_map(|i| {
                let agent = lab.agent_pid(i);
                crate::nodes::ns_pids(&crate::nodes::node_ns(i))
                    .into_iter()
                    .filter(move |p| Some(*p) != agent)
                    .map(move |p| (i, p))
            })
            .collect();
        let addresses = by_node
            .into_iter()
            .flat_map(|(i, addrs)| addrs.into_iter().map(move |a| (i, a)))
            .filter(|(_, a)| !a.starts_with("fe80:"))
            .collect();
        Residue {
            addresses,
            processes,
        }
    }

    /// What `self` holds that `before` did not, in words; `None` when
    /// nothing.
    pub fn left_since(&self, before: &Residue) -> Option<String> {
        let addresses: Vec<String> = self
            .addresses
            .difference(&before.addresses)
            .map(|(i, a)| format!("{a} on node-{i}"))
            .collect();
        let processes: Vec<String> = self
            .processes
            .difference(&before.processes)
            .map(|(i, p)| format!("pid {p} in node-{i}"))
            .collect();
        if addresses.is_empty() && processes.is_empty() {
            return None;
        }
        Some(format!(
            "left behind: addresses [{}], processes [{}]",
            addresses.join(", "),
            processes.join(", ")
        ))
    }
}

/// Brings the lab back to what [`Ctx`] promises after a case that broke
/// it (or crashed something): every node powered on with its agent, and
/// operator replica 0 running. Returns what it had to restart, in words.
pub fn restore(lab: &Lab) -> anyhow::Result<Vec<String>> {
    let mut restarted = Vec::new();
    for i in 1..=3 {
        lab.power_on(i)?;
        if !lab.agent_running(i) {
            lab.start_agent(i, &[] as &[&str])?;
            restarted.push(format!("the agent of node-{i}"));
        }
    }
    if !lab.operator_running(0) {
        lab.start_operator(0, &[])?;
        restarted.push("operator replica 0".to_owned());
    }
    Ok(restarted)
}

/// An HACluster of lab nodes and one HAService with one IPv4 VIP, both
/// named after the case, Active with its VIP on exactly one node. Dropped
/// without [`Scenario::finish`] (a case that failed), it removes both,
/// best effort.
pub struct Scenario<'a> {
    /// The lab.
    pub lab: &'a Lab,
    /// Name of the HACluster and the HAService (in [`crate::ha::SERVICE_NAMESPACE`]).
    pub name: String,
    /// The VIP, without prefix.
    pub vip: String,
    /// The cluster's members (lab node numbers).
    pub members: Vec<u8>,
    /// The node the service became Active on.
    pub active: u8,
    finished: bool,
}

/// How long a fresh service may take to become Active, and a tampered one
/// to be Active on one node again.
pub const ACTIVE_WITHIN: Duration = Duration::from_secs(45);

impl Ctx<'_> {
    /// [`Scenario`] `name` on `members` with `vip` (from the lab clusters'
    /// pool, 198.18.0.0/24), after removing what an earlier run left;
    /// ordered placement makes the first member active.
    pub fn active_service(
        &self,
        name: &str,
        vip: &str,
        members: &[u8],
    ) -> anyhow::Result<Scenario<'_>> {
        self.active_service_with_hooks(name, vip, members, None)
    }

    /// [`Ctx::active_service`] with host-path hooks from folder `hook_dir`
    /// of each node's hook root ([`crate::ha::install_hooks`]).
    pub fn active_service_with_hooks(
        &self,
        name: &str,
        vip: &str,
        members: &[u8],
        hook_dir: Option<&str>,
    ) -> anyhow::Result<Scenario<'_>> {
        let lab = self.lab;
        remove_service_and_cluster(lab, name);
        if ha::wait_until(Duration::from_secs(20), || ha::vip_holders(vip).is_empty()).is_none() {
            bail!(
                "{vip} is still held by {:?} from an earlier case",
                ha::vip_holders(vip)
            );
        }
        ha::apply(lab, &ha::cluster(name, members, ha::Timing::DEFAULT))?;
        let count = members.len() as u8;
        if ha::wait_until(Duration::from_secs(30), || {
            ha::members_ready(lab, name, count)
        })
        .is_none()
        {
            remove_service_and_cluster(lab, name);
            bail!("cluster {name} never had {count}/{count} members ready");
        }
        ha::apply(
            lab,
            &ha::service(name, name, &[&format!("{vip}/24")], hook_dir, (3, 100)),
        )?;
        let mut scenario = Scenario {
            lab,
            name: name.to_owned(),
            vip: vip.to_owned(),
            members: members.to_vec(),
            active: 0,
            finished: false,
        };
        scenario.active = scenario.wait_active(ACTIVE_WITHIN)?;
        Ok(scenario)
    }
}

/// Deletes HAService and HACluster `name` without waiting.
fn remove_service_and_cluster(lab: &Lab, name: &str) {
    ha::delete_service(lab, name);
    ha::delete(lab, "hacluster", name, None);
}

impl Scenario<'_> {
    /// The node on which the service is Active, its VIP on that node alone,
    /// within `limit`.
    pub fn wait_active(&self, limit: Duration) -> anyhow::Result<u8> {
        let mut seen = None;
        if ha::wait_every(limit, Duration::from_millis(200), || {
            seen = ha::active_node(self.lab, &self.name, &self.vip);
            seen.is_some()
        })
        .is_some()
        {
            return Ok(seen.unwrap_or_default());
        }
        bail!(
            "{} was not Active with its VIP on one node within {} s: status {}, holders {:?}",
            self.name,
            limit.as_secs(),
            ha::service_status(self.lab, &self.name),
            ha::vip_holders(&self.vip)
        )
    }

    /// The service's status.
    pub fn status(&self) -> Value {
        ha::service_status(self.lab, &self.name)
    }

    /// Deletes the service (its finalizer gives it away first) and the
    /// cluster; fails when the VIP is still held or the finalizer never let
    /// the service go.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.finished = true;
        let lab = self.lab;
        ha::delete(lab, "haservice", &self.name, Some(ha::SERVICE_NAMESPACE));
        let released = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
            ha::vip_holders(&self.vip).is_empty()
        });
        let removed = ha::wait_every(Duration::from_secs(30), Duration::from_millis(200), || {
            lab.kubectl_output(&["get", "haservice", &self.name, "-n", ha::SERVICE_NAMESPACE])
                .is_ok_and(|o| !o.status.success())
        });
        let holders = ha::vip_holders(&self.vip);
        remove_service_and_cluster(lab, &self.name);
        if released.is_none() {
            bail!(
                "{} still held on {holders:?} 30 s after the service was deleted",
                self.vip
            );
        }
        if removed.is_none() {
            bail!("the finalizer of {} never let it go within 30 s", self.name);
        }
        Ok(())
    }
}

impl Drop for Scenario<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        ha::delete(
            self.lab,
            "haservice",
            &self.name,
            Some(ha::SERVICE_NAMESPACE),
        );
        let _ = ha::wait_every(Duration::from_secs(20), Duration::from_millis(200), || {
            ha::vip_holders(&self.vip).is_empty()
        });
        remove_service_and_cluster(self.lab, &self.name);
    }
}

/// Runs `f` while a split-brain detector watches `vip` on every node, and
/// fails unless no two nodes ever held it and the detector kept pace;
/// `during` names what was watched.
pub fn single_holder_through<T>(
    vip: &str,
    during: &str,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, crate::split_brain::Sampled)> {
    let detector = ha::SplitBrain::start(vip, &[]);
    let result = f();
    let seen = detector.stop();
    let value = result?;
    if seen.double > 0 {
        bail!(
            "{during}: two nodes held {vip} in {} of {} checks: {:?}",
            seen.double,
            seen.samples,
            seen.windows
        );
    }
    if seen.samples == 0 || seen.max_gap >= crate::split_brain::MAX_SAMPLE_GAP {
        bail!(
            "{during}: the split-brain detector did not keep pace ({} checks, longest gap {:?})",
            seen.samples,
            seen.max_gap
        );
    }
    Ok((value, seen))
}

/// Where a service's leadership Lease is and what it holds now.
#[derive(Debug, Clone)]
pub struct ServiceLease {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The object.
    pub object: Value,
}

impl ServiceLease {
    /// `spec.leaseTransitions` (0 when absent).
    pub fn epoch(&self) -> i64 {
        self.object["spec"]["leaseTransitions"]
            .as_i64()
            .unwrap_or(0)
    }

    /// `spec.holderIdentity`.
    pub fn holder(&self) -> Option<&str> {
        self.object["spec"]["holderIdentity"].as_str()
    }
}

/// The leadership Lease of HAService `service` (in
/// [`crate::ha::SERVICE_NAMESPACE`]), wherever the operator keeps it: the
/// service Lease (label `kubeha.io/lease=service`, any namespace) that
/// names the service's UID (owner reference, label or annotation), else
/// the one labelled with the service's name. Cases tamper with it through
/// this, not through a name of their own.
pub fn service_lease(lab: &Lab, service: &str) -> anyhow::Result<ServiceLease> {
    let svc = lab.kubectl_json(&["get", "haservice", service, "-n", ha::SERVICE_NAMESPACE])?;
    let uid = svc["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let leases = lab.kubectl_json(&["get", "leases", "-A", "-l", "kubeha.io/lease=service"])?;
    let items = leases["items"].as_array().cloned().unwrap_or_default();
    let names_uid = |l: &Value| {
        let meta = &l["metadata"];
        let in_map = |m: &Value| {
            m.as_object()
                .is_some_and(|m| m.values().any(|v| v.as_str() == Some(uid.as_str())))
        };
        !uid.is_empty()
            && (in_map(&meta["labels"])
                || in_map(&meta["annotations"])
                || meta["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["uid"] == uid.as_str())))
    };
    let labelled = |l: &Value| l["metadata"]["labels"]["kubeha.io/service"] == service;
    let found = items
        .iter()
        .find(|l| names_uid(l))
        .or_else(|| items.iter().find(|l| labelled(l)))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no service Lease names HAService {service} (uid {uid}) among {} service Leases",
                items.len()
            )
        })?;
    Ok(ServiceLease {
        namespace: found["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        name: found["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        object: found.clone(),
    })
}

/// Applies JSON merge patch `patch` to the Lease `lease` as the cluster
/// admin (the lab's kubeconfig), as a hand edit would.
pub fn patch_lease(lab: &Lab, lease: &ServiceLease, patch: &Value) -> anyhow::Result<()> {
    lab.kubectl_ok(&[
        "patch",
        "lease",
        &lease.name,
        "-n",
        &lease.namespace,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ])?;
    Ok(())
}

/// `s` cut to 160 characters (with `...` when cut), for a table cell.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(160) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

/// The condition of type `kind` in `status` (an object's `status`), if any.
pub fn condition<'v>(status: &'v Value, kind: &str) -> Option<&'v Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// Whether the agents of nodes 1..=3 and operator replica 0 all run; the
/// ones that do not, in words, otherwise.
pub fn processes_running(lab: &Lab) -> Result<(), String> {
    let mut down: Vec<String> = (1..=3)
        .filter(|i| !lab.agent_running(*i))
        .map(|i| format!("the agent of node-{i}"))
        .collect();
    if !lab.operator_running(0) {
        down.push("operator replica 0".to_owned());
    }
    if down.is_empty() {
        Ok(())
    } else {
        Err(format!("not running: {}", down.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passes(_: &Ctx) -> anyhow::Result<String> {
        Ok("seen".to_owned())
    }

    fn fails(_: &Ctx) -> anyhow::Result<String> {
        bail!("the API server accepted it")
    }

    fn panics(_: &Ctx) -> anyhow::Result<String> {
        panic!("index out of bounds")
    }

    fn sleeps(_: &Ctx) -> anyhow::Result<String> {
        std::thread::sleep(Duration::from_secs(10));
        Ok("late".to_owned())
    }

    fn case(name: &'static str, run: fn(&Ctx) -> anyhow::Result<String>) -> Case {
        Case {
            name,
            expected: "something | odd\nshape",
            run,
        }
    }

    fn offline_lab() -> &'static Lab {
        Box::leak(Box::new(Lab::new(std::path::Path::new("/nonexistent"))))
    }

    #[test]
    fn a_panicking_or_slow_case_is_a_failed_case_and_the_others_still_report() {
        let lab = offline_lab();
        // Generous for the cases that end: a panic's report (a backtrace
        // resolved under RUST_BACKTRACE on a loaded machine) once took
        // more than 500 ms, so the panic was reported as a timeout.
        let limit = Duration::from_secs(4);
        let results: Vec<CaseResult> = [
            case("ok", passes),
            case("err", fails),
            case("boom", panics),
            case("slow", sleeps),
        ]
        .iter()
        .map(|c| run_case(lab, c, limit))
        .collect();
        assert_eq!(
            results.iter().map(|r| r.passed).collect::<Vec<_>>(),
            [true, false, false, false]
        );
        assert_eq!(results[0].outcome, "seen");
        assert_eq!(results[1].outcome, "the API server accepted it");
        assert_eq!(results[2].outcome, "panicked: index out of bounds");
        assert!(
            results[3].outcome.starts_with("did not finish within 4 s"),
            "{}",
            results[3].outcome
        );
    }

    #[test]
    fn the_report_counts_and_the_table_keeps_one_row_per_case() {
        let results = vec![
            CaseResult {
                case: "a".into(),
                expected: "x | y".into(),
                outcome: "line\nbreak".into(),
                passed: true,
            },
            CaseResult {
                case: "b".into(),
                expected: "z".into(),
                outcome: "no".into(),
                passed: false,
            },
        ];
        let json = report_json(&results);
        assert_eq!(json["cases"], 2);
        assert_eq!(json["passed"], 1);
        assert_eq!(json["failed"], 1);
        assert_eq!(json["results"][1]["case"], "b");
        assert_eq!(json["results"][0]["expected"], "x | y");
        assert_eq!(json["results"][1]["passed"], false);
        let table = table(&results);
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(
            table.contains("| a | x \\| y | line break | yes |"),
            "{table}"
        );
        assert!(table.contains("| b | z | no | NO |"), "{table}");
    }

    #[test]
    fn repeated_names_are_found_and_filters_match_substrings() {
        let cases = vec![
            case("lease-a", passes),
            case("move-b", passes),
            case("lease-a", fails),
        ];
        assert_eq!(duplicate_names(&cases), ["lease-a"]);
        let names = |kept: Vec<Case>| kept.iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(
            names(filtered(
                vec![case("lease-a", passes), case("move-b", passes)],
                ""
            )),
            ["lease-a", "move-b"]
        );
        assert_eq!(names(filtered(cases, "move")), ["move-b"]);
        assert_eq!(
            names(filtered(
                vec![
                    case("lease-a", passes),
                    case("move-b", passes),
                    case("c", passes)
                ],
                "move, lease"
            )),
            ["lease-a", "move-b"]
        );
    }

    #[test]
    fn the_catalogue_names_no_case_twice() {
        assert_eq!(duplicate_names(&all()), Vec::<&str>::new());
    }
}
