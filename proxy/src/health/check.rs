//! One active health check against one host: TCP (connect, optional send and fuzzy receive)
//! or HTTP/1.1 (GET path, status in the expected ranges), all within the check's timeout.
//! A host the cluster dials with TLS is checked over TLS, as Envoy checks through the
//! cluster's transport socket: the handshake (and the peer's verification) is part of the
//! check, so a host presenting the wrong identity is unhealthy.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::addr::EndpointAddr;
use crate::http::upstream_tls::{TlsFailure, originate};
use crate::model::cluster::lb::{HealthCheck, HealthCheckKind};
use crate::net::{self as connect, ConnectError};
use crate::stats::Stats;
use crate::tls::ClientTls;

/// Result of one check.
#[derive(Debug)]
pub enum Verdict {
    /// Passed.
    Healthy,
    /// Failed, and why.
    Unhealthy(CheckError),
}

/// Why one check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The connect failed or timed out.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// TLS failed: the context cannot be built (a secret not delivered yet), the handshake
    /// failed or the host's certificate was refused.
    #[error(transparent)]
    Tls(#[from] TlsFailure),
    /// Writing the TCP payload or the HTTP request failed.
    #[error("send: {0}")]
    Send(#[source] io::Error),
    /// Reading the answer failed.
    #[error("read: {0}")]
    Read(#[source] io::Error),
    /// The TCP check read its limit without finding the expected payloads.
    #[error("answer does not match")]
    NoMatch,
    /// The host closed before sending the expected TCP payloads.
    #[error("connection closed before the expected answer")]
    ClosedBeforeAnswer,
    /// The HTTP check read its limit without a status line.
    #[error("no status line")]
    NoStatusLine,
    /// The host closed before sending an HTTP status line.
    #[error("connection closed before the status line")]
    ClosedBeforeStatusLine,
    /// The first line is not `HTTP/1.x <status> ...`.
    #[error("bad status line {0:?}")]
    BadStatusLine(String),
    /// The HTTP status is outside the expected ranges.
    #[error("status {0}")]
    Status(u16),
    /// No answer within the check's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl CheckError {
    /// Whether the check timed out (connect or answer): Envoy's `network_failure`.
    pub fn is_timeout(&self) -> bool {
        match self {
            CheckError::Timeout(_) => true,
            CheckError::Connect(e) => e.is_timeout(),
            CheckError::Tls(TlsFailure::Timeout(_)) => true,
            _ => false,
        }
    }
}

/// Largest answer read from a host (status line, TCP receive payloads).
const MAX_READ: usize = 16 * 1024;

/// How a check dials TLS: the configuration, and where its handshakes count (the
/// cluster's `ssl.*`, as Envoy's checks go through the cluster's transport socket).
#[derive(Debug, Clone)]
pub struct TlsCheck {
    /// The client configuration.
    pub tls: ClientTls,
    /// The stats registry.
    pub stats: std::sync::Arc<Stats>,
    /// The cluster's name.
    pub cluster: std::sync::Arc<str>,
}

/// Check `target` once, over TLS with `tls` when the cluster dials the host with TLS.
pub async fn run(
    hc: &HealthCheck,
    target: SocketAddr,
    mark: Option<u32>,
    tls: Option<&TlsCheck>,
) -> Verdict {
    match tokio::time::timeout(hc.timeout, attempt(hc, target, mark, tls)).await {
        Ok(Ok(())) => Verdict::Healthy,
        Ok(Err(e)) => Verdict::Unhealthy(e),
        Err(_) => Verdict::Unhealthy(CheckError::Timeout(hc.timeout)),
    }
}

/// Connect, ask, judge the answer; the caller bounds it by the check's timeout.
async fn attempt(
    hc: &HealthCheck,
    target: SocketAddr,
    mark: Option<u32>,
    tls: Option<&TlsCheck>,
) -> Result<(), CheckError> {
    let tcp = connect::connect(EndpointAddr(target), mark, hc.timeout).await?;
    match tls {
        None => probe(hc, tcp).await,
        Some(t) => {
            let o = originate(&t.stats, &t.cluster, &t.tls, tcp, target, hc.timeout).await?;
            probe(hc, o.stream).await
        }
    }
}

/// Ask and judge the answer on an established stream (TCP or TLS).
async fn probe<S: AsyncRead + AsyncWrite + Unpin>(
    hc: &HealthCheck,
    mut s: S,
) -> Result<(), CheckError> {
    match &hc.kind {
        HealthCheckKind::Tcp { send, receive } => {
            if !send.is_empty() {
                s.write_all(send).await.map_err(CheckError::Send)?;
            }
            if receive.is_empty() {
                return Ok(());
            }
            // Envoy's fuzzy match: each block must appear, in order, not necessarily adjacent.
            let mut buf = Vec::new();
            let mut chunk = [0u8; 2048];
            loop {
                if fuzzy_match(&buf, receive) {
                    return Ok(());
                }
                if buf.len() > MAX_READ {
                    return Err(CheckError::NoMatch);
                }
                let n = s.read(&mut chunk).await.map_err(CheckError::Read)?;
                if n == 0 {
                    return Err(CheckError::ClosedBeforeAnswer);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        HealthCheckKind::Http {
            host,
            path,
            expected_statuses,
        } => {
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Envoy/HC\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(CheckError::Send)?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let line = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break String::from_utf8_lossy(&buf[..i]).into_owned();
                }
                if buf.len() > MAX_READ {
                    return Err(CheckError::NoStatusLine);
                }
                let n = s.read(&mut chunk).await.map_err(CheckError::Read)?;
                if n == 0 {
                    return Err(CheckError::ClosedBeforeStatusLine);
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let status = parse_status(&line).ok_or(CheckError::BadStatusLine(line))?;
            if expected_statuses
                .iter()
                .any(|(lo, hi)| (*lo..*hi).contains(&status))
            {
                Ok(())
            } else {
                Err(CheckError::Status(status))
            }
        }
    }
}

/// `HTTP/1.1 200 OK` -> 200.
pub fn parse_status(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    let v = parts.next()?;
    if !v.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Whether every block of `want` appears in `got`, in order.
pub fn fuzzy_match(got: &[u8], want: &[Vec<u8>]) -> bool {
    let mut at = 0usize;
    for w in want {
        if w.is_empty() {
            continue;
        }
        match got[at..].windows(w.len()).position(|x| x == w.as_slice()) {
            Some(i) => at += i + w.len(),
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn status_and_fuzzy() {
        assert_eq!(parse_status("HTTP/1.1 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status("SSH-2.0"), None);
        assert!(fuzzy_match(
            b"xxPONGyyOK",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
        assert!(!fuzzy_match(
            b"OKxxPONG",
            &[b"PONG".to_vec(), b"OK".to_vec()]
        ));
    }

    fn hc(kind: HealthCheckKind) -> HealthCheck {
        HealthCheck {
            timeout: Duration::from_secs(2),
            interval: Duration::from_secs(1),
            no_traffic_interval: Duration::from_secs(1),
            unhealthy_threshold: 1,
            healthy_threshold: 1,
            alt_port: None,
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            kind,
            transport_match: None,
            tls_alpn: Vec::new(),
        }
    }

    #[tokio::test]
    async fn http_check_reads_the_status() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 512];
                let n = s.read(&mut b).await.unwrap();
                assert!(String::from_utf8_lossy(&b[..n]).starts_with("GET /healthz HTTP/1.1\r\n"));
                s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let c = hc(HealthCheckKind::Http {
            host: "svc".into(),
            path: "/healthz".into(),
            expected_statuses: vec![(200, 201)],
        });
        assert!(matches!(run(&c, addr, None, None).await, Verdict::Healthy));
        assert!(matches!(
            run(&c, addr, None, None).await,
            Verdict::Unhealthy(CheckError::Status(503))
        ));
    }

    #[tokio::test]
    async fn a_host_that_never_answers_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Accepts and holds the connection, never sending the expected payload.
        let held = tokio::spawn(async move { l.accept().await.map(|(s, _)| s) });
        let mut c = hc(HealthCheckKind::Tcp {
            send: b"PING".to_vec(),
            receive: vec![b"PONG".to_vec()],
        });
        c.timeout = Duration::from_millis(200);
        match run(&c, addr, None, None).await {
            Verdict::Unhealthy(e @ CheckError::Timeout(_)) => assert!(e.is_timeout()),
            v => panic!("{v:?}"),
        }
        drop(held.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn tcp_check_connect_refused_is_unhealthy() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let c = hc(HealthCheckKind::Tcp {
            send: vec![],
            receive: vec![],
        });
        match run(&c, addr, None, None).await {
            Verdict::Unhealthy(e @ CheckError::Connect(ConnectError::Failed { .. })) => {
                assert!(!e.is_timeout());
            }
            v => panic!("{v:?}"),
        }
    }
}
