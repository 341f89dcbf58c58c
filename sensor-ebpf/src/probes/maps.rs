//! Maps and globals shared by every program.

use aya_ebpf::{
    Global,
    bindings::BPF_RB_NO_WAKEUP,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use sensor_ebpf::{EventKind, SensorConfig};

/// Ring buffer of event records; userspace sizes it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Per-CPU count of records that could not be reserved, indexed by [`EventKind`] number.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(64, 0);

/// Set by the loader before load.
#[unsafe(no_mangle)]
pub static CONFIG: Global<SensorConfig> = Global::new(SensorConfig {
    self_tgid: 0,
    _pad0: 0,
    offsets: sensor_ebpf::KernelOffsets {
        task_real_parent: 0,
        task_tgid: 0,
    },
});

/// Records are submitted without waking the reader: a wakeup per record costs several times
/// the event itself; the sensor polls on a short timer instead.
pub const SUBMIT_FLAGS: u64 = BPF_RB_NO_WAKEUP as u64;

/// Counts one record of `kind` that found the ring buffer full.
#[inline(always)]
pub fn count_lost(kind: EventKind) {
    if let Some(slot) = LOST.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
