//! tcp_proxy's time limits and connect attempts, end to end through an in-process skiff on a
//! static bootstrap: `idle_timeout` closes a silent connection (and not a busy one),
//! `max_downstream_connection_duration` closes even a busy one, and `max_connect_attempts`
//! tries other hosts before giving up (`upstream_cx_connect_attempts_exceeded` as Envoy).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skiff_tests::{
    InProcessSkiff, free_addr, free_port, lb_endpoints_yaml, loopback_stat as stat, run_options,
    tcp_proxy_listener_yaml,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// A backend that echoes every read at once and keeps the connection open until the peer
/// closes it (so only skiff can end a silent connection).
async fn echo_now() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn cluster(name: &str, eps: &[SocketAddr]) -> String {
    format!(
        "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{}",
        lb_endpoints_yaml(eps)
    )
}

/// Connects, checks one echoed byte, then waits for skiff to close: how long that took after
/// the byte came back (`None`: still open after `WAIT`).
async fn silent_until_closed(port: u16) -> Option<Duration> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    let t = Instant::now();
    match tokio::time::timeout(WAIT, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(t.elapsed()),
        Ok(Ok(_)) => panic!("unexpected bytes"),
        Err(_) => None,
    }
}

/// Talks (one byte each way every 40 ms) for `span`: `true` when the connection stayed open.
async fn busy_for(port: u16, span: Duration) -> bool {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let end = Instant::now() + span;
    while Instant::now() < end {
        let mut b = [0u8; 1];
        if s.write_all(b"b").await.is_err() || s.read_exact(&mut b).await.is_err() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_time_limits_and_connect_attempts() {
    let live = echo_now().await;
    let (dead1, dead2) = (free_addr(), free_addr());
    let (idle_port, dur_port, retry_port, once_port) =
        (free_port(), free_port(), free_port(), free_port());
    let admin = free_port();
    let listeners = [
        tcp_proxy_listener_yaml("idle", idle_port, "idle", "live")
            + "          idle_timeout: 0.2s\n",
        tcp_proxy_listener_yaml("dur", dur_port, "dur", "live")
            + "          max_downstream_connection_duration: 0.3s\n",
        tcp_proxy_listener_yaml("retry", retry_port, "retry", "mostly_dead")
            + "          max_connect_attempts: 3\n",
        tcp_proxy_listener_yaml("once", once_port, "once", "dead"),
    ]
    .concat();
    let yaml = format!(
        "node: {{ id: limits, cluster: limits }}\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\nstatic_resources:\n  listeners:\n{listeners}  clusters:\n{}{}{}",
        cluster("live", &[live]),
        cluster("mostly_dead", &[dead1, dead2, live]),
        cluster("dead", &[dead1]),
    );
    let boot = skiff::config::parse(&yaml, "<limits>").expect("bootstrap");
    let skiff = InProcessSkiff::start(run_options(boot));
    let deadline = Instant::now() + WAIT;
    for p in [idle_port, dur_port, retry_port, once_port] {
        while TcpStream::connect(("127.0.0.1", p)).await.is_err() {
            assert!(Instant::now() < deadline, "listener {p} never bound");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The probes above were closed at once: they are not idle timeouts.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let idle_before = stat(admin, "tcp.idle.idle_timeout").await;
    let dead_before = (
        stat(admin, "cluster.dead.upstream_cx_connect_attempts_exceeded").await,
        stat(admin, "cluster.dead.upstream_cx_connect_fail").await,
    );
    let retry_before = stat(
        admin,
        "cluster.mostly_dead.upstream_cx_connect_attempts_exceeded",
    )
    .await;

    // idle_timeout 200 ms: a silent connection is closed after about that long...
    let took = silent_until_closed(idle_port)
        .await
        .expect("a silent connection must be closed by idle_timeout");
    assert!(
        took >= Duration::from_millis(180) && took < Duration::from_millis(1500),
        "closed after {took:?}"
    );
    // ...and a busy one lives on well past it.
    assert!(busy_for(idle_port, Duration::from_millis(700)).await);
    assert_eq!(stat(admin, "tcp.idle.idle_timeout").await - idle_before, 1);

    // max_downstream_connection_duration 300 ms: even a busy connection ends.
    let t = Instant::now();
    assert!(
        !busy_for(dur_port, Duration::from_secs(3)).await,
        "a connection must end at max_downstream_connection_duration"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(stat(admin, "tcp.dur.max_downstream_connection_duration").await >= 1);

    // max_connect_attempts 3: two dead hosts, one live; each connection reaches the live one.
    for _ in 0..6 {
        assert!(busy_for(retry_port, Duration::from_millis(1)).await);
    }
    assert!(stat(admin, "cluster.mostly_dead.upstream_cx_connect_fail").await >= 2);
    assert_eq!(
        stat(
            admin,
            "cluster.mostly_dead.upstream_cx_connect_attempts_exceeded"
        )
        .await,
        retry_before
    );

    // The default (one attempt): a failed connect closes the connection and uses them up.
    let mut s = TcpStream::connect(("127.0.0.1", once_port)).await.unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, s.read(&mut b)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    assert_eq!(
        stat(admin, "cluster.dead.upstream_cx_connect_attempts_exceeded").await - dead_before.0,
        1
    );
    assert_eq!(
        stat(admin, "cluster.dead.upstream_cx_connect_fail").await - dead_before.1,
        1
    );
    skiff.stop().await.unwrap();
}
