//! `access_log` entries of listeners, tcp_proxy and the HTTP connection manager
//! (`envoy.config.accesslog.v3.AccessLog`) -> [`crate::accesslog::AccessLog`]. Each logger,
//! format field and filter is honoured or refused by name, never ignored.

use std::sync::Arc;

use envoy_types::pb::envoy::config::accesslog::v3 as pb;
use envoy_types::pb::envoy::config::core::v3 as core_v3;
use envoy_types::pb::envoy::extensions::access_loggers::file::v3 as file;
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3 as stream;
use envoy_types::pb::google::protobuf::{Any, Struct, Value};
use prost::Message;

use super::FieldError;
use crate::accesslog::filter::{Cmp, ENVOY_FLAG_NAMES};
use crate::accesslog::{AccessLog, Filter, Format, JsonTemplate, Target, Template, format};

/// Config type of the file access logger.
pub const FILE_TYPE: &str = "envoy.extensions.access_loggers.file.v3.FileAccessLog";
/// Config type of the stdout access logger.
pub const STDOUT_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
/// Config type of the stderr access logger.
pub const STDERR_TYPE: &str = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Convert a repeated `access_log` field found at `field`.
pub fn access_logs(logs: &[pb::AccessLog], field: &str) -> Result<Vec<AccessLog>, FieldError> {
    logs.iter()
        .enumerate()
        .map(|(i, l)| access_log(l).map_err(|e| e.within(format!("{field}[{i}]"))))
        .collect()
}

fn access_log(l: &pb::AccessLog) -> Result<AccessLog, FieldError> {
    let Some(pb::access_log::ConfigType::TypedConfig(any)) = &l.config_type else {
        return Err(FieldError::new(
            "typed_config",
            "an access log needs typed_config",
        ));
    };
    let (target, format) = logger(&l.name, any)?;
    let filter = match &l.filter {
        Some(f) => Some(filter(f).map_err(|e| e.within("filter"))?),
        None => None,
    };
    Ok(AccessLog {
        name: l.name.clone(),
        target,
        format: Arc::new(format),
        filter,
    })
}

fn logger(name: &str, any: &Any) -> Result<(Target, Format), FieldError> {
    let ty = super::compat::type_name(any);
    let bad = |e: prost::DecodeError| FieldError::new("typed_config", format!("invalid {ty}: {e}"));
    match ty.as_str() {
        FILE_TYPE => {
            let f = file::FileAccessLog::decode(any.value.as_slice()).map_err(bad)?;
            if f.path.is_empty() {
                return Err(FieldError::new("typed_config.path", "must not be empty"));
            }
            use file::file_access_log::AccessLogFormat as F;
            #[allow(deprecated)]
            let format = match &f.access_log_format {
                None => text(format::ENVOY_DEFAULT),
                Some(F::Format(s)) if s.is_empty() => text(format::ENVOY_DEFAULT),
                Some(F::Format(s)) => text(s),
                Some(F::JsonFormat(st)) | Some(F::TypedJsonFormat(st)) => json(st, false),
                Some(F::LogFormat(sfs)) => substitution(sfs),
            }
            .map_err(|e| e.within("typed_config"))?;
            Ok((Target::from_path(&f.path), format))
        }
        STDOUT_TYPE => {
            let s = stream::StdoutAccessLog::decode(any.value.as_slice()).map_err(bad)?;
            use stream::stdout_access_log::AccessLogFormat as F;
            let format = match &s.access_log_format {
                None => text(format::ENVOY_DEFAULT),
                Some(F::LogFormat(sfs)) => substitution(sfs),
            }
            .map_err(|e| e.within("typed_config"))?;
            Ok((Target::Stdout, format))
        }
        STDERR_TYPE => {
            let s = stream::StderrAccessLog::decode(any.value.as_slice()).map_err(bad)?;
            use stream::stderr_access_log::AccessLogFormat as F;
            let format = match &s.access_log_format {
                None => text(format::ENVOY_DEFAULT),
                Some(F::LogFormat(sfs)) => substitution(sfs),
            }
            .map_err(|e| e.within("typed_config"))?;
            Ok((Target::Stderr, format))
        }
        other => Err(FieldError::new(
            "typed_config",
            format!(
                "access logger {name:?} ({other}) is not supported by skiff: only envoy.access_loggers.file, stdout and stderr are"
            ),
        )),
    }
}

fn text(s: &str) -> Result<Format, FieldError> {
    Template::parse(s)
        .map(Format::Text)
        .map_err(|e| FieldError::new("log_format", e.to_string()))
}

fn json(st: &Struct, omit_empty: bool) -> Result<Format, FieldError> {
    let v = struct_json(st);
    let template = JsonTemplate::parse(&v, "")
        .map_err(|e| FieldError::new("log_format.json_format", e.to_string()))?;
    Ok(Format::Json {
        template,
        omit_empty,
    })
}

fn substitution(s: &core_v3::SubstitutionFormatString) -> Result<Format, FieldError> {
    if !s.formatters.is_empty() {
        return Err(FieldError::new(
            "log_format.formatters",
            "formatter extensions are not supported by skiff",
        ));
    }
    use core_v3::substitution_format_string::Format as F;
    #[allow(deprecated)]
    let f = match &s.format {
        Some(F::TextFormat(t)) => text(t),
        Some(F::TextFormatSource(d)) => {
            use core_v3::data_source::Specifier as D;
            let body = match &d.specifier {
                Some(D::InlineString(s)) => s.clone(),
                Some(D::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(D::Filename(p)) => std::fs::read_to_string(p).map_err(|e| {
                    FieldError::new(
                        "log_format.text_format_source.filename",
                        format!("{p}: {e}"),
                    )
                })?,
                _ => {
                    return Err(FieldError::new(
                        "log_format.text_format_source",
                        "needs inline_string, inline_bytes or filename",
                    ));
                }
            };
            text(&body)
        }
        Some(F::JsonFormat(st)) => json(st, s.omit_empty_values),
        None => text(format::ENVOY_DEFAULT),
    }?;
    // `omit_empty_values` for text: Envoy drops `-`; skiff renders it, so refuse.
    if s.omit_empty_values && matches!(f, Format::Text(_)) {
        return Err(FieldError::new(
            "log_format.omit_empty_values",
            "omit_empty_values with a text format is not supported by skiff",
        ));
    }
    Ok(f)
}

fn struct_json(s: &Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &Value) -> serde_json::Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        // Envoy prints whole numbers without a fraction.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => (*n as i64).into(),
        Some(Kind::NumberValue(n)) => serde_json::json!(n),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => l.values.iter().map(value_json).collect(),
    }
}

fn comparison(c: Option<&pb::ComparisonFilter>) -> Result<(Cmp, u64), FieldError> {
    let c = c.ok_or_else(|| FieldError::new("comparison", "is required"))?;
    let op = match pb::comparison_filter::Op::try_from(c.op) {
        Ok(pb::comparison_filter::Op::Eq) => Cmp::Eq,
        Ok(pb::comparison_filter::Op::Ge) => Cmp::Ge,
        Ok(pb::comparison_filter::Op::Le) => Cmp::Le,
        Ok(pb::comparison_filter::Op::Ne) => Cmp::Ne,
        Err(_) => return Err(FieldError::new("comparison.op", "unknown operator")),
    };
    // skiff has no runtime: the runtime key's default applies, as in Envoy without an
    // override.
    let v = c
        .value
        .as_ref()
        .ok_or_else(|| FieldError::new("comparison.value", "is required"))?;
    Ok((op, u64::from(v.default_value)))
}

fn filter(f: &pb::AccessLogFilter) -> Result<Filter, FieldError> {
    use pb::access_log_filter::FilterSpecifier as S;
    let refused = |name: &str, why: &str| {
        Err(FieldError::new(
            name,
            format!("access log filter {name} is not supported by skiff: {why}"),
        ))
    };
    match &f.filter_specifier {
        Some(S::StatusCodeFilter(s)) => {
            let (op, v) =
                comparison(s.comparison.as_ref()).map_err(|e| e.within("status_code_filter"))?;
            Ok(Filter::StatusCode(op, v))
        }
        Some(S::DurationFilter(d)) => {
            let (op, v) =
                comparison(d.comparison.as_ref()).map_err(|e| e.within("duration_filter"))?;
            Ok(Filter::Duration(op, v))
        }
        Some(S::NotHealthCheckFilter(_)) => Ok(Filter::NotHealthCheck),
        Some(S::ResponseFlagFilter(r)) => {
            if let Some((i, bad)) = r
                .flags
                .iter()
                .enumerate()
                .find(|(_, f)| !ENVOY_FLAG_NAMES.contains(&f.as_str()))
            {
                return Err(FieldError::new(
                    format!("response_flag_filter.flags[{i}]"),
                    format!("unknown response flag {bad:?}"),
                ));
            }
            Ok(Filter::ResponseFlags(r.flags.clone()))
        }
        Some(S::AndFilter(a)) => Ok(Filter::And(filters(&a.filters, "and_filter")?)),
        Some(S::OrFilter(o)) => Ok(Filter::Or(filters(&o.filters, "or_filter")?)),
        Some(S::RuntimeFilter(_)) => {
            refused("runtime_filter", "skiff has no runtime to sample against")
        }
        Some(S::TraceableFilter(_)) => refused("traceable_filter", "skiff does not trace"),
        Some(S::HeaderFilter(_)) => refused("header_filter", "not evaluated"),
        Some(S::GrpcStatusFilter(_)) => refused("grpc_status_filter", "not evaluated"),
        Some(S::ExtensionFilter(e)) => refused(
            "extension_filter",
            &format!("extension {:?} (CEL and others) is not run", e.name),
        ),
        Some(S::MetadataFilter(_)) => {
            refused("metadata_filter", "dynamic metadata is not modelled")
        }
        Some(S::LogTypeFilter(_)) => {
            refused("log_type_filter", "only end-of-stream logs are written")
        }
        None => Err(FieldError::new("filter_specifier", "is required")),
    }
}

fn filters(fs: &[pb::AccessLogFilter], what: &str) -> Result<Vec<Filter>, FieldError> {
    if fs.len() < 2 {
        return Err(FieldError::new(
            format!("{what}.filters"),
            "needs at least two filters",
        ));
    }
    fs.iter()
        .enumerate()
        .map(|(i, f)| filter(f).map_err(|e| e.within(format!("{what}.filters[{i}]"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_of<M: Message + prost::Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    fn file_log(format: Option<file::file_access_log::AccessLogFormat>) -> pb::AccessLog {
        pb::AccessLog {
            name: "envoy.access_loggers.file".into(),
            filter: None,
            config_type: Some(pb::access_log::ConfigType::TypedConfig(any_of(
                &file::FileAccessLog {
                    path: "/dev/stdout".into(),
                    access_log_format: format,
                },
            ))),
        }
    }

    #[test]
    fn loggers_formats_and_filters_are_honoured_or_refused_by_name() {
        use file::file_access_log::AccessLogFormat as F;
        let ok = access_logs(&[file_log(None)], "access_log").unwrap();
        assert_eq!(ok[0].target, Target::Stdout);
        assert_eq!(
            *ok[0].format,
            Format::Text(Template::parse(format::ENVOY_DEFAULT).unwrap())
        );
        #[allow(deprecated)]
        let bad = access_logs(
            &[file_log(Some(F::Format("%NOPE_X%".into())))],
            "access_log",
        )
        .unwrap_err();
        let bad = format!("{}: {}", bad.field, bad.reason);
        assert!(
            bad.contains("access_log[0]") && bad.contains("%NOPE_X%"),
            "{bad}"
        );

        let mut l = file_log(None);
        l.filter = Some(pb::AccessLogFilter {
            filter_specifier: Some(pb::access_log_filter::FilterSpecifier::RuntimeFilter(
                pb::RuntimeFilter::default(),
            )),
        });
        let e = access_logs(&[l.clone()], "access_log").unwrap_err();
        let e = format!("{}: {}", e.field, e.reason);
        assert!(e.contains("runtime_filter"), "{e}");
        l.filter = Some(pb::AccessLogFilter {
            filter_specifier: Some(pb::access_log_filter::FilterSpecifier::ResponseFlagFilter(
                pb::ResponseFlagFilter {
                    flags: vec!["NR".into(), "UF".into()],
                },
            )),
        });
        let got = access_logs(&[l], "access_log").unwrap();
        assert_eq!(
            got[0].filter,
            Some(Filter::ResponseFlags(vec!["NR".into(), "UF".into()]))
        );

        let other = pb::AccessLog {
            name: "envoy.access_loggers.open_telemetry".into(),
            filter: None,
            config_type: Some(pb::access_log::ConfigType::TypedConfig(Any {
                type_url: "type.googleapis.com/envoy.extensions.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig".into(),
                value: vec![],
            })),
        };
        let e = access_logs(&[other], "access_log").unwrap_err();
        let e = format!("{}: {}", e.field, e.reason);
        assert!(
            e.contains("open_telemetry") && e.contains("not supported"),
            "{e}"
        );
    }
}
