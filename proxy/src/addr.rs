//! Typed socket addresses: one newtype per role, so a connect target can never be
//! confused with the address a client used or the one skiff listens on.

use std::fmt;
use std::net::SocketAddr;

macro_rules! addr_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub SocketAddr);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl $name {
            /// The plain socket address.
            pub fn get(&self) -> SocketAddr {
                self.0
            }
        }
    };
}

addr_newtype!(
    /// The downstream peer of an accepted connection.
    ClientAddr
);
addr_newtype!(
    /// An address skiff listens on.
    ListenAddr
);
addr_newtype!(
    /// The destination the client asked for before capture rewrote it.
    OrigDstAddr
);
addr_newtype!(
    /// An upstream address skiff connects to.
    EndpointAddr
);

/// An original destination may become the upstream target (passthrough, ORIGINAL_DST clusters);
/// never the reverse.
impl From<OrigDstAddr> for EndpointAddr {
    fn from(a: OrigDstAddr) -> Self {
        EndpointAddr(a.0)
    }
}
