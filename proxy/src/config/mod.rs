//! Envoy v3 bootstrap (YAML or JSON) -> validated configuration.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap as PbBootstrap;

use crate::model::{self, Cluster, Listener, ModelError};

/// Envoy's admin default in Istio sidecars.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

/// Why a bootstrap was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("bootstrap {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid YAML/JSON, or not a valid `envoy.config.bootstrap.v3.Bootstrap`.
    #[error("bootstrap {origin}: {source}")]
    Parse {
        /// File or `<inline>`.
        origin: String,
        /// Cause (names the field).
        source: skiff_proto::CodecError,
    },
    /// A resource failed validation.
    #[error("bootstrap {origin}: static_resources: {source}")]
    Invalid {
        /// File or `<inline>`.
        origin: String,
        /// Which resource and field.
        source: ModelError,
    },
    /// Two resources share a name.
    #[error("bootstrap {origin}: static_resources: duplicate {kind} name {name:?}")]
    Duplicate {
        /// File or `<inline>`.
        origin: String,
        /// `listener` or `cluster`.
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// `admin.address` is not usable.
    #[error("bootstrap {origin}: admin.address: {reason}")]
    Admin {
        /// File or `<inline>`.
        origin: String,
        /// What is wrong.
        reason: String,
    },
}

/// Node identity sent to the control plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `node.id`, e.g. `sidecar~10.0.0.5~pod.ns~ns.svc.cluster.local`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
}

/// A validated bootstrap.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// Node identity.
    pub node: NodeInfo,
    /// Admin listener address, if configured.
    pub admin: Option<SocketAddr>,
    /// Static listeners.
    pub listeners: Vec<Listener>,
    /// Static clusters.
    pub clusters: Vec<Cluster>,
    /// The bootstrap as parsed, for `/config_dump`.
    pub raw: PbBootstrap,
}

/// Read and validate a bootstrap file.
pub fn load(path: &Path) -> Result<Bootstrap, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Validate bootstrap text (YAML or JSON); `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Bootstrap, ConfigError> {
    let parse_err = |source| ConfigError::Parse {
        origin: origin.to_string(),
        source,
    };
    let value = skiff_proto::parse_text(text).map_err(parse_err)?;
    let raw: PbBootstrap = skiff_proto::decode_json(&value).map_err(parse_err)?;
    from_proto(raw, origin)
}

/// Validate an already decoded bootstrap.
pub fn from_proto(raw: PbBootstrap, origin: &str) -> Result<Bootstrap, ConfigError> {
    let invalid = |source| ConfigError::Invalid {
        origin: origin.to_string(),
        source,
    };
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    if let Some(sr) = &raw.static_resources {
        let mut seen = BTreeSet::new();
        for l in &sr.listeners {
            let l = Listener::try_from(l).map_err(invalid)?;
            if !seen.insert(l.name.clone()) {
                return Err(ConfigError::Duplicate {
                    origin: origin.to_string(),
                    kind: "listener",
                    name: l.name,
                });
            }
            listeners.push(l);
        }
        let mut seen = BTreeSet::new();
        for c in &sr.clusters {
            let c = Cluster::try_from(c).map_err(invalid)?;
            if !seen.insert(c.name.clone()) {
                return Err(ConfigError::Duplicate {
                    origin: origin.to_string(),
                    kind: "cluster",
                    name: c.name,
                });
            }
            clusters.push(c);
        }
    }
    let admin = match raw.admin.as_ref().and_then(|a| a.address.as_ref()) {
        Some(a) => Some(model::socket_addr(Some(a)).map_err(|e| ConfigError::Admin {
            origin: origin.to_string(),
            reason: format!("{}: {}", e.field, e.reason),
        })?),
        None => None,
    };
    let node = raw
        .node
        .as_ref()
        .map(|n| NodeInfo {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
        })
        .unwrap_or_default();
    Ok(Bootstrap {
        node,
        admin,
        listeners,
        clusters,
        raw,
    })
}
