//! Host state that outlives snapshots. Snapshots are rebuilt on every xDS push; Envoy keeps a
//! host (its counters, its ejection, its health-check result) while EDS keeps listing it, and so
//! does the [`HostRegistry`]: state is keyed by cluster name and address, and each new
//! snapshot's cluster entries are attached to it by `Store::publish`.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::circuit::Breakers;
use super::host::{Host, HostState, flag};
use crate::model::cluster::lb::{LbSettings, OutlierDetection};
use crate::model::endpoint::{LoadAssignment, Locality};
use crate::stats::{ClusterStats, Stats};

/// Every cluster's persistent host state, shared by successive snapshots.
#[derive(Debug)]
pub struct HostRegistry {
    clusters: Mutex<HashMap<String, Arc<ClusterShared>>>,
    stats: Arc<Stats>,
    health: Arc<watch::Sender<u64>>,
    local_locality: Mutex<Option<Locality>>,
    local_cluster: Mutex<Option<String>>,
    local_hosts: Mutex<Arc<Vec<(Locality, u64)>>>,
}

impl HostRegistry {
    /// A registry counting its clusters' stats in `stats`, which it owns the cluster names of:
    /// a cluster it forgets leaves `stats` too (so give each registry its own `Stats`).
    pub fn new(stats: Arc<Stats>) -> Arc<HostRegistry> {
        Arc::new(HostRegistry {
            clusters: Mutex::new(HashMap::new()),
            stats,
            health: Arc::new(watch::Sender::new(0)),
            local_locality: Mutex::new(None),
            local_cluster: Mutex::new(None),
            local_hosts: Mutex::new(Arc::new(Vec::new())),
        })
    }

    /// Wakes whenever a host's ejection or active health-check state changes (the value is a
    /// generation counter): the BPF reconciler re-projects then.
    pub fn subscribe_health(&self) -> watch::Receiver<u64> {
        self.health.subscribe()
    }

    /// Current health generation.
    pub fn health_generation(&self) -> u64 {
        *self.health.borrow()
    }

    /// The proxy's own locality (`node.locality`), for zone-aware routing.
    pub fn set_local_locality(&self, l: Option<Locality>) {
        *self
            .local_locality
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = l;
    }

    /// The proxy's own locality, when known.
    pub fn local_locality(&self) -> Option<Locality> {
        self.local_locality
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `cluster_manager.local_cluster_name`: the cluster of this proxy's own service, whose
    /// hosts per locality drive zone-aware routing.
    pub fn set_local_cluster(&self, name: Option<String>) {
        *self.local_cluster.lock().unwrap_or_else(|e| e.into_inner()) =
            name.filter(|n| !n.is_empty());
    }

    /// The local cluster's name, when configured.
    pub fn local_cluster(&self) -> Option<String> {
        self.local_cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Record the local cluster's healthy hosts per locality (from the snapshot being attached).
    pub fn set_local_hosts(&self, v: Vec<(Locality, u64)>) {
        *self.local_hosts.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
    }

    /// The local cluster's healthy hosts per locality (empty without a local cluster).
    pub fn local_hosts(&self) -> Arc<Vec<(Locality, u64)>> {
        self.local_hosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The shared state of cluster `name` (created on first use), with its settings updated.
    pub fn cluster(&self, name: &str, settings: &LbSettings) -> Arc<ClusterShared> {
        let mut m = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        let c = m
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ClusterShared {
                    name: name.to_string(),
                    stats: self.stats.cluster(name),
                    health: self.health.clone(),
                    generation: AtomicU64::new(0),
                    hosts: Mutex::new(HashMap::new()),
                    breakers: Breakers::default(),
                    outlier: ArcSwap::from_pointee(None),
                    active_hc: ArcSwap::from_pointee(false),
                    host_count: AtomicU64::new(0),
                    success_rate_summary: Mutex::new(None),
                })
            })
            .clone();
        if **c.outlier.load() != settings.outlier {
            c.outlier.store(Arc::new(settings.outlier.clone()));
        }
        let hc = !settings.health_checks.is_empty();
        if **c.active_hc.load() != hc {
            c.active_hc.store(Arc::new(hc));
        }
        c
    }

    /// Forget clusters not in `keep`: their hosts went away with them, and their stats leave
    /// `/stats` (as Envoy drops a removed cluster's stats).
    pub fn retain(&self, keep: &BTreeSet<&str>) {
        let mut m = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|k, _| keep.contains(k.as_str()));
        drop(m);
        self.stats.retain_clusters(|n| keep.contains(n));
    }

    /// The stats registry this registry's clusters count in.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

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
