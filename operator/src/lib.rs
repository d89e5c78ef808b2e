//! kubeha operator.

pub mod handover;
pub mod heartbeat_view;
pub mod placement;
