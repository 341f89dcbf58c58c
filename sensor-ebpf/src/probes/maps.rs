//! Maps and globals shared by every program.

use aya_ebpf::{
    Global,
    bindings::BPF_RB_NO_WAKEUP,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use sensor_ebpf::{
    EndpointKey, EndpointValue, EventKind, FILTER_WORDS, FileKey, FoldKey, FoldState,
    KernelOffsets, NAME_LEN, NameKey, PinMeta, ReadWindows, SensorConfig, filter_slot,
};

use super::kread::NO_WINDOW;

/// Ring buffer of event records; userspace sizes it at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Per-CPU count of records that could not be reserved, indexed by [`EventKind`] number.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(16, 0);

/// Watched files by (dev, ino) → watch id.
#[map]
pub static WATCHED_FILES: HashMap<FileKey, u32> = HashMap::with_max_entries(16384, 0);

/// One bit per inode number of a watched file or directory, in front of the hash maps
/// ([`sensor_ebpf::filter_slot`]); kept by the sensor together with them.
#[map]
pub static WATCH_FILTER: Array<u64> = Array::with_max_entries(FILTER_WORDS, 0);

/// Watched directories by (dev, ino) → watch id, with [`sensor_ebpf::DIR_ANY_NAME`] when any
/// name matches; otherwise the name must be in [`WATCHED_NAMES`].
#[map]
pub static WATCHED_DIRS: HashMap<FileKey, u32> = HashMap::with_max_entries(4096, 0);

/// Watched names in watched directories → watch id.
#[map]
pub static WATCHED_NAMES: HashMap<NameKey, u32> = HashMap::with_max_entries(16384, 0);

/// Per-CPU scratch space for a dentry name (too large for the BPF stack next to the rest).
#[map]
pub static NAME_SCRATCH: PerCpuArray<[u8; NAME_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// Watched unix sockets (ssh-agent, docker.sock, vault agent) by the socket file's (dev, ino).
#[map]
pub static WATCHED_SOCKETS: HashMap<FileKey, u32> = HashMap::with_max_entries(1024, 0);

/// fd of an in-flight connect(2) to a unix address, by pid_tgid, for the exit hook.
#[map]
pub static CONNECT_FDS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(4096, 0);

/// Per destination port (host order), non-zero when some entry of [`ENDPOINTS`] has that
/// port; index 0 for entries of any port. Every connect and UDP send on the host passes the
/// endpoint hooks, nearly all to ports no entry has: this array look-up (inlined by the
/// verifier) spares them the trie. It may say yes for a port whose entries are gone (the trie
/// then says no), never no for a watched one.
#[map]
pub static ENDPOINT_PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// Watched endpoints (port + address prefix).
#[map]
pub static ENDPOINTS: LpmTrie<EndpointKey, EndpointValue> =
    LpmTrie::with_max_entries(4096, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Fold state per (process, kind, object).
#[map]
pub static FOLD: LruHashMap<FoldKey, FoldState> = LruHashMap::with_max_entries(16384, 0);

/// Set by the sensor after load, updated by a restarted sensor that adopts pinned programs.
#[map]
pub static RUNTIME: Array<u32> = Array::with_max_entries(1, 0);

/// What made the pinned maps and links ([`sensor_ebpf::PinMeta`]); written by the sensor only.
#[map]
pub static META: Array<PinMeta> = Array::with_max_entries(1, 0);

/// The fold totals the sensor has reported, checkpointed by the sensor only, so that a
/// restarted sensor continues the counts instead of repeating them.
#[map]
pub static FOLD_REPORTED: LruHashMap<FoldKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Set by the loader before load.
#[unsafe(no_mangle)]
pub static CONFIG: Global<SensorConfig> = Global::new(SensorConfig {
    fold_window_ns: 1_000_000_000,
    offsets: ZERO_OFFSETS,
    windows: NO_WINDOWS,
    task_btf: 0,
    slot_btf_id: 0,
    args_at_exit: 0,
    socket_btf_id: 0,
});

const NO_WINDOWS: ReadWindows =
    ReadWindows { file: NO_WINDOW, inode: NO_WINDOW, sb: NO_WINDOW, dentry: NO_WINDOW };

const ZERO_OFFSETS: KernelOffsets = KernelOffsets {
    task_real_parent: 0,
    task_tgid: 0,
    task_pid: 0,
    task_cred: 0,
    task_loginuid: 0,
    task_files: 0,
    task_mm: 0,
    task_exit_code: 0,
    cred_euid: 0,
    cred_egid: 0,
    cred_cap_effective: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    file_f_inode: 0,
    file_f_flags: 0,
    file_dentry: 0,
    mm_exe_file: 0,
    dentry_d_parent: 0,
    dentry_d_inode: 0,
    dentry_name: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    inode_i_mode: 0,
    sb_s_dev: 0,
    sb_s_magic: 0,
    file_private_data: 0,
    socket_sk: 0,
    sock_family: 0,
    sock_peer_pid: 0,
    unix_peer: 0,
    unix_path_dentry: 0,
    pid_nr: 0,
    io_kiocb_opcode: 0,
    io_open_file_slot: 0,
    io_kiocb_file: 0,
    dentry_name_len: 0,
    vma_vm_file: 0,
    pt_regs_di: 0,
    pt_regs_si: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    io_kiocb_ctx: 0,
    io_ctx_files_nr: 0,
    io_ctx_files_nodes: 0,
    io_rsrc_node_file_ptr: 0,
    io_kiocb_flags: 0,
    proc_inode_pid_back: 0,
    task_thread_pid: 0,
    pid_level: 0,
    pid_numbers: 0,
    upid_size: 0,
    upid_ns: 0,
    pidns_idr_head: 0,
    pidns_idr_base: 0,
    xa_node_shift: 0,
    xa_node_slots: 0,
    xa_slots_len: 0,
    ovl_file_realfile: 0,
    btrfs_inode_root_back: 0,
    btrfs_root_anon_dev: 0,
};

/// The loader's configuration, read field by field where used. `Global::load` copies the whole
/// struct with volatile loads on every call; the opaque pointer keeps the compiler from folding
/// the (load-time overridden) initializer into the code instead.
#[inline(always)]
fn config() -> &'static SensorConfig {
    let p: *const SensorConfig = core::hint::black_box((&raw const CONFIG).cast());
    // SAFETY: `Global<T>` is a transparent wrapper of an initialized `T`, never written by the
    // programs.
    unsafe { &*p }
}

/// The offsets the loader found in this kernel's BTF.
#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    &config().offsets
}

/// The read windows the loader computed from those offsets.
#[inline(always)]
pub fn windows() -> &'static ReadWindows {
    &config().windows
}

/// True when the programs may walk `task_struct` through BTF pointers
/// ([`SensorConfig::task_btf`]); a constant to the verifier, which checks only the branch taken.
#[inline(always)]
pub fn task_btf() -> bool {
    config().task_btf != 0
}

/// True when syscall arguments are read at exit ([`SensorConfig::args_at_exit`]).
#[inline(always)]
pub fn args_at_exit() -> bool {
    config().args_at_exit != 0
}

/// The kernel's BTF id of `struct vm_area_struct` ([`SensorConfig::slot_btf_id`]).
#[inline(always)]
pub fn slot_btf_id() -> u32 {
    config().slot_btf_id
}

/// The kernel's BTF id of `struct socket` ([`SensorConfig::socket_btf_id`]).
#[inline(always)]
pub fn socket_btf_id() -> u32 {
    config().socket_btf_id
}

/// False only when no watched file or directory has this inode number (see
/// [`sensor_ebpf::filter_slot`]).
#[inline(always)]
pub fn maybe_watched(ino: u64) -> bool {
    let (word, bit) = filter_slot(ino);
    WATCH_FILTER.get(word).is_none_or(|&w| w & bit != 0)
}

/// Repeats of a fold key within this many nanoseconds produce no new record.
#[inline(always)]
pub fn fold_window_ns() -> u64 {
    config().fold_window_ns
}

/// Records are submitted without waking the reader: a wakeup per record costs several times
/// the event itself; the sensor polls on a short timer instead.
pub const SUBMIT_FLAGS: u64 = BPF_RB_NO_WAKEUP as u64;

/// Counts one record of `kind` that found the ring buffer full.
#[inline(always)]
pub fn count_lost(kind: EventKind) {
    if let Some(slot) = LOST.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
