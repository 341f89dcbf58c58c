//! Checked reads of kernel memory at BTF-derived offsets.

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Reads a `T` at `base + offset`; `Err` when the kernel refuses the read.
#[inline(always)]
pub fn at<T: Copy>(base: *const u8, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one yields Err.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
        .map_err(i64::from)
}

/// Reads a kernel pointer at `base + offset`, refusing NULL.
#[inline(always)]
pub fn ptr(base: *const u8, offset: u32) -> Result<*const u8, i64> {
    let p: *const u8 = at(base, offset)?;
    if p.is_null() { Err(-1) } else { Ok(p) }
}
