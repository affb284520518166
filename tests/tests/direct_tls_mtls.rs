//! Mutual TLS between two in-process skiffs, as between two Istio sidecars: a client skiff
//! originates mTLS (per endpoint, Istio's `tlsMode: istio` transport socket match) with a
//! SPIFFE certificate from a test CA, a server skiff terminates it on a PERMISSIVE inbound
//! port (TLS chains chosen by ALPN and SNI, a plaintext chain beside them), each checks the
//! other's SAN, and network and HTTP RBAC allow or deny by the client's SPIFFE identity. A
//! wrong SAN and an untrusted root are refused with a log line and Envoy's `ssl.*` counters.
//! Before the data plane did TLS, skiff refused every one of these configurations.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use skiff_tests::{
    InProcessSkiff, echo_backend, free_port, loopback_stat, run_options, serve_http1,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use skiff_tests::tls::{Ca, write_pem as write};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const OTHER_ID: &str = "spiffe://cluster.local/ns/default/sa/other";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// Log lines of this test process (the refused-peer lines are asserted on).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Static secrets `name`: a certificate from files.
fn cert_secret(name: &str, cert: &Path, key: &Path) -> String {
    format!(
        r#"
  - name: {name}
    tls_certificate:
      certificate_chain: {{ filename: "{}" }}
      private_key: {{ filename: "{}" }}"#,
        cert.display(),
        key.display()
    )
}

fn root_secret(name: &str, root: &Path) -> String {
    format!(
        r#"
  - name: {name}
    validation_context:
      trusted_ca: {{ filename: "{}" }}"#,
        root.display()
    )
}

/// A TLS context body: Istio's shape (certificate `cert` and roots `root` by SDS name,
/// `san` matcher inline in a combined validation context).
fn common(cert: &str, root: &str, san: &str, alpn: &[&str]) -> String {
    format!(
        r#"
        common_tls_context:
          alpn_protocols: [{}]
          tls_certificate_sds_secret_configs: [{{ name: {cert} }}]
          combined_validation_context:
            default_validation_context:
              match_typed_subject_alt_names: [{{ san_type: URI, matcher: {san} }}]
            validation_context_sds_secret_config: {{ name: {root} }}"#,
        alpn.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn downstream(alpn: &[&str]) -> String {
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true{}"#,
        common(
            "default",
            "ROOTCA",
            r#"{ prefix: "spiffe://cluster.local/ns/default/" }"#,
            alpn
        )
        .replace("\n        ", "\n          ")
    )
}

fn tcp_proxy(stat: &str, cluster: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {stat}
          cluster: {cluster}"#
    )
}

/// Network RBAC: only `CLIENT_ID` may connect.
const ONLY_CLIENT: &str = r#"
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: inbound.
          rules:
            action: ALLOW
            policies:
              client-only:
                permissions: [{ any: true }]
                principals: [{ authenticated: { principal_name: { exact: "spiffe://cluster.local/ns/default/sa/client" } } }]"#;

fn static_cluster(name: &str, addr: SocketAddr, extra: &str, labelled: bool) -> String {
    let metadata = if labelled {
        r#", metadata: { filter_metadata: { envoy.transport_socket_match: { tlsMode: istio } } }"#
    } else {
        ""
    };
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}{metadata} }}] }}]{extra}"#,
        addr.port()
    )
}

/// Istio's outbound cluster transport: mTLS to endpoints labelled `tlsMode: istio`,
/// plaintext to the others.
fn istio_matches(cert: &str, root: &str, san: &str, alpn: &[&str], sni: &str) -> String {
    format!(
        r#"
    transport_socket_matches:
    - name: tlsMode-istio
      match: {{ tlsMode: istio }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {sni}{}
    - name: tlsMode-disabled
      match: {{}}
      transport_socket:
        name: envoy.transport_sockets.raw_buffer
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"#,
        common(cert, root, &format!("{{ exact: \"{san}\" }}"), alpn)
            .replace("\n        ", "\n          ")
    )
}

/// A plaintext listener on `port` with a tcp_proxy to `cluster`.
fn tcp_listener(name: &str, port: u16, cluster: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:{}"#,
        tcp_proxy(name, cluster)
    )
}

fn admin(port: u16) -> String {
    format!(
        "admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}"
    )
}

/// `ping` through 127.0.0.1:`port`, half-closed: what came back (empty when closed).
async fn ping(port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(b"ping").await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "no answer nor close within 10 s on port {port}"
    );
    out
}

/// `GET /` through 127.0.0.1:`port`: (status, body).
async fn get(port: u16) -> (u16, String) {
    get_path(port, "/").await
}

/// `GET path` through 127.0.0.1:`port`: (status, body).
async fn get_path(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: server\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn wait_listening(ports: &[u16]) {
    for &p in ports {
        for _ in 0..500 {
            if TcpStream::connect(("127.0.0.1", p)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A server verifier that accepts any certificate (this client tests the server's check of
/// the client, not its own of the server; SPIFFE certificates carry no DNS name for rustls's
/// default hostname check anyway). Handshake signatures are still verified.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
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
        cert: &rustls_pki_types::CertificateDer<'_>,
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

/// A rustls client config presenting (`cert`, `key`), offering `alpn`, accepting any server.
fn rustls_client(cert: &str, key: &str, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    // ring is the project's one crypto provider; only its post-quantum default is missing.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skiff_to_skiff_mtls_with_san_checks_permissive_inbound_and_rbac() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .with_writer(move || writer.clone())
        .init();

    let ca = Ca::new("cluster.local");
    let evil = Ca::new("evil");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pem = |name: &str, (c, k): &(String, String)| {
        (
            write(d, &format!("{name}.pem"), c),
            write(d, &format!("{name}.key"), k),
        )
    };
    // Istio's workload certificates: one SPIFFE URI SAN.
    let issue = |ca: &Ca, id: &str| {
        let l = ca.leaf(&[], &[id]);
        (l.cert, l.key)
    };
    let server_cert = issue(&ca, SERVER_ID);
    let client_cert = issue(&ca, CLIENT_ID);
    let other_cert = issue(&ca, OTHER_ID);
    let (server_c, server_k) = pem("server", &server_cert);
    let (client_c, client_k) = pem("client", &client_cert);
    let (other_c, other_k) = pem("other", &other_cert);
    let root = write(d, "root.pem", &ca.pem);
    let evil_root = write(d, "evil-root.pem", &evil.pem);

    // Backends behind the server skiff.
    let (echo, sni_echo, plain_echo) = (
        echo_backend("echo").await,
        echo_backend("sni").await,
        echo_backend("plain").await,
    );
    let web_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = web_l.local_addr().unwrap();
    serve_http1(web_l, |_req| async {
        hyper::Response::new(Full::new(Bytes::from_static(b"web")))
    });

    // The server skiff: one PERMISSIVE inbound port.
    let (inbound, server_admin) = (free_port(), free_port());
    let server_yaml = format!(
        r#"
{}
static_resources:
  secrets:{}{}
  listeners:
  - name: inbound
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {inbound} }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    - name: envoy.filters.listener.http_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector
    filter_chains:
    - name: mtls-sni
      filter_chain_match: {{ server_names: [sni.example.com], transport_protocol: tls }}{}
      filters:{}
    - name: mtls-tcp
      filter_chain_match: {{ transport_protocol: tls, application_protocols: [istio-peer-exchange, istio] }}{}
      filters:{ONLY_CLIENT}{}
    - name: mtls-http
      filter_chain_match: {{ transport_protocol: tls, application_protocols: [istio-http/1.0, istio-http/1.1, istio-h2] }}{}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound_http
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  client-only:
                    permissions: [{{ any: true }}]
                    principals: [{{ authenticated: {{ principal_name: {{ exact: "{CLIENT_ID}" }} }} }}]
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: server
              domains: ["*"]
              routes: [{{ match: {{ prefix: / }}, route: {{ cluster: web }} }}]
    - name: plaintext
      filter_chain_match: {{ transport_protocol: raw_buffer }}
      filters:{}
  clusters:{}{}{}{}
"#,
        admin(server_admin),
        cert_secret("default", &server_c, &server_k),
        root_secret("ROOTCA", &root),
        downstream(&["istio-peer-exchange", "istio"]),
        tcp_proxy("sni", "sni"),
        downstream(&["istio-peer-exchange", "istio"]),
        tcp_proxy("inbound", "echo"),
        downstream(&["h2", "http/1.1"]),
        tcp_proxy("plaintext", "plain"),
        static_cluster("echo", echo, "", false),
        static_cluster("sni", sni_echo, "", false),
        static_cluster("plain", plain_echo, "", false),
        static_cluster("web", web, "", false),
    );
    let inbound_addr: SocketAddr = ([127, 0, 0, 1], inbound).into();

    // The client skiff: plaintext listeners in front of mTLS clusters to the inbound port.
    let ports: Vec<u16> = (0..8).map(|_| free_port()).collect();
    let [
        out_tcp,
        out_http,
        out_plain,
        out_wrong,
        out_untrusted,
        out_other,
        out_sni,
        client_admin,
    ] = ports[..]
    else {
        unreachable!()
    };
    let tcp_alpn = ["istio-peer-exchange", "istio"];
    let client_yaml = format!(
        r#"
{}
static_resources:
  secrets:{}{}{}{}
  listeners:{}{}{}{}{}{}
  - name: out-http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {out_http} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_http
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: server
              domains: ["*"]
              routes:
              - {{ match: {{ prefix: /wrong }}, route: {{ cluster: http-wrong-san }} }}
              - {{ match: {{ prefix: / }}, route: {{ cluster: mtls-http }} }}
  clusters:{}{}{}{}{}{}{}{}
"#,
        admin(client_admin),
        cert_secret("default", &client_c, &client_k),
        cert_secret("other", &other_c, &other_k),
        root_secret("ROOTCA", &root),
        root_secret("EVILROOT", &evil_root),
        tcp_listener("out-tcp", out_tcp, "mtls-tcp"),
        tcp_listener("out-plain", out_plain, "plain-to-inbound"),
        tcp_listener("out-wrong", out_wrong, "wrong-san"),
        tcp_listener("out-untrusted", out_untrusted, "untrusted"),
        tcp_listener("out-other", out_other, "as-other"),
        tcp_listener("out-sni", out_sni, "by-sni"),
        static_cluster(
            "mtls-tcp",
            inbound_addr,
            &istio_matches(
                "default",
                "ROOTCA",
                SERVER_ID,
                &tcp_alpn,
                "server.default.svc"
            ),
            true
        ),
        static_cluster(
            "mtls-http",
            inbound_addr,
            &istio_matches(
                "default",
                "ROOTCA",
                SERVER_ID,
                &["istio-http/1.1"],
                "server.default.svc"
            ),
            true
        ),
        // The same transport, but the endpoint is not labelled: plaintext (PERMISSIVE's
        // other half).
        static_cluster(
            "plain-to-inbound",
            inbound_addr,
            &istio_matches(
                "default",
                "ROOTCA",
                SERVER_ID,
                &tcp_alpn,
                "server.default.svc"
            ),
            false
        ),
        static_cluster(
            "wrong-san",
            inbound_addr,
            &istio_matches(
                "default",
                "ROOTCA",
                "spiffe://cluster.local/ns/default/sa/nobody",
                &tcp_alpn,
                "server.default.svc"
            ),
            true
        ),
        static_cluster(
            "http-wrong-san",
            inbound_addr,
            &istio_matches(
                "default",
                "ROOTCA",
                "spiffe://cluster.local/ns/default/sa/nobody",
                &["istio-http/1.1"],
                "server.default.svc"
            ),
            true
        ),
        static_cluster(
            "untrusted",
            inbound_addr,
            &istio_matches(
                "default",
                "EVILROOT",
                SERVER_ID,
                &tcp_alpn,
                "server.default.svc"
            ),
            true
        ),
        static_cluster(
            "as-other",
            inbound_addr,
            &istio_matches(
                "other",
                "ROOTCA",
                SERVER_ID,
                &tcp_alpn,
                "server.default.svc"
            ),
            true
        ),
        static_cluster(
            "by-sni",
            inbound_addr,
            &istio_matches("default", "ROOTCA", SERVER_ID, &tcp_alpn, "sni.example.com"),
            true
        ),
    );
    let server = InProcessSkiff::start(run_options(
        skiff::config::parse(&server_yaml, "<server>").expect("server bootstrap parses"),
    ));
    let client = InProcessSkiff::start(run_options(
        skiff::config::parse(&client_yaml, "<client>").expect("client bootstrap parses"),
    ));
    // Only ports whose extra connection counts nothing asserted below: a probe of another
    // would dial (and be refused) once more. Static listeners are all bound at start.
    wait_listening(&[inbound, out_tcp]).await;

    // TCP over mTLS, both SANs checked, half-close carried as close_notify both ways.
    assert_eq!(ping(out_tcp).await, b"echo:ping");
    // The chain chosen by SNI (server_names before ALPN).
    assert_eq!(ping(out_sni).await, b"sni:ping");
    // PERMISSIVE: an unlabelled endpoint is dialled in plaintext and gets the plaintext chain,
    // as does a plaintext client of the inbound port itself.
    assert_eq!(ping(out_plain).await, b"plain:ping");
    assert_eq!(ping(inbound).await, b"plain:ping");
    // HTTP over mTLS: the chain chosen by Istio's HTTP ALPN, served by the HCM, HTTP RBAC
    // allowing the client's SPIFFE id.
    assert_eq!(get(out_http).await, (200, "web".to_string()));
    assert_eq!(get(out_http).await, (200, "web".to_string()));

    // HTTP/2 over TLS (ALPN h2) straight to the inbound port, as a client sidecar's h2 pool.
    let cfg = rustls_client(&client_cert.0, &client_cert.1, &["istio-h2", "h2"]);
    let tcp = TcpStream::connect(inbound_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("server.default.svc").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .expect("mTLS with the client identity");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 over TLS");
    tokio::spawn(conn);
    let req = hyper::Request::get("https://server/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.expect("an h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"web");
    drop(h2);

    // Network RBAC: another identity of the mesh completes mTLS, then is denied.
    assert_eq!(ping(out_other).await, b"");
    assert_eq!(loopback_stat(server_admin, "inbound.rbac.denied").await, 1);
    assert!(loopback_stat(server_admin, "inbound.rbac.allowed").await >= 1);
    assert_eq!(
        loopback_stat(server_admin, "http.inbound_http.rbac.allowed").await,
        3
    );

    // A server with the wrong SAN, and one whose root is not trusted, are refused: the client
    // closes, counts Envoy's ssl.* counter and UF, and logs who presented what.
    assert_eq!(ping(out_wrong).await, b"");
    assert_eq!(ping(out_untrusted).await, b"");
    // Over HTTP the refusal is Envoy's 503 with the transport failure reason.
    let (status, body) = get_path(out_http, "/wrong").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with(
            "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: "
        ) && body.contains("sa/nobody"),
        "{body}"
    );
    let c = |name: &'static str| loopback_stat(client_admin, name);
    assert_eq!(c("cluster.wrong-san.ssl.fail_verify_san").await, 1);
    assert_eq!(c("cluster.untrusted.ssl.fail_verify_error").await, 1);
    assert_eq!(c("cluster.wrong-san.upstream_cx_connect_fail").await, 1);
    assert_eq!(c("cluster.http-wrong-san.ssl.fail_verify_san").await, 1);
    assert_eq!(
        c("cluster.http-wrong-san.upstream_cx_connect_fail").await,
        1
    );
    assert!(c("skiff.response_flags.UF").await >= 2);
    assert!(c("cluster.mtls-tcp.ssl.handshake").await >= 1);
    assert!(c("cluster.mtls-http.ssl.handshake").await >= 1);
    // What was negotiated, under Envoy's names: an upstream context defaults to TLS 1.2 at
    // most (Envoy's client default), with BoringSSL's first suite and curve.
    assert!(c("cluster.mtls-tcp.ssl.versions.TLSv1.2").await >= 1);
    assert!(c("cluster.mtls-tcp.ssl.ciphers.ECDHE-ECDSA-AES128-GCM-SHA256").await >= 1);
    assert!(c("cluster.mtls-tcp.ssl.curves.X25519").await >= 1);
    assert_eq!(c("cluster.plain-to-inbound.ssl.handshake").await, 0);
    let text = logs.text();
    let san_line = text
        .lines()
        .find(|l| l.contains("TLS peer refused") && l.contains("cluster.wrong-san"))
        .unwrap_or_else(|| panic!("no refused-peer line for wrong-san in:\n{text}"));
    assert!(
        san_line.contains(SERVER_ID) && san_line.contains("sa/nobody"),
        "the line names what was presented and what was expected: {san_line}"
    );
    assert!(san_line.contains(&inbound_addr.to_string()), "{san_line}");
    assert!(
        text.lines()
            .any(|l| l.contains("TLS peer refused") && l.contains("cluster.untrusted")),
        "no refused-peer line for the untrusted root"
    );

    // A client whose certificate chains to another root is refused by the server.
    let evil_client = issue(&evil, CLIENT_ID);
    let cfg = rustls_client(&evil_client.0, &evil_client.1, &tcp_alpn);
    let tcp = TcpStream::connect(inbound_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("server.default.svc").unwrap();
    if let Ok(mut s) = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
    {
        // TLS 1.3: the client finishes before the server has checked its certificate.
        let _ = s.write_all(b"ping").await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(out.is_empty(), "a refused client got {out:?}");
    }
    // Envoy's listener stats are named by address.
    let listener = format!("listener.127.0.0.1_{inbound}");
    let s = |name: &str| {
        let name = format!("{listener}.{name}");
        async move { loopback_stat(server_admin, &name).await }
    };
    let mut refused = 0;
    for _ in 0..100 {
        refused = s("ssl.fail_verify_error").await;
        if refused > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = skiff::admin::request(
        SocketAddr::from(([127, 0, 0, 1], server_admin)),
        hyper::Method::GET,
        "/stats",
    )
    .await
    .unwrap_or_default();
    let ssl: Vec<&str> = body.lines().filter(|l| l.contains(".ssl.")).collect();
    assert_eq!(refused, 1, "{ssl:?}\n{}", logs.text());
    assert!(
        logs.text()
            .lines()
            .any(|l| l.contains("TLS peer refused") && l.contains(&listener)),
        "the server logs the client it refused"
    );
    assert!(s("ssl.handshake").await >= 4);
    assert!(s("ssl.versions.TLSv1.2").await >= 4);
    assert!(loopback_stat(server_admin, "tls_inspector.tls_found").await >= 6);

    client.stop().await.unwrap();
    server.stop().await.unwrap();
}
