//! Process lifecycle: exec, with the credentials and file mode after it (setuid/setgid exec).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_kernel_str_bytes, generated::bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use sensor_ebpf::{ARGS_LEN, EventKind, ExecEvent};

use super::{
    kread::{self, Fields, NO_WINDOW},
    maps::{EVENTS, SUBMIT_FLAGS, count_lost, offsets, task_btf},
    task::{current_task, current_task_btf, current_tgid, header_fast, is_self, tp_field},
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
    // Plain loads through the task's BTF pointer where the kernel allows: a dozen helper calls
    // fewer on every exec of the host.
    if task_btf() {
        exec_event(ctx, &mut kread::BtfView::new(), current_task_btf())
    } else {
        exec_event(ctx, &mut kread::View::new(), current_task())
    }
}

/// What the kernel holds about the program `task` now runs, read through `view`.
struct Exec {
    egid: u32,
    cap_effective: u64,
    exe: ExeFile,
    /// Where the arguments start in the process's memory, and how many bytes they take.
    args_at: u64,
    args_total: u32,
}

#[inline(always)]
fn exec_facts<F: Fields>(view: &mut F, task: *const u8) -> Result<Exec, i64> {
    let o = offsets();
    let (cred, mm) = {
        let view = view.load(task, NO_WINDOW)?;
        (view.ptr(o.task_cred)?, view.ptr(o.task_mm).ok())
    };
    let (egid, cap_effective) = {
        let view = view.load(cred, NO_WINDOW)?;
        (view.at(o.cred_egid).unwrap_or(0), view.at(o.cred_cap_effective).unwrap_or(0))
    };
    let mut facts = Exec { egid, cap_effective, exe: ExeFile::UNKNOWN, args_at: 0, args_total: 0 };
    let Some(mm) = mm else { return Ok(facts) };
    let exe_file = {
        let view = view.load(mm, NO_WINDOW)?;
        let start: u64 = view.at(o.mm_arg_start).unwrap_or(0);
        let end: u64 = view.at(o.mm_arg_end).unwrap_or(0);
        facts.args_at = start;
        facts.args_total = end.saturating_sub(start).min(u32::MAX as u64) as u32;
        view.ptr(o.mm_exe_file)
    };
    if let Ok(file) = exe_file {
        facts.exe = exe_file_of(view, file).unwrap_or(ExeFile::UNKNOWN);
    }
    Ok(facts)
}

#[inline(always)]
fn exec_event<F: Fields>(
    ctx: &TracePointContext,
    view: &mut F,
    task: *const u8,
) -> Result<(), i64> {
    let facts = exec_facts(view, task)?;
    let exe = &facts.exe;
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
        (*event).egid = facts.egid;
        (*event).cap_effective = facts.cap_effective;
        (*event).args_total = facts.args_total;
        // The arguments sit in the new program's memory, just set up by the exec; a bounded
        // read (the verifier checks the size against the record) of at most ARGS_LEN bytes.
        let total = facts.args_total;
        let want = if total > ARGS_LEN as u32 { ARGS_LEN as u32 } else { total };
        let read =
            bpf_probe_read_user((*event).args.as_mut_ptr().cast(), want, facts.args_at as *const _);
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
        let name = if by_fd && !exe.file.is_null() { dentry_name(view, exe.file) } else { None };
        (*event).exe_name_len = match name {
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
    /// The `struct file` itself, for [`dentry_name`] when needed; NULL when unknown (a plain
    /// pointer: the verifier refuses the register an `Option` leaves unset on its `None` path).
    file: *const u8,
}

impl ExeFile {
    const UNKNOWN: ExeFile = ExeFile { mode: 0, ino: 0, dev: 0, file: core::ptr::null() };
}

#[inline(always)]
fn exe_file_of<F: Fields>(view: &mut F, file: *const u8) -> Result<ExeFile, i64> {
    let o = offsets();
    let inode = view.load(file, NO_WINDOW)?.ptr(o.file_f_inode)?;
    let (mode, ino, sb) = {
        let view = view.load(inode, NO_WINDOW)?;
        (view.at::<u16>(o.inode_i_mode)?, view.at::<u64>(o.inode_i_ino)?, view.ptr(o.inode_i_sb)?)
    };
    let (dev, _) = super::file::superblock(view, sb, inode)?;
    Ok(ExeFile { mode: mode as u32, ino, dev, file })
}

/// The name of `file`'s dentry (`f_path.dentry->d_name.name`).
#[inline(always)]
fn dentry_name<F: Fields>(view: &mut F, file: *const u8) -> Option<*const u8> {
    let o = offsets();
    let dentry = view.load(file, NO_WINDOW).ok()?.ptr(o.file_dentry).ok()?;
    view.load(dentry, NO_WINDOW).ok()?.ptr(o.dentry_name).ok()
}
