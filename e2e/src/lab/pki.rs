//! The lab's certificates (made with openssl: a CA, the API server's and
//! the admin's, the service-account signing keys) and the admin kubeconfig.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use super::{Lab, Ports, s};
use crate::nodes::HOST_IP;

impl Lab {
    pub(super) fn pki(&self, name: &str) -> PathBuf {
        self.dir.join("pki").join(name)
    }

    pub(super) fn write_pki(&self) -> anyhow::Result<()> {
        let fresh = !self.pki("admin.crt").exists();
        if fresh {
            self.write_ca_and_admin()?;
        }
        // A lab folder from before the segment has a certificate without the
        // bridge address: sign a new one.
        let san = format!("IP:{HOST_IP},");
        let current = fs::read_to_string(self.pki("apiserver.ext")).is_ok_and(|e| e.contains(&san));
        if fresh || !current {
            self.sign(
                "apiserver",
                "/CN=kube-apiserver",
                &format!(
                    "subjectAltName={san}IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
                ),
            )?;
        }
        // The API server's client certificate towards the kubelets (logs,
        // exec); a lab folder from before the kubelet lab lacks it.
        if !self.pki("apiserver-kubelet-client.crt").exists() {
            self.sign(
                "apiserver-kubelet-client",
                "/O=system:masters/CN=kube-apiserver-kubelet-client",
                "extendedKeyUsage=clientAuth\n",
            )?;
        }
        Ok(())
    }

    /// The kubelet lab's credentials, each its own as in a real cluster:
    /// kube-controller-manager, kube-scheduler and kube-proxy under the
    /// users the API server's bootstrap RBAC names, and one client
    /// certificate per node (`system:node:NAME` in group `system:nodes`),
    /// which the Node authorizer and NodeRestriction confine to that node.
    /// Each with a kubeconfig in `.lab/kubelet/NAME.kubeconfig`. Made once.
    pub(super) fn write_kubelet_pki(&self, nodes: u8, ports: &Ports) -> anyhow::Result<()> {
        let mut users: Vec<(String, String)> =
            ["kube-controller-manager", "kube-scheduler", "kube-proxy"]
                .iter()
                .map(|name| (name.to_string(), format!("/CN=system:{name}")))
                .collect();
        for i in 1..=nodes {
            let node = crate::nodes::node_name(i);
            users.push((
                node.clone(),
                format!("/O=system:nodes/CN=system:node:{node}"),
            ));
        }
        for (name, subject) in users {
            if !self.pki(&format!("{name}.crt")).exists() {
                self.sign(&name, &subject, "extendedKeyUsage=clientAuth\n")?;
            }
            let config = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
                 users:\n- name: {name}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
                 contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: {name}\ncurrent-context: kubeha-lab\n",
                url = ports.apiserver_url(),
                ca = self.pki("ca.crt").display(),
                crt = self.pki(&format!("{name}.crt")).display(),
                key = self.pki(&format!("{name}.key")).display(),
            );
            fs::write(self.kubelet_kubeconfig(&name), config)?;
        }
        Ok(())
    }

    fn write_ca_and_admin(&self) -> anyhow::Result<()> {
        let ca_key = self.pki("ca.key");
        let ca_crt = self.pki("ca.crt");
        openssl(&["genrsa", "-out", s(&ca_key), "2048"])?;
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            s(&ca_key),
            "-out",
            s(&ca_crt),
            "-days",
            "365",
            "-subj",
            "/CN=kubeha-lab-ca",
        ])?;
        self.sign(
            "admin",
            "/O=system:masters/CN=kubeha-lab-admin",
            "extendedKeyUsage=clientAuth\n",
        )?;
        openssl(&["genrsa", "-out", s(&self.pki("sa.key")), "2048"])?;
        openssl(&[
            "rsa",
            "-in",
            s(&self.pki("sa.key")),
            "-pubout",
            "-out",
            s(&self.pki("sa.pub")),
        ])?;
        Ok(())
    }

    /// A key and a certificate signed by the lab CA.
    fn sign(&self, name: &str, subject: &str, extensions: &str) -> anyhow::Result<()> {
        let key = self.pki(&format!("{name}.key"));
        let csr = self.pki(&format!("{name}.csr"));
        let crt = self.pki(&format!("{name}.crt"));
        let ext = self.pki(&format!("{name}.ext"));
        fs::write(&ext, extensions)?;
        openssl(&["genrsa", "-out", s(&key), "2048"])?;
        openssl(&[
            "req",
            "-new",
            "-key",
            s(&key),
            "-out",
            s(&csr),
            "-subj",
            subject,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&self.pki("ca.crt")),
            "-CAkey",
            s(&self.pki("ca.key")),
            "-CAcreateserial",
            "-out",
            s(&crt),
            "-days",
            "365",
            "-extfile",
            s(&ext),
        ])?;
        Ok(())
    }

    pub(super) fn write_kubeconfig(&self, ports: &Ports) -> anyhow::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kubeha-lab\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\n\
             users:\n- name: kubeha-lab-admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
             contexts:\n- name: kubeha-lab\n  context:\n    cluster: kubeha-lab\n    user: kubeha-lab-admin\ncurrent-context: kubeha-lab\n",
            url = ports.apiserver_url(),
            ca = self.pki("ca.crt").display(),
            crt = self.pki("admin.crt").display(),
            key = self.pki("admin.key").display(),
        );
        fs::write(self.kubeconfig(), config)?;
        Ok(())
    }
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").args(args).output().context(
        "running openssl (the lab makes its certificates with it; install it with `apt-get install openssl`)",
    )?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
