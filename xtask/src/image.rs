//! `cargo xtask image [--tag T]`: build the container image from the root `Dockerfile` with
//! docker or podman, passing the toolchain pins of `setup` and the eBPF recipe as build
//! arguments so the image is built exactly as this machine builds.
//!
//! The one skip: when neither `docker` nor `podman` is installed, it says that no container
//! runtime exists and that no image was built, and succeeds. A runtime that is installed but
//! does not work (no daemon, no permission) and a failed build (e.g. base images that cannot be
//! pulled) are failures.

use std::process::Command;

use anyhow::bail;

use crate::ebpf_recipe::EBPF_TOOLCHAIN;
use crate::setup::{BPF_LINKER, LLVM};
use crate::util::{run as sh, workspace_root};

/// Stable Rust of the builder stage: the workspace's `rust-version`.
const RUST_VERSION: &str = "1.95";

/// The default tag: `skiff:<workspace version>`, as the Kubernetes manifests reference it.
pub fn default_tag() -> String {
    format!("skiff:{}", env!("CARGO_PKG_VERSION"))
}

/// What `<tool> --version` / `<tool> info` found.
enum Runtime {
    /// Installed and answering: build with it.
    Usable(&'static str),
    /// Installed but `info` failed (daemon down, no permission); its stderr.
    Broken(&'static str, String),
}

/// Probes docker, then podman: installed (`--version` runs) and working (`info` succeeds).
fn probe() -> Vec<Runtime> {
    let mut found = Vec::new();
    for tool in ["docker", "podman"] {
        let installed = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            continue;
        }
        match Command::new(tool).arg("info").output() {
            Ok(o) if o.status.success() => found.push(Runtime::Usable(tool)),
            Ok(o) => found.push(Runtime::Broken(
                tool,
                String::from_utf8_lossy(&o.stderr).trim().to_string(),
            )),
            Err(e) => found.push(Runtime::Broken(tool, e.to_string())),
        }
    }
    found
}

/// The build arguments that pin the builder stage's toolchains.
fn build_args() -> [(&'static str, String); 4] {
    [
        ("RUST_VERSION", RUST_VERSION.to_string()),
        ("LLVM", LLVM.to_string()),
        ("BPF_LINKER", BPF_LINKER.to_string()),
        ("EBPF_TOOLCHAIN", EBPF_TOOLCHAIN.to_string()),
    ]
}

/// Build the image tagged `tag`.
pub fn run(tag: &str) -> anyhow::Result<()> {
    let runtimes = probe();
    let tool = match runtimes.iter().find_map(|r| match r {
        Runtime::Usable(t) => Some(*t),
        Runtime::Broken(..) => None,
    }) {
        Some(t) => t,
        None if runtimes.is_empty() => {
            println!(
                "image: NOT BUILT: no container runtime exists on this machine (neither `docker` \
                 nor `podman` is installed), so the image build did not run"
            );
            return Ok(());
        }
        None => {
            let why: Vec<String> = runtimes
                .iter()
                .filter_map(|r| match r {
                    Runtime::Broken(t, e) => Some(format!("`{t} info` failed: {e}")),
                    Runtime::Usable(_) => None,
                })
                .collect();
            bail!(
                "a container runtime is installed but unusable, so the image was not built: {}",
                why.join("; ")
            );
        }
    };
    let root = workspace_root();
    let mut cmd = Command::new(tool);
    cmd.current_dir(&root)
        .args(["build", "--tag", tag, "--file"])
        .arg(root.join("Dockerfile"));
    for (k, v) in build_args() {
        cmd.arg("--build-arg").arg(format!("{k}={v}"));
    }
    cmd.arg(".");
    if let Err(e) = sh(&mut cmd) {
        bail!(
            "{e:#}\nimage: NOT BUILT with {tool}. If the log above shows that \
             docker.io/library/rust:{RUST_VERSION}-bookworm or debian:bookworm-slim could not be \
             pulled, this machine cannot reach the registry: pull or mirror them first"
        );
    }
    println!("image: built {tag} with {tool}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Dockerfile's `ARG NAME=default` lines.
    fn dockerfile_defaults() -> Vec<(String, String)> {
        let text =
            std::fs::read_to_string(workspace_root().join("Dockerfile")).expect("Dockerfile");
        text.lines()
            .filter_map(|l| l.strip_prefix("ARG "))
            .filter_map(|a| a.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    #[test]
    fn dockerfile_defaults_match_the_pins() {
        let defaults = dockerfile_defaults();
        for (k, v) in build_args() {
            let found: Vec<&String> = defaults
                .iter()
                .filter(|(dk, _)| dk == k)
                .map(|(_, dv)| dv)
                .collect();
            assert_eq!(found, vec![&v], "ARG {k} in the Dockerfile");
        }
        assert_eq!(defaults.len(), build_args().len(), "{defaults:?}");
    }

    #[test]
    fn rust_version_is_the_workspace_minimum() {
        let manifest =
            std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("Cargo.toml");
        assert!(
            manifest.contains(&format!("rust-version = \"{RUST_VERSION}\"")),
            "workspace rust-version differs from the image's {RUST_VERSION}"
        );
    }

    #[test]
    fn default_tag_is_what_the_manifests_use() {
        let ds = std::fs::read_to_string(workspace_root().join("deploy/kubernetes/daemonset.yaml"))
            .expect("daemonset.yaml");
        assert!(
            ds.contains(&format!("image: {}", default_tag())),
            "{}",
            default_tag()
        );
    }
}
