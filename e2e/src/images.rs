//! The container images, `kubeha/kubeha-operator` and `kubeha/kubeha-agent`,
//! built without Docker into OCI archives (`cargo xtask images`; the lab
//! imports them into its nodes' containerd).
//!
//! The images are the Dockerfiles in `images/`, built by buildah with the
//! `vfs` storage driver and `chroot` isolation (no daemon, no overlay
//! mounts, no user namespaces). Their `build` stage, which compiles in a
//! Rust image, is not run here: the binaries are release builds on this
//! host, `images/rootfs.sh` assembles the root file system from them and
//! the host's libraries (and `nft`, `busybox` for the agent), and buildah
//! gets that folder as the `build` stage (`--build-context build=DIR`), so
//! only the images' last stage runs, the same one a Docker build ends with.
//! The images are tagged with the chart's `appVersion`, the chart's default
//! tag, and built with `--timestamp 0`, so the same binaries give the same
//! digest.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::nodes;

/// The images: each is `images/<component>.Dockerfile`, holding the binary
/// `kubeha-<component>`, and is called `kubeha/kubeha-<component>`.
pub const COMPONENTS: [&str; 2] = ["operator", "agent"];

/// The repository of a component's image, the chart's default
/// `<component>.image.repository`.
pub fn repository(component: &str) -> String {
    format!("kubeha/kubeha-{component}")
}

/// The images' tag: the chart's `appVersion` (charts/kubeha/Chart.yaml).
pub fn tag(root: &Path) -> anyhow::Result<String> {
    let path = root.join("charts/kubeha/Chart.yaml");
    let chart =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{} has no appVersion", path.display()))
}

/// One image written to an OCI archive.
#[derive(Debug, Clone)]
pub struct Built {
    /// `kubeha/kubeha-<component>:<tag>`, also the archive's reference name.
    pub reference: String,
    /// The `oci-archive` file.
    pub archive: PathBuf,
    /// Size of the archive (the compressed layer, config and manifest).
    pub bytes: u64,
    /// Size of the image's root file system, uncompressed.
    pub rootfs_bytes: u64,
    /// Digest of the image manifest (`sha256:…`): what `repo@digest` pins.
    pub digest: String,
}

/// Programs the build needs and the Debian package of each, installed with
/// apt-get when missing.
const TOOLS: [(&str, &str); 3] = [
    ("buildah", "buildah"),
    ("nft", "nftables"),
    ("busybox", "busybox-static"),
];

/// Installs the Debian packages of the [`TOOLS`] not on `PATH` (or in
/// /usr/sbin, which a non-login root shell may lack on its `PATH`).
pub fn ensure_tools() -> anyhow::Result<()> {
    let found = |program: &str| {
        let mut path = std::env::var_os("PATH").unwrap_or_default();
        path.push(":/usr/sbin:/sbin");
        nodes::find_on_path(program, Some(&path)).is_some()
    };
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| !found(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        eprintln!("apt-get {}", args.join(" "));
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = [&["install", "-y", "--no-install-recommends"], &missing[..]].concat();
    if !(apt(&install) || (apt(&["update"]) && apt(&install))) {
        bail!(
            "building the images needs {} and `apt-get {}` failed; install them by hand",
            missing.join(", "),
            install.join(" ")
        );
    }
    Ok(())
}

/// Runs `cmd`, failing with its stderr when it fails; returns its stdout.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Total size of the regular files under `dir` (symlinks not followed).
fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Cargo's target folder: `CARGO_TARGET_DIR` (relative to `root`) when set,
/// else `root/target`.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |d| root.join(d))
}

/// Release-builds the binaries and builds every image of [`COMPONENTS`]
/// into `out/kubeha-<component>.tar` (`oci-archive`). Needs root (buildah's
/// chroot isolation); installs buildah, nftables and busybox-static with
/// apt-get when missing.
pub fn build(root: &Path, out: &Path) -> anyhow::Result<Vec<Built>> {
    ensure_tools()?;
    let tag = tag(root)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cargo = Command::new(cargo);
    cargo.args(["build", "--release", "--locked", "--bins"]);
    for component in COMPONENTS {
        cargo.args(["-p", &format!("kubeha-{component}")]);
    }
    let status = cargo
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release of the binaries failed");
    }

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // buildah's own store for these builds, removed at the end: the images
    // live on in the archives only.
    let work = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(out)
        .context("creating the build folder")?;
    let store = work.path().join("store");
    let buildah = |args: &[&str]| {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .current_dir(root);
        cmd
    };
    // The images' main build context: empty, as the last stages copy only
    // from the `build` stage.
    let empty = work.path().join("empty");
    std::fs::create_dir_all(&empty)?;

    let mut built = Vec::new();
    for component in COMPONENTS {
        let stage = work.path().join(component);
        let rootfs = stage.join("rootfs");
        run(Command::new("sh")
            .arg(root.join("images/rootfs.sh"))
            .arg(&rootfs)
            .arg(component)
            .arg(target_dir(root).join("release"))
            .current_dir(root))?;
        let reference = format!("{}:{tag}", repository(component));
        let dockerfile = root.join(format!("images/{component}.Dockerfile"));
        run(&mut buildah(&[
            "bud",
            "--isolation",
            "chroot",
            "--timestamp",
            "0",
            "--quiet",
            "--build-context",
            &format!("build={}", stage.display()),
            "--file",
            &dockerfile.to_string_lossy(),
            "--tag",
            &reference,
            &empty.to_string_lossy(),
        ]))?;
        let archive = out.join(format!("kubeha-{component}.tar"));
        let digest_file = work.path().join(format!("{component}.digest"));
        // buildah refuses to push over an existing archive.
        let _ = std::fs::remove_file(&archive);
        run(&mut buildah(&[
            "push",
            "--quiet",
            "--digestfile",
            &digest_file.to_string_lossy(),
            &reference,
            &format!("oci-archive:{}:{reference}", archive.display()),
        ]))?;
        let digest = std::fs::read_to_string(&digest_file)
            .with_context(|| format!("reading {}", digest_file.display()))?
            .trim()
            .to_owned();
        let bytes = archive.metadata()?.len();
        built.push(Built {
            reference,
            archive,
            bytes,
            rootfs_bytes: tree_bytes(&rootfs),
            digest,
        });
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
    }

    #[test]
    fn tag_is_the_charts_app_version() {
        let chart = std::fs::read_to_string(root().join("charts/kubeha/Chart.yaml")).unwrap();
        let tag = tag(root()).unwrap();
        assert!(chart.contains(&format!("appVersion: \"{tag}\"")), "{tag}");
        assert_eq!(repository("agent"), "kubeha/kubeha-agent");
    }

    /// The chart's default images are the ones built here: the same
    /// repositories, and the tag left to the appVersion.
    #[test]
    fn the_charts_default_images_are_these() {
        let values: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(root().join("charts/kubeha/values.yaml")).unwrap(),
        )
        .unwrap();
        for component in COMPONENTS {
            let image = &values[component]["image"];
            assert_eq!(
                image["repository"].as_str(),
                Some(repository(component).as_str())
            );
            assert_eq!(image["tag"].as_str(), Some(""), "{component}");
            assert_eq!(image["digest"].as_str(), Some(""), "{component}");
            assert!(
                root()
                    .join(format!("images/{component}.Dockerfile"))
                    .is_file()
            );
        }
        assert_eq!(values["image"]["registry"].as_str(), Some(""));
    }
}
