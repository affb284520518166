//! [`TlsContexts`]: validated TLS contexts + secrets -> rustls configurations, cached.
//!
//! Building a configuration reads files, parses PEM and keys; a handshake must not. So each
//! configuration is cached under its context (by content: a new snapshot that repeats a
//! cluster's TLS reuses the entry) and the exact secrets it was built from. A rotated SDS
//! secret misses the cache and builds a new configuration, which new connections use;
//! established sessions keep the configuration they were opened with. The configuration also
//! owns the session-resumption cache, so a rotation starts resumption afresh.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoClientAuth, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme, SupportedProtocolVersion};
use rustls_pki_types::ServerName;

use super::load::{self, TlsError};
use super::verify::{ClientVerifier, PeerCheck, ServerVerifier};
use crate::model::tls::{
    CertificateSource, CommonTls, DataSource, DownstreamTls, Secret, Secrets, TlsVersion,
    UpstreamTls,
};

/// Configurations kept per side before the least recently used one is dropped.
const DEFAULT_CAPACITY: usize = 1024;

/// TLS sessions a server configuration remembers for resumption.
const SERVER_SESSIONS: usize = 1024;

/// How a cluster dials TLS: the configuration and the name it sends.
#[derive(Clone)]
pub struct ClientTls {
    /// The rustls configuration (verifier, client certificate, ALPN, versions, sessions).
    pub config: Arc<ClientConfig>,
    /// `sni`, when set: sent as SNI and used as the session-cache key.
    pub sni: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("sni", &self.sni)
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// The name for a connection to `peer`: the configured SNI, else the peer's address,
    /// which rustls never sends as SNI (Envoy sends none without `sni`) but keys resumed
    /// sessions by, so each endpoint resumes its own.
    pub fn server_name(&self, peer: IpAddr) -> ServerName<'static> {
        self.sni
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(peer.into()))
    }
}

/// How a filter chain terminates TLS.
#[derive(Clone)]
pub struct ServerTls {
    /// The configuration, with the context's ALPN list.
    pub config: Arc<ServerConfig>,
    /// The same without ALPN, for clients that offer none of the context's protocols: Envoy
    /// then goes on without ALPN, where rustls would abort the handshake. Shares the
    /// session cache with `config`.
    no_alpn: Option<Arc<ServerConfig>>,
    /// The URI SANs of the certificate it presents (the `By=` of Envoy's
    /// `x-forwarded-client-cert`).
    pub local_uri_sans: Arc<[String]>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The configuration for a client that offered `alpn` (`None`: no ALPN extension).
    pub fn config_for<'a>(
        &self,
        alpn: Option<impl Iterator<Item = &'a [u8]>>,
    ) -> &Arc<ServerConfig> {
        let (Some(no_alpn), Some(mut offered)) = (&self.no_alpn, alpn) else {
            return &self.config;
        };
        let ours = &self.config.alpn_protocols;
        if offered.any(|p| ours.iter().any(|o| o.as_slice() == p)) {
            &self.config
        } else {
            no_alpn
        }
    }
}

/// The cache of TLS configurations of one data plane (Send + Sync; share it by reference or
/// `Arc`). Bounded: past its capacity the least recently used entry goes, and [`sweep`]
/// drops entries no connection used since the previous sweep (contexts that left the
/// configuration, secrets that rotated away).
///
/// [`sweep`]: TlsContexts::sweep
pub struct TlsContexts {
    provider: Arc<CryptoProvider>,
    capacity: usize,
    clients: Mutex<Cache<UpstreamTls, ClientTls>>,
    servers: Mutex<Cache<DownstreamTls, ServerTls>>,
}

impl std::fmt::Debug for TlsContexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContexts")
            .field("clients", &lock(&self.clients).len)
            .field("servers", &lock(&self.servers).len)
            .finish_non_exhaustive()
    }
}

impl Default for TlsContexts {
    fn default() -> Self {
        TlsContexts::new()
    }
}

impl TlsContexts {
    /// An empty cache with ring as the crypto provider.
    pub fn new() -> Self {
        TlsContexts::with_capacity(DEFAULT_CAPACITY)
    }

    /// An empty cache keeping at most `capacity` configurations per side.
    pub fn with_capacity(capacity: usize) -> Self {
        TlsContexts {
            provider: Arc::new(envoy_provider()),
            capacity: capacity.max(1),
            clients: Mutex::new(Cache::default()),
            servers: Mutex::new(Cache::default()),
        }
    }

    /// The client configuration for `tls` with the secrets it references in `secrets`.
    pub fn client(&self, tls: &UpstreamTls, secrets: &Secrets) -> Result<ClientTls, TlsError> {
        let resolved = load::resolve(&tls.common, secrets)?;
        let mut h = DefaultHasher::new();
        hash_common(&mut h, &tls.common);
        (&tls.sni, tls.max_session_keys).hash(&mut h);
        let key = h.finish();
        if let Some(hit) = lock(&self.clients).get(key, tls, &resolved) {
            return Ok(hit);
        }
        let built = self.build_client(tls, secrets)?;
        tracing::debug!(
            sni = %tls.sni,
            secrets = ?names(&resolved),
            "tls: client configuration built"
        );
        lock(&self.clients).insert(key, tls, resolved, built.clone(), self.capacity);
        Ok(built)
    }

    /// The server configuration for `tls` with the secrets it references in `secrets`.
    pub fn server(&self, tls: &DownstreamTls, secrets: &Secrets) -> Result<ServerTls, TlsError> {
        let resolved = load::resolve(&tls.common, secrets)?;
        let mut h = DefaultHasher::new();
        hash_common(&mut h, &tls.common);
        (tls.require_client_certificate, tls.sessions).hash(&mut h);
        let key = h.finish();
        if let Some(hit) = lock(&self.servers).get(key, tls, &resolved) {
            return Ok(hit);
        }
        let built = self.build_server(tls, secrets)?;
        tracing::debug!(
            require_client_certificate = tls.require_client_certificate,
            secrets = ?names(&resolved),
            "tls: server configuration built"
        );
        lock(&self.servers).insert(key, tls, resolved, built.clone(), self.capacity);
        Ok(built)
    }

    /// Drop every configuration not used since the previous sweep (call it periodically or
    /// on snapshot publication; a context still in use is rebuilt on its next connection).
    pub fn sweep(&self) {
        lock(&self.clients).sweep();
        lock(&self.servers).sweep();
    }

    /// How many configurations are cached: (client, server).
    pub fn len(&self) -> (usize, usize) {
        (lock(&self.clients).len, lock(&self.servers).len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    fn build_client(&self, tls: &UpstreamTls, secrets: &Secrets) -> Result<ClientTls, TlsError> {
        let common = &tls.common;
        let verifier = ServerVerifier {
            check: load::peer_check(common, secrets)?,
            algs: self.provider.signature_verification_algorithms,
        };
        let builder = ClientConfig::builder_with_provider(self.provider_for(common))
            .with_protocol_versions(versions(common)?)
            .map_err(|source| TlsError::Rejected {
                what: "tls_params".into(),
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match load::certified_key(common, secrets, &self.provider)? {
            Some(key) => builder.with_client_cert_resolver(Arc::new(OneCert(key))),
            None => builder.with_no_client_auth(),
        };
        // `max_session_keys`: Envoy keeps that many sessions per context; 0 resumes none.
        config.resumption = match tls.max_session_keys {
            0 => rustls::client::Resumption::disabled(),
            n => rustls::client::Resumption::in_memory_sessions(n as usize),
        };
        config.alpn_protocols = alpn(common);
        let sni = if tls.sni.is_empty() {
            None
        } else {
            Some(
                ServerName::try_from(tls.sni.clone())
                    .map_err(|_| TlsError::Sni(tls.sni.clone()))?,
            )
        };
        Ok(ClientTls {
            config: Arc::new(config),
            sni,
        })
    }

    fn build_server(&self, tls: &DownstreamTls, secrets: &Secrets) -> Result<ServerTls, TlsError> {
        let common = &tls.common;
        let key = load::certified_key(common, secrets, &self.provider)?
            .ok_or(TlsError::NoServerCertificate)?;
        let local_uri_sans: Arc<[String]> = key
            .cert
            .first()
            .and_then(super::identity::peer_identity)
            .map(|id| id.uri_sans.into())
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let builder = ServerConfig::builder_with_provider(self.provider_for(common))
            .with_protocol_versions(versions(common)?)
            .map_err(|source| TlsError::Rejected {
                what: "tls_params".into(),
                source,
            })?;
        let check = match load::peer_check(common, secrets)? {
            Some(check) => Some(check),
            // A certificate demanded but nothing to check it against: any will do.
            None if tls.require_client_certificate => Some(PeerCheck {
                roots: None,
                san_matchers: Vec::new(),
            }),
            None => None,
        };
        let builder = match check {
            Some(check) => {
                let v = ClientVerifier::new(check, tls.require_client_certificate, &self.provider)
                    .map_err(|source| TlsError::Rejected {
                        what: "validation_context".into(),
                        source,
                    })?;
                builder.with_client_cert_verifier(Arc::new(v))
            }
            None => builder.with_client_cert_verifier(Arc::new(NoClientAuth)),
        };
        let mut config = builder.with_cert_resolver(Arc::new(OneCert(key)));
        // What Envoy offers unless told not to: tickets and a server-side session cache.
        if tls.sessions.stateful {
            config.session_storage = ServerSessionMemoryCache::new(SERVER_SESSIONS);
        } else {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        }
        if tls.sessions.stateless {
            config.ticketer =
                rustls::crypto::ring::Ticketer::new().map_err(|source| TlsError::Rejected {
                    what: "session tickets".into(),
                    source,
                })?;
        }
        config.alpn_protocols = alpn(common);
        let no_alpn = (!config.alpn_protocols.is_empty()).then(|| {
            let mut c = config.clone();
            c.alpn_protocols.clear();
            Arc::new(c)
        });
        Ok(ServerTls {
            config: Arc::new(config),
            no_alpn,
            local_uri_sans,
        })
    }
}

impl TlsContexts {
    /// The crypto provider narrowed to `tls_params.cipher_suites` and `ecdh_curves`, in their
    /// order. As in Envoy (BoringSSL), cipher suites restrict TLS 1.2 only; TLS 1.3's suites
    /// stay.
    fn provider_for(&self, common: &CommonTls) -> Arc<CryptoProvider> {
        if common.cipher_suites.is_empty() && common.ecdh_curves.is_empty() {
            return self.provider.clone();
        }
        let mut p = (*self.provider).clone();
        if !common.cipher_suites.is_empty() {
            let base = std::mem::take(&mut p.cipher_suites);
            p.cipher_suites = base
                .iter()
                .filter(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)))
                .copied()
                .collect();
            for want in &common.cipher_suites {
                let found = rustls::crypto::ring::ALL_CIPHER_SUITES.iter().find(|s| {
                    matches!(s, rustls::SupportedCipherSuite::Tls12(_)) && s.suite() == *want
                });
                if let Some(s) = found
                    && !p.cipher_suites.iter().any(|have| have.suite() == s.suite())
                {
                    p.cipher_suites.push(*s);
                }
            }
        }
        if !common.ecdh_curves.is_empty() {
            // Looked up among all of ring's groups: the defaults omit P-384.
            p.kx_groups = common
                .ecdh_curves
                .iter()
                .filter_map(|want| {
                    rustls::crypto::ring::ALL_KX_GROUPS
                        .iter()
                        .find(|g| g.name() == *want)
                        .copied()
                })
                .collect();
        }
        Arc::new(p)
    }
}

/// ring with Envoy's defaults: `ecdh_curves` X25519 then P-256 (ring's own list starts
/// with P-384, whose generic arithmetic made three quarters of a handshake's CPU) and
/// BoringSSL's cipher order: AES-128-GCM first, TLS 1.2 ECDHE with AEADs only.
fn envoy_provider() -> CryptoProvider {
    use rustls::crypto::ring::{cipher_suite as cs, kx_group};
    // rustls 0.23.48 deprecates ring's provider (no post-quantum key exchange); the
    // project uses ring to stay free of aws-lc's C build.
    #[allow(deprecated)]
    let ring = rustls::crypto::ring::default_provider();
    CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        ..ring
    }
}

fn names(secrets: &[Arc<Secret>]) -> Vec<&str> {
    secrets.iter().map(|s| s.name.as_str()).collect()
}

fn versions(common: &CommonTls) -> Result<&'static [&'static SupportedProtocolVersion], TlsError> {
    use TlsVersion::{V1_2, V1_3};
    static BOTH: [&SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY_12: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
    static ONLY_13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match (common.min_version, common.max_version) {
        (V1_2, V1_3) => Ok(&BOTH),
        (V1_2, V1_2) => Ok(&ONLY_12),
        (V1_3, V1_3) => Ok(&ONLY_13),
        (min @ V1_3, max @ V1_2) => Err(TlsError::Versions { min, max }),
    }
}

fn alpn(common: &CommonTls) -> Vec<Vec<u8>> {
    common.alpn.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// The one certificate a context presents, whatever the peer hints.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesClientCert for OneCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A cheap hash of a context: strings and small fields, lengths of inline PEM. Collisions
/// are resolved by comparing the whole context.
fn hash_common(h: &mut DefaultHasher, c: &CommonTls) {
    fn ds(h: &mut DefaultHasher, d: &DataSource) {
        match d {
            DataSource::Inline(b) => (0u8, b.len()).hash(h),
            DataSource::File(p) => (1u8, p).hash(h),
        }
    }
    match &c.certificate {
        None => 0u8.hash(h),
        Some(CertificateSource::Inline(t)) => {
            1u8.hash(h);
            ds(h, &t.certificate_chain);
            ds(h, &t.private_key);
        }
        Some(CertificateSource::Sds(r)) => (2u8, r).hash(h),
    }
    if let Some(v) = &c.validation {
        if let Some(ca) = &v.inline.trusted_ca {
            ds(h, ca);
        }
        (v.inline.san_matchers.len(), &v.sds).hash(h);
    }
    (&c.alpn, c.min_version, c.max_version).hash(h);
    for s in &c.cipher_suites {
        u16::from(*s).hash(h);
    }
    for g in &c.ecdh_curves {
        u16::from(*g).hash(h);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the cache consistent (every step is one push
    // or removal), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Cache ===

struct Entry<K, V> {
    ctx: K,
    secrets: Vec<Arc<Secret>>,
    value: V,
    used: u64,
}

struct Cache<K, V> {
    buckets: HashMap<u64, Vec<Entry<K, V>>>,
    len: usize,
    /// Advanced on every access: the LRU clock.
    tick: u64,
    /// `tick` at the last sweep.
    swept: u64,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Cache {
            buckets: HashMap::new(),
            len: 0,
            tick: 0,
            swept: 0,
        }
    }
}

/// The same secrets: the same `Arc`s, or (a store that re-created them) the same content.
fn same_secrets(a: &[Arc<Secret>], b: &[Arc<Secret>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(x, y) || **x == **y)
}

impl<K: PartialEq + Clone, V: Clone> Cache<K, V> {
    fn get(&mut self, key: u64, ctx: &K, secrets: &[Arc<Secret>]) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let e = self
            .buckets
            .get_mut(&key)?
            .iter_mut()
            .find(|e| e.ctx == *ctx && same_secrets(&e.secrets, secrets))?;
        e.used = tick;
        if !e
            .secrets
            .iter()
            .zip(secrets)
            .all(|(x, y)| Arc::ptr_eq(x, y))
        {
            // Equal content in new Arcs: hold the new ones so the next compare is a pointer's.
            e.secrets = secrets.to_vec();
        }
        Some(e.value.clone())
    }

    fn insert(&mut self, key: u64, ctx: &K, secrets: Vec<Arc<Secret>>, value: V, capacity: usize) {
        self.tick += 1;
        let bucket = self.buckets.entry(key).or_default();
        // The same context with other (rotated) secrets: superseded.
        let before = bucket.len();
        bucket.retain(|e| e.ctx != *ctx);
        self.len -= before - bucket.len();
        bucket.push(Entry {
            ctx: ctx.clone(),
            secrets,
            value,
            used: self.tick,
        });
        self.len += 1;
        while self.len > capacity {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        let Some((&key, idx)) = self
            .buckets
            .iter()
            .flat_map(|(k, b)| b.iter().enumerate().map(move |(i, e)| ((k, i), e.used)))
            .min_by_key(|(_, used)| *used)
            .map(|(at, _)| at)
        else {
            return;
        };
        if let Some(bucket) = self.buckets.get_mut(&key) {
            bucket.swap_remove(idx);
            self.len -= 1;
            if bucket.is_empty() {
                self.buckets.remove(&key);
            }
        }
    }

    fn sweep(&mut self) {
        let swept = self.swept;
        self.buckets.retain(|_, b| {
            b.retain(|e| e.used > swept);
            !b.is_empty()
        });
        self.len = self.buckets.values().map(Vec::len).sum();
        self.swept = self.tick;
    }
}
