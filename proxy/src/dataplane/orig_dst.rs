//! The original destination of a redirected connection, read once at accept.
//!
//! The same `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` call works whether skiff's
//! `cgroup/getsockopt` program or iptables REDIRECT (conntrack) answers it.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

use crate::addr::OrigDstAddr;

/// Read the original destination of an accepted connection, by the socket's family.
/// `Ok(None)` when nothing redirected it (the kernel answers ENOENT).
pub fn read(stream: &TcpStream) -> io::Result<Option<OrigDstAddr>> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let res = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    match res {
        Ok(sa) => Ok(sa.as_socket().map(OrigDstAddr)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENOPROTOOPT)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}
