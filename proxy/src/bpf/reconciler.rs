//! Reconciler: brings the kernel fast-path maps from the last applied [`MapImage`] to the next
//! one without a connect ever seeing a half-written cluster.
//!
//! Two generations of cluster and endpoint data live side by side (`SKIFF_CLUSTERS` and
//! `SKIFF_ENDPOINTS` hold `2 * max` entries; generation `g` owns `g * max ..`). Each service
//! value carries its cluster index for both generations. One [`Reconciler::apply`]:
//!
//! 1. if old and new services together would overflow the service map, deletes the services
//!    that are going away first (their connects go to the proxy, which already serves the new
//!    snapshot);
//! 2. writes the inactive generation's endpoint slots, then its clusters (only the entries that
//!    differ from what that generation last held);
//! 3. writes every service whose value changes: the inactive column gets the new cluster index
//!    (or `NO_CLUSTER` for a service going away), the active column is kept;
//! 4. flips `ConfigValue::fast_gen` (one config write): every connect from now on reads the new
//!    generation, whole;
//! 5. deletes the services that went away.
//!
//! A failed write stops the update before the flip: the active generation is untouched and the
//! inactive one is marked for a full rewrite. The writer is a trait so the property tests run
//! the same code against an in-memory model of the maps.
//!
//! The maps hold several scopes side by side ([`Reconciler::apply_scopes`]): the sidecar's or
//! node's own configuration ([`NODE_SCOPE`]) and, in node mode, one per pod pipeline. A service
//! key carries its scope, clusters and slots of every scope share one generation layout, and
//! one flip switches them all.
//!
//! Step 2 rewrites the generation that connects read until the previous flip. Before it, the
//! writer's [`FastMaps::quiesce`] must wait until no program can still be inside a lookup that
//! read the old generation number (see `bpf::fastpath::grace_period`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use skiff_common::{
    CLUSTER_SHARES, CLUSTER_WEIGHTED, ClusterValue, EndpointValue, LB_LEAST_REQUEST, LB_MAGLEV,
    LB_RANDOM, LB_ROUND_ROBIN, MAGLEV_TABLE_SIZE, NO_CLUSTER, NODE_SCOPE, ServiceKeyV4,
    ServiceKeyV6, ServiceValue,
};

/// Whose configuration a fast-path entry belongs to: [`NODE_SCOPE`] (0) for the sidecar's or
/// the node proxy's own, a pod pipeline's id in node mode.
pub type ScopeId = u32;

/// Per-scope images, as [`Reconciler::apply_scopes`] takes them.
pub type ScopedImages = BTreeMap<ScopeId, MapImage>;

use super::BpfError;
use super::projection::{ClusterImage, FastLb, MapImage};

/// A key of either service map (`SKIFF_SVC4_V2` or `SKIFF_SVC6_V2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceKey {
    /// An IPv4 service.
    V4(ServiceKeyV4),
    /// An IPv6 service.
    V6(ServiceKeyV6),
}

impl ServiceKey {
    /// The key of a TCP service at `vip` in [`NODE_SCOPE`].
    pub fn tcp(vip: SocketAddr) -> Self {
        Self::tcp_in(NODE_SCOPE, vip)
    }

    /// The key of a TCP service at `vip` in `scope`.
    pub fn tcp_in(scope: ScopeId, vip: SocketAddr) -> Self {
        match vip {
            SocketAddr::V4(a) => ServiceKey::V4(ServiceKeyV4::tcp_in(scope, a)),
            SocketAddr::V6(a) => ServiceKey::V6(ServiceKeyV6::tcp_in(scope, a)),
        }
    }

    /// The key of a UDP service at `vip` in [`NODE_SCOPE`] (IPv4 only: `None` for IPv6).
    pub fn udp(vip: SocketAddr) -> Option<Self> {
        Self::udp_in(NODE_SCOPE, vip)
    }

    /// The key of a UDP service at `vip` in `scope` (IPv4 only: `None` for IPv6).
    pub fn udp_in(scope: ScopeId, vip: SocketAddr) -> Option<Self> {
        match vip {
            SocketAddr::V4(a) => Some(ServiceKey::V4(ServiceKeyV4::udp_in(scope, a))),
            SocketAddr::V6(_) => None,
        }
    }

    /// The scope the service belongs to.
    pub fn scope(&self) -> ScopeId {
        match self {
            ServiceKey::V4(k) => k.scope,
            ServiceKey::V6(k) => k.scope,
        }
    }

    /// The service address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            ServiceKey::V4(k) => SocketAddr::V4(k.addr()),
            ServiceKey::V6(k) => SocketAddr::V6(k.addr()),
        }
    }
}

/// Sizes of the fast-path maps (per generation for clusters and endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Entries of `SKIFF_SVC4_V2` (services of the old and new image together during an update).
    pub max_services: u32,
    /// Clusters per generation (`SKIFF_CLUSTERS` holds twice this).
    pub max_clusters: u32,
    /// Endpoint slots per generation (`SKIFF_ENDPOINTS` holds twice this).
    pub max_endpoints: u32,
    /// MAGLEV clusters per generation (`SKIFF_MAGLEV` holds twice this many tables of
    /// `MAGLEV_TABLE_SIZE` entries).
    pub max_maglev: u32,
}

impl Default for Capacity {
    /// Sized for 10k services and 100k endpoints.
    fn default() -> Self {
        Capacity {
            max_services: 10_240,
            max_clusters: 10_240,
            max_endpoints: 102_400,
            max_maglev: 16,
        }
    }
}

/// Writes to the fast-path maps, in the order the reconciler calls them.
pub trait FastMaps {
    /// Insert or replace one service.
    fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), BpfError>;
    /// Delete one service.
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), BpfError>;
    /// Write one cluster entry (absolute index).
    fn set_cluster(&mut self, index: u32, value: ClusterValue) -> Result<(), BpfError>;
    /// Write one endpoint slot (absolute index).
    fn set_endpoint(&mut self, index: u32, value: EndpointValue) -> Result<(), BpfError>;
    /// Write one Maglev table entry (absolute index).
    fn set_maglev(&mut self, index: u32, value: u32) -> Result<(), BpfError>;
    /// Make `generation` active and turn the fast path on.
    fn flip(&mut self, generation: u8) -> Result<(), BpfError>;
    /// Called before writing the inactive generation when a flip happened since the last call:
    /// a kernel writer waits here until no program can still be reading that generation (an
    /// RCU grace period). An error stops the update before anything is written.
    fn quiesce(&mut self) -> Result<(), BpfError> {
        Ok(())
    }
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Generation active afterwards.
    pub generation: u8,
    /// Service entries written.
    pub services_written: usize,
    /// Service entries deleted.
    pub services_deleted: usize,
    /// Cluster entries written.
    pub clusters_written: usize,
    /// Endpoint slots written.
    pub endpoints_written: usize,
    /// Maglev table entries written.
    pub maglev_written: usize,
    /// Set when the image did not fit: names the limit (the services left out go to the proxy).
    pub overflow: Option<String>,
    /// The same, per scope whose image did not fit.
    pub overflow_by_scope: BTreeMap<ScopeId, String>,
}

/// What one generation of the cluster and endpoint arrays holds (relative indices).
#[derive(Clone, Debug, Default)]
struct Generation {
    clusters: Vec<ClusterValue>,
    endpoints: Vec<EndpointValue>,
    maglev: Vec<u32>,
    /// Unknown content (a write failed): rewrite everything next time.
    dirty: bool,
}

/// Keeps the kernel maps in step with the images it is given.
#[derive(Debug)]
pub struct Reconciler {
    caps: Capacity,
    active: u8,
    services: BTreeMap<ServiceKey, ServiceValue>,
    gens: [Generation; 2],
    applied: ScopedImages,
    /// A flip happened and no grace period has passed since: the inactive generation may
    /// still be read by programs that loaded the old generation number.
    flipped_since_grace: bool,
}

/// The image of a scope that holds none.
static EMPTY_IMAGE: std::sync::LazyLock<MapImage> = std::sync::LazyLock::new(MapImage::default);

const EMPTY_CLUSTER: ClusterValue = ClusterValue {
    slot_base: 0,
    endpoint_count: 0,
    total_weight: 0,
    rr_stride: 0,
    maglev_base: 0,
    lb_policy: 0,
    flags: 0,
    _pad: [0; 2],
};
const EMPTY_ENDPOINT: EndpointValue = EndpointValue {
    addr_be: [0; 4],
    port_be: 0,
    family: 0,
    health: 0,
    weight: 0,
    weight_end: 0,
};

impl Reconciler {
    /// A reconciler for freshly created (empty) maps of these sizes.
    pub fn new(caps: Capacity) -> Self {
        Reconciler {
            caps,
            active: 0,
            services: BTreeMap::new(),
            gens: Default::default(),
            applied: ScopedImages::new(),
            flipped_since_grace: false,
        }
    }

    /// Map sizes.
    pub fn capacity(&self) -> Capacity {
        self.caps
    }

    /// The generation connects currently read.
    pub fn active_generation(&self) -> u8 {
        self.active
    }

    /// The image the kernel currently serves for [`NODE_SCOPE`] (after [`MapImage::fit`]).
    pub fn applied(&self) -> &MapImage {
        self.applied.get(&NODE_SCOPE).unwrap_or(&EMPTY_IMAGE)
    }

    /// The images the kernel currently serves, per scope.
    pub fn applied_scopes(&self) -> &ScopedImages {
        &self.applied
    }

    /// The service entries as written to the kernel.
    pub fn services(&self) -> &BTreeMap<ServiceKey, ServiceValue> {
        &self.services
    }

    /// Applies `image` as the only scope, [`NODE_SCOPE`] (trimmed to capacity; the report names
    /// any limit hit).
    pub fn apply(
        &mut self,
        maps: &mut impl FastMaps,
        image: &MapImage,
    ) -> Result<ApplyReport, BpfError> {
        self.apply_scopes(maps, &ScopedImages::from([(NODE_SCOPE, image.clone())]))
    }

    /// Applies one image per scope (scopes absent from `images` lose their services). Scopes
    /// are fitted in order into what is left of the capacity: [`NODE_SCOPE`] first.
    pub fn apply_scopes(
        &mut self,
        maps: &mut impl FastMaps,
        images: &ScopedImages,
    ) -> Result<ApplyReport, BpfError> {
        let (image, overflow_by_scope) = fit_scopes(images, self.caps);
        let overflow = (!overflow_by_scope.is_empty()).then(|| {
            overflow_by_scope
                .iter()
                .map(|(scope, m)| {
                    if *scope == NODE_SCOPE {
                        m.clone()
                    } else {
                        format!("scope {scope}: {m}")
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        });
        let mut report = ApplyReport {
            generation: self.active,
            overflow,
            overflow_by_scope,
            ..Default::default()
        };
        // Nothing the kernel serves changes (an RDS push, a listener the fast path ignores).
        if image == self.applied && !self.gens.iter().any(|g| g.dirty) {
            return Ok(report);
        }
        let next = 1 - self.active;
        let Layout {
            clusters,
            endpoints,
            maglev,
            services: wanted,
        } = layout_scopes(&image, next, self.caps);
        let gone: BTreeSet<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();

        // 1. Room in the service map for old and new together, else the leaving ones go first.
        let union = self.services.len()
            + wanted
                .keys()
                .filter(|k| !self.services.contains_key(k))
                .count();
        if union > self.caps.max_services as usize {
            for k in &gone {
                maps.delete_service(*k)?;
                self.services.remove(k);
                report.services_deleted += 1;
            }
        }

        // 2. The inactive generation: slots, then the clusters that count them. Connects that
        //    read the generation number before the last flip may still be walking it: wait.
        if self.flipped_since_grace {
            maps.quiesce()?;
            self.flipped_since_grace = false;
        }
        let held = &mut self.gens[usize::from(next)];
        let result = write_generation(maps, held, next, self.caps, &clusters, &endpoints, &maglev);
        match result {
            Ok((c, e, m)) => {
                report.clusters_written = c;
                report.endpoints_written = e;
                report.maglev_written = m;
            }
            Err(e) => {
                held.dirty = true;
                return Err(e);
            }
        }

        // 3. Services: the inactive column points into the new generation.
        let col = usize::from(next);
        let mut writes: Vec<(ServiceKey, ServiceValue)> = Vec::new();
        for (k, idx) in &wanted {
            let mut v = self.services.get(k).copied().unwrap_or(ServiceValue {
                cluster_idx: [NO_CLUSTER; 2],
                flags: 0,
            });
            v.cluster_idx[col] = *idx;
            writes.push((*k, v));
        }
        for k in &gone {
            if let Some(mut v) = self.services.get(k).copied() {
                v.cluster_idx[col] = NO_CLUSTER;
                writes.push((*k, v));
            }
        }
        for (k, v) in writes {
            if self.services.get(&k) != Some(&v) {
                maps.set_service(k, v)?;
                self.services.insert(k, v);
                report.services_written += 1;
            }
        }

        // 4. One write switches every connect to the new generation.
        maps.flip(next)?;
        self.active = next;
        self.flipped_since_grace = true;

        // 5. Services that went away (they already fall back to the proxy).
        for k in &gone {
            if self.services.contains_key(k) {
                maps.delete_service(*k)?;
                self.services.remove(k);
                report.services_deleted += 1;
            }
        }
        report.generation = next;
        self.applied = image;
        Ok(report)
    }
}

/// One generation's map contents for an image (relative indices within the generation).
pub(crate) struct Layout {
    /// Cluster entries by id.
    pub(crate) clusters: Vec<ClusterValue>,
    /// Endpoint slots.
    pub(crate) endpoints: Vec<EndpointValue>,
    /// Maglev tables, `MAGLEV_TABLE_SIZE` entries per MAGLEV cluster, in cluster order.
    pub(crate) maglev: Vec<u32>,
    /// Each service's absolute cluster index.
    pub(crate) services: BTreeMap<ServiceKey, u32>,
}

/// Fits every scope's image, in scope order, into what the earlier ones left of `caps`; returns
/// the fitted images and, per scope, what did not fit.
fn fit_scopes(images: &ScopedImages, caps: Capacity) -> (ScopedImages, BTreeMap<ScopeId, String>) {
    let mut left = [
        caps.max_services as usize,
        caps.max_clusters as usize,
        caps.max_endpoints as usize,
        caps.max_maglev as usize,
    ];
    let mut out = ScopedImages::new();
    let mut overflow = BTreeMap::new();
    for (scope, img) in images {
        let (fitted, msg) = img.fit(left[0], left[1], left[2], left[3]);
        left[0] -= fitted.services.len() + fitted.udp_services.len();
        left[1] -= fitted.clusters.len();
        left[2] -= fitted.endpoint_slots();
        left[3] -= fitted
            .clusters
            .values()
            .filter(|c| c.lb == FastLb::Maglev)
            .count();
        if let Some(m) = msg {
            overflow.insert(*scope, m);
        }
        out.insert(*scope, fitted);
    }
    (out, overflow)
}

/// The image laid out for generation `generation`, as the only scope ([`NODE_SCOPE`]).
#[cfg(test)]
pub(crate) fn layout(image: &MapImage, generation: u8, caps: Capacity) -> Layout {
    layout_scopes(
        &ScopedImages::from([(NODE_SCOPE, image.clone())]),
        generation,
        caps,
    )
}

/// Every scope's image laid out for generation `generation`: clusters of all scopes share the
/// generation's index space (scope order, then cluster name), services are keyed by scope.
pub(crate) fn layout_scopes(images: &ScopedImages, generation: u8, caps: Capacity) -> Layout {
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    let mut maglev: Vec<u32> = Vec::new();
    let mut ids: BTreeMap<(ScopeId, &str), u32> = BTreeMap::new();
    let mut services = BTreeMap::new();
    for (&scope, image) in images {
        for (name, c) in &image.clusters {
            let id = clusters.len();
            let base = u32::from(generation) * caps.max_endpoints + endpoints.len() as u32;
            let maglev_base =
                u32::from(generation) * caps.max_maglev * MAGLEV_TABLE_SIZE + maglev.len() as u32;
            let mut end = 0u32;
            for (e, w) in c.endpoints.iter().zip(&c.weights) {
                end = end.saturating_add(*w);
                let mut v = EndpointValue::new(*e, *w);
                v.weight_end = end;
                endpoints.push(v);
            }
            if c.lb == FastLb::Maglev {
                maglev.extend(maglev_table(c));
            }
            clusters.push(ClusterValue {
                slot_base: base,
                endpoint_count: c.endpoints.len() as u32,
                total_weight: end,
                rr_stride: rr_stride(end),
                maglev_base: if c.lb == FastLb::Maglev {
                    maglev_base
                } else {
                    0
                },
                lb_policy: match c.lb {
                    FastLb::RoundRobin => LB_ROUND_ROBIN,
                    FastLb::Random => LB_RANDOM,
                    FastLb::LeastRequest => LB_LEAST_REQUEST,
                    FastLb::Maglev => LB_MAGLEV,
                },
                flags: if c.weighted() { CLUSTER_WEIGHTED } else { 0 }
                    | if c.shares { CLUSTER_SHARES } else { 0 },
                _pad: [0; 2],
            });
            ids.insert(
                (scope, name.as_str()),
                u32::from(generation) * caps.max_clusters + id as u32,
            );
        }
        let id_of =
            |s: &super::projection::ServiceImage| ids.get(&(scope, s.cluster.as_str())).copied();
        let tcp = image
            .services
            .iter()
            .filter_map(|(vip, s)| Some((ServiceKey::tcp_in(scope, *vip), id_of(s)?)));
        let udp = image
            .udp_services
            .iter()
            .filter_map(|(vip, s)| Some((ServiceKey::udp_in(scope, *vip)?, id_of(s)?)));
        services.extend(tcp.chain(udp));
    }
    Layout {
        clusters,
        endpoints,
        maglev,
        services,
    }
}

/// The kernel Maglev table of a cluster: slot offsets, built like Envoy's (host keys are the
/// address strings) at the kernel's table size.
pub(crate) fn maglev_table(c: &ClusterImage) -> Vec<u32> {
    let keys: Vec<String> = c.endpoints.iter().map(|e| e.to_string()).collect();
    let hosts: Vec<(&str, u32)> = keys
        .iter()
        .zip(&c.weights)
        .map(|(k, w)| (k.as_str(), (*w).max(1)))
        .collect();
    // The projection admits at most MAGLEV_TABLE_SIZE endpoints and weights >= 1 into a MAGLEV
    // image, and the size is prime: the builder cannot fail here. An empty table would send
    // every connect to the proxy rather than to a wrong host.
    crate::lb::maglev::table(&hosts, MAGLEV_TABLE_SIZE as usize).unwrap_or_else(|e| {
        tracing::error!(error = %e, "kernel maglev table");
        vec![u32::MAX; MAGLEV_TABLE_SIZE as usize]
    })
}

/// A stride coprime to `total` near `total / phi`: walking `cursor * stride mod total` visits
/// every unit of weight once per cycle while spreading neighbours apart.
pub(crate) fn rr_stride(total: u32) -> u32 {
    if total <= 2 {
        return 1;
    }
    let target = ((f64::from(total) * 0.618_033_988_75) as u32).clamp(1, total - 1);
    (0..total)
        .flat_map(|d| [target.saturating_add(d), target.saturating_sub(d)])
        .find(|s| *s >= 1 && *s < total && gcd(*s, total) == 1)
        .unwrap_or(1)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Writes the entries of one generation that differ from what it holds; returns how many
/// clusters, endpoints and maglev entries were written.
fn write_generation(
    maps: &mut impl FastMaps,
    held: &mut Generation,
    g: u8,
    caps: Capacity,
    clusters: &[ClusterValue],
    endpoints: &[EndpointValue],
    maglev: &[u32],
) -> Result<(usize, usize, usize), BpfError> {
    let mut written = (0, 0, 0);
    let n = endpoints.len().max(held.endpoints.len());
    for i in 0..n {
        let want = endpoints.get(i).copied().unwrap_or(EMPTY_ENDPOINT);
        if held.dirty || held.endpoints.get(i) != Some(&want) {
            maps.set_endpoint(u32::from(g) * caps.max_endpoints + i as u32, want)?;
            written.1 += 1;
        }
    }
    // Entries past the new tables are left as they are: no cluster of this generation points
    // at them.
    let base = u32::from(g) * caps.max_maglev * MAGLEV_TABLE_SIZE;
    for (i, want) in maglev.iter().enumerate() {
        if held.dirty || held.maglev.get(i) != Some(want) {
            maps.set_maglev(base + i as u32, *want)?;
            written.2 += 1;
        }
    }
    let n = clusters.len().max(held.clusters.len());
    for i in 0..n {
        let want = clusters.get(i).copied().unwrap_or(EMPTY_CLUSTER);
        if held.dirty || held.clusters.get(i) != Some(&want) {
            maps.set_cluster(u32::from(g) * caps.max_clusters + i as u32, want)?;
            written.0 += 1;
        }
    }
    held.clusters = clusters.to_vec();
    held.endpoints = endpoints.to_vec();
    held.maglev = maglev.to_vec();
    held.dirty = false;
    Ok(written)
}

/// Every endpoint a connect to `vip` can reach, read from map contents exactly as the kernel
/// walks them (through `skiff_common::pick_slot`), with how many draws reach it: round robin
/// over one full cursor cycle (`total_weight` draws when weighted, else one per slot), RANDOM
/// one draw per slot, LEAST_REQUEST every pair of draws at equal load, MAGLEV every table entry.
/// `None`: the connect goes to the proxy.
pub fn choices(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    clusters: &impl Fn(u32) -> Option<ClusterValue>,
    endpoints: &impl Fn(u32) -> Option<EndpointValue>,
    maglev: &impl Fn(u32) -> Option<u32>,
    active: u8,
    vip: SocketAddr,
) -> Option<(u8, BTreeMap<SocketAddr, u64>)> {
    choices_in(
        services, clusters, endpoints, maglev, active, NODE_SCOPE, vip,
    )
}

/// [`choices`] for a connect from a task whose cgroup is meshed with `scope`.
pub fn choices_in(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    clusters: &impl Fn(u32) -> Option<ClusterValue>,
    endpoints: &impl Fn(u32) -> Option<EndpointValue>,
    maglev: &impl Fn(u32) -> Option<u32>,
    active: u8,
    scope: ScopeId,
    vip: SocketAddr,
) -> Option<(u8, BTreeMap<SocketAddr, u64>)> {
    let svc = services.get(&ServiceKey::tcp_in(scope, vip))?;
    let idx = svc.cluster_idx[usize::from(active & 1)];
    if idx == NO_CLUSTER {
        return None;
    }
    let c = clusters(idx)?;
    if c.endpoint_count == 0 {
        return None;
    }
    struct Facts<'a, E, M> {
        c: ClusterValue,
        endpoints: &'a E,
        maglev: &'a M,
    }
    impl<E, M> skiff_common::SlotFacts for Facts<'_, E, M>
    where
        E: Fn(u32) -> Option<EndpointValue>,
        M: Fn(u32) -> Option<u32>,
    {
        fn weight_end(&self, offset: u32) -> Option<u32> {
            (self.endpoints)(self.c.slot_base.wrapping_add(offset)).map(|e| e.weight_end)
        }
        fn load(&self, _offset: u32) -> u64 {
            0
        }
        fn maglev(&self, entry: u32) -> Option<u32> {
            (self.maglev)(self.c.maglev_base.wrapping_add(entry))
        }
    }
    let facts = Facts {
        c,
        endpoints,
        maglev,
    };
    let mut draws: Vec<skiff_common::Draws> = Vec::new();
    let n = c.endpoint_count;
    match c.lb_policy {
        LB_ROUND_ROBIN => {
            let cycle = if c.flags & CLUSTER_WEIGHTED != 0 {
                c.total_weight
            } else {
                n
            };
            draws.extend((0..cycle).map(|rr_cursor| skiff_common::Draws {
                rr_cursor,
                ..Default::default()
            }));
        }
        LB_RANDOM => {
            let span = if c.flags & CLUSTER_SHARES != 0 {
                c.total_weight
            } else {
                n
            };
            draws.extend((0..span).map(|r| skiff_common::Draws {
                random: [r, 0],
                ..Default::default()
            }))
        }
        LB_LEAST_REQUEST => {
            for a in 0..n {
                for b in 0..n {
                    draws.push(skiff_common::Draws {
                        random: [a, b],
                        ..Default::default()
                    });
                }
            }
        }
        LB_MAGLEV => draws.extend((0..MAGLEV_TABLE_SIZE).map(|e| skiff_common::Draws {
            client_hash: u64::from(e),
            ..Default::default()
        })),
        _ => return None,
    }
    let mut out = BTreeMap::new();
    for d in &draws {
        let off = skiff_common::pick_slot(&c, d, &facts)?;
        let a = endpoints(c.slot_base + off)?.addr()?;
        // The kernel only rewrites a connect to an endpoint of the service's family.
        if a.is_ipv4() != vip.is_ipv4() {
            return None;
        }
        *out.entry(a).or_insert(0) += 1;
    }
    Some((c.lb_policy, out))
}

#[cfg(test)]
mod tests;
