//! Credential and secret files: on a successful open, the new fd is resolved to its
//! `struct file` and matched on the inode the kernel opened — so relative paths, `..`,
//! symlinks, hard links, `openat(dirfd, …)` and `/proc/self/root/…` all resolve alike.
//!
//! Exit-only: `sys_exit_open*` has the fd; an enter hook would add cost and nothing needed.
//! Cheap checks first: the inode lookups decide "not watched" before anything is copied.
//!
//! io_uring opens (`IORING_OP_OPENAT*`) never pass the open syscalls, so the completion of
//! every io_uring request is looked at too: an open's result is the new fd in the submitting
//! process's table (io_uring's workers share it), resolved exactly like a syscall's, or a
//! slot of the ring's fixed-file table, read from there.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::tracepoint, programs::TracePointContext,
};
use sensor_ebpf::{
    DIR_ANY_NAME, EventKind, FileKey, FileMatch, FileOpenEvent, FoldKey, NO_OFFSET, NO_WATCH,
    NameKey, SecretEvent, SecretMethod, name_hash,
};

use super::{
    fold, kfunc,
    kread::{self, Fields},
    maps::{
        CONNECT_FDS, EVENTS, NAME_SCRATCH, SUBMIT_FLAGS, WATCHED_DIRS, WATCHED_FILES,
        WATCHED_NAMES, WATCHED_SOCKETS, args_at_exit, count_lost, maybe_watched, offsets,
        slot_btf_id, socket_btf_id, task_btf, windows,
    },
    task::{current_task, current_task_btf, current_tgid, exit_args_of, tp_field, write_header},
};

/// `long ret` in every `syscalls:sys_exit_*` format.
const RET: usize = 16;
/// `PROC_SUPER_MAGIC`.
const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// `OVERLAYFS_SUPER_MAGIC`.
const OVERLAYFS_SUPER_MAGIC: u64 = 0x794c_7630;
/// `BTRFS_SUPER_MAGIC`.
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683e;
/// `O_PATH` in `file.f_flags`.
const O_PATH: u32 = 0o10000000;
/// `io_uring:io_uring_complete` format: `void *req` and `int res`.
const URING_REQ: usize = 16;
const URING_RES: usize = 32;
/// `IORING_OP_CONNECT`, `IORING_OP_OPENAT` and `IORING_OP_OPENAT2`
/// (`include/uapi/linux/io_uring.h`).
const IORING_OP_CONNECT: u8 = 16;
const IORING_OP_OPENAT: u8 = 18;
const IORING_OP_OPENAT2: u8 = 28;
/// The read opcodes (`IORING_OP_READV`, `_READ_FIXED`, `_READ`, `_READ_MULTISHOT`,
/// `_READV_FIXED`) and `IORING_OP_FIXED_FD_INSTALL` (6.8+), numbered by the stable UAPI.
const IORING_OP_READV: u8 = 1;
const IORING_OP_READ_FIXED: u8 = 4;
const IORING_OP_READ: u8 = 22;
const IORING_OP_READ_MULTISHOT: u8 = 49;
const IORING_OP_FIXED_FD_INSTALL: u8 = 54;
const IORING_OP_READV_FIXED: u8 = 60;
/// `REQ_F_FIXED_FILE`: the request's file came from a fixed slot. Bit 0 of the request flags
/// in every kernel, mirroring the UAPI `IOSQE_FIXED_FILE`.
const REQ_F_FIXED_FILE: u32 = 1;
/// `io_open.file_slot` asking the kernel to pick a free slot (`IORING_FILE_INDEX_ALLOC`): the
/// result is then the slot's index.
const IORING_FILE_INDEX_ALLOC: u32 = u32::MAX;
/// Flag bits in a fixed slot's `file_ptr` (`FFS_NOWAIT | FFS_ISREG`).
const FIXED_FILE_FLAGS: u64 = 0b11;

#[tracepoint(category = "syscalls", name = "sys_exit_openat")]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_openat2")]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_open")]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx)
}

/// The legacy `creat(path, mode)`: an open for writing that truncates a file already there — an
/// existing credential wiped or overwritten.
#[tracepoint(category = "syscalls", name = "sys_exit_creat")]
pub fn sys_exit_creat(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx)
}

/// Opens by file handle (`name_to_handle_at` + `open_by_handle_at`, the "shocker" escape
/// route): no path at all, so only the opened file tells what was read.
#[tracepoint(category = "syscalls", name = "sys_exit_open_by_handle_at")]
pub fn sys_exit_open_by_handle_at(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx)
}

/// An fd copied out of another process (`pidfd_getfd`): a credential that process had open
/// is as good as read, and a socket it had connected to an agent (ssh-agent, docker.sock) as
/// good as connected — without any open or connect by the taker.
#[tracepoint(category = "syscalls", name = "sys_exit_pidfd_getfd")]
pub fn sys_exit_pidfd_getfd(ctx: TracePointContext) -> u32 {
    let fd: i64 = tp_field(&ctx, RET);
    if fd >= 0 {
        let _ = on_new_fd(fd as u32);
        let _ = on_taken_socket(fd as u32);
    }
    0
}

/// `S_IFMT` and `S_IFSOCK` of `inode.i_mode`.
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// A socket taken as `fd`: a secret access when it is connected to a watched unix socket.
#[inline(always)]
fn on_taken_socket(fd: u32) -> Result<(), i64> {
    let tgid = current_tgid();
    if super::task::is_self(tgid) {
        return Ok(());
    }
    let file = file_of_fd(fd)?;
    let inode = kread::ptr(file, offsets().file_f_inode)?;
    let mode: u16 = kread::at(inode, offsets().inode_i_mode)?;
    if mode & S_IFMT != S_IFSOCK {
        return Ok(());
    }
    unix_connected(file, tgid)
}

#[inline(always)]
fn on_open_exit(ctx: &TracePointContext) -> u32 {
    let fd: i64 = tp_field(ctx, RET);
    if fd >= 0 {
        let _ = on_new_fd(fd as u32);
    }
    0
}

#[tracepoint(category = "io_uring", name = "io_uring_complete")]
pub fn io_uring_complete(ctx: TracePointContext) -> u32 {
    match try_uring_complete(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

/// A completed io_uring request. What it left the process holding, matched like an open:
/// - an open's result, the new fd — or, for an open straight into a fixed-file slot, which
///   never enters the fd table, the file in the ring's fixed-file table;
/// - a fixed-file install's result, an fd for a file that was never opened by a syscall;
/// - the file a read of a fixed-file slot read (the open may have gone unseen: an open, a read
///   and a close of one slot submitted together post their completions together, after the
///   slot was emptied). Reads of plain fds are not looked at: their open was seen.
///
/// A connect's socket is the request's file.
fn try_uring_complete(ctx: &TracePointContext) -> Result<(), i64> {
    let o = offsets();
    let res: i32 = tp_field(ctx, URING_RES);
    if res < 0 || o.io_kiocb_opcode == NO_OFFSET {
        return Ok(());
    }
    let req: *const u8 = tp_field(ctx, URING_REQ);
    let opcode: u8 = kread::at(req, o.io_kiocb_opcode)?;
    if opcode == IORING_OP_CONNECT && o.io_kiocb_file != NO_OFFSET {
        let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
        if super::task::is_self(tgid) {
            return Ok(());
        }
        return unix_connected(kread::ptr(req, o.io_kiocb_file)?, tgid);
    }
    let held = match opcode {
        IORING_OP_OPENAT | IORING_OP_OPENAT2 => match o.io_open_file_slot {
            NO_OFFSET => Held::Fd(res as u32),
            at => match kread::at::<u32>(req, at)? {
                0 => Held::Fd(res as u32),
                IORING_FILE_INDEX_ALLOC => Held::Slot(res as u32),
                slot => Held::Slot(slot - 1),
            },
        },
        IORING_OP_FIXED_FD_INSTALL => Held::Fd(res as u32),
        IORING_OP_READV
        | IORING_OP_READ_FIXED
        | IORING_OP_READ
        | IORING_OP_READ_MULTISHOT
        | IORING_OP_READV_FIXED
            if o.io_kiocb_flags != NO_OFFSET && o.io_kiocb_file != NO_OFFSET =>
        {
            // The low word of `io_req_flags_t` (u32 before 6.10, u64 since).
            if kread::at::<u32>(req, o.io_kiocb_flags)? & REQ_F_FIXED_FILE == 0 {
                return Ok(());
            }
            Held::RequestFile
        }
        _ => return Ok(()),
    };
    // One call for every case: each inlined copy of the matcher costs stack.
    let fd = match held {
        Held::Fd(fd) => Some(fd),
        _ => None,
    };
    on_new_file(fd, || match held {
        Held::Fd(fd) => file_of_fd(fd),
        Held::Slot(index) => fixed_file(req, index),
        Held::RequestFile => kread::ptr(req, o.io_kiocb_file),
    })
}

/// Where the file an io_uring request left behind is.
#[derive(Clone, Copy)]
enum Held {
    /// In the process's fd table.
    Fd(u32),
    /// In slot `n` of the ring's fixed-file table.
    Slot(u32),
    /// The request's own file (`io_kiocb.file`).
    RequestFile,
}

/// The file in fixed-file slot `index` of `req`'s ring (`ctx->file_table.data.nodes[index]`,
/// flags masked off); `Err` on kernels with another table layout.
#[inline(always)]
fn fixed_file(req: *const u8, index: u32) -> Result<*const u8, i64> {
    let o = offsets();
    if o.io_ctx_files_nodes == NO_OFFSET
        || o.io_kiocb_ctx == NO_OFFSET
        || o.io_rsrc_node_file_ptr == NO_OFFSET
    {
        return Err(-1);
    }
    let ring = kread::ptr(req, o.io_kiocb_ctx)?;
    let nr: u32 = kread::at(ring, o.io_ctx_files_nr)?;
    if index >= nr {
        return Err(-1);
    }
    let nodes = kread::ptr(ring, o.io_ctx_files_nodes)?;
    let node = kread::ptr(nodes, index.wrapping_mul(8))?;
    let file_ptr: u64 = kread::at(node, o.io_rsrc_node_file_ptr)?;
    let file = (file_ptr & !FIXED_FILE_FLAGS) as *const u8;
    if file.is_null() { Err(-1) } else { Ok(file) }
}

/// The device `inode` is known by ([`inode_dev`]) and the magic of its superblock `sb`.
#[inline(always)]
pub(super) fn superblock<F: Fields>(
    view: &mut F,
    sb: *const u8,
    inode: *const u8,
) -> Result<(u32, u64), i64> {
    let o = offsets();
    let (dev, magic) = {
        let view = view.load(sb, windows().sb)?;
        (view.at::<u32>(o.sb_s_dev)?, view.at::<u64>(o.sb_s_magic)?)
    };
    Ok((inode_dev(inode, dev, magic), magic))
}

/// The device `inode` is known by to `stat` — the sensor watches files by that device: its
/// superblock's (`sb_dev`, of a file system of `magic`), except on btrfs, whose subvolumes
/// number their inodes each from 256 and each have a device of their own
/// (`btrfs_root.anon_dev`). Helper reads: `inode` need not be a BTF pointer.
#[inline(always)]
fn inode_dev(inode: *const u8, sb_dev: u32, magic: u64) -> u32 {
    let o = offsets();
    if magic != BTRFS_SUPER_MAGIC || o.btrfs_inode_root_back == NO_OFFSET {
        return sb_dev;
    }
    let root = kread::ptr(inode.wrapping_sub(o.btrfs_inode_root_back as usize), 0);
    root.and_then(|root| kread::at::<u32>(root, o.btrfs_root_anon_dev)).unwrap_or(sb_dev)
}

/// The device `inode` is known by ([`inode_dev`]), with helper reads only.
#[inline(always)]
fn inode_dev_read(inode: *const u8) -> Result<u32, i64> {
    let o = offsets();
    let sb = kread::ptr(inode, o.inode_i_sb)?;
    let (dev, magic) = (kread::at::<u32>(sb, o.sb_s_dev)?, kread::at::<u64>(sb, o.sb_s_magic)?);
    Ok(inode_dev(inode, dev, magic))
}

/// A file just opened as `fd` in the current process: matched against the watches.
///
/// Where the kernel lets these programs hold the file as a BTF pointer ([`file_btf_of_fd`]),
/// every field is a plain load; elsewhere a helper read per struct window.
#[inline(always)]
fn on_new_fd(fd: u32) -> Result<(), i64> {
    on_new_file(Some(fd), || file_of_fd(fd))
}

/// A file just opened by the current process: as `fd` where it has one (then through BTF
/// pointers where the kernel allows), else the file `by_helpers` finds with helper reads.
#[inline(always)]
fn on_new_file(
    fd: Option<u32>,
    by_helpers: impl FnOnce() -> Result<*const u8, i64>,
) -> Result<(), i64> {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if super::task::is_self(tgid) {
        return Ok(());
    }
    if let Some(fd) = fd
        && task_btf()
        && let Some(file) = file_btf_of_fd(current_task_btf(), fd)
    {
        return match_file(&mut kread::BtfView::new(), file, pid_tgid);
    }
    match_file(&mut kread::View::new(), by_helpers()?, pid_tgid)
}

/// The file behind `fd` as a BTF pointer, where the kernel allows: the fd table is walked
/// with plain loads, and its slot — a `struct file *` at a plain address — is loaded as the
/// `vm_file` member of a `vm_area_struct` retyped over it (see
/// [`sensor_ebpf::SensorConfig::slot_btf_id`]), which yields a BTF pointer to the file.
/// `task`: the current task's BTF pointer (only where [`task_btf`] holds).
#[inline(always)]
fn file_btf_of_fd(task: *const u8, fd: u32) -> Option<*const u8> {
    let o = offsets();
    let files = kread::btf_ptr(task, o.task_files).ok()?;
    let fdt = kread::btf_ptr(files, o.files_fdt).ok()?;
    let fds = kread::btf_ptr(fdt, o.fdtable_fd).ok()?;
    let slot = fds.wrapping_add(fd as usize * 8);
    let holder = kfunc::rdonly_cast(slot.wrapping_sub(o.vma_vm_file as usize), slot_btf_id());
    if holder.is_null() {
        return None;
    }
    kread::btf_ptr(holder, o.vma_vm_file).ok()
}

/// The file behind `fd` (`current->files->fdt->fd[fd]`), read with helpers.
///
/// No `max_fds` bound check: the fd was installed by this very syscall (or, for connect, was
/// valid for it), and fd tables only grow; a stale slot reads as NULL or fails the next read.
#[inline(always)]
fn file_of_fd(fd: u32) -> Result<*const u8, i64> {
    let o = offsets();
    let files = kread::ptr(current_task(), o.task_files)?;
    let fdt = kread::ptr(files, o.files_fdt)?;
    let fds = kread::ptr(fdt, o.fdtable_fd)?;
    kread::ptr(fds, fd.wrapping_mul(8))
}

/// Matches an open file against the watch maps and reports it when watched. The order keeps
/// opens cheap: the inode numbers of the file and of its parent directory go through the
/// watch filter first; the superblock is read and the hash maps are probed only for inodes the
/// filter does not rule out (or names that could be a procfs secret).
#[inline(always)]
fn match_file<F: Fields>(view: &mut F, file: *const u8, pid_tgid: u64) -> Result<(), i64> {
    let tgid = (pid_tgid >> 32) as u32;
    let o = offsets();
    let w = windows();
    let (inode, dentry, flags) = {
        let view = view.load(file, w.file)?;
        // From the window for free; read on its own later (only if needed) without one.
        let flags =
            if F::FREE || w.file.len != 0 { Some(view.at::<u32>(o.file_f_flags)?) } else { None };
        (view.ptr(o.file_f_inode)?, view.ptr(o.file_dentry)?, flags)
    };
    let (sb, ino) = {
        let view = view.load(inode, w.inode)?;
        (view.ptr(o.inode_i_sb)?, view.at::<u64>(o.inode_i_ino)?)
    };
    let opened = Opened { file, dentry, flags, tgid };

    // The file itself first: the parent directory is only walked when it is not watched.
    let mut fs = None;
    if maybe_watched(ino) {
        let (dev, magic) = superblock(view, sb, inode)?;
        fs = Some((dev, magic));
        let key = FileKey { dev, _pad0: 0, ino };
        if let Some(&watch_id) = unsafe { WATCHED_FILES.get(key) } {
            return emit_file(view, &opened, key, None, (watch_id, FileMatch::File));
        }
        // An overlay's regular file keeps the inode number of the layer's file it stands for,
        // so the filter let it through; that file may be the watched one.
        if magic == OVERLAYFS_SUPER_MAGIC && layer_file_matched(view, &opened)? {
            return Ok(());
        }
    }
    let (parent, name_ptr, name_len) = {
        let view = view.load(dentry, w.dentry)?;
        (view.ptr(o.dentry_d_parent)?, view.ptr(o.dentry_name)?, view.at::<u32>(o.dentry_name_len)?)
    };
    // Only "environ" and "mem" can be a procfs secret.
    if name_len == 7 || name_len == 3 {
        let (_, magic) = match fs {
            Some(fs) => fs,
            None => superblock(view, sb, inode)?,
        };
        if magic == PROC_SUPER_MAGIC {
            return proc_secret(&opened, inode, name_ptr, parent, pid_tgid);
        }
    }
    let parent_ino = parent_ino(view, parent)?;
    if !maybe_watched(parent_ino) {
        return Ok(());
    }
    let (dev, _) = match fs {
        Some(fs) => fs,
        None => superblock(view, sb, inode)?,
    };
    let key = FileKey { dev, _pad0: 0, ino };
    let dir = FileKey { dev, _pad0: 0, ino: parent_ino };
    let Some(&dir_value) = (unsafe { WATCHED_DIRS.get(dir) }) else {
        return Ok(());
    };
    let found = Some((parent_ino, name_ptr));
    if dir_value & DIR_ANY_NAME != 0 {
        let watch_id = dir_value & !DIR_ANY_NAME;
        return emit_file(view, &opened, key, found, (watch_id, FileMatch::Dir));
    }
    // Only opens in watched directories pay for copying and hashing the name.
    let scratch = NAME_SCRATCH.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: per-CPU scratch buffer owned by this program run; checked kernel read.
    let hash = unsafe {
        bpf_probe_read_kernel_str_bytes(name_ptr, &mut *scratch)?;
        name_hash(&*scratch)
    };
    let name_key = NameKey { dev, _pad0: 0, dir_ino: parent_ino, hash };
    if let Some(&watch_id) = unsafe { WATCHED_NAMES.get(name_key) } {
        return emit_file(view, &opened, key, found, (watch_id, FileMatch::Name));
    }
    Ok(())
}

/// An overlayfs file opened: when the file of the layer below it (the real file overlayfs
/// reads for it) is a watched file, reports that, and says so. A credential read through an
/// overlay mount — which a user namespace lets any user make over their own files — is a read
/// of the credential itself. Helper reads only: the layer's file is no BTF pointer.
#[inline(always)]
fn layer_file_matched<F: Fields>(view: &mut F, opened: &Opened) -> Result<bool, i64> {
    let o = offsets();
    let mut real = kread::ptr(opened.file, o.file_private_data)?;
    if o.ovl_file_realfile != NO_OFFSET {
        real = kread::ptr(real, o.ovl_file_realfile)?;
    }
    let inode = kread::ptr(real, o.file_f_inode)?;
    let key =
        FileKey { dev: inode_dev_read(inode)?, _pad0: 0, ino: kread::at(inode, o.inode_i_ino)? };
    let Some(&watch_id) = (unsafe { WATCHED_FILES.get(key) }) else {
        return Ok(false);
    };
    // Named from the layer's own directory entry; the caller's open flags.
    let dentry = kread::ptr(real, o.file_dentry)?;
    let parent = kread::ptr(dentry, o.dentry_d_parent)?;
    let parent_ino = kread::at(kread::ptr(parent, o.dentry_d_inode)?, o.inode_i_ino)?;
    let found = Some((parent_ino, kread::ptr(dentry, o.dentry_name)?));
    let layer = Opened { file: real, dentry, flags: Some(opened.flags()), tgid: opened.tgid };
    emit_file(view, &layer, key, found, (watch_id, FileMatch::File))?;
    Ok(true)
}

/// The inode number of directory entry `parent`.
#[inline(always)]
fn parent_ino<F: Fields>(view: &mut F, parent: *const u8) -> Result<u64, i64> {
    let o = offsets();
    let inode = view.load(parent, kread::NO_WINDOW)?.ptr(o.dentry_d_inode)?;
    view.load(inode, kread::NO_WINDOW)?.at(o.inode_i_ino)
}

/// A file just opened, as far as the open hook has read it.
struct Opened {
    file: *const u8,
    dentry: *const u8,
    /// `f_flags` when the file's read window held it.
    flags: Option<u32>,
    tgid: u32,
}

impl Opened {
    #[inline(always)]
    fn flags(&self) -> u32 {
        self.flags.unwrap_or_else(|| kread::at(self.file, offsets().file_f_flags).unwrap_or(0))
    }
}

/// Emits (or folds) a file-open record. `found`: the parent directory's inode and the name
/// pointer when the caller already read them; otherwise they are read only when the fold lets a
/// record through.
#[inline(always)]
fn emit_file<F: Fields>(
    view: &mut F,
    opened: &Opened,
    key: FileKey,
    found: Option<(u64, *const u8)>,
    (watch_id, matched): (u32, FileMatch),
) -> Result<(), i64> {
    let o = offsets();
    let flags = opened.flags();
    if flags & O_PATH != 0 {
        // A handle that cannot read (only stat, pass on, or re-open — which is an open).
        return Ok(());
    }
    let fold_key = FoldKey::file(opened.tgid, key.dev, key.ino);
    let Some(total) = fold::occurrence(&fold_key) else {
        return Ok(());
    };
    let (parent_ino, name_ptr) = match found {
        Some(found) => found,
        None => {
            let (parent, name_ptr) = {
                let view = view.load(opened.dentry, windows().dentry)?;
                (view.ptr(o.dentry_d_parent)?, view.ptr(o.dentry_name)?)
            };
            (parent_ino(view, parent)?, name_ptr)
        }
    };
    let Some(mut entry) = EVENTS.reserve::<FileOpenEvent>(0) else {
        count_lost(EventKind::FileOpen);
        fold::record_lost(&fold_key);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size; the name is copied through
    // a checked kernel read.
    unsafe {
        write_header(&raw mut (*event).header, EventKind::FileOpen);
        (*event).watch_id = watch_id;
        (*event).matched = matched as u32;
        (*event).flags = flags;
        (*event).dev = key.dev;
        (*event).ino = key.ino;
        (*event).parent_ino = parent_ino;
        (*event).total = total;
        (*event)._pad0 = 0;
        (*event).name_len = match bpf_probe_read_kernel_str_bytes(name_ptr, &mut (*event).name) {
            Ok(bytes) => bytes.len() as u32,
            Err(_) => 0,
        };
    }
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}

/// `/proc/<pid>/environ` or `/proc/<pid>/mem` of another process, recognised from the opened
/// file (its name, and the process its procfs inode belongs to), not from the string the
/// caller passed.
#[inline(always)]
fn proc_secret(
    opened: &Opened,
    inode: *const u8,
    name_ptr: *const u8,
    parent: *const u8,
    pid_tgid: u64,
) -> Result<(), i64> {
    let mut name = [0u8; 8];
    // SAFETY: checked kernel read into a local buffer.
    unsafe { bpf_probe_read_kernel_str_bytes(name_ptr, &mut name)? };
    let method = if name == *b"environ\0" {
        SecretMethod::ProcEnviron
    } else if name[..4] == *b"mem\0" {
        SecretMethod::ProcMem
    } else {
        return Ok(());
    };
    let target = match proc_inode_pid(inode) {
        Some(pid) => pid,
        None => parent_pid_name(parent)?,
    };
    let tgid = (pid_tgid >> 32) as u32;
    if target == 0 || target == tgid || target == pid_tgid as u32 {
        return Ok(()); // not a process's file, or the caller's own
    }
    emit_secret(tgid, method, Target::host(target), 0, opened.flags(), NO_WATCH)
}

/// The host pid of the task a procfs inode belongs to (`proc_inode.pid`), 0 for a file of no
/// task; `None` where the kernel's layout is unknown. Exact whichever procfs instance the file
/// was opened in: a container's own `/proc` numbers its directories by its pid namespace.
#[inline(always)]
fn proc_inode_pid(inode: *const u8) -> Option<u32> {
    let o = offsets();
    if o.proc_inode_pid_back == NO_OFFSET {
        return None;
    }
    let pid: *const u8 = kread::at(inode.wrapping_sub(o.proc_inode_pid_back as usize), 0).ok()?;
    if pid.is_null() {
        return Some(0);
    }
    kread::at(pid, o.pid_nr).ok()
}

/// The pid a `/proc/<pid>` directory's name says (right only in the host's pid namespace).
#[inline(always)]
fn parent_pid_name(parent: *const u8) -> Result<u32, i64> {
    let mut digits = [0u8; 12];
    let parent_name = kread::ptr(parent, offsets().dentry_name)?;
    // SAFETY: checked kernel read into a local buffer.
    unsafe { bpf_probe_read_kernel_str_bytes(parent_name, &mut digits)? };
    Ok(parse_pid(&digits))
}

/// Decimal digits up to the first NUL; 0 when anything else appears.
#[inline(always)]
fn parse_pid(digits: &[u8; 12]) -> u32 {
    let mut pid: u32 = 0;
    for &d in digits.iter().take(11) {
        if d == 0 {
            return pid;
        }
        if !d.is_ascii_digit() {
            return 0;
        }
        pid = pid.wrapping_mul(10).wrapping_add((d - b'0') as u32);
    }
    0
}

/// The process whose secrets were touched: its host pid, and the number the caller gave in
/// its own pid namespace where that is not the host's (see
/// [`sensor_ebpf::SecretEvent::ns_pid`]).
pub struct Target {
    pub pid: u32,
    pub ns_pid: u32,
}

impl Target {
    #[inline(always)]
    pub fn host(pid: u32) -> Self {
        Self { pid, ns_pid: 0 }
    }
}

/// Emits (or folds) a secret-access record.
#[inline(always)]
pub fn emit_secret(
    tgid: u32,
    method: SecretMethod,
    target: Target,
    detail: u64,
    flags: u32,
    watch_id: u32,
) -> Result<(), i64> {
    let fold_key = FoldKey::secret(tgid, method as u32, target.pid, target.ns_pid, detail);
    let Some(total) = fold::occurrence(&fold_key) else {
        return Ok(());
    };
    let Some(mut entry) = EVENTS.reserve::<SecretEvent>(0) else {
        count_lost(EventKind::Secret);
        fold::record_lost(&fold_key);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved record of the right size; every field is written.
    unsafe {
        write_header(&raw mut (*event).header, EventKind::Secret);
        (*event).method = method as u32;
        (*event).target_pid = target.pid;
        (*event).ns_pid = target.ns_pid;
        (*event)._pad0 = 0;
        (*event).detail = detail;
        (*event).total = total;
        (*event).watch_id = watch_id;
        (*event).flags = flags;
    }
    entry.submit(SUBMIT_FLAGS);
    Ok(())
}

/// `connect(2)` exit: a successful connect to a watched unix socket (ssh-agent, docker.sock,
/// vault agent), recognised from the peer socket's inode, and attributed to the process that
/// listens there.
#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    match try_connect_exit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

const AF_UNIX: u16 = 1;

fn try_connect_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let ret: i64 = tp_field(ctx, RET);
    if ret != 0 {
        return Ok(());
    }
    // Every successful connect on the host passes here; most are not unix sockets, so the
    // family is checked before anything else is asked of the kernel.
    let fd = if args_at_exit() {
        // Both the registers and the fd table hang off the task (BTF pointer: task_btf holds
        // wherever args_at_exit does).
        let task = current_task_btf();
        let (fd, addr) = exit_args_of(task)?;
        let family = match file_btf_of_fd(task, fd as u32).and_then(socket_family_btf) {
            Some(family) => family,
            None => user_family(addr as *const u8)?,
        };
        if family != AF_UNIX {
            return Ok(());
        }
        fd as u32
    } else {
        // Not in the record at exit: `sys_enter_connect` saved it for unix sockets.
        let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
        let Some(&fd) = (unsafe { CONNECT_FDS.get(pid_tgid) }) else {
            return Ok(());
        };
        let _ = CONNECT_FDS.remove(pid_tgid);
        fd
    };
    let tgid = current_tgid();
    if super::task::is_self(tgid) {
        return Ok(());
    }
    unix_connected(file_of_fd(fd)?, tgid)
}

/// `file` (a socket) was just connected by `tgid`: a secret access when its peer is a watched
/// unix socket of another process.
#[inline(always)]
fn unix_connected(file: *const u8, tgid: u32) -> Result<(), i64> {
    let o = offsets();
    let socket = kread::ptr(file, o.file_private_data)?;
    let sk = kread::ptr(socket, o.socket_sk)?;
    let family: u16 = kread::at(sk, o.sock_family)?;
    if family != AF_UNIX {
        return Ok(());
    }
    let peer = kread::ptr(sk, o.unix_peer)?;
    let dentry = kread::ptr(peer, o.unix_path_dentry)?;
    let inode = kread::ptr(dentry, o.dentry_d_inode)?;
    let ino: u64 = kread::at(inode, o.inode_i_ino)?;
    let dev = inode_dev_read(inode)?;
    let Some(&watch_id) = (unsafe { WATCHED_SOCKETS.get(FileKey { dev, _pad0: 0, ino }) }) else {
        return Ok(());
    };
    let target = match kread::ptr(sk, o.sock_peer_pid) {
        Ok(pid) => kread::at::<u32>(pid, o.pid_nr).unwrap_or(0),
        Err(_) => 0,
    };
    if target == tgid {
        return Ok(());
    }
    emit_secret(tgid, SecretMethod::UnixSocket, Target::host(target), ino, 0, watch_id)
}

/// The address family of socket `file` (a BTF pointer) with plain loads: its `private_data`
/// retyped as the `struct socket` it is ([`sensor_ebpf::SensorConfig::socket_btf_id`]). A
/// fraction of a user-memory read, on every successful connect of the host.
#[inline(always)]
fn socket_family_btf(file: *const u8) -> Option<u16> {
    let o = offsets();
    let id = socket_btf_id();
    if id == 0 {
        return None;
    }
    let private: u64 = kread::btf_at(file, o.file_private_data).ok()?;
    let socket = kfunc::rdonly_cast(private as *const u8, id);
    if socket.is_null() {
        return None;
    }
    let sk = kread::btf_ptr(socket, o.socket_sk).ok()?;
    kread::btf_at(sk, o.sock_family).ok()
}

/// The address family of the `sockaddr` the caller passed.
#[inline(always)]
fn user_family(addr: *const u8) -> Result<u16, i64> {
    // SAFETY: checked user read.
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(addr.cast::<u16>()) }.map_err(i64::from)
}

/// `connect(int fd, …)`: remembers the fd for the exit hook, only for AF_UNIX addresses (on
/// kernels where the exit hook cannot read the arguments itself).
#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    match try_connect_enter(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_connect_enter(ctx: &TracePointContext) -> Result<(), i64> {
    // Fields of this tracepoint's format: fd at 16, uservaddr at 24.
    let (fd, addr): (u64, *const u8) = (tp_field(ctx, 16), tp_field(ctx, 24));
    if user_family(addr)? != AF_UNIX {
        return Ok(());
    }
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    CONNECT_FDS.insert(pid_tgid, fd as u32, 0)?;
    Ok(())
}
