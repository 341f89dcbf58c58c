//! The current task: identity, credentials and the event header.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
    bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
};
use sensor_ebpf::{COMM_LEN, EventHeader, EventKind, RUNTIME_SELF_TGID};

use super::{
    kread,
    maps::{RUNTIME, offsets},
};

/// A field of a tracepoint's record at `offset` of its format, loaded straight from the
/// context: the verifier allows constant-offset loads from a tracepoint context, which cost a
/// fraction of a `bpf_probe_read_kernel` call (and run on every syscall of a hooked kind).
#[inline(always)]
pub fn tp_field<T: Copy>(ctx: &aya_ebpf::programs::TracePointContext, offset: usize) -> T {
    use aya_ebpf::EbpfContext as _;
    // SAFETY: `offset` lies within the record (the callers' formats); the verifier checks it.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// Thread-group id of the current task.
#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// True for the sensor's own process, whose activity is never reported.
#[inline(always)]
pub fn is_self(tgid: u32) -> bool {
    RUNTIME.get(RUNTIME_SELF_TGID).is_some_and(|&own| own == tgid)
}

/// The current `task_struct`.
#[inline(always)]
pub fn current_task() -> *const u8 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() as *const u8 }
}

/// The current `task_struct` as a BTF pointer, for [`kread::btf_ptr`] walks; only where
/// [`super::maps::task_btf`] holds.
#[inline(always)]
pub fn current_task_btf() -> *const u8 {
    // SAFETY: helper without preconditions.
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_task_btf() as *const u8 }
}

/// The first two arguments of the syscall now exiting, from the current task's saved user
/// registers (`di`, `si` on x86-64, which these syscalls leave as the caller set them); only
/// where [`super::maps::args_at_exit`] holds.
#[inline(always)]
pub fn exit_args() -> Result<(u64, u64), i64> {
    exit_args_of(current_task_btf())
}

/// [`exit_args`] of `task`, the current task's BTF pointer the caller already holds.
#[inline(always)]
pub fn exit_args_of(task: *const u8) -> Result<(u64, u64), i64> {
    let o = offsets();
    // SAFETY: the helper takes the current task's BTF pointer and returns a BTF pointer to its
    // registers, loaded from with plain, verifier-checked loads.
    let regs =
        unsafe { aya_ebpf::helpers::generated::bpf_task_pt_regs(task as *mut _) as *const u8 };
    Ok((kread::btf_at(regs, o.pt_regs_di)?, kread::btf_at(regs, o.pt_regs_si)?))
}

/// Boot-clock nanoseconds.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Process id of `task`'s real parent (0 when unreadable).
#[inline(always)]
pub fn parent_tgid(task: *const u8) -> u32 {
    let o = offsets();
    match kread::ptr(task, o.task_real_parent) {
        Ok(parent) => kread::at(parent, o.task_tgid).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The task's subjective credentials (`task->cred`).
#[inline(always)]
pub fn cred(task: *const u8) -> Result<*const u8, i64> {
    kread::ptr(task, offsets().task_cred)
}

/// Header for an event of `kind` raised by the current task, its kernel structs read with
/// `bpf_probe_read_kernel` (any program type, small stack).
#[inline(always)]
pub fn header(kind: EventKind) -> EventHeader {
    let mut header = core::mem::MaybeUninit::<EventHeader>::uninit();
    write_header(header.as_mut_ptr(), kind);
    // SAFETY: `write_header` wrote every field.
    unsafe { header.assume_init() }
}

/// [`header`] written in place, field by field, into a reserved record: no copy of the
/// header on the BPF stack, which the io_uring completion program has little of to spare.
#[inline(always)]
pub fn write_header(dst: *mut EventHeader, kind: EventKind) {
    let uid_gid = bpf_get_current_uid_gid();
    let task = current_task();
    let o = offsets();
    let euid = match cred(task) {
        Ok(c) => kread::at(c, o.cred_euid).unwrap_or(uid_gid as u32),
        Err(_) => uid_gid as u32,
    };
    let login_uid = if o.task_loginuid == 0 {
        u32::MAX
    } else {
        kread::at(task, o.task_loginuid).unwrap_or(u32::MAX)
    };
    write_header_of(dst, kind, uid_gid, (euid, login_uid, parent_tgid(task)));
}

/// [`header`] with plain loads through the task's BTF pointer where the kernel allows them
/// ([`super::maps::task_btf`]): five helper calls fewer, for the lifecycle programs that run
/// on every fork, exec and exit on the host. Only for tracepoint programs.
#[inline(always)]
pub fn header_fast(kind: EventKind) -> EventHeader {
    if !super::maps::task_btf() {
        return header(kind);
    }
    let uid_gid = bpf_get_current_uid_gid();
    let task = current_task_btf();
    let o = offsets();
    let euid = kread::btf_ptr(task, o.task_cred)
        .and_then(|c| kread::btf_at(c, o.cred_euid))
        .unwrap_or(uid_gid as u32);
    let login_uid = if o.task_loginuid == 0 {
        u32::MAX
    } else {
        kread::btf_at(task, o.task_loginuid).unwrap_or(u32::MAX)
    };
    let ppid = kread::btf_ptr(task, o.task_real_parent)
        .and_then(|p| kread::btf_at(p, o.task_tgid))
        .unwrap_or(0);
    let mut header = core::mem::MaybeUninit::<EventHeader>::uninit();
    write_header_of(header.as_mut_ptr(), kind, uid_gid, (euid, login_uid, ppid));
    // SAFETY: `write_header_of` wrote every field.
    unsafe { header.assume_init() }
}

/// Writes a header in place from the ids the caller read (`ids`: euid, login uid, parent);
/// the rest comes from helpers about the current task.
#[inline(always)]
fn write_header_of(dst: *mut EventHeader, kind: EventKind, uid_gid: u64, ids: (u32, u32, u32)) {
    let (euid, login_uid, ppid) = ids;
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `dst` points at writable memory for a header (a reserved record or the caller's
    // uninitialised local); each field is written once, the comm by the helper.
    unsafe {
        (&raw mut (*dst).kind).write(kind as u32);
        (&raw mut (*dst).count).write(1);
        (&raw mut (*dst).ktime_ns).write(now_ns());
        (&raw mut (*dst).pid).write(pid_tgid as u32);
        (&raw mut (*dst).tgid).write((pid_tgid >> 32) as u32);
        (&raw mut (*dst).ppid).write(ppid);
        (&raw mut (*dst).uid).write(uid_gid as u32);
        (&raw mut (*dst).gid).write((uid_gid >> 32) as u32);
        (&raw mut (*dst).euid).write(euid);
        (&raw mut (*dst).login_uid).write(login_uid);
        (&raw mut (*dst)._pad0).write(0);
        (&raw mut (*dst).cgroup_id).write(bpf_get_current_cgroup_id());
        let comm = &raw mut (*dst).comm;
        if aya_ebpf::helpers::generated::bpf_get_current_comm(comm.cast(), COMM_LEN as u32) != 0 {
            comm.write([0; COMM_LEN]);
        }
    }
}
