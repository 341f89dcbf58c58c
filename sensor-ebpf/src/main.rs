//! Keywatch kernel programs. Built for `bpfel-unknown-none` by `sensor/build.rs`; on any other
//! target this is an empty program so `cargo check --workspace` and clippy work everywhere.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// A cross-CPU atomic add on a map value: the bpf target has no stable atomic read-modify-write.
#![cfg_attr(target_arch = "bpf", expect(internal_features, reason = "atomic_xadd"))]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
// Kfunc calls are emitted as raw instructions (see `probes::kfunc`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("keywatch-ebpf is a BPF object: it is built for bpfel-unknown-none by the sensor");
}
