//! Privilege changes: successful setuid-family and capset syscalls. Exit-only: the record
//! carries the credentials after the call; the sensor knows what they were before (exec, fork
//! and every earlier record carry them) and reports only real changes.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use sensor_ebpf::{CredChangeEvent, CredSyscall, EventKind};

use super::{
    kread,
    maps::{EVENTS, SUBMIT_FLAGS, count_lost, offsets},
    task::{cred, current_task, current_tgid, header, is_self, tp_field},
};

/// `long ret` in every `syscalls:sys_exit_*` format.
const RET: usize = 16;

macro_rules! cred_exit {
    ($($fn_name:ident => $tp:literal, $which:expr;)*) => {
        $(
            #[tracepoint(category = "syscalls", name = $tp)]
            pub fn $fn_name(ctx: TracePointContext) -> u32 {
                match on_cred_exit(&ctx, $which) {
                    Ok(()) | Err(_) => 0,
                }
            }
        )*
    };
}

cred_exit! {
    sys_exit_setuid => "sys_exit_setuid", CredSyscall::Setuid;
    sys_exit_setreuid => "sys_exit_setreuid", CredSyscall::Setreuid;
    sys_exit_setresuid => "sys_exit_setresuid", CredSyscall::Setresuid;
    sys_exit_setfsuid => "sys_exit_setfsuid", CredSyscall::Setfsuid;
    sys_exit_setgid => "sys_exit_setgid", CredSyscall::Setgid;
    sys_exit_setregid => "sys_exit_setregid", CredSyscall::Setregid;
    sys_exit_setresgid => "sys_exit_setresgid", CredSyscall::Setresgid;
    sys_exit_setfsgid => "sys_exit_setfsgid", CredSyscall::Setfsgid;
    sys_exit_capset => "sys_exit_capset", CredSyscall::Capset;
}

fn on_cred_exit(ctx: &TracePointContext, which: CredSyscall) -> Result<(), i64> {
    let ret: i64 = tp_field(ctx, RET);
    // setfsuid/setfsgid return the previous id rather than an error code.
    let fs_call = matches!(which, CredSyscall::Setfsuid | CredSyscall::Setfsgid);
    if ret != 0 && !fs_call {
        return Ok(());
    }
    if is_self(current_tgid()) {
        return Ok(());
    }
    let o = offsets();
    let cred = cred(current_task())?;
    let egid: u32 = kread::at(cred, o.cred_egid).unwrap_or(0);
    let cap_effective: u64 = kread::at(cred, o.cred_cap_effective).unwrap_or(0);
    let Some(mut entry) = EVENTS.reserve::<CredChangeEvent>(0) else {
        count_lost(EventKind::CredChange);
        return Ok(());
    };
    entry.write(CredChangeEvent {
        header: header(EventKind::CredChange),
        syscall: which as u32,
        egid,
        cap_effective,
    });
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}
