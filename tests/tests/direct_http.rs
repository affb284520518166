//! HTTP routing end to end, unprivileged and in-process: the loopback seed scenario
//! (`tests/fixtures/seed-scenario-loopback`, an Istio-generated LDS/RDS/CDS/EDS set) served by
//! skiff's own control plane, skiff's ADS client, and three real HTTP backends.
//!
//! The fixture fixes the addresses: the listener binds 127.0.0.1:50002 and the endpoints are
//! 127.0.0.11-13:50002, so this binary holds exactly one test that uses them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use skiff::controlplane::Source;
use skiff_tests::{
    ControlPlane, InProcessSkiff, copy_seed_scenario, free_port, h1_client, h1_send, h2c_client,
    h2c_send, header_or, loopback_stat as stat, run_options, serve_http1,
};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);
const CLUSTER: &str = "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local";
const LISTEN: u16 = 50002;

/// An HTTP/1.1 backend answering `<name>` and echoing what the proxy added.
async fn backend(ip: &str, name: &'static str) {
    let l = TcpListener::bind((ip, LISTEN))
        .await
        .unwrap_or_else(|e| panic!("bind {ip}:{LISTEN}: {e}"));
    serve_http1(l, move |req: Request<Incoming>| async move {
        let echo = |h: &str| header_or(req.headers(), h, "");
        Response::builder()
            .header("x-seen-proto", echo("x-forwarded-proto"))
            .header("x-seen-request-id", echo("x-request-id"))
            .header("x-seen-host", echo("host"))
            .header("x-seen-path", req.uri().to_string())
            .body(Full::new(Bytes::from_static(name.as_bytes())))
            .unwrap()
    });
}

/// What came back for one request.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: String,
    headers: hyper::HeaderMap,
}

async fn collect(resp: Response<Incoming>) -> Option<Answer> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Answer {
        status: parts.status,
        body: String::from_utf8_lossy(&body).into_owned(),
        headers: parts.headers,
    })
}

/// `count` requests over one HTTP/1.1 keep-alive connection.
async fn get_h1(host: &str, path: &str, count: usize) -> Option<Vec<Answer>> {
    let mut tx = h1_client(LISTEN).await?;
    let mut out = Vec::new();
    for _ in 0..count {
        let req = Request::get(path)
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = h1_send(&mut tx, req).await?;
        out.push(collect(resp).await?);
    }
    Some(out)
}

/// `count` requests over one HTTP/2 prior-knowledge (h2c) connection.
async fn get_h2c(host: &str, path: &str, count: usize) -> Option<Vec<Answer>> {
    let mut tx = h2c_client(LISTEN).await?;
    let mut out = Vec::new();
    for _ in 0..count {
        let req = Request::get(format!("http://{host}{path}"))
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = h2c_send(&mut tx, req).await?;
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        out.push(collect(resp).await?);
    }
    Some(out)
}

fn bootstrap(xds: SocketAddr, admin: u16) -> String {
    skiff_tests::ads_bootstrap("GRPC", "http", xds, admin)
}

fn backends_of(answers: &[Answer]) -> BTreeSet<String> {
    answers.iter().map(|a| a.body.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_routes_http1_and_h2c_by_host() {
    let dir = tempfile::tempdir().unwrap();
    copy_seed_scenario(dir.path());
    backend("127.0.0.11", "backend-11").await;
    backend("127.0.0.12", "backend-12").await;
    backend("127.0.0.13", "backend-13").await;

    let xds: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin = free_port();
    let cp = ControlPlane::start(Source::Dir(dir.path().to_path_buf()), xds).await;

    let boot = skiff::config::parse(&bootstrap(xds, admin), "<http>").unwrap();
    let skiff = InProcessSkiff::start(run_options(boot));

    // LDS -> RDS "50002" and CDS -> EDS warm; then the listener binds and routes.
    let fqdn = "bar-service.bar-namespace.svc.cluster.local:50002";
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(a) = get_h1(fqdn, "/", 1).await
            && a[0].status == StatusCode::OK
        {
            break;
        }
        assert!(Instant::now() < deadline, "the HTTP listener never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let all: BTreeSet<String> = ["backend-11", "backend-12", "backend-13"]
        .map(String::from)
        .into();
    for host in [fqdn, "bar-service", "172.16.0.2:50002", "BAR-SERVICE:50002"] {
        // LEAST_REQUEST with idle hosts picks at random: 40 requests miss one of three hosts
        // with probability 3 * (2/3)^40, about 2e-7.
        let h1 = get_h1(host, "/h1?q=1", 40).await.expect("http/1.1 answers");
        assert!(
            h1.iter().all(|a| a.status == StatusCode::OK),
            "{host}: {h1:?}"
        );
        assert_eq!(backends_of(&h1), all, "http/1.1 with Host {host}");
        let h2 = get_h2c(host, "/h2", 40).await.expect("h2c answers");
        assert!(
            h2.iter().all(|a| a.status == StatusCode::OK),
            "{host}: {h2:?}"
        );
        assert_eq!(backends_of(&h2), all, "h2c with authority {host}");
        for a in h1.iter().chain(&h2) {
            assert_eq!(a.headers["x-seen-proto"], "http");
            assert_eq!(a.headers["x-seen-host"], host);
            assert_eq!(a.headers["x-seen-request-id"].len(), 36);
            assert!(a.headers.contains_key("x-envoy-upstream-service-time"));
        }
        assert_eq!(h1[0].headers["x-seen-path"], "/h1?q=1");
        assert_eq!(h2[0].headers["x-seen-path"], "/h2");
    }

    // Unknown Host (and a listed name on a port RDS does not list): 404, no body (NR).
    for host in ["unknown.example", "bar-service:8080"] {
        let a = get_h1(host, "/", 1).await.expect("http/1.1 answers");
        assert_eq!(a[0].status, StatusCode::NOT_FOUND, "{host}");
        assert_eq!(a[0].body, "");
        let a = get_h2c(host, "/", 1).await.expect("h2c answers");
        assert_eq!(a[0].status, StatusCode::NOT_FOUND, "{host}");
    }

    // Envoy stat names.
    assert!(stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_total")).await >= 48);
    assert!(stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_200")).await >= 48);
    assert!(stat(admin, "http.outbound_0.0.0.0_50002.no_route").await >= 4);

    // Endpoints gone from EDS: 503 "no healthy upstream".
    std::fs::write(
        dir.path().join("endpoints.json"),
        format!(
            r#"{{"version_info": "2", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
  "cluster_name": "{CLUSTER}", "endpoints": []}}]}}"#
        ),
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let a = get_h1("bar-service", "/", 1)
            .await
            .expect("http/1.1 answers");
        if a[0].status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(a[0].body, "no healthy upstream");
            break;
        }
        assert!(Instant::now() < deadline, "EDS removal never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An endpoint nobody listens on: 503 with Envoy's connect-failure text.
    std::fs::write(
        dir.path().join("endpoints.json"),
        format!(
            r#"{{"version_info": "3", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
  "cluster_name": "{CLUSTER}", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
    {{"socket_address": {{"address": "127.0.0.1", "port_value": {}}}}}}}}}]}}]}}]}}"#,
            free_port()
        ),
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let a = get_h1("bar-service", "/", 1)
            .await
            .expect("http/1.1 answers");
        if a[0].body.starts_with(skiff::http::UPSTREAM_RESET) {
            assert_eq!(a[0].status, StatusCode::SERVICE_UNAVAILABLE);
            break;
        }
        assert!(Instant::now() < deadline, "EDS update never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    skiff.stop().await.unwrap();
    let _ = cp.stop().await;
}
