//! The kubelet lab: two real nodes (containerd, a kubelet with its own node
//! certificate, kube-proxy in nftables mode, in each node namespace) run a
//! hostNetwork DaemonSet of the locally built pause image; a pod's own
//! in-cluster credentials reach the API server through the `kubernetes`
//! Service (10.96.0.1:443); the Node authorizer keeps a kubelet from a
//! Secret none of its pods uses; powering a node off stops its kubelet,
//! containerd, shims and pods, and powering it on starts them again; `lab
//! down` leaves no process, mount, cgroup or namespace behind.
//!
//! One test: it owns the lab from start to teardown.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kubeha_e2e::lab::{Lab, PAUSE_IMAGE, output_within, wait_for};
use kubeha_e2e::nodes;

const NODES: u8 = 2;
const NS: &str = "kubelet-test";

fn json(lab: &Lab, args: &[&str]) -> serde_json::Value {
    lab.kubectl_json(args).unwrap()
}

/// The DaemonSet's pods: (node name, phase, pod IP, UID).
fn pods(lab: &Lab) -> Vec<(String, String, String, String)> {
    let list = json(lab, &["get", "pods", "-n", NS, "-l", "app=pause"]);
    let mut pods: Vec<_> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&p["spec"]["nodeName"]),
                s(&p["status"]["phase"]),
                s(&p["status"]["podIP"]),
                s(&p["metadata"]["uid"]),
            )
        })
        .collect();
    pods.sort();
    pods
}

/// kubectl as node `i`'s kubelet (its own certificate).
fn as_node(lab: &Lab, i: u8, args: &[&str]) -> Output {
    output_within(
        lab.kubectl()
            .env("KUBECONFIG", lab.kubelet_node_kubeconfig(i))
            .args(args),
        Duration::from_secs(20),
    )
}

/// Processes whose command line contains `marker`.
fn processes_naming(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| e.file_name().to_string_lossy() != std::process::id().to_string())
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(marker)
                .then(|| format!("{} {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// The processes of pod `uid` (its sandbox and its container, both
/// `/pause`) in network namespace `ns`: those in the pod's cgroup.
fn pod_processes(ns: &str, uid: &str) -> Vec<i32> {
    pod_processes_anywhere(uid)
        .into_iter()
        .filter(|p| nodes::pid_in_ns(*p, ns))
        .collect()
}

/// The processes of pod `uid`, wherever they run.
fn pod_processes_anywhere(uid: &str) -> Vec<i32> {
    let cgroup = format!("pod{uid}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        // A zombie (killed, not yet reaped by init) runs no more.
        .filter(|p| !nodes::is_dead(*p))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cgroup")).is_ok_and(|c| c.contains(&cgroup))
        })
        .collect()
}

/// What in-cluster config does, from the network namespace of process
/// `pid`: the pod's token and CA, through the `kubernetes` Service
/// (10.96.0.1:443), which kube-proxy's rules lead to the API server.
fn lists_pods_through_the_service(pid: i32, token: &str, ca: &Path) {
    let answer = output_within(
        Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["curl", "-sS", "--max-time", "5", "--cacert"])
            .arg(ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", token.trim()))
            .arg(format!("https://10.96.0.1:443/api/v1/namespaces/{NS}/pods")),
        Duration::from_secs(10),
    );
    let body = String::from_utf8_lossy(&answer.stdout);
    assert!(
        answer.status.success() && body.contains("\"kind\": \"PodList\""),
        "a pod's service account lists pods through 10.96.0.1:443 (pid {pid}): {body} {}",
        String::from_utf8_lossy(&answer.stderr)
    );
}

/// The cgroup folders named `kubeha-lab-node-*` in every hierarchy.
fn node_cgroups() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for e in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("kubeha-lab-node-")
            {
                found.push(e.path());
            }
        }
        if h.file_name()
            .to_string_lossy()
            .starts_with("kubeha-lab-node-")
        {
            found.push(h.path());
        }
    }
    found
}

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// The projected service-account token and CA the kubelet mounted for pod
/// `uid` on node `i`: what in-cluster config reads in the container.
fn pod_credentials(lab: &Lab, i: u8, uid: &str) -> (String, PathBuf) {
    let volumes = lab
        .kubelet_root(i)
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~projected");
    let access = std::fs::read_dir(&volumes)
        .unwrap_or_else(|e| panic!("{}: {e}", volumes.display()))
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kube-api-access-")
        })
        .expect("the pod has its kube-api-access volume")
        .path();
    let token = std::fs::read_to_string(access.join("token")).unwrap();
    (token, access.join("ca.crt"))
}

fn manifest() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
---
apiVersion: v1
kind: Secret
metadata:
  name: mounted
  namespace: {NS}
stringData:
  key: used-by-the-pods
---
apiVersion: v1
kind: Secret
metadata:
  name: unrelated
  namespace: {NS}
stringData:
  key: no-pod-uses-it
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: reader
  namespace: {NS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: reader-view
  namespace: {NS}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: view
subjects:
- kind: ServiceAccount
  name: reader
  namespace: {NS}
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: pause
  namespace: {NS}
spec:
  selector:
    matchLabels:
      app: pause
  template:
    metadata:
      labels:
        app: pause
    spec:
      serviceAccountName: reader
      hostNetwork: true
      terminationGracePeriodSeconds: 1
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
            - matchExpressions:
              - key: kubernetes.io/hostname
                operator: In
                values: [node-1, node-2]
      containers:
      - name: pause
        image: {image}
        imagePullPolicy: Never
        volumeMounts:
        - name: secret
          mountPath: /secret
      volumes:
      - name: secret
        secret:
          secretName: mounted
---
apiVersion: v1
kind: Pod
metadata:
  name: podnet
  namespace: {NS}
spec:
  serviceAccountName: reader
  nodeName: node-2
  terminationGracePeriodSeconds: 1
  containers:
  - name: pause
    image: {image}
    imagePullPolicy: Never
"#,
        image = PAUSE_IMAGE.trim_start_matches("docker.io/"),
    )
}

#[test]
fn kubelet_nodes_run_pods_with_their_own_credentials_and_leave_nothing_behind() {
    let lab = Lab::of_this_checkout();
    let started = Instant::now();
    lab.ensure_up_with_kubelets(NODES)
        .expect("the kubelet lab must come up");
    eprintln!(
        "kubelet lab with {NODES} nodes up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Both Nodes Ready, registered by their kubelets with their addresses.
    for i in 1..=NODES {
        let node = json(&lab, &["get", "node", &nodes::node_name(i)]);
        let ready = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "node-{i} is Ready: {}", node["status"]["conditions"]);
        assert_eq!(
            node["status"]["nodeInfo"]["containerRuntimeVersion"]
                .as_str()
                .unwrap()
                .split(':')
                .next(),
            Some("containerd")
        );
    }

    // A hostNetwork DaemonSet of the local pause image: one Running pod per
    // node, with the node namespace's address.
    let file = lab.dir().join("kubelet-test.yaml");
    std::fs::write(&file, manifest()).unwrap();
    lab.kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
        .unwrap();
    let running = wait_for(
        "one Running pause pod per node",
        Duration::from_secs(90),
        || {
            let pods = pods(&lab);
            (pods.len() == usize::from(NODES) && pods.iter().all(|p| p.1 == "Running"))
                .then_some(pods)
        },
    );
    for (i, (node, _, ip, uid)) in (1..=NODES).zip(&running) {
        assert_eq!(node, &nodes::node_name(i));
        assert_eq!(ip, &nodes::node_ip(i).unwrap().to_string(), "pod on {node}");
        assert_eq!(
            pod_processes(&nodes::node_ns(i), uid).len(),
            2,
            "the sandbox and the container run /pause in {}",
            nodes::node_ns(i)
        );
    }

    // In-cluster config: the pod's own token and CA, from its network
    // namespace, through the `kubernetes` Service that kube-proxy's
    // nftables rules lead to the API server.
    let ns1 = nodes::node_ns(1);
    let rules = output_within(
        &mut nodes::exec_in(&ns1, &["nft", "list", "table", "ip", "kube-proxy"]),
        Duration::from_secs(10),
    );
    assert!(
        rules.status.success() && String::from_utf8_lossy(&rules.stdout).contains("10.96.0.1"),
        "kube-proxy's nftables table in {ns1}: {}",
        String::from_utf8_lossy(&rules.stderr)
    );
    let (token, ca) = pod_credentials(&lab, 1, &running[0].3);
    let pid = pod_processes(&ns1, &running[0].3)[0];
    lists_pods_through_the_service(pid, &token, &ca);

    // A pod on the pod network (its own namespace on node-2's bridge, an
    // address from node-2's range) reaches the API server the same way.
    let pod = wait_for("the pod-network pod runs", Duration::from_secs(60), || {
        let pod = json(&lab, &["get", "pod", "podnet", "-n", NS]);
        (pod["status"]["phase"] == "Running").then_some(pod)
    });
    let ip = pod["status"]["podIP"].as_str().unwrap();
    assert!(ip.starts_with("10.244.2."), "podnet's address {ip}");
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let (token, ca) = pod_credentials(&lab, 2, uid);
    let pid = pod_processes_anywhere(uid)
        .into_iter()
        .next()
        .expect("podnet's processes");
    assert!(
        !nodes::pid_in_ns(pid, &nodes::node_ns(2)),
        "podnet has a network namespace of its own"
    );
    lists_pods_through_the_service(pid, &token, &ca);

    // The Node authorizer: node-1's kubelet reads the Secret its pod
    // mounts, not one no pod of it uses; NodeRestriction: it cannot
    // relabel another node.
    let mounted = as_node(&lab, 1, &["get", "secret", "mounted", "-n", NS]);
    assert!(
        mounted.status.success(),
        "node-1 reads the Secret its pod mounts: {}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    let unrelated = as_node(&lab, 1, &["get", "secret", "unrelated", "-n", NS]);
    let err = String::from_utf8_lossy(&unrelated.stderr);
    assert!(
        !unrelated.status.success()
            && err.contains("Forbidden")
            && err.contains("system:node:node-1"),
        "node-1 must not read a Secret none of its pods uses: {err}"
    );
    let relabel = as_node(
        &lab,
        1,
        &["label", "node", "node-2", "kubeha.io/stolen=yes"],
    );
    assert!(
        !relabel.status.success(),
        "node-1 must not change node-2: {}",
        String::from_utf8_lossy(&relabel.stdout)
    );

    // Power-off of node 2: its kubelet, containerd, shims and pods stop;
    // node-1's pod runs on.
    let node2 = lab.dir().join("nodes/node-2/k8s/");
    assert!(!processes_naming(node2.to_str().unwrap()).is_empty());
    let killed = lab.power_off(2).unwrap();
    assert!(killed >= 5, "power_off killed {killed} process(es)");
    let left = processes_naming(node2.to_str().unwrap());
    assert!(left.is_empty(), "node-2's services still run: {left:?}");
    let podnet_left = pod_processes_anywhere(uid);
    assert!(
        podnet_left.is_empty(),
        "podnet (its own network namespace) still runs: {podnet_left:?}"
    );
    assert!(
        nodes::ns_pids(&nodes::node_ns(2)).is_empty(),
        "processes left in node-2's namespace"
    );
    assert_eq!(pod_processes(&nodes::node_ns(1), &running[0].3).len(), 2);
    assert!(lab.kubelet_running(1) && !lab.kubelet_running(2));

    // Power-on: the node's services start with the boot, and the
    // kubelet runs the node's pod again.
    let booted = Instant::now();
    lab.power_on(2).unwrap();
    wait_for(
        "node-2's pause pod runs again",
        Duration::from_secs(90),
        || (pod_processes(&nodes::node_ns(2), &running[1].3).len() == 2).then_some(()),
    );
    eprintln!(
        "node-2's pod ran again {:.1} s after power-on",
        booted.elapsed().as_secs_f64()
    );

    // Teardown leaves nothing behind, even without the pid files (as
    // after a killed run): it finds what runs by folder and cgroup names.
    std::fs::remove_dir_all(lab.dir().join("pids")).unwrap();
    lab.down().unwrap();
    let marker = lab.dir().display().to_string();
    assert!(
        processes_naming(&marker).is_empty(),
        "{:?}",
        processes_naming(&marker)
    );
    assert!(
        mounts_under(lab.dir()).is_empty(),
        "{:?}",
        mounts_under(lab.dir())
    );
    assert!(node_cgroups().is_empty(), "{:?}", node_cgroups());
    assert!(nodes::lab_namespaces().is_empty());
    let pauses: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| !nodes::is_dead(*p))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "pause")
        })
        .collect();
    assert!(pauses.is_empty(), "pause processes left: {pauses:?}");
}
