//! Loads the kernel object, configures it for this kernel and attaches its programs.
//!
//! [`PROGRAMS`] is the one table of what attaches where; `keywatch-sensor probe` prints it with
//! the outcome on this host. A program that fails is never a silent gap: the sensor refuses to
//! start unless the operator allowed that gap by name.

use std::collections::BTreeSet;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, RawTracePoint, TracePoint},
};
use sensor_ebpf::{EventKind, SensorConfig};
use serde::Serialize;

use crate::{
    btf::{BtfError, KernelBtf},
    system::{self, SystemError},
};

/// How a program attaches.
#[derive(Debug, Clone, Copy)]
pub enum Attach {
    /// `tracepoint/<category>/<name>`.
    TracePoint {
        category: &'static str,
        name: &'static str,
    },
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
    tp(
        "sched_process_exec",
        "sched",
        "process lifecycle: exec",
        "4.7",
    ),
    raw("sched_process_fork", "process lifecycle: fork", "4.17"),
    raw("sched_process_exit", "process lifecycle: exit", "4.17"),
    tp(
        "sys_exit_openat",
        "syscalls",
        "credential/secret files: openat",
        "4.7",
    ),
    tp(
        "sys_exit_openat2",
        "syscalls",
        "credential/secret files: openat2",
        "5.6",
    ),
    tp(
        "sys_exit_open",
        "syscalls",
        "credential/secret files: open",
        "4.7",
    ),
    tp(
        "sys_enter_ptrace",
        "syscalls",
        "secret access: ptrace",
        "4.7",
    ),
    tp(
        "sys_enter_process_vm_readv",
        "syscalls",
        "secret access: process_vm_readv",
        "4.7",
    ),
    tp(
        "sys_enter_keyctl",
        "syscalls",
        "secret access: keyctl read",
        "4.7",
    ),
    tp(
        "sys_enter_connect",
        "syscalls",
        "secret access: unix socket connect (fd)",
        "4.7",
    ),
    tp(
        "sys_exit_connect",
        "syscalls",
        "secret access: watched unix socket connect",
        "4.7",
    ),
    cg("connect4", "auth endpoints: IPv4 connect", "4.17"),
    cg("connect6", "auth endpoints: IPv6 connect", "4.17"),
    cg("sendmsg4", "auth endpoints: IPv4 UDP send", "4.18"),
    cg("sendmsg6", "auth endpoints: IPv6 UDP send", "4.18"),
    tp(
        "sys_exit_setuid",
        "syscalls",
        "privilege change: setuid",
        "4.7",
    ),
    tp(
        "sys_exit_setreuid",
        "syscalls",
        "privilege change: setreuid",
        "4.7",
    ),
    tp(
        "sys_exit_setresuid",
        "syscalls",
        "privilege change: setresuid",
        "4.7",
    ),
    tp(
        "sys_exit_setfsuid",
        "syscalls",
        "privilege change: setfsuid",
        "4.7",
    ),
    tp(
        "sys_exit_setgid",
        "syscalls",
        "privilege change: setgid",
        "4.7",
    ),
    tp(
        "sys_exit_setregid",
        "syscalls",
        "privilege change: setregid",
        "4.7",
    ),
    tp(
        "sys_exit_setresgid",
        "syscalls",
        "privilege change: setresgid",
        "4.7",
    ),
    tp(
        "sys_exit_setfsgid",
        "syscalls",
        "privilege change: setfsgid",
        "4.7",
    ),
    tp(
        "sys_exit_capset",
        "syscalls",
        "privilege change: capset",
        "4.7",
    ),
];

const fn tp(
    name: &'static str,
    category: &'static str,
    purpose: &'static str,
    min_kernel: &'static str,
) -> ProgramSpec {
    ProgramSpec {
        name,
        attach: Attach::TracePoint { category, name },
        purpose,
        min_kernel,
    }
}

const fn raw(name: &'static str, purpose: &'static str, min_kernel: &'static str) -> ProgramSpec {
    ProgramSpec {
        name,
        attach: Attach::RawTracePoint { name },
        purpose,
        min_kernel,
    }
}

const fn cg(hook: &'static str, purpose: &'static str, min_kernel: &'static str) -> ProgramSpec {
    ProgramSpec {
        name: hook,
        attach: Attach::CgroupSockAddr { hook },
        purpose,
        min_kernel,
    }
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
    #[error(
        "cannot load the eBPF object: {0} (needs root, or CAP_BPF and CAP_PERFMON, on a kernel with BPF enabled)"
    )]
    Object(#[source] aya::EbpfError),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "programs not attached: {}; allow the gap explicitly with --allow-missing {}",
        .0.iter().map(|s| format!("{} ({})", s.program, s.reason.as_deref().unwrap_or("?"))).collect::<Vec<_>>().join(", "),
        .0.iter().map(|s| s.program).collect::<Vec<_>>().join(",")
    )]
    Missing(Vec<ProgramStatus>),
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
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            allow_missing: BTreeSet::new(),
            ring_bytes: 0,
            // Long enough to fold a tight loop, short enough that a second use a moment later
            // is its own event.
            fold_window: std::time::Duration::from_secs(1),
        }
    }
}

/// The kernel side, loaded and attached. Dropping it detaches every program.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub report: Vec<ProgramStatus>,
}

impl Loaded {
    /// The watch maps, handed to whoever keeps them in line with the watch list.
    pub fn take_watch_maps(&mut self) -> Result<crate::kernel_maps::WatchMaps, LoadError> {
        crate::kernel_maps::WatchMaps::take(&mut self.ebpf)
    }

    /// The fold map, read by the sweeper that reports fold tails.
    pub fn take_fold_map(&mut self) -> Result<crate::kernel_maps::FoldMap, LoadError> {
        crate::kernel_maps::FoldMap::take(&mut self.ebpf)
    }

    /// The event ring buffer, handed to the reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(LoadError::MissingMap("EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| LoadError::Map {
            name: "EVENTS",
            source,
        })
    }

    /// Records the kernel could not queue, per kind, summed over CPUs.
    pub fn lost_counts(&self) -> Result<Vec<(EventKind, u64)>, LoadError> {
        let map = self.ebpf.map("LOST").ok_or(LoadError::MissingMap("LOST"))?;
        let lost: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| LoadError::Map {
                name: "LOST",
                source,
            })?;
        EventKind::ALL
            .iter()
            .map(|&kind| {
                let per_cpu = lost
                    .get(&(kind as u32), 0)
                    .map_err(|source| LoadError::Map {
                        name: "LOST",
                        source,
                    })?;
                Ok((kind, per_cpu.iter().sum()))
            })
            .collect()
    }
}

fn prepare_host() -> Result<(), LoadError> {
    system::raise_memlock_limit();
    system::ensure_tracefs()?;
    system::ensure_bpffs()?;
    Ok(())
}

fn open_object(opts: &LoadOptions) -> Result<Ebpf, LoadError> {
    if crate::EBPF_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let offsets = KernelBtf::load()?.kernel_offsets()?;
    let config = SensorConfig {
        self_tgid: std::process::id(),
        _pad0: 0,
        fold_window_ns: opts.fold_window.as_nanos() as u64,
        offsets,
    };
    let mut loader = EbpfLoader::new();
    loader.override_global("CONFIG", &config, true);
    if opts.ring_bytes > 0 {
        loader.map_max_entries("EVENTS", opts.ring_bytes);
    }
    loader.load(crate::EBPF_OBJECT).map_err(LoadError::Object)
}

fn attach(ebpf: &mut Ebpf, spec: &ProgramSpec, cgroup: &CgroupRoot) -> Result<(), String> {
    let program = ebpf
        .program_mut(spec.name)
        .ok_or("not in the eBPF object")?;
    let loaded = |e: aya::programs::ProgramError| format!("load refused: {}", brief(&e));
    let attached = |e: aya::programs::ProgramError| {
        let cause = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        format!("attach failed: {e}{cause}")
    };
    match spec.attach {
        Attach::TracePoint { category, name } => {
            let p: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            p.load().map_err(loaded)?;
            p.attach(category, name).map_err(attached)?;
        }
        Attach::RawTracePoint { name } => {
            let p: &mut RawTracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            p.load().map_err(loaded)?;
            p.attach(name).map_err(attached)?;
        }
        Attach::CgroupSockAddr { .. } => {
            let root = cgroup.dir.as_ref().map_err(Clone::clone)?;
            let p: &mut CgroupSockAddr = program.try_into().map_err(|e| format!("{e}"))?;
            p.load().map_err(loaded)?;
            // On kernels with BPF links (5.7+) every cgroup link is multi-attach and the link
            // takes no flags; older kernels get the legacy attach, where this would be exclusive.
            p.attach(root, CgroupAttachMode::Single).map_err(attached)?;
        }
    }
    Ok(())
}

/// A load error in a few lines: the verifier's log is long; its last lines say why.
fn brief(e: &aya::programs::ProgramError) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= 4 {
        return lines.join(" / ");
    }
    let first = lines[0]
        .split(". Verifier output")
        .next()
        .unwrap_or(lines[0]);
    format!(
        "{first} … {}",
        lines[lines.len() - 4..lines.len() - 2].join(" / ")
    )
}

/// The cgroup2 root directory that cgroup hooks attach to, or why there is none.
struct CgroupRoot {
    dir: Result<std::fs::File, String>,
}

impl CgroupRoot {
    fn open() -> Self {
        let dir = system::cgroup2_mount()
            .map_err(|e| e.to_string())
            .and_then(|path| {
                std::fs::File::open(&path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))
            });
        Self { dir }
    }
}

fn attach_all(ebpf: &mut Ebpf) -> Vec<ProgramStatus> {
    let cgroup = CgroupRoot::open();
    PROGRAMS
        .iter()
        .map(|spec| {
            let outcome = attach(ebpf, spec, &cgroup);
            ProgramStatus {
                program: spec.name,
                attach: spec.attach.describe(),
                purpose: spec.purpose,
                min_kernel: spec.min_kernel,
                attached: outcome.is_ok(),
                reason: outcome.err(),
            }
        })
        .collect()
}

/// Loads and attaches every program; fails if one is missing that the operator did not allow.
pub fn load(opts: &LoadOptions) -> Result<Loaded, LoadError> {
    prepare_host()?;
    let mut ebpf = open_object(opts)?;
    let report = attach_all(&mut ebpf);
    let missing: Vec<_> = report
        .iter()
        .filter(|s| !s.attached && !opts.allow_missing.contains(s.program))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(LoadError::Missing(missing));
    }
    for gap in report.iter().filter(|s| !s.attached) {
        tracing::warn!(program = gap.program, reason = ?gap.reason, "program not attached (allowed by operator)");
    }
    Ok(Loaded { ebpf, report })
}

/// Tries every program and reports what works on this host, without failing on gaps.
pub fn probe() -> Result<Vec<ProgramStatus>, LoadError> {
    prepare_host()?;
    let mut ebpf = open_object(&LoadOptions::default())?;
    Ok(attach_all(&mut ebpf))
}
