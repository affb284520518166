//! TLS at run time: validated TLS contexts ([`crate::model::tls`]) plus the snapshot's
//! secrets become rustls configurations, and connections are handshaken with them.
//!
//! # Layout
//! - [`contexts`]: [`TlsContexts`], the cache (one per data plane) that builds
//!   [`ClientTls`] and [`ServerTls`] from a context and the exact secrets it resolved, so a
//!   rotated secret reaches new connections while established sessions keep theirs.
//! - `load`: secrets and `DataSource`s -> certificates, keys and roots; [`TlsError`] names
//!   the secret or file and what is wrong with it.
//! - `verify`: peer verification as Envoy does it (not as browsers): chain to the trusted
//!   CA, then the SAN matchers; the hostname is never checked against SNI.
//! - `identity`: the peer's [`PeerIdentity`] (URI and DNS SANs, RFC 2253 subject).
//! - [`handshake`]: [`connect`] and [`accept`], and [`HandshakeError`], classified as Envoy's
//!   `ssl.*` stats.
//! - [`negotiated`]: what a handshake negotiated, under Envoy's `ssl.versions/ciphers/curves`
//!   stat names.
//! - [`inspect`]: `tls_inspector`, a pure ClientHello parser (TLS or not, SNI, ALPN) over
//!   peeked bytes, for filter chain matching before any handshake.

pub mod contexts;
pub mod handshake;
mod identity;
pub mod inspect;
mod load;
pub mod negotiated;
mod verify;

#[cfg(test)]
mod tests;

pub use contexts::{ClientTls, ServerTls, TlsContexts};
pub use handshake::{Accepted, HandshakeError, Handshaken, accept, connect};
pub use identity::peer_identity;
pub use load::TlsError;
pub use verify::{ChainRejected, SanMismatch};

pub use crate::rbac::PeerIdentity;
