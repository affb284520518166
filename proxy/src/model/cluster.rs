//! Clusters: how to discover a cluster's hosts and how to balance across them.

pub mod lb;

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;

use super::endpoint::LoadAssignment;
use super::tls::ClusterTransport;
use super::{FieldError, ModelError, duration, host_port};

/// Envoy's default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Validated `Cluster`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Cluster name.
    pub name: String,
    /// Discovery type and what it needs.
    pub kind: ClusterKind,
    /// Balancing policy.
    pub lb_policy: LbPolicy,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// How each endpoint is dialled (`transport_socket`, `transport_socket_matches`): TLS
    /// or plaintext; clusters that may use TLS need userspace.
    pub transport: ClusterTransport,
    /// Policy parameters, `common_lb_config`, outlier detection, circuit breakers, health checks.
    pub lb: lb::LbSettings,
    /// Upstream HTTP version (`HttpProtocolOptions`), for HTTP connection manager routes.
    pub upstream_http: super::upstream_http::UpstreamHttp,
    /// The first service of Istio's `metadata.filter_metadata["istio"].services` (Istio's
    /// `destination_service*` labels).
    pub istio_service: Option<std::sync::Arc<super::istio::IstioService>>,
}

/// How the cluster learns its hosts.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterKind {
    /// STATIC: hosts inline.
    Static(LoadAssignment),
    /// EDS: hosts arrive as a `ClusterLoadAssignment` named `service_name`.
    Eds {
        /// `eds_cluster_config.service_name`, or the cluster name when empty.
        service_name: String,
    },
    /// STRICT_DNS / LOGICAL_DNS: host names resolved when connecting.
    Dns {
        /// (host, port) pairs from `load_assignment`.
        hosts: Vec<(String, u16)>,
    },
    /// ORIGINAL_DST: connect to the connection's original destination.
    OriginalDst,
}

impl ClusterKind {
    /// Envoy's name for the discovery type.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClusterKind::Static(_) => "STATIC",
            ClusterKind::Eds { .. } => "EDS",
            ClusterKind::Dns { .. } => "STRICT_DNS",
            ClusterKind::OriginalDst => "ORIGINAL_DST",
        }
    }
}

/// `lb_policy` (or the policy named by `load_balancing_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LbPolicy {
    /// ROUND_ROBIN.
    RoundRobin,
    /// LEAST_REQUEST.
    LeastRequest,
    /// RING_HASH.
    RingHash,
    /// RANDOM.
    Random,
    /// MAGLEV.
    Maglev,
    /// CLUSTER_PROVIDED (ORIGINAL_DST clusters).
    ClusterProvided,
    /// skiff's latency-aware PeakEWMA (linkerd2-proxy's balancer), chosen by naming
    /// [`lb::PEAK_EWMA_POLICY`] in `load_balancing_policy`.
    PeakEwma,
}

impl LbPolicy {
    /// Envoy's proto name.
    pub fn as_str(self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "ROUND_ROBIN",
            LbPolicy::LeastRequest => "LEAST_REQUEST",
            LbPolicy::RingHash => "RING_HASH",
            LbPolicy::Random => "RANDOM",
            LbPolicy::Maglev => "MAGLEV",
            LbPolicy::ClusterProvided => "CLUSTER_PROVIDED",
            LbPolicy::PeakEwma => "PEAK_EWMA",
        }
    }
}

fn lb_policy(c: &pb::Cluster) -> Result<(LbPolicy, Option<lb::TypedParams>), FieldError> {
    // The typed `load_balancing_policy` wins over the enum when present (Envoy's rule).
    if let Some(lbp) = &c.load_balancing_policy {
        for (i, p) in lbp.policies.iter().enumerate() {
            let url = p
                .typed_extension_config
                .as_ref()
                .and_then(|t| t.typed_config.as_ref())
                .map(|a| a.type_url.as_str())
                .unwrap_or("");
            let name = url.rsplit('/').next().unwrap_or(url);
            let known = match name {
                lb::PEAK_EWMA_POLICY => Some(LbPolicy::PeakEwma),
                "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin" => {
                    Some(LbPolicy::RoundRobin)
                }
                "envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest" => {
                    Some(LbPolicy::LeastRequest)
                }
                "envoy.extensions.load_balancing_policies.random.v3.Random" => {
                    Some(LbPolicy::Random)
                }
                "envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash" => {
                    Some(LbPolicy::RingHash)
                }
                "envoy.extensions.load_balancing_policies.maglev.v3.Maglev" => {
                    Some(LbPolicy::Maglev)
                }
                "envoy.extensions.load_balancing_policies.cluster_provided.v3.ClusterProvided" => {
                    Some(LbPolicy::ClusterProvided)
                }
                // Without ORCA load reports (skiff has none yet) client-side weighted round
                // robin weighs every host equally, i.e. it is round robin.
                "envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin" => {
                    Some(LbPolicy::RoundRobin)
                }
                // Override-host picks a host named by a header or metadata, which L4 traffic
                // never carries; every connection then uses its fallback (round robin).
                "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost" => {
                    Some(LbPolicy::RoundRobin)
                }
                _ => None,
            };
            // Envoy takes the first policy it supports, in order.
            if let Some(k) = known {
                let value = p
                    .typed_extension_config
                    .as_ref()
                    .and_then(|t| t.typed_config.as_ref())
                    .map(|a| a.value.as_slice())
                    .unwrap_or(&[]);
                let params = lb::typed_params(name, value).map_err(|e| {
                    e.within(format!(
                        "load_balancing_policy.policies[{i}].typed_extension_config"
                    ))
                })?;
                return Ok((k, params));
            }
            if i + 1 == lbp.policies.len() {
                return Err(FieldError::new(
                    format!("load_balancing_policy.policies[{i}]"),
                    format!("no supported policy (last tried {name:?})"),
                ));
            }
        }
    }
    let policy = match c.lb_policy {
        0 => LbPolicy::RoundRobin,
        1 => LbPolicy::LeastRequest,
        2 => LbPolicy::RingHash,
        3 => LbPolicy::Random,
        5 => LbPolicy::Maglev,
        6 => LbPolicy::ClusterProvided,
        7 => LbPolicy::RoundRobin,
        other => {
            return Err(FieldError::new(
                "lb_policy",
                format!("unknown value {other}"),
            ));
        }
    };
    Ok((policy, None))
}

impl TryFrom<&pb::Cluster> for Cluster {
    type Error = ModelError;
    fn try_from(c: &pb::Cluster) -> Result<Self, ModelError> {
        let err = |e: FieldError| e.on("cluster", &c.name);
        if c.name.is_empty() {
            return Err(err(FieldError::new("name", "must not be empty")));
        }
        use pb::cluster::ClusterDiscoveryType as Cdt;
        let discovery = match &c.cluster_discovery_type {
            None => 0,
            Some(Cdt::Type(t)) => *t,
            Some(Cdt::ClusterType(ct)) => {
                return Err(err(FieldError::new(
                    "cluster_type",
                    format!("custom cluster type {:?} is not supported", ct.name),
                )));
            }
        };
        let kind = match discovery {
            0 => {
                let cla = c.load_assignment.as_ref().cloned().unwrap_or_default();
                let la = LoadAssignment::from_proto(&cla)
                    .map_err(|e| err(e.within("load_assignment")))?;
                ClusterKind::Static(la)
            }
            1 | 2 => {
                let mut hosts = Vec::new();
                if let Some(cla) = &c.load_assignment {
                    for (i, l) in cla.endpoints.iter().enumerate() {
                        for (j, e) in l.lb_endpoints.iter().enumerate() {
                            use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
                            let at = format!("load_assignment.endpoints[{i}].lb_endpoints[{j}]");
                            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                                return Err(err(FieldError::new(at, "missing endpoint")));
                            };
                            let hp = host_port(ep.address.as_ref())
                                .map_err(|e| err(e.within("endpoint.address").within(&at)))?;
                            hosts.push(hp);
                        }
                    }
                }
                ClusterKind::Dns { hosts }
            }
            3 => {
                let service_name = c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| c.name.clone());
                ClusterKind::Eds { service_name }
            }
            4 => ClusterKind::OriginalDst,
            other => {
                return Err(err(FieldError::new(
                    "type",
                    format!("unknown discovery type {other}"),
                )));
            }
        };
        let (lb_policy, typed) = lb_policy(c).map_err(err)?;
        let lb = lb::parse(c, typed).map_err(err)?;
        let transport =
            super::tls::cluster_transport(c.transport_socket.as_ref(), &c.transport_socket_matches)
                .map_err(err)?;
        let connect_timeout = match &c.connect_timeout {
            Some(d) => duration(d).map_err(|e| err(e.within("connect_timeout")))?,
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let mut upstream_http = super::upstream_http::from_cluster(c).map_err(err)?;
        if upstream_http.protocol == super::upstream_http::UpstreamProtocol::Auto
            && transport.may_use_tls()
        {
            upstream_http.auto_transport = Some(std::sync::Arc::new(
                super::upstream_http::auto_transport(&transport),
            ));
        }
        Ok(Cluster {
            name: c.name.clone(),
            kind,
            lb_policy,
            connect_timeout,
            transport,
            lb,
            upstream_http,
            istio_service: super::istio::metadata_service(c.metadata.as_ref())
                .map(std::sync::Arc::new),
        })
    }
}

#[cfg(test)]
mod tests;
