//! The test PKI of the mTLS tests (issue 15): an rcgen CA issuing SPIFFE workload
//! certificates (`spiffe://cluster.local/ns/NS/sa/SA`, ECDSA P-256, as Istio's CA issues them),
//! a second CA nobody trusts, all written as PEM files to a directory removed on drop; and the
//! Envoy configuration fragments (UpstreamTlsContext, DownstreamTlsContext, static secrets)
//! that point at them by file name, inline or by secret name.
//!
//! Fragments are `serde_json::Value`s: their JSON text is valid YAML flow syntax, so a test
//! drops `transport_socket: {fragment}` into any bootstrap at any indentation, and Envoy and
//! skiff read the same file.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};

/// Istio's trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The SPIFFE identity of service account `sa` in namespace `ns`.
pub fn spiffe_id(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// A workload certificate and its key, as PEM files (and their text).
#[derive(Debug, Clone)]
pub struct Identity {
    /// The URI SAN it carries.
    pub uri: String,
    /// PEM certificate chain (the leaf only: it is issued by the root directly).
    pub cert: PathBuf,
    /// PEM PKCS#8 private key.
    pub key: PathBuf,
    /// The certificate's PEM text.
    pub cert_pem: String,
    /// The key's PEM text.
    pub key_pem: String,
}

impl Identity {
    /// This certificate by file name (`certificate_chain.filename`, `private_key.filename`).
    pub fn files(&self) -> CertSource {
        CertSource::Files {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// This certificate inline (`inline_string`).
    pub fn inline(&self) -> CertSource {
        CertSource::Inline {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

/// Two CAs (one trusted, one not) and a directory of PEM files; the directory is removed on
/// drop.
pub struct TestPki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    untrusted: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
    untrusted_ca_file: PathBuf,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir).finish()
    }
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, name);
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
    CertifiedIssuer::self_signed(p, key).expect("self-signed CA")
}

/// A lone CA for tests that need no mesh identities (control-plane TLS, SDS rotation): its
/// root as PEM text and leaves with any DNS and URI SANs.
pub struct Ca {
    /// The root certificate, PEM.
    pub pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate (the leaf alone, PEM) and its private key (PEM).
pub struct Leaf {
    /// Certificate chain.
    pub cert: String,
    /// Private key.
    pub key: String,
}

impl Ca {
    /// A fresh self-signed root named `name` (ECDSA P-256).
    pub fn new(name: &str) -> Ca {
        let issuer = new_ca(name);
        Ca {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// A leaf for DNS names `dns` and URI SANs `uris` (SPIFFE ids).
    pub fn leaf(&self, dns: &[&str], uris: &[&str]) -> Leaf {
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("DNS SANs");
        for u in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*u).try_into().expect("URI SAN is IA5")));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing the leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_pem(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("writing a PEM file");
    p
}

impl TestPki {
    /// A fresh PKI under the system temp directory (`skiff-pki-<name>-<pid>-<n>`), with
    /// `ca.pem` (the mesh root) and `untrusted-ca.pem` (a root no configuration trusts).
    pub fn new(name: &str) -> TestPki {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("skiff-pki-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the PKI directory");
        let ca = new_ca("skiff test mesh root");
        let untrusted = new_ca("skiff test untrusted root");
        let ca_file = dir.join("ca.pem");
        let untrusted_ca_file = dir.join("untrusted-ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("writing ca.pem");
        std::fs::write(&untrusted_ca_file, untrusted.pem()).expect("writing untrusted-ca.pem");
        TestPki {
            dir,
            ca,
            untrusted,
            ca_file,
            untrusted_ca_file,
        }
    }

    /// Where the PEM files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The mesh root, PEM file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The untrusted root, PEM file.
    pub fn untrusted_ca_file(&self) -> &Path {
        &self.untrusted_ca_file
    }

    /// The mesh root's PEM text.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A workload certificate for `spiffe://cluster.local/ns/NS/sa/SA` from the mesh root,
    /// written as `<stem>.pem` and `<stem>-key.pem`. A certificate "with the wrong SAN" is
    /// simply one issued for another service account.
    pub fn issue(&self, stem: &str, ns: &str, sa: &str) -> Identity {
        self.issue_uri(stem, &spiffe_id(ns, sa), false)
    }

    /// As [`TestPki::issue`], signed by the untrusted root instead.
    pub fn issue_untrusted(&self, stem: &str, ns: &str, sa: &str) -> Identity {
        self.issue_uri(stem, &spiffe_id(ns, sa), true)
    }

    /// A leaf with exactly one URI SAN `uri` (client and server usage, ECDSA P-256), from
    /// the mesh root or the untrusted one.
    pub fn issue_uri(&self, stem: &str, uri: &str, untrusted: bool) -> Identity {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "skiff test");
        p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("URI SAN is IA5"))];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
        let issuer = if untrusted { &self.untrusted } else { &self.ca };
        let cert = p.signed_by(&key, issuer).expect("signing the leaf");
        let id = Identity {
            uri: uri.to_string(),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}-key.pem")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        std::fs::write(&id.cert, &id.cert_pem).expect("writing the certificate");
        std::fs::write(&id.key, &id.key_pem).expect("writing the key");
        id
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where a TLS context's own certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// `tls_certificates[0]` with `filename`s.
    Files {
        /// Certificate chain file.
        cert: PathBuf,
        /// Private key file.
        key: PathBuf,
    },
    /// `tls_certificates[0]` with `inline_string`s.
    Inline {
        /// Certificate chain PEM.
        cert_pem: String,
        /// Private key PEM.
        key_pem: String,
    },
    /// `tls_certificate_sds_secret_configs[0]` naming a secret: with no `sds_config`, a
    /// bootstrap static secret ([`static_cert_secret`]); with `ads`, one delivered over ADS.
    Secret {
        /// The secret's name.
        name: String,
        /// `sds_config: { ads: {} }` instead of none.
        ads: bool,
    },
}

/// Where the trusted roots come from.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// `trusted_ca.filename`.
    File(PathBuf),
    /// `trusted_ca.inline_string`.
    Inline(String),
    /// `validation_context_sds_secret_config` naming a validation secret (static, or over
    /// ADS), combined with the SAN matchers inline as Istio does.
    Secret {
        /// The secret's name (Istio: `ROOTCA`).
        name: String,
        /// `sds_config: { ads: {} }` instead of none.
        ads: bool,
    },
}

/// One side's TLS settings, rendered by [`upstream_tls`] or [`downstream_tls`].
#[derive(Debug, Clone)]
pub struct TlsSide {
    /// The certificate this side presents.
    pub cert: CertSource,
    /// The roots the peer's certificate must chain to.
    pub ca: CaSource,
    /// `match_typed_subject_alt_names`: the peer must carry one of these URI SANs (exact);
    /// empty: any peer the roots accept.
    pub peer_uris: Vec<String>,
    /// `alpn_protocols`.
    pub alpn: Vec<String>,
    /// `tls_params`, as given (e.g. [`tls13_params`]).
    pub tls_params: Option<Value>,
}

impl TlsSide {
    /// Present `me` by file name, trust `ca_file`, require the peer to be `peer_uri`.
    pub fn files(me: &Identity, ca_file: &Path, peer_uri: &str) -> TlsSide {
        TlsSide {
            cert: me.files(),
            ca: CaSource::File(ca_file.to_path_buf()),
            peer_uris: vec![peer_uri.to_string()],
            alpn: Vec::new(),
            tls_params: None,
        }
    }
}

/// `tls_params` pinning TLS 1.3 (whose cipher suites Envoy does not let one choose; BoringSSL
/// and rustls both negotiate an AES-GCM suite) and the X25519 key exchange.
pub fn tls13_params() -> Value {
    json!({
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
        "ecdh_curves": ["X25519"],
    })
}

fn sds_ref(name: &str, ads: bool) -> Value {
    if ads {
        json!({ "name": name, "sds_config": { "ads": {}, "resource_api_version": "V3" } })
    } else {
        json!({ "name": name })
    }
}

fn san_matchers(uris: &[String]) -> Value {
    Value::Array(
        uris.iter()
            .map(|u| json!({ "san_type": "URI", "matcher": { "exact": u } }))
            .collect(),
    )
}

/// The `common_tls_context` of `side`.
pub fn common_tls_context(side: &TlsSide) -> Value {
    let mut c = serde_json::Map::new();
    match &side.cert {
        CertSource::Files { cert, key } => {
            c.insert(
                "tls_certificates".into(),
                json!([{
                    "certificate_chain": { "filename": cert },
                    "private_key": { "filename": key },
                }]),
            );
        }
        CertSource::Inline { cert_pem, key_pem } => {
            c.insert(
                "tls_certificates".into(),
                json!([{
                    "certificate_chain": { "inline_string": cert_pem },
                    "private_key": { "inline_string": key_pem },
                }]),
            );
        }
        CertSource::Secret { name, ads } => {
            c.insert(
                "tls_certificate_sds_secret_configs".into(),
                json!([sds_ref(name, *ads)]),
            );
        }
    }
    let sans = san_matchers(&side.peer_uris);
    match &side.ca {
        CaSource::File(f) => {
            c.insert(
                "validation_context".into(),
                json!({ "trusted_ca": { "filename": f }, "match_typed_subject_alt_names": sans }),
            );
        }
        CaSource::Inline(pem) => {
            c.insert(
                "validation_context".into(),
                json!({ "trusted_ca": { "inline_string": pem }, "match_typed_subject_alt_names": sans }),
            );
        }
        CaSource::Secret { name, ads } => {
            c.insert(
                "combined_validation_context".into(),
                json!({
                    "default_validation_context": { "match_typed_subject_alt_names": sans },
                    "validation_context_sds_secret_config": sds_ref(name, *ads),
                }),
            );
        }
    }
    if !side.alpn.is_empty() {
        c.insert("alpn_protocols".into(), json!(side.alpn));
    }
    if let Some(p) = &side.tls_params {
        c.insert("tls_params".into(), p.clone());
    }
    Value::Object(c)
}

/// A cluster's `transport_socket`: `envoy.transport_sockets.tls` with an UpstreamTlsContext
/// (skiff or Envoy dials mTLS). `extra` fields (`sni`, `max_session_keys`, ...) are merged
/// into the context.
pub fn upstream_tls(side: &TlsSide, extra: Value) -> Value {
    let mut ctx = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common_tls_context(side),
    });
    merge(&mut ctx, extra);
    json!({ "name": "envoy.transport_sockets.tls", "typed_config": ctx })
}

/// A filter chain's `transport_socket`: `envoy.transport_sockets.tls` with a
/// DownstreamTlsContext (terminating mTLS when `require_client_certificate`). `extra` fields
/// are merged into the context.
pub fn downstream_tls(side: &TlsSide, require_client_certificate: bool, extra: Value) -> Value {
    let mut ctx = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": common_tls_context(side),
        "require_client_certificate": require_client_certificate,
    });
    merge(&mut ctx, extra);
    json!({ "name": "envoy.transport_sockets.tls", "typed_config": ctx })
}

fn merge(into: &mut Value, extra: Value) {
    if let (Some(m), Value::Object(e)) = (into.as_object_mut(), extra) {
        m.extend(e);
    }
}

/// One item of `static_resources.secrets`: a `tls_certificate` secret named `name` holding
/// `id` (by file name, or inline).
pub fn static_cert_secret(name: &str, id: &Identity, inline: bool) -> Value {
    let (chain, key) = if inline {
        (
            json!({ "inline_string": id.cert_pem }),
            json!({ "inline_string": id.key_pem }),
        )
    } else {
        (
            json!({ "filename": id.cert }),
            json!({ "filename": id.key }),
        )
    };
    json!({ "name": name, "tls_certificate": { "certificate_chain": chain, "private_key": key } })
}

/// One item of `static_resources.secrets`: a `validation_context` secret named `name` that
/// trusts the PEM roots in `ca_file`.
pub fn static_ca_secret(name: &str, ca_file: &Path) -> Value {
    json!({ "name": name, "validation_context": { "trusted_ca": { "filename": ca_file } } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_leaves_carry_their_spiffe_id_and_chain_to_their_root() {
        let pki = TestPki::new("unit");
        let id = pki.issue("a", "ns1", "sa1");
        assert_eq!(id.uri, "spiffe://cluster.local/ns/ns1/sa/sa1");
        assert!(
            std::fs::read_to_string(&id.cert)
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        assert!(
            std::fs::read_to_string(&id.key)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        assert_ne!(
            std::fs::read(pki.ca_file()).unwrap(),
            std::fs::read(pki.untrusted_ca_file()).unwrap()
        );
        let side = TlsSide::files(&id, pki.ca_file(), "spiffe://cluster.local/ns/x/sa/y");
        let up = upstream_tls(&side, json!({ "sni": "x" }));
        assert_eq!(up["typed_config"]["sni"], "x");
        assert_eq!(
            up["typed_config"]["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
                [0]["matcher"]["exact"],
            "spiffe://cluster.local/ns/x/sa/y"
        );
        let dir = pki.dir().to_path_buf();
        drop(pki);
        assert!(!dir.exists(), "the PKI directory goes with the guard");
    }
}
