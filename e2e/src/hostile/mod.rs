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
