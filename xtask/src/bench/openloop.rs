//! HTTP/1.1 latency clients of `bench --http`: an open-loop generator at a fixed request rate
//! (wrk has no rate option) and a closed loop on one connection.
//!
//! The open loop avoids coordinated omission: request `n` of the run is due at `n / rate`
//! seconds, spread round-robin over M keep-alive connections, and a request that could not be
//! sent when due because its connection still waited for the previous answer is timed from
//! when it was due, not from when it went out. A request sent late only because the
//! generator's own timer fired late (the connection was idle) is timed from when it went out:
//! that delay is the client's, not the proxy's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The request every client sends (the backend answers `200 bench`).
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: skiff-bench\r\n\r\n";

/// Latency figures of one run, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HttpLatency {
    /// Requests answered (after warm-up).
    pub count: u64,
    /// Failed requests (connection errors, non-2xx answers).
    pub errors: u64,
    /// Wall time of the measurement, seconds.
    pub secs: f64,
    /// Answered requests per second over the measurement.
    pub achieved_rps: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest latency seen.
    pub max_us: f64,
}

/// A histogram of nanoseconds from 1 ns to 60 s with 3 significant digits (0.1 % error).
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Percentiles of `h` (nanoseconds) in microseconds.
fn summarize(h: &Histogram<u64>, errors: u64, secs: f64) -> HttpLatency {
    let us = |q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    HttpLatency {
        count: h.len(),
        errors,
        secs,
        achieved_rps: h.len() as f64 / secs.max(1e-9),
        p50_us: us(0.50),
        p90_us: us(0.90),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: if h.is_empty() {
            0.0
        } else {
            h.max() as f64 / 1000.0
        },
    }
}

/// When the `k`-th request of connection `c` (of `conns`) is due, from the start of the run:
/// the run's `n`-th request (n = k * conns + c) is due at n / rate.
pub fn due_offset(rate: f64, conns: usize, c: usize, k: u64) -> Duration {
    let n = k * conns as u64 + c as u64;
    Duration::from_nanos((n as f64 * 1e9 / rate) as u64)
}

/// The instant a request's latency is measured from: when it was due if its connection was
/// still busy with the previous request then (the wait is the server's doing), else when it
/// was sent (a late timer is the client's doing).
pub fn latency_start(due: Instant, prev_done: Instant, sent: Instant) -> Instant {
    if prev_done > due { due } else { sent }
}

/// If `buf` starts with a complete HTTP/1.1 response, its length and status code.
/// Only `Content-Length` framing (what the bench backend and every peer send) is understood.
pub fn complete_response(buf: &[u8]) -> anyhow::Result<Option<(usize, u16)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            bail!("response header over 64 KiB");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut len = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("content-length") {
            len = Some(v.trim().parse::<usize>().context("bad Content-Length")?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") && !v.trim().is_empty() {
            bail!("chunked responses are not supported by the bench client");
        }
    }
    let total = head_end + 4 + len.unwrap_or(0);
    Ok((buf.len() >= total).then_some((total, status)))
}

/// Read one response from `s` into `buf` (which may hold bytes of it already); returns the
/// status and leaves any bytes past the response in `buf`.
fn read_response_blocking(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((len, status)) = complete_response(buf)? {
            buf.drain(..len);
            return Ok(status);
        }
        let n = s.read(&mut chunk).context("reading the response")?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((len, status)) = complete_response(buf)? {
            buf.drain(..len);
            return Ok(status);
        }
        let n = s.read(&mut chunk).await.context("reading the response")?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One connection, one request at a time, the next sent as soon as the answer is in; latency
/// from send to the end of the answer. 300 ms of warm-up first.
pub fn closed_loop(addr: SocketAddr, limit: Duration) -> anyhow::Result<HttpLatency> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(8192);
    let mut trip = |s: &mut TcpStream| -> anyhow::Result<u16> {
        s.write_all(REQUEST)?;
        read_response_blocking(s, &mut buf)
    };
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(300) {
        trip(&mut s)?;
    }
    let mut h = new_histogram();
    let mut errors = 0;
    let start = Instant::now();
    while start.elapsed() < limit {
        let t0 = Instant::now();
        let status = trip(&mut s)?;
        if (200..300).contains(&status) {
            h.saturating_record(t0.elapsed().as_nanos() as u64);
        } else {
            errors += 1;
        }
    }
    Ok(summarize(&h, errors, start.elapsed().as_secs_f64()))
}

/// `rate` requests per second for `limit` over `conns` keep-alive connections (see the module
/// doc for how latency is timed). The connections are opened and warmed before the clock starts.
pub fn open_loop(
    addr: SocketAddr,
    rate: f64,
    conns: usize,
    limit: Duration,
) -> anyhow::Result<HttpLatency> {
    if rate <= 0.0 || conns == 0 {
        bail!("rate and connections must be positive");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::io::AsyncWriteExt;
        let mut socks = Vec::with_capacity(conns);
        for _ in 0..conns {
            let mut s =
                tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
                    .await
                    .with_context(|| format!("connecting to {addr} timed out"))?
                    .with_context(|| format!("connecting to {addr}"))?;
            s.set_nodelay(true)?;
            let mut buf = Vec::with_capacity(8192);
            s.write_all(REQUEST).await?;
            read_response(&mut s, &mut buf).await?;
            socks.push((s, buf));
        }
        let start = Instant::now() + Duration::from_millis(10);
        let mut tasks = Vec::with_capacity(conns);
        for (c, (mut s, mut buf)) in socks.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let mut h = new_histogram();
                let mut errors = 0u64;
                let mut prev_done = start;
                for k in 0.. {
                    let off = due_offset(rate, conns, c, k);
                    if off >= limit {
                        break;
                    }
                    let due = start + off;
                    tokio::time::sleep_until(due.into()).await;
                    let sent = Instant::now();
                    let ok = match s.write_all(REQUEST).await {
                        Ok(()) => read_response(&mut s, &mut buf).await,
                        Err(e) => Err(e.into()),
                    };
                    let done = Instant::now();
                    match ok {
                        Ok(status) if (200..300).contains(&status) => {
                            let from = latency_start(due, prev_done, sent);
                            h.saturating_record((done - from).as_nanos() as u64);
                        }
                        Ok(_) => errors += 1,
                        // A broken connection fails every request still due on it.
                        Err(_) => {
                            let left = (0..)
                                .map(|j| due_offset(rate, conns, c, k + j))
                                .take_while(|o| *o < limit)
                                .count();
                            return (h, errors + left as u64);
                        }
                    }
                    prev_done = done;
                }
                (h, errors)
            }));
        }
        let mut all = new_histogram();
        let mut errors = 0;
        for t in tasks {
            let (h, e) = t.await.context("a client connection task panicked")?;
            all.add(&h).context("merging histograms")?;
            errors += e;
        }
        Ok(summarize(&all, errors, start.elapsed().as_secs_f64()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_due_at_fixed_intervals_round_robin() {
        // 1000 rps over 4 connections: the run's requests 1 ms apart, each connection every 4 ms.
        let due = |c, k| due_offset(1000.0, 4, c, k).as_micros();
        assert_eq!(due(0, 0), 0);
        assert_eq!(due(1, 0), 1000);
        assert_eq!(due(3, 0), 3000);
        assert_eq!(due(0, 1), 4000);
        assert_eq!(due(2, 5), 22_000);
        // Every request of the run is due exactly once.
        let mut all: Vec<u128> = (0..4)
            .flat_map(|c| (0..250).map(move |k| due(c, k)))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000u128).map(|n| n * 1000).collect::<Vec<_>>());
    }

    #[test]
    fn a_busy_connection_is_timed_from_when_the_request_was_due() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        // The previous answer came 5 ms after this request was due: the wait counts.
        assert_eq!(latency_start(ms(10), ms(15), ms(15)), ms(10));
        // The connection was idle and the timer fired 1 ms late: that delay is the client's.
        assert_eq!(latency_start(ms(10), ms(8), ms(11)), ms(11));
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = new_histogram();
        // 1..=1000 us: p50 500 us, p99 990 us, max 1000 us (within the histogram's 0.1 %).
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let s = summarize(&h, 2, 2.0);
        assert_eq!(s.count, 1000);
        assert_eq!(s.errors, 2);
        assert!((s.achieved_rps - 500.0).abs() < 1e-9);
        for (got, want) in [(s.p50_us, 500.0), (s.p99_us, 990.0), (s.max_us, 1000.0)] {
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        }
        let empty = summarize(&new_histogram(), 0, 1.0);
        assert_eq!((empty.count, empty.p99_us), (0, 0.0));
    }

    #[test]
    fn responses_are_framed_by_content_length() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nbench";
        assert_eq!(complete_response(r).unwrap(), Some((r.len(), 200)));
        // Incomplete head or body.
        assert_eq!(complete_response(&r[..20]).unwrap(), None);
        assert_eq!(complete_response(&r[..r.len() - 1]).unwrap(), None);
        // Pipelined bytes after the response are left alone.
        let mut two = r.to_vec();
        two.extend_from_slice(b"HTTP/1.1 503");
        assert_eq!(complete_response(&two).unwrap(), Some((r.len(), 200)));
        let e = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(complete_response(e).unwrap(), Some((e.len(), 503)));
        assert!(
            complete_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err()
        );
        assert!(complete_response(b"garbage\r\n\r\n").is_err());
    }

    /// A real server that stalls once for 50 ms: the open loop must charge the stall to the
    /// requests that queued behind it (closed-loop timing would hide them).
    #[test]
    fn a_stall_shows_in_the_open_loop_tail() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut served = 0u32;
            loop {
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    served += 1;
                    if served == 20 {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nbench")
                        .is_err()
                    {
                        return;
                    }
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        // 500 rps on one connection for 400 ms: 200 requests, one every 2 ms; the 50 ms stall
        // delays about 25 requests that were due during it.
        let r = open_loop(addr, 500.0, 1, Duration::from_millis(400)).unwrap();
        assert_eq!(r.errors, 0);
        assert_eq!(r.count, 200);
        assert!(r.max_us >= 45_000.0, "max {} us", r.max_us);
        // More than 5 % of the requests waited behind the stall by 10 ms or more.
        assert!(r.p90_us >= 10_000.0, "p90 {} us", r.p90_us);
    }
}
