//! Istio's stats filter (`istio.stats`, issue 17): its configuration on a chain or an HCM, the
//! local workload read from the node's Istio metadata, and the service named by an Istio
//! cluster. `stats::istio` records the standard metrics from these.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Any, Struct, value::Kind as ValueKind};
use prost::Message;

use super::FieldError;

/// Name Istio gives its stats filter, network and HTTP alike.
pub const FILTER_NAME: &str = "istio.stats";
/// Config type of the stats filter (`stats.PluginConfig`, often inside a TypedStruct).
pub const PLUGIN_CONFIG_TYPE: &str = "stats.PluginConfig";

/// Which side of the request a proxy reports as (Istio's `reporter` label).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// An outbound listener: the client's sidecar (`reporter="source"`).
    #[default]
    Source,
    /// An inbound listener: the server's sidecar (`reporter="destination"`).
    Destination,
    /// `reporter: SERVER_GATEWAY` (a waypoint; `reporter="waypoint"`).
    Waypoint,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }

    /// Whether the proxy stands for the destination (server side).
    pub fn is_server(self) -> bool {
        !matches!(self, Reporter::Source)
    }
}

/// One `istio.stats` filter, converted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioStats {
    /// The reporter, from `reporter` and the listener's `traffic_direction`.
    pub reporter: Reporter,
    /// `reporter: SERVER_GATEWAY` was configured (the direction does not change it).
    pub server_gateway: bool,
    /// `disable_host_header_fallback`: `destination_service` never comes from `Host`.
    pub disable_host_header_fallback: bool,
}

impl IstioStats {
    /// Set the reporter from the listener's `traffic_direction` (1: INBOUND), as the filter
    /// does from the listener it runs on.
    pub fn set_direction(&mut self, traffic_direction: i32) {
        self.reporter = if self.server_gateway {
            Reporter::Waypoint
        } else if traffic_direction == 1 {
            Reporter::Destination
        } else {
            Reporter::Source
        };
    }
}

/// The fields of Istio's `stats.PluginConfig` skiff reads (tags from
/// `source/extensions/filters/http/istio_stats/config.proto`).
#[derive(Clone, PartialEq, Message)]
struct PluginConfigProto {
    #[prost(bool, tag = "6")]
    disable_host_header_fallback: bool,
    /// 0 UNSPECIFIED, 1 SERVER_GATEWAY.
    #[prost(int32, tag = "10")]
    reporter: i32,
}

/// A TypedStruct's `value` (field 2).
#[derive(Clone, PartialEq, Message)]
struct TypedStructValue {
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

/// Whether a filter with `name` and config type `type_name` is Istio's stats filter.
pub fn is_stats_filter(name: &str, type_name: &str) -> bool {
    type_name == PLUGIN_CONFIG_TYPE || (name == FILTER_NAME && !type_name.is_empty())
}

/// Convert the stats filter's config (`None`: configured by name only, Istio's defaults).
/// A Wasm-typed `istio.stats` (older Istio) runs with the defaults: its settings sit in the
/// Wasm VM's opaque configuration.
pub fn plugin_config(any: Option<&Any>) -> Result<IstioStats, FieldError> {
    let mut out = IstioStats::default();
    let Some(any) = any else {
        return Ok(out);
    };
    let outer = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
    let opaque = skiff_proto::opaque_json(&prost_types::Any {
        type_url: any.type_url.clone(),
        value: any.value.clone(),
    });
    if outer == PLUGIN_CONFIG_TYPE
        && let Some(json) = opaque
    {
        // Read from JSON or YAML, where the type is unknown to the descriptor pool: the
        // original object, as istiod writes it (`reporter: SERVER_GATEWAY`).
        match json.get("reporter") {
            Some(serde_json::Value::String(r)) if r == "SERVER_GATEWAY" => {
                out.server_gateway = true
            }
            Some(serde_json::Value::String(r)) if r == "UNSPECIFIED" => {}
            None => {}
            Some(other) => {
                return Err(FieldError::new(
                    "typed_config.reporter",
                    format!("unknown reporter {other}"),
                ));
            }
        }
        out.disable_host_header_fallback = json
            .get("disable_host_header_fallback")
            .or_else(|| json.get("disableHostHeaderFallback"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
    } else if outer == PLUGIN_CONFIG_TYPE {
        let p = PluginConfigProto::decode(any.value.as_slice())
            .map_err(|e| FieldError::new("typed_config", format!("stats.PluginConfig: {e}")))?;
        out.server_gateway = p.reporter == 1;
        out.disable_host_header_fallback = p.disable_host_header_fallback;
    } else if outer == "udpa.type.v1.TypedStruct" || outer == "xds.type.v3.TypedStruct" {
        let t = TypedStructValue::decode(any.value.as_slice())
            .map_err(|e| FieldError::new("typed_config", format!("TypedStruct: {e}")))?;
        let fields = t.value.map(|s| s.fields).unwrap_or_default();
        match fields.get("reporter").and_then(|v| v.kind.as_ref()) {
            Some(ValueKind::StringValue(s)) if s == "SERVER_GATEWAY" => out.server_gateway = true,
            Some(ValueKind::StringValue(s)) if s == "UNSPECIFIED" => {}
            Some(ValueKind::NumberValue(n)) if *n == 1.0 => out.server_gateway = true,
            Some(ValueKind::NumberValue(n)) if *n == 0.0 => {}
            None => {}
            Some(other) => {
                return Err(FieldError::new(
                    "typed_config.value.reporter",
                    format!("unknown reporter {other:?}"),
                ));
            }
        }
        if let Some(ValueKind::BoolValue(b)) = fields
            .get("disable_host_header_fallback")
            .and_then(|v| v.kind.as_ref())
        {
            out.disable_host_header_fallback = *b;
        }
    }
    out.set_direction(0);
    Ok(out)
}

/// A workload as Istio's labels describe it (`source_*` or `destination_*`); empty fields are
/// reported as `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Workload {
    /// `WORKLOAD_NAME`.
    pub name: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `LABELS["app"]` (or `app.kubernetes.io/name`).
    pub app: String,
    /// `LABELS["version"]` (or `app.kubernetes.io/version`).
    pub version: String,
    /// `LABELS["service.istio.io/canonical-name"]`.
    pub canonical_service: String,
    /// `LABELS["service.istio.io/canonical-revision"]`.
    pub canonical_revision: String,
    /// `CLUSTER_ID`.
    pub cluster: String,
}

/// The proxy's own workload from the node's Istio metadata (what pilot-agent sends istiod).
pub fn local_workload(node: Option<&Node>) -> Workload {
    let Some(meta) = node.and_then(|n| n.metadata.as_ref()) else {
        return Workload::default();
    };
    let s = |k: &str| match meta.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(ValueKind::StringValue(s)) => s.clone(),
        _ => String::new(),
    };
    let labels: BTreeMap<&str, &str> = match meta.fields.get("LABELS").and_then(|v| v.kind.as_ref())
    {
        Some(ValueKind::StructValue(l)) => l
            .fields
            .iter()
            .filter_map(|(k, v)| match &v.kind {
                Some(ValueKind::StringValue(s)) => Some((k.as_str(), s.as_str())),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let label = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(k))
            .map_or_else(String::new, |v| v.to_string())
    };
    Workload {
        name: s("WORKLOAD_NAME"),
        namespace: s("NAMESPACE"),
        app: label(&["app", "app.kubernetes.io/name"]),
        version: label(&["version", "app.kubernetes.io/version"]),
        canonical_service: label(&["service.istio.io/canonical-name"]),
        canonical_revision: label(&["service.istio.io/canonical-revision"]),
        cluster: s("CLUSTER_ID"),
    }
}

/// The service an Istio cluster stands for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioService {
    /// `destination_service`: the host (`reviews.default.svc.cluster.local`).
    pub host: String,
    /// `destination_service_name` (`reviews`).
    pub name: String,
    /// `destination_service_namespace` (`default`).
    pub namespace: String,
}

/// The service named by an Istio cluster name (`outbound|9080||reviews.default.svc.cluster.local`,
/// `inbound|9080||`): the same host, name and namespace istiod puts in the cluster's
/// `istio.services` metadata for a Kubernetes service. Other names give `None`.
pub fn cluster_service(cluster: &str) -> Option<IstioService> {
    let mut parts = cluster.split('|');
    let dir = parts.next()?;
    if dir != "outbound" && dir != "inbound" {
        return None;
    }
    let host = parts.nth(2)?;
    if host.is_empty() {
        return None;
    }
    let mut labels = host.split('.');
    let name = labels.next().unwrap_or_default().to_string();
    let namespace = if host.contains(".svc.") {
        labels.next().unwrap_or_default().to_string()
    } else {
        String::new()
    };
    Some(IstioService {
        host: host.to_string(),
        name,
        namespace,
    })
}

/// An endpoint's Istio workload: `metadata.filter_metadata["istio"].workload`, encoded by
/// istiod as `<workload>;<namespace>;<canonical service>;<canonical revision>;<cluster>`
/// (fewer parts: none, as the stats filter reads it).
pub fn endpoint_workload(
    metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
) -> Option<Workload> {
    let istio = metadata?.filter_metadata.get("istio")?;
    let Some(ValueKind::StringValue(w)) = istio.fields.get("workload")?.kind.as_ref() else {
        return None;
    };
    let parts: Vec<&str> = w.split(';').collect();
    let [
        name,
        namespace,
        canonical_service,
        canonical_revision,
        cluster,
        ..,
    ] = parts[..]
    else {
        return None;
    };
    Some(Workload {
        name: name.to_string(),
        namespace: namespace.to_string(),
        canonical_service: canonical_service.to_string(),
        canonical_revision: canonical_revision.to_string(),
        cluster: cluster.to_string(),
        ..Default::default()
    })
}

/// The first entry of an Istio cluster's `metadata.filter_metadata["istio"].services`
/// (`{host, name, namespace}`), as the stats filter reads it; a missing name is the host's
/// first label.
pub fn metadata_service(
    metadata: Option<&envoy_types::pb::envoy::config::core::v3::Metadata>,
) -> Option<IstioService> {
    let istio = metadata?.filter_metadata.get("istio")?;
    let Some(ValueKind::ListValue(list)) = istio.fields.get("services")?.kind.as_ref() else {
        return None;
    };
    let Some(ValueKind::StructValue(first)) = list.values.first()?.kind.as_ref() else {
        return None;
    };
    let s = |k: &str| match first.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(ValueKind::StringValue(v)) => v.clone(),
        _ => String::new(),
    };
    let host = s("host");
    let name = match s("name") {
        n if n.is_empty() => host.split('.').next().unwrap_or_default().to_string(),
        n => n,
    };
    Some(IstioService {
        host,
        name,
        namespace: s("namespace"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Value;

    fn sv(s: &str) -> Value {
        Value {
            kind: Some(ValueKind::StringValue(s.into())),
        }
    }

    #[test]
    fn plugin_config_in_a_typed_struct_and_raw() {
        let mut fields = BTreeMap::new();
        fields.insert("reporter".to_string(), sv("SERVER_GATEWAY"));
        #[derive(Clone, PartialEq, Message)]
        struct TypedStruct {
            #[prost(string, tag = "1")]
            type_url: String,
            #[prost(message, optional, tag = "2")]
            value: Option<Struct>,
        }
        let ts = TypedStruct {
            type_url: "type.googleapis.com/stats.PluginConfig".into(),
            value: Some(Struct {
                fields: fields.into_iter().collect(),
            }),
        };
        let any = Any {
            type_url: "type.googleapis.com/udpa.type.v1.TypedStruct".into(),
            value: ts.encode_to_vec(),
        };
        let mut c = plugin_config(Some(&any)).unwrap();
        c.set_direction(2);
        assert_eq!(c.reporter, Reporter::Waypoint);
        let raw = Any {
            type_url: "type.googleapis.com/stats.PluginConfig".into(),
            value: vec![],
        };
        let mut c = plugin_config(Some(&raw)).unwrap();
        assert_eq!(c.reporter, Reporter::Source);
        c.set_direction(1);
        assert_eq!(c.reporter.as_str(), "destination");
        let from_json = skiff_proto::any_from_json(
            &serde_json::json!({"@type": "type.googleapis.com/stats.PluginConfig", "reporter": "SERVER_GATEWAY"}),
        )
        .unwrap();
        let c = plugin_config(Some(&Any {
            type_url: from_json.type_url,
            value: from_json.value,
        }))
        .unwrap();
        assert!(c.server_gateway);
        let bad = Any {
            type_url: "type.googleapis.com/stats.PluginConfig".into(),
            value: vec![0xff],
        };
        assert!(plugin_config(Some(&bad)).is_err());
    }

    #[test]
    fn local_workload_from_istio_node_metadata() {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), sv("reviews"));
        labels.insert("version".to_string(), sv("v2"));
        let mut meta = BTreeMap::new();
        meta.insert("WORKLOAD_NAME".to_string(), sv("reviews-v2"));
        meta.insert("NAMESPACE".to_string(), sv("default"));
        meta.insert(
            "LABELS".to_string(),
            Value {
                kind: Some(ValueKind::StructValue(Struct {
                    fields: labels.into_iter().collect(),
                })),
            },
        );
        let node = Node {
            metadata: Some(Struct {
                fields: meta.into_iter().collect(),
            }),
            ..Default::default()
        };
        let w = local_workload(Some(&node));
        assert_eq!(w.name, "reviews-v2");
        assert_eq!(w.namespace, "default");
        assert_eq!((w.app.as_str(), w.version.as_str()), ("reviews", "v2"));
        assert_eq!(local_workload(None), Workload::default());
    }

    #[test]
    fn services_from_istio_cluster_metadata() {
        let json = serde_json::json!({"filter_metadata": {"istio": {"services": [
            {"host": "reviews.default.svc.cluster.local", "namespace": "default"}
        ]}}});
        let any = skiff_proto::any_from_json_typed(
            "type.googleapis.com/envoy.config.core.v3.Metadata",
            &json,
        )
        .unwrap();
        let md = envoy_types::pb::envoy::config::core::v3::Metadata::decode(any.value.as_slice())
            .unwrap();
        let s = metadata_service(Some(&md)).unwrap();
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("reviews.default.svc.cluster.local", "reviews", "default")
        );
        assert_eq!(metadata_service(None), None);
        let json = serde_json::json!({"filter_metadata": {"istio": {
            "workload": "reviews-v2;default;reviews;v2;Kubernetes"
        }}});
        let any = skiff_proto::any_from_json_typed(
            "type.googleapis.com/envoy.config.core.v3.Metadata",
            &json,
        )
        .unwrap();
        let md = envoy_types::pb::envoy::config::core::v3::Metadata::decode(any.value.as_slice())
            .unwrap();
        let w = endpoint_workload(Some(&md)).unwrap();
        assert_eq!(
            (
                w.name.as_str(),
                w.namespace.as_str(),
                w.canonical_revision.as_str()
            ),
            ("reviews-v2", "default", "v2")
        );
    }

    #[test]
    fn services_from_istio_cluster_names() {
        let s = cluster_service("outbound|9080||reviews.default.svc.cluster.local").unwrap();
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.namespace.as_str()),
            ("reviews.default.svc.cluster.local", "reviews", "default")
        );
        assert_eq!(cluster_service("inbound|9080||"), None);
        assert_eq!(cluster_service("PassthroughCluster"), None);
        let e = cluster_service("outbound|443||www.example.com").unwrap();
        assert_eq!((e.name.as_str(), e.namespace.as_str()), ("www", ""));
    }
}
