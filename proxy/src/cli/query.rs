//! The subcommands that ask a running skiff: `admin`, `maps`, `explain` and `node` each send
//! one request to its admin API and print the answer.

use std::net::SocketAddr;
use std::path::Path;

use hyper::Method;

use super::{NodeOp, OptionsError};
use crate::admin::RequestError;

/// Why a query failed once sent; the binary exits 1.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The admin request failed (unreachable, or an error status).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// `/debug/maps` did not answer JSON.
    #[error("/debug/maps is not JSON ({source}): {body}")]
    MapsNotJson {
        /// Parse error.
        source: serde_json::Error,
        /// What came back.
        body: String,
    },
}

/// How an answer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Render {
    /// As received.
    Body,
    /// `/debug/maps` as text: one block per map, one line per entry.
    MapsText,
    /// `/debug/explain?recent` as text: one block per connection, one line per step.
    RecentText,
}

/// One request to a running skiff's admin API, from a subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCall {
    /// Admin address.
    pub admin: SocketAddr,
    /// HTTP method.
    pub method: Method,
    /// Absolute path and query.
    pub path: String,
    render: Render,
}

impl AdminCall {
    fn new(admin: SocketAddr, method: Method, path: String) -> AdminCall {
        AdminCall {
            admin,
            method,
            path,
            render: Render::Body,
        }
    }

    /// `skiff admin PATH --method M`: any method, the path made absolute.
    pub fn admin(admin: SocketAddr, method: &str, path: &str) -> Result<AdminCall, OptionsError> {
        let m = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| OptionsError::Method(method.to_owned()))?;
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        Ok(AdminCall::new(admin, m, path))
    }

    /// `skiff maps [--json]`.
    pub fn maps(admin: SocketAddr, json: bool) -> AdminCall {
        AdminCall {
            render: if json { Render::Body } else { Render::MapsText },
            ..AdminCall::new(admin, Method::GET, "/debug/maps".into())
        }
    }

    /// `skiff explain DST`.
    pub fn explain(admin: SocketAddr, dst: SocketAddr) -> AdminCall {
        AdminCall::new(admin, Method::GET, format!("/debug/explain?dst={dst}"))
    }

    /// `skiff explain --recent [N]`: the last `n` connections as text.
    pub fn explain_recent(admin: SocketAddr, n: usize) -> AdminCall {
        AdminCall {
            render: Render::RecentText,
            ..AdminCall::new(admin, Method::GET, format!("/debug/explain?recent={n}"))
        }
    }

    /// `skiff node OP`.
    pub fn node(admin: SocketAddr, op: &NodeOp) -> AdminCall {
        let (method, path) = node_request(op);
        AdminCall::new(admin, method, path)
    }

    /// Sends the request; returns what to print.
    pub async fn send(&self) -> Result<String, QueryError> {
        let body = crate::admin::request(self.admin, self.method.clone(), &self.path).await?;
        match self.render {
            Render::Body => Ok(body),
            Render::MapsText => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => Ok(maps_text(&v)),
                Err(source) => Err(QueryError::MapsNotJson { source, body }),
            },
            Render::RecentText => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => Ok(recent_text(&v)),
                Err(_) => Ok(body),
            },
        }
    }
}

/// The admin request behind a `skiff node` subcommand. The server resolves nothing
/// relative, so paths are sent absolute.
pub fn node_request(op: &NodeOp) -> (Method, String) {
    let abs = |p: &Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .to_string_lossy()
            .into_owned()
    };
    let mut q = form_urlencoded::Serializer::new(String::new());
    let (method, base) = match op {
        NodeOp::AddCgroup { path } => {
            q.append_pair("path", &abs(path));
            (Method::POST, "/debug/node/cgroups")
        }
        NodeOp::RemoveCgroup { path } => {
            q.append_pair("path", &abs(path));
            (Method::DELETE, "/debug/node/cgroups")
        }
        NodeOp::ListCgroups => (Method::GET, "/debug/node/cgroups"),
        NodeOp::AddPod {
            cgroup,
            netns,
            node_id,
            bootstrap,
        } => {
            q.append_pair("cgroup", &abs(cgroup))
                .append_pair("netns", &abs(netns))
                .append_pair("node_id", node_id);
            if let Some(b) = bootstrap {
                q.append_pair("bootstrap", &abs(b));
            }
            (Method::POST, "/debug/node/pods")
        }
        NodeOp::RemovePod { cgroup } => {
            q.append_pair("cgroup", &abs(cgroup));
            (Method::DELETE, "/debug/node/pods")
        }
        NodeOp::ListPods => (Method::GET, "/debug/node/pods"),
    };
    let q = q.finish();
    if q.is_empty() {
        (method, base.to_string())
    } else {
        (method, format!("{base}?{q}"))
    }
}

/// A human-readable rendering of `/debug/maps`: one block per map, one line per entry.
pub fn maps_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for (k, val) in v.as_object().into_iter().flatten() {
        match val {
            serde_json::Value::Array(items) => {
                out.push_str(&format!("{k} ({}):\n", items.len()));
                for it in items {
                    let line = match it.as_object() {
                        Some(o) => o
                            .iter()
                            .map(|(f, x)| match x {
                                serde_json::Value::String(s) => format!("{f}={s}"),
                                other => format!("{f}={other}"),
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                        None => it.to_string(),
                    };
                    out.push_str(&format!("  {line}\n"));
                }
            }
            other => out.push_str(&format!("{k}: {other}\n")),
        }
    }
    out
}

/// `skiff cleanup`: the iptables leftovers (skipped with `--pin-dir`), then the eBPF pins
/// (`dir`, or every skiff pin directory), as the text it prints.
pub fn cleanup(dir: Option<&std::path::Path>) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let mut out = String::new();
    if dir.is_none() {
        let report = crate::capture::iptables::cleanup()?;
        if !report.removed.is_empty() {
            out.push_str(&cleanup_text(&report));
        }
    }
    let pins = crate::bpf::pin::cleanup(dir).context("removing eBPF pins")?;
    for p in pins {
        out.push_str(&format!("unpinned {}\n", p.display()));
    }
    if out.is_empty() {
        out.push_str("nothing to remove\n");
    }
    Ok(out)
}

/// What `skiff cleanup` prints for its report.
pub fn cleanup_text(report: &crate::capture::iptables::CleanupReport) -> String {
    if report.removed.is_empty() {
        return "nothing to remove\n".to_string();
    }
    let mut out = String::new();
    for (tool, ops) in &report.removed {
        for op in ops {
            out.push_str(&format!("{tool}: {op}\n"));
        }
    }
    out
}

/// `/debug/explain?recent` as text: a header line per connection (time, path, client ->
/// destination, outcome), then one indented line per step with its reason.
pub fn recent_text(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    let conns = v["recent"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if conns.is_empty() {
        out.push_str("no recent connections\n");
    }
    for c in conns {
        let _ = writeln!(
            out,
            "{} {} {} -> {}: {}",
            s(&c["at"]),
            s(&c["path"]),
            s(&c["client"]),
            s(&c["dst"]),
            s(&c["outcome"])
        );
        for st in c["steps"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let _ = writeln!(
                out,
                "  {:<12} {:<28} {}",
                s(&st["step"]),
                s(&st["value"]),
                s(&st["reason"])
            );
        }
    }
    out
}

#[cfg(test)]
mod recent_tests {
    use super::*;

    #[test]
    fn explain_recent_asks_the_admin_api_and_prints_steps() {
        let admin: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        assert_eq!(
            AdminCall::explain_recent(admin, 5).path,
            "/debug/explain?recent=5"
        );
        let v = serde_json::json!({ "recent": [{
            "at": "2026-12-07T06:00:00.000Z", "path": "kernel", "client": null,
            "dst": "10.96.0.1:80", "outcome": "ok",
            "steps": [{ "step": "endpoint", "value": "127.0.0.2:80", "reason": "chosen in the kernel" }],
        }]});
        let t = recent_text(&v);
        assert!(
            t.starts_with("2026-12-07T06:00:00.000Z kernel - -> 10.96.0.1:80: ok\n"),
            "{t}"
        );
        assert!(t.contains("  endpoint     127.0.0.2:80"), "{t}");
        assert_eq!(
            recent_text(&serde_json::json!({})),
            "no recent connections\n"
        );
    }
}
