//! RBAC configuration as skiff evaluates it, converted from the envoy-types protos.
//!
//! Every conversion refuses, with [`RbacError`] naming the field, what the engine does not
//! evaluate: a policy that silently never matched would turn a DENY into an allow.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::config::route::v3 as route_pb;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_pb;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

use crate::model::matchers::Pattern;
use crate::model::{Cidr, FieldError};

/// Longest regex source accepted in a matcher (bytes).
pub const MAX_REGEX_LEN: usize = 4096;
/// Compiled-program budget of one regex (regex_lite's `size_limit`, bytes).
pub const MAX_REGEX_PROGRAM: usize = 64 * 1024;
/// Deepest nesting of and/or/not accepted; keeps evaluation's recursion bounded.
pub const MAX_DEPTH: usize = 64;

/// Istio's filter-state key for the peer's SPIFFE identity (`source.principal`).
pub const ISTIO_PEER_PRINCIPAL: &str = "io.istio.peer_principal";

/// Why an RBAC configuration is refused; `field` is the path inside the filter config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbacError {
    /// A field skiff does not evaluate; accepting it would change the decision silently.
    #[error("{field}: {what} is not supported by skiff's RBAC")]
    Unsupported {
        /// Field path, e.g. `rules.policies["p"].principals[0].metadata`.
        field: String,
        /// What was found.
        what: String,
    },
    /// A value Envoy itself rejects (bad CIDR, empty range, regex that does not compile).
    #[error("{field}: {reason}")]
    Invalid {
        /// Field path.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl RbacError {
    fn unsupported(field: impl Into<String>, what: impl Into<String>) -> Self {
        RbacError::Unsupported {
            field: field.into(),
            what: what.into(),
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RbacError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field path this error names.
    pub fn field(&self) -> &str {
        match self {
            RbacError::Unsupported { field, .. } | RbacError::Invalid { field, .. } => field,
        }
    }

    /// Prefix the field path with an outer field (`outer.inner`, or `outer[i]`).
    fn within(mut self, outer: impl std::fmt::Display) -> Self {
        let f = match &mut self {
            RbacError::Unsupported { field, .. } | RbacError::Invalid { field, .. } => field,
        };
        *f = if f.is_empty() {
            outer.to_string()
        } else if f.starts_with('[') {
            format!("{outer}{f}")
        } else {
            format!("{outer}.{f}")
        };
        self
    }
}

impl From<RbacError> for FieldError {
    fn from(e: RbacError) -> FieldError {
        match e {
            RbacError::Unsupported { field, what } => {
                FieldError::new(field, format!("{what} is not supported by skiff's RBAC"))
            }
            RbacError::Invalid { field, reason } => FieldError::new(field, reason),
        }
    }
}

type Result<T> = std::result::Result<T, RbacError>;

// === types ===

/// `RBAC.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allowed iff some policy matches.
    Allow,
    /// Denied iff some policy matches.
    Deny,
    /// Always allowed; a match marks the request for access logging.
    Log,
}

/// `envoy.config.rbac.v3.RBAC`: an action and its policies, kept in Envoy's evaluation order
/// (lexicographic by name; the first match names the effective policy).
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// What a match means.
    pub action: Action,
    /// Policies by name.
    pub policies: BTreeMap<String, Policy>,
}

/// `Policy`: matches iff some permission and some principal match.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// OR-ed permissions (what is done).
    pub permissions: Vec<Permission>,
    /// OR-ed principals (who does it).
    pub principals: Vec<Principal>,
}

/// `Permission`: a fact about the action (destination, request).
#[derive(Debug, Clone, PartialEq)]
pub enum Permission {
    /// `any: true`.
    Any,
    /// `and_rules`: all match (an empty set matches).
    And(Vec<Permission>),
    /// `or_rules`: one matches (an empty set does not).
    Or(Vec<Permission>),
    /// `not_rule`.
    Not(Box<Permission>),
    /// `header`: a request header (pseudo-headers included); never matches at L4.
    Header(HeaderMatch),
    /// `url_path`: the request path without query and fragment; never matches at L4.
    UrlPath(StringMatch),
    /// `destination_ip`: the downstream local address (the original destination).
    DestinationIp(Cidr),
    /// `destination_port`.
    DestinationPort(u32),
    /// `destination_port_range`: `[start, end)`.
    DestinationPortRange {
        /// First port in the range.
        start: u32,
        /// First port past the range.
        end: u32,
    },
    /// `requested_server_name`: the SNI (an absent SNI is the empty string, as in Envoy).
    RequestedServerName(StringMatch),
}

/// `Principal`: a fact about the downstream.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    /// `any: true`.
    Any,
    /// `and_ids`.
    And(Vec<Principal>),
    /// `or_ids`.
    Or(Vec<Principal>),
    /// `not_id`.
    Not(Box<Principal>),
    /// `authenticated`: a TLS peer; with a name, its URI SANs, DNS SANs, then subject.
    Authenticated(Option<StringMatch>),
    /// `source_ip` (deprecated): the connection's remote address.
    SourceIp(Cidr),
    /// `direct_remote_ip`: the physical peer.
    DirectRemoteIp(Cidr),
    /// `remote_ip`: the downstream remote address (may come from x-forwarded-for).
    RemoteIp(Cidr),
    /// `header`; never matches at L4.
    Header(HeaderMatch),
    /// `url_path`; never matches at L4.
    UrlPath(StringMatch),
    /// `filter_state` with key `io.istio.peer_principal`: Istio's peer SPIFFE identity.
    PeerPrincipal(StringMatch),
}

/// A `StringMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct StringMatch {
    /// The test.
    pub kind: StringKind,
    /// `ignore_case` (not applied to regexes, as in Envoy).
    pub ignore_case: bool,
}

/// `StringMatcher.match_pattern`.
#[derive(Debug, Clone, PartialEq)]
pub enum StringKind {
    /// `exact`.
    Exact(String),
    /// `prefix`.
    Prefix(String),
    /// `suffix`.
    Suffix(String),
    /// `contains`.
    Contains(String),
    /// `safe_regex`: the whole value must match.
    Regex(Pattern),
}

/// A route `HeaderMatcher` as RBAC uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    /// Lowercase header name (`:method`, `:path`, `:authority`, `:scheme` allowed).
    pub name: String,
    /// The test on the value.
    pub test: HeaderTest,
    /// `invert_match` (not applied to an absent header, as in Envoy).
    pub invert: bool,
    /// `treat_missing_header_as_empty`.
    pub missing_as_empty: bool,
}

/// `HeaderMatcher.header_match_specifier`.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderTest {
    /// `present_match` (or no specifier: present): true = present, false = absent.
    Present(bool),
    /// Deprecated `exact_match`: an empty value matches any value, as in Envoy.
    LegacyExact(String),
    /// `string_match`, `prefix_match`, `suffix_match`, `contains_match`, `safe_regex_match`.
    String(StringMatch),
    /// `range_match`: the value as an integer in `[start, end)`.
    Range {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
}

/// `envoy.extensions.filters.network.rbac.v3.RBAC`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRbac {
    /// `rules`; `None`: nothing enforced.
    pub rules: Option<Rules>,
    /// `shadow_rules`: evaluated and counted only.
    pub shadow_rules: Option<Rules>,
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `shadow_rules_stat_prefix`.
    pub shadow_rules_stat_prefix: String,
    /// `delay_deny`: wait this long before closing a denied connection.
    pub delay_deny: Option<Duration>,
}

/// `envoy.extensions.filters.http.rbac.v3.RBAC`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRbac {
    /// `rules`; `None`: nothing enforced.
    pub rules: Option<Rules>,
    /// `shadow_rules`: evaluated and counted only.
    pub shadow_rules: Option<Rules>,
    /// `rules_stat_prefix`.
    pub rules_stat_prefix: String,
    /// `shadow_rules_stat_prefix`.
    pub shadow_rules_stat_prefix: String,
    /// `track_per_rule_stats` (kept; per-policy counters are not emitted yet).
    pub track_per_rule_stats: bool,
}

/// `envoy.extensions.filters.http.rbac.v3.RBACPerRoute`.
#[derive(Debug, Clone, PartialEq)]
pub enum HttpRbacPerRoute {
    /// `rbac` absent: no RBAC on this route.
    Disabled,
    /// This route's configuration replaces the filter's.
    Override(HttpRbac),
}

// === conversions ===

fn action(a: i32) -> Result<Action> {
    match pb::rbac::Action::try_from(a) {
        Ok(pb::rbac::Action::Allow) => Ok(Action::Allow),
        Ok(pb::rbac::Action::Deny) => Ok(Action::Deny),
        Ok(pb::rbac::Action::Log) => Ok(Action::Log),
        Err(_) => Err(RbacError::invalid("action", format!("unknown action {a}"))),
    }
}

impl TryFrom<&pb::Rbac> for Rules {
    type Error = RbacError;

    fn try_from(r: &pb::Rbac) -> Result<Rules> {
        if r.audit_logging_options.is_some() {
            return Err(RbacError::unsupported(
                "audit_logging_options",
                "audit logging",
            ));
        }
        let action = action(r.action)?;
        let mut policies = BTreeMap::new();
        for (name, p) in &r.policies {
            let policy = policy(p).map_err(|e| e.within(format_args!("policies[{name:?}]")))?;
            policies.insert(name.clone(), policy);
        }
        Ok(Rules { action, policies })
    }
}

fn policy(p: &pb::Policy) -> Result<Policy> {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return Err(RbacError::unsupported("condition", "a CEL condition"));
    }
    // Envoy's validation: both lists are required (min_items 1).
    if p.permissions.is_empty() {
        return Err(RbacError::invalid("permissions", "must not be empty"));
    }
    if p.principals.is_empty() {
        return Err(RbacError::invalid("principals", "must not be empty"));
    }
    let permissions = p
        .permissions
        .iter()
        .enumerate()
        .map(|(i, x)| permission(x, 0).map_err(|e| e.within(format_args!("permissions[{i}]"))))
        .collect::<Result<_>>()?;
    let principals = p
        .principals
        .iter()
        .enumerate()
        .map(|(i, x)| principal(x, 0).map_err(|e| e.within(format_args!("principals[{i}]"))))
        .collect::<Result<_>>()?;
    Ok(Policy {
        permissions,
        principals,
    })
}

fn depth_check(depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(RbacError::invalid(
            "",
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    Ok(())
}

fn permissions(rules: &[pb::Permission], depth: usize, field: &str) -> Result<Vec<Permission>> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| permission(r, depth + 1).map_err(|e| e.within(format_args!("{field}[{i}]"))))
        .collect()
}

fn principals(ids: &[pb::Principal], depth: usize, field: &str) -> Result<Vec<Principal>> {
    ids.iter()
        .enumerate()
        .map(|(i, r)| principal(r, depth + 1).map_err(|e| e.within(format_args!("{field}[{i}]"))))
        .collect()
}

#[allow(deprecated)]
fn permission(p: &pb::Permission, depth: usize) -> Result<Permission> {
    use pb::permission::Rule as R;
    depth_check(depth)?;
    Ok(match &p.rule {
        Some(R::Any(true)) => Permission::Any,
        Some(R::Any(false)) => return Err(RbacError::invalid("any", "must be true")),
        Some(R::AndRules(s)) => Permission::And(
            permissions(&s.rules, depth, "rules").map_err(|e| e.within("and_rules"))?,
        ),
        Some(R::OrRules(s)) => {
            Permission::Or(permissions(&s.rules, depth, "rules").map_err(|e| e.within("or_rules"))?)
        }
        Some(R::NotRule(n)) => Permission::Not(Box::new(
            permission(n, depth + 1).map_err(|e| e.within("not_rule"))?,
        )),
        Some(R::Header(h)) => Permission::Header(header(h).map_err(|e| e.within("header"))?),
        Some(R::UrlPath(m)) => Permission::UrlPath(path(m).map_err(|e| e.within("url_path"))?),
        Some(R::DestinationIp(c)) => {
            Permission::DestinationIp(cidr(c).map_err(|e| e.within("destination_ip"))?)
        }
        Some(R::DestinationPort(port)) => {
            if *port > 65535 {
                return Err(RbacError::invalid(
                    "destination_port",
                    format!("{port} is above 65535"),
                ));
            }
            Permission::DestinationPort(*port)
        }
        Some(R::DestinationPortRange(r)) => {
            // Envoy's bounds: 0 <= start < end <= 65536.
            let field = "destination_port_range";
            if !(0..=65536).contains(&r.start) || !(0..=65536).contains(&r.end) {
                return Err(RbacError::invalid(
                    field,
                    format!("[{}, {}) is outside [0, 65536]", r.start, r.end),
                ));
            }
            if r.start >= r.end {
                return Err(RbacError::invalid(
                    field,
                    format!("start {} must be below end {}", r.start, r.end),
                ));
            }
            Permission::DestinationPortRange {
                start: r.start as u32,
                end: r.end as u32,
            }
        }
        Some(R::RequestedServerName(m)) => Permission::RequestedServerName(
            string(m).map_err(|e| e.within("requested_server_name"))?,
        ),
        Some(R::Metadata(_)) => return Err(RbacError::unsupported("metadata", "dynamic metadata")),
        Some(R::SourcedMetadata(_)) => {
            return Err(RbacError::unsupported(
                "sourced_metadata",
                "dynamic or route metadata",
            ));
        }
        Some(R::Matcher(t)) => {
            return Err(RbacError::unsupported(
                "matcher",
                format!("matcher extension {:?}", t.name),
            ));
        }
        Some(R::UriTemplate(_)) => {
            return Err(RbacError::unsupported(
                "uri_template",
                "URI template matching",
            ));
        }
        None => return Err(RbacError::invalid("rule", "no rule set")),
    })
}

#[allow(deprecated)]
fn principal(p: &pb::Principal, depth: usize) -> Result<Principal> {
    use pb::principal::Identifier as I;
    depth_check(depth)?;
    Ok(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::Any(false)) => return Err(RbacError::invalid("any", "must be true")),
        Some(I::AndIds(s)) => {
            Principal::And(principals(&s.ids, depth, "ids").map_err(|e| e.within("and_ids"))?)
        }
        Some(I::OrIds(s)) => {
            Principal::Or(principals(&s.ids, depth, "ids").map_err(|e| e.within("or_ids"))?)
        }
        Some(I::NotId(n)) => Principal::Not(Box::new(
            principal(n, depth + 1).map_err(|e| e.within("not_id"))?,
        )),
        Some(I::Authenticated(a)) => Principal::Authenticated(match &a.principal_name {
            Some(m) => Some(string(m).map_err(|e| e.within("authenticated.principal_name"))?),
            None => None,
        }),
        Some(I::SourceIp(c)) => Principal::SourceIp(cidr(c).map_err(|e| e.within("source_ip"))?),
        Some(I::DirectRemoteIp(c)) => {
            Principal::DirectRemoteIp(cidr(c).map_err(|e| e.within("direct_remote_ip"))?)
        }
        Some(I::RemoteIp(c)) => Principal::RemoteIp(cidr(c).map_err(|e| e.within("remote_ip"))?),
        Some(I::Header(h)) => Principal::Header(header(h).map_err(|e| e.within("header"))?),
        Some(I::UrlPath(m)) => Principal::UrlPath(path(m).map_err(|e| e.within("url_path"))?),
        Some(I::FilterState(f)) => filter_state(f).map_err(|e| e.within("filter_state"))?,
        Some(I::Metadata(_)) => return Err(RbacError::unsupported("metadata", "dynamic metadata")),
        Some(I::SourcedMetadata(_)) => {
            return Err(RbacError::unsupported(
                "sourced_metadata",
                "dynamic or route metadata",
            ));
        }
        Some(I::Custom(t)) => {
            return Err(RbacError::unsupported(
                "custom",
                format!("principal extension {:?}", t.name),
            ));
        }
        None => return Err(RbacError::invalid("identifier", "no identifier set")),
    })
}

fn filter_state(f: &matcher::FilterStateMatcher) -> Result<Principal> {
    use matcher::filter_state_matcher::Matcher as M;
    if f.key != ISTIO_PEER_PRINCIPAL {
        return Err(RbacError::unsupported(
            "key",
            format!("filter state {:?} (only {ISTIO_PEER_PRINCIPAL:?})", f.key),
        ));
    }
    match &f.matcher {
        Some(M::StringMatch(m)) => Ok(Principal::PeerPrincipal(
            string(m).map_err(|e| e.within("string_match"))?,
        )),
        Some(_) => Err(RbacError::unsupported(
            "matcher",
            "a filter state matcher other than string_match",
        )),
        None => Err(RbacError::invalid("matcher", "no matcher set")),
    }
}

/// Envoy's `CidrRange`: an absent `prefix_len` is 0 and a length past the family's width is
/// clamped to it (`CidrRange::create`).
fn cidr(c: &core::CidrRange) -> Result<Cidr> {
    let addr: IpAddr = c.address_prefix.parse().map_err(|_| {
        RbacError::invalid(
            "address_prefix",
            format!("{:?} is not an IP address", c.address_prefix),
        )
    })?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = c.prefix_len.as_ref().map_or(0, |v| v.value).min(max) as u8;
    Ok(Cidr { addr, len })
}

/// Why a matcher's regex is refused.
#[derive(Debug, thiserror::Error)]
pub enum RegexError {
    /// The source is longer than [`MAX_REGEX_LEN`].
    #[error("regex of {len} bytes is longer than {MAX_REGEX_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// It does not compile, or its program is over [`MAX_REGEX_PROGRAM`].
    #[error("invalid regex {regex:?}: {source}")]
    Invalid {
        /// The source.
        regex: String,
        /// What the compiler said.
        source: regex_lite::Error,
    },
}

/// Compile a full-match regex under skiff's size limits.
pub fn compile_regex(re: &str) -> std::result::Result<Pattern, RegexError> {
    if re.len() > MAX_REGEX_LEN {
        return Err(RegexError::TooLong { len: re.len() });
    }
    regex_lite::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(MAX_REGEX_PROGRAM)
        .build()
        .map(Pattern)
        .map_err(|source| RegexError::Invalid {
            regex: re.to_string(),
            source,
        })
}

fn regex(r: &matcher::RegexMatcher) -> Result<Pattern> {
    compile_regex(&r.regex).map_err(|e| RbacError::invalid("regex", e.to_string()))
}

/// `StringMatcher`.
pub fn string(m: &matcher::StringMatcher) -> Result<StringMatch> {
    use matcher::string_matcher::MatchPattern as P;
    let kind = match &m.match_pattern {
        Some(P::Exact(v)) => StringKind::Exact(v.clone()),
        Some(P::Prefix(v)) => StringKind::Prefix(v.clone()),
        Some(P::Suffix(v)) => StringKind::Suffix(v.clone()),
        Some(P::Contains(v)) => StringKind::Contains(v.clone()),
        Some(P::SafeRegex(r)) => StringKind::Regex(regex(r).map_err(|e| e.within("safe_regex"))?),
        Some(P::Custom(t)) => {
            return Err(RbacError::unsupported(
                "custom",
                format!("string matcher extension {:?}", t.name),
            ));
        }
        None => return Err(RbacError::invalid("match_pattern", "no pattern set")),
    };
    Ok(StringMatch {
        kind,
        ignore_case: m.ignore_case,
    })
}

fn path(m: &matcher::PathMatcher) -> Result<StringMatch> {
    use matcher::path_matcher::Rule;
    match &m.rule {
        Some(Rule::Path(s)) => string(s).map_err(|e| e.within("path")),
        None => Err(RbacError::invalid("rule", "no path matcher set")),
    }
}

#[allow(deprecated)]
fn header(h: &route_pb::HeaderMatcher) -> Result<HeaderMatch> {
    use route_pb::header_matcher::HeaderMatchSpecifier as S;
    if h.name.is_empty() {
        return Err(RbacError::invalid("name", "must not be empty"));
    }
    let plain = |kind| {
        HeaderTest::String(StringMatch {
            kind,
            ignore_case: false,
        })
    };
    let test = match &h.header_match_specifier {
        Some(S::ExactMatch(v)) => HeaderTest::LegacyExact(v.clone()),
        Some(S::PrefixMatch(v)) => plain(StringKind::Prefix(v.clone())),
        Some(S::SuffixMatch(v)) => plain(StringKind::Suffix(v.clone())),
        Some(S::ContainsMatch(v)) => plain(StringKind::Contains(v.clone())),
        Some(S::SafeRegexMatch(r)) => plain(StringKind::Regex(
            regex(r).map_err(|e| e.within("safe_regex_match"))?,
        )),
        Some(S::StringMatch(m)) => {
            HeaderTest::String(string(m).map_err(|e| e.within("string_match"))?)
        }
        Some(S::PresentMatch(p)) => HeaderTest::Present(*p),
        Some(S::RangeMatch(r)) => HeaderTest::Range {
            start: r.start,
            end: r.end,
        },
        // No specifier: Envoy treats the matcher as "header present".
        None => HeaderTest::Present(true),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        test,
        invert: h.invert_match,
        missing_as_empty: h.treat_missing_header_as_empty,
    })
}

fn no_matcher<T>(m: &Option<T>, field: &str) -> Result<()> {
    if m.is_some() {
        return Err(RbacError::unsupported(field, "the xDS matcher API"));
    }
    Ok(())
}

fn rules(r: &Option<pb::Rbac>, field: &str, l4: bool) -> Result<Option<Rules>> {
    let Some(r) = r else { return Ok(None) };
    let rules = Rules::try_from(r).map_err(|e| e.within(field))?;
    if l4 {
        for (name, p) in &rules.policies {
            l4_only(p).map_err(|e| e.within(format_args!("{field}.policies[{name:?}]")))?;
        }
    }
    Ok(Some(rules))
}

/// Envoy's network filter refuses `header` rules (it has no request to read them from).
fn l4_only(p: &Policy) -> Result<()> {
    fn perm(p: &Permission) -> bool {
        match p {
            Permission::Header(_) => true,
            Permission::And(v) | Permission::Or(v) => v.iter().any(perm),
            Permission::Not(x) => perm(x),
            _ => false,
        }
    }
    fn prin(p: &Principal) -> bool {
        match p {
            Principal::Header(_) => true,
            Principal::And(v) | Principal::Or(v) => v.iter().any(prin),
            Principal::Not(x) => prin(x),
            _ => false,
        }
    }
    if p.permissions.iter().any(perm) {
        return Err(RbacError::invalid(
            "permissions",
            "header rules are not supported by the RBAC network filter",
        ));
    }
    if p.principals.iter().any(prin) {
        return Err(RbacError::invalid(
            "principals",
            "header rules are not supported by the RBAC network filter",
        ));
    }
    Ok(())
}

impl TryFrom<&net_pb::Rbac> for NetworkRbac {
    type Error = RbacError;

    fn try_from(c: &net_pb::Rbac) -> Result<NetworkRbac> {
        no_matcher(&c.matcher, "matcher")?;
        no_matcher(&c.shadow_matcher, "shadow_matcher")?;
        // CONTINUOUS re-evaluates when protocol filters add dynamic metadata; skiff has no
        // metadata rules, so every evaluation would give the first one's answer.
        net_pb::rbac::EnforcementType::try_from(c.enforcement_type).map_err(|_| {
            RbacError::invalid(
                "enforcement_type",
                format!("unknown value {}", c.enforcement_type),
            )
        })?;
        let delay_deny = match &c.delay_deny {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(RbacError::invalid("delay_deny", "must not be negative"));
            }
            Some(d) => Some(Duration::new(d.seconds as u64, d.nanos as u32)),
        };
        Ok(NetworkRbac {
            rules: rules(&c.rules, "rules", true)?,
            shadow_rules: rules(&c.shadow_rules, "shadow_rules", true)?,
            stat_prefix: c.stat_prefix.clone(),
            shadow_rules_stat_prefix: c.shadow_rules_stat_prefix.clone(),
            delay_deny,
        })
    }
}

impl TryFrom<&http_pb::Rbac> for HttpRbac {
    type Error = RbacError;

    fn try_from(c: &http_pb::Rbac) -> Result<HttpRbac> {
        no_matcher(&c.matcher, "matcher")?;
        no_matcher(&c.shadow_matcher, "shadow_matcher")?;
        Ok(HttpRbac {
            rules: rules(&c.rules, "rules", false)?,
            shadow_rules: rules(&c.shadow_rules, "shadow_rules", false)?,
            rules_stat_prefix: c.rules_stat_prefix.clone(),
            shadow_rules_stat_prefix: c.shadow_rules_stat_prefix.clone(),
            track_per_rule_stats: c.track_per_rule_stats,
        })
    }
}

impl TryFrom<&http_pb::RbacPerRoute> for HttpRbacPerRoute {
    type Error = RbacError;

    fn try_from(c: &http_pb::RbacPerRoute) -> Result<HttpRbacPerRoute> {
        match &c.rbac {
            None => Ok(HttpRbacPerRoute::Disabled),
            Some(r) => Ok(HttpRbacPerRoute::Override(
                HttpRbac::try_from(r).map_err(|e| e.within("rbac"))?,
            )),
        }
    }
}
