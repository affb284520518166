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
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps,
        cgroup_sock_addr::CgroupSockAddrLink, cgroup_sockopt::CgroupSockoptLink,
        sock_ops::SockOpsLink,
    },
};
use skiff_common::{
    CONFIG_INDEX, CidrV4Key, CidrV6Key, ClusterValue, ConfigValue, ConnKey, EndpointKey,
    EndpointLoad, EndpointValue, ExcludePortKey, MAGLEV_TABLE_SIZE, OrigDstValue, ServiceKeyV4,
    ServiceKeyV6, ServiceStats, ServiceValue, reason,
};

use super::{
    BpfError, CaptureConfig,
    cgroup::{Membership, cgroup_id, checked_attach_target, checked_cgroup_dir},
    map_err,
    projection::MapImage,
    reconciler::{ApplyReport, Capacity, FastMaps, Reconciler, ServiceKey},
    take,
};

/// The object built by `proxy/build.rs` from `ebpf/skiff-ebpf`.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-bpf"));

// Program names (the eBPF function names) and their hooks, as errors report them.
#[path = "sockmap.rs"]
mod sockmap;

const CONNECT4: (&str, &str) = ("skiff_connect4", "cgroup/connect4");
const CONNECT6: (&str, &str) = ("skiff_connect6", "cgroup/connect6");
const SOCK_OPS: (&str, &str) = ("skiff_sock_ops", "sockops");
const GETSOCKOPT: (&str, &str) = ("skiff_orig_dst", "cgroup/getsockopt");
const GETPEERNAME4: (&str, &str) = ("skiff_peername4", "cgroup/getpeername4");
const GETPEERNAME6: (&str, &str) = ("skiff_peername6", "cgroup/getpeername6");
/// UDP fast path for unconnected sockets (attached only with the fast path on).
const SENDMSG4: (&str, &str) = ("skiff_sendmsg4", "cgroup/sendmsg4");
/// Shows a UDP fast-path reply as coming from the VIP (attached only with the fast path on).
const RECVMSG4: (&str, &str) = ("skiff_recvmsg4", "cgroup/recvmsg4");

// Map names (the `#[map]` statics in ebpf/skiff-ebpf/src/maps.rs).
const MAP_CONFIG: &str = "SKIFF_CONFIG";
const MAP_EXCL_PORT: &str = "SKIFF_EXCL_PORT";
const MAP_EXCL_V4: &str = "SKIFF_EXCL_V4";
const MAP_EXCL_V6: &str = "SKIFF_EXCL_V6";
const MAP_MESHED: &str = "SKIFF_MESHED";
const MAP_STATS: &str = "SKIFF_STATS";
const MAP_ORIG_DST: &str = "SKIFF_ORIG_DST";
const MAP_SVC_V4: &str = "SKIFF_SVC_V4";
const MAP_SVC_V6: &str = "SKIFF_SVC_V6";
const MAP_CLUSTERS: &str = "SKIFF_CLUSTERS";
const MAP_ENDPOINTS: &str = "SKIFF_ENDPOINTS";
const MAP_RR: &str = "SKIFF_RR";
const MAP_SVC_STAT: &str = "SKIFF_SVC_STAT";
const MAP_MAGLEV: &str = "SKIFF_MAGLEV";
const MAP_EP_ACTIVE: &str = "SKIFF_EP_ACTIVE";
const MAP_EP_LOAD: &str = "SKIFF_EP_LOAD";
const MAP_FAST_SK: &str = "SKIFF_FAST_SK";
const MAP_UDP_REV: &str = "SKIFF_UDP_REV";
/// Entries of `SKIFF_UDP_REV` with the fast path on (one socket/endpoint pair each).
const UDP_REV_ENTRIES: u32 = 65_536;

/// How long after a generation flip the other generation may be rewritten: a connect that read
/// the old generation number finishes its lookups within microseconds.
const GENERATION_GRACE: Duration = Duration::from_millis(5);

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
    /// `--sockmap`: socket-to-socket acceleration, when enabled.
    sockmap: Option<sockmap::Sockmap>,
    config: Mutex<(Array<MapData, ConfigValue>, ConfigValue)>,
    meshed: Mutex<HashMap<MapData, u64, u8>>,
    stats: PerCpuArray<MapData, u64>,
    orig_dst: HashMap<MapData, ConnKey, OrigDstValue>,
    fast: Option<Mutex<FastState>>,
    svc_stats: PerCpuHashMap<MapData, ServiceKeyV4, ServiceStats>,
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
        // Fast-path maps are sized from the config (a token size when the fast path is off).
        let caps = cfg.fast_path.unwrap_or(Capacity {
            max_services: 1,
            max_clusters: 1,
            max_endpoints: 1,
            max_maglev: 1,
        });
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_SVC_V4, caps.max_services)
            .map_max_entries(MAP_SVC_V6, caps.max_services)
            .map_max_entries(MAP_SVC_STAT, caps.max_services)
            .map_max_entries(MAP_CLUSTERS, 2 * caps.max_clusters)
            .map_max_entries(MAP_RR, 2 * caps.max_clusters)
            .map_max_entries(MAP_ENDPOINTS, 2 * caps.max_endpoints)
            .map_max_entries(MAP_MAGLEV, 2 * caps.max_maglev.max(1) * MAGLEV_TABLE_SIZE)
            .map_max_entries(MAP_EP_ACTIVE, caps.max_endpoints)
            .map_max_entries(MAP_EP_LOAD, caps.max_endpoints)
            // An LRU hash preallocates every entry: keep it to one without the fast path.
            .map_max_entries(
                MAP_UDP_REV,
                if cfg.fast_path.is_some() {
                    UDP_REV_ENTRIES
                } else {
                    1
                },
            )
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
        let svc_stats: PerCpuHashMap<MapData, ServiceKeyV4, ServiceStats> =
            take(&mut ebpf, MAP_SVC_STAT)?;
        let fast = match cfg.fast_path {
            Some(caps) => Some(Mutex::new(FastState {
                services: take(&mut ebpf, MAP_SVC_V4)?,
                services6: take(&mut ebpf, MAP_SVC_V6)?,
                clusters: take(&mut ebpf, MAP_CLUSTERS)?,
                endpoints: take(&mut ebpf, MAP_ENDPOINTS)?,
                maglev: take(&mut ebpf, MAP_MAGLEV)?,
                ep_active: take(&mut ebpf, MAP_EP_ACTIVE)?,
                ep_load: take(&mut ebpf, MAP_EP_LOAD)?,
                fast_sk: take(&mut ebpf, MAP_FAST_SK)?,
                terminate_on_removal: cfg.terminate_on_removal,
                terminated: 0,
                exported: std::collections::HashMap::new(),
                reconciler: Reconciler::new(caps),
                last_flip: None,
                timings: FastTimings::default(),
            })),
            None => None,
        };

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

        // UDP only ever takes the fast path, so its datagram hooks exist only with it.
        let udp_hooks: &[(&'static str, &'static str)] = if cfg.fast_path.is_some() {
            &[SENDMSG4, RECVMSG4]
        } else {
            &[]
        };
        let sock_addr_hooks: Vec<(&'static str, &'static str)> =
            [CONNECT4, CONNECT6, GETPEERNAME4, GETPEERNAME6]
                .into_iter()
                .chain(udp_hooks.iter().copied())
                .collect();

        // Load every program before touching cgroups: a verifier failure changes nothing.
        for &(program, hook) in &sock_addr_hooks {
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
        for &(program, hook) in &sock_addr_hooks {
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
        // Node mode: the proxy cgroup is below the root, where sock_ops already runs.
        let sockmap = if cfg.sockmap_ports.is_empty() {
            None
        } else {
            let proxy = (!cfg.mode.is_node()).then_some(proxy_cgroup.as_path());
            Some(sockmap::Sockmap::install(
                &mut ebpf,
                &cfg.sockmap_ports,
                proxy,
            )?)
        };
        tracing::info!(
            mode = if cfg.mode.is_node() { "node" } else { "sidecar" },
            cgroup = %capture_cgroup.display(),
            proxy_cgroup = %proxy_cgroup.display(),
            outbound_v4 = %cfg.outbound_v4,
            outbound_v6 = ?cfg.outbound_v6,
            fail_closed = cfg.fail_closed,
            fast_path = ?cfg.fast_path,
            "outbound capture attached (not ready yet)"
        );

        Ok(Capture {
            links,
            sockmap,
            config: Mutex::new((config_map, value)),
            meshed: Mutex::new(meshed),
            stats,
            orig_dst,
            fast,
            svc_stats,
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
            .chain(self.sockmap.iter().flat_map(|s| match s.stats() {
                Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            }))
            .collect()
    }

    /// Ports whose local socket pairs are accelerated (`--sockmap-ports`); empty when off.
    pub fn sockmap_ports(&self) -> &[u16] {
        self.sockmap.as_ref().map_or(&[], |s| s.ports())
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

    /// Whether the kernel fast path is configured.
    pub fn fast_path_enabled(&self) -> bool {
        self.fast.is_some()
    }

    /// Mirrors `image` into the fast-path maps (see `bpf::reconciler`); a no-op without the
    /// fast path. The report's `overflow` names a capacity limit that left services out.
    pub fn apply_fast_path(&self, image: &MapImage) -> Result<ApplyReport, BpfError> {
        let Some(fast) = &self.fast else {
            return Ok(ApplyReport::default());
        };
        let mut guard = lock(fast);
        let FastState {
            services,
            services6,
            clusters,
            endpoints,
            maglev,
            reconciler,
            last_flip,
            timings,
            fast_sk,
            ep_active,
            terminate_on_removal,
            terminated,
            ..
        } = &mut *guard;
        let before = terminate_on_removal.then(|| reconciler.applied().clone());
        let mut w = KernelWriter {
            services,
            services6,
            clusters,
            endpoints,
            maglev,
            config: &self.config,
            last_flip,
        };
        let started = std::time::Instant::now();
        let report = reconciler.apply(&mut w, image)?;
        timings.last_apply_us = started.elapsed().as_micros() as u64;
        tracing::info!(
            apply_us = timings.last_apply_us,
            generation = report.generation,
            services_written = report.services_written,
            services_deleted = report.services_deleted,
            clusters_written = report.clusters_written,
            endpoints_written = report.endpoints_written,
            maglev_written = report.maglev_written,
            services = reconciler.applied().services.len(),
            udp_services = reconciler.applied().udp_services.len(),
            overflow = report.overflow.as_deref().unwrap_or(""),
            "fast path reconciled"
        );
        // Idle counters of endpoints the fast path no longer serves go (the map is not LRU).
        {
            let served: std::collections::HashSet<std::net::SocketAddr> = reconciler
                .applied()
                .clusters
                .values()
                .flat_map(|c| c.endpoints.iter().copied())
                .collect();
            let idle: Vec<EndpointKey> = ep_active
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| v.active == 0 && !k.addr().is_some_and(|a| served.contains(&a)))
                .map(|(k, _)| k)
                .collect();
            for k in idle {
                if let Err(e) = ep_active.remove(&k) {
                    tracing::debug!(error = %e, "removing an idle endpoint counter");
                }
            }
        }
        // After the flip no connect can pick a removed endpoint any more; now the sockets
        // already connected to it go.
        if let Some(before) = before {
            let gone = super::terminate::removed_endpoints(&before, reconciler.applied());
            if !gone.is_empty() {
                let cookies: std::collections::HashSet<u64> = fast_sk
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(_, ep)| {
                        matches!(ep.addr(), Some(std::net::SocketAddr::V4(a)) if gone.contains(&a))
                    })
                    .map(|(cookie, _)| cookie)
                    .collect();
                match super::terminate::destroy_sockets(&gone, &cookies) {
                    Ok(n) => {
                        *terminated += n as u64;
                        tracing::info!(
                            endpoints = gone.len(),
                            sockets = n,
                            "destroyed fast-path sockets to removed endpoints"
                        );
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        endpoints = gone.len(),
                        "could not destroy fast-path sockets to removed endpoints"
                    ),
                }
            }
        }
        Ok(report)
    }

    /// What the fast path currently serves (`None` without the fast path).
    pub fn fast_path_view(&self) -> Option<FastPathView> {
        let fast = self.fast.as_ref()?;
        let g = lock(fast);
        Some(FastPathView {
            image: g.reconciler.applied().clone(),
            generation: g.reconciler.active_generation(),
            capacity: g.reconciler.capacity(),
        })
    }

    /// Records how long the projection feeding the next [`Capture::apply_fast_path`] took.
    pub fn note_projection(&self, took: std::time::Duration) {
        if let Some(fast) = &self.fast {
            lock(fast).timings.last_project_us = took.as_micros() as u64;
        }
    }

    /// Gauges of the fast path, without copying the image: what the applied generation holds
    /// and how long the last update took (`None` without the fast path).
    pub fn fast_path_gauges(&self) -> Option<FastPathGauges> {
        let fast = self.fast.as_ref()?;
        let g = lock(fast);
        let img = g.reconciler.applied();
        Some(FastPathGauges {
            services: (img.services.len() + img.udp_services.len()) as u64,
            clusters: img.clusters.len() as u64,
            endpoints: img.endpoint_slots() as u64,
            last_project_us: g.timings.last_project_us,
            last_apply_us: g.timings.last_apply_us,
            terminated: g.terminated,
        })
    }

    /// What happened to connects per fast-path service (summed over CPUs), sorted by service.
    pub fn service_stats(&self) -> Vec<(std::net::SocketAddrV4, ServiceStats)> {
        let mut out: Vec<(std::net::SocketAddrV4, ServiceStats)> = self
            .svc_stats
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| {
                let sum = v.iter().fold(ServiceStats::default(), |mut a, c| {
                    a.connects += c.connects;
                    a.fallbacks += c.fallbacks;
                    a.no_healthy += c.no_healthy;
                    a
                });
                (k.addr(), sum)
            })
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }

    /// Fast-path connections per endpoint as the kernel counts them (open, ever opened),
    /// sorted by endpoint. Empty without the fast path.
    pub fn endpoint_stats(&self) -> Vec<(std::net::SocketAddr, EndpointLoad)> {
        let Some(fast) = &self.fast else {
            return Vec::new();
        };
        let g = lock(fast);
        let mut out: Vec<(std::net::SocketAddr, EndpointLoad)> = g
            .ep_active
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, mut v)| {
                // A close that raced a lost increment wraps below zero: show it as idle.
                if v.active >> 63 != 0 {
                    v.active = 0;
                }
                Some((k.addr()?, v))
            })
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }

    /// Exports, for every LEAST_REQUEST cluster the kernel serves, the proxy's own load on each
    /// of its endpoints (active requests plus active connections, from the cluster's live host
    /// state in `snap`), so the kernel's power of two choices weighs traffic the proxy sends
    /// there too. Writes only changed values; returns how many entries changed.
    pub fn export_loads_from(&self, snap: &crate::state::Snapshot) -> Result<usize, BpfError> {
        let loads: Vec<(std::net::SocketAddr, u32)> = {
            let Some(fast) = &self.fast else {
                return Ok(0);
            };
            let g = lock(fast);
            let mut out = Vec::new();
            for (name, c) in &g.reconciler.applied().clusters {
                if c.lb != super::projection::FastLb::LeastRequest {
                    continue;
                }
                let Some(entry) = snap.cluster(name) else {
                    continue;
                };
                for ep in &c.endpoints {
                    let addr = *ep;
                    if let Some(h) = entry.lb.host(addr) {
                        let st = h.state();
                        let n = st.active_requests() + st.active_connections();
                        out.push((addr, u32::try_from(n).unwrap_or(u32::MAX)));
                    }
                }
            }
            out
        };
        self.export_endpoint_loads(&loads)
    }

    /// Exports the proxy's own load per endpoint (active requests or connections) for the
    /// kernel's LEAST_REQUEST choice. Writes only values that changed since the last export and
    /// deletes endpoints no longer listed; returns how many entries were written or deleted.
    pub fn export_endpoint_loads(
        &self,
        loads: &[(std::net::SocketAddr, u32)],
    ) -> Result<usize, BpfError> {
        let Some(fast) = &self.fast else {
            return Ok(0);
        };
        let mut g = lock(fast);
        let FastState {
            ep_load, exported, ..
        } = &mut *g;
        let mut changes = 0;
        let next: std::collections::HashMap<EndpointKey, u32> = loads
            .iter()
            .map(|(a, n)| (EndpointKey::from_socket_addr(*a), *n))
            .collect();
        for (k, n) in &next {
            if exported.get(k) != Some(n) {
                ep_load.insert(k, n, 0).map_err(|source| {
                    map_err(MAP_EP_LOAD, format!("insert {:?}", k.addr()), source)
                })?;
                changes += 1;
            }
        }
        for k in exported.keys().filter(|k| !next.contains_key(k)) {
            match ep_load.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => changes += 1,
                Err(source) => {
                    return Err(map_err(
                        MAP_EP_LOAD,
                        format!("delete {:?}", k.addr()),
                        source,
                    ));
                }
            }
        }
        *exported = next;
        Ok(changes)
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
        self.sockmap = None;
        self.links.clear();
    }
}

// === fast path ===

/// The fast-path maps and their reconciler (one lock: one writer at a time).
struct FastState {
    services: HashMap<MapData, ServiceKeyV4, ServiceValue>,
    services6: HashMap<MapData, ServiceKeyV6, ServiceValue>,
    clusters: Array<MapData, ClusterValue>,
    endpoints: Array<MapData, EndpointValue>,
    maglev: Array<MapData, u32>,
    ep_active: HashMap<MapData, EndpointKey, EndpointLoad>,
    ep_load: HashMap<MapData, EndpointKey, u32>,
    /// Fast-path sockets by cookie (read for `--terminate-on-removal`).
    fast_sk: HashMap<MapData, u64, EndpointKey>,
    terminate_on_removal: bool,
    /// Sockets destroyed by `--terminate-on-removal`.
    terminated: u64,
    /// What `ep_load` holds (the exporter writes only changes).
    exported: std::collections::HashMap<EndpointKey, u32>,
    reconciler: Reconciler,
    last_flip: Option<std::time::SystemTime>,
    timings: FastTimings,
}

/// Durations of the last update, microseconds.
#[derive(Clone, Copy, Debug, Default)]
struct FastTimings {
    last_project_us: u64,
    last_apply_us: u64,
}

/// Fast-path gauges for `/stats` (`skiff.bpf.fast_path.*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathGauges {
    /// Services in the applied generation.
    pub services: u64,
    /// Clusters in the applied generation.
    pub clusters: u64,
    /// Endpoint slots in the applied generation.
    pub endpoints: u64,
    /// Duration of the last projection (snapshot -> image), microseconds.
    pub last_project_us: u64,
    /// Duration of the last reconcile (image -> kernel maps, incl. the generation flip),
    /// microseconds.
    pub last_apply_us: u64,
    /// Fast-path sockets destroyed by `--terminate-on-removal`.
    pub terminated: u64,
}

/// What the kernel fast path serves, for `skiff maps` and `/debug/explain`.
#[derive(Clone, Debug)]
pub struct FastPathView {
    /// The applied image (trimmed to capacity).
    pub image: MapImage,
    /// Active generation.
    pub generation: u8,
    /// Map sizes.
    pub capacity: Capacity,
}

/// The reconciler's writes, on the real maps.
struct KernelWriter<'a> {
    services: &'a mut HashMap<MapData, ServiceKeyV4, ServiceValue>,
    services6: &'a mut HashMap<MapData, ServiceKeyV6, ServiceValue>,
    clusters: &'a mut Array<MapData, ClusterValue>,
    endpoints: &'a mut Array<MapData, EndpointValue>,
    maglev: &'a mut Array<MapData, u32>,
    config: &'a Mutex<(Array<MapData, ConfigValue>, ConfigValue)>,
    last_flip: &'a mut Option<std::time::SystemTime>,
}

impl FastMaps for KernelWriter<'_> {
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), BpfError> {
        let (map, r) = match key {
            ServiceKey::V4(k) => (MAP_SVC_V4, self.services.insert(k, value, 0)),
            ServiceKey::V6(k) => (MAP_SVC_V6, self.services6.insert(k, value, 0)),
        };
        r.map_err(|source| map_err(map, format!("insert {}", key.addr()), source))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), BpfError> {
        let (map, r) = match key {
            ServiceKey::V4(k) => (MAP_SVC_V4, self.services.remove(&k)),
            ServiceKey::V6(k) => (MAP_SVC_V6, self.services6.remove(&k)),
        };
        match r {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_err(map, format!("delete {}", key.addr()), source)),
        }
    }

    fn set_cluster(&mut self, index: u32, value: ClusterValue) -> Result<(), BpfError> {
        self.clusters
            .set(index, value, 0)
            .map_err(|source| map_err(MAP_CLUSTERS, format!("set index {index}"), source))
    }

    fn set_endpoint(&mut self, index: u32, value: EndpointValue) -> Result<(), BpfError> {
        self.endpoints
            .set(index, value, 0)
            .map_err(|source| map_err(MAP_ENDPOINTS, format!("set index {index}"), source))
    }

    fn set_maglev(&mut self, index: u32, value: u32) -> Result<(), BpfError> {
        self.maglev
            .set(index, value, 0)
            .map_err(|source| map_err(MAP_MAGLEV, format!("set index {index}"), source))
    }

    fn flip(&mut self, generation: u8) -> Result<(), BpfError> {
        let mut guard = lock(self.config);
        let (map, value) = &mut *guard;
        let mut next = *value;
        next.fast_gen = generation;
        next.fast_path = 1;
        map.set(CONFIG_INDEX, next, 0)
            .map_err(|source| map_err(MAP_CONFIG, format!("set fast_gen={generation}"), source))?;
        *value = next;
        *self.last_flip = Some(std::time::SystemTime::now());
        Ok(())
    }

    fn quiesce(&mut self) {
        if let Some(at) = *self.last_flip
            && let Ok(elapsed) = at.elapsed()
            && elapsed < GENERATION_GRACE
        {
            std::thread::sleep(GENERATION_GRACE - elapsed);
        }
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

fn sock_addr<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
    hook: &'static str,
) -> Result<&'a mut CgroupSockAddr, BpfError> {
    super::program(ebpf, (program, hook))
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, BpfError> {
    super::program(ebpf, SOCK_OPS)
}

fn sockopt(ebpf: &mut Ebpf) -> Result<&mut CgroupSockopt, BpfError> {
    super::program(ebpf, GETSOCKOPT)
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
