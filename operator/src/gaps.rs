//! Gaps in the operator's own view of the heartbeats, and the quorum read
//! that closes them (the rule is in [`crate::heartbeat_view`]'s docs).
//!
//! A gap opens when:
//! - the process was not running: the pulse (an instant every piece of the
//!   operator that reads a view refreshes, and a ticker every
//!   [`PULSE_EVERY`]) is older than [`GAP_AFTER`];
//! - the heartbeat watch failed or listed again (the API server was
//!   unreachable, or the watch restarted);
//! - this replica just became the leader.
//!
//! While a gap is open every view judges as of its start and the leader
//! writes nothing ([`Ctx::in_gap`]); [`run`] reads every heartbeat Lease
//! with a quorum read (a list without a resourceVersion), observes each at
//! the instant the read returned, and closes the gaps opened before the
//! read began.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::ListParams;
use kubeha_crds::leases;

use crate::context::Ctx;
use crate::heartbeat_view::Fingerprint;

/// How often the ticker refreshes the pulse.
pub const PULSE_EVERY: Duration = Duration::from_millis(100);

/// A pulse older than this means the process did not run meanwhile (a
/// paused process, a stalled VM): a gap. Ten ticks, so a busy machine that
/// delays the ticker a little opens none; one opened without need costs a
/// list of the heartbeat Leases.
pub const GAP_AFTER: Duration = Duration::from_secs(1);

/// When a reconcile that met an open gap runs again (the read closing it
/// also reconciles everything).
pub const WAIT_IN_GAP: Duration = Duration::from_millis(100);

/// How long to wait before reading again after a failed quorum read.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Refreshes the pulse every [`PULSE_EVERY`], opening a gap when the
/// process did not run for [`GAP_AFTER`]. Runs forever.
pub async fn pulse(ctx: Arc<Ctx>) {
    let mut ticker = tokio::time::interval(PULSE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        ctx.check_pulse(Instant::now());
    }
}

/// Closes every gap the moment a quorum read of the heartbeat Leases that
/// began after it succeeds, retrying until one does. Runs forever.
pub async fn run(ctx: Arc<Ctx>) {
    loop {
        ctx.gap_opened().await;
        loop {
            let generation = ctx.gap_generation();
            match read_heartbeats(&ctx).await {
                Ok(leases) => {
                    let now = Instant::now();
                    let observed: Vec<(String, String, Fingerprint)> = leases
                        .iter()
                        .filter_map(|l| {
                            let (cluster, node) = leases::heartbeat_of(l)?;
                            Some((cluster.to_owned(), node.to_owned(), Fingerprint::of(l)))
                        })
                        .collect();
                    if ctx.close_gaps(generation, observed, now) {
                        tracing::info!(
                            leases = leases.len(),
                            "heartbeats read again after a gap in the operator's view: judging from them"
                        );
                        ctx.trigger_everything();
                        break;
                    }
                    // A newer gap opened while reading: read again.
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the heartbeat Leases after a gap failed (retrying)");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }
}

/// Every heartbeat Lease, read from etcd (no resourceVersion: a quorum
/// read, never a cache's).
async fn read_heartbeats(ctx: &Ctx) -> kube::Result<Vec<Lease>> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let params = ListParams::default().labels(&leases::heartbeat_lease_selector());
    Ok(api.list(&params).await?.items)
}
