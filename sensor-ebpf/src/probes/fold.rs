//! In-kernel folding: the same (process, kind, object) within the fold window becomes one
//! record, so a process hammering one credential cannot flood the ring and hide another event
//! behind losses. Every occurrence is still counted: records carry the key's cumulative total,
//! and the sensor reports the tail of totals that no record carried.

use aya_ebpf::bindings::BPF_NOEXIST;
use sensor_ebpf::{FoldKey, FoldState};

use super::{
    maps::{FOLD, fold_window_ns},
    task::now_ns,
};

/// Counts one occurrence of `key`; returns the cumulative total when a record should be
/// emitted now, `None` when the occurrence is folded into a later record.
#[inline(always)]
pub fn occurrence(key: &FoldKey) -> Option<u64> {
    let now = now_ns();
    if let Some(state) = FOLD.get_ptr_mut(key) {
        return bump(state, now);
    }
    let fresh = FoldState { total: 1, last_emit_ns: now, lost_records: 0 };
    if FOLD.insert(key, fresh, BPF_NOEXIST as u64).is_ok() {
        return Some(1);
    }
    // Another CPU created the entry meanwhile.
    match FOLD.get_ptr_mut(key) {
        Some(state) => bump(state, now),
        None => Some(1),
    }
}

/// The record `occurrence` asked for found the ring full: noted on the key, so the sensor
/// reports its occurrences from the key itself instead of waiting for a record.
#[inline(always)]
pub fn record_lost(key: &FoldKey) {
    if let Some(state) = FOLD.get_ptr_mut(key) {
        // SAFETY: `state` points into a live map value; the add is atomic across CPUs.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                &raw mut (*state).lost_records,
                1,
            );
        }
    }
}

#[inline(always)]
fn bump(state: *mut FoldState, now: u64) -> Option<u64> {
    // SAFETY: `state` points into a live map value; the add is atomic across CPUs.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            &raw mut (*state).total,
            1,
        );
        let total = core::ptr::read_volatile(&raw const (*state).total);
        let last = (*state).last_emit_ns;
        if now.wrapping_sub(last) < fold_window_ns() {
            return None;
        }
        (*state).last_emit_ns = now;
        Some(total)
    }
}
