//! The HTTP fault filter's configuration (`envoy.extensions.filters.http.fault.v3.HTTPFault`),
//! the filter Istio's VirtualService `fault` compiles to, and Envoy's `FractionalPercent`.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as pb;
use envoy_types::pb::envoy::r#type::v3 as tpb;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::compat::{self, FAULT_TYPE};
use super::matchers::{HeaderMatch, header_match};
use super::{FieldError, duration};

/// `envoy.type.v3.FractionalPercent`: `numerator` out of `denominator` (100, 10 000 or 1 000 000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent {
    /// Numerator (values above the denominator mean always).
    pub numerator: u32,
    /// 100, 10 000 or 1 000 000.
    pub denominator: u32,
}

impl Percent {
    /// Parse a `FractionalPercent`; unset is 0 %.
    pub fn from_proto(p: Option<&tpb::FractionalPercent>) -> Result<Percent, FieldError> {
        let Some(p) = p else {
            return Ok(Percent {
                numerator: 0,
                denominator: 100,
            });
        };
        let denominator = match p.denominator {
            0 => 100,
            1 => 10_000,
            2 => 1_000_000,
            o => {
                return Err(FieldError::new("denominator", format!("unknown value {o}")));
            }
        };
        Ok(Percent {
            numerator: p.numerator,
            denominator,
        })
    }

    /// Whether `random` (any u64, uniformly drawn) falls inside the fraction, Envoy's way:
    /// `random % denominator < numerator`.
    pub fn hit(self, random: u64) -> bool {
        random % u64::from(self.denominator) < u64::from(self.numerator)
    }

    /// The same denominator with a smaller numerator (header-controlled percentages are
    /// capped by the configured one).
    pub fn capped(self, numerator: u32) -> Percent {
        Percent {
            numerator: numerator.min(self.numerator),
            denominator: self.denominator,
        }
    }
}

/// How a fault delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayKind {
    /// `fixed_delay`.
    Fixed(Duration),
    /// `header_delay`: milliseconds from `x-envoy-fault-delay-request`.
    Header,
}

/// `FaultDelay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    /// Fixed or header-controlled.
    pub kind: DelayKind,
    /// `percentage` (for header delays capped by `x-envoy-fault-delay-request-percentage`).
    pub percentage: Percent,
}

/// How a fault aborts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortKind {
    /// `http_status` (200..=599).
    Http(u16),
    /// `grpc_status`: HTTP 200 with `grpc-status`.
    Grpc(u32),
    /// `header_abort`: the status from `x-envoy-fault-abort-request` or
    /// `x-envoy-fault-abort-grpc-request`.
    Header,
}

/// `FaultAbort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// What the local reply says.
    pub kind: AbortKind,
    /// `percentage` (for header aborts capped by `x-envoy-fault-abort-request-percentage`).
    pub percentage: Percent,
    /// `response_body`, else Envoy's `fault filter abort`.
    pub body: Option<String>,
}

/// Validated `HTTPFault`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// `delay`.
    pub delay: Option<Delay>,
    /// `abort`.
    pub abort: Option<Abort>,
    /// `upstream_cluster`: only requests routed to this cluster.
    pub upstream_cluster: Option<String>,
    /// `headers`: every matcher must match.
    pub headers: Vec<HeaderMatch>,
    /// `downstream_nodes`: only requests whose `x-envoy-downstream-service-node` is listed.
    pub downstream_nodes: Vec<String>,
    /// `max_active_faults`: no new fault while this many are active.
    pub max_active_faults: Option<u32>,
}

/// An `http_filters` entry of type `HTTPFault`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultFilter {
    /// The filter's name (what `typed_per_filter_config` keys on).
    pub name: String,
    /// `disabled: true`: runs only on routes that enable it.
    pub disabled: bool,
    /// Its configuration.
    pub config: Arc<Fault>,
}

/// A per-route (or virtual host, or route configuration) setting for one fault filter.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultOverride {
    /// `FilterConfig { disabled: true }`: the filter does nothing here.
    Disabled,
    /// `FilterConfig { }` without config: the listener's config, enabled here.
    Enabled,
    /// A `HTTPFault` that replaces the listener's config here.
    Config(Arc<Fault>),
}

/// Parse an `HTTPFault` message.
pub fn fault(bytes: &[u8]) -> Result<Fault, FieldError> {
    let f = pb::HttpFault::decode(bytes)
        .map_err(|e| FieldError::new("", format!("invalid {FAULT_TYPE}: {e}")))?;
    if f.response_rate_limit.is_some() {
        return Err(FieldError::new(
            "response_rate_limit",
            "not supported by skiff (response bandwidth limits are not enforced)",
        ));
    }
    let delay = match &f.delay {
        Some(d) => {
            use common::fault_delay::FaultDelaySecifier as S;
            let kind = match &d.fault_delay_secifier {
                Some(S::FixedDelay(x)) => {
                    DelayKind::Fixed(duration(x).map_err(|e| e.within("delay.fixed_delay"))?)
                }
                Some(S::HeaderDelay(_)) => DelayKind::Header,
                None => {
                    return Err(FieldError::new(
                        "delay",
                        "needs fixed_delay or header_delay",
                    ));
                }
            };
            let percentage = Percent::from_proto(d.percentage.as_ref())
                .map_err(|e| e.within("delay.percentage"))?;
            Some(Delay { kind, percentage })
        }
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => {
            use pb::fault_abort::ErrorType as T;
            let kind = match &a.error_type {
                Some(T::HttpStatus(s)) => AbortKind::Http(
                    u16::try_from(*s)
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .ok_or_else(|| {
                            FieldError::new(
                                "abort.http_status",
                                format!("{s} is not in [200, 600)"),
                            )
                        })?,
                ),
                Some(T::GrpcStatus(s)) => AbortKind::Grpc(*s),
                Some(T::HeaderAbort(_)) => AbortKind::Header,
                None => {
                    return Err(FieldError::new(
                        "abort",
                        "needs http_status, grpc_status or header_abort",
                    ));
                }
            };
            let percentage = Percent::from_proto(a.percentage.as_ref())
                .map_err(|e| e.within("abort.percentage"))?;
            Some(Abort {
                kind,
                percentage,
                body: (!a.response_body.is_empty()).then(|| a.response_body.clone()),
            })
        }
        None => None,
    };
    let mut headers = Vec::with_capacity(f.headers.len());
    for (i, h) in f.headers.iter().enumerate() {
        headers.push(header_match(h).map_err(|e| e.within(format!("headers[{i}]")))?);
    }
    Ok(Fault {
        delay,
        abort,
        upstream_cluster: (!f.upstream_cluster.is_empty()).then(|| f.upstream_cluster.clone()),
        headers,
        downstream_nodes: f.downstream_nodes.clone(),
        max_active_faults: f.max_active_faults.map(|m| m.value),
    })
}

/// Type of `envoy.config.route.v3.FilterConfig` (a per-route wrapper with `disabled`).
const FILTER_CONFIG_TYPE: &str = "envoy.config.route.v3.FilterConfig";

/// Check one `typed_per_filter_config` entry (`name` -> `any`) under the compatibility rule,
/// keeping the fault filter's. Observational and optional filters' entries are accepted;
/// anything else skiff does not run is refused (a per-route config would make it act).
pub fn per_filter(name: &str, any: &Any) -> Result<Option<FaultOverride>, FieldError> {
    let at = format!("typed_per_filter_config[{name:?}]");
    let mut type_name = compat::type_name(any);
    let mut inner: Option<&Any> = Some(any);
    let mut optional = false;
    let mut disabled = false;
    let wrapped;
    if type_name == FILTER_CONFIG_TYPE {
        wrapped = rpb::FilterConfig::decode(any.value.as_slice())
            .map_err(|e| FieldError::new(&at, format!("invalid {FILTER_CONFIG_TYPE}: {e}")))?;
        optional = wrapped.is_optional;
        disabled = wrapped.disabled;
        inner = wrapped.config.as_ref();
        type_name = inner.map(compat::type_name).unwrap_or_default();
    }
    let verdict = compat::classify(compat::Kind::HttpFilter, name, &type_name, optional);
    let is_fault = matches!(&verdict, Ok(compat::Verdict::Run(e)) if e.type_name == FAULT_TYPE);
    if is_fault {
        return Ok(Some(match inner {
            _ if disabled => FaultOverride::Disabled,
            Some(a) => FaultOverride::Config(Arc::new(fault(&a.value).map_err(|e| e.within(&at))?)),
            None => FaultOverride::Enabled,
        }));
    }
    if disabled {
        // Turning a filter off per route never makes skiff do less than Envoy.
        return Ok(None);
    }
    match verdict {
        Ok(compat::Verdict::Skip(_)) => Ok(None),
        Ok(compat::Verdict::Run(e)) if e.type_name == compat::CORS_TYPE => {
            Err(compat::refuse(compat::F_CORS_POLICY, at))
        }
        Ok(compat::Verdict::Run(_)) => Ok(None),
        Err(reason) => Err(FieldError::new(at, reason.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Duration as PbDuration;

    fn any<M: Message>(t: &str, m: &M) -> Any {
        Any {
            type_url: format!("type.googleapis.com/{t}"),
            value: m.encode_to_vec(),
        }
    }

    #[test]
    fn fault_abort_and_delay_convert() {
        let cfg = pb::HttpFault {
            delay: Some(common::FaultDelay {
                percentage: Some(tpb::FractionalPercent {
                    numerator: 50,
                    denominator: 1,
                }),
                fault_delay_secifier: Some(common::fault_delay::FaultDelaySecifier::FixedDelay(
                    PbDuration {
                        seconds: 0,
                        nanos: 200_000_000,
                    },
                )),
            }),
            abort: Some(pb::FaultAbort {
                percentage: Some(tpb::FractionalPercent {
                    numerator: 100,
                    denominator: 0,
                }),
                error_type: Some(pb::fault_abort::ErrorType::HttpStatus(503)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = fault(&cfg.encode_to_vec()).unwrap();
        let d = f.delay.unwrap();
        assert_eq!(d.kind, DelayKind::Fixed(Duration::from_millis(200)));
        assert_eq!(
            d.percentage,
            Percent {
                numerator: 50,
                denominator: 10_000
            }
        );
        assert_eq!(f.abort.unwrap().kind, AbortKind::Http(503));
        let bad = pb::HttpFault {
            abort: Some(pb::FaultAbort {
                error_type: Some(pb::fault_abort::ErrorType::HttpStatus(700)),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            fault(&bad.encode_to_vec()).unwrap_err().field,
            "abort.http_status"
        );
    }

    #[test]
    fn percent_hits_follow_envoy() {
        let p = Percent {
            numerator: 25,
            denominator: 100,
        };
        assert!(p.hit(24) && !p.hit(25) && p.hit(124));
        assert_eq!(p.capped(10).numerator, 10);
        assert_eq!(p.capped(90).numerator, 25);
    }

    #[test]
    fn per_filter_configs_follow_the_rule() {
        let f = any(FAULT_TYPE, &pb::HttpFault::default());
        assert!(matches!(
            per_filter("envoy.filters.http.fault", &f),
            Ok(Some(FaultOverride::Config(_)))
        ));
        let off = any(
            FILTER_CONFIG_TYPE,
            &rpb::FilterConfig {
                disabled: true,
                ..Default::default()
            },
        );
        assert_eq!(
            per_filter("envoy.filters.http.fault", &off),
            Ok(Some(FaultOverride::Disabled))
        );
        let authz = any(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            &pb::HttpFault::default(),
        );
        let e = per_filter("envoy.filters.http.ext_authz", &authz).unwrap_err();
        assert!(e.field.contains("ext_authz"), "{e:?}");
        let cors = any(
            "envoy.extensions.filters.http.cors.v3.CorsPolicy",
            &pb::HttpFault::default(),
        );
        assert!(per_filter("envoy.filters.http.cors", &cors).is_err());
    }
}
