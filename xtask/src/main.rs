//! `cargo xtask`: project automation. `crdgen` writes the CRD YAML from the
//! Rust types; `lab up|down|status` drives the local lab; `test` runs the
//! whole test suite against the lab.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kubeha_e2e::lab::Lab;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "kubeha project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write crds/manifests/*.yaml and the chart's CRD template from the Rust types.
    Crdgen {
        /// Fail instead of writing when a file would change (for CI).
        #[arg(long)]
        check: bool,
    },
    /// The local lab: a real etcd and kube-apiserver.
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
    /// Run every test (unit and lab) and tear the lab down afterwards.
    Test {
        /// Leave the lab running after the tests.
        #[arg(long)]
        keep_lab: bool,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build (once, cached) and start the control plane, install the CRDs.
    Up,
    /// Stop every lab process and remove the lab's files.
    Down,
    /// Print what runs.
    Status,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ sits in the repo root")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    let root = repo_root();
    match Cli::parse().command {
        Cmd::Crdgen { check } => crdgen(&root, check),
        Cmd::Lab { command } => {
            let lab = Lab::new(&root);
            match command {
                LabCmd::Up => {
                    lab.up()?;
                    println!("{}", lab.usage());
                    Ok(())
                }
                LabCmd::Down => lab.down(),
                LabCmd::Status => {
                    print!("{}", lab.status());
                    Ok(())
                }
            }
        }
        Cmd::Test { keep_lab } => test(&root, keep_lab),
    }
}

fn crdgen(root: &Path, check: bool) -> anyhow::Result<()> {
    let files = kubeha_crds::manifests::generated_files();
    if check {
        let drifted = kubeha_crds::manifests::drifted(root);
        if !drifted.is_empty() {
            bail!(
                "generated CRD YAML is out of date: {drifted:?}; run `cargo xtask crdgen` and commit"
            );
        }
        println!("CRD YAML matches the types");
        return Ok(());
    }
    for f in files {
        let path = root.join(f.path);
        std::fs::create_dir_all(path.parent().expect("generated files live in folders"))?;
        std::fs::write(&path, &f.contents)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", f.path);
    }
    Ok(())
}

fn test(root: &Path, keep_lab: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    // cargo test's own closing line belongs to the last crate's doc-tests;
    // read every `test result:` line and close with the workspace total.
    let mut child = Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--locked", "--color=never"])
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        std::io::stdout().flush()?;
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
            ignored += count("ignored");
        }
    }
    let status = child.wait()?;
    if !keep_lab {
        Lab::new(root).down()?;
    }
    println!("\nworkspace: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
