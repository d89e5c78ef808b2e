//! Helpers for lab tests that run the real operator beside the agents: the
//! lab brought to that state, waiting for a service to be Active on a node,
//! the service Lease as a user reads it, and removing a test's service and
//! cluster.

use std::time::Duration;

use anyhow::bail;

use super::{OPERATOR_NAMESPACE, SERVICE_NAMESPACE};
use crate::lab::Lab;
use crate::nodes;

/// The lab with `count` nodes, each powered on with its agent running, and
/// operator replica 0 running: what an earlier test stopped comes back.
pub fn operator_lab(count: u8) -> anyhow::Result<Lab> {
    let lab = Lab::of_this_checkout();
    lab.ensure_up_with_nodes(count)?;
    for i in 1..=count {
        lab.power_on(i)?;
        if !lab.agent_running(i) {
            lab.start_agent(i, &[] as &[&str])?;
        }
    }
    if !lab.operator_running(0) {
        lab.start_operator(0, &[])?;
    }
    Ok(lab)
}

/// Waits until the status of `service` calls lab node `node` active, its
/// phase is Active and exactly that node holds `vip`
/// ([`super::active_node`]); returns how long that took, or an error with
/// the status and the holders seen last.
pub fn wait_active_on(
    lab: &Lab,
    service: &str,
    vip: &str,
    node: u8,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    match super::wait_until(timeout, || {
        super::active_node(lab, service, vip) == Some(node)
    }) {
        Some(took) => Ok(took),
        None => bail!(
            "{service} never became Active on {} alone within {timeout:?}: status {}, holders of {vip} {:?}",
            nodes::node_name(node),
            super::service_status(lab, service),
            super::vip_holders(vip)
        ),
    }
}

/// The leadership Lease of a service as the operator wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceLease {
    /// `spec.holderIdentity` (empty: nobody).
    pub holder: String,
    /// `spec.leaseTransitions`: the epoch.
    pub epoch: i64,
    /// Annotation `kubeha.io/standby` (empty: none).
    pub standby: String,
}

/// The leadership Lease of HAService `service` in [`SERVICE_NAMESPACE`];
/// `None` while there is none.
pub fn service_lease(lab: &Lab, service: &str) -> Option<ServiceLease> {
    let lease = lab
        .kubectl_json(&[
            "get",
            "lease",
            &super::service_lease_name(service),
            "-n",
            OPERATOR_NAMESPACE,
        ])
        .ok()?;
    Some(ServiceLease {
        holder: lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        epoch: lease["spec"]["leaseTransitions"].as_i64()?,
        standby: lease["metadata"]["annotations"]["kubeha.io/standby"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// Deletes the HAServices `services` (the operator stops each everywhere
/// first: finalizer) and HACluster `cluster`, and waits until none exists
/// and no node holds any of `vips`. Errors name what is left. What does not
/// exist is skipped, so a test also calls it first, for what an earlier run
/// left.
pub fn remove_services_and_cluster(
    lab: &Lab,
    services: &[&str],
    cluster: &str,
    vips: &[&str],
) -> anyhow::Result<()> {
    for service in services {
        super::delete(lab, "haservice", service, Some(SERVICE_NAMESPACE));
    }
    let gone = |kind: &str, ns: Option<&str>, name: &str| {
        let mut args = vec!["get", kind, name];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        lab.kubectl_output(&args).is_ok_and(|o| !o.status.success())
    };
    let released = super::wait_until(Duration::from_secs(20), || {
        services
            .iter()
            .all(|s| gone("haservice", Some(SERVICE_NAMESPACE), s))
    });
    // Their Leases too, as the operator does when it releases a finalizer.
    for service in services {
        super::delete_service(lab, service);
    }
    super::delete(lab, "hacluster", cluster, None);
    let cluster_gone =
        super::wait_until(Duration::from_secs(20), || gone("hacluster", None, cluster));
    let vips_free = super::wait_until(Duration::from_secs(20), || {
        vips.iter().all(|v| super::vip_holders(v).is_empty())
    });
    if released.is_none() {
        bail!("the finalizer never let every one of the HAServices {services:?} go");
    }
    if cluster_gone.is_none() {
        bail!("HACluster {cluster} still exists 20 s after its deletion");
    }
    if vips_free.is_none() {
        let held: Vec<_> = vips
            .iter()
            .map(|v| (v, super::vip_holders(v)))
            .filter(|(_, h)| !h.is_empty())
            .collect();
        bail!("VIPs still held after {services:?} were deleted: {held:?}");
    }
    Ok(())
}
