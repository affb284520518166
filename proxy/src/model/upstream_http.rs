//! How a cluster's upstream connections behave: the HTTP version they speak (the cluster's
//! `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`, or the deprecated
//! `http2_protocol_options` / `protocol_selection` fields), their `common_http_protocol_options`
//! limits and the cluster's `per_connection_buffer_limit_bytes`.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http;
use prost::Message;

use super::tls::ClusterTransport;
use super::{FieldError, duration};

/// Envoy's default `per_connection_buffer_limit_bytes` (1 MiB), for listeners and clusters.
pub const DEFAULT_BUFFER_LIMIT: u32 = 1024 * 1024;

/// A cluster's upstream connection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamHttp {
    /// HTTP version of upstream requests.
    pub protocol: UpstreamProtocol,
    /// `common_http_protocol_options.idle_timeout` (default 1 h; 0 disables): a pooled
    /// connection without requests for this long is closed (`upstream_cx_idle_timeout`).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_connection_duration` (default none): a pooled
    /// connection this old takes no new request (`upstream_cx_max_duration_reached`).
    pub max_connection_duration: Option<Duration>,
    /// `common_http_protocol_options.max_requests_per_connection` (or the cluster's deprecated
    /// field; default none): a connection closes after this many requests
    /// (`upstream_cx_max_requests`).
    pub max_requests_per_connection: Option<u32>,
    /// The cluster's `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub buffer_limit: u32,
    /// With [`UpstreamProtocol::Auto`] and TLS: the cluster's transport as the HTTP pool
    /// dials it, each TLS context without `alpn_protocols` offering `h2,http/1.1` (Envoy's
    /// ALPN fallback for auto_config; tcp_proxy and health checks keep the plain transport).
    pub auto_transport: Option<Arc<ClusterTransport>>,
}

impl Default for UpstreamHttp {
    fn default() -> Self {
        UpstreamHttp {
            protocol: UpstreamProtocol::default(),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            max_requests_per_connection: None,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            auto_transport: None,
        }
    }
}

/// The ALPN list an auto_config cluster offers over TLS when its context sets none.
pub const AUTO_ALPN: [&str; 2] = ["h2", "http/1.1"];

/// `transport` with [`AUTO_ALPN`] in every TLS context that has no `alpn_protocols` (the
/// configured list wins, as in Envoy).
pub fn auto_transport(transport: &ClusterTransport) -> ClusterTransport {
    let fill = |t: &Option<Arc<super::tls::UpstreamTls>>| {
        t.as_ref().map(|t| {
            if !t.common.alpn.is_empty() {
                return t.clone();
            }
            let mut t = (**t).clone();
            t.common.alpn = AUTO_ALPN.iter().map(|s| s.to_string()).collect();
            Arc::new(t)
        })
    };
    let mut out = transport.clone();
    out.default = fill(&transport.default);
    for m in &mut out.matches {
        m.tls = fill(&m.tls);
    }
    out
}

/// Type of the upstream HTTP protocol options.
pub const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Upstream HTTP protocol of a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (Envoy's default).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (`explicit_http_config.http2_protocol_options`).
    Http2,
    /// `use_downstream_protocol_config`: HTTP/2 upstream for HTTP/2 downstream requests when
    /// `http2` (its `http2_protocol_options` is set), HTTP/1.1 otherwise.
    UseDownstream {
        /// HTTP/2 allowed.
        http2: bool,
    },
    /// `auto_config`: over TLS, HTTP/2 when ALPN selects `h2`, else HTTP/1.1; plaintext
    /// connections speak HTTP/1.1.
    Auto,
}

/// Read the cluster's upstream connection settings.
pub fn from_cluster(c: &pb::Cluster) -> Result<UpstreamHttp, FieldError> {
    let d = UpstreamHttp::default();
    let protocol = protocol(c)?;
    let typed = typed_options(c)?;
    #[allow(deprecated)]
    let common = typed
        .as_ref()
        .and_then(|(_, o)| o.common_http_protocol_options.as_ref())
        .or(c.common_http_protocol_options.as_ref());
    let at = |f: &str| match &typed {
        Some((k, _)) => {
            format!("typed_extension_protocol_options[{k:?}].common_http_protocol_options.{f}")
        }
        None => format!("common_http_protocol_options.{f}"),
    };
    let opt = |d: Option<&envoy_types::pb::google::protobuf::Duration>, f: &str| {
        d.map(|d| duration(d).map_err(|e| e.within(at(f))))
            .transpose()
            .map(|d| d.filter(|d| !d.is_zero()))
    };
    let idle_timeout = match common.and_then(|c| c.idle_timeout.as_ref()) {
        Some(t) => opt(Some(t), "idle_timeout")?,
        None => d.idle_timeout,
    };
    #[allow(deprecated)]
    let legacy_max_requests = c.max_requests_per_connection.as_ref().map(|v| v.value);
    Ok(UpstreamHttp {
        protocol,
        idle_timeout,
        auto_transport: None,
        max_connection_duration: opt(
            common.and_then(|c| c.max_connection_duration.as_ref()),
            "max_connection_duration",
        )?,
        max_requests_per_connection: common
            .and_then(|c| c.max_requests_per_connection.as_ref())
            .map(|v| v.value)
            .or(legacy_max_requests)
            .filter(|v| *v > 0),
        buffer_limit: c
            .per_connection_buffer_limit_bytes
            .as_ref()
            .map_or(DEFAULT_BUFFER_LIMIT, |v| v.value),
    })
}

/// The cluster's `HttpProtocolOptions`, decoded, with its key.
fn typed_options(
    c: &pb::Cluster,
) -> Result<Option<(String, http::HttpProtocolOptions)>, FieldError> {
    let typed = c
        .typed_extension_protocol_options
        .iter()
        .find(|(_, a)| a.type_url.rsplit('/').next() == Some(HTTP_PROTOCOL_OPTIONS_TYPE));
    let Some((key, any)) = typed else {
        return Ok(None);
    };
    let o = http::HttpProtocolOptions::decode(any.value.as_slice()).map_err(|e| {
        FieldError::new(
            format!("typed_extension_protocol_options[{key:?}]"),
            format!("invalid {HTTP_PROTOCOL_OPTIONS_TYPE}: {e}"),
        )
    })?;
    Ok(Some((key.clone(), o)))
}

/// Read the cluster's upstream HTTP protocol.
fn protocol(c: &pb::Cluster) -> Result<UpstreamProtocol, FieldError> {
    use http::http_protocol_options::UpstreamProtocolOptions as U;
    use http::http_protocol_options::explicit_http_config::ProtocolConfig as P;
    let typed = c
        .typed_extension_protocol_options
        .iter()
        .find(|(_, a)| a.type_url.rsplit('/').next() == Some(HTTP_PROTOCOL_OPTIONS_TYPE));
    if let Some((key, any)) = typed {
        let at = format!("typed_extension_protocol_options[{key:?}]");
        let o = http::HttpProtocolOptions::decode(any.value.as_slice()).map_err(|e| {
            FieldError::new(
                at.clone(),
                format!("invalid {HTTP_PROTOCOL_OPTIONS_TYPE}: {e}"),
            )
        })?;
        return Ok(match o.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(P::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                Some(P::Http3ProtocolOptions(_)) => {
                    return Err(FieldError::new(
                        format!("{at}.explicit_http_config.http3_protocol_options"),
                        "HTTP/3 upstreams are not supported",
                    ));
                }
                Some(P::HttpProtocolOptions(_)) | None => UpstreamProtocol::Http1,
            },
            Some(U::UseDownstreamProtocolConfig(d)) => UpstreamProtocol::UseDownstream {
                http2: d.http2_protocol_options.is_some(),
            },
            Some(U::AutoConfig(a)) => {
                if a.http3_protocol_options.is_some()
                    || a.alternate_protocols_cache_options.is_some()
                {
                    return Err(FieldError::new(
                        format!("{at}.auto_config.http3_protocol_options"),
                        "HTTP/3 upstreams are not supported",
                    ));
                }
                UpstreamProtocol::Auto
            }
            None => UpstreamProtocol::Http1,
        });
    }
    #[allow(deprecated)]
    let legacy_h2 = c.http2_protocol_options.is_some();
    #[allow(deprecated)]
    let use_downstream = c.protocol_selection == 1;
    Ok(match (legacy_h2, use_downstream) {
        (h2, true) => UpstreamProtocol::UseDownstream { http2: h2 },
        (true, false) => UpstreamProtocol::Http2,
        (false, false) => UpstreamProtocol::Http1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::google::protobuf::Any;

    fn cluster(o: http::HttpProtocolOptions) -> pb::Cluster {
        pb::Cluster {
            name: "c".into(),
            typed_extension_protocol_options: [(
                HTTP_PROTOCOL_OPTIONS_TYPE.to_string(),
                Any {
                    type_url: format!("type.googleapis.com/{HTTP_PROTOCOL_OPTIONS_TYPE}"),
                    value: o.encode_to_vec(),
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn protocol_options_choose_the_upstream_version() {
        use http::http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions as U, UseDownstreamHttpConfig,
            explicit_http_config::ProtocolConfig as P,
        };
        assert_eq!(
            protocol(&pb::Cluster::default()),
            Ok(UpstreamProtocol::Http1)
        );
        let explicit = |p| http::HttpProtocolOptions {
            upstream_protocol_options: Some(U::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(p),
            })),
            ..Default::default()
        };
        assert_eq!(
            protocol(&cluster(explicit(P::Http2ProtocolOptions(
                Default::default()
            )))),
            Ok(UpstreamProtocol::Http2)
        );
        assert_eq!(
            protocol(&cluster(explicit(P::HttpProtocolOptions(
                Default::default()
            )))),
            Ok(UpstreamProtocol::Http1)
        );
        let e = protocol(&cluster(explicit(P::Http3ProtocolOptions(
            Default::default(),
        ))))
        .unwrap_err();
        assert!(
            e.field
                .ends_with("explicit_http_config.http3_protocol_options"),
            "{e:?}"
        );
        let downstream = http::HttpProtocolOptions {
            upstream_protocol_options: Some(U::UseDownstreamProtocolConfig(
                UseDownstreamHttpConfig {
                    http2_protocol_options: Some(core::Http2ProtocolOptions::default()),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        assert_eq!(
            protocol(&cluster(downstream)),
            Ok(UpstreamProtocol::UseDownstream { http2: true })
        );
        let auto = |h3: bool| http::HttpProtocolOptions {
            upstream_protocol_options: Some(U::AutoConfig(
                http::http_protocol_options::AutoHttpConfig {
                    http3_protocol_options: h3.then(Default::default),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        assert_eq!(protocol(&cluster(auto(false))), Ok(UpstreamProtocol::Auto));
        let e = protocol(&cluster(auto(true))).unwrap_err();
        assert!(
            e.field.ends_with("auto_config.http3_protocol_options"),
            "{e:?}"
        );
        #[allow(deprecated)]
        let legacy = pb::Cluster {
            http2_protocol_options: Some(core::Http2ProtocolOptions::default()),
            ..Default::default()
        };
        assert_eq!(protocol(&legacy), Ok(UpstreamProtocol::Http2));
    }

    #[test]
    fn connection_limits_have_envoys_defaults_and_are_read() {
        let d = from_cluster(&pb::Cluster::default()).unwrap();
        assert_eq!(d, UpstreamHttp::default());
        assert_eq!(d.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(d.buffer_limit, DEFAULT_BUFFER_LIMIT);
        let mut c = cluster(http::HttpProtocolOptions {
            common_http_protocol_options: Some(core::HttpProtocolOptions {
                idle_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                max_connection_duration: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                max_requests_per_connection: Some(envoy_types::pb::google::protobuf::UInt32Value {
                    value: 3,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        c.per_connection_buffer_limit_bytes =
            Some(envoy_types::pb::google::protobuf::UInt32Value { value: 4096 });
        let u = from_cluster(&c).unwrap();
        assert_eq!(u.idle_timeout, None, "0s disables");
        assert_eq!(u.max_connection_duration, Some(Duration::from_secs(2)));
        assert_eq!(u.max_requests_per_connection, Some(3));
        assert_eq!(u.buffer_limit, 4096);
    }
}
