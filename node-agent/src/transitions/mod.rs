//! Transitions of one service on this node: leave the old role, enter the new
//! one; enter master = add VIPs (with a lifetime bounded by the heartbeat),
//! announce them (the GARP burst's first round at once, the rest while the
//! enter scripts run); leave master = remove the VIPs,
//! run the leave scripts. Also re-adoption after a restart, VIP lifetime
//! extension, monitor and periodic hooks, and the self-fence of one cluster.

mod addresses;
mod lifetime;
mod scripts;
mod steps;

pub use scripts::HookCall;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kubeha_crds::HAServiceSpec;
use kubeha_crds::service::{HookOutcome, HookResult};

use crate::heartbeat::Beat;
use crate::hooks::HookRunner;
use crate::metrics::Metrics;
use crate::vip::{self, Netlink, Vip};

/// This node as transitions act on it (named apart from the Kubernetes
/// Node): netlink, the hook runner, the VIPs held; everything a transition
/// needs besides the service itself.
pub struct LocalNode<N: Netlink> {
    /// This node's name.
    pub name: String,
    /// Netlink access.
    pub netlink: N,
    /// Hook runner (shared registry of running hooks, for the fence).
    pub runner: HookRunner,
    /// Root of host-path hook sources.
    pub hook_root: PathBuf,
    /// Where ConfigMap hook sources are written out.
    pub state_dir: PathBuf,
    /// Metrics.
    pub metrics: Metrics,
    /// The VIPs this agent holds, extended after every renew (shared with
    /// the GARP rounds an entry leaves running, [`LocalNode::announce`]).
    pub held: Arc<HeldVips>,
}

/// The VIPs this agent added and has not removed, by address
/// (`address/prefix`), with the interface and cluster of each. Lifetimes are
/// extended from here after every renew, without the service's record lock:
/// a transition's hooks, a monitor or a status report hold that lock for
/// seconds, longer than a lifetime may be. VIPs the kernel expired before an
/// extension are kept aside until the record holding them gives its master
/// role up ([`LocalNode::give_up_if_expired`]).
#[derive(Debug, Default)]
pub struct HeldVips {
    held: std::sync::Mutex<std::collections::BTreeMap<String, (String, String)>>,
    expired: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Orders an extension's check-then-add against every removal: an
    /// extension that saw a VIP held and present must not re-add it after
    /// a leave or fence removed it (it would stay, unheld and unseen, for
    /// its whole lifetime while another node takes it).
    gate: tokio::sync::Mutex<()>,
}

impl HeldVips {
    fn hold(&self, iface: &str, vip: &Vip, cluster: &str) {
        let key = vip.to_string();
        lock(&self.expired).remove(&key);
        lock(&self.held).insert(key, (iface.to_owned(), cluster.to_owned()));
    }

    fn release(&self, vip: &Vip) {
        lock(&self.held).remove(&vip.to_string());
    }

    fn is_held(&self, vip: &str) -> bool {
        lock(&self.held).contains_key(vip)
    }

    /// The held VIPs of `cluster`, with their interfaces.
    fn of_cluster(&self, cluster: &str) -> Vec<(String, String)> {
        lock(&self.held)
            .iter()
            .filter(|(_, (_, c))| c == cluster)
            .map(|(v, (i, _))| (v.clone(), i.clone()))
            .collect()
    }

    fn expire(&self, vip: &str) {
        lock(&self.held).remove(vip);
        lock(&self.expired).insert(vip.to_owned());
    }

    /// Whether any of `vips` expired before it was extended.
    pub fn any_expired(&self, vips: &[String]) -> bool {
        let expired = lock(&self.expired);
        vips.iter().any(|v| expired.contains(v))
    }

    /// Takes the expired VIPs among `vips` out of the expired set.
    fn take_expired(&self, vips: &[String]) -> Vec<String> {
        let mut expired = lock(&self.expired);
        vips.iter()
            .filter(|v| expired.remove(*v))
            .cloned()
            .collect()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Facts about the service's cluster a transition uses.
#[derive(Debug, Clone)]
pub struct TransitionCluster {
    /// Cluster name.
    pub name: String,
    /// The actual members, listed and selected, in placement order
    /// ([`kubeha_crds::roles::known_members`]): the first is the primary
    /// node of a service that prefers no member.
    pub members: Vec<String>,
    /// The heartbeat of this node in that cluster.
    pub beat: Option<Beat>,
    /// Set when this node fenced itself for the cluster and has not renewed since.
    pub fenced: Arc<AtomicBool>,
}

/// A service as one transition sees it.
#[derive(Debug, Clone)]
pub struct TransitionService {
    /// `namespace/name`.
    pub key: String,
    /// The spec acted on.
    pub spec: HAServiceSpec,
    /// Checksum of the spec.
    pub checksum: String,
}

/// Why entering failed.
#[derive(Debug, thiserror::Error)]
pub enum EnterError {
    /// No VIP interface (missing or no subnet holds the VIP).
    #[error("VIP {vip}: {source}")]
    Interface {
        /// The VIP.
        vip: String,
        /// The netlink error.
        source: vip::VipError,
    },
    /// The heartbeat is too old to give the VIP any lifetime.
    #[error("heartbeat too old to add VIPs safely (renew first)")]
    HeartbeatTooOld,
    /// Fenced while entering.
    #[error("fenced while entering")]
    Fenced,
    /// The agent stalled while it added the VIP, so long that the lease end
    /// it was to be held until had passed: nothing was added.
    #[error(
        "VIP {0}: the agent stalled while adding it, past what the heartbeat allows; not added"
    )]
    StalledInCall(String),
    /// Another host kept answering for the VIP (address conflict
    /// detection) for longer than [`CONFLICT_WAIT`].
    #[error(
        "VIP {vip} is still answered on {iface} by {mac}: another host holds it; \
         remove it there (or give this service another VIP)"
    )]
    StillAnswered {
        /// The VIP.
        vip: String,
        /// The interface probed.
        iface: String,
        /// The MAC that answered.
        mac: String,
    },
}

/// The longest an entering node waits for another host to stop answering
/// for a VIP: a previous holder's address can outlive its kernel lifetime
/// by up to a second (the kernel checks lifetimes at least a second apart
/// after any address change).
pub const CONFLICT_WAIT: Duration = Duration::from_secs(2);

/// How long one round of ARP probes listens for answers (a probe at its
/// start and one halfway). It is on the latency path of every entry. A
/// host on the segment that holds the VIP answers a probe within a
/// millisecond (the kernel answers ARP in its receive path); the window
/// leaves room for a loaded host and for one lost probe. A kubeha node
/// whose lease ended answers no ARP for the VIP (its packet fence drops
/// it), so what this window waits for is a host outside kubeha.
const PROBE_WINDOW: Duration = Duration::from_millis(10);

/// Kept between the end of a VIP's packet fence and the end of E (D + skew)
/// after the renew it was extended from ([`kubeha_crds::timing`], where the
/// timing rule the API server enforces uses it too).
pub const FENCE_MARGIN: Duration =
    Duration::from_millis(kubeha_crds::timing::FENCE_MARGIN_MS as u64);

/// A hook result standing for a step that could not run.
pub fn refused(reason: &str) -> HookResult {
    HookResult {
        script: "-".into(),
        action: "enter".into(),
        exit_code: None,
        outcome: HookOutcome::Refused,
        duration_ms: 0,
        finished_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        )),
        output_tail: vec![reason.to_owned()],
    }
}

#[cfg(test)]
mod tests;
