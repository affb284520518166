//! Where the data-plane workers run. With one worker per CPU this process may use (the
//! default `--concurrency` on an unrestricted machine, or a node DaemonSet), worker `i` is
//! pinned to the `i`-th of those CPUs and every listener's `SO_REUSEPORT` group hands a new
//! connection to the worker pinned to the CPU the connection arrived on: a two-to-few
//! instruction classic BPF program (`SO_ATTACH_REUSEPORT_CBPF`) returns that worker's socket
//! index, as the kernel's own reuseport selftests and `SO_INCOMING_CPU` setups do.
//!
//! Why: a connection then starts on a worker whose CPU already has the connection's socket
//! warm and, for a local client (a sidecar's application, a node's pods), does not wake an
//! idle worker on the other CPU. Hashing the 4-tuple instead (the kernel's default) sends half
//! of a client's connections across CPUs: on the 2-vCPU bench machine that cost two workers
//! 20 % more CPU per connection than one (docs/BENCHMARKS.md, issue 16).
//!
//! With fewer workers than CPUs (a sidecar with `--concurrency 2` on a large node) nothing is
//! pinned: pinning every proxy of a node to its first CPUs would pile them onto those CPUs.
//! `--cpu-affinity off` turns placement off; the kernel then hashes.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `--cpu-affinity`: whether workers are placed on CPUs (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuAffinity {
    /// Pin and steer when there is exactly one worker per CPU this process may use.
    #[default]
    Auto,
    /// Never pin; the kernel hashes connections over the workers' sockets.
    Off,
}

/// The CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set =
        nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).map_err(io::Error::from)?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// The CPU each of `workers` workers runs on, or `None` when they are not placed: affinity
/// off, a single worker (nothing to steer), or a worker count other than the CPU count.
pub fn plan(affinity: CpuAffinity, workers: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    (affinity == CpuAffinity::Auto
        && workers > 1
        && workers == allowed.len()
        && program(allowed).is_some())
    .then(|| allowed.to_vec())
}

/// Pin the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

// Classic BPF opcodes (linux/filter.h: class | size | mode, class | op | source) and the
// ancillary offset of the current CPU.
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD 0x00 | BPF_W 0x00 | BPF_ABS 0x20
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K 0x00
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K 0x00
const BPF_RET_A: u16 = 0x06 | 0x10; // BPF_RET | BPF_A
const SKF_AD_CPU: u32 = (-0x1000i32 + 36) as u32;
/// The kernel's limit on a classic program's length.
const BPF_MAXINSNS: usize = 4096;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The selection program: socket index `i` for CPU `cpus[i]`. An index past the group's sockets
/// (a CPU not listed) makes the kernel fall back to its hash. `None` past the length limit.
fn program(cpus: &[usize]) -> Option<Vec<libc::sock_filter>> {
    let mut p = vec![insn(BPF_LD_W_ABS, 0, 0, SKF_AD_CPU)];
    if cpus.iter().copied().eq(0..cpus.len()) {
        // CPUs 0..n: the CPU is the index.
        p.push(insn(BPF_RET_A, 0, 0, 0));
        return Some(p);
    }
    if 2 * cpus.len() + 2 > BPF_MAXINSNS {
        return None;
    }
    for (i, &cpu) in cpus.iter().enumerate() {
        // Equal: fall into the `ret i` that follows; else skip it.
        p.push(insn(BPF_JMP_JEQ_K, 0, 1, u32::try_from(cpu).ok()?));
        p.push(insn(BPF_RET_K, 0, 0, u32::try_from(i).ok()?));
    }
    p.push(insn(BPF_RET_K, 0, 0, u32::MAX));
    Some(p)
}

/// Make `sock`'s `SO_REUSEPORT` group hand each connection to the socket of its CPU: the
/// group's `i`-th socket (in `listen` order) belongs to the worker on `cpus[i]`.
pub fn steer(sock: &impl AsFd, cpus: &[usize]) -> io::Result<()> {
    let mut code = program(cpus).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} CPUs: too many for a steering program", cpus.len()),
        )
    })?;
    let prog = libc::sock_fprog {
        len: u16::try_from(code.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        filter: code.as_mut_ptr(),
    };
    // The kernel copies the program during the call; `code` outlives it.
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::AttachReusePortCbpf, &prog)
        .map_err(io::Error::from)
}

/// Give `sock`'s group back to the kernel's hash (a group inherited from a predecessor that
/// steered keeps its program otherwise). No program attached is not an error.
pub fn unsteer(sock: &impl AsFd) -> io::Result<()> {
    // The value is ignored, but the kernel wants an int's length for every SOL_SOCKET option.
    let unused: libc::c_int = 0;
    // SAFETY: a pointer to a live int and its size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            std::ptr::from_ref(&unused).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            e => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{SocketAddr, TcpListener, TcpStream};

    #[test]
    fn places_only_one_worker_per_allowed_cpu() {
        let cpus = [0, 1, 2, 3];
        assert_eq!(plan(CpuAffinity::Auto, 4, &cpus), Some(cpus.to_vec()));
        assert_eq!(plan(CpuAffinity::Off, 4, &cpus), None);
        assert_eq!(
            plan(CpuAffinity::Auto, 2, &cpus),
            None,
            "fewer workers than CPUs"
        );
        assert_eq!(
            plan(CpuAffinity::Auto, 8, &cpus),
            None,
            "more workers than CPUs"
        );
        assert_eq!(
            plan(CpuAffinity::Auto, 1, &[5]),
            None,
            "one worker: nothing to steer"
        );
        assert_eq!(plan(CpuAffinity::Auto, 2, &[4, 9]), Some(vec![4, 9]));
    }

    #[test]
    fn the_program_maps_each_cpu_to_its_index() {
        // 0..n: load the CPU, return it.
        let p = program(&[0, 1, 2]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].code, p[0].k), (BPF_LD_W_ABS, SKF_AD_CPU));
        assert_eq!(p[1].code, BPF_RET_A);
        // Any other set: compare and return, an out-of-range index last.
        let p = program(&[4, 9]).unwrap();
        let shape: Vec<_> = p.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect();
        assert_eq!(
            shape,
            [
                (BPF_LD_W_ABS, 0, 0, SKF_AD_CPU),
                (BPF_JMP_JEQ_K, 0, 1, 4),
                (BPF_RET_K, 0, 0, 0),
                (BPF_JMP_JEQ_K, 0, 1, 9),
                (BPF_RET_K, 0, 0, 1),
                (BPF_RET_K, 0, 0, u32::MAX),
            ]
        );
        let many: Vec<usize> = (1..=(BPF_MAXINSNS / 2)).collect();
        assert!(program(&many).is_none(), "past the kernel's length limit");
    }

    /// Real sockets: a group of one socket per allowed CPU with the program attached; a
    /// client thread pinned to each CPU in turn connects, and the socket of that CPU accepts.
    /// Detached, the kernel's hash takes over again.
    #[test]
    fn the_kernel_hands_a_connection_to_the_socket_of_its_cpu() {
        let cpus = allowed_cpus().unwrap();
        assert!(
            cpus.len() >= 2,
            "steering needs two CPUs to show; this machine allows {cpus:?}"
        );
        let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut group: Vec<TcpListener> = Vec::new();
        for _ in &cpus {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(64).unwrap();
            addr = s.local_addr().unwrap().as_socket().unwrap();
            s.set_nonblocking(true).unwrap();
            group.push(s.into());
        }
        // Which sockets of the group accepted a connect made from CPU `cpus[i]`.
        let took = |i: usize| -> Vec<usize> {
            let cpu = cpus[i];
            std::thread::spawn(move || {
                pin_current_thread(cpu).unwrap();
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(b"x").unwrap();
            })
            .join()
            .unwrap();
            group
                .iter()
                .enumerate()
                .filter(|(_, l)| l.accept().is_ok())
                .map(|(j, _)| j)
                .collect()
        };
        steer(&group[0], &cpus).unwrap();
        for round in 0..3 {
            for (i, cpu) in cpus.iter().enumerate() {
                assert_eq!(took(i), [i], "round {round}: a connect from CPU {cpu}");
            }
        }
        // Any socket of the group detaches its program; twice is no error.
        unsteer(&group[1]).unwrap();
        unsteer(&group[1]).unwrap();
        let elsewhere = (0..20)
            .flat_map(|_| 0..cpus.len())
            .filter(|&i| took(i) != [i])
            .count();
        assert!(elsewhere > 0, "still steered by CPU after the detach");
    }
}
