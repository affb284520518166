//! Inbound capture with `sk_lookup`: attach `skiff_sk_lookup` to this process's network
//! namespace and hand it the proxy's inbound listeners.
//!
//! A SYN for one of the pod's addresses (not from the pod itself, not to an excluded port)
//! is delivered to the inbound listener whatever port it was sent to; the accepted socket's
//! local address is the original destination. The program and its maps live in their own
//! instance of the skiff-bpf object (the outbound capture may be absent or in another mode),
//! with the outbound maps shrunk to one entry. Dropping [`InboundSteering`] detaches it.

use std::{
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, SockMap},
    programs::SkLookup,
};
use skiff_common::inbound::{InboundPortKey, LISTENER_V4, LISTENER_V6, PodIpKey, stat};

use super::{BpfError, map_err, take};

const PROGRAM: (&str, &str) = ("skiff_sk_lookup", "sk_lookup");
const MAP_LISTENERS: &str = "SKIFF_IN_LSN";
const MAP_POD_IPS: &str = "SKIFF_POD_IPS";
const MAP_EXCL: &str = "SKIFF_IN_EXCL";
const MAP_STATS: &str = "SKIFF_IN_STATS";
const NETNS: &str = "/proc/self/ns/net";

/// Maps of the outbound capture this instance never uses: one entry each, so a second copy
/// of the object costs almost nothing (LRU hashes preallocate their full size).
const UNUSED_MAPS: [&str; 17] = [
    "SKIFF_COOKIE",
    "SKIFF_ORIG_DST",
    "SKIFF_EXCL_PORT",
    "SKIFF_EXCL_V4",
    "SKIFF_EXCL_V6",
    "SKIFF_MESHED_V2",
    "SKIFF_SVC4_V2",
    "SKIFF_SVC6_V2",
    "SKIFF_SVCST_V2",
    "SKIFF_CLUSTERS",
    "SKIFF_ENDPOINTS",
    "SKIFF_RR",
    "SKIFF_MAGLEV",
    "SKIFF_EP_ACTIVE",
    "SKIFF_EP_LOAD",
    "SKIFF_FAST_SK",
    "SKIFF_UDP_REV",
];

/// The attached `sk_lookup` program and its maps.
pub struct InboundSteering {
    stats: PerCpuArray<MapData, u64>,
    pod_ips: Vec<IpAddr>,
    // Keeps the sockets referenced by the program; cleared when this drops.
    _listeners: SockMap<MapData>,
    // Owns the program and its link: dropping it detaches.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for InboundSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundSteering")
            .field("pod_ips", &self.pod_ips)
            .finish_non_exhaustive()
    }
}

/// The non-loopback addresses of the calling thread's network namespace (the pod's addresses).
pub fn local_addresses() -> Result<Vec<IpAddr>, BpfError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| BpfError::Io {
        what: "listing the addresses of",
        path: PathBuf::from(NETNS),
        source: std::io::Error::from(e),
    })?;
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let sa = a.address?;
            let ip = sa
                .as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))?;
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

impl InboundSteering {
    /// Loads the program, fills its maps (`pod_ips`, excluded ports, the listeners: `v4` must
    /// be an AF_INET listener, `v6` an AF_INET6 one) and attaches it to this process's network
    /// namespace.
    pub fn install(
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
        pod_ips: &[IpAddr],
        exclude_ports: &[u16],
    ) -> Result<InboundSteering, BpfError> {
        Self::install_in(Path::new(NETNS), v4, v6, pod_ips, exclude_ports)
    }

    /// [`InboundSteering::install`] for the network namespace at `netns` (a pod's, in node
    /// mode); the listeners must live in that namespace.
    pub fn install_in(
        netns: &Path,
        v4: &impl AsRawFd,
        v6: Option<&impl AsRawFd>,
        pod_ips: &[IpAddr],
        exclude_ports: &[u16],
    ) -> Result<InboundSteering, BpfError> {
        if pod_ips.is_empty() {
            return Err(BpfError::Config(
                "inbound capture: this network namespace has no non-loopback address (pass --pod-ips)"
                    .into(),
            ));
        }
        let mut loader = EbpfLoader::new();
        for m in UNUSED_MAPS {
            loader.map_max_entries(m, 1);
        }
        let mut ebpf = loader
            .load(super::loader::OBJECT)
            .map_err(|source| BpfError::Object {
                source: Box::new(source),
            })?;
        let mut listeners: SockMap<MapData> = take(&mut ebpf, MAP_LISTENERS)?;
        let mut ips: HashMap<MapData, PodIpKey, u8> = take(&mut ebpf, MAP_POD_IPS)?;
        let mut excl: HashMap<MapData, InboundPortKey, u8> = take(&mut ebpf, MAP_EXCL)?;
        let stats: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_STATS)?;
        for &ip in pod_ips {
            ips.insert(PodIpKey::from(ip), 1, 0)
                .map_err(|source| map_err(MAP_POD_IPS, format!("insert {ip}"), source))?;
        }
        for &port in exclude_ports {
            excl.insert(InboundPortKey::new(port), 1, 0)
                .map_err(|source| map_err(MAP_EXCL, format!("insert port {port}"), source))?;
        }
        listeners
            .set(LISTENER_V4, v4, 0)
            .map_err(|source| map_err(MAP_LISTENERS, "set the IPv4 listener", source))?;
        if let Some(v6) = v6 {
            listeners
                .set(LISTENER_V6, v6, 0)
                .map_err(|source| map_err(MAP_LISTENERS, "set the IPv6 listener", source))?;
        }

        let prog: &mut SkLookup = super::program(&mut ebpf, PROGRAM)?;
        prog.load()
            .map_err(|source| BpfError::load(PROGRAM, source))?;
        let ns = File::open(netns).map_err(|source| BpfError::Io {
            what: "opening network namespace",
            path: netns.into(),
            source,
        })?;
        prog.attach(ns)
            .map_err(|source| BpfError::attach(PROGRAM, netns, source))?;
        tracing::info!(
            netns = %netns.display(),
            pod_ips = ?pod_ips,
            exclude_ports = ?exclude_ports,
            ipv6 = v6.is_some(),
            "inbound capture attached (sk_lookup)"
        );
        Ok(InboundSteering {
            stats,
            pod_ips: pod_ips.to_vec(),
            _listeners: listeners,
            _ebpf: ebpf,
        })
    }

    /// The addresses steered.
    pub fn pod_ips(&self) -> &[IpAddr] {
        &self.pod_ips
    }

    /// Counters by `skiff_common::inbound::stat` name, summed over CPUs.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        (0..stat::COUNT)
            .map(|i| {
                let n = self
                    .stats
                    .get(&i, 0)
                    .map(|v| v.iter().copied().sum())
                    .unwrap_or(0);
                (stat::NAMES[i as usize], n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ip_keys_are_network_order() {
        let k = PodIpKey::from("10.200.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(k.addr_be[0].to_ne_bytes(), [10, 200, 0, 2]);
        assert_eq!(k.family, 2);
        let k = PodIpKey::from("fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(k.addr_be[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(k.addr_be[3].to_ne_bytes(), [0, 0, 0, 2]);
        assert_eq!(k.family, 10);
    }
}
