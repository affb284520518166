//! TLS gaps left after the data path learned mutual TLS, each against what Envoy does:
//!
//! - active health checks of a TLS cluster go through the cluster's transport socket (the
//!   endpoint's match, or the check's `transport_socket_match_criteria`): a TLS-only backend
//!   is healthy over mTLS and unhealthy when it presents the wrong SAN, or when checked in
//!   plaintext;
//! - `forward_client_cert_details` / `set_current_client_cert_details` (Istio's inbound
//!   APPEND_FORWARD with subject, URI and DNS): skiff's `x-forwarded-client-cert` equals real
//!   Envoy's for the same mTLS request, appended, set, and sanitized on plaintext;
//! - `auto_config` over TLS offers `h2,http/1.1` and speaks what ALPN chose: an h2-only TLS
//!   backend gets HTTP/2, an HTTP/1.1-only one HTTP/1.1.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use skiff_tests::{Envoy, InProcessSkiff, free_port, run_options, serve_http1};
use tokio::net::{TcpListener, TcpStream};

use skiff_tests::tls::{Ca, Leaf, write_pem as write};

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/other";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring is the project's one crypto provider; only its post-quantum default is missing.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain(leaf: &Leaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap(),
        PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
    )
}

/// A TLS-only HTTP backend presenting `leaf`, requiring a client certificate of `ca` when
/// given, offering `alpn`. It speaks HTTP/2 when ALPN chose `h2` or when `h2_only`, else
/// HTTP/1.1, and answers every request with its HTTP version (`HTTP/2.0`, `HTTP/1.1`).
async fn tls_backend(
    leaf: &Leaf,
    client_ca: Option<&Ca>,
    alpn: &[&str],
    h2_only: bool,
) -> SocketAddr {
    let p = provider();
    let builder = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
                .unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), p)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let (certs, key) = chain(leaf);
    let mut cfg = builder.with_single_cert(certs, key).unwrap();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Plaintext or a refused client certificate: the connection just ends.
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let h2 = h2_only || tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let v = format!("{:?}", req.version());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(v),
                        )))
                    },
                );
                let io = TokioIo::new(tls);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await
                };
            });
        }
    });
    addr
}

fn admin(port: u16) -> String {
    format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
    )
}

/// An `UpstreamTlsContext` transport socket (YAML at 6 spaces) with `cert`/`key` files,
/// trusting `root`, requiring the server's URI SAN `san`.
fn upstream_tls(cert: &Path, key: &Path, root: &Path, san: &str, indent: usize) -> String {
    let text = format!(
        r#"transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
    common_tls_context:
      tls_certificates: [{{ certificate_chain: {{ filename: "{}" }}, private_key: {{ filename: "{}" }} }}]
      validation_context:
        trusted_ca: {{ filename: "{}" }}
        match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ exact: "{san}" }} }}]"#,
        cert.display(),
        key.display(),
        root.display()
    );
    let pad = " ".repeat(indent);
    text.lines()
        .map(|l| format!("\n{pad}{l}"))
        .collect::<String>()
}

fn endpoints(name: &str, addrs: &[SocketAddr]) -> String {
    let eps: Vec<String> = addrs
        .iter()
        .map(|a| {
            format!(
                "{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}",
                a.port()
            )
        })
        .collect();
    format!(
        "load_assignment: {{ cluster_name: {name}, endpoints: [{{ lb_endpoints: [{}] }}] }}",
        eps.join(", ")
    )
}

async fn admin_get(port: u16, path: &str) -> String {
    skiff::admin::request(
        SocketAddr::from(([127, 0, 0, 1], port)),
        hyper::Method::GET,
        path,
    )
    .await
    .unwrap_or_default()
}

/// `health_flags` of `addr` in `cluster` from `/clusters`.
fn flags(clusters: &str, cluster: &str, addr: SocketAddr) -> Option<String> {
    let prefix = format!("{cluster}::{addr}::health_flags::");
    clusters
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_of_a_tls_cluster_go_through_its_transport_socket() {
    let ca = Ca::new("cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let client = ca.leaf(&[], &[CLIENT_ID]);
    let (cert, key, root) = (
        write(d, "client.pem", &client.cert),
        write(d, "client.key", &client.key),
        write(d, "root.pem", &ca.pem),
    );
    // Two TLS-only backends requiring a client certificate of the mesh: one is the expected
    // server, the other presents another identity.
    let good = tls_backend(&ca.leaf(&[], &[SERVER_ID]), Some(&ca), &[], false).await;
    let wrong = tls_backend(&ca.leaf(&[], &[OTHER_ID]), Some(&ca), &[], false).await;
    let hc = |extra: &str| {
        format!(
            r#"
    health_checks:
    - timeout: 1s
      interval: 0.2s
      no_traffic_interval: 0.2s
      unhealthy_threshold: 1
      healthy_threshold: 1
      http_health_check: {{ path: /healthz }}{extra}"#
        )
    };
    let admin_port = free_port();
    let yaml = format!(
        r#"
{}
static_resources:
  clusters:
  - name: mtls
    type: STATIC
    connect_timeout: 1s
    {}{}{}
  - name: by-criteria
    type: STATIC
    connect_timeout: 1s
    {}{}
    transport_socket_matches:
    - name: tlsMode-istio
      match: {{ tlsMode: istio }}{}
    - name: tlsMode-disabled
      match: {{}}
      transport_socket:
        name: envoy.transport_sockets.raw_buffer
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer }}
  - name: plaintext
    type: STATIC
    connect_timeout: 1s
    {}{}
  - name: tcp-mtls
    type: STATIC
    connect_timeout: 1s
    {}
    health_checks:
    - timeout: 1s
      interval: 0.2s
      no_traffic_interval: 0.2s
      unhealthy_threshold: 1
      healthy_threshold: 1
      tcp_health_check: {{}}{}
"#,
        admin(admin_port),
        endpoints("mtls", &[good, wrong]),
        hc(""),
        upstream_tls(&cert, &key, &root, SERVER_ID, 4),
        // The endpoint carries no tlsMode label: only the check's criteria choose mTLS.
        endpoints("by-criteria", &[good]),
        hc("\n      transport_socket_match_criteria: { tlsMode: istio }"),
        upstream_tls(&cert, &key, &root, SERVER_ID, 6),
        endpoints("plaintext", &[good]),
        hc(""),
        // A TCP check over TLS: the handshake (with the SAN check) is the check.
        endpoints("tcp-mtls", &[good, wrong]),
        upstream_tls(&cert, &key, &root, SERVER_ID, 4),
    );
    let skiff = InProcessSkiff::start(run_options(
        skiff::config::parse(&yaml, "<hc>").expect("bootstrap parses"),
    ));
    let want = [
        ("mtls", good, "healthy"),
        ("mtls", wrong, "/failed_active_hc"),
        ("by-criteria", good, "healthy"),
        ("plaintext", good, "/failed_active_hc"),
        ("tcp-mtls", good, "healthy"),
        ("tcp-mtls", wrong, "/failed_active_hc"),
    ];
    let mut last = String::new();
    for _ in 0..100 {
        last = admin_get(admin_port, "/clusters").await;
        if want
            .iter()
            .all(|(c, a, f)| flags(&last, c, *a).as_deref() == Some(*f))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (c, a, f) in want {
        assert_eq!(flags(&last, c, a).as_deref(), Some(f), "{c} {a}:\n{last}");
    }
    let stats = admin_get(admin_port, "/stats").await;
    let stat = |n: &str| skiff_tests::stat_value(&stats, n);
    assert_eq!(stat("cluster.mtls.health_check.healthy"), 1, "{stats}");
    assert!(stat("cluster.mtls.health_check.success") >= 1);
    assert!(stat("cluster.mtls.health_check.failure") >= 1);
    // The checks' handshakes count in the cluster's ssl.* as the data path's do.
    assert!(stat("cluster.mtls.ssl.handshake") >= 1, "{stats}");
    assert!(stat("cluster.mtls.ssl.fail_verify_san") >= 1, "{stats}");
    assert_eq!(stat("cluster.by-criteria.health_check.healthy"), 1);
    assert_eq!(stat("cluster.plaintext.health_check.healthy"), 0);
    skiff.stop().await.unwrap();
}

/// A rustls client presenting `leaf`, accepting any server (the server's check of the client
/// is under test here).
fn mtls_client(leaf: &Leaf) -> Arc<rustls::ClientConfig> {
    let p = provider();
    let (certs, key) = chain(leaf);
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(p)))
        .with_client_auth_cert(certs, key)
        .unwrap();
    Arc::new(cfg)
}

/// Accepts any server certificate; handshake signatures are still verified.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `GET /` to 127.0.0.1:`port`, over mTLS with `tls` when given, carrying `xfcc` as
/// `x-forwarded-client-cert` when given: the response body (the backend's view of the
/// header), `None` when the connection failed.
async fn ask(
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    xfcc: Option<&str>,
) -> Option<String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut req = hyper::Request::get("/").header("host", "svc");
    if let Some(x) = xfcc {
        req = req.header("x-forwarded-client-cert", x);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let resp = match tls {
        Some(cfg) => {
            let name = ServerName::try_from("server.default.svc").unwrap();
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .ok()?;
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .ok()?;
            tokio::spawn(conn);
            tx.send_request(req).await.ok()?
        }
        None => {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .ok()?;
            tokio::spawn(conn);
            tx.send_request(req).await.ok()?
        }
    };
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// One listener serving mTLS (the HCM with `mode` and `details`) and plaintext (the same
/// HCM) on `port`, routing to `cluster`.
fn xfcc_listener(name: &str, port: u16, mode: &str, details: &str, tls: &str) -> String {
    let hcm = format!(
        r#"
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          forward_client_cert_details: {mode}
          set_current_client_cert_details: {details}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{ match: {{ prefix: / }}, route: {{ cluster: echo }} }}]"#
    );
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector }}
    filter_chains:
    - name: mtls
      filter_chain_match: {{ transport_protocol: tls }}{tls}{hcm}
    - name: plaintext
      filter_chain_match: {{ transport_protocol: raw_buffer }}{hcm}"#
    )
}

/// The same static configuration for skiff and Envoy: an APPEND_FORWARD listener (Istio's
/// inbound: subject, URI, DNS) and a SANITIZE_SET one (URI only), both to `echo`.
fn xfcc_bootstrap(admin_port: u16, append: u16, set: u16, echo: SocketAddr, tls: &str) -> String {
    format!(
        r#"
{}
static_resources:
  listeners:{}{}
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    {}
"#,
        admin(admin_port),
        xfcc_listener(
            "append",
            append,
            "APPEND_FORWARD",
            "{ subject: true, uri: true, dns: true }",
            tls
        ),
        xfcc_listener("set", set, "SANITIZE_SET", "{ uri: true }", tls),
        endpoints("echo", &[echo]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_client_cert_equals_envoys() {
    let ca = Ca::new("cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The proxy's own certificate (its URI SAN is `By=`), and a client with a URI, two DNS
    // SANs and rcgen's subject.
    let server = ca.leaf(&["server.default.svc"], &[SERVER_ID]);
    let client = ca.leaf(&["client.default.svc", "client.example"], &[CLIENT_ID]);
    let (cert, key, root) = (
        write(d, "server.pem", &server.cert),
        write(d, "server.key", &server.key),
        write(d, "root.pem", &ca.pem),
    );
    let tls = format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{{ certificate_chain: {{ filename: "{}" }}, private_key: {{ filename: "{}" }} }}]
            validation_context: {{ trusted_ca: {{ filename: "{}" }} }}"#,
        cert.display(),
        key.display(),
        root.display()
    );
    // The backend answers with the header it received.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = l.local_addr().unwrap();
    serve_http1(l, |req| async move {
        let seen: Vec<String> = req
            .headers()
            .get_all("x-forwarded-client-cert")
            .iter()
            .map(|v| v.to_str().unwrap_or("<bad>").to_string())
            .collect();
        let body = if seen.is_empty() {
            "<none>".to_string()
        } else {
            seen.join(" | ")
        };
        hyper::Response::new(Full::new(Bytes::from(body)))
    });

    let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
    let [s_admin, s_append, s_set, e_admin, e_append, e_set] = ports[..] else {
        unreachable!()
    };
    let skiff_yaml = xfcc_bootstrap(s_admin, s_append, s_set, echo, &tls);
    let envoy_yaml = xfcc_bootstrap(e_admin, e_append, e_set, echo, &tls);
    let envoy_cfg = write(d, "envoy.yaml", &envoy_yaml);
    let skiff = InProcessSkiff::start(run_options(
        skiff::config::parse(&skiff_yaml, "<xfcc>").expect("bootstrap parses"),
    ));
    let _envoy = Envoy::start(&envoy_cfg, std::process::id() + 23);

    let mtls = mtls_client(&client);
    // Wait until both answer over mTLS.
    for port in [s_append, e_append] {
        let mut ok = false;
        for _ in 0..300 {
            if ask(port, Some(mtls.clone()), None).await.is_some() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "no answer on {port}");
    }
    let prior = "By=spiffe://cluster.local/ns/default/sa/gateway;Hash=abcd;URI=spiffe://x";
    let cases: [(&str, u16, u16, bool, Option<&str>); 6] = [
        ("append, no prior header", s_append, e_append, true, None),
        (
            "append to a prior header",
            s_append,
            e_append,
            true,
            Some(prior),
        ),
        (
            "append over plaintext",
            s_append,
            e_append,
            false,
            Some(prior),
        ),
        ("set over a prior header", s_set, e_set, true, Some(prior)),
        ("set, no prior header", s_set, e_set, true, None),
        ("set over plaintext", s_set, e_set, false, Some(prior)),
    ];
    for (what, s_port, e_port, over_tls, xfcc) in cases {
        let tls = over_tls.then(|| mtls.clone());
        let ours = ask(s_port, tls.clone(), xfcc).await.expect("skiff answers");
        let envoys = ask(e_port, tls, xfcc).await.expect("envoy answers");
        assert_eq!(ours, envoys, "{what}");
        if over_tls {
            assert!(
                ours.contains("By=spiffe://cluster.local/ns/default/sa/server;Hash="),
                "{what}: {ours}"
            );
        } else {
            assert_eq!(ours, "<none>", "{what}: sanitized on plaintext");
        }
    }
    // Istio's element in full: By, Hash, Subject, URI, DNS.
    let istio = ask(s_append, Some(mtls.clone()), None).await.unwrap();
    assert!(
        istio.contains(&format!("Subject=\"CN=rcgen self signed cert\";URI={CLIENT_ID};DNS=client.default.svc;DNS=client.example")),
        "{istio}"
    );
    skiff.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_config_speaks_what_alpn_chose() {
    let ca = Ca::new("cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let client = ca.leaf(&[], &[CLIENT_ID]);
    let (cert, key, root) = (
        write(d, "client.pem", &client.cert),
        write(d, "client.key", &client.key),
        write(d, "root.pem", &ca.pem),
    );
    // TLS backends that speak one protocol each: h2 only (ALPN `h2`), HTTP/1.1 only.
    let h2 = tls_backend(&ca.leaf(&[], &[SERVER_ID]), Some(&ca), &["h2"], true).await;
    let h1 = tls_backend(&ca.leaf(&[], &[SERVER_ID]), Some(&ca), &["http/1.1"], false).await;
    let auto = r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        auto_config: {}"#;
    let cluster = |name: &str, ep: SocketAddr| {
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    {}{auto}{}"#,
            endpoints(name, &[ep]),
            upstream_tls(&cert, &key, &root, SERVER_ID, 4)
        )
    };
    let (admin_port, port) = (free_port(), free_port());
    let yaml = format!(
        r#"
{}
static_resources:
  listeners:
  - name: out
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: out
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - {{ match: {{ prefix: /h1 }}, route: {{ cluster: auto-h1 }} }}
              - {{ match: {{ prefix: / }}, route: {{ cluster: auto-h2 }} }}
  clusters:{}{}
"#,
        admin(admin_port),
        cluster("auto-h2", h2),
        cluster("auto-h1", h1),
    );
    let mut opts = run_options(skiff::config::parse(&yaml, "<auto>").expect("bootstrap parses"));
    // One worker, so one pool per cluster: the second request must find the first's
    // connection (pools are per worker, as Envoy's are).
    opts.concurrency = 1;
    let skiff = InProcessSkiff::start(opts);
    let get = |path: &'static str| async move {
        for _ in 0..300 {
            if let Some(mut tx) = skiff_tests::h1_client(port).await {
                let req = hyper::Request::get(path)
                    .header("host", "svc")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                if let Ok(resp) = tx.send_request(req).await {
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    return (status, String::from_utf8_lossy(&body).into_owned());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no answer on {port}");
    };
    // Twice each: the second request reuses the pooled connection of the same kind.
    for _ in 0..2 {
        assert_eq!(get("/").await, (200, "HTTP/2.0".to_string()));
        assert_eq!(get("/h1").await, (200, "HTTP/1.1".to_string()));
    }
    let stats = admin_get(admin_port, "/stats").await;
    let stat = |n: &str| skiff_tests::stat_value(&stats, n);
    assert_eq!(stat("cluster.auto-h2.upstream_cx_total"), 1, "{stats}");
    assert_eq!(stat("cluster.auto-h1.upstream_cx_total"), 1, "{stats}");
    assert_eq!(stat("cluster.auto-h2.ssl.handshake"), 1);
    skiff.stop().await.unwrap();
}
