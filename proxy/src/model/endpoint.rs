//! Endpoints of a cluster (`ClusterLoadAssignment`): localities, priorities, health, weights.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as pb;

use super::limits::{self, MAX_ENDPOINTS, MAX_LOCALITIES, MAX_PRIORITY};
use super::{FieldError, ModelError, socket_addr};

/// Envoy's default `overprovisioning_factor` (percent).
pub const DEFAULT_OVERPROVISIONING_FACTOR: u32 = 140;

/// Validated `ClusterLoadAssignment`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadAssignment {
    /// `cluster_name`: the EDS service name this assignment answers.
    pub cluster_name: String,
    /// Endpoints grouped by locality and priority, in the order received.
    pub localities: Vec<LocalityEndpoints>,
    /// `policy.overprovisioning_factor`, percent.
    pub overprovisioning_factor: u32,
}

/// One `LocalityLbEndpoints` group.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityEndpoints {
    /// Region/zone/sub-zone.
    pub locality: Locality,
    /// Priority level (0 is highest).
    pub priority: u32,
    /// `load_balancing_weight` of the locality, if set.
    pub weight: Option<u32>,
    /// Hosts in this locality.
    pub endpoints: Vec<LbEndpoint>,
}

/// Envoy `Locality`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Sub-zone.
    pub sub_zone: String,
}

/// One upstream host.
#[derive(Debug, Clone, PartialEq)]
pub struct LbEndpoint {
    /// Where to connect (`0.0.0.0:0` for an internal endpoint).
    pub address: SocketAddr,
    /// `envoy_internal_address.server_listener_name` of an endpoint that is one of the proxy's
    /// own internal listeners (Istio's `main_internal`); never dialled over the network.
    pub internal: Option<String>,
    /// EDS health status.
    pub health: HealthStatus,
    /// `load_balancing_weight` (default 1).
    pub weight: u32,
    /// `metadata.filter_metadata["envoy.transport_socket_match"]` (Istio: `tlsMode: istio`),
    /// values as text: what the cluster's `transport_socket_matches` are matched against.
    pub transport_socket_match: BTreeMap<String, String>,
    /// Istio's `metadata.filter_metadata["istio"].workload` (Istio's `destination_*` labels
    /// on a client side).
    pub istio_workload: Option<std::sync::Arc<super::istio::Workload>>,
}

/// The filter metadata key of the entries transport socket matches look at.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// EDS `health_status`, as Envoy interprets it for load balancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthStatus {
    /// UNKNOWN: treated as healthy.
    Unknown,
    /// HEALTHY.
    Healthy,
    /// UNHEALTHY.
    Unhealthy,
    /// DRAINING: not used for new traffic.
    Draining,
    /// TIMEOUT: treated as unhealthy.
    Timeout,
    /// DEGRADED: used only when not enough healthy hosts.
    Degraded,
}

impl HealthStatus {
    /// Whether new connections may use this host when enough healthy hosts exist.
    pub fn is_healthy(self) -> bool {
        matches!(self, HealthStatus::Unknown | HealthStatus::Healthy)
    }

    /// Envoy's proto name (`HEALTHY`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Unknown => "UNKNOWN",
            HealthStatus::Healthy => "HEALTHY",
            HealthStatus::Unhealthy => "UNHEALTHY",
            HealthStatus::Draining => "DRAINING",
            HealthStatus::Timeout => "TIMEOUT",
            HealthStatus::Degraded => "DEGRADED",
        }
    }

    fn from_proto(v: i32) -> Result<Self, FieldError> {
        Ok(match v {
            0 => HealthStatus::Unknown,
            1 => HealthStatus::Healthy,
            2 => HealthStatus::Unhealthy,
            3 => HealthStatus::Draining,
            4 => HealthStatus::Timeout,
            5 => HealthStatus::Degraded,
            other => {
                return Err(FieldError::new(
                    "health_status",
                    format!("unknown value {other}"),
                ));
            }
        })
    }
}

impl LoadAssignment {
    /// All endpoints, flattened, with their locality index.
    pub fn endpoints(&self) -> impl Iterator<Item = &LbEndpoint> {
        self.localities.iter().flat_map(|l| l.endpoints.iter())
    }

    /// Convert, naming `owner` (e.g. `cluster "x": load_assignment`) in errors.
    pub fn from_proto(cla: &pb::ClusterLoadAssignment) -> Result<Self, FieldError> {
        limits::at_most("endpoints", cla.endpoints.len(), MAX_LOCALITIES)?;
        let total: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
        limits::at_most("endpoints[*].lb_endpoints", total, MAX_ENDPOINTS)?;
        let mut localities = Vec::with_capacity(cla.endpoints.len());
        for (i, l) in cla.endpoints.iter().enumerate() {
            let at = |e: FieldError| e.within(format!("[{i}]")).within("endpoints");
            // A priority is an index into the balancer's list of levels: one level is
            // allocated per priority up to the highest, so the value itself must be bounded.
            if l.priority > MAX_PRIORITY {
                return Err(at(FieldError::new(
                    "priority",
                    format!("{} is above the maximum of {MAX_PRIORITY}", l.priority),
                )));
            }
            let mut endpoints = Vec::with_capacity(l.lb_endpoints.len());
            for (j, e) in l.lb_endpoints.iter().enumerate() {
                let ep = lb_endpoint(e)
                    .map_err(|err| at(err.within(format!("[{j}]")).within("lb_endpoints")))?;
                endpoints.push(ep);
            }
            let weight = l.load_balancing_weight.as_ref().map(|w| w.value);
            if weight == Some(0) {
                return Err(at(FieldError::new(
                    "load_balancing_weight",
                    "must be at least 1",
                )));
            }
            localities.push(LocalityEndpoints {
                locality: locality(l.locality.as_ref()),
                priority: l.priority,
                weight,
                endpoints,
            });
        }
        let overprovisioning_factor = cla
            .policy
            .as_ref()
            .and_then(|p| p.overprovisioning_factor.as_ref())
            .map(|v| v.value)
            .unwrap_or(DEFAULT_OVERPROVISIONING_FACTOR);
        if overprovisioning_factor == 0 {
            return Err(FieldError::new(
                "policy.overprovisioning_factor",
                "must be at least 1",
            ));
        }
        Ok(LoadAssignment {
            cluster_name: cla.cluster_name.clone(),
            localities,
            overprovisioning_factor,
        })
    }
}

impl TryFrom<&pb::ClusterLoadAssignment> for LoadAssignment {
    type Error = ModelError;
    fn try_from(cla: &pb::ClusterLoadAssignment) -> Result<Self, ModelError> {
        if cla.cluster_name.is_empty() {
            return Err(FieldError::new("cluster_name", "must not be empty")
                .on("cluster_load_assignment", ""));
        }
        LoadAssignment::from_proto(cla)
            .map_err(|e| e.on("cluster_load_assignment", &cla.cluster_name))
    }
}

impl Locality {
    /// From an optional proto (absent = the empty locality), e.g. the bootstrap's
    /// `node.locality`.
    pub fn from_proto(l: Option<&core::Locality>) -> Locality {
        locality(l)
    }
}

fn locality(l: Option<&core::Locality>) -> Locality {
    l.map(|l| Locality {
        region: l.region.clone(),
        zone: l.zone.clone(),
        sub_zone: l.sub_zone.clone(),
    })
    .unwrap_or_default()
}

fn lb_endpoint(e: &pb::LbEndpoint) -> Result<LbEndpoint, FieldError> {
    use pb::lb_endpoint::HostIdentifier;
    let endpoint = match &e.host_identifier {
        Some(HostIdentifier::Endpoint(ep)) => ep,
        Some(HostIdentifier::EndpointName(n)) => {
            return Err(FieldError::new(
                "endpoint_name",
                format!("named endpoint {n:?} is not supported"),
            ));
        }
        None => return Err(FieldError::new("endpoint", "missing")),
    };
    use envoy_types::pb::envoy::config::core::v3::address::Address as Kind;
    use envoy_types::pb::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
    let internal = match endpoint.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(Kind::EnvoyInternalAddress(ia)) => Some(match &ia.address_name_specifier {
            Some(AddressNameSpecifier::ServerListenerName(n)) => n.clone(),
            None => String::new(),
        }),
        _ => None,
    };
    let address = match internal {
        Some(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        None => {
            let a =
                socket_addr(endpoint.address.as_ref()).map_err(|e| e.within("endpoint.address"))?;
            if a.port() == 0 {
                return Err(FieldError::new(
                    "endpoint.address.socket_address.port_value",
                    "port 0",
                ));
            }
            a
        }
    };
    let weight = e
        .load_balancing_weight
        .as_ref()
        .map(|w| w.value)
        .unwrap_or(1);
    if weight == 0 {
        return Err(FieldError::new(
            "load_balancing_weight",
            "must be at least 1",
        ));
    }
    let transport_socket_match = e
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(TRANSPORT_SOCKET_MATCH))
        .map(super::tls::struct_strings)
        .unwrap_or_default();
    Ok(LbEndpoint {
        address,
        internal,
        health: HealthStatus::from_proto(e.health_status)?,
        weight,
        transport_socket_match,
        istio_workload: super::istio::endpoint_workload(e.metadata.as_ref())
            .map(std::sync::Arc::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(priority: u32, n: usize) -> pb::LocalityLbEndpoints {
        let ep = |i: usize| pb::LbEndpoint {
            host_identifier: Some(pb::lb_endpoint::HostIdentifier::Endpoint(pb::Endpoint {
                address: Some(core::Address {
                    address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                        address: format!("10.0.{}.{}", i / 250, i % 250 + 1),
                        port_specifier: Some(core::socket_address::PortSpecifier::PortValue(80)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        pb::LocalityLbEndpoints {
            priority,
            lb_endpoints: (0..n).map(ep).collect(),
            ..Default::default()
        }
    }

    fn cla(groups: Vec<pb::LocalityLbEndpoints>) -> pb::ClusterLoadAssignment {
        pb::ClusterLoadAssignment {
            cluster_name: "svc".into(),
            endpoints: groups,
            ..Default::default()
        }
    }

    /// Regression: `priority: 4294967295` made the balancer allocate one level per priority
    /// up to it and abort. Envoy caps priorities at 128; so does the model.
    #[test]
    fn priorities_above_128_are_rejected_naming_the_field() {
        let e = LoadAssignment::try_from(&cla(vec![group(0, 1), group(u32::MAX, 1)])).unwrap_err();
        assert_eq!(e.field, "endpoints[1].priority");
        assert_eq!(
            e.to_string(),
            "cluster_load_assignment \"svc\": endpoints[1].priority: 4294967295 is above the \
             maximum of 128"
        );
        assert!(LoadAssignment::try_from(&cla(vec![group(129, 1)])).is_err());
        let ok = LoadAssignment::try_from(&cla(vec![group(128, 1)])).unwrap();
        assert_eq!(ok.localities[0].priority, 128);
    }

    #[test]
    fn endpoint_and_locality_counts_are_bounded() {
        let many = (0..limits::MAX_LOCALITIES + 1)
            .map(|_| group(0, 0))
            .collect();
        assert_eq!(
            LoadAssignment::try_from(&cla(many)).unwrap_err().field,
            "endpoints"
        );
        let per = limits::MAX_ENDPOINTS / 2 + 1;
        let e = LoadAssignment::try_from(&cla(vec![group(0, per), group(1, per)])).unwrap_err();
        assert_eq!(e.field, "endpoints[*].lb_endpoints");
        assert!(e.reason.contains("limit of 100000"), "{}", e.reason);
    }
}
