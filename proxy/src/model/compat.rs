//! Honour or refuse: the one table of every Envoy extension and field skiff may receive and
//! what it does with each (issue 14).
//!
//! The rule: whatever skiff receives is honoured, or the resource is rejected (a NACK whose
//! `error_detail` names the filter or field; the last good configuration keeps serving),
//! unless it is optional in Envoy's own terms (`is_optional: true`, or purely observational
//! like `istio.stats`): those are accepted without running, with one warning per process and
//! the gauge `skiff.unsupported.<name>` (how many current listeners carry it).
//!
//! The converters of `model` ask [`classify`] about every filter and transport socket, and
//! refuse the fields listed here through [`refuse`], so this table is what skiff does.
//! `docs/COMPATIBILITY.md` is rendered from it ([`render`]); a unit test fails when the file
//! drifts. Regenerate with `SKIFF_REGENERATE_COMPAT=1 cargo test -p skiff --lib compat`.

use std::collections::BTreeSet;
use std::sync::Mutex;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::FieldError;

/// Where an extension or field sits in Envoy's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `Listener.listener_filters`.
    ListenerFilter,
    /// `FilterChain.filters`.
    NetworkFilter,
    /// `HttpConnectionManager.http_filters`.
    HttpFilter,
    /// `transport_socket` of a filter chain or cluster.
    TransportSocket,
    /// A field of a listener, cluster or route.
    Field,
}

impl Kind {
    fn title(self) -> &'static str {
        match self {
            Kind::ListenerFilter => "Listener filters",
            Kind::NetworkFilter => "Network filters",
            Kind::HttpFilter => "HTTP filters",
            Kind::TransportSocket => "Transport sockets",
            Kind::Field => "Fields",
        }
    }

    fn all() -> [Kind; 5] {
        [
            Kind::ListenerFilter,
            Kind::NetworkFilter,
            Kind::HttpFilter,
            Kind::TransportSocket,
            Kind::Field,
        ]
    }
}

/// What skiff does with one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// skiff does what Envoy does.
    Honoured,
    /// Accepted only while it does nothing (Envoy would do nothing either); refused as soon
    /// as the configuration makes it act.
    NoOpOnly,
    /// Accepted without running: observational or optional in Envoy's terms. One warning and
    /// the gauge `skiff.unsupported.<name>`.
    Optional,
    /// The resource carrying it is rejected.
    Refused,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Honoured => "honoured",
            Status::NoOpOnly => "no-op only",
            Status::Optional => "optional (accepted, not run)",
            Status::Refused => "refused",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Where it sits.
    pub kind: Kind,
    /// Envoy's (or Istio's) canonical name; for fields, the field path.
    pub name: &'static str,
    /// Config type (without `type.googleapis.com/`); empty for fields.
    pub type_name: &'static str,
    /// What skiff does with it.
    pub status: Status,
    /// How, or why not.
    pub note: &'static str,
}

const fn e(
    kind: Kind,
    name: &'static str,
    type_name: &'static str,
    status: Status,
    note: &'static str,
) -> Entry {
    Entry {
        kind,
        name,
        type_name,
        status,
        note,
    }
}

use Kind::{Field, HttpFilter, ListenerFilter, NetworkFilter, TransportSocket};
use Status::{Honoured, NoOpOnly, Optional, Refused};

/// Type of the fault filter.
pub const FAULT_TYPE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
/// Type of the CORS filter.
pub const CORS_TYPE: &str = "envoy.extensions.filters.http.cors.v3.Cors";
/// Type of the raw_buffer transport socket.
pub const RAW_BUFFER_TYPE: &str = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
/// Wasm filter type (Istio's older stats and metadata exchange ran as builtin Wasm).
const WASM_TYPE: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";

/// Field path of the tcp_proxy options skiff does not run (tunnelling, subsets, on demand).
pub const F_TCP_PROXY_UNRUN: &str = "tcp_proxy.tunneling_config";
/// Access logs' periodic and on-start flushes.
pub const F_ACCESS_LOG_FLUSH: &str = "access_log_options";
/// Field path of a listener's `filter_chain_matcher`.
pub const F_FILTER_CHAIN_MATCHER: &str = "listener.filter_chain_matcher";
/// XFCC settings skiff does not honour (`cert`, `chain`, `issuer`, `format`, the matcher).
pub const F_XFCC_PEM: &str = "http_connection_manager.set_current_client_cert_details";
/// Field path of a cluster's `transport_socket_matches`.
pub const F_CLUSTER_TLS_MATCHES: &str = "cluster.transport_socket_matches";
/// SDS references (`SdsSecretConfig`).
pub const F_SDS: &str = "transport_socket.tls.sds_secret_config";
/// TLS fields skiff refuses (private key providers, CRLs, pins, renegotiation, ...).
pub const F_TLS_UNSUPPORTED: &str = "transport_socket.tls";
/// `tls_params` values rustls cannot honour.
pub const F_TLS_PARAMS: &str = "transport_socket.tls.tls_params";
/// TLS fields that only tune (session tickets, OCSP LENIENT, ...): optional in Envoy's terms.
pub const F_TLS_OPTIONAL: &str = "transport_socket.tls.optional";
/// `RouteMatch.dynamic_metadata`.
pub const F_DYNAMIC_METADATA: &str = "route.match.dynamic_metadata";
/// `RouteMatch.filter_state`.
pub const F_FILTER_STATE: &str = "route.match.filter_state";
/// `RouteMatch.cookies`.
pub const F_COOKIES: &str = "route.match.cookies";
/// CORS policies of virtual hosts and routes.
pub const F_CORS_POLICY: &str = "route.cors";
/// `typed_per_filter_config` of a filter skiff does not run.
pub const F_PER_FILTER: &str = "route.typed_per_filter_config";
/// Path specifiers skiff does not evaluate.
pub const F_PATH_SPECIFIER: &str = "route.match.path_specifier";
/// Header and string matchers skiff does not evaluate.
pub const F_MATCHER_KIND: &str = "route.match.headers";
/// Route actions skiff does not run.
pub const F_ROUTE_ACTION: &str = "route.action";

/// Every extension and field skiff knows, by kind. Anything not listed is refused, unless an
/// HTTP filter says `is_optional: true` (then it is skipped, as Envoy skips unknown optional
/// filters).
#[rustfmt::skip]
pub const TABLE: &[Entry] = &[
    // --- listener filters ---
    e(ListenerFilter, "envoy.filters.listener.original_dst",
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst", Honoured,
        "the original destination is read from the socket (SO_ORIGINAL_DST or the accepted address)"),
    e(ListenerFilter, "envoy.filters.listener.http_inspector",
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector", Honoured,
        "peeks the first bytes: `http/1.0`, `http/1.1` or `h2c` for filter chain matching"),
    e(ListenerFilter, "envoy.filters.listener.tls_inspector",
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", Honoured,
        "peeks the ClientHello without terminating: a TLS connection gets `transport_protocol: tls`, its SNI and its ALPN list for filter chain matching (`server_names`, `application_protocols`); anything else stays `raw_buffer`"),
    e(ListenerFilter, "envoy.filters.udp_listener.udp_proxy",
        "envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig", Honoured,
        "one cluster per UDP listener, served by the kernel fast path"),
    e(ListenerFilter, "envoy.filters.listener.proxy_protocol",
        "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol", Refused,
        "PROXY protocol headers are not parsed"),
    e(ListenerFilter, "set_dst_address", "istio.set_internal_dst_address.v1.Config", Refused,
        "sets the destination from filter state of internal listeners (ambient); not run"),
    // --- network filters ---
    e(NetworkFilter, "envoy.filters.network.tcp_proxy",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", Honoured,
        "terminal: cluster or weighted_clusters"),
    e(NetworkFilter, "envoy.filters.network.http_connection_manager",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        Honoured, "terminal: skiff's HTTP connection manager (RDS or inline routes)"),
    e(NetworkFilter, "envoy.filters.network.rbac",
        "envoy.extensions.filters.network.rbac.v3.RBAC", Honoured,
        "Envoy's RBAC on each connection before tcp_proxy/HCM (`dataplane::rbac`); rules it cannot evaluate (metadata, CEL, ...) refuse the listener"),
    e(NetworkFilter, "istio.metadata_exchange",
        "envoy.tcp.metadataexchange.config.MetadataExchange", Optional,
        "observational: exchanges peer metadata for telemetry"),
    e(NetworkFilter, "istio.stats", "stats.PluginConfig", Honoured,
        "Istio's TCP metrics (`istio_tcp_connections_opened_total`, `_closed_total`, `istio_tcp_sent_bytes_total`, `_received_bytes_total`) on tcp_proxy chains, served unprefixed in `/stats/prometheus` (`stats::istio`); `reporter`, `disable_host_header_fallback`, `tcp_reporting_duration` and the `metrics` overrides' `drop` and `tags_to_remove` honoured; `metrics[].dimensions` and `definitions` (CEL expressions) refused by field; `match` ignored as Istio's own filter does (documented there as not implemented); `rescoping_duration`/`scope_grace_period_duration` change nothing skiff reports; peers without mTLS are `unknown` (no metadata exchange)"),
    e(NetworkFilter, "istio_authn", "io.istio.network.authn.Config", Optional,
        "Istio's record of the peer identity as dynamic metadata; skiff's RBAC takes the peer's verified SPIFFE identity from the TLS handshake itself"),
    e(NetworkFilter, "envoy.filters.network.set_filter_state",
        "envoy.extensions.filters.network.set_filter_state.v3.Config", Refused,
        "filter state is not modelled"),
    e(NetworkFilter, "envoy.filters.network.ext_authz",
        "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz", Refused,
        "external authorization is not run: refusing keeps a CUSTOM policy from letting everything through"),
    e(NetworkFilter, "envoy.filters.network.local_ratelimit",
        "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit", Refused,
        "rate limits are not enforced"),
    // --- HTTP filters ---
    e(HttpFilter, "envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router",
        Honoured, "terminal: routes, retries, timeouts"),
    e(HttpFilter, "envoy.filters.http.fault", FAULT_TYPE, Honoured,
        "abort (http_status, grpc_status, header_abort) and delay (fixed_delay, header_delay) with percentages, headers, upstream_cluster, downstream_nodes, max_active_faults and per-route typed_per_filter_config; `http.<prefix>.fault.*` stats. Not run: response_rate_limit and runtime keys (skiff has no runtime: defaults apply)"),
    e(HttpFilter, "envoy.filters.http.cors", CORS_TYPE, NoOpOnly,
        "without a CORS policy on the virtual host or route it does nothing; a route configuration with a CORS policy is refused"),
    e(HttpFilter, "envoy.filters.http.rbac", "envoy.extensions.filters.http.rbac.v3.RBAC",
        Honoured, "Envoy's RBAC on each request before the router, 403 on deny, per-route RBACPerRoute (`http::filters`); rules it cannot evaluate refuse the listener"),
    e(HttpFilter, "envoy.filters.http.grpc_stats",
        "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", Optional,
        "observational: gRPC message counters"),
    e(HttpFilter, "istio.stats", "stats.PluginConfig", Honoured,
        "Istio's request metrics (`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`) with Istio's labels, served unprefixed in `/stats/prometheus` (`stats::istio`); `reporter`, `disable_host_header_fallback` and the `metrics` overrides' `drop` and `tags_to_remove` honoured; `metrics[].dimensions` and `definitions` (CEL expressions) refused by field; `match` ignored as Istio's own filter does"),
    e(HttpFilter, "istio.stats", WASM_TYPE, Honoured,
        "Istio's builtin-Wasm stats (older Istio) run as the native filter; the plugin's JSON `configuration` is read with the same rules (a `stat_prefix` other than `istio` refused; the Wasm VM's cache and separator settings set aside); other Wasm filters are refused"),
    e(HttpFilter, "istio.metadata_exchange", WASM_TYPE, Optional,
        "observational: peer metadata headers as builtin Wasm (older Istio)"),
    e(HttpFilter, "istio.metadata_exchange", "io.istio.http.peer_metadata.Config", Optional,
        "observational: peer metadata for telemetry"),
    e(HttpFilter, "istio.alpn", "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        Optional, "per-request override of the upstream TLS ALPN (`istio-http/1.1`, `istio-h2`); skiff offers the cluster's own `alpn_protocols`, which Istio's servers accept as well"),
    e(HttpFilter, "envoy.filters.http.compressor",
        "envoy.extensions.filters.http.compressor.v3.Compressor", Optional,
        "responses stay uncompressed (identity), which every client accepts"),
    e(HttpFilter, "connect_authority", "io.istio.http.connect_authority.Config", Refused,
        "CONNECT tunnel authority into filter state (ambient); not run"),
    e(HttpFilter, "connect_baggage", "io.istio.http.connect_baggage.Config", Refused,
        "baggage on CONNECT tunnels (ambient); not run"),
    e(HttpFilter, "envoy.filters.http.set_filter_state",
        "envoy.extensions.filters.http.set_filter_state.v3.Config", Refused,
        "filter state is not modelled"),
    e(HttpFilter, "envoy.filters.http.ext_authz",
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz", Refused,
        "external authorization is not run: refusing keeps a CUSTOM policy from letting everything through"),
    e(HttpFilter, "envoy.filters.http.jwt_authn",
        "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication", Refused,
        "JWTs are not validated"),
    e(HttpFilter, "envoy.filters.http.local_ratelimit",
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit", Refused,
        "rate limits are not enforced"),
    e(HttpFilter, "envoy.filters.http.lua", "envoy.extensions.filters.http.lua.v3.Lua", Refused,
        "no Lua"),
    e(HttpFilter, "envoy.filters.http.wasm", WASM_TYPE, Refused, "no Wasm"),
    // --- transport sockets ---
    e(TransportSocket, "envoy.transport_sockets.raw_buffer", RAW_BUFFER_TYPE, Honoured,
        "plaintext"),
    e(TransportSocket, "envoy.transport_sockets.tls",
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", Honoured,
        "terminated with rustls (ring): one certificate inline or over SDS, `validation_context` / `validation_context_sds_secret_config` / `combined_validation_context` (trusted_ca inline or file, `match_typed_subject_alt_names`, `match_subject_alt_names`), `require_client_certificate`, `alpn_protocols`, `tls_params` (see the fields below)"),
    e(TransportSocket, "envoy.transport_sockets.tls",
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", Honoured,
        "dialled with rustls (ring): `sni`, `alpn_protocols`, a client certificate inline or over SDS, the same validation as downstream; Envoy's client defaults (TLSv1_2 unless `tls_params` says otherwise)"),
    e(TransportSocket, "envoy.transport_sockets.internal_upstream",
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        Refused, "connections to internal listeners are not made"),
    // --- fields ---
    e(Field, F_FILTER_CHAIN_MATCHER, "", Refused,
        "the xDS matcher API for filter chains is not evaluated"),
    e(Field, F_CLUSTER_TLS_MATCHES, "", Honoured,
        "each endpoint is dialled with the socket of the first entry whose `match` is a subset of its `envoy.transport_socket_match` metadata, else `transport_socket` (Istio's auto-mTLS: `tlsMode: istio` endpoints get mTLS, the others plaintext)"),
    e(Field, "http_connection_manager.forward_client_cert_details", "", Honoured,
        "Envoy's `x-forwarded-client-cert` handling: SANITIZE (default) removes it; FORWARD_ONLY keeps it on mutual TLS connections; APPEND_FORWARD appends and SANITIZE_SET sets this hop's element on mutual TLS connections (`By=` the URI SANs of skiff's own certificate, `Hash=` the SHA-256 of the client's certificate, then the `set_current_client_cert_details` fields); all three remove it on other connections; ALWAYS_FORWARD_ONLY keeps it always"),
    e(Field, F_XFCC_PEM, "", Refused,
        "`subject`, `uri` and `dns` are honoured (`Subject=\"...\"`, `URI=`, `DNS=`); `cert` and `chain` (URL-encoded PEM of the client's certificate and chain), `issuer`, a `format` other than Envoy's own, and `forward_client_cert_matcher` are refused"),
    e(Field, "cluster.health_checks.transport_socket_match_criteria", "", Honoured,
        "active health checks dial each host with the cluster's transport socket, as the data path does (TLS with the snapshot's secrets; a failed handshake is a failed check): the one `transport_socket_match_criteria` selects among `transport_socket_matches` instead of the endpoint's metadata; `tls_options.alpn_protocols` replaces the context's ALPN for checks"),
    e(Field, "cluster.typed_extension_protocol_options.auto_config", "", Honoured,
        "HttpProtocolOptions `auto_config`: over TLS each connection offers ALPN `h2,http/1.1` (unless the TLS context sets `alpn_protocols`) and speaks HTTP/2 when the upstream selects `h2`, HTTP/1.1 otherwise; plaintext connections speak HTTP/1.1. `http3_protocol_options` in it is refused"),
    e(Field, F_SDS, "", Honoured,
        "SDS secrets by name: `sds_config: {ads: {}}` over the ADS stream (a cluster or listener warms until they arrive, up to `initial_fetch_timeout`), `api_config_source` GRPC/DELTA_GRPC with one `envoy_grpc` cluster (Istio's `sds-grpc` Unix socket), or none (the bootstrap's `static_resources.secrets`)"),
    e(Field, F_TLS_UNSUPPORTED, "", Refused,
        "private key providers, PKCS#12, encrypted keys, certificate provider instances and selectors, custom validators and handshakers, CRLs, certificate hash and SPKI pins, OTHER_NAME SAN matchers, system root certificates, `max_verify_depth`, ACCEPT_UNTRUSTED, `allow_expired_certificate`, signed certificate timestamps, renegotiation, `auto_host_sni`, `auto_sni_san_validation`, `require_sni`, strict OCSP stapling, key logs, watched directories, environment-variable data sources, SDS from files, `self` or google_grpc, session ticket keys and generic secrets over SDS, more than one certificate"),
    e(Field, F_TLS_PARAMS, "", Refused,
        "values rustls (ring) cannot honour: a version range without TLSv1_2 or TLSv1_3 (a wider range is clamped to them); a `cipher_suites` list without any of ECDHE-{ECDSA,RSA}-{AES128-GCM-SHA256,AES256-GCM-SHA384,CHACHA20-POLY1305}, or a `ecdh_curves` list without any of X25519, P-256, P-384 (otherwise the lists are honoured as allowlists: names rustls lacks, such as Istio's `AES256-GCM-SHA384`, are not offered); names BoringSSL does not know; `signature_algorithms`, `compliance_policies`"),
    e(Field, F_TLS_OPTIONAL, "", Optional,
        "`session_ticket_keys`, `session_timeout`, `disable_stateful_session_resumption`, `prefer_client_ciphers`, `max_session_keys`, `enforce_rsa_key_usage`, `ocsp_staple` with LENIENT stapling, `suppress_client_ca_list`: accepted and not applied, as Envoy treats them (they tune resumption and stapling, not who may connect)"),
    e(Field, "route.match.runtime_fraction", "", Honoured,
        "`default_value` (skiff has no runtime, so the default applies, as in Envoy without a runtime override)"),
    e(Field, "route.match.grpc", "", Honoured,
        "`content-type` is `application/grpc` or `application/grpc+<codec>`"),
    e(Field, "route.match.tls_context", "", Honoured,
        "evaluated as a plaintext connection: `presented`/`validated: true` never match"),
    e(Field, F_DYNAMIC_METADATA, "", Refused, "dynamic metadata is not modelled"),
    e(Field, F_FILTER_STATE, "", Refused, "filter state is not modelled"),
    e(Field, F_COOKIES, "", Refused, "cookie matchers are not evaluated"),
    e(Field, F_CORS_POLICY, "", Refused,
        "CORS policies (virtual host `cors`, route `cors`, `typed_per_filter_config` of the cors filter) are not run"),
    e(Field, F_PATH_SPECIFIER, "", Refused,
        "`connect_matcher` (CONNECT is not proxied) and `path_match_policy` (URI templates) are not evaluated; prefix, path, safe_regex and path_separated_prefix are"),
    e(Field, F_MATCHER_KIND, "", Refused,
        "`range_match` and custom string matchers are not evaluated (exact, prefix, suffix, contains, safe_regex, present are, in headers, query parameters, retries and virtual clusters)"),
    e(Field, F_ROUTE_ACTION, "", Refused,
        "`filter_action`, `non_forwarding_action` and cluster specifier plugins are not run (route, redirect, direct_response are)"),
    e(Field, "route.route.hash_policy", "", Honoured,
        "header, cookie (no cookie generation), source_ip, query_parameter; `filter_state` is refused"),
    e(Field, F_TCP_PROXY_UNRUN, "", Refused,
        "tcp_proxy `tunneling_config` (HTTP CONNECT tunnels), `metadata_match` (subset balancing) and `on_demand` are not run: such a chain would send raw bytes or reach the wrong hosts"),
    e(Field, "access_log", "", Honoured,
        "on listeners (one line per connection, every chain; `NR filter_chain_not_found` when no chain matches), tcp_proxy (one per connection) and the HTTP connection manager (one per request, when its response body ends; a request the client leaves unanswered: code 0, `DC`, `downstream_remote_disconnect`): `envoy.access_loggers.file` (`path`; `/dev/stdout`, `/dev/stderr` are the streams), `envoy.access_loggers.stdout` / `stderr`; one writer thread per file behind a bounded queue (a full queue drops the line: `access_logs.file.write_dropped`), files reopened by `POST /reopen_logs`; other loggers (gRPC, OpenTelemetry, Wasm) are refused"),
    e(Field, "access_log.log_format", "", Honoured,
        "`text_format`, `text_format_source` (inline or file), `json_format` (typed values, `null` when missing, sorted keys, `omit_empty_values`) and the deprecated `format` / `json_format` of the file logger; command operators START_TIME(fmt), DURATION, RESPONSE_CODE, RESPONSE_FLAGS, RESPONSE_CODE_DETAILS, CONNECTION_TERMINATION_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON, BYTES_RECEIVED, BYTES_SENT, PROTOCOL, REQ(h?alt):N, RESP(h?alt):N, UPSTREAM_HOST, UPSTREAM_CLUSTER(_RAW), UPSTREAM_LOCAL_ADDRESS, DOWNSTREAM_(DIRECT_)REMOTE_ADDRESS(_WITHOUT_PORT), DOWNSTREAM_LOCAL_ADDRESS(_WITHOUT_PORT), DOWNSTREAM_LOCAL_PORT, REQUESTED_SERVER_NAME, ROUTE_NAME, DOWNSTREAM_PEER_URI_SAN, DOWNSTREAM_TLS_VERSION; any other operator, `formatters` extensions and `omit_empty_values` on text are refused"),
    e(Field, "access_log.filter", "", Honoured,
        "`status_code_filter`, `duration_filter` (runtime keys: their default, skiff has no runtime), `not_health_check_filter` (no request is a health check: skiff runs no health-check filter), `response_flag_filter`, `and_filter`, `or_filter`; `runtime_filter`, `traceable_filter`, `header_filter`, `grpc_status_filter`, `extension_filter` (CEL), `metadata_filter` and `log_type_filter` are refused"),
    e(Field, F_ACCESS_LOG_FLUSH, "", Refused,
        "tcp_proxy's and the HCM's `access_log_options`, `access_log_flush_interval`, `flush_access_log_on_connected` / `flush_access_log_on_new_request`: lines are written once, at the end"),
    e(Field, F_PER_FILTER, "", Refused,
        "a per-route config of a filter skiff does not honour (observational and optional ones excepted)"),
];

/// What the model does with one configured filter or transport socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Run as in Envoy (or a no-op that the caller checks further).
    Run(&'static Entry),
    /// Accepted without running; the name is what the gauge and the warning say.
    Skip(String),
}

/// The row of `kind` for a configured `name` and config type (TypedStruct already unwrapped;
/// empty when the config names no type). A type identifies the extension; a few generic
/// types (Wasm) also need the name. Without a type, Envoy looks the extension up by name.
pub fn lookup(kind: Kind, name: &str, type_name: &str) -> Option<&'static Entry> {
    let rows = || TABLE.iter().filter(move |e| e.kind == kind);
    if type_name.is_empty() {
        return rows().find(|e| e.name == name);
    }
    let by_type: Vec<&Entry> = rows().filter(|e| e.type_name == type_name).collect();
    match by_type.as_slice() {
        [] => None,
        [one] => Some(one),
        many => many
            .iter()
            .find(|e| e.name == name)
            .or_else(|| many.iter().find(|e| e.status == Refused))
            .copied(),
    }
}

/// Why a configured filter or transport socket is refused; `Display` is the model's
/// `error_detail` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A row of the table refuses it, for the row's reason.
    #[error("{shown} is not supported by skiff: {note}")]
    Listed {
        /// What was configured (kind, name and config type).
        shown: String,
        /// The table's note.
        note: &'static str,
    },
    /// No row names it and it is not optional.
    #[error("{shown} is not supported by skiff and not optional")]
    Unknown {
        /// What was configured (kind, name and config type).
        shown: String,
    },
}

/// Decide about one filter or transport socket: honoured, skipped (optional), or a refusal
/// naming it. `is_optional` is the HTTP filter's own flag.
pub fn classify(
    kind: Kind,
    name: &str,
    type_name: &str,
    is_optional: bool,
) -> Result<Verdict, Refusal> {
    let what = match kind {
        ListenerFilter => "listener filter",
        NetworkFilter => "network filter",
        HttpFilter => "HTTP filter",
        TransportSocket => "transport socket",
        Field => "field",
    };
    let shown = if type_name.is_empty() {
        format!("{what} {name:?}")
    } else {
        format!("{what} {name:?} ({type_name})")
    };
    match lookup(kind, name, type_name) {
        Some(e) if matches!(e.status, Honoured | NoOpOnly) => Ok(Verdict::Run(e)),
        Some(e) if e.status == Optional => {
            warn_once(e.name);
            Ok(Verdict::Skip(e.name.to_string()))
        }
        _ if is_optional => {
            warn_once(name);
            Ok(Verdict::Skip(name.to_string()))
        }
        Some(e) => Err(Refusal::Listed {
            shown,
            note: e.note,
        }),
        None => Err(Refusal::Unknown { shown }),
    }
}

/// The refusal of a field listed in the table, at `field` (the path inside the resource).
pub fn refuse(entry_name: &str, field: impl Into<String>) -> FieldError {
    let note = TABLE
        .iter()
        .find(|e| e.kind == Field && e.name == entry_name)
        .map_or("not supported", |e| e.note);
    FieldError::new(field, format!("not supported by skiff: {note}"))
}

/// One warning per process and name.
fn warn_once(name: &str) {
    static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut w = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if w.insert(name.to_string()) {
        tracing::warn!(
            extension = name,
            "accepted without running it (optional or observational); counted in skiff.unsupported.{name}"
        );
    }
}

/// The config type inside an `Any`, looking through `udpa.type.v1.TypedStruct` and
/// `xds.type.v3.TypedStruct` (Istio wraps its own filters in them).
pub fn type_name(any: &Any) -> String {
    let outer = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
    if outer == "udpa.type.v1.TypedStruct" || outer == "xds.type.v3.TypedStruct" {
        #[derive(Clone, PartialEq, Message)]
        struct TypedStructUrl {
            #[prost(string, tag = "1")]
            type_url: String,
        }
        if let Ok(t) = TypedStructUrl::decode(any.value.as_slice()) {
            return t.type_url.rsplit('/').next().unwrap_or("").to_string();
        }
    }
    outer.to_string()
}

/// Start marker of the generated part of `docs/COMPATIBILITY.md`.
pub const BEGIN: &str = "<!-- BEGIN GENERATED: proxy/src/model/compat.rs TABLE -->";
/// End marker of the generated part.
pub const END: &str = "<!-- END GENERATED -->";

/// The table as Markdown (the generated part of `docs/COMPATIBILITY.md`).
pub fn render() -> String {
    let mut out = String::new();
    for kind in Kind::all() {
        out.push_str(&format!("\n### {}\n\n", kind.title()));
        if kind == Field {
            out.push_str("| field | status | what skiff does |\n|---|---|---|\n");
        } else {
            out.push_str("| name | config type | status | what skiff does |\n|---|---|---|---|\n");
        }
        for e in TABLE.iter().filter(|e| e.kind == kind) {
            let note = e.note.replace('|', "\\|");
            if kind == Field {
                out.push_str(&format!(
                    "| `{}` | {} | {note} |\n",
                    e.name,
                    e.status.label()
                ));
            } else {
                out.push_str(&format!(
                    "| `{}` | `{}` | {} | {note} |\n",
                    e.name,
                    e.type_name,
                    e.status.label()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_lookup_by_type_then_name() {
        let e = lookup(HttpFilter, "whatever", FAULT_TYPE).unwrap();
        assert_eq!(e.status, Honoured);
        // Wasm needs the name: Istio's builtin stats run natively, anything else is refused.
        assert_eq!(
            lookup(HttpFilter, "istio.stats", WASM_TYPE).unwrap().status,
            Honoured
        );
        assert_eq!(
            lookup(HttpFilter, "my.wasm", WASM_TYPE).unwrap().status,
            Refused
        );
        // By name when no type is given.
        assert_eq!(
            lookup(ListenerFilter, "envoy.filters.listener.original_dst", "")
                .unwrap()
                .status,
            Honoured
        );
        assert!(lookup(HttpFilter, "acme", "acme.Magic").is_none());
    }

    #[test]
    fn compat_classify_follows_the_rule() {
        assert!(matches!(
            classify(HttpFilter, "f", FAULT_TYPE, false),
            Ok(Verdict::Run(_))
        ));
        assert_eq!(
            classify(
                HttpFilter,
                "g",
                "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                false
            ),
            Ok(Verdict::Skip("envoy.filters.http.grpc_stats".into()))
        );
        assert_eq!(
            classify(HttpFilter, "acme", "acme.Magic", true),
            Ok(Verdict::Skip("acme".into()))
        );
        let e = classify(HttpFilter, "acme", "acme.Magic", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"acme\"") && e.contains("not optional"), "{e}");
        let e = classify(
            HttpFilter,
            "envoy.filters.http.ext_authz",
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ext_authz"), "{e}");
    }

    #[test]
    fn compat_type_name_looks_through_typed_struct() {
        #[derive(Clone, PartialEq, Message)]
        struct Ts {
            #[prost(string, tag = "1")]
            type_url: String,
        }
        let any = Any {
            type_url: "type.googleapis.com/udpa.type.v1.TypedStruct".into(),
            value: Ts {
                type_url: "type.googleapis.com/stats.PluginConfig".into(),
            }
            .encode_to_vec(),
        };
        assert_eq!(type_name(&any), "stats.PluginConfig");
    }

    /// Fails when `docs/COMPATIBILITY.md` no longer shows this table. Regenerate with
    /// `SKIFF_REGENERATE_COMPAT=1 cargo test -p skiff --lib compat`.
    #[test]
    fn compat_doc_matches_the_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/COMPATIBILITY.md");
        let text = std::fs::read_to_string(path).expect("docs/COMPATIBILITY.md exists");
        let (Some(b), Some(en)) = (text.find(BEGIN), text.find(END)) else {
            panic!("docs/COMPATIBILITY.md lacks the {BEGIN} / {END} markers");
        };
        let current = &text[b + BEGIN.len()..en];
        let wanted = format!("\n{}\n", render().trim());
        if current != wanted {
            if std::env::var_os("SKIFF_REGENERATE_COMPAT").is_some() {
                let new = format!("{}{BEGIN}{wanted}{}", &text[..b], &text[en..]);
                std::fs::write(path, new).expect("write docs/COMPATIBILITY.md");
                return;
            }
            panic!(
                "docs/COMPATIBILITY.md drifted from model::compat::TABLE; regenerate with \
                 `SKIFF_REGENERATE_COMPAT=1 cargo test -p skiff --lib compat`"
            );
        }
    }
}
