//! Coexistence: which BPF programs already act on the hooks skiff is about to use.
//!
//! Another mesh or a CNI's socket load balancer (Cilium socket-LB, Merbridge) attached to
//! `cgroup/connect4` of the same cgroup (or an ancestor, whose programs run too) rewrites the
//! same connects; the result depends on attach order and is rarely what anyone wants. skiff
//! asks the kernel (`BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE`: programs attached at the
//! cgroup and inherited from its ancestors) before attaching, and refuses unless told to
//! coexist.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

// enum bpf_attach_type (include/uapi/linux/bpf.h); checked against aya-obj's bindings.
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_GETSOCKOPT: u32 = 21;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_SK_LOOKUP: u32 = 36;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// The hooks skiff's outbound capture attaches to the application (or node) cgroup.
pub const CAPTURE_HOOKS: [(u32, &str); 4] = [
    (BPF_CGROUP_INET4_CONNECT, "cgroup/connect4"),
    (BPF_CGROUP_INET6_CONNECT, "cgroup/connect6"),
    (BPF_CGROUP_SOCK_OPS, "sockops"),
    (BPF_CGROUP_INET4_GETPEERNAME, "cgroup/getpeername4"),
];
/// The hook skiff attaches to its own cgroup.
pub const PROXY_HOOKS: [(u32, &str); 1] = [(BPF_CGROUP_GETSOCKOPT, "cgroup/getsockopt")];
/// The hook skiff's inbound capture attaches to the network namespace.
pub const NETNS_HOOKS: [(u32, &str); 1] = [(BPF_SK_LOOKUP, "sk_lookup")];

/// One program found on a hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Foreign {
    /// Hook (ELF section style).
    pub hook: &'static str,
    /// The cgroup (the program may sit on an ancestor) or network namespace queried.
    pub target: PathBuf,
    /// Kernel program id (`bpftool prog show id N`).
    pub id: u32,
    /// Program name as the kernel knows it (15 characters at most), or `?`.
    pub name: String,
}

impl fmt::Display for Foreign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (id {}) on {} of {}",
            self.name,
            self.id,
            self.hook,
            self.target.display()
        )
    }
}

/// Errors of the query.
#[derive(Debug, thiserror::Error)]
pub enum CoexistError {
    /// The cgroup or network namespace could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// Cgroup.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// BPF_PROG_QUERY failed.
    #[error("BPF_PROG_QUERY {hook} on {path}: {source}")]
    Query {
        /// Hook.
        hook: &'static str,
        /// Cgroup.
        path: PathBuf,
        /// Cause (errno).
        #[source]
        source: io::Error,
    },
}

/// `union bpf_attr`'s `query` member (64 bytes on kernels >= 6.6; older kernels ignore the
/// zeroed tail only if it stays zero, which it does).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Program ids on `attach_type` of the cgroup or netns open as `cg` (`query_flags`:
/// BPF_F_QUERY_EFFECTIVE for cgroups; netns queries take no flags).
fn query_ids(cg: &File, attach_type: u32, query_flags: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = QueryAttr {
            target_fd: cg.as_raw_fd() as u32,
            attach_type,
            query_flags,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix of the size passed;
        // the kernel writes at most `prog_cnt` u32s to `prog_ids`, which `ids` holds.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                std::mem::size_of::<QueryAttr>() as u32,
            )
        };
        if rc == 0 {
            ids.truncate(attr.prog_cnt as usize);
            return Ok(ids);
        }
        let err = io::Error::last_os_error();
        // ENOSPC: more programs than room; the kernel said how many.
        if err.raw_os_error() == Some(libc::ENOSPC) && attr.prog_cnt as usize > ids.len() {
            ids = vec![0u32; attr.prog_cnt as usize];
            continue;
        }
        return Err(err);
    }
}

/// Programs effective on `hooks` of `cgroup` (attached there or inherited from an ancestor),
/// with their names.
pub fn attached(
    cgroup: &Path,
    hooks: &[(u32, &'static str)],
) -> Result<Vec<Foreign>, CoexistError> {
    query(cgroup, hooks, BPF_F_QUERY_EFFECTIVE)
}

/// Programs attached to the `sk_lookup` hook of the network namespace at `netns` (another
/// program there would see, and could steer, the same inbound connections first).
pub fn netns_programs(netns: &Path) -> Result<Vec<Foreign>, CoexistError> {
    query(netns, &NETNS_HOOKS, 0)
}

fn query(
    cgroup: &Path,
    hooks: &[(u32, &'static str)],
    flags: u32,
) -> Result<Vec<Foreign>, CoexistError> {
    let cg = File::open(cgroup).map_err(|source| CoexistError::Open {
        path: cgroup.into(),
        source,
    })?;
    let mut found = Vec::new();
    for &(attach_type, hook) in hooks {
        let ids = query_ids(&cg, attach_type, flags).map_err(|source| CoexistError::Query {
            hook,
            path: cgroup.into(),
            source,
        })?;
        found.extend(ids.into_iter().map(|id| Foreign {
            hook,
            target: cgroup.into(),
            id,
            name: String::new(),
        }));
    }
    if !found.is_empty() {
        // Names: one walk over the loaded programs (ids are unique while loaded).
        for info in aya::programs::loaded_programs().flatten() {
            for f in found.iter_mut().filter(|f| f.id == info.id()) {
                f.name = info.name_as_str().unwrap_or("?").to_string();
            }
        }
        for f in found.iter_mut().filter(|f| f.name.is_empty()) {
            f.name = "?".into();
        }
    }
    Ok(found)
}

/// What skiff's eBPF capture would share: programs on the capture hooks of `capture_cgroup`
/// and on the getsockopt hook of `proxy_cgroup` (when it exists already).
pub fn foreign_programs(
    capture_cgroup: &Path,
    proxy_cgroup: &Path,
) -> Result<Vec<Foreign>, CoexistError> {
    let mut found = attached(capture_cgroup, &CAPTURE_HOOKS)?;
    if proxy_cgroup.is_dir() {
        found.extend(attached(proxy_cgroup, &PROXY_HOOKS)?);
    } else if let Some(parent) = proxy_cgroup.parent() {
        // A new proxy cgroup inherits its parent's programs.
        found.extend(attached(parent, &PROXY_HOOKS)?);
    }
    Ok(found)
}

/// The refusal message naming every program found.
pub fn refusal(found: &[Foreign]) -> String {
    let list: Vec<String> = found.iter().map(ToString::to_string).collect();
    format!(
        "other BPF programs already act on the hooks skiff would use: {}; their rewrites would \
         mix with skiff's (order-dependent). Remove them, or pass --allow-coexist to run anyway",
        list.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_attr_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<QueryAttr>(), 64);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_ids), 16);
        assert_eq!(std::mem::offset_of!(QueryAttr, prog_cnt), 24);
        assert_eq!(std::mem::offset_of!(QueryAttr, revision), 56);
    }

    #[test]
    fn refusal_names_each_program() {
        let f = Foreign {
            hook: "cgroup/connect4",
            target: "/sys/fs/cgroup/app".into(),
            id: 42,
            name: "cil_sock4_conne".into(),
        };
        let msg = refusal(&[f]);
        assert!(
            msg.contains("cil_sock4_conne (id 42) on cgroup/connect4 of /sys/fs/cgroup/app")
                && msg.contains("--allow-coexist"),
            "{msg}"
        );
    }
}
