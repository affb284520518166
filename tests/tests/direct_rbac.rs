//! skiff enforces Envoy's RBAC filters (no Envoy needed): a network DENY closes the
//! connections it names, after `delay_deny`, before any upstream sees them; an HTTP DENY answers
//! 403 `RBAC: access denied` instead of forwarding, except on a route whose `RBACPerRoute`
//! turns it off; both count Envoy's `rbac.*` counters. Before RBAC was wired, every one of
//! these connections and requests reached the backend.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use skiff_tests::{
    InProcessSkiff, echo_backend, free_port, loopback_stat, run_options, serve_http1,
};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A connection to 127.0.0.1:`port` from `source` (any 127.0.0.0/8 address).
async fn connect_from(source: IpAddr, port: u16) -> TcpStream {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(source, 0).into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("listener accepts")
}

/// `ping` through the proxy from `source`: the echo backend's answer, or empty when the
/// connection was closed without one.
async fn ping(source: &str, port: u16) -> Vec<u8> {
    let mut s = connect_from(source.parse().unwrap(), port).await;
    let _ = s.write_all(b"ping").await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the proxy must answer or close");
    out
}

/// `GET path` on a new connection; (status, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: svc\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answer within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

fn bootstrap(tcp: u16, http: u16, echo: SocketAddr, web: SocketAddr, admin: u16) -> String {
    format!(
        r#"
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: tcp
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tcp} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: tcp.
          delay_deny: 0.3s
          rules:
            action: DENY
            policies:
              deny-127.0.0.2:
                permissions: [{{ any: true }}]
                principals: [{{ direct_remote_ip: {{ address_prefix: 127.0.0.2, prefix_len: 32 }} }}]
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {http} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  no-admin:
                    permissions: [{{ url_path: {{ path: {{ prefix: /admin }} }} }}]
                    principals: [{{ any: true }}]
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: svc
              domains: ["*"]
              routes:
              - match: {{ prefix: /admin/open }}
                route: {{ cluster: web }}
                typed_per_filter_config:
                  envoy.filters.http.rbac:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute
              - match: {{ prefix: / }}
                route: {{ cluster: web }}
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}]
  - name: web
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: web
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }} }}] }}]
"#,
        echo.port(),
        web.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_policies_block_connections_and_requests() {
    let echo = echo_backend("echo").await;
    // The HTTP backend counts what reaches it.
    let reached = Arc::new(AtomicUsize::new(0));
    let web_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = web_l.local_addr().unwrap();
    let seen = reached.clone();
    serve_http1(web_l, move |_req| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { hyper::Response::new(Full::new(Bytes::from_static(b"backend"))) }
    });
    let (tcp, http, admin) = (free_port(), free_port(), free_port());
    let yaml = bootstrap(tcp, http, echo, web, admin);
    let b = skiff::config::parse(&yaml, "<test>").expect("bootstrap parses");
    let skiff = InProcessSkiff::start(run_options(b));
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", http)).await.is_ok()
            && TcpStream::connect(("127.0.0.1", tcp)).await.is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The readiness probe above opened one TCP connection (allowed, from 127.0.0.1).

    // TCP: 127.0.0.1 is echoed; 127.0.0.2 is closed, after delay_deny, with nothing echoed.
    assert_eq!(ping("127.0.0.1", tcp).await, b"echo:ping");
    let started = Instant::now();
    assert_eq!(ping("127.0.0.2", tcp).await, b"");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed after {waited:?}, before delay_deny"
    );

    // HTTP: /admin is denied before the upstream; the rest, and the route that turns RBAC
    // off, reach it.
    assert_eq!(get(http, "/hello").await, (200, "backend".to_string()));
    assert_eq!(reached.load(Ordering::SeqCst), 1);
    let (status, body) = get(http, "/admin/users").await;
    assert_eq!((status, body.as_str()), (403, skiff::rbac::DENIED_BODY));
    assert_eq!(
        reached.load(Ordering::SeqCst),
        1,
        "a denied request never reaches the upstream"
    );
    assert_eq!(get(http, "/admin/open").await, (200, "backend".to_string()));
    assert_eq!(reached.load(Ordering::SeqCst), 2);

    // Envoy's counters: the network filter's under its stat_prefix, the HTTP filter's under
    // the connection manager's; the route with RBAC off counts nothing.
    assert_eq!(loopback_stat(admin, "tcp.rbac.denied").await, 1);
    assert!(loopback_stat(admin, "tcp.rbac.allowed").await >= 2);
    assert_eq!(loopback_stat(admin, "http.web.rbac.denied").await, 1);
    assert_eq!(loopback_stat(admin, "http.web.rbac.allowed").await, 1);
    assert_eq!(loopback_stat(admin, "http.web.downstream_rq_4xx").await, 1);
    skiff.stop().await.unwrap();
}
