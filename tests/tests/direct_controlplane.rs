//! Unprivileged tests of `skiff control-plane`: the ADS server runs in-process on
//! 127.0.0.1:0 and a real gRPC ADS client (envoy-types' generated one) talks to it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{ControlPlane as ControlPlaneId, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status;
use skiff::controlplane::{ControlPlaneOptions, Source, serve};
use skiff_tests::ControlPlane;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

const LISTENER: &str = "0.0.0.0_50002";
const CLUSTER: &str = "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local";
const ROUTE: &str = "50002";

/// Longest wait for an expected response.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched (several poll intervals).
const QUIET: Duration = Duration::from_millis(700);

// === harness ===

/// Log lines of every test in this binary (the NACK test looks for its own node id).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || LogWriter(writer.clone()))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        // eprint! (not io::stderr) so the test harness captures it with the test output.
        eprint!("{}", String::from_utf8_lossy(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(needle: &str) -> Vec<String> {
    let buf = logs().lock().unwrap();
    String::from_utf8_lossy(&buf)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// The harness's in-process control plane on 127.0.0.1:0, with this binary's log capture.
async fn start_cp(source: Source) -> ControlPlane {
    logs();
    ControlPlane::start(source, "127.0.0.1:0".parse().unwrap()).await
}

/// ADS clients of the control plane under test.
trait AdsClients {
    async fn client(&self) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel>;
    async fn sotw(&self, node: &str) -> Sotw;
    async fn delta(&self, node: &str) -> Delta;
}

impl AdsClients for ControlPlane {
    async fn client(&self) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
        tokio::time::timeout(
            WAIT,
            AggregatedDiscoveryServiceClient::connect(format!("http://{}", self.addr())),
        )
        .await
        .expect("connect timed out")
        .expect("connect failed")
    }

    async fn sotw(&self, node: &str) -> Sotw {
        let (tx, rx) = mpsc::channel(16);
        let mut client = self.client().await;
        let responses = tokio::time::timeout(
            WAIT,
            client.stream_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .expect("stream open timed out")
        .expect("stream open failed")
        .into_inner();
        Sotw {
            tx,
            responses,
            node: node.to_owned(),
        }
    }

    async fn delta(&self, node: &str) -> Delta {
        let (tx, rx) = mpsc::channel(16);
        let mut client = self.client().await;
        let responses = tokio::time::timeout(
            WAIT,
            client.delta_aggregated_resources(ReceiverStream::new(rx)),
        )
        .await
        .expect("stream open timed out")
        .expect("stream open failed")
        .into_inner();
        Delta {
            tx,
            responses,
            node: node.to_owned(),
        }
    }
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        ..Default::default()
    })
}

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
    node: String,
}

impl Sotw {
    async fn request(&self, type_url: &str, names: &[&str], ack_of: Option<&DiscoveryResponse>) {
        let (version_info, response_nonce) = ack_of
            .map(|r| (r.version_info.clone(), r.nonce.clone()))
            .unwrap_or_default();
        self.send(DiscoveryRequest {
            version_info,
            node: node(&self.node),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: type_url.to_owned(),
            response_nonce,
            ..Default::default()
        })
        .await;
    }

    async fn send(&self, request: DiscoveryRequest) {
        self.tx.send(request).await.expect("request stream closed");
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.request(&r.type_url, names, Some(r)).await;
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        recv_from_skiff(&mut self.responses, "response", |r| {
            r.control_plane.as_ref()
        })
        .await
    }

    async fn expect_quiet(&mut self) {
        expect_quiet(&mut self.responses, "response", |r| {
            format!("{:?}", r.map(|r| r.map(|r| summary(&r))))
        })
        .await;
    }
}

struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: tonic::Streaming<DeltaDiscoveryResponse>,
    node: String,
}

impl Delta {
    async fn send(&self, mut request: DeltaDiscoveryRequest) {
        request.node = node(&self.node);
        self.tx.send(request).await.expect("request stream closed");
    }

    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        })
        .await;
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        recv_from_skiff(&mut self.responses, "delta response", |r| {
            r.control_plane.as_ref()
        })
        .await
    }

    async fn expect_quiet(&mut self) {
        expect_quiet(&mut self.responses, "delta response", |r| format!("{r:?}")).await;
    }
}

/// The next message on `responses` within [`WAIT`], asserted to come from skiff's control
/// plane (its `control_plane.identifier`).
async fn recv_from_skiff<T>(
    responses: &mut tonic::Streaming<T>,
    what: &str,
    control_plane: impl Fn(&T) -> Option<&ControlPlaneId>,
) -> T {
    let r = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap_or_else(|_| panic!("no {what} in time"))
        .expect("stream failed")
        .expect("stream ended");
    assert_eq!(
        control_plane(&r).map(|c| c.identifier.as_str()),
        Some("skiff-control-plane")
    );
    r
}

/// Panics (showing it with `show`) if anything arrives on `responses` within [`QUIET`].
async fn expect_quiet<T>(
    responses: &mut tonic::Streaming<T>,
    what: &str,
    show: impl FnOnce(Result<Option<T>, tonic::Status>) -> String,
) {
    if let Ok(r) = tokio::time::timeout(QUIET, responses.message()).await {
        panic!("expected no {what}, got {}", show(r));
    }
}

fn summary(r: &DiscoveryResponse) -> (String, String, Vec<String>) {
    (r.type_url.clone(), r.version_info.clone(), names(r))
}

/// Resource names of a SotW response, decoded from field 1 of each resource (the name of
/// every xDS type, `cluster_name` for endpoints).
fn names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources.iter().map(|a| name_of(&a.value)).collect()
}

fn name_of(bytes: &[u8]) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Named {
        #[prost(string, tag = "1")]
        name: String,
    }
    <Named as prost::Message>::decode(bytes)
        .expect("resource decodes")
        .name
}

fn delta_names(r: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    r.resources
        .iter()
        .map(|res| {
            let any = res.resource.as_ref().expect("resource body");
            assert_eq!(name_of(&any.value), res.name, "name matches the body");
            (res.name.clone(), res.version.clone())
        })
        .collect()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A temp dir holding a copy of the seed-scenario-loopback discovery files.
fn seed_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "listeners.json",
        "clusters.json",
        "routes.json",
        "endpoints.json",
    ] {
        std::fs::copy(
            fixtures().join("seed-scenario-loopback").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    dir
}

/// Rewrites `file`'s top-level `version_info` (and optionally drops resources by name).
fn rewrite(dir: &Path, file: &str, version: &str, drop_names: &[&str]) {
    let path = dir.join(file);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["version_info"] = version.into();
    if let Some(list) = v["resources"].as_array_mut() {
        list.retain(|r| {
            let n = r["name"]
                .as_str()
                .or(r["cluster_name"].as_str())
                .unwrap_or("");
            !drop_names.contains(&n)
        });
    }
    // Write to a temp name and rename, as editors and Kubernetes ConfigMaps do.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

// === state of the world ===

#[tokio::test]
async fn sotw_wildcard_and_named_subscriptions() {
    let dir = seed_dir();
    let cp = start_cp(Source::Dir(dir.path().to_owned())).await;
    let mut s = cp.sotw("sotw-basic").await;

    s.request(CDS, &[], None).await;
    let cds = s.recv().await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(cds.version_info, "1");
    assert_eq!(names(&cds), [CLUSTER]);
    assert!(!cds.nonce.is_empty());

    s.request(LDS, &["*"], None).await;
    let lds = s.recv().await;
    assert_eq!(
        (lds.type_url.as_str(), names(&lds)),
        (LDS, vec![LISTENER.to_owned()])
    );

    // RDS and EDS: only what was subscribed, and only what exists.
    s.request(RDS, &[ROUTE, "no-such-route"], None).await;
    let rds = s.recv().await;
    assert_eq!(names(&rds), [ROUTE]);
    s.request(EDS, &["no-such-cluster"], None).await;
    let eds = s.recv().await;
    assert!(eds.resources.is_empty(), "{:?}", summary(&eds));

    // Subscribing to more names answers at once with the new subset.
    s.ack(&eds, &["no-such-cluster", CLUSTER]).await;
    let eds2 = s.recv().await;
    assert_eq!(names(&eds2), [CLUSTER]);
    assert_ne!(eds2.nonce, eds.nonce);

    // ACKs of everything: nothing is sent again.
    s.ack(&cds, &[]).await;
    s.ack(&lds, &["*"]).await;
    s.ack(&rds, &[ROUTE, "no-such-route"]).await;
    s.ack(&eds2, &["no-such-cluster", CLUSTER]).await;
    s.expect_quiet().await;
    let acks = log_lines_with("sotw-basic")
        .into_iter()
        .filter(|l| l.contains(" ACK"))
        .count();
    // The subscription change above also ACKed the first EDS response: five in all.
    assert_eq!(acks, 5, "every ACK is logged once");

    // A reconnecting client may carry the version and a nonce of its previous stream: that is
    // a new subscription on this stream, answered at once.
    let mut again = cp.sotw("sotw-basic-again").await;
    again.ack(&lds, &[]).await;
    let lds_again = again.recv().await;
    assert_eq!(names(&lds_again), [LISTENER]);
    cp.stop().await.expect("control plane stops cleanly");
}

#[tokio::test]
async fn sotw_pushes_edits_and_keeps_serving_through_a_broken_file() {
    let dir = seed_dir();
    let cp = start_cp(Source::Dir(dir.path().to_owned())).await;
    let mut s = cp.sotw("sotw-edit").await;
    s.request(LDS, &[], None).await;
    let lds = s.recv().await;
    s.ack(&lds, &[]).await;
    s.request(CDS, &[], None).await;
    let cds = s.recv().await;
    s.ack(&cds, &[]).await;
    s.expect_quiet().await;

    // A new version of the listeners file is pushed; clusters are untouched.
    rewrite(dir.path(), "listeners.json", "2", &[]);
    let pushed = s.recv().await;
    assert_eq!(
        (pushed.type_url.as_str(), pushed.version_info.as_str()),
        (LDS, "2")
    );
    assert_eq!(names(&pushed), [LISTENER]);
    s.ack(&pushed, &[]).await;
    s.expect_quiet().await;

    // A clusters file that does not parse: nothing pushed, the previous version stays served
    // (also to a client that connects now).
    std::fs::write(
        dir.path().join("clusters.json"),
        "{\"version_info\": \"9\", \"resources\": [",
    )
    .unwrap();
    s.expect_quiet().await;
    let mut late = cp.sotw("sotw-edit-late").await;
    late.request(CDS, &[], None).await;
    let late_cds = late.recv().await;
    assert_eq!(late_cds.version_info, "1");
    assert_eq!(names(&late_cds), [CLUSTER]);
    let broken = dir.path().join("clusters.json").display().to_string();
    assert!(
        log_lines_with(&broken)
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("does not parse")),
        "the broken file is reported with its name"
    );

    // Fixed with a new version: both clients get it.
    std::fs::copy(
        fixtures().join("seed-scenario-loopback/clusters.json"),
        dir.path().join("clusters.json"),
    )
    .unwrap();
    rewrite(dir.path(), "clusters.json", "3", &[]);
    for c in [&mut s, &mut late] {
        let r = c.recv().await;
        assert_eq!((r.type_url.as_str(), r.version_info.as_str()), (CDS, "3"));
    }
    cp.stop().await.expect("control plane stops cleanly");
}

#[tokio::test]
async fn sotw_nack_is_logged_and_not_answered_with_the_same_version() {
    let dir = seed_dir();
    let cp = start_cp(Source::Dir(dir.path().to_owned())).await;
    let mut s = cp.sotw("sotw-nacker").await;
    s.request(CDS, &[], None).await;
    let cds = s.recv().await;
    s.send(DiscoveryRequest {
        version_info: String::new(), // nothing accepted yet
        node: node("sotw-nacker"),
        type_url: CDS.to_owned(),
        response_nonce: cds.nonce.clone(),
        error_detail: Some(Status {
            code: 3,
            message: "cluster x: unsupported field".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    s.expect_quiet().await;
    let nacks: Vec<String> = log_lines_with("sotw-nacker")
        .into_iter()
        .filter(|l| l.contains("NACK"))
        .collect();
    assert_eq!(nacks.len(), 1, "{nacks:?}");
    for needle in [
        "WARN",
        CDS,
        "cluster x: unsupported field",
        &cds.nonce,
        "version=\"1\"",
    ] {
        assert!(
            nacks[0].contains(needle),
            "{needle:?} missing in {}",
            nacks[0]
        );
    }

    // The server is still there: a new version is pushed after the NACK.
    rewrite(dir.path(), "clusters.json", "2", &[]);
    let next = s.recv().await;
    assert_eq!(next.version_info, "2");
    cp.stop().await.expect("control plane stops cleanly");
}

// === delta ===

#[tokio::test]
async fn delta_wildcard_subscribe_remove_and_reconnect() {
    let dir = seed_dir();
    let cp = start_cp(Source::Dir(dir.path().to_owned())).await;
    let mut d = cp.delta("delta-1").await;

    // Wildcard CDS (empty initial subscribe).
    d.subscribe(CDS, &[]).await;
    let cds = d.recv().await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(cds.system_version_info, "1");
    let cds_have = delta_names(&cds);
    assert_eq!(
        cds_have.keys().cloned().collect::<BTreeSet<_>>(),
        set(&[CLUSTER])
    );
    d.ack(&cds).await;

    // Named RDS: only the subscribed route; a missing name comes back as removed.
    d.subscribe(RDS, &[ROUTE, "ghost"]).await;
    let rds = d.recv().await;
    assert_eq!(
        delta_names(&rds).keys().cloned().collect::<BTreeSet<_>>(),
        set(&[ROUTE])
    );
    assert_eq!(rds.removed_resources, ["ghost"]);
    d.ack(&rds).await;

    // Wildcard LDS with "*".
    d.subscribe(LDS, &["*"]).await;
    let lds = d.recv().await;
    let lds_have = delta_names(&lds);
    assert_eq!(
        lds_have.keys().cloned().collect::<BTreeSet<_>>(),
        set(&[LISTENER])
    );
    d.ack(&lds).await;
    d.expect_quiet().await;

    // Removing the listener from its file shows up in removed_resources.
    rewrite(dir.path(), "listeners.json", "2", &[LISTENER]);
    let removed = d.recv().await;
    assert_eq!(removed.type_url, LDS);
    assert_eq!(removed.system_version_info, "2");
    assert!(removed.resources.is_empty());
    assert_eq!(removed.removed_resources, [LISTENER]);
    d.ack(&removed).await;
    d.expect_quiet().await;
    drop(d);

    // Reconnect claiming what we had: the unchanged cluster is not resent, the listener we
    // still claim is reported removed, and only changed clusters arrive.
    let mut d = cp.delta("delta-1").await;
    d.send(DeltaDiscoveryRequest {
        type_url: CDS.to_owned(),
        initial_resource_versions: cds_have.clone().into_iter().collect(),
        ..Default::default()
    })
    .await;
    let again = d.recv().await;
    assert!(
        again.resources.is_empty(),
        "unchanged cluster resent: {again:?}"
    );
    assert!(again.removed_resources.is_empty());
    d.ack(&again).await;

    d.send(DeltaDiscoveryRequest {
        type_url: LDS.to_owned(),
        initial_resource_versions: lds_have.into_iter().collect(),
        ..Default::default()
    })
    .await;
    let lds_again = d.recv().await;
    assert!(lds_again.resources.is_empty());
    assert_eq!(lds_again.removed_resources, [LISTENER]);
    d.ack(&lds_again).await;

    // A cluster changed while we were connected: only it arrives, with a new hash version.
    let path = dir.path().join("clusters.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["version_info"] = "2".into();
    v["resources"][0]["connect_timeout"] = "7s".into();
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let changed = d.recv().await;
    assert_eq!(changed.type_url, CDS);
    let now = delta_names(&changed);
    assert_eq!(
        now.keys().cloned().collect::<BTreeSet<_>>(),
        set(&[CLUSTER])
    );
    assert_ne!(
        now[CLUSTER], cds_have[CLUSTER],
        "per-resource version follows the bytes"
    );

    // NACK: logged, nothing resent.
    d.send(DeltaDiscoveryRequest {
        type_url: CDS.to_owned(),
        response_nonce: changed.nonce.clone(),
        error_detail: Some(Status {
            code: 3,
            message: "delta says no".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    d.expect_quiet().await;
    assert!(
        log_lines_with("delta says no")
            .iter()
            .any(|l| l.contains("NACK") && l.contains("delta-1") && l.contains(&changed.nonce)),
        "delta NACK logged"
    );
    cp.stop().await.expect("control plane stops cleanly");
}

// === config dump ===

/// Per type URL: names and the versions the dump records for its dynamic resources.
fn dump_expectations(path: &Path) -> BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> {
    let dump: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for section in dump["configs"].as_array().unwrap() {
        let section_version = section["version_info"].as_str().unwrap_or("");
        let (type_url, lists, field, name_field): (&str, &[&str], &str, &str) =
            match section["@type"].as_str().unwrap() {
                "type.googleapis.com/envoy.admin.v3.ListenersConfigDump" => {
                    (LDS, &["dynamic_listeners"], "listener", "name")
                }
                "type.googleapis.com/envoy.admin.v3.ClustersConfigDump" => {
                    (CDS, &["dynamic_active_clusters"], "cluster", "name")
                }
                "type.googleapis.com/envoy.admin.v3.RoutesConfigDump" => {
                    (RDS, &["dynamic_route_configs"], "route_config", "name")
                }
                "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump" => (
                    EDS,
                    &["dynamic_endpoint_configs"],
                    "endpoint_config",
                    "cluster_name",
                ),
                _ => continue,
            };
        for list in lists {
            for entry in section[*list].as_array().into_iter().flatten() {
                let entry = if *list == "dynamic_listeners" {
                    &entry["active_state"]
                } else {
                    entry
                };
                let name = entry[field][name_field].as_str().unwrap().to_owned();
                let version = entry["version_info"].as_str().unwrap_or(section_version);
                let e = out.entry(type_url.to_owned()).or_default();
                e.0.insert(name);
                if !version.is_empty() {
                    e.1.insert(version.to_owned());
                }
            }
        }
    }
    out
}

async fn check_config_dump(file: &str) {
    let path = fixtures().join("xds").join(file);
    let expected = dump_expectations(&path);
    assert!(!expected.is_empty(), "{file} has dynamic resources");
    let cp = start_cp(Source::ConfigDump(path)).await;
    let mut s = cp.sotw("dump-reader").await;
    let mut d = cp.delta("dump-reader-delta").await;
    for (type_url, (want_names, versions)) in &expected {
        let names_ref: Vec<&str> = want_names.iter().map(String::as_str).collect();
        s.request(type_url, &names_ref, None).await;
        let r = s.recv().await;
        assert_eq!(&r.type_url, type_url);
        assert_eq!(
            names(&r).into_iter().collect::<BTreeSet<_>>(),
            *want_names,
            "{file} {type_url}"
        );
        // One version per type: the dump's newest (every fixture here has at most one, or
        // integer versions).
        if let Some(newest) = versions
            .iter()
            .max_by_key(|v| (v.parse::<u64>().unwrap_or(0), (*v).clone()))
        {
            assert_eq!(&r.version_info, newest, "{file} {type_url}");
        } else {
            assert!(!r.version_info.is_empty(), "a content hash stands in");
        }

        d.subscribe(type_url, &names_ref).await;
        let dr = d.recv().await;
        assert_eq!(&dr.type_url, type_url);
        assert_eq!(dr.system_version_info, r.version_info);
        assert_eq!(
            delta_names(&dr).into_keys().collect::<BTreeSet<_>>(),
            *want_names
        );
    }
    cp.stop().await.expect("control plane stops cleanly");
}

#[tokio::test]
async fn config_dump_istio_serves_its_dynamic_resources() {
    check_config_dump("istio-proxyconfig-full.json").await;
}

#[tokio::test]
async fn config_dump_osm_serves_newest_version_per_type() {
    check_config_dump("osm-curl-egress-config-dump.json").await;
}

#[tokio::test]
async fn config_dump_kuma_serves_its_dynamic_resources() {
    check_config_dump("kuma-full-config-dump.json").await;
}

#[tokio::test]
async fn missing_source_fails_before_binding() {
    let (tx, rx) = oneshot::channel::<SocketAddr>();
    let opts = ControlPlaneOptions::new(Source::ConfigDump(PathBuf::from(
        "/nonexistent/skiff/config_dump.json",
    )));
    let result = tokio::time::timeout(
        WAIT,
        serve(
            opts,
            move |a| {
                let _ = tx.send(a);
            },
            std::future::pending(),
        ),
    )
    .await
    .expect("serve returned in time");
    assert!(result.is_err());
    assert!(rx.await.is_err(), "never bound");
}
