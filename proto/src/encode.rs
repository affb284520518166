//! Protobuf to Envoy's admin JSON, and deterministic protobuf encoding.

use base64::Engine as _;
use prost::Message;
use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_reflect::{
    DynamicMessage, Kind, MapKey, ReflectMessage, SerializeOptions, Value as PValue,
};
use serde_json::{Map, Value};

use crate::decode::OPAQUE_MARKER;
use crate::{has_special_json, pool, reflect, type_name};

/// Shows a message in Envoy's admin JSON dialect: proto field names (snake_case), enums as
/// names, 64-bit integers as strings, default values omitted, `Any`s expanded with `"@type"`
/// (opaque ones exactly as they were read). Object keys come out sorted.
///
/// A type missing from the pool (impossible for envoy-types messages) gives `null`.
pub fn to_json<M: Message + prost::Name>(m: &M) -> Value {
    let Some(desc) = pool().get_message_by_name(&M::full_name()) else {
        return Value::Null;
    };
    match DynamicMessage::decode(desc, m.encode_to_vec().as_slice()) {
        Ok(message) => message_to_json(&message),
        Err(_) => Value::Null,
    }
}

/// Shows an `Any` as JSON with `"@type"`: known types expanded, opaque ones as originally
/// read, other unknown types (or undecodable bytes) as `{"@type": url, "value": "<base64>"}`.
pub fn any_to_json(any: &prost_types::Any) -> Value {
    any_parts_to_json(&any.type_url, &any.value)
}

/// The original JSON object of an opaque `Any` (see the crate doc), or `None` when `any`
/// carries real protobuf bytes.
pub fn opaque_json(any: &prost_types::Any) -> Option<Value> {
    opaque_bytes_json(&any.value)
}

fn opaque_bytes_json(bytes: &[u8]) -> Option<Value> {
    match bytes.split_first() {
        Some((&OPAQUE_MARKER, json)) => serde_json::from_slice(json).ok(),
        _ => None,
    }
}

fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true)
        .use_enum_numbers(false)
        .stringify_64_bit_integers(true)
}

fn any_parts_to_json(type_url: &str, bytes: &[u8]) -> Value {
    if let Some(json) = opaque_bytes_json(bytes) {
        return json;
    }
    if type_url.is_empty() && bytes.is_empty() {
        return Value::Object(Map::new()); // an empty Any, as protobuf prints it
    }
    let raw = || {
        let mut obj = Map::new();
        obj.insert("@type".to_owned(), Value::String(type_url.to_owned()));
        obj.insert(
            "value".to_owned(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        );
        Value::Object(obj)
    };
    let Some(desc) = pool().get_message_by_name(type_name(type_url)) else {
        return raw();
    };
    let Ok(message) = DynamicMessage::decode(desc.clone(), bytes) else {
        return raw();
    };
    let body = message_to_json(&message);
    let mut obj = match body {
        Value::Object(obj) if !has_special_json(&desc) => obj,
        other => {
            let mut obj = Map::new();
            obj.insert("value".to_owned(), other);
            obj
        }
    };
    obj.insert("@type".to_owned(), Value::String(type_url.to_owned()));
    Value::Object(obj)
}

/// JSON for a dynamic message: prost-reflect serializes everything that cannot hold an `Any`;
/// fields that can are converted here.
pub(crate) fn message_to_json(message: &DynamicMessage) -> Value {
    let desc = message.descriptor();
    if desc.full_name() == "google.protobuf.Any" {
        let type_url = message
            .get_field_by_number(1)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let bytes = message
            .get_field_by_number(2)
            .and_then(|v| v.as_bytes().cloned())
            .unwrap_or_default();
        return any_parts_to_json(&type_url, &bytes);
    }
    let reflect = reflect();
    if !reflect.contains_any.contains(desc.full_name()) {
        return serialize(message);
    }
    let mut rest = message.clone();
    let mut walked = Vec::new();
    for (field, _) in message.fields() {
        let holds_any = match field.kind() {
            Kind::Message(m) => reflect.contains_any.contains(m.full_name()),
            _ => false,
        };
        if holds_any && let Some(value) = rest.take_field(&field) {
            walked.push((field, value));
        }
    }
    let mut obj = match serialize(&rest) {
        Value::Object(obj) => obj,
        _ => Map::new(),
    };
    for (field, value) in walked {
        let json = match value {
            PValue::Message(m) => message_to_json(&m),
            PValue::List(items) if items.is_empty() => continue,
            PValue::List(items) => Value::Array(items.iter().map(value_to_json).collect()),
            PValue::Map(map) if map.is_empty() => continue,
            PValue::Map(map) => {
                let mut entries: Vec<_> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (map_key_string(&k), value_to_json(&v)))
                        .collect(),
                )
            }
            other => value_to_json(&other),
        };
        obj.insert(field.name().to_owned(), json);
    }
    Value::Object(obj)
}

fn value_to_json(value: &PValue) -> Value {
    match value {
        PValue::Message(m) => message_to_json(m),
        // Only fields of message kind are walked, so nothing else reaches here.
        _ => Value::Null,
    }
}

fn serialize(message: &DynamicMessage) -> Value {
    message
        .serialize_with_options(serde_json::value::Serializer, &serialize_options())
        .unwrap_or(Value::Null)
}

fn map_key_string(key: &MapKey) -> String {
    match key {
        MapKey::String(s) => s.clone(),
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
    }
}

/// Encodes a message with map entries in key order, so equal messages give equal bytes (the
/// bytes inside an `Any` are compared as bytes). Fields come in number order and unknown
/// fields last.
pub(crate) fn encode_deterministic(message: &DynamicMessage) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_into(message, &mut buf);
    buf
}

fn encode_into(message: &DynamicMessage, buf: &mut Vec<u8>) {
    let desc = message.descriptor();
    if !reflect().contains_map.contains(desc.full_name()) {
        message.encode_raw(buf);
        return;
    }
    for (field, value) in message.fields() {
        let number = field.number();
        match value {
            PValue::Map(map) => {
                let Kind::Message(entry_desc) = field.kind() else {
                    continue;
                };
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let key_field = entry_desc.map_entry_key_field();
                let value_field = entry_desc.map_entry_value_field();
                for (key, value) in entries {
                    let mut entry = DynamicMessage::new(entry_desc.clone());
                    entry.set_field(&key_field, key.clone().into());
                    let mut entry_bytes = Vec::new();
                    if let PValue::Message(inner) = value {
                        entry.encode_raw(&mut entry_bytes);
                        write_nested(value_field.number(), inner, &mut entry_bytes);
                    } else {
                        entry.set_field(&value_field, value.clone());
                        entry.encode_raw(&mut entry_bytes);
                    }
                    encode_key(number, WireType::LengthDelimited, buf);
                    encode_varint(entry_bytes.len() as u64, buf);
                    buf.put_slice(&entry_bytes);
                }
            }
            PValue::Message(inner) => write_nested(number, inner, buf),
            PValue::List(items) if matches!(field.kind(), Kind::Message(_)) => {
                for item in items {
                    if let PValue::Message(inner) = item {
                        write_nested(number, inner, buf);
                    }
                }
            }
            other => {
                let mut single = DynamicMessage::new(desc.clone());
                single.set_field(&field, other.clone());
                single.encode_raw(buf);
            }
        }
    }
    for unknown in message.unknown_fields() {
        unknown.encode(buf);
    }
}

fn write_nested(number: u32, inner: &DynamicMessage, buf: &mut Vec<u8>) {
    let mut bytes = Vec::new();
    encode_into(inner, &mut bytes);
    encode_key(number, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(&bytes);
}
