//! Builders of model values for unit tests elsewhere in the crate (chains, listeners,
//! clusters), so every test module speaks of the same Istio-like shapes.

use std::time::Duration;

use super::endpoint::Locality;
use super::listener::TcpProxy;
use super::matchers::HeaderMatch;
use super::route::{HeaderOps, PathMatch, Route, RouteAction, RouteMatch};
use super::{
    Cidr, Cluster, ClusterKind, ClusterSpecifier, FilterChain, FilterChainMatch, HealthStatus,
    LbEndpoint, LbPolicy, Listener, LoadAssignment, LocalityEndpoints, NetworkAction, VirtualHost,
};

/// A chain `name` matching `matcher` whose tcp_proxy goes to `cluster` (also its stat prefix).
pub(crate) fn tcp_proxy_chain(name: &str, matcher: FilterChainMatch, cluster: &str) -> FilterChain {
    FilterChain {
        name: name.into(),
        matcher,
        filters: vec![],
        rbac: vec![],
        action: NetworkAction::TcpProxy(TcpProxy {
            stat_prefix: cluster.into(),
            cluster: ClusterSpecifier::Cluster(cluster.into()),
            idle_timeout: None,
            max_connect_attempts: 1,
            max_downstream_connection_duration: None,
            hash_policy: None,
            buffer_limit: super::upstream_http::DEFAULT_BUFFER_LIMIT,
            access_log: vec![],
        }),
        tls: None,
        istio_stats: None,
    }
}

/// A tcp_proxy chain to `cluster` for `vip`/32 port `port`.
pub(crate) fn tcp_chain(name: &str, vip: &str, port: u16, cluster: &str) -> FilterChain {
    let matcher = FilterChainMatch {
        destination_port: Some(port),
        prefix_ranges: vec![Cidr {
            addr: vip.parse().unwrap(),
            len: 32,
        }],
        ..Default::default()
    };
    tcp_proxy_chain(name, matcher, cluster)
}

/// Listener `l` on 0.0.0.0:15001 (original destination) with `chains` and `default`.
pub(crate) fn listener(chains: Vec<FilterChain>, default: Option<FilterChain>) -> Listener {
    Listener {
        name: "l".into(),
        address: "0.0.0.0:15001".parse().unwrap(),
        internal: None,
        use_original_dst: true,
        bind_to_port: true,
        filter_chains: chains,
        default_filter_chain: default,
        listener_filters: vec![],
        listener_filters_timeout: Some(super::listener::DEFAULT_LISTENER_FILTERS_TIMEOUT),
        continue_on_listener_filters_timeout: false,
        udp: None,
        unsupported: vec![],
        access_log: vec![],
    }
}

/// Istio's virtualOutbound on 0.0.0.0:15001 with `chains` and no default chain.
pub(crate) fn virtual_listener(chains: Vec<FilterChain>) -> Listener {
    Listener {
        name: "virtualOutbound".into(),
        ..listener(chains, None)
    }
}

/// Cluster `name`'s endpoints `eps` (address, health), weight 1, in one default locality.
pub(crate) fn assignment(name: &str, eps: &[(&str, HealthStatus)]) -> LoadAssignment {
    LoadAssignment {
        cluster_name: name.into(),
        localities: vec![LocalityEndpoints {
            locality: Locality::default(),
            priority: 0,
            weight: None,
            endpoints: eps
                .iter()
                .map(|(a, h)| LbEndpoint {
                    address: a.parse().unwrap(),
                    internal: None,
                    health: *h,
                    weight: 1,
                    transport_socket_match: Default::default(),
                    istio_workload: None,
                })
                .collect(),
        }],
        overprovisioning_factor: 140,
    }
}

/// A STATIC cluster `name` balancing over healthy `eps` with `lb`.
pub(crate) fn static_cluster(name: &str, lb: LbPolicy, eps: &[&str]) -> Cluster {
    let eps: Vec<(&str, HealthStatus)> = eps.iter().map(|a| (*a, HealthStatus::Healthy)).collect();
    Cluster {
        istio_service: None,
        name: name.into(),
        kind: ClusterKind::Static(assignment(name, &eps)),
        lb_policy: lb,
        connect_timeout: Duration::from_secs(1),
        transport: Default::default(),
        lb: Default::default(),
        upstream_http: Default::default(),
    }
}

/// Route `name` matching `path` (and `headers`) that answers 200 itself (`direct_response`).
pub(crate) fn direct_route(
    name: &str,
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
) -> Route {
    Route {
        name: name.into(),
        matcher: RouteMatch {
            path,
            case_sensitive,
            headers,
            query_parameters: vec![],
            runtime_fraction: None,
            grpc: false,
            requires_tls: false,
        },
        action: RouteAction::Direct {
            status: 200,
            body: None,
        },
        headers: HeaderOps::default(),
        per_filter: Default::default(),
        faults: vec![],
    }
}

/// Virtual host `name` for `domains`, without routes or settings of its own.
pub(crate) fn virtual_host(name: &str, domains: &[&str]) -> VirtualHost {
    VirtualHost {
        name: name.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
        routes: vec![],
        clusters: Default::default(),
        headers: HeaderOps::default(),
        retry_policy: None,
        include_request_attempt_count: false,
        include_attempt_count_in_response: false,
        virtual_clusters: vec![],
        per_filter: Default::default(),
        faults: vec![],
    }
}

/// A server TLS context presenting an inline certificate, verifying no client.
pub(crate) fn downstream_tls() -> std::sync::Arc<super::tls::DownstreamTls> {
    use super::tls::{
        CertificateSource, CommonTls, DataSource, DownstreamTls, TlsCertificate, TlsVersion,
    };
    std::sync::Arc::new(DownstreamTls {
        sessions: Default::default(),
        common: CommonTls {
            certificate: Some(CertificateSource::Inline(TlsCertificate {
                certificate_chain: DataSource::File("/etc/certs/cert-chain.pem".into()),
                private_key: DataSource::File("/etc/certs/key.pem".into()),
            })),
            validation: None,
            alpn: vec![],
            min_version: TlsVersion::V1_2,
            max_version: TlsVersion::V1_3,
            cipher_suites: vec![],
            ecdh_curves: vec![],
        },
        require_client_certificate: false,
    })
}

/// A client TLS context with Envoy's defaults (no certificate, peer not verified).
pub(crate) fn upstream_tls() -> std::sync::Arc<super::tls::UpstreamTls> {
    use super::tls::{CommonTls, TlsVersion, UpstreamTls};
    std::sync::Arc::new(UpstreamTls {
        max_session_keys: 1,
        common: CommonTls {
            certificate: None,
            validation: None,
            alpn: vec![],
            min_version: TlsVersion::V1_2,
            max_version: TlsVersion::V1_2,
            cipher_suites: vec![],
            ecdh_curves: vec![],
        },
        sni: String::new(),
    })
}
