//! ConfigMap hook sources: the hook runner fetches them itself, per
//! service and checked against the cluster's policy, into a directory per
//! namespace/name (`hooks::sources`). What is left here removes the copy by
//! name only that agents before it wrote (two namespaces' ConfigMaps of
//! one name overwrote each other there, and a failed fetch left the old
//! scripts to run).

/// Removes `dir`, the by-name copy of ConfigMap `name` older agents wrote
/// (`<state dir>/configmap-hooks/<name>`); the runner never runs it. The
/// other arguments are the transition's lookup, which the runner now does
/// (the call can go).
pub(super) async fn materialize_config_map(
    _client: &kube::Client,
    _namespaces: &[String],
    name: &str,
    dir: &std::path::Path,
) -> crate::Result<()> {
    if std::fs::symlink_metadata(dir).is_ok() {
        tracing::info!(configmap = name, dir = %dir.display(), "removing the by-name copy of a hook ConfigMap (the runner writes one per namespace/name)");
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}
