//! `skiff run --takeover`: a new skiff receives a running one's listening sockets over a Unix
//! socket (SCM_RIGHTS), starts serving on them, then tells the old one to drain.
//!
//! The listen queues never close: both processes hold the same sockets until the old one's
//! accept loops end, so no connect is refused and no established connection is reset (the old
//! process keeps its connections until they close or `--drain-time` passes).
//!
//! # Protocol (`SOCK_SEQPACKET`, one record per message; see docs/ARCHITECTURE.md)
//!
//! ```text
//! new -> old   HELLO  magic "SKIFFHO1" + u32 version (LE)
//! old -> new   HELLO  magic + u32 version; a peer of another version gets ERR and is closed
//! old -> new   SOCKET u8 role + UTF-8 address (or pin directory), exactly one fd attached
//!              ... one record per fd (N per address with SO_REUSEPORT workers)
//! old -> new   END    u32 number of SOCKET records sent
//! new -> old   DRAIN  (sent once the new process serves on the sockets and is ready)
//! old -> new   DRAINING (the old one unlinked its handover socket and stops accepting)
//! ```
//!
//! A record starts with a one-byte kind. A new process that disconnects before DRAIN leaves
//! the old one serving as before (it sent duplicates, it closed nothing).

pub mod caps;
mod proto;

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept, bind, connect, listen, socket,
};
use tracing::{info, warn};

pub use proto::{Record, Role, VERSION};

/// Where a running skiff accepts its successor when no `--handover-socket` is given.
pub const SOCKET_ROOT: &str = "/run/skiff";

/// How long either side waits for the other's next record.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the handover.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// A socket call on the handover socket failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The handover socket.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The peer sent something the protocol does not allow.
    #[error("handover socket {path}: {reason}")]
    Protocol {
        /// The handover socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// `--takeover` without a socket, and none follows from the configuration.
    #[error(
        "--takeover: no handover socket (give its path, or run with the eBPF capture and pins)"
    )]
    NoSocket,
    /// The peer speaks another protocol version.
    #[error("handover socket {path}: peer speaks protocol version {theirs}, this skiff {ours}")]
    Version {
        /// The handover socket.
        path: PathBuf,
        /// This skiff's version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
}

/// How one `skiff run` takes over from a running skiff and accepts its own successor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandoverOptions {
    /// `--takeover [SOCKET]`: take over from the skiff listening there (`Some(None)`: the
    /// handover socket this run would use itself).
    pub takeover: Option<Option<PathBuf>>,
    /// `--handover-socket`: where this skiff accepts a successor (default: beside its pins).
    pub socket: Option<PathBuf>,
    /// `--no-handover`: accept no successor.
    pub disabled: bool,
    /// Drop the capabilities run time does not need once started (`skiff run` without
    /// `--keep-caps`; off for in-process runs, whose threads are not skiff's own).
    pub drop_caps: bool,
}

impl HandoverOptions {
    /// Where this skiff accepts a successor: `--handover-socket`, else the default of its
    /// pin directory; `None` without either, or with `--no-handover`.
    pub fn socket_path(&self, capture: Option<&crate::bpf::CaptureConfig>) -> Option<PathBuf> {
        if self.disabled {
            return None;
        }
        self.socket.clone().or_else(|| default_for(capture))
    }

    /// The running skiff's handover socket, with `--takeover`.
    pub fn takeover_path(
        &self,
        capture: Option<&crate::bpf::CaptureConfig>,
    ) -> Result<Option<PathBuf>, TakeoverError> {
        match &self.takeover {
            None => Ok(None),
            Some(Some(p)) => Ok(Some(p.clone())),
            Some(None) => self
                .socket
                .clone()
                .or_else(|| default_for(capture))
                .map(Some)
                .ok_or(TakeoverError::NoSocket),
        }
    }
}

fn default_for(capture: Option<&crate::bpf::CaptureConfig>) -> Option<PathBuf> {
    let dir = crate::bpf::pin::dir_for(capture?).ok()??;
    default_socket(&dir)
}

/// The default handover socket of a skiff whose pins live in `pin_dir`
/// (`/run/skiff/<pin directory name>.sock`: the capture cgroup's id for the default pins).
pub fn default_socket(pin_dir: &Path) -> Option<PathBuf> {
    let name = pin_dir.file_name()?.to_str()?;
    Some(Path::new(SOCKET_ROOT).join(format!("{name}.sock")))
}

/// The listening sockets of one process: those inherited from a predecessor (taken by the
/// bind sites instead of binding) and those it serves (sent to a successor). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Sockets {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// From the predecessor, by address, not yet taken.
    inherited: BTreeMap<SocketAddr, Vec<OwnedFd>>,
    /// Duplicates of what this process listens on, by address.
    serving: BTreeMap<SocketAddr, (Role, Vec<OwnedFd>)>,
    /// The predecessor's pin directory lock (`flock` on the directory's open file).
    pin_lock: Option<(PathBuf, OwnedFd)>,
    /// Our own pin directory lock, sent to a successor.
    own_pin_lock: Option<(PathBuf, OwnedFd)>,
}

impl Sockets {
    /// An empty set (nothing inherited).
    pub fn new() -> Sockets {
        Sockets::default()
    }

    /// The sockets for `addr`: the inherited ones if the predecessor listened there (all of
    /// them, any number), else what `bind` makes. Either way this process now serves them
    /// and a successor will receive duplicates.
    pub fn listen(
        &self,
        role: Role,
        addr: SocketAddr,
        bind: impl FnOnce() -> io::Result<Vec<std::net::TcpListener>>,
    ) -> io::Result<Vec<std::net::TcpListener>> {
        let inherited = self.lock().inherited.remove(&addr);
        let socks = match inherited {
            Some(fds) if !fds.is_empty() => {
                info!(%addr, role = role.name(), count = fds.len(), "listening on inherited sockets");
                fds.into_iter().map(std::net::TcpListener::from).collect()
            }
            _ => bind()?,
        };
        let dups = socks
            .iter()
            .map(|s| s.try_clone().map(OwnedFd::from))
            .collect::<io::Result<Vec<_>>>()?;
        self.lock().serving.insert(addr, (role, dups));
        Ok(socks)
    }

    /// [`Sockets::listen`] for a bind site that serves one tokio listener per address.
    pub fn listen_one(
        &self,
        role: Role,
        addr: SocketAddr,
        bind: impl FnOnce() -> io::Result<tokio::net::TcpListener>,
    ) -> io::Result<tokio::net::TcpListener> {
        let mut socks = self.listen(role, addr, || Ok(vec![bind()?.into_std()?]))?;
        // More than one inherited socket (a predecessor with workers): this process accepts
        // on the first; the others stay open in `serving` for a successor.
        let first = socks.swap_remove(0);
        first.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(first)
    }

    /// Stops handing `addr` to a successor (its listener was removed); the socket closes
    /// once the accept loop drops it.
    pub fn forget(&self, addr: SocketAddr) {
        self.lock().serving.remove(&addr);
    }

    /// Records this process's pin directory lock, to be sent to a successor.
    pub fn set_pin_lock(&self, dir: PathBuf, lock: OwnedFd) {
        self.lock().own_pin_lock = Some((dir, lock));
    }

    /// The predecessor's pin directory lock, once (the capture adopts it).
    pub fn take_inherited_pin_lock(&self) -> Option<(PathBuf, OwnedFd)> {
        self.lock().pin_lock.take()
    }

    /// Addresses inherited but never taken by a bind site (the configuration no longer
    /// listens there); closed when this returns.
    pub fn drop_unused(&self) -> Vec<SocketAddr> {
        let unused = std::mem::take(&mut self.lock().inherited);
        unused.into_keys().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Duplicates of every socket served now, and of the pin lock, as SOCKET records.
    fn snapshot(&self) -> io::Result<Vec<(Record, OwnedFd)>> {
        let g = self.lock();
        let mut out = Vec::new();
        for (addr, (role, fds)) in &g.serving {
            for fd in fds {
                out.push((Record::socket(*role, addr.to_string()), fd.try_clone()?));
            }
        }
        if let Some((dir, fd)) = &g.own_pin_lock {
            out.push((
                Record::socket(Role::PinLock, dir.display().to_string()),
                fd.try_clone()?,
            ));
        }
        Ok(out)
    }
}

// === the new process ===

/// The connection to the predecessor, after its sockets arrived; [`Predecessor::drain`] tells
/// it to stop.
#[derive(Debug)]
pub struct Predecessor {
    path: PathBuf,
    conn: OwnedFd,
}

/// Connects to the running skiff's handover socket at `path` and receives its sockets.
pub fn receive(path: &Path) -> Result<(Sockets, Predecessor), TakeoverError> {
    let io_err = |what, source| TakeoverError::Io {
        what,
        path: path.into(),
        source,
    };
    let conn = seqpacket().map_err(|e| io_err("creating a socket for", e))?;
    let addr = UnixAddr::new(path).map_err(|e| io_err("naming", e.into()))?;
    connect(conn.as_raw_fd(), &addr).map_err(|e| io_err("connecting to", e.into()))?;
    set_timeout(&conn).map_err(|e| io_err("setting timeouts on", e))?;
    proto::send(&conn, &Record::Hello(VERSION), None).map_err(|e| io_err("sending to", e))?;
    let recv = |conn: &OwnedFd| proto::recv(conn).map_err(|e| io_err("receiving from", e));
    let protocol = |reason: String| TakeoverError::Protocol {
        path: path.into(),
        reason,
    };
    match recv(&conn)? {
        (Record::Hello(v), _) if v == VERSION => {}
        (Record::Hello(theirs), _) => {
            return Err(TakeoverError::Version {
                path: path.into(),
                ours: VERSION,
                theirs,
            });
        }
        (Record::Err(msg), _) => return Err(protocol(format!("refused: {msg}"))),
        (r, _) => return Err(protocol(format!("expected HELLO, got {}", r.kind_name()))),
    }
    let sockets = Sockets::new();
    let mut count = 0u32;
    loop {
        match recv(&conn)? {
            (Record::Socket { role, text }, Some(fd)) => {
                count += 1;
                let mut g = sockets.lock();
                if role == Role::PinLock {
                    g.pin_lock = Some((PathBuf::from(text), fd));
                    continue;
                }
                let addr: SocketAddr = text
                    .parse()
                    .map_err(|_| protocol(format!("bad address {text:?}")))?;
                g.inherited.entry(addr).or_default().push(fd);
            }
            (Record::Socket { text, .. }, None) => {
                return Err(protocol(format!("SOCKET {text} came without its fd")));
            }
            (Record::End(n), _) if n == count => break,
            (Record::End(n), _) => {
                return Err(protocol(format!("END says {n} sockets, {count} arrived")));
            }
            (r, _) => return Err(protocol(format!("unexpected {}", r.kind_name()))),
        }
    }
    info!(path = %path.display(), sockets = count, "received the running skiff's sockets");
    Ok((
        sockets,
        Predecessor {
            path: path.into(),
            conn,
        },
    ))
}

impl Predecessor {
    /// Tells the predecessor to drain and waits until it has stopped owning the handover
    /// socket (so this process can listen there itself).
    pub fn drain(self) -> Result<(), TakeoverError> {
        let io_err = |what, source| TakeoverError::Io {
            what,
            path: self.path.clone(),
            source,
        };
        proto::send(&self.conn, &Record::Drain, None).map_err(|e| io_err("sending to", e))?;
        match proto::recv(&self.conn).map_err(|e| io_err("receiving from", e))? {
            (Record::Draining, _) => Ok(()),
            (r, _) => Err(TakeoverError::Protocol {
                path: self.path.clone(),
                reason: format!("expected DRAINING, got {}", r.kind_name()),
            }),
        }
    }
}

// === the running process ===

/// Listens on `path` for a successor on its own thread (blocking socket calls, never on the
/// runtime). When a successor has its sockets and asks to drain, `on_drain` runs (once) and
/// the thread ends. A stale socket file at `path` is replaced.
pub fn serve(
    path: &Path,
    sockets: Sockets,
    on_drain: impl FnOnce() + Send + 'static,
) -> Result<HandoverSocket, TakeoverError> {
    let io_err = |what, source| TakeoverError::Io {
        what,
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating the directory of", e))?;
    }
    let listener = seqpacket().map_err(|e| io_err("creating", e))?;
    let addr = UnixAddr::new(path).map_err(|e| io_err("naming", e.into()))?;
    if let Err(e) = bind(listener.as_raw_fd(), &addr) {
        if e != nix::errno::Errno::EADDRINUSE || live(path) {
            return Err(io_err("binding", e.into()));
        }
        // Left by a killed skiff: nobody accepts on it.
        std::fs::remove_file(path).map_err(|e| io_err("removing the stale", e))?;
        bind(listener.as_raw_fd(), &addr).map_err(|e| io_err("binding", e.into()))?;
    }
    listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
        .map_err(|e| io_err("listening on", e.into()))?;
    let handle = HandoverSocket {
        path: path.into(),
        id: identity(path),
        removed: Arc::default(),
    };
    let owned = handle.clone();
    std::thread::Builder::new()
        .name("skiff-handover".into())
        .spawn(move || accept_successors(listener, owned, sockets, on_drain))
        .map_err(|e| io_err("starting the thread of", e))?;
    info!(path = %path.display(), "handover socket up");
    Ok(handle)
}

/// The handover socket this process listens on; [`HandoverSocket::remove`] unlinks it unless
/// a successor's socket has replaced it.
#[derive(Clone, Debug)]
pub struct HandoverSocket {
    path: PathBuf,
    id: Option<FileId>,
    /// Unlinked once already: the path may be a successor's socket now.
    removed: Arc<std::sync::atomic::AtomicBool>,
}

impl HandoverSocket {
    /// Unlinks the socket file once, if it is still ours.
    pub fn remove(&self) {
        if self.removed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if self.id.is_some() && identity(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_successors(
    listener: OwnedFd,
    handle: HandoverSocket,
    sockets: Sockets,
    on_drain: impl FnOnce(),
) {
    loop {
        let conn = match accept(listener.as_raw_fd()) {
            // SAFETY: accept returned a new fd that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "handover socket: accept failed; no takeover possible");
                return;
            }
        };
        match hand_over(&conn, &sockets) {
            Ok(()) => {
                // The successor serves: free the path for its own handover socket, stop.
                handle.remove();
                on_drain();
                if let Err(e) = proto::send(&conn, &Record::Draining, None) {
                    warn!(error = %e, "handover socket: could not confirm the drain");
                }
                return;
            }
            Err(e) => warn!(error = %e, "handover to a successor failed; serving on"),
        }
    }
}

/// One successor: version check, the sockets, then its DRAIN.
fn hand_over(conn: &OwnedFd, sockets: &Sockets) -> io::Result<()> {
    set_timeout(conn)?;
    match proto::recv(conn)? {
        (Record::Hello(v), _) if v == VERSION => {}
        (Record::Hello(v), _) => {
            let msg = format!("version {v} is not {VERSION}");
            let _ = proto::send(conn, &Record::Err(msg.clone()), None);
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        }
        (r, _) => return Err(bad(format!("expected HELLO, got {}", r.kind_name()))),
    }
    proto::send(conn, &Record::Hello(VERSION), None)?;
    let records = sockets.snapshot()?;
    for (r, fd) in &records {
        proto::send(conn, r, Some(fd))?;
    }
    proto::send(conn, &Record::End(records.len() as u32), None)?;
    info!(
        sockets = records.len(),
        "sent the listening sockets to a successor"
    );
    // The successor starts serving before it asks; that may take a while (capture load).
    nix::sys::socket::setsockopt(
        conn,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 0),
    )
    .map_err(io::Error::from)?;
    match proto::recv(conn)? {
        (Record::Drain, _) => Ok(()),
        (r, _) => Err(bad(format!("expected DRAIN, got {}", r.kind_name()))),
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn set_timeout(fd: &OwnedFd) -> io::Result<()> {
    let t = nix::sys::time::TimeVal::new(PEER_TIMEOUT.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::ReceiveTimeout, &t)?;
    nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::SendTimeout, &t)?;
    Ok(())
}

/// Whether a process accepts on the Unix socket at `path`.
fn live(path: &Path) -> bool {
    let Ok(fd) = seqpacket() else { return false };
    UnixAddr::new(path)
        .ok()
        .is_some_and(|a| connect(fd.as_raw_fd(), &a).is_ok())
}

/// A file's identity: tmpfs reuses an unlinked socket's inode number at once, so the change
/// time goes with it.
type FileId = (u64, u64, i64, i64);

fn identity(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

#[cfg(test)]
mod tests;
