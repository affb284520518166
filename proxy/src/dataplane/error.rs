//! Why a connection ended without (or before the end of) its upstream, which side caused it,
//! and Envoy's response flags for it, so stats now and access logs later say the same thing.

use std::fmt;
use std::io;

use crate::accesslog::Record;
use crate::addr::EndpointAddr;
use crate::http::upstream_tls::TlsFailure;
use crate::lb::Overflow;
use crate::net::ConnectError;

/// Who caused a connection to fail (pingora's error source, Envoy's flag families).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client: it went away, reset, or its socket is unusable.
    Downstream,
    /// The upstream cluster or host: none available, overflow, connect failure, reset.
    Upstream,
    /// skiff's configuration has nothing (or nothing it runs) for this connection.
    Configuration,
}

impl Side {
    /// Lower-case name (log field value).
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Configuration => "configuration",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Envoy's response flags (`%RESPONSE_FLAGS%`) that skiff's connection path produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResponseFlag {
    /// `UH`: no healthy upstream host.
    NoHealthyUpstream,
    /// `UF`: upstream connection failure (refused, unreachable or timed out).
    UpstreamConnectionFailure,
    /// `UO`: upstream overflow (circuit breaker).
    UpstreamOverflow,
    /// `NR`: no route, and for a connection: no matching filter chain.
    NoRouteFound,
    /// `NC`: the upstream cluster does not exist.
    NoClusterFound,
    /// `URX`: the connect attempts (tcp_proxy's `max_connect_attempts`, 1) are used up.
    UpstreamRetryLimitExceeded,
    /// `DC`: the downstream connection ended (reset) mid-stream.
    DownstreamConnectionTermination,
    /// `UC`: the upstream connection ended (reset) mid-stream.
    UpstreamConnectionTermination,
}

impl ResponseFlag {
    /// Every flag, in the order Envoy prints them.
    pub const ALL: [ResponseFlag; 8] = [
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::NoRouteFound,
        ResponseFlag::NoClusterFound,
        ResponseFlag::UpstreamRetryLimitExceeded,
        ResponseFlag::DownstreamConnectionTermination,
        ResponseFlag::UpstreamConnectionTermination,
    ];

    /// Envoy's short form (`UF`).
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoRouteFound => "NR",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::UpstreamConnectionTermination => "UC",
        }
    }
}

/// Why one connection was closed early or ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The accepted socket is already unusable (no local address).
    #[error("accepted socket unusable: {0}")]
    Accept(#[source] io::Error),
    /// A connection made straight to the capture port, with no listener to serve it.
    #[error("no listener for this connection")]
    NoListener,
    /// No filter chain matched and the listener has no default chain.
    #[error("listener {listener}: no filter chain matches")]
    NoFilterChain {
        /// Listener.
        listener: String,
    },
    /// The chain's terminal filter is not run by skiff (yet).
    #[error("listener {listener}: filter {filter} is not served")]
    Unsupported {
        /// Listener.
        listener: String,
        /// Filter name.
        filter: String,
    },
    /// The chain names a cluster that does not exist (or weighted clusters that weigh 0).
    #[error("unknown cluster {cluster:?}")]
    NoCluster {
        /// Cluster.
        cluster: String,
    },
    /// The cluster has no host that may be used.
    #[error("cluster {cluster}: no healthy upstream")]
    NoHealthyUpstream {
        /// Cluster.
        cluster: String,
    },
    /// An ORIGINAL_DST cluster, but the connection has no original destination.
    #[error("cluster {cluster}: connection has no original destination")]
    NoOriginalDst {
        /// Cluster.
        cluster: String,
    },
    /// A DNS cluster's host name did not resolve.
    #[error("cluster {cluster}: {host}:{port} does not resolve")]
    Unresolved {
        /// Cluster.
        cluster: String,
        /// Host name.
        host: String,
        /// Port.
        port: u16,
    },
    /// The cluster's `max_connections` circuit breaker is open.
    #[error(transparent)]
    Overflow(#[from] Overflow),
    /// The upstream connect failed or timed out.
    #[error("cluster {cluster}: {source}")]
    Connect {
        /// Cluster.
        cluster: String,
        /// Cause.
        source: ConnectError,
    },
    /// The upstream connected, but its TLS session could not be set up (a connect failure,
    /// as Envoy counts one: the transport is part of the connection).
    #[error("cluster {cluster}: TLS to {addr}: {source}")]
    UpstreamTls {
        /// Cluster.
        cluster: String,
        /// Endpoint.
        addr: EndpointAddr,
        /// Cause (boxed: rare, and large beside the other errors).
        source: Box<TlsFailure>,
    },
    /// The chosen filter chain terminates TLS and the client's handshake failed (closed
    /// before any network filter ran).
    #[error("listener {listener}: downstream TLS: {source}")]
    DownstreamTls {
        /// Listener.
        listener: String,
        /// Cause (boxed: rare, and large beside the other errors).
        source: Box<TlsFailure>,
    },
    /// A network RBAC filter of the chain denied the connection (closed before any upstream
    /// connect). Envoy sets no response flag for it, only this termination detail.
    #[error("listener {listener}: connection denied by {filter} ({detail})")]
    RbacDenied {
        /// Listener.
        listener: String,
        /// The RBAC filter's name.
        filter: String,
        /// Envoy's connection termination details:
        /// `rbac_access_denied_matched_policy[<policy or none>]`.
        detail: String,
    },
    /// The listener filters (tls_inspector, http_inspector) did not decide within the
    /// listener's `listener_filters_timeout`, and it does not continue on timeout (Envoy's
    /// `downstream_pre_cx_timeout`).
    #[error("listener {listener}: listener filters timed out waiting for the first bytes")]
    ListenerFilterTimeout {
        /// Listener.
        listener: String,
    },
    /// The tls_inspector saw a ClientHello larger than it reads (Envoy closes the connection,
    /// `tls_inspector.client_hello_too_large`).
    #[error("listener {listener}: TLS ClientHello larger than {max} bytes")]
    ClientHelloTooLarge {
        /// Listener.
        listener: String,
        /// The inspector's limit.
        max: usize,
    },
    /// The byte copy ended with an error on one side's socket.
    #[error("{side} connection failed mid-stream: {source}")]
    Stream {
        /// The side whose socket failed.
        side: Side,
        /// Cause.
        source: io::Error,
    },
}

impl ConnError {
    /// What this error tells an access-log record: flags, details, the cluster and host it
    /// was about (TCP; Envoy's tcp_proxy and listener wording).
    pub fn log_into(&self, r: &mut Record) {
        let e = self;
        r.response_flags = e.flags().iter().map(|f| f.as_str()).collect();
        match e {
            ConnError::NoFilterChain { .. } | ConnError::NoListener => {
                r.response_code_details = Some("filter_chain_not_found".into());
            }
            ConnError::RbacDenied { detail, .. } => {
                r.connection_termination_details = Some(detail.clone());
            }
            ConnError::Connect { cluster, source } => {
                r.upstream_cluster.get_or_insert_with(|| cluster.clone());
                r.upstream_transport_failure_reason =
                    Some(crate::accesslog::connect_failure_reason(source));
            }
            ConnError::UpstreamTls {
                cluster,
                addr,
                source,
            } => {
                r.upstream_cluster.get_or_insert_with(|| cluster.clone());
                r.upstream_host.get_or_insert(addr.get());
                r.upstream_transport_failure_reason = Some(source.to_string().replace(' ', "_"));
            }
            ConnError::NoHealthyUpstream { cluster }
            | ConnError::NoOriginalDst { cluster }
            | ConnError::Unresolved { cluster, .. }
            | ConnError::NoCluster { cluster } => {
                r.upstream_cluster.get_or_insert_with(|| cluster.clone());
            }
            ConnError::Overflow(o) => {
                r.upstream_cluster.get_or_insert_with(|| o.cluster.clone());
            }
            _ => {}
        }
    }

    /// Who caused it.
    pub fn side(&self) -> Side {
        match self {
            // The client is not allowed here: a downstream outcome, as Envoy counts it under
            // the downstream connection.
            ConnError::Accept(_)
            | ConnError::RbacDenied { .. }
            | ConnError::ListenerFilterTimeout { .. }
            | ConnError::ClientHelloTooLarge { .. }
            | ConnError::DownstreamTls { .. } => Side::Downstream,
            ConnError::NoListener
            | ConnError::NoFilterChain { .. }
            | ConnError::Unsupported { .. }
            | ConnError::NoCluster { .. } => Side::Configuration,
            ConnError::NoHealthyUpstream { .. }
            | ConnError::NoOriginalDst { .. }
            | ConnError::Unresolved { .. }
            | ConnError::Overflow(_)
            | ConnError::Connect { .. }
            | ConnError::UpstreamTls { .. } => Side::Upstream,
            ConnError::Stream { side, .. } => *side,
        }
    }

    /// Envoy's response flags for it, in Envoy's order.
    pub fn flags(&self) -> &'static [ResponseFlag] {
        use ResponseFlag::*;
        match self {
            ConnError::Accept(_) => &[DownstreamConnectionTermination],
            // Closed before a filter chain was chosen: Envoy logs no flag for these.
            ConnError::RbacDenied { .. }
            | ConnError::ListenerFilterTimeout { .. }
            | ConnError::ClientHelloTooLarge { .. }
            | ConnError::DownstreamTls { .. } => &[],
            ConnError::NoListener
            | ConnError::NoFilterChain { .. }
            | ConnError::Unsupported { .. } => &[NoRouteFound],
            ConnError::NoCluster { .. } => &[NoClusterFound],
            // Envoy's ORIGINAL_DST and DNS balancers find no host: UH, like an empty cluster.
            ConnError::NoHealthyUpstream { .. }
            | ConnError::NoOriginalDst { .. }
            | ConnError::Unresolved { .. } => &[NoHealthyUpstream],
            ConnError::Overflow(_) => &[UpstreamOverflow],
            // tcp_proxy makes one connect attempt by default: a failed one also exhausts them,
            // which Envoy reports as `UF,URX` (a connect timeout too: UT is HTTP's).
            ConnError::Connect { .. } | ConnError::UpstreamTls { .. } => {
                &[UpstreamConnectionFailure, UpstreamRetryLimitExceeded]
            }
            ConnError::Stream { side, .. } => match side {
                Side::Downstream => &[DownstreamConnectionTermination],
                _ => &[UpstreamConnectionTermination],
            },
        }
    }

    /// Envoy's `%RESPONSE_FLAGS%` string (`UF,URX`), `-` when none.
    pub fn response_flags(&self) -> &'static str {
        use ResponseFlag::*;
        match self.flags() {
            [] => "-",
            [UpstreamConnectionFailure, UpstreamRetryLimitExceeded] => "UF,URX",
            [one] => one.as_str(),
            // Only the pairs above exist; a new one must be spelled out there.
            _ => "-",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_sides_follow_envoy() {
        let cases: Vec<(ConnError, Side, &str)> = vec![
            (ConnError::NoListener, Side::Configuration, "NR"),
            (
                ConnError::NoFilterChain {
                    listener: "l".into(),
                },
                Side::Configuration,
                "NR",
            ),
            (
                ConnError::NoCluster {
                    cluster: "c".into(),
                },
                Side::Configuration,
                "NC",
            ),
            (
                ConnError::NoHealthyUpstream {
                    cluster: "c".into(),
                },
                Side::Upstream,
                "UH",
            ),
            (
                ConnError::Overflow(Overflow {
                    cluster: "c".into(),
                    resource: crate::lb::Resource::Connections,
                    limit: 1,
                }),
                Side::Upstream,
                "UO",
            ),
            (
                ConnError::Connect {
                    cluster: "c".into(),
                    source: ConnectError::Timeout {
                        addr: crate::addr::EndpointAddr("127.0.0.1:1".parse().unwrap()),
                        timeout: std::time::Duration::from_secs(1),
                    },
                },
                Side::Upstream,
                "UF,URX",
            ),
            (
                ConnError::RbacDenied {
                    listener: "l".into(),
                    filter: "envoy.filters.network.rbac".into(),
                    detail: "rbac_access_denied_matched_policy[none]".into(),
                },
                Side::Downstream,
                "-",
            ),
            (
                ConnError::UpstreamTls {
                    cluster: "c".into(),
                    addr: EndpointAddr("127.0.0.1:1".parse().unwrap()),
                    source: Box::new(TlsFailure::Timeout(std::time::Duration::from_secs(1))),
                },
                Side::Upstream,
                "UF,URX",
            ),
            (
                ConnError::DownstreamTls {
                    listener: "l".into(),
                    source: Box::new(TlsFailure::Timeout(std::time::Duration::from_secs(1))),
                },
                Side::Downstream,
                "-",
            ),
            (
                ConnError::ListenerFilterTimeout {
                    listener: "l".into(),
                },
                Side::Downstream,
                "-",
            ),
            (
                ConnError::Stream {
                    side: Side::Downstream,
                    source: io::ErrorKind::ConnectionReset.into(),
                },
                Side::Downstream,
                "DC",
            ),
            (
                ConnError::Stream {
                    side: Side::Upstream,
                    source: io::ErrorKind::ConnectionReset.into(),
                },
                Side::Upstream,
                "UC",
            ),
        ];
        for (e, side, flags) in cases {
            assert_eq!(e.side(), side, "{e}");
            assert_eq!(e.response_flags(), flags, "{e}");
        }
    }

    #[test]
    fn every_flag_string_is_distinct() {
        let mut names: Vec<&str> = ResponseFlag::ALL.iter().map(|f| f.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ResponseFlag::ALL.len());
    }

    /// A listener without a matching chain logs as Envoy's does for TCP:
    /// `L 0 NR filter_chain_not_found - - - - - 0 -`.
    #[test]
    fn a_connection_error_fills_the_access_log_record_as_envoy_does() {
        let mut tcp = crate::accesslog::Record::default();
        ConnError::NoFilterChain {
            listener: "l".into(),
        }
        .log_into(&mut tcp);
        let fmt = "L %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %PROTOCOL% %REQ(:METHOD)% %ROUTE_NAME% %BYTES_SENT% %CONNECTION_TERMINATION_DETAILS%\n";
        let mut line = String::new();
        crate::accesslog::format::Template::parse(fmt)
            .unwrap()
            .render(&tcp, &mut line);
        assert_eq!(line, "L 0 NR filter_chain_not_found - - - - - 0 -\n");
    }
}
