//! Kernel functions (kfuncs) called by their BTF id, which the loader patches in at load time
//! (see [`sensor_ebpf::KFUNC_RDONLY_CAST_CALL`]).

use sensor_ebpf::KFUNC_RDONLY_CAST_CALL;

/// `bpf_rdonly_cast(addr, btf_id)`: kernel address `addr` as a BTF pointer to the type
/// `btf_id` (a constant to the verifier), which the programs may load from directly
/// (fault-tolerant loads checked against the type); NULL when the kernel has no such kfunc.
#[inline(always)]
pub fn rdonly_cast(addr: *const u8, btf_id: u32) -> *const u8 {
    let ret: *const u8;
    // SAFETY: one call instruction with the BPF calling convention: arguments in r1 and r2,
    // result in r0, r1-r5 clobbered. The kfunc only retypes its argument.
    unsafe {
        core::arch::asm!(
            ".8byte {call}",
            call = const KFUNC_RDONLY_CAST_CALL,
            inlateout("r1") addr => _,
            inlateout("r2") u64::from(btf_id) => _,
            lateout("r0") ret,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
    ret
}
