//! Envoy's substitution format strings (`%COMMAND(arg):LEN%`): parsed once at configuration
//! time (an unknown operator refuses the configuration, as Envoy does), rendered per record as
//! text or as Envoy's typed JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Record;

/// Why a format string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// `%` that does not start a command operator.
    #[error("incorrect format at position {pos}: no valid command operator after '%'")]
    NoCommand {
        /// Byte offset of the `%`.
        pos: usize,
    },
    /// An operator skiff does not produce (Envoy knows it or not).
    #[error("command operator %{0}% is not supported by skiff")]
    Unsupported(String),
    /// An operator that needs an argument has none, or a bad one.
    #[error("command operator %{op}%: {why}")]
    BadArgument {
        /// Operator.
        op: String,
        /// What is wrong.
        why: String,
    },
    /// A `START_TIME` strftime specifier skiff does not render.
    #[error("START_TIME format: specifier %{0} is not supported by skiff")]
    TimeSpecifier(String),
    /// A JSON format value that is neither string, number, bool nor struct.
    #[error("json_format {0}: only strings, numbers, booleans and nested structs are supported")]
    JsonValue(String),
}

/// One command operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `%START_TIME%` / `%START_TIME(fmt)%`.
    StartTime(TimeFormat),
    /// `%DURATION%`: milliseconds from start to the log.
    Duration,
    /// `%RESPONSE_CODE%` (0 without an HTTP response).
    ResponseCode,
    /// `%RESPONSE_FLAGS%`.
    ResponseFlags,
    /// `%RESPONSE_CODE_DETAILS%`.
    ResponseCodeDetails,
    /// `%CONNECTION_TERMINATION_DETAILS%`.
    ConnectionTerminationDetails,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    UpstreamTransportFailureReason,
    /// `%BYTES_RECEIVED%`.
    BytesReceived,
    /// `%BYTES_SENT%`.
    BytesSent,
    /// `%PROTOCOL%`.
    Protocol,
    /// `%UPSTREAM_HOST%`.
    UpstreamHost,
    /// `%UPSTREAM_CLUSTER%` and `%UPSTREAM_CLUSTER_RAW%` (skiff has no `alt_stat_name`).
    UpstreamCluster,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    UpstreamLocalAddress,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%` (the original destination of a redirected connection).
    DownstreamLocalAddress,
    /// `%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%`.
    DownstreamLocalAddressWithoutPort,
    /// `%DOWNSTREAM_LOCAL_PORT%`.
    DownstreamLocalPort,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%` and `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%`.
    DownstreamRemoteAddress,
    /// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`.
    DownstreamRemoteAddressWithoutPort,
    /// `%REQUESTED_SERVER_NAME%` (SNI).
    RequestedServerName,
    /// `%ROUTE_NAME%`.
    RouteName,
    /// `%DOWNSTREAM_PEER_URI_SAN%`.
    DownstreamPeerUriSan,
    /// `%DOWNSTREAM_TLS_VERSION%`.
    DownstreamTlsVersion,
    /// `%REQ(A?B):N%`: a request header (or pseudo-header), else the alternative.
    Req(HeaderRef),
    /// `%RESP(A?B):N%`: a response header.
    Resp(HeaderRef),
}

/// The header of `%REQ(...)%` / `%RESP(...)%`, lowercased, with its alternative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRef {
    /// Main header name.
    pub main: String,
    /// `?alternative`.
    pub alt: Option<String>,
}

/// A `START_TIME` format: Envoy's default or a strftime string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    /// `%Y-%m-%dT%H:%M:%E3SZ`.
    Default,
    /// A custom strftime format, checked at configuration time.
    Custom(String),
}

/// One piece of a format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text copied as is.
    Literal(String),
    /// An operator with its `:N` truncation.
    Op(Op, Option<usize>),
}

/// A parsed text format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<Piece>);

/// A typed value as Envoy's structured formatter produces it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Absent (`-` in text, `null` in JSON).
    Missing,
    /// A string.
    Str(String),
    /// A number.
    Num(u64),
}

/// Envoy's default access-log format (used when `log_format` is absent).
pub const ENVOY_DEFAULT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Istio's MeshConfig default access-log format.
pub const ISTIO_DEFAULT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's MeshConfig default JSON access-log format (`accessLogEncoding: JSON`): the text
/// format's operators under Istio's keys.
pub const ISTIO_DEFAULT_JSON: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
];

/// [`ISTIO_DEFAULT_JSON`] as a JSON template.
pub fn istio_default_json() -> Result<JsonTemplate, FormatError> {
    let obj: serde_json::Map<String, serde_json::Value> = ISTIO_DEFAULT_JSON
        .iter()
        .map(|(k, op)| ((*k).to_string(), serde_json::Value::from(*op)))
        .collect();
    JsonTemplate::parse(&serde_json::Value::Object(obj), "json_format")
}

// === impl Template ===

impl Template {
    /// Parse `s` as Envoy does: every `%` starts a command operator.
    pub fn parse(s: &str) -> Result<Template, FormatError> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        let mut pos = 0;
        while let Some(i) = rest.find('%') {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let (piece, used) =
                parse_op(after).ok_or(FormatError::NoCommand { pos: pos + i })??;
            if !lit.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut lit)));
            }
            pieces.push(piece);
            pos += i + 1 + used;
            rest = &after[used..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            pieces.push(Piece::Literal(lit));
        }
        Ok(Template(pieces))
    }

    /// Render as text: missing values are `-`.
    pub fn render(&self, rec: &Record, out: &mut String) {
        for p in &self.0 {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Op(op, len) => match op.value(rec) {
                    Value::Missing => out.push('-'),
                    Value::Num(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Value::Str(s) => out.push_str(truncate(&s, *len)),
                },
            }
        }
    }

    /// Envoy's typed value: a lone operator keeps its type (`null` when missing), anything
    /// else is the text rendering.
    pub fn typed(&self, rec: &Record) -> Value {
        if let [Piece::Op(op, len)] = self.0.as_slice() {
            return match op.value(rec) {
                Value::Str(s) => Value::Str(truncate(&s, *len).to_string()),
                v => v,
            };
        }
        let mut s = String::new();
        self.render(rec, &mut s);
        Value::Str(s)
    }
}

fn truncate(s: &str, len: Option<usize>) -> &str {
    match len {
        Some(n) if n < s.len() => {
            let mut n = n;
            while !s.is_char_boundary(n) {
                n -= 1;
            }
            &s[..n]
        }
        _ => s,
    }
}

/// One operator after its `%`: the piece and the bytes used (through the closing `%`).
/// `None` when no command starts here.
fn parse_op(s: &str) -> Option<Result<(Piece, usize), FormatError>> {
    let name_len = s
        .bytes()
        .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
        .count();
    if name_len == 0 {
        return None;
    }
    let name = &s[..name_len];
    let mut i = name_len;
    let mut arg = None;
    if s[i..].starts_with('(') {
        let close = s[i..].find(')')?;
        arg = Some(&s[i + 1..i + close]);
        i += close + 1;
    }
    let mut len = None;
    if s[i..].starts_with(':') {
        let digits = s[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        len = s[i + 1..i + 1 + digits].parse().ok();
        i += 1 + digits;
    }
    if !s[i..].starts_with('%') {
        return None;
    }
    Some(op(name, arg).map(|o| (Piece::Op(o, len), i + 1)))
}

fn header_ref(op: &str, arg: Option<&str>) -> Result<HeaderRef, FormatError> {
    let bad = |why: &str| FormatError::BadArgument {
        op: op.to_string(),
        why: why.to_string(),
    };
    let arg = arg
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("needs a header name"))?;
    let mut parts = arg.split('?');
    let main = parts.next().unwrap_or_default().to_ascii_lowercase();
    let alt = parts.next().map(str::to_ascii_lowercase);
    if parts.next().is_some() || main.is_empty() || alt.as_deref() == Some("") {
        return Err(bad("more than one alternative header"));
    }
    Ok(HeaderRef { main, alt })
}

fn op(name: &str, arg: Option<&str>) -> Result<Op, FormatError> {
    let no_arg = |o: Op| match arg {
        Some(_) => Err(FormatError::BadArgument {
            op: name.to_string(),
            why: "takes no argument".into(),
        }),
        None => Ok(o),
    };
    match name {
        "START_TIME" => Ok(Op::StartTime(match arg {
            None | Some("") => TimeFormat::Default,
            Some(f) => {
                check_time_format(f)?;
                TimeFormat::Custom(f.to_string())
            }
        })),
        "REQ" => Ok(Op::Req(header_ref(name, arg)?)),
        "RESP" => Ok(Op::Resp(header_ref(name, arg)?)),
        "DURATION" => no_arg(Op::Duration),
        "RESPONSE_CODE" => no_arg(Op::ResponseCode),
        "RESPONSE_FLAGS" => no_arg(Op::ResponseFlags),
        "RESPONSE_CODE_DETAILS" => no_arg(Op::ResponseCodeDetails),
        "CONNECTION_TERMINATION_DETAILS" => no_arg(Op::ConnectionTerminationDetails),
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_arg(Op::UpstreamTransportFailureReason),
        "BYTES_RECEIVED" => no_arg(Op::BytesReceived),
        "BYTES_SENT" => no_arg(Op::BytesSent),
        "PROTOCOL" => no_arg(Op::Protocol),
        "UPSTREAM_HOST" => no_arg(Op::UpstreamHost),
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => no_arg(Op::UpstreamCluster),
        "UPSTREAM_LOCAL_ADDRESS" => no_arg(Op::UpstreamLocalAddress),
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(Op::DownstreamLocalAddress),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_arg(Op::DownstreamLocalAddressWithoutPort),
        "DOWNSTREAM_LOCAL_PORT" => no_arg(Op::DownstreamLocalPort),
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => {
            no_arg(Op::DownstreamRemoteAddress)
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT"
        | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_arg(Op::DownstreamRemoteAddressWithoutPort)
        }
        "REQUESTED_SERVER_NAME" => no_arg(Op::RequestedServerName),
        "ROUTE_NAME" => no_arg(Op::RouteName),
        "DOWNSTREAM_PEER_URI_SAN" => no_arg(Op::DownstreamPeerUriSan),
        "DOWNSTREAM_TLS_VERSION" => no_arg(Op::DownstreamTlsVersion),
        other => Err(FormatError::Unsupported(other.to_string())),
    }
}

// === impl Op ===

impl Op {
    /// The value of this operator for `rec`.
    pub fn value(&self, rec: &Record) -> Value {
        let s = |v: Option<String>| v.map_or(Value::Missing, Value::Str);
        let sref = |v: Option<&str>| s(v.filter(|x| !x.is_empty()).map(str::to_string));
        match self {
            Op::StartTime(f) => Value::Str(f.render(rec.start)),
            Op::Duration => Value::Num(rec.duration.as_millis() as u64),
            Op::ResponseCode => Value::Num(u64::from(rec.response_code)),
            Op::ResponseFlags => Value::Str(if rec.response_flags.is_empty() {
                "-".to_string()
            } else {
                rec.response_flags.join(",")
            }),
            Op::ResponseCodeDetails => sref(rec.response_code_details.as_deref()),
            Op::ConnectionTerminationDetails => sref(rec.connection_termination_details.as_deref()),
            Op::UpstreamTransportFailureReason => {
                sref(rec.upstream_transport_failure_reason.as_deref())
            }
            Op::BytesReceived => Value::Num(rec.bytes_received),
            Op::BytesSent => Value::Num(rec.bytes_sent),
            Op::Protocol => sref(rec.protocol),
            Op::UpstreamHost => s(rec.upstream_host.map(|a| a.to_string())),
            Op::UpstreamCluster => sref(rec.upstream_cluster.as_deref()),
            Op::UpstreamLocalAddress => s(rec.upstream_local.map(|a| a.to_string())),
            Op::DownstreamLocalAddress => s(rec.downstream_local.map(|a| a.to_string())),
            Op::DownstreamLocalAddressWithoutPort => {
                s(rec.downstream_local.map(|a| a.ip().to_string()))
            }
            Op::DownstreamLocalPort => rec
                .downstream_local
                .map_or(Value::Missing, |a| Value::Num(u64::from(a.port()))),
            Op::DownstreamRemoteAddress => s(rec.downstream_remote.map(|a| a.to_string())),
            Op::DownstreamRemoteAddressWithoutPort => {
                s(rec.downstream_remote.map(|a| a.ip().to_string()))
            }
            Op::RequestedServerName => sref(rec.requested_server_name.as_deref()),
            Op::RouteName => sref(rec.route_name.as_deref()),
            Op::DownstreamPeerUriSan => sref(rec.peer_uri_san.as_deref()),
            Op::DownstreamTlsVersion => sref(rec.tls_version),
            Op::Req(h) => match &rec.request {
                Some(r) => s(r
                    .header(&h.main)
                    .or_else(|| h.alt.as_deref().and_then(|a| r.header(a)))),
                None => Value::Missing,
            },
            Op::Resp(h) => match &rec.response_headers {
                Some(m) => s(header_value(m, &h.main)
                    .or_else(|| h.alt.as_deref().and_then(|a| header_value(m, a)))),
                None => Value::Missing,
            },
        }
    }
}

/// A header's first value, lossily as text; `None` when absent.
pub(super) fn header_value(m: &hyper::HeaderMap, name: &str) -> Option<String> {
    m.get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

// === impl TimeFormat ===

/// strftime specifiers skiff renders (absl's, which Envoy uses, has more).
const TIME_SPECIFIERS: &[&str] = &[
    "Y", "m", "d", "H", "M", "S", "y", "j", "s", "z", "Z", "T", "F", "D", "R", "e", "%", "E3S",
    "E6S", "E9S", "3f", "6f", "9f", "f",
];

fn check_time_format(f: &str) -> Result<(), FormatError> {
    let mut rest = f;
    while let Some(i) = rest.find('%') {
        let after = &rest[i + 1..];
        let Some(spec) = TIME_SPECIFIERS
            .iter()
            .filter(|s| after.starts_with(**s))
            .max_by_key(|s| s.len())
        else {
            let shown: String = after.chars().take(3).collect();
            return Err(FormatError::TimeSpecifier(shown));
        };
        rest = &after[spec.len()..];
    }
    Ok(())
}

impl TimeFormat {
    /// `t` in this format, UTC.
    pub fn render(&self, t: SystemTime) -> String {
        match self {
            TimeFormat::Default => strftime("%Y-%m-%dT%H:%M:%E3SZ", t),
            TimeFormat::Custom(f) => strftime(f, t),
        }
    }
}

/// Days since 1970-01-01 -> (year, month, day) (Howard Hinnant's civil-from-days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) -> days since 1970-01-01 (the inverse of [`civil`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn strftime(f: &str, t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs() as i64;
    let nanos = since.subsec_nanos();
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil(days);
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::with_capacity(f.len() + 16);
    let mut rest = f;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let spec = TIME_SPECIFIERS
            .iter()
            .filter(|s| after.starts_with(**s))
            .max_by_key(|s| s.len())
            .copied()
            .unwrap_or("%");
        let _ = match spec {
            "Y" => write!(out, "{y:04}"),
            "m" => write!(out, "{mo:02}"),
            "d" => write!(out, "{d:02}"),
            "e" => write!(out, "{d:2}"),
            "H" => write!(out, "{h:02}"),
            "M" => write!(out, "{mi:02}"),
            "S" => write!(out, "{s:02}"),
            "y" => write!(out, "{:02}", y.rem_euclid(100)),
            "j" => write!(out, "{yday:03}"),
            "s" => write!(out, "{secs}"),
            "z" => write!(out, "+0000"),
            "Z" => write!(out, "UTC"),
            "T" => write!(out, "{h:02}:{mi:02}:{s:02}"),
            "R" => write!(out, "{h:02}:{mi:02}"),
            "F" => write!(out, "{y:04}-{mo:02}-{d:02}"),
            "D" => write!(out, "{mo:02}/{d:02}/{:02}", y.rem_euclid(100)),
            "E3S" => write!(out, "{s:02}.{:03}", nanos / 1_000_000),
            "E6S" => write!(out, "{s:02}.{:06}", nanos / 1_000),
            "E9S" => write!(out, "{s:02}.{nanos:09}"),
            "3f" => write!(out, "{:03}", nanos / 1_000_000),
            "6f" => write!(out, "{:06}", nanos / 1_000),
            "9f" | "f" => write!(out, "{nanos:09}"),
            _ => write!(out, "%"),
        };
        rest = &after[spec.len().min(after.len())..];
    }
    out.push_str(rest);
    out
}

// === JSON ===

/// A `json_format` struct: each leaf a template, nested structs kept, literal numbers and
/// booleans passed through. Keys come out sorted, as Envoy sorts them.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonTemplate {
    /// A nested object.
    Object(BTreeMap<String, JsonTemplate>),
    /// A string with operators.
    Text(Template),
    /// A literal number or boolean.
    Literal(serde_json::Value),
}

impl JsonTemplate {
    /// Parse from the struct (as JSON), naming the failing key.
    pub fn parse(v: &serde_json::Value, at: &str) -> Result<JsonTemplate, FormatError> {
        match v {
            serde_json::Value::Object(m) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    out.insert(k.clone(), JsonTemplate::parse(v, &format!("{at}.{k}"))?);
                }
                Ok(JsonTemplate::Object(out))
            }
            serde_json::Value::String(s) => Ok(JsonTemplate::Text(Template::parse(s)?)),
            serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                Ok(JsonTemplate::Literal(v.clone()))
            }
            _ => Err(FormatError::JsonValue(
                at.trim_start_matches('.').to_string(),
            )),
        }
    }

    /// The value for `rec`.
    pub fn render(&self, rec: &Record, omit_empty: bool) -> serde_json::Value {
        match self {
            JsonTemplate::Object(m) => {
                let mut out = serde_json::Map::new();
                for (k, t) in m {
                    let v = t.render(rec, omit_empty);
                    if omit_empty && (v.is_null() || v.as_str() == Some("")) {
                        continue;
                    }
                    out.insert(k.clone(), v);
                }
                serde_json::Value::Object(out)
            }
            JsonTemplate::Text(t) => match t.typed(rec) {
                Value::Missing => serde_json::Value::Null,
                Value::Num(n) => n.into(),
                Value::Str(s) => s.into(),
            },
            JsonTemplate::Literal(v) => v.clone(),
        }
    }
}
