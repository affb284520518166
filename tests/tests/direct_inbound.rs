//! The inbound listener's pipeline in-process, unprivileged: `dataplane::run` with the inbound
//! role on a loopback listener. sk_lookup or iptables only decide which connections reach that
//! listener; one made to it directly has its own local address as original destination, and
//! is routed like Istio's virtualInbound: the listener on the inbound port -> tcp_proxy ->
//! `inbound|8080||`. The cluster's circuit breaker, outlier detection and active-connection
//! count apply to inbound connections as to outbound ones (one tcp_proxy step for both).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff::dataplane::{Dataplane, ListenerRole};
use skiff::lb::HostRegistry;
use skiff::lb::host::flag;
use skiff::state::{Snapshot, Store};
use skiff::stats::Stats;
use skiff_tests::{free_addr, free_port, lb_endpoints_yaml};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(15);
const CLUSTER: &str = "inbound|8080||";

/// A TCP backend that greets each connection and keeps it open until the client closes.
async fn holding_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"hi").await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    addr
}

/// The inbound pipeline of one skiff: virtualInbound on `port` sending everything to
/// `inbound|8080||` (`extra` adds cluster settings) over `endpoints`.
struct Inbound {
    port: u16,
    store: Arc<Store>,
    stats: Arc<Stats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Inbound {
    async fn start(extra: &str, endpoints: &[SocketAddr]) -> Inbound {
        let port = free_port();
        let eps = lb_endpoints_yaml(endpoints);
        let yaml = format!(
            r#"
node: {{ id: inbound-test, cluster: inbound-test }}
static_resources:
  listeners:
  - name: virtualInbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: "{CLUSTER}"
          cluster: "{CLUSTER}"
  clusters:
  - name: "{CLUSTER}"
    type: STATIC
    connect_timeout: 1s
{extra}    load_assignment:
      cluster_name: "{CLUSTER}"
      endpoints:
      - lb_endpoints:
{eps}"#
        );
        let boot = skiff::config::parse(&yaml, "<direct_inbound>").expect("bootstrap must parse");
        let stats = Arc::new(Stats::default());
        let store = Arc::new(Store::with_registry(
            Snapshot::new(boot.listeners, boot.clusters, &Default::default()),
            HostRegistry::new(stats.clone()),
        ));
        let dp = Arc::new(Dataplane::new(
            store.clone(),
            stats.clone(),
            None,
            free_port(),
        ));
        let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(skiff::dataplane::run(
            l,
            ListenerRole::Inbound { port },
            dp,
            async move {
                let _ = stopped.await;
            },
        ));
        Inbound {
            port,
            store,
            stats,
            stop: Some(stop),
            task,
        }
    }

    fn stat(&self, name: &str) -> u64 {
        self.stats
            .snapshot()
            .into_iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| v)
    }

    /// Waits until counter `name` reaches `want` (a failed connection is counted just after
    /// its socket closes), then checks it did not pass it.
    async fn wait_stat(&self, name: &str, want: u64) {
        let deadline = Instant::now() + WAIT;
        while self.stat(name) < want {
            assert!(Instant::now() < deadline, "{name} never reached {want}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.stat(name), want, "{name}");
    }

    /// Live state of `addr` in the cluster, as the current snapshot's balancer sees it: health
    /// flags, and the open connections it counts (asserted equal to its active requests, the
    /// load LEAST_REQUEST weighs).
    fn host_flags_and_connections(&self, addr: SocketAddr) -> (u32, u64) {
        let snap = self.store.load();
        let host = snap.clusters[CLUSTER]
            .lb
            .host(addr)
            .expect("host in cluster");
        let st = host.state();
        assert_eq!(st.active_connections(), st.active_requests(), "{addr}");
        (host.flags(), st.active_connections())
    }

    /// Connect and read the backend's greeting: `true` when proxied, `false` when skiff
    /// closed the connection without one.
    async fn greeted(&self) -> (bool, TcpStream) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let mut hi = [0u8; 2];
        match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut hi)).await {
            Ok(Ok(_)) => {
                assert_eq!(&hi, b"hi");
                (true, s)
            }
            Ok(Err(_)) => (false, s),
            Err(_) => panic!("no greeting and no close within 5 s"),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("inbound listener stops")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connections_take_a_breaker_slot_and_count_on_their_host() {
    let hold = holding_backend().await;
    let cb = "    circuit_breakers: { thresholds: [ { max_connections: 1 } ] }\n";
    let inbound = Inbound::start(cb, &[hold]).await;

    // The first connection holds the only slot and counts as the host's active connection ...
    let (proxied, first) = inbound.greeted().await;
    assert!(proxied, "first inbound connection was not proxied");
    assert_eq!(inbound.host_flags_and_connections(hold).1, 1);
    assert_eq!(
        inbound.stat(&format!("cluster.{CLUSTER}.upstream_cx_active")),
        1
    );

    // ... so a second concurrent one is closed without reaching the backend (Envoy's UO).
    let (proxied, mut second) = inbound.greeted().await;
    assert!(!proxied, "overflowing inbound connection was proxied");
    let mut rest = Vec::new();
    let n = second.read_to_end(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0, "overflowed connection got {rest:?}");
    assert_eq!(
        inbound.stat(&format!("cluster.{CLUSTER}.upstream_cx_overflow")),
        1
    );
    inbound.wait_stat("skiff.response_flags.UO", 1).await;
    assert_eq!(
        inbound.stat(&format!("cluster.{CLUSTER}.upstream_cx_total")),
        1
    );

    // Closing the first frees the slot and the host's count.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let (proxied, _again) = inbound.greeted().await;
        if proxied {
            break;
        }
        assert!(Instant::now() < deadline, "slot never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + WAIT;
    while inbound.host_flags_and_connections(hold).1 != 0 {
        assert!(
            Instant::now() < deadline,
            "host still counts a closed connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    inbound.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connect_failures_eject_the_dead_endpoint() {
    let alive = holding_backend().await;
    // A port nothing listens on: connects are refused.
    let dead = free_addr();
    let od = "    outlier_detection: { consecutive_5xx: 2, interval: 1s, base_ejection_time: 30s, max_ejection_percent: 50 }\n";
    let inbound = Inbound::start(od, &[alive, dead]).await;
    let mut refused = 0;
    for _ in 0..12 {
        let (proxied, _s) = inbound.greeted().await;
        if !proxied {
            refused += 1;
        }
    }
    // Round robin: the dead host gets every other connection until its second failure.
    assert_eq!(refused, 2, "connections that hit the dead endpoint");
    let (flags, _) = inbound.host_flags_and_connections(dead);
    assert_ne!(
        flags & flag::FAILED_OUTLIER_CHECK,
        0,
        "dead host not ejected"
    );
    assert_eq!(
        inbound.host_flags_and_connections(alive).0 & flag::FAILED_OUTLIER_CHECK,
        0
    );
    assert_eq!(
        inbound.stat(&format!(
            "cluster.{CLUSTER}.outlier_detection.ejections_enforced_consecutive_5xx"
        )),
        1
    );
    assert_eq!(
        inbound.stat(&format!("cluster.{CLUSTER}.upstream_cx_connect_fail")),
        2
    );
    // Envoy's flags for a failed tcp_proxy connect: UF,URX.
    inbound.wait_stat("skiff.response_flags.UF", 2).await;
    inbound.wait_stat("skiff.response_flags.URX", 2).await;
    inbound.stop().await;
}
