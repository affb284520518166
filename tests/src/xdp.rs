//! Shared pieces of the XDP load balancer tests and bench: a routed topology of private
//! network namespaces (client -> node -> backends, veth pairs, addresses only inside them) and
//! the ethtool settings XDP on veth needs.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::process::Command;

use crate::{Netns, in_netns, run, veth_pair};

/// The service VIP the client connects to. It exists nowhere: no interface has it and only
/// the client's default route (through the node) leads towards it.
pub const VIP: &str = "10.96.0.100";
/// The client's address.
pub const CLIENT_IP: &str = "10.0.1.2";
/// The IPv6 service VIP (a ULA, only inside the test's netns), nowhere as [`VIP`] is.
pub const VIP6: &str = "fd00:96::100";
/// The client's IPv6 address.
pub const CLIENT_IP6: &str = "fd00:1::2";
/// The node's interface facing the client.
pub const NODE_CLIENT_DEV: &str = "xnc";

/// A backend netns behind the node: its address and the node's interface facing it.
#[derive(Debug)]
pub struct Backend {
    /// The backend's netns.
    pub ns: Netns,
    /// Its address (`10.0.<n+2>.2`).
    pub ip: String,
    /// Its IPv6 address (`fd00:<n+2>::2`).
    pub ip6: String,
    /// The node's interface towards it (`xnb<n>`).
    pub node_dev: String,
}

/// client netns --veth-- node netns --veth-- backend netns (one per backend), dual stack:
/// 10.0.<k>.0/24 and fd00:<k>::/64 on link k (ULAs, only inside these netns). The node
/// forwards between its interfaces (ip_forward and IPv6 forwarding on, rp_filter off); the
/// client and each backend route everything, both families, through the node. Dropping it deletes every netns (and with them the
/// veth pairs and any XDP program on them).
#[derive(Debug)]
pub struct Topology {
    /// The client's netns.
    pub client: Netns,
    /// The node's netns (where skiff and the XDP program run).
    pub node: Netns,
    /// The backends.
    pub backends: Vec<Backend>,
}

impl Topology {
    /// Builds the topology with `backends` backend netns; `name` prefixes the netns names.
    pub fn new(name: &str, backends: usize) -> Topology {
        let node = Netns::new(&format!("{name}-node"));
        let client = Netns::new(&format!("{name}-cli"));
        veth_pair(
            &node,
            NODE_CLIENT_DEV,
            "10.0.1.1/24",
            &client,
            "xc0",
            &format!("{CLIENT_IP}/24"),
        );
        ip(&client, &["route", "add", "default", "via", "10.0.1.1"]);
        link6(
            &node,
            NODE_CLIENT_DEV,
            "fd00:1::1",
            &client,
            "xc0",
            CLIENT_IP6,
        );
        prepare_peer(&client, "xc0");
        let mut bs = Vec::with_capacity(backends);
        for n in 0..backends {
            let ns = Netns::new(&format!("{name}-b{n}"));
            let net = n + 2;
            let node_dev = format!("xnb{n}");
            let ip_addr = format!("10.0.{net}.2");
            veth_pair(
                &node,
                &node_dev,
                &format!("10.0.{net}.1/24"),
                &ns,
                "xb0",
                &format!("{ip_addr}/24"),
            );
            ip(
                &ns,
                &["route", "add", "default", "via", &format!("10.0.{net}.1")],
            );
            let ip6 = format!("fd00:{net}::2");
            link6(
                &node,
                &node_dev,
                &format!("fd00:{net}::1"),
                &ns,
                "xb0",
                &ip6,
            );
            prepare_peer(&ns, "xb0");
            bs.push(Backend {
                ns,
                ip: ip_addr,
                ip6,
                node_dev,
            });
        }
        for key in [
            "net/ipv4/ip_forward",
            "net/ipv6/conf/all/forwarding",
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
        ] {
            let value = if key.ends_with("forward") || key.ends_with("forwarding") {
                "1"
            } else {
                "0"
            };
            let path = format!("/proc/sys/{key}");
            in_netns(&node, move || {
                std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}: {e}"))
            });
        }
        Topology {
            client,
            node,
            backends: bs,
        }
    }

    /// The node's interfaces: the client's first, then one per backend (the `--xdp` list).
    pub fn node_devs(&self) -> Vec<String> {
        std::iter::once(NODE_CLIENT_DEV.to_string())
            .chain(self.backends.iter().map(|b| b.node_dev.clone()))
            .collect()
    }
}

fn ip(ns: &Netns, args: &[&str]) {
    run(Command::new("ip").arg("-n").arg(ns.name()).args(args));
}

/// IPv6 on a link [`veth_pair`] made: `node_addr`/64 on the node's `node_dev`, `far_addr`/64 on
/// the far end `far_dev`, whose default route goes through the node. No duplicate address
/// detection (the addresses would stay tentative, unusable, for a second or two).
fn link6(
    node: &Netns,
    node_dev: &str,
    node_addr: &str,
    far: &Netns,
    far_dev: &str,
    far_addr: &str,
) {
    for (ns, dev, addr) in [(node, node_dev, node_addr), (far, far_dev, far_addr)] {
        let cidr = format!("{addr}/64");
        ip(ns, &["-6", "addr", "add", &cidr, "dev", dev, "nodad"]);
    }
    ip(far, &["-6", "route", "add", "default", "via", node_addr]);
}

/// The far end of a veth the node redirects to: GRO on (a veth receives XDP_REDIRECTed frames
/// only with NAPI, which GRO turns on) and TX checksum offload off (a local sender's
/// CHECKSUM_PARTIAL frame carries only the pseudo-header sum, which XDP cannot tell from a
/// full checksum; the node's incremental updates need full ones, as on a real wire).
fn prepare_peer(ns: &Netns, dev: &'static str) {
    in_netns(ns, move || {
        ethtool_set(dev, ETHTOOL_SGRO, 1).expect("ethtool: GRO on");
        ethtool_set(dev, ETHTOOL_STXCSUM, 0).expect("ethtool: tx checksum off");
    });
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One `ETHTOOL_S*` command with a `u32` value on `dev` in the calling thread's netns (no
/// ethtool binary needed).
fn ethtool_set(dev: &str, cmd: u32, value: u32) -> std::io::Result<()> {
    let mut v = EthtoolValue { cmd, data: value };
    // SAFETY: zeroed ifreq is valid; the name fits (checked) and stays NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::other("interface name too long"));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut v).cast();
    // SAFETY: a plain datagram socket for the ioctl.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `ifr` points at `v`, both live across the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}

/// One ICMP echo request from inside `ns` to `dst` (a raw socket, as `ping -c 1 -W <timeout>`
/// would send it): whether an echo reply from `dst` with its identifier came back in time.
pub fn ping(ns: &Netns, dst: std::net::Ipv4Addr, timeout: std::time::Duration) -> bool {
    in_netns(ns, move || {
        use std::io::Read;
        let s = raw_icmp();
        let id = (std::process::id() as u16).to_be_bytes();
        let mut m = vec![8u8, 0, 0, 0, id[0], id[1], 0, 1];
        m.extend_from_slice(b"skiff-xdp-ping");
        let c = inet_checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        s.send_to(&m, &std::net::SocketAddrV4::new(dst, 0).into())
            .expect("send the echo request");
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            s.set_read_timeout(Some(left)).expect("socket timeout");
            // A raw IPv4 socket reads whole datagrams, IP header first.
            let Ok(n) = (&s).read(&mut buf) else {
                return false;
            };
            let b = &buf[..n];
            let ihl = usize::from(b.first().map_or(0, |v| v & 0x0f)) * 4;
            if n < ihl + 8 || ihl < 20 {
                continue;
            }
            let icmp = &b[ihl..];
            if b[12..16] == dst.octets() && icmp[0] == 0 && icmp[4..6] == id && icmp[6..8] == [0, 1]
            {
                return true;
            }
        }
    })
}

/// The Internet checksum of `data` (big-endian words; a trailing odd byte padded), as sent.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What an ICMP error quotes of a TCP segment `src` -> `dst`: its IPv4 header and its 20-byte
/// TCP header (an ACK, sequence 1, no payload), both checksums correct. The sequence number
/// is outside any real window, so the receiving TCP ignores an error quoting it.
pub fn tcp_quote(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let c = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = ip[12..20].to_vec();
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let c = inet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// An ICMP error message: `typ`/`code`, the header's last four bytes `rest` (e.g. the
/// next-hop MTU), then `quote`; its checksum filled in.
pub fn icmp_error(typ: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut m = vec![typ, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quote);
    let c = inet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A raw ICMP socket in `ns`: it reads a copy of every ICMP packet the netns receives (IP
/// header first), whatever the stack then does with it.
pub fn icmp_capture(ns: &Netns) -> socket2::Socket {
    in_netns(ns, raw_icmp)
}

/// Sends the ICMP message `m` from `ns` to `dst` over a raw socket (the stack adds the IP
/// header, its source chosen by the route).
pub fn send_icmp(ns: &Netns, dst: Ipv4Addr, m: Vec<u8>) {
    in_netns(ns, move || {
        let s = raw_icmp();
        s.send_to(&m, &SocketAddrV4::new(dst, 0).into())
            .expect("send the ICMP message");
    })
}

/// A raw ICMP socket in the calling thread's netns.
fn raw_icmp() -> socket2::Socket {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::ICMPV4),
    )
    .expect("raw ICMP socket (needs root)")
}

/// The first packet `s` (from [`icmp_capture`]) reads within `timeout` whose ICMP message
/// `want` accepts: (the IPv4 header, the ICMP message).
pub fn next_icmp(
    s: &socket2::Socket,
    timeout: std::time::Duration,
    want: impl Fn(&[u8]) -> bool,
) -> Option<(Vec<u8>, Vec<u8>)> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).expect("socket timeout");
        let Ok(n) = (&*s).read(&mut buf) else {
            return None;
        };
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 8 || ihl < 20 {
            continue;
        }
        if want(&buf[ihl..n]) {
            return Some((buf[..ihl].to_vec(), buf[ihl..n].to_vec()));
        }
    }
}

/// As [`tcp_quote`] for IPv6: the IPv6 header and the 20-byte TCP header, checksummed.
pub fn tcp6_quote(src: SocketAddrV6, dst: SocketAddrV6) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    let c = inet_checksum(&[&pseudo6(src.ip(), dst.ip(), 6, 20)[..], &tcp].concat());
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip
}

/// The IPv6 pseudo-header of `len` bytes of `next_header` from `src` to `dst`.
fn pseudo6(src: &Ipv6Addr, dst: &Ipv6Addr, next_header: u8, len: u32) -> Vec<u8> {
    let mut p = src.octets().to_vec();
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next_header]);
    p
}

/// An ICMPv6 error message from `src` to `dst` (as [`icmp_error`]), its checksum (over the
/// pseudo-header) filled in.
pub fn icmp6_error(
    (src, dst): (&Ipv6Addr, &Ipv6Addr),
    typ: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let mut m = vec![typ, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quote);
    let c = inet_checksum(&[&pseudo6(src, dst, 58, m.len() as u32)[..], &m].concat());
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A raw ICMPv6 socket in `ns`: it reads a copy of every ICMPv6 message the netns receives
/// (the message only; the kernel drops those whose checksum does not verify).
pub fn icmp6_capture(ns: &Netns) -> socket2::Socket {
    in_netns(ns, raw_icmp6)
}

/// Sends the ICMPv6 message `m` from `ns` to `dst` (the stack fills in the checksum and
/// the IPv6 header).
pub fn send_icmp6(ns: &Netns, dst: Ipv6Addr, m: Vec<u8>) {
    in_netns(ns, move || {
        raw_icmp6()
            .send_to(&m, &SocketAddrV6::new(dst, 0, 0, 0).into())
            .expect("send the ICMPv6 message");
    })
}

fn raw_icmp6() -> socket2::Socket {
    socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::RAW,
        Some(socket2::Protocol::ICMPV6),
    )
    .expect("raw ICMPv6 socket (needs root)")
}

/// The first ICMPv6 message `s` (from [`icmp6_capture`]) reads within `timeout` that `want`
/// accepts: (its source, the message).
pub fn next_icmp6(
    s: &socket2::Socket,
    timeout: std::time::Duration,
    want: impl Fn(&[u8]) -> bool,
) -> Option<(Ipv6Addr, Vec<u8>)> {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        s.set_read_timeout(Some(left)).expect("socket timeout");
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            return None;
        };
        // SAFETY: recv_from initialised the first `n` bytes.
        let m: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let Some(from) = from.as_socket_ipv6() else {
            continue;
        };
        if m.len() >= 8 && want(&m) {
            return Some((*from.ip(), m));
        }
    }
}
