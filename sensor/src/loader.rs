//! Loads the kernel object, configures it for this kernel and attaches its programs.
//!
//! [`PROGRAMS`] (with one of two sets of secret-access syscall hooks, chosen by
//! [`KernelMode`]) is the one table of what attaches where; `keywatch-sensor probe` prints it
//! with the outcome on this host. A program that fails is never a silent gap: the sensor
//! refuses to start unless the operator allowed that gap by name.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, RawTracePoint, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use sensor_ebpf::{EventKind, KernelOffsets, NO_OFFSET, PinMeta, RUNTIME_SELF_TGID, SensorConfig};
use serde::Serialize;

use crate::{
    btf::{BtfError, KernelBtf},
    kernel_maps::{FoldMap, PortFilter, WatchFilter, WatchMaps},
    pins::{self, PinDir, PinState},
    system::{self, SystemError},
};

/// How a program attaches.
#[derive(Debug, Clone, Copy)]
pub enum Attach {
    /// `tracepoint/<category>/<name>`.
    TracePoint { category: &'static str, name: &'static str },
    /// `raw_tracepoint/<name>`.
    RawTracePoint { name: &'static str },
    /// A cgroup sock_addr hook on the cgroup2 root, attached in multi-attach mode so other
    /// programs (and other sensors) on the hook keep working.
    CgroupSockAddr { hook: &'static str },
}

impl Attach {
    pub fn describe(&self) -> String {
        match self {
            Attach::TracePoint { category, name } => format!("tracepoint/{category}/{name}"),
            Attach::RawTracePoint { name } => format!("raw_tracepoint/{name}"),
            Attach::CgroupSockAddr { hook } => format!("cgroup/{hook} (cgroup2 root)"),
        }
    }
}

/// One kernel program and where it goes.
#[derive(Debug, Clone, Copy)]
pub struct ProgramSpec {
    /// Function name in the object.
    pub name: &'static str,
    pub attach: Attach,
    /// What the program is for, for the probe report.
    pub purpose: &'static str,
    /// Oldest kernel known to support the attach kind.
    pub min_kernel: &'static str,
}

/// Every program the sensor knows, in attach order.
///
/// Syscall tracepoints tax every syscall on the host once any is enabled, so the file hook is
/// exit-only; lifecycle uses sched tracepoints, and endpoints cgroup hooks, which tax nothing
/// else. An LSM `file_open` / fentry variant of the file hook belongs here as the preferred
/// entry on kernels that allow it, with these tracepoints as its fallback.
pub const PROGRAMS: &[ProgramSpec] = &[
    tp("sched_process_exec", "sched", "process lifecycle: exec", "4.7"),
    raw("sched_process_fork", "process lifecycle: fork", "4.17"),
    raw("sched_process_exit", "process lifecycle: exit", "4.17"),
    tp("sys_exit_openat", "syscalls", "credential/secret files: openat", "4.7"),
    tp("sys_exit_openat2", "syscalls", "credential/secret files: openat2", "5.6"),
    tp("sys_exit_open", "syscalls", "credential/secret files: open", "4.7"),
    tp("sys_exit_creat", "syscalls", "credential/secret files: creat (a write)", "4.7"),
    tp(
        "sys_exit_open_by_handle_at",
        "syscalls",
        "credential/secret files: open_by_handle_at",
        "4.7",
    ),
    tp(
        "sys_exit_pidfd_getfd",
        "syscalls",
        "credential/secret files: fd taken from another process",
        "5.6",
    ),
    tp(
        "io_uring_complete",
        "io_uring",
        "credential/secret files and agent sockets: io_uring openat, connect",
        "5.5",
    ),
    tp("sys_exit_connect", "syscalls", "secret access: watched unix socket connect", "4.7"),
    cg("connect4", "auth endpoints: IPv4 connect", "4.17"),
    cg("connect6", "auth endpoints: IPv6 connect", "4.17"),
    cg("sendmsg4", "auth endpoints: IPv4 UDP send", "4.18"),
    cg("sendmsg6", "auth endpoints: IPv6 UDP send", "4.18"),
    tp("sys_exit_setuid", "syscalls", "privilege change: setuid", "4.7"),
    tp("sys_exit_setreuid", "syscalls", "privilege change: setreuid", "4.7"),
    tp("sys_exit_setresuid", "syscalls", "privilege change: setresuid", "4.7"),
    tp("sys_exit_setfsuid", "syscalls", "privilege change: setfsuid", "4.7"),
    tp("sys_exit_setgid", "syscalls", "privilege change: setgid", "4.7"),
    tp("sys_exit_setregid", "syscalls", "privilege change: setregid", "4.7"),
    tp("sys_exit_setresgid", "syscalls", "privilege change: setresgid", "4.7"),
    tp("sys_exit_setfsgid", "syscalls", "privilege change: setfsgid", "4.7"),
    tp("sys_exit_capset", "syscalls", "privilege change: capset", "4.7"),
];

/// Secret-access syscall hooks that read their arguments at syscall exit from the task's saved
/// registers (5.15+, x86-64): no syscall enter tracepoint at all, which spares every syscall on
/// the host the enter-side call.
const ARGS_AT_EXIT: &[ProgramSpec] = &[
    tp("sys_exit_ptrace", "syscalls", "secret access: ptrace", "5.15"),
    tp("sys_exit_process_vm_readv", "syscalls", "secret access: process_vm_readv", "5.15"),
    tp("sys_exit_process_vm_writev", "syscalls", "secret access: process_vm_writev", "5.15"),
    tp("sys_exit_keyctl", "syscalls", "secret access: keyctl read", "5.15"),
];

/// The same hooks on kernels where only the enter record has the arguments.
const ARGS_AT_ENTER: &[ProgramSpec] = &[
    tp("sys_enter_ptrace", "syscalls", "secret access: ptrace", "4.7"),
    tp("sys_enter_process_vm_readv", "syscalls", "secret access: process_vm_readv", "4.7"),
    tp("sys_enter_process_vm_writev", "syscalls", "secret access: process_vm_writev", "4.7"),
    tp("sys_enter_keyctl", "syscalls", "secret access: keyctl read", "4.7"),
    tp("sys_enter_connect", "syscalls", "secret access: unix socket connect (fd)", "4.7"),
];

/// What the running kernel lets the programs do, decided once from its BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelMode {
    /// Walk kernel structs through BTF pointers ([`SensorConfig::task_btf`]).
    pub task_btf: bool,
    /// The kernel's BTF id of the kfunc `bpf_rdonly_cast`, when the open path holds files as
    /// BTF pointers (see [`crate::kfunc`]); `None`: helper reads.
    pub rdonly_cast: Option<u32>,
    /// Read syscall arguments at exit ([`SensorConfig::args_at_exit`]).
    pub args_at_exit: bool,
}

impl KernelMode {
    pub fn of(btf: &KernelBtf, offsets: &KernelOffsets, opts: &LoadOptions) -> Self {
        let task_btf = !opts.helper_reads && btf.has_helper("get_current_task_btf");
        let rdonly_cast = btf
            .function_id("bpf_rdonly_cast")
            .filter(|_| task_btf && btf.struct_id("vm_area_struct").is_some());
        let args_at_exit = task_btf
            && btf.has_helper("task_pt_regs")
            && offsets.pt_regs_di != NO_OFFSET
            && offsets.pt_regs_si != NO_OFFSET;
        Self { task_btf, rdonly_cast, args_at_exit }
    }

    /// How the file programs read kernel structs (shown by `probe`).
    pub fn reads(self) -> &'static str {
        if self.rdonly_cast.is_some() {
            "plain loads through BTF pointers (task, opened file), checked by the verifier"
        } else {
            "bpf_probe_read_kernel per struct window (no BTF pointers to files on this kernel)"
        }
    }

    /// The programs to attach on this kernel: [`PROGRAMS`] and one set of secret-access
    /// syscall hooks.
    pub fn programs(self) -> impl Iterator<Item = &'static ProgramSpec> {
        PROGRAMS.iter().chain(if self.args_at_exit { ARGS_AT_EXIT } else { ARGS_AT_ENTER })
    }
}

const fn tp(
    name: &'static str,
    category: &'static str,
    purpose: &'static str,
    min_kernel: &'static str,
) -> ProgramSpec {
    ProgramSpec { name, attach: Attach::TracePoint { category, name }, purpose, min_kernel }
}

const fn raw(name: &'static str, purpose: &'static str, min_kernel: &'static str) -> ProgramSpec {
    ProgramSpec { name, attach: Attach::RawTracePoint { name }, purpose, min_kernel }
}

const fn cg(hook: &'static str, purpose: &'static str, min_kernel: &'static str) -> ProgramSpec {
    ProgramSpec { name: hook, attach: Attach::CgroupSockAddr { hook }, purpose, min_kernel }
}

/// Outcome of one program on this host.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    pub program: &'static str,
    pub attach: String,
    pub purpose: &'static str,
    pub min_kernel: &'static str,
    pub attached: bool,
    /// Why not, when not attached.
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this keywatch-sensor was built without its kernel programs (AYA_BUILD_SKIP)")]
    NoObject,
    #[error("{0}")]
    System(#[from] SystemError),
    #[error("{0}")]
    Btf(#[from] BtfError),
    #[error("the kernel refused the eBPF object")]
    Object(#[source] aya::EbpfError),
    #[error(
        "keywatch-sensor needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (missing: {})",
        .0.join(", ")
    )]
    Privileges(Vec<&'static str>),
    #[error("{0}")]
    Pin(#[from] crate::pins::PinError),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error(
        "programs not attached: {}; allow the gap explicitly with --allow-missing {}",
        .0.iter().map(|s| format!("{} ({})", s.program, s.reason.as_deref().unwrap_or("?"))).collect::<Vec<_>>().join(", "),
        .0.iter().map(|s| s.program).collect::<Vec<_>>().join(",")
    )]
    Missing(Vec<ProgramStatus>),
    #[error("detaching or attaching again: {0}")]
    Toggle(String),
}

/// Load-time options.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Programs whose absence the operator accepts.
    pub allow_missing: BTreeSet<String>,
    /// Ring buffer size in bytes (power of two, multiple of the page size); 0 keeps the default.
    pub ring_bytes: u32,
    /// Repeats of the same (process, kind, object) within this window fold into one record.
    pub fold_window: std::time::Duration,
    /// Pin maps and links here so capture continues across sensor restarts; `None` ties the
    /// programs to this process (tests, one-off runs).
    pub pin_dir: Option<PathBuf>,
    /// Read kernel structs with `bpf_probe_read_kernel` only, as on kernels without BTF
    /// pointers for these programs (how that path is tested on newer ones).
    pub helper_reads: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            allow_missing: BTreeSet::new(),
            ring_bytes: 0,
            // Long enough to fold a tight loop, short enough that a second use a moment later
            // is its own event.
            fold_window: std::time::Duration::from_secs(1),
            pin_dir: None,
            helper_reads: false,
        }
    }
}

/// Where the running programs came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "origin", rename_all = "snake_case")]
pub enum Origin {
    /// Loaded and attached by this process.
    Loaded,
    /// Left pinned by a previous sensor of the same build, which kept capturing meanwhile.
    Adopted,
    /// Pins of an incompatible sensor were removed first; what they held was lost.
    Replaced { reason: String },
}

/// The kernel side, loaded and attached. Without pins, dropping it detaches every program.
pub struct Loaded {
    /// The object, when this process loaded it (absent when pinned programs were adopted).
    ebpf: Option<Ebpf>,
    /// Maps opened from pins, by name.
    pinned_maps: HashMap<String, Map>,
    lost: Option<PerCpuArray<MapData, u64>>,
    pub report: Vec<ProgramStatus>,
    pub origin: Origin,
    /// Programs this process attached without pinning them, by link.
    links: Vec<(&'static ProgramSpec, OwnedLink)>,
    /// Programs [`Loaded::set_attached`] detached.
    detached: Vec<&'static ProgramSpec>,
    _pins: Option<PinDir>,
}

impl Loaded {
    /// Detaches every program (`false`) or attaches them again (`true`), leaving them loaded
    /// and the maps as they are: for measurements that compare a host with and without the
    /// programs in quick alternation. Only for programs this process attached without pins.
    pub fn set_attached(&mut self, attached: bool) -> Result<(), LoadError> {
        let ebpf = self.ebpf.as_mut().filter(|_| self._pins.is_none()).ok_or_else(|| {
            LoadError::Toggle("only programs attached without pins can be detached".into())
        })?;
        if attached {
            let cgroup = CgroupRoot::open();
            for spec in std::mem::take(&mut self.detached) {
                let link = attach_loaded(ebpf, spec, &cgroup).map_err(LoadError::Toggle)?;
                self.links.push((spec, link));
            }
        } else {
            for (spec, link) in std::mem::take(&mut self.links) {
                detach(ebpf, spec, link).map_err(LoadError::Toggle)?;
                self.detached.push(spec);
            }
        }
        Ok(())
    }

    fn take_map(&mut self, name: &'static str) -> Result<Map, LoadError> {
        self.ebpf
            .as_mut()
            .and_then(|e| e.take_map(name))
            .or_else(|| self.pinned_maps.remove(name))
            .ok_or(LoadError::MissingMap(name))
    }

    fn typed<T>(
        &mut self,
        name: &'static str,
        convert: impl FnOnce(Map) -> Result<T, aya::maps::MapError>,
    ) -> Result<T, LoadError> {
        let map = self.take_map(name)?;
        convert(map).map_err(|source| LoadError::Map { name, source })
    }

    /// The watch maps, handed to whoever keeps them in line with the watch list.
    pub fn take_watch_maps(&mut self) -> Result<WatchMaps, LoadError> {
        Ok(WatchMaps {
            files: self.typed("WATCHED_FILES", aya::maps::HashMap::try_from)?,
            dirs: self.typed("WATCHED_DIRS", aya::maps::HashMap::try_from)?,
            sockets: self.typed("WATCHED_SOCKETS", aya::maps::HashMap::try_from)?,
            names: self.typed("WATCHED_NAMES", aya::maps::HashMap::try_from)?,
            endpoints: self.typed("ENDPOINTS", aya::maps::LpmTrie::try_from)?,
            ports: PortFilter::new(self.typed("ENDPOINT_PORTS", aya::maps::Array::try_from)?),
            filter: WatchFilter::open(self.typed("WATCH_FILTER", aya::maps::Array::try_from)?)
                .map_err(|source| LoadError::Map { name: "WATCH_FILTER", source })?,
        })
    }

    /// The fold maps, read by the sweeper that reports fold tails.
    pub fn take_fold_map(&mut self) -> Result<FoldMap, LoadError> {
        Ok(FoldMap {
            map: self.typed("FOLD", aya::maps::HashMap::try_from)?,
            reported: self.typed("FOLD_REPORTED", aya::maps::HashMap::try_from)?,
        })
    }

    /// The event ring buffer map, handed to the reader (which maps it with
    /// [`crate::ring::Ring`]).
    pub fn take_events(&mut self) -> Result<MapData, LoadError> {
        self.typed("EVENTS", |map| match map {
            Map::RingBuf(data) => Ok(data),
            // Not a ring buffer (its type is not public on `Map`).
            _ => Err(aya::maps::MapError::InvalidMapType { map_type: 0 }),
        })
    }

    /// Records the kernel could not queue, per kind, summed over CPUs.
    pub fn lost_counts(&self) -> Result<Vec<(EventKind, u64)>, LoadError> {
        EventKind::ALL
            .iter()
            .map(|&kind| {
                let lost = self.lost.as_ref().ok_or(LoadError::MissingMap("LOST"))?;
                let per_cpu = lost
                    .get(&(kind as u32), 0)
                    .map_err(|source| LoadError::Map { name: "LOST", source })?;
                Ok((kind, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Tells the programs which process is the sensor, so its own activity is skipped.
    fn set_self(&mut self) -> Result<(), LoadError> {
        let mut runtime: Array<_, u32> = self.typed("RUNTIME", Array::try_from)?;
        runtime
            .set(RUNTIME_SELF_TGID, std::process::id(), 0)
            .map_err(|source| LoadError::Map { name: "RUNTIME", source })
    }
}

fn prepare_host() -> Result<(), LoadError> {
    let missing = system::missing_capabilities();
    if !missing.is_empty() {
        return Err(LoadError::Privileges(missing));
    }
    system::raise_memlock_limit();
    system::ensure_tracefs()?;
    system::ensure_bpffs()?;
    Ok(())
}

/// The running kernel's BTF, the offsets the programs need and the mode they run in.
fn inspect_kernel(opts: &LoadOptions) -> Result<(KernelBtf, KernelOffsets, KernelMode), LoadError> {
    let btf = KernelBtf::load()?;
    let offsets = btf.kernel_offsets()?;
    let mode = KernelMode::of(&btf, &offsets, opts);
    tracing::info!(reads = mode.reads(), ?mode, "kernel struct reads");
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    for gap in coverage_gaps(&offsets, &filesystems) {
        tracing::warn!(gap, "not seen on this kernel");
    }
    Ok((btf, offsets, mode))
}

/// What the programs cannot see on this kernel although all of them load: the kernel's BTF
/// lacks the struct members a path needs (an older or differently built kernel, or a file
/// system of `filesystems` — `/proc/filesystems` — built as a module, whose BTF is not read).
pub fn coverage_gaps(o: &KernelOffsets, filesystems: &str) -> Vec<&'static str> {
    let mut gaps = Vec::new();
    let btrfs = filesystems.lines().any(|l| l.split_whitespace().last() == Some("btrfs"));
    if btrfs && o.btrfs_inode_root_back == NO_OFFSET {
        gaps.push(
            "watched files on btrfs (its subvolumes' own devices are not known: btrfs is a \
             module, whose BTF is not read)",
        );
    }
    if o.io_kiocb_opcode != NO_OFFSET && o.io_ctx_files_nr == NO_OFFSET {
        gaps.push(
            "io_uring opens into fixed-file slots, and reads of those slots (the ring's \
             fixed-file table predates the 6.13 layout)",
        );
    }
    if o.proc_inode_pid_back == NO_OFFSET {
        gaps.push(
            "the target of a /proc/<pid>/environ or mem read inside a container's own /proc \
             (taken from the directory's name, a pid of the container's namespace)",
        );
    }
    if o.task_thread_pid == NO_OFFSET {
        gaps.push(
            "the host pid of a ptrace or process_vm_readv target named from inside a pid \
             namespace (the container's own number is reported)",
        );
    }
    gaps
}

fn open_object(
    opts: &LoadOptions,
    pins: Option<&PinDir>,
    (btf, offsets, mode): &(KernelBtf, KernelOffsets, KernelMode),
) -> Result<Ebpf, LoadError> {
    if crate::EBPF_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let config = SensorConfig {
        fold_window_ns: opts.fold_window.as_nanos() as u64,
        offsets: *offsets,
        windows: crate::btf::read_windows(offsets),
        task_btf: u32::from(mode.task_btf),
        slot_btf_id: btf.struct_id("vm_area_struct").unwrap_or(0),
        args_at_exit: u32::from(mode.args_at_exit),
        socket_btf_id: btf.struct_id("socket").unwrap_or(0),
    };
    let (object, patched) = crate::kfunc::patch(crate::EBPF_OBJECT, mode.rdonly_cast);
    tracing::debug!(?patched, "kfunc call sites");
    let pin_paths: Vec<(&'static str, PathBuf)> = match pins {
        Some(p) => pins::MAPS.iter().map(|&name| (name, p.map_path(name))).collect(),
        None => Vec::new(),
    };
    let mut loader = EbpfLoader::new();
    loader.override_global("CONFIG", &config, true);
    if opts.ring_bytes > 0 {
        loader.map_max_entries("EVENTS", opts.ring_bytes);
    }
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(&object).map_err(LoadError::Object)
}

/// How a program the kernel refused to load (the verifier) is reported.
const LOAD_REFUSED: &str = "load refused: ";

/// Attaches one program; with `pins`, pins its link so it outlives this process.
fn attach(
    ebpf: &mut Ebpf,
    spec: &'static ProgramSpec,
    cgroup: &CgroupRoot,
    pins: Option<&PinDir>,
) -> Result<Option<OwnedLink>, String> {
    load_program(ebpf, spec)?;
    let link = attach_loaded(ebpf, spec, cgroup)?;
    let Some(pins) = pins else { return Ok(Some(link)) };
    take_link(ebpf, spec, link)?
        .pin(pins.link_path(spec.name))
        .map_err(|e| format!("pinning the link: {e}"))?;
    Ok(None)
}

/// A program attached by this process and not pinned: detached again by its id.
#[derive(Debug)]
enum OwnedLink {
    TracePoint(aya::programs::trace_point::TracePointLinkId),
    RawTracePoint(aya::programs::raw_trace_point::RawTracePointLinkId),
    CgroupSockAddr(aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId),
}

fn program<'a, T>(ebpf: &'a mut Ebpf, spec: &ProgramSpec) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(spec.name).ok_or("not in the eBPF object")?;
    program.try_into().map_err(|e| format!("{e}"))
}

fn load_program(ebpf: &mut Ebpf, spec: &ProgramSpec) -> Result<(), String> {
    let loaded = |e: aya::programs::ProgramError| format!("{LOAD_REFUSED}{}", brief(&e));
    match spec.attach {
        Attach::TracePoint { .. } => program::<TracePoint>(ebpf, spec)?.load().map_err(loaded),
        Attach::RawTracePoint { .. } => {
            program::<RawTracePoint>(ebpf, spec)?.load().map_err(loaded)
        }
        Attach::CgroupSockAddr { .. } => {
            program::<CgroupSockAddr>(ebpf, spec)?.load().map_err(loaded)
        }
    }
}

/// Attaches a loaded program where `spec` says.
fn attach_loaded(
    ebpf: &mut Ebpf,
    spec: &ProgramSpec,
    cgroup: &CgroupRoot,
) -> Result<OwnedLink, String> {
    let attached = |e: aya::programs::ProgramError| {
        let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
        format!("attach failed: {e}{cause}")
    };
    Ok(match spec.attach {
        Attach::TracePoint { category, name } => OwnedLink::TracePoint(
            program::<TracePoint>(ebpf, spec)?.attach(category, name).map_err(attached)?,
        ),
        Attach::RawTracePoint { name } => OwnedLink::RawTracePoint(
            program::<RawTracePoint>(ebpf, spec)?.attach(name).map_err(attached)?,
        ),
        Attach::CgroupSockAddr { .. } => {
            let root = cgroup.dir.as_ref().map_err(Clone::clone)?;
            // On kernels with BPF links (5.7+) every cgroup link is multi-attach and the link
            // takes no flags; older kernels get the legacy attach, where this would be exclusive.
            let p = program::<CgroupSockAddr>(ebpf, spec)?;
            OwnedLink::CgroupSockAddr(p.attach(root, CgroupAttachMode::Single).map_err(attached)?)
        }
    })
}

/// The link behind `link`, taken from its program to be pinned.
fn take_link(ebpf: &mut Ebpf, spec: &ProgramSpec, link: OwnedLink) -> Result<FdLink, String> {
    let taken = |e: aya::programs::ProgramError| format!("link not pinnable: {e}");
    let unpinnable = |e| format!("link not pinnable on this kernel: {e}");
    match link {
        OwnedLink::TracePoint(id) => {
            let link = program::<TracePoint>(ebpf, spec)?.take_link(id).map_err(taken)?;
            FdLink::try_from(link).map_err(unpinnable)
        }
        OwnedLink::RawTracePoint(id) => {
            let link = program::<RawTracePoint>(ebpf, spec)?.take_link(id).map_err(taken)?;
            Ok(FdLink::from(link))
        }
        OwnedLink::CgroupSockAddr(id) => {
            let link = program::<CgroupSockAddr>(ebpf, spec)?.take_link(id).map_err(taken)?;
            FdLink::try_from(link).map_err(unpinnable)
        }
    }
}

/// Detaches a program attached by this process; it stays loaded.
fn detach(ebpf: &mut Ebpf, spec: &ProgramSpec, link: OwnedLink) -> Result<(), String> {
    let failed = |e: aya::programs::ProgramError| format!("detach failed: {e}");
    match link {
        OwnedLink::TracePoint(id) => program::<TracePoint>(ebpf, spec)?.detach(id),
        OwnedLink::RawTracePoint(id) => program::<RawTracePoint>(ebpf, spec)?.detach(id),
        OwnedLink::CgroupSockAddr(id) => program::<CgroupSockAddr>(ebpf, spec)?.detach(id),
    }
    .map_err(failed)
}

/// A load error in a few lines: the verifier's log is long; its last lines say why.
fn brief(e: &aya::programs::ProgramError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= 4 {
        return lines.join(" / ");
    }
    let first = lines[0].split(". Verifier output").next().unwrap_or(lines[0]);
    format!("{first} … {}", lines[lines.len() - 4..lines.len() - 2].join(" / "))
}

/// The cgroup2 root directory that cgroup hooks attach to, or why there is none.
struct CgroupRoot {
    dir: Result<std::fs::File, String>,
}

impl CgroupRoot {
    fn open() -> Self {
        let dir = system::cgroup2_mount().map_err(|e| e.to_string()).and_then(|path| {
            std::fs::File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))
        });
        Self { dir }
    }
}

/// Attaches every program of `mode`: the report, and the links this process owns (none when
/// they are pinned).
fn attach_all(
    ebpf: &mut Ebpf,
    pins: Option<&PinDir>,
    mode: KernelMode,
) -> (Vec<ProgramStatus>, Vec<(&'static ProgramSpec, OwnedLink)>) {
    let cgroup = CgroupRoot::open();
    let mut links = Vec::new();
    let report = mode
        .programs()
        .map(|spec| {
            let outcome = attach(ebpf, spec, &cgroup, pins).map(|link| {
                links.extend(link.map(|link| (spec, link)));
            });
            status(spec, outcome)
        })
        .collect();
    (report, links)
}

fn status(spec: &ProgramSpec, outcome: Result<(), String>) -> ProgramStatus {
    ProgramStatus {
        program: spec.name,
        attach: spec.attach.describe(),
        purpose: spec.purpose,
        min_kernel: spec.min_kernel,
        attached: outcome.is_ok(),
        reason: outcome.err(),
    }
}

/// Pinned programs left by a compatible sensor: their maps, and which programs still run.
fn adopt(
    pins: &PinDir,
    mode: KernelMode,
) -> Result<(HashMap<String, Map>, Vec<ProgramStatus>), LoadError> {
    let maps = pins.open_maps()?;
    let report = mode
        .programs()
        .map(|spec| {
            let outcome = match PinnedLink::from_pin(pins.link_path(spec.name)) {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("not attached by the previous sensor: {e}")),
            };
            status(spec, outcome)
        })
        .collect();
    Ok((maps, report))
}

/// Loads and attaches every program (or adopts those a compatible sensor left pinned); fails
/// if one is missing that the operator did not allow.
pub fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    prepare_host()?;
    let pins = opts.pin_dir.as_deref().map(PinDir::lock).transpose()?;
    let mut origin = Origin::Loaded;
    let kernel = inspect_kernel(opts)?;
    let mode = kernel.2;
    let (ebpf, pinned_maps, report, links) = match pins.as_ref().map(PinDir::state) {
        Some(PinState::Compatible) => {
            origin = Origin::Adopted;
            let (maps, report) = adopt(pins.as_ref().expect("pins present"), mode)?;
            (None, maps, report, Vec::new())
        }
        state => {
            if let (Some(PinState::Incompatible(reason)), Some(p)) = (state, pins.as_ref()) {
                tracing::warn!(%reason, "replacing pinned programs of an incompatible sensor; events they held are lost");
                p.clear()?;
                origin = Origin::Replaced { reason };
            }
            let mut ebpf = open_object(opts, pins.as_ref(), &kernel)?;
            let (mut report, mut links) = attach_all(&mut ebpf, pins.as_ref(), mode);
            let refused: Vec<_> = report
                .iter()
                .filter(|s| s.reason.as_deref().is_some_and(|r| r.starts_with(LOAD_REFUSED)))
                .map(|s| s.program)
                .collect();
            if !refused.is_empty() && !opts.helper_reads {
                // A verifier that refuses the BTF-pointer or exit-argument programs (a kernel
                // that advertises what it does not allow these program types): the portable
                // programs instead, rather than no sensor.
                tracing::warn!(
                    ?refused,
                    "programs refused in the fast mode; loading the portable ones instead (helper reads, syscall arguments at entry)"
                );
                drop(ebpf);
                if let Some(p) = &pins {
                    p.clear()?;
                }
                let portable = LoadOptions { helper_reads: true, ..opts.clone() };
                let kernel = inspect_kernel(&portable)?;
                ebpf = open_object(&portable, pins.as_ref(), &kernel)?;
                (report, links) = attach_all(&mut ebpf, pins.as_ref(), kernel.2);
            }
            (Some(ebpf), HashMap::new(), report, links)
        }
    };
    let missing: Vec<_> = report
        .iter()
        .filter(|s| !s.attached && !opts.allow_missing.contains(s.program))
        .cloned()
        .collect();
    if !missing.is_empty() {
        if let Some(p) = &pins
            && origin != Origin::Adopted
        {
            let _ = p.clear(); // never leave a half-attached set pinned
        }
        return Err(LoadError::Missing(missing));
    }
    for gap in report.iter().filter(|s| !s.attached) {
        tracing::warn!(program = gap.program, reason = ?gap.reason, "program not attached (allowed by operator)");
    }
    let write_meta = pins.is_some() && ebpf.is_some();
    let mut loaded = Loaded {
        ebpf,
        pinned_maps,
        lost: None,
        report,
        origin,
        links,
        detached: Vec::new(),
        _pins: pins,
    };
    loaded.lost = Some(loaded.typed("LOST", PerCpuArray::try_from)?);
    if write_meta {
        let mut meta: Array<_, PinMeta> = loaded.typed("META", Array::try_from)?;
        meta.set(0, pins::this_object_meta(), 0)
            .map_err(|source| LoadError::Map { name: "META", source })?;
    }
    loaded.set_self()?;
    Ok(loaded)
}

/// Tries every program and reports what works on this host, without failing on gaps.
pub fn probe() -> Result<ProbeReport, LoadError> {
    prepare_host()?;
    let opts = LoadOptions::default();
    let kernel = inspect_kernel(&opts)?;
    let mut ebpf = open_object(&opts, None, &kernel)?;
    Ok(ProbeReport {
        programs: attach_all(&mut ebpf, None, kernel.2).0,
        mode: kernel.2,
        gaps: coverage_gaps(
            &kernel.1,
            &std::fs::read_to_string("/proc/filesystems").unwrap_or_default(),
        ),
    })
}

/// What `keywatch-sensor probe` found.
pub struct ProbeReport {
    pub programs: Vec<ProgramStatus>,
    pub mode: KernelMode,
    /// [`coverage_gaps`] of this kernel.
    pub gaps: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_gaps_name_what_an_older_kernel_layout_leaves_unseen() {
        let Ok(btf) = KernelBtf::load() else {
            eprintln!("skipped: no readable kernel BTF");
            return;
        };
        let offsets = btf.kernel_offsets().expect("offsets");
        let filesystems = "nodev\tproc\n\text4\n\tbtrfs\n";
        let here = coverage_gaps(&offsets, filesystems);
        if offsets.io_ctx_files_nr != NO_OFFSET {
            assert!(here.is_empty(), "this kernel has every member: {here:?}");
        }
        let older = KernelOffsets {
            io_ctx_files_nr: NO_OFFSET,
            proc_inode_pid_back: NO_OFFSET,
            task_thread_pid: NO_OFFSET,
            btrfs_inode_root_back: NO_OFFSET,
            ..offsets
        };
        let gaps = coverage_gaps(&older, filesystems);
        assert_eq!(gaps.len(), 4, "{gaps:?}");
        assert!(gaps[0].contains("btrfs") && gaps[3].contains("ptrace"), "{gaps:?}");
        // Without btrfs in the kernel, nothing is missed for it.
        assert_eq!(coverage_gaps(&older, "\text4\n").len(), 3);
    }
}
