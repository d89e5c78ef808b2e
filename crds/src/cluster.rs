//! `HACluster`: the admin-owned object that names the member nodes, their
//! administrative modes, heartbeat timing and the addresses services may claim.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::mode::Mode;

/// Desired state of an HA cluster: which nodes take part, in what order and
/// mode, how fast they heartbeat, and what its services are allowed to claim.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubeha.io",
    version = "v1alpha1",
    kind = "HACluster",
    doc = "An HA cluster: member nodes with their modes, heartbeat timing and the VIP ranges its services may claim.",
    plural = "haclusters",
    singular = "hacluster",
    shortname = "hac",
    category = "kubeha",
    status = "HAClusterStatus",
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name: an HACluster name must be a DNS label (lowercase letters, digits and '-', at most 63 characters, no dots), because it is the value of the kubeha.io/cluster label and part of the heartbeat Lease names; pick a name such as nfs-cluster"),
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready","description":"Members whose heartbeat is Alive / all members"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state","description":"Cluster state: the members' modes in member order, e.g. default-locked"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","jsonPath":".status.servicesActive","description":"Services of this cluster that are Active"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": CONFIG_TO_DEFAULT_RULE,
        "message": "spec.members.nodes: a member goes from mode config back to default only with the cluster stopped (StorNext: the services stop first); run kubectl ha stop --cluster NAME, which sets spec.stopped and every member back to default in one write, then kubectl ha start"
    }
]))]
pub struct HAClusterSpec {
    /// The member nodes: an ordered list (`nodes`), a label selector
    /// (`selector`), or both (the list then orders and sets modes for
    /// selected nodes).
    pub members: Members,

    /// How the active node is chosen among eligible members when a service
    /// names no preferred node. `Alphabetical`: the alphabetically first
    /// eligible node. `Ordered`: the first eligible node in `members.nodes`
    /// (the first is the primary, the second the backup).
    #[serde(default)]
    pub placement: Placement,

    /// Heartbeat and lease timing shared by every member.
    #[serde(default)]
    pub heartbeat: HeartbeatTiming,

    /// Seconds to wait, after the operator starts or the cluster is created,
    /// before a service that has never been active is placed anywhere but on
    /// its preferred node, unless that node heartbeats first.
    #[serde(default = "default_startup_grace_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub startup_grace_seconds: i32,

    /// CIDRs (IPv4 or IPv6) that the virtual IPs of this cluster's services
    /// must fall inside, e.g. `198.18.0.96/28`. A VIP outside every range is
    /// refused. Each range has a prefix of at least /8 (IPv4) or /16 (IPv6)
    /// and is not loopback, link-local, multicast or unspecified; a VIP's
    /// prefix may not be shorter than that of the range holding it.
    #[schemars(length(min = 1, max = 64), extend("items" = {"type": "string", "format": "cidr", "maxLength": 64, "x-kubernetes-validations": crate::cidr::pool_range_rules()}))]
    pub vip_pool: Vec<String>,

    /// Namespaces whose HAServices may bind to this cluster. `*` allows every
    /// namespace. Empty: no HAService may bind.
    #[serde(default)]
    #[schemars(length(max = 256), extend("items" = {"type": "string", "maxLength": 63, "pattern": "^(\\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$"}))]
    pub allowed_namespaces: Vec<String>,

    /// Which hook directories (under `/etc/kubeha/hooks`) and ConfigMaps
    /// each namespace's services may take hook scripts from. Hooks run as
    /// root on the member nodes, so the cluster admin decides; the default
    /// grants nothing.
    #[serde(default)]
    pub allowed_hook_sources: AllowedHookSources,

    /// Default failback policy for services of this cluster; a service may
    /// override it.
    #[serde(default)]
    pub failback: Failback,

    /// What a node does to itself when it loses the API server.
    #[serde(default)]
    pub fence: Fence,

    /// The whole cluster is stopped on purpose (`kubectl ha stop`; StorNext's
    /// `snhamgr stop`): the operator places no service of this cluster on
    /// any node, every node leaves what it holds through the ordinary
    /// handover (leave hooks, VIPs removed, each leave acknowledged with its
    /// epoch), nothing fails over and nothing is fenced; services show phase
    /// `Suspended`. Members keep heartbeating; the field changes no mode
    /// (`kubectl ha stop` also sets every member but peerdown ones back to
    /// `default`). `kubectl ha start` removes it and placement runs again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
}

/// CEL transition rule on `spec`: a listed member that was in mode
/// `config` may be written back to `default` only in a write that leaves
/// the cluster stopped (`spec.stopped`), as `kubectl ha stop` and the
/// operator's repair of a prohibited state do. An update only: on create
/// `oldSelf` does not exist.
pub const CONFIG_TO_DEFAULT_RULE: &str = "!has(self.members.nodes) || !has(oldSelf.members.nodes) || (has(self.stopped) && self.stopped) || self.members.nodes.all(n, n.mode != 'default' || !oldSelf.members.nodes.exists(o, o.name == n.name && o.mode == 'config'))";

/// The member nodes of a cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.nodes) && size(self.nodes) > 0) || has(self.selector)",
        "message": "spec.members: no member nodes; list them in spec.members.nodes or set spec.members.selector"
    },
    {
        "rule": "!has(self.nodes) || self.nodes.filter(n, n.mode == 'single' || n.mode == 'config').size() <= 1",
        "message": "spec.members.nodes: at most one member may be in mode single or config; set the others to locked or peerdown"
    },
    {
        "rule": "!has(self.nodes) || !self.nodes.exists(n, n.mode == 'single' || n.mode == 'config') || self.nodes.all(n, n.mode != 'default')",
        "message": "spec.members.nodes: while a member is in mode single or config every other member must be locked or peerdown; change the default members to locked or peerdown"
    },
    {
        "rule": "!has(self.nodes) || size(self.nodes) == 0 || !self.nodes.all(n, n.mode == 'peerdown')",
        "message": "spec.members.nodes: every member is peerdown, so nothing could run; keep at least one member in default, single, config or locked"
    }
]))]
pub struct Members {
    /// Member nodes in order. With placement `Ordered` the first is the
    /// primary node and the second the backup. Each name appears once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub nodes: Vec<MemberNode>,

    /// Nodes whose labels match this selector are members too (after the
    /// listed ones, in alphabetical order, mode `default` unless listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// One member node and its administrative mode.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberNode {
    /// Name of the Kubernetes Node, at most 63 characters: it is the value
    /// of the `kubeha.io/node` label.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,

    /// Administrative mode, kept here so it survives reboots. `default`:
    /// monitored, runs services. `single`: runs services without redundancy,
    /// monitoring off (others must be locked or peerdown). `config`:
    /// reconfiguration, monitoring off (others must be locked or peerdown).
    /// `locked`: services stopped and kept off, the agent still heartbeats.
    /// `peerdown`: an admin certifies the node is powered off; it counts as
    /// fenced at once.
    #[serde(default)]
    pub mode: Mode,
}

/// How the active node is chosen.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Placement {
    /// The alphabetically first eligible node runs the service.
    #[default]
    Alphabetical,
    /// The first eligible node in `spec.members.nodes` runs the service.
    Ordered,
}

/// Heartbeat and lease timing. D = `leaseDurationMs`, R = `renewIntervalMs`,
/// RD = `renewDeadlineMs`; R + 100 ms <= RD < D.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.renewIntervalMs + 100 <= self.renewDeadlineMs",
        "message": "spec.heartbeat.renewIntervalMs must stay at least 100 ms below spec.heartbeat.renewDeadlineMs (R + 100 <= RD), the time one renew may take before the agent fences itself; lower renewIntervalMs or raise renewDeadlineMs"
    },
    {
        "rule": "self.renewDeadlineMs < self.leaseDurationMs",
        "message": "spec.heartbeat.renewDeadlineMs must be less than spec.heartbeat.leaseDurationMs (RD < D); lower renewDeadlineMs or raise leaseDurationMs"
    },
    {
        "rule": "!has(self.vipLifetimeSeconds) || self.vipLifetimeSeconds * 1000 < self.leaseDurationMs + self.clockSkewMs",
        "message": "spec.heartbeat.vipLifetimeSeconds must stay below leaseDurationMs + clockSkewMs so a VIP cannot outlive the lease; lower it or leave it unset"
    },
    {
        "rule": crate::timing::ENTRY_RULE,
        "message": crate::timing::ENTRY_RULE_MESSAGE
    }
]))]
pub struct HeartbeatTiming {
    /// Lease duration D in milliseconds: a member whose heartbeat has not
    /// been seen to change for D plus the skew allowance is Lost.
    #[serde(default = "default_lease_duration_ms")]
    #[schemars(range(min = 500, max = 300000))]
    pub lease_duration_ms: i32,

    /// Renew interval R in milliseconds: how often an agent renews its
    /// heartbeat Lease.
    #[serde(default = "default_renew_interval_ms")]
    #[schemars(range(min = 100, max = 60000))]
    pub renew_interval_ms: i32,

    /// Renew deadline RD in milliseconds: an agent that has not renewed for
    /// RD drops its VIPs and fences itself.
    #[serde(default = "default_renew_deadline_ms")]
    #[schemars(range(min = 200, max = 300000))]
    pub renew_deadline_ms: i32,

    /// Clock-skew and scheduling allowance in milliseconds added to D before
    /// an observer declares a heartbeat Lost. Observers judge expiry by
    /// their own monotonic clock from the instant they saw a renew, and an
    /// agent counts its fences from the instant it sent it, so this covers
    /// scheduling delays (the fence action killing the hooks' process
    /// groups after D), not clock offsets; the default, 100 ms, is what
    /// the tight timings use too. Raise it for nodes whose agent may be
    /// descheduled longer than that.
    #[serde(default = "default_clock_skew_ms")]
    #[schemars(range(min = 0, max = 10000))]
    pub clock_skew_ms: i32,

    /// Longest time in whole seconds a VIP is held after a renew, extended on
    /// every successful renew: it caps both the packet fence (an nftables
    /// timeout, to the millisecond) and the address lifetime (`valid_lft`).
    /// Unset: D plus the skew allowance, less the fences' margins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 300))]
    pub vip_lifetime_seconds: Option<i32>,
}

impl HeartbeatTiming {
    /// Whether an agent that renews on time can enter and keep its VIPs
    /// under this timing ([`crate::timing`]; the CEL rule says the same).
    pub fn lets_agents_enter(&self) -> bool {
        crate::timing::lets_agents_enter(
            self.lease_duration_ms.into(),
            self.renew_interval_ms.into(),
            self.clock_skew_ms.into(),
            self.vip_lifetime_seconds.map(i64::from),
        )
    }
}

impl Default for HeartbeatTiming {
    fn default() -> Self {
        Self {
            lease_duration_ms: default_lease_duration_ms(),
            renew_interval_ms: default_renew_interval_ms(),
            renew_deadline_ms: default_renew_deadline_ms(),
            clock_skew_ms: default_clock_skew_ms(),
            vip_lifetime_seconds: None,
        }
    }
}

/// Which hook sources services may use, per namespace: hooks run as root on
/// every member, so the cluster admin grants each hook directory and
/// ConfigMap to the namespaces that own it ([`crate::hook_policy`]). The
/// default grants nothing: a service with hooks is refused until its
/// namespace is given its source.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedHookSources {
    /// One entry per namespace (or `*` for every allowed namespace): the
    /// directories under the hook root (`hostPaths`) and the ConfigMaps
    /// (`configMaps` of the operator's namespace, `ownConfigMaps` of its
    /// own) its HAServices may take scripts from, e.g.
    /// `{namespace: team-a, hostPaths: [team-a], ownConfigMaps: [hooks]}`.
    /// A namespace gets the union of its entries and the `*` entries; a
    /// namespace no entry names gets no hooks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub namespaces: Vec<crate::hook_policy::NamespaceHookSources>,
}

/// Failback: what happens when a better node returns.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failback {
    /// `Never`: the service stays where it runs. `Automatic`: it moves back to
    /// the better node after `delaySeconds`.
    #[serde(default)]
    pub policy: FailbackPolicy,

    /// With `Automatic`, seconds the better node must stay eligible before the
    /// service moves back.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub delay_seconds: i32,
}

/// Failback policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailbackPolicy {
    /// Keep the service where it runs.
    #[default]
    Never,
    /// Move it back to the better node after the delay.
    Automatic,
}

/// Fencing: what a node does to itself when it loses the API server.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.action != 'ResetHook' || has(self.resetHook)",
        "message": "spec.fence.resetHook is required when spec.fence.action is ResetHook; name the script to run"
    }
]))]
pub struct Fence {
    /// `KillHooks`: kill the process groups of the running hooks. `ResetHook`:
    /// that, then run `resetHook` (e.g. to reboot the node).
    #[serde(default)]
    pub action: FenceAction,

    /// Absolute path of the reset script on the node, for action `ResetHook`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/[^\x00]*$"))]
    pub reset_hook: Option<String>,

    /// When the API server is unreachable. `Stop` (safe default): fence, stop
    /// services everywhere. `Freeze`: keep current roles; accepts the risk of
    /// split brain if the partition isolates nodes from each other too.
    #[serde(default)]
    pub no_quorum_policy: NoQuorumPolicy,
}

/// Fence action.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FenceAction {
    /// Kill the hooks' process groups.
    #[default]
    KillHooks,
    /// Kill the hooks' process groups, then run the reset hook.
    ResetHook,
}

/// What to do when the API server cannot be reached.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NoQuorumPolicy {
    /// Fence: drop VIPs and stop services.
    #[default]
    Stop,
    /// Keep current roles (split-brain risk).
    Freeze,
}

/// Observed state of an HA cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HAClusterStatus {
    /// Members whose heartbeat is Alive over all members, e.g. `2/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// The cluster state string: members' modes in member order joined by
    /// `-`, e.g. `default-locked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,

    /// How many services of this cluster are Active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_active: Option<i32>,

    /// One entry per member node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub members: Vec<MemberStatus>,

    /// Ready, Degraded, Reconciling, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Observed state of one member.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Node name.
    pub node: String,
    /// Heartbeat as judged by the operator's clock.
    pub heartbeat: HeartbeatState,
    /// The mode in force.
    pub mode: Mode,
    /// This node's role per service (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<ServiceRole>,
}

/// Heartbeat state of a member.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HeartbeatState {
    /// Renewed within D plus the skew allowance.
    Alive,
    /// The agent announced that it is stopping.
    Stopping,
    /// Not renewed within D plus the skew allowance.
    Lost,
    /// Lost and certainly fenced (its lease expired, or an admin set peerdown).
    Fenced,
}

/// A node's role for one service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRole {
    /// The service, as `namespace/name`.
    pub service: String,
    /// The node's role for it.
    pub role: crate::service::Role,
}

fn default_startup_grace_seconds() -> i32 {
    30
}
fn default_lease_duration_ms() -> i32 {
    3000
}
fn default_renew_interval_ms() -> i32 {
    1000
}
fn default_renew_deadline_ms() -> i32 {
    2000
}
fn default_clock_skew_ms() -> i32 {
    100
}
