//! Loads the kernel object, configures it for this kernel and attaches its programs.
//!
//! [`PROGRAMS`] is the one table of what attaches where; `keywatch-sensor probe` prints it with
//! the outcome on this host. A program that fails is never a silent gap: the sensor refuses to
//! start unless the operator allowed that gap by name.

use std::collections::BTreeSet;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
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
}

impl Attach {
    pub fn describe(&self) -> String {
        match self {
            Attach::TracePoint { category, name } => format!("tracepoint/{category}/{name}"),
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
pub const PROGRAMS: &[ProgramSpec] = &[ProgramSpec {
    name: "sched_process_exec",
    attach: Attach::TracePoint {
        category: "sched",
        name: "sched_process_exec",
    },
    purpose: "process lifecycle: exec",
    min_kernel: "4.7",
}];

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
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Programs whose absence the operator accepts.
    pub allow_missing: BTreeSet<String>,
    /// Ring buffer size in bytes (power of two, multiple of the page size); 0 keeps the default.
    pub ring_bytes: u32,
}

/// The kernel side, loaded and attached. Dropping it detaches every program.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub report: Vec<ProgramStatus>,
}

impl Loaded {
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
        offsets,
    };
    let mut loader = EbpfLoader::new();
    loader.override_global("CONFIG", &config, true);
    if opts.ring_bytes > 0 {
        loader.map_max_entries("EVENTS", opts.ring_bytes);
    }
    loader.load(crate::EBPF_OBJECT).map_err(LoadError::Object)
}

fn attach(ebpf: &mut Ebpf, spec: &ProgramSpec) -> Result<(), String> {
    let program = ebpf
        .program_mut(spec.name)
        .ok_or("not in the eBPF object")?;
    match spec.attach {
        Attach::TracePoint { category, name } => {
            let tp: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            tp.load().map_err(|e| format!("load refused: {e}"))?;
            tp.attach(category, name)
                .map_err(|e| format!("attach failed: {e}"))?;
        }
    }
    Ok(())
}

fn attach_all(ebpf: &mut Ebpf) -> Vec<ProgramStatus> {
    PROGRAMS
        .iter()
        .map(|spec| {
            let outcome = attach(ebpf, spec);
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
