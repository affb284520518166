//! The capture exclusions (`SKIFF_EXCL_PORT`, `SKIFF_EXCL_V4`, `SKIFF_EXCL_V6`): filled once at
//! install from the config, read only by the kernel afterwards.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::Ebpf;
use aya::maps::{
    HashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use skiff_common::{CidrV4Key, CidrV6Key, ExcludePortKey};

use super::{BpfError, CaptureConfig, map_err, take};

const MAP_EXCL_PORT: &str = "SKIFF_EXCL_PORT";
const MAP_EXCL_V4: &str = "SKIFF_EXCL_V4";
const MAP_EXCL_V6: &str = "SKIFF_EXCL_V6";

/// The exclusion maps, held open: the programs loaded after [`fill`] refer to them by fd.
pub(super) struct Exclusions {
    _ports: HashMap<MapData, ExcludePortKey, u8>,
    _v4: LpmTrie<MapData, CidrV4Key, u8>,
    _v6: LpmTrie<MapData, CidrV6Key, u8>,
}

/// Writes `cfg`'s excluded ports and CIDRs (masked to their prefix) into the loaded object.
/// Keep the result until the programs are loaded.
pub(super) fn fill(ebpf: &mut Ebpf, cfg: &CaptureConfig) -> Result<Exclusions, BpfError> {
    let mut ports: HashMap<MapData, ExcludePortKey, u8> = take(ebpf, MAP_EXCL_PORT)?;
    let mut v4: LpmTrie<MapData, CidrV4Key, u8> = take(ebpf, MAP_EXCL_V4)?;
    let mut v6: LpmTrie<MapData, CidrV6Key, u8> = take(ebpf, MAP_EXCL_V6)?;
    for &port in &cfg.exclude_ports {
        ports
            .insert(ExcludePortKey::new(port), 1, 0)
            .map_err(|source| map_err(MAP_EXCL_PORT, format!("insert port {port}"), source))?;
    }
    for &(ip, len) in &cfg.exclude_cidrs {
        match ip {
            IpAddr::V4(a) => v4.insert(
                &Key::new(u32::from(len), CidrV4Key::new(mask_v4(a, len))),
                1,
                0,
            ),
            IpAddr::V6(a) => v6.insert(
                &Key::new(u32::from(len), CidrV6Key::new(mask_v6(a, len))),
                1,
                0,
            ),
        }
        .map_err(|source| {
            let map = if ip.is_ipv4() {
                MAP_EXCL_V4
            } else {
                MAP_EXCL_V6
            };
            map_err(map, format!("insert {ip}/{len}"), source)
        })?;
    }
    Ok(Exclusions {
        _ports: ports,
        _v4: v4,
        _v6: v6,
    })
}

fn mask_v4(a: Ipv4Addr, len: u8) -> Ipv4Addr {
    let bits = u32::from(a);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    (bits & mask).into()
}

fn mask_v6(a: Ipv6Addr, len: u8) -> Ipv6Addr {
    let bits = u128::from(a);
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    };
    (bits & mask).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_masked_to_their_prefix() {
        assert_eq!(
            mask_v4("10.96.7.9".parse().unwrap(), 16).to_string(),
            "10.96.0.0"
        );
        assert_eq!(
            mask_v4("10.96.7.9".parse().unwrap(), 0).to_string(),
            "0.0.0.0"
        );
        assert_eq!(
            mask_v4("10.96.7.9".parse().unwrap(), 32).to_string(),
            "10.96.7.9"
        );
        assert_eq!(
            mask_v6("fd00:96::1".parse().unwrap(), 16).to_string(),
            "fd00::"
        );
        assert_eq!(
            mask_v6("fd00:96::1".parse().unwrap(), 128).to_string(),
            "fd00:96::1"
        );
    }
}
