//! Secrets over ADS (SDS on the ADS stream), end to end through skiff's own control plane and
//! an in-process skiff, state of the world and delta: a cluster whose TLS names a secret with
//! `sds_config: {ads: {}}` warms until the secret arrives, `/config_dump` shows the secret as
//! Envoy does (private key `[redacted]`), and a bad secret is NACKed by name while the last
//! good one keeps serving.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skiff::controlplane::Source;
use skiff_tests::{ControlPlane, InProcessSkiff, free_addr, free_port, run_options};

const WAIT: Duration = Duration::from_secs(15);

fn write(dir: &Path, name: &str, v: &Value) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, v.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A listener on `listen` to the plain cluster, and cluster `mtls` whose client certificate
/// is the ADS secret `client-cert`.
fn write_config(dir: &Path, listen: u16) {
    write(
        dir,
        "listeners.json",
        &json!({"version_info": "1", "resources": [{
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "front",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "front", "cluster": "mtls"}}]}]}]}),
    );
    write(
        dir,
        "clusters.json",
        &json!({"version_info": "1", "resources": [{
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "mtls", "type": "STATIC", "connect_timeout": "1s",
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "backend.example",
                "common_tls_context": {"tls_certificate_sds_secret_configs": [
                    {"name": "client-cert", "sds_config": {"ads": {}}}]}}},
            "load_assignment": {"cluster_name": "mtls", "endpoints": [{"lb_endpoints": [{"endpoint":
                {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}]}),
    );
}

fn write_secret(dir: &Path, version: &str, cert: &str, key: &str) {
    write(
        dir,
        "secrets.json",
        &json!({"version_info": version, "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "client-cert",
            "tls_certificate": {
                "certificate_chain": {"inline_string": cert},
                "private_key": {"inline_string": key}}}]}),
    );
}

async fn config_dump(admin: SocketAddr) -> Value {
    let body = skiff::admin::request(admin, hyper::Method::GET, "/config_dump")
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

fn section<'a>(dump: &'a Value, ty: &str) -> &'a Value {
    dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["@type"].as_str().is_some_and(|t| t.ends_with(ty)))
        .unwrap_or_else(|| panic!("no {ty} in {dump}"))
}

fn cluster_names(dump: &Value, field: &str) -> Vec<String> {
    section(dump, "ClustersConfigDump")[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["cluster"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Polls `/config_dump` until `ok` holds; panics with the last dump.
async fn until(admin: SocketAddr, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Ok(body)) = tokio::time::timeout(
            Duration::from_secs(2),
            skiff::admin::request(admin, hyper::Method::GET, "/config_dump"),
        )
        .await
            && let Ok(dump) = serde_json::from_str::<Value>(&body)
            && ok(&dump)
        {
            return dump;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}: {}", config_dump(admin).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn secrets_over_ads(api: &str) {
    let c = rcgen::generate_simple_self_signed(vec!["client.example".to_string()]).unwrap();
    let (cert, key) = (c.cert.pem(), c.signing_key.serialize_pem());
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin_port, xds) = (free_port(), free_port(), free_addr());
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    write_config(dir.path(), listen);
    let cp = ControlPlane::start(Source::Dir(dir.path().to_path_buf()), xds).await;
    let boot = skiff_tests::ads_bootstrap(api, "sds", xds, admin_port);
    let skiff = InProcessSkiff::start(run_options(skiff::config::parse(&boot, "<sds>").unwrap()));

    // No secret yet: the cluster warms, the listener naming it is served.
    until(admin, "the cluster warming", |d| {
        cluster_names(d, "dynamic_warming_clusters") == ["mtls"]
    })
    .await;

    write_secret(dir.path(), "1", &cert, &key);
    let dump = until(admin, "the cluster active", |d| {
        cluster_names(d, "dynamic_active_clusters") == ["mtls"]
    })
    .await;
    let secrets = section(&dump, "SecretsConfigDump");
    let s = &secrets["dynamic_active_secrets"][0];
    assert_eq!(s["name"], "client-cert", "{secrets}");
    // SotW: the response's version; delta: the resource's own version.
    let v1 = s["version_info"].clone();
    assert!(v1.is_string(), "{s}");
    let tls = &s["secret"]["tls_certificate"];
    assert_eq!(tls["private_key"]["inline_string"], "[redacted]");
    assert_eq!(tls["certificate_chain"]["inline_string"], cert.as_str());
    assert!(
        !dump.to_string().contains("PRIVATE KEY"),
        "/config_dump must not show a private key"
    );

    // Version 2 puts the certificate where the key belongs: NACKed by name, 1 keeps serving.
    write_secret(dir.path(), "2", &cert, &cert);
    let dump = until(admin, "the secret's error state", |d| {
        section(d, "SecretsConfigDump")["dynamic_active_secrets"][0]["error_state"]["details"]
            .as_str()
            .is_some_and(|t| t.contains("client-cert") && t.contains("tls_certificate.private_key"))
    })
    .await;
    let s = &section(&dump, "SecretsConfigDump")["dynamic_active_secrets"][0];
    assert_eq!(s["version_info"], v1, "the last good secret stays: {s}");
    assert_eq!(cluster_names(&dump, "dynamic_active_clusters"), ["mtls"]);

    skiff.stop().await.unwrap();
    let _ = cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_over_ads_sotw() {
    secrets_over_ads("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_over_ads_delta() {
    secrets_over_ads("DELTA_GRPC").await;
}
