//! What a peer certificate says about its holder: its SANs and subject, as Envoy reads them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rustls_pki_types::CertificateDer;
use x509_parser::asn1_rs::{Any, Tag, ToDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::x509::X509Name;

use crate::rbac::PeerIdentity;

/// One subject alternative name of the types SAN matchers look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum San<'a> {
    /// `uniformResourceIdentifier` (SPIFFE identities).
    Uri(&'a str),
    /// `dNSName`.
    Dns(&'a str),
    /// `rfc822Name`.
    Email(&'a str),
    /// `iPAddress`.
    Ip(IpAddr),
}

impl fmt::Display for San<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Uri(s) => write!(f, "URI:{s}"),
            San::Dns(s) => write!(f, "DNS:{s}"),
            San::Email(s) => write!(f, "email:{s}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// The SANs of `cert` that matchers and identities use (other name types are skipped).
pub(crate) fn sans<'a>(cert: &'a X509Certificate<'a>) -> Vec<San<'a>> {
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(s) => Some(San::Uri(s)),
            GeneralName::DNSName(s) => Some(San::Dns(s)),
            GeneralName::RFC822Name(s) => Some(San::Email(s)),
            GeneralName::IPAddress(b) => ip(b).map(San::Ip),
            _ => None,
        })
        .collect()
}

fn ip(b: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Some(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    <[u8; 16]>::try_from(b)
        .ok()
        .map(|v6| IpAddr::V6(Ipv6Addr::from(v6)))
}

/// The identity in a peer's end-entity certificate (DER): URI SANs, DNS SANs and the
/// subject in Envoy's RFC 2253 form; `None` if the certificate does not parse.
pub fn peer_identity(end_entity: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity).ok()?;
    let mut id = PeerIdentity {
        subject: rfc2253(cert.subject()),
        ..PeerIdentity::default()
    };
    for san in sans(&cert) {
        match san {
            San::Uri(s) => id.uri_sans.push(s.to_string()),
            San::Dns(s) => id.dns_sans.push(s.to_string()),
            San::Email(_) | San::Ip(_) => {}
        }
    }
    Some(id)
}

/// A distinguished name as BoringSSL's `X509_NAME_print_ex(.., XN_FLAG_RFC2253)` prints it,
/// which is what Envoy's `subjectPeerCertificate()` (and RBAC's `authenticated`) sees: RDNs
/// last first, `,` between them, `+` inside one, short attribute names, RFC 2253 escapes,
/// bytes above 0x7f as `\XX`, unknown attributes and non-string values as `#` + DER hex.
pub(crate) fn rfc2253(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.attr_type().to_id_string();
            match short_name(&oid) {
                Some(sn) => {
                    out.push_str(sn);
                    out.push('=');
                    match string_value(atv.attr_value()) {
                        Some(bytes) => escape(&bytes, &mut out),
                        None => dump(atv.attr_value(), &mut out),
                    }
                }
                None => {
                    out.push_str(&oid);
                    out.push('=');
                    dump(atv.attr_value(), &mut out);
                }
            }
        }
    }
    out
}

/// BoringSSL's short names of the attribute types certificates carry.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.17" => "postalCode",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

/// The value as UTF-8 bytes, for the string types; `None` for anything else.
fn string_value(v: &Any<'_>) -> Option<Vec<u8>> {
    let d = v.data;
    match v.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => Some(d.to_vec()),
        // T61 and Latin-1 strings: each byte is one code point.
        Tag::TeletexString => Some(
            d.iter()
                .map(|&b| char::from(b))
                .collect::<String>()
                .into_bytes(),
        ),
        Tag::BmpString => {
            let units: Vec<u16> = d
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok().map(String::into_bytes)
        }
        Tag::UniversalString => d
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect::<Option<String>>()
            .map(String::into_bytes),
        _ => None,
    }
}

fn escape(bytes: &[u8], out: &mut String) {
    let last = bytes.len().saturating_sub(1);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';' => {
                out.push('\\');
                out.push(char::from(b));
            }
            b'#' if i == 0 => out.push_str("\\#"),
            b' ' if i == 0 || i == last => out.push_str("\\ "),
            0x20..=0x7e => out.push(char::from(b)),
            _ => hex_escape(b, out),
        }
    }
}

fn hex_escape(b: u8, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(out, "\\{b:02X}");
}

fn dump(v: &Any<'_>, out: &mut String) {
    use std::fmt::Write as _;
    out.push('#');
    for b in v.to_der_vec().unwrap_or_default() {
        let _ = write!(out, "{b:02X}");
    }
}
