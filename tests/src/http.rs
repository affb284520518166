//! Helpers shared by the in-process HTTP tests (`direct_http*`, `direct_envoy_*`).

use std::path::Path;

/// The loopback seed scenario: an Istio-generated LDS/RDS/CDS/EDS set whose listener binds
/// 127.0.0.1:50002 and whose endpoints are 127.0.0.11-13:50002.
pub const SEED_SCENARIO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/seed-scenario-loopback"
);

/// Copies the seed scenario's four xDS files into `dir` (a control plane's source directory).
pub fn copy_seed_scenario(dir: &Path) {
    for f in [
        "listeners.json",
        "routes.json",
        "clusters.json",
        "endpoints.json",
    ] {
        std::fs::copy(Path::new(SEED_SCENARIO).join(f), dir.join(f)).unwrap();
    }
}

/// The value of stat `name` from the admin on 127.0.0.1:`admin` (0 when it does not answer
/// or lacks the stat).
pub async fn loopback_stat(admin: u16, name: &str) -> u64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let body = skiff::admin::request(addr, hyper::Method::GET, "/stats")
        .await
        .unwrap_or_default();
    crate::stat_value(&body, name)
}
