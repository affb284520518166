//! The `--xdp` bench's frame generator: frames that reach the node's veth as XDP frames (no
//! skb), as from a NIC with native XDP, so that what limits the rate is the node's forwarding
//! path (which runs in softirq on the generator's CPU). Two ways, the first the kernel allows:
//! - `live-frames`: `BPF_PROG_TEST_RUN` in live-frame mode (`BPF_F_TEST_XDP_LIVE_FRAMES`,
//!   Linux >= 5.18) with a two-instruction program returning `XDP_TX` on the client's veth, as
//!   xdp-trafficgen does: each frame leaves with `ndo_xdp_xmit`.
//! - `relay`: some kernels refuse live frames (EPERM). Then an `AF_PACKET` socket (qdisc
//!   bypassed, `sendmmsg` batches) sends the frames into a second veth pair inside the client
//!   netns, whose far end runs a six-instruction program: `bpf_redirect_map` with
//!   `BPF_F_BROADCAST` to a devmap holding the client's veth `FANOUT` times. The skb-to-XDP
//!   conversion (a copy: the skbs lack XDP headroom) happens at the relay, on the client's
//!   side, each socket frame becomes `FANOUT` XDP frames (clones), so the socket's cost per
//!   frame is divided by `FANOUT`, and the node again receives XDP frames.
//!
//! Also here: the floor's node, a bare XDP forwarder (`attach_forwarder`), and pacing to a
//! fixed rate for the CPU-per-packet runs.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_DEVMAP: u32 = 14;
const BPF_FUNC_REDIRECT: i32 = 23;
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
const BPF_F_BROADCAST: i32 = 1 << 3;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;

/// UDP payload of every frame (18 bytes: a 60-byte frame, Ethernet's minimum without FCS).
const PAYLOAD: usize = 18;
/// Length of one generated frame.
pub const FRAME_LEN: usize = 14 + 20 + 8 + PAYLOAD;
/// First UDP source port; frame `i` uses `SPORT_BASE + i`.
const SPORT_BASE: u16 = 20000;

/// What the generator sends: addresses of one client -> destination UDP flow per source port.
#[derive(Debug, Clone)]
pub struct Flows {
    /// Ethernet source (the client veth's MAC).
    pub src_mac: [u8; 6],
    /// Ethernet destination (the node veth's MAC: the client's gateway).
    pub dst_mac: [u8; 6],
    /// IPv4 source.
    pub src: Ipv4Addr,
    /// IPv4 destination (the VIP; a backend for the floor).
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

/// `struct bpf_insn` of `BPF_ALU64 | BPF_MOV | BPF_K`: `reg = imm`.
fn mov_imm(reg: u8, imm: i32) -> u64 {
    0xb7 | (u64::from(reg) << 8) | (u64::from(imm as u32) << 32)
}

/// `BPF_JMP | BPF_CALL` of helper `id`.
fn call(id: i32) -> u64 {
    0x85 | (u64::from(id as u32) << 32)
}

/// `BPF_JMP | BPF_EXIT`.
const EXIT: u64 = 0x95;

/// `r0 = XDP_TX; exit`.
fn xdp_tx_insns() -> Vec<u64> {
    vec![mov_imm(0, XDP_TX), EXIT]
}

/// `return bpf_redirect_map(devmap, 0, BPF_F_BROADCAST)`: a copy of the frame to every
/// device in `devmap` (XDP_REDIRECT).
fn broadcast_insns(devmap: i32) -> Vec<u64> {
    // BPF_LD | BPF_DW | BPF_IMM into r1 with src = BPF_PSEUDO_MAP_FD: the map's address; the
    // second half of the 16-byte instruction holds the upper 32 bits (0).
    let ld_map =
        0x18 | (1 << 8) | (u64::from(BPF_PSEUDO_MAP_FD) << 12) | (u64::from(devmap as u32) << 32);
    vec![
        ld_map,
        0,
        mov_imm(2, 0),
        mov_imm(3, BPF_F_BROADCAST),
        call(BPF_FUNC_REDIRECT_MAP),
        EXIT,
    ]
}

/// XDP frames the relay makes of each socket frame: enough that the socket's cost is a small
/// part of a frame's, few enough that one relay NAPI poll (64 skbs) fills the node veth's
/// ring (256 frames) rather than overflowing it with clones that are dropped.
pub const FANOUT: u32 = 4;

/// A devmap with `ifindex` in each of its `copies` slots.
fn devmap_of(ifindex: u32, copies: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_DEVMAP,
        key_size: 4,
        value_size: 4,
        max_entries: copies,
        map_flags: 0,
    };
    // SAFETY: `attr` is a fully initialised prefix of bpf_attr's map_create member of the
    // size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &mut attr as *mut MapCreateAttr,
            std::mem::size_of::<MapCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    for slot in 0..copies {
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: &slot as *const u32 as u64,
            value: &ifindex as *const u32 as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a fully initialised map_elem member of bpf_attr of the size
        // passed; key and value outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                &mut attr as *mut MapElemAttr,
                std::mem::size_of::<MapElemAttr>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(map)
}

/// Loads an XDP program (a BPF object of the calling process, freed with the fd).
fn load_xdp(insns: &[u64]) -> io::Result<OwnedFd> {
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
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"skiff_gen\0");
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

/// Attaches `prog` to `ifindex` in native mode with a BPF link; detached when the returned fd
/// closes (also when the process dies), so nothing outlives the generator.
fn attach_xdp(prog: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    // SAFETY: `attr` is a fully initialised prefix of bpf_attr's `link_create` member of the
    // size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &mut attr as *mut LinkCreateAttr,
            std::mem::size_of::<LinkCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// An `AF_PACKET` raw socket bound to `ifindex` that bypasses the qdisc (send only).
fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; protocol 0 receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set below are all bind reads.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the length passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let one: libc::c_int = 1;
    // SAFETY: an int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Frames per `sendmmsg` call of the relay generator.
const SEND_BATCH: usize = 64;

/// Sends `frames` round-robin on `sock` in `SEND_BATCH` batches until `limit` has passed;
/// returns the frames the kernel accepted (a full relay ring refuses some: backpressure, not
/// an error).
fn send_until(
    sock: &OwnedFd,
    frames: &[[u8; FRAME_LEN]],
    first: usize,
    pace: Pacer,
    limit: Duration,
) -> io::Result<u64> {
    let mut iov: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let n = iov.len();
    let mut sent = 0u64;
    let mut i = first % n;
    while pace.start.elapsed() < limit {
        pace.wait(sent * u64::from(FANOUT));
        let batch = SEND_BATCH.min(n);
        // SAFETY: a zeroed mmsghdr is valid; each one points at one iovec of `iov`.
        let mut msgs: Vec<libc::mmsghdr> = (0..batch)
            .map(|k| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &raw mut iov[(i + k) % n];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` and the iovecs and frames they point at outlive the call.
        let rc = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), batch as u32, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EBUSY) => std::thread::yield_now(),
                _ => return Err(e),
            }
        } else {
            sent += rc as u64;
        }
        i = (i + batch) % n;
    }
    Ok(sent)
}

/// Holds a thread to `per_sec` frames per second from `start` (no limit when `None`).
#[derive(Debug, Clone, Copy)]
struct Pacer {
    start: Instant,
    per_sec: Option<f64>,
}

impl Pacer {
    /// Sleeps until `done` frames are due.
    fn wait(&self, done: u64) {
        if let Some(rate) = self.per_sec {
            let due = Duration::from_secs_f64(done as f64 / rate);
            if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
}

/// How the frames were generated (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `BPF_PROG_TEST_RUN` live frames with `XDP_TX` on the client's veth.
    LiveFrames,
    /// `AF_PACKET` into a relay veth whose XDP program redirects to the client's veth.
    Relay,
}

impl Mode {
    /// Short name (tables, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Mode::LiveFrames => "live-frames",
            Mode::Relay => "relay",
        }
    }
}

/// Where the frames go: the client's veth (`out`) and the relay pair (`relay_in` is where
/// the `AF_PACKET` socket sends, `relay_out` its peer, which redirects to `out`).
#[derive(Debug, Clone, Copy)]
pub struct Devices {
    /// The client's veth towards the node.
    pub out: u32,
    /// The relay veth the socket sends on.
    pub relay_in: u32,
    /// Its peer, where the redirect program runs.
    pub relay_out: u32,
}

/// What one generator run did.
#[derive(Debug)]
pub struct Sent {
    /// Frames generated (offered; relay: socket frames x `FANOUT`; what arrives is counted at
    /// the receivers).
    pub frames: u64,
    /// Wall time of the run.
    pub wall: Duration,
    /// How.
    pub mode: Mode,
}

/// Sends `flows`' frames out of `dev.out` from `threads` threads (each cycling through all
/// flows, starting at a different one) until `limit` has passed, at `rate` frames/s in all
/// (0: as fast as they go): live frames if the kernel allows them, else through the relay.
pub fn run(
    flows: &Flows,
    dev: Devices,
    limit: Duration,
    threads: usize,
    rate: f64,
) -> anyhow::Result<Sent> {
    let frames = Arc::new(flows.frames());
    anyhow::ensure!(!frames.is_empty(), "no flows to send");
    let threads = threads.clamp(1, 16);
    let tx = Arc::new(
        load_xdp(&xdp_tx_insns())
            .map_err(|e| anyhow::anyhow!("loading the XDP_TX program: {e}"))?,
    );
    // One real frame probes whether the kernel allows live frames (the receivers count it:
    // one frame among millions).
    let mode = match test_run_live(&tx, dev.out, &frames[0], 1) {
        Ok(()) => Mode::LiveFrames,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Mode::Relay,
        Err(e) => anyhow::bail!("BPF_PROG_TEST_RUN (live frames): {e}"),
    };
    let sent = Arc::new(AtomicU64::new(0));
    let pace = Pacer {
        start: Instant::now(),
        per_sec: (rate > 0.0).then(|| rate / threads as f64),
    };
    match mode {
        Mode::LiveFrames => {
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let (tx, frames, sent) = (tx.clone(), frames.clone(), sent.clone());
                    std::thread::spawn(move || -> io::Result<()> {
                        let mut i = t * frames.len() / threads;
                        let mut done = 0u64;
                        while pace.start.elapsed() < limit {
                            pace.wait(done);
                            test_run_live(&tx, dev.out, &frames[i % frames.len()], REPEAT)?;
                            done += u64::from(REPEAT);
                            sent.fetch_add(u64::from(REPEAT), Ordering::Relaxed);
                            i += 1;
                        }
                        Ok(())
                    })
                })
                .collect();
            join(hs, "BPF_PROG_TEST_RUN (live frames)")?;
        }
        Mode::Relay => {
            let devmap = devmap_of(dev.out, FANOUT)
                .map_err(|e| anyhow::anyhow!("creating the relay's devmap: {e}"))?;
            let redirect = load_xdp(&broadcast_insns(devmap.as_raw_fd()))
                .map_err(|e| anyhow::anyhow!("loading the relay program: {e}"))?;
            let _link = attach_xdp(&redirect, dev.relay_out)
                .map_err(|e| anyhow::anyhow!("attaching the relay's XDP program: {e}"))?;
            let hs: Vec<_> = (0..threads)
                .map(|t| {
                    let (frames, sent) = (frames.clone(), sent.clone());
                    std::thread::spawn(move || -> io::Result<()> {
                        let sock = packet_socket(dev.relay_in)?;
                        let first = t * frames.len() / threads;
                        let n = send_until(&sock, &frames, first, pace, limit)?;
                        sent.fetch_add(n * u64::from(FANOUT), Ordering::Relaxed);
                        Ok(())
                    })
                })
                .collect();
            join(hs, "AF_PACKET relay generator")?;
        }
    }
    Ok(Sent {
        frames: sent.load(Ordering::Relaxed),
        wall: pace.start.elapsed(),
        mode,
    })
}

fn join(hs: Vec<std::thread::JoinHandle<io::Result<()>>>, what: &str) -> anyhow::Result<()> {
    for h in hs {
        match h.join() {
            Ok(r) => r.map_err(|e| anyhow::anyhow!("{what}: {e}"))?,
            Err(_) => anyhow::bail!("{what}: generator thread panicked"),
        }
    }
    Ok(())
}

/// One `struct bpf_insn` from its fields.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | (u64::from(dst) << 8)
        | (u64::from(src) << 12)
        | (u64::from(off as u16) << 16)
        | (u64::from(imm as u32) << 32)
}

/// The floor forwarder: rewrite the Ethernet addresses and `bpf_redirect` to `out`, nothing
/// else (no parsing, no lookup, no IP change); too-short frames pass.
fn forward_insns(out: u32, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u64> {
    let w = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let h = |b: &[u8]| i32::from(u16::from_le_bytes([b[0], b[1]]));
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
    const ST_H: u8 = 0x6a; // BPF_ST | BPF_MEM | BPF_H
    vec![
        insn(LDX_W, 2, 1, 0, 0), // r2 = ctx->data
        insn(LDX_W, 3, 1, 4, 0), // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),  // r4 = r2 (BPF_ALU64 | BPF_MOV | BPF_X)
        insn(0x07, 4, 0, 0, 14), // r4 += 14 (BPF_ALU64 | BPF_ADD | BPF_K)
        insn(0x2d, 4, 3, 8, 0),  // if r4 > r3 goto pass (BPF_JMP | BPF_JGT | BPF_X)
        insn(ST_W, 2, 0, 0, w(&dst_mac[0..4])),
        insn(ST_H, 2, 0, 4, h(&dst_mac[4..6])),
        insn(ST_H, 2, 0, 6, h(&src_mac[0..2])),
        insn(ST_W, 2, 0, 8, w(&src_mac[2..6])),
        mov_imm(1, out as i32),
        mov_imm(2, 0),
        call(BPF_FUNC_REDIRECT),
        EXIT,
        mov_imm(0, XDP_PASS), // pass:
        EXIT,
    ]
}

/// The floor forwarder (see `forward_insns`) attached to `input` in this thread's netns,
/// redirecting to `out`; detached when the returned link fd closes.
pub fn attach_forwarder(
    input: u32,
    out: u32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> io::Result<OwnedFd> {
    let prog = load_xdp(&forward_insns(out, src_mac, dst_mac))?;
    // The link holds the program; the program fd can go.
    attach_xdp(&prog, input)
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
    fn programs_are_encoded_as_bpf_insns() {
        let tx = xdp_tx_insns();
        assert_eq!(tx.len(), 2);
        assert_eq!(tx[0] & 0xff, 0xb7, "BPF_ALU64 | BPF_MOV | BPF_K");
        assert_eq!((tx[0] >> 8) & 0xff, 0, "into r0");
        assert_eq!((tx[0] >> 32) as i32, XDP_TX);
        assert_eq!(tx[1], 0x95, "BPF_JMP | BPF_EXIT");
        let r = broadcast_insns(9);
        assert_eq!(r.len(), 6, "ld_imm64 takes two slots");
        assert_eq!(r[0] & 0xff, 0x18, "BPF_LD | BPF_DW | BPF_IMM");
        assert_eq!((r[0] >> 8) & 0xf, 1, "into r1");
        assert_eq!((r[0] >> 12) & 0xf, 1, "BPF_PSEUDO_MAP_FD");
        assert_eq!((r[0] >> 32) as u32, 9, "the map fd");
        assert_eq!(r[1], 0, "upper half");
        assert_eq!(
            ((r[2] >> 8) & 0xff, (r[2] >> 32) as u32),
            (2, 0),
            "key 0 in r2"
        );
        assert_eq!(
            ((r[3] >> 8) & 0xff, (r[3] >> 32) as u32),
            (3, 8),
            "BPF_F_BROADCAST in r3"
        );
        assert_eq!(r[4] & 0xff, 0x85, "BPF_JMP | BPF_CALL");
        assert_eq!((r[4] >> 32) as i32, 51, "bpf_redirect_map");
        assert_eq!(r[5], 0x95);
    }

    #[test]
    fn forwarder_writes_both_macs_after_its_bounds_check() {
        let src = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let dst = [0x0a, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
        let p = forward_insns(9, src, dst);
        assert_eq!(p.len(), 15);
        // The jump lands on `r0 = XDP_PASS`: offset counts from the next instruction.
        let off = ((p[4] >> 16) & 0xffff) as usize;
        assert_eq!(p[4 + 1 + off], mov_imm(0, XDP_PASS));
        // Replay the four stores on a frame: little-endian immediates, byte offsets 0-11.
        let mut frame = [0u8; 14];
        for st in &p[5..9] {
            let off = ((st >> 16) & 0xffff) as usize;
            let imm = ((st >> 32) as u32).to_le_bytes();
            let len = if st & 0xff == 0x62 { 4 } else { 2 };
            frame[off..off + len].copy_from_slice(&imm[..len]);
        }
        assert_eq!(&frame[0..6], &dst);
        assert_eq!(&frame[6..12], &src);
        assert_eq!((p[9] >> 32) as u32, 9, "redirect to ifindex 9");
        assert_eq!((p[11] >> 32) as i32, 23, "bpf_redirect");
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
