//! Unprivileged end-to-end tests: skiff runs in-process with `--capture none` and proxies real
//! TCP connections between loopback clients and loopback backends.

use skiff_tests::free_port;
use std::net::SocketAddr;
use std::time::Duration;

use skiff::app::{RunOptions, run};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A backend that answers each connection with `<name>:` followed by everything it read, and
/// closes only after the client's EOF (so it proves half-close reached it).
async fn backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_err() {
                    return;
                }
                let _ = s.write_all(format!("{name}:").as_bytes()).await;
                let _ = s.write_all(&buf).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn bootstrap(listen: u16, endpoints: &[SocketAddr]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| {
            format!(
                "        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}",
                e.ip(),
                e.port()
            )
        })
        .collect();
    format!(
        r#"
static_resources:
  listeners:
  - name: front
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: front
          cluster: backends
  clusters:
  - name: backends
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backends
      endpoints:
      - lb_endpoints:
{}
"#,
        eps.join("\n")
    )
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap().unwrap();
    }
}

async fn start(yaml: &str, listen: u16) -> Running {
    let bootstrap = skiff::config::parse(yaml, "<test>").expect("bootstrap must parse");
    let (tx, rx) = oneshot::channel();
    let opts = RunOptions {
        bootstrap,
        capture: None,
        outbound_v4: std::net::SocketAddrV4::new([127, 0, 0, 1].into(), free_port()),
        outbound_v6: None,
        upstream_mark: None,
        admin: None,
        drain: Duration::from_secs(1),
    };
    let task = tokio::spawn(run(opts, async {
        let _ = rx.await;
    }));
    // Wait until the listener accepts.
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", listen)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running {
        stop: Some(tx),
        task,
    }
}

async fn roundtrip(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("proxy must pass the backend's answer and close")
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_round_robins_and_half_closes() {
    let a = backend("A").await;
    let b = backend("B").await;
    let port = free_port();
    let skiff = start(&bootstrap(port, &[a, b]), port).await;
    // The readiness probe made one connection too, and its task may pick after ours: round
    // robin over 9 picks, so the 8 counted here split 4/4 or 5/3.
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..8 {
        let msg = format!("hello {i}");
        let out = roundtrip(port, msg.as_bytes()).await;
        let text = String::from_utf8(out).unwrap();
        let (who, echoed) = text.split_once(':').expect("backend prefix");
        assert_eq!(echoed, msg, "bytes must round-trip unchanged");
        *seen.entry(who.to_string()).or_insert(0u32) += 1;
    }
    assert_eq!(seen.len(), 2, "both endpoints used: {seen:?}");
    let (a, b) = (seen["A"], seen["B"]);
    assert_eq!(a + b, 8);
    assert!(a.abs_diff(b) <= 2, "round robin alternates: {seen:?}");
    skiff.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_is_byte_exact() {
    let a = backend("A").await;
    let port = free_port();
    let skiff = start(&bootstrap(port, &[a]), port).await;
    let payload: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let out = roundtrip(port, &payload).await;
    assert_eq!(&out[..2], b"A:");
    assert!(
        out[2..] == payload[..],
        "4 MiB must come back byte for byte"
    );
    skiff.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_closes_the_client_quickly() {
    // Nothing listens on this port: the upstream connect is refused and skiff closes the
    // client at once. The client sees EOF, or a reset when skiff closed with its byte unread.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let port = free_port();
    let skiff = start(&bootstrap(port, &[dead]), port).await;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(b"x").await;
    let mut out = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the client must not hang when the endpoint is down");
    match res {
        Ok(_) => assert!(out.is_empty(), "no bytes may come from a dead endpoint"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    skiff.stop().await;
}

#[test]
fn invalid_bootstrap_names_resource_and_field() {
    let yaml = bootstrap(10000, &["127.0.0.1:0".parse().unwrap()]);
    let err = skiff::config::parse(&yaml, "b.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster \"backends\""), "{err}");
    assert!(
        err.contains("load_assignment.endpoints[0].lb_endpoints[0]"),
        "{err}"
    );
    assert!(err.contains("port 0"), "{err}");

    let err = skiff::config::parse("static_resources: { listeners: [ { name: x } ] }", "b.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listener \"x\": address"), "{err}");

    let err = skiff::config::parse("static_resources: [", "b.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("bootstrap b.yaml"), "{err}");
}
