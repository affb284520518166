//! Route timers, request replay and connection-manager headers end to end, from a static
//! bootstrap whose HTTP connection manager carries an inline `route_config` (no RDS): the
//! route `timeout` (504), `per_try_timeout` with a retry to another host, `idle_timeout` on a
//! stalled response body, a POST body replayed on retry, `use_remote_address` appending to
//! `x-forwarded-for`, `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%` in a configured header, and
//! WebSocket-style upgrades (a byte tunnel after 101; 403 where a route disables them).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use skiff_tests::{InProcessSkiff, free_port, header_or, loopback_stat as stat, run_options};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(15);
/// The slow and stalling backends take 2 s; an answer before this came from a skiff timer
/// (generous, so a loaded machine does not fail the test).
const CUT: Duration = Duration::from_millis(1800);

/// How a test backend behaves.
#[derive(Clone, Copy)]
enum Kind {
    /// Waits this long, then answers 200 `slow`.
    Slow(Duration),
    /// Answers 503 (after reading the body).
    Fail,
    /// Answers 200 with `<x-forwarded-for>|<x-peer>|<request body>`.
    Echo,
    /// Sends the head and one chunk, then stalls for 2 s before the end.
    Stall,
    /// Accepts `Upgrade: websocket` with 101, then echoes raw bytes.
    Upgrade,
    /// Answers 200 at once and echoes each request body chunk as it arrives.
    Stream,
}

/// A body fed chunk by chunk from a channel.
struct Chan(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Chan {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// A response body: one chunk, a 2 s stall, one more chunk, the end.
struct Stall {
    step: u8,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Stall {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.step {
            0 => {
                self.step = 1;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
            }
            1 => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.step = 2;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"late")))))
                }
                Poll::Pending => Poll::Pending,
            },
            _ => Poll::Ready(None),
        }
    }
}

type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(kind: Kind, mut req: Request<Incoming>) -> Response<RespBody> {
    if let Kind::Stream = kind {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut body = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(d) = f.into_data()
                    && tx.send(d).await.is_err()
                {
                    break;
                }
            }
        });
        return Response::new(Chan(rx).boxed());
    }
    if let Kind::Upgrade = kind {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
    }
    let h = |n: &str| header_or(req.headers(), n, "");
    let (xff, peer) = (h("x-forwarded-for"), h("x-peer"));
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
    match kind {
        Kind::Slow(d) => {
            tokio::time::sleep(d).await;
            Response::new(Full::new(Bytes::from("slow")).boxed())
        }
        Kind::Fail => Response::builder()
            .status(503)
            .body(Full::new(Bytes::from("fail")).boxed())
            .unwrap(),
        Kind::Echo => Response::new(Full::new(Bytes::from(format!("{xff}|{peer}|{body}"))).boxed()),
        Kind::Upgrade | Kind::Stream => unreachable!("answered above"),
        Kind::Stall => Response::new(
            Stall {
                step: 0,
                sleep: Box::pin(tokio::time::sleep(Duration::from_secs(2))),
            }
            .boxed(),
        ),
    }
}

async fn backend(kind: Kind) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let hits = h2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    hits.fetch_add(1, Ordering::Relaxed);
                    async move { Ok::<_, Infallible>(answer(kind, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, hits)
}

fn cluster(name: &str, eps: &[SocketAddr]) -> String {
    let eps: Vec<String> = eps
        .iter()
        .map(|a| {
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
{}
"#,
        eps.join("\n")
    )
}

/// `count` requests on one kept-alive connection: (status, body or the body error).
async fn call(
    port: u16,
    method: &str,
    path: &str,
    body: &'static str,
) -> (StatusCode, Result<String, String>) {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "t.example")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .expect("answer in time")
        .expect("response head");
    let status = resp.status();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| e.to_string());
    (status, body)
}

/// A WebSocket-style upgrade through the proxy: after 101, bytes written come back (the backend
/// echoes them). Returns what was read, or `None` when the upgrade did not happen.
async fn websocket(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (mut tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(c.with_upgrades());
    let req = Request::get(path)
        .header("host", "t.example")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .ok()?
        .ok()?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return None;
    }
    let mut io = TokioIo::new(
        tokio::time::timeout(WAIT, hyper::upgrade::on(resp))
            .await
            .ok()?
            .ok()?,
    );
    io.write_all(b"ping-pong").await.ok()?;
    let mut buf = vec![0u8; 9];
    tokio::time::timeout(WAIT, io.read_exact(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timers_replay_and_forwarded_headers() {
    let (slow, _) = backend(Kind::Slow(Duration::from_secs(2))).await;
    let (fail, fail_hits) = backend(Kind::Fail).await;
    let (echo, echo_hits) = backend(Kind::Echo).await;
    let (stall, _) = backend(Kind::Stall).await;
    let (ws, _) = backend(Kind::Upgrade).await;
    let (stream, _) = backend(Kind::Stream).await;
    let port = free_port();
    let admin = free_port();
    let yaml = format!(
        r#"
node: {{ id: timers, cluster: timers }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: timers
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: timers
          use_remote_address: true
          upgrade_configs: [ {{ upgrade_type: websocket }} ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: inline
            virtual_hosts:
            - name: t
              domains: ["*"]
              request_headers_to_add:
              - header: {{ key: x-peer, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%" }}
              routes:
              - match: {{ prefix: /grpc }}
                route: {{ cluster: slow, timeout: 0s, max_grpc_timeout: 0s }}
              - match: {{ prefix: /timeout }}
                route: {{ cluster: slow, timeout: 0.2s }}
              - match: {{ prefix: /pertry }}
                route:
                  cluster: slow_or_echo
                  timeout: 5s
                  retry_policy: {{ retry_on: reset, num_retries: 1, per_try_timeout: 0.2s,
                    retry_host_predicate: [ {{ name: envoy.retry_host_predicates.previous_hosts }} ],
                    host_selection_retry_max_attempts: 3 }}
              - match: {{ prefix: /idle }}
                route: {{ cluster: stall, idle_timeout: 0.3s, timeout: 0s }}
              - match: {{ prefix: /replay }}
                route:
                  cluster: fail_or_echo
                  retry_policy: {{ retry_on: 5xx, num_retries: 1,
                    retry_host_predicate: [ {{ name: envoy.retry_host_predicates.previous_hosts }} ],
                    host_selection_retry_max_attempts: 3 }}
              - match: {{ prefix: /echo }}
                route: {{ cluster: echo }}
              - match: {{ prefix: /stream }}
                route: {{ cluster: stream, timeout: 0s, retry_policy: {{ retry_on: 5xx, num_retries: 1 }} }}
              - match: {{ prefix: /ws }}
                route: {{ cluster: ws }}
              - match: {{ prefix: /nows }}
                route: {{ cluster: ws, upgrade_configs: [ {{ upgrade_type: websocket, enabled: false }} ] }}
  clusters:
{}{}{}{}{}{}{}"#,
        cluster("slow", &[slow]),
        cluster("slow_or_echo", &[slow, echo]),
        cluster("stall", &[stall]),
        cluster("fail_or_echo", &[fail, echo]),
        cluster("echo", &[echo]),
        cluster("ws", &[ws]),
        cluster("stream", &[stream]),
    );
    let boot = skiff::config::parse(&yaml, "<timers>").expect("bootstrap with inline routes");
    let skiff = InProcessSkiff::start(run_options(boot));
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "listener never bound");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Inline route config, use_remote_address and a formatter in a configured header.
    let (status, body) = call(port, "GET", "/echo", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), "127.0.0.1|127.0.0.1|");

    // The route timeout: 504 with Envoy's text after ~0.2 s, not the backend's 2 s.
    let t = Instant::now();
    let (status, body) = call(port, "GET", "/timeout", "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body.unwrap(), skiff::http::UPSTREAM_TIMEOUT);
    assert!(t.elapsed() < CUT, "{:?}", t.elapsed());
    assert_eq!(stat(admin, "cluster.slow.upstream_rq_timeout").await, 1);

    // max_grpc_timeout 0s (as Istio sets it): a gRPC request's grpc-timeout is its timeout.
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(c);
    let t = Instant::now();
    let req = Request::post("/grpc")
        .header("host", "t.example")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "150m")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(t.elapsed() < CUT, "{:?}", t.elapsed());

    // per_try_timeout: an attempt on the slow host is cut after 0.2 s and retried on the other.
    for _ in 0..4 {
        let t = Instant::now();
        let (status, body) = call(port, "GET", "/pertry", "").await;
        assert_eq!(
            (status, body.unwrap().as_str()),
            (StatusCode::OK, "127.0.0.1|127.0.0.1|")
        );
        assert!(t.elapsed() < CUT, "{:?}", t.elapsed());
    }
    assert!(stat(admin, "cluster.slow_or_echo.upstream_rq_per_try_timeout").await >= 1);
    assert!(stat(admin, "cluster.slow_or_echo.upstream_rq_retry").await >= 1);

    // A POST body replayed: the 503 host read it, the retry carries it again.
    let before = (
        fail_hits.load(Ordering::Relaxed),
        echo_hits.load(Ordering::Relaxed),
    );
    for _ in 0..4 {
        let (status, body) = call(port, "POST", "/replay", "payload-123").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), "127.0.0.1|127.0.0.1|payload-123");
    }
    assert!(
        fail_hits.load(Ordering::Relaxed) > before.0,
        "the 503 host was tried"
    );
    assert_eq!(echo_hits.load(Ordering::Relaxed) - before.1, 4);

    // idle_timeout: the head and first chunk arrive, then the stalled body is cut.
    let t = Instant::now();
    let (status, body) = call(port, "GET", "/idle", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_err(), "the stalled body must fail: {body:?}");
    assert!(t.elapsed() < CUT, "{:?}", t.elapsed());

    // A request body streams upstream even with a retry policy (the replay copy does not hold
    // it back): each chunk is echoed before the next one is sent.
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(c);
    let (chunks, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    chunks.send(Bytes::from_static(b"one")).await.unwrap();
    let req = Request::post("/stream")
        .header("host", "t.example")
        .body(Chan(rx))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .expect("response head while the request body is still open")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut next = async || {
        let f = tokio::time::timeout(WAIT, body.frame()).await.ok()??.ok()?;
        f.into_data().ok()
    };
    assert_eq!(next().await.as_deref(), Some(&b"one"[..]));
    chunks.send(Bytes::from_static(b"two")).await.unwrap();
    assert_eq!(next().await.as_deref(), Some(&b"two"[..]));
    drop(chunks);

    // Upgrades: 101 and a byte tunnel where enabled; 403 where the route disables them.
    assert_eq!(websocket(port, "/ws").await, Some("ping-pong".to_string()));
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(c.with_upgrades());
    let req = Request::get("/nows")
        .header("host", "t.example")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    skiff.stop().await.unwrap();
}
