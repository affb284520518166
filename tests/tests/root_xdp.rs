//! Root end-to-end tests of the XDP node-ingress load balancer (`skiff run --fast-path --xdp`).
//!
//! Topology (private netns only, built by `skiff_tests::xdp::Topology`): a client netns routes
//! everything through a veth into the node netns, where skiff runs with the XDP program on
//! every node interface; three backend netns hang off the node, each routed back through it.
//! The VIP 10.96.0.100 exists nowhere: before skiff starts, nothing answers it. skiff's
//! configuration comes from `skiff control-plane --dir` (EDS), so endpoints change while
//! connections are open.
//!
//! - connections to the VIP reach the backends (DNAT at the node) and complete, so the
//!   replies came back from the VIP (SNAT on the backend-facing interfaces);
//! - new flows spread per Maglev over the endpoints (chi-square);
//! - adding an endpoint leaves every tracked flow on its endpoint;
//! - removing an endpoint drops only its flows from conntrack; the others stay put;
//! - `/stats` and `skiff maps` show the interfaces, the mode, conntrack and counters;
//! - a ping to the VIP is answered at the node (XDP echo reply) while skiff runs, and neither
//!   before skiff starts, nor after it left, nor for an address that is no VIP;
//! - the same over IPv6 (ULA VIP and addresses inside the netns only): connections to the
//!   IPv6 VIP spread over the two endpoints and their replies come from the VIP, and a packet
//!   too big for the VIP about a tracked flow reaches its backend translated byte for byte;
//! - pinned links: a SIGKILLed skiff's program keeps balancing; a restart swaps its program
//!   into the same links, and one with fewer `--xdp` interfaces detaches the others;
//! - ICMP errors about a held flow follow it: a fragmentation-needed for the VIP reaches the
//!   flow's backend, a port unreachable from the backend reaches the client from the VIP, both
//!   translated byte for byte.
//!
//! Run: `cargo build -p skiff -p skiff-tests --bins && cargo test -p skiff-tests --features root
//! --test root_xdp -- --test-threads=1` (as root, under the shared lock).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use skiff_tests::fastpath::{
    CHI2_BOUND, Holder, XDS, chi_square, eds_listeners, endpoints_file, fastpeer, fastpeer_output,
    per_backend, spawn_fast_path, spawn_fastpeer, wait_kernel_endpoints, write_atomic,
};
use skiff_tests::xdp::{
    CLIENT_IP6, Topology, VIP, VIP6, icmp_capture, icmp_error, icmp6_capture, icmp6_error,
    next_icmp, next_icmp6, ping, send_icmp, send_icmp6, tcp_quote, tcp6_quote,
};
use skiff_tests::{
    Cgroup, Child, TempYaml, admin, admin_stat, ads_bootstrap, built_binary, command_in,
    require_root, serial, sigterm_and_wait, wait_admin_ready,
};

/// The service: VIP:80 -> EDS cluster `svc`, MAGLEV on the client's address (the kernel
/// builds the cluster's Maglev table only with a hash policy).
fn listeners(version: u32, vip: &str) -> String {
    eds_listeners(version, vip, r#", "hash_policy": [{"source_ip": {}}]"#)
}

const CLUSTERS: &str = r#"{"version_info": "1", "resources": [{
  "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
  "name": "svc", "type": "EDS", "lb_policy": "MAGLEV", "connect_timeout": "1s",
  "eds_cluster_config": {"eds_config": {"ads": {}}}}]}"#;

fn vip() -> String {
    format!("{VIP}:80")
}

fn vip_ip() -> Ipv4Addr {
    VIP.parse().expect("VIP")
}

/// An address next to the VIP that no service is at.
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 101);

/// How long a ping waits for its reply (`ping -W 2`).
const PING_WAIT: Duration = Duration::from_secs(2);

/// Everything one scenario runs; dropped in field order (processes before their netns).
struct Scenario {
    skiff: Option<Child>,
    _control_plane: Child,
    _servers: Vec<Child>,
    bootstrap: TempYaml,
    dir: tempfile::TempDir,
    cg: Cgroup,
    /// The capture (app) cgroup skiff runs with; it names the default pin directory.
    app: std::path::PathBuf,
    /// `--xdp` flags for every node interface.
    xdp_flags: Vec<String>,
    topo: Topology,
    endpoints: Vec<String>,
    /// The service, `VIP:80` or `[VIP6]:80`.
    vip: String,
}

impl Scenario {
    fn set_endpoints(&self, version: u32, eps: &[&str]) {
        write_atomic(
            self.dir.path(),
            "endpoints.json",
            &endpoints_file(version, eps),
        );
        wait_kernel_endpoints(&self.topo.node, eps);
    }

    /// `n` sequential connects from the client; asserts all succeed; connects per endpoint.
    fn spread(&self, n: usize) -> Vec<usize> {
        let out = fastpeer_output(
            &self.topo.client,
            None,
            &["spread", &self.vip, "--n", &n.to_string()],
        );
        assert!(out.starts_with("ok "), "spread to {}: {out}", self.vip);
        assert_eq!(
            skiff_tests::field(&out, "peer"),
            Some(self.vip.as_str()),
            "{out}"
        );
        let eps: Vec<&str> = self.endpoints.iter().map(String::as_str).collect();
        let counts = per_backend(&out, &eps);
        assert_eq!(counts.iter().sum::<usize>(), n, "{out}");
        counts
    }

    /// The forward conntrack from `/debug/maps`: client -> endpoint (TCP flows to the VIP).
    fn conntrack(&self) -> BTreeMap<String, String> {
        let (code, body) = admin(&self.topo.node, "GET", "/debug/maps").expect("admin answers");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v["xdp_conntrack"]
            .as_array()
            .expect("xdp_conntrack")
            .iter()
            .filter(|e| e["vip"] == self.vip.as_str())
            .map(|e| {
                (
                    e["client"].as_str().unwrap().to_string(),
                    e["endpoint"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

/// The routed topology with three backends serving, the service (`v6`: at [`VIP6`] with the
/// backends' IPv6 addresses, else at [`VIP`]) with the first two as endpoints, and skiff with
/// XDP on every node interface.
fn scenario(name: &str, v6: bool) -> Scenario {
    let env = require_root();
    let topo = Topology::new(name, 3);
    let endpoints: Vec<String> = topo
        .backends
        .iter()
        .map(|b| {
            if v6 {
                format!("[{}]:8080", b.ip6)
            } else {
                format!("{}:8080", b.ip)
            }
        })
        .collect();
    let (vip_addr, vip) = if v6 {
        (VIP6, format!("[{VIP6}]:80"))
    } else {
        (VIP, vip())
    };
    let servers: Vec<Child> = topo
        .backends
        .iter()
        .zip(&endpoints)
        .map(|(b, ep)| spawn_fastpeer(&b.ns, &["serve", ep]))
        .collect();

    // Before skiff: the VIP is nowhere, so nothing answers.
    let out = fastpeer_output(&topo.client, None, &["spread", &vip, "--n", "1"]);
    assert!(out.starts_with("err "), "VIP answered before skiff: {out}");
    assert!(
        v6 || !ping(&topo.client, vip_ip(), PING_WAIT),
        "VIP answered a ping before skiff"
    );

    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-", skiff_tests::test_name(name)))
        .tempdir()
        .expect("tempdir");
    write_atomic(dir.path(), "listeners.json", &listeners(1, vip_addr));
    write_atomic(dir.path(), "clusters.json", CLUSTERS);
    let first: Vec<&str> = endpoints[..2].iter().map(String::as_str).collect();
    write_atomic(dir.path(), "endpoints.json", &endpoints_file(1, &first));
    let control_plane = Child::spawn(
        command_in(Some(&topo.node), None, built_binary("skiff"))
            .args(["control-plane", "--listen", XDS, "--poll-interval", "50ms"])
            .arg("--dir")
            .arg(dir.path())
            .env("RUST_LOG", "info"),
    );
    let bootstrap = TempYaml::new(
        name,
        &ads_bootstrap("GRPC", name, XDS.parse().unwrap(), 15000),
    );
    let mut cg = Cgroup::new(&env, name);
    let mut flags: Vec<String> = Vec::new();
    for dev in topo.node_devs() {
        flags.push("--xdp".into());
        flags.push(dev);
    }
    let xdp_flags = flags.clone();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (skiff, app) = spawn_fast_path(&topo.node, &mut cg, &bootstrap, &flags);
    wait_kernel_endpoints(&topo.node, &first);
    wait_admin_ready(&topo.node);
    Scenario {
        skiff: Some(skiff),
        _control_plane: control_plane,
        _servers: servers,
        bootstrap,
        dir,
        cg,
        app,
        xdp_flags,
        topo,
        endpoints,
        vip,
    }
}

/// Polls `f` for up to 5 s until it returns true.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn xdp_attached(s: &Scenario, dev: &str) -> bool {
    xdp_prog_id(s, dev).is_some()
}

/// The id of the XDP program on the node's `dev` (`ip link`: `prog/xdp id N`), if any.
fn xdp_prog_id(s: &Scenario, dev: &str) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", s.topo.node.name(), "link", "show", dev])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| w.starts_with("prog/xdp"))?;
    words.next().filter(|w| *w == "id")?;
    words.next()?.parse().ok()
}

/// ICMP errors about a held flow follow it through the node: a fragmentation-needed the client
/// sends to the VIP about the flow's reply (quoting VIP:80 -> client) reaches the flow's
/// backend quoting the backend's own packet (backend:8080 -> client), and a port unreachable
/// the backend sends about the client's packet (quoting client -> backend:8080) reaches the
/// client from the VIP, quoting the VIP. Both arrive byte for byte as built from scratch, so
/// every checksum the node updated (outer header, quoted header, quoted TCP, ICMP) is exact.
/// The quoted sequence number is outside the window: the TCP ends ignore the errors.
fn icmp_errors_follow_their_flow(s: &Scenario, ct: &BTreeMap<String, String>) {
    let (client, ep) = ct.iter().next().expect("a tracked flow");
    let client: SocketAddrV4 = client.parse().expect("client address");
    let ep: SocketAddrV4 = ep.parse().expect("endpoint address");
    let vip = SocketAddrV4::new(vip_ip(), 80);
    let backend = s
        .topo
        .backends
        .iter()
        .find(|b| b.ip == ep.ip().to_string())
        .expect("the endpoint's backend");
    let quotes = |m: &[u8], q: &[u8]| m.len() >= 8 + q.len() && m[8..8 + q.len()] == *q;

    let capture = icmp_capture(&backend.ns);
    let mtu = [0, 0, 0x05, 0x00];
    send_icmp(
        &s.topo.client,
        vip_ip(),
        icmp_error(3, 4, mtu, &tcp_quote(vip, client)),
    );
    let want = icmp_error(3, 4, mtu, &tcp_quote(ep, client));
    let Some((ip, m)) = next_icmp(&capture, PING_WAIT, |m| m[..2] == [3, 4]) else {
        panic!(
            "no fragmentation-needed reached the backend {ep}\n{}",
            skiff_tests::fastpath::skiff_maps(&s.topo.node)
        );
    };
    assert_eq!(ip[12..16], client.ip().octets(), "outer source");
    assert_eq!(ip[16..20], ep.ip().octets(), "outer destination");
    assert!(quotes(&m, &want[8..]), "quote: {m:02x?}, want {want:02x?}");
    assert_eq!(m, want, "the translated fragmentation-needed");
    let forwarded = admin_stat(&s.topo.node, "skiff.bpf.xdp.icmp_error_forward");
    assert!(forwarded >= 1, "icmp_error_forward {forwarded}");

    let capture = icmp_capture(&s.topo.client);
    send_icmp(
        &backend.ns,
        *client.ip(),
        icmp_error(3, 3, [0; 4], &tcp_quote(client, ep)),
    );
    let want = icmp_error(3, 3, [0; 4], &tcp_quote(client, vip));
    let Some((ip, m)) = next_icmp(&capture, PING_WAIT, |m| m[..2] == [3, 3]) else {
        panic!("no port unreachable from the backend reached the client");
    };
    assert_eq!(ip[12..16], vip.ip().octets(), "from the VIP");
    assert_eq!(m, want, "the translated port unreachable");
    let back = admin_stat(&s.topo.node, "skiff.bpf.xdp.icmp_error_reply");
    assert!(back >= 1, "icmp_error_reply {back}");
}

#[test]
fn vip_traffic_is_balanced_at_the_node_and_flows_keep_their_endpoint() {
    let _g = serial();
    let mut s = scenario("xdp-lb", false);
    let [a, b, c] = [0, 1, 2].map(|i| s.endpoints[i].clone());
    for dev in s.topo.node_devs() {
        assert!(xdp_attached(&s, &dev), "no XDP program on {dev}");
    }

    // A ping to the VIP is answered at the node's driver (the VIP is on no interface), and
    // counted; an address that is no VIP still is not. veth wakes its peer after an XDP_TX
    // only when the peer runs an XDP program (with GRO alone the replies did not arrive): the
    // client's end gets one that passes everything (an unconfigured skiff_xdp).
    let _client_xdp = fuzz::pass_all_on(&s.topo.client, "xc0");
    if !(0..5).any(|_| ping(&s.topo.client, vip_ip(), PING_WAIT)) {
        let (_, stats) = admin(&s.topo.node, "GET", "/stats").expect("admin /stats");
        let xdp: Vec<&str> = stats.lines().filter(|l| l.contains(".xdp.")).collect();
        panic!(
            "no ping answered by {VIP}\n{}\n{}",
            xdp.join("\n"),
            skiff_tests::fastpath::skiff_maps(&s.topo.node)
        );
    }
    let echoed = admin_stat(&s.topo.node, "skiff.bpf.xdp.icmp_echo_reply");
    assert!(echoed >= 1, "icmp_echo_reply {echoed}");
    assert!(
        !ping(&s.topo.client, NOT_A_VIP, PING_WAIT),
        "{NOT_A_VIP} (no service) answered a ping"
    );
    let maps = skiff_tests::fastpath::skiff_maps(&s.topo.node);
    assert!(
        maps.contains(&format!("xdp_echo_vips (1):\n  vip={VIP}\n")),
        "{maps}"
    );

    // Spread over the first two endpoints per Maglev (equal weights: half each).
    let n = 200;
    let counts = s.spread(n);
    assert_eq!(
        counts[2], 0,
        "the third endpoint is not configured yet: {counts:?}"
    );
    let chi = chi_square(&counts[..2], &[0.5, 0.5]);
    assert!(chi < CHI2_BOUND, "spread {counts:?} chi2 {chi}");

    // Counters: every connection is a new flow of the VIP; replies were translated back.
    let flows = admin_stat(&s.topo.node, &format!("skiff.bpf.xdp.tcp:{}.flows", vip()));
    assert!(flows >= n as u64, "flows {flows}");
    let replies = admin_stat(
        &s.topo.node,
        &format!("skiff.bpf.xdp.tcp:{}.reply_packets", vip()),
    );
    assert!(replies >= 2 * n as u64, "reply packets {replies}");
    let ep_flows: u64 = [&a, &b]
        .iter()
        .map(|e| admin_stat(&s.topo.node, &format!("skiff.bpf.xdp.endpoint.{e}.flows")))
        .sum();
    assert!(ep_flows >= n as u64, "endpoint flows {ep_flows}");
    let maps = skiff_tests::fastpath::skiff_maps(&s.topo.node);
    assert!(maps.contains("xdp_interfaces (4):"), "{maps}");
    assert!(maps.contains("interface=xnc"), "{maps}");
    assert!(
        maps.contains("mode=native") || maps.contains("mode=generic"),
        "{maps}"
    );
    assert!(maps.contains("xdp_conntrack_entries: "), "{maps}");

    // Established flows keep their endpoint when an endpoint is added.
    let mut hold = command_in(Some(&s.topo.client), None, fastpeer());
    hold.args(["hold", &vip(), "--n", "40"]);
    let (mut holder, held) = Holder::spawn(hold);
    let before = s.conntrack();
    let by_ep = |ct: &BTreeMap<String, String>, ep: &str| ct.values().filter(|e| *e == ep).count();
    assert!(by_ep(&before, &a) > 0 && by_ep(&before, &b) > 0, "{held}");
    icmp_errors_follow_their_flow(&s, &before);
    s.set_endpoints(2, &[&a, &b, &c]);
    let after_add = s.conntrack();
    for (client, ep) in &before {
        assert_eq!(
            after_add.get(client),
            Some(ep),
            "flow {client} moved after an endpoint was added"
        );
    }
    let check = holder.check();
    assert!(!check.contains("dead."), "held connections broke: {check}");
    let counts = s.spread(300);
    assert!(
        counts.iter().all(|c| *c > 0),
        "new flows reach all three: {counts:?}"
    );

    // Removing an endpoint moves only its flows: its conntrack entries go, the others stay.
    let before_rm = s.conntrack();
    s.set_endpoints(3, &[&b, &c]);
    eventually("conntrack entries of the removed endpoint to go", || {
        by_ep(&s.conntrack(), &a) == 0
    });
    let after_rm = s.conntrack();
    for (client, ep) in &before_rm {
        if *ep == a {
            assert!(!after_rm.contains_key(client) || after_rm[client] != a);
        } else {
            assert_eq!(
                after_rm.get(client),
                Some(ep),
                "flow {client} of {ep} moved"
            );
        }
    }
    let counts = s.spread(100);
    assert_eq!(counts[0], 0, "removed endpoint still chosen: {counts:?}");
    assert!(counts[1] > 0 && counts[2] > 0, "{counts:?}");
    drop(holder);

    // The service moves to another VIP: that one answers pings, the old one stops (the echo
    // VIP set follows the applied fast path).
    let moved: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 102);
    write_atomic(
        s.dir.path(),
        "listeners.json",
        &listeners(2, &moved.to_string()),
    );
    eventually("a ping to the service's new VIP to be answered", || {
        ping(&s.topo.client, moved, Duration::from_millis(500))
    });
    assert!(
        !ping(&s.topo.client, vip_ip(), PING_WAIT),
        "the removed service's VIP still answers pings"
    );

    // skiff exits cleanly and takes its programs with it.
    sigterm_and_wait(s.skiff.take().expect("skiff"));
    for dev in s.topo.node_devs() {
        eventually(&format!("the XDP program to leave {dev}"), || {
            !xdp_attached(&s, &dev)
        });
    }
    let out = fastpeer_output(&s.topo.client, None, &["spread", &vip(), "--n", "1"]);
    assert!(
        out.starts_with("err "),
        "VIP answered after skiff left: {out}"
    );
    assert!(
        !ping(&s.topo.client, vip_ip(), PING_WAIT),
        "VIP answered a ping after skiff left"
    );
}

#[test]
fn a_killed_skiff_keeps_balancing_and_a_restart_takes_the_xdp_links_over() {
    let _g = serial();
    let mut s = scenario("xdp-pin", false);
    let devs = s.topo.node_devs();
    // The default pin directory of the capture (`/sys/fs/bpf/skiff/<app cgroup id>`) holds a
    // link per interface and the conntrack.
    let pin_dir = skiff_tests::default_pin_dir(&s.app).expect("app cgroup");
    let pins = || skiff_tests::pins(&pin_dir);
    let names = pins();
    for dev in &devs {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("link_skiff_xdp_") && n.ends_with(&format!("_{dev}"))),
            "no pinned XDP link of {dev}: {names:?}"
        );
    }
    for map in ["SKIFF_XDP_CT", "SKIFF_XDP_RCT", "SKIFF_XDP_VIP"] {
        assert!(names.iter().any(|n| n == map), "{map} not in {names:?}");
    }
    let counts = s.spread(40);
    assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
    let ids: Vec<Option<u32>> = devs.iter().map(|d| xdp_prog_id(&s, d)).collect();
    assert!(ids.iter().all(Option::is_some), "{ids:?}");

    let tracked = s.conntrack();
    assert!(!tracked.is_empty(), "no flow tracked");

    // SIGKILL: nothing undone. The pinned links keep the program on every interface, and it
    // keeps balancing (connections complete, replies from the VIP).
    let skiff = s.skiff.take().expect("skiff");
    skiff.signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _) = skiff.wait(Duration::from_secs(10));
    assert!(!status.success(), "skiff was killed: {status}");
    for (dev, id) in devs.iter().zip(&ids) {
        assert_eq!(xdp_prog_id(&s, dev), *id, "the program left {dev}");
    }
    let counts = s.spread(40);
    assert!(counts[0] > 0 && counts[1] > 0, "after the kill: {counts:?}");

    // A restart swaps its program into the same links: a new program id on every interface,
    // no second link, balancing again under the new skiff (its counters count).
    let proxy = s.cg.child_path("proxy");
    let mut flags = vec!["--fast-path"];
    flags.extend(s.xdp_flags.iter().map(String::as_str));
    s.skiff = Some(Child::spawn(
        skiff_tests::skiff_run(&s.topo.node, &s.bootstrap)
            .args(skiff_tests::sidecar_args(&s.app, &proxy, &flags)),
    ));
    wait_admin_ready(&s.topo.node);
    let first: Vec<&str> = s.endpoints[..2].iter().map(String::as_str).collect();
    wait_kernel_endpoints(&s.topo.node, &first);
    for (dev, id) in devs.iter().zip(&ids) {
        let now = xdp_prog_id(&s, dev);
        assert!(
            now.is_some() && now != *id,
            "{dev}: program {now:?}, was {id:?}"
        );
    }
    assert_eq!(pins(), names, "the restart pinned the same links and maps");
    // The pinned conntrack came along: after a few sweeps every flow tracked before the kill
    // is still on its endpoint (the endpoints are the same).
    std::thread::sleep(Duration::from_millis(800));
    let after = s.conntrack();
    for (client, ep) in &tracked {
        assert_eq!(
            after.get(client),
            Some(ep),
            "flow {client} lost across the restart"
        );
    }
    let counts = s.spread(40);
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "after the restart: {counts:?}"
    );
    let packets = admin_stat(
        &s.topo.node,
        &format!("skiff.bpf.xdp.tcp:{}.packets", s.vip),
    );
    assert!(
        packets >= 40,
        "packets counted by the new program: {packets}"
    );

    // Killed again and restarted with XDP on the client's interface only: the links of the
    // interfaces no longer balanced are detached (their pins removed), the kept one taken over.
    let skiff = s.skiff.take().expect("skiff");
    skiff.signal(nix::sys::signal::Signal::SIGKILL);
    let (status, _) = skiff.wait(Duration::from_secs(10));
    assert!(!status.success(), "skiff was killed: {status}");
    let kept = xdp_prog_id(&s, &devs[0]);
    s.skiff = Some(Child::spawn(
        skiff_tests::skiff_run(&s.topo.node, &s.bootstrap).args(skiff_tests::sidecar_args(
            &s.app,
            &proxy,
            &["--fast-path", "--xdp", &devs[0]],
        )),
    ));
    wait_admin_ready(&s.topo.node);
    for dev in &devs[1..] {
        eventually(&format!("the XDP program to leave {dev}"), || {
            !xdp_attached(&s, dev)
        });
    }
    let now = xdp_prog_id(&s, &devs[0]);
    assert!(
        now.is_some() && now != kept,
        "{}: {now:?}, was {kept:?}",
        devs[0]
    );
    let left: Vec<String> = pins()
        .into_iter()
        .filter(|n| n.starts_with("link_skiff_xdp_"))
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");

    // A clean exit removes the pins: the links detach.
    sigterm_and_wait(s.skiff.take().expect("skiff"));
    for dev in &devs {
        eventually(&format!("the XDP program to leave {dev}"), || {
            !xdp_attached(&s, dev)
        });
    }
    assert!(!pin_dir.exists(), "pins left: {:?}", pins());
}

#[test]
fn ipv6_vip_traffic_is_balanced_at_the_node() {
    let _g = serial();
    let s = scenario("xdp-lb6", true);
    // Connections to the IPv6 VIP complete (DNAT at the node, replies SNATed back to come
    // from the VIP: `spread` checks the peer) and spread per Maglev over the two endpoints.
    let n = 200;
    let counts = s.spread(n);
    assert_eq!(
        counts[2], 0,
        "the third endpoint is not configured: {counts:?}"
    );
    let chi = chi_square(&counts[..2], &[0.5, 0.5]);
    assert!(chi < CHI2_BOUND, "spread {counts:?} chi2 {chi}");
    let flows = admin_stat(&s.topo.node, &format!("skiff.bpf.xdp.tcp:{}.flows", s.vip));
    assert!(flows >= n as u64, "flows {flows}");
    let replies = admin_stat(
        &s.topo.node,
        &format!("skiff.bpf.xdp.tcp:{}.reply_packets", s.vip),
    );
    assert!(replies >= 2 * n as u64, "reply packets {replies}");
    // Every tracked flow of the VIP is the client's, on one of the two endpoints.
    let ct = s.conntrack();
    assert!(!ct.is_empty(), "no IPv6 flow tracked");
    for (client, ep) in &ct {
        assert!(
            client.starts_with(&format!("[{CLIENT_IP6}]:")),
            "flow from {client}"
        );
        assert!(s.endpoints[..2].contains(ep), "flow to {ep}");
    }

    // A packet too big the client sends to the VIP about a tracked flow's reply reaches the
    // flow's backend quoting the backend's own packet, byte for byte (the raw socket only
    // delivers it when its checksum verifies; the expected one is computed from scratch).
    let (client, ep) = ct.iter().next().expect("a tracked flow");
    let client: SocketAddrV6 = client.parse().expect("client address");
    let ep: SocketAddrV6 = ep.parse().expect("endpoint address");
    let vip6: Ipv6Addr = VIP6.parse().expect("VIP6");
    let backend = s
        .topo
        .backends
        .iter()
        .find(|b| b.ip6.parse::<Ipv6Addr>().ok() == Some(*ep.ip()))
        .expect("the endpoint's backend");
    let capture = icmp6_capture(&backend.ns);
    let mtu = 1280u32.to_be_bytes();
    let vip_sa = SocketAddrV6::new(vip6, 80, 0, 0);
    send_icmp6(
        &s.topo.client,
        vip6,
        icmp6_error((client.ip(), &vip6), 2, 0, mtu, &tcp6_quote(vip_sa, client)),
    );
    let want = icmp6_error((client.ip(), ep.ip()), 2, 0, mtu, &tcp6_quote(ep, client));
    let Some((from, m)) = next_icmp6(&capture, PING_WAIT, |m| m[0] == 2) else {
        panic!("no packet too big reached the backend {ep}");
    };
    assert_eq!(from, *client.ip(), "from the client");
    assert_eq!(m, want, "the translated packet too big");
    let forwarded = admin_stat(&s.topo.node, "skiff.bpf.xdp.icmp_error_forward");
    assert!(forwarded >= 1, "icmp_error_forward {forwarded}");
}

// === Packet fuzz through BPF_PROG_TEST_RUN ===

mod fuzz {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

    use aya::Ebpf;
    use aya::maps::{Array, HashMap};
    use aya::programs::{TestRun, TestRunOptions, Xdp};
    use skiff_common::xdp::XdpAddrKey;
    use skiff_common::{
        ClusterValue, ConfigValue, EndpointValue, LB_ROUND_ROBIN, NO_CLUSTER, ServiceKeyV4,
        ServiceKeyV6, ServiceValue,
    };

    pub const XDP_PASS: u32 = 2;
    pub const XDP_TX: u32 = 3;
    pub const VIP4: [u8; 4] = [10, 96, 0, 100];
    pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x100);
    pub const EPS4: [SocketAddrV4; 2] = [
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 3, 2), 8080),
    ];
    pub const EP6: SocketAddrV6 =
        SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2), 8080, 0, 0);

    /// xorshift64*: a fixed seed makes every run the same frames.
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        pub fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// The skiff-bpf object the skiff binary embeds (`SKIFF_EBPF_OBJ` or the xtask output).
    pub fn object() -> Vec<u8> {
        let path = std::env::var_os("SKIFF_EBPF_OBJ")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../target/ebpf/bpfel-unknown-none/release/skiff-bpf")
            });
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// Loads the object with one IPv4 TCP service (VIP4:80) and one UDP service (VIP4:53) over
    /// EPS4, one IPv6 TCP service (VIP6:80) over EP6, in generation 0; loads `skiff_xdp`.
    pub fn load() -> Ebpf {
        let mut ebpf = Ebpf::load(&object()).expect("load skiff-bpf");
        let mut cfg = ConfigValue::new(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001), None, 0x539);
        cfg.fast_path = 1;
        cfg.fast_gen = 0;
        let mut config: Array<_, ConfigValue> =
            Array::try_from(ebpf.map_mut("SKIFF_CONFIG").unwrap()).unwrap();
        config.set(0, cfg, 0).unwrap();
        let mut clusters: Array<_, ClusterValue> =
            Array::try_from(ebpf.map_mut("SKIFF_CLUSTERS").unwrap()).unwrap();
        let cluster = |slot_base, endpoint_count| ClusterValue {
            slot_base,
            endpoint_count,
            total_weight: endpoint_count,
            rr_stride: 1,
            maglev_base: 0,
            lb_policy: LB_ROUND_ROBIN,
            flags: 0,
            _pad: [0; 2],
        };
        clusters.set(0, cluster(0, 2), 0).unwrap();
        clusters.set(1, cluster(2, 1), 0).unwrap();
        let mut eps: Array<_, EndpointValue> =
            Array::try_from(ebpf.map_mut("SKIFF_ENDPOINTS").unwrap()).unwrap();
        for (i, ep) in EPS4.iter().enumerate() {
            let mut v = EndpointValue::new(SocketAddr::V4(*ep), 1);
            v.weight_end = i as u32 + 1;
            eps.set(i as u32, v, 0).unwrap();
        }
        let mut v6 = EndpointValue::new(SocketAddr::V6(EP6), 1);
        v6.weight_end = 1;
        eps.set(2, v6, 0).unwrap();
        let svc = |idx| ServiceValue {
            cluster_idx: [idx, NO_CLUSTER],
            flags: 0,
        };
        let vip4 = |port| SocketAddrV4::new(Ipv4Addr::from(VIP4), port);
        let mut s4: HashMap<_, ServiceKeyV4, ServiceValue> =
            HashMap::try_from(ebpf.map_mut("SKIFF_SVC4_V2").unwrap()).unwrap();
        s4.insert(ServiceKeyV4::tcp(vip4(80)), svc(0), 0).unwrap();
        s4.insert(ServiceKeyV4::udp(vip4(53)), svc(0), 0).unwrap();
        let mut s6: HashMap<_, ServiceKeyV6, ServiceValue> =
            HashMap::try_from(ebpf.map_mut("SKIFF_SVC6_V2").unwrap()).unwrap();
        s6.insert(
            ServiceKeyV6::tcp(SocketAddrV6::new(VIP6, 80, 0, 0)),
            svc(1),
            0,
        )
        .unwrap();
        // The VIP set userspace derives from those services, for the echo replies.
        let mut vips: HashMap<_, XdpAddrKey, u8> =
            HashMap::try_from(ebpf.map_mut("SKIFF_XDP_VIP").unwrap()).unwrap();
        vips.insert(XdpAddrKey::new(Ipv4Addr::from(VIP4).into()), 1, 0)
            .unwrap();
        vips.insert(XdpAddrKey::new(VIP6.into()), 1, 0).unwrap();
        let prog: &mut Xdp = ebpf.program_mut("skiff_xdp").unwrap().try_into().unwrap();
        prog.load().expect("the verifier accepts skiff_xdp");
        ebpf
    }

    /// `skiff_xdp` from a fresh, unconfigured copy of the object attached to `dev` in `ns`:
    /// with no config it passes every frame. Detached when the returned object drops.
    pub fn pass_all_on(ns: &skiff_tests::Netns, dev: &'static str) -> Ebpf {
        skiff_tests::in_netns(ns, move || {
            let mut ebpf = Ebpf::load(&object()).expect("load skiff-bpf");
            let prog: &mut Xdp = ebpf.program_mut("skiff_xdp").unwrap().try_into().unwrap();
            prog.load().expect("load skiff_xdp");
            prog.attach(dev, aya::programs::XdpMode::Driver)
                .unwrap_or_else(|e| panic!("attach skiff_xdp to {dev}: {e}"));
            ebpf
        })
    }

    /// One run: (verdict, output frame).
    pub fn run(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = ebpf.program("skiff_xdp").unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("test run of {} bytes: {e}", frame.len()));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    pub fn verdict_ok(v: u32) -> bool {
        v == XDP_PASS
    }

    /// One's-complement sum of `data` as big-endian words.
    fn sum(data: &[u8]) -> u32 {
        data.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    }

    fn fold(mut s: u32) -> u16 {
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// Ethernet + IPv4 + TCP/UDP frame with correct checksums (UDP checksum 0 if `udp_nocsum`).
    pub fn v4(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        sport: u16,
        dport: u16,
        payload: &[u8],
        udp_nocsum: bool,
    ) -> Vec<u8> {
        let l4len = if proto == 6 { 20 } else { 8 } + payload.len();
        let mut f = vec![0u8; 14];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + l4len) as u16).to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let c = !fold(sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        if proto == 6 {
            l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            l4.extend_from_slice(&(l4len as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        l4.extend_from_slice(payload);
        if !(proto == 17 && udp_nocsum) {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src);
            pseudo.extend_from_slice(&dst);
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(l4len as u16).to_be_bytes());
            let mut c = !fold(sum(&pseudo) + sum(&l4));
            if proto == 17 && c == 0 {
                c = 0xffff;
            }
            let at = if proto == 6 { 16 } else { 6 };
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }

    /// Ethernet + IPv6 + TCP frame with a correct checksum.
    pub fn v6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let l4len = 20 + payload.len();
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4len as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        l4.extend_from_slice(payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&(l4len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        let c = !fold(sum(&pseudo) + sum(&l4));
        l4[16..18].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&l4);
        f
    }

    /// Ethernet + IPv4 + ICMP message of `typ` (code 0, id 0x1234, sequence 1) with correct
    /// checksums.
    pub fn icmp4(src: [u8; 4], dst: [u8; 4], typ: u8, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![typ, 0, 0, 0, 0x12, 0x34, 0, 1];
        m.extend_from_slice(payload);
        icmp4_msg(src, dst, m)
    }

    /// Ethernet + IPv4 + ICMP error `typ`/`code` (the header's last four bytes `rest`, e.g. the
    /// next-hop MTU) quoting `quote`, with correct checksums.
    pub fn icmp4_err(
        src: [u8; 4],
        dst: [u8; 4],
        (typ, code): (u8, u8),
        rest: [u8; 4],
        quote: &[u8],
    ) -> Vec<u8> {
        icmp4_msg(
            src,
            dst,
            skiff_tests::xdp::icmp_error(typ, code, rest, quote),
        )
    }

    /// Ethernet + IPv4 + the ICMP message `m`, whose checksum (bytes 2..4) is filled in.
    fn icmp4_msg(src: [u8; 4], dst: [u8; 4], mut m: Vec<u8>) -> Vec<u8> {
        let mut f = v4(src, dst, 1, 0, 0, &[], true);
        f.truncate(34);
        m[2..4].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&m));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let tot = (20 + m.len()) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&f[14..34]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&m);
        f
    }

    /// Ethernet + IPv6 + ICMPv6 message of `typ` (code 0, id 0x1234, sequence 1), checksummed.
    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, typ: u8, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![typ, 0, 0, 0, 0x12, 0x34, 0, 1];
        m.extend_from_slice(payload);
        icmp6_msg(src, dst, m)
    }

    /// As [`icmp4_err`] for ICMPv6.
    pub fn icmp6_err(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        (typ, code): (u8, u8),
        rest: [u8; 4],
        quote: &[u8],
    ) -> Vec<u8> {
        // The message's checksum is recomputed over the pseudo-header by icmp6_msg.
        icmp6_msg(
            src,
            dst,
            skiff_tests::xdp::icmp_error(typ, code, rest, quote),
        )
    }

    /// Ethernet + IPv6 + the ICMPv6 message `m`, whose checksum (bytes 2..4) is filled in.
    fn icmp6_msg(src: Ipv6Addr, dst: Ipv6Addr, mut m: Vec<u8>) -> Vec<u8> {
        m[2..4].copy_from_slice(&[0, 0]);
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(m.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, 64]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        let c = !fold(icmp6_sum(&f, 14, &m));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&m);
        f
    }

    /// Pseudo-header (addresses of the IPv6 header at `l3`, length, next header 58) plus `m`.
    fn icmp6_sum(f: &[u8], l3: usize, m: &[u8]) -> u32 {
        let mut pseudo = f[l3 + 8..l3 + 40].to_vec();
        pseudo.extend_from_slice(&(m.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        sum(&pseudo) + sum(m)
    }

    /// Whether the ICMP (`v6` false) or ICMPv6 message in `f` (IP header at `l3`) verifies:
    /// IPv4 header and ICMP checksums, or the ICMPv6 checksum with its pseudo-header.
    pub fn icmp_sums_ok(f: &[u8], l3: usize, v6: bool) -> bool {
        if v6 {
            let len = usize::from(u16::from_be_bytes([f[l3 + 4], f[l3 + 5]]));
            let m = &f[l3 + 40..l3 + 40 + len];
            fold(icmp6_sum(f, l3, m)) == 0xffff
        } else {
            let tot = usize::from(u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]));
            fold(sum(&f[l3..l3 + 20])) == 0xffff && fold(sum(&f[l3 + 20..l3 + tot])) == 0xffff
        }
    }

    /// Whether `out` is the echo reply of the echo request `req`: MACs and addresses swapped,
    /// type echo reply, TTL / hop limit 64, every other byte the same, and the checksums verify
    /// exactly when the request's did (they were updated, not recomputed).
    pub fn is_echo_reply_of(req: &[u8], out: &[u8]) -> bool {
        if req.len() != out.len() || req.len() < 14 {
            return false;
        }
        let l3 = if req[12..14] == [0x81, 0x00] { 18 } else { 14 };
        let v6 = req[l3 - 2..l3] == [0x86, 0xdd];
        let (src, dst, ttl, l4, typ) = if v6 {
            (l3 + 8..l3 + 24, l3 + 24..l3 + 40, l3 + 7, l3 + 40, 129)
        } else {
            (l3 + 12..l3 + 16, l3 + 16..l3 + 20, l3 + 8, l3 + 20, 0)
        };
        if out.len() < l4 + 8 {
            return false;
        }
        let mut expect = req.to_vec();
        expect[0..6].copy_from_slice(&req[6..12]);
        expect[6..12].copy_from_slice(&req[0..6]);
        expect[src.clone()].copy_from_slice(&req[dst.clone()]);
        expect[dst].copy_from_slice(&req[src]);
        expect[ttl] = 64;
        expect[l4] = typ;
        let sums = if v6 { l4 + 2..l4 + 4 } else { l3 + 10..l3 + 12 };
        let icmp_sum = l4 + 2..l4 + 4;
        let same = (0..out.len())
            .filter(|j| !sums.contains(j) && !icmp_sum.contains(j))
            .all(|j| expect[j] == out[j]);
        same && icmp_sums_ok(out, l3, v6) == icmp_sums_ok(req, l3, v6)
    }

    /// Whether `out` is `f`, an ICMP error about a tracked flow, translated: only the outer
    /// addresses, the quoted addresses and ports and the checksums differ, the quote now names
    /// an endpoint in `eps` as its source (sent on to the endpoint) or `vip` as its destination
    /// (sent on to the client), and every checksum verifies exactly when it did before (they
    /// were updated, not recomputed).
    pub fn is_icmp_error_translation(f: &[u8], out: &[u8], eps: &[Vec<u8>], vip: &[u8]) -> bool {
        let l3 = if f[12..14] == [0x81, 0x00] { 18 } else { 14 };
        let v6 = f[l3 - 2..l3] == [0x86, 0xdd];
        let (hl, a, src, dst) = if v6 { (40, 16, 8, 24) } else { (20, 4, 12, 16) };
        let (l4, q) = (l3 + hl, l3 + hl + 8);
        let ql4 = q + hl;
        if out.len() != f.len() || out.len() < ql4 + 8 {
            return false;
        }
        let proto = if v6 { f[q + 6] } else { f[q + 9] };
        let l4sum = ql4 + if proto == 6 { 16 } else { 6 };
        let mut may_change = vec![
            l3 + src..l3 + src + a,
            l3 + dst..l3 + dst + a,
            l4 + 2..l4 + 4,
            q + src..q + src + a,
            q + dst..q + dst + a,
            ql4..ql4 + 4,
            l4sum..l4sum + 2,
        ];
        if !v6 {
            may_change.extend([l3 + 10..l3 + 12, q + 10..q + 12]);
        }
        let same = (0..f.len())
            .filter(|j| !may_change.iter().any(|r| r.contains(j)))
            .all(|j| f[j] == out[j]);
        let to_ep = eps.iter().any(|e| out[q + src..q + src + a] == e[..]);
        let to_client = out[q + dst..q + dst + a] == *vip;
        let quoted_ok = |g: &[u8]| v6 || fold(sum(&g[q..q + 20])) == 0xffff;
        same && (to_ep || to_client)
            && icmp_sums_ok(out, l3, v6) == icmp_sums_ok(f, l3, v6)
            && quoted_ok(out) == quoted_ok(f)
    }

    /// Whether the IPv4 frame's header and L4 checksums verify (a UDP checksum of 0 counts as
    /// valid: none).
    pub fn v4_checksums_ok(f: &[u8]) -> bool {
        let ip = &f[14..34];
        if fold(sum(ip)) != 0xffff {
            return false;
        }
        let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let proto = ip[9];
        let l4 = &f[34..14 + tot];
        if proto == 17 && l4[6..8] == [0, 0] {
            return true;
        }
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[12..20]);
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        fold(sum(&pseudo) + sum(l4)) == 0xffff
    }

    /// Whether the IPv6 TCP frame's checksum verifies.
    pub fn v6_checksum_ok(f: &[u8]) -> bool {
        let l4 = &f[54..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&f[22..54]);
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        fold(sum(&pseudo) + sum(l4)) == 0xffff
    }
}

#[test]
fn packet_fuzz_passes_translates_or_answers_every_frame_safely() {
    use fuzz::*;
    use std::net::Ipv6Addr;
    let _g = serial();
    let _env = require_root();
    // An empty netns: the FIB finds no route, so a translated frame is handed to the stack
    // (XDP_PASS) and comes back in the output buffer for inspection.
    let ns = skiff_tests::Netns::new("xdp-fuzz");
    let summary = skiff_tests::in_netns(&ns, || {
        let ebpf = load();
        let mut rng = Rng::new(0x5eed_0019);
        let client = [192, 168, 7, 9];
        let vip4 = VIP4;
        let eps: Vec<([u8; 4], u16)> = EPS4.iter().map(|e| (e.ip().octets(), e.port())).collect();
        let (mut translated, mut replies, mut untouched, mut fuzz_echoed) = (0, 0, 0, 0);
        let mut fuzz_errors = 0;

        // 1. Well-formed flows to the VIP: DNAT to an endpoint with valid checksums, and the
        //    endpoint's reply SNATed back to the VIP, also valid.
        for i in 0..500u16 {
            let sport = 20000 + i;
            let n = rng.below(64) as usize;
            let payload = rng.bytes(n);
            let (proto, dport, nocsum) = match i % 3 {
                0 | 1 => (6u8, 80u16, false),
                _ => (17u8, 53u16, i % 6 == 2),
            };
            let f = v4(client, vip4, proto, sport, dport, &payload, nocsum);
            let (v, out) = run(&ebpf, &f);
            assert!(verdict_ok(v), "verdict {v} for a flow to the VIP");
            assert_eq!(out.len(), f.len());
            let dst: [u8; 4] = out[30..34].try_into().unwrap();
            let dport_out = u16::from_be_bytes([out[36], out[37]]);
            assert!(
                eps.contains(&(dst, dport_out)),
                "DNAT to {dst:?}:{dport_out}"
            );
            assert!(v4_checksums_ok(&out), "checksums after DNAT (frame {i})");
            if nocsum {
                assert_eq!(
                    out[40..42],
                    [0, 0],
                    "a UDP frame without checksum keeps none"
                );
            }
            // Everything but the destination, its port and the checksums is unchanged.
            let csum_at = if proto == 6 { 34 + 16 } else { 34 + 6 };
            for (j, (a, b)) in f.iter().zip(&out).enumerate() {
                let allowed = (24..26).contains(&j)
                    || (30..34).contains(&j)
                    || (36..38).contains(&j)
                    || (csum_at..csum_at + 2).contains(&j);
                assert!(allowed || a == b, "byte {j} changed by DNAT");
            }
            translated += 1;
            // The same flow again goes to the same endpoint (conntrack).
            let (_, again) = run(&ebpf, &f);
            assert_eq!(again[30..38], out[30..38], "flow {i} changed endpoint");
            // The endpoint's reply comes back from the VIP.
            let r = v4(dst, client, proto, dport_out, sport, &payload, nocsum);
            let (v, back) = run(&ebpf, &r);
            assert!(verdict_ok(v));
            assert_eq!(back[26..30], vip4, "reply source is the VIP");
            assert_eq!(u16::from_be_bytes([back[34], back[35]]), dport);
            assert!(
                v4_checksums_ok(&back),
                "checksums after reply SNAT (frame {i})"
            );
            replies += 1;
        }

        // 2. IPv6 flows to the IPv6 VIP.
        let client6 = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 9);
        for i in 0..100u16 {
            let n = rng.below(40) as usize;
            let payload = rng.bytes(n);
            let f = v6(client6, VIP6, 30000 + i, 80, &payload);
            let (v, out) = run(&ebpf, &f);
            assert!(verdict_ok(v));
            assert_eq!(out[38..54], EP6.ip().octets(), "IPv6 DNAT");
            assert_eq!(u16::from_be_bytes([out[56], out[57]]), EP6.port());
            assert!(v6_checksum_ok(&out), "IPv6 checksum after DNAT");
            let r = v6(*EP6.ip(), client6, EP6.port(), 30000 + i, &payload);
            let (_, back) = run(&ebpf, &r);
            assert_eq!(back[22..38], VIP6.octets(), "IPv6 reply from the VIP");
            assert!(v6_checksum_ok(&back));
            translated += 1;
        }

        // 3. ICMP: an echo request to a VIP (either family, with or without a VLAN tag) is
        //    answered (XDP_TX, a well-formed reply); every other ICMP passes untouched.
        let mut echoed = 0u64;
        let other4 = [10, 96, 0, 101];
        let other6 = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x101);
        for i in 0..50usize {
            let payload = rng.bytes(i * 7);
            let req = icmp4(client, vip4, 8, &payload);
            let req6 = icmp6(client6, VIP6, 128, &payload);
            assert!(icmp_sums_ok(&req, 14, false) && icmp_sums_ok(&req6, 14, true));
            let (v, out) = run(&ebpf, &req);
            assert_eq!(v, XDP_TX, "echo request {i} to the VIP");
            assert!(is_echo_reply_of(&req, &out), "echo reply {i}: {out:02x?}");
            let mut tagged = req.clone();
            tagged.splice(12..14, [0x81, 0x00, 0x00, 0x07, 0x08, 0x00]);
            let (v, out) = run(&ebpf, &tagged);
            assert_eq!(v, XDP_TX, "VLAN-tagged echo request {i}");
            assert!(is_echo_reply_of(&tagged, &out), "tagged echo reply {i}");
            let (v, out) = run(&ebpf, &req6);
            assert_eq!(v, XDP_TX, "ICMPv6 echo request {i} to the VIP");
            assert!(is_echo_reply_of(&req6, &out), "ICMPv6 echo reply {i}");
            echoed += 3;
            for f in [
                icmp4(client, other4, 8, &payload),
                icmp4(client, vip4, 0, &payload),
                icmp4(client, vip4, 3, &payload),
                icmp4(client, vip4, 13, &payload),
                icmp6(client6, other6, 128, &payload),
                icmp6(client6, VIP6, 129, &payload),
                icmp6(client6, VIP6, 135, &payload),
            ] {
                let (v, out) = run(&ebpf, &f);
                assert!(verdict_ok(v), "verdict {v} for ICMP {f:02x?}");
                assert_eq!(out, f, "ICMP that is no echo request to a VIP changed");
            }
        }
        // The answers are counted.
        let st: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(ebpf.map("SKIFF_XDP_ST").unwrap()).unwrap();
        let count: u64 = st
            .get(&skiff_common::xdp::stat::ICMP_ECHO_REPLY, 0)
            .unwrap()
            .iter()
            .sum();
        assert_eq!(count, echoed, "icmp_echo_reply counter");

        // 3b. ICMP errors about tracked flows follow them, translated exactly: one sent to the
        //     VIP about a reply reaches the endpoint quoting the endpoint's own packet; one from
        //     the endpoint side about a forwarded packet reaches the client quoting the packet
        //     the client sent (to the VIP), and from the VIP when the endpoint sent it. Every
        //     expected frame is built from scratch (checksums recomputed), so equality checks
        //     the incremental updates too.
        let (mut err_fwd, mut err_back) = (0u64, 0u64);
        let mut errors = Vec::new();
        for i in 0..60u16 {
            let sport = 21000 + i;
            let (proto, dport) = if i % 2 == 0 { (6u8, 80u16) } else { (17, 53) };
            let nocsum = i % 6 == 3;
            let n = 8 + rng.below(40) as usize;
            let payload = rng.bytes(n);
            let f = v4(client, vip4, proto, sport, dport, &payload, nocsum);
            let (_, out) = run(&ebpf, &f);
            let ep: [u8; 4] = out[30..34].try_into().unwrap();
            let eport = u16::from_be_bytes([out[36], out[37]]);
            let r = v4(ep, client, proto, eport, sport, &payload, nocsum);
            let (_, back) = run(&ebpf, &r);
            assert_eq!(back[26..30], vip4);
            // The quote: the IP header and 8 bytes (RFC 792), 12 (a TCP checksum not quoted),
            // or the whole packet.
            let qlen = [28, 32, r.len() - 14][usize::from(i % 3)];
            let mtu = [0, 0, 0x05, 0x78];
            let hop = [10, 0, 2, 1];
            let cases = [
                // Fragmentation needed from the client, time exceeded from a router.
                (
                    icmp4_err(client, vip4, (3, 4), mtu, &back[14..14 + qlen]),
                    icmp4_err(client, ep, (3, 4), mtu, &r[14..14 + qlen]),
                    true,
                ),
                (
                    icmp4_err(hop, vip4, (11, 0), [0; 4], &back[14..14 + qlen]),
                    icmp4_err(hop, ep, (11, 0), [0; 4], &r[14..14 + qlen]),
                    true,
                ),
                // Port unreachable from the endpoint, time exceeded from a router before it.
                (
                    icmp4_err(ep, client, (3, 3), [0; 4], &out[14..14 + qlen]),
                    icmp4_err(vip4, client, (3, 3), [0; 4], &f[14..14 + qlen]),
                    false,
                ),
                (
                    icmp4_err(hop, client, (11, 0), [0; 4], &out[14..14 + qlen]),
                    icmp4_err(hop, client, (11, 0), [0; 4], &f[14..14 + qlen]),
                    false,
                ),
            ];
            for (n, (err, want, to_ep)) in cases.into_iter().enumerate() {
                let (v, o) = run(&ebpf, &err);
                assert_eq!(v, XDP_PASS, "ICMP error {i}/{n}");
                assert_eq!(o, want, "ICMP error {i}/{n} translated: {err:02x?}");
                if to_ep {
                    err_fwd += 1;
                } else {
                    err_back += 1;
                }
                errors.push(err);
            }
            // Untouched: an untracked flow, the quoted ports cut short, an error not sent to
            // the quoted source, a redirect (no error), options in the quoted header.
            let mut untracked = back.clone();
            untracked[36] ^= 0x80;
            let mut options = back[14..34].to_vec();
            options[0] = 0x46;
            options.extend_from_slice(&[1, 1, 1, 0]);
            options.extend_from_slice(&back[34..14 + qlen]);
            for e in [
                icmp4_err(client, vip4, (3, 4), mtu, &untracked[14..14 + qlen]),
                icmp4_err(client, vip4, (3, 4), mtu, &back[14..14 + 24]),
                icmp4_err(client, other4, (3, 4), mtu, &back[14..14 + qlen]),
                icmp4_err(client, vip4, (5, 0), [0; 4], &back[14..14 + qlen]),
                icmp4_err(client, vip4, (3, 4), mtu, &options),
            ] {
                let (v, o) = run(&ebpf, &e);
                assert_eq!(v, XDP_PASS);
                assert_eq!(o, e, "an ICMP error about no tracked flow changed");
            }
        }
        for i in 0..30u16 {
            let sport = 31000 + i;
            let n = 8 + rng.below(40) as usize;
            let payload = rng.bytes(n);
            let f = v6(client6, VIP6, sport, 80, &payload);
            let (_, out) = run(&ebpf, &f);
            let r = v6(*EP6.ip(), client6, EP6.port(), sport, &payload);
            let (_, back) = run(&ebpf, &r);
            let qlen = [48, 52, r.len() - 14][usize::from(i % 3)];
            let mtu = 1280u32.to_be_bytes();
            let cases = [
                (
                    icmp6_err(client6, VIP6, (2, 0), mtu, &back[14..14 + qlen]),
                    icmp6_err(client6, *EP6.ip(), (2, 0), mtu, &r[14..14 + qlen]),
                    true,
                ),
                (
                    icmp6_err(*EP6.ip(), client6, (1, 4), [0; 4], &out[14..14 + qlen]),
                    icmp6_err(VIP6, client6, (1, 4), [0; 4], &f[14..14 + qlen]),
                    false,
                ),
            ];
            for (n, (err, want, to_ep)) in cases.into_iter().enumerate() {
                let (v, o) = run(&ebpf, &err);
                assert_eq!(v, XDP_PASS, "ICMPv6 error {i}/{n}");
                assert_eq!(o, want, "ICMPv6 error {i}/{n} translated: {err:02x?}");
                if to_ep {
                    err_fwd += 1;
                } else {
                    err_back += 1;
                }
                errors.push(err);
            }
            let mut untracked = back.clone();
            untracked[56] ^= 0x80;
            for e in [
                icmp6_err(client6, VIP6, (2, 0), mtu, &untracked[14..14 + qlen]),
                icmp6_err(client6, VIP6, (4, 0), [0; 4], &back[14..14 + qlen]),
                icmp6_err(client6, VIP6, (2, 0), mtu, &back[14..14 + 44]),
            ] {
                let (v, o) = run(&ebpf, &e);
                assert_eq!(v, XDP_PASS);
                assert_eq!(o, e, "an ICMPv6 error about no tracked flow changed");
            }
        }
        let stat_sum = |i: u32| -> u64 { st.get(&i, 0).unwrap().iter().sum() };
        use skiff_common::xdp::stat::{ICMP_ERROR_FORWARD, ICMP_ERROR_REPLY};
        assert_eq!(
            (stat_sum(ICMP_ERROR_FORWARD), stat_sum(ICMP_ERROR_REPLY)),
            (err_fwd, err_back),
            "icmp_error_forward / icmp_error_reply counters"
        );
        let ep_addrs: Vec<Vec<u8>> = eps
            .iter()
            .map(|(a, _)| a.to_vec())
            .chain([EP6.ip().octets().to_vec()])
            .collect();

        // 4. Malformed and random frames: XDP_PASS, same length; a frame that changed was
        //    translated to an endpoint (only address, port and checksum bytes differ); an
        //    XDP_TX is the echo reply of an echo request to a VIP.
        for i in 0..20000u32 {
            let base = match rng.below(7) {
                0 => v4(
                    client,
                    vip4,
                    6,
                    40000 + (i % 2000) as u16,
                    80,
                    &rng.bytes(16),
                    false,
                ),
                1 => v4(
                    client,
                    vip4,
                    17,
                    40000 + (i % 2000) as u16,
                    53,
                    &rng.bytes(16),
                    false,
                ),
                2 => v6(client6, VIP6, 40000 + (i % 2000) as u16, 80, &rng.bytes(16)),
                3 => icmp4(client, vip4, 8, &rng.bytes(16)),
                4 => icmp6(client6, VIP6, 128, &rng.bytes(16)),
                5 => errors[rng.below(errors.len() as u64) as usize].clone(),
                _ => {
                    let n = 14 + rng.below(120) as usize;
                    let mut f = rng.bytes(n);
                    if rng.below(2) == 0 {
                        let t: [u8; 2] =
                            [[0x08, 0x00], [0x86, 0xdd], [0x81, 0x00]][rng.below(3) as usize];
                        f[12..14].copy_from_slice(&t);
                    }
                    f
                }
            };
            let mut f = base;
            match rng.below(8) {
                // Truncated anywhere past the Ethernet header.
                0 => f.truncate(14 + rng.below((f.len() - 13) as u64) as usize),
                // Random bytes flipped.
                1 => {
                    for _ in 0..1 + rng.below(4) {
                        let j = rng.below(f.len() as u64) as usize;
                        f[j] ^= 1 << rng.below(8);
                    }
                }
                // IHL anything (options, or below 5).
                2 if f[12..14] == [0x08, 0x00] && f.len() > 14 => {
                    f[14] = 0x40 | rng.below(16) as u8
                }
                // Fragments: more-fragments or an offset.
                3 if f[12..14] == [0x08, 0x00] && f.len() > 20 => {
                    f[20] |= [0x20, 0x01, 0x1f][rng.below(3) as usize];
                }
                // Total / payload length anything.
                4 if f[12..14] == [0x08, 0x00] && f.len() >= 18 => {
                    let l = rng.next() as u16;
                    f[16..18].copy_from_slice(&l.to_be_bytes());
                }
                4 if f[12..14] == [0x86, 0xdd] && f.len() >= 20 => {
                    let l = rng.next() as u16;
                    f[18..20].copy_from_slice(&l.to_be_bytes());
                }
                // A VLAN tag in front.
                5 => {
                    let inner = f[12..14].to_vec();
                    f.splice(12..14, [0x81, 0x00, 0x00, 0x07, inner[0], inner[1]]);
                }
                _ => {}
            }
            let (v, out) = run(&ebpf, &f);
            if v == XDP_TX {
                assert!(
                    is_echo_reply_of(&f, &out),
                    "fuzz frame {i}: XDP_TX but no echo reply: {f:02x?} -> {out:02x?}"
                );
                fuzz_echoed += 1;
                continue;
            }
            assert!(verdict_ok(v), "verdict {v} for fuzz frame {i}: {f:02x?}");
            assert_eq!(out.len(), f.len(), "fuzz frame {i} changed length");
            if out == f {
                untouched += 1;
                continue;
            }
            // Changed: it must be a translation of a TCP/UDP packet to an endpoint.
            let l3 = if f[12..14] == [0x81, 0x00] { 18 } else { 14 };
            let changed: Vec<usize> = (0..f.len()).filter(|&j| f[j] != out[j]).collect();
            assert!(
                changed.iter().all(|&j| j >= l3),
                "fuzz frame {i}: Ethernet header changed ({changed:?})"
            );
            let v4 = out[l3 - 2..l3] == [0x08, 0x00];
            let icmp = if v4 {
                out[l3 + 9] == 1
            } else {
                out[l3 + 6] == 58
            };
            if icmp {
                let vip: &[u8] = if v4 { &vip4 } else { &VIP6.octets() };
                assert!(
                    is_icmp_error_translation(&f, &out, &ep_addrs, vip),
                    "fuzz frame {i}: ICMP changed but no error translation: {f:02x?} -> {out:02x?}"
                );
                fuzz_errors += 1;
            } else if v4 {
                let dst: [u8; 4] = out[l3 + 16..l3 + 20].try_into().unwrap();
                let src: [u8; 4] = out[l3 + 12..l3 + 16].try_into().unwrap();
                assert!(
                    eps.iter().any(|(a, _)| *a == dst) || src == vip4,
                    "fuzz frame {i}: rewritten to {dst:?} from {src:?}"
                );
            } else {
                assert!(
                    out[l3 + 24..l3 + 40] == EP6.ip().octets()
                        || out[l3 + 8..l3 + 24] == VIP6.octets(),
                    "fuzz frame {i}: IPv6 rewrite to an unknown address"
                );
            }
            translated += 1;
        }
        (translated, replies, untouched, fuzz_echoed, fuzz_errors)
    });
    let (translated, replies, untouched, echoed, errors) = summary;
    eprintln!("(translated, replies, untouched, echoed, ICMP errors translated): {summary:?}");
    assert!(
        translated > 600 && replies == 500 && untouched > 1000 && echoed > 1000 && errors > 500,
        "{summary:?}"
    );
}
