//! The injections: faults drawn with a seeded random generator, one at a
//! time, liveness checkpoints between them, and the safety detectors' and
//! the move detector's findings at the end.

use std::time::{Duration, Instant};

use super::liveness::{KUBECTL_POLL, active_node, fail_count, unhealthy, wait_active, wait_live};
use super::moves::{self, Fault};
use super::services::{
    cluster_spec, extra_vip, fault_marker, service_name, service_spec, service_vips,
};
use super::{Config, Kind, Report};
use crate::ha::{self, Timing};
use crate::lab::{Lab, StopSignal};
use crate::nodes;

/// xorshift64*: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `[lo, hi)`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub(super) fn inject(lab: &Lab, cfg: &Config, timing: Timing) -> anyhow::Result<Report> {
    let d = Duration::from_millis(u64::from(timing.lease_ms));
    let deadline = d + Duration::from_millis(u64::from(timing.skew_ms)) + Duration::from_secs(3);
    let mut rng = Rng::new(cfg.seed);
    let mut report = Report {
        seed: cfg.seed,
        ..Report::default()
    };
    let vips: Vec<String> = (0..cfg.services)
        .flat_map(|k| {
            let (v4, v6) = service_vips(k);
            std::iter::once(v4).chain(v6).chain([extra_vip(k)])
        })
        .collect();
    let vip_refs: Vec<&str> = vips.iter().map(String::as_str).collect();
    let sampler = ha::SplitBrain::start_many(&vip_refs, &[]);
    let arp = crate::arp_probe::ArpProbe::start(&vip_refs)?;
    let started = Instant::now();
    let masters = moves::Sampler::start(lab, cfg.services, started);
    let mut faults: Vec<Fault> = Vec::new();
    let stamp = |report: &mut Report, line: String| {
        let line = format!("[{:8.2} s] {line}", started.elapsed().as_secs_f64());
        eprintln!("chaos: {line}");
        report.log.push(line);
    };
    for n in 1..=cfg.injections {
        std::thread::sleep(d.mul_f64(rng.between(0.2, 1.5)));
        let kind = cfg.kinds[rng.below(cfg.kinds.len())];
        let node = 1 + rng.below(usize::from(cfg.nodes)) as u8;
        // The service the fault hits, for the kinds that draw one.
        let mut service = None;
        let start = started.elapsed();
        let what = match kind {
            Kind::AgentKill => {
                lab.stop_agent(node, StopSignal::Kill)?;
                let down = d.mul_f64(rng.between(0.0, 1.0));
                std::thread::sleep(down);
                lab.start_agent(node, &[] as &[&str])?;
                format!("node-{node}'s agent killed, started {down:.1?} later")
            }
            Kind::AgentStop => {
                let stall = d.mul_f64(rng.between(0.5, 3.0));
                lab.freeze_agent(node, true)?;
                std::thread::sleep(stall);
                lab.freeze_agent(node, false)?;
                format!("node-{node}'s agent stalled for {stall:.1?}")
            }
            Kind::PowerOff => {
                let off = d.mul_f64(rng.between(1.0, 3.0));
                lab.power_off(node)?;
                // Its addresses stay configured off the wire: not counted.
                sampler.set_off(&[node]);
                std::thread::sleep(off);
                lab.power_on(node)?;
                sampler.set_off(&[]);
                lab.start_agent(node, &[] as &[&str])?;
                format!("node-{node} powered off for {off:.1?}")
            }
            Kind::Partition => {
                let cut = d.mul_f64(rng.between(0.5, 3.0));
                lab.partition(node)?;
                std::thread::sleep(cut);
                lab.heal(node)?;
                format!("node-{node} cut off from the API server for {cut:.1?}")
            }
            Kind::ApiserverStop => {
                let stall = Duration::from_secs_f64(rng.between(1.0, 5.0));
                lab.freeze_process("kube-apiserver", true)?;
                std::thread::sleep(stall);
                lab.freeze_process("kube-apiserver", false)?;
                format!("kube-apiserver stalled for {stall:.1?}")
            }
            Kind::OperatorLeaderKill => {
                let leader = (0..=1u8)
                    .find(|r| ha::operator_metric(*r, "kubeha_operator_leader") == 1.0)
                    .unwrap_or(0);
                lab.stop_operator(leader, StopSignal::Kill)?;
                let down = d.mul_f64(rng.between(0.0, 1.0));
                std::thread::sleep(down);
                lab.start_operator(leader, &[])?;
                format!("operator replica {leader} (leader) killed, started {down:.1?} later")
            }
            Kind::EtcdRestart => {
                let down = Duration::from_secs_f64(rng.between(0.5, 2.0));
                lab.restart_etcd(down)?;
                format!("etcd killed, started {down:.1?} later")
            }
            Kind::VipEdit => {
                let k = rng.below(cfg.services);
                service = Some(k);
                let hold = d.mul_f64(rng.between(0.5, 1.5));
                ha::apply(lab, &service_spec(k, true))?;
                std::thread::sleep(hold);
                ha::apply(lab, &service_spec(k, false))?;
                format!(
                    "{} got VIP {} for {hold:.1?}",
                    service_name(k),
                    extra_vip(k)
                )
            }
            Kind::TimingChange => {
                let hold = d.mul_f64(rng.between(1.0, 3.0));
                ha::apply(lab, &cluster_spec(cfg.nodes, None, lowered(timing)))?;
                std::thread::sleep(hold);
                ha::apply(lab, &cluster_spec(cfg.nodes, None, timing))?;
                format!("D lowered to 2 s for {hold:.1?}, then back to 3 s")
            }
            Kind::ModeChange => {
                let hold = d.mul_f64(rng.between(1.0, 3.0));
                ha::apply(lab, &cluster_spec(cfg.nodes, Some(node), timing))?;
                std::thread::sleep(hold);
                ha::apply(lab, &cluster_spec(cfg.nodes, None, timing))?;
                format!("node-{node} locked for {hold:.1?}, then default again")
            }
            Kind::HookFail | Kind::HookHang => {
                let k = rng.below(cfg.services);
                service = Some(k);
                let (fault, does) = if kind == Kind::HookFail {
                    ("monitor-fail", "failed")
                } else {
                    ("monitor-hang", "hung")
                };
                'what: {
                    let Some(on) = wait_active(lab, k, d * 2) else {
                        break 'what format!(
                            "{}: no active node for 2 x D, nothing to fail",
                            service_name(k)
                        );
                    };
                    let marker = fault_marker(lab, on, &service_name(k), fault);
                    std::fs::write(&marker, "")?;
                    let left = ha::wait_every(Duration::from_secs(40), KUBECTL_POLL, || {
                        active_node(lab, k) != Some(on)
                    });
                    let _ = std::fs::remove_file(&marker);
                    if let Some(after) = left {
                        break 'what format!(
                            "{}'s monitor {does} on node-{on}; the service left it after {after:.1?}",
                            service_name(k)
                        );
                    }
                    let what = format!(
                        "{}'s monitor {does} on node-{on} for 40 s and the service never left it",
                        service_name(k)
                    );
                    report
                        .liveness_violations
                        .push(format!("injection #{n}: {what}"));
                    what
                }
            }
            Kind::SlowMonitor => {
                let k = rng.below(cfg.services);
                service = Some(k);
                let hold = d.mul_f64(rng.between(1.0, 3.0));
                let slow = rng.between(2.0, 2.8);
                'what: {
                    let Some(on) = wait_active(lab, k, d * 2) else {
                        break 'what format!(
                            "{}: no active node for 2 x D, no monitor to slow",
                            service_name(k)
                        );
                    };
                    let before = fail_count(lab, k, on);
                    let marker = fault_marker(lab, on, &service_name(k), "monitor-slow");
                    std::fs::write(&marker, format!("{slow:.2}"))?;
                    std::thread::sleep(hold);
                    let _ = std::fs::remove_file(&marker);
                    // A run that started slow ends within its timeout.
                    std::thread::sleep(Duration::from_secs(3));
                    let after = fail_count(lab, k, on);
                    let what = format!(
                        "{}'s monitor on node-{on} took {slow:.1} s a run for {hold:.1?}",
                        service_name(k)
                    );
                    if after > before {
                        report.liveness_violations.push(format!(
                            "injection #{n}: {what}, within its 3 s timeout, and node-{on}'s fail count went from {before} to {after}"
                        ));
                    }
                    what
                }
            }
            Kind::Move => {
                let k = rng.below(cfg.services);
                service = Some(k);
                let to = nodes::node_name(node);
                let out = lab
                    .kubectl_ha()?
                    .args([
                        "--wait",
                        "0",
                        "move",
                        &service_name(k),
                        "--to",
                        &to,
                        "-n",
                        ha::SERVICE_NAMESPACE,
                    ])
                    .output()?;
                format!(
                    "kubectl ha move {} --to {to}: {}",
                    service_name(k),
                    if out.status.success() {
                        "accepted".to_owned()
                    } else {
                        String::from_utf8_lossy(&out.stderr).trim().to_owned()
                    }
                )
            }
        };
        faults.push(Fault::new(n, kind, node, service, start, started.elapsed()));
        *report.by_kind.entry(kind.name()).or_default() += 1;
        report.injections += 1;
        stamp(&mut report, format!("#{n} {}: {what}", kind.name()));

        if n % cfg.checkpoint_every.max(1) == 0 || n == cfg.injections {
            let first = wait_live(lab, cfg.services, deadline);
            let late: Vec<usize> = (0..cfg.services)
                .filter(|k| first[*k].is_none_or(|t| t > deadline))
                .collect();
            let took = first.iter().flatten().max().copied().unwrap_or_default();
            if late.is_empty() {
                report.longest_outage_ms = report.longest_outage_ms.max(took.as_secs_f64() * 1e3);
                stamp(
                    &mut report,
                    format!(
                        "checkpoint: every service answers from its active node; the last {took:.1?} after the last fault"
                    ),
                );
                continue;
            }
            let healthy: Vec<usize> = (0..cfg.services).filter(|k| !late.contains(k)).collect();
            for v in unhealthy(lab, cfg.services, &healthy) {
                report
                    .liveness_violations
                    .push(format!("after injection #{n}: {v}"));
            }
            // Give it a minute more before injecting again, so one
            // violation does not cascade into many; record how long.
            let waited = deadline.max(took);
            let later = wait_live(lab, cfg.services, Duration::from_secs(60));
            let still: Vec<usize> = late
                .iter()
                .copied()
                .filter(|k| later[*k].is_none())
                .collect();
            let live_later: Vec<usize> = (0..cfg.services).filter(|k| !still.contains(k)).collect();
            for v in unhealthy(lab, cfg.services, &live_later) {
                report.stuck.push(format!("after injection #{n}: {v}"));
            }
            let more = late
                .iter()
                .filter_map(|k| later[*k])
                .max()
                .unwrap_or_default();
            report.longest_outage_ms = report
                .longest_outage_ms
                .max((waited + more).as_secs_f64() * 1e3);
            stamp(
                &mut report,
                format!(
                    "checkpoint: LIVENESS VIOLATION, {} of {} services answered within {deadline:.1?} ({}); {} of them after {more:.1?} more",
                    healthy.len(),
                    cfg.services,
                    late.iter()
                        .map(|k| format!(
                            "{} {}",
                            service_name(*k),
                            first[*k].map_or("not answering".to_owned(), |t| format!("at {t:.1?}"))
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    late.len() - still.len(),
                ),
            );
        }
    }
    let observed = masters.stop();
    report.master_changes = observed.changes.len();
    report.master_polls = observed.polls;
    report.master_poll_failures = observed.failed;
    report.master_max_gap_ms = observed.max_gap.as_secs_f64() * 1e3;
    let grace = moves::grace(&[timing, lowered(timing)]);
    for c in moves::spurious(&observed.changes, &faults, grace) {
        report
            .spurious_moves
            .push(moves::describe(c, &faults, grace));
    }
    let seen = sampler.stop();
    report.safety_samples = seen.samples;
    report.safety_max_gap_ms = seen.max_gap.as_secs_f64() * 1e3;
    for w in &seen.windows {
        report.safety_violations.push(window(
            format!("{} held by nodes {:?}", w.vip, w.nodes),
            w.from,
            w.to,
        ));
    }
    let probed = arp.stop();
    report.arp_requests = probed.requests;
    report.arp_replies = probed.replies;
    for w in &probed.windows {
        report.safety_violations.push(
            window(
                format!("{} answered by MACs {:?}", w.vip, w.macs),
                w.from,
                w.to,
            ) + " (client ARP)",
        );
    }
    for (detector, gap) in [
        ("the safety detector", seen.max_gap),
        ("the client's ARP probe", probed.max_gap),
    ] {
        if gap >= ha::MAX_SAMPLE_GAP {
            report.safety_violations.push(format!(
                "{detector} could not keep pace: {gap:?} between two rounds (limit {:?})",
                ha::MAX_SAMPLE_GAP
            ));
        }
    }
    Ok(report)
}

/// The timing a [`Kind::TimingChange`] applies for a while: D lowered to
/// 2 s, `timing`'s skew.
fn lowered(timing: Timing) -> Timing {
    Timing {
        lease_ms: 2000,
        renew_ms: 600,
        deadline_ms: 1400,
        skew_ms: timing.skew_ms,
    }
}

/// `WHAT from F s to T s`: a window in which a VIP had two holders.
fn window(what: String, from: Duration, to: Duration) -> String {
    format!(
        "{what} from {:.2} s to {:.2} s",
        from.as_secs_f64(),
        to.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_makes_the_same_choices() {
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..50).map(|_| rng.below(7)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let mut rng = Rng::new(0);
        let mut kinds = [0usize; 7];
        for _ in 0..7000 {
            kinds[rng.below(7)] += 1;
            let x = rng.between(0.2, 1.5);
            assert!((0.2..1.5).contains(&x), "{x}");
        }
        assert!(
            kinds.iter().all(|c| *c > 700),
            "every kind is drawn: {kinds:?}"
        );
    }
}
