//! skiff: an eBPF-accelerated, Envoy-compatible transparent proxy.
//!
//! # Layout
//! - [`accesslog`]: Envoy's access logs: formats, filters, non-blocking file/stdout sinks.
//! - [`addr`]: typed socket addresses (`ClientAddr`, `OrigDstAddr`, `EndpointAddr`, ...).
//! - [`cli`]: the command line: clap types, `skiff run` arguments -> [`app::RunOptions`]
//!   (typed [`cli::OptionsError`]), admin queries; `main.rs` only parses, calls and exits.
//! - [`config`]: Envoy v3 bootstrap (YAML/JSON) -> validated [`config::Bootstrap`].
//! - [`model`]: skiff's own listener/cluster/endpoint types, converted from protos by `TryFrom`;
//!   `model::compat` is the one table of what skiff honours, skips or refuses (issue 14).
//! - [`state`]: the immutable [`state::Snapshot`] and the [`state::Store`] that swaps it.
//! - [`dataplane`]: accept, original destination, filter chain, cluster, endpoint, connect, copy.
//! - [`http`]: HTTP connection manager: HTTP/1.1 and h2c, virtual hosts, routes, forwarding.
//! - [`gate`]: [`gate::Gated`], a watchdog future polled only when its own timers or
//!   signals woke it (beside a connection's work in `dataplane` and `http`).
//! - [`net`]: upstream connects (SO_MARK, optional bind source, timeout), below `dataplane`
//!   and `http`.
//! - [`rbac`]: Envoy's network and HTTP RBAC (Istio's AuthorizationPolicy): model, pure
//!   evaluation and counters; run by `dataplane` (network filters, before tcp_proxy or the
//!   HCM) and `http` (HTTP filters, before the router).
//! - [`tls`]: TLS contexts + secrets -> cached rustls configurations; upstream and
//!   downstream handshakes, peer verification as Envoy (chain, SAN matchers), identities.
//! - [`lb`]: Envoy's load balancing: priorities, localities, policies, outlier detection,
//!   circuit breakers; host state kept across snapshots.
//! - [`health`]: active health checks and outlier-detection intervals, one task per cluster.
//! - [`bpf`]: load and attach the kernel capture programs; their maps.
//! - [`mem`]: process memory: malloc arenas, giving back start-up heap and embedded objects.
//! - [`capture`]: iptables fallback, `--capture auto` probe, coexistence with other programs.
//! - [`xds`]: ADS client (state of the world and delta), one handler per resource type
//!   ([`xds::ResourceKind`]) with typed rejections, ACK/NACK, warming; connections to control
//!   planes over TLS with a bearer token ([`xds::channel`]), Istio's node ([`xds::node`]) and
//!   the SDS client ([`xds::sds`]).
//! - [`controlplane`]: skiff's own small ADS server (`skiff control-plane`), with TLS, a token
//!   check and SDS on a Unix socket.
//! - [`admin`]: Envoy-dialect admin endpoint and `/debug/` pages; the client of `skiff admin`.
//! - [`stats`]: counters with Envoy's names.
//! - [`takeover`]: `skiff run --takeover`: listening sockets handed over a Unix socket.
//! - [`app`]: the wiring of one `skiff run`.
#![deny(rust_2018_idioms)]

pub mod accesslog;
pub mod addr;
pub mod admin;
pub mod app;
pub mod bpf;
pub mod capture;
pub mod cli;
pub mod config;
pub mod controlplane;
pub mod dataplane;
pub mod gate;
pub mod health;
pub mod http;
pub mod lb;
pub mod mem;
pub mod model;
pub mod net;
pub mod rbac;
pub mod state;
pub mod stats;
pub mod takeover;
pub mod tls;
pub mod xds;
