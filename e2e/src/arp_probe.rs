//! The client's view of the safety rule: from the client namespace, an ARP
//! probe ([`garp::arp_probe`], the frame an entering agent sends) for every
//! IPv4 VIP every [`PROBE_EVERY`] (or the interval given), and every
//! answer's MAC recorded ([`garp::claim`]). Two different MACs answering for
//! one VIP less than one interval apart is a window with two holders as the segment saw it
//! (each holder answers the same request, microseconds apart); a handover,
//! even a quick one, leaves far longer than that between the last answer of
//! the old holder and the first of the new one.
//!
//! It complements [`crate::split_brain`], which watches the nodes'
//! addresses: this one sees what a client would have been told, including
//! an address the detector's `ip` view could miss. IPv6 VIPs are not probed
//! (the address view covers them).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kubeha_agent::garp;
use pnet::datalink;

use crate::nodes;

/// How often each VIP is asked for.
pub const PROBE_EVERY: Duration = Duration::from_millis(10);

/// A window in which two MACs answered for one VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoMacs {
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The MACs, as `aa:bb:cc:dd:ee:ff`.
    pub macs: Vec<String>,
    /// When, since the probe started.
    pub from: Duration,
    /// Until when.
    pub to: Duration,
}

/// What the probe saw.
#[derive(Debug, Clone, Default)]
pub struct Probed {
    /// Requests sent.
    pub requests: usize,
    /// Replies for a probed VIP received.
    pub replies: usize,
    /// Windows with two answering MACs.
    pub windows: Vec<TwoMacs>,
    /// The longest time between two rounds of requests.
    pub max_gap: Duration,
    /// Per VIP: the longest time between two replies heard for it (from any
    /// MAC), counted from its first reply: the longest outage a client saw.
    pub longest_silence: BTreeMap<Ipv4Addr, Duration>,
    /// Per VIP and answering MAC: the wall-clock times of the first and the
    /// last reply heard.
    pub answers: BTreeMap<(Ipv4Addr, String), (jiff::Timestamp, jiff::Timestamp)>,
}

/// A running probe; stopped by [`ArpProbe::stop`] or when dropped.
pub struct ArpProbe {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Probed>>,
    /// Every (VIP, MAC) heard so far, as `aa:bb:cc:dd:ee:ff`.
    heard: Arc<Mutex<BTreeSet<(Ipv4Addr, String)>>>,
}

/// A datalink channel on `iface` inside network namespace `ns` (the
/// calling thread enters it and stays there).
fn channel_in(
    ns: &str,
    iface: &str,
) -> anyhow::Result<(
    Box<dyn datalink::DataLinkSender>,
    Box<dyn datalink::DataLinkReceiver>,
)> {
    crate::nodes::enter_ns(ns)?;
    let interface = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .with_context(|| format!("no interface {iface} in {ns}"))?;
    let config = datalink::Config {
        read_buffer_size: 65536,
        // Reads wake at least every 50 ms, so a stop is seen.
        read_timeout: Some(Duration::from_millis(50)),
        ..datalink::Config::default()
    };
    match datalink::channel(&interface, config)? {
        datalink::Channel::Ethernet(tx, rx) => Ok((tx, rx)),
        _ => bail!("no Ethernet channel on {iface} in {ns}"),
    }
}

impl ArpProbe {
    /// Starts probing the IPv4 addresses among `vips` (addresses without
    /// prefix; others are ignored) from the client namespace, each every
    /// [`PROBE_EVERY`].
    pub fn start(vips: &[&str]) -> anyhow::Result<ArpProbe> {
        Self::start_every(vips, PROBE_EVERY)
    }

    /// [`ArpProbe::start`], each VIP asked for every `every`: with many
    /// VIPs, every request is a broadcast every node's kernel handles, so
    /// a coarser probe keeps the measurement from loading the machine it
    /// measures (at most `every` late).
    pub fn start_every(vips: &[&str], every: Duration) -> anyhow::Result<ArpProbe> {
        let heard = Arc::new(Mutex::new(BTreeSet::new()));
        let targets: Vec<Ipv4Addr> = vips.iter().filter_map(|v| v.parse().ok()).collect();
        let mac = crate::ha::mac_of(nodes::CLIENT_NS, nodes::NS_IFACE)?;
        let mac: pnet::util::MacAddr = mac
            .parse()
            .map_err(|e| anyhow::anyhow!("client MAC {mac:?}: {e:?}"))?;
        let mac = mac.octets();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = {
            let (stop, heard) = (stop.clone(), heard.clone());
            std::thread::spawn(move || {
                let (mut tx, mut rx) = match channel_in(nodes::CLIENT_NS, nodes::NS_IFACE) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Probed::default();
                    }
                };
                let started = Instant::now();
                // The receiver: every reply for a probed VIP, with its time.
                let receiver = {
                    let (stop, targets) = (stop.clone(), targets.clone());
                    std::thread::spawn(move || {
                        let mut seen = Probed::default();
                        let mut last: BTreeMap<Ipv4Addr, ([u8; 6], Duration)> = BTreeMap::new();
                        let mut open: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
                        while !stop.load(Ordering::SeqCst) {
                            // A timeout (nothing heard for a while) loops.
                            let Ok(frame) = rx.next() else {
                                continue;
                            };
                            let at = started.elapsed();
                            let Some((vip, from)) = garp::claim(frame, &targets, mac) else {
                                continue;
                            };
                            seen.replies += 1;
                            if let Some((_, when)) = last.get(&vip) {
                                let silence = seen.longest_silence.entry(vip).or_default();
                                *silence = (*silence).max(at.saturating_sub(*when));
                            }
                            let now = jiff::Timestamp::now();
                            match seen.answers.entry((vip, garp::mac_string(from))) {
                                std::collections::btree_map::Entry::Occupied(mut e) => {
                                    e.get_mut().1 = now;
                                }
                                std::collections::btree_map::Entry::Vacant(e) => {
                                    if let Ok(mut heard) = heard.lock() {
                                        heard.insert(e.key().clone());
                                    }
                                    e.insert((now, now));
                                }
                            }
                            if let Some((mac, when)) = last.get(&vip) {
                                let quiet = at.saturating_sub(*when);
                                if *mac != from && quiet < every {
                                    let macs = vec![garp::mac_string(*mac), garp::mac_string(from)];
                                    match open.get(&vip) {
                                        Some(w)
                                            if at.saturating_sub(seen.windows[*w].to)
                                                < every * 3 =>
                                        {
                                            seen.windows[*w].to = at
                                        }
                                        _ => {
                                            open.insert(vip, seen.windows.len());
                                            seen.windows.push(TwoMacs {
                                                vip,
                                                macs,
                                                from: *when,
                                                to: at,
                                            });
                                        }
                                    }
                                }
                            }
                            last.insert(vip, (from, at));
                        }
                        seen
                    })
                };
                let frames: Vec<Vec<u8>> =
                    targets.iter().map(|t| garp::arp_probe(mac, *t)).collect();
                let (mut requests, mut max_gap, mut last_round) = (0, Duration::ZERO, None);
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let now = Instant::now();
                    if let Some(l) = last_round {
                        max_gap = max_gap.max(now - l);
                    }
                    last_round = Some(now);
                    for f in &frames {
                        let sent = matches!(tx.send_to(f, None), Some(Ok(())));
                        requests += usize::from(sent);
                    }
                    next += every;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                let mut seen = receiver.join().unwrap_or_default();
                seen.requests = requests;
                seen.max_gap = max_gap;
                seen
            })
        };
        ready_rx
            .recv()
            .context("the ARP probe thread ended before it was ready")??;
        Ok(ArpProbe {
            stop,
            handle: Some(handle),
            heard,
        })
    }

    /// Whether every one of `vips` has been answered for by a MAC other
    /// than `but` (as `aa:bb:cc:dd:ee:ff`, any case) since the probe started.
    pub fn answered_by_other(&self, vips: &[Ipv4Addr], but: &str) -> bool {
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        vips.iter().all(|vip| {
            heard
                .iter()
                .any(|(v, mac)| v == vip && !mac.eq_ignore_ascii_case(but))
        })
    }

    /// Stops probing and says what was seen.
    pub fn stop(mut self) -> Probed {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("joined only here")
            .join()
            .unwrap_or_default()
    }
}

impl Drop for ArpProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
