//! Listeners, their filter chains and the network filter that terminates each chain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::extensions::filters::udp::udp_proxy::v3 as udp;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::xds::r#type::matcher::v3 as xds_matcher;
use prost::Message;

use super::route::RouteConfig;
use super::{Cidr, FieldError, ModelError, duration, socket_addr};

/// Type URL of the TCP proxy filter config.
pub const TCP_PROXY_TYPE: &str = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
/// Type URL of the UDP proxy listener filter config.
pub const UDP_PROXY_TYPE: &str = "envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig";
/// Name of the UDP proxy listener filter.
pub const UDP_PROXY_NAME: &str = "envoy.filters.udp_listener.udp_proxy";
/// Type URL of the UDP proxy's route action (`matcher` -> `on_no_match`).
pub const UDP_ROUTE_TYPE: &str = "envoy.extensions.filters.udp.udp_proxy.v3.Route";

/// Type URL of the HTTP connection manager filter config.
pub const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// Validated `Listener`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Listener name.
    pub name: String,
    /// Address (IP literal and port); `0.0.0.0:0` for an internal listener.
    pub address: SocketAddr,
    /// `envoy_internal_address.server_listener_name` of an internal listener (Istio's
    /// `main_internal`, reached only from other listeners, never bound to a port).
    pub internal: Option<String>,
    /// `use_original_dst`: hand connections to the listener matching their original destination.
    pub use_original_dst: bool,
    /// `bind_to_port` (default true). Istio's per-service listeners set it to false.
    pub bind_to_port: bool,
    /// Filter chains in configuration order.
    pub filter_chains: Vec<FilterChain>,
    /// Chain used when no `filter_chain_match` matches.
    pub default_filter_chain: Option<FilterChain>,
    /// Names of the listener filters (tls_inspector, http_inspector, original_dst ...).
    pub listener_filters: Vec<String>,
    /// A UDP listener (`socket_address.protocol: UDP`) and its `udp_proxy`; `None` for TCP.
    /// skiff's proxy never binds these: only the kernel fast path serves them.
    pub udp: Option<UdpProxy>,
}

/// The `envoy.filters.udp_listener.udp_proxy` listener filter of a UDP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpProxy {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// The one cluster every datagram goes to (`cluster`, or a `matcher` with only an
    /// `on_no_match` Route); `None` when a matcher routes by the datagram (never in the kernel).
    pub cluster: Option<String>,
    /// Something that changes where or how datagrams go beyond "one cluster, balanced by its
    /// policy" (hash_policies, session_filters, tunneling_config, per-packet balancing); named
    /// for explain.
    pub extras: Vec<&'static str>,
}

/// Parses a `UdpProxyConfig` (errors name the field inside it).
fn udp_proxy(any: &Any) -> Result<UdpProxy, FieldError> {
    let cfg = udp::UdpProxyConfig::decode(any.value.as_slice())
        .map_err(|e| FieldError::new("typed_config", format!("invalid {UDP_PROXY_TYPE}: {e}")))?;
    use udp::udp_proxy_config::RouteSpecifier as Rs;
    use xds_matcher::matcher::on_match::OnMatch;
    let cluster = match &cfg.route_specifier {
        #[allow(deprecated)]
        Some(Rs::Cluster(c)) => {
            if c.is_empty() {
                return Err(FieldError::new("cluster", "must not be empty"));
            }
            Some(c.clone())
        }
        Some(Rs::Matcher(m)) => match (&m.matcher_type, m.on_no_match.as_deref()) {
            // Matchers that look at the datagram (source address ...) are valid Envoy but
            // route per datagram: accepted, never put in the kernel.
            (Some(_), _) => None,
            (None, None) => {
                return Err(FieldError::new(
                    "matcher.on_no_match",
                    "a matcher without matchers needs on_no_match",
                ));
            }
            (None, Some(on)) => match &on.on_match {
                Some(OnMatch::Action(action)) => {
                    let Some(any) = &action.typed_config else {
                        return Err(FieldError::new(
                            "matcher.on_no_match.action.typed_config",
                            "missing",
                        ));
                    };
                    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
                    if type_name != UDP_ROUTE_TYPE {
                        return Err(FieldError::new(
                            "matcher.on_no_match.action.typed_config",
                            format!("expected {UDP_ROUTE_TYPE}, got {type_name}"),
                        ));
                    }
                    let route = udp::Route::decode(any.value.as_slice()).map_err(|e| {
                        FieldError::new(
                            "matcher.on_no_match.action.typed_config",
                            format!("invalid {UDP_ROUTE_TYPE}: {e}"),
                        )
                    })?;
                    if route.cluster.is_empty() {
                        return Err(FieldError::new(
                            "matcher.on_no_match.action.typed_config.cluster",
                            "must not be empty",
                        ));
                    }
                    Some(route.cluster)
                }
                Some(OnMatch::Matcher(_)) => None,
                None => {
                    return Err(FieldError::new(
                        "matcher.on_no_match",
                        "needs an action or a matcher",
                    ));
                }
            },
        },
        None => {
            return Err(FieldError::new(
                "cluster",
                "udp_proxy needs cluster or matcher",
            ));
        }
    };
    let mut extras = Vec::new();
    if !cfg.hash_policies.is_empty() {
        extras.push("hash_policies");
    }
    if !cfg.session_filters.is_empty() {
        extras.push("session_filters");
    }
    if cfg.tunneling_config.is_some() {
        extras.push("tunneling_config");
    }
    if cfg.use_original_src_ip {
        extras.push("use_original_src_ip");
    }
    Ok(UdpProxy {
        stat_prefix: cfg.stat_prefix,
        cluster,
        extras,
    })
}

/// The `udp_proxy` of a UDP listener's `listener_filters` (it must have exactly one).
fn udp_listener_filter(filters: &[pb::ListenerFilter]) -> Result<UdpProxy, FieldError> {
    use pb::listener_filter::ConfigType;
    let mut found = None;
    for (i, f) in filters.iter().enumerate() {
        let any = match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => Some(any),
            _ => None,
        };
        let type_name = any.map(|a| a.type_url.rsplit('/').next().unwrap_or_default());
        if f.name != UDP_PROXY_NAME && type_name != Some(UDP_PROXY_TYPE) {
            continue;
        }
        let field = format!("listener_filters[{i}]");
        let Some(any) = any else {
            return Err(FieldError::new(
                format!("{field}.typed_config"),
                format!("{UDP_PROXY_NAME} needs a typed_config ({UDP_PROXY_TYPE})"),
            ));
        };
        if type_name != Some(UDP_PROXY_TYPE) {
            return Err(FieldError::new(
                format!("{field}.typed_config"),
                format!(
                    "expected {UDP_PROXY_TYPE}, got {}",
                    type_name.unwrap_or_default()
                ),
            ));
        }
        if found.is_some() {
            return Err(FieldError::new(field, "a second udp_proxy"));
        }
        found = Some(udp_proxy(any).map_err(|e| e.within(field))?);
    }
    found.ok_or_else(|| {
        FieldError::new(
            "listener_filters",
            format!("a UDP listener needs {UDP_PROXY_NAME}"),
        )
    })
}

/// Whether the listener's address is a UDP socket address.
fn is_udp(l: &pb::Listener) -> bool {
    use envoy_types::pb::envoy::config::core::v3::address::Address as Kind;
    use envoy_types::pb::envoy::config::core::v3::socket_address::Protocol;
    matches!(
        l.address.as_ref().and_then(|a| a.address.as_ref()),
        Some(Kind::SocketAddress(sa)) if sa.protocol == Protocol::Udp as i32
    )
}

/// One `FilterChain`.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    /// Chain name (may be empty).
    pub name: String,
    /// Match criteria.
    pub matcher: FilterChainMatch,
    /// Network filters before the terminal one (RBAC, metadata exchange, stats ...), by name.
    pub filters: Vec<String>,
    /// What the terminal filter does.
    pub action: NetworkAction,
    /// Whether the chain terminates TLS (`transport_socket` set).
    pub has_transport_socket: bool,
}

/// `FilterChainMatch`, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterChainMatch {
    /// `destination_port`.
    pub destination_port: Option<u16>,
    /// `prefix_ranges` (destination IP).
    pub prefix_ranges: Vec<Cidr>,
    /// `direct_source_prefix_ranges`.
    pub direct_source_prefix_ranges: Vec<Cidr>,
    /// `source_type`.
    pub source_type: SourceType,
    /// `source_prefix_ranges`.
    pub source_prefix_ranges: Vec<Cidr>,
    /// `source_ports`.
    pub source_ports: Vec<u16>,
    /// `server_names` (SNI).
    pub server_names: Vec<String>,
    /// `transport_protocol` (`raw_buffer`, `tls`), empty = any.
    pub transport_protocol: String,
    /// `application_protocols` (`http/1.1`, `h2c`, `istio-peer-exchange` ...).
    pub application_protocols: Vec<String>,
}

/// `FilterChainMatch.source_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceType {
    /// ANY.
    #[default]
    Any,
    /// SAME_IP_OR_LOOPBACK.
    SameIpOrLoopback,
    /// EXTERNAL.
    External,
}

/// What the terminal network filter of a chain does.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkAction {
    /// `envoy.filters.network.tcp_proxy`.
    TcpProxy(TcpProxy),
    /// `envoy.filters.network.http_connection_manager`: accepted and stored; served by HTTP routing.
    Http(HttpManager),
    /// A terminal filter skiff does not run; connections on this chain are closed.
    Unsupported {
        /// Filter name.
        name: String,
        /// Its config type URL.
        type_url: String,
    },
}

/// TCP proxy settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpProxy {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// Target cluster(s).
    pub cluster: ClusterSpecifier,
    /// `idle_timeout` (Envoy default 1h; zero disables).
    pub idle_timeout: Option<Duration>,
}

/// `cluster` or `weighted_clusters`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterSpecifier {
    /// One cluster.
    Cluster(String),
    /// Several clusters with weights.
    Weighted(Vec<(String, u32)>),
}

impl ClusterSpecifier {
    /// Every cluster named.
    pub fn names(&self) -> Vec<&str> {
        match self {
            ClusterSpecifier::Cluster(c) => vec![c.as_str()],
            ClusterSpecifier::Weighted(w) => w.iter().map(|(n, _)| n.as_str()).collect(),
        }
    }
}

/// The parts of an HTTP connection manager skiff runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpManager {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// RDS route config name, when routes come over RDS.
    pub rds_route_config_name: Option<String>,
    /// The inline `route_config`, when given inline (shared: every connection clones the HCM).
    pub inline_route_config: Option<Arc<RouteConfig>>,
    /// `http_filters` before the router, as recognised (none of them changes traffic yet).
    pub http_filters: Vec<HttpFilter>,
    /// `use_remote_address`: the downstream peer is the trusted client address (append it to
    /// `x-forwarded-for`, overwrite `x-forwarded-proto`).
    pub use_remote_address: bool,
    /// `upgrade_configs`: (upgrade type lowercase, `enabled`) pairs. A type not listed is never
    /// upgraded (403); routes may flip `enabled` per type.
    pub upgrades: Vec<(String, bool)>,
    /// `server_name` (Envoy's default `envoy`) and how it goes into the `server` header.
    pub server_header: ServerHeader,
}

/// `server_header_transformation` with the `server_name` it writes.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerHeader {
    /// OVERWRITE (the default): every response says `server: <name>`.
    Overwrite(String),
    /// APPEND_IF_ABSENT: only responses without a `server` header get one.
    AppendIfAbsent(String),
    /// PASS_THROUGH: the upstream's header, or none, is left alone.
    PassThrough,
}

impl Default for ServerHeader {
    fn default() -> Self {
        ServerHeader::Overwrite(DEFAULT_SERVER_NAME.to_string())
    }
}

/// Envoy's default `server_name`.
pub const DEFAULT_SERVER_NAME: &str = "envoy";

/// One entry of `http_filters` that skiff accepted but does not run.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpFilter {
    /// Filter name.
    pub name: String,
    /// Config type (the `typed_config` type, or the first of `config_discovery.type_urls`).
    pub type_name: String,
    /// Why it was accepted without running.
    pub disposition: FilterDisposition,
}

/// Why an HTTP filter is accepted without being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterDisposition {
    /// A filter Envoy or Istio ships (a known extension type) that skiff does not execute.
    KnownNotRun,
    /// An unknown type marked `is_optional`: Envoy skips it too.
    OptionalSkipped,
    /// `disabled: true`: only enabled per route, which skiff does not do.
    Disabled,
}

/// Type URL of the router filter config.
pub const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";
/// Name Envoy gives the router filter.
pub const ROUTER_NAME: &str = "envoy.filters.http.router";

/// Names of Envoy's and Istio's own filters, for filters given by name without a config type.
const KNOWN_FILTER_NAMES: [&str; 2] = ["envoy.", "istio."];

/// Config types of HTTP filters Envoy or Istio ship, by namespace. Such a filter is known (it
/// is accepted as Envoy accepts it) although skiff does not execute it; anything outside these
/// namespaces is unknown to skiff and rejected unless `is_optional`.
const KNOWN_FILTER_NAMESPACES: [&str; 7] = [
    "envoy.extensions.filters.http.",
    "envoy.config.filter.http.",
    "io.istio.http.",
    "istio.",
    "stats.",
    "udpa.type.v1.TypedStruct",
    "xds.type.v3.TypedStruct",
];

/// Envoy's default TCP proxy idle timeout.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

fn type_name(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or(&any.type_url)
}

fn ports(v: &[u32], field: &str) -> Result<Vec<u16>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(i, p)| {
            u16::try_from(*p)
                .map_err(|_| FieldError::new(format!("{field}[{i}]"), format!("{p} is not a port")))
        })
        .collect()
}

fn cidrs(
    v: &[envoy_types::pb::envoy::config::core::v3::CidrRange],
    field: &str,
) -> Result<Vec<Cidr>, FieldError> {
    v.iter()
        .enumerate()
        .map(|(i, c)| Cidr::from_proto(c).map_err(|e| e.within(format!("{field}[{i}]"))))
        .collect()
}

impl FilterChainMatch {
    fn from_proto(m: &pb::FilterChainMatch) -> Result<Self, FieldError> {
        let destination_port = match &m.destination_port {
            Some(p) => Some(u16::try_from(p.value).map_err(|_| {
                FieldError::new("destination_port", format!("{} is not a port", p.value))
            })?),
            None => None,
        };
        Ok(FilterChainMatch {
            destination_port,
            prefix_ranges: cidrs(&m.prefix_ranges, "prefix_ranges")?,
            direct_source_prefix_ranges: cidrs(
                &m.direct_source_prefix_ranges,
                "direct_source_prefix_ranges",
            )?,
            source_type: match m.source_type {
                0 => SourceType::Any,
                1 => SourceType::SameIpOrLoopback,
                2 => SourceType::External,
                o => return Err(FieldError::new("source_type", format!("unknown value {o}"))),
            },
            source_prefix_ranges: cidrs(&m.source_prefix_ranges, "source_prefix_ranges")?,
            source_ports: ports(&m.source_ports, "source_ports")?,
            server_names: m.server_names.clone(),
            transport_protocol: m.transport_protocol.clone(),
            application_protocols: m.application_protocols.clone(),
        })
    }
}

fn tcp_proxy(any: &Any) -> Result<TcpProxy, FieldError> {
    let t = tcp::TcpProxy::decode(any.value.as_slice())
        .map_err(|e| FieldError::new("typed_config", format!("invalid {TCP_PROXY_TYPE}: {e}")))?;
    use tcp::tcp_proxy::ClusterSpecifier as Cs;
    let cluster = match t.cluster_specifier {
        Some(Cs::Cluster(c)) if !c.is_empty() => ClusterSpecifier::Cluster(c),
        Some(Cs::WeightedClusters(w)) if !w.clusters.is_empty() => {
            let mut out = Vec::with_capacity(w.clusters.len());
            for (i, c) in w.clusters.iter().enumerate() {
                if c.name.is_empty() {
                    return Err(FieldError::new(
                        format!("typed_config.weighted_clusters.clusters[{i}].name"),
                        "must not be empty",
                    ));
                }
                out.push((c.name.clone(), c.weight));
            }
            if out.iter().all(|(_, w)| *w == 0) {
                return Err(FieldError::new(
                    "typed_config.weighted_clusters",
                    "all weights are 0",
                ));
            }
            ClusterSpecifier::Weighted(out)
        }
        _ => {
            return Err(FieldError::new(
                "typed_config.cluster",
                "tcp_proxy needs cluster or weighted_clusters",
            ));
        }
    };
    let idle_timeout = match &t.idle_timeout {
        Some(d) => {
            let d = duration(d).map_err(|e| e.within("typed_config.idle_timeout"))?;
            (!d.is_zero()).then_some(d)
        }
        None => Some(DEFAULT_TCP_IDLE_TIMEOUT),
    };
    Ok(TcpProxy {
        stat_prefix: t.stat_prefix,
        cluster,
        idle_timeout,
    })
}

fn http_filters(h: &hcm::HttpConnectionManager) -> Result<Vec<HttpFilter>, FieldError> {
    use hcm::http_filter::ConfigType;
    let mut out = Vec::new();
    let n = h.http_filters.len();
    for (i, f) in h.http_filters.iter().enumerate() {
        let at = format!("typed_config.http_filters[{i}]");
        let type_name = match &f.config_type {
            Some(ConfigType::TypedConfig(a)) => type_name(a).to_string(),
            Some(ConfigType::ConfigDiscovery(d)) => d
                .type_urls
                .first()
                .map(|u| u.rsplit('/').next().unwrap_or(u).to_string())
                .unwrap_or_default(),
            None => String::new(),
        };
        // Without a config type Envoy finds the filter by name (older configurations).
        let is_router = type_name == ROUTER_TYPE
            || (type_name.is_empty() && (f.name == ROUTER_NAME || f.name == "envoy.router"));
        // Envoy: the router is terminal, so it must be last, and the last filter must be terminal.
        if is_router {
            if i + 1 != n {
                return Err(FieldError::new(
                    at,
                    format!("terminal filter {:?} must be the last filter", f.name),
                ));
            }
            continue;
        }
        if i + 1 == n {
            return Err(FieldError::new(
                at,
                format!("the last HTTP filter must be the router, not {:?}", f.name),
            ));
        }
        let known = if type_name.is_empty() {
            KNOWN_FILTER_NAMES.iter().any(|p| f.name.starts_with(p))
        } else {
            KNOWN_FILTER_NAMESPACES
                .iter()
                .any(|ns| type_name.starts_with(ns))
        };
        let disposition = if f.disabled {
            FilterDisposition::Disabled
        } else if known {
            FilterDisposition::KnownNotRun
        } else if f.is_optional {
            FilterDisposition::OptionalSkipped
        } else {
            let what = if type_name.is_empty() {
                "no typed_config".to_string()
            } else {
                format!("config type {type_name:?}")
            };
            return Err(FieldError::new(
                at,
                format!("unknown HTTP filter {:?} ({what}) is not optional", f.name),
            ));
        };
        out.push(HttpFilter {
            name: f.name.clone(),
            type_name,
            disposition,
        });
    }
    Ok(out)
}

fn http_manager(any: &Any) -> Result<HttpManager, FieldError> {
    let h = hcm::HttpConnectionManager::decode(any.value.as_slice())
        .map_err(|e| FieldError::new("typed_config", format!("invalid {HCM_TYPE}: {e}")))?;
    use hcm::http_connection_manager::RouteSpecifier as Rs;
    let (rds, inline) = match &h.route_specifier {
        Some(Rs::Rds(r)) if !r.route_config_name.is_empty() => {
            (Some(r.route_config_name.clone()), None)
        }
        Some(Rs::Rds(_)) => {
            return Err(FieldError::new(
                "typed_config.rds.route_config_name",
                "must not be empty",
            ));
        }
        Some(Rs::RouteConfig(rc)) => {
            let rc =
                RouteConfig::from_proto(rc).map_err(|e| e.within("typed_config.route_config"))?;
            (None, Some(Arc::new(rc)))
        }
        Some(Rs::ScopedRoutes(_)) => {
            return Err(FieldError::new(
                "typed_config.scoped_routes",
                "scoped routes are not supported",
            ));
        }
        None => {
            return Err(FieldError::new(
                "typed_config",
                "http_connection_manager needs rds or route_config",
            ));
        }
    };
    Ok(HttpManager {
        http_filters: http_filters(&h)?,
        stat_prefix: h.stat_prefix,
        rds_route_config_name: rds,
        inline_route_config: inline,
        use_remote_address: h.use_remote_address.is_some_and(|b| b.value),
        server_header: {
            let name = if h.server_name.is_empty() {
                DEFAULT_SERVER_NAME.to_string()
            } else {
                h.server_name.clone()
            };
            match h.server_header_transformation {
                1 => ServerHeader::AppendIfAbsent(name),
                2 => ServerHeader::PassThrough,
                _ => ServerHeader::Overwrite(name),
            }
        },
        upgrades: h
            .upgrade_configs
            .iter()
            .map(|u| {
                let enabled = u.enabled.as_ref().is_none_or(|b| b.value);
                (u.upgrade_type.to_ascii_lowercase(), enabled)
            })
            .collect(),
    })
}

impl FilterChain {
    fn from_proto(fc: &pb::FilterChain) -> Result<Self, FieldError> {
        let matcher = match &fc.filter_chain_match {
            Some(m) => {
                FilterChainMatch::from_proto(m).map_err(|e| e.within("filter_chain_match"))?
            }
            None => FilterChainMatch::default(),
        };
        let Some((last, before)) = fc.filters.split_last() else {
            return Err(FieldError::new(
                "filters",
                "a filter chain needs a network filter",
            ));
        };
        let n = fc.filters.len() - 1;
        use pb::filter::ConfigType;
        let action = match &last.config_type {
            Some(ConfigType::TypedConfig(any)) => match type_name(any) {
                TCP_PROXY_TYPE => NetworkAction::TcpProxy(
                    tcp_proxy(any).map_err(|e| e.within(format!("filters[{n}]")))?,
                ),
                HCM_TYPE => NetworkAction::Http(
                    http_manager(any).map_err(|e| e.within(format!("filters[{n}]")))?,
                ),
                other => NetworkAction::Unsupported {
                    name: last.name.clone(),
                    type_url: other.to_string(),
                },
            },
            _ => NetworkAction::Unsupported {
                name: last.name.clone(),
                type_url: String::new(),
            },
        };
        Ok(FilterChain {
            name: fc.name.clone(),
            matcher,
            filters: before.iter().map(|f| f.name.clone()).collect(),
            action,
            has_transport_socket: fc.transport_socket.is_some(),
        })
    }
}

impl TryFrom<&pb::Listener> for Listener {
    type Error = ModelError;
    fn try_from(l: &pb::Listener) -> Result<Self, ModelError> {
        let err = |e: FieldError| e.on("listener", &l.name);
        if l.name.is_empty() {
            return Err(err(FieldError::new("name", "must not be empty")));
        }
        use envoy_types::pb::envoy::config::core::v3::address::Address as Kind;
        use envoy_types::pb::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
        let internal = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
            Some(Kind::EnvoyInternalAddress(ia)) => Some(match &ia.address_name_specifier {
                Some(AddressNameSpecifier::ServerListenerName(n)) => n.clone(),
                None => String::new(),
            }),
            // `internal_listener: {}` without an address: reached by name only.
            _ if l.listener_specifier.is_some() => Some(l.name.clone()),
            _ => None,
        };
        let address = match internal {
            Some(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => socket_addr(l.address.as_ref()).map_err(|e| err(e.within("address")))?,
        };
        let udp = if is_udp(l) {
            if internal.is_some() {
                return Err(err(FieldError::new(
                    "address",
                    "an internal listener cannot be UDP",
                )));
            }
            Some(udp_listener_filter(&l.listener_filters).map_err(err)?)
        } else {
            None
        };
        super::limits::at_most(
            "filter_chains",
            l.filter_chains.len(),
            super::limits::MAX_FILTER_CHAINS,
        )
        .map_err(err)?;
        let mut filter_chains = Vec::with_capacity(l.filter_chains.len());
        for (i, fc) in l.filter_chains.iter().enumerate() {
            filter_chains.push(
                FilterChain::from_proto(fc)
                    .map_err(|e| err(e.within(format!("[{i}]")).within("filter_chains")))?,
            );
        }
        let default_filter_chain = match &l.default_filter_chain {
            Some(fc) => Some(
                FilterChain::from_proto(fc).map_err(|e| err(e.within("default_filter_chain")))?,
            ),
            None => None,
        };
        // A UDP listener's work is its udp_proxy listener filter; it has no filter chains.
        if udp.is_none()
            && filter_chains.is_empty()
            && default_filter_chain.is_none()
            && l.filter_chain_matcher.is_none()
        {
            return Err(err(FieldError::new(
                "filter_chains",
                "a listener needs at least one filter chain or a default_filter_chain",
            )));
        }
        #[allow(deprecated)]
        let legacy_bind = l
            .deprecated_v1
            .as_ref()
            .and_then(|d| d.bind_to_port.as_ref())
            .map(|b| b.value);
        let bind_to_port = l
            .bind_to_port
            .as_ref()
            .map(|b| b.value)
            .or(legacy_bind)
            .unwrap_or(true);
        Ok(Listener {
            name: l.name.clone(),
            address,
            use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
            bind_to_port: bind_to_port && internal.is_none(),
            internal,
            filter_chains,
            default_filter_chain,
            listener_filters: l.listener_filters.iter().map(|f| f.name.clone()).collect(),
            udp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3 as rpb;

    fn any_of<M: prost::Message>(type_name: &str, m: &M) -> Any {
        Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value: m.encode_to_vec(),
        }
    }

    fn filter(name: &str, type_name: &str, optional: bool) -> hcm::HttpFilter {
        hcm::HttpFilter {
            name: name.into(),
            is_optional: optional,
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
                type_url: format!("type.googleapis.com/{type_name}"),
                value: vec![],
            })),
            ..Default::default()
        }
    }

    fn router() -> hcm::HttpFilter {
        filter(ROUTER_NAME, ROUTER_TYPE, false)
    }

    fn inline(filters: Vec<hcm::HttpFilter>) -> hcm::HttpConnectionManager {
        hcm::HttpConnectionManager {
            stat_prefix: "in".into(),
            http_filters: filters,
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
                rpb::RouteConfiguration {
                    virtual_hosts: vec![rpb::VirtualHost {
                        name: "v".into(),
                        domains: vec!["*".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
    }

    fn convert(h: &hcm::HttpConnectionManager) -> Result<HttpManager, FieldError> {
        http_manager(&any_of(HCM_TYPE, h))
    }

    #[test]
    fn inline_route_config_is_converted_and_needs_no_rds() {
        let m = convert(&inline(vec![router()])).unwrap();
        assert_eq!(m.rds_route_config_name, None);
        let rc = m.inline_route_config.unwrap();
        assert_eq!(rc.virtual_hosts[0].name, "v");
        assert!(m.http_filters.is_empty());
    }

    #[test]
    fn inline_route_config_errors_carry_the_field_path() {
        let mut h = inline(vec![router()]);
        if let Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) =
            &mut h.route_specifier
        {
            rc.virtual_hosts[0].domains.clear();
        }
        let e = convert(&h).unwrap_err();
        assert_eq!(
            e.field,
            "typed_config.route_config.virtual_hosts[0].domains"
        );
    }

    #[test]
    fn http_filters_follow_envoy_rules() {
        // Known Envoy/Istio filters are accepted (not run); unknown optional ones are skipped.
        let m = convert(&inline(vec![
            filter(
                "envoy.filters.http.fault",
                "envoy.extensions.filters.http.fault.v3.HTTPFault",
                false,
            ),
            filter(
                "istio.metadata_exchange",
                "io.istio.http.peer_metadata.Config",
                false,
            ),
            filter("acme.magic", "acme.filters.Magic", true),
            router(),
        ]))
        .unwrap();
        let got: Vec<_> = m
            .http_filters
            .iter()
            .map(|f| (f.name.as_str(), f.disposition))
            .collect();
        assert_eq!(
            got,
            [
                ("envoy.filters.http.fault", FilterDisposition::KnownNotRun),
                ("istio.metadata_exchange", FilterDisposition::KnownNotRun),
                ("acme.magic", FilterDisposition::OptionalSkipped),
            ]
        );
        // An unknown required filter is rejected by name.
        let e = convert(&inline(vec![
            filter("acme.magic", "acme.filters.Magic", false),
            router(),
        ]))
        .unwrap_err();
        assert_eq!(e.field, "typed_config.http_filters[0]");
        assert!(e.reason.contains("\"acme.magic\""), "{}", e.reason);
        // The router must be last, and the last filter must be the router.
        let e = convert(&inline(vec![
            router(),
            filter(
                "envoy.filters.http.cors",
                "envoy.extensions.filters.http.cors.v3.Cors",
                false,
            ),
        ]))
        .unwrap_err();
        assert!(e.reason.contains("must be the last filter"), "{}", e.reason);
        let e = convert(&inline(vec![filter(
            "envoy.filters.http.cors",
            "envoy.extensions.filters.http.cors.v3.Cors",
            false,
        )]))
        .unwrap_err();
        assert!(e.reason.contains("must be the router"), "{}", e.reason);
        // By name only (older configurations): Envoy's names are known, others are not.
        let named = |n: &str| hcm::HttpFilter {
            name: n.into(),
            ..Default::default()
        };
        assert!(
            convert(&inline(vec![
                named("envoy.filters.http.rbac"),
                named("envoy.router")
            ]))
            .is_ok()
        );
        let e = convert(&inline(vec![named("acme.magic"), router()])).unwrap_err();
        assert!(e.reason.contains("(no typed_config)"), "{}", e.reason);
        // No filters at all: Envoy installs the router by default.
        assert!(convert(&inline(vec![])).is_ok());
    }

    #[test]
    fn use_remote_address_is_read() {
        let mut h = inline(vec![]);
        h.use_remote_address = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        let m = convert(&h).unwrap();
        assert!(m.use_remote_address);
        assert_eq!(m.server_header, ServerHeader::Overwrite("envoy".into()));
        h.server_name = "istio-envoy".into();
        h.server_header_transformation = 1;
        assert_eq!(
            convert(&h).unwrap().server_header,
            ServerHeader::AppendIfAbsent("istio-envoy".into())
        );
    }

    mod udp_listeners {
        use super::*;
        use envoy_types::pb::envoy::config::core::v3 as core;
        use envoy_types::pb::xds::core::v3::TypedExtensionConfig;

        fn udp_address(ip: &str, port: u32) -> core::Address {
            core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    protocol: core::socket_address::Protocol::Udp as i32,
                    address: ip.into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }
        }

        fn udp_filter(cfg: &udp::UdpProxyConfig) -> pb::ListenerFilter {
            pb::ListenerFilter {
                name: UDP_PROXY_NAME.into(),
                config_type: Some(pb::listener_filter::ConfigType::TypedConfig(any_of(
                    UDP_PROXY_TYPE,
                    cfg,
                ))),
                ..Default::default()
            }
        }

        fn udp_listener(filters: Vec<pb::ListenerFilter>) -> pb::Listener {
            pb::Listener {
                name: "dns".into(),
                address: Some(udp_address("10.96.0.10", 53)),
                listener_filters: filters,
                ..Default::default()
            }
        }

        #[allow(deprecated)]
        fn to_cluster(name: &str) -> udp::UdpProxyConfig {
            udp::UdpProxyConfig {
                stat_prefix: "dns".into(),
                route_specifier: Some(udp::udp_proxy_config::RouteSpecifier::Cluster(name.into())),
                ..Default::default()
            }
        }

        fn on_no_match(type_name: &str, route: &udp::Route) -> udp::UdpProxyConfig {
            use xds_matcher::matcher::{OnMatch, on_match};
            udp::UdpProxyConfig {
                stat_prefix: "dns".into(),
                route_specifier: Some(udp::udp_proxy_config::RouteSpecifier::Matcher(
                    xds_matcher::Matcher {
                        on_no_match: Some(Box::new(OnMatch {
                            keep_matching: false,
                            on_match: Some(on_match::OnMatch::Action(TypedExtensionConfig {
                                name: "route".into(),
                                typed_config: Some(any_of(type_name, route)),
                            })),
                        })),
                        matcher_type: None,
                    },
                )),
                ..Default::default()
            }
        }

        fn route(cluster: &str) -> udp::Route {
            udp::Route {
                cluster: cluster.into(),
            }
        }

        #[test]
        fn cluster_form_becomes_a_udp_listener_without_filter_chains() {
            let l = Listener::try_from(&udp_listener(vec![udp_filter(&to_cluster("dns"))]))
                .expect("valid UDP listener");
            assert_eq!(l.address, "10.96.0.10:53".parse().unwrap());
            assert!(l.filter_chains.is_empty());
            let udp = l.udp.expect("UDP kind");
            assert_eq!(udp.cluster.as_deref(), Some("dns"));
            assert_eq!(udp.stat_prefix, "dns");
            assert!(udp.extras.is_empty());
        }

        #[test]
        fn matcher_with_only_on_no_match_route_names_the_cluster() {
            let cfg = on_no_match(UDP_ROUTE_TYPE, &route("dns2"));
            let l = Listener::try_from(&udp_listener(vec![udp_filter(&cfg)])).expect("valid");
            assert_eq!(l.udp.unwrap().cluster.as_deref(), Some("dns2"));
        }

        #[test]
        fn tcp_listeners_have_no_udp_kind() {
            let mut pl = udp_listener(vec![]);
            pl.address = Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: "10.96.0.10".into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(53)),
                    ..Default::default()
                })),
            });
            // A TCP listener still needs filter chains: the UDP exemption does not leak.
            let e = Listener::try_from(&pl).unwrap_err();
            assert_eq!(e.field, "filter_chains");
        }

        #[test]
        fn extras_are_recorded() {
            let mut cfg = to_cluster("dns");
            cfg.use_original_src_ip = true;
            cfg.hash_policies = vec![udp::udp_proxy_config::HashPolicy::default()];
            let l = Listener::try_from(&udp_listener(vec![udp_filter(&cfg)])).expect("valid");
            assert_eq!(
                l.udp.unwrap().extras,
                vec!["hash_policies", "use_original_src_ip"]
            );
        }

        #[test]
        fn bad_udp_listeners_name_the_field() {
            let cases: Vec<(pb::Listener, &str)> = vec![
                (udp_listener(vec![]), "listener_filters"),
                (
                    udp_listener(vec![udp_filter(&to_cluster(""))]),
                    "listener_filters[0].cluster",
                ),
                (
                    udp_listener(vec![udp_filter(&udp::UdpProxyConfig::default())]),
                    "listener_filters[0].cluster",
                ),
                (
                    udp_listener(vec![udp_filter(&on_no_match(TCP_PROXY_TYPE, &route("x")))]),
                    "listener_filters[0].matcher.on_no_match.action.typed_config",
                ),
                (
                    udp_listener(vec![udp_filter(&on_no_match(UDP_ROUTE_TYPE, &route("")))]),
                    "listener_filters[0].matcher.on_no_match.action.typed_config.cluster",
                ),
                (
                    udp_listener(vec![pb::ListenerFilter {
                        name: UDP_PROXY_NAME.into(),
                        config_type: Some(pb::listener_filter::ConfigType::TypedConfig(any_of(
                            TCP_PROXY_TYPE,
                            &tcp::TcpProxy::default(),
                        ))),
                        ..Default::default()
                    }]),
                    "listener_filters[0].typed_config",
                ),
                (
                    udp_listener(vec![
                        udp_filter(&to_cluster("a")),
                        udp_filter(&to_cluster("b")),
                    ]),
                    "listener_filters[1]",
                ),
            ];
            for (l, field) in cases {
                let e = Listener::try_from(&l).expect_err(field);
                assert_eq!(e.field, field, "{e}");
                assert_eq!(e.kind, "listener");
                assert_eq!(e.name, "dns");
            }
        }
    }
}
