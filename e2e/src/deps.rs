//! The lab's binaries: kube-apiserver and kubectl from the `k8s.io/kubernetes`
//! Go module, etcd from `go.etcd.io/etcd/server/v3`, and helm. Built once with
//! the machine's Go toolchain and cached outside the repository, keyed by
//! version, so a second `lab up` starts in seconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

/// Version of `k8s.io/kubernetes` (kube-apiserver, kubectl). Must match the
/// `require` in `e2e/go/kubernetes/go.mod`.
pub const KUBERNETES_VERSION: &str = "v1.34.4";
/// Version of `go.etcd.io/etcd/server/v3`. Must match `e2e/go/etcd/go.mod`.
pub const ETCD_VERSION: &str = "v3.6.16";
/// Version of `helm.sh/helm/v3`.
pub const HELM_VERSION: &str = "v3.19.0";

/// Paths of the built binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// etcd server.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kubectl built from the same Kubernetes version.
    pub kubectl: PathBuf,
    /// helm.
    pub helm: PathBuf,
}

/// Where built binaries are cached: `$KUBEHA_LAB_CACHE`, else
/// `$XDG_CACHE_HOME/kubeha/lab`, else `~/.cache/kubeha/lab`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KUBEHA_LAB_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("kubeha").join("lab")
}

impl Binaries {
    /// The cached paths, whether or not they exist yet.
    pub fn cached() -> Self {
        let cache = cache_dir();
        let k8s = cache.join(format!("kubernetes-{KUBERNETES_VERSION}"));
        Self {
            etcd: cache.join(format!("etcd-{ETCD_VERSION}")).join("etcd"),
            kube_apiserver: k8s.join("kube-apiserver"),
            kubectl: k8s.join("kubectl"),
            helm: cache.join(format!("helm-{HELM_VERSION}")).join("helm"),
        }
    }

    /// Builds whatever is missing from the cache; returns the paths.
    pub fn ensure(repo_root: &Path) -> anyhow::Result<Self> {
        let bins = Self::cached();
        let go_dir = repo_root.join("e2e").join("go");
        if !bins.etcd.exists() {
            go_build(
                &go_dir.join("etcd"),
                &["go.etcd.io/etcd/server/v3"],
                &bins.etcd,
                "etcd",
            )?;
        }
        if !bins.kube_apiserver.exists() || !bins.kubectl.exists() {
            go_build(
                &go_dir.join("kubernetes"),
                &[
                    &format!("-ldflags={}", kubernetes_version_ldflags()),
                    "k8s.io/kubernetes/cmd/kube-apiserver",
                    "k8s.io/kubernetes/cmd/kubectl",
                ],
                &bins.kube_apiserver,
                "kube-apiserver and kubectl",
            )?;
        }
        if !bins.helm.exists() {
            go_install(
                &format!("helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"),
                &bins.helm,
                "helm",
            )?;
        }
        Ok(bins)
    }
}

/// Stamps the version into the binaries as the Kubernetes release build does,
/// so clients (kubectl, helm) can parse the server version.
fn kubernetes_version_ldflags() -> String {
    let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or("0");
    ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"]
        .iter()
        .map(|pkg| {
            format!(
                "-X {pkg}.gitVersion={KUBERNETES_VERSION} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} \
                 -X {pkg}.gitTreeState=clean -X {pkg}.buildDate=1970-01-01T00:00:00Z"
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn require_go() -> anyhow::Result<()> {
    match Command::new("go").arg("version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => bail!(
            "the lab builds kube-apiserver, kubectl, etcd and helm with Go, and `go` is not on PATH; \
             install Go 1.24 or newer (e.g. `apt-get install golang-go`) and run again"
        ),
    }
}

/// `go build` of `packages` (flags may lead) in the consumer module `module_dir`, into the
/// folder of `first_output`.
fn go_build(
    module_dir: &Path,
    packages: &[&str],
    first_output: &Path,
    what: &str,
) -> anyhow::Result<()> {
    build_cached(first_output, what, |tmp| {
        let mut cmd = Command::new("go");
        cmd.current_dir(module_dir)
            .args(["build", "-trimpath", "-o"])
            .arg(format!("{}/", tmp.display()))
            .args(packages);
        cmd
    })
}

/// `go install package@version` into the folder of `output`.
fn go_install(package: &str, output: &Path, what: &str) -> anyhow::Result<()> {
    build_cached(output, what, |tmp| {
        let mut cmd = Command::new("go");
        cmd.current_dir(tmp)
            .env("GOBIN", tmp)
            .args(["install", "-trimpath", package]);
        cmd
    })
}

/// Runs the Go command `build` makes for a temporary folder, then renames
/// that folder to the cache entry holding `output`, so a killed build never
/// leaves a half-written entry.
fn build_cached(
    output: &Path,
    what: &str,
    build: impl FnOnce(&Path) -> Command,
) -> anyhow::Result<()> {
    require_go()?;
    let out_dir = output.parent().expect("cached binaries live in a folder");
    let tmp = out_dir.with_extension("building");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    eprintln!("lab: building {what} with Go (first run only, minutes on 2 cores)...");
    let started = Instant::now();
    let status = build(&tmp)
        .status()
        .with_context(|| format!("running go for {what}"))?;
    if !status.success() {
        bail!("building {what} with Go failed ({status}); see the output above");
    }
    let _ = std::fs::remove_dir_all(out_dir);
    std::fs::rename(&tmp, out_dir)?;
    eprintln!(
        "lab: built {what} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
