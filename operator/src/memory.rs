//! What the operator remembers between reconciles, in memory only: when it
//! saw each node's fail count rise (the failure time placement uses), which
//! transitions it has already announced as Events, when it wrote a new
//! master (for the failover duration), and per cluster the modes it saw
//! last and since when a member is `peerdown`.
//!
//! The first observation of an object only seeds the memory: an operator
//! that restarts (or becomes leader) does not announce again what happened
//! before it looked. Pure: `now` is passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kubeha_crds::Mode;
use kubeha_crds::service::{HookOutcome, NodeServiceState, ServiceNodeStatus};

use crate::handover::LeaseState;
use crate::placement::Failures;

/// A transition the operator saw complete, to announce as an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Event reason: `TakeOver`, `TakeBack`, `GiveAway`, `GiveBack`,
    /// `HookFailed`, `Fenced`.
    pub reason: &'static str,
    /// The node it happened on.
    pub node: String,
    /// Whether it is a warning.
    pub warning: bool,
    /// The Event note.
    pub message: String,
}

/// A new master the operator wrote and is waiting to see running.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    node: String,
    epoch: i64,
    at: Instant,
    reason: String,
}

/// A failover completed: the new master reported Running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// Placement's reason for the move (`Failover`, `Failback`, `Initial`).
    pub reason: String,
    /// From the Lease write to the Running report.
    pub duration: Duration,
}

/// What one observation of a service produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Transitions to announce.
    pub transitions: Vec<Transition>,
    /// A completed failover, for the duration histogram.
    pub completed: Option<Completed>,
}

/// Memory of one service.
#[derive(Clone, Debug, Default)]
pub struct ServiceMemory {
    seeded: bool,
    fail_seen: BTreeMap<String, (i32, Instant)>,
    failed_since: BTreeMap<String, (Option<i64>, Instant)>,
    states: BTreeMap<String, NodeServiceState>,
    acked: BTreeMap<String, i64>,
    running: Option<(String, i64)>,
    fenced: BTreeSet<String>,
    written: Option<Written>,
}

/// The summary of an entry's failed hooks, for an Event.
pub fn failed_hooks(entry: &ServiceNodeStatus) -> String {
    let parts: Vec<String> = entry
        .hooks
        .iter()
        .filter(|h| h.outcome != HookOutcome::Success)
        .map(|h| {
            let tail = h.output_tail.iter().rev().take(3).rev().cloned();
            format!(
                "{} {} {:?} (exit {}): {}",
                h.script,
                h.action,
                h.outcome,
                h.exit_code.map_or("-".to_owned(), |c| c.to_string()),
                tail.collect::<Vec<_>>().join(" | ")
            )
        })
        .collect();
    if parts.is_empty() {
        "no hook output reported".to_owned()
    } else {
        parts.join("; ")
    }
}

impl ServiceMemory {
    /// Updates the failure times from the agents' entries: a fail count
    /// that rose (or is seen for the first time above zero) failed at its
    /// entry's `lastFailureTime` (the node's clock, `wall` being this
    /// clock's reading at `now`; a time ahead of `wall` counts as now), or
    /// now when the entry has none. So an operator that restarts does not
    /// start every failure timeout afresh.
    pub fn note_failures(
        &mut self,
        entries: &[ServiceNodeStatus],
        now: Instant,
        wall: jiff::Timestamp,
    ) {
        for e in entries {
            if e.state == NodeServiceState::Failed {
                match self.failed_since.get(&e.node) {
                    Some((epoch, _)) if *epoch == e.epoch => {}
                    _ => {
                        self.failed_since.insert(e.node.clone(), (e.epoch, now));
                    }
                }
            } else {
                self.failed_since.remove(&e.node);
            }
            let count = e.fail_count.max(0);
            match self.fail_seen.get(&e.node) {
                Some((prev, _)) if *prev == count => {}
                _ if count == 0 => {
                    self.fail_seen.remove(&e.node);
                }
                _ => {
                    let at = e
                        .last_failure_time
                        .as_ref()
                        .and_then(|t| Duration::try_from(wall.duration_since(t.0)).ok())
                        .and_then(|ago| now.checked_sub(ago))
                        .unwrap_or(now);
                    self.fail_seen.insert(e.node.clone(), (count, at));
                }
            }
        }
    }

    /// How long the operator has seen `node`'s entry in state `Failed` at
    /// the same epoch.
    pub fn failed_for(&self, node: &str, now: Instant) -> Option<Duration> {
        self.failed_since
            .get(node)
            .map(|(_, at)| now.saturating_duration_since(*at))
    }

    /// The failures per node for placement.
    pub fn failures(&self, now: Instant) -> BTreeMap<String, Failures> {
        self.fail_seen
            .iter()
            .map(|(node, (count, at))| {
                (
                    node.clone(),
                    Failures {
                        count: *count,
                        last_failure_ago: now.saturating_duration_since(*at),
                    },
                )
            })
            .collect()
    }

    /// Records that the operator wrote `node` as the new master at `epoch`.
    pub fn note_written(&mut self, node: &str, epoch: i64, reason: &str, now: Instant) {
        self.written = Some(Written {
            node: node.to_owned(),
            epoch,
            at: now,
            reason: reason.to_owned(),
        });
    }

    /// Compares what the entries, the Lease and the heartbeats say now with
    /// what was seen before. `primary` is the service's primary node (first
    /// preferred node, else first listed member); `lost` are the nodes that
    /// held or were cleared for the service and whose heartbeat is Lost.
    pub fn observe(
        &mut self,
        entries: &[ServiceNodeStatus],
        lease: Option<&LeaseState>,
        primary: Option<&str>,
        lost: &BTreeSet<String>,
        now: Instant,
    ) -> Seen {
        let announce = self.seeded;
        let mut seen = Seen::default();
        let is_primary = |n: &str| primary == Some(n);

        // A holder reporting Running at the current epoch.
        if let Some(l) = lease
            && let Some(h) = &l.holder
            && let Some(e) = entries.iter().find(|e| &e.node == h)
            && e.state == NodeServiceState::Running
            && e.epoch == Some(l.epoch)
            && self.running.as_ref() != Some(&(h.clone(), l.epoch))
        {
            self.running = Some((h.clone(), l.epoch));
            if announce {
                seen.transitions.push(Transition {
                    reason: if is_primary(h) {
                        "TakeBack"
                    } else {
                        "TakeOver"
                    },
                    node: h.clone(),
                    warning: false,
                    message: format!("{h} runs the service at epoch {}", l.epoch),
                });
            }
            if let Some(w) = &self.written
                && &w.node == h
                && w.epoch == l.epoch
            {
                seen.completed = Some(Completed {
                    reason: w.reason.clone(),
                    duration: now.saturating_duration_since(w.at),
                });
                self.written = None;
            }
        }

        for e in entries {
            // A clean leave: the acknowledged epoch rose.
            if let Some(acked) = e.acked_epoch {
                let before = self.acked.insert(e.node.clone(), acked);
                if announce && before.is_none_or(|b| acked > b) {
                    seen.transitions.push(Transition {
                        reason: if is_primary(&e.node) {
                            "GiveAway"
                        } else {
                            "GiveBack"
                        },
                        node: e.node.clone(),
                        warning: false,
                        message: format!("{} left the service cleanly (epoch {acked})", e.node),
                    });
                }
            }
            // A failure: the entry turned Failed.
            let before = self.states.insert(e.node.clone(), e.state);
            if announce
                && e.state == NodeServiceState::Failed
                && before != Some(NodeServiceState::Failed)
            {
                seen.transitions.push(Transition {
                    reason: "HookFailed",
                    node: e.node.clone(),
                    warning: true,
                    message: format!(
                        "{} failed at epoch {} (fail count {}): {}",
                        e.node,
                        e.epoch.map_or("-".to_owned(), |v| v.to_string()),
                        e.fail_count,
                        failed_hooks(e)
                    ),
                });
            }
        }

        // A holder whose heartbeat went Lost.
        for node in lost {
            if self.fenced.insert(node.clone()) && announce {
                seen.transitions.push(Transition {
                    reason: "Fenced",
                    node: node.clone(),
                    warning: true,
                    message: format!(
                        "{node} stopped renewing its heartbeat for the lease duration plus the skew allowance: it has fenced itself, the service may move"
                    ),
                });
            }
        }
        self.fenced.retain(|n| lost.contains(n));

        self.seeded = true;
        seen
    }
}

/// A change the operator saw in a cluster's modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModeEvent {
    /// A member's mode changed.
    Changed {
        /// The member.
        node: String,
        /// Its mode before.
        from: Mode,
        /// Its mode now.
        to: Mode,
    },
    /// The modes became a prohibited combination (or a different one).
    Prohibited(String),
}

/// Memory of one cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterMemory {
    seeded: bool,
    modes: BTreeMap<String, Mode>,
    peerdown_since: BTreeMap<String, Instant>,
    prohibited: Option<String>,
}

impl ClusterMemory {
    /// Compares the members' modes and the prohibited-state message with
    /// what was seen before.
    pub fn observe(
        &mut self,
        modes: &[(String, Mode)],
        prohibited: Option<&str>,
        now: Instant,
    ) -> Vec<ModeEvent> {
        let announce = self.seeded;
        let mut out = Vec::new();
        for (node, mode) in modes {
            let before = self.modes.insert(node.clone(), *mode);
            if announce
                && let Some(from) = before
                && from != *mode
            {
                out.push(ModeEvent::Changed {
                    node: node.clone(),
                    from,
                    to: *mode,
                });
            }
            if *mode == Mode::Peerdown {
                self.peerdown_since.entry(node.clone()).or_insert(now);
            } else {
                self.peerdown_since.remove(node);
            }
        }
        self.modes.retain(|n, _| modes.iter().any(|(m, _)| m == n));
        self.peerdown_since
            .retain(|n, _| modes.iter().any(|(m, _)| m == n));
        let prohibited = prohibited.map(str::to_owned);
        if prohibited.is_some() && prohibited != self.prohibited {
            // Reported also on the first look: it needs an admin.
            out.push(ModeEvent::Prohibited(
                prohibited.clone().unwrap_or_default(),
            ));
        }
        self.prohibited = prohibited;
        self.seeded = true;
        out
    }

    /// Since when the operator has seen `node` in mode `peerdown`.
    pub fn peerdown_since(&self, node: &str) -> Option<Instant> {
        self.peerdown_since.get(node).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kubeha_crds::service::{HookResult, Role};

    fn entry(
        node: &str,
        state: NodeServiceState,
        epoch: i64,
        acked: Option<i64>,
        fails: i32,
    ) -> ServiceNodeStatus {
        ServiceNodeStatus {
            node: node.into(),
            role: Role::None,
            state,
            epoch: Some(epoch),
            acked_epoch: acked,
            fail_count: fails,
            last_failure_time: None,
            hooks: vec![],
        }
    }

    fn lease(holder: &str, epoch: i64) -> LeaseState {
        LeaseState {
            holder: Some(holder.into()),
            epoch,
            standby: None,
            enter_epoch: Some(epoch),
            cleared_node: Some(holder.into()),
        }
    }

    fn reasons(s: &Seen) -> Vec<(&'static str, &str)> {
        s.transitions
            .iter()
            .map(|t| (t.reason, t.node.as_str()))
            .collect()
    }

    #[test]
    fn first_look_only_seeds() {
        let mut m = ServiceMemory::default();
        let t0 = Instant::now();
        let entries = vec![
            entry("a", NodeServiceState::Running, 3, Some(1), 0),
            entry("b", NodeServiceState::Failed, 2, Some(2), 1),
        ];
        let lost = BTreeSet::from(["c".to_owned()]);
        let s = m.observe(&entries, Some(&lease("a", 3)), Some("a"), &lost, t0);
        assert_eq!(s, Seen::default());
        // Nothing changed: still nothing.
        let s = m.observe(&entries, Some(&lease("a", 3)), Some("a"), &lost, t0);
        assert_eq!(s, Seen::default());
    }

    #[test]
    fn a_failover_is_announced_once_with_its_duration() {
        let mut m = ServiceMemory::default();
        let t0 = Instant::now();
        let none = BTreeSet::new();
        let before = vec![
            entry("a", NodeServiceState::Running, 3, None, 0),
            entry("b", NodeServiceState::Stopped, 0, None, 0),
        ];
        m.observe(&before, Some(&lease("a", 3)), Some("a"), &none, t0);
        m.note_written("b", 4, "Failover", t0);
        // a leaves cleanly, b runs.
        let after = vec![
            entry("a", NodeServiceState::Stopped, 3, Some(3), 0),
            entry("b", NodeServiceState::Running, 4, None, 0),
        ];
        let s = m.observe(
            &after,
            Some(&lease("b", 4)),
            Some("a"),
            &none,
            t0 + Duration::from_millis(700),
        );
        assert_eq!(reasons(&s), vec![("TakeOver", "b"), ("GiveAway", "a")]);
        assert_eq!(
            s.completed,
            Some(Completed {
                reason: "Failover".into(),
                duration: Duration::from_millis(700)
            })
        );
        let s = m.observe(&after, Some(&lease("b", 4)), Some("a"), &none, t0);
        assert!(s.transitions.is_empty() && s.completed.is_none());
        // Back on the primary.
        let back = vec![
            entry("a", NodeServiceState::Running, 5, Some(3), 0),
            entry("b", NodeServiceState::Stopped, 4, Some(4), 0),
        ];
        let s = m.observe(&back, Some(&lease("a", 5)), Some("a"), &none, t0);
        assert_eq!(reasons(&s), vec![("TakeBack", "a"), ("GiveBack", "b")]);
    }

    /// chaos seed 5: every operator leader kill restarted the failure
    /// timeout of every failure from zero, so a service failed once on each
    /// node stayed Errored for good under `failureTimeoutSeconds: 60`.
    #[test]
    fn a_fresh_memory_dates_a_failure_from_the_entrys_last_failure_time() {
        let mut m = ServiceMemory::default();
        let now = Instant::now();
        let wall: jiff::Timestamp = "2026-12-06T13:40:00Z".parse().unwrap();
        let mut e = entry("a", NodeServiceState::Stopped, 3, None, 1);
        e.last_failure_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-06T13:39:15Z".parse().unwrap(),
        ));
        let mut ahead = entry("b", NodeServiceState::Stopped, 3, None, 2);
        ahead.last_failure_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-06T13:40:02Z".parse().unwrap(),
        ));
        let bare = entry("c", NodeServiceState::Stopped, 3, None, 1);
        m.note_failures(&[e, ahead, bare], now, wall);
        let f = m.failures(now);
        assert_eq!(f["a"].last_failure_ago, Duration::from_secs(45));
        assert_eq!(
            f["b"].last_failure_ago,
            Duration::ZERO,
            "a node clock ahead counts as now"
        );
        assert_eq!(f["c"].last_failure_ago, Duration::ZERO);
    }

    #[test]
    fn failures_and_fences_are_announced() {
        let mut m = ServiceMemory::default();
        let t0 = Instant::now();
        let mut e = entry("a", NodeServiceState::Running, 3, None, 0);
        m.note_failures(std::slice::from_ref(&e), t0, jiff::Timestamp::UNIX_EPOCH);
        m.observe(
            std::slice::from_ref(&e),
            Some(&lease("a", 3)),
            None,
            &BTreeSet::new(),
            t0,
        );
        e.state = NodeServiceState::Failed;
        e.fail_count = 1;
        e.hooks = vec![HookResult {
            script: "E10start".into(),
            action: "enter".into(),
            exit_code: Some(3),
            outcome: HookOutcome::Failed,
            duration_ms: 5,
            finished_at: None,
            output_tail: vec!["cannot mount".into()],
        }];
        let t1 = t0 + Duration::from_secs(2);
        m.note_failures(std::slice::from_ref(&e), t1, jiff::Timestamp::UNIX_EPOCH);
        let lost = BTreeSet::from(["a".to_owned()]);
        let s = m.observe(
            std::slice::from_ref(&e),
            Some(&lease("a", 3)),
            None,
            &lost,
            t1,
        );
        assert_eq!(reasons(&s), vec![("HookFailed", "a"), ("Fenced", "a")]);
        assert!(
            s.transitions[0].message.contains("cannot mount"),
            "{}",
            s.transitions[0].message
        );
        assert!(s.transitions.iter().all(|t| t.warning));
        assert_eq!(
            m.failed_for("a", t1 + Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        let f = m.failures(t1 + Duration::from_secs(5));
        assert_eq!(f["a"].count, 1);
        assert_eq!(f["a"].last_failure_ago, Duration::from_secs(5));
        // The same count again keeps its time; a reset forgets it.
        m.note_failures(
            std::slice::from_ref(&e),
            t1 + Duration::from_secs(9),
            jiff::Timestamp::UNIX_EPOCH,
        );
        assert_eq!(
            m.failures(t1 + Duration::from_secs(10))["a"].last_failure_ago,
            Duration::from_secs(10)
        );
        e.fail_count = 0;
        m.note_failures(std::slice::from_ref(&e), t1, jiff::Timestamp::UNIX_EPOCH);
        assert!(m.failures(t1).is_empty());
        // An admin's clear: count 0 and the entry Stopped again.
        assert!(m.failed_for("a", t1).is_some(), "still Failed");
        e.state = NodeServiceState::Stopped;
        m.note_failures(std::slice::from_ref(&e), t1, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(m.failed_for("a", t1), None);
    }

    #[test]
    fn cluster_modes_and_peerdown_marks() {
        let mut m = ClusterMemory::default();
        let t0 = Instant::now();
        let modes = vec![
            ("a".to_owned(), Mode::Default),
            ("b".to_owned(), Mode::Peerdown),
        ];
        assert!(m.observe(&modes, None, t0).is_empty());
        assert_eq!(m.peerdown_since("b"), Some(t0));
        let t1 = t0 + Duration::from_secs(1);
        let modes = vec![
            ("a".to_owned(), Mode::Single),
            ("b".to_owned(), Mode::Peerdown),
        ];
        assert_eq!(
            m.observe(&modes, None, t1),
            vec![ModeEvent::Changed {
                node: "a".into(),
                from: Mode::Default,
                to: Mode::Single
            }]
        );
        assert_eq!(m.peerdown_since("b"), Some(t0), "mark time kept");
        let modes = vec![
            ("a".to_owned(), Mode::Single),
            ("b".to_owned(), Mode::Default),
        ];
        let ev = m.observe(&modes, Some("bad"), t1);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1], ModeEvent::Prohibited("bad".into()));
        assert_eq!(m.peerdown_since("b"), None);
        // The same prohibited state is reported once.
        assert!(m.observe(&modes, Some("bad"), t1).is_empty());
    }
}
