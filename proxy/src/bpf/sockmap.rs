//! `--sockmap`: the userspace half of socket-to-socket acceleration (see the kernel's
//! `sockmap.rs`). A submodule of the loader: it shares the loaded object and its helpers.
//!
//! Off by default. Measured on loopback (`cargo xtask bench --sockmap`), redirecting payload
//! between local sockets wins for small request/response exchanges and for large streaming
//! writes but loses for mid-sized streamed writes, so it is enabled per service port
//! (`--sockmap-ports`), never globally.

use std::fs::File;
use std::path::Path;

use aya::Ebpf;
use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::sock_ops::SockOpsLink;
use aya::programs::{CgroupAttachMode, SkMsg};
use skiff_common::ConnKey;
use skiff_common::sockmap::{AccelPortKey, stat};

use super::{BpfError, sock_ops};
use crate::bpf::{map_err, take};

const SK_MSG: (&str, &str) = ("skiff_sk_msg", "sk_msg");
const MAP_SOCKS: &str = "SKIFF_SOCKS";
const MAP_ACCEL_PORT: &str = "SKIFF_ACCEL_PORT";
const MAP_SOCKMAP_ST: &str = "SKIFF_SOCKMAP_ST";

/// Installed acceleration: the sk_msg program on the socket map, the port policy and the
/// counters. Dropping it detaches the program (sockets already in the map leave it when they
/// close).
pub(super) struct Sockmap {
    stats: PerCpuArray<MapData, u64>,
    // Kept for their Drop: detach on drop.
    _socks: SockHash<MapData, ConnKey>,
    _sock_ops_on_proxy: Option<SockOpsLink>,
    ports: Vec<u16>,
}

impl Sockmap {
    /// Fills the port policy, loads and attaches `sk_msg`, and, when `proxy_cgroup` is given
    /// (sidecar mode: the proxy's cgroup is not below the capture cgroup), attaches the
    /// already-loaded `sock_ops` program there too so the proxy's own sockets can join pairs.
    pub(super) fn install(
        ebpf: &mut Ebpf,
        ports: &[u16],
        proxy_cgroup: Option<&Path>,
    ) -> Result<Sockmap, BpfError> {
        if ports.is_empty() {
            return Err(BpfError::Config(
                "--sockmap needs at least one port in --sockmap-ports".to_owned(),
            ));
        }
        let mut policy: HashMap<MapData, AccelPortKey, u8> = take(ebpf, MAP_ACCEL_PORT)?;
        for &port in ports {
            policy
                .insert(AccelPortKey::new(port), 1, 0)
                .map_err(|source| map_err(MAP_ACCEL_PORT, format!("insert port {port}"), source))?;
        }
        let socks: SockHash<MapData, ConnKey> = take(ebpf, MAP_SOCKS)?;
        let stats: PerCpuArray<MapData, u64> = take(ebpf, MAP_SOCKMAP_ST)?;

        let prog: &mut SkMsg = crate::bpf::program(ebpf, SK_MSG)?;
        prog.load()
            .map_err(|source| BpfError::load(SK_MSG, source))?;
        // The sk_msg link lives with the program (owned by the Ebpf): it is detached when the
        // loader drops the object.
        prog.attach(socks.fd())
            .map_err(|source| BpfError::load(SK_MSG, source))?;

        let sock_ops_on_proxy = match proxy_cgroup {
            None => None,
            Some(path) => {
                let attach_err = |source| BpfError::attach(super::SOCK_OPS, path, source);
                let cgroup = File::open(path).map_err(|source| BpfError::Io {
                    what: "opening cgroup",
                    path: path.into(),
                    source,
                })?;
                let prog = sock_ops(ebpf)?;
                let id = prog
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                Some(prog.take_link(id).map_err(attach_err)?)
            }
        };
        tracing::info!(ports = ?ports, "sockmap acceleration attached");
        Ok(Sockmap {
            stats,
            _socks: socks,
            _sock_ops_on_proxy: sock_ops_on_proxy,
            ports: ports.to_vec(),
        })
    }

    /// The accelerated ports.
    pub(super) fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Counters summed over CPUs, as `(name, value)`.
    pub(super) fn stats(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        crate::bpf::per_cpu_sums(&self.stats, MAP_SOCKMAP_ST, &stat::NAMES)
    }
}
