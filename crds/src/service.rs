//! `HAService`: the application team's object — virtual IPs, hook scripts and
//! failover policy for one active/standby service.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::Failback;

/// Desired state of one active/standby service: its virtual IPs, the hook
/// scripts that start and stop it, and its failover policy.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubeha.io",
    version = "v1alpha1",
    kind = "HAService",
    doc = "An active/standby service: virtual IPs, hook scripts and failover policy, run on the nodes of one HACluster.",
    plural = "haservices",
    singular = "haservice",
    shortname = "hasvc",
    category = "kubeha",
    namespaced,
    status = "HAServiceStatus",
    validation = kube::core::Rule::new("size(self.metadata.name) <= 63").message("metadata.name: an HAService name may be at most 63 characters, because it is the value of the kubeha.io/service label; pick a shorter name"),
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.clusterRef"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.activeNode","description":"Node in the master role"}"#,
    printcolumn = r#"{"name":"Standby","type":"string","jsonPath":".status.standbyNode","description":"Node in the vicemaster role"}"#,
    printcolumn = r#"{"name":"VIPs","type":"string","jsonPath":".status.vips","description":"The VIPs, comma-separated"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct HAServiceSpec {
    /// Name of the HACluster this service runs on. Immutable: to move a
    /// service to another cluster, delete it and create it again.
    #[schemars(length(min = 1, max = 253), extend("x-kubernetes-validations" = [
        {
            "rule": "self == oldSelf",
            "message": "spec.clusterRef is immutable; delete the HAService and create it again to bind it to another cluster"
        }
    ]))]
    pub cluster_ref: String,

    /// Virtual IPs that follow the active node. Each address is given with
    /// its prefix length (`198.18.0.100/24`, `2001:db8::100/64`); the prefix
    /// picks the interface when none is named.
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address"]))]
    pub vips: Vec<Vip>,

    /// Default route to install on the active node while it holds the VIPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_route: Option<DefaultRoute>,

    /// Hook scripts that start, stop and monitor the service. Without hooks
    /// the service is the VIPs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,

    /// Nodes to prefer, best first, before the cluster's placement order.
    /// At most 63 characters each, like member names (a node name is the
    /// value of the `kubeha.io/node` label).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {"type": "string", "maxLength": 63}))]
    pub preferred_nodes: Vec<String>,

    /// Overrides the cluster's failback policy for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<Failback>,

    /// Failures (failed enter or monitor) on one node after which that node
    /// is ineligible for this service until `failureTimeoutSeconds` passes or
    /// an admin clears it.
    #[serde(default = "default_migration_threshold")]
    #[schemars(range(min = 1, max = 1000000))]
    pub migration_threshold: i32,

    /// Seconds after the last failure at which a node's fail count for this
    /// service expires. 0: never; only an admin's clear resets it.
    #[serde(default)]
    #[schemars(range(min = 0, max = 31536000))]
    pub failure_timeout_seconds: i32,

    /// Gratuitous ARP / unsolicited neighbour advertisements sent when the
    /// VIPs arrive on a node.
    #[serde(default)]
    pub garp: Garp,
}

/// One virtual IP.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Vip {
    /// The address with its prefix length, IPv4 or IPv6, in CIDR notation:
    /// `198.18.0.100/24`. Not loopback, link-local (the metadata address
    /// included), multicast, broadcast or unspecified; a prefix of at least
    /// /8 (IPv4) or /16 (IPv6); for IPv4 up to /30 neither the network nor
    /// the broadcast address of that prefix.
    #[schemars(length(min = 1, max = 64), extend("format" = "cidr", "x-kubernetes-validations" = crate::cidr::vip_address_rules()))]
    pub address: String,

    /// Interface to add the VIP to. Unset: the interface whose subnet holds
    /// the VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[A-Za-z0-9_.:@-]+$"))]
    pub interface: Option<String>,
}

/// A default route installed while the node is active.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultRoute {
    /// Gateway address (IPv4 or IPv6): a unicast router address, not
    /// unspecified, loopback, multicast or broadcast.
    #[schemars(length(min = 2, max = 64), extend("x-kubernetes-validations" = crate::cidr::gateway_rules()))]
    pub gateway: String,
}

/// Hook scripts and how they are run.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    /// Where the scripts come from.
    pub source: HookSource,

    /// Single-script style: the one script (a file in the source) called with
    /// the action as its first argument. Unset: the source is a directory of
    /// `E<nn>name` (enter), `L<nn>name` (leave), `M<nn>name` (monitor) and
    /// `P<nn>name` (periodic) scripts run in lexical order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub script: Option<String>,

    /// Seconds each enter or leave script may run before it gets SIGTERM,
    /// then SIGKILL to its whole process group, and counts as failed.
    #[serde(default = "default_hook_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,

    /// Monitor scripts, run on the active node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<Monitor>,

    /// Periodic scripts, run on every member with its current role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub periodic: Option<Periodic>,

    /// Service parameters every script gets as environment variables, next
    /// to `PATH` and the `KUBEHA_*` variables (IRIS passes its scripts the
    /// service's parameters the same way). At most 32; each name once.
    /// Values are data: scripts run as root, so quote them (`"$DB_PORT"`)
    /// and never `eval` them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub env: Vec<HookEnvVar>,

    /// Run every script of the service as this user id instead of root:
    /// with the user's primary group from the node's user database
    /// (group 65534, nogroup, when the node has no such user), no supplementary
    /// groups, and `HOME` the user's home directory (`/` when it has
    /// none). The HACluster must allow the id for the service's namespace
    /// (`spec.allowedHookSources.namespaces[].runAsUsers`); otherwise the
    /// agent runs nothing and says so in the node's status entry. The
    /// scripts must then be readable and executable by that user
    /// (`chmod o+rx`), and the files they write theirs to write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub run_as_user: Option<i64>,
}

/// Most `spec.hooks.env` entries.
pub const MAX_HOOK_ENV: usize = 32;
/// Longest `spec.hooks.env[].name`, in bytes.
pub const MAX_HOOK_ENV_NAME_BYTES: usize = 128;
/// Longest `spec.hooks.env[].value`, in bytes.
pub const MAX_HOOK_ENV_VALUE_BYTES: usize = 4096;

/// Name prefixes no `spec.hooks.env` entry may start with: the agent's own
/// variables, and those that make the dynamic loader, the C library or the
/// shell of a root script load or run code of the writer's choosing.
pub const RESERVED_HOOK_ENV_PREFIXES: [&str; 6] =
    ["KUBEHA_", "LD_", "DYLD_", "GLIBC_", "MALLOC_", "BASH_"];

/// Names no `spec.hooks.env` entry may have: `PATH` (the agent sets it) and
/// the variables that make a shell, the C library or a script interpreter
/// read files or run code of the writer's choosing as root.
pub const RESERVED_HOOK_ENV_NAMES: [&str; 33] = [
    "PATH",
    "IFS",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "CDPATH",
    "GLOBIGNORE",
    "GCONV_PATH",
    "GETCONF_DIR",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TMPDIR",
    "TZDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "NODE_PATH",
    "LUA_INIT",
    "LUA_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
];

/// One service parameter passed to every hook script as an environment
/// variable.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookEnvVar {
    /// The variable's name: a letter or `_`, then letters, digits or `_`;
    /// not `PATH`, not starting with `KUBEHA_` (the agent's own), `LD_`,
    /// `DYLD_`, `GLIBC_`, `MALLOC_` or `BASH_`, nor another variable that
    /// makes the loader, a shell or an interpreter of a root script load
    /// code (`IFS`, `ENV`, `PYTHONPATH`, `NODE_OPTIONS`, ...).
    #[schemars(length(min = 1, max = 128), extend("x-kubernetes-validations" = hook_env_name_rules()))]
    pub name: String,

    /// The variable's value, at most 4096 bytes, no NUL character.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// Why `name` may not be a `spec.hooks.env` name, with the fix; `None` when
/// it may. The Rust twin of [`hook_env_name_rules`], so the agent refuses
/// what an API server without the rules stored.
pub fn hook_env_name_problem(name: &str) -> Option<String> {
    let field = "spec.hooks.env[].name";
    let mut chars = name.chars();
    let well_formed = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if name.len() > MAX_HOOK_ENV_NAME_BYTES {
        return Some(format!(
            "{field}: {} bytes, at most {MAX_HOOK_ENV_NAME_BYTES}; pick a shorter name",
            name.len()
        ));
    }
    if !well_formed {
        return Some(format!(
            "{field}: {name:?} is no variable name; {HOOK_ENV_NAME_FIX}"
        ));
    }
    if name.starts_with("KUBEHA_") {
        return Some(format!("{field}: {name}: {HOOK_ENV_KUBEHA_FIX}"));
    }
    if RESERVED_HOOK_ENV_PREFIXES
        .iter()
        .any(|p| name.starts_with(p))
        || RESERVED_HOOK_ENV_NAMES.contains(&name)
    {
        return Some(format!("{field}: {name}: {HOOK_ENV_RESERVED_FIX}"));
    }
    None
}

const HOOK_ENV_NAME_FIX: &str =
    "a name is a letter or '_' followed by letters, digits or '_'; write e.g. DB_PORT";
const HOOK_ENV_KUBEHA_FIX: &str = "names starting with KUBEHA_ are the agent's own (KUBEHA_NODE, KUBEHA_EPOCH, ...); pick another name, e.g. APP_NODE";
const HOOK_ENV_RESERVED_FIX: &str = "PATH and the variables that make the loader, the shell or an interpreter of a root script load code (LD_*, BASH_*, IFS, ENV, PYTHONPATH, ...) may not be set; pick a name of your own, e.g. APP_CONFIG";

/// The CEL rules of `spec.hooks.env[].name` ([`hook_env_name_problem`] in
/// Rust).
pub fn hook_env_name_rules() -> serde_json::Value {
    let field = "spec.hooks.env[].name";
    let quoted = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let reserved_prefixes: Vec<&str> = RESERVED_HOOK_ENV_PREFIXES
        .iter()
        .copied()
        .filter(|p| *p != "KUBEHA_")
        .collect();
    serde_json::json!([
        {
            "rule": "self.matches('^[A-Za-z_][A-Za-z0-9_]*$')",
            "message": format!("{field}: {HOOK_ENV_NAME_FIX}"),
        },
        {
            "rule": "!self.startsWith('KUBEHA_')",
            "message": format!("{field}: {HOOK_ENV_KUBEHA_FIX}"),
        },
        {
            "rule": format!(
                "![{}].exists(p, self.startsWith(p)) && !(self in [{}])",
                quoted(&reserved_prefixes),
                quoted(&RESERVED_HOOK_ENV_NAMES)
            ),
            "message": format!("{field}: {HOOK_ENV_RESERVED_FIX}"),
        },
    ])
}

/// Why `spec.hooks.env` may not be used, one sentence per problem naming
/// the field and the fix: too many entries, a bad or reserved name
/// ([`hook_env_name_problem`]), a name given twice, a value too long or
/// holding a NUL character. Empty when every entry may be passed.
pub fn hook_env_problems(env: &[HookEnvVar]) -> Vec<String> {
    let mut problems = Vec::new();
    if env.len() > MAX_HOOK_ENV {
        problems.push(format!(
            "spec.hooks.env: {} entries, at most {MAX_HOOK_ENV}; pass fewer parameters (a script may read a file of its own for more)",
            env.len()
        ));
    }
    for (i, var) in env.iter().enumerate() {
        if let Some(p) = hook_env_name_problem(&var.name) {
            problems.push(p);
        }
        if env[..i].iter().any(|v| v.name == var.name) {
            problems.push(format!(
                "spec.hooks.env[].name: {} is given twice; keep one entry",
                var.name
            ));
        }
        if var.value.len() > MAX_HOOK_ENV_VALUE_BYTES {
            problems.push(format!(
                "spec.hooks.env[{}].value: {} bytes, at most {MAX_HOOK_ENV_VALUE_BYTES}; put longer data in a file the script reads",
                var.name,
                var.value.len()
            ));
        }
        if var.value.contains('\0') {
            problems.push(format!(
                "spec.hooks.env[{}].value: holds a NUL character, which no environment variable can carry; remove it",
                var.name
            ));
        }
    }
    problems
}

/// Where hook scripts come from. Set exactly one field.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.hostPath) != has(self.configMap)",
        "message": "spec.hooks.source: set exactly one of hostPath or configMap"
    }
]))]
pub struct HookSource {
    /// A directory relative to the agent's hook root (`/etc/kubeha/hooks`) on
    /// every member node, e.g. `nfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), extend("x-kubernetes-validations" = [
        {
            "rule": "!self.startsWith('/') && !self.contains('..')",
            "message": "spec.hooks.source.hostPath must be relative to the hook root /etc/kubeha/hooks and must not contain '..'; write e.g. nfs"
        }
    ]))]
    pub host_path: Option<String>,

    /// Name of a ConfigMap whose keys are the scripts (in the operator's
    /// namespace, or the service's own if the cluster allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub config_map: Option<String>,
}

/// Monitoring of the running service on the active node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Monitor {
    /// Seconds between two monitor runs.
    #[serde(default = "default_monitor_interval_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub interval_seconds: i32,

    /// Seconds one monitor run may take before it counts as failed.
    #[serde(default = "default_monitor_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,

    /// Consecutive failed runs after which the service fails on that node.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: i32,
}

/// Periodic scripts run on every member with its current role.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Periodic {
    /// Seconds between two runs.
    #[serde(default = "default_periodic_interval_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub interval_seconds: i32,

    /// Seconds one run may take.
    #[serde(default = "default_monitor_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,
}

/// Gratuitous ARP and unsolicited neighbour advertisement settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Garp {
    /// Packets per VIP and form in one burst.
    #[serde(default = "default_garp_count")]
    #[schemars(range(min = 1, max = 100))]
    pub count: i32,

    /// Milliseconds between two packets of a burst.
    #[serde(default = "default_garp_interval_ms")]
    #[schemars(range(min = 10, max = 10000))]
    pub interval_ms: i32,

    /// Seconds between refresh bursts while active. 0: no refresh.
    #[serde(default)]
    #[schemars(range(min = 0, max = 86400))]
    pub refresh_seconds: i32,
}

impl Default for Garp {
    fn default() -> Self {
        Self {
            count: default_garp_count(),
            interval_ms: default_garp_interval_ms(),
            refresh_seconds: 0,
        }
    }
}

/// Observed state of a service.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HAServiceStatus {
    /// Pending, Starting, Active, Stopping, Errored or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Node in the master role (active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_node: Option<String>,

    /// Node in the vicemaster role (designated standby).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_node: Option<String>,

    /// The current assignment's epoch (fencing token); equals the service
    /// Lease's leaseTransitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,

    /// The VIPs of the spec, comma-separated, for `kubectl get` (a printer
    /// column shows only the first match of a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vips: Option<String>,

    /// One entry per member node, written by that node's agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<ServiceNodeStatus>,

    /// Ready, Degraded, Reconciling, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Service phase.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Not placed yet.
    Pending,
    /// The active node is entering the master role.
    Starting,
    /// Running on the active node.
    Active,
    /// Being given away.
    Stopping,
    /// No eligible node left; stopped until an admin clears it.
    Errored,
    /// Stopped on purpose (locked members, cluster stopped).
    Suspended,
}

/// A node's role for a service.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Active: holds the VIPs and runs the service.
    Master,
    /// Designated standby.
    Vicemaster,
    /// Neither.
    #[default]
    None,
}

/// One node's view of a service, written by that node's agent.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceNodeStatus {
    /// Node name.
    pub node: String,
    /// The role the node is in now.
    #[serde(default)]
    pub role: Role,
    /// What the node is doing with the service.
    pub state: NodeServiceState,
    /// The epoch the node acts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    /// The last epoch this node has left (given the service away); the next
    /// holder may enter once it sees this acknowledgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_epoch: Option<i64>,
    /// Failures counted against this node for this service.
    #[serde(default)]
    pub fail_count: i32,
    /// When the last failure happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// An epoch of the master role this node may not have left cleanly
    /// (its leave failed, or a fence cut it short): the node enters nothing
    /// of this service until a leave succeeds there or an admin clears it
    /// (`kubectl ha clear`), so the service is not placed there meanwhile,
    /// whatever `failureTimeoutSeconds` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclean_epoch: Option<i64>,
    /// A hook exited 1 (illegal call) or 2 (wrong or changed configuration)
    /// here: no retry on this node. The service is not placed here again
    /// until an admin clears it (`kubectl ha clear`), whatever
    /// `failureTimeoutSeconds` says (that timeout ends only ordinary
    /// failures).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub permanent_failure: bool,
    /// The last hook runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub hooks: Vec<HookResult>,
    /// Why this node takes no role although the service Lease gives it one:
    /// its agent re-checks what the operator checks (the namespace allowed,
    /// the VIPs in the pool and claimed by no older service, the hook
    /// source allowed, the Lease written for this HAService) and refuses a
    /// forged or stale assignment. Unset when it takes the role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub refused: Option<String>,
}

/// What a node is doing with a service.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NodeServiceState {
    /// Not running here.
    Stopped,
    /// Entering the master role.
    Starting,
    /// Running here.
    Running,
    /// Leaving the master role.
    Stopping,
    /// Failed here (enter, monitor or leave failure).
    Failed,
}

/// The result of one hook script run.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookResult {
    /// Script file name.
    pub script: String,
    /// enter, leave, monitor or periodic.
    pub action: String,
    /// Exit code; unset when killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// How the run ended.
    pub outcome: HookOutcome,
    /// Milliseconds the run took.
    pub duration_ms: i64,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The last lines of its output.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub output_tail: Vec<String>,
}

/// How a hook run ended (exit codes of the hook contract).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HookOutcome {
    /// Exit 0 (monitor: running).
    Success,
    /// Exit 1: illegal call; permanent, no retry on this node.
    IllegalCall,
    /// Exit 2: configuration wrong or changed; permanent, no retry here.
    ConfigError,
    /// Monitor exit 7: the service is not running.
    NotRunning,
    /// Exit 3 or any other non-zero code.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Not run: refused (ownership, permissions) or could not start.
    Refused,
}

fn default_migration_threshold() -> i32 {
    1
}
fn default_hook_timeout_seconds() -> i32 {
    60
}
fn default_monitor_interval_seconds() -> i32 {
    10
}
fn default_monitor_timeout_seconds() -> i32 {
    20
}
fn default_periodic_interval_seconds() -> i32 {
    60
}
fn default_failure_threshold() -> i32 {
    3
}
fn default_garp_count() -> i32 {
    3
}
fn default_garp_interval_ms() -> i32 {
    200
}
