//! Unprivileged end-to-end tests: skiff runs in-process with `--capture none` and proxies real
//! TCP connections between loopback clients and loopback backends.

use std::net::SocketAddr;
use std::time::Duration;

use skiff_tests::{
    InProcessSkiff, echo_backend as backend, free_addr, free_port, lb_endpoints_yaml, run_options,
    tcp_proxy_listener_yaml,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bootstrap(listen: u16, endpoints: &[SocketAddr]) -> String {
    let front = tcp_proxy_listener_yaml("front", listen, "front", "backends");
    format!(
        r#"
static_resources:
  listeners:
{front}  clusters:
  - name: backends
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backends
      endpoints:
      - lb_endpoints:
{}"#,
        lb_endpoints_yaml(endpoints)
    )
}

async fn start(yaml: &str, listen: u16) -> InProcessSkiff {
    let bootstrap = skiff::config::parse(yaml, "<test>").expect("bootstrap must parse");
    let mut opts = run_options(bootstrap);
    opts.admin = None;
    opts.drain = Duration::from_secs(1);
    let skiff = InProcessSkiff::start(opts);
    // Wait until the listener accepts.
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", listen)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    skiff
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
    skiff.stop().await.unwrap();
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
    skiff.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_closes_the_client_quickly() {
    // Nothing listens on this port: the upstream connect is refused and skiff closes the
    // client at once. The client sees EOF, or a reset when skiff closed with its byte unread.
    let dead = free_addr();
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
    skiff.stop().await.unwrap();
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
