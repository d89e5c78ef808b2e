//! The krew manifest `krew/ha.yaml` stays in step with the crate: krew's
//! format, the plugin's name, the crate's version, and for each platform an
//! archive holding the `kubectl-ha` binary, its URL and sha256 left for a
//! release to fill (or filled: a 64-digit hex sha256).

use serde_yaml::Value;

fn manifest() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/krew/ha.yaml");
    let text = std::fs::read_to_string(path).expect("krew/ha.yaml exists");
    serde_yaml::from_str(&text).expect("krew/ha.yaml is YAML")
}

#[test]
fn krew_manifest_names_the_plugin_its_version_and_each_platform_archive() {
    let m = manifest();
    assert_eq!(
        m["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(m["kind"].as_str(), Some("Plugin"));
    assert_eq!(
        m["metadata"]["name"].as_str(),
        Some("ha"),
        "krew invokes it as kubectl ha and wants the file named ha.yaml"
    );
    let version = format!("v{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        m["spec"]["version"].as_str(),
        Some(version.as_str()),
        "spec.version is the crate's version with a v"
    );
    assert!(
        m["spec"]["shortDescription"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let platforms = m["spec"]["platforms"]
        .as_sequence()
        .expect("spec.platforms");
    let mut seen = Vec::new();
    for p in platforms {
        let os = p["selector"]["matchLabels"]["os"].as_str().expect("os");
        let arch = p["selector"]["matchLabels"]["arch"].as_str().expect("arch");
        seen.push(format!("{os}/{arch}"));
        assert_eq!(p["bin"].as_str(), Some("kubectl-ha"), "{os}/{arch}");
        assert_eq!(
            p["files"][0]["from"].as_str(),
            Some("kubectl-ha"),
            "{os}/{arch}"
        );
        let uri = p["uri"].as_str().expect("uri");
        assert!(
            uri.ends_with(&format!("kubectl-ha_{os}_{arch}.tar.gz")),
            "{os}/{arch}: {uri}"
        );
        assert!(
            uri.starts_with("@RELEASE_URL@/") || uri.starts_with("https://"),
            "{os}/{arch}: {uri} is the release's placeholder or an https URL"
        );
        let sha = p["sha256"].as_str().expect("sha256");
        let placeholder = format!("@SHA256_{}_{}@", os.to_uppercase(), arch.to_uppercase());
        assert!(
            sha == placeholder || (sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit())),
            "{os}/{arch}: sha256 {sha}"
        );
    }
    assert!(seen.contains(&"linux/amd64".to_owned()), "{seen:?}");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "one entry per platform: {seen:?}");
}
