//! Envoy's retry decisions (pure): which outcomes a `retry_on` policy retries, and the
//! fully jittered exponential back-off between attempts.

use std::time::Duration;

use hyper::HeaderMap;

use crate::model::route::{DEFAULT_RETRY_BASE, RetryOn, RetryPolicy};

/// Request headers the router consumes: retry and timeout overrides from the downstream.
pub const CONSUMED: [&str; 6] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
];

/// Whether the request carries any `x-envoy-*` header: one pass over its names, so the
/// router's lookups and removals of [`CONSUMED`] are skipped for the usual request.
pub fn has_envoy_headers(h: &HeaderMap) -> bool {
    h.keys().any(|k| k.as_str().starts_with("x-envoy-"))
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The retry policy of one request: the route's (or virtual host's), changed by the
/// downstream's `x-envoy-retry-on` / `x-envoy-retry-grpc-on` (conditions added; without a
/// configured policy they create one with Envoy's defaults), `x-envoy-max-retries` (replaces
/// `num_retries`, ignored without any policy) and `x-envoy-retriable-status-codes` (added).
pub fn effective_policy(configured: Option<&RetryPolicy>, h: &HeaderMap) -> Option<RetryPolicy> {
    let on = [
        header(h, "x-envoy-retry-on"),
        header(h, "x-envoy-retry-grpc-on"),
    ]
    .into_iter()
    .flatten()
    .map(RetryOn::parse)
    .reduce(RetryOn::union);
    let mut p = match (configured, on) {
        (None, None) => return None,
        (Some(p), None) => p.clone(),
        (Some(p), Some(on)) => RetryPolicy {
            retry_on: p.retry_on.union(on),
            ..p.clone()
        },
        (None, Some(on)) => RetryPolicy {
            retry_on: on,
            num_retries: 1,
            per_try_timeout: None,
            base_interval: DEFAULT_RETRY_BASE,
            max_interval: DEFAULT_RETRY_BASE * 10,
            previous_hosts: false,
            host_selection_max_attempts: 1,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
        },
    };
    if let Some(n) = header(h, "x-envoy-max-retries").and_then(|v| v.parse().ok()) {
        p.num_retries = n;
    }
    if let Some(codes) = header(h, "x-envoy-retriable-status-codes") {
        p.retriable_status_codes.extend(
            codes
                .split(',')
                .filter_map(|c| c.trim().parse::<u16>().ok())
                .filter(|c| (100..=599).contains(c)),
        );
    }
    Some(p)
}

/// The timeout of a gRPC request on a route with `max_grpc_timeout`: its `grpc-timeout`
/// (`<digits><H|M|S|m|u|n>`; absent or malformed: none), capped by `max` unless `max` is zero.
/// `None` when the request is not gRPC (the route timeout applies).
pub fn grpc_timeout(
    h: &HeaderMap,
    max: std::time::Duration,
) -> Option<Option<std::time::Duration>> {
    use std::time::Duration;
    let grpc = header(h, "content-type").is_some_and(|c| c.starts_with("application/grpc"));
    if !grpc {
        return None;
    }
    let asked = header(h, "grpc-timeout").and_then(|v| {
        let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
        let n: u64 = digits.parse().ok()?;
        Some(match unit {
            "H" => Duration::from_secs(n.checked_mul(3600)?),
            "M" => Duration::from_secs(n.checked_mul(60)?),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        })
    });
    Some(match (asked, max.is_zero()) {
        (Some(t), true) => Some(t),
        (Some(t), false) => Some(t.min(max)),
        (None, true) => None,
        (None, false) => Some(max),
    })
}

/// A millisecond timeout header (`x-envoy-upstream-rq-timeout-ms`): `Some(None)` for 0 (no
/// timeout), `None` when absent or not a number.
pub fn timeout_header(h: &HeaderMap, name: &str) -> Option<Option<std::time::Duration>> {
    let ms: u64 = header(h, name)?.parse().ok()?;
    Some((ms > 0).then(|| std::time::Duration::from_millis(ms)))
}

/// What one attempt ended with, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Response headers arrived with this status (`grpc-status` header, if any, alongside).
    Response {
        /// HTTP status.
        status: u16,
        /// `grpc-status` of a trailers-only gRPC response.
        grpc_status: Option<u8>,
        /// The response matched one of the policy's `retriable_headers`.
        header_match: bool,
    },
    /// The upstream connect failed or timed out.
    ConnectFailure,
    /// The connection or stream was reset before response headers.
    Reset {
        /// HTTP/2 REFUSED_STREAM.
        refused_stream: bool,
    },
    /// `per_try_timeout` expired before response headers.
    PerTryTimeout,
}

/// `grpc-status` of a response head, when it carries one.
pub fn grpc_status(h: &HeaderMap) -> Option<u8> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Whether `policy` retries `outcome` (Envoy's `retry_on` semantics).
pub fn retriable(policy: &RetryPolicy, outcome: Attempt) -> bool {
    let on: RetryOn = policy.retry_on;
    // 5xx and gateway-error also cover attempts that never got a response.
    let no_response = on.server_error || on.gateway_error;
    match outcome {
        Attempt::ConnectFailure => no_response || on.reset || on.connect_failure,
        Attempt::Reset { refused_stream } => {
            no_response || on.reset || (refused_stream && on.refused_stream)
        }
        Attempt::PerTryTimeout => no_response || on.reset,
        Attempt::Response {
            status,
            grpc_status,
            header_match,
        } => {
            (on.server_error && (500..600).contains(&status))
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_4xx && status == 409)
                || (on.retriable_status_codes && policy.retriable_status_codes.contains(&status))
                || grpc_status.is_some_and(|g| on.grpc_codes.get(usize::from(g)) == Some(&true))
                || (on.retriable_headers && header_match)
        }
    }
}

/// Upper bound of the back-off before retry number `retry` (1-based): `base * (2^retry - 1)`,
/// capped at `max`. Envoy: 0-24 ms, then 0-74 ms, 0-174 ms ... with the 25 ms default.
pub fn backoff_ceiling(policy: &RetryPolicy, retry: u32) -> Duration {
    let factor = (1u64 << retry.min(30)) - 1;
    let ceiling = policy
        .base_interval
        .checked_mul(u32::try_from(factor).unwrap_or(u32::MAX))
        .unwrap_or(policy.max_interval);
    ceiling.min(policy.max_interval)
}

/// The jittered back-off: uniform in `[0, ceiling)` drawn from `random`.
pub fn backoff(policy: &RetryPolicy, retry: u32, random: u64) -> Duration {
    let ceiling = backoff_ceiling(policy, retry).as_micros() as u64;
    if ceiling == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(random % ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &str, codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            retry_on: RetryOn::parse(on),
            num_retries: 2,
            per_try_timeout: None,
            base_interval: DEFAULT_RETRY_BASE,
            max_interval: DEFAULT_RETRY_BASE * 10,
            previous_hosts: false,
            host_selection_max_attempts: 1,
            retriable_status_codes: codes.to_vec(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
        }
    }

    fn resp(status: u16) -> Attempt {
        Attempt::Response {
            status,
            grpc_status: None,
            header_match: false,
        }
    }

    #[test]
    fn retry_on_conditions_follow_envoy() {
        let reset = Attempt::Reset {
            refused_stream: false,
        };
        let refused = Attempt::Reset {
            refused_stream: true,
        };
        let table: &[(&str, Attempt, bool)] = &[
            ("5xx", resp(500), true),
            ("5xx", resp(503), true),
            ("5xx", resp(404), false),
            ("5xx", Attempt::ConnectFailure, true),
            ("5xx", reset, true),
            ("5xx", Attempt::PerTryTimeout, true),
            ("gateway-error", resp(502), true),
            ("gateway-error", resp(504), true),
            ("gateway-error", resp(500), false),
            ("gateway-error", Attempt::ConnectFailure, true),
            ("reset", reset, true),
            ("reset", resp(503), false),
            ("reset", Attempt::PerTryTimeout, true),
            ("connect-failure", Attempt::ConnectFailure, true),
            ("connect-failure", reset, false),
            ("connect-failure", resp(503), false),
            ("refused-stream", refused, true),
            ("refused-stream", reset, false),
            ("retriable-4xx", resp(409), true),
            ("retriable-4xx", resp(404), false),
            ("retriable-status-codes", resp(503), true),
            ("retriable-status-codes", resp(502), false),
            ("unavailable", resp(503), false),
            (
                "unavailable",
                Attempt::Response {
                    status: 200,
                    grpc_status: Some(14),
                    header_match: false,
                },
                true,
            ),
            (
                "cancelled",
                Attempt::Response {
                    status: 200,
                    grpc_status: Some(14),
                    header_match: false,
                },
                false,
            ),
            ("", resp(503), false),
            (
                "retriable-headers",
                Attempt::Response {
                    status: 200,
                    grpc_status: None,
                    header_match: true,
                },
                true,
            ),
            (
                "5xx",
                Attempt::Response {
                    status: 200,
                    grpc_status: None,
                    header_match: true,
                },
                false,
            ),
        ];
        for (on, outcome, want) in table {
            let p = policy(on, &[503]);
            assert_eq!(retriable(&p, *outcome), *want, "{on:?} {outcome:?}");
        }
    }

    #[test]
    fn downstream_headers_adjust_the_policy() {
        let mut h = HeaderMap::new();
        assert_eq!(effective_policy(None, &h), None);
        h.insert("x-envoy-max-retries", "4".parse().unwrap());
        assert_eq!(
            effective_policy(None, &h),
            None,
            "max-retries alone retries nothing"
        );
        let route = policy("connect-failure", &[]);
        let p = effective_policy(Some(&route), &h).unwrap();
        assert_eq!(p.num_retries, 4);
        h.insert("x-envoy-retry-on", "5xx".parse().unwrap());
        h.insert("x-envoy-retry-grpc-on", "unavailable".parse().unwrap());
        h.insert(
            "x-envoy-retriable-status-codes",
            "418, 999,x".parse().unwrap(),
        );
        let p = effective_policy(Some(&route), &h).unwrap();
        assert!(p.retry_on.connect_failure && p.retry_on.server_error && p.retry_on.grpc_codes[14]);
        assert_eq!(p.retriable_status_codes, [418]);
        h.remove("x-envoy-max-retries");
        let p = effective_policy(None, &h).unwrap();
        assert_eq!((p.num_retries, p.base_interval), (1, DEFAULT_RETRY_BASE));
        assert!(p.retry_on.server_error && !p.retry_on.connect_failure);
        h.insert("x-envoy-upstream-rq-timeout-ms", "0".parse().unwrap());
        assert_eq!(
            timeout_header(&h, "x-envoy-upstream-rq-timeout-ms"),
            Some(None)
        );
        h.insert("x-envoy-upstream-rq-timeout-ms", "250".parse().unwrap());
        assert_eq!(
            timeout_header(&h, "x-envoy-upstream-rq-timeout-ms"),
            Some(Some(Duration::from_millis(250)))
        );
        assert_eq!(
            timeout_header(&h, "x-envoy-upstream-rq-per-try-timeout-ms"),
            None
        );
    }

    #[test]
    fn grpc_timeout_replaces_the_route_timeout() {
        let mut h = HeaderMap::new();
        let max = Duration::from_secs(2);
        assert_eq!(grpc_timeout(&h, max), None, "not gRPC: route timeout");
        h.insert("content-type", "application/grpc+proto".parse().unwrap());
        assert_eq!(
            grpc_timeout(&h, Duration::ZERO),
            Some(None),
            "no header, no cap"
        );
        assert_eq!(grpc_timeout(&h, max), Some(Some(max)));
        h.insert("grpc-timeout", "150m".parse().unwrap());
        assert_eq!(
            grpc_timeout(&h, max),
            Some(Some(Duration::from_millis(150)))
        );
        h.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(grpc_timeout(&h, max), Some(Some(max)), "capped");
        assert_eq!(
            grpc_timeout(&h, Duration::ZERO),
            Some(Some(Duration::from_secs(3600)))
        );
        h.insert("grpc-timeout", "oops".parse().unwrap());
        assert_eq!(grpc_timeout(&h, Duration::ZERO), Some(None));
    }

    #[test]
    fn backoff_is_fully_jittered_and_capped() {
        let p = policy("5xx", &[]);
        assert_eq!(backoff_ceiling(&p, 1), Duration::from_millis(25));
        assert_eq!(backoff_ceiling(&p, 2), Duration::from_millis(75));
        assert_eq!(backoff_ceiling(&p, 3), Duration::from_millis(175));
        assert_eq!(backoff_ceiling(&p, 4), Duration::from_millis(250));
        assert_eq!(backoff_ceiling(&p, 60), Duration::from_millis(250));
        for r in [0, 1, 24_999, 25_000, u64::MAX] {
            assert!(backoff(&p, 1, r) < Duration::from_millis(25));
        }
        assert_eq!(backoff(&p, 1, 25_001), Duration::from_micros(1));
    }
}
