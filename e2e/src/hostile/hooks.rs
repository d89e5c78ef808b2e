//! Hostile cases: hooks. A namespace pointing its hostPath at another
//! team's directory or naming a ConfigMap nobody gave it, same-named
//! ConfigMaps in two namespaces, ConfigMaps with binaryData or a 1 MB
//! script, a ConfigMap the agent cannot fetch, unsafe hook directories
//! (world-writable, a symlink out of the hook root), and hooks that print
//! gigabytes, daemonize or hang in uninterruptible sleep.
//!
//! Every case has a cluster of its own (named after the case) whose
//! `allowedHookSources` it writes, on a VIP pool no other module uses
//! (198.18.6.0/24), and removes what it created whatever its result.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Case, Ctx, clip, events_about};
use crate::ha;
use crate::lab::{AGENT_SERVICE_ACCOUNT, Lab, StopSignal};
use crate::nodes;

/// This module's clusters' VIP pool.
const POOL: &str = "198.18.6.0/24";
/// A second tenant namespace (never deleted: the lab has no namespace
/// controller to finish a deletion).
const OTHER_NAMESPACE: &str = "hostile-hooks";
/// How long a refused source is watched for an address or a hook run.
const WATCH: Duration = Duration::from_secs(8);
/// How long a refusal may take to show (status, Event).
const SHOWS_WITHIN: Duration = Duration::from_secs(45);

/// This module's cases.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "hooks-hostpath-other-teams-directory",
            expected: "a service whose hostPath names a directory the policy gives another namespace: refused by the operator naming spec.hooks.source.hostPath and the allowedHookSources entry to fix; no hook ran, no address",
            run: hostpath_other_teams_directory,
        },
        Case {
            name: "hooks-hostpath-other-teams-directory-forged-lease",
            expected: "the same service with the operator stopped and a Lease forged to clear node-1: node-1 runs no hook and holds no address; it refuses naming the hostPath",
            run: hostpath_other_teams_directory_forged_lease,
        },
        Case {
            name: "hooks-configmap-not-granted",
            expected: "a service naming a ConfigMap of the operator's namespace that the policy does not give its namespace: refused by the operator naming spec.hooks.source.configMap; no hook ran, no address",
            run: configmap_not_granted,
        },
        Case {
            name: "hooks-configmap-same-name-two-namespaces",
            expected: "ConfigMaps of one name in two namespaces, each granted to its own namespace: each service runs its own namespace's script, written to its own directory",
            run: configmap_same_name_two_namespaces,
        },
        Case {
            name: "hooks-configmap-binary-data",
            expected: "a granted ConfigMap with a binaryData key: the enter is refused naming binaryData, no script of it runs, no address left",
            run: configmap_binary_data,
        },
        Case {
            name: "hooks-configmap-1mb-script",
            expected: "a granted ConfigMap holding a 1 MB script: refused naming the script and its size, nothing runs, no address left",
            run: configmap_1mb_script,
        },
        Case {
            name: "hooks-configmap-fetch-fails",
            expected: "a ConfigMap of the service's own namespace, granted by the policy but not readable by the agents (RBAC): the fetch fails and nothing runs (no old scripts either), no address left",
            run: configmap_fetch_fails,
        },
        Case {
            name: "hooks-output-gigabytes",
            expected: "an enter hook printing 2 GB: it completes (the agent drains its output), the service is Active, the hook's log stays under the 1 MiB cap plus its header, and the result says how much was discarded",
            run: output_gigabytes,
        },
        Case {
            name: "hooks-fork-and-daemonize-past-timeout",
            expected: "an enter hook that starts a child, a setsid daemon, then hangs past its timeout: TimedOut; the child in its process group is killed at the timeout; the daemon that left the group is stopped by the leave hook the failed enter runs, as documented",
            run: fork_and_daemonize_past_timeout,
        },
        Case {
            name: "hooks-uninterruptible-sleep",
            expected: "an enter hook frozen (uninterruptible, SIGKILL cannot end it) past its timeout: the result says TimedOut and that the process outlived SIGKILL; the agent keeps heartbeating and reporting; the process ends once thawed",
            run: uninterruptible_sleep,
        },
        Case {
            name: "hooks-world-writable-directory",
            expected: "a granted hook directory that is writable by others: the script is refused naming the directory and chmod g-w,o-w; nothing runs, no address left",
            run: world_writable_directory,
        },
        Case {
            name: "hooks-symlink-out-of-the-root",
            expected: "a script that is a symlink to a root-owned script outside the hook root: refused as leading out of the hook root; nothing runs, no address left",
            run: symlink_out_of_the_root,
        },
    ]
}

/// One case's cluster (members, policy) and what it creates: services of
/// the cluster's name, ConfigMaps, hook directories on the members, the
/// trace every script of the case appends to. Removed on drop.
struct HookCase<'a> {
    lab: &'a Lab,
    name: String,
    members: Vec<u8>,
    trace: PathBuf,
    services: Vec<String>,
    config_maps: Vec<(String, String)>,
    dirs: Vec<String>,
    roles: Vec<String>,
}

impl<'a> HookCase<'a> {
    /// Cluster `name` of `members`, services of [`ha::SERVICE_NAMESPACE`]
    /// and [`OTHER_NAMESPACE`] allowed, hook sources `policy` (the
    /// `allowedHookSources.namespaces` list); what an earlier run left is
    /// removed first. Waits until every member heartbeats.
    fn new(lab: &'a Lab, name: &str, members: &[u8], policy: Value) -> anyhow::Result<Self> {
        let case = HookCase {
            lab,
            name: name.to_owned(),
            members: members.to_vec(),
            trace: lab.dir().join(format!("{name}.trace")),
            services: vec![ha::SERVICE_NAMESPACE.to_owned(), OTHER_NAMESPACE.to_owned()],
            config_maps: Vec::new(),
            dirs: Vec::new(),
            roles: vec![ha::SERVICE_NAMESPACE.to_owned(), OTHER_NAMESPACE.to_owned()],
        };
        case.remove_objects();
        let _ = std::fs::remove_file(&case.trace);
        let _ = lab.kubectl_output(&["create", "namespace", OTHER_NAMESPACE]);
        for ns in [ha::SERVICE_NAMESPACE, OTHER_NAMESPACE] {
            let _ = lab.kubectl_output(&[
                "delete",
                "events",
                "-n",
                ns,
                "--field-selector",
                &format!("involvedObject.name={name}"),
            ]);
        }
        let mut cluster = ha::cluster(name, members, ha::Timing::DEFAULT);
        cluster["spec"]["vipPool"] = json!([POOL]);
        cluster["spec"]["allowedNamespaces"] = json!([ha::SERVICE_NAMESPACE, OTHER_NAMESPACE]);
        cluster["spec"]["allowedHookSources"] = json!({ "namespaces": policy });
        ha::apply(lab, &cluster)?;
        let count = members.len() as u8;
        if ha::wait_every(Duration::from_secs(30), Duration::from_millis(250), || {
            ha::members_ready(lab, name, count)
        })
        .is_none()
        {
            bail!("cluster {name} never had {count}/{count} members ready");
        }
        Ok(case)
    }

    /// [`HookCase::new`] with node-1 alone and one policy entry.
    fn on_node_1(lab: &'a Lab, name: &str, entry: Value) -> anyhow::Result<Self> {
        Self::new(lab, name, &[1], json!([entry]))
    }

    /// Installs `scripts` into hook directory `dir` on every member.
    fn hook_dir(&mut self, dir: &str, scripts: &[(&str, &str)]) -> anyhow::Result<()> {
        self.dirs.push(dir.to_owned());
        for i in &self.members {
            ha::install_hooks(self.lab, *i, dir, scripts)?;
        }
        Ok(())
    }

    /// A script appending `LABEL NAME ACTION ROLE node=NODE
    /// service=SERVICE` to the case's trace, exit 0.
    fn trace_script(&self, label: &str) -> String {
        format!(
            "#!/bin/sh\necho \"{label} $(basename \"$0\") $1 $2 node=$KUBEHA_NODE service=$KUBEHA_SERVICE\" >> '{}'\n",
            self.trace.display()
        )
    }

    /// What the case's scripts wrote so far.
    fn ran(&self) -> String {
        std::fs::read_to_string(&self.trace).unwrap_or_default()
    }

    /// ConfigMap `name` in `namespace` with `data` (and `binary_data`).
    fn config_map(
        &mut self,
        namespace: &str,
        name: &str,
        data: Value,
        binary_data: Option<Value>,
    ) -> anyhow::Result<()> {
        self.config_maps
            .push((namespace.to_owned(), name.to_owned()));
        let mut cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": data,
        });
        if let Some(b) = binary_data {
            cm["binaryData"] = b;
        }
        ha::apply(self.lab, &cm)
    }

    /// Lets the agents read ConfigMap `name` in `namespace` (a Role and
    /// RoleBinding named after the case), as an admin granting a namespace
    /// its own hook ConfigMap does.
    fn let_agents_read(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        ha::apply(
            self.lab,
            &json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": self.name, "namespace": namespace},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [name], "verbs": ["get"]}],
            }),
        )?;
        ha::apply(
            self.lab,
            &json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": self.name, "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": self.name},
                "subjects": [{"kind": "ServiceAccount", "name": AGENT_SERVICE_ACCOUNT, "namespace": ha::OPERATOR_NAMESPACE}],
            }),
        )
    }

    /// The case's service in `namespace` on VIP `vip` with hook `source`
    /// and enter/leave timeout `timeout_seconds`.
    fn service(
        &self,
        namespace: &str,
        vip: &str,
        source: Value,
        timeout_seconds: u32,
    ) -> anyhow::Result<()> {
        ha::apply(
            self.lab,
            &json!({
                "apiVersion": "kubeha.io/v1alpha1",
                "kind": "HAService",
                "metadata": {"name": self.name, "namespace": namespace},
                "spec": {
                    "clusterRef": self.name,
                    "vips": [{"address": format!("{vip}/24"), "interface": nodes::NS_IFACE}],
                    "garp": {"count": 1, "intervalMs": 100},
                    "hooks": {"source": source, "timeoutSeconds": timeout_seconds},
                },
            }),
        )
    }

    /// The service's status in `namespace`.
    fn status(&self, namespace: &str) -> Value {
        self.lab
            .kubectl_json(&["get", "haservice", &self.name, "-n", namespace])
            .map(|v| v["status"].clone())
            .unwrap_or_default()
    }

    /// The first condition message of the service's status that contains
    /// `text`, within [`SHOWS_WITHIN`].
    fn status_says(&self, namespace: &str, text: &str) -> anyhow::Result<String> {
        let mut said = String::new();
        let mut status = Value::Null;
        ha::wait_every(SHOWS_WITHIN, Duration::from_millis(250), || {
            status = self.status(namespace);
            said = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["message"].as_str())
                .find(|m| m.contains(text))
                .unwrap_or_default()
                .to_owned();
            !said.is_empty()
        })
        .with_context(|| format!("no condition named {text:?}; status {status}"))?;
        Ok(said)
    }

    /// The message of the first Event about the service in `namespace`
    /// whose reason is among `reasons` and whose message contains every
    /// one of `texts`, within [`SHOWS_WITHIN`].
    fn event_says(
        &self,
        namespace: &str,
        reasons: &[&str],
        texts: &[&str],
    ) -> anyhow::Result<String> {
        let mut found = None;
        ha::wait_every(SHOWS_WITHIN, Duration::from_millis(500), || {
            found = events_about(self.lab, namespace, &self.name)
                .into_iter()
                .find(|(r, m)| reasons.contains(&r.as_str()) && texts.iter().all(|t| m.contains(t)))
                .map(|(r, m)| format!("{r}: {m}"));
            found.is_some()
        });
        found.with_context(|| {
            format!(
                "no {reasons:?} Event naming {texts:?} within {} s; Events: {:?}",
                SHOWS_WITHIN.as_secs(),
                events_about(self.lab, namespace, &self.name)
            )
        })
    }

    /// Fails when during [`WATCH`] any node holds `vip` or any script of
    /// the case runs.
    fn nothing_runs(&self, vip: &str) -> anyhow::Result<()> {
        if ha::wait_every(WATCH, Duration::from_millis(100), || {
            !ha::vip_holders(vip).is_empty() || self.trace.exists()
        })
        .is_some()
        {
            bail!(
                "a refused source ran: {vip} held by {:?}, trace {:?}",
                ha::vip_holders(vip),
                self.ran()
            );
        }
        Ok(())
    }

    /// Fails when `vip` is still held after 15 s or a script ran.
    fn nothing_left(&self, vip: &str) -> anyhow::Result<()> {
        if ha::wait_every(Duration::from_secs(15), Duration::from_millis(200), || {
            ha::vip_holders(vip).is_empty()
        })
        .is_none()
        {
            bail!("{vip} still held by {:?}", ha::vip_holders(vip));
        }
        if self.trace.exists() {
            bail!("a refused script ran: {:?}", self.ran());
        }
        Ok(())
    }

    /// Deletes every object of the case (services first, so their
    /// finalizers give them away), without waiting.
    fn remove_objects(&self) {
        for ns in &self.services {
            ha::delete(self.lab, "haservice", &self.name, Some(ns));
        }
        ha::delete(self.lab, "hacluster", &self.name, None);
        for (ns, name) in &self.config_maps {
            ha::delete(self.lab, "configmap", name, Some(ns));
        }
        for ns in &self.roles {
            ha::delete(self.lab, "rolebinding", &self.name, Some(ns));
            ha::delete(self.lab, "role", &self.name, Some(ns));
        }
    }

    /// Removes what the case created; fails when a VIP of `vips` is still
    /// held 30 s later or a service is still there.
    fn finish(mut self, vips: &[&str]) -> anyhow::Result<()> {
        self.remove_objects();
        let released = ha::wait_every(Duration::from_secs(30), Duration::from_millis(250), || {
            vips.iter().all(|v| ha::vip_holders(v).is_empty())
                && self.services.iter().all(|ns| {
                    self.lab
                        .kubectl_output(&["get", "haservice", &self.name, "-n", ns])
                        .is_ok_and(|o| !o.status.success())
                })
        });
        // The cluster goes last: the finalizers needed it.
        ha::delete(self.lab, "hacluster", &self.name, None);
        self.remove_files();
        self.services.clear();
        if released.is_none() {
            bail!("after the case: VIPs {vips:?} held or its services not gone within 30 s");
        }
        Ok(())
    }

    fn remove_files(&self) {
        for i in &self.members {
            for dir in &self.dirs {
                let _ = std::fs::remove_dir_all(ha::hook_root(self.lab, *i).join(dir));
            }
        }
        let _ = std::fs::remove_file(&self.trace);
    }
}

impl Drop for HookCase<'_> {
    fn drop(&mut self) {
        if !self.services.is_empty() {
            self.remove_objects();
            self.remove_files();
        }
    }
}

/// A policy entry: `namespace` may use `host_paths` and `config_maps` of
/// the operator's namespace.
fn grant(namespace: &str, host_paths: &[&str], config_maps: &[&str]) -> Value {
    json!({"namespace": namespace, "hostPaths": host_paths, "configMaps": config_maps})
}

/// A policy entry: `namespace` may use its own ConfigMaps `own`.
fn grant_own(namespace: &str, own: &[&str]) -> Value {
    json!({"namespace": namespace, "ownConfigMaps": own})
}

fn hostpath_other_teams_directory(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-hooks-hostpath";
    let (mine, theirs) = (format!("{name}-team-a"), format!("{name}-team-b"));
    let vip = "198.18.6.1";
    let mut case = HookCase::new(
        ctx.lab,
        name,
        &[1, 2],
        json!([
            grant(ha::SERVICE_NAMESPACE, &[&mine], &[]),
            grant(OTHER_NAMESPACE, &[&theirs], &[])
        ]),
    )?;
    let script = case.trace_script("team-b");
    case.hook_dir(&mine, &[("E01trace", &script)])?;
    case.hook_dir(&theirs, &[("E01trace", &script)])?;
    case.service(ha::SERVICE_NAMESPACE, vip, json!({"hostPath": theirs}), 5)?;
    let said = case.status_says(ha::SERVICE_NAMESPACE, "spec.hooks.source.hostPath")?;
    if !said.contains("spec.allowedHookSources.namespaces") {
        bail!("the refusal does not name the field to fix: {said}");
    }
    case.nothing_runs(vip)?;
    case.finish(&[vip])?;
    Ok(format!(
        "operator refused: {}; no address, no hook for {} s",
        clip(&said),
        WATCH.as_secs()
    ))
}

fn hostpath_other_teams_directory_forged_lease(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-hooks-hostpath-forged";
    let theirs = format!("{name}-team-b");
    let vip = "198.18.6.2";
    let mut case = HookCase::new(
        lab,
        name,
        &[1, 2],
        json!([
            grant(ha::SERVICE_NAMESPACE, &[&format!("{name}-team-a")], &[]),
            grant(OTHER_NAMESPACE, &[&theirs], &[])
        ]),
    )?;
    let script = case.trace_script("team-b");
    case.hook_dir(&theirs, &[("E01trace", &script)])?;
    lab.stop_operator(0, StopSignal::Term)?;
    let result = (|| {
        case.service(ha::SERVICE_NAMESPACE, vip, json!({"hostPath": theirs}), 5)?;
        ha::set_service_lease(lab, name, Some(&nodes::node_name(1)), 1, true, None)?;
        case.nothing_runs(vip)?;
        case.event_says(
            ha::SERVICE_NAMESPACE,
            &["AssignmentRefused", "HookFailed"],
            &["spec.hooks.source.hostPath"],
        )
    })();
    let restarted = super::restore(lab);
    let said = result?;
    restarted?;
    case.finish(&[vip])?;
    Ok(format!(
        "operator stopped, Lease forged for node-1: no address, no hook for {} s; {}",
        WATCH.as_secs(),
        clip(&said)
    ))
}

fn configmap_not_granted(ctx: &Ctx) -> anyhow::Result<String> {
    let name = "hostile-hooks-cm-not-granted";
    let vip = "198.18.6.3";
    let granted = format!("{name}-granted");
    let mut case = HookCase::on_node_1(
        ctx.lab,
        name,
        grant(ha::SERVICE_NAMESPACE, &[], &[&granted]),
    )?;
    let other = format!("{name}-other");
    let script = case.trace_script("other");
    case.config_map(
        ha::OPERATOR_NAMESPACE,
        &other,
        json!({"E01trace": script}),
        None,
    )?;
    case.service(ha::SERVICE_NAMESPACE, vip, json!({"configMap": other}), 5)?;
    let said = case.status_says(ha::SERVICE_NAMESPACE, "spec.hooks.source.configMap")?;
    case.nothing_runs(vip)?;
    case.finish(&[vip])?;
    Ok(format!(
        "operator refused: {}; no address, no hook for {} s",
        clip(&said),
        WATCH.as_secs()
    ))
}

/// Whether the case's service in `namespace` is Active with `vip` on
/// exactly its active node.
fn active(case: &HookCase, namespace: &str, vip: &str) -> Option<u8> {
    let status = case.status(namespace);
    let node = status["activeNode"].as_str().and_then(nodes::node_index)?;
    (status["phase"] == "Active" && ha::vip_holders(vip) == [node]).then_some(node)
}

fn configmap_same_name_two_namespaces(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-hooks-cm-same-name";
    let cm = "hostile-hooks-scripts";
    let (vip_a, vip_b) = ("198.18.6.4", "198.18.6.5");
    let mut case = HookCase::new(
        lab,
        name,
        &[1],
        json!([
            grant_own(ha::SERVICE_NAMESPACE, &[cm]),
            grant_own(OTHER_NAMESPACE, &[cm]),
        ]),
    )?;
    for ns in [ha::SERVICE_NAMESPACE, OTHER_NAMESPACE] {
        let script = case.trace_script(&format!("cm-of-{ns}"));
        case.config_map(ns, cm, json!({"E01trace": script}), None)?;
        case.let_agents_read(ns, cm)?;
    }
    case.service(ha::SERVICE_NAMESPACE, vip_a, json!({"configMap": cm}), 5)?;
    case.service(OTHER_NAMESPACE, vip_b, json!({"configMap": cm}), 5)?;
    let both = ha::wait_every(SHOWS_WITHIN, Duration::from_millis(250), || {
        active(&case, ha::SERVICE_NAMESPACE, vip_a).is_some()
            && active(&case, OTHER_NAMESPACE, vip_b).is_some()
    });
    let ran = case.ran();
    if both.is_none() {
        bail!(
            "not both Active: {} / {}; trace {ran:?}",
            case.status(ha::SERVICE_NAMESPACE),
            case.status(OTHER_NAMESPACE)
        );
    }
    for ns in [ha::SERVICE_NAMESPACE, OTHER_NAMESPACE] {
        let own = format!("cm-of-{ns} E01trace enter master node=node-1 service={ns}/{name}");
        if !ran.lines().any(|l| l == own) {
            bail!("{ns}/{name} did not run its own namespace's script: trace {ran:?}");
        }
    }
    let crossed = ran
        .lines()
        .filter(|l| {
            let (label, service) = (
                l.split(' ').next().unwrap_or_default(),
                l.rsplit("service=").next().unwrap_or_default(),
            );
            label.trim_start_matches("cm-of-") != service.split('/').next().unwrap_or_default()
        })
        .count();
    if crossed > 0 {
        bail!("{crossed} runs of another namespace's script: {ran:?}");
    }
    let written = lab.node_dir(1).join("run").join("hook-configmaps");
    let dirs: Vec<String> = [ha::SERVICE_NAMESPACE, OTHER_NAMESPACE]
        .iter()
        .map(|ns| written.join(ns).join(cm))
        .filter(|d| d.join("E01trace").exists())
        .map(|d| d.display().to_string())
        .collect();
    if dirs.len() != 2 {
        bail!(
            "expected one directory per namespace/name under {}, found {dirs:?}",
            written.display()
        );
    }
    case.finish(&[vip_a, vip_b])?;
    Ok(format!(
        "both Active; each ran its own namespace's {cm} ({} runs in all, none crossed), written to {}",
        ran.lines().count(),
        dirs.join(" and ")
    ))
}

/// `message` from a little before `text` on, cut for a table cell.
fn around(message: &str, text: &str) -> String {
    let at = message.find(text).unwrap_or(0);
    let from = message
        .char_indices()
        .map(|(i, _)| i)
        .filter(|i| *i <= at)
        .rev()
        .nth(60)
        .unwrap_or(0);
    let prefix = if from > 0 { "..." } else { "" };
    format!("{prefix}{}", clip(message.get(from..).unwrap_or(message)))
}

/// A single-member case whose enter must be refused: applies the
/// service with `source`, waits for the HookFailed Event naming `texts`,
/// and checks that no script ran and no address is left.
fn refused_enter(
    case: HookCase,
    vip: &str,
    source: Value,
    texts: &[&str],
) -> anyhow::Result<String> {
    case.service(ha::SERVICE_NAMESPACE, vip, source, 5)?;
    let said = case.event_says(
        ha::SERVICE_NAMESPACE,
        &["HookFailed", "AssignmentRefused"],
        texts,
    )?;
    case.nothing_left(vip)?;
    case.finish(&[vip])?;
    Ok(format!(
        "{}; no script ran, no address left",
        around(&said, texts.first().copied().unwrap_or_default())
    ))
}

/// A ConfigMap source the enter must refuse.
struct RefusedConfigMap {
    /// The case's (cluster, service and ConfigMap) name.
    name: &'static str,
    vip: &'static str,
    /// Granted in the service's own namespace (`ownConfigMaps`, and the
    /// ConfigMap is there), else in the operator's (`configMaps`).
    own: bool,
    /// Its data and binaryData.
    content: fn(&HookCase) -> (Value, Option<Value>),
    /// What the refusal must name.
    texts: &'static [&'static str],
}

/// Runs a [`RefusedConfigMap`]: the enter is refused naming its texts, no
/// script runs, no address is left.
fn configmap_refused(ctx: &Ctx, c: &RefusedConfigMap) -> anyhow::Result<String> {
    let (entry, namespace) = if c.own {
        (
            grant_own(ha::SERVICE_NAMESPACE, &[c.name]),
            ha::SERVICE_NAMESPACE,
        )
    } else {
        (
            grant(ha::SERVICE_NAMESPACE, &[], &[c.name]),
            ha::OPERATOR_NAMESPACE,
        )
    };
    let mut case = HookCase::on_node_1(ctx.lab, c.name, entry)?;
    let (data, binary) = (c.content)(&case);
    case.config_map(namespace, c.name, data, binary)?;
    refused_enter(case, c.vip, json!({"configMap": c.name}), c.texts)
}

fn configmap_binary_data(ctx: &Ctx) -> anyhow::Result<String> {
    configmap_refused(
        ctx,
        &RefusedConfigMap {
            name: "hostile-hooks-cm-binary",
            vip: "198.18.6.6",
            own: false,
            content: |case| {
                let data = json!({"E01trace": case.trace_script("binary")});
                (data, Some(json!({"E02blob": "f0VMRgIBAQA="})))
            },
            texts: &["binaryData", "E02blob"],
        },
    )
}

fn configmap_1mb_script(ctx: &Ctx) -> anyhow::Result<String> {
    configmap_refused(
        ctx,
        &RefusedConfigMap {
            name: "hostile-hooks-cm-1mb",
            vip: "198.18.6.7",
            own: false,
            content: |case| {
                let big = format!("{}\n{}", case.trace_script("big"), "#".repeat(1_000_000));
                (json!({ "E01big": big }), None)
            },
            texts: &["E01big", "bytes, more than"],
        },
    )
}

fn configmap_fetch_fails(ctx: &Ctx) -> anyhow::Result<String> {
    // In the service's namespace, which the lab's agents may not read.
    configmap_refused(
        ctx,
        &RefusedConfigMap {
            name: "hostile-hooks-cm-unreadable",
            vip: "198.18.6.8",
            own: true,
            content: |case| (json!({"E01trace": case.trace_script("unreadable")}), None),
            texts: &["could not be fetched", "runs nothing"],
        },
    )
}

fn output_gigabytes(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-hooks-loud";
    let vip = "198.18.6.9";
    let mut case = HookCase::on_node_1(lab, name, grant(ha::SERVICE_NAMESPACE, &[name], &[]))?;
    let loud = format!(
        "#!/bin/sh\nhead -c 2000000000 /dev/zero\necho; echo printed-2GB\necho done >> '{}'\n",
        case.trace.display()
    );
    case.hook_dir(name, &[("E01loud", &loud)])?;
    let free_before = free_bytes(lab.dir());
    let started = Instant::now();
    case.service(ha::SERVICE_NAMESPACE, vip, json!({"hostPath": name}), 120)?;
    if ha::wait_every(Duration::from_secs(150), Duration::from_millis(500), || {
        active(&case, ha::SERVICE_NAMESPACE, vip).is_some()
    })
    .is_none()
    {
        bail!(
            "not Active within 150 s: {}",
            case.status(ha::SERVICE_NAMESPACE)
        );
    }
    let took = started.elapsed();
    let log = lab
        .node_dir(1)
        .join("logs")
        .join(format!("{}_{name}", ha::SERVICE_NAMESPACE))
        .join("E01loud.log");
    let size = std::fs::metadata(&log)
        .with_context(|| format!("no hook log {}", log.display()))?
        .len();
    let entry = ha::node_entry(lab, name, 1);
    let note = entry["hooks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|h| h["outputTail"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| l.as_str().map(str::to_owned))
        .find(|l| l.contains("past the log cap"))
        .with_context(|| format!("no cap note in the status entry {entry}"))?;
    let free_after = free_bytes(lab.dir());
    case.finish(&[vip])?;
    if size > 1024 * 1024 + 4096 {
        bail!("the hook log is {size} bytes, over the 1 MiB cap");
    }
    Ok(format!(
        "Active after {:.1} s; log {size} bytes; {note}; free disk {} MB before, {} MB after",
        took.as_secs_f64(),
        free_before / 1_000_000,
        free_after / 1_000_000
    ))
}

/// Free bytes of the file system holding `path` (0 when unknown).
fn free_bytes(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X') | None
        )
    })
}

/// The pid written to `path`, once it is there (10 s).
fn pid_in(path: &Path) -> anyhow::Result<i32> {
    let mut pid = None;
    ha::wait_every(Duration::from_secs(10), Duration::from_millis(100), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.with_context(|| format!("no pid in {}", path.display()))
}

fn fork_and_daemonize_past_timeout(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-hooks-daemonize";
    let vip = "198.18.6.10";
    let mut case = HookCase::on_node_1(lab, name, grant(ha::SERVICE_NAMESPACE, &[name], &[]))?;
    let (child_pid, daemon_pid) = (
        lab.dir().join(format!("{name}.child")),
        lab.dir().join(format!("{name}.daemon")),
    );
    for f in [&child_pid, &daemon_pid] {
        let _ = std::fs::remove_file(f);
    }
    let enter = format!(
        "#!/bin/sh\nsleep 1000 &\necho $! > '{c}'\nsetsid sh -c 'echo $$ > \"{d}\"; exec sleep 1001' < /dev/null > /dev/null 2>&1 &\nsleep 1002\n",
        c = child_pid.display(),
        d = daemon_pid.display()
    );
    let leave = format!(
        "#!/bin/sh\n[ -s '{d}' ] && kill $(cat '{d}') 2>/dev/null\nexit 0\n",
        d = daemon_pid.display()
    );
    case.hook_dir(name, &[("E01daemonize", &enter), ("L01stop", &leave)])?;
    case.service(ha::SERVICE_NAMESPACE, vip, json!({"hostPath": name}), 3)?;
    let (child, daemon) = (pid_in(&child_pid)?, pid_in(&daemon_pid)?);
    let said = case.event_says(
        ha::SERVICE_NAMESPACE,
        &["HookFailed"],
        &["E01daemonize", "TimedOut"],
    )?;
    let child_gone = ha::wait_until(Duration::from_secs(10), || !alive(child));
    let daemon_gone = ha::wait_until(Duration::from_secs(15), || !alive(daemon));
    case.nothing_left(vip)?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    );
    for f in [&child_pid, &daemon_pid] {
        let _ = std::fs::remove_file(f);
    }
    case.finish(&[vip])?;
    if child_gone.is_none() {
        bail!("the child in the hook's process group (pid {child}) outlived the timeout");
    }
    if daemon_gone.is_none() {
        bail!("the setsid daemon (pid {daemon}) outlived the leave hook");
    }
    Ok(format!(
        "{}; child {child} in the hook's group killed at the timeout; setsid daemon {daemon} (outside the group) stopped by L01stop, the leave the failed enter runs, within {:.1} s of the Event",
        clip(&said),
        daemon_gone.unwrap_or_default().as_secs_f64()
    ))
}

fn uninterruptible_sleep(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-hooks-frozen";
    let vip = "198.18.6.11";
    let freezer = PathBuf::from("/sys/fs/cgroup/freezer").join(name);
    if !freezer.parent().is_some_and(Path::exists) {
        bail!("no cgroup v1 freezer on this machine to hold a process in uninterruptible sleep");
    }
    let mut case = HookCase::on_node_1(lab, name, grant(ha::SERVICE_NAMESPACE, &[name], &[]))?;
    let pid_file = lab.dir().join(format!("{name}.pid"));
    let _ = std::fs::remove_file(&pid_file);
    // Joins a freezer cgroup of its own and freezes it: the process sleeps
    // uninterruptibly, and SIGKILL stays pending until it is thawed.
    let enter = format!(
        "#!/bin/sh\nmkdir -p '{f}'\necho $$ > '{p}'\necho $$ > '{f}/cgroup.procs'\necho FROZEN > '{f}/freezer.state'\nsleep 1\n",
        f = freezer.display(),
        p = pid_file.display()
    );
    case.hook_dir(name, &[("E01freeze", &enter)])?;
    case.service(ha::SERVICE_NAMESPACE, vip, json!({"hostPath": name}), 3)?;
    let thaw = || {
        let _ = std::fs::write(freezer.join("freezer.state"), "THAWED");
    };
    let result = (|| {
        let pid = pid_in(&pid_file)?;
        let said = case.event_says(
            ha::SERVICE_NAMESPACE,
            &["HookFailed"],
            &["E01freeze", "TimedOut", "still alive after SIGKILL"],
        )?;
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The agent goes on: its heartbeat stays Alive for 5 s more while
        // the hook is still frozen.
        let steady = ha::wait_every(Duration::from_secs(5), Duration::from_millis(250), || {
            !ha::members_ready(lab, name, 1)
        });
        if steady.is_some() {
            bail!("node-1 stopped heartbeating while its hook was frozen");
        }
        if !alive(pid) {
            bail!(
                "the frozen hook {pid} is gone before the thaw: not a test of uninterruptible sleep"
            );
        }
        thaw();
        if ha::wait_until(Duration::from_secs(10), || !alive(pid)).is_none() {
            bail!("the hook {pid} outlived its thaw");
        }
        Ok(format!(
            "{}; process {pid} state {:?} outlived SIGKILL while frozen, node-1 kept heartbeating, ended once thawed",
            clip(&said),
            state
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
                .unwrap_or('?')
        ))
    })();
    thaw();
    let _ = std::fs::remove_file(&pid_file);
    let outcome = result?;
    case.finish(&[vip])?;
    let _ = std::fs::remove_dir(&freezer);
    Ok(outcome)
}

fn world_writable_directory(ctx: &Ctx) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let lab = ctx.lab;
    let name = "hostile-hooks-world-writable";
    let mut case = HookCase::on_node_1(lab, name, grant(ha::SERVICE_NAMESPACE, &[name], &[]))?;
    let script = case.trace_script("writable");
    case.hook_dir(name, &[("E01trace", &script)])?;
    std::fs::set_permissions(
        ha::hook_root(lab, 1).join(name),
        std::fs::Permissions::from_mode(0o777),
    )?;
    refused_enter(
        case,
        "198.18.6.12",
        json!({"hostPath": name}),
        &["hook script refused", "writable by others", "chmod g-w,o-w"],
    )
}

fn symlink_out_of_the_root(ctx: &Ctx) -> anyhow::Result<String> {
    let lab = ctx.lab;
    let name = "hostile-hooks-symlink-out";
    let mut case = HookCase::on_node_1(lab, name, grant(ha::SERVICE_NAMESPACE, &[name], &[]))?;
    // A root-owned, safe script outside the hook root, linked from inside.
    let outside = lab.dir().join(format!("{name}-outside"));
    ha::write_scripts(&outside, &[("E01trace", &case.trace_script("outside"))])?;
    case.hook_dir(name, &[])?;
    std::os::unix::fs::symlink(
        outside.join("E01trace"),
        ha::hook_root(lab, 1).join(name).join("E01trace"),
    )?;
    let result = refused_enter(
        case,
        "198.18.6.13",
        json!({"hostPath": name}),
        &["leads out of the hook root"],
    );
    let _ = std::fs::remove_dir_all(&outside);
    result
}
