//! Load the embedded `skiff-bpf` object, fill its maps, attach, and own the links.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SockOps,
        cgroup_sock_addr::CgroupSockAddrLink, cgroup_sockopt::CgroupSockoptLink, links::FdLink,
        sock_ops::SockOpsLink,
    },
};
use skiff_common::{ConfigValue, MAGLEV_TABLE_SIZE, NODE_SCOPE, ServiceStats};

use super::{
    BpfError, CaptureConfig,
    cgroup::{Membership, checked_attach_target, checked_cgroup_dir},
    counters::{Counters, MAP_ORIG_DST, MAP_STATS, MAP_SVC_STAT},
    fastpath::{
        FastMapsTaken, FastPath, FastPathGauges, FastPathView, LoadExport, MAP_CLUSTERS,
        MAP_ENDPOINTS, MAP_EP_ACTIVE, MAP_EP_LOAD, MAP_FAST_SK, MAP_MAGLEV, MAP_RR, MAP_SVC_V4,
        MAP_SVC_V6,
    },
    gate::{ConfigMap, MAP_CONFIG, ReadyGate},
    meshed::{MAP_MESHED, Meshed},
    pin::Pins,
    reconciler::Capacity,
    take,
};

/// The object built by `proxy/build.rs` from `ebpf/skiff-ebpf`.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-bpf"));

// Program names (the eBPF function names) and their hooks, as errors report them.
#[path = "sockmap.rs"]
mod sockmap;
#[path = "xdp.rs"]
mod xdp;
pub use xdp::XdpInterface;

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

// Map names (the `#[map]` statics in ebpf/skiff-ebpf/src/maps.rs); the others live beside
// the part that owns the map (gate, meshed, counters, fastpath, exclude).
const MAP_UDP_REV: &str = "SKIFF_UDP_REV";
/// Entries of `SKIFF_UDP_REV` with the fast path on (one socket/endpoint pair each).
const UDP_REV_ENTRIES: u32 = 65_536;

/// An attached program; dropping it detaches it.
#[derive(Debug)]
enum Link {
    SockAddr(#[allow(dead_code)] CgroupSockAddrLink),
    SockOps(#[allow(dead_code)] SockOpsLink),
    Sockopt(#[allow(dead_code)] CgroupSockoptLink),
    /// A pinned link: this fd keeps it attached while skiff runs; the pin, after a crash.
    Pinned(#[allow(dead_code)] std::os::fd::OwnedFd),
}

/// Installed outbound capture: the loaded object and its links, and the parts that own its
/// maps (ready gate, meshed cgroups, counters, fast path). Dropping it closes the ready gate,
/// detaches every program, moves the process back to its original cgroup and removes the proxy
/// cgroup if [`Capture::install`] created it.
pub struct Capture {
    links: Vec<Link>,
    /// `--sockmap`: socket-to-socket acceleration, when enabled.
    sockmap: Option<sockmap::Sockmap>,
    /// `--xdp`: the node-ingress load balancer, when enabled.
    xdp: Option<xdp::XdpBalancer>,
    ready: ReadyGate,
    meshed: Arc<Meshed>,
    counters: Counters,
    /// The fast-path maps (`None` without `--fast-path`).
    fast: Option<Arc<FastPath>>,
    /// The load export, until the fast-path owner takes it.
    loads: std::sync::Mutex<Option<LoadExport>>,
    log: super::log::LogPump,
    /// The kernel event ring and its reader.
    events: super::events::Events,
    node_mode: bool,
    capture_cgroup: PathBuf,
    /// The pin directory (`None`: nothing pinned, the links above detach on drop).
    pins: Option<Pins>,
    /// Handed over to a successor (`skiff run --takeover`): drop leaves the gate and the pins
    /// to it.
    handed_over: std::sync::atomic::AtomicBool,
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
        let pins = open_pins(cfg)?;
        // A failed first start leaves no pins behind; a failed takeover keeps the previous
        // skiff's (its capture is still attached through them).
        let fresh = pins
            .as_ref()
            .filter(|p| !p.reused())
            .map(|p| p.dir().to_path_buf());
        let installed = Self::install_pinned(cfg, capture_cgroup, pins);
        if installed.is_err()
            && let Some(dir) = fresh
            && let Err(e) = super::pin::cleanup(Some(&dir))
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove the pins of a failed start");
        }
        installed
    }

    /// [`Capture::install`] once the pin directory is open.
    fn install_pinned(
        cfg: &CaptureConfig,
        capture_cgroup: PathBuf,
        pins: Option<Pins>,
    ) -> Result<Capture, BpfError> {
        let mut ebpf = load_object(cfg, pins.as_ref())?;
        let takeover = pins.as_ref().is_some_and(Pins::reused);
        // Handed over by a running skiff: its programs serve until ours are swapped in, so
        // the gate stays as it is (closing it would send new connects to the fail mode).
        let live = pins.as_ref().is_some_and(Pins::live);

        // Maps first: `take_map` and `program_mut` both borrow the Ebpf.
        let meshed = Arc::new(Meshed::new(
            take(&mut ebpf, MAP_MESHED)?,
            cfg.mode.is_node(),
        ));
        let counters = Counters {
            stats: take(&mut ebpf, MAP_STATS)?,
            orig_dst: take(&mut ebpf, MAP_ORIG_DST)?,
            svc_stats: take(&mut ebpf, MAP_SVC_STAT)?,
        };
        let mut value = ConfigValue::new(cfg.outbound_v4, cfg.outbound_v6, cfg.proxy_mark);
        value.fail_closed = u8::from(cfg.fail_closed);
        value.node_mode = u8::from(cfg.mode.is_node());
        let config_map: aya::maps::Array<aya::maps::MapData, skiff_common::ConfigValue> =
            take(&mut ebpf, MAP_CONFIG)?;
        if live && let Ok(current) = config_map.get(&skiff_common::CONFIG_INDEX, 0) {
            value.ready = current.ready;
        }
        let config = Arc::new(ConfigMap::new(config_map, value)?);
        let (fast, loads) = match cfg.fast_path {
            Some(caps) => {
                let mut maps = FastMapsTaken {
                    services: take(&mut ebpf, MAP_SVC_V4)?,
                    services6: take(&mut ebpf, MAP_SVC_V6)?,
                    clusters: take(&mut ebpf, MAP_CLUSTERS)?,
                    endpoints: take(&mut ebpf, MAP_ENDPOINTS)?,
                    maglev: take(&mut ebpf, MAP_MAGLEV)?,
                    ep_active: take(&mut ebpf, MAP_EP_ACTIVE)?,
                    fast_sk: take(&mut ebpf, MAP_FAST_SK)?,
                };
                if takeover {
                    // The dead skiff's services point into generations this process's
                    // reconciler does not know; with `fast_path` just written 0 by the config
                    // entry above, no connect reads them. The first apply fills them again.
                    clear(&mut maps.services, MAP_SVC_V4)?;
                    clear(&mut maps.services6, MAP_SVC_V6)?;
                }
                let fast = FastPath::new(config.clone(), maps, caps, cfg.terminate_on_removal);
                (
                    Some(Arc::new(fast)),
                    Some(LoadExport::new(take(&mut ebpf, MAP_EP_LOAD)?)),
                )
            }
            None => (None, None),
        };

        let exclusions = super::exclude::fill(&mut ebpf, cfg)?;
        let log = super::log::LogPump::new(&mut ebpf);
        let events = super::events::Events::new(&mut ebpf, &cfg.events)?;

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
        load_programs(&mut ebpf, &sock_addr_hooks)?;

        // Join the proxy cgroup before attaching, so the getsockopt program sees every socket
        // the proxy creates from now on. Dropping `membership` (on any error below) undoes it.
        let mut membership = Membership::join_proxy_cgroup(cfg.mode.proxy_cgroup())?;
        if live {
            // The running skiff created it and leaves it to this one.
            membership.set_owner(true);
        }
        let proxy_cgroup = membership.proxy().to_path_buf();
        if proxy_cgroup == capture_cgroup && !cfg.mode.is_node() {
            return Err(BpfError::Config(format!(
                "the proxy cgroup {} must differ from the app cgroup",
                proxy_cgroup.display()
            )));
        }

        let links = attach(
            &mut ebpf,
            &sock_addr_hooks,
            &capture_cgroup,
            &proxy_cgroup,
            pins.as_ref(),
        )?;
        // The loaded programs hold their own references to the exclusion maps now.
        drop(exclusions);
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
        let xdp = match (&fast, cfg.xdp_interfaces.is_empty()) {
            (_, true) => {
                // A previous skiff's XDP links would go on balancing with maps no one updates.
                if let Some(pins) = &pins {
                    xdp::remove_stale_pins(pins, &[]);
                }
                None
            }
            (Some(fast), false) => Some(xdp::XdpBalancer::install(
                &mut ebpf,
                &cfg.xdp_interfaces,
                fast.clone(),
                pins.as_ref(),
            )?),
            (None, false) => {
                return Err(BpfError::Config(
                    "--xdp balances the fast path's services: it needs --fast-path".to_owned(),
                ));
            }
        };
        tracing::info!(
            mode = if cfg.mode.is_node() { "node" } else { "sidecar" },
            cgroup = %capture_cgroup.display(),
            proxy_cgroup = %proxy_cgroup.display(),
            outbound_v4 = %cfg.outbound_v4,
            outbound_v6 = ?cfg.outbound_v6,
            fail_closed = cfg.fail_closed,
            fast_path = ?cfg.fast_path,
            pin_dir = ?pins.as_ref().map(|p| p.dir().display().to_string()),
            takeover,
            "outbound capture attached (not ready yet)"
        );

        Ok(Capture {
            links,
            sockmap,
            xdp,
            ready: ReadyGate::new(config),
            meshed,
            counters,
            fast,
            loads: std::sync::Mutex::new(loads),
            log,
            events,
            node_mode: cfg.mode.is_node(),
            capture_cgroup,
            pins,
            handed_over: std::sync::atomic::AtomicBool::new(false),
            membership,
            _ebpf: ebpf,
        })
    }

    /// The ready gate.
    pub fn ready_gate(&self) -> &ReadyGate {
        &self.ready
    }

    /// Opens (`true`) or closes the ready gate. Not ready: connects go to their original
    /// destination, or are refused with ECONNREFUSED in fail-closed mode.
    ///
    /// After [`Capture::hand_over`] the gate is the successor's: this does nothing.
    pub fn set_ready(&self, ready: bool) -> Result<(), BpfError> {
        if self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.ready.set(ready)
    }

    /// The meshed-cgroup registry (node mode).
    pub fn meshed(&self) -> &Arc<Meshed> {
        &self.meshed
    }

    /// Node mode: capture tasks in the cgroup at `path` (exactly that cgroup, not its
    /// descendants), with the node's own fast-path services. Returns its id.
    pub fn add_meshed_cgroup(&self, path: &Path) -> Result<u64, BpfError> {
        self.meshed.add(path, NODE_SCOPE)
    }

    /// Node mode: stop capturing the cgroup at `path`. Not an error if it was not meshed.
    pub fn remove_meshed_cgroup(&self, path: &Path) -> Result<(), BpfError> {
        self.meshed.remove(path)
    }

    /// Node mode: stop capturing the cgroup with this id (for cgroups already removed).
    pub fn remove_meshed_cgroup_id(&self, id: u64) -> Result<(), BpfError> {
        self.meshed.remove_id(id)
    }

    /// The ids of the meshed cgroups, sorted.
    pub fn meshed_cgroups(&self) -> Result<Vec<u64>, BpfError> {
        self.meshed.ids()
    }

    /// The kernel's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Kernel counters by reason, summed over CPUs, in `skiff_common::reason` order, then the
    /// sockmap's.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        let mut out = self.counters.by_reason()?;
        if let Some(s) = &self.sockmap {
            out.extend(s.stats()?);
        }
        Ok(out)
    }

    /// Ports whose local socket pairs are accelerated (`--sockmap-ports`); empty when off.
    pub fn sockmap_ports(&self) -> &[u16] {
        self.sockmap.as_ref().map_or(&[], |s| s.ports())
    }

    /// Number of connections whose original destination is recorded (entries are removed
    /// when the client socket closes).
    pub fn tracked_connections(&self) -> Result<usize, BpfError> {
        self.counters.tracked_connections()
    }

    /// Forwards aya-log records from the kernel programs to `tracing` (see `bpf::log`).
    /// `None` if already spawned, if the object has no log map, or outside a tokio runtime.
    /// The task stops when the [`Capture`] is dropped.
    pub fn spawn_log_pump(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.log.spawn()
    }

    /// Starts the reader of the kernel event ring (see `bpf::events`); `None` if already
    /// started or outside a tokio runtime. The task stops when the [`Capture`] is dropped.
    pub fn spawn_events(
        &self,
        stats: Arc<crate::stats::Stats>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        self.events.spawn(self.fast.clone(), stats)
    }

    /// Kernel event counters (`events.*`, `fast_path.service.<cluster>.cx_total`).
    pub fn event_stats(&self) -> Vec<(String, u64)> {
        self.events.stats()
    }

    /// Whether the kernel fast path is configured.
    pub fn fast_path_enabled(&self) -> bool {
        self.fast.is_some()
    }

    /// Starts the one owner of the fast-path maps (see `bpf::owner`); `None` without the fast
    /// path, or when already started. The task stops with `stop`.
    pub fn start_fast_path_owner(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<(super::owner::Owner, tokio::task::JoinHandle<()>)> {
        let fast = self.fast.clone()?;
        let loads = self
            .loads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        Some(super::owner::Owner::start_kernel(fast, loads, stop))
    }

    /// What the fast path currently serves (`None` without the fast path).
    pub fn fast_path_view(&self) -> Option<FastPathView> {
        self.fast.as_ref().map(|f| f.view())
    }

    /// Gauges of the fast path (`None` without the fast path).
    pub fn fast_path_gauges(&self) -> Option<FastPathGauges> {
        self.fast.as_ref().map(|f| f.gauges())
    }

    /// What happened to connects per fast-path service (summed over CPUs), sorted by service.
    pub fn service_stats(&self) -> Vec<(std::net::SocketAddrV4, ServiceStats)> {
        self.counters.per_service()
    }

    /// Fast-path connections per endpoint as the kernel counts them (open, ever opened),
    /// sorted by endpoint. Empty without the fast path.
    pub fn endpoint_stats(&self) -> Vec<(std::net::SocketAddr, skiff_common::EndpointLoad)> {
        self.fast
            .as_ref()
            .map(|f| f.endpoint_stats())
            .unwrap_or_default()
    }

    /// `--xdp`: the interfaces the load balancer is attached to, with their mode.
    pub fn xdp_interfaces(&self) -> &[XdpInterface] {
        self.xdp.as_ref().map_or(&[], |x| x.interfaces())
    }

    /// `--xdp`: `/stats` lines (`xdp.*`, without the `skiff.` prefix); empty when off.
    pub fn xdp_stats(&self) -> Vec<(String, u64)> {
        self.xdp
            .as_ref()
            .map(|x| x.stat_lines())
            .unwrap_or_default()
    }

    /// `--xdp`: interfaces, conntrack and counters for `/debug/maps` (`None` when off).
    pub fn xdp_maps(&self) -> Option<serde_json::Value> {
        self.xdp.as_ref().map(|x| x.maps_json())
    }

    /// The cgroup connect4/6 and sock_ops are attached to.
    pub fn capture_cgroup(&self) -> &Path {
        &self.capture_cgroup
    }

    /// The proxy's cgroup (getsockopt is attached here; this process is in it).
    pub fn proxy_cgroup(&self) -> &Path {
        self.membership.proxy()
    }
}

impl Capture {
    /// The pin directory and a duplicate of its open, locked file, for a successor
    /// (`None`: nothing pinned).
    pub fn pin_lock(&self) -> Option<(PathBuf, std::io::Result<std::os::fd::OwnedFd>)> {
        self.pins
            .as_ref()
            .map(|p| (p.dir().to_path_buf(), p.lock_dup()))
    }

    /// A successor took the capture over: dropping this one leaves the ready gate and the
    /// pinned links and maps as they are (only this process's own getsockopt link detaches;
    /// the successor attached its own).
    pub fn hand_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.handed_over.load(std::sync::atomic::Ordering::SeqCst) {
            // The gate stays as the successor set it.
            self.sockmap = None;
            // Closing our fds of pinned links detaches nothing; the successor holds the lock.
            drop(self.pins.take());
            self.membership.set_owner(false);
            self.links.clear();
            return;
        }
        if let Err(e) = self.set_ready(false) {
            tracing::warn!(error = %e, "could not clear the ready flag");
        }
        // Detach now; `membership` (dropped after this) then leaves the proxy cgroup. A
        // normal exit leaves nothing behind: with the pins gone, closing the links' fds
        // detaches the programs.
        self.sockmap = None;
        self.xdp = None;
        if let Some(p) = self.pins.take() {
            p.remove();
        }
        self.links.clear();
    }
}

// === helpers ===

/// Loads (verifies) the sock_addr programs of `sock_addr_hooks`, sock_ops and getsockopt.
fn load_programs(
    ebpf: &mut Ebpf,
    sock_addr_hooks: &[(&'static str, &'static str)],
) -> Result<(), BpfError> {
    for &(program, hook) in sock_addr_hooks {
        sock_addr(ebpf, program, hook)?
            .load()
            .map_err(|source| BpfError::load((program, hook), source))?;
    }
    sock_ops(ebpf)?
        .load()
        .map_err(|source| BpfError::load(SOCK_OPS, source))?;
    sockopt(ebpf)?
        .load()
        .map_err(|source| BpfError::load(GETSOCKOPT, source))?;
    Ok(())
}

/// Attaches the sock_addr programs and sock_ops to `capture_cgroup` and getsockopt to
/// `proxy_cgroup`; the links detach when dropped. With `pins`, the capture cgroup's links are
/// pinned too, or, when a previous skiff's link is pinned there, the new program is swapped
/// into it. getsockopt (the proxy's own cgroup) is never pinned: aya 0.14 cannot turn its
/// link into a pinnable one, and only the proxy's sockets need it.
fn attach(
    ebpf: &mut Ebpf,
    sock_addr_hooks: &[(&'static str, &'static str)],
    capture_cgroup: &Path,
    proxy_cgroup: &Path,
    pins: Option<&Pins>,
) -> Result<Vec<Link>, BpfError> {
    let mut links = Vec::with_capacity(4);
    if let Some(pins) = pins {
        let fds = attach_pinned(ebpf, sock_addr_hooks, capture_cgroup, pins)?;
        links.extend(fds.into_iter().map(Link::Pinned));
    }
    let open = |path: &Path| {
        File::open(path).map_err(|source| BpfError::Io {
            what: "opening cgroup",
            path: path.into(),
            source,
        })
    };
    let target = open(capture_cgroup)?;
    let unpinned = if pins.is_some() {
        &[][..]
    } else {
        sock_addr_hooks
    };
    for &(program, hook) in unpinned {
        let attach_err = |source| BpfError::attach((program, hook), capture_cgroup, source);
        let prog = sock_addr(ebpf, program, hook)?;
        let id = prog
            .attach(&target, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        links.push(Link::SockAddr(prog.take_link(id).map_err(attach_err)?));
    }
    if pins.is_none() {
        let attach_err = |source| BpfError::attach(SOCK_OPS, capture_cgroup, source);
        let prog = sock_ops(ebpf)?;
        let id = prog
            .attach(&target, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        links.push(Link::SockOps(prog.take_link(id).map_err(attach_err)?));
    }
    {
        let attach_err = |source| BpfError::attach(GETSOCKOPT, proxy_cgroup, source);
        let prog = sockopt(ebpf)?;
        let id = prog
            .attach(open(proxy_cgroup)?, CgroupAttachMode::Single)
            .map_err(attach_err)?;
        links.push(Link::Sockopt(prog.take_link(id).map_err(attach_err)?));
    }
    Ok(links)
}

/// [`attach`] with pins: per program, `BPF_LINK_UPDATE` of its pinned link when there is one
/// (the hook keeps running the old program until the swap), else attach and pin the link.
fn attach_pinned(
    ebpf: &mut Ebpf,
    sock_addr_hooks: &[(&'static str, &'static str)],
    capture_cgroup: &Path,
    pins: &Pins,
) -> Result<Vec<std::os::fd::OwnedFd>, BpfError> {
    let mut fds = Vec::new();
    let open = |path: &Path| {
        File::open(path).map_err(|source| BpfError::Io {
            what: "opening cgroup",
            path: path.into(),
            source,
        })
    };
    let target = open(capture_cgroup)?;
    let mut hooks: Vec<((&'static str, &'static str), &File, &Path)> = sock_addr_hooks
        .iter()
        .map(|&h| (h, &target, capture_cgroup))
        .collect();
    hooks.push((SOCK_OPS, &target, capture_cgroup));
    for ((program, hook), file, cgroup) in hooks {
        let pin = pins.link(program);
        let pin_err = |what: &'static str, source: std::io::Error| BpfError::Io {
            what,
            path: pin.clone(),
            source,
        };
        let attach_err = |source| BpfError::attach((program, hook), cgroup, source);
        let prog: &mut aya::programs::Program = ebpf
            .program_mut(program)
            .ok_or(BpfError::ProgramMissing { program, hook })?;
        if pin.exists() {
            let fd = prog
                .fd()
                .map_err(|source| BpfError::load((program, hook), source))?;
            let link = super::pin::link_update(&pin, std::os::fd::AsFd::as_fd(fd))
                .map_err(|e| pin_err("swapping the new program into the pinned link", e))?;
            fds.push(link);
            continue;
        }
        let link: FdLink = match prog {
            aya::programs::Program::CgroupSockAddr(p) => {
                let id = p
                    .attach(file, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                FdLink::try_from(p.take_link(id).map_err(attach_err)?)
            }
            aya::programs::Program::SockOps(p) => {
                let id = p
                    .attach(file, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                FdLink::try_from(p.take_link(id).map_err(attach_err)?)
            }
            _ => return Err(BpfError::ProgramMissing { program, hook }),
        }
        .map_err(|e| {
            BpfError::Config(format!(
                "program {program} ({hook}): the kernel gave no bpf link to pin ({e})"
            ))
        })?;
        // The pin holds the link after a crash; an fd of our own holds it while we run (the
        // PinnedLink's fd is not reachable through aya).
        drop(link.pin(&pin).map_err(|e| {
            BpfError::Config(format!(
                "pinning the link of {program} ({hook}) at {}: {e}",
                pin.display()
            ))
        })?);
        fds.push(super::pin::obj_get(&pin).map_err(|e| pin_err("opening the pinned link", e))?);
    }
    Ok(fds)
}

/// The pin directory `cfg` asks for, opened (`None`: no pinning).
fn open_pins(cfg: &CaptureConfig) -> Result<Option<Pins>, BpfError> {
    let Some(dir) = super::pin::dir_for(cfg)? else {
        return Ok(None);
    };
    match Pins::open(&dir)? {
        Some(p) => Ok(Some(p)),
        // A second skiff on the same cgroup (`--allow-coexist`): the default directory is
        // the first one's, so this one runs unpinned; a directory named on purpose must be
        // free.
        None if cfg.pinning == super::Pinning::Default => {
            tracing::warn!(dir = %dir.display(), "a running skiff holds the default pin directory: nothing pinned");
            Ok(None)
        }
        None => Err(BpfError::Config(format!(
            "pin directory {} is held by a running skiff; give this one its own --pin-dir",
            dir.display()
        ))),
    }
}

/// Deletes every entry of a hash map.
fn clear<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(), BpfError> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        match map.remove(&k) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(super::map_err(name, "clear a taken-over entry", source)),
        }
    }
    Ok(())
}

/// The maps pinned for `cfg`: [`super::pin::PINNED`], [`super::pin::PINNED_FAST`] with
/// the fast path, and [`xdp::PINNED_XDP`] with `--xdp` too.
fn pinned_maps(cfg: &CaptureConfig) -> impl Iterator<Item = &'static str> {
    let fast: &[&str] = if cfg.fast_path.is_some() {
        super::pin::PINNED_FAST
    } else {
        &[]
    };
    let xdp: &[&str] = if cfg.fast_path.is_some() && !cfg.xdp_interfaces.is_empty() {
        xdp::PINNED_XDP
    } else {
        &[]
    };
    super::pin::PINNED.iter().chain(fast).chain(xdp).copied()
}

/// Refuses to reuse a pinned map whose size differs from what this run asks (`--fast-path`
/// capacities changed): the programs would index past it or waste it.
fn check_pinned_size(pins: &Pins, name: &str, want: u32) -> Result<(), BpfError> {
    let path = pins.map(name);
    if !path.exists() {
        return Ok(());
    }
    let have = MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map(|i| i.max_entries())
        .map_err(|e| BpfError::Config(format!("reading pinned map {}: {e}", path.display())))?;
    if have != want {
        return Err(BpfError::Config(format!(
            "pinned map {} has {have} entries, this run needs {want} (the fast-path capacity \
             changed): stop the other skiff or run `skiff cleanup`",
            path.display()
        )));
    }
    Ok(())
}

/// Loads the embedded object with the fast-path maps sized from `cfg` (a token size when the
/// fast path is off), reusing (or creating and pinning) the maps of [`pinned_maps`] in `pins`.
fn load_object(cfg: &CaptureConfig, pins: Option<&Pins>) -> Result<Ebpf, BpfError> {
    // No RLIMIT_MEMLOCK bump: kernels >= 5.11 charge BPF memory to the cgroup instead.
    // Fast-path maps are sized from the config (a token size when the fast path is off).
    let caps = cfg.fast_path.unwrap_or(Capacity {
        max_services: 1,
        max_clusters: 1,
        max_endpoints: 1,
        max_maglev: 1,
    });
    let sizes = [
        (MAP_SVC_V4, caps.max_services),
        (MAP_SVC_V6, caps.max_services),
        (MAP_SVC_STAT, caps.max_services),
        (xdp::MAP_VIP, caps.max_services),
        (MAP_CLUSTERS, 2 * caps.max_clusters),
        (MAP_RR, 2 * caps.max_clusters),
        (MAP_ENDPOINTS, 2 * caps.max_endpoints),
        (MAP_MAGLEV, 2 * caps.max_maglev.max(1) * MAGLEV_TABLE_SIZE),
        (MAP_EP_ACTIVE, caps.max_endpoints),
        (MAP_EP_LOAD, caps.max_endpoints),
        // An LRU hash preallocates every entry: keep it to one without the fast path.
        (
            MAP_UDP_REV,
            if cfg.fast_path.is_some() {
                UDP_REV_ENTRIES
            } else {
                1
            },
        ),
    ];
    let mut loader = EbpfLoader::new();
    for &(name, size) in &sizes {
        loader.map_max_entries(name, size);
    }
    // A ring buffer's max_entries is its size in bytes.
    loader.map_max_entries(super::events::MAP_EVENTS, cfg.events.ring_bytes);
    if let Some(pins) = pins {
        for name in pinned_maps(cfg) {
            if let Some(&(_, size)) = sizes.iter().find(|(n, _)| *n == name) {
                check_pinned_size(pins, name, size)?;
            }
            loader.map_pin_path(name, pins.map(name));
        }
    }
    loader.load(OBJECT).map_err(|source| BpfError::Object {
        source: Box::new(source),
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Capture>();
    }
}
