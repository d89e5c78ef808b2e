//! Prometheus metrics of the agent and its HTTP endpoints: `/metrics`,
//! `/healthz` (the main loop makes progress) and `/readyz` (every cluster's
//! heartbeat renewed within RD).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kubeha_crds::service::Role;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use kubeha_runtime::http::{RegistryBuilder, SharedRegistry};

use crate::heartbeat::Heartbeats;
use crate::statefile::ServiceRecord;
use crate::vip::Vip;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    service: String,
    cluster: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    service: String,
    address: String,
    interface: String,
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

/// The roles a service's role series are exported for, each 1 or 0.
const ROLES: [Role; 3] = [Role::Master, Role::Vicemaster, Role::None];

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Master => "master",
        Role::Vicemaster => "vicemaster",
        Role::None => "none",
    }
}

/// The agent's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: SharedRegistry,
    renew_failures: Family<ClusterLabels, Counter>,
    last_renew_age: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    vips_held: Gauge,
    vip_held: Family<VipLabels, Gauge>,
    service_role: Family<RoleLabels, Gauge>,
    service_fail_count: Family<ServiceLabels, Gauge>,
    /// The label sets exported per service (its cluster) and per held VIP
    /// (by `address/prefix`), so that what goes away is removed.
    exported: Arc<Mutex<Exported>>,
    garps_sent: Counter,
    fences: Counter,
    hook_runs: Family<HookLabels, Counter>,
    hook_duration: HookHistogram,
    transitions: Family<TransitionLabels, Counter>,
}

#[derive(Default)]
struct Exported {
    /// Service key to its cluster.
    services: BTreeMap<String, String>,
    /// `address/prefix` to the labels of its series.
    vips: BTreeMap<String, VipLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Default::default(),
            renew_failures: Default::default(),
            last_renew_age: Default::default(),
            vips_held: Default::default(),
            vip_held: Default::default(),
            service_role: Default::default(),
            service_fail_count: Default::default(),
            exported: Default::default(),
            garps_sent: Default::default(),
            fences: Default::default(),
            hook_runs: Default::default(),
            hook_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 16))
            }),
            transitions: Default::default(),
        };
        let registry = RegistryBuilder::new("kubeha_agent")
            .info(
                "build",
                "The agent's version",
                &[("version", env!("CARGO_PKG_VERSION"))],
            )
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
                "vip_held",
                "1 while this node holds the VIP (added for the service and not \
                 removed, given up or expired); no series otherwise",
                &m.vip_held,
            )
            .metric(
                "service_role",
                "1 for the role this node has for the service (master, vicemaster, \
                 none), 0 for the other two; no series once the service is gone \
                 from this node",
                &m.service_role,
            )
            .metric(
                "service_fail_count",
                "Failures of the service counted on this node (its status entry's \
                 failCount, which placement compares with migrationThreshold)",
                &m.service_fail_count,
            )
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

    /// Exports `vip`, added on `interface` for `service`, as held (again).
    pub fn vip_held(&self, service: &str, interface: &str, vip: &Vip) {
        let labels = VipLabels {
            service: service.to_owned(),
            address: vip.addr.to_string(),
            interface: interface.to_owned(),
        };
        let mut exported = lock(&self.exported);
        if let Some(old) = exported.vips.insert(vip.to_string(), labels.clone())
            && old != labels
        {
            self.vip_held.remove(&old);
        }
        self.vip_held.get_or_create(&labels).set(1);
        self.vips_held.set(exported.vips.len() as i64);
    }

    /// Removes the series of the VIP `address/prefix`: no longer held.
    pub fn vip_released(&self, vip: &str) {
        let mut exported = lock(&self.exported);
        if let Some(labels) = exported.vips.remove(vip) {
            self.vip_held.remove(&labels);
        }
        self.vips_held.set(exported.vips.len() as i64);
    }

    /// Exports the role and fail count `record` says this node has for the
    /// service `key`.
    pub fn service(&self, key: &str, record: &ServiceRecord) {
        let mut exported = lock(&self.exported);
        if let Some(old) = exported
            .services
            .insert(key.to_owned(), record.cluster.clone())
            && old != record.cluster
        {
            self.remove_service(key, &old);
        }
        for role in ROLES {
            self.service_role
                .get_or_create(&RoleLabels {
                    service: key.to_owned(),
                    cluster: record.cluster.clone(),
                    role: role_name(role).to_owned(),
                })
                .set(i64::from(role == record.role));
        }
        self.service_fail_count
            .get_or_create(&ServiceLabels {
                service: key.to_owned(),
                cluster: record.cluster.clone(),
            })
            .set(i64::from(record.fail_count));
    }

    /// Removes the series of every service `keep` says is gone from this
    /// node.
    pub fn retain_services(&self, keep: impl Fn(&str) -> bool) {
        let mut exported = lock(&self.exported);
        exported.services.retain(|key, cluster| {
            let kept = keep(key);
            if !kept {
                self.remove_service(key, cluster);
            }
            kept
        });
    }

    fn remove_service(&self, key: &str, cluster: &str) {
        for role in ROLES {
            self.service_role.remove(&RoleLabels {
                service: key.to_owned(),
                cluster: cluster.to_owned(),
                role: role_name(role).to_owned(),
            });
        }
        self.service_fail_count.remove(&ServiceLabels {
            service: key.to_owned(),
            cluster: cluster.to_owned(),
        });
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
            None,
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
        let build = format!(
            "# TYPE kubeha_agent_build info\nkubeha_agent_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "missing {build} in\n{text}");
    }

    fn encode(m: &Metrics) -> String {
        m.encode(&Heartbeats::default())
    }

    fn record(cluster: &str, role: Role, fail_count: i32) -> ServiceRecord {
        let spec = serde_json::from_value(serde_json::json!({
            "clusterRef": cluster,
            "vips": [{"address": "198.18.0.100/24"}],
            "hooks": {"source": {"hostPath": "svc"}},
        }))
        .unwrap();
        let mut r = ServiceRecord::fresh(cluster, &spec, "x".into(), None);
        r.role = role;
        r.fail_count = fail_count;
        r
    }

    /// Every service has its three role series, 1 for the role it has;
    /// a role change flips them, and a service gone from the node (or
    /// moved to another cluster) leaves no series behind.
    #[test]
    fn service_roles_and_fail_counts_follow_the_records_and_go_with_them() {
        let m = Metrics::default();
        m.service("ns/a", &record("c", Role::Master, 0));
        m.service("ns/b", &record("c", Role::Vicemaster, 2));
        let text = encode(&m);
        for line in [
            "kubeha_agent_service_role{service=\"ns/a\",cluster=\"c\",role=\"master\"} 1\n",
            "kubeha_agent_service_role{service=\"ns/a\",cluster=\"c\",role=\"vicemaster\"} 0\n",
            "kubeha_agent_service_role{service=\"ns/a\",cluster=\"c\",role=\"none\"} 0\n",
            "kubeha_agent_service_role{service=\"ns/b\",cluster=\"c\",role=\"vicemaster\"} 1\n",
            "kubeha_agent_service_fail_count{service=\"ns/a\",cluster=\"c\"} 0\n",
            "kubeha_agent_service_fail_count{service=\"ns/b\",cluster=\"c\"} 2\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }

        m.service("ns/a", &record("c", Role::None, 1));
        let text = encode(&m);
        assert!(
            text.contains(
                "kubeha_agent_service_role{service=\"ns/a\",cluster=\"c\",role=\"master\"} 0\n"
            ) && text.contains(
                "kubeha_agent_service_role{service=\"ns/a\",cluster=\"c\",role=\"none\"} 1\n"
            ),
            "{text}"
        );

        m.service("ns/a", &record("d", Role::None, 1));
        m.retain_services(|k| k == "ns/a");
        let text = encode(&m);
        assert!(!text.contains("service=\"ns/b\""), "ns/b stayed:\n{text}");
        assert!(!text.contains("cluster=\"c\""), "cluster c stayed:\n{text}");
        assert_eq!(
            text.matches("service=\"ns/a\",cluster=\"d\"").count(),
            4,
            "{text}"
        );

        m.retain_services(|_| false);
        let text = encode(&m);
        assert!(!text.contains("service=\""), "series left:\n{text}");
    }

    /// A VIP held has one series with its service, address and interface;
    /// released, the series goes; `vips_held` counts what is held.
    #[test]
    fn a_vip_series_lives_while_it_is_held() {
        let m = Metrics::default();
        let v4 = Vip::parse("198.18.0.100/24", None).unwrap();
        let v6 = Vip::parse("2001:db8::100/64", None).unwrap();
        m.vip_held("ns/a", "eth0", &v4);
        m.vip_held("ns/a", "eth0", &v4);
        m.vip_held("ns/b", "eth1", &v6);
        let text = encode(&m);
        for line in [
            "kubeha_agent_vip_held{service=\"ns/a\",address=\"198.18.0.100\",interface=\"eth0\"} 1\n",
            "kubeha_agent_vip_held{service=\"ns/b\",address=\"2001:db8::100\",interface=\"eth1\"} 1\n",
            "kubeha_agent_vips_held 2\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }

        // Held again on another interface: one series, the new one.
        m.vip_held("ns/a", "eth2", &v4);
        let text = encode(&m);
        assert!(!text.contains("interface=\"eth0\""), "{text}");
        assert!(text.contains("kubeha_agent_vips_held 2\n"), "{text}");

        m.vip_released("198.18.0.100/24");
        m.vip_released("198.18.0.100/24");
        m.vip_released(&v6.to_string());
        let text = encode(&m);
        assert!(!text.contains("kubeha_agent_vip_held{"), "{text}");
        assert!(text.contains("kubeha_agent_vips_held 0\n"), "{text}");
    }
}
