//! The immutable configuration snapshot and the store that swaps it atomically.
//!
//! Only the configuration task writes the store. A connection loads the `Arc<Snapshot>` once at
//! accept and keeps it for its whole life, so it never sees half an update.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use arc_swap::ArcSwap;

use crate::model::{Cluster, ClusterKind, LbEndpoint, Listener, LoadAssignment};

/// A cluster together with the endpoints it currently resolves to.
#[derive(Debug)]
pub struct ClusterEntry {
    /// The validated cluster.
    pub cluster: Cluster,
    /// Endpoints (STATIC inline, EDS from its assignment); empty for ORIGINAL_DST and DNS.
    pub assignment: Option<Arc<LoadAssignment>>,
    /// Round-robin cursor; restarts at 0 with each snapshot.
    pub rr: AtomicUsize,
}

impl ClusterEntry {
    /// Endpoints new connections may use (HEALTHY or UNKNOWN).
    pub fn healthy_endpoints(&self) -> Vec<&LbEndpoint> {
        self.assignment
            .as_deref()
            .map(|a| a.endpoints().filter(|e| e.health.is_healthy()).collect())
            .unwrap_or_default()
    }
}

/// One immutable, internally consistent view of the configuration.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Listeners by name.
    pub listeners: BTreeMap<String, Arc<Listener>>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<ClusterEntry>>,
    /// Listener name by exact address.
    by_addr: HashMap<SocketAddr, String>,
}

impl Snapshot {
    /// Build a snapshot; EDS clusters take their endpoints from `assignments` by service name.
    pub fn new(
        listeners: impl IntoIterator<Item = Listener>,
        clusters: impl IntoIterator<Item = Cluster>,
        assignments: &BTreeMap<String, Arc<LoadAssignment>>,
    ) -> Snapshot {
        let listeners: BTreeMap<String, Arc<Listener>> = listeners
            .into_iter()
            .map(|l| (l.name.clone(), Arc::new(l)))
            .collect();
        let clusters = clusters
            .into_iter()
            .map(|c| {
                let assignment = match &c.kind {
                    ClusterKind::Static(la) => Some(Arc::new(la.clone())),
                    ClusterKind::Eds { service_name } => assignments.get(service_name).cloned(),
                    ClusterKind::Dns { .. } | ClusterKind::OriginalDst => None,
                };
                let entry = ClusterEntry {
                    cluster: c,
                    assignment,
                    rr: AtomicUsize::new(0),
                };
                (entry.cluster.name.clone(), Arc::new(entry))
            })
            .collect();
        // Envoy refuses two listeners on one address; the later one loses here too.
        let mut by_addr = HashMap::new();
        for (name, l) in &listeners {
            by_addr.entry(l.address).or_insert_with(|| name.clone());
        }
        Snapshot {
            listeners,
            clusters,
            by_addr,
        }
    }

    /// The listener that owns a connection whose original destination is `dst`, Envoy's way:
    /// exact `ip:port`, else the wildcard address of that family on the same port.
    pub fn listener_for(&self, dst: SocketAddr) -> Option<&Arc<Listener>> {
        let wildcard = match dst.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        self.by_addr
            .get(&dst)
            .or_else(|| self.by_addr.get(&SocketAddr::new(wildcard, dst.port())))
            .and_then(|n| self.listeners.get(n))
    }

    /// The `use_original_dst` listener on `port` (Istio's `virtualOutbound` on 15001).
    pub fn virtual_listener(&self, port: u16) -> Option<&Arc<Listener>> {
        self.listeners
            .values()
            .find(|l| l.use_original_dst && l.address.port() == port)
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<ClusterEntry>> {
        self.clusters.get(name)
    }
}

/// Holder of the current snapshot; readers never block and never see a partial update.
#[derive(Debug)]
pub struct Store {
    current: ArcSwap<Snapshot>,
}

impl Store {
    /// A store serving `initial`.
    pub fn new(initial: Snapshot) -> Self {
        Store {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The snapshot to use for one connection.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publish a new snapshot.
    pub fn publish(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
    }
}
