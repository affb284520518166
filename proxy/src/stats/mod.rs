//! Counters and gauges with Envoy's stat names (`cluster.<name>.upstream_cx_total`, ...).
//!
//! [`Stats`] is the registry of names that `/stats` lists. Connections and requests never look
//! a name up: they count through handles grouped per resource, resolved when a snapshot is
//! attached to its store and reused by later snapshots while the resource exists:
//! [`ClusterStats`] (`cluster.<name>.*`, held by the snapshot's cluster entry), [`HttpStats`]
//! (`http.<stat_prefix>.*`) and [`VclusterStats`] (`vhost.<vh>.vcluster.<vc>.*`).
//!
//! A handle puts its name in the registry on its first event (one `format!` and one lock in
//! the life of the stat); every later event is an atomic add. So `/stats` lists what was
//! counted, as when names were created on use. Per-status counters (`upstream_rq_503`) are
//! filled the same way, one code at a time, and later found without a lock.
//!
//! A removed cluster's names leave the registry with it ([`Stats::retain_clusters`], called
//! when a snapshot without it is published); a connection still holding its handles keeps
//! counting into them, unlisted, as Envoy does with a removed cluster's stats.
//!
//! Histograms ([`Histogram`], Envoy's default buckets in milliseconds) are registered and
//! recorded the same way. Every listed stat keeps its kind, which [`Stats::samples`] hands to
//! the admin's renderers: [`prometheus`] (Envoy's tag extraction, [`tags`]) and `/stats`.

pub mod histogram;
pub mod istio;
pub mod prometheus;
pub mod tags;

pub use histogram::{Histogram, HistogramSnapshot};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arc_swap::ArcSwap;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge that can go up and down (active connections).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Add one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Remove one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    /// Set to `v`.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A listed stat's value, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A counter's total.
    Counter(u64),
    /// A gauge's current value.
    Gauge(u64),
    /// A histogram's buckets.
    Histogram(HistogramSnapshot),
}

/// One listed stat: its Envoy name and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Full name (`cluster.<name>.upstream_rq_200`).
    pub name: String,
    /// Value, with the stat's kind.
    pub value: Value,
}

/// Envoy's stat prefix of a listener without `stat_prefix`: `listener.<address>` with the
/// address's `:` as `_` (`listener.127.0.0.1_15001`, `listener.[__1]_15001`).
pub fn listener_prefix(addr: std::net::SocketAddr) -> String {
    format!("listener.{}", addr.to_string().replace(':', "_"))
}

// === impl Stats ===

/// The listed names of one process (or one node-mode pipeline).
#[derive(Debug, Default)]
struct Names {
    counters: BTreeMap<String, Arc<Counter>>,
    gauges: BTreeMap<String, Arc<Gauge>>,
    histograms: BTreeMap<String, Arc<Histogram>>,
}

/// Locks `m`, ignoring poisoning: every critical section leaves the maps consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// All counters and gauges of one skiff process: the names `/stats` lists and the handle
/// groups of clusters, HTTP connection managers and virtual clusters.
#[derive(Debug, Default)]
pub struct Stats {
    names: Arc<Mutex<Names>>,
    clusters: Mutex<HashMap<String, Arc<ClusterStats>>>,
    http: Mutex<HashMap<String, Arc<HttpStats>>>,
    vclusters: Mutex<HashMap<String, HashMap<String, Arc<VclusterStats>>>>,
    /// Istio's standard metrics (`istio_*`, rendered unprefixed).
    pub istio: istio::IstioMetrics,
}

impl Stats {
    /// The counter called `name`, created at zero (and listed) if new. For names outside the
    /// handle groups, or read once; events on a hot path use the groups' handles.
    pub fn counter(&self, name: &str) -> Arc<Counter> {
        let mut n = lock(&self.names);
        if let Some(c) = n.counters.get(name) {
            return c.clone();
        }
        n.counters.entry(name.to_string()).or_default().clone()
    }

    /// The gauge called `name`, created at zero (and listed) if new.
    pub fn gauge(&self, name: &str) -> Arc<Gauge> {
        let mut n = lock(&self.names);
        if let Some(g) = n.gauges.get(name) {
            return g.clone();
        }
        n.gauges.entry(name.to_string()).or_default().clone()
    }

    /// The histogram called `name`, created empty (and listed) if new.
    pub fn histogram(&self, name: &str) -> Arc<Histogram> {
        let mut n = lock(&self.names);
        if let Some(h) = n.histograms.get(name) {
            return h.clone();
        }
        n.histograms.entry(name.to_string()).or_default().clone()
    }

    /// Every listed stat with its kind, sorted by name.
    pub fn samples(&self) -> Vec<Sample> {
        let n = lock(&self.names);
        let mut out: Vec<Sample> = n
            .counters
            .iter()
            .map(|(k, v)| (k, Value::Counter(v.get())))
            .chain(n.gauges.iter().map(|(k, v)| (k, Value::Gauge(v.get()))))
            .chain(
                n.histograms
                    .iter()
                    .map(|(k, v)| (k, Value::Histogram(v.snapshot()))),
            )
            .map(|(k, value)| Sample {
                name: k.clone(),
                value,
            })
            .collect();
        drop(n);
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every listed counter and gauge, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let n = lock(&self.names);
        let mut out: Vec<(String, u64)> = n
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), v.get()))
            .chain(n.gauges.iter().map(|(k, v)| (k.clone(), v.get())))
            .collect();
        drop(n);
        out.sort();
        out
    }

    /// The stats of cluster `name` (`cluster.<name>.*`), created if new; the same handles
    /// until [`Stats::retain_clusters`] drops the cluster.
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        let mut m = lock(&self.clusters);
        if let Some(c) = m.get(name) {
            return c.clone();
        }
        let c = Arc::new(ClusterStats::new(
            name,
            Scope::new(format!("cluster.{name}"), &self.names),
        ));
        m.insert(name.to_string(), c.clone());
        c
    }

    /// Drop the stats of every cluster for which `keep` is false: their names leave `/stats`
    /// (Envoy removes a cluster's stats with the cluster). Handles still held keep counting,
    /// unlisted; the cluster's next [`Stats::cluster`] starts from zero.
    pub fn retain_clusters(&self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<Arc<ClusterStats>> = {
            let mut m = lock(&self.clusters);
            let names: Vec<String> = m.keys().filter(|k| !keep(k)).cloned().collect();
            names.iter().filter_map(|k| m.remove(k)).collect()
        };
        for c in gone {
            c.scope.remove();
        }
    }

    /// The stats of the HTTP connection managers with `stat_prefix` (`http.<prefix>.*`).
    pub fn http(&self, stat_prefix: &str) -> Arc<HttpStats> {
        let mut m = lock(&self.http);
        if let Some(h) = m.get(stat_prefix) {
            return h.clone();
        }
        let h = Arc::new(HttpStats::new(Scope::new(
            format!("http.{stat_prefix}"),
            &self.names,
        )));
        m.insert(stat_prefix.to_string(), h.clone());
        h
    }

    /// The stats of virtual cluster `vcluster` of virtual host `vhost`
    /// (`vhost.<vhost>.vcluster.<vcluster>.*`).
    pub fn vcluster(&self, vhost: &str, vcluster: &str) -> Arc<VclusterStats> {
        let mut m = lock(&self.vclusters);
        if let Some(v) = m.get(vhost).and_then(|vcs| vcs.get(vcluster)) {
            return v.clone();
        }
        let v = Arc::new(VclusterStats {
            rq: RqStats::new(&Arc::new(Scope::new(
                format!("vhost.{vhost}.vcluster.{vcluster}"),
                &self.names,
            ))),
        });
        m.entry(vhost.to_string())
            .or_default()
            .insert(vcluster.to_string(), v.clone());
        v
    }
}

// === impl Scope ===

/// The names one resource put in the registry (`cluster.<name>` ...), dropped with it.
#[derive(Debug)]
struct Scope {
    prefix: String,
    names: Arc<Mutex<Names>>,
    /// Changed only under the registry's lock, so a late first event of a removed resource
    /// cannot put its name back.
    state: Mutex<ScopeState>,
}

#[derive(Debug)]
struct ScopeState {
    live: bool,
    /// Names registered through this scope's handles.
    owned: Vec<String>,
    /// Suffixes of the scope's fixed handles: their names go too when the scope is removed,
    /// even if put in the registry by name ([`Stats::counter`]) rather than by the handle.
    suffixes: Vec<&'static str>,
}

impl Scope {
    fn new(prefix: String, names: &Arc<Mutex<Names>>) -> Scope {
        Scope {
            prefix,
            names: names.clone(),
            state: Mutex::new(ScopeState {
                live: true,
                owned: Vec::new(),
                suffixes: Vec::new(),
            }),
        }
    }

    /// `<prefix>.<suffix>` from the registry (created if new), or a private counter once the
    /// scope was removed.
    fn counter(&self, suffix: &str) -> Arc<Counter> {
        let name = format!("{}.{suffix}", self.prefix);
        let mut n = lock(&self.names);
        let mut st = lock(&self.state);
        if !st.live {
            return Arc::default();
        }
        let c = n.counters.entry(name.clone()).or_default().clone();
        st.owned.push(name);
        c
    }

    /// `<prefix>.<suffix>` as a gauge.
    fn gauge(&self, suffix: &str) -> Arc<Gauge> {
        let name = format!("{}.{suffix}", self.prefix);
        let mut n = lock(&self.names);
        let mut st = lock(&self.state);
        if !st.live {
            return Arc::default();
        }
        let g = n.gauges.entry(name.clone()).or_default().clone();
        st.owned.push(name);
        g
    }

    /// `<prefix>.<suffix>` as a histogram.
    fn histogram(&self, suffix: &str) -> Arc<Histogram> {
        let name = format!("{}.{suffix}", self.prefix);
        let mut n = lock(&self.names);
        let mut st = lock(&self.state);
        if !st.live {
            return Arc::default();
        }
        let h = n.histograms.entry(name.clone()).or_default().clone();
        st.owned.push(name);
        h
    }

    /// Note a fixed handle's suffix (see [`ScopeState::suffixes`]).
    fn declare(&self, suffix: &'static str) {
        lock(&self.state).suffixes.push(suffix);
    }

    /// Take every name of this scope out of the registry, for good.
    fn remove(&self) {
        let mut n = lock(&self.names);
        let mut st = lock(&self.state);
        st.live = false;
        let fixed: Vec<String> = st
            .suffixes
            .iter()
            .map(|s| format!("{}.{s}", self.prefix))
            .collect();
        for name in st.owned.drain(..).chain(fixed) {
            n.counters.remove(&name);
            n.gauges.remove(&name);
            n.histograms.remove(&name);
        }
    }
}

// === impl ScopedCounter ===

/// A counter of one resource's group: registered (and listed) on its first event, then an
/// atomic add.
#[derive(Debug)]
pub struct ScopedCounter {
    scope: Arc<Scope>,
    suffix: &'static str,
    cell: OnceLock<Arc<Counter>>,
}

impl ScopedCounter {
    fn new(scope: &Arc<Scope>, suffix: &'static str) -> ScopedCounter {
        scope.declare(suffix);
        ScopedCounter {
            scope: scope.clone(),
            suffix,
            cell: OnceLock::new(),
        }
    }

    fn resolve(&self) -> &Counter {
        self.cell.get_or_init(|| self.scope.counter(self.suffix))
    }

    /// Add one.
    pub fn inc(&self) {
        self.resolve().inc();
    }
    /// Add `n`.
    pub fn add(&self, n: u64) {
        self.resolve().add(n);
    }
    /// Current value (zero before the first event).
    pub fn get(&self) -> u64 {
        self.cell.get().map_or(0, |c| c.get())
    }
    /// List the counter now, at zero if nothing was counted yet.
    pub fn touch(&self) {
        self.resolve();
    }
}

/// A gauge of one resource's group, registered on its first change.
#[derive(Debug)]
pub struct ScopedGauge {
    scope: Arc<Scope>,
    suffix: &'static str,
    cell: OnceLock<Arc<Gauge>>,
}

impl ScopedGauge {
    fn new(scope: &Arc<Scope>, suffix: &'static str) -> ScopedGauge {
        scope.declare(suffix);
        ScopedGauge {
            scope: scope.clone(),
            suffix,
            cell: OnceLock::new(),
        }
    }

    fn resolve(&self) -> &Gauge {
        self.cell.get_or_init(|| self.scope.gauge(self.suffix))
    }

    /// Add one.
    pub fn inc(&self) {
        self.resolve().inc();
    }
    /// Remove one.
    pub fn dec(&self) {
        self.resolve().dec();
    }
    /// Set to `v`.
    pub fn set(&self, v: u64) {
        self.resolve().set(v);
    }
    /// Current value (zero before the first change).
    pub fn get(&self) -> u64 {
        self.cell.get().map_or(0, |g| g.get())
    }
}

/// A histogram of one resource's group, registered on its first value.
#[derive(Debug)]
pub struct ScopedHistogram {
    scope: Arc<Scope>,
    suffix: &'static str,
    cell: OnceLock<Arc<Histogram>>,
}

impl ScopedHistogram {
    fn new(scope: &Arc<Scope>, suffix: &'static str) -> ScopedHistogram {
        scope.declare(suffix);
        ScopedHistogram {
            scope: scope.clone(),
            suffix,
            cell: OnceLock::new(),
        }
    }

    fn resolve(&self) -> &Histogram {
        self.cell.get_or_init(|| self.scope.histogram(self.suffix))
    }

    /// Record `ms` milliseconds.
    pub fn record(&self, ms: u64) {
        self.resolve().record(ms);
    }

    /// Record a duration (whole milliseconds, as Envoy's timers).
    pub fn record_duration(&self, d: std::time::Duration) {
        self.resolve().record_duration(d);
    }

    /// Await `fut` and record how long it took if it succeeded (Envoy records connect and
    /// request times only for successes).
    ///
    /// A plain future, not an `async fn`: one holding `fut` as its argument and awaiting it
    /// would keep it twice, and a connect's state sits in every connection's task.
    pub fn time_ok<T, E, F: std::future::Future<Output = Result<T, E>>>(
        &self,
        fut: F,
    ) -> TimedOk<'_, F> {
        TimedOk {
            fut,
            hist: self,
            start: tokio::time::Instant::now(),
        }
    }

    /// The values so far (empty before the first).
    pub fn snapshot(&self) -> HistogramSnapshot {
        self.cell
            .get()
            .map_or_else(|| Histogram::default().snapshot(), |h| h.snapshot())
    }
}

pin_project_lite::pin_project! {
    /// A future whose time to success goes to a histogram ([`ScopedHistogram::time_ok`]).
    pub struct TimedOk<'h, F> {
        #[pin]
        fut: F,
        hist: &'h ScopedHistogram,
        start: tokio::time::Instant,
    }
}

impl<T, E, F: std::future::Future<Output = Result<T, E>>> std::future::Future for TimedOk<'_, F> {
    type Output = Result<T, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.fut.poll(cx));
        if out.is_ok() {
            this.hist.record_duration(this.start.elapsed());
        }
        std::task::Poll::Ready(out)
    }
}

// === impl ByCode ===

/// Counters keyed by a status code or class (`upstream_rq_503`, `downstream_rq_5xx`): each
/// key's counter is registered on its first event; later events find it in a sorted array
/// read without a lock.
#[derive(Debug)]
struct ByCode {
    scope: Arc<Scope>,
    /// Name around the key: `<pre><key><post>`.
    pre: &'static str,
    post: &'static str,
    slots: ArcSwap<Vec<(u16, Arc<Counter>)>>,
    fill: Mutex<()>,
}

impl ByCode {
    fn new(scope: &Arc<Scope>, pre: &'static str, post: &'static str) -> ByCode {
        ByCode {
            scope: scope.clone(),
            pre,
            post,
            slots: ArcSwap::from_pointee(Vec::new()),
            fill: Mutex::new(()),
        }
    }

    fn find(slots: &[(u16, Arc<Counter>)], key: u16) -> Option<&Arc<Counter>> {
        slots
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
            .map(|i| &slots[i].1)
    }

    fn inc(&self, key: u16) {
        if let Some(c) = Self::find(&self.slots.load(), key) {
            c.inc();
            return;
        }
        let _g = lock(&self.fill);
        let cur = self.slots.load_full();
        if let Some(c) = Self::find(&cur, key) {
            c.inc();
            return;
        }
        let c = self
            .scope
            .counter(&format!("{}{key}{}", self.pre, self.post));
        c.inc();
        let mut next = Vec::clone(&cur);
        let at = next.partition_point(|(k, _)| *k < key);
        next.insert(at, (key, c));
        self.slots.store(Arc::new(next));
    }

    fn get(&self, key: u16) -> u64 {
        Self::find(&self.slots.load(), key).map_or(0, |c| c.get())
    }
}

// === impl RqStats ===

/// The `upstream_rq_*` stats a forwarded request counts in its cluster and, when its virtual
/// host has virtual clusters, in its virtual cluster.
#[derive(Debug)]
pub struct RqStats {
    /// `upstream_rq_total`: attempts sent.
    pub upstream_rq_total: ScopedCounter,
    /// `upstream_rq_timeout`: requests that ran out of the route timeout.
    pub upstream_rq_timeout: ScopedCounter,
    /// `upstream_rq_retry`: retries sent.
    pub upstream_rq_retry: ScopedCounter,
    /// `upstream_rq_retry_success`: requests a retry answered.
    pub upstream_rq_retry_success: ScopedCounter,
    codes: ByCode,
    classes: ByCode,
}

impl RqStats {
    fn new(scope: &Arc<Scope>) -> RqStats {
        RqStats {
            upstream_rq_total: ScopedCounter::new(scope, "upstream_rq_total"),
            upstream_rq_timeout: ScopedCounter::new(scope, "upstream_rq_timeout"),
            upstream_rq_retry: ScopedCounter::new(scope, "upstream_rq_retry"),
            upstream_rq_retry_success: ScopedCounter::new(scope, "upstream_rq_retry_success"),
            codes: ByCode::new(scope, "upstream_rq_", ""),
            classes: ByCode::new(scope, "upstream_rq_", "xx"),
        }
    }

    /// Count a response with `status`: `upstream_rq_<status>` and `upstream_rq_<class>xx`.
    pub fn status(&self, status: u16) {
        self.codes.inc(status);
        self.classes.inc(status / 100);
    }

    /// `upstream_rq_<status>` so far.
    pub fn status_count(&self, status: u16) -> u64 {
        self.codes.get(status)
    }
}

// === impl ClusterStats ===

/// `cluster.<name>.health_check.*`.
#[derive(Debug)]
pub struct HealthCheckStats {
    /// `attempt`.
    pub attempt: ScopedCounter,
    /// `success`.
    pub success: ScopedCounter,
    /// `failure`.
    pub failure: ScopedCounter,
    /// `network_failure` (timeouts).
    pub network_failure: ScopedCounter,
    /// `healthy`: hosts passing active checks.
    pub healthy: ScopedGauge,
}

/// `cluster.<name>.outlier_detection.*`.
#[derive(Debug)]
pub struct OutlierStats {
    /// `ejections_active`.
    pub ejections_active: ScopedGauge,
    /// `ejections_overflow`: ejections refused by `max_ejection_percent`.
    pub ejections_overflow: ScopedCounter,
    /// `ejections_total` (deprecated in Envoy; consecutive 5xx and success rate only).
    pub ejections_total: ScopedCounter,
    /// `ejections_enforced_total`.
    pub ejections_enforced_total: ScopedCounter,
    /// `ejections_detected_consecutive_5xx`.
    pub ejections_detected_consecutive_5xx: ScopedCounter,
    /// `ejections_detected_consecutive_gateway_failure`.
    pub ejections_detected_consecutive_gateway_failure: ScopedCounter,
    /// `ejections_detected_consecutive_local_origin_failure`.
    pub ejections_detected_consecutive_local_origin_failure: ScopedCounter,
    /// `ejections_detected_success_rate`.
    pub ejections_detected_success_rate: ScopedCounter,
    /// `ejections_detected_failure_percentage`.
    pub ejections_detected_failure_percentage: ScopedCounter,
    /// `ejections_enforced_consecutive_5xx`.
    pub ejections_enforced_consecutive_5xx: ScopedCounter,
    /// `ejections_enforced_consecutive_gateway_failure`.
    pub ejections_enforced_consecutive_gateway_failure: ScopedCounter,
    /// `ejections_enforced_consecutive_local_origin_failure`.
    pub ejections_enforced_consecutive_local_origin_failure: ScopedCounter,
    /// `ejections_enforced_success_rate`.
    pub ejections_enforced_success_rate: ScopedCounter,
    /// `ejections_enforced_failure_percentage`.
    pub ejections_enforced_failure_percentage: ScopedCounter,
}

/// `cluster.<name>.*`: the stats of one cluster, kept (with their values) while the cluster
/// exists, across snapshots. Held by the snapshot's cluster entry as `entry.stats`.
#[derive(Debug)]
pub struct ClusterStats {
    name: String,
    scope: Arc<Scope>,
    /// `upstream_cx_total`: upstream connections opened.
    pub upstream_cx_total: ScopedCounter,
    /// `upstream_cx_active`: upstream connections open (tcp_proxy).
    pub upstream_cx_active: ScopedGauge,
    /// `upstream_cx_connect_fail`.
    pub upstream_cx_connect_fail: ScopedCounter,
    /// `upstream_cx_connect_ms`: time to connect upstream (histogram).
    pub upstream_cx_connect_ms: ScopedHistogram,
    /// `upstream_rq_time`: time from request sent to response headers (histogram).
    pub upstream_rq_time: ScopedHistogram,
    /// `upstream_cx_connect_timeout`.
    pub upstream_cx_connect_timeout: ScopedCounter,
    /// `upstream_cx_none_healthy`: no host to connect to.
    pub upstream_cx_none_healthy: ScopedCounter,
    /// `upstream_cx_overflow`: `max_connections` reached.
    pub upstream_cx_overflow: ScopedCounter,
    /// `upstream_cx_tx_bytes_total`.
    pub upstream_cx_tx_bytes_total: ScopedCounter,
    /// `upstream_cx_rx_bytes_total`.
    pub upstream_cx_rx_bytes_total: ScopedCounter,
    /// `upstream_cx_connect_attempts_exceeded`: tcp_proxy's `max_connect_attempts` used up.
    pub upstream_cx_connect_attempts_exceeded: ScopedCounter,
    /// `upstream_cx_idle_timeout`: pooled connections closed after the idle timeout.
    pub upstream_cx_idle_timeout: ScopedCounter,
    /// `upstream_cx_max_requests`: connections closed at `max_requests_per_connection`.
    pub upstream_cx_max_requests: ScopedCounter,
    /// `upstream_cx_max_duration_reached`: connections closed at `max_connection_duration`.
    pub upstream_cx_max_duration_reached: ScopedCounter,
    /// `upstream_rq_total`, `_timeout`, `_retry`, `_retry_success`, `_<code>`, `_<class>xx`.
    pub rq: RqStats,
    /// `upstream_rq_per_try_timeout`.
    pub upstream_rq_per_try_timeout: ScopedCounter,
    /// `upstream_rq_pending_overflow`: `max_pending_requests` or `max_requests` reached.
    pub upstream_rq_pending_overflow: ScopedCounter,
    /// `upstream_rq_retry_overflow`: `max_retries` (or the retry budget) reached.
    pub upstream_rq_retry_overflow: ScopedCounter,
    /// `retry_or_shadow_abandoned`: a retry the replay buffer could not serve.
    pub retry_or_shadow_abandoned: ScopedCounter,
    /// `lb_healthy_panic`: picks made in panic mode (listed from the cluster's creation on).
    pub lb_healthy_panic: ScopedCounter,
    /// `update_attempt`: EDS pushes for this cluster (counted by name in `xds`; declared here
    /// so the name leaves with the cluster, as in Envoy).
    pub update_attempt: ScopedCounter,
    /// `update_success`: EDS pushes accepted.
    pub update_success: ScopedCounter,
    /// `update_rejected`: EDS pushes rejected.
    pub update_rejected: ScopedCounter,
    /// `health_check.*`.
    pub health_check: HealthCheckStats,
    /// `outlier_detection.*`.
    pub outlier_detection: OutlierStats,
}

impl ClusterStats {
    fn new(name: &str, scope: Scope) -> ClusterStats {
        let s = Arc::new(scope);
        let c = |suffix| ScopedCounter::new(&s, suffix);
        let stats = ClusterStats {
            name: name.to_string(),
            upstream_cx_total: c("upstream_cx_total"),
            upstream_cx_active: ScopedGauge::new(&s, "upstream_cx_active"),
            upstream_cx_connect_fail: c("upstream_cx_connect_fail"),
            upstream_cx_connect_ms: ScopedHistogram::new(&s, "upstream_cx_connect_ms"),
            upstream_rq_time: ScopedHistogram::new(&s, "upstream_rq_time"),
            upstream_cx_connect_timeout: c("upstream_cx_connect_timeout"),
            upstream_cx_none_healthy: c("upstream_cx_none_healthy"),
            upstream_cx_overflow: c("upstream_cx_overflow"),
            upstream_cx_tx_bytes_total: c("upstream_cx_tx_bytes_total"),
            upstream_cx_rx_bytes_total: c("upstream_cx_rx_bytes_total"),
            upstream_cx_connect_attempts_exceeded: c("upstream_cx_connect_attempts_exceeded"),
            upstream_cx_idle_timeout: c("upstream_cx_idle_timeout"),
            upstream_cx_max_requests: c("upstream_cx_max_requests"),
            upstream_cx_max_duration_reached: c("upstream_cx_max_duration_reached"),
            rq: RqStats::new(&s),
            upstream_rq_per_try_timeout: c("upstream_rq_per_try_timeout"),
            upstream_rq_pending_overflow: c("upstream_rq_pending_overflow"),
            upstream_rq_retry_overflow: c("upstream_rq_retry_overflow"),
            retry_or_shadow_abandoned: c("retry_or_shadow_abandoned"),
            lb_healthy_panic: c("lb_healthy_panic"),
            update_attempt: c("update_attempt"),
            update_success: c("update_success"),
            update_rejected: c("update_rejected"),
            health_check: HealthCheckStats {
                attempt: c("health_check.attempt"),
                success: c("health_check.success"),
                failure: c("health_check.failure"),
                network_failure: c("health_check.network_failure"),
                healthy: ScopedGauge::new(&s, "health_check.healthy"),
            },
            outlier_detection: OutlierStats {
                ejections_active: ScopedGauge::new(&s, "outlier_detection.ejections_active"),
                ejections_overflow: c("outlier_detection.ejections_overflow"),
                ejections_total: c("outlier_detection.ejections_total"),
                ejections_enforced_total: c("outlier_detection.ejections_enforced_total"),
                ejections_detected_consecutive_5xx: c(
                    "outlier_detection.ejections_detected_consecutive_5xx",
                ),
                ejections_detected_consecutive_gateway_failure: c(
                    "outlier_detection.ejections_detected_consecutive_gateway_failure",
                ),
                ejections_detected_consecutive_local_origin_failure: c(
                    "outlier_detection.ejections_detected_consecutive_local_origin_failure",
                ),
                ejections_detected_success_rate: c(
                    "outlier_detection.ejections_detected_success_rate",
                ),
                ejections_detected_failure_percentage: c(
                    "outlier_detection.ejections_detected_failure_percentage",
                ),
                ejections_enforced_consecutive_5xx: c(
                    "outlier_detection.ejections_enforced_consecutive_5xx",
                ),
                ejections_enforced_consecutive_gateway_failure: c(
                    "outlier_detection.ejections_enforced_consecutive_gateway_failure",
                ),
                ejections_enforced_consecutive_local_origin_failure: c(
                    "outlier_detection.ejections_enforced_consecutive_local_origin_failure",
                ),
                ejections_enforced_success_rate: c(
                    "outlier_detection.ejections_enforced_success_rate",
                ),
                ejections_enforced_failure_percentage: c(
                    "outlier_detection.ejections_enforced_failure_percentage",
                ),
            },
            scope: s.clone(),
        };
        // Envoy lists a cluster's panic counter from the start; skiff always has.
        stats.lb_healthy_panic.touch();
        stats
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

// === impl HttpStats ===

/// `http.<stat_prefix>.*`: the stats of the HTTP connection managers sharing a stat prefix.
#[derive(Debug)]
pub struct HttpStats {
    /// `downstream_rq_total`.
    pub downstream_rq_total: ScopedCounter,
    /// `downstream_rq_completed`.
    pub downstream_rq_completed: ScopedCounter,
    /// `rq_direct_response`.
    pub rq_direct_response: ScopedCounter,
    /// `rq_redirect`.
    pub rq_redirect: ScopedCounter,
    /// `no_route` (404 NR).
    pub no_route: ScopedCounter,
    /// `no_cluster` (503 NC).
    pub no_cluster: ScopedCounter,
    /// `downstream_rq_ws_on_non_ws_route` (403).
    pub downstream_rq_ws_on_non_ws_route: ScopedCounter,
    /// `downstream_cx_upgrades_total`.
    pub downstream_cx_upgrades_total: ScopedCounter,
    /// `downstream_rq_idle_timeout`: streams ended by `stream_idle_timeout` (or a route's
    /// `idle_timeout`).
    pub downstream_rq_idle_timeout: ScopedCounter,
    /// `downstream_rq_timeout`: requests ended by `request_timeout`.
    pub downstream_rq_timeout: ScopedCounter,
    /// `downstream_rq_header_timeout`: connections closed by `request_headers_timeout`.
    pub downstream_rq_header_timeout: ScopedCounter,
    /// `downstream_cx_idle_timeout`: connections closed by the HCM's `idle_timeout`.
    pub downstream_cx_idle_timeout: ScopedCounter,
    /// `downstream_cx_max_duration_reached`: connections drained at `max_connection_duration`.
    pub downstream_cx_max_duration_reached: ScopedCounter,
    /// `downstream_cx_max_requests_reached`: connections drained at
    /// `max_requests_per_connection`.
    pub downstream_cx_max_requests_reached: ScopedCounter,
    /// `downstream_cx_drain_close`: connections drained because the listener is draining.
    pub downstream_cx_drain_close: ScopedCounter,
    /// `downstream_rq_time`: time from request start to the response's end (histogram).
    pub downstream_rq_time: ScopedHistogram,
    classes: ByCode,
}

impl HttpStats {
    fn new(scope: Scope) -> HttpStats {
        let s = Arc::new(scope);
        let c = |suffix| ScopedCounter::new(&s, suffix);
        HttpStats {
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_completed: c("downstream_rq_completed"),
            rq_direct_response: c("rq_direct_response"),
            rq_redirect: c("rq_redirect"),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            downstream_rq_ws_on_non_ws_route: c("downstream_rq_ws_on_non_ws_route"),
            downstream_cx_upgrades_total: c("downstream_cx_upgrades_total"),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_header_timeout: c("downstream_rq_header_timeout"),
            downstream_cx_idle_timeout: c("downstream_cx_idle_timeout"),
            downstream_cx_max_duration_reached: c("downstream_cx_max_duration_reached"),
            downstream_cx_max_requests_reached: c("downstream_cx_max_requests_reached"),
            downstream_cx_drain_close: c("downstream_cx_drain_close"),
            downstream_rq_time: ScopedHistogram::new(&s, "downstream_rq_time"),
            classes: ByCode::new(&s, "downstream_rq_", "xx"),
        }
    }

    /// Count a response with `status` in `downstream_rq_<class>xx`.
    pub fn status(&self, status: u16) {
        self.classes.inc(status / 100);
    }
}

/// `vhost.<vh>.vcluster.<vc>.*`: the request stats of one virtual cluster.
#[derive(Debug)]
pub struct VclusterStats {
    /// `upstream_rq_*`.
    pub rq: RqStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(stats: &Stats, name: &str) -> Option<u64> {
        stats
            .snapshot()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    #[test]
    fn handles_are_listed_on_first_event_under_their_envoy_names() {
        let stats = Stats::default();
        let c = stats.cluster("outbound|80||a.b.svc");
        // Created with the cluster, as in Envoy.
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.lb_healthy_panic"),
            Some(0)
        );
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.upstream_cx_total"),
            None
        );
        c.upstream_cx_total.inc();
        c.upstream_cx_total.inc();
        c.upstream_cx_active.inc();
        c.upstream_cx_active.dec();
        c.rq.status(503);
        c.rq.status(503);
        c.rq.status(200);
        c.health_check.healthy.set(3);
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.upstream_cx_total"),
            Some(2)
        );
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.upstream_cx_active"),
            Some(0)
        );
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.upstream_rq_503"),
            Some(2)
        );
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.upstream_rq_5xx"),
            Some(2)
        );
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.upstream_rq_2xx"),
            Some(1)
        );
        assert_eq!(
            value(&stats, "cluster.outbound|80||a.b.svc.health_check.healthy"),
            Some(3)
        );
        assert_eq!(c.rq.status_count(503), 2);
        // A lookup by name reaches the same counter as the handle.
        assert_eq!(
            stats
                .counter("cluster.outbound|80||a.b.svc.upstream_cx_total")
                .get(),
            2
        );
        // The same cluster gets the same handles.
        assert!(Arc::ptr_eq(&c, &stats.cluster("outbound|80||a.b.svc")));
    }

    #[test]
    fn a_counter_created_by_name_first_is_the_handle_s_counter() {
        let stats = Stats::default();
        stats.counter("cluster.c.upstream_cx_total").add(5);
        let c = stats.cluster("c");
        c.upstream_cx_total.inc();
        assert_eq!(c.upstream_cx_total.get(), 6);
        assert_eq!(value(&stats, "cluster.c.upstream_cx_total"), Some(6));
    }

    #[test]
    fn removed_clusters_leave_the_registry_and_never_come_back_through_old_handles() {
        let stats = Stats::default();
        let a = stats.cluster("a");
        let ab = stats.cluster("a.b");
        a.upstream_cx_total.inc();
        a.rq.status(200);
        // Counted by name only (not through the handle): still `a`'s, still removed.
        stats
            .counter("cluster.a.upstream_cx_rx_bytes_total")
            .add(10);
        ab.upstream_cx_total.inc();
        stats.http("ingress").downstream_rq_total.inc();
        stats.retain_clusters(|n| n == "a.b");
        let names: Vec<String> = stats.snapshot().into_iter().map(|(k, _)| k).collect();
        // Only `a`'s names went, not those of `a.b` (whose names start with `cluster.a.`).
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("cluster.a.") && !n.starts_with("cluster.a.b.")),
            "{names:?}"
        );
        assert!(names.contains(&"cluster.a.b.upstream_cx_total".to_string()));
        assert!(names.contains(&"http.ingress.downstream_rq_total".to_string()));
        // An in-flight connection keeps counting, unlisted, with first events too.
        a.upstream_cx_total.inc();
        a.upstream_cx_connect_fail.inc();
        a.rq.status(503);
        assert_eq!(a.upstream_cx_total.get(), 2);
        assert!(
            !stats
                .snapshot()
                .iter()
                .any(|(k, _)| k.starts_with("cluster.a.u"))
        );
        // A cluster of that name added again starts from zero.
        let again = stats.cluster("a");
        assert!(!Arc::ptr_eq(&a, &again));
        again.upstream_cx_total.inc();
        assert_eq!(value(&stats, "cluster.a.upstream_cx_total"), Some(1));
    }

    #[test]
    fn http_and_vcluster_stats_keep_their_names() {
        let stats = Stats::default();
        let h = stats.http("ingress");
        h.downstream_rq_total.inc();
        h.status(404);
        h.no_route.inc();
        let v = stats.vcluster("vh", "other");
        v.rq.upstream_rq_total.inc();
        v.rq.status(504);
        assert!(Arc::ptr_eq(&v, &stats.vcluster("vh", "other")));
        assert!(Arc::ptr_eq(&h, &stats.http("ingress")));
        let got: Vec<(String, u64)> = stats.snapshot();
        let want: Vec<(String, u64)> = [
            ("http.ingress.downstream_rq_4xx", 1),
            ("http.ingress.downstream_rq_total", 1),
            ("http.ingress.no_route", 1),
            ("vhost.vh.vcluster.other.upstream_rq_504", 1),
            ("vhost.vh.vcluster.other.upstream_rq_5xx", 1),
            ("vhost.vh.vcluster.other.upstream_rq_total", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn histograms_are_listed_with_their_kind_and_leave_with_their_cluster() {
        let stats = Stats::default();
        let c = stats.cluster("c");
        assert!(
            !stats
                .samples()
                .iter()
                .any(|s| s.name.ends_with("upstream_rq_time"))
        );
        c.upstream_rq_time.record(7);
        c.upstream_cx_connect_ms.record(0);
        stats.http("p").downstream_rq_time.record(12);
        stats
            .histogram("listener.127.0.0.1_80.downstream_cx_length_ms")
            .record(1);
        let kinds: Vec<(String, &str)> = stats
            .samples()
            .into_iter()
            .map(|s| {
                let k = match s.value {
                    Value::Counter(_) => "counter",
                    Value::Gauge(_) => "gauge",
                    Value::Histogram(h) => {
                        assert_eq!(h.count(), 1, "{}", s.name);
                        "histogram"
                    }
                };
                (s.name, k)
            })
            .collect();
        for h in [
            "cluster.c.upstream_cx_connect_ms",
            "cluster.c.upstream_rq_time",
            "http.p.downstream_rq_time",
            "listener.127.0.0.1_80.downstream_cx_length_ms",
        ] {
            assert!(kinds.contains(&(h.to_string(), "histogram")), "{kinds:?}");
        }
        assert!(kinds.contains(&("cluster.c.lb_healthy_panic".to_string(), "counter")));
        stats.retain_clusters(|_| false);
        assert!(
            !stats
                .samples()
                .iter()
                .any(|s| s.name.starts_with("cluster.c."))
        );
        // A connection still holding the handle records, unlisted.
        c.upstream_rq_time.record(3);
        assert_eq!(c.upstream_rq_time.snapshot().count(), 2);
    }

    #[test]
    fn listener_prefixes_are_envoy_s() {
        let v4: std::net::SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let v6: std::net::SocketAddr = "[::1]:15001".parse().unwrap();
        assert_eq!(listener_prefix(v4), "listener.127.0.0.1_15001");
        assert_eq!(listener_prefix(v6), "listener.[__1]_15001");
    }
}
