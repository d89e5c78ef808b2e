//! The agent library's error type.

use std::path::PathBuf;

/// Everything that can stop the agent or one of its commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call, or the client's setup, failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Netlink could not be opened.
    #[error("netlink: {0}")]
    Vip(#[from] crate::vip::VipError),
    /// A file, the metrics socket or the async runtime failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The hook cgroup (`--hook-cgroup`) could not be set up.
    #[error("--hook-cgroup {}: {source}", path.display())]
    HookCgroup {
        /// The cgroup directory asked for.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A command-line or environment value that cannot work; the message
    /// names it and the fix.
    #[error("{0}")]
    Usage(String),
    /// A hook ConfigMap a service names is in none of the namespaces
    /// searched.
    #[error("hook ConfigMap {name} not found in namespaces {namespaces:?}")]
    ConfigMapNotFound {
        /// The ConfigMap's name.
        name: String,
        /// The namespaces searched.
        namespaces: Vec<String>,
    },
    /// A service without hooks was asked to run them.
    #[error("service {0} has no hooks")]
    NoHooks(String),
    /// `hooks run`: a hook did not succeed (each result is printed).
    #[error("a hook did not succeed")]
    HookFailed,
}

/// The agent library's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
