//! Shared `#[repr(C)]` types. Layout changes must bump [`ABI_VERSION`].

use core::mem::size_of;

/// Bumped whenever a type in this module changes layout; the sensor refuses objects (and pinned
/// maps) of another version.
pub const ABI_VERSION: u32 = 1;

/// Longest path or file name copied from the kernel, NUL included.
pub const PATH_LEN: usize = 256;
/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;

/// Event kinds. Numbers are part of the ABI and are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A task finished `execve` (`sched:sched_process_exec`).
    Exec = 1,
}

impl EventKind {
    /// Every kind, for per-kind counters and reports.
    pub const ALL: [EventKind; 1] = [EventKind::Exec];
}

impl TryFrom<u32> for EventKind {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Exec),
            other => Err(other),
        }
    }
}

/// Common header of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    /// Repeats folded into this record (1 for a single occurrence).
    pub count: u32,
    /// `bpf_ktime_get_boot_ns()` at the event.
    pub ktime_ns: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id (thread-group id).
    pub tgid: u32,
    /// Process id of the real parent.
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    pub _pad0: u32,
    /// `bpf_get_current_cgroup_id()`.
    pub cgroup_id: u64,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// `sched:sched_process_exec`: the new program's file name as the kernel resolved it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Thread id before exec (differs from `pid` when a non-leader thread execs).
    pub old_pid: u32,
    /// Bytes of `filename` in use, NUL excluded.
    pub filename_len: u32,
    pub filename: [u8; PATH_LEN],
}

/// Kernel struct member offsets, read from the running kernel's BTF at start-up and handed to
/// the programs as a global, so one object works across kernel versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.real_parent`
    pub task_real_parent: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
}

/// Globals the loader sets before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SensorConfig {
    /// Thread-group id of the sensor itself; its own activity is never reported.
    pub self_tgid: u32,
    pub _pad0: u32,
    pub offsets: KernelOffsets,
}

// Layout guards: a change here is a change of ABI_VERSION.
const _: () = assert!(size_of::<EventHeader>() == 64);
const _: () = assert!(size_of::<ExecEvent>() == 64 + 8 + PATH_LEN);
const _: () = assert!(size_of::<KernelOffsets>() == 8);
const _: () = assert!(size_of::<SensorConfig>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, `#[repr(C)]`, no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::SensorConfig {}
}
