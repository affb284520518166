//! Istio's stats filter (`istio.stats`, issue 17): its configuration on a chain or an HCM, the
//! local workload read from the node's Istio metadata, and the service named by an Istio
//! cluster. `stats::istio` records the standard metrics from these.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioStats {
    /// The reporter, from `reporter` and the listener's `traffic_direction`.
    pub reporter: Reporter,
    /// `reporter: SERVER_GATEWAY` was configured (the direction does not change it).
    pub server_gateway: bool,
    /// `disable_host_header_fallback`: `destination_service` never comes from `Host`.
    pub disable_host_header_fallback: bool,
    /// `tcp_reporting_duration` (15 s by default): how often a long-lived TCP connection's byte
    /// counts reach `istio_tcp_sent/received_bytes_total` before it closes.
    pub tcp_reporting: Duration,
    /// `metrics`: drops and removed tags, in the order given.
    /// Shared: every recorded label set carries it to the renderer.
    pub overrides: Arc<[MetricOverride]>,
}

impl Default for IstioStats {
    fn default() -> Self {
        IstioStats {
            reporter: Reporter::default(),
            server_gateway: false,
            disable_host_header_fallback: false,
            tcp_reporting: DEFAULT_TCP_REPORTING,
            overrides: Arc::from(Vec::new()),
        }
    }
}

/// Istio's default `tcp_reporting_duration`.
pub const DEFAULT_TCP_REPORTING: Duration = Duration::from_secs(15);

/// The standard metrics as `metrics[].name` names them (no `istio_` prefix).
pub const STANDARD_METRICS: [&str; 8] = [
    "requests_total",
    "request_duration_milliseconds",
    "request_bytes",
    "response_bytes",
    "tcp_connections_opened_total",
    "tcp_connections_closed_total",
    "tcp_sent_bytes_total",
    "tcp_received_bytes_total",
];

/// One `metrics` entry skiff applies: no CEL (`dimensions` is refused).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetricOverride {
    /// The metric it applies to (`requests_total`, ...); `None`: every metric.
    pub name: Option<String>,
    /// `drop`: the metric is not reported.
    pub drop: bool,
    /// `tags_to_remove`: these labels are left out (series that differ only in them merge).
    pub tags_to_remove: Vec<String>,
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

    /// Whether metric `name` (`requests_total`, ...) is reported, and without which labels.
    pub fn shape(&self, name: &str) -> (bool, Vec<&str>) {
        shape(&self.overrides, name)
    }
}

/// Whether metric `name` (`requests_total`, ...) is reported under `overrides`, and without
/// which labels.
pub fn shape<'a>(overrides: &'a [MetricOverride], name: &str) -> (bool, Vec<&'a str>) {
    let mut drop = false;
    let mut removed: Vec<&str> = Vec::new();
    for o in overrides {
        if o.name.as_deref().is_some_and(|n| n != name) {
            continue;
        }
        // A drop is final: a later entry for the same metric does not bring it back.
        drop |= o.drop;
        for t in &o.tags_to_remove {
            if !removed.contains(&t.as_str()) {
                removed.push(t);
            }
        }
    }
    (!drop, removed)
}

/// Whether a filter with `name` and config type `type_name` is Istio's stats filter.
pub fn is_stats_filter(name: &str, type_name: &str) -> bool {
    type_name == PLUGIN_CONFIG_TYPE || (name == FILTER_NAME && !type_name.is_empty())
}

/// `stats.PluginConfig` on the wire (tags from istio/proxy's
/// `source/extensions/filters/http/istio_stats/config.proto`).
#[derive(Clone, PartialEq, Message)]
struct PluginConfigProto {
    #[prost(bool, tag = "6")]
    disable_host_header_fallback: bool,
    #[prost(message, optional, tag = "7")]
    tcp_reporting_duration: Option<prost_types::Duration>,
    #[prost(message, repeated, tag = "8")]
    metrics: Vec<MetricConfigProto>,
    #[prost(message, repeated, tag = "9")]
    definitions: Vec<MetricDefinitionProto>,
    /// 0 UNSPECIFIED, 1 SERVER_GATEWAY.
    #[prost(int32, tag = "10")]
    reporter: i32,
    #[prost(message, optional, tag = "11")]
    rescoping_duration: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "12")]
    scope_grace_period_duration: Option<prost_types::Duration>,
}

#[derive(Clone, PartialEq, Message)]
struct MetricConfigProto {
    #[prost(btree_map = "string, string", tag = "1")]
    dimensions: BTreeMap<String, String>,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, repeated, tag = "3")]
    tags_to_remove: Vec<String>,
    #[prost(string, tag = "4")]
    r#match: String,
    #[prost(bool, tag = "5")]
    drop: bool,
}

#[derive(Clone, PartialEq, Message)]
struct MetricDefinitionProto {
    #[prost(string, tag = "1")]
    name: String,
}

impl PluginConfigProto {
    /// The proto3 JSON of the fields skiff looks at, so every encoding is checked by one parser.
    fn to_json(&self) -> serde_json::Value {
        let dur = |d: &Option<prost_types::Duration>| {
            d.as_ref()
                .map(|d| serde_json::Value::String(format!("{}.{:09}s", d.seconds, d.nanos)))
        };
        let mut m = serde_json::Map::new();
        m.insert(
            "disable_host_header_fallback".into(),
            self.disable_host_header_fallback.into(),
        );
        m.insert("reporter".into(), i64::from(self.reporter).into());
        if let Some(d) = dur(&self.tcp_reporting_duration) {
            m.insert("tcp_reporting_duration".into(), d);
        }
        let metrics: Vec<serde_json::Value> = self
            .metrics
            .iter()
            .map(|c| {
                serde_json::json!({
                    "dimensions": c.dimensions,
                    "name": c.name,
                    "tags_to_remove": c.tags_to_remove,
                    "match": c.r#match,
                    "drop": c.drop,
                })
            })
            .collect();
        m.insert("metrics".into(), metrics.into());
        let defs: Vec<serde_json::Value> = self
            .definitions
            .iter()
            .map(|d| serde_json::json!({ "name": d.name }))
            .collect();
        m.insert("definitions".into(), defs.into());
        serde_json::Value::Object(m)
    }
}

/// A TypedStruct's `value` (field 2).
#[derive(Clone, PartialEq, Message)]
struct TypedStructValue {
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

fn struct_to_json(s: Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: envoy_types::pb::google::protobuf::Value) -> serde_json::Value {
    match v.kind {
        None | Some(ValueKind::NullValue(_)) => serde_json::Value::Null,
        Some(ValueKind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(ValueKind::StringValue(s)) => serde_json::Value::String(s),
        Some(ValueKind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(ValueKind::StructValue(s)) => struct_to_json(s),
        Some(ValueKind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
    }
}

/// Convert the stats filter's config (`None`: configured by name only, Istio's defaults):
/// `stats.PluginConfig` as JSON/YAML, binary or in a TypedStruct, or older Istio's Wasm config.
pub fn plugin_config(any: Option<&Any>) -> Result<IstioStats, FieldError> {
    let Some(any) = any else {
        return Ok(IstioStats::default());
    };
    let outer = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
    let opaque = skiff_proto::opaque_json(&prost_types::Any {
        type_url: any.type_url.clone(),
        value: any.value.clone(),
    });
    let (json, prefix) = if outer == PLUGIN_CONFIG_TYPE {
        match opaque {
            // Read from JSON or YAML, where the type is unknown to the descriptor pool: the
            // original object, as istiod writes it (`reporter: SERVER_GATEWAY`).
            Some(json) => (json, "typed_config"),
            None => {
                let p = PluginConfigProto::decode(any.value.as_slice()).map_err(|e| {
                    FieldError::new("typed_config", format!("stats.PluginConfig: {e}"))
                })?;
                (p.to_json(), "typed_config")
            }
        }
    } else if outer == "udpa.type.v1.TypedStruct" || outer == "xds.type.v3.TypedStruct" {
        let t = TypedStructValue::decode(any.value.as_slice())
            .map_err(|e| FieldError::new("typed_config", format!("TypedStruct: {e}")))?;
        (
            t.value
                .map(struct_to_json)
                .unwrap_or(serde_json::Value::Null),
            "typed_config.value",
        )
    } else if outer == WASM_TYPE {
        return wasm_config(any);
    } else {
        let mut out = IstioStats::default();
        out.set_direction(0);
        return Ok(out);
    };
    from_json(&json, prefix)
}

/// A proto3 JSON duration (`15s`, `0.5s`, `1.000000000s`); negative ones are not durations here.
fn json_duration(s: &str) -> Option<Duration> {
    let n = s.strip_suffix('s')?;
    let (secs, frac) = n.split_once('.').unwrap_or((n, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(Duration::new(secs.parse().ok()?, nanos))
}

/// Config type of the builtin-Wasm stats filter older Istio writes.
const WASM_TYPE: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";

/// Older Istio's Wasm-typed `istio.stats`: the plugin's settings are a JSON string in
/// `config.configuration`; read with the same parser once the fields those versions had and
/// the native filter dropped (tuning of the Wasm VM's own cache and stat encoding) are set aside.
fn wasm_config(any: &Any) -> Result<IstioStats, FieldError> {
    use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
    use envoy_types::pb::google::protobuf::StringValue;
    let w = Wasm::decode(any.value.as_slice())
        .map_err(|e| FieldError::new("typed_config", format!("Wasm: {e}")))?;
    let Some(conf) = w.config.and_then(|c| c.configuration) else {
        let mut out = IstioStats::default();
        out.set_direction(0);
        return Ok(out);
    };
    let path = "typed_config.config.configuration";
    let text = if conf.type_url.ends_with("google.protobuf.StringValue") {
        StringValue::decode(conf.value.as_slice())
            .map_err(|e| FieldError::new(path, format!("StringValue: {e}")))?
            .value
    } else {
        return Err(FieldError::new(
            path,
            format!(
                "expected a google.protobuf.StringValue, got {}",
                conf.type_url
            ),
        ));
    };
    let mut json: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(Default::default())
    } else {
        serde_json::from_str(&text).map_err(|e| FieldError::new(path, format!("not JSON: {e}")))?
    };
    if let Some(obj) = json.as_object_mut() {
        if let Some(p) = obj.remove("stat_prefix")
            && p.as_str().is_some_and(|p| p != "istio")
        {
            return Err(FieldError::new(
                format!("{path}.stat_prefix"),
                format!("{p}: skiff reports Istio's metrics under the `istio` prefix only"),
            ));
        }
        for tuning in [
            "debug",
            "max_peer_cache_size",
            "field_separator",
            "value_separator",
        ] {
            obj.remove(tuning);
        }
    }
    from_json(&json, path)
}

/// A field of `obj` under its proto name or its JSON (lowerCamelCase) name.
fn field<'a>(
    obj: &'a serde_json::Value,
    snake: &str,
    camel: &str,
) -> Option<&'a serde_json::Value> {
    obj.get(snake).or_else(|| obj.get(camel))
}

/// The one parser of `stats.PluginConfig`: what skiff runs, or the field it cannot.
fn from_json(json: &serde_json::Value, prefix: &str) -> Result<IstioStats, FieldError> {
    let err = |path: String, why: String| FieldError::new(format!("{prefix}.{path}"), why);
    let mut out = IstioStats::default();
    let mut overrides = Vec::new();
    match json.get("reporter") {
        Some(serde_json::Value::String(r)) if r == "SERVER_GATEWAY" => out.server_gateway = true,
        Some(serde_json::Value::String(r)) if r == "UNSPECIFIED" => {}
        Some(serde_json::Value::Number(n)) if n.as_f64() == Some(1.0) => out.server_gateway = true,
        Some(serde_json::Value::Number(n)) if n.as_f64() == Some(0.0) => {}
        None | Some(serde_json::Value::Null) => {}
        Some(other) => {
            return Err(err("reporter".into(), format!("unknown reporter {other}")));
        }
    }
    out.disable_host_header_fallback = field(
        json,
        "disable_host_header_fallback",
        "disableHostHeaderFallback",
    )
    .and_then(serde_json::Value::as_bool)
    .unwrap_or(false);
    if let Some(d) = field(json, "tcp_reporting_duration", "tcpReportingDuration") {
        let d = d.as_str().and_then(json_duration).ok_or_else(|| {
            err(
                "tcp_reporting_duration".into(),
                format!("not a duration: {d}"),
            )
        })?;
        if d.is_zero() {
            return Err(err(
                "tcp_reporting_duration".into(),
                "must be greater than 0".into(),
            ));
        }
        out.tcp_reporting = d;
    }
    if let Some(defs) = json
        .get("definitions")
        .and_then(serde_json::Value::as_array)
        && let Some(first) = defs.first()
    {
        let name = first.get("name").and_then(|v| v.as_str()).unwrap_or("");
        return Err(err(
            "definitions[0]".into(),
            format!(
                "custom metric {name:?}: its value is a CEL expression, which skiff does not evaluate"
            ),
        ));
    }
    let metrics = json
        .get("metrics")
        .and_then(serde_json::Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for (i, m) in metrics.iter().enumerate() {
        if let Some(d) = m.get("dimensions").and_then(serde_json::Value::as_object)
            && let Some(tag) = d.keys().next()
        {
            return Err(err(
                format!("metrics[{i}].dimensions"),
                format!("tag {tag:?} is a CEL expression, which skiff does not evaluate"),
            ));
        }
        let name = m
            .get("name")
            .and_then(serde_json::Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_string);
        let tags_to_remove = field(m, "tags_to_remove", "tagsToRemove")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // `match` is documented as not implemented by Istio's own filter: it never selects.
        overrides.push(MetricOverride {
            name,
            drop: m
                .get("drop")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            tags_to_remove,
        });
    }
    out.overrides = Arc::from(overrides);
    // rescoping_duration / scope_grace_period_duration tune when Istio's filter rebuilds its
    // stat scopes to bound memory; skiff keeps one handle set per label set instead, so they
    // change nothing skiff reports.
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

    fn from(json: serde_json::Value) -> Result<IstioStats, FieldError> {
        let mut j = json;
        j["@type"] = "type.googleapis.com/stats.PluginConfig".into();
        let a = skiff_proto::any_from_json(&j).unwrap();
        plugin_config(Some(&Any {
            type_url: a.type_url,
            value: a.value,
        }))
    }

    #[test]
    fn metric_overrides_drop_and_remove_tags_and_cel_is_refused_by_field() {
        let c = from(serde_json::json!({
            "tcp_reporting_duration": "2.500s",
            "rescoping_duration": "3600s",
            "metrics": [
                {"name": "requests_total", "tags_to_remove": ["response_flags", "source_app"]},
                {"tagsToRemove": ["destination_cluster"]},
                {"name": "tcp_sent_bytes_total", "drop": true},
                {"name": "tcp_sent_bytes_total", "drop": false}
            ]
        }))
        .unwrap();
        assert_eq!(c.tcp_reporting, Duration::from_millis(2500));
        assert_eq!(
            c.shape("requests_total"),
            (
                true,
                vec!["response_flags", "source_app", "destination_cluster"]
            )
        );
        assert_eq!(
            c.shape("request_bytes"),
            (true, vec!["destination_cluster"])
        );
        assert!(!c.shape("tcp_sent_bytes_total").0, "a drop is final");
        assert_eq!(IstioStats::default().tcp_reporting, DEFAULT_TCP_REPORTING);

        let e = from(serde_json::json!({"metrics": [
            {"name": "requests_total"},
            {"dimensions": {"request_host": "request.host"}}
        ]}))
        .unwrap_err();
        assert!(format!("{e:?}").contains("metrics[1].dimensions"), "{e:?}");
        assert!(format!("{e:?}").contains("request_host"), "{e:?}");
        let e = from(serde_json::json!({"definitions": [{"name": "my_total", "value": "1"}]}))
            .unwrap_err();
        assert!(format!("{e:?}").contains("definitions[0]"), "{e:?}");
        for bad in ["-1s", "15", "abc", "0s"] {
            let e = from(serde_json::json!({"tcp_reporting_duration": bad})).unwrap_err();
            assert!(
                format!("{e:?}").contains("tcp_reporting_duration"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn binary_plugin_config_goes_through_the_same_checks() {
        let p = PluginConfigProto {
            tcp_reporting_duration: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            metrics: vec![MetricConfigProto {
                name: "request_bytes".into(),
                drop: true,
                ..Default::default()
            }],
            reporter: 1,
            ..Default::default()
        };
        let any = Any {
            type_url: "type.googleapis.com/stats.PluginConfig".into(),
            value: p.encode_to_vec(),
        };
        // The descriptor pool does not know stats.PluginConfig: this is the binary path.
        let c = plugin_config(Some(&any)).unwrap();
        assert_eq!(c.tcp_reporting, Duration::from_secs(30));
        assert!(c.server_gateway);
        assert!(!c.shape("request_bytes").0);
        let mut with_cel = p.clone();
        with_cel.definitions.push(MetricDefinitionProto {
            name: "custom".into(),
        });
        let any = Any {
            type_url: any.type_url.clone(),
            value: with_cel.encode_to_vec(),
        };
        assert!(plugin_config(Some(&any)).is_err());
    }

    #[test]
    fn wasm_stats_configuration_string_is_read_with_the_same_checks() {
        use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
        use envoy_types::pb::envoy::extensions::wasm::v3::PluginConfig;
        use envoy_types::pb::google::protobuf::StringValue;
        let wasm = |conf: &str| Any {
            type_url: format!("type.googleapis.com/{WASM_TYPE}"),
            value: Wasm {
                config: Some(PluginConfig {
                    root_id: "stats_outbound".into(),
                    configuration: Some(Any {
                        type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
                        value: StringValue { value: conf.into() }.encode_to_vec(),
                    }),
                    ..Default::default()
                }),
            }
            .encode_to_vec(),
        };
        let c = plugin_config(Some(&wasm(
            r#"{"debug": "false", "stat_prefix": "istio", "metrics": [{"name": "requests_total", "drop": true}]}"#,
        )))
        .unwrap();
        assert!(!c.shape("requests_total").0);
        let e = plugin_config(Some(&wasm(r#"{"stat_prefix": "mesh"}"#))).unwrap_err();
        assert!(e.field.ends_with("stat_prefix"), "{e:?}");
        let e = plugin_config(Some(&wasm(
            r#"{"metrics": [{"dimensions": {"x": "request.host"}}]}"#,
        )))
        .unwrap_err();
        assert!(e.field.ends_with("metrics[0].dimensions"), "{e:?}");
        assert!(plugin_config(Some(&wasm(""))).is_ok());
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
