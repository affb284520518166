//! `cargo xtask bench --xdp`: the XDP node-ingress load balancer (`skiff run --fast-path --xdp`)
//! against the kernel's own path (iptables DNAT with conntrack) in the same node namespace.
//!
//! Topology (all netns created here, deleted at the end): client --veth-- node --veth-- two
//! backend netns. The client routes everything through the node; the VIP 10.96.0.100 exists
//! nowhere. Two cases, each run once per path, back to back:
//! - `pps`: UDP datagrams (18-byte payload) from `--conn-threads` flooding threads to VIP:53
//!   for `secs`; packets/s = datagrams the backends' veths received / secs. The node's work
//!   runs in softirq on the sender's CPU (veth), so a cheaper node path shows as more packets.
//! - `cps`: TCP connections/s to VIP:80 (connect, 1-byte echo, close; `--helper connrate`).
//!
//! The kernel path: `iptables -t nat PREROUTING` DNAT with `statistic` splitting the two
//! backends, replies un-DNATed by conntrack. The XDP path: skiff with a static bootstrap (a
//! MAGLEV TCP service and a UDP service over the same two backends) and `--xdp` on the three
//! node interfaces.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::env::{Cgroups, Netns, Proc, check_interrupt, quiet, run_bounded};

const VIP: &str = "10.96.0.100";
const BACKENDS: [&str; 2] = ["10.0.2.2", "10.0.3.2"];

/// Options of one `--xdp` run.
pub struct Options<'a> {
    /// skiff binary.
    pub skiff: &'a Path,
    /// Seconds per case.
    pub secs: f64,
    /// Generator threads.
    pub threads: usize,
}

/// Entry point of the `xdp-*` helpers (run inside the bench namespaces).
pub fn helper(args: &[String]) -> anyhow::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    let arg = |i: usize| -> anyhow::Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("helper argument {i} missing: {args:?}"))
    };
    match arg(0)? {
        // Binds and drains a UDP port, so datagrams are delivered (no ICMP unreachable back).
        "xdp-udp-sink" => {
            let s = UdpSocket::bind(arg(1)?)?;
            let mut buf = [0u8; 2048];
            loop {
                s.recv(&mut buf)?;
            }
        }
        "xdp-udp-flood" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let limit = Duration::from_secs_f64(arg(2)?.parse()?);
            let threads: usize = arg(3)?.parse()?;
            let sent = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let hs: Vec<_> = (0..threads.clamp(1, 16))
                .map(|_| {
                    let sent = sent.clone();
                    std::thread::spawn(move || -> std::io::Result<()> {
                        let s = UdpSocket::bind("0.0.0.0:0")?;
                        s.connect(addr)?;
                        let payload = [0x5au8; 18];
                        let mut n = 0u64;
                        while start.elapsed() < limit {
                            for _ in 0..256 {
                                if s.send(&payload).is_ok() {
                                    n += 1;
                                }
                            }
                        }
                        sent.fetch_add(n, Ordering::Relaxed);
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                let _ = h.join();
            }
            println!(
                "{{\"sent\": {}, \"secs\": {}}}",
                sent.load(Ordering::Relaxed),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        other => bail!("unknown helper {other:?}"),
    }
}

/// One path's results.
#[derive(Debug, Default)]
struct Measured {
    pps: f64,
    sent_pps: f64,
    cps: f64,
    cx_errors: u64,
    softirq_ns_per_pkt: f64,
}

/// Runs both paths and prints a table.
pub fn standalone(opts: Options<'_>) -> anyhow::Result<()> {
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("skiff-bench-xdp-{pid}"));
    std::fs::create_dir_all(&dir)?;
    let topo = Topo::create(pid)?;
    let xtask = std::env::current_exe()?;
    let mut servers = Vec::new();
    for (i, b) in BACKENDS.iter().enumerate() {
        servers.push(Proc::spawn(
            "echo",
            topo.backends[i]
                .cmd(&xtask)
                .args(["bench", "--helper", "echo", &format!("{b}:8080")]),
            &dir.join(format!("echo{i}.log")),
        )?);
        servers.push(Proc::spawn(
            "udp-sink",
            topo.backends[i].cmd(&xtask).args([
                "bench",
                "--helper",
                "xdp-udp-sink",
                &format!("{b}:5353"),
            ]),
            &dir.join(format!("sink{i}.log")),
        )?);
    }
    std::thread::sleep(Duration::from_millis(300));

    // Kernel path first: iptables DNAT in the node netns.
    iptables(&topo.node, "-A")?;
    let kernel = measure(&topo, &xtask, &opts)?;
    iptables(&topo.node, "-D")?;
    check_interrupt()?;

    // XDP path: skiff balancing at the node's interfaces.
    let mut cgroups = Cgroups(Vec::new());
    let root =
        cgroups.create(crate::util::cgroup2_mount()?.join(format!("skiff-bench-xdp-{pid}")))?;
    let app = cgroups.create(root.join("app"))?;
    cgroups.adopt(root.join("proxy"));
    let bootstrap = dir.join("bootstrap.yaml");
    std::fs::write(&bootstrap, bootstrap_yaml())?;
    let log = dir.join("skiff.log");
    let mut cmd = topo.node.cmd(opts.skiff);
    cmd.arg("run")
        .arg("--bootstrap")
        .arg(&bootstrap)
        .arg("--cgroup")
        .arg(&app)
        .arg("--proxy-cgroup")
        .arg(root.join("proxy"))
        .args(["--fast-path", "--no-pin"])
        .env("RUST_LOG", "warn,skiff::bpf::loader::xdp=info");
    for dev in ["xnc", "xnb0", "xnb1"] {
        cmd.args(["--xdp", dev]);
    }
    let mut skiff = Proc::spawn("skiff", &mut cmd, &log)?;
    topo.node
        .wait_port("127.0.0.1:15000".parse()?, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(500));
    skiff.check_alive(&log)?;
    let xdp = measure(&topo, &xtask, &opts)?;
    let counters = topo
        .node
        .cmd(opts.skiff)
        .arg("maps")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let xdp_counters: Vec<String> = counters
        .lines()
        .filter(|l| {
            [
                "name=redirect ",
                "name=pass_translated ",
                "name=ct_new ",
                "name=reply ",
            ]
            .iter()
            .any(|n| l.contains(n))
        })
        .map(|l| l.trim().to_string())
        .collect();
    let mode = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.split("mode=")
                .nth(1)
                .map(|m| m.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "?".into());
    drop(skiff);
    drop(servers);

    println!(
        "XDP bench (skiff --xdp, {mode} mode, vs iptables DNAT), {} s per case, {} generator threads",
        opts.secs, opts.threads
    );
    println!(
        "{:<16} {:>14} {:>14} {:>18} {:>12} {:>10}",
        "path", "delivered pps", "offered pps", "softirq ns/pkt", "conn/s", "cx errors"
    );
    for (name, r) in [("iptables-dnat", &kernel), ("skiff-xdp", &xdp)] {
        println!(
            "{:<16} {:>14.0} {:>14.0} {:>18.0} {:>12.0} {:>10}",
            name, r.pps, r.sent_pps, r.softirq_ns_per_pkt, r.cps, r.cx_errors
        );
    }
    println!(
        "skiff XDP counters after its run: {}",
        xdp_counters.join("; ")
    );
    if kernel.pps > 0.0 && kernel.cps > 0.0 {
        println!(
            "ratio xdp/kernel: packets {:.2}x, connections {:.2}x",
            xdp.pps / kernel.pps,
            xdp.cps / kernel.cps
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn measure(topo: &Topo, xtask: &Path, opts: &Options<'_>) -> anyhow::Result<Measured> {
    let limit = Duration::from_secs_f64(opts.secs + 30.0);
    let secs = opts.secs.to_string();
    let threads = opts.threads.to_string();
    // Warm up ARP and the paths.
    let _ = run_bounded(
        topo.client.cmd(xtask).args([
            "bench",
            "--helper",
            "connrate",
            &format!("{VIP}:80"),
            "0.5",
            "100",
            "1",
        ]),
        "warm-up",
        limit,
    )?;
    let rx_before: u64 = topo.backends.iter().map(rx_packets).sum();
    let soft_before = softirq_ns();
    let out = run_bounded(
        topo.client.cmd(xtask).args([
            "bench",
            "--helper",
            "xdp-udp-flood",
            &format!("{VIP}:53"),
            &secs,
            &threads,
        ]),
        "udp flood",
        limit,
    )?;
    let soft = softirq_ns() - soft_before;
    std::thread::sleep(Duration::from_millis(200));
    let rx: u64 = topo.backends.iter().map(rx_packets).sum::<u64>() - rx_before;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("flood output")?;
    let wall = v["secs"].as_f64().unwrap_or(opts.secs);
    let sent = v["sent"].as_u64().unwrap_or(0);
    check_interrupt()?;
    let out = run_bounded(
        topo.client.cmd(xtask).args([
            "bench",
            "--helper",
            "connrate",
            &format!("{VIP}:80"),
            &secs,
            "100000000",
            &threads,
        ]),
        "connrate",
        limit,
    )?;
    let c: serde_json::Value = serde_json::from_str(out.trim()).context("connrate output")?;
    Ok(Measured {
        pps: rx as f64 / wall,
        sent_pps: sent as f64 / wall,
        cps: c["count"].as_f64().unwrap_or(0.0) / c["secs"].as_f64().unwrap_or(1.0),
        cx_errors: c["errors"].as_u64().unwrap_or(0),
        softirq_ns_per_pkt: if rx > 0 { soft / rx as f64 } else { 0.0 },
    })
}

/// Softirq time of all CPUs so far, nanoseconds (`/proc/stat`, USER_HZ ticks).
fn softirq_ns() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: f64 = stat
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1e9 / hz
}

/// Packets the backend's veth received (`/proc/net/dev` is the reader's netns; sysfs is not).
fn rx_packets(ns: &Netns) -> u64 {
    let out = ns
        .cmd("cat")
        .arg("/proc/net/dev")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .find_map(|l| l.trim().strip_prefix("xb0:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn iptables(node: &Netns, op: &str) -> anyhow::Result<()> {
    // The first rule takes half the new flows, the second the rest: a 50/50 split.
    let split: [&[&str]; 2] = [
        &[
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.5",
        ],
        &[],
    ];
    for (proto, port, bport) in [("tcp", "80", "8080"), ("udp", "53", "5353")] {
        for (backend, matcher) in BACKENDS.iter().zip(split) {
            let to = format!("{backend}:{bport}");
            quiet(
                node.cmd("iptables")
                    .args(["-t", "nat", op, "PREROUTING", "-d", VIP, "-p", proto])
                    .args(["--dport", port])
                    .args(matcher)
                    .args(["-j", "DNAT", "--to-destination", &to]),
            )?;
        }
    }
    Ok(())
}

fn bootstrap_yaml() -> String {
    let eps = |port: u16| {
        BACKENDS
            .iter()
            .map(|b| {
                format!(
                    "        - endpoint: {{ address: {{ socket_address: {{ address: {b}, port_value: {port} }} }} }}\n"
                )
            })
            .collect::<String>()
    };
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }}
static_resources:
  listeners:
  - name: virtualOutbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: 15001 }} }}
    use_original_dst: true
    filter_chains:
    - name: web
      filter_chain_match:
        destination_port: 80
        prefix_ranges: [{{ address_prefix: "{VIP}", prefix_len: 32 }}]
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: web
          cluster: web
          hash_policy: [{{ source_ip: {{}} }}]
  - name: dns
    address: {{ socket_address: {{ protocol: UDP, address: {VIP}, port_value: 53 }} }}
    listener_filters:
    - name: envoy.filters.udp_listener.udp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig
        stat_prefix: dns
        cluster: dns
  clusters:
  - name: web
    type: STATIC
    lb_policy: MAGLEV
    connect_timeout: 1s
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
{}  - name: dns
    type: STATIC
    lb_policy: MAGLEV
    connect_timeout: 1s
    load_assignment:
      cluster_name: dns
      endpoints:
      - lb_endpoints:
{}"#,
        eps(8080),
        eps(5353)
    )
}

/// The four namespaces and their veths; deleting the netns removes everything.
struct Topo {
    node: Netns,
    client: Netns,
    backends: Vec<Netns>,
}

impl Topo {
    fn create(pid: u32) -> anyhow::Result<Topo> {
        let add = |name: String| -> anyhow::Result<Netns> {
            quiet(Command::new("ip").args(["netns", "add", &name]))?;
            let ns = Netns(name);
            quiet(ns.cmd("ip").args(["link", "set", "lo", "up"]))?;
            Ok(ns)
        };
        let node = add(format!("skiff-bench-xdp-node-{pid}"))?;
        let client = add(format!("skiff-bench-xdp-cli-{pid}"))?;
        veth(&node, "xnc", "10.0.1.1/24", &client, "xc0", "10.0.1.2/24")?;
        quiet(
            client
                .cmd("ip")
                .args(["route", "add", "default", "via", "10.0.1.1"]),
        )?;
        peer_settings(&client, "xc0")?;
        let mut backends = Vec::new();
        for (i, b) in BACKENDS.iter().enumerate() {
            let ns = add(format!("skiff-bench-xdp-b{i}-{pid}"))?;
            let net = i + 2;
            veth(
                &node,
                &format!("xnb{i}"),
                &format!("10.0.{net}.1/24"),
                &ns,
                "xb0",
                &format!("{b}/24"),
            )?;
            quiet(
                ns.cmd("ip")
                    .args(["route", "add", "default", "via", &format!("10.0.{net}.1")]),
            )?;
            peer_settings(&ns, "xb0")?;
            backends.push(ns);
        }
        for (key, val) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            quiet(
                node.cmd("sysctl")
                    .args(["-q", "-w", &format!("{key}={val}")]),
            )?;
        }
        for ns in std::iter::once(&client).chain(&backends) {
            quiet(
                ns.cmd("sysctl")
                    .args(["-q", "-w", "net.ipv4.tcp_tw_reuse=1"]),
            )?;
        }
        Ok(Topo {
            node,
            client,
            backends,
        })
    }
}

fn veth(
    a: &Netns,
    a_dev: &str,
    a_cidr: &str,
    b: &Netns,
    b_dev: &str,
    b_cidr: &str,
) -> anyhow::Result<()> {
    quiet(Command::new("ip").args([
        "-n", &a.0, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.0,
    ]))?;
    for (ns, dev, cidr) in [(a, a_dev, a_cidr), (b, b_dev, b_cidr)] {
        quiet(ns.cmd("ip").args(["addr", "add", cidr, "dev", dev]))?;
        quiet(ns.cmd("ip").args(["link", "set", dev, "up"]))?;
    }
    Ok(())
}

/// GRO on (a veth takes XDP_REDIRECTed frames only with NAPI) and TX checksum offload off (a
/// local sender's partial checksum cannot be updated incrementally) on a far-end veth; the
/// iptables path runs with the same settings.
fn peer_settings(ns: &Netns, dev: &'static str) -> anyhow::Result<()> {
    ns.on_thread(move || -> anyhow::Result<()> {
        ethtool_set(dev, 0x2c, 1).context("ethtool: GRO on")?;
        ethtool_set(dev, 0x17, 0).context("ethtool: tx checksum off")?;
        Ok(())
    })?
}

/// One `ETHTOOL_S*` command with a u32 value (`struct ethtool_value`), in this thread's netns.
fn ethtool_set(dev: &str, cmd: u32, value: u32) -> std::io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut v = EthtoolValue { cmd, data: value };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked) and stays NUL-terminated.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(std::io::Error::other("interface name too long"));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut v).cast();
    // SAFETY: a plain datagram socket for the ioctl.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `ifr` points at `v`; both live across the call. 0x8946 is SIOCETHTOOL.
    let rc = unsafe { libc::ioctl(fd, 0x8946, &raw mut ifr) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if rc < 0 { Err(err) } else { Ok(()) }
}
