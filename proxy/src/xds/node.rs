//! The node skiff sends to istiod, built as pilot-agent builds it (Istio's
//! `pkg/bootstrap`): istiod generates a sidecar's configuration from this node, so the id and
//! metadata must say which pod, namespace, service account and labels skiff stands for.
//!
//! Sources, lowest precedence first: the bootstrap's `node`, every `ISTIO_META_<KEY>`
//! environment variable (a string value under `<KEY>`; `ISTIO_METAJSON_<KEY>` values are JSON,
//! parsed, as pilot-agent does for labels and annotations), the pod's environment
//! (`POD_NAME`, `POD_NAMESPACE`, `INSTANCE_IP`, `SERVICE_ACCOUNT`, as Istio's injector sets
//! them), then flags. The id is `sidecar~IP~POD.NS~NS.svc.cluster.local` unless given.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{ListValue, NullValue, Struct, Value, value::Kind};

/// The Istio release whose sidecar configuration skiff is written against; sent as
/// `ISTIO_VERSION` unless `--istio-version` or `ISTIO_META_ISTIO_VERSION` says otherwise
/// (istiod gates features on it).
pub const DEFAULT_ISTIO_VERSION: &str = "1.24.0";

/// Istio's default `CLUSTER_ID` (a single-cluster mesh).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Istio's default DNS domain suffix (`--domain` of pilot-agent is `NS.svc.cluster.local`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// What flags give; anything `None` comes from the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IstioNodeOptions {
    /// `--node-id`: the whole id, as given.
    pub node_id: Option<String>,
    /// `--pod-name` (env `POD_NAME`).
    pub pod_name: Option<String>,
    /// `--pod-namespace` (env `POD_NAMESPACE`).
    pub pod_namespace: Option<String>,
    /// `--instance-ips` (env `INSTANCE_IP`, then `ISTIO_META_INSTANCE_IPS`); the first is the
    /// id's address.
    pub instance_ips: Vec<IpAddr>,
    /// `--service-account` (env `SERVICE_ACCOUNT`).
    pub service_account: Option<String>,
    /// `--cluster-id` (env `ISTIO_META_CLUSTER_ID`, default `Kubernetes`).
    pub cluster_id: Option<String>,
    /// `--mesh-id` (env `ISTIO_META_MESH_ID`, default the cluster domain).
    pub mesh_id: Option<String>,
    /// `--istio-version` (env `ISTIO_META_ISTIO_VERSION`, default [`DEFAULT_ISTIO_VERSION`]).
    pub istio_version: Option<String>,
    /// `--workload-name` (env `ISTIO_META_WORKLOAD_NAME`).
    pub workload_name: Option<String>,
    /// `--pod-labels FILE`: the downward API labels file (`key="value"` lines; Istio mounts it
    /// at `/etc/istio/pod/labels`); merged over `ISTIO_METAJSON_LABELS`.
    pub labels_file: Option<PathBuf>,
    /// `--cluster-domain` (default `cluster.local`).
    pub cluster_domain: Option<String>,
}

/// Why the node cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No id given and the pod's identity is incomplete.
    #[error(
        "no node id: give --node-id, or the pod's identity ({missing} missing; flags --pod-name/--pod-namespace/--instance-ips or env POD_NAME/POD_NAMESPACE/INSTANCE_IP)"
    )]
    NoId {
        /// The parts that are missing, comma separated.
        missing: String,
    },
    /// An `ISTIO_METAJSON_*` variable is not JSON.
    #[error("environment {var}: not JSON: {error}")]
    Json {
        /// The variable.
        var: String,
        /// serde_json's message.
        error: String,
    },
    /// An address list is not a list of IP addresses.
    #[error("{origin}: {value:?} is not an IP address")]
    Ip {
        /// Where it came from.
        origin: &'static str,
        /// The bad item.
        value: String,
    },
    /// The interception mode is one skiff cannot serve.
    #[error(
        "INTERCEPTION_MODE {0:?}: skiff captures with REDIRECT semantics only (TPROXY and NONE are not supported)"
    )]
    Interception(String),
    /// The labels file cannot be read or parsed.
    #[error("pod labels file {}: {reason}", path.display())]
    Labels {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The node for istiod: `base` (the bootstrap's node, if any) overlaid with `ISTIO_META_*`
/// from `env`, the pod's environment and `opts`. `env` is the process environment (a map, so
/// tests need no `set_var`).
pub fn istio_node(
    opts: &IstioNodeOptions,
    env: &BTreeMap<String, String>,
    base: Option<&Node>,
) -> Result<Node, NodeError> {
    let mut node = base.cloned().unwrap_or_default();
    let mut meta: BTreeMap<String, Value> = node
        .metadata
        .take()
        .map(|s| s.fields.into_iter().collect())
        .unwrap_or_default();

    // pilot-agent's rule: every ISTIO_META_<KEY> is metadata <KEY> (a string);
    // ISTIO_METAJSON_<KEY> is JSON.
    for (var, value) in env {
        if let Some(key) = var.strip_prefix("ISTIO_METAJSON_") {
            let json: serde_json::Value =
                serde_json::from_str(value).map_err(|e| NodeError::Json {
                    var: var.clone(),
                    error: e.to_string(),
                })?;
            meta.insert(key.to_owned(), json_value(&json));
        } else if let Some(key) = var.strip_prefix("ISTIO_META_")
            && !key.is_empty()
        {
            meta.insert(key.to_owned(), string(value));
        }
    }

    let env_get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let meta_str =
        |meta: &BTreeMap<String, Value>, k: &str| match meta.get(k).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
    let pod_name = opts.pod_name.clone().or_else(|| env_get("POD_NAME"));
    let namespace = opts
        .pod_namespace
        .clone()
        .or_else(|| env_get("POD_NAMESPACE"));
    let ips = if !opts.instance_ips.is_empty() {
        opts.instance_ips.clone()
    } else if let Some(v) = env_get("INSTANCE_IP") {
        parse_ips(&v, "env INSTANCE_IP")?
    } else if let Some(v) = meta_str(&meta, "INSTANCE_IPS") {
        parse_ips(&v, "env ISTIO_META_INSTANCE_IPS")?
    } else {
        Vec::new()
    };
    let service_account = opts
        .service_account
        .clone()
        .or_else(|| env_get("SERVICE_ACCOUNT"));
    let domain = opts
        .cluster_domain
        .clone()
        .unwrap_or_else(|| DEFAULT_CLUSTER_DOMAIN.to_owned());

    let mode = meta_str(&meta, "INTERCEPTION_MODE").unwrap_or_else(|| "REDIRECT".into());
    if mode != "REDIRECT" {
        return Err(NodeError::Interception(mode));
    }
    let mut set = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            meta.insert(k.to_owned(), string(&v));
        }
    };
    set("INTERCEPTION_MODE", Some(mode));
    set("NAME", pod_name.clone());
    set("NAMESPACE", namespace.clone());
    set("SERVICE_ACCOUNT", service_account);
    set(
        "INSTANCE_IPS",
        (!ips.is_empty()).then(|| {
            ips.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }),
    );
    set("WORKLOAD_NAME", opts.workload_name.clone());
    set("CLUSTER_ID", opts.cluster_id.clone());
    set("MESH_ID", opts.mesh_id.clone());
    set("ISTIO_VERSION", opts.istio_version.clone());
    for (k, default) in [
        ("CLUSTER_ID", DEFAULT_CLUSTER_ID),
        ("MESH_ID", domain.as_str()),
        ("ISTIO_VERSION", DEFAULT_ISTIO_VERSION),
    ] {
        meta.entry(k.to_owned()).or_insert_with(|| string(default));
    }
    if let Some(path) = &opts.labels_file {
        let mut labels = match meta.remove("LABELS").and_then(|v| v.kind) {
            Some(Kind::StructValue(s)) => s.fields,
            _ => HashMap::new(),
        };
        for (k, v) in read_labels(path)? {
            labels.insert(k, string(&v));
        }
        meta.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: labels })),
            },
        );
    }

    node.id = match &opts.node_id {
        Some(id) => id.clone(),
        None => match (&pod_name, &namespace, ips.first()) {
            (Some(pod), Some(ns), Some(ip)) => {
                format!("sidecar~{ip}~{pod}.{ns}~{ns}.svc.{domain}")
            }
            _ if !node.id.is_empty() => node.id,
            _ => {
                let missing: Vec<&str> = [
                    (pod_name.is_none(), "pod name"),
                    (namespace.is_none(), "namespace"),
                    (ips.is_empty(), "instance IP"),
                ]
                .iter()
                .filter(|(m, _)| *m)
                .map(|(_, n)| *n)
                .collect();
                return Err(NodeError::NoId {
                    missing: missing.join(", "),
                });
            }
        },
    };
    if node.cluster.is_empty()
        && let Some(ns) = &namespace
    {
        // pilot-agent's service cluster: the workload (canonical name) and namespace.
        let app = opts
            .workload_name
            .clone()
            .or_else(|| meta_str(&meta, "WORKLOAD_NAME"))
            .or(pod_name)
            .unwrap_or_else(|| "istio-proxy".into());
        node.cluster = format!("{app}.{ns}");
    }
    if node.user_agent_name.is_empty() {
        node.user_agent_name = "skiff".into();
    }
    node.metadata = Some(Struct {
        fields: meta.into_iter().collect(),
    });
    Ok(node)
}

/// The process environment, for [`istio_node`]; variables that are not UTF-8 are skipped
/// (`std::env::vars` would panic on them).
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

fn parse_ips(list: &str, origin: &'static str) -> Result<Vec<IpAddr>, NodeError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| NodeError::Ip {
                origin,
                value: s.to_owned(),
            })
        })
        .collect()
}

/// A downward API labels file: one `key="value"` per line, values Go-quoted.
fn read_labels(path: &Path) -> Result<BTreeMap<String, String>, NodeError> {
    let err = |reason: String| NodeError::Labels {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse_labels(&text).map_err(err)
}

/// The body of [`read_labels`].
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key=\"value\"", i + 1))?;
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(|| format!("line {}: value is not quoted", i + 1))?;
        let mut value = String::with_capacity(v.len());
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                value.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => value.push('\n'),
                Some('t') => value.push('\t'),
                Some(c) => value.push(c),
                None => return Err(format!("line {}: dangling backslash", i + 1)),
            }
        }
        out.insert(k.trim().to_owned(), value);
    }
    Ok(out)
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// JSON -> `google.protobuf.Value`.
fn json_value(v: &serde_json::Value) -> Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(NullValue::NullValue as i32),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn meta(node: &Node, key: &str) -> Option<Kind> {
        node.metadata.as_ref()?.fields.get(key)?.kind.clone()
    }

    fn s(v: &str) -> Option<Kind> {
        Some(Kind::StringValue(v.to_owned()))
    }

    #[test]
    fn pod_environment_gives_pilot_agents_id_and_metadata() {
        let e = env(&[
            ("POD_NAME", "productpage-v1-7d4cc5b4f-x2x9k"),
            ("POD_NAMESPACE", "bookinfo"),
            ("INSTANCE_IP", "10.244.0.12"),
            ("SERVICE_ACCOUNT", "bookinfo-productpage"),
            ("ISTIO_META_WORKLOAD_NAME", "productpage-v1"),
            ("ISTIO_META_CLUSTER_ID", "east"),
            (
                "ISTIO_META_POD_PORTS",
                r#"[{"containerPort":9080,"protocol":"TCP"}]"#,
            ),
            (
                "ISTIO_METAJSON_LABELS",
                r#"{"app":"productpage","version":"v1"}"#,
            ),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("HOME", "/root"),
        ]);
        let node = istio_node(&IstioNodeOptions::default(), &e, None).unwrap();
        assert_eq!(
            node.id,
            "sidecar~10.244.0.12~productpage-v1-7d4cc5b4f-x2x9k.bookinfo~bookinfo.svc.cluster.local"
        );
        assert_eq!(node.cluster, "productpage-v1.bookinfo");
        assert_eq!(meta(&node, "NAME"), s("productpage-v1-7d4cc5b4f-x2x9k"));
        assert_eq!(meta(&node, "NAMESPACE"), s("bookinfo"));
        assert_eq!(meta(&node, "SERVICE_ACCOUNT"), s("bookinfo-productpage"));
        assert_eq!(meta(&node, "INSTANCE_IPS"), s("10.244.0.12"));
        assert_eq!(meta(&node, "CLUSTER_ID"), s("east"));
        assert_eq!(meta(&node, "MESH_ID"), s("cluster.local"));
        assert_eq!(meta(&node, "ISTIO_VERSION"), s(DEFAULT_ISTIO_VERSION));
        assert_eq!(meta(&node, "INTERCEPTION_MODE"), s("REDIRECT"));
        assert_eq!(meta(&node, "WORKLOAD_NAME"), s("productpage-v1"));
        assert_eq!(meta(&node, "DNS_CAPTURE"), s("true"));
        // POD_PORTS stays a string holding JSON, as Istio sends it.
        assert_eq!(
            meta(&node, "POD_PORTS"),
            s(r#"[{"containerPort":9080,"protocol":"TCP"}]"#)
        );
        let Some(Kind::StructValue(labels)) = meta(&node, "LABELS") else {
            panic!("LABELS is not a struct")
        };
        assert_eq!(labels.fields["app"].kind, s("productpage"));
        assert_eq!(labels.fields["version"].kind, s("v1"));
        assert!(meta(&node, "HOME").is_none());
    }

    #[test]
    fn flags_win_over_environment_and_bootstrap() {
        let e = env(&[
            ("POD_NAME", "env-pod"),
            ("POD_NAMESPACE", "env-ns"),
            ("INSTANCE_IP", "10.0.0.1"),
            ("ISTIO_META_CLUSTER_ID", "env-cluster"),
        ]);
        let base = Node {
            id: "bootstrap-id".into(),
            cluster: "bootstrap-cluster".into(),
            metadata: Some(Struct {
                fields: [("FROM_BOOTSTRAP".to_string(), string("kept"))].into(),
            }),
            ..Default::default()
        };
        let opts = IstioNodeOptions {
            pod_name: Some("flag-pod".into()),
            instance_ips: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            cluster_id: Some("flag-cluster".into()),
            istio_version: Some("1.22.3".into()),
            cluster_domain: Some("corp.example".into()),
            ..Default::default()
        };
        let node = istio_node(&opts, &e, Some(&base)).unwrap();
        assert_eq!(
            node.id,
            "sidecar~10.0.0.2~flag-pod.env-ns~env-ns.svc.corp.example"
        );
        assert_eq!(node.cluster, "bootstrap-cluster");
        assert_eq!(meta(&node, "CLUSTER_ID"), s("flag-cluster"));
        assert_eq!(meta(&node, "ISTIO_VERSION"), s("1.22.3"));
        assert_eq!(meta(&node, "MESH_ID"), s("corp.example"));
        assert_eq!(meta(&node, "INSTANCE_IPS"), s("10.0.0.2,fd00::2"));
        assert_eq!(meta(&node, "FROM_BOOTSTRAP"), s("kept"));

        let given = IstioNodeOptions {
            node_id: Some("sidecar~1.2.3.4~a.b~b.svc.cluster.local".into()),
            ..Default::default()
        };
        assert_eq!(
            istio_node(&given, &e, None).unwrap().id,
            "sidecar~1.2.3.4~a.b~b.svc.cluster.local"
        );
    }

    #[test]
    fn incomplete_identity_names_what_is_missing() {
        let err = istio_node(
            &IstioNodeOptions::default(),
            &env(&[("POD_NAME", "p")]),
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("namespace, instance IP missing"),
            "{err}"
        );
        // A bootstrap id is kept when the pod identity is incomplete.
        let base = Node {
            id: "given".into(),
            ..Default::default()
        };
        let node = istio_node(&IstioNodeOptions::default(), &BTreeMap::new(), Some(&base)).unwrap();
        assert_eq!(node.id, "given");
    }

    #[test]
    fn tproxy_and_bad_values_are_refused() {
        let base = env(&[
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("INSTANCE_IP", "10.0.0.1"),
        ]);
        let mut e = base.clone();
        e.insert("ISTIO_META_INTERCEPTION_MODE".into(), "TPROXY".into());
        let err = istio_node(&IstioNodeOptions::default(), &e, None).unwrap_err();
        assert!(err.to_string().contains("TPROXY"), "{err}");
        let mut e = base.clone();
        e.insert("ISTIO_METAJSON_ANNOTATIONS".into(), "{not json".into());
        let err = istio_node(&IstioNodeOptions::default(), &e, None).unwrap_err();
        assert!(
            err.to_string().contains("ISTIO_METAJSON_ANNOTATIONS"),
            "{err}"
        );
        let mut e = base;
        e.insert("INSTANCE_IP".into(), "pod-ip".into());
        let err = istio_node(&IstioNodeOptions::default(), &e, None).unwrap_err();
        assert!(err.to_string().contains("INSTANCE_IP"), "{err}");
    }

    #[test]
    fn downward_api_labels_file_is_parsed_and_merged() {
        let parsed = parse_labels(
            "app=\"reviews\"\nsecurity.istio.io/tlsMode=\"istio\"\nnote=\"say \\\"hi\\\"\"\n",
        )
        .unwrap();
        assert_eq!(parsed["app"], "reviews");
        assert_eq!(parsed["security.istio.io/tlsMode"], "istio");
        assert_eq!(parsed["note"], "say \"hi\"");
        assert!(parse_labels("app=reviews").is_err());

        let dir = std::env::temp_dir().join(format!("skiff-labels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("labels");
        std::fs::write(&f, "app=\"reviews\"\n").unwrap();
        let opts = IstioNodeOptions {
            node_id: Some("x".into()),
            labels_file: Some(f),
            ..Default::default()
        };
        let e = env(&[("ISTIO_METAJSON_LABELS", r#"{"version":"v2"}"#)]);
        let node = istio_node(&opts, &e, None).unwrap();
        let Some(Kind::StructValue(labels)) = meta(&node, "LABELS") else {
            panic!("LABELS is not a struct")
        };
        assert_eq!(labels.fields["app"].kind, s("reviews"));
        assert_eq!(labels.fields["version"].kind, s("v2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
