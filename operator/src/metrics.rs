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

use kube::runtime::reflector::Store;
use kubeha_crds::HAService;
use kubeha_crds::service::Phase;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

/// Every phase, each exported (0 when no service is in it), so that an
/// alert on a phase has a series to compare.
const PHASES: [Phase; 6] = [
    Phase::Pending,
    Phase::Starting,
    Phase::Active,
    Phase::Stopping,
    Phase::Errored,
    Phase::Suspended,
];

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Starting => "Starting",
        Phase::Active => "Active",
        Phase::Stopping => "Stopping",
        Phase::Errored => "Errored",
        Phase::Suspended => "Suspended",
    }
}

/// The reasons of a new master in the service Lease: placement's
/// (`Initial`, `Failover`, `Failback`), or `Move` when the new master is
/// the node an admin's `kubeha.io/move-to` asks for.
pub const MOVE: &str = "Move";

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The operator's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: SharedRegistry,
    placements: Family<ReasonLabels, Counter>,
    failovers: Counter,
    placement_duration: Histograms<ReasonLabels>,
    services: Family<PhaseLabels, Gauge>,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Histograms<ControllerLabels>,
    leader: Gauge,
    lease_writes: Counter,
    memory_entries: Family<MapLabels, Gauge>,
    watched_objects: Family<KindLabels, Gauge>,
}

fn placement_histogram() -> Histogram {
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
            placements: Default::default(),
            failovers: Default::default(),
            placement_duration: Family::new_with_constructor(placement_histogram),
            services: Default::default(),
            reconciles: Default::default(),
            reconcile_duration: Family::new_with_constructor(reconcile_histogram),
            leader: Default::default(),
            lease_writes: Default::default(),
            memory_entries: Default::default(),
            watched_objects: Default::default(),
        };
        let registry = RegistryBuilder::new("kubeha_operator")
            .info(
                "build",
                "The operator's version",
                &[("version", env!("CARGO_PKG_VERSION"))],
            )
            .metric(
                "placements",
                "New masters written into service Leases, by reason: Initial (the \
                 service had none), Failover (its master was no longer eligible), \
                 Failback (a better node came back), Move (kubeha.io/move-to)",
                &m.placements,
            )
            .metric(
                "failovers",
                "Failovers: new masters written because the old one was no longer \
                 eligible (the same as placements_total{reason=\"Failover\"})",
                &m.failovers,
            )
            .metric(
                "placement_duration_seconds",
                "From writing a new master into the service Lease to its status entry \
                 reporting Running, by placement reason",
                &m.placement_duration,
            )
            .metric(
                "services",
                "HAServices by phase, as this replica's cache has them (no phase yet \
                 counts as Pending)",
                &m.services,
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
            .metric(
                "memory_entries",
                "Entries of the operator's per-object memory, by map: service (one per \
                 HAService), cluster, heartbeat_view and first_seen (one per HACluster \
                 or cluster an HAService refers to); entries go with their objects",
                &m.memory_entries,
            )
            .metric(
                "watched_objects",
                "Objects in this replica's watch caches, by kind: HAService, HACluster, \
                 ServiceLease, HeartbeatLease, Node",
                &m.watched_objects,
            )
            .build();
        Self { registry, ..m }
    }
}

impl Metrics {
    /// Counts a new master by reason (placement's, or [`MOVE`]); a
    /// `Failover` also counts as a failover.
    pub fn placed(&self, reason: &str) {
        self.placements
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
        if reason == "Failover" {
            self.failovers.inc();
        }
    }

    /// Records the time from the Lease write to the new master running.
    pub fn placement_completed(&self, reason: &str, took: Duration) {
        self.placement_duration
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

    /// Sets how many entries the per-object memory `map` keeps (see
    /// [`crate::context::Ctx::forget_deleted`] for when they go).
    pub fn set_memory_entries(&self, map: &'static str, entries: usize) {
        self.memory_entries
            .get_or_create(&MapLabels { map })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// Sets how many objects of `kind` the watch cache holds.
    pub fn set_watched_objects(&self, kind: &'static str, objects: usize) {
        self.watched_objects
            .get_or_create(&KindLabels { kind })
            .set(i64::try_from(objects).unwrap_or(i64::MAX));
    }

    /// Sets the services-by-phase gauge from the phases of every service
    /// (`None`: no phase yet, counted as Pending).
    pub fn set_phases(&self, phases: impl IntoIterator<Item = Option<Phase>>) {
        let mut counts = [0i64; PHASES.len()];
        for phase in phases {
            let phase = phase.unwrap_or(Phase::Pending);
            if let Some(i) = PHASES.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (phase, n) in PHASES.iter().zip(counts) {
            self.services
                .get_or_create(&PhaseLabels {
                    phase: phase_name(*phase),
                })
                .set(n);
        }
    }

    /// The text exposition, with the services by phase counted from
    /// `services` (the watch cache) now.
    pub fn encode(&self, services: &Store<HAService>) -> String {
        self.set_phases(
            services
                .state()
                .iter()
                .map(|s| s.status.as_ref().and_then(|st| st.phase)),
        );
        self.registry.encode()
    }
}

/// What the operator answers on its HTTP port: `/healthz` while the process
/// serves, `/readyz` once every watch has listed its objects.
#[derive(Clone)]
pub struct Probes {
    /// The metrics `/metrics` encodes.
    pub metrics: Metrics,
    /// The services watched, counted by phase on every scrape.
    pub services: Store<HAService>,
    /// Set once every watch has listed.
    pub ready: Arc<AtomicBool>,
}

impl kubeha_runtime::http::Probes for Probes {
    fn metrics(&self) -> String {
        self.metrics.encode(&self.services)
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
        m.placed("Initial");
        m.placed("Failover");
        m.placed(MOVE);
        m.placement_completed("Failover", Duration::from_millis(800));
        m.reconciled("haservice", true, Duration::from_millis(2));
        m.set_leader(true);
        m.lease_written();
        m.set_memory_entries("service", 3);
        m.set_watched_objects("Node", 2);
        let text = m.encode(&empty_store());
        for line in [
            "kubeha_operator_placements_total{reason=\"Initial\"} 1",
            "kubeha_operator_placements_total{reason=\"Failover\"} 1",
            "kubeha_operator_placements_total{reason=\"Move\"} 1",
            "kubeha_operator_failovers_total 1\n",
            "kubeha_operator_placement_duration_seconds_count{reason=\"Failover\"} 1",
            "kubeha_operator_reconciles_total{controller=\"haservice\",result=\"ok\"} 1",
            "kubeha_operator_reconcile_duration_seconds_count{controller=\"haservice\"} 1",
            "kubeha_operator_leader 1",
            "kubeha_operator_service_lease_writes_total 1",
            "kubeha_operator_memory_entries{map=\"service\"} 3\n",
            "kubeha_operator_watched_objects{kind=\"Node\"} 2\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        let build = format!(
            "# TYPE kubeha_operator_build info\nkubeha_operator_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "missing {build} in\n{text}");
        assert!(!text.contains("failover_duration"), "{text}");
    }

    fn empty_store() -> Store<HAService> {
        kube::runtime::reflector::store::Writer::default().as_reader()
    }

    fn service(name: &str, phase: Option<Phase>) -> HAService {
        let mut svc: HAService = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubeha.io/v1alpha1",
            "kind": "HAService",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "clusterRef": "c",
                "vips": [{"address": "198.18.0.100/24"}],
                "hooks": {"source": {"hostPath": "svc"}},
            },
        }))
        .unwrap();
        svc.status = Some(kubeha_crds::service::HAServiceStatus {
            phase,
            ..Default::default()
        });
        svc
    }

    /// Every phase has its series, 0 included; each scrape counts the
    /// cache as it is then, so a service deleted or moved on to another
    /// phase is counted no more where it was.
    #[test]
    fn services_are_counted_by_phase_from_the_cache_on_every_scrape() {
        use kube::runtime::watcher::Event;
        let m = Metrics::default();
        let mut writer = kube::runtime::reflector::store::Writer::<HAService>::default();
        let store = writer.as_reader();
        writer.apply_watcher_event(&Event::Init);
        for (name, phase) in [
            ("a", Some(Phase::Active)),
            ("b", Some(Phase::Active)),
            ("c", Some(Phase::Errored)),
            ("d", None),
        ] {
            writer.apply_watcher_event(&Event::InitApply(service(name, phase)));
        }
        writer.apply_watcher_event(&Event::InitDone);
        let text = m.encode(&store);
        for line in [
            "kubeha_operator_services{phase=\"Active\"} 2\n",
            "kubeha_operator_services{phase=\"Errored\"} 1\n",
            "kubeha_operator_services{phase=\"Pending\"} 1\n",
            "kubeha_operator_services{phase=\"Starting\"} 0\n",
            "kubeha_operator_services{phase=\"Stopping\"} 0\n",
            "kubeha_operator_services{phase=\"Suspended\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }

        writer.apply_watcher_event(&Event::Delete(service("c", Some(Phase::Errored))));
        writer.apply_watcher_event(&Event::Apply(service("a", Some(Phase::Starting))));
        let text = m.encode(&store);
        for line in [
            "kubeha_operator_services{phase=\"Active\"} 1\n",
            "kubeha_operator_services{phase=\"Errored\"} 0\n",
            "kubeha_operator_services{phase=\"Starting\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
