//! The service's hook scripts as transitions run them: where they are, the
//! environment they get, their timeout; and the monitor and periodic checks.

use std::time::Duration;

use kubeha_crds::service::{HookOutcome, HookResult, Role};

use kubeha_crds::roles::primary_node;

use super::{LocalNode, TransitionCluster, TransitionService};
use crate::hooks::{self, Action, HookContext, HookLayout, HookSet};
use crate::statefile::ServiceRecord;
use crate::vip::Netlink;

/// One run of an action's hooks: the action, the role the scripts are
/// given, and the epoch they are told.
#[derive(Clone, Copy, Debug)]
pub struct HookCall {
    /// What the scripts are asked to do.
    pub action: Action,
    /// The role passed as the scripts' second argument.
    pub role: Role,
    /// `KUBEHA_EPOCH`.
    pub epoch: i64,
}

impl HookCall {
    /// A call of `action` with `role` at `epoch`.
    pub fn new(action: Action, role: Role, epoch: i64) -> Self {
        Self {
            action,
            role,
            epoch,
        }
    }
}

impl<N: Netlink> LocalNode<N> {
    /// Whether this node is the service's primary node
    /// ([`primary_node`]).
    pub fn is_primary(&self, svc: &TransitionService, cluster: &TransitionCluster) -> bool {
        primary_node(&svc.spec, cluster.members.iter().map(String::as_str)) == Some(&self.name)
    }

    /// The hook set of a spec, if it has hooks.
    pub fn hook_set(&self, svc: &TransitionService) -> Option<HookSet> {
        let hooks = svc.spec.hooks.as_ref()?;
        let dir = match (&hooks.source.host_path, &hooks.source.config_map) {
            (Some(p), _) => self.hook_root.join(p),
            (None, Some(cm)) => self.state_dir.join("configmap-hooks").join(cm),
            (None, None) => return None,
        };
        let layout = match &hooks.script {
            Some(s) => HookLayout::SingleScript(s.clone()),
            None => HookLayout::Directory,
        };
        Some(HookSet { dir, layout })
    }

    fn context(
        &self,
        svc: &TransitionService,
        cluster: &TransitionCluster,
        call: HookCall,
    ) -> HookContext {
        let HookCall {
            action,
            role,
            epoch,
        } = call;
        let primary = primary_node(&svc.spec, cluster.members.iter().map(String::as_str))
            .unwrap_or_default()
            .to_owned();
        let is_primary = primary == self.name;
        HookContext {
            action,
            role,
            transition: hooks::transition(action, role, is_primary),
            service: svc.key.clone(),
            cluster: cluster.name.clone(),
            node: self.name.clone(),
            primary_node: primary,
            peers: cluster
                .members
                .iter()
                .filter(|m| **m != self.name)
                .cloned()
                .collect(),
            vips: svc.spec.vips.iter().map(|v| v.address.clone()).collect(),
            interface: svc
                .spec
                .vips
                .first()
                .and_then(|v| v.interface.clone())
                .unwrap_or_default(),
            epoch,
            config_checksum: svc.checksum.clone(),
            params: hooks::params_of(&svc.spec),
            run_as_user: hooks::run_as_user_of(&svc.spec),
        }
    }

    /// Runs `action`'s hooks within the action's timeout
    /// ([`Self::timeout_for`]).
    pub(super) async fn run_hooks(
        &self,
        svc: &TransitionService,
        cluster: &TransitionCluster,
        call: HookCall,
    ) -> Vec<HookResult> {
        let timeout = Self::timeout_for(svc, call.action);
        self.run_hooks_within(svc, cluster, call, timeout).await
    }

    /// Runs `action`'s hooks within `timeout`.
    pub(super) async fn run_hooks_within(
        &self,
        svc: &TransitionService,
        cluster: &TransitionCluster,
        call: HookCall,
        timeout: Duration,
    ) -> Vec<HookResult> {
        let Some(set) = self.hook_set(svc) else {
            return Vec::new();
        };
        let ctx = self.context(svc, cluster, call);
        let results = self.runner.run(&set, &ctx, timeout).await;
        for r in &results {
            self.metrics.hook_run(
                call.action.as_str(),
                &format!("{:?}", r.outcome),
                r.duration_ms as f64 / 1000.0,
            );
        }
        results
    }

    /// Runs one action's hooks by hand (`kubeha-agent hooks run`), with the
    /// daemon's context and timeouts.
    pub async fn run_hooks_by_hand(
        &self,
        svc: &TransitionService,
        cluster: &TransitionCluster,
        call: HookCall,
    ) -> crate::Result<Vec<HookResult>> {
        if self.hook_set(svc).is_none() {
            return Err(crate::Error::NoHooks(svc.key.clone()));
        }
        Ok(self.run_hooks(svc, cluster, call).await)
    }

    /// How long `action`'s scripts may run: the monitor's and the periodic
    /// check's own timeouts, else the hooks' (60 s when unset); at least 1 s.
    pub(super) fn timeout_for(svc: &TransitionService, action: Action) -> Duration {
        let hooks = svc.spec.hooks.as_ref();
        let seconds = match action {
            Action::Monitor => hooks
                .and_then(|h| h.monitor.as_ref())
                .map(|m| m.timeout_seconds),
            Action::Periodic => hooks
                .and_then(|h| h.periodic.as_ref())
                .map(|p| p.timeout_seconds),
            Action::Enter | Action::Leave => None,
        }
        .or(hooks.map(|h| h.timeout_seconds))
        .unwrap_or(60);
        Duration::from_secs(seconds.max(1) as u64)
    }

    /// Runs the monitor scripts once; `Some(true)` when the service runs.
    pub async fn monitor(
        &self,
        record: &mut ServiceRecord,
        svc: &TransitionService,
        cluster: &TransitionCluster,
    ) -> Option<bool> {
        svc.spec.hooks.as_ref()?.monitor.as_ref()?;
        let results = self
            .run_hooks(
                svc,
                cluster,
                HookCall::new(Action::Monitor, Role::Master, record.epoch),
            )
            .await;
        if results.is_empty() {
            return None;
        }
        let ok = hooks::overall(&results) == HookOutcome::Success;
        record.last_hooks = results;
        Some(ok)
    }

    /// Runs the periodic scripts once with the node's current role.
    pub async fn periodic(
        &self,
        record: &mut ServiceRecord,
        svc: &TransitionService,
        cluster: &TransitionCluster,
    ) {
        if svc
            .spec
            .hooks
            .as_ref()
            .and_then(|h| h.periodic.as_ref())
            .is_none()
        {
            return;
        }
        let results = self
            .run_hooks(
                svc,
                cluster,
                HookCall::new(Action::Periodic, record.role, record.epoch),
            )
            .await;
        if !results.is_empty() {
            record.last_hooks = results;
        }
    }
}
