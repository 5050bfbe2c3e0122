//! `bpf(BPF_PROG_TEST_RUN)` on a loaded program: aya 0.14 has no API for it, and the raw syscall
//! is short. One run returns the verdict and the frame as the program left it.

use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// XDP verdicts, as `retval` reports them.
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

#[derive(Debug)]
pub struct TestRun {
    pub verdict: u32,
    /// The frame after the program ran.
    pub data: Vec<u8>,
    /// Average run time in ns as the kernel measured it.
    pub duration_ns: u32,
}

/// Run `prog` once on `frame` (`repeat` > 1 would rerun on the already rewritten buffer).
pub fn test_run(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> std::io::Result<TestRun> {
    // Room for programs that grow the frame.
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr is a valid BPF_PROG_TEST_RUN attribute whose pointers reference `frame` and
    // `out`, both alive and of the stated sizes for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            size_of::<TestRunAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(TestRun {
        verdict: attr.retval,
        data: out,
        duration_ns: attr.duration,
    })
}
