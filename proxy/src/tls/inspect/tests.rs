use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// The first flight of a real rustls client for `server` (a DNS name sends SNI, an IP address
/// none) offering `alpn`.
fn rustls_hello(server: &str, alpn: &[&str]) -> Vec<u8> {
    // ring is the project's one crypto provider (no aws-lc); its post-quantum-less default
    // is deprecated, which does not matter for a ClientHello's shape.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = rustls_pki_types::ServerName::try_from(server.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write to a Vec");
    }
    out
}

/// The handshake bytes inside `records`.
fn payload(mut records: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while records.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
        out.extend_from_slice(&records[5..5 + len]);
        records = &records[5 + len..];
    }
    out
}

/// `handshake` in records of at most `size` bytes each.
fn records(handshake: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in handshake.chunks(size.max(1)) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn found(sni: Option<&str>, alpn: &[&str]) -> Inspect {
    Inspect::ClientHello(ClientHello {
        sni: sni.map(str::to_string),
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
    })
}

#[test]
fn a_rustls_client_hello_gives_its_sni_and_alpn() {
    let alpn = ["istio-peer-exchange", "istio", "h2", "http/1.1"];
    let bytes = rustls_hello("backend.ns.svc.cluster.local", &alpn);
    assert_eq!(
        inspect(&bytes),
        found(Some("backend.ns.svc.cluster.local"), &alpn)
    );
    // An IP address sends no SNI; no ALPN offered, none reported.
    assert_eq!(inspect(&rustls_hello("127.0.0.1", &[])), found(None, &[]));
}

#[test]
fn every_prefix_needs_more_and_bytes_after_the_hello_do_not_matter() {
    let bytes = rustls_hello("a.example.com", &["h2"]);
    for n in 0..bytes.len() {
        assert_eq!(
            inspect(&bytes[..n]),
            Inspect::NeedMore,
            "prefix of {n} bytes"
        );
    }
    let mut more = bytes.clone();
    more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
    assert_eq!(inspect(&more), found(Some("a.example.com"), &["h2"]));
}

#[test]
fn a_hello_split_over_several_records_is_reassembled() {
    let bytes = rustls_hello("split.example.com", &["http/1.1"]);
    let hs = payload(&bytes);
    for size in [1, 2, 7, 100, 16 * 1024] {
        assert_eq!(
            inspect(&records(&hs, size)),
            found(Some("split.example.com"), &["http/1.1"]),
            "records of {size} bytes"
        );
    }
}

#[test]
fn plaintext_and_other_records_are_not_tls() {
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        // Application data, alert, a version-2 record, a handshake record over 16 KiB.
        b"\x17\x03\x03\x00\x01x",
        b"\x15\x03\x03\x00\x02\x02\x28",
        b"\x16\x02\x00",
        b"\x16\x03\x01\x40\x01",
        // A ServerHello, not a ClientHello.
        b"\x16\x03\x03\x00\x04\x02\x00\x00\x00",
    ] {
        assert_eq!(inspect(bytes), Inspect::NotTls, "{bytes:?}");
    }
    assert_eq!(inspect(b""), Inspect::NeedMore);
    assert_eq!(inspect(b"\x16"), Inspect::NeedMore);
    assert_eq!(inspect(b"\x16\x03\x01\x00"), Inspect::NeedMore);
}

#[test]
fn a_malformed_hello_is_not_tls_and_a_bad_extension_only_loses_its_fact() {
    // A ClientHello whose declared body is too short for its fixed fields.
    let hs = [1u8, 0, 0, 3, 3, 3, 0];
    assert_eq!(inspect(&records(&hs, 100)), Inspect::NotTls);
    // A minimal valid hello, then its ALPN list broken (a zero-length name).
    let hello = |exts: &[u8]| {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0u8; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        records(&hs, 16 * 1024)
    };
    assert_eq!(inspect(&hello(&[])), found(None, &[]));
    let alpn_ok = [0, 16, 0, 5, 0, 3, 2, b'h', b'2'];
    assert_eq!(inspect(&hello(&alpn_ok)), found(None, &["h2"]));
    let alpn_bad = [0, 16, 0, 5, 0, 3, 0, b'h', b'2'];
    assert_eq!(inspect(&hello(&alpn_bad)), found(None, &[]));
    // Two SNI entries: BoringSSL takes neither.
    let sni_two = [
        0, 0, 0, 10, 0, 8, 0, 0, 1, b'a', 0, 0, 1, b'b', //
    ];
    assert_eq!(inspect(&hello(&sni_two)), found(None, &[]));
    // The same extension twice makes the whole hello malformed.
    let twice = [
        0, 16, 0, 5, 0, 3, 2, b'h', b'2', 0, 16, 0, 5, 0, 3, 2, b'h', b'2',
    ];
    assert_eq!(inspect(&hello(&twice)), Inspect::NotTls);
}

#[test]
fn a_hello_larger_than_64_kib_is_too_large() {
    // Declared bigger than can ever fit: decided from the header.
    assert_eq!(
        inspect(b"\x16\x03\x01\x00\x04\x01\x01\x00\x00"),
        Inspect::TooLarge
    );
    // Declared to fit, but sent in records so small their headers overflow the limit.
    let mut hs = vec![1u8, 0, 0xc0, 0];
    hs.resize(4 + 0xc000, 0);
    let bytes = records(&hs, 1);
    assert_eq!(inspect(&bytes[..MAX_CLIENT_HELLO - 1]), Inspect::NeedMore);
    assert_eq!(inspect(&bytes), Inspect::TooLarge);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = inspect(&bytes);
        // With a handshake record header in front, the parser goes deeper.
        let mut framed = vec![22, 3, 1];
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(&bytes);
        let _ = inspect(&framed);
    }

    #[test]
    fn mutated_real_hellos_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
        split in 1usize..64,
    ) {
        let base = rustls_hello("mutant.example.com", &["h2", "http/1.1"]);
        for mut bytes in [base.clone(), records(&payload(&base), split)] {
            for (at, v) in &edits {
                let i = at % bytes.len();
                bytes[i] = *v;
            }
            let _ = inspect(&bytes);
            let _ = inspect(&bytes[..cut % (bytes.len() + 1)]);
        }
    }

    #[test]
    fn record_boundaries_do_not_change_the_result(sizes in proptest::collection::vec(1usize..300, 1..40)) {
        let bytes = rustls_hello("frag.example.com", &["istio-h2", "h2"]);
        let hs = payload(&bytes);
        let mut out = Vec::new();
        let mut rest = &hs[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            out.extend_from_slice(&records(&rest[..n], n));
            rest = &rest[n..];
            i += 1;
        }
        prop_assert_eq!(inspect(&out), found(Some("frag.example.com"), &["istio-h2", "h2"]));
    }
}
