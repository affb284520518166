//! Envoy-dialect admin endpoint (localhost only) plus skiff's own `/debug/` pages.
//!
//! Safe by default ([`policy`]): loopback unless `--admin-allow-remote`, read-only unless
//! `--admin-mutations` (any request but GET/HEAD is answered 403), request bodies bounded
//! (413) and header reads timed out; node-mode pod requests name only network namespace paths
//! and bootstraps inside `--pod-bootstrap-dir`. `/drain_listeners` publishes on a [`DrainSignal`]
//! that the listener tasks wait on.

pub mod config_dump;
pub mod drain;
pub mod logging;
pub mod policy;

pub use drain::{DrainRequest, DrainSignal};
pub use policy::AdminOptions;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
use crate::stats::{Sample, Stats, Value};

/// Why a [`CaptureControl`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The capture in use cannot do this (cgroups with iptables, pods outside node mode).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The kernel, the iptables rules or the pod registry refused.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl ControlError {
    /// A failure of the capture itself.
    pub fn failed(e: impl std::error::Error + Send + Sync + 'static) -> ControlError {
        ControlError::Failed(Box::new(e))
    }
}

/// Run-time control of the kernel capture, as the admin API sees it.
pub trait CaptureControl: Send + Sync {
    /// Start capturing a cgroup (node mode); returns its id.
    fn add_cgroup(&self, path: &Path) -> Result<u64, ControlError>;
    /// Stop capturing a cgroup (node mode).
    fn remove_cgroup(&self, path: &Path) -> Result<(), ControlError>;
    /// Ids of the captured cgroups (node mode).
    fn cgroups(&self) -> Result<Vec<u64>, ControlError>;
    /// Kernel-side counters by reason.
    fn stats(&self) -> Vec<(String, u64)>;
    /// Open or close the kernel's readiness gate (closed: connects fail open or closed).
    fn set_ready(&self, ready: bool) -> Result<(), ControlError>;
    /// `/debug/explain?dst=`: where a captured connect to `dst` goes and why.
    fn explain(
        &self,
        _snap: &crate::state::Snapshot,
        dst: std::net::SocketAddr,
    ) -> serde_json::Value {
        serde_json::json!({ "dst": dst.to_string(), "path": "unknown", "reason": "no explain support" })
    }
    /// `/debug/maps`: the kernel fast-path maps.
    fn maps(&self) -> serde_json::Value {
        serde_json::json!({ "fast_path": false })
    }
    /// Node mode: register a pod (cgroup, network namespace, node id, own bootstrap).
    fn add_pod(
        &self,
        _spec: crate::capture::pods::PodSpec,
    ) -> Result<serde_json::Value, ControlError> {
        Err(ControlError::Unsupported(
            "pods exist only in node mode (--mode node)",
        ))
    }
    /// Node mode: unregister the pod of a cgroup.
    fn remove_pod(&self, _cgroup: &Path) -> Result<(), ControlError> {
        Err(ControlError::Unsupported(
            "pods exist only in node mode (--mode node)",
        ))
    }
    /// Node mode: the registered pods.
    fn pods(&self) -> serde_json::Value {
        serde_json::json!({ "pods": [] })
    }
    /// Prefix of [`CaptureControl::stats`] names in `/stats`.
    fn stats_prefix(&self) -> &'static str {
        "skiff.bpf"
    }
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
    /// The bootstrap as parsed (`BootstrapConfigDump`, static listeners and clusters).
    pub bootstrap: Arc<envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap>,
    /// Extra `/config_dump` sections (skiff's own, already JSON with `@type`), appended last.
    pub extra_config_dump: Option<Arc<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>>,
    /// Node id, for `/server_info`.
    pub node_id: String,
}

/// Serve the admin API on `listener` with the safe [`AdminOptions::default`] (no state
/// changes) and a drain signal nobody listens to, until `shutdown` completes.
pub async fn run(listener: TcpListener, admin: Arc<Admin>, shutdown: impl Future<Output = ()>) {
    serve(
        listener,
        admin,
        AdminOptions::default(),
        DrainSignal::new(),
        shutdown,
    )
    .await
}

/// What one admin connection needs besides the request.
struct Server {
    admin: Arc<Admin>,
    options: AdminOptions,
    drain: DrainSignal,
}

/// Serve the admin API on `listener` with `options` until `shutdown` completes;
/// `/drain_listeners` publishes on `drain`.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    options: AdminOptions,
    drain: DrainSignal,
    shutdown: impl Future<Output = ()>,
) {
    let header_read_timeout = options.header_read_timeout;
    let _ = started();
    let server = Arc::new(Server {
        admin,
        options,
        drain,
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(policy::MAX_CONNECTIONS));
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
        // Admin requests are rare: a client holding many connections is turned away rather
        // than given memory and tasks.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "admin connection refused: too many open");
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(guarded(&server, req).await) }
            });
            // A client that never finishes its headers would hold the connection forever.
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
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

fn query(uri: &hyper::Uri) -> BTreeMap<String, String> {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Whether a request may change state: everything but reads.
fn is_mutation(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD)
}

/// The checks every request passes before [`handle`]: opt-in for state changes, body size.
async fn guarded(server: &Server, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if is_mutation(req.method()) && !server.options.allow_mutations {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "{} {}: admin requests that change state are disabled; start skiff with \
                 --admin-mutations to allow them\n",
                req.method(),
                req.uri().path()
            ),
        );
    }
    let max = server.options.max_body_bytes;
    let too_large = || {
        let mut r = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {max} bytes\n"),
        );
        // The rest of the body is never read, so the connection cannot carry another request.
        r.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        r
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    // Admin requests carry their arguments in the query string; the body is read (bounded)
    // only so the connection can be reused.
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    if http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .is_err()
    {
        return too_large();
    }
    handle(server, parts).await
}

async fn handle(server: &Server, req: hyper::http::request::Parts) -> Response<Full<Bytes>> {
    let admin = &*server.admin;
    let q = query(&req.uri);
    let path = req.uri.path().to_string();
    let method = req.method.clone();
    match (method, path.as_str()) {
        (Method::GET, "/ready") => {
            if admin.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "LIVE\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n")
            }
        }
        (Method::POST, "/drain_listeners") => drain_listeners(server, &q),
        // Envoy's log rotation hook: every access-log file is reopened before its next write.
        (Method::POST, "/reopen_logs") => {
            crate::accesslog::sink::reopen_all();
            text(StatusCode::OK, "OK\n")
        }
        (Method::GET, "/server_info") => json(&server_info(admin)),
        (Method::GET, path @ ("/stats" | "/stats/prometheus")) => {
            // `?filter=` (a regex on the stat's full name) applies to every format, as in Envoy.
            let filter = match q.get("filter").map(|f| regex_lite::Regex::new(f)) {
                Some(Ok(re)) => Some(re),
                Some(Err(e)) => return text(StatusCode::BAD_REQUEST, format!("filter: {e}\n")),
                None => None,
            };
            let samples: Vec<Sample> = samples(admin)
                .into_iter()
                .filter(|s| filter.as_ref().is_none_or(|re| re.is_match(&s.name)))
                .collect();
            match (path, q.get("format").map(String::as_str)) {
                ("/stats/prometheus", _) | (_, Some("prometheus")) => {
                    let mut body = crate::stats::prometheus::render(&samples);
                    // Istio's metrics keep their own names (no `envoy_` prefix), as Envoy
                    // exports the stats filter's; `?filter=` matches their family names.
                    if filter.as_ref().is_none_or(|re| re.is_match("istio_")) {
                        body.push_str(&admin.stats.istio.render());
                    }
                    text(StatusCode::OK, body)
                }
                (_, Some("json")) => json(&stats_json(&samples)),
                _ => text(StatusCode::OK, stats_text(&samples)),
            }
        }
        (Method::GET, "/logging") => match logging::levels() {
            Some(l) => text(StatusCode::OK, l.render()),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", logging::LoggingError::NotInstalled),
            ),
        },
        (Method::POST, "/logging") => {
            if q.is_empty() {
                return match logging::levels() {
                    Some(l) => text(StatusCode::OK, l.render()),
                    None => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{}\n", logging::LoggingError::NotInstalled),
                    ),
                };
            }
            match logging::set(&q) {
                Ok(l) => text(StatusCode::OK, l.render()),
                Err(e @ logging::LoggingError::NotInstalled) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("error: {e}\n")),
            }
        }
        (Method::GET, "/listeners") => {
            let snap = admin.store.load();
            if q.get("format").map(String::as_str) == Some("json") {
                let statuses: Vec<serde_json::Value> = snap
                    .listeners
                    .iter()
                    .map(|(name, l)| {
                        serde_json::json!({
                            "name": name,
                            "local_address": socket_address_json(l.address),
                        })
                    })
                    .collect();
                return json(&serde_json::json!({ "listener_statuses": statuses }));
            }
            let mut out = String::new();
            for (name, l) in &snap.listeners {
                out.push_str(&format!("{name}::{}\n", l.address));
            }
            text(StatusCode::OK, out)
        }
        (Method::GET, "/clusters") => {
            let snap = admin.store.load();
            if q.get("format").map(String::as_str) == Some("json") {
                json(&clusters_json(admin, &snap))
            } else {
                text(StatusCode::OK, clusters_text(admin, &snap))
            }
        }
        (Method::GET, "/config_dump") => {
            let name_regex = match q.get("name_regex").map(|r| regex_lite::Regex::new(r)) {
                Some(Ok(re)) => Some(re),
                Some(Err(e)) => {
                    return text(StatusCode::BAD_REQUEST, format!("name_regex: {e}\n"));
                }
                None => None,
            };
            let dq = config_dump::DumpQuery {
                include_eds: q.contains_key("include_eds"),
                resource: q.get("resource").cloned().filter(|r| !r.is_empty()),
                mask: q.get("mask").cloned().filter(|m| !m.is_empty()),
                name_regex,
            };
            let snap = admin.store.load();
            let rendered = config_dump::render(&admin.bootstrap, &snap, &dq);
            // Rendering needed Envoy's descriptor pool; a dump is rare, the pool is 16 MB.
            crate::config::release_parser_memory();
            match rendered {
                Ok(mut v) => {
                    if dq.resource.is_none()
                        && let Some(extra) = &admin.extra_config_dump
                        && let Some(serde_json::Value::Array(a)) = v.get_mut("configs")
                    {
                        a.extend(extra());
                    }
                    json(&v)
                }
                Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
            }
        }
        (Method::GET, "/debug/explain") => {
            // `?recent[=N]`: the last connections, kernel and proxy (no capture needed).
            if let Some(n) = q.get("recent") {
                let n = n.parse().unwrap_or(crate::bpf::explain::RECENT_DEFAULT);
                return json(&crate::bpf::explain::recent().json(n));
            }
            let Some(dst) = q
                .get("dst")
                .and_then(|d| d.parse::<std::net::SocketAddr>().ok())
            else {
                return text(StatusCode::BAD_REQUEST, "use ?dst=IP:PORT\n");
            };
            match &admin.capture {
                Some(c) => json(&c.explain(&admin.store.load(), dst)),
                None => text(StatusCode::NOT_FOUND, "capture is not installed\n"),
            }
        }
        (Method::GET, "/debug/maps") => match &admin.capture {
            Some(c) => json(&c.maps()),
            None => text(StatusCode::NOT_FOUND, "capture is not installed\n"),
        },
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
        (m, "/debug/node/pods") => {
            let cgroup = q.get("cgroup").map(PathBuf::from);
            // The paths a pod request names are checked before anything else: skiff enters
            // the namespace and reads the bootstrap as itself (root in node mode).
            let spec = match (&m, cgroup.clone()) {
                (&Method::POST, Some(cgroup)) => match pod_spec(server, &q, cgroup) {
                    Ok(spec) => Some(spec),
                    Err((status, why)) => return text(status, why),
                },
                _ => None,
            };
            let Some(capture) = &admin.capture else {
                return text(StatusCode::NOT_FOUND, "capture is not installed\n");
            };
            match (m, cgroup, spec) {
                (Method::GET, _, _) => json(&capture.pods()),
                (Method::POST, _, Some(spec)) => match capture.add_pod(spec) {
                    Ok(v) => json(&v),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                (Method::DELETE, Some(cgroup), _) => match capture.remove_pod(&cgroup) {
                    Ok(()) => json(&serde_json::json!({ "cgroup": cgroup, "removed": true })),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "use GET, or POST/DELETE with ?cgroup=PATH\n",
                ),
            }
        }
        (m, "/debug/node/cgroups") => {
            let Some(capture) = &admin.capture else {
                return text(StatusCode::NOT_FOUND, "capture is not installed\n");
            };
            let path = q.get("path").map(Path::new);
            match (m, path) {
                (Method::GET, _) => match capture.cgroups() {
                    Ok(ids) => json(&serde_json::json!({ "cgroups": ids })),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                },
                (Method::POST, Some(p)) => match capture.add_cgroup(p) {
                    Ok(id) => json(&serde_json::json!({ "path": p, "cgroup_id": id })),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                (Method::DELETE, Some(p)) => match capture.remove_cgroup(p) {
                    Ok(()) => json(&serde_json::json!({ "path": p, "removed": true })),
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "use POST or DELETE with ?path=CGROUP\n",
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin commands: /ready /server_info /stats /stats/prometheus /listeners /clusters \
             /config_dump /logging \
             /drain_listeners (POST) /logging (POST) \
             /debug/capture /debug/node/cgroups /debug/node/pods\n",
        ),
    }
}

/// The pod of a `POST /debug/node/pods`: 400 when an argument is missing, 403 when the
/// namespace or bootstrap path is not one skiff may use ([`policy`]).
fn pod_spec(
    server: &Server,
    q: &BTreeMap<String, String>,
    cgroup: PathBuf,
) -> Result<crate::capture::pods::PodSpec, (StatusCode, String)> {
    let (Some(netns), Some(node_id)) = (q.get("netns"), q.get("node_id")) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "POST needs ?cgroup=PATH&netns=PATH&node_id=ID[&bootstrap=FILE]\n".into(),
        ));
    };
    let netns = PathBuf::from(netns);
    let forbidden = |e: policy::PodPathError| (StatusCode::FORBIDDEN, format!("{e}\n"));
    policy::check_netns(&netns).map_err(forbidden)?;
    let bootstrap = q
        .get("bootstrap")
        .map(|b| policy::check_bootstrap(Path::new(b), server.options.pod_bootstrap_dir.as_deref()))
        .transpose()
        .map_err(forbidden)?;
    Ok(crate::capture::pods::PodSpec {
        cgroup,
        netns,
        node_id: node_id.clone(),
        bootstrap,
    })
}

/// Envoy's `/drain_listeners`: stop accepting on every listener (or only inbound ones), now or
/// after the drain period (`graceful`); in-flight connections go on. A full drain also clears
/// readiness and the kernel capture gate first, so new connects stop arriving (they fail open,
/// or closed if configured) before the listeners close.
fn drain_listeners(server: &Server, q: &BTreeMap<String, String>) -> Response<Full<Bytes>> {
    let req = match DrainRequest::from_query(|k| q.contains_key(k)) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let admin = &server.admin;
    if !req.inbound_only {
        admin.ready.store(false, Ordering::Relaxed);
        if let Some(c) = &admin.capture
            && let Err(e) = c.set_ready(false)
        {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
        }
    }
    if !req.graceful {
        server.drain.stop(req.inbound_only);
    } else if server.drain.begin_graceful() && !req.skip_exit {
        let drain = server.drain.clone();
        let period = server.options.drain_time;
        tokio::spawn(async move {
            tokio::time::sleep(period).await;
            drain.stop(req.inbound_only);
        });
    }
    text(StatusCode::OK, "OK\n")
}

fn socket_address_json(a: SocketAddr) -> serde_json::Value {
    serde_json::json!({ "socket_address": { "address": a.ip().to_string(), "port_value": a.port() } })
}

/// Envoy's `health_flags` text: `healthy`, or every failed flag as `/name`, in Envoy's order.
fn health_flags(h: crate::model::HealthStatus, live: u32) -> String {
    use crate::lb::host::flag;
    use crate::model::HealthStatus as H;
    let mut out = String::new();
    let mut add = |on: bool, s: &str| {
        if on {
            out.push_str(s);
        }
    };
    add(live & flag::FAILED_ACTIVE_HC != 0, "/failed_active_hc");
    add(
        live & flag::FAILED_OUTLIER_CHECK != 0,
        "/failed_outlier_check",
    );
    add(matches!(h, H::Unhealthy | H::Timeout), "/failed_eds_health");
    add(matches!(h, H::Degraded), "/degraded_eds_health");
    add(live & flag::PENDING_ACTIVE_HC != 0, "/pending_active_hc");
    add(live & flag::ACTIVE_HC_TIMEOUT != 0, "/active_hc_timeout");
    add(matches!(h, H::Draining), "/eds_status_draining");
    if out.is_empty() {
        out.push_str("healthy");
    }
    out
}

/// One host row of `/clusters`: the endpoint, its locality group and its live state (none for
/// internal endpoints, which are not balanced over the network).
struct HostRow<'a> {
    loc: &'a crate::model::LocalityEndpoints,
    ep: &'a crate::model::LbEndpoint,
    host: Option<&'a std::sync::Arc<crate::lb::Host>>,
}

fn host_rows(entry: &crate::state::ClusterEntry) -> Vec<HostRow<'_>> {
    let Some(a) = &entry.assignment else {
        return Vec::new();
    };
    a.localities
        .iter()
        .flat_map(|loc| loc.endpoints.iter().map(move |ep| (loc, ep)))
        .map(|(loc, ep)| HostRow {
            loc,
            ep,
            host: ep
                .internal
                .is_none()
                .then(|| entry.lb.host(ep.address))
                .flatten(),
        })
        .collect()
}

/// Per-host facts of `/clusters` in Envoy's field order (counters are per host, kept across
/// configuration updates).
fn host_facts(r: &HostRow<'_>) -> Vec<(&'static str, String)> {
    let st = r.host.map(|h| h.state());
    let n = |f: fn(&crate::lb::host::HostState) -> u64| st.map(f).unwrap_or(0).to_string();
    let live = r.host.map(|h| h.flags()).unwrap_or(0);
    let rate = st
        .and_then(|s| s.success_rate())
        .map(|v| format!("{v}"))
        .unwrap_or_else(|| "-1".to_string());
    let l = &r.loc.locality;
    vec![
        ("cx_active", n(|s| s.active_connections())),
        ("cx_connect_fail", n(|s| s.connect_failures())),
        ("cx_total", n(|s| s.connections_total())),
        ("rq_active", n(|s| s.active_requests())),
        ("rq_error", n(|s| s.requests_error())),
        (
            "rq_success",
            n(|s| s.requests_total().saturating_sub(s.requests_error())),
        ),
        ("rq_timeout", n(|s| s.requests_timeout())),
        ("rq_total", n(|s| s.requests_total())),
        ("hostname", String::new()),
        ("health_flags", health_flags(r.ep.health, live)),
        ("weight", r.ep.weight.to_string()),
        ("region", l.region.clone()),
        ("zone", l.zone.clone()),
        ("sub_zone", l.sub_zone.clone()),
        ("canary", "false".to_string()),
        ("priority", r.loc.priority.to_string()),
        ("success_rate", rate),
        ("local_origin_success_rate", "-1".to_string()),
    ]
}

/// Circuit breaker lines (`default_priority::max_connections::1024`, ...).
fn breaker_facts(c: &crate::model::Cluster) -> Vec<(String, u64)> {
    let cb = &c.lb.circuit_breakers;
    let mut out = Vec::new();
    for (p, t) in [
        ("default_priority", &cb.default),
        ("high_priority", &cb.high),
    ] {
        out.push((format!("{p}::max_connections"), t.max_connections));
        out.push((format!("{p}::max_pending_requests"), t.max_pending_requests));
        out.push((format!("{p}::max_requests"), t.max_requests));
        out.push((format!("{p}::max_retries"), t.max_retries));
    }
    out
}

fn clusters_text(_admin: &Admin, snap: &crate::state::Snapshot) -> String {
    let mut out = String::new();
    for (name, c) in &snap.clusters {
        let via_api = !snap.static_clusters.contains(name);
        out.push_str(&format!("{name}::observability_name::{name}\n"));
        if c.cluster.lb.outlier.is_some() {
            let (avg, threshold) =
                c.lb.shared
                    .success_rate_summary()
                    .map(|(a, t)| (a.to_string(), t.to_string()))
                    .unwrap_or_else(|| ("-1".into(), "-1".into()));
            out.push_str(&format!("{name}::outlier::success_rate_average::{avg}\n"));
            out.push_str(&format!(
                "{name}::outlier::success_rate_ejection_threshold::{threshold}\n"
            ));
        }
        for (k, v) in breaker_facts(&c.cluster) {
            out.push_str(&format!("{name}::{k}::{v}\n"));
        }
        out.push_str(&format!("{name}::added_via_api::{via_api}\n"));
        for r in host_rows(c) {
            let addr = r.ep.address;
            for (k, v) in host_facts(&r) {
                out.push_str(&format!("{name}::{addr}::{k}::{v}\n"));
            }
        }
    }
    out
}

fn clusters_json(_admin: &Admin, snap: &crate::state::Snapshot) -> serde_json::Value {
    use crate::lb::host::flag;
    let statuses: Vec<serde_json::Value> = snap
        .clusters
        .iter()
        .map(|(name, c)| {
            let hosts: Vec<serde_json::Value> = host_rows(c)
                .iter()
                .map(|r| {
                    let facts = host_facts(r);
                    let stats: Vec<serde_json::Value> = facts
                        .iter()
                        .filter(|(k, _)| k.starts_with("cx_") || k.starts_with("rq_"))
                        .map(|(k, v)| {
                            let gauge = k.ends_with("_active");
                            let mut s = serde_json::json!({ "name": k });
                            if gauge {
                                s["type"] = "GAUGE".into();
                            }
                            s["value"] = v.clone().into();
                            s
                        })
                        .collect();
                    let live = r.host.map(|h| h.flags()).unwrap_or(0);
                    let mut hs = serde_json::json!({ "eds_health_status": r.ep.health.as_str() });
                    for (f, key) in [
                        (flag::FAILED_ACTIVE_HC, "failed_active_health_check"),
                        (flag::FAILED_OUTLIER_CHECK, "failed_outlier_check"),
                        (flag::PENDING_ACTIVE_HC, "pending_active_hc"),
                        (flag::ACTIVE_HC_TIMEOUT, "active_hc_timeout"),
                    ] {
                        if live & f != 0 {
                            hs[key] = true.into();
                        }
                    }
                    let mut h = serde_json::json!({
                        "address": socket_address_json(r.ep.address),
                        "stats": stats,
                        "health_status": hs,
                        "weight": r.ep.weight,
                        "priority": r.loc.priority,
                    });
                    if let Some(rate) = r.host.and_then(|h| h.state().success_rate()) {
                        h["success_rate"] = serde_json::json!({ "value": rate });
                    }
                    let l = &r.loc.locality;
                    if !(l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty()) {
                        h["locality"] = serde_json::json!({
                            "region": l.region, "zone": l.zone, "sub_zone": l.sub_zone,
                        });
                    }
                    h
                })
                .collect();
            let cb = &c.cluster.lb.circuit_breakers;
            let thresholds: Vec<serde_json::Value> = [("DEFAULT", &cb.default), ("HIGH", &cb.high)]
                .iter()
                .map(|(p, t)| {
                    serde_json::json!({
                        "priority": p,
                        "max_connections": t.max_connections,
                        "max_pending_requests": t.max_pending_requests,
                        "max_requests": t.max_requests,
                        "max_retries": t.max_retries,
                    })
                })
                .collect();
            serde_json::json!({
                "name": name,
                "observability_name": name,
                "added_via_api": !snap.static_clusters.contains(name),
                "circuit_breakers": { "thresholds": thresholds },
                "host_statuses": hosts,
            })
        })
        .collect();
    serde_json::json!({ "cluster_statuses": statuses })
}

/// Envoy's `/stats` text: counters and gauges as `name: value`, then histograms as
/// `name: P0(nan,v) P25(nan,v) ...`, each part sorted by name.
fn stats_text(samples: &[Sample]) -> String {
    let mut out = String::new();
    for s in samples {
        match &s.value {
            Value::Counter(v) | Value::Gauge(v) => out.push_str(&format!("{}: {v}\n", s.name)),
            Value::Histogram(_) => {}
        }
    }
    for s in samples {
        if let Value::Histogram(h) = &s.value {
            out.push_str(&format!("{}: {}\n", s.name, h.summary()));
        }
    }
    out
}

/// Envoy's `/stats?format=json`: `{"name", "value"}` per counter and gauge, then one
/// `histograms` entry with the supported quantiles and each histogram's values (interval
/// `null`: skiff keeps no flush intervals).
fn stats_json(samples: &[Sample]) -> serde_json::Value {
    let mut stats: Vec<serde_json::Value> = samples
        .iter()
        .filter_map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) => {
                Some(serde_json::json!({ "name": s.name, "value": v }))
            }
            Value::Histogram(_) => None,
        })
        .collect();
    let computed: Vec<serde_json::Value> = samples
        .iter()
        .filter_map(|s| match &s.value {
            Value::Histogram(h) => Some(serde_json::json!({
                "name": s.name,
                "values": crate::stats::histogram::SUMMARY_QUANTILES
                    .iter()
                    .map(|q| serde_json::json!({ "interval": null, "cumulative": h.quantile(*q) }))
                    .collect::<Vec<_>>(),
            })),
            _ => None,
        })
        .collect();
    if !computed.is_empty() {
        let supported: Vec<f64> = crate::stats::histogram::SUMMARY_QUANTILES
            .iter()
            .map(|q| q * 100.0)
            .collect();
        stats.push(serde_json::json!({
            "histograms": { "supported_quantiles": supported, "computed_quantiles": computed }
        }));
    }
    serde_json::json!({ "stats": stats })
}

/// When this process's admin first served: `/server_info`'s uptime.
fn started() -> std::time::SystemTime {
    static STARTED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();
    *STARTED.get_or_init(std::time::SystemTime::now)
}

/// Envoy's `/server_info`: version, state, hot restart version, command line options, node
/// and uptimes. skiff has no hot restart (one epoch: both uptimes are the same) and its own
/// command line; the options Envoy lists are filled from what skiff knows, and `argv` carries
/// skiff's own arguments.
fn server_info(admin: &Admin) -> serde_json::Value {
    let live = admin.ready.load(Ordering::Relaxed);
    let uptime = format!("{}s", started().elapsed().map_or(0, |d| d.as_secs()));
    let node = admin
        .bootstrap
        .node
        .as_ref()
        .map(skiff_proto::to_json)
        .filter(|v| !v.is_null())
        .unwrap_or_else(|| serde_json::json!({ "id": admin.node_id }));
    let levels = logging::levels();
    serde_json::json!({
        "version": concat!("skiff/", env!("CARGO_PKG_VERSION")),
        "state": if live { "LIVE" } else { "PRE_INITIALIZING" },
        "hot_restart_version": "disabled",
        "command_line_options": {
            "base_id": "0",
            "concurrency": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "log_level": levels.as_ref().map_or("info".to_string(), |l| l.default.clone()),
            "component_log_level": levels.map_or(String::new(), |l| {
                l.targets.iter().map(|(t, v)| format!("{t}:{v}")).collect::<Vec<_>>().join(",")
            }),
            "mode": "Serve",
            "disable_hot_restart": true,
            "restart_epoch": 0,
            "service_node": admin.node_id,
            "argv": std::env::args().collect::<Vec<_>>(),
        },
        "node": node,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
    })
}

/// Envoy's `cluster.<name>.circuit_breakers.<default|high>.{cx,rq_pending,rq,rq_retry}_open`
/// gauges (1 while the limit is reached), from the cluster's live breaker counts.
fn breaker_gauges(name: &str, c: &crate::state::ClusterEntry) -> Vec<Sample> {
    use crate::lb::circuit::{Resource, RoutingPriority};
    let cb = &c.cluster.lb.circuit_breakers;
    let live = &c.lb.shared.breakers;
    let mut out = Vec::new();
    for (p, prio, t) in [
        ("default", RoutingPriority::Default, &cb.default),
        ("high", RoutingPriority::High, &cb.high),
    ] {
        let now = |r| live.current(prio, r);
        // As the breaker computes it: a retry budget is a share of the active requests.
        let retries = match t.retry_budget {
            Some((pct, min)) => {
                let active = now(Resource::Requests) + now(Resource::PendingRequests);
                ((active as f64 * pct / 100.0) as u64).max(min)
            }
            None => t.max_retries,
        };
        for (stat, r, limit) in [
            ("cx_open", Resource::Connections, t.max_connections),
            (
                "rq_pending_open",
                Resource::PendingRequests,
                t.max_pending_requests,
            ),
            ("rq_open", Resource::Requests, t.max_requests),
            ("rq_retry_open", Resource::Retries, retries),
        ] {
            out.push(Sample {
                name: format!("cluster.{name}.circuit_breakers.{p}.{stat}"),
                value: Value::Gauge(u64::from(now(r) >= limit)),
            });
        }
    }
    out
}

/// Every stat `/stats` lists: the registry's, the gauges Envoy derives from its managers (here
/// from the snapshot) and the kernel capture's counters.
fn samples(admin: &Admin) -> Vec<Sample> {
    let mut out = admin.stats.samples();
    let snap = admin.store.load();
    let gauge = |name: &str, v: usize| Sample {
        name: name.to_string(),
        value: Value::Gauge(v as u64),
    };
    out.extend([
        gauge("cluster_manager.active_clusters", snap.clusters.len()),
        gauge(
            "cluster_manager.warming_clusters",
            snap.xds.clusters.warming.len(),
        ),
        gauge(
            "listener_manager.total_listeners_active",
            snap.listeners.len(),
        ),
        gauge(
            "listener_manager.total_listeners_warming",
            snap.xds.listeners.warming.len(),
        ),
    ]);
    for (name, c) in &snap.clusters {
        out.extend(breaker_gauges(name, c));
    }
    if !out
        .iter()
        .any(|s| s.name == "control_plane.connected_state")
    {
        out.push(gauge("control_plane.connected_state", 0));
    }
    if let Some(c) = &admin.capture {
        let prefix = c.stats_prefix();
        out.extend(c.stats().into_iter().map(|(k, v)| Sample {
            name: format!("{prefix}.{k}"),
            value: Value::Counter(v),
        }));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Why an admin request (`skiff node`, `skiff admin`, ...) failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No connection to the admin address.
    #[error("cannot reach skiff admin at {admin}")]
    Connect {
        /// Admin address.
        admin: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be built (a path that is not a URI).
    #[error(transparent)]
    Build(#[from] hyper::http::Error),
    /// HTTP/1.1 exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// The admin answered with an error status.
    #[error("admin {path}: {status}: {body}")]
    Status {
        /// Path and query sent.
        path: String,
        /// Status received.
        status: StatusCode,
        /// Body received, trimmed.
        body: String,
    },
}

/// Send one admin request (`skiff node add-cgroup` and friends); returns the body.
pub async fn request(
    admin: SocketAddr,
    method: Method,
    path_and_query: &str,
) -> Result<String, RequestError> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|source| RequestError::Connect { admin, source })?;
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
        return Err(RequestError::Status {
            path: path_and_query.to_owned(),
            status,
            body: body.trim().to_owned(),
        });
    }
    Ok(body)
}
