//! The move detector: every change of a service's master during the run
//! must have a cause among the faults injected.
//!
//! A sampler thread reads every chaos service's Lease (one `kubectl get
//! leases` every [`MASTER_POLL`]): `spec.holderIdentity` is the master,
//! `spec.leaseTransitions` the epoch. A change is the holder going from a
//! node to another node, or to nobody (the service stopped); the node it
//! next goes to from nobody ends that same change, it is not a new one.
//! A poll that fails, or whose output does not parse, is skipped and
//! counted: the change it would have shown is seen by the next one.
//!
//! Each change is then judged against the faults ([`spurious`]): it is
//! caused when a fault that can move that service off that node
//! ([`can_cause`]) ran, or ended at most a grace ([`grace`]) before, while
//! the change happened. A change without a cause is a spurious move.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::services::service_name;
use super::{CLUSTER, Kind};
use crate::ha::{self, Timing};
use crate::lab::Lab;
use crate::nodes;

/// How often the sampler reads the Leases: a kubectl process costs a
/// noticeable share of one of this machine's two cores, more than the
/// lab's own processes can spare under chaos, and the judge's grace
/// (seconds) does not need the changes timed any closer.
pub(super) const MASTER_POLL: Duration = Duration::from_secs(1);

/// One injected fault as the judge sees it: what it hit, and when it ran
/// (since the run started).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Fault {
    /// Its number in the run (`#n` in the log).
    n: usize,
    /// Its kind.
    kind: Kind,
    /// The node it hit (agent, power, partition and mode faults), or a
    /// move's destination; `None` for the other kinds.
    node: Option<u8>,
    /// The service it hit (moves, VIP edits, monitor faults).
    service: Option<usize>,
    /// When it began.
    start: Duration,
    /// When it was undone (a monitor fault: once the service left the
    /// node, or 40 s passed).
    end: Duration,
}

impl Fault {
    /// Fault `n` of `kind` with the node and service the run drew for it;
    /// the node is kept only for the kinds that use it.
    pub(super) fn new(
        n: usize,
        kind: Kind,
        node: u8,
        service: Option<usize>,
        start: Duration,
        end: Duration,
    ) -> Self {
        let uses_node = matches!(
            kind,
            Kind::AgentKill
                | Kind::AgentStop
                | Kind::PowerOff
                | Kind::Partition
                | Kind::ModeChange
                | Kind::Move
        );
        Self {
            n,
            kind,
            node: uses_node.then_some(node),
            service,
            start,
            end,
        }
    }
}

/// A change of a service's master.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Change {
    /// The service (its index).
    service: usize,
    /// The node that was master.
    from: u8,
    /// The node that became master; `None` while (or if, at the end) none
    /// did.
    to: Option<u8>,
    /// The epoch the change was seen at.
    epoch: i64,
    /// When the last poll that still showed `from` as master was asked:
    /// the change came after that...
    after: Duration,
    /// ...and before the reply of the first poll that showed it.
    seen: Duration,
}

/// Each service's master as one poll shows it: the holder (`None`:
/// nobody) and the epoch. A service whose Lease is absent, or names a
/// holder that is no lab node, is left out.
type Masters = BTreeMap<usize, (Option<u8>, i64)>;

/// The masters of services `0..services` in a `kubectl get leases -o json`
/// list (`kubeha.io/service` label, holder, epoch).
fn masters(list: &Value, services: usize) -> Masters {
    let names: BTreeMap<String, usize> = (0..services).map(|k| (service_name(k), k)).collect();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|lease| {
            let k = *names.get(lease["metadata"]["labels"]["kubeha.io/service"].as_str()?)?;
            let holder = match lease["spec"]["holderIdentity"].as_str().unwrap_or("") {
                "" => None,
                name => Some(nodes::node_index(name)?),
            };
            let epoch = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
            Some((k, (holder, epoch)))
        })
        .collect()
}

/// The changes seen so far, from the polls in order.
#[derive(Debug, Default)]
struct Tracker {
    /// Each service's master at the last poll that showed the service, and
    /// when that poll was asked.
    last: BTreeMap<usize, (Option<u8>, Duration)>,
    /// The changes, in the order seen.
    changes: Vec<Change>,
}

impl Tracker {
    /// Takes in a poll asked at `asked` and answered at `answered` (the
    /// state it shows is from somewhere between). The first poll showing a
    /// service only sets where it starts.
    fn observe(&mut self, asked: Duration, answered: Duration, masters: &Masters) {
        for (&service, &(holder, epoch)) in masters {
            let Some((before, after)) = self.last.insert(service, (holder, asked)) else {
                continue;
            };
            match (before, holder) {
                (Some(from), to) if to != Some(from) => self.changes.push(Change {
                    service,
                    from,
                    to,
                    epoch,
                    after,
                    seen: answered,
                }),
                // Started again after a stop: the end of that change.
                (None, Some(to)) => {
                    if let Some(open) = self
                        .changes
                        .iter_mut()
                        .rev()
                        .find(|c| c.service == service)
                        .filter(|c| c.to.is_none())
                    {
                        open.to = Some(to);
                    }
                }
                _ => {}
            }
        }
    }
}

/// What the sampler saw.
#[derive(Debug, Clone, Default)]
pub(super) struct Observed {
    /// Every change of a master, in the order seen.
    pub changes: Vec<Change>,
    /// Polls that gave masters.
    pub polls: usize,
    /// Polls that failed or did not parse (skipped).
    pub failed: usize,
    /// The longest time between two polls that gave masters.
    pub max_gap: Duration,
}

/// A running sampler of the chaos services' masters. Dropped without
/// [`Sampler::stop`] (the run failed meanwhile), it stops: its thread sees
/// the channel close.
pub(super) struct Sampler {
    stop: mpsc::Sender<()>,
    handle: std::thread::JoinHandle<Observed>,
}

impl Sampler {
    /// Starts polling the Leases of services `0..services`; times are
    /// taken since `started` (the run's clock, as the faults').
    pub(super) fn start(lab: &Lab, services: usize, started: Instant) -> Sampler {
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = {
            let lab = lab.clone();
            std::thread::spawn(move || {
                let selector = format!("kubeha.io/lease=service,kubeha.io/cluster={CLUSTER}");
                let args = [
                    "get",
                    "leases",
                    "-n",
                    ha::OPERATOR_NAMESPACE,
                    "-l",
                    &selector,
                    "-o",
                    "json",
                ];
                let mut seen = Observed::default();
                let mut tracker = Tracker::default();
                let mut last_poll: Option<Duration> = None;
                // Polls until told to stop, or the sampler is dropped.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(MASTER_POLL) {
                    let asked = started.elapsed();
                    let list = lab
                        .kubectl_ok(&args)
                        .ok()
                        .and_then(|out| serde_json::from_str::<Value>(&out).ok())
                        .filter(|list| list["items"].is_array());
                    let at = started.elapsed();
                    match list {
                        Some(list) => {
                            tracker.observe(asked, at, &masters(&list, services));
                            seen.polls += 1;
                            if let Some(last) = last_poll {
                                seen.max_gap = seen.max_gap.max(at - last);
                            }
                            last_poll = Some(at);
                        }
                        None => seen.failed += 1,
                    }
                }
                seen.changes = tracker.changes;
                seen
            })
        };
        Sampler { stop, handle }
    }

    /// Stops polling and says what was seen (nothing, if the thread
    /// panicked).
    pub(super) fn stop(self) -> Observed {
        let _ = self.stop.send(());
        self.handle.join().unwrap_or_default()
    }
}

/// How long after a fault ended it can still explain a move: 2 x E + 5 s,
/// E = D + skew, with the largest E among `timings` (every timing the run
/// applies, the lowered one of a timing change too).
pub(super) fn grace(timings: &[Timing]) -> Duration {
    let e = timings
        .iter()
        .map(|t| u64::from(t.lease_ms) + u64::from(t.skew_ms))
        .max()
        .unwrap_or_default();
    Duration::from_millis(2 * e) + Duration::from_secs(5)
}

/// Whether `fault`, by its kind and target, can move the service of
/// `change` off its node:
/// - a fault on that node: its agent killed or stalled, its power off, cut
///   off from the API server, or put in another mode;
/// - a fault on that service: an admin move (to any node), or its monitor
///   failing or hanging;
/// - a fault of the control plane (API server stalled, etcd restarted):
///   every agent may fence, so any service on any node.
///
/// An operator leader kill, a VIP edit, a timing change and a slow monitor
/// are no cause: none of them may move a service. Nor is a fault on the
/// node the service goes to: the chaos cluster's failback is `Never` (the
/// default, which [`cluster_spec`](super::services::cluster_spec) keeps),
/// so a node that returns takes nothing back.
fn can_cause(fault: &Fault, change: &Change) -> bool {
    match fault.kind {
        Kind::AgentKill | Kind::AgentStop | Kind::PowerOff | Kind::Partition | Kind::ModeChange => {
            fault.node == Some(change.from)
        }
        Kind::Move | Kind::HookFail | Kind::HookHang => fault.service == Some(change.service),
        Kind::ApiserverStop | Kind::EtcdRestart => true,
        Kind::OperatorLeaderKill | Kind::VipEdit | Kind::TimingChange | Kind::SlowMonitor => false,
    }
}

/// Whether `change` may have happened while `fault` ran or within `grace`
/// after it ended: the change, somewhere between its `after` and `seen`
/// polls, meets `[start, end + grace]`.
fn within(fault: &Fault, change: &Change, grace: Duration) -> bool {
    fault.start <= change.seen && change.after <= fault.end + grace
}

/// Whether `change` takes its service to the node the last admin move of
/// it asked for. `kubectl ha move` leaves `kubeha.io/move-to` on the
/// service until an admin removes it (the chaos never does), like the
/// location constraint Pacemaker's `crm resource move` leaves: whenever
/// that node can run the service again (back from a partition, a fence),
/// the service goes back to it, however long after the move.
fn to_requested_node(change: &Change, faults: &[Fault]) -> bool {
    let Some(to) = change.to else {
        return false;
    };
    faults
        .iter()
        .filter(|f| {
            f.kind == Kind::Move && f.service == Some(change.service) && f.start <= change.seen
        })
        .max_by_key(|f| f.start)
        .is_some_and(|f| f.node == Some(to))
}

/// The changes nothing explains: none of `faults` can cause it
/// ([`can_cause`]) and happened in time ([`within`]), and it does not go
/// to the node an admin asked for ([`to_requested_node`]).
pub(super) fn spurious<'a>(
    changes: &'a [Change],
    faults: &[Fault],
    grace: Duration,
) -> Vec<&'a Change> {
    changes
        .iter()
        .filter(|c| {
            !to_requested_node(c, faults)
                && !faults
                    .iter()
                    .any(|f| can_cause(f, c) && within(f, c, grace))
        })
        .collect()
}

/// A spurious move in words: the service, from and to, the epoch, when,
/// and the faults around it (those within the grace, none a cause).
pub(super) fn describe(change: &Change, faults: &[Fault], grace: Duration) -> String {
    let to = match change.to {
        Some(to) if to == change.from => "came back to it".to_owned(),
        Some(to) => format!("went to {}", nodes::node_name(to)),
        None => "stopped".to_owned(),
    };
    let around: Vec<String> = faults
        .iter()
        .filter(|f| within(f, change, grace))
        .map(|f| {
            format!(
                "#{} {} {:.2}-{:.2} s",
                f.n,
                f.kind.name(),
                f.start.as_secs_f64(),
                f.end.as_secs_f64()
            )
        })
        .collect();
    format!(
        "{} left {} and {to} (epoch {}) between {:.2} s and {:.2} s; no fault explains it (faults within {grace:.1?}: {})",
        service_name(change.service),
        nodes::node_name(change.from),
        change.epoch,
        change.after.as_secs_f64(),
        change.seen.as_secs_f64(),
        if around.is_empty() {
            "none".to_owned()
        } else {
            around.join(", ")
        }
    )
}

#[cfg(test)]
mod tests;
