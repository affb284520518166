//! TLS transport sockets (`envoy.transport_sockets.tls`) and secrets (SDS), validated.
//!
//! These types say *what* a connection's TLS must be; `crate::tls` turns them, together
//! with the secrets a snapshot holds, into rustls configurations at handshake time, so a
//! rotated secret reaches new connections while established ones keep their session.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core_v3;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::Any;

use super::{FieldError, ModelError};
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
    /// `trusted_ca`: PEM roots. With no roots from here or an SDS validation secret, the
    /// chain is not verified (Envoy's rule), and SAN matchers are refused (as Envoy refuses
    /// them).
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
    /// `tls_params.tls_maximum_protocol_version` (Envoy's default: 1.2 for clients, 1.3 for
    /// servers).
    pub max_version: TlsVersion,
    /// `tls_params.cipher_suites` (TLS 1.2 only, as in Envoy), each mapped to the rustls ring
    /// suite of that name; empty = rustls's defaults.
    pub cipher_suites: Vec<rustls::CipherSuite>,
    /// `tls_params.ecdh_curves`, mapped to rustls ring key-exchange groups; empty = defaults.
    pub ecdh_curves: Vec<rustls::NamedGroup>,
}

/// `UpstreamTlsContext`: how a cluster dials TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// `max_session_keys` (Envoy's default 1): sessions kept for resumption; 0 disables it.
    pub max_session_keys: u32,
    /// The common part.
    pub common: CommonTls,
    /// `sni`: the server name sent; empty = none.
    pub sni: String,
}

/// Which kinds of session resumption a server offers (Envoy offers both by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerSessions {
    /// Tickets (`disable_stateless_session_resumption` unset).
    pub stateless: bool,
    /// A server-side session cache (`disable_stateful_session_resumption` unset).
    pub stateful: bool,
}

impl Default for ServerSessions {
    fn default() -> Self {
        ServerSessions {
            stateless: true,
            stateful: true,
        }
    }
}

/// `DownstreamTlsContext`: how a filter chain terminates TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct DownstreamTls {
    /// Session resumption offered.
    pub sessions: ServerSessions,
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

impl CommonTls {
    /// Every secret this context refers to by SDS (certificate, then validation).
    pub fn sds_refs(&self) -> impl Iterator<Item = &SdsRef> {
        let cert = match &self.certificate {
            Some(CertificateSource::Sds(r)) => Some(r),
            _ => None,
        };
        cert.into_iter()
            .chain(self.validation.as_ref().and_then(|v| v.sds.as_ref()))
    }
}

impl ClusterTransport {
    /// Every secret the cluster's TLS sockets refer to by SDS.
    pub fn sds_refs(&self) -> impl Iterator<Item = &SdsRef> {
        self.default
            .iter()
            .chain(self.matches.iter().filter_map(|m| m.tls.as_ref()))
            .flat_map(|t| t.common.sds_refs())
    }
}

// === conversions from Envoy's protos ===

/// Type of `DownstreamTlsContext`.
pub const DOWNSTREAM_TLS_TYPE: &str =
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// Type of `UpstreamTlsContext`.
pub const UPSTREAM_TLS_TYPE: &str = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// Type URL of SDS resources (`tls.v3.Secret`).
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

use super::compat::{F_TLS_PARAMS, F_TLS_UNSUPPORTED};

/// A refusal of a TLS field by name: what was asked for, and the `model::compat` row that
/// lists it ([`F_TLS_UNSUPPORTED`]).
fn refuse(field: &str, what: &str) -> FieldError {
    FieldError::new(
        field,
        format!(
            "{what} is not supported by skiff (`{F_TLS_UNSUPPORTED}` in docs/COMPATIBILITY.md)"
        ),
    )
}

/// A `tls_params` value rustls cannot honour ([`F_TLS_PARAMS`]).
fn params_refusal(field: &str, what: String) -> FieldError {
    FieldError::new(
        field,
        format!("{what} is not supported by skiff (`{F_TLS_PARAMS}` in docs/COMPATIBILITY.md)"),
    )
}

impl DataSource {
    /// From `config.core.v3.DataSource`; environment variables are refused (skiff reads no
    /// environment for configuration).
    pub fn from_proto(d: &core_v3::DataSource) -> Result<DataSource, FieldError> {
        use core_v3::data_source::Specifier;
        if d.watched_directory.is_some() {
            return Err(refuse("watched_directory", "a watched directory"));
        }
        match &d.specifier {
            Some(Specifier::Filename(f)) if !f.is_empty() => Ok(DataSource::File(f.into())),
            Some(Specifier::Filename(_)) => Err(FieldError::new("filename", "must not be empty")),
            Some(Specifier::InlineBytes(b)) => Ok(DataSource::Inline(b.as_slice().into())),
            Some(Specifier::InlineString(s)) => Ok(DataSource::Inline(s.as_bytes().into())),
            Some(Specifier::EnvironmentVariable(_)) => Err(refuse(
                "environment_variable",
                "a data source read from the environment",
            )),
            None => Err(FieldError::new("specifier", "no data source set")),
        }
    }

    /// The inline bytes, if inline.
    pub fn inline(&self) -> Option<&[u8]> {
        match self {
            DataSource::Inline(b) => Some(b),
            DataSource::File(_) => None,
        }
    }
}

fn data_source(d: Option<&core_v3::DataSource>, field: &str) -> Result<DataSource, FieldError> {
    let d = d.ok_or_else(|| FieldError::new(field, "missing"))?;
    DataSource::from_proto(d).map_err(|e| e.within(field))
}

/// Checks inline PEM certificates now (a bad secret is NACKed by name, as Envoy does when it
/// builds the context); files are read when a TLS configuration is built.
fn check_certs(d: &DataSource, field: &str) -> Result<(), FieldError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let Some(pem) = d.inline() else {
        return Ok(());
    };
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem) {
        c.map_err(|e| FieldError::new(field, format!("not a PEM certificate: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(FieldError::new(field, "no PEM certificate in it"));
    }
    Ok(())
}

fn check_key(d: &DataSource, field: &str) -> Result<(), FieldError> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    match d.inline() {
        // The error names the field only: its text never carries key material.
        Some(pem) => PrivateKeyDer::from_pem_slice(pem).map(drop).map_err(|_| {
            FieldError::new(field, "no PEM private key (PKCS#8, PKCS#1 or SEC1) in it")
        }),
        None => Ok(()),
    }
}

impl TryFrom<&tls::TlsCertificate> for TlsCertificate {
    type Error = FieldError;
    fn try_from(c: &tls::TlsCertificate) -> Result<Self, FieldError> {
        if c.private_key_provider.is_some() {
            return Err(refuse("private_key_provider", "a private key provider"));
        }
        if c.pkcs12.is_some() {
            return Err(refuse("pkcs12", "PKCS#12 data"));
        }
        if c.password.is_some() {
            return Err(refuse("password", "an encrypted private key"));
        }
        if c.watched_directory.is_some() {
            return Err(refuse("watched_directory", "a watched directory"));
        }
        if c.tls_params.is_some() {
            return Err(refuse("tls_params", "per-certificate TLS parameters"));
        }
        // `ocsp_staple` and `signed_certificate_timestamp` are optional in Envoy: stapling is
        // lenient by default and skiff staples nothing.
        let certificate_chain = data_source(c.certificate_chain.as_ref(), "certificate_chain")?;
        check_certs(&certificate_chain, "certificate_chain")?;
        let private_key = data_source(c.private_key.as_ref(), "private_key")?;
        check_key(&private_key, "private_key")?;
        Ok(TlsCertificate {
            certificate_chain,
            private_key,
        })
    }
}

fn san_matcher(m: &tls::SubjectAltNameMatcher) -> Result<SanMatcher, FieldError> {
    use tls::subject_alt_name_matcher::SanType as T;
    let san_type = match T::try_from(m.san_type) {
        Ok(T::Uri) => SanType::Uri,
        Ok(T::Dns) => SanType::Dns,
        Ok(T::Email) => SanType::Email,
        Ok(T::IpAddress) => SanType::IpAddress,
        Ok(T::OtherName) => return Err(refuse("san_type", "OTHER_NAME SAN matching")),
        Ok(T::Unspecified) | Err(_) => {
            return Err(FieldError::new(
                "san_type",
                format!("{} is not a SAN type", m.san_type),
            ));
        }
    };
    let matcher = m
        .matcher
        .as_ref()
        .ok_or_else(|| FieldError::new("matcher", "missing"))
        .and_then(|s| string_match(s).map_err(|e| e.within("matcher")))?;
    Ok(SanMatcher { san_type, matcher })
}

/// `type.matcher.v3.StringMatcher` (as RBAC reads it; custom matchers refused).
fn string_match(m: &matcher::StringMatcher) -> Result<StringMatch, FieldError> {
    use crate::rbac::StringKind;
    use matcher::string_matcher::MatchPattern as P;
    let kind = match &m.match_pattern {
        Some(P::Exact(v)) => StringKind::Exact(v.clone()),
        Some(P::Prefix(v)) => StringKind::Prefix(v.clone()),
        Some(P::Suffix(v)) => StringKind::Suffix(v.clone()),
        Some(P::Contains(v)) => StringKind::Contains(v.clone()),
        Some(P::SafeRegex(r)) => StringKind::Regex(
            crate::rbac::compile_regex(&r.regex)
                .map_err(|e| FieldError::new("safe_regex", e.to_string()))?,
        ),
        Some(P::Custom(t)) => {
            return Err(refuse("custom", &format!("string matcher {:?}", t.name)));
        }
        None => return Err(FieldError::new("match_pattern", "no pattern set")),
    };
    Ok(StringMatch {
        kind,
        ignore_case: m.ignore_case,
    })
}

impl TryFrom<&tls::CertificateValidationContext> for ValidationContext {
    type Error = FieldError;
    #[allow(deprecated)]
    fn try_from(v: &tls::CertificateValidationContext) -> Result<Self, FieldError> {
        use tls::certificate_validation_context::TrustChainVerification;
        if v.ca_certificate_provider_instance.is_some() {
            return Err(refuse(
                "ca_certificate_provider_instance",
                "a certificate provider instance",
            ));
        }
        if v.system_root_certs.is_some() {
            return Err(refuse(
                "system_root_certs",
                "the system's root certificates",
            ));
        }
        if v.watched_directory.is_some() {
            return Err(refuse("watched_directory", "a watched directory"));
        }
        if !v.verify_certificate_spki.is_empty() {
            return Err(refuse("verify_certificate_spki", "SPKI pinning"));
        }
        if !v.verify_certificate_hash.is_empty() {
            return Err(refuse(
                "verify_certificate_hash",
                "certificate hash pinning",
            ));
        }
        if v.require_signed_certificate_timestamp
            .as_ref()
            .is_some_and(|b| b.value)
        {
            return Err(refuse(
                "require_signed_certificate_timestamp",
                "certificate transparency",
            ));
        }
        if v.crl.is_some() {
            return Err(refuse("crl", "certificate revocation lists"));
        }
        if v.allow_expired_certificate {
            return Err(refuse(
                "allow_expired_certificate",
                "accepting expired certificates",
            ));
        }
        if v.trust_chain_verification != TrustChainVerification::VerifyTrustChain as i32 {
            return Err(refuse(
                "trust_chain_verification",
                "a trust chain verification other than VERIFY_TRUST_CHAIN",
            ));
        }
        if v.custom_validator_config.is_some() {
            return Err(refuse(
                "custom_validator_config",
                "a custom certificate validator",
            ));
        }
        if v.max_verify_depth.is_some() {
            return Err(refuse("max_verify_depth", "a maximum verification depth"));
        }
        // `suppress_client_ca_list` and `only_verify_leaf_cert_crl` (CRLs are refused) change
        // nothing skiff does: rustls sends no CA list of its own accord only when asked, and
        // without CRLs there is nothing to scope.
        let trusted_ca = match &v.trusted_ca {
            Some(d) => {
                let d = DataSource::from_proto(d).map_err(|e| e.within("trusted_ca"))?;
                check_certs(&d, "trusted_ca")?;
                Some(d)
            }
            None => None,
        };
        let mut san_matchers = Vec::new();
        for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
            san_matchers.push(
                san_matcher(m)
                    .map_err(|e| e.within(format!("match_typed_subject_alt_names[{i}]")))?,
            );
        }
        for (i, m) in v.match_subject_alt_names.iter().enumerate() {
            san_matchers.push(SanMatcher {
                san_type: SanType::Any,
                matcher: string_match(m)
                    .map_err(|e| e.within(format!("match_subject_alt_names[{i}]")))?,
            });
        }
        Ok(ValidationContext {
            trusted_ca,
            san_matchers,
        })
    }
}

impl TryFrom<&tls::SdsSecretConfig> for SdsRef {
    type Error = FieldError;
    #[allow(deprecated)]
    fn try_from(c: &tls::SdsSecretConfig) -> Result<Self, FieldError> {
        use core_v3::config_source::ConfigSourceSpecifier as Spec;
        use core_v3::grpc_service::TargetSpecifier;
        if c.name.is_empty() {
            return Err(FieldError::new("name", "must not be empty"));
        }
        let source = match c
            .sds_config
            .as_ref()
            .and_then(|s| s.config_source_specifier.as_ref())
        {
            None => SdsSource::Static,
            Some(Spec::Ads(_)) => SdsSource::Ads,
            Some(Spec::ApiConfigSource(api)) => {
                // GRPC (2) and DELTA_GRPC (3): skiff's SDS client speaks the state of the world,
                // which every SDS server (Istio's agent included) serves on either.
                if !matches!(api.api_type, 2 | 3) {
                    return Err(refuse(
                        "sds_config.api_config_source.api_type",
                        "an SDS source other than GRPC",
                    ));
                }
                match api.grpc_services.as_slice() {
                    [one] => match &one.target_specifier {
                        Some(TargetSpecifier::EnvoyGrpc(e)) if !e.cluster_name.is_empty() => {
                            SdsSource::Grpc {
                                cluster: e.cluster_name.clone(),
                            }
                        }
                        Some(TargetSpecifier::GoogleGrpc(_)) => {
                            return Err(refuse(
                                "sds_config.api_config_source.grpc_services[0].google_grpc",
                                "google_grpc",
                            ));
                        }
                        _ => {
                            return Err(FieldError::new(
                                "sds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name",
                                "must name a cluster",
                            ));
                        }
                    },
                    _ => {
                        return Err(FieldError::new(
                            "sds_config.api_config_source.grpc_services",
                            "exactly one gRPC service is needed",
                        ));
                    }
                }
            }
            Some(Spec::Path(_) | Spec::PathConfigSource(_)) => {
                return Err(refuse("sds_config.path_config_source", "SDS from a file"));
            }
            Some(Spec::Self_(_)) => {
                return Err(refuse(
                    "sds_config.self",
                    "SDS from the same server as the resource",
                ));
            }
        };
        Ok(SdsRef {
            name: c.name.clone(),
            source,
        })
    }
}

/// OpenSSL/BoringSSL cipher names Envoy takes, and the rustls ring suite of each.
const CIPHERS: [(&str, rustls::CipherSuite); 6] = [
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// TLS 1.2 (and older) cipher names BoringSSL accepts that rustls's ring provider lacks.
const BORINGSSL_ONLY_CIPHERS: [&str; 14] = [
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-SHA",
    "AES256-SHA",
    "DES-CBC3-SHA",
    "ECDHE-PSK-AES128-CBC-SHA",
    "ECDHE-PSK-AES256-CBC-SHA",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "PSK-AES128-CBC-SHA",
    "PSK-AES256-CBC-SHA",
];

/// Envoy's curve names (with BoringSSL's aliases) and the rustls ring key-exchange group of
/// each.
const CURVES: [(&str, rustls::NamedGroup); 5] = [
    ("X25519", rustls::NamedGroup::X25519),
    ("P-256", rustls::NamedGroup::secp256r1),
    ("prime256v1", rustls::NamedGroup::secp256r1),
    ("P-384", rustls::NamedGroup::secp384r1),
    ("secp384r1", rustls::NamedGroup::secp384r1),
];

/// Curve names BoringSSL accepts that rustls's ring provider lacks.
const BORINGSSL_ONLY_CURVES: [&str; 6] = [
    "P-224",
    "P-521",
    "secp521r1",
    "X25519Kyber768Draft00",
    "X25519MLKEM768",
    "X25519MLKEM768Draft00",
];

/// `tls_params`: the version range clamped to what rustls has (1.2, 1.3), cipher suites and
/// curves mapped by name. `client`: Envoy's client default maximum is 1.2, the server's 1.3.
fn tls_params(
    p: Option<&tls::TlsParameters>,
    client: bool,
) -> Result<
    (
        TlsVersion,
        TlsVersion,
        Vec<rustls::CipherSuite>,
        Vec<rustls::NamedGroup>,
    ),
    FieldError,
> {
    let default_max = if client {
        TlsVersion::V1_2
    } else {
        TlsVersion::V1_3
    };
    let Some(p) = p else {
        return Ok((TlsVersion::V1_2, default_max, vec![], vec![]));
    };
    let name = |v: i32| {
        tls::tls_parameters::TlsProtocol::try_from(v)
            .map_or_else(|_| v.to_string(), |t| t.as_str_name().to_string())
    };
    let max = match p.tls_maximum_protocol_version {
        0 => default_max,
        3 => TlsVersion::V1_2,
        4 => TlsVersion::V1_3,
        v => {
            return Err(params_refusal(
                "tls_maximum_protocol_version",
                format!("{} (rustls speaks only TLSv1_2 and TLSv1_3)", name(v)),
            ));
        }
    };
    // A minimum below 1.2 is clamped: the range still contains 1.2 or 1.3.
    let min = match p.tls_minimum_protocol_version {
        0..=3 => TlsVersion::V1_2,
        4 => TlsVersion::V1_3,
        v => {
            return Err(params_refusal(
                "tls_minimum_protocol_version",
                format!("{} is not a TLS version", name(v)),
            ));
        }
    };
    if min > max {
        return Err(FieldError::new(
            "tls_minimum_protocol_version",
            format!(
                "{} is above tls_maximum_protocol_version {}",
                name(p.tls_minimum_protocol_version),
                name(p.tls_maximum_protocol_version)
            ),
        ));
    }
    // `cipher_suites` and `ecdh_curves` are allowlists: skiff negotiates only what they
    // name. A name BoringSSL knows but rustls's ring provider lacks (Istio's inbound default
    // lists `AES256-GCM-SHA384`, RSA key exchange) narrows the list further and is left out;
    // a name BoringSSL does not know is refused (as Envoy refuses it), and so is a list of
    // which rustls has nothing (no handshake Envoy would make could succeed).
    let mut ciphers = Vec::new();
    for (i, entry) in p.cipher_suites.iter().enumerate() {
        // BoringSSL's equal-preference groups: `[A|B]`.
        for c in entry.trim_matches(|c| c == '[' || c == ']').split('|') {
            match CIPHERS.iter().find(|(n, _)| *n == c) {
                Some((_, s)) => ciphers.push(*s),
                None if BORINGSSL_ONLY_CIPHERS.contains(&c) => {}
                None => {
                    return Err(params_refusal(
                        &format!("cipher_suites[{i}]"),
                        format!("cipher {c:?}, unknown to BoringSSL"),
                    ));
                }
            }
        }
    }
    if !p.cipher_suites.is_empty() && ciphers.is_empty() {
        return Err(params_refusal(
            "cipher_suites",
            format!(
                "a list without any cipher rustls's ring provider has ({})",
                CIPHERS.map(|c| c.0).join(", ")
            ),
        ));
    }
    let mut curves = Vec::new();
    for (i, c) in p.ecdh_curves.iter().enumerate() {
        match CURVES.iter().find(|(n, _)| n == c) {
            Some((_, g)) => curves.push(*g),
            None if BORINGSSL_ONLY_CURVES.contains(&c.as_str()) => {}
            None => {
                return Err(params_refusal(
                    &format!("ecdh_curves[{i}]"),
                    format!("curve {c:?}, unknown to BoringSSL"),
                ));
            }
        }
    }
    if !p.ecdh_curves.is_empty() && curves.is_empty() {
        return Err(params_refusal(
            "ecdh_curves",
            "a list without any curve rustls's ring provider has (X25519, P-256, P-384)".into(),
        ));
    }
    if !p.signature_algorithms.is_empty() {
        return Err(params_refusal(
            "signature_algorithms",
            "a signature algorithm list".into(),
        ));
    }
    if !p.compliance_policies.is_empty() {
        return Err(params_refusal(
            "compliance_policies",
            "a compliance policy".into(),
        ));
    }
    Ok((min, max, ciphers, curves))
}

impl CommonTls {
    /// `CommonTlsContext` of a client (`client`: Envoy's client defaults) or a server.
    pub fn from_proto(c: &tls::CommonTlsContext, client: bool) -> Result<CommonTls, FieldError> {
        use tls::common_tls_context::ValidationContextType as V;
        #[allow(deprecated)]
        {
            if c.tls_certificate_provider_instance.is_some()
                || c.tls_certificate_certificate_provider.is_some()
                || c.tls_certificate_certificate_provider_instance.is_some()
            {
                return Err(refuse(
                    "tls_certificate_provider_instance",
                    "a certificate provider instance",
                ));
            }
        }
        if c.custom_tls_certificate_selector.is_some() {
            return Err(refuse(
                "custom_tls_certificate_selector",
                "a custom certificate selector",
            ));
        }
        if c.custom_handshaker.is_some() {
            return Err(refuse("custom_handshaker", "a custom handshaker"));
        }
        if c.key_log.is_some() {
            return Err(refuse("key_log", "a TLS key log"));
        }
        let (min_version, max_version, cipher_suites, ecdh_curves) =
            tls_params(c.tls_params.as_ref(), client).map_err(|e| e.within("tls_params"))?;
        let certificate = match (
            c.tls_certificates.as_slice(),
            c.tls_certificate_sds_secret_configs.as_slice(),
        ) {
            ([], []) => None,
            ([one], []) => Some(CertificateSource::Inline(
                TlsCertificate::try_from(one).map_err(|e| e.within("tls_certificates[0]"))?,
            )),
            ([], [one]) => Some(CertificateSource::Sds(
                SdsRef::try_from(one)
                    .map_err(|e| e.within("tls_certificate_sds_secret_configs[0]"))?,
            )),
            ([_, ..], [_, ..]) => {
                return Err(refuse(
                    "tls_certificate_sds_secret_configs",
                    "certificates both inline and over SDS",
                ));
            }
            ([_, _, ..], _) => return Err(refuse("tls_certificates[1]", "a second certificate")),
            (_, _) => {
                return Err(refuse(
                    "tls_certificate_sds_secret_configs[1]",
                    "a second certificate",
                ));
            }
        };
        let validation = match &c.validation_context_type {
            None => None,
            Some(V::ValidationContext(v)) => Some(Validation {
                inline: ValidationContext::try_from(v)
                    .map_err(|e| e.within("validation_context"))?,
                sds: None,
            }),
            Some(V::ValidationContextSdsSecretConfig(s)) => Some(Validation {
                inline: ValidationContext::default(),
                sds: Some(
                    SdsRef::try_from(s)
                        .map_err(|e| e.within("validation_context_sds_secret_config"))?,
                ),
            }),
            Some(V::CombinedValidationContext(cv)) => {
                let at = "combined_validation_context";
                #[allow(deprecated)]
                if cv.validation_context_certificate_provider.is_some()
                    || cv
                        .validation_context_certificate_provider_instance
                        .is_some()
                {
                    return Err(refuse(
                        &format!("{at}.validation_context_certificate_provider_instance"),
                        "a certificate provider instance",
                    ));
                }
                let inline = match &cv.default_validation_context {
                    Some(v) => ValidationContext::try_from(v)
                        .map_err(|e| e.within("default_validation_context").within(at))?,
                    None => ValidationContext::default(),
                };
                let sds = cv
                    .validation_context_sds_secret_config
                    .as_ref()
                    .ok_or_else(|| {
                        FieldError::new(
                            format!("{at}.validation_context_sds_secret_config"),
                            "missing",
                        )
                    })
                    .and_then(|s| {
                        SdsRef::try_from(s).map_err(|e| {
                            e.within("validation_context_sds_secret_config").within(at)
                        })
                    })?;
                Some(Validation {
                    inline,
                    sds: Some(sds),
                })
            }
            #[allow(deprecated)]
            Some(V::ValidationContextCertificateProvider(_))
            | Some(V::ValidationContextCertificateProviderInstance(_)) => {
                return Err(refuse(
                    "validation_context_certificate_provider_instance",
                    "a certificate provider instance",
                ));
            }
        };
        Ok(CommonTls {
            certificate,
            validation,
            alpn: c.alpn_protocols.clone(),
            min_version,
            max_version,
            cipher_suites,
            ecdh_curves,
        })
    }
}

impl TryFrom<&tls::CommonTlsContext> for CommonTls {
    type Error = FieldError;
    /// With a server's defaults; [`UpstreamTls`] converts its own with a client's.
    fn try_from(c: &tls::CommonTlsContext) -> Result<Self, FieldError> {
        CommonTls::from_proto(c, false)
    }
}

impl TryFrom<&tls::UpstreamTlsContext> for UpstreamTls {
    type Error = FieldError;
    fn try_from(u: &tls::UpstreamTlsContext) -> Result<Self, FieldError> {
        if u.auto_host_sni {
            return Err(refuse("auto_host_sni", "SNI from the host name"));
        }
        if u.auto_sni_san_validation {
            return Err(refuse(
                "auto_sni_san_validation",
                "SAN validation against the SNI",
            ));
        }
        if u.allow_renegotiation {
            return Err(refuse("allow_renegotiation", "TLS renegotiation"));
        }
        // `enforce_rsa_key_usage` is optional in Envoy's terms: it tunes, it does not decide
        // who may connect.
        let common = match &u.common_tls_context {
            Some(c) => {
                CommonTls::from_proto(c, true).map_err(|e| e.within("common_tls_context"))?
            }
            None => CommonTls::from_proto(&Default::default(), true)?,
        };
        Ok(UpstreamTls {
            max_session_keys: u.max_session_keys.as_ref().map_or(1, |v| v.value),
            common,
            sni: u.sni.clone(),
        })
    }
}

impl TryFrom<&tls::DownstreamTlsContext> for DownstreamTls {
    type Error = FieldError;
    fn try_from(d: &tls::DownstreamTlsContext) -> Result<Self, FieldError> {
        use tls::downstream_tls_context::OcspStaplePolicy;
        if d.require_sni.as_ref().is_some_and(|b| b.value) {
            return Err(refuse("require_sni", "requiring SNI"));
        }
        if d.ocsp_staple_policy != OcspStaplePolicy::LenientStapling as i32 {
            return Err(refuse("ocsp_staple_policy", "strict OCSP stapling"));
        }
        // Session ticket keys, session timeouts and cipher preference are optional as in
        // Envoy: they tune resumption, not who may connect (tickets use keys of skiff's own,
        // so they resume on this process only). Which resumption is offered is honoured.
        let common = match &d.common_tls_context {
            Some(c) => {
                CommonTls::from_proto(c, false).map_err(|e| e.within("common_tls_context"))?
            }
            None => CommonTls::from_proto(&Default::default(), false)?,
        };
        if common.certificate.is_none() {
            return Err(FieldError::new(
                "common_tls_context.tls_certificates",
                "a server needs a certificate",
            ));
        }
        let require_client_certificate = d
            .require_client_certificate
            .as_ref()
            .is_some_and(|b| b.value);
        if require_client_certificate && common.validation.is_none() {
            return Err(FieldError::new(
                "require_client_certificate",
                "needs a validation context to check the client certificate against",
            ));
        }
        Ok(DownstreamTls {
            sessions: ServerSessions {
                stateless: !matches!(
                    d.session_ticket_keys_type,
                    Some(tls::downstream_tls_context::SessionTicketKeysType::DisableStatelessSessionResumption(true))
                ),
                stateful: !d.disable_stateful_session_resumption,
            },
            common,
            require_client_certificate,
        })
    }
}

impl TryFrom<&tls::Secret> for Secret {
    type Error = ModelError;
    fn try_from(s: &tls::Secret) -> Result<Self, ModelError> {
        use tls::secret::Type;
        let err = |e: FieldError| e.on("secret", &s.name);
        if s.name.is_empty() {
            return Err(err(FieldError::new("name", "must not be empty")));
        }
        let kind = match &s.r#type {
            Some(Type::TlsCertificate(c)) => SecretKind::Certificate(
                TlsCertificate::try_from(c).map_err(|e| err(e.within("tls_certificate")))?,
            ),
            Some(Type::ValidationContext(v)) => SecretKind::Validation(
                ValidationContext::try_from(v).map_err(|e| err(e.within("validation_context")))?,
            ),
            Some(Type::SessionTicketKeys(_)) => {
                return Err(err(refuse(
                    "session_ticket_keys",
                    "session ticket keys over SDS",
                )));
            }
            Some(Type::GenericSecret(_)) => {
                return Err(err(refuse("generic_secret", "a generic secret")));
            }
            None => return Err(err(FieldError::new("type", "no secret type set"))),
        };
        Ok(Secret {
            name: s.name.clone(),
            kind,
        })
    }
}

/// Plaintext or TLS: what a `transport_socket` asks for, after the compatibility table.
fn socket_type(ts: &core_v3::TransportSocket) -> Result<Option<&Any>, FieldError> {
    use super::compat::{self, Kind, Verdict};
    use core_v3::transport_socket::ConfigType;
    let (t, any) = match &ts.config_type {
        Some(ConfigType::TypedConfig(a)) => (compat::type_name(a), Some(a)),
        None => (String::new(), None),
    };
    match compat::classify(Kind::TransportSocket, &ts.name, &t, false) {
        Ok(Verdict::Run(e)) if e.type_name == compat::RAW_BUFFER_TYPE => Ok(None),
        Ok(Verdict::Run(_)) => match any {
            Some(a) => Ok(Some(a)),
            None => Err(FieldError::new(
                "typed_config",
                format!("transport socket {:?} needs a typed_config", ts.name),
            )),
        },
        Ok(Verdict::Skip(name)) => Err(FieldError::new(
            "",
            format!("transport socket {name:?} cannot be skipped"),
        )),
        Err(reason) => Err(FieldError::new("", reason.to_string())),
    }
}

fn decode_tls<M: prost::Message + Default>(any: &Any, want: &str) -> Result<M, FieldError> {
    let got = any.type_url.rsplit('/').next().unwrap_or("");
    if got != want {
        return Err(FieldError::new(
            "typed_config",
            format!("{got} where {want} is expected"),
        ));
    }
    M::decode(any.value.as_slice())
        .map_err(|e| FieldError::new("typed_config", format!("cannot decode {want}: {e}")))
}

/// A cluster's (or transport socket match's) `transport_socket`: `None` for raw buffer.
pub fn upstream_socket(
    ts: &core_v3::TransportSocket,
) -> Result<Option<Arc<UpstreamTls>>, FieldError> {
    let Some(any) = socket_type(ts)? else {
        return Ok(None);
    };
    let ctx: tls::UpstreamTlsContext = decode_tls(any, UPSTREAM_TLS_TYPE)?;
    UpstreamTls::try_from(&ctx)
        .map(|t| Some(Arc::new(t)))
        .map_err(|e| e.within("typed_config"))
}

/// A filter chain's `transport_socket`: `None` for raw buffer.
pub fn downstream_socket(
    ts: &core_v3::TransportSocket,
) -> Result<Option<Arc<DownstreamTls>>, FieldError> {
    let Some(any) = socket_type(ts)? else {
        return Ok(None);
    };
    let ctx: tls::DownstreamTlsContext = decode_tls(any, DOWNSTREAM_TLS_TYPE)?;
    DownstreamTls::try_from(&ctx)
        .map(|t| Some(Arc::new(t)))
        .map_err(|e| e.within("typed_config"))
}

/// A cluster's `transport_socket` and `transport_socket_matches`.
pub fn cluster_transport(
    default: Option<&core_v3::TransportSocket>,
    matches: &[envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch],
) -> Result<ClusterTransport, FieldError> {
    let default = match default {
        Some(ts) => upstream_socket(ts).map_err(|e| e.within("transport_socket"))?,
        None => None,
    };
    let mut out = Vec::with_capacity(matches.len());
    for (i, m) in matches.iter().enumerate() {
        let at = format!("transport_socket_matches[{i}]");
        let tls = match &m.transport_socket {
            Some(ts) => {
                upstream_socket(ts).map_err(|e| e.within("transport_socket").within(&at))?
            }
            None => None,
        };
        let criteria = m.r#match.as_ref().map(struct_strings).unwrap_or_default();
        out.push(TransportMatch {
            name: m.name.clone(),
            criteria,
            tls,
        });
    }
    Ok(ClusterTransport {
        matches: out,
        default,
    })
}

/// The entries of a `google.protobuf.Struct` as text: strings as they are, any other value as
/// its JSON text (both sides of a transport socket match are read the same way, so equal
/// values compare equal).
pub fn struct_strings(s: &envoy_types::pb::google::protobuf::Struct) -> BTreeMap<String, String> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value_text(v)))
        .collect()
}

fn value_text(v: &envoy_types::pb::google::protobuf::Value) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => value_json(v).to_string(),
    }
}

fn value_json(v: &envoy_types::pb::google::protobuf::Value) -> serde_json::Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value_json(v)))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        ),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(value_json).collect())
        }
    }
}

// === back to the wire (what `/config_dump` shows of secrets from other SDS sources) ===

impl From<&DataSource> for core_v3::DataSource {
    fn from(d: &DataSource) -> Self {
        use core_v3::data_source::Specifier;
        core_v3::DataSource {
            specifier: Some(match d {
                DataSource::Inline(b) => Specifier::InlineBytes(b.to_vec()),
                DataSource::File(p) => Specifier::Filename(p.display().to_string()),
            }),
            ..Default::default()
        }
    }
}

fn string_matcher(m: &StringMatch) -> matcher::StringMatcher {
    use crate::rbac::StringKind;
    use matcher::string_matcher::MatchPattern as P;
    let pattern = match &m.kind {
        StringKind::Exact(v) => P::Exact(v.clone()),
        StringKind::Prefix(v) => P::Prefix(v.clone()),
        StringKind::Suffix(v) => P::Suffix(v.clone()),
        StringKind::Contains(v) => P::Contains(v.clone()),
        // `compile_regex` anchors the configured expression as `^(?:RE)$`.
        StringKind::Regex(p) => {
            let full = p.0.as_str();
            let re = full
                .strip_prefix("^(?:")
                .and_then(|r| r.strip_suffix(")$"))
                .unwrap_or(full);
            P::SafeRegex(matcher::RegexMatcher {
                regex: re.to_string(),
                ..Default::default()
            })
        }
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: m.ignore_case,
    }
}

impl From<&Secret> for tls::Secret {
    #[allow(deprecated)]
    fn from(s: &Secret) -> Self {
        use tls::subject_alt_name_matcher::SanType as T;
        let r#type = match &s.kind {
            SecretKind::Certificate(c) => tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: Some((&c.certificate_chain).into()),
                private_key: Some((&c.private_key).into()),
                ..Default::default()
            }),
            SecretKind::Validation(v) => {
                let mut out = tls::CertificateValidationContext {
                    trusted_ca: v.trusted_ca.as_ref().map(Into::into),
                    ..Default::default()
                };
                for m in &v.san_matchers {
                    let san_type = match m.san_type {
                        SanType::Any => {
                            out.match_subject_alt_names.push(string_matcher(&m.matcher));
                            continue;
                        }
                        SanType::Uri => T::Uri,
                        SanType::Dns => T::Dns,
                        SanType::Email => T::Email,
                        SanType::IpAddress => T::IpAddress,
                    };
                    out.match_typed_subject_alt_names
                        .push(tls::SubjectAltNameMatcher {
                            san_type: san_type as i32,
                            matcher: Some(string_matcher(&m.matcher)),
                            oid: String::new(),
                        });
                }
                tls::secret::Type::ValidationContext(out)
            }
        };
        tls::Secret {
            name: s.name.clone(),
            r#type: Some(r#type),
        }
    }
}

#[cfg(test)]
mod tests;
