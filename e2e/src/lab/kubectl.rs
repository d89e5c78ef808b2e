//! The lab's kubectl and the `kubectl ha` plugin, pointed at the lab as its
//! admin.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, bail};

use super::Lab;
use crate::deps::Binaries;

impl Lab {
    /// A `kubectl` command (the lab's own build) pointed at the lab.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(Binaries::cached().kubectl);
        cmd.env("KUBECONFIG", self.kubeconfig())
            .env("KUBECACHEDIR", self.kube_cache_dir())
            .current_dir(&self.root);
        cmd
    }

    /// kubectl's discovery and HTTP cache for this lab, `.lab/kube-cache`.
    /// It goes with the lab: the shared `~/.kube/cache` keeps what an
    /// earlier lab at the same address served, and `kubectl explain` was
    /// seen to fail on a fresh lab because of it.
    pub fn kube_cache_dir(&self) -> PathBuf {
        self.dir.join("kube-cache")
    }

    /// Runs kubectl with `args` and returns its output, whatever its exit code.
    pub fn kubectl_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.kubectl()
            .args(args)
            .output()
            .context("running the lab's kubectl")
    }

    /// Runs kubectl with `args`, fails with its stderr unless it succeeds,
    /// and returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl_output(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Lab::kubectl_ok`] with `-o json` appended, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.kubectl_ok(&all)?;
        serde_json::from_str(&text).with_context(|| format!("parsing kubectl {}", all.join(" ")))
    }

    /// The `kubectl ha` plugin binary: `$KUBECTL_HA_BIN`, else
    /// `<profile>/kubectl-ha` (the lab's [`Profile`](super::Profile)) under
    /// the target folder.
    pub fn kubectl_ha_binary(&self) -> anyhow::Result<PathBuf> {
        self.workspace_binary("kubectl-ha", "KUBECTL_HA_BIN")
    }

    /// The `kubectl ha` plugin pointed at the lab as its admin.
    pub fn kubectl_ha(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(self.kubectl_ha_binary()?);
        cmd.env("KUBECONFIG", self.kubeconfig())
            .current_dir(&self.root);
        Ok(cmd)
    }

    /// Runs `kubectl ha ARGS`; fails with its output unless it succeeds.
    pub fn kubectl_ha_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        stdout_if_ok("kubectl ha", args, self.kubectl_ha()?.args(args).output()?)
    }

    /// Runs the lab's helm (`.lab/bin/helm`) with `args` in the checkout,
    /// pointed at the lab as its admin; fails with its output unless it
    /// succeeds.
    pub fn helm_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.dir.join("bin").join("helm"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .current_dir(&self.root)
            .output()
            .context("running the lab's helm")?;
        stdout_if_ok("helm", args, out)
    }
}

/// The stdout of `program args` that ended as `out`, or an error with all
/// it printed.
fn stdout_if_ok(program: &str, args: &[&str], out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
