//! Helpers shared by the in-process HTTP tests (`direct_http*`, `direct_envoy_*`).

use std::convert::Infallible;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The loopback seed scenario: an Istio-generated LDS/RDS/CDS/EDS set whose listener binds
/// 127.0.0.1:50002 and whose endpoints are 127.0.0.11-13:50002.
pub const SEED_SCENARIO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/seed-scenario-loopback"
);

/// Copies the seed scenario's four xDS files into `dir` (a control plane's source directory).
pub fn copy_seed_scenario(dir: &Path) {
    for f in [
        "listeners.json",
        "routes.json",
        "clusters.json",
        "endpoints.json",
    ] {
        std::fs::copy(Path::new(SEED_SCENARIO).join(f), dir.join(f)).unwrap();
    }
}

/// The value of stat `name` from the admin on 127.0.0.1:`admin` (0 when it does not answer
/// or lacks the stat).
pub async fn loopback_stat(admin: u16, name: &str) -> u64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let body = skiff::admin::request(addr, hyper::Method::GET, "/stats")
        .await
        .unwrap_or_default();
    crate::stat_value(&body, name)
}

/// Serves every connection `l` accepts (a task each) with `handle` answering each request:
/// HTTP/1.1, or h2c (HTTP/2 prior knowledge) when `h2c`.
fn serve<H, Fut>(l: tokio::net::TcpListener, h2c: bool, handle: H)
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let io = TokioIo::new(s);
                let _ = if h2c {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                };
            });
        }
    });
}

/// An HTTP/1.1 backend on `l`: `handle` answers each request.
pub fn serve_http1<H, Fut>(l: tokio::net::TcpListener, handle: H)
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    serve(l, false, handle)
}

/// An h2c-only (HTTP/2 prior knowledge) backend on `l`: `handle` answers each request.
pub fn serve_h2c<H, Fut>(l: tokio::net::TcpListener, handle: H)
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    serve(l, true, handle)
}

/// An HTTP/1.1 client connection to 127.0.0.1:`port`, its driver spawned.
pub async fn h1_client(port: u16) -> Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(tx)
}

/// An HTTP/2 prior-knowledge (h2c) client connection to 127.0.0.1:`port`, its driver spawned.
pub async fn h2c_client(
    port: u16,
) -> Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>> {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(tx)
}

/// Sends `req` on `tx` once it is ready; `None` on an error or no response within 5 s.
pub async fn h1_send(
    tx: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    req: hyper::Request<Empty<Bytes>>,
) -> Option<hyper::Response<hyper::body::Incoming>> {
    tx.ready().await.ok()?;
    tokio::time::timeout(Duration::from_secs(5), tx.send_request(req))
        .await
        .ok()?
        .ok()
}

/// [`h1_send`] for an h2c connection.
pub async fn h2c_send(
    tx: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    req: hyper::Request<Empty<Bytes>>,
) -> Option<hyper::Response<hyper::body::Incoming>> {
    tx.ready().await.ok()?;
    tokio::time::timeout(Duration::from_secs(5), tx.send_request(req))
        .await
        .ok()?
        .ok()
}

/// Header `name` of `headers` as text, or `default` when absent or not visible ASCII.
pub fn header_or(headers: &hyper::HeaderMap, name: &str, default: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(default)
        .to_string()
}
