//! What a handshake negotiated, under Envoy's stat names (`ssl.versions.TLSv1.3`,
//! `ssl.ciphers.TLS_AES_128_GCM_SHA256`, `ssl.curves.X25519`), so dashboards and the mTLS
//! bench read skiff's parameters as they read Envoy's.

use rustls::{CipherSuite, CommonState, NamedGroup, ProtocolVersion};

/// The `ssl.*` stat suffixes of a finished handshake: version, cipher and curve, each when
/// known.
pub fn stat_suffixes(conn: &CommonState) -> Vec<String> {
    let version = conn.protocol_version().and_then(|v| match v {
        ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        _ => None,
    });
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| cipher_name(s.suite()));
    let curve = conn
        .negotiated_key_exchange_group()
        .and_then(|g| curve_name(g.name()));
    [
        version.map(|v| format!("versions.{v}")),
        cipher.map(|c| format!("ciphers.{c}")),
        curve.map(|c| format!("curves.{c}")),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// BoringSSL's name of a suite, as Envoy's `ssl.ciphers.*` uses it.
fn cipher_name(s: CipherSuite) -> Option<&'static str> {
    use CipherSuite as C;
    Some(match s {
        C::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        C::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        C::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        _ => return None,
    })
}

/// BoringSSL's name of a key-exchange group, as Envoy's `ssl.curves.*` uses it.
fn curve_name(g: NamedGroup) -> Option<&'static str> {
    Some(match g {
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "P-256",
        NamedGroup::secp384r1 => "P-384",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_boringssl_s() {
        assert_eq!(
            cipher_name(CipherSuite::TLS13_AES_128_GCM_SHA256),
            Some("TLS_AES_128_GCM_SHA256")
        );
        assert_eq!(
            cipher_name(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
            Some("ECDHE-ECDSA-AES128-GCM-SHA256")
        );
        assert_eq!(curve_name(NamedGroup::secp256r1), Some("P-256"));
        assert_eq!(curve_name(NamedGroup::FFDHE2048), None);
    }
}
