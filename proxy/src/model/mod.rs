//! skiff's own validated configuration types, converted from Envoy v3 protos by `TryFrom`.
//!
//! This is the only module that reads envoy-types protos. Everything downstream (snapshot,
//! data path, BPF projection, admin) works on these types. A conversion error names the
//! resource and the field path, e.g. `cluster "x": load_assignment.endpoints[2].lb_endpoints[0]: port 0`.

pub mod access_log;
pub mod cluster;
pub mod compat;
pub mod endpoint;
pub mod fault;
pub mod istio;
pub mod limits;
pub mod listener;
pub mod matchers;
pub mod route;
#[cfg(test)]
pub(crate) mod test_util;
pub mod tls;
pub mod upstream_http;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;

pub use cluster::{Cluster, ClusterKind, LbPolicy};
pub use endpoint::{HealthStatus, LbEndpoint, LoadAssignment, LocalityEndpoints};
pub use listener::{FilterChain, FilterChainMatch, Listener, NetworkAction};
pub use route::ClusterSpecifier;
pub use route::{RouteConfig, VirtualHost};

/// A resource that failed validation: which one, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} \"{name}\": {field}: {reason}")]
pub struct ModelError {
    /// Resource kind: `listener`, `cluster`, `cluster_load_assignment`, ...
    pub kind: &'static str,
    /// Resource name as given (may be empty when the name itself is missing).
    pub name: String,
    /// Field path inside the resource.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A field-level problem before it is attached to a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Field path, innermost last.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefix the field path with an outer field (`outer.inner`).
    pub fn within(mut self, outer: impl fmt::Display) -> Self {
        self.field = if self.field.is_empty() {
            outer.to_string()
        } else if self.field.starts_with('[') {
            format!("{outer}{}", self.field)
        } else {
            format!("{outer}.{}", self.field)
        };
        self
    }

    /// Attach the resource this field belongs to.
    pub fn on(self, kind: &'static str, name: &str) -> ModelError {
        ModelError {
            kind,
            name: name.to_string(),
            field: self.field,
            reason: self.reason,
        }
    }
}

/// An IP prefix (`10.96.0.0/12`, `fd00::/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// Network address (host bits may be set; they are ignored when matching).
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

impl Cidr {
    /// Whether `ip` lies inside this prefix. A v4 prefix never matches a v6 address, except that
    /// a v4-mapped v6 address (`::ffff:a.b.c.d`) is compared as v4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.len.min(32))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.len.min(128))
            }
            _ => false,
        }
    }

    /// Parse Envoy's `CidrRange`.
    pub fn from_proto(c: &core::CidrRange) -> Result<Cidr, FieldError> {
        let addr: IpAddr = c.address_prefix.parse().map_err(|_| {
            FieldError::new(
                "address_prefix",
                format!("{:?} is not an IP address", c.address_prefix),
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = c.prefix_len.as_ref().map(|v| v.value).unwrap_or(max);
        if len > max {
            return Err(FieldError::new(
                "prefix_len",
                format!("{len} is longer than {max} bits"),
            ));
        }
        Ok(Cidr {
            addr,
            len: len as u8,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a `--exclude-cidrs` entry is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an address.
    #[error("{text:?}: {ip:?} is not an IP address")]
    Address {
        /// The whole text.
        text: String,
        /// The address part.
        ip: String,
    },
    /// The prefix length is not a number of bits the family has.
    #[error("{text:?}: prefix length must be 0..={max}")]
    PrefixLen {
        /// The whole text.
        text: String,
        /// 32 or 128.
        max: u8,
    },
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| CidrError::Address {
            text: s.to_owned(),
            ip: ip.to_owned(),
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len =
            match len {
                Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                    CidrError::PrefixLen {
                        text: s.to_owned(),
                        max,
                    }
                })?,
                None => max,
            };
        Ok(Cidr { addr, len })
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// v4-mapped v6 addresses (`::ffff:a.b.c.d`) become plain v4; everything else is unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// Same as [`canonical_ip`] for a socket address.
pub fn canonical_addr(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(a.ip()), a.port())
}

/// Envoy `Address` holding a `socket_address` with an IP literal and a numeric port.
pub fn socket_addr(a: Option<&core::Address>) -> Result<SocketAddr, FieldError> {
    use core::address::Address as Kind;
    use core::socket_address::PortSpecifier;
    let a = a.ok_or_else(|| FieldError::new("", "missing address"))?;
    let sa = match &a.address {
        Some(Kind::SocketAddress(sa)) => sa,
        Some(Kind::Pipe(_)) => {
            return Err(FieldError::new(
                "pipe",
                "unix socket addresses are not supported",
            ));
        }
        Some(Kind::EnvoyInternalAddress(_)) => {
            return Err(FieldError::new(
                "envoy_internal_address",
                "internal addresses are not supported",
            ));
        }
        None => return Err(FieldError::new("", "no address kind set")),
    };
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
            FieldError::new("socket_address.port_value", format!("{p} is not a port"))
        })?,
        Some(PortSpecifier::NamedPort(ref n)) => {
            return Err(FieldError::new(
                "socket_address.named_port",
                format!("named port {n:?} is not supported"),
            ));
        }
        None => 0,
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        FieldError::new(
            "socket_address.address",
            format!("{:?} is not an IP address", sa.address),
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// Envoy `Address` whose `socket_address.address` may be a host name (DNS clusters).
pub fn host_port(a: Option<&core::Address>) -> Result<(String, u16), FieldError> {
    use core::address::Address as Kind;
    use core::socket_address::PortSpecifier;
    match a.and_then(|a| a.address.as_ref()) {
        Some(Kind::SocketAddress(sa)) => {
            let port = match sa.port_specifier {
                Some(PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
                    FieldError::new("socket_address.port_value", format!("{p} is not a port"))
                })?,
                _ => {
                    return Err(FieldError::new(
                        "socket_address.port_value",
                        "a numeric port is required",
                    ));
                }
            };
            Ok((sa.address.clone(), port))
        }
        _ => Err(FieldError::new("socket_address", "missing socket_address")),
    }
}

/// protobuf `Duration` to std, rejecting negative values.
pub fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Result<Duration, FieldError> {
    if d.seconds < 0 || d.nanos < 0 {
        return Err(FieldError::new("", "negative duration"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains_respects_prefix_bits() {
        let c: Cidr = "10.96.0.0/12".parse().unwrap();
        assert!(c.contains("10.96.0.1".parse().unwrap()));
        assert!(c.contains("10.111.255.255".parse().unwrap()));
        assert!(!c.contains("10.112.0.0".parse().unwrap()));
        assert!(c.contains("::ffff:10.96.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "fd00:96::/32".parse().unwrap();
        assert!(v6.contains("fd00:96::1".parse().unwrap()));
        assert!(!v6.contains("fd00:97::1".parse().unwrap()));
    }

    #[test]
    fn cidr_parse_errors_name_the_input() {
        assert!(
            "10.0.0.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .to_string()
                .contains("10.0.0.0/33")
        );
        assert!(
            "nope/8"
                .parse::<Cidr>()
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }

    #[test]
    fn field_error_paths_compose() {
        let e = FieldError::new("port", "bad")
            .within("[2]")
            .within("endpoints")
            .on("cluster", "x");
        assert_eq!(e.to_string(), "cluster \"x\": endpoints[2].port: bad");
    }
}
