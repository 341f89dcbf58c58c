//! Secret access across processes by syscall: ptrace attach/seize/peek, process_vm_readv,
//! process_vm_writev (code injected without any ptrace attach) and keyctl reads — attempts, whether or not they succeed (a failed one is itself worth
//! knowing). The arguments are what matters: exit hooks read them from the task's saved
//! registers where the kernel allows ([`super::maps::args_at_exit`]), enter hooks from the
//! record elsewhere; the loader attaches one set or the other.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use sensor_ebpf::{NO_WATCH, SecretMethod};

use super::{
    file::{Target, emit_secret},
    pidns::{host_pid, own_pid_namespace},
    task::{current_tgid, exit_args, is_self, tp_field},
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

#[tracepoint(category = "syscalls", name = "sys_exit_ptrace")]
pub fn sys_exit_ptrace(_ctx: TracePointContext) -> u32 {
    match exit_args().and_then(|(request, pid)| ptrace(request, pid)) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_ptrace(ctx: &TracePointContext) -> Result<(), i64> {
    ptrace(tp_field(ctx, ARG0), tp_field(ctx, ARG1))
}

#[inline(always)]
fn ptrace(request: u64, pid: u64) -> Result<(), i64> {
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
    vm_access_entered(&ctx, SecretMethod::ProcessVmReadv)
}

#[tracepoint(category = "syscalls", name = "sys_exit_process_vm_readv")]
pub fn sys_exit_process_vm_readv(_ctx: TracePointContext) -> u32 {
    vm_access_exited(SecretMethod::ProcessVmReadv)
}

/// `process_vm_writev(pid_t pid, …)`: writing another process's memory — injecting code that
/// then reads its secrets from inside.
#[tracepoint(category = "syscalls", name = "sys_enter_process_vm_writev")]
pub fn sys_enter_process_vm_writev(ctx: TracePointContext) -> u32 {
    vm_access_entered(&ctx, SecretMethod::ProcessVmWritev)
}

#[tracepoint(category = "syscalls", name = "sys_exit_process_vm_writev")]
pub fn sys_exit_process_vm_writev(_ctx: TracePointContext) -> u32 {
    vm_access_exited(SecretMethod::ProcessVmWritev)
}

/// Another process's memory read or written, its pid the first argument of the enter record.
#[inline(always)]
fn vm_access_entered(ctx: &TracePointContext, method: SecretMethod) -> u32 {
    let pid: u64 = tp_field(ctx, ARG0);
    match report(method, pid as u32, 0) {
        Ok(()) | Err(_) => 0,
    }
}

/// The same, the pid read from the saved registers at syscall exit.
#[inline(always)]
fn vm_access_exited(method: SecretMethod) -> u32 {
    match exit_args().and_then(|(pid, _)| report(method, pid as u32, 0)) {
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

#[tracepoint(category = "syscalls", name = "sys_exit_keyctl")]
pub fn sys_exit_keyctl(_ctx: TracePointContext) -> u32 {
    match exit_args().and_then(|(option, key)| keyctl(option, key)) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_keyctl(ctx: &TracePointContext) -> Result<(), i64> {
    keyctl(tp_field(ctx, ARG0), tp_field(ctx, ARG1))
}

#[inline(always)]
fn keyctl(option: u64, key: u64) -> Result<(), i64> {
    if option as u32 as u64 != KEYCTL_READ {
        return Ok(());
    }
    report(SecretMethod::Keyctl, 0, key as u32 as u64)
}

/// `target` is a pid as the caller named it: in a container's own pid namespace, that
/// namespace's number, reported with the host pid behind it.
#[inline(always)]
fn report(method: SecretMethod, target: u32, detail: u64) -> Result<(), i64> {
    let tgid = current_tgid();
    if is_self(tgid) {
        return Ok(());
    }
    let target = match own_pid_namespace() {
        Some(ns) if target != 0 => {
            if target == ns.own {
                return Ok(()); // the caller itself
            }
            Target { pid: host_pid(ns.ns, target), ns_pid: target }
        }
        _ => Target::host(target),
    };
    if target.pid != 0 && target.pid == tgid {
        return Ok(()); // the caller's own process
    }
    emit_secret(tgid, method, target, detail, 0, NO_WATCH)
}
