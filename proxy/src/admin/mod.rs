//! Envoy-dialect admin endpoint (localhost only) plus skiff's own `/debug/` pages.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::state::Store;
use crate::stats::Stats;

/// Run-time control of the kernel capture, as the admin API sees it.
pub trait CaptureControl: Send + Sync {
    /// Start capturing a cgroup (node mode); returns its id.
    fn add_cgroup(&self, path: &Path) -> Result<u64, String>;
    /// Stop capturing a cgroup (node mode).
    fn remove_cgroup(&self, path: &Path) -> Result<(), String>;
    /// Ids of the captured cgroups (node mode).
    fn cgroups(&self) -> Result<Vec<u64>, String>;
    /// Kernel-side counters by reason.
    fn stats(&self) -> Vec<(String, u64)>;
    /// Open or close the kernel's readiness gate (closed: connects fail open or closed).
    fn set_ready(&self, ready: bool) -> Result<(), String>;
}

/// What the admin server reads.
pub struct Admin {
    /// Current configuration.
    pub store: Arc<Store>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Kernel capture, when installed.
    pub capture: Option<Arc<dyn CaptureControl>>,
    /// Set once every listener is up.
    pub ready: Arc<AtomicBool>,
    /// `/config_dump` sections (already in Envoy's JSON dialect), keyed by `@type`.
    pub config_dump: Arc<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>,
    /// Node id, for `/server_info`.
    pub node_id: String,
}

/// Serve the admin API on `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&admin, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "admin connection error");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body + "\n")));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let q = query(&req);
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    // Drain the body: admin requests carry their arguments in the query string.
    let _ = req.into_body().collect().await;
    match (method, path.as_str()) {
        (Method::GET, "/ready") => {
            if admin.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "LIVE\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
            }
        }
        // Envoy's drain: stop taking new connections, keep serving in-flight ones. With capture
        // the kernel stops steering connects here (they fail open, or closed if configured).
        (Method::POST, "/drain_listeners") => {
            admin.ready.store(false, Ordering::Relaxed);
            if let Some(c) = &admin.capture
                && let Err(e) = c.set_ready(false)
            {
                return text(StatusCode::INTERNAL_SERVER_ERROR, e + "\n");
            }
            text(StatusCode::OK, "OK\n")
        }
        (Method::GET, "/server_info") => json(&serde_json::json!({
            "version": concat!("skiff/", env!("CARGO_PKG_VERSION")),
            "state": if admin.ready.load(Ordering::Relaxed) { "LIVE" } else { "PRE_INITIALIZING" },
            "node": { "id": admin.node_id },
        })),
        (Method::GET, "/stats") => {
            let mut out = String::new();
            for (k, v) in stats_lines(admin) {
                out.push_str(&format!("{k}: {v}\n"));
            }
            text(StatusCode::OK, out)
        }
        (Method::GET, "/listeners") => {
            let snap = admin.store.load();
            let mut out = String::new();
            for (name, l) in &snap.listeners {
                out.push_str(&format!("{name}::{}\n", l.address));
            }
            text(StatusCode::OK, out)
        }
        (Method::GET, "/clusters") => {
            let snap = admin.store.load();
            let mut out = String::new();
            for (name, c) in &snap.clusters {
                if let Some(a) = &c.assignment {
                    for e in a.endpoints() {
                        out.push_str(&format!(
                            "{name}::{}::health_flags::{}\n{name}::{}::weight::{}\n",
                            e.address,
                            if e.health.is_healthy() {
                                "healthy"
                            } else {
                                "/eds_health_status"
                            },
                            e.address,
                            e.weight
                        ));
                    }
                }
            }
            text(StatusCode::OK, out)
        }
        (Method::GET, "/config_dump") => json(&serde_json::json!({
            "configs": (admin.config_dump)(),
        })),
        (Method::GET, "/debug/capture") => match &admin.capture {
            Some(c) => {
                let stats: serde_json::Map<String, serde_json::Value> =
                    c.stats().into_iter().map(|(k, v)| (k, v.into())).collect();
                json(&serde_json::json!({
                    "stats": stats,
                    "meshed_cgroups": c.cgroups().unwrap_or_default(),
                }))
            }
            None => text(
                StatusCode::NOT_FOUND,
                "capture is not installed (--capture none)\n",
            ),
        },
        (m, "/debug/node/cgroups") => {
            let Some(capture) = &admin.capture else {
                return text(StatusCode::NOT_FOUND, "capture is not installed\n");
            };
            let path = q.get("path").map(Path::new);
            match (m, path) {
                (Method::GET, _) => match capture.cgroups() {
                    Ok(ids) => json(&serde_json::json!({ "cgroups": ids })),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e + "\n"),
                },
                (Method::POST, Some(p)) => match capture.add_cgroup(p) {
                    Ok(id) => json(&serde_json::json!({ "path": p, "cgroup_id": id })),
                    Err(e) => text(StatusCode::BAD_REQUEST, e + "\n"),
                },
                (Method::DELETE, Some(p)) => match capture.remove_cgroup(p) {
                    Ok(()) => json(&serde_json::json!({ "path": p, "removed": true })),
                    Err(e) => text(StatusCode::BAD_REQUEST, e + "\n"),
                },
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "use POST or DELETE with ?path=CGROUP\n",
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin commands: /ready /server_info /stats /listeners /clusters /config_dump \
             /drain_listeners (POST) \
             /debug/capture /debug/node/cgroups\n",
        ),
    }
}

fn stats_lines(admin: &Admin) -> Vec<(String, u64)> {
    let mut out = admin.stats.snapshot();
    if let Some(c) = &admin.capture {
        out.extend(
            c.stats()
                .into_iter()
                .map(|(k, v)| (format!("skiff.bpf.{k}"), v)),
        );
    }
    out.sort();
    out
}

/// Send one admin request (`skiff node add-cgroup` and friends); returns the body.
pub async fn request(
    admin: SocketAddr,
    method: Method,
    path_and_query: &str,
) -> anyhow::Result<String> {
    use anyhow::Context;
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| format!("cannot reach skiff admin at {admin}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, admin.to_string())
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        anyhow::bail!("admin {path_and_query}: {status}: {}", body.trim());
    }
    Ok(body)
}
