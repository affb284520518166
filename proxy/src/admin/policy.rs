//! What the admin API lets a caller do: the bind address it may use, which requests may change
//! state, how large a request may be, and which paths a node-mode pod request may name.
//!
//! The admin API runs with skiff's privileges (root in node mode), so by default it listens on
//! loopback only, answers reads only, and never lets a request name an arbitrary file or
//! namespace. Each relaxation is a flag of `skiff run` (docs/compat/hostile.md).

use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Where the admin listens when neither `--admin` nor the bootstrap's `admin.address` says.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

/// Largest request body the admin reads (admin arguments travel in the query string).
pub const MAX_BODY_BYTES: u64 = 64 * 1024;

/// Admin connections open at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client gets to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of one admin server. `Default` is the safe one: no state changes, no pod
/// bootstraps, bounded bodies and header reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminOptions {
    /// `--admin-mutations`: allow the requests that change state (`POST /drain_listeners`,
    /// `POST`/`DELETE /debug/node/*`).
    pub allow_mutations: bool,
    /// `--pod-bootstrap-dir`: the only directory a pod's `bootstrap=` may name a file in.
    pub pod_bootstrap_dir: Option<PathBuf>,
    /// Request bodies above this are answered 413.
    pub max_body_bytes: u64,
    /// Connections that have not sent a request's headers within this are closed.
    pub header_read_timeout: Duration,
    /// Graceful drain period of `/drain_listeners?graceful` (`--drain-time`).
    pub drain_time: Duration,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            allow_mutations: false,
            pod_bootstrap_dir: None,
            max_body_bytes: MAX_BODY_BYTES,
            header_read_timeout: HEADER_READ_TIMEOUT,
            drain_time: Duration::from_secs(5),
        }
    }
}

/// Why an admin address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Anyone who can reach the admin can read the whole configuration (and, with
    /// `--admin-mutations`, change state): a non-loopback bind must be asked for.
    #[error(
        "admin address {addr} (from {from}) is not loopback: anyone reaching it can read the \
         configuration; pass --admin-allow-remote to bind it anyway"
    )]
    NotLoopback {
        /// The address.
        addr: SocketAddr,
        /// `--admin` or `the bootstrap's admin.address`.
        from: &'static str,
    },
}

/// The admin address of `skiff run`: `--admin`, else the bootstrap's `admin.address`, else
/// [`DEFAULT_ADDR`]. A non-loopback address needs `allow_remote`.
pub fn admin_addr(
    flag: Option<SocketAddr>,
    bootstrap: Option<SocketAddr>,
    allow_remote: bool,
) -> Result<SocketAddr, AddrError> {
    let (addr, from) = match (flag, bootstrap) {
        (Some(a), _) => (a, "--admin"),
        (None, Some(a)) => (a, "the bootstrap's admin.address"),
        (None, None) => return Ok(DEFAULT_ADDR),
    };
    if !allow_remote && !addr.ip().is_loopback() {
        return Err(AddrError::NotLoopback { addr, from });
    }
    Ok(addr)
}

/// Why a node-mode pod request names a path skiff will not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodPathError {
    /// The namespace path is not one of the two shapes a network namespace has.
    #[error(
        "netns {0:?} is refused: use /run/netns/NAME or /proc/PID/ns/net (skiff enters it as root)"
    )]
    Netns(PathBuf),
    /// A bootstrap was named but skiff was not given a directory for pod bootstraps.
    #[error(
        "bootstrap {0:?} is refused: pod bootstraps are read only from --pod-bootstrap-dir, \
         which is not set"
    )]
    NoBootstrapDir(PathBuf),
    /// The bootstrap resolves to a file outside the configured directory (or does not exist).
    #[error("bootstrap {path:?} is refused: it is not a file inside --pod-bootstrap-dir {dir:?}")]
    BootstrapOutside {
        /// As given.
        path: PathBuf,
        /// The configured directory.
        dir: PathBuf,
    },
}

/// Accepts `/run/netns/NAME` and `/proc/PID/ns/net` (PID digits), nothing else: no `..`, no
/// other file a root process could be made to `setns` into or open.
pub fn check_netns(p: &Path) -> Result<(), PodPathError> {
    let refuse = || PodPathError::Netns(p.to_path_buf());
    let parts: Vec<&str> = p
        .components()
        .map(|c| match c {
            Component::RootDir => Some("/"),
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(refuse)?;
    let ok = match parts.as_slice() {
        ["/", "run", "netns", name] => !name.is_empty(),
        ["/", "proc", pid, "ns", "net"] => {
            !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        }
        _ => false,
    };
    if ok { Ok(()) } else { Err(refuse()) }
}

/// The pod bootstrap `p` resolved inside `dir` (relative names are taken inside it); symlinks
/// are resolved first, so a link cannot lead out of the directory.
pub fn check_bootstrap(p: &Path, dir: Option<&Path>) -> Result<PathBuf, PodPathError> {
    let Some(dir) = dir else {
        return Err(PodPathError::NoBootstrapDir(p.to_path_buf()));
    };
    let outside = || PodPathError::BootstrapOutside {
        path: p.to_path_buf(),
        dir: dir.to_path_buf(),
    };
    let root = std::fs::canonicalize(dir).map_err(|_| outside())?;
    let resolved = std::fs::canonicalize(dir.join(p)).map_err(|_| outside())?;
    if resolved.starts_with(&root) && resolved.is_file() {
        Ok(resolved)
    } else {
        Err(outside())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_address_defaults_to_loopback_and_refuses_remote_without_the_flag() {
        assert_eq!(admin_addr(None, None, false), Ok(DEFAULT_ADDR));
        let lo: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:15000".parse().unwrap();
        let v6lo: SocketAddr = "[::1]:15000".parse().unwrap();
        assert_eq!(admin_addr(None, Some(lo), false), Ok(lo));
        assert_eq!(admin_addr(Some(v6lo), Some(any), false), Ok(v6lo));
        let e = admin_addr(None, Some(any), false).unwrap_err();
        assert!(e.to_string().contains("bootstrap's admin.address"), "{e}");
        let e = admin_addr(Some(any), None, false).unwrap_err();
        assert!(e.to_string().contains("--admin-allow-remote"), "{e}");
        assert_eq!(admin_addr(Some(any), None, true), Ok(any));
    }

    #[test]
    fn netns_paths_are_only_run_netns_or_proc_pid() {
        for ok in ["/run/netns/pod-a", "/proc/1234/ns/net"] {
            assert_eq!(check_netns(Path::new(ok)), Ok(()), "{ok}");
        }
        for bad in [
            "/etc/shadow",
            "/run/netns/../../etc/shadow",
            "/run/netns/a/b",
            "/run/netns",
            "/proc/self/ns/net",
            "/proc/12/ns/mnt",
            "run/netns/a",
            "/proc/1x/ns/net",
        ] {
            assert!(check_netns(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_bootstraps_come_only_from_the_configured_directory() {
        let base = std::env::temp_dir().join(format!("skiff-admin-policy-{}", std::process::id()));
        let dir = base.join("pods");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "node: {id: a}\n").unwrap();
        std::fs::write(base.join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), dir.join("link")).unwrap();
        let got = check_bootstrap(Path::new("a.yaml"), Some(&dir)).unwrap();
        assert!(got.ends_with("pods/a.yaml"));
        assert!(check_bootstrap(&dir.join("a.yaml"), Some(&dir)).is_ok());
        for bad in ["../secret", "link", "missing.yaml", "/etc/passwd", "."] {
            let e = check_bootstrap(Path::new(bad), Some(&dir)).unwrap_err();
            assert!(
                matches!(e, PodPathError::BootstrapOutside { .. }),
                "{bad}: {e}"
            );
        }
        assert!(matches!(
            check_bootstrap(Path::new("a.yaml"), None),
            Err(PodPathError::NoBootstrapDir(_))
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
