//! Every xDS resource in every real config dump and discovery file of `tests/fixtures/`
//! converts into skiff's model without an error, i.e. skiff would ACK it, except those that ask
//! for what skiff cannot do: under the honour-or-refuse rule (docs/COMPATIBILITY.md) skiff
//! NACKs them, and `skiff_tests::FIXTURE_REFUSALS` lists each with the reason it must give.

use std::path::Path;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as PbCla;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration as PbRoute;
use prost::Message;
use skiff::model::{Cluster, Listener, LoadAssignment, RouteConfig};

fn convert(type_url: &str, name: &str, bytes: &[u8]) -> Result<(), String> {
    let kind = type_url.rsplit('.').next().unwrap_or(type_url);
    let res = match kind {
        "Listener" => PbListener::decode(bytes)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                Listener::try_from(&l)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        "Cluster" => PbCluster::decode(bytes)
            .map_err(|e| e.to_string())
            .and_then(|c| Cluster::try_from(&c).map(|_| ()).map_err(|e| e.to_string())),
        "RouteConfiguration" => PbRoute::decode(bytes)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                RouteConfig::try_from(&r)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        "ClusterLoadAssignment" => PbCla::decode(bytes)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                LoadAssignment::try_from(&c)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
        other => return Err(format!("unexpected type {other}")),
    };
    res.map_err(|e| format!("{kind} {name:?}: {e}"))
}

use skiff_tests::FIXTURE_REFUSALS as REFUSED;

#[test]
fn every_dynamic_resource_in_every_dump_converts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/xds");
    let dumps = [
        "istio-proxyconfig-full.json",
        "istio-compare-before.json",
        "istio-sidecar-listeners-27.yaml",
        "istio-endpoints-32.json",
        "istio-describe-http.json",
        "istio-gateway-routes-prefix.json",
        "osm-curl-egress-config-dump.json",
        "kuma-full-config-dump.json",
    ];
    let mut failures = Vec::new();
    let mut count = 0;
    let mut refused = 0;
    for f in dumps {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        let dump = skiff_proto::parse_config_dump(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!dump.dynamic.is_empty(), "{f}: no dynamic resources");
        for r in &dump.dynamic {
            count += 1;
            let expected = REFUSED
                .iter()
                .find(|(file, name, _)| *file == f && *name == r.name);
            match (convert(&r.type_url, &r.name, &r.resource.value), expected) {
                (Ok(()), None) => {}
                (Err(e), Some((_, _, why))) if e.contains(why) => refused += 1,
                (Err(e), _) => failures.push(format!("{f}: {e}")),
                (Ok(()), Some(_)) => failures.push(format!("{f}: {:?} was accepted", r.name)),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} not as expected:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(refused, REFUSED.len(), "every listed refusal was seen");
    assert!(
        count > 60,
        "expected the fixtures' ~70 dynamic resources, saw {count}"
    );
}

#[test]
fn every_resource_in_discovery_files_converts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let files = [
        ("seed-scenario/listeners.json", None),
        ("seed-scenario/clusters.json", None),
        ("seed-scenario/routes.json", None),
        ("seed-scenario/endpoints.json", None),
        ("seed-scenario-loopback/listeners.json", None),
        ("seed-scenario-loopback/clusters.json", None),
        ("seed-scenario-loopback/routes.json", None),
        ("seed-scenario-loopback/endpoints.json", None),
        ("xds/envoy-example-fs-lds.yaml", None),
        ("xds/envoy-example-fs-cds.yaml", None),
        (
            "xds/envoy-gateway-load-balancer-clusters.yaml",
            Some(skiff_proto::CLUSTER_TYPE_URL),
        ),
        (
            "xds/envoy-gateway-retry-routes.yaml",
            Some(skiff_proto::ROUTE_TYPE_URL),
        ),
        // The demo's configuration (deploy/demo/xds) keeps loading.
        ("../../deploy/demo/xds/listeners.json", None),
        ("../../deploy/demo/xds/clusters.json", None),
        ("../../deploy/demo/xds/routes.json", None),
        ("../../deploy/demo/xds/endpoints.json", None),
    ];
    let mut failures = Vec::new();
    for (f, default_type) in files {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let file = skiff_proto::parse_discovery_file(&text, default_type)
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!file.resources.is_empty(), "{f}: no resources");
        for r in &file.resources {
            if let Err(e) = convert(&r.type_url, f, &r.value) {
                failures.push(format!("{f}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "rejected:\n{}", failures.join("\n"));
}

/// The demo's bootstrap, whose static listeners and clusters go through the same model.
#[test]
fn demo_bootstrap_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let f = "../deploy/demo/bootstrap.yaml";
    let text = std::fs::read_to_string(root.join(f)).unwrap();
    if let Err(e) = skiff::config::parse(&text, f) {
        panic!("{f}: {e}");
    }
}

/// Istio's sidecar bootstrap (envoy-rev.json) loads as it is: ADS to pilot-agent's xDS proxy
/// and SDS to its certificate server, both on Unix sockets reached through `GrpcTarget`.
#[test]
fn istio_bootstrap_loads_with_its_sds_socket() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let f = "fixtures/xds/istio-bootstrap-default.json";
    let text = std::fs::read_to_string(root.join(f)).unwrap();
    let b = skiff::config::parse(&text, f).unwrap_or_else(|e| panic!("{f}: {e}"));
    let ads = b.ads.as_ref().expect("ADS");
    assert_eq!(ads.cluster, "xds-grpc");
    assert_eq!(
        ads.server,
        skiff::config::GrpcTarget::Unix("/tmp/XDS".into())
    );
    assert!(b.lds_ads && b.cds_ads);
    assert_eq!(
        b.grpc_targets.get("sds-grpc"),
        Some(&skiff::config::GrpcTarget::Unix(
            "./var/run/secrets/workload-spiffe-uds/test.sock".into()
        ))
    );
    let sds = b.clusters.iter().find(|c| c.name == "sds-grpc").unwrap();
    assert!(
        matches!(&sds.kind, skiff::model::ClusterKind::Static(la) if la.endpoints().count() == 0)
    );
}

/// The TLS of the real dumps converts into the model: Istio's auto-mTLS cluster chooses mTLS
/// by endpoint metadata, OSM's upstream mTLS names its SDS secrets.
#[test]
fn tls_of_the_dumps_is_honoured() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/xds");
    let cluster = |f: &str, name: &str| {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        let dump = skiff_proto::parse_config_dump(&text).unwrap();
        let r = dump.dynamic.iter().find(|r| r.name == name).unwrap();
        Cluster::try_from(&PbCluster::decode(r.resource.value.as_slice()).unwrap()).unwrap()
    };
    let istio = cluster(
        "istio-describe-http.json",
        "outbound|9080|v1|productpage.default.svc.cluster.local",
    );
    let labelled = [("tlsMode".to_string(), "istio".to_string())].into();
    assert!(istio.transport.for_endpoint(&labelled).is_some());
    assert!(istio.transport.for_endpoint(&Default::default()).is_none());
    let osm = cluster("osm-curl-egress-config-dump.json", "httpbin/httpbin|14001");
    let tls = osm.transport.default.as_ref().unwrap();
    assert!(tls.common.sds_refs().count() >= 1, "{tls:?}");
    // Istio's inbound mTLS chains (the listener itself is refused for its RBAC rules): each
    // TLS context converts, SDS `default` and `ROOTCA` from `sds-grpc`, client certificates
    // required, Istio's cipher list narrowed to what rustls has.
    let text = std::fs::read_to_string(dir.join("istio-sidecar-listeners-27.yaml")).unwrap();
    let dump = skiff_proto::parse_config_dump(&text).unwrap();
    let inbound = dump
        .dynamic
        .iter()
        .find(|r| r.name == "virtualInbound")
        .unwrap();
    let l = PbListener::decode(inbound.resource.value.as_slice()).unwrap();
    let mut tls_chains = 0;
    for fc in &l.filter_chains {
        let Some(ts) = &fc.transport_socket else {
            continue;
        };
        let t = skiff::model::tls::downstream_socket(ts)
            .unwrap_or_else(|e| panic!("chain {:?}: {e:?}", fc.name))
            .unwrap();
        assert!(t.require_client_certificate, "{:?}", fc.name);
        let names: Vec<&str> = t.common.sds_refs().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["default", "ROOTCA"]);
        assert!(!t.common.cipher_suites.is_empty());
        tls_chains += 1;
    }
    assert_eq!(tls_chains, 3);
}
