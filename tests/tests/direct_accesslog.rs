//! Access logs end to end: the same Envoy bootstrap (Istio's default format on the HCM, the
//! tcp_proxy and the listener, and a JSON format) runs in real Envoy and in an in-process
//! skiff; the same requests (success, no route NR, no healthy upstream UH, connect failure
//! UF / with retry URX,UF, a listener with no matching chain NR) give lines that agree field
//! by field, apart from times, ids and ports. Then skiff's files follow a rename after
//! `POST /reopen_logs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use skiff_tests::{
    Envoy, InProcessSkiff, TempYaml, free_addr, free_port, loopback_stat, run_options, serve_http1,
    test_name,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(15);

const ISTIO_FORMAT: &str = r#"[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"#;

/// Ports of one proxy's listeners.
#[derive(Debug, Clone, Copy)]
struct Ports {
    admin: u16,
    http: u16,
    tcp_ok: u16,
    tcp_uh: u16,
    tcp_uf: u16,
    tcp_nr: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            admin: free_port(),
            http: free_port(),
            tcp_ok: free_port(),
            tcp_uh: free_port(),
            tcp_uf: free_port(),
            tcp_nr: free_port(),
        }
    }
}

fn file_log(path: &Path, format: &str) -> String {
    format!(
        r#"
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              log_format:
                {format}"#,
        path.display()
    )
}

fn istio_log(path: &Path) -> String {
    file_log(
        path,
        &format!("text_format_source: {{ inline_string: \"{ISTIO_FORMAT}\" }}"),
    )
}

fn json_log(path: &Path) -> String {
    file_log(
        path,
        r#"json_format: { code: "%RESPONSE_CODE%", flags: "%RESPONSE_FLAGS%", host: "%UPSTREAM_HOST%", details: "%RESPONSE_CODE_DETAILS%", route: "%ROUTE_NAME%", cluster: "%UPSTREAM_CLUSTER%", sent: "%BYTES_SENT%", proto: "%PROTOCOL%", ua: "%REQ(USER-AGENT):4%", dur: "%DURATION%" }"#,
    )
}

fn tcp_listener(name: &str, port: u16, cluster: &str, log: &Path) -> String {
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
          access_log:{}{}"#,
        istio_log(log),
        json_log(&log.with_extension("json"))
    )
}

fn cluster(name: &str, eps: &[SocketAddr]) -> String {
    let eps: String = eps
        .iter()
        .map(|a| {
            format!(
                "\n        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    let body = if eps.is_empty() {
        String::new()
    } else {
        format!("\n      endpoints:\n      - lb_endpoints:{eps}")
    };
    format!(
        "\n  - name: {name}\n    type: STATIC\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: {name}{body}"
    )
}

/// One bootstrap, Envoy's and skiff's alike.
fn bootstrap(
    p: Ports,
    dir: &Path,
    http_be: SocketAddr,
    echo: SocketAddr,
    dead: SocketAddr,
    slow: SocketAddr,
) -> String {
    let http_log = istio_log(&dir.join("http.log"));
    let json = json_log(&dir.join("http.json"));
    let failed = file_log(
        &dir.join("http5xx.log"),
        "text_format: \"%ROUTE_NAME% %RESPONSE_CODE% %RESPONSE_FLAGS%\\n\"",
    ) + r#"
            filter:
              and_filter:
                filters:
                - status_code_filter: { comparison: { op: GE, value: { default_value: 500, runtime_key: none } } }
                - or_filter:
                    filters:
                    - response_flag_filter: { flags: [UH, UF] }
                    - not_health_check_filter: {}"#;
    format!(
        r#"node: {{ id: al, cluster: al }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {http} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: h
          access_log:{http_log}{json}{failed}
          route_config:
            virtual_hosts:
            - name: a
              domains: ["a"]
              routes:
              - {{ name: rok, match: {{ prefix: /ok }}, route: {{ cluster: live }} }}
              - {{ name: rdead, match: {{ prefix: /dead }}, route: {{ cluster: dead }} }}
              - {{ name: rretry, match: {{ prefix: /retry }}, route: {{ cluster: dead, retry_policy: {{ retry_on: connect-failure, num_retries: 1 }} }} }}
              - {{ name: rempty, match: {{ prefix: /empty }}, route: {{ cluster: empty }} }}
              - {{ name: rslow, match: {{ prefix: /slow }}, route: {{ cluster: slow }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}{tcp_ok}{tcp_uh}{tcp_uf}
  - name: tcp_nr
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {nr} }} }}
    access_log:{nr_log}
    filter_chains:
    - filter_chain_match: {{ destination_port: 1 }}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: nr
          cluster: echo
  clusters:{live}{echo_c}{dead_c}{empty}{slow_c}
"#,
        admin = p.admin,
        http = p.http,
        nr = p.tcp_nr,
        tcp_ok = tcp_listener("tcp_ok", p.tcp_ok, "echo", &dir.join("tcp.log")),
        tcp_uh = tcp_listener("tcp_uh", p.tcp_uh, "empty", &dir.join("tcp.log")),
        tcp_uf = tcp_listener("tcp_uf", p.tcp_uf, "dead", &dir.join("tcp.log")),
        nr_log = istio_log(&dir.join("listener.log")).replace("\n      ", "\n  "),
        live = cluster("live", &[http_be]),
        echo_c = cluster("echo", &[echo]),
        dead_c = cluster("dead", &[dead]),
        empty = cluster("empty", &[]),
        slow_c = cluster("slow", &[slow]),
    )
}

async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// One HTTP/1.1 request (Host `host`, closing), the whole answer read.
async fn get(port: u16, host: &str, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: skiff-test/1\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A TCP exchange: `hi` echoed, or the connection closed.
async fn tcp(port: u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(b"hi").await;
    let mut b = [0u8; 2];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await;
}

/// Waits until `path` has at least `n` lines.
async fn lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let got: Vec<String> = text.lines().map(str::to_string).collect();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, not {n}: {got:#?}",
            path.display(),
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An Istio-format line cut into its fields (quoted fields kept whole).
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ' ' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Fields that differ between two proxies by nature: compared as present (`-` or `"-"`)
/// or not. Addresses whose port is the proxy's own: compared without the port.
const VOLATILE: &[usize] = &[0, 9, 10, 13, 17, 19];
const OWN_PORT: &[usize] = &[18];

fn normalized(line: &str) -> Vec<String> {
    fields(line)
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            if VOLATILE.contains(&i) {
                if f == "-" || f == "\"-\"" {
                    "-".into()
                } else {
                    "<present>".into()
                }
            } else if OWN_PORT.contains(&i) {
                f.rsplit_once(':')
                    .map_or(f.clone(), |(ip, _)| ip.to_string())
            } else {
                f
            }
        })
        .collect()
}

/// Lines keyed by one of their fields.
fn by_field(lines: &[String], idx: usize) -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    for l in lines {
        let f = normalized(l);
        m.insert(f[idx].clone(), f);
    }
    m
}

async fn drive(p: Ports) {
    for path in ["/ok", "/dead", "/retry", "/empty"] {
        let r = get(p.http, "a", path).await;
        assert!(r.starts_with("HTTP/1.1 "), "{path}: {r}");
    }
    // The client gives up on a backend that never answers: `DC`, code 0.
    let mut s = TcpStream::connect(("127.0.0.1", p.http)).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\nUser-Agent: skiff-test/1\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let r = get(p.http, "nowhere", "/x").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    for port in [p.tcp_ok, p.tcp_uh, p.tcp_uf, p.tcp_nr] {
        tcp(port).await;
    }
}

async fn wait_listening(ports: &[u16]) {
    let deadline = Instant::now() + WAIT;
    for &p in ports {
        while TcpStream::connect(("127.0.0.1", p)).await.is_err() {
            assert!(Instant::now() < deadline, "port {p} never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(test_name(name));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_logs_match_envoy_field_by_field() {
    let be = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_be = be.local_addr().unwrap();
    serve_http1(be, |_req| async {
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"hello")));
        r.headers_mut()
            .insert("content-type", "text/plain".parse().unwrap());
        r
    });
    let echo = echo_backend().await;
    let dead = free_addr();
    // Accepts and never answers (the connections are kept until the test ends).
    let slow_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = slow_l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = slow_l.accept().await {
            held.push(s);
        }
    });

    // Envoy first: its lines are the reference.
    let env_dir = dir("al-envoy");
    let ep = Ports::new();
    let cfg = TempYaml::new(
        "al-envoy",
        &bootstrap(ep, &env_dir.0, http_be, echo, dead, slow),
    );
    let envoy = Envoy::start(&cfg, std::process::id() % 50_000 + 11);
    wait_listening(&[ep.http, ep.tcp_ok, ep.tcp_uh, ep.tcp_uf, ep.tcp_nr]).await;
    // A probe connection of each TCP listener would log too: drive, then count.
    let sk_dir = dir("al-skiff");
    let sp = Ports::new();
    let yaml = bootstrap(sp, &sk_dir.0, http_be, echo, dead, slow);
    let boot = skiff::config::parse(&yaml, "<accesslog>").expect("bootstrap");
    let mut opts = run_options(boot);
    // `POST /reopen_logs` changes state, as every admin POST: it needs --admin-mutations.
    opts.admin_options.allow_mutations = true;
    let skiff = InProcessSkiff::start(opts);
    // Waiting for the listeners connects to them: those probe connections are logged too
    // (tcp_ok: 0 bytes, tcp_nr: NR), by both proxies alike.
    wait_listening(&[sp.http, sp.tcp_ok, sp.tcp_uh, sp.tcp_uf, sp.tcp_nr]).await;

    drive(ep).await;
    drive(sp).await;

    // HTTP, Istio's format: one line per request, keyed by route name (NR has none: `-`).
    let e_http = lines(&env_dir.0.join("http.log"), 6).await;
    let s_http = lines(&sk_dir.0.join("http.log"), 6).await;
    let (e, s) = (by_field(&e_http, 21), by_field(&s_http, 21));
    assert_eq!(e.keys().collect::<Vec<_>>(), s.keys().collect::<Vec<_>>());
    for (route, ef) in &e {
        let sf = &s[route];
        for (i, (a, b)) in ef.iter().zip(sf).enumerate() {
            // Known gap: skiff learns an upstream connection's local address with the
            // response, so a request abandoned before it (DC) logs `-` where Envoy has it.
            if route == "rslow" && i == 17 {
                continue;
            }
            // Local replies: skiff's bodies are Envoy's, so BYTES_SENT agrees as well.
            assert_eq!(
                a, b,
                "route {route}, field {i}:\n envoy {ef:?}\n skiff {sf:?}"
            );
        }
    }
    // The flags the issue names, as Envoy wrote them.
    assert_eq!(s["rok"][3], "-");
    assert_eq!(s["rempty"][3], "UH");
    assert_eq!(s["rdead"][3], "UF");
    assert_eq!(s["rretry"][3], "URX,UF");
    assert_eq!(s["-"][3], "NR");
    assert_eq!(
        (s["rslow"][2].as_str(), s["rslow"][3].as_str()),
        ("0", "DC")
    );

    // JSON: typed values, equal apart from the duration.
    let e_json = lines(&env_dir.0.join("http.json"), 6).await;
    let s_json = lines(&sk_dir.0.join("http.json"), 6).await;
    let key = |ls: &[String]| -> BTreeMap<String, serde_json::Value> {
        ls.iter()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["dur"] = v["dur"].is_u64().into();
                (v["route"].to_string(), v)
            })
            .collect()
    };
    assert_eq!(key(&e_json), key(&s_json));

    // A filtered logger: 5xx only (and_filter, status_code_filter, or_filter,
    // response_flag_filter, not_health_check_filter).
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let e_5xx = sorted(lines(&env_dir.0.join("http5xx.log"), 3).await);
    let s_5xx = sorted(lines(&sk_dir.0.join("http5xx.log"), 3).await);
    assert_eq!(e_5xx, s_5xx);
    assert_eq!(
        s_5xx,
        ["rdead 503 UF", "rempty 503 UH", "rretry 503 URX,UF"]
    );

    // TCP (tcp_proxy logs) keyed by cluster; the listener log for NR.
    // Each listener's readiness probe was a connection too: 3 probes + 3 exchanges.
    let e_tcp = lines(&env_dir.0.join("tcp.log"), 6).await;
    let s_tcp = lines(&sk_dir.0.join("tcp.log"), 6).await;
    let (e, s) = (by_field(&e_tcp, 16), by_field(&s_tcp, 16));
    assert_eq!(
        e, s,
        "tcp_proxy lines differ:\n envoy {e_tcp:#?}\n skiff {s_tcp:#?}"
    );
    assert_eq!(s["dead"][3], "UF,URX");
    let e_tj = lines(&env_dir.0.join("tcp.json"), 6).await;
    let s_tj = lines(&sk_dir.0.join("tcp.json"), 6).await;
    let by_cluster = |ls: &[String]| -> BTreeMap<String, serde_json::Value> {
        ls.iter()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["dur"] = v["dur"].is_u64().into();
                (v["cluster"].to_string(), v)
            })
            .collect()
    };
    assert_eq!(by_cluster(&e_tj), by_cluster(&s_tj));
    assert_eq!(by_cluster(&s_tj)["\"dead\""]["flags"], "UF,URX");
    assert_eq!(s["empty"][3], "UH");
    let e_nr = lines(&env_dir.0.join("listener.log"), 2).await;
    let s_nr = lines(&sk_dir.0.join("listener.log"), 2).await;
    assert_eq!(normalized(&e_nr[1]), normalized(&s_nr[1]));
    assert_eq!(normalized(&s_nr[1])[3], "NR");
    drop(envoy);

    // Rotation: rename, reopen, the next line goes to a new file.
    let log = sk_dir.0.join("http.log");
    std::fs::rename(&log, sk_dir.0.join("http.log.1")).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], sp.admin));
    let r = skiff::admin::request(addr, hyper::Method::POST, "/reopen_logs")
        .await
        .unwrap();
    assert_eq!(r, "OK\n");
    get(sp.http, "a", "/ok").await;
    let fresh = lines(&log, 1).await;
    assert_eq!(normalized(&fresh[0])[21], "rok");
    assert_eq!(
        loopback_stat(sp.admin, "access_logs.file.write_dropped").await,
        0
    );
    skiff.stop().await.unwrap();
}
