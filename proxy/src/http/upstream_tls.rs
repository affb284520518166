//! TLS origination, shared by tcp_proxy and the HTTP pool: which endpoints of a cluster are
//! dialled with TLS (its `transport_socket_matches` against the endpoint's
//! `envoy.transport_socket_match` metadata, then `transport_socket`), the handshake on a
//! connected socket within what is left of the cluster's `connect_timeout` (Envoy's timer runs
//! until the transport is up), and Envoy's `cluster.<name>.ssl.*` counters.
//!
//! A failure is a connect failure (`UF`): outlier detection and `upstream_cx_connect_fail`
//! hear of it as of a refused connect. A peer that fails verification is logged once, at
//! warn, naming the endpoint, what it presented and what was expected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::pool::{Transport, Transported, Wrapped};
use crate::model::canonical_addr;
use crate::model::tls::{Secrets, UpstreamTls};
use crate::rbac::PeerIdentity;
use crate::state::ClusterEntry;
use crate::stats::Stats;
use crate::tls::{ClientTls, HandshakeError, TlsContexts, TlsError};

/// Why a TLS session could not be set up (either side).
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    /// The context cannot be built (a secret not delivered, a bad certificate...).
    #[error("TLS context not usable: {0}")]
    Context(#[from] TlsError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The handshake did not finish in time.
    #[error("TLS handshake not done within {0:?}")]
    Timeout(Duration),
}

impl TlsFailure {
    /// The `ssl.<suffix>` counter it counts in, as Envoy names it.
    pub fn stat_suffix(&self) -> &'static str {
        match self {
            TlsFailure::Handshake(e) => e.stat_suffix(),
            TlsFailure::Context(_) | TlsFailure::Timeout(_) => "connection_error",
        }
    }

    /// A verification failure (the peer's certificate was refused), as opposed to a broken
    /// connection or configuration.
    pub fn is_verification(&self) -> bool {
        matches!(
            self,
            TlsFailure::Handshake(
                HandshakeError::San(_) | HandshakeError::Verify(_) | HandshakeError::NoCert
            )
        )
    }

    /// Count it under `scope` (`cluster.<name>` or `listener.<prefix>`) and log it, naming
    /// `peer`: verification failures at warn (someone presented the wrong identity), the
    /// rest at debug.
    pub fn report(&self, stats: &Stats, scope: &str, peer: SocketAddr) {
        stats
            .counter(&format!("{scope}.ssl.{}", self.stat_suffix()))
            .inc();
        if self.is_verification() {
            warn!(%peer, scope, error = %self, "TLS peer refused");
        } else {
            debug!(%peer, scope, error = %self, "TLS handshake failed");
        }
    }
}

/// The TLS context `addr` of `entry`'s cluster is dialled with, or `None` for plaintext. The
/// endpoint's metadata is looked up only when the cluster has `transport_socket_matches`;
/// targets outside the assignment (ORIGINAL_DST, DNS) match with no metadata.
pub fn endpoint_tls(entry: &ClusterEntry, addr: SocketAddr) -> Option<&Arc<UpstreamTls>> {
    transport_for(entry, &entry.cluster.transport, addr)
}

/// [`endpoint_tls`] for the HTTP pool: an auto_config cluster's contexts offer
/// `h2,http/1.1` where they set no ALPN of their own.
pub fn http_endpoint_tls(entry: &ClusterEntry, addr: SocketAddr) -> Option<&Arc<UpstreamTls>> {
    let transport = entry
        .cluster
        .upstream_http
        .auto_transport
        .as_deref()
        .unwrap_or(&entry.cluster.transport);
    transport_for(entry, transport, addr)
}

fn transport_for<'a>(
    entry: &ClusterEntry,
    transport: &'a crate::model::tls::ClusterTransport,
    addr: SocketAddr,
) -> Option<&'a Arc<UpstreamTls>> {
    if transport.matches.is_empty() {
        return transport.default.as_ref();
    }
    static NONE: std::sync::LazyLock<std::collections::BTreeMap<String, String>> =
        std::sync::LazyLock::new(Default::default);
    let addr = canonical_addr(addr);
    let metadata = entry
        .assignment
        .as_deref()
        .and_then(|a| {
            a.localities
                .iter()
                .flat_map(|l| &l.endpoints)
                .find(|e| canonical_addr(e.address) == addr)
        })
        .map_or(&*NONE, |e| &e.transport_socket_match);
    transport.for_endpoint(metadata)
}

/// A finished upstream TLS session.
#[derive(Debug)]
pub struct Originated {
    /// The session.
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The server's verified identity.
    pub peer: PeerIdentity,
    /// The application protocol ALPN selected.
    pub alpn: Option<Vec<u8>>,
}

/// TLS over `tcp` (connected to `addr` of `cluster`) with `tls`, within `budget`, counted in
/// `cluster.<cluster>.ssl.*` and logged on failure.
pub async fn originate(
    stats: &Stats,
    cluster: &str,
    tls: &ClientTls,
    tcp: TcpStream,
    addr: SocketAddr,
    budget: Duration,
) -> Result<Originated, TlsFailure> {
    let scope = format!("cluster.{cluster}");
    let done = tokio::time::timeout(budget, crate::tls::connect(tcp, tls, addr.ip())).await;
    let result = match done {
        Ok(Ok(h)) => Ok(Originated {
            stream: h.stream,
            peer: h.peer,
            alpn: h.alpn,
        }),
        Ok(Err(e)) => Err(TlsFailure::Handshake(e)),
        Err(_) => Err(TlsFailure::Timeout(budget)),
    };
    match &result {
        Ok(o) => {
            stats.counter(&format!("{scope}.ssl.handshake")).inc();
            for s in crate::tls::negotiated::stat_suffixes(o.stream.get_ref().1) {
                stats.counter(&format!("{scope}.ssl.{s}")).inc();
            }
            if o.stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                stats.counter(&format!("{scope}.ssl.session_reused")).inc();
            }
        }
        Err(e) => e.report(stats, &scope, addr),
    }
    result
}

/// The client configuration for `tls` over `secrets`, its failure counted and logged as a
/// failed handshake with `addr` of `cluster` would be.
pub fn client_config(
    contexts: &TlsContexts,
    stats: &Stats,
    cluster: &str,
    tls: &UpstreamTls,
    secrets: &Secrets,
    addr: SocketAddr,
) -> Result<ClientTls, TlsFailure> {
    contexts.client(tls, secrets).map_err(|e| {
        let e = TlsFailure::Context(e);
        e.report(stats, &format!("cluster.{cluster}"), addr);
        e
    })
}

/// The HTTP pool's [`Transport`] for one TLS context of one cluster.
pub struct TlsDial {
    tls: ClientTls,
    stats: Arc<Stats>,
    cluster: Arc<str>,
    budget: Duration,
}

impl TlsDial {
    /// Dial with `tls` for `cluster`, each handshake within `budget` (the connect timeout).
    pub fn new(tls: ClientTls, stats: Arc<Stats>, cluster: &str, budget: Duration) -> TlsDial {
        TlsDial {
            tls,
            stats,
            cluster: Arc::from(cluster),
            budget,
        }
    }
}

impl Transport for TlsDial {
    fn key(&self) -> u64 {
        // The context cache hands out one configuration per context and secrets: the same
        // configuration (the pointer, alive while any connection made with it is) means the
        // same certificates, roots, ALPN and SNI.
        Arc::as_ptr(&self.tls.config) as usize as u64
    }

    fn wrap(&self, tcp: TcpStream, addr: SocketAddr) -> Wrapped {
        let (tls, stats, cluster, budget) = (
            self.tls.clone(),
            self.stats.clone(),
            self.cluster.clone(),
            self.budget,
        );
        Box::pin(async move {
            let o = originate(&stats, &cluster, &tls, tcp, addr, budget).await?;
            Ok(Transported {
                stream: Box::new(o.stream),
                alpn: o.alpn,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::lb::HostRegistry;
    use crate::model::test_util::{assignment, static_cluster};
    use crate::model::tls::{ClusterTransport, CommonTls, TlsVersion, TransportMatch};
    use crate::model::{ClusterKind, HealthStatus, LbPolicy};

    fn tls(sni: &str) -> Arc<UpstreamTls> {
        Arc::new(UpstreamTls {
            max_session_keys: 1,
            common: CommonTls {
                certificate: None,
                validation: None,
                alpn: vec![],
                min_version: TlsVersion::V1_2,
                max_version: TlsVersion::V1_3,
                cipher_suites: vec![],
                ecdh_curves: vec![],
            },
            sni: sni.into(),
        })
    }

    /// A STATIC cluster over `labelled` (Istio's `tlsMode: istio`) and `plain` endpoints with
    /// `transport`.
    fn entry(transport: ClusterTransport, labelled: &str, plain: &str) -> ClusterEntry {
        let mut c = static_cluster("c", LbPolicy::RoundRobin, &[]);
        let mut a = assignment(
            "c",
            &[
                (labelled, HealthStatus::Healthy),
                (plain, HealthStatus::Healthy),
            ],
        );
        a.localities[0].endpoints[0].transport_socket_match =
            [("tlsMode".to_string(), "istio".to_string())].into();
        c.kind = ClusterKind::Static(a.clone());
        c.transport = transport;
        let stats = Arc::new(Stats::default());
        ClusterEntry::new(c, Some(Arc::new(a)), &HostRegistry::new(stats))
    }

    #[test]
    fn each_endpoint_gets_the_transport_its_metadata_selects() {
        let istio = ClusterTransport {
            matches: vec![
                TransportMatch {
                    name: "tlsMode-istio".into(),
                    criteria: [("tlsMode".to_string(), "istio".to_string())].into(),
                    tls: Some(tls("istio")),
                },
                TransportMatch {
                    name: "tlsMode-disabled".into(),
                    criteria: BTreeMap::new(),
                    tls: None,
                },
            ],
            default: None,
        };
        let e = entry(istio, "10.0.0.1:80", "10.0.0.2:80");
        let got = |a: &str| endpoint_tls(&e, a.parse().unwrap()).map(|t| t.sni.clone());
        assert_eq!(got("10.0.0.1:80").as_deref(), Some("istio"));
        // The same address v4-mapped is the same endpoint.
        assert_eq!(got("[::ffff:10.0.0.1]:80").as_deref(), Some("istio"));
        assert_eq!(got("10.0.0.2:80"), None);
        // Not in the assignment (ORIGINAL_DST-like): matched with no metadata.
        assert_eq!(got("10.9.9.9:80"), None);

        // Without matches, `transport_socket` applies to every endpoint, no lookup needed.
        let all = ClusterTransport {
            matches: vec![],
            default: Some(tls("all")),
        };
        let e = entry(all, "10.0.0.1:80", "10.0.0.2:80");
        assert_eq!(
            endpoint_tls(&e, "10.9.9.9:80".parse().unwrap()).map(|t| t.sni.as_str()),
            Some("all")
        );
    }

    #[test]
    fn failures_count_in_envoys_ssl_counters() {
        let stats = Stats::default();
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        TlsFailure::Timeout(Duration::from_secs(1)).report(&stats, "cluster.c", peer);
        TlsFailure::Handshake(HandshakeError::NoCert).report(&stats, "listener.l", peer);
        assert_eq!(stats.counter("cluster.c.ssl.connection_error").get(), 1);
        assert_eq!(stats.counter("listener.l.ssl.fail_verify_no_cert").get(), 1);
        assert!(TlsFailure::Handshake(HandshakeError::NoCert).is_verification());
        assert!(!TlsFailure::Timeout(Duration::from_secs(1)).is_verification());
    }
}
