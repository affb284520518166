//! skiff's kernel programs: outbound capture without iptables.
//!
//! - `connect.rs`: `cgroup/connect4` and `cgroup/connect6` rewrite captured TCP connects to the
//!   proxy's outbound listener and record the original destination by socket cookie; a plain-L4
//!   service found in `SKIFF_SVC4_V2` goes straight to an endpoint chosen in the kernel.
//!   `cgroup/sendmsg4` and `cgroup/recvmsg4` (same file) do that per datagram for UDP services
//!   (connected UDP goes through connect4) and show replies as coming from the VIP.
//! - `sock_ops.rs`: at `TCP_CONNECT_CB` re-keys that record by the connection tuple (plus netns
//!   cookie) and deletes it when the socket reaches `TCP_CLOSE`.
//! - `getsockopt.rs`: `cgroup/getsockopt` answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` on the
//!   proxy's accepted sockets, as iptables REDIRECT would.
//! - `getpeername.rs`: `cgroup/getpeername4` answers the address the app connected to (the
//!   service VIP) on fast-path sockets, as iptables DNAT would.
//! - `sockmap.rs` (`--sockmap`): `sock_ops` adds policy-selected local sockets to a SOCKHASH at
//!   establishment and `sk_msg` moves their payload straight to the peer socket.
//! - `sk_lookup.rs` (`--capture-inbound`): steers connections for the pod's addresses to the
//!   proxy's inbound listener (its maps live beside it).
//! - `events.rs`: the ring buffer connect4/6 report fast-path connects and fail-open /
//!   fail-closed decisions into, rate-limited per CPU (its maps live beside it).
//! - `xdp.rs` (`--xdp IFACE`): node-ingress L4 load balancer for the fast path's services
//!   (DNAT to an endpoint, conntrack, reply SNAT, FIB redirect); its maps live beside it.
//! - `maps.rs`: every other map; `ctx.rs`: context byte-order quirks.
//!
//! Every hook fails open: on an internal error the syscall proceeds unchanged and a per-CPU
//! counter (`SKIFF_STATS`, indexed by `skiff_common::reason`) records why.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The BPF target has no atomic read-modify-write types in `core`; the intrinsic lowers to the
// BPF atomic add instruction (see `maps::atomic_add`).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod events;
#[cfg(target_arch = "bpf")]
mod getpeername;
#[cfg(target_arch = "bpf")]
mod getsockopt;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod sock_ops;
#[cfg(target_arch = "bpf")]
mod sockmap;
#[cfg(target_arch = "bpf")]
mod xdp;

/// The host build of this bin is empty: it only exists so `cargo build --workspace` works.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// GPL: needed for the helpers skiff calls (socket and netns cookies, aya-log's perf output).
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
