//! The records of the handover protocol and their encoding: one record per `SOCK_SEQPACKET`
//! message, at most one fd (SCM_RIGHTS) per record.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The protocol version; a peer with another one is refused.
pub const VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"SKIFFHO1";
const MAX_RECORD: usize = 1024;

const HELLO: u8 = 1;
const SOCKET: u8 = 2;
const END: u8 = 3;
const DRAIN: u8 = 4;
const DRAINING: u8 = 5;
const ERR: u8 = 6;

/// What a handed-over fd is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The capture listener (15001, v4 or v6).
    Capture = 1,
    /// The local inbound listener (15006).
    Inbound = 2,
    /// A bootstrap or LDS listener bound to its port.
    Listener = 3,
    /// The admin listener.
    Admin = 4,
    /// The open pin directory holding the `flock` of the running skiff.
    PinLock = 5,
}

impl Role {
    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Capture => "capture",
            Role::Inbound => "inbound",
            Role::Listener => "listener",
            Role::Admin => "admin",
            Role::PinLock => "pin_lock",
        }
    }

    fn from_u8(b: u8) -> Option<Role> {
        Some(match b {
            1 => Role::Capture,
            2 => Role::Inbound,
            3 => Role::Listener,
            4 => Role::Admin,
            5 => Role::PinLock,
            _ => return None,
        })
    }
}

/// One message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// The magic and the sender's version.
    Hello(u32),
    /// One fd (attached) with its role and address (or pin directory).
    Socket {
        /// What it is.
        role: Role,
        /// Its address, or the pin directory.
        text: String,
    },
    /// All SOCKET records were sent: their number.
    End(u32),
    /// The successor serves: drain.
    Drain,
    /// The predecessor drains and no longer owns the handover socket.
    Draining,
    /// A refusal with its reason.
    Err(String),
}

impl Record {
    /// A SOCKET record.
    pub fn socket(role: Role, text: String) -> Record {
        Record::Socket { role, text }
    }

    /// Its name in errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Record::Hello(_) => "HELLO",
            Record::Socket { .. } => "SOCKET",
            Record::End(_) => "END",
            Record::Drain => "DRAIN",
            Record::Draining => "DRAINING",
            Record::Err(_) => "ERR",
        }
    }

    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16);
        match self {
            Record::Hello(v) => {
                b.push(HELLO);
                b.extend_from_slice(MAGIC);
                b.extend_from_slice(&v.to_le_bytes());
            }
            Record::Socket { role, text } => {
                b.push(SOCKET);
                b.push(*role as u8);
                b.extend_from_slice(text.as_bytes());
            }
            Record::End(n) => {
                b.push(END);
                b.extend_from_slice(&n.to_le_bytes());
            }
            Record::Drain => b.push(DRAIN),
            Record::Draining => b.push(DRAINING),
            Record::Err(msg) => {
                b.push(ERR);
                b.extend_from_slice(msg.as_bytes());
            }
        }
        b
    }

    /// Parses one record; `Err` says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Record, String> {
        let (&kind, rest) = b.split_first().ok_or("empty record")?;
        let u32_of = |r: &[u8]| -> Result<u32, String> {
            r.try_into()
                .map(u32::from_le_bytes)
                .map_err(|_| format!("record {kind}: {} bytes, want 4", r.len()))
        };
        let text = |r: &[u8]| String::from_utf8(r.to_vec()).map_err(|_| "text is not UTF-8");
        Ok(match kind {
            HELLO => {
                let v = rest
                    .strip_prefix(MAGIC)
                    .ok_or("HELLO without skiff's magic")?;
                Record::Hello(u32_of(v)?)
            }
            SOCKET => {
                let (&r, t) = rest.split_first().ok_or("SOCKET without a role")?;
                let role = Role::from_u8(r).ok_or_else(|| format!("unknown role {r}"))?;
                Record::Socket {
                    role,
                    text: text(t)?,
                }
            }
            END => Record::End(u32_of(rest)?),
            DRAIN if rest.is_empty() => Record::Drain,
            DRAINING if rest.is_empty() => Record::Draining,
            ERR => Record::Err(text(rest)?),
            k => return Err(format!("unknown record kind {k} ({} bytes)", b.len())),
        })
    }
}

/// Sends `r` on `conn`, with `fd` attached.
pub fn send(conn: &OwnedFd, r: &Record, fd: Option<&OwnedFd>) -> io::Result<()> {
    let bytes = r.encode();
    let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    loop {
        match sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one record and the fd attached to it, if any. EOF is `UnexpectedEof`.
pub fn recv(conn: &OwnedFd) -> io::Result<(Record, Option<OwnedFd>)> {
    let mut buf = [0u8; MAX_RECORD];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (n, mut fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(got) = c {
                        // SAFETY: SCM_RIGHTS installed these fds in this process; nothing
                        // else owns them.
                        fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the handover connection",
        ));
    }
    if truncated || fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record too long or with more than one fd",
        ));
    }
    let r = Record::decode(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((r, fds.pop()))
}
