//! JSON to protobuf: a walk over the JSON guided by the message descriptors.
//!
//! prost-reflect's serde support does the leaf work (scalars, enums, well-known types), but
//! it fails a whole message when an `Any` names a type outside the pool. So every message
//! field is walked here: `Any`s are resolved by hand (known types recursively, unknown ones
//! kept opaque, see the crate doc), and the remaining fields of each message are handed to
//! prost-reflect in one go.

use prost::Message;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor,
    Value as PValue,
};
use serde_json::{Map, Value};

use crate::encode::encode_deterministic;
use crate::{CodecError, delegated, has_special_json, pool, type_name};

/// First byte of an opaque `Any` value: tag 0 is illegal in protobuf.
pub(crate) const OPAQUE_MARKER: u8 = 0x00;

/// Decodes a JSON value (snake_case or camelCase, unknown fields ignored) into `M`.
///
/// `M` must be in [`pool`](crate::pool) under its `prost::Name::full_name`; unknown `Any`
/// types inside are kept opaque.
pub fn decode_json<M>(value: &Value) -> Result<M, CodecError>
where
    M: Message + prost::Name + Default,
{
    let full_name = M::full_name();
    let desc = pool()
        .get_message_by_name(&full_name)
        .ok_or_else(|| CodecError::UnknownType {
            type_name: full_name.clone(),
            path: "$".to_owned(),
        })?;
    let mut path = String::from("$");
    let message = message_from_json(&desc, value, &mut path)?;
    M::decode(encode_deterministic(&message).as_slice()).map_err(|err| CodecError::Decode {
        type_name: full_name,
        message: err.to_string(),
    })
}

/// Converts a JSON `Any` (an object with `"@type"`) into a `prost_types::Any`.
///
/// Known types are encoded to protobuf; unknown ones become opaque (see the crate doc).
pub fn any_from_json(value: &Value) -> Result<prost_types::Any, CodecError> {
    let mut path = String::from("$");
    any_at(value, None, &mut path)
}

/// Like [`any_from_json`], for resources that may lack `"@type"` (for example Envoy
/// Gateway's YAML lists): `type_url` is used when the object has none.
pub fn any_from_json_typed(type_url: &str, value: &Value) -> Result<prost_types::Any, CodecError> {
    let mut path = String::from("$");
    any_at(value, Some(type_url), &mut path)
}

/// The `Any` for `value` at `path`; `default_type_url` stands in for a missing `"@type"`.
pub(crate) fn any_at(
    value: &Value,
    default_type_url: Option<&str>,
    path: &mut String,
) -> Result<prost_types::Any, CodecError> {
    let Value::Object(obj) = value else {
        return Err(CodecError::AnyType {
            path: path.clone(),
            message: format!(
                "expected an Any object with \"@type\", found {}",
                kind_of(value)
            ),
        });
    };
    let type_url = match obj.get("@type") {
        Some(Value::String(url)) => url.as_str(),
        Some(other) => {
            return Err(CodecError::AnyType {
                path: path.clone(),
                message: format!("\"@type\" must be a string, found {}", kind_of(other)),
            });
        }
        None => default_type_url.ok_or_else(|| CodecError::AnyType {
            path: path.clone(),
            message: "Any object has no \"@type\"".to_owned(),
        })?,
    };
    if !type_url.contains('/') || type_name(type_url).is_empty() {
        return Err(CodecError::AnyType {
            path: path.clone(),
            message: format!(
                "invalid type URL {type_url:?}: expected type.googleapis.com/<message name>"
            ),
        });
    }
    let Some(desc) = pool().get_message_by_name(type_name(type_url)) else {
        return Ok(opaque_any(type_url, obj));
    };
    let body = if has_special_json(&desc) {
        let len = path.len();
        path.push_str(".value");
        let body = obj.get("value").unwrap_or(&Value::Null);
        let result = message_from_json(&desc, body, path);
        path.truncate(len);
        result?
    } else {
        // "@type" is not a field name, so the walk ignores it: no copy of the object needed.
        message_from_json(&desc, value, path)?
    };
    Ok(prost_types::Any {
        type_url: type_url.to_owned(),
        value: encode_deterministic(&body),
    })
}

/// An opaque `Any`: the marker byte, then the JSON object (given its `"@type"`) as text.
fn opaque_any(type_url: &str, obj: &Map<String, Value>) -> prost_types::Any {
    let mut bytes = vec![OPAQUE_MARKER];
    if obj.contains_key("@type") {
        // Writing a `Map<String, Value>` to a Vec cannot fail (string keys, no I/O).
        let _ = serde_json::to_writer(&mut bytes, obj);
    } else {
        let mut with_type = obj.clone();
        with_type.insert("@type".to_owned(), Value::String(type_url.to_owned()));
        let _ = serde_json::to_writer(&mut bytes, &with_type);
    }
    prost_types::Any {
        type_url: type_url.to_owned(),
        value: bytes,
    }
}

fn deserialize_options() -> DeserializeOptions {
    DeserializeOptions::new().deny_unknown_fields(false)
}

/// The message `desc` from `value`; `path` is where `value` sits (restored on return).
pub(crate) fn message_from_json(
    desc: &MessageDescriptor,
    value: &Value,
    path: &mut String,
) -> Result<DynamicMessage, CodecError> {
    if desc.full_name() == "google.protobuf.Any" {
        // `{}` is the JSON of an empty Any (no type, no bytes), as protobuf prints it.
        if value.is_null() || value.as_object().is_some_and(Map::is_empty) {
            return Ok(DynamicMessage::new(desc.clone()));
        }
        let any = any_at(value, None, path)?;
        let mut message = DynamicMessage::new(desc.clone());
        message.set_field_by_number(1, PValue::String(any.type_url));
        message.set_field_by_number(2, PValue::Bytes(any.value.into()));
        return Ok(message);
    }
    if delegated(desc) {
        return DynamicMessage::deserialize_with_options(
            desc.clone(),
            value,
            &deserialize_options(),
        )
        .map_err(|err| CodecError::json(desc.full_name(), path, err.to_string()));
    }
    let obj = match value {
        Value::Object(obj) => obj,
        Value::Null => return Ok(DynamicMessage::new(desc.clone())),
        other => {
            return Err(CodecError::json(
                desc.full_name(),
                path,
                format!("expected a JSON object, found {}", kind_of(other)),
            ));
        }
    };

    // Fields that may hold an `Any` (any message field) are walked here; the rest go to
    // prost-reflect together.
    let mut residual = Map::new();
    let mut walked: Vec<(FieldDescriptor, PValue)> = Vec::new();
    for (key, field_value) in obj {
        let Some(field) = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
        else {
            continue; // unknown field: ignored, as with deny_unknown_fields(false)
        };
        let len = path.len();
        path.push('.');
        path.push_str(key);
        let result = walk_field(&field, key, field_value, &mut residual, path);
        path.truncate(len);
        if let Some(value) = result? {
            walked.push((field, value));
        }
    }

    let mut message = if residual.is_empty() {
        DynamicMessage::new(desc.clone())
    } else {
        deserialize_residual(desc, residual, path)?
    };
    for (field, value) in walked {
        if let Some(oneof) = field.containing_oneof()
            && let Some(other) = oneof.fields().find(|f| message.has_field(f))
        {
            return Err(CodecError::json(
                desc.full_name(),
                path,
                format!(
                    "fields {:?} and {:?} both set, but they belong to oneof {:?}",
                    other.name(),
                    field.name(),
                    oneof.name()
                ),
            ));
        }
        message.set_field(&field, value);
    }
    Ok(message)
}

/// Walks one field: returns its value if it was converted here, or `None` after adding it
/// to `residual` (or skipping a null).
fn walk_field(
    field: &FieldDescriptor,
    key: &str,
    value: &Value,
    residual: &mut Map<String, Value>,
    path: &mut String,
) -> Result<Option<PValue>, CodecError> {
    let walked_message = |kind: &Kind| match kind {
        Kind::Message(m) => (!delegated(m)).then(|| m.clone()),
        _ => None,
    };
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return Ok(None);
        };
        let value_field = entry.map_entry_value_field();
        let Some(value_desc) = walked_message(&value_field.kind()) else {
            residual.insert(key.to_owned(), value.clone());
            return Ok(None);
        };
        let obj = match value {
            Value::Null => return Ok(None),
            Value::Object(obj) => obj,
            other => {
                return Err(CodecError::json(
                    field.parent_message().full_name(),
                    path,
                    format!("map field expects a JSON object, found {}", kind_of(other)),
                ));
            }
        };
        let key_kind = entry.map_entry_key_field().kind();
        let mut map = std::collections::HashMap::with_capacity(obj.len());
        for (k, v) in obj {
            let map_key = map_key(&key_kind, k).ok_or_else(|| {
                CodecError::json(
                    field.parent_message().full_name(),
                    path,
                    format!("map key {k:?} is not a valid {key_kind:?}"),
                )
            })?;
            let len = path.len();
            push_key(path, k);
            let result = message_from_json(&value_desc, v, path);
            path.truncate(len);
            map.insert(map_key, PValue::Message(result?));
        }
        return Ok(Some(PValue::Map(map)));
    }

    let Some(sub) = walked_message(&field.kind()) else {
        // Scalars, enums, bytes, well-known types: prost-reflect reads them. A single value
        // for a repeated field is read as a one-element list (legacy syntax Envoy accepts).
        let value = if field.is_list() && !value.is_array() && !value.is_null() {
            Value::Array(vec![value.clone()])
        } else {
            value.clone()
        };
        residual.insert(key.to_owned(), value);
        return Ok(None);
    };
    if value.is_null() {
        return Ok(None);
    }
    if field.is_list() {
        let single;
        let items: &[Value] = match value {
            Value::Array(items) => items,
            other => {
                single = [other.clone()];
                &single
            }
        };
        let mut list = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let result = message_from_json(&sub, item, path);
            path.truncate(len);
            list.push(PValue::Message(result?));
        }
        return Ok(Some(PValue::List(list)));
    }
    Ok(Some(PValue::Message(message_from_json(&sub, value, path)?)))
}

/// prost-reflect reads the fields this walk left alone. On failure each field is retried on
/// its own so that the error names it.
fn deserialize_residual(
    desc: &MessageDescriptor,
    residual: Map<String, Value>,
    path: &str,
) -> Result<DynamicMessage, CodecError> {
    let residual = Value::Object(residual);
    match DynamicMessage::deserialize_with_options(desc.clone(), &residual, &deserialize_options())
    {
        Ok(message) => Ok(message),
        Err(err) => {
            if let Value::Object(fields) = &residual {
                for (key, value) in fields {
                    let mut one = Map::new();
                    one.insert(key.clone(), value.clone());
                    if let Err(field_err) = DynamicMessage::deserialize_with_options(
                        desc.clone(),
                        Value::Object(one),
                        &deserialize_options(),
                    ) {
                        return Err(CodecError::json(
                            desc.full_name(),
                            &format!("{path}.{key}"),
                            field_err.to_string(),
                        ));
                    }
                }
            }
            Err(CodecError::json(desc.full_name(), path, err.to_string()))
        }
    }
}

fn map_key(kind: &Kind, key: &str) -> Option<MapKey> {
    Some(match kind {
        Kind::String => MapKey::String(key.to_owned()),
        Kind::Bool => MapKey::Bool(key.parse().ok()?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(key.parse().ok()?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(key.parse().ok()?),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(key.parse().ok()?),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(key.parse().ok()?),
        _ => return None,
    })
}

/// Appends a map key to a JSON path: `.key` when it is a plain word, `["key"]` otherwise.
fn push_key(path: &mut String, key: &str) {
    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        path.push('.');
        path.push_str(key);
    } else {
        path.push_str(&format!("[{key:?}]"));
    }
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
