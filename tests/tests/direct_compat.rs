//! Honour or refuse, through skiff's own control plane (issue 14): a listener update carrying a
//! network filter skiff cannot run is NACKed by skiff's ADS client with the filter's name in
//! `error_detail` (what the control plane logs on the NACK), and the previous listener keeps
//! serving; an observational filter is accepted and counted in `skiff.unsupported.<name>`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff::controlplane::Source;
use skiff_tests::{
    ControlPlane, InProcessSkiff, eventually_answers as eventually, free_addr, free_port,
    loopback_stat, named_backend as backend, run_options, tcp_ask as ask,
};

const WAIT: Duration = Duration::from_secs(15);

/// The log lines of this test process, where the control plane reports each NACK.
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

/// Version `version` of the configuration: listener `front` with `extra` network filters
/// before a tcp_proxy to `cluster`; clusters `a` and `b` on the two backends.
fn write_config(
    dir: &Path,
    version: &str,
    listen: u16,
    extra: &str,
    cluster: &str,
    a: SocketAddr,
    b: SocketAddr,
) {
    let lds = format!(
        r#"{{"version_info": "{version}", "resources": [{{
  "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
  "name": "front",
  "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {listen}}}}},
  "filter_chains": [{{"filters": [{extra}{{"name": "envoy.filters.network.tcp_proxy",
    "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
      "stat_prefix": "front", "cluster": "{cluster}"}}}}]}}]}}]}}"#
    );
    let cluster = |name: &str, at: SocketAddr| {
        format!(
            r#"{{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "{name}", "type": "STATIC", "connect_timeout": "1s",
  "load_assignment": {{"cluster_name": "{name}", "endpoints": [{{"lb_endpoints": [{{"endpoint":
    {{"address": {{"socket_address": {{"address": "{}", "port_value": {}}}}}}}}}]}}]}}}}"#,
            at.ip(),
            at.port()
        )
    };
    let cds = format!(
        r#"{{"version_info": "{version}", "resources": [{}, {}]}}"#,
        cluster("a", a),
        cluster("b", b)
    );
    for (name, text) in [("listeners.json", lds), ("clusters.json", cds)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

// Observational and not run (`istio.stats`, now honoured, used to be the example here).
const METADATA_EXCHANGE: &str = r#"{"name": "istio.metadata_exchange", "typed_config": {
  "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
  "type_url": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
  "value": {"protocol": "istio-peer-exchange"}}},"#;

const RATE_LIMIT: &str = r#"{"name": "envoy.filters.network.local_ratelimit", "typed_config": {
  "@type": "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
  "stat_prefix": "rl", "token_bucket": {"max_tokens": 1, "fill_interval": "1s"}}},"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_filter_is_nacked_by_name_and_last_good_keeps_serving() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (backend("A").await, backend("B").await);
    let (listen, admin, xds) = (free_port(), free_port(), free_addr());
    write_config(dir.path(), "1", listen, METADATA_EXCHANGE, "a", a, b);
    let cp = ControlPlane::start(Source::Dir(dir.path().to_path_buf()), xds).await;
    let boot = skiff_tests::ads_bootstrap("GRPC", "compat", xds, admin);
    let skiff = InProcessSkiff::start(run_options(
        skiff::config::parse(&boot, "<compat>").unwrap(),
    ));

    // The observational filter is accepted, not run, and counted.
    eventually(listen, Some("A")).await;
    assert_eq!(
        loopback_stat(admin, "skiff.unsupported.istio.metadata_exchange").await,
        1
    );

    // Version 2 adds a rate limit skiff cannot enforce and moves traffic to B: refused.
    write_config(dir.path(), "2", listen, RATE_LIMIT, "b", a, b);
    let deadline = Instant::now() + WAIT;
    let nack = loop {
        let text = logs.text();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("NACK") && l.contains("envoy.filters.network.local_ratelimit"))
        {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no NACK naming the filter reached the control plane; logs:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        nack.contains("front"),
        "the NACK names the listener: {nack}"
    );
    assert!(nack.contains("filters[0]"), "and the field: {nack}");
    assert!(loopback_stat(admin, "listener_manager.lds.update_rejected").await >= 1);
    // Last good keeps serving: still A, never B.
    for _ in 0..5 {
        assert_eq!(ask(listen).await.as_deref(), Some("A"));
    }

    skiff.stop().await.unwrap();
    let _ = cp.stop().await;
}
