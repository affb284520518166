//! TLS transport sockets (`envoy.transport_sockets.tls`) and secrets (SDS), validated.
//!
//! These types say *what* a connection's TLS must be; `crate::tls` turns them, together
//! with the secrets a snapshot holds, into rustls configurations at handshake time, so a
//! rotated secret reaches new connections while established ones keep their session.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::rbac::StringMatch;

/// Bytes given inline or read from a file (`config.core.v3.DataSource`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DataSource {
    /// `inline_bytes` / `inline_string`.
    Inline(Arc<[u8]>),
    /// `filename`: read when a TLS configuration is built (Envoy reads it at load time too).
    File(PathBuf),
}

/// Every secret a snapshot knows, by name (SDS over ADS, SDS over a gRPC cluster such as
/// Istio's Unix socket, and the bootstrap's static secrets share one namespace, as in Istio).
pub type Secrets = BTreeMap<String, Arc<Secret>>;

/// A `tls.v3.Secret`: what SDS, or the bootstrap's `static_resources.secrets`, delivers.
#[derive(Debug, Clone, PartialEq)]
pub struct Secret {
    /// The secret's name (Istio: `default` for the workload certificate, `ROOTCA`).
    pub name: String,
    /// Its content.
    pub kind: SecretKind,
}

/// What a secret carries.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretKind {
    /// `tls_certificate`: a certificate chain and its private key.
    Certificate(TlsCertificate),
    /// `validation_context`: trust anchors and peer checks.
    Validation(ValidationContext),
}

/// `TlsCertificate`: a PEM certificate chain (leaf first) and its PEM private key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsCertificate {
    /// `certificate_chain`.
    pub certificate_chain: DataSource,
    /// `private_key`.
    pub private_key: DataSource,
}

/// `CertificateValidationContext`, the parts skiff honours.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValidationContext {
    /// `trusted_ca`: PEM roots; `None` accepts no peer certificate at all unless another
    /// part (an SDS validation secret) supplies roots.
    pub trusted_ca: Option<DataSource>,
    /// `match_typed_subject_alt_names` (and the deprecated `match_subject_alt_names`, which
    /// matches any SAN type): the peer must present a SAN matching one of these; empty = any.
    pub san_matchers: Vec<SanMatcher>,
}

/// One `SubjectAltNameMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct SanMatcher {
    /// Which SANs it looks at.
    pub san_type: SanType,
    /// The test.
    pub matcher: StringMatch,
}

/// `SubjectAltNameMatcher.san_type`; `Any` for the untyped `match_subject_alt_names`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SanType {
    /// Every SAN type (the deprecated untyped field).
    Any,
    /// `URI` (SPIFFE identities).
    Uri,
    /// `DNS`.
    Dns,
    /// `EMAIL`.
    Email,
    /// `IP_ADDRESS`.
    IpAddress,
}

/// Where an SDS secret is fetched from (`sds_config`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SdsSource {
    /// `ads: {}`: over the ADS stream.
    Ads,
    /// `api_config_source` gRPC to a bootstrap cluster (Istio: `sds-grpc`, a Unix socket).
    Grpc {
        /// `envoy_grpc.cluster_name`.
        cluster: String,
    },
    /// No `sds_config`: a static secret of the bootstrap, by name.
    Static,
}

/// A secret by reference (`SdsSecretConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SdsRef {
    /// Secret name.
    pub name: String,
    /// Where it comes from.
    pub source: SdsSource,
}

/// A certificate: inline or by SDS reference.
#[derive(Debug, Clone, PartialEq)]
pub enum CertificateSource {
    /// `tls_certificates[0]`.
    Inline(TlsCertificate),
    /// `tls_certificate_sds_secret_configs[0]`.
    Sds(SdsRef),
}

/// The validation of the peer: inline, by SDS, or both (`combined_validation_context`:
/// Istio's SAN matchers inline, its `ROOTCA` over SDS).
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    /// `validation_context`, or `combined_validation_context.default_validation_context`.
    pub inline: ValidationContext,
    /// `validation_context_sds_secret_config`, or the combined one's SDS part; its secret's
    /// roots and matchers are added to the inline ones.
    pub sds: Option<SdsRef>,
}

/// TLS protocol versions (`tls_params`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TlsVersion {
    /// TLSv1.2.
    V1_2,
    /// TLSv1.3.
    V1_3,
}

/// `CommonTlsContext`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonTls {
    /// The certificate this side presents; `None`: none (a client without one, plain TLS).
    pub certificate: Option<CertificateSource>,
    /// How the peer is verified; `None`: the peer is not verified (Envoy's default when no
    /// validation context is configured).
    pub validation: Option<Validation>,
    /// `alpn_protocols`, in preference order.
    pub alpn: Vec<String>,
    /// `tls_params.tls_minimum_protocol_version` (Envoy's default for clients and servers: 1.2).
    pub min_version: TlsVersion,
    /// `tls_params.tls_maximum_protocol_version` (default 1.3).
    pub max_version: TlsVersion,
}

/// `UpstreamTlsContext`: how a cluster dials TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// The common part.
    pub common: CommonTls,
    /// `sni`: the server name sent; empty = none.
    pub sni: String,
}

/// `DownstreamTlsContext`: how a filter chain terminates TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct DownstreamTls {
    /// The common part (a server certificate is required).
    pub common: CommonTls,
    /// `require_client_certificate`.
    pub require_client_certificate: bool,
}

/// How a cluster dials an endpoint: its `transport_socket_matches`, then `transport_socket`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterTransport {
    /// `transport_socket_matches`, in order: the first whose criteria are a subset of the
    /// endpoint's `envoy.transport_socket_match` metadata applies.
    pub matches: Vec<TransportMatch>,
    /// `transport_socket`: TLS, or `None` for raw buffer.
    pub default: Option<Arc<UpstreamTls>>,
}

/// One `TransportSocketMatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportMatch {
    /// `name`.
    pub name: String,
    /// `match`: metadata keys and their values (non-string values as JSON text).
    pub criteria: BTreeMap<String, String>,
    /// Its socket: TLS, or `None` for raw buffer.
    pub tls: Option<Arc<UpstreamTls>>,
}

impl ClusterTransport {
    /// The TLS an endpoint with `metadata` (its `envoy.transport_socket_match` entries) is
    /// dialled with, or `None` for plaintext, as Envoy chooses.
    pub fn for_endpoint(&self, metadata: &BTreeMap<String, String>) -> Option<&Arc<UpstreamTls>> {
        self.matches
            .iter()
            .find(|m| m.criteria.iter().all(|(k, v)| metadata.get(k) == Some(v)))
            .map_or(self.default.as_ref(), |m| m.tls.as_ref())
    }

    /// Whether any endpoint of the cluster may be dialled with TLS.
    pub fn may_use_tls(&self) -> bool {
        self.default.is_some() || self.matches.iter().any(|m| m.tls.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> Arc<UpstreamTls> {
        Arc::new(UpstreamTls {
            common: CommonTls {
                certificate: None,
                validation: None,
                alpn: vec![],
                min_version: TlsVersion::V1_2,
                max_version: TlsVersion::V1_3,
            },
            sni: String::new(),
        })
    }

    #[test]
    fn istio_tls_mode_selects_mtls_only_for_labelled_endpoints() {
        let t = ClusterTransport {
            matches: vec![
                TransportMatch {
                    name: "tlsMode-istio".into(),
                    criteria: [("tlsMode".to_string(), "istio".to_string())].into(),
                    tls: Some(tls()),
                },
                TransportMatch {
                    name: "tlsMode-disabled".into(),
                    criteria: BTreeMap::new(),
                    tls: None,
                },
            ],
            default: None,
        };
        let istio = [("tlsMode".to_string(), "istio".to_string())].into();
        assert!(t.for_endpoint(&istio).is_some());
        assert!(t.for_endpoint(&BTreeMap::new()).is_none());
        assert!(t.may_use_tls());
        assert!(!ClusterTransport::default().may_use_tls());
    }
}
