//! Projection: which services the kernel may connect straight to an endpoint (pure).
//!
//! [`project`] turns one [`Snapshot`] into a [`MapImage`]: the IPv4 and IPv6 TCP services whose every
//! connection the proxy would hand, unchanged, to one STATIC or EDS cluster balanced by a
//! policy the kernel implements. A service is such a (VIP, port) when the listener that owns
//! it (the per-service listener `10.96.0.1_80`, else the `use_original_dst` virtual listener)
//! picks the same filter chain for every connection to it, and that chain is a plain
//! `tcp_proxy` to one cluster, with no other network filter and no transport socket.
//! Services are found where Istio puts them: `filter_chain_match` entries with a
//! `destination_port` and /32 `prefix_ranges`, and listeners bound to one VIP.
//!
//! UDP services are listeners bound to one IPv4 VIP with `socket_address.protocol: UDP` whose
//! `udp_proxy` listener filter sends every datagram to one cluster (same cluster rules): the
//! kernel's sendmsg4/connect4 send those datagrams straight to an endpoint. skiff's proxy
//! serves no UDP, so an ineligible UDP listener is served by nobody.
//!
//! Everything else stays out of the image and keeps going to the proxy; [`classify`] says why
//! (the same logic backs `/debug/explain`). The output is `BTreeMap`s: deterministic, and
//! independent of the order resources or endpoints arrived in.

use crate::dataplane::route;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::listener::{TcpProxy, UdpProxy};
use crate::model::{ClusterKind, ClusterSpecifier, FilterChain, LbPolicy, Listener, NetworkAction};
use crate::state::Snapshot;

/// Balancing policies the kernel implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FastLb {
    /// ROUND_ROBIN (a per-CPU cursor per cluster).
    RoundRobin,
    /// RANDOM (`bpf_get_prandom_u32`; weights ignored, as Envoy does).
    Random,
    /// LEAST_REQUEST: power of two choices over the endpoints' load (equal weights only).
    LeastRequest,
    /// MAGLEV: a table of [`skiff_common::MAGLEV_TABLE_SIZE`] entries built in userspace,
    /// indexed by the client's hash.
    Maglev,
}

impl FastLb {
    /// Envoy's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FastLb::RoundRobin => "ROUND_ROBIN",
            FastLb::Random => "RANDOM",
            FastLb::LeastRequest => "LEAST_REQUEST",
            FastLb::Maglev => "MAGLEV",
        }
    }
}

/// One fast-path service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceImage {
    /// Cluster its connections go to.
    pub cluster: String,
    /// Listener and filter chain that led there (for explain).
    pub listener: String,
    /// Filter chain name.
    pub filter_chain: String,
}

/// One cluster used by fast-path services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterImage {
    /// Policy.
    pub lb: FastLb,
    /// Healthy endpoints, sorted (the slot order).
    pub endpoints: Vec<SocketAddr>,
    /// `load_balancing_weight` of each endpoint (same order as `endpoints`); with `shares`,
    /// its eligible share in units of 1/[`SHARE_SCALE`].
    pub weights: Vec<u32>,
    /// The weights are eligible shares (priority levels, panic or locality weights): every
    /// policy draws by weight.
    pub shares: bool,
}

/// Resolution of eligible shares written as slot weights (1/10000).
pub const SHARE_SCALE: u32 = 10_000;

impl ClusterImage {
    /// Whether the endpoints' weights differ (weighted policies then search by weight).
    pub fn weighted(&self) -> bool {
        self.shares || self.weights.windows(2).any(|w| w[0] != w[1])
    }
}

/// What the kernel fast-path maps should hold for one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapImage {
    /// Services by VIP:port (TCP), IPv4 and IPv6.
    pub services: BTreeMap<SocketAddr, ServiceImage>,
    /// Clusters by name; a cluster's id is its position in this map.
    pub clusters: BTreeMap<String, ClusterImage>,
    /// Every candidate service found and why it is (not) in the image.
    pub verdicts: BTreeMap<SocketAddr, Verdict>,
    /// UDP services by VIP:port (IPv4 only: there is no sendmsg6/recvmsg6 program yet).
    pub udp_services: BTreeMap<SocketAddr, ServiceImage>,
    /// Every UDP listener found and why it is (not) in the image.
    pub udp_verdicts: BTreeMap<SocketAddr, Verdict>,
}

impl MapImage {
    /// Cluster id (position in `clusters`) by name.
    pub fn cluster_id(&self, name: &str) -> Option<u32> {
        self.clusters
            .keys()
            .position(|n| n == name)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// Total endpoint slots.
    pub fn endpoint_slots(&self) -> usize {
        self.clusters.values().map(|c| c.endpoints.len()).sum()
    }

    /// The largest image within `max_services` / `max_clusters` / `max_endpoints` that keeps
    /// whole services (in VIP order), and, if something was left out, a message naming the
    /// limit. Services left out go to the proxy.
    pub fn fit(
        &self,
        max_services: usize,
        max_clusters: usize,
        max_endpoints: usize,
        max_maglev: usize,
    ) -> (MapImage, Option<String>) {
        let mut out = MapImage {
            verdicts: self.verdicts.clone(),
            udp_verdicts: self.udp_verdicts.clone(),
            ..Default::default()
        };
        let mut slots = 0usize;
        let mut maglev = 0usize;
        let mut dropped: BTreeMap<&'static str, usize> = BTreeMap::new();
        // TCP services first, then UDP ones: both share the service map.
        let all = self
            .services
            .iter()
            .map(|s| (false, s))
            .chain(self.udp_services.iter().map(|s| (true, s)));
        for (is_udp, (vip, svc)) in all {
            let Some(cluster) = self.clusters.get(&svc.cluster) else {
                continue;
            };
            let new_cluster = !out.clusters.contains_key(&svc.cluster);
            let limit = if out.services.len() + out.udp_services.len() >= max_services {
                Some("max_services")
            } else if new_cluster && out.clusters.len() >= max_clusters {
                Some("max_clusters")
            } else if new_cluster && slots + cluster.endpoints.len() > max_endpoints {
                Some("max_endpoints")
            } else if new_cluster && cluster.lb == FastLb::Maglev && maglev >= max_maglev {
                Some("max_maglev")
            } else {
                None
            };
            if let Some(limit) = limit {
                *dropped.entry(limit).or_default() += 1;
                let verdicts = if is_udp {
                    &mut out.udp_verdicts
                } else {
                    &mut out.verdicts
                };
                verdicts.insert(
                    *vip,
                    Verdict::proxy(format!("kernel map capacity ({limit}) exceeded")),
                );
                continue;
            }
            if new_cluster {
                slots += cluster.endpoints.len();
                maglev += usize::from(cluster.lb == FastLb::Maglev);
                out.clusters.insert(svc.cluster.clone(), cluster.clone());
            }
            if is_udp {
                out.udp_services.insert(*vip, svc.clone());
            } else {
                out.services.insert(*vip, svc.clone());
            }
        }
        let msg = (!dropped.is_empty()).then(|| {
            let parts: Vec<String> = dropped
                .iter()
                .map(|(limit, n)| format!("{n} service(s) over {limit}"))
                .collect();
            format!(
                "kernel fast path: image does not fit (max_services {max_services}, max_clusters \
                 {max_clusters}, max_endpoints {max_endpoints}, max_maglev {max_maglev}; needs {} \
                 services, {} clusters, {} endpoints, {} maglev tables): {}; those services are \
                 served by the proxy",
                self.services.len() + self.udp_services.len(),
                self.clusters.len(),
                self.endpoint_slots(),
                self.clusters
                    .values()
                    .filter(|c| c.lb == FastLb::Maglev)
                    .count(),
                parts.join(", ")
            )
        });
        (out, msg)
    }
}

/// Where connections to one destination go, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `true`: the kernel connects straight to an endpoint of `cluster`.
    pub fast: bool,
    /// Human-readable reason.
    pub reason: String,
    /// Listener that owns the destination, if any.
    pub listener: Option<String>,
    /// Filter chain, when a single one applies.
    pub filter_chain: Option<String>,
    /// Cluster, when a single one applies.
    pub cluster: Option<String>,
}

impl Verdict {
    fn proxy(reason: impl Into<String>) -> Self {
        Verdict {
            fast: false,
            reason: reason.into(),
            listener: None,
            filter_chain: None,
            cluster: None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.fast { "kernel" } else { "proxy" };
        write!(f, "{path}: {}", self.reason)
    }
}

/// Projects a snapshot. `capture_port` finds the virtual listener (Istio's 15001).
pub fn project(snap: &Snapshot, capture_port: u16) -> MapImage {
    let mut image = MapImage::default();
    let index = snap.virtual_listener(capture_port).map(ChainIndex::new);
    for dst in candidates(snap, capture_port) {
        let (mut verdict, cluster) = classify_with(snap, capture_port, dst, index.as_ref());
        let cluster = one_policy(&image, &mut verdict, cluster);
        if let (true, vip, Some(c)) = (verdict.fast, dst, cluster) {
            let name = verdict.cluster.clone().unwrap_or_default();
            image.services.insert(
                vip,
                ServiceImage {
                    cluster: name.clone(),
                    listener: verdict.listener.clone().unwrap_or_default(),
                    filter_chain: verdict.filter_chain.clone().unwrap_or_default(),
                },
            );
            image.clusters.insert(name, c);
        }
        image.verdicts.insert(dst, verdict);
    }
    for l in snap.listeners.values() {
        let Some(udp) = &l.udp else {
            continue;
        };
        let dst = l.address;
        if dst.ip().is_loopback() || dst.ip().is_unspecified() || dst.port() == 0 {
            continue;
        }
        let (mut verdict, cluster) = classify_udp(snap, l, udp);
        let cluster = one_policy(&image, &mut verdict, cluster);
        if let (true, Some(c), Some(name)) = (verdict.fast, cluster, verdict.cluster.clone()) {
            image.udp_services.insert(
                dst,
                ServiceImage {
                    cluster: name.clone(),
                    listener: l.name.clone(),
                    filter_chain: String::new(),
                },
            );
            image.clusters.insert(name, c);
        }
        image.udp_verdicts.insert(dst, verdict);
    }
    image
}

/// The kernel holds one image per cluster: a cluster one service reaches hashed (MAGLEV) and
/// another unhashed (RANDOM) keeps the later service in the proxy.
fn one_policy(
    image: &MapImage,
    v: &mut Verdict,
    cluster: Option<ClusterImage>,
) -> Option<ClusterImage> {
    let c = cluster?;
    let name = v.cluster.as_deref().unwrap_or_default();
    match image.clusters.get(name) {
        Some(other) if v.fast && other.lb != c.lb => {
            v.fast = false;
            v.reason = format!(
                "cluster {name} is already in the kernel as {} and this service needs {} (a \
                 tcp_proxy hash_policy differs): stays in the proxy",
                other.lb.as_str(),
                c.lb.as_str()
            );
            None
        }
        _ => Some(c),
    }
}

/// Whether datagrams to a UDP listener's address take the kernel fast path: an IPv4 VIP
/// whose `udp_proxy` sends every datagram, unchanged, to one eligible cluster.
pub fn classify_udp(
    snap: &Snapshot,
    listener: &Listener,
    udp: &UdpProxy,
) -> (Verdict, Option<ClusterImage>) {
    let dst = listener.address;
    let mut v = Verdict::proxy(String::new());
    v.listener = Some(listener.name.clone());
    if !dst.is_ipv4() {
        v.reason = "UDP service on IPv6: no sendmsg6/recvmsg6 fast path (not served)".into();
        return (v, None);
    }
    let Some(name) = &udp.cluster else {
        v.reason =
            "udp_proxy matcher routes per datagram (not served: the proxy has no UDP)".into();
        return (v, None);
    };
    if !udp.extras.is_empty() {
        v.cluster = Some(name.clone());
        v.reason = format!(
            "udp_proxy uses {} (not served: the proxy has no UDP)",
            udp.extras.join(", ")
        );
        return (v, None);
    }
    let (mut v, c) = cluster_image(snap, name, dst, v, "udp_proxy", None);
    if !v.fast {
        // Unlike TCP, nothing else serves it: say so.
        v.reason = format!("{} (UDP: not served, the proxy has no UDP)", v.reason);
    }
    (v, c)
}

/// Destinations that look like services: /32 (/128) chain matches with a port on the virtual
/// listener, and listeners bound to one address.
fn candidates(snap: &Snapshot, capture_port: u16) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if let Some(vl) = snap.virtual_listener(capture_port) {
        for fc in &vl.filter_chains {
            let Some(port) = fc.matcher.destination_port else {
                continue;
            };
            for c in &fc.matcher.prefix_ranges {
                if u32::from(c.len) == host_len(c.addr) {
                    out.push(SocketAddr::new(c.addr, port));
                }
            }
        }
    }
    for l in snap.listeners.values() {
        if l.internal.is_none()
            && l.udp.is_none()
            && !l.address.ip().is_unspecified()
            && l.address.port() != 0
        {
            out.push(l.address);
        }
    }
    out.retain(|d| !d.ip().is_loopback() && !d.ip().is_unspecified());
    out.sort();
    out.dedup();
    out
}

fn host_len(ip: IpAddr) -> u32 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Why connections to `dst` do or do not take the kernel fast path, with the cluster image
/// when they do. Asks the data plane's own selection (`dataplane::route`): the listener that
/// owns `dst` ([`route::owner`]), then the filter chain, which must not depend on anything but
/// the destination ([`route::chain_for_destination`]).
pub fn classify(
    snap: &Snapshot,
    capture_port: u16,
    dst: SocketAddr,
) -> (Verdict, Option<ClusterImage>) {
    classify_with(snap, capture_port, dst, None)
}

/// The virtual listener's filter chains by host address. A chain whose prefix ranges are all
/// host addresses (/32, /128) matches no other destination, so a destination needs only its own
/// bucket and the remaining chains: `project` stays linear in the number of services instead of
/// matching every service against every chain.
struct ChainIndex<'a> {
    listener: &'a Listener,
    by_host: HashMap<IpAddr, Vec<usize>>,
    rest: Vec<usize>,
}

impl<'a> ChainIndex<'a> {
    fn new(listener: &'a Arc<Listener>) -> ChainIndex<'a> {
        let mut by_host: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        let mut rest = Vec::new();
        for (i, fc) in listener.filter_chains.iter().enumerate() {
            let ranges = &fc.matcher.prefix_ranges;
            if !ranges.is_empty() && ranges.iter().all(|c| u32::from(c.len) == host_len(c.addr)) {
                for c in ranges {
                    let bucket = by_host.entry(c.addr).or_default();
                    if bucket.last() != Some(&i) {
                        bucket.push(i);
                    }
                }
            } else {
                rest.push(i);
            }
        }
        ChainIndex {
            listener,
            by_host,
            rest,
        }
    }

    /// The chains that can match `ip`, in configuration order.
    fn chains_for(&self, ip: IpAddr) -> Vec<&'a FilterChain> {
        let mut idx: Vec<usize> = self.rest.clone();
        if let Some(b) = self.by_host.get(&ip) {
            idx.extend_from_slice(b);
            idx.sort_unstable();
        }
        idx.into_iter()
            .map(|i| &self.listener.filter_chains[i])
            .collect()
    }
}

fn classify_with(
    snap: &Snapshot,
    capture_port: u16,
    dst: SocketAddr,
    index: Option<&ChainIndex<'_>>,
) -> (Verdict, Option<ClusterImage>) {
    let Some(listener) = route::owner(snap, dst, capture_port) else {
        return (
            Verdict::proxy("no listener owns this destination (passthrough)"),
            None,
        );
    };
    let mut v = Verdict::proxy(String::new());
    v.listener = Some(listener.name.clone());
    let found = match index {
        Some(ix) if std::ptr::eq(ix.listener, &**listener) => {
            route::chain_for_destination(ix.chains_for(dst.ip()), dst)
        }
        _ => route::chain_for_destination(&listener.filter_chains, dst),
    };
    let chain = match found {
        Ok(Some(c)) => c,
        Ok(None) => match &listener.default_filter_chain {
            Some(c) => c,
            None => {
                v.reason = "no filter chain matches (the proxy closes the connection)".into();
                return (v, None);
            }
        },
        Err(why) => {
            v.reason = why.to_string();
            return (v, None);
        }
    };
    v.filter_chain = Some(chain.name.clone());
    let tcp = match &chain.action {
        NetworkAction::TcpProxy(t) => t,
        NetworkAction::Http(_) => {
            v.reason = "HTTP connection manager: L7 stays in the proxy".into();
            return (v, None);
        }
        NetworkAction::Unsupported { name, .. } => {
            v.reason = format!("network filter {name} runs in the proxy");
            return (v, None);
        }
    };
    if chain.tls.is_some() {
        v.reason = "filter chain terminates TLS (transport_socket)".into();
        return (v, None);
    }
    if !chain.filters.is_empty() {
        v.reason = format!(
            "network filters before tcp_proxy: {}",
            chain.filters.join(", ")
        );
        return (v, None);
    }
    let name = match &tcp.cluster {
        ClusterSpecifier::Cluster(c) => c,
        ClusterSpecifier::Weighted(_) => {
            v.reason = "tcp_proxy weighted_clusters".into();
            return (v, None);
        }
    };
    cluster_image(snap, name, dst, v, "plain tcp_proxy", Some(tcp))
}

/// Whether `name` can be balanced by the kernel for a service at `dst`, and its slots: `v`
/// comes back with the cluster and the reason filled in; `what` names the proxy filter in the
/// reason. `tcp` is the tcp_proxy in front of it: without a hash policy the proxy's MAGLEV
/// picks at random ([`route::tcp_hashes`]), so the kernel does too.
fn cluster_image(
    snap: &Snapshot,
    name: &str,
    dst: SocketAddr,
    mut v: Verdict,
    what: &str,
    tcp: Option<&TcpProxy>,
) -> (Verdict, Option<ClusterImage>) {
    v.cluster = Some(name.to_string());
    let Some(entry) = snap.cluster(name) else {
        v.reason = format!("unknown cluster {name}");
        return (v, None);
    };
    let c = &entry.cluster;
    if c.transport.may_use_tls() {
        v.reason = format!("cluster {name} dials TLS (transport_socket)");
        return (v, None);
    }
    if !matches!(c.kind, ClusterKind::Static(_) | ClusterKind::Eds { .. }) {
        v.reason = format!("cluster {name} is {} (not STATIC or EDS)", c.kind.as_str());
        return (v, None);
    }
    let lb = match c.lb_policy {
        LbPolicy::RoundRobin => FastLb::RoundRobin,
        LbPolicy::Random => FastLb::Random,
        LbPolicy::LeastRequest => FastLb::LeastRequest,
        // No hash: a random hash into the Maglev table, i.e. a random host by weight, which
        // is RANDOM drawing by weight (`shares` below).
        LbPolicy::Maglev if tcp.is_some_and(|t| !route::tcp_hashes(t, c.lb_policy)) => {
            FastLb::Random
        }
        LbPolicy::Maglev => FastLb::Maglev,
        other => {
            v.reason = format!(
                "cluster {name}: lb_policy {} is not implemented in the kernel",
                other.as_str()
            );
            return (v, None);
        }
    };
    let unhashed_maglev = c.lb_policy == LbPolicy::Maglev && lb == FastLb::Random;
    let label = if unhashed_maglev {
        "MAGLEV without a source_ip hash_policy: RANDOM by weight"
    } else {
        lb.as_str()
    };
    // The hosts new connections may reach and their shares, exactly as the userspace balancer
    // computes them (priority load, panic, degraded hosts, locality weights, host weights).
    let plan = entry.lb.plan();
    if plan.zone.is_some() {
        v.reason = format!("cluster {name}: zone-aware routing stays in the proxy");
        return (v, None);
    }
    let (views, _) = entry.lb.views();
    let eligible = crate::lb::plan::eligible(&plan, &views);
    if eligible.is_empty() {
        v.reason = format!("cluster {name} has no healthy endpoint (the proxy answers)");
        return (v, None);
    }
    // Load that reaches no host (a level with nowhere to send its share) is answered by the
    // proxy; the kernel would spread it over the other hosts instead.
    let reachable: f64 = eligible.iter().map(|e| e.share).sum();
    if reachable < 0.999 {
        v.reason = format!(
            "cluster {name}: {:.0}% of the load has no available host (the proxy answers it)",
            (1.0 - reachable) * 100.0
        );
        return (v, None);
    }
    // One level, no panic, no degraded load and no locality weights: the hosts are balanced by
    // their own weights. Otherwise the slots carry the eligible shares and every draw is by
    // weight, which reproduces the priority and locality split in one bounded draw.
    let simple = plan.levels.len() <= 1
        && !plan.load.panic.iter().any(|p| *p)
        && plan.load.degraded.iter().all(|d| *d == 0)
        && plan
            .levels
            .iter()
            .all(|l| l.healthy_localities.is_none() && l.degraded_localities.is_none());
    if !simple && (unhashed_maglev || matches!(lb, FastLb::LeastRequest | FastLb::Maglev)) {
        v.reason = format!(
            "cluster {name}: {} across priority levels, panic or locality weights stays in the \
             proxy",
            label
        );
        return (v, None);
    }
    if lb == FastLb::LeastRequest
        && eligible
            .iter()
            .any(|e| views[e.index as usize].weight != views[eligible[0].index as usize].weight)
    {
        v.reason = format!(
            "cluster {name}: LEAST_REQUEST with unequal weights (Envoy's weighted least request \
             stays in the proxy)"
        );
        return (v, None);
    }
    if lb == FastLb::Maglev && eligible.len() > skiff_common::MAGLEV_TABLE_SIZE as usize {
        v.reason = format!(
            "cluster {name}: MAGLEV with more than {} endpoints (the kernel table size)",
            skiff_common::MAGLEV_TABLE_SIZE
        );
        return (v, None);
    }
    if eligible.len() > 1 << skiff_common::MAX_SEARCH_STEPS {
        v.reason = format!("cluster {name}: more endpoints than the kernel search covers");
        return (v, None);
    }
    let mut slots: Vec<(SocketAddr, u32)> = Vec::with_capacity(eligible.len());
    for e in &eligible {
        let weight = if simple {
            views[e.index as usize].weight.max(1)
        } else {
            ((e.share * f64::from(SHARE_SCALE)).round() as u32).max(1)
        };
        // connect4 can only rewrite to an IPv4 address, connect6 to an IPv6 one.
        let a = entry.lb.hosts[e.index as usize].address();
        if a.is_ipv4() != dst.is_ipv4() {
            v.reason =
                format!("cluster {name}: endpoint {a} is not of the service's address family");
            return (v, None);
        }
        slots.push((a, weight));
    }
    slots.sort();
    let total: u64 = slots.iter().map(|(_, w)| u64::from(*w)).sum();
    if total > u64::from(u32::MAX) {
        v.reason = format!("cluster {name}: total endpoint weight exceeds 2^32");
        return (v, None);
    }
    let (endpoints, weights): (Vec<SocketAddr>, Vec<u32>) = slots.into_iter().unzip();
    // Unequal weights: RANDOM draws by them (the Maglev table's proportions).
    let shares = !simple || (unhashed_maglev && weights.windows(2).any(|w| w[0] != w[1]));
    v.fast = true;
    v.reason = format!(
        "{what} to {} cluster {name} ({}, {} healthy endpoints)",
        c.kind.as_str(),
        label,
        endpoints.len()
    );
    (
        v,
        Some(ClusterImage {
            lb,
            endpoints,
            weights,
            shares,
        }),
    )
}

#[cfg(test)]
mod tests;
