//! The connect step: where a [`Target`] is (DNS names resolve here) and where the connect
//! leaves from (inbound: the passthrough source), then the one upstream connect,
//! [`crate::net::connect_from`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::ConnError;
use super::route::Target;
use super::{Dataplane, ListenerRole, inbound};
use crate::addr::EndpointAddr;
use crate::net::{self, ConnectError};

/// How long a resolved name is reused: Envoy's default `dns_refresh_rate` (getaddrinfo tells
/// no record TTL), so a DNS cluster does not resolve once per connection.
const DNS_REUSE: Duration = Duration::from_secs(5);

/// Names kept at most per worker; past that the cache starts again empty.
const DNS_MAX_NAMES: usize = 1024;

/// The answers of one worker's recent lookups (worker-local: the lock is never contended).
#[derive(Debug, Default)]
pub(super) struct DnsCache {
    names: Mutex<HashMap<(String, u16), (SocketAddr, Instant)>>,
}

impl DnsCache {
    fn get(&self, host: &str, port: u16, now: Instant) -> Option<SocketAddr> {
        let names = self.names.lock().ok()?;
        let (addr, at) = names.get(&(host.to_string(), port))?;
        (now.duration_since(*at) < DNS_REUSE).then_some(*addr)
    }

    fn put(&self, host: &str, port: u16, addr: SocketAddr, now: Instant) {
        if let Ok(mut names) = self.names.lock() {
            if names.len() >= DNS_MAX_NAMES {
                names.retain(|_, (_, at)| now.duration_since(*at) < DNS_REUSE);
                if names.len() >= DNS_MAX_NAMES {
                    names.clear();
                }
            }
            names.insert((host.to_string(), port), (addr, now));
        }
    }
}

/// The address to connect to for `target` of `cluster`; a DNS name is looked up again only
/// when the answer `dns` holds for it is older than [`DNS_REUSE`] (failures are not kept).
pub(super) async fn resolve(
    dns: &DnsCache,
    target: &Target,
    cluster: &str,
) -> Result<EndpointAddr, ConnError> {
    match target {
        Target::Host(h) => Ok(EndpointAddr(h.address())),
        Target::OriginalDst(a) => Ok(*a),
        Target::Dns { host, port } => {
            let now = Instant::now();
            if let Some(a) = dns.get(host, *port, now) {
                return Ok(EndpointAddr(a));
            }
            let found = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .ok()
                .and_then(|mut addrs| addrs.next());
            match found {
                Some(a) => {
                    dns.put(host, *port, a, now);
                    Ok(EndpointAddr(a))
                }
                None => Err(ConnError::Unresolved {
                    cluster: cluster.to_string(),
                    host: host.clone(),
                    port: *port,
                }),
            }
        }
    }
}

/// Connect to `addr` for a connection accepted by a listener of `role`, with the proxy's mark
/// and `timeout`.
pub(super) async fn connect(
    dp: &Dataplane,
    role: &ListenerRole,
    addr: EndpointAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let source = match role {
        ListenerRole::Inbound { .. } => inbound::passthrough_source(addr.get()),
        ListenerRole::Capture | ListenerRole::Static { .. } => None,
    };
    net::connect_from(addr, source, dp.upstream_mark(), timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_is_looked_up_again_only_after_the_refresh_rate() {
        let dns = DnsCache::default();
        let target = Target::Dns {
            host: "localhost".into(),
            port: 80,
        };
        let first = resolve(&dns, &target, "c").await.unwrap();
        let now = Instant::now();
        assert_eq!(dns.get("localhost", 80, now), Some(first.get()));
        assert_eq!(dns.get("localhost", 80, now + DNS_REUSE), None, "stale");
        // What the cache holds is what is used while it is fresh.
        let planted: SocketAddr = "127.0.0.9:80".parse().unwrap();
        dns.put("localhost", 80, planted, now);
        assert_eq!(resolve(&dns, &target, "c").await.unwrap().get(), planted);
    }

    #[test]
    fn a_full_cache_drops_stale_names_first() {
        let dns = DnsCache::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let now = Instant::now();
        for i in 0..DNS_MAX_NAMES {
            dns.put(&format!("h{i}"), 1, a, now);
        }
        let later = now + DNS_REUSE;
        dns.put("new", 1, a, later);
        assert_eq!(dns.get("new", 1, later), Some(a));
        assert_eq!(dns.get("h0", 1, later), None);
        assert_eq!(dns.names.lock().unwrap().len(), 1);
    }
}
