//! Which HTTP version a cluster's upstream connections speak: the cluster's
//! `envoy.extensions.upstreams.http.v3.HttpProtocolOptions` (or the deprecated
//! `http2_protocol_options` / `protocol_selection` fields).

use envoy_types::pb::envoy::config::cluster::v3 as pb;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http;
use prost::Message;

use super::FieldError;

/// Type of the upstream HTTP protocol options.
pub const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Upstream HTTP protocol of a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UpstreamHttp {
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
}

/// Read the cluster's upstream HTTP protocol.
pub fn from_cluster(c: &pb::Cluster) -> Result<UpstreamHttp, FieldError> {
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
                Some(P::Http2ProtocolOptions(_)) => UpstreamHttp::Http2,
                Some(P::Http3ProtocolOptions(_)) => {
                    return Err(FieldError::new(
                        format!("{at}.explicit_http_config.http3_protocol_options"),
                        "HTTP/3 upstreams are not supported",
                    ));
                }
                Some(P::HttpProtocolOptions(_)) | None => UpstreamHttp::Http1,
            },
            Some(U::UseDownstreamProtocolConfig(d)) => UpstreamHttp::UseDownstream {
                http2: d.http2_protocol_options.is_some(),
            },
            // ALPN needs TLS; on plaintext connections Envoy's auto config speaks HTTP/1.1.
            Some(U::AutoConfig(_)) | None => UpstreamHttp::Http1,
        });
    }
    #[allow(deprecated)]
    let legacy_h2 = c.http2_protocol_options.is_some();
    #[allow(deprecated)]
    let use_downstream = c.protocol_selection == 1;
    Ok(match (legacy_h2, use_downstream) {
        (h2, true) => UpstreamHttp::UseDownstream { http2: h2 },
        (true, false) => UpstreamHttp::Http2,
        (false, false) => UpstreamHttp::Http1,
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
            from_cluster(&pb::Cluster::default()),
            Ok(UpstreamHttp::Http1)
        );
        let explicit = |p| http::HttpProtocolOptions {
            upstream_protocol_options: Some(U::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(p),
            })),
            ..Default::default()
        };
        assert_eq!(
            from_cluster(&cluster(explicit(P::Http2ProtocolOptions(
                Default::default()
            )))),
            Ok(UpstreamHttp::Http2)
        );
        assert_eq!(
            from_cluster(&cluster(explicit(P::HttpProtocolOptions(
                Default::default()
            )))),
            Ok(UpstreamHttp::Http1)
        );
        let e = from_cluster(&cluster(explicit(P::Http3ProtocolOptions(
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
            from_cluster(&cluster(downstream)),
            Ok(UpstreamHttp::UseDownstream { http2: true })
        );
        #[allow(deprecated)]
        let legacy = pb::Cluster {
            http2_protocol_options: Some(core::Http2ProtocolOptions::default()),
            ..Default::default()
        };
        assert_eq!(from_cluster(&legacy), Ok(UpstreamHttp::Http2));
    }
}
