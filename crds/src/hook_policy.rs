//! The hook-source policy of an HACluster (`spec.allowedHookSources`): which
//! directories under the hook root and which ConfigMaps each namespace's
//! HAServices may take their hook scripts from. Hooks run as root on every
//! member, so the cluster admin grants each source to the namespaces that
//! own it; a namespace never reaches a directory or ConfigMap nobody gave
//! it.
//!
//! The check is pure and shared: the operator refuses a service whose
//! source is not granted (condition and Event), and the agent checks the
//! same again before it runs any script, so a forged assignment alone does
//! not get a script run.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::AllowedHookSources;
use crate::service::{HookSource, Hooks};

/// What one namespace (or every namespace, `*`) may use as hook sources. A
/// namespace gets the union of the entries naming it and the `*` entries.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceHookSources {
    /// The namespace whose HAServices this entry is for, or `*` for every
    /// namespace that `spec.allowedNamespaces` allows.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$")
    )]
    pub namespace: String,

    /// Directories relative to the hook root (`/etc/kubeha/hooks`) that the
    /// namespace may name in `spec.hooks.source.hostPath`: the directory
    /// itself or any directory beneath it, e.g. `team-a` grants `team-a`
    /// and `team-a/nfs`. `*` grants every directory under the root (only
    /// for a namespace trusted with all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {
        "type": "string",
        "minLength": 1,
        "maxLength": 253,
        "pattern": "^(\\*|[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*)$"
    }))]
    pub host_paths: Vec<String>,

    /// ConfigMaps of the operator's namespace that the namespace may name
    /// in `spec.hooks.source.configMap`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = config_map_name()))]
    pub config_maps: Vec<String>,

    /// ConfigMaps of the service's own namespace that it may name in
    /// `spec.hooks.source.configMap` (in a `*` entry: every allowed
    /// namespace its own ConfigMap of that name). Whoever can write
    /// ConfigMaps in that namespace then runs code as root on the members:
    /// grant them only to a namespace trusted with that. The agents must
    /// be able to read them (the chart's `rbac.configMapsAllNamespaces`, or
    /// a Role in that namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = config_map_name()))]
    pub own_config_maps: Vec<String>,

    /// User ids the namespace's HAServices may run their hooks as
    /// (`spec.hooks.runAsUser`): one id (`1000`) or an inclusive range
    /// (`1000-1999`) per item. Empty: hooks run as root only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("items" = {
        "type": "string",
        "minLength": 1,
        "maxLength": 21,
        "pattern": "^[1-9][0-9]{0,9}(-[1-9][0-9]{0,9})?$"
    }))]
    pub run_as_users: Vec<String>,
}

/// The schema of a ConfigMap name in the policy (a DNS subdomain).
fn config_map_name() -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "minLength": 1,
        "maxLength": 253,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    })
}

/// Where a ConfigMap hook source is read from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfigMapHome {
    /// The operator's namespace (`configMaps` in the policy).
    OperatorNamespace,
    /// The HAService's own namespace (`ownConfigMaps` in the policy).
    ServiceNamespace,
}

/// Why a service's hook source (or the user its hooks run as) is refused
/// by the policy. Every message names the field and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookSourceRefused {
    /// A hostPath that does not stay inside the hook root.
    #[error(
        "spec.hooks.source.hostPath {path:?} is not a directory inside the hook root {root}: give a relative path without '..' or empty parts, e.g. nfs",
        root = crate::HOOK_ROOT
    )]
    HostPathOutsideRoot {
        /// The hostPath as written.
        path: String,
    },
    /// A hostPath directory not granted to the namespace.
    #[error(
        "spec.hooks.source.hostPath {path:?}: HACluster {cluster} does not give that directory to namespace {namespace} (granted: {granted:?}); use a granted directory, or the cluster admin adds {path:?} to hostPaths of the spec.allowedHookSources.namespaces entry for {namespace}"
    )]
    HostPathNotGranted {
        /// The cluster.
        cluster: String,
        /// The service's namespace.
        namespace: String,
        /// The hostPath as written.
        path: String,
        /// What the namespace is granted.
        granted: Vec<String>,
    },
    /// A ConfigMap not granted to the namespace.
    #[error(
        "spec.hooks.source.configMap {name:?}: HACluster {cluster} does not give that ConfigMap to namespace {namespace} (granted: {granted:?}); use a granted one, or the cluster admin adds {name:?} to configMaps (a ConfigMap of the operator's namespace) or ownConfigMaps (one of {namespace} itself) of the spec.allowedHookSources.namespaces entry for {namespace}"
    )]
    ConfigMapNotGranted {
        /// The cluster.
        cluster: String,
        /// The service's namespace.
        namespace: String,
        /// The ConfigMap name as written.
        name: String,
        /// What the namespace is granted (`namespace/name` for its own).
        granted: Vec<String>,
    },
    /// A user id the namespace may not run hooks as.
    #[error(
        "spec.hooks.runAsUser {uid}: HACluster {cluster} does not allow namespace {namespace} to run hooks as that user id (allowed: {granted:?}); use an allowed id, or the cluster admin adds \"{uid}\" (or a range holding it, e.g. \"{uid}-{uid}\") to runAsUsers of the spec.allowedHookSources.namespaces entry for {namespace}"
    )]
    RunAsUserNotAllowed {
        /// The cluster.
        cluster: String,
        /// The service's namespace.
        namespace: String,
        /// The user id asked for.
        uid: i64,
        /// What the namespace is allowed.
        granted: Vec<String>,
    },
}

/// The inclusive range of user ids of one `runAsUsers` item (`1000` or
/// `1000-1999`); `None` when it is not one.
pub fn uid_range(item: &str) -> Option<(i64, i64)> {
    let (low, high) = item.split_once('-').unwrap_or((item, item));
    let (low, high) = (low.parse().ok()?, high.parse().ok()?);
    (0 < low && low <= high).then_some((low, high))
}

/// Whether a service of `namespace` may run its hooks as user `uid`:
/// allowed when an entry for the namespace (its own or `*`) lists the id
/// or a range holding it.
pub fn check_run_as_user(
    policy: &AllowedHookSources,
    cluster: &str,
    namespace: &str,
    uid: i64,
) -> Result<(), HookSourceRefused> {
    let granted: Vec<&String> = entries(policy, namespace)
        .flat_map(|e| &e.run_as_users)
        .collect();
    let ok = granted
        .iter()
        .filter_map(|g| uid_range(g))
        .any(|(low, high)| (low..=high).contains(&uid));
    if ok {
        Ok(())
    } else {
        Err(HookSourceRefused::RunAsUserNotAllowed {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            uid,
            granted: granted.into_iter().cloned().collect(),
        })
    }
}

/// The parts of a relative path under the hook root (`.` and empty parts
/// dropped); `None` when a part is `..` or the path is absolute.
pub fn host_path_parts(path: &str) -> Option<Vec<&str>> {
    if path.starts_with('/') || path.contains('\0') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts)
}

/// The entries of the policy that apply to `namespace` (its own and `*`).
fn entries<'a>(
    policy: &'a AllowedHookSources,
    namespace: &'a str,
) -> impl Iterator<Item = &'a NamespaceHookSources> + 'a {
    policy
        .namespaces
        .iter()
        .filter(move |e| e.namespace == "*" || e.namespace == namespace)
}

/// Whether `namespace` may use host-path directory `path` (relative to the
/// hook root): granted when an entry for it lists `*`, the directory itself
/// or a directory above it.
pub fn check_host_path(
    policy: &AllowedHookSources,
    cluster: &str,
    namespace: &str,
    path: &str,
) -> Result<(), HookSourceRefused> {
    let Some(wanted) = host_path_parts(path) else {
        return Err(HookSourceRefused::HostPathOutsideRoot {
            path: path.to_owned(),
        });
    };
    let granted: Vec<&String> = entries(policy, namespace)
        .flat_map(|e| &e.host_paths)
        .collect();
    let ok = granted.iter().any(|g| {
        if g.as_str() == "*" {
            return true;
        }
        match host_path_parts(g) {
            // A grant of the root itself (".") is not a grant: `*` says it.
            Some(parts) if !parts.is_empty() => wanted.starts_with(&parts),
            _ => false,
        }
    });
    if ok {
        Ok(())
    } else {
        Err(HookSourceRefused::HostPathNotGranted {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            path: path.to_owned(),
            granted: granted.into_iter().cloned().collect(),
        })
    }
}

/// Where ConfigMap `name` may be read from for a service of `namespace`, in
/// the order the agent looks: the operator's namespace (granted in
/// `configMaps`), then the service's own (granted in `ownConfigMaps`).
/// Refused when neither is granted.
pub fn config_map_homes(
    policy: &AllowedHookSources,
    cluster: &str,
    namespace: &str,
    name: &str,
) -> Result<Vec<ConfigMapHome>, HookSourceRefused> {
    let mut homes = Vec::new();
    if entries(policy, namespace).any(|e| e.config_maps.iter().any(|c| c == name)) {
        homes.push(ConfigMapHome::OperatorNamespace);
    }
    if entries(policy, namespace).any(|e| e.own_config_maps.iter().any(|c| c == name)) {
        homes.push(ConfigMapHome::ServiceNamespace);
    }
    if homes.is_empty() {
        let granted = entries(policy, namespace)
            .flat_map(|e| {
                e.config_maps
                    .iter()
                    .cloned()
                    .chain(e.own_config_maps.iter().map(|c| format!("{namespace}/{c}")))
            })
            .collect();
        return Err(HookSourceRefused::ConfigMapNotGranted {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            granted,
        });
    }
    Ok(homes)
}

/// Whether a service of `namespace` may take its hooks from their source
/// and run them as their user (`spec.hooks.runAsUser`) under the policy of
/// HACluster `cluster`.
pub fn check(
    policy: &AllowedHookSources,
    cluster: &str,
    namespace: &str,
    hooks: &Hooks,
) -> Result<(), HookSourceRefused> {
    check_source(policy, cluster, namespace, &hooks.source)?;
    if let Some(uid) = hooks.run_as_user {
        check_run_as_user(policy, cluster, namespace, uid)?;
    }
    Ok(())
}

/// Whether a service of `namespace` may take its hooks from `source`.
pub fn check_source(
    policy: &AllowedHookSources,
    cluster: &str,
    namespace: &str,
    source: &HookSource,
) -> Result<(), HookSourceRefused> {
    if let Some(path) = &source.host_path {
        check_host_path(policy, cluster, namespace, path)?;
    }
    if let Some(name) = &source.config_map {
        config_map_homes(policy, cluster, namespace, name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ns: &str, paths: &[&str], cms: &[&str]) -> NamespaceHookSources {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        let (own, operator): (Vec<&str>, Vec<&str>) =
            cms.iter().partition(|c| c.starts_with("own:"));
        let own: Vec<&str> = own.iter().map(|c| c.trim_start_matches("own:")).collect();
        NamespaceHookSources {
            namespace: ns.into(),
            host_paths: list(paths),
            config_maps: list(&operator),
            own_config_maps: list(&own),
            run_as_users: Vec::new(),
        }
    }

    fn policy(entries: Vec<NamespaceHookSources>) -> AllowedHookSources {
        AllowedHookSources {
            namespaces: entries,
        }
    }

    #[test]
    fn a_namespace_reaches_only_its_granted_directories_and_below() {
        let p = policy(vec![
            entry("team-a", &["team-a", "shared/tools"], &[]),
            entry("team-b", &["team-b"], &[]),
        ]);
        for ok in ["team-a", "team-a/nfs", "./team-a//nfs/", "shared/tools/x"] {
            assert_eq!(check_host_path(&p, "c", "team-a", ok), Ok(()), "{ok}");
        }
        for refused in ["team-b", "team-ab", "shared", "", ".", "team-b/../team-a"] {
            assert!(
                check_host_path(&p, "c", "team-a", refused).is_err(),
                "{refused} must be refused"
            );
        }
        let e = check_host_path(&p, "c", "team-a", "team-b").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("spec.hooks.source.hostPath"), "{text}");
        assert!(
            text.contains("spec.allowedHookSources.namespaces"),
            "{text}"
        );
        assert!(text.contains("team-a"), "{text}");
        assert!(matches!(
            check_host_path(&p, "c", "team-a", "../etc"),
            Err(HookSourceRefused::HostPathOutsideRoot { .. })
        ));
        assert!(matches!(
            check_host_path(&p, "c", "team-a", "/etc/kubeha/hooks/team-a"),
            Err(HookSourceRefused::HostPathOutsideRoot { .. })
        ));
        // Unknown namespaces get nothing, and the default policy gives
        // nothing to anyone.
        assert!(check_host_path(&p, "c", "team-c", "team-a").is_err());
        assert!(check_host_path(&AllowedHookSources::default(), "c", "x", "x").is_err());
    }

    #[test]
    fn star_entries_apply_to_every_namespace_and_star_paths_grant_the_whole_root() {
        let p = policy(vec![entry("*", &["common"], &["hooks"])]);
        assert_eq!(check_host_path(&p, "c", "any", "common/x"), Ok(()));
        assert!(check_host_path(&p, "c", "any", "other").is_err());
        let all = policy(vec![entry("trusted", &["*"], &[])]);
        assert_eq!(
            check_host_path(&all, "c", "trusted", "anything/deep"),
            Ok(())
        );
        assert!(check_host_path(&all, "c", "other", "anything").is_err());
        // A grant of "." is no grant of the root.
        let dot = policy(vec![entry("a", &["."], &[])]);
        assert!(check_host_path(&dot, "c", "a", "x").is_err());
    }

    #[test]
    fn config_maps_come_from_the_operator_namespace_or_the_services_own_as_granted() {
        // "own:x" in these tests is x in ownConfigMaps.
        let p = policy(vec![
            entry("*", &[], &["common"]),
            entry("team-a", &[], &["own:hooks", "a-hooks"]),
        ]);
        assert_eq!(
            config_map_homes(&p, "c", "team-a", "hooks"),
            Ok(vec![ConfigMapHome::ServiceNamespace])
        );
        assert_eq!(
            config_map_homes(&p, "c", "team-a", "a-hooks"),
            Ok(vec![ConfigMapHome::OperatorNamespace])
        );
        assert_eq!(
            config_map_homes(&p, "c", "team-b", "common"),
            Ok(vec![ConfigMapHome::OperatorNamespace])
        );
        let e = config_map_homes(&p, "c", "team-b", "a-hooks").unwrap_err();
        assert!(e.to_string().contains("spec.hooks.source.configMap"), "{e}");
        assert!(e.to_string().contains("ownConfigMaps"), "{e}");
        // team-a's own ConfigMap is not team-b's: team-b gets no `hooks`.
        assert!(config_map_homes(&p, "c", "team-b", "hooks").is_err());
        // A `*` entry gives every namespace its own ConfigMap of that name.
        let star = policy(vec![entry("*", &[], &["own:hooks"])]);
        assert_eq!(
            config_map_homes(&star, "c", "team-b", "hooks"),
            Ok(vec![ConfigMapHome::ServiceNamespace])
        );
        // Both granted: the operator's namespace first.
        let both = policy(vec![entry("x", &[], &["own:h", "h"])]);
        assert_eq!(
            config_map_homes(&both, "c", "x", "h"),
            Ok(vec![
                ConfigMapHome::OperatorNamespace,
                ConfigMapHome::ServiceNamespace
            ])
        );
    }

    #[test]
    fn check_covers_both_kinds_of_source() {
        let p = policy(vec![entry("a", &["a"], &["h"])]);
        let host = |p: &str| HookSource {
            host_path: Some(p.into()),
            config_map: None,
        };
        let cm = |n: &str| HookSource {
            host_path: None,
            config_map: Some(n.into()),
        };
        assert_eq!(check_source(&p, "c", "a", &host("a")), Ok(()));
        assert_eq!(check_source(&p, "c", "a", &cm("h")), Ok(()));
        assert!(check_source(&p, "c", "a", &host("b")).is_err());
        assert!(check_source(&p, "c", "a", &cm("g")).is_err());
    }

    #[test]
    fn run_as_user_ids_are_allowed_per_namespace_by_id_or_range() {
        assert_eq!(uid_range("1000"), Some((1000, 1000)));
        assert_eq!(uid_range("1000-1999"), Some((1000, 1999)));
        for bad in ["0", "2000-1000", "x", "1000-", "-5", ""] {
            assert_eq!(uid_range(bad), None, "{bad}");
        }
        let mut a = entry("a", &["a"], &[]);
        a.run_as_users = vec!["1000-1999".into(), "65534".into()];
        let mut star = entry("*", &[], &[]);
        star.run_as_users = vec!["3000".into()];
        let p = policy(vec![a, star]);
        for uid in [1000, 1500, 1999, 65534, 3000] {
            assert_eq!(check_run_as_user(&p, "c", "a", uid), Ok(()), "{uid}");
        }
        for uid in [999, 2000, 0] {
            assert!(check_run_as_user(&p, "c", "a", uid).is_err(), "{uid}");
        }
        // Namespace b has only the `*` grant.
        assert_eq!(check_run_as_user(&p, "c", "b", 3000), Ok(()));
        let err = check_run_as_user(&p, "c", "b", 1000)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.hooks.runAsUser 1000")
                && err.contains("runAsUsers of the spec.allowedHookSources.namespaces entry for b")
                && err.contains("[\"3000\"]"),
            "{err}"
        );
        // check covers the user as well as the source.
        let hooks: Hooks = serde_json::from_value(serde_json::json!({
            "source": {"hostPath": "a"},
            "runAsUser": 1000
        }))
        .expect("hooks parse");
        let h = &hooks;
        assert_eq!(check(&p, "c", "a", h), Ok(()));
        assert!(check(&p, "c", "b", h).is_err());
    }
}
