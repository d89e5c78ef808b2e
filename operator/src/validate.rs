//! The validation of an HAService against its cluster moved to
//! `crds/src/validate.rs` (`kubeha_crds::validate`): the agent runs the
//! same checks before it enters. Edit it there.

pub use kubeha_crds::validate::*;
