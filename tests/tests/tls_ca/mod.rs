//! A test certificate authority (rcgen) whose PEM files live in a tempdir, shared by the
//! control-plane TLS and SDS tests (`#[path]`-included; not a test binary of its own).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

/// A CA: its certificate (PEM) and what signs with it.
pub struct Ca {
    /// The root certificate, PEM.
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    /// Certificate chain (the leaf alone).
    pub cert: String,
    /// Private key.
    pub key: String,
}

impl Ca {
    /// A fresh self-signed root named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for DNS names `dns` and URI SANs `uris` (SPIFFE ids).
    pub fn leaf(&self, dns: &[&str], uris: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for u in uris {
            params.subject_alt_names.push(SanType::URI(
                rcgen::string::Ia5String::try_from(*u).unwrap(),
            ));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `dir/name` and returns the path.
#[allow(dead_code)] // each including test uses part of this module
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}
