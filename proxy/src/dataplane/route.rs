//! Selection, pure over one snapshot: which listener owns a connection ([`listener_for`],
//! [`owner`]), which of its filter chains applies ([`select_chain`]), and what that chain does
//! with the connection ([`select`] -> [`Route`], down to the cluster and host for tcp_proxy).
//! The BPF projection asks the same functions ([`owner`], [`chain_for_destination`]) which
//! destinations the kernel may serve, so the two can never disagree.
//!
//! Envoy narrows the candidate chains one criterion at a time, in a fixed order: destination
//! port, destination IP, server name, transport protocol, application protocols, direct source
//! IP, source type, source IP, source port. At each step the most specific non-empty match wins
//! and chains without that criterion are used only when nothing matched it; Envoy never backs
//! up to a less specific choice later. No chain left means the default chain (or none).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use super::ListenerRole;
use super::error::ConnError;
use crate::addr::{EndpointAddr, OrigDstAddr};
use crate::lb::{self, Host};
use crate::model::listener::{HttpManager, SourceType, TcpProxy};
use crate::model::{
    Cidr, ClusterKind, ClusterSpecifier, FilterChain, Listener, NetworkAction, canonical_addr,
};
use crate::state::{ClusterEntry, Snapshot};

/// What is known about a connection when its filter chain and upstream are chosen.
#[derive(Debug, Clone)]
pub struct ConnFacts<'a> {
    /// Destination (the original destination for redirected connections).
    pub dst: SocketAddr,
    /// Original destination, when capture redirected the connection (ORIGINAL_DST clusters,
    /// passthrough).
    pub orig_dst: Option<OrigDstAddr>,
    /// Peer address.
    pub src: SocketAddr,
    /// Direct peer address (the same as `src` without PROXY protocol).
    pub direct_src: SocketAddr,
    /// SNI, if a listener filter found one.
    pub server_name: Option<&'a str>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: &'a str,
    /// Detected application protocols (ALPN or `http/1.1`/`h2c` from HTTP inspection).
    pub application_protocols: &'a [String],
}

// === listeners ===

/// The listener that owns a connection to `dst`, Envoy's way: the one bound to `dst` (exact
/// `ip:port`, else the wildcard address of its family on that port), else the
/// `use_original_dst` listener on the capture port (Istio's virtualOutbound).
pub fn owner(snap: &Snapshot, dst: SocketAddr, capture_port: u16) -> Option<&Arc<Listener>> {
    snap.listener_for(dst)
        .or_else(|| snap.virtual_listener(capture_port))
}

/// The listener that serves inbound connections (Istio's virtualInbound): the one named
/// `virtualInbound` on the inbound port, else any TCP listener on that port.
pub fn inbound_listener(snap: &Snapshot, port: u16) -> Option<&Arc<Listener>> {
    snap.listeners
        .values()
        .find(|l| l.name == "virtualInbound" && l.address.port() == port)
        .or_else(|| {
            snap.listeners
                .values()
                .find(|l| l.udp.is_none() && l.address.port() == port)
        })
}

/// The listener that serves a connection accepted by a listener of `role`; `redirected` is its
/// original destination when capture redirected it elsewhere than the accepting socket.
/// Outbound and static listeners hand a redirected connection to the listener on its
/// destination (Envoy's `use_original_dst`); the inbound listener never does: that would be an
/// outbound listener.
pub fn listener_for<'s>(
    snap: &'s Snapshot,
    role: &ListenerRole,
    redirected: Option<SocketAddr>,
    capture_port: u16,
) -> Option<&'s Arc<Listener>> {
    match (role, redirected) {
        (ListenerRole::Capture, Some(dst)) => owner(snap, dst, capture_port),
        (ListenerRole::Capture, None) => snap.virtual_listener(capture_port),
        (ListenerRole::Static { name }, dst) => dst
            .and_then(|d| snap.listener_for(d))
            .or_else(|| snap.listeners.get(name)),
        (ListenerRole::Inbound { port }, _) => inbound_listener(snap, *port),
    }
}

// === filter chains ===

/// Where a chain sits in its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainId {
    /// `filter_chains[i]`.
    At(usize),
    /// `default_filter_chain`.
    Default,
}

/// A filter chain a connection was given, kept alive by its listener's `Arc` so the
/// connection holds on to it (not to the whole snapshot) for its life.
#[derive(Debug, Clone)]
pub struct Chain {
    listener: Arc<Listener>,
    id: ChainId,
}

impl Chain {
    /// The chain `id` of `listener`, if it has one.
    pub fn new(listener: Arc<Listener>, id: ChainId) -> Option<Chain> {
        let exists = match id {
            ChainId::At(i) => i < listener.filter_chains.len(),
            ChainId::Default => listener.default_filter_chain.is_some(),
        };
        exists.then_some(Chain { listener, id })
    }

    /// The listener.
    pub fn listener(&self) -> &Arc<Listener> {
        &self.listener
    }

    /// Where the chain sits in the listener.
    pub fn id(&self) -> ChainId {
        self.id
    }

    /// The chain.
    pub fn get(&self) -> &FilterChain {
        // `new` checked that the chain exists, and the listener behind the Arc never changes.
        match self.id {
            ChainId::At(i) => &self.listener.filter_chains[i],
            ChainId::Default => self
                .listener
                .default_filter_chain
                .as_ref()
                .expect("Chain::new checked the default chain exists"),
        }
    }
}

/// A filter chain under consideration, with whatever the caller tracks beside it.
trait Candidate: Copy {
    /// The chain.
    fn chain(&self) -> &FilterChain;
}

impl Candidate for &FilterChain {
    fn chain(&self) -> &FilterChain {
        self
    }
}

impl Candidate for (usize, &FilterChain) {
    fn chain(&self) -> &FilterChain {
        self.1
    }
}

/// Pick the filter chain for a connection, or `None` (Envoy closes such connections).
pub fn select_chain<'l>(
    listener: &'l Listener,
    facts: &ConnFacts<'_>,
) -> Option<(ChainId, &'l FilterChain)> {
    let c = by_destination(listener.filter_chains.iter().enumerate(), facts.dst);
    match by_connection(c, facts).first() {
        Some((i, fc)) => Some((ChainId::At(*i), *fc)),
        None => listener
            .default_filter_chain
            .as_ref()
            .map(|fc| (ChainId::Default, fc)),
    }
}

/// Envoy's first two steps: destination port (exact, else chains without a port), then
/// destination IP (longest matching prefix, else chains without prefixes).
fn by_destination<C: Candidate>(chains: impl IntoIterator<Item = C>, dst: SocketAddr) -> Vec<C> {
    let dst = canonical_addr(dst);
    let c = narrow(chains.into_iter().collect(), |fc| {
        match fc.matcher.destination_port {
            Some(p) if p == dst.port() => Some(1),
            Some(_) => None,
            None => Some(0),
        }
    });
    narrow(c, |fc| longest_prefix(&fc.matcher.prefix_ranges, dst.ip()))
}

/// The steps after the destination: server name, transport and application protocols,
/// direct source IP, source type, source IP, source port.
fn by_connection<C: Candidate>(c: Vec<C>, facts: &ConnFacts<'_>) -> Vec<C> {
    let dst = canonical_addr(facts.dst);
    let src = canonical_addr(facts.src);
    let direct_src = canonical_addr(facts.direct_src);
    // 3. server names: exact > wildcard suffix (longer first) > none.
    let c = narrow(c, |fc| {
        server_name_score(&fc.matcher.server_names, facts.server_name)
    });
    // 4. transport protocol.
    let c = narrow(c, |fc| match fc.matcher.transport_protocol.as_str() {
        "" => Some(0),
        t if t == facts.transport_protocol => Some(1),
        _ => None,
    });
    // 5. application protocols: the client's first protocol some chain lists, else chains
    // without.
    let c = narrow(c, |fc| {
        application_protocol_score(
            &fc.matcher.application_protocols,
            facts.application_protocols,
        )
    });
    // 6. direct source IP.
    let c = narrow(c, |fc| {
        longest_prefix(&fc.matcher.direct_source_prefix_ranges, direct_src.ip())
    });
    // 7. source type.
    let local = src.ip().is_loopback() || src.ip() == dst.ip();
    let c = narrow(c, |fc| match fc.matcher.source_type {
        SourceType::Any => Some(0),
        SourceType::SameIpOrLoopback if local => Some(1),
        SourceType::External if !local => Some(1),
        _ => None,
    });
    // 8. source IP.
    let c = narrow(c, |fc| {
        longest_prefix(&fc.matcher.source_prefix_ranges, src.ip())
    });
    // 9. source port.
    narrow(c, |fc| {
        if fc.matcher.source_ports.is_empty() {
            Some(0)
        } else if fc.matcher.source_ports.contains(&src.port()) {
            Some(1)
        } else {
            None
        }
    })
}

/// Why the chain for a destination depends on more than the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ambiguous<'l> {
    /// The one chain left also matches on SNI, protocol or source (so other connections to
    /// the destination get the default chain).
    MoreCriteria(&'l str),
    /// Several chains are left; later criteria choose between them.
    Several(usize),
}

impl fmt::Display for Ambiguous<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ambiguous::MoreCriteria(name) => write!(
                f,
                "filter chain {name} also matches on SNI, protocol or source"
            ),
            Ambiguous::Several(n) => write!(
                f,
                "{n} filter chains match this destination; the choice depends on SNI, protocol or source"
            ),
        }
    }
}

/// The chain Envoy picks for every connection to `dst` whatever else the connection brings
/// (what the kernel fast path needs): `Ok(Some)` that chain, `Ok(None)` none matches (the
/// default chain applies), `Err` when SNI, transport or application protocol or the source
/// also decide. `chains` may be any subset that contains every chain that can match `dst`.
pub fn chain_for_destination<'l>(
    chains: impl IntoIterator<Item = &'l FilterChain>,
    dst: SocketAddr,
) -> Result<Option<&'l FilterChain>, Ambiguous<'l>> {
    match by_destination(chains, dst).as_slice() {
        [] => Ok(None),
        [one] => {
            let one: &'l FilterChain = one;
            let m = &one.matcher;
            if !m.server_names.is_empty()
                || !m.transport_protocol.is_empty()
                || !m.application_protocols.is_empty()
                || !m.direct_source_prefix_ranges.is_empty()
                || m.source_type != SourceType::Any
                || !m.source_prefix_ranges.is_empty()
                || !m.source_ports.is_empty()
            {
                Err(Ambiguous::MoreCriteria(&one.name))
            } else {
                Ok(Some(one))
            }
        }
        many => Err(Ambiguous::Several(many.len())),
    }
}

/// Keep the chains with the highest score; `None` drops a chain. In place: selection runs
/// once per connection, and the nine steps would otherwise allocate twice each.
fn narrow<C: Candidate>(mut chains: Vec<C>, score: impl Fn(&FilterChain) -> Option<u32>) -> Vec<C> {
    match chains.iter().filter_map(|c| score(c.chain())).max() {
        Some(best) => chains.retain(|c| score(c.chain()) == Some(best)),
        None => chains.clear(),
    }
    chains
}

/// Score for prefix criteria: 0 when the chain has none, 1 + length of the longest match.
fn longest_prefix(ranges: &[Cidr], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|c| c.contains(ip))
        .map(|c| 1 + u32::from(c.len))
        .max()
}

/// Envoy's server name match: the exact name first, then wildcards from the most specific
/// (`*.b.example.com` before `*.example.com`), then chains without server names. Only a
/// leading `*.` is a wildcard (Envoy refuses partial ones); it never matches the bare suffix
/// (`*.example.com` does not match `example.com`). DNS names compare case-insensitively.
fn server_name_score(names: &[String], sni: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|n| {
            if n.eq_ignore_ascii_case(sni) {
                Some(u32::MAX)
            } else if let Some(suffix) = n.strip_prefix('*').filter(|s| s.starts_with('.')) {
                // The label the wildcard stands for must not be empty.
                let label_len = sni.len().checked_sub(suffix.len())?;
                (label_len > 0
                    && sni.is_char_boundary(label_len)
                    && sni[label_len..].eq_ignore_ascii_case(suffix))
                .then_some(1 + suffix.len() as u32)
            } else {
                None
            }
        })
        .max()
}

/// Envoy's application protocol match: the client's protocols are tried in the client's
/// order, and the first one any chain lists selects the chains that list it; a chain listing
/// none of them only matches when no chain lists any (then chains without protocols win).
fn application_protocol_score(listed: &[String], offered: &[String]) -> Option<u32> {
    if listed.is_empty() {
        return Some(0);
    }
    offered
        .iter()
        .position(|p| listed.contains(p))
        .map(|i| u32::try_from(offered.len() - i).unwrap_or(u32::MAX))
}

// === routes ===

/// What a connection's filter chain does with it.
#[derive(Debug)]
pub enum Route {
    /// tcp_proxy: copy bytes to one upstream.
    TcpProxy(TcpRoute),
    /// The HTTP connection manager serves the connection.
    Http {
        /// The chain.
        chain: Chain,
        /// Its HCM settings (the connection keeps them, as Envoy's does, whatever later
        /// snapshots say).
        manager: Arc<HttpManager>,
    },
    /// No listener owns the destination: connect straight to it (Envoy's passthrough).
    Passthrough(EndpointAddr),
    /// Close the connection.
    Reject(ConnError),
}

/// A tcp_proxy decision: the chain, the cluster and where in it to connect. The cluster
/// entry and host are the ones chosen: the tcp_proxy step takes its breaker slot, counts the
/// connection and reports the outcome on exactly these, without looking anything up again.
#[derive(Debug)]
pub struct TcpRoute {
    /// The chain that chose the cluster.
    pub chain: Chain,
    /// The cluster.
    pub cluster: Arc<ClusterEntry>,
    /// Where to connect.
    pub target: Target,
    /// The hash the balancer picked with (tcp_proxy's `hash_policy`); further connect
    /// attempts pick with it too.
    pub hash: Option<u64>,
}

/// Where a tcp_proxy connection goes within its cluster.
#[derive(Debug, Clone)]
pub enum Target {
    /// A host the balancer chose (STATIC, EDS).
    Host(Arc<Host>),
    /// The connection's original destination (ORIGINAL_DST).
    OriginalDst(EndpointAddr),
    /// A name resolved when connecting (STRICT_DNS, LOGICAL_DNS).
    Dns {
        /// Host name.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Target {
    /// The balancer's host, when there is one (outlier outcomes, active connections).
    pub fn host(&self) -> Option<&Arc<Host>> {
        match self {
            Target::Host(h) => Some(h),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Host(h) => fmt::Display::fmt(&h.address(), f),
            Target::OriginalDst(a) => fmt::Display::fmt(a, f),
            Target::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Route one connection served by `listener` (`None`: no listener owns it): filter chain,
/// then the chain's terminal filter, then for tcp_proxy the cluster and host. Pure over `snap`
/// apart from balancer cursors (`weighted` for `weighted_clusters`, the cluster's own).
pub fn select(
    snap: &Snapshot,
    listener: Option<&Arc<Listener>>,
    facts: &ConnFacts<'_>,
    weighted: &AtomicUsize,
) -> Route {
    let Some(listener) = listener else {
        return match facts.orig_dst {
            Some(o) => Route::Passthrough(o.into()),
            None => Route::Reject(ConnError::NoListener),
        };
    };
    let Some((id, fc)) = select_chain(listener, facts) else {
        return Route::Reject(ConnError::NoFilterChain {
            listener: listener.name.clone(),
        });
    };
    let Some(chain) = Chain::new(listener.clone(), id) else {
        // select_chain only returns chains of this listener.
        return Route::Reject(ConnError::NoFilterChain {
            listener: listener.name.clone(),
        });
    };
    match &fc.action {
        NetworkAction::Http(h) => Route::Http {
            chain,
            manager: h.clone(),
        },
        NetworkAction::Unsupported { name, .. } => Route::Reject(ConnError::Unsupported {
            listener: listener.name.clone(),
            filter: name.clone(),
        }),
        NetworkAction::TcpProxy(tcp) => match tcp_upstream(snap, tcp, facts, weighted) {
            Ok((cluster, target, hash)) => Route::TcpProxy(TcpRoute {
                chain,
                cluster,
                target,
                hash,
            }),
            Err(e) => Route::Reject(e),
        },
    }
}

/// The hash tcp_proxy's `hash_policy` gives a connection from `src` on a cluster balanced by
/// `policy`. Without a hash policy there is none: RING_HASH and MAGLEV then pick a random
/// host, as Envoy's do.
pub fn tcp_hash(tcp: &TcpProxy, policy: crate::model::LbPolicy, src: IpAddr) -> Option<u64> {
    tcp_hashes(tcp, policy).then(|| lb::source_ip_hash(src))
}

/// Whether connections through `tcp` to a cluster balanced by `policy` are hashed by their
/// source address (a `source_ip` hash policy and a hashing policy); otherwise RING_HASH and
/// MAGLEV pick at random. The kernel projection asks the same question.
pub fn tcp_hashes(tcp: &TcpProxy, policy: crate::model::LbPolicy) -> bool {
    use crate::model::listener::TcpHashPolicy;
    matches!(tcp.hash_policy, Some(TcpHashPolicy::SourceIp)) && lb::uses_hash(policy)
}

/// tcp_proxy's cluster, then the host in it (and the hash it was picked with).
fn tcp_upstream(
    snap: &Snapshot,
    tcp: &TcpProxy,
    facts: &ConnFacts<'_>,
    weighted: &AtomicUsize,
) -> Result<(Arc<ClusterEntry>, Target, Option<u64>), ConnError> {
    let name = match &tcp.cluster {
        ClusterSpecifier::Cluster(c) => c.as_str(),
        ClusterSpecifier::Weighted(w) => {
            lb::pick_weighted(w, weighted).ok_or_else(|| ConnError::NoCluster {
                cluster: String::new(),
            })?
        }
    };
    let entry = snap.cluster(name).ok_or_else(|| ConnError::NoCluster {
        cluster: name.to_string(),
    })?;
    let none_healthy = || ConnError::NoHealthyUpstream {
        cluster: name.to_string(),
    };
    let hash = tcp_hash(tcp, entry.cluster.lb_policy, facts.src.ip());
    let target = match &entry.cluster.kind {
        ClusterKind::OriginalDst => match facts.orig_dst {
            Some(o) => Target::OriginalDst(o.into()),
            None => {
                return Err(ConnError::NoOriginalDst {
                    cluster: name.to_string(),
                });
            }
        },
        ClusterKind::Dns { hosts } => {
            let i = lb::next_index(&entry.rr, hosts.len()).ok_or_else(none_healthy)?;
            let (host, port) = &hosts[i];
            Target::Dns {
                host: host.clone(),
                port: *port,
            }
        }
        ClusterKind::Static(_) | ClusterKind::Eds { .. } => {
            let req = lb::LbRequest {
                hash,
                ..Default::default()
            };
            Target::Host(lb::choose(&entry.lb, &req).ok_or_else(none_healthy)?)
        }
    };
    Ok((entry.clone(), target, hash))
}

#[cfg(test)]
mod tests;
