//! skiff's TLS runtime (`skiff::tls`) against real Envoy (BoringSSL), both directions, with
//! SPIFFE certificates from one rcgen CA: mutual TLS with SAN checks, ALPN, and each side
//! refusing a wrong SAN the way the other counts it. Envoy's own rendering of the peer
//! subject (`%DOWNSTREAM_PEER_SUBJECT%`) is compared with skiff's.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::HandshakeKind;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use skiff::model::tls::{
    CertificateSource, CommonTls, DataSource, DownstreamTls, SanMatcher, SanType as MSanType,
    SdsRef, SdsSource, Secret, SecretKind, Secrets, TlsCertificate, TlsVersion, UpstreamTls,
    Validation, ValidationContext,
};
use skiff::rbac::{StringKind, StringMatch};
use skiff::tls::{TlsContexts, accept, connect};
use skiff_tests::Envoy;
use skiff_tests::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "cluster.local");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// (certificate PEM, key PEM) for `sa`, with subject `dn`.
    fn issue(&self, sa: &str, dn: DistinguishedName) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(spiffe(sa).try_into().unwrap())];
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
}

fn inline(s: &str) -> DataSource {
    DataSource::Inline(Arc::from(s.as_bytes()))
}

/// Istio's two SDS secrets for a workload.
fn secrets((cert, key): &(String, String), root: &str) -> Secrets {
    let default = Secret {
        name: "default".into(),
        kind: SecretKind::Certificate(TlsCertificate {
            certificate_chain: inline(cert),
            private_key: inline(key),
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

fn common(want: Option<&str>, alpn: &[&str]) -> CommonTls {
    let sds = |name: &str| SdsRef {
        name: name.into(),
        source: SdsSource::Ads,
    };
    CommonTls {
        certificate: Some(CertificateSource::Sds(sds("default"))),
        validation: Some(Validation {
            inline: ValidationContext {
                trusted_ca: None,
                san_matchers: want
                    .map(|w| SanMatcher {
                        san_type: MSanType::Uri,
                        matcher: StringMatch {
                            kind: StringKind::Exact(w.into()),
                            ignore_case: false,
                        },
                    })
                    .into_iter()
                    .collect(),
            },
            sds: Some(sds("ROOTCA")),
        }),
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
        min_version: TlsVersion::V1_2,
        max_version: TlsVersion::V1_3,
        cipher_suites: Vec::new(),
        ecdh_curves: Vec::new(),
    }
}

/// Envoy's `CommonTlsContext` YAML with files in `dir` named `name`.{crt,key} and the root.
fn envoy_tls(dir: &Path, name: &str, want: &str, alpn: &str) -> String {
    let d = dir.display();
    format!(
        r#"common_tls_context:
            alpn_protocols: [{alpn}]
            tls_certificates:
            - certificate_chain: {{ filename: {d}/{name}.crt }}
              private_key: {{ filename: {d}/{name}.key }}
            validation_context:
              trusted_ca: {{ filename: {d}/root.crt }}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ exact: "{want}" }}"#
    )
}

async fn admin_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

fn stat(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One connection to skiff's TLS server: the peer's URI SANs and subject, the ALPN and SNI
/// it saw, whether the session was resumed; or the error's stat suffix.
type Seen = Result<(Vec<String>, String, Option<Vec<u8>>, Option<String>, bool), &'static str>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skiff_and_envoy_speak_mtls_with_spiffe_identities_both_ways() {
    let ca = Ca::new();
    let mut skiff_dn = DistinguishedName::new();
    skiff_dn.push(DnType::CountryName, "US");
    skiff_dn.push(DnType::LocalityName, "Zürich");
    skiff_dn.push(DnType::OrganizationName, "Acme, Inc.");
    skiff_dn.push(DnType::CommonName, "skiff");
    let skiff_cert = ca.issue("skiff", skiff_dn);
    let intruder_cert = ca.issue("intruder", DistinguishedName::new());
    let mut envoy_dn = DistinguishedName::new();
    envoy_dn.push(DnType::CommonName, "envoy");
    let envoy_cert = ca.issue("envoy", envoy_dn);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root.crt"), &ca.pem).unwrap();
    std::fs::write(dir.path().join("envoy.crt"), &envoy_cert.0).unwrap();
    std::fs::write(dir.path().join("envoy.key"), &envoy_cert.1).unwrap();

    // skiff's TLS server: accepts Envoy's upstream connections, reports each, echoes.
    let server_ctx = Arc::new(TlsContexts::new());
    let server_tls = server_ctx
        .server(
            &DownstreamTls {
                sessions: Default::default(),
                common: common(Some(&spiffe("envoy")), &["istio-peer-exchange", "h2"]),
                require_client_certificate: true,
            },
            &secrets(&skiff_cert, &ca.pem),
        )
        .unwrap();
    let skiff_server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let skiff_addr = skiff_server.local_addr().unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    tokio::spawn(async move {
        while let Ok((sock, _)) = skiff_server.accept().await {
            let (tls, seen) = (server_tls.clone(), seen_tx.clone());
            tokio::spawn(async move {
                match accept(sock, &tls).await {
                    Ok(mut a) => {
                        let peer = a.peer.clone().unwrap_or_default();
                        let resumed =
                            a.stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                        let _ = seen.send(Ok((
                            peer.uri_sans,
                            peer.subject,
                            a.alpn.clone(),
                            a.sni.clone(),
                            resumed,
                        )));
                        let mut buf = [0u8; 64];
                        if let Ok(n) = a.stream.read(&mut buf).await {
                            let _ = a.stream.write_all(&buf[..n]).await;
                            let _ = a.stream.shutdown().await;
                        }
                    }
                    Err(e) => {
                        let _ = seen.send(Err(e.stat_suffix()));
                    }
                }
            });
        }
    });

    // Envoy: a TLS listener (HCM answering with the peer it verified), and two plaintext
    // listeners whose clusters dial skiff's server with mTLS, expecting its right and a
    // wrong identity.
    let (admin, tls_port, up_port, wrong_port) =
        (free_port(), free_port(), free_port(), free_port());
    let sni = "outbound_.15443_._.skiff.default.svc.cluster.local";
    let cluster = |name: &str, want: &str| {
        format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {sni}
        {tls}
"#,
            port = skiff_addr.port(),
            tls = envoy_tls(dir.path(), "envoy", want, "istio-peer-exchange, istio")
        )
    };
    let plain = |name: &str, port: u16, cluster: &str| {
        skiff_tests::tcp_proxy_listener_yaml(name, port, name, cluster)
    };
    let bootstrap = format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: tls_in
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tls_port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {down}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: tls_in
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                direct_response: {{ status: 200, body: {{ inline_string: ok }} }}
              response_headers_to_add:
              - header: {{ key: x-peer-uri, value: "%DOWNSTREAM_PEER_URI_SAN%" }}
              - header: {{ key: x-peer-subject, value: "%DOWNSTREAM_PEER_SUBJECT%" }}
{up}{wrong}  clusters:
{c_ok}{c_wrong}"#,
        down = envoy_tls(dir.path(), "envoy", &spiffe("skiff"), "http/1.1").replace('\n', "\n  "),
        up = plain("up", up_port, "skiff_ok"),
        wrong = plain("wrong", wrong_port, "skiff_wrong"),
        c_ok = cluster("skiff_ok", &spiffe("skiff")),
        c_wrong = cluster("skiff_wrong", &spiffe("nobody")),
    );
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, &bootstrap).unwrap();
    let _envoy = Envoy::start(&cfg, std::process::id() + 21);
    let start = tokio::time::Instant::now();
    while !admin_get(admin, "/ready")
        .await
        .is_some_and(|r| r.contains("LIVE"))
    {
        assert!(start.elapsed() < WAIT, "envoy not ready:\n{bootstrap}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let local = IpAddr::from([127, 0, 0, 1]);
    let tls_addr = SocketAddr::from((local, tls_port));

    // 1. skiff dials Envoy: both verify, Envoy sees skiff's SPIFFE identity and subject.
    let client_ctx = TlsContexts::new();
    let upstream = |cert: &(String, String)| {
        let tls = UpstreamTls {
            max_session_keys: 1,
            common: common(Some(&spiffe("envoy")), &["istio-peer-exchange", "http/1.1"]),
            sni: String::new(),
        };
        client_ctx.client(&tls, &secrets(cert, &ca.pem)).unwrap()
    };
    let own_der = CertificateDer::from_pem_slice(skiff_cert.0.as_bytes()).unwrap();
    let own = skiff::tls::peer_identity(&own_der).unwrap();
    assert_eq!(own.subject, r"CN=skiff,O=Acme\, Inc.,L=Z\C3\BCrich,C=US");
    // The second connection resumes the first one's session (BoringSSL's ticket): the
    // identities must survive that too.
    for round in 0..2 {
        let sock = TcpStream::connect(tls_addr).await.unwrap();
        let mut c = connect(sock, &upstream(&skiff_cert), local).await.unwrap();
        assert_eq!(c.peer.uri_sans, vec![spiffe("envoy")]);
        assert_eq!(c.peer.subject, "CN=envoy");
        assert_eq!(c.alpn.as_deref(), Some(&b"http/1.1"[..]));
        let kind = c.stream.get_ref().1.handshake_kind();
        let want = if round == 0 {
            HandshakeKind::Full
        } else {
            HandshakeKind::Resumed
        };
        assert_eq!(kind, Some(want), "round {round}");
        c.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        c.stream.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let header = |name: &str| {
            resp.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .map(str::to_string)
        };
        assert_eq!(header("x-peer-uri"), Some(spiffe("skiff")), "{resp}");
        // skiff's RFC 2253 subject of its own certificate is Envoy's.
        assert_eq!(
            header("x-peer-subject"),
            Some(own.subject.clone()),
            "{resp}"
        );
    }

    // 2. A skiff client with another identity: Envoy refuses it and counts fail_verify_san.
    let sock = TcpStream::connect(tls_addr).await.unwrap();
    let mut c = connect(sock, &upstream(&intruder_cert), local)
        .await
        .unwrap();
    let _ = c
        .stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    assert!(
        c.stream.read_to_end(&mut rest).await.is_err() || rest.is_empty(),
        "envoy answered an unverified client"
    );
    let stats = admin_get(admin, "/stats?filter=ssl").await.unwrap();
    let listener_stat = format!("listener.127.0.0.1_{tls_port}.ssl.fail_verify_san");
    assert_eq!(stat(&stats, &listener_stat), 1, "{stats}");

    // 3. Envoy dials skiff's server: skiff sees Envoy's identity, ALPN and SNI.
    for round in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", up_port)).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        let seen = tokio::time::timeout(WAIT, seen_rx.recv())
            .await
            .unwrap()
            .unwrap();
        let (uris, subject, alpn, got_sni, resumed) = seen.unwrap();
        assert_eq!(uris, vec![spiffe("envoy")], "round {round}");
        assert_eq!(subject, "CN=envoy");
        assert_eq!(alpn.as_deref(), Some(&b"istio-peer-exchange"[..]));
        assert_eq!(got_sni.as_deref(), Some(sni));
        assert_eq!(resumed, round == 1, "round {round}");
    }

    // 4. Envoy expecting another identity refuses skiff's certificate; skiff sees the alert.
    let mut s = TcpStream::connect(("127.0.0.1", wrong_port)).await.unwrap();
    let _ = s.write_all(b"ping").await;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let seen = tokio::time::timeout(WAIT, seen_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, Err("connection_error"));
    let stats = admin_get(admin, "/stats?filter=ssl").await.unwrap();
    assert!(
        stat(&stats, "cluster.skiff_wrong.ssl.fail_verify_san") >= 1,
        "{stats}"
    );
    assert_eq!(
        stat(&stats, "cluster.skiff_ok.ssl.fail_verify_san"),
        0,
        "{stats}"
    );
}
