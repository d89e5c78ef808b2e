//! Throwaway network namespaces for the real-kernel tests of this crate.
//!
//! A parent test creates a namespace named `kubeha-ut-...` (deleted by a
//! drop guard, also when the test fails), sets up interfaces with `ip -n`,
//! and re-executes the test binary inside it with `ip netns exec`, selecting
//! one case through an environment variable. Every thread of that child
//! process lives in the namespace, so netlink and packet sockets (and the
//! frames they send) stay in it.

use std::fmt;
use std::io::{Read, Seek};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Name prefix of every namespace the tests create.
pub(crate) const NS_PREFIX: &str = "kubeha-ut-";
/// Selects the case a child process runs.
const CASE_ENV: &str = "KUBEHA_NETNS_CASE";
/// The namespace a child process must find itself in.
const NS_ENV: &str = "KUBEHA_NETNS_NAME";
/// Printed by a child whose case passed.
const OK_MARKER: &str = "KUBEHA-NETNS-CASE-OK";
/// How long one child may run.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// A test failure whose Debug output is the plain message, so a test
/// returning `Err` prints something readable.
pub(crate) struct Failure(pub(crate) String);

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure(s.to_string())
    }
}

impl From<crate::vip::VipError> for Failure {
    fn from(e: crate::vip::VipError) -> Self {
        Failure(format!("VipError: {e}"))
    }
}

impl From<crate::garp::GarpError> for Failure {
    fn from(e: crate::garp::GarpError) -> Self {
        Failure(format!("GarpError: {e}"))
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure(format!("I/O error: {e}"))
    }
}

/// Result of a test or case.
pub(crate) type TestResult = Result<(), Failure>;

/// `check!(cond, "fmt", args)`: return a [`Failure`] unless `cond`.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err($crate::netns_harness::Failure(format!($($msg)+)));
        }
    };
}
pub(crate) use check;

/// Fails clearly unless we are root and iproute2's `ip` is installed.
pub(crate) fn require_root_and_ip() -> TestResult {
    if !nix::unistd::geteuid().is_root() {
        return Err(Failure(
            "kernel tests need root: they create network namespaces, interfaces and \
             addresses; run `cargo test -p kubeha-agent` as root"
                .to_string(),
        ));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(Failure(format!(
            "`ip -V` failed ({}); kernel tests need a working iproute2",
            out.status
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Failure(
            "iproute2 `ip` is not in PATH; kernel tests need iproute2 (apt-get install iproute2)"
                .to_string(),
        )),
        Err(e) => Err(Failure(format!("cannot run `ip`: {e}"))),
    }
}

/// Runs a command, returning its stdout or a failure with its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String, Failure> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Failure(format!("cannot run {program} {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(Failure(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j ARGS` in the current namespace, parsed.
pub(crate) fn ip_json(args: &[&str]) -> Result<serde_json::Value, Failure> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = run("ip", &full)?;
    if out.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(&out).map_err(|e| {
        Failure(format!(
            "`ip {}` printed no JSON ({e}): {out}",
            full.join(" ")
        ))
    })
}

/// The `addr_info` entry of `addr` on `dev` in the current namespace.
pub(crate) fn addr_entry(
    dev: &str,
    addr: std::net::IpAddr,
) -> Result<Option<serde_json::Value>, Failure> {
    let links = ip_json(&["addr", "show", "dev", dev])?;
    let wanted = addr.to_string();
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.get("addr_info").and_then(|a| a.as_array()))
        .flatten()
        .find(|a| a.get("local").and_then(|l| l.as_str()) == Some(wanted.as_str()))
        .cloned())
}

/// A network namespace deleted on drop.
pub(crate) struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates an empty namespace `kubeha-ut-TAG-PID-N` with `lo` up.
    pub(crate) fn new(tag: &str) -> Result<NetNs, Failure> {
        require_root_and_ip()?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{NS_PREFIX}{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace with the test segment: veth0 (198.18.0.1/24,
    /// 2001:db8::1/64) paired with veth1 (no address), and dummy0
    /// (198.19.0.1/24, 2001:db8:1::1/64) paired with dummy1. Nothing
    /// connects it to any other namespace.
    pub(crate) fn with_lab_links(tag: &str) -> Result<NetNs, Failure> {
        let ns = NetNs::new(tag)?;
        ns.ip(&[
            "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
        ])?;
        // A second pair stands in for a dummy interface (not every
        // kernel has the dummy module).
        ns.ip(&[
            "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy1",
        ])?;
        for dev in ["veth0", "veth1", "dummy0", "dummy1"] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "veth0"])?;
        ns.ip(&["addr", "add", "2001:db8::1/64", "dev", "veth0", "nodad"])?;
        ns.ip(&["addr", "add", "198.19.0.1/24", "dev", "dummy0"])?;
        ns.ip(&["addr", "add", "2001:db8:1::1/64", "dev", "dummy0", "nodad"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub(crate) fn ip(&self, args: &[&str]) -> Result<String, Failure> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `case` of the child test `test_path` (as libtest names it,
    /// e.g. `vip::tests::netns_child`) inside this namespace.
    pub(crate) fn run_case(&self, test_path: &str, case: &str) -> TestResult {
        let exe = std::env::current_exe()
            .map_err(|e| Failure(format!("cannot find the test binary: {e}")))?;
        let mut log = tempfile::tempfile()?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(&exe)
            .args([
                test_path,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CASE_ENV, case)
            .env(NS_ENV, &self.name)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log.try_clone()?))
            .spawn()
            .map_err(|e| Failure(format!("cannot start `ip netns exec`: {e}")))?;
        let deadline = Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                // Our own child: end it by its id.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut output = String::new();
        log.rewind()?;
        log.read_to_string(&mut output)?;
        match status {
            None => Err(Failure(format!(
                "case {case} in {} timed out after {CHILD_TIMEOUT:?}; output:\n{output}",
                self.name
            ))),
            Some(s) if s.success() && output.contains(&format!("{OK_MARKER} {case}")) => {
                // Captured by libtest; shown with --nocapture.
                println!("case {case} in {}:\n{output}", self.name);
                Ok(())
            }
            Some(s) => Err(Failure(format!(
                "case {case} in namespace {} failed ({s}); child output:\n{output}",
                self.name
            ))),
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete test namespace {}: {e:?}",
                self.name
            );
        }
    }
}

/// The entry of a child test: does nothing in a normal test run; in a
/// child started by [`NetNs::run_case`], checks it is inside its
/// `kubeha-ut-` namespace, runs the selected case on a tokio runtime and
/// reports success with a marker, failure with a panic carrying the message.
pub(crate) fn child_entry<F, Fut>(run_case: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = TestResult>,
{
    let Ok(case) = std::env::var(CASE_ENV) else {
        return;
    };
    let expected = std::env::var(NS_ENV).unwrap_or_default();
    let here = run("ip", &["netns", "identify"]).unwrap_or_default();
    if !expected.starts_with(NS_PREFIX) || !here.split_whitespace().any(|n| n == expected) {
        panic!(
            "refusing to run kernel test case {case}: not inside a {NS_PREFIX} namespace \
             (expected {expected:?}, `ip netns identify` says {here:?})"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("case {case}: cannot build a tokio runtime: {e}"),
    };
    match runtime.block_on(run_case(case.clone())) {
        Ok(()) => println!("{OK_MARKER} {case}"),
        Err(f) => panic!("case {case} failed: {}", f.0),
    }
}

/// The libtest path of `name` in the module `module` (from `module_path!()`).
pub(crate) fn test_path(module: &str, name: &str) -> String {
    let module = module.split_once("::").map_or("", |(_, rest)| rest);
    format!("{module}::{name}")
}
