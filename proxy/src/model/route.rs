//! Route configurations (RDS or inline): virtual hosts, their routes and the clusters they name.
//!
//! Validation follows Envoy where it rejects up front (names, unique virtual hosts and domains,
//! regular expressions that do not compile, redirect and direct-response codes). Matchers,
//! actions and per-filter configs skiff does not run are refused (honour or refuse,
//! `model::compat`): the route configuration is NACKed naming the field, instead of loading
//! a route that would behave differently from Envoy.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as pb;

use super::compat;
use super::fault::{self, FaultOverride, Percent};
use super::matchers::{HeaderMatch, HeaderMatchKind, Pattern, header_match, regex, string_match};
use super::{FieldError, ModelError, duration};
use crate::rbac::HttpRbacPerRoute;

/// Type URL of the HTTP RBAC filter's per-route config.
pub const RBAC_PER_ROUTE_TYPE: &str = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
/// Type URL of the generic per-route filter wrapper (`disabled`, `is_optional`, `config`).
pub const FILTER_CONFIG_TYPE: &str = "envoy.config.route.v3.FilterConfig";

/// Envoy's default route timeout (`RouteAction.timeout` unset).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default retry back-off base interval.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(25);

/// Validated `RouteConfiguration`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Route configuration name (what an HCM's `rds.route_config_name` asks for).
    pub name: String,
    /// Virtual hosts in configuration order.
    pub virtual_hosts: Vec<VirtualHost>,
    /// `ignore_port_in_host_matching`: drop the `:port` of Host before choosing a virtual host.
    pub ignore_port_in_host_matching: bool,
    /// Header changes of the whole configuration (applied after the virtual host's).
    pub headers: HeaderOps,
    /// `typed_per_filter_config` skiff applies (the least specific level).
    pub per_filter: PerFilter,
}

/// One `VirtualHost`.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHost {
    /// Name (unique within the route configuration).
    pub name: String,
    /// `domains` (`*`, `example.com`, `*.example.com` ...).
    pub domains: Vec<String>,
    /// Routes in configuration order (the first match wins).
    pub routes: Vec<Route>,
    /// Clusters named by `route.cluster` or `route.weighted_clusters`, sorted.
    pub clusters: BTreeSet<String>,
    /// Header changes of this virtual host (applied after the route's).
    pub headers: HeaderOps,
    /// `retry_policy`: used by routes that have none of their own.
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// `include_request_attempt_count`: send `x-envoy-attempt-count` upstream.
    pub include_request_attempt_count: bool,
    /// `include_attempt_count_in_response`: return `x-envoy-attempt-count` downstream.
    pub include_attempt_count_in_response: bool,
    /// `virtual_clusters`: (name, header matchers); a request counts in the first whose
    /// matchers all match, else in `other` (`vhost.<name>.vcluster.<vc>.*` stats).
    pub virtual_clusters: Vec<(String, Vec<HeaderMatch>)>,
    /// `typed_per_filter_config` skiff applies (used when the route has none for a filter).
    pub per_filter: PerFilter,
    /// `typed_per_filter_config` of fault filters, by filter name (a route's wins).
    pub faults: Vec<(String, FaultOverride)>,
}

/// One `Route`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Route name (may be empty).
    pub name: String,
    /// When the route applies.
    pub matcher: RouteMatch,
    /// What it does.
    pub action: RouteAction,
    /// Header changes of this route (applied first).
    pub headers: HeaderOps,
    /// `typed_per_filter_config` skiff applies (the most specific level).
    pub per_filter: PerFilter,
    /// `typed_per_filter_config` of fault filters, by filter name.
    pub faults: Vec<(String, FaultOverride)>,
}

/// The `typed_per_filter_config` entries skiff applies, by HTTP filter name. Entries of
/// filters skiff does not run are not kept.
pub type PerFilter = std::collections::BTreeMap<String, PerFilterConfig>;

/// One `typed_per_filter_config` entry skiff applies.
#[derive(Debug, Clone, PartialEq)]
pub enum PerFilterConfig {
    /// `FilterConfig { disabled: true }`: the filter does not run on this route.
    Disabled,
    /// `RBACPerRoute` (bare or inside a `FilterConfig`): replaces the RBAC filter's rules, or
    /// turns it off (no `rbac`).
    Rbac(Arc<HttpRbacPerRoute>),
}

/// The per-filter config that applies to `filter` on `route` of `vh` in `rc`: Envoy's most
/// specific one (route, then virtual host, then route configuration).
pub fn per_filter_config<'a>(
    rc: &'a RouteConfig,
    vh: &'a VirtualHost,
    route: Option<&'a Route>,
    filter: &str,
) -> Option<&'a PerFilterConfig> {
    route
        .and_then(|r| r.per_filter.get(filter))
        .or_else(|| vh.per_filter.get(filter))
        .or_else(|| rc.per_filter.get(filter))
}

/// `RouteMatch`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    /// Path specifier.
    pub path: PathMatch,
    /// `case_sensitive` (default true) for prefix, path and path_separated_prefix.
    pub case_sensitive: bool,
    /// Every header matcher must match.
    pub headers: Vec<HeaderMatch>,
    /// Every query parameter matcher must match.
    pub query_parameters: Vec<QueryMatch>,
    /// `runtime_fraction.default_value` (skiff has no runtime: the default applies).
    pub runtime_fraction: Option<Percent>,
    /// `grpc`: only requests whose `content-type` starts with `application/grpc`.
    pub grpc: bool,
    /// `tls_context` asks for a presented or validated client certificate, which a plaintext
    /// connection (every connection until issue 15) never has: the route never matches.
    pub requires_tls: bool,
}

/// `RouteMatch.path_specifier`.
#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    /// `prefix`: the beginning of `:path`.
    Prefix(String),
    /// `path`: the whole path without the query string.
    Path(String),
    /// `safe_regex`: the whole path without the query string.
    Regex(Pattern),
    /// `path_separated_prefix`: the path equals the prefix or continues it after a `/`.
    PathSeparatedPrefix(String),
    /// A specifier skiff does not run; the route never matches. The string says which.
    Unsupported(String),
}

/// One `QueryParameterMatcher`: the first value of `name` (percent-decoded) is tested.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryMatch {
    /// Parameter name.
    pub name: String,
    /// `present_match` (as `Present`) or `string_match`.
    pub kind: HeaderMatchKind,
}

/// `Route.action`.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    /// `route`: forward to a cluster.
    Forward(Box<Forward>),
    /// `direct_response`.
    Direct {
        /// HTTP status.
        status: u16,
        /// Inline body, if any.
        body: Option<String>,
    },
    /// `redirect`.
    Redirect(Redirect),
    /// An action skiff does not run (filter_action, cluster_specifier_plugin ...): 501.
    Unsupported(String),
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

/// Where a `RouteAction` sends the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `cluster` or `weighted_clusters`.
    Clusters(ClusterSpecifier),
    /// `cluster_header`: the cluster named by this request header (lowercase name); a missing
    /// header or unknown cluster is a 503 `NC`, as in Envoy.
    Header(String),
}

/// `host_rewrite_specifier`.
#[derive(Debug, Clone, PartialEq)]
pub enum HostRewrite {
    /// `host_rewrite_literal`.
    Literal(String),
    /// `auto_host_rewrite`: the host name of a DNS cluster's endpoint (EDS `hostname`s are not
    /// modelled, so other clusters keep the request's Host).
    Auto,
}

/// `RouteAction` (the parts skiff runs).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Target cluster(s).
    pub target: Target,
    /// `prefix_rewrite`: replaces the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// `regex_rewrite`: (pattern, substitution in `regex_lite` syntax) over the path.
    pub regex_rewrite: Option<(Pattern, String)>,
    /// `host_rewrite_literal` / `auto_host_rewrite`.
    pub host_rewrite: Option<HostRewrite>,
    /// `timeout` (default 15s; `0s` disables).
    pub timeout: Option<Duration>,
    /// `idle_timeout`: longest silence while the response streams (unset = none).
    pub idle_timeout: Option<Duration>,
    /// `retry_policy`; `None` falls back to the virtual host's.
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// `hash_policy`, in order.
    pub hash_policy: Vec<HashPolicy>,
    /// `upgrade_configs`: per upgrade type (lowercase), whether this route enables it
    /// (overrides the connection manager's `enabled`).
    pub upgrades: Vec<(String, bool)>,
    /// `max_stream_duration.grpc_timeout_header_max` or the deprecated `max_grpc_timeout`:
    /// when set, a gRPC request's `grpc-timeout` (absent: none) replaces `timeout`, capped by
    /// this value unless it is zero.
    pub grpc_timeout_max: Option<Duration>,
    /// `priority: HIGH`: the request takes the cluster's HIGH circuit-breaker thresholds.
    pub high_priority: bool,
}

/// One `RouteAction.HashPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct HashPolicy {
    /// What is hashed.
    pub kind: HashKind,
    /// `terminal`: stop at this policy when it produced a value.
    pub terminal: bool,
}

/// What a hash policy reads.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKind {
    /// A request header (lowercase name).
    Header(String),
    /// A cookie (no cookie generation: a missing cookie contributes nothing).
    Cookie(String),
    /// The downstream source IP.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
    /// A policy skiff does not run (filter_state); contributes nothing.
    Unsupported,
}

/// `RedirectAction`.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    /// `https_redirect` ("https") or `scheme_redirect`.
    pub scheme: Option<String>,
    /// `host_redirect`.
    pub host: Option<String>,
    /// `port_redirect`.
    pub port: Option<u16>,
    /// `path_redirect` or `prefix_rewrite`.
    pub path: Option<PathRedirect>,
    /// HTTP status (301 default, 302, 303, 307, 308).
    pub status: u16,
    /// `strip_query`.
    pub strip_query: bool,
}

/// How a redirect changes the path.
#[derive(Debug, Clone, PartialEq)]
pub enum PathRedirect {
    /// `path_redirect`: the whole path (a `?query` in it replaces the request's).
    Path(String),
    /// `prefix_rewrite`: replaces the prefix the route matched.
    Prefix(String),
}

/// `RetryPolicy`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// `retry_on` conditions.
    pub retry_on: RetryOn,
    /// `num_retries` (Envoy's default 1).
    pub num_retries: u32,
    /// `per_try_timeout` (unset = only the route timeout applies).
    pub per_try_timeout: Option<Duration>,
    /// `retry_back_off.base_interval` (default 25 ms).
    pub base_interval: Duration,
    /// `retry_back_off.max_interval` (default 10 x base).
    pub max_interval: Duration,
    /// `retry_host_predicate` holds `previous_hosts`.
    pub previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (default 1: no re-pick).
    pub host_selection_max_attempts: u32,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u16>,
    /// `retriable_headers`: under `retriable-headers`, a response matching any is retried
    /// (`:status` may be matched).
    pub retriable_headers: Vec<HeaderMatch>,
    /// `retriable_request_headers`: when set, only requests matching one of them are retried.
    pub retriable_request_headers: Vec<HeaderMatch>,
}

/// The conditions of `retry_on` (a comma-separated list in Envoy; unknown tokens are ignored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx, a reset, a connect failure or a per-try timeout.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, a reset, a connect failure or a per-try timeout.
    pub gateway_error: bool,
    /// `reset`: no response headers (disconnect, reset, per-try timeout).
    pub reset: bool,
    /// `reset-before-request`: reset before the request was sent.
    pub reset_before_request: bool,
    /// `connect-failure`: the upstream connect failed or timed out.
    pub connect_failure: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `refused-stream`: an HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// `retriable-status-codes`: the codes of `retriable_status_codes`.
    pub retriable_status_codes: bool,
    /// `retriable-headers`: responses matching `retriable_headers`.
    pub retriable_headers: bool,
    /// gRPC status codes (`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`) read from the `grpc-status` response header.
    pub grpc_codes: [bool; 17],
}

impl RetryOn {
    /// Every condition of either.
    pub fn union(self, o: RetryOn) -> RetryOn {
        let mut grpc_codes = self.grpc_codes;
        for (a, b) in grpc_codes.iter_mut().zip(o.grpc_codes) {
            *a |= b;
        }
        RetryOn {
            server_error: self.server_error || o.server_error,
            gateway_error: self.gateway_error || o.gateway_error,
            reset: self.reset || o.reset,
            reset_before_request: self.reset_before_request || o.reset_before_request,
            connect_failure: self.connect_failure || o.connect_failure,
            retriable_4xx: self.retriable_4xx || o.retriable_4xx,
            refused_stream: self.refused_stream || o.refused_stream,
            retriable_status_codes: self.retriable_status_codes || o.retriable_status_codes,
            retriable_headers: self.retriable_headers || o.retriable_headers,
            grpc_codes,
        }
    }

    /// Parse Envoy's `retry_on` string.
    pub fn parse(s: &str) -> RetryOn {
        let mut r = RetryOn::default();
        for t in s.split(',').map(str::trim) {
            match t {
                "5xx" => r.server_error = true,
                "gateway-error" => r.gateway_error = true,
                "reset" => r.reset = true,
                "reset-before-request" => r.reset_before_request = true,
                "connect-failure" => r.connect_failure = true,
                "retriable-4xx" => r.retriable_4xx = true,
                "refused-stream" => r.refused_stream = true,
                "retriable-status-codes" => r.retriable_status_codes = true,
                "retriable-headers" => r.retriable_headers = true,
                "cancelled" => r.grpc_codes[1] = true,
                "deadline-exceeded" => r.grpc_codes[4] = true,
                "resource-exhausted" => r.grpc_codes[8] = true,
                "internal" => r.grpc_codes[13] = true,
                "unavailable" => r.grpc_codes[14] = true,
                _ => {}
            }
        }
        r
    }
}

/// Header changes at one level (route, virtual host or route configuration).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderOps {
    /// `request_headers_to_add`.
    pub request_add: Vec<HeaderAdd>,
    /// `request_headers_to_remove` (lowercase).
    pub request_remove: Vec<String>,
    /// `response_headers_to_add`.
    pub response_add: Vec<HeaderAdd>,
    /// `response_headers_to_remove` (lowercase).
    pub response_remove: Vec<String>,
}

impl HeaderOps {
    /// Whether this level changes nothing.
    pub fn is_empty(&self) -> bool {
        self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }
}

/// One `HeaderValueOption`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderAdd {
    /// Header name (lowercase).
    pub name: String,
    /// Value; may hold `%DOWNSTREAM_REMOTE_ADDRESS%`-style variables.
    pub value: String,
    /// What to do when the header exists.
    pub action: AppendAction,
    /// `keep_empty_value`: add the header even when the value ends up empty.
    pub keep_empty: bool,
}

/// `HeaderValueOption.append_action` (or the deprecated `append` bool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// APPEND_IF_EXISTS_OR_ADD (the default; `append: true`).
    Append,
    /// ADD_IF_ABSENT.
    AddIfAbsent,
    /// OVERWRITE_IF_EXISTS_OR_ADD (`append: false`).
    OverwriteOrAdd,
    /// OVERWRITE_IF_EXISTS.
    OverwriteIfExists,
}

impl RouteConfig {
    /// Every cluster any route names.
    pub fn clusters(&self) -> BTreeSet<&str> {
        self.virtual_hosts
            .iter()
            .flat_map(|v| v.clusters.iter().map(String::as_str))
            .collect()
    }
}

fn query_match(q: &pb::QueryParameterMatcher) -> Result<QueryMatch, FieldError> {
    use pb::query_parameter_matcher::QueryParameterMatchSpecifier as S;
    if q.name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    let kind = match &q.query_parameter_match_specifier {
        Some(S::StringMatch(m)) => string_match(m).map_err(|e| e.within("string_match"))?,
        Some(S::PresentMatch(p)) => HeaderMatchKind::Present(*p),
        // Neither: the parameter must be present.
        None => HeaderMatchKind::Present(true),
    };
    Ok(QueryMatch {
        name: q.name.clone(),
        kind,
    })
}

fn route_match(m: &pb::RouteMatch) -> Result<RouteMatch, FieldError> {
    use pb::route_match::PathSpecifier as Ps;
    let path = match &m.path_specifier {
        Some(Ps::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(Ps::Path(p)) => PathMatch::Path(p.clone()),
        Some(Ps::SafeRegex(r)) => PathMatch::Regex(regex(&r.regex, "safe_regex.regex")?),
        Some(Ps::PathSeparatedPrefix(p)) => {
            // Envoy's validation: no query or fragment characters, no trailing slash.
            if p.contains(['?', '#']) || (p.len() > 1 && p.ends_with('/')) {
                return Err(FieldError::new(
                    "path_separated_prefix",
                    format!("{p:?} must not contain ? or # nor end with /"),
                ));
            }
            PathMatch::PathSeparatedPrefix(p.clone())
        }
        Some(Ps::ConnectMatcher(_)) => {
            return Err(compat::refuse(compat::F_PATH_SPECIFIER, "connect_matcher"));
        }
        Some(Ps::PathMatchPolicy(_)) => {
            return Err(compat::refuse(
                compat::F_PATH_SPECIFIER,
                "path_match_policy",
            ));
        }
        None => return Err(FieldError::new("path_specifier", "required")),
    };
    super::limits::at_most("headers", m.headers.len(), super::limits::MAX_MATCHERS)?;
    super::limits::at_most(
        "query_parameters",
        m.query_parameters.len(),
        super::limits::MAX_MATCHERS,
    )?;
    let mut headers = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(header_match(h).map_err(|e| e.within(format!("headers[{i}]")))?);
    }
    let mut query_parameters = Vec::with_capacity(m.query_parameters.len());
    for (i, q) in m.query_parameters.iter().enumerate() {
        query_parameters
            .push(query_match(q).map_err(|e| e.within(format!("query_parameters[{i}]")))?);
    }
    // Honour or refuse (model::compat): matchers on state skiff does not keep are refused.
    if !m.dynamic_metadata.is_empty() {
        return Err(compat::refuse(
            compat::F_DYNAMIC_METADATA,
            "dynamic_metadata",
        ));
    }
    if !m.filter_state.is_empty() {
        return Err(compat::refuse(compat::F_FILTER_STATE, "filter_state"));
    }
    if !m.cookies.is_empty() {
        return Err(compat::refuse(compat::F_COOKIES, "cookies"));
    }
    let runtime_fraction = match &m.runtime_fraction {
        Some(r) => Some(
            Percent::from_proto(r.default_value.as_ref())
                .map_err(|e| e.within("runtime_fraction.default_value"))?,
        ),
        None => None,
    };
    let requires_tls = m.tls_context.as_ref().is_some_and(|t| {
        t.presented.as_ref().is_some_and(|b| b.value)
            || t.validated.as_ref().is_some_and(|b| b.value)
    });
    Ok(RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers,
        query_parameters,
        runtime_fraction,
        grpc: m.grpc.is_some(),
        requires_tls,
    })
}

fn opt_duration(
    d: Option<&envoy_types::pb::google::protobuf::Duration>,
    field: &str,
) -> Result<Option<Duration>, FieldError> {
    d.map(|d| duration(d).map_err(|e| e.within(field)))
        .transpose()
}

const PREVIOUS_HOSTS: &str = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// Convert a `RetryPolicy` (route or virtual host level).
pub fn retry_policy(p: &pb::RetryPolicy) -> Result<RetryPolicy, FieldError> {
    use pb::retry_policy::retry_host_predicate::ConfigType;
    let per_try_timeout =
        opt_duration(p.per_try_timeout.as_ref(), "per_try_timeout")?.filter(|d| !d.is_zero());
    let (base_interval, max_interval) = match &p.retry_back_off {
        Some(b) => {
            let base = opt_duration(b.base_interval.as_ref(), "retry_back_off.base_interval")?
                .ok_or_else(|| FieldError::new("retry_back_off.base_interval", "required"))?;
            if base.is_zero() {
                return Err(FieldError::new(
                    "retry_back_off.base_interval",
                    "must be greater than 0",
                ));
            }
            let max = opt_duration(b.max_interval.as_ref(), "retry_back_off.max_interval")?
                .unwrap_or(base * 10);
            if max < base {
                return Err(FieldError::new(
                    "retry_back_off.max_interval",
                    "must not be smaller than base_interval",
                ));
            }
            (base, max)
        }
        None => (DEFAULT_RETRY_BASE, DEFAULT_RETRY_BASE * 10),
    };
    let previous_hosts = p.retry_host_predicate.iter().any(|h| {
        let by_type = matches!(&h.config_type, Some(ConfigType::TypedConfig(a))
            if a.type_url.rsplit('/').next() == Some(PREVIOUS_HOSTS));
        by_type || h.name == "envoy.retry_host_predicates.previous_hosts"
    });
    let mut retriable_status_codes = Vec::with_capacity(p.retriable_status_codes.len());
    for (i, c) in p.retriable_status_codes.iter().enumerate() {
        let c = u16::try_from(*c)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| {
                FieldError::new(
                    format!("retriable_status_codes[{i}]"),
                    format!("{c} is not an HTTP status"),
                )
            })?;
        retriable_status_codes.push(c);
    }
    let matchers = |v: &[pb::HeaderMatcher], field: &str| -> Result<Vec<HeaderMatch>, FieldError> {
        v.iter()
            .enumerate()
            .map(|(i, h)| header_match(h).map_err(|e| e.within(format!("{field}[{i}]"))))
            .collect()
    };
    let retriable_headers = matchers(&p.retriable_headers, "retriable_headers")?;
    let retriable_request_headers =
        matchers(&p.retriable_request_headers, "retriable_request_headers")?;
    Ok(RetryPolicy {
        retry_on: RetryOn::parse(&p.retry_on),
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout,
        base_interval,
        max_interval,
        previous_hosts,
        host_selection_max_attempts: u32::try_from(p.host_selection_retry_max_attempts.max(1))
            .unwrap_or(u32::MAX),
        retriable_status_codes,
        retriable_headers,
        retriable_request_headers,
    })
}

fn header_adds(v: &[core::HeaderValueOption], field: &str) -> Result<Vec<HeaderAdd>, FieldError> {
    use core::header_value_option::HeaderAppendAction as A;
    let mut out = Vec::with_capacity(v.len());
    for (i, o) in v.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let Some(h) = &o.header else {
            return Err(FieldError::new(format!("{at}.header"), "missing"));
        };
        let name = h.key.to_ascii_lowercase();
        if name.is_empty() || hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(FieldError::new(
                format!("{at}.header.key"),
                format!("{:?} is not a header name", h.key),
            ));
        }
        // Envoy refuses to let configuration set pseudo-headers and `host` this way.
        if name.starts_with(':') || name == "host" {
            return Err(FieldError::new(
                format!("{at}.header.key"),
                format!("{name:?} cannot be set"),
            ));
        }
        let value = if h.value.is_empty() && !h.raw_value.is_empty() {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        } else {
            h.value.clone()
        };
        #[allow(deprecated)]
        let action = match (&o.append, A::try_from(o.append_action)) {
            // The deprecated bool wins when set (Envoy refuses both; the bool is older).
            (Some(b), _) if b.value => AppendAction::Append,
            (Some(_), _) => AppendAction::OverwriteOrAdd,
            (None, Ok(A::AppendIfExistsOrAdd)) => AppendAction::Append,
            (None, Ok(A::AddIfAbsent)) => AppendAction::AddIfAbsent,
            (None, Ok(A::OverwriteIfExistsOrAdd)) => AppendAction::OverwriteOrAdd,
            (None, Ok(A::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
            (None, Err(_)) => {
                return Err(FieldError::new(
                    format!("{at}.append_action"),
                    format!("unknown value {}", o.append_action),
                ));
            }
        };
        out.push(HeaderAdd {
            name,
            value,
            action,
            keep_empty: o.keep_empty_value,
        });
    }
    Ok(out)
}

fn header_removes(v: &[String]) -> Vec<String> {
    v.iter().map(|h| h.to_ascii_lowercase()).collect()
}

fn header_ops(
    req_add: &[core::HeaderValueOption],
    req_rm: &[String],
    resp_add: &[core::HeaderValueOption],
    resp_rm: &[String],
) -> Result<HeaderOps, FieldError> {
    Ok(HeaderOps {
        request_add: header_adds(req_add, "request_headers_to_add")?,
        request_remove: header_removes(req_rm),
        response_add: header_adds(resp_add, "response_headers_to_add")?,
        response_remove: header_removes(resp_rm),
    })
}

fn hash_policy(h: &pb::route_action::HashPolicy) -> Result<HashPolicy, FieldError> {
    use pb::route_action::hash_policy::PolicySpecifier as P;
    let kind = match &h.policy_specifier {
        Some(P::Header(x)) => HashKind::Header(x.header_name.to_ascii_lowercase()),
        Some(P::Cookie(c)) => HashKind::Cookie(c.name.clone()),
        Some(P::ConnectionProperties(c)) if c.source_ip => HashKind::SourceIp,
        Some(P::QueryParameter(q)) => HashKind::QueryParameter(q.name.clone()),
        Some(P::FilterState(_)) => {
            return Err(compat::refuse(compat::F_FILTER_STATE, "filter_state"));
        }
        // `source_ip: false` or no specifier: hashes nothing, in Envoy too.
        _ => HashKind::Unsupported,
    };
    Ok(HashPolicy {
        kind,
        terminal: h.terminal,
    })
}

/// Envoy's `regex_rewrite` substitution uses `\1` for capture groups; regex_lite uses `${1}`.
fn substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                let mut n = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(*d);
                    chars.next();
                }
                out.push_str(&format!("${{{n}}}"));
            }
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out
}

fn forward(a: &pb::RouteAction) -> Result<RouteAction, FieldError> {
    use pb::route_action::ClusterSpecifier as Cs;
    #[allow(deprecated)]
    if a.cors.is_some() {
        return Err(compat::refuse(compat::F_CORS_POLICY, "cors"));
    }
    use pb::route_action::HostRewriteSpecifier as Hr;
    let target = match &a.cluster_specifier {
        Some(Cs::Cluster(c)) if c.is_empty() => {
            return Err(FieldError::new("cluster", "must not be empty"));
        }
        Some(Cs::Cluster(c)) => Target::Clusters(ClusterSpecifier::Cluster(c.clone())),
        Some(Cs::ClusterHeader(h)) if h.is_empty() => {
            return Err(FieldError::new("cluster_header", "must not be empty"));
        }
        Some(Cs::ClusterHeader(h)) => Target::Header(h.to_ascii_lowercase()),
        Some(Cs::WeightedClusters(w)) => {
            let mut out = Vec::with_capacity(w.clusters.len());
            for (j, c) in w.clusters.iter().enumerate() {
                if c.name.is_empty() {
                    return Err(FieldError::new(
                        format!("weighted_clusters.clusters[{j}].name"),
                        "must not be empty",
                    ));
                }
                // Envoy applies a weighted cluster's per-filter config to requests sent to it;
                // skiff decides RBAC before the cluster is chosen, so it cannot.
                let (pf, faults) = per_filter(&c.typed_per_filter_config)
                    .map_err(|e| e.within(format!("weighted_clusters.clusters[{j}]")))?;
                if pf.values().any(|c| matches!(c, PerFilterConfig::Rbac(_))) || !faults.is_empty()
                {
                    return Err(FieldError::new(
                        format!("weighted_clusters.clusters[{j}].typed_per_filter_config"),
                        "per-cluster configuration of the RBAC or fault filter is not supported",
                    ));
                }
                out.push((c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)));
            }
            Target::Clusters(ClusterSpecifier::Weighted(out))
        }
        Some(Cs::ClusterSpecifierPlugin(_)) | Some(Cs::InlineClusterSpecifierPlugin(_)) => {
            return Err(compat::refuse(
                compat::F_ROUTE_ACTION,
                "cluster_specifier_plugin",
            ));
        }
        None => return Err(FieldError::new("cluster_specifier", "required")),
    };
    let timeout = match &a.timeout {
        Some(d) => {
            let d = duration(d).map_err(|e| e.within("timeout"))?;
            (!d.is_zero()).then_some(d)
        }
        None => Some(DEFAULT_ROUTE_TIMEOUT),
    };
    let idle_timeout =
        opt_duration(a.idle_timeout.as_ref(), "idle_timeout")?.filter(|d| !d.is_zero());
    let regex_rewrite = match &a.regex_rewrite {
        Some(r) => {
            let re = r.pattern.as_ref().map(|p| p.regex.as_str()).unwrap_or("");
            let p = Pattern::search(re).map_err(|e| {
                FieldError::new(
                    "regex_rewrite.pattern.regex",
                    format!("invalid regex {re:?}: {e}"),
                )
            })?;
            Some((p, substitution(&r.substitution)))
        }
        None => None,
    };
    if !a.prefix_rewrite.is_empty() && regex_rewrite.is_some() {
        return Err(FieldError::new(
            "regex_rewrite",
            "cannot be combined with prefix_rewrite",
        ));
    }
    let host_rewrite = match &a.host_rewrite_specifier {
        Some(Hr::HostRewriteLiteral(h)) if !h.is_empty() => Some(HostRewrite::Literal(h.clone())),
        Some(Hr::AutoHostRewrite(b)) if b.value => Some(HostRewrite::Auto),
        _ => None,
    };
    let retry_policy = a
        .retry_policy
        .as_ref()
        .map(|p| {
            retry_policy(p)
                .map(Arc::new)
                .map_err(|e| e.within("retry_policy"))
        })
        .transpose()?;
    Ok(RouteAction::Forward(Box::new(Forward {
        target,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        timeout,
        idle_timeout,
        retry_policy,
        hash_policy: a
            .hash_policy
            .iter()
            .enumerate()
            .map(|(i, h)| hash_policy(h).map_err(|e| e.within(format!("hash_policy[{i}]"))))
            .collect::<Result<_, _>>()?,
        grpc_timeout_max: {
            #[allow(deprecated)]
            let legacy = a.max_grpc_timeout.as_ref();
            let header_max = a
                .max_stream_duration
                .as_ref()
                .and_then(|m| m.grpc_timeout_header_max.as_ref());
            opt_duration(header_max.or(legacy), "max_grpc_timeout")?
        },
        // RoutingPriority: 0 DEFAULT, 1 HIGH.
        high_priority: a.priority == 1,
        upgrades: a
            .upgrade_configs
            .iter()
            .map(|u| {
                let enabled = u.enabled.as_ref().is_none_or(|b| b.value);
                (u.upgrade_type.to_ascii_lowercase(), enabled)
            })
            .collect(),
    })))
}

fn redirect(r: &pb::RedirectAction) -> Result<Redirect, FieldError> {
    use pb::redirect_action::PathRewriteSpecifier as P;
    use pb::redirect_action::RedirectResponseCode as C;
    use pb::redirect_action::SchemeRewriteSpecifier as S;
    let status = match C::try_from(r.response_code) {
        Ok(C::MovedPermanently) => 301,
        Ok(C::Found) => 302,
        Ok(C::SeeOther) => 303,
        Ok(C::TemporaryRedirect) => 307,
        Ok(C::PermanentRedirect) => 308,
        Err(_) => {
            return Err(FieldError::new(
                "response_code",
                format!("unknown value {}", r.response_code),
            ));
        }
    };
    let scheme = match &r.scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::SchemeRedirect(s)) if !s.is_empty() => Some(s.to_ascii_lowercase()),
        _ => None,
    };
    let port = match r.port_redirect {
        0 => None,
        p => Some(
            u16::try_from(p)
                .map_err(|_| FieldError::new("port_redirect", format!("{p} is not a port")))?,
        ),
    };
    let path = match &r.path_rewrite_specifier {
        Some(P::PathRedirect(p)) if !p.is_empty() => Some(PathRedirect::Path(p.clone())),
        Some(P::PrefixRewrite(p)) => Some(PathRedirect::Prefix(p.clone())),
        _ => None,
    };
    Ok(Redirect {
        scheme,
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port,
        path,
        status,
        strip_query: r.strip_query,
    })
}

fn route_action(r: &pb::Route) -> Result<RouteAction, FieldError> {
    use pb::route::Action;
    Ok(match &r.action {
        Some(Action::Route(a)) => forward(a).map_err(|e| e.within("route"))?,
        Some(Action::DirectResponse(d)) => {
            use core::data_source::Specifier;
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| {
                    FieldError::new(
                        "direct_response.status",
                        format!("{} is not in [200, 600)", d.status),
                    )
                })?;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(Specifier::InlineString(s)) => Some(s.clone()),
                Some(Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            };
            RouteAction::Direct { status, body }
        }
        Some(Action::Redirect(r)) => {
            RouteAction::Redirect(redirect(r).map_err(|e| e.within("redirect"))?)
        }
        Some(Action::FilterAction(_)) => {
            return Err(compat::refuse(compat::F_ROUTE_ACTION, "filter_action"));
        }
        Some(Action::NonForwardingAction(_)) => {
            return Err(compat::refuse(
                compat::F_ROUTE_ACTION,
                "non_forwarding_action",
            ));
        }
        None => return Err(FieldError::new("action", "required")),
    })
}

fn any_type(a: &envoy_types::pb::google::protobuf::Any) -> &str {
    a.type_url.rsplit('/').next().unwrap_or(&a.type_url)
}

/// `typed_per_filter_config` under the compatibility rule: the RBAC filters' per-route
/// configs and `FilterConfig { disabled }` entries (`PerFilter`), and the fault filters'
/// settings (sorted by filter name: the map has no order). Entries of filters skiff does not
/// run are refused unless turning them off or observational (`fault::per_filter`).
fn per_filter(
    m: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
) -> Result<(PerFilter, Vec<(String, FaultOverride)>), FieldError> {
    let mut out = PerFilter::new();
    let mut faults = Vec::new();
    let mut names: Vec<&String> = m.keys().collect();
    names.sort();
    for name in names {
        let any = &m[name];
        let at = format!("typed_per_filter_config[{name:?}]");
        if let Some(c) = rbac_per_filter(any, &at)? {
            let is_rbac = matches!(c, PerFilterConfig::Rbac(_));
            out.insert(name.clone(), c);
            if is_rbac {
                continue;
            }
        }
        if let Some(o) = fault::per_filter(name, any)? {
            faults.push((name.clone(), o));
        }
    }
    Ok((out, faults))
}

/// One `typed_per_filter_config` entry as the RBAC hook sees it: `RBACPerRoute` (bare or in a
/// `FilterConfig`) converted, `FilterConfig { disabled: true }` for any filter, else `None`.
fn rbac_per_filter(
    any: &envoy_types::pb::google::protobuf::Any,
    at: &str,
) -> Result<Option<PerFilterConfig>, FieldError> {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_pb;
    use prost::Message;
    let (inner, at) = match any_type(any) {
        FILTER_CONFIG_TYPE => {
            let fc = pb::FilterConfig::decode(any.value.as_slice())
                .map_err(|e| FieldError::new(at, format!("invalid {FILTER_CONFIG_TYPE}: {e}")))?;
            if fc.disabled {
                return Ok(Some(PerFilterConfig::Disabled));
            }
            match fc.config {
                Some(c) => (c, format!("{at}.config")),
                None => return Ok(None),
            }
        }
        _ => (any.clone(), at.to_string()),
    };
    if any_type(&inner) != RBAC_PER_ROUTE_TYPE {
        return Ok(None);
    }
    let p = http_pb::RbacPerRoute::decode(inner.value.as_slice())
        .map_err(|e| FieldError::new(&at, format!("invalid {RBAC_PER_ROUTE_TYPE}: {e}")))?;
    let c = HttpRbacPerRoute::try_from(&p).map_err(|e| FieldError::from(e).within(&at))?;
    Ok(Some(PerFilterConfig::Rbac(Arc::new(c))))
}

fn virtual_host(v: &pb::VirtualHost) -> Result<VirtualHost, FieldError> {
    if v.name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    if v.domains.is_empty() {
        return Err(FieldError::new("domains", "needs at least one domain"));
    }
    let mut clusters = BTreeSet::new();
    let mut routes = Vec::with_capacity(v.routes.len());
    for (i, r) in v.routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        let Some(m) = &r.r#match else {
            return Err(FieldError::new(format!("{at}.match"), "missing"));
        };
        let matcher = route_match(m).map_err(|e| e.within("match").within(&at))?;
        let action = route_action(r).map_err(|e| e.within(&at))?;
        if let RouteAction::Forward(f) = &action
            && let Target::Clusters(c) = &f.target
        {
            clusters.extend(c.names().into_iter().map(str::to_string));
        }
        let headers = header_ops(
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )
        .map_err(|e| e.within(&at))?;
        let (per_filter, faults) =
            per_filter(&r.typed_per_filter_config).map_err(|e| e.within(&at))?;
        routes.push(Route {
            name: r.name.clone(),
            matcher,
            action,
            headers,
            per_filter,
            faults,
        });
    }
    let headers = header_ops(
        &v.request_headers_to_add,
        &v.request_headers_to_remove,
        &v.response_headers_to_add,
        &v.response_headers_to_remove,
    )?;
    let retry_policy = v
        .retry_policy
        .as_ref()
        .map(|p| {
            retry_policy(p)
                .map(Arc::new)
                .map_err(|e| e.within("retry_policy"))
        })
        .transpose()?;
    let mut virtual_clusters = Vec::with_capacity(v.virtual_clusters.len());
    for (i, vc) in v.virtual_clusters.iter().enumerate() {
        let at = format!("virtual_clusters[{i}]");
        if vc.name.is_empty() {
            return Err(FieldError::new(format!("{at}.name"), "must not be empty"));
        }
        let mut headers = Vec::with_capacity(vc.headers.len());
        for (j, h) in vc.headers.iter().enumerate() {
            headers.push(header_match(h).map_err(|e| e.within(format!("{at}.headers[{j}]")))?);
        }
        virtual_clusters.push((vc.name.clone(), headers));
    }
    #[allow(deprecated)]
    if v.cors.is_some() {
        return Err(compat::refuse(compat::F_CORS_POLICY, "cors"));
    }
    let (vh_per_filter, vh_faults) = per_filter(&v.typed_per_filter_config)?;
    Ok(VirtualHost {
        per_filter: vh_per_filter,
        faults: vh_faults,
        virtual_clusters,
        name: v.name.clone(),
        domains: v.domains.clone(),
        routes,
        clusters,
        headers,
        retry_policy,
        include_request_attempt_count: v.include_request_attempt_count,
        include_attempt_count_in_response: v.include_attempt_count_in_response,
    })
}

impl TryFrom<&pb::RouteConfiguration> for RouteConfig {
    type Error = ModelError;
    fn try_from(rc: &pb::RouteConfiguration) -> Result<Self, ModelError> {
        let err = |e: FieldError| e.on("route_configuration", &rc.name);
        if rc.name.is_empty() {
            return Err(err(FieldError::new("name", "must not be empty")));
        }
        RouteConfig::from_proto(rc).map_err(err)
    }
}

impl RouteConfig {
    /// Convert without requiring a name (an HCM's inline `route_config` may have none).
    pub fn from_proto(rc: &pb::RouteConfiguration) -> Result<Self, FieldError> {
        use super::limits::{MAX_ROUTES, MAX_VIRTUAL_HOSTS, at_most};
        at_most("virtual_hosts", rc.virtual_hosts.len(), MAX_VIRTUAL_HOSTS)?;
        let routes = rc.virtual_hosts.iter().map(|v| v.routes.len()).sum();
        at_most("virtual_hosts[*].routes", routes, MAX_ROUTES)?;
        let mut names = BTreeSet::new();
        let mut domains = BTreeSet::new();
        let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
        for (i, v) in rc.virtual_hosts.iter().enumerate() {
            let at = format!("virtual_hosts[{i}]");
            let vh = virtual_host(v).map_err(|e| e.within(&at))?;
            // Envoy refuses duplicate virtual host names and a domain served by two hosts.
            if !names.insert(vh.name.clone()) {
                return Err(FieldError::new(
                    format!("{at}.name"),
                    format!("duplicate virtual host {:?}", vh.name),
                ));
            }
            for d in &vh.domains {
                if !domains.insert(d.to_ascii_lowercase()) {
                    return Err(FieldError::new(
                        format!("{at}.domains"),
                        format!("domain {d:?} is already served by another virtual host"),
                    ));
                }
            }
            virtual_hosts.push(vh);
        }
        let headers = header_ops(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
        )?;
        let (rc_per_filter, rc_faults) = per_filter(&rc.typed_per_filter_config)?;
        // The fault filter reads route and virtual-host overrides only.
        if let Some((name, _)) = rc_faults.first() {
            return Err(FieldError::new(
                format!("typed_per_filter_config[{name:?}]"),
                "a route-configuration-wide fault filter override is not supported",
            ));
        }
        Ok(RouteConfig {
            per_filter: rc_per_filter,
            name: rc.name.clone(),
            virtual_hosts,
            ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

    fn vh(name: &str, domains: &[&str], cluster: &str) -> pb::VirtualHost {
        pb::VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(pb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(pb::route::Action::Route(pb::RouteAction {
                    cluster_specifier: Some(pb::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn parse(yaml: &str) -> Result<RouteConfig, ModelError> {
        let v = skiff_proto::parse_text(yaml).unwrap();
        RouteConfig::try_from(&skiff_proto::decode_json::<pb::RouteConfiguration>(&v).unwrap())
    }

    #[test]
    fn rbac_per_route_configs_are_found_most_specific_first() {
        let rc = parse(
            r#"
name: r
typed_per_filter_config:
  envoy.filters.http.rbac:
    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
  istio.stats: { "@type": type.googleapis.com/udpa.type.v1.TypedStruct, type_url: type.googleapis.com/stats.PluginConfig }
virtual_hosts:
- name: v
  domains: ["*"]
  typed_per_filter_config:
    rbac2:
      "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
      disabled: true
  routes:
  - match: { prefix: /admin }
    direct_response: { status: 200 }
    typed_per_filter_config:
      envoy.filters.http.rbac:
        "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
        config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
          rbac: { rules: { action: DENY, policies: {} } }
  - match: { prefix: / }
    direct_response: { status: 200 }
"#,
        )
        .unwrap();
        let vh = &rc.virtual_hosts[0];
        let at = |route: usize, filter: &str| {
            per_filter_config(&rc, vh, vh.routes.get(route), filter).cloned()
        };
        let Some(PerFilterConfig::Rbac(admin)) = at(0, "envoy.filters.http.rbac") else {
            panic!("route override");
        };
        assert!(matches!(*admin, HttpRbacPerRoute::Override(_)));
        let Some(PerFilterConfig::Rbac(rest)) = at(1, "envoy.filters.http.rbac") else {
            panic!("route configuration's entry");
        };
        assert_eq!(*rest, HttpRbacPerRoute::Disabled);
        assert_eq!(at(1, "rbac2"), Some(PerFilterConfig::Disabled));
        // Entries of observational filters skiff accepts without running are not kept.
        assert_eq!(at(1, "istio.stats"), None);
    }

    #[test]
    fn rbac_per_route_errors_and_weighted_cluster_overrides_are_refused() {
        let e = parse(
            r#"
name: r
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: { prefix: / }
    route: { cluster: c }
    typed_per_filter_config:
      envoy.filters.http.rbac:
        "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
        rbac: { rules: { policies: { p: { permissions: [{ any: true }], principals: [] } } } }
"#,
        )
        .unwrap_err();
        assert_eq!(
            e.field,
            "virtual_hosts[0].routes[0].typed_per_filter_config[\"envoy.filters.http.rbac\"].rbac.rules.policies[\"p\"].principals"
        );
        let e = parse(
            r#"
name: r
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: { prefix: / }
    route:
      weighted_clusters:
        clusters:
        - name: c
          weight: 1
          typed_per_filter_config:
            envoy.filters.http.rbac:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
"#,
        )
        .unwrap_err();
        assert_eq!(
            e.field,
            "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0].typed_per_filter_config"
        );
    }

    #[test]
    fn route_config_collects_clusters() {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["a.com"], "ca"), vh("b", &["*"], "cb")],
            ..Default::default()
        };
        let m = RouteConfig::try_from(&rc).unwrap();
        assert_eq!(m.clusters().into_iter().collect::<Vec<_>>(), ["ca", "cb"]);
    }

    #[test]
    fn duplicate_domains_are_rejected_with_the_field() {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["x.com"], "c"), vh("b", &["X.com"], "c")],
            ..Default::default()
        };
        let e = RouteConfig::try_from(&rc).unwrap_err().to_string();
        assert!(
            e.contains("route_configuration \"r\": virtual_hosts[1].domains"),
            "{e}"
        );
    }

    fn rc_with(routes: Vec<pb::Route>) -> RouteConfig {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![pb::VirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        };
        RouteConfig::try_from(&rc).unwrap()
    }

    #[test]
    fn route_matchers_and_actions_convert() {
        use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
        let forward = |timeout: Option<PbDuration>| {
            Some(pb::route::Action::Route(pb::RouteAction {
                cluster_specifier: Some(pb::route_action::ClusterSpecifier::WeightedClusters(
                    pb::WeightedCluster {
                        clusters: vec![pb::weighted_cluster::ClusterWeight {
                            name: "w".into(),
                            weight: Some(UInt32Value { value: 3 }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                )),
                prefix_rewrite: "/v2/".into(),
                timeout,
                ..Default::default()
            }))
        };
        let routes = vec![
            pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(pb::route_match::PathSpecifier::SafeRegex(
                        matcher::RegexMatcher {
                            regex: "/a/[0-9]+".into(),
                            ..Default::default()
                        },
                    )),
                    case_sensitive: Some(BoolValue { value: false }),
                    headers: vec![pb::HeaderMatcher {
                        name: "X-Env".into(),
                        header_match_specifier: Some(
                            pb::header_matcher::HeaderMatchSpecifier::PresentMatch(true),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                action: forward(None),
                ..Default::default()
            },
            pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(pb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: forward(Some(PbDuration {
                    seconds: 0,
                    nanos: 0,
                })),
                ..Default::default()
            },
            pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(pb::route_match::PathSpecifier::Path("/x".into())),
                    ..Default::default()
                }),
                action: Some(pb::route::Action::DirectResponse(pb::DirectResponseAction {
                    status: 418,
                    body: Some(envoy_types::pb::envoy::config::core::v3::DataSource {
                        specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                                "teapot".into(),
                            ),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            },
        ];
        let rc = rc_with(routes);
        let v = &rc.virtual_hosts[0];
        assert_eq!(v.clusters.iter().collect::<Vec<_>>(), ["w"]);
        let r0 = &v.routes[0];
        assert!(matches!(&r0.matcher.path, PathMatch::Regex(p) if p.0.is_match("/a/12")));
        assert!(!r0.matcher.case_sensitive);
        assert_eq!(r0.matcher.headers[0].name, "x-env");
        assert_eq!(r0.matcher.headers[0].kind, HeaderMatchKind::Present(true));
        let RouteAction::Forward(f) = &r0.action else {
            panic!("{:?}", r0.action)
        };
        assert_eq!(f.timeout, Some(DEFAULT_ROUTE_TIMEOUT));
        assert_eq!(f.prefix_rewrite.as_deref(), Some("/v2/"));
        assert_eq!(
            f.target,
            Target::Clusters(ClusterSpecifier::Weighted(vec![("w".into(), 3)]))
        );
        let RouteAction::Forward(f) = &v.routes[1].action else {
            panic!()
        };
        assert_eq!(f.timeout, None, "0s disables the route timeout");
        assert_eq!(
            v.routes[2].action,
            RouteAction::Direct {
                status: 418,
                body: Some("teapot".into())
            }
        );
    }

    fn direct() -> Option<pb::route::Action> {
        Some(pb::route::Action::DirectResponse(
            pb::DirectResponseAction {
                status: 200,
                ..Default::default()
            },
        ))
    }

    fn bad_regex_route(path: pb::route_match::PathSpecifier) -> pb::RouteConfiguration {
        let ok = pb::Route {
            r#match: Some(pb::RouteMatch {
                path_specifier: Some(pb::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: direct(),
            ..Default::default()
        };
        let bad = pb::Route {
            r#match: Some(pb::RouteMatch {
                path_specifier: Some(path),
                ..Default::default()
            }),
            action: direct(),
            ..Default::default()
        };
        pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![pb::VirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                routes: vec![ok, bad],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn invalid_regex_is_rejected_naming_the_route() {
        let rc = bad_regex_route(pb::route_match::PathSpecifier::SafeRegex(
            matcher::RegexMatcher {
                regex: "/a(".into(),
                ..Default::default()
            },
        ));
        let e = RouteConfig::try_from(&rc).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "route_configuration \"r\": virtual_hosts[0].routes[1].match.safe_regex.regex: invalid regex \"/a(\""
            ),
            "{e}"
        );
        let rc = bad_regex_route(pb::route_match::PathSpecifier::PathSeparatedPrefix(
            "/api/".into(),
        ));
        let e = RouteConfig::try_from(&rc).unwrap_err().to_string();
        assert!(e.contains("routes[1].match.path_separated_prefix"), "{e}");
    }

    #[test]
    fn retry_policy_defaults_follow_envoy() {
        let p = retry_policy(&pb::RetryPolicy {
            retry_on: "5xx,connect-failure,bogus,unavailable".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.num_retries, 1, "num_retries defaults to 1");
        assert_eq!(p.base_interval, Duration::from_millis(25));
        assert_eq!(p.max_interval, Duration::from_millis(250));
        assert_eq!(p.host_selection_max_attempts, 1);
        assert!(p.retry_on.server_error && p.retry_on.connect_failure);
        assert!(p.retry_on.grpc_codes[14] && !p.retry_on.reset);
        assert!(!p.previous_hosts);
        let e = retry_policy(&pb::RetryPolicy {
            retriable_status_codes: vec![503, 700],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "retriable_status_codes[1]");
    }

    #[test]
    fn seed_scenario_retry_policy_converts() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/seed-scenario-loopback/routes.json"
        ))
        .unwrap();
        let file = skiff_proto::parse_discovery_file(&text, None).unwrap();
        use prost::Message;
        let rc = pb::RouteConfiguration::decode(file.resources[0].value.as_slice()).unwrap();
        let rc = RouteConfig::try_from(&rc).unwrap();
        let RouteAction::Forward(f) = &rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        let p = f.retry_policy.as_deref().unwrap();
        assert_eq!(p.num_retries, 2);
        assert!(p.previous_hosts);
        assert_eq!(p.host_selection_max_attempts, 5);
        assert_eq!(p.retriable_status_codes, [503]);
        let on = p.retry_on;
        assert!(on.connect_failure && on.refused_stream && on.retriable_status_codes);
        assert!(on.grpc_codes[14] && on.grpc_codes[1]);
        assert!(!on.server_error && !on.gateway_error && !on.reset);
        assert_eq!(f.timeout, None);
    }

    #[test]
    fn header_value_options_follow_append_rules() {
        use envoy_types::pb::google::protobuf::BoolValue;
        #[allow(deprecated)]
        let hv = |k: &str, append: Option<bool>, action: i32| core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.into(),
                value: "v".into(),
                ..Default::default()
            }),
            append: append.map(|value| BoolValue { value }),
            append_action: action,
            ..Default::default()
        };
        let adds = header_adds(
            &[
                hv("X-A", None, 0),
                hv("x-b", Some(false), 0),
                hv("x-c", None, 1),
                hv("x-d", None, 3),
            ],
            "request_headers_to_add",
        )
        .unwrap();
        let actions: Vec<_> = adds.iter().map(|a| (a.name.as_str(), a.action)).collect();
        assert_eq!(
            actions,
            [
                ("x-a", AppendAction::Append),
                ("x-b", AppendAction::OverwriteOrAdd),
                ("x-c", AppendAction::AddIfAbsent),
                ("x-d", AppendAction::OverwriteIfExists),
            ]
        );
        let e = header_adds(&[hv(":path", None, 0)], "request_headers_to_add").unwrap_err();
        assert_eq!(e.field, "request_headers_to_add[0].header.key");
    }

    #[test]
    fn route_match_extras_are_honoured_or_refused() {
        use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
        let with = |m: pb::RouteMatch| {
            let rc = pb::RouteConfiguration {
                name: "r".into(),
                virtual_hosts: vec![pb::VirtualHost {
                    name: "v".into(),
                    domains: vec!["*".into()],
                    routes: vec![pb::Route {
                        r#match: Some(m),
                        action: direct(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            RouteConfig::try_from(&rc)
        };
        let prefix = Some(pb::route_match::PathSpecifier::Prefix("/".into()));
        let rc = with(pb::RouteMatch {
            path_specifier: prefix.clone(),
            runtime_fraction: Some(core::RuntimeFractionalPercent {
                default_value: Some(FractionalPercent {
                    numerator: 10,
                    denominator: 0,
                }),
                runtime_key: "ignored".into(),
            }),
            grpc: Some(Default::default()),
            ..Default::default()
        })
        .unwrap();
        let m = &rc.virtual_hosts[0].routes[0].matcher;
        assert_eq!(
            m.runtime_fraction,
            Some(Percent {
                numerator: 10,
                denominator: 100
            })
        );
        assert!(m.grpc && !m.requires_tls);
        let e = with(pb::RouteMatch {
            path_specifier: prefix,
            dynamic_metadata: vec![Default::default()],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "virtual_hosts[0].routes[0].match.dynamic_metadata");
        assert!(e.reason.contains("not supported by skiff"), "{e}");
    }

    #[test]
    fn regex_rewrite_substitution_translates_groups() {
        assert_eq!(substitution(r"/v2/\1/\12$"), "/v2/${1}/${12}$$");
    }
}
