//! The HTTP endpoints of a binary: `/metrics` (OpenMetrics text), `/healthz`
//! and `/readyz` (200 `ok`, or 503 with the reason), each answered by the
//! binary's [`Probes`]; and the shared metrics registry they encode.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

/// The content type of `/metrics`: what the registry encodes is the
/// OpenMetrics text format (`# EOF` at the end, `info` and `_total`), and
/// Prometheus parses it as such only when told so.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a binary answers on its HTTP port.
pub trait Probes: Clone + Send + Sync + 'static {
    /// The OpenMetrics text exposition for `/metrics`.
    fn metrics(&self) -> String;
    /// `/healthz`: `Err(why)` answers 503 with `why` (the kubelet restarts
    /// a container that keeps failing it).
    fn health(&self) -> Result<(), String>;
    /// `/readyz`: `Err(why)` answers 503 with `why`.
    fn ready(&self) -> Result<(), String>;
}

/// The routes, answered by `probes`.
pub fn router<P: Probes>(probes: P) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(p): State<P>| async move {
                ([(CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], p.metrics())
            }),
        )
        .route(
            "/healthz",
            get(|State(p): State<P>| async move { answer(p.health()) }),
        )
        .route(
            "/readyz",
            get(|State(p): State<P>| async move { answer(p.ready()) }),
        )
        .with_state(probes)
}

fn answer(result: Result<(), String>) -> (StatusCode, String) {
    match result {
        Ok(()) => (StatusCode::OK, "ok".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// Serves the routes on `addr` until the task is dropped.
pub async fn serve<P: Probes>(addr: std::net::SocketAddr, probes: P) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(probes)).await
}

/// A metrics registry shared by the code that counts and the `/metrics`
/// answer; cheap to clone.
#[derive(Clone, Default)]
pub struct SharedRegistry(Arc<Mutex<Registry>>);

impl SharedRegistry {
    /// Wraps a registry whose metrics are registered.
    pub fn new(registry: Registry) -> Self {
        Self(Arc::new(Mutex::new(registry)))
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Registers metrics one after the other, as a list of name, help text and
/// metric, then makes the [`SharedRegistry`]:
///
/// ```
/// # use prometheus_client::metrics::counter::Counter;
/// # use kubeha_runtime::http::RegistryBuilder;
/// let fences = Counter::<u64>::default();
/// let registry = RegistryBuilder::new("kubeha_agent")
///     .metric("fences", "Self-fences", &fences)
///     .build();
/// ```
pub struct RegistryBuilder(Registry);

impl RegistryBuilder {
    /// An empty registry whose metric names all begin with `prefix` and an
    /// underscore.
    pub fn new(prefix: &str) -> Self {
        Self(Registry::with_prefix(prefix))
    }

    /// Registers `metric` as `name` (after the prefix) with `help`: the
    /// registry holds a clone, which shares its values with `metric`.
    pub fn metric<M: Metric + Clone>(mut self, name: &str, help: &str, metric: &M) -> Self {
        self.0.register(name, help, metric.clone());
        self
    }

    /// Registers an OpenMetrics info metric `name` (after the prefix),
    /// exposed as `<prefix>_<name>_info{labels} 1`: facts about the process
    /// that do not change while it runs, such as its version.
    pub fn info(mut self, name: &str, help: &str, labels: &[(&str, &str)]) -> Self {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0.register(name, help, Info::new(labels));
        self
    }

    /// The shared registry of every metric registered.
    pub fn build(self) -> SharedRegistry {
        SharedRegistry::new(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    struct Flags(Arc<AtomicBool>);

    impl Probes for Flags {
        fn metrics(&self) -> String {
            "m 1\n".to_owned()
        }
        fn health(&self) -> Result<(), String> {
            Ok(())
        }
        fn ready(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not synced".to_owned())
            }
        }
    }

    async fn get_raw(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    }

    async fn get_text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let buf = get_raw(addr, path).await;
        let code = buf[9..12].parse().unwrap();
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        (code, body)
    }

    /// A builder's metrics encode under its prefix, with the values the
    /// code counts on its own handles.
    #[test]
    fn built_registry_encodes_what_its_metrics_count() {
        let fences = prometheus_client::metrics::counter::Counter::<u64>::default();
        let held = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let registry = RegistryBuilder::new("p")
            .info("build", "Version", &[("version", "1.2.3")])
            .metric("fences", "Self-fences", &fences)
            .metric("held", "Held", &held)
            .build();
        fences.inc();
        held.set(3);
        let text = registry.encode();
        assert!(text.contains("# HELP p_fences Self-fences.\n"), "{text}");
        assert!(text.contains("p_fences_total 1\n"), "{text}");
        assert!(text.contains("p_held 3\n"), "{text}");
        assert!(
            text.contains("# TYPE p_build info\np_build_info{version=\"1.2.3\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// The three routes answer over a real socket, 503 with the reason
    /// when a probe fails.
    #[tokio::test]
    async fn routes_answer_what_the_probes_say() {
        let flags = Flags::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(flags.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        assert_eq!(get_text(addr, "/metrics").await, (200, "m 1\n".to_owned()));
        let head = get_raw(addr, "/metrics").await.to_ascii_lowercase();
        assert!(
            head.contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}\r\n")),
            "{head}"
        );
        assert_eq!(get_text(addr, "/healthz").await, (200, "ok".to_owned()));
        assert_eq!(
            get_text(addr, "/readyz").await,
            (503, "not synced".to_owned())
        );
        flags.0.store(true, Ordering::SeqCst);
        assert_eq!(get_text(addr, "/readyz").await, (200, "ok".to_owned()));
    }
}
