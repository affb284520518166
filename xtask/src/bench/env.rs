//! What a bench run creates and must remove: the network namespace, cgroups, processes, and
//! the Ctrl-C flag every loop checks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Route SIGINT/SIGTERM to a flag (checked between and inside cases) so the guards run.
pub fn install_interrupt_handler() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fail with "interrupted" once Ctrl-C was pressed.
pub fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A network namespace created here; deleted on drop (iptables rules and VIPs go with it).
pub struct Netns(pub String);

impl Netns {
    /// Create `name` with loopback up, loopback-friendly TCP sysctls and `vip` on lo.
    pub fn create(name: &str, vip: &str) -> anyhow::Result<Netns> {
        quiet(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns(name.to_string());
        quiet(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        // The VIP exists only here, so iptables REDIRECT has a route to match on.
        quiet(Command::new("ip").args([
            "-n",
            name,
            "addr",
            "add",
            &format!("{vip}/32"),
            "dev",
            "lo",
        ]))?;
        // Short-lived connection cases: reuse TIME_WAIT ports. The ephemeral range stays the
        // default (32768-60999): every listening port of the bench is below it, so TIME_WAIT
        // sockets of one path never block the next proxy's bind.
        for (key, val) in [
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.core.somaxconn", "4096"),
        ] {
            quiet(ns.cmd("sysctl").args(["-q", "-w", &format!("{key}={val}")]))?;
        }
        Ok(ns)
    }

    /// `program` run inside the namespace (nsenter, no fork: the child PID is the program).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.0))
            .arg("--")
            .arg(program);
        c
    }

    /// `program` run inside the namespace and inside `cgroup` (joined by a shell before exec).
    pub fn cmd_in_cgroup(&self, cgroup: Option<&Path>, program: &Path) -> Command {
        match cgroup {
            None => self.cmd(program),
            Some(cg) => {
                let mut c = self.cmd("sh");
                c.args([
                    "-c",
                    "echo 0 > \"$1/cgroup.procs\" && shift && exec \"$@\"",
                    "sh",
                ])
                .arg(cg)
                .arg(program);
                c
            }
        }
    }

    /// Run `f` on a thread that joined this namespace (network namespaces are per thread).
    pub fn on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.0);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        let h = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on the calling thread only; the fd is valid for the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        });
        match h.join() {
            Ok(r) => r.context("setns into the bench namespace"),
            Err(_) => bail!("netns thread panicked"),
        }
    }

    /// Wait until something accepts on `addr` inside the namespace.
    pub fn wait_port(&self, addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
        let ok = self.on_thread(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline && !interrupted() {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })?;
        if !ok {
            bail!("nothing accepted on {addr} within {limit:?}");
        }
        Ok(())
    }

    /// Wait until `GET path` on `addr` inside the namespace answers 200 (admin readiness).
    pub fn wait_http_200(
        &self,
        addr: SocketAddr,
        path: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let ok = self.on_thread(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline && !interrupted() {
                if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut head = [0u8; 16];
                    if s.write_all(req.as_bytes()).is_ok()
                        && let Ok(n) = s.read(&mut head)
                        && head[..n].starts_with(b"HTTP/1.")
                        && head[..n].windows(3).any(|w| w == b"200")
                    {
                        return true;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })?;
        if !ok {
            bail!("http://{addr}{path} did not answer 200 within {limit:?}");
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// cgroups created here, removed (deepest first) on drop.
pub struct Cgroups(pub Vec<PathBuf>);

impl Cgroups {
    /// Create `dir` and remember it for removal.
    pub fn create(&mut self, dir: PathBuf) -> anyhow::Result<PathBuf> {
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.0.push(dir.clone());
        Ok(dir)
    }

    /// Remember a cgroup someone else creates (skiff's proxy cgroup) for removal.
    pub fn adopt(&mut self, dir: PathBuf) {
        self.0.push(dir);
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            for _ in 0..80 {
                if !p.exists() || std::fs::remove_dir(p).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

/// A process this run started; stopped by PID on drop (SIGTERM, then SIGKILL after 5 s).
pub struct Proc {
    child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Spawn `cmd` with stdout/stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fail if the process has already exited.
    pub fn check_alive(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited ({status}):\n{}", self.name, tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the PID is our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run a bounded command to completion: kill it after `limit`; return its stdout.
pub fn run_bounded(cmd: &mut Command, what: &str, limit: Duration) -> anyhow::Result<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let ereader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() > deadline || interrupted() {
            // SAFETY: our own child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(300));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = ereader.join().unwrap_or_default();
    match status {
        None if interrupted() => bail!("interrupted"),
        None => bail!("{what} did not finish within {limit:?}"),
        Some(st) if !st.success() => {
            let detail = if stderr.trim().is_empty() {
                stdout.chars().take(600).collect()
            } else {
                stderr.trim().chars().take(600).collect::<String>()
            };
            bail!("{what} failed ({st}): {detail}")
        }
        Some(_) => Ok(stdout),
    }
}

/// Run a short setup command quietly; fail with its stderr.
pub fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
