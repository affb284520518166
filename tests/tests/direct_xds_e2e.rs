//! skiff's ADS client against skiff's own control plane, both in-process, with real traffic:
//! initial load, update, NACK of an invalid resource (last good keeps serving), a
//! control-plane restart (traffic continues, the config resyncs), and removal (of the listener;
//! of the cluster, whose stats leave /stats). Run for SotW and delta.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use skiff::controlplane::Source;
use skiff_tests::{
    ControlPlane, InProcessSkiff, eventually_answers as eventually, free_addr, free_port,
    named_backend as backend, run_options, tcp_ask as ask,
};

const WAIT: Duration = Duration::from_secs(15);

fn write_config(dir: &Path, version: &str, listen: u16, backend: SocketAddr, bad: bool) {
    let lds = format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "front",
  "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {listen}}}}},
  "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.tcp_proxy",
    "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
      "stat_prefix": "front", "cluster": "svc"}}}}]}}]}}]}}"#
    );
    let bad_cluster = if bad {
        r#", {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "broken",
             "type": "STATIC", "connect_timeout": "1s",
             "load_assignment": {"cluster_name": "broken", "endpoints": [{"lb_endpoints": [
               {"endpoint": {"address": {"socket_address": {"address": "not-an-ip", "port_value": 1}}}}]}]}}"#
    } else {
        ""
    };
    let cds = format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc", "type": "EDS", "connect_timeout": "1s",
  "eds_cluster_config": {{"eds_config": {{"ads": {{}}}}}}}}{bad_cluster}]}}"#
    );
    let eds = format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
  "cluster_name": "svc",
  "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address":
    {{"address": "{}", "port_value": {}}}}}}}}}]}}]}}]}}"#,
        backend.ip(),
        backend.port()
    );
    // Write to a temp name and rename, so the poller never reads half a file.
    for (name, text) in [
        ("listeners.json", lds),
        ("clusters.json", cds),
        ("endpoints.json", eds),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// skiff's control plane serving the discovery files in `dir` on `listen`.
async fn control_plane(dir: &Path, listen: SocketAddr) -> ControlPlane {
    ControlPlane::start(Source::Dir(dir.to_path_buf()), listen).await
}

fn bootstrap(api: &str, xds: SocketAddr, admin: u16) -> String {
    skiff_tests::ads_bootstrap(api, "e2e", xds, admin)
}

async fn stats_body(admin: u16) -> String {
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    skiff::admin::request(addr, hyper::Method::GET, "/stats")
        .await
        .unwrap_or_default()
}

async fn stat(admin: u16, name: &str) -> u64 {
    skiff_tests::stat_value(&stats_body(admin).await, name)
}

async fn scenario(api: &str) {
    let dir = tempfile::tempdir().unwrap();
    let a = backend("A").await;
    let b = backend("B").await;
    let listen = free_port();
    let admin = free_port();
    let xds = free_addr();
    write_config(dir.path(), "1", listen, a, false);
    let cp = control_plane(dir.path(), xds).await;

    let skiff = start_skiff(&bootstrap(api, xds, admin));

    // Initial load: listener -> EDS cluster (warms until its endpoints arrive) -> A.
    eventually(listen, Some("A")).await;
    // Update: the endpoint moves to B.
    write_config(dir.path(), "2", listen, b, false);
    eventually(listen, Some("B")).await;
    // An invalid cluster is NACKed; the valid part applies (Envoy's CDS rule) and traffic flows.
    write_config(dir.path(), "3", listen, a, true);
    eventually(listen, Some("A")).await;
    let deadline = Instant::now() + WAIT;
    while stat(admin, "cluster_manager.cds.update_rejected").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the invalid cluster was never NACKed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ask(listen).await.as_deref(),
        Some("A"),
        "last good keeps serving"
    );

    // Control plane restart: traffic continues while it is gone, then the config resyncs.
    let _ = cp.stop().await;
    assert_eq!(
        ask(listen).await.as_deref(),
        Some("A"),
        "serving without a control plane"
    );
    write_config(dir.path(), "4", listen, b, false);
    let cp = control_plane(dir.path(), xds).await;
    eventually(listen, Some("B")).await;

    // Removal: an empty LDS closes the listener.
    std::fs::write(
        dir.path().join("listeners.json"),
        r#"{"version_info": "5", "resources": []}"#,
    )
    .unwrap();
    eventually(listen, None).await;

    // Removal of the cluster: its stats leave /stats, as in Envoy.
    assert!(stat(admin, "cluster.svc.upstream_cx_total").await > 0);
    std::fs::write(
        dir.path().join("clusters.json"),
        r#"{"version_info": "6", "resources": []}"#,
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = stats_body(admin).await;
        if !listed.lines().any(|l| l.starts_with("cluster.svc.")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the removed cluster's stats are still listed:\n{listed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    skiff.stop().await.unwrap();
    let _ = cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_against_skiff_control_plane() {
    scenario("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_against_skiff_control_plane() {
    scenario("DELTA_GRPC").await;
}

/// `/ready` answers 200 (LIVE) only when `ready` is set.
async fn is_ready(admin: u16) -> bool {
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    skiff::admin::request(addr, hyper::Method::GET, "/ready")
        .await
        .is_ok()
}

/// Starts skiff in-process on `bootstrap`.
fn start_skiff(bootstrap: &str) -> InProcessSkiff {
    InProcessSkiff::start(run_options(
        skiff::config::parse(bootstrap, "<e2e>").unwrap(),
    ))
}

/// As Envoy: not ready until the first LDS and CDS responses are in and nothing warms, or
/// until `initial_fetch_timeout` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_initial_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let a = backend("A").await;
    let listen = free_port();
    let admin = free_port();
    let xds = free_addr();
    write_config(dir.path(), "1", listen, a, false);

    // No control plane yet: the admin answers, but not ready (default timeout 15 s).
    let skiff = start_skiff(&bootstrap("GRPC", xds, admin));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!is_ready(admin).await, "ready before any configuration");
    let cp = control_plane(dir.path(), xds).await;
    let deadline = Instant::now() + WAIT;
    while !is_ready(admin).await {
        assert!(
            Instant::now() < deadline,
            "never ready after the initial fetch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ready means configured: the listener and its warmed EDS cluster already serve.
    assert_eq!(ask(listen).await.as_deref(), Some("A"));
    skiff.stop().await.unwrap();
    let _ = cp.stop().await;

    // With initial_fetch_timeout 1s and no control plane, skiff goes live with what it has.
    let admin = free_port();
    let nowhere = free_addr();
    let text = bootstrap("GRPC", nowhere, admin).replace(
        "lds_config: { ads: {} }",
        "lds_config: { ads: {}, initial_fetch_timeout: 1s }",
    );
    let text = text.replace(
        "cds_config: { ads: {} }",
        "cds_config: { ads: {}, initial_fetch_timeout: 1s }",
    );
    let started = Instant::now();
    let skiff = start_skiff(&text);
    while !is_ready(admin).await {
        assert!(
            started.elapsed() < WAIT,
            "initial_fetch_timeout not honoured"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "ready after {:?}, before the 1 s initial_fetch_timeout",
        started.elapsed()
    );
    skiff.stop().await.unwrap();
}
