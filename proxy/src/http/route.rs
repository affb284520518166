//! Virtual host and route selection, Envoy's way (pure).
//!
//! Virtual host: the Host (`:authority`) is lowercased and, unless the route configuration sets
//! `ignore_port_in_host_matching`, keeps its `:port` (Envoy's default: `foo:80` is a different
//! domain from `foo`). The search order is exact domain, then `*.suffix` wildcards (longest
//! first), then `prefix*` wildcards (longest first), then `*`. A wildcard never matches the
//! empty string. Route: the first route of the virtual host whose path and headers match.

use hyper::{HeaderMap, Method};

use crate::model::route::{HeaderMatch, HeaderMatchKind, PathMatch, Route, RouteMatch};
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
    let lowered = host.to_ascii_lowercase();
    let host = if rc.ignore_port_in_host_matching {
        strip_port(&lowered)
    } else {
        lowered.as_str()
    };
    let domains = || {
        rc.virtual_hosts
            .iter()
            .flat_map(|v| v.domains.iter().map(move |d| (d.to_ascii_lowercase(), v)))
    };
    if let Some((_, v)) = domains().find(|(d, _)| d == host) {
        return Some(v);
    }
    // `*.suffix`: the longest suffix wins; the `*` must stand for at least one character.
    let best = |candidates: Vec<(usize, &'r VirtualHost)>| {
        candidates
            .into_iter()
            .fold(None::<(usize, &'r VirtualHost)>, |best, c| match best {
                Some(b) if b.0 >= c.0 => Some(b),
                _ => Some(c),
            })
            .map(|(_, v)| v)
    };
    let suffix: Vec<_> = domains()
        .filter_map(|(d, v)| {
            let s = d.strip_prefix('*')?;
            (!s.is_empty() && host.len() > s.len() && host.ends_with(s)).then_some((s.len(), v))
        })
        .collect();
    if let Some(v) = best(suffix) {
        return Some(v);
    }
    let prefix: Vec<_> = domains()
        .filter_map(|(d, v)| {
            let p = d.strip_suffix('*')?;
            (!p.is_empty() && host.len() > p.len() && host.starts_with(p)).then_some((p.len(), v))
        })
        .collect();
    if let Some(v) = best(prefix) {
        return Some(v);
    }
    if host.is_empty() {
        return None;
    }
    domains().find(|(d, _)| d == "*").map(|(_, v)| v)
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
        PathMatch::Unsupported(_) => false,
    };
    path_ok && m.headers.iter().all(|h| header_matches(h, req))
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
    let value = header_value(&h.name, req);
    let hit = match (&h.kind, value.as_deref()) {
        (HeaderMatchKind::Present(want), v) => v.is_some() == *want,
        (HeaderMatchKind::Unsupported(_), _) => return false,
        (_, None) => false,
        (HeaderMatchKind::Exact { value, ignore_case }, Some(v)) => {
            let (a, b) = cmp(*ignore_case, v, value);
            a == b
        }
        (HeaderMatchKind::Prefix(p, ic), Some(v)) => {
            let (a, b) = cmp(*ic, v, p);
            a.starts_with(&b)
        }
        (HeaderMatchKind::Suffix(s, ic), Some(v)) => {
            let (a, b) = cmp(*ic, v, s);
            a.ends_with(&b)
        }
        (HeaderMatchKind::Contains(s, ic), Some(v)) => {
            let (a, b) = cmp(*ic, v, s);
            a.contains(&b)
        }
    };
    hit != h.invert
}
