//! cgroup v2 paths: find the mount, check a directory is a cgroup, join one and leave it.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::BpfError;

/// The cgroup2 mount point, from /proc/self/mountinfo (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, BpfError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| BpfError::Io {
        what: "reading",
        path: path.into(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or(BpfError::NoCgroup2)
}

/// The first cgroup2 mount point in mountinfo text.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The id of a cgroup v2 directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for tasks in it.
pub fn cgroup_id(path: &Path) -> Result<u64, BpfError> {
    let dir = checked_cgroup_dir(path)?;
    fs::metadata(&dir)
        .map(|m| m.ino())
        .map_err(|source| BpfError::Io {
            what: "reading the id of cgroup",
            path: dir,
            source,
        })
}

/// `path` canonicalised, after checking it is a directory on the cgroup2 filesystem.
pub(super) fn checked_cgroup_dir(path: &Path) -> Result<PathBuf, BpfError> {
    let mount = cgroup2_mount()?;
    let dir = fs::canonicalize(path).map_err(|source| BpfError::Io {
        what: "resolving cgroup",
        path: path.into(),
        source,
    })?;
    let on_cgroup2 = nix::sys::statfs::statfs(&dir)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if !on_cgroup2 || !dir.starts_with(&mount) || !dir.join("cgroup.procs").is_file() {
        return Err(BpfError::NotCgroup2 { path: dir, mount });
    }
    Ok(dir)
}

/// Like [`checked_cgroup_dir`], and refuses the cgroup2 root itself (never attach to the
/// whole machine).
pub(super) fn checked_attach_target(path: &Path) -> Result<PathBuf, BpfError> {
    let dir = checked_cgroup_dir(path)?;
    if dir == cgroup2_mount()? {
        return Err(BpfError::CgroupRoot { path: dir });
    }
    Ok(dir)
}

/// This process's cgroup v2 directory, from /proc/self/cgroup (`0::/path`).
fn current_cgroup(mount: &Path) -> Result<PathBuf, BpfError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| BpfError::Io {
        what: "reading",
        path: path.into(),
        source,
    })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            BpfError::Config("this process has no cgroup v2 membership (/proc/self/cgroup)".into())
        })?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Moves the whole calling process (all threads) into `dir`.
fn join(dir: &Path) -> Result<(), BpfError> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, "0").map_err(|source| BpfError::Io {
        what: "moving this process into",
        path: procs,
        source,
    })
}

/// This process's membership of the proxy cgroup. Dropping it moves the process back to the
/// cgroup it came from and removes the proxy cgroup if it was created here.
#[derive(Debug)]
pub(super) struct Membership {
    original: PathBuf,
    proxy: PathBuf,
    created: bool,
}

impl Membership {
    /// Creates `proxy_cgroup` if missing (its parent must be a cgroup v2 directory) and moves
    /// this process into it.
    pub(super) fn join_proxy_cgroup(proxy_cgroup: &Path) -> Result<Self, BpfError> {
        let mount = cgroup2_mount()?;
        let original = current_cgroup(&mount)?;
        let mut created = false;
        if !proxy_cgroup.exists() {
            let parent = proxy_cgroup.parent().unwrap_or(Path::new("/"));
            checked_cgroup_dir(parent)?;
            fs::create_dir(proxy_cgroup).map_err(|source| BpfError::Io {
                what: "creating proxy cgroup",
                path: proxy_cgroup.into(),
                source,
            })?;
            created = true;
        }
        // From here on, dropping `this` undoes what was done.
        let mut this = Self {
            original,
            proxy: proxy_cgroup.into(),
            created,
        };
        this.proxy = checked_attach_target(proxy_cgroup)?;
        join(&this.proxy)?;
        Ok(this)
    }

    /// Whether dropping this removes the proxy cgroup: a skiff handing over leaves it to its
    /// successor, which removes it in turn.
    pub(super) fn set_owner(&mut self, owner: bool) {
        self.created = owner;
    }

    /// The proxy cgroup (canonical).
    pub(super) fn proxy(&self) -> &Path {
        &self.proxy
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Err(e) = join(&self.original) {
            tracing::warn!(error = %e, "could not move back to the original cgroup");
        }
        if self.created {
            // The kernel refuses while a task is still inside; retry briefly (a just-exited
            // child may linger for a moment).
            for attempt in 0..20 {
                match fs::remove_dir(&self.proxy) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 19 => {
                        tracing::warn!(cgroup = %self.proxy.display(), error = %e, "could not remove the proxy cgroup");
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(25)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_hybrid_unified_mount() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_a_pure_v2_mount_with_escapes() {
        let text = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let text = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_cgroup2_mount(text), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            parse_cgroup2_mount("30 1 0:26 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
    }
}
