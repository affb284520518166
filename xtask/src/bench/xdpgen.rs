//! The `--xdp` bench's frame generator: `BPF_PROG_TEST_RUN` in live-frame mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux >= 5.18) with a two-instruction XDP program that returns
//! `XDP_TX`, as xdp-trafficgen does. Each frame leaves the client's veth with `ndo_xdp_xmit` and
//! reaches the node's veth as an XDP frame: no socket and no skb on the sending side, so the
//! generator costs little and what limits the rate is the node's forwarding path (which runs in
//! softirq on the generator's CPU).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_TX: i32 = 3;

/// UDP payload of every frame (18 bytes: a 60-byte frame, Ethernet's minimum without FCS).
const PAYLOAD: usize = 18;
/// Length of one generated frame.
pub const FRAME_LEN: usize = 14 + 20 + 8 + PAYLOAD;
/// First UDP source port; frame `i` uses `SPORT_BASE + i`.
const SPORT_BASE: u16 = 20000;

/// What the generator sends: addresses of one client -> VIP:port UDP flow per source port.
#[derive(Debug, Clone)]
pub struct Flows {
    /// Ethernet source (the client veth's MAC).
    pub src_mac: [u8; 6],
    /// Ethernet destination (the node veth's MAC: the client's gateway).
    pub dst_mac: [u8; 6],
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination (the VIP).
    pub dst: Ipv4Addr,
    /// UDP destination port.
    pub dport: u16,
    /// Distinct source ports (flows), at most 65536 - `SPORT_BASE`.
    pub flows: u16,
}

/// The internet checksum (RFC 1071) of `parts` concatenated, each of even length but the last.
fn csum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for c in p.chunks(2) {
            let word = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Flows {
    /// One Ethernet/IPv4/UDP frame per flow, with valid IPv4 and UDP checksums (a forwarding
    /// path that verifies them, as conntrack does, must not drop them).
    pub fn frames(&self) -> Vec<[u8; FRAME_LEN]> {
        let flows = self.flows.min(u16::MAX - SPORT_BASE);
        (0..flows)
            .map(|i| {
                let mut f = [0u8; FRAME_LEN];
                f[0..6].copy_from_slice(&self.dst_mac);
                f[6..12].copy_from_slice(&self.src_mac);
                f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                let ip = 14;
                let ip_len = (20 + 8 + PAYLOAD) as u16;
                f[ip] = 0x45;
                f[ip + 2..ip + 4].copy_from_slice(&ip_len.to_be_bytes());
                f[ip + 4..ip + 6].copy_from_slice(&i.to_be_bytes());
                f[ip + 8] = 64;
                f[ip + 9] = libc::IPPROTO_UDP as u8;
                f[ip + 12..ip + 16].copy_from_slice(&self.src.octets());
                f[ip + 16..ip + 20].copy_from_slice(&self.dst.octets());
                let c = csum(&[&f[ip..ip + 20]]);
                f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
                let udp = ip + 20;
                let udp_len = (8 + PAYLOAD) as u16;
                f[udp..udp + 2].copy_from_slice(&(SPORT_BASE + i).to_be_bytes());
                f[udp + 2..udp + 4].copy_from_slice(&self.dport.to_be_bytes());
                f[udp + 4..udp + 6].copy_from_slice(&udp_len.to_be_bytes());
                f[udp + 8..].fill(0x5a);
                let pseudo = [
                    &f[ip + 12..ip + 20],
                    &[0, libc::IPPROTO_UDP as u8][..],
                    &udp_len.to_be_bytes()[..],
                ]
                .concat();
                // A computed 0 is sent as 0xffff: 0 means "no checksum" in UDP over IPv4.
                let c = match csum(&[&pseudo, &f[udp..]]) {
                    0 => 0xffff,
                    c => c,
                };
                f[udp + 6..udp + 8].copy_from_slice(&c.to_be_bytes());
                f
            })
            .collect()
    }
}

/// `r0 = XDP_TX; exit`, encoded as `struct bpf_insn` words.
fn xdp_tx_insns() -> [u64; 2] {
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    let mov_r0 = 0xb7u64 | (u64::from(XDP_TX as u32) << 32);
    [mov_r0, 0x95]
}

/// Loads the `XDP_TX` program (the caller's only BPF object; freed with the fd).
fn load_xdp_tx() -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let insns = xdp_tx_insns();
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"skiff_xdptx\0");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    // SAFETY: `attr` is a fully initialised prefix of bpf_attr's `prog_load` member of the size
    // passed; `insns` and `license` outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One live-frame `BPF_PROG_TEST_RUN`: `frame` run `repeat` times as received on `ifindex`
/// queue 0; returns when the kernel has run them all (or a signal is pending).
fn test_run_live(prog: &OwnedFd, ifindex: u32, frame: &[u8], repeat: u32) -> io::Result<()> {
    #[repr(C)]
    struct XdpMd {
        data: u32,
        data_end: u32,
        data_meta: u32,
        ingress_ifindex: u32,
        rx_queue_index: u32,
        egress_ifindex: u32,
    }
    #[repr(C)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    // The ingress device is where XDP_TX sends the frames out (the kernel turns it into a
    // redirect to the same ifindex); data_end must equal the frame length.
    let ctx = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        retval: 0,
        data_size_in: frame.len() as u32,
        data_size_out: 0,
        data_in: frame.as_ptr() as u64,
        data_out: 0,
        repeat,
        duration: 0,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_size_out: 0,
        ctx_in: &ctx as *const XdpMd as u64,
        ctx_out: 0,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        cpu: 0,
        // 0: the kernel's default batch (NAPI_POLL_WEIGHT, 64 frames).
        batch_size: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a fully initialised `test` member of bpf_attr of the size passed; the
    // frame and the context it points at outlive the call and are only read.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Frames run per `BPF_PROG_TEST_RUN` call: large enough to amortise the call's page-pool
/// setup, small enough (a few ms) that the flows interleave and the deadline is kept.
const REPEAT: u32 = 2048;

/// Sends `flows`' frames out of `ifindex` from `threads` threads (each cycling through all
/// flows, starting at a different one) until `limit` has passed. Returns the frames the
/// program ran (offered; what arrives is counted at the receivers) and the wall time.
pub fn run(
    flows: &Flows,
    ifindex: u32,
    limit: Duration,
    threads: usize,
) -> anyhow::Result<(u64, Duration)> {
    let prog =
        Arc::new(load_xdp_tx().map_err(|e| anyhow::anyhow!("loading the XDP_TX program: {e}"))?);
    let frames = Arc::new(flows.frames());
    anyhow::ensure!(!frames.is_empty(), "no flows to send");
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads = threads.clamp(1, 16);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (prog, frames, sent) = (prog.clone(), frames.clone(), sent.clone());
            std::thread::spawn(move || -> io::Result<()> {
                let mut i = t * frames.len() / threads;
                while start.elapsed() < limit {
                    test_run_live(&prog, ifindex, &frames[i % frames.len()], REPEAT)?;
                    sent.fetch_add(u64::from(REPEAT), Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    for h in hs {
        match h.join() {
            Ok(r) => r.map_err(|e| anyhow::anyhow!("BPF_PROG_TEST_RUN (live frames): {e}"))?,
            Err(_) => anyhow::bail!("generator thread panicked"),
        }
    }
    Ok((sent.load(Ordering::Relaxed), start.elapsed()))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    anyhow::ensure!(parts.len() == 6, "not a MAC address: {s:?}");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|e| anyhow::anyhow!("MAC {s:?}: {e}"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows(n: u16) -> Flows {
        Flows {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(10, 0, 1, 2),
            dst: Ipv4Addr::new(10, 96, 0, 100),
            dport: 53,
            flows: n,
        }
    }

    #[test]
    fn frames_carry_valid_checksums_and_distinct_source_ports() {
        let frames = flows(256).frames();
        assert_eq!(frames.len(), 256);
        let mut ports = std::collections::HashSet::new();
        for f in &frames {
            assert_eq!(&f[12..14], &[0x08, 0x00]);
            // A header that includes its checksum sums to 0 (complemented: 0).
            assert_eq!(csum(&[&f[14..34]]), 0, "IPv4 header checksum");
            let udp = &f[34..];
            assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
            let pseudo = [&f[26..34], &[0, 17][..], &udp[4..6]].concat();
            assert_eq!(csum(&[&pseudo, udp]), 0, "UDP checksum");
            assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 53);
            assert!(ports.insert(u16::from_be_bytes([udp[0], udp[1]])));
        }
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (one's complement).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum(&[&data]), !0xddf2);
        // An odd tail is padded with a zero byte.
        assert_eq!(csum(&[&[0x01]]), !0x0100);
    }

    #[test]
    fn program_returns_xdp_tx() {
        let [mov, exit] = xdp_tx_insns();
        assert_eq!(mov & 0xff, 0xb7, "BPF_ALU64 | BPF_MOV | BPF_K");
        assert_eq!((mov >> 8) & 0xff, 0, "into r0");
        assert_eq!((mov >> 32) as i32, XDP_TX);
        assert_eq!(exit, 0x95, "BPF_JMP | BPF_EXIT");
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:0a:ff:00:10:01").unwrap(),
            [2, 0x0a, 0xff, 0, 0x10, 1]
        );
        assert!(parse_mac("02:0a:ff:00:10").is_err());
        assert!(parse_mac("02:0a:ff:00:10:zz").is_err());
    }
}
