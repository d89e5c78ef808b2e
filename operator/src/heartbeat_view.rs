//! The operator's view of the member heartbeats of one HACluster.
//!
//! Expiry is judged as client-go judges a Lease: by the observer's own
//! monotonic clock since it last saw the Lease *change* (its
//! `resourceVersion` or `renewTime`), plus the skew allowance; wall-clock
//! timestamps written by other machines are never compared with ours.
//! Everything here is pure: the caller passes `now`, so tests drive the
//! clock by hand.
//!
//! With E = D (lease duration) + the clock-skew allowance, a member is:
//!
//! - **Alive** while its Lease was seen to change less than E ago.
//! - **Lost** once it has not been seen to change for E. The agent counts
//!   its own renews from the instant it *sent* them, which is never later
//!   than the instant the operator sees the change, so by then the agent has
//!   gone without a successful renew for at least E > RD: it has dropped its
//!   VIPs (at RD), its leave hooks ran out at D, and the kernel lifetime of
//!   its VIPs (< E) has expired even if the agent itself is frozen. The
//!   operator therefore treats Lost as fenced: the next holder may enter.
//! - **Fenced** once it has stayed Lost for a further E (2E without a
//!   change): the settled state, reported to admins; by then the fence
//!   action (kill hooks, reset hook) has had a whole extra E to finish.
//!   A member in mode `peerdown` that is not Alive is also Fenced (an admin
//!   certified it powered off), see [`with_mode`].
//!
//! A member whose Lease the operator has never seen is not Alive; for the
//! first E after the view started it is *unknown* (an agent that renews
//! would have written its Lease within that time), reported as
//! [`HeartbeatState::Stopping`] because that state is neither eligible nor
//! fenced; after E it is Lost and after 2E Fenced, as if last seen when the
//! view started. A Lease seen for the first time counts as a change at that
//! instant (the observer assumes a fresh renew, as client-go does), so an
//! operator that restarts never declares anybody Lost earlier than E after
//! it started.
//!
//! ## Gaps in the observer's own view
//!
//! The rule above holds only while the operator is able to observe. After a
//! *gap* in its view (its process paused, its heartbeat watch failed or
//! restarted, its leadership just acquired), the quiet periods it measured
//! no longer prove anything: renews may have been written that it has not
//! seen yet, and whether the watch delivers them before the next reconcile
//! reads the view decided, before this rule, whether a healthy master was
//! moved. So:
//!
//! - While a gap is open ([`HeartbeatView::open_gap`]) every member is
//!   judged as of the instant the gap began: nobody turns Lost or Fenced,
//!   and a renew seen meanwhile is a renew of the state the member had then
//!   (a member Alive before the gap stays Alive, never "returns").
//! - The gap closes ([`HeartbeatView::close_gap`]) only after a quorum read
//!   of every heartbeat Lease that started after the gap was detected, each
//!   result passed to [`HeartbeatView::observe`] at the instant the read
//!   returned. A Lease that changed restarts its member's clock from that
//!   read, as client-go's leader election does for an observed record.
//! - A Lease that did not change (same `resourceVersion`) keeps its clock:
//!   the read proves that nothing was written to it between the change the
//!   operator last saw and the read, so the quiet period measured from that
//!   change is one the operator observed, gap or not. Restarting that clock
//!   too would buy no safety and would make a powered-off member Alive
//!   (eligible) again for another E after every gap.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kubeha_crds::Mode;
use kubeha_crds::cluster::{HeartbeatState, HeartbeatTiming};

/// The part of a cluster's heartbeat timing the observer needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// D: the lease duration.
    pub lease_duration: Duration,
    /// The clock-skew and scheduling allowance added to D.
    pub clock_skew: Duration,
}

impl Timing {
    /// E = D + skew: how long a Lease may stay unchanged before the member
    /// is Lost.
    pub fn expiry(&self) -> Duration {
        self.lease_duration + self.clock_skew
    }
}

impl From<&HeartbeatTiming> for Timing {
    fn from(t: &HeartbeatTiming) -> Self {
        let ms = |v: i32| Duration::from_millis(u64::try_from(v).unwrap_or(0));
        Self {
            lease_duration: ms(t.lease_duration_ms),
            clock_skew: ms(t.clock_skew_ms),
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self::from(&HeartbeatTiming::default())
    }
}

/// What identifies one version of a heartbeat Lease: a change of either
/// field is a renew.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// `spec.renewTime`, as written.
    pub renew_time: Option<String>,
    /// E of the timing the agent renewed under
    /// ([`kubeha_crds::leases::EXPIRY_MS_ANNOTATION`]); counted as at most
    /// [`MAX_ANNOUNCED_EXPIRY`].
    pub announced_expiry: Option<Duration>,
    /// The node renewed in mode `single` or `config`
    /// ([`kubeha_crds::leases::EXCLUSIVE_MODE_ANNOTATION`]): HA monitoring
    /// is off there, so when cut off it keeps what it holds instead of
    /// fencing itself, and its Lost heartbeat is no fence.
    pub exclusive: bool,
}

/// The longest E an agent may announce: the API's largest D plus its
/// largest skew allowance.
pub const MAX_ANNOUNCED_EXPIRY: Duration = Duration::from_millis(300_000 + 10_000);

impl Fingerprint {
    /// The fingerprint of a Lease.
    pub fn of(lease: &Lease) -> Self {
        Self {
            resource_version: lease.metadata.resource_version.clone(),
            renew_time: lease
                .spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0.to_string()),
            announced_expiry: kubeha_crds::leases::heartbeat_expiry(lease),
            exclusive: kubeha_crds::leases::heartbeat_exclusive(lease),
        }
    }
}

/// What one observation of a heartbeat Lease meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// First sight of this member's Lease.
    New,
    /// A renew of a member that was Alive.
    Renewed,
    /// A renew of a member that was Lost or Fenced: it is back.
    Returned,
    /// The same version as before (a re-list, a duplicate event).
    Unchanged,
}

impl Observation {
    /// Whether this observation changed the member's heartbeat state (so
    /// placement may decide differently).
    pub fn changes_state(self) -> bool {
        matches!(self, Observation::New | Observation::Returned)
    }
}

#[derive(Clone, Debug)]
struct Seen {
    fingerprint: Fingerprint,
    last_change: Instant,
    /// Start of the current run of Alive.
    alive_since: Instant,
}

/// The heartbeat view of one cluster.
#[derive(Clone, Debug)]
pub struct HeartbeatView {
    timing: Timing,
    started: Instant,
    nodes: BTreeMap<String, Seen>,
    /// When a member last became able to run services (mode and cordon),
    /// for [`HeartbeatView::eligible_for`].
    capable_since: BTreeMap<String, Instant>,
    /// Start of an open gap in the observer's view (see the module docs).
    gap: Option<Instant>,
}

impl HeartbeatView {
    /// An empty view that starts judging at `now`.
    pub fn new(timing: Timing, now: Instant) -> Self {
        Self {
            timing,
            started: now,
            nodes: BTreeMap::new(),
            capable_since: BTreeMap::new(),
            gap: None,
        }
    }

    /// Records a gap in the observer's view that began at `since`: until
    /// [`HeartbeatView::close_gap`], members are judged as of `since`. A
    /// second gap before the first closed extends the first.
    pub fn open_gap(&mut self, since: Instant) {
        self.gap = Some(self.gap.map_or(since, |g| g.min(since)));
    }

    /// Ends the gap: call after every Lease of a quorum read that started
    /// after the gap was detected has been observed.
    pub fn close_gap(&mut self) {
        self.gap = None;
    }

    /// Whether a gap is open (the view waits for a quorum read).
    pub fn in_gap(&self) -> bool {
        self.gap.is_some()
    }

    /// The instant `now` is judged as: the start of an open gap, if any.
    fn judged_at(&self, now: Instant) -> Instant {
        self.gap.map_or(now, |g| g.min(now))
    }

    /// The timing in force.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Changes the timing (the cluster's spec changed); history is kept.
    pub fn set_timing(&mut self, timing: Timing) {
        self.timing = timing;
    }

    /// E for an observation: the timing in force, or the longer one the
    /// agent announced when it renewed (a lowered D is never applied to
    /// renews made under the old one).
    fn expiry_of(&self, seen: Option<&Seen>) -> Duration {
        let announced = seen.and_then(|s| s.fingerprint.announced_expiry);
        let announced = announced.unwrap_or_default().min(MAX_ANNOUNCED_EXPIRY);
        self.timing.expiry().max(announced)
    }

    /// Records that the operator saw `node`'s heartbeat Lease with this
    /// fingerprint at `now`.
    pub fn observe(&mut self, node: &str, fingerprint: Fingerprint, now: Instant) -> Observation {
        let expiry = self.expiry_of(self.nodes.get(node));
        let judged_at = self.judged_at(now);
        match self.nodes.get_mut(node) {
            None => {
                self.nodes.insert(
                    node.to_owned(),
                    Seen {
                        fingerprint,
                        last_change: now,
                        alive_since: now,
                    },
                );
                Observation::New
            }
            Some(seen) if seen.fingerprint == fingerprint => Observation::Unchanged,
            Some(seen) => {
                let was_alive = judged_at.saturating_duration_since(seen.last_change) < expiry;
                seen.fingerprint = fingerprint;
                seen.last_change = now.max(seen.last_change);
                if was_alive {
                    Observation::Renewed
                } else {
                    seen.alive_since = seen.last_change;
                    Observation::Returned
                }
            }
        }
    }

    /// Whether `node`'s last renew seen announced mode `single` or
    /// `config` (see [`Fingerprint::exclusive`]).
    pub fn renewed_exclusive(&self, node: &str) -> bool {
        self.fingerprint(node).is_some_and(|f| f.exclusive)
    }

    /// The fingerprint last seen for `node`.
    pub fn fingerprint(&self, node: &str) -> Option<&Fingerprint> {
        self.nodes.get(node).map(|s| &s.fingerprint)
    }

    /// When `node`'s Lease was last seen to change.
    pub fn last_change(&self, node: &str) -> Option<Instant> {
        self.nodes.get(node).map(|s| s.last_change)
    }

    /// Whether `node`'s Lease was seen to change after `instant`.
    pub fn changed_since(&self, node: &str, instant: Instant) -> bool {
        self.last_change(node).is_some_and(|t| t > instant)
    }

    /// Forgets a node (no longer a member and no Lease left).
    pub fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
        self.capable_since.remove(node);
    }

    /// Nodes whose Lease has been seen, in name order.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// `node`'s heartbeat at `now`, regardless of its mode (see
    /// [`with_mode`]). Any name may be asked; a name never seen is judged
    /// from the instant the view started.
    pub fn state(&self, node: &str, now: Instant) -> HeartbeatState {
        let expiry = self.expiry_of(self.nodes.get(node));
        let now = self.judged_at(now);
        match self.nodes.get(node) {
            Some(seen) => {
                let quiet = now.saturating_duration_since(seen.last_change);
                if quiet < expiry {
                    HeartbeatState::Alive
                } else if quiet < expiry * 2 {
                    HeartbeatState::Lost
                } else {
                    HeartbeatState::Fenced
                }
            }
            None => {
                let quiet = now.saturating_duration_since(self.started);
                if quiet < expiry {
                    // Unknown: neither eligible nor fenced.
                    HeartbeatState::Stopping
                } else if quiet < expiry * 2 {
                    HeartbeatState::Lost
                } else {
                    HeartbeatState::Fenced
                }
            }
        }
    }

    /// Records whether `node` may run services apart from its heartbeat
    /// (mode allows services, not cordoned), as seen at `now`.
    pub fn note_capable(&mut self, node: &str, capable: bool, now: Instant) {
        if capable {
            self.capable_since.entry(node.to_owned()).or_insert(now);
        } else {
            self.capable_since.remove(node);
        }
    }

    /// Forgets when the nodes `member` rejects became capable: former
    /// members are not asked, and one that joins again starts afresh.
    pub fn retain_capable(&mut self, member: impl Fn(&str) -> bool) {
        self.capable_since.retain(|n, _| member(n));
    }

    /// How long `node` has been continuously Alive and capable (see
    /// [`HeartbeatView::note_capable`]); zero when it is not both now.
    /// Drives the failback delay.
    pub fn eligible_for(&self, node: &str, now: Instant) -> Duration {
        if self.state(node, now) != HeartbeatState::Alive {
            return Duration::ZERO;
        }
        let (Some(seen), Some(capable)) = (self.nodes.get(node), self.capable_since.get(node))
        else {
            return Duration::ZERO;
        };
        now.saturating_duration_since(seen.alive_since.max(*capable))
    }

    /// The next instant after `now` at which some node's state changes by
    /// the passing of time alone (Alive -> Lost, Lost -> Fenced, unknown ->
    /// Lost); `None` when nothing is pending or a gap is open (nothing
    /// expires until the gap closes). `names` adds members whose Lease has
    /// never been seen.
    pub fn next_expiry<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Option<Instant> {
        if self.in_gap() {
            return None;
        }
        let mut bases: Vec<(Instant, Duration)> = self
            .nodes
            .values()
            .map(|s| (s.last_change, self.expiry_of(Some(s))))
            .collect();
        if names.into_iter().any(|n| !self.nodes.contains_key(n)) {
            bases.push((self.started, self.expiry_of(None)));
        }
        bases
            .into_iter()
            .flat_map(|(t, expiry)| [t + expiry, t + expiry * 2])
            .filter(|t| *t > now)
            .min()
    }
}

/// A member's heartbeat as reported and used for placement: a `peerdown`
/// member that is not Alive is Fenced (certified powered off).
pub fn with_mode(state: HeartbeatState, mode: Mode) -> HeartbeatState {
    if mode == Mode::Peerdown && state != HeartbeatState::Alive {
        HeartbeatState::Fenced
    } else {
        state
    }
}

/// Whether a node certainly runs nothing: Lost or Fenced by the operator's
/// clock, or certified powered off (`peerdown`).
pub fn certainly_fenced(state: HeartbeatState, mode: Option<Mode>) -> bool {
    mode == Some(Mode::Peerdown) || matches!(state, HeartbeatState::Lost | HeartbeatState::Fenced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use HeartbeatState::*;

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_millis(3000),
            clock_skew: Duration::from_millis(500),
        }
    }

    fn fp(rv: &str) -> Fingerprint {
        Fingerprint {
            resource_version: Some(rv.to_owned()),
            renew_time: None,
            announced_expiry: None,
            exclusive: false,
        }
    }

    #[test]
    fn a_lowered_d_is_not_applied_to_renews_made_under_the_old_one() {
        let t0 = Instant::now();
        let long = Timing {
            lease_duration: ms(10_000),
            clock_skew: ms(500),
        };
        let mut v = HeartbeatView::new(long, t0);
        let under = |rv: &str, e: u64| Fingerprint {
            announced_expiry: Some(ms(e)),
            exclusive: false,
            ..fp(rv)
        };
        v.observe("a", under("1", 10_500), t0);
        // The spec lowers D to 3 s right after that renew.
        v.set_timing(timing());
        assert_eq!(
            v.state("a", t0 + ms(3500)),
            Alive,
            "judged by the E it renewed under"
        );
        assert_eq!(v.state("a", t0 + ms(10_499)), Alive);
        assert_eq!(v.state("a", t0 + ms(10_500)), Lost);
        assert_eq!(v.next_expiry([], t0 + ms(1)), Some(t0 + ms(10_500)));
        // A renew under the new timing is judged by it.
        v.observe("a", under("2", 3500), t0 + ms(11_000));
        assert_eq!(v.state("a", t0 + ms(14_499)), Alive);
        assert_eq!(v.state("a", t0 + ms(14_500)), Lost);
        // A raised D counts at once, and an absurd announcement is capped.
        v.set_timing(long);
        assert_eq!(v.state("a", t0 + ms(14_500)), Alive);
        v.observe("a", under("3", u64::MAX / 2), t0 + ms(20_000));
        assert_eq!(v.state("a", t0 + ms(20_000) + MAX_ANNOUNCED_EXPIRY), Lost);
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn alive_lost_fenced_by_the_observers_clock() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        assert_eq!(v.observe("a", fp("1"), t0), Observation::New);
        assert_eq!(v.state("a", t0 + ms(3499)), Alive);
        assert_eq!(v.state("a", t0 + ms(3500)), Lost, "exactly at D + skew");
        assert_eq!(v.state("a", t0 + ms(6999)), Lost);
        assert_eq!(v.state("a", t0 + ms(7000)), Fenced, "Lost for another E");
    }

    #[test]
    fn only_a_change_counts_as_a_renew() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        v.observe("a", fp("1"), t0);
        // A re-list delivers the same version: no renew.
        assert_eq!(
            v.observe("a", fp("1"), t0 + ms(3000)),
            Observation::Unchanged
        );
        assert_eq!(v.state("a", t0 + ms(3500)), Lost);
        // renewTime alone changing is a change too.
        let mut v = HeartbeatView::new(timing(), t0);
        v.observe("a", fp("1"), t0);
        let renewed = Fingerprint {
            resource_version: Some("1".into()),
            renew_time: Some("later".into()),
            announced_expiry: None,
            exclusive: false,
        };
        assert_eq!(v.observe("a", renewed, t0 + ms(1000)), Observation::Renewed);
        assert_eq!(v.state("a", t0 + ms(4000)), Alive);
    }

    #[test]
    fn a_lost_member_that_renews_has_returned() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        v.observe("a", fp("1"), t0);
        assert_eq!(v.observe("a", fp("2"), t0 + ms(1000)), Observation::Renewed);
        assert_eq!(
            v.observe("a", fp("3"), t0 + ms(9000)),
            Observation::Returned
        );
        assert_eq!(v.state("a", t0 + ms(9000)), Alive);
        assert!(Observation::Returned.changes_state());
        assert!(!Observation::Renewed.changes_state());
    }

    #[test]
    fn never_seen_members_are_unknown_then_lost() {
        let t0 = Instant::now();
        let v = HeartbeatView::new(timing(), t0);
        assert_eq!(
            v.state("ghost", t0),
            Stopping,
            "unknown: not eligible, not fenced"
        );
        assert_eq!(v.state("ghost", t0 + ms(3500)), Lost);
        assert_eq!(v.state("ghost", t0 + ms(7000)), Fenced);
    }

    #[test]
    fn next_expiry_is_the_exact_flip() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        v.observe("a", fp("1"), t0);
        v.observe("b", fp("1"), t0 + ms(1000));
        assert_eq!(v.next_expiry(["a", "b"], t0), Some(t0 + ms(3500)));
        assert_eq!(
            v.next_expiry(["a", "b"], t0 + ms(3500)),
            Some(t0 + ms(4500))
        );
        assert_eq!(
            v.next_expiry(["a", "b"], t0 + ms(4500)),
            Some(t0 + ms(7000))
        );
        assert_eq!(
            v.next_expiry(["a", "b"], t0 + ms(8000)),
            None,
            "all settled"
        );
        // The flip instant really flips the state.
        assert_eq!(v.state("b", t0 + ms(4500)), Lost);
        // A member never seen expires from the view's start.
        let v = HeartbeatView::new(timing(), t0);
        assert_eq!(v.next_expiry(["x"], t0), Some(t0 + ms(3500)));
        assert_eq!(v.next_expiry([], t0), None);
    }

    #[test]
    fn eligible_for_counts_alive_and_capable() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        v.observe("a", fp("1"), t0);
        assert_eq!(
            v.eligible_for("a", t0 + ms(1000)),
            Duration::ZERO,
            "not noted capable"
        );
        v.note_capable("a", true, t0 + ms(500));
        v.observe("a", fp("2"), t0 + ms(2000));
        assert_eq!(v.eligible_for("a", t0 + ms(3000)), ms(2500));
        // Noting capable again keeps the start.
        v.note_capable("a", true, t0 + ms(2500));
        assert_eq!(v.eligible_for("a", t0 + ms(3000)), ms(2500));
        // Lost resets the run; the return starts a new one.
        assert_eq!(v.eligible_for("a", t0 + ms(6000)), Duration::ZERO);
        v.observe("a", fp("3"), t0 + ms(8000));
        assert_eq!(v.eligible_for("a", t0 + ms(9000)), ms(1000));
        // Locked (not capable) resets it too.
        v.note_capable("a", false, t0 + ms(9000));
        v.note_capable("a", true, t0 + ms(9500));
        assert_eq!(v.eligible_for("a", t0 + ms(10000)), ms(500));
    }

    #[test]
    fn a_former_member_is_not_remembered_as_capable() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        for n in ["a", "b"] {
            v.observe(n, fp("1"), t0);
            v.note_capable(n, true, t0);
        }
        v.retain_capable(|n| n == "a");
        assert_eq!(v.capable_since.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(v.eligible_for("a", t0 + ms(1000)), ms(1000));
        // b joins again: capable from then on, not from before it left.
        v.note_capable("b", true, t0 + ms(800));
        assert_eq!(v.eligible_for("b", t0 + ms(1000)), ms(200));
    }

    /// Issue 14's rule (module docs, "Gaps in the observer's own view"),
    /// with E = 3.5 s: a gap never makes a member Lost or "returned", and a
    /// quorum read restarts the clock of a changed Lease only.
    ///
    /// A row: the member's Lease version "1" seen at t0 (or never: `seen`
    /// false); a gap that begins at `gap` and is detected at `detected`
    /// (ms); a version the watch delivers during the gap (when, and what it
    /// means); the state asked during the gap (at `detected` + 50); the
    /// version the quorum read returns (None: no Lease) and when; the state
    /// right after the gap closed.
    #[test]
    fn a_gap_judges_from_its_start_until_a_quorum_read_closes_it() {
        use Observation::{Renewed, Returned};
        type Watch = Option<(&'static str, u64, Observation)>;
        type Row = (
            &'static str,
            bool,
            u64,
            u64,
            Watch,
            HeartbeatState,
            Option<&'static str>,
            u64,
            HeartbeatState,
        );
        #[rustfmt::skip]
        let rows: [Row; 8] = [
            // Frozen 9 s, every node renews: the watch delivers first, or
            // the quorum read comes first.
            ("frozen, watch first", true, 500, 9500, Some(("9", 9600, Renewed)), Alive, Some("9"), 9700, Alive),
            ("frozen, read first", true, 500, 9500, None, Alive, Some("9"), 9700, Alive),
            // Powered off as the freeze began: no failover wait added.
            ("off, frozen", true, 500, 9500, None, Alive, Some("1"), 9700, Fenced),
            // Powered off 2 s before a watch restart.
            ("off, watch restart", true, 2000, 2000, None, Alive, Some("1"), 4000, Lost),
            // Lost before the gap: still quiet, or renewing during it.
            ("lost, quiet", true, 5000, 9500, None, Lost, Some("1"), 9700, Fenced),
            ("lost, back", true, 5000, 9500, Some(("2", 9600, Returned)), Lost, Some("2"), 9700, Alive),
            // Never seen: the read has its first Lease, or none either.
            ("new in the read", false, 500, 9500, None, Stopping, Some("1"), 9700, Alive),
            ("never", false, 500, 9500, None, Stopping, None, 9700, Fenced),
        ];
        for (what, seen, gap, detected, watch, during, read, read_at, after) in rows {
            let t0 = Instant::now();
            let at = |v: u64| t0 + ms(v);
            let mut v = HeartbeatView::new(timing(), t0);
            if seen {
                v.observe("a", fp("1"), t0);
            }
            v.open_gap(at(gap));
            assert!(v.in_gap());
            assert_eq!(
                v.next_expiry(["a"], at(detected)),
                None,
                "{what}: nothing expires in a gap"
            );
            assert_eq!(
                v.state("a", at(detected + 50)),
                during,
                "{what}: during the gap"
            );
            if let Some((rv, t, meaning)) = watch {
                assert_eq!(
                    v.observe("a", fp(rv), at(t)),
                    meaning,
                    "{what}: the watch event"
                );
            }
            if let Some(rv) = read {
                v.observe("a", fp(rv), at(read_at));
            }
            v.close_gap();
            assert_eq!(
                v.state("a", at(read_at)),
                after,
                "{what}: after the quorum read"
            );
        }
    }

    #[test]
    fn a_second_gap_extends_the_first() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        v.observe("a", fp("1"), t0);
        v.open_gap(t0 + ms(1000));
        v.open_gap(t0 + ms(5000));
        assert_eq!(v.state("a", t0 + ms(6000)), Alive, "judged at 1 s");
        v.close_gap();
        assert!(!v.in_gap());
        assert_eq!(v.state("a", t0 + ms(6000)), Lost);
    }

    #[test]
    fn peerdown_and_fencing() {
        assert_eq!(with_mode(Lost, Mode::Peerdown), Fenced);
        assert_eq!(with_mode(Stopping, Mode::Peerdown), Fenced);
        assert_eq!(with_mode(Alive, Mode::Peerdown), Alive);
        assert_eq!(with_mode(Lost, Mode::Default), Lost);
        assert!(certainly_fenced(Alive, Some(Mode::Peerdown)));
        assert!(certainly_fenced(Lost, Some(Mode::Default)));
        assert!(certainly_fenced(Fenced, None));
        assert!(!certainly_fenced(Alive, Some(Mode::Locked)));
        assert!(!certainly_fenced(Stopping, None), "unknown is not fenced");
    }

    #[test]
    fn changed_since_marks() {
        let t0 = Instant::now();
        let mut v = HeartbeatView::new(timing(), t0);
        v.observe("a", fp("1"), t0);
        assert!(!v.changed_since("a", t0 + ms(10)));
        v.observe("a", fp("2"), t0 + ms(20));
        assert!(v.changed_since("a", t0 + ms(10)));
        assert!(!v.changed_since("zz", t0));
    }
}
