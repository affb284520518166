//! `envoy.filters.http.fault`: delays and aborts injected before the router, as Envoy's fault
//! filter does (and as Istio's VirtualService `fault` asks).
//!
//! For each fault filter of the connection manager, in order: the configuration is the
//! route's `typed_per_filter_config` for that filter name, else the virtual host's, else the
//! filter's own (a `disabled` filter runs only where a route enables it). It applies when
//! `upstream_cluster` (if set) is the route's cluster, every `headers` matcher matches and
//! `x-envoy-downstream-service-node` is one of `downstream_nodes` (if set), and fewer than
//! `max_active_faults` faults are active. Then the delay (fixed, or milliseconds from
//! `x-envoy-fault-delay-request`) is drawn against its percentage and slept, and the abort
//! (HTTP status, gRPC status, or from `x-envoy-fault-abort-request` /
//! `x-envoy-fault-abort-grpc-request`) is drawn against its own and answered locally.
//! Header-controlled percentages (`x-envoy-fault-*-request-percentage`) can only lower the
//! configured one. Stats: `http.<prefix>.fault.{delays_injected,aborts_injected,
//! faults_overflow}`, gauge `http.<prefix>.fault.active_faults`; response flags `DI`, `FI`
//! in `skiff.response_flags.<FLAG>`.

use std::sync::Arc;
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use tracing::debug;

use super::route::{RequestFacts, all_request_headers_match};
use super::{Body, local_reply};
use crate::model::fault::{AbortKind, DelayKind, Fault, FaultFilter, FaultOverride, Percent};
use crate::model::route::{RouteAction, Target};
use crate::model::{ClusterSpecifier, VirtualHost, route::Route};
use crate::stats::{Gauge, Stats};

/// Envoy's body for a fault abort.
pub const ABORT_BODY: &str = "fault filter abort";

const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
const DELAY_PERCENT_HEADER: &str = "x-envoy-fault-delay-request-percentage";
const ABORT_HEADER: &str = "x-envoy-fault-abort-request";
const ABORT_GRPC_HEADER: &str = "x-envoy-fault-abort-grpc-request";
const ABORT_PERCENT_HEADER: &str = "x-envoy-fault-abort-request-percentage";
const DOWNSTREAM_NODE_HEADER: &str = "x-envoy-downstream-service-node";

/// The configuration of `filter` for this route (route, then virtual host, then the filter's
/// own), or `None` when the filter does nothing here.
pub fn effective<'a>(
    filter: &'a FaultFilter,
    vh: &'a VirtualHost,
    route: &'a Route,
) -> Option<&'a Arc<Fault>> {
    let find = |v: &'a [(String, FaultOverride)]| {
        v.iter().find(|(n, _)| *n == filter.name).map(|(_, o)| o)
    };
    match find(&route.faults).or_else(|| find(&vh.faults)) {
        Some(FaultOverride::Disabled) => None,
        Some(FaultOverride::Enabled) => Some(&filter.config),
        Some(FaultOverride::Config(c)) => Some(c),
        None if filter.disabled => None,
        None => Some(&filter.config),
    }
}

/// Whether `fault` applies to this request at all (before any percentage is drawn).
pub fn applies(fault: &Fault, route: &Route, req: &RequestFacts<'_>) -> bool {
    if let Some(want) = &fault.upstream_cluster {
        let cluster = match &route.action {
            RouteAction::Forward(f) => match &f.target {
                Target::Clusters(ClusterSpecifier::Cluster(c)) => Some(c.as_str()),
                _ => None,
            },
            _ => None,
        };
        if cluster != Some(want.as_str()) {
            return false;
        }
    }
    if !fault.downstream_nodes.is_empty() {
        let node = req
            .headers
            .get(DOWNSTREAM_NODE_HEADER)
            .and_then(|v| v.to_str().ok());
        if !node.is_some_and(|n| fault.downstream_nodes.iter().any(|d| d == n)) {
            return false;
        }
    }
    all_request_headers_match(&fault.headers, req)
}

fn header_u64(req: &RequestFacts<'_>, name: &str) -> Option<u64> {
    req.headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The configured percentage, lowered by `header` when the request carries a number.
fn percentage(p: Percent, req: &RequestFacts<'_>, header: &str) -> Percent {
    match header_u64(req, header) {
        Some(n) => p.capped(u32::try_from(n).unwrap_or(u32::MAX)),
        None => p,
    }
}

/// The delay to inject, if this request draws one.
pub fn delay_for(fault: &Fault, req: &RequestFacts<'_>, draw: u64) -> Option<Duration> {
    let d = fault.delay?;
    let (duration, pct) = match d.kind {
        DelayKind::Fixed(x) => (x, d.percentage),
        DelayKind::Header => (
            Duration::from_millis(header_u64(req, DELAY_HEADER)?),
            percentage(d.percentage, req, DELAY_PERCENT_HEADER),
        ),
    };
    pct.hit(draw).then_some(duration)
}

/// The abort to answer with, if this request draws one.
pub fn abort_for(fault: &Fault, req: &RequestFacts<'_>, draw: u64) -> Option<AbortKind> {
    let a = fault.abort.as_ref()?;
    let (kind, pct) = match a.kind {
        AbortKind::Header => {
            let http = header_u64(req, ABORT_HEADER)
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| (200..600).contains(s));
            let kind = match http {
                Some(s) => AbortKind::Http(s),
                None => AbortKind::Grpc(u32::try_from(header_u64(req, ABORT_GRPC_HEADER)?).ok()?),
            };
            (kind, percentage(a.percentage, req, ABORT_PERCENT_HEADER))
        }
        k => (k, a.percentage),
    };
    pct.hit(draw).then_some(kind)
}

/// Counts a fault as active while it lives.
struct Active(Arc<Gauge>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Run every fault filter of the connection manager on this request: sleep the delays drawn,
/// and answer the first abort drawn (`None`: the request goes on to the router).
pub async fn inject(
    stats: &Stats,
    stat_prefix: &str,
    filters: &[FaultFilter],
    vh: &VirtualHost,
    route: &Route,
    req: &RequestFacts<'_>,
) -> Option<Response<Body>> {
    for filter in filters {
        let Some(fault) = effective(filter, vh, route) else {
            continue;
        };
        if (fault.delay.is_none() && fault.abort.is_none()) || !applies(fault, route, req) {
            continue;
        }
        let delay = delay_for(fault, req, fastrand::u64(..));
        let abort = abort_for(fault, req, fastrand::u64(..));
        if delay.is_none() && abort.is_none() {
            continue;
        }
        let name = |s: &str| format!("http.{stat_prefix}.fault.{s}");
        let active = stats.gauge(&name("active_faults"));
        if fault
            .max_active_faults
            .is_some_and(|max| active.get() >= u64::from(max))
        {
            stats.counter(&name("faults_overflow")).inc();
            continue;
        }
        active.inc();
        let _active = Active(active);
        if let Some(d) = delay {
            stats.counter(&name("delays_injected")).inc();
            stats.counter("skiff.response_flags.DI").inc();
            debug!(delay_ms = d.as_millis() as u64, flags = "DI", "fault delay");
            tokio::time::sleep(d).await;
        }
        if let Some(kind) = abort {
            stats.counter(&name("aborts_injected")).inc();
            stats.counter("skiff.response_flags.FI").inc();
            debug!(?kind, flags = "FI", "fault abort");
            let body = fault
                .abort
                .as_ref()
                .and_then(|a| a.body.as_deref())
                .unwrap_or(ABORT_BODY);
            return Some(abort_reply(kind, body));
        }
    }
    None
}

/// The local reply of an abort: the HTTP status, or a gRPC trailers-only answer (HTTP 200
/// with `grpc-status`), as Envoy sends them.
fn abort_reply(kind: AbortKind, body: &str) -> Response<Body> {
    match kind {
        AbortKind::Http(s) => local_reply(
            StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            body,
        ),
        AbortKind::Grpc(g) => {
            let mut r = local_reply(StatusCode::OK, "");
            let h = r.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(g));
            if let Ok(v) = HeaderValue::from_str(body) {
                h.insert("grpc-message", v);
            }
            r
        }
        // `abort_for` resolves header aborts into a status; never reached.
        AbortKind::Header => local_reply(StatusCode::SERVICE_UNAVAILABLE, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fault::{Abort, Delay};
    use hyper::{HeaderMap, Method};

    fn fault(delay: Option<Delay>, abort: Option<Abort>) -> Fault {
        Fault {
            delay,
            abort,
            upstream_cluster: None,
            headers: vec![],
            downstream_nodes: vec![],
            max_active_faults: None,
        }
    }

    fn pct(n: u32) -> Percent {
        Percent {
            numerator: n,
            denominator: 100,
        }
    }

    fn facts<'a>(h: &'a HeaderMap, m: &'a Method) -> RequestFacts<'a> {
        RequestFacts {
            host: "h",
            method: m,
            path: "/",
            headers: h,
        }
    }

    #[test]
    fn fault_draws_follow_percentages() {
        let f = fault(
            Some(Delay {
                kind: DelayKind::Fixed(Duration::from_millis(5)),
                percentage: pct(30),
            }),
            Some(Abort {
                kind: AbortKind::Http(503),
                percentage: pct(50),
                body: None,
            }),
        );
        let (h, m) = (HeaderMap::new(), Method::GET);
        let r = facts(&h, &m);
        assert_eq!(delay_for(&f, &r, 29), Some(Duration::from_millis(5)));
        assert_eq!(delay_for(&f, &r, 30), None);
        assert_eq!(abort_for(&f, &r, 149), Some(AbortKind::Http(503)));
        assert_eq!(abort_for(&f, &r, 150), None);
    }

    #[test]
    fn fault_headers_control_header_faults() {
        let f = fault(
            Some(Delay {
                kind: DelayKind::Header,
                percentage: pct(100),
            }),
            Some(Abort {
                kind: AbortKind::Header,
                percentage: pct(100),
                body: None,
            }),
        );
        let m = Method::GET;
        let none = HeaderMap::new();
        assert_eq!(delay_for(&f, &facts(&none, &m), 0), None);
        assert_eq!(abort_for(&f, &facts(&none, &m), 0), None);
        let mut h = HeaderMap::new();
        h.insert(DELAY_HEADER, HeaderValue::from_static("20"));
        h.insert(ABORT_HEADER, HeaderValue::from_static("429"));
        h.insert(ABORT_PERCENT_HEADER, HeaderValue::from_static("10"));
        let r = facts(&h, &m);
        assert_eq!(delay_for(&f, &r, 0), Some(Duration::from_millis(20)));
        assert_eq!(abort_for(&f, &r, 9), Some(AbortKind::Http(429)));
        assert_eq!(
            abort_for(&f, &r, 10),
            None,
            "the header lowers the percentage"
        );
        let mut g = HeaderMap::new();
        g.insert(ABORT_GRPC_HEADER, HeaderValue::from_static("14"));
        assert_eq!(abort_for(&f, &facts(&g, &m), 0), Some(AbortKind::Grpc(14)));
    }

    #[test]
    fn grpc_abort_is_trailers_only() {
        let r = abort_reply(AbortKind::Grpc(14), ABORT_BODY);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(
            abort_reply(AbortKind::Http(418), "x").status().as_u16(),
            418
        );
    }
}

#[cfg(test)]
mod active_tests {
    use super::*;
    use crate::model::fault::Delay;
    use crate::model::route::PathMatch;
    use crate::model::test_util::{direct_route, virtual_host};
    use hyper::{HeaderMap, Method};

    #[tokio::test]
    async fn max_active_faults_caps_concurrent_faults() {
        let fault = Fault {
            delay: Some(Delay {
                kind: DelayKind::Fixed(Duration::from_millis(300)),
                percentage: Percent {
                    numerator: 100,
                    denominator: 100,
                },
            }),
            abort: None,
            upstream_cluster: None,
            headers: vec![],
            downstream_nodes: vec![],
            max_active_faults: Some(1),
        };
        let filters = vec![FaultFilter {
            name: "f".into(),
            disabled: false,
            config: Arc::new(fault),
        }];
        let route = direct_route("r", PathMatch::Prefix("/".into()), true, vec![]);
        let vh = virtual_host("v", &["*"]);
        let stats = Arc::new(Stats::default());
        let (h, m) = (HeaderMap::new(), Method::GET);
        let facts = RequestFacts {
            host: "h",
            method: &m,
            path: "/",
            headers: &h,
        };
        let first = inject(&stats, "p", &filters, &vh, &route, &facts);
        let second = async {
            // Let the first fault start its delay, then try a second one.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let started = tokio::time::Instant::now();
            assert!(
                inject(&stats, "p", &filters, &vh, &route, &facts)
                    .await
                    .is_none()
            );
            started.elapsed()
        };
        let (_, waited) = tokio::join!(first, second);
        assert!(
            waited < Duration::from_millis(150),
            "the second request is not delayed: {waited:?}"
        );
        assert_eq!(stats.counter("http.p.fault.faults_overflow").get(), 1);
        assert_eq!(stats.counter("http.p.fault.delays_injected").get(), 1);
        assert_eq!(stats.gauge("http.p.fault.active_faults").get(), 0);
    }
}
