//! Leader election among operator replicas with `kube-lease-manager`: the
//! Lease `kubeha-operator-leader` in the operator namespace. Only the
//! leader writes; the others keep watching, so a new leader starts with a
//! warm heartbeat view.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};

use crate::context::Ctx;

/// Name of the leader-election Lease.
pub const LEADER_LEASE: &str = "kubeha-operator-leader";

/// Leader-election settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// Seconds a leader's lock stays valid without renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the leader renews.
    pub grace_seconds: u64,
}

/// Runs the election until the process ends, mirroring the lock into
/// `ctx`. Returns (an error) only when the election itself stopped, after
/// which this replica must not write: the caller exits.
pub async fn run(
    client: Client,
    settings: Settings,
    ctx: Arc<Ctx>,
) -> Result<(), LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, LEADER_LEASE)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_seconds)
        .with_grace(settings.grace_seconds)
        .with_field_manager(format!("kubeha-operator-leader-{}", settings.identity))
        .build()
        .await?;
    let (mut channel, task) = manager.watch().await;
    tracing::info!(identity = %settings.identity, lease = LEADER_LEASE, "leader election started");
    loop {
        let leader = *channel.borrow_and_update();
        ctx.set_leader(leader);
        if channel.changed().await.is_err() {
            break;
        }
    }
    ctx.set_leader(false);
    // The manager task ended on its own: report why.
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Err(e))) => Err(e),
        _ => Ok(()),
    }
}
