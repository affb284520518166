//! Dropping the capabilities `skiff run` no longer needs once its capture is loaded and
//! attached and its listeners are bound (`--keep-caps` opts out).
//!
//! Linux keeps capabilities per thread: [`drop_to`] applies to the calling thread at once and
//! records the wanted set; every other runtime thread applies it from the runtime's
//! `on_thread_start`/`on_thread_park` hooks ([`apply_pending`]), so a worker drops its
//! capabilities before it runs anything else after its next idle moment. Threads that are
//! neither (the handover thread starts after the drop and inherits it) keep what they had.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Capability numbers (include/uapi/linux/capability.h).
pub mod cap {
    /// SETPCAP: drop from the bounding set.
    pub const SETPCAP: u32 = 8;
    /// NET_BIND_SERVICE: LDS listeners on ports below 1024.
    pub const NET_BIND_SERVICE: u32 = 10;
    /// NET_ADMIN: SO_MARK, netlink SOCK_DESTROY, iptables.
    pub const NET_ADMIN: u32 = 12;
    /// NET_RAW: the iptables binary.
    pub const NET_RAW: u32 = 13;
    /// SYS_PTRACE: opening a pod's /proc/PID/ns/net (node mode).
    pub const SYS_PTRACE: u32 = 19;
    /// SYS_ADMIN: bpf() where CAP_BPF is not enough, setns, pod cgroups (node mode).
    pub const SYS_ADMIN: u32 = 21;
    /// SYS_RESOURCE: memlock for maps created at run time (node-mode pods).
    pub const SYS_RESOURCE: u32 = 24;
    /// BPF: map updates by the fast-path owner and the gate when unprivileged BPF is off.
    pub const BPF: u32 = 39;
    /// The highest capability number this code knows.
    pub const LAST: u32 = 40;
}

/// The capabilities a running skiff keeps (docs/ARCHITECTURE.md, "Privileges at run time",
/// says why each).
pub fn run_time_set(node_mode: bool) -> u64 {
    let mut keep = [
        cap::NET_BIND_SERVICE,
        cap::NET_ADMIN,
        cap::NET_RAW,
        cap::SYS_ADMIN,
        cap::SYS_RESOURCE,
        cap::BPF,
    ]
    .iter()
    .fold(0u64, |m, c| m | 1 << c);
    if node_mode {
        keep |= 1 << cap::SYS_PTRACE;
    }
    keep
}

/// The set every thread should hold (`u64::MAX`: nothing dropped).
static WANTED: AtomicU64 = AtomicU64::new(u64::MAX);
/// Bumped by every [`drop_to`]; a thread compares it with the last one it applied.
static GENERATION: AtomicU32 = AtomicU32::new(0);

thread_local! {
    static APPLIED: Cell<u32> = const { Cell::new(0) };
}

/// Keeps only `keep` (effective, permitted and bounding sets; inheritable emptied) on this
/// thread now and on every runtime thread at its next park.
pub fn drop_to(keep: u64) -> io::Result<()> {
    WANTED.store(keep, Ordering::SeqCst);
    GENERATION.fetch_add(1, Ordering::SeqCst);
    apply_here()
}

/// The runtime hook: applies the wanted set on this thread if it has not yet.
pub fn apply_pending() {
    if GENERATION.load(Ordering::Relaxed) != APPLIED.with(Cell::get)
        && let Err(e) = apply_here()
    {
        tracing::warn!(error = %e, "could not drop capabilities on a runtime thread");
    }
}

fn apply_here() -> io::Result<()> {
    let generation = GENERATION.load(Ordering::SeqCst);
    apply(WANTED.load(Ordering::SeqCst))?;
    APPLIED.with(|a| a.set(generation));
    Ok(())
}

/// Keeps only `keep` on this thread.
fn apply(keep: u64) -> io::Result<()> {
    // The bounding set first: it needs SETPCAP, which the capset below may drop.
    for c in 0..=cap::LAST {
        if keep & (1 << c) == 0 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
            let err = io::Error::last_os_error();
            // EINVAL: a capability this kernel does not know; EPERM: no SETPCAP (not root),
            // then the bounding set cannot matter to an exec we could have made anyway.
            if rc != 0 && !matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EPERM)) {
                return Err(err);
            }
        }
    }
    let [lo, hi] = capget()?;
    let now = (u64::from(lo.permitted) | u64::from(hi.permitted) << 32) & keep;
    capset(&[
        CapData {
            effective: now as u32,
            permitted: now as u32,
            inheritable: 0,
        },
        CapData {
            effective: (now >> 32) as u32,
            permitted: (now >> 32) as u32,
            inheritable: 0,
        },
    ])
}

/// This thread's effective set.
pub fn effective() -> io::Result<u64> {
    let [lo, hi] = capget()?;
    Ok(u64::from(lo.effective) | u64::from(hi.effective) << 32)
}

/// Names of the capabilities in `set` (`cap_net_admin`, ...; numbers for unnamed ones).
pub fn names(set: u64) -> Vec<String> {
    const NAMES: [&str; 41] = [
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "kill",
        "setgid",
        "setuid",
        "setpcap",
        "linux_immutable",
        "net_bind_service",
        "net_broadcast",
        "net_admin",
        "net_raw",
        "ipc_lock",
        "ipc_owner",
        "sys_module",
        "sys_rawio",
        "sys_chroot",
        "sys_ptrace",
        "sys_pacct",
        "sys_admin",
        "sys_boot",
        "sys_nice",
        "sys_resource",
        "sys_time",
        "sys_tty_config",
        "mknod",
        "lease",
        "audit_write",
        "audit_control",
        "setfcap",
        "mac_override",
        "mac_admin",
        "syslog",
        "wake_alarm",
        "block_suspend",
        "audit_read",
        "perfmon",
        "bpf",
        "checkpoint_restore",
    ];
    (0..64)
        .filter(|c| set & (1u64 << c) != 0)
        .map(|c| match NAMES.get(c) {
            Some(n) => format!("cap_{n}"),
            None => c.to_string(),
        })
        .collect()
}

// _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> io::Result<[CapData; 2]> {
    let mut h = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: header and a two-element data array as capget(2) expects for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut CapHeader, d.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(d)
}

fn capset(d: &[CapData; 2]) -> io::Result<()> {
    let mut h = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: header and a two-element data array as capset(2) expects for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut CapHeader, d.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_time_set_names_what_skiff_uses() {
        assert_eq!(
            names(run_time_set(false)),
            [
                "cap_net_bind_service",
                "cap_net_admin",
                "cap_net_raw",
                "cap_sys_admin",
                "cap_sys_resource",
                "cap_bpf"
            ]
        );
        assert!(names(run_time_set(true)).contains(&"cap_sys_ptrace".to_string()));
    }

    /// On a thread of its own (capabilities are per thread): what is dropped is gone, what is
    /// kept stays. Run as root, it drops for real; otherwise there is nothing to drop.
    #[test]
    fn a_thread_keeps_only_the_wanted_set() {
        std::thread::spawn(|| {
            let before = effective().unwrap();
            let keep = run_time_set(false);
            apply(keep).unwrap();
            let after = effective().unwrap();
            assert_eq!(after, before & keep, "{:?}", names(after));
        })
        .join()
        .unwrap();
    }
}
