//! Upstream hosts: what the current snapshot says about one (address, locality, weight, EDS
//! health) and the live state that outlives snapshots (active requests and connections,
//! outlier and active health-check flags), shared through [`HostState`]; and each cluster's
//! [`ClusterShared`], which keeps its hosts' states across snapshots and builds the hosts of
//! each new one (a host points back at it to report outcomes, so both live here).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::time::Instant;

use super::circuit::Breakers;
use crate::model::cluster::lb::{LbSettings, OutlierDetection};
use crate::model::endpoint::{HealthStatus, LoadAssignment, Locality};
use crate::stats::ClusterStats;

/// What happened to one request or connection sent to a host; feeds outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request succeeded (or a connection was established, for L4).
    Success,
    /// An HTTP response with this status came back from the host.
    Status(u16),
    /// The connect failed (refused, unreachable).
    ConnectFailure,
    /// The host did not answer in time (connect or response timeout).
    Timeout,
    /// The host reset the connection or stream.
    Reset,
    /// Another locally detected failure (protocol error, ...).
    LocalOriginFailure,
}

/// Health flags of a host, Envoy's `Host::HealthFlag` subset skiff sets.
pub mod flag {
    /// Ejected by outlier detection.
    pub const FAILED_OUTLIER_CHECK: u32 = 1;
    /// Failed active health checking.
    pub const FAILED_ACTIVE_HC: u32 = 1 << 1;
    /// Not yet checked by active health checking (also counts as failed until the first pass).
    pub const PENDING_ACTIVE_HC: u32 = 1 << 2;
    /// The last active health check timed out.
    pub const ACTIVE_HC_TIMEOUT: u32 = 1 << 3;
}

/// How a host may be used, from all its flags (Envoy's coarse health).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Coarse {
    /// Used for traffic.
    Healthy,
    /// Used only when not enough healthy hosts exist in its priority.
    Degraded,
    /// Used only in panic mode.
    Unhealthy,
}

/// Live state of one host, kept across snapshots by the registry (keyed by cluster + address).
#[derive(Debug)]
pub struct HostState {
    flags: AtomicU32,
    active_rq: AtomicU64,
    active_cx: AtomicU64,
    rq_total: AtomicU64,
    rq_error: AtomicU64,
    rq_timeout: AtomicU64,
    cx_total: AtomicU64,
    cx_connect_fail: AtomicU64,
    /// Set once any request or connection used this host (health checks use
    /// `no_traffic_interval` until then).
    pub(crate) used: AtomicBool,
    pub(crate) outlier: Mutex<OutlierHost>,
    ewma: Mutex<Ewma>,
}

/// Outlier-detection bookkeeping of one host.
#[derive(Debug, Default, Clone)]
pub(crate) struct OutlierHost {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub consecutive_local_origin_failure: u32,
    /// Times ejected (Envoy's ejection multiplier; decays while the host stays healthy).
    pub num_ejections: u32,
    /// When the current ejection started.
    pub ejected_at: Option<Instant>,
    /// Success-rate window of the current interval (external origin).
    pub interval_success: u64,
    pub interval_total: u64,
    /// Success rate of the last completed interval, percent, when it had enough volume.
    pub last_success_rate: Option<f64>,
}

/// PeakEWMA latency estimate (linkerd2-proxy's): peaks jump up at once, decay exponentially.
#[derive(Debug, Clone)]
struct Ewma {
    rtt_ns: f64,
    at: Option<Instant>,
}

/// RTT assumed before the first measurement (linkerd2-proxy uses a similar prior).
pub(crate) const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Decay window of the PeakEWMA estimate.
pub(crate) const EWMA_DECAY: Duration = Duration::from_secs(10);

impl Default for HostState {
    fn default() -> Self {
        HostState {
            flags: AtomicU32::new(0),
            active_rq: AtomicU64::new(0),
            active_cx: AtomicU64::new(0),
            rq_total: AtomicU64::new(0),
            rq_error: AtomicU64::new(0),
            rq_timeout: AtomicU64::new(0),
            cx_total: AtomicU64::new(0),
            cx_connect_fail: AtomicU64::new(0),
            used: AtomicBool::new(false),
            outlier: Mutex::new(OutlierHost::default()),
            ewma: Mutex::new(Ewma {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                at: None,
            }),
        }
    }
}

impl HostState {
    /// Current flags (`flag::*`).
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    /// Set `f`; true when any of its bits was not set before.
    pub(crate) fn set_flag(&self, f: u32) -> bool {
        self.flags.fetch_or(f, Ordering::AcqRel) & f != f
    }

    /// Clear `f`; true when it was set before.
    pub(crate) fn clear_flag(&self, f: u32) -> bool {
        self.flags.fetch_and(!f, Ordering::AcqRel) & f != 0
    }

    /// Requests in flight.
    pub fn active_requests(&self) -> u64 {
        self.active_rq.load(Ordering::Relaxed)
    }

    /// Connections open.
    pub fn active_connections(&self) -> u64 {
        self.active_cx.load(Ordering::Relaxed)
    }

    /// Requests sent so far.
    pub fn requests_total(&self) -> u64 {
        self.rq_total.load(Ordering::Relaxed)
    }

    /// Requests that failed (5xx, reset, timeout).
    pub fn requests_error(&self) -> u64 {
        self.rq_error.load(Ordering::Relaxed)
    }

    /// Requests that timed out.
    pub fn requests_timeout(&self) -> u64 {
        self.rq_timeout.load(Ordering::Relaxed)
    }

    /// Connections opened so far.
    pub fn connections_total(&self) -> u64 {
        self.cx_total.load(Ordering::Relaxed)
    }

    /// Connects that failed.
    pub fn connect_failures(&self) -> u64 {
        self.cx_connect_fail.load(Ordering::Relaxed)
    }

    /// Whether a request or connection ever used this host.
    pub fn has_carried_traffic(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Success rate of the last outlier-detection interval (percent), when measured.
    pub fn success_rate(&self) -> Option<f64> {
        self.outlier
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_success_rate
    }

    /// PeakEWMA cost: decayed peak RTT (ns) times (active requests + 1).
    pub(crate) fn ewma_cost(&self, now: Instant) -> f64 {
        let e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        let rtt = match e.at {
            Some(at) => decay(e.rtt_ns, now.saturating_duration_since(at)),
            None => e.rtt_ns,
        };
        rtt * (self.active_requests() as f64 + 1.0)
    }

    /// Feed one latency sample into the PeakEWMA estimate.
    pub(crate) fn observe_rtt(&self, rtt: Duration, now: Instant) {
        let mut e = self.ewma.lock().unwrap_or_else(|e| e.into_inner());
        let sample = rtt.as_nanos() as f64;
        // A peak replaces the estimate at once; lower samples pull it down with a weight that
        // grows with the time since the last update.
        e.rtt_ns = if sample > e.rtt_ns {
            sample
        } else {
            let elapsed =
                e.at.map(|at| now.saturating_duration_since(at))
                    .unwrap_or_default();
            let w = decay_weight(elapsed);
            e.rtt_ns * w + sample * (1.0 - w)
        };
        e.at = Some(now);
    }
}

/// Weight kept by an old estimate after `elapsed`: `exp(-elapsed / EWMA_DECAY)`.
fn decay_weight(elapsed: Duration) -> f64 {
    (-(elapsed.as_secs_f64()) / EWMA_DECAY.as_secs_f64()).exp()
}

/// The estimate decays towards zero while no sample arrives, so an idle host is tried again.
fn decay(rtt_ns: f64, elapsed: Duration) -> f64 {
    rtt_ns * decay_weight(elapsed)
}

/// One upstream host as the current snapshot describes it, with its live state.
#[derive(Debug)]
pub struct Host {
    pub(crate) address: SocketAddr,
    /// Region/zone/sub-zone (shared by the hosts of one locality group).
    pub locality: Arc<Locality>,
    /// Priority level (0 is highest).
    pub priority: u32,
    /// `load_balancing_weight` (at least 1).
    pub weight: u32,
    /// EDS `health_status`.
    pub eds_health: HealthStatus,
    /// Weight of the host's locality, when set.
    pub locality_weight: Option<u32>,
    pub(crate) state: Arc<HostState>,
    pub(crate) cluster: Arc<ClusterShared>,
    /// The endpoint's Istio workload metadata (Istio's `destination_*` labels).
    pub istio_workload: Option<Arc<crate::model::istio::Workload>>,
}

impl Host {
    /// Where to connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Live state (counters and flags).
    pub fn state(&self) -> &HostState {
        &self.state
    }

    /// Health flags from active checks and outlier detection (`flag::*`).
    pub fn flags(&self) -> u32 {
        self.state.flags()
    }

    /// Set health flags; true when any was not set (the caller bumps the health generation).
    pub fn set_health_flags(&self, f: u32) -> bool {
        self.state.set_flag(f)
    }

    /// Clear health flags; true when any was set.
    pub fn clear_health_flags(&self, f: u32) -> bool {
        self.state.clear_flag(f)
    }

    /// Envoy's coarse health over EDS status and live flags.
    pub fn coarse(&self) -> Coarse {
        coarse(self.eds_health, self.state.flags())
    }

    /// Count one request in flight until the guard drops (LEAST_REQUEST, PeakEWMA, `/clusters`).
    pub fn start_request(self: &Arc<Self>) -> RequestGuard {
        self.state.active_rq.fetch_add(1, Ordering::Relaxed);
        self.state.rq_total.fetch_add(1, Ordering::Relaxed);
        self.state.used.store(true, Ordering::Relaxed);
        RequestGuard {
            host: self.clone(),
            started: Instant::now(),
        }
    }

    /// Count one open connection until the guard drops.
    pub fn start_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.state.active_cx.fetch_add(1, Ordering::Relaxed);
        self.state.cx_total.fetch_add(1, Ordering::Relaxed);
        self.state.used.store(true, Ordering::Relaxed);
        ConnectionGuard { host: self.clone() }
    }

    /// Report what happened to a request or connect: outlier detection counts it.
    pub fn report(&self, outcome: Outcome) {
        self.report_at(outcome, Instant::now());
    }

    /// [`Host::report`] at `now`, read by the caller (a finished request has read the clock).
    fn report_at(&self, outcome: Outcome, now: Instant) {
        match outcome {
            Outcome::Success => {}
            Outcome::ConnectFailure => {
                self.state.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
                self.state.rq_error.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Status(s) if s < 500 => {}
            Outcome::Timeout => {
                self.state.rq_timeout.fetch_add(1, Ordering::Relaxed);
                self.state.rq_error.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.state.rq_error.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.cluster.report(self, outcome, now);
    }
}

/// Envoy's coarse health (`HostImpl::coarseHealth`): any failed flag or an EDS status of
/// UNHEALTHY, TIMEOUT or DRAINING makes the host unhealthy; EDS DEGRADED makes it degraded.
pub fn coarse(eds: HealthStatus, flags: u32) -> Coarse {
    if flags & (flag::FAILED_OUTLIER_CHECK | flag::FAILED_ACTIVE_HC | flag::ACTIVE_HC_TIMEOUT) != 0
    {
        return Coarse::Unhealthy;
    }
    match eds {
        HealthStatus::Unhealthy | HealthStatus::Timeout | HealthStatus::Draining => {
            Coarse::Unhealthy
        }
        HealthStatus::Degraded => Coarse::Degraded,
        HealthStatus::Healthy | HealthStatus::Unknown => Coarse::Healthy,
    }
}

/// One request in flight on a host; dropping it ends the request.
#[derive(Debug)]
pub struct RequestGuard {
    host: Arc<Host>,
    started: Instant,
}

impl RequestGuard {
    /// The host this request went to.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Report the request's outcome; its duration feeds the PeakEWMA latency estimate.
    pub fn finish(self, outcome: Outcome) {
        let now = Instant::now();
        self.host
            .state
            .observe_rtt(now.saturating_duration_since(self.started), now);
        self.host.report_at(outcome, now);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.host.state.active_rq.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open connection to a host; dropping it closes the count.
#[derive(Debug)]
pub struct ConnectionGuard {
    host: Arc<Host>,
}

impl ConnectionGuard {
    /// The host this connection goes to.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.host.state.active_cx.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl ClusterShared ===

/// One cluster's state kept across snapshots: its hosts' live state, circuit breaker counts,
/// outlier-detection settings and a health generation.
#[derive(Debug)]
pub struct ClusterShared {
    /// Cluster name (for logs).
    pub name: String,
    /// `cluster.<name>.*`, kept as long as this state.
    pub stats: Arc<ClusterStats>,
    health: Arc<watch::Sender<u64>>,
    generation: AtomicU64,
    hosts: Mutex<HashMap<SocketAddr, Arc<HostState>>>,
    /// Circuit breaker counts.
    pub breakers: Breakers,
    pub(crate) outlier: ArcSwap<Option<OutlierDetection>>,
    active_hc: ArcSwap<bool>,
    host_count: AtomicU64,
    /// (average, ejection threshold) of the last success-rate computation.
    pub(crate) success_rate_summary: Mutex<Option<(f64, f64)>>,
}

impl ClusterShared {
    /// Fresh state of cluster `name` (no hosts yet), counting in `stats`; health changes bump
    /// `health`.
    pub(super) fn new(
        name: &str,
        stats: Arc<ClusterStats>,
        health: Arc<watch::Sender<u64>>,
    ) -> ClusterShared {
        ClusterShared {
            name: name.to_string(),
            stats,
            health,
            generation: AtomicU64::new(0),
            hosts: Mutex::new(HashMap::new()),
            breakers: Breakers::default(),
            outlier: ArcSwap::from_pointee(None),
            active_hc: ArcSwap::from_pointee(false),
            host_count: AtomicU64::new(0),
            success_rate_summary: Mutex::new(None),
        }
    }

    /// Takes the cluster's current outlier-detection and active health-check settings.
    pub(super) fn update_settings(&self, settings: &LbSettings) {
        if **self.outlier.load() != settings.outlier {
            self.outlier.store(Arc::new(settings.outlier.clone()));
        }
        let hc = !settings.health_checks.is_empty();
        if **self.active_hc.load() != hc {
            self.active_hc.store(Arc::new(hc));
        }
    }

    /// Bumped whenever a host of this cluster changes health (ejection, active check).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Record a health change: this cluster's balancer rebuilds its host sets, and the BPF
    /// reconciler is woken.
    pub fn health_changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.health.send_modify(|g| *g += 1);
    }

    /// Hosts currently in this cluster's assignment.
    pub(crate) fn host_count(&self) -> u64 {
        self.host_count.load(Ordering::Relaxed)
    }

    /// Build the hosts of `assignment`, reusing the live state of hosts already known and
    /// dropping the state of hosts no longer listed. New hosts of an actively checked cluster
    /// start as failed and pending, as in Envoy, until their first check passes.
    pub(crate) fn hosts_for(
        self: &Arc<Self>,
        assignment: Option<&LoadAssignment>,
    ) -> Vec<Arc<Host>> {
        let mut hosts = Vec::new();
        // Replaced by `adopt` below; one shared placeholder avoids an allocation per host.
        let placeholder = Arc::new(HostState::default());
        if let Some(a) = assignment {
            for loc in &a.localities {
                let locality = Arc::new(loc.locality.clone());
                for e in &loc.endpoints {
                    // Internal endpoints are served in-process, never balanced over the network.
                    if e.internal.is_some() {
                        continue;
                    }
                    hosts.push(Arc::new(Host {
                        address: e.address,
                        locality: locality.clone(),
                        priority: loc.priority,
                        weight: e.weight,
                        eds_health: e.health,
                        locality_weight: loc.weight,
                        state: placeholder.clone(),
                        cluster: self.clone(),
                        istio_workload: e.istio_workload.clone(),
                    }));
                }
            }
        }
        let adopted = self.adopt(&mut hosts);
        debug_assert!(adopted, "hosts built here are not shared yet");
        hosts
    }

    /// Give `hosts` (this cluster's, in a snapshot not yet published) the live state kept for
    /// their addresses, and forget the state of addresses they no longer list. False (and
    /// nothing forgotten) when a host is already shared, so cannot be changed in place.
    pub(crate) fn adopt(self: &Arc<Self>, hosts: &mut [Arc<Host>]) -> bool {
        let mut map = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: HashMap<SocketAddr, Arc<HostState>> = HashMap::with_capacity(hosts.len());
        let checked = **self.active_hc.load();
        for h in hosts.iter_mut() {
            let Some(h) = Arc::get_mut(h) else {
                return false;
            };
            let state = next
                .entry(h.address)
                .or_insert_with(|| {
                    map.get(&h.address).cloned().unwrap_or_else(|| {
                        let s = HostState::default();
                        if checked {
                            s.set_flag(flag::FAILED_ACTIVE_HC | flag::PENDING_ACTIVE_HC);
                        }
                        Arc::new(s)
                    })
                })
                .clone();
            h.state = state;
            h.cluster = self.clone();
        }
        // Active checks switched off: their verdicts no longer apply.
        if !checked {
            for s in next.values() {
                s.clear_flag(
                    flag::FAILED_ACTIVE_HC | flag::PENDING_ACTIVE_HC | flag::ACTIVE_HC_TIMEOUT,
                );
            }
        }
        // Outlier detection switched off: ejections end.
        if self.outlier.load().is_none() {
            for s in next.values() {
                s.clear_flag(flag::FAILED_OUTLIER_CHECK);
            }
        }
        *map = next;
        self.host_count.store(map.len() as u64, Ordering::Relaxed);
        let ejected = map
            .values()
            .filter(|s| s.flags() & flag::FAILED_OUTLIER_CHECK != 0)
            .count() as u64;
        drop(map);
        self.set_ejections_active(ejected);
        true
    }

    /// Success-rate average and ejection threshold of the last interval that had enough
    /// hosts with enough requests (`/clusters` `outlier::success_rate_*`).
    pub fn success_rate_summary(&self) -> Option<(f64, f64)> {
        *self
            .success_rate_summary
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Number of hosts currently ejected.
    pub fn ejections_active(&self) -> u64 {
        let m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter(|s| s.flags() & flag::FAILED_OUTLIER_CHECK != 0)
            .count() as u64
    }

    pub(crate) fn set_ejections_active(&self, n: u64) {
        self.stats.outlier_detection.ejections_active.set(n);
    }
}
