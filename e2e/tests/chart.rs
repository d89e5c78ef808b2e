//! The Helm chart renders, keeps CRDs behind `crds.install`, and every object
//! it renders is accepted by the real API server (server-side dry run).

use std::process::Command;

use kubeha_e2e::deps::Binaries;
use kubeha_e2e::lab::Lab;

fn helm_template(lab: &Lab, extra: &[&str]) -> String {
    let chart = lab.root().join("charts").join("kubeha");
    let out = Command::new(Binaries::cached().helm)
        .args([
            "template",
            "kubeha",
            chart.to_str().unwrap(),
            "--namespace",
            "kubeha-system",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn chart_renders_and_the_api_server_accepts_it() {
    let lab = Lab::of_this_checkout();
    lab.ensure_up().unwrap();
    let chart = lab.root().join("charts").join("kubeha");
    let lint = Command::new(Binaries::cached().helm)
        .args(["lint", chart.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&lint.stdout)
    );

    let with_crds = helm_template(&lab, &[]);
    assert_eq!(
        with_crds.matches("kind: CustomResourceDefinition").count(),
        2
    );
    assert!(
        with_crds.contains("helm.sh/resource-policy: keep"),
        "CRDs must survive helm uninstall"
    );
    assert!(with_crds.contains("kind: DaemonSet") && with_crds.contains("kind: Deployment"));
    let without = helm_template(&lab, &["--set", "crds.install=false"]);
    assert_eq!(without.matches("kind: CustomResourceDefinition").count(), 0);

    let _ = lab.kubectl_output(&["create", "namespace", "kubeha-system"]);
    let file = std::env::temp_dir().join(format!("kubeha-chart-{}.yaml", std::process::id()));
    std::fs::write(&file, without).unwrap();
    let out = lab
        .kubectl_ok(&["apply", "--dry-run=server", "-f", file.to_str().unwrap()])
        .unwrap();
    assert!(
        out.contains("daemonset.apps/kubeha-agent created (server dry run)"),
        "{out}"
    );
    let _ = std::fs::remove_file(file);
}
