//! Tests against the real fixtures in `tests/fixtures/` (see ATTRIBUTION.md there).

use std::collections::BTreeMap;
use std::time::Instant;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Message;
use prost_reflect::DynamicMessage;
use serde_json::{Value, json};

use crate::encode::encode_deterministic;
use crate::*;

// === helpers ===

fn fixture(path: &str) -> String {
    let full = format!("{}/../tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {full}: {e}"))
}

/// Bytes that do not depend on map iteration order (envoy-types uses HashMap).
fn canonical<M: Message + prost::Name>(m: &M) -> Vec<u8> {
    let desc = pool().get_message_by_name(&M::full_name()).unwrap();
    let dynamic = DynamicMessage::decode(desc, m.encode_to_vec().as_slice()).unwrap();
    encode_deterministic(&dynamic)
}

/// Decodes `any` into `M`, shows it with `to_json`, reads that back, and checks the bytes.
fn round_trip<M>(any: &prost_types::Any) -> M
where
    M: Message + prost::Name + Default,
{
    let m = M::decode(any.value.as_slice())
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", any.type_url));
    let shown = to_json(&m);
    let again: M = decode_json(&shown)
        .unwrap_or_else(|e| panic!("{}: to_json output does not parse: {e}", any.type_url));
    assert_eq!(
        canonical(&m),
        canonical(&again),
        "{} round trip",
        any.type_url
    );
    // The Any path gives the same JSON as the typed path, plus "@type".
    let mut via_any = any_to_json(any);
    via_any.as_object_mut().unwrap().remove("@type");
    assert_eq!(via_any, shown, "{}: any_to_json vs to_json", any.type_url);
    m
}

/// Decodes a resource into its envoy-types struct by type URL and round-trips it.
/// Returns false for opaque resources (not in the pool).
fn check_resource(any: &prost_types::Any) -> bool {
    match type_name(&any.type_url) {
        "envoy.config.listener.v3.Listener" => {
            round_trip::<Listener>(any);
        }
        "envoy.config.cluster.v3.Cluster" => {
            round_trip::<Cluster>(any);
        }
        "envoy.config.route.v3.RouteConfiguration" => {
            round_trip::<RouteConfiguration>(any);
        }
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => {
            round_trip::<ClusterLoadAssignment>(any);
        }
        other => {
            if opaque_json(any).is_some() {
                return false;
            }
            assert!(
                is_known_type(&any.type_url),
                "unexpected resource type {other}"
            );
            let json = any_to_json(any);
            let again = any_from_json(&json).unwrap();
            assert_eq!(any_to_json(&again), json);
        }
    }
    true
}

/// Every object in `value` whose `"@type"` is not in the pool, serialized, sorted.
fn opaque_objects(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(obj) => {
            if let Some(Value::String(url)) = obj.get("@type")
                && !is_known_type(url)
            {
                out.push(serde_json::to_string(value).unwrap());
                return;
            }
            obj.values().for_each(|v| opaque_objects(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| opaque_objects(v, out)),
        _ => {}
    }
}

fn sorted_opaque(value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    opaque_objects(value, &mut out);
    out.sort();
    out
}

/// Checks that every opaque object in the input comes back unchanged from `any_to_json`.
fn check_opaque_preserved(input: &Value, any: &prost_types::Any) -> usize {
    let want = sorted_opaque(input);
    let got = sorted_opaque(&any_to_json(any));
    assert_eq!(got, want, "{}: opaque Any objects changed", any.type_url);
    want.len()
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    /// (static, dynamic) per short kind L/C/R/E.
    by_kind: BTreeMap<char, (usize, usize)>,
}

fn kind_letter(type_url: &str) -> char {
    match type_name(type_url) {
        "envoy.config.listener.v3.Listener" => 'L',
        "envoy.config.cluster.v3.Cluster" | "envoy.api.v2.Cluster" => 'C',
        "envoy.config.route.v3.RouteConfiguration" => 'R',
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => 'E',
        _ => '?',
    }
}

fn counts(dump: &ConfigDumpResources) -> Counts {
    let mut c = Counts::default();
    for r in &dump.static_resources {
        c.by_kind.entry(kind_letter(&r.type_url)).or_default().0 += 1;
    }
    for r in &dump.dynamic {
        c.by_kind.entry(kind_letter(&r.type_url)).or_default().1 += 1;
    }
    c
}

fn expect(pairs: &[(char, usize, usize)]) -> Counts {
    Counts {
        by_kind: pairs.iter().map(|&(k, s, d)| (k, (s, d))).collect(),
    }
}

/// The resource JSON objects of a dump, in the order parse_config_dump returns them.
fn dump_resource_json(value: &Value) -> Vec<Value> {
    let mut statics = Vec::new();
    let mut dynamics = Vec::new();
    let configs = value["configs"].as_array().cloned().unwrap_or_default();
    for section in configs {
        let pick = |list: &str, field: &str, out: &mut Vec<Value>| {
            for entry in section[list].as_array().into_iter().flatten() {
                let entry = if list == "dynamic_listeners" {
                    &entry["active_state"]
                } else {
                    entry
                };
                if !entry[field].is_null() {
                    out.push(entry[field].clone());
                }
            }
        };
        for (list, field) in [
            ("static_listeners", "listener"),
            ("static_clusters", "cluster"),
            ("static_route_configs", "route_config"),
            ("static_endpoint_configs", "endpoint_config"),
        ] {
            pick(list, field, &mut statics);
        }
        for (list, field) in [
            ("dynamic_listeners", "listener"),
            ("dynamic_active_clusters", "cluster"),
            ("dynamic_route_configs", "route_config"),
            ("dynamic_endpoint_configs", "endpoint_config"),
        ] {
            pick(list, field, &mut dynamics);
        }
    }
    // parse_config_dump goes section by section; sort both sides by name to compare.
    statics.extend(dynamics);
    statics
}

// === the descriptor pool ===

#[test]
fn pool_has_envoy_xds_and_own_types() {
    for name in [
        "envoy.config.listener.v3.Listener",
        "envoy.config.cluster.v3.Cluster",
        "envoy.config.route.v3.RouteConfiguration",
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        "envoy.config.bootstrap.v3.Bootstrap",
        "envoy.admin.v3.ConfigDump",
        "envoy.admin.v3.ListenersConfigDump",
        "envoy.admin.v3.ClustersConfigDump",
        "envoy.admin.v3.RoutesConfigDump",
        "envoy.admin.v3.EndpointsConfigDump",
        "envoy.admin.v3.EcdsConfigDump",
        "envoy.service.discovery.v3.DiscoveryResponse",
        "envoy.service.status.v3.ClientConfig",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "envoy.extensions.filters.http.wasm.v3.Wasm",
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        "xds.type.matcher.v3.Matcher",
        "xds.core.v3.TypedExtensionConfig",
        "cel.expr.CheckedExpr",
        // skiff's own (third_party/)
        "udpa.type.v1.TypedStruct",
        "xds.type.v3.TypedStruct",
        "xds.type.matcher.v3.IPMatcher",
    ] {
        assert!(is_known_type(name), "{name} missing from the pool");
        assert!(is_known_type(&format!("{TYPE_URL_PREFIX}{name}")));
    }
    for name in [
        "stats.PluginConfig",
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        "envoy.api.v2.Cluster",
        // The one root build.rs skips (protox resolves a relative name differently).
        "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig",
    ] {
        assert!(!is_known_type(name), "{name} unexpectedly in the pool");
    }
    assert!(pool().files().count() > 500);
}

#[test]
fn own_typed_struct_matches_public_schema() {
    let ts = pool()
        .get_message_by_name("udpa.type.v1.TypedStruct")
        .unwrap();
    assert_eq!(ts.get_field_by_name("type_url").unwrap().number(), 1);
    assert_eq!(ts.get_field_by_name("value").unwrap().number(), 2);
    let json = json!({
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "value": {"config": {"root_id": "stats_outbound", "vm_config": {"code": {"local": {"inline_string": "envoy.wasm.stats"}}}}}
    });
    let any = any_from_json(&json).unwrap();
    assert!(
        opaque_json(&any).is_none(),
        "TypedStruct is a real type now"
    );
    assert_eq!(any_to_json(&any), json);
}

// === text ===

#[test]
fn parse_text_reads_json_and_yaml() {
    assert_eq!(
        parse_text(r#"{"a": [1, "x"]}"#).unwrap(),
        json!({"a": [1, "x"]})
    );
    let yaml = "a:\n  - 1\n  - x\nb: &anchor {c: 1.5}\nd: *anchor\n503: five\ne: .nan\n";
    assert_eq!(
        parse_text(yaml).unwrap(),
        json!({"a": [1, "x"], "b": {"c": 1.5}, "d": {"c": 1.5}, "503": "five", "e": "NaN"})
    );
    let err = parse_text("{\"a\": ").unwrap_err();
    assert!(matches!(err, CodecError::Text { .. }), "{err}");
    assert!(parse_text("a: [").is_err());
}

// === config dumps ===

struct DumpCase {
    file: &'static str,
    counts: &'static [(char, usize, usize)],
    names: &'static [&'static str],
    bootstrap: bool,
}

const DUMPS: &[DumpCase] = &[
    DumpCase {
        file: "xds/istio-sidecar-listeners-27.yaml",
        counts: &[('L', 2, 27)],
        names: &["virtualOutbound", "virtualInbound"],
        bootstrap: false,
    },
    DumpCase {
        file: "xds/istio-proxyconfig-full.json",
        counts: &[('C', 2, 1), ('E', 1, 1), ('L', 1, 1), ('R', 1, 0)],
        names: &["main_internal"],
        bootstrap: true,
    },
    DumpCase {
        file: "xds/istio-compare-before.json",
        counts: &[('C', 0, 1), ('L', 0, 3), ('R', 0, 1)],
        names: &[],
        bootstrap: false,
    },
    DumpCase {
        file: "xds/istio-endpoints-32.json",
        counts: &[('E', 5, 32)],
        names: &[
            "zipkin",
            "sds-grpc",
            "agent",
            "xds-grpc",
            "prometheus_stats",
            "outbound|9080||reviews.default.svc.cluster.local",
        ],
        bootstrap: false,
    },
    DumpCase {
        file: "xds/istio-describe-http.json",
        counts: &[('C', 0, 1), ('R', 0, 1)],
        names: &["outbound|9080|v1|productpage.default.svc.cluster.local"],
        bootstrap: false,
    },
    DumpCase {
        file: "xds/istio-gateway-routes-prefix.json",
        counts: &[('R', 2, 1)],
        names: &[],
        bootstrap: false,
    },
    DumpCase {
        file: "xds/istio-ecds.json",
        counts: &[],
        names: &[],
        bootstrap: false,
    },
    DumpCase {
        file: "xds/osm-curl-egress-config-dump.json",
        counts: &[('C', 1, 3), ('L', 0, 1), ('R', 0, 2)],
        names: &["443", "httpbin.org:80"],
        bootstrap: true,
    },
    DumpCase {
        file: "xds/kuma-full-config-dump.json",
        counts: &[('C', 2, 3), ('L', 0, 2)],
        names: &[
            "gateway",
            "ads_cluster",
            "inbound:127.0.0.1:10010",
            "outbound:127.0.0.1:10006",
        ],
        bootstrap: true,
    },
];

#[test]
fn config_dumps_parse_with_expected_resources() {
    let mut opaque_total = 0;
    let mut opaque_resources = Vec::new();
    for case in DUMPS {
        let text = fixture(case.file);
        let dump = parse_config_dump(&text).unwrap_or_else(|e| panic!("{}: {e}", case.file));
        assert_eq!(counts(&dump), expect(case.counts), "{}", case.file);
        assert_eq!(dump.bootstrap.is_some(), case.bootstrap, "{}", case.file);
        let names: Vec<&str> = dump
            .static_resources
            .iter()
            .chain(&dump.dynamic)
            .map(|r| r.name.as_str())
            .collect();
        for want in case.names {
            assert!(
                names.contains(want),
                "{}: no resource named {want:?} in {names:?}",
                case.file
            );
        }
        // Static listeners may be unnamed (Istio's 15090/15021 are); dynamic ones never.
        for r in &dump.dynamic {
            assert!(
                !r.name.is_empty(),
                "{}: unnamed dynamic resource",
                case.file
            );
        }
        for r in &dump.static_resources {
            assert_eq!(
                r.version_info, "",
                "{}: static {} has a version",
                case.file, r.name
            );
        }
        for r in dump.static_resources.iter().chain(&dump.dynamic) {
            assert_eq!(r.type_url, r.resource.type_url);
            if !check_resource(&r.resource) {
                opaque_resources.push(format!("{} {}", r.type_url, r.name));
            }
        }
        // Opaque Istio types come back byte-for-byte equivalent.
        let input = parse_text(&text).unwrap();
        let mut inputs = dump_resource_json(&input);
        let mut resources: Vec<&DumpedResource> =
            dump.static_resources.iter().chain(&dump.dynamic).collect();
        assert_eq!(inputs.len(), resources.len(), "{}", case.file);
        let key = |v: &Value| {
            let name = v.get("name").or_else(|| v.get("cluster_name"));
            format!(
                "{}{}",
                v["@type"].as_str().unwrap_or(""),
                name.and_then(Value::as_str).unwrap_or("")
            )
        };
        inputs.sort_by_key(key);
        resources.sort_by_key(|r| format!("{}{}", r.type_url, r.name));
        for (input, resource) in inputs.iter().zip(resources) {
            opaque_total += check_opaque_preserved(input, &resource.resource);
        }
        if let Some(bootstrap) = &dump.bootstrap {
            let b: Bootstrap =
                decode_json(bootstrap).unwrap_or_else(|e| panic!("{} bootstrap: {e}", case.file));
            assert!(b.node.is_some(), "{}: bootstrap without node", case.file);
        }
    }
    // Versions: per entry where the dump has them, else the section's.
    let kuma = parse_config_dump(&fixture("xds/kuma-full-config-dump.json")).unwrap();
    assert!(kuma.dynamic.iter().all(|r| !r.version_info.is_empty()));
    let istio = parse_config_dump(&fixture("xds/istio-proxyconfig-full.json")).unwrap();
    let versions: Vec<&str> = istio
        .dynamic
        .iter()
        .map(|r| r.version_info.as_str())
        .collect();
    let listeners_version = parse_text(&fixture("xds/istio-proxyconfig-full.json")).unwrap()
        ["configs"][3]["version_info"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        versions.contains(&listeners_version.as_str()),
        "{versions:?}"
    );
    // Kuma's static clusters carry the v2 type URL: kept opaque, names still read.
    assert_eq!(
        opaque_resources,
        [
            "type.googleapis.com/envoy.api.v2.Cluster access_log_sink",
            "type.googleapis.com/envoy.api.v2.Cluster ads_cluster"
        ]
    );
    assert!(
        opaque_total >= 20,
        "only {opaque_total} opaque objects seen"
    );
}

#[test]
fn opaque_istio_types_in_listeners_are_kept() {
    let dump = parse_config_dump(&fixture("xds/istio-sidecar-listeners-27.yaml")).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for r in dump.static_resources.iter().chain(&dump.dynamic) {
        for obj in sorted_opaque(&any_to_json(&r.resource)) {
            let v: Value = serde_json::from_str(&obj).unwrap();
            seen.insert(type_name(v["@type"].as_str().unwrap()).to_owned());
        }
    }
    for want in [
        "stats.PluginConfig",
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
    ] {
        assert!(seen.contains(want), "{want} not seen; saw {seen:?}");
    }
}

// === discovery files ===

#[test]
fn seed_scenarios_parse_as_discovery_files() {
    for dir in ["seed-scenario", "seed-scenario-loopback"] {
        for (file, type_url, name) in [
            ("listeners.json", LISTENER_TYPE_URL, "0.0.0.0_50002"),
            ("routes.json", ROUTE_TYPE_URL, "50002"),
            (
                "clusters.json",
                CLUSTER_TYPE_URL,
                "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local",
            ),
            (
                "endpoints.json",
                ENDPOINT_TYPE_URL,
                "outbound|50002|v1|bar-service.bar-namespace.svc.cluster.local",
            ),
        ] {
            let text = fixture(&format!("{dir}/{file}"));
            let f =
                parse_discovery_file(&text, None).unwrap_or_else(|e| panic!("{dir}/{file}: {e}"));
            assert_eq!(f.version_info, "1", "{dir}/{file}");
            assert_eq!(f.resources.len(), 1, "{dir}/{file}");
            assert_eq!(f.resources[0].type_url, type_url);
            assert!(check_resource(&f.resources[0]));
            let shown = any_to_json(&f.resources[0]);
            let got = shown.get("name").or_else(|| shown.get("cluster_name"));
            assert_eq!(got, Some(&json!(name)), "{dir}/{file}");
        }
    }
    // The endpoints: three, in two zones, overprovisioning 140.
    let f = parse_discovery_file(&fixture("seed-scenario/endpoints.json"), None).unwrap();
    let cla = ClusterLoadAssignment::decode(f.resources[0].value.as_slice()).unwrap();
    let hosts: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
    assert_eq!(hosts, 3);
    assert_eq!(
        cla.policy.unwrap().overprovisioning_factor.map(|v| v.value),
        Some(140)
    );
}

#[test]
fn envoy_example_and_gateway_files_parse() {
    // Envoy's file-based LDS; its `filters:` is a single object, not a list (legacy syntax).
    let lds = parse_discovery_file(&fixture("xds/envoy-example-fs-lds.yaml"), None).unwrap();
    assert_eq!(lds.version_info, "");
    assert_eq!(lds.resources.len(), 1);
    let listener = round_trip::<Listener>(&lds.resources[0]);
    assert_eq!(listener.name, "listener_0");
    assert_eq!(listener.filter_chains[0].filters.len(), 1);

    let cds = parse_discovery_file(&fixture("xds/envoy-example-fs-cds.yaml"), None).unwrap();
    assert_eq!(cds.resources.len(), 1);
    assert_eq!(
        round_trip::<Cluster>(&cds.resources[0]).name,
        "example_proxy_cluster"
    );

    // Envoy Gateway: bare YAML lists in camelCase, no "@type".
    let text = fixture("xds/envoy-gateway-load-balancer-clusters.yaml");
    assert!(
        parse_discovery_file(&text, None).is_err(),
        "no @type and no default"
    );
    let clusters = parse_discovery_file(&text, Some(CLUSTER_TYPE_URL)).unwrap();
    assert_eq!(clusters.resources.len(), 17);
    assert_eq!(clusters.type_url.as_deref(), Some(CLUSTER_TYPE_URL));
    for any in &clusters.resources {
        let c = round_trip::<Cluster>(any);
        assert!(c.eds_cluster_config.is_some(), "{}", c.name);
        assert!(
            c.connect_timeout.is_some(),
            "{}: camelCase connectTimeout lost",
            c.name
        );
    }
    let routes = parse_discovery_file(
        &fixture("xds/envoy-gateway-retry-routes.yaml"),
        Some(ROUTE_TYPE_URL),
    )
    .unwrap();
    assert_eq!(routes.resources.len(), 1);
    let rc = round_trip::<RouteConfiguration>(&routes.resources[0]);
    let retry_counts: Vec<u32> = rc.virtual_hosts[0]
        .routes
        .iter()
        .filter_map(|r| match &r.action {
            Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(a)) => {
                a.retry_policy.as_ref()?.num_retries.map(|n| n.value)
            }
            _ => None,
        })
        .collect();
    assert!(!retry_counts.is_empty(), "retryPolicy.numRetries lost");
}

#[test]
fn csds_discovery_response_parses() {
    let f = parse_discovery_file(&fixture("xds/istio-csds-discovery-response.json"), None).unwrap();
    assert_eq!(f.resources.len(), 1);
    assert_eq!(
        f.type_url.as_deref(),
        Some("type.googleapis.com/envoy.service.status.v3.ClientConfig")
    );
    let cc = envoy_types::pb::envoy::service::status::v3::ClientConfig::decode(
        f.resources[0].value.as_slice(),
    )
    .unwrap();
    assert_eq!(cc.generic_xds_configs.len(), 5);
    check_resource(&f.resources[0]);
}

// === bootstraps ===

#[test]
fn bootstraps_decode() {
    for file in [
        "xds/envoy-example-ads-bootstrap.yaml",
        "xds/envoy-example-fs-bootstrap.yaml",
        "xds/go-control-plane-bootstrap-delta-ads.yaml",
        "xds/istio-bootstrap-default.json",
        "xds/envoy-example-locality-lb.yaml",
    ] {
        let text = fixture(file);
        let json = parse_text(&text).unwrap();
        let b: Bootstrap = decode_json(&json).unwrap_or_else(|e| panic!("{file}: {e}"));
        let shown = to_json(&b);
        let again: Bootstrap = decode_json(&shown).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(canonical(&b), canonical(&again), "{file}");
        assert_eq!(sorted_opaque(&shown), sorted_opaque(&json), "{file}");
    }
    let b: Bootstrap =
        decode_json(&parse_text(&fixture("xds/istio-bootstrap-default.json")).unwrap()).unwrap();
    let statics = b.static_resources.unwrap();
    assert_eq!(statics.listeners.len(), 2);
    assert_eq!(statics.clusters.len(), 4);
    let b: Bootstrap =
        decode_json(&parse_text(&fixture("xds/envoy-example-locality-lb.yaml")).unwrap()).unwrap();
    let cla = b.static_resources.unwrap().clusters[0]
        .load_assignment
        .clone()
        .unwrap();
    let priorities: Vec<u32> = cla.endpoints.iter().map(|l| l.priority).collect();
    assert_eq!(priorities, [0, 1, 1, 2]);
}

// === behaviour details ===

#[test]
fn errors_name_type_and_path() {
    let bad = json!({
        "name": "c",
        "load_assignment": {"cluster_name": "c", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "1.2.3.4", "port_value": "x"}}}}
        ]}]}
    });
    let err = decode_json::<Cluster>(&bad).unwrap_err().to_string();
    assert!(err.contains("envoy.config.core.v3.SocketAddress"), "{err}");
    assert!(
        err.contains("$.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"),
        "{err}"
    );

    let err = decode_json::<Cluster>(&json!({"name": "c", "lb_policy": {"x": 1}}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("envoy.config.cluster.v3.Cluster at $.lb_policy"),
        "{err}"
    );
    // An unknown enum name is ignored like an unknown field (protobuf's
    // ignore_unknown_fields, which Envoy's lenient retry uses).
    let c: Cluster = decode_json(&json!({"name": "c", "lb_policy": "NOPE"})).unwrap();
    assert_eq!(c.lb_policy, 0);

    let err = decode_json::<Listener>(
        &json!({"filter_chains": [{"filters": [{"typed_config": {"stat_prefix": "x"}}]}]}),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("$.filter_chains[0].filters[0].typed_config"),
        "{err}"
    );
    assert!(err.contains("@type"), "{err}");

    let err = any_from_json(&json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "connect_timeout": 5}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("$.connect_timeout"), "{err}");
    assert!(err.contains("envoy.config.cluster.v3.Cluster"), "{err}");

    let err = any_from_json(&json!({"@type": "nope"})).unwrap_err();
    assert!(matches!(err, CodecError::AnyType { .. }));
}

#[test]
fn opaque_any_encoding() {
    let json = json!({
        "@type": "type.googleapis.com/stats.PluginConfig",
        "disable_host_header_fallback": true,
        "nested": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "x": [1, 2]}
    });
    let any = any_from_json(&json).unwrap();
    assert_eq!(any.type_url, "type.googleapis.com/stats.PluginConfig");
    assert_eq!(any.value[0], 0x00);
    assert_eq!(opaque_json(&any), Some(json.clone()));
    assert_eq!(any_to_json(&any), json);
    // Decoding the opaque bytes as a real message fails cleanly.
    assert!(Cluster::decode(any.value.as_slice()).is_err());

    // A typed resource lacking "@type" gets it in the stored JSON.
    let any = any_from_json_typed(
        "type.googleapis.com/envoy.api.v2.Cluster",
        &json!({"name": "v2"}),
    )
    .unwrap();
    assert_eq!(
        any_to_json(&any),
        json!({"@type": "type.googleapis.com/envoy.api.v2.Cluster", "name": "v2"})
    );

    // Unknown type with real bytes (as from gRPC): base64.
    let any = prost_types::Any {
        type_url: "type.googleapis.com/istio.Private".to_owned(),
        value: vec![0x08, 0x01],
    };
    assert!(opaque_json(&any).is_none());
    assert_eq!(
        any_to_json(&any),
        json!({"@type": "type.googleapis.com/istio.Private", "value": "CAE="})
    );
}

#[test]
fn nested_unknown_any_inside_listener_round_trips() {
    let json = json!({
        "name": "l",
        "filter_chains": [{"filters": [{
            "name": "istio.metadata_exchange",
            "typed_config": {"@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "protocol": "istio-peer-exchange"}
        }, {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "statPrefix": "x",
                "http_filters": [{"name": "alpn", "typed_config": {"@type": "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig", "alpn_override": [{"alpn_override": ["istio-http/1.0"]}]}}],
                "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"],
                    "typed_per_filter_config": {
                        "b": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "hi"},
                        "a": {"@type": "type.googleapis.com/unknown.Thing", "k": 1}
                    }}]}
            }
        }]}]
    });
    let l: Listener = decode_json(&json).unwrap();
    let shown = to_json(&l);
    assert_eq!(sorted_opaque(&shown), sorted_opaque(&json));
    let hcm = &shown["filter_chains"][0]["filters"][1]["typed_config"];
    assert_eq!(
        hcm["stat_prefix"],
        json!("x"),
        "camelCase in, snake_case out"
    );
    assert_eq!(
        hcm["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["b"],
        json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "hi"})
    );
    let again: Listener = decode_json(&shown).unwrap();
    assert_eq!(canonical(&l), canonical(&again));
}

#[test]
fn encoding_is_deterministic_with_maps() {
    let json = json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "r",
        "virtual_hosts": [{"name": "v", "domains": ["*"], "metadata": {"filter_metadata": {
            "a": {"x": 1, "y": [1, 2, {"z": "q"}]}, "b": {"k": "v"}, "c": {}, "d": {"e": {"f": null}}
        }}, "typed_per_filter_config": {
            "f1": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {"a": 1, "b": 2, "c": 3}},
            "f2": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": {"d": 1, "e": 2}}
        }}]
    });
    let first = any_from_json(&json).unwrap();
    for _ in 0..20 {
        assert_eq!(any_from_json(&json).unwrap(), first);
    }
}

#[test]
fn enums_durations_and_int64_in_admin_dialect() {
    let c: Cluster = decode_json(&json!({
        "name": "c", "type": "EDS", "lbPolicy": "LEAST_REQUEST", "connectTimeout": "1.5s",
        "per_connection_buffer_limit_bytes": 0,
        "max_requests_per_connection": 7,
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295u32}]},
        "lb_subset_config": {"fallback_policy": 1}
    }))
    .unwrap();
    let shown = to_json(&c);
    assert_eq!(shown["type"], json!("EDS"));
    assert_eq!(shown["lb_policy"], json!("LEAST_REQUEST"));
    assert_eq!(shown["connect_timeout"], json!("1.500s"));
    assert_eq!(
        shown["lb_subset_config"]["fallback_policy"],
        json!("ANY_ENDPOINT")
    );
    assert_eq!(shown["max_requests_per_connection"], json!(7));
    assert!(
        shown.get("per_connection_buffer_limit_bytes").is_some(),
        "wrapper set to 0 is kept"
    );
    assert!(shown.get("dns_lookup_family").is_none(), "defaults omitted");
}

#[test]
fn discovery_file_shapes() {
    let f = parse_discovery_file(
        r#"{"versionInfo": 7, "typeUrl": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "resources": [{"name": "a"}]}"#,
        None,
    )
    .unwrap();
    assert_eq!(f.version_info, "7");
    assert_eq!(f.resources[0].type_url, CLUSTER_TYPE_URL);
    let f = parse_discovery_file("- name: a\n- name: b\n", Some(CLUSTER_TYPE_URL)).unwrap();
    assert_eq!(f.resources.len(), 2);
    assert_eq!(f.version_info, "");
    let err = parse_discovery_file("{\"resources\": [{\"name\": \"a\"}]}", None).unwrap_err();
    assert!(err.to_string().contains("$.resources[0]"), "{err}");
    assert!(parse_discovery_file("42", None).is_err());
}

#[test]
fn config_dump_single_section_and_ignored_sections() {
    let dump = parse_config_dump(
        r#"{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
            "dynamic_active_clusters": [{"version_info": "v1", "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a"}}],
            "dynamic_warming_clusters": [{"version_info": "v2", "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a"}},
                                         {"version_info": "v2", "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "b"}}]}"#,
    )
    .unwrap();
    let got: Vec<(&str, &str)> = dump
        .dynamic
        .iter()
        .map(|r| (r.name.as_str(), r.version_info.as_str()))
        .collect();
    assert_eq!(got, [("a", "v1"), ("b", "v2")]);
    let dump = parse_config_dump(
        r#"{"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump", "static_secrets": [{}]},
                        {"@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump"},
                        {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                         "dynamic_listeners": [{"name": "w", "warming_state": {"version_info": "3", "listener": {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "w"}}},
                                               {"name": "e", "error_state": {"details": "bad"}}]}]}"#,
    )
    .unwrap();
    assert_eq!(dump.dynamic.len(), 1);
    assert_eq!(dump.dynamic[0].name, "w");
    assert_eq!(dump.dynamic[0].version_info, "3");
    assert!(parse_config_dump("[]").is_err());
}

// === timings (run with --nocapture to see them) ===

#[test]
fn parse_times_per_file() {
    // Run alone (`cargo test parse_times -- --nocapture`) for the first-use time to be real.
    let start = Instant::now();
    let _ = reflect();
    eprintln!("descriptor pool first use: {:?}", start.elapsed());
    let mut files: Vec<String> = Vec::new();
    for dir in ["xds", "seed-scenario", "seed-scenario-loopback"] {
        let full = format!("{}/../tests/fixtures/{dir}", env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(full).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".json") || name.ends_with(".yaml") {
                files.push(format!("{dir}/{name}"));
            }
        }
    }
    files.sort();
    assert_eq!(files.len(), 19 + 8);
    for file in files {
        let text = fixture(&file);
        let start = Instant::now();
        let json = parse_text(&text).unwrap();
        let text_time = start.elapsed();
        let start = Instant::now();
        let what = if json.get("configs").is_some() {
            let d = parse_config_dump(&text).unwrap();
            format!(
                "dump, {} resources",
                d.static_resources.len() + d.dynamic.len()
            )
        } else if file.contains("bootstrap") || file.contains("locality-lb") {
            let _: Bootstrap = decode_json(&json).unwrap();
            "bootstrap".to_owned()
        } else {
            let default = if file.contains("clusters") {
                Some(CLUSTER_TYPE_URL)
            } else {
                Some(ROUTE_TYPE_URL)
            };
            let f = parse_discovery_file(&text, default).unwrap();
            format!("discovery, {} resources", f.resources.len())
        };
        eprintln!(
            "{file:48} {:>7} bytes  text {:>9.3?}  full parse {:>9.3?}  ({what})",
            text.len(),
            text_time,
            start.elapsed()
        );
    }
}

// === property tests ===

mod props {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    const KEYS: &[&str] = &[
        "@type",
        "name",
        "value",
        "address",
        "socket_address",
        "port_value",
        "filter_chains",
        "filters",
        "typed_config",
        "typedConfig",
        "http_filters",
        "route_config",
        "virtual_hosts",
        "typed_per_filter_config",
        "metadata",
        "filter_metadata",
        "load_assignment",
        "endpoints",
        "lb_endpoints",
        "connect_timeout",
        "type",
        "lb_policy",
        "static_resources",
        "listeners",
        "clusters",
        "fields",
        "type_url",
        "x",
    ];
    const TYPES: &[&str] = &[
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "type.googleapis.com/google.protobuf.Struct",
        "type.googleapis.com/google.protobuf.Duration",
        "type.googleapis.com/google.protobuf.Any",
        "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type.googleapis.com/stats.PluginConfig",
        "nope",
        "",
    ];

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop::sample::select(TYPES).prop_map(Value::from),
            "[a-zA-Z0-9_.:/ -]{0,12}".prop_map(Value::String),
            prop::sample::select(vec!["EDS", "1s", "-5s", "NaN", "Infinity", "0.0.0.0", "10"])
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            prop::sample::select(KEYS).prop_map(str::to_owned),
                            "[a-z_]{1,6}"
                        ],
                        inner
                    ),
                    0..6
                )
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_json_never_panics(value in json_value()) {
            let _ = decode_json::<Listener>(&value);
            let _ = decode_json::<Cluster>(&value);
            let _ = decode_json::<Bootstrap>(&value);
            if let Ok(any) = any_from_json(&value) {
                let shown = any_to_json(&any);
                // Whatever was accepted is shown as JSON that reads back the same.
                let again = any_from_json(&shown).unwrap();
                prop_assert_eq!(any_to_json(&again), shown);
            }
            let _ = any_from_json_typed(super::CLUSTER_TYPE_URL, &value);
            let _ = crate::files::discovery_from_json(&value, None);
            let _ = crate::files::config_dump_from_json(&value);
        }
    }
}
