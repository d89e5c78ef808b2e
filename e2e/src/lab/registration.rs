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
        let objects = dir.join("objects.json");
        fs::write(
            &objects,
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
            s(&objects),
        ])?;
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
        // gives it, and its API priority level for the Leases.
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
        for i in 1..=count {
            let node_dir = self.node_dir(i);
            for sub in ["hooks", "logs", "run"] {
                fs::create_dir_all(node_dir.join(sub))?;
            }
            // A fresh token on every `up`: valid whatever happened since
            // (signing key or service account recreated).
            let token = self.kubectl_ok(&[
                "create",
                "token",
                AGENT_SERVICE_ACCOUNT,
                "-n",
                SYSTEM_NAMESPACE,
                &format!("--duration={NODE_TOKEN_DURATION}"),
            ])?;
            let token = token.trim();
            if token.is_empty() || token.contains(char::is_whitespace) {
                bail!(
                    "kubectl create token returned no usable token for {}",
                    nodes::node_name(i)
                );
            }
            let user = format!("{AGENT_SERVICE_ACCOUNT}-{}", nodes::node_name(i));
            let config = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
                 users:\n- name: {user}\n  user:\n    token: {token}\n\
                 contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: {user}\n    namespace: {SYSTEM_NAMESPACE}\n\
                 current-context: kubeha-lab\n",
                url = ports.apiserver_url(),
                ca = self.pki("ca.crt").display(),
            );
            write_private(&self.node_kubeconfig(i), &config)?;
        }
        Ok(())
    }
}
