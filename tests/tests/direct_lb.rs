//! Load balancing, outlier detection and circuit breakers end to end, unprivileged and
//! in-process: skiff from a static bootstrap, real loopback HTTP and TCP backends, admin
//! `/stats` and `/clusters` read as a user would.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use skiff_tests::{
    InProcessSkiff, free_addr, free_port, lb_endpoints_yaml, run_options, tcp_proxy_listener_yaml,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(15);

/// An HTTP/1.1 backend answering `name` with the status in `status`, after `delay`.
async fn http_backend(name: &'static str, status: Arc<AtomicU16>, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let status = status.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    let status = status.load(Ordering::Relaxed);
                    async move {
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(name.as_bytes())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn cluster_yaml(name: &str, policy: &str, extra: &str, eps: &[SocketAddr]) -> String {
    let eps = lb_endpoints_yaml(eps);
    format!(
        r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    lb_policy: {policy}
{extra}    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
{eps}"#
    )
}

fn http_listener(port: u16, cluster: &str) -> String {
    format!(
        r#"  - name: http_{cluster}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {cluster}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            name: inline
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                route: {{ cluster: {cluster} }}
"#
    )
}

fn tcp_listener(port: u16, cluster: &str) -> String {
    tcp_proxy_listener_yaml(&format!("tcp_{cluster}"), port, cluster, cluster)
}

struct Skiff {
    admin: SocketAddr,
    running: InProcessSkiff,
}

impl Skiff {
    async fn start(listeners: &[String], clusters: &[String], wait_ports: &[u16]) -> Skiff {
        let admin_port = free_port();
        let yaml = format!(
            "node: {{ id: lb-test, cluster: lb-test }}\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}\nstatic_resources:\n  listeners:\n{}  clusters:\n{}",
            listeners.concat(),
            clusters.concat()
        );
        let boot = skiff::config::parse(&yaml, "<direct_lb>").expect("bootstrap must parse");
        let running = InProcessSkiff::start(run_options(boot));
        let deadline = Instant::now() + WAIT;
        for p in wait_ports {
            while TcpStream::connect(("127.0.0.1", *p)).await.is_err() {
                assert!(Instant::now() < deadline, "listener {p} never bound");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Skiff {
            admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            running,
        }
    }

    async fn get(&self, path: &str) -> String {
        skiff::admin::request(self.admin, hyper::Method::GET, path)
            .await
            .unwrap_or_default()
    }

    async fn stat(&self, name: &str) -> u64 {
        skiff_tests::stat_value(&self.get("/stats").await, name)
    }

    /// `health_flags` of `host` in `cluster` as `/clusters` prints it.
    async fn health_flags(&self, cluster: &str, host: SocketAddr) -> String {
        let body = self.get("/clusters").await;
        let prefix = format!("{cluster}::{host}::health_flags::");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("<absent>")
            .to_string()
    }

    async fn stop(self) {
        let _ = self.running.stop().await;
    }
}

/// One GET over a fresh HTTP/1.1 connection: (status, body).
async fn get(port: u16) -> (StatusCode, String) {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "lb.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), tx.send_request(req))
        .await
        .expect("answer in time")
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_is_ejected_and_returns_after_base_ejection_time() {
    let good = http_backend("good", Arc::new(AtomicU16::new(200)), Duration::ZERO).await;
    let bad_status = Arc::new(AtomicU16::new(503));
    let bad = http_backend("bad", bad_status.clone(), Duration::ZERO).await;
    let port = free_port();
    let od = "    outlier_detection: { consecutive_5xx: 3, interval: 0.1s, base_ejection_time: 1s, max_ejection_percent: 50 }\n";
    let skiff = Skiff::start(
        &[http_listener(port, "pool")],
        &[cluster_yaml("pool", "ROUND_ROBIN", od, &[good, bad])],
        &[port],
    )
    .await;

    // Round robin alternates; the 3rd consecutive 503 from `bad` ejects it.
    let mut failures = 0;
    for _ in 0..12 {
        let (status, _) = get(port).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "exactly consecutive_5xx failures before the ejection"
    );
    assert_eq!(
        skiff.health_flags("pool", bad).await,
        "/failed_outlier_check"
    );
    assert_eq!(skiff.health_flags("pool", good).await, "healthy");
    assert_eq!(
        skiff
            .stat("cluster.pool.outlier_detection.ejections_enforced_consecutive_5xx")
            .await,
        1
    );
    assert_eq!(
        skiff
            .stat("cluster.pool.outlier_detection.ejections_active")
            .await,
        1
    );
    let json: serde_json::Value =
        serde_json::from_str(&skiff.get("/clusters?format=json").await).unwrap();
    let flagged: Vec<String> = json["cluster_statuses"][0]["host_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["health_status"]["failed_outlier_check"] == true)
        .map(|h| h["address"]["socket_address"]["port_value"].to_string())
        .collect();
    assert_eq!(flagged, vec![bad.port().to_string()], "{json}");
    let ejected_at = Instant::now();
    for _ in 0..10 {
        let (status, body) = get(port).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "good"),
            "ejected host not used"
        );
    }

    // The backend recovers; after base_ejection_time (1 s, first ejection) the next interval
    // brings it back.
    bad_status.store(200, Ordering::Relaxed);
    let deadline = Instant::now() + WAIT;
    while skiff.health_flags("pool", bad).await != "healthy" {
        assert!(Instant::now() < deadline, "bad host never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back_after = ejected_at.elapsed();
    assert!(
        back_after >= Duration::from_millis(800),
        "back too early: {back_after:?}"
    );
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let (status, body) = get(port).await;
        assert_eq!(status, StatusCode::OK);
        *seen.entry(body).or_insert(0) += 1;
    }
    assert_eq!(seen.get("bad"), Some(&5), "{seen:?}");
    assert_eq!(
        skiff
            .stat("cluster.pool.outlier_detection.ejections_active")
            .await,
        0
    );
    skiff.stop().await;
}

/// A TCP backend that greets each connection and keeps it open until the client closes.
async fn holding_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"hi").await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_overflow_is_503_for_http_and_a_closed_connection_for_tcp() {
    let slow = http_backend(
        "slow",
        Arc::new(AtomicU16::new(200)),
        Duration::from_millis(600),
    )
    .await;
    let hold = holding_backend().await;
    let http_port = free_port();
    let tcp_port = free_port();
    let cb_rq = "    circuit_breakers: { thresholds: [ { max_requests: 1 } ] }\n";
    let cb_cx = "    circuit_breakers: { thresholds: [ { max_connections: 1 } ] }\n";
    let skiff = Skiff::start(
        &[
            http_listener(http_port, "rq1"),
            tcp_listener(tcp_port, "cx1"),
        ],
        &[
            cluster_yaml("rq1", "ROUND_ROBIN", cb_rq, &[slow]),
            cluster_yaml("cx1", "ROUND_ROBIN", cb_cx, &[hold]),
        ],
        &[http_port],
    )
    .await;
    // The readiness probe of `start` only touched the HTTP port; the TCP one is bound too.

    // HTTP: two requests at once on a cluster allowing one: the second gets Envoy's 503.
    let (a, b) = tokio::join!(get(http_port), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        get(http_port).await
    });
    assert_eq!(a.0, StatusCode::OK, "{a:?}");
    assert_eq!(b.0, StatusCode::SERVICE_UNAVAILABLE, "{b:?}");
    assert!(b.1.contains("overflow"), "{b:?}");
    assert_eq!(
        skiff.stat("cluster.rq1.upstream_rq_pending_overflow").await,
        1
    );

    // TCP: the first connection holds the only slot (its greeting proves it is proxied) ...
    let mut first = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    let mut hi = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), first.read_exact(&mut hi))
        .await
        .expect("greeting in time")
        .unwrap();
    assert_eq!(&hi, b"hi");
    // ... so the second is closed without reaching the backend.
    let mut second = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "overflowed connection got {buf:?}");
    assert_eq!(skiff.stat("cluster.cx1.upstream_cx_overflow").await, 1);
    // Closing the first frees the slot.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut again = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
        let mut hi = [0u8; 2];
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), again.read_exact(&mut hi)).await
        {
            break;
        }
        assert!(Instant::now() < deadline, "slot never released");
    }
    skiff.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_sends_fewer_requests_to_a_slow_backend() {
    let fast = http_backend("fast", Arc::new(AtomicU16::new(200)), Duration::ZERO).await;
    let slow = http_backend(
        "slow",
        Arc::new(AtomicU16::new(200)),
        Duration::from_millis(500),
    )
    .await;
    let port = free_port();
    let skiff = Skiff::start(
        &[http_listener(port, "lr")],
        &[cluster_yaml("lr", "LEAST_REQUEST", "", &[fast, slow])],
        &[port],
    )
    .await;
    // 16 clients, 16 requests each, all at once.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..16 {
                let (status, body) = get(port).await;
                assert_eq!(status, StatusCode::OK);
                got.push(body);
            }
            got
        }));
    }
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for t in tasks {
        for b in t.await.unwrap() {
            *seen.entry(b).or_default() += 1;
        }
    }
    let slow_n = seen.get("slow").copied().unwrap_or(0);
    let fast_n = seen.get("fast").copied().unwrap_or(0);
    assert_eq!(slow_n + fast_n, 256);
    eprintln!("LEAST_REQUEST split with a 500 ms backend: {seen:?}");
    // Round robin would send 128 to each. Two random choices, the busier one skipped: while
    // the slow host has requests in flight it is picked only when both choices fall on it
    // (1/4; the first burst, with nothing in flight, splits evenly), so its share stays well
    // below half (measured 25-33% here; round robin: 50%).
    assert!(slow_n < 115, "slow backend got {slow_n} of 256 ({seen:?})");
    assert!(slow_n > 0, "P2C still samples the slow host ({seen:?})");
    skiff.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_http_health_check_takes_a_failing_host_out_and_back() {
    let ok = http_backend("ok", Arc::new(AtomicU16::new(200)), Duration::ZERO).await;
    let sick_status = Arc::new(AtomicU16::new(503));
    let sick = http_backend("sick", sick_status.clone(), Duration::ZERO).await;
    let port = free_port();
    let hc = "    health_checks:\n    - { timeout: 1s, interval: 0.1s, no_traffic_interval: 0.1s, unhealthy_threshold: 2, healthy_threshold: 2, http_health_check: { path: /healthz } }\n";
    let skiff = Skiff::start(
        &[http_listener(port, "hc")],
        &[cluster_yaml("hc", "ROUND_ROBIN", hc, &[ok, sick])],
        &[port],
    )
    .await;
    // A new host is healthy after its first pass; one that fails its first check stays out.
    let deadline = Instant::now() + WAIT;
    loop {
        let (a, b) = (
            skiff.health_flags("hc", ok).await,
            skiff.health_flags("hc", sick).await,
        );
        if a == "healthy" && b == "/failed_active_hc" {
            break;
        }
        assert!(Instant::now() < deadline, "ok={a} sick={b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let (status, body) = get(port).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    assert!(skiff.stat("cluster.hc.health_check.failure").await >= 1);
    assert_eq!(skiff.stat("cluster.hc.health_check.healthy").await, 1);

    // Recovered: `healthy_threshold` passes in a row bring it back.
    sick_status.store(200, Ordering::Relaxed);
    let deadline = Instant::now() + WAIT;
    while skiff.health_flags("hc", sick).await != "healthy" {
        assert!(Instant::now() < deadline, "sick host never passed again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let (_, body) = get(port).await;
        *seen.entry(body).or_insert(0) += 1;
    }
    assert_eq!(seen.get("sick"), Some(&5), "{seen:?}");
    skiff.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_failures_eject_the_dead_endpoint() {
    let alive = holding_backend().await;
    // A port nothing listens on: connects are refused.
    let dead = free_addr();
    let port = free_port();
    let od = "    outlier_detection: { consecutive_5xx: 2, interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50 }\n";
    let skiff = Skiff::start(
        &[tcp_listener(port, "l4")],
        &[cluster_yaml("l4", "ROUND_ROBIN", od, &[alive, dead])],
        &[port],
    )
    .await;
    // The readiness probe already made one connection through the proxy.
    let mut refused = 0;
    for _ in 0..12 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut hi = [0u8; 2];
        match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hi)).await {
            Ok(Ok(_)) => assert_eq!(&hi, b"hi"),
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("no answer and no close"),
        }
    }
    assert!(refused <= 2, "{refused} connections hit the dead endpoint");
    assert_eq!(
        skiff.health_flags("l4", dead).await,
        "/failed_outlier_check"
    );
    let clusters = skiff.get("/clusters").await;
    assert!(
        clusters.contains(&format!("l4::{dead}::cx_connect_fail::2")),
        "{clusters}"
    );
    assert_eq!(
        skiff
            .stat("cluster.l4.outlier_detection.ejections_enforced_consecutive_5xx")
            .await,
        1
    );
    skiff.stop().await;
}
