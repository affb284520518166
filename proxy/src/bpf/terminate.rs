//! `--terminate-on-removal`: once an update takes an endpoint out of the kernel fast path
//! (removed, or no longer eligible), the application's fast-path sockets still connected to it
//! are destroyed with netlink `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`): the kernel aborts
//! them (`tcp_abort`), the peer gets a RST and the application ECONNABORTED, as Cilium's socket
//! load balancer does for deleted backends.
//!
//! Only sockets the fast path connected are touched: their cookies are in `SKIFF_FAST_SK`
//! (connect4 records them, sock_ops forgets them at TCP_CLOSE). The dump runs in skiff's own
//! network namespace, which in sidecar mode is the application's.

use std::collections::{BTreeSet, HashSet};
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

use super::projection::MapImage;

/// IPv4 endpoints the fast path could reach before (`old`) and cannot any more (`new`).
/// (IPv6 fast-path sockets are not destroyed yet: the dump below is IPv4 only.)
pub fn removed_endpoints(old: &MapImage, new: &MapImage) -> BTreeSet<SocketAddrV4> {
    let v4 = |e: &SocketAddr| match e {
        SocketAddr::V4(a) => Some(*a),
        SocketAddr::V6(_) => None,
    };
    let now: BTreeSet<SocketAddrV4> = new
        .clusters
        .values()
        .flat_map(|c| c.endpoints.iter().filter_map(v4))
        .collect();
    old.clusters
        .values()
        .flat_map(|c| c.endpoints.iter().filter_map(v4))
        .filter(|e| !now.contains(e))
        .collect()
}

// Netlink sock_diag ABI (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, `inet_diag_sockid`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` up to and including its `inet_diag_sockid`.
const MSG_ID_END: usize = 52;
/// Every TCP state but LISTEN (1 << TCP_LISTEN = 1 << 10).
const STATES_BUT_LISTEN: u32 = 0xFFF & !(1 << 10);

/// A TCP socket as `inet_diag` names it (what `SOCK_DESTROY` needs to find it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSock {
    /// Local address.
    pub src: SocketAddrV4,
    /// Remote address.
    pub dst: SocketAddrV4,
    /// Bound interface index.
    pub ifindex: u32,
    /// Socket cookie (the value `bpf_get_socket_cookie` returns).
    pub cookie: u64,
}

/// Destroys this network namespace's IPv4 TCP sockets connected to one of `endpoints` whose
/// cookie is in `cookies`; returns how many were destroyed.
pub fn destroy_sockets(
    endpoints: &BTreeSet<SocketAddrV4>,
    cookies: &HashSet<u64>,
) -> io::Result<usize> {
    if endpoints.is_empty() || cookies.is_empty() {
        return Ok(0);
    }
    let victims: Vec<DiagSock> = dump_tcp4()?
        .into_iter()
        .filter(|s| endpoints.contains(&s.dst) && cookies.contains(&s.cookie))
        .collect();
    let sock = netlink()?;
    let mut destroyed = 0;
    for (seq, v) in victims.iter().enumerate() {
        let msg = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            seq as u32 + 1,
            Some(v),
        );
        (&sock).write_all_nl(&msg)?;
        match read_ack(&sock)? {
            0 => destroyed += 1,
            // Closed in the meantime.
            e if e == -libc::ENOENT => {}
            e => {
                return Err(io::Error::from_raw_os_error(-e));
            }
        }
    }
    Ok(destroyed)
}

/// Every IPv4 TCP socket (but listeners) of this network namespace.
pub fn dump_tcp4() -> io::Result<Vec<DiagSock>> {
    let sock = netlink()?;
    (&sock).write_all_nl(&request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        1,
        None,
    ))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = (&sock).read(&mut buf)?;
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < NLMSG_HDR || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "sock_diag: truncated netlink message",
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(word(&buf, at + NLMSG_HDR));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + MSG_ID_END => {
                    out.push(parse_msg(&buf[at + NLMSG_HDR..at + len]));
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            at += (len + 3) & !3;
        }
    }
}

fn netlink() -> io::Result<Socket> {
    Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::DGRAM,
        Some(Protocol::from(NETLINK_SOCK_DIAG)),
    )
}

/// An unconnected netlink socket sends to the kernel (port id 0).
trait SendNl {
    fn write_all_nl(self, msg: &[u8]) -> io::Result<()>;
}

impl SendNl for &Socket {
    fn write_all_nl(self, msg: &[u8]) -> io::Result<()> {
        let n = self.send(msg)?;
        if n != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "sock_diag: short netlink send",
            ));
        }
        Ok(())
    }
}

/// The errno of the next netlink ACK (0 = success, negative errno otherwise).
fn read_ack(sock: &Socket) -> io::Result<i32> {
    let mut buf = [0u8; 512];
    let mut s = sock;
    let n = s.read(&mut buf)?;
    if n < NLMSG_HDR + 4 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "sock_diag: expected a netlink ACK",
        ));
    }
    Ok(i32::from_ne_bytes(word(&buf, NLMSG_HDR)))
}

/// A sock_diag request: a dump of every IPv4 TCP socket, or (`id`) one socket.
fn request(kind: u16, flags: u16, seq: u32, id: Option<&DiagSock>) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2
    m.push(libc::AF_INET as u8);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(0); // ext
    m.push(0); // pad
    m.extend_from_slice(&STATES_BUT_LISTEN.to_ne_bytes());
    // inet_diag_sockid: ports and addresses in network order, the rest host order.
    let (sport, dport, src, dst, ifindex, cookie) = match id {
        Some(s) => (
            s.src.port(),
            s.dst.port(),
            s.src.ip().octets(),
            s.dst.ip().octets(),
            s.ifindex,
            s.cookie,
        ),
        // A dump with zero ports and cookie matches every socket.
        None => (0, 0, [0; 4], [0; 4], 0, 0),
    };
    m.extend_from_slice(&sport.to_be_bytes());
    m.extend_from_slice(&dport.to_be_bytes());
    m.extend_from_slice(&src);
    m.extend_from_slice(&[0; 12]);
    m.extend_from_slice(&dst);
    m.extend_from_slice(&[0; 12]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&(cookie as u32).to_ne_bytes());
    m.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    debug_assert_eq!(m.len(), len);
    m
}

/// Parses the `inet_diag_sockid` of one `inet_diag_msg`.
fn parse_msg(b: &[u8]) -> DiagSock {
    // family, state, timer, retrans, then the id at offset 4.
    let id = &b[4..MSG_ID_END];
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let src = Ipv4Addr::new(id[4], id[5], id[6], id[7]);
    let dst = Ipv4Addr::new(id[20], id[21], id[22], id[23]);
    let ifindex = u32::from_ne_bytes(word(id, 36));
    let lo = u32::from_ne_bytes(word(id, 40));
    let hi = u32::from_ne_bytes(word(id, 44));
    DiagSock {
        src: SocketAddrV4::new(src, sport),
        dst: SocketAddrV4::new(dst, dport),
        ifindex,
        cookie: u64::from(lo) | u64::from(hi) << 32,
    }
}

fn word(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(word(b, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::projection::{ClusterImage, FastLb};

    fn image(eps: &[&str]) -> MapImage {
        let mut m = MapImage::default();
        m.clusters.insert(
            "c".into(),
            ClusterImage {
                lb: FastLb::RoundRobin,
                endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
                weights: vec![1; eps.len()],
                shares: false,
            },
        );
        m
    }

    #[test]
    fn removed_endpoints_are_the_ones_no_cluster_keeps() {
        let old = image(&["127.0.0.1:1", "127.0.0.2:1", "127.0.0.3:1"]);
        let new = image(&["127.0.0.1:1", "127.0.0.3:1", "127.0.0.4:1"]);
        let gone: Vec<String> = removed_endpoints(&old, &new)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(gone, ["127.0.0.2:1"]);
        assert!(removed_endpoints(&new, &new).is_empty());
    }

    #[test]
    fn requests_round_trip_through_the_diag_layout() {
        let s = DiagSock {
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:8080".parse().unwrap(),
            ifindex: 3,
            cookie: 0x1234_5678_9abc_def0,
        };
        let m = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 7, Some(&s));
        assert_eq!(m.len(), NLMSG_HDR + REQ_LEN);
        assert_eq!(u32_at(&m, 0) as usize, m.len());
        // An inet_diag_msg carries the same id at offset 4 (after family/state/timer/retrans);
        // the request carries it at offset 8 (after family/protocol/ext/pad/states).
        let mut msg = vec![0u8; 4];
        msg.extend_from_slice(&m[NLMSG_HDR + 8..]);
        assert_eq!(parse_msg(&msg), s);
    }
}
