//! Hook sources from a ConfigMap, written out as files the hook runner checks
//! like any other.

use std::time::Duration;

use kube::Client;
use kube::api::Api;

/// Writes the scripts of a ConfigMap hook source into `dir` (mode 0755,
/// owned by the agent's user, root), removing scripts the ConfigMap no longer
/// has. The first namespace holding the ConfigMap wins.
pub(super) async fn materialize_config_map(
    client: &Client,
    namespaces: &[String],
    name: &str,
    dir: &std::path::Path,
) -> crate::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use std::os::unix::fs::PermissionsExt;
    let mut found = None;
    for ns in namespaces {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        if let Ok(Some(cm)) = tokio::time::timeout(Duration::from_secs(3), api.get_opt(name))
            .await
            .unwrap_or(Ok(None))
        {
            found = Some(cm);
            break;
        }
    }
    let Some(cm) = found else {
        return Err(crate::Error::ConfigMapNotFound {
            name: name.to_owned(),
            namespaces: namespaces.to_vec(),
        });
    };
    std::fs::create_dir_all(dir)?;
    let data = cm.data.unwrap_or_default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !data.contains_key(entry.file_name().to_string_lossy().as_ref()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    for (key, script) in data {
        if key.contains('/') || key.starts_with('.') {
            tracing::warn!(
                configmap = name,
                key,
                "skipping a ConfigMap key that is not a plain file name"
            );
            continue;
        }
        let tmp = dir.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, script)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, dir.join(&key))?;
    }
    Ok(())
}
