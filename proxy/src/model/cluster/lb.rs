//! The balancing and resilience part of a `Cluster`: policy parameters, `common_lb_config`,
//! `outlier_detection`, `circuit_breakers` and `health_checks`, with Envoy's defaults.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::config::core::v3 as core;

use crate::model::{FieldError, duration};

/// Type name of skiff's PeakEWMA policy inside `load_balancing_policy` (any message body; skiff
/// reads none of it). List it before an Envoy policy so Envoy, which skips policies it does not
/// know, falls back to that one.
pub const PEAK_EWMA_POLICY: &str = "skiff.load_balancing_policies.peak_ewma.v1.PeakEwma";

/// Everything issue 8 adds to a cluster, with Envoy's defaults when absent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LbSettings {
    /// `least_request_lb_config` (or the LeastRequest typed policy).
    pub least_request: LeastRequestConfig,
    /// `ring_hash_lb_config` (or the RingHash typed policy).
    pub ring_hash: RingHashConfig,
    /// `maglev_lb_config` (or the Maglev typed policy).
    pub maglev: MaglevConfig,
    /// `common_lb_config`.
    pub common: CommonLbConfig,
    /// `outlier_detection`, when configured (Envoy runs no detector without it).
    pub outlier: Option<OutlierDetection>,
    /// `circuit_breakers` for the DEFAULT and HIGH routing priorities.
    pub circuit_breakers: CircuitBreakers,
    /// `health_checks` (skiff runs the first TCP or HTTP one).
    pub health_checks: Vec<HealthCheck>,
}

/// LEAST_REQUEST parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LeastRequestConfig {
    /// `choice_count` (default 2, at least 2).
    pub choice_count: u32,
    /// `active_request_bias` (default 1.0, not negative).
    pub active_request_bias: f64,
}

impl Default for LeastRequestConfig {
    fn default() -> Self {
        LeastRequestConfig {
            choice_count: 2,
            active_request_bias: 1.0,
        }
    }
}

/// RING_HASH parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingHashConfig {
    /// `minimum_ring_size` (default 1024).
    pub min_ring_size: u64,
    /// `maximum_ring_size` (default 8M).
    pub max_ring_size: u64,
}

impl Default for RingHashConfig {
    fn default() -> Self {
        RingHashConfig {
            min_ring_size: 1024,
            max_ring_size: 8 * 1024 * 1024,
        }
    }
}

/// MAGLEV parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevConfig {
    /// `table_size` (default 65537, must be prime).
    pub table_size: u64,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        MaglevConfig { table_size: 65_537 }
    }
}

/// `common_lb_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonLbConfig {
    /// `healthy_panic_threshold` in percent (default 50; 0 disables panic mode).
    pub healthy_panic_threshold: f64,
    /// `locality_weighted_lb_config` is set.
    pub locality_weighted: bool,
    /// `zone_aware_lb_config`, when set.
    pub zone_aware: Option<ZoneAware>,
}

impl Default for CommonLbConfig {
    fn default() -> Self {
        CommonLbConfig {
            healthy_panic_threshold: 50.0,
            locality_weighted: false,
            zone_aware: None,
        }
    }
}

/// `zone_aware_lb_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneAware {
    /// `routing_enabled` percent (default 100).
    pub routing_enabled: f64,
    /// `min_cluster_size` (default 6).
    pub min_cluster_size: u64,
    /// `fail_traffic_on_panic`.
    pub fail_traffic_on_panic: bool,
}

/// `outlier_detection`, with Envoy's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// `consecutive_5xx` (default 5).
    pub consecutive_5xx: u32,
    /// `consecutive_gateway_failure` (default 5).
    pub consecutive_gateway_failure: u32,
    /// `consecutive_local_origin_failure` (default 5).
    pub consecutive_local_origin_failure: u32,
    /// `interval` (default 10 s).
    pub interval: Duration,
    /// `base_ejection_time` (default 30 s).
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (default 300 s).
    pub max_ejection_time: Duration,
    /// `max_ejection_percent` (default 10).
    pub max_ejection_percent: u32,
    /// `enforcing_consecutive_5xx` percent (default 100).
    pub enforcing_consecutive_5xx: u32,
    /// `enforcing_consecutive_gateway_failure` percent (default 0).
    pub enforcing_consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_local_origin_failure` percent (default 100).
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `enforcing_success_rate` percent (default 100).
    pub enforcing_success_rate: u32,
    /// `success_rate_minimum_hosts` (default 5).
    pub success_rate_minimum_hosts: u32,
    /// `success_rate_request_volume` (default 100).
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` in thousandths (default 1900).
    pub success_rate_stdev_factor: u32,
    /// `enforcing_failure_percentage` percent (default 0).
    pub enforcing_failure_percentage: u32,
    /// `failure_percentage_threshold` (default 85).
    pub failure_percentage_threshold: u32,
    /// `failure_percentage_minimum_hosts` (default 5).
    pub failure_percentage_minimum_hosts: u32,
    /// `failure_percentage_request_volume` (default 50).
    pub failure_percentage_request_volume: u32,
    /// `split_external_local_origin_errors`.
    pub split_external_local_origin_errors: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            enforcing_failure_percentage: 0,
            failure_percentage_threshold: 85,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            split_external_local_origin_errors: false,
        }
    }
}

/// Limits of one routing priority.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `max_connections` (default 1024).
    pub max_connections: u64,
    /// `max_pending_requests` (default 1024).
    pub max_pending_requests: u64,
    /// `max_requests` (default 1024).
    pub max_requests: u64,
    /// `max_retries` (default 3); ignored when a retry budget is set.
    pub max_retries: u64,
    /// `retry_budget`: (budget percent of active requests, min retry concurrency).
    pub retry_budget: Option<(f64, u64)>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// `circuit_breakers`: thresholds for the DEFAULT and HIGH routing priorities.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CircuitBreakers {
    /// `RoutingPriority::DEFAULT`.
    pub default: Thresholds,
    /// `RoutingPriority::HIGH`.
    pub high: Thresholds,
}

/// What an active health check sends and expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// `tcp_health_check`: a connect (and, when `send` is set, the bytes and the replies).
    Tcp {
        /// Bytes to send after connecting (may be empty).
        send: Vec<u8>,
        /// Byte strings that must appear, in order, in what comes back.
        receive: Vec<Vec<u8>>,
    },
    /// `http_health_check`: an HTTP/1.1 GET.
    Http {
        /// `host` header (the cluster name when empty, as Envoy).
        host: String,
        /// Request path.
        path: String,
        /// Half-open status ranges counted as healthy (default `[200, 201)`).
        expected_statuses: Vec<(u16, u16)>,
    },
}

/// One `health_checks` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// `timeout`.
    pub timeout: Duration,
    /// `interval`.
    pub interval: Duration,
    /// `no_traffic_interval` (default 60 s): used until the cluster has carried traffic.
    pub no_traffic_interval: Duration,
    /// `unhealthy_threshold`.
    pub unhealthy_threshold: u32,
    /// `healthy_threshold`.
    pub healthy_threshold: u32,
    /// `alt_port`: check this port instead of the host's.
    pub alt_port: Option<u16>,
    /// `initial_jitter`: the first round waits a random time below this.
    pub initial_jitter: Duration,
    /// `interval_jitter` plus `interval_jitter_percent` of `interval`: each round waits a
    /// random extra time below this.
    pub interval_jitter: Duration,
    /// TCP or HTTP.
    pub kind: HealthCheckKind,
    /// `transport_socket_match_criteria`: chooses the check's transport among the cluster's
    /// `transport_socket_matches` in place of each endpoint's metadata.
    pub transport_match: Option<std::collections::BTreeMap<String, String>>,
    /// `tls_options.alpn_protocols`: the ALPN list of TLS checks (empty: the context's own).
    pub tls_alpn: Vec<String>,
}

/// Parse the balancing and resilience fields of `c` (paths in errors are relative to the
/// cluster). `typed` holds the decoded `load_balancing_policy` parameters when that field chose
/// the policy.
pub(super) fn parse(c: &pb::Cluster, typed: Option<TypedParams>) -> Result<LbSettings, FieldError> {
    let mut s = LbSettings::default();
    use pb::cluster::LbConfig;
    match &c.lb_config {
        Some(LbConfig::LeastRequestLbConfig(l)) => {
            s.least_request = least_request(
                l.choice_count.as_ref().map(|v| v.value),
                l.active_request_bias.as_ref().map(|b| b.default_value),
            )
            .map_err(|e| e.within("least_request_lb_config"))?;
        }
        Some(LbConfig::RingHashLbConfig(r)) => {
            s.ring_hash = ring_hash(
                r.minimum_ring_size.as_ref().map(|v| v.value),
                r.maximum_ring_size.as_ref().map(|v| v.value),
                r.hash_function,
            )
            .map_err(|e| e.within("ring_hash_lb_config"))?;
        }
        Some(LbConfig::MaglevLbConfig(m)) => {
            s.maglev = maglev(m.table_size.as_ref().map(|v| v.value))
                .map_err(|e| e.within("maglev_lb_config"))?;
        }
        _ => {}
    }
    if let Some(cc) = &c.common_lb_config {
        s.common = common(cc).map_err(|e| e.within("common_lb_config"))?;
    }
    if let Some(t) = typed {
        match t {
            TypedParams::LeastRequest(l) => s.least_request = l,
            TypedParams::RingHash(r) => s.ring_hash = r,
            TypedParams::Maglev(m) => s.maglev = m,
        }
    }
    if let Some(od) = &c.outlier_detection {
        s.outlier = Some(outlier(od).map_err(|e| e.within("outlier_detection"))?);
    }
    if let Some(cb) = &c.circuit_breakers {
        s.circuit_breakers = circuit_breakers(cb).map_err(|e| e.within("circuit_breakers"))?;
    }
    for (i, hc) in c.health_checks.iter().enumerate() {
        match health_check(hc, &c.name) {
            Ok(Some(h)) => s.health_checks.push(h),
            Ok(None) => {}
            Err(e) => return Err(e.within(format!("health_checks[{i}]"))),
        }
    }
    Ok(s)
}

/// Parameters carried by a typed `load_balancing_policy`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum TypedParams {
    /// LeastRequest.
    LeastRequest(LeastRequestConfig),
    /// RingHash.
    RingHash(RingHashConfig),
    /// Maglev.
    Maglev(MaglevConfig),
}

/// Decode the parameters of a typed policy (`name` is the message's full name).
pub(super) fn typed_params(name: &str, value: &[u8]) -> Result<Option<TypedParams>, FieldError> {
    use envoy_types::pb::envoy::extensions::load_balancing_policies as lbp;
    use prost::Message;
    let bad = |e: prost::DecodeError| FieldError::new("typed_config", format!("{name}: {e}"));
    Ok(match name {
        "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest" => {
            let l = lbp::least_request::v3::LeastRequest::decode(value).map_err(bad)?;
            Some(TypedParams::LeastRequest(least_request(
                l.choice_count.as_ref().map(|v| v.value),
                l.active_request_bias.as_ref().map(|b| b.default_value),
            )?))
        }
        "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash" => {
            let r = lbp::ring_hash::v3::RingHash::decode(value).map_err(bad)?;
            Some(TypedParams::RingHash(ring_hash(
                r.minimum_ring_size.as_ref().map(|v| v.value),
                r.maximum_ring_size.as_ref().map(|v| v.value),
                r.hash_function,
            )?))
        }
        "envoy.extensions.load_balancing_policies.maglev.v3.Maglev" => {
            let m = lbp::maglev::v3::Maglev::decode(value).map_err(bad)?;
            Some(TypedParams::Maglev(maglev(
                m.table_size.as_ref().map(|v| v.value),
            )?))
        }
        _ => None,
    })
}

fn least_request(
    choice_count: Option<u32>,
    bias: Option<f64>,
) -> Result<LeastRequestConfig, FieldError> {
    let mut l = LeastRequestConfig::default();
    if let Some(n) = choice_count {
        if n < 2 {
            return Err(FieldError::new("choice_count", "must be at least 2"));
        }
        l.choice_count = n;
    }
    if let Some(b) = bias {
        if !b.is_finite() || b < 0.0 {
            return Err(FieldError::new(
                "active_request_bias",
                format!("{b} is not a finite value >= 0"),
            ));
        }
        l.active_request_bias = b;
    }
    Ok(l)
}

fn ring_hash(
    min: Option<u64>,
    max: Option<u64>,
    hash_function: i32,
) -> Result<RingHashConfig, FieldError> {
    let mut r = RingHashConfig::default();
    if let Some(m) = min {
        r.min_ring_size = m;
    }
    if let Some(m) = max {
        r.max_ring_size = m;
    }
    // Envoy's bounds: both sizes at most 8M.
    const LIMIT: u64 = 8 * 1024 * 1024;
    if r.min_ring_size == 0 || r.min_ring_size > LIMIT {
        return Err(FieldError::new(
            "minimum_ring_size",
            format!("{} is outside 1..=8388608", r.min_ring_size),
        ));
    }
    if r.max_ring_size == 0 || r.max_ring_size > LIMIT {
        return Err(FieldError::new(
            "maximum_ring_size",
            format!("{} is outside 1..=8388608", r.max_ring_size),
        ));
    }
    if r.min_ring_size > r.max_ring_size {
        return Err(FieldError::new(
            "minimum_ring_size",
            format!(
                "{} is larger than maximum_ring_size {}",
                r.min_ring_size, r.max_ring_size
            ),
        ));
    }
    // 0 = XX_HASH (Envoy's default); MURMUR_HASH_2 is not implemented.
    if hash_function != 0 {
        return Err(FieldError::new(
            "hash_function",
            "only XX_HASH is supported",
        ));
    }
    Ok(r)
}

fn maglev(size: Option<u64>) -> Result<MaglevConfig, FieldError> {
    let mut m = MaglevConfig::default();
    if let Some(s) = size {
        // Envoy's bound is 5000011; the permutation needs a prime.
        if s > 5_000_011 || !crate::lb::maglev::is_prime(s as usize) {
            return Err(FieldError::new(
                "table_size",
                format!("{s} is not a prime <= 5000011"),
            ));
        }
        m.table_size = s;
    }
    Ok(m)
}

fn common(c: &pb::cluster::CommonLbConfig) -> Result<CommonLbConfig, FieldError> {
    let mut out = CommonLbConfig::default();
    if let Some(p) = &c.healthy_panic_threshold {
        if !(0.0..=100.0).contains(&p.value) {
            return Err(FieldError::new(
                "healthy_panic_threshold",
                format!("{} is outside 0..=100", p.value),
            ));
        }
        out.healthy_panic_threshold = p.value;
    }
    use pb::cluster::common_lb_config::LocalityConfigSpecifier as L;
    match &c.locality_config_specifier {
        Some(L::LocalityWeightedLbConfig(_)) => out.locality_weighted = true,
        Some(L::ZoneAwareLbConfig(z)) => {
            let routing_enabled = z.routing_enabled.as_ref().map(|p| p.value).unwrap_or(100.0);
            if !(0.0..=100.0).contains(&routing_enabled) {
                return Err(FieldError::new(
                    "zone_aware_lb_config.routing_enabled",
                    format!("{routing_enabled} is outside 0..=100"),
                ));
            }
            out.zone_aware = Some(ZoneAware {
                routing_enabled,
                min_cluster_size: z.min_cluster_size.as_ref().map(|v| v.value).unwrap_or(6),
                fail_traffic_on_panic: z.fail_traffic_on_panic,
            });
        }
        None => {}
    }
    Ok(out)
}

fn pct(field: &str, v: Option<u32>, default: u32) -> Result<u32, FieldError> {
    match v {
        Some(p) if p > 100 => Err(FieldError::new(field, format!("{p} is above 100"))),
        Some(p) => Ok(p),
        None => Ok(default),
    }
}

fn positive_duration(
    field: &str,
    d: Option<&envoy_types::pb::google::protobuf::Duration>,
    default: Duration,
) -> Result<Duration, FieldError> {
    match d {
        None => Ok(default),
        Some(d) => {
            let v = duration(d).map_err(|e| e.within(field))?;
            if v.is_zero() {
                return Err(FieldError::new(field, "must be greater than 0"));
            }
            Ok(v)
        }
    }
}

fn outlier(o: &pb::OutlierDetection) -> Result<OutlierDetection, FieldError> {
    let d = OutlierDetection::default();
    let v =
        |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>| x.as_ref().map(|v| v.value);
    let base_ejection_time = positive_duration(
        "base_ejection_time",
        o.base_ejection_time.as_ref(),
        d.base_ejection_time,
    )?;
    let max_ejection_time = positive_duration(
        "max_ejection_time",
        o.max_ejection_time.as_ref(),
        d.max_ejection_time,
    )?;
    if o.max_ejection_time.is_some() && max_ejection_time < base_ejection_time {
        return Err(FieldError::new(
            "max_ejection_time",
            "must not be smaller than base_ejection_time",
        ));
    }
    Ok(OutlierDetection {
        consecutive_5xx: v(&o.consecutive_5xx).unwrap_or(d.consecutive_5xx),
        consecutive_gateway_failure: v(&o.consecutive_gateway_failure)
            .unwrap_or(d.consecutive_gateway_failure),
        consecutive_local_origin_failure: v(&o.consecutive_local_origin_failure)
            .unwrap_or(d.consecutive_local_origin_failure),
        interval: positive_duration("interval", o.interval.as_ref(), d.interval)?,
        base_ejection_time,
        max_ejection_time: max_ejection_time.max(base_ejection_time),
        max_ejection_percent: pct(
            "max_ejection_percent",
            v(&o.max_ejection_percent),
            d.max_ejection_percent,
        )?,
        enforcing_consecutive_5xx: pct(
            "enforcing_consecutive_5xx",
            v(&o.enforcing_consecutive_5xx),
            d.enforcing_consecutive_5xx,
        )?,
        enforcing_consecutive_gateway_failure: pct(
            "enforcing_consecutive_gateway_failure",
            v(&o.enforcing_consecutive_gateway_failure),
            d.enforcing_consecutive_gateway_failure,
        )?,
        enforcing_consecutive_local_origin_failure: pct(
            "enforcing_consecutive_local_origin_failure",
            v(&o.enforcing_consecutive_local_origin_failure),
            d.enforcing_consecutive_local_origin_failure,
        )?,
        enforcing_success_rate: pct(
            "enforcing_success_rate",
            v(&o.enforcing_success_rate),
            d.enforcing_success_rate,
        )?,
        success_rate_minimum_hosts: v(&o.success_rate_minimum_hosts)
            .unwrap_or(d.success_rate_minimum_hosts),
        success_rate_request_volume: v(&o.success_rate_request_volume)
            .unwrap_or(d.success_rate_request_volume),
        success_rate_stdev_factor: v(&o.success_rate_stdev_factor)
            .unwrap_or(d.success_rate_stdev_factor),
        enforcing_failure_percentage: pct(
            "enforcing_failure_percentage",
            v(&o.enforcing_failure_percentage),
            d.enforcing_failure_percentage,
        )?,
        failure_percentage_threshold: pct(
            "failure_percentage_threshold",
            v(&o.failure_percentage_threshold),
            d.failure_percentage_threshold,
        )?,
        failure_percentage_minimum_hosts: v(&o.failure_percentage_minimum_hosts)
            .unwrap_or(d.failure_percentage_minimum_hosts),
        failure_percentage_request_volume: v(&o.failure_percentage_request_volume)
            .unwrap_or(d.failure_percentage_request_volume),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
    })
}

fn circuit_breakers(cb: &pb::CircuitBreakers) -> Result<CircuitBreakers, FieldError> {
    let mut out = CircuitBreakers::default();
    let mut seen = [false; 2];
    for (i, t) in cb.thresholds.iter().enumerate() {
        let at = |e: FieldError| e.within(format!("thresholds[{i}]"));
        let p = match t.priority {
            0 | 1 => t.priority as usize,
            other => {
                return Err(at(FieldError::new(
                    "priority",
                    format!("unknown routing priority {other}"),
                )));
            }
        };
        // Envoy uses the first entry of each priority.
        if seen[p] {
            continue;
        }
        seen[p] = true;
        let d = Thresholds::default();
        let v = |x: &Option<envoy_types::pb::google::protobuf::UInt32Value>, d: u64| {
            x.as_ref().map(|v| u64::from(v.value)).unwrap_or(d)
        };
        let retry_budget = match &t.retry_budget {
            None => None,
            Some(b) => {
                let pctv = b.budget_percent.as_ref().map(|p| p.value).unwrap_or(20.0);
                if !(0.0..=100.0).contains(&pctv) {
                    return Err(at(FieldError::new(
                        "retry_budget.budget_percent",
                        format!("{pctv} is outside 0..=100"),
                    )));
                }
                let min = b
                    .min_retry_concurrency
                    .as_ref()
                    .map(|v| u64::from(v.value))
                    .unwrap_or(3);
                Some((pctv, min))
            }
        };
        let th = Thresholds {
            max_connections: v(&t.max_connections, d.max_connections),
            max_pending_requests: v(&t.max_pending_requests, d.max_pending_requests),
            max_requests: v(&t.max_requests, d.max_requests),
            max_retries: v(&t.max_retries, d.max_retries),
            retry_budget,
        };
        if p == 0 {
            out.default = th;
        } else {
            out.high = th;
        }
    }
    Ok(out)
}

fn payload(p: Option<&core::health_check::Payload>) -> Result<Vec<u8>, FieldError> {
    use core::health_check::payload::Payload as P;
    match p.and_then(|p| p.payload.as_ref()) {
        None => Ok(Vec::new()),
        Some(P::Binary(b)) => Ok(b.clone()),
        Some(P::Text(t)) => {
            hex(t).ok_or_else(|| FieldError::new("text", format!("{t:?} is not hex")))
        }
    }
}

fn hex(t: &str) -> Option<Vec<u8>> {
    let t = t.as_bytes();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    t.chunks(2)
        .map(|c| {
            let s = std::str::from_utf8(c).ok()?;
            u8::from_str_radix(s, 16).ok()
        })
        .collect()
}

/// `None` for checkers skiff does not run (gRPC, custom): Envoy would run them, skiff leaves
/// the hosts' health to EDS and outlier detection, and says so in the log.
fn health_check(h: &core::HealthCheck, cluster: &str) -> Result<Option<HealthCheck>, FieldError> {
    let timeout = h
        .timeout
        .as_ref()
        .ok_or_else(|| FieldError::new("timeout", "required"))
        .and_then(|d| duration(d).map_err(|e| e.within("timeout")))?;
    let interval = h
        .interval
        .as_ref()
        .ok_or_else(|| FieldError::new("interval", "required"))
        .and_then(|d| duration(d).map_err(|e| e.within("interval")))?;
    if timeout.is_zero() {
        return Err(FieldError::new("timeout", "must be greater than 0"));
    }
    if interval.is_zero() {
        return Err(FieldError::new("interval", "must be greater than 0"));
    }
    let unhealthy_threshold = h
        .unhealthy_threshold
        .as_ref()
        .map(|v| v.value)
        .ok_or_else(|| FieldError::new("unhealthy_threshold", "required"))?;
    let healthy_threshold = h
        .healthy_threshold
        .as_ref()
        .map(|v| v.value)
        .ok_or_else(|| FieldError::new("healthy_threshold", "required"))?;
    let no_traffic_interval = positive_duration(
        "no_traffic_interval",
        h.no_traffic_interval.as_ref(),
        Duration::from_secs(60),
    )?;
    let alt_port = match h.alt_port.as_ref().map(|v| v.value) {
        None | Some(0) => None,
        Some(p) => Some(
            u16::try_from(p)
                .map_err(|_| FieldError::new("alt_port", format!("{p} is not a port")))?,
        ),
    };
    let jitter = |field: &str, d: Option<&envoy_types::pb::google::protobuf::Duration>| match d {
        None => Ok(Duration::ZERO),
        Some(d) => duration(d).map_err(|e| e.within(field)),
    };
    let initial_jitter = jitter("initial_jitter", h.initial_jitter.as_ref())?;
    let interval_jitter = jitter("interval_jitter", h.interval_jitter.as_ref())?
        + interval.mul_f64(f64::from(h.interval_jitter_percent.min(100)) / 100.0);
    use core::health_check::HealthChecker as K;
    let kind = match &h.health_checker {
        None => return Err(FieldError::new("health_checker", "required")),
        Some(K::TcpHealthCheck(t)) => HealthCheckKind::Tcp {
            send: payload(t.send.as_ref()).map_err(|e| e.within("tcp_health_check.send"))?,
            receive: t
                .receive
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    payload(Some(p)).map_err(|e| e.within(format!("tcp_health_check.receive[{i}]")))
                })
                .collect::<Result<_, _>>()?,
        },
        Some(K::HttpHealthCheck(hh)) => {
            if hh.path.is_empty() {
                return Err(FieldError::new(
                    "http_health_check.path",
                    "must not be empty",
                ));
            }
            let mut expected = Vec::new();
            for (i, r) in hh.expected_statuses.iter().enumerate() {
                if !(100 <= r.start && r.start < r.end && r.end <= 600) {
                    return Err(FieldError::new(
                        format!("http_health_check.expected_statuses[{i}]"),
                        format!("[{}, {}) is not a range of HTTP statuses", r.start, r.end),
                    ));
                }
                expected.push((r.start as u16, r.end as u16));
            }
            if expected.is_empty() {
                expected.push((200, 201));
            }
            HealthCheckKind::Http {
                host: if hh.host.is_empty() {
                    cluster.to_string()
                } else {
                    hh.host.clone()
                },
                path: hh.path.clone(),
                expected_statuses: expected,
            }
        }
        Some(other) => {
            tracing::warn!(%cluster, checker = ?std::mem::discriminant(other), "health checker not run by skiff; hosts keep their EDS health");
            return Ok(None);
        }
    };
    Ok(Some(HealthCheck {
        timeout,
        interval,
        no_traffic_interval,
        unhealthy_threshold,
        healthy_threshold,
        alt_port,
        initial_jitter,
        interval_jitter,
        kind,
        transport_match: h
            .transport_socket_match_criteria
            .as_ref()
            .map(crate::model::tls::struct_strings),
        tls_alpn: h
            .tls_options
            .as_ref()
            .map(|t| t.alpn_protocols.clone())
            .unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cluster, LbPolicy, ModelError};

    fn cluster(yaml_tail: &str) -> Result<Cluster, ModelError> {
        let text =
            format!("name: c\ntype: STATIC\nload_assignment: {{ cluster_name: c }}\n{yaml_tail}");
        let v = skiff_proto::parse_text(&text).expect("yaml");
        let pb: pb::Cluster = skiff_proto::decode_json(&v).expect("cluster proto");
        Cluster::try_from(&pb)
    }

    fn field_of(yaml_tail: &str) -> String {
        cluster(yaml_tail).expect_err("must be rejected").field
    }

    #[test]
    fn defaults_are_envoys() {
        let c = cluster("").unwrap();
        let s = &c.lb;
        assert_eq!(s.least_request.choice_count, 2);
        assert_eq!(s.ring_hash.min_ring_size, 1024);
        assert_eq!(s.maglev.table_size, 65537);
        assert_eq!(s.common.healthy_panic_threshold, 50.0);
        assert!(s.outlier.is_none());
        assert_eq!(s.circuit_breakers.default.max_connections, 1024);
        assert_eq!(s.circuit_breakers.default.max_retries, 3);
        assert!(s.health_checks.is_empty());
    }

    #[test]
    fn every_section_parses() {
        let c = cluster(
            r#"
lb_policy: LEAST_REQUEST
least_request_lb_config: { choice_count: 3, active_request_bias: { default_value: 0.5, runtime_key: x } }
common_lb_config:
  healthy_panic_threshold: { value: 25 }
  zone_aware_lb_config: { min_cluster_size: 3 }
outlier_detection:
  consecutive_5xx: 7
  interval: 2s
  base_ejection_time: 10s
  max_ejection_percent: 40
  split_external_local_origin_errors: true
circuit_breakers:
  thresholds:
  - { max_connections: 5, max_pending_requests: 6, max_requests: 7, max_retries: 8 }
  - { priority: HIGH, max_connections: 50, retry_budget: { budget_percent: { value: 25 } } }
health_checks:
- timeout: 1s
  interval: 3s
  initial_jitter: 2s
  interval_jitter: 1s
  interval_jitter_percent: 50
  unhealthy_threshold: 2
  healthy_threshold: 1
  http_health_check: { path: /healthz, expected_statuses: [ { start: 200, end: 300 } ] }
"#,
        )
        .unwrap();
        assert_eq!(c.lb_policy, LbPolicy::LeastRequest);
        let s = &c.lb;
        assert_eq!(s.least_request.choice_count, 3);
        assert_eq!(s.least_request.active_request_bias, 0.5);
        assert_eq!(s.common.healthy_panic_threshold, 25.0);
        assert_eq!(s.common.zone_aware.as_ref().unwrap().min_cluster_size, 3);
        let od = s.outlier.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx, 7);
        assert_eq!(od.interval, Duration::from_secs(2));
        assert_eq!(od.base_ejection_time, Duration::from_secs(10));
        assert_eq!(od.max_ejection_percent, 40);
        assert!(od.split_external_local_origin_errors);
        assert_eq!(
            od.consecutive_gateway_failure, 5,
            "unset fields keep Envoy's defaults"
        );
        let cb = &s.circuit_breakers;
        assert_eq!(
            (
                cb.default.max_connections,
                cb.default.max_pending_requests,
                cb.default.max_requests,
                cb.default.max_retries
            ),
            (5, 6, 7, 8)
        );
        assert_eq!(cb.high.max_connections, 50);
        assert_eq!(cb.high.retry_budget, Some((25.0, 3)));
        let hc = &s.health_checks[0];
        assert_eq!(hc.interval, Duration::from_secs(3));
        assert_eq!(hc.initial_jitter, Duration::from_secs(2));
        assert_eq!(hc.interval_jitter, Duration::from_millis(2500));
        assert_eq!(
            hc.kind,
            HealthCheckKind::Http {
                host: "c".into(),
                path: "/healthz".into(),
                expected_statuses: vec![(200, 300)]
            }
        );
    }

    #[test]
    fn typed_policies_carry_their_parameters_and_peak_ewma_is_opt_in() {
        let c = cluster(
            r#"
load_balancing_policy:
  policies:
  - typed_extension_config:
      name: rh
      typed_config: { "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash, minimum_ring_size: 64, maximum_ring_size: 128 }
"#,
        )
        .unwrap();
        assert_eq!(c.lb_policy, LbPolicy::RingHash);
        assert_eq!(c.lb.ring_hash.min_ring_size, 64);
        assert_eq!(c.lb.ring_hash.max_ring_size, 128);
        let c = cluster(&format!(
            r#"
load_balancing_policy:
  policies:
  - typed_extension_config:
      name: ewma
      typed_config: {{ "@type": type.googleapis.com/{PEAK_EWMA_POLICY} }}
  - typed_extension_config:
      name: lr
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest }}
"#
        ))
        .unwrap();
        assert_eq!(c.lb_policy, LbPolicy::PeakEwma);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                "least_request_lb_config: { choice_count: 1 }",
                "least_request_lb_config.choice_count",
            ),
            (
                "ring_hash_lb_config: { minimum_ring_size: 10, maximum_ring_size: 5 }",
                "ring_hash_lb_config.minimum_ring_size",
            ),
            (
                "maglev_lb_config: { table_size: 65536 }",
                "maglev_lb_config.table_size",
            ),
            (
                "common_lb_config: { healthy_panic_threshold: { value: 150 } }",
                "common_lb_config.healthy_panic_threshold",
            ),
            (
                "outlier_detection: { max_ejection_percent: 101 }",
                "outlier_detection.max_ejection_percent",
            ),
            (
                "outlier_detection: { interval: 0s }",
                "outlier_detection.interval",
            ),
            (
                "health_checks: [ { timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, http_health_check: { path: \"\" } } ]",
                "health_checks[0].http_health_check.path",
            ),
            (
                "health_checks: [ { interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {} } ]",
                "health_checks[0].timeout",
            ),
            (
                "circuit_breakers: { thresholds: [ { retry_budget: { budget_percent: { value: 120 } } } ] }",
                "circuit_breakers.thresholds[0].retry_budget.budget_percent",
            ),
        ];
        for (yaml, field) in cases {
            assert_eq!(field_of(yaml), field, "{yaml}");
        }
    }
}
