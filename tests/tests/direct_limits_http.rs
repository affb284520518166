//! The HTTP connection manager's timeouts and limits and the cluster's circuit breakers and
//! pool limits, end to end through an in-process skiff on a static bootstrap:
//! `stream_idle_timeout` and `request_timeout` (408), `request_headers_timeout` and
//! `common_http_protocol_options.idle_timeout` (the connection closes),
//! `max_requests_per_connection` (`connection: close` on the last response),
//! `max_pending_requests` and HTTP `max_connections` (one connection, one waiting request, the
//! next 503), HIGH-priority thresholds, and the cluster's `max_requests_per_connection` and
//! `idle_timeout` on pooled upstream connections. Each with Envoy's stat.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use skiff_tests::{
    InProcessSkiff, free_port, lb_endpoints_yaml, loopback_stat as stat, run_options,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);
/// The slow backend answers after this; a reply well before it came from a skiff timer.
const SLOW: Duration = Duration::from_millis(2000);
/// How long `/wait` holds a request (and its connection or breaker slot).
const HOLD: Duration = Duration::from_millis(1000);
/// The gap between requests that must find the earlier ones in flight.
const GAP: Duration = Duration::from_millis(300);

/// What a backend saw: connections accepted and closed.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

/// An HTTP/1.1 backend: `/slow*` answers after [`SLOW`], `/wait*` after [`HOLD`], anything else
/// at once, after reading the whole request body.
async fn backend() -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = s2.clone();
            seen.accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_string();
                    let _ = req.into_body().collect().await;
                    if path.starts_with("/slow") {
                        tokio::time::sleep(SLOW).await;
                    } else if path.starts_with("/wait") {
                        tokio::time::sleep(HOLD).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
                seen.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

fn cluster(name: &str, ep: SocketAddr, extra: &str) -> String {
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n{extra}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{}",
        lb_endpoints_yaml(&[ep])
    )
}

/// An HCM listener on `port` with extra HCM fields `hcm` (indented 10) and `routes` (YAML
/// list items indented 14).
fn hcm_listener(name: &str, port: u16, hcm: &str, routes: &str) -> String {
    format!(
        r#"  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
{hcm}          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: {name}
            virtual_hosts:
            - name: {name}
              domains: ["*"]
              routes:
{routes}"#
    )
}

/// A kept-alive HTTP/1.1 client connection.
async fn client(port: u16) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// GET `path` on a new connection: status, `connection` header, body.
async fn get(port: u16, path: &str) -> (StatusCode, String) {
    let mut tx = client(port).await;
    send(&mut tx, path).await
}

async fn send(
    tx: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
) -> (StatusCode, String) {
    tx.ready().await.unwrap();
    let req = Request::get(path)
        .header("host", "t.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .expect("answer in time")
        .expect("response head");
    let status = resp.status();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes());
    (
        status,
        String::from_utf8_lossy(&body.unwrap_or_default()).into_owned(),
    )
}

/// A raw connection to 127.0.0.1:`port` that has written `bytes`.
async fn sent(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// The first bytes the server answers on `s` (within `WAIT`), lowercased.
async fn first_read(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase()
}

/// Waits until the server closes `s`: how long that took (`None`: still open after `WAIT`).
async fn closed_after(s: &mut TcpStream) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_manager_timeouts_limits_and_breakers() {
    let (be, _) = backend().await;
    let (cb_be, cb_seen) = backend().await;
    let (pool_be, pool_seen) = backend().await;
    let (timers, reqto, cb) = (free_port(), free_port(), free_port());
    let admin = free_port();
    let listeners = [
        hcm_listener(
            "timers",
            timers,
            "          stream_idle_timeout: 0.3s\n          common_http_protocol_options: { idle_timeout: 0.3s, max_requests_per_connection: 2 }\n",
            "              - { match: { prefix: / }, route: { cluster: be, timeout: 0s } }\n",
        ),
        hcm_listener(
            "reqto",
            reqto,
            "          request_timeout: 0.3s\n          request_headers_timeout: 0.3s\n",
            "              - { match: { prefix: / }, route: { cluster: be, timeout: 0s } }\n",
        ),
        hcm_listener(
            "cb",
            cb,
            "",
            "              - { match: { prefix: /wait }, route: { cluster: cb } }\n              - { match: { prefix: /low }, route: { cluster: tight, prefix_rewrite: /wait } }\n              - { match: { prefix: /high }, route: { cluster: tight, prefix_rewrite: /wait, priority: HIGH } }\n              - { match: { prefix: /pool }, route: { cluster: pooled } }\n",
        ),
    ]
    .concat();
    let pooled = r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: { idle_timeout: 0.3s, max_requests_per_connection: 2 }
        explicit_http_config: { http_protocol_options: {} }
"#;
    let clusters = [
        cluster("be", be, ""),
        cluster(
            "cb",
            cb_be,
            "    circuit_breakers: { thresholds: [ { max_connections: 1, max_pending_requests: 1 } ] }\n",
        ),
        cluster(
            "tight",
            be,
            "    circuit_breakers: { thresholds: [ { max_requests: 1 }, { priority: HIGH, max_requests: 10 } ] }\n",
        ),
        cluster("pooled", pool_be, pooled),
    ]
    .concat();
    let yaml = format!(
        "node: {{ id: hl, cluster: hl }}\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\nstatic_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}"
    );
    let boot = skiff::config::parse(&yaml, "<http-limits>").expect("bootstrap");
    let mut opts = run_options(boot);
    // One worker: the breaker case counts requests queued on one pool. With several, each
    // worker's pool opens its first connection even at the limit (Envoy's rule for a pool
    // without connections), so the same three requests would spread differently.
    opts.concurrency = 1;
    let skiff = InProcessSkiff::start(opts);
    let deadline = Instant::now() + WAIT;
    for p in [timers, reqto, cb] {
        while TcpStream::connect(("127.0.0.1", p)).await.is_err() {
            assert!(Instant::now() < deadline, "listener {p} never bound");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // stream_idle_timeout 300 ms: the slow answer is cut with Envoy's 408.
    let t = Instant::now();
    let (status, body) = get(timers, "/slow").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::REQUEST_TIMEOUT, "stream timeout")
    );
    assert!(
        t.elapsed() < SLOW - Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        stat(admin, "http.timers.downstream_rq_idle_timeout").await,
        1
    );

    // max_requests_per_connection 2: the second response says `connection: close` and the
    // connection ends.
    let mut s = sent(
        timers,
        b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nhost: t\r\n\r\n",
    )
    .await;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut all)).await;
    let text = String::from_utf8_lossy(&all).to_ascii_lowercase();
    assert_eq!(text.matches("http/1.1 200").count(), 2, "{text}");
    assert_eq!(text.matches("connection: close").count(), 1, "{text}");
    assert_eq!(
        stat(admin, "http.timers.downstream_cx_max_requests_reached").await,
        1
    );

    // common_http_protocol_options.idle_timeout 300 ms: a kept-alive connection without
    // requests is closed.
    let mut s = sent(timers, b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n").await;
    let took = closed_after(&mut s)
        .await
        .expect("an idle connection must be closed");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(stat(admin, "http.timers.downstream_cx_idle_timeout").await >= 1);

    // request_headers_timeout 300 ms: a head that never completes ends the connection.
    let mut s = sent(reqto, b"GET /a HTTP/1.1\r\nhost: t\r\n").await;
    let took = closed_after(&mut s)
        .await
        .expect("an incomplete head must end the connection");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(
        stat(admin, "http.reqto.downstream_rq_header_timeout").await,
        1
    );
    // It runs from a head's first byte, as Envoy's: a kept-alive connection may wait longer
    // than it between requests.
    let mut tx = client(reqto).await;
    assert_eq!(send(&mut tx, "/a").await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(send(&mut tx, "/b").await.0, StatusCode::OK);

    // max_headers_count (Envoy's default 100): a request with more headers gets 431.
    let many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let mut s = sent(
        reqto,
        format!("GET /a HTTP/1.1\r\nhost: t\r\n{many}\r\n").as_bytes(),
    )
    .await;
    let head = first_read(&mut s).await;
    assert!(head.starts_with("http/1.1 431"), "{head}");

    // request_timeout 300 ms: a body that stops arriving gets 408 `request timeout`.
    let mut s = sent(
        reqto,
        b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nab",
    )
    .await;
    let t = Instant::now();
    let head = first_read(&mut s).await;
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(head.contains("request timeout"), "{head}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(stat(admin, "http.reqto.downstream_rq_timeout").await, 1);

    // max_connections 1 + max_pending_requests 1: the first request holds the connection,
    // the second waits for it, the third overflows (503).
    let first = tokio::spawn(get(cb, "/wait"));
    tokio::time::sleep(GAP).await;
    let second = tokio::spawn(get(cb, "/wait"));
    tokio::time::sleep(GAP).await;
    let (status, body) = get(cb, "/wait").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.ends_with("overflow"), "{body}");
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert_eq!(second.await.unwrap().0, StatusCode::OK);
    assert_eq!(
        cb_seen.accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
    assert_eq!(
        stat(admin, "cluster.cb.upstream_rq_pending_overflow").await,
        1
    );
    assert!(stat(admin, "cluster.cb.upstream_cx_overflow").await >= 1);

    // HIGH priority: max_requests 1 for DEFAULT routes, 10 for HIGH ones.
    let low = tokio::spawn(get(cb, "/low"));
    tokio::time::sleep(GAP).await;
    assert_eq!(get(cb, "/low").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(low.await.unwrap().0, StatusCode::OK);
    let high = tokio::spawn(get(cb, "/high"));
    tokio::time::sleep(GAP).await;
    assert_eq!(get(cb, "/high").await.0, StatusCode::OK);
    assert_eq!(high.await.unwrap().0, StatusCode::OK);

    // The cluster's max_requests_per_connection 2: three requests need two connections.
    let mut tx = client(cb).await;
    for _ in 0..3 {
        assert_eq!(send(&mut tx, "/pool").await.0, StatusCode::OK);
    }
    assert_eq!(pool_seen.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(
        stat(admin, "cluster.pooled.upstream_cx_max_requests").await,
        1
    );
    // ...and its idle_timeout 300 ms closes the kept-alive one.
    let deadline = Instant::now() + Duration::from_secs(3);
    while pool_seen.closed.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the idle upstream connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stat(admin, "cluster.pooled.upstream_cx_idle_timeout").await,
        1
    );
    skiff.stop().await.unwrap();
}

/// A listener that stops accepting (shutdown) drains its HTTP connections: a kept-alive
/// HTTP/1.1 connection with no request in flight is closed at once instead of lingering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_kept_alive_connections() {
    let (be, _) = backend().await;
    let port = free_port();
    let listeners = hcm_listener(
        "drain",
        port,
        "",
        "              - { match: { prefix: / }, route: { cluster: be } }\n",
    );
    let yaml = format!(
        "node: {{ id: d, cluster: d }}\nstatic_resources:\n  listeners:\n{listeners}  clusters:\n{}",
        cluster("be", be, "")
    );
    let boot = skiff::config::parse(&yaml, "<drain>").expect("bootstrap");
    let skiff = InProcessSkiff::start(run_options(boot));
    let deadline = Instant::now() + WAIT;
    let mut s = loop {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)).await {
            break s;
        }
        assert!(Instant::now() < deadline, "listener never bound");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    s.write_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    skiff.stop().await.unwrap();
    // skiff's tasks share this runtime: without the drain the connection would stay open.
    let took = closed_after(&mut s)
        .await
        .expect("a draining listener closes its idle HTTP connections");
    assert!(took < Duration::from_secs(2), "{took:?}");
}
