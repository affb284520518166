//! Host state that outlives snapshots. Snapshots are rebuilt on every xDS push; Envoy keeps a
//! host (its counters, its ejection, its health-check result) while EDS keeps listing it, and so
//! does the [`HostRegistry`]: state is keyed by cluster name and address, and each new
//! snapshot's cluster entries are attached to it by `Store::publish`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::host::ClusterShared;
use crate::model::cluster::lb::LbSettings;
use crate::model::endpoint::Locality;
use crate::stats::Stats;

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
                Arc::new(ClusterShared::new(
                    name,
                    self.stats.cluster(name),
                    self.health.clone(),
                ))
            })
            .clone();
        c.update_settings(settings);
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
