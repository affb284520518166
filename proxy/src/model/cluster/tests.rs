use super::*;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::model::LoadAssignment;

fn socket(type_name: &str) -> core::TransportSocket {
    core::TransportSocket {
        name: "s".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
            type_url: format!("type.googleapis.com/{type_name}"),
            value: vec![],
        })),
    }
}

fn eds(name: &str) -> pb::Cluster {
    pb::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(pb::cluster::ClusterDiscoveryType::Type(3)),
        ..Default::default()
    }
}

#[test]
fn raw_buffer_is_plaintext_and_tls_clusters_convert() {
    let raw = pb::Cluster {
        transport_socket: Some(socket(super::super::compat::RAW_BUFFER_TYPE)),
        ..eds("c")
    };
    let c = Cluster::try_from(&raw).unwrap();
    assert!(!c.transport.may_use_tls());
    let tls = pb::Cluster {
        transport_socket: Some(socket(crate::model::tls::UPSTREAM_TLS_TYPE)),
        ..eds("c")
    };
    let c = Cluster::try_from(&tls).unwrap();
    assert!(c.transport.default.is_some());
    // What skiff cannot dial is refused, naming the socket.
    let internal = pb::Cluster {
        transport_socket_matches: vec![pb::cluster::TransportSocketMatch {
            name: "internal".into(),
            transport_socket: Some(socket(
                "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            )),
            ..Default::default()
        }],
        ..eds("c")
    };
    let e = Cluster::try_from(&internal).unwrap_err();
    assert_eq!(e.field, "transport_socket_matches[0].transport_socket");
    assert!(e.reason.contains("InternalUpstreamTransport"), "{e}");
}

fn fixture(name: &str) -> skiff_proto::ConfigDumpResources {
    let path = format!(
        "{}/../tests/fixtures/xds/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap();
    skiff_proto::parse_config_dump(&text).unwrap()
}

/// Istio's auto-mTLS from real dumps: the `tlsMode-istio` match of a real outbound cluster
/// picks mTLS for exactly the real EDS endpoints labelled `tlsMode: istio`.
#[test]
fn transport_follows_real_istio_endpoint_metadata() {
    let clusters = fixture("istio-describe-http.json");
    let pc = clusters
        .dynamic
        .iter()
        .find(|r| r.name == "outbound|9080|v1|productpage.default.svc.cluster.local")
        .unwrap();
    let c = Cluster::try_from(&pb::Cluster::decode(pc.resource.value.as_slice()).unwrap()).unwrap();
    assert_eq!(
        c.transport
            .matches
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["tlsMode-istio", "tlsMode-disabled"]
    );
    let tls = c.transport.matches[0].tls.as_ref().unwrap();
    assert!(tls.common.alpn.iter().any(|p| p == "istio"), "{tls:?}");
    let endpoints = fixture("istio-endpoints-32.json");
    let (mut mtls, mut plain) = (0, 0);
    for r in endpoints
        .dynamic
        .iter()
        .chain(&endpoints.static_resources)
        .filter(|r| r.type_url.ends_with("ClusterLoadAssignment"))
    {
        let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
            r.resource.value.as_slice(),
        )
        .unwrap();
        // The static ones include Unix-socket endpoints (`sds-grpc`), which EDS cannot carry.
        let Ok(la) = LoadAssignment::from_proto(&cla) else {
            continue;
        };
        for e in la.endpoints() {
            let istio =
                e.transport_socket_match.get("tlsMode").map(String::as_str) == Some("istio");
            match c.transport.for_endpoint(&e.transport_socket_match) {
                Some(t) => {
                    assert!(istio, "{e:?}");
                    assert_eq!(t, tls);
                    mtls += 1;
                }
                None => {
                    assert!(!istio, "{e:?}");
                    plain += 1;
                }
            }
        }
    }
    assert!(mtls >= 4 && plain >= 1, "mtls {mtls}, plain {plain}");
}
