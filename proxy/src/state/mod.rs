//! The immutable configuration snapshot and the store that swaps it atomically.
//!
//! Only the configuration task writes the store. A connection loads the `Arc<Snapshot>` once at
//! accept and keeps it for its whole life, so it never sees half an update.
//!
//! Publishing attaches the snapshot to the store's [`HostRegistry`]: each cluster entry gets
//! the live host state and the [`ClusterStats`] its cluster had in the previous snapshot, the
//! stats of clusters no longer present leave `/stats`, and the stat handles of the HTTP
//! connection managers and virtual clusters are resolved, so no request looks a name up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::config::Bootstrap;
use crate::lb::{ClusterLb, HostRegistry};
use crate::model::listener::RunFilter;
use crate::model::tls::Secrets;
use crate::model::{
    Cluster, ClusterKind, LbEndpoint, Listener, LoadAssignment, NetworkAction, RouteConfig,
};
use crate::rbac;
use crate::stats::{ClusterStats, HttpStats, Stats, VclusterStats};

/// Envoy's (and Istio's) name for outbound connections no listener handles; its stats exist
/// whether or not a cluster of that name is configured.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// The inbound counterpart of [`PASSTHROUGH_CLUSTER`].
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";

/// One accepted (or warming) xDS resource as it arrived, for `/config_dump`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceRecord {
    /// `version_info` of the response (SotW) or the resource's own version (delta).
    pub version_info: String,
    /// When it was accepted.
    pub last_updated: SystemTime,
    /// The resource exactly as received.
    pub resource: prost_types::Any,
}

/// The last rejected update of one resource (Envoy's `UpdateFailureState`).
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorRecord {
    /// Version of the rejected update.
    pub version_info: String,
    /// When it was rejected.
    pub last_update_attempt: SystemTime,
    /// `name: reason`.
    pub details: String,
    /// The rejected resource, when it could be decoded far enough to be shown.
    pub resource: Option<prost_types::Any>,
}

/// What `/config_dump` shows for one type URL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeDump {
    /// Version of the last accepted response for this type.
    pub version_info: String,
    /// When the type was last updated.
    pub last_updated: Option<SystemTime>,
    /// Accepted and warmed (in the snapshot), by name.
    pub active: BTreeMap<String, ResourceRecord>,
    /// Accepted but waiting for their dependencies, by name.
    pub warming: BTreeMap<String, ResourceRecord>,
    /// Last NACKed update per resource name.
    pub errors: BTreeMap<String, ErrorRecord>,
}

/// Every xDS type's accepted resources, warming resources and errors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XdsDump {
    /// LDS.
    pub listeners: TypeDump,
    /// CDS.
    pub clusters: TypeDump,
    /// RDS.
    pub routes: TypeDump,
    /// EDS.
    pub endpoints: TypeDump,
    /// SDS over ADS (`tls.v3.Secret`).
    pub secrets: TypeDump,
}

/// A cluster together with the endpoints it currently resolves to and its balancer.
#[derive(Debug)]
pub struct ClusterEntry {
    /// The validated cluster.
    pub cluster: Cluster,
    /// Endpoints (STATIC inline, EDS from its assignment); empty for ORIGINAL_DST and DNS.
    pub assignment: Option<Arc<LoadAssignment>>,
    /// Round-robin cursor over DNS hosts; restarts at 0 with each snapshot.
    pub rr: AtomicUsize,
    /// Hosts and balancing state; live host state is shared with other snapshots through the
    /// [`HostRegistry`] this entry was attached to.
    pub lb: ClusterLb,
    /// `cluster.<name>.*`: the same handles in every snapshot while the cluster exists.
    pub stats: Arc<ClusterStats>,
}

impl ClusterEntry {
    /// An entry whose hosts keep their live state in `registry`.
    pub fn new(
        cluster: Cluster,
        assignment: Option<Arc<LoadAssignment>>,
        registry: &HostRegistry,
    ) -> ClusterEntry {
        let lb = ClusterLb::new(
            &cluster.name,
            cluster.lb_policy,
            &cluster.lb,
            assignment.as_deref(),
            registry,
        );
        let stats = lb.shared.stats.clone();
        ClusterEntry {
            cluster,
            assignment,
            rr: AtomicUsize::new(0),
            lb,
            stats,
        }
    }

    /// Endpoints new connections may use now: EDS HEALTHY or UNKNOWN and neither ejected nor
    /// failing active health checks.
    pub fn healthy_endpoints(&self) -> Vec<&LbEndpoint> {
        let Some(a) = self.assignment.as_deref() else {
            return Vec::new();
        };
        // `lb.hosts` follows the assignment's order, internal endpoints left out.
        a.endpoints()
            .filter(|e| e.internal.is_none())
            .zip(&self.lb.hosts)
            .filter(|(_, h)| h.coarse() == crate::lb::host::Coarse::Healthy)
            .map(|(e, _)| e)
            .collect()
    }

    /// Take a connection slot (`max_connections`); the guard gives it back.
    pub fn try_connection(
        &self,
        p: crate::lb::RoutingPriority,
    ) -> Result<crate::lb::BreakerGuard, crate::lb::Overflow> {
        self.try_take(p, crate::lb::Resource::Connections)
    }

    /// Take a pending-request slot (`max_pending_requests`).
    pub fn try_pending(
        &self,
        p: crate::lb::RoutingPriority,
    ) -> Result<crate::lb::BreakerGuard, crate::lb::Overflow> {
        self.try_take(p, crate::lb::Resource::PendingRequests)
    }

    /// Take a request slot (`max_requests`).
    pub fn try_request(
        &self,
        p: crate::lb::RoutingPriority,
    ) -> Result<crate::lb::BreakerGuard, crate::lb::Overflow> {
        self.try_take(p, crate::lb::Resource::Requests)
    }

    /// Take a retry slot (`max_retries` or the retry budget).
    pub fn try_retry(
        &self,
        p: crate::lb::RoutingPriority,
    ) -> Result<crate::lb::BreakerGuard, crate::lb::Overflow> {
        self.try_take(p, crate::lb::Resource::Retries)
    }

    fn try_take(
        &self,
        p: crate::lb::RoutingPriority,
        r: crate::lb::Resource,
    ) -> Result<crate::lb::BreakerGuard, crate::lb::Overflow> {
        self.lb
            .shared
            .breakers
            .try_take(&self.cluster.lb.circuit_breakers, p, r, &self.stats)
    }

    /// The hosts new traffic may reach and their expected shares (priority load, panic,
    /// locality weights, health, ejections): the set the BPF projection mirrors.
    pub fn eligible(&self) -> Vec<(Arc<crate::lb::Host>, f64)> {
        let (views, _) = self.lb.views();
        let plan = self.lb.plan();
        crate::lb::eligible(&plan, &views)
            .into_iter()
            .map(|e| (self.lb.hosts[e.index as usize].clone(), e.share))
            .collect()
    }
}

/// One immutable, internally consistent view of the configuration.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Listeners by name.
    pub listeners: BTreeMap<String, Arc<Listener>>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<ClusterEntry>>,
    /// Route configurations (RDS) by name.
    pub routes: BTreeMap<String, Arc<RouteConfig>>,
    /// Names of the listeners that came from the bootstrap (the others came over xDS).
    pub static_listeners: BTreeSet<String>,
    /// Names of the clusters that came from the bootstrap.
    pub static_clusters: BTreeSet<String>,
    /// Raw xDS resources, warming ones and errors, for `/config_dump`.
    pub xds: Arc<XdsDump>,
    /// Every secret known, by name: the bootstrap's static secrets, those of gRPC SDS sources
    /// and those over ADS (`xds::Resources` merges them). TLS configurations are built from
    /// these at handshake time.
    pub secrets: Secrets,
    /// Listener name by exact address.
    by_addr: HashMap<SocketAddr, String>,
    /// Stat handles resolved by [`Snapshot::attach`].
    handles: Handles,
    /// The registry of the store this snapshot was attached to (a private one before).
    stats: Arc<Stats>,
}

/// Stat handles of a snapshot's resources other than its cluster entries.
#[derive(Debug, Default)]
struct Handles {
    /// By HCM `stat_prefix`.
    http: HashMap<String, Arc<HttpStats>>,
    /// By virtual host name, then virtual cluster name (`other` included).
    vclusters: HashMap<String, HashMap<String, Arc<VclusterStats>>>,
    /// The passthrough clusters' stats, when no cluster of that name is configured.
    passthrough: HashMap<&'static str, Arc<ClusterStats>>,
    /// RBAC filters' counters (network and HTTP), by their names (filters sharing a stat
    /// prefix may still differ in their shadow prefix).
    rbac: HashMap<rbac::StatNames, Arc<rbac::Counters>>,
}

impl Handles {
    fn resolve(snap: &Snapshot, stats: &Stats) -> Handles {
        let mut h = Handles::default();
        let mut vclusters_of = |rc: &RouteConfig| {
            for vh in rc
                .virtual_hosts
                .iter()
                .filter(|v| !v.virtual_clusters.is_empty())
            {
                let m = h.vclusters.entry(vh.name.clone()).or_default();
                let names = vh.virtual_clusters.iter().map(|(n, _)| n.as_str());
                for vc in names.chain(["other"]) {
                    m.entry(vc.to_string())
                        .or_insert_with(|| stats.vcluster(&vh.name, vc));
                }
            }
        };
        let mut prefixes: Vec<&str> = Vec::new();
        let mut rbac_names: Vec<&rbac::StatNames> = Vec::new();
        for l in snap.listeners.values() {
            for chain in l.filter_chains.iter().chain(&l.default_filter_chain) {
                rbac_names.extend(chain.rbac.iter().map(|f| &f.stats));
                if let NetworkAction::Http(m) = &chain.action {
                    rbac_names.extend(m.filters.iter().map(|f| match f {
                        RunFilter::Rbac(r) => &r.stats,
                    }));
                    prefixes.push(&m.stat_prefix);
                    if let Some(rc) = &m.inline_route_config {
                        vclusters_of(rc);
                    }
                }
            }
        }
        for rc in snap.routes.values() {
            vclusters_of(rc);
        }
        for p in prefixes {
            if !h.http.contains_key(p) {
                h.http.insert(p.to_string(), stats.http(p));
            }
        }
        for names in rbac_names {
            if !h.rbac.contains_key(names) {
                let c = Arc::new(rbac::Counters::resolve(stats, names));
                h.rbac.insert(names.clone(), c);
            }
        }
        for name in [PASSTHROUGH_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER] {
            if !snap.clusters.contains_key(name) {
                h.passthrough.insert(name, stats.cluster(name));
            }
        }
        h
    }
}

impl Snapshot {
    /// Build a snapshot of static configuration only (every listener and cluster counts as
    /// static); EDS clusters take their endpoints from `assignments` by service name.
    pub fn new(
        listeners: impl IntoIterator<Item = Listener>,
        clusters: impl IntoIterator<Item = Cluster>,
        assignments: &BTreeMap<String, Arc<LoadAssignment>>,
    ) -> Snapshot {
        let mut s = Snapshot::build(listeners, clusters, assignments);
        s.static_listeners = s.listeners.keys().cloned().collect();
        s.static_clusters = s.clusters.keys().cloned().collect();
        s
    }

    /// Build a snapshot mixing bootstrap and xDS resources: `static_*` name the bootstrap ones,
    /// `routes` and `xds` come from the xDS client.
    pub fn with_xds(
        listeners: impl IntoIterator<Item = Listener>,
        clusters: impl IntoIterator<Item = Cluster>,
        assignments: &BTreeMap<String, Arc<LoadAssignment>>,
        routes: BTreeMap<String, Arc<RouteConfig>>,
        static_listeners: BTreeSet<String>,
        static_clusters: BTreeSet<String>,
        xds: Arc<XdsDump>,
    ) -> Snapshot {
        let mut s = Snapshot::build(listeners, clusters, assignments);
        s.routes = routes;
        s.static_listeners = static_listeners;
        s.static_clusters = static_clusters;
        s.xds = xds;
        s
    }

    fn build(
        listeners: impl IntoIterator<Item = Listener>,
        clusters: impl IntoIterator<Item = Cluster>,
        assignments: &BTreeMap<String, Arc<LoadAssignment>>,
    ) -> Snapshot {
        let listeners: BTreeMap<String, Arc<Listener>> = listeners
            .into_iter()
            .map(|l| (l.name.clone(), Arc::new(l)))
            .collect();
        // Until a Store attaches it to its registry, a snapshot's hosts keep their own state.
        let stats = Arc::new(Stats::default());
        let registry = HostRegistry::new(stats.clone());
        let clusters = clusters
            .into_iter()
            .map(|c| {
                let assignment = match &c.kind {
                    ClusterKind::Static(la) => Some(Arc::new(la.clone())),
                    ClusterKind::Eds { service_name } => assignments.get(service_name).cloned(),
                    ClusterKind::Dns { .. } | ClusterKind::OriginalDst => None,
                };
                let entry = ClusterEntry::new(c, assignment, &registry);
                (entry.cluster.name.clone(), Arc::new(entry))
            })
            .collect();
        // Envoy refuses two listeners on one address; the later one loses here too.
        let mut by_addr = HashMap::new();
        // UDP listeners never own a TCP connection (and skiff's proxy serves no UDP).
        for (name, l) in listeners.iter().filter(|(_, l)| l.udp.is_none()) {
            by_addr.entry(l.address).or_insert_with(|| name.clone());
        }
        Snapshot {
            listeners,
            clusters,
            by_addr,
            stats,
            ..Default::default()
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

    /// `cluster.<name>.*` of a configured cluster (its entry's `stats`), or of
    /// [`PASSTHROUGH_CLUSTER`] / [`INBOUND_PASSTHROUGH_CLUSTER`] when they are not configured.
    pub fn cluster_stats(&self, name: &str) -> Option<&Arc<ClusterStats>> {
        self.clusters
            .get(name)
            .map(|e| &e.stats)
            .or_else(|| self.handles.passthrough.get(name))
    }

    /// `http.<stat_prefix>.*` for an HCM of this snapshot; for another prefix (an HCM of a
    /// listener since removed), found or created in the registry.
    pub fn http_stats(&self, stat_prefix: &str) -> Arc<HttpStats> {
        match self.handles.http.get(stat_prefix) {
            Some(h) => h.clone(),
            None => self.stats.http(stat_prefix),
        }
    }

    /// The counters of an RBAC filter of this snapshot (named `names`); for another (a filter
    /// since removed), found or created in the registry.
    pub fn rbac_counters(&self, names: &rbac::StatNames) -> Arc<rbac::Counters> {
        match self.handles.rbac.get(names) {
            Some(c) => c.clone(),
            None => Arc::new(rbac::Counters::resolve(&self.stats, names)),
        }
    }

    /// `vhost.<vhost>.vcluster.<vcluster>.*` for a virtual cluster of this snapshot's route
    /// configurations; for another, found or created in the registry.
    pub fn vcluster_stats(&self, vhost: &str, vcluster: &str) -> Arc<VclusterStats> {
        match self
            .handles
            .vclusters
            .get(vhost)
            .and_then(|m| m.get(vcluster))
        {
            Some(v) => v.clone(),
            None => self.stats.vcluster(vhost, vcluster),
        }
    }

    /// Re-create every cluster entry on `registry`, so hosts keep their live state (active
    /// requests, ejections, health-check results) and clusters their stats from earlier
    /// snapshots; forgets the state and drops the stats of clusters this snapshot no longer
    /// has; resolves the stat handles of its HTTP connection managers and virtual clusters.
    pub fn attach(&mut self, registry: &HostRegistry) {
        let mut names: BTreeSet<&str> = self.clusters.keys().map(String::as_str).collect();
        names.extend([PASSTHROUGH_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER]);
        registry.retain(&names);
        // Zone-aware routing weighs upstream localities against the local cluster's.
        if let Some(local) = registry.local_cluster() {
            let mut per: Vec<(crate::model::endpoint::Locality, u64)> = Vec::new();
            if let Some(a) = self
                .clusters
                .get(&local)
                .and_then(|e| e.assignment.as_ref())
            {
                for l in &a.localities {
                    let n = l.endpoints.iter().filter(|e| e.health.is_healthy()).count() as u64;
                    match per.iter_mut().find(|(x, _)| *x == l.locality) {
                        Some((_, c)) => *c += n,
                        None => per.push((l.locality.clone(), n)),
                    }
                }
            }
            registry.set_local_hosts(per);
        }
        for entry in self.clusters.values_mut() {
            // A snapshot being published is not shared yet: re-key its hosts in place.
            if let Some(e) = Arc::get_mut(entry)
                && e.lb.rebind(&e.cluster.name, &e.cluster.lb, registry)
            {
                e.stats = e.lb.shared.stats.clone();
                continue;
            }
            *entry = Arc::new(ClusterEntry::new(
                entry.cluster.clone(),
                entry.assignment.clone(),
                registry,
            ));
        }
        self.stats = registry.stats().clone();
        self.handles = Handles::resolve(self, &self.stats);
        self.count_unsupported();
    }

    /// `skiff.unsupported.<name>`: how many listeners of this snapshot carry each extension
    /// accepted without being run (`model::compat`); names no longer carried drop to 0.
    fn count_unsupported(&self) {
        const PREFIX: &str = "skiff.unsupported.";
        let mut using: BTreeMap<&str, u64> = BTreeMap::new();
        for l in self.listeners.values() {
            for n in &l.unsupported {
                *using.entry(n.as_str()).or_default() += 1;
            }
        }
        for (name, _) in self.stats.snapshot() {
            if let Some(n) = name.strip_prefix(PREFIX)
                && !using.contains_key(n)
            {
                self.stats.gauge(&name).set(0);
            }
        }
        for (n, count) in using {
            self.stats.gauge(&format!("{PREFIX}{n}")).set(count);
        }
    }
}

/// Holder of the current snapshot; readers never block and never see a partial update.
#[derive(Debug)]
pub struct Store {
    current: ArcSwap<Snapshot>,
    changed: tokio::sync::watch::Sender<u64>,
    registry: Arc<HostRegistry>,
}

impl Store {
    /// A store serving `initial`, with host state counted in a private `Stats`.
    pub fn new(initial: Snapshot) -> Self {
        Store::with_registry(initial, HostRegistry::new(Arc::new(Stats::default())))
    }

    /// A store serving `initial` whose snapshots keep host state in `registry`.
    pub fn with_registry(mut initial: Snapshot, registry: Arc<HostRegistry>) -> Self {
        initial.attach(&registry);
        Store {
            current: ArcSwap::from_pointee(initial),
            changed: tokio::sync::watch::Sender::new(0),
            registry,
        }
    }

    /// The store of a proxy (or of a node-mode pod's pipeline) starting from `bootstrap`'s
    /// static resources, its host state counted in `stats` and knowing the proxy's locality and
    /// local cluster (zone-aware routing).
    pub fn for_bootstrap(bootstrap: &Bootstrap, stats: Arc<Stats>) -> Arc<Store> {
        // Istio's metrics name this proxy's side from the node's Istio metadata.
        stats.istio.set_local(crate::model::istio::local_workload(
            bootstrap.raw.node.as_ref(),
        ));
        let registry = HostRegistry::new(stats);
        registry.set_local_locality(
            bootstrap
                .raw
                .node
                .as_ref()
                .map(|n| crate::model::endpoint::Locality::from_proto(n.locality.as_ref())),
        );
        registry.set_local_cluster(
            bootstrap
                .raw
                .cluster_manager
                .as_ref()
                .map(|c| c.local_cluster_name.clone()),
        );
        let mut snap = Snapshot::new(
            bootstrap.listeners.clone(),
            bootstrap.clusters.clone(),
            &Default::default(),
        );
        snap.secrets = bootstrap.secrets.clone();
        Arc::new(Store::with_registry(snap, registry))
    }

    /// The snapshot to use for one connection.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publish a new snapshot (its hosts are attached to the store's registry first).
    pub fn publish(&self, mut next: Snapshot) {
        next.attach(&self.registry);
        self.current.store(Arc::new(next));
        self.changed.send_modify(|g| *g += 1);
    }

    /// Host state shared by every snapshot of this store.
    pub fn registry(&self) -> &Arc<HostRegistry> {
        &self.registry
    }

    /// A receiver that wakes after each publish (the value is a generation counter).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

pub mod secrets;
#[cfg(test)]
mod tests;
