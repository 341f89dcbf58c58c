//! Process lifecycle: exec.

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_probe_read_kernel_str_bytes, macros::tracepoint,
    programs::TracePointContext,
};
use sensor_ebpf::{EventKind, ExecEvent};

use super::{
    maps::{EVENTS, SUBMIT_FLAGS, count_lost},
    task::{current_tgid, header, is_self},
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
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_lost(EventKind::Exec);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size; tracepoint fields are read
    // at the offsets of the format above, and the file name through a checked kernel read.
    unsafe {
        (*event).header = header(EventKind::Exec);
        (*event).old_pid = ctx.read_at::<u32>(OLD_PID).unwrap_or(0);
        let loc = ctx.read_at::<u32>(FILENAME_LOC).unwrap_or(0);
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
