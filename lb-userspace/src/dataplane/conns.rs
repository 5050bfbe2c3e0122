//! Active connection counts per backend id, shared with the kernel through the mmap-able
//! `backend_conns` array. The kernel program and the agent (conntrack expiry, later the proxy)
//! change the same words with atomic operations, so no map syscall sits on the connection path.
//! With `--dataplane userspace` the same type holds anonymous memory: one code path either way.
//! Each element also holds the flows steered since the last slot poll (policy `slots`).

use std::{
    io,
    mem::offset_of,
    os::fd::{AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use lb_common::BackendConns;

/// One `steer_backend_conns` element as the agent touches it: only atomically.
#[repr(C)]
#[derive(Debug, Default)]
pub struct SharedConns {
    pub active: AtomicU64,
    pub steered: AtomicU64,
}

// The kernel's element, word for word.
const _: () = {
    assert!(size_of::<SharedConns>() == size_of::<BackendConns>());
    assert!(offset_of!(SharedConns, active) == offset_of!(BackendConns, active));
    assert!(offset_of!(SharedConns, steered) == offset_of!(BackendConns, steered));
};

/// A shared mapping of one [`SharedConns`] per backend id. Unmapped on drop; the mapping keeps
/// the kernel map alive on its own, so it may outlive the program's other handles.
#[derive(Debug)]
pub struct ConnCounts {
    base: NonNull<SharedConns>,
    entries: usize,
    mapped_len: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through `AtomicU64`s, which are safe
// to use from any thread; the pointer is owned by this value and unmapped only in `drop`.
unsafe impl Send for ConnCounts {}
// SAFETY: see `Send`: every access is an atomic operation on `AtomicU64`.
unsafe impl Sync for ConnCounts {}

impl ConnCounts {
    /// Map `entries` elements of the BPF array behind `fd` (created with `BPF_F_MMAPABLE`, value
    /// `steer_backend_conns`) shared and read/write.
    pub fn map_bpf_array(fd: BorrowedFd<'_>, entries: u32) -> io::Result<Self> {
        Self::map(Some(fd), entries)
    }

    /// Anonymous shared counters: the same semantics without a kernel map.
    pub fn anonymous(entries: u32) -> io::Result<Self> {
        Self::map(None, entries)
    }

    fn map(fd: Option<BorrowedFd<'_>>, entries: u32) -> io::Result<Self> {
        let entries = entries as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("sysconf(_SC_PAGESIZE) failed"))?;
        let bytes = entries
            .checked_mul(size_of::<SharedConns>())
            .filter(|&bytes| bytes > 0)
            .ok_or_else(|| io::Error::other(format!("cannot map {entries} counters")))?;
        // The kernel maps an mmap-able array in whole pages.
        let mapped_len = bytes.div_ceil(page) * page;
        let (flags, raw_fd) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping chosen by the kernel (null hint) aliases no Rust object; a
        // BPF array's mmap offset 0 is element 0 and the length is within its mmap-able size.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<SharedConns>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Self {
            base,
            entries,
            mapped_len,
        })
    }

    /// Every element, index backend id.
    pub fn as_slice(&self) -> &[SharedConns] {
        // SAFETY: the mapping is page-aligned (so 8-aligned), at least `entries * 16` bytes
        // long, lives as long as `self`, and is only ever accessed atomically.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.entries) }
    }

    /// Number of counters (the map's max_entries).
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True when there are no counters (never for a loaded program).
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    fn slot(&self, id: u32) -> Option<&AtomicU64> {
        self.as_slice().get(id as usize).map(|c| &c.active)
    }

    /// Active connections on `id`; 0 for an id beyond the array.
    pub fn get(&self, id: u32) -> u64 {
        self.slot(id).map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Set `id`'s counts to zero (the id changed owner). False if `id` is beyond the array.
    pub fn reset(&self, id: u32) -> bool {
        self.as_slice()
            .get(id as usize)
            .map(|c| {
                c.active.store(0, Ordering::Release);
                c.steered.store(0, Ordering::Release);
            })
            .is_some()
    }

    /// Flows steered to `id` since the last slot poll was published; 0 beyond the array.
    pub fn steered(&self, id: u32) -> u64 {
        self.as_slice()
            .get(id as usize)
            .map_or(0, |c| c.steered.load(Ordering::Acquire))
    }

    /// Forget `seen` steered flows of `id`: a slot poll taken after them has counted them. Those
    /// steered since stay. Saturates at zero. False if `id` is beyond the array.
    pub fn forget_steered(&self, id: u32, seen: u64) -> bool {
        self.as_slice().get(id as usize).is_some_and(|c| {
            c.steered
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    Some(cur.saturating_sub(seen))
                })
                .is_ok()
        })
    }

    /// Take one connection of `id`'s cap `max` (0: no cap), as the kernel's `claim_connection`
    /// does: compare-and-swap so two claimers never both take the last one, then count it as
    /// steered for policy `slots`. False when full or `id` is beyond the array.
    pub fn acquire(&self, id: u32, max: u32) -> bool {
        let Some(c) = self.as_slice().get(id as usize) else {
            return false;
        };
        let claimed = max == 0
            || c.active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    (cur < u64::from(max)).then_some(cur + 1)
                })
                .is_ok();
        if max == 0 {
            c.active.fetch_add(1, Ordering::AcqRel);
        }
        if claimed {
            c.steered.fetch_add(1, Ordering::AcqRel);
        }
        claimed
    }

    /// Give one connection of `id` back. Saturates at zero: a count reset while the connection
    /// was open must not wrap. False if nothing was taken (zero or `id` beyond the array).
    pub fn release(&self, id: u32) -> bool {
        self.slot(id).is_some_and(|count| {
            count
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    cur.checked_sub(1)
                })
                .is_ok()
        })
    }
}

impl Drop for ConnCounts {
    fn drop(&mut self) {
        // SAFETY: `base`/`mapped_len` are exactly the mapping created in `map`, and no borrow of
        // it outlives `self`.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped_len) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "unmapping backend_conns");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_respects_cap_and_release_saturates() {
        let counts = ConnCounts::anonymous(4096).expect("anonymous mapping");
        assert_eq!(counts.len(), 4096);
        assert!(counts.acquire(7, 2));
        assert!(counts.acquire(7, 2));
        assert!(!counts.acquire(7, 2), "cap of 2 reached");
        assert_eq!(counts.get(7), 2);
        assert_eq!(counts.steered(7), 2, "each claim is a steered flow");
        assert!(counts.release(7));
        assert!(counts.acquire(7, 2));
        assert!(counts.reset(7));
        assert_eq!(counts.get(7), 0);
        assert!(!counts.release(7), "never below zero");
        assert_eq!(counts.get(7), 0);
        // No cap.
        for _ in 0..1000 {
            assert!(counts.acquire(8, 0));
        }
        assert_eq!(counts.get(8), 1000);
    }

    #[test]
    fn out_of_range_ids_are_refused() {
        let counts = ConnCounts::anonymous(16).expect("anonymous mapping");
        assert_eq!(counts.get(16), 0);
        assert!(!counts.acquire(16, 0));
        assert!(!counts.release(16));
        assert!(!counts.reset(16));
        assert_eq!(counts.steered(16), 0);
        assert!(!counts.forget_steered(16, 1));
    }

    #[test]
    fn forgetting_steered_keeps_the_later_ones_and_reset_clears_them() {
        let counts = ConnCounts::anonymous(4).expect("anonymous mapping");
        let c = &counts.as_slice()[2];
        c.steered.fetch_add(5, Ordering::AcqRel); // as the kernel's claim_connection does
        let seen = counts.steered(2);
        c.steered.fetch_add(2, Ordering::AcqRel); // steered while the poll was out
        assert!(counts.forget_steered(2, seen));
        assert_eq!(counts.steered(2), 2);
        assert!(counts.forget_steered(2, 10));
        assert_eq!(counts.steered(2), 0, "never below zero");
        c.steered.fetch_add(1, Ordering::AcqRel);
        assert!(counts.reset(2));
        assert_eq!(counts.steered(2), 0);
    }

    #[test]
    fn concurrent_acquire_never_exceeds_cap() {
        let counts = std::sync::Arc::new(ConnCounts::anonymous(1).expect("anonymous mapping"));
        let won: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let counts = &counts;
                    s.spawn(move || (0..1000).filter(|_| counts.acquire(0, 100)).count() as u64)
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(won, 100);
        assert_eq!(counts.get(0), 100);
    }
}
