//! Kernel functions (kfuncs) called by their BTF id, which the loader patches in at load time
//! (see [`sensor_ebpf::KFUNC_RDONLY_CAST_CALL`]).

use sensor_ebpf::KFUNC_RDONLY_CAST_CALL;

use super::maps::file_btf_id;

/// `addr` (a `struct file *` read with a helper) as a BTF pointer to `struct file`, which the
/// verifier lets the programs load from directly (fault-tolerant loads, checked against the
/// kernel's type); NULL when the kernel has no `bpf_rdonly_cast`.
#[inline(always)]
pub fn file_btf(addr: *const u8) -> *const u8 {
    let ret: *const u8;
    // SAFETY: one call instruction with the BPF calling convention: arguments in r1 and r2,
    // result in r0, r1-r5 clobbered. The kfunc only retypes its argument.
    unsafe {
        core::arch::asm!(
            ".8byte {call}",
            call = const KFUNC_RDONLY_CAST_CALL,
            inlateout("r1") addr => _,
            inlateout("r2") u64::from(file_btf_id()) => _,
            lateout("r0") ret,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
    ret
}
