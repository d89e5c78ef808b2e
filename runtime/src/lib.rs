//! What the operator and the agent both run, apart from their logic: the
//! fault-tolerant watch ([`watch`]), the `/metrics`, `/healthz` and
//! `/readyz` server ([`http`]) and logging setup ([`logging`]). It knows
//! nothing of HA; the API types live in `kubeha-crds`.

pub mod http;
pub mod logging;
pub mod watch;
