//! One active health check against one host: TCP (connect, optional send and fuzzy receive)
//! or HTTP/1.1 (GET path, status in the expected ranges), all within the check's timeout.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::addr::EndpointAddr;
use crate::model::cluster::lb::{HealthCheck, HealthCheckKind};
use crate::net as connect;

/// Result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Passed.
    Healthy,
    /// Failed.
    Unhealthy {
        /// The check timed out (connect or answer).
        timeout: bool,
        /// What went wrong.
        reason: String,
    },
}

/// Largest answer read from a host (status line, TCP receive payloads).
const MAX_READ: usize = 16 * 1024;

/// Check `target` once.
pub async fn run(hc: &HealthCheck, target: SocketAddr, mark: Option<u32>) -> Verdict {
    match tokio::time::timeout(hc.timeout, attempt(hc, target, mark)).await {
        Ok(Ok(())) => Verdict::Healthy,
        Ok(Err(reason)) => Verdict::Unhealthy {
            timeout: false,
            reason,
        },
        Err(_) => Verdict::Unhealthy {
            timeout: true,
            reason: format!("no answer within {:?}", hc.timeout),
        },
    }
}

async fn attempt(hc: &HealthCheck, target: SocketAddr, mark: Option<u32>) -> Result<(), String> {
    let mut s = connect::connect(EndpointAddr(target), mark, hc.timeout)
        .await
        .map_err(|e| e.to_string())?;
    match &hc.kind {
        HealthCheckKind::Tcp { send, receive } => {
            if !send.is_empty() {
                s.write_all(send).await.map_err(|e| format!("send: {e}"))?;
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
                    return Err("answer does not match".into());
                }
                let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed before the expected answer".into());
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
                .map_err(|e| format!("send: {e}"))?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let line = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break String::from_utf8_lossy(&buf[..i]).into_owned();
                }
                if buf.len() > MAX_READ {
                    return Err("no status line".into());
                }
                let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err("connection closed before the status line".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let status = parse_status(&line).ok_or_else(|| format!("bad status line {line:?}"))?;
            if expected_statuses
                .iter()
                .any(|(lo, hi)| (*lo..*hi).contains(&status))
            {
                Ok(())
            } else {
                Err(format!("status {status}"))
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
    use std::time::Duration;
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
        assert_eq!(run(&c, addr, None).await, Verdict::Healthy);
        assert!(matches!(
            run(&c, addr, None).await,
            Verdict::Unhealthy { timeout: false, .. }
        ));
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
        assert!(matches!(
            run(&c, addr, None).await,
            Verdict::Unhealthy { .. }
        ));
    }
}
