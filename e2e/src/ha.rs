//! Scenario helpers for lab tests and benchmarks: HACluster and HAService
//! manifests, hook scripts on the lab nodes, the service Lease written as the
//! operator would (until the operator exists, a test plays its part), and
//! observing VIPs and GARP frames from the lab's namespaces.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::lab::Lab;
use crate::nodes;

/// Namespace of the test HAServices.
pub const SERVICE_NAMESPACE: &str = "default";
/// Namespace of heartbeat Leases (the operator's).
pub const OPERATOR_NAMESPACE: &str = "kubeha-system";

/// Applies a JSON object with server-side apply (field manager `kubeha-e2e`).
pub fn apply(lab: &Lab, object: &Value) -> anyhow::Result<()> {
    let mut child = lab
        .kubectl()
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=kubeha-e2e",
            "-f",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(object.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Deletes an object if it exists.
pub fn delete(lab: &Lab, kind: &str, name: &str, namespace: Option<&str>) {
    let mut args = vec!["delete", kind, name, "--ignore-not-found", "--wait=false"];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    let _ = lab.kubectl_output(&args);
}

/// Deletes HAService `name` in [`SERVICE_NAMESPACE`] and its leadership
/// Lease (the lab has no garbage collector to remove the Lease).
pub fn delete_service(lab: &Lab, name: &str) {
    delete(lab, "haservice", name, Some(SERVICE_NAMESPACE));
    delete(
        lab,
        "lease",
        &format!("kubeha-svc-{name}"),
        Some(SERVICE_NAMESPACE),
    );
}

/// Heartbeat timing in milliseconds: D, R, RD, skew.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// D.
    pub lease_ms: u32,
    /// R.
    pub renew_ms: u32,
    /// RD.
    pub deadline_ms: u32,
    /// Skew allowance.
    pub skew_ms: u32,
}

impl Timing {
    /// The defaults: D = 3 s, R = 1 s, RD = 2 s, skew 0.5 s.
    pub const DEFAULT: Timing = Timing {
        lease_ms: 3000,
        renew_ms: 1000,
        deadline_ms: 2000,
        skew_ms: 500,
    };
    /// A tight timing: D = 1 s, R = 0.3 s, RD = 0.6 s, skew 0.5 s.
    pub const TIGHT: Timing = Timing {
        lease_ms: 1000,
        renew_ms: 300,
        deadline_ms: 600,
        skew_ms: 500,
    };
}

/// An HACluster of lab nodes `members` (all in mode default).
pub fn cluster(name: &str, members: &[u8], timing: Timing) -> Value {
    let members: Vec<(u8, &str)> = members.iter().map(|i| (*i, "default")).collect();
    cluster_with_modes(name, &members, timing)
}

/// An HACluster of lab nodes with their modes, `(node, mode)`.
pub fn cluster_with_modes(name: &str, members: &[(u8, &str)], timing: Timing) -> Value {
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HACluster",
        "metadata": {"name": name},
        "spec": {
            "members": {"nodes": members.iter().map(|(i, mode)| json!({"name": nodes::node_name(*i), "mode": mode})).collect::<Vec<_>>()},
            "placement": "Ordered",
            "heartbeat": {
                "leaseDurationMs": timing.lease_ms,
                "renewIntervalMs": timing.renew_ms,
                "renewDeadlineMs": timing.deadline_ms,
                "clockSkewMs": timing.skew_ms
            },
            "startupGraceSeconds": 0,
            "vipPool": ["198.18.0.96/27", "2001:db8::100/120"],
            "allowedNamespaces": [SERVICE_NAMESPACE]
        }
    })
}

/// An HAService with `vips` and, when `hook_dir` is set, host-path hooks.
pub fn service(
    name: &str,
    cluster: &str,
    vips: &[&str],
    hook_dir: Option<&str>,
    garp: (u32, u32),
) -> Value {
    let mut spec = json!({
        "clusterRef": cluster,
        "vips": vips.iter().map(|v| json!({"address": v})).collect::<Vec<_>>(),
        "garp": {"count": garp.0, "intervalMs": garp.1},
    });
    if let Some(dir) = hook_dir {
        spec["hooks"] = json!({"source": {"hostPath": dir}, "timeoutSeconds": 5});
    }
    json!({
        "apiVersion": "kubeha.io/v1alpha1",
        "kind": "HAService",
        "metadata": {"name": name, "namespace": SERVICE_NAMESPACE},
        "spec": spec
    })
}

/// Writes the service Lease as the operator does: holder and epoch, cleared
/// for entry (`enter-epoch`) or not, and the standby node.
pub fn set_service_lease(
    lab: &Lab,
    service: &str,
    holder: Option<&str>,
    epoch: i32,
    cleared: bool,
    standby: Option<&str>,
) -> anyhow::Result<()> {
    let mut annotations = serde_json::Map::new();
    if cleared {
        annotations.insert("kubeha.io/enter-epoch".into(), json!(epoch.to_string()));
    } else {
        annotations.insert("kubeha.io/enter-epoch".into(), json!("-1"));
    }
    annotations.insert("kubeha.io/standby".into(), json!(standby.unwrap_or("")));
    apply(
        lab,
        &json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": format!("kubeha-svc-{service}"),
                "namespace": SERVICE_NAMESPACE,
                "labels": {"kubeha.io/lease": "service", "kubeha.io/service": service},
                "annotations": annotations
            },
            "spec": {"holderIdentity": holder.unwrap_or(""), "leaseTransitions": epoch}
        }),
    )
}

/// The hook root of lab node `i`.
pub fn hook_root(lab: &Lab, i: u8) -> PathBuf {
    lab.dir()
        .join("nodes")
        .join(nodes::node_name(i))
        .join("hooks")
}

/// Installs hook scripts `(file name, body)` into `<hook root of i>/<dir>`,
/// root-owned, mode 0755 (as the agent requires). Replaces the folder.
pub fn install_hooks(
    lab: &Lab,
    i: u8,
    dir: &str,
    scripts: &[(&str, &str)],
) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = hook_root(lab, i).join(dir);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path)?;
    for (name, body) in scripts {
        let file = path.join(name);
        std::fs::write(&file, body)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(path)
}

/// A hook script that appends `NAME ACTION ROLE transition=... epoch=...`
/// to `trace` and exits with `code`.
pub fn tracing_script(trace: &std::path::Path, code: i32) -> String {
    format!(
        "#!/bin/sh\necho \"$(basename \"$0\") $1 $2 transition=$KUBEHA_TRANSITION epoch=$KUBEHA_EPOCH node=$KUBEHA_NODE \
         service=$KUBEHA_SERVICE vips=$KUBEHA_VIPS\" >> {}\necho \"ran $(basename \"$0\") $1 $2\"\nexit {code}\n",
        trace.display()
    )
}

/// Whether `vip` (address without prefix) is on any interface of lab node `i`.
pub fn vip_on_node(i: u8, vip: &str) -> bool {
    addresses_of(i).iter().any(|a| a == vip)
}

/// Every address configured on lab node `i` now, without prefixes.
fn addresses_of(i: u8) -> Vec<String> {
    list_addresses(addr_command(i).output().ok())
}

/// `ip -o addr show` in node `i`'s namespace.
fn addr_command(i: u8) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &nodes::node_ns(i), "-o", "addr", "show"]);
    cmd
}

/// The addresses, without prefixes, in the output of `ip -o addr show`.
fn list_addresses(out: Option<std::process::Output>) -> Vec<String> {
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter(|w| w.contains('/'))
            .filter_map(|w| w.split('/').next().map(str::to_owned))
            .collect()
    })
    .unwrap_or_default()
}

/// Every address configured on each existing lab node now (without
/// prefixes): one `ip` call per node, all started at once.
pub fn node_addresses() -> Vec<(u8, Vec<String>)> {
    let running: Vec<(u8, Option<Child>)> = (1..=nodes::MAX_NODES)
        .filter(|i| nodes::ns_exists(&nodes::node_ns(*i)))
        .map(|i| {
            let child = addr_command(i)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok();
            (i, child)
        })
        .collect();
    running
        .into_iter()
        .map(|(i, child)| {
            (
                i,
                list_addresses(child.and_then(|c| c.wait_with_output().ok())),
            )
        })
        .collect()
}

/// Lab nodes on which `vip` (address without prefix) is configured now.
pub fn vip_holders(vip: &str) -> Vec<u8> {
    node_addresses()
        .into_iter()
        .filter(|(_, addrs)| addrs.iter().any(|a| a == vip))
        .map(|(i, _)| i)
        .collect()
}

/// `kubectl get haservices` in [`SERVICE_NAMESPACE`], printed as `output`
/// (`-o`) says.
pub fn get_services(lab: &Lab, output: &str) -> anyhow::Result<String> {
    lab.kubectl_ok(&["get", "haservices", "-n", SERVICE_NAMESPACE, "-o", output])
}

/// `status` of HAService `name` in [`SERVICE_NAMESPACE`] (null when absent).
pub fn service_status(lab: &Lab, name: &str) -> Value {
    lab.kubectl_ok(&[
        "get",
        "haservice",
        name,
        "-n",
        SERVICE_NAMESPACE,
        "-o",
        "json",
    ])
    .ok()
    .and_then(|out| serde_json::from_str::<Value>(&out).ok())
    .map(|v| v["status"].clone())
    .unwrap_or_default()
}

/// The lab node the status of `service` calls active, when its phase is
/// Active and exactly that node holds `vip`.
pub fn active_node(lab: &Lab, service: &str, vip: &str) -> Option<u8> {
    let status = service_status(lab, service);
    let active = status["activeNode"]
        .as_str()
        .and_then(|n| n.strip_prefix("node-")?.parse::<u8>().ok())?;
    (status["phase"] == "Active" && vip_holders(vip) == [active]).then_some(active)
}

/// Whether HACluster `cluster` reports all `members` heartbeating
/// (`status.ready` is `members/members`).
pub fn members_ready(lab: &Lab, cluster: &str, members: u8) -> bool {
    lab.kubectl_ok(&[
        "get",
        "hacluster",
        cluster,
        "-o",
        "jsonpath={.status.ready}",
    ])
    .is_ok_and(|r| r.trim() == format!("{members}/{members}"))
}

/// `kubectl ha move SERVICE --to node-I --wait 0` for a service in
/// [`SERVICE_NAMESPACE`]: asks for the move and returns at once.
pub fn request_move(lab: &Lab, service: &str, i: u8) -> anyhow::Result<String> {
    lab.kubectl_ha_ok(&[
        "--wait",
        "0",
        "move",
        service,
        "--to",
        &nodes::node_name(i),
        "-n",
        SERVICE_NAMESPACE,
    ])
}

/// Node `i`'s entry in the status of service `service` (null when absent).
pub fn node_entry(lab: &Lab, service: &str, i: u8) -> Value {
    service_status(lab, service)["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|e| e["node"] == nodes::node_name(i)).cloned())
        .unwrap_or_default()
}

pub use crate::split_brain::{DoubleHolder, MAX_SAMPLE_GAP, Sampled, SplitBrain};

/// Whether the client reaches `vip` and resolved it to node `i`'s MAC.
pub fn client_reaches(vip: &str, i: u8) -> bool {
    let ping = nodes::exec_in(nodes::CLIENT_NS, &["ping", "-c", "1", "-W", "1", vip])
        .output()
        .is_ok_and(|o| o.status.success());
    let mac = mac_of(&nodes::node_ns(i), nodes::NS_IFACE).unwrap_or_default();
    let neigh = nodes::exec_in(nodes::CLIENT_NS, &["ip", "neigh", "show", vip])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_lowercase())
        .unwrap_or_default();
    ping && !mac.is_empty() && neigh.contains(&mac)
}

/// What a TCP server on `vip:port` sends the client namespace before it
/// closes the connection (at most 1 KiB, within 1 s), or `None` if nothing
/// accepted the connection.
pub fn client_tcp_reply(vip: &str, port: u16) -> Option<String> {
    use std::io::Read;
    let addr: std::net::SocketAddr = format!("{vip}:{port}").parse().ok()?;
    // A thread of its own enters the client's network namespace.
    std::thread::spawn(move || {
        nodes::enter_ns(nodes::CLIENT_NS).ok()?;
        let stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .ok()?;
        let mut reply = Vec::new();
        stream.take(1024).read_to_end(&mut reply).ok()?;
        Some(String::from_utf8_lossy(&reply).into_owned())
    })
    .join()
    .ok()
    .flatten()
}

/// The MAC address of `iface` in network namespace `ns`, lowercase.
pub fn mac_of(ns: &str, iface: &str) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", iface])
        .output()?;
    let links: Value = serde_json::from_slice(&out.stdout).context("parsing `ip -j link`")?;
    links[0]["address"]
        .as_str()
        .map(str::to_lowercase)
        .context("no MAC address")
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns the
/// time it took, or `None`.
pub fn wait_until(timeout: Duration, f: impl FnMut() -> bool) -> Option<Duration> {
    wait_every(timeout, Duration::from_millis(20), f)
}

/// [`wait_until`] polling every `interval` (for a costly `f`, such as a
/// kubectl call).
pub fn wait_every(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(interval);
    }
    None
}

/// One frame seen by a capture.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Capture time, seconds since the epoch.
    pub time: f64,
    /// `arp-request`, `arp-reply`, `na` (unsolicited neighbour advertisement)
    /// or `echo-reply` (an IPv4 ping answer; `address` is its source).
    pub kind: String,
    /// The address the frame announces.
    pub address: String,
    /// The sender's MAC.
    pub mac: String,
}

/// tcpdump in the client namespace, capturing ARP and ICMPv6 neighbour
/// advertisements on its interface.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts capturing ARP and neighbour advertisements; returns once
    /// tcpdump listens.
    pub fn start(lab: &Lab, name: &str) -> anyhow::Result<Capture> {
        Self::start_filtered(lab, name, "arp or (icmp6 and ip6[40] == 136)")
    }

    /// Starts capturing what the tcpdump expression `filter` selects.
    pub fn start_filtered(lab: &Lab, name: &str, filter: &str) -> anyhow::Result<Capture> {
        let file = lab.dir().join("logs").join(format!("capture-{name}.txt"));
        let out = std::fs::File::create(&file)?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                nodes::CLIENT_NS,
                "tcpdump",
                "-i",
                "eth0",
                "-l",
                "-n",
                "-e",
                "-tt",
                "-vv",
            ])
            .arg(filter)
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump in the client namespace (apt-get install tcpdump)")?;
        // tcpdump says "listening on" on stderr once the socket is open.
        let mut capture = Capture { child, file };
        let stderr = capture.child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("tcpdump did not start listening")?;
        Ok(capture)
    }

    /// Frames captured so far.
    pub fn frames(&self) -> Vec<Frame> {
        parse_tcpdump(&std::fs::read_to_string(&self.file).unwrap_or_default())
    }

    /// Stops tcpdump and returns every frame.
    pub fn stop(mut self) -> Vec<Frame> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.frames()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `tcpdump -n -e -tt -vv` lines into frames.
pub fn parse_tcpdump(text: &str) -> Vec<Frame> {
    let mut frames = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(time) = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok())
        else {
            continue;
        };
        let mac = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        if line.contains("ARP") {
            // "Request who-has 198.18.0.100 tell 198.18.0.100" / "Reply 198.18.0.100 is-at aa:..".
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Some(p) = words.iter().position(|w| *w == "who-has") {
                let addr = words
                    .get(p + 1)
                    .unwrap_or(&"")
                    .trim_end_matches(',')
                    .to_owned();
                let tell = words
                    .iter()
                    .position(|w| *w == "tell")
                    .and_then(|t| words.get(t + 1))
                    .map(|s| s.trim_end_matches(','));
                if tell == Some(addr.as_str()) {
                    frames.push(Frame {
                        time,
                        kind: "arp-request".into(),
                        address: addr,
                        mac,
                    });
                }
            } else if let Some(p) = words.iter().position(|w| *w == "is-at") {
                let addr = words.get(p - 1).copied().unwrap_or_default().to_owned();
                frames.push(Frame {
                    time,
                    kind: "arp-reply".into(),
                    address: addr,
                    mac,
                });
            }
        } else if line.contains("ethertype IPv4")
            && lines
                .get(i + 1)
                .is_some_and(|l| l.contains("ICMP echo reply"))
        {
            // "    198.18.0.120 > 198.18.0.200: ICMP echo reply, id 7, seq 3, length 64"
            let addr = lines[i + 1].split_whitespace().next().unwrap_or_default();
            frames.push(Frame {
                time,
                kind: "echo-reply".into(),
                address: addr.to_owned(),
                mac,
            });
        } else if line.contains("neighbor advertisement")
            || lines
                .get(i + 1)
                .is_some_and(|l| l.contains("neighbor advertisement"))
        {
            let all = format!("{line} {}", lines.get(i + 1).unwrap_or(&""));
            if let Some(tgt) = all.split("tgt is ").nth(1) {
                let addr = tgt
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if !frames
                    .iter()
                    .any(|f: &Frame| f.time == time && f.kind == "na")
                {
                    frames.push(Frame {
                        time,
                        kind: "na".into(),
                        address: addr,
                        mac,
                    });
                }
            }
        }
    }
    frames
}

/// The agent's status file of lab node `i`, parsed.
pub fn agent_status(lab: &Lab, i: u8) -> Option<Value> {
    let path = lab
        .dir()
        .join("nodes")
        .join(nodes::node_name(i))
        .join("run")
        .join("status.json");
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Sum of every sample of `metric` (any labels) on operator replica `r`
/// (0 when it does not answer).
pub fn operator_metric(r: u8, metric: &str) -> f64 {
    let (_, body) =
        crate::lab::http_get(&Lab::operator_metrics_addr(r), "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcpdump_arp_and_na() {
        let text = "1700000000.100000 aa:bb:cc:dd:ee:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Ethernet (len 6), IPv4 (len 4), Request who-has 198.18.0.100 tell 198.18.0.100, length 28\n\
1700000000.100100 aa:bb:cc:dd:ee:01 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Ethernet (len 6), IPv4 (len 4), Reply 198.18.0.100 is-at aa:bb:cc:dd:ee:01, length 28\n\
1700000000.100200 aa:bb:cc:dd:ee:01 > 33:33:00:00:00:01, ethertype IPv6 (0x86dd), length 86: (hlim 255, next-header ICMPv6 (58) payload length: 32) 2001:db8::b > ff02::1: [icmp6 sum ok] ICMP6, neighbor advertisement, length 32, tgt is 2001:db8::100, Flags [override]\n\
1700000000.200000 aa:bb:cc:dd:ee:02 > ff:ff:ff:ff:ff:ff, ethertype ARP (0x0806), length 42: Ethernet (len 6), IPv4 (len 4), Request who-has 198.18.0.11 tell 198.18.0.200, length 28\n";
        let frames = parse_tcpdump(text);
        let echo = "1700000001.500000 aa:bb:cc:dd:ee:02 > aa:bb:cc:dd:ee:c8, ethertype IPv4 (0x0800), length 98: (tos 0x0, ttl 64, id 1, offset 0, flags [none], proto ICMP (1), length 84)\n    198.18.0.120 > 198.18.0.200: ICMP echo reply, id 7, seq 3, length 64\n";
        let replies = parse_tcpdump(echo);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            (
                replies[0].kind.as_str(),
                replies[0].address.as_str(),
                replies[0].mac.as_str()
            ),
            ("echo-reply", "198.18.0.120", "aa:bb:cc:dd:ee:02")
        );
        let kinds: Vec<(&str, &str)> = frames
            .iter()
            .map(|f| (f.kind.as_str(), f.address.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("arp-request", "198.18.0.100"),
                ("arp-reply", "198.18.0.100"),
                ("na", "2001:db8::100")
            ]
        );
        assert_eq!(frames[0].mac, "aa:bb:cc:dd:ee:01");
    }
}
