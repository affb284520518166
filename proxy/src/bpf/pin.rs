//! Pins under bpffs: the capture's links and the maps a restarted skiff must find again.
//!
//! With a pin directory (`skiff run --pin-dir DIR`, by default
//! `/sys/fs/bpf/skiff/<capture cgroup id>`, so a restarted skiff on the same cgroup finds it):
//!
//! - every cgroup link of the capture is pinned as `link_<program>`: a killed skiff leaves its
//!   programs attached (capture never stops); a restarted one swaps its freshly loaded program
//!   into each pinned link with `BPF_LINK_UPDATE` (atomic, no detach window);
//! - the maps in [`PINNED`] (and, with the fast path, [`PINNED_FAST`]) are pinned by name and
//!   reused by the next load, so the new programs see the same gate, original destinations,
//!   meshed cgroups and fast-path state (socket accounting of connections made before the
//!   restart included);
//! - with `--xdp`, each interface's XDP link (`link_skiff_xdp_<mode>_<iface>`) and the XDP
//!   conntrack and VIP maps are pinned the same way (see `loader::xdp`): a killed skiff's
//!   XDP program keeps balancing, a restarted one swaps its program in.
//!
//! A normal shutdown removes the directory (links detach, maps are freed); `skiff cleanup`
//! removes what a crash left behind.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use super::{
    BpfError,
    counters::{MAP_ORIG_DST, MAP_SVC_STAT},
    fastpath::{
        MAP_CLUSTERS, MAP_ENDPOINTS, MAP_EP_ACTIVE, MAP_EP_LOAD, MAP_FAST_SK, MAP_MAGLEV, MAP_RR,
        MAP_SVC_V4, MAP_SVC_V6,
    },
    gate::MAP_CONFIG,
    meshed::MAP_MESHED,
};

/// The directory under which every skiff pin directory lives (skiff's own: `skiff cleanup`
/// removes only what is below it).
pub const PIN_ROOT: &str = "/sys/fs/bpf/skiff";

/// Maps pinned in every mode: the config entry with the ready gate, original destinations by
/// cookie and by tuple, meshed cgroups.
pub(super) const PINNED: &[&str] = &[MAP_CONFIG, "SKIFF_COOKIE", MAP_ORIG_DST, MAP_MESHED];

/// Maps pinned with the fast path (their sizes come from `--fast-path` capacities, so they are
/// pinned only when those are real).
pub(super) const PINNED_FAST: &[&str] = &[
    MAP_SVC_V4,
    MAP_SVC_V6,
    MAP_CLUSTERS,
    MAP_ENDPOINTS,
    MAP_MAGLEV,
    MAP_RR,
    MAP_FAST_SK,
    MAP_EP_ACTIVE,
    MAP_EP_LOAD,
    MAP_SVC_STAT,
    "SKIFF_PEER",
    "SKIFF_UDP_REV",
];

/// `BPF_FS_MAGIC` (statfs f_type of a bpffs mount).
const BPF_FS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0xcafe_4a11);
// enum bpf_cmd (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Where the capture's pins are, and whether a previous skiff left them.
#[derive(Debug)]
pub(super) struct Pins {
    dir: PathBuf,
    /// Pins were already there (a restart after a crash): maps and links are taken over.
    reused: bool,
    /// The lock came from a running skiff handing over (`skiff run --takeover`): its
    /// programs still serve, so the ready gate is kept as it is.
    live: bool,
    /// The directory, open with an exclusive `flock` for this process's life: a second skiff
    /// never takes over a live one's pins; the kernel drops the lock when the process dies.
    _lock: fs::File,
}

impl Pins {
    /// Opens (creating it if missing) the pin directory `dir`, which must be on bpffs, and
    /// locks it. `Ok(None)`: a running skiff holds it.
    pub(super) fn open(dir: &Path) -> Result<Option<Pins>, BpfError> {
        fs::create_dir_all(dir).map_err(|source| BpfError::Io {
            what: "creating pin directory",
            path: dir.into(),
            source,
        })?;
        if !on_bpffs(dir) {
            return Err(BpfError::Config(format!(
                "pin directory {} is not on a bpffs mount (mount one: `mount -t bpf bpf /sys/fs/bpf`)",
                dir.display()
            )));
        }
        let adopted = take_adopted(dir);
        let live = adopted.is_some();
        let lock = match adopted {
            Some(lock) => lock,
            None => match try_lock(dir).map_err(|source| BpfError::Io {
                what: "locking pin directory",
                path: dir.into(),
                source,
            })? {
                Some(lock) => lock,
                None => return Ok(None),
            },
        };
        let reused = fs::read_dir(dir)
            .map_err(|source| BpfError::Io {
                what: "reading pin directory",
                path: dir.into(),
                source,
            })?
            .next()
            .is_some();
        Ok(Some(Pins {
            dir: dir.to_path_buf(),
            reused,
            live,
            _lock: lock,
        }))
    }

    /// Whether a running skiff handed its pins over (see [`adopt_lock`]).
    pub(super) fn live(&self) -> bool {
        self.live
    }

    /// A duplicate of the open, locked directory: a successor holding it holds the lock too
    /// (`flock` belongs to the open file, shared by every duplicate).
    pub(super) fn lock_dup(&self) -> io::Result<OwnedFd> {
        self._lock.try_clone().map(OwnedFd::from)
    }

    /// The directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a previous skiff's pins were found (this one takes them over).
    pub(super) fn reused(&self) -> bool {
        self.reused
    }

    /// The pin of map `name`.
    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The pin of the link of program `name`.
    pub(super) fn link(&self, program: &str) -> PathBuf {
        self.dir.join(format!("link_{program}"))
    }

    /// Removes every pin and the directory: links detach, maps are freed once no program
    /// holds them.
    pub(super) fn remove(&self) {
        if let Err(e) = remove_dir_pins(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the pins; run `skiff cleanup`");
        }
    }
}

/// The default pin directory of a capture on `capture_cgroup`: `PIN_ROOT/<cgroup id>`, stable
/// across restarts on the same cgroup. `None` when /sys/fs/bpf is not a bpffs mount.
pub fn default_dir(capture_cgroup: &Path) -> Result<Option<PathBuf>, BpfError> {
    let id = super::cgroup_id(capture_cgroup)?;
    let bpffs = Path::new(PIN_ROOT)
        .parent()
        .is_some_and(|p| p.is_dir() && on_bpffs(p));
    Ok(bpffs.then(|| Path::new(PIN_ROOT).join(id.to_string())))
}

/// The pin directory `cfg` asks for (`None`: nothing pinned).
pub fn dir_for(cfg: &super::CaptureConfig) -> Result<Option<PathBuf>, BpfError> {
    match &cfg.pinning {
        super::Pinning::Off => Ok(None),
        super::Pinning::Dir(d) => Ok(Some(d.clone())),
        super::Pinning::Default => {
            let dir = default_dir(cfg.mode.capture_cgroup())?;
            if dir.is_none() {
                tracing::warn!(
                    "/sys/fs/bpf is not a bpffs mount: nothing pinned, a killed skiff detaches its capture"
                );
            }
            Ok(dir)
        }
    }
}

/// The lock of a pin directory a running skiff handed over (`skiff run --takeover`), waiting
/// for this process's capture to open that directory.
static ADOPTED: std::sync::Mutex<Option<(PathBuf, fs::File)>> = std::sync::Mutex::new(None);

/// Makes the next [`Pins::open`] of `dir` use `lock` (the running skiff's open, locked pin
/// directory, received over the handover socket) instead of locking: the two processes share
/// the lock until the old one exits, and no third skiff can take the pins meanwhile.
pub fn adopt_lock(dir: PathBuf, lock: OwnedFd) {
    *ADOPTED.lock().unwrap_or_else(|e| e.into_inner()) = Some((dir, fs::File::from(lock)));
}

fn take_adopted(dir: &Path) -> Option<fs::File> {
    let mut g = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    match &*g {
        Some((d, _)) if d == dir => g.take().map(|(_, f)| f),
        _ => None,
    }
}

/// The directory `dir` opened and exclusively locked (`flock`), or `None` when another
/// process holds the lock.
fn try_lock(dir: &Path) -> io::Result<Option<fs::File>> {
    let f = fs::File::open(dir)?;
    // SAFETY: flock on an fd this function owns.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(err)
}

/// Whether a running skiff holds the pin directory `dir` (its pins are not ours to take).
pub fn in_use(dir: &Path) -> bool {
    matches!(try_lock(dir), Ok(None))
}

fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Swaps `prog` into the link pinned at `pin` (`BPF_LINK_UPDATE`: the hook never runs without
/// a program). Returns an fd of the link.
pub(super) fn link_update(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let link = obj_get(pin)?;
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a fully initialised `link_update` member of bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &mut attr as *mut LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(link)
}

/// `BPF_OBJ_GET`: a new fd of the object pinned at `path`.
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a fully initialised `obj` member of bpf_attr; `c` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjAttr,
            std::mem::size_of::<ObjAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Ids of the programs in the links pinned in `dir` (skiff's own, left by a killed skiff: not
/// foreign to the coexistence check). Empty when `dir` does not exist.
pub fn pinned_program_ids(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .filter_map(|e| {
            let link = aya::programs::links::PinnedLink::from_pin(e.path()).ok()?;
            let link = aya::programs::links::FdLink::from(link);
            link.info().ok().map(|i| i.program_id())
        })
        .collect()
}

/// Removes every pin in `dir`, then `dir` itself. Missing entries are not errors.
fn remove_dir_pins(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The root goes too once no skiff has pins left (a non-empty root stays).
    if let Some(root) = dir.parent()
        && root == Path::new(PIN_ROOT)
    {
        let _ = fs::remove_dir(root);
    }
    Ok(removed)
}

/// `skiff cleanup`: removes the pin directory `dir`, or every directory under [`PIN_ROOT`]
/// when `None` (pins a killed skiff left: its programs detach, its maps are freed). Only
/// skiff's own directory is touched; idempotent. Returns the pins removed.
pub fn cleanup(dir: Option<&Path>) -> io::Result<Vec<PathBuf>> {
    let dirs: Vec<PathBuf> = match dir {
        Some(d) => vec![d.to_path_buf()],
        None => match fs::read_dir(PIN_ROOT) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        },
    };
    let mut removed = Vec::new();
    for d in dirs {
        removed.extend(remove_dir_pins(&d)?);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_named_by_program_and_map() {
        let pins = Pins {
            dir: PathBuf::from("/sys/fs/bpf/skiff/42"),
            reused: false,
            live: false,
            _lock: fs::File::open("/").unwrap(),
        };
        assert_eq!(
            pins.link("skiff_connect4"),
            Path::new("/sys/fs/bpf/skiff/42/link_skiff_connect4")
        );
        assert_eq!(
            pins.map("SKIFF_CONFIG"),
            Path::new("/sys/fs/bpf/skiff/42/SKIFF_CONFIG")
        );
    }

    #[test]
    fn a_locked_directory_is_in_use_until_its_lock_closes() {
        let dir = std::env::temp_dir().join(format!("skiff-pin-lock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let held = try_lock(&dir).unwrap().expect("first lock");
        assert!(in_use(&dir));
        assert!(try_lock(&dir).unwrap().is_none());
        // A handed-over duplicate holds the lock after the original closes.
        let dup = held.try_clone().unwrap();
        adopt_lock(dir.clone(), OwnedFd::from(dup));
        drop(held);
        assert!(in_use(&dir));
        assert!(take_adopted(Path::new("/elsewhere")).is_none());
        let adopted = take_adopted(&dir).expect("adopted lock");
        assert!(in_use(&dir));
        drop(adopted);
        assert!(!in_use(&dir));
        fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn cleanup_of_a_missing_directory_is_a_no_op() {
        let removed = cleanup(Some(Path::new("/nonexistent/skiff-pins"))).unwrap();
        assert!(removed.is_empty());
    }
}
