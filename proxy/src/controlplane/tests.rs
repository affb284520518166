use std::path::Path;

use super::source::{newest_version, parse_discovery_file, read_config_dump};
use super::*;

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

#[test]
fn newest_version_prefers_numbers_then_strings() {
    let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(newest_version(&v(&["5", "10", "2"])).as_deref(), Some("10"));
    assert_eq!(
        newest_version(&v(&["2023-12-26T05:56:10Z/3", "2023-12-26T05:57:39Z/1"])).as_deref(),
        Some("2023-12-26T05:57:39Z/1")
    );
    assert_eq!(newest_version(&v(&["", ""])), None);
    assert_eq!(newest_version(&v(&["", "7"])).as_deref(), Some("7"));
}

#[test]
fn discovery_file_type_comes_from_resources() {
    let path = fixture("seed-scenario-loopback/clusters.json");
    let text = std::fs::read_to_string(&path).unwrap();
    // A misleading file name does not matter: the resources say what they are.
    let (type_url, r) = parse_discovery_file(Path::new("x/listeners.json"), &text).unwrap();
    assert_eq!(type_url, skiff_proto::CLUSTER_TYPE_URL);
    assert!(!r.resources.is_empty());
    assert!(!r.version.is_empty());
}

#[test]
fn discovery_file_without_version_gets_a_content_hash() {
    let a = r#"{"resources": [{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a"}]}"#;
    let b = r#"{"resources": [{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "b"}]}"#;
    let (_, ra) = parse_discovery_file(Path::new("c.json"), a).unwrap();
    let (_, ra2) = parse_discovery_file(Path::new("c.json"), a).unwrap();
    let (_, rb) = parse_discovery_file(Path::new("c.json"), b).unwrap();
    assert_eq!(ra.version, ra2.version);
    assert_ne!(ra.version, rb.version);
}

#[test]
fn empty_file_takes_its_type_from_its_name() {
    let (t, r) = parse_discovery_file(
        Path::new("d/routes.yaml"),
        "version_info: '3'\nresources: []\n",
    )
    .unwrap();
    assert_eq!(t, skiff_proto::ROUTE_TYPE_URL);
    assert_eq!(r.version, "3");
    assert!(parse_discovery_file(Path::new("d/misc.yaml"), "resources: []\n").is_err());
}

#[test]
fn mixed_types_in_one_file_are_rejected() {
    let text = r#"{"resources": [
        {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "a"},
        {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l"}]}"#;
    let err = parse_discovery_file(Path::new("m.json"), text).unwrap_err();
    assert!(err.to_string().contains("one type per file"), "{err}");
}

#[test]
fn config_dump_versions_are_the_newest_per_type() {
    let snapshot = read_config_dump(&fixture("xds/osm-curl-egress-config-dump.json")).unwrap();
    let clusters = &snapshot.types[skiff_proto::CLUSTER_TYPE_URL];
    assert_eq!(clusters.version, "5");
    assert_eq!(clusters.resources.len(), 3);
    let routes = &snapshot.types[skiff_proto::ROUTE_TYPE_URL];
    assert_eq!(routes.version, "3");
}

#[test]
fn fnv_separates_parts() {
    assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
}
