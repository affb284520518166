//! Configuration files for the proxies under test: all forward the same two services (iperf3
//! and the echo backend) with plain TCP proxying and no extras (no access logs, no stats sinks).

/// Where the backends listen (inside the bench namespace).
pub const BACKEND_IP: &str = "127.0.0.2";
/// iperf3 server port.
pub const IPERF_PORT: u16 = 5201;
/// Echo backend port (latency and connection rate).
pub const ECHO_PORT: u16 = 7000;
/// Where plain L4 proxies listen.
pub const PROXY_IP: &str = "127.0.0.1";
/// Proxy port for iperf3.
pub const PROXY_IPERF_PORT: u16 = 15201;
/// Proxy port for the echo backend.
pub const PROXY_ECHO_PORT: u16 = 17000;
/// The service VIP; exists only inside the bench namespace.
pub const VIP: &str = "10.96.0.1";
/// The transparent (virtualOutbound) listener port.
pub const CAPTURE_PORT: u16 = 15001;
/// Admin port of skiff and Envoy (only one of them runs at a time).
pub const ADMIN_PORT: u16 = 15000;

fn tcp_proxy(name: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {name}"#
    )
}

fn clusters() -> String {
    [("iperf", IPERF_PORT), ("echo", ECHO_PORT)]
        .iter()
        .map(|(name, port)| {
            format!(
                r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {BACKEND_IP}, port_value: {port} }} }} }}
"#
            )
        })
        .collect()
}

fn admin() -> String {
    format!(
        "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {ADMIN_PORT} }}\n"
    )
}

/// Envoy v3 bootstrap with one static listener per service (skiff `--capture none` and Envoy
/// read the same file).
pub fn l4_bootstrap() -> String {
    let listeners: String = [("iperf", PROXY_IPERF_PORT), ("echo", PROXY_ECHO_PORT)]
        .iter()
        .map(|(name, port)| {
            format!(
                "  - name: {name}\n    address:\n      socket_address: {{ address: {PROXY_IP}, port_value: {port} }}\n    filter_chains:\n    - filters:\n{}\n",
                tcp_proxy(name)
            )
        })
        .collect();
    format!(
        "{}static_resources:\n  listeners:\n{listeners}  clusters:\n{}",
        admin(),
        clusters()
    )
}

/// Istio-shaped virtualOutbound listener on the capture port: original destination (eBPF's
/// getsockopt or iptables REDIRECT) -> filter chain by VIP and port -> cluster.
pub fn transparent_bootstrap() -> String {
    let chains: String = [("iperf", IPERF_PORT), ("echo", ECHO_PORT)]
        .iter()
        .map(|(name, port)| {
            format!(
                "    - name: {VIP}_{port}\n      filter_chain_match:\n        destination_port: {port}\n        prefix_ranges: [{{ address_prefix: {VIP}, prefix_len: 32 }}]\n      filters:\n{}\n",
                tcp_proxy(name)
            )
        })
        .collect();
    format!(
        r#"{}static_resources:
  listeners:
  - name: virtualOutbound
    address:
      socket_address: {{ address: 0.0.0.0, port_value: {CAPTURE_PORT} }}
    use_original_dst: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
{chains}  clusters:
{}"#,
        admin(),
        clusters()
    )
}

/// HAProxy in TCP mode; threads default to the CPU count (as skiff's runtime workers do).
pub fn haproxy_cfg() -> String {
    let mut s = String::from(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n",
    );
    for (name, listen, port) in [
        ("iperf", PROXY_IPERF_PORT, IPERF_PORT),
        ("echo", PROXY_ECHO_PORT, ECHO_PORT),
    ] {
        s.push_str(&format!(
            "\nfrontend {name}_in\n  bind {PROXY_IP}:{listen}\n  default_backend {name}\n\nbackend {name}\n  server s1 {BACKEND_IP}:{port}\n"
        ));
    }
    s
}

/// nginx `stream` proxy; `worker_processes auto` (one per CPU). `load_module` when the stream
/// module is a Debian dynamic module.
pub fn nginx_conf(dir: &std::path::Path, stream_module: Option<&std::path::Path>) -> String {
    let load = stream_module
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    let mut servers = String::new();
    for (listen, port) in [(PROXY_IPERF_PORT, IPERF_PORT), (PROXY_ECHO_PORT, ECHO_PORT)] {
        servers.push_str(&format!(
            "  server {{\n    listen {PROXY_IP}:{listen} backlog=4096;\n    proxy_pass {BACKEND_IP}:{port};\n    proxy_connect_timeout 2s;\n  }}\n"
        ));
    }
    format!(
        "{load}daemon off;\nmaster_process on;\nworker_processes auto;\nworker_rlimit_nofile 65536;\npid {}/nginx.pid;\nerror_log stderr warn;\nevents {{\n  worker_connections 16384;\n}}\nstream {{\n{servers}}}\n",
        dir.display()
    )
}

/// nginx as an HTTP reverse proxy on `listen` for `peer`: upstream keep-alive (HTTP/1.1, the
/// client's `Connection` header dropped), no access log, no per-connection request limit (wrk
/// would reconnect every 1000 requests otherwise; skiff and Envoy have no such limit).
pub fn nginx_http_conf(dir: &std::path::Path, listen: &str, peer: &str) -> String {
    format!(
        r#"daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 65536;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{
  worker_connections 16384;
}}
http {{
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  upstream peer {{
    server {peer};
    keepalive 128;
    keepalive_requests 100000000;
  }}
  server {{
    listen {listen} backlog=4096;
    location / {{
      proxy_pass http://peer;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"#,
        dir = dir.display()
    )
}

/// HAProxy `mode http` on `listen` for `peer`, idle server connections shared between client
/// connections (`http-reuse always`); threads default to the CPU count; no logging.
pub fn haproxy_http_cfg(listen: &str, peer: &str) -> String {
    format!(
        "global\n  maxconn 8000\n\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n\nfrontend http_in\n  bind {listen}\n  default_backend peer\n\nbackend peer\n  http-reuse always\n  server s1 {peer}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_http_proxies_with_upstream_keepalive() {
        let c = nginx_http_conf(
            std::path::Path::new("/run/x"),
            "127.0.0.1:18000",
            "127.0.0.1:18080",
        );
        for want in [
            "upstream peer {\n    server 127.0.0.1:18080;\n    keepalive 128;",
            "listen 127.0.0.1:18000 backlog=4096;",
            "proxy_pass http://peer;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "access_log off;",
            "pid /run/x/nginx.pid;",
            "daemon off;",
        ] {
            assert!(c.contains(want), "missing {want:?} in\n{c}");
        }
        // Balanced braces: nginx refuses the file otherwise.
        assert_eq!(c.matches('{').count(), c.matches('}').count());
    }

    #[test]
    fn haproxy_http_reuses_server_connections() {
        let c = haproxy_http_cfg("127.0.0.1:18000", "127.0.0.1:18080");
        for want in [
            "  mode http\n",
            "bind 127.0.0.1:18000\n",
            "  http-reuse always\n",
            "server s1 127.0.0.1:18080\n",
        ] {
            assert!(c.contains(want), "missing {want:?} in\n{c}");
        }
        assert!(!c.contains("mode tcp"));
    }

    #[test]
    fn l4_configs_name_both_services() {
        let h = haproxy_cfg();
        assert!(h.contains(&format!("bind {PROXY_IP}:{PROXY_ECHO_PORT}")));
        assert!(h.contains(&format!("server s1 {BACKEND_IP}:{IPERF_PORT}")));
        let n = nginx_conf(std::path::Path::new("/d"), None);
        assert!(n.contains(&format!("proxy_pass {BACKEND_IP}:{ECHO_PORT};")));
        assert!(!n.contains("load_module"));
    }
}
