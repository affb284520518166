//! Route configurations (RDS): virtual hosts, their routes and the clusters they name.
//!
//! Validation follows Envoy where it rejects up front (names, unique virtual hosts and domains).
//! Matchers and actions skiff does not run yet are kept as `Unsupported` instead of rejecting
//! the whole configuration: such a matcher never matches, such an action answers 501, so
//! configurations Envoy accepts keep loading and the gap is visible per request.

use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

use super::listener::ClusterSpecifier;
use super::{FieldError, ModelError, duration};

/// Envoy's default route timeout (`RouteAction.timeout` unset).
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

/// Validated `RouteConfiguration`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Route configuration name (what an HCM's `rds.route_config_name` asks for).
    pub name: String,
    /// Virtual hosts in configuration order.
    pub virtual_hosts: Vec<VirtualHost>,
    /// `ignore_port_in_host_matching`: drop the `:port` of Host before choosing a virtual host.
    pub ignore_port_in_host_matching: bool,
}

/// One `VirtualHost`.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualHost {
    /// Name (unique within the route configuration).
    pub name: String,
    /// `domains` (`*`, `example.com`, `*.example.com` ...).
    pub domains: Vec<String>,
    /// Routes in configuration order (the first match wins).
    pub routes: Vec<Route>,
    /// Clusters named by `route.cluster` or `route.weighted_clusters`, sorted.
    pub clusters: BTreeSet<String>,
}

/// One `Route`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Route name (may be empty).
    pub name: String,
    /// When the route applies.
    pub matcher: RouteMatch,
    /// What it does.
    pub action: RouteAction,
}

/// `RouteMatch`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    /// Path specifier.
    pub path: PathMatch,
    /// `case_sensitive` (default true) for prefix and path.
    pub case_sensitive: bool,
    /// Every header matcher must match.
    pub headers: Vec<HeaderMatch>,
}

/// `RouteMatch.path_specifier`.
#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    /// `prefix`: the beginning of `:path`.
    Prefix(String),
    /// `path`: the whole path without the query string.
    Path(String),
    /// `safe_regex`: the whole path without the query string.
    Regex(Pattern),
    /// A specifier skiff does not run; the route never matches. The string says which.
    Unsupported(String),
}

/// A compiled regular expression that compares by its source text.
#[derive(Debug, Clone)]
pub struct Pattern(pub regex_lite::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Pattern {
    /// Compile `re` so that it must match the whole input (Envoy's full-match rule).
    pub fn full(re: &str) -> Result<Pattern, String> {
        regex_lite::Regex::new(&format!("^(?:{re})$"))
            .map(Pattern)
            .map_err(|e| e.to_string())
    }
}

/// One `HeaderMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    /// Header name, lowercase (`:method`, `:authority`, `:path` are allowed).
    pub name: String,
    /// How the value is tested.
    pub kind: HeaderMatchKind,
    /// `invert_match`.
    pub invert: bool,
}

/// The value test of a `HeaderMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMatchKind {
    /// `exact_match` or `string_match.exact`.
    Exact {
        /// Expected value.
        value: String,
        /// `string_match.ignore_case`.
        ignore_case: bool,
    },
    /// `string_match.prefix` / `prefix_match`.
    Prefix(String, bool),
    /// `string_match.suffix` / `suffix_match`.
    Suffix(String, bool),
    /// `string_match.contains` / `contains_match`.
    Contains(String, bool),
    /// `present_match`: true = the header is present, false = absent.
    Present(bool),
    /// A matcher skiff does not run; it never matches.
    Unsupported(String),
}

/// `Route.action`.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    /// `route`: forward to a cluster.
    Forward(Forward),
    /// `direct_response`.
    Direct {
        /// HTTP status.
        status: u16,
        /// Inline body, if any.
        body: Option<String>,
    },
    /// An action skiff does not run (redirect, filter_action, cluster_header ...): 501.
    Unsupported(String),
}

/// `RouteAction` (the parts skiff runs).
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// `cluster` or `weighted_clusters`.
    pub cluster: ClusterSpecifier,
    /// `prefix_rewrite`: replaces the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// `timeout` (default 15s; `0s` disables).
    pub timeout: Option<Duration>,
}

impl RouteConfig {
    /// Every cluster any route names.
    pub fn clusters(&self) -> BTreeSet<&str> {
        self.virtual_hosts
            .iter()
            .flat_map(|v| v.clusters.iter().map(String::as_str))
            .collect()
    }
}

fn string_match(m: &matcher::StringMatcher) -> HeaderMatchKind {
    use matcher::string_matcher::MatchPattern as P;
    let ic = m.ignore_case;
    match &m.match_pattern {
        Some(P::Exact(v)) => HeaderMatchKind::Exact {
            value: v.clone(),
            ignore_case: ic,
        },
        Some(P::Prefix(v)) => HeaderMatchKind::Prefix(v.clone(), ic),
        Some(P::Suffix(v)) => HeaderMatchKind::Suffix(v.clone(), ic),
        Some(P::Contains(v)) => HeaderMatchKind::Contains(v.clone(), ic),
        _ => HeaderMatchKind::Unsupported("string_match".into()),
    }
}

#[allow(deprecated)]
fn header_match(h: &pb::HeaderMatcher) -> HeaderMatch {
    use pb::header_matcher::HeaderMatchSpecifier as S;
    let kind = match &h.header_match_specifier {
        Some(S::ExactMatch(v)) => HeaderMatchKind::Exact {
            value: v.clone(),
            ignore_case: false,
        },
        Some(S::PrefixMatch(v)) => HeaderMatchKind::Prefix(v.clone(), false),
        Some(S::SuffixMatch(v)) => HeaderMatchKind::Suffix(v.clone(), false),
        Some(S::ContainsMatch(v)) => HeaderMatchKind::Contains(v.clone(), false),
        Some(S::PresentMatch(p)) => HeaderMatchKind::Present(*p),
        Some(S::StringMatch(m)) => string_match(m),
        Some(S::SafeRegexMatch(_)) => HeaderMatchKind::Unsupported("safe_regex_match".into()),
        Some(S::RangeMatch(_)) => HeaderMatchKind::Unsupported("range_match".into()),
        // No specifier: Envoy treats the matcher as "header present".
        None => HeaderMatchKind::Present(true),
    };
    HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        kind,
        invert: h.invert_match,
    }
}

fn route_match(m: &pb::RouteMatch) -> RouteMatch {
    use pb::route_match::PathSpecifier as Ps;
    let mut path = match &m.path_specifier {
        Some(Ps::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(Ps::Path(p)) => PathMatch::Path(p.clone()),
        Some(Ps::SafeRegex(r)) => match Pattern::full(&r.regex) {
            Ok(p) => PathMatch::Regex(p),
            Err(e) => PathMatch::Unsupported(format!("safe_regex {:?}: {e}", r.regex)),
        },
        Some(_) => PathMatch::Unsupported("path_specifier".into()),
        None => PathMatch::Unsupported("no path_specifier".into()),
    };
    if !m.query_parameters.is_empty() {
        path = PathMatch::Unsupported("query_parameters".into());
    }
    RouteMatch {
        path,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers: m.headers.iter().map(header_match).collect(),
    }
}

fn route_action(i: usize, r: &pb::Route) -> Result<RouteAction, FieldError> {
    use pb::route::Action;
    use pb::route_action::ClusterSpecifier as Cs;
    Ok(match &r.action {
        Some(Action::Route(a)) => {
            let cluster = match &a.cluster_specifier {
                Some(Cs::Cluster(c)) if c.is_empty() => {
                    return Err(FieldError::new(
                        format!("routes[{i}].route.cluster"),
                        "must not be empty",
                    ));
                }
                Some(Cs::Cluster(c)) => ClusterSpecifier::Cluster(c.clone()),
                Some(Cs::WeightedClusters(w)) => {
                    let mut out = Vec::with_capacity(w.clusters.len());
                    for (j, c) in w.clusters.iter().enumerate() {
                        if c.name.is_empty() {
                            return Err(FieldError::new(
                                format!("routes[{i}].route.weighted_clusters.clusters[{j}].name"),
                                "must not be empty",
                            ));
                        }
                        out.push((c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)));
                    }
                    ClusterSpecifier::Weighted(out)
                }
                _ => return Ok(RouteAction::Unsupported("cluster_specifier".into())),
            };
            let timeout = match &a.timeout {
                Some(d) => {
                    let d =
                        duration(d).map_err(|e| e.within(format!("routes[{i}].route.timeout")))?;
                    (!d.is_zero()).then_some(d)
                }
                None => Some(DEFAULT_ROUTE_TIMEOUT),
            };
            RouteAction::Forward(Forward {
                cluster,
                prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
                timeout,
            })
        }
        Some(Action::DirectResponse(d)) => {
            use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (100..=599).contains(s))
                .ok_or_else(|| {
                    FieldError::new(
                        format!("routes[{i}].direct_response.status"),
                        format!("{} is not an HTTP status", d.status),
                    )
                })?;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                Some(Specifier::InlineString(s)) => Some(s.clone()),
                Some(Specifier::InlineBytes(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            };
            RouteAction::Direct { status, body }
        }
        Some(Action::Redirect(_)) => RouteAction::Unsupported("redirect".into()),
        Some(_) => RouteAction::Unsupported("action".into()),
        None => RouteAction::Unsupported("no action".into()),
    })
}

fn virtual_host(v: &pb::VirtualHost) -> Result<VirtualHost, FieldError> {
    if v.name.is_empty() {
        return Err(FieldError::new("name", "must not be empty"));
    }
    if v.domains.is_empty() {
        return Err(FieldError::new("domains", "needs at least one domain"));
    }
    let mut clusters = BTreeSet::new();
    let mut routes = Vec::with_capacity(v.routes.len());
    for (i, r) in v.routes.iter().enumerate() {
        let Some(m) = &r.r#match else {
            return Err(FieldError::new(format!("routes[{i}].match"), "missing"));
        };
        let action = route_action(i, r)?;
        if let RouteAction::Forward(f) = &action {
            clusters.extend(f.cluster.names().into_iter().map(str::to_string));
        }
        routes.push(Route {
            name: r.name.clone(),
            matcher: route_match(m),
            action,
        });
    }
    Ok(VirtualHost {
        name: v.name.clone(),
        domains: v.domains.clone(),
        routes,
        clusters,
    })
}

impl TryFrom<&pb::RouteConfiguration> for RouteConfig {
    type Error = ModelError;
    fn try_from(rc: &pb::RouteConfiguration) -> Result<Self, ModelError> {
        let err = |e: FieldError| e.on("route_configuration", &rc.name);
        if rc.name.is_empty() {
            return Err(err(FieldError::new("name", "must not be empty")));
        }
        let mut names = BTreeSet::new();
        let mut domains = BTreeSet::new();
        let mut virtual_hosts = Vec::with_capacity(rc.virtual_hosts.len());
        for (i, v) in rc.virtual_hosts.iter().enumerate() {
            let at = format!("virtual_hosts[{i}]");
            let vh = virtual_host(v).map_err(|e| err(e.within(&at)))?;
            // Envoy refuses duplicate virtual host names and a domain served by two hosts.
            if !names.insert(vh.name.clone()) {
                return Err(err(FieldError::new(
                    format!("{at}.name"),
                    format!("duplicate virtual host {:?}", vh.name),
                )));
            }
            for d in &vh.domains {
                if !domains.insert(d.to_ascii_lowercase()) {
                    return Err(err(FieldError::new(
                        format!("{at}.domains"),
                        format!("domain {d:?} is already served by another virtual host"),
                    )));
                }
            }
            virtual_hosts.push(vh);
        }
        Ok(RouteConfig {
            name: rc.name.clone(),
            virtual_hosts,
            ignore_port_in_host_matching: rc.ignore_port_in_host_matching,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str, domains: &[&str], cluster: &str) -> pb::VirtualHost {
        pb::VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![pb::Route {
                r#match: Some(pb::RouteMatch::default()),
                action: Some(pb::route::Action::Route(pb::RouteAction {
                    cluster_specifier: Some(pb::route_action::ClusterSpecifier::Cluster(
                        cluster.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn route_config_collects_clusters() {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["a.com"], "ca"), vh("b", &["*"], "cb")],
            ..Default::default()
        };
        let m = RouteConfig::try_from(&rc).unwrap();
        assert_eq!(m.clusters().into_iter().collect::<Vec<_>>(), ["ca", "cb"]);
    }

    #[test]
    fn duplicate_domains_are_rejected_with_the_field() {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![vh("a", &["x.com"], "c"), vh("b", &["X.com"], "c")],
            ..Default::default()
        };
        let e = RouteConfig::try_from(&rc).unwrap_err().to_string();
        assert!(
            e.contains("route_configuration \"r\": virtual_hosts[1].domains"),
            "{e}"
        );
    }

    fn rc_with(routes: Vec<pb::Route>) -> RouteConfig {
        let rc = pb::RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vec![pb::VirtualHost {
                name: "v".into(),
                domains: vec!["*".into()],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        };
        RouteConfig::try_from(&rc).unwrap()
    }

    #[test]
    fn route_matchers_and_actions_convert() {
        use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
        let forward = |timeout: Option<PbDuration>| {
            Some(pb::route::Action::Route(pb::RouteAction {
                cluster_specifier: Some(pb::route_action::ClusterSpecifier::WeightedClusters(
                    pb::WeightedCluster {
                        clusters: vec![pb::weighted_cluster::ClusterWeight {
                            name: "w".into(),
                            weight: Some(UInt32Value { value: 3 }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                )),
                prefix_rewrite: "/v2/".into(),
                timeout,
                ..Default::default()
            }))
        };
        let routes = vec![
            pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(pb::route_match::PathSpecifier::SafeRegex(
                        matcher::RegexMatcher {
                            regex: "/a/[0-9]+".into(),
                            ..Default::default()
                        },
                    )),
                    case_sensitive: Some(BoolValue { value: false }),
                    headers: vec![pb::HeaderMatcher {
                        name: "X-Env".into(),
                        header_match_specifier: Some(
                            pb::header_matcher::HeaderMatchSpecifier::PresentMatch(true),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                action: forward(None),
                ..Default::default()
            },
            pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(pb::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: forward(Some(PbDuration {
                    seconds: 0,
                    nanos: 0,
                })),
                ..Default::default()
            },
            pb::Route {
                r#match: Some(pb::RouteMatch {
                    path_specifier: Some(pb::route_match::PathSpecifier::Path("/x".into())),
                    ..Default::default()
                }),
                action: Some(pb::route::Action::DirectResponse(pb::DirectResponseAction {
                    status: 418,
                    body: Some(envoy_types::pb::envoy::config::core::v3::DataSource {
                        specifier: Some(
                            envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(
                                "teapot".into(),
                            ),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            },
        ];
        let rc = rc_with(routes);
        let v = &rc.virtual_hosts[0];
        assert_eq!(v.clusters.iter().collect::<Vec<_>>(), ["w"]);
        let r0 = &v.routes[0];
        assert!(matches!(&r0.matcher.path, PathMatch::Regex(p) if p.0.is_match("/a/12")));
        assert!(!r0.matcher.case_sensitive);
        assert_eq!(r0.matcher.headers[0].name, "x-env");
        assert_eq!(r0.matcher.headers[0].kind, HeaderMatchKind::Present(true));
        let RouteAction::Forward(f) = &r0.action else {
            panic!("{:?}", r0.action)
        };
        assert_eq!(f.timeout, Some(DEFAULT_ROUTE_TIMEOUT));
        assert_eq!(f.prefix_rewrite.as_deref(), Some("/v2/"));
        assert_eq!(f.cluster, ClusterSpecifier::Weighted(vec![("w".into(), 3)]));
        let RouteAction::Forward(f) = &v.routes[1].action else {
            panic!()
        };
        assert_eq!(f.timeout, None, "0s disables the route timeout");
        assert_eq!(
            v.routes[2].action,
            RouteAction::Direct {
                status: 418,
                body: Some("teapot".into())
            }
        );
    }

    #[test]
    fn unsupported_regex_is_kept_as_never_matching() {
        let rc = rc_with(vec![pb::Route {
            r#match: Some(pb::RouteMatch {
                path_specifier: Some(pb::route_match::PathSpecifier::SafeRegex(
                    matcher::RegexMatcher {
                        regex: "(".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        let r = &rc.virtual_hosts[0].routes[0];
        assert!(matches!(r.matcher.path, PathMatch::Unsupported(_)));
        assert!(matches!(r.action, RouteAction::Unsupported(_)));
    }
}
