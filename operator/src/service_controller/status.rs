//! The HAService status, written by server-side apply under the operator's
//! field manager.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use kubeha_crds::HAService;
use serde_json::json;

use crate::conditions::{self, Cond};
use crate::context::{Ctx, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::service_plan::Plan;
use crate::service_plan::StatusFields;

/// The status apply patch (operator-owned fields only).
pub(super) fn status_patch(
    status: &StatusFields,
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
) -> serde_json::Value {
    let mut s = serde_json::Map::new();
    s.insert("phase".into(), json!(status.phase));
    if let Some(a) = &status.active_node {
        s.insert("activeNode".into(), json!(a));
    }
    if let Some(b) = &status.standby_node {
        s.insert("standbyNode".into(), json!(b));
    }
    if let Some(e) = status.epoch {
        s.insert("epoch".into(), json!(e));
    }
    s.insert("vips".into(), json!(status.vips));
    s.insert("conditions".into(), json!(conditions));
    if let Some(g) = generation {
        s.insert("observedGeneration".into(), json!(g));
    }
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "status": serde_json::Value::Object(s),
    })
}

pub(super) async fn publish_status(
    ctx: &Ctx,
    svc: &HAService,
    fields: &StatusFields,
) -> Result<()> {
    let generation = svc.meta().generation;
    let old = svc.status.clone().unwrap_or_default();
    let conditions = conditions::settle(
        &old.conditions,
        &fields.conditions,
        generation,
        Time(jiff::Timestamp::now()),
    );
    let unchanged = old.phase == Some(fields.phase)
        && old.active_node == fields.active_node
        && old.standby_node == fields.standby_node
        && old.epoch == fields.epoch
        && old.vips.as_deref() == Some(fields.vips.as_str())
        && old.observed_generation == generation
        && conditions::same(&old.conditions, &conditions);
    if unchanged {
        return Ok(());
    }
    let ns = svc.namespace().ok_or(Error::Unnamed("namespace"))?;
    let api: Api<HAService> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = status_patch(fields, &conditions, generation);
    api.patch_status(
        &svc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Whether the status does not yet say that the move request is blocked
/// for this reason (so the Event is published once per reason).
pub(super) fn move_blocked_is_new(svc: &HAService, why: &str) -> bool {
    condition_is_new(svc, conditions::MOVED, Some(why))
}

/// Whether the status does not yet show condition `type_` as `plan` sets
/// it: with `blocked`, a False condition with that message; without, a
/// condition that is not blocked (reason other than `TargetNotEligible`).
pub(super) fn condition_is_new(svc: &HAService, type_: &str, blocked: Option<&str>) -> bool {
    !svc.status
        .iter()
        .flat_map(|s| &s.conditions)
        .filter(|c| c.type_ == type_)
        .any(|c| match blocked {
            Some(why) => c.status == "False" && c.message == why,
            None => c.reason != "TargetNotEligible",
        })
}

/// The `Stalled` condition `plan` sets that the service's status does
/// not show yet (a new refusal, or a new reason for it): announced once as
/// a Warning Event, not on every reconcile.
pub(super) fn stall_is_new<'p>(svc: &HAService, plan: &'p Plan) -> Option<&'p Cond> {
    let stalled = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::STALLED && c.status)?;
    let shown = svc.status.iter().flat_map(|s| &s.conditions).any(|c| {
        c.type_ == conditions::STALLED
            && c.status == "True"
            && c.reason == stalled.reason
            && c.message == stalled.message
    });
    (!shown).then_some(stalled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kubeha_crds::service::Phase;

    #[test]
    fn status_patch_has_only_operator_fields() {
        let fields = StatusFields {
            phase: Phase::Active,
            active_node: Some("a".into()),
            standby_node: None,
            epoch: Some(3),
            vips: "198.18.0.100/24".into(),
            conditions: vec![],
        };
        let p = status_patch(&fields, &[], Some(7));
        let s = &p["status"];
        assert_eq!(s["phase"], "Active");
        assert_eq!(s["activeNode"], "a");
        assert!(s.get("standbyNode").is_none());
        assert_eq!(s["epoch"], 3);
        assert_eq!(s["observedGeneration"], 7);
        assert!(s.get("nodes").is_none(), "agents own status.nodes");
        assert_eq!(p["kind"], "HAService");
    }

    #[test]
    fn status_patch_matches_the_api_types() {
        let fields = StatusFields {
            phase: Phase::Starting,
            active_node: Some("a".into()),
            standby_node: Some("b".into()),
            epoch: Some(2),
            vips: "198.18.0.100/24".into(),
            conditions: vec![conditions::Cond::yes(conditions::READY, "Active", "m")],
        };
        let conds = conditions::settle(
            &[],
            &fields.conditions,
            Some(1),
            Time(jiff::Timestamp::UNIX_EPOCH),
        );
        let p = status_patch(&fields, &conds, Some(1));
        let parsed: kubeha_crds::HAServiceStatus =
            serde_json::from_value(p["status"].clone()).unwrap();
        assert_eq!(parsed.phase, Some(Phase::Starting));
        assert_eq!(parsed.active_node.as_deref(), Some("a"));
        assert_eq!(parsed.standby_node.as_deref(), Some("b"));
        assert_eq!(parsed.epoch, Some(2));
        assert_eq!(parsed.vips.as_deref(), Some("198.18.0.100/24"));
        assert_eq!(parsed.conditions, conds);
        assert_eq!(parsed.observed_generation, Some(1));
        assert!(parsed.nodes.is_empty());
    }
}
