//! The operator library's error type.

/// Everything that can go wrong in the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the HAService finalizer failed, or its cleanup
    /// has not finished.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A deleted HAService is released only once its master left (or is
    /// fenced); not an error, a wait.
    #[error("waiting before releasing the HAService: {0}")]
    WaitingForRelease(String),
    /// Leader election failed.
    #[error("leader election: {0}")]
    Leader(#[from] kube_lease_manager::LeaseManagerError),
    /// Leader election stopped; this replica may no longer write.
    #[error("leader election stopped")]
    LeaderElectionStopped,
    /// A JSON value could not be built.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Binding or serving the metrics endpoint failed.
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// An object without a name or namespace where one is required.
    #[error("object has no {0}")]
    Unnamed(&'static str),
    /// A fresh heartbeat read, shared with other reconciles, failed.
    #[error("heartbeat read: {0}")]
    HeartbeatRead(String),
    /// A reconcile did not finish in time (an API call that hangs on a
    /// stalled API server or a dead connection); retried soon.
    #[error("reconcile took longer than {0:?}")]
    Timeout(std::time::Duration),
}

/// The longest one reconcile may take: its API calls have no timeout of
/// their own, and a reconcile that hangs holds its object (the controller
/// runs one reconcile per object at a time).
pub const RECONCILE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a reconcile under [`RECONCILE_TIMEOUT`].
pub async fn within_timeout<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(RECONCILE_TIMEOUT, f)
        .await
        .unwrap_or(Err(Error::Timeout(RECONCILE_TIMEOUT)))
}

impl Error {
    /// Whether this is only a wait (a deletion waiting for the master to
    /// leave), which is retried without being logged as a failure.
    pub fn is_wait(&self) -> bool {
        match self {
            Error::WaitingForRelease(_) => true,
            Error::Finalizer(e) => matches!(
                e.as_ref(),
                kube::runtime::finalizer::Error::CleanupFailed(Error::WaitingForRelease(_))
            ),
            _ => false,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
