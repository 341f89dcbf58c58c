//! Process lifecycle: exec, with the credentials and file mode after it (setuid/setgid exec).

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_probe_read_kernel_str_bytes, macros::tracepoint,
    programs::TracePointContext,
};
use sensor_ebpf::{EventKind, ExecEvent};

use super::{
    kread,
    maps::{EVENTS, SUBMIT_FLAGS, count_lost, offsets},
    task::{cred, current_task, current_tgid, header, is_self, tp_field},
};

/// Offsets in `sched:sched_process_exec` (`/sys/kernel/tracing/events/sched/sched_process_exec/format`):
/// `__data_loc char[] filename` at 8, `pid_t pid` at 12, `pid_t old_pid` at 16.
const FILENAME_LOC: usize = 8;
const OLD_PID: usize = 16;

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    match try_sched_process_exec(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_sched_process_exec(ctx: &TracePointContext) -> Result<(), i64> {
    if is_self(current_tgid()) {
        return Ok(());
    }
    let task = current_task();
    let o = offsets();
    let cred = cred(task)?;
    let egid: u32 = kread::at(cred, o.cred_egid).unwrap_or(0);
    let cap_effective: u64 = kread::at(cred, o.cred_cap_effective).unwrap_or(0);
    let exe_mode = exe_mode(task).unwrap_or(0);

    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_lost(EventKind::Exec);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size; tracepoint fields are read
    // at the offsets of the format above, and the file name through a checked kernel read.
    unsafe {
        (*event).header = header(EventKind::Exec);
        (*event).old_pid = tp_field::<u32>(ctx, OLD_PID);
        (*event).exe_mode = exe_mode;
        (*event).egid = egid;
        (*event).cap_effective = cap_effective;
        let loc = tp_field::<u32>(ctx, FILENAME_LOC);
        let name = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        (*event).filename_len = match bpf_probe_read_kernel_str_bytes(name, &mut (*event).filename)
        {
            Ok(bytes) => bytes.len() as u32,
            Err(_) => 0,
        };
    }
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}

/// `i_mode` of the task's executable (`task->mm->exe_file->f_inode->i_mode`).
fn exe_mode(task: *const u8) -> Result<u32, i64> {
    let o = offsets();
    let mm = kread::ptr(task, o.task_mm)?;
    let file = kread::ptr(mm, o.mm_exe_file)?;
    let inode = kread::ptr(file, o.file_f_inode)?;
    let mode: u16 = kread::at(inode, o.inode_i_mode)?;
    Ok(mode as u32)
}
