//! The admin API is safe by default: read-only unless `--admin-mutations`, request bodies
//! bounded (413), slow header senders cut off, node-mode pod requests confined to namespace
//! paths and `--pod-bootstrap-dir`; `/drain_listeners` publishes Envoy's drain to the listener
//! tasks. The admin server runs in-process on 127.0.0.1:0 over an empty store; requests are
//! raw HTTP/1.1 over TCP so headers and bodies are exactly what a test says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use skiff::admin::{Admin, AdminOptions, DrainSignal};
use skiff::state::{Snapshot, Store};
use skiff::stats::Stats;

/// A running admin server; stops when dropped.
struct AdminServer {
    addr: SocketAddr,
    drain: DrainSignal,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    fn start(options: AdminOptions) -> AdminServer {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind admin");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let drain = DrainSignal::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = drain.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let admin = Arc::new(Admin {
                    store: Arc::new(Store::new(Snapshot::new(
                        vec![],
                        vec![],
                        &Default::default(),
                    ))),
                    stats: Arc::new(Stats::default()),
                    capture: None,
                    ready: Arc::new(AtomicBool::new(true)),
                    bootstrap: Arc::default(),
                    extra_config_dump: None,
                    node_id: "direct-admin".into(),
                });
                skiff::admin::serve(listener, admin, options, d, async {
                    let _ = rx.await;
                })
                .await;
            });
        });
        AdminServer {
            addr,
            drain,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Sends `raw` and returns (status, whole response text).
    fn raw(&self, raw: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).expect("connect admin");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    fn request(&self, method: &str, path: &str) -> (u16, String) {
        self.raw(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn mutating_requests_are_refused_without_the_opt_in() {
    let admin = AdminServer::start(AdminOptions::default());
    assert_eq!(admin.request("GET", "/ready").0, 200);
    for (method, path) in [
        ("POST", "/drain_listeners"),
        ("POST", "/drain_listeners?inboundonly"),
        ("POST", "/debug/node/cgroups?path=/sys/fs/cgroup/x"),
        ("DELETE", "/debug/node/cgroups?path=/sys/fs/cgroup/x"),
        (
            "POST",
            "/debug/node/pods?cgroup=/x&netns=/run/netns/a&node_id=n",
        ),
        ("DELETE", "/debug/node/pods?cgroup=/x"),
        ("POST", "/quitquitquit"),
        ("PUT", "/anything"),
    ] {
        let (status, body) = admin.request(method, path);
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert!(body.contains("--admin-mutations"), "{body}");
    }
    // Nothing was drained.
    assert_eq!(admin.drain.state(), Default::default());
    assert_eq!(admin.request("GET", "/ready").0, 200);
}

#[test]
fn drain_listeners_stops_inbound_then_all_as_envoy() {
    let admin = AdminServer::start(AdminOptions {
        allow_mutations: true,
        drain_time: Duration::from_millis(300),
        ..AdminOptions::default()
    });
    let (status, body) = admin.request("POST", "/drain_listeners?skip_exit");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("skip_exit requires graceful"), "{body}");

    assert_eq!(admin.request("POST", "/drain_listeners?inboundonly").0, 200);
    let s = admin.drain.state();
    assert!(s.inbound && !s.outbound, "{s:?}");
    // An inbound-only drain leaves the proxy ready for outbound traffic.
    assert_eq!(admin.request("GET", "/ready").0, 200);

    // Graceful: readiness goes at once, the listeners stop after the drain period.
    let asked = Instant::now();
    assert_eq!(admin.request("POST", "/drain_listeners?graceful").0, 200);
    assert_eq!(admin.request("GET", "/ready").0, 503);
    assert!(!admin.drain.state().outbound);
    while !admin.drain.state().outbound {
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "graceful drain never stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(asked.elapsed() >= Duration::from_millis(300));
}

#[test]
fn oversized_bodies_are_refused_with_413() {
    let admin = AdminServer::start(AdminOptions {
        allow_mutations: true,
        ..AdminOptions::default()
    });
    // Declared too large: refused before reading.
    let (status, body) = admin
        .raw(b"POST /drain_listeners HTTP/1.1\r\nHost: admin\r\nContent-Length: 1000000\r\n\r\n");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("larger than 65536 bytes"), "{body}");
    // Chunked, no length: refused once 64 KiB have been read.
    let mut req =
        b"POST /drain_listeners HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..5 {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (status, body) = admin.raw(&req);
    assert_eq!(status, 413, "{body}");
    // Nothing was drained by the refused requests.
    assert_eq!(admin.drain.state(), Default::default());
    // A small body is fine.
    let (status, _) = admin.raw(
        b"GET /ready HTTP/1.1\r\nHost: admin\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(status, 200);
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let admin = AdminServer::start(AdminOptions {
        header_read_timeout: Duration::from_millis(300),
        ..AdminOptions::default()
    });
    let mut s = TcpStream::connect(admin.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: adm").unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    // The server closes the connection (with a 408 or without an answer) after the timeout.
    let _ = s.read_to_end(&mut out);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("200 OK"), "{text}");
}

#[test]
fn pod_requests_name_only_namespace_paths_and_the_bootstrap_directory() {
    let dir = std::env::temp_dir().join(format!("skiff-direct-admin-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("pods")).unwrap();
    std::fs::write(dir.join("pods/a.yaml"), "node: { id: a }\n").unwrap();
    std::fs::write(dir.join("outside.yaml"), "node: { id: b }\n").unwrap();
    let admin = AdminServer::start(AdminOptions {
        allow_mutations: true,
        pod_bootstrap_dir: Some(dir.join("pods")),
        ..AdminOptions::default()
    });
    let post = |netns: &str, bootstrap: Option<&str>| {
        let mut q =
            format!("/debug/node/pods?cgroup=%2Fsys%2Ffs%2Fcgroup%2Fpod&node_id=n&netns={netns}");
        if let Some(b) = bootstrap {
            q.push_str("&bootstrap=");
            q.push_str(b);
        }
        admin.request("POST", &q)
    };
    for netns in [
        "%2Fetc%2Fshadow",
        "%2Frun%2Fnetns%2F..%2F..%2Froot",
        "%2Fproc%2Fself%2Fns%2Fnet",
    ] {
        let (status, body) = post(netns, None);
        assert_eq!(status, 403, "{netns}: {body}");
        assert!(
            body.contains("/run/netns/NAME or /proc/PID/ns/net"),
            "{body}"
        );
    }
    let outside = dir.join("outside.yaml");
    for b in [
        "..%2Foutside.yaml",
        outside.to_str().unwrap(),
        "%2Fetc%2Fpasswd",
    ] {
        let (status, body) = post("%2Frun%2Fnetns%2Fpod", Some(b));
        assert_eq!(status, 403, "{b}: {body}");
        assert!(body.contains("--pod-bootstrap-dir"), "{body}");
    }
    // Allowed paths pass the checks and reach the capture, which this skiff does not have.
    for (netns, b) in [
        ("%2Frun%2Fnetns%2Fpod", Some("a.yaml")),
        ("%2Fproc%2F1%2Fns%2Fnet", None),
    ] {
        let (status, body) = post(netns, b);
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("capture is not installed"), "{body}");
    }
    // Without a configured directory, no bootstrap is read at all.
    let strict = AdminServer::start(AdminOptions {
        allow_mutations: true,
        ..AdminOptions::default()
    });
    let (status, body) = strict.request(
        "POST",
        "/debug/node/pods?cgroup=%2Fx&node_id=n&netns=%2Frun%2Fnetns%2Fp&bootstrap=%2Ftmp%2Fb.yaml",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("which is not set"), "{body}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn connections_beyond_the_cap_are_closed_and_the_admin_recovers() {
    let admin = AdminServer::start(AdminOptions {
        header_read_timeout: Duration::from_secs(30),
        ..AdminOptions::default()
    });
    // Idle connections that never send a request hold every slot.
    let held: Vec<TcpStream> = (0..skiff::admin::policy::MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(admin.addr).unwrap())
        .collect();
    // Each is accepted in turn; give the server time to take them all.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(admin.addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let mut out = Vec::new();
    let started = Instant::now();
    let _ = extra.read_to_end(&mut out);
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "not closed at once"
    );
    drop(held);
    // Slots come back once those connections are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if admin.request("GET", "/ready").0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "admin did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
}
