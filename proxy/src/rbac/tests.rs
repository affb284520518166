use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as http_pb;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as net_pb;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::model::Cidr;

// === helpers ===

fn value(text: &str) -> Value {
    let mut v = skiff_proto::parse_text(text).expect("fixture text");
    if let Value::Object(m) = &mut v {
        m.remove("@type");
    }
    v
}

fn http_proto(text: &str) -> http_pb::Rbac {
    skiff_proto::decode_json(&value(text)).expect("http RBAC proto")
}

fn net_proto(text: &str) -> net_pb::Rbac {
    skiff_proto::decode_json(&value(text)).expect("network RBAC proto")
}

fn http(text: &str) -> HttpRbac {
    HttpRbac::try_from(&http_proto(text)).expect("http RBAC model")
}

fn net(text: &str) -> NetworkRbac {
    NetworkRbac::try_from(&net_proto(text)).expect("network RBAC model")
}

fn http_err(text: &str) -> RbacError {
    HttpRbac::try_from(&http_proto(text)).expect_err("refused")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conn(src: &str, port: u16) -> ConnectionFacts<'static> {
    ConnectionFacts::new(ip(src), SocketAddr::new(ip("10.0.0.5"), port))
}

/// One request's facts with owned headers.
struct Req {
    method: String,
    path: String,
    authority: String,
    headers: HeaderMap,
}

impl Req {
    fn new(method: &str, path: &str) -> Req {
        Req {
            method: method.into(),
            path: path.into(),
            authority: "httpbin".into(),
            headers: HeaderMap::new(),
        }
    }

    fn header(mut self, name: &str, v: &str) -> Req {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
        self
    }

    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            method: &self.method,
            path: &self.path,
            authority: &self.authority,
            scheme: "http",
            headers: &self.headers,
        }
    }
}

/// Allowed by an ALLOW filter whose one policy has `principal` (YAML) and any permission.
fn principal_allows(principal: &str, c: &ConnectionFacts<'_>, r: &Req) -> bool {
    let f = http(&format!(
        "rules: {{ policies: {{ p: {{ permissions: [{{any: true}}], principals: [{principal}] }} }} }}"
    ));
    f.check(c, &r.facts()).allowed()
}

/// Allowed by an ALLOW filter whose one policy has `permission` (YAML) and any principal.
fn permission_allows(permission: &str, c: &ConnectionFacts<'_>, r: &Req) -> bool {
    let f = http(&format!(
        "rules: {{ policies: {{ p: {{ permissions: [{permission}], principals: [{{any: true}}] }} }} }}"
    ));
    f.check(c, &r.facts()).allowed()
}

// === engine semantics ===

/// Two policies over the destination port, named so that name order is not file order.
fn rules(action: &str) -> Rules {
    let f = http(&format!(
        "rules:
  action: {action}
  policies:
    b-second: {{ permissions: [ {{ destination_port: 80 }} ], principals: [ {{ any: true }} ] }}
    a-first: {{ permissions: [ {{ destination_port_range: {{ start: 80, end: 90 }} }} ], principals: [ {{ any: true }} ] }}
"
    ));
    f.rules.expect("rules")
}

#[test]
fn actions_follow_envoy() {
    let r = Req::new("GET", "/");
    let hit = conn("10.1.1.1", 80);
    let miss = conn("10.1.1.1", 443);
    for (action, hit_allowed, miss_allowed) in [
        ("ALLOW", true, false),
        ("DENY", false, true),
        ("LOG", true, true),
    ] {
        let rules = rules(action);
        let v = rules.check_request(&hit, &r.facts());
        assert_eq!(v.allowed, hit_allowed, "{action} on a match");
        // Policies are tried in name order: the first match names the decision.
        assert_eq!(v.policy, Some("a-first"), "{action}");
        let v = rules.check_request(&miss, &r.facts());
        assert_eq!(v.allowed, miss_allowed, "{action} without a match");
        assert_eq!(v.policy, None);
        let log = (action == "LOG").then_some(false);
        assert_eq!(v.log, log);
    }
    assert_eq!(rules("LOG").check_request(&hit, &r.facts()).log, Some(true));
}

#[test]
fn absent_rules_enforce_nothing_and_empty_allow_denies_all() {
    let r = Req::new("GET", "/");
    let c = conn("10.1.1.1", 80);
    let none = http("{}");
    let d = none.check(&c, &r.facts());
    assert!(d.allowed());
    assert_eq!(d.counts(), (None, None));

    let nothing = http("rules: {}");
    let d = nothing.check(&c, &r.facts());
    assert!(!d.allowed());
    assert_eq!(d.counts(), (Some(false), None));

    let empty_deny = http("rules: { action: DENY }");
    assert!(empty_deny.check(&c, &r.facts()).allowed());
}

#[test]
fn shadow_rules_are_counted_never_enforced() {
    let f = http(
        "shadow_rules: { action: DENY, policies: { p: { permissions: [{any: true}], principals: [{any: true}] } } }",
    );
    let r = Req::new("GET", "/");
    let d = f.check(&conn("10.1.1.1", 80), &r.facts());
    assert!(d.allowed());
    assert_eq!(d.counts(), (None, Some(false)));
    assert_eq!(d.shadow.unwrap().policy, Some("p"));
    let m = d.metadata("", "dry_");
    assert_eq!(
        m.fields.into_iter().collect::<Vec<_>>(),
        [
            (
                "dry_shadow_effective_policy_id".to_string(),
                "p".to_string()
            ),
            ("dry_shadow_engine_result".into(), "denied".into()),
        ]
    );
    assert_eq!(m.access_log_hint, None);
}

// === matchers ===

#[test]
fn string_matchers() {
    let m = |yaml: &str| -> StringMatch {
        let v: envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher =
            skiff_proto::decode_json(&value(yaml)).unwrap();
        model::string(&v).unwrap()
    };
    let table = [
        ("{exact: abc}", "abc", true),
        ("{exact: abc}", "ABC", false),
        ("{exact: abc, ignore_case: true}", "ABC", true),
        ("{exact: ''}", "", true),
        ("{prefix: /a}", "/ab", true),
        ("{prefix: /A, ignore_case: true}", "/ab", true),
        ("{prefix: /a}", "/b", false),
        ("{suffix: .com}", "x.com", true),
        ("{suffix: .COM, ignore_case: true}", "x.com", true),
        ("{contains: mid}", "amidb", true),
        ("{contains: MID}", "amidb", false),
        ("{contains: MID, ignore_case: true}", "amidb", true),
        // Regexes must match the whole value; ignore_case does not apply to them.
        ("{safe_regex: {regex: 'a.c'}}", "abc", true),
        ("{safe_regex: {regex: 'a.c'}}", "xabc", false),
        (
            "{safe_regex: {regex: 'a.c'}, ignore_case: true}",
            "ABC",
            false,
        ),
        ("{safe_regex: {regex: 'a|b'}}", "ab", false),
    ];
    for (yaml, input, want) in table {
        assert_eq!(m(yaml).matches(input), want, "{yaml} on {input:?}");
    }
}

#[test]
fn header_matchers_follow_envoy() {
    let c = conn("10.1.1.1", 80);
    let p = |h: &str, r: &Req| principal_allows(&format!("{{header: {h}}}"), &c, r);
    let plain = Req::new("GET", "/p?q=1");
    let table: Vec<(&str, Req, bool)> = vec![
        (
            "{name: ':method', exact_match: GET}",
            Req::new("GET", "/"),
            true,
        ),
        (
            "{name: ':method', exact_match: GET}",
            Req::new("POST", "/"),
            false,
        ),
        (
            "{name: ':path', string_match: {exact: '/p?q=1'}}",
            Req::new("GET", "/p?q=1"),
            true,
        ),
        (
            "{name: ':authority', string_match: {exact: httpbin}}",
            Req::new("GET", "/"),
            true,
        ),
        (
            "{name: ':scheme', string_match: {exact: http}}",
            Req::new("GET", "/"),
            true,
        ),
        // `host` names `:authority` in Envoy's header map.
        (
            "{name: host, string_match: {exact: httpbin}}",
            Req::new("GET", "/"),
            true,
        ),
        (
            "{name: X-Up, exact_match: a}",
            Req::new("GET", "/").header("x-up", "a"),
            true,
        ),
        // A repeated header is tested value by value; one matching value is enough...
        (
            "{name: x-r, exact_match: 'a,b'}",
            Req::new("GET", "/").header("x-r", "a").header("x-r", "b"),
            false,
        ),
        (
            "{name: x-r, exact_match: b}",
            Req::new("GET", "/").header("x-r", "a").header("x-r", "b"),
            true,
        ),
        (
            "{name: x-r, range_match: {start: 1, end: 5}}",
            Req::new("GET", "/").header("x-r", "9").header("x-r", "2"),
            true,
        ),
        // ...and inversion applies to that answer, not to each value.
        (
            "{name: x-r, exact_match: a, invert_match: true}",
            Req::new("GET", "/").header("x-r", "a").header("x-r", "b"),
            false,
        ),
        // Envoy's inline headers (user-agent, x-forwarded-for, ...) are joined with ",".
        (
            "{name: user-agent, exact_match: 'a,b'}",
            Req::new("GET", "/")
                .header("user-agent", "a")
                .header("user-agent", "b"),
            true,
        ),
        (
            "{name: user-agent, exact_match: a}",
            Req::new("GET", "/")
                .header("user-agent", "a")
                .header("user-agent", "b"),
            false,
        ),
        // Legacy exact_match "" matches any present value.
        (
            "{name: x-e, exact_match: ''}",
            Req::new("GET", "/").header("x-e", "v"),
            true,
        ),
        ("{name: x-e, exact_match: ''}", Req::new("GET", "/"), false),
        (
            "{name: x-e, string_match: {exact: ''}}",
            Req::new("GET", "/").header("x-e", "v"),
            false,
        ),
        // invert_match never turns an absent header into a match.
        (
            "{name: x-i, exact_match: a, invert_match: true}",
            Req::new("GET", "/"),
            false,
        ),
        (
            "{name: x-i, exact_match: a, invert_match: true}",
            Req::new("GET", "/").header("x-i", "b"),
            true,
        ),
        (
            "{name: x-i, exact_match: a, invert_match: true}",
            Req::new("GET", "/").header("x-i", "a"),
            false,
        ),
        (
            "{name: x-i, string_match: {exact: ''}, treat_missing_header_as_empty: true}",
            Req::new("GET", "/"),
            true,
        ),
        (
            "{name: x-i, string_match: {exact: ''}, treat_missing_header_as_empty: true, invert_match: true}",
            Req::new("GET", "/"),
            false,
        ),
        // present_match, and its inversion, do look at absence.
        (
            "{name: x-p, present_match: true}",
            Req::new("GET", "/"),
            false,
        ),
        (
            "{name: x-p, present_match: false}",
            Req::new("GET", "/"),
            true,
        ),
        (
            "{name: x-p, present_match: false}",
            Req::new("GET", "/").header("x-p", ""),
            false,
        ),
        (
            "{name: x-p, present_match: true, invert_match: true}",
            Req::new("GET", "/"),
            true,
        ),
        ("{name: x-p}", Req::new("GET", "/").header("x-p", ""), true),
        // range_match: [start, end) over an integer value.
        (
            "{name: x-n, range_match: {start: -10, end: 10}}",
            Req::new("GET", "/").header("x-n", "-10"),
            true,
        ),
        (
            "{name: x-n, range_match: {start: -10, end: 10}}",
            Req::new("GET", "/").header("x-n", "10"),
            false,
        ),
        (
            "{name: x-n, range_match: {start: -10, end: 10}}",
            Req::new("GET", "/").header("x-n", "1.5"),
            false,
        ),
        (
            "{name: x-n, prefix_match: ab}",
            Req::new("GET", "/").header("x-n", "abc"),
            true,
        ),
        (
            "{name: x-n, suffix_match: bc}",
            Req::new("GET", "/").header("x-n", "abc"),
            true,
        ),
        (
            "{name: x-n, contains_match: b}",
            Req::new("GET", "/").header("x-n", "abc"),
            true,
        ),
        (
            "{name: x-n, safe_regex_match: {regex: 'a[bc]+'}}",
            Req::new("GET", "/").header("x-n", "abc"),
            true,
        ),
        (
            "{name: x-n, safe_regex_match: {regex: 'a[bc]'}}",
            Req::new("GET", "/").header("x-n", "abc"),
            false,
        ),
    ];
    for (h, r, want) in &table {
        assert_eq!(p(h, r), *want, "header {h}");
        // The same matcher as a permission.
        assert_eq!(
            permission_allows(&format!("{{header: {h}}}"), &c, r),
            *want,
            "{h}"
        );
    }
    assert!(!p("{name: x-none, present_match: true}", &plain));
    // A name no request can carry is simply absent.
    assert!(!p("{name: 'bad name', present_match: true}", &plain));
    assert!(p("{name: 'bad name', present_match: false}", &plain));
    // Case-insensitive tests fold ASCII only and do not split characters.
    let utf8 = Req::new("GET", "/").header("x-u", "Grüsse");
    assert!(p(
        "{name: x-u, string_match: {suffix: 'SSE', ignore_case: true}}",
        &utf8
    ));
    assert!(!p(
        "{name: x-u, string_match: {contains: 'RÜ', ignore_case: true}}",
        &utf8
    ));
    assert!(p(
        "{name: x-u, string_match: {prefix: 'grü', ignore_case: true}}",
        &utf8
    ));
}

#[test]
fn joined_header_list_is_sorted_for_binary_search() {
    assert!(eval::JOINED.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn url_path_drops_query_and_fragment() {
    let c = conn("10.1.1.1", 80);
    let table = [
        ("{exact: /a}", "/a?x=1", true),
        ("{exact: /a}", "/a#frag", true),
        ("{exact: /a}", "/a/", false),
        ("{prefix: /A, ignore_case: true}", "/a/b", true),
        ("{suffix: .json}", "/x.json?y", true),
        ("{safe_regex: {regex: '/v[0-9]+/.*'}}", "/v1/x?q", true),
    ];
    for (m, path, want) in table {
        let r = Req::new("GET", path);
        assert_eq!(
            permission_allows(&format!("{{url_path: {{path: {m}}}}}"), &c, &r),
            want,
            "{m} on {path}"
        );
        assert_eq!(
            principal_allows(&format!("{{url_path: {{path: {m}}}}}"), &c, &r),
            want
        );
    }
}

#[test]
fn addresses_and_ports() {
    let r = Req::new("GET", "/");
    let table = [
        ("{destination_port: 80}", "10.1.1.1", 80, true),
        ("{destination_port: 80}", "10.1.1.1", 81, false),
        (
            "{destination_port_range: {start: 80, end: 82}}",
            "10.1.1.1",
            81,
            true,
        ),
        (
            "{destination_port_range: {start: 80, end: 82}}",
            "10.1.1.1",
            82,
            false,
        ),
        (
            "{destination_ip: {address_prefix: 10.0.0.0, prefix_len: 8}}",
            "1.1.1.1",
            80,
            true,
        ),
        (
            "{destination_ip: {address_prefix: 10.0.0.6, prefix_len: 32}}",
            "1.1.1.1",
            80,
            false,
        ),
        // An absent prefix_len is 0 in Envoy: the whole family.
        (
            "{destination_ip: {address_prefix: 192.168.0.1}}",
            "1.1.1.1",
            80,
            true,
        ),
        (
            "{destination_ip: {address_prefix: '::', prefix_len: 0}}",
            "1.1.1.1",
            80,
            false,
        ),
    ];
    for (perm, src, port, want) in table {
        assert_eq!(
            permission_allows(perm, &conn(src, port), &r),
            want,
            "{perm} {src}:{port}"
        );
    }
    let mut c = conn("10.1.1.1", 80);
    c.direct_remote = ip("127.0.0.2");
    c.remote = ip("192.168.1.9");
    for (principal, want) in [
        (
            "{source_ip: {address_prefix: 10.1.0.0, prefix_len: 16}}",
            true,
        ),
        (
            "{direct_remote_ip: {address_prefix: 127.0.0.2, prefix_len: 32}}",
            true,
        ),
        (
            "{direct_remote_ip: {address_prefix: 10.1.0.0, prefix_len: 16}}",
            false,
        ),
        (
            "{remote_ip: {address_prefix: 192.168.0.0, prefix_len: 16}}",
            true,
        ),
        (
            "{remote_ip: {address_prefix: 10.1.0.0, prefix_len: 16}}",
            false,
        ),
        // Longer than the family: clamped to /32.
        (
            "{remote_ip: {address_prefix: 192.168.1.9, prefix_len: 40}}",
            true,
        ),
    ] {
        assert_eq!(principal_allows(principal, &c, &r), want, "{principal}");
    }
    // A v4-mapped v6 peer is the v4 address (Envoy's dual-stack listeners report it so).
    let mapped = conn("::ffff:10.1.2.3", 80);
    assert!(principal_allows(
        "{source_ip: {address_prefix: 10.1.0.0, prefix_len: 16}}",
        &mapped,
        &r
    ));
}

#[test]
fn sni_and_identities() {
    let r = Req::new("GET", "/");
    let mut c = conn("10.1.1.1", 80);
    // No SNI is the empty string.
    assert!(permission_allows(
        "{requested_server_name: {exact: ''}}",
        &c,
        &r
    ));
    c.sni = Some("api.example.com");
    assert!(permission_allows(
        "{requested_server_name: {suffix: .example.com}}",
        &c,
        &r
    ));
    assert!(!permission_allows(
        "{requested_server_name: {exact: ''}}",
        &c,
        &r
    ));

    // Plaintext: authenticated never matches, not even without a name.
    let plain = conn("10.1.1.1", 80);
    assert!(!principal_allows("{authenticated: {}}", &plain, &r));
    let spiffe = "spiffe://cluster.local/ns/default/sa/sleep";
    assert!(!principal_allows(
        &format!("{{authenticated: {{principal_name: {{exact: '{spiffe}'}}}}}}"),
        &plain,
        &r
    ));
    assert!(!principal_allows(
        &format!(
            "{{filter_state: {{key: io.istio.peer_principal, string_match: {{exact: '{spiffe}'}}}}}}"
        ),
        &plain,
        &r
    ));

    let peer = PeerIdentity {
        uri_sans: vec![spiffe.into()],
        dns_sans: vec!["sleep.default.svc".into()],
        subject: "CN=sleep".into(),
    };
    let mut tls = conn("10.1.1.1", 80);
    tls.peer = Some(&peer);
    for (principal, want) in [
        ("{authenticated: {}}".to_string(), true),
        (format!("{{authenticated: {{principal_name: {{exact: '{spiffe}'}}}}}}"), true),
        ("{authenticated: {principal_name: {suffix: .svc}}}".into(), true),
        ("{authenticated: {principal_name: {exact: CN=sleep}}}".into(), true),
        ("{authenticated: {principal_name: {exact: other}}}".into(), false),
        (
            "{filter_state: {key: io.istio.peer_principal, string_match: {safe_regex: {regex: '.*/ns/default/.*'}}}}".into(),
            true,
        ),
        // Istio's filter state carries the URI SAN only.
        ("{filter_state: {key: io.istio.peer_principal, string_match: {exact: CN=sleep}}}".into(), false),
    ] {
        assert_eq!(principal_allows(&principal, &tls, &r), want, "{principal}");
    }
}

#[test]
fn l4_never_sees_request_fields() {
    let f = net(
        "rules: { action: DENY, policies: { p: { permissions: [ {url_path: {path: {prefix: /}}} ], principals: [{any: true}] } } }",
    );
    assert!(f.check(&conn("10.1.1.1", 80)).allowed());
    let f = net(
        "rules: { policies: { p: { permissions: [ {not_rule: {url_path: {path: {prefix: /}}}} ], principals: [{any: true}] } } }",
    );
    assert!(f.check(&conn("10.1.1.1", 80)).allowed());
}

#[test]
fn network_filter_refuses_header_rules() {
    let e = NetworkRbac::try_from(&net_proto(
        "rules: { policies: { p: { permissions: [{any: true}], principals: [ {or_ids: {ids: [ {header: {name: x, present_match: true}} ]}} ] } } }",
    ))
    .unwrap_err();
    assert_eq!(e.field(), r#"rules.policies["p"].principals"#);
    let e = NetworkRbac::try_from(&net_proto(
        "shadow_rules: { policies: { p: { permissions: [ {not_rule: {header: {name: ':method', exact_match: GET}}} ], principals: [{any: true}] } } }",
    ))
    .unwrap_err();
    assert_eq!(e.field(), r#"shadow_rules.policies["p"].permissions"#);
}

#[test]
fn refusals_name_the_field() {
    let pol = |perm: &str, prin: &str| {
        format!("rules: {{ policies: {{ p: {{ permissions: [{perm}], principals: [{prin}] }} }} }}")
    };
    let any = "{any: true}";
    let table = [
        (
            pol(any, "{and_ids: {ids: [ {any: true}, {metadata: {filter: istio_authn, path: [{key: request.auth.principal}], value: {string_match: {exact: x}}}} ]}}"),
            r#"rules.policies["p"].principals[0].and_ids.ids[1].metadata"#,
        ),
        (
            pol("{or_rules: {rules: [ {metadata: {filter: f, path: [{key: k}], value: {present_match: true}}} ]}}", any),
            r#"rules.policies["p"].permissions[0].or_rules.rules[0].metadata"#,
        ),
        (
            pol("{sourced_metadata: {metadata_matcher: {filter: f, path: [{key: k}], value: {present_match: true}}}}", any),
            r#"rules.policies["p"].permissions[0].sourced_metadata"#,
        ),
        (
            pol(any, "{filter_state: {key: other.key, string_match: {exact: x}}}"),
            r#"rules.policies["p"].principals[0].filter_state.key"#,
        ),
        (
            pol(any, "{not_id: {authenticated: {principal_name: {safe_regex: {regex: '('}}}}}"),
            r#"rules.policies["p"].principals[0].not_id.authenticated.principal_name.safe_regex.regex"#,
        ),
        (
            pol("{destination_port_range: {start: 90, end: 80}}", any),
            r#"rules.policies["p"].permissions[0].destination_port_range"#,
        ),
        (
            pol("{destination_port: 70000}", any),
            r#"rules.policies["p"].permissions[0].destination_port"#,
        ),
        (
            pol("{destination_ip: {address_prefix: not-an-ip, prefix_len: 8}}", any),
            r#"rules.policies["p"].permissions[0].destination_ip.address_prefix"#,
        ),
        (
            pol(any, "{custom: {name: envoy.rbac.principals.mtls_authenticated, typed_config: {'@type': type.googleapis.com/envoy.extensions.rbac.principals.mtls_authenticated.v3.Config}}}"),
            r#"rules.policies["p"].principals[0].custom"#,
        ),
        (
            "rules: { policies: { p: { permissions: [{any: true}], principals: [{any: true}], condition: { const_expr: { bool_value: true } } } } }".into(),
            r#"rules.policies["p"].condition"#,
        ),
        (
            "rules: { policies: { p: { permissions: [], principals: [{any: true}] } } }".into(),
            r#"rules.policies["p"].permissions"#,
        ),
        (
            "shadow_rules: { policies: { p: { permissions: [{any: true}], principals: [] } } }".into(),
            r#"shadow_rules.policies["p"].principals"#,
        ),
        (
            "matcher: { on_no_match: { action: { name: a, typed_config: { '@type': type.googleapis.com/envoy.config.rbac.v3.Action, name: x } } } }".into(),
            "matcher",
        ),
        (
            "rules: { audit_logging_options: { audit_condition: ON_DENY } }".into(),
            "rules.audit_logging_options",
        ),
    ];
    for (text, field) in table {
        let e = http_err(&text);
        assert_eq!(e.field(), field, "{text}: {e}");
        assert!(e.to_string().starts_with(field), "{e}");
    }
}

#[test]
fn regexes_are_bounded() {
    assert!(compile_regex("a{1,5}b").is_ok());
    let long = "a".repeat(MAX_REGEX_LEN + 1);
    let e = compile_regex(&long).unwrap_err();
    assert!(matches!(e, RegexError::TooLong { len } if len == MAX_REGEX_LEN + 1));
    assert!(e.to_string().contains("longer"), "{e}");
    // Small source, huge program.
    assert!(matches!(
        compile_regex("(\\w{100}){100}"),
        Err(RegexError::Invalid { .. })
    ));
    // Deep nesting is refused before evaluation could recurse that deep.
    let mut perm = "{any: true}".to_string();
    for _ in 0..=MAX_DEPTH {
        perm = format!("{{not_rule: {perm}}}");
    }
    let e = http_err(&format!(
        "rules: {{ policies: {{ p: {{ permissions: [{perm}], principals: [{{any: true}}] }} }} }}"
    ));
    assert!(e.to_string().contains("nested deeper"), "{e}");
}

#[test]
fn per_route_override() {
    let none: http_pb::RbacPerRoute = skiff_proto::decode_json(&value("{}")).unwrap();
    assert_eq!(
        HttpRbacPerRoute::try_from(&none).unwrap(),
        HttpRbacPerRoute::Disabled
    );
    let some: http_pb::RbacPerRoute =
        skiff_proto::decode_json(&value("{ rbac: { rules: {} } }")).unwrap();
    let HttpRbacPerRoute::Override(r) = HttpRbacPerRoute::try_from(&some).unwrap() else {
        panic!("override expected");
    };
    assert!(r.rules.unwrap().policies.is_empty());
    let bad: http_pb::RbacPerRoute = skiff_proto::decode_json(&value(
        "{ rbac: { rules: { policies: { p: { permissions: [{any: true}], principals: [{metadata: {filter: f, path: [{key: k}], value: {present_match: true}}}] } } } } }",
    ))
    .unwrap();
    assert_eq!(
        HttpRbacPerRoute::try_from(&bad).unwrap_err().field(),
        r#"rbac.rules.policies["p"].principals[0].metadata"#
    );
}

#[test]
fn remote_address_from_xff_as_the_hcm() {
    let peer = ip("127.0.0.1");
    let table = [
        (None, false, 0, "127.0.0.1"),
        (Some("10.0.0.1"), false, 0, "10.0.0.1"),
        (Some("10.0.0.1, 10.0.0.2"), false, 0, "10.0.0.2"),
        (Some("10.0.0.1, 10.0.0.2"), false, 1, "10.0.0.1"),
        (Some("10.0.0.1"), false, 1, "127.0.0.1"),
        (Some("10.0.0.1,"), false, 0, "127.0.0.1"),
        (Some("garbage"), false, 0, "127.0.0.1"),
        (Some("10.0.0.1"), true, 0, "127.0.0.1"),
        (Some("10.0.0.1, 10.0.0.2"), true, 1, "10.0.0.2"),
        (Some("10.0.0.1, 10.0.0.2"), true, 2, "10.0.0.1"),
        (Some(" 2001:db8::1 "), false, 0, "2001:db8::1"),
    ];
    for (xff, use_remote, hops, want) in table {
        assert_eq!(
            downstream_remote(peer, xff, use_remote, hops),
            ip(want),
            "{xff:?} {use_remote} {hops}"
        );
    }
}

#[test]
fn stat_names_follow_envoy() {
    let n = net("rules: {}\nstat_prefix: tcp.\nshadow_rules_stat_prefix: istio_dry_run_allow_");
    assert_eq!(n.stat_names().allowed, "tcp.rbac.allowed");
    assert_eq!(n.stat_names().denied, "tcp.rbac.denied");
    assert_eq!(
        n.stat_names().shadow_allowed,
        "tcp.rbac.istio_dry_run_allow_.shadow_allowed"
    );
    let n = net("stat_prefix: inbound");
    assert_eq!(n.stat_names().denied, "inbound.rbac.denied");
    assert_eq!(n.stat_names().shadow_denied, "inbound.rbac.shadow_denied");
    let h = http("rules_stat_prefix: r_\nshadow_rules_stat_prefix: s_");
    let names = h.stat_names("inbound_0.0.0.0_8080");
    assert_eq!(names.allowed, "http.inbound_0.0.0.0_8080.rbac.r_.allowed");
    assert_eq!(names.denied, "http.inbound_0.0.0.0_8080.rbac.r_.denied");
    assert_eq!(
        names.shadow_denied,
        "http.inbound_0.0.0.0_8080.rbac.s_.shadow_denied"
    );
    assert_eq!(
        stat_names("", "", "").allowed,
        "rbac.allowed",
        "an empty prefix adds no dot"
    );
    assert_eq!(
        denied_detail(Some("ns[a] policy")),
        "rbac_access_denied_matched_policy[ns[a]_policy]"
    );
    assert_eq!(
        denied_detail(None),
        "rbac_access_denied_matched_policy[none]"
    );
}

// === real dumps ===

fn rbac_configs(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            if m.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("rbac.v3.RBAC"))
            {
                out.push(v.clone());
            }
            m.values().for_each(|x| rbac_configs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| rbac_configs(x, out)),
        _ => {}
    }
}

#[test]
fn istio_sidecar_dump_rbac_filters() {
    let text = include_str!("../../../tests/fixtures/xds/istio-sidecar-listeners-27.yaml");
    let dump = skiff_proto::parse_text(text).unwrap();
    let mut found = Vec::new();
    rbac_configs(&dump, &mut found);
    assert_eq!(found.len(), 13);
    let (mut http_ok, mut http_refused, mut net_ok) = (0, 0, 0);
    for cfg in &found {
        let t = cfg["@type"].as_str().unwrap();
        let mut plain = cfg.clone();
        plain.as_object_mut().unwrap().remove("@type");
        if t.contains("network") {
            let p: net_pb::Rbac = skiff_proto::decode_json(&plain).unwrap();
            let n = NetworkRbac::try_from(&p).unwrap();
            // Istio's catch-all: ALLOW with no policies closes every connection.
            let rules = n.rules.as_ref().unwrap();
            assert_eq!(rules.action, Action::Allow);
            assert!(rules.policies.is_empty());
            assert!(!n.check(&conn("10.1.1.1", 80)).allowed());
            assert_eq!(n.stat_names().denied, "tcp.rbac.denied");
            net_ok += 1;
            continue;
        }
        let p: http_pb::Rbac = skiff_proto::decode_json(&plain).unwrap();
        match HttpRbac::try_from(&p) {
            Ok(h) => {
                http_ok += 1;
                assert!(h.rules.is_some() || h.shadow_rules.is_some());
            }
            Err(e) => {
                // These policies also require a JWT claim (istio_authn metadata), which skiff
                // cannot evaluate: refused, naming the field.
                assert!(
                    e.field()
                        .ends_with(".and_ids.ids[1].or_ids.ids[0].metadata"),
                    "{e}"
                );
                assert!(e.field().starts_with("rules.") || e.field().starts_with("shadow_rules."));
                http_refused += 1;
            }
        }
    }
    assert_eq!((http_ok, http_refused, net_ok), (0, 10, 3));

    // The same policy without its JWT condition (Istio's shape for `from.source` alone)
    // converts and evaluates: the peer principal decides.
    let mut cfg = found
        .iter()
        .find(|c| c.get("rules").is_some() && c["@type"].as_str().unwrap().contains("http"))
        .unwrap()
        .clone();
    cfg.as_object_mut().unwrap().remove("@type");
    let policy = &mut cfg["rules"]["policies"]["ns[default]-policy[httpbin]-rule[0]"];
    for p in policy["principals"].as_array_mut().unwrap() {
        p["and_ids"]["ids"].as_array_mut().unwrap().truncate(1);
    }
    let h = HttpRbac::try_from(&skiff_proto::decode_json::<http_pb::Rbac>(&cfg).unwrap()).unwrap();
    let rules = h.rules.as_ref().unwrap();
    let want_perm = Permission::And(vec![
        Permission::Or(vec![Permission::Header(HeaderMatch {
            name: ":method".into(),
            test: HeaderTest::LegacyExact("GET".into()),
            invert: false,
            missing_as_empty: false,
        })]),
        Permission::Or(vec![Permission::UrlPath(StringMatch {
            kind: StringKind::Prefix("/info".into()),
            ignore_case: false,
        })]),
    ]);
    let p = &rules.policies["ns[default]-policy[httpbin]-rule[0]"];
    assert_eq!(p.permissions[0], want_perm);
    assert_eq!(
        p.principals[0],
        Principal::And(vec![Principal::Or(vec![Principal::PeerPrincipal(
            StringMatch {
                kind: StringKind::Exact("spiffe://cluster.local/ns/default/sa/sleep".into()),
                ignore_case: false,
            }
        )])])
    );
    let sleep = PeerIdentity::spiffe("spiffe://cluster.local/ns/default/sa/sleep");
    let test_ns = PeerIdentity::spiffe("spiffe://cluster.local/ns/test/sa/x");
    let mut c = conn("10.1.1.1", 80);
    let get = Req::new("GET", "/info?x");
    let post = Req::new("POST", "/data");
    assert!(!h.check(&c, &get.facts()).allowed(), "plaintext");
    c.peer = Some(&sleep);
    assert!(h.check(&c, &get.facts()).allowed());
    assert!(h.check(&c, &post.facts()).allowed());
    assert!(!h.check(&c, &Req::new("DELETE", "/data").facts()).allowed());
    c.peer = Some(&test_ns);
    assert!(h.check(&c, &get.facts()).allowed());
    assert_eq!(
        h.stat_names("inbound_0.0.0.0_80").allowed,
        "http.inbound_0.0.0.0_80.rbac.allowed"
    );
}

// === Istio's AuthorizationPolicy shapes ===

const SHAPES: &[(&str, &str)] = &[
    (
        "http-allow-path-method",
        include_str!("../../../tests/fixtures/rbac/http-allow-path-method.yaml"),
    ),
    (
        "http-allow-principal",
        include_str!("../../../tests/fixtures/rbac/http-allow-principal.yaml"),
    ),
    (
        "http-deny-explicit",
        include_str!("../../../tests/fixtures/rbac/http-deny-explicit.yaml"),
    ),
    (
        "http-allow-host-port",
        include_str!("../../../tests/fixtures/rbac/http-allow-host-port.yaml"),
    ),
    (
        "http-allow-source-ip",
        include_str!("../../../tests/fixtures/rbac/http-allow-source-ip.yaml"),
    ),
    (
        "http-allow-nothing",
        include_str!("../../../tests/fixtures/rbac/http-allow-nothing.yaml"),
    ),
    (
        "http-dry-run",
        include_str!("../../../tests/fixtures/rbac/http-dry-run.yaml"),
    ),
    (
        "http-log",
        include_str!("../../../tests/fixtures/rbac/http-log.yaml"),
    ),
    (
        "http-header-edges",
        include_str!("../../../tests/fixtures/rbac/http-header-edges.yaml"),
    ),
    (
        "tcp-allow-port-source",
        include_str!("../../../tests/fixtures/rbac/tcp-allow-port-source.yaml"),
    ),
    (
        "tcp-allow-nothing",
        include_str!("../../../tests/fixtures/rbac/tcp-allow-nothing.yaml"),
    ),
    (
        "tcp-deny-source",
        include_str!("../../../tests/fixtures/rbac/tcp-deny-source.yaml"),
    ),
    (
        "tcp-sni-destination",
        include_str!("../../../tests/fixtures/rbac/tcp-sni-destination.yaml"),
    ),
    (
        "tcp-cidr-default-len",
        include_str!("../../../tests/fixtures/rbac/tcp-cidr-default-len.yaml"),
    ),
];

fn s<'v>(p: &'v Value, k: &str, default: &'v str) -> &'v str {
    p.get(k).and_then(Value::as_str).unwrap_or(default)
}

#[test]
fn istio_shapes_answer_every_probe() {
    let mut probes = 0;
    for (name, text) in SHAPES {
        let doc = skiff_proto::parse_text(text).unwrap();
        let mut filter = doc["filter"].clone();
        filter.as_object_mut().unwrap().remove("@type");
        let layer = doc["layer"].as_str().unwrap();
        let (http_f, net_f) = match layer {
            "http" => (
                Some(
                    HttpRbac::try_from(
                        &skiff_proto::decode_json::<http_pb::Rbac>(&filter).unwrap(),
                    )
                    .unwrap(),
                ),
                None,
            ),
            _ => (
                None,
                Some(
                    NetworkRbac::try_from(
                        &skiff_proto::decode_json::<net_pb::Rbac>(&filter).unwrap(),
                    )
                    .unwrap(),
                ),
            ),
        };
        for p in doc["probes"].as_array().unwrap() {
            probes += 1;
            let mut req = Req::new(s(p, "method", "GET"), s(p, "path", "/"));
            req.authority = s(p, "authority", "httpbin").into();
            for h in p
                .get("headers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                req = req.header(h[0].as_str().unwrap(), h[1].as_str().unwrap());
            }
            let source = ip(s(p, "source", "127.0.0.1"));
            let port = p.get("port").and_then(Value::as_u64).unwrap_or(8080) as u16;
            let peer = p
                .get("peer")
                .and_then(Value::as_str)
                .map(PeerIdentity::spiffe);
            let mut c = ConnectionFacts::new(source, SocketAddr::new(ip("127.0.0.1"), port));
            c.remote = downstream_remote(source, p.get("xff").and_then(Value::as_str), false, 0);
            c.sni = p.get("sni").and_then(Value::as_str);
            c.peer = peer.as_ref();
            let d = match (&http_f, &net_f) {
                (Some(h), _) => h.check(&c, &req.facts()),
                (_, Some(n)) => n.check(&c),
                _ => unreachable!(),
            };
            assert_eq!(d.allowed(), p["allowed"].as_bool().unwrap(), "{name}: {p}");
            if let Some(want) = p.get("policy") {
                let got = d.enforced.and_then(|v| v.policy);
                assert_eq!(got, want.as_str(), "{name}: {p}");
            }
            if let Some(want) = p.get("shadow_allowed") {
                assert_eq!(d.shadow.map(|v| v.allowed), want.as_bool(), "{name}: {p}");
            }
            if let Some(want) = p.get("log") {
                assert_eq!(
                    d.enforced.and_then(|v| v.log),
                    want.as_bool(),
                    "{name}: {p}"
                );
            }
        }
    }
    assert!(probes > 80, "{probes} probes");
}

// === properties ===

fn leaf() -> impl Strategy<Value = Permission> {
    prop_oneof![
        Just(Permission::Any),
        (79u32..82).prop_map(Permission::DestinationPort),
        (79u32..82, 1u32..3).prop_map(|(s, n)| Permission::DestinationPortRange {
            start: s,
            end: s + n
        }),
        (0u8..8, any::<bool>()).prop_map(|(x, wide)| Permission::DestinationIp(Cidr {
            addr: IpAddr::from([10, 0, 0, x]),
            len: if wide { 24 } else { 32 },
        })),
        prop_oneof![Just("GET"), Just("POST")].prop_map(|m| Permission::Header(HeaderMatch {
            name: ":method".into(),
            test: HeaderTest::String(StringMatch {
                kind: StringKind::Exact(m.into()),
                ignore_case: false,
            }),
            invert: false,
            missing_as_empty: false,
        })),
        prop_oneof![Just("/a"), Just("/b")].prop_map(|p| Permission::UrlPath(StringMatch {
            kind: StringKind::Prefix(p.into()),
            ignore_case: false,
        })),
        prop_oneof![Just("x"), Just("")].prop_map(|n| Permission::RequestedServerName(
            StringMatch {
                kind: StringKind::Exact(n.into()),
                ignore_case: false,
            }
        )),
    ]
}

fn permission() -> impl Strategy<Value = Permission> {
    leaf().prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Permission::And),
            prop::collection::vec(inner.clone(), 0..3).prop_map(Permission::Or),
            inner.prop_map(|p| Permission::Not(Box::new(p))),
        ]
    })
}

fn principal() -> impl Strategy<Value = Principal> {
    let leaf = prop_oneof![
        Just(Principal::Any),
        (0u8..3).prop_map(|i| Principal::DirectRemoteIp(Cidr {
            addr: IpAddr::from([127, 0, 0, i + 1]),
            len: 32,
        })),
        Just(Principal::Authenticated(None)),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Principal::And),
            prop::collection::vec(inner.clone(), 0..3).prop_map(Principal::Or),
            inner.prop_map(|p| Principal::Not(Box::new(p))),
        ]
    })
}

#[derive(Debug, Clone)]
struct Probe {
    method: &'static str,
    path: &'static str,
    port: u16,
    src: u8,
    sni: Option<&'static str>,
    l4: bool,
}

fn probe() -> impl Strategy<Value = Probe> {
    (
        prop_oneof![Just("GET"), Just("POST")],
        prop_oneof![Just("/a/1"), Just("/b"), Just("/c")],
        79u16..83,
        1u8..4,
        prop_oneof![Just(None), Just(Some("x")), Just(Some("y"))],
        any::<bool>(),
    )
        .prop_map(|(method, path, port, src, sni, l4)| Probe {
            method,
            path,
            port,
            src,
            sni,
            l4,
        })
}

fn decide(rules: &Rules, p: &Probe) -> Verdict<'static> {
    let mut c = ConnectionFacts::new(
        IpAddr::from([127, 0, 0, p.src]),
        SocketAddr::new(ip("10.0.0.5"), p.port),
    );
    c.sni = p.sni;
    let r = Req::new(p.method, p.path);
    let v = if p.l4 {
        rules.check_connection(&c)
    } else {
        rules.check_request(&c, &r.facts())
    };
    // Detach from `rules` (policy ids are the fixed names below).
    Verdict {
        allowed: v.allowed,
        policy: v.policy.map(|n| if n == "p" { "p" } else { "q" }),
        log: v.log,
    }
}

fn one(action: Action, perm: Permission, principal: Principal) -> Rules {
    Rules {
        action,
        policies: [(
            "p".to_string(),
            Policy {
                permissions: vec![perm],
                principals: vec![principal],
            },
        )]
        .into(),
    }
}

proptest! {
    #[test]
    fn double_negation_and_singletons_are_identities(
        perm in permission(), prin in principal(), p in probe()
    ) {
        let base = decide(&one(Action::Allow, perm.clone(), prin.clone()), &p);
        let nn = Permission::Not(Box::new(Permission::Not(Box::new(perm.clone()))));
        prop_assert_eq!(decide(&one(Action::Allow, nn, prin.clone()), &p), base);
        prop_assert_eq!(decide(&one(Action::Allow, Permission::And(vec![perm.clone()]), prin.clone()), &p), base);
        prop_assert_eq!(decide(&one(Action::Allow, Permission::Or(vec![perm.clone()]), prin.clone()), &p), base);
        let nn = Principal::Not(Box::new(Principal::Not(Box::new(prin.clone()))));
        prop_assert_eq!(decide(&one(Action::Allow, perm.clone(), nn), &p), base);
        prop_assert_eq!(decide(&one(Action::Allow, perm.clone(), Principal::And(vec![prin.clone()])), &p), base);
        prop_assert_eq!(decide(&one(Action::Allow, perm.clone(), Principal::Or(vec![prin.clone()])), &p), base);
        // Empty sets: and matches, or does not.
        let and_empty = decide(&one(Action::Allow, Permission::And(vec![]), prin.clone()), &p);
        let any = decide(&one(Action::Allow, Permission::Any, prin.clone()), &p);
        prop_assert_eq!(and_empty, any);
        prop_assert!(!decide(&one(Action::Allow, Permission::Or(vec![]), prin), &p).allowed);
    }

    #[test]
    fn deny_is_the_complement_of_allow_and_log_always_allows(
        perms in prop::collection::vec((permission(), principal()), 0..4), p in probe()
    ) {
        let set = |action| Rules {
            action,
            policies: perms
                .iter()
                .enumerate()
                .map(|(i, (perm, prin))| {
                    (if i == 0 { "p".to_string() } else { format!("q{i}") }, Policy {
                        permissions: vec![perm.clone()],
                        principals: vec![prin.clone()],
                    })
                })
                .collect(),
        };
        let allow = decide(&set(Action::Allow), &p);
        let deny = decide(&set(Action::Deny), &p);
        let log = decide(&set(Action::Log), &p);
        prop_assert_eq!(deny.allowed, !allow.allowed);
        prop_assert_eq!(deny.policy, allow.policy);
        prop_assert!(log.allowed);
        prop_assert_eq!(log.log, Some(allow.allowed));
    }

    #[test]
    fn l4_header_rules_never_match(perm in permission(), p in probe()) {
        // At L4, a request-only leaf is false; Not flips it, so compare with the same tree
        // where request leaves are replaced by a rule that never matches.
        fn strip(p: &Permission) -> Permission {
            match p {
                Permission::Header(_) | Permission::UrlPath(_) => Permission::Or(vec![]),
                Permission::And(v) => Permission::And(v.iter().map(strip).collect()),
                Permission::Or(v) => Permission::Or(v.iter().map(strip).collect()),
                Permission::Not(x) => Permission::Not(Box::new(strip(x))),
                other => other.clone(),
            }
        }
        let l4 = Probe { l4: true, ..p };
        prop_assert_eq!(
            decide(&one(Action::Allow, perm.clone(), Principal::Any), &l4),
            decide(&one(Action::Allow, strip(&perm), Principal::Any), &l4)
        );
    }
}

// === hostile configurations ===

mod hostile {
    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::envoy::config::rbac::v3 as pb;
    use envoy_types::pb::envoy::config::route::v3 as route_pb;
    use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
    use envoy_types::pb::envoy::r#type::v3::Int32Range;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use proptest::prelude::*;

    use super::*;

    fn string_matcher() -> impl Strategy<Value = matcher::StringMatcher> {
        use matcher::string_matcher::MatchPattern as P;
        (
            prop_oneof![
                ".{0,8}".prop_map(P::Exact),
                ".{0,8}".prop_map(P::Prefix),
                ".{0,8}".prop_map(P::Suffix),
                ".{0,8}".prop_map(P::Contains),
                "[a-z()\\[\\]{}*+?|.0-9,\\\\]{0,16}".prop_map(|regex| P::SafeRegex(
                    matcher::RegexMatcher {
                        regex,
                        ..Default::default()
                    }
                )),
            ],
            any::<bool>(),
        )
            .prop_map(|(p, ignore_case)| matcher::StringMatcher {
                match_pattern: Some(p),
                ignore_case,
            })
    }

    fn cidr() -> impl Strategy<Value = CidrRange> {
        (
            prop_oneof![
                Just("10.0.0.0".to_string()),
                Just("::".to_string()),
                Just("::ffff:127.0.0.1".to_string()),
                ".{0,6}"
            ],
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(address_prefix, len)| CidrRange {
                address_prefix,
                prefix_len: len.map(|value| UInt32Value { value }),
            })
    }

    #[allow(deprecated)]
    fn header() -> impl Strategy<Value = route_pb::HeaderMatcher> {
        use route_pb::header_matcher::HeaderMatchSpecifier as S;
        (
            prop_oneof![
                Just(":method".to_string()),
                Just("x-a".to_string()),
                ".{0,4}"
            ],
            proptest::option::of(prop_oneof![
                ".{0,4}".prop_map(S::ExactMatch),
                any::<bool>().prop_map(S::PresentMatch),
                (any::<i64>(), any::<i64>()).prop_map(|(start, end)| S::RangeMatch(
                    envoy_types::pb::envoy::r#type::v3::Int64Range { start, end }
                )),
                string_matcher().prop_map(S::StringMatch),
            ]),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(name, spec, invert_match, missing)| route_pb::HeaderMatcher {
                    name,
                    header_match_specifier: spec,
                    invert_match,
                    treat_missing_header_as_empty: missing,
                },
            )
    }

    fn permission() -> impl Strategy<Value = pb::Permission> {
        use pb::permission::Rule as R;
        let leaf = prop_oneof![
            any::<bool>().prop_map(R::Any),
            any::<u32>().prop_map(R::DestinationPort),
            (any::<i32>(), any::<i32>())
                .prop_map(|(start, end)| R::DestinationPortRange(Int32Range { start, end })),
            cidr().prop_map(R::DestinationIp),
            header().prop_map(R::Header),
            string_matcher().prop_map(R::RequestedServerName),
            string_matcher().prop_map(|m| R::UrlPath(matcher::PathMatcher {
                rule: Some(matcher::path_matcher::Rule::Path(m)),
            })),
        ]
        .prop_map(|r| pb::Permission { rule: Some(r) });
        leaf.prop_recursive(6, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|rules| R::AndRules(pb::permission::Set { rules })),
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|rules| R::OrRules(pb::permission::Set { rules })),
                inner.prop_map(|p| R::NotRule(Box::new(p))),
            ]
            .prop_map(|r| pb::Permission { rule: Some(r) })
        })
    }

    #[allow(deprecated)]
    fn principal() -> impl Strategy<Value = pb::Principal> {
        use pb::principal::Identifier as I;
        let leaf = prop_oneof![
            any::<bool>().prop_map(I::Any),
            cidr().prop_map(I::DirectRemoteIp),
            cidr().prop_map(I::SourceIp),
            cidr().prop_map(I::RemoteIp),
            header().prop_map(I::Header),
            proptest::option::of(string_matcher()).prop_map(|principal_name| {
                I::Authenticated(pb::principal::Authenticated { principal_name })
            }),
            (
                prop_oneof![Just(ISTIO_PEER_PRINCIPAL.to_string()), ".{0,4}"],
                string_matcher()
            )
                .prop_map(|(key, m)| I::FilterState(matcher::FilterStateMatcher {
                    key,
                    matcher: Some(matcher::filter_state_matcher::Matcher::StringMatch(m)),
                })),
        ]
        .prop_map(|i| pb::Principal {
            identifier: Some(i),
        });
        leaf.prop_recursive(6, 48, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|ids| I::AndIds(pb::principal::Set { ids })),
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|ids| I::OrIds(pb::principal::Set { ids })),
                inner.prop_map(|p| I::NotId(Box::new(p))),
            ]
            .prop_map(|i| pb::Principal {
                identifier: Some(i),
            })
        })
    }

    proptest! {
        /// Whatever a control plane sends, conversion answers (Ok or a named refusal) and an
        /// accepted configuration evaluates, without a panic.
        #[test]
        fn random_policies_convert_or_are_refused_never_panic(
            perms in prop::collection::vec(permission(), 0..3),
            prins in prop::collection::vec(principal(), 0..3),
            action in -1i32..4,
            p in super::probe(),
        ) {
            let rbac = pb::Rbac {
                action,
                policies: [(
                    "p".to_string(),
                    pb::Policy { permissions: perms, principals: prins, ..Default::default() },
                )]
                .into(),
                ..Default::default()
            };
            let http = http_pb::Rbac { rules: Some(rbac.clone()), ..Default::default() };
            match HttpRbac::try_from(&http) {
                Ok(h) => {
                    let _ = super::decide(h.rules.as_ref().unwrap(), &p);
                }
                Err(e) => prop_assert!(!e.field().is_empty() || e.to_string().contains("nested")),
            }
            let net = net_pb::Rbac { shadow_rules: Some(rbac), ..Default::default() };
            if let Ok(n) = NetworkRbac::try_from(&net) {
                let _ = n.check(&conn("127.0.0.1", p.port));
            }
        }
    }
}
