//! A small TCP peer for skiff's end-to-end tests. One line of `key=value` words per event on
//! stdout (flushed per line), so tests can parse it with `skiff_tests::field`.
//!
//! ```text
//! skiff-testpeer echo    <addr>           listen, print `ready local=..`, echo every connection
//! skiff-testpeer origdst <addr>           as echo, and print for each accepted connection
//!                                         `accepted peer=.. local=.. orig_dst=<addr>|orig_dst_errno=<n>`
//! skiff-testpeer client  <addr> [--bytes N] [--mark M] [--timeout-ms T] [--chunk-seed S]
//!                                         connect, send N bytes (default 1024; with
//!                                         --chunk-seed in pseudo-random write sizes from 1 B to
//!                                         128 KiB while reading concurrently), half-close, read
//!                                         the echo; print `ok peer=.. local=.. sent=N echoed=N
//!                                         elapsed_ms=..` (exit 0) or `err stage=.. errno=..
//!                                         elapsed_ms=.. msg=..` (exit 1)
//! skiff-testpeer hold    <addr> [--conns N] [--timeout-ms T]
//!                                         open N connections (default 100) and keep them
//!                                         idle; print `held n=N`; on each SIGUSR1 echo 8 bytes
//!                                         on every one and print `round ok=.. reset=.. eof=..
//!                                         other=..`; on SIGTERM close them, print `closed`, exit
//! ```
//! `origdst` uses `SO_ORIGINAL_DST` on IPv4 sockets and `IP6T_SO_ORIGINAL_DST` on IPv6 ones.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: skiff-testpeer (echo|origdst|client) <addr> [--bytes N] [--mark M] [--timeout-ms T]";
    let (Some(mode), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("bad address {addr:?}\n{usage}");
        return ExitCode::from(2);
    };
    let opt = |name: &str| -> Option<u64> {
        let i = args.iter().position(|a| a == name)?;
        let v = args.get(i + 1)?;
        v.strip_prefix("0x")
            .map(|h| u64::from_str_radix(h, 16))
            .unwrap_or_else(|| v.parse())
            .ok()
    };
    match mode.as_str() {
        "echo" => serve(addr, false),
        "origdst" => serve(addr, true),
        "hold" => hold(
            addr,
            opt("--conns").unwrap_or(100) as usize,
            Duration::from_millis(opt("--timeout-ms").unwrap_or(5000)),
        ),
        "client" => client(
            addr,
            opt("--bytes").unwrap_or(1024) as usize,
            opt("--mark").map(|m| m as u32),
            Duration::from_millis(opt("--timeout-ms").unwrap_or(5000)),
            opt("--chunk-seed"),
        ),
        _ => {
            eprintln!("{usage}");
            ExitCode::from(2)
        }
    }
}

fn serve(addr: SocketAddr, report_orig_dst: bool) -> ExitCode {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            println!(
                "err stage=bind errno={} msg={}",
                e.raw_os_error().unwrap_or(0),
                one_word(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("ready local={local}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if report_orig_dst {
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let orig = original_dst(&conn);
            println!("accepted peer={peer} local={local} {orig}");
        }
        thread::spawn(move || echo(conn));
    }
    ExitCode::SUCCESS
}

/// Long-lived idle connections, checked on demand (SIGUSR1) for being still open end to end.
fn hold(addr: SocketAddr, n: usize, timeout: Duration) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    // Blocked before any thread exists, so `wait` below is the only taker of both.
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.add(Signal::SIGTERM);
    if let Err(e) = set.thread_block() {
        println!("err stage=sigmask msg={e}");
        return ExitCode::FAILURE;
    }
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(c) => {
                let _ = c.set_read_timeout(Some(timeout));
                conns.push(c);
            }
            Err(e) => {
                println!(
                    "err stage=connect errno={} held={} msg={}",
                    e.raw_os_error().unwrap_or(0),
                    conns.len(),
                    one_word(&e)
                );
                return ExitCode::FAILURE;
            }
        }
    }
    println!("held n={n}");
    let mut round = 0u32;
    loop {
        match set.wait() {
            Ok(Signal::SIGUSR1) => {}
            Ok(_) => break,
            Err(e) => {
                println!("err stage=sigwait msg={e}");
                return ExitCode::FAILURE;
            }
        }
        round += 1;
        let (mut ok, mut reset, mut eof, mut other) = (0, 0, 0, 0);
        for c in &mut conns {
            let msg = format!("r{round:07}");
            let mut got = [0u8; 8];
            let r = c
                .write_all(msg.as_bytes())
                .and_then(|()| c.read_exact(&mut got));
            match r {
                Ok(()) if got == msg.as_bytes() => ok += 1,
                Ok(()) => other += 1,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => eof += 1,
                Err(e) if e.raw_os_error() == Some(104) || e.raw_os_error() == Some(32) => {
                    reset += 1
                }
                Err(_) => other += 1,
            }
        }
        println!("round ok={ok} reset={reset} eof={eof} other={other}");
    }
    drop(conns);
    println!("closed");
    ExitCode::SUCCESS
}

fn original_dst(conn: &TcpStream) -> String {
    let sock = socket2::SockRef::from(conn);
    let res = match conn.local_addr() {
        Ok(SocketAddr::V6(_)) => sock.original_dst_v6(),
        _ => sock.original_dst_v4(),
    };
    match res {
        Ok(a) => match a.as_socket() {
            Some(a) => format!("orig_dst={a}"),
            None => "orig_dst_errno=0 msg=not-an-inet-address".into(),
        },
        Err(e) => format!(
            "orig_dst_errno={} msg={}",
            e.raw_os_error().unwrap_or(0),
            one_word(&e)
        ),
    }
}

fn echo(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

fn client(
    addr: SocketAddr,
    bytes: usize,
    mark: Option<u32>,
    timeout: Duration,
    chunk_seed: Option<u64>,
) -> ExitCode {
    let start = Instant::now();
    let fail = |stage: &str, e: std::io::Error| {
        println!(
            "err stage={stage} errno={} elapsed_ms={} msg={}",
            e.raw_os_error().unwrap_or(0),
            start.elapsed().as_millis(),
            one_word(&e)
        );
        ExitCode::FAILURE
    };
    let sock = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return fail("socket", e),
    };
    if let Some(m) = mark
        && let Err(e) = sock.set_mark(m)
    {
        return fail("mark", e);
    }
    if let Err(e) = sock.connect_timeout(&SockAddr::from(addr), timeout) {
        return fail("connect", e);
    }
    let _ = sock.set_read_timeout(Some(timeout));
    let peer = sock
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut stream: TcpStream = sock.into();
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut back = Vec::with_capacity(bytes);
    match chunk_seed {
        None => {
            if let Err(e) = stream.write_all(&payload) {
                return fail("write", e);
            }
            if let Err(e) = stream.shutdown(Shutdown::Write) {
                return fail("shutdown", e);
            }
            if let Err(e) = stream.read_to_end(&mut back) {
                return fail("read", e);
            }
        }
        Some(seed) => {
            // Write while reading: echoed bytes would otherwise fill both socket buffers.
            let mut writer = match stream.try_clone() {
                Ok(w) => w,
                Err(e) => return fail("clone", e),
            };
            let sent = payload.clone();
            let w = thread::spawn(move || -> std::io::Result<()> {
                let mut rng = seed | 1;
                let mut at = 0;
                while at < sent.len() {
                    // xorshift64: sizes mix tiny, small, medium and large writes.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let cap = [64u64, 1024, 16 * 1024, 128 * 1024][(rng >> 62) as usize];
                    let n = (1 + (rng % cap) as usize).min(sent.len() - at);
                    writer.write_all(&sent[at..at + n])?;
                    at += n;
                }
                writer.shutdown(Shutdown::Write)
            });
            // Read like an event-loop app: a would-block read means "wait and retry". On a
            // sockmap-accelerated socket the kernel (tcp_bpf_recvmsg) answers EAGAIN even to a
            // blocking read when a FIN arrives on the TCP path while the reader waits.
            let deadline = Instant::now() + timeout;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => back.extend_from_slice(&buf[..n]),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < deadline =>
                    {
                        thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return fail("read", e),
                }
            }
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return fail("write", e),
                Err(_) => return fail("write", std::io::Error::other("writer panicked")),
            }
        }
    }
    let same = if back == payload { "yes" } else { "no" };
    println!(
        "ok peer={peer} local={local} sent={bytes} echoed={} same={same} elapsed_ms={}",
        back.len(),
        start.elapsed().as_millis()
    );
    ExitCode::SUCCESS
}

/// An error message as one word (spaces replaced), so the line stays `key=value` words.
fn one_word(e: &std::io::Error) -> String {
    e.to_string().replace(' ', "_")
}
