//! Listener filters over real loopback sockets: what they find, that they consume nothing,
//! and the listener filter timeout.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::model::test_util::listener;
use crate::stats::Stats;

/// A connected (client, accepted) pair over loopback.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap());
    let (c, a) = tokio::join!(c, l.accept());
    (c.unwrap(), a.unwrap().0)
}

fn with_filters(filters: &[&str], timeout: Option<Duration>, keep_going: bool) -> Listener {
    Listener {
        listener_filters: filters.iter().map(|s| s.to_string()).collect(),
        listener_filters_timeout: timeout,
        continue_on_listener_filters_timeout: keep_going,
        ..listener(vec![], None)
    }
}

fn counters() -> (Arc<Stats>, ListenerCounters) {
    let stats = Arc::new(Stats::default());
    let c = ListenerCounters::new(&stats, "listener.l");
    (stats, c)
}

fn client_hello(server: &str, alpn: &[&str]) -> Vec<u8> {
    // ring is the project's one crypto provider (no aws-lc); its post-quantum-less default
    // is deprecated, which does not matter for a ClientHello's shape.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(server.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

const BOTH: [&str; 2] = [TLS_INSPECTOR, sniff::HTTP_INSPECTOR];

#[tokio::test]
async fn a_client_hello_in_pieces_is_read_without_being_consumed() {
    let (mut client, down) = pair().await;
    let l = with_filters(&BOTH, Some(Duration::from_secs(5)), false);
    let (stats, c) = counters();
    let hello = client_hello("svc.example.com", &["istio-peer-exchange", "h2"]);
    let sent = hello.clone();
    let writer = tokio::spawn(async move {
        for piece in sent.chunks(40) {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client
    });
    let found = listener_filters(&down, &l, &c).await.unwrap();
    assert_eq!(
        found,
        Detected {
            transport_protocol: TLS,
            server_name: Some("svc.example.com".into()),
            application_protocols: vec!["istio-peer-exchange".into(), "h2".into()],
        }
    );
    let _client = writer.await.unwrap();
    // Every byte is still there for the TLS server.
    let mut down = down;
    let mut got = vec![0u8; hello.len()];
    down.read_exact(&mut got).await.unwrap();
    assert_eq!(got, hello);
    for (name, v) in [
        ("tls_inspector.tls_found", 1),
        ("tls_inspector.sni_found", 1),
        ("tls_inspector.alpn_found", 1),
        ("tls_inspector.tls_not_found", 0),
    ] {
        assert_eq!(stats.counter(name).get(), v, "{name}");
    }
}

#[tokio::test]
async fn plaintext_http_is_sniffed_beside_the_tls_inspector() {
    let (mut client, down) = pair().await;
    let l = with_filters(&BOTH, Some(Duration::from_secs(5)), false);
    let (stats, c) = counters();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let found = listener_filters(&down, &l, &c).await.unwrap();
    assert_eq!(found.transport_protocol, RAW_BUFFER);
    assert_eq!(found.application_protocols, vec!["http/1.1".to_string()]);
    assert_eq!(found.server_name, None);
    assert_eq!(stats.counter("tls_inspector.tls_not_found").get(), 1);
    // Raw TCP on a TLS-only listener: not TLS, no protocol.
    let (mut client, down) = pair().await;
    let l = with_filters(&[TLS_INSPECTOR], Some(Duration::from_secs(5)), false);
    client.write_all(b"\x00\x01binary").await.unwrap();
    assert_eq!(
        listener_filters(&down, &l, &c).await.unwrap(),
        Detected::default()
    );
}

#[tokio::test]
async fn the_listener_filter_timeout_closes_unless_told_to_continue() {
    for keep_going in [false, true] {
        let (mut client, down) = pair().await;
        let l = with_filters(&BOTH, Some(Duration::from_millis(200)), keep_going);
        let (stats, c) = counters();
        // A valid ClientHello prefix that never completes.
        let hello = client_hello("slow.example.com", &[]);
        client.write_all(&hello[..20]).await.unwrap();
        let started = tokio::time::Instant::now();
        let r = listener_filters(&down, &l, &c).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        match (keep_going, r) {
            (false, Err(ConnError::ListenerFilterTimeout { listener })) => {
                assert_eq!(listener, "l")
            }
            (true, Ok(found)) => assert_eq!(found, Detected::default()),
            (k, r) => panic!("continue {k}: {r:?}"),
        }
        assert_eq!(
            stats.counter("listener.l.downstream_pre_cx_timeout").get(),
            1
        );
    }
}

#[tokio::test]
async fn a_half_closed_client_is_routed_on_what_it_sent() {
    let (mut client, down) = pair().await;
    let l = with_filters(&BOTH, Some(Duration::from_secs(10)), false);
    let (_stats, c) = counters();
    client.write_all(b"\x16\x03\x01").await.unwrap();
    client.shutdown().await.unwrap();
    let started = tokio::time::Instant::now();
    let found = listener_filters(&down, &l, &c).await.unwrap();
    assert_eq!(found, Detected::default());
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_client_hello_over_64_kib_closes_the_connection() {
    let (mut client, down) = pair().await;
    let l = with_filters(&[TLS_INSPECTOR], None, false);
    let (stats, c) = counters();
    client
        .write_all(b"\x16\x03\x01\x00\x04\x01\x01\x00\x00")
        .await
        .unwrap();
    let r = listener_filters(&down, &l, &c).await;
    assert!(
        matches!(r, Err(ConnError::ClientHelloTooLarge { .. })),
        "{r:?}"
    );
    assert_eq!(
        stats.counter("tls_inspector.client_hello_too_large").get(),
        1
    );
}

#[tokio::test]
async fn without_inspectors_nothing_is_read() {
    let (_client, down) = pair().await;
    let l = with_filters(&[], None, false);
    let (_stats, c) = counters();
    // The client sends nothing: no inspector, so nothing waits for it.
    let found = tokio::time::timeout(Duration::from_secs(1), listener_filters(&down, &l, &c))
        .await
        .expect("nothing to wait for")
        .unwrap();
    assert_eq!(found, Detected::default());
}

/// A ClientHello with SNI `sni` and a `padding` extension of `pad` bytes, in TLS records.
fn padded_hello(sni: &str, pad: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    let name = sni.as_bytes();
    exts.extend_from_slice(&0u16.to_be_bytes());
    exts.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    exts.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    exts.push(0);
    exts.extend_from_slice(&(name.len() as u16).to_be_bytes());
    exts.extend_from_slice(name);
    exts.extend_from_slice(&21u16.to_be_bytes());
    exts.extend_from_slice(&(pad as u16).to_be_bytes());
    exts.resize(exts.len() + pad, 0);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in hs.chunks(16 * 1024) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[tokio::test]
async fn a_large_client_hello_grows_the_peek_buffer() {
    let (mut client, down) = pair().await;
    let l = with_filters(&[TLS_INSPECTOR], Some(Duration::from_secs(5)), false);
    let (_stats, c) = counters();
    let hello = padded_hello("big.example.com", 40_000);
    assert!(hello.len() > 4 * FIRST_PEEK);
    client.write_all(&hello).await.unwrap();
    let found = listener_filters(&down, &l, &c).await.unwrap();
    assert_eq!(found.transport_protocol, TLS);
    assert_eq!(found.server_name.as_deref(), Some("big.example.com"));
}
