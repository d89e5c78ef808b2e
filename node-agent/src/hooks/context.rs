//! What a hook is told: the `KUBEHA_*` environment of one transition.

use kubeha_crds::service::{HAServiceSpec, HookEnvVar, Role};

use super::{Action, HOOK_PATH, Transition};

/// What a hook run is about; becomes the script's `KUBEHA_*` environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookContext {
    /// The action (picks the scripts in [`HookRunner::run`]).
    pub action: Action,
    /// The role entered, left or held (the script's second argument).
    pub role: Role,
    /// The transition (`KUBEHA_TRANSITION`, empty when none).
    pub transition: Option<Transition>,
    /// The service, `namespace/name` (`KUBEHA_SERVICE`).
    pub service: String,
    /// The HACluster (`KUBEHA_CLUSTER`).
    pub cluster: String,
    /// This node (`KUBEHA_NODE`).
    pub node: String,
    /// The service's primary node (`KUBEHA_PRIMARY_NODE`).
    pub primary_node: String,
    /// The other members (`KUBEHA_PEERS`, comma-separated).
    pub peers: Vec<String>,
    /// The service's virtual IPs (`KUBEHA_VIPS`, comma-separated).
    pub vips: Vec<String>,
    /// The interface the VIPs go on (`KUBEHA_INTERFACE`).
    pub interface: String,
    /// The epoch acted on (`KUBEHA_EPOCH`).
    pub epoch: i64,
    /// Hash of the spec acted on (`KUBEHA_CONFIG_CHECKSUM`).
    pub config_checksum: String,
    /// The service's parameters (`spec.hooks.env`), passed as they are
    /// ([`params_of`]).
    pub params: Vec<HookEnvVar>,
    /// The user the scripts run as (`spec.hooks.runAsUser`,
    /// [`run_as_user_of`]); `None`: root.
    pub run_as_user: Option<i64>,
}

/// The user `spec` asks its hooks to run as (`spec.hooks.runAsUser`), if
/// any.
pub fn run_as_user_of(spec: &HAServiceSpec) -> Option<i64> {
    spec.hooks.as_ref().and_then(|h| h.run_as_user)
}

/// The service parameters of `spec` (`spec.hooks.env`) for a
/// [`HookContext`]: none without hooks.
pub fn params_of(spec: &HAServiceSpec) -> Vec<HookEnvVar> {
    spec.hooks
        .as_ref()
        .map(|h| h.env.clone())
        .unwrap_or_default()
}

impl HookContext {
    /// The whole environment a script gets: the service's parameters,
    /// then `PATH` and the `KUBEHA_*` variables (set last, so they win even
    /// over a parameter the API server and [`kubeha_crds::validate`] should
    /// have refused), nothing else.
    pub fn env(&self) -> Vec<(String, String)> {
        let params = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()));
        let ours = [
            ("PATH", HOOK_PATH.to_owned()),
            (
                "KUBEHA_TRANSITION",
                self.transition
                    .map(|t| t.as_str().to_owned())
                    .unwrap_or_default(),
            ),
            ("KUBEHA_SERVICE", self.service.clone()),
            ("KUBEHA_CLUSTER", self.cluster.clone()),
            ("KUBEHA_NODE", self.node.clone()),
            ("KUBEHA_PRIMARY_NODE", self.primary_node.clone()),
            ("KUBEHA_PEERS", self.peers.join(",")),
            ("KUBEHA_VIPS", self.vips.join(",")),
            ("KUBEHA_INTERFACE", self.interface.clone()),
            ("KUBEHA_EPOCH", self.epoch.to_string()),
            ("KUBEHA_CONFIG_CHECKSUM", self.config_checksum.clone()),
        ];
        params
            .chain(ours.into_iter().map(|(k, v)| (k.to_owned(), v)))
            .collect()
    }
}
