//! Evaluation of [`Rules`] over the facts of one connection or request, as Envoy's
//! `RoleBasedAccessControlEngineImpl` and `matchers.cc` do.

use std::net::{IpAddr, SocketAddr};

use hyper::HeaderMap;

use super::model::{
    Action, HeaderMatch, HeaderTest, HttpRbac, NetworkRbac, Permission, Policy, Principal, Rules,
    StringKind, StringMatch,
};

/// What the downstream's certificate says, once TLS is terminated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SANs (Istio: one `spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns_sans: Vec<String>,
    /// Subject, as Envoy prints it.
    pub subject: String,
}

impl PeerIdentity {
    /// A peer known by one SPIFFE URI (what Istio's mTLS gives).
    pub fn spiffe(uri: impl Into<String>) -> Self {
        PeerIdentity {
            uri_sans: vec![uri.into()],
            ..PeerIdentity::default()
        }
    }
}

/// The facts of one downstream connection, as Envoy's connection and stream info give them.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    /// The connection's remote address (`source_ip`; Envoy: proxy protocol applied).
    pub source: IpAddr,
    /// The physical peer (`direct_remote_ip`).
    pub direct_remote: IpAddr,
    /// The downstream remote address (`remote_ip`; x-forwarded-for when the HCM trusts it).
    pub remote: IpAddr,
    /// The downstream local address: the original destination on a capture listener.
    pub destination: SocketAddr,
    /// The requested server name (SNI), if any.
    pub sni: Option<&'a str>,
    /// The TLS peer; `None` for plaintext (then `authenticated` never matches).
    pub peer: Option<&'a PeerIdentity>,
}

impl<'a> ConnectionFacts<'a> {
    /// Plaintext facts where the peer is the source, direct and remote address alike.
    pub fn new(peer_addr: IpAddr, destination: SocketAddr) -> Self {
        ConnectionFacts {
            source: peer_addr,
            direct_remote: peer_addr,
            remote: peer_addr,
            destination,
            sni: None,
            peer: None,
        }
    }
}

/// The facts of one HTTP request (headers as Envoy's request header map holds them).
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// `:method`.
    pub method: &'a str,
    /// `:path` as received, query and fragment included.
    pub path: &'a str,
    /// `:authority` (HTTP/1.1 `Host`).
    pub authority: &'a str,
    /// `:scheme`.
    pub scheme: &'a str,
    /// The other headers. A `host` entry is not seen: Envoy holds it as `:authority`.
    pub headers: &'a HeaderMap,
}

/// One engine's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'r> {
    /// Whether the connection or request may proceed.
    pub allowed: bool,
    /// The first policy (by name) that matched, if any (Envoy's effective policy id).
    pub policy: Option<&'r str>,
    /// For LOG rules: whether a policy matched (Envoy's `access_log_hint`); else `None`.
    pub log: Option<bool>,
}

/// The answers of a filter's enforced and shadow rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'r> {
    /// `rules`: `None` when absent (nothing enforced; count nothing).
    pub enforced: Option<Verdict<'r>>,
    /// `shadow_rules`: counted only.
    pub shadow: Option<Verdict<'r>>,
}

impl Decision<'_> {
    /// Whether the connection or request may proceed (shadow rules never deny).
    pub fn allowed(&self) -> bool {
        self.enforced.is_none_or(|v| v.allowed)
    }
}

// === impl Rules ===

impl Rules {
    /// Evaluate at L4: header and url_path rules see no request and never match.
    pub fn check_connection(&self, conn: &ConnectionFacts<'_>) -> Verdict<'_> {
        self.check(conn, None)
    }

    /// Evaluate for one HTTP request on `conn`.
    pub fn check_request(&self, conn: &ConnectionFacts<'_>, req: &RequestFacts<'_>) -> Verdict<'_> {
        self.check(conn, Some(req))
    }

    fn check(&self, conn: &ConnectionFacts<'_>, req: Option<&RequestFacts<'_>>) -> Verdict<'_> {
        let facts = Facts { conn, req };
        // BTreeMap order is Envoy's: policies sorted by name, the first match is the id.
        let policy = self
            .policies
            .iter()
            .find(|(_, p)| p.matches(&facts))
            .map(|(name, _)| name.as_str());
        let matched = policy.is_some();
        match self.action {
            Action::Allow => Verdict {
                allowed: matched,
                policy,
                log: None,
            },
            Action::Deny => Verdict {
                allowed: !matched,
                policy,
                log: None,
            },
            Action::Log => Verdict {
                allowed: true,
                policy,
                log: Some(matched),
            },
        }
    }
}

// === impl NetworkRbac / HttpRbac ===

impl NetworkRbac {
    /// Decide one connection (Envoy evaluates when its first bytes arrive).
    pub fn check(&self, conn: &ConnectionFacts<'_>) -> Decision<'_> {
        Decision {
            enforced: self.rules.as_ref().map(|r| r.check_connection(conn)),
            shadow: self.shadow_rules.as_ref().map(|r| r.check_connection(conn)),
        }
    }
}

impl HttpRbac {
    /// Decide one request on `conn` (denied: answer 403 `RBAC: access denied`).
    pub fn check(&self, conn: &ConnectionFacts<'_>, req: &RequestFacts<'_>) -> Decision<'_> {
        Decision {
            enforced: self.rules.as_ref().map(|r| r.check_request(conn, req)),
            shadow: self
                .shadow_rules
                .as_ref()
                .map(|r| r.check_request(conn, req)),
        }
    }
}

// === matching ===

struct Facts<'f, 'a> {
    conn: &'f ConnectionFacts<'a>,
    req: Option<&'f RequestFacts<'a>>,
}

impl Policy {
    fn matches(&self, f: &Facts<'_, '_>) -> bool {
        self.permissions.iter().any(|p| p.matches(f))
            && self.principals.iter().any(|p| p.matches(f))
    }
}

impl Permission {
    fn matches(&self, f: &Facts<'_, '_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(v) => v.iter().all(|p| p.matches(f)),
            Permission::Or(v) => v.iter().any(|p| p.matches(f)),
            Permission::Not(p) => !p.matches(f),
            Permission::Header(h) => f.req.is_some_and(|r| h.matches(r)),
            Permission::UrlPath(m) => f.req.is_some_and(|r| m.matches(url_path(r.path))),
            Permission::DestinationIp(c) => c.contains(f.conn.destination.ip()),
            Permission::DestinationPort(p) => u32::from(f.conn.destination.port()) == *p,
            Permission::DestinationPortRange { start, end } => {
                (*start..*end).contains(&u32::from(f.conn.destination.port()))
            }
            Permission::RequestedServerName(m) => m.matches(f.conn.sni.unwrap_or("")),
        }
    }
}

impl Principal {
    fn matches(&self, f: &Facts<'_, '_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(v) => v.iter().all(|p| p.matches(f)),
            Principal::Or(v) => v.iter().any(|p| p.matches(f)),
            Principal::Not(p) => !p.matches(f),
            Principal::Authenticated(name) => match (f.conn.peer, name) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(peer), Some(m)) => {
                    peer.uri_sans.iter().any(|s| m.matches(s))
                        || peer.dns_sans.iter().any(|s| m.matches(s))
                        || m.matches(&peer.subject)
                }
            },
            Principal::SourceIp(c) => c.contains(f.conn.source),
            Principal::DirectRemoteIp(c) => c.contains(f.conn.direct_remote),
            Principal::RemoteIp(c) => c.contains(f.conn.remote),
            Principal::Header(h) => f.req.is_some_and(|r| h.matches(r)),
            Principal::UrlPath(m) => f.req.is_some_and(|r| m.matches(url_path(r.path))),
            // Istio's filter state holds the peer certificate's first URI SAN; absent without
            // mTLS, and an absent object never matches.
            Principal::PeerPrincipal(m) => f
                .conn
                .peer
                .and_then(|p| p.uri_sans.first())
                .is_some_and(|s| m.matches(s)),
        }
    }
}

/// Envoy's `PathUtil::removeQueryAndFragment`.
fn url_path(path: &str) -> &str {
    path.find(['?', '#']).map_or(path, |i| &path[..i])
}

impl StringMatch {
    /// Whether `v` satisfies this `StringMatcher` (no allocation).
    pub fn matches(&self, v: &str) -> bool {
        let (b, ic) = (v.as_bytes(), self.ignore_case);
        let eq = |a: &[u8], x: &str| a.eq_ignore_ascii_case(x.as_bytes());
        match &self.kind {
            StringKind::Regex(re) => re.0.is_match(v),
            StringKind::Exact(x) if ic => eq(b, x),
            StringKind::Exact(x) => x == v,
            StringKind::Prefix(x) if ic => b.len() >= x.len() && eq(&b[..x.len()], x),
            StringKind::Prefix(x) => v.starts_with(x.as_str()),
            StringKind::Suffix(x) if ic => b.len() >= x.len() && eq(&b[b.len() - x.len()..], x),
            StringKind::Suffix(x) => v.ends_with(x.as_str()),
            StringKind::Contains(x) if ic => x.is_empty() || b.windows(x.len()).any(|w| eq(w, x)),
            StringKind::Contains(x) => v.contains(x.as_str()),
        }
    }
}

impl HeaderMatch {
    fn matches(&self, req: &RequestFacts<'_>) -> bool {
        if let HeaderTest::Present(want) = self.test {
            let present = any_value(&self.name, req, |_| true).is_some();
            return (present == want) != self.invert;
        }
        // Envoy: an absent header never matches, inverted or not, unless it counts as "".
        let hit = match any_value(&self.name, req, |v| self.test_value(v)) {
            Some(hit) => hit,
            None if self.missing_as_empty => self.test_value(""),
            None => return false,
        };
        hit != self.invert
    }

    fn test_value(&self, value: &str) -> bool {
        match &self.test {
            HeaderTest::Present(_) => true,
            HeaderTest::LegacyExact(x) => x.is_empty() || x == value,
            HeaderTest::String(m) => m.matches(value),
            HeaderTest::Range { start, end } => {
                value.parse::<i64>().is_ok_and(|n| *start <= n && n < *end)
            }
        }
    }
}

/// Request headers Envoy keeps as one inline entry, so repeated lines reach the matchers
/// joined with ",": its static inline request headers and those its bundled extensions
/// register (measured on Envoy 1.40 by sending each name twice; `direct_envoy_rbac` keeps
/// checking `user-agent` against a non-inline header).
pub(super) const JOINED: &[&str] = &[
    "accept",
    "accept-encoding",
    "access-control-request-headers",
    "access-control-request-method",
    "authorization",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "expect",
    "grpc-accept-encoding",
    "grpc-timeout",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "keep-alive",
    "origin",
    "pragma",
    "proxy-connection",
    "proxy-status",
    "referer",
    "te",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "via",
    "x-client-trace-id",
    "x-envoy-attempt-count",
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal",
    "x-envoy-ip-tags",
    "x-envoy-is-timeout-retry",
    "x-envoy-max-retries",
    "x-envoy-original-path",
    "x-envoy-original-url",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-proto",
    "x-request-id",
];

/// Whether `test` holds for one of header `name`'s values as Envoy's matchers see them;
/// `None` when the header is absent. Pseudo-headers come from the request line (`host` is
/// `:authority` there); Envoy's inline headers are one value, their lines joined with ",";
/// any other header has one value per line. Allocates only to join a repeated inline header.
fn any_value(
    name: &str,
    req: &RequestFacts<'_>,
    mut test: impl FnMut(&str) -> bool,
) -> Option<bool> {
    let pseudo = match name {
        ":method" => Some(req.method),
        ":path" => Some(req.path),
        ":authority" | "host" => Some(req.authority),
        ":scheme" => Some(req.scheme),
        _ if name.starts_with(':') => return None,
        _ => None,
    };
    if let Some(v) = pseudo {
        return Some(test(v));
    }
    let all = req.headers.get_all(name);
    let mut values = all.iter().map(|v| String::from_utf8_lossy(v.as_bytes()));
    let first = values.next()?;
    if JOINED.binary_search(&name).is_ok() {
        let Some(second) = values.next() else {
            return Some(test(&first));
        };
        let mut joined = format!("{first},{second}");
        for v in values {
            joined.push(',');
            joined.push_str(&v);
        }
        return Some(test(&joined));
    }
    Some(test(&first) || values.any(|v| test(&v)))
}

/// Envoy's HCM choice of the downstream remote address (what `remote_ip` tests): with
/// `use_remote_address` the peer, or with `xff_num_trusted_hops` N > 0 the Nth address from
/// the right of `x-forwarded-for`; without it the address `xff_num_trusted_hops` places from
/// the right (the last one by default). An absent or unparsable entry gives the peer.
pub fn downstream_remote(
    peer: IpAddr,
    xff: Option<&str>,
    use_remote_address: bool,
    xff_num_trusted_hops: u32,
) -> IpAddr {
    let skip = match (use_remote_address, xff_num_trusted_hops) {
        (true, 0) => return peer,
        (true, n) => n - 1,
        (false, n) => n,
    };
    xff_address(xff, skip).unwrap_or(peer)
}

/// Envoy's `getLastAddressFromXFF`: drop `skip` entries from the right, take the last one.
fn xff_address(xff: Option<&str>, skip: u32) -> Option<IpAddr> {
    let mut s = xff?;
    for _ in 0..skip {
        s = &s[..s.rfind(',')?];
    }
    if let Some(i) = s.rfind(',')
        && i + 1 < s.len()
    {
        s = &s[i + 1..];
    }
    s.trim().parse().ok()
}
