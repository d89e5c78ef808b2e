//! Logging setup: one `--log-format` value for both binaries, one output
//! shape (to stderr; in JSON, one object per line with the event's fields
//! at the top level and the spans it ran in under `spans`).

/// Log output format (`--log-format`, `KUBEHA_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up logging to stderr; `RUST_LOG` overrides the default `info`. A
/// second call does nothing.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_span_list(true)
            .try_init(),
    };
}
