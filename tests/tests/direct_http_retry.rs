//! Envoy's retry policy end to end, unprivileged and in-process: the loopback seed scenario
//! (`tests/fixtures/seed-scenario-loopback`) served by `skiff control-plane`, whose route retries
//! `connect-failure,...,retriable-status-codes` (503) twice with `previous_hosts` and
//! `host_selection_retry_max_attempts: 5`. Of the three endpoints, 127.0.0.11 answers 503,
//! 127.0.0.12 refuses connections (nothing listens) and 127.0.0.13 answers 200.
//!
//! Two changes to the fixture copy, both so the assertions are exact rather than statistical:
//! the cluster balances ROUND_ROBIN instead of LEAST_REQUEST (with idle hosts LEAST_REQUEST picks
//! at random, so the six picks `previous_hosts` allows can all land on excluded hosts with
//! probability (2/3)^6, in Envoy as in skiff), and the virtual host sets
//! `include_request_attempt_count`, so the backends see which attempt reached them.
//!
//! The fixture fixes the addresses (127.0.0.1:50002, 127.0.0.11-13:50002), so this binary holds
//! exactly one test.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use skiff::controlplane::Source;
use skiff_tests::{
    ControlPlane, InProcessSkiff, free_port, h1_client, h1_send, header_or, loopback_stat as stat,
    run_options,
};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(15);
const FIXTURE: &str = skiff_tests::SEED_SCENARIO;
const CLUSTER: &str = "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local";
const LISTEN: u16 = 50002;
const HOST: &str = "bar-service:50002";

/// What one backend saw: for each `x-request-id`, the `x-envoy-attempt-count` of every hit.
#[derive(Default)]
struct Seen {
    hits: Mutex<BTreeMap<String, Vec<u32>>>,
    connections: AtomicUsize,
}

impl Seen {
    fn hits(&self) -> BTreeMap<String, Vec<u32>> {
        self.hits.lock().unwrap().clone()
    }
}

/// An HTTP/1.1 backend answering `status`, or 503 while `broken` is set; it records each hit.
async fn backend(ip: &str, name: &'static str, status: u16, broken: Arc<AtomicBool>) -> Arc<Seen> {
    let l = TcpListener::bind((ip, LISTEN))
        .await
        .unwrap_or_else(|e| panic!("bind {ip}:{LISTEN}: {e}"));
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            s2.connections.fetch_add(1, Ordering::Relaxed);
            let seen = s2.clone();
            let broken = broken.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    let broken = broken.clone();
                    async move {
                        let h = |n: &str| header_or(req.headers(), n, "");
                        let attempt = h("x-envoy-attempt-count").parse().unwrap_or(0);
                        seen.hits
                            .lock()
                            .unwrap()
                            .entry(h("x-request-id"))
                            .or_default()
                            .push(attempt);
                        let status = if broken.load(Ordering::Relaxed) {
                            503
                        } else {
                            status
                        };
                        let r = Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(name.as_bytes())))
                            .unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    seen
}

/// `count` sequential requests over one kept-alive HTTP/1.1 connection: (status, body).
async fn get_h1(count: usize, extra: &[(&str, &str)]) -> Option<Vec<(StatusCode, String)>> {
    let mut tx = h1_client(LISTEN).await?;
    let mut out = Vec::new();
    for i in 0..count {
        let mut req = Request::get(format!("/r/{i}")).header("host", HOST);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).ok()?;
        let resp = h1_send(&mut tx, req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        out.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    Some(out)
}

fn fixture_copy(dir: &Path) {
    for f in ["listeners.json", "endpoints.json"] {
        std::fs::copy(Path::new(FIXTURE).join(f), dir.join(f)).unwrap();
    }
    let clusters = std::fs::read_to_string(Path::new(FIXTURE).join("clusters.json")).unwrap();
    let clusters = clusters.replace(r#""LEAST_REQUEST""#, r#""ROUND_ROBIN""#);
    assert!(clusters.contains("ROUND_ROBIN"));
    std::fs::write(dir.join("clusters.json"), clusters).unwrap();
    let routes = std::fs::read_to_string(Path::new(FIXTURE).join("routes.json")).unwrap();
    let routes = routes.replace(
        r#""routes": ["#,
        r#""include_request_attempt_count": true, "routes": ["#,
    );
    assert!(routes.contains("include_request_attempt_count"));
    std::fs::write(dir.join("routes.json"), routes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_skip_failed_hosts_and_stop_after_num_retries() {
    let dir = tempfile::tempdir().unwrap();
    fixture_copy(dir.path());
    let failing = backend("127.0.0.11", "backend-11", 503, Arc::default()).await;
    // 127.0.0.12: nothing listens, so connects are refused.
    let healthy_broken = Arc::new(AtomicBool::new(false));
    let healthy = backend("127.0.0.13", "backend-13", 200, healthy_broken.clone()).await;

    let xds: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin = free_port();
    let cp = ControlPlane::start(Source::Dir(dir.path().to_path_buf()), xds).await;
    let boot = skiff::config::parse(
        &skiff_tests::ads_bootstrap("GRPC", "retry", xds, admin),
        "<retry>",
    )
    .unwrap();
    let skiff = InProcessSkiff::start(run_options(boot));

    let deadline = Instant::now() + WAIT;
    while get_h1(1, &[])
        .await
        .is_none_or(|a| a[0].0 != StatusCode::OK)
    {
        assert!(Instant::now() < deadline, "the HTTP listener never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retries_before = stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_retry")).await;
    let success_before = stat(
        admin,
        &format!("cluster.{CLUSTER}.upstream_rq_retry_success"),
    )
    .await;
    let (failing_before, healthy_before) = (failing.hits(), healthy.hits());
    let conns_before = healthy.connections.load(Ordering::Relaxed);

    // 1. Every request succeeds on 127.0.0.13, each within at most 2 retries.
    const N: usize = 30;
    let answers = get_h1(N, &[]).await.expect("answers");
    for (status, body) in &answers {
        assert_eq!((*status, body.as_str()), (StatusCode::OK, "backend-13"));
    }
    let new = |after: BTreeMap<String, Vec<u32>>, before: &BTreeMap<String, Vec<u32>>| {
        after
            .into_iter()
            .filter(|(k, _)| !before.contains_key(k))
            .collect::<BTreeMap<_, _>>()
    };
    let at_13 = new(healthy.hits(), &healthy_before);
    let at_11 = new(failing.hits(), &failing_before);
    assert_eq!(at_13.len(), N, "one request id per request: {at_13:?}");
    let mut by_attempt = [0usize; 4];
    for (rid, attempts) in &at_13 {
        assert_eq!(attempts.len(), 1, "{rid}: 127.0.0.13 served it once");
        let a = attempts[0];
        assert!(
            (1..=3).contains(&a),
            "{rid}: attempt {a} (at most 2 retries)"
        );
        by_attempt[a as usize] += 1;
        // previous_hosts: the 503 host is never tried twice for one request.
        let on_11 = at_11.get(rid).map_or(0, Vec::len);
        assert!(on_11 <= 1, "{rid}: 127.0.0.11 tried {on_11} times");
    }
    for (rid, attempts) in &at_11 {
        assert!(at_13.contains_key(rid), "{rid} never reached 127.0.0.13");
        assert_eq!(attempts.len(), 1, "{rid}: {attempts:?}");
    }
    // An attempt on 13 comes after every failed one, so its number counts them; with round
    // robin over [11, 12, 13] each request makes three picks, so each starts on 11 (503), moves
    // on to 12 (refused) and ends on 13. Any order is fine as long as both kinds of failure
    // were retried somewhere.
    for (rid, attempts) in &at_13 {
        let on_11 = at_11.get(rid).map_or(0, Vec::len) as u32;
        assert!(
            attempts[0] > on_11,
            "{rid}: attempt {} after {on_11} 503s",
            attempts[0]
        );
    }
    assert!(
        by_attempt[3] > 0,
        "attempt numbers at 127.0.0.13: {by_attempt:?}"
    );
    let retried = (by_attempt[2] + 2 * by_attempt[3]) as u64;
    let retries = stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_retry")).await;
    assert_eq!(retries - retries_before, retried);
    let success = stat(
        admin,
        &format!("cluster.{CLUSTER}.upstream_rq_retry_success"),
    )
    .await;
    assert_eq!(
        success - success_before,
        (by_attempt[2] + by_attempt[3]) as u64
    );
    // Keep-alive: the 200 answers were read to the end, so their connections were reused.
    let conns = healthy.connections.load(Ordering::Relaxed) - conns_before;
    assert!(conns <= 2, "{conns} upstream connections for {N} requests");

    // 2. A sidecar's request may override the policy: `x-envoy-max-retries: 0` gives one try,
    // so three requests land on 11 (its 503), 12 (refused: local 503) and 13 (200).
    let retries_before = stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_retry")).await;
    let answers = get_h1(3, &[("x-envoy-max-retries", "0")])
        .await
        .expect("answers");
    let mut statuses: Vec<u16> = answers.iter().map(|(s, _)| s.as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 503, 503], "{answers:?}");
    let retries = stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_retry")).await;
    assert_eq!(
        retries, retries_before,
        "no retries with x-envoy-max-retries: 0"
    );

    // 3. Every host failing: exactly 1 + num_retries (2) attempts, then the last answer.
    healthy_broken.store(true, Ordering::Relaxed);
    let (failing_before, healthy_before) = (failing.hits(), healthy.hits());
    let retries_before = stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_retry")).await;
    const M: usize = 9;
    let answers = get_h1(M, &[]).await.expect("answers");
    for (status, _) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let at_13 = new(healthy.hits(), &healthy_before);
    let at_11 = new(failing.hits(), &failing_before);
    // With three failing hosts and previous_hosts, each request tries each host exactly once:
    // two visible (11, 13), one refused (12).
    assert_eq!(at_13.len(), M, "{at_13:?}");
    assert_eq!(at_11.len(), M, "{at_11:?}");
    for (rid, a13) in &at_13 {
        let a11 = &at_11[rid];
        assert_eq!((a11.len(), a13.len()), (1, 1), "{rid}");
        let mut seen = vec![a11[0], a13[0]];
        seen.sort();
        assert!(
            seen == [1, 2] || seen == [1, 3] || seen == [2, 3],
            "{rid}: attempts {seen:?}"
        );
    }
    let retries = stat(admin, &format!("cluster.{CLUSTER}.upstream_rq_retry")).await;
    assert_eq!(retries - retries_before, 2 * M as u64, "num_retries: 2");

    skiff.stop().await.unwrap();
    let _ = cp.stop().await;
}
