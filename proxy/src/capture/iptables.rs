//! iptables fallback: Istio-equivalent `nat` rules in the current network namespace.
//!
//! Chains (named after Istio's `ISTIO_*`, so an operator recognises them):
//!
//! ```text
//! OUTPUT     -p tcp -j SKIFF_OUTPUT
//! SKIFF_OUTPUT     -o lo -s 127.0.0.6 RETURN      inbound passthrough source (Istio)
//!                  -m mark --mark MARK RETURN     the proxy's own upstream sockets
//!                  -m owner --uid/gid-owner RETURN  (with --proxy-uid/--proxy-gid)
//!                  -d 127.0.0.0/8 RETURN          loopback is never captured
//!                  --dport P / -d CIDR RETURN     excludeOutboundPorts / IPRanges
//!                  -j SKIFF_REDIRECT
//! SKIFF_REDIRECT   -p tcp -j REDIRECT --to-ports 15001
//! PREROUTING -p tcp -j SKIFF_INBOUND               (only with inbound capture)
//! SKIFF_INBOUND    --dport P RETURN               excludeInboundPorts
//!                  -j SKIFF_IN_REDIRECT
//! SKIFF_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
//! ```
//!
//! One difference from Istio: Istio also returns every non-proxy connect that leaves through
//! `lo` (`-o lo ! --uid-owner 1337 -j RETURN`), so an app calling an address of its own pod is
//! not captured. skiff's eBPF capture does capture those (only 127.0.0.0/8 and ::1 are
//! skipped) and this fallback behaves the same, so both modes route the same connects.
//!
//! Everything is applied with one `iptables-restore --noflush` per family (all or nothing) and
//! removed the same way: exactly the installed rules on drop, or every `SKIFF_*` chain and the
//! jumps to them with [`cleanup`] (after a SIGKILL). The kernel's conntrack then answers
//! `SO_ORIGINAL_DST` on the proxy's accepted sockets, as with skiff's eBPF capture.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// Prefix of every chain skiff creates; [`cleanup`] removes every chain that has it.
pub const CHAIN_PREFIX: &str = "SKIFF_";
const OUTPUT_CHAIN: &str = "SKIFF_OUTPUT";
const REDIRECT_CHAIN: &str = "SKIFF_REDIRECT";
const INBOUND_CHAIN: &str = "SKIFF_INBOUND";
const IN_REDIRECT_CHAIN: &str = "SKIFF_IN_REDIRECT";

/// How long `iptables-restore` waits for the xtables lock.
const RESTORE_WAIT_SECS: u32 = 5;

/// Source address of the proxy's inbound passthrough connects (Istio's convention).
pub const INBOUND_PASSTHROUGH_SRC_V4: &str = "127.0.0.6";
/// IPv6 counterpart of [`INBOUND_PASSTHROUGH_SRC_V4`].
pub const INBOUND_PASSTHROUGH_SRC_V6: &str = "::6";

/// What the rules capture and how the proxy's own traffic is recognised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesConfig {
    /// Port of the outbound listener (REDIRECT target of `OUTPUT`).
    pub outbound_port: u16,
    /// Port of the inbound listener; `None`: no `PREROUTING` rules.
    pub inbound_port: Option<u16>,
    /// SO_MARK on the proxy's upstream sockets (0: no mark rule).
    pub proxy_mark: u32,
    /// The proxy's uid (Istio's 1337): its connects are never captured.
    pub proxy_uid: Option<u32>,
    /// The proxy's gid, same purpose.
    pub proxy_gid: Option<u32>,
    /// Destination ports never captured outbound.
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs never captured outbound.
    pub exclude_cidrs: Vec<(IpAddr, u8)>,
    /// Destination ports never captured inbound.
    pub exclude_inbound_ports: Vec<u16>,
    /// Also install the IPv6 rules (ip6tables).
    pub ipv6: bool,
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        })
    }
}

/// Which iptables implementation drives the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft` (nf_tables kernel API).
    Nft,
    /// `iptables-legacy` (x_tables).
    Legacy,
    /// Plain `iptables`, whatever it links to (when neither suffixed tool exists).
    Default,
}

impl Backend {
    fn tool(self, family: Family, what: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        match self {
            Backend::Nft => format!("{base}-nft-{what}"),
            Backend::Legacy => format!("{base}-legacy-{what}"),
            Backend::Default => format!("{base}-{what}"),
        }
    }

    /// The `*-restore` command for `family`.
    pub fn restore(self, family: Family) -> String {
        self.tool(family, "restore")
    }

    /// The `*-save` command for `family`.
    pub fn save(self, family: Family) -> String {
        self.tool(family, "save")
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::Default => "default",
        })
    }
}

/// Errors of the iptables capture; each names the tool, and the rule when one failed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// No iptables implementation answered `-save -t nat`.
    #[error(
        "no working iptables found (tried {tried}): install iptables (`apt-get install iptables`) and run with CAP_NET_ADMIN"
    )]
    NoBackend {
        /// What was tried and why it failed.
        tried: String,
    },
    /// A tool could not be started.
    #[error("running {tool}: {source}")]
    Spawn {
        /// Command.
        tool: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `iptables-restore` rejected the script; `rule` is the line it named.
    #[error("{tool} failed at line {line} `{rule}`: {message}")]
    Rule {
        /// Command.
        tool: String,
        /// 1-based line of the script.
        line: usize,
        /// That line.
        rule: String,
        /// The tool's message.
        message: String,
    },
    /// A tool failed without naming a line.
    #[error("{tool} failed ({status}): {message}")]
    Failed {
        /// Command.
        tool: String,
        /// Exit status.
        status: String,
        /// stderr.
        message: String,
    },
    /// skiff chains already exist (another skiff, or leftovers of a killed one).
    #[error(
        "{family} chains {chains} already exist in this network namespace: another skiff runs here, or one was killed; remove them with `skiff cleanup`"
    )]
    Leftovers {
        /// Family.
        family: Family,
        /// Chain names.
        chains: String,
    },
    /// The configuration cannot prevent loops.
    #[error("invalid iptables capture config: {0}")]
    Config(String),
}

// === rules ===

/// The `iptables-restore` script that installs the capture for `family` (pure).
pub fn install_script(cfg: &IptablesConfig, family: Family) -> Vec<String> {
    let mut s = vec!["*nat".to_string()];
    let inbound = cfg.inbound_port.is_some();
    s.push(format!(":{OUTPUT_CHAIN} - [0:0]"));
    s.push(format!(":{REDIRECT_CHAIN} - [0:0]"));
    if inbound {
        s.push(format!(":{INBOUND_CHAIN} - [0:0]"));
        s.push(format!(":{IN_REDIRECT_CHAIN} - [0:0]"));
    }
    s.push(format!(
        "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.outbound_port
    ));
    if let Some(port) = cfg.inbound_port {
        s.push(format!(
            "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {port}"
        ));
        for p in &cfg.exclude_inbound_ports {
            s.push(format!("-A {INBOUND_CHAIN} -p tcp --dport {p} -j RETURN"));
        }
        s.push(format!("-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}"));
    }
    let (passthrough_src, loopback) = match family {
        Family::V4 => (
            format!("{INBOUND_PASSTHROUGH_SRC_V4}/32"),
            "127.0.0.0/8".to_string(),
        ),
        Family::V6 => (
            format!("{INBOUND_PASSTHROUGH_SRC_V6}/128"),
            "::1/128".to_string(),
        ),
    };
    // The proxy's inbound passthrough connects to the app (Istio: 127.0.0.6 over lo).
    s.push(format!(
        "-A {OUTPUT_CHAIN} -o lo -s {passthrough_src} -j RETURN"
    ));
    if cfg.proxy_mark != 0 {
        s.push(format!(
            "-A {OUTPUT_CHAIN} -m mark --mark {:#x} -j RETURN",
            cfg.proxy_mark
        ));
    }
    if let Some(uid) = cfg.proxy_uid {
        s.push(format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {uid} -j RETURN"
        ));
    }
    if let Some(gid) = cfg.proxy_gid {
        s.push(format!(
            "-A {OUTPUT_CHAIN} -m owner --gid-owner {gid} -j RETURN"
        ));
    }
    s.push(format!("-A {OUTPUT_CHAIN} -d {loopback} -j RETURN"));
    for p in &cfg.exclude_ports {
        s.push(format!("-A {OUTPUT_CHAIN} -p tcp --dport {p} -j RETURN"));
    }
    for &(ip, len) in &cfg.exclude_cidrs {
        if (family == Family::V4) == ip.is_ipv4() {
            s.push(format!("-A {OUTPUT_CHAIN} -d {ip}/{len} -j RETURN"));
        }
    }
    s.push(format!("-A {OUTPUT_CHAIN} -j {REDIRECT_CHAIN}"));
    // Jumps from the built-in chains last: nothing is captured before the chains are complete
    // (the whole script is one transaction anyway).
    s.push(format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}"));
    if inbound {
        s.push(format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"));
    }
    s.push("COMMIT".to_string());
    s
}

/// The script that removes what `iptables-save -t nat` output `saved` shows of skiff: the
/// rules of built-in chains that jump to a `SKIFF_*` chain, then every `SKIFF_*` chain.
/// `None` when there is nothing of skiff's (pure).
pub fn removal_script(saved: &str) -> Option<Vec<String>> {
    let mut jumps = Vec::new();
    let mut chains = Vec::new();
    let mut in_nat = false;
    for line in saved.lines() {
        let line = line.trim();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if name.starts_with(CHAIN_PREFIX) {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let target = rule
                .split_whitespace()
                .skip_while(|w| *w != "-j")
                .nth(1)
                .unwrap_or("");
            if !chain.starts_with(CHAIN_PREFIX) && target.starts_with(CHAIN_PREFIX) {
                jumps.push(format!("-D {rule}"));
            }
        }
    }
    if jumps.is_empty() && chains.is_empty() {
        return None;
    }
    let mut s = vec!["*nat".to_string()];
    s.extend(jumps);
    // Flush all before deleting any: skiff's chains jump to each other.
    s.extend(chains.iter().map(|c| format!("-F {c}")));
    s.extend(chains.iter().map(|c| format!("-X {c}")));
    s.push("COMMIT".to_string());
    Some(s)
}

/// The script that removes exactly what [`install_script`] added (pure).
fn uninstall_script(installed: &[String]) -> Vec<String> {
    let mut s = vec!["*nat".to_string()];
    let mut chains = Vec::new();
    for line in installed {
        if let Some(decl) = line.strip_prefix(':') {
            chains.push(decl.split_whitespace().next().unwrap_or("").to_string());
        } else if let Some(rule) = line.strip_prefix("-A ")
            && !rule.starts_with(CHAIN_PREFIX)
        {
            s.push(format!("-D {rule}"));
        }
    }
    s.extend(chains.iter().map(|c| format!("-F {c}")));
    s.extend(chains.iter().map(|c| format!("-X {c}")));
    s.push("COMMIT".to_string());
    s
}

/// Turns iptables-restore's `line N failed` into an error naming that line of `script`.
fn restore_error(tool: &str, script: &[String], status: String, stderr: &str) -> IptablesError {
    let message = stderr.trim().to_string();
    let line = stderr.split("line ").nth(1).and_then(|rest| {
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<usize>()
            .ok()
    });
    match line {
        Some(n) if n >= 1 && n <= script.len() => IptablesError::Rule {
            tool: tool.to_string(),
            line: n,
            rule: script[n - 1].clone(),
            message,
        },
        _ => IptablesError::Failed {
            tool: tool.to_string(),
            status,
            message,
        },
    }
}

// === running the tools ===

fn run_save(backend: Backend, family: Family) -> Result<String, IptablesError> {
    let tool = backend.save(family);
    let out = Command::new(&tool)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| IptablesError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            tool,
            status: out.status.to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_restore(backend: Backend, family: Family, script: &[String]) -> Result<(), IptablesError> {
    let tool = backend.restore(family);
    let mut child = Command::new(&tool)
        .arg("--noflush")
        // Legacy iptables serialises writers with the xtables lock (kube-proxy, CNI plugins
        // may hold it): wait for it a little instead of failing at once.
        .arg(format!("--wait={RESTORE_WAIT_SECS}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IptablesError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    let mut text = script.join("\n");
    text.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| IptablesError::Spawn {
                tool: tool.clone(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| IptablesError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(restore_error(
            &tool,
            script,
            out.status.to_string(),
            &String::from_utf8_lossy(&out.stderr),
        ))
    }
}

/// Number of rules (`-A` lines) in a `-save` output.
fn rule_count(saved: &str) -> usize {
    saved.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Picks the implementation as Istio does: the one that already holds rules in this netns
/// (legacy only if nft holds none), else nft, else legacy, else plain `iptables`.
pub fn detect_backend() -> Result<Backend, IptablesError> {
    let mut tried = Vec::new();
    let mut working = Vec::new();
    for b in [Backend::Nft, Backend::Legacy, Backend::Default] {
        match run_save(b, Family::V4) {
            Ok(saved) => working.push((b, rule_count(&saved))),
            Err(e) => tried.push(format!("{}: {e}", b.save(Family::V4))),
        }
    }
    let pick = match working.as_slice() {
        [] => None,
        w => w
            .iter()
            .find(|(b, n)| *b == Backend::Legacy && *n > 0)
            .filter(|_| !w.iter().any(|(b, n)| *b == Backend::Nft && *n > 0))
            .or_else(|| w.first())
            .map(|(b, _)| *b),
    };
    pick.ok_or_else(|| IptablesError::NoBackend {
        tried: tried.join("; "),
    })
}

// === impl IptablesCapture ===

/// Installed iptables capture; dropping it removes exactly the installed rules.
#[derive(Debug)]
pub struct IptablesCapture {
    backend: Backend,
    installed: Vec<(Family, Vec<String>)>,
}

impl IptablesCapture {
    /// Detects the iptables implementation, refuses if skiff chains already exist, and
    /// installs the rules (IPv4, then IPv6 if asked and ip6tables works; a failed IPv6 install
    /// removes the IPv4 rules again).
    pub fn install(cfg: &IptablesConfig) -> Result<IptablesCapture, IptablesError> {
        if cfg.proxy_mark == 0 && cfg.proxy_uid.is_none() && cfg.proxy_gid.is_none() {
            return Err(IptablesError::Config(
                "the proxy's own connects must be recognisable: set --proxy-mark (non-zero) \
                 or --proxy-uid/--proxy-gid"
                    .into(),
            ));
        }
        if cfg.outbound_port == 0 || cfg.inbound_port == Some(0) {
            return Err(IptablesError::Config(
                "listener ports must be non-zero".into(),
            ));
        }
        let backend = detect_backend()?;
        let mut families = vec![Family::V4];
        if cfg.ipv6 {
            match run_save(backend, Family::V6) {
                Ok(_) => families.push(Family::V6),
                Err(e) => tracing::warn!(error = %e, "ip6tables unusable: IPv6 is not captured"),
            }
        }
        for &family in &families {
            let saved = run_save(backend, family)?;
            if let Some(script) = removal_script(&saved) {
                let chains: Vec<&str> = script
                    .iter()
                    .filter_map(|l| l.strip_prefix("-X "))
                    .collect();
                return Err(IptablesError::Leftovers {
                    family,
                    chains: chains.join(", "),
                });
            }
        }
        let mut capture = IptablesCapture {
            backend,
            installed: Vec::new(),
        };
        for family in families {
            let script = install_script(cfg, family);
            // On error `capture` drops and removes what was installed so far.
            run_restore(backend, family, &script)?;
            capture.installed.push((family, script));
        }
        tracing::info!(
            backend = %backend,
            families = ?capture.installed.iter().map(|(f, _)| f.to_string()).collect::<Vec<_>>(),
            outbound_port = cfg.outbound_port,
            inbound_port = ?cfg.inbound_port,
            proxy_mark = cfg.proxy_mark,
            "iptables capture installed"
        );
        Ok(capture)
    }

    /// The implementation in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The installed scripts, per family (for logs and `/debug/capture`).
    pub fn rules(&self) -> &[(Family, Vec<String>)] {
        &self.installed
    }

    /// Removes exactly the installed rules now (drop does the same).
    pub fn uninstall(mut self) -> Result<(), IptablesError> {
        self.remove()
    }

    fn remove(&mut self) -> Result<(), IptablesError> {
        let mut first_err = None;
        for (family, script) in std::mem::take(&mut self.installed) {
            if let Err(e) = run_restore(self.backend, family, &uninstall_script(&script)) {
                // Someone changed them meanwhile: remove whatever of skiff's is left.
                tracing::warn!(error = %e, %family, "exact removal failed; removing every SKIFF_ chain");
                if let Err(e) = cleanup_family(self.backend, family) {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => {
                tracing::info!(backend = %self.backend, "iptables capture removed");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

impl Drop for IptablesCapture {
    fn drop(&mut self) {
        if self.installed.is_empty() {
            return;
        }
        if let Err(e) = self.remove() {
            tracing::error!(error = %e, "could not remove the iptables capture; run `skiff cleanup`");
        }
    }
}

// === impl IptablesGate ===

/// The iptables capture as a gate that opens (rules installed) and closes (rules removed,
/// so new connects go to their original destination: fail-open, like the eBPF ready flag).
#[derive(Debug)]
pub struct IptablesGate {
    cfg: IptablesConfig,
    installed: std::sync::Mutex<Option<IptablesCapture>>,
}

impl IptablesGate {
    /// A closed gate for `cfg` (nothing installed yet).
    pub fn new(cfg: IptablesConfig) -> Self {
        IptablesGate {
            cfg,
            installed: std::sync::Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<IptablesCapture>> {
        // The guarded value is whole after any panic (install/uninstall replace it at once).
        self.installed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the rules unless they are in place.
    pub fn open(&self) -> Result<(), IptablesError> {
        let mut g = self.lock();
        if g.is_none() {
            *g = Some(IptablesCapture::install(&self.cfg)?);
        }
        Ok(())
    }

    /// Removes exactly the installed rules, if any.
    pub fn close(&self) -> Result<(), IptablesError> {
        match self.lock().take() {
            Some(c) => c.uninstall(),
            None => Ok(()),
        }
    }

    /// Whether the rules are in place.
    pub fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Connections redirected so far, from the REDIRECT rules' packet counters (nat rules
    /// see only the first packet of a connection): `iptables.<v4|v6>.<outbound|inbound>_redirected`.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let g = self.lock();
        let Some(c) = g.as_ref() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (family, _) in c.rules() {
            let fam = match family {
                Family::V4 => "v4",
                Family::V6 => "v6",
            };
            let Ok(saved) = run_save_counters(c.backend(), *family) else {
                continue;
            };
            for (chain, what) in [
                (REDIRECT_CHAIN, "outbound_redirected"),
                (IN_REDIRECT_CHAIN, "inbound_redirected"),
            ] {
                if let Some(n) = redirect_packets(&saved, chain) {
                    out.push((format!("iptables.{fam}.{what}"), n));
                }
            }
        }
        out
    }
}

/// `iptables-save -c -t nat`: rules with `[packets:bytes]` counters.
fn run_save_counters(backend: Backend, family: Family) -> Result<String, IptablesError> {
    let tool = backend.save(family);
    let out = Command::new(&tool)
        .args(["-c", "-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| IptablesError::Spawn {
            tool: tool.clone(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The packet counter of the REDIRECT rule of `chain` in `iptables-save -c` output (pure).
fn redirect_packets(saved: &str, chain: &str) -> Option<u64> {
    saved.lines().find_map(|l| {
        let (counters, rule) = l.strip_prefix('[')?.split_once("] ")?;
        let rest = rule.strip_prefix("-A ")?;
        if rest.split_whitespace().next()? != chain || !rest.contains("-j REDIRECT") {
            return None;
        }
        counters.split(':').next()?.parse().ok()
    })
}

/// What [`cleanup`] removed, per backend and family.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// `(backend/tool, removed rule-or-chain operations)`.
    pub removed: Vec<(String, Vec<String>)>,
}

fn cleanup_family(backend: Backend, family: Family) -> Result<Vec<String>, IptablesError> {
    let saved = run_save(backend, family)?;
    match removal_script(&saved) {
        Some(script) => {
            run_restore(backend, family, &script)?;
            Ok(script)
        }
        None => Ok(Vec::new()),
    }
}

/// Removes every `SKIFF_*` nat chain and the jumps to them, in every iptables implementation
/// and family that works here (leftovers of a skiff killed with SIGKILL). Idempotent.
pub fn cleanup() -> Result<CleanupReport, IptablesError> {
    let mut report = CleanupReport::default();
    let mut any = false;
    let mut errors = Vec::new();
    // Plain `iptables` last: where it is only a link to nft or legacy, the second pass finds
    // nothing left (cleanup is idempotent); where no suffixed tool exists, it is the only one.
    for backend in [Backend::Nft, Backend::Legacy, Backend::Default] {
        for family in [Family::V4, Family::V6] {
            // A tool that cannot even list (absent, module missing) holds nothing of ours.
            if run_save(backend, family).is_err() {
                continue;
            }
            any = true;
            match cleanup_family(backend, family) {
                Ok(ops) if !ops.is_empty() => report.removed.push((
                    backend.restore(family),
                    ops.into_iter()
                        .filter(|l| l.starts_with("-D ") || l.starts_with("-X "))
                        .collect(),
                )),
                Ok(_) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    if !any {
        return Err(IptablesError::NoBackend {
            tried: "iptables-nft-save, iptables-legacy-save, iptables-save".into(),
        });
    }
    if !errors.is_empty() {
        return Err(IptablesError::Failed {
            tool: "cleanup".into(),
            status: format!("{} failure(s)", errors.len()),
            message: errors.join("; "),
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> IptablesConfig {
        IptablesConfig {
            outbound_port: 15001,
            inbound_port: Some(15006),
            proxy_mark: 0x539,
            proxy_uid: Some(1337),
            proxy_gid: None,
            exclude_ports: vec![9999],
            exclude_cidrs: vec![
                ("10.0.0.0".parse().unwrap(), 8),
                ("fd00:1::".parse().unwrap(), 32),
            ],
            exclude_inbound_ports: vec![22],
            ipv6: true,
        }
    }

    #[test]
    fn v4_script_returns_the_proxy_loopback_and_exclusions_before_redirecting() {
        let s = install_script(&cfg(), Family::V4);
        let pos = |needle: &str| {
            s.iter()
                .position(|l| l == needle)
                .unwrap_or_else(|| panic!("{needle:?} missing from {s:#?}"))
        };
        let redirect = pos("-A SKIFF_OUTPUT -j SKIFF_REDIRECT");
        for rule in [
            "-A SKIFF_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "-A SKIFF_OUTPUT -m mark --mark 0x539 -j RETURN",
            "-A SKIFF_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A SKIFF_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A SKIFF_OUTPUT -p tcp --dport 9999 -j RETURN",
            "-A SKIFF_OUTPUT -d 10.0.0.0/8 -j RETURN",
        ] {
            assert!(pos(rule) < redirect, "{rule} must come before the redirect");
        }
        assert!(!s.iter().any(|l| l.contains("fd00:1::")), "v6 CIDR in v4");
        pos("-A SKIFF_REDIRECT -p tcp -j REDIRECT --to-ports 15001");
        pos("-A SKIFF_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006");
        assert!(
            pos("-A SKIFF_INBOUND -p tcp --dport 22 -j RETURN")
                < pos("-A SKIFF_INBOUND -p tcp -j SKIFF_IN_REDIRECT")
        );
        pos("-A OUTPUT -p tcp -j SKIFF_OUTPUT");
        pos("-A PREROUTING -p tcp -j SKIFF_INBOUND");
        assert_eq!(s.first().map(String::as_str), Some("*nat"));
        assert_eq!(s.last().map(String::as_str), Some("COMMIT"));
    }

    #[test]
    fn v6_script_uses_v6_loopback_and_cidrs() {
        let s = install_script(&cfg(), Family::V6);
        assert!(s.contains(&"-A SKIFF_OUTPUT -d ::1/128 -j RETURN".to_string()));
        assert!(s.contains(&"-A SKIFF_OUTPUT -d fd00:1::/32 -j RETURN".to_string()));
        assert!(s.contains(&"-A SKIFF_OUTPUT -o lo -s ::6/128 -j RETURN".to_string()));
        assert!(!s.iter().any(|l| l.contains("10.0.0.0")));
    }

    #[test]
    fn without_inbound_there_is_no_prerouting() {
        let mut c = cfg();
        c.inbound_port = None;
        let s = install_script(&c, Family::V4);
        assert!(
            !s.iter()
                .any(|l| l.contains("PREROUTING") || l.contains("INBOUND"))
        );
    }

    #[test]
    fn uninstall_deletes_exactly_the_jumps_and_chains() {
        let s = install_script(&cfg(), Family::V4);
        let u = uninstall_script(&s);
        assert_eq!(
            u.iter()
                .filter(|l| l.starts_with("-D "))
                .collect::<Vec<_>>(),
            vec![
                "-D OUTPUT -p tcp -j SKIFF_OUTPUT",
                "-D PREROUTING -p tcp -j SKIFF_INBOUND"
            ]
        );
        for c in [
            OUTPUT_CHAIN,
            REDIRECT_CHAIN,
            INBOUND_CHAIN,
            IN_REDIRECT_CHAIN,
        ] {
            let f = u.iter().position(|l| *l == format!("-F {c}")).unwrap();
            let x = u.iter().position(|l| *l == format!("-X {c}")).unwrap();
            assert!(f < x);
        }
    }

    #[test]
    fn removal_from_save_output_keeps_foreign_rules() {
        let saved = "# Generated by iptables-nft-save\n*nat\n:PREROUTING ACCEPT [0:0]\n\
            :OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n:SKIFF_OUTPUT - [0:0]\n\
            :SKIFF_REDIRECT - [0:0]\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\n\
            -A OUTPUT -p tcp -j SKIFF_OUTPUT\n-A SKIFF_OUTPUT -j SKIFF_REDIRECT\n\
            -A SKIFF_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let s = removal_script(saved).unwrap();
        assert_eq!(
            s,
            vec![
                "*nat",
                "-D OUTPUT -p tcp -j SKIFF_OUTPUT",
                "-F SKIFF_OUTPUT",
                "-F SKIFF_REDIRECT",
                "-X SKIFF_OUTPUT",
                "-X SKIFF_REDIRECT",
                "COMMIT"
            ]
        );
        assert_eq!(
            removal_script("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"),
            None
        );
    }

    #[test]
    fn redirect_counters_are_read_from_save_output() {
        let saved = "*nat\n:SKIFF_REDIRECT - [0:0]\n[3:180] -A OUTPUT -p tcp -j SKIFF_OUTPUT\n\
            [7:420] -A SKIFF_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
            [2:120] -A SKIFF_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\nCOMMIT\n";
        assert_eq!(redirect_packets(saved, REDIRECT_CHAIN), Some(7));
        assert_eq!(redirect_packets(saved, IN_REDIRECT_CHAIN), Some(2));
        assert_eq!(redirect_packets(saved, OUTPUT_CHAIN), None);
    }

    #[test]
    fn restore_errors_name_the_rule() {
        let script = install_script(&cfg(), Family::V4);
        let e = restore_error(
            "iptables-nft-restore",
            &script,
            "exit status: 1".into(),
            "iptables-nft-restore: line 2 failed: No chain/target/match by that name.",
        );
        let msg = e.to_string();
        assert!(msg.contains(&script[1]) && msg.contains("line 2"), "{msg}");
        let e = restore_error("t", &script, "exit status: 2".into(), "Bad argument");
        assert!(matches!(e, IptablesError::Failed { .. }));
    }
}
