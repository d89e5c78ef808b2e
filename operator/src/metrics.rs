//! Prometheus metrics of the operator and its HTTP endpoints: `/metrics`,
//! `/healthz` (the process serves) and `/readyz` (every watch has listed
//! its objects once).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use kubeha_runtime::http::{RegistryBuilder, SharedRegistry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The operator's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: SharedRegistry,
    failovers: Family<ReasonLabels, Counter>,
    failover_duration: Histograms<ReasonLabels>,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Histograms<ControllerLabels>,
    leader: Gauge,
    lease_writes: Counter,
}

fn failover_histogram() -> Histogram {
    // 50 ms .. ~7 min
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

fn reconcile_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Default::default(),
            failovers: Default::default(),
            failover_duration: Family::new_with_constructor(failover_histogram),
            reconciles: Default::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_histogram),
            leader: Default::default(),
            lease_writes: Default::default(),
        };
        let registry = RegistryBuilder::new("kubeha_operator")
            .metric(
                "failovers",
                "Masters assigned, by placement reason (Initial, Failover, Failback)",
                &m.failovers,
            )
            .metric(
                "failover_duration_seconds",
                "From writing a new master into the service Lease to its status entry \
                 reporting Running",
                &m.failover_duration,
            )
            .metric(
                "reconciles",
                "Reconciles by controller and result",
                &m.reconciles,
            )
            .metric(
                "reconcile_duration_seconds",
                "Reconcile run time by controller",
                &m.reconcile_duration,
            )
            .metric(
                "leader",
                "1 while this replica holds the operator leader Lease",
                &m.leader,
            )
            .metric(
                "service_lease_writes",
                "Writes of service Leases (assignment changes)",
                &m.lease_writes,
            )
            .build();
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts a new master by placement reason.
    pub fn failover(&self, reason: &str) {
        self.failovers
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Records the time from the Lease write to the new master running.
    pub fn failover_completed(&self, reason: &str, took: Duration) {
        self.failover_duration
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts one reconcile and its run time.
    pub fn reconciled(&self, controller: &str, ok: bool, took: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.to_owned(),
                result: if ok { "ok" } else { "error" }.to_owned(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Counts a service Lease write.
    pub fn lease_written(&self) {
        self.lease_writes.inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        self.registry.encode()
    }
}

/// What the operator answers on its HTTP port: `/healthz` while the process
/// serves, `/readyz` once every watch has listed its objects.
#[derive(Clone)]
pub struct Probes {
    /// The metrics `/metrics` encodes.
    pub metrics: Metrics,
    /// Set once every watch has listed.
    pub ready: Arc<AtomicBool>,
}

impl kubeha_runtime::http::Probes for Probes {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }

    fn ready(&self) -> Result<(), String> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("watches not synced yet".to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::default();
        m.failover("Failover");
        m.failover_completed("Failover", Duration::from_millis(800));
        m.reconciled("haservice", true, Duration::from_millis(2));
        m.set_leader(true);
        m.lease_written();
        let text = m.encode();
        for line in [
            "kubeha_operator_failovers_total{reason=\"Failover\"} 1",
            "kubeha_operator_failover_duration_seconds_count{reason=\"Failover\"} 1",
            "kubeha_operator_reconciles_total{controller=\"haservice\",result=\"ok\"} 1",
            "kubeha_operator_reconcile_duration_seconds_count{controller=\"haservice\"} 1",
            "kubeha_operator_leader 1",
            "kubeha_operator_service_lease_writes_total 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
