//! `--xdp IFACE`: the userspace half of the XDP node-ingress load balancer (see the kernel's
//! `xdp.rs`). A submodule of the loader: it shares the loaded object, so the XDP program reads
//! the very fast-path maps the owner/reconciler writes (node scope, same generation flip); no
//! second projection exists.
//!
//! Each interface gets the program in native (driver) mode when the driver supports it, else
//! in generic (SKB) mode; the mode is logged and shown by `skiff maps`. Every interface is
//! also a redirect target (`SKIFF_XDP_TX`). A sweeper thread deletes the conntrack entries of
//! endpoints the fast path no longer serves, so only their flows move to other endpoints, and
//! keeps `SKIFF_XDP_VIP` (the addresses whose echo requests the kernel answers) equal to the
//! VIPs of the node-scope services the fast path serves: the same applied image the kernel's
//! service maps hold, so a removed service's VIP stops answering within a sweep period.
//!
//! With a pin directory each interface's link is pinned as `link_skiff_xdp_<mode>_<iface>`
//! (the mode in the name: the kernel's link info does not tell it), so a killed skiff's
//! program keeps balancing with its maps (the fast path's and the pinned conntrack); the next
//! skiff swaps its program into those links (`BPF_LINK_UPDATE`, no window without a program)
//! and detaches the links of interfaces it no longer balances.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use aya::Ebpf;
use aya::maps::{DevMapHash, HashMap as LruHashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::{Xdp, XdpMode, xdp::XdpLinkId};
use serde_json::{Value, json};
use skiff_common::EndpointKey;
use skiff_common::xdp::{XdpAddrKey, XdpCounters, XdpFlowKey, XdpNat, XdpVipKey, stat};

use super::{BpfError, FastPath, FastPathView};
use crate::bpf::{pin::Pins, take};

/// The program, as the loader and errors name it.
pub(super) const XDP: (&str, &str) = ("skiff_xdp", "xdp");
/// Forward conntrack (pinned with the pin directory: flows keep their endpoint across restarts).
pub(super) const MAP_CT: &str = "SKIFF_XDP_CT";
/// Reverse conntrack (pinned likewise: replies of established flows stay translated).
pub(super) const MAP_RCT: &str = "SKIFF_XDP_RCT";
const MAP_TX: &str = "SKIFF_XDP_TX";
const MAP_VST: &str = "SKIFF_XDP_VST";
const MAP_EST: &str = "SKIFF_XDP_EST";
const MAP_ST: &str = "SKIFF_XDP_ST";
/// The VIP addresses answered with echo replies (sized like the service maps at load).
pub(super) const MAP_VIP: &str = "SKIFF_XDP_VIP";
/// The maps pinned with `--xdp` (and a pin directory).
pub(super) const PINNED_XDP: &[&str] = &[MAP_CT, MAP_RCT, MAP_VIP];
/// What the names of the pinned XDP links start with, after `link_`.
const PIN_PREFIX: &str = "skiff_xdp_";
/// How often the sweeper compares conntrack with the endpoints the fast path serves.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// One interface the program is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpInterface {
    /// Interface name.
    pub name: String,
    /// Its index.
    pub ifindex: u32,
    /// `native` (driver) or `generic` (SKB).
    pub mode: &'static str,
}

/// The program's link to one interface.
enum XdpLinkHold {
    /// Attached by this process, unpinned: it detaches when the loaded object drops.
    Owned { _id: XdpLinkId },
    /// Pinned: an fd of it (the pin keeps it attached after a crash; removing the pins on a
    /// clean exit and closing this detaches it).
    Pinned { _fd: OwnedFd },
}

/// Conntrack maps and the VIP set, shared with the sweeper thread.
struct Conntrack {
    forward: LruHashMap<MapData, XdpFlowKey, XdpNat>,
    reverse: LruHashMap<MapData, XdpFlowKey, XdpNat>,
    vips: LruHashMap<MapData, XdpAddrKey, u8>,
}

/// Installed XDP balancer: the program on its interfaces, its maps, the sweeper. Dropping it
/// stops the sweeper; the links go with the loaded object (the loader drops it).
pub(super) struct XdpBalancer {
    interfaces: Vec<XdpInterface>,
    ct: Arc<Mutex<Conntrack>>,
    vip_stats: PerCpuHashMap<MapData, XdpVipKey, XdpCounters>,
    ep_stats: PerCpuHashMap<MapData, EndpointKey, XdpCounters>,
    stats: PerCpuArray<MapData, u64>,
    _tx: DevMapHash<MapData>,
    _links: Vec<XdpLinkHold>,
    stop: Arc<AtomicBool>,
    /// Failed `SKIFF_XDP_VIP` inserts (each retried on the next sweep).
    vip_insert_errors: Arc<AtomicU64>,
}

impl XdpBalancer {
    /// Loads `skiff_xdp`, makes each of `ifaces` a redirect target and attaches the program to
    /// it (native, else generic mode; with `pins`, swapped into the interface's pinned link
    /// when a previous skiff left one, else attached and pinned), detaches pinned links of
    /// other interfaces, and starts the conntrack sweeper over `fast`.
    pub(super) fn install(
        ebpf: &mut Ebpf,
        ifaces: &[String],
        fast: Arc<FastPath>,
        pins: Option<&Pins>,
    ) -> Result<XdpBalancer, BpfError> {
        let ct = Conntrack {
            forward: take(ebpf, MAP_CT)?,
            reverse: take(ebpf, MAP_RCT)?,
            vips: take(ebpf, MAP_VIP)?,
        };
        let mut tx: DevMapHash<MapData> = take(ebpf, MAP_TX)?;
        let vip_stats = take(ebpf, MAP_VST)?;
        let ep_stats = take(ebpf, MAP_EST)?;
        let stats = take(ebpf, MAP_ST)?;

        // Redirect targets first: a program swapped into a pinned link redirects at once.
        let mut targets = Vec::with_capacity(ifaces.len());
        for name in ifaces {
            let ifindex = ifindex(name)?;
            tx.insert(ifindex, ifindex, None, 0)
                .map_err(|source| BpfError::Map {
                    map: MAP_TX,
                    op: format!("insert {name}"),
                    source: Box::new(match source {
                        aya::maps::xdp::XdpMapError::MapError(e) => e,
                        other => aya::maps::MapError::InvalidName {
                            name: other.to_string(),
                        },
                    }),
                })?;
            targets.push((name, ifindex));
        }

        let prog: &mut Xdp = crate::bpf::program(ebpf, XDP)?;
        prog.load().map_err(|source| BpfError::load(XDP, source))?;
        let mut interfaces = Vec::with_capacity(ifaces.len());
        let mut links = Vec::with_capacity(ifaces.len());
        let mut kept = Vec::with_capacity(ifaces.len());
        for (name, ifindex) in targets {
            let (link, mode) = match pins {
                Some(pins) => {
                    let (fd, mode, pin) = attach_pinned(prog, name, pins)?;
                    kept.push(pin);
                    (XdpLinkHold::Pinned { _fd: fd }, mode)
                }
                None => {
                    let (id, mode) = attach(prog, name)?;
                    (XdpLinkHold::Owned { _id: id }, mode)
                }
            };
            tracing::info!(interface = %name, ifindex, mode, "XDP load balancer attached");
            interfaces.push(XdpInterface {
                name: name.clone(),
                ifindex,
                mode,
            });
            links.push(link);
        }
        if let Some(pins) = pins {
            remove_stale_pins(pins, &kept);
        }
        let ct = Arc::new(Mutex::new(ct));
        let stop = Arc::new(AtomicBool::new(false));
        let vip_insert_errors = Arc::new(AtomicU64::new(0));
        spawn_sweeper(ct.clone(), fast, stop.clone(), vip_insert_errors.clone());
        Ok(XdpBalancer {
            interfaces,
            ct,
            vip_stats,
            ep_stats,
            stats,
            _tx: tx,
            _links: links,
            stop,
            vip_insert_errors,
        })
    }

    /// The interfaces and their modes.
    pub(super) fn interfaces(&self) -> &[XdpInterface] {
        &self.interfaces
    }

    /// Global counters summed over CPUs, as `(name, value)`.
    pub(super) fn stats(&self) -> Result<Vec<(&'static str, u64)>, BpfError> {
        crate::bpf::per_cpu_sums(&self.stats, MAP_ST, &stat::NAMES)
    }

    /// Per-VIP counters summed over CPUs, sorted by VIP (`"tcp:10.96.0.1:80"`).
    pub(super) fn vip_stats(&self) -> Vec<(String, XdpCounters)> {
        let mut out: Vec<(String, XdpCounters)> = self
            .vip_stats
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((vip_name(&k)?, sum(v.iter()))))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Per-endpoint counters summed over CPUs, sorted by endpoint.
    pub(super) fn endpoint_stats(&self) -> Vec<(SocketAddr, XdpCounters)> {
        let mut out: Vec<(SocketAddr, XdpCounters)> = self
            .ep_stats
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Some((k.addr()?, sum(v.iter()))))
            .collect();
        out.sort_by_key(|(a, _)| *a);
        out
    }

    /// Tracked flows: (client, VIP, endpoint, protocol), sorted.
    pub(super) fn conntrack(&self) -> Vec<(SocketAddr, SocketAddr, SocketAddr, u8)> {
        let ct = self.ct.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = ct
            .forward
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                let (client, vip) = k.addrs()?;
                Some((client, vip, v.addr()?, k.proto))
            })
            .collect();
        out.sort();
        out
    }

    /// The VIP addresses the kernel answers echo requests for, sorted.
    pub(super) fn echo_vips(&self) -> Vec<IpAddr> {
        let ct = self.ct.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<IpAddr> = ct
            .vips
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| k.ip())
            .collect();
        out.sort();
        out
    }

    /// The `/debug/maps` part (`skiff maps`): interfaces, conntrack entries, counters.
    pub(super) fn maps_json(&self) -> Value {
        let ct = self.conntrack();
        json!({
            "xdp_echo_vips": self.echo_vips().iter().map(|v| json!({ "vip": v.to_string() }))
                .collect::<Vec<_>>(),
            "xdp_interfaces": self.interfaces.iter().map(|i| json!({
                "interface": i.name, "ifindex": i.ifindex, "mode": i.mode,
            })).collect::<Vec<_>>(),
            "xdp_conntrack_entries": ct.len(),
            "xdp_conntrack": ct.iter().map(|(c, v, e, p)| json!({
                "client": c.to_string(), "vip": v.to_string(), "endpoint": e.to_string(),
                "proto": proto_name(*p),
            })).collect::<Vec<_>>(),
            "xdp_vips": self.vip_stats().iter().map(|(v, c)| counters_json("vip", v, c))
                .collect::<Vec<_>>(),
            "xdp_endpoints": self.endpoint_stats().iter()
                .map(|(e, c)| counters_json("endpoint", &e.to_string(), c)).collect::<Vec<_>>(),
            "xdp_counters": self.stats().unwrap_or_default().into_iter()
                .map(|(k, v)| json!({ "name": k, "value": v })).collect::<Vec<_>>(),
        })
    }

    /// `/stats` lines (without the `skiff.` prefix): `xdp.<name>`, `xdp.<vip>.<counter>`,
    /// `xdp.endpoint.<ep>.<counter>`, `xdp.conntrack_entries`, `xdp.echo_vips`,
    /// `xdp.echo_vip_insert_errors`.
    pub(super) fn stat_lines(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .stats()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (format!("xdp.{k}"), v))
            .collect();
        for (vip, c) in self.vip_stats() {
            push_counters(&mut out, &format!("xdp.{vip}"), &c);
        }
        for (ep, c) in self.endpoint_stats() {
            push_counters(&mut out, &format!("xdp.endpoint.{ep}"), &c);
        }
        let entries = self
            .ct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forward
            .keys()
            .count();
        out.push(("xdp.conntrack_entries".to_string(), entries as u64));
        out.push(("xdp.echo_vips".to_string(), self.echo_vips().len() as u64));
        out.push((
            "xdp.echo_vip_insert_errors".to_string(),
            self.vip_insert_errors.load(Ordering::Relaxed),
        ));
        out
    }
}

impl Drop for XdpBalancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn push_counters(out: &mut Vec<(String, u64)>, prefix: &str, c: &XdpCounters) {
    out.extend([
        (format!("{prefix}.packets"), c.packets),
        (format!("{prefix}.bytes"), c.bytes),
        (format!("{prefix}.flows"), c.flows),
        (format!("{prefix}.no_endpoint"), c.no_endpoint),
        (format!("{prefix}.reply_packets"), c.reply_packets),
        (format!("{prefix}.reply_bytes"), c.reply_bytes),
    ]);
}

fn counters_json(what: &str, name: &str, c: &XdpCounters) -> Value {
    json!({
        what: name, "packets": c.packets, "bytes": c.bytes, "flows": c.flows,
        "no_endpoint": c.no_endpoint, "reply_packets": c.reply_packets,
        "reply_bytes": c.reply_bytes,
    })
}

fn sum<'a>(per_cpu: impl Iterator<Item = &'a XdpCounters>) -> XdpCounters {
    per_cpu.fold(XdpCounters::default(), |mut a, c| {
        a.packets += c.packets;
        a.bytes += c.bytes;
        a.flows += c.flows;
        a.no_endpoint += c.no_endpoint;
        a.reply_packets += c.reply_packets;
        a.reply_bytes += c.reply_bytes;
        a
    })
}

fn proto_name(p: u8) -> &'static str {
    match u32::from(p) {
        skiff_common::IPPROTO_TCP => "tcp",
        skiff_common::IPPROTO_UDP => "udp",
        _ => "other",
    }
}

/// `tcp:10.96.0.1:80` (the protocol first: a VIP may serve TCP and UDP on one port).
fn vip_name(k: &XdpVipKey) -> Option<String> {
    Some(format!("{}:{}", proto_name(k.proto), k.addr()?))
}

/// Attaches the loaded program to `name`: native (driver) mode, else generic (SKB).
fn attach(prog: &mut Xdp, name: &str) -> Result<(XdpLinkId, &'static str), BpfError> {
    match prog.attach(name, XdpMode::Driver) {
        Ok(id) => Ok((id, "native")),
        Err(native) => {
            tracing::info!(
                interface = %name,
                error = %native,
                "native XDP unavailable; attaching in generic (SKB) mode"
            );
            let id = prog
                .attach(name, XdpMode::Skb)
                .map_err(|source| BpfError::attach(XDP, std::path::Path::new(name), source))?;
            Ok((id, "generic"))
        }
    }
}

/// The pin name of the link to interface `iface` in `mode`.
fn pin_name(mode: &str, iface: &str) -> String {
    format!("{PIN_PREFIX}{mode}_{iface}")
}

/// [`attach`] with pins: swaps the loaded program into the interface's pinned link when a
/// previous skiff left one (`BPF_LINK_UPDATE`: the interface never runs without a program),
/// else attaches and pins the link. Returns an fd of the link, its mode and its pin.
fn attach_pinned(
    prog: &mut Xdp,
    name: &str,
    pins: &Pins,
) -> Result<(OwnedFd, &'static str, PathBuf), BpfError> {
    for mode in ["native", "generic"] {
        let pin = pins.link(&pin_name(mode, name));
        if !pin.exists() {
            continue;
        }
        let fd = prog.fd().map_err(|source| BpfError::load(XDP, source))?;
        match crate::bpf::pin::link_update(&pin, fd.as_fd()) {
            Ok(link) => {
                tracing::info!(interface = %name, mode, pin = %pin.display(), "XDP link taken over");
                return Ok((link, mode, pin));
            }
            // The interface went away since (its link with it): attach afresh.
            Err(e) => {
                tracing::warn!(
                    interface = %name,
                    pin = %pin.display(),
                    error = %e,
                    "a pinned XDP link could not take the new program; attaching afresh"
                );
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
    let (id, mode) = attach(prog, name)?;
    let pin = pins.link(&pin_name(mode, name));
    let path = std::path::Path::new(name);
    let link = prog
        .take_link(id)
        .map_err(|source| BpfError::attach(XDP, path, source))?;
    let link = FdLink::try_from(link).map_err(|e| {
        BpfError::Config(format!(
            "--xdp {name}: the kernel gave no bpf link to pin ({e})"
        ))
    })?;
    // The pin holds the link after a crash; our own fd holds it while we run.
    drop(link.pin(&pin).map_err(|e| {
        BpfError::Config(format!(
            "pinning the XDP link of {name} at {}: {e}",
            pin.display()
        ))
    })?);
    let fd = crate::bpf::pin::obj_get(&pin).map_err(|source| BpfError::Io {
        what: "opening the pinned XDP link",
        path: pin.clone(),
        source,
    })?;
    Ok((fd, mode, pin))
}

/// Removes the pinned XDP links other than `keep`: interfaces a previous skiff balanced and
/// this one does not (with no `--xdp` at all, every one). Their programs detach once no
/// process holds them.
pub(super) fn remove_stale_pins(pins: &Pins, keep: &[PathBuf]) {
    let Ok(entries) = std::fs::read_dir(pins.dir()) else {
        return;
    };
    let prefix = format!("link_{PIN_PREFIX}");
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with(&prefix) || keep.contains(&path) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                pin = %path.display(),
                "detached the XDP link of an interface no longer balanced"
            ),
            Err(e) => {
                tracing::warn!(pin = %path.display(), error = %e, "could not remove a stale XDP link pin")
            }
        }
    }
}

fn ifindex(name: &str) -> Result<u32, BpfError> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| BpfError::Config(format!("--xdp {name:?}: not an interface name")))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(BpfError::Config(format!("--xdp {name}: no such interface"))),
        i => Ok(i),
    }
}

/// Every endpoint some scope of the applied fast path serves.
fn served(view: &FastPathView) -> BTreeSet<SocketAddr> {
    std::iter::once(&view.image)
        .chain(view.scopes.values())
        .flat_map(|img| img.clusters.values())
        .flat_map(|c| c.endpoints.iter().copied())
        .collect()
}

/// The addresses of the node-scope services (TCP and UDP) the applied fast path serves: the
/// services the XDP program balances, so the VIPs whose echo requests it answers.
fn vips(view: &FastPathView) -> BTreeSet<IpAddr> {
    view.image
        .services
        .keys()
        .chain(view.image.udp_services.keys())
        .map(SocketAddr::ip)
        .collect()
}

/// What one [`sync_vips`] did.
#[derive(Debug, Default)]
struct VipSync {
    added: usize,
    removed: usize,
    /// Inserts that failed (the map full, or out of memory), with the first error.
    failed: usize,
    first_error: Option<String>,
}

/// Makes `SKIFF_XDP_VIP` hold exactly `want`: inserts first, then deletes (a VIP staying
/// answers throughout).
fn sync_vips(map: &mut LruHashMap<MapData, XdpAddrKey, u8>, want: &BTreeSet<IpAddr>) -> VipSync {
    let have: BTreeSet<XdpAddrKey> = map.keys().filter_map(Result::ok).collect();
    let want: BTreeSet<XdpAddrKey> = want.iter().map(|ip| XdpAddrKey::new(*ip)).collect();
    let mut out = VipSync::default();
    for k in want.difference(&have) {
        match map.insert(k, 1, 0) {
            Ok(()) => out.added += 1,
            Err(e) => {
                out.failed += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{:?}: {e}", k.ip()));
                }
            }
        }
    }
    for k in have.difference(&want) {
        if map.remove(k).is_ok() {
            out.removed += 1;
        }
    }
    out
}

/// When the sweeper writes the VIP set: on a change of the wanted set, and on every sweep
/// after one that left inserts undone (a full map may have room on the next: a removed
/// service frees its VIP), until one completes.
#[derive(Debug, Default)]
struct VipSyncState {
    /// The set the map was last made to hold completely.
    applied: Option<BTreeSet<IpAddr>>,
    /// The last sync left inserts undone.
    retrying: bool,
}

impl VipSyncState {
    /// Whether the map must be synced to `want` now.
    fn due(&self, want: &BTreeSet<IpAddr>) -> bool {
        self.retrying || self.applied.as_ref() != Some(want)
    }

    /// Records a sync to `want` that left `failed` inserts undone.
    fn record(&mut self, want: BTreeSet<IpAddr>, failed: usize) {
        self.retrying = failed > 0;
        self.applied = (failed == 0).then_some(want);
    }
}

/// Deletes the conntrack entries (both directions) whose endpoint is not in `served`; returns
/// how many flows went.
fn sweep(ct: &mut Conntrack, served: &BTreeSet<SocketAddr>) -> usize {
    let gone: Vec<(XdpFlowKey, XdpNat)> = ct
        .forward
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, nat)| nat.addr().is_some_and(|a| !served.contains(&a)))
        .collect();
    for (key, nat) in &gone {
        let _ = ct.forward.remove(key);
        let rkey = key.reply_of(nat);
        let _ = ct.reverse.remove(&rkey);
    }
    gone.len()
}

fn spawn_sweeper(
    ct: Arc<Mutex<Conntrack>>,
    fast: Arc<FastPath>,
    stop: Arc<AtomicBool>,
    vip_insert_errors: Arc<AtomicU64>,
) {
    let spawned = std::thread::Builder::new()
        .name("skiff-xdp-ct".into())
        .spawn(move || {
            let mut last: Option<BTreeSet<SocketAddr>> = None;
            let mut vip_state = VipSyncState::default();
            let mut again = false;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(SWEEP_EVERY);
                // Before the first apply the view is empty: sweeping against it would drop
                // every flow a previous skiff left in the pinned conntrack.
                if !fast.is_on() {
                    continue;
                }
                let view = fast.view();
                let want = vips(&view);
                if vip_state.due(&want) {
                    let mut guard = ct.lock().unwrap_or_else(|e| e.into_inner());
                    let sync = sync_vips(&mut guard.vips, &want);
                    drop(guard);
                    vip_insert_errors.fetch_add(sync.failed as u64, Ordering::Relaxed);
                    if sync.failed > 0 && !vip_state.retrying {
                        tracing::warn!(
                            map = MAP_VIP,
                            vips = want.len(),
                            failed = sync.failed,
                            error = sync.first_error.as_deref().unwrap_or(""),
                            "XDP echo replies: could not add every VIP; retrying every sweep"
                        );
                    } else if sync.failed == 0 && (sync.added > 0 || sync.removed > 0) {
                        tracing::info!(
                            vips = want.len(),
                            added = sync.added,
                            removed = sync.removed,
                            "XDP echo replies: VIP set updated"
                        );
                    }
                    vip_state.record(want, sync.failed);
                }
                let now = served(&view);
                let changed = last.as_ref() != Some(&now);
                // Sweep on every change and once more on the next round: a packet that read
                // the old generation just before the flip may have tracked a flow since.
                if changed || again {
                    again = changed;
                    let n = sweep(&mut ct.lock().unwrap_or_else(|e| e.into_inner()), &now);
                    if n > 0 {
                        tracing::info!(
                            flows = n,
                            "XDP conntrack: dropped flows of removed endpoints"
                        );
                    }
                }
                last = Some(now);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the XDP conntrack sweeper");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_counters_sum_and_vips_name_their_protocol() {
        let a = XdpCounters {
            packets: 1,
            bytes: 60,
            flows: 1,
            no_endpoint: 0,
            reply_packets: 2,
            reply_bytes: 120,
        };
        let s = sum([a, a].iter());
        assert_eq!(
            (s.packets, s.bytes, s.flows, s.reply_packets),
            (2, 120, 2, 4)
        );
        let vip = XdpVipKey::v4(u32::from_ne_bytes([10, 96, 0, 1]), 80u16.to_be(), 17);
        assert_eq!(vip_name(&vip).as_deref(), Some("udp:10.96.0.1:80"));
    }

    #[test]
    fn echo_vip_keys_round_trip_in_network_order() {
        let v4: IpAddr = "10.96.0.100".parse().unwrap();
        let k = XdpAddrKey::new(v4);
        assert_eq!(k.addr_be[0], u32::from_ne_bytes([10, 96, 0, 100]));
        assert_eq!((k.addr_be[1], k.family), (0, skiff_common::AF_INET as u8));
        assert_eq!(k.ip(), Some(v4));
        let v6: IpAddr = "fd00:96::100".parse().unwrap();
        let k6 = XdpAddrKey::new(v6);
        assert_eq!(k6.addr_be[0], u32::from_ne_bytes([0xfd, 0, 0, 0x96]));
        assert_eq!(k6.ip(), Some(v6));
    }

    #[test]
    fn a_vip_set_left_incomplete_is_synced_again_until_it_completes() {
        let a: BTreeSet<IpAddr> = ["10.96.0.1".parse().unwrap()].into();
        let b: BTreeSet<IpAddr> = ["10.96.0.2".parse().unwrap()].into();
        let mut st = VipSyncState::default();
        assert!(st.due(&a), "the first set is written");
        st.record(a.clone(), 0);
        assert!(!st.due(&a), "an unchanged, complete set is not rewritten");
        assert!(st.due(&b), "a changed set is written");
        st.record(b.clone(), 1);
        assert!(
            st.due(&b),
            "a failed insert is retried with the set unchanged"
        );
        st.record(b.clone(), 1);
        assert!(st.due(&b), "and again while it fails");
        st.record(b.clone(), 0);
        assert!(!st.due(&b), "until a sync completes");
        assert!(st.due(&a));
    }

    #[test]
    fn an_unknown_interface_is_a_config_error() {
        assert!(matches!(
            ifindex("skiff-no-such-if"),
            Err(BpfError::Config(_))
        ));
    }
}
