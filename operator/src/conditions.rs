//! Status conditions (`Ready`, `Degraded`, `Reconciling`, `Stalled`, the
//! kstatus set, `Moved` while an admin's move request stands and
//! `ForceStarted` while a force start does) with
//! `observedGeneration`, and the rule that a condition's
//! `lastTransitionTime` changes only when its status does. Pure: the time
//! is passed in.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// `Ready`: the object does what it is for.
pub const READY: &str = "Ready";
/// `Degraded`: it works, with less redundancy or a failure somewhere.
pub const DEGRADED: &str = "Degraded";
/// `Reconciling`: a change is being carried out.
pub const RECONCILING: &str = "Reconciling";
/// `Stalled`: nothing will progress until someone changes something.
pub const STALLED: &str = "Stalled";
/// `Moved`: present only while an HAService carries the
/// `kubeha.io/move-to` annotation; True once the service runs on the node
/// it names.
pub const MOVED: &str = "Moved";
/// `ForceStarted`: present only while an HAService carries the
/// `kubeha.io/force-start` annotation (until `kubectl ha clear`); True
/// once the service runs by force on the node it names, False with the
/// reason while it is starting there, blocked (`TargetNotEligible`) or
/// failed there (`ForcedStartFailed`).
pub const FORCE_STARTED: &str = "ForceStarted";

/// A condition as computed, before its transition time is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    /// The type (one of the constants above).
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: String,
    /// A human-readable message.
    pub message: String,
}

impl Cond {
    /// A condition that holds.
    pub fn yes(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: true,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn no(type_: &'static str, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: false,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// A condition that holds with the reason and message of the first
    /// problem found in `problems` (in order of precedence; `None` where
    /// there is none of that kind), and that does not hold, with reason
    /// `settled` and no message, when none is found.
    pub fn first_problem<'a>(
        type_: &'static str,
        problems: impl IntoIterator<Item = Option<(&'a str, String)>>,
        settled: &str,
    ) -> Self {
        match problems.into_iter().flatten().next() {
            Some((reason, message)) => Self::yes(type_, reason, message),
            None => Self::no(type_, settled, ""),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Turns computed conditions into API conditions: each keeps the
/// `lastTransitionTime` of the `old` condition of the same type when its
/// status did not change, and gets `now` otherwise.
pub fn settle(
    old: &[Condition],
    new: &[Cond],
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    new.iter()
        .map(|c| {
            let status = status_str(c.status);
            let since = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == status)
                .map(|o| o.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.to_owned(),
                status: status.to_owned(),
                reason: if c.reason.is_empty() {
                    "Unknown".to_owned()
                } else {
                    c.reason.clone()
                },
                // The API caps messages at 32768 bytes.
                message: c.message.chars().take(4000).collect(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether two condition lists say the same, ignoring transition times.
pub fn same(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn first_problem_wins_and_none_settles() {
        let found = Cond::first_problem(
            DEGRADED,
            [
                None,
                Some(("A", "a".to_owned())),
                Some(("B", "b".to_owned())),
            ],
            "Fine",
        );
        assert_eq!(found, Cond::yes(DEGRADED, "A", "a"));
        let none = Cond::first_problem(DEGRADED, [None, None], "Fine");
        assert_eq!(none, Cond::no(DEGRADED, "Fine", ""));
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let first = settle(&[], &[Cond::yes(READY, "Active", "ok")], Some(1), t(10));
        assert_eq!(first[0].last_transition_time, t(10));
        assert_eq!(first[0].status, "True");
        assert_eq!(first[0].observed_generation, Some(1));
        // Same status, other message: time kept.
        let second = settle(
            &first,
            &[Cond::yes(READY, "Active", "still ok")],
            Some(2),
            t(20),
        );
        assert_eq!(second[0].last_transition_time, t(10));
        // Status flips: new time.
        let third = settle(&second, &[Cond::no(READY, "Starting", "")], Some(2), t(30));
        assert_eq!(third[0].last_transition_time, t(30));
        assert_eq!(third[0].reason, "Starting");
    }

    #[test]
    fn sameness_ignores_time_and_order() {
        let a = settle(
            &[],
            &[Cond::yes(READY, "A", "m"), Cond::no(STALLED, "B", "n")],
            Some(1),
            t(1),
        );
        let b = settle(
            &[],
            &[Cond::no(STALLED, "B", "n"), Cond::yes(READY, "A", "m")],
            Some(1),
            t(2),
        );
        assert!(same(&a, &b));
        let c = settle(&[], &[Cond::yes(READY, "A", "m")], Some(1), t(1));
        assert!(!same(&a, &c));
    }

    #[test]
    fn empty_reason_is_filled() {
        let c = settle(&[], &[Cond::no(DEGRADED, "", "")], None, t(1));
        assert_eq!(c[0].reason, "Unknown");
    }
}
