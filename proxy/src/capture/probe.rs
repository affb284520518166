//! `--capture auto`: can this kernel and this process run skiff's eBPF capture?
//!
//! Checked, in order (the first failure is the reason given): the capabilities to load and
//! attach (CAP_BPF + CAP_NET_ADMIN, or CAP_SYS_ADMIN), a cgroup v2 mount and the cgroup to
//! capture, a bpf filesystem, and kernel support for the program types skiff attaches
//! (cgroup sock_addr for connect4/6, sock_ops, cgroup sockopt), each probed by loading a
//! trivial program.

use std::path::{Path, PathBuf};

use aya::programs::ProgramType;

// Bits of CapEff in /proc/self/status (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process (from /proc/self/status).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// Why the eBPF capture cannot run here: the first check that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `/proc/self/status` has no readable `CapEff` line.
    #[error("cannot read CapEff from /proc/self/status")]
    NoCapEff,
    /// Neither CAP_BPF nor CAP_SYS_ADMIN.
    #[error("the process lacks CAP_BPF (or CAP_SYS_ADMIN)")]
    NoCapBpf,
    /// Neither CAP_NET_ADMIN nor CAP_SYS_ADMIN.
    #[error("the process lacks CAP_NET_ADMIN (or CAP_SYS_ADMIN)")]
    NoCapNetAdmin,
    /// No cgroup v2 mount.
    #[error(transparent)]
    Cgroup2(#[from] crate::bpf::BpfError),
    /// Sidecar capture without `--cgroup`.
    #[error("no --cgroup given (the eBPF capture attaches to the application's cgroup)")]
    NoCgroup,
    /// `--cgroup` cannot be resolved.
    #[error("--cgroup {}: {error}", path.display())]
    Cgroup {
        /// As given.
        path: PathBuf,
        /// Cause (in the message, so not a `source()`).
        error: std::io::Error,
    },
    /// `--cgroup` is not a cgroup v2 directory.
    #[error("--cgroup {} is not a cgroup v2 directory under {}", path.display(), mount.display())]
    NotCgroup2 {
        /// Resolved path.
        path: PathBuf,
        /// The cgroup v2 mount.
        mount: PathBuf,
    },
    /// No bpffs to pin maps in.
    #[error("no bpf filesystem at /sys/fs/bpf (`mount -t bpf bpf /sys/fs/bpf`)")]
    NoBpffs,
    /// The kernel refuses a program type skiff attaches.
    #[error("the kernel does not support {0} programs")]
    Unsupported(&'static str),
    /// Loading the trivial program failed for another reason.
    #[error("probing {what} programs failed: {reason}")]
    Probe {
        /// Program type.
        what: &'static str,
        /// aya's error.
        reason: String,
    },
}

/// Why the capabilities are not enough, if they are not.
fn caps_problem(caps: u64) -> Option<ProbeError> {
    let bpf = has(caps, CAP_BPF) || has(caps, CAP_SYS_ADMIN);
    let net = has(caps, CAP_NET_ADMIN) || has(caps, CAP_SYS_ADMIN);
    match (bpf, net) {
        (true, true) => None,
        (false, _) => Some(ProbeError::NoCapBpf),
        (true, false) => Some(ProbeError::NoCapNetAdmin),
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// `Ok(())` when the eBPF capture can be installed for `cgroup`, else the reason it cannot
/// (one sentence, for the log).
pub fn ebpf_supported(cgroup: Option<&Path>) -> Result<(), ProbeError> {
    let caps = effective_caps().ok_or(ProbeError::NoCapEff)?;
    if let Some(p) = caps_problem(caps) {
        return Err(p);
    }
    let mount = crate::bpf::cgroup2_mount()?;
    let Some(cgroup) = cgroup else {
        return Err(ProbeError::NoCgroup);
    };
    let cgroup = std::fs::canonicalize(cgroup).map_err(|error| ProbeError::Cgroup {
        path: cgroup.to_path_buf(),
        error,
    })?;
    if !cgroup.starts_with(&mount) || !cgroup.join("cgroup.procs").is_file() {
        return Err(ProbeError::NotCgroup2 {
            path: cgroup,
            mount,
        });
    }
    if !is_bpffs(Path::new("/sys/fs/bpf")) {
        return Err(ProbeError::NoBpffs);
    }
    for (ty, what) in [
        (ProgramType::CgroupSockAddr, "cgroup sock_addr (connect4/6)"),
        (ProgramType::SockOps, "sock_ops"),
        (ProgramType::CgroupSockopt, "cgroup sockopt (getsockopt)"),
    ] {
        match aya::sys::is_program_supported(ty) {
            Ok(true) => {}
            Ok(false) => return Err(ProbeError::Unsupported(what)),
            Err(e) => {
                return Err(ProbeError::Probe {
                    what,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let status = "Name:\tskiff\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let caps = parse_cap_eff(status).unwrap();
        assert!(caps_problem(caps).is_none());
        // CAP_NET_ADMIN alone: no BPF.
        let only_net = 1u64 << CAP_NET_ADMIN;
        assert!(matches!(caps_problem(only_net), Some(ProbeError::NoCapBpf)));
        assert!(ProbeError::NoCapBpf.to_string().contains("CAP_BPF"));
        // CAP_BPF alone: cannot attach to cgroups/netns.
        let only_bpf = 1u64 << CAP_BPF;
        assert!(matches!(
            caps_problem(only_bpf),
            Some(ProbeError::NoCapNetAdmin)
        ));
        assert!(caps_problem(1u64 << CAP_SYS_ADMIN).is_none());
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
