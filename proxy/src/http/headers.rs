//! Header changes Envoy's connection manager and router make: the configured
//! `*_headers_to_add/remove` at route, virtual host and route configuration level (in that
//! order, so the most general level is applied last), a few `%VARIABLE%` formatters,
//! hop-by-hop stripping, `x-forwarded-*` and `x-request-id`.

use std::net::SocketAddr;

use hyper::HeaderMap;
use hyper::header::{self, HeaderName, HeaderValue};

use crate::model::listener::{ClientCertDetails, ForwardClientCert};
use crate::model::route::{AppendAction, HeaderAdd};
use crate::rbac::PeerIdentity;

/// What `%VARIABLE%` formatters in configured header values can refer to.
#[derive(Debug, Clone, Copy)]
pub struct Vars<'a> {
    /// Downstream peer.
    pub remote: SocketAddr,
    /// Downstream local address (the original destination when captured).
    pub local: Option<SocketAddr>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// The upstream host, once chosen (responses only).
    pub upstream: Option<SocketAddr>,
}

/// Expand the formatters skiff knows in `value`; unknown ones stay as written.
pub fn format(value: &str, v: &Vars<'_>) -> String {
    if !value.contains('%') {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(stripped) = after.strip_prefix('%') {
            out.push('%');
            rest = stripped;
            continue;
        }
        let Some(end) = after.find('%') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &after[..end];
        let sub = match name {
            "DOWNSTREAM_REMOTE_ADDRESS" => Some(v.remote.to_string()),
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Some(v.remote.ip().to_string()),
            "DOWNSTREAM_LOCAL_ADDRESS" => v.local.map(|a| a.to_string()),
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => v.local.map(|a| a.ip().to_string()),
            "UPSTREAM_REMOTE_ADDRESS" => v.upstream.map(|a| a.to_string()),
            "PROTOCOL" => Some(v.protocol.to_string()),
            _ => None,
        };
        match sub {
            Some(s) => out.push_str(&s),
            None => {
                out.push('%');
                out.push_str(name);
                out.push('%');
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Apply one level's removals, then its additions.
pub fn apply(h: &mut HeaderMap, remove: &[String], add: &[HeaderAdd], vars: &Vars<'_>) {
    for name in remove {
        h.remove(name.as_str());
    }
    for a in add {
        let value = format(&a.value, vars);
        if value.is_empty() && !a.keep_empty {
            continue;
        }
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(a.name.as_bytes()),
            HeaderValue::from_str(&value),
        ) else {
            continue;
        };
        match a.action {
            AppendAction::Append => {
                h.append(name, value);
            }
            AppendAction::AddIfAbsent => {
                if !h.contains_key(&name) {
                    h.insert(name, value);
                }
            }
            AppendAction::OverwriteOrAdd => {
                h.insert(name, value);
            }
            AppendAction::OverwriteIfExists => {
                if h.contains_key(&name) {
                    h.insert(name, value);
                }
            }
        }
    }
}

/// Headers that describe one hop and are never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Drop hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names first: most messages carry none of these, and each removal by
    // name parses and hashes it.
    if !h.keys().any(|k| HOP_BY_HOP.contains(&k.as_str())) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// `x-forwarded-for`, `x-forwarded-proto` and `x-request-id` as Envoy's connection manager
/// sets them. With `use_remote_address` (an edge proxy) the peer address is appended to
/// `x-forwarded-for` and the scheme overwritten; without it (Istio's sidecars) the downstream's
/// values are trusted and kept. A missing `x-request-id` is generated.
pub fn forwarded(h: &mut HeaderMap, use_remote_address: bool, remote: SocketAddr, tls: bool) {
    let scheme = HeaderValue::from_static(if tls { "https" } else { "http" });
    let (xff, xfp) = (X_FORWARDED_FOR, X_FORWARDED_PROTO);
    if use_remote_address {
        let ip = crate::model::canonical_ip(remote.ip()).to_string();
        let joined = match h.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.is_empty() => format!("{prev},{ip}"),
            _ => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&joined) {
            h.insert(xff, v);
        }
        h.insert(xfp, scheme);
    } else if !h.contains_key(&xfp) {
        h.insert(xfp, scheme);
    }
    let rid = X_REQUEST_ID;
    if !h.contains_key(&rid)
        && let Ok(v) = HeaderValue::from_bytes(&uuid_v4_bytes(random_u64(), random_u64()))
    {
        h.insert(rid, v);
    }
}

// Built at compile time: `from_static` at run time validates the name on every request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const XFCC_NAME: HeaderName = HeaderName::from_static(XFCC);

/// `x-forwarded-client-cert`.
pub const XFCC: &str = "x-forwarded-client-cert";

/// This hop's `x-forwarded-client-cert` element for a mutual TLS connection, as Envoy
/// writes it (`ConnectionManagerUtility::mutateXfccRequestHeader`): `By=` for each URI SAN of
/// our own certificate, `Hash=` the hex SHA-256 of the client's certificate (DER), then the
/// fields `details` asks for in Envoy's order (`Subject="..."`, `URI=` for each URI SAN or
/// one empty `URI=`, `DNS=` for each DNS SAN), joined by `;`. It depends only on the
/// connection, so it is built once per connection.
pub fn client_cert_element(
    details: ClientCertDetails,
    local_uri_sans: &[String],
    peer_cert_der: &[u8],
    peer: &PeerIdentity,
) -> String {
    use std::fmt::Write as _;
    let mut parts: Vec<String> = local_uri_sans.iter().map(|u| format!("By={u}")).collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, peer_cert_der);
    let mut hash = String::with_capacity(5 + 64);
    hash.push_str("Hash=");
    for b in digest.as_ref() {
        let _ = write!(hash, "{b:02x}");
    }
    parts.push(hash);
    if details.subject {
        parts.push(format!("Subject=\"{}\"", peer.subject));
    }
    if details.uri {
        if peer.uri_sans.is_empty() {
            parts.push("URI=".into());
        }
        parts.extend(peer.uri_sans.iter().map(|u| format!("URI={u}")));
    }
    if details.dns {
        parts.extend(peer.dns_sans.iter().map(|d| format!("DNS={d}")));
    }
    parts.join(";")
}

/// `forward_client_cert_details` on one request. `mtls`: the client presented a certificate;
/// `element`: this hop's element ([`client_cert_element`]) when the mode writes one.
pub fn forward_client_cert(
    h: &mut HeaderMap,
    mode: ForwardClientCert,
    mtls: bool,
    element: Option<&str>,
) {
    let name = XFCC_NAME;
    match mode {
        ForwardClientCert::AlwaysForwardOnly => {}
        ForwardClientCert::Sanitize => {
            h.remove(&name);
        }
        _ if !mtls => {
            h.remove(&name);
        }
        ForwardClientCert::ForwardOnly => {}
        ForwardClientCert::AppendForward | ForwardClientCert::SanitizeSet => {
            let Some(element) = element else {
                // The client certificate could not be read: nothing trustworthy to add.
                h.remove(&name);
                return;
            };
            let value = if mode == ForwardClientCert::AppendForward {
                let prev: Vec<&str> = h
                    .get_all(&name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .collect();
                if prev.is_empty() {
                    element.to_string()
                } else {
                    format!("{},{element}", prev.join(","))
                }
            } else {
                element.to_string()
            };
            match HeaderValue::from_str(&value) {
                Ok(v) => {
                    h.insert(name, v);
                }
                Err(_) => {
                    h.remove(&name);
                }
            }
        }
    }
}

/// A UUID version 4 string from 128 random bits.
pub fn uuid_v4(a: u64, b: u64) -> String {
    String::from_utf8_lossy(&uuid_v4_bytes(a, b)).into_owned()
}

/// [`uuid_v4`] into a fixed buffer: every request without an id gets one, so no formatter
/// and no intermediate string.
fn uuid_v4_bytes(a: u64, b: u64) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Version 4 in bits 15..12 of the first half, variant `10` in the top bits of the second.
    let hi = (a & !0xf000) | 0x4000;
    let lo = (b & !(0xc000 << 48)) | (0x8000 << 48);
    let mut out = [b'-'; 36];
    let mut j = 0;
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            j += 1;
        }
        let (word, k) = if i < 16 { (hi, i) } else { (lo, i - 16) };
        out[j] = HEX[((word >> (60 - 4 * k)) & 0xf) as usize];
        j += 1;
    }
    out
}

/// 64 random bits from a per-thread generator (request ids and back-off jitter need spread,
/// not secrecy; no state shared between workers).
pub fn random_u64() -> u64 {
    fastrand::u64(..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_bytes_match_the_formatted_uuid() {
        for (a, b) in [
            (0u64, 0u64),
            (u64::MAX, u64::MAX),
            (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
            (random_u64(), random_u64()),
        ] {
            let want = format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                a >> 32,
                (a >> 16) & 0xffff,
                a & 0x0fff,
                ((b >> 48) & 0x3fff) | 0x8000,
                b & 0xffff_ffff_ffff
            );
            assert_eq!(uuid_v4(a, b), want);
        }
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_others_kept() {
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-drop, keep-alive"),
        );
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
    }

    fn vars() -> Vars<'static> {
        Vars {
            remote: "10.0.0.7:4321".parse().unwrap(),
            local: Some("10.96.0.1:80".parse().unwrap()),
            protocol: "HTTP/1.1",
            upstream: None,
        }
    }

    fn add(name: &str, value: &str, action: AppendAction) -> HeaderAdd {
        HeaderAdd {
            name: name.into(),
            value: value.into(),
            action,
            keep_empty: false,
        }
    }

    #[test]
    fn formatters_expand_known_variables_only() {
        let v = vars();
        assert_eq!(format("%DOWNSTREAM_REMOTE_ADDRESS%", &v), "10.0.0.7:4321");
        assert_eq!(
            format("ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%;", &v),
            "ip=10.0.0.7;"
        );
        assert_eq!(format("%DOWNSTREAM_LOCAL_ADDRESS%", &v), "10.96.0.1:80");
        assert_eq!(
            format("%PROTOCOL% 100%% %NOPE% %", &v),
            "HTTP/1.1 100% %NOPE% %"
        );
    }

    #[test]
    fn append_actions_follow_envoy() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "1".parse().unwrap());
        h.insert("x-b", "1".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        apply(
            &mut h,
            &["x-gone".into()],
            &[
                add("x-a", "2", AppendAction::Append),
                add("x-b", "2", AppendAction::OverwriteOrAdd),
                add("x-c", "2", AppendAction::AddIfAbsent),
                add("x-b", "3", AppendAction::AddIfAbsent),
                add("x-d", "2", AppendAction::OverwriteIfExists),
                add("x-e", "", AppendAction::Append),
            ],
            &vars(),
        );
        let all =
            |n: &str| -> Vec<&str> { h.get_all(n).iter().map(|v| v.to_str().unwrap()).collect() };
        assert_eq!(all("x-a"), ["1", "2"]);
        assert_eq!(all("x-b"), ["2"]);
        assert_eq!(all("x-c"), ["2"]);
        assert!(!h.contains_key("x-d"), "overwrite-if-exists never adds");
        assert!(
            !h.contains_key("x-e"),
            "empty values are dropped by default"
        );
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn client_cert_element_is_envoys_format() {
        let peer = PeerIdentity {
            uri_sans: vec!["spiffe://cluster.local/ns/a/sa/client".into()],
            dns_sans: vec!["client.a.svc".into()],
            subject: "O=cluster.local,CN=client".into(),
        };
        let by = ["spiffe://cluster.local/ns/b/sa/server".to_string()];
        let all = ClientCertDetails {
            subject: true,
            uri: true,
            dns: true,
        };
        // SHA-256("abc"), as the client certificate's DER.
        let hash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(
            client_cert_element(all, &by, b"abc", &peer),
            format!(
                "By=spiffe://cluster.local/ns/b/sa/server;Hash={hash};Subject=\"O=cluster.local,CN=client\";URI=spiffe://cluster.local/ns/a/sa/client;DNS=client.a.svc"
            )
        );
        // Only By and Hash by default; URI is written empty when the certificate has none.
        assert_eq!(
            client_cert_element(ClientCertDetails::default(), &[], b"abc", &peer),
            format!("Hash={hash}")
        );
        let bare = PeerIdentity::default();
        let uri_only = ClientCertDetails {
            uri: true,
            ..Default::default()
        };
        assert_eq!(
            client_cert_element(uri_only, &[], b"abc", &bare),
            format!("Hash={hash};URI=")
        );
    }

    #[test]
    fn forward_client_cert_modes_follow_envoy() {
        use ForwardClientCert as F;
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(XFCC, v.parse().unwrap());
            h
        };
        let got = |h: &HeaderMap| h.get(XFCC).map(|v| v.to_str().unwrap().to_string());
        let cases = [
            // (mode, mutual TLS, expected)
            (F::Sanitize, true, None),
            (F::Sanitize, false, None),
            (F::ForwardOnly, true, Some("By=x;Hash=old")),
            (F::ForwardOnly, false, None),
            (F::AppendForward, true, Some("By=x;Hash=old,Hash=new")),
            (F::AppendForward, false, None),
            (F::SanitizeSet, true, Some("Hash=new")),
            (F::SanitizeSet, false, None),
            (F::AlwaysForwardOnly, true, Some("By=x;Hash=old")),
            (F::AlwaysForwardOnly, false, Some("By=x;Hash=old")),
        ];
        for (mode, mtls, want) in cases {
            let mut h = with("By=x;Hash=old");
            forward_client_cert(&mut h, mode, mtls, Some("Hash=new"));
            assert_eq!(got(&h).as_deref(), want, "{mode:?} mtls={mtls}");
        }
        // Appending to nothing sets; SANITIZE_SET without a previous header sets too.
        for mode in [F::AppendForward, F::SanitizeSet] {
            let mut h = HeaderMap::new();
            forward_client_cert(&mut h, mode, true, Some("Hash=new"));
            assert_eq!(got(&h).as_deref(), Some("Hash=new"));
        }
    }

    #[test]
    fn forwarded_headers_depend_on_use_remote_address() {
        let peer: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("x-request-id", "keep-me".parse().unwrap());
        let mut sidecar = h.clone();
        forwarded(&mut sidecar, false, peer, false);
        assert_eq!(sidecar["x-forwarded-for"], "1.1.1.1");
        assert_eq!(sidecar["x-forwarded-proto"], "https");
        assert_eq!(sidecar["x-request-id"], "keep-me");
        forwarded(&mut h, true, peer, false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1,10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut empty = HeaderMap::new();
        forwarded(&mut empty, false, peer, false);
        assert_eq!(empty["x-forwarded-proto"], "http");
        // Over TLS the scheme is https, set when missing or overwritten at the edge.
        let mut tls = HeaderMap::new();
        forwarded(&mut tls, false, peer, true);
        assert_eq!(tls["x-forwarded-proto"], "https");
        let mut edge = HeaderMap::new();
        edge.insert("x-forwarded-proto", "http".parse().unwrap());
        forwarded(&mut edge, true, peer, true);
        assert_eq!(edge["x-forwarded-proto"], "https");
        let id = empty["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!("89ab".contains(&id[19..20]), "variant 10: {id}");
    }
}
