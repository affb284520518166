//! `/config_dump` in Envoy's v3 `ConfigDump` JSON, from the accepted resources of one snapshot.
//!
//! Sections in Envoy's order: Bootstrap, Clusters, Listeners, Routes, Secrets, then (with
//! `?include_eds`) Endpoints. Private keys (and every other field Envoy marks sensitive) are
//! printed as Envoy prints them: `[redacted]`. `?resource=FIELD` returns the entries of that repeated field of
//! every section, each tagged with its message type; `?mask=a,b.c` keeps only those fields
//! (plus `@type`); `?name_regex=RE` keeps resources whose name matches.

use std::time::SystemTime;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap as PbBootstrap;
use serde_json::{Map, Value, json};
use skiff_proto::{CLUSTER_TYPE_URL, LISTENER_TYPE_URL};

use crate::state::{ErrorRecord, ResourceRecord, Snapshot, TypeDump};

const ADMIN: &str = "type.googleapis.com/envoy.admin.v3.";

/// Envoy's timestamp format (RFC 3339, UTC).
pub fn timestamp(t: SystemTime) -> String {
    prost_types::Timestamp::from(t).to_string()
}

/// What the request asked for.
#[derive(Debug, Default, Clone)]
pub struct DumpQuery {
    /// `?include_eds`.
    pub include_eds: bool,
    /// `?resource=`.
    pub resource: Option<String>,
    /// `?mask=` (comma-separated field paths).
    pub mask: Option<String>,
    /// `?name_regex=`.
    pub name_regex: Option<regex_lite::Regex>,
}

fn with_type(type_url: &str, body: Value) -> Value {
    let mut obj = match body {
        Value::Object(o) => o,
        _ => Map::new(),
    };
    obj.insert("@type".into(), Value::String(type_url.into()));
    Value::Object(obj)
}

fn record(r: &ResourceRecord, field: &str) -> Value {
    let mut v = json!({
        field: skiff_proto::any_to_json(&r.resource),
        "last_updated": timestamp(r.last_updated),
    });
    // Envoy leaves `version_info` empty for EDS entries (checked against real Envoy in
    // tests/tests/direct_envoy_diff.rs); proto3 JSON then omits it.
    if field != "endpoint_config" && !r.version_info.is_empty() {
        v["version_info"] = r.version_info.clone().into();
    }
    v
}

fn error_state(e: &ErrorRecord) -> Value {
    let mut v = json!({
        "last_update_attempt": timestamp(e.last_update_attempt),
        "details": e.details,
        "version_info": e.version_info,
    });
    if let Some(r) = &e.resource {
        v["failed_configuration"] = skiff_proto::any_to_json(r);
    }
    v
}

fn dynamic_entries(t: &TypeDump, field: &str, warming: bool) -> Vec<Value> {
    let map = if warming { &t.warming } else { &t.active };
    map.values()
        .map(|r| record(r, field))
        .zip(map.keys())
        .map(|(mut v, name)| {
            if let Some(e) = t.errors.get(name) {
                v["error_state"] = error_state(e);
            }
            v
        })
        .collect()
}

/// Every section, unfiltered.
pub fn sections(bootstrap: &PbBootstrap, snap: &Snapshot, include_eds: bool) -> Vec<Value> {
    let x = &snap.xds;
    let boot_time = last_boot();
    let mut out = vec![json!({
        "@type": format!("{ADMIN}BootstrapConfigDump"),
        "bootstrap": skiff_proto::to_json(bootstrap),
        "last_updated": boot_time,
    })];

    let sr = bootstrap.static_resources.clone().unwrap_or_default();
    let static_clusters: Vec<Value> = sr
        .clusters
        .iter()
        .map(|c| {
            json!({
                "cluster": with_type(CLUSTER_TYPE_URL, skiff_proto::to_json(c)),
                "last_updated": boot_time,
            })
        })
        .collect();
    let mut clusters = json!({
        "@type": format!("{ADMIN}ClustersConfigDump"),
        "static_clusters": static_clusters,
        "dynamic_active_clusters": dynamic_entries(&x.clusters, "cluster", false),
        "dynamic_warming_clusters": dynamic_entries(&x.clusters, "cluster", true),
    });
    if !x.clusters.version_info.is_empty() {
        clusters["version_info"] = x.clusters.version_info.clone().into();
    }
    out.push(clusters);

    let static_listeners: Vec<Value> = sr
        .listeners
        .iter()
        .map(|l| {
            json!({
                "listener": with_type(LISTENER_TYPE_URL, skiff_proto::to_json(l)),
                "last_updated": boot_time,
            })
        })
        .collect();
    let l = &x.listeners;
    let mut names: Vec<&String> = l
        .active
        .keys()
        .chain(l.warming.keys())
        .chain(l.errors.keys())
        .collect();
    names.sort();
    names.dedup();
    let dynamic_listeners: Vec<Value> = names
        .into_iter()
        .map(|n| {
            let mut v = json!({ "name": n });
            if let Some(r) = l.active.get(n) {
                v["active_state"] = record(r, "listener");
            }
            if let Some(r) = l.warming.get(n) {
                v["warming_state"] = record(r, "listener");
            }
            if let Some(e) = l.errors.get(n) {
                v["error_state"] = error_state(e);
            }
            v
        })
        .collect();
    let mut listeners = json!({
        "@type": format!("{ADMIN}ListenersConfigDump"),
        "static_listeners": static_listeners,
        "dynamic_listeners": dynamic_listeners,
    });
    if !l.version_info.is_empty() {
        listeners["version_info"] = l.version_info.clone().into();
    }
    out.push(listeners);

    out.push(json!({
        "@type": format!("{ADMIN}RoutesConfigDump"),
        "dynamic_route_configs": dynamic_entries(&x.routes, "route_config", false),
    }));
    out.push(secrets(&sr.secrets, snap, &boot_time));
    if include_eds {
        out.push(json!({
            "@type": format!("{ADMIN}EndpointsConfigDump"),
            "dynamic_endpoint_configs": dynamic_entries(&x.endpoints, "endpoint_config", false),
        }));
    }
    // Envoy omits empty repeated fields.
    for s in &mut out {
        if let Value::Object(o) = s {
            o.retain(|_, v| !matches!(v, Value::Array(a) if a.is_empty()));
        }
        redact(s);
    }
    out
}

/// Envoy's `SecretsConfigDump`: the bootstrap's static secrets, then the SDS secrets: those
/// received over ADS with their version and error state, and those of the other SDS sources
/// (gRPC clusters, Istio's Unix socket), which skiff holds as validated values only, so they
/// show without version. Warming never: a secret depends on nothing.
fn secrets(
    statics: &[envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret],
    snap: &Snapshot,
    boot_time: &str,
) -> Value {
    let t = &snap.xds.secrets;
    let static_secrets: Vec<Value> = statics
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "last_updated": boot_time,
                "secret": with_type(crate::model::tls::SECRET_TYPE_URL, skiff_proto::to_json(s)),
            })
        })
        .collect();
    let external = snap
        .secrets
        .keys()
        .filter(|n| !statics.iter().any(|s| s.name == **n) && !t.active.contains_key(*n));
    let mut names: Vec<&String> = t
        .active
        .keys()
        .chain(t.errors.keys())
        .chain(external)
        .collect();
    names.sort();
    names.dedup();
    let dynamic: Vec<Value> = names
        .into_iter()
        .map(|n| {
            let mut v = json!({ "name": n });
            if let Some(r) = t.active.get(n) {
                v["last_updated"] = timestamp(r.last_updated).into();
                if !r.version_info.is_empty() {
                    v["version_info"] = r.version_info.clone().into();
                }
                v["secret"] = skiff_proto::any_to_json(&r.resource);
            } else if let Some(s) = snap.secrets.get(n) {
                let pb =
                    envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::from(
                        &**s,
                    );
                v["secret"] = with_type(
                    crate::model::tls::SECRET_TYPE_URL,
                    skiff_proto::to_json(&pb),
                );
            }
            if let Some(e) = t.errors.get(n) {
                v["error_state"] = error_state(e);
            }
            v
        })
        .collect();
    json!({
        "@type": format!("{ADMIN}SecretsConfigDump"),
        "static_secrets": static_secrets,
        "dynamic_active_secrets": dynamic,
    })
}

/// Envoy's text for a redacted string (bytes fields hold these bytes, base64 in JSON).
const REDACTED: &str = "[redacted]";
/// [`REDACTED`] as the base64 of a bytes field.
const REDACTED_BYTES: &str = "W3JlZGFjdGVkXQ==";

/// Replaces every string inside the fields Envoy marks sensitive (`private_key`, `password`,
/// `pkcs12`, session ticket `keys`, a generic secret's `secret(s)`) with [`REDACTED`], as
/// Envoy's config dump does: bytes fields become the base64 of those bytes.
fn redact(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if matches!(
                    k.as_str(),
                    "private_key" | "password" | "pkcs12" | "keys" | "secret" | "secrets"
                ) && sensitive_shape(k, child)
                {
                    redact_all(child, false);
                } else {
                    redact(child);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Whether a value under a sensitive-sounding key is the sensitive field (a `DataSource`, or
/// lists/maps of them) rather than, say, the `secret` entry of a secrets dump (an `Any`).
fn sensitive_shape(key: &str, v: &Value) -> bool {
    let data_source = |v: &Value| {
        v.as_object().is_some_and(|o| {
            o.keys().all(|k| {
                matches!(
                    k.as_str(),
                    "filename"
                        | "inline_bytes"
                        | "inline_string"
                        | "environment_variable"
                        | "watched_directory"
                )
            })
        })
    };
    match key {
        "keys" => v.as_array().is_some_and(|a| a.iter().all(data_source)),
        "secrets" => v.as_object().is_some_and(|o| o.values().all(data_source)),
        _ => data_source(v),
    }
}

fn redact_all(v: &mut Value, bytes: bool) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                redact_all(child, k == "inline_bytes");
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| redact_all(c, bytes)),
        Value::String(s) => {
            *s = if bytes {
                REDACTED_BYTES.to_string()
            } else {
                REDACTED.to_string()
            };
        }
        _ => {}
    }
}

fn last_boot() -> String {
    static BOOT: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    timestamp(*BOOT.get_or_init(SystemTime::now))
}

/// Message type of the entries of a repeated field, for `?resource=`.
fn entry_type(field: &str) -> Option<&'static str> {
    Some(match field {
        "static_listeners" => "ListenersConfigDump.StaticListener",
        "dynamic_listeners" => "ListenersConfigDump.DynamicListener",
        "static_clusters" => "ClustersConfigDump.StaticCluster",
        "dynamic_active_clusters" | "dynamic_warming_clusters" => {
            "ClustersConfigDump.DynamicCluster"
        }
        "static_route_configs" => "RoutesConfigDump.StaticRouteConfig",
        "dynamic_route_configs" => "RoutesConfigDump.DynamicRouteConfig",
        "static_secrets" => "SecretsConfigDump.StaticSecret",
        "dynamic_active_secrets" | "dynamic_warming_secrets" => "SecretsConfigDump.DynamicSecret",
        "static_endpoint_configs" => "EndpointsConfigDump.StaticEndpointConfig",
        "dynamic_endpoint_configs" => "EndpointsConfigDump.DynamicEndpointConfig",
        _ => return None,
    })
}

/// The name of the resource an entry holds (listener/cluster/route/endpoint config).
fn entry_name(v: &Value) -> Option<&str> {
    if let Some(n) = v.get("name").and_then(Value::as_str) {
        return Some(n);
    }
    for k in [
        "listener",
        "cluster",
        "route_config",
        "endpoint_config",
        "active_state",
        "warming_state",
    ] {
        if let Some(inner) = v.get(k) {
            if let Some(n) = inner
                .get("name")
                .or_else(|| inner.get("cluster_name"))
                .and_then(Value::as_str)
            {
                return Some(n);
            }
            if let Some(n) = entry_name(inner) {
                return Some(n);
            }
        }
    }
    None
}

fn apply_mask(v: &Value, paths: &[Vec<&str>]) -> Value {
    let Value::Object(obj) = v else {
        return v.clone();
    };
    let mut out = Map::new();
    if let Some(t) = obj.get("@type") {
        out.insert("@type".into(), t.clone());
    }
    for p in paths {
        let Some((first, rest)) = p.split_first() else {
            continue;
        };
        let Some(child) = obj.get(*first) else {
            continue;
        };
        let masked = if rest.is_empty() {
            child.clone()
        } else {
            let sub = [rest.to_vec()];
            match child {
                Value::Array(a) => Value::Array(a.iter().map(|c| apply_mask(c, &sub)).collect()),
                c => apply_mask(c, &sub),
            }
        };
        match (out.get_mut(*first), masked) {
            (Some(Value::Object(existing)), Value::Object(m)) => existing.extend(m),
            (_, m) => {
                out.insert((*first).to_string(), m);
            }
        }
    }
    Value::Object(out)
}

/// A `/config_dump` query that names nothing the dump has (Envoy answers 404).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} not found in config dump")]
pub struct UnknownResource(pub String);

/// The `/config_dump` body, or [`UnknownResource`] for an unknown `?resource=`.
pub fn render(
    bootstrap: &PbBootstrap,
    snap: &Snapshot,
    q: &DumpQuery,
) -> Result<Value, UnknownResource> {
    let mut configs = sections(
        bootstrap,
        snap,
        q.include_eds
            || q.resource
                .as_deref()
                .is_some_and(|r| r.contains("endpoint")),
    );
    let keep = |v: &Value| match (&q.name_regex, entry_name(v)) {
        (Some(re), Some(n)) => re.is_match(n),
        (Some(_), None) => false,
        (None, _) => true,
    };
    if let Some(field) = &q.resource {
        let Some(ty) = entry_type(field) else {
            return Err(UnknownResource(field.clone()));
        };
        let mut entries = Vec::new();
        for s in &configs {
            if let Some(Value::Array(a)) = s.get(field) {
                entries.extend(
                    a.iter()
                        .filter(|v| keep(v))
                        .map(|v| with_type(&format!("{ADMIN}{ty}"), v.clone())),
                );
            }
        }
        configs = entries;
    } else if q.name_regex.is_some() {
        for s in &mut configs {
            if let Value::Object(o) = s {
                for (_, v) in o.iter_mut() {
                    if let Value::Array(a) = v {
                        a.retain(|e| keep(e));
                    }
                }
            }
        }
    }
    if let Some(mask) = &q.mask {
        let paths: Vec<Vec<&str>> = mask
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.split('.').collect())
            .collect();
        configs = configs.iter().map(|c| apply_mask(c, &paths)).collect();
    }
    Ok(json!({ "configs": configs }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core_v3;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    use prost::Message;

    fn cert_secret(name: &str, cert: &str, key: core_v3::data_source::Specifier) -> tls::Secret {
        tls::Secret {
            name: name.into(),
            r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: Some(core_v3::DataSource {
                    specifier: Some(core_v3::data_source::Specifier::InlineString(cert.into())),
                    ..Default::default()
                }),
                private_key: Some(core_v3::DataSource {
                    specifier: Some(key),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    /// Envoy's SecretsConfigDump: static secrets from the bootstrap, dynamic ones with their
    /// version; private keys print as `[redacted]` everywhere (the bootstrap section too).
    #[test]
    fn secrets_are_dumped_with_private_keys_redacted() {
        use core_v3::data_source::Specifier;
        let c = rcgen::generate_simple_self_signed(vec!["a.example".to_string()]).unwrap();
        let (cert, key) = (c.cert.pem(), c.signing_key.serialize_pem());
        let mut boot = PbBootstrap::default();
        boot.static_resources.get_or_insert_default().secrets = vec![cert_secret(
            "static",
            &cert,
            Specifier::InlineString(key.clone()),
        )];
        let mut r = crate::xds::Resources::default();
        let dynamic = cert_secret(
            "dyn",
            &cert,
            Specifier::InlineBytes(key.clone().into_bytes()),
        );
        // Only subscribed names are kept: a bootstrap listener would subscribe; here the
        // snapshot is rendered right after the update, before anything is dropped.
        r.apply_sotw(
            crate::xds::kind::SECRET_TYPE_URL,
            "v7",
            &[envoy_types::pb::google::protobuf::Any {
                type_url: crate::xds::kind::SECRET_TYPE_URL.into(),
                value: dynamic.encode_to_vec(),
            }],
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        let snap = r.snapshot();
        let out = sections(&boot, &snap, false);
        let text = serde_json::to_string(&out).unwrap();
        assert!(
            !text.contains("PRIVATE KEY"),
            "a private key leaked: {text}"
        );
        let dump = out
            .iter()
            .find(|s| s["@type"] == format!("{ADMIN}SecretsConfigDump"))
            .unwrap();
        let st = &dump["static_secrets"][0];
        assert_eq!(st["name"], "static");
        assert_eq!(
            st["secret"]["tls_certificate"]["private_key"]["inline_string"],
            "[redacted]"
        );
        assert_eq!(
            st["secret"]["tls_certificate"]["certificate_chain"]["inline_string"],
            cert.as_str()
        );
        let dy = &dump["dynamic_active_secrets"][0];
        assert_eq!(dy["name"], "dyn");
        assert_eq!(dy["version_info"], "v7");
        assert_eq!(dy["secret"]["@type"], crate::xds::kind::SECRET_TYPE_URL);
        assert_eq!(
            dy["secret"]["tls_certificate"]["private_key"]["inline_bytes"],
            REDACTED_BYTES
        );
        let b = &out[0]["bootstrap"]["static_resources"]["secrets"][0];
        assert_eq!(
            b["tls_certificate"]["private_key"]["inline_string"],
            "[redacted]"
        );
        // A secret of another SDS source (Istio's ROOTCA over its Unix socket) shows too.
        let mut r2 = r;
        let roots = crate::model::tls::Secret {
            name: "ROOTCA".into(),
            kind: crate::model::tls::SecretKind::Validation(crate::model::tls::ValidationContext {
                trusted_ca: Some(crate::model::tls::DataSource::Inline(
                    cert.as_bytes().into(),
                )),
                san_matchers: vec![],
            }),
        };
        r2.set_external_secrets([("ROOTCA".to_string(), std::sync::Arc::new(roots))].into());
        let snap = r2.snapshot();
        let out = sections(&boot, &snap, false);
        let dump = out
            .iter()
            .find(|s| s["@type"] == format!("{ADMIN}SecretsConfigDump"))
            .unwrap();
        let names: Vec<&str> = dump["dynamic_active_secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["ROOTCA", "dyn"]);
        assert!(
            dump["dynamic_active_secrets"][0]["secret"]["validation_context"]["trusted_ca"]
                ["inline_bytes"]
                .is_string()
        );
        // `?resource=` knows the secrets' fields.
        let q = DumpQuery {
            resource: Some("dynamic_active_secrets".into()),
            ..Default::default()
        };
        let v = render(&boot, &snap, &q).unwrap();
        assert_eq!(
            v["configs"][0]["@type"],
            format!("{ADMIN}SecretsConfigDump.DynamicSecret")
        );
    }
}
