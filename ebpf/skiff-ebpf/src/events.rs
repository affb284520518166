//! Kernel events: connect4/6 report fast-path connects and fail-open / fail-closed decisions
//! into a ring buffer that `bpf::events` drains. Bounded per CPU by a token bucket; an event
//! that finds the bucket empty or the ring full is counted lost, never waited for. Emitting
//! never changes a connect's verdict.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use skiff_common::{
    OrigDstValue,
    events::{
        EventConfig, KernelEvent, LOST_COUNT, LOST_RATE_LIMITED, LOST_RING_FULL, TokenBucket,
        take_token,
    },
};

use crate::ctx::SockAddr;

/// Connect events. Ring buffer; byte size set by userspace at load (default 256 KiB, 3276
/// events). Writer: connect4/6 (`emit`). Readers: userspace `bpf::events`.
#[map]
pub static SKIFF_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Event rate limit. Key: u32 index 0; value: `EventConfig`; max 1; not LRU. Writer:
/// userspace loader (install). Readers: connect4/6.
#[map]
pub static SKIFF_EV_CFG: Array<EventConfig> = Array::with_max_entries(1, 0);

/// Token buckets. Key: u32 index 0; value: `TokenBucket` per CPU; max 1. Writer: connect4/6.
/// Readers: connect4/6.
#[map]
pub static SKIFF_EV_BUCKET: PerCpuArray<TokenBucket> = PerCpuArray::with_max_entries(1, 0);

/// Events not written. Key: u32 `LOST_RING_FULL` / `LOST_RATE_LIMITED`; value: u64 per CPU;
/// max `LOST_COUNT`. Writer: connect4/6. Readers: userspace (`skiff.bpf.events.lost`).
#[map]
pub static SKIFF_EV_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_COUNT, 0);

/// The decision's facts, filled in by the caller.
pub struct Emit {
    pub verdict: u8,
    pub family: u8,
    pub scope: u32,
    pub orig: OrigDstValue,
    pub ep_ip_be: [u32; 4],
    pub ep_port_be: u16,
}

/// Writes one event if the CPU's bucket has a token and the ring has room; else counts it
/// lost. Off (rate 0 or no config) costs one array lookup.
#[inline(always)]
pub fn emit(sa: &SockAddr<'_>, e: Emit) {
    let Some(cfg) = SKIFF_EV_CFG.get(0).copied() else {
        return;
    };
    if cfg.rate_per_sec == 0 {
        return;
    }
    let Some(b) = SKIFF_EV_BUCKET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot from a successful lookup; no other program runs on this CPU's
    // slot meanwhile.
    if !take_token(unsafe { &mut *b }, now, &cfg) {
        lost(LOST_RATE_LIMITED);
        return;
    }
    let Some(mut entry) = SKIFF_EVENTS.reserve::<KernelEvent>(0) else {
        lost(LOST_RING_FULL);
        return;
    };
    entry.write(KernelEvent {
        time_ns: now,
        cookie: sa.socket_cookie(),
        netns_cookie: sa.netns_cookie(),
        // SAFETY: plain helper call.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        orig_ip_be: e.orig.ip_be,
        ep_ip_be: e.ep_ip_be,
        scope: e.scope,
        orig_port_be: e.orig.port_be,
        ep_port_be: e.ep_port_be,
        family: e.family,
        verdict: e.verdict,
        _pad: [0; 6],
    });
    // Waking the reader costs more than the rest of connect4 together (measured ~9 us per
    // submit on 6.18): submit silently and wake it only once a backlog builds up; the reader
    // also drains on a timer.
    let flags = if SKIFF_EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKE_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags);
}

/// `bpf_ringbuf_submit` flag: do not wake the reader.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// `bpf_ringbuf_submit` flag: wake the reader.
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `bpf_ringbuf_query` flag: bytes not yet consumed.
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Backlog at which a submit wakes the reader: 32 KiB, about 370 events (an eighth of the
/// default ring), so a burst wakes it long before the ring fills.
const WAKE_BYTES: u64 = 32 * 1024;

#[inline(always)]
fn lost(why: u32) {
    if let Some(p) = SKIFF_EV_LOST.get_ptr_mut(why) {
        // SAFETY: per-CPU slot from a successful lookup.
        unsafe { *p += 1 }
    }
}
