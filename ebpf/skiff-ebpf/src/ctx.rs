//! Context accessors: the only place that knows each context's byte-order quirks.
//!
//! - `bpf_sock_addr`: `user_ip4` / `user_ip6[i]` network order; `user_port` is a network-order
//!   u16 in the low 16 bits of a u32 (4-byte loads and stores only).
//! - `bpf_sock_ops`: `local_port` HOST order; `remote_port` network order in the HIGH 16 bits.
//! - `bpf_sock` (getsockopt's socket): `src_port` HOST order; `dst_port` a network-order u16.
//!
//! Arrays in a context are read and written one word at a time with volatile accesses, so LLVM
//! keeps a single 4-byte access at a constant offset (otherwise the verifier rejects a
//! modified context pointer).

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
};

#[inline(always)]
fn read_words(p: *const [u32; 4]) -> [u32; 4] {
    // SAFETY: `p` points into a verifier-checked context; each word is one 4-byte load.
    unsafe {
        [
            read_volatile(&raw const (*p)[0]),
            read_volatile(&raw const (*p)[1]),
            read_volatile(&raw const (*p)[2]),
            read_volatile(&raw const (*p)[3]),
        ]
    }
}

// === sock_addr (connect4/6) ===

/// `bpf_sock_addr` of connect4/connect6.
pub struct SockAddr<'a>(pub &'a SockAddrContext);

impl SockAddr<'_> {
    /// Socket protocol (host order).
    #[inline(always)]
    pub fn protocol(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { read_volatile(&raw const (*self.0.sock_addr).protocol) }
    }

    /// Destination IPv4 address, network order.
    #[inline(always)]
    pub fn dst_ip4_be(&self) -> u32 {
        // SAFETY: as above.
        unsafe { read_volatile(&raw const (*self.0.sock_addr).user_ip4) }
    }

    /// Destination IPv6 address, network-order words.
    #[inline(always)]
    pub fn dst_ip6_be(&self) -> [u32; 4] {
        // SAFETY: as above.
        read_words(unsafe { &raw const (*self.0.sock_addr).user_ip6 })
    }

    /// Destination port, network order.
    #[inline(always)]
    pub fn dst_port_be(&self) -> u16 {
        // SAFETY: as above. The low 16 bits hold the network-order port.
        unsafe { read_volatile(&raw const (*self.0.sock_addr).user_port) as u16 }
    }

    /// Rewrites the destination to an IPv4 address and port (both network order).
    #[inline(always)]
    pub fn set_dst4(&self, ip_be: u32, port_be: u16) {
        // SAFETY: as above; connect4 may write user_ip4 and user_port (4-byte stores).
        unsafe {
            write_volatile(&raw mut (*self.0.sock_addr).user_ip4, ip_be);
            write_volatile(&raw mut (*self.0.sock_addr).user_port, u32::from(port_be));
        }
    }

    /// Rewrites the destination to an IPv6 address and port (network order).
    #[inline(always)]
    pub fn set_dst6(&self, ip_be: [u32; 4], port_be: u16) {
        // SAFETY: as above; connect6 may write user_ip6[i] and user_port (4-byte stores).
        unsafe {
            let sa = self.0.sock_addr;
            write_volatile(&raw mut (*sa).user_ip6[0], ip_be[0]);
            write_volatile(&raw mut (*sa).user_ip6[1], ip_be[1]);
            write_volatile(&raw mut (*sa).user_ip6[2], ip_be[2]);
            write_volatile(&raw mut (*sa).user_ip6[3], ip_be[3]);
            write_volatile(&raw mut (*sa).user_port, u32::from(port_be));
        }
    }

    /// The socket's SO_MARK.
    #[inline(always)]
    pub fn sk_mark(&self) -> u32 {
        // SAFETY: `sk` in a sock_addr context is a non-null socket pointer (PTR_TO_SOCKET).
        unsafe {
            let sk = read_volatile(&raw const (*self.0.sock_addr).__bindgen_anon_1.sk);
            read_volatile(&raw const (*sk).mark)
        }
    }

    /// The socket cookie (also seen by sock_ops for the same socket).
    #[inline(always)]
    pub fn socket_cookie(&self) -> u64 {
        // SAFETY: helper call with the program's own context.
        unsafe { bpf_get_socket_cookie(self.0.as_ptr()) }
    }

    /// The socket's bound source IPv4 address, network order (0 when not bound yet: the
    /// kernel picks it after connect4).
    #[inline(always)]
    pub fn src_ip4_be(&self) -> u32 {
        // SAFETY: as `sk_mark`.
        unsafe {
            let sk = read_volatile(&raw const (*self.0.sock_addr).__bindgen_anon_1.sk);
            read_volatile(&raw const (*sk).src_ip4)
        }
    }

    /// The socket's network namespace cookie.
    #[inline(always)]
    pub fn netns_cookie(&self) -> u64 {
        // SAFETY: helper call with the program's own context.
        unsafe { bpf_get_netns_cookie(self.0.as_ptr()) }
    }
}

// === sock_ops ===

/// `bpf_sock_ops` of the client's connecting socket.
pub struct SockOps<'a>(pub &'a SockOpsContext);

impl SockOps<'_> {
    /// `AF_INET` or `AF_INET6` (host order).
    #[inline(always)]
    pub fn family(&self) -> u32 {
        self.0.family()
    }

    /// Local (client) IPv4 address, network order.
    #[inline(always)]
    pub fn local_ip4_be(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { read_volatile(&raw const (*self.0.ops).local_ip4) }
    }

    /// Remote (listener) IPv4 address, network order.
    #[inline(always)]
    pub fn remote_ip4_be(&self) -> u32 {
        // SAFETY: as above.
        unsafe { read_volatile(&raw const (*self.0.ops).remote_ip4) }
    }

    /// Local IPv6 address, network-order words.
    #[inline(always)]
    pub fn local_ip6_be(&self) -> [u32; 4] {
        // SAFETY: as above.
        read_words(unsafe { &raw const (*self.0.ops).local_ip6 })
    }

    /// Remote IPv6 address, network-order words.
    #[inline(always)]
    pub fn remote_ip6_be(&self) -> [u32; 4] {
        // SAFETY: as above.
        read_words(unsafe { &raw const (*self.0.ops).remote_ip6 })
    }

    /// Local port, network order (the context holds it in host order).
    #[inline(always)]
    pub fn local_port_be(&self) -> u16 {
        // SAFETY: as above.
        (unsafe { read_volatile(&raw const (*self.0.ops).local_port) } as u16).to_be()
    }

    /// Remote port, network order (the context holds it in the high 16 bits).
    #[inline(always)]
    pub fn remote_port_be(&self) -> u16 {
        // SAFETY: as above.
        (unsafe { read_volatile(&raw const (*self.0.ops).remote_port) } >> 16) as u16
    }

    /// The socket cookie (the same value connect4/6 saw).
    #[inline(always)]
    pub fn socket_cookie(&self) -> u64 {
        // SAFETY: helper call with the program's own context.
        unsafe { bpf_get_socket_cookie(self.0.as_ptr()) }
    }

    /// The socket's network namespace cookie.
    #[inline(always)]
    pub fn netns_cookie(&self) -> u64 {
        // SAFETY: helper call with the program's own context.
        unsafe { bpf_get_netns_cookie(self.0.as_ptr()) }
    }
}

// === sockopt (getsockopt) ===

/// `bpf_sockopt` of a getsockopt on a socket in the hooked cgroup.
pub struct Sockopt<'a>(pub &'a SockoptContext);

impl Sockopt<'_> {
    /// `level` argument of getsockopt.
    #[inline(always)]
    pub fn level(&self) -> i32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { read_volatile(&raw const (*self.0.sockopt).level) }
    }

    /// `optname` argument of getsockopt.
    #[inline(always)]
    pub fn optname(&self) -> i32 {
        // SAFETY: as above.
        unsafe { read_volatile(&raw const (*self.0.sockopt).optname) }
    }

    #[inline(always)]
    fn sk(&self) -> *mut aya_ebpf::bindings::bpf_sock {
        // SAFETY: as above; `sk` is a non-null socket pointer in a sockopt context.
        unsafe { read_volatile(&raw const (*self.0.sockopt).__bindgen_anon_1.sk) }
    }

    /// The socket's family (host order).
    #[inline(always)]
    pub fn family(&self) -> u32 {
        // SAFETY: `sk` is valid (see `sk`).
        unsafe { read_volatile(&raw const (*self.sk()).family) }
    }

    /// Local port (the listener's), host order.
    #[inline(always)]
    pub fn local_port_host(&self) -> u16 {
        // SAFETY: as above.
        unsafe { read_volatile(&raw const (*self.sk()).src_port) as u16 }
    }

    /// Local port, network order.
    #[inline(always)]
    pub fn local_port_be(&self) -> u16 {
        self.local_port_host().to_be()
    }

    /// Remote (client) port, network order.
    #[inline(always)]
    pub fn remote_port_be(&self) -> u16 {
        // SAFETY: as above.
        unsafe { read_volatile(&raw const (*self.sk()).dst_port) }
    }

    /// Local IPv4 address, network order.
    #[inline(always)]
    pub fn local_ip4_be(&self) -> u32 {
        // SAFETY: as above.
        unsafe { read_volatile(&raw const (*self.sk()).src_ip4) }
    }

    /// Remote IPv4 address, network order.
    #[inline(always)]
    pub fn remote_ip4_be(&self) -> u32 {
        // SAFETY: as above.
        unsafe { read_volatile(&raw const (*self.sk()).dst_ip4) }
    }

    /// Local IPv6 address, network-order words.
    #[inline(always)]
    pub fn local_ip6_be(&self) -> [u32; 4] {
        // SAFETY: as above.
        read_words(unsafe { &raw const (*self.sk()).src_ip6 })
    }

    /// Remote IPv6 address, network-order words.
    #[inline(always)]
    pub fn remote_ip6_be(&self) -> [u32; 4] {
        // SAFETY: as above.
        read_words(unsafe { &raw const (*self.sk()).dst_ip6 })
    }

    /// The socket's network namespace cookie.
    #[inline(always)]
    pub fn netns_cookie(&self) -> u64 {
        // SAFETY: helper call with the program's own context.
        unsafe { bpf_get_netns_cookie(self.0.as_ptr()) }
    }

    /// The option buffer if it holds at least `N` bytes.
    #[inline(always)]
    pub fn optval<const N: usize>(&self) -> Option<*mut u8> {
        // SAFETY: as above; the bounds check below is what the verifier requires.
        unsafe {
            let start =
                read_volatile(&raw const (*self.0.sockopt).__bindgen_anon_2.optval) as *mut u8;
            let end =
                read_volatile(&raw const (*self.0.sockopt).__bindgen_anon_3.optval_end) as *mut u8;
            if start.wrapping_add(N) > end {
                None
            } else {
                Some(start)
            }
        }
    }

    /// Sets the length the caller sees and clears the error (separate 4-byte stores: LLVM
    /// would merge plain ones into one 8-byte store, which the verifier rejects).
    #[inline(always)]
    pub fn set_answer_len(&self, len: i32) {
        // SAFETY: as above; `optlen` and `retval` are writable in getsockopt.
        unsafe {
            write_volatile(&raw mut (*self.0.sockopt).optlen, len);
            write_volatile(&raw mut (*self.0.sockopt).retval, 0);
        }
    }

    /// Makes getsockopt fail with `-errno`.
    #[inline(always)]
    pub fn set_error(&self, errno: i32) {
        // SAFETY: as above.
        unsafe { write_volatile(&raw mut (*self.0.sockopt).retval, -errno) }
    }
}
