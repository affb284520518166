//! Load the embedded `skiff-bpf` object, fill its maps, attach, and own the links.

use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps,
        cgroup_sock_addr::CgroupSockAddrLink, cgroup_sockopt::CgroupSockoptLink,
        sock_ops::SockOpsLink,
    },
};
use skiff_common::{
    CONFIG_INDEX, CidrV4Key, CidrV6Key, ConfigValue, ConnKey, ExcludePortKey, OrigDstValue, reason,
};

use super::{
    BpfError, CaptureConfig,
    cgroup::{Membership, cgroup_id, checked_attach_target, checked_cgroup_dir},
};

/// The object built by `proxy/build.rs` from `ebpf/skiff-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-bpf"));

// Program names (the eBPF function names) and their hooks, as errors report them.
const CONNECT4: (&str, &str) = ("skiff_connect4", "cgroup/connect4");
const CONNECT6: (&str, &str) = ("skiff_connect6", "cgroup/connect6");
const SOCK_OPS: (&str, &str) = ("skiff_sock_ops", "sockops");
const GETSOCKOPT: (&str, &str) = ("skiff_orig_dst", "cgroup/getsockopt");

// Map names (the `#[map]` statics in ebpf/skiff-ebpf/src/maps.rs).
const MAP_CONFIG: &str = "SKIFF_CONFIG";
const MAP_EXCL_PORT: &str = "SKIFF_EXCL_PORT";
const MAP_EXCL_V4: &str = "SKIFF_EXCL_V4";
const MAP_EXCL_V6: &str = "SKIFF_EXCL_V6";
const MAP_MESHED: &str = "SKIFF_MESHED";
const MAP_STATS: &str = "SKIFF_STATS";
const MAP_ORIG_DST: &str = "SKIFF_ORIG_DST";

/// How often the log pump drains aya-log's ring buffer.
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(20);

/// An attached program; dropping it detaches it.
#[derive(Debug)]
enum Link {
    SockAddr(#[allow(dead_code)] CgroupSockAddrLink),
    SockOps(#[allow(dead_code)] SockOpsLink),
    Sockopt(#[allow(dead_code)] CgroupSockoptLink),
}

/// Installed outbound capture. Dropping it clears the ready flag, detaches every program,
/// moves the process back to its original cgroup and removes the proxy cgroup if
/// [`Capture::install`] created it.
pub struct Capture {
    links: Vec<Link>,
    config: Mutex<(Array<MapData, ConfigValue>, ConfigValue)>,
    meshed: Mutex<HashMap<MapData, u64, u8>>,
    stats: PerCpuArray<MapData, u64>,
    orig_dst: HashMap<MapData, ConnKey, OrigDstValue>,
    logger: Option<aya_log::EbpfLogger<TracingLog>>,
    log_task: Option<tokio::task::AbortHandle>,
    node_mode: bool,
    capture_cgroup: PathBuf,
    // Dropped after the links: moves the process back, then removes the proxy cgroup.
    membership: Membership,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("links", &self.links.len())
            .field("node_mode", &self.node_mode)
            .field("capture_cgroup", &self.capture_cgroup)
            .field("proxy_cgroup", &self.membership.proxy())
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Loads the embedded object, fills the config and exclude maps, creates the proxy cgroup
    /// if missing (removed again on drop), moves the calling process into it, and attaches.
    ///
    /// Must be called before any listener socket exists: the getsockopt program sees only
    /// sockets created in the proxy cgroup (accepted sockets inherit the listener's). The
    /// capture is not ready yet: call [`Capture::set_ready`] once the outbound listener is up.
    pub fn install(cfg: &CaptureConfig) -> Result<Capture, BpfError> {
        validate(cfg)?;
        let capture_cgroup = checked_attach_target(cfg.mode.capture_cgroup())?;

        // No RLIMIT_MEMLOCK bump: kernels >= 5.11 charge BPF memory to the cgroup instead.
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|source| BpfError::Object {
                source: Box::new(source),
            })?;

        // Maps first: `take_map` and `program_mut` both borrow the Ebpf.
        let mut config_map: Array<MapData, ConfigValue> = take(&mut ebpf, MAP_CONFIG)?;
        let mut ports: HashMap<MapData, ExcludePortKey, u8> = take(&mut ebpf, MAP_EXCL_PORT)?;
        let mut v4: LpmTrie<MapData, CidrV4Key, u8> = take(&mut ebpf, MAP_EXCL_V4)?;
        let mut v6: LpmTrie<MapData, CidrV6Key, u8> = take(&mut ebpf, MAP_EXCL_V6)?;
        let meshed: HashMap<MapData, u64, u8> = take(&mut ebpf, MAP_MESHED)?;
        let stats: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_STATS)?;
        let orig_dst: HashMap<MapData, ConnKey, OrigDstValue> = take(&mut ebpf, MAP_ORIG_DST)?;

        let mut value = ConfigValue::new(cfg.outbound_v4, cfg.outbound_v6, cfg.proxy_mark);
        value.fail_closed = u8::from(cfg.fail_closed);
        value.node_mode = u8::from(cfg.mode.is_node());
        config_map
            .set(CONFIG_INDEX, value, 0)
            .map_err(|source| map_err(MAP_CONFIG, "set index 0", source))?;
        for &port in &cfg.exclude_ports {
            ports
                .insert(ExcludePortKey::new(port), 1, 0)
                .map_err(|source| map_err(MAP_EXCL_PORT, format!("insert port {port}"), source))?;
        }
        for &(ip, len) in &cfg.exclude_cidrs {
            match ip {
                IpAddr::V4(a) => v4.insert(
                    &Key::new(u32::from(len), CidrV4Key::new(mask_v4(a, len))),
                    1,
                    0,
                ),
                IpAddr::V6(a) => v6.insert(
                    &Key::new(u32::from(len), CidrV6Key::new(mask_v6(a, len))),
                    1,
                    0,
                ),
            }
            .map_err(|source| {
                let map = if ip.is_ipv4() {
                    MAP_EXCL_V4
                } else {
                    MAP_EXCL_V6
                };
                map_err(map, format!("insert {ip}/{len}"), source)
            })?;
        }

        let logger = match aya_log::EbpfLogger::init_with_logger(&mut ebpf, TracingLog) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF log forwarding unavailable");
                None
            }
        };

        // Load every program before touching cgroups: a verifier failure changes nothing.
        for (program, hook) in [CONNECT4, CONNECT6] {
            sock_addr(&mut ebpf, program, hook)?
                .load()
                .map_err(|source| BpfError::ProgramLoad {
                    program,
                    hook,
                    source: Box::new(source),
                })?;
        }
        {
            let (program, hook) = SOCK_OPS;
            sock_ops(&mut ebpf)?
                .load()
                .map_err(|source| BpfError::ProgramLoad {
                    program,
                    hook,
                    source: Box::new(source),
                })?;
            let (program, hook) = GETSOCKOPT;
            sockopt(&mut ebpf)?
                .load()
                .map_err(|source| BpfError::ProgramLoad {
                    program,
                    hook,
                    source: Box::new(source),
                })?;
        }

        // Join the proxy cgroup before attaching, so the getsockopt program sees every socket
        // the proxy creates from now on. Dropping `membership` (on any error below) undoes it.
        let membership = Membership::join_proxy_cgroup(cfg.mode.proxy_cgroup())?;
        let proxy_cgroup = membership.proxy().to_path_buf();
        if proxy_cgroup == capture_cgroup && !cfg.mode.is_node() {
            return Err(BpfError::Config(format!(
                "the proxy cgroup {} must differ from the app cgroup",
                proxy_cgroup.display()
            )));
        }

        let mut links = Vec::with_capacity(4);
        let open = |path: &Path| {
            File::open(path).map_err(|source| BpfError::Io {
                what: "opening cgroup",
                path: path.into(),
                source,
            })
        };
        let target = open(&capture_cgroup)?;
        for (program, hook) in [CONNECT4, CONNECT6] {
            let attach_err = |source: ProgramError| BpfError::Attach {
                program,
                hook,
                cgroup: capture_cgroup.clone(),
                source: Box::new(source),
            };
            let prog = sock_addr(&mut ebpf, program, hook)?;
            let id = prog
                .attach(&target, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            links.push(Link::SockAddr(prog.take_link(id).map_err(attach_err)?));
        }
        {
            let (program, hook) = SOCK_OPS;
            let attach_err = |source: ProgramError| BpfError::Attach {
                program,
                hook,
                cgroup: capture_cgroup.clone(),
                source: Box::new(source),
            };
            let prog = sock_ops(&mut ebpf)?;
            let id = prog
                .attach(&target, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            links.push(Link::SockOps(prog.take_link(id).map_err(attach_err)?));
        }
        {
            let (program, hook) = GETSOCKOPT;
            let attach_err = |source: ProgramError| BpfError::Attach {
                program,
                hook,
                cgroup: proxy_cgroup.clone(),
                source: Box::new(source),
            };
            let prog = sockopt(&mut ebpf)?;
            let id = prog
                .attach(open(&proxy_cgroup)?, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            links.push(Link::Sockopt(prog.take_link(id).map_err(attach_err)?));
        }
        tracing::info!(
            mode = if cfg.mode.is_node() { "node" } else { "sidecar" },
            cgroup = %capture_cgroup.display(),
            proxy_cgroup = %proxy_cgroup.display(),
            outbound_v4 = %cfg.outbound_v4,
            outbound_v6 = ?cfg.outbound_v6,
            fail_closed = cfg.fail_closed,
            "outbound capture attached (not ready yet)"
        );

        Ok(Capture {
            links,
            config: Mutex::new((config_map, value)),
            meshed: Mutex::new(meshed),
            stats,
            orig_dst,
            logger,
            log_task: None,
            node_mode: cfg.mode.is_node(),
            capture_cgroup,
            membership,
            _ebpf: ebpf,
        })
    }

    /// Opens (`true`) or closes the ready gate. Not ready: connects go to their original
    /// destination, or are refused with ECONNREFUSED in fail-closed mode.
    pub fn set_ready(&self, ready: bool) -> Result<(), BpfError> {
        let mut guard = lock(&self.config);
        let (map, value) = &mut *guard;
        let mut next = *value;
        next.ready = u8::from(ready);
        map.set(CONFIG_INDEX, next, 0)
            .map_err(|source| map_err(MAP_CONFIG, format!("set ready={ready}"), source))?;
        *value = next;
        Ok(())
    }

    /// Node mode: capture tasks in the cgroup at `path` (exactly that cgroup, not its
    /// descendants). Returns its id.
    pub fn add_meshed_cgroup(&self, path: &Path) -> Result<u64, BpfError> {
        self.require_node_mode()?;
        let id = cgroup_id(path)?;
        lock(&self.meshed).insert(id, 1, 0).map_err(|source| {
            map_err(
                MAP_MESHED,
                format!("insert cgroup {} (id {id})", path.display()),
                source,
            )
        })?;
        Ok(id)
    }

    /// Node mode: stop capturing the cgroup at `path`. Not an error if it was not meshed.
    pub fn remove_meshed_cgroup(&self, path: &Path) -> Result<(), BpfError> {
        self.require_node_mode()?;
        let id = cgroup_id(path)?;
        self.remove_meshed_cgroup_id(id)
    }

    /// Node mode: stop capturing the cgroup with this id (for cgroups already removed).
    pub fn remove_meshed_cgroup_id(&self, id: u64) -> Result<(), BpfError> {
        match lock(&self.meshed).remove(&id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_err(
                MAP_MESHED,
                format!("remove cgroup id {id}"),
                source,
            )),
        }
    }

    /// The ids of the meshed cgroups, sorted.
    pub fn meshed_cgroups(&self) -> Result<Vec<u64>, BpfError> {
        let guard = lock(&self.meshed);
        let mut ids = guard
            .keys()
            .collect::<Result<Vec<u64>, MapError>>()
            .map_err(|source| map_err(MAP_MESHED, "list keys", source))?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Kernel counters by reason, summed over CPUs, in `skiff_common::reason` order.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        (0..reason::COUNT)
            .map(|i| {
                let per_cpu = self
                    .stats
                    .get(&i, 0)
                    .map_err(|source| map_err(MAP_STATS, format!("read index {i}"), source))?;
                Ok((reason::NAMES[i as usize], per_cpu.iter().copied().sum()))
            })
            .collect()
    }

    /// Number of connections whose original destination is recorded (entries are removed
    /// when the client socket closes).
    pub fn tracked_connections(&self) -> Result<usize, BpfError> {
        self.orig_dst
            .keys()
            .try_fold(0, |n, k| k.map(|_| n + 1))
            .map_err(|source| map_err(MAP_ORIG_DST, "list keys", source))
    }

    /// Forwards aya-log records from the kernel programs to `tracing` (target
    /// `skiff::bpf::kernel`) from a tokio task that drains the ring buffer every 20 ms.
    /// `None` if already spawned, if the object has no log map, or outside a tokio runtime.
    /// The task stops when the [`Capture`] is dropped.
    pub fn spawn_log_pump(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let mut logger = self.logger.take()?;
        let task = handle.spawn(async move {
            let mut tick = tokio::time::interval(LOG_FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                logger.flush();
            }
        });
        self.log_task = Some(task.abort_handle());
        Some(task)
    }

    /// The cgroup connect4/6 and sock_ops are attached to.
    pub fn capture_cgroup(&self) -> &Path {
        &self.capture_cgroup
    }

    /// The proxy's cgroup (getsockopt is attached here; this process is in it).
    pub fn proxy_cgroup(&self) -> &Path {
        self.membership.proxy()
    }

    fn require_node_mode(&self) -> Result<(), BpfError> {
        if self.node_mode {
            Ok(())
        } else {
            Err(BpfError::Config(
                "meshed cgroups exist only in node mode".into(),
            ))
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(e) = self.set_ready(false) {
            tracing::warn!(error = %e, "could not clear the ready flag");
        }
        if let Some(task) = self.log_task.take() {
            task.abort();
        }
        // Detach now; `membership` (dropped after this) then leaves the proxy cgroup.
        self.links.clear();
    }
}

// === helpers ===

fn validate(cfg: &CaptureConfig) -> Result<(), BpfError> {
    if cfg.outbound_v4.port() == 0 {
        return Err(BpfError::Config("outbound_v4 needs a port".into()));
    }
    if !cfg.outbound_v4.ip().is_loopback() {
        return Err(BpfError::Config(format!(
            "outbound_v4 {} must be a loopback address (it is never captured, which prevents loops)",
            cfg.outbound_v4
        )));
    }
    if let Some(v6) = cfg.outbound_v6
        && (v6.port() == 0 || !v6.ip().is_loopback())
    {
        return Err(BpfError::Config(format!(
            "outbound_v6 {v6} must be [::1] with a port"
        )));
    }
    for &(ip, len) in &cfg.exclude_cidrs {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(BpfError::Config(format!(
                "exclude CIDR {ip}/{len}: prefix longer than {max}"
            )));
        }
    }
    // The proxy cgroup may not exist yet; its parent must then be a cgroup.
    let proxy = cfg.mode.proxy_cgroup();
    if proxy.exists() {
        checked_cgroup_dir(proxy)?;
    }
    Ok(())
}

fn mask_v4(a: std::net::Ipv4Addr, len: u8) -> std::net::Ipv4Addr {
    let bits = u32::from(a);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    (bits & mask).into()
}

fn mask_v6(a: std::net::Ipv6Addr, len: u8) -> std::net::Ipv6Addr {
    let bits = u128::from(a);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    (bits & mask).into()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the map itself consistent (each write is one syscall).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn map_err(map: &'static str, op: impl Into<String>, source: MapError) -> BpfError {
    BpfError::Map {
        map,
        op: op.into(),
        source: Box::new(source),
    }
}

fn take<M>(ebpf: &mut Ebpf, map: &'static str) -> Result<M, BpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let raw = ebpf.take_map(map).ok_or(BpfError::MapMissing { map })?;
    M::try_from(raw)
        .map_err(|source| map_err(map, "open with the expected key/value types", source))
}

fn sock_addr<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
    hook: &'static str,
) -> Result<&'a mut CgroupSockAddr, BpfError> {
    ebpf.program_mut(program)
        .ok_or(BpfError::ProgramMissing { program, hook })?
        .try_into()
        .map_err(|source| BpfError::ProgramLoad {
            program,
            hook,
            source: Box::new(source),
        })
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, BpfError> {
    let (program, hook) = SOCK_OPS;
    ebpf.program_mut(program)
        .ok_or(BpfError::ProgramMissing { program, hook })?
        .try_into()
        .map_err(|source| BpfError::ProgramLoad {
            program,
            hook,
            source: Box::new(source),
        })
}

fn sockopt(ebpf: &mut Ebpf) -> Result<&mut CgroupSockopt, BpfError> {
    let (program, hook) = GETSOCKOPT;
    ebpf.program_mut(program)
        .ok_or(BpfError::ProgramMissing { program, hook })?
        .try_into()
        .map_err(|source| BpfError::ProgramLoad {
            program,
            hook,
            source: Box::new(source),
        })
}

/// Forwards aya-log records (the `log` crate's API) to `tracing`.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "skiff::bpf::kernel", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "skiff::bpf::kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Capture>();
    }

    #[test]
    fn cidrs_are_masked_to_their_prefix() {
        assert_eq!(
            mask_v4("10.96.7.9".parse().unwrap(), 16).to_string(),
            "10.96.0.0"
        );
        assert_eq!(
            mask_v4("10.96.7.9".parse().unwrap(), 0).to_string(),
            "0.0.0.0"
        );
        assert_eq!(
            mask_v4("10.96.7.9".parse().unwrap(), 32).to_string(),
            "10.96.7.9"
        );
        assert_eq!(
            mask_v6("fd00:96::1".parse().unwrap(), 16).to_string(),
            "fd00::"
        );
        assert_eq!(
            mask_v6("fd00:96::1".parse().unwrap(), 128).to_string(),
            "fd00:96::1"
        );
    }
}
