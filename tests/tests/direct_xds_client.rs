//! Unprivileged end-to-end tests of skiff's ADS client: an in-test ADS server (the generated
//! tonic service) scripts responses and observes requests (ACK/NACK/error_detail), while skiff
//! runs in-process through `skiff::app::run` and proxies real loopback connections.

use skiff_tests::{InProcessSkiff, echo_backend as backend, free_port, run_options};
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cpb;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as epb;
use envoy_types::pb::envoy::config::listener::v3 as lpb;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const WAIT: Duration = Duration::from_secs(10);

// === the scripted ADS server ===

/// One ADS stream as the test sees it: requests in, responses out. Dropping it ends the stream.
struct Stream_<Req, Resp> {
    reqs: mpsc::UnboundedReceiver<Req>,
    resps: mpsc::UnboundedSender<Result<Resp, tonic::Status>>,
}

type Sotw = Stream_<DiscoveryRequest, DiscoveryResponse>;
type Delta = Stream_<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

struct Ads {
    sotw: mpsc::UnboundedSender<Sotw>,
    delta: mpsc::UnboundedSender<Delta>,
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

fn pipe<Req: Send + 'static, Resp>(
    mut inbound: tonic::Streaming<Req>,
) -> (
    Stream_<Req, Resp>,
    UnboundedReceiverStream<Result<Resp, tonic::Status>>,
) {
    let (qtx, qrx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(r)) = inbound.message().await {
            if qtx.send(r).is_err() {
                return;
            }
        }
    });
    let (rtx, rrx) = mpsc::unbounded_channel();
    (
        Stream_ {
            reqs: qrx,
            resps: rtx,
        },
        UnboundedReceiverStream::new(rrx),
    )
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (s, out) = pipe(request.into_inner());
        let _ = self.sotw.send(s);
        Ok(tonic::Response::new(Box::pin(out)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (s, out) = pipe(request.into_inner());
        let _ = self.delta.send(s);
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

struct Server {
    addr: SocketAddr,
    sotw: mpsc::UnboundedReceiver<Sotw>,
    delta: mpsc::UnboundedReceiver<Delta>,
}

async fn ads_server() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (stx, srx) = mpsc::unbounded_channel();
    let (dtx, drx) = mpsc::unbounded_channel();
    let svc = AggregatedDiscoveryServiceServer::new(Ads {
        sotw: stx,
        delta: dtx,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(svc, tonic::transport::server::TcpIncoming::from(l)),
    );
    Server {
        addr,
        sotw: srx,
        delta: drx,
    }
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting")
        .expect("channel closed")
}

/// Read requests until one matches.
async fn wait_req<T: std::fmt::Debug>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    what: &str,
    pred: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("stream closed");
        if pred(&r) {
            return r;
        }
    }
}

// === resources ===

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

fn addr(a: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                a.port().into(),
            )),
            ..Default::default()
        })),
    }
}

fn listener(name: &str, port: u16, cluster: &str) -> Any {
    let t = tcp::TcpProxy {
        stat_prefix: name.into(),
        cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
        ..Default::default()
    };
    any(
        LDS,
        &lpb::Listener {
            name: name.into(),
            address: Some(addr(SocketAddr::from(([127, 0, 0, 1], port)))),
            filter_chains: vec![lpb::FilterChain {
                filters: vec![lpb::Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(lpb::filter::ConfigType::TypedConfig(any(
                        "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        &t,
                    ))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

/// A listener skiff must refuse: no filter chain.
fn bad_listener(name: &str, port: u16) -> Any {
    any(
        LDS,
        &lpb::Listener {
            name: name.into(),
            address: Some(addr(SocketAddr::from(([127, 0, 0, 1], port)))),
            ..Default::default()
        },
    )
}

fn eds_cluster(name: &str) -> Any {
    any(
        CDS,
        &cpb::Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cpb::cluster::ClusterDiscoveryType::Type(
                cpb::cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cpb::cluster::EdsClusterConfig {
                service_name: name.into(),
                ..Default::default()
            }),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
}

/// A cluster skiff (and Envoy, when building it) must refuse: its endpoint is not an IP.
fn bad_cluster(name: &str) -> Any {
    let mut la = epb::ClusterLoadAssignment::decode(
        cla(name, SocketAddr::from(([127, 0, 0, 1], 1)))
            .value
            .as_slice(),
    )
    .unwrap();
    if let Some(epb::lb_endpoint::HostIdentifier::Endpoint(e)) =
        &mut la.endpoints[0].lb_endpoints[0].host_identifier
        && let Some(core::address::Address::SocketAddress(sa)) =
            e.address.as_mut().and_then(|a| a.address.as_mut())
    {
        sa.address = "not-an-ip".into();
    }
    any(
        CDS,
        &cpb::Cluster {
            name: name.into(),
            load_assignment: Some(la),
            ..Default::default()
        },
    )
}

fn cla(name: &str, backend: SocketAddr) -> Any {
    any(
        EDS,
        &epb::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![epb::LocalityLbEndpoints {
                locality: Some(core::Locality {
                    region: "r1".into(),
                    zone: "z1".into(),
                    ..Default::default()
                }),
                lb_endpoints: vec![epb::LbEndpoint {
                    host_identifier: Some(epb::lb_endpoint::HostIdentifier::Endpoint(
                        epb::Endpoint {
                            address: Some(addr(backend)),
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

fn sotw(
    type_url: &str,
    version: &str,
    nonce: &str,
    resources: Vec<Any>,
) -> Result<DiscoveryResponse, tonic::Status> {
    Ok(DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: type_url.into(),
        nonce: nonce.into(),
        ..Default::default()
    })
}

fn delta(
    type_url: &str,
    nonce: &str,
    resources: Vec<(&str, &str, Any)>,
    removed: &[&str],
) -> Result<DeltaDiscoveryResponse, tonic::Status> {
    Ok(DeltaDiscoveryResponse {
        system_version_info: nonce.into(),
        resources: resources
            .into_iter()
            .map(|(name, version, a)| Resource {
                name: name.into(),
                version: version.into(),
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        type_url: type_url.into(),
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        nonce: nonce.into(),
        ..Default::default()
    })
}

// === skiff and traffic ===

async fn roundtrip(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(b"hi").await.ok()?;
    s.shutdown().await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(out)
}

/// Retry until the listener on `port` answers `want` (config propagates asynchronously).
async fn eventually_answers(port: u16, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        last = roundtrip(port).await;
        if last.as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port}: wanted {want:?}, last answer {last:?}");
}

async fn eventually_closed(port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} still accepts");
}

struct Skiff {
    admin: SocketAddr,
    running: InProcessSkiff,
}

impl Skiff {
    async fn get(&self, path: &str) -> String {
        skiff::admin::request(self.admin, hyper::Method::GET, path)
            .await
            .unwrap()
    }
    async fn config_dump(&self, q: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(&format!("/config_dump{q}")).await).unwrap()
    }
    async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

async fn start_skiff(server: SocketAddr, api: &str) -> Skiff {
    let yaml = format!(
        r#"
node: {{ id: test-node, cluster: test-cluster, metadata: {{ team: skiff }} }}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc:
        cluster_name: xds
        retry_policy: {{ retry_back_off: {{ base_interval: 0.05s, max_interval: 0.5s }} }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}
"#,
        server.port()
    );
    let bootstrap = skiff::config::parse(&yaml, "<test>").expect("bootstrap must parse");
    assert!(bootstrap.ads.is_some() && bootstrap.lds_ads && bootstrap.cds_ads);
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut opts = run_options(bootstrap);
    opts.admin = Some(admin);
    Skiff {
        admin,
        running: InProcessSkiff::start(opts),
    }
}

fn names(v: &serde_json::Value, field: &str) -> Vec<String> {
    let mut out = Vec::new();
    for c in v["configs"].as_array().unwrap() {
        if let Some(a) = c.get(field).and_then(|a| a.as_array()) {
            for e in a {
                let n = e
                    .get("name")
                    .or_else(|| e.get("cluster").and_then(|c| c.get("name")))
                    .and_then(|n| n.as_str())
                    .unwrap_or_default();
                out.push(n.to_string());
            }
        }
    }
    out
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_load_warming_update_nack_and_removal() {
    let a = backend("A").await;
    let b = backend("B").await;
    let port = free_port();
    let mut server = ads_server().await;
    let skiff = start_skiff(server.addr, "GRPC").await;
    let mut s = next(&mut server.sotw).await;

    // First requests: CDS and LDS wildcard, the node on the first one.
    let first = next(&mut s.reqs).await;
    assert_eq!(first.type_url, CDS);
    let node = first.node.expect("node on the first request");
    assert_eq!(
        (node.id.as_str(), node.cluster.as_str()),
        ("test-node", "test-cluster")
    );
    assert!(first.resource_names.is_empty() && first.version_info.is_empty());
    wait_req(&mut s.reqs, "LDS request", |r| r.type_url == LDS).await;

    // CDS: an EDS cluster warms until its endpoints arrive.
    s.resps
        .send(sotw(CDS, "c1", "n1", vec![eds_cluster("backends")]))
        .unwrap();
    let ack = wait_req(&mut s.reqs, "CDS ACK", |r| r.type_url == CDS).await;
    assert_eq!(
        (ack.version_info.as_str(), ack.response_nonce.as_str()),
        ("c1", "n1")
    );
    assert!(ack.error_detail.is_none());
    let eds = wait_req(&mut s.reqs, "EDS subscription", |r| r.type_url == EDS).await;
    assert_eq!(eds.resource_names, ["backends"]);
    let dump = skiff.config_dump("").await;
    assert_eq!(names(&dump, "dynamic_warming_clusters"), ["backends"]);
    assert!(names(&dump, "dynamic_active_clusters").is_empty());
    assert!(!skiff.get("/clusters").await.contains("backends::"));

    s.resps
        .send(sotw(
            LDS,
            "l1",
            "n2",
            vec![listener("front", port, "backends")],
        ))
        .unwrap();
    wait_req(&mut s.reqs, "LDS ACK", |r| {
        r.type_url == LDS && r.response_nonce == "n2"
    })
    .await;
    s.resps
        .send(sotw(EDS, "e1", "n3", vec![cla("backends", a)]))
        .unwrap();
    let ack = wait_req(&mut s.reqs, "EDS ACK", |r| {
        r.type_url == EDS && r.response_nonce == "n3"
    })
    .await;
    assert_eq!(ack.version_info, "e1");
    eventually_answers(port, "A:hi").await;

    let dump = skiff.config_dump("").await;
    assert_eq!(names(&dump, "dynamic_active_clusters"), ["backends"]);
    assert_eq!(names(&dump, "dynamic_listeners"), ["front"]);
    let clusters = skiff.get("/clusters").await;
    assert!(
        clusters.contains(&format!("backends::{a}::health_flags::healthy")),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("backends::{a}::zone::z1")),
        "{clusters}"
    );
    let eds_dump = skiff.config_dump("?include_eds").await;
    assert!(eds_dump.to_string().contains("EndpointsConfigDump"));
    assert!(!dump.to_string().contains("EndpointsConfigDump"));
    let only = skiff.config_dump("?resource=dynamic_listeners").await;
    assert_eq!(only["configs"][0]["name"], "front");
    assert_eq!(
        only["configs"][0]["@type"],
        "type.googleapis.com/envoy.admin.v3.ListenersConfigDump.DynamicListener"
    );

    // Update: endpoints move to B.
    s.resps
        .send(sotw(EDS, "e2", "n4", vec![cla("backends", b)]))
        .unwrap();
    wait_req(&mut s.reqs, "EDS ACK 2", |r| r.response_nonce == "n4").await;
    eventually_answers(port, "B:hi").await;

    // NACK: valid resources apply (Envoy), the invalid one is reported; traffic keeps flowing.
    s.resps
        .send(sotw(
            CDS,
            "c2",
            "n5",
            vec![eds_cluster("backends"), bad_cluster("broken")],
        ))
        .unwrap();
    let nack = wait_req(&mut s.reqs, "CDS NACK", |r| r.response_nonce == "n5").await;
    assert_eq!(
        nack.version_info, "c1",
        "a NACK carries the previous good version"
    );
    let detail = nack.error_detail.expect("error_detail");
    assert_eq!(detail.code, 3);
    assert!(
        detail.message.contains("broken: load_assignment"),
        "{}",
        detail.message
    );
    s.resps
        .send(sotw(LDS, "l2", "n6", vec![bad_listener("front", port)]))
        .unwrap();
    let nack = wait_req(&mut s.reqs, "LDS NACK", |r| r.response_nonce == "n6").await;
    assert_eq!(nack.version_info, "l1");
    assert!(
        nack.error_detail
            .unwrap()
            .message
            .contains("front: filter_chains")
    );
    eventually_answers(port, "B:hi").await;
    let dump = skiff.config_dump("?resource=dynamic_listeners").await;
    let entry = &dump["configs"][0];
    assert_eq!(entry["active_state"]["version_info"], "l1");
    assert!(
        entry["error_state"]["details"]
            .as_str()
            .unwrap()
            .contains("front:")
    );
    let stats = skiff.get("/stats").await;
    assert!(
        stats.contains("cluster_manager.cds.update_rejected: 1"),
        "{stats}"
    );
    assert!(
        stats.contains("listener_manager.lds.update_rejected: 1"),
        "{stats}"
    );
    assert!(
        stats.contains("control_plane.connected_state: 1"),
        "{stats}"
    );
    let prom = skiff.get("/stats/prometheus").await;
    assert!(
        prom.contains("envoy_cluster_manager_cds_update_success{} "),
        "{prom}"
    );

    // Removal: the listener goes away, its port stops accepting.
    s.resps.send(sotw(LDS, "l3", "n7", vec![])).unwrap();
    let ack = wait_req(&mut s.reqs, "LDS ACK 3", |r| r.response_nonce == "n7").await;
    assert_eq!(ack.version_info, "l3");
    eventually_closed(port).await;
    skiff.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_initial_update_and_removal() {
    let a = backend("A").await;
    let b = backend("B").await;
    let port = free_port();
    let mut server = ads_server().await;
    let skiff = start_skiff(server.addr, "DELTA_GRPC").await;
    let mut s = next(&mut server.delta).await;
    let first = next(&mut s.reqs).await;
    assert_eq!(first.type_url, CDS);
    assert!(first.node.is_some());

    s.resps
        .send(delta(
            CDS,
            "d1",
            vec![("backends", "v1", eds_cluster("backends"))],
            &[],
        ))
        .unwrap();
    let ack = wait_req(&mut s.reqs, "CDS ACK", |r| r.response_nonce == "d1").await;
    assert!(ack.error_detail.is_none());
    let sub = wait_req(&mut s.reqs, "EDS subscribe", |r| r.type_url == EDS).await;
    assert_eq!(sub.resource_names_subscribe, ["backends"]);
    s.resps
        .send(delta(
            EDS,
            "d2",
            vec![("backends", "v1", cla("backends", a))],
            &[],
        ))
        .unwrap();
    s.resps
        .send(delta(
            LDS,
            "d3",
            vec![("front", "v1", listener("front", port, "backends"))],
            &[],
        ))
        .unwrap();
    wait_req(&mut s.reqs, "LDS ACK", |r| r.response_nonce == "d3").await;
    eventually_answers(port, "A:hi").await;

    s.resps
        .send(delta(
            EDS,
            "d4",
            vec![("backends", "v2", cla("backends", b))],
            &[],
        ))
        .unwrap();
    eventually_answers(port, "B:hi").await;

    // Delta NACK: a bad cluster is refused, with error_detail.
    s.resps
        .send(delta(
            CDS,
            "d5",
            vec![("broken", "v1", bad_cluster("broken"))],
            &[],
        ))
        .unwrap();
    let nack = wait_req(&mut s.reqs, "CDS NACK", |r| r.response_nonce == "d5").await;
    assert!(nack.error_detail.unwrap().message.contains("broken:"));

    s.resps.send(delta(LDS, "d6", vec![], &["front"])).unwrap();
    wait_req(&mut s.reqs, "LDS ACK", |r| r.response_nonce == "d6").await;
    eventually_closed(port).await;
    skiff.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_loss_keeps_serving_and_resubscribes() {
    let a = backend("A").await;
    let port = free_port();
    let mut server = ads_server().await;
    let skiff = start_skiff(server.addr, "GRPC").await;
    let mut s = next(&mut server.sotw).await;
    s.resps
        .send(sotw(CDS, "c1", "n1", vec![eds_cluster("backends")]))
        .unwrap();
    wait_req(&mut s.reqs, "EDS subscription", |r| r.type_url == EDS).await;
    s.resps
        .send(sotw(EDS, "e1", "n2", vec![cla("backends", a)]))
        .unwrap();
    s.resps
        .send(sotw(
            LDS,
            "l1",
            "n3",
            vec![listener("front", port, "backends")],
        ))
        .unwrap();
    wait_req(&mut s.reqs, "LDS ACK", |r| r.response_nonce == "n3").await;
    eventually_answers(port, "A:hi").await;

    // The server goes away: the last good config keeps serving.
    drop(s);
    eventually_answers(port, "A:hi").await;

    // The client comes back and re-sends what it had: versions and the EDS names.
    let mut s = next(&mut server.sotw).await;
    let cds = wait_req(&mut s.reqs, "CDS resubscribe", |r| r.type_url == CDS).await;
    assert_eq!(cds.version_info, "c1");
    assert!(cds.node.is_some());
    let eds = wait_req(&mut s.reqs, "EDS resubscribe", |r| r.type_url == EDS).await;
    assert_eq!(
        (eds.version_info.as_str(), eds.resource_names.as_slice()),
        ("e1", &["backends".to_string()][..])
    );
    eventually_answers(port, "A:hi").await;
    skiff.stop().await;
}
