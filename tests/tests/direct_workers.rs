//! Data-plane workers (`skiff run --concurrency N`) in-process: every listener, bootstrap or
//! LDS, has one SO_REUSEPORT socket per worker, the kernel spreads connections over them
//! (Envoy's `listener.<addr>.worker_<i>.downstream_cx_total` shows where each landed), and an
//! LDS removal closes every worker's socket (the port is free again to re-add).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use skiff::controlplane::Source;
use skiff::dataplane::placement::{self, CpuAffinity};
use skiff_tests::{
    ControlPlane, InProcessSkiff, echo_backend, free_addr, free_port, lb_endpoints_yaml,
    run_options, stat_value, tcp_proxy_listener_yaml,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(15);

/// Enough connections that each worker gets some (the kernel hashes each 4-tuple).
const CONNECTIONS: usize = 60;

async fn stats_body(admin: u16) -> String {
    let addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    skiff::admin::request(addr, hyper::Method::GET, "/stats")
        .await
        .unwrap_or_default()
}

/// One echo round trip through the proxy on `port`: what came back, `None` if refused.
async fn echo(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(b"ping").await.ok()?;
    s.shutdown().await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(out)
}

/// Waits until `port` answers the echo (or, with `up` false, refuses connects).
async fn wait_listener(port: u16, up: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = echo(port).await;
        if answer.is_some() == up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {port}: wanted up={up}, got {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens [`CONNECTIONS`] echo connections on `port`, then checks that each of the `workers`
/// accepted some and that the per-worker counts add up to the listener's own.
async fn assert_spread(admin: u16, port: u16, workers: usize) {
    let prefix = format!("listener.127.0.0.1_{port}");
    let before = stats_body(admin).await;
    let before_total = stat_value(&before, &format!("{prefix}.downstream_cx_total"));
    for _ in 0..CONNECTIONS {
        assert_eq!(echo(port).await.as_deref(), Some("b:ping"));
    }
    let body = stats_body(admin).await;
    let total = stat_value(&body, &format!("{prefix}.downstream_cx_total"));
    assert!(total - before_total >= CONNECTIONS as u64, "{body}");
    let per_worker: Vec<u64> = (0..workers)
        .map(|i| stat_value(&body, &format!("{prefix}.worker_{i}.downstream_cx_total")))
        .collect();
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "every worker accepts: {per_worker:?}"
    );
    assert_eq!(per_worker.iter().sum::<u64>(), total, "{body}");
    assert_eq!(
        stat_value(
            &body,
            &format!("{prefix}.worker_{workers}.downstream_cx_total")
        ),
        0,
        "no worker beyond --concurrency"
    );
}

/// A bootstrap with one tcp_proxy listener on `listen` to the cluster of `backend`.
fn static_proxy(listen: u16, backend: SocketAddr) -> skiff::config::Bootstrap {
    let yaml = format!(
        "static_resources:\n  listeners:\n{}  clusters:\n  - name: c\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: c\n      endpoints:\n      - lb_endpoints:\n{}",
        tcp_proxy_listener_yaml("l", listen, "l", "c"),
        lb_endpoints_yaml(&[backend]),
    );
    skiff::config::parse(&yaml, "<test>").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_every_worker() {
    let backend = echo_backend("b").await;
    let listen = free_port();
    let admin = free_port();
    let mut opts = run_options(static_proxy(listen, backend));
    opts.admin = Some(([127, 0, 0, 1], admin).into());
    opts.concurrency = 3;
    let skiff = InProcessSkiff::start(opts);
    wait_listener(listen, true).await;
    assert_spread(admin, listen, 3).await;
    skiff.stop().await.unwrap();
    // Stopping closed every worker's socket.
    assert!(TcpStream::connect(("127.0.0.1", listen)).await.is_err());
}

/// One worker per CPU (the default on an unrestricted machine): each new connection goes to
/// the worker pinned to the CPU its client connected from, whichever CPU that is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_go_to_the_worker_of_their_cpu() {
    let cpus = placement::allowed_cpus().unwrap();
    assert!(
        cpus.len() >= 2,
        "placement needs two CPUs to show; this machine allows {cpus:?}"
    );
    let backend = echo_backend("b").await;
    let listen = free_port();
    let admin = free_port();
    let mut opts = run_options(static_proxy(listen, backend));
    opts.admin = Some(([127, 0, 0, 1], admin).into());
    opts.concurrency = cpus.len();
    assert_eq!(
        opts.cpu_affinity,
        CpuAffinity::Auto,
        "the default places workers"
    );
    let skiff = InProcessSkiff::start(opts);
    wait_listener(listen, true).await;

    let prefix = format!("listener.127.0.0.1_{listen}");
    let per_worker = |body: &str| -> Vec<u64> {
        (0..cpus.len())
            .map(|i| stat_value(body, &format!("{prefix}.worker_{i}.downstream_cx_total")))
            .collect()
    };
    for (i, &cpu) in cpus.iter().enumerate() {
        let before = per_worker(&stats_body(admin).await);
        // A plain thread pinned to the CPU: the SYN is processed where connect() runs.
        tokio::task::spawn_blocking(move || {
            placement::pin_current_thread(cpu).unwrap();
            for _ in 0..5 {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", listen)).unwrap();
                std::io::Write::write_all(&mut s, b"ping").unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut out = String::new();
                std::io::Read::read_to_string(&mut s, &mut out).unwrap();
                assert_eq!(out, "b:ping");
            }
        })
        .await
        .unwrap();
        let after = per_worker(&stats_body(admin).await);
        let added: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let mut want = vec![0; cpus.len()];
        want[i] = 5;
        assert_eq!(added, want, "connections from CPU {cpu} by worker");
    }
    skiff.stop().await.unwrap();
}

/// The LDS resource of listener `front` on 127.0.0.1:`port` (none: an empty LDS).
fn write_lds(dir: &Path, version: u32, port: Option<u16>) {
    let resources = port.map_or(String::new(), |port| {
        format!(
            r#"{{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "front",
  "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}},
  "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.tcp_proxy",
    "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
      "stat_prefix": "front", "cluster": "svc"}}}}]}}]}}"#
        )
    });
    write_atomic(
        dir,
        "listeners.json",
        &format!(r#"{{"version_info": "{version}", "resources": [{resources}]}}"#),
    );
}

/// Writes through a temporary name, so the control plane never reads half a file.
fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lds_listeners_are_added_and_removed_on_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let backend = echo_backend("b").await;
    let listen = free_port();
    let admin = free_port();
    let xds = free_addr();
    write_atomic(
        dir.path(),
        "clusters.json",
        &format!(
            r#"{{"version_info": "1", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc", "type": "STATIC", "connect_timeout": "1s",
  "load_assignment": {{"cluster_name": "svc", "endpoints": [{{"lb_endpoints": [{{"endpoint":
    {{"address": {{"socket_address": {{"address": "{}", "port_value": {}}}}}}}}}]}}]}}}}]}}"#,
            backend.ip(),
            backend.port()
        ),
    );
    write_lds(dir.path(), 1, Some(listen));
    let cp = ControlPlane::start(Source::Dir(dir.path().to_path_buf()), xds).await;
    let bootstrap = skiff_tests::ads_bootstrap("GRPC", "workers", xds, admin);
    let mut opts = run_options(skiff::config::parse(&bootstrap, "<test>").unwrap());
    opts.concurrency = 2;
    // The kernel's hash, so that the spread shows on whatever CPU this test's client runs
    // (with two CPUs, two workers would be placed and steered by CPU).
    opts.cpu_affinity = CpuAffinity::Off;
    let skiff = InProcessSkiff::start(opts);

    wait_listener(listen, true).await;
    assert_spread(admin, listen, 2).await;

    // Removal closes the socket of every worker: no connect finds one still listening.
    write_lds(dir.path(), 2, None);
    wait_listener(listen, false).await;
    for _ in 0..CONNECTIONS {
        assert!(
            TcpStream::connect(("127.0.0.1", listen)).await.is_err(),
            "a worker still listens after the LDS removal"
        );
    }

    // The port is free again: the listener comes back on every worker.
    write_lds(dir.path(), 3, Some(listen));
    wait_listener(listen, true).await;
    assert_spread(admin, listen, 2).await;

    skiff.stop().await.unwrap();
    let _ = cp.stop().await;
}
