//! The Rust load generators and backend, run as `xtask bench --helper ...` subprocesses so they
//! can live inside the bench namespace (and the pod cgroup for the eBPF path).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Result of one ping-pong run (microseconds).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingPong {
    /// Round trips measured (after warm-up).
    pub count: u64,
    /// Wall time of the measurement, seconds.
    pub secs: f64,
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Mean.
    pub mean_us: f64,
}

/// Result of one connection-rate run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnRate {
    /// Connections completed (connect, 1-byte round trip, close).
    pub count: u64,
    /// Wall time, seconds.
    pub secs: f64,
    /// Failed attempts.
    pub errors: u64,
}

/// Entry point of `xtask bench --helper MODE ARGS...`.
pub fn helper(args: &[String]) -> anyhow::Result<()> {
    // If xtask dies without its guards running, do not outlive it.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("helper argument {i} missing: {args:?}"))
    };
    match arg(0)? {
        "echo" => echo_server(arg(1)?),
        "pingpong" => {
            let r = pingpong(
                arg(1)?.parse()?,
                arg(2)?.parse()?,
                Duration::from_secs_f64(arg(3)?.parse()?),
                arg(4)?.parse()?,
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        "connrate" => {
            let r = connrate(
                arg(1)?.parse()?,
                Duration::from_secs_f64(arg(2)?.parse()?),
                arg(3)?.parse()?,
                arg(4)?.parse()?,
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        "http-open" => {
            let r = super::openloop::open_loop(
                arg(1)?.parse()?,
                arg(2)?.parse()?,
                arg(3)?.parse()?,
                Duration::from_secs_f64(arg(4)?.parse()?),
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        "http-1c" => {
            let r = super::openloop::closed_loop(
                arg(1)?.parse()?,
                Duration::from_secs_f64(arg(2)?.parse()?),
            )?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        other => bail!("unknown helper {other:?}"),
    }
}

/// Echo backend: one current-thread tokio runtime; echoes every byte until the peer closes.
fn echo_server(addr: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: SocketAddr = addr.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        let l = sock.listen(4096)?;
        println!("ready");
        std::io::stdout().flush()?;
        loop {
            let (mut s, _) = match l.accept().await {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx] as f64 / 1000.0
}

/// One connection, `size`-byte messages echoed back, one at a time, for `limit` or `max` trips.
fn pingpong(addr: SocketAddr, size: usize, limit: Duration, max: u64) -> anyhow::Result<PingPong> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    let mut trip = |s: &mut TcpStream| -> anyhow::Result<()> {
        s.write_all(&msg)?;
        s.read_exact(&mut buf).context("reading the echo")?;
        Ok(())
    };
    // Warm-up: connection set up, caches and the proxy's buffers warm.
    let warm = Instant::now();
    for _ in 0..2000 {
        if warm.elapsed() > Duration::from_millis(300) {
            break;
        }
        trip(&mut s)?;
    }
    let mut samples: Vec<u64> = Vec::with_capacity(max.min(4_000_000) as usize);
    let start = Instant::now();
    while (samples.len() as u64) < max && start.elapsed() < limit {
        let t0 = Instant::now();
        trip(&mut s)?;
        samples.push(t0.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    let mean_us = samples.iter().sum::<u64>() as f64 / samples.len().max(1) as f64 / 1000.0;
    samples.sort_unstable();
    Ok(PingPong {
        count: samples.len() as u64,
        secs,
        p50_us: percentile(&samples, 0.50),
        p99_us: percentile(&samples, 0.99),
        p999_us: percentile(&samples, 0.999),
        mean_us,
    })
}

/// `threads` loops of connect, 1-byte round trip, close; for `limit` or `max` connections.
fn connrate(
    addr: SocketAddr,
    limit: Duration,
    max: u64,
    threads: usize,
) -> anyhow::Result<ConnRate> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut hs = Vec::new();
    for _ in 0..threads.clamp(1, 16) {
        let done = done.clone();
        let errors = errors.clone();
        hs.push(std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while start.elapsed() < limit
                && done.load(Ordering::Relaxed) < max
                && errors.load(Ordering::Relaxed) < 1000
            {
                let ok = (|| -> std::io::Result<()> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"x")?;
                    s.read_exact(&mut b)?;
                    Ok(())
                })();
                match ok {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for h in hs {
        let _ = h.join();
    }
    let r = ConnRate {
        count: done.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
    };
    if r.count == 0 {
        bail!("no connection completed to {addr} ({} errors)", r.errors);
    }
    Ok(r)
}
