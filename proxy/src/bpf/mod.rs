//! Kernel side: load and attach the eBPF capture programs.
//!
//! [`Capture::install`] loads the embedded `skiff-bpf` object, fills its config and exclude
//! maps, moves this process into the proxy's own cgroup and attaches:
//!
//! | program          | hook               | sidecar mode   | node mode            |
//! |------------------|--------------------|----------------|----------------------|
//! | `skiff_connect4` | `cgroup/connect4`  | app cgroup     | node cgroup root     |
//! | `skiff_connect6` | `cgroup/connect6`  | app cgroup     | node cgroup root     |
//! | `skiff_sock_ops` | `sockops`          | app cgroup     | node cgroup root     |
//! | `skiff_orig_dst` | `cgroup/getsockopt`| proxy cgroup   | proxy cgroup         |
//! | `skiff_peername4`| `cgroup/getpeername4`| app cgroup   | node cgroup root     |
//! | `skiff_peername6`| `cgroup/getpeername6`| app cgroup   | node cgroup root     |
//!
//! The [`Capture`] owns the object and its links; each group of maps has one owner:
//!
//! | part | maps | module |
//! |------|------|--------|
//! | ready gate | `SKIFF_CONFIG` (`ready`; shares the entry with the fast path's `fast_gen`) | [`gate`] |
//! | meshed cgroups (node mode) | `SKIFF_MESHED_V2` (cgroup id -> fast-path scope) | [`meshed`] |
//! | kernel counters | `SKIFF_STATS`, `SKIFF_SVCST_V2`, `SKIFF_ORIG_DST` (read only) | [`counters`] |
//! | kernel events | `SKIFF_EVENTS` (ring buffer), `SKIFF_EV_CFG`, `SKIFF_EV_LOST` | [`events`] |
//! | fast path | services, clusters, slots, Maglev, `SKIFF_EP_ACTIVE`, `SKIFF_EP_LOAD` | [`fastpath`], written only by the [`owner`] task |
//!
//! With [`CaptureConfig::fast_path`], the [`Owner`] task mirrors the services that need no
//! proxy ([`projection`]) into the kernel ([`reconciler`]); connect4 then sends them straight to
//! an endpoint. Every pipeline (the sidecar's or node's own, and in node mode each pod's) is a
//! scope of its own: a connect only sees the services of its cgroup's scope.
//!
//! In node mode connect4/6 capture only tasks whose cgroup id is in the meshed set
//! ([`meshed::Meshed`]). The links belong to the [`Capture`]: dropping it clears the ready flag,
//! detaches everything (removing the [`pin`] directory first) and moves the process back to its
//! original cgroup. Pinned, the capture outlives a killed skiff; connect4/6 then find no proxy
//! listener and apply the fail mode to proxy-bound connects, and a restarted skiff takes the
//! pins over (see [`pin`]).
//!
//! The proxy answers `SO_ORIGINAL_DST` on its accepted sockets as it would with iptables: the
//! `getsockopt` program reads the original destination that `connect4/6` recorded and
//! `sock_ops` re-keyed by connection tuple.

mod cgroup;
pub mod counters;
pub mod events;
mod exclude;
pub mod explain;
pub mod fastpath;
pub mod gate;
pub mod inbound;
mod loader;
mod log;
pub mod meshed;
pub mod owner;
pub mod pin;
pub mod projection;
pub mod reconciler;
pub mod terminate;

use std::{
    error::Error as StdError,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
};

pub use cgroup::{cgroup_id, cgroup2_mount};
pub use fastpath::{FastPathGauges, FastPathView};
pub use loader::{Capture, XdpInterface};
pub use owner::{ApplyError, Owner};
pub use reconciler::{ApplyReport, Capacity, ScopeId};
pub use skiff_common::NODE_SCOPE;

/// Default outbound listener port (Istio's 15001).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default SO_MARK of the proxy's upstream sockets (Istio's 1337).
pub const DEFAULT_PROXY_MARK: u32 = 0x539;

/// What to capture and where to send it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where the programs attach.
    pub mode: CaptureMode,
    /// The proxy's IPv4 outbound listener (default 127.0.0.1:15001).
    pub outbound_v4: SocketAddrV4,
    /// The proxy's IPv6 outbound listener (default [::1]:15001); `None`: IPv6 is not captured
    /// (v4-mapped IPv6 still is, to `outbound_v4`).
    pub outbound_v6: Option<SocketAddrV6>,
    /// SO_MARK the proxy sets on its upstream sockets; marked sockets are never captured.
    /// 0 disables the guard (loops are then prevented only by the cgroup layout).
    pub proxy_mark: u32,
    /// While the proxy is not ready, refuse connects (ECONNREFUSED) instead of letting them go
    /// to their original destination.
    pub fail_closed: bool,
    /// Destination ports never captured (Istio's excludeOutboundPorts).
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs never captured (Istio's excludeOutboundIPRanges).
    pub exclude_cidrs: Vec<(IpAddr, u8)>,
    /// Kernel fast path (plain-L4 services connect straight to an endpoint) with these map
    /// sizes; `None`: every captured connect goes to the proxy.
    pub fast_path: Option<Capacity>,
    /// With the fast path: once an update takes an endpoint out of the kernel maps, destroy the
    /// application's fast-path sockets still connected to it (netlink `SOCK_DESTROY`).
    pub terminate_on_removal: bool,
    /// `--sockmap`: local socket pairs on these service ports move their payload
    /// socket-to-socket (sk_msg); empty: off.
    pub sockmap_ports: Vec<u16>,
    /// `--xdp`: interfaces the XDP node-ingress load balancer runs on (needs `fast_path`);
    /// empty: off.
    pub xdp_interfaces: Vec<String>,
    /// Where the links and kept maps are pinned (see [`pin`]).
    pub pinning: Pinning,
    /// Kernel events: rate limit, ring size and the kernel access log (see [`events`]).
    pub events: events::EventsConfig,
}

/// Whether and where the capture pins its links and maps (`--pin-dir`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Nothing pinned: the links detach when skiff exits, however it exits.
    Off,
    /// `/sys/fs/bpf/skiff/<capture cgroup id>` when /sys/fs/bpf is bpffs, else off (logged).
    Default,
    /// This directory (must be on bpffs).
    Dir(PathBuf),
}

/// Where the capture programs attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// connect4/6 and sock_ops on the application's cgroup; getsockopt on the proxy's cgroup.
    Sidecar {
        cgroup: PathBuf,
        proxy_cgroup: PathBuf,
    },
    /// Everything at a node cgroup root; only meshed cgroups are captured. getsockopt is
    /// attached to the proxy's cgroup (usually a child of the root).
    Node {
        cgroup_root: PathBuf,
        proxy_cgroup: PathBuf,
    },
}

impl CaptureConfig {
    /// Defaults (127.0.0.1:15001, [::1]:15001, mark 0x539, fail-open, no exclusions) for `mode`.
    pub fn new(mode: CaptureMode) -> Self {
        Self {
            mode,
            outbound_v4: SocketAddrV4::new(Ipv4Addr::LOCALHOST, DEFAULT_OUTBOUND_PORT),
            outbound_v6: Some(SocketAddrV6::new(
                Ipv6Addr::LOCALHOST,
                DEFAULT_OUTBOUND_PORT,
                0,
                0,
            )),
            proxy_mark: DEFAULT_PROXY_MARK,
            fail_closed: false,
            exclude_ports: Vec::new(),
            exclude_cidrs: Vec::new(),
            fast_path: None,
            terminate_on_removal: false,
            sockmap_ports: Vec::new(),
            xdp_interfaces: Vec::new(),
            pinning: Pinning::Default,
            events: events::EventsConfig::default(),
        }
    }
}

impl CaptureMode {
    /// The cgroup connect4/6 and sock_ops attach to.
    pub fn capture_cgroup(&self) -> &Path {
        match self {
            Self::Sidecar { cgroup, .. } => cgroup,
            Self::Node { cgroup_root, .. } => cgroup_root,
        }
    }

    /// The proxy's own cgroup (getsockopt attaches here; the process joins it).
    pub fn proxy_cgroup(&self) -> &Path {
        match self {
            Self::Sidecar { proxy_cgroup, .. } | Self::Node { proxy_cgroup, .. } => proxy_cgroup,
        }
    }

    /// Whether this is node mode.
    pub fn is_node(&self) -> bool {
        matches!(self, Self::Node { .. })
    }
}

/// A map operation that failed, as a [`BpfError`] naming the map and the operation.
fn map_err(map: &'static str, op: impl Into<String>, source: aya::maps::MapError) -> BpfError {
    BpfError::Map {
        map,
        op: op.into(),
        source: Box::new(source),
    }
}

/// The counters of a per-CPU array named `map`, index `i` named `names[i]`, each summed over
/// the CPUs.
fn per_cpu_sums(
    stats: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    map: &'static str,
    names: &[&'static str],
) -> Result<Vec<(&'static str, u64)>, BpfError> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let per_cpu = stats
                .get(&(i as u32), 0)
                .map_err(|source| map_err(map, format!("get {i}"), source))?;
            Ok((*name, per_cpu.iter().sum()))
        })
        .collect()
}

/// Takes `map` out of the loaded object as the typed map `M` (each map can be taken once).
fn take<M>(ebpf: &mut aya::Ebpf, map: &'static str) -> Result<M, BpfError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let raw = ebpf.take_map(map).ok_or(BpfError::MapMissing { map })?;
    M::try_from(raw)
        .map_err(|source| map_err(map, "open with the expected key/value types", source))
}

/// The program `(name, hook)` of the loaded object as its aya type `P` (`SkLookup`, ...).
fn program<'a, P>(
    ebpf: &'a mut aya::Ebpf,
    (program, hook): (&'static str, &'static str),
) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(BpfError::ProgramMissing { program, hook })?
        .try_into()
        .map_err(|source| BpfError::load((program, hook), source))
}

/// Errors of the BPF loader. Each names the program, hook, cgroup or map and the errno.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "no cgroup2 filesystem in /proc/self/mountinfo; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`)"
    )]
    NoCgroup2,
    #[error("{what} {path}: {source} ({errno})", errno = Errno::of(.source))]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a cgroup v2 directory under {mount}")]
    NotCgroup2 { path: PathBuf, mount: PathBuf },
    #[error("refusing to attach to the cgroup2 root {path}: name a cgroup created for skiff")]
    CgroupRoot { path: PathBuf },
    #[error("invalid capture config: {0}")]
    Config(String),
    #[error("loading the skiff-bpf object failed ({errno}): {source}", errno = Errno::of(.source))]
    Object {
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {program} ({hook}) is missing from the skiff-bpf object")]
    ProgramMissing {
        program: &'static str,
        hook: &'static str,
    },
    #[error("program {program} ({hook}) failed to load ({errno}): {source}", errno = Errno::of(.source))]
    ProgramLoad {
        program: &'static str,
        hook: &'static str,
        /// Its Display includes the verifier log.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "attaching program {program} ({hook}) to cgroup {cgroup} failed ({errno}): {source}",
        errno = Errno::of(.source)
    )]
    Attach {
        program: &'static str,
        hook: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {map} is missing from the skiff-bpf object")]
    MapMissing { map: &'static str },
    #[error("map {map}: {op} failed ({errno}): {source}", errno = Errno::of(.source))]
    Map {
        map: &'static str,
        op: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

impl BpfError {
    /// [`BpfError::ProgramLoad`] of the program `(name, hook)`.
    fn load(
        (program, hook): (&'static str, &'static str),
        source: aya::programs::ProgramError,
    ) -> BpfError {
        BpfError::ProgramLoad {
            program,
            hook,
            source: Box::new(source),
        }
    }

    /// [`BpfError::Attach`] of the program `(name, hook)` to `target` (a cgroup or netns).
    fn attach(
        (program, hook): (&'static str, &'static str),
        target: &Path,
        source: aya::programs::ProgramError,
    ) -> BpfError {
        BpfError::Attach {
            program,
            hook,
            cgroup: target.to_path_buf(),
            source: Box::new(source),
        }
    }
}

/// The errno found in an error's source chain, displayed as `errno 22 EINVAL` or `no errno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub Option<i32>);

impl Errno {
    /// Walks `err` and its sources for an `io::Error` carrying an OS error.
    pub fn of(err: &(dyn StdError + 'static)) -> Self {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && let Some(code) = io.raw_os_error()
            {
                return Self(Some(code));
            }
            cur = e.source();
        }
        Self(None)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(code) => write!(f, "errno {code} {:?}", nix::errno::Errno::from_raw(code)),
            None => f.write_str("no errno"),
        }
    }
}

impl BpfError {
    /// The errno behind this error, if any.
    pub fn errno(&self) -> Option<i32> {
        Errno::of(self).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_program_hook_cgroup_and_errno() {
        let e = BpfError::Io {
            what: "joining cgroup",
            path: "/sys/fs/cgroup/x".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let s = e.to_string();
        assert!(
            s.contains("/sys/fs/cgroup/x") && s.contains("errno 13 EACCES"),
            "{s}"
        );
        assert_eq!(e.errno(), Some(libc::EACCES));
    }

    #[test]
    fn defaults_match_istio() {
        let c = CaptureConfig::new(CaptureMode::Sidecar {
            cgroup: "/a".into(),
            proxy_cgroup: "/p".into(),
        });
        assert_eq!(c.outbound_v4.to_string(), "127.0.0.1:15001");
        assert_eq!(
            c.outbound_v6.map(|a| a.to_string()).as_deref(),
            Some("[::1]:15001")
        );
        assert_eq!(c.proxy_mark, 1337);
        assert!(!c.fail_closed);
        assert_eq!(c.mode.capture_cgroup(), Path::new("/a"));
        assert_eq!(c.mode.proxy_cgroup(), Path::new("/p"));
    }
}
