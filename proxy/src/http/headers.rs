//! Header changes Envoy's connection manager and router make: the configured
//! `*_headers_to_add/remove` at route, virtual host and route configuration level (in that
//! order, so the most general level is applied last), a few `%VARIABLE%` formatters,
//! hop-by-hop stripping, `x-forwarded-*` and `x-request-id`.

use std::net::SocketAddr;

use hyper::HeaderMap;
use hyper::header::{self, HeaderName, HeaderValue};

use crate::model::route::{AppendAction, HeaderAdd};

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
    let xff = HeaderName::from_static("x-forwarded-for");
    let xfp = HeaderName::from_static("x-forwarded-proto");
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
    let rid = HeaderName::from_static("x-request-id");
    if !h.contains_key(&rid)
        && let Ok(v) = HeaderValue::from_str(&uuid_v4(random_u64(), random_u64()))
    {
        h.insert(rid, v);
    }
}

/// A UUID version 4 string from 128 random bits.
pub fn uuid_v4(a: u64, b: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// 64 random bits: std's per-process random hash keys over a counter (no extra dependency;
/// request ids and back-off jitter need spread, not secrecy).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

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
