//! The hook-source gate: before the runner runs any script of a service it
//! checks the service's source against its HACluster's
//! `spec.allowedHookSources` ([`kubeha_crds::hook_policy`]), whatever the
//! Lease says, and fetches a ConfigMap source itself into a directory of its
//! own per namespace/name, replaced atomically. A source the policy does
//! not give the service's namespace, or a ConfigMap that could not be
//! fetched, runs nothing.
//!
//! The daemon configures the gate ([`HookRunner::configure_sources`]) and
//! keeps each cluster's policy current ([`HookRunner::set_hook_policy`]); a
//! runner without it (`kubeha-agent hooks run` by hand, unit tests) runs
//! the directory it is given.
//!
//! A ConfigMap source reaches the runner as the directory
//! `<state dir>/configmap-hooks/<name>` (what the transitions name it);
//! the runner reads it as "ConfigMap `<name>` for this service" and runs
//! the scripts it wrote to `<state dir>/hook-configmaps/<namespace>/<name>`
//! for that service's last fetch. The ConfigMap is fetched again for every
//! enter and leave, and when this agent has not fetched it for the service
//! yet; monitor and periodic runs use the last fetch.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kubeha_crds::cluster::AllowedHookSources;
use kubeha_crds::hook_policy::{self, ConfigMapHome};

use super::runner::NOTE;
use super::{Action, HookContext, HookRunner, HookSet};

/// Largest script a ConfigMap hook source may hold, in bytes (a hook is a
/// short script; a bigger one is refused, not cut).
pub const MAX_CONFIG_MAP_SCRIPT_BYTES: usize = 256 * 1024;

/// Longest a ConfigMap fetch may take before it counts as failed.
pub const CONFIG_MAP_FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the sources are, and whom to ask for ConfigMaps.
#[derive(Clone)]
pub struct SourceRoots {
    /// The hook root (`--hook-root`), under which `hostPath` resolves.
    pub hook_root: PathBuf,
    /// The agent's state directory: ConfigMap scripts are written under
    /// `hook-configmaps/` in it.
    pub state_dir: PathBuf,
    /// The operator's namespace (bare ConfigMap names in the policy).
    pub operator_namespace: String,
    /// The API client that fetches ConfigMaps; `None`: every ConfigMap
    /// source is refused.
    pub client: Option<kube::Client>,
}

impl fmt::Debug for SourceRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceRoots")
            .field("hook_root", &self.hook_root)
            .field("state_dir", &self.state_dir)
            .field("operator_namespace", &self.operator_namespace)
            .finish_non_exhaustive()
    }
}

impl SourceRoots {
    /// The directory the transitions name for ConfigMap sources.
    fn named_config_maps(&self) -> PathBuf {
        self.state_dir.join("configmap-hooks")
    }

    /// Root of the scripts written from ConfigMaps, one directory per
    /// namespace/name.
    pub fn config_map_root(&self) -> PathBuf {
        self.state_dir.join("hook-configmaps")
    }
}

/// The gate's state, shared by the runner's clones.
#[derive(Debug, Default)]
pub(super) struct Sources {
    roots: Option<SourceRoots>,
    policies: BTreeMap<String, AllowedHookSources>,
    /// Per service (`namespace/name`): the directory its ConfigMap's scripts
    /// were last written to, or why the last fetch failed.
    fetched: BTreeMap<String, Result<PathBuf, String>>,
}

/// A hook set the gate let through: the directory to run and the root the
/// scripts must stay inside.
pub(super) struct Admitted {
    pub(super) set: HookSet,
    pub(super) root: Option<PathBuf>,
}

impl HookRunner {
    /// Turns the hook-source gate on: from now on every run is checked
    /// against its cluster's policy ([`HookRunner::set_hook_policy`]) and
    /// ConfigMap sources are fetched by the runner.
    pub fn configure_sources(&self, roots: SourceRoots) {
        let mut s = super::runner::lock(&self.sources);
        let same = s.roots.as_ref().is_some_and(|r| {
            r.hook_root == roots.hook_root
                && r.state_dir == roots.state_dir
                && r.operator_namespace == roots.operator_namespace
                && r.client.is_some() == roots.client.is_some()
        });
        if !same {
            s.roots = Some(roots);
        }
    }

    /// The hook-source policy of HACluster `cluster` as last read.
    pub fn set_hook_policy(&self, cluster: &str, policy: &AllowedHookSources) {
        let mut s = super::runner::lock(&self.sources);
        if s.policies.get(cluster) != Some(policy) {
            s.policies.insert(cluster.to_owned(), policy.clone());
        }
    }

    /// Checks `set` for the service and cluster of `ctx` and resolves a
    /// ConfigMap source to the scripts fetched for it. `Err`: why nothing
    /// may run.
    pub(super) async fn admit(&self, set: &HookSet, ctx: &HookContext) -> Result<Admitted, String> {
        let (roots, policy) = {
            let s = super::runner::lock(&self.sources);
            let Some(roots) = s.roots.clone() else {
                return Ok(Admitted {
                    set: set.clone(),
                    root: None,
                });
            };
            (roots, s.policies.get(&ctx.cluster).cloned())
        };
        let Some(policy) = policy else {
            return Err(format!(
                "{NOTE} not run: the hook-source policy of HACluster {} is not known to this agent",
                ctx.cluster
            ));
        };
        let namespace = ctx.service.split_once('/').map_or("", |(ns, _)| ns);
        if let Some(uid) = ctx.run_as_user {
            hook_policy::check_run_as_user(&policy, &ctx.cluster, namespace, uid)
                .map_err(|e| format!("{NOTE} not run: {e}"))?;
        }
        if let Ok(rel) = set.dir.strip_prefix(&roots.hook_root) {
            let rel = rel.to_string_lossy();
            hook_policy::check_host_path(&policy, &ctx.cluster, namespace, &rel)
                .map_err(|e| format!("{NOTE} not run: {e}"))?;
            return Ok(Admitted {
                set: set.clone(),
                root: Some(roots.hook_root.clone()),
            });
        }
        let named = roots.named_config_maps();
        let Some(name) = set
            .dir
            .strip_prefix(&named)
            .ok()
            .and_then(|rel| rel.to_str())
            .filter(|n| !n.is_empty() && !n.contains('/'))
        else {
            return Err(format!(
                "{NOTE} not run: hook directory {} is neither under the hook root {} nor a ConfigMap source",
                set.dir.display(),
                roots.hook_root.display()
            ));
        };
        let homes = hook_policy::config_map_homes(&policy, &ctx.cluster, namespace, name)
            .map_err(|e| format!("{NOTE} not run: {e}"))?;
        let known = super::runner::lock(&self.sources)
            .fetched
            .get(&ctx.service)
            .cloned();
        let dir = match known {
            Some(known) if !matches!(ctx.action, Action::Enter | Action::Leave) => known,
            _ => {
                let fetched = self.fetch(&roots, &homes, namespace, name).await;
                super::runner::lock(&self.sources)
                    .fetched
                    .insert(ctx.service.clone(), fetched.clone());
                fetched
            }
        }
        .map_err(|e| format!("{NOTE} not run: {e}"))?;
        Ok(Admitted {
            set: HookSet {
                dir,
                layout: set.layout.clone(),
            },
            root: Some(roots.config_map_root()),
        })
    }

    /// Fetches ConfigMap `name` from the first of `homes` that has it and
    /// writes its scripts out; any failure (the API server, a missing
    /// ConfigMap, a refused key) writes nothing and says why.
    async fn fetch(
        &self,
        roots: &SourceRoots,
        homes: &[ConfigMapHome],
        namespace: &str,
        name: &str,
    ) -> Result<PathBuf, String> {
        let Some(client) = &roots.client else {
            return Err(format!(
                "ConfigMap {name} cannot be fetched: this agent has no API client"
            ));
        };
        let mut looked = Vec::new();
        for home in homes {
            let ns = match home {
                ConfigMapHome::OperatorNamespace => roots.operator_namespace.as_str(),
                ConfigMapHome::ServiceNamespace => namespace,
            };
            looked.push(format!("{ns}/{name}"));
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            match tokio::time::timeout(CONFIG_MAP_FETCH_TIMEOUT, api.get_opt(name)).await {
                Ok(Ok(Some(cm))) => {
                    let _write = lock_writes();
                    return write_config_map(&roots.config_map_root(), ns, name, &cm)
                        .map_err(|e| format!("ConfigMap {ns}/{name} refused: {e}"));
                }
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => {
                    return Err(format!(
                        "ConfigMap {ns}/{name} could not be fetched ({e}); a failed fetch runs nothing"
                    ));
                }
                Err(_) => {
                    return Err(format!(
                        "ConfigMap {ns}/{name} could not be fetched within {} s; a failed fetch runs nothing",
                        CONFIG_MAP_FETCH_TIMEOUT.as_secs()
                    ));
                }
            }
        }
        Err(format!(
            "ConfigMap {name} does not exist where the policy lets this service read it ({})",
            looked.join(", ")
        ))
    }
}

/// One writer at a time (two services may share a ConfigMap).
fn lock_writes() -> std::sync::MutexGuard<'static, ()> {
    static WRITES: Mutex<()> = Mutex::new(());
    WRITES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a ConfigMap's content cannot be hook scripts, or `None`.
pub fn refuse_content(cm: &ConfigMap) -> Option<String> {
    if let Some(binary) = cm.binary_data.as_ref().filter(|b| !b.is_empty()) {
        let keys: Vec<&str> = binary.keys().map(String::as_str).collect();
        return Some(format!(
            "it has binaryData keys {keys:?}; hook scripts must be text under data"
        ));
    }
    let data = cm.data.as_ref()?;
    let mut reasons = Vec::new();
    for (key, script) in data {
        let plain = !key.is_empty()
            && !key.starts_with('.')
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !plain {
            reasons.push(format!(
                "key {key:?} is not a plain file name (letters, digits, '.', '_', '-', not starting with '.')"
            ));
        }
        if script.len() > MAX_CONFIG_MAP_SCRIPT_BYTES {
            reasons.push(format!(
                "script {key:?} has {} bytes, more than the {MAX_CONFIG_MAP_SCRIPT_BYTES} a hook script may have",
                script.len()
            ));
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// Writes the scripts of `cm` (from namespace `ns`) to `root/ns/name`,
/// replacing the directory atomically: the scripts go to a new directory,
/// which then takes the old one's place in one rename (exchange). Files
/// are root's, mode 0755, in directories of mode 0755. Refused (nothing
/// written) when [`refuse_content`] says why.
pub fn write_config_map(
    root: &Path,
    ns: &str,
    name: &str,
    cm: &ConfigMap,
) -> Result<PathBuf, String> {
    if let Some(why) = refuse_content(cm) {
        return Err(why);
    }
    let io = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let parent = root.join(ns);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&parent)
        .map_err(|e| io("cannot create", &parent, e))?;
    for dir in [root, parent.as_path()] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| io("cannot chmod", dir, e))?;
    }
    let target = parent.join(name);
    let fresh = parent.join(format!(".{name}.new"));
    let _ = fs::remove_dir_all(&fresh);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&fresh)
        .map_err(|e| io("cannot create", &fresh, e))?;
    for (key, script) in cm.data.iter().flatten() {
        let file = fresh.join(key);
        fs::write(&file, script).map_err(|e| io("cannot write", &file, e))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o755))
            .map_err(|e| io("cannot chmod", &file, e))?;
    }
    fs::set_permissions(&fresh, fs::Permissions::from_mode(0o755))
        .map_err(|e| io("cannot chmod", &fresh, e))?;
    if fs::symlink_metadata(&target).is_ok() {
        let dir = fs::File::open(&parent).map_err(|e| io("cannot open", &parent, e))?;
        nix::fcntl::renameat2(
            &dir,
            fresh.file_name().unwrap_or_default(),
            &dir,
            target.file_name().unwrap_or_default(),
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| format!("cannot replace {}: {e}", target.display()))?;
        // `fresh` now holds the old scripts.
        let _ = fs::remove_dir_all(&fresh);
    } else {
        fs::rename(&fresh, &target).map_err(|e| io("cannot rename to", &target, e))?;
    }
    Ok(target)
}
