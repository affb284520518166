//! Virtual host and route selection, Envoy's way (pure).
//!
//! Virtual host: the Host (`:authority`) is lowercased and, unless the route configuration sets
//! `ignore_port_in_host_matching`, keeps its `:port` (Envoy's default: `foo:80` is a different
//! domain from `foo`). The search order is exact domain, then `*.suffix` wildcards (longest
//! first), then `prefix*` wildcards (longest first), then `*`. A wildcard never matches the
//! empty string. Route: the first route of the virtual host whose path, `grpc`, headers, query
//! parameters and `runtime_fraction` (a draw against its default value: skiff has no runtime)
//! all match; a `tls_context` asking for a client certificate never matches plaintext.

use hyper::{HeaderMap, Method};

use crate::model::matchers::{HeaderMatch, HeaderMatchKind};
use crate::model::route::{PathMatch, QueryMatch, Route, RouteMatch};
use crate::model::{RouteConfig, VirtualHost};

/// The facts of one request that routing reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Host or `:authority`, as sent.
    pub host: &'a str,
    /// Method.
    pub method: &'a Method,
    /// `:path` including the query string.
    pub path: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// `host` without a trailing `:port` (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if !host[i + 1..].is_empty()
                && host[i + 1..].bytes().all(|b| b.is_ascii_digit())
                && (host.starts_with('[') == host[..i].ends_with(']'))
                && (host.starts_with('[') || !host[..i].contains(':')) =>
        {
            &host[..i]
        }
        _ => host,
    }
}

/// Choose the virtual host for `host`, or `None` (Envoy answers 404, flag NR).
pub fn select_virtual_host<'r>(rc: &'r RouteConfig, host: &str) -> Option<&'r VirtualHost> {
    // Domains compare case-insensitively in place: this runs for every request, over every
    // domain of the configuration, so nothing is lowercased into new strings.
    let host = if rc.ignore_port_in_host_matching {
        strip_port(host)
    } else {
        host
    };
    let domains = || {
        rc.virtual_hosts
            .iter()
            .flat_map(|v| v.domains.iter().map(move |d| (d.as_str(), v)))
    };
    if let Some((_, v)) = domains().find(|(d, _)| d.eq_ignore_ascii_case(host)) {
        return Some(v);
    }
    // `*.suffix`, then `prefix*`: the longest wins (the first of equals); the `*` must stand
    // for at least one character.
    let longest = |fixed: fn(&str) -> Option<&str>, fits: fn(&[u8], &[u8]) -> bool| {
        let mut best: Option<(usize, &'r VirtualHost)> = None;
        for (d, v) in domains() {
            let Some(part) = fixed(d) else {
                continue;
            };
            if !part.is_empty()
                && host.len() > part.len()
                && fits(host.as_bytes(), part.as_bytes())
                && best.is_none_or(|(n, _)| part.len() > n)
            {
                best = Some((part.len(), v));
            }
        }
        best.map(|(_, v)| v)
    };
    let suffix = longest(
        |d| d.strip_prefix('*'),
        |h, s| h[h.len() - s.len()..].eq_ignore_ascii_case(s),
    );
    if let Some(v) = suffix {
        return Some(v);
    }
    let prefix = longest(
        |d| d.strip_suffix('*'),
        |h, p| h[..p.len()].eq_ignore_ascii_case(p),
    );
    if let Some(v) = prefix {
        return Some(v);
    }
    if host.is_empty() {
        return None;
    }
    domains().find(|(d, _)| *d == "*").map(|(_, v)| v)
}

/// The first route of `vh` matching the request, or `None` (404, NR).
pub fn select_route<'v>(vh: &'v VirtualHost, req: &RequestFacts<'_>) -> Option<&'v Route> {
    vh.routes.iter().find(|r| route_matches(&r.matcher, req))
}

fn path_without_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

/// Whether one `RouteMatch` accepts the request.
pub fn route_matches(m: &RouteMatch, req: &RequestFacts<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Prefix(p) => {
            let head = req.path.get(..p.len());
            match head {
                Some(h) if m.case_sensitive => h == p,
                Some(h) => h.eq_ignore_ascii_case(p),
                None => false,
            }
        }
        PathMatch::Path(p) => {
            let path = path_without_query(req.path);
            if m.case_sensitive {
                path == p
            } else {
                path.eq_ignore_ascii_case(p)
            }
        }
        PathMatch::Regex(re) => re.0.is_match(path_without_query(req.path)),
        PathMatch::PathSeparatedPrefix(p) => {
            // The whole path, or the prefix followed by `/`: `/api` matches `/api` and
            // `/api/x` but not `/apix`.
            let path = path_without_query(req.path);
            let head = path.get(..p.len());
            let same = match head {
                Some(h) if m.case_sensitive => h == p,
                Some(h) => h.eq_ignore_ascii_case(p),
                None => false,
            };
            same && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
        }
        PathMatch::Unsupported(_) => false,
    };
    path_ok
        && !m.requires_tls
        && (!m.grpc || is_grpc(req.headers))
        && m.headers.iter().all(|h| header_matches(h, req))
        && (m.query_parameters.is_empty() || query_matches(&m.query_parameters, req.path))
        // Last, as in Envoy: the draw only happens for requests that match otherwise.
        && m.runtime_fraction.is_none_or(|p| p.hit(fastrand::u64(..)))
}

/// Envoy's gRPC test: `content-type` is `application/grpc` or `application/grpc+<codec>`.
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "application/grpc" || v.starts_with("application/grpc+"))
}

/// Percent-decode one query component (Envoy decodes names and values before matching).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of every query parameter, decoded (a name without `=` has value "").
fn query_params(path: &str) -> Vec<(String, String)> {
    let Some((_, q)) = path.split_once('?') else {
        return Vec::new();
    };
    let q = q.split('#').next().unwrap_or("");
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The first value of query parameter `name` in `path`, decoded.
pub fn query_value(path: &str, name: &str) -> Option<String> {
    query_params(path)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn query_matches(matchers: &[QueryMatch], path: &str) -> bool {
    let params = query_params(path);
    matchers.iter().all(|m| {
        let value = params
            .iter()
            .find(|(k, _)| *k == m.name)
            .map(|(_, v)| v.as_str());
        match (&m.kind, value) {
            // Envoy: an absent parameter never matches, whatever the matcher.
            (_, None) => false,
            (HeaderMatchKind::Present(p), Some(_)) => *p,
            (k, Some(v)) => value_matches(k, v),
        }
    })
}

fn header_value(name: &str, req: &RequestFacts<'_>) -> Option<String> {
    match name {
        ":method" => Some(req.method.as_str().to_string()),
        ":authority" | "host" => Some(req.host.to_string()),
        ":path" => Some(req.path.to_string()),
        _ => {
            // Envoy joins repeated headers with "," before matching.
            let values: Vec<&str> = req
                .headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or(""))
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        }
    }
}

fn cmp(ignore_case: bool, a: &str, b: &str) -> (String, String) {
    if ignore_case {
        (a.to_ascii_lowercase(), b.to_ascii_lowercase())
    } else {
        (a.to_string(), b.to_string())
    }
}

fn header_matches(h: &HeaderMatch, req: &RequestFacts<'_>) -> bool {
    matches_value(h, header_value(&h.name, req))
}

/// The virtual cluster a request counts in: the first whose header matchers all match, else
/// Envoy's catch-all `other` (only meaningful when the virtual host has virtual clusters).
pub fn virtual_cluster<'v>(vh: &'v VirtualHost, req: &RequestFacts<'_>) -> &'v str {
    vh.virtual_clusters
        .iter()
        .find(|(_, ms)| ms.iter().all(|m| header_matches(m, req)))
        .map_or("other", |(name, _)| name.as_str())
}

/// Whether every one of `ms` matches the request (the fault filter's `headers`).
pub fn all_request_headers_match(ms: &[HeaderMatch], req: &RequestFacts<'_>) -> bool {
    ms.iter().all(|m| header_matches(m, req))
}

/// Whether any of `ms` matches the request (`retriable_request_headers`).
pub fn any_request_header_matches(ms: &[HeaderMatch], req: &RequestFacts<'_>) -> bool {
    ms.iter().any(|m| header_matches(m, req))
}

/// Whether any of `ms` matches a response (`retriable_headers`; `:status` is the status code).
pub fn any_response_header_matches(ms: &[HeaderMatch], status: u16, h: &HeaderMap) -> bool {
    ms.iter().any(|m| {
        let value = if m.name == ":status" {
            Some(status.to_string())
        } else {
            let values: Vec<&str> = h
                .get_all(m.name.as_str())
                .iter()
                .map(|v| v.to_str().unwrap_or(""))
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        };
        matches_value(m, value)
    })
}

fn matches_value(h: &HeaderMatch, value: Option<String>) -> bool {
    let hit = match (&h.kind, value.as_deref()) {
        (HeaderMatchKind::Present(want), v) => v.is_some() == *want,
        (HeaderMatchKind::Unsupported(_), _) => return false,
        (_, None) => false,
        (k, Some(v)) => value_matches(k, v),
    };
    hit != h.invert
}

/// A string test on a present value (header or query parameter).
fn value_matches(kind: &HeaderMatchKind, v: &str) -> bool {
    match kind {
        HeaderMatchKind::Present(_) | HeaderMatchKind::Unsupported(_) => false,
        HeaderMatchKind::Regex(re) => re.0.is_match(v),
        HeaderMatchKind::Exact { value, ignore_case } => {
            let (a, b) = cmp(*ignore_case, v, value);
            a == b
        }
        HeaderMatchKind::Prefix(p, ic) => {
            let (a, b) = cmp(*ic, v, p);
            a.starts_with(&b)
        }
        HeaderMatchKind::Suffix(s, ic) => {
            let (a, b) = cmp(*ic, v, s);
            a.ends_with(&b)
        }
        HeaderMatchKind::Contains(s, ic) => {
            let (a, b) = cmp(*ic, v, s);
            a.contains(&b)
        }
    }
}

#[cfg(test)]
mod compat_tests {
    use super::*;
    use crate::model::fault::Percent;
    use crate::model::route::RouteMatch;

    fn matcher(runtime: Option<u32>, grpc: bool, requires_tls: bool) -> RouteMatch {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            case_sensitive: true,
            headers: vec![],
            query_parameters: vec![],
            runtime_fraction: runtime.map(|n| Percent {
                numerator: n,
                denominator: 100,
            }),
            grpc,
            requires_tls,
        }
    }

    fn hits(m: &RouteMatch, h: &HeaderMap, n: usize) -> usize {
        let method = Method::GET;
        let req = RequestFacts {
            host: "h",
            method: &method,
            path: "/x",
            headers: h,
        };
        (0..n).filter(|_| route_matches(m, &req)).count()
    }

    #[test]
    fn runtime_fraction_uses_its_default_value() {
        let h = HeaderMap::new();
        assert_eq!(hits(&matcher(Some(0), false, false), &h, 200), 0);
        assert_eq!(hits(&matcher(Some(100), false, false), &h, 200), 200);
        // A 10 % canary gets about 10 %: 4000 draws, mean 400, sd 19; 6 sd either side.
        let n = hits(&matcher(Some(10), false, false), &h, 4000);
        assert!((286..=514).contains(&n), "{n} of 4000");
    }

    #[test]
    fn grpc_and_tls_context_matchers() {
        let mut h = HeaderMap::new();
        assert_eq!(hits(&matcher(None, true, false), &h, 1), 0);
        h.insert(
            hyper::header::CONTENT_TYPE,
            "application/grpc+proto".parse().unwrap(),
        );
        assert_eq!(hits(&matcher(None, true, false), &h, 1), 1);
        h.insert(
            hyper::header::CONTENT_TYPE,
            "application/grpc-web".parse().unwrap(),
        );
        assert_eq!(hits(&matcher(None, true, false), &h, 1), 0);
        // Every connection is plaintext until issue 15: no client certificate.
        assert_eq!(hits(&matcher(None, false, true), &h, 1), 0);
    }
}
