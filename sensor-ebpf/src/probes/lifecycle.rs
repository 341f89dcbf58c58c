//! Process lifecycle: fork (new processes only, not threads) and exit of a thread-group leader.
//! Raw tracepoints: no format file to depend on, and they tax nothing but the scheduler event.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext,
};
use sensor_ebpf::{EventKind, ExitEvent, ForkEvent};

use super::{
    kread,
    maps::{EVENTS, SUBMIT_FLAGS, count_lost, offsets, task_btf},
    task::{current_task, current_task_btf, header_fast, is_self},
};

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    match try_fork(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// The sensor's own forks are reported too: its children are processes like any other, and
/// the process table needs their parent.
fn try_fork(ctx: &RawTracePointContext) -> Result<(), i64> {
    let o = offsets();
    let child: *const u8 = ctx.arg(1);
    let child_pid: u32 = kread::at(child, o.task_pid)?;
    let child_tgid: u32 = kread::at(child, o.task_tgid)?;
    if child_pid != child_tgid {
        return Ok(()); // a new thread, not a new process
    }
    let Some(mut entry) = EVENTS.reserve::<ForkEvent>(0) else {
        count_lost(EventKind::Fork);
        return Ok(());
    };
    entry.write(ForkEvent { header: header_fast(EventKind::Fork), child_tgid, _pad0: 0 });
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}

/// `sched_process_exit(struct task_struct *p, …)`, raised in the context of the exiting task.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(ctx: RawTracePointContext) -> i32 {
    match try_exit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exit(_ctx: &RawTracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if pid_tgid as u32 != tgid || is_self(tgid) {
        return Ok(()); // a thread, or the sensor
    }
    let o = offsets();
    let exit_code: u32 = if task_btf() {
        kread::btf_at(current_task_btf(), o.task_exit_code).unwrap_or(0)
    } else {
        kread::at(current_task(), o.task_exit_code).unwrap_or(0)
    };
    let Some(mut entry) = EVENTS.reserve::<ExitEvent>(0) else {
        count_lost(EventKind::Exit);
        return Ok(());
    };
    entry.write(ExitEvent { header: header_fast(EventKind::Exit), exit_code, _pad0: 0 });
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}
