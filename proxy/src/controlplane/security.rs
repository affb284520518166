//! The control plane's own security: TLS on its gRPC listener and the bearer-token check,
//! the two things istiod does on 15012 that skiff's ADS client must get through.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::warn;

/// `--tls-cert`, `--tls-key`, `--client-ca`: PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// Server certificate chain (leaf first).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// When given, clients must present a certificate issued by one of these roots.
    pub client_ca: Option<PathBuf>,
}

/// Why the server's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("reading {what} {}: {error}", path.display())]
    Read {
        /// `--tls-cert`, `--tls-key`, `--client-ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause (in the message, so not a `source()`).
        error: std::io::Error,
    },
    /// A file holds no PEM item of the kind its flag needs.
    #[error("{what} {}: {reason}", path.display())]
    Pem {
        /// The flag.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ServerTls {
    /// Reads and checks the files; tonic's configuration for them.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read("--tls-cert", &self.cert)?;
        let n = CertificateDer::pem_slice_iter(&cert)
            .filter(Result::is_ok)
            .count();
        if n == 0 {
            return Err(pem("--tls-cert", &self.cert, "no PEM certificate".into()));
        }
        let key = read("--tls-key", &self.key)?;
        PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| pem("--tls-key", &self.key, format!("no PEM private key ({e})")))?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(path) = &self.client_ca {
            let ca = read("--client-ca", path)?;
            if CertificateDer::pem_slice_iter(&ca)
                .filter(Result::is_ok)
                .count()
                == 0
            {
                return Err(pem("--client-ca", path, "no PEM certificate".into()));
            }
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

fn pem(what: &'static str, path: &Path, reason: String) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_owned(),
        reason,
    }
}

// === impl TokenCheck ===

/// `--require-token FILE`: every stream must carry `authorization: Bearer <file content>`; the
/// file is read per stream, so a rotated token applies at once. Without a file, everything
/// passes.
#[derive(Debug, Clone)]
pub(super) struct TokenCheck {
    file: Option<PathBuf>,
}

impl TokenCheck {
    pub(super) fn new(file: Option<PathBuf>) -> Self {
        TokenCheck { file }
    }

    /// `Err` with the reason (for the log) when `header` is not the expected bearer token.
    fn verify(&self, header: Option<&[u8]>) -> Result<(), String> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let expected = std::fs::read_to_string(file)
            .map_err(|e| format!("token file {} unreadable: {e}", file.display()))?;
        let Some(header) = header else {
            return Err("no authorization header".into());
        };
        let Some(token) = header.strip_prefix(b"Bearer ") else {
            return Err("authorization is not a Bearer token".into());
        };
        if constant_time_eq(token.trim_ascii(), expected.trim().as_bytes()) {
            Ok(())
        } else {
            Err("bearer token does not match".into())
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match self.verify(header) {
            Ok(()) => Ok(request),
            Err(reason) => {
                let peer = request
                    .remote_addr()
                    .map_or_else(|| "-".to_owned(), |a| a.to_string());
                warn!(peer, reason, "ADS stream refused: UNAUTHENTICATED");
                Err(tonic::Status::unauthenticated(
                    "missing or invalid bearer token",
                ))
            }
        }
    }
}

/// Equality whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check_reads_the_file_each_time() {
        let dir = std::env::temp_dir().join(format!("skiff-token-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        let check = TokenCheck::new(Some(f.clone()));
        assert!(check.verify(Some(b"Bearer s3cret")).is_ok());
        assert_eq!(check.verify(None).unwrap_err(), "no authorization header");
        assert!(check.verify(Some(b"Basic s3cret")).is_err());
        assert!(check.verify(Some(b"Bearer other")).is_err());
        std::fs::write(&f, "rotated").unwrap();
        assert!(check.verify(Some(b"Bearer s3cret")).is_err());
        assert!(check.verify(Some(b"Bearer rotated")).is_ok());
        assert!(TokenCheck::new(None).verify(None).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_files_are_checked_before_serving() {
        let dir = std::env::temp_dir().join(format!("skiff-cp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, "nothing here").unwrap();
        let tls = ServerTls {
            cert: cert.clone(),
            key: dir.join("missing.pem"),
            client_ca: None,
        };
        let err = tls.load().unwrap_err();
        assert!(err.to_string().contains("--tls-cert"), "{err}");
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, c.cert.pem()).unwrap();
        let err = tls.load().unwrap_err();
        assert!(err.to_string().contains("reading --tls-key"), "{err}");
        let key = dir.join("key.pem");
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        let ok = ServerTls { key, ..tls };
        assert!(ok.load().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
