//! The chaos cluster and services as the run applies them: names, VIPs,
//! specs, and the hook scripts with the markers that make a monitor
//! misbehave.

use super::{CLUSTER, HOOK_DIR, SERVER_PORT};
use crate::ha::{self, Timing};
use crate::lab::Lab;
use crate::nodes;

/// Service `k`'s name.
pub(super) fn service_name(k: usize) -> String {
    format!("chaos-{k}")
}

/// Service `k`'s VIPs without prefix: IPv4, and IPv6 for even `k`.
pub(super) fn service_vips(k: usize) -> (String, Option<String>) {
    (
        format!("198.18.0.{}", 100 + k),
        k.is_multiple_of(2)
            .then(|| format!("2001:db8::{:x}", 0x140 + k)),
    )
}

/// Service `k`'s extra VIP for [`Kind::VipEdit`](super::Kind::VipEdit)
/// (IPv6, inside the lab's pool, apart from every service's own VIPs).
pub(super) fn extra_vip(k: usize) -> String {
    format!("2001:db8::{:x}", 0x180 + k)
}

/// Service `k` as the run applies it, with its extra VIP or without.
pub(super) fn service_spec(k: usize, extra: bool) -> serde_json::Value {
    let (v4, v6) = service_vips(k);
    let mut vips = vec![format!("{v4}/24")];
    vips.extend(v6.map(|v| format!("{v}/64")));
    if extra {
        vips.push(format!("{}/64", extra_vip(k)));
    }
    let vips: Vec<&str> = vips.iter().map(String::as_str).collect();
    let mut spec = ha::service(&service_name(k), CLUSTER, &vips, Some(HOOK_DIR), (3, 100));
    spec["spec"]["hooks"]["monitor"] =
        serde_json::json!({"intervalSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 2});
    // A node where the monitor failed may serve again a minute later, so
    // hook faults never use up the members for good.
    spec["spec"]["failureTimeoutSeconds"] = serde_json::json!(60);
    spec
}

/// Where the chaos keeps its fault markers: `<dir>/<node>/<service>.<fault>`.
pub(super) fn faults_dir(lab: &Lab) -> std::path::PathBuf {
    lab.dir().join("chaos").join("faults")
}

/// Where the chaos services' servers keep their pid files:
/// `<dir>/<node>/<service>/`.
fn servers_dir(lab: &Lab) -> std::path::PathBuf {
    lab.dir().join("chaos").join("servers")
}

/// The marker that makes `service`'s monitor on node `i` misbehave
/// (`monitor-fail`, `monitor-hang`, or `monitor-slow` holding the seconds
/// to sleep).
pub(super) fn fault_marker(lab: &Lab, i: u8, service: &str, fault: &str) -> std::path::PathBuf {
    faults_dir(lab)
        .join(nodes::node_name(i))
        .join(format!("{service}.{fault}"))
}

/// The chaos services' hook scripts `(file name, body)`:
/// - `E01server`, on `enter master` only, starts, unless it runs, a TCP
///   server on the first VIP (IPv4) and port [`SERVER_PORT`] that answers
///   every connection with the node's name and closes it (entering
///   vicemaster or none starts nothing; any other call exits 1);
/// - `L01server` stops it;
/// - `M01server` checks it (0 running, 7 not), unless a fault marker makes
///   it fail (exit 3), hang, or sleep first.
///
/// A server is recognised by its command line, never by a pid alone, so a
/// recycled pid is neither trusted nor killed.
pub(super) fn hook_scripts(lab: &Lab) -> Vec<(&'static str, String)> {
    let servers = servers_dir(lab);
    let faults = faults_dir(lab);
    let prelude = format!(
        r#"#!/bin/sh
set -u
# KUBEHA_SERVICE is namespace/name.
service=${{KUBEHA_SERVICE##*/}}
state={servers}/$KUBEHA_NODE/$service
vip=${{KUBEHA_VIPS%%/*}}
# The server of this node and service, recognised by its command line.
running() {{
    [ -f "$state/pid" ] || return 1
    pid=$(cat "$state/pid")
    {{ tr '\0' ' ' < "/proc/$pid/cmdline"; }} 2>/dev/null | grep -q "kubeha-chaos-server $vip $KUBEHA_NODE"
}}
"#,
        servers = servers.display()
    );
    let server = format!(
        "import socket,sys\n\
         s=socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind((sys.argv[2],{SERVER_PORT}))\n\
         s.listen(64)\n\
         r=sys.argv[3].encode()\n\
         while 1:\n \
         c=s.accept()[0]\n \
         try:c.sendall(r)\n \
         except OSError:pass\n \
         c.close()\n"
    );
    // Only entering master starts the server: entering the standby role
    // (vicemaster, none) starts nothing, as examples/hooks/demo/E01server.
    let enter = format!(
        r#"{prelude}case "${{1-}} ${{2-}}" in
    "enter master") ;;
    "enter vicemaster" | "enter none")
        echo "standby: nothing to start"
        exit 0
        ;;
    *)
        echo "called as '$0 ${{1-}} ${{2-}}', expected 'enter master|vicemaster|none'" >&2
        exit 1
        ;;
esac
mkdir -p "$state"
if running; then
    echo "already running"
    exit 0
fi
setsid python3 -S -c '{server}' kubeha-chaos-server "$vip" "$KUBEHA_NODE" >"$state/log" 2>&1 </dev/null &
echo $! > "$state/pid"
echo "started on $vip:{SERVER_PORT} ($KUBEHA_TRANSITION, epoch $KUBEHA_EPOCH)"
"#
    );
    let leave = format!(
        r#"{prelude}if running; then
    kill "$pid"
fi
rm -f "$state/pid"
echo "stopped ($KUBEHA_TRANSITION)"
"#
    );
    let monitor = format!(
        r#"{prelude}fault={faults}/$KUBEHA_NODE/$service
if [ -e "$fault.monitor-fail" ]; then
    echo "chaos: this monitor fails"
    exit 3
fi
if [ -e "$fault.monitor-hang" ]; then
    echo "chaos: this monitor hangs"
    exec sleep 3600
fi
if [ -e "$fault.monitor-slow" ]; then
    sleep "$(cat "$fault.monitor-slow")"
fi
running && exit 0
exit 7
"#,
        faults = faults.display()
    );
    vec![
        ("E01server", enter),
        ("L01server", leave),
        ("M01server", monitor),
    ]
}

/// The cluster as the run applies it: every node a member, `locked` the
/// one in mode locked, with `timing`.
pub(super) fn cluster_spec(nodes: u8, locked: Option<u8>, timing: Timing) -> serde_json::Value {
    let modes: Vec<(u8, &str)> = (1..=nodes)
        .map(|i| {
            (
                i,
                if Some(i) == locked {
                    "locked"
                } else {
                    "default"
                },
            )
        })
        .collect();
    ha::cluster_with_modes(CLUSTER, &modes, timing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_have_distinct_vips_inside_the_lab_pool() {
        let mut all = Vec::new();
        for k in 0..20 {
            let (v4, v6) = service_vips(k);
            let last: u8 = v4.rsplit('.').next().unwrap().parse().unwrap();
            assert!((96..128).contains(&last), "{v4} outside 198.18.0.96/27");
            all.push(v4);
            all.extend(v6);
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate VIPs");
    }
}
