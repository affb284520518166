//! The served resources: read from a [`Source`], polled for changes, published as snapshots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Source, fnv1a};
use crate::xds::ResourceKind;
use crate::xds::sds::SECRET_TYPE_URL;

/// Why a file (or one of its resources) cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or directory cannot be read.
    #[error("reading {}: {error}", path.display())]
    Read {
        /// File or directory.
        path: PathBuf,
        /// Cause (in the message, so not a `source()`).
        error: std::io::Error,
    },
    /// Not valid JSON/YAML, or not a discovery file / config dump.
    #[error("parsing {}: {error}", path.display())]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause, naming the field (in the message, so not a `source()`).
        error: skiff_proto::CodecError,
    },
    /// Parsed, but its content cannot be served.
    #[error("{}: {reason}", path.display())]
    Content {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// One resource as served.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resource {
    pub(crate) any: Any,
    /// Hash of the resource's bytes (the delta per-resource version).
    pub(crate) version: String,
}

/// All resources of one type URL.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TypeResources {
    /// The type's version (SotW `version_info`, delta `system_version_info`).
    pub(crate) version: String,
    pub(crate) resources: BTreeMap<String, Arc<Resource>>,
}

/// Everything served at one moment, by type URL.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) types: BTreeMap<String, TypeResources>,
}

/// Modification time and size: a change of either means "read the file again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

/// The last look at one file, and the last content of it that parsed.
struct FileState {
    stamp: Stamp,
    good: Option<(String, TypeResources)>,
}

/// Reads the source and remembers, per file, the last version that parsed.
pub(crate) struct Loader {
    source: Source,
    files: BTreeMap<PathBuf, FileState>,
}

impl Loader {
    pub(crate) fn new(source: Source) -> Self {
        Self {
            source,
            files: BTreeMap::new(),
        }
    }

    /// The first snapshot. Fails when the directory cannot be listed or the config dump
    /// cannot be read or parsed; a bad discovery file in a directory is only logged.
    pub(crate) fn load_initial(&mut self) -> Result<Snapshot, LoadError> {
        match self.source.clone() {
            Source::Dir(dir) => {
                list_dir(&dir)?;
                Ok(self.poll().unwrap_or_default())
            }
            Source::ConfigDump(path) => {
                let stamp = stamp(&path)?;
                let snapshot = read_config_dump(&path)?;
                self.files.insert(path, FileState { stamp, good: None });
                Ok(snapshot)
            }
        }
    }

    /// Looks at the source again; `Some` with the full snapshot when anything changed.
    pub(crate) fn poll(&mut self) -> Option<Snapshot> {
        match self.source.clone() {
            Source::Dir(dir) => self.poll_dir(&dir),
            Source::ConfigDump(path) => self.poll_dump(&path),
        }
    }

    fn poll_dump(&mut self, path: &Path) -> Option<Snapshot> {
        let now = match stamp(path) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "config dump not readable; serving the previous one");
                return None;
            }
        };
        let state = self.files.get_mut(path)?;
        if state.stamp == now {
            return None;
        }
        state.stamp = now;
        match read_config_dump(path) {
            Ok(s) => Some(s),
            Err(e) => {
                error!(file = %path.display(), error = %e, "config dump does not parse; still serving the previous one");
                None
            }
        }
    }

    fn poll_dir(&mut self, dir: &Path) -> Option<Snapshot> {
        let paths = match list_dir(dir) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot list the directory; still serving the previous snapshot");
                return None;
            }
        };
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|p, _| paths.contains(p));
        if self.files.len() != before {
            changed = true;
        }
        for path in paths {
            let Ok(now) = stamp(&path) else {
                continue; // removed between listing and stat: next poll sees it gone
            };
            if self.files.get(&path).is_some_and(|s| s.stamp == now) {
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|source| LoadError::Read {
                    path: path.clone(),
                    error: source,
                })
                .and_then(|text| parse_discovery_file(&path, &text));
            let state = self.files.entry(path.clone()).or_insert(FileState {
                stamp: now,
                good: None,
            });
            state.stamp = now;
            match parsed {
                Ok((type_url, resources)) => {
                    info!(file = %path.display(), type_url, version = resources.version, count = resources.resources.len(), "loaded");
                    state.good = Some((type_url, resources));
                    changed = true;
                }
                Err(e) => {
                    let kept = state.good.as_ref().map(|(_, r)| r.version.as_str());
                    error!(file = %path.display(), error = %e, previous_version = kept, "file does not parse; still serving its previous version");
                }
            }
        }
        changed.then(|| self.dir_snapshot())
    }

    fn dir_snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut owners: BTreeMap<&str, &Path> = BTreeMap::new();
        for (path, state) in &self.files {
            let Some((type_url, resources)) = &state.good else {
                continue;
            };
            if let Some(first) = owners.get(type_url.as_str()) {
                error!(file = %path.display(), type_url, served_from = %first.display(), "two files hold the same type; ignoring this one");
                continue;
            }
            owners.insert(type_url, path);
            snapshot.types.insert(type_url.clone(), resources.clone());
        }
        snapshot
    }
}

/// Polls the loader every `interval` and publishes each changed snapshot.
pub(crate) async fn poll(
    mut loader: Loader,
    snapshots: watch::Sender<Arc<Snapshot>>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; the initial load just happened
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let polled = tokio::task::spawn_blocking(move || {
            let update = loader.poll();
            (loader, update)
        })
        .await;
        let update;
        (loader, update) = match polled {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "control plane source poll panicked; no more updates");
                return;
            }
        };
        if let Some(next) = update {
            snapshots.send_if_modified(|current| {
                if **current == next {
                    return false;
                }
                for (type_url, r) in &next.types {
                    if current.types.get(type_url) != Some(r) {
                        info!(
                            type_url,
                            version = r.version,
                            count = r.resources.len(),
                            "publishing"
                        );
                    }
                }
                for type_url in current.types.keys() {
                    if !next.types.contains_key(type_url) {
                        info!(type_url, "type no longer served");
                    }
                }
                *current = Arc::new(next);
                true
            });
        }
    }
}

fn stamp(path: &Path) -> Result<Stamp, LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        error: source,
    })?;
    Ok(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}

/// The discovery files of `dir`: `*.json`, `*.yaml`, `*.yml`, not hidden, sorted.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: dir.to_owned(),
        error: source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let wanted = [".json", ".yaml", ".yml"].iter().any(|e| name.ends_with(e));
        if wanted && !name.starts_with('.') && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// One discovery file -> its type URL and resources.
pub(crate) fn parse_discovery_file(
    path: &Path,
    text: &str,
) -> Result<(String, TypeResources), LoadError> {
    let content = |reason: String| LoadError::Content {
        path: path.to_owned(),
        reason,
    };
    let file =
        skiff_proto::parse_discovery_file(text, None).map_err(|source| LoadError::Parse {
            path: path.to_owned(),
            error: source,
        })?;
    let mut type_url: Option<String> = None;
    for (i, r) in file.resources.iter().enumerate() {
        match &type_url {
            None => type_url = Some(r.type_url.clone()),
            Some(t) if *t != r.type_url => {
                return Err(content(format!(
                    "resources[{i}] is a {}, but the file already holds {t}: one type per file",
                    r.type_url
                )));
            }
            Some(_) => {}
        }
    }
    let type_url = type_url
        .or(file.type_url)
        .or_else(|| type_from_file_name(path).map(str::to_owned))
        .ok_or_else(|| {
            content("no resources, no type_url, and a file name that names no type".to_owned())
        })?;
    let mut resources = BTreeMap::new();
    for (i, r) in file.resources.into_iter().enumerate() {
        let any = Any {
            type_url: r.type_url,
            value: r.value,
        };
        let name = resource_name(&any).map_err(|e| content(format!("resources[{i}]: {e}")))?;
        let resource = Arc::new(resource(any));
        if resources.insert(name.clone(), resource).is_some() {
            return Err(content(format!(
                "resources[{i}]: a second resource named {name:?}"
            )));
        }
    }
    let version = if file.version_info.is_empty() {
        content_version(&resources)
    } else {
        file.version_info
    };
    Ok((type_url, TypeResources { version, resources }))
}

/// The dynamic resources of a config dump, grouped by type.
pub(crate) fn read_config_dump(path: &Path) -> Result<Snapshot, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        error: source,
    })?;
    let dump = skiff_proto::parse_config_dump(&text).map_err(|source| LoadError::Parse {
        path: path.to_owned(),
        error: source,
    })?;
    let mut versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut snapshot = Snapshot::default();
    for d in dump.dynamic {
        if d.name.is_empty() {
            warn!(file = %path.display(), type_url = d.type_url, "dynamic resource without a name; skipped");
            continue;
        }
        let any = Any {
            type_url: d.resource.type_url,
            value: d.resource.value,
        };
        let entry = snapshot.types.entry(d.type_url.clone()).or_default();
        entry.resources.insert(d.name, Arc::new(resource(any)));
        versions.entry(d.type_url).or_default().push(d.version_info);
    }
    for (type_url, r) in &mut snapshot.types {
        r.version = versions
            .get(type_url)
            .and_then(|v| newest_version(v))
            .unwrap_or_else(|| content_version(&r.resources));
    }
    Ok(snapshot)
}

/// The newest of a type's versions: the largest integer when all are integers, otherwise the
/// greatest string. `None` when every version is empty.
pub(crate) fn newest_version(versions: &[String]) -> Option<String> {
    let versions: Vec<&String> = versions.iter().filter(|v| !v.is_empty()).collect();
    let numbers: Option<Vec<u64>> = versions.iter().map(|v| v.parse().ok()).collect();
    match numbers {
        Some(n) if !n.is_empty() => n.into_iter().max().map(|n| n.to_string()),
        _ => versions.into_iter().max().cloned(),
    }
}

fn resource(any: Any) -> Resource {
    let version = format!("{:016x}", fnv1a(&[any.type_url.as_bytes(), &any.value]));
    Resource { any, version }
}

/// A version for content without one: a hash of every resource's name and bytes.
fn content_version(resources: &BTreeMap<String, Arc<Resource>>) -> String {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(resources.len() * 2);
    for (name, r) in resources {
        parts.push(name.as_bytes());
        parts.push(&r.any.value);
    }
    format!("{:016x}", fnv1a(&parts))
}

fn type_from_file_name(path: &Path) -> Option<&'static str> {
    let stem = path.file_stem()?.to_str()?.to_ascii_lowercase();
    if matches!(stem.as_str(), "secrets" | "sds") {
        return Some(SECRET_TYPE_URL);
    }
    let kind = match stem.as_str() {
        "listeners" | "lds" => ResourceKind::Listener,
        "clusters" | "cds" => ResourceKind::Cluster,
        "routes" | "rds" => ResourceKind::Route,
        "endpoints" | "eds" => ResourceKind::Endpoints,
        _ => return None,
    };
    Some(kind.type_url())
}

/// Field 1 of a message: the name of every xDS resource type (`name`, or `cluster_name` for a
/// ClusterLoadAssignment); used for types skiff does not decode.
#[derive(Clone, PartialEq, prost::Message)]
struct FirstStringField {
    #[prost(string, tag = "1")]
    name: String,
}

/// Why a served resource has no usable name.
#[derive(Debug, thiserror::Error)]
enum NameError {
    /// The name is empty.
    #[error("{0} has no name")]
    Missing(String),
    /// The bytes are not a message of the type.
    #[error("{type_url} does not decode: {error}")]
    Decode {
        /// The resource's type URL.
        type_url: String,
        /// prost's error.
        error: prost::DecodeError,
    },
}

/// The resource's name; decoding the four core types also checks their bytes.
fn resource_name(any: &Any) -> Result<String, NameError> {
    let bytes = any.value.as_slice();
    let decoded = match ResourceKind::from_type_url(&any.type_url) {
        Some(ResourceKind::Listener) => Listener::decode(bytes).map(|r| r.name),
        Some(ResourceKind::Cluster) => Cluster::decode(bytes).map(|r| r.name),
        Some(ResourceKind::Route) => RouteConfiguration::decode(bytes).map(|r| r.name),
        Some(ResourceKind::Endpoints) => {
            ClusterLoadAssignment::decode(bytes).map(|r| r.cluster_name)
        }
        Some(ResourceKind::Secret) => {
            envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(bytes)
                .map(|r| r.name)
        }
        None => {
            // Opaque (type unknown to skiff-proto): its original JSON follows a 0x00 byte.
            if let Some(json) = opaque_name(any) {
                return Ok(json);
            }
            FirstStringField::decode(bytes).map(|r| r.name)
        }
    };
    match decoded {
        Ok(name) if name.is_empty() => Err(NameError::Missing(any.type_url.clone())),
        Ok(name) => Ok(name),
        Err(error) => Err(NameError::Decode {
            type_url: any.type_url.clone(),
            error,
        }),
    }
}

fn opaque_name(any: &Any) -> Option<String> {
    let pany = prost_types::Any {
        type_url: any.type_url.clone(),
        value: any.value.clone(),
    };
    let json = skiff_proto::opaque_json(&pany)?;
    let obj = json.as_object()?;
    ["name", "cluster_name", "clusterName"]
        .iter()
        .find_map(|k| obj.get(*k)?.as_str())
        .map(str::to_owned)
}
