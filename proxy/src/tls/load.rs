//! Secrets and `DataSource`s -> certificates, private keys and trust anchors.
//!
//! Every error names where the bytes came from (`secret "default" certificate_chain (file
//! /etc/certs/cert.pem)`) and what is wrong with them: the operator reading the log line has
//! to find the one secret or file to fix.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::verify::PeerCheck;
use crate::model::tls::{
    CertificateSource, CommonTls, DataSource, SanMatcher, Secret, SecretKind, Secrets,
    TlsCertificate, TlsVersion, ValidationContext,
};

/// Why a TLS context cannot be turned into a configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A referenced SDS or static secret is not (yet) known.
    #[error("secret \"{0}\" not found (not delivered by SDS, nor a static secret)")]
    MissingSecret(String),
    /// A secret of the wrong kind is referenced (a validation context as a certificate...).
    #[error("secret \"{name}\" is a {found}, expected a {wanted}")]
    WrongSecretKind {
        /// The secret's name.
        name: String,
        /// What it holds.
        found: &'static str,
        /// What the reference needs.
        wanted: &'static str,
    },
    /// A `DataSource` file cannot be read.
    #[error("{what}: reading {}: {source}", path.display())]
    Read {
        /// Which secret or context and which field.
        what: String,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// PEM that does not parse.
    #[error("{what}: bad PEM: {source}")]
    Pem {
        /// Which secret or context and which field.
        what: String,
        /// The parser's complaint.
        source: pem::Error,
    },
    /// No `CERTIFICATE` PEM section where one is needed.
    #[error("{what}: no PEM certificate")]
    NoCertificate {
        /// Which secret or context and which field.
        what: String,
    },
    /// No private key PEM section (PKCS#8, PKCS#1 or SEC1).
    #[error("{what}: no PEM private key")]
    NoPrivateKey {
        /// Which secret or context and which field.
        what: String,
    },
    /// The private key is not the certificate's.
    #[error("{what}: private key does not match the certificate")]
    KeyMismatch {
        /// Which secret or context.
        what: String,
    },
    /// rustls refused a key, a certificate or a trust anchor.
    #[error("{what}: {source}")]
    Rejected {
        /// Which secret or context and which field.
        what: String,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// `sni` that is not a DNS name rustls can send.
    #[error("sni \"{0}\" is not a valid DNS name")]
    Sni(String),
    /// SAN matchers with no trusted CA (inline or from an SDS validation secret), which
    /// Envoy refuses too: anyone can mint a certificate with the right SAN.
    #[error(
        "validation context: SAN-based verification of peer certificates without trusted CA is \
         insecure and not allowed (Envoy refuses it too)"
    )]
    SanWithoutCa,
    /// A `DownstreamTlsContext` without a certificate to present.
    #[error("downstream TLS context has no certificate")]
    NoServerCertificate,
    /// `tls_params` with the minimum above the maximum.
    #[error("tls_params: minimum version {min:?} is above maximum {max:?}")]
    Versions {
        /// `tls_minimum_protocol_version`.
        min: TlsVersion,
        /// `tls_maximum_protocol_version`.
        max: TlsVersion,
    },
}

/// The secrets a context references, resolved in a fixed order (certificate, then
/// validation): what a cached configuration was built from.
pub(crate) fn resolve(common: &CommonTls, secrets: &Secrets) -> Result<Vec<Arc<Secret>>, TlsError> {
    let mut out = Vec::with_capacity(2);
    if let Some(CertificateSource::Sds(r)) = &common.certificate {
        out.push(lookup(secrets, &r.name)?);
    }
    if let Some(r) = common.validation.as_ref().and_then(|v| v.sds.as_ref()) {
        out.push(lookup(secrets, &r.name)?);
    }
    Ok(out)
}

fn lookup(secrets: &Secrets, name: &str) -> Result<Arc<Secret>, TlsError> {
    secrets
        .get(name)
        .cloned()
        .ok_or_else(|| TlsError::MissingSecret(name.to_string()))
}

fn kind_name(kind: &SecretKind) -> &'static str {
    match kind {
        SecretKind::Certificate(_) => "tls_certificate",
        SecretKind::Validation(_) => "validation_context",
    }
}

/// The certificate and key this side presents, if any.
pub(crate) fn certified_key(
    common: &CommonTls,
    secrets: &Secrets,
    provider: &CryptoProvider,
) -> Result<Option<Arc<CertifiedKey>>, TlsError> {
    let (cert, origin) = match &common.certificate {
        None => return Ok(None),
        Some(CertificateSource::Inline(c)) => (Cow::Borrowed(c), "tls_certificates[0]".to_string()),
        Some(CertificateSource::Sds(r)) => {
            let secret = lookup(secrets, &r.name)?;
            match &secret.kind {
                SecretKind::Certificate(c) => {
                    (Cow::Owned(c.clone()), format!("secret \"{}\"", r.name))
                }
                other => {
                    return Err(TlsError::WrongSecretKind {
                        name: r.name.clone(),
                        found: kind_name(other),
                        wanted: "tls_certificate",
                    });
                }
            }
        }
    };
    load_certified_key(&cert, &origin, provider).map(Some)
}

fn load_certified_key(
    cert: &TlsCertificate,
    origin: &str,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain_what = || field(origin, "certificate_chain", &cert.certificate_chain);
    let chain_pem = read(&cert.certificate_chain, &chain_what)?;
    let chain = certificates(&chain_pem, &chain_what)?;

    let key_what = || field(origin, "private_key", &cert.private_key);
    let key_pem = read(&cert.private_key, &key_what)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => return Err(TlsError::NoPrivateKey { what: key_what() }),
        Err(source) => {
            return Err(TlsError::Pem {
                what: key_what(),
                source,
            });
        }
    };
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Rejected {
            what: key_what(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        // A key type whose public half the provider cannot derive: the handshake will tell.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                what: origin.to_string(),
            });
        }
        Err(source) => {
            return Err(TlsError::Rejected {
                what: chain_what(),
                source,
            });
        }
    }
    Ok(Arc::new(certified))
}

/// How the peer is checked: `None` when the context has no validation at all.
pub(crate) fn peer_check(
    common: &CommonTls,
    secrets: &Secrets,
) -> Result<Option<PeerCheck>, TlsError> {
    let Some(validation) = &common.validation else {
        return Ok(None);
    };
    let mut parts: Vec<(Cow<'_, ValidationContext>, String)> = vec![(
        Cow::Borrowed(&validation.inline),
        "validation_context".to_string(),
    )];
    if let Some(r) = &validation.sds {
        let secret = lookup(secrets, &r.name)?;
        match &secret.kind {
            SecretKind::Validation(v) => {
                parts.push((Cow::Owned(v.clone()), format!("secret \"{}\"", r.name)))
            }
            other => {
                return Err(TlsError::WrongSecretKind {
                    name: r.name.clone(),
                    found: kind_name(other),
                    wanted: "validation_context",
                });
            }
        }
    }
    let mut roots = RootCertStore::empty();
    let mut any_ca = false;
    let mut san_matchers: Vec<SanMatcher> = Vec::new();
    for (ctx, origin) in &parts {
        san_matchers.extend(ctx.san_matchers.iter().cloned());
        let Some(ca) = &ctx.trusted_ca else { continue };
        any_ca = true;
        let what = || field(origin, "trusted_ca", ca);
        let pem = read(ca, &what)?;
        for (i, der) in certificates(&pem, &what)?.into_iter().enumerate() {
            roots.add(der).map_err(|source| TlsError::Rejected {
                what: format!("{} certificate {}", what(), i + 1),
                source,
            })?;
        }
    }
    if !any_ca && !san_matchers.is_empty() {
        return Err(TlsError::SanWithoutCa);
    }
    Ok(Some(PeerCheck {
        // Envoy: without trusted_ca (and so without SAN matchers) the chain is not verified.
        roots: any_ca.then(|| Arc::new(roots)),
        san_matchers,
    }))
}

/// `origin field`, with the file when the bytes come from one.
fn field(origin: &str, name: &str, ds: &DataSource) -> String {
    match ds {
        DataSource::Inline(_) => format!("{origin} {name}"),
        DataSource::File(p) => format!("{origin} {name} (file {})", p.display()),
    }
}

fn read<'a>(ds: &'a DataSource, what: &dyn Fn() -> String) -> Result<Cow<'a, [u8]>, TlsError> {
    match ds {
        DataSource::Inline(b) => Ok(Cow::Borrowed(&**b)),
        DataSource::File(path) => {
            std::fs::read(path)
                .map(Cow::Owned)
                .map_err(|source| TlsError::Read {
                    what: what(),
                    path: path.clone(),
                    source,
                })
        }
    }
}

fn certificates(
    pem: &[u8],
    what: &dyn Fn() -> String,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what() });
    }
    Ok(certs)
}
