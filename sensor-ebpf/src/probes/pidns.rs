//! Pids as a container names them. A process in its own pid namespace passes that namespace's
//! numbers to `ptrace` and `process_vm_readv`; the host pid behind one is looked up in the
//! namespace's own table (its IDR, a radix tree of `struct pid`), as `find_vpid` does.

use super::{kread, maps::offsets, task::current_task};
use sensor_ebpf::NO_OFFSET;

/// Deepest pid namespace nesting the kernel allows (`MAX_PID_NS_LEVEL`).
const MAX_PID_NS_LEVEL: u32 = 32;
/// Tree levels walked at most: 64-way nodes cover pids below 2^24 in 4.
const MAX_DEPTH: usize = 6;
/// Low bits of a radix tree entry that is a node (`XA_INTERNAL`), and the bound under which an
/// internal entry is a marker (retry, zero) rather than a node.
const NODE_TAG: u64 = 2;
const INTERNAL_MAX: u64 = 4096;

/// The current task's pid namespace, where it is not the host's.
pub struct OwnNamespace {
    /// The `struct pid_namespace`.
    pub ns: *const u8,
    /// The task's own pid there.
    pub own: u32,
}

/// `None` in the initial namespace, where the pids a task passes are host pids (or where the
/// kernel's layout is unknown).
#[inline(always)]
pub fn own_pid_namespace() -> Option<OwnNamespace> {
    let o = offsets();
    if o.task_thread_pid == NO_OFFSET {
        return None;
    }
    let pid = kread::ptr(current_task(), o.task_thread_pid).ok()?;
    let level: u32 = kread::at(pid, o.pid_level).ok()?;
    if level == 0 || level > MAX_PID_NS_LEVEL {
        return None;
    }
    // `pid.numbers[level]`: the pid as the task's own namespace numbers it.
    let upid = o.pid_numbers.wrapping_add(level.wrapping_mul(o.upid_size));
    let own: u32 = kread::at(pid, upid).ok()?;
    let ns = kread::ptr(pid, upid.wrapping_add(o.upid_ns)).ok()?;
    Some(OwnNamespace { ns, own })
}

/// The host pid of `nr` in pid namespace `ns`; 0 when it names no process now.
#[inline(always)]
pub fn host_pid(ns: *const u8, nr: u32) -> u32 {
    lookup(ns, nr).unwrap_or(0)
}

#[inline(always)]
fn lookup(ns: *const u8, nr: u32) -> Result<u32, i64> {
    let o = offsets();
    let base: u32 = kread::at(ns, o.pidns_idr_base)?;
    let index = nr.wrapping_sub(base) as u64;
    let mask = (o.xa_slots_len as u64).wrapping_sub(1);
    let mut entry: u64 = kread::at(ns, o.pidns_idr_head)?;
    // A tree of one entry holds it at the root, for index 0 only.
    if entry & 3 != NODE_TAG && index != 0 {
        return Ok(0);
    }
    for _ in 0..MAX_DEPTH {
        if entry & 3 != NODE_TAG || entry <= INTERNAL_MAX {
            break;
        }
        let node = (entry - NODE_TAG) as *const u8;
        let shift: u8 = kread::at(node, o.xa_node_shift)?;
        let slot = index >> (shift & 63);
        if slot > mask {
            return Ok(0); // beyond what the tree holds
        }
        entry = kread::at(node, o.xa_node_slots.wrapping_add((slot as u32).wrapping_mul(8)))?;
    }
    // A `struct pid *` is aligned; anything else (NULL, a marker, a node left unwalked) is none.
    if entry == 0 || entry & 3 != 0 {
        return Ok(0);
    }
    kread::at(entry as *const u8, o.pid_nr)
}
