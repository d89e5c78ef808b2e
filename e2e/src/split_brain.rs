//! The safety detector: was a VIP ever held by two lab nodes at once?
//!
//! Two views run side by side and both report windows:
//! - events: one `ip -ts monitor address` per node namespace reports every
//!   address added or removed (by an agent, by the kernel when a lifetime
//!   runs out) with the time it was seen; the detector keeps each node's
//!   addresses from them, at no cost while nothing changes. Events are
//!   applied in the order they arrive, one pipe per node, so a double
//!   holder shorter than the delivery jitter between two pipes (a few ms,
//!   more on a busy machine) can be missed: ordering by the printed stamps
//!   instead was tried (5350dab) and reported a false zero-length window,
//!   for `ip -ts` stamps an event when it prints it, not when the kernel
//!   made it;
//! - snapshots: every [`SNAPSHOT_EVERY`], every node's addresses are listed
//!   (one `ip` call per node, all at once), which catches anything the
//!   monitors could have missed.
//!
//! A node holds a VIP when the address is on its interface *and* the VIP's
//! packet fence there is open: an agent's nftables `live` element (see the
//! agent's `vip::packet_fence`) ends at the lease end even when the agent is
//! frozen, and the address, whose lifetime counts whole seconds, may stay
//! silent behind it for up to a second. One `nft monitor` per node reports
//! every `live` element set (with its timeout) or removed, stamped when it
//! is read (later than the kernel made it, so an end computed from it is
//! late, never early); a fence counts as open [`FENCE_SLACK`] past its end
//! for the delivery jitter between the pipes. A VIP whose fence the
//! detector has seen nothing of counts as open.
//!
//! The monitors and the snapshot thread run at a raised priority (best
//! effort), so a busy machine delays them less than the lab's processes.
//! An earlier detector only polled, every 10 ms: 500 `ip` calls a second
//! over 5 nodes, which took about one of this machine's two cores and
//! slowed the API server enough to make agents fence under chaos.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::ha::node_addresses;
use crate::nodes;

/// How often the snapshot view lists every node's addresses.
pub const SNAPSHOT_EVERY: Duration = Duration::from_millis(100);

/// The longest time between two snapshots a split-brain assertion accepts:
/// beyond it the detector was starved and its snapshot view could have
/// missed a window (the event view misses none while its monitors run).
pub const MAX_SAMPLE_GAP: Duration = Duration::from_millis(250);

/// How long past the end of a packet fence (as the detector computed it) a
/// VIP still counts as answering: the delivery jitter between an `nft
/// monitor` pipe and an `ip monitor` pipe.
pub const FENCE_SLACK: Duration = Duration::from_millis(10);

/// What a [`SplitBrain`] detector saw.
#[derive(Debug, Clone, Default)]
pub struct Sampled {
    /// Checks (after an address event, or of a snapshot) that found two or
    /// more nodes holding one VIP.
    pub double: usize,
    /// Each window in which two or more nodes held one VIP: the VIP, the
    /// nodes, and from when to when (since the detector started).
    pub windows: Vec<DoubleHolder>,
    /// Checks made: address events seen plus snapshots taken.
    pub samples: usize,
    /// The longest time between two consecutive snapshots' starts.
    pub max_gap: Duration,
}

/// A window in which two or more nodes held one VIP.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleHolder {
    /// The VIP.
    pub vip: String,
    /// The nodes that held it.
    pub nodes: Vec<u8>,
    /// When it was first seen, since the detector started.
    pub from: Duration,
    /// When it was last seen.
    pub to: Duration,
}

impl Sampled {
    /// Adds what another detector saw.
    pub fn absorb(&mut self, other: Sampled) {
        self.double += other.double;
        self.windows.extend(other.windows);
        self.samples += other.samples;
        self.max_gap = self.max_gap.max(other.max_gap);
    }

    /// Panics unless no two nodes ever held `vip` and the detector kept
    /// pace: it checked something, and its snapshots were never more than
    /// [`MAX_SAMPLE_GAP`] apart. `during` says what was watched.
    #[track_caller]
    pub fn assert_single_holder(&self, vip: &str, during: &str) {
        let Sampled {
            double,
            samples,
            max_gap,
            ref windows,
        } = *self;
        assert_eq!(
            double, 0,
            "{during}: two nodes held {vip} in {double} of {samples} checks: {windows:?}"
        );
        assert!(
            samples > 0,
            "{during}: the split-brain detector checked nothing for {vip}"
        );
        assert!(
            max_gap < MAX_SAMPLE_GAP,
            "{during}: the split-brain detector could not keep pace: {max_gap:?} between two snapshots of {vip} (limit {MAX_SAMPLE_GAP:?}, {samples} checks)"
        );
    }
}

/// A running detector over some VIPs (addresses without prefix). Dropped
/// without [`SplitBrain::stop`] (a test that failed meanwhile), it stops.
pub struct SplitBrain {
    stop: Arc<AtomicBool>,
    off: Arc<Mutex<Vec<u8>>>,
    handle: Option<std::thread::JoinHandle<Sampled>>,
}

/// Open windows per VIP, for one view.
#[derive(Default)]
struct Windows {
    open: BTreeMap<String, usize>,
}

impl Windows {
    /// Records the holders of `vip` at `at`: opens, extends or closes its
    /// window. Returns whether there were two or more.
    fn check(&mut self, seen: &mut Sampled, vip: &str, holders: Vec<u8>, at: Duration) -> bool {
        if holders.len() < 2 {
            self.open.remove(vip);
            return false;
        }
        match self.open.get(vip) {
            Some(w) if seen.windows[*w].nodes == holders => seen.windows[*w].to = at,
            _ => {
                self.open.insert(vip.to_owned(), seen.windows.len());
                seen.windows.push(DoubleHolder {
                    vip: vip.to_owned(),
                    nodes: holders,
                    from: at,
                    to: at,
                });
            }
        }
        true
    }
}

/// One line of `ip -ts monitor address`: `[TIME] [Deleted ]N: IFACE inet
/// ADDR/PLEN ...`. Returns the wall-clock time, whether it was added, and
/// the address without prefix; `None` for continuation and other lines.
fn parse_event(line: &str) -> Option<(jiff::Timestamp, bool, String)> {
    let rest = line.strip_prefix('[')?;
    let (time, rest) = rest.split_once(']')?;
    let civil: jiff::civil::DateTime = time.trim().parse().ok()?;
    let at = civil
        .to_zoned(jiff::tz::TimeZone::system())
        .ok()?
        .timestamp();
    let rest = rest.trim_start();
    let (added, rest) = match rest.strip_prefix("Deleted ") {
        Some(r) => (false, r),
        None => (true, rest),
    };
    let mut words = rest.split_whitespace();
    words.find(|w| *w == "inet" || *w == "inet6")?;
    let addr = words.next()?.split('/').next()?.to_owned();
    Some((at, added, addr))
}

/// A packet fence change from one line of `nft monitor`: the VIP and, for
/// an element set, its timeout; `None` for a removal. Other lines: `None`.
fn parse_fence(line: &str) -> Option<(String, Option<Duration>)> {
    let (added, rest) = if let Some(r) = line.strip_prefix("add element ") {
        (true, r)
    } else {
        (false, line.strip_prefix("delete element ")?)
    };
    let rest = rest
        .strip_prefix("arp kubeha live { ")
        .or_else(|| rest.strip_prefix("inet kubeha live6 { "))?;
    let mut words = rest.split_whitespace();
    let addr = words.next()?.trim_end_matches(',').to_owned();
    if !added {
        return Some((addr, None));
    }
    let timeout = words
        .skip_while(|w| *w != "timeout")
        .nth(1)
        .and_then(parse_nft_duration)?;
    Some((addr, Some(timeout)))
}

/// An nftables duration: `970ms`, `1s500ms`, `2m3s`, `1h`, `1d2h`.
fn parse_nft_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, tail) = if let Some(t) = rest.strip_prefix("ms") {
            (Duration::from_millis(1), t)
        } else if let Some(t) = rest.strip_prefix('s') {
            (Duration::from_secs(1), t)
        } else if let Some(t) = rest.strip_prefix('m') {
            (Duration::from_secs(60), t)
        } else if let Some(t) = rest.strip_prefix('h') {
            (Duration::from_secs(3600), t)
        } else if let Some(t) = rest.strip_prefix('d') {
            (Duration::from_secs(86_400), t)
        } else {
            return None;
        };
        total += unit * u32::try_from(n).ok()?;
        rest = tail;
    }
    Some(total)
}

/// Raises the priority of a thread or process (best effort: only root may).
fn raise_priority(pid: u32) {
    let _ = Command::new("renice")
        .args(["-n", "-15", "-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// What a monitor watches.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Watch {
    /// `ip -ts monitor address`.
    Addresses,
    /// `nft monitor`: the packet fences.
    Fences,
}

/// One line of a monitor, with its node and what it watches; `None` when
/// the monitor ended.
type Line = (u8, Watch, Option<String>);

/// Starts the monitor of `watch` in node `i`'s namespace and a thread that
/// sends each of its lines, with the node, to `tx`, and `None` when it
/// ends (a power-off kills every process in the node's namespace, this one
/// too).
fn monitor(i: u8, watch: Watch, tx: mpsc::Sender<Line>) -> Option<Child> {
    let ns = nodes::node_ns(i);
    let mut cmd = match watch {
        Watch::Addresses => {
            let mut c = Command::new("ip");
            c.args(["-n", &ns, "-ts", "monitor", "address"]);
            c
        }
        Watch::Fences => nodes::exec_in(&ns, &["nft", "monitor"]),
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    raise_priority(child.id());
    let out = child.stdout.take()?;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((i, watch, Some(line))).is_err() {
                return;
            }
        }
        let _ = tx.send((i, watch, None));
    });
    Some(child)
}

impl SplitBrain {
    /// Starts watching `vip`; nodes in `off` (powered off: link down,
    /// nothing reachable) are not counted until [`SplitBrain::set_off`]
    /// says otherwise.
    pub fn start(vip: &str, off: &[u8]) -> SplitBrain {
        Self::start_many(&[vip], off)
    }

    /// [`SplitBrain::start`] for several VIPs at once.
    pub fn start_many(vips: &[&str], off: &[u8]) -> SplitBrain {
        let stop = Arc::new(AtomicBool::new(false));
        let off = Arc::new(Mutex::new(off.to_vec()));
        let vips: Vec<String> = vips.iter().map(|v| (*v).to_owned()).collect();
        // Monitors first, then the first snapshot: nothing falls between.
        let (tx, rx) = mpsc::channel();
        let mut children: Vec<Child> = (1..=nodes::MAX_NODES)
            .filter(|i| nodes::ns_exists(&nodes::node_ns(*i)))
            .flat_map(|i| [(i, Watch::Addresses), (i, Watch::Fences)])
            .filter_map(|(i, w)| monitor(i, w, tx.clone()))
            .collect();
        let handle = {
            let (stop, off) = (stop.clone(), off.clone());
            std::thread::spawn(move || {
                raise_priority(nix::unistd::gettid().as_raw() as u32);
                let started = Instant::now();
                let started_at = jiff::Timestamp::now();
                let since = |t: jiff::Timestamp| {
                    Duration::try_from(t.duration_since(started_at)).unwrap_or_default()
                };
                let mut seen = Sampled::default();
                let (mut by_events, mut by_snapshots) = (Windows::default(), Windows::default());
                // Each node's addresses among the VIPs, from the first
                // snapshot on, kept by the events.
                let mut held: BTreeMap<u8, BTreeSet<String>> = node_addresses()
                    .into_iter()
                    .map(|(i, a)| (i, a.into_iter().filter(|a| vips.contains(a)).collect()))
                    .collect();
                // Each node's packet fences: until when (since the start)
                // each VIP's is open; `None`: closed. Absent: unknown, open.
                let mut fences: BTreeMap<(u8, String), Option<Duration>> = BTreeMap::new();
                let holders_in = |held: &BTreeMap<u8, BTreeSet<String>>,
                                  fences: &BTreeMap<(u8, String), Option<Duration>>,
                                  vip: &str,
                                  at: Duration|
                 -> Vec<u8> {
                    let off = off.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    held.iter()
                        .filter(|(i, a)| !off.contains(i) && a.contains(vip))
                        .filter(|(i, _)| match fences.get(&(**i, vip.to_owned())) {
                            None => true,
                            Some(None) => false,
                            Some(Some(until)) => *until + FENCE_SLACK > at,
                        })
                        .map(|(i, _)| *i)
                        .collect()
                };
                let mut last_snapshot: Option<Instant> = None;
                while !stop.load(Ordering::SeqCst) {
                    // Events, as they come, until the next snapshot is due.
                    let due = last_snapshot.map_or(started, |t| t + SNAPSHOT_EVERY);
                    loop {
                        let (i, watch, line) = match rx
                            .recv_timeout(due.saturating_duration_since(Instant::now()))
                        {
                            Ok(event) => event,
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            // Every monitor ended (nodes gone): snapshots only.
                            Err(mpsc::RecvTimeoutError::Disconnected) => {
                                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                                break;
                            }
                        };
                        let Some(line) = line else {
                            // The monitor was killed (a power-off): a new
                            // one, and this node's addresses read afresh.
                            if !stop.load(Ordering::SeqCst) && nodes::ns_exists(&nodes::node_ns(i))
                            {
                                children.extend(monitor(i, watch, tx.clone()));
                                if watch == Watch::Fences {
                                    // The fences stay as they were: the
                                    // kernel keeps them, and the new
                                    // monitor runs a few ms later.
                                    continue;
                                }
                                if let Some((_, a)) =
                                    node_addresses().into_iter().find(|(n, _)| *n == i)
                                {
                                    held.insert(
                                        i,
                                        a.into_iter().filter(|a| vips.contains(a)).collect(),
                                    );
                                }
                            }
                            continue;
                        };
                        if watch == Watch::Fences {
                            let Some((addr, timeout)) = parse_fence(&line) else {
                                continue;
                            };
                            if !vips.contains(&addr) {
                                continue;
                            }
                            let now = started.elapsed();
                            fences.insert((i, addr.clone()), timeout.map(|t| now + t));
                            // A fence opened again over an address still
                            // there counts from now.
                            let holders = holders_in(&held, &fences, &addr, now);
                            if by_events.check(&mut seen, &addr, holders, now) {
                                seen.double += 1;
                            }
                            continue;
                        }
                        let Some((at, added, addr)) = parse_event(&line) else {
                            continue;
                        };
                        if !vips.contains(&addr) {
                            continue;
                        }
                        let set = held.entry(i).or_default();
                        if added {
                            set.insert(addr.clone());
                        } else {
                            set.remove(&addr);
                        }
                        seen.samples += 1;
                        let holders = holders_in(&held, &fences, &addr, since(at));
                        if by_events.check(&mut seen, &addr, holders, since(at)) {
                            seen.double += 1;
                        }
                        if Instant::now() >= due {
                            break;
                        }
                    }
                    // A node switched off or on, or a fence that ended,
                    // changes who counts.
                    let now = started.elapsed();
                    for vip in &vips {
                        by_events.check(&mut seen, vip, holders_in(&held, &fences, vip, now), now);
                    }
                    // The snapshot.
                    let began = Instant::now();
                    if let Some(last) = last_snapshot {
                        seen.max_gap = seen.max_gap.max(began - last);
                    }
                    last_snapshot = Some(began);
                    let snapshot: BTreeMap<u8, BTreeSet<String>> = node_addresses()
                        .into_iter()
                        .map(|(i, a)| (i, a.into_iter().collect()))
                        .collect();
                    let at = began - started;
                    let mut double = false;
                    for vip in &vips {
                        double |= by_snapshots.check(
                            &mut seen,
                            vip,
                            holders_in(&snapshot, &fences, vip, at),
                            at,
                        );
                    }
                    seen.double += usize::from(double);
                    seen.samples += 1;
                }
                for c in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                seen
            })
        };
        SplitBrain {
            stop,
            off,
            handle: Some(handle),
        }
    }

    /// From now on, the nodes in `off` are not counted (and every other
    /// node is): call it with `&[i]` once node `i` is powered off, and with
    /// `&[]` once it is powered on again.
    pub fn set_off(&self, off: &[u8]) {
        *self.off.lock().unwrap_or_else(|e| e.into_inner()) = off.to_vec();
    }

    /// Stops watching and says what was seen.
    pub fn stop(mut self) -> Sampled {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("joined only here")
            .join()
            .expect("the split-brain detector panicked")
    }
}

impl Drop for SplitBrain {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampled(double: usize, samples: usize, gap_ms: u64) -> Sampled {
        Sampled {
            double,
            samples,
            max_gap: Duration::from_millis(gap_ms),
            windows: Vec::new(),
        }
    }

    #[test]
    fn a_sampler_that_kept_pace_and_saw_one_holder_passes() {
        sampled(0, 500, 12).assert_single_holder("198.18.0.100", "a move");
        let mut all = sampled(0, 10, 11);
        all.absorb(sampled(0, 5, 49));
        assert_eq!((all.samples, all.max_gap), (15, Duration::from_millis(49)));
        all.assert_single_holder("198.18.0.100", "two phases");
    }

    #[test]
    #[should_panic(expected = "two nodes held 198.18.0.100 in 2 of 500 checks")]
    fn two_holders_fail() {
        sampled(2, 500, 12).assert_single_holder("198.18.0.100", "a move");
    }

    #[test]
    #[should_panic(expected = "checked nothing")]
    fn a_sampler_without_samples_fails() {
        sampled(0, 0, 0).assert_single_holder("198.18.0.100", "a move");
    }

    #[test]
    #[should_panic(expected = "could not keep pace")]
    fn a_sampler_that_fell_behind_fails() {
        sampled(0, 500, 400).assert_single_holder("198.18.0.100", "a move");
    }

    #[test]
    fn monitor_lines_give_time_kind_and_address() {
        let (at, added, addr) = parse_event(
            "[2026-11-29T21:29:45.759033] 3: v0    inet 198.18.5.5/24 scope global dynamic v0",
        )
        .unwrap();
        assert!(added);
        assert_eq!(addr, "198.18.5.5");
        let civil: jiff::civil::DateTime = "2026-11-29T21:29:45.759033".parse().unwrap();
        assert_eq!(
            at,
            civil
                .to_zoned(jiff::tz::TimeZone::system())
                .unwrap()
                .timestamp()
        );
        let (_, added, addr) = parse_event(
            "[2026-11-29T21:29:46.074465] Deleted 3: v0    inet6 2001:db8:5::5/64 scope global nodad ",
        )
        .unwrap();
        assert!(!added);
        assert_eq!(addr, "2001:db8:5::5");
        assert!(parse_event("       valid_lft forever preferred_lft forever").is_none());
    }

    #[test]
    fn nft_monitor_lines_give_the_fence_of_a_vip() {
        assert_eq!(
            parse_fence("add element arp kubeha live { 198.18.0.100 timeout 970ms expires 970ms }"),
            Some(("198.18.0.100".into(), Some(Duration::from_millis(970))))
        );
        assert_eq!(
            parse_fence(
                "add element inet kubeha live6 { 2001:db8::100 timeout 3s370ms expires 3s370ms }"
            ),
            Some(("2001:db8::100".into(), Some(Duration::from_millis(3370))))
        );
        assert_eq!(
            parse_fence("delete element arp kubeha live { 198.18.0.100 timeout 4ms expires 4ms }"),
            Some(("198.18.0.100".into(), None))
        );
        // The held sets and the inet copy of an IPv4 fence are not read.
        assert_eq!(
            parse_fence("add element arp kubeha held { 198.18.0.100 timeout 6s expires 6s }"),
            None
        );
        assert_eq!(
            parse_fence("add element inet kubeha live4 { 198.18.0.100 timeout 1s }"),
            None
        );
        assert_eq!(
            parse_fence("# new generation 31 by process 18699 (nft)"),
            None
        );
        assert_eq!(
            parse_nft_duration("1d2h3m4s5ms"),
            Some(Duration::from_millis(93_784_005))
        );
        assert_eq!(parse_nft_duration("5x"), None);
    }

    #[test]
    fn a_window_opens_extends_and_closes() {
        let mut seen = Sampled::default();
        let mut w = Windows::default();
        let ms = Duration::from_millis;
        assert!(!w.check(&mut seen, "v", vec![1], ms(1)));
        assert!(w.check(&mut seen, "v", vec![1, 2], ms(2)));
        assert!(w.check(&mut seen, "v", vec![1, 2], ms(5)));
        assert!(!w.check(&mut seen, "v", vec![2], ms(6)));
        assert!(w.check(&mut seen, "v", vec![2, 3], ms(9)));
        assert_eq!(
            seen.windows,
            vec![
                DoubleHolder {
                    vip: "v".into(),
                    nodes: vec![1, 2],
                    from: ms(2),
                    to: ms(5)
                },
                DoubleHolder {
                    vip: "v".into(),
                    nodes: vec![2, 3],
                    from: ms(9),
                    to: ms(9)
                },
            ]
        );
    }
}
