//! SDS as Istio's node agent serves it: `skiff control-plane --dir D --sds-socket PATH`
//! serves the directory's Secret resources on a Unix socket; skiff's SDS client
//! (`skiff::xds::sds`) subscribes to `default` and `ROOTCA` and publishes them on its watch
//! channel; a rewritten secret file rotates them, a broken one is NACKed by name while the last
//! good secret keeps serving. The same secrets are served by name over ADS (SotW and delta).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use skiff::config::GrpcTarget;
use skiff::controlplane::{ControlPlaneOptions, Source};
use skiff::model::tls::{DataSource, SecretKind, Secrets};
use skiff::xds::sds::SECRET_TYPE_URL;
use skiff_tests::tls::Ca;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// Writes the `default` (certificate + key) and `ROOTCA` secrets, replacing the file at once.
fn write_secrets(dir: &Path, version: &str, chain: &str, key: &str, root: &str) {
    let secret = |body: serde_json::Value| {
        let mut v = body;
        v["@type"] = SECRET_TYPE_URL.into();
        v
    };
    let file = serde_json::json!({
        "version_info": version,
        "resources": [
            secret(serde_json::json!({
                "name": "default",
                "tls_certificate": {
                    "certificate_chain": {"inline_string": chain},
                    "private_key": {"inline_string": key},
                },
            })),
            secret(serde_json::json!({
                "name": "ROOTCA",
                "validation_context": {"trusted_ca": {"inline_string": root}},
            })),
        ],
    });
    let tmp = dir.join(".secrets.json.tmp");
    std::fs::write(&tmp, file.to_string()).unwrap();
    std::fs::rename(&tmp, dir.join("secrets.json")).unwrap();
}

/// A running control plane and what stops it.
struct Cp {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), skiff::controlplane::ControlPlaneError>>,
}

async fn control_plane(dir: &Path, socket: Option<&Path>) -> Cp {
    control_plane_with(dir, socket, None).await
}

async fn control_plane_with(dir: &Path, socket: Option<&Path>, ads_socket: Option<&Path>) -> Cp {
    let mut opts = ControlPlaneOptions::new(Source::Dir(dir.to_path_buf()));
    opts.ads_socket = ads_socket.map(Path::to_path_buf);
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.poll_interval = Duration::from_millis(50);
    opts.sds_socket = socket.map(Path::to_path_buf);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(skiff::controlplane::serve(
        opts,
        move |a| {
            let _ = bound_tx.send(a);
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let addr = tokio::time::timeout(WAIT, bound_rx)
        .await
        .expect("control plane did not bind")
        .expect("control plane failed before binding");
    Cp { addr, stop, task }
}

impl Cp {
    async fn stop(self) {
        let _ = self.stop.send(());
        let r = tokio::time::timeout(WAIT, self.task).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "control plane did not stop cleanly: {r:?}"
        );
    }
}

fn inline(d: &DataSource) -> String {
    match d {
        DataSource::Inline(b) => String::from_utf8(b.to_vec()).unwrap(),
        DataSource::File(p) => panic!("expected inline PEM, got file {}", p.display()),
    }
}

/// The `default` certificate chain and the `ROOTCA` roots, when both are there.
fn pems(s: &Secrets) -> Option<(String, String)> {
    let chain = match &s.get("default")?.kind {
        SecretKind::Certificate(c) => inline(&c.certificate_chain),
        other => panic!("default is not a certificate: {other:?}"),
    };
    let root = match &s.get("ROOTCA")?.kind {
        SecretKind::Validation(v) => inline(v.trusted_ca.as_ref()?),
        other => panic!("ROOTCA is not a validation context: {other:?}"),
    };
    Some((chain, root))
}

/// Waits until the published secrets satisfy `pred`.
async fn wait_for(rx: &mut watch::Receiver<Secrets>, what: &str, pred: impl Fn(&Secrets) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if pred(&rx.borrow_and_update()) {
            return;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!(
                "timed out waiting for {what}; have {:?}",
                rx.borrow().keys()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_over_a_unix_socket_delivers_and_rotates_default_and_rootca() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let ca = Ca::new("mesh root");
    let spiffe = "spiffe://cluster.local/ns/default/sa/sds-test";
    let first = ca.leaf(&[], &[spiffe]);
    write_secrets(&config, "1", &first.cert, &first.key, &ca.pem);
    let socket = tmp.path().join("workload-spiffe-uds").join("socket");
    std::fs::create_dir(socket.parent().unwrap()).unwrap();
    let cp = control_plane(&config, Some(&socket)).await;

    let (names_tx, names) = watch::channel(BTreeSet::from([
        "default".to_string(),
        "ROOTCA".to_string(),
    ]));
    let (secrets_tx, mut secrets) = watch::channel(Secrets::new());
    let stats = Arc::new(skiff::stats::Stats::default());
    let cancel = CancellationToken::new();
    let node = Node {
        id: "sidecar~127.0.0.1~sds-test.default~default.svc.cluster.local".into(),
        ..Default::default()
    };
    let client = skiff::xds::sds::spawn_with_stats(
        GrpcTarget::Unix(socket.clone()),
        Some(node),
        names,
        secrets_tx,
        stats.clone(),
        cancel.clone(),
    );

    // Both secrets arrive, as the server holds them.
    wait_for(&mut secrets, "default and ROOTCA", |s| {
        pems(s) == Some((first.cert.clone(), ca.pem.clone()))
    })
    .await;

    // Rotation: the file is rewritten with a new certificate; the new one is published.
    let second = ca.leaf(&[], &[spiffe]);
    write_secrets(&config, "2", &second.cert, &second.key, &ca.pem);
    wait_for(&mut secrets, "the rotated default", |s| {
        pems(s).is_some_and(|(chain, _)| chain == second.cert)
    })
    .await;
    assert!(stats.counter("sds.default.update_success").get() >= 2);

    // A broken push is NACKed by name; the last good certificate keeps serving.
    write_secrets(&config, "3", "not a certificate", &second.key, &ca.pem);
    let deadline = Instant::now() + WAIT;
    while stats.counter("sds.default.update_rejected").get() == 0 {
        assert!(
            Instant::now() < deadline,
            "the broken secret was never rejected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pems(&secrets.borrow()).map(|(chain, _)| chain),
        Some(second.cert.clone()),
        "the last good secret keeps serving"
    );

    // The SDS server goes away: the secrets keep serving; it comes back with a rotated
    // certificate and the client, reconnecting with backoff, picks it up.
    cp.stop().await;
    assert!(!socket.exists(), "the SDS socket is removed on shutdown");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pems(&secrets.borrow()).map(|(chain, _)| chain),
        Some(second.cert.clone()),
        "secrets keep serving while the server is gone"
    );
    let third = ca.leaf(&[], &[spiffe]);
    write_secrets(&config, "4", &third.cert, &third.key, &ca.pem);
    let cp = control_plane(&config, Some(&socket)).await;
    wait_for(
        &mut secrets,
        "the certificate served after the restart",
        |s| pems(s).is_some_and(|(chain, _)| chain == third.cert),
    )
    .await;
    assert!(stats.counter("skiff.sds.connect_failure").get() >= 1);

    // The subscription follows the names: ROOTCA dropped, it leaves the published map.
    names_tx.send_replace(BTreeSet::from(["default".to_string()]));
    wait_for(&mut secrets, "ROOTCA to go", |s| {
        !s.contains_key("ROOTCA") && s.contains_key("default")
    })
    .await;

    // No names: nothing published and no stream; names again: a new stream delivers them.
    names_tx.send_replace(BTreeSet::new());
    wait_for(&mut secrets, "an empty map", Secrets::is_empty).await;
    names_tx.send_replace(BTreeSet::from(["ROOTCA".to_string()]));
    wait_for(&mut secrets, "ROOTCA again", |s| s.contains_key("ROOTCA")).await;

    cancel.cancel();
    tokio::time::timeout(WAIT, client).await.unwrap().unwrap();
    cp.stop().await;
    assert!(!socket.exists(), "the SDS socket is removed on shutdown");
}

/// One request, then a stream kept open (a closed request stream would end the ADS stream).
fn open_stream<T: Send + 'static>(first: T) -> impl tokio_stream::Stream<Item = T> + Send {
    use tokio_stream::StreamExt as _;
    tokio_stream::iter([first]).chain(tokio_stream::pending())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_served_by_name_over_ads() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("mesh root");
    let leaf = ca.leaf(&[], &["spiffe://cluster.local/ns/default/sa/ads"]);
    write_secrets(tmp.path(), "7", &leaf.cert, &leaf.key, &ca.pem);
    let cp = control_plane(tmp.path(), None).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.addr))
        .await
        .unwrap();

    // State of the world: only the subscribed name comes back.
    let req = DiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names: vec!["ROOTCA".into()],
        ..Default::default()
    };
    let mut sotw = client
        .stream_aggregated_resources(open_stream(req))
        .await
        .unwrap()
        .into_inner();
    let resp = tokio::time::timeout(WAIT, sotw.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.version_info, "7");
    assert_eq!(resp.resources.len(), 1);
    let secret: envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret =
        prost::Message::decode(resp.resources[0].value.as_slice()).unwrap();
    assert_eq!(secret.name, "ROOTCA");

    // Delta: the same, by subscription.
    let req = DeltaDiscoveryRequest {
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["default".into()],
        ..Default::default()
    };
    let mut delta = client
        .delta_aggregated_resources(open_stream(req))
        .await
        .unwrap()
        .into_inner();
    let resp = tokio::time::timeout(WAIT, delta.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let names: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["default"]);
    drop((sotw, delta));
    cp.stop().await;
}

/// Istio's sidecar layout end to end: the bootstrap's `xds-grpc` and `sds-grpc` clusters are
/// Unix sockets (pilot-agent's), skiff takes its configuration over ADS and its workload
/// certificate over SDS from them, and a rotated certificate reaches the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_layout_ads_and_sds_over_unix_sockets() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config");
    std::fs::create_dir(&config).unwrap();
    let ca = Ca::new("mesh root");
    let spiffe = "spiffe://cluster.local/ns/default/sa/istio-layout";
    let first = ca.leaf(&[], &[spiffe]);
    write_secrets(&config, "1", &first.cert, &first.key, &ca.pem);
    // pilot-agent's two sockets: its xDS proxy and its SDS server.
    let socket = tmp.path().join("sds.sock");
    let xds_socket = tmp.path().join("XDS");
    let cp = control_plane_with(&config, Some(&socket), Some(&xds_socket)).await;
    let admin = skiff_tests::free_port();
    let sock = socket.display();
    let xds = xds_socket.display();
    // A static cluster whose TLS takes `default` and `ROOTCA` from sds-grpc, as istiod's
    // outbound clusters do.
    let bootstrap = format!(
        r#"
node: {{id: "sidecar~127.0.0.1~layout.default~default.svc.cluster.local", cluster: layout}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{xds}"}}}}}}}}]}}]
  - name: sds-grpc
    type: STATIC
    load_assignment:
      cluster_name: sds-grpc
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{pipe: {{path: "{sock}"}}}}}}}}]}}]
  - name: mtls
    type: STATIC
    load_assignment:
      cluster_name: mtls
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificate_sds_secret_configs:
          - name: default
            sds_config: {{api_config_source: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]}}, resource_api_version: V3}}
          combined_validation_context:
            default_validation_context: {{}}
            validation_context_sds_secret_config:
              name: ROOTCA
              sds_config: {{api_config_source: {{api_type: GRPC, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: sds-grpc}}}}]}}, resource_api_version: V3}}
"#
    );
    let bootstrap = skiff::config::parse(&bootstrap, "layout.yaml").unwrap();
    let skiff = skiff_tests::InProcessSkiff::start(skiff_tests::run_options(bootstrap));
    let stats = |path: &'static str| async move {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin)) else {
                return String::new();
            };
            let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        })
        .await
        .unwrap()
    };
    // ADS over the socket: the (empty) CDS answer is applied; SDS: both secrets arrive.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = stats("/stats").await;
        let dump = stats("/config_dump?resource=dynamic_active_secrets").await;
        if s.contains("cluster_manager.cds.update_success: 1")
            && s.contains("sds.default.update_success: 1")
            && s.contains("sds.ROOTCA.update_success: 1")
            && dump.contains("\"name\": \"default\"")
            && dump.contains("\"name\": \"ROOTCA\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ADS/SDS over the sockets:\n{s}\n{dump}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Rotation: the new certificate is taken (the data plane's use of it is direct_tls_rotation).
    let second = ca.leaf(&[], &[spiffe]);
    write_secrets(&config, "2", &second.cert, &second.key, &ca.pem);
    let deadline = Instant::now() + WAIT;
    while !stats("/stats")
        .await
        .contains("sds.default.update_success: 2")
    {
        assert!(Instant::now() < deadline, "rotated certificate not served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    skiff.stop().await.unwrap();
    cp.stop().await;
}
