//! gRPC channels to control planes (ADS, SDS): plain h2c, TLS verified the way Envoy verifies
//! an upstream, or a Unix socket; and the bearer token pilot-agent sends to istiod.
//!
//! TLS follows Envoy, not browsers: the chain must lead to `trusted_ca`, and the server's
//! name is not checked unless `match_(typed_)subject_alt_names` say which SANs to accept
//! (`skiff run --xds-san NAME` adds an exact DNS matcher, which is what pilot-agent checks
//! against istiod's certificate). `sni` is the name sent in the ClientHello, also used as the
//! name to verify first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity};

use crate::model::tls::{
    CertificateSource, DataSource, SanMatcher, SanType, UpstreamTls, ValidationContext,
};

/// How long a connect (TCP, TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub use crate::config::GrpcTarget;

/// Why a control-plane connection could not be set up or opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A file named by the TLS settings or the token flag cannot be read.
    #[error("reading {what} {}: {error}", path.display())]
    Read {
        /// `CA file`, `certificate file`, `private key file`, `token file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause (in the message, so not a `source()`).
        error: std::io::Error,
    },
    /// A PEM input holds nothing usable.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (`CA file x.pem`, `inline trusted_ca`).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The TLS settings ask for something a control-plane connection cannot do.
    #[error("TLS to the control plane: {0}")]
    Unsupported(String),
    /// The token file's content cannot be a header value.
    #[error("token file {}: not a valid header value (control characters?)", .0.display())]
    TokenValue(PathBuf),
    /// TCP connect, TLS handshake or HTTP/2 setup failed; `detail` is the whole cause chain
    /// (rustls names the certificate problem: `UnknownIssuer`, `NotValidForName`, ...).
    #[error("connecting to {server}{tls}: {detail}", tls = if *.tls { " (TLS)" } else { "" })]
    Connect {
        /// Where.
        server: GrpcTarget,
        /// Whether TLS was used.
        tls: bool,
        /// Whether rustls failed the handshake (a `rustls::Error` in the cause chain).
        handshake: bool,
        /// The cause chain, joined with `: `.
        detail: String,
    },
}

impl ChannelError {
    /// Whether TLS failed: the handshake, or the TLS settings themselves (files, PEM).
    pub fn is_tls_failure(&self) -> bool {
        match self {
            ChannelError::Connect { handshake, .. } => *handshake,
            ChannelError::Pem { .. } | ChannelError::Unsupported(_) => true,
            ChannelError::Read { what, .. } => *what != "token file",
            ChannelError::TokenValue(_) => false,
        }
    }
}

/// Opens a channel to `server`; TLS when `tls` is given (TCP only).
pub async fn connect(
    server: &GrpcTarget,
    tls: Option<&UpstreamTls>,
) -> Result<Channel, ChannelError> {
    let endpoint = endpoint(server, tls)?;
    endpoint.connect().await.map_err(|e| ChannelError::Connect {
        server: server.clone(),
        tls: tls.is_some(),
        handshake: caused_by_rustls(&e),
        detail: chain(&e),
    })
}

/// The tonic endpoint for `server`, TLS configured (and its files read) now.
pub fn endpoint(server: &GrpcTarget, tls: Option<&UpstreamTls>) -> Result<Endpoint, ChannelError> {
    let uri = match (server, tls) {
        (GrpcTarget::Tcp(a), None) => format!("http://{a}"),
        (GrpcTarget::Tcp(a), Some(_)) => format!("https://{a}"),
        (GrpcTarget::Unix(p), None) => format!("unix:{}", p.display()),
        (GrpcTarget::Unix(_), Some(_)) => {
            return Err(ChannelError::Unsupported(
                "TLS over a Unix socket (the socket's permissions protect it)".into(),
            ));
        }
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| ChannelError::Unsupported(format!("address {server}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT);
    let Some(tls) = tls else {
        return Ok(endpoint);
    };
    let GrpcTarget::Tcp(addr) = server else {
        unreachable!("refused above: TLS only over TCP")
    };
    let settings = TlsSettings::new(tls, *addr)?;
    let mut config = ClientTlsConfig::new()
        .domain_name(settings.server_name.clone())
        .timeout(CONNECT_TIMEOUT);
    if let Some((chain, key)) = settings.identity {
        config = config.identity(Identity::from_pem(chain, key));
    }
    endpoint
        .tls_config_with_verifier(config, settings.verifier)
        .map_err(|e| ChannelError::Unsupported(chain(&e)))
}

/// The `authorization` value for the token in `path`: `Bearer <file content, trimmed>`. Read
/// at every connect, since projected tokens rotate.
pub fn bearer(
    path: &Path,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, ChannelError> {
    let token = std::fs::read_to_string(path).map_err(|error| ChannelError::Read {
        what: "token file",
        path: path.to_owned(),
        error,
    })?;
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| ChannelError::TokenValue(path.to_owned()))
}

/// Whether a `rustls::Error` is in `e`'s cause chain (tokio-rustls wraps it in an
/// `io::Error`, whose own `source()` skips it, so each `io::Error` is opened too).
fn caused_by_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|i| i.is::<rustls::Error>());
        if inner || err.is::<rustls::Error>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `e` and its sources, joined with `: ` (tonic's own Display is only "transport error").
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

// === impl TlsSettings ===

/// What a TLS control-plane connection needs, resolved from an `UpstreamTls`.
struct TlsSettings {
    /// Sent as SNI and verified first.
    server_name: String,
    /// PEM chain and key, when the client presents a certificate.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    verifier: Arc<dyn ServerCertVerifier>,
}

impl TlsSettings {
    fn new(tls: &UpstreamTls, addr: SocketAddr) -> Result<Self, ChannelError> {
        let validation = tls.common.validation.as_ref().ok_or_else(|| {
            ChannelError::Unsupported(
                "no validation context: a control plane must be verified (give trusted_ca, or --xds-ca)"
                    .into(),
            )
        })?;
        if let Some(sds) = &validation.sds {
            return Err(ChannelError::Unsupported(format!(
                "validation context over SDS ({:?}); give trusted_ca inline or as a file",
                sds.name
            )));
        }
        let ValidationContext {
            trusted_ca,
            san_matchers,
        } = &validation.inline;
        let ca = trusted_ca.as_ref().ok_or_else(|| {
            ChannelError::Unsupported("validation context without trusted_ca".into())
        })?;
        let roots = roots(ca)?;
        let identity = match &tls.common.certificate {
            None => None,
            Some(CertificateSource::Inline(c)) => Some((
                read(&c.certificate_chain, "certificate file")?,
                read(&c.private_key, "private key file")?,
            )),
            Some(CertificateSource::Sds(r)) => {
                return Err(ChannelError::Unsupported(format!(
                    "client certificate over SDS ({:?}); give it inline or as files",
                    r.name
                )));
            }
        };
        let server_name = if tls.sni.is_empty() {
            addr.ip().to_string()
        } else {
            tls.sni.clone()
        };
        ServerName::try_from(server_name.as_str()).map_err(|_| {
            ChannelError::Unsupported(format!("sni {server_name:?} is not a DNS name or IP"))
        })?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| ChannelError::Unsupported(format!("trusted CA: {e}")))?;
        Ok(TlsSettings {
            server_name,
            identity,
            verifier: Arc::new(EnvoyVerifier {
                inner,
                matchers: san_matchers.clone(),
            }),
        })
    }
}

fn read(source: &DataSource, what: &'static str) -> Result<Vec<u8>, ChannelError> {
    match source {
        DataSource::Inline(b) => Ok(b.to_vec()),
        DataSource::File(path) => std::fs::read(path).map_err(|error| ChannelError::Read {
            what,
            path: path.clone(),
            error,
        }),
    }
}

/// The trust anchors of a PEM bundle.
fn roots(ca: &DataSource) -> Result<RootCertStore, ChannelError> {
    let what = match ca {
        DataSource::Inline(_) => "inline trusted_ca".to_owned(),
        DataSource::File(p) => format!("CA file {}", p.display()),
    };
    let pem = read(ca, "CA file")?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| ChannelError::Pem {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        store.add(cert).map_err(|e| ChannelError::Pem {
            what: what.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    if store.is_empty() {
        return Err(ChannelError::Pem {
            what,
            reason: "no PEM certificate".into(),
        });
    }
    Ok(store)
}

/// The process's rustls provider, else ring (skiff builds rustls with ring only; rustls
/// 0.23.48 deprecates ring's constructor because ring lacks post-quantum key exchange).
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

// === impl EnvoyVerifier ===

/// webpki's chain and signature checks, with Envoy's name rule: SAN matchers, when given,
/// decide; without them any name is accepted once the chain is trusted.
#[derive(Debug)]
struct EnvoyVerifier {
    inner: Arc<WebPkiServerVerifier>,
    matchers: Vec<SanMatcher>,
}

impl ServerCertVerifier for EnvoyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain and validity must hold; a name mismatch is left to the SAN matchers.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        if self.matchers.is_empty() || san_matches(end_entity, &self.matchers) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether one of the leaf's SANs satisfies one of `matchers`.
fn san_matches(leaf: &CertificateDer<'_>, matchers: &[SanMatcher]) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|name| {
        let (kind, value) = match name {
            GeneralName::DNSName(d) => (SanType::Dns, (*d).to_owned()),
            GeneralName::URI(u) => (SanType::Uri, (*u).to_owned()),
            GeneralName::RFC822Name(e) => (SanType::Email, (*e).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => (
                    SanType::IpAddress,
                    std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
                ),
                16 => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(b);
                    (SanType::IpAddress, std::net::Ipv6Addr::from(a).to_string())
                }
                _ => return false,
            },
            _ => return false,
        };
        matchers.iter().any(|m| {
            (m.san_type == SanType::Any || m.san_type == kind) && m.matcher.matches(&value)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_sources_once() {
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        assert_eq!(
            chain(&Outer(inner)),
            "transport error: invalid peer certificate: UnknownIssuer"
        );
    }

    #[test]
    fn a_rustls_error_inside_an_io_error_is_a_handshake_failure() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert!(caused_by_rustls(&Outer(tls)));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!caused_by_rustls(&Outer(refused)));
    }

    #[test]
    fn bearer_is_reread_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("skiff-bearer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "abc\n").unwrap();
        assert_eq!(bearer(&f).unwrap(), "Bearer abc");
        std::fs::write(&f, "def").unwrap();
        assert_eq!(bearer(&f).unwrap(), "Bearer def");
        let err = bearer(&dir.join("missing")).unwrap_err();
        assert!(err.to_string().contains("token file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_needs_a_trusted_ca_and_tcp() {
        use crate::model::tls::{CommonTls, TlsVersion};
        let tls = UpstreamTls {
            max_session_keys: 1,
            common: CommonTls {
                certificate: None,
                validation: None,
                alpn: vec![],
                min_version: TlsVersion::V1_2,
                max_version: TlsVersion::V1_3,
                cipher_suites: Vec::new(),
                ecdh_curves: Vec::new(),
            },
            sni: String::new(),
        };
        let tcp = GrpcTarget::Tcp("127.0.0.1:1".parse().unwrap());
        let err = endpoint(&tcp, Some(&tls)).unwrap_err();
        assert!(err.to_string().contains("trusted_ca"), "{err}");
        let unix = GrpcTarget::Unix("/tmp/x".into());
        assert!(endpoint(&unix, Some(&tls)).is_err());
        assert!(endpoint(&unix, None).is_ok());
        let mut missing = tls.clone();
        missing.common.validation = Some(crate::model::tls::Validation {
            inline: ValidationContext {
                trusted_ca: Some(DataSource::File("/nonexistent/ca.pem".into())),
                san_matchers: vec![],
            },
            sds: None,
        });
        let err = endpoint(&tcp, Some(&missing)).unwrap_err();
        assert!(
            err.to_string().contains("CA file /nonexistent/ca.pem"),
            "{err}"
        );
    }
}
