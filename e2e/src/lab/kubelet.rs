//! The kubelet lab: real nodes. kube-controller-manager and kube-scheduler
//! run on the host; every node namespace runs containerd, a kubelet with its
//! own node credentials and kube-proxy (nftables mode, so the `kubernetes`
//! Service, 10.96.0.1:443, reaches the API server and in-cluster config
//! works). A local pause image and the images under `target/images/` are
//! imported into every node's containerd.
//!
//! Everything a node runs lives under `.lab/nodes/node-i/k8s/` (configs,
//! containerd's root and state, the kubelet's root folder) and every one of
//! its processes names that folder on its command line; its pods run in the
//! cgroup `kubeha-lab-node-i` of every cgroup hierarchy. So `down` finds
//! all of it (processes, shims, pods, mounts, cgroups) also after a killed
//! run, without pid files.
//!
//! Facts this machine taught (see issue 13): processes start with
//! `nsenter --net=` (`ip netns exec` remounts /sys and hides the cgroup
//! mounts); root may lack CAP_SYS_RESOURCE, so containerd restricts
//! `oom_score_adj`; on cgroup v1 the kubelet needs `failCgroupV1: false` and
//! its cgroup root made beforehand in every hierarchy; a node is Ready only
//! with a CNI config; eviction thresholds must be positive.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Lab, Ports, s};
use crate::deps::NodeBinaries;
use crate::nodes::{self, HOST_IP};

/// The pause image every node's containerd has (built here, never pulled).
pub const PAUSE_IMAGE: &str = "docker.io/kubeha-lab/pause:1";
/// The Service range of the lab's API server (the `kubernetes` Service is
/// its first address, 10.96.0.1).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Where Debian's containernetworking-plugins puts the CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// Prefix of the cgroup each kubelet runs its pods under (`kubeha-lab-node-i`),
/// in every cgroup hierarchy.
const CGROUP_PREFIX: &str = "kubeha-lab-node-";
/// Where the cgroup hierarchies are mounted.
const CGROUP_FS: &str = "/sys/fs/cgroup";

/// Commands the kubelet lab runs, and the Debian package bringing each.
const PACKAGES: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    ("buildah", "buildah"),
    ("conntrack", "conntrack"),
    ("iptables", "iptables"),
    ("nsenter", "util-linux"),
    ("cc", "gcc"),
];

impl Lab {
    /// [`Lab::up_with_kubelets`], serialised on the same lock file as
    /// [`Lab::ensure_up`].
    pub fn ensure_up_with_kubelets(&self, nodes: u8) -> anyhow::Result<()> {
        nodes::check_lab_prerequisites()?;
        let lock = fs::File::create(self.root.join(".lab.lock")).context("creating .lab.lock")?;
        lock.lock().context("locking .lab.lock")?;
        self.up_with_kubelets(nodes)
    }

    /// [`Lab::up_with_nodes`], then real nodes: installs what is missing
    /// (containerd, runc, buildah, the CNI plugins...), builds kubelet,
    /// kube-proxy, kube-scheduler and kube-controller-manager (cached),
    /// starts kube-controller-manager and kube-scheduler, and on every node
    /// namespace containerd (with the pause image and `target/images/*.tar`
    /// imported), the kubelet and kube-proxy; returns once every node is
    /// Ready. Idempotent: what runs is kept, and gets the images again
    /// (rebuilt ones replace the old).
    pub fn up_with_kubelets(&self, count: u8) -> anyhow::Result<()> {
        if count == 0 {
            bail!("the kubelet lab needs at least one node");
        }
        ensure_packages()?;
        let bins = NodeBinaries::ensure()?;
        self.up_with_nodes(count)?;
        let ports = Ports::from_env()?;
        fs::create_dir_all(self.dir.join("kubelet"))?;
        self.write_kubelet_pki(count, &ports)?;
        self.start_controllers(&bins)?;
        let images = self.build_images()?;
        let started = Instant::now();
        for i in 1..=count {
            if self.kubelet_running(i) {
                // Images built since the node started replace theirs.
                for archive in &images {
                    self.import_image(i, archive)?;
                }
            } else {
                // A node whose services died (or were killed with a run of
                // ours) starts as after a reboot.
                self.clear_node_state(i)?;
                self.start_node_services(i, &bins, &images)?;
            }
        }
        self.wait_nodes_ready(count, started)?;
        Ok(())
    }

    /// Imports `target/images/*.tar` (as `cargo xtask images` writes them)
    /// into the containerd of every kubelet node that runs, e.g. after the
    /// images were built again; the archives imported.
    pub fn import_built_images(&self) -> anyhow::Result<Vec<PathBuf>> {
        let archives = self.built_images();
        for i in (1..=nodes::MAX_NODES).filter(|i| self.kubelet_running(*i)) {
            for archive in &archives {
                self.import_image(i, archive)?;
            }
        }
        Ok(archives)
    }

    /// The OCI archives under `target/images/` (or `$CARGO_TARGET_DIR/images`).
    fn built_images(&self) -> Vec<PathBuf> {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(|t| self.root.join(t))
            .unwrap_or_else(|| self.root.join("target"));
        let mut built: Vec<PathBuf> = fs::read_dir(target.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "tar") && p.is_file())
            .collect();
        built.sort();
        built
    }

    /// Node `i`'s folder of the kubelet lab: `.lab/nodes/node-i/k8s`.
    fn k8s_dir(&self, i: u8) -> PathBuf {
        self.node_dir(i).join("k8s")
    }

    /// The kubeconfig of kubelet-lab user `name` (a node name, or
    /// kube-controller-manager, kube-scheduler, kube-proxy).
    pub(super) fn kubelet_kubeconfig(&self, name: &str) -> PathBuf {
        self.dir.join("kubelet").join(format!("{name}.kubeconfig"))
    }

    /// The kubeconfig of node `i`'s kubelet: its own client certificate
    /// (`system:node:node-i`, group `system:nodes`).
    pub fn kubelet_node_kubeconfig(&self, i: u8) -> PathBuf {
        self.kubelet_kubeconfig(&nodes::node_name(i))
    }

    /// The kubelet's root folder on node `i` (pods' volumes live under
    /// `pods/UID/volumes`).
    pub fn kubelet_root(&self, i: u8) -> PathBuf {
        self.k8s_dir(i).join("kubelet")
    }

    /// Whether node `i` was brought up with a kubelet (its configuration
    /// is there, whether or not it runs now).
    pub fn has_kubelet(&self, i: u8) -> bool {
        self.k8s_dir(i).join("kubelet.yaml").is_file()
    }

    /// Whether node `i`'s kubelet runs.
    pub fn kubelet_running(&self, i: u8) -> bool {
        self.process_pid(&format!("{}-kubelet", nodes::node_name(i)))
            .is_some_and(|pid| nodes::pid_in_ns(pid, &nodes::node_ns(i)))
    }

    /// The address of node `i`'s containerd, for `ctr --address`.
    pub fn containerd_socket(&self, i: u8) -> PathBuf {
        self.k8s_dir(i).join("containerd").join("containerd.sock")
    }

    /// kube-controller-manager and kube-scheduler on the host, each with
    /// its own credentials, unless they run.
    fn start_controllers(&self, bins: &NodeBinaries) -> anyhow::Result<()> {
        let pki = |n: &str| self.pki(n).display().to_string();
        if self.process_pid("kube-controller-manager").is_none() {
            let kc = self.kubelet_kubeconfig("kube-controller-manager");
            let mut cmd = Command::new(&bins.kube_controller_manager);
            cmd.arg(format!("--kubeconfig={}", kc.display()))
                .arg(format!("--authentication-kubeconfig={}", kc.display()))
                .arg(format!("--authorization-kubeconfig={}", kc.display()))
                .arg(format!(
                    "--service-account-private-key-file={}",
                    pki("sa.key")
                ))
                .arg(format!("--root-ca-file={}", pki("ca.crt")))
                .arg(format!("--cluster-signing-cert-file={}", pki("ca.crt")))
                .arg(format!("--cluster-signing-key-file={}", pki("ca.key")))
                .arg("--use-service-account-credentials=true")
                .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
                .arg("--leader-elect=false")
                // Serves nothing: no port to collide with another lab's.
                .arg("--secure-port=0")
                .arg("--v=1");
            self.spawn("kube-controller-manager", cmd)?;
        }
        if self.process_pid("kube-scheduler").is_none() {
            let kc = self.kubelet_kubeconfig("kube-scheduler");
            let mut cmd = Command::new(&bins.kube_scheduler);
            cmd.arg(format!("--kubeconfig={}", kc.display()))
                .arg(format!("--authentication-kubeconfig={}", kc.display()))
                .arg(format!("--authorization-kubeconfig={}", kc.display()))
                .arg("--leader-elect=false")
                .arg("--secure-port=0")
                .arg("--v=1");
            self.spawn("kube-scheduler", cmd)?;
        }
        Ok(())
    }

    /// The pause image (a static C program, [`PAUSE_IMAGE`]) built into an
    /// OCI archive with buildah, without Docker; then every
    /// `target/images/*.tar`. The archives to import, pause first.
    fn build_images(&self) -> anyhow::Result<Vec<PathBuf>> {
        let dir = self.dir.join("images");
        let context = dir.join("pause");
        fs::create_dir_all(&context)?;
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("pause/pause.c");
        run_ok(Command::new("cc").args([
            "-static",
            "-Os",
            "-o",
            s(&context.join("pause")),
            s(&source),
        ]))
        .context("compiling the pause program (needs gcc and libc6-dev)")?;
        fs::write(
            context.join("Dockerfile"),
            "FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n",
        )?;
        let archive = dir.join("pause.tar");
        let storage = [
            "--root",
            &dir.join("buildah/root").display().to_string(),
            "--runroot",
            &dir.join("buildah/run").display().to_string(),
            "--storage-driver",
            "vfs",
        ]
        .map(String::from);
        run_ok(
            Command::new("buildah")
                .args(&storage)
                .args([
                    "bud",
                    "--isolation",
                    "chroot",
                    "-q",
                    "-t",
                    PAUSE_IMAGE,
                    "-f",
                ])
                .arg(context.join("Dockerfile"))
                .arg(&context),
        )
        .context("building the pause image with buildah")?;
        let _ = fs::remove_file(&archive);
        run_ok(
            Command::new("buildah")
                .args(&storage)
                .args(["push", "-q", PAUSE_IMAGE])
                .arg(format!("oci-archive:{}:{PAUSE_IMAGE}", archive.display())),
        )
        .context("writing the pause image's OCI archive")?;
        let mut archives = vec![archive];
        let built = self.built_images();
        archives.extend(built);
        Ok(archives)
    }

    /// Writes node `i`'s configuration, makes its cgroups and route, and
    /// starts containerd (importing `images`), the kubelet and kube-proxy
    /// in its namespace.
    fn start_node_services(
        &self,
        i: u8,
        bins: &NodeBinaries,
        images: &[PathBuf],
    ) -> anyhow::Result<()> {
        let name = nodes::node_name(i);
        let ns = nodes::node_ns(i);
        let dir = self.k8s_dir(i);
        for sub in ["containerd", "kubelet", "cni/net.d", "cni/ipam", "pod-logs"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        self.write_node_configs(i)?;
        make_node_cgroup(i)?;
        // Services' traffic leaves by the node's link (the segment has no
        // default route); kube-proxy rewrites it to its endpoints.
        run_ok(Command::new("ip").args([
            "-n",
            &ns,
            "route",
            "replace",
            SERVICE_CIDR,
            "via",
            &HOST_IP.to_string(),
        ]))?;
        // Pods' traffic is routed through the node namespace.
        enable_forwarding(&ns)?;

        let containerd = format!("{name}-containerd");
        let mut cmd = in_ns(&ns, "containerd");
        cmd.arg(format!(
            "--config={}",
            dir.join("containerd.toml").display()
        ));
        self.spawn(&containerd, cmd)?;
        let socket = self.containerd_socket(i);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .ctr(i)
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            if Instant::now() >= deadline || self.process_pid(&containerd).is_none() {
                bail!(
                    "containerd of {name} did not answer on {} within 30 s; last lines of its log:\n{}",
                    socket.display(),
                    self.log_tail(&containerd, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for archive in images {
            self.import_image(i, archive)?;
        }

        let kubelet = format!("{name}-kubelet");
        let mut cmd = in_ns(&ns, s(&bins.kubelet));
        cmd.arg(format!("--config={}", dir.join("kubelet.yaml").display()))
            .arg(format!(
                "--kubeconfig={}",
                self.kubelet_kubeconfig(&name).display()
            ))
            .arg(format!("--root-dir={}", dir.join("kubelet").display()))
            .arg(format!("--cert-dir={}", dir.join("kubelet-pki").display()))
            .arg(format!("--hostname-override={name}"))
            .arg(format!(
                "--node-ip={},{}",
                nodes::node_ip(i)?,
                nodes::node_ip6(i)?
            ))
            .arg(format!("--node-labels={}=true", super::NODE_LABEL));
        self.spawn(&kubelet, cmd)?;

        let mut cmd = in_ns(&ns, s(&bins.kube_proxy));
        cmd.arg(format!(
            "--config={}",
            dir.join("kube-proxy.yaml").display()
        ));
        self.spawn(&format!("{name}-kube-proxy"), cmd)?;
        Ok(())
    }

    /// containerd's, the CNI's, the kubelet's and kube-proxy's
    /// configuration files of node `i`.
    fn write_node_configs(&self, i: u8) -> anyhow::Result<()> {
        let name = nodes::node_name(i);
        let dir = self.k8s_dir(i);
        let c = dir.join("containerd");
        let containerd = format!(
            r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here may lack CAP_SYS_RESOURCE: never raise oom_score_adj.
  restrict_oom_score_adj = true
  # Pods' network namespaces under the state folder, not /run/netns.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
"#,
            root = c.join("root").display(),
            state = c.join("state").display(),
            socket = self.containerd_socket(i).display(),
            opt = c.join("opt").display(),
            runc = c.join("runc").display(),
            cni_conf = dir.join("cni/net.d").display(),
        );
        fs::write(dir.join("containerd.toml"), containerd)?;

        // A bridge per node with its own pod range; pods reach the rest of
        // the segment (and the API server) masqueraded as the node.
        let cni = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "kubeha-lab",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": pod_cidr(i) }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": dir.join("cni/ipam"),
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        });
        fs::write(
            dir.join("cni/net.d/10-kubeha-lab.conflist"),
            serde_json::to_string_pretty(&cni)?,
        )?;

        let kubelet = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: "{ip}"
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
containerRuntimeEndpoint: "unix://{socket}"
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: "{ca}"
authorization:
  mode: Webhook
# cgroup v1 hosts: the lab's kubelets run there too, each under its own root.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: "/{CGROUP_PREFIX}{i}"
failSwapOn: false
clusterDomain: cluster.local
podLogsDir: "{pod_logs}"
# Positive thresholds (zero is refused); no image is ever collected: none
# could be pulled again.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
            ip = nodes::node_ip(i)?,
            socket = self.containerd_socket(i).display(),
            ca = self.pki("ca.crt").display(),
            pod_logs = dir.join("pod-logs").display(),
        );
        fs::write(dir.join("kubelet.yaml"), kubelet)?;

        let proxy = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
hostnameOverride: "{name}"
clientConnection:
  kubeconfig: "{kubeconfig}"
clusterCIDR: "{pods}"
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# The node is a network namespace: leave the host's conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
            kubeconfig = self.kubelet_kubeconfig("kube-proxy").display(),
            pods = POD_CIDRS,
        );
        fs::write(dir.join("kube-proxy.yaml"), proxy)?;
        Ok(())
    }

    /// `ctr` talking to node `i`'s containerd, in the `k8s.io` namespace the
    /// CRI uses.
    pub fn ctr(&self, i: u8) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.containerd_socket(i))
            .args(["--namespace", "k8s.io"]);
        cmd
    }

    /// Imports OCI archive `archive` into node `i`'s containerd; an image
    /// named without a registry gets the `docker.io/` name too, the one the
    /// CRI looks up.
    fn import_image(&self, i: u8, archive: &Path) -> anyhow::Result<()> {
        let out = self
            .ctr(i)
            .args(["images", "import", "--snapshotter", "overlayfs"])
            .arg(archive)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "importing {} into {}'s containerd failed: {}{}",
                archive.display(),
                nodes::node_name(i),
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for name in imported_names(&text) {
            let full = cri_name(&name);
            if full != name {
                run_ok(self.ctr(i).args(["images", "tag", "--force", &name, &full]))?;
            }
        }
        Ok(())
    }

    /// Waits until nodes 1..=`count` are Ready (two minutes at most).
    fn wait_nodes_ready(&self, count: u8, started: Instant) -> anyhow::Result<()> {
        let names: Vec<String> = (1..=count)
            .map(|i| format!("node/{}", nodes::node_name(i)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut args = vec!["wait", "--for=condition=Ready", "--timeout=5s"];
            args.extend(names.iter().map(String::as_str));
            if self.kubectl_ok(&args).is_ok() {
                eprintln!(
                    "lab: {count} kubelet node(s) Ready {:.1} s after their start",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            for i in 1..=count {
                let name = nodes::node_name(i);
                for what in ["containerd", "kubelet", "kube-proxy"] {
                    let process = format!("{name}-{what}");
                    if self.process_pid(&process).is_none() {
                        bail!(
                            "{what} of {name} exited; last lines of its log:\n{}",
                            self.log_tail(&process, 30)
                        );
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the kubelet nodes were not Ready within 120 s; last lines of node-1's kubelet log:\n{}",
                    self.log_tail("node-1-kubelet", 30)
                );
            }
        }
    }

    /// Stops node `i`'s kubelet-lab processes and pods at once (SIGKILL):
    /// every process naming its `k8s` folder (containerd, kubelet,
    /// kube-proxy, shims) and every process in its pods' cgroups. Returns
    /// how many there were.
    pub(super) fn kill_node_services(&self, i: u8) -> usize {
        let marker = format!("{}/", self.k8s_dir(i).display());
        let mut pids = pids_with_marker(&marker);
        pids.extend(cgroup_pids(&format!("{CGROUP_PREFIX}{i}")));
        pids.sort_unstable();
        pids.dedup();
        nodes::signal_pids(&pids, nix::sys::signal::Signal::SIGKILL);
        nodes::wait_dead(&pids, Duration::from_secs(5));
        pids.len()
    }

    /// Node `i` boots with a kubelet: what the power loss left is cleared
    /// as a reboot clears it (the pods' mounts, the tmpfs state of
    /// containerd), then containerd, the kubelet and kube-proxy start again
    /// with the images they had (containerd's root is the node's disk).
    pub(super) fn boot_node_services(&self, i: u8) -> anyhow::Result<()> {
        self.clear_node_state(i)?;
        let bins = NodeBinaries::ensure()?;
        self.start_node_services(i, &bins, &[])
    }

    /// What a reboot of node `i` clears: its services and pods (killed if
    /// any is left), the mounts under its folder, containerd's state (a
    /// tmpfs on a real machine). Its disk (images, the kubelet's root
    /// folder) stays.
    fn clear_node_state(&self, i: u8) -> anyhow::Result<()> {
        self.kill_node_services(i);
        unmount_under(&self.k8s_dir(i));
        let state = self.k8s_dir(i).join("containerd/state");
        if state.exists() {
            fs::remove_dir_all(&state).with_context(|| format!("emptying {}", state.display()))?;
        }
        Ok(())
    }

    /// `down`'s part for the kubelet lab, before the segment goes: every
    /// node's processes and pods killed (found by folder and cgroup name,
    /// so a killed run's too).
    pub(super) fn kill_kubelet_nodes(&self) -> usize {
        let marker = format!("{}/", self.dir.join("nodes").display());
        let mut pids: Vec<i32> = pids_with_marker(&marker)
            .into_iter()
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("/k8s/"))
            })
            .collect();
        pids.extend(cgroup_pids(CGROUP_PREFIX));
        pids.sort_unstable();
        pids.dedup();
        nodes::signal_pids(&pids, nix::sys::signal::Signal::SIGKILL);
        nodes::wait_dead(&pids, Duration::from_secs(5));
        pids.len()
    }

    /// `down`'s part after every process is gone: the mounts under the lab
    /// folder (pods' volumes, rootfs, network namespaces), then the
    /// kubelets' cgroups. Returns how many mounts and cgroups it removed.
    pub(super) fn remove_kubelet_leftovers(&self) -> (usize, usize) {
        let mounts = unmount_under(&self.dir);
        let cgroups = remove_node_cgroups(CGROUP_PREFIX);
        // Only after a kubelet lab (every kubelet node has cgroups): the
        // host's own containerd or kubelet, if any, is left alone otherwise.
        if cgroups > 0 {
            self.remove_host_files();
        }
        (mounts, cgroups)
    }

    /// What the kubelets and containerds leave at fixed paths of the host:
    /// the log links into the lab folder, and sockets nobody listens on any
    /// more (shims', the device-plugin one), with their folders if empty.
    fn remove_host_files(&self) {
        let lab = self.dir.display().to_string();
        for e in fs::read_dir("/var/log/containers")
            .into_iter()
            .flatten()
            .flatten()
        {
            if fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&lab)) {
                let _ = fs::remove_file(e.path());
            }
        }
        let listening = fs::read_to_string("/proc/net/unix").unwrap_or_default();
        let stale = |path: &Path| !listening.contains(&path.display().to_string());
        for dir in ["/run/containerd/s", "/var/lib/kubelet/device-plugins"] {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = e.path();
                let socket = e.file_type().is_ok_and(|t| {
                    use std::os::unix::fs::FileTypeExt as _;
                    t.is_socket()
                });
                if socket && stale(&path) {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        for dir in [
            "/run/containerd/s",
            "/run/containerd/fifo",
            "/run/containerd",
            "/var/lib/kubelet/device-plugins",
            "/var/lib/kubelet",
        ] {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Every node's pod range: node `i` has 10.244.i.0/24.
const POD_CIDRS: &str = "10.244.0.0/16";

/// Node `i`'s pod range.
fn pod_cidr(i: u8) -> String {
    format!("10.244.{i}.0/24")
}

/// `nsenter --net=/run/netns/NS PROGRAM`: a process in the node's network
/// namespace that keeps the host's mounts (`ip netns exec` would remount
/// /sys and hide the cgroup hierarchies).
fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program)
        .env("PATH", sbin_path());
    cmd
}

/// `$PATH` with /usr/sbin and /sbin, where runc, iptables, conntrack and
/// nft live and which a non-login root shell may lack.
fn sbin_path() -> std::ffi::OsString {
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    path.push(":/usr/sbin:/sbin");
    path
}

/// `net.ipv4.ip_forward=1` in network namespace `ns` (written from a thread
/// inside it: /proc/sys/net is the writer's namespace's).
fn enable_forwarding(ns: &str) -> anyhow::Result<()> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> anyhow::Result<()> {
        nodes::enter_ns(&ns)?;
        fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .with_context(|| format!("enabling IPv4 forwarding in {ns}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread enabling IPv4 forwarding panicked"))?
}

/// Runs `cmd`; fails with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Installs what the kubelet lab runs and this machine lacks (Debian
/// packages, `apt-get install -y`, after an `apt-get update` if the first
/// try fails).
fn ensure_packages() -> anyhow::Result<()> {
    let path = sbin_path();
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| nodes::find_on_path(cmd, Some(&path)).is_none())
        .map(|(_, package)| *package)
        .collect();
    if !Path::new(CNI_BIN_DIR).join("bridge").is_file() {
        missing.push("containernetworking-plugins");
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").is_file()
        && !Path::new("/usr/lib/aarch64-linux-gnu/libc.a").is_file()
    {
        missing.push("libc6-dev");
    }
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    super::apt_install(&missing, "the kubelet lab")
}

/// The image names `ctr images import` printed (`unpacking NAME (sha256:...)...done`).
fn imported_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("unpacking "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// The name the CRI looks `name` up by: with a registry host (the first
/// part has a `.` or `:`, or is `localhost`) as it is, else under
/// `docker.io/` (and `library/` for a single part), as Docker's reference
/// normalisation does.
fn cri_name(name: &str) -> String {
    match name.split_once('/') {
        Some((host, _)) if host.contains(['.', ':']) || host == "localhost" => name.to_owned(),
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    }
}

/// Processes whose command line contains `marker`.
fn pids_with_marker(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(marker)
            })
        })
        .collect()
}

/// The mount points of the cgroup hierarchies a kubelet uses: every cgroup
/// v1 and v2 filesystem at or under [`CGROUP_FS`].
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for line in fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
    {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split_whitespace().next().unwrap_or("");
        let Some(point) = left.split_whitespace().nth(4) else {
            continue;
        };
        let under = point
            .strip_prefix(CGROUP_FS)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if !under {
            continue;
        }
        // cgroup v1 hierarchies, and cgroup v2: at the top on a unified
        // host, or beside them (`unified`) on a hybrid one, where runc
        // makes the pods' cgroups too.
        if fstype == "cgroup" || fstype == "cgroup2" {
            found.push(PathBuf::from(point));
        }
    }
    found
}

/// Node `i`'s cgroup root in every hierarchy (the kubelet requires it to
/// exist), cpuset's with the parent's CPUs and memory nodes.
fn make_node_cgroup(i: u8) -> anyhow::Result<()> {
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(format!("{CGROUP_PREFIX}{i}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = fs::read_to_string(hierarchy.join(file))
                && dir.join(file).exists()
                && fs::read_to_string(dir.join(file)).is_ok_and(|v| v.trim().is_empty())
            {
                fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// Every cgroup folder under the hierarchies' top folders named
/// `prefix*`, deepest first.
fn node_cgroups(prefix: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        for e in fs::read_dir(&hierarchy).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix)
                && e.file_type().is_ok_and(|t| t.is_dir())
            {
                walk(&e.path(), &mut out);
            }
        }
    }
    out
}

/// The processes in the cgroups named `prefix*` (and below).
fn cgroup_pids(prefix: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = node_cgroups(prefix)
        .iter()
        .filter_map(|dir| fs::read_to_string(dir.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the cgroups named `prefix*` (deepest first) once their
/// processes are gone; how many it removed.
fn remove_node_cgroups(prefix: &str) -> usize {
    let mut removed = 0;
    for dir in node_cgroups(prefix) {
        for _ in 0..50 {
            if fs::remove_dir(&dir).is_ok() {
                removed += 1;
                break;
            }
            if !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    removed
}

/// The mount points under `dir` (mountinfo's escapes undone), deepest first.
pub(super) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}/", dir.display());
    let mut found: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .filter(|point| point.starts_with(&prefix) || *point == prefix.trim_end_matches('/'))
        .map(PathBuf::from)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// Unmounts everything under `dir`, deepest first (lazily when busy), until
/// nothing is left; how many mounts there were.
fn unmount_under(dir: &Path) -> usize {
    let mut count = 0;
    for _ in 0..10 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            break;
        }
        for point in mounts {
            let umount = |lazy: bool| {
                let mut cmd = Command::new("umount");
                if lazy {
                    cmd.arg("-l");
                }
                cmd.arg(&point)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            let done = umount(false) || umount(true);
            if done {
                count += 1;
            }
        }
    }
    count
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_get_the_registry_the_cri_looks_up() {
        assert_eq!(
            cri_name("kubeha-operator:dev"),
            "docker.io/library/kubeha-operator:dev"
        );
        assert_eq!(
            cri_name("kubeha/kubeha-agent:0.1"),
            "docker.io/kubeha/kubeha-agent:0.1"
        );
        assert_eq!(cri_name(PAUSE_IMAGE), PAUSE_IMAGE);
        assert_eq!(cri_name("localhost/x:1"), "localhost/x:1");
        assert_eq!(cri_name("reg:5000/x:1"), "reg:5000/x:1");
        let out = "unpacking docker.io/kubeha-lab/pause:1 (sha256:82)...done\n\
                   unpacking kubeha/agent:dev (sha256:12)...done\n";
        assert_eq!(
            imported_names(out),
            ["docker.io/kubeha-lab/pause:1", "kubeha/agent:dev"]
        );
    }

    #[test]
    fn a_node_gets_its_own_cgroup_root_pod_range_and_nftables_proxy() {
        let root = tempfile::tempdir().unwrap();
        let lab = Lab::new(root.path());
        fs::create_dir_all(lab.k8s_dir(2).join("cni/net.d")).unwrap();
        lab.write_node_configs(2).unwrap();
        let dir = lab.k8s_dir(2);
        let yaml = |file: &str| -> serde_yaml::Value {
            serde_yaml::from_str(&fs::read_to_string(dir.join(file)).unwrap()).unwrap()
        };
        let kubelet = yaml("kubelet.yaml");
        assert_eq!(kubelet["cgroupRoot"], "/kubeha-lab-node-2");
        assert_eq!(kubelet["failCgroupV1"], false);
        assert_eq!(kubelet["address"], "198.18.0.12");
        assert_eq!(kubelet["authorization"]["mode"], "Webhook");
        assert_eq!(kubelet["authentication"]["anonymous"]["enabled"], false);
        let proxy = yaml("kube-proxy.yaml");
        assert_eq!(proxy["mode"], "nftables");
        assert_eq!(proxy["hostnameOverride"], "node-2");
        let cni: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(dir.join("cni/net.d/10-kubeha-lab.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cni["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.2.0/24"
        );
        let containerd = fs::read_to_string(dir.join("containerd.toml")).unwrap();
        for line in [
            "restrict_oom_score_adj = true",
            "netns_mounts_under_state_dir = true",
            &format!("sandbox_image = \"{PAUSE_IMAGE}\""),
            &format!("address = \"{}\"", lab.containerd_socket(2).display()),
        ] {
            assert!(containerd.contains(line), "containerd.toml has {line}");
        }
        // Every path a node process names lies in its own folder, which is
        // how `down` finds its processes after a killed run.
        assert!(lab.containerd_socket(2).starts_with(&dir));
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }
}
