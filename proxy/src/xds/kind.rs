//! The resource types skiff subscribes to, named once: every type-URL string comparison of
//! the client and the control plane goes through [`ResourceKind::from_type_url`].

use std::fmt;

use skiff_proto::{CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL};

pub use crate::model::tls::SECRET_TYPE_URL;

/// One of the xDS resource types skiff decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// `envoy.config.cluster.v3.Cluster` (CDS).
    Cluster,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
    Endpoints,
    /// `envoy.config.listener.v3.Listener` (LDS).
    Listener,
    /// `envoy.config.route.v3.RouteConfiguration` (RDS).
    Route,
    /// `envoy.extensions.transport_sockets.tls.v3.Secret` (SDS over ADS).
    Secret,
}

impl ResourceKind {
    /// Every kind, in the order Envoy first requests them (CDS, EDS, LDS, RDS, SDS).
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Cluster,
        ResourceKind::Endpoints,
        ResourceKind::Listener,
        ResourceKind::Route,
        ResourceKind::Secret,
    ];

    /// The kind of a type URL; `None` for types skiff does not decode.
    pub fn from_type_url(type_url: &str) -> Option<ResourceKind> {
        Some(match type_url {
            CLUSTER_TYPE_URL => ResourceKind::Cluster,
            ENDPOINT_TYPE_URL => ResourceKind::Endpoints,
            LISTENER_TYPE_URL => ResourceKind::Listener,
            ROUTE_TYPE_URL => ResourceKind::Route,
            SECRET_TYPE_URL => ResourceKind::Secret,
            _ => return None,
        })
    }

    /// Its type URL (`type.googleapis.com/envoy.config...`).
    pub const fn type_url(self) -> &'static str {
        match self {
            ResourceKind::Cluster => CLUSTER_TYPE_URL,
            ResourceKind::Endpoints => ENDPOINT_TYPE_URL,
            ResourceKind::Listener => LISTENER_TYPE_URL,
            ResourceKind::Route => ROUTE_TYPE_URL,
            ResourceKind::Secret => SECRET_TYPE_URL,
        }
    }

    /// The proto message name (`envoy.config.cluster.v3.Cluster`).
    pub fn type_name(self) -> &'static str {
        skiff_proto::type_name(self.type_url())
    }

    /// LDS and CDS: subscribed by wildcard, and a state-of-the-world response carries the
    /// whole set (a resource missing from it is removed). RDS, EDS and SDS follow names.
    pub fn is_wildcard(self) -> bool {
        matches!(self, ResourceKind::Listener | ResourceKind::Cluster)
    }

    /// Prefix of its update counters for LDS and CDS (Envoy's names); RDS and EDS count per
    /// resource (`Resources::update_stat_prefixes`).
    pub fn stat_prefix(self) -> Option<&'static str> {
        match self {
            ResourceKind::Listener => Some("listener_manager.lds"),
            ResourceKind::Cluster => Some("cluster_manager.cds"),
            ResourceKind::Route | ResourceKind::Endpoints | ResourceKind::Secret => None,
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_url())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_round_trip_and_others_are_unknown() {
        for k in ResourceKind::ALL {
            assert_eq!(ResourceKind::from_type_url(k.type_url()), Some(k));
        }
        assert_eq!(
            ResourceKind::ALL.map(ResourceKind::type_url),
            [
                CLUSTER_TYPE_URL,
                ENDPOINT_TYPE_URL,
                LISTENER_TYPE_URL,
                ROUTE_TYPE_URL,
                SECRET_TYPE_URL
            ]
        );
        assert_eq!(ResourceKind::from_type_url(""), None);
        assert_eq!(
            ResourceKind::from_type_url("type.googleapis.com/envoy.config.core.v3.Secret"),
            None
        );
        assert_eq!(
            ResourceKind::Secret.type_name(),
            "envoy.extensions.transport_sockets.tls.v3.Secret"
        );
        assert_eq!(
            ResourceKind::Endpoints.type_name(),
            "envoy.config.endpoint.v3.ClusterLoadAssignment"
        );
    }
}
