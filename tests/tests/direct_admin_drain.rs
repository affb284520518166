//! `/drain_listeners` through a whole in-process skiff: the listener stops accepting while a
//! connection opened before the drain keeps working, as in Envoy. Needs the admin wiring in
//! `app::run_with` (`admin::serve` with the run's `DrainSignal`).

use std::time::Duration;

use skiff_tests::{InProcessSkiff, echo_backend, free_port, run_options, tcp_proxy_listener_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn admin_post(admin: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_accepting_and_keeps_connections() {
    let backend = echo_backend("b").await;
    let listen = free_port();
    let admin = free_port();
    let yaml = format!(
        "static_resources:\n  listeners:\n{}  clusters:\n  - name: c\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: c\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n",
        tcp_proxy_listener_yaml("l", listen, "l", "c"),
        backend.ip(),
        backend.port()
    );
    let mut opts = run_options(skiff::config::parse(&yaml, "<test>").unwrap());
    opts.admin = Some(([127, 0, 0, 1], admin).into());
    opts.admin_options.allow_mutations = true;
    let skiff = InProcessSkiff::start(opts);
    let mut before = None;
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", listen)).await {
            before = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut before = before.expect("listener up");
    let answer = admin_post(admin, "/drain_listeners").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The listener closes: new connects are refused.
    let mut refused = false;
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", listen)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener still accepts after /drain_listeners");
    // The connection from before the drain still carries data.
    before.write_all(b"ping").await.unwrap();
    before.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), before.read_to_end(&mut out))
        .await
        .expect("echo through the drained listener's connection")
        .unwrap();
    assert_eq!(out, b"b:ping");
    drop(before);
    skiff.stop().await.unwrap();
}
