//! Steer's kernel programs, compiled from C by `build.rs` and embedded here.

/// Wrapper that gives embedded bytes the 8-byte alignment an ELF parser expects.
#[repr(C, align(8))]
struct Aligned<Bytes: ?Sized>(Bytes);

static STEER_BPF: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/steer.bpf.o")));

static EMPTY_BPF: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/empty.bpf.o")));

/// An XDP program that only passes packets (`empty.bpf.c`): the benchmark's baseline.
pub fn empty_bpf() -> &'static [u8] {
    &EMPTY_BPF.0
}

/// The XDP load balancer object (`steer.bpf.c`).
pub fn steer_bpf() -> &'static [u8] {
    &STEER_BPF.0
}
