//! Kernel events: what connect4/6 decided for one connect, sent to userspace through the
//! `SKIFF_EVENTS` ring buffer, and the per-CPU token bucket that bounds how many are written.
//!
//! The bucket math is a plain function ([`take_token`]) so host tests run the code the kernel
//! runs. Time is `bpf_ktime_get_ns` (CLOCK_MONOTONIC) in both.

/// The connect went straight to an endpoint chosen in the kernel (fast path).
pub const VERDICT_FAST_PATH: u8 = 1;
/// The proxy was not listening; the connect went to its original destination (fail open).
pub const VERDICT_PROXY_DOWN_OPEN: u8 = 2;
/// The proxy was not listening; the connect was refused (fail closed).
pub const VERDICT_PROXY_DOWN_CLOSED: u8 = 3;
/// The proxy was not ready yet; the connect went to its original destination (fail open).
pub const VERDICT_NOT_READY_OPEN: u8 = 4;
/// The proxy was not ready yet; the connect was refused (fail closed).
pub const VERDICT_NOT_READY_CLOSED: u8 = 5;

/// Index in `SKIFF_EV_LOST`: the ring buffer had no room (userspace reads too slowly).
pub const LOST_RING_FULL: u32 = 0;
/// Index in `SKIFF_EV_LOST`: the CPU's token bucket was empty (rate limit).
pub const LOST_RATE_LIMITED: u32 = 1;
/// Number of `SKIFF_EV_LOST` slots.
pub const LOST_COUNT: u32 = 2;

/// Nanoseconds per second: one token is worth this much bucket credit per unit of rate.
pub const NS_PER_SEC: u64 = 1_000_000_000;
/// Longest idle time the bucket credits at once. Keeps `elapsed * rate` inside a u64 for any
/// rate up to [`MAX_RATE`]; a bucket whose `burst / rate` exceeds this refills more slowly
/// after a long pause, never faster.
pub const MAX_REFILL_NS: u64 = 10 * NS_PER_SEC;
/// Highest events per second per CPU userspace may configure.
pub const MAX_RATE: u64 = 100_000_000;
/// Largest burst userspace may configure (keeps `burst * NS_PER_SEC` inside a u64).
pub const MAX_BURST: u64 = 1_000_000_000;

/// One connect decision, as written by connect4/6 into `SKIFF_EVENTS`.
///
/// Addresses are network-order words (v4 uses word 0 only), like [`crate::OrigDstValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelEvent {
    /// `bpf_ktime_get_ns()` at the decision (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// The connecting socket's cookie.
    pub cookie: u64,
    /// Its network namespace's cookie.
    pub netns_cookie: u64,
    /// The calling task's cgroup id.
    pub cgroup_id: u64,
    /// The address the application connected to.
    pub orig_ip_be: [u32; 4],
    /// The endpoint the kernel chose (zero unless [`VERDICT_FAST_PATH`]).
    pub ep_ip_be: [u32; 4],
    /// The fast-path scope the service was found in (0 otherwise).
    pub scope: u32,
    /// Port the application connected to, network order.
    pub orig_port_be: u16,
    /// The endpoint's port, network order.
    pub ep_port_be: u16,
    /// `AF_INET` (also for v4-mapped IPv6 sockets) or `AF_INET6`.
    pub family: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<KernelEvent>() == 80);
const _: () = assert!(core::mem::align_of::<KernelEvent>() == 8);

/// Rate limit of kernel events, per CPU: the single entry of `SKIFF_EV_CFG`.
/// `rate_per_sec == 0` turns events off (nothing written, nothing counted lost).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventConfig {
    /// Sustained events per second per CPU (at most [`MAX_RATE`]).
    pub rate_per_sec: u64,
    /// Events a CPU may write back to back after an idle period (at most [`MAX_BURST`]).
    pub burst: u64,
}
const _: () = assert!(core::mem::size_of::<EventConfig>() == 16);

/// One CPU's token bucket (value of `SKIFF_EV_BUCKET`, per CPU). Zeroed means "never used":
/// the first event finds it full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TokenBucket {
    /// Credit in token-nanoseconds: one event costs [`NS_PER_SEC`]; time adds `rate` per ns.
    pub credit: u64,
    /// When the credit was last brought up to date (`bpf_ktime_get_ns`).
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<TokenBucket>() == 16);

/// Takes one token from `b` at `now_ns` under `cfg`: `true` if the event may be written.
/// Integer-only and branch-light so the verifier accepts it; the clock going backwards (a
/// different CPU's timestamp never reaches this CPU's bucket, but be safe) credits nothing.
#[inline(always)]
pub fn take_token(b: &mut TokenBucket, now_ns: u64, cfg: &EventConfig) -> bool {
    let rate = if cfg.rate_per_sec > MAX_RATE {
        MAX_RATE
    } else {
        cfg.rate_per_sec
    };
    let burst = if cfg.burst > MAX_BURST {
        MAX_BURST
    } else {
        cfg.burst
    };
    let cap = burst * NS_PER_SEC;
    let mut elapsed = now_ns.saturating_sub(b.last_ns);
    if elapsed > MAX_REFILL_NS {
        elapsed = MAX_REFILL_NS;
    }
    let mut credit = b.credit.saturating_add(elapsed * rate);
    if credit > cap {
        credit = cap;
    }
    // Never move the clock back: a later, larger `now` must not be credited twice.
    if now_ns > b.last_ns {
        b.last_ns = now_ns;
    }
    if credit >= NS_PER_SEC {
        b.credit = credit - NS_PER_SEC;
        true
    } else {
        b.credit = credit;
        false
    }
}

#[cfg(feature = "user")]
mod user {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    // SAFETY: repr(C), only integer fields, explicit padding: every bit pattern is valid and
    // there are no uninitialised bytes.
    unsafe impl aya::Pod for KernelEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TokenBucket {}

    fn addr(family: u8, ip_be: [u32; 4], port_be: u16) -> SocketAddr {
        let port = u16::from_be(port_be);
        if u32::from(family) == crate::AF_INET6 {
            let mut b = [0u8; 16];
            for (i, w) in ip_be.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip_be[0].to_ne_bytes())), port)
        }
    }

    impl KernelEvent {
        /// Decodes one ring-buffer record; `None` if it is not exactly one event.
        pub fn from_bytes(b: &[u8]) -> Option<KernelEvent> {
            if b.len() != core::mem::size_of::<KernelEvent>() {
                return None;
            }
            // SAFETY: the length matches, every bit pattern is a valid KernelEvent, and
            // `read_unaligned` needs no alignment of the ring's bytes.
            Some(unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<KernelEvent>()) })
        }

        /// The address the application connected to.
        pub fn orig_dst(&self) -> SocketAddr {
            addr(self.family, self.orig_ip_be, self.orig_port_be)
        }

        /// The endpoint the kernel chose (fast path only).
        pub fn endpoint(&self) -> Option<SocketAddr> {
            (self.verdict == VERDICT_FAST_PATH)
                .then(|| addr(self.family, self.ep_ip_be, self.ep_port_be))
        }

        /// The event's bytes as the kernel writes them (for tests and replay).
        pub fn to_bytes(&self) -> [u8; core::mem::size_of::<KernelEvent>()] {
            // SAFETY: repr(C) with explicit padding: every byte is initialised.
            unsafe { core::mem::transmute_copy(self) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: u64, burst: u64) -> EventConfig {
        EventConfig {
            rate_per_sec: rate,
            burst,
        }
    }

    #[test]
    fn a_fresh_bucket_allows_a_burst_then_refuses() {
        let c = cfg(10, 5);
        let mut b = TokenBucket::default();
        let now = 1_000 * NS_PER_SEC;
        let taken = (0..20).filter(|_| take_token(&mut b, now, &c)).count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn tokens_come_back_at_the_rate() {
        let c = cfg(10, 5);
        let mut b = TokenBucket::default();
        let t0 = 50 * NS_PER_SEC;
        while take_token(&mut b, t0, &c) {}
        // 10/s: one token per 100 ms.
        assert!(!take_token(&mut b, t0 + 99_000_000, &c));
        assert!(take_token(&mut b, t0 + 100_000_000, &c));
        assert!(!take_token(&mut b, t0 + 100_000_000, &c));
        // One second later: 10 tokens, capped at the burst of 5.
        let t1 = t0 + 2 * NS_PER_SEC;
        assert_eq!((0..20).filter(|_| take_token(&mut b, t1, &c)).count(), 5);
    }

    #[test]
    fn zero_rate_never_allows_and_the_clock_going_back_credits_nothing() {
        let mut b = TokenBucket::default();
        assert!(!take_token(&mut b, 5 * NS_PER_SEC, &cfg(0, 100)));
        let c = cfg(1, 1);
        let mut b = TokenBucket::default();
        assert!(take_token(&mut b, 100 * NS_PER_SEC, &c));
        assert!(!take_token(&mut b, 10 * NS_PER_SEC, &c));
        assert!(!take_token(&mut b, 100 * NS_PER_SEC, &c));
    }

    #[test]
    fn extreme_settings_do_not_overflow() {
        let c = cfg(u64::MAX, u64::MAX);
        let mut b = TokenBucket::default();
        assert!(take_token(&mut b, u64::MAX, &c));
        assert!(take_token(&mut b, u64::MAX, &c));
    }

    #[cfg(feature = "user")]
    #[test]
    fn decodes_what_the_kernel_writes() {
        use std::net::SocketAddr;
        let ev = KernelEvent {
            time_ns: 7,
            cookie: 42,
            netns_cookie: 4096,
            cgroup_id: 99,
            orig_ip_be: [u32::from_ne_bytes([10, 96, 0, 1]), 0, 0, 0],
            ep_ip_be: [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0],
            scope: 3,
            orig_port_be: 80u16.to_be(),
            ep_port_be: 8080u16.to_be(),
            family: crate::AF_INET as u8,
            verdict: VERDICT_FAST_PATH,
            _pad: [0; 6],
        };
        let back = KernelEvent::from_bytes(&ev.to_bytes()).unwrap();
        assert_eq!(back, ev);
        assert_eq!(
            back.orig_dst(),
            "10.96.0.1:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(back.endpoint(), Some("127.0.0.2:8080".parse().unwrap()));
        assert_eq!(KernelEvent::from_bytes(&[0u8; 79]), None);
        let v6 = KernelEvent {
            family: crate::AF_INET6 as u8,
            orig_ip_be: [
                u32::from_ne_bytes([0xfd, 0, 0, 0x96]),
                0,
                0,
                u32::from_ne_bytes([0, 0, 0, 1]),
            ],
            verdict: VERDICT_PROXY_DOWN_OPEN,
            ..back
        };
        assert_eq!(
            v6.orig_dst(),
            "[fd00:96::1]:80".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(v6.endpoint(), None);
    }
}
