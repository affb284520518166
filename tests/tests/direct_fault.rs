//! The HTTP fault filter end to end (issue 14), unprivileged and in-process: a static listener
//! whose connection manager carries `envoy.filters.http.fault` with header-controlled faults,
//! and routes that override it per route (`typed_per_filter_config`, the shape Istio's
//! VirtualService `fault` compiles to): a 50 % abort, a fixed delay, a gRPC abort.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use skiff_tests::{InProcessSkiff, free_port, h1_client, h1_send, loopback_stat, run_options};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);

fn bootstrap(listen: u16, admin: u16, backend: SocketAddr) -> String {
    let fault = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
    format!(
        r#"
node: {{ id: fault-test, cluster: fault-test }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: front
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          http_filters:
          - name: envoy.filters.http.fault
            typed_config:
              "@type": {fault}
              abort: {{ header_abort: {{}}, percentage: {{ numerator: 100 }} }}
              delay: {{ header_delay: {{}}, percentage: {{ numerator: 100 }} }}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: /abort50 }}
                route: {{ cluster: svc }}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": {fault}
                    abort: {{ http_status: 503, percentage: {{ numerator: 50 }} }}
              - match: {{ prefix: /delay }}
                route: {{ cluster: svc }}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": {fault}
                    delay: {{ fixed_delay: 0.3s, percentage: {{ numerator: 1000000, denominator: MILLION }} }}
              - match: {{ prefix: /grpc }}
                route: {{ cluster: svc }}
                typed_per_filter_config:
                  envoy.filters.http.fault:
                    "@type": {fault}
                    abort: {{ grpc_status: 14, percentage: {{ numerator: 100 }} }}
              - match: {{ prefix: / }}
                route: {{ cluster: svc }}
  clusters:
  - name: svc
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: svc
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }} }} ] }} ]
"#,
        backend.ip(),
        backend.port()
    )
}

/// One request on a fresh connection: (status, grpc-status, time taken).
async fn get(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(StatusCode, Option<String>, Duration)> {
    let mut tx = h1_client(port).await?;
    let mut req = Request::get(path).header("host", "svc");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let started = Instant::now();
    let resp = h1_send(&mut tx, req.body(Empty::<Bytes>::new()).ok()?).await?;
    let status = resp.status();
    let grpc = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    resp.into_body().collect().await.ok()?;
    Some((status, grpc, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_filter_aborts_and_delays_as_envoy() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    skiff_tests::serve_http1(l, |_req| async {
        Response::new(Full::new(Bytes::from_static(b"backend")))
    });
    let (listen, admin) = (free_port(), free_port());
    let boot = skiff::config::parse(&bootstrap(listen, admin, backend), "<fault>").unwrap();
    let skiff = InProcessSkiff::start(run_options(boot));
    let deadline = Instant::now() + WAIT;
    while get(listen, "/", &[]).await.map(|a| a.0) != Some(StatusCode::OK) {
        assert!(Instant::now() < deadline, "the listener never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Header-controlled faults act only when the request asks.
    let (s, _, _) = get(listen, "/", &[("x-envoy-fault-abort-request", "429")])
        .await
        .unwrap();
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    let (s, _, took) = get(listen, "/", &[("x-envoy-fault-delay-request", "200")])
        .await
        .unwrap();
    assert_eq!(s, StatusCode::OK);
    assert!(took >= Duration::from_millis(200), "header delay: {took:?}");
    // A header percentage of 0 turns the header abort off.
    let (s, _, _) = get(
        listen,
        "/",
        &[
            ("x-envoy-fault-abort-request", "429"),
            ("x-envoy-fault-abort-request-percentage", "0"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(s, StatusCode::OK);

    // Route override: a fixed 300 ms delay on every request, then the upstream answers.
    let (s, _, took) = get(listen, "/delay", &[]).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert!(took >= Duration::from_millis(300), "fixed delay: {took:?}");

    // gRPC abort: trailers-only 200 with grpc-status 14.
    let (s, grpc, _) = get(listen, "/grpc", &[]).await.unwrap();
    assert_eq!((s, grpc.as_deref()), (StatusCode::OK, Some("14")));

    // 50 % abort over N requests: within 6 standard deviations of N/2 (sd = sqrt(N)/2).
    const N: u64 = 400;
    let mut aborted = 0;
    let mut tx = h1_client(listen).await.unwrap();
    for _ in 0..N {
        let req = Request::get("/abort50")
            .header("host", "svc")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h1_send(&mut tx, req).await.expect("answer");
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => aborted += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        (140..=260).contains(&aborted),
        "{aborted} of {N} aborted; expected about half"
    );

    // Envoy's stats: 1 header abort + 1 gRPC abort + the 50 % ones; 2 delays.
    assert_eq!(
        loopback_stat(admin, "http.front.fault.aborts_injected").await,
        aborted + 2
    );
    assert_eq!(
        loopback_stat(admin, "http.front.fault.delays_injected").await,
        2
    );
    assert_eq!(
        loopback_stat(admin, "http.front.fault.active_faults").await,
        0
    );
    assert_eq!(
        loopback_stat(admin, "skiff.response_flags.FI").await,
        aborted + 2
    );
    skiff.stop().await.unwrap();
}
