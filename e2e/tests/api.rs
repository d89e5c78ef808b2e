//! The kubeha API against a real kube-apiserver: CRDs install, examples
//! apply, printer columns and `kubectl explain` show, and every invalid
//! manifest is rejected with a message that names the offending field.

use std::path::{Path, PathBuf};

use kubeha_e2e::lab::Lab;

fn lab() -> Lab {
    let lab = Lab::of_this_checkout();
    lab.ensure_up().expect("the lab control plane must come up");
    lab
}

fn testdata(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(dir)
}

/// The `# expect: TEXT` lines of a test manifest.
fn expectations(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: ").map(str::to_owned))
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Applies `path` and returns the error text, failing if the API server
/// accepted it.
fn rejection(lab: &Lab, args: &[&str], path: &Path) -> String {
    let mut all = args.to_vec();
    all.extend(["-f", path.to_str().unwrap()]);
    let out = lab.kubectl_output(&all).unwrap();
    assert!(
        !out.status.success(),
        "{} was accepted by the API server",
        path.display()
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn crds_install_and_examples_apply() {
    let lab = lab();
    let out = lab
        .kubectl_ok(&[
            "get",
            "crd",
            "haclusters.kubeha.io",
            "haservices.kubeha.io",
            "-o",
            "name",
        ])
        .unwrap();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "customresourcedefinition.apiextensions.k8s.io/haclusters.kubeha.io",
            "customresourcedefinition.apiextensions.k8s.io/haservices.kubeha.io"
        ]
    );
    let examples = lab.root().join("examples");
    for file in ["hacluster.yaml", "haservice.yaml"] {
        let path = examples.join(file);
        lab.kubectl_ok(&["apply", "--dry-run=server", "-f", path.to_str().unwrap()])
            .unwrap();
    }
    // The API server defaulted what the example left out.
    let applied = lab
        .kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "-o",
            "json",
            "-f",
            examples.join("haservice.yaml").to_str().unwrap(),
        ])
        .unwrap();
    let svc: serde_json::Value = serde_json::from_str(&applied).unwrap();
    assert_eq!(svc["spec"]["hooks"]["source"]["hostPath"], "demo");
    assert_eq!(
        svc["spec"]["garp"]["refreshSeconds"], 0,
        "defaults are filled in: {svc}"
    );
}

#[test]
fn printer_columns_show_state_at_a_glance() {
    let lab = lab();
    let cluster = "printer-columns";
    let manifest = format!(
        r#"{{"apiVersion":"kubeha.io/v1alpha1","kind":"HACluster","metadata":{{"name":"{cluster}"}},
            "spec":{{"members":{{"nodes":[{{"name":"node-1"}},{{"name":"node-2","mode":"locked"}}]}},"vipPool":["198.18.0.96/28"]}}}}"#
    );
    let service = r#"{"apiVersion":"kubeha.io/v1alpha1","kind":"HAService","metadata":{"name":"printer-columns","namespace":"default"},
        "spec":{"clusterRef":"printer-columns","vips":[{"address":"198.18.0.101/24"},{"address":"2001:db8::101/64"}]}}"#;
    let dir = std::env::temp_dir().join(format!("kubeha-printer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.json"), manifest).unwrap();
    std::fs::write(dir.join("s.json"), service).unwrap();
    lab.kubectl_ok(&["apply", "-f", dir.join("c.json").to_str().unwrap()])
        .unwrap();
    lab.kubectl_ok(&["apply", "-f", dir.join("s.json").to_str().unwrap()])
        .unwrap();
    lab.kubectl_ok(&[
        "patch",
        "hacluster",
        cluster,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"ready":"1/2","state":"default-locked","servicesActive":1}}"#,
    ])
    .unwrap();
    lab.kubectl_ok(&[
        "patch",
        "haservice",
        "printer-columns",
        "-n",
        "default",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Active","activeNode":"node-1","standbyNode":"node-2","epoch":4,"vips":"198.18.0.101/24,2001:db8::101/64"}}"#,
    ])
    .unwrap();

    let clusters = lab.kubectl_ok(&["get", "haclusters", cluster]).unwrap();
    let mut lines = clusters.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["NAME", "READY", "STATE", "ACTIVE", "AGE"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], [cluster, "1/2", "default-locked", "1"]);

    let services = lab
        .kubectl_ok(&["get", "hasvc", "-n", "default", "printer-columns"])
        .unwrap();
    let mut lines = services.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        [
            "NAME", "CLUSTER", "PHASE", "ACTIVE", "STANDBY", "VIPS", "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        [
            "printer-columns",
            cluster,
            "Active",
            "node-1",
            "node-2",
            "198.18.0.101/24,2001:db8::101/64"
        ]
    );

    // Short names work too.
    assert!(
        lab.kubectl_ok(&["get", "hac", cluster])
            .unwrap()
            .contains("default-locked")
    );

    lab.kubectl_ok(&["delete", "haservice", "-n", "default", "printer-columns"])
        .unwrap();
    lab.kubectl_ok(&["delete", "hacluster", cluster]).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn explain_prints_the_doc_comments() {
    let lab = lab();
    let out = lab
        .kubectl_ok(&["explain", "haservice.spec.hooks"])
        .unwrap();
    for text in [
        "Hook scripts that start, stop and monitor the service",
        "timeoutSeconds",
        "SIGTERM",
        "Where the scripts come from",
        "E<nn>name",
    ] {
        assert!(
            out.contains(text),
            "`kubectl explain haservice.spec.hooks` lacks {text:?}:\n{out}"
        );
    }
    let out = lab
        .kubectl_ok(&["explain", "hacluster.spec.members.nodes.mode"])
        .unwrap();
    assert!(
        out.contains("peerdown") && out.contains("survives reboots"),
        "{out}"
    );
}

#[test]
fn invalid_manifests_are_rejected_naming_the_field() {
    let lab = lab();
    let files = yaml_files(&testdata("invalid"));
    assert!(files.len() >= 20, "only {} invalid manifests", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let expected = expectations(file);
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            file.display()
        );
        assert!(
            expected[0].starts_with("spec.") || expected[0] == "metadata.name",
            "{}: the first expectation must be the offending field path",
            file.display()
        );
        let message = rejection(&lab, &["apply", "--dry-run=server"], file);
        for e in &expected {
            if !message.contains(e.as_str()) {
                failures.push(format!(
                    "{}: message lacks {e:?}: {message}",
                    file.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every file is a different mistake: no two share their expectations.
    let mut seen = std::collections::HashSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let first = text.lines().next().unwrap().to_owned();
        assert!(
            seen.insert(first.clone()),
            "two manifests describe the same mistake: {first}"
        );
    }
}

#[test]
fn update_only_mistakes_are_rejected() {
    let lab = lab();
    let dir = testdata("invalid-update");
    let updates: Vec<PathBuf> = yaml_files(&dir)
        .into_iter()
        .filter(|p| !p.to_str().unwrap().ends_with(".base.yaml"))
        .collect();
    assert!(!updates.is_empty());
    for update in updates {
        let base = update.with_extension("base.yaml");
        let base_arg = base.to_str().unwrap();
        // Start clean, create the valid object, then try the update.
        let _ = lab.kubectl_output(&["delete", "--ignore-not-found", "-f", base_arg]);
        lab.kubectl_ok(&["create", "-f", base_arg]).unwrap();
        let message = rejection(&lab, &["apply"], &update);
        for e in expectations(&update) {
            assert!(
                message.contains(&e),
                "{}: message lacks {e:?}: {message}",
                update.display()
            );
        }
        // Nothing was half-applied: the stored object is still the base.
        let stored = lab
            .kubectl_ok(&["get", "-f", base_arg, "-o", "json"])
            .unwrap();
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
        let read = |p: &Path| -> serde_json::Value {
            serde_yaml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (base_obj, update_obj) = (read(&base), read(&update));
        let changed: Vec<&String> = update_obj["spec"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| update_obj["spec"][k.as_str()] != base_obj["spec"][k.as_str()])
            .collect();
        assert!(
            !changed.is_empty(),
            "{}: the update changes nothing",
            update.display()
        );
        for key in changed {
            assert_eq!(
                stored["spec"][key],
                base_obj["spec"][key],
                "{}: spec.{key} changed",
                update.display()
            );
        }
        lab.kubectl_ok(&["delete", "-f", base_arg]).unwrap();
    }
}
