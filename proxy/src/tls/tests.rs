//! Loopback handshakes between skiff's own client and server configurations, with an rcgen
//! CA issuing SPIFFE certificates as Istio's does.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType as RcSan,
};
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::model::tls::{
    CertificateSource, CommonTls, DataSource, DownstreamTls, SanMatcher, SanType, SdsRef,
    SdsSource, Secret, SecretKind, Secrets, TlsCertificate, TlsVersion, UpstreamTls, Validation,
    ValidationContext,
};
use crate::rbac::{StringKind, StringMatch};

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// A mesh root, as istiod's self-signed CA.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(org: &str) -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A workload certificate with `sans` (SPIFFE URIs, or DNS names) and `dn`.
    fn issue_with(&self, sans: &[&str], dn: DistinguishedName) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.contains("://") {
                    RcSan::URI((*s).try_into().unwrap())
                } else {
                    RcSan::DnsName((*s).try_into().unwrap())
                }
            })
            .collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// An Istio workload certificate: one SPIFFE URI SAN, empty subject.
    fn issue(&self, uri: &str) -> (String, String) {
        self.issue_with(&[uri], DistinguishedName::new())
    }

    /// Istio's secrets: `default` (this workload) and `ROOTCA` (this CA).
    fn secrets(&self, uri: &str) -> Secrets {
        secrets(self.issue(uri), &self.pem)
    }
}

fn inline(s: &str) -> DataSource {
    DataSource::Inline(Arc::from(s.as_bytes()))
}

fn secrets((cert, key): (String, String), root: &str) -> Secrets {
    let default = Secret {
        name: "default".into(),
        kind: SecretKind::Certificate(TlsCertificate {
            certificate_chain: inline(&cert),
            private_key: inline(&key),
        }),
    };
    let rootca = Secret {
        name: "ROOTCA".into(),
        kind: SecretKind::Validation(ValidationContext {
            trusted_ca: Some(inline(root)),
            san_matchers: Vec::new(),
        }),
    };
    [
        ("default".to_string(), Arc::new(default)),
        ("ROOTCA".to_string(), Arc::new(rootca)),
    ]
    .into()
}

fn sds(name: &str) -> SdsRef {
    SdsRef {
        name: name.into(),
        source: SdsSource::Ads,
    }
}

fn uri_exact(uri: &str) -> SanMatcher {
    SanMatcher {
        san_type: SanType::Uri,
        matcher: StringMatch {
            kind: StringKind::Exact(uri.into()),
            ignore_case: false,
        },
    }
}

/// Istio's `combined_validation_context`: SAN matchers inline, roots from `ROOTCA`.
fn istio_validation(sans: Vec<SanMatcher>) -> Option<Validation> {
    Some(Validation {
        inline: ValidationContext {
            trusted_ca: None,
            san_matchers: sans,
        },
        sds: Some(sds("ROOTCA")),
    })
}

fn common(validation: Option<Validation>, alpn: &[&str]) -> CommonTls {
    CommonTls {
        certificate: Some(CertificateSource::Sds(sds("default"))),
        validation,
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
        min_version: TlsVersion::V1_2,
        max_version: TlsVersion::V1_3,
        cipher_suites: Vec::new(),
        ecdh_curves: Vec::new(),
    }
}

/// An Istio outbound cluster's context, expecting the server to be `want`.
fn upstream(want: &str) -> UpstreamTls {
    UpstreamTls {
        max_session_keys: 1,
        common: common(
            istio_validation(vec![uri_exact(want)]),
            &["istio-peer-exchange", "istio"],
        ),
        sni: "outbound_.8080_._.server.default.svc.cluster.local".into(),
    }
}

/// An Istio inbound (STRICT) filter chain's context.
fn downstream(require: bool) -> DownstreamTls {
    DownstreamTls {
        sessions: Default::default(),
        common: common(istio_validation(Vec::new()), &["h2", "http/1.1"]),
        require_client_certificate: require,
    }
}

async fn handshake(
    client: &ClientTls,
    server: &ServerTls,
) -> (
    Result<Handshaken<DuplexStream>, HandshakeError>,
    Result<Accepted<DuplexStream>, HandshakeError>,
) {
    let (c, s) = tokio::io::duplex(1 << 16);
    tokio::join!(connect(c, client, LOCAL), accept(s, server))
}

/// Bytes both ways over an established pair.
async fn exchange(c: &mut Handshaken<DuplexStream>, s: &mut Accepted<DuplexStream>, msg: &[u8]) {
    c.stream.write_all(msg).await.unwrap();
    c.stream.flush().await.unwrap();
    let mut buf = vec![0; msg.len()];
    s.stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
    s.stream.write_all(msg).await.unwrap();
    s.stream.flush().await.unwrap();
    c.stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

/// A mesh with a client workload `default/client` and a server `default/server`.
struct Mesh {
    ca: Ca,
    client: Secrets,
    server: Secrets,
}

fn mesh() -> Mesh {
    let ca = Ca::new("cluster.local");
    Mesh {
        client: ca.secrets(&spiffe("default", "client")),
        server: ca.secrets(&spiffe("default", "server")),
        ca,
    }
}

#[tokio::test]
async fn mtls_with_matching_san_gives_both_identities() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    let mut down = downstream(true);
    down.common.alpn = vec!["istio-peer-exchange".into(), "h2".into()];
    let server = ctx.server(&down, &m.server).unwrap();

    let (c, s) = handshake(&client, &server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.peer.uri_sans, vec![spiffe("default", "server")]);
    assert_eq!(
        s.peer.as_ref().unwrap().uri_sans,
        vec![spiffe("default", "client")]
    );
    // The server's preference among what the client offered, as Envoy's selection.
    assert_eq!(c.alpn.as_deref(), Some(&b"istio-peer-exchange"[..]));
    assert_eq!(s.alpn, c.alpn);
    assert_eq!(
        s.sni.as_deref(),
        Some("outbound_.8080_._.server.default.svc.cluster.local")
    );
    // Envoy's defaults: X25519 and AES-128-GCM first.
    let conn = c.stream.get_ref().1;
    assert_eq!(
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519)
    );
    exchange(&mut c, &mut s, b"hello through mtls").await;
}

#[tokio::test]
async fn mtls_over_tcp_loopback() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut a = accept(sock, &server).await.unwrap();
        let mut buf = [0u8; 4];
        a.stream.read_exact(&mut buf).await.unwrap();
        a.stream.write_all(&buf).await.unwrap();
        a.stream.shutdown().await.unwrap();
        a.peer
    });
    let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = connect(sock, &client, addr.ip()).await.unwrap();
    c.stream.write_all(b"ping").await.unwrap();
    let mut back = Vec::new();
    c.stream.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"ping");
    let peer = srv.await.unwrap().unwrap();
    assert_eq!(peer, PeerIdentity::spiffe(spiffe("default", "client")));
}

#[tokio::test]
async fn wrong_san_is_refused_as_fail_verify_san_naming_the_presented_sans() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let client = ctx
        .client(&upstream(&spiffe("default", "other")), &m.client)
        .unwrap();
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let err = c.unwrap_err();
    assert_eq!(err.stat_suffix(), "fail_verify_san");
    let line = err.to_string();
    assert!(
        line.contains("URI:spiffe://cluster.local/ns/default/sa/server"),
        "{line}"
    );
    assert!(
        line.contains("spiffe://cluster.local/ns/default/sa/other"),
        "{line}"
    );
    // The server only sees the client's alert.
    assert_eq!(s.unwrap_err().stat_suffix(), "connection_error");

    // The server side checks clients' SANs the same way.
    let mut down = downstream(false);
    down.common.validation = istio_validation(vec![uri_exact(&spiffe("prod", "frontend"))]);
    let server = ctx.server(&down, &m.server).unwrap();
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    let (_, s) = handshake(&client, &server).await;
    let err = s.unwrap_err();
    assert_eq!(err.stat_suffix(), "fail_verify_san");
    assert!(
        err.to_string()
            .contains("URI:spiffe://cluster.local/ns/default/sa/client")
    );
}

#[tokio::test]
async fn untrusted_root_is_refused_as_fail_verify_error() {
    let m = mesh();
    let rogue = Ca::new("rogue");
    // The right name, signed by a root the client does not trust.
    let server_secrets = secrets(rogue.issue(&spiffe("default", "server")), &m.ca.pem);
    let ctx = TlsContexts::new();
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    let server = ctx.server(&downstream(true), &server_secrets).unwrap();
    let (c, _) = handshake(&client, &server).await;
    let err = c.unwrap_err();
    assert_eq!(err.stat_suffix(), "fail_verify_error");
    let line = err.to_string();
    assert!(line.contains("UnknownIssuer"), "{line}");
    assert!(
        line.contains("URI:spiffe://cluster.local/ns/default/sa/server"),
        "{line}"
    );

    // A client certificate from the rogue root is refused by the server.
    let client_secrets = secrets(rogue.issue(&spiffe("default", "client")), &m.ca.pem);
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &client_secrets)
        .unwrap();
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    let (_, s) = handshake(&client, &server).await;
    assert_eq!(s.unwrap_err().stat_suffix(), "fail_verify_error");
}

#[tokio::test]
async fn missing_client_certificate_is_refused_only_when_required() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let mut up = upstream(&spiffe("default", "server"));
    up.common.certificate = None;
    let client = ctx.client(&up, &m.client).unwrap();

    let server = ctx.server(&downstream(true), &m.server).unwrap();
    let (_, s) = handshake(&client, &server).await;
    let err = s.unwrap_err();
    assert_eq!(err.stat_suffix(), "fail_verify_no_cert");
    assert_eq!(
        err.to_string(),
        "peer presented no certificate, and one is required"
    );

    // PERMISSIVE-like: a certificate is asked for but optional; no identity without one.
    let server = ctx.server(&downstream(false), &m.server).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(s.peer, None);
    exchange(&mut c, &mut s, b"anonymous").await;
}

#[tokio::test]
async fn no_validation_context_accepts_any_certificate() {
    let m = mesh();
    // A self-signed server certificate nobody issued.
    let stranger = Ca::new("stranger");
    let server_secrets = secrets(stranger.issue(&spiffe("x", "y")), &stranger.pem);
    let ctx = TlsContexts::new();
    let mut up = upstream("unused");
    up.common.validation = None;
    up.sni.clear();
    let client = ctx.client(&up, &m.client).unwrap();
    let mut down = downstream(false);
    down.common.validation = None;
    let server = ctx.server(&down, &server_secrets).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.peer.uri_sans, vec![spiffe("x", "y")]);
    // No validation context on the server: no certificate was asked for.
    assert_eq!(s.peer, None);
    assert_eq!(s.sni, None);
    exchange(&mut c, &mut s, b"plain tls").await;
}

#[tokio::test]
async fn rotation_builds_a_new_config_and_leaves_open_streams_alone() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let up = upstream(&spiffe("default", "server"));
    let down = downstream(true);
    let client = ctx.client(&up, &m.client).unwrap();
    let before = ctx.server(&down, &m.server).unwrap();
    let (c, s) = handshake(&client, &before).await;
    let (mut old_c, mut old_s) = (c.unwrap(), s.unwrap());
    let old_leaf = old_c.stream.get_ref().1.peer_certificates().unwrap()[0].clone();

    // SDS pushes a new `default` for the server: same identity, new key and certificate.
    let mut rotated = m.server.clone();
    let fresh = m.ca.secrets(&spiffe("default", "server"));
    rotated.insert("default".into(), fresh["default"].clone());
    let after = ctx.server(&down, &rotated).unwrap();
    assert!(!Arc::ptr_eq(&before.config, &after.config));
    // The same secrets again: the cached configuration.
    assert!(Arc::ptr_eq(
        &after.config,
        &ctx.server(&down, &rotated).unwrap().config
    ));
    assert_eq!(
        ctx.len(),
        (1, 1),
        "the rotated-away configuration is superseded"
    );

    let (c, s) = handshake(&client, &after).await;
    let (mut new_c, mut new_s) = (c.unwrap(), s.unwrap());
    let new_leaf = new_c.stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(
        old_leaf, new_leaf,
        "new connections present the new certificate"
    );
    let DataSource::Inline(pem) = (match &fresh["default"].kind {
        SecretKind::Certificate(c) => c.certificate_chain.clone(),
        SecretKind::Validation(_) => unreachable!(),
    }) else {
        unreachable!()
    };
    use rustls_pki_types::pem::PemObject;
    let fresh_der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    assert_eq!(new_leaf, fresh_der);

    // The stream opened before the rotation keeps its session.
    exchange(&mut old_c, &mut old_s, b"still here").await;
    exchange(&mut new_c, &mut new_s, b"new cert").await;
}

#[tokio::test]
async fn alpn_without_overlap_goes_on_without_alpn() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    // The server speaks h2/http1.1, the client offers only Istio's protocols: Envoy
    // completes the handshake with no ALPN (rustls alone would abort it).
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!((c.alpn, s.alpn), (None, None));

    let mut up = upstream(&spiffe("default", "server"));
    up.common.alpn = vec!["http/1.1".into(), "h2".into()];
    let client = ctx.client(&up, &m.client).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let (c, s) = (c.unwrap(), s.unwrap());
    // Server preference: h2 first in the server's list.
    assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(s.alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn resumed_sessions_keep_the_peer_identity() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    for round in 0..3 {
        let (c, s) = handshake(&client, &server).await;
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        // TLS 1.3 tickets arrive after the handshake: read once so the client stores them.
        exchange(&mut c, &mut s, b"x").await;
        let kind = c.stream.get_ref().1.handshake_kind();
        if round > 0 {
            assert_eq!(kind, Some(HandshakeKind::Resumed), "round {round}");
        }
        assert_eq!(c.peer.uri_sans, vec![spiffe("default", "server")]);
        assert_eq!(
            s.peer.as_ref().map(|p| p.uri_sans.clone()),
            Some(vec![spiffe("default", "client")])
        );
    }
}

/// `max_session_keys: 0` on the client, or a server offering neither tickets nor a session
/// cache, makes every handshake a full one, as in Envoy.
#[tokio::test]
async fn resumption_can_be_turned_off_on_either_side() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let kinds = |client: ClientTls, server: ServerTls| async move {
        let mut out = Vec::new();
        for _ in 0..3 {
            let (c, s) = handshake(&client, &server).await;
            let (mut c, mut s) = (c.unwrap(), s.unwrap());
            exchange(&mut c, &mut s, b"x").await;
            out.push(c.stream.get_ref().1.handshake_kind());
        }
        out
    };
    let full = vec![Some(HandshakeKind::Full); 3];
    let mut up = upstream(&spiffe("default", "server"));
    up.max_session_keys = 0;
    let client = ctx.client(&up, &m.client).unwrap();
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    assert_eq!(kinds(client, server).await, full);

    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    let mut down = downstream(true);
    down.sessions = crate::model::tls::ServerSessions {
        stateless: false,
        stateful: false,
    };
    let server = ctx.server(&down, &m.server).unwrap();
    assert_eq!(kinds(client, server).await, full);
}

#[tokio::test]
async fn tls12_only_and_version_mismatch() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let mut up = upstream(&spiffe("default", "server"));
    up.common.max_version = TlsVersion::V1_2;
    let client = ctx.client(&up, &m.client).unwrap();
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(
        c.stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(
        s.peer.as_ref().unwrap().uri_sans,
        vec![spiffe("default", "client")]
    );
    exchange(&mut c, &mut s, b"twelve").await;

    let mut down = downstream(true);
    down.common.min_version = TlsVersion::V1_3;
    let server = ctx.server(&down, &m.server).unwrap();
    let (c, s) = handshake(&client, &server).await;
    assert_eq!(c.unwrap_err().stat_suffix(), "connection_error");
    assert_eq!(s.unwrap_err().stat_suffix(), "connection_error");
}

#[tokio::test]
async fn cipher_suites_and_curves_narrow_what_is_negotiated() {
    use rustls::{CipherSuite, NamedGroup};
    let m = mesh();
    let ctx = TlsContexts::new();
    let mut up = upstream(&spiffe("default", "server"));
    up.common.max_version = TlsVersion::V1_2;
    up.common.cipher_suites = vec![CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256];
    // P-384 is outside the defaults (X25519, P-256) but ring has it.
    up.common.ecdh_curves = vec![NamedGroup::secp384r1];
    let client = ctx.client(&up, &m.client).unwrap();
    // The server's defaults (Envoy's: X25519, P-256) do not offer P-384 either.
    let mut p384 = downstream(true);
    p384.common.ecdh_curves = vec![NamedGroup::secp384r1];
    let server = ctx.server(&p384, &m.server).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let (c, _s) = (c.unwrap(), s.unwrap());
    let conn = c.stream.get_ref().1;
    assert_eq!(
        conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
    );
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(NamedGroup::secp384r1)
    );

    // A server limited to another TLS 1.2 suite shares none with this client.
    let mut down = p384;
    down.common.max_version = TlsVersion::V1_2;
    down.common.cipher_suites = vec![CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256];
    let server = ctx.server(&down, &m.server).unwrap();
    let (c, s) = handshake(&client, &server).await;
    assert_eq!(c.unwrap_err().stat_suffix(), "connection_error");
    assert_eq!(s.unwrap_err().stat_suffix(), "connection_error");
}

#[tokio::test]
async fn a_self_signed_server_certificate_trusted_as_its_own_root() {
    // Envoy test setups often trust the server's own self-signed certificate.
    let mut params = CertificateParams::new(vec!["server.example".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap().pem();
    let server_secrets = secrets((cert.clone(), key.serialize_pem()), &cert);
    let ctx = TlsContexts::new();
    let mut down = downstream(false);
    down.common.validation = None;
    let server = ctx.server(&down, &server_secrets).unwrap();
    let mut up = upstream("unused");
    up.common.certificate = None;
    up.common.validation = Some(Validation {
        inline: ValidationContext {
            trusted_ca: Some(inline(&cert)),
            san_matchers: vec![SanMatcher {
                san_type: SanType::Dns,
                matcher: StringMatch {
                    kind: StringKind::Exact("server.example".into()),
                    ignore_case: false,
                },
            }],
        },
        sds: None,
    });
    let client = ctx.client(&up, &Secrets::new()).unwrap();
    let (c, s) = handshake(&client, &server).await;
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    assert_eq!(c.peer.dns_sans, vec!["server.example".to_string()]);
    exchange(&mut c, &mut s, b"self-signed").await;
}

#[test]
fn identity_has_sans_and_an_rfc2253_subject() {
    let ca = Ca::new("cluster.local");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "US");
    dn.push(DnType::OrganizationName, "Acme, Inc.");
    dn.push(DnType::CommonName, "#web ");
    let (pem, _) = ca.issue_with(&[&spiffe("prod", "web"), "web.prod.svc.cluster.local"], dn);
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let id = peer_identity(&der).unwrap();
    assert_eq!(id.uri_sans, vec![spiffe("prod", "web")]);
    assert_eq!(id.dns_sans, vec!["web.prod.svc.cluster.local".to_string()]);
    // Last RDN first, RFC 2253 escapes, as Envoy's subjectPeerCertificate().
    assert_eq!(id.subject, r"CN=\#web\ ,O=Acme\, Inc.,C=US");

    let (pem, _) = ca.issue(&spiffe("a", "b"));
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    assert_eq!(peer_identity(&der).unwrap().subject, "");
}

#[test]
fn cache_reuses_by_content_and_sweeps_unused_entries() {
    let m = mesh();
    let ctx = TlsContexts::with_capacity(2);
    let up = upstream(&spiffe("default", "server"));
    let a = ctx.client(&up, &m.client).unwrap();
    // Another snapshot: equal context and secrets in new Arcs.
    let copy: Secrets = m
        .client
        .iter()
        .map(|(k, v)| (k.clone(), Arc::new((**v).clone())))
        .collect();
    let b = ctx.client(&up.clone(), &copy).unwrap();
    assert!(Arc::ptr_eq(&a.config, &b.config));

    // Capacity 2: a third context evicts the least recently used.
    let other = |sni: &str| {
        let mut u = up.clone();
        u.sni = sni.into();
        u
    };
    ctx.client(&other("b.example"), &m.client).unwrap();
    ctx.client(&up, &m.client).unwrap();
    ctx.client(&other("c.example"), &m.client).unwrap();
    assert_eq!(ctx.len(), (2, 0));
    let again = ctx.client(&up, &m.client).unwrap();
    assert!(
        Arc::ptr_eq(&a.config, &again.config),
        "the recently used one stayed"
    );

    // Two sweeps with only `up` used in between: the rest goes.
    ctx.sweep();
    ctx.client(&up, &m.client).unwrap();
    ctx.sweep();
    assert_eq!(ctx.len(), (1, 0));
    ctx.sweep();
    assert!(ctx.is_empty());
}

#[test]
fn build_errors_name_the_secret_or_file_and_the_problem() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let up = upstream(&spiffe("default", "server"));

    let mut no_default = m.client.clone();
    no_default.remove("default");
    let e = ctx.client(&up, &no_default).unwrap_err();
    assert!(
        matches!(&e, TlsError::MissingSecret(n) if n == "default"),
        "{e}"
    );
    assert!(e.to_string().contains("secret \"default\" not found"));

    let mut swapped = m.client.clone();
    swapped.insert("default".into(), m.client["ROOTCA"].clone());
    let e = ctx.client(&up, &swapped).unwrap_err().to_string();
    assert_eq!(
        e,
        "secret \"default\" is a validation_context, expected a tls_certificate"
    );

    // The certificate of one workload with the key of another.
    let (cert, _) = m.ca.issue(&spiffe("default", "a"));
    let (_, key) = m.ca.issue(&spiffe("default", "b"));
    let e = ctx
        .client(&up, &secrets((cert, key), &m.ca.pem))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "secret \"default\": private key does not match the certificate"
    );

    let (_, key) = m.ca.issue(&spiffe("default", "a"));
    let e = ctx
        .client(&up, &secrets((key.clone(), key), &m.ca.pem))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "secret \"default\" certificate_chain: no PEM certificate"
    );

    let mut file_up = up.clone();
    file_up.common.certificate = Some(CertificateSource::Inline(TlsCertificate {
        certificate_chain: DataSource::File("/nonexistent/skiff/cert.pem".into()),
        private_key: DataSource::File("/nonexistent/skiff/key.pem".into()),
    }));
    let e = ctx.client(&file_up, &m.client).unwrap_err().to_string();
    assert!(
        e.starts_with(
            "tls_certificates[0] certificate_chain (file /nonexistent/skiff/cert.pem): \
             reading /nonexistent/skiff/cert.pem:"
        ),
        "{e}"
    );

    // SAN matchers with no CA anywhere: refused as Envoy refuses the configuration.
    let mut no_ca = up.clone();
    if let Some(v) = &mut no_ca.common.validation {
        v.sds = None;
    }
    assert!(matches!(
        ctx.client(&no_ca, &m.client),
        Err(TlsError::SanWithoutCa)
    ));

    let mut down = downstream(true);
    down.common.certificate = None;
    assert_eq!(
        ctx.server(&down, &m.server).unwrap_err().to_string(),
        "downstream TLS context has no certificate"
    );
    let mut inverted = up.clone();
    inverted.common.min_version = TlsVersion::V1_3;
    inverted.common.max_version = TlsVersion::V1_2;
    assert!(matches!(
        ctx.client(&inverted, &m.client),
        Err(TlsError::Versions { .. })
    ));
}

#[tokio::test]
async fn certificates_read_from_files() {
    let m = mesh();
    let dir = std::env::temp_dir().join(format!("skiff-tls-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = m.ca.issue(&spiffe("default", "server"));
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    std::fs::write(dir.join("root.pem"), &m.ca.pem).unwrap();
    let down = DownstreamTls {
        sessions: Default::default(),
        common: CommonTls {
            certificate: Some(CertificateSource::Inline(TlsCertificate {
                certificate_chain: DataSource::File(dir.join("cert.pem")),
                private_key: DataSource::File(dir.join("key.pem")),
            })),
            validation: Some(Validation {
                inline: ValidationContext {
                    trusted_ca: Some(DataSource::File(dir.join("root.pem"))),
                    san_matchers: vec![uri_exact(&spiffe("default", "client"))],
                },
                sds: None,
            }),
            alpn: Vec::new(),
            min_version: TlsVersion::V1_2,
            max_version: TlsVersion::V1_3,
            cipher_suites: Vec::new(),
            ecdh_curves: Vec::new(),
        },
        require_client_certificate: true,
    };
    let ctx = TlsContexts::new();
    let server = ctx.server(&down, &Secrets::new());
    std::fs::remove_dir_all(&dir).unwrap();
    let server = server.unwrap();
    let client = ctx
        .client(&upstream(&spiffe("default", "server")), &m.client)
        .unwrap();
    let (c, s) = handshake(&client, &server).await;
    c.unwrap();
    assert_eq!(
        s.unwrap().peer.unwrap().uri_sans,
        vec![spiffe("default", "client")]
    );
}

/// CPU time this thread has run, from `/proc/thread-self/schedstat` (ns): the machine is
/// shared, so wall-clock rates say more about the neighbours than about the handshake.
fn thread_cpu() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    let ns = stat.split_whitespace().next().unwrap().parse().unwrap();
    std::time::Duration::from_nanos(ns)
}

/// Full and resumed mTLS handshakes of skiff's client+server pair on one thread, per CPU
/// second (the report of issue 15; run in release:
/// `cargo test --release -p skiff --lib tls::tests::handshake_rate -- --ignored --nocapture`).
#[tokio::test]
#[ignore = "a measurement, not a test"]
async fn handshake_rate() {
    let m = mesh();
    let ctx = TlsContexts::new();
    let up = upstream(&spiffe("default", "server"));
    let server = ctx.server(&downstream(true), &m.server).unwrap();
    let resuming = ctx.client(&up, &m.client).unwrap();
    let mut full = resuming.clone();
    let mut cfg = (*full.config).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    full.config = Arc::new(cfg);
    for (name, client) in [("full", &full), ("resumed", &resuming)] {
        let n = 2000u32;
        let (wall, cpu) = (tokio::time::Instant::now(), thread_cpu());
        for _ in 0..n {
            let (c, s) = handshake(client, &server).await;
            let (mut c, mut s) = (c.unwrap(), s.unwrap());
            exchange(&mut c, &mut s, b"x").await;
        }
        let (wall, cpu) = (wall.elapsed(), thread_cpu() - cpu);
        println!(
            "{name} mTLS handshakes (client+server on one thread, ECDSA P-256, TLS 1.3): \
             {:.0} per CPU second ({:.0} us CPU each), {:.0}/s wall",
            f64::from(n) / cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / f64::from(n),
            f64::from(n) / wall.as_secs_f64(),
        );
    }
}
