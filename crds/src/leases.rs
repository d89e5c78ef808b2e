//! Names, labels and annotations of the Lease objects operator and agents
//! share: one heartbeat Lease per (HACluster, member node) in the operator's
//! namespace, and one leadership Lease per HAService in its namespace.

/// Label on every kubeha Lease saying which kind it is.
pub const LEASE_KIND_LABEL: &str = "kubeha.io/lease";
/// [`LEASE_KIND_LABEL`] value of a node heartbeat Lease.
pub const HEARTBEAT: &str = "heartbeat";
/// [`LEASE_KIND_LABEL`] value of a service leadership Lease.
pub const SERVICE: &str = "service";
/// Label: the HACluster a Lease belongs to.
pub const CLUSTER_LABEL: &str = "kubeha.io/cluster";
/// Label: the node a heartbeat Lease belongs to.
pub const NODE_LABEL: &str = "kubeha.io/node";
/// Label: the HAService a service Lease belongs to.
pub const SERVICE_LABEL: &str = "kubeha.io/service";

/// Annotation on a service Lease: the node in the vicemaster role.
pub const STANDBY_ANNOTATION: &str = "kubeha.io/standby";
/// Annotation on a service Lease: the epoch the holder may enter. The
/// operator sets it equal to `leaseTransitions` once the previous holder
/// acknowledged leaving the previous epoch, or was certainly fenced; until
/// then the new holder waits.
pub const ENTER_EPOCH_ANNOTATION: &str = "kubeha.io/enter-epoch";

/// Name of the heartbeat Lease of `node` in `cluster`.
pub fn heartbeat_lease_name(cluster: &str, node: &str) -> String {
    format!("kubeha-hb-{cluster}-{node}")
}

/// Name of the leadership Lease of the HAService `service` (same namespace).
pub fn service_lease_name(service: &str) -> String {
    format!("kubeha-svc-{service}")
}

/// Label selector for every service Lease.
pub fn service_lease_selector() -> String {
    format!("{LEASE_KIND_LABEL}={SERVICE}")
}

/// Label selector for the heartbeat Leases of one cluster.
pub fn heartbeat_lease_selector(cluster: &str) -> String {
    format!("{LEASE_KIND_LABEL}={HEARTBEAT},{CLUSTER_LABEL}={cluster}")
}

/// Server-side-apply field manager of the agent on `node`: one per node, so
/// each agent owns exactly its own entry of `status.nodes`.
pub fn agent_field_manager(node: &str) -> String {
    format!("kubeha-agent-{node}")
}
