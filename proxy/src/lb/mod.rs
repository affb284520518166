//! Load balancing with Envoy's semantics: priorities and localities, health (EDS, active
//! checks, outlier ejection), the policies (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH,
//! MAGLEV, skiff's PeakEWMA) and circuit breakers.
//!
//! Layout:
//! - [`priority`]: pure priority-load, panic, locality-weight and zone-aware arithmetic (the BPF
//!   projection calls it too).
//! - [`plan`]: the pure host-set plan of one cluster (which hosts each priority/availability
//!   balances over) and [`eligible`], the share each host gets.
//! - [`host`]: [`Host`] (snapshot facts + live [`host::HostState`]), request/connection guards.
//! - [`registry`]: [`HostRegistry`], host state kept across snapshots by cluster + address.
//! - [`outlier`], [`circuit`]: outlier detection and circuit breakers.
//! - [`edf`], [`ring`], [`maglev`]: the schedulers and consistent-hash tables.
//!
//! Entry point: [`choose`] over the [`ClusterLb`] of a cluster entry of the current snapshot.
//! A `ClusterLb` carries what picking needs of its cluster (policy and settings, copied when
//! it is built), so this module does not depend on the snapshot that holds it.

pub mod circuit;
pub mod edf;
pub mod host;
pub mod maglev;
pub mod outlier;
pub mod plan;
pub mod priority;
pub mod registry;
pub mod ring;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwapOption;
use tokio::time::Instant;

use crate::model::LbPolicy;
use crate::model::cluster::lb::{
    CommonLbConfig, LbSettings, LeastRequestConfig, MaglevConfig, RingHashConfig,
};

pub use circuit::{BreakerGuard, Overflow, Resource, RoutingPriority};
pub use host::{ClusterShared, ConnectionGuard, Host, Outcome, RequestGuard};
pub use plan::{EligibleHost, HostView, Plan, eligible};
pub use registry::HostRegistry;

/// What a caller knows about one pick.
#[derive(Debug, Clone, Copy)]
pub struct LbRequest<'a> {
    /// Hash for RING_HASH / MAGLEV (route hash policy, or the source IP for L4); `None` picks
    /// at random as Envoy does.
    pub hash: Option<u64>,
    /// Hosts to avoid if possible (`retry_host_predicate: previous_hosts`).
    pub exclude: &'a [SocketAddr],
    /// Extra picks allowed when the picked host is excluded
    /// (`host_selection_retry_max_attempts`); the last pick is used anyway.
    pub max_attempts: u32,
}

impl Default for LbRequest<'_> {
    fn default() -> Self {
        LbRequest {
            hash: None,
            exclude: &[],
            max_attempts: 1,
        }
    }
}

/// xxHash64 with seed 0, the hash Envoy uses for hash policies and ring entries.
pub fn hash_bytes(b: &[u8]) -> u64 {
    xxhash_rust::xxh64::xxh64(b, 0)
}

/// Envoy's `hash_policy: source_ip` hash: xxHash64 of the address text (`10.0.0.1`).
pub fn source_ip_hash(ip: IpAddr) -> u64 {
    hash_bytes(ip.to_string().as_bytes())
}

/// Whether `policy` uses a request hash (so callers compute one only then).
pub fn uses_hash(policy: LbPolicy) -> bool {
    matches!(policy, LbPolicy::RingHash | LbPolicy::Maglev)
}

/// Pick a host of the cluster balanced by `lb` (`entry.lb`) for one request or connection.
/// `None` when the cluster has no host that may be used (no healthy host and panic mode off,
/// or no hosts at all).
pub fn choose(lb: &ClusterLb, req: &LbRequest<'_>) -> Option<Arc<Host>> {
    if lb.hosts.is_empty() {
        return None;
    }
    let prepared = lb.prepared();
    let mut last = None;
    for attempt in 0..=req.max_attempts {
        let h = prepared.pick(lb, req.hash, attempt)?;
        let host = &lb.hosts[h as usize];
        if !req.exclude.contains(&host.address) {
            host.state.used.store(true, Ordering::Relaxed);
            return Some(host.clone());
        }
        last = Some(host.clone());
    }
    last
}

/// Weighted pick for `weighted_clusters`: `cursor` walks the total weight round-robin, so
/// shares are exact over each cycle of `sum(weights)` connections.
pub fn pick_weighted<'a>(choices: &'a [(String, u32)], cursor: &AtomicUsize) -> Option<&'a str> {
    let total: u64 = choices.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut at = (cursor.fetch_add(1, Ordering::Relaxed) as u64) % total;
    for (name, w) in choices {
        let w = u64::from(*w);
        if at < w {
            return Some(name);
        }
        at -= w;
    }
    None
}

/// Next round-robin index below `n`, or `None` when `n` is 0.
pub fn next_index(cursor: &AtomicUsize, n: usize) -> Option<usize> {
    (n > 0).then(|| cursor.fetch_add(1, Ordering::Relaxed) % n)
}

// === impl ClusterLb ===

/// What picking reads of a cluster's configuration, copied into its balancer.
#[derive(Debug, Clone)]
struct Policy {
    kind: LbPolicy,
    least_request: LeastRequestConfig,
    ring_hash: RingHashConfig,
    maglev: MaglevConfig,
    common: CommonLbConfig,
    /// The assignment's `overprovisioning_factor`.
    overprovisioning_factor: u32,
}

/// The balancer of one cluster entry: its hosts (this snapshot's facts, live state shared
/// through the registry) and host sets rebuilt whenever the cluster's health generation moves.
#[derive(Debug)]
pub struct ClusterLb {
    /// Hosts in assignment order (internal endpoints left out).
    pub hosts: Vec<Arc<Host>>,
    /// State shared with the cluster's entries in other snapshots.
    pub shared: Arc<ClusterShared>,
    by_addr: HashMap<SocketAddr, u32>,
    local_locality: Option<crate::model::endpoint::Locality>,
    local_hosts: Arc<Vec<(crate::model::endpoint::Locality, u64)>>,
    policy: Policy,
    prepared: ArcSwapOption<Prepared>,
    rebuild: Mutex<()>,
}

impl ClusterLb {
    /// The balancer of cluster `name` over `assignment` with `policy` and `settings`, attached
    /// to `registry`.
    pub fn new(
        name: &str,
        policy: LbPolicy,
        settings: &LbSettings,
        assignment: Option<&crate::model::LoadAssignment>,
        registry: &HostRegistry,
    ) -> ClusterLb {
        let policy_of = Policy {
            kind: policy,
            least_request: settings.least_request.clone(),
            ring_hash: settings.ring_hash,
            maglev: settings.maglev,
            common: settings.common.clone(),
            overprovisioning_factor: assignment
                .map(|a| a.overprovisioning_factor)
                .unwrap_or(crate::model::endpoint::DEFAULT_OVERPROVISIONING_FACTOR),
        };
        let shared = registry.cluster(name, settings);
        let hosts = shared.hosts_for(assignment);
        let by_addr = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.address, i as u32))
            .collect();
        ClusterLb {
            hosts,
            shared,
            by_addr,
            local_locality: registry.local_locality(),
            local_hosts: registry.local_hosts(),
            policy: policy_of,
            prepared: ArcSwapOption::empty(),
            rebuild: Mutex::new(()),
        }
    }

    /// The balancing policy.
    pub fn policy(&self) -> LbPolicy {
        self.policy.kind
    }

    /// Re-attach these hosts to `registry` in place (the entry is not shared yet); false when
    /// that is not possible and the entry must be rebuilt.
    pub fn rebind(&mut self, name: &str, settings: &LbSettings, registry: &HostRegistry) -> bool {
        let shared = registry.cluster(name, settings);
        if !shared.adopt(&mut self.hosts) {
            return false;
        }
        self.shared = shared;
        self.local_locality = registry.local_locality();
        self.local_hosts = registry.local_hosts();
        self.prepared = ArcSwapOption::empty();
        true
    }

    /// The host at `addr`, if this cluster has it.
    pub fn host(&self, addr: SocketAddr) -> Option<&Arc<Host>> {
        self.by_addr.get(&addr).map(|i| &self.hosts[*i as usize])
    }

    /// Views of the hosts as they are now (pure input of [`plan::plan`]).
    pub fn views(&self) -> (Vec<HostView>, Vec<crate::model::endpoint::Locality>) {
        plan::views(&self.hosts)
    }

    fn prepared(&self) -> Arc<Prepared> {
        let gen_now = self.shared.generation();
        if let Some(p) = self.prepared.load_full()
            && p.generation == gen_now
        {
            return p;
        }
        let _g = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = self.prepared.load_full()
            && p.generation == gen_now
        {
            return p;
        }
        let p = Arc::new(Prepared::new(self, gen_now));
        self.prepared.store(Some(p.clone()));
        p
    }

    /// The plan balancing currently follows (rebuilt when health changed).
    pub fn plan(&self) -> Plan {
        self.prepared().plan.clone()
    }
}

// === impl Prepared ===

/// Per-health-generation balancing state: the plan plus one picker per host set.
#[derive(Debug)]
struct Prepared {
    generation: u64,
    plan: Plan,
    /// Per level: healthy, degraded, all.
    levels: Vec<[Picker; 3]>,
    /// Per level: locality pickers for healthy and degraded (locality weighted), and the
    /// per-locality host pickers of each.
    localities: Vec<[Option<LocalityPicker>; 2]>,
    /// Level 0 zone-aware per-locality pickers (local first), when zone routing applies.
    zone: Option<Vec<Picker>>,
}

#[derive(Debug)]
struct LocalityPicker {
    edf: Mutex<edf::Edf>,
    weights: Vec<f64>,
    sets: Vec<Picker>,
}

/// One host set and the state each policy keeps for it.
#[derive(Debug)]
struct Picker {
    idx: Vec<u32>,
    equal_weights: bool,
    rr: AtomicU64,
    edf: Mutex<Option<edf::Edf>>,
    ring: OnceLock<ring::Ring>,
    maglev: OnceLock<Vec<u32>>,
}

impl Picker {
    fn new(idx: Vec<u32>, hosts: &[Arc<Host>]) -> Picker {
        let equal_weights = idx
            .windows(2)
            .all(|w| hosts[w[0] as usize].weight == hosts[w[1] as usize].weight);
        // Envoy starts each round robin at a random offset so proxies do not move in step.
        let start = if idx.is_empty() {
            0
        } else {
            fastrand::u64(..) % idx.len() as u64
        };
        Picker {
            idx,
            equal_weights,
            rr: AtomicU64::new(start),
            edf: Mutex::new(None),
            ring: OnceLock::new(),
            maglev: OnceLock::new(),
        }
    }

    fn pick(&self, lb: &ClusterLb, hash: Option<u64>, attempt: u32) -> Option<u32> {
        if self.idx.is_empty() {
            return None;
        }
        let hosts = &lb.hosts;
        let cfg = &lb.policy;
        let n = self.idx.len();
        let local = match cfg.kind {
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided => {
                if self.equal_weights {
                    (self.rr.fetch_add(1, Ordering::Relaxed) % n as u64) as usize
                } else {
                    let mut g = self.edf.lock().unwrap_or_else(|e| e.into_inner());
                    let e = g.get_or_insert_with(|| {
                        edf::Edf::new(
                            self.idx
                                .iter()
                                .enumerate()
                                .map(|(i, h)| (i as u32, f64::from(hosts[*h as usize].weight))),
                        )
                    });
                    e.pick(|i| f64::from(hosts[self.idx[i as usize] as usize].weight))? as usize
                }
            }
            LbPolicy::LeastRequest => {
                let active = |i: usize| hosts[self.idx[i] as usize].state.active_requests();
                if self.equal_weights {
                    // Power of `choice_count` choices: the least loaded of a few random hosts.
                    let mut best = fastrand::usize(..n);
                    let choices = usize::try_from(cfg.least_request.choice_count).unwrap_or(n);
                    if choices >= n {
                        // As many choices as hosts: a full scan from a random start (Envoy's
                        // rule too), never `choice_count` draws (up to 2^32 per pick).
                        for c in (best..n).chain(0..best) {
                            if active(c) < active(best) {
                                best = c;
                            }
                        }
                    } else {
                        for _ in 1..choices {
                            let c = fastrand::usize(..n);
                            if active(c) < active(best) {
                                best = c;
                            }
                        }
                    }
                    best
                } else {
                    // Weighted: EDF with weight / (active + 1)^bias, recomputed on each pick.
                    let bias = cfg.least_request.active_request_bias;
                    let eff = |i: u32| {
                        let h = &hosts[self.idx[i as usize] as usize];
                        let w = f64::from(h.weight);
                        if bias == 0.0 {
                            w
                        } else {
                            w / (h.state.active_requests() as f64 + 1.0).powf(bias)
                        }
                    };
                    let mut g = self.edf.lock().unwrap_or_else(|e| e.into_inner());
                    let e =
                        g.get_or_insert_with(|| edf::Edf::new((0..n as u32).map(|i| (i, eff(i)))));
                    e.pick(eff)? as usize
                }
            }
            LbPolicy::Random => fastrand::usize(..n),
            LbPolicy::PeakEwma => {
                // Power of two choices on RTT estimate x (in-flight + 1), linkerd2-proxy's rule.
                let now = Instant::now();
                let a = fastrand::usize(..n);
                let b = if n > 1 {
                    let b = fastrand::usize(..n - 1);
                    if b >= a { b + 1 } else { b }
                } else {
                    a
                };
                let cost = |i: usize| hosts[self.idx[i] as usize].state.ewma_cost(now);
                if cost(b) < cost(a) { b } else { a }
            }
            LbPolicy::RingHash => {
                let r = self.ring.get_or_init(|| {
                    let keyed: Vec<(String, u32)> = self
                        .idx
                        .iter()
                        .map(|h| {
                            let h = &hosts[*h as usize];
                            (h.address.to_string(), h.weight)
                        })
                        .collect();
                    ring::Ring::new(
                        &keyed,
                        cfg.ring_hash.min_ring_size,
                        cfg.ring_hash.max_ring_size,
                    )
                });
                let h = hash.unwrap_or_else(|| fastrand::u64(..));
                r.choose(h, attempt)? as usize
            }
            LbPolicy::Maglev => {
                let t = self.maglev.get_or_init(|| {
                    let keys: Vec<String> = self
                        .idx
                        .iter()
                        .map(|h| hosts[*h as usize].address.to_string())
                        .collect();
                    let keyed: Vec<(&str, u32)> = keys
                        .iter()
                        .zip(&self.idx)
                        .map(|(k, h)| (k.as_str(), hosts[*h as usize].weight))
                        .collect();
                    maglev::table(&keyed, cfg.maglev.table_size as usize).unwrap_or_else(|e| {
                        // The model validated the size; a failure here means a host-count
                        // overflow: fall back to a table of the default size.
                        tracing::warn!(error = %e, "maglev table");
                        maglev::table(&keyed, maglev::DEFAULT_TABLE_SIZE).unwrap_or_default()
                    })
                });
                let mut h = hash.unwrap_or_else(|| fastrand::u64(..));
                if attempt > 0 {
                    // Envoy perturbs the hash with many bits set so retries land elsewhere.
                    h ^= u64::MAX - u64::from(attempt) + 1;
                }
                maglev::choose(t, h)? as usize
            }
        };
        self.idx.get(local).copied()
    }
}

impl Prepared {
    fn new(lb: &ClusterLb, generation: u64) -> Prepared {
        let (views, localities) = plan::views(&lb.hosts);
        let opf = lb.policy.overprovisioning_factor;
        let local = lb
            .local_locality
            .as_ref()
            .and_then(|l| localities.iter().position(|x| x == l))
            .map(|locality| {
                let mut per_locality = vec![0u64; localities.len()];
                let mut elsewhere = 0u64;
                if lb.local_hosts.is_empty() {
                    // No local cluster: skiff itself is the one local host.
                    per_locality[locality] = 1;
                } else {
                    for (l, n) in lb.local_hosts.iter() {
                        match localities.iter().position(|x| x == l) {
                            Some(i) => per_locality[i] += n,
                            None => elsewhere += n,
                        }
                    }
                }
                plan::LocalCluster {
                    locality,
                    per_locality,
                    elsewhere,
                }
            });
        let plan = plan::plan(
            &views,
            localities.len(),
            opf,
            &lb.policy.common,
            local.as_ref(),
        );
        let hosts = &lb.hosts;
        let levels = plan
            .levels
            .iter()
            .map(|l| {
                [
                    Picker::new(l.healthy.clone(), hosts),
                    Picker::new(l.degraded.clone(), hosts),
                    Picker::new(l.all.clone(), hosts),
                ]
            })
            .collect();
        let localities = plan
            .levels
            .iter()
            .map(|l| {
                let mk = |ls: &Option<Vec<plan::LocalitySet>>| {
                    ls.as_ref().map(|ls| LocalityPicker {
                        edf: Mutex::new(edf::Edf::new(
                            ls.iter().enumerate().map(|(i, s)| (i as u32, s.weight)),
                        )),
                        weights: ls.iter().map(|s| s.weight).collect(),
                        sets: ls
                            .iter()
                            .map(|s| Picker::new(s.hosts.clone(), hosts))
                            .collect(),
                    })
                };
                [mk(&l.healthy_localities), mk(&l.degraded_localities)]
            })
            .collect();
        let zone = plan
            .zone_sets
            .as_ref()
            .map(|sets| sets.iter().map(|s| Picker::new(s.clone(), hosts)).collect());
        Prepared {
            generation,
            plan,
            levels,
            localities,
            zone,
        }
    }

    fn pick(&self, lb: &ClusterLb, hash: Option<u64>, attempt: u32) -> Option<u32> {
        let roll = match (lb.policy.kind, hash) {
            (LbPolicy::RingHash | LbPolicy::Maglev, Some(h)) => h,
            _ => fastrand::u64(..),
        };
        let (level, avail) = priority::choose_priority(&self.plan.load, roll)?;
        let pickers = self.levels.get(level)?;
        if self.plan.load.panic.get(level).copied().unwrap_or(false) {
            lb.shared.stats.lb_healthy_panic.inc();
            if lb
                .policy
                .common
                .zone_aware
                .as_ref()
                .is_some_and(|z| z.fail_traffic_on_panic)
            {
                return None;
            }
            return pickers[2].pick(lb, hash, attempt);
        }
        let which = match avail {
            priority::Availability::Healthy => 0,
            priority::Availability::Degraded => 1,
        };
        if let Some(lp) = &self.localities[level][which] {
            let i = {
                let mut e = lp.edf.lock().unwrap_or_else(|e| e.into_inner());
                e.pick(|i| lp.weights[i as usize])
            };
            // No locality with weight and hosts: Envoy falls back to the whole host set.
            if let Some(i) = i {
                return lp.sets[i as usize].pick(lb, hash, attempt);
            }
        }
        if level == 0
            && which == 0
            && let (Some(zone), Some(sets)) = (&self.plan.zone, &self.zone)
        {
            let enabled = lb
                .policy
                .common
                .zone_aware
                .as_ref()
                .map(|z| z.routing_enabled)
                .unwrap_or(0.0);
            if fastrand::f64() * 100.0 < enabled
                && let Some(i) = priority::zone_pick(zone, fastrand::u64(..), fastrand::u64(..))
                && let Some(p) = sets.get(i)
                && !p.idx.is_empty()
            {
                return p.pick(lb, hash, attempt);
            }
        }
        pickers[which].pick(lb, hash, attempt)
    }
}

#[cfg(test)]
mod tests;
