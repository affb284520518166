//! Peer verification as Envoy's `DefaultCertValidator` does it, not as a browser would.
//!
//! A chain to the trusted CA, then the SAN matchers over the leaf's SANs; the name the
//! client dialled (SNI) is never compared with the certificate, which is what lets SPIFFE
//! certificates (one URI SAN, no DNS name) work. A validation context without a CA (and
//! so, as Envoy requires, without SAN matchers) verifies nothing; neither does no validation
//! context. The handshake signatures are always verified, so the peer holds the key of the
//! certificate it presented.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::identity::{San, sans};
use crate::model::tls::{SanMatcher, SanType};
use crate::rbac::{StringKind, StringMatch};

/// The checks a validation context asks of the peer's certificate.
#[derive(Debug, Clone)]
pub(crate) struct PeerCheck {
    /// Trust anchors; `None`: the chain is not verified (Envoy, `trusted_ca` unset; never
    /// with SAN matchers, which need a CA, as Envoy's configuration check says).
    pub(crate) roots: Option<Arc<RootCertStore>>,
    /// Inline and SDS matchers; empty: any SAN.
    pub(crate) san_matchers: Vec<SanMatcher>,
}

/// The peer's certificate chains to a trusted root, but none of its SANs matches
/// (Envoy's `ssl.fail_verify_san`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMismatch {
    /// What the peer presented (`URI:spiffe://...`, `DNS:...`).
    pub presented: Vec<String>,
    /// The matchers none of them satisfied.
    pub wanted: Vec<String>,
}

impl fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer certificate SANs [{}] match none of [{}]",
            self.presented.join(", "),
            self.wanted.join(", ")
        )
    }
}

impl std::error::Error for SanMismatch {}

/// The peer's certificate does not chain to a trusted root, is expired, has the wrong key
/// usage... (Envoy's `ssl.fail_verify_error`); the SANs say who it claimed to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRejected {
    /// What webpki found wrong.
    pub reason: String,
    /// What the peer presented (`URI:spiffe://...`), empty if it did not parse.
    pub presented: Vec<String>,
}

impl fmt::Display for ChainRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer certificate rejected: {}; it presented SANs [{}]",
            self.reason,
            self.presented.join(", ")
        )
    }
}

impl std::error::Error for ChainRejected {}

/// A chain failure, carrying the peer's SANs to the handshake error and its log line.
fn chain_rejected(err: rustls::Error, end_entity: &CertificateDer<'_>) -> rustls::Error {
    let rustls::Error::InvalidCertificate(reason) = err else {
        return err;
    };
    let presented = x509_parser::parse_x509_certificate(end_entity)
        .map(|(_, cert)| sans(&cert).iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    let rejected = ChainRejected {
        reason: reason.to_string(),
        presented,
    };
    CertificateError::Other(OtherError(Arc::new(rejected))).into()
}

impl PeerCheck {
    /// The SAN matchers, after the chain (checked by the caller) is known good.
    fn check_sans(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.san_matchers.is_empty() {
            return Ok(());
        }
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| CertificateError::BadEncoding)?;
        let presented = sans(&cert);
        let ok = presented
            .iter()
            .any(|s| self.san_matchers.iter().any(|m| san_matches(m, s)));
        if ok {
            return Ok(());
        }
        let mismatch = SanMismatch {
            presented: presented.iter().map(ToString::to_string).collect(),
            wanted: self.san_matchers.iter().map(describe).collect(),
        };
        Err(CertificateError::Other(OtherError(Arc::new(mismatch))).into())
    }
}

/// Envoy's `SanMatcher::match`: a matcher sees only SANs of its type; an `exact` matcher on
/// DNS SANs follows DNS rules (case-insensitive, a `*.` SAN covers one label).
fn san_matches(m: &SanMatcher, san: &San<'_>) -> bool {
    match (m.san_type, san) {
        (SanType::Dns | SanType::Any, San::Dns(s)) => match &m.matcher.kind {
            StringKind::Exact(want) => dns_name_match(want, s),
            _ => m.matcher.matches(s),
        },
        (SanType::Uri | SanType::Any, San::Uri(s))
        | (SanType::Email | SanType::Any, San::Email(s)) => m.matcher.matches(s),
        (SanType::IpAddress | SanType::Any, San::Ip(ip)) => m.matcher.matches(&ip.to_string()),
        _ => false,
    }
}

/// Envoy's `Utility::dnsNameMatch(dns_name, pattern)`.
fn dns_name_match(name: &str, pattern: &str) -> bool {
    let (name, pattern) = (name.to_ascii_lowercase(), pattern.to_ascii_lowercase());
    if name == pattern {
        return true;
    }
    let Some(suffix) = pattern.strip_prefix('*') else {
        return false;
    };
    if !suffix.starts_with('.') || name.len() <= suffix.len() {
        return false;
    }
    let (head, tail) = name.split_at(name.len() - suffix.len());
    tail == suffix && !head.contains('.')
}

fn describe(m: &SanMatcher) -> String {
    let ty = match m.san_type {
        SanType::Any => "any",
        SanType::Uri => "URI",
        SanType::Dns => "DNS",
        SanType::Email => "email",
        SanType::IpAddress => "IP",
    };
    format!("{ty} {}", describe_string(&m.matcher))
}

fn describe_string(m: &StringMatch) -> String {
    let (op, v) = match &m.kind {
        StringKind::Exact(v) => ("exact", v.as_str()),
        StringKind::Prefix(v) => ("prefix", v.as_str()),
        StringKind::Suffix(v) => ("suffix", v.as_str()),
        StringKind::Contains(v) => ("contains", v.as_str()),
        StringKind::Regex(p) => ("regex", p.0.as_str()),
    };
    let ic = if m.ignore_case { " (ignore case)" } else { "" };
    format!("{op} {v:?}{ic}")
}

// === impl ServerVerifier ===

/// How a client checks the server: `check` `None` accepts any certificate.
#[derive(Debug)]
pub(crate) struct ServerVerifier {
    pub(crate) check: Option<PeerCheck>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(check) = &self.check else {
            return Ok(ServerCertVerified::assertion());
        };
        if let Some(roots) = &check.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algs.all,
            )
            .map_err(|e| chain_rejected(e, end_entity))?;
        }
        check.check_sans(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// === impl ClientVerifier ===

/// How a server checks clients when its context has a validation context: a certificate
/// is requested, and mandatory with `require_client_certificate` or SAN matchers (Envoy).
#[derive(Debug)]
pub(crate) struct ClientVerifier {
    check: PeerCheck,
    /// rustls's chain check with the client-auth key usage, when there are roots.
    chain: Option<Arc<dyn ClientCertVerifier>>,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientVerifier {
    /// A verifier for `check`; `require` is `require_client_certificate`.
    pub(crate) fn new(
        check: PeerCheck,
        require: bool,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let chain = match &check.roots {
            Some(roots) => Some(
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?,
            ),
            None => None,
        };
        Ok(ClientVerifier {
            mandatory: require || !check.san_matchers.is_empty(),
            check,
            chain,
            algs: provider.signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Envoy sets no client CA list either: clients send the one certificate they have.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Some(chain) = &self.chain {
            chain
                .verify_client_cert(end_entity, intermediates, now)
                .map_err(|e| chain_rejected(e, end_entity))?;
        }
        self.check.check_sans(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_exact_matcher_follows_envoy_wildcards() {
        assert!(dns_name_match("foo.example.com", "foo.example.com"));
        assert!(dns_name_match("FOO.example.com", "foo.EXAMPLE.com"));
        assert!(dns_name_match("foo.example.com", "*.example.com"));
        assert!(!dns_name_match("a.foo.example.com", "*.example.com"));
        assert!(!dns_name_match("example.com", "*.example.com"));
        assert!(!dns_name_match("foo.example.com", "*example.com"));
    }

    fn matcher(san_type: SanType, kind: StringKind) -> SanMatcher {
        SanMatcher {
            san_type,
            matcher: StringMatch {
                kind,
                ignore_case: false,
            },
        }
    }

    #[test]
    fn matchers_see_only_sans_of_their_type_and_any_sees_all() {
        let uri = San::Uri("spiffe://cluster.local/ns/a/sa/b");
        let dns = San::Dns("*.svc.cluster.local");
        let ip = San::Ip("10.1.2.3".parse().unwrap());
        let email = San::Email("ops@example.com");
        let prefix = |t| matcher(t, StringKind::Prefix("spiffe://cluster.local/".into()));
        assert!(san_matches(&prefix(SanType::Uri), &uri));
        assert!(san_matches(&prefix(SanType::Any), &uri));
        assert!(!san_matches(&prefix(SanType::Dns), &uri));
        let exact = |t| matcher(t, StringKind::Exact("web.svc.cluster.local".into()));
        assert!(san_matches(&exact(SanType::Dns), &dns));
        assert!(san_matches(&exact(SanType::Any), &dns));
        assert!(!san_matches(&exact(SanType::Uri), &dns));
        let ip_exact = matcher(SanType::IpAddress, StringKind::Exact("10.1.2.3".into()));
        assert!(san_matches(&ip_exact, &ip));
        assert!(!san_matches(&ip_exact, &email));
        let mail = matcher(SanType::Email, StringKind::Suffix("@example.com".into()));
        assert!(san_matches(&mail, &email));
        assert!(!san_matches(&mail, &uri));
    }
}
