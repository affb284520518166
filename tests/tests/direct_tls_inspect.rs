//! The tls_inspector listener filter, end to end in an in-process skiff: real rustls
//! ClientHellos choose filter chains by SNI (exact, then wildcard), by ALPN and by
//! `transport_protocol: tls`, while plaintext on the same port keeps its own chain; the bytes
//! reach the chosen backend untouched (TLS passthrough). Before the inspector, every one of
//! these connections took the plaintext chain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skiff_tests::{InProcessSkiff, echo_backend, free_port, loopback_stat, run_options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The first flight of a rustls client for `server` (an IP address sends no SNI) offering
/// `alpn`.
fn client_hello(server: &str, alpn: &[&str]) -> Vec<u8> {
    // ring is the project's one crypto provider; only its post-quantum default is missing.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(server.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Send `bytes` in small pieces, half-close, and return what comes back.
async fn send(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    for piece in bytes.chunks(100) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    out
}

fn cluster(name: &str, backend: SocketAddr) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}]"#,
        backend.port()
    )
}

fn chain(matcher: &str, cluster: &str) -> String {
    format!(
        r#"
    - filter_chain_match: {matcher}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {cluster}
          cluster: {cluster}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_alpn_and_transport_choose_the_chain() {
    let names = ["exact", "wild", "alpn", "tls", "plain"];
    let mut clusters = String::new();
    for n in names {
        clusters.push_str(&cluster(n, echo_backend(n).await));
    }
    let (port, admin) = (free_port(), free_port());
    let chains = [
        chain("{ server_names: [a.example.com] }", "exact"),
        chain("{ server_names: ['*.example.com'] }", "wild"),
        chain(
            "{ transport_protocol: tls, application_protocols: [istio-peer-exchange, istio] }",
            "alpn",
        ),
        chain("{ transport_protocol: tls }", "tls"),
        chain("{ transport_protocol: raw_buffer }", "plain"),
    ]
    .concat();
    let yaml = format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: inspected
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    - name: envoy.filters.listener.http_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector
    filter_chains:{chains}
  clusters:{clusters}
"#
    );
    let b = skiff::config::parse(&yaml, "<test>").expect("bootstrap parses");
    let skiff = InProcessSkiff::start(run_options(b));
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cases: [(&str, Vec<u8>); 6] = [
        ("exact", client_hello("a.example.com", &["h2"])),
        (
            "wild",
            client_hello("b.example.com", &["istio-peer-exchange"]),
        ),
        ("wild", client_hello("x.y.example.com", &[])),
        (
            "alpn",
            client_hello("127.0.0.1", &["istio-peer-exchange", "istio", "h2"]),
        ),
        ("tls", client_hello("other.test", &["h2", "http/1.1"])),
        (
            "plain",
            b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n".to_vec(),
        ),
    ];
    for (want, bytes) in &cases {
        let got = send(port, bytes).await;
        let prefix = format!("{want}:");
        assert!(
            got.starts_with(prefix.as_bytes()),
            "expected the {want} chain, got {:?}",
            String::from_utf8_lossy(&got[..got.len().min(20)])
        );
        // The backend saw exactly what the client sent: the inspector peeked, never consumed.
        assert_eq!(&got[prefix.len()..], &bytes[..], "{want}: bytes changed");
    }
    assert_eq!(loopback_stat(admin, "tls_inspector.tls_found").await, 5);
    assert_eq!(loopback_stat(admin, "tls_inspector.sni_found").await, 4);
    assert_eq!(loopback_stat(admin, "tls_inspector.sni_not_found").await, 1);
    assert_eq!(loopback_stat(admin, "tls_inspector.alpn_found").await, 4);
    // The readiness probe (no bytes, closed) and the plaintext request.
    assert!(loopback_stat(admin, "tls_inspector.tls_not_found").await >= 1);
    skiff.stop().await.unwrap();
}
