//! kubeha operator.

pub mod cluster_plan;
pub mod conditions;
pub mod handover;
pub mod heartbeat_view;
pub mod members;
pub mod memory;
pub mod placement;
pub mod service_plan;
pub mod validate;
