//! Filter chain selection, Envoy's way (pure).
//!
//! Envoy narrows the candidate chains one criterion at a time, in a fixed order: destination
//! port, destination IP, server name, transport protocol, application protocols, direct source
//! IP, source type, source IP, source port. At each step the most specific non-empty match wins
//! and chains without that criterion are used only when nothing matched it; Envoy never backs
//! up to a less specific choice later. No chain left means the default chain (or none).

use std::net::{IpAddr, SocketAddr};

use crate::model::listener::SourceType;
use crate::model::{Cidr, FilterChain, Listener, canonical_addr};

/// What is known about a connection when its filter chain is chosen.
#[derive(Debug, Clone)]
pub struct ConnFacts<'a> {
    /// Destination (the original destination for redirected connections).
    pub dst: SocketAddr,
    /// Peer address.
    pub src: SocketAddr,
    /// Direct peer address (the same as `src` without PROXY protocol).
    pub direct_src: SocketAddr,
    /// SNI, if a listener filter found one.
    pub server_name: Option<&'a str>,
    /// `raw_buffer` or `tls`.
    pub transport_protocol: &'a str,
    /// Detected application protocols (ALPN or `http/1.1`/`h2c` from HTTP inspection).
    pub application_protocols: &'a [String],
}

/// Pick the filter chain for a connection, or `None` (Envoy closes such connections).
pub fn select_chain<'l>(listener: &'l Listener, facts: &ConnFacts<'_>) -> Option<&'l FilterChain> {
    let dst = canonical_addr(facts.dst);
    let src = canonical_addr(facts.src);
    let direct_src = canonical_addr(facts.direct_src);
    let mut c: Vec<&FilterChain> = listener.filter_chains.iter().collect();

    // 1. destination port: exact, else chains without a port.
    c = narrow(c, |fc| match fc.matcher.destination_port {
        Some(p) if p == dst.port() => Some(1),
        Some(_) => None,
        None => Some(0),
    });
    // 2. destination IP: longest matching prefix, else chains without prefixes.
    c = narrow(c, |fc| longest_prefix(&fc.matcher.prefix_ranges, dst.ip()));
    // 3. server names: exact > wildcard suffix (longer first) > none.
    c = narrow(c, |fc| {
        server_name_score(&fc.matcher.server_names, facts.server_name)
    });
    // 4. transport protocol.
    c = narrow(c, |fc| match fc.matcher.transport_protocol.as_str() {
        "" => Some(0),
        t if t == facts.transport_protocol => Some(1),
        _ => None,
    });
    // 5. application protocols: any overlap, else chains without.
    c = narrow(c, |fc| {
        if fc.matcher.application_protocols.is_empty() {
            Some(0)
        } else if fc
            .matcher
            .application_protocols
            .iter()
            .any(|p| facts.application_protocols.contains(p))
        {
            Some(1)
        } else {
            None
        }
    });
    // 6. direct source IP.
    c = narrow(c, |fc| {
        longest_prefix(&fc.matcher.direct_source_prefix_ranges, direct_src.ip())
    });
    // 7. source type.
    let local = src.ip().is_loopback() || src.ip() == dst.ip();
    c = narrow(c, |fc| match fc.matcher.source_type {
        SourceType::Any => Some(0),
        SourceType::SameIpOrLoopback if local => Some(1),
        SourceType::External if !local => Some(1),
        _ => None,
    });
    // 8. source IP.
    c = narrow(c, |fc| {
        longest_prefix(&fc.matcher.source_prefix_ranges, src.ip())
    });
    // 9. source port.
    c = narrow(c, |fc| {
        if fc.matcher.source_ports.is_empty() {
            Some(0)
        } else if fc.matcher.source_ports.contains(&src.port()) {
            Some(1)
        } else {
            None
        }
    });
    c.first()
        .copied()
        .or(listener.default_filter_chain.as_ref())
}

/// Keep the chains with the highest score; `None` drops a chain.
pub(crate) fn narrow<'l>(
    chains: impl IntoIterator<Item = &'l FilterChain>,
    score: impl Fn(&FilterChain) -> Option<u32>,
) -> Vec<&'l FilterChain> {
    let scored: Vec<(u32, &FilterChain)> = chains
        .into_iter()
        .filter_map(|fc| score(fc).map(|s| (s, fc)))
        .collect();
    let Some(best) = scored.iter().map(|(s, _)| *s).max() else {
        return Vec::new();
    };
    scored
        .into_iter()
        .filter(|(s, _)| *s == best)
        .map(|(_, fc)| fc)
        .collect()
}

/// Score for prefix criteria: 0 when the chain has none, 1 + length of the longest match.
pub(crate) fn longest_prefix(ranges: &[Cidr], ip: IpAddr) -> Option<u32> {
    if ranges.is_empty() {
        return Some(0);
    }
    ranges
        .iter()
        .filter(|c| c.contains(ip))
        .map(|c| 1 + u32::from(c.len))
        .max()
}

fn server_name_score(names: &[String], sni: Option<&str>) -> Option<u32> {
    if names.is_empty() {
        return Some(0);
    }
    let sni = sni?;
    names
        .iter()
        .filter_map(|n| {
            if n.eq_ignore_ascii_case(sni) {
                Some(10_000)
            } else if let Some(suffix) = n.strip_prefix('*') {
                sni.to_ascii_lowercase()
                    .ends_with(&suffix.to_ascii_lowercase())
                    .then_some(1 + suffix.len() as u32)
            } else {
                None
            }
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::listener::{ClusterSpecifier, FilterChainMatch, NetworkAction, TcpProxy};

    fn chain(name: &str, m: FilterChainMatch) -> FilterChain {
        FilterChain {
            name: name.into(),
            matcher: m,
            filters: vec![],
            action: NetworkAction::TcpProxy(TcpProxy {
                stat_prefix: name.into(),
                cluster: ClusterSpecifier::Cluster(name.into()),
                idle_timeout: None,
            }),
            has_transport_socket: false,
        }
    }

    fn listener(chains: Vec<FilterChain>, default: Option<FilterChain>) -> Listener {
        Listener {
            name: "l".into(),
            address: "0.0.0.0:15001".parse().unwrap(),
            internal: None,
            use_original_dst: true,
            bind_to_port: true,
            filter_chains: chains,
            default_filter_chain: default,
            listener_filters: vec![],
            udp: None,
        }
    }

    fn facts(dst: &str) -> ConnFacts<'static> {
        ConnFacts {
            dst: dst.parse().unwrap(),
            src: "127.0.0.1:40000".parse().unwrap(),
            direct_src: "127.0.0.1:40000".parse().unwrap(),
            server_name: None,
            transport_protocol: "raw_buffer",
            application_protocols: &[],
        }
    }

    fn pick<'a>(l: &'a Listener, dst: &str) -> Option<&'a str> {
        select_chain(l, &facts(dst)).map(|c| c.name.as_str())
    }

    #[test]
    fn port_then_longest_prefix() {
        let l = listener(
            vec![
                chain("any", FilterChainMatch::default()),
                chain(
                    "port80",
                    FilterChainMatch {
                        destination_port: Some(80),
                        ..Default::default()
                    },
                ),
                chain(
                    "port80-vip",
                    FilterChainMatch {
                        destination_port: Some(80),
                        prefix_ranges: vec!["10.96.0.1/32".parse().unwrap()],
                        ..Default::default()
                    },
                ),
                chain(
                    "port80-net",
                    FilterChainMatch {
                        destination_port: Some(80),
                        prefix_ranges: vec!["10.96.0.0/12".parse().unwrap()],
                        ..Default::default()
                    },
                ),
            ],
            None,
        );
        assert_eq!(pick(&l, "10.96.0.1:80"), Some("port80-vip"));
        assert_eq!(pick(&l, "10.96.0.2:80"), Some("port80-net"));
        assert_eq!(pick(&l, "192.168.0.1:80"), Some("port80"));
        assert_eq!(pick(&l, "10.96.0.1:81"), Some("any"));
        assert_eq!(pick(&l, "[::ffff:10.96.0.1]:80"), Some("port80-vip"));
    }

    #[test]
    fn no_backtracking_to_less_specific_port() {
        // The port-80 chain only accepts tls; a raw connection to :80 must not fall back to
        // the port-less chain (Envoy does not backtrack), so the default chain is used.
        let l = listener(
            vec![
                chain("any", FilterChainMatch::default()),
                chain(
                    "tls80",
                    FilterChainMatch {
                        destination_port: Some(80),
                        transport_protocol: "tls".into(),
                        ..Default::default()
                    },
                ),
            ],
            Some(chain("default", FilterChainMatch::default())),
        );
        assert_eq!(pick(&l, "10.0.0.1:80"), Some("default"));
        assert_eq!(pick(&l, "10.0.0.1:81"), Some("any"));
    }

    #[test]
    fn application_protocols_need_detection() {
        let l = listener(
            vec![
                chain(
                    "http",
                    FilterChainMatch {
                        application_protocols: vec!["http/1.1".into(), "h2c".into()],
                        ..Default::default()
                    },
                ),
                chain(
                    "raw",
                    FilterChainMatch {
                        transport_protocol: "raw_buffer".into(),
                        ..Default::default()
                    },
                ),
            ],
            None,
        );
        assert_eq!(pick(&l, "10.0.0.1:80"), Some("raw"));
        let alpn = vec!["h2c".to_string()];
        let f = ConnFacts {
            application_protocols: &alpn,
            ..facts("10.0.0.1:80")
        };
        assert_eq!(select_chain(&l, &f).map(|c| c.name.as_str()), Some("raw"));
    }

    #[test]
    fn nothing_matches_without_default() {
        let l = listener(
            vec![chain(
                "p1",
                FilterChainMatch {
                    destination_port: Some(1),
                    ..Default::default()
                },
            )],
            None,
        );
        assert_eq!(pick(&l, "10.0.0.1:2"), None);
    }
}
