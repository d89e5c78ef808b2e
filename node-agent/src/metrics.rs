//! Prometheus metrics of the agent and its HTTP endpoints: `/metrics`,
//! `/healthz` (the main loop makes progress) and `/readyz` (every cluster's
//! heartbeat renewed within RD).

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use kubeha_runtime::http::{RegistryBuilder, SharedRegistry};

use crate::heartbeat::Heartbeats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    action: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    transition: String,
}

type HookHistogram = Family<HookLabels, Histogram, fn() -> Histogram>;

/// The agent's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: SharedRegistry,
    renew_failures: Family<ClusterLabels, Counter>,
    last_renew_age: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    vips_held: Gauge,
    garps_sent: Counter,
    fences: Counter,
    hook_runs: Family<HookLabels, Counter>,
    hook_duration: HookHistogram,
    transitions: Family<TransitionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Default::default(),
            renew_failures: Default::default(),
            last_renew_age: Default::default(),
            vips_held: Default::default(),
            garps_sent: Default::default(),
            fences: Default::default(),
            hook_runs: Default::default(),
            hook_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 16))
            }),
            transitions: Default::default(),
        };
        let registry = RegistryBuilder::new("kubeha_agent")
            .metric(
                "heartbeat_renew_failures",
                "Failed heartbeat renews",
                &m.renew_failures,
            )
            .metric(
                "heartbeat_last_renew_age_seconds",
                "Seconds since the last successful heartbeat renew",
                &m.last_renew_age,
            )
            .metric("vips_held", "VIPs this node holds", &m.vips_held)
            .metric(
                "garp_sent",
                "Gratuitous ARP / unsolicited NA frames sent",
                &m.garps_sent,
            )
            .metric("fences", "Self-fences", &m.fences)
            .metric(
                "hook_runs",
                "Hook script runs by action and outcome",
                &m.hook_runs,
            )
            .metric(
                "hook_duration_seconds",
                "Hook script run time",
                &m.hook_duration,
            )
            .metric("transitions", "Role transitions by kind", &m.transitions)
            .build();
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts a failed heartbeat renew.
    pub fn renew_failure(&self, cluster: &str) {
        self.renew_failures
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_owned(),
            })
            .inc();
    }

    /// Sets the number of VIPs held.
    pub fn set_vips_held(&self, n: usize) {
        self.vips_held.set(n as i64);
    }

    /// Counts GARP/NA frames sent.
    pub fn garps_sent(&self, n: usize) {
        self.garps_sent.inc_by(n as u64);
    }

    /// Counts a self-fence.
    pub fn fenced(&self) {
        self.fences.inc();
    }

    /// Records one hook run.
    pub fn hook_run(&self, action: &str, outcome: &str, seconds: f64) {
        let labels = HookLabels {
            action: action.to_owned(),
            outcome: outcome.to_owned(),
        };
        self.hook_runs.get_or_create(&labels).inc();
        self.hook_duration.get_or_create(&labels).observe(seconds);
    }

    /// Counts a transition (takeover, takeback, giveaway, giveback, adopt).
    pub fn transition(&self, transition: &str) {
        self.transitions
            .get_or_create(&TransitionLabels {
                transition: transition.to_owned(),
            })
            .inc();
    }

    /// The text exposition, with the renew ages brought up to date.
    pub fn encode(&self, beats: &Heartbeats) -> String {
        let now = Instant::now();
        // A cluster never renewed has no age yet (the text format has no
        // portable infinity); `/readyz` reports it as past its deadline.
        for (cluster, beat) in beats.all() {
            if let Some(age) = beat.age(now) {
                self.last_renew_age
                    .get_or_create(&ClusterLabels { cluster })
                    .set(age.as_secs_f64());
            }
        }
        self.registry.encode()
    }
}

/// What the agent answers on its HTTP port: `/healthz` while the main loop
/// makes progress, `/readyz` while every cluster's heartbeat renewed within
/// RD.
#[derive(Clone)]
pub struct Probes {
    /// The metrics `/metrics` encodes.
    pub metrics: Metrics,
    /// The heartbeats (renew ages) and the main loop's progress.
    pub beats: Heartbeats,
}

impl kubeha_runtime::http::Probes for Probes {
    fn metrics(&self) -> String {
        self.metrics.encode(&self.beats)
    }

    fn health(&self) -> Result<(), String> {
        // Unhealthy once the main loop is stuck for the longest RD of the
        // clusters (its renewals have stopped by then).
        let now = Instant::now();
        let limit = self
            .beats
            .all()
            .values()
            .map(|b| b.timing.renew_deadline)
            .max()
            .unwrap_or(std::time::Duration::from_secs(10));
        match self.beats.stalled_for(now) {
            Some(stalled) if stalled >= limit => {
                Err(format!("main loop stalled for {} ms", stalled.as_millis()))
            }
            _ => Ok(()),
        }
    }

    fn ready(&self) -> Result<(), String> {
        let now = Instant::now();
        let late: Vec<String> = self
            .beats
            .all()
            .into_iter()
            .filter(|(_, b)| b.past_deadline(now))
            .map(|(c, _)| c)
            .collect();
        if late.is_empty() {
            Ok(())
        } else {
            Err(format!("heartbeat past its deadline in {late:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::default();
        m.renew_failure("c");
        m.hook_run("enter", "Success", 0.2);
        m.transition("takeover");
        m.garps_sent(6);
        let beats = Heartbeats::default();
        beats.set_timing(
            "c",
            crate::heartbeat::Timing::from(&kubeha_crds::cluster::HeartbeatTiming::default()),
        );
        let text = m.encode(&beats);
        for name in [
            "kubeha_agent_heartbeat_renew_failures_total{cluster=\"c\"} 1",
            "kubeha_agent_garp_sent_total 6",
            "kubeha_agent_hook_runs_total{action=\"enter\",outcome=\"Success\"} 1",
            "kubeha_agent_transitions_total{transition=\"takeover\"} 1",
            "kubeha_agent_fences_total 0",
            "kubeha_agent_vips_held 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(
            !text.contains("last_renew_age_seconds{"),
            "no age before the first renew:\n{text}"
        );
    }
}
