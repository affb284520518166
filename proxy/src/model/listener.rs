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

use super::access_log::access_logs;
use super::compat::{self, Kind, Verdict};
use super::fault::FaultFilter;
use super::route::{ClusterSpecifier, RouteConfig};
use super::tls::{DownstreamTls, SdsRef};
use super::upstream_http::DEFAULT_BUFFER_LIMIT;
use super::{Cidr, FieldError, ModelError, duration, socket_addr};
use crate::accesslog::AccessLog;
use crate::rbac::{self, HttpRbac, NetworkRbac};

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
/// Type URL of the network RBAC filter config.
pub const NETWORK_RBAC_TYPE: &str = "envoy.extensions.filters.network.rbac.v3.RBAC";
/// Type URL of the HTTP RBAC filter config.
pub const HTTP_RBAC_TYPE: &str = "envoy.extensions.filters.http.rbac.v3.RBAC";

/// Envoy's default `listener_filters_timeout`.
pub const DEFAULT_LISTENER_FILTERS_TIMEOUT: Duration = Duration::from_secs(15);

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
    /// `listener_filters_timeout`: how long the listener filters (tls_inspector,
    /// http_inspector) may wait for the first bytes; Envoy's default 15 s, `None` for `0s`
    /// (no limit, as Istio sets it).
    pub listener_filters_timeout: Option<Duration>,
    /// `continue_on_listener_filters_timeout`: at the timeout, choose the filter chain with
    /// what was found (else the connection is closed).
    pub continue_on_listener_filters_timeout: bool,
    /// A UDP listener (`socket_address.protocol: UDP`) and its `udp_proxy`; `None` for TCP.
    /// skiff's proxy never binds these: only the kernel fast path serves them.
    pub udp: Option<UdpProxy>,
    /// Extensions accepted without being run (optional or observational, `model::compat`),
    /// sorted, each once: what `skiff.unsupported.<name>` counts.
    pub unsupported: Vec<String>,
    /// The listener's `access_log`: one record per connection, whatever its chain.
    pub access_log: Vec<AccessLog>,
}

impl Listener {
    /// Every secret its filter chains' TLS contexts refer to by SDS, in chain order.
    pub fn sds_refs(&self) -> impl Iterator<Item = &SdsRef> {
        self.filter_chains
            .iter()
            .chain(self.default_filter_chain.iter())
            .filter_map(|fc| fc.tls.as_deref())
            .flat_map(|t| t.common.sds_refs())
    }
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
    /// The `envoy.filters.network.rbac` filters among them, in order: each decides every
    /// connection on the chain before the terminal filter runs.
    pub rbac: Vec<NetworkRbacFilter>,
    /// What the terminal filter does.
    pub action: NetworkAction,
    /// The chain's `DownstreamTlsContext`: connections it selects are TLS-terminated with
    /// it; `None` for raw buffer (plaintext).
    pub tls: Option<Arc<DownstreamTls>>,
    /// The network `istio.stats` filter among `filters`: Istio's TCP metrics are recorded.
    pub istio_stats: Option<super::istio::IstioStats>,
}

/// One `envoy.filters.network.rbac` filter of a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRbacFilter {
    /// The filter's name.
    pub name: String,
    /// Its rules.
    pub config: NetworkRbac,
    /// Its counters' names (`<stat_prefix>rbac.allowed`, ...), computed once here.
    pub stats: rbac::StatNames,
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
    Http(Arc<HttpManager>),
    /// A terminal filter skiff does not run; connections on this chain are closed. Conversion
    /// never produces it any more (such chains are refused, `model::compat`).
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
    /// `max_connect_attempts` (default 1, at least 1).
    pub max_connect_attempts: u32,
    /// `max_downstream_connection_duration` (default none; at least 1 ms).
    pub max_downstream_connection_duration: Option<Duration>,
    /// `hash_policy` (at most one): what RING_HASH / MAGLEV hash. `None`: no hash, so those
    /// policies pick a random host, as Envoy's do.
    pub hash_policy: Option<TcpHashPolicy>,
    /// The listener's `per_connection_buffer_limit_bytes` (default 1 MiB): the most a copy
    /// step moves at once.
    pub buffer_limit: u32,
    /// tcp_proxy's `access_log`: one record per proxied connection.
    pub access_log: Vec<AccessLog>,
}

/// tcp_proxy's `hash_policy` entry (`envoy.type.v3.HashPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpHashPolicy {
    /// `source_ip`: the downstream address.
    SourceIp,
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
    /// `http_filters` before the router, as classified by `model::compat`.
    pub http_filters: Vec<HttpFilter>,
    /// The HTTP filters skiff runs on every request before the router (RBAC), in
    /// configuration order.
    pub filters: Vec<RunFilter>,
    /// The fault filters among them, in order.
    pub faults: Vec<FaultFilter>,
    /// `xff_num_trusted_hops`: which `x-forwarded-for` entry is the downstream remote address.
    pub xff_num_trusted_hops: u32,
    /// `use_remote_address`: the downstream peer is the trusted client address (append it to
    /// `x-forwarded-for`, overwrite `x-forwarded-proto`).
    pub use_remote_address: bool,
    /// `upgrade_configs`: (upgrade type lowercase, `enabled`) pairs. A type not listed is never
    /// upgraded (403); routes may flip `enabled` per type.
    pub upgrades: Vec<(String, bool)>,
    /// `server_name` (Envoy's default `envoy`) and how it goes into the `server` header.
    pub server_header: ServerHeader,
    /// Timeouts and limits of the connection and its streams.
    pub limits: HttpLimits,
    /// `forward_client_cert_details`: what happens to `x-forwarded-client-cert`.
    pub forward_client_cert: ForwardClientCert,
    /// `set_current_client_cert_details`: what APPEND_FORWARD and SANITIZE_SET put in it.
    pub client_cert_details: ClientCertDetails,
    /// The HTTP `istio.stats` filter: Istio's request metrics are recorded.
    pub istio_stats: Option<super::istio::IstioStats>,
    /// The HCM's `access_log`: one record per request.
    pub access_log: Vec<AccessLog>,
}

/// `forward_client_cert_details`: how the HCM treats `x-forwarded-client-cert` (XFCC).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardClientCert {
    /// SANITIZE (Envoy's default): the header is removed.
    #[default]
    Sanitize,
    /// FORWARD_ONLY: kept as received on mutual TLS connections, removed on others.
    ForwardOnly,
    /// APPEND_FORWARD: on mutual TLS connections this hop's element is appended; removed on
    /// others.
    AppendForward,
    /// SANITIZE_SET: on mutual TLS connections replaced by this hop's element; removed on
    /// others.
    SanitizeSet,
    /// ALWAYS_FORWARD_ONLY: kept as received, whatever the connection.
    AlwaysForwardOnly,
}

impl ForwardClientCert {
    /// Whether this hop writes its own element (so the connection's details are needed).
    pub fn sets_details(self) -> bool {
        matches!(
            self,
            ForwardClientCert::AppendForward | ForwardClientCert::SanitizeSet
        )
    }
}

/// `set_current_client_cert_details`: the peer-certificate fields of this hop's XFCC
/// element, besides `By` and `Hash` which Envoy always writes. `cert` and `chain` (URL-encoded
/// PEM) are refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCertDetails {
    /// `subject`: `Subject="<RFC 2253 subject>"`.
    pub subject: bool,
    /// `uri`: one `URI=` per URI SAN (an empty `URI=` when there is none).
    pub uri: bool,
    /// `dns`: one `DNS=` per DNS SAN.
    pub dns: bool,
}

/// The HCM's timeouts and limits, with Envoy's defaults (`None`: disabled).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLimits {
    /// `stream_idle_timeout` (default 5 min; 0 disables): a stream with no activity either
    /// way for this long ends (408 before the response started, else reset). A route's
    /// `idle_timeout` overrides it.
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout` (default none): the whole request must arrive within this (408).
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout` (default none): the request head must arrive within this.
    pub request_headers_timeout: Option<Duration>,
    /// `common_http_protocol_options.idle_timeout` (default 1 h; 0 disables): a connection
    /// without streams for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration` (default none): the connection
    /// is drained after this long.
    pub max_connection_duration: Option<Duration>,
    /// `common_http_protocol_options.max_requests_per_connection` (default none): the
    /// connection is drained after this many requests.
    pub max_requests_per_connection: Option<u32>,
    /// `common_http_protocol_options.max_headers_count` (default 100).
    pub max_headers_count: u32,
    /// `max_request_headers_kb` (default 60, at most 8192).
    pub max_request_headers_kb: u32,
    /// `drain_timeout` (default 5 s): after a drain notice of the connection's own limits (idle,
    /// max duration, max requests) the connection gets this long before it is closed.
    pub drain_timeout: Duration,
    /// The listener's `per_connection_buffer_limit_bytes` (default 1 MiB): bounds the request
    /// body kept for retries and the HTTP/1 read buffer.
    pub buffer_limit: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            stream_idle_timeout: Some(Duration::from_secs(300)),
            request_timeout: None,
            request_headers_timeout: None,
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            max_requests_per_connection: None,
            max_headers_count: 100,
            max_request_headers_kb: 60,
            drain_timeout: Duration::from_secs(5),
            buffer_limit: DEFAULT_BUFFER_LIMIT,
        }
    }
}

/// An optional duration where zero (or absent, with `default`) means "disabled".
fn timeout_or(
    d: Option<&envoy_types::pb::google::protobuf::Duration>,
    default: Option<Duration>,
    field: &str,
) -> Result<Option<Duration>, FieldError> {
    match d {
        Some(d) => {
            let d = duration(d).map_err(|e| e.within(field))?;
            Ok((!d.is_zero()).then_some(d))
        }
        None => Ok(default),
    }
}

fn http_limits(h: &hcm::HttpConnectionManager) -> Result<HttpLimits, FieldError> {
    let d = HttpLimits::default();
    let at = |f: &str| format!("typed_config.{f}");
    let common = h.common_http_protocol_options.as_ref();
    let cat = |f: &str| format!("typed_config.common_http_protocol_options.{f}");
    let max_headers_count = match common.and_then(|c| c.max_headers_count.as_ref()) {
        Some(v) if v.value < 1 => {
            return Err(FieldError::new(
                cat("max_headers_count"),
                "must be at least 1",
            ));
        }
        Some(v) => v.value,
        None => d.max_headers_count,
    };
    let max_request_headers_kb = match &h.max_request_headers_kb {
        Some(v) if v.value == 0 || v.value > 8192 => {
            return Err(FieldError::new(
                at("max_request_headers_kb"),
                format!("{} is outside 1..=8192", v.value),
            ));
        }
        Some(v) => v.value,
        None => d.max_request_headers_kb,
    };
    Ok(HttpLimits {
        stream_idle_timeout: timeout_or(
            h.stream_idle_timeout.as_ref(),
            d.stream_idle_timeout,
            &at("stream_idle_timeout"),
        )?,
        request_timeout: timeout_or(h.request_timeout.as_ref(), None, &at("request_timeout"))?,
        request_headers_timeout: timeout_or(
            h.request_headers_timeout.as_ref(),
            None,
            &at("request_headers_timeout"),
        )?,
        idle_timeout: timeout_or(
            common.and_then(|c| c.idle_timeout.as_ref()),
            d.idle_timeout,
            &cat("idle_timeout"),
        )?,
        max_connection_duration: timeout_or(
            common.and_then(|c| c.max_connection_duration.as_ref()),
            None,
            &cat("max_connection_duration"),
        )?,
        max_requests_per_connection: common
            .and_then(|c| c.max_requests_per_connection.as_ref())
            .map(|v| v.value)
            .filter(|v| *v > 0),
        max_headers_count,
        max_request_headers_kb,
        drain_timeout: match &h.drain_timeout {
            Some(t) => duration(t).map_err(|e| e.within(at("drain_timeout")))?,
            None => d.drain_timeout,
        },
        buffer_limit: d.buffer_limit,
    })
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

/// An HTTP filter skiff runs before the router.
#[derive(Debug, Clone, PartialEq)]
pub enum RunFilter {
    /// `envoy.filters.http.rbac`.
    Rbac(Arc<HttpRbacFilter>),
}

/// One `envoy.filters.http.rbac` filter of a connection manager.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRbacFilter {
    /// The filter's name: routes' `typed_per_filter_config` entries under it override it.
    pub name: String,
    /// Its rules.
    pub config: HttpRbac,
    /// Its counters' names under the HCM's (`http.<prefix>.rbac.allowed`, ...).
    pub stats: rbac::StatNames,
}

/// One entry of `http_filters` before the router.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpFilter {
    /// Filter name.
    pub name: String,
    /// Config type (the `typed_config` type, or the first of `config_discovery.type_urls`).
    pub type_name: String,
    /// What skiff does with it.
    pub disposition: FilterDisposition,
}

/// What skiff does with an HTTP filter it accepted (`model::compat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterDisposition {
    /// Run (the fault filter), or a no-op as configured (cors without policies), or pending
    /// an engine (rbac).
    Honoured,
    /// Optional or observational: accepted, not run (`skiff.unsupported.<name>`).
    OptionalSkipped,
    /// `disabled: true` and not a filter skiff runs: it acts only where a route enables it,
    /// and route configurations that would enable it are refused.
    Disabled,
}

/// Type URL of the router filter config.
pub const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";
/// Name Envoy gives the router filter.
pub const ROUTER_NAME: &str = "envoy.filters.http.router";

/// Envoy's default TCP proxy idle timeout.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

fn type_name(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or(&any.type_url)
}

/// HTTP filter names Envoy accepted before typed configs (`envoy.router`...), mapped to the
/// table's names.
fn legacy_http_name(name: &str) -> &str {
    match name {
        "envoy.router" => ROUTER_NAME,
        "envoy.fault" => "envoy.filters.http.fault",
        "envoy.cors" => "envoy.filters.http.cors",
        n => n,
    }
}

/// Application protocols http_inspector can report; any other ALPN needs TLS inspection.
const PLAINTEXT_ALPN: [&str; 3] = ["http/1.0", "http/1.1", "h2c"];

impl FilterChainMatch {
    /// Whether only a connection that TLS inspection recognised can select a chain with this
    /// match: it needs `transport_protocol: tls`, server names or an ALPN http_inspector
    /// cannot report.
    pub fn needs_tls_inspection(&self) -> bool {
        self.transport_protocol == "tls"
            || !self.server_names.is_empty()
            || (!self.application_protocols.is_empty()
                && !self
                    .application_protocols
                    .iter()
                    .any(|p| PLAINTEXT_ALPN.contains(&p.as_str())))
    }
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
    // Honour or refuse: what skiff's tcp_proxy step does not do must not be served as plain TCP.
    let unrun = [
        (
            t.tunneling_config.is_some(),
            "typed_config.tunneling_config",
        ),
        (t.metadata_match.is_some(), "typed_config.metadata_match"),
        (t.on_demand.is_some(), "typed_config.on_demand"),
    ];
    if let Some((_, field)) = unrun.iter().find(|(set, _)| *set) {
        return Err(compat::refuse(compat::F_TCP_PROXY_UNRUN, *field));
    }
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
                if c.metadata_match.is_some() {
                    return Err(compat::refuse(
                        compat::F_TCP_PROXY_UNRUN,
                        format!("typed_config.weighted_clusters.clusters[{i}].metadata_match"),
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
    let idle_timeout = timeout_or(
        t.idle_timeout.as_ref(),
        Some(DEFAULT_TCP_IDLE_TIMEOUT),
        "typed_config.idle_timeout",
    )?;
    let max_connect_attempts = match &t.max_connect_attempts {
        Some(v) if v.value < 1 => {
            return Err(FieldError::new(
                "typed_config.max_connect_attempts",
                "must be at least 1",
            ));
        }
        Some(v) => v.value,
        None => 1,
    };
    let max_downstream_connection_duration = match &t.max_downstream_connection_duration {
        Some(d) => {
            let d = duration(d)
                .map_err(|e| e.within("typed_config.max_downstream_connection_duration"))?;
            if d < Duration::from_millis(1) {
                return Err(FieldError::new(
                    "typed_config.max_downstream_connection_duration",
                    "must be at least 1ms",
                ));
            }
            Some(d)
        }
        None => None,
    };
    use envoy_types::pb::envoy::r#type::v3::hash_policy::PolicySpecifier as Ps;
    let hash_policy = match t.hash_policy.as_slice() {
        [] => None,
        [one] => match &one.policy_specifier {
            Some(Ps::SourceIp(_)) => Some(TcpHashPolicy::SourceIp),
            // skiff keeps no filter state: refused rather than hashing nothing silently.
            Some(Ps::FilterState(_)) => {
                return Err(FieldError::new(
                    "typed_config.hash_policy[0].filter_state",
                    "filter_state hashing is not supported",
                ));
            }
            None => {
                return Err(FieldError::new(
                    "typed_config.hash_policy[0]",
                    "needs source_ip or filter_state",
                ));
            }
        },
        _ => {
            return Err(FieldError::new(
                "typed_config.hash_policy",
                "at most one hash policy",
            ));
        }
    };
    #[allow(deprecated)]
    let periodic = t.access_log_flush_interval.is_some()
        || t.flush_access_log_on_connected
        || t.access_log_options.is_some();
    if periodic {
        return Err(compat::refuse(
            compat::F_ACCESS_LOG_FLUSH,
            "typed_config.access_log_options",
        ));
    }
    let access_log = access_logs(&t.access_log, "typed_config.access_log")?;
    Ok(TcpProxy {
        access_log,
        stat_prefix: t.stat_prefix,
        cluster,
        idle_timeout,
        max_connect_attempts,
        max_downstream_connection_duration,
        hash_policy,
        buffer_limit: DEFAULT_BUFFER_LIMIT,
    })
}

/// What [`http_filters`] finds: every filter as classified, the ones skiff runs before the
/// router, and the fault filters.
type HttpFilterSets = (Vec<HttpFilter>, Vec<RunFilter>, Vec<FaultFilter>);

/// `http_filters` under the compatibility rule: every one as classified, the ones skiff runs
/// before the router (RBAC), and the fault filters' configurations.
fn http_filters(h: &hcm::HttpConnectionManager) -> Result<HttpFilterSets, FieldError> {
    use hcm::http_filter::ConfigType;
    let mut out = Vec::new();
    let mut run = Vec::new();
    let mut faults = Vec::new();
    let n = h.http_filters.len();
    for (i, f) in h.http_filters.iter().enumerate() {
        let at = format!("typed_config.http_filters[{i}]");
        let type_name = match &f.config_type {
            Some(ConfigType::TypedConfig(a)) => compat::type_name(a),
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
        let is_rbac =
            type_name == HTTP_RBAC_TYPE || (type_name.is_empty() && f.name == rbac::HTTP_FILTER);
        if is_rbac {
            let filter = http_rbac(f, &h.stat_prefix).map_err(|e| e.within(&at))?;
            run.push(RunFilter::Rbac(Arc::new(filter)));
            out.push(HttpFilter {
                name: f.name.clone(),
                type_name,
                disposition: FilterDisposition::Honoured,
            });
            continue;
        }
        let lookup_name = if type_name.is_empty() {
            legacy_http_name(&f.name)
        } else {
            f.name.as_str()
        };
        // Envoy's `disabled: true` filter acts only where a route enables it.
        let verdict =
            match compat::classify(Kind::HttpFilter, lookup_name, &type_name, f.is_optional) {
                Ok(v) => v,
                Err(_) if f.disabled => Verdict::Skip(f.name.clone()),
                Err(reason) => return Err(FieldError::new(at, reason.to_string())),
            };
        let disposition = match &verdict {
            Verdict::Run(e) if e.type_name == compat::FAULT_TYPE => {
                let any = match &f.config_type {
                    Some(ConfigType::TypedConfig(a)) => Some(a),
                    _ => None,
                };
                let config = match any {
                    Some(a) => super::fault::fault(&a.value).map_err(|e| e.within(&at))?,
                    // ECDS or by name only: an empty fault config injects nothing.
                    None => super::fault::fault(&[]).map_err(|e| e.within(&at))?,
                };
                faults.push(FaultFilter {
                    name: f.name.clone(),
                    disabled: f.disabled,
                    config: Arc::new(config),
                });
                FilterDisposition::Honoured
            }
            Verdict::Run(_) => FilterDisposition::Honoured,
            Verdict::Skip(_) if f.disabled => FilterDisposition::Disabled,
            Verdict::Skip(_) => FilterDisposition::OptionalSkipped,
        };
        out.push(HttpFilter {
            name: f.name.clone(),
            type_name,
            disposition,
        });
    }
    Ok((out, run, faults))
}

/// The HTTP `istio.stats` filter of an HCM, converted (the last one, if several).
fn http_istio_stats(
    h: &hcm::HttpConnectionManager,
) -> Result<Option<super::istio::IstioStats>, FieldError> {
    use hcm::http_filter::ConfigType;
    let mut out = None;
    for (i, f) in h.http_filters.iter().enumerate() {
        let any = match &f.config_type {
            Some(ConfigType::TypedConfig(a)) => Some(a),
            _ => None,
        };
        let t = any.map(compat::type_name).unwrap_or_default();
        if !f.disabled && super::istio::is_stats_filter(&f.name, &t) {
            out = Some(
                super::istio::plugin_config(any)
                    .map_err(|e| e.within(format!("typed_config.http_filters[{i}]")))?,
            );
        }
    }
    Ok(out)
}

/// An `envoy.filters.http.rbac` entry of `http_filters`, converted. Refused where skiff could
/// not run it as Envoy would: a filter disabled by default (only routes would enable it) or
/// configured through ECDS.
fn http_rbac(f: &hcm::HttpFilter, hcm_stat_prefix: &str) -> Result<HttpRbacFilter, FieldError> {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_pb;
    use hcm::http_filter::ConfigType;
    if f.disabled {
        return Err(FieldError::new(
            "disabled",
            format!(
                "RBAC filter {:?} disabled by default (enabled per route) is not supported",
                f.name
            ),
        ));
    }
    let p = match &f.config_type {
        Some(ConfigType::TypedConfig(a)) => {
            http_pb::Rbac::decode(a.value.as_slice()).map_err(|e| {
                FieldError::new("typed_config", format!("invalid {HTTP_RBAC_TYPE}: {e}"))
            })?
        }
        Some(ConfigType::ConfigDiscovery(_)) => {
            return Err(FieldError::new(
                "config_discovery",
                format!("RBAC filter {:?} through ECDS is not supported", f.name),
            ));
        }
        // By name only: an empty configuration, which enforces nothing (as Envoy's).
        None => http_pb::Rbac::default(),
    };
    let config = HttpRbac::try_from(&p).map_err(|e| {
        FieldError::from(e)
            .within("typed_config")
            .prefixed(&format!("RBAC filter {:?}: ", f.name))
    })?;
    Ok(HttpRbacFilter {
        name: f.name.clone(),
        stats: config.stat_names(hcm_stat_prefix),
        config,
    })
}

/// An `envoy.filters.network.rbac` filter of a chain, converted.
fn network_rbac(f: &pb::Filter) -> Result<NetworkRbacFilter, FieldError> {
    use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_pb;
    use pb::filter::ConfigType;
    let p = match &f.config_type {
        Some(ConfigType::TypedConfig(a)) => {
            net_pb::Rbac::decode(a.value.as_slice()).map_err(|e| {
                FieldError::new("typed_config", format!("invalid {NETWORK_RBAC_TYPE}: {e}"))
            })?
        }
        Some(ConfigType::ConfigDiscovery(_)) => {
            return Err(FieldError::new(
                "config_discovery",
                format!("RBAC filter {:?} through ECDS is not supported", f.name),
            ));
        }
        None => net_pb::Rbac::default(),
    };
    let config = NetworkRbac::try_from(&p).map_err(|e| {
        FieldError::from(e)
            .within("typed_config")
            .prefixed(&format!("RBAC filter {:?}: ", f.name))
    })?;
    Ok(NetworkRbacFilter {
        name: f.name.clone(),
        stats: config.stat_names(),
        config,
    })
}

/// Says which filter (or chain) a field error belongs to, in front of its reason.
trait Prefixed {
    fn prefixed(self, what: &str) -> Self;
}

impl Prefixed for FieldError {
    fn prefixed(mut self, what: &str) -> Self {
        self.reason.insert_str(0, what);
        self
    }
}

/// Whether a non-terminal network filter is `envoy.filters.network.rbac`.
fn is_network_rbac(f: &pb::Filter) -> bool {
    use pb::filter::ConfigType;
    match &f.config_type {
        Some(ConfigType::TypedConfig(a)) => type_name(a) == NETWORK_RBAC_TYPE,
        Some(ConfigType::ConfigDiscovery(d)) => d
            .type_urls
            .iter()
            .any(|u| u.rsplit('/').next() == Some(NETWORK_RBAC_TYPE)),
        None => f.name == rbac::NETWORK_FILTER,
    }
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
    let (http_filters, filters, faults) = http_filters(&h)?;
    let (forward_client_cert, client_cert_details) = client_cert(&h)?;
    let istio_stats = http_istio_stats(&h)?;
    #[allow(deprecated)]
    let periodic = h.access_log_flush_interval.is_some()
        || h.flush_access_log_on_new_request
        || h.access_log_options.is_some();
    if periodic {
        return Err(compat::refuse(
            compat::F_ACCESS_LOG_FLUSH,
            "typed_config.access_log_options",
        ));
    }
    Ok(HttpManager {
        access_log: access_logs(&h.access_log, "typed_config.access_log")?,
        forward_client_cert,
        client_cert_details,
        istio_stats,
        limits: http_limits(&h)?,
        http_filters,
        filters,
        faults,
        xff_num_trusted_hops: h.xff_num_trusted_hops,
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

/// `forward_client_cert_details` and `set_current_client_cert_details`.
fn client_cert(
    h: &hcm::HttpConnectionManager,
) -> Result<(ForwardClientCert, ClientCertDetails), FieldError> {
    use hcm::http_connection_manager::ForwardClientCertDetails as F;
    let mode = match F::try_from(h.forward_client_cert_details) {
        Ok(F::Sanitize) => ForwardClientCert::Sanitize,
        Ok(F::ForwardOnly) => ForwardClientCert::ForwardOnly,
        Ok(F::AppendForward) => ForwardClientCert::AppendForward,
        Ok(F::SanitizeSet) => ForwardClientCert::SanitizeSet,
        Ok(F::AlwaysForwardOnly) => ForwardClientCert::AlwaysForwardOnly,
        Err(_) => {
            return Err(FieldError::new(
                "typed_config.forward_client_cert_details",
                format!("unknown value {}", h.forward_client_cert_details),
            ));
        }
    };
    if h.forward_client_cert_matcher.is_some() {
        return Err(compat::refuse(
            compat::F_XFCC_PEM,
            "typed_config.forward_client_cert_matcher",
        ));
    }
    let Some(d) = &h.set_current_client_cert_details else {
        return Ok((mode, ClientCertDetails::default()));
    };
    let other_format = d.format != 0;
    for (set, field) in [
        (d.cert, "cert"),
        (d.chain, "chain"),
        (d.issuer, "issuer"),
        (other_format, "format"),
    ] {
        if set {
            return Err(compat::refuse(
                compat::F_XFCC_PEM,
                format!("typed_config.set_current_client_cert_details.{field}"),
            ));
        }
    }
    Ok((
        mode,
        ClientCertDetails {
            subject: d.subject.as_ref().is_some_and(|b| b.value),
            uri: d.uri,
            dns: d.dns,
        },
    ))
}

impl FilterChain {
    /// Convert one chain; `unsupported` collects what is accepted without running.
    fn from_proto(fc: &pb::FilterChain, unsupported: &mut Vec<String>) -> Result<Self, FieldError> {
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
        let config_type = |f: &pb::Filter| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => compat::type_name(any),
            _ => String::new(),
        };
        // Honour or refuse (model::compat): every filter before the terminal one.
        for (i, f) in before.iter().enumerate() {
            let t = config_type(f);
            match compat::classify(Kind::NetworkFilter, &f.name, &t, false) {
                Ok(Verdict::Run(e)) if e.type_name == TCP_PROXY_TYPE || e.type_name == HCM_TYPE => {
                    return Err(FieldError::new(
                        format!("filters[{i}]"),
                        format!("terminal filter {:?} must be the last filter", f.name),
                    ));
                }
                Ok(Verdict::Run(_)) => {}
                Ok(Verdict::Skip(name)) => unsupported.push(name),
                Err(reason) => {
                    return Err(FieldError::new(format!("filters[{i}]"), reason.to_string()));
                }
            }
        }
        let action = match &last.config_type {
            Some(ConfigType::TypedConfig(any)) => match type_name(any) {
                TCP_PROXY_TYPE => NetworkAction::TcpProxy(
                    tcp_proxy(any).map_err(|e| e.within(format!("filters[{n}]")))?,
                ),
                HCM_TYPE => NetworkAction::Http(Arc::new(
                    http_manager(any).map_err(|e| e.within(format!("filters[{n}]")))?,
                )),
                _ => {
                    let t = config_type(last);
                    let reason = match compat::classify(Kind::NetworkFilter, &last.name, &t, false)
                    {
                        Ok(_) => format!("the last filter must be terminal, not {:?}", last.name),
                        Err(reason) => reason.to_string(),
                    };
                    return Err(FieldError::new(format!("filters[{n}]"), reason));
                }
            },
            _ => {
                return Err(FieldError::new(
                    format!("filters[{n}]"),
                    format!(
                        "terminal filter {:?} has no typed_config skiff can run",
                        last.name
                    ),
                ));
            }
        };
        // RBAC filters decide each connection in order; a configuration skiff cannot
        // evaluate rejects the listener (a policy silently skipped would let a DENY through).
        let mut rbac = Vec::new();
        for (i, f) in before.iter().enumerate() {
            if is_network_rbac(f) {
                rbac.push(network_rbac(f).map_err(|e| {
                    e.within(format!("filters[{i}]"))
                        .prefixed(&format!("filter chain {:?}: ", fc.name))
                })?);
            }
        }
        if let NetworkAction::Http(h) = &action {
            for f in &h.http_filters {
                if f.disposition != FilterDisposition::Honoured {
                    unsupported.push(f.name.clone());
                }
            }
        }
        // Istio's TCP metrics: the network `istio.stats` filter (only tcp_proxy chains; an
        // HCM's filter is its HTTP `istio.stats`).
        let mut istio_stats = None;
        for (i, f) in before.iter().enumerate() {
            if super::istio::is_stats_filter(&f.name, &config_type(f)) {
                let any = match &f.config_type {
                    Some(ConfigType::TypedConfig(a)) => Some(a),
                    _ => None,
                };
                istio_stats = Some(
                    super::istio::plugin_config(any)
                        .map_err(|e| e.within(format!("filters[{i}]")))?,
                );
            }
        }
        let tls = match &fc.transport_socket {
            Some(ts) => {
                super::tls::downstream_socket(ts).map_err(|e| e.within("transport_socket"))?
            }
            None => None,
        };
        Ok(FilterChain {
            name: fc.name.clone(),
            matcher,
            filters: before.iter().map(|f| f.name.clone()).collect(),
            rbac,
            action,
            tls,
            istio_stats,
        })
    }
}

/// `envoy.filters.listener.tls_inspector`.
const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";

/// The listener filters by their canonical names (a filter is known by its typed config's
/// type, whatever it is called), with Envoy's automatic TLS inspector: chains that match on
/// `transport_protocol: tls`, or on server names or application protocols without a
/// transport protocol, get one when none is configured (Envoy adds it, with a warning).
fn listener_filter_names(l: &pb::Listener) -> Vec<String> {
    use pb::listener_filter::ConfigType;
    let mut names: Vec<String> = l
        .listener_filters
        .iter()
        .map(|f| {
            let t = match &f.config_type {
                Some(ConfigType::TypedConfig(any)) => compat::type_name(any),
                _ => String::new(),
            };
            match t.as_str() {
                "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
                    TLS_INSPECTOR.to_string()
                }
                "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector" => {
                    "envoy.filters.listener.http_inspector".to_string()
                }
                _ => f.name.clone(),
            }
        })
        .collect();
    let needs_tls = l.filter_chains.iter().any(|fc| {
        fc.filter_chain_match.as_ref().is_some_and(|m| {
            m.transport_protocol == "tls"
                || (m.transport_protocol.is_empty()
                    && (!m.server_names.is_empty() || !m.application_protocols.is_empty()))
        })
    });
    if needs_tls && !names.iter().any(|n| n == TLS_INSPECTOR) {
        tracing::warn!(
            listener = %l.name,
            "filter chain match rules need the TLS inspector listener filter, which is not configured: adding it (as Envoy does)"
        );
        names.push(TLS_INSPECTOR.to_string());
    }
    names
}

/// Honour or refuse every listener filter (`udp_proxy` is checked by the UDP path).
fn listener_filters(
    filters: &[pb::ListenerFilter],
    unsupported: &mut Vec<String>,
) -> Result<(), FieldError> {
    use pb::listener_filter::ConfigType;
    for (i, f) in filters.iter().enumerate() {
        let t = match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => compat::type_name(any),
            _ => String::new(),
        };
        match compat::classify(Kind::ListenerFilter, &f.name, &t, false) {
            Ok(Verdict::Run(_)) => {}
            Ok(Verdict::Skip(name)) => unsupported.push(name),
            Err(reason) => {
                return Err(FieldError::new(
                    format!("listener_filters[{i}]"),
                    reason.to_string(),
                ));
            }
        }
    }
    Ok(())
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
        // Honour or refuse (model::compat): the xDS matcher API is not evaluated, so a
        // listener that selects its chains with it is refused rather than served first-chain.
        if l.filter_chain_matcher.is_some() {
            return Err(err(compat::refuse(
                compat::F_FILTER_CHAIN_MATCHER,
                "filter_chain_matcher",
            )));
        }
        let mut unsupported = Vec::new();
        listener_filters(&l.listener_filters, &mut unsupported).map_err(err)?;
        let mut filter_chains = Vec::with_capacity(l.filter_chains.len());
        for (i, fc) in l.filter_chains.iter().enumerate() {
            filter_chains.push(
                FilterChain::from_proto(fc, &mut unsupported)
                    .map_err(|e| err(e.within(format!("[{i}]")).within("filter_chains")))?,
            );
        }
        let mut default_filter_chain = match &l.default_filter_chain {
            Some(fc) => Some(
                FilterChain::from_proto(fc, &mut unsupported)
                    .map_err(|e| err(e.within("default_filter_chain")))?,
            ),
            None => None,
        };
        unsupported.sort();
        unsupported.dedup();
        // The listener's buffer limit bounds what its chains' filters buffer.
        let buffer_limit = l
            .per_connection_buffer_limit_bytes
            .as_ref()
            .map_or(DEFAULT_BUFFER_LIMIT, |v| v.value);
        for fc in filter_chains
            .iter_mut()
            .chain(default_filter_chain.as_mut())
        {
            match &mut fc.action {
                NetworkAction::TcpProxy(t) => t.buffer_limit = buffer_limit,
                NetworkAction::Http(h) => {
                    let h = Arc::make_mut(h);
                    h.limits.buffer_limit = buffer_limit;
                    // Istio's reporter follows the listener's direction.
                    if let Some(s) = &mut h.istio_stats {
                        s.set_direction(l.traffic_direction);
                    }
                }
                NetworkAction::Unsupported { .. } => {}
            }
            if let Some(s) = &mut fc.istio_stats {
                s.set_direction(l.traffic_direction);
            }
        }
        // A UDP listener's work is its udp_proxy listener filter; it has no filter chains.
        if udp.is_none() && filter_chains.is_empty() && default_filter_chain.is_none() {
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
            listener_filters: listener_filter_names(l),
            listener_filters_timeout: match &l.listener_filters_timeout {
                None => Some(DEFAULT_LISTENER_FILTERS_TIMEOUT),
                Some(d) => {
                    let d = duration(d).map_err(|e| err(e.within("listener_filters_timeout")))?;
                    (!d.is_zero()).then_some(d)
                }
            },
            continue_on_listener_filters_timeout: l.continue_on_listener_filters_timeout,
            udp,
            unsupported,
            access_log: access_logs(&l.access_log, "access_log").map_err(err)?,
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

    fn pb_duration(ms: i64) -> Option<envoy_types::pb::google::protobuf::Duration> {
        Some(envoy_types::pb::google::protobuf::Duration {
            seconds: ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        })
    }

    #[test]
    fn tcp_proxy_limits_have_envoys_defaults_and_are_read() {
        use envoy_types::pb::envoy::r#type::v3 as ty;
        let base = tcp::TcpProxy {
            stat_prefix: "s".into(),
            cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster("c".into())),
            ..Default::default()
        };
        let t = tcp_proxy(&any_of(TCP_PROXY_TYPE, &base)).unwrap();
        assert_eq!(t.idle_timeout, Some(DEFAULT_TCP_IDLE_TIMEOUT));
        assert_eq!(t.max_connect_attempts, 1);
        assert_eq!(t.max_downstream_connection_duration, None);
        assert_eq!(t.hash_policy, None, "no hash_policy: no hash (random pick)");
        let set = tcp::TcpProxy {
            idle_timeout: pb_duration(0),
            max_connect_attempts: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 3 }),
            max_downstream_connection_duration: pb_duration(250),
            hash_policy: vec![ty::HashPolicy {
                policy_specifier: Some(ty::hash_policy::PolicySpecifier::SourceIp(
                    Default::default(),
                )),
            }],
            ..base.clone()
        };
        let t = tcp_proxy(&any_of(TCP_PROXY_TYPE, &set)).unwrap();
        assert_eq!(t.idle_timeout, None, "0s disables");
        assert_eq!(t.max_connect_attempts, 3);
        assert_eq!(
            t.max_downstream_connection_duration,
            Some(Duration::from_millis(250))
        );
        assert_eq!(t.hash_policy, Some(TcpHashPolicy::SourceIp));
        let refused = [
            (
                tcp::TcpProxy {
                    hash_policy: vec![ty::HashPolicy {
                        policy_specifier: Some(ty::hash_policy::PolicySpecifier::FilterState(
                            ty::hash_policy::FilterState { key: "k".into() },
                        )),
                    }],
                    ..base.clone()
                },
                "typed_config.hash_policy[0].filter_state",
            ),
            (
                tcp::TcpProxy {
                    max_connect_attempts: Some(envoy_types::pb::google::protobuf::UInt32Value {
                        value: 0,
                    }),
                    ..base.clone()
                },
                "typed_config.max_connect_attempts",
            ),
            (
                tcp::TcpProxy {
                    max_downstream_connection_duration: pb_duration(0),
                    ..base.clone()
                },
                "typed_config.max_downstream_connection_duration",
            ),
            // Not run by skiff: refused, never served as plain TCP.
            (
                tcp::TcpProxy {
                    tunneling_config: Some(tcp::tcp_proxy::TunnelingConfig {
                        hostname: "h:443".into(),
                        ..Default::default()
                    }),
                    ..base.clone()
                },
                "typed_config.tunneling_config",
            ),
            (
                tcp::TcpProxy {
                    metadata_match: Some(Default::default()),
                    ..base.clone()
                },
                "typed_config.metadata_match",
            ),
        ];
        for (t, field) in refused {
            let e = tcp_proxy(&any_of(TCP_PROXY_TYPE, &t)).unwrap_err();
            assert_eq!(e.field, field);
        }
    }

    #[test]
    fn hcm_limits_have_envoys_defaults_and_are_read() {
        let d = convert(&inline(vec![router()])).unwrap().limits;
        assert_eq!(d, HttpLimits::default());
        assert_eq!(d.stream_idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(d.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(d.request_timeout, None);
        let mut h = inline(vec![router()]);
        h.stream_idle_timeout = pb_duration(0);
        h.request_timeout = pb_duration(200);
        h.request_headers_timeout = pb_duration(300);
        h.drain_timeout = pb_duration(100);
        h.max_request_headers_kb =
            Some(envoy_types::pb::google::protobuf::UInt32Value { value: 16 });
        h.common_http_protocol_options = Some(
            envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions {
                idle_timeout: pb_duration(400),
                max_connection_duration: pb_duration(500),
                max_requests_per_connection: Some(envoy_types::pb::google::protobuf::UInt32Value {
                    value: 2,
                }),
                max_headers_count: Some(envoy_types::pb::google::protobuf::UInt32Value {
                    value: 20,
                }),
                ..Default::default()
            },
        );
        let l = convert(&h).unwrap().limits;
        assert_eq!(l.stream_idle_timeout, None);
        assert_eq!(l.request_timeout, Some(Duration::from_millis(200)));
        assert_eq!(l.request_headers_timeout, Some(Duration::from_millis(300)));
        assert_eq!(l.idle_timeout, Some(Duration::from_millis(400)));
        assert_eq!(l.max_connection_duration, Some(Duration::from_millis(500)));
        assert_eq!(l.max_requests_per_connection, Some(2));
        assert_eq!(l.max_headers_count, 20);
        assert_eq!(l.max_request_headers_kb, 16);
        assert_eq!(l.drain_timeout, Duration::from_millis(100));
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
        // The fault filter runs; observational and unknown optional ones are skipped.
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
                ("envoy.filters.http.fault", FilterDisposition::Honoured),
                (
                    "istio.metadata_exchange",
                    FilterDisposition::OptionalSkipped
                ),
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
        assert!(e.reason.contains("\"acme.magic\""), "{}", e.reason);
        assert!(e.reason.contains("not optional"), "{}", e.reason);
        // No filters at all: Envoy installs the router by default.
        assert!(convert(&inline(vec![])).is_ok());
    }

    mod compat_rule {
        use super::*;
        use envoy_types::pb::envoy::config::core::v3 as core;
        use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_pb;

        fn tcp(cluster: &str) -> pb::Filter {
            pb::Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(pb::filter::ConfigType::TypedConfig(any_of(
                    TCP_PROXY_TYPE,
                    &tcp::TcpProxy {
                        stat_prefix: "s".into(),
                        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(
                            cluster.into(),
                        )),
                        ..Default::default()
                    },
                ))),
            }
        }

        fn named_filter(name: &str, type_name: &str) -> pb::Filter {
            pb::Filter {
                name: name.into(),
                config_type: Some(pb::filter::ConfigType::TypedConfig(Any {
                    type_url: format!("type.googleapis.com/{type_name}"),
                    value: vec![],
                })),
            }
        }

        /// Istio's inbound mTLS context: SDS `default` and `ROOTCA` from `sds-grpc`.
        fn tls_socket() -> core::TransportSocket {
            let sds = |name: &str| tls_pb::SdsSecretConfig {
                name: name.into(),
                sds_config: Some(core::ConfigSource {
                    config_source_specifier: Some(
                        core::config_source::ConfigSourceSpecifier::ApiConfigSource(
                            core::ApiConfigSource {
                                api_type: 2,
                                grpc_services: vec![core::GrpcService {
                                    target_specifier: Some(
                                        core::grpc_service::TargetSpecifier::EnvoyGrpc(
                                            core::grpc_service::EnvoyGrpc {
                                                cluster_name: "sds-grpc".into(),
                                                ..Default::default()
                                            },
                                        ),
                                    ),
                                    ..Default::default()
                                }],
                                ..Default::default()
                            },
                        ),
                    ),
                    ..Default::default()
                }),
            };
            let ctx = tls_pb::DownstreamTlsContext {
                common_tls_context: Some(tls_pb::CommonTlsContext {
                    alpn_protocols: vec!["istio".into()],
                    tls_certificate_sds_secret_configs: vec![sds("default")],
                    validation_context_type: Some(
                        tls_pb::common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                            sds("ROOTCA"),
                        ),
                    ),
                    ..Default::default()
                }),
                require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue {
                    value: true,
                }),
                ..Default::default()
            };
            core::TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
                    type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext".into(),
                    value: ctx.encode_to_vec(),
                })),
            }
        }

        fn listener(chains: Vec<pb::FilterChain>) -> pb::Listener {
            pb::Listener {
                name: "l".into(),
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: "0.0.0.0".into(),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(15006)),
                        ..Default::default()
                    })),
                }),
                filter_chains: chains,
                ..Default::default()
            }
        }

        #[test]
        fn the_tls_inspector_is_added_when_chains_need_it_and_known_by_its_type() {
            let chain = |m: pb::FilterChainMatch| pb::FilterChain {
                filter_chain_match: Some(m),
                filters: vec![tcp("c")],
                ..Default::default()
            };
            let has_inspector =
                |l: &Listener| l.listener_filters.iter().any(|f| f == TLS_INSPECTOR);
            let plain = Listener::try_from(&listener(vec![chain(Default::default())])).unwrap();
            assert!(!has_inspector(&plain));
            for m in [
                pb::FilterChainMatch {
                    transport_protocol: "tls".into(),
                    ..Default::default()
                },
                pb::FilterChainMatch {
                    server_names: vec!["a.example.com".into()],
                    ..Default::default()
                },
                pb::FilterChainMatch {
                    application_protocols: vec!["istio".into()],
                    ..Default::default()
                },
            ] {
                let l = Listener::try_from(&listener(vec![chain(m.clone())])).unwrap();
                assert!(has_inspector(&l), "{m:?}");
            }
            // Named otherwise, known by its type: not added twice.
            let mut pl = listener(vec![chain(pb::FilterChainMatch {
                transport_protocol: "tls".into(),
                ..Default::default()
            })]);
            pl.listener_filters = vec![pb::ListenerFilter {
                name: "my-inspector".into(),
                config_type: Some(pb::listener_filter::ConfigType::TypedConfig(Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector".into(),
                    value: vec![],
                })),
                ..Default::default()
            }];
            let l = Listener::try_from(&pl).unwrap();
            assert_eq!(l.listener_filters, vec![TLS_INSPECTOR.to_string()]);
        }

        #[test]
        fn listener_filters_timeout_defaults_to_15s_and_0s_means_none() {
            let plaintext = pb::FilterChain {
                filters: vec![tcp("c")],
                ..Default::default()
            };
            let mut pl = listener(vec![plaintext]);
            let l = Listener::try_from(&pl).expect("valid");
            assert_eq!(l.listener_filters_timeout, Some(Duration::from_secs(15)));
            assert!(!l.continue_on_listener_filters_timeout);
            // Istio's inbound: no timeout, and go on with what was found.
            pl.listener_filters_timeout = Some(Default::default());
            pl.continue_on_listener_filters_timeout = true;
            let l = Listener::try_from(&pl).expect("valid");
            assert_eq!(l.listener_filters_timeout, None);
            assert!(l.continue_on_listener_filters_timeout);
            pl.listener_filters_timeout = Some(envoy_types::pb::google::protobuf::Duration {
                seconds: -1,
                nanos: 0,
            });
            let e = Listener::try_from(&pl).unwrap_err();
            assert_eq!(e.field, "listener_filters_timeout");
        }

        #[test]
        fn tls_chains_are_honoured_with_their_context() {
            let tls_only = pb::FilterChain {
                filter_chain_match: Some(pb::FilterChainMatch {
                    transport_protocol: "tls".into(),
                    application_protocols: vec!["istio".into()],
                    ..Default::default()
                }),
                filters: vec![tcp("c")],
                transport_socket: Some(tls_socket()),
                ..Default::default()
            };
            let plaintext = pb::FilterChain {
                filters: vec![tcp("c")],
                ..Default::default()
            };
            let l = Listener::try_from(&listener(vec![tls_only, plaintext])).unwrap();
            let tls = l.filter_chains[0].tls.as_ref().unwrap();
            assert!(tls.require_client_certificate);
            assert_eq!(tls.common.alpn, ["istio"]);
            assert!(l.filter_chains[1].tls.is_none());
            assert_eq!(
                l.sds_refs().map(|r| r.name.as_str()).collect::<Vec<_>>(),
                ["default", "ROOTCA"]
            );
            // The default chain may terminate TLS as well.
            let mut pl = listener(vec![]);
            pl.default_filter_chain = Some(pb::FilterChain {
                filters: vec![tcp("c")],
                transport_socket: Some(tls_socket()),
                ..Default::default()
            });
            let l = Listener::try_from(&pl).unwrap();
            assert!(l.default_filter_chain.unwrap().tls.is_some());
            // A context skiff cannot honour refuses the listener, naming the field.
            let mut bad = pb::FilterChain {
                filters: vec![tcp("c")],
                transport_socket: Some(tls_socket()),
                ..Default::default()
            };
            if let Some(core::transport_socket::ConfigType::TypedConfig(a)) = bad
                .transport_socket
                .as_mut()
                .and_then(|t| t.config_type.as_mut())
            {
                let mut ctx = tls_pb::DownstreamTlsContext::decode(a.value.as_slice()).unwrap();
                ctx.require_sni =
                    Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
                a.value = ctx.encode_to_vec();
            }
            let e = Listener::try_from(&listener(vec![bad])).unwrap_err();
            assert_eq!(
                e.field,
                "filter_chains[0].transport_socket.typed_config.require_sni"
            );
        }

        #[test]
        fn filters_are_honoured_skipped_or_refused_by_name() {
            let chain = |filters| pb::FilterChain {
                filters,
                ..Default::default()
            };
            let l = Listener::try_from(&listener(vec![chain(vec![
                named_filter("istio.stats", "stats.PluginConfig"),
                named_filter(
                    "envoy.filters.network.rbac",
                    "envoy.extensions.filters.network.rbac.v3.RBAC",
                ),
                tcp("c"),
            ])]))
            .unwrap();
            // Istio's stats filter runs (`stats::istio`), the reporter from the direction.
            assert!(l.unsupported.is_empty(), "{:?}", l.unsupported);
            assert_eq!(
                l.filter_chains[0].istio_stats.as_ref().map(|s| s.reporter),
                Some(crate::model::istio::Reporter::Source)
            );
            let e = Listener::try_from(&listener(vec![chain(vec![
                named_filter(
                    "envoy.filters.network.ext_authz",
                    "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
                ),
                tcp("c"),
            ])]))
            .unwrap_err();
            assert_eq!(e.field, "filter_chains[0].filters[0]");
            assert!(e.reason.contains("envoy.filters.network.ext_authz"), "{e}");
            // An unknown terminal filter is refused, not served by closing connections.
            let e = Listener::try_from(&listener(vec![chain(vec![named_filter(
                "envoy.filters.network.redis_proxy",
                "envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
            )])]))
            .unwrap_err();
            assert!(e.reason.contains("redis_proxy"), "{e}");
            let mut pl = listener(vec![chain(vec![tcp("c")])]);
            pl.listener_filters = vec![pb::ListenerFilter {
                name: "envoy.filters.listener.proxy_protocol".into(),
                ..Default::default()
            }];
            let e = Listener::try_from(&pl).unwrap_err();
            assert_eq!(e.field, "listener_filters[0]");
        }

        #[test]
        fn filter_chain_matcher_is_refused_by_name() {
            let mut pl = listener(vec![]);
            pl.filter_chain_matcher = Some(xds_matcher::Matcher::default());
            let e = Listener::try_from(&pl).unwrap_err();
            assert_eq!(e.field, "filter_chain_matcher");
            assert!(e.reason.contains("not supported by skiff"), "{e}");
        }
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

    #[test]
    fn forward_client_cert_details_are_read_and_pem_details_refused() {
        use hcm::http_connection_manager::SetCurrentClientCertDetails;
        let mut h = inline(vec![]);
        assert_eq!(
            convert(&h).unwrap().forward_client_cert,
            ForwardClientCert::Sanitize,
            "Envoy's default"
        );
        // Istio's inbound.
        h.forward_client_cert_details = 2;
        h.set_current_client_cert_details = Some(SetCurrentClientCertDetails {
            subject: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
            dns: true,
            uri: true,
            ..Default::default()
        });
        let m = convert(&h).unwrap();
        assert_eq!(m.forward_client_cert, ForwardClientCert::AppendForward);
        assert!(m.forward_client_cert.sets_details());
        assert_eq!(
            m.client_cert_details,
            ClientCertDetails {
                subject: true,
                uri: true,
                dns: true
            }
        );
        for (mode, want) in [
            (1, ForwardClientCert::ForwardOnly),
            (3, ForwardClientCert::SanitizeSet),
            (4, ForwardClientCert::AlwaysForwardOnly),
        ] {
            h.forward_client_cert_details = mode;
            assert_eq!(convert(&h).unwrap().forward_client_cert, want);
        }
        for refused in ["cert", "chain", "issuer", "format"] {
            let mut d = SetCurrentClientCertDetails::default();
            match refused {
                "cert" => d.cert = true,
                "chain" => d.chain = true,
                "issuer" => d.issuer = true,
                _ => d.format = 1,
            }
            h.set_current_client_cert_details = Some(d);
            let e = convert(&h).unwrap_err();
            assert!(
                e.field
                    .ends_with(&format!("set_current_client_cert_details.{refused}")),
                "{e:?}"
            );
            assert!(e.reason.contains("not supported by skiff"), "{e:?}");
        }
    }

    mod rbac_filters {
        use super::*;

        fn listener(yaml: &str) -> Result<Listener, ModelError> {
            let v = skiff_proto::parse_text(yaml).unwrap();
            Listener::try_from(&skiff_proto::decode_json::<pb::Listener>(&v).unwrap())
        }

        const TCP: &str = r#"
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: t
        cluster: c
"#;

        fn with_network_rbac(rbac: &str) -> String {
            format!(
                r#"
name: l
address: {{ socket_address: {{ address: 127.0.0.1, port_value: 80 }} }}
filter_chains:
- name: chain-a
  filters:
    - name: istio.metadata_exchange
    - name: envoy.filters.network.rbac
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
        stat_prefix: tcp.
{rbac}{TCP}"#
            )
        }

        #[test]
        fn network_rbac_is_parsed_in_order_with_its_counter_names() {
            let l = listener(&with_network_rbac(
                "        rules: { action: DENY, policies: { p: { permissions: [{ any: true }], principals: [{ any: true }] } } }
",
            ))
            .unwrap();
            let c = &l.filter_chains[0];
            // Names stay listed (the BPF projection keeps such chains in the proxy).
            assert_eq!(
                c.filters,
                ["istio.metadata_exchange", "envoy.filters.network.rbac"]
            );
            assert_eq!(c.rbac.len(), 1);
            assert_eq!(c.rbac[0].stats.denied, "tcp.rbac.denied");
            let rules = c.rbac[0].config.rules.as_ref().unwrap();
            assert_eq!(rules.action, crate::rbac::Action::Deny);
        }

        #[test]
        fn an_rbac_filter_skiff_cannot_evaluate_rejects_the_listener() {
            let e = listener(&with_network_rbac(
                "        rules: { policies: { p: { permissions: [{ any: true }], principals: [{ metadata: { filter: f, path: [{ key: k }], value: { present_match: true } } }] } } }
",
            ))
            .unwrap_err();
            assert_eq!(e.name, "l");
            assert_eq!(
                e.field,
                "filter_chains[0].filters[1].typed_config.rules.policies[\"p\"].principals[0].metadata"
            );
            assert!(
                e.reason.contains("filter chain \"chain-a\""),
                "{}",
                e.reason
            );
            assert!(
                e.reason.contains("envoy.filters.network.rbac"),
                "{}",
                e.reason
            );
        }

        fn with_http_rbac(extra: &str) -> String {
            format!(
                r#"
name: h
address: {{ socket_address: {{ address: 127.0.0.1, port_value: 80 }} }}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: inbound_0.0.0.0_80
      xff_num_trusted_hops: 2
      route_config: {{ virtual_hosts: [{{ name: v, domains: ["*"] }}] }}
      http_filters:
      - name: envoy.filters.http.fault
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault }}
      - name: envoy.filters.http.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
          rules: {{ action: DENY, policies: {{ p: {{ permissions: [{{ url_path: {{ path: {{ prefix: /admin }} }} }}], principals: [{{ any: true }}] }} }} }}
{extra}      - name: envoy.filters.http.router
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
            )
        }

        #[test]
        fn http_rbac_is_honoured_and_keeps_its_place() {
            let l = listener(&with_http_rbac("")).unwrap();
            let NetworkAction::Http(m) = &l.filter_chains[0].action else {
                panic!("hcm");
            };
            let d: Vec<_> = m.http_filters.iter().map(|f| f.disposition).collect();
            assert_eq!(
                d,
                [FilterDisposition::Honoured, FilterDisposition::Honoured]
            );
            assert_eq!(m.xff_num_trusted_hops, 2);
            let [RunFilter::Rbac(r)] = m.filters.as_slice() else {
                panic!("one rbac filter: {:?}", m.filters);
            };
            assert_eq!(r.name, "envoy.filters.http.rbac");
            assert_eq!(r.stats.allowed, "http.inbound_0.0.0.0_80.rbac.allowed");
        }

        #[test]
        fn http_rbac_that_cannot_run_as_envoy_is_refused() {
            let disabled = with_http_rbac("").replace(
                "      - name: envoy.filters.http.rbac\n",
                "      - name: envoy.filters.http.rbac\n        disabled: true\n",
            );
            let e = listener(&disabled).unwrap_err();
            assert_eq!(
                e.field,
                "filter_chains[0].filters[0].typed_config.http_filters[1].disabled"
            );
            let bad = with_http_rbac("").replace("prefix: /admin", "safe_regex: { regex: \"(\" }");
            let e = listener(&bad).unwrap_err();
            assert!(
                e.field.starts_with(
                    "filter_chains[0].filters[0].typed_config.http_filters[1].typed_config.rules"
                ),
                "{}",
                e.field
            );
        }
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
