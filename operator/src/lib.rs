#![warn(missing_docs)]
//! kubeha operator: places each HAService on a member of its HACluster and
//! hands it over between nodes so that at no instant two nodes run it.
//!
//! Pure logic (unit-tested without a cluster):
//! - [`placement`]: which member runs each service and which stands by;
//! - [`heartbeat_view`]: member heartbeats judged by the operator's own
//!   monotonic clock (Alive, Lost, Fenced) and the exact next expiry;
//! - [`handover`]: the service Lease to write (holder, epoch, standby,
//!   enter-epoch) and when the new holder may be cleared to enter;
//! - [`validate`], [`members`], [`conditions`], [`memory`],
//!   [`service_plan`], [`cluster_plan`]: validation, member resolution,
//!   status conditions, Event memory, and the full decision of one
//!   reconcile of a service or a cluster.
//!
//! Kubernetes glue: [`watch`] (fault-tolerant watches and dispatch),
//! [`context`], [`gaps`] (gaps in the operator's own view and the quorum
//! read that closes them), [`service_controller`], [`cluster_controller`], [`leader`]
//! (leader election), [`metrics`] and [`app`] (command line, run).

pub mod app;
pub mod cluster_controller;
pub mod cluster_plan;
pub mod conditions;
pub mod context;
pub mod error;
pub mod gaps;
pub mod handover;
pub mod heartbeat_view;
pub mod leader;
pub mod members;
pub mod memory;
pub mod metrics;
pub mod placement;
pub mod scope;
pub mod service_controller;
pub mod service_plan;
pub mod validate;
pub mod watch;

pub use app::{Cli, run};
pub use error::{Error, Result};
