//! kubeha API types: `HACluster` (cluster-scoped) and `HAService`
//! (namespaced) in group `kubeha.io`, version `v1alpha1`, with the constants
//! and mode rules that operator, agent and plugin share.

pub mod annotations;
pub mod cidr;
pub mod cluster;
pub mod hook_policy;
pub mod leases;
#[cfg(feature = "manifests")]
pub mod manifests;
pub mod members;
pub mod mode;
pub mod roles;
pub mod service;
#[cfg(feature = "testing")]
pub mod testing;
pub mod timing;
pub mod validate;

pub use cluster::{HACluster, HAClusterSpec, HAClusterStatus};
pub use mode::Mode;
pub use service::{HAService, HAServiceSpec, HAServiceStatus, Role};

/// API group of every kubeha kind.
pub const GROUP: &str = "kubeha.io";
/// API version of the kinds.
pub const VERSION: &str = "v1alpha1";
/// Root directory on each node under which `hooks.source.hostPath` resolves.
pub const HOOK_ROOT: &str = "/etc/kubeha/hooks";
