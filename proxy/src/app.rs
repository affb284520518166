//! Wiring of one `skiff run`: capture, snapshot, listeners, admin, readiness and drain.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::{self, Admin, CaptureControl, ControlError};
use crate::bpf::{Capture, CaptureConfig, NODE_SCOPE, Owner};
use crate::capture::CaptureExtras;
use crate::config::Bootstrap;
use crate::dataplane::{Dataplane, ListenerRole, Workers};
use crate::state::{Snapshot, Store};
use crate::stats::Stats;
use crate::takeover::{HandoverOptions, Role, Sockets};
use crate::xds::{self, Resources, XdsOptions};

/// Everything `skiff run` needs, already validated.
#[derive(Debug)]
pub struct RunOptions {
    /// Static configuration.
    pub bootstrap: Bootstrap,
    /// Kernel capture to install; `None` for `--capture none`.
    pub capture: Option<CaptureConfig>,
    /// Capture listener (IPv4).
    pub outbound_v4: SocketAddrV4,
    /// Capture listener (IPv6), if any.
    pub outbound_v6: Option<SocketAddrV6>,
    /// SO_MARK for upstream sockets.
    pub upstream_mark: Option<u32>,
    /// Admin address (`None`: no admin listener).
    pub admin: Option<SocketAddr>,
    /// What the admin listener allows (remote binds, mutating endpoints, pod paths).
    pub admin_options: crate::admin::AdminOptions,
    /// How long in-flight connections may take to finish after shutdown starts.
    pub drain: Duration,
    /// Data-plane workers (`--concurrency`): threads with one runtime and one socket per
    /// listener each (0 counts as 1).
    pub concurrency: usize,
    /// `--cpu-affinity`: whether workers are pinned and connections steered to them by CPU.
    pub cpu_affinity: crate::dataplane::placement::CpuAffinity,
}

/// The installed eBPF capture as `run` uses it: the capture, its config, the capture port,
/// the owner of the fast-path maps and (node mode) the pod registry.
struct CaptureHandle {
    capture: Capture,
    cfg: CaptureConfig,
    capture_port: u16,
    /// The fast-path owner (`None` without `--fast-path`).
    owner: Option<Owner>,
    pods: Option<crate::capture::pods::PodRegistry>,
}

impl CaptureControl for CaptureHandle {
    fn add_cgroup(&self, path: &Path) -> Result<u64, ControlError> {
        self.capture
            .add_meshed_cgroup(path)
            .map_err(ControlError::failed)
    }
    fn remove_cgroup(&self, path: &Path) -> Result<(), ControlError> {
        self.capture
            .remove_meshed_cgroup(path)
            .map_err(ControlError::failed)
    }
    fn cgroups(&self) -> Result<Vec<u64>, ControlError> {
        self.capture.meshed_cgroups().map_err(ControlError::failed)
    }
    fn set_ready(&self, ready: bool) -> Result<(), ControlError> {
        self.capture.set_ready(ready).map_err(ControlError::failed)
    }
    fn stats(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .capture
            .stats()
            .map(|v| v.into_iter().map(|(k, n)| (k.to_string(), n)).collect())
            .unwrap_or_default();
        for (vip, st) in self.capture.service_stats() {
            out.push((format!("fast_path.{vip}.cx_total"), st.connects));
            out.push((format!("fast_path.{vip}.fallback_total"), st.fallbacks));
            out.push((format!("fast_path.{vip}.no_healthy_total"), st.no_healthy));
        }
        out.extend(self.capture.event_stats());
        for (ep, load) in self.capture.endpoint_stats() {
            out.push((format!("fast_path.endpoint.{ep}.cx_total"), load.total));
            out.push((format!("fast_path.endpoint.{ep}.cx_active"), load.active));
        }
        // Gauges: what the kernel currently serves (cheap to poll, unlike /debug/maps).
        if let Some(g) = self.capture.fast_path_gauges() {
            out.extend([
                ("fast_path.services".to_string(), g.services),
                ("fast_path.clusters".to_string(), g.clusters),
                ("fast_path.endpoints".to_string(), g.endpoints),
                ("fast_path.last_project_us".to_string(), g.last_project_us),
                ("fast_path.last_apply_us".to_string(), g.last_apply_us),
                ("fast_path.terminated_sockets".to_string(), g.terminated),
            ]);
        }
        out.extend(self.capture.xdp_stats());
        out
    }
    fn add_pod(
        &self,
        spec: crate::capture::pods::PodSpec,
    ) -> Result<serde_json::Value, ControlError> {
        match &self.pods {
            Some(pods) => pods.add(&self.capture, spec).map_err(ControlError::failed),
            None => Err(ControlError::Unsupported(
                "pods exist only in node mode (--mode node)",
            )),
        }
    }
    fn remove_pod(&self, cgroup: &Path) -> Result<(), ControlError> {
        match &self.pods {
            Some(pods) => pods
                .remove(&self.capture, cgroup)
                .map_err(ControlError::failed),
            None => Err(ControlError::Unsupported(
                "pods exist only in node mode (--mode node)",
            )),
        }
    }
    fn pods(&self) -> serde_json::Value {
        match &self.pods {
            Some(pods) => pods.list(),
            None => serde_json::json!({ "pods": [] }),
        }
    }
    fn explain(&self, snap: &Snapshot, dst: SocketAddr) -> serde_json::Value {
        let view = self.capture.fast_path_view();
        crate::bpf::explain::explain(&self.cfg, view.as_ref(), snap, self.capture_port, dst)
    }
    fn maps(&self) -> serde_json::Value {
        let view = self.capture.fast_path_view();
        let mut out = crate::bpf::explain::maps_json(
            view.as_ref(),
            &self.capture.service_stats(),
            &self.capture.endpoint_stats(),
        );
        if let (Some(serde_json::Value::Object(x)), Some(o)) =
            (self.capture.xdp_maps(), out.as_object_mut())
        {
            o.extend(x);
        }
        out
    }
}

/// The iptables fallback as the admin API sees it: no cgroups, the REDIRECT counters as
/// `skiff.iptables.*`, and readiness = rules installed (drain removes them: fail-open).
impl CaptureControl for crate::capture::IptablesGate {
    fn add_cgroup(&self, _path: &Path) -> Result<u64, ControlError> {
        Err(ControlError::Unsupported(
            "the iptables capture has no cgroups (node mode needs --capture ebpf)",
        ))
    }
    fn remove_cgroup(&self, _path: &Path) -> Result<(), ControlError> {
        Err(ControlError::Unsupported(
            "the iptables capture has no cgroups (node mode needs --capture ebpf)",
        ))
    }
    fn cgroups(&self) -> Result<Vec<u64>, ControlError> {
        Ok(Vec::new())
    }
    fn stats(&self) -> Vec<(String, u64)> {
        self.counters()
    }
    fn set_ready(&self, ready: bool) -> Result<(), ControlError> {
        if ready { self.open() } else { self.close() }.map_err(ControlError::failed)
    }
    fn stats_prefix(&self) -> &'static str {
        "skiff"
    }
}

/// Installs the eBPF capture for `cfg` (after the coexistence check unless `allow_coexist`),
/// starts the owner of its fast-path maps (stopped by `stop`; its task goes to `tasks`) and, in
/// node mode, the pod registry (which takes the inbound capture to each pod).
fn install_ebpf(
    cfg: &CaptureConfig,
    opts: &RunOptions,
    extras: &CaptureExtras,
    pods_stop: &CancellationToken,
    stop: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<CaptureHandle> {
    if !extras.allow_coexist {
        let found = crate::capture::coexist::foreign_programs(
            cfg.mode.capture_cgroup(),
            cfg.mode.proxy_cgroup(),
        )
        .context("checking for other programs on the capture hooks")?;
        // A killed skiff's pinned programs are ours to take over, not foreign.
        let own = crate::bpf::pin::dir_for(cfg)?
            .filter(|d| !crate::bpf::pin::in_use(d))
            .map(|d| crate::bpf::pin::pinned_program_ids(&d))
            .unwrap_or_default();
        let found: Vec<_> = found.into_iter().filter(|f| !own.contains(&f.id)).collect();
        if !found.is_empty() {
            anyhow::bail!(crate::capture::coexist::refusal(&found));
        }
    }
    let mut c = Capture::install(cfg).context("installing eBPF capture")?;
    c.spawn_log_pump();
    let owner = c.start_fast_path_owner(stop.clone()).map(|(owner, task)| {
        tasks.push(task);
        owner
    });
    // Node mode: pods registered at run time get their own pipelines.
    let pods = cfg.mode.is_node().then(|| {
        crate::capture::pods::PodRegistry::new(
            opts.bootstrap.clone(),
            opts.upstream_mark,
            opts.outbound_v4,
            opts.outbound_v6,
            extras.inbound.clone(),
            extras.allow_coexist,
            owner.clone(),
            pods_stop.clone(),
        )
    });
    Ok(CaptureHandle {
        capture: c,
        cfg: cfg.clone(),
        capture_port: opts.outbound_v4.port(),
        owner,
        pods,
    })
}

/// Step 1: the capture. It must be installed first: it moves this process into the proxy
/// cgroup, and only sockets created afterwards are seen by the getsockopt hook. With `--capture
/// auto`, a failed eBPF install falls back to iptables (recorded in `extras`).
fn install_capture(
    opts: &RunOptions,
    extras: &mut CaptureExtras,
    pods_stop: &CancellationToken,
    stop: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Option<Arc<CaptureHandle>>> {
    Ok(match &opts.capture {
        Some(cfg) if extras.auto_fallback.is_some() => {
            match install_ebpf(cfg, opts, extras, pods_stop, stop, tasks) {
                Ok(h) => Some(Arc::new(h)),
                Err(e) => {
                    // --capture auto: eBPF was expected to work; iptables serves instead.
                    warn!(reason = %format!("{e:#}"), "--capture auto: eBPF capture failed; using iptables");
                    extras.iptables = extras.auto_fallback.take();
                    if let Some(ib) = &mut extras.inbound {
                        ib.sk_lookup = false;
                    }
                    None
                }
            }
        }
        Some(cfg) => Some(Arc::new(install_ebpf(
            cfg, opts, extras, pods_stop, stop, tasks,
        )?)),
        None => None,
    })
}

/// Step 3: the kernel fast path of the node's own scope: the bootstrap's static services go in
/// before any listener is up, and every health or outlier change of the store's hosts is
/// projected again (by the owner task, which also takes every later publish).
async fn start_fast_path(
    owner: &Owner,
    store: &Arc<Store>,
    capture_port: u16,
    stop: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    if let Err(e) = owner
        .publish_and_wait(NODE_SCOPE, store.load(), capture_port)
        .await
    {
        warn!(error = %e, "kernel fast path incomplete for the bootstrap configuration");
    }
    tasks.push(owner.follow_health(
        NODE_SCOPE,
        store.registry().subscribe_health(),
        stop.clone(),
    ));
}

/// Where the workers run (see [`crate::dataplane::placement`]): logged, since it changes how
/// the kernel spreads connections.
fn placement(opts: &RunOptions) -> Option<Vec<usize>> {
    use crate::dataplane::placement;
    let allowed = match placement::allowed_cpus() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot read this process's CPUs: workers not pinned");
            return None;
        }
    };
    let cpus = placement::plan(opts.cpu_affinity, opts.concurrency.max(1), &allowed);
    match &cpus {
        Some(c) => {
            info!(cpus = ?c, "one worker per CPU: worker i pinned to the i-th, connections steered to their CPU's worker")
        }
        None => {
            debug!(workers = opts.concurrency.max(1), allowed = allowed.len(), affinity = ?opts.cpu_affinity, "workers not pinned; the kernel hashes connections over them")
        }
    }
    cpus
}

/// Every data-plane listening socket is made here (so that a process taking over hands its
/// sockets in at one place): `n` sockets (at least one) on `addr`, one per worker, sharing the
/// port with SO_REUSEPORT so the kernel spreads connections over their accept queues, all bound
/// before any accepts. SO_REUSEADDR (restarts must not wait for TIME_WAIT), non-blocking, a
/// backlog of 4096; `v6_only` sets IPV6_V6ONLY on IPv6 sockets. Port 0 picks one free port for
/// all of them.
pub fn listen_sockets(
    addr: SocketAddr,
    n: usize,
    v6_only: bool,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let mut addr = addr;
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        if addr.is_ipv6() && v6_only {
            s.set_only_v6(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        if addr.port() == 0 {
            // The others join the port the kernel picked for the first.
            if let Some(a) = s.local_addr()?.as_socket() {
                addr = a;
            }
        }
        out.push(s.into());
    }
    Ok(out)
}

/// Bind the admin socket with SO_REUSEADDR (restarts must not wait for TIME_WAIT).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

/// Waits until the ADS client has the initial configuration (`rx` turns true) or `timeout`
/// passes (Envoy then initializes with what it has); `None` timeout waits for ever. `false`
/// when `shutdown` completes first.
async fn wait_initialized(
    rx: Option<tokio::sync::watch::Receiver<bool>>,
    timeout: Option<Duration>,
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let Some(mut rx) = rx else {
        return true;
    };
    let fetched = async {
        match timeout {
            Some(t) => tokio::time::timeout(t, rx.wait_for(|v| *v)).await.is_ok(),
            None => rx.wait_for(|v| *v).await.is_ok(),
        }
    };
    tokio::select! {
        ok = fetched => {
            if !ok {
                warn!(
                    timeout_ms = timeout.map(|t| t.as_millis() as u64),
                    "initial_fetch_timeout elapsed before the first LDS/CDS responses; serving what is there"
                );
            }
            true
        }
        () = shutdown => false,
    }
}

/// Run until `shutdown` completes, then drain and clean up (links detach when the capture drops).
pub async fn run(opts: RunOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_with(opts, CaptureExtras::default(), shutdown).await
}

/// [`run`] with the capture settings of `crate::capture` (iptables fallback, coexistence).
pub async fn run_with(
    opts: RunOptions,
    extras: CaptureExtras,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_handover(opts, extras, HandoverOptions::default(), shutdown).await
}

/// [`run_with`], taking the listening sockets over from a running skiff (`--takeover`) and
/// accepting a successor on the handover socket (see [`crate::takeover`]).
pub async fn run_handover(
    opts: RunOptions,
    extras: CaptureExtras,
    handover: HandoverOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut extras = extras;
    let handover_path = handover.socket_path(opts.capture.as_ref());
    // Takeover: the sockets (and the pin lock) first, before anything binds or pins.
    let (sockets, predecessor) = match handover.takeover_path(opts.capture.as_ref())? {
        Some(path) => {
            let (sockets, pred) =
                tokio::task::spawn_blocking(move || crate::takeover::receive(&path))
                    .await
                    .context("handover thread")?
                    .context("taking over from the running skiff")?;
            if let Some((dir, lock)) = sockets.take_inherited_pin_lock() {
                crate::bpf::pin::adopt_lock(dir, lock);
            }
            // The programs on the hooks are the running skiff's, which this one replaces.
            extras.allow_coexist = true;
            (sockets, Some(pred))
        }
        None => (Sockets::new(), None),
    };
    // Stops every task of this run, then (after them) the pipelines of node-mode pods.
    let stop = CancellationToken::new();
    let pods_stop = CancellationToken::new();
    // `/drain_listeners` stops the listeners it names; each listener waits on it beside `stop`.
    let drain_signal = admin::DrainSignal::new();
    let mut tasks = Vec::new();
    let capture = install_capture(&opts, &mut extras, &pods_stop, &stop, &mut tasks)?;
    if let Some((dir, Ok(lock))) = capture.as_ref().and_then(|c| c.capture.pin_lock()) {
        sockets.set_pin_lock(dir, lock);
    }
    // Until the predecessor drains, a failure here must leave its gate and pins alone.
    let mut leave = LeaveToPredecessor(capture.clone().filter(|_| predecessor.is_some()));
    let stats = Arc::new(Stats::default());
    // The kernel event reader runs until the capture is dropped (not one of `tasks`, which
    // shutdown waits for).
    if let Some(c) = &capture {
        c.capture.spawn_events(stats.clone());
    }
    // Step 2: the store of snapshots; host state (ejections, health checks, active requests)
    // outlives each snapshot.
    let store = Store::for_bootstrap(&opts.bootstrap, stats.clone());
    let capture_port = opts.outbound_v4.port();
    let owner = capture.as_ref().and_then(|c| c.owner.clone());
    if let Some(owner) = &owner {
        start_fast_path(owner, &store, capture_port, &stop, &mut tasks).await;
    }
    // The data-plane workers, started after the capture moved this process into the proxy
    // cgroup; one TLS cache for all of them (a session resumes on any worker).
    let tls = Arc::new(crate::tls::TlsContexts::new());
    let sockmap_ports = capture
        .as_ref()
        .map(|c| c.capture.sockmap_ports().to_vec())
        .unwrap_or_default();
    let cpus = placement(&opts);
    let workers = Arc::new(
        Workers::start(opts.concurrency, cpus, |_| {
            let mut dp = Dataplane::with_tls(
                store.clone(),
                stats.clone(),
                opts.upstream_mark,
                capture_port,
                tls.clone(),
            );
            dp.sockmap_ports = sockmap_ports.clone();
            dp
        })
        .context("starting the data-plane workers")?,
    );
    info!(workers = workers.len(), "data-plane workers up");
    tasks.push(tokio::spawn(crate::health::run(
        store.clone(),
        opts.upstream_mark,
        stop.clone(),
    )));
    let listeners = start_listeners(
        &opts,
        &extras,
        (&workers, &stats),
        (&stop, &sockets),
        &drain_signal,
        &mut tasks,
    )?;
    let mut sds = start_sds(&opts, &stats, &stop, &mut tasks);
    if opts.bootstrap.ads.is_none()
        && let Some(external) = sds.take()
    {
        tasks.push(crate::state::secrets::spawn_static_republisher(
            Arc::new(opts.bootstrap.clone()),
            store.clone(),
            external,
            stop.clone(),
        ));
    }
    let initialized = start_xds(
        &opts,
        &store,
        &stats,
        &workers,
        owner.as_ref(),
        (listeners.inbound_port, sds),
        (&stop, &sockets),
        &drain_signal,
        &mut tasks,
    )
    .await;
    let ready = Arc::new(AtomicBool::new(false));
    // The iptables fallback, closed until ready; the admin API opens and closes it like the
    // eBPF ready gate.
    let iptables: Option<Arc<crate::capture::IptablesGate>> = extras
        .iptables
        .clone()
        .map(|cfg| Arc::new(crate::capture::IptablesGate::new(cfg)));
    let control = capture
        .clone()
        .map(|c| c as Arc<dyn CaptureControl>)
        .or_else(|| iptables.clone().map(|g| g as Arc<dyn CaptureControl>));
    start_admin(
        &opts,
        &store,
        &stats,
        control,
        &ready,
        (&stop, &drain_signal, &sockets),
        &mut tasks,
    )?;

    tokio::pin!(shutdown);
    let mut handed_over = false;
    let mut handover_socket = None;
    if wait_initialized(
        initialized,
        opts.bootstrap.initial_fetch_timeout,
        shutdown.as_mut(),
    )
    .await
    {
        open_gates(capture.as_deref(), iptables.as_deref(), &ready)?;
        if let Some(pred) = predecessor {
            drain_predecessor(pred, &sockets).await;
        }
        leave.0 = None;
        if handover.drop_caps {
            drop_capabilities(opts.capture.as_ref().is_some_and(|c| c.mode.is_node()));
            workers.wake_all();
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        if let Some(path) = &handover_path {
            match crate::takeover::serve(path, sockets.clone(), move || {
                let _ = tx.send(());
            }) {
                Ok(h) => handover_socket = Some(h),
                Err(e) => {
                    warn!(error = %e, "no handover socket: `skiff run --takeover` cannot replace this skiff")
                }
            }
        }
        let successor = async move {
            if rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        handed_over = tokio::select! {
            () = shutdown.as_mut() => false,
            () = successor => true,
        };
    }
    if handed_over {
        info!("a successor took the sockets over; draining");
        if let Some(c) = &capture {
            c.capture.hand_over();
        }
    }
    drain(
        opts.drain,
        capture,
        iptables.as_deref().filter(|_| !handed_over),
        &ready,
        [stop, pods_stop],
        tasks,
        listeners.inbound_steering,
        &stats,
    )
    .await;
    if let Some(h) = handover_socket {
        h.remove();
    }
    // Connections still open after the drain time close with their workers.
    drop(workers);
    Ok(())
}

/// Keeps only the capabilities run time needs (loaded, attached, bound: the rest is done).
fn drop_capabilities(node_mode: bool) {
    use crate::takeover::caps;
    match caps::drop_to(caps::run_time_set(node_mode)) {
        Ok(()) => info!(
            kept = ?caps::names(caps::effective().unwrap_or(0)),
            "dropped the capabilities run time does not need"
        ),
        Err(e) => warn!(error = %e, "could not drop capabilities"),
    }
}

/// Held by a successor until its predecessor drains: if this run fails first, its capture
/// is dropped as handed over (the running skiff keeps the gate open and its pins; the links
/// keep this process's programs, which share the pinned maps).
struct LeaveToPredecessor(Option<Arc<CaptureHandle>>);

impl Drop for LeaveToPredecessor {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            warn!("takeover failed; the running skiff keeps the capture");
            c.capture.hand_over();
        }
    }
}

/// Tells the skiff this one took over from to drain (this one serves and is ready), then
/// closes the inherited sockets no bind site took.
async fn drain_predecessor(pred: crate::takeover::Predecessor, sockets: &Sockets) {
    match tokio::task::spawn_blocking(move || pred.drain()).await {
        Ok(Ok(())) => info!("the previous skiff drains"),
        Ok(Err(e)) => warn!(error = %e, "could not tell the previous skiff to drain"),
        Err(e) => warn!(error = %e, "handover thread"),
    }
    for addr in sockets.drop_unused() {
        info!(%addr, "inherited socket not in this configuration: closed");
    }
}

/// Whether `skiff run` needs its capture listener (15001): something captures, or the
/// configuration serves the capture port (a bootstrap listener on it, or ADS, whose
/// virtualOutbound may arrive). `--capture none` with neither binds nothing there, so plain
/// proxies can share a host.
pub fn needs_capture_listener(opts: &RunOptions, extras: &CaptureExtras) -> bool {
    let port = opts.outbound_v4.port();
    opts.capture.is_some()
        || extras.iptables.is_some()
        || extras.auto_fallback.is_some()
        || opts.bootstrap.ads.is_some()
        || opts
            .bootstrap
            .listeners
            .iter()
            .any(|l| l.address.port() == port)
}

/// What [`start_listeners`] leaves running besides its tasks.
struct Listeners {
    /// The local inbound port (sidecar mode with inbound capture).
    inbound_port: Option<u16>,
    /// The sk_lookup steering of the local inbound listeners, detached on drop.
    inbound_steering: Option<Option<Arc<crate::bpf::inbound::InboundSteering>>>,
}

/// Step 4: the capture listeners (IPv4 and IPv6), the local inbound listeners and the
/// bootstrap's own bound listeners.
fn start_listeners(
    opts: &RunOptions,
    extras: &CaptureExtras,
    (workers, stats): (&Arc<Workers>, &Arc<Stats>),
    (stop, sockets): (&CancellationToken, &Sockets),
    drain: &admin::DrainSignal,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Listeners> {
    let capture_port = opts.outbound_v4.port();
    let mut capture_addrs = vec![SocketAddr::V4(opts.outbound_v4)];
    capture_addrs.extend(opts.outbound_v6.map(SocketAddr::V6));
    // With nothing sending traffic to the capture port, it is not bound (a second plain
    // proxy on the host must not fail on it).
    if !needs_capture_listener(opts, extras) {
        capture_addrs.clear();
    }
    for addr in capture_addrs {
        let l = sockets
            .listen(Role::Capture, addr, || {
                listen_sockets(addr, workers.len(), false)
            })
            .with_context(|| format!("binding capture listener {addr}"))?;
        info!(%addr, "capture listener up");
        let role = ListenerRole::Capture;
        tasks.extend(serve(
            workers,
            (l, addr),
            role,
            (stop, sockets),
            drain,
            false,
        ));
    }
    // Inbound capture: skiff's own listener on the inbound port serves virtualInbound.
    // In node mode inbound capture belongs to the pods (`capture::pods`), not this netns.
    let node_mode = opts.capture.as_ref().is_some_and(|c| c.mode.is_node());
    let local_inbound = extras.inbound.as_ref().filter(|_| !node_mode);
    let inbound_port = local_inbound.map(|i| i.port);
    let inbound_steering = match local_inbound {
        Some(ib) => Some(start_inbound(
            ib,
            extras.allow_coexist,
            (workers, stats),
            (stop, sockets),
            drain,
            tasks,
        )?),
        None => None,
    };
    for l in &opts.bootstrap.listeners {
        // skiff's proxy serves no UDP: a udp_proxy listener is served by the kernel fast path
        // (when eligible) or not at all.
        if l.udp.is_some() {
            debug!(listener = %l.name, addr = %l.address, "UDP listener: not bound by the proxy");
            continue;
        }
        // The capture listener serves the virtual listener's port; per-service listeners
        // (bind_to_port false) only receive connections handed over by original destination.
        if !l.bind_to_port
            || l.address.port() == capture_port
            || inbound_port == Some(l.address.port())
        {
            continue;
        }
        let socks = sockets
            .listen(Role::Listener, l.address, || {
                listen_sockets(l.address, workers.len(), false)
            })
            .with_context(|| format!("binding listener {} on {}", l.name, l.address))?;
        info!(listener = %l.name, addr = %l.address, "listener up");
        let role = ListenerRole::Static {
            name: l.name.clone(),
        };
        let at = (socks, l.address);
        tasks.extend(serve(workers, at, role, (stop, sockets), drain, false));
    }
    Ok(Listeners {
        inbound_port,
        inbound_steering,
    })
}

/// Accept on `socks` (one per worker, listening on `addr`) as listeners of `role` until
/// `stop` or a `/drain_listeners` that covers them (`inbound`: the listener is inbound).
/// Then the handover registry lets go of its copies too, so the socket closes and new
/// connects are refused rather than queued where no one accepts.
fn serve(
    workers: &Workers,
    (socks, addr): (Vec<std::net::TcpListener>, SocketAddr),
    role: ListenerRole,
    (stop, sockets): (&CancellationToken, &Sockets),
    drain: &admin::DrainSignal,
    inbound: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    workers.serve(socks, &role, || {
        let stop = stop.clone();
        let sockets = sockets.clone();
        let stopped = drain.or_shutdown(inbound, async move { stop.cancelled().await });
        async move {
            stopped.await;
            sockets.forget(addr);
        }
    })
}

/// Istio's name for the bootstrap cluster of its local SDS server (pilot-agent's Unix socket),
/// which the CDS clusters and LDS chains istiod sends name in their `sds_config`.
const ISTIO_SDS_CLUSTER: &str = "sds-grpc";

/// Step 4b: the SDS client of a gRPC cluster (Istio's `sds-grpc` Unix socket) and the seam
/// through which what it holds reaches every snapshot. The cluster is the one the bootstrap's
/// own TLS contexts name, else `sds-grpc` when the bootstrap has it (Istio's CDS clusters name
/// it later). `None`: no such cluster.
fn start_sds(
    opts: &RunOptions,
    stats: &Arc<Stats>,
    stop: &CancellationToken,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Option<crate::state::secrets::ExternalSecrets> {
    use crate::model::tls::SdsSource;
    let b = &opts.bootstrap;
    let named: std::collections::BTreeSet<&str> = b
        .listeners
        .iter()
        .flat_map(|l| l.sds_refs())
        .chain(b.clusters.iter().flat_map(|c| c.transport.sds_refs()))
        .filter_map(|r| match &r.source {
            SdsSource::Grpc { cluster } => Some(cluster.as_str()),
            _ => None,
        })
        .collect();
    if named.len() > 1 {
        // One SDS client serves them all: the others' secrets would never arrive.
        warn!(clusters = ?named, "several gRPC SDS clusters; skiff follows only the first");
    }
    let cluster = match named.first() {
        Some(c) => *c,
        None if b.grpc_targets.contains_key(ISTIO_SDS_CLUSTER) => ISTIO_SDS_CLUSTER,
        None => return None,
    };
    let Some(target) = b.grpc_targets.get(cluster) else {
        warn!(
            cluster,
            "SDS cluster has no usable endpoint (an IP address or a Unix socket)"
        );
        return None;
    };
    info!(cluster, %target, "starting SDS client");
    let (external, ends) = crate::state::secrets::ExternalSecrets::channel();
    tasks.push(xds::sds::spawn_with_stats(
        target.clone(),
        b.raw.node.clone(),
        ends.names,
        ends.secrets,
        stats.clone(),
        stop.clone(),
    ));
    Some(external)
}

/// Step 5: the ADS client (with the listeners that arrive over LDS), its publishes handed to the
/// fast-path owner before each ACK. Returns Envoy's "initialized" signal: ready once the first
/// LDS/CDS responses are in (see `XdsOptions`); `None` without ADS (ready at once).
#[allow(clippy::too_many_arguments)]
async fn start_xds(
    opts: &RunOptions,
    store: &Arc<Store>,
    stats: &Arc<Stats>,
    workers: &Arc<Workers>,
    owner: Option<&Owner>,
    (inbound_port, sds): (Option<u16>, Option<crate::state::secrets::ExternalSecrets>),
    (stop, sockets): (&CancellationToken, &Sockets),
    drain: &admin::DrainSignal,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Option<tokio::sync::watch::Receiver<bool>> {
    let ads = opts.bootstrap.ads.as_ref()?;
    let capture_port = opts.outbound_v4.port();
    // Listeners that arrive over LDS are bound and unbound as they come and go.
    tasks.push(tokio::spawn(dynamic_listeners(
        store.clone(),
        (workers.clone(), stats.clone()),
        [Some(capture_port), inbound_port],
        (stop.clone(), sockets.clone()),
        drain.clone(),
    )));
    let resources = Resources::for_bootstrap(&opts.bootstrap);
    store.publish(resources.snapshot());
    let mut xopts = XdsOptions::new(ads.clone(), opts.bootstrap.raw.node.clone());
    xopts.external_secrets = sds;
    if opts.bootstrap.lds_ads {
        xopts.initial_types.push(skiff_proto::LISTENER_TYPE_URL);
    }
    if opts.bootstrap.cds_ads {
        xopts.initial_types.push(skiff_proto::CLUSTER_TYPE_URL);
    }
    let mut initialized = None;
    if !xopts.initial_types.is_empty() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        xopts.initialized = Some(tx);
        initialized = Some(rx);
    }
    if let Some(owner) = owner {
        if let Err(e) = owner
            .publish_and_wait(NODE_SCOPE, store.load(), capture_port)
            .await
        {
            warn!(error = %e, "kernel fast path incomplete");
        }
        xopts.on_publish = Some(owner.publish_hook(NODE_SCOPE, capture_port));
    }
    info!(server = %ads.server, api = ?ads.api, "starting ADS client");
    tasks.push(xds::spawn(
        xopts,
        resources,
        store.clone(),
        stats.clone(),
        stop.clone(),
    ));
    initialized
}

/// Step 6: the admin listener (127.0.0.1 only).
fn start_admin(
    opts: &RunOptions,
    store: &Arc<Store>,
    stats: &Arc<Stats>,
    capture: Option<Arc<dyn CaptureControl>>,
    ready: &Arc<AtomicBool>,
    (stop, drain, sockets): (&CancellationToken, &admin::DrainSignal, &Sockets),
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let Some(addr) = opts.admin else {
        return Ok(());
    };
    let l = sockets
        .listen_one(Role::Admin, addr, || bind(addr))
        .with_context(|| format!("binding admin listener {addr}"))?;
    let admin = Arc::new(Admin {
        store: store.clone(),
        stats: stats.clone(),
        capture,
        ready: ready.clone(),
        bootstrap: Arc::new(opts.bootstrap.raw.clone()),
        extra_config_dump: None,
        node_id: opts.bootstrap.node.id.clone(),
    });
    info!(%addr, "admin listener up");
    let stop = stop.clone();
    tasks.push(tokio::spawn(admin::serve(
        l,
        admin,
        opts.admin_options.clone(),
        drain.clone(),
        async move { stop.cancelled().await },
    )));
    Ok(())
}

/// Step 7: ready. The kernel's ready gate opens; iptables rules go in once the listeners exist
/// (no window of refused connects); they are removed when shutdown starts (or on
/// /drain_listeners), or by drop on error.
fn open_gates(
    capture: Option<&CaptureHandle>,
    iptables: Option<&crate::capture::IptablesGate>,
    ready: &AtomicBool,
) -> anyhow::Result<()> {
    if let Some(c) = capture {
        c.capture
            .set_ready(true)
            .context("marking the proxy ready in the BPF config map")?;
    }
    if let Some(g) = iptables {
        g.open().context("installing iptables capture")?;
    }
    ready.store(true, Ordering::Relaxed);
    crate::mem::release_startup();
    info!("skiff ready");
    Ok(())
}

/// Step 8: drain. New connects stop coming our way first (fail-open or fail-closed per
/// config), then the listeners close, then in-flight connections get the drain time to finish;
/// the capture's links detach when it drops.
#[allow(clippy::too_many_arguments)]
async fn drain(
    drain: Duration,
    capture: Option<Arc<CaptureHandle>>,
    iptables: Option<&crate::capture::IptablesGate>,
    ready: &AtomicBool,
    stops: [CancellationToken; 2],
    tasks: Vec<tokio::task::JoinHandle<()>>,
    inbound_steering: Option<Option<Arc<crate::bpf::inbound::InboundSteering>>>,
    stats: &Stats,
) {
    info!(drain_ms = drain.as_millis() as u64, "shutting down");
    if let Some(c) = &capture
        && let Err(e) = c.capture.set_ready(false)
    {
        warn!(error = %e, "could not clear the ready flag");
    }
    if let Some(g) = iptables
        && let Err(e) = g.close()
    {
        warn!(error = %e, "could not remove the iptables capture; run `skiff cleanup`");
    }
    ready.store(false, Ordering::Relaxed);
    for s in &stops {
        s.cancel();
    }
    for t in tasks {
        let _ = t.await;
    }
    let deadline = tokio::time::Instant::now() + drain;
    while active_connections(stats) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(inbound_steering);
    drop(capture);
    info!("stopped");
}

/// Binds the inbound listeners (0.0.0.0 and, with IPv6, [::] on the inbound port), starts
/// their accept loops and, in eBPF mode, attaches `sk_lookup` steering to them. The kernel
/// counters are mirrored into `/stats` as `skiff.inbound.<name>`.
fn start_inbound(
    ib: &crate::capture::InboundOptions,
    allow_coexist: bool,
    (workers, stats): (&Arc<Workers>, &Arc<Stats>),
    (stop, sockets): (&CancellationToken, &Sockets),
    drain: &admin::DrainSignal,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<Option<Arc<crate::bpf::inbound::InboundSteering>>> {
    let v4_addr = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, ib.port));
    let v4 = sockets
        .listen(Role::Inbound, v4_addr, || {
            listen_sockets(v4_addr, workers.len(), false)
        })
        .with_context(|| format!("binding inbound listener {v4_addr}"))?;
    let v6_addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, ib.port));
    let v6 = if ib.ipv6 {
        let addr = v6_addr;
        // v6-only: the IPv4 listener serves IPv4 (sk_lookup assigns by family).
        Some(
            sockets
                .listen(Role::Inbound, addr, || {
                    listen_sockets(addr, workers.len(), true)
                })
                .with_context(|| format!("binding inbound listener {addr} (IPv6 only)"))?,
        )
    } else {
        None
    };
    let steering = if ib.sk_lookup {
        if !allow_coexist {
            let found = crate::capture::coexist::netns_programs(Path::new("/proc/self/ns/net"))
                .context("checking for other sk_lookup programs in this network namespace")?;
            if !found.is_empty() {
                anyhow::bail!(crate::capture::coexist::refusal(&found));
            }
        }
        let pod_ips = if ib.pod_ips.is_empty() {
            crate::bpf::inbound::local_addresses()?
        } else {
            ib.pod_ips.clone()
        };
        // sk_lookup picks one socket of each family; the kernel then applies the reuseport
        // group's selection, so every worker's socket gets its share.
        let s = crate::bpf::inbound::InboundSteering::install(
            &v4[0],
            v6.as_ref().map(|v| &v[0]),
            &pod_ips,
            &ib.exclude_ports,
        )
        .context("installing sk_lookup inbound capture")?;
        Some(Arc::new(s))
    } else {
        None
    };
    for at in std::iter::once((v4, v4_addr)).chain(v6.map(|v| (v, v6_addr))) {
        info!(addr = ?at.0[0].local_addr().ok(), "inbound listener up");
        let role = ListenerRole::Inbound { port: ib.port };
        tasks.extend(serve(workers, at, role, (stop, sockets), drain, true));
    }
    if let Some(s) = steering.clone() {
        let stats = stats.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            // The kernel counters only grow: add what they gained since the last look.
            let mut last: Vec<u64> = Vec::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let now = s.stats();
                last.resize(now.len(), 0);
                for ((name, n), seen) in now.into_iter().zip(last.iter_mut()) {
                    stats
                        .counter(&format!("skiff.inbound.{name}"))
                        .add(n.saturating_sub(*seen));
                    *seen = n;
                }
            }
        }));
    }
    Ok(steering)
}

fn active_connections(stats: &Stats) -> u64 {
    stats
        .snapshot()
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("listener.")
                && k.ends_with(".downstream_cx_active")
                && !k.contains(".worker_")
        })
        .map(|(_, v)| v)
        .sum()
}

/// Bind, rebind and unbind the listeners that came over LDS (`bind_to_port`, not on the
/// capture port). A removed listener stops accepting; its connections carry on.
async fn dynamic_listeners(
    store: Arc<Store>,
    (workers, stats): (Arc<Workers>, Arc<Stats>),
    skiff_ports: [Option<u16>; 2],
    (stop, sockets): (CancellationToken, Sockets),
    drain: admin::DrainSignal,
) {
    let mut changed = store.subscribe();
    // Per listener: its address, what stops it, and its accept loop on each worker.
    type Running = (
        SocketAddr,
        CancellationToken,
        Vec<tokio::task::JoinHandle<()>>,
    );
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    // UDP listeners already logged as skipped (once each, not on every snapshot).
    let mut udp_logged: BTreeSet<String> = BTreeSet::new();
    loop {
        let snap = store.load();
        for (n, l) in snap.listeners.iter().filter(|(_, l)| l.udp.is_some()) {
            if udp_logged.insert(n.clone()) {
                debug!(listener = %n, addr = %l.address, "UDP listener: not bound by the proxy");
            }
        }
        let wanted: BTreeMap<&String, SocketAddr> = snap
            .listeners
            .iter()
            .filter(|(n, l)| {
                !snap.static_listeners.contains(*n)
                    && l.udp.is_none()
                    && l.bind_to_port
                    && !skiff_ports.contains(&Some(l.address.port()))
            })
            .map(|(n, l)| (n, l.address))
            .collect();
        let gone: Vec<String> = running
            .iter()
            .filter(|(n, (addr, _, _))| wanted.get(n) != Some(addr))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some((addr, token, loops)) = running.remove(&n) {
                token.cancel();
                sockets.forget(addr);
                for l in loops {
                    let _ = l.await;
                }
                info!(listener = %n, %addr, "listener down");
            }
        }
        for (n, addr) in wanted {
            if running.contains_key(n) {
                continue;
            }
            match sockets.listen(Role::Listener, addr, || {
                listen_sockets(addr, workers.len(), false)
            }) {
                Ok(socks) => {
                    info!(listener = %n, %addr, "listener up");
                    let token = stop.child_token();
                    let role = ListenerRole::Static { name: n.clone() };
                    let at = (socks, addr);
                    let loops = serve(&workers, at, role, (&token, &sockets), &drain, false);
                    running.insert(n.clone(), (addr, token, loops));
                }
                Err(e) => {
                    warn!(listener = %n, %addr, error = %e, "cannot bind listener from LDS");
                    stats
                        .counter("listener_manager.listener_create_failure")
                        .inc();
                }
            }
        }
        drop(snap);
        tokio::select! {
            _ = stop.cancelled() => break,
            r = changed.changed() => if r.is_err() { break },
        }
    }
    for (_, (_, token, loops)) in running {
        token.cancel();
        for l in loops {
            let _ = l.await;
        }
    }
}
