//! Whole files: xDS discovery files and admin `/config_dump` output.

use serde_json::{Map, Value};

use crate::decode::{any_at, kind_of};
use crate::{
    CLUSTER_TYPE_URL, CodecError, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL, parse_text,
    type_name,
};

/// A discovery file: resources of one xDS type plus the version they were published at.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryFile {
    /// `version_info` (or `versionInfo`) of the file; empty when absent or for a bare list.
    pub version_info: String,
    /// `type_url` (or `typeUrl`) named by the file, else the caller's default.
    pub type_url: Option<String>,
    /// The resources, in file order.
    pub resources: Vec<prost_types::Any>,
}

/// Reads a discovery file (JSON or YAML) in any of the shapes found in the wild:
///
/// - `{"version_info", "resources": [{"@type": ...}, ...]}` (a DiscoveryResponse, as Envoy's
///   file-based xDS reads it; `type_url` and camelCase names are accepted too);
/// - a bare list of resources.
///
/// Resources without `"@type"` take `default_type_url`, else the file's `type_url`.
pub fn parse_discovery_file(
    text: &str,
    default_type_url: Option<&str>,
) -> Result<DiscoveryFile, CodecError> {
    discovery_from_json(&parse_text(text)?, default_type_url)
}

pub(crate) fn discovery_from_json(
    value: &Value,
    default_type_url: Option<&str>,
) -> Result<DiscoveryFile, CodecError> {
    let (version_info, file_type_url, items, base) = match value {
        Value::Array(items) => (String::new(), None, items.as_slice(), "$".to_owned()),
        Value::Object(obj)
            if get(obj, "resources").is_some() || get(obj, "version_info").is_some() =>
        {
            let version_info = get(obj, "version_info")
                .map(scalar_string)
                .unwrap_or_default();
            let type_url = get(obj, "type_url")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let items = match get(obj, "resources") {
                Some(Value::Array(items)) => items.as_slice(),
                None | Some(Value::Null) => &[],
                Some(other) => {
                    return Err(CodecError::shape(
                        "$.resources",
                        format!("expected a list of resources, found {}", kind_of(other)),
                    ));
                }
            };
            (version_info, type_url, items, "$.resources".to_owned())
        }
        other => {
            return Err(CodecError::shape(
                "$",
                format!(
                    "expected a discovery file ({{version_info, resources}}) or a list of \
                     resources, found {}",
                    kind_of(other)
                ),
            ));
        }
    };
    let default = default_type_url.or(file_type_url.as_deref());
    let mut resources = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let mut path = format!("{base}[{i}]");
        resources.push(any_at(item, default, &mut path)?);
    }
    Ok(DiscoveryFile {
        version_info,
        type_url: file_type_url.or_else(|| default_type_url.map(str::to_owned)),
        resources,
    })
}

/// One resource found in a config dump.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpedResource {
    /// The resource's own type URL (`"@type"`), e.g. v2 URLs stay v2.
    pub type_url: String,
    /// `name`, or `cluster_name` for a ClusterLoadAssignment; empty when the resource has
    /// none (Envoy allows unnamed static listeners, and Istio's dumps contain them).
    pub name: String,
    /// The version it was accepted at (the entry's `version_info`, else its section's); empty
    /// for static resources.
    pub version_info: String,
    /// The resource itself (opaque when its type is not in the pool).
    pub resource: prost_types::Any,
}

/// The resources of an Envoy `/config_dump`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigDumpResources {
    /// The `bootstrap` of a BootstrapConfigDump section, as JSON.
    pub bootstrap: Option<Value>,
    /// Listeners, clusters, route configurations and endpoints received over xDS.
    pub dynamic: Vec<DumpedResource>,
    /// Listeners, clusters, route configurations and endpoints from the bootstrap.
    pub static_resources: Vec<DumpedResource>,
}

/// Reads Envoy's (or Istio's, OSM's, Kuma's) `/config_dump` output, JSON or YAML.
///
/// Takes the Bootstrap, Listeners, Clusters, Routes and Endpoints sections. Dynamic
/// listeners come from `active_state` (else `warming_state`); dynamic clusters from
/// `dynamic_active_clusters` plus warming clusters not also active. Other sections
/// (ScopedRoutes, Secrets, Ecds, ...) are ignored. The input may be the whole dump
/// (`{"configs": [...]}`) or one section (an object with `"@type"`).
pub fn parse_config_dump(text: &str) -> Result<ConfigDumpResources, CodecError> {
    config_dump_from_json(&parse_text(text)?)
}

/// Where one kind of resource sits in its ConfigDump section.
struct Layout {
    default_type_url: &'static str,
    /// Field holding the resource inside a static or dynamic entry.
    resource_field: &'static str,
    /// Field of the resource holding its name.
    name_field: &'static str,
    static_lists: &'static [&'static str],
    dynamic_lists: &'static [&'static str],
}

const LISTENERS: Layout = Layout {
    default_type_url: LISTENER_TYPE_URL,
    resource_field: "listener",
    name_field: "name",
    static_lists: &["static_listeners"],
    dynamic_lists: &["dynamic_listeners"],
};
const CLUSTERS: Layout = Layout {
    default_type_url: CLUSTER_TYPE_URL,
    resource_field: "cluster",
    name_field: "name",
    static_lists: &["static_clusters"],
    dynamic_lists: &["dynamic_active_clusters", "dynamic_warming_clusters"],
};
const ROUTES: Layout = Layout {
    default_type_url: ROUTE_TYPE_URL,
    resource_field: "route_config",
    name_field: "name",
    static_lists: &["static_route_configs"],
    dynamic_lists: &["dynamic_route_configs"],
};
const ENDPOINTS: Layout = Layout {
    default_type_url: ENDPOINT_TYPE_URL,
    resource_field: "endpoint_config",
    name_field: "cluster_name",
    static_lists: &["static_endpoint_configs"],
    dynamic_lists: &["dynamic_endpoint_configs"],
};

pub(crate) fn config_dump_from_json(value: &Value) -> Result<ConfigDumpResources, CodecError> {
    let Value::Object(top) = value else {
        return Err(CodecError::shape(
            "$",
            format!("expected a config dump object, found {}", kind_of(value)),
        ));
    };
    let sections: Vec<(String, &Value)> = match get(top, "configs") {
        Some(Value::Array(configs)) => configs
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("$.configs[{i}]"), c))
            .collect(),
        Some(other) => {
            return Err(CodecError::shape(
                "$.configs",
                format!("expected a list of sections, found {}", kind_of(other)),
            ));
        }
        None if top.contains_key("@type") => vec![("$".to_owned(), value)],
        None => {
            return Err(CodecError::shape(
                "$",
                "expected a config dump ({\"configs\": [...]}) or one section with \"@type\"",
            ));
        }
    };

    let mut out = ConfigDumpResources::default();
    for (path, section) in sections {
        let Value::Object(section) = section else {
            return Err(CodecError::shape(
                &path,
                "expected a config dump section object",
            ));
        };
        let Some(section_type) = section.get("@type").and_then(Value::as_str) else {
            return Err(CodecError::shape(
                &path,
                "config dump section has no \"@type\"",
            ));
        };
        let layout = match type_name(section_type) {
            "envoy.admin.v3.BootstrapConfigDump" => {
                out.bootstrap = get(section, "bootstrap").cloned();
                continue;
            }
            "envoy.admin.v3.ListenersConfigDump" => &LISTENERS,
            "envoy.admin.v3.ClustersConfigDump" => &CLUSTERS,
            "envoy.admin.v3.RoutesConfigDump" => &ROUTES,
            "envoy.admin.v3.EndpointsConfigDump" => &ENDPOINTS,
            _ => continue, // ScopedRoutes, Secrets, Ecds, ...: not resources skiff serves
        };
        read_section(section, &path, layout, &mut out)?;
    }
    Ok(out)
}

fn read_section(
    section: &Map<String, Value>,
    path: &str,
    layout: &Layout,
    out: &mut ConfigDumpResources,
) -> Result<(), CodecError> {
    for list in layout.static_lists {
        for (i, entry) in entries(section, list, path)? {
            let entry_path = format!("{path}.{list}[{i}]");
            if let Some(resource) = dumped(entry, &entry_path, layout, false)? {
                out.static_resources.push(resource);
            }
        }
    }
    // Entries without their own version (sanitized test dumps) take the section's: the last
    // version of this type that Envoy accepted.
    let section_version = get(section, "version_info")
        .map(scalar_string)
        .unwrap_or_default();
    for list in layout.dynamic_lists {
        for (i, entry) in entries(section, list, path)? {
            let mut entry_path = format!("{path}.{list}[{i}]");
            let state = if layout.resource_field == "listener" {
                // Dynamic listeners nest the resource in a per-state object.
                let Value::Object(listener) = entry else {
                    return Err(CodecError::shape(&entry_path, "expected an object"));
                };
                let Some((name, state)) = ["active_state", "warming_state"]
                    .iter()
                    .find_map(|s| get(listener, s).map(|v| (*s, v)))
                else {
                    continue; // draining or error state only: nothing being served
                };
                entry_path.push('.');
                entry_path.push_str(name);
                state
            } else {
                entry
            };
            let Some(mut resource) = dumped(state, &entry_path, layout, true)? else {
                continue;
            };
            if resource.version_info.is_empty() {
                resource.version_info.clone_from(&section_version);
            }
            let duplicate = *list == "dynamic_warming_clusters"
                && out
                    .dynamic
                    .iter()
                    .any(|r| r.name == resource.name && r.type_url == resource.type_url);
            if !duplicate {
                out.dynamic.push(resource);
            }
        }
    }
    Ok(())
}

/// The `(index, entry)` pairs of list `name` in `section` (missing or null: none).
fn entries<'a>(
    section: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<impl Iterator<Item = (usize, &'a Value)>, CodecError> {
    match get(section, name) {
        None | Some(Value::Null) => Ok([].iter().enumerate()),
        Some(Value::Array(items)) => Ok(items.iter().enumerate()),
        Some(other) => Err(CodecError::shape(
            &format!("{path}.{name}"),
            format!("expected a list, found {}", kind_of(other)),
        )),
    }
}

/// The resource of one dump entry (`{version_info?, <resource_field>: {...}}`).
fn dumped(
    entry: &Value,
    path: &str,
    layout: &Layout,
    dynamic: bool,
) -> Result<Option<DumpedResource>, CodecError> {
    let Value::Object(entry) = entry else {
        return Err(CodecError::shape(
            path,
            format!("expected an object, found {}", kind_of(entry)),
        ));
    };
    let Some(resource_json) = get(entry, layout.resource_field) else {
        return Ok(None);
    };
    let mut resource_path = format!("{path}.{}", layout.resource_field);
    let resource = any_at(
        resource_json,
        Some(layout.default_type_url),
        &mut resource_path,
    )?;
    let name = resource_json
        .as_object()
        .and_then(|r| get(r, layout.name_field))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let version_info = if dynamic {
        get(entry, "version_info")
            .map(scalar_string)
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Some(DumpedResource {
        type_url: resource.type_url.clone(),
        name,
        version_info,
        resource,
    }))
}

/// `obj[snake]`, else `obj[lowerCamel(snake)]`.
fn get<'a>(obj: &'a Map<String, Value>, snake: &str) -> Option<&'a Value> {
    obj.get(snake).or_else(|| {
        if !snake.contains('_') {
            return None;
        }
        let mut camel = String::with_capacity(snake.len());
        let mut upper = false;
        for c in snake.chars() {
            if c == '_' {
                upper = true;
            } else if upper {
                camel.push(c.to_ascii_uppercase());
                upper = false;
            } else {
                camel.push(c);
            }
        }
        obj.get(&camel)
    })
}

fn scalar_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
