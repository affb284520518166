//! HTTP routing on `http_connection_manager` filter chains (issue 7, first slice).
//!
//! A chain whose terminal filter is the HCM is served here instead of being proxied as bytes:
//! hyper serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on the downstream connection; each
//! request picks a virtual host and route (`route`, pure), then either answers locally
//! (direct_response, 404 `NR`, 503 `UH`/`NC`/`UF`, 504 `UT`) or is forwarded over HTTP/1.1 to an
//! endpoint of the chosen cluster. `sniff` is the http_inspector listener filter.
//!
//! Each request loads the current snapshot, so a new route configuration applies to the next
//! request of a kept-alive connection (as in Envoy), while the request itself never sees half
//! an update. Not yet done: inline `route_config` (only RDS names are looked up), retries,
//! upstream connection pooling (one upstream connection per request), h2 upstreams, upgrades.

pub mod route;
pub mod sniff;

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
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::debug;

use crate::addr::{EndpointAddr, OrigDstAddr};
use crate::dataplane::{Dataplane, connect};
use crate::lb;
use crate::model::listener::HttpManager;
use crate::model::route::{Forward, PathMatch, Route, RouteAction};
use crate::model::{ClusterKind, ClusterSpecifier};
use crate::state::Snapshot;

/// Error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of every response skiff sends downstream.
pub type Body = BoxBody<Bytes, BoxError>;

/// Envoy's local reply for a failed or reset upstream before response headers.
pub const UPSTREAM_RESET: &str = "upstream connect error or disconnect/reset before headers";

/// One downstream connection handed to the HTTP connection manager.
#[derive(Debug, Clone)]
pub struct HttpConn {
    /// Shared data plane (store, stats, upstream mark).
    pub dp: Arc<Dataplane>,
    /// The chain's HCM settings.
    pub manager: HttpManager,
    /// Listener name (for logs).
    pub listener: String,
    /// Downstream peer.
    pub client: SocketAddr,
    /// Original destination, for ORIGINAL_DST clusters.
    pub orig_dst: Option<OrigDstAddr>,
}

/// Serve HTTP/1.1 or h2c on `stream` until the client closes it.
pub async fn serve(conn: HttpConn, stream: TcpStream) {
    let conn = Arc::new(conn);
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(&conn, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // With a timer, hyper closes HTTP/1 connections whose request head does not arrive within
    // its header read timeout (30s), so idle or slow clients cannot pin a connection forever.
    builder.http1().timer(TokioTimer::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
        debug!(error = %e, "http connection ended with error");
    }
}

fn local_reply(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    if !body.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

/// Host of a request: `:authority` (HTTP/2, absolute-form) or the Host header.
fn request_host(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

async fn handle(conn: &HttpConn, req: Request<Incoming>) -> Response<Body> {
    let dp = &conn.dp;
    let prefix = &conn.manager.stat_prefix;
    let hstat = |s: &str| dp.stats.counter(&format!("http.{prefix}.{s}")).inc();
    hstat("downstream_rq_total");
    let down_version = req.version();
    let snap = dp.store.load();
    let host = request_host(&req);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let rc = conn
        .manager
        .rds_route_config_name
        .as_ref()
        .and_then(|n| snap.routes.get(n));
    let facts = route::RequestFacts {
        host: &host,
        method: req.method(),
        path: &path,
        headers: req.headers(),
    };
    let chosen = rc
        .and_then(|rc| route::select_virtual_host(rc, &host))
        .and_then(|vh| route::select_route(vh, &facts).map(|r| (vh, r)));
    let Some((vh, chosen)) = chosen else {
        hstat("no_route");
        debug!(%host, %path, flags = "NR", "no route");
        return with_version(local_reply(StatusCode::NOT_FOUND, ""), down_version);
    };
    debug!(virtual_host = %vh.name, route = %chosen.name, %path, "routed");
    let mut resp = match &chosen.action {
        RouteAction::Direct { status, body } => {
            hstat("rq_direct_response");
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            local_reply(status, body.as_deref().unwrap_or(""))
        }
        RouteAction::Unsupported(what) => {
            debug!(action = %what, "route action not supported");
            local_reply(StatusCode::NOT_IMPLEMENTED, "")
        }
        RouteAction::Forward(f) => forward(conn, &snap, chosen, f, req, &path, &host).await,
    };
    drop(snap);
    *resp.version_mut() = down_version;
    resp
}

fn with_version(mut r: Response<Body>, v: Version) -> Response<Body> {
    *r.version_mut() = v;
    r
}

static WEIGHTED: AtomicUsize = AtomicUsize::new(0);

/// Headers that describe one hop and are never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// The path sent upstream: `prefix_rewrite` replaces what the route matched.
pub fn rewrite_path(route: &Route, rewrite: Option<&str>, path: &str) -> String {
    let Some(new) = rewrite else {
        return path.to_string();
    };
    let matched = match &route.matcher.path {
        PathMatch::Prefix(p) => p.len().min(path.len()),
        _ => path.find(['?', '#']).unwrap_or(path.len()),
    };
    format!("{new}{}", &path[matched..])
}

fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let keys = std::collections::hash_map::RandomState::new();
    let mut a = keys.build_hasher();
    a.write_u64(seq);
    let mut b = keys.build_hasher();
    b.write_u64(!seq);
    let (a, b) = (a.finish(), b.finish());
    // UUID version 4 layout, variant 10.
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// Why a request found no endpoint to forward to (both are 503 local replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoEndpoint {
    /// The route names a cluster the snapshot lacks (`NC`, empty body).
    NoCluster,
    /// The cluster has no healthy endpoint (`UH`).
    NoneHealthy,
}

impl NoEndpoint {
    fn reply(self) -> Response<Body> {
        match self {
            NoEndpoint::NoCluster => local_reply(StatusCode::SERVICE_UNAVAILABLE, ""),
            NoEndpoint::NoneHealthy => {
                local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
            }
        }
    }
}

fn pick_endpoint(
    conn: &HttpConn,
    snap: &Snapshot,
    cluster: &str,
) -> Result<(EndpointAddr, Duration), NoEndpoint> {
    let Some(entry) = snap.cluster(cluster) else {
        debug!(%cluster, flags = "NC", "unknown cluster");
        conn.dp
            .stats
            .counter(&format!("http.{}.no_cluster", conn.manager.stat_prefix))
            .inc();
        return Err(NoEndpoint::NoCluster);
    };
    let timeout = entry.cluster.connect_timeout;
    let none_healthy = || {
        conn.dp
            .stats
            .counter(&format!("cluster.{cluster}.upstream_cx_none_healthy"))
            .inc();
        debug!(%cluster, flags = "UH", "no healthy upstream");
        NoEndpoint::NoneHealthy
    };
    let ep = match &entry.cluster.kind {
        ClusterKind::OriginalDst => conn.orig_dst.map(EndpointAddr::from),
        ClusterKind::Static(_) | ClusterKind::Eds { .. } => {
            lb::pick_round_robin(entry).map(EndpointAddr)
        }
        // DNS clusters are resolved per request below.
        ClusterKind::Dns { .. } => None,
    };
    ep.map(|e| (e, timeout)).ok_or_else(none_healthy)
}

async fn resolve_dns(snap: &Snapshot, cluster: &str) -> Option<EndpointAddr> {
    let entry = snap.cluster(cluster)?;
    let ClusterKind::Dns { hosts } = &entry.cluster.kind else {
        return None;
    };
    let i = lb::next_index(&entry.rr, hosts.len())?;
    let (h, p) = &hosts[i];
    let a = tokio::net::lookup_host((h.as_str(), *p))
        .await
        .ok()?
        .next()?;
    Some(EndpointAddr(a))
}

async fn forward(
    conn: &HttpConn,
    snap: &Snapshot,
    chosen: &Route,
    f: &Forward,
    req: Request<Incoming>,
    path: &str,
    host: &str,
) -> Response<Body> {
    let cluster = match &f.cluster {
        ClusterSpecifier::Cluster(c) => c.as_str(),
        ClusterSpecifier::Weighted(w) => match lb::pick_weighted(w, &WEIGHTED) {
            Some(c) => c,
            None => return local_reply(StatusCode::SERVICE_UNAVAILABLE, ""),
        },
    };
    let is_dns = snap
        .cluster(cluster)
        .is_some_and(|e| matches!(e.cluster.kind, ClusterKind::Dns { .. }));
    let (target, connect_timeout) = if is_dns {
        match resolve_dns(snap, cluster).await {
            Some(a) => (
                a,
                snap.cluster(cluster)
                    .map(|e| e.cluster.connect_timeout)
                    .unwrap_or(crate::model::cluster::DEFAULT_CONNECT_TIMEOUT),
            ),
            None => return local_reply(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
        }
    } else {
        match pick_endpoint(conn, snap, cluster) {
            Ok(x) => x,
            Err(r) => return r.reply(),
        }
    };
    let stats = &conn.dp.stats;
    let cstat = |s: &str| stats.counter(&format!("cluster.{cluster}.{s}"));
    cstat("upstream_rq_total").inc();
    let count_code = |code: u16| {
        cstat(&format!("upstream_rq_{code}")).inc();
        cstat(&format!("upstream_rq_{}xx", code / 100)).inc();
    };
    cstat("upstream_cx_total").inc();
    let started = tokio::time::Instant::now();
    let up = match connect::connect(target, conn.dp.upstream_mark, connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            match e {
                connect::ConnectError::Timeout { .. } => cstat("upstream_cx_connect_timeout").inc(),
                _ => cstat("upstream_cx_connect_fail").inc(),
            }
            debug!(error = %e, %cluster, flags = "UF", "upstream connect failed");
            count_code(503);
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{UPSTREAM_RESET}. reset reason: connection failure"),
            );
        }
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(up)).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, flags = "UF", "upstream handshake failed");
                count_code(503);
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{UPSTREAM_RESET}. reset reason: connection failure"),
                );
            }
        };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream connection ended with error");
        }
    });

    let (mut parts, body) = req.into_parts();
    let new_path = rewrite_path(chosen, f.prefix_rewrite.as_deref(), path);
    parts.uri = new_path
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    let rid = HeaderName::from_static("x-request-id");
    if !parts.headers.contains_key(&rid)
        && let Ok(v) = HeaderValue::from_str(&request_id())
    {
        parts.headers.insert(rid, v);
    }
    let send = sender.send_request(Request::from_parts(parts, body));
    let result = match f.timeout {
        Some(t) => match tokio::time::timeout(t, send).await {
            Ok(r) => r,
            Err(_) => {
                cstat("upstream_rq_timeout").inc();
                debug!(%cluster, flags = "UT", "upstream request timeout");
                count_code(504);
                return local_reply(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
            }
        },
        None => send.await,
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, %cluster, flags = "UC", "upstream reset before headers");
            count_code(503);
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{UPSTREAM_RESET}. reset reason: connection termination"),
            );
        }
    };
    count_code(resp.status().as_u16());
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
        parts
            .headers
            .insert(HeaderName::from_static("x-envoy-upstream-service-time"), v);
    }
    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
}

#[cfg(test)]
mod tests;
