//! TLS handshakes on an established transport: [`connect`] (upstream) and [`accept`]
//! (downstream), with failures classified as Envoy's `ssl.*` statistics.

use std::io;
use std::net::IpAddr;

use rustls::server::Acceptor;
use rustls::{CertificateError, CommonState};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector, client, server};

use super::contexts::{ClientTls, ServerTls};
use super::identity::peer_identity;
use super::verify::{ChainRejected, SanMismatch};
use crate::rbac::PeerIdentity;

/// Why a TLS handshake failed, as Envoy's `ssl.*` counters tell it apart.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// `ssl.fail_verify_san`: the peer's certificate matched no SAN matcher.
    #[error("{0}")]
    San(SanMismatch),
    /// `ssl.fail_verify_error`: the peer's certificate did not verify (unknown issuer,
    /// expired, wrong key usage, bad encoding...).
    #[error("{0}")]
    Verify(ChainRejected),
    /// `ssl.fail_verify_no_cert`: a client certificate is required and none was sent.
    #[error("peer presented no certificate, and one is required")]
    NoCert,
    /// `ssl.connection_error`: any other failure (I/O, protocol, an alert from the peer,
    /// no common version or cipher suite...).
    #[error("TLS handshake failed: {0}")]
    Connection(#[source] io::Error),
}

impl HandshakeError {
    /// The `ssl.<suffix>` counter this failure counts in, as Envoy names it.
    pub fn stat_suffix(&self) -> &'static str {
        match self {
            HandshakeError::San(_) => "fail_verify_san",
            HandshakeError::Verify(_) => "fail_verify_error",
            HandshakeError::NoCert => "fail_verify_no_cert",
            HandshakeError::Connection(_) => "connection_error",
        }
    }

    /// Classify an error of tokio-rustls (which carries rustls's in an `io::Error`).
    pub fn from_io(err: io::Error) -> Self {
        let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return HandshakeError::Connection(err);
        };
        match tls {
            rustls::Error::NoCertificatesPresented => HandshakeError::NoCert,
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                if let Some(m) = other.0.downcast_ref::<SanMismatch>() {
                    HandshakeError::San(m.clone())
                } else if let Some(c) = other.0.downcast_ref::<ChainRejected>() {
                    HandshakeError::Verify(c.clone())
                } else {
                    HandshakeError::Verify(ChainRejected {
                        reason: other.to_string(),
                        presented: Vec::new(),
                    })
                }
            }
            rustls::Error::InvalidCertificate(c) => HandshakeError::Verify(ChainRejected {
                reason: c.to_string(),
                presented: Vec::new(),
            }),
            _ => HandshakeError::Connection(err),
        }
    }
}

/// A finished client handshake.
#[derive(Debug)]
pub struct Handshaken<S> {
    /// The encrypted stream.
    pub stream: client::TlsStream<S>,
    /// The server's identity (its certificate, verified as the context asked).
    pub peer: PeerIdentity,
    /// The negotiated application protocol.
    pub alpn: Option<Vec<u8>>,
}

/// A finished server handshake.
#[derive(Debug)]
pub struct Accepted<S> {
    /// The encrypted stream.
    pub stream: server::TlsStream<S>,
    /// The client's identity, when it presented a (verified) certificate: RBAC's
    /// `authenticated` principal.
    pub peer: Option<PeerIdentity>,
    /// The negotiated application protocol.
    pub alpn: Option<Vec<u8>>,
    /// The SNI the client sent.
    pub sni: Option<String>,
}

/// TLS over `io` to `peer` (the endpoint's address: the session-resumption key when the
/// context sets no SNI), as `tls` says.
///
/// With TLS 1.3 the client finishes before the server has checked the client certificate:
/// a server refusing it shows up as an error (a fatal alert) on the stream's first read,
/// not here. No timeout is applied; callers bound the handshake as their connect.
pub async fn connect<S>(
    io: S,
    tls: &ClientTls,
    peer: IpAddr,
) -> Result<Handshaken<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stream = TlsConnector::from(tls.config.clone())
        .connect(tls.server_name(peer), io)
        .await
        .map_err(HandshakeError::from_io)?;
    let conn = stream.get_ref().1;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    // A server always presents a certificate; one that does not parse cannot have passed a
    // validation context, so the empty identity only appears when nothing was validated.
    let peer = identity(conn).unwrap_or_default();
    Ok(Handshaken { stream, peer, alpn })
}

/// TLS from a client over `io`, as `tls` says. The ClientHello is read first to pick the
/// configuration: a client offering none of the context's ALPN protocols is served without
/// ALPN, as Envoy does, rather than refused. A resumed session keeps the identity of the
/// certificate its first handshake verified. No timeout is applied.
pub async fn accept<S>(io: S, tls: &ServerTls) -> Result<Accepted<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = LazyConfigAcceptor::new(Acceptor::default(), io)
        .await
        .map_err(HandshakeError::from_io)?;
    let config = {
        let hello = start.client_hello();
        tls.config_for(hello.alpn()).clone()
    };
    let stream = start
        .into_stream(config)
        .await
        .map_err(HandshakeError::from_io)?;
    let conn = stream.get_ref().1;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let sni = conn.server_name().map(str::to_string);
    let peer = identity(conn);
    Ok(Accepted {
        stream,
        peer,
        alpn,
        sni,
    })
}

fn identity(conn: &CommonState) -> Option<PeerIdentity> {
    peer_identity(conn.peer_certificates()?.first()?)
}
