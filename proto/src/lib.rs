//! Envoy v3 protobuf descriptors and JSON/YAML <-> proto conversion for skiff.
//!
//! skiff reads Envoy config (bootstraps, xDS resources, admin config dumps) written as JSON or
//! YAML, as Envoy does, decodes it into the `envoy-types` structs, and shows protos back in
//! Envoy's admin JSON dialect (proto field names, enum names, defaults omitted, `Any` expanded
//! with `"@type"`).
//!
//! # Layout
//!
//! - `build.rs` compiles the `.proto` files shipped in envoy-types (each root file on its own,
//!   merged by file name) plus `third_party/` into one `FileDescriptorSet`, embedded here.
//! - `third_party/`: skiff's own `.proto` files for public types that envoy-types lacks
//!   (`udpa.type.v1.TypedStruct`, `xds.type.v3.TypedStruct`, `xds.type.matcher.v3.IPMatcher`).
//! - [`error`]: [`CodecError`], naming the type and JSON path that failed.
//! - `text`: [`parse_text`], JSON or YAML text to `serde_json::Value`.
//! - `decode`: JSON to protobuf ([`decode_json`], [`any_from_json`], [`any_from_json_typed`]),
//!   a schema-guided walk that keeps unknown `Any` types opaque.
//! - `encode`: protobuf to admin JSON ([`to_json`], [`any_to_json`], [`opaque_json`]) and the
//!   deterministic encoder that makes the bytes inside an `Any` reproducible.
//! - `files`: discovery files ([`parse_discovery_file`]) and `/config_dump` output
//!   ([`parse_config_dump`]).
//!
//! # Opaque `Any`s
//!
//! An `Any` whose `@type` is not in the pool (Istio-private filters such as
//! `stats.PluginConfig`, v2 types such as `envoy.api.v2.Cluster`) does not fail the parse.
//! It becomes `Any { type_url, value }` where `value` is the byte `0x00` followed by the
//! original JSON object (with its `"@type"`) as UTF-8 text. `0x00` is an illegal protobuf tag,
//! so these bytes can never be mistaken for a real encoding and any attempt to decode them
//! fails cleanly. [`to_json`] and [`any_to_json`] give the original object back unchanged;
//! [`opaque_json`] reads it. An `Any` of an unknown type that carries real protobuf bytes
//! (from gRPC) is shown as `{"@type": url, "value": "<base64>"}`.
//!
//! # Leniencies (all shared with Envoy's JSON parser)
//!
//! Unknown JSON fields are ignored (old dumps carry `hidden_envoy_deprecated_*` fields), both
//! `snake_case` and `lowerCamelCase` names are accepted, and a single value where a list is
//! expected is read as a one-element list (protobuf's legacy JSON syntax, which Envoy's own
//! examples rely on).
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

mod decode;
mod encode;
pub mod error;
mod files;
mod text;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};

pub use decode::{any_from_json, any_from_json_typed, decode_json};
pub use encode::{any_to_json, opaque_json, to_json};
pub use error::CodecError;
pub use files::{
    ConfigDumpResources, DiscoveryFile, DumpedResource, parse_config_dump, parse_discovery_file,
};
pub use text::parse_text;

/// The encoded `FileDescriptorSet` built by `build.rs` (Envoy v3, xds, udpa, skiff's own).
pub static FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/skiff_descriptors.bin"));

/// Type URL prefix used when skiff writes a type URL itself.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// Listener type URL (LDS).
pub const LISTENER_TYPE_URL: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Cluster type URL (CDS).
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// RouteConfiguration type URL (RDS).
pub const ROUTE_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// ClusterLoadAssignment type URL (EDS).
pub const ENDPOINT_TYPE_URL: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The pool plus facts about it computed once.
struct Reflect {
    pool: DescriptorPool,
    /// Messages that contain a `google.protobuf.Any` somewhere below them (or are one).
    contains_any: HashSet<String>,
    /// Messages that contain a map field somewhere below them.
    contains_map: HashSet<String>,
}

/// The cached pool; `None` until first use and again after [`release_pool`].
static REFLECT: Mutex<Option<Arc<Reflect>>> = Mutex::new(None);

fn reflect() -> Arc<Reflect> {
    let mut cached = REFLECT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = cached.as_ref() {
        return r.clone();
    }
    let built = Arc::new(build_reflect());
    *cached = Some(built.clone());
    built
}

fn build_reflect() -> Reflect {
    {
        // Invariant: build.rs wrote a set that prost-reflect accepts (checked by every test).
        #[allow(clippy::expect_used)]
        let pool = DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("embedded descriptor set built by build.rs is valid");
        let contains_any = closure(&pool, |m| {
            m.full_name() == "google.protobuf.Any"
                || m.fields()
                    .any(|f| is_message_named(&f.kind(), "google.protobuf.Any"))
        });
        let contains_map = closure(&pool, |m| m.fields().any(|f| f.is_map()));
        Reflect {
            pool,
            contains_any,
            contains_map,
        }
    }
}

/// Drop the cached descriptor pool (about 16 MB): a long-running process calls this after
/// parsing its configuration, and the pool is rebuilt on next use (about 35 ms in release).
/// Values already decoded are unaffected.
pub fn release_pool() {
    *REFLECT.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

fn is_message_named(kind: &Kind, name: &str) -> bool {
    matches!(kind, Kind::Message(m) if m.full_name() == name)
}

/// All messages for which `direct` holds, plus every message with a field leading to one.
fn closure(pool: &DescriptorPool, direct: impl Fn(&MessageDescriptor) -> bool) -> HashSet<String> {
    let mut set: HashSet<String> = pool
        .all_messages()
        .filter(|m| direct(m))
        .map(|m| m.full_name().to_owned())
        .collect();
    loop {
        let added: Vec<String> = pool
            .all_messages()
            .filter(|m| !set.contains(m.full_name()))
            .filter(|m| {
                m.fields().any(
                    |f| matches!(f.kind(), Kind::Message(sub) if set.contains(sub.full_name())),
                )
            })
            .map(|m| m.full_name().to_owned())
            .collect();
        if added.is_empty() {
            return set;
        }
        set.extend(added);
    }
}

/// The descriptor pool with every Envoy v3 message skiff knows, built on first use and kept
/// until [`release_pool`] (a cheap handle: clones share one pool).
pub fn pool() -> DescriptorPool {
    reflect().pool.clone()
}

/// Whether `type_url` (`type.googleapis.com/<full name>`, or a bare full name) names a
/// message in [`pool`].
pub fn is_known_type(type_url: &str) -> bool {
    pool().get_message_by_name(type_name(type_url)).is_some()
}

/// The message name in a type URL: everything after the last `/`.
pub fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Messages whose JSON form is not a plain object of their fields (the well-known types
/// other than `Empty`); inside an `Any` their JSON goes under a `"value"` key.
fn has_special_json(desc: &MessageDescriptor) -> bool {
    matches!(
        desc.full_name(),
        "google.protobuf.Any"
            | "google.protobuf.Duration"
            | "google.protobuf.Timestamp"
            | "google.protobuf.FieldMask"
            | "google.protobuf.Struct"
            | "google.protobuf.Value"
            | "google.protobuf.ListValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

/// Messages handed whole to prost-reflect's serde: `google.protobuf.*` except `Any` (they
/// never contain an `Any` that skiff must treat specially).
fn delegated(desc: &MessageDescriptor) -> bool {
    desc.package_name() == "google.protobuf" && desc.full_name() != "google.protobuf.Any"
}

#[cfg(test)]
mod tests;
