//! Envoy's access logs (issue 17): `access_log` on listeners, tcp_proxy and the HTTP
//! connection manager.
//!
//! - [`AccessLog`]: one validated `envoy.config.accesslog.v3.AccessLog` (the sink, its format
//!   and filter), converted in `model::access_log`;
//! - `format`: Envoy's command operators, parsed at configuration time (unknown ones refuse
//!   the resource), rendered as text (`-` when missing) or typed JSON (`null`, sorted keys);
//! - `filter`: the access-log filters skiff evaluates;
//! - `sink`: one writer thread per file behind a bounded queue; the data path never waits on
//!   a write (a full queue drops the line, counted in `access_logs.file.write_dropped`), and
//!   `POST /reopen_logs` reopens the files.
//!
//! The data path fills a [`Record`] per connection (listener and tcp_proxy logs) or per
//! request (HCM logs) and calls [`log_all`].

pub mod body;
pub mod filter;
pub mod format;
pub mod sink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::stats::Stats;

pub use filter::Filter;
pub use format::{FormatError, JsonTemplate, Template};
pub use sink::Target;

/// Stat counting lines dropped because a writer's queue was full.
pub const DROPPED_STAT: &str = "access_logs.file.write_dropped";

/// How lines are formatted.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// A text format string (written as is: no newline is added, as in Envoy).
    Text(Template),
    /// `json_format`: one JSON object per line.
    Json {
        /// The object's template.
        template: JsonTemplate,
        /// `omit_empty_values`.
        omit_empty: bool,
    },
}

/// One validated `access_log` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    /// The entry's `name` (`envoy.access_loggers.file`, ...).
    pub name: String,
    /// Where lines go.
    pub target: Target,
    /// How they look.
    pub format: Arc<Format>,
    /// Which records are logged (`None`: all).
    pub filter: Option<Filter>,
}

/// The request side of an HTTP record: pseudo-headers and the headers as the connection
/// manager saw them (after `x-forwarded-for` and `x-request-id`).
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    /// `:method`.
    pub method: String,
    /// `:path` (with the query).
    pub path: String,
    /// `:authority` (or Host).
    pub authority: String,
    /// `:scheme`.
    pub scheme: &'static str,
    /// The headers.
    pub headers: hyper::HeaderMap,
}

impl RequestHead {
    /// A header or pseudo-header by lowercase name.
    pub fn header(&self, name: &str) -> Option<String> {
        match name {
            ":method" => Some(self.method.clone()),
            ":path" => Some(self.path.clone()),
            ":authority" => Some(self.authority.clone()).filter(|a| !a.is_empty()),
            ":scheme" => Some(self.scheme.to_string()),
            n => format::header_value(&self.headers, n),
        }
    }
}

/// What one connection or request did, as the command operators read it.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it started.
    pub start: SystemTime,
    /// How long it lasted (up to the log).
    pub duration: Duration,
    /// `HTTP/1.1`, `HTTP/2`; `None` for TCP.
    pub protocol: Option<&'static str>,
    /// The request, for HTTP.
    pub request: Option<RequestHead>,
    /// The response headers sent downstream, for HTTP.
    pub response_headers: Option<hyper::HeaderMap>,
    /// HTTP status; 0 without a response (TCP), as Envoy.
    pub response_code: u16,
    /// Envoy's response flags, in the order Envoy prints them.
    pub response_flags: Vec<&'static str>,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub response_code_details: Option<String>,
    /// `%CONNECTION_TERMINATION_DETAILS%`.
    pub connection_termination_details: Option<String>,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    pub upstream_transport_failure_reason: Option<String>,
    /// Bytes from downstream (HTTP: request body).
    pub bytes_received: u64,
    /// Bytes to downstream (HTTP: response body).
    pub bytes_sent: u64,
    /// The upstream host tried last.
    pub upstream_host: Option<SocketAddr>,
    /// The upstream cluster.
    pub upstream_cluster: Option<String>,
    /// The local address of the upstream connection.
    pub upstream_local: Option<SocketAddr>,
    /// Downstream local address (the original destination when redirected).
    pub downstream_local: Option<SocketAddr>,
    /// Downstream peer.
    pub downstream_remote: Option<SocketAddr>,
    /// SNI the client asked for.
    pub requested_server_name: Option<String>,
    /// Route name (HTTP).
    pub route_name: Option<String>,
    /// The client certificate's first URI SAN.
    pub peer_uri_san: Option<String>,
    /// Negotiated TLS version of the downstream connection (`TLSv1.3`).
    pub tls_version: Option<&'static str>,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            start: UNIX_EPOCH,
            duration: Duration::ZERO,
            protocol: None,
            request: None,
            response_headers: None,
            response_code: 0,
            response_flags: Vec::new(),
            response_code_details: None,
            connection_termination_details: None,
            upstream_transport_failure_reason: None,
            bytes_received: 0,
            bytes_sent: 0,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local: None,
            downstream_local: None,
            downstream_remote: None,
            requested_server_name: None,
            route_name: None,
            peer_uri_san: None,
            tls_version: None,
        }
    }
}

impl Record {
    /// A record starting now.
    pub fn starting_now() -> Record {
        Record {
            start: SystemTime::now(),
            ..Record::default()
        }
    }
}

/// Envoy's transport failure reason for a failed connect: `delayed_connect_error:_` and the
/// errno's text with `_` for spaces (`delayed_connect_error:_Connection_refused`).
pub fn connect_failure_reason(e: &crate::net::ConnectError) -> String {
    use crate::net::ConnectError as C;
    let io = match e {
        C::Setup { source, .. } | C::Bind { source, .. } | C::Failed { source, .. } => source,
        C::Timeout { .. } => return "connect_timeout".into(),
        #[allow(unreachable_patterns)]
        _ => return "connect_error".into(),
    };
    let text = match io.raw_os_error() {
        Some(n) => {
            let full = std::io::Error::from_raw_os_error(n).to_string();
            full.split(" (os error").next().unwrap_or(&full).to_string()
        }
        None => io.to_string(),
    };
    format!("delayed_connect_error:_{}", text.replace(' ', "_"))
}

impl AccessLog {
    /// The line for `rec`, or `None` when the filter says no.
    pub fn line(&self, rec: &Record) -> Option<String> {
        if self.filter.as_ref().is_some_and(|f| !f.passes(rec)) {
            return None;
        }
        Some(match &*self.format {
            Format::Text(t) => {
                let mut s = String::with_capacity(256);
                t.render(rec, &mut s);
                s
            }
            Format::Json {
                template,
                omit_empty,
            } => {
                let mut s = template.render(rec, *omit_empty).to_string();
                s.push('\n');
                s
            }
        })
    }
}

/// Log `rec` to every entry of `logs` whose filter passes; never waits (a full queue drops
/// the line and counts it in [`DROPPED_STAT`]).
pub fn log_all(logs: &[AccessLog], rec: &Record, stats: &Stats) {
    for l in logs {
        if let Some(line) = l.line(rec)
            && sink::send(&l.target, line).is_err()
        {
            stats.counter(DROPPED_STAT).inc();
        }
    }
}

#[cfg(test)]
mod tests;
