//! The lab's nodes as the API server knows them: Node objects, the chart's
//! RBAC, a token and kubeconfig per node, and kubectl run as a node.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use super::{
    AGENT_SERVICE_ACCOUNT, Lab, NODE_LABEL, NODE_TOKEN_DURATION, Ports, SYSTEM_NAMESPACE, s,
    write_private,
};
use crate::deps::Binaries;
use crate::nodes;

impl Lab {
    /// Folder of lab node `i`: `.lab/nodes/node-i` (its kubeconfig, and the
    /// `hooks`, `logs` and `run` folders of its agent).
    pub fn node_dir(&self, i: u8) -> PathBuf {
        self.dir.join("nodes").join(nodes::node_name(i))
    }

    /// Kubeconfig of lab node `i`: its own `kubeha-agent` token, the lab CA,
    /// the API server on the bridge.
    pub fn node_kubeconfig(&self, i: u8) -> PathBuf {
        self.node_dir(i).join("kubeconfig")
    }

    /// The lab's kubectl run inside node `i`'s namespace with that node's
    /// kubeconfig: what the node's agent is allowed to do, from where it runs.
    pub fn node_kubectl(&self, i: u8) -> anyhow::Result<Command> {
        self.check_node(i)?;
        let mut cmd = nodes::exec_in(&nodes::node_ns(i), &[Binaries::cached().kubectl]);
        cmd.env("KUBECONFIG", self.node_kubeconfig(i))
            .env("KUBECACHEDIR", self.kube_cache_dir())
            .current_dir(&self.root);
        Ok(cmd)
    }

    /// Fails unless node `i` is part of the running lab (its namespace and
    /// kubeconfig exist).
    pub(super) fn check_node(&self, i: u8) -> anyhow::Result<()> {
        nodes::check_index(i)?;
        let ns = nodes::node_ns(i);
        if !nodes::ns_exists(&ns) || !self.node_kubeconfig(i).exists() {
            bail!(
                "{} is not part of the lab (no namespace {ns} or no {}); \
                 bring it up with `cargo xtask lab up --nodes {i}` or Lab::ensure_up_with_nodes({i})",
                nodes::node_name(i),
                self.node_kubeconfig(i).display()
            );
        }
        Ok(())
    }

    /// Node objects, the system namespace, the chart's RBAC and a token and
    /// folders per node.
    pub(super) fn register_nodes(
        &self,
        count: u8,
        bins: &Binaries,
        ports: &Ports,
    ) -> anyhow::Result<()> {
        let dir = self.dir.join("nodes");
        fs::create_dir_all(&dir)?;
        let mut items = vec![serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": SYSTEM_NAMESPACE },
        })];
        for i in 1..=count {
            items.push(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": nodes::node_name(i),
                    "labels": {
                        NODE_LABEL: "true",
                        "kubernetes.io/hostname": nodes::node_name(i),
                        "kubernetes.io/os": "linux",
                    },
                },
            }));
        }
        self.apply_list(&dir.join("objects.json"), items)?;
        for i in 1..=count {
            // No kubelet reports addresses here; the lab does, as a kubelet
            // would: both families' InternalIP and the hostname.
            let status = serde_json::json!({
                "status": { "addresses": [
                    { "type": "InternalIP", "address": nodes::node_ip(i)?.to_string() },
                    { "type": "InternalIP", "address": nodes::node_ip6(i)?.to_string() },
                    { "type": "Hostname", "address": nodes::node_name(i) },
                ]},
            });
            self.kubectl_ok(&[
                "patch",
                "node",
                &nodes::node_name(i),
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ])?;
        }
        // The chart's own RBAC, so an agent gets exactly what the chart
        // gives it, its API priority level for the Leases and the admission
        // policy that holds each agent to its own node.
        let chart = self.root.join("charts").join("kubeha");
        let out = Command::new(&bins.helm)
            .args([
                "template",
                "kubeha",
                s(&chart),
                "--namespace",
                SYSTEM_NAMESPACE,
            ])
            .args([
                "--set",
                "crds.install=false",
                "--show-only",
                "templates/rbac.yaml",
                "--show-only",
                "templates/flowcontrol.yaml",
                "--show-only",
                "templates/admission-policy.yaml",
            ])
            .output()
            .context("running the lab's helm")?;
        if !out.status.success() {
            bail!(
                "helm template of the chart's RBAC failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rbac = dir.join("rbac.yaml");
        fs::write(&rbac, &out.stdout)?;
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kubeha-lab",
            "-f",
            s(&rbac),
        ])?;
        // Owned as the release `kubeha` would own them, so that `helm
        // install kubeha charts/kubeha -n kubeha-system` (the kubelet lab's
        // way to run the agents as pods) adopts them instead of refusing.
        self.kubectl_ok(&[
            "annotate",
            "--overwrite",
            "-f",
            s(&rbac),
            "meta.helm.sh/release-name=kubeha",
            &format!("meta.helm.sh/release-namespace={SYSTEM_NAMESPACE}"),
        ])?;
        self.kubectl_ok(&[
            "label",
            "--overwrite",
            "-f",
            s(&rbac),
            "app.kubernetes.io/managed-by=Helm",
        ])?;
        self.apply_identity_pods(count, &dir)?;
        for i in 1..=count {
            let node_dir = self.node_dir(i);
            for sub in ["hooks", "logs", "run"] {
                fs::create_dir_all(node_dir.join(sub))?;
            }
            // A fresh token on every `up`: valid whatever happened since
            // (signing key, service account or identity Pod recreated).
            let token = self.node_bound_agent_token(i)?;
            let user = format!("{AGENT_SERVICE_ACCOUNT}-{}", nodes::node_name(i));
            write_private(
                &self.node_kubeconfig(i),
                &self.token_kubeconfig(&ports.apiserver_url(), &user, &token),
            )?;
        }
        Ok(())
    }

    /// Name of the Pod the token of lab node `i`'s agent is bound to
    /// ([`Lab::node_bound_agent_token`]), in [`SYSTEM_NAMESPACE`].
    pub fn identity_pod_name(i: u8) -> String {
        format!("{AGENT_SERVICE_ACCOUNT}-identity-{}", nodes::node_name(i))
    }

    /// One Pod of the agent's service account per node, bound to it
    /// (`spec.nodeName`): what a kubelet-run agent's token is bound to, so
    /// that the lab's agents get tokens that name their node. The
    /// host-process lab has no kubelet, so they never run; in the kubelet
    /// lab their node selector matches no node, so the kubelet refuses them
    /// (phase Failed, reason NodeAffinity) and they never run either. A Pod
    /// that exists keeps the tokens bound to it valid whatever its phase.
    fn apply_identity_pods(&self, count: u8, dir: &std::path::Path) -> anyhow::Result<()> {
        let items: Vec<_> = (1..=count)
            .map(|i| {
                serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": Self::identity_pod_name(i),
                        "namespace": SYSTEM_NAMESPACE,
                        "labels": {
                            "app.kubernetes.io/name": "kubeha-lab",
                            "app.kubernetes.io/component": "node-identity",
                        },
                    },
                    "spec": {
                        "nodeName": nodes::node_name(i),
                        "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                        "automountServiceAccountToken": false,
                        "restartPolicy": "Never",
                        "nodeSelector": { "kubeha.io/lab-identity-pod": "never-runs" },
                        "containers": [{
                            "name": "identity",
                            "image": "kubeha-lab/identity-never-runs",
                        }],
                    },
                })
            })
            .collect();
        self.apply_list(&dir.join("identity-pods.json"), items)
    }

    /// Writes `items` as a v1 List to `file` and applies it (server-side,
    /// field manager `kubeha-lab`).
    fn apply_list(
        &self,
        file: &std::path::Path,
        items: Vec<serde_json::Value>,
    ) -> anyhow::Result<()> {
        fs::write(
            file,
            serde_json::to_string_pretty(&serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": items,
            }))?,
        )?;
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=kubeha-lab",
            "-f",
            s(file),
        ])?;
        Ok(())
    }

    /// A token of the agent's service account bound to lab node `i`'s
    /// identity Pod ([`Lab::identity_pod_name`]), so the API server puts
    /// `authentication.kubernetes.io/node-name: node-i` in its user extra,
    /// as for the token the kubelet mounts into an agent pod on node-i.
    pub fn node_bound_agent_token(&self, i: u8) -> anyhow::Result<String> {
        self.service_account_token(
            AGENT_SERVICE_ACCOUNT,
            &[
                "--bound-object-kind=Pod",
                &format!("--bound-object-name={}", Self::identity_pod_name(i)),
                &format!("--duration={NODE_TOKEN_DURATION}"),
            ],
        )
    }

    /// A token of the agent's service account bound to nothing, so naming
    /// no node: what the admission policy refuses.
    pub fn unbound_agent_token(&self) -> anyhow::Result<String> {
        self.service_account_token(AGENT_SERVICE_ACCOUNT, &["--duration=10m"])
    }

    /// A token of service account `account` of [`SYSTEM_NAMESPACE`]
    /// (`kubectl create token` with `args`), checked to be one.
    pub(super) fn service_account_token(
        &self,
        account: &str,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let mut argv = vec!["create", "token", account, "-n", SYSTEM_NAMESPACE];
        argv.extend_from_slice(args);
        let out = self.kubectl_ok(&argv)?;
        let token = out.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            bail!("kubectl {} returned no usable token", argv.join(" "));
        }
        Ok(token.to_owned())
    }
}
