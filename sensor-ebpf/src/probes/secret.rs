//! Secret access across processes by syscall: ptrace attach/seize/peek, process_vm_readv and
//! keyctl reads. Enter hooks: the arguments are what matters, and a failed attempt is itself
//! worth knowing.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use sensor_ebpf::{NO_WATCH, SecretMethod};

use super::{
    file::emit_secret,
    task::{current_tgid, is_self, tp_field},
};

/// First syscall argument in every `syscalls:sys_enter_*` format; each next one 8 bytes on.
const ARG0: usize = 16;
const ARG1: usize = 24;

const PTRACE_PEEKTEXT: u64 = 1;
const PTRACE_PEEKDATA: u64 = 2;
const PTRACE_PEEKUSR: u64 = 3;
const PTRACE_GETREGS: u64 = 12;
const PTRACE_ATTACH: u64 = 16;
const PTRACE_GETREGSET: u64 = 0x4204;
const PTRACE_SEIZE: u64 = 0x4206;
const KEYCTL_READ: u64 = 11;

/// `ptrace(long request, long pid, unsigned long addr, unsigned long data)`.
#[tracepoint(category = "syscalls", name = "sys_enter_ptrace")]
pub fn sys_enter_ptrace(ctx: TracePointContext) -> u32 {
    match try_ptrace(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_ptrace(ctx: &TracePointContext) -> Result<(), i64> {
    let (request, pid): (u64, u64) = (tp_field(ctx, ARG0), tp_field(ctx, ARG1));
    if !matches!(
        request,
        PTRACE_ATTACH
            | PTRACE_SEIZE
            | PTRACE_PEEKTEXT
            | PTRACE_PEEKDATA
            | PTRACE_PEEKUSR
            | PTRACE_GETREGS
            | PTRACE_GETREGSET
    ) {
        return Ok(());
    }
    report(SecretMethod::Ptrace, pid as u32, request)
}

/// `process_vm_readv(pid_t pid, …)`.
#[tracepoint(category = "syscalls", name = "sys_enter_process_vm_readv")]
pub fn sys_enter_process_vm_readv(ctx: TracePointContext) -> u32 {
    let pid: u64 = tp_field(&ctx, ARG0);
    match report(SecretMethod::ProcessVmReadv, pid as u32, 0) {
        Ok(()) | Err(_) => 0,
    }
}

/// `keyctl(int option, unsigned long arg2, …)`: KEYCTL_READ of key `arg2`.
#[tracepoint(category = "syscalls", name = "sys_enter_keyctl")]
pub fn sys_enter_keyctl(ctx: TracePointContext) -> u32 {
    match try_keyctl(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_keyctl(ctx: &TracePointContext) -> Result<(), i64> {
    let (option, key): (u64, u64) = (tp_field(ctx, ARG0), tp_field(ctx, ARG1));
    if option as u32 as u64 != KEYCTL_READ {
        return Ok(());
    }
    report(SecretMethod::Keyctl, 0, key as u32 as u64)
}

#[inline(always)]
fn report(method: SecretMethod, target: u32, detail: u64) -> Result<(), i64> {
    let tgid = current_tgid();
    if is_self(tgid) || (target != 0 && target == tgid) {
        return Ok(());
    }
    emit_secret(tgid, method, target, detail, 0, NO_WATCH)
}
