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

/// A blocking HTTP/1.1 backend on a free loopback port: `200 ok` for `GET /`, `404` for
/// anything else; one request per connection.
pub fn blocking_backend() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let status = if got.starts_with(b"GET / ") {
                    "200 OK"
                } else {
                    "404 Not Found"
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
            });
        }
    });
    addr
}

/// One blocking `GET path` (`host: svc`) through 127.0.0.1:`port` on its own connection; the
/// status code.
pub fn blocking_get(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ').nth(1)?.parse().ok()
}

/// One admin call to 127.0.0.1:`admin` from blocking code (a runtime of its own, 5 s bound):
/// the body, or the error as text.
pub fn blocking_admin(admin: u16, method: hyper::Method, path: &str) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            skiff::admin::request(addr, method, path),
        )
        .await
        .map_err(|_| format!("{path}: no answer within 5 s"))?
        .map_err(|e| e.to_string())
    })
}
