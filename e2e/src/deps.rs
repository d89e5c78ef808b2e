//! The lab's binaries: kube-apiserver and kubectl (and, for the kubelet
//! lab only, kubelet, kube-proxy, kube-scheduler and
//! kube-controller-manager) from the `k8s.io/kubernetes` Go module, etcd from `go.etcd.io/etcd/server/v3`, and helm from
//! `helm.sh/helm/v3`. Each comes from a consumer module under `e2e/go/` and
//! is built with the machine's Go toolchain into an explicit output path
//! carrying the name the lab runs.
//!
//! Builds are cached outside the repository, one entry per [`Recipe`]: the
//! entry's name holds the version and a hash of everything that shapes the
//! build (the consumer module's go.mod and go.sum, packages, flags, ldflags,
//! output names, the Go version), so a changed recipe builds a new entry
//! instead of trusting an old one. Every binary is run once before its entry
//! is moved into place, and an entry missing a binary is rebuilt.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// Version of `k8s.io/kubernetes` (kube-apiserver, kubectl). Must match the
/// `require` in `e2e/go/kubernetes/go.mod`.
pub const KUBERNETES_VERSION: &str = "v1.34.4";
/// Version of `go.etcd.io/etcd/server/v3`. Must match `e2e/go/etcd/go.mod`.
pub const ETCD_VERSION: &str = "v3.6.16";
/// Version of `helm.sh/helm/v3`. Must match `e2e/go/helm/go.mod`.
pub const HELM_VERSION: &str = "v3.19.0";

/// Flags of every `go build` the lab runs (besides `-ldflags` and `-o`).
const BUILD_FLAGS: &[&str] = &["-trimpath", "-buildvcs=false"];

/// How long a freshly built binary may take to print its version.
const VERSION_CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// The file written last into a cache entry: the recipe in words.
const RECIPE_FILE: &str = "recipe.txt";

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
    if let Some(dir) = std::env::var_os("KUBEHA_LAB_CACHE").filter(|d| !d.is_empty()) {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("kubeha").join("lab")
}

/// The consumer modules, `e2e/go/`.
fn go_modules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("go")
}

/// One binary of a [`Recipe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBinary {
    /// File name in the cache entry, the name the lab runs.
    pub output: String,
    /// The Go package with the `main` function.
    pub package: String,
    /// Arguments that make the binary print its version and exit 0.
    pub version_args: Vec<String>,
}

/// How to build one cache entry: binaries from one consumer module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// Entry name prefix, e.g. `etcd`.
    pub name: String,
    /// Version of the upstream module; its printed version must contain it
    /// (without the leading `v`).
    pub version: String,
    /// The consumer module's folder (holds go.mod and go.sum).
    pub module_dir: PathBuf,
    /// `-ldflags` of every binary (may be empty).
    pub ldflags: String,
    /// What to build.
    pub binaries: Vec<GoBinary>,
}

/// Everything that shapes a build, read from disk and from `go`: what the
/// cache key hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeInputs {
    /// Contents of the consumer module's go.mod.
    pub go_mod: Vec<u8>,
    /// Contents of its go.sum.
    pub go_sum: Vec<u8>,
    /// `go env GOVERSION` in the module's folder.
    pub go_version: String,
    /// Flags of every `go build`.
    pub build_flags: Vec<String>,
}

/// Whether [`Recipe::ensure`] found the entry or built it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A complete entry for this recipe was already cached.
    Cached,
    /// The entry was built (and every binary ran) now.
    Built,
}

impl Recipe {
    /// etcd from `e2e/go/etcd`.
    pub fn etcd() -> Self {
        Self {
            name: "etcd".into(),
            version: ETCD_VERSION.into(),
            module_dir: go_modules_dir().join("etcd"),
            ldflags: String::new(),
            binaries: vec![GoBinary::new(
                "etcd",
                "go.etcd.io/etcd/server/v3",
                &["--version"],
            )],
        }
    }

    /// kube-apiserver and kubectl from `e2e/go/kubernetes`, with the version
    /// stamped in as the Kubernetes release build does, so clients (kubectl,
    /// helm) can parse the server version.
    pub fn kubernetes() -> Self {
        let minor = KUBERNETES_VERSION.split('.').nth(1).unwrap_or("0");
        let ldflags = ["k8s.io/component-base/version", "k8s.io/client-go/pkg/version"]
            .iter()
            .map(|pkg| {
                format!(
                    "-X {pkg}.gitVersion={KUBERNETES_VERSION} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} \
                     -X {pkg}.gitTreeState=clean -X {pkg}.buildDate=1970-01-01T00:00:00Z"
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            name: "kubernetes".into(),
            version: KUBERNETES_VERSION.into(),
            module_dir: go_modules_dir().join("kubernetes"),
            ldflags,
            binaries: vec![
                GoBinary::new(
                    "kube-apiserver",
                    "k8s.io/kubernetes/cmd/kube-apiserver",
                    &["--version"],
                ),
                GoBinary::new(
                    "kubectl",
                    "k8s.io/kubernetes/cmd/kubectl",
                    &["version", "--client"],
                ),
            ],
        }
    }

    /// kubelet, kube-proxy, kube-scheduler and kube-controller-manager from
    /// `e2e/go/kubernetes`, stamped as [`Recipe::kubernetes`] stamps: what
    /// the kubelet lab ([`crate::lab::Lab::up_with_kubelets`]) adds, in an
    /// entry of its own so the default lab never builds them.
    pub fn kubernetes_node() -> Self {
        let base = Self::kubernetes();
        Self {
            name: "kubernetes-node".into(),
            binaries: [
                "kubelet",
                "kube-proxy",
                "kube-scheduler",
                "kube-controller-manager",
            ]
            .iter()
            .map(|name| {
                GoBinary::new(
                    name,
                    &format!("k8s.io/kubernetes/cmd/{name}"),
                    &["--version"],
                )
            })
            .collect(),
            ..base
        }
    }

    /// helm from `e2e/go/helm`, its version stamped in as helm's Makefile does.
    pub fn helm() -> Self {
        Self {
            name: "helm".into(),
            version: HELM_VERSION.into(),
            module_dir: go_modules_dir().join("helm"),
            ldflags: format!("-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"),
            binaries: vec![GoBinary::new(
                "helm",
                "helm.sh/helm/v3/cmd/helm",
                &["version"],
            )],
        }
    }

    /// Reads go.mod and go.sum and asks `go` for the toolchain this module
    /// builds with.
    pub fn inputs(&self) -> anyhow::Result<RecipeInputs> {
        let read = |file: &str| {
            let path = self.module_dir.join(file);
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(RecipeInputs {
            go_mod: read("go.mod")?,
            go_sum: read("go.sum")?,
            go_version: go_version(&self.module_dir)?,
            build_flags: BUILD_FLAGS.iter().map(|f| f.to_string()).collect(),
        })
    }

    /// The cache key: a hash of the recipe and its inputs, 16 hex digits.
    pub fn key(&self, inputs: &RecipeInputs) -> String {
        let mut hash = Sha256::new();
        // Every part is length-prefixed, so moving bytes from one part to
        // the next changes the key too.
        let mut part = |label: &str, bytes: &[u8]| {
            hash.update(label.as_bytes());
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        part("name", self.name.as_bytes());
        part("version", self.version.as_bytes());
        part("go.mod", &inputs.go_mod);
        part("go.sum", &inputs.go_sum);
        part("go", inputs.go_version.as_bytes());
        for flag in &inputs.build_flags {
            part("flag", flag.as_bytes());
        }
        part("ldflags", self.ldflags.as_bytes());
        for bin in &self.binaries {
            part("output", bin.output.as_bytes());
            part("package", bin.package.as_bytes());
            for arg in &bin.version_args {
                part("version-arg", arg.as_bytes());
            }
        }
        hash.finalize()[..8].iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// The cache entry's folder for `key`: `NAME-VERSION-KEY`.
    pub fn entry(&self, cache: &Path, key: &str) -> PathBuf {
        cache.join(format!("{}-{}-{key}", self.name, self.version))
    }

    /// Whether `entry` holds the recipe file and every binary, executable.
    fn complete(&self, entry: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt as _;
        entry.join(RECIPE_FILE).is_file()
            && self.binaries.iter().all(|b| {
                entry
                    .join(&b.output)
                    .metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    }

    /// The cache entry for this recipe in `cache`, built (and every binary
    /// run once) when it is missing or incomplete. Holds `cache/.lock` while
    /// it looks and builds, so concurrent callers build once.
    pub fn ensure(&self, cache: &Path) -> anyhow::Result<(PathBuf, Outcome)> {
        require_go()?;
        self.ensure_with(cache, &self.inputs()?)
    }

    /// [`Recipe::ensure`] with the inputs already read.
    fn ensure_with(
        &self,
        cache: &Path,
        inputs: &RecipeInputs,
    ) -> anyhow::Result<(PathBuf, Outcome)> {
        let entry = self.entry(cache, &self.key(inputs));
        if self.complete(&entry) {
            return Ok((entry, Outcome::Cached));
        }
        std::fs::create_dir_all(cache)
            .with_context(|| format!("creating the lab's cache folder {}", cache.display()))?;
        let lock = File::create(cache.join(".lock")).context("creating the cache lock")?;
        lock.lock().context("locking the lab's cache")?;
        if self.complete(&entry) {
            return Ok((entry, Outcome::Cached));
        }
        self.build(inputs, &entry)?;
        Ok((entry, Outcome::Built))
    }

    /// Builds every binary into a temporary folder, runs each, writes the
    /// recipe file, then renames the folder to `entry`: a killed or failed
    /// build never leaves an entry behind. Older entries of this name are
    /// removed afterwards.
    fn build(&self, inputs: &RecipeInputs, entry: &Path) -> anyhow::Result<()> {
        let tmp = entry.with_extension("building");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let names: Vec<&str> = self.binaries.iter().map(|b| b.output.as_str()).collect();
        let what = names.join(" and ");
        eprintln!(
            "lab: building {what} {} with {} into {} (first run only, minutes on 2 cores)...",
            self.version,
            inputs.go_version,
            entry.display()
        );
        let started = Instant::now();
        for bin in &self.binaries {
            let out = tmp.join(&bin.output);
            let mut cmd = Command::new("go");
            cmd.current_dir(&self.module_dir)
                .arg("build")
                .args(&inputs.build_flags);
            if !self.ldflags.is_empty() {
                cmd.arg(format!("-ldflags={}", self.ldflags));
            }
            let status = cmd
                .arg("-o")
                .arg(&out)
                .arg(&bin.package)
                .status()
                .with_context(|| format!("running go build for {}", bin.output))?;
            if !status.success() {
                let _ = std::fs::remove_dir_all(&tmp);
                bail!(
                    "building {} ({}) with Go failed ({status}); see the output above",
                    bin.output,
                    bin.package
                );
            }
        }
        for bin in &self.binaries {
            if let Err(e) = self.check_binary(&tmp, bin) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
        std::fs::write(tmp.join(RECIPE_FILE), self.describe(inputs))?;
        let _ = std::fs::remove_dir_all(entry);
        std::fs::rename(&tmp, entry)
            .with_context(|| format!("moving the built {what} to {}", entry.display()))?;
        self.remove_other_entries(entry);
        eprintln!(
            "lab: built and checked {what} in {:.0} s: {}",
            started.elapsed().as_secs_f64(),
            entry.display()
        );
        Ok(())
    }

    /// Runs `bin` from `dir` with its version arguments: it must exist, exit
    /// 0 within a minute and print this recipe's version.
    fn check_binary(&self, dir: &Path, bin: &GoBinary) -> anyhow::Result<()> {
        let path = dir.join(&bin.output);
        let shown = format!("{} {}", bin.output, bin.version_args.join(" "));
        if !path.is_file() {
            bail!(
                "the build of {} ({}) produced no file named `{}` in {}",
                self.name,
                bin.package,
                bin.output,
                dir.display()
            );
        }
        let (status, output) = run_with_timeout(
            Command::new(&path).args(&bin.version_args),
            VERSION_CHECK_TIMEOUT,
        )
        .with_context(|| format!("running the freshly built `{shown}`"))?;
        let want = self.version.trim_start_matches('v');
        if !status.is_some_and(|s| s.success()) || !output.contains(want) {
            bail!(
                "the freshly built `{shown}` is broken: it {} and printed {:?} (expected version {want}); \
                 nothing was cached",
                match status {
                    Some(s) => format!("exited with {s}"),
                    None => format!("did not exit within {VERSION_CHECK_TIMEOUT:?}"),
                },
                output.trim()
            );
        }
        Ok(())
    }

    /// The recipe in words, kept in the entry for whoever wonders what built it.
    fn describe(&self, inputs: &RecipeInputs) -> String {
        let mut s = format!(
            "{} {} built with {} in {}\n",
            self.name,
            self.version,
            inputs.go_version,
            self.module_dir.display()
        );
        for bin in &self.binaries {
            let _ = writeln!(
                s,
                "go build {} -ldflags='{}' -o {} {}",
                inputs.build_flags.join(" "),
                self.ldflags,
                bin.output,
                bin.package
            );
        }
        s
    }

    /// Removes the other entries (other keys or versions) of this name, so a
    /// changed recipe does not leave hundreds of megabytes behind.
    fn remove_other_entries(&self, keep: &Path) {
        let Some(cache) = keep.parent() else { return };
        let Ok(dir) = std::fs::read_dir(cache) else {
            return;
        };
        let prefix = format!("{}-v", self.name);
        for e in dir.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path != keep && name.starts_with(&prefix) && path.is_dir() {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

impl GoBinary {
    fn new(output: &str, package: &str, version_args: &[&str]) -> Self {
        Self {
            output: output.into(),
            package: package.into(),
            version_args: version_args.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// Runs `cmd` with stdin closed, collecting stdout and stderr; `None` as the
/// status when it was killed at `timeout`.
fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> anyhow::Result<(Option<std::process::ExitStatus>, String)> {
    let out_file = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.try_clone()?)
        .stderr(out_file.try_clone()?)
        .spawn()?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::new();
    {
        use std::io::{Read as _, Seek as _};
        let mut f = out_file;
        f.rewind()?;
        f.read_to_string(&mut output)?;
    }
    Ok((status, output))
}

/// `go env GOVERSION` in `module_dir`: the toolchain that builds that module
/// (with `GOTOOLCHAIN=auto` a module may select a newer one than `go` is).
fn go_version(module_dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("go")
        .current_dir(module_dir)
        .args(["env", "GOVERSION"])
        .output()
        .context("running `go env GOVERSION`")?;
    if !out.status.success() {
        bail!(
            "`go env GOVERSION` failed in {}: {}",
            module_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// This checkout's three recipes (etcd, kubernetes, helm) with their
/// inputs, read once per process: it asks `go` for its version.
fn planned() -> &'static [(Recipe, Result<RecipeInputs, String>); 3] {
    static PLANNED: OnceLock<[(Recipe, Result<RecipeInputs, String>); 3]> = OnceLock::new();
    PLANNED.get_or_init(|| {
        [Recipe::etcd(), Recipe::kubernetes(), Recipe::helm()].map(|recipe| {
            let inputs = recipe.inputs().map_err(|e| format!("{e:#}"));
            (recipe, inputs)
        })
    })
}

impl Binaries {
    /// The paths in the entries of the etcd, kubernetes and helm recipes.
    fn in_entries([etcd, k8s, helm]: [PathBuf; 3]) -> Self {
        Self {
            etcd: etcd.join("etcd"),
            kube_apiserver: k8s.join("kube-apiserver"),
            kubectl: k8s.join("kubectl"),
            helm: helm.join("helm"),
        }
    }

    /// The cached paths of this checkout's recipes, whether or not they
    /// exist yet.
    pub fn cached() -> Self {
        let cache = cache_dir();
        Self::in_entries(planned().each_ref().map(|(recipe, inputs)| {
            let key = inputs
                .as_ref()
                .map(|i| recipe.key(i))
                .unwrap_or_else(|_| "unknown-recipe".into());
            recipe.entry(&cache, &key)
        }))
    }

    /// Builds whatever is missing from the cache; returns the paths.
    pub fn ensure() -> anyhow::Result<Self> {
        require_go()?;
        let cache = cache_dir();
        let mut entries = Vec::with_capacity(3);
        for (recipe, inputs) in planned() {
            let inputs = inputs.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            entries.push(recipe.ensure_with(&cache, inputs)?.0);
        }
        let entries: [PathBuf; 3] = entries.try_into().expect("three recipes");
        Ok(Self::in_entries(entries))
    }
}

/// Paths of the binaries the kubelet lab adds (the
/// [`Recipe::kubernetes_node`] entry).
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    /// kubelet.
    pub kubelet: PathBuf,
    /// kube-proxy.
    pub kube_proxy: PathBuf,
    /// kube-scheduler.
    pub kube_scheduler: PathBuf,
    /// kube-controller-manager.
    pub kube_controller_manager: PathBuf,
}

impl NodeBinaries {
    /// Builds the entry when it is missing from the cache; returns the paths.
    pub fn ensure() -> anyhow::Result<Self> {
        require_go()?;
        let (entry, _) = Recipe::kubernetes_node().ensure(&cache_dir())?;
        Ok(Self {
            kubelet: entry.join("kubelet"),
            kube_proxy: entry.join("kube-proxy"),
            kube_scheduler: entry.join("kube-scheduler"),
            kube_controller_manager: entry.join("kube-controller-manager"),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> RecipeInputs {
        RecipeInputs {
            go_mod: b"module x\n".to_vec(),
            go_sum: b"a v1 h1:x\n".to_vec(),
            go_version: "go1.26.8".into(),
            build_flags: vec!["-trimpath".into()],
        }
    }

    #[test]
    fn the_cache_key_changes_with_every_part_of_the_recipe() {
        let recipe = Recipe::kubernetes();
        let base = recipe.key(&inputs());
        assert_eq!(base, recipe.key(&inputs()), "the key is deterministic");
        assert_eq!(base.len(), 16);

        let mut changed_inputs: Vec<(&str, RecipeInputs)> = Vec::new();
        let mut i = inputs();
        i.go_mod.push(b' ');
        changed_inputs.push(("go.mod", i));
        let mut i = inputs();
        i.go_sum.push(b' ');
        changed_inputs.push(("go.sum", i));
        let mut i = inputs();
        i.go_version = "go1.26.9".into();
        changed_inputs.push(("Go version", i));
        let mut i = inputs();
        i.build_flags.push("-race".into());
        changed_inputs.push(("build flags", i));
        for (what, i) in changed_inputs {
            assert_ne!(base, recipe.key(&i), "{what} changed, the key did not");
        }

        let mut changed: Vec<(&str, Recipe)> = Vec::new();
        let mut r = recipe.clone();
        r.version = "v1.34.5".into();
        changed.push(("version", r));
        let mut r = recipe.clone();
        r.ldflags.push_str(" -s");
        changed.push(("ldflags", r));
        let mut r = recipe.clone();
        r.binaries[0].output = "server".into();
        changed.push(("output name", r));
        let mut r = recipe.clone();
        r.binaries[1].package = "k8s.io/kubernetes/cmd/kubeadm".into();
        changed.push(("package", r));
        let mut r = recipe.clone();
        r.binaries.pop();
        changed.push(("package list", r));
        let mut r = recipe.clone();
        r.name = "k8s".into();
        changed.push(("name", r));
        for (what, r) in changed {
            assert_ne!(base, r.key(&inputs()), "{what} changed, the key did not");
        }
    }

    #[test]
    fn every_recipe_names_its_outputs_as_the_lab_runs_them() {
        let outputs =
            |r: Recipe| -> Vec<String> { r.binaries.into_iter().map(|b| b.output).collect() };
        assert_eq!(outputs(Recipe::etcd()), ["etcd"]);
        assert_eq!(outputs(Recipe::kubernetes()), ["kube-apiserver", "kubectl"]);
        assert_eq!(outputs(Recipe::helm()), ["helm"]);
        assert_eq!(
            outputs(Recipe::kubernetes_node()),
            [
                "kubelet",
                "kube-proxy",
                "kube-scheduler",
                "kube-controller-manager"
            ]
        );
        // Its own entry: building it never replaces the default lab's.
        assert_ne!(Recipe::kubernetes_node().name, Recipe::kubernetes().name);
        let tools =
            std::fs::read_to_string(Recipe::kubernetes().module_dir.join("tools.go")).unwrap();
        for bin in Recipe::kubernetes()
            .binaries
            .iter()
            .chain(&Recipe::kubernetes_node().binaries)
        {
            assert!(
                tools.contains(&format!("_ \"{}\"", bin.package)),
                "tools.go pins {}",
                bin.package
            );
        }
        for r in [
            Recipe::etcd(),
            Recipe::kubernetes(),
            Recipe::kubernetes_node(),
            Recipe::helm(),
        ] {
            let go_mod = std::fs::read_to_string(r.module_dir.join("go.mod")).unwrap();
            let module = r.binaries[0]
                .package
                .split("/cmd/")
                .next()
                .unwrap()
                .to_string();
            assert!(
                go_mod.contains(&format!("{module} {}", r.version)),
                "{} requires {module} {} in its go.mod",
                r.module_dir.display(),
                r.version
            );
        }
    }

    /// A consumer module with one tiny command that prints `version` (or
    /// fails when `broken`), built by the real `go` with this module's recipe
    /// machinery.
    fn toy_recipe(dir: &Path, broken: bool) -> Recipe {
        let module = dir.join("module");
        std::fs::create_dir_all(module.join("cmd/toy")).unwrap();
        std::fs::write(module.join("go.mod"), "module example.com/toy\n\ngo 1.22\n").unwrap();
        std::fs::write(module.join("go.sum"), "").unwrap();
        let code = if broken { 1 } else { 0 };
        std::fs::write(
            module.join("cmd/toy/main.go"),
            format!(
                "package main\n\nimport (\"fmt\"; \"os\")\n\nvar version = \"dev\"\n\n\
                 func main() {{ fmt.Println(\"toy\", version); os.Exit({code}) }}\n"
            ),
        )
        .unwrap();
        Recipe {
            name: "toy".into(),
            version: "v0.0.7".into(),
            module_dir: module,
            ldflags: "-X main.version=v0.0.7".into(),
            binaries: vec![GoBinary::new(
                "toy-server",
                "example.com/toy/cmd/toy",
                &["--version"],
            )],
        }
    }

    #[test]
    fn an_entry_missing_a_binary_is_rebuilt_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let recipe = toy_recipe(dir.path(), false);

        let (entry, outcome) = recipe.ensure(&cache).unwrap();
        assert_eq!(outcome, Outcome::Built);
        let bin = entry.join("toy-server");
        assert!(bin.is_file(), "built under the name the recipe gives");
        assert!(entry.join(RECIPE_FILE).is_file());

        let (again, outcome) = recipe.ensure(&cache).unwrap();
        assert_eq!(
            (again.as_path(), outcome),
            (entry.as_path(), Outcome::Cached)
        );

        std::fs::remove_file(&bin).unwrap();
        let (rebuilt, outcome) = recipe.ensure(&cache).unwrap();
        assert_eq!(
            (rebuilt.as_path(), outcome),
            (entry.as_path(), Outcome::Built)
        );
        assert!(bin.is_file());

        // A changed recipe builds a new entry and drops the old one.
        let mut changed = recipe.clone();
        changed.ldflags = "-s -X main.version=v0.0.7".into();
        let (new_entry, outcome) = changed.ensure(&cache).unwrap();
        assert_eq!(outcome, Outcome::Built);
        assert_ne!(new_entry, entry);
        assert!(!entry.exists(), "the old entry was removed");
    }

    #[test]
    fn a_broken_binary_fails_the_build_naming_it_and_caches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let recipe = toy_recipe(dir.path(), true);
        let err = format!("{:#}", recipe.ensure(&cache).unwrap_err());
        assert!(
            err.contains("`toy-server --version` is broken") && err.contains("exited with"),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".lock")
            .collect();
        assert!(left.is_empty(), "nothing cached: {left:?}");

        // A recipe whose package builds but whose output name was never
        // produced is caught by name, too.
        let ok = toy_recipe(dir.path(), false);
        let tmp = dir.path().join("out");
        std::fs::create_dir_all(&tmp).unwrap();
        let err = ok
            .check_binary(&tmp, &ok.binaries[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no file named `toy-server`"), "{err}");
    }
}
