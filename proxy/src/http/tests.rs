//! Virtual host and route selection against Envoy's documented semantics.

use hyper::{HeaderMap, Method};

use super::route::{RequestFacts, select_route, select_virtual_host, strip_port};
use super::{redirect_location, regex_rewrite, rewrite_path};
use crate::model::matchers::{HeaderMatch, HeaderMatchKind, Pattern};
use crate::model::route::{HeaderOps, PathMatch, PathRedirect, QueryMatch, Redirect, Route};
use crate::model::test_util::{direct_route as route, virtual_host as vh};
use crate::model::{RouteConfig, VirtualHost};

fn rc(hosts: Vec<VirtualHost>) -> RouteConfig {
    RouteConfig {
        name: "r".into(),
        virtual_hosts: hosts,
        ignore_port_in_host_matching: false,
        headers: HeaderOps::default(),
        per_filter: Default::default(),
    }
}

fn pick<'a>(rc: &'a RouteConfig, host: &str) -> Option<&'a str> {
    select_virtual_host(rc, host).map(|v| v.name.as_str())
}

#[test]
fn exact_beats_suffix_beats_prefix_beats_star() {
    let c = rc(vec![
        vh("star", &["*"]),
        vh("prefix", &["foo.*"]),
        vh("suffix", &["*.bar.com"]),
        vh("exact", &["foo.bar.com"]),
    ]);
    assert_eq!(pick(&c, "foo.bar.com"), Some("exact"));
    assert_eq!(pick(&c, "x.bar.com"), Some("suffix"));
    // foo.bar.org: only the prefix wildcard and `*` match; the prefix wins.
    assert_eq!(pick(&c, "foo.bar.org"), Some("prefix"));
    assert_eq!(pick(&c, "other"), Some("star"));
}

#[test]
fn longest_wildcard_wins_and_never_matches_empty() {
    let c = rc(vec![
        vh("short", &["*.com"]),
        vh("long", &["*.bar.com"]),
        vh("dash", &["*-bar.baz.com"]),
        vh("p-short", &["api.*"]),
        vh("p-long", &["api.v2.*"]),
    ]);
    assert_eq!(pick(&c, "a.bar.com"), Some("long"));
    assert_eq!(pick(&c, "a.foo.com"), Some("short"));
    assert_eq!(pick(&c, "x-bar.baz.com"), Some("dash"));
    assert_eq!(pick(&c, "api.v2.example"), Some("p-long"));
    assert_eq!(pick(&c, "api.v1.example"), Some("p-short"));
    // `*.bar.com` needs at least one character before `.bar.com`.
    assert_eq!(pick(&c, ".bar.com"), Some("short"));
    assert_eq!(pick(&c, "bar.com"), Some("short"));
    assert_eq!(pick(&c, "api."), None);
    // Wildcards compare case-insensitively too.
    assert_eq!(pick(&c, "A.BAR.Com"), Some("long"));
    assert_eq!(pick(&c, "API.V2.example"), Some("p-long"));
}

#[test]
fn host_is_case_insensitive_and_keeps_its_port_by_default() {
    let c = rc(vec![
        vh("svc", &["bar-service", "bar-service:50002", "Mixed.Case"]),
        vh("other-port", &["bar-service:8080"]),
    ]);
    assert_eq!(pick(&c, "BAR-Service"), Some("svc"));
    assert_eq!(pick(&c, "mixed.case"), Some("svc"));
    assert_eq!(pick(&c, "bar-service:50002"), Some("svc"));
    assert_eq!(pick(&c, "bar-service:8080"), Some("other-port"));
    // Envoy's default: the port is part of the host, so an unlisted port matches nothing.
    assert_eq!(pick(&c, "bar-service:9999"), None);
    assert_eq!(pick(&c, "unknown"), None);
}

#[test]
fn ignore_port_in_host_matching_strips_the_port() {
    let mut c = rc(vec![vh("svc", &["bar-service"])]);
    c.ignore_port_in_host_matching = true;
    assert_eq!(pick(&c, "bar-service:9999"), Some("svc"));
    assert_eq!(strip_port("[::1]:80"), "[::1]");
    assert_eq!(strip_port("[::1]"), "[::1]");
    assert_eq!(strip_port("::1"), "::1");
    assert_eq!(strip_port("a:"), "a:");
    assert_eq!(strip_port("10.0.0.1:8080"), "10.0.0.1");
}

#[test]
fn star_catches_ports_and_unknown_hosts_but_not_empty() {
    let c = rc(vec![vh("exact", &["a.com"]), vh("star", &["*"])]);
    assert_eq!(pick(&c, "a.com:80"), Some("star"));
    assert_eq!(pick(&c, ""), None);
}

fn with_routes(routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        routes,
        ..vh("v", &["*"])
    }
}

fn first<'a>(
    v: &'a VirtualHost,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Option<&'a str> {
    let facts = RequestFacts {
        host: "h",
        method,
        path,
        headers,
    };
    select_route(v, &facts).map(|r| r.name.as_str())
}

#[test]
fn first_matching_route_in_order() {
    let v = with_routes(vec![
        route("exact", PathMatch::Path("/api".into()), true, vec![]),
        route("api", PathMatch::Prefix("/api".into()), true, vec![]),
        route("all", PathMatch::Prefix("/".into()), true, vec![]),
        route("never", PathMatch::Prefix("/api/v2".into()), true, vec![]),
    ]);
    let h = HeaderMap::new();
    let get = Method::GET;
    // `path` ignores the query string.
    assert_eq!(first(&v, &get, "/api?x=1", &h), Some("exact"));
    assert_eq!(first(&v, &get, "/api/v2/x", &h), Some("api"));
    assert_eq!(first(&v, &get, "/apix", &h), Some("api"));
    assert_eq!(first(&v, &get, "/", &h), Some("all"));
}

#[test]
fn case_sensitivity_applies_to_prefix_and_path() {
    let v = with_routes(vec![
        route("ci", PathMatch::Prefix("/Foo".into()), false, vec![]),
        route("cs", PathMatch::Path("/Bar".into()), true, vec![]),
    ]);
    let h = HeaderMap::new();
    assert_eq!(first(&v, &Method::GET, "/foo/x", &h), Some("ci"));
    assert_eq!(first(&v, &Method::GET, "/FOO", &h), Some("ci"));
    assert_eq!(first(&v, &Method::GET, "/Bar", &h), Some("cs"));
    assert_eq!(first(&v, &Method::GET, "/bar", &h), None);
}

#[test]
fn safe_regex_must_match_the_whole_path_without_query() {
    let re = Pattern::full("/items/[0-9]+").unwrap();
    let v = with_routes(vec![route("re", PathMatch::Regex(re), true, vec![])]);
    let h = HeaderMap::new();
    assert_eq!(first(&v, &Method::GET, "/items/42", &h), Some("re"));
    assert_eq!(first(&v, &Method::GET, "/items/42?a=b", &h), Some("re"));
    assert_eq!(first(&v, &Method::GET, "/items/42/more", &h), None);
    assert_eq!(first(&v, &Method::GET, "/x/items/42", &h), None);
}

#[test]
fn header_exact_present_and_invert() {
    let exact = HeaderMatch {
        name: "x-version".into(),
        kind: HeaderMatchKind::Exact {
            value: "v2".into(),
            ignore_case: false,
        },
        invert: false,
    };
    let present = HeaderMatch {
        name: "x-canary".into(),
        kind: HeaderMatchKind::Present(true),
        invert: false,
    };
    let not_debug = HeaderMatch {
        name: "x-debug".into(),
        kind: HeaderMatchKind::Present(true),
        invert: true,
    };
    let post = HeaderMatch {
        name: ":method".into(),
        kind: HeaderMatchKind::Exact {
            value: "POST".into(),
            ignore_case: false,
        },
        invert: false,
    };
    let v = with_routes(vec![
        route(
            "both",
            PathMatch::Prefix("/".into()),
            true,
            vec![exact.clone(), present],
        ),
        route("v2", PathMatch::Prefix("/".into()), true, vec![exact]),
        route("post", PathMatch::Prefix("/".into()), true, vec![post]),
        route(
            "nodebug",
            PathMatch::Prefix("/".into()),
            true,
            vec![not_debug],
        ),
    ]);
    let mut h = HeaderMap::new();
    h.insert("x-version", "v2".parse().unwrap());
    assert_eq!(first(&v, &Method::GET, "/", &h), Some("v2"));
    h.insert("x-canary", "".parse().unwrap());
    assert_eq!(first(&v, &Method::GET, "/", &h), Some("both"));
    let mut h = HeaderMap::new();
    h.insert("x-version", "V2".parse().unwrap());
    assert_eq!(first(&v, &Method::POST, "/", &h), Some("post"));
    assert_eq!(first(&v, &Method::GET, "/", &h), Some("nodebug"));
    h.insert("x-debug", "1".parse().unwrap());
    assert_eq!(first(&v, &Method::GET, "/", &h), None);
}

#[test]
fn unsupported_matchers_never_match() {
    let odd = HeaderMatch {
        name: "x".into(),
        kind: HeaderMatchKind::Unsupported("range_match".into()),
        invert: true,
    };
    let v = with_routes(vec![
        route(
            "u",
            PathMatch::Unsupported("connect_matcher".into()),
            true,
            vec![],
        ),
        route("h", PathMatch::Prefix("/".into()), true, vec![odd]),
    ]);
    assert_eq!(first(&v, &Method::GET, "/", &HeaderMap::new()), None);
}

#[test]
fn prefix_rewrite_replaces_the_matched_prefix() {
    let r = route("p", PathMatch::Prefix("/api/".into()), true, vec![]);
    assert_eq!(rewrite_path(&r, Some("/"), "/api/users?x=1"), "/users?x=1");
    assert_eq!(rewrite_path(&r, None, "/api/users"), "/api/users");
    let exact = route("e", PathMatch::Path("/old".into()), true, vec![]);
    assert_eq!(rewrite_path(&exact, Some("/new"), "/old?q"), "/new?q");
    let sep = route(
        "s",
        PathMatch::PathSeparatedPrefix("/v1".into()),
        true,
        vec![],
    );
    assert_eq!(rewrite_path(&sep, Some("/v2"), "/v1/x?y"), "/v2/x?y");
}

#[test]
fn regex_rewrite_replaces_every_match_in_the_path_only() {
    let re = regex_lite::Regex::new("^/service/([^/]+)(/.*)$").unwrap();
    assert_eq!(
        regex_rewrite(
            &re,
            "${2}/instance/${1}",
            "/service/foo/v1/api?a=/service/x"
        ),
        "/v1/api/instance/foo?a=/service/x"
    );
    let re = regex_lite::Regex::new("one").unwrap();
    assert_eq!(
        regex_rewrite(&re, "two", "/xxx/one/yyy/one/zzz"),
        "/xxx/two/yyy/two/zzz"
    );
}

#[test]
fn path_separated_prefix_needs_a_segment_boundary() {
    let v = with_routes(vec![route(
        "sep",
        PathMatch::PathSeparatedPrefix("/api".into()),
        true,
        vec![],
    )]);
    let h = HeaderMap::new();
    let get = Method::GET;
    assert_eq!(first(&v, &get, "/api", &h), Some("sep"));
    assert_eq!(first(&v, &get, "/api/", &h), Some("sep"));
    assert_eq!(first(&v, &get, "/api/v1?x", &h), Some("sep"));
    assert_eq!(first(&v, &get, "/api?x=1", &h), Some("sep"));
    assert_eq!(first(&v, &get, "/apis", &h), None);
    assert_eq!(
        first(&v, &get, "/API", &h),
        None,
        "case sensitive by default"
    );
}

#[test]
fn query_parameters_match_decoded_first_values() {
    let mut r = route("q", PathMatch::Prefix("/".into()), true, vec![]);
    r.matcher.query_parameters = vec![
        QueryMatch {
            name: "debug".into(),
            kind: HeaderMatchKind::Present(true),
        },
        QueryMatch {
            name: "user name".into(),
            kind: HeaderMatchKind::Exact {
                value: "a&b".into(),
                ignore_case: true,
            },
        },
    ];
    let v = with_routes(vec![r]);
    let h = HeaderMap::new();
    let get = Method::GET;
    assert_eq!(first(&v, &get, "/?debug&user%20name=A%26B", &h), Some("q"));
    assert_eq!(
        first(&v, &get, "/?user%20name=a%26b&debug=0", &h),
        Some("q")
    );
    assert_eq!(
        first(&v, &get, "/?user%20name=a%26b&debug=0&user%20name=x", &h),
        Some("q")
    );
    assert_eq!(
        first(&v, &get, "/?user%20name=x&user%20name=a%26b&debug", &h),
        None
    );
    assert_eq!(
        first(&v, &get, "/?user%20name=a%26b", &h),
        None,
        "debug absent"
    );
    assert_eq!(first(&v, &get, "/", &h), None);
}

#[test]
fn header_regex_must_match_the_whole_value() {
    let m = HeaderMatch {
        name: "x-version".into(),
        kind: HeaderMatchKind::Regex(Pattern::full("v[0-9]+").unwrap()),
        invert: false,
    };
    let v = with_routes(vec![route(
        "re",
        PathMatch::Prefix("/".into()),
        true,
        vec![m],
    )]);
    let mut h = HeaderMap::new();
    h.insert("x-version", "v12".parse().unwrap());
    assert_eq!(first(&v, &Method::GET, "/", &h), Some("re"));
    h.insert("x-version", "v12-beta".parse().unwrap());
    assert_eq!(first(&v, &Method::GET, "/", &h), None);
}

fn redirect(f: impl FnOnce(&mut Redirect)) -> Redirect {
    let mut r = Redirect {
        scheme: None,
        host: None,
        port: None,
        path: None,
        status: 301,
        strip_query: false,
    };
    f(&mut r);
    r
}

#[test]
fn redirect_location_follows_envoy() {
    let r = route("p", PathMatch::Prefix("/old/".into()), true, vec![]);
    let loc = |rd: Redirect, host: &str, path: &str| redirect_location(&rd, &r, host, path, "http");
    assert_eq!(
        loc(redirect(|_| {}), "a.com", "/old/x?q=1"),
        "http://a.com/old/x?q=1"
    );
    assert_eq!(
        loc(
            redirect(|r| r.host = Some("b.com".into())),
            "a.com",
            "/old/x"
        ),
        "http://b.com/old/x"
    );
    assert_eq!(
        loc(
            redirect(|r| r.path = Some(PathRedirect::Path("/new".into()))),
            "a.com",
            "/old/x?q=1"
        ),
        "http://a.com/new?q=1",
        "path_redirect keeps the query"
    );
    assert_eq!(
        loc(
            redirect(|r| r.path = Some(PathRedirect::Path("/new?z=2".into()))),
            "a.com",
            "/old/x?q=1"
        ),
        "http://a.com/new?z=2",
        "a query in path_redirect replaces it"
    );
    assert_eq!(
        loc(
            redirect(|r| {
                r.path = Some(PathRedirect::Prefix("/new/".into()));
                r.strip_query = true;
            }),
            "a.com",
            "/old/x?q=1"
        ),
        "http://a.com/new/x"
    );
    assert_eq!(
        loc(
            redirect(|r| r.scheme = Some("https".into())),
            "a.com:80",
            "/"
        ),
        "https://a.com/"
    );
    assert_eq!(
        loc(redirect(|r| r.port = Some(8443)), "a.com:80", "/"),
        "http://a.com:8443/"
    );
}

#[test]
fn upgrades_follow_envoys_enable_table() {
    use super::upgrade_allowed;
    let ws = |e: bool| vec![("websocket".to_string(), e)];
    // HCM enabled x route enabled, from Envoy's "WebSocket and HTTP upgrades" table.
    assert!(upgrade_allowed(&ws(true), &[], "websocket"));
    assert!(!upgrade_allowed(&ws(true), &ws(false), "websocket"));
    assert!(upgrade_allowed(&ws(false), &ws(true), "websocket"));
    assert!(!upgrade_allowed(&ws(false), &[], "websocket"));
    // A type the connection manager does not list is never upgraded.
    assert!(!upgrade_allowed(&[], &ws(true), "websocket"));
    assert!(!upgrade_allowed(&ws(true), &[], "h2c"));
}

#[test]
fn retriable_headers_match_status_and_response_headers() {
    use super::route::any_response_header_matches;
    let status_5xx = HeaderMatch {
        name: ":status".into(),
        kind: HeaderMatchKind::Regex(Pattern::full("5[0-9]{2}").unwrap()),
        invert: false,
    };
    let retry_me = HeaderMatch {
        name: "x-retry-me".into(),
        kind: HeaderMatchKind::Present(true),
        invert: false,
    };
    let ms = [status_5xx, retry_me];
    let mut h = HeaderMap::new();
    assert!(any_response_header_matches(&ms, 502, &h));
    assert!(!any_response_header_matches(&ms, 200, &h));
    h.insert("x-retry-me", "1".parse().unwrap());
    assert!(any_response_header_matches(&ms, 200, &h));
    assert!(!any_response_header_matches(&[], 502, &h));
}

#[test]
fn millis_header_values_match_their_formatting_kept_or_not() {
    use std::time::Duration;
    // Table values, a repeated large value (kept), a new large one, and the first again.
    for ms in [
        0u64,
        1,
        511,
        512,
        15_000,
        15_000,
        15_001,
        0,
        u64::MAX / 1000,
    ] {
        let v = super::millis(Duration::from_millis(ms));
        assert_eq!(v.to_str().unwrap(), ms.to_string(), "{ms} ms");
    }
    assert_eq!(super::millis(Duration::from_micros(1999)), "1");
}
