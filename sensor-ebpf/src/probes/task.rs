//! Reads from the current `task_struct` at offsets the loader took from the kernel's BTF.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_task, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel,
};
use sensor_ebpf::{COMM_LEN, EventHeader, EventKind};

use super::maps::CONFIG;

/// Thread-group id of the current task.
#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// True for the sensor's own process, whose activity is never reported.
#[inline(always)]
pub fn is_self(tgid: u32) -> bool {
    tgid == CONFIG.load().self_tgid
}

/// Process id of the current task's real parent (0 when unreadable).
#[inline(always)]
pub fn parent_tgid() -> u32 {
    let offsets = CONFIG.load().offsets;
    // SAFETY: the kernel validates every read through bpf_probe_read_kernel.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let parent: *const u8 =
            match bpf_probe_read_kernel(task.add(offsets.task_real_parent as usize).cast()) {
                Ok(p) => p,
                Err(_) => return 0,
            };
        bpf_probe_read_kernel(parent.add(offsets.task_tgid as usize).cast::<u32>()).unwrap_or(0)
    }
}

/// Header for an event of `kind` raised by the current task.
#[inline(always)]
pub fn header(kind: EventKind) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    EventHeader {
        kind: kind as u32,
        count: 1,
        // SAFETY: helpers without preconditions.
        ktime_ns: unsafe { bpf_ktime_get_boot_ns() },
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        ppid: parent_tgid(),
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _pad0: 0,
        // SAFETY: as above.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    }
}
