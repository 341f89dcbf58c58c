//! Shared `#[repr(C)]` types. Layout changes must bump [`ABI_VERSION`].

use core::mem::size_of;

/// Bumped whenever a type in this module changes layout; the sensor refuses objects (and pinned
/// maps) of another version.
pub const ABI_VERSION: u32 = 14;

/// Longest path copied from the kernel (exec file name), NUL included.
pub const PATH_LEN: usize = 256;
/// Longest single path component (dentry name) copied from the kernel, NUL included.
pub const NAME_LEN: usize = 128;
/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;
/// Bytes of a process's arguments an exec record carries.
pub const ARGS_LEN: usize = 512;
/// Bytes of the executed file's own name an exec record carries.
pub const EXE_NAME_LEN: usize = 64;
/// Watch id meaning "no watch".
pub const NO_WATCH: u32 = u32::MAX;

/// Event kinds. Numbers are part of the ABI and are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    /// A task finished `execve` (`sched:sched_process_exec`).
    Exec = 1,
    /// A new process (not a thread) was created.
    Fork = 2,
    /// A process (its thread-group leader) exited.
    Exit = 3,
    /// A watched file, or a file in a watched directory, was opened.
    FileOpen = 4,
    /// Another process's secrets were touched (/proc environ/mem, ptrace, process_vm_readv,
    /// keyctl read, watched unix socket).
    Secret = 5,
    /// A connect or UDP send to a watched endpoint.
    Connect = 6,
    /// A setuid-family or capset syscall succeeded; the record holds the credentials after it.
    CredChange = 7,
}

impl EventKind {
    /// Every kind, for per-kind counters and reports.
    pub const ALL: [EventKind; 7] = [
        EventKind::Exec,
        EventKind::Fork,
        EventKind::Exit,
        EventKind::FileOpen,
        EventKind::Secret,
        EventKind::Connect,
        EventKind::CredChange,
    ];

    /// Stable lower-case name, used in reports and counters.
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Exec => "exec",
            EventKind::Fork => "fork",
            EventKind::Exit => "exit",
            EventKind::FileOpen => "file_open",
            EventKind::Secret => "secret",
            EventKind::Connect => "connect",
            EventKind::CredChange => "cred_change",
        }
    }
}

impl TryFrom<u32> for EventKind {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Self::Exec,
            2 => Self::Fork,
            3 => Self::Exit,
            4 => Self::FileOpen,
            5 => Self::Secret,
            6 => Self::Connect,
            7 => Self::CredChange,
            other => return Err(other),
        })
    }
}

/// Common header of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    /// For folded kinds: always 1 here; see `total` in the payload.
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
    /// Effective uid.
    pub euid: u32,
    /// Audit login uid (`u32::MAX` when unset or unknown).
    pub login_uid: u32,
    pub _pad0: u32,
    /// `bpf_get_current_cgroup_id()`.
    pub cgroup_id: u64,
    /// `task->comm`, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// `sched:sched_process_exec`: the new program's file name as the kernel resolved it, the file
/// it is, its arguments, and the credentials after exec (the header carries uid/euid).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Thread id before exec (differs from `pid` when a non-leader thread execs).
    pub old_pid: u32,
    /// Bytes of `filename` in use, NUL excluded.
    pub filename_len: u32,
    /// `i_mode` of the executed file (setuid/setgid bits).
    pub exe_mode: u32,
    /// Effective gid after exec.
    pub egid: u32,
    /// Effective capabilities after exec.
    pub cap_effective: u64,
    /// Inode and device (kernel encoding) of the executed file; 0 when unreadable. They tell
    /// which file a relative or `/dev/fd/N` file name was.
    pub exe_ino: u64,
    pub exe_dev: u32,
    /// Bytes of `args` in use.
    pub args_len: u32,
    /// Bytes of arguments the process has (more than `args_len` when they were cut).
    pub args_total: u32,
    /// Bytes of `exe_name` in use, NUL excluded.
    pub exe_name_len: u32,
    pub filename: [u8; PATH_LEN],
    /// `argv` as the new program sees it, NUL-separated (like `/proc/PID/cmdline`), read at
    /// exec so a process that is gone before the sensor looks still has its command line.
    pub args: [u8; ARGS_LEN],
    /// The executed file's own name (its dentry), read only when `filename` is a descriptor's
    /// (`/dev/fd/N`, `/proc/…`): `memfd:NAME` for a program run from memory, which the file
    /// name does not tell once the process is gone.
    pub exe_name: [u8; EXE_NAME_LEN],
}

/// A new process: the header is the parent, `child_tgid` the child.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    pub child_tgid: u32,
    pub _pad0: u32,
}

/// A process exit: the header is the exiting leader.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// `task->exit_code` (status << 8 | signal).
    pub exit_code: u32,
    pub _pad0: u32,
}

/// How a file open matched.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileMatch {
    /// The file's (dev, ino) is watched.
    File = 1,
    /// The file's parent directory is watched for any name (a glob); the sensor filters.
    Dir = 2,
    /// The file's (parent directory, name) is watched: catches a credential replaced by
    /// atomic rename, whose inode is new, before the watch list is re-resolved.
    Name = 3,
}

impl TryFrom<u32> for FileMatch {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Self::File,
            2 => Self::Dir,
            3 => Self::Name,
            other => return Err(other),
        })
    }
}

/// Flag in a [`WATCHED_DIRS`](FileKey) value: report opens of any name in the directory.
/// Without it only names in the names map are reported.
pub const DIR_ANY_NAME: u32 = 1 << 31;

/// Key of the watched-names map: a name in a watched directory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    /// Kernel-internal `dev_t` of the directory.
    pub dev: u32,
    pub _pad0: u32,
    pub dir_ino: u64,
    /// [`name_hash`] of the name.
    pub hash: u64,
}

/// FNV-1a (64-bit) of `name` up to its first NUL; the same in kernel and user space.
#[inline(always)]
pub fn name_hash(name: &[u8; NAME_LEN]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < NAME_LEN {
        let b = name[i];
        if b == 0 {
            break;
        }
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// [`name_hash`] of a name given as bytes (truncated like the kernel copy).
pub fn name_hash_of(name: &[u8]) -> u64 {
    let mut buf = [0u8; NAME_LEN];
    let n = name.len().min(NAME_LEN - 1);
    buf[..n].copy_from_slice(&name[..n]);
    name_hash(&buf)
}

/// A watched file was opened. Folded: `total` counts every open of this (process, file) since
/// the fold entry was created; userspace turns it into a delta.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileOpenEvent {
    pub header: EventHeader,
    pub watch_id: u32,
    /// [`FileMatch`] as `u32`.
    pub matched: u32,
    /// `f_flags` of the opened file.
    pub flags: u32,
    /// Kernel-internal `dev_t` of the file's superblock.
    pub dev: u32,
    pub ino: u64,
    /// Inode of the parent directory.
    pub parent_ino: u64,
    /// Cumulative opens for this fold key.
    pub total: u64,
    /// Bytes of `name` in use.
    pub name_len: u32,
    pub _pad0: u32,
    /// The opened dentry's name.
    pub name: [u8; NAME_LEN],
}

/// Set on a secret fold key's method when its target is the caller's own number for a process
/// whose host pid was not found.
pub const SECRET_NS_NAMED: u32 = 1 << 31;

/// How another process's secrets were touched.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretMethod {
    ProcEnviron = 1,
    ProcMem = 2,
    Ptrace = 3,
    ProcessVmReadv = 4,
    Keyctl = 5,
    UnixSocket = 6,
    ProcessVmWritev = 7,
}

impl TryFrom<u32> for SecretMethod {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Self::ProcEnviron,
            2 => Self::ProcMem,
            3 => Self::Ptrace,
            4 => Self::ProcessVmReadv,
            5 => Self::Keyctl,
            6 => Self::UnixSocket,
            7 => Self::ProcessVmWritev,
            other => return Err(other),
        })
    }
}

/// Another process's secrets were touched. Folded like [`FileOpenEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SecretEvent {
    pub header: EventHeader,
    /// [`SecretMethod`] as `u32`.
    pub method: u32,
    /// The process whose secrets were touched (0 when not known, e.g. keyctl).
    pub target_pid: u32,
    /// ptrace request, keyctl key serial, unix socket inode…
    pub detail: u64,
    pub total: u64,
    /// For unix sockets: the watch id; otherwise [`NO_WATCH`].
    pub watch_id: u32,
    /// `f_flags` for /proc opens.
    pub flags: u32,
    /// The target as the caller named it, where the caller's pid namespace is not the host's
    /// (ptrace and process_vm_readv from a container); 0 otherwise. `target_pid` is then the
    /// host pid the kernel found for it, 0 when it found none.
    pub ns_pid: u32,
    pub _pad0: u32,
}

/// A connect (or UDP send) to a watched endpoint. Folded like [`FileOpenEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    pub header: EventHeader,
    pub watch_id: u32,
    /// IPPROTO_TCP (6) or IPPROTO_UDP (17).
    pub protocol: u32,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u32,
    /// Destination port, host byte order.
    pub port: u32,
    /// Destination address; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    pub total: u64,
}

/// Which credential syscall succeeded.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredSyscall {
    Setuid = 1,
    Setreuid = 2,
    Setresuid = 3,
    Setfsuid = 4,
    Setgid = 5,
    Setregid = 6,
    Setresgid = 7,
    Setfsgid = 8,
    Capset = 9,
}

impl CredSyscall {
    pub const fn name(self) -> &'static str {
        match self {
            CredSyscall::Setuid => "setuid",
            CredSyscall::Setreuid => "setreuid",
            CredSyscall::Setresuid => "setresuid",
            CredSyscall::Setfsuid => "setfsuid",
            CredSyscall::Setgid => "setgid",
            CredSyscall::Setregid => "setregid",
            CredSyscall::Setresgid => "setresgid",
            CredSyscall::Setfsgid => "setfsgid",
            CredSyscall::Capset => "capset",
        }
    }
}

impl TryFrom<u32> for CredSyscall {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Self::Setuid,
            2 => Self::Setreuid,
            3 => Self::Setresuid,
            4 => Self::Setfsuid,
            5 => Self::Setgid,
            6 => Self::Setregid,
            7 => Self::Setresgid,
            8 => Self::Setfsgid,
            9 => Self::Capset,
            other => return Err(other),
        })
    }
}

/// Credentials after a successful credential syscall; the sensor compares with what it knew.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CredChangeEvent {
    pub header: EventHeader,
    /// [`CredSyscall`] as `u32`.
    pub syscall: u32,
    pub egid: u32,
    pub cap_effective: u64,
}

/// Key of the watched-file and watched-directory maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// Kernel-internal `dev_t`: `(major << 20) | minor`.
    pub dev: u32,
    pub _pad0: u32,
    pub ino: u64,
}

/// LPM trie key data for watched endpoints: the destination port (0 for "any port", matched by
/// a second lookup) then the address, IPv4 as IPv4-mapped IPv6. Big-endian throughout, so the
/// prefix covers the port (16 bits) and then the address bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointKey {
    pub port_be: [u8; 2],
    pub addr: [u8; 16],
    pub _pad0: [u8; 2],
}

/// What a watched endpoint matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointValue {
    pub watch_id: u32,
    /// Bit 0: TCP, bit 1: UDP.
    pub protocols: u32,
}

pub const PROTO_TCP: u32 = 1;
pub const PROTO_UDP: u32 = 2;

/// Key of the in-kernel fold map: repeats of the same (process, kind, object) within the fold
/// window become one record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FoldKey {
    pub tgid: u32,
    pub kind: u32,
    /// Inode, target pid, or address hash, by kind.
    pub object: u64,
    /// Device, method, or port, by kind.
    pub qualifier: u64,
}

impl FoldKey {
    /// A watched file opened by `tgid`.
    #[inline(always)]
    pub const fn file(tgid: u32, dev: u32, ino: u64) -> Self {
        Self { tgid, kind: EventKind::FileOpen as u32, object: ino, qualifier: dev as u64 }
    }

    /// `tgid` touching `target`'s secrets by `method` (`detail`: ptrace request, key serial…).
    /// `target` is the host pid; `ns_pid` the caller's own number for it (see
    /// [`SecretEvent::ns_pid`]), which stands in, marked, when no host pid was found.
    #[inline(always)]
    pub const fn secret(tgid: u32, method: u32, target: u32, ns_pid: u32, detail: u64) -> Self {
        let unresolved = target == 0 && ns_pid != 0;
        let (target, method) =
            if unresolved { (ns_pid, method | SECRET_NS_NAMED) } else { (target, method) };
        Self {
            tgid,
            kind: EventKind::Secret as u32,
            object: ((target as u64) << 32) | method as u64,
            qualifier: detail,
        }
    }

    /// `tgid` connecting to a watched endpoint.
    #[inline(always)]
    pub fn connect(tgid: u32, addr: &[u8; 16], protocol: u32, port: u32) -> Self {
        let mut hi = [0u8; 8];
        let mut lo = [0u8; 8];
        hi.copy_from_slice(&addr[0..8]);
        lo.copy_from_slice(&addr[8..16]);
        Self {
            tgid,
            kind: EventKind::Connect as u32,
            object: u64::from_ne_bytes(hi) ^ u64::from_ne_bytes(lo).rotate_left(17),
            qualifier: ((protocol as u64) << 16) | port as u64,
        }
    }
}

/// Fold state: `total` counts every occurrence; a record is emitted at most once per window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FoldState {
    pub total: u64,
    pub last_emit_ns: u64,
    /// Records of this key that found the ring full (also in the per-kind `LOST` counts): the
    /// sensor then knows the key's newest record is not still in the ring on its way.
    pub lost_records: u64,
}

/// An offset the running kernel does not have (the programs that need it do nothing).
pub const NO_OFFSET: u32 = u32::MAX;

/// Kernel struct member offsets, read from the running kernel's BTF at start-up and handed to
/// the programs as a global, so one object works across kernel versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_pid: u32,
    /// `task_struct.cred` (the effective, subjective credentials).
    pub task_cred: u32,
    /// `task_struct.loginuid`, 0 when the kernel has no audit support.
    pub task_loginuid: u32,
    pub task_files: u32,
    pub task_mm: u32,
    pub task_exit_code: u32,
    pub cred_euid: u32,
    pub cred_egid: u32,
    pub cred_cap_effective: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub file_f_inode: u32,
    pub file_f_flags: u32,
    /// `file.f_path.dentry` (offset of f_path plus offset of path.dentry).
    pub file_dentry: u32,
    pub mm_exe_file: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    /// `dentry.d_name.name`.
    pub dentry_name: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub inode_i_mode: u32,
    pub sb_s_dev: u32,
    pub sb_s_magic: u32,
    /// `file.private_data` (the `struct socket` of a socket file).
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`.
    pub sock_family: u32,
    pub sock_peer_pid: u32,
    /// `unix_sock.peer`.
    pub unix_peer: u32,
    /// `unix_sock.path.dentry`.
    pub unix_path_dentry: u32,
    /// `pid.numbers[0].nr`.
    pub pid_nr: u32,
    /// `io_kiocb.opcode`; [`NO_OFFSET`] when the kernel has no io_uring.
    pub io_kiocb_opcode: u32,
    /// `io_open.file_slot` (in the request's command area): non-zero for an open into a
    /// fixed-file slot, whose result is not an fd.
    pub io_open_file_slot: u32,
    /// `io_kiocb.file`: the file a request works on (the socket of a connect).
    pub io_kiocb_file: u32,
    /// `dentry.d_name.len`.
    pub dentry_name_len: u32,
    /// `vm_area_struct.vm_file`: the `struct file *` member through which an fd table slot is
    /// loaded as a BTF pointer ([`SensorConfig::slot_btf_id`]).
    pub vma_vm_file: u32,
    /// `pt_regs.di` and `pt_regs.si`: the first two syscall arguments as the caller passed them
    /// (x86-64), read at syscall exit; [`NO_OFFSET`] elsewhere.
    pub pt_regs_di: u32,
    pub pt_regs_si: u32,
    /// `mm_struct.arg_start` and `arg_end`: where a process's arguments lie in its memory.
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    /// `io_kiocb.ctx`, the request's ring; [`NO_OFFSET`] without io_uring.
    pub io_kiocb_ctx: u32,
    /// `io_ring_ctx.file_table.data.nr` and `.nodes`: the ring's fixed-file table (6.13+
    /// layout; [`NO_OFFSET`] elsewhere, where opens into fixed slots stay unseen).
    pub io_ctx_files_nr: u32,
    pub io_ctx_files_nodes: u32,
    /// `io_rsrc_node.file_ptr`: a fixed slot's file, flags in its two low bits.
    pub io_rsrc_node_file_ptr: u32,
    /// `io_kiocb.flags` (`REQ_F_*`); [`NO_OFFSET`] without io_uring.
    pub io_kiocb_flags: u32,
    /// How far a procfs inode's `struct pid *` (`proc_inode.pid`) lies before the inode itself
    /// (`proc_inode.vfs_inode`): the process a `/proc/<pid>/…` file belongs to, whichever
    /// procfs instance and pid namespace it was opened in. [`NO_OFFSET`] when unknown.
    pub proc_inode_pid_back: u32,
    /// `task_struct.thread_pid`, `pid.level`, `pid.numbers`, the size of a `struct upid` and
    /// `upid.ns`: a task's pid namespace and its number there. [`NO_OFFSET`] in
    /// `task_thread_pid` when unknown.
    pub task_thread_pid: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
    pub upid_ns: u32,
    /// A pid namespace's pids by number: `pid_namespace.idr`'s root (`idr_rt.xa_head`) and
    /// `idr_base`, and in each tree node `xa_node.shift` and `xa_node.slots`, of
    /// `xa_slots_len` (a power of two) entries.
    pub pidns_idr_head: u32,
    pub pidns_idr_base: u32,
    pub xa_node_shift: u32,
    pub xa_node_slots: u32,
    pub xa_slots_len: u32,
    /// `ovl_file.realfile`: where an overlayfs file's `private_data` holds the file of the layer
    /// below it stands for; [`NO_OFFSET`] on kernels whose `private_data` is that file itself.
    pub ovl_file_realfile: u32,
    /// How far a btrfs inode's `struct btrfs_root *` (`btrfs_inode.root`) lies before the
    /// inode itself (`btrfs_inode.vfs_inode`), and `btrfs_root.anon_dev`: the device `stat`
    /// gives the files of a btrfs subvolume, which number their inodes each from 256.
    /// [`NO_OFFSET`] in `btrfs_inode_root_back` without btrfs.
    pub btrfs_inode_root_back: u32,
    pub btrfs_root_anon_dev: u32,
}

/// Largest run of a kernel struct read with one `bpf_probe_read_kernel` (a [`ReadWindow`]).
pub const READ_WINDOW_MAX: u32 = 128;

/// Bytes `base..base + len` of a kernel struct, covering several fields the programs need, read
/// with one `bpf_probe_read_kernel` instead of one per field. Computed by the loader from BTF
/// offsets: `base` is 8-aligned, every covered field sits at its natural alignment from `base`,
/// and `len` ≤ [`READ_WINDOW_MAX`]. `len == 0` when the fields are too far apart: the programs
/// then read the fields one by one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadWindow {
    pub base: u32,
    pub len: u32,
}

/// The read windows of the file-open path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadWindows {
    /// `file`: `f_inode`, `f_flags`, `f_path.dentry`.
    pub file: ReadWindow,
    /// `inode`: `i_sb`, `i_ino`.
    pub inode: ReadWindow,
    /// `super_block`: `s_dev`, `s_magic`.
    pub sb: ReadWindow,
    /// `dentry`: `d_parent`, `d_name.len`, `d_name.name`, `d_inode`.
    pub dentry: ReadWindow,
}

/// Words (`u64`) of the `WATCH_FILTER` bitmap: 2^18 bits.
pub const FILTER_WORDS: u32 = 4096;

/// The `WATCH_FILTER` word and bit of an inode number. The filter holds a bit for the inode of
/// every watched file and watched directory (any device), so the open hook decides "not
/// watched" for nearly every open with one inlined array read instead of reading the
/// superblock and probing two hash maps; a set bit only means "look it up".
#[inline(always)]
pub fn filter_slot(ino: u64) -> (u32, u64) {
    // Fibonacci hashing: the top 18 bits of the product spread consecutive inode numbers.
    let bit = ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - 18);
    ((bit >> 6) as u32, 1u64 << (bit & 63))
}

/// Index in the `RUNTIME` array map of the sensor's own thread-group id, whose activity is never
/// reported. A map, not a global: a restarted sensor adopting pinned programs updates it.
pub const RUNTIME_SELF_TGID: u32 = 0;

/// `META` map value: what pinned maps and links were made by, so a restarted sensor adopts
/// only what it is compatible with.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinMeta {
    pub abi_version: u32,
    pub _pad0: u32,
    /// SHA-256 of the eBPF object.
    pub object_sha256: [u8; 32],
}

/// Globals the loader sets before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SensorConfig {
    /// Repeats of a fold key within this many nanoseconds produce no new record.
    pub fold_window_ns: u64,
    pub offsets: KernelOffsets,
    pub windows: ReadWindows,
    /// 1 when the kernel lets these programs walk `task_struct` through BTF pointers
    /// (`bpf_get_current_task_btf`): the verifier checks each load against the kernel's types
    /// and compiles it to a plain load instead of a `bpf_probe_read_kernel` call.
    pub task_btf: u32,
    /// The kernel's BTF id of `struct vm_area_struct`. An fd table slot (a `struct file *`)
    /// is retyped with [`KFUNC_RDONLY_CAST_CALL`] as the `vm_file` member of a
    /// `vm_area_struct` placed over it, so loading that member yields the file as a BTF
    /// pointer: any struct with a `struct file *` member would do, this one is stable.
    pub slot_btf_id: u32,
    /// 1 when the secret-access syscall hooks run at syscall exit and read their arguments from
    /// the task's saved registers (`bpf_task_pt_regs`, 5.15+): then no syscall enter
    /// tracepoint is used at all, which spares every syscall on the host its enter-side call.
    pub args_at_exit: u32,
    /// The kernel's BTF id of `struct socket`: a socket file's `private_data` (a `void *`)
    /// retyped with [`KFUNC_RDONLY_CAST_CALL`], so the connect exit hook reads the socket's
    /// family with plain loads instead of a user-memory read of the caller's address. 0 when
    /// absent (then it reads the address).
    pub socket_btf_id: u32,
}

/// Placeholder of a call to the kfunc `bpf_rdonly_cast(obj, btf_id)` (kernel 6.2+), which
/// turns a kernel address into a BTF pointer the programs may load from directly. A kfunc is
/// called by its BTF id, which differs per kernel: the programs emit this instruction
/// (`call`, src = kfunc, imm = a marker) and the loader patches the imm with the running
/// kernel's id, or replaces the whole call with `r0 = 0` (a NULL result) when the kernel does
/// not have the kfunc. Little-endian instruction bytes as one `u64`.
pub const KFUNC_RDONLY_CAST_CALL: u64 = (KFUNC_MARKER_RDONLY_CAST as u64) << 32 | 0x2085;
/// The marker imm of [`KFUNC_RDONLY_CAST_CALL`].
pub const KFUNC_MARKER_RDONLY_CAST: u32 = 0x6b77_ca57;
/// `r0 = 0`: what replaces a kfunc call the kernel does not have.
pub const INSN_R0_ZERO: u64 = 0xb7;

// Layout guards: a change here is a change of ABI_VERSION.
const _: () = assert!(size_of::<EventHeader>() == 72);
const _: () = assert!(size_of::<ExecEvent>() == 72 + 48 + PATH_LEN + ARGS_LEN + EXE_NAME_LEN);
const _: () = assert!(size_of::<ForkEvent>() == 80);
const _: () = assert!(size_of::<ExitEvent>() == 80);
const _: () = assert!(size_of::<FileOpenEvent>() == 72 + 48 + NAME_LEN);
const _: () = assert!(size_of::<SecretEvent>() == 72 + 40);
const _: () = assert!(size_of::<ConnectEvent>() == 72 + 40);
const _: () = assert!(size_of::<CredChangeEvent>() == 72 + 16);
const _: () = assert!(size_of::<FileKey>() == 16);
const _: () = assert!(size_of::<EndpointKey>() == 20);
const _: () = assert!(size_of::<FoldKey>() == 24);
const _: () = assert!(size_of::<FoldState>() == 24);
const _: () = assert!(size_of::<NameKey>() == 24);
const _: () = assert!(size_of::<KernelOffsets>() == 60 * 4);
const _: () = assert!(size_of::<ReadWindow>() == 8);
const _: () = assert!(size_of::<ReadWindows>() == 4 * 8);
const _: () = assert!(size_of::<SensorConfig>() == 8 + 60 * 4 + 4 * 8 + 16);
const _: () = assert!(FILTER_WORDS == 1 << (18 - 6));

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, `#[repr(C)]`, no implicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::ExitEvent {}
    unsafe impl aya::Pod for super::FileOpenEvent {}
    unsafe impl aya::Pod for super::SecretEvent {}
    unsafe impl aya::Pod for super::ConnectEvent {}
    unsafe impl aya::Pod for super::CredChangeEvent {}
    unsafe impl aya::Pod for super::FileKey {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::FoldKey {}
    unsafe impl aya::Pod for super::NameKey {}
    unsafe impl aya::Pod for super::FoldState {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ReadWindow {}
    unsafe impl aya::Pod for super::ReadWindows {}
    unsafe impl aya::Pod for super::SensorConfig {}
    unsafe impl aya::Pod for super::PinMeta {}
}
