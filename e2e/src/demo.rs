//! `cargo xtask demo`: the lab with three nodes, the operator, the example
//! cluster and service (its hooks start a small web server on the VIP), and
//! a power-off of the active node printed as it happens.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::ha;
use crate::lab::Lab;
use crate::nodes;

/// The example service's VIP (examples/haservice.yaml).
const VIP: &str = "198.18.0.100";
/// The example service and cluster names.
const SERVICE: &str = "web";
const CLUSTER: &str = "demo";
/// The example service's hook folder (`hooks.source.hostPath`).
const HOOK_DIR: &str = "demo";

/// What the client namespace gets from the example web server on the VIP
/// ("served by node-N ..."), or `None` when nothing answers within 1 s.
fn fetch() -> Option<String> {
    let script = format!(
        "import urllib.request as u; print(u.urlopen('http://{VIP}:8080/', timeout=1).read().decode().strip())"
    );
    let out = nodes::exec_in(nodes::CLIENT_NS, &["python3", "-c", &script])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn say(start: Instant, what: &str) {
    println!("[{:>6.2} s] {what}", start.elapsed().as_secs_f64());
}

/// How the demo runs kubeha.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As pods: images built here, the kubelet lab (containerd, kubelet and
    /// kube-proxy per node), `helm install` of the chart.
    Pods,
    /// As processes the lab starts in the node namespaces (no images, no
    /// kubelets): quicker to start, lighter on the machine.
    HostProcesses,
}

/// The demo's mode on this machine: pods unless asked otherwise or the
/// machine does not fit the kubelet lab ([`crate::pods::unfit`]); with the
/// reason, printed by the demo.
pub fn mode(host_processes: bool) -> (Mode, String) {
    if host_processes {
        return (Mode::HostProcesses, "asked for (--host-processes)".into());
    }
    match crate::pods::unfit(3) {
        Some(why) => (
            Mode::HostProcesses,
            format!("this machine does not fit the kubelet lab: {why}"),
        ),
        None => (
            Mode::Pods,
            "the machine fits the kubelet lab (cgroup v2, memory)".into(),
        ),
    }
}

/// The example hook scripts (examples/hooks/demo), as `(file name, body)`.
fn example_hooks(lab: &Lab) -> anyhow::Result<Vec<(String, String)>> {
    let dir = lab.root().join("examples/hooks/demo");
    let mut scripts = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        scripts.push((name, std::fs::read_to_string(&path)?));
    }
    Ok(scripts)
}

/// Runs the demo in `mode`; leaves the lab up for the user to explore.
pub fn run(lab: &Lab, mode: Mode) -> anyhow::Result<()> {
    let start = Instant::now();
    let scripts = example_hooks(lab)?;
    let refs: Vec<(&str, &str)> = scripts
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_str()))
        .collect();
    match mode {
        Mode::Pods => {
            // One hook folder per node (the chart's agent.perNodePaths),
            // the example scripts in each, root-owned 0755.
            let hooks = lab.dir().join("pods").join("hooks");
            for i in 1..=3 {
                ha::write_scripts(&hooks.join(nodes::node_name(i)).join(HOOK_DIR), &refs)?;
            }
            let installed = crate::pods::install(lab, 3, &hooks, &[])?;
            say(
                start,
                &format!(
                    "lab up: kube-apiserver, 3 kubelet nodes; helm install: operator and agents as pods ({:.0} s)",
                    installed.took.as_secs_f64()
                ),
            );
            println!(
                "{}",
                lab.kubectl_ok(&["get", "pods", "-n", crate::pods::SYSTEM, "-o", "wide"])?
            );
        }
        Mode::HostProcesses => {
            lab.ensure_up_with_nodes(3)?;
            for i in 1..=3 {
                lab.power_on(i)?;
                if !lab.agent_running(i) {
                    lab.start_agent(i, &[] as &[&str])?;
                }
                ha::install_hooks(lab, i, HOOK_DIR, &refs)?;
            }
            if !lab.operator_running(0) {
                lab.start_operator(0, &[])?;
            }
            say(
                start,
                "lab up: kube-apiserver, 3 node namespaces with an agent each, operator replica 0",
            );
        }
    }

    let examples = lab.root().join("examples");
    lab.kubectl_ok(&[
        "apply",
        "-f",
        &examples.join("hacluster.yaml").to_string_lossy(),
    ])?;
    // The example cluster has two members; the demo adds the third node.
    let members = lab.kubectl_ok(&[
        "get",
        "hacluster",
        CLUSTER,
        "-o",
        "jsonpath={.spec.members.nodes[*].name}",
    ])?;
    if !members.split_whitespace().any(|n| n == "node-3") {
        lab.kubectl_ok(&[
            "patch",
            "hacluster",
            CLUSTER,
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/spec/members/nodes/-","value":{"name":"node-3"}}]"#,
        ])?;
    }
    lab.kubectl_ok(&[
        "apply",
        "-f",
        &examples.join("haservice.yaml").to_string_lossy(),
    ])?;
    say(
        start,
        "applied examples/hacluster.yaml (+ node-3) and examples/haservice.yaml",
    );

    let served = ha::wait_until(Duration::from_secs(90), || fetch().is_some());
    if served.is_none() {
        bail!(
            "the example service never answered on {VIP}:8080; status: {}",
            ha::service_status(lab, SERVICE)
        );
    }
    let active = ha::vip_holders(VIP);
    say(
        start,
        &format!(
            "client -> http://{VIP}:8080/: {}",
            fetch().unwrap_or_default()
        ),
    );
    println!(
        "{}",
        lab.kubectl_ok(&["get", "haclusters,haservices", "-A"])?
    );
    let Some(&victim) = active.first() else {
        bail!("nobody holds {VIP}");
    };

    say(
        start,
        &format!(
            "powering off node-{victim}: every process in its namespace killed, its link down"
        ),
    );
    lab.power_off(victim)?;
    let off = Instant::now();
    let mut last = String::new();
    loop {
        let holders: Vec<String> = ha::vip_holders(VIP)
            .into_iter()
            .filter(|i| *i != victim)
            .map(nodes::node_name)
            .collect();
        let answer = fetch();
        let line = format!(
            "VIP on {} | client: {}",
            if holders.is_empty() {
                "-".to_owned()
            } else {
                holders.join(",")
            },
            answer.clone().unwrap_or_else(|| "no answer".into())
        );
        if line != last {
            say(
                start,
                &format!(
                    "+{:.2} s after power-off: {line}",
                    off.elapsed().as_secs_f64()
                ),
            );
            last = line;
        }
        if answer.is_some() && !holders.is_empty() {
            break;
        }
        if off.elapsed() > Duration::from_secs(60) {
            bail!(
                "no failover within 60 s; status: {}",
                ha::service_status(lab, SERVICE)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "{}",
        lab.kubectl_ok(&["get", "haclusters,haservices", "-A"])?
    );
    println!(
        "{}",
        lab.kubectl_ok(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=web",
            "--sort-by=.lastTimestamp",
        ])?
    );
    say(
        start,
        &format!(
            "powering node-{victim} back on; its agent starts again (failback Never: the service stays)"
        ),
    );
    lab.power_on(victim)?;
    if mode == Mode::HostProcesses {
        lab.start_agent(victim, &[] as &[&str])?;
    }
    println!("\n{}", lab.usage(3));
    println!(
        "try: kubectl ha status; kubectl ha move web --to node-{victim}; \
         ip netns exec {} python3 -c \"import urllib.request as u; print(u.urlopen('http://{VIP}:8080/').read())\"",
        nodes::CLIENT_NS
    );
    Ok(())
}
