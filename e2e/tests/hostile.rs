//! The hostile-input catalogue (issue 9) against one lab: three nodes, an
//! agent on each and operator replica 0, as the operator tests run it.
//! Every case of `kubeha_e2e::hostile::all()` runs in turn, with a time
//! limit and its panics caught (a panicking case is a failed case and the
//! run goes on); after each, what it left behind (an address, a process
//! in a node's namespace) or crashed (an agent, the operator) fails it, and
//! the lab is restored for the next. Prints the table case | expected |
//! outcome | passed and fails if any case failed.
//!
//! Environment: `KUBEHA_HOSTILE_FILTER` runs only the cases whose name
//! contains it (or one of its comma-separated parts); `KUBEHA_HOSTILE_JSON` names the file the JSON report goes
//! to; `KUBEHA_HOSTILE_CASE_SECONDS` changes the time limit of one case.
//! `cargo xtask hostile [--json PATH] [--filter S]` sets them.

use std::time::{Duration, Instant};

use kubeha_e2e::hostile::{self, CaseResult, Residue};
use kubeha_e2e::lab::Lab;

/// How long what a case left (a VIP still in its kernel lifetime, a hook
/// process exiting) may take to go away before it counts as left behind.
const SETTLE: Duration = Duration::from_secs(20);

/// The lab with three nodes, an agent on each and operator replica 0.
fn lab() -> &'static Lab {
    let lab = Lab::of_this_checkout();
    lab.ensure_up_with_nodes(3)
        .expect("the lab with three nodes must come up");
    hostile::restore(&lab).expect("nodes, agents and operator replica 0 start");
    Box::leak(Box::new(lab))
}

/// `case`'s result, failed when the lab afterwards holds what it did not
/// hold before (after [`SETTLE`]) or an agent or the operator no longer
/// runs; restores the lab for the next case.
fn checked(lab: &'static Lab, case: &hostile::Case, limit: Duration) -> CaseResult {
    let before = Residue::of(lab);
    let started = Instant::now();
    let mut result = hostile::run_case(lab, case, limit);
    let took = started.elapsed();
    let mut problems = Vec::new();
    if let Err(down) = hostile::processes_running(lab) {
        problems.push(format!("after the case: {down}"));
    }
    match hostile::restore(lab) {
        Ok(restarted) if !restarted.is_empty() => {
            eprintln!("hostile: restarted {}", restarted.join(", "));
        }
        Ok(_) => {}
        Err(e) => problems.push(format!("the lab could not be restored: {e:#}")),
    }
    let mut left = None;
    let settled = kubeha_e2e::ha::wait_every(SETTLE, Duration::from_millis(500), || {
        left = Residue::of(lab).left_since(&before);
        left.is_none()
    });
    if settled.is_none()
        && let Some(left) = left
    {
        problems.push(left);
    }
    if !problems.is_empty() {
        result.passed = false;
        result.outcome = format!("{}; {}", result.outcome, problems.join("; "));
    }
    eprintln!(
        "hostile: {} {} in {:.1} s: {}",
        result.case,
        if result.passed { "passed" } else { "FAILED" },
        took.as_secs_f64(),
        result.outcome
    );
    result
}

#[test]
fn every_hostile_case_has_its_expected_outcome() {
    let all = hostile::all();
    let repeated = hostile::duplicate_names(&all);
    assert!(
        repeated.is_empty(),
        "case names must be unique: {repeated:?}"
    );
    let filter = std::env::var("KUBEHA_HOSTILE_FILTER").unwrap_or_default();
    let cases = hostile::filtered(all, &filter);
    assert!(
        !cases.is_empty(),
        "no case name contains KUBEHA_HOSTILE_FILTER={filter:?}"
    );
    let limit = std::env::var("KUBEHA_HOSTILE_CASE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(hostile::CASE_TIME_LIMIT, Duration::from_secs);
    let lab = lab();
    let results: Vec<CaseResult> = cases.iter().map(|c| checked(lab, c, limit)).collect();

    println!("\n{}", hostile::table(&results));
    let report = hostile::report_json(&results);
    println!(
        "hostile: {} cases, {} passed, {} failed",
        report["cases"], report["passed"], report["failed"]
    );
    if let Ok(path) = std::env::var("KUBEHA_HOSTILE_JSON") {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap())
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
        println!("wrote {path}");
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.case.as_str())
        .collect();
    assert!(failed.is_empty(), "hostile cases failed: {failed:?}");
}
