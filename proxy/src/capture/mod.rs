//! How traffic reaches the proxy besides skiff's own eBPF programs (`bpf`).
//!
//! - [`iptables`]: the fallback (`--capture iptables`): Istio-equivalent `nat` rules in the
//!   current network namespace, removed on exit; `skiff cleanup` removes leftovers.
//! - [`probe`]: `--capture auto`: whether the kernel and process can run the eBPF capture.
//! - [`coexist`]: other BPF programs already on the cgroup hooks skiff would attach to.
//! - [`pods`]: node mode with one pipeline (node id, snapshot, listeners in the pod netns) per pod.

pub mod coexist;
pub mod iptables;
pub mod pods;
pub mod probe;

pub use iptables::{IptablesCapture, IptablesConfig, IptablesGate};

/// Extra capture settings of one `skiff run` (beside [`crate::bpf::CaptureConfig`]).
#[derive(Clone, Debug, Default)]
pub struct CaptureExtras {
    /// Install the iptables fallback instead of (or without) the eBPF capture.
    pub iptables: Option<IptablesConfig>,
    /// Start even when other programs are attached to the eBPF capture's hooks.
    pub allow_coexist: bool,
    /// `--capture auto` chose eBPF: if installing it fails (refused, attach error), install
    /// these iptables rules instead.
    pub auto_fallback: Option<IptablesConfig>,
    /// Inbound capture: the inbound listener and what is steered to it.
    pub inbound: Option<InboundOptions>,
}

/// Inbound capture (Istio's virtualInbound on 15006).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundOptions {
    /// Port of the inbound listener (bound on 0.0.0.0 and, with IPv6, [::]).
    pub port: u16,
    /// Destination ports never captured inbound (Istio's excludeInboundPorts).
    pub exclude_ports: Vec<u16>,
    /// Steer with an `sk_lookup` program (eBPF mode); `false`: iptables PREROUTING does.
    pub sk_lookup: bool,
    /// Addresses of the pod; empty: every non-loopback address of the network namespace.
    pub pod_ips: Vec<std::net::IpAddr>,
    /// Listen on IPv6 too.
    pub ipv6: bool,
}
