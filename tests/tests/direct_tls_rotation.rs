//! SDS rotation on a terminating chain: skiff gets its listener, cluster and secrets over ADS
//! from skiff's own control plane; when the `default` certificate secret is replaced, a
//! connection opened before keeps its session (and keeps working), while new connections
//! are handshaken with the new certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use skiff::controlplane::Source;
use skiff_tests::{ControlPlane, InProcessSkiff, free_addr, free_port, loopback_stat, run_options};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use skiff_tests::tls::Ca;

/// (certificate PEM, key PEM, certificate DER) of a workload certificate for `spiffe`.
fn issue(ca: &Ca, spiffe: &str) -> (String, String, Vec<u8>) {
    use rustls_pki_types::pem::PemObject;
    let l = ca.leaf(&[], &[spiffe]);
    let der = CertificateDer::from_pem_slice(l.cert.as_bytes())
        .unwrap()
        .to_vec();
    (l.cert, l.key, der)
}

const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// Writes one discovery file atomically (the control plane polls the directory).
fn put(dir: &Path, name: &str, version: &str, resources: serde_json::Value) {
    let text = serde_json::json!({ "version_info": version, "resources": resources }).to_string();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn secrets(dir: &Path, version: &str, (cert, key): (&str, &str), root: &str) {
    put(
        dir,
        "secrets.json",
        version,
        serde_json::json!([
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "default",
                "tls_certificate": {
                    "certificate_chain": { "inline_string": cert },
                    "private_key": { "inline_string": key }
                }
            },
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "ROOTCA",
                "validation_context": { "trusted_ca": { "inline_string": root } }
            }
        ]),
    );
}

fn config(dir: &Path, port: u16, echo: SocketAddr) {
    let ads = serde_json::json!({ "ads": {} });
    put(
        dir,
        "listeners.json",
        "1",
        serde_json::json!([{
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "inbound",
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
            "listener_filters": [{
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" }
            }],
            "filter_chains": [{
                "filter_chain_match": { "transport_protocol": "tls" },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": [{ "name": "default", "sds_config": ads }],
                            "combined_validation_context": {
                                "default_validation_context": {},
                                "validation_context_sds_secret_config": { "name": "ROOTCA", "sds_config": ads }
                            }
                        }
                    }
                },
                "filters": [{
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "inbound",
                        "cluster": "echo"
                    }
                }]
            }]
        }]),
    );
    put(
        dir,
        "clusters.json",
        "1",
        serde_json::json!([{
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "echo",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "echo",
                "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": { "socket_address": {
                    "address": "127.0.0.1", "port_value": echo.port() } } } }] }]
            }
        }]),
    );
}

/// Records the certificate the server presented and accepts it (the test compares
/// certificates itself; handshake signatures are still verified).
#[derive(Debug)]
struct Recorder {
    provider: Arc<rustls::crypto::CryptoProvider>,
    seen: Mutex<Option<Vec<u8>>>,
}

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

type Session = tokio_rustls::client::TlsStream<TcpStream>;

/// An mTLS session to 127.0.0.1:`port` as `client`: the session and the server's certificate.
async fn dial(port: u16, (cert, key): (&str, &str)) -> Option<(Session, Vec<u8>)> {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    // ring is the project's one crypto provider; only its post-quantum default is missing.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder {
        provider: provider.clone(),
        seen: Mutex::new(None),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let name = ServerName::try_from("server.default.svc").unwrap();
    let s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .ok()?
    .ok()?;
    let seen = recorder.seen.lock().unwrap().clone()?;
    Some((s, seen))
}

/// One line through the session, echoed back.
async fn round_trip(s: &mut BufReader<Session>, line: &str) -> String {
    s.get_mut().write_all(line.as_bytes()).await.unwrap();
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut back))
        .await
        .expect("echo within 5 s")
        .unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_old_ones_keep_theirs() {
    // An echo backend that answers as bytes arrive.
    let echo_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = echo_l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo_l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let ca = Ca::new("cluster.local");
    let (c1, k1, der1) = issue(&ca, SERVER_ID);
    let (c2, k2, der2) = issue(&ca, SERVER_ID);
    let (cc, ck, _) = issue(&ca, CLIENT_ID);
    let dir = tempfile::tempdir().unwrap();
    let (port, admin, xds) = (free_port(), free_port(), free_addr());
    config(dir.path(), port, echo);
    secrets(dir.path(), "1", (&c1, &k1), &ca.pem);
    let cp = ControlPlane::start(Source::Dir(dir.path().to_path_buf()), xds).await;
    let boot = skiff_tests::ads_bootstrap("GRPC", "rotation", xds, admin);
    let skiff = InProcessSkiff::start(run_options(
        skiff::config::parse(&boot, "<rotation>").unwrap(),
    ));

    // The listener warms once its secrets arrive; the first session presents the first
    // certificate.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (old, presented) = loop {
        if let Some(x) = dial(port, (&cc, &ck)).await {
            break x;
        }
        assert!(Instant::now() < deadline, "the TLS listener never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(presented, der1);
    let mut old = BufReader::new(old);
    assert_eq!(round_trip(&mut old, "one\n").await, "one\n");

    // Rotate: new sessions get the new certificate.
    secrets(dir.path(), "2", (&c2, &k2), &ca.pem);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut new = loop {
        let (s, presented) = dial(port, (&cc, &ck))
            .await
            .expect("a session after rotation");
        if presented == der2 {
            break BufReader::new(s);
        }
        assert_eq!(presented, der1, "only the two certificates exist");
        assert!(
            Instant::now() < deadline,
            "the rotated certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(round_trip(&mut new, "new\n").await, "new\n");

    // The session opened before the rotation still works, on its original certificate.
    assert_eq!(round_trip(&mut old, "two\n").await, "two\n");
    let old_cert = old.get_ref().get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(old_cert, der1);

    // Both close cleanly (close_notify passed on as the backend's EOF, and back).
    for s in [&mut old, &mut new] {
        s.get_mut().shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s")
            .unwrap();
        assert!(rest.is_empty());
    }
    // Envoy's listener stats are named by address.
    let handshakes = format!("listener.127.0.0.1_{port}.ssl.handshake");
    assert!(loopback_stat(admin, &handshakes).await >= 3);
    skiff.stop().await.unwrap();
    cp.stop().await.unwrap();
}
