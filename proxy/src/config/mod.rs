//! Envoy v3 bootstrap (YAML or JSON) -> validated configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap as PbBootstrap;

use crate::model::tls::{Secret, Secrets};
use crate::model::{self, Cluster, Listener, ModelError};

/// Envoy's admin default in Istio sidecars.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

/// Why a bootstrap was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("bootstrap {path}: {error}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause (in the message, so not a `source()`).
        error: std::io::Error,
    },
    /// Not valid YAML/JSON, or not a valid `envoy.config.bootstrap.v3.Bootstrap`.
    #[error("bootstrap {origin}: {error}")]
    Parse {
        /// File or `<inline>`.
        origin: String,
        /// Cause, naming the field (in the message, so not a `source()`).
        error: skiff_proto::CodecError,
    },
    /// A resource failed validation.
    #[error("bootstrap {origin}: static_resources: {error}")]
    Invalid {
        /// File or `<inline>`.
        origin: String,
        /// Which resource and field (in the message, so not a `source()`).
        error: ModelError,
    },
    /// Two resources share a name.
    #[error("bootstrap {origin}: static_resources: duplicate {kind} name {name:?}")]
    Duplicate {
        /// File or `<inline>`.
        origin: String,
        /// `listener`, `cluster` or `secret`.
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// A TLS context of a static listener or cluster names a secret without `sds_config` that
    /// `static_resources.secrets` does not have (Envoy: "Unknown static secret").
    #[error(
        "bootstrap {origin}: static_resources: {kind} {name:?}: unknown static secret {secret:?}"
    )]
    UnknownSecret {
        /// File or `<inline>`.
        origin: String,
        /// `listener` or `cluster`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The secret it names.
        secret: String,
    },
    /// `dynamic_resources` cannot be served.
    #[error("bootstrap {origin}: dynamic_resources.{field}: {reason}")]
    Dynamic {
        /// File or `<inline>`.
        origin: String,
        /// Field path inside `dynamic_resources`.
        field: String,
        /// What is wrong.
        reason: String,
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

/// Which flavour of the ADS protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdsApi {
    /// `GRPC` (or `AGGREGATED_GRPC`): state of the world.
    Sotw,
    /// `DELTA_GRPC` (or `AGGREGATED_DELTA_GRPC`): incremental.
    Delta,
}

/// `dynamic_resources.ads_config`, resolved to an address.
#[derive(Debug, Clone, PartialEq)]
pub struct AdsConfig {
    /// State of the world or delta.
    pub api: AdsApi,
    /// `grpc_services[0].envoy_grpc.cluster_name` (a static cluster).
    pub cluster: String,
    /// The first endpoint of that cluster: where the server listens (an IP address, or a Unix
    /// socket as Istio's `xds-grpc` to pilot-agent's local xDS proxy).
    pub server: GrpcTarget,
    /// `envoy_grpc.retry_policy.retry_back_off` (base, max) for reconnects, when given.
    pub backoff: Option<(std::time::Duration, std::time::Duration)>,
    /// TLS to the server (the ADS cluster's `UpstreamTlsContext`, or `skiff run --xds-ca`);
    /// `None`: plain h2c.
    pub tls: Option<std::sync::Arc<model::tls::UpstreamTls>>,
    /// File holding a bearer token sent as `authorization: Bearer <token>` on each stream,
    /// re-read at every reconnect (Istio's projected ServiceAccount token, `--xds-token`).
    pub token: Option<PathBuf>,
}

/// Where a bootstrap cluster used for a gRPC service (SDS, ADS) is reached: its first
/// endpoint, an IP address or a Unix socket (`pipe`, Istio's `sds-grpc` on
/// `./var/run/secrets/workload-spiffe-uds/socket`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GrpcTarget {
    /// `socket_address` with an IP literal and a port.
    Tcp(SocketAddr),
    /// `pipe.path`, as given (a relative path is relative to skiff's working directory, as in
    /// Envoy).
    Unix(PathBuf),
}

impl GrpcTarget {
    /// `unix:PATH` (Envoy's pipe notation as Istio writes it, `unix://PATH` too) or `HOST:PORT`
    /// with an IP host; a bare path (starting with `/` or `.`) is a Unix socket.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            return Ok(GrpcTarget::Unix(p.into()));
        }
        if s.starts_with('/') || s.starts_with('.') {
            return Ok(GrpcTarget::Unix(s.into()));
        }
        s.parse()
            .map(GrpcTarget::Tcp)
            .map_err(|_| format!("{s:?} is neither unix:PATH nor IP:PORT"))
    }
}

impl std::fmt::Display for GrpcTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrpcTarget::Tcp(a) => write!(f, "{a}"),
            GrpcTarget::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
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
    /// `static_resources.secrets`, by name (what TLS contexts name without `sds_config`).
    pub secrets: Secrets,
    /// Every STATIC cluster with an endpoint, by name: where a gRPC service naming it
    /// (`envoy_grpc.cluster_name`) connects. A cluster whose endpoints are all Unix sockets
    /// (`pipe`) is kept in `clusters` without hosts: only gRPC services use it.
    pub grpc_targets: BTreeMap<String, GrpcTarget>,
    /// `dynamic_resources.ads_config`, when configuration comes from an ADS server.
    pub ads: Option<AdsConfig>,
    /// `dynamic_resources.lds_config` is `ads: {}`: listeners come over ADS.
    pub lds_ads: bool,
    /// `dynamic_resources.cds_config` is `ads: {}`: clusters come over ADS.
    pub cds_ads: bool,
    /// How long readiness waits for the first LDS and CDS responses (the longer of the two
    /// `initial_fetch_timeout`s, Envoy's default 15 s); `None`: `0s`, wait for ever (Istio).
    pub initial_fetch_timeout: Option<std::time::Duration>,
    /// The bootstrap as parsed, for `/config_dump`.
    pub raw: PbBootstrap,
}

/// Read and validate a bootstrap file.
pub fn load(path: &Path) -> Result<Bootstrap, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        error: source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Validate bootstrap text (YAML or JSON); `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Bootstrap, ConfigError> {
    let parse_err = |source| ConfigError::Parse {
        origin: origin.to_string(),
        error: source,
    };
    let value = skiff_proto::parse_text(text).map_err(parse_err)?;
    let raw: PbBootstrap = skiff_proto::decode_json(&value).map_err(parse_err)?;
    from_proto(raw, origin)
}

/// Validate an already decoded bootstrap.
pub fn from_proto(raw: PbBootstrap, origin: &str) -> Result<Bootstrap, ConfigError> {
    let invalid = |source| ConfigError::Invalid {
        origin: origin.to_string(),
        error: source,
    };
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    let mut secrets = Secrets::new();
    let mut grpc_targets = BTreeMap::new();
    if let Some(sr) = &raw.static_resources {
        for s in &sr.secrets {
            let s = Secret::try_from(s).map_err(invalid)?;
            if secrets.contains_key(&s.name) {
                return Err(ConfigError::Duplicate {
                    origin: origin.to_string(),
                    kind: "secret",
                    name: s.name,
                });
            }
            secrets.insert(s.name.clone(), Arc::new(s));
        }
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
            let (c, target) = static_cluster(c).map_err(invalid)?;
            if let Some(t) = target {
                grpc_targets.insert(c.name.clone(), t);
            }
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
    let is_static = |r: &&model::tls::SdsRef| r.source == model::tls::SdsSource::Static;
    let unknown = |kind: &'static str, name: &str, mut refs: Vec<&model::tls::SdsRef>| {
        refs.retain(|r| !secrets.contains_key(&r.name));
        refs.first().map(|r| ConfigError::UnknownSecret {
            origin: origin.to_string(),
            kind,
            name: name.to_string(),
            secret: r.name.clone(),
        })
    };
    for l in &listeners {
        if let Some(e) = unknown(
            "listener",
            &l.name,
            l.sds_refs().filter(is_static).collect(),
        ) {
            return Err(e);
        }
    }
    for c in &clusters {
        let refs = c.transport.sds_refs().filter(is_static).collect();
        if let Some(e) = unknown("cluster", &c.name, refs) {
            return Err(e);
        }
    }
    let admin = match raw.admin.as_ref().and_then(|a| a.address.as_ref()) {
        Some(a) => Some(model::socket_addr(Some(a)).map_err(|e| ConfigError::Admin {
            origin: origin.to_string(),
            reason: format!("{}: {}", e.field, e.reason),
        })?),
        None => None,
    };
    let (ads, lds_ads, cds_ads) =
        dynamic(&raw, &clusters, &grpc_targets).map_err(|(field, reason)| {
            ConfigError::Dynamic {
                origin: origin.to_string(),
                field,
                reason,
            }
        })?;
    let node = raw
        .node
        .as_ref()
        .map(|n| NodeInfo {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
        })
        .unwrap_or_default();
    let initial_fetch_timeout =
        initial_fetch_timeout(&raw).map_err(|(field, reason)| ConfigError::Dynamic {
            origin: origin.to_string(),
            field,
            reason,
        })?;
    Ok(Bootstrap {
        node,
        admin,
        listeners,
        clusters,
        secrets,
        grpc_targets,
        ads,
        lds_ads,
        cds_ads,
        initial_fetch_timeout,
        raw,
    })
}

/// A static cluster and, when it is STATIC with an endpoint, where gRPC services reach it.
/// Unix-socket (`pipe`) endpoints are taken out before the model sees the cluster (the data
/// plane dials only IP endpoints); such a cluster must consist of them only.
fn static_cluster(
    c: &envoy_types::pb::envoy::config::cluster::v3::Cluster,
) -> Result<(Cluster, Option<GrpcTarget>), ModelError> {
    use envoy_types::pb::envoy::config::core::v3::address::Address as Kind;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let endpoint_address = |e: &envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint| match &e
        .host_identifier
    {
        Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref().and_then(|a| a.address.clone()),
        _ => None,
    };
    let pipes: Vec<String> = c
        .load_assignment
        .iter()
        .flat_map(|la| la.endpoints.iter())
        .flat_map(|l| l.lb_endpoints.iter())
        .filter_map(|e| match endpoint_address(e) {
            Some(Kind::Pipe(p)) => Some(p.path),
            _ => None,
        })
        .collect();
    if pipes.is_empty() {
        let c = Cluster::try_from(c)?;
        let target = match &c.kind {
            model::ClusterKind::Static(la) => la
                .endpoints()
                .find(|e| e.internal.is_none())
                .map(|e| GrpcTarget::Tcp(e.address)),
            _ => None,
        };
        return Ok((c, target));
    }
    let total: usize = c
        .load_assignment
        .iter()
        .flat_map(|la| la.endpoints.iter())
        .map(|l| l.lb_endpoints.len())
        .sum();
    let err =
        |field: &str, reason: &str| model::FieldError::new(field, reason).on("cluster", &c.name);
    if pipes.len() != total {
        return Err(err(
            "load_assignment.endpoints",
            "Unix socket (pipe) and IP endpoints cannot be mixed in one cluster",
        ));
    }
    if pipes[0].is_empty() {
        return Err(err(
            "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path",
            "must not be empty",
        ));
    }
    let mut hostless = c.clone();
    if let Some(la) = hostless.load_assignment.as_mut() {
        la.endpoints.clear();
    }
    let model = Cluster::try_from(&hostless)?;
    if !matches!(model.kind, model::ClusterKind::Static(_)) {
        return Err(err(
            "type",
            "a cluster of Unix socket (pipe) endpoints must be STATIC",
        ));
    }
    Ok((model, Some(GrpcTarget::Unix(PathBuf::from(&pipes[0])))))
}

/// Envoy's default `initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The longest `initial_fetch_timeout` of `lds_config` and `cds_config` (each defaults to 15 s);
/// `None` when one of them is `0s` (wait for ever).
fn initial_fetch_timeout(
    raw: &PbBootstrap,
) -> Result<Option<std::time::Duration>, (String, String)> {
    let Some(dr) = &raw.dynamic_resources else {
        return Ok(Some(DEFAULT_INITIAL_FETCH_TIMEOUT));
    };
    let mut longest = std::time::Duration::ZERO;
    for (field, source) in [
        ("lds_config", &dr.lds_config),
        ("cds_config", &dr.cds_config),
    ] {
        let Some(source) = source else { continue };
        let t = match &source.initial_fetch_timeout {
            None => DEFAULT_INITIAL_FETCH_TIMEOUT,
            Some(d) => crate::model::duration(d)
                .map_err(|e| (format!("{field}.initial_fetch_timeout"), e.reason))?,
        };
        if t.is_zero() {
            return Ok(None);
        }
        longest = longest.max(t);
    }
    Ok(Some(if longest.is_zero() {
        DEFAULT_INITIAL_FETCH_TIMEOUT
    } else {
        longest
    }))
}

/// `dynamic_resources`: the ADS server address and which types use it.
fn dynamic(
    raw: &PbBootstrap,
    clusters: &[Cluster],
    grpc_targets: &BTreeMap<String, GrpcTarget>,
) -> Result<(Option<AdsConfig>, bool, bool), (String, String)> {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier as Spec;
    use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
    let Some(dr) = &raw.dynamic_resources else {
        return Ok((None, false, false));
    };
    let is_ads = |field: &str,
                  c: &Option<envoy_types::pb::envoy::config::core::v3::ConfigSource>|
     -> Result<bool, (String, String)> {
        match c.as_ref().and_then(|c| c.config_source_specifier.as_ref()) {
            None => Ok(false),
            Some(Spec::Ads(_)) => Ok(true),
            Some(_) => Err((
                field.to_string(),
                "only `ads: {}` is supported (no path, REST or per-type gRPC sources)".into(),
            )),
        }
    };
    let lds_ads = is_ads("lds_config", &dr.lds_config)?;
    let cds_ads = is_ads("cds_config", &dr.cds_config)?;
    let Some(ads) = &dr.ads_config else {
        if lds_ads || cds_ads {
            return Err((
                "ads_config".into(),
                "lds/cds use ADS but ads_config is missing".into(),
            ));
        }
        return Ok((None, false, false));
    };
    let api = match ads.api_type {
        2 | 5 => AdsApi::Sotw,
        3 | 6 => AdsApi::Delta,
        other => {
            return Err((
                "ads_config.api_type".into(),
                format!("{other} is not GRPC or DELTA_GRPC"),
            ));
        }
    };
    let mut backoff = None;
    let cluster = match ads
        .grpc_services
        .first()
        .and_then(|g| g.target_specifier.as_ref())
    {
        Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => {
            if let Some(b) = e
                .retry_policy
                .as_ref()
                .and_then(|r| r.retry_back_off.as_ref())
            {
                let field = "ads_config.grpc_services[0].envoy_grpc.retry_policy.retry_back_off";
                let d = |v: &Option<envoy_types::pb::google::protobuf::Duration>| {
                    v.as_ref()
                        .map(model::duration)
                        .transpose()
                        .map_err(|e| (field.to_string(), e.reason))
                };
                let base = d(&b.base_interval)?.unwrap_or(std::time::Duration::from_millis(100));
                let max = d(&b.max_interval)?.unwrap_or(base * 10);
                backoff = Some((base, max.max(base)));
            }
            e.cluster_name.clone()
        }
        Some(TargetSpecifier::GoogleGrpc(_)) => {
            return Err((
                "ads_config.grpc_services[0].google_grpc".into(),
                "google_grpc is not supported; use envoy_grpc".into(),
            ));
        }
        _ => {
            return Err((
                "ads_config.grpc_services[0].envoy_grpc.cluster_name".into(),
                "must name a static cluster".into(),
            ));
        }
    };
    let field = || "ads_config.grpc_services[0].envoy_grpc.cluster_name".to_string();
    let c = clusters
        .iter()
        .find(|c| c.name == cluster)
        .ok_or_else(|| (field(), format!("no static cluster {cluster:?}")))?;
    let server = grpc_targets.get(&cluster).cloned().ok_or_else(|| {
        (
            field(),
            format!("cluster {cluster:?} must be STATIC with at least one endpoint"),
        )
    })?;
    Ok((
        Some(AdsConfig {
            api,
            cluster,
            server,
            backoff,
            // pilot-agent's istiod connection: the ADS cluster's UpstreamTlsContext.
            tls: c.transport.default.clone(),
            token: None,
        }),
        lds_ads,
        cds_ads,
    ))
}

/// Give back the memory of Envoy's descriptor pool (about 16 MB, needed only to read JSON/YAML
/// config and to render `/config_dump`): skiff's idle footprint drops from ~26 MB to ~11 MB.
/// The pool is rebuilt on next use (~35 ms).
pub fn release_parser_memory() {
    skiff_proto::release_pool();
    // glibc keeps freed heap pages mapped; hand them back now that the pool is gone, and the
    // pages of the embedded descriptor set the pool was decoded from.
    crate::mem::trim_heap();
    crate::mem::page_out(skiff_proto::FILE_DESCRIPTOR_SET);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ads(lds: &str, cds: &str) -> String {
        format!(
            r#"
dynamic_resources:
  ads_config:
    api_type: GRPC
    grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds }} }} ]
  lds_config: {{ ads: {{}} {lds} }}
  cds_config: {{ ads: {{}} {cds} }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    load_assignment:
      cluster_name: xds
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15010 }} }} }} }} ] }} ]
"#
        )
    }

    const TLS_CLUSTER: &str = r#"
static_resources:
  secrets:
  - name: ca
    validation_context: { trusted_ca: { filename: /etc/ca.pem } }
  clusters:
  - name: up
    type: STATIC
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context: { validation_context_sds_secret_config: { name: NAME } }
"#;

    #[test]
    fn static_secrets_load_and_unknown_ones_are_refused() {
        let b = parse(&TLS_CLUSTER.replace("NAME", "ca"), "<test>").unwrap();
        assert!(b.secrets.contains_key("ca"));
        let e = parse(&TLS_CLUSTER.replace("NAME", "nope"), "<test>").unwrap_err();
        assert!(
            e.to_string()
                .contains("cluster \"up\": unknown static secret \"nope\""),
            "{e}"
        );
        let dup = TLS_CLUSTER.replace("NAME", "ca").replace(
            "  clusters:",
            "  - name: ca\n    validation_context: { trusted_ca: { filename: /x.pem } }\n  clusters:",
        );
        assert!(matches!(
            parse(&dup, "<test>").unwrap_err(),
            ConfigError::Duplicate { kind: "secret", .. }
        ));
    }

    #[test]
    fn initial_fetch_timeout_is_the_longer_one_and_zero_means_forever() {
        let t = |lds: &str, cds: &str| {
            parse(&ads(lds, cds), "<test>")
                .unwrap()
                .initial_fetch_timeout
        };
        assert_eq!(t("", ""), Some(DEFAULT_INITIAL_FETCH_TIMEOUT));
        assert_eq!(
            t(
                ", initial_fetch_timeout: 2s",
                ", initial_fetch_timeout: 30s"
            ),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(t(", initial_fetch_timeout: 0s", ""), None);
        let err = parse(&ads(", initial_fetch_timeout: -1s", ""), "<test>").unwrap_err();
        assert!(
            err.to_string()
                .contains("dynamic_resources.lds_config.initial_fetch_timeout"),
            "{err}"
        );
    }
}
