//! The two map commands aya 0.14 keeps crate-private: a key walk that can resume from any key
//! (aya's iterators always restart from the first one) and lookup-and-delete, which hands back the
//! value as it was when the entry left the map.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` or `next_key`.
    value: u64,
    flags: u64,
}

fn sys_bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised `bpf_attr` prefix of the size passed; the pointers
    // inside it were set by the callers to live buffers of the map's key/value size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<ElemAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The key after `key` (the first key for `None`); `None` at the end. A `key` no longer in the
/// map restarts the walk from the first key (kernel behaviour for hash maps).
pub(super) fn next_key<K: Pod>(fd: BorrowedFd<'_>, key: Option<&K>) -> io::Result<Option<K>> {
    let mut next = MaybeUninit::<K>::uninit();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.map_or(0, |k| std::ptr::from_ref(k) as u64),
        value: next.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        // SAFETY: on success the kernel wrote a whole key of `size_of::<K>()` bytes (the caller's
        // `K` is the map's key type) and any bit pattern is a valid `Pod`.
        Ok(()) => Ok(Some(unsafe { next.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Remove `key` and return its value as it was removed; `None` if it was not there.
pub(super) fn lookup_and_delete<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: on success the kernel wrote a whole value of the map's value size, which is
        // `size_of::<V>()` for the caller's types, and any bit pattern is a valid `Pod`.
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
