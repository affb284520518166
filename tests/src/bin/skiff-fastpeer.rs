//! Backends and clients for the kernel fast-path tests: many connects from one process, each
//! learning which backend it reached from the backend's greeting. One line of `key=value`
//! words per result on stdout (parse with `skiff_tests::field`).
//!
//! ```text
//! skiff-fastpeer serve <addr>...        listen on every addr; print `ready`; greet each
//!                                       connection with `<local addr>\n`, then hold it until the
//!                                       client closes
//! skiff-fastpeer spread <vip> --n N [--src IP]
//!                                       N sequential connects (bound to source IP if given), each
//!                                       reads the greeting and closes; prints
//!                                       `ok <backend>=<count>... peer=<getpeername>`
//! skiff-fastpeer hold <vip> --n N       opens N connections and keeps them open; prints
//!                                       `held <backend>=<count>...`; for each `check` line on
//!                                       stdin prints `check alive.<backend>=N dead.<backend>=M..`
//!                                       (dead: reset or closed); exits when stdin closes
//! skiff-fastpeer udp-serve <addr>...    UDP: answer each datagram with `<local addr>`; `ready`
//! skiff-fastpeer udp-spread <vip> --n N [--connected]
//!                                       N datagrams (sendto, or connect + send), each waits for
//!                                       the answer; prints `ok <backend>=<count>... from=<addr>`
//!                                       where from is the reply's source as the app sees it
//! ```
//! Errors print `err stage=.. msg=..` and exit 1.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: skiff-fastpeer (serve|spread|hold|udp-serve|udp-spread) <addr>... [--n N] [--src IP] [--connected]";
    let Some(mode) = args.first() else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let addrs: Vec<SocketAddr> = args[1..]
        .iter()
        .take_while(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse().ok())
        .collect();
    let opt = |name: &str| -> Option<&str> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1).map(String::as_str)
    };
    let n: usize = opt("--n").and_then(|v| v.parse().ok()).unwrap_or(1);
    let src: Option<IpAddr> = opt("--src").and_then(|v| v.parse().ok());
    let connected = args.iter().any(|a| a == "--connected");
    let Some(&first) = addrs.first() else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let result = match mode.as_str() {
        "serve" => serve(&addrs),
        "spread" => spread(first, n, src),
        "hold" => hold(first, n),
        "udp-serve" => udp_serve(&addrs),
        "udp-spread" => udp_spread(first, n, connected),
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((stage, e)) => {
            println!(
                "err stage={stage} errno={} msg={}",
                e.raw_os_error().unwrap_or(0),
                e.to_string().replace(' ', "_")
            );
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), (&'static str, std::io::Error)>;

fn at(stage: &'static str) -> impl FnOnce(std::io::Error) -> (&'static str, std::io::Error) {
    move |e| (stage, e)
}

fn serve(addrs: &[SocketAddr]) -> Res {
    let mut listeners = Vec::new();
    for a in addrs {
        listeners.push(TcpListener::bind(a).map_err(at("bind"))?);
    }
    println!("ready");
    let mut threads = Vec::new();
    for l in listeners {
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    if conn.write_all(format!("{local}\n").as_bytes()).is_err() {
                        return;
                    }
                    // Hold the connection until the client closes it.
                    let mut buf = [0u8; 256];
                    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Connects to `vip` (from `src` if given) and reads the backend's greeting.
fn connect_one(
    vip: SocketAddr,
    src: Option<IpAddr>,
) -> Result<(TcpStream, String), (&'static str, std::io::Error)> {
    let s = Socket::new(Domain::for_address(vip), Type::STREAM, Some(Protocol::TCP))
        .map_err(at("socket"))?;
    if let Some(ip) = src {
        s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))
            .map_err(at("bind"))?;
    }
    s.connect_timeout(&SockAddr::from(vip), TIMEOUT)
        .map_err(at("connect"))?;
    let stream: TcpStream = s.into();
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(at("timeout"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(at("greeting"))?;
    let backend = line.trim().to_string();
    if backend.is_empty() {
        return Err((
            "greeting",
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no greeting"),
        ));
    }
    Ok((stream, backend))
}

fn tally(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(b, n)| format!("{b}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn spread(vip: SocketAddr, n: usize, src: Option<IpAddr>) -> Res {
    let mut counts = BTreeMap::new();
    let mut peer = String::new();
    for _ in 0..n {
        let (stream, backend) = connect_one(vip, src)?;
        peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        *counts.entry(backend).or_insert(0) += 1;
    }
    println!("ok {} peer={peer}", tally(&counts));
    Ok(())
}

fn hold(vip: SocketAddr, n: usize) -> Res {
    let mut counts = BTreeMap::new();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let (stream, backend) = connect_one(vip, None)?;
        *counts.entry(backend.clone()).or_insert(0) += 1;
        held.push((stream, backend));
    }
    println!("held {}", tally(&counts));
    // Keep them open until the test closes our stdin (or kills us); answer `check`.
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { break };
        if line.trim() != "check" {
            continue;
        }
        let mut status: BTreeMap<String, usize> = BTreeMap::new();
        for (stream, backend) in &held {
            // The backend never sends after its greeting: a live connection has nothing to
            // read; a destroyed one reports the reset (or EOF).
            stream.set_nonblocking(true).map_err(at("nonblocking"))?;
            let mut buf = [0u8; 16];
            let alive = matches!(
                (&*stream).read(&mut buf),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            );
            let key = format!("{}.{backend}", if alive { "alive" } else { "dead" });
            *status.entry(key).or_insert(0) += 1;
        }
        println!("check {}", tally(&status));
    }
    Ok(())
}

fn udp_serve(addrs: &[SocketAddr]) -> Res {
    let mut socks = Vec::new();
    for a in addrs {
        socks.push(UdpSocket::bind(a).map_err(at("bind"))?);
    }
    println!("ready");
    let mut threads = Vec::new();
    for s in socks {
        threads.push(std::thread::spawn(move || {
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(local.as_bytes(), from);
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn udp_spread(vip: SocketAddr, n: usize, connected: bool) -> Res {
    let mut counts = BTreeMap::new();
    let mut from_seen = String::new();
    for _ in 0..n {
        let bind: SocketAddr = if vip.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let s = UdpSocket::bind(bind).map_err(at("bind"))?;
        s.set_read_timeout(Some(TIMEOUT)).map_err(at("timeout"))?;
        let mut buf = [0u8; 512];
        let (len, from) = if connected {
            s.connect(vip).map_err(at("connect"))?;
            s.send(b"q").map_err(at("send"))?;
            let len = s.recv(&mut buf).map_err(at("recv"))?;
            (len, s.peer_addr().map_err(at("peer"))?)
        } else {
            s.send_to(b"q", vip).map_err(at("send"))?;
            s.recv_from(&mut buf).map_err(at("recv"))?
        };
        from_seen = from.to_string();
        let backend = String::from_utf8_lossy(&buf[..len]).to_string();
        *counts.entry(backend).or_insert(0) += 1;
    }
    println!("ok {} from={from_seen}", tally(&counts));
    Ok(())
}
