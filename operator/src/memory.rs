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
use kubeha_crds::roles::Transition;
use kubeha_crds::service::{HookOutcome, NodeServiceState, ServiceNodeStatus};

use crate::handover::LeaseState;
use crate::placement::Failures;

/// A change the operator saw (a role change completed, a hook failure, a
/// fence), to announce as an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
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

/// A placement completed: the new master reported Running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// Why the master was written (`Initial`, `Failover`, `Failback`, `Move`).
    pub reason: String,
    /// From the Lease write to the Running report.
    pub duration: Duration,
}

/// What one observation of a service produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Changes to announce.
    pub announcements: Vec<Announcement>,
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
                        unclean: false,
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
                seen.announcements.push(Announcement {
                    reason: Transition::of(true, is_primary(h)).reason(),
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
                    seen.announcements.push(Announcement {
                        reason: Transition::of(false, is_primary(&e.node)).reason(),
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
                seen.announcements.push(Announcement {
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
                seen.announcements.push(Announcement {
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

/// The least time between two HACluster status writes of which the later
/// changes only the members' service roles and the count of active
/// services (issue 11: with 1,000 services, the status lists 2,000 roles,
/// and one rewrite per service placed went to every agent's watch).
pub const ROLES_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Memory of one cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterMemory {
    seeded: bool,
    modes: BTreeMap<String, Mode>,
    peerdown_since: BTreeMap<String, Instant>,
    prohibited: Option<String>,
    /// When the operator last wrote the cluster's status.
    status_written: Option<Instant>,
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

    /// When a status write that changes only roles may go out: `now`, or
    /// [`ROLES_WRITE_INTERVAL`] after the last status write.
    pub fn roles_write_at(&self, now: Instant) -> Instant {
        self.status_written
            .map_or(now, |t| (t + ROLES_WRITE_INTERVAL).max(now))
    }

    /// Notes a status write at `now`.
    pub fn note_status_written(&mut self, now: Instant) {
        self.status_written = Some(now);
    }
}

#[cfg(test)]
mod tests;
