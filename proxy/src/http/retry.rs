//! Envoy's retry decisions (pure): which outcomes a `retry_on` policy retries, and the
//! fully jittered exponential back-off between attempts.

use std::time::Duration;

use hyper::HeaderMap;

use crate::model::route::{RetryOn, RetryPolicy};

/// What one attempt ended with, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Response headers arrived with this status (`grpc-status` header, if any, alongside).
    Response {
        /// HTTP status.
        status: u16,
        /// `grpc-status` of a trailers-only gRPC response.
        grpc_status: Option<u8>,
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
        } => {
            (on.server_error && (500..600).contains(&status))
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_4xx && status == 409)
                || (on.retriable_status_codes && policy.retriable_status_codes.contains(&status))
                || grpc_status.is_some_and(|g| on.grpc_codes.get(usize::from(g)) == Some(&true))
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
    use crate::model::route::DEFAULT_RETRY_BASE;

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
        }
    }

    fn resp(status: u16) -> Attempt {
        Attempt::Response {
            status,
            grpc_status: None,
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
                },
                true,
            ),
            (
                "cancelled",
                Attempt::Response {
                    status: 200,
                    grpc_status: Some(14),
                },
                false,
            ),
            ("", resp(503), false),
        ];
        for (on, outcome, want) in table {
            let p = policy(on, &[503]);
            assert_eq!(retriable(&p, *outcome), *want, "{on:?} {outcome:?}");
        }
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
