//! Checked reads of kernel memory at BTF-derived offsets.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::helpers::{
    bpf_probe_read_kernel, generated::bpf_probe_read_kernel as bpf_probe_read_kernel_raw,
};
use sensor_ebpf::{READ_WINDOW_MAX, ReadWindow};

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

/// Reads the kernel pointer at `base + offset` with a plain load, refusing NULL. Only for a
/// `base` the verifier knows as a BTF pointer (from `bpf_get_current_task_btf` and walks from
/// it) and an offset it knows as a constant (the frozen offsets global): it checks the load
/// against the kernel's type and makes it fault-tolerant (a bad address reads as 0).
#[inline(always)]
pub fn btf_ptr(base: *const u8, offset: u32) -> Result<*const u8, i64> {
    let p: *const u8 = btf_at(base, offset)?;
    if p.is_null() { Err(-1) } else { Ok(p) }
}

/// Reads the `T` at `base + offset` with a plain load; same conditions as [`btf_ptr`].
#[inline(always)]
pub fn btf_at<T: Copy>(base: *const u8, offset: u32) -> Result<T, i64> {
    // SAFETY: see `btf_ptr`; volatile keeps the compiler from reshaping the address
    // arithmetic the verifier must see.
    Ok(unsafe { core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>()) })
}

/// Several fields of one kernel struct, read with one `bpf_probe_read_kernel` of the struct's
/// [`ReadWindow`], or field by field when the loader found no window for them.
pub struct View {
    base: *const u8,
    window: ReadWindow,
    buf: MaybeUninit<[u64; WINDOW_WORDS]>,
}

const WINDOW_WORDS: usize = READ_WINDOW_MAX as usize / 8;

/// Reads fields of kernel structs, one struct at a time: [`View`] (a helper read per window,
/// or per field) or [`BtfView`] (plain loads through BTF pointers).
pub trait Fields {
    /// True when a field costs a plain load, so reading one that may not be needed is free.
    const FREE: bool;

    /// Makes the struct at `base` current, reading `window` of it where that is how it reads.
    fn load(&mut self, base: *const u8, window: ReadWindow) -> Result<&Self, i64>;

    /// The `T` at `offset` in the current struct.
    fn at<T: Copy>(&self, offset: u32) -> Result<T, i64>;

    /// The non-NULL kernel pointer at `offset` in the current struct.
    #[inline(always)]
    fn ptr(&self, offset: u32) -> Result<*const u8, i64> {
        let p: *const u8 = self.at(offset)?;
        if p.is_null() { Err(-1) } else { Ok(p) }
    }
}

/// No window: fields read one by one.
pub const NO_WINDOW: ReadWindow = ReadWindow { base: 0, len: 0 };

/// Fields through a BTF pointer (and walks from it), with plain loads; see [`btf_ptr`].
pub struct BtfView {
    base: *const u8,
}

impl BtfView {
    #[inline(always)]
    pub fn new() -> Self {
        BtfView { base: core::ptr::null() }
    }
}

impl Fields for BtfView {
    const FREE: bool = true;

    #[inline(always)]
    fn load(&mut self, base: *const u8, _window: ReadWindow) -> Result<&Self, i64> {
        self.base = base;
        Ok(self)
    }

    #[inline(always)]
    fn at<T: Copy>(&self, offset: u32) -> Result<T, i64> {
        btf_at(self.base, offset)
    }
}

impl View {
    /// An empty view; one per program run, reused for each struct (the BPF stack is small).
    #[inline(always)]
    pub fn new() -> Self {
        View { base: core::ptr::null(), window: NO_WINDOW, buf: MaybeUninit::uninit() }
    }
}

impl Fields for View {
    const FREE: bool = false;

    /// Reads `window` of the struct at `base` (nothing yet when the window is empty).
    #[inline(always)]
    fn load(&mut self, base: *const u8, window: ReadWindow) -> Result<&Self, i64> {
        self.base = base;
        self.window = window;
        let len = window.len;
        if len != 0 && len <= READ_WINDOW_MAX {
            // SAFETY: the destination is this view's buffer, `len` ≤ its size; the helper
            // validates the source and zero-fills on failure.
            let rc = unsafe {
                bpf_probe_read_kernel_raw(
                    self.buf.as_mut_ptr().cast(),
                    len,
                    base.wrapping_add(window.base as usize).cast(),
                )
            };
            if rc != 0 {
                return Err(rc);
            }
        } else {
            self.window.len = 0;
        }
        Ok(self)
    }

    #[inline(always)]
    fn at<T: Copy>(&self, offset: u32) -> Result<T, i64> {
        if self.window.len == 0 {
            return at(self.base, offset);
        }
        let size = size_of::<T>() as u64;
        // The loader placed every field inside the window at its natural alignment from the
        // base; the constant mask (a no-op then) lets the verifier see an aligned read inside
        // the buffer, where a compare-and-branch may be rearranged by the compiler.
        let mask = (READ_WINDOW_MAX as u64 - size) & !(size - 1);
        let rel = (offset.wrapping_sub(self.window.base) as u64) & mask;
        // SAFETY: in bounds of the buffer (masked above), filled by the window read.
        Ok(unsafe { self.buf.as_ptr().cast::<u8>().add(rel as usize).cast::<T>().read() })
    }
}
