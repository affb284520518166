//! HTTP routing on `http_connection_manager` filter chains (issue 7).
//!
//! A chain whose terminal filter is the HCM is served here instead of being proxied as bytes:
//! hyper serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the downstream connection. Each
//! request:
//!
//! 1. gets Envoy's connection-manager headers (`x-forwarded-*`, `x-request-id`: `headers`);
//! 2. picks a virtual host and route (`route`, pure) from the inline `route_config` or the RDS
//!    configuration of the current snapshot, else answers 404 (`NR`);
//! 3. answers locally (`direct_response`, `redirect`), or forwards: path and host rewrites,
//!    configured header changes, then attempts over pooled upstream connections (`pool`) with
//!    Envoy's retry policy (`retry`: `retry_on`, previous hosts, jittered back-off, the
//!    `max_retries` breaker), the route timeout over all attempts and `per_try_timeout` per
//!    attempt, and Envoy's local replies (503 `UH`/`NC`/`UF`/`UC`, 504 `UT`);
//! 4. counts `cluster.<name>.upstream_rq_*` and `http.<stat_prefix>.downstream_rq_*`.
//!
//! Each request loads the current snapshot, so a new route configuration applies to the next
//! request of a kept-alive connection (as in Envoy), while the request itself never sees half
//! an update. `sniff` is the http_inspector listener filter; `body` holds the request tee that
//! keeps a replay copy and the timed response body. HTTP/1.1 upgrades (WebSocket) allowed by
//! `upgrade_configs` become byte tunnels after `101`. Not done: CONNECT and upgrades over h2,
//! hedging, shadowing.

pub mod body;
pub mod fault;
mod filters;
pub mod headers;
pub mod limits;
pub mod pool;
pub mod retry;
pub mod route;
pub mod sniff;
pub mod upstream_tls;

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::time::Instant;
use tracing::debug;

use crate::accesslog::{self, Record};
use crate::addr::OrigDstAddr;
use crate::lb;
use crate::model::listener::HttpManager;
use crate::model::route::{
    Forward, PathMatch, PathRedirect, Redirect, RetryPolicy, Route, RouteAction, Target,
};
use crate::model::{ClusterKind, ClusterSpecifier, RouteConfig, VirtualHost};
use crate::net::ConnectError;
use crate::state::{ClusterEntry, Snapshot, Store};
use crate::stats::{HttpStats, RqStats, ScopedCounter, Stats};

use crate::gate::Gated;
use body::Timed;
use pool::{Proto, SendError};
use retry::Attempt;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response skiff sends downstream and every request it sends upstream.
pub type Body = BoxBody<Bytes, BoxError>;

/// Envoy's local reply for a failed or reset upstream before response headers.
pub const UPSTREAM_RESET: &str = "upstream connect error or disconnect/reset before headers";
/// Envoy's local reply when the route or per-try timeout expires.
pub const UPSTREAM_TIMEOUT: &str = "upstream request timeout";

/// What the connection manager uses of the data plane that hands it connections. The data
/// plane owns one and gives every HCM connection a clone of the `Arc`: `http` never sees the
/// data plane itself (it depends on `http`, not the reverse).
#[derive(Debug)]
pub struct Shared {
    /// Current configuration.
    pub store: Arc<Store>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// SO_MARK put on every upstream socket (the capture programs skip marked sockets).
    pub upstream_mark: Option<u32>,
    /// Kept-alive upstream HTTP connections.
    pub http_pool: pool::Pool,
    /// TLS configurations built from the snapshots' contexts and secrets (termination and
    /// origination alike), one cache for every data-plane worker (sessions resume on any).
    pub tls: Arc<crate::tls::TlsContexts>,
}

/// One downstream connection handed to the HTTP connection manager.
#[derive(Debug, Clone)]
pub struct HttpConn {
    /// The data plane's shared parts (store, stats, upstream mark, connection pool).
    pub dp: Arc<Shared>,
    /// The chain's HCM settings.
    pub manager: Arc<HttpManager>,
    /// Listener name (for logs).
    pub listener: String,
    /// Downstream peer.
    pub client: SocketAddr,
    /// Downstream local address: the original destination of a redirected connection.
    pub local: SocketAddr,
    /// Original destination, for ORIGINAL_DST clusters.
    pub orig_dst: Option<OrigDstAddr>,
    /// Cancelled when the listener drains: the connection then drains too.
    pub drain: tokio_util::sync::CancellationToken,
    /// The connection arrived over TLS (terminated by its filter chain).
    pub tls: bool,
    /// The verified identity of a TLS client that presented a certificate (RBAC's
    /// `authenticated` principal).
    pub peer: Option<Arc<crate::rbac::PeerIdentity>>,
    /// This hop's `x-forwarded-client-cert` element, when the connection is mutual TLS and
    /// the manager's `forward_client_cert_details` writes one (`headers::client_cert_element`).
    pub client_cert: Option<Arc<str>>,
    /// The connection's part of every request's access-log record (addresses, SNI, TLS);
    /// `None` when the connection manager has no `access_log`.
    pub log_base: Option<Arc<Record>>,
}

/// One request's access-log record, filled in as the request is handled and written when
/// its response body ends.
#[derive(Debug)]
struct StreamLog {
    rec: std::sync::Mutex<Record>,
    /// Request body bytes read.
    received: Arc<AtomicU64>,
    started: Instant,
}

impl StreamLog {
    fn new(base: &Record) -> StreamLog {
        StreamLog {
            rec: std::sync::Mutex::new(Record {
                start: std::time::SystemTime::now(),
                ..base.clone()
            }),
            received: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }

    fn note(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.rec.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Note flags and details on the request's record, if it has one.
fn note(log: Option<&StreamLog>, flags: &[&'static str], details: &str) {
    if let Some(l) = log {
        l.note(|r| {
            r.response_flags = flags.to_vec();
            r.response_code_details = Some(details.to_string());
        });
    }
}

/// Serve HTTP/1.1 or HTTP/2 on `stream` (a TCP socket, or a TLS session terminated over one)
/// until the client closes it or a limit drains it (see [`limits`]).
pub async fn serve<S>(conn: HttpConn, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Resolved once per connection: a request only adds to these counters. Everything a
    // request reads of its connection sits behind one `Arc` that only this connection's
    // requests clone (the HCM's shared handles would bounce between workers otherwise).
    let snap = conn.dp.store.load();
    let hs = snap.http_stats(&conn.manager.stat_prefix);
    let filters = filters::Filters::resolve(&conn.manager, &snap);
    drop(snap);
    let lim = conn.manager.limits.clone();
    let drain = conn.drain.clone();
    let state = Arc::new(match lim.request_headers_timeout {
        Some(_) => limits::ConnState::default(),
        None => limits::ConnState::without_head_timeout(),
    });
    let served = Arc::new(Served {
        server: server_header(&conn.manager.server_header),
        conn: Arc::new(conn),
        hs: hs.clone(),
        filters,
        state: state.clone(),
    });
    let svc = hyper::service::service_fn(move |req| {
        let s = served.clone();
        async move {
            let conn = &s.conn;
            let max = conn.manager.limits.max_requests_per_connection;
            let (guard, last) = s.state.start(max, req.version() == Version::HTTP_2);
            let mut resp = handle(&s, req).await;
            // The request's access log is written when its body ends.
            if conn.log_base.is_some() {
                resp = logged(conn, resp);
            }
            // The last request an HTTP/1 connection serves says so.
            if last && resp.version() != Version::HTTP_2 {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let (parts, body) = resp.into_parts();
            // Not boxed again: hyper takes any body type, and this saves an allocation.
            let body = limits::Guarded::new(body, guard);
            Ok::<_, Infallible>(Response::from_parts(parts, body))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let head_limit = (lim.max_request_headers_kb as usize * 1024).max(8192);
    let mut h1 = builder.http1();
    h1.timer(TokioTimer::new())
        // `request_headers_timeout` is skiff's own (see `limits`): hyper's timer also runs
        // between kept-alive requests. Without it Envoy has no head timeout; the connection's
        // idle timeout bounds a silent client.
        .header_read_timeout(None)
        .max_buf_size(head_limit);
    // Envoy's default of 100 is hyper's own limit: left unset, hyper parses each head into
    // uninitialised stack space; set, it fills a buffer of that many entries per request.
    if lim.max_headers_count as usize != HYPER_MAX_HEADERS {
        h1.max_headers(lim.max_headers_count as usize);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(head_limit).unwrap_or(u32::MAX));
    let io = TokioIo::new(limits::HeadTimed::new(stream, state.clone()));
    let served = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(served);
    // Polled only when one of its timers or signals fired, not on every read and response.
    let watch = Gated::new(limits::watch_connection(&state, &lim, &drain));
    tokio::pin!(watch);
    let mut closing: Option<Instant> = None;
    let result = loop {
        tokio::select! {
            biased;
            r = served.as_mut() => break r,
            why = &mut watch, if closing.is_none() => {
                let stat = match why {
                    limits::Drain::HeadTimeout => {
                        hs.downstream_rq_header_timeout.inc();
                        debug!("request headers timeout: closing http connection");
                        return;
                    }
                    limits::Drain::Idle => &hs.downstream_cx_idle_timeout,
                    limits::Drain::MaxDuration => &hs.downstream_cx_max_duration_reached,
                    limits::Drain::MaxRequests => &hs.downstream_cx_max_requests_reached,
                    limits::Drain::Listener => &hs.downstream_cx_drain_close,
                };
                stat.inc();
                debug!(reason = ?why, "draining http connection");
                // HTTP/1.1: close after the response in flight (at once when idle);
                // HTTP/2: GOAWAY, streams in flight finish.
                served.as_mut().graceful_shutdown();
                // Envoy force-closes a connection its own limits drained after the drain
                // period; a draining listener's connections end with the process's drain
                // window instead.
                closing = Some(match why {
                    limits::Drain::Listener => Instant::now() + Duration::from_secs(24 * 3600),
                    _ => Instant::now() + lim.drain_timeout,
                });
            }
            () = tokio::time::sleep_until(closing.unwrap_or_else(Instant::now)), if closing.is_some() => {
                debug!("drain timeout: closing http connection");
                return;
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "http connection ended with error");
    }
}

/// Marks a response skiff generated itself (not an upstream's).
#[derive(Debug, Clone, Copy)]
struct LocalReply;

fn local_reply(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.extensions_mut().insert(LocalReply);
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

/// Host of a request: `:authority` (HTTP/2, absolute-form) or the Host header. It holds a
/// reference-counted handle on the received bytes, not a copy, and outlives changes to the
/// request's headers.
enum RequestHost {
    Authority(hyper::http::uri::Authority),
    Header(HeaderValue),
    Missing,
}

impl RequestHost {
    fn of(req: &Request<Incoming>) -> RequestHost {
        if let Some(a) = req.uri().authority() {
            return RequestHost::Authority(a.clone());
        }
        match req.headers().get(header::HOST) {
            Some(h) if h.to_str().is_ok() => RequestHost::Header(h.clone()),
            _ => RequestHost::Missing,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            RequestHost::Authority(a) => a.as_str(),
            RequestHost::Header(h) => h.to_str().unwrap_or_default(),
            RequestHost::Missing => "",
        }
    }

    /// The value as a `Host` header, when it is one already.
    fn header_value(&self) -> Option<HeaderValue> {
        match self {
            RequestHost::Header(h) => Some(h.clone()),
            _ => HeaderValue::from_str(self.as_str()).ok(),
        }
    }
}

/// Host of a request as a string (see [`RequestHost`]).
fn request_host(req: &Request<Incoming>) -> String {
    RequestHost::of(req).as_str().to_string()
}

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// The cluster a forwarded request went to and its Istio service (a response extension, for
/// Istio's labels).
#[derive(Debug, Clone)]
struct UpstreamCluster(String, Option<Arc<crate::model::istio::IstioService>>);

/// What Istio's request metrics need from the request before it is routed.
struct IstioRequest {
    started: Instant,
    host: String,
    grpc: bool,
    request_bytes: u64,
}

impl IstioRequest {
    fn of(req: &Request<Incoming>) -> IstioRequest {
        let h = req.headers();
        IstioRequest {
            started: Instant::now(),
            host: request_host(req),
            grpc: h
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc")),
            request_bytes: content_length(h),
        }
    }

    /// Record the request in Istio's metrics, at its response's headers.
    fn record(self, conn: &HttpConn, cfg: &crate::model::istio::IstioStats, resp: &Response<Body>) {
        use crate::stats::istio::{Facts, RequestEnd};
        let peer = conn.peer.as_ref().and_then(|p| p.uri_sans.first());
        let cluster = resp.extensions().get::<UpstreamCluster>();
        let facts = Facts {
            // A client side's upstream peer is not known here (pooled connections).
            peer_principal: if cfg.reporter.is_server() {
                peer.map(String::as_str)
            } else {
                None
            },
            mtls: cfg.reporter.is_server() && conn.tls && peer.is_some(),
            cluster: cluster.map(|c| c.0.as_str()),
            service: cluster.and_then(|c| c.1.as_deref()),
            host: Some(&self.host),
            ..Default::default()
        };
        let end = RequestEnd {
            status: resp.status().as_u16(),
            grpc: self.grpc,
            grpc_status: resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()),
            flags: if resp.extensions().get::<LocalReply>().is_some()
                && resp.status() == StatusCode::NOT_FOUND
            {
                "NR"
            } else {
                "-"
            },
        };
        conn.dp.stats.istio.request(
            cfg,
            &facts,
            &end,
            self.started.elapsed(),
            self.request_bytes,
            content_length(resp.headers()),
        );
    }
}

/// A message's `content-length` (0 when absent: a streamed body is not counted).
fn content_length(h: &HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Wrap the response body so that the request's record, kept in the response's extensions
/// by [`handle`], is logged when the body ends.
fn logged(conn: &Arc<HttpConn>, mut resp: Response<Body>) -> Response<Body> {
    let Some(log) = resp.extensions_mut().remove::<Arc<StreamLog>>() else {
        return resp;
    };
    let conn = conn.clone();
    resp.map(|b| {
        accesslog::body::Logged::new(b, move |sent| {
            let mut r = log.rec.lock().unwrap_or_else(|e| e.into_inner());
            r.bytes_sent = sent;
            r.bytes_received = log.received.load(Ordering::Relaxed);
            r.duration = log.started.elapsed();
            accesslog::log_all(&conn.manager.access_log, &r, &conn.dp.stats);
        })
        .boxed()
    })
}

/// What every request of one downstream connection shares, resolved when it was accepted.
struct Served {
    conn: Arc<HttpConn>,
    /// `http.<stat_prefix>.*` of the connection manager.
    hs: Arc<HttpStats>,
    filters: filters::Filters,
    state: Arc<limits::ConnState>,
    /// The `server` header responses get, and whether only when they have none.
    server: Option<(HeaderValue, bool)>,
}

/// `server_header_transformation` as a ready value: `(value, only_if_absent)`, or `None` for
/// PASS_THROUGH (or a name that is no header value).
fn server_header(h: &crate::model::listener::ServerHeader) -> Option<(HeaderValue, bool)> {
    use crate::model::listener::ServerHeader;
    let (name, only_if_absent) = match h {
        ServerHeader::Overwrite(n) => (n, false),
        ServerHeader::AppendIfAbsent(n) => (n, true),
        ServerHeader::PassThrough => return None,
    };
    HeaderValue::from_str(name)
        .ok()
        .map(|v| (v, only_if_absent))
}

async fn handle(s: &Served, req: Request<Incoming>) -> Response<Body> {
    let (conn, hs, filters) = (&*s.conn, &s.hs, &s.filters);
    hs.downstream_rq_total.inc();
    let down_version = req.version();
    let istio = conn
        .manager
        .istio_stats
        .as_ref()
        .map(|cfg| (cfg, IstioRequest::of(&req)));
    let log = conn
        .log_base
        .as_deref()
        .map(|b| Arc::new(StreamLog::new(b)));
    if let Some(l) = &log {
        l.note(|r| r.protocol = Some(protocol_name(down_version)));
    }
    // Written here if the request is dropped before it is answered (the client went away).
    let mut pending = Pending {
        log: log.clone(),
        conn,
    };
    // Timed here rather than through a wrapping future: the request's future is large, and
    // each wrapper moves it once more.
    let rq_started = Instant::now();
    let mut resp = route_request(conn, hs, filters, req, log.as_deref(), rq_started).await;
    hs.downstream_rq_time.record_duration(rq_started.elapsed());
    hs.status(resp.status().as_u16());
    hs.downstream_rq_completed.inc();
    if let Some((cfg, r)) = istio {
        r.record(conn, cfg, &resp);
    }
    *resp.version_mut() = down_version;
    if let Some((v, only_if_absent)) = &s.server
        && !(*only_if_absent && resp.headers().contains_key(header::SERVER))
    {
        resp.headers_mut().insert(header::SERVER, v.clone());
    }
    if let Some(log) = log {
        log.note(|r| {
            r.response_code = resp.status().as_u16();
            r.response_headers = Some(resp.headers().clone());
            if r.response_code_details.is_none() && resp.extensions().get::<LocalReply>().is_none()
            {
                r.response_code_details = Some("via_upstream".into());
            }
        });
        resp.extensions_mut().insert(log);
    }
    pending.log = None;
    resp
}

/// A request's record not handed to a response yet: when the request is dropped unanswered
/// (hyper drops the handler when the client disconnects), Envoy's line for it is written:
/// response code 0, `DC`, `downstream_remote_disconnect`.
struct Pending<'a> {
    log: Option<Arc<StreamLog>>,
    conn: &'a HttpConn,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some(log) = self.log.take() else {
            return;
        };
        let mut r = log.rec.lock().unwrap_or_else(|e| e.into_inner());
        r.response_flags = vec!["DC"];
        r.response_code = 0;
        r.response_code_details = Some("downstream_remote_disconnect".into());
        r.bytes_received = log.received.load(Ordering::Relaxed);
        r.duration = log.started.elapsed();
        accesslog::log_all(&self.conn.manager.access_log, &r, &self.conn.dp.stats);
    }
}

/// The route configuration this connection manager uses now.
fn route_config(conn: &HttpConn, snap: &Snapshot) -> Option<Arc<RouteConfig>> {
    if let Some(rc) = &conn.manager.inline_route_config {
        return Some(rc.clone());
    }
    conn.manager
        .rds_route_config_name
        .as_ref()
        .and_then(|n| snap.routes.get(n))
        .cloned()
}

/// Everything one request's handling reads besides the request itself.
struct Ctx<'a> {
    conn: &'a HttpConn,
    /// `http.<stat_prefix>.*` of the connection manager.
    hs: &'a Arc<HttpStats>,
    snap: &'a Snapshot,
    rc: &'a RouteConfig,
    vh: &'a VirtualHost,
    route: &'a Route,
    vars: headers::Vars<'a>,
    /// When the request arrived (`request_timeout` runs from here).
    started: Instant,
    /// The request's access-log record, when the connection manager logs.
    log: Option<&'a StreamLog>,
}

impl Ctx<'_> {
    /// Response header changes: route, then virtual host, then route configuration.
    fn response_headers(&self, h: &mut HeaderMap, upstream: Option<SocketAddr>) {
        let vars = headers::Vars {
            upstream,
            ..self.vars
        };
        for ops in [&self.route.headers, &self.vh.headers, &self.rc.headers] {
            headers::apply(h, &ops.response_remove, &ops.response_add, &vars);
        }
    }

    /// Request header changes: route, then virtual host, then route configuration.
    fn request_headers(&self, h: &mut HeaderMap) {
        for ops in [&self.route.headers, &self.vh.headers, &self.rc.headers] {
            headers::apply(h, &ops.request_remove, &ops.request_add, &self.vars);
        }
    }
}

async fn route_request(
    conn: &HttpConn,
    hs: &Arc<HttpStats>,
    filters: &filters::Filters,
    mut req: Request<Incoming>,
    log: Option<&StreamLog>,
    started: Instant,
) -> Response<Body> {
    let snap = conn.dp.store.load();
    // The trusted client address, from x-forwarded-for as received (before it is appended to).
    let remote = (!filters.is_empty()).then(|| {
        let xff = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        crate::rbac::downstream_remote(
            conn.client.ip(),
            xff,
            conn.manager.use_remote_address,
            conn.manager.xff_num_trusted_hops,
        )
    });
    headers::forwarded(
        req.headers_mut(),
        conn.manager.use_remote_address,
        conn.client,
        conn.tls,
    );
    headers::forward_client_cert(
        req.headers_mut(),
        conn.manager.forward_client_cert,
        conn.peer.is_some(),
        conn.client_cert.as_deref(),
    );
    let host_src = RequestHost::of(&req);
    let host = host_src.as_str();
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let path = pq.as_str();
    if let Some(l) = log {
        l.note(|r| {
            r.request = Some(accesslog::RequestHead {
                method: req.method().as_str().to_string(),
                path: path.to_string(),
                authority: host.to_string(),
                scheme: if conn.tls { "https" } else { "http" },
                headers: req.headers().clone(),
            });
        });
    }
    let rc = route_config(conn, &snap);
    let facts = route::RequestFacts {
        host,
        method: req.method(),
        path,
        headers: req.headers(),
    };
    let vh = rc
        .as_deref()
        .and_then(|rc| route::select_virtual_host(rc, host));
    let chosen = vh.and_then(|vh| route::select_route(vh, &facts));
    // The HTTP filters run before the router, whether or not a route matched.
    if let Some(remote) = remote {
        let freq = filters::Request {
            client: conn.client,
            local: conn.local,
            peer: conn.peer.as_deref(),
            remote,
            method: req.method(),
            path,
            authority: host,
            scheme: req.uri().scheme_str().unwrap_or("http"),
            headers: req.headers(),
        };
        let routed = rc.as_deref().zip(vh).map(|(rc, vh)| filters::Routed {
            rc,
            vh,
            route: chosen,
        });
        if let Some(stop) = filters.decode(&freq, routed) {
            let filters::Stop::RbacDenied { detail } = &stop;
            note(log, &[], detail);
            return filter_reply(stop);
        }
    }
    let (Some(rc), Some(vh), Some(chosen)) = (rc.as_deref(), vh, chosen) else {
        note(log, &["NR"], "route_not_found");
        return no_route(hs, host, path);
    };
    if let Some(l) = log
        && !chosen.name.is_empty()
    {
        l.note(|r| r.route_name = Some(chosen.name.clone()));
    }
    debug!(virtual_host = %vh.name, route = %chosen.name, %path, "routed");
    let ctx = Ctx {
        started,
        conn,
        hs,
        snap: &snap,
        rc,
        vh,
        route: chosen,
        vars: headers::Vars {
            remote: conn.client,
            local: conn.orig_dst.map(|o| o.get()),
            protocol: protocol_name(req.version()),
            upstream: None,
        },
        log,
    };
    // The fault filter runs before the router (issue 14).
    if !conn.manager.faults.is_empty()
        && let Some(mut r) = Box::pin(fault::inject(
            &conn.dp.stats,
            &conn.manager.stat_prefix,
            &conn.manager.faults,
            vh,
            chosen,
            &facts,
        ))
        .await
    {
        ctx.response_headers(r.headers_mut(), None);
        return r;
    }
    match &chosen.action {
        RouteAction::Direct { status, body } => {
            ctx.hs.rq_direct_response.inc();
            note(log, &[], "direct_response");
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let mut r = local_reply(status, body.as_deref().unwrap_or(""));
            ctx.response_headers(r.headers_mut(), None);
            r
        }
        RouteAction::Redirect(rd) => {
            ctx.hs.rq_redirect.inc();
            let scheme = req
                .headers()
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("http");
            let location = redirect_location(rd, chosen, host, path, scheme);
            let mut r = local_reply(
                StatusCode::from_u16(rd.status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                "",
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            ctx.response_headers(r.headers_mut(), None);
            r
        }
        RouteAction::Unsupported(what) => {
            debug!(action = %what, "route action not supported");
            local_reply(StatusCode::NOT_IMPLEMENTED, "")
        }
        RouteAction::Forward(f) => {
            let mut picked = None;
            let mut r = forward(&ctx, f, req, &host_src, &pq, &mut picked).await;
            if let Some((cluster, service)) = picked {
                r.extensions_mut().insert(UpstreamCluster(cluster, service));
            }
            // Envoy applies the route's response header changes to its local replies too
            // (503 NC/UH/UF, 504); upstream responses already got them in `forward`.
            if r.extensions().get::<LocalReply>().is_some() {
                ctx.response_headers(r.headers_mut(), None);
            }
            r
        }
    }
}

/// The local reply of a filter that stopped the request.
fn filter_reply(stop: filters::Stop) -> Response<Body> {
    match stop {
        filters::Stop::RbacDenied { detail } => {
            debug!(response_code_details = %detail, "rbac denied");
            local_reply(
                StatusCode::from_u16(crate::rbac::DENIED_STATUS).unwrap_or(StatusCode::FORBIDDEN),
                crate::rbac::DENIED_BODY,
            )
        }
    }
}

fn no_route(hs: &HttpStats, host: &str, path: &str) -> Response<Body> {
    hs.no_route.inc();
    debug!(%host, %path, flags = "NR", "no route");
    local_reply(StatusCode::NOT_FOUND, "")
}

/// Length of the path the route matched (what `prefix_rewrite` replaces): the prefix for
/// prefix matches, the whole path (without the query) otherwise.
fn matched_len(route: &Route, path: &str) -> usize {
    match &route.matcher.path {
        PathMatch::Prefix(p) | PathMatch::PathSeparatedPrefix(p) => p.len().min(path.len()),
        _ => path.find(['?', '#']).unwrap_or(path.len()),
    }
}

/// The path sent upstream: `prefix_rewrite` replaces what the route matched.
pub fn rewrite_path(route: &Route, rewrite: Option<&str>, path: &str) -> String {
    let Some(new) = rewrite else {
        return path.to_string();
    };
    format!("{new}{}", &path[matched_len(route, path)..])
}

/// `regex_rewrite`: every match in the path (not the query) is replaced.
pub fn regex_rewrite(re: &regex_lite::Regex, substitution: &str, path: &str) -> String {
    let end = path.find('?').unwrap_or(path.len());
    let (p, q) = path.split_at(end);
    format!("{}{q}", re.replace_all(p, substitution))
}

/// `Location` of a redirect, built the way Envoy's router does.
pub fn redirect_location(
    rd: &Redirect,
    route: &Route,
    host: &str,
    path: &str,
    scheme: &str,
) -> String {
    let new_scheme = rd.scheme.as_deref().unwrap_or(scheme);
    let mut final_host = rd.host.clone().unwrap_or_else(|| host.to_string());
    if let Some(p) = rd.port {
        final_host = format!("{}:{p}", route::strip_port(&final_host));
    } else if rd.scheme.is_some() {
        // A scheme change drops a port that is the default of either scheme.
        let bare = route::strip_port(&final_host);
        if final_host.len() > bare.len() {
            let port = &final_host[bare.len() + 1..];
            if (port == "80" || port == "443") && new_scheme != scheme {
                final_host = bare.to_string();
            }
        }
    }
    let query_at = path.find('?');
    let new_path = match &rd.path {
        Some(PathRedirect::Path(p)) if p.contains('?') => p.clone(),
        Some(PathRedirect::Path(p)) => format!("{p}{}", query_at.map_or("", |i| &path[i..])),
        Some(PathRedirect::Prefix(p)) => rewrite_path(route, Some(p), path),
        None => path.to_string(),
    };
    let new_path = if rd.strip_query {
        new_path
            .split_once('?')
            .map_or(new_path.clone(), |(p, _)| p.to_string())
    } else {
        new_path
    };
    format!("{new_scheme}://{final_host}{new_path}")
}

static WEIGHTED: AtomicUsize = AtomicUsize::new(0);

const EXPECTED_RQ_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
const UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");

/// The number of request headers hyper's HTTP/1 server accepts when not told otherwise.
const HYPER_MAX_HEADERS: usize = 100;

/// A duration as a header value in whole milliseconds (no string built on the way).
fn millis(d: Duration) -> HeaderValue {
    /// Below this many milliseconds a value comes from the thread's table.
    const SMALL: u64 = 512;
    thread_local! {
        static SMALL_VALUES: Vec<HeaderValue> = (0..SMALL).map(HeaderValue::from).collect();
        static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    // A proxied request writes one or two of these (the upstream's service time, the route's
    // timeout). Formatting one allocates twice; a kept value is cloned with a reference count:
    // the small ones from a table, a larger one (a route's timeout) if it repeats the last.
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < SMALL {
        return SMALL_VALUES.with(|t| t[ms as usize].clone());
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((m, v)) if *m == ms => v.clone(),
            _ => {
                let v = HeaderValue::from(ms);
                *last = Some((ms, v.clone()));
                v
            }
        }
    })
}

/// An upstream host chosen for one attempt: its address, for balanced clusters the host whose
/// request count and outlier detection the attempt feeds, and for DNS clusters the host name
/// (what `auto_host_rewrite` puts in Host).
enum Dest {
    Host(SocketAddr, Option<Arc<lb::Host>>, Option<String>),
    NoHealthy,
}

/// Choose a host for one attempt. With `previous_hosts`, a host in `exclude` is re-picked up to
/// `max_attempts` times (Envoy's `host_selection_retry_max_attempts`); when every pick was
/// excluded the last one is used (`lb::choose`).
async fn choose_host(conn: &HttpConn, entry: &ClusterEntry, req: &lb::LbRequest<'_>) -> Dest {
    match &entry.cluster.kind {
        ClusterKind::OriginalDst => conn
            .orig_dst
            .map_or(Dest::NoHealthy, |o| Dest::Host(o.get(), None, None)),
        ClusterKind::Dns { hosts } => {
            let Some(i) = lb::next_index(&entry.rr, hosts.len()) else {
                return Dest::NoHealthy;
            };
            let (h, p) = &hosts[i];
            // Boxed: the resolver's state would otherwise sit in every request's future.
            match Box::pin(tokio::net::lookup_host((h.as_str(), *p))).await {
                Ok(mut a) => a
                    .next()
                    .map_or(Dest::NoHealthy, |a| Dest::Host(a, None, Some(h.clone()))),
                Err(_) => Dest::NoHealthy,
            }
        }
        ClusterKind::Static(_) | ClusterKind::Eds { .. } => match lb::choose(&entry.lb, req) {
            Some(h) => Dest::Host(h.address(), Some(h), None),
            None => Dest::NoHealthy,
        },
    }
}

/// The route's `hash_policy` over this request, combined as Envoy does (rotate left by one,
/// xor the next); a `terminal` policy that produced a hash ends the walk.
fn request_hash(
    policies: &[crate::model::route::HashPolicy],
    h: &HeaderMap,
    path: &str,
    client: SocketAddr,
) -> Option<u64> {
    use crate::model::route::HashKind;
    let mut hash: Option<u64> = None;
    for p in policies {
        let part = match &p.kind {
            HashKind::Header(name) => h.get(name.as_str()).map(|v| lb::hash_bytes(v.as_bytes())),
            HashKind::Cookie(name) => h
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| lb::hash_bytes(v.as_bytes())),
            HashKind::SourceIp => Some(lb::hash_bytes(
                crate::model::canonical_ip(client.ip())
                    .to_string()
                    .as_bytes(),
            )),
            HashKind::QueryParameter(name) => {
                route::query_value(path, name).map(|v| lb::hash_bytes(v.as_bytes()))
            }
            HashKind::Unsupported => None,
        };
        if let Some(v) = part {
            hash = Some(hash.map_or(v, |h| h.rotate_left(1) ^ v));
            if p.terminal {
                break;
            }
        }
    }
    hash
}

/// The cluster a forwarding route names for this request, or `None` (503 `NC`).
fn target_cluster<'a>(f: &'a Forward, h: &HeaderMap) -> Option<Cow<'a, str>> {
    match &f.target {
        Target::Clusters(ClusterSpecifier::Cluster(c)) => Some(Cow::Borrowed(c)),
        Target::Clusters(ClusterSpecifier::Weighted(w)) => {
            lb::pick_weighted(w, &WEIGHTED).map(Cow::Borrowed)
        }
        Target::Header(name) => h
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(|v| Cow::Owned(v.to_string())),
    }
}

/// How the last attempt ended when no response is forwarded, with Envoy's `transport failure
/// reason` when the connection failed in its TLS handshake.
fn transport_failure_reply(
    outcome: Attempt,
    retried: bool,
    transport: Option<&str>,
) -> Response<Body> {
    match (outcome, transport) {
        (Attempt::ConnectFailure, Some(reason)) => {
            let lead = if retried {
                "retried and the latest reset reason"
            } else {
                "reset reason"
            };
            local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "{UPSTREAM_RESET}. {lead}: connection failure, transport failure reason: {reason}"
                ),
            )
        }
        _ => failure_reply(outcome, retried),
    }
}

/// How the last attempt ended when no response is forwarded.
fn failure_reply(outcome: Attempt, retried: bool) -> Response<Body> {
    let lead = if retried {
        "retried and the latest reset reason"
    } else {
        "reset reason"
    };
    match outcome {
        Attempt::PerTryTimeout => local_reply(StatusCode::GATEWAY_TIMEOUT, UPSTREAM_TIMEOUT),
        Attempt::ConnectFailure => local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{UPSTREAM_RESET}. {lead}: remote connection failure"),
        ),
        Attempt::Reset {
            refused_stream: true,
        } => local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{UPSTREAM_RESET}. {lead}: remote refused stream reset"),
        ),
        Attempt::Reset { .. } | Attempt::Response { .. } => local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{UPSTREAM_RESET}. {lead}: connection termination"),
        ),
    }
}

/// Upstream protocol for this request, from the cluster's `HttpProtocolOptions`.
fn upstream_proto(entry: &ClusterEntry, downstream: Version) -> Proto {
    use crate::model::upstream_http::UpstreamProtocol as P;
    match entry.cluster.upstream_http.protocol {
        P::Http2 => Proto::Http2,
        P::UseDownstream { http2: true } if downstream == Version::HTTP_2 => Proto::Http2,
        P::Http1 | P::UseDownstream { .. } => Proto::Http1,
        P::Auto => Proto::Auto,
    }
}

/// The upgrade an HTTP/1.1 request asks for (`Connection: upgrade` + `Upgrade: <type>`),
/// lowercase.
fn upgrade_type(req: &Request<Incoming>) -> Option<String> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let h = req.headers();
    let asks = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let ty = h
        .get(header::UPGRADE)?
        .to_str()
        .ok()?
        .split(',')
        .next()?
        .trim();
    (asks && !ty.is_empty()).then(|| ty.to_ascii_lowercase())
}

/// Envoy's rule: the type must be in the connection manager's `upgrade_configs`; a route's own
/// entry for the type decides, else the connection manager's `enabled`.
fn upgrade_allowed(hcm: &[(String, bool)], route: &[(String, bool)], ty: &str) -> bool {
    let Some((_, hcm_enabled)) = hcm.iter().find(|(t, _)| t == ty) else {
        return false;
    };
    route
        .iter()
        .find(|(t, _)| t == ty)
        .map_or(*hcm_enabled, |(_, e)| *e)
}

async fn forward(
    ctx: &Ctx<'_>,
    f: &Forward,
    mut req: Request<Incoming>,
    host_src: &RequestHost,
    pq: &PathAndQuery,
    picked: &mut Option<(String, Option<Arc<crate::model::istio::IstioService>>)>,
) -> Response<Body> {
    let conn = ctx.conn;
    let (host, path) = (host_src.as_str(), pq.as_str());
    // Only Istio's metrics read which cluster answered.
    let istio = conn.manager.istio_stats.is_some();
    let upgrade = upgrade_type(&req);
    if let Some(ty) = &upgrade
        && !upgrade_allowed(&conn.manager.upgrades, &f.upgrades, ty)
    {
        ctx.hs.downstream_rq_ws_on_non_ws_route.inc();
        debug!(upgrade = %ty, "upgrade not enabled for this route");
        return local_reply(StatusCode::FORBIDDEN, "");
    }
    // Taken before the request is split: resolves once hyper hands over the raw connection.
    let down_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let Some(cluster) = target_cluster(f, req.headers()) else {
        note(ctx.log, &["NC"], "cluster_not_found");
        ctx.hs.no_cluster.inc();
        debug!(flags = "NC", "no cluster for the route");
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "");
    };
    if istio {
        *picked = Some((cluster.to_string(), None));
    }
    if let Some(l) = ctx.log {
        l.note(|r| r.upstream_cluster = Some(cluster.to_string()));
    }
    let Some(entry) = ctx.snap.cluster(&cluster).map(|e| &**e) else {
        note(ctx.log, &["NC"], "cluster_not_found");
        ctx.hs.no_cluster.inc();
        debug!(%cluster, flags = "NC", "unknown cluster");
        return local_reply(StatusCode::SERVICE_UNAVAILABLE, "");
    };
    if istio {
        *picked = Some((cluster.to_string(), entry.cluster.istio_service.clone()));
    }
    let cs = &entry.stats;
    // Internal requests (a sidecar's, without `use_remote_address`) may adjust retries and
    // timeouts with Envoy's `x-envoy-*` request headers, which the router then consumes.
    let configured = f.retry_policy.as_deref().or(ctx.vh.retry_policy.as_deref());
    // Istio sets `max_grpc_timeout: 0s`: a gRPC request's own `grpc-timeout` then replaces the
    // route timeout (and `x-envoy-upstream-rq-timeout-ms` still overrides both, as in Envoy).
    let route_timeout = f
        .grpc_timeout_max
        .and_then(|max| retry::grpc_timeout(req.headers(), max))
        .unwrap_or(f.timeout);
    // One pass over the names tells whether there is any such header to honour and remove.
    let envoy_headers = !conn.manager.use_remote_address && retry::has_envoy_headers(req.headers());
    let (policy, timeout, header_per_try) = if !envoy_headers {
        (configured.map(Cow::Borrowed), route_timeout, None)
    } else {
        let h = req.headers();
        (
            retry::effective_policy(configured, h).map(Cow::Owned),
            retry::timeout_header(h, "x-envoy-upstream-rq-timeout-ms").unwrap_or(route_timeout),
            retry::timeout_header(h, "x-envoy-upstream-rq-per-try-timeout-ms").flatten(),
        )
    };
    // `retriable_request_headers`: only matching requests are retried.
    let facts = route::RequestFacts {
        host,
        method: req.method(),
        path,
        headers: req.headers(),
    };
    // Request stats count in the cluster and, when the virtual host defines virtual clusters
    // (Envoy keeps no vhost stats otherwise), in the matching one or `other`.
    let vcluster = (!ctx.vh.virtual_clusters.is_empty()).then(|| {
        ctx.snap
            .vcluster_stats(&ctx.vh.name, route::virtual_cluster(ctx.vh, &facts))
    });
    let rq = |pick: fn(&RqStats) -> &ScopedCounter| {
        pick(&cs.rq).inc();
        if let Some(v) = &vcluster {
            pick(&v.rq).inc();
        }
    };
    let rq_status = |code: u16| {
        cs.rq.status(code);
        if let Some(v) = &vcluster {
            v.rq.status(code);
        }
    };
    let policy: Option<Cow<'_, RetryPolicy>> = policy.filter(|p| {
        p.num_retries > 0
            && (p.retriable_request_headers.is_empty()
                || route::any_request_header_matches(&p.retriable_request_headers, &facts))
    });
    let down_version = req.version();
    let proto = upstream_proto(entry, down_version);
    // `priority: HIGH` routes count against the cluster's HIGH thresholds.
    let priority = if f.high_priority {
        lb::RoutingPriority::High
    } else {
        lb::RoutingPriority::Default
    };

    // The request as every attempt sends it.
    let (parts, incoming) = req.into_parts();
    // The path sent upstream when it differs from the request's (a rewrite, or a target that
    // is not origin-form); `None`: the request's own path and query, shared, not copied.
    let rewritten = match (&f.regex_rewrite, &f.prefix_rewrite) {
        (Some((re, sub)), _) => Some(regex_rewrite(&re.0, sub, path)),
        (None, Some(p)) => Some(rewrite_path(ctx.route, Some(p), path)),
        (None, None) => (!path.starts_with('/')).then(|| path.to_string()),
    }
    .map(|mut p| {
        if !p.starts_with('/') {
            p.insert(0, '/');
        }
        p
    });
    let new_path = rewritten.as_deref().unwrap_or(path);
    let mut base = parts.headers;
    headers::strip_hop_by_hop(&mut base);
    if envoy_headers {
        for h in retry::CONSUMED {
            base.remove(h);
        }
    }
    base.remove(header::HOST);
    // Envoy's router records the path before a rewrite.
    if (f.prefix_rewrite.is_some() || f.regex_rewrite.is_some())
        && let Ok(v) = HeaderValue::from_str(path)
    {
        if let Some(l) = ctx.log {
            l.note(|r| {
                if let Some(rq) = &mut r.request {
                    rq.headers
                        .insert(HeaderName::from_static("x-envoy-original-path"), v.clone());
                }
            });
        }
        base.insert(HeaderName::from_static("x-envoy-original-path"), v);
    }
    ctx.request_headers(&mut base);
    let per_try = header_per_try.or(policy.as_ref().and_then(|p| p.per_try_timeout));
    if let Some(t) = per_try.or(timeout) {
        base.insert(EXPECTED_RQ_TIMEOUT, millis(t));
    }
    let up_host: &str = match &f.host_rewrite {
        Some(crate::model::route::HostRewrite::Literal(h)) => h,
        _ => host,
    };
    // The Host header every attempt sends unless a DNS name replaces it: the request's own
    // value when it is kept.
    let up_host_value = match &f.host_rewrite {
        Some(crate::model::route::HostRewrite::Literal(h)) => HeaderValue::from_str(h).ok(),
        _ => host_src.header_value(),
    };
    let auto_host = matches!(f.host_rewrite, Some(crate::model::route::HostRewrite::Auto));
    if let (Some(ty), Some(down)) = (&upgrade, down_upgrade) {
        // Upgrades are tunnels: one attempt on a fresh connection, no retries (as in Envoy).
        let up = Upgrade {
            ty,
            method: parts.method,
            path: new_path,
            host: up_host,
            headers: base,
            body: incoming,
            down,
        };
        // Boxed: a rare path whose state would otherwise enlarge every request's future.
        return Box::pin(forward_upgrade(ctx, &cluster, entry, priority, up)).await;
    }

    // Until the response starts, the stream's idle timer (the route's `idle_timeout`, else
    // the HCM's `stream_idle_timeout`) and `request_timeout` watch the request body.
    let lim = &conn.manager.limits;
    let stream_idle = f.idle_timeout.or(lim.stream_idle_timeout);
    let act = Arc::new(limits::StreamActivity::default());
    let incoming: Body = if hyper::body::Body::is_end_stream(&incoming) {
        // No body: nothing to watch or count, and an empty body allocates nothing.
        act.mark_complete();
        http_body_util::Empty::new().map_err(|e| match e {}).boxed()
    } else {
        let watched =
            limits::Watched::new(incoming.map_err(BoxError::from).boxed(), act.clone()).boxed();
        match ctx.log {
            Some(l) => accesslog::body::Counted::new(watched, l.received.clone()).boxed(),
            None => watched,
        }
    };
    // With a retry policy a body streams upstream through a tee that keeps a copy for replay
    // (up to the listener's buffer limit, 1 MiB by default, grown only as the body arrives);
    // without one it streams once and nothing is kept.
    let mut req_body =
        body::RequestBody::new(incoming, policy.is_some(), lim.buffer_limit as usize);

    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    let request_deadline = lim.request_timeout.map(|t| ctx.started + t);
    let max_host_attempts = policy
        .as_ref()
        .filter(|p| p.previous_hosts)
        .map_or(1, |p| p.host_selection_max_attempts);
    let hash = request_hash(&f.hash_policy, &base, path, conn.client);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0u32;
    // The first attempt starts with the request (a microsecond later): one clock read less.
    let mut first_attempt_at = Some(started);
    // Envoy's `max_requests` breaker: this request holds a slot until it is answered.
    let Ok(_request_slot) = entry.try_request(priority) else {
        note(
            ctx.log,
            &["UO"],
            "upstream_reset_before_response_started{overflow}",
        );
        debug!(%cluster, flags = "UO", "request circuit breaker open");
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{UPSTREAM_RESET}. reset reason: overflow"),
        );
    };
    // Held while a retry runs: Envoy's `max_retries` breaker counts retries in flight.
    let mut _retry_slot = None;
    loop {
        // Why this attempt's TLS handshake failed, for the local reply (Envoy's `transport
        // failure reason`).
        let mut transport_failure: Option<String> = None;
        // Envoy's reason for a failed connect (`delayed_connect_error:_Connection_refused`).
        let mut connect_failure: Option<String> = None;
        let attempt_no = retries + 1;
        let exclude: &[SocketAddr] = if policy.as_ref().is_some_and(|p| p.previous_hosts) {
            &tried
        } else {
            &[]
        };
        let pick = lb::LbRequest {
            hash,
            exclude,
            max_attempts: max_host_attempts,
        };
        let (addr, host, dns_name) = match choose_host(conn, entry, &pick).await {
            Dest::Host(a, h, n) => {
                if let Some(l) = ctx.log {
                    l.note(|r| r.upstream_host = Some(a));
                }
                (a, h, n)
            }
            Dest::NoHealthy => {
                note(ctx.log, &["UH"], "no_healthy_upstream");
                cs.upstream_cx_none_healthy.inc();
                debug!(%cluster, flags = "UH", "no healthy upstream");
                return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            }
        };
        let Some(body) = req_body.attempt() else {
            // A streamed body was already sent: no further attempt is possible (guarded below).
            break failure_reply(
                Attempt::Reset {
                    refused_stream: false,
                },
                true,
            );
        };
        // Without a retry policy there is one attempt: it takes the headers, no copy.
        let mut headers = if policy.is_some() {
            base.clone()
        } else {
            std::mem::take(&mut base)
        };
        // A retry has only what is left of the route timeout (Envoy tells the upstream so).
        if retries > 0
            && let Some(d) = deadline
        {
            let left = d.saturating_duration_since(Instant::now());
            let expect = per_try.map_or(left, |p| p.min(left));
            headers.insert(EXPECTED_RQ_TIMEOUT, millis(expect));
        }
        if ctx.vh.include_request_attempt_count {
            headers.insert(ATTEMPT_COUNT, HeaderValue::from(attempt_no));
        }
        // Envoy rewrites Host only to a host name it knows: DNS clusters' (skiff's endpoints
        // carry no EDS `hostname`), so other clusters keep the request's Host.
        let dns_host = dns_name.filter(|_| auto_host);
        let authority = dns_host.as_deref().unwrap_or(up_host);
        // An auto_config request starts as HTTP/1.1; the pool fits it to its connection.
        let uri = match (proto, &rewritten) {
            (Proto::Http1 | Proto::Auto, None) => Ok(Uri::from(pq.clone())),
            (Proto::Http1 | Proto::Auto, Some(p)) => p.parse::<Uri>(),
            (Proto::Http2, _) => format!("http://{authority}{new_path}").parse::<Uri>(),
        }
        .unwrap_or_else(|_| Uri::from_static("/"));
        if proto != Proto::Http2 {
            let v = match &dns_host {
                Some(name) => HeaderValue::from_str(name).ok(),
                None => up_host_value.clone(),
            };
            if let Some(v) = v {
                headers.insert(header::HOST, v);
            }
        }
        let mut up_req = Request::new(body);
        *up_req.method_mut() = parts.method.clone();
        *up_req.uri_mut() = uri;
        *up_req.version_mut() = match proto {
            Proto::Http1 | Proto::Auto => Version::HTTP_11,
            Proto::Http2 => Version::HTTP_2,
        };
        *up_req.headers_mut() = headers;

        rq(|r| &r.upstream_rq_total);
        // This attempt's time limit: the per-try timeout, within what is left of the route's.
        let now = first_attempt_at.take().unwrap_or_else(Instant::now);
        let limit = match (per_try, deadline) {
            (Some(p), Some(d)) => Some((now + p).min(d)),
            (Some(p), None) => Some(now + p),
            (None, d) => d,
        };
        let in_flight = host.as_ref().map(|h| h.start_request());
        // TLS origination when the cluster dials this endpoint with TLS: pooled apart from
        // plaintext connections, keyed by the configuration (a rotated certificate starts
        // new connections).
        let dial = match upstream_tls::http_endpoint_tls(entry, addr) {
            None => Ok(None),
            Some(t) => upstream_tls::client_config(
                &conn.dp.tls,
                &conn.dp.stats,
                &cluster,
                t,
                &ctx.snap.secrets,
                addr,
            )
            .map(|c| {
                Some(upstream_tls::TlsDial::new(
                    c,
                    conn.dp.stats.clone(),
                    &cluster,
                    entry.cluster.connect_timeout,
                ))
            }),
        };
        // One future for the whole exchange, timed inside, and built where it is awaited (a
        // closure makes it there): every wrapper around the pool's future would move it once
        // more, and a future captured by another, or named and then moved, is held twice in
        // the request's state, which is copied whole as it moves.
        let send_started = now;
        let dial = &dial;
        let timed = move || async move {
            let sent = match dial {
                Ok(dial) => {
                    let target = pool::Target {
                        entry,
                        priority,
                        mark: conn.dp.upstream_mark,
                        transport: dial.as_ref().map(|d| d as &dyn pool::Transport),
                        upstream_local: ctx.log.is_some(),
                        now: send_started,
                    };
                    let send = move || conn.dp.http_pool.send(addr, proto, target, up_req);
                    match limit {
                        Some(l) => tokio::time::timeout_at(l, send()).await.ok()?,
                        None => send().await,
                    }
                }
                // The context cannot be built (a secret not delivered yet): no connection.
                Err(e) => pool::Sent {
                    result: Err(SendError::Transport {
                        addr,
                        source: e.to_string().into(),
                    }),
                    new_connection: false,
                },
            };
            if sent.result.is_ok() {
                cs.upstream_rq_time.record_duration(send_started.elapsed());
            }
            Some(sent)
        };
        // The watchdog over the request's arrival matters only while it can fire before the
        // response: not once the request arrived whole and the route's deadline comes before
        // the stream idle timeout could (the usual request saves a timer).
        let watch = !(act.is_complete()
            && stream_idle.is_none_or(|i| deadline.is_some_and(|d| d < now + i)));
        let sent = if watch {
            tokio::select! {
                biased;
                s = timed() => s,
                cut = Gated::new(limits::watch_stream(&act, stream_idle, request_deadline)) => {
                    match cut {
                        limits::StreamCut::Idle => {
                            note(ctx.log, &["SI"], "stream_idle_timeout");
                            ctx.hs.downstream_rq_idle_timeout.inc()
                        }
                        limits::StreamCut::Request => {
                            note(ctx.log, &[], "request_overall_timeout");
                            ctx.hs.downstream_rq_timeout.inc()
                        }
                    }
                    debug!(%cluster, %addr, reason = cut.body(), "stream ended before the response");
                    return local_reply(StatusCode::REQUEST_TIMEOUT, cut.body());
                }
            }
        } else {
            timed().await
        };
        let (outcome, response) = match sent {
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                rq(|r| &r.upstream_rq_timeout);
                rq_status(504);
                note(ctx.log, &["UT"], "upstream_response_timeout");
                debug!(%cluster, %addr, flags = "UT", "upstream request timeout");
                return local_reply(StatusCode::GATEWAY_TIMEOUT, UPSTREAM_TIMEOUT);
            }
            None => {
                cs.upstream_rq_per_try_timeout.inc();
                debug!(%cluster, %addr, "per-try timeout");
                (Attempt::PerTryTimeout, None)
            }
            Some(s) => {
                if s.new_connection {
                    cs.upstream_cx_total.inc();
                }
                match s.result {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let header_match = policy.as_deref().is_some_and(|p| {
                            route::any_response_header_matches(
                                &p.retriable_headers,
                                status,
                                r.headers(),
                            )
                        });
                        let attempt = Attempt::Response {
                            status,
                            grpc_status: retry::grpc_status(r.headers()),
                            header_match,
                        };
                        (attempt, Some(r))
                    }
                    Err(SendError::Connect(e)) => {
                        connect_failure = Some(accesslog::connect_failure_reason(&e));
                        match e {
                            ConnectError::Timeout { .. } => cs.upstream_cx_connect_timeout.inc(),
                            _ => cs.upstream_cx_connect_fail.inc(),
                        }
                        debug!(error = %e, %cluster, flags = "UF", "upstream connect failed");
                        (Attempt::ConnectFailure, None)
                    }
                    Err(e @ SendError::Transport { .. }) => {
                        if let SendError::Transport { source, .. } = &e {
                            transport_failure = Some(source.to_string());
                        }
                        cs.upstream_cx_connect_fail.inc();
                        debug!(error = %e, %cluster, flags = "UF", "upstream transport handshake failed");
                        (Attempt::ConnectFailure, None)
                    }
                    Err(e @ SendError::Handshake { .. }) => {
                        cs.upstream_cx_connect_fail.inc();
                        debug!(error = %e, %cluster, flags = "UF", "upstream handshake failed");
                        (Attempt::ConnectFailure, None)
                    }
                    Err(SendError::Overflow(e)) => {
                        // `upstream_rq_pending_overflow` was counted by the breaker.
                        debug!(error = %e, %cluster, flags = "UO", "pending request overflow");
                        note(
                            ctx.log,
                            &["UO"],
                            "upstream_reset_before_response_started{overflow}",
                        );
                        if let Some(g) = in_flight {
                            drop(g);
                        }
                        return local_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!("{UPSTREAM_RESET}. reset reason: overflow"),
                        );
                    }
                    Err(e @ SendError::Reset { refused_stream, .. }) => {
                        debug!(error = %e, %cluster, flags = "UC", "upstream reset before headers");
                        (Attempt::Reset { refused_stream }, None)
                    }
                }
            }
        };
        if let Some(g) = in_flight {
            g.finish(match outcome {
                Attempt::Response { status, .. } => lb::Outcome::Status(status),
                Attempt::ConnectFailure => lb::Outcome::ConnectFailure,
                Attempt::Reset { .. } => lb::Outcome::Reset,
                Attempt::PerTryTimeout => lb::Outcome::Timeout,
            });
        }
        if let Some(r) = &response {
            rq_status(r.status().as_u16());
        }
        let wants_retry = policy
            .as_deref()
            .is_some_and(|p| retries < p.num_retries && retry::retriable(p, outcome));
        // Only asked when a retry is wanted, so the stat counts abandoned retries.
        let can_replay = wants_retry
            && match req_body.replayable() {
                Some(true) => true,
                Some(false) => {
                    cs.retry_or_shadow_abandoned.inc();
                    false
                }
                None => false,
            };
        let time_left = deadline.is_none_or(|d| Instant::now() < d);
        if wants_retry && can_replay && time_left {
            // `try_retry` counts `upstream_rq_retry_overflow` itself when the breaker is open.
            match entry.try_retry(priority) {
                Ok(g) => {
                    _retry_slot = Some(g);
                    retries += 1;
                    rq(|r| &r.upstream_rq_retry);
                    tried.push(addr);
                    drop(response);
                    let p = policy.as_deref().map_or_else(
                        || Duration::ZERO,
                        |p| retry::backoff(p, retries, headers::random_u64()),
                    );
                    let wake = Instant::now() + p;
                    let wake = deadline.map_or(wake, |d| wake.min(d));
                    debug!(%cluster, %addr, ?outcome, retry = retries, "retrying");
                    tokio::time::sleep_until(wake).await;
                    continue;
                }
                Err(e) => debug!(error = %e, "retry circuit breaker open"),
            }
        }
        let Some(resp) = response else {
            if let Some(l) = ctx.log {
                // Envoy adds URX when the policy would retry this outcome but the retries
                // are used up, before the outcome's own flag.
                let exhausted = policy
                    .as_deref()
                    .is_some_and(|p| retry::retriable(p, outcome));
                let reason = transport_failure.clone().or(connect_failure.clone());
                let (flag, what) = match outcome {
                    Attempt::ConnectFailure => ("UF", "remote_connection_failure"),
                    Attempt::PerTryTimeout => ("UT", "upstream_per_try_timeout"),
                    Attempt::Reset {
                        refused_stream: true,
                    } => ("UR", "remote_refused_stream_reset"),
                    Attempt::Reset { .. } | Attempt::Response { .. } => {
                        ("UC", "connection_termination")
                    }
                };
                let details = match &reason {
                    Some(why) => format!("upstream_reset_before_response_started{{{what}|{why}}}"),
                    None => format!("upstream_reset_before_response_started{{{what}}}"),
                };
                l.note(|r| {
                    r.response_flags = if exhausted {
                        vec!["URX", flag]
                    } else {
                        vec![flag]
                    };
                    r.response_code_details = Some(details);
                    r.upstream_transport_failure_reason = reason;
                });
            }
            let r = transport_failure_reply(outcome, retries > 0, transport_failure.as_deref());
            rq_status(r.status().as_u16());
            break r;
        };
        if retries > 0
            && !policy
                .as_deref()
                .is_some_and(|p| retry::retriable(p, outcome))
        {
            rq(|r| &r.upstream_rq_retry_success);
        }
        if let Some(l) = ctx.log {
            let local = resp.extensions().get::<pool::UpstreamLocal>().map(|u| u.0);
            l.note(|r| r.upstream_local = local);
        }
        let (mut rparts, rbody) = resp.into_parts();
        headers::strip_hop_by_hop(&mut rparts.headers);
        rparts
            .headers
            .insert(UPSTREAM_SERVICE_TIME, millis(started.elapsed()));
        if ctx.vh.include_attempt_count_in_response {
            rparts
                .headers
                .insert(ATTEMPT_COUNT, HeaderValue::from(attempt_no));
        }
        ctx.response_headers(&mut rparts.headers, Some(addr));
        // A small response usually arrives in the same read as its head: handed over whole,
        // hyper writes head and body downstream in one go, and no timer is left to run.
        let taken = body::take_if_complete(rbody);
        let body = if !taken.complete && (deadline.is_some() || stream_idle.is_some()) {
            Timed::new(taken.body, deadline, stream_idle)
                .on_idle(ctx.hs.clone())
                .boxed()
        } else {
            taken.body
        };
        break Response::from_parts(rparts, body);
    }
}

/// An upgrade request ready to go upstream.
struct Upgrade<'a> {
    ty: &'a str,
    method: hyper::Method,
    path: &'a str,
    host: &'a str,
    headers: HeaderMap,
    body: Incoming,
    down: hyper::upgrade::OnUpgrade,
}

/// Send an upgrade request over a new HTTP/1.1 connection; on `101 Switching Protocols` join
/// the two upgraded connections and copy bytes both ways until either side closes.
async fn forward_upgrade(
    ctx: &Ctx<'_>,
    cluster: &str,
    entry: &ClusterEntry,
    priority: lb::RoutingPriority,
    up: Upgrade<'_>,
) -> Response<Body> {
    let conn = ctx.conn;
    let cs = &entry.stats;
    // The tunnel is an upstream connection for its whole life: it holds a `max_connections`
    // slot (the overflow is counted by the breaker).
    let Ok(slot) = entry.try_connection(priority) else {
        debug!(%cluster, flags = "UO", "connection circuit breaker open");
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{UPSTREAM_RESET}. reset reason: overflow"),
        );
    };
    let (addr, host) = match choose_host(conn, entry, &lb::LbRequest::default()).await {
        Dest::Host(a, h, _) => (a, h),
        Dest::NoHealthy => {
            cs.upstream_cx_none_healthy.inc();
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        }
    };
    cs.rq.upstream_rq_total.inc();
    cs.upstream_cx_total.inc();
    let in_flight = host.as_ref().map(|h| h.start_request());
    let failed = |outcome| failure_reply(outcome, false);
    let stream = match cs
        .upstream_cx_connect_ms
        .time_ok(crate::net::connect(
            crate::addr::EndpointAddr(addr),
            conn.dp.upstream_mark,
            entry.cluster.connect_timeout,
        ))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            cs.upstream_cx_connect_fail.inc();
            debug!(error = %e, %cluster, flags = "UF", "upstream connect failed");
            if let Some(g) = in_flight {
                g.finish(lb::Outcome::ConnectFailure);
            }
            return failed(Attempt::ConnectFailure);
        }
    };
    // The tunnel's transport, as the pool's connections get theirs.
    let stream: Box<dyn pool::Stream> = match upstream_tls::endpoint_tls(entry, addr) {
        None => Box::new(stream),
        Some(t) => {
            let stats = &conn.dp.stats;
            let tls = upstream_tls::client_config(
                &conn.dp.tls,
                stats,
                cluster,
                t,
                &ctx.snap.secrets,
                addr,
            );
            let budget = entry.cluster.connect_timeout;
            let done = match tls {
                Ok(c) => upstream_tls::originate(stats, cluster, &c, stream, addr, budget).await,
                Err(e) => Err(e),
            };
            match done {
                Ok(o) => Box::new(o.stream),
                Err(e) => {
                    cs.upstream_cx_connect_fail.inc();
                    debug!(error = %e, %cluster, flags = "UF", "upstream TLS failed");
                    if let Some(g) = in_flight {
                        g.finish(lb::Outcome::ConnectFailure);
                    }
                    return failed(Attempt::ConnectFailure);
                }
            }
        }
    };
    let (mut tx, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, %cluster, "upstream handshake failed");
                return failed(Attempt::ConnectFailure);
            }
        };
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(error = %e, "upstream upgrade connection ended with error");
        }
    });
    let mut req = Request::new(up.body.map_err(BoxError::from).boxed());
    *req.method_mut() = up.method;
    *req.uri_mut() = up.path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    *req.headers_mut() = up.headers;
    let h = req.headers_mut();
    // The hop-by-hop headers that carry the upgrade itself go on.
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(up.ty) {
        h.insert(header::UPGRADE, v);
    }
    if let Ok(v) = HeaderValue::from_str(up.host) {
        h.insert(header::HOST, v);
    }
    let started = Instant::now();
    let mut resp = match tx.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, %cluster, flags = "UC", "upstream reset before headers");
            if let Some(g) = in_flight {
                g.finish(lb::Outcome::Reset);
            }
            return failed(Attempt::Reset {
                refused_stream: false,
            });
        }
    };
    let code = resp.status().as_u16();
    cs.rq.status(code);
    if let Some(g) = in_flight {
        g.finish(lb::Outcome::Status(code));
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let up_upgrade = hyper::upgrade::on(&mut resp);
        let down = up.down;
        ctx.hs.downstream_cx_upgrades_total.inc();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::try_join!(down, up_upgrade) {
                Ok((d, u)) => {
                    let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                        debug!(error = %e, "upgraded connection ended with error");
                    }
                }
                Err(e) => debug!(error = %e, "upgrade did not complete"),
            }
        });
    }
    let (mut parts, body) = resp.into_parts();
    if parts.status != StatusCode::SWITCHING_PROTOCOLS {
        headers::strip_hop_by_hop(&mut parts.headers);
    }
    if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
        parts
            .headers
            .insert(HeaderName::from_static("x-envoy-upstream-service-time"), v);
    }
    ctx.response_headers(&mut parts.headers, Some(addr));
    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
}

#[cfg(test)]
mod tests;
