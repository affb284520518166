//! Process memory: give back what start-up touched once and never again.
//!
//! An idle skiff's resident set is mostly start-up leftovers: heap freed after reading the
//! bootstrap (Envoy's descriptor pool) and after loading the capture (aya parses the kernel's
//! BTF, about 19 MB at its peak), which glibc keeps mapped, and the pages of the binary that
//! only start-up ran or read (clap, the bootstrap and protobuf decoders, the BPF loader, the
//! embedded descriptor set and eBPF object): about 12 MB of a 14 MB text segment was resident
//! at idle, partly because the kernel maps file pages around each fault (fault-around).
//! [`release_startup`] hands both back once skiff is ready; what the data path and the admin
//! API run is faulted back in from the page cache on first use (a minor fault per page).

/// Gives back start-up's leftovers: free heap pages ([`trim_heap`]) and the resident pages of
/// the binary's read-only data and code. Call once start-up is done (skiff is ready).
pub fn release_startup() {
    trim_heap();
    drop_image_pages();
}

/// Returns the free pages of every glibc malloc arena to the kernel.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases pages that malloc holds free; no live allocation
    // moves or changes.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Arenas skiff lets glibc create: one for the main thread and one shared by every other
/// thread. glibc's default (8 per core) gives each runtime worker its own heap, which keeps
/// its own free pages and high-water mark; skiff's threads allocate little (buffers are
/// per connection and freed with it), so contention on two arenas is not measurable.
pub const ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`ARENAS`]. Call first thing in `main`, before any thread
/// exists (arenas already created stay). Returns whether glibc accepted the setting.
pub fn cap_arenas() -> bool {
    // SAFETY: mallopt only changes a malloc tunable; M_ARENA_MAX takes any positive count.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) == 1 }
}

/// Drops this process's resident pages of `data`, a read-only part of the binary image read
/// once (an embedded object already parsed), so they stop counting in RSS. The next read
/// faults them back in from the file: this only costs time. Best effort: the kernel skips
/// pages another process maps too, and errors are ignored.
pub fn page_out(data: &'static [u8]) {
    let Some((start, len)) = whole_pages(data.as_ptr() as usize, data.len(), page_size()) else {
        return;
    };
    // SAFETY: MADV_PAGEOUT never changes memory contents (it reclaims pages, which read back
    // the same); the range lies inside `data`, which lives for the whole process.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), len, "madvise(MADV_PAGEOUT) of an embedded object failed");
    }
}

/// Drops this process's resident pages of the binary's read-only segments, from its ELF
/// header to the end of its code (`__ehdr_start` .. `etext`, defined by both GNU ld and lld;
/// with lld that is the read-only data then the code). Nothing in that range is ever written,
/// so the pages read back identical from the file; the RELRO and writable segments, whose
/// pages hold relocations and data, start after `etext` and are never touched.
fn drop_image_pages() {
    unsafe extern "C" {
        /// The ELF header of this executable: the first byte of its first segment.
        static __ehdr_start: u8;
        /// The end of the executable's code.
        static etext: u8;
    }
    let start = &raw const __ehdr_start as usize;
    let end = &raw const etext as usize;
    let Some((addr, len)) = end
        .checked_sub(start)
        .and_then(|len| whole_pages(start, len, page_size()))
    else {
        return;
    };
    // SAFETY: the range is the executable's read-only file mappings (rounded inward to whole
    // pages): MADV_DONTNEED on a private file mapping that was never written only unmaps the
    // pages, and the next access maps the file's identical bytes again.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), len, "madvise(MADV_DONTNEED) of the binary's read-only pages failed");
    }
}

/// The system page size (4 KiB if it cannot be read).
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; no memory is involved.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

/// The whole pages inside `[addr, addr + len)`: start and length, or `None` if there is none.
/// Rounded inward, so no page holding bytes outside the range is touched.
fn whole_pages(addr: usize, len: usize, page: usize) -> Option<(usize, usize)> {
    let start = addr.checked_add(page - 1)? / page * page;
    let end = addr.checked_add(len)? / page * page;
    (end > start).then(|| (start, end - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_pages_round_inward() {
        assert_eq!(whole_pages(4096, 8192, 4096), Some((4096, 8192)));
        assert_eq!(whole_pages(4097, 8192, 4096), Some((8192, 4096)));
        assert_eq!(whole_pages(100, 4000, 4096), None);
        assert_eq!(whole_pages(4000, 4200, 4096), Some((4096, 4096)));
        assert_eq!(whole_pages(usize::MAX - 10, 5, 4096), None);
    }

    #[test]
    fn page_out_keeps_contents() {
        static DATA: [u8; 3 * 4096 * 4] = [7; 3 * 4096 * 4];
        let sum = |d: &[u8]| d.iter().map(|&b| u64::from(b)).sum::<u64>();
        let before = sum(&DATA);
        page_out(&DATA);
        assert_eq!(sum(&DATA), before);
        assert_eq!(before, 7 * DATA.len() as u64);
    }

    #[test]
    fn code_and_constants_still_work_after_release() {
        static TABLE: [u32; 4096] = {
            let mut t = [0u32; 4096];
            let mut i = 0;
            while i < t.len() {
                t[i] = i as u32 * 3;
                i += 1;
            }
            t
        };
        let sum = |t: &[u32]| t.iter().map(|&v| u64::from(v)).sum::<u64>();
        let before = sum(&TABLE);
        release_startup();
        assert_eq!(sum(&TABLE), before);
        assert_eq!(format!("{:?}", &TABLE[..3]), "[0, 3, 6]");
    }

    #[test]
    fn trim_and_cap_are_callable_at_any_time() {
        let v: Vec<u8> = vec![1; 1 << 20];
        drop(v);
        trim_heap();
        // A cap set after threads exist is still accepted; it only limits new arenas.
        assert!(cap_arenas());
    }
}
