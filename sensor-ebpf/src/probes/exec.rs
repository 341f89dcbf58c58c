//! Process lifecycle: exec, with the credentials and file mode after it (setuid/setgid exec).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_kernel_str_bytes, generated::bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use sensor_ebpf::{ARGS_LEN, EventKind, ExecEvent};

use super::{
    kread,
    maps::{EVENTS, SUBMIT_FLAGS, count_lost, offsets},
    task::{cred, current_task, current_tgid, header_fast, is_self, tp_field},
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
    let mm = kread::ptr(task, o.task_mm).unwrap_or_default();
    let exe = exe_file(mm).unwrap_or(ExeFile { mode: 0, ino: 0, dev: 0, file: None });
    let (args_at, args_total) = args_span(mm).unwrap_or((0, 0));

    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_lost(EventKind::Exec);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size; tracepoint fields are read
    // at the offsets of the format above, and the file name through a checked kernel read.
    unsafe {
        (*event).header = header_fast(EventKind::Exec);
        (*event).old_pid = tp_field::<u32>(ctx, OLD_PID);
        (*event).exe_mode = exe.mode;
        (*event).exe_ino = exe.ino;
        (*event).exe_dev = exe.dev;
        (*event).egid = egid;
        (*event).cap_effective = cap_effective;
        (*event).args_total = args_total;
        // The arguments sit in the new program's memory, just set up by the exec; a bounded
        // read (the verifier checks the size against the record) of at most ARGS_LEN bytes.
        let want = if args_total > ARGS_LEN as u32 { ARGS_LEN as u32 } else { args_total };
        let read =
            bpf_probe_read_user((*event).args.as_mut_ptr().cast(), want, args_at as *const _);
        (*event).args_len = if read == 0 { want } else { 0 };
        let loc = tp_field::<u32>(ctx, FILENAME_LOC);
        let name = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        (*event).filename_len = match bpf_probe_read_kernel_str_bytes(name, &mut (*event).filename)
        {
            Ok(bytes) => bytes.len() as u32,
            Err(_) => 0,
        };
        // The file's own name says something only where the file name is a descriptor's.
        let by_fd = names_a_descriptor(&(*event).filename);
        (*event).exe_name_len = match exe.file.filter(|_| by_fd).and_then(dentry_name) {
            Some(name) => match bpf_probe_read_kernel_str_bytes(name, &mut (*event).exe_name) {
                Ok(bytes) => bytes.len() as u32,
                Err(_) => 0,
            },
            None => 0,
        };
    }
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}

/// True for a file name starting `/dev/fd/` or `/proc/` (`fexecve`, `execveat` on a
/// descriptor), where the name does not tell which file ran.
#[inline(always)]
fn names_a_descriptor(filename: &[u8]) -> bool {
    filename.starts_with(b"/dev/fd/") || filename.starts_with(b"/proc/")
}

/// The executed file as the kernel holds it (`mm->exe_file->f_inode`).
struct ExeFile {
    mode: u32,
    ino: u64,
    dev: u32,
    /// The `struct file` itself, for [`dentry_name`] when needed.
    file: Option<*const u8>,
}

fn exe_file(mm: *const u8) -> Result<ExeFile, i64> {
    let o = offsets();
    let file = kread::ptr(mm, o.mm_exe_file)?;
    let inode = kread::ptr(file, o.file_f_inode)?;
    let mode: u16 = kread::at(inode, o.inode_i_mode)?;
    let ino: u64 = kread::at(inode, o.inode_i_ino)?;
    let sb = kread::ptr(inode, o.inode_i_sb)?;
    let dev: u32 = kread::at(sb, o.sb_s_dev)?;
    Ok(ExeFile { mode: mode as u32, ino, dev, file: Some(file) })
}

/// The name of `file`'s dentry (`f_path.dentry->d_name.name`).
#[inline(always)]
fn dentry_name(file: *const u8) -> Option<*const u8> {
    let o = offsets();
    kread::ptr(file, o.file_dentry).and_then(|d| kread::ptr(d, o.dentry_name)).ok()
}

/// Where the arguments start in the process's memory, and how many bytes they take.
fn args_span(mm: *const u8) -> Result<(u64, u32), i64> {
    let o = offsets();
    let start: u64 = kread::at(mm, o.mm_arg_start)?;
    let end: u64 = kread::at(mm, o.mm_arg_end)?;
    Ok((start, end.saturating_sub(start).min(u32::MAX as u64) as u32))
}
