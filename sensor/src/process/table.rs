//! The process table, kept exact by lifecycle events.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use super::info::{Ancestor, ProcessInfo};
use super::procfs::{ProcFs, ProcReadError};

/// How long an exited process stays resolvable: events are read from the ring buffer in batches
/// and may name a process that has exited since.
pub const DEFAULT_RETENTION_NS: u64 = 60 * 1_000_000_000;

/// Longest comm the kernel keeps (TASK_COMM_LEN - 1).
const COMM_LEN: usize = 15;

/// Every process on the host, by pid, with the processes that held each pid before.
///
/// Feed it the kernel's `sched_process_fork/exec/exit` events in order ([`Self::on_fork`],
/// [`Self::on_exec`], [`Self::on_exit`]) after [`Self::seed_from_proc`] at start. Lookups take
/// `&self` except where they may read `/proc`. Not internally synchronised: own it in the task
/// that consumes events, or wrap it in a mutex; every method is quick (a few small `/proc`
/// reads at most, never hashing).
#[derive(Debug)]
pub struct ProcessTable {
    proc: ProcFs,
    retention_ns: u64,
    /// Per pid, the processes that held it, oldest first. Only the last can be alive.
    entries: HashMap<u32, Vec<ProcessInfo>>,
    /// Exited processes in exit order: (exit time, pid, start time), for garbage collection.
    exits: VecDeque<(u64, u32, u64)>,
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::new(ProcFs::default())
    }
}

impl ProcessTable {
    /// An empty table reading `/proc` from `proc`, with [`DEFAULT_RETENTION_NS`].
    pub fn new(proc: ProcFs) -> Self {
        Self {
            proc,
            retention_ns: DEFAULT_RETENTION_NS,
            entries: HashMap::new(),
            exits: VecDeque::new(),
        }
    }

    /// Keeps exited processes for `retention_ns` instead of the default.
    pub fn with_retention(mut self, retention_ns: u64) -> Self {
        self.retention_ns = retention_ns;
        self
    }

    pub fn proc_fs(&self) -> &ProcFs {
        &self.proc
    }

    /// Number of entries, exited ones in retention included.
    pub fn len(&self) -> usize {
        self.entries.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Loads every process in `/proc`; returns how many were read. Processes already in the
    /// table are refreshed; a pid whose start time changed is a new process.
    pub fn seed_from_proc(&mut self) -> Result<usize, ProcReadError> {
        let mut count = 0;
        for pid in self.proc.pids()? {
            match self.proc.read(pid) {
                Ok(info) => {
                    count += 1;
                    self.upsert_from_proc(info);
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::debug!(pid, error = %e, "skipping process while seeding"),
            }
        }
        Ok(count)
    }

    /// A new process: `child_pid` starts as a copy of its parent and keeps that identity until
    /// it execs. Call for new thread groups only (`sched_process_fork` also fires for threads:
    /// skip it when the child's pid is not its tgid).
    pub fn on_fork(&mut self, parent_pid: u32, child_pid: u32, time_ns: u64) {
        self.gc(time_ns);
        let child = match self.get_or_load(parent_pid) {
            Some(parent) if parent.is_alive() || parent.exited >= Some(time_ns) => {
                let mut child = parent.clone();
                child.pid = child_pid;
                child.ppid = parent_pid;
                child.start_time_ns = time_ns;
                child.exited = None;
                child
            }
            _ => match self.read_matching(child_pid, time_ns) {
                Some(info) => info,
                None => {
                    let mut child = ProcessInfo::minimal(child_pid, time_ns);
                    child.ppid = parent_pid;
                    child
                }
            },
        };
        self.push_new(child, time_ns);
    }

    /// `pid` executed `exe_from_kernel`. The kernel's path is authoritative; uid, cgroup, tty
    /// and the like are re-read from `/proc` while the process still exists, else the inherited
    /// values stay. The command line is taken from `/proc` only when `/proc` still shows this
    /// exe (a later exec may already have replaced it), else left empty: an inherited command
    /// line would describe the parent's program.
    pub fn on_exec(&mut self, pid: u32, exe_from_kernel: &str, time_ns: u64) {
        self.gc(time_ns);
        let tolerance = self.tolerance_ns();
        let fresh = self.proc.read(pid).ok();
        let current = self.entries.get_mut(&pid).and_then(|v| v.last_mut());
        let entry = match current {
            Some(entry) if entry.is_alive() => entry,
            _ => {
                // Unknown, or the pid was recycled and its fork was missed.
                let base = fresh
                    .clone()
                    .filter(|f| f.start_time_ns <= time_ns + tolerance)
                    .unwrap_or_else(|| ProcessInfo::minimal(pid, time_ns));
                self.push_new(base, time_ns);
                let Some(entry) = self.entries.get_mut(&pid).and_then(|v| v.last_mut()) else {
                    return;
                };
                entry
            }
        };
        let exe = Path::new(exe_from_kernel);
        let same_process = fresh
            .as_ref()
            .is_some_and(|f| f.start_time_ns.abs_diff(entry.start_time_ns) <= tolerance);
        match fresh.filter(|_| same_process) {
            Some(fresh) => {
                let same_exe = fresh.exe == exe;
                let start_time_ns = entry.start_time_ns;
                let old_comm = std::mem::take(&mut entry.comm);
                *entry = ProcessInfo {
                    start_time_ns,
                    comm: if same_exe { fresh.comm.clone() } else { old_comm },
                    cmdline: if same_exe { fresh.cmdline.clone() } else { Vec::new() },
                    ..fresh
                };
                if !same_exe {
                    entry.comm = comm_of(exe);
                }
            }
            None => {
                entry.comm = comm_of(exe);
                entry.cmdline.clear();
            }
        }
        entry.exe = exe.to_path_buf();
        entry.exe_sha256 = None;
    }

    /// `pid` exited. It stays resolvable for the retention period, then a later call drops it.
    pub fn on_exit(&mut self, pid: u32, time_ns: u64) {
        self.gc(time_ns);
        if let Some(entry) = self.entries.get_mut(&pid).and_then(|v| v.last_mut())
            && entry.is_alive()
        {
            entry.exited = Some(time_ns);
            self.exits.push_back((time_ns, pid, entry.start_time_ns));
        }
    }

    /// Drops exited processes whose retention ended before `now_ns` (Unix ns). The lifecycle
    /// calls run this themselves; call it on a timer when events are rare.
    pub fn gc(&mut self, now_ns: u64) {
        while let Some(&(exit_ns, pid, start)) = self.exits.front() {
            if exit_ns.saturating_add(self.retention_ns) > now_ns {
                break;
            }
            self.exits.pop_front();
            if let Some(list) = self.entries.get_mut(&pid) {
                list.retain(|p| p.is_alive() || p.start_time_ns != start);
                if list.is_empty() {
                    self.entries.remove(&pid);
                }
            }
        }
    }

    /// The newest process that had `pid` (possibly exited, within retention).
    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.entries.get(&pid)?.last()
    }

    /// The process that had `pid` at `time_ns` (Unix ns): the newest one started by then.
    /// Use it for events read late, when the pid may have been recycled since.
    pub fn get_at(&self, pid: u32, time_ns: u64) -> Option<&ProcessInfo> {
        let tolerance = self.tolerance_ns();
        self.entries
            .get(&pid)?
            .iter()
            .rev()
            .find(|p| p.start_time_ns <= time_ns.saturating_add(tolerance))
    }

    /// Like [`Self::get`], reading `/proc` when the pid is unknown or its entry has exited and
    /// `/proc` shows a different (newer) process.
    pub fn get_or_load(&mut self, pid: u32) -> Option<&ProcessInfo> {
        let known_alive = self.get(pid).map(ProcessInfo::is_alive);
        if known_alive != Some(true) {
            match self.proc.read(pid) {
                Ok(info) => self.upsert_from_proc(info),
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::debug!(pid, error = %e, "cannot read process"),
            }
        }
        self.get(pid)
    }

    /// The parent chain of `pid`, nearest first, at most `max` links. Each parent is the
    /// process that held the parent pid when the child started, so exited ancestors (within
    /// retention) resolve and a recycled parent pid does not.
    pub fn ancestors(&mut self, pid: u32, max: usize) -> Vec<Ancestor> {
        let mut chain = Vec::new();
        let Some(mut current) = self.get_or_load(pid).cloned() else {
            return chain;
        };
        while chain.len() < max && current.ppid != 0 && current.ppid != current.pid {
            let Some(parent) = self.parent_of(current.ppid, current.start_time_ns) else {
                break;
            };
            chain.push(Ancestor::from(&parent));
            current = parent;
        }
        chain
    }

    /// Records the hash of `exe` for `pid`, if that process (by start time) still runs it.
    /// Returns whether it was stored. Pair with [`super::ExeHasher`].
    pub fn set_exe_sha256(
        &mut self,
        pid: u32,
        start_time_ns: u64,
        exe: &Path,
        sha256: String,
    ) -> bool {
        let Some(entry) = self
            .entries
            .get_mut(&pid)
            .and_then(|v| v.iter_mut().rev().find(|p| p.start_time_ns == start_time_ns))
        else {
            return false;
        };
        if entry.exe != exe {
            return false;
        }
        entry.exe_sha256 = Some(sha256);
        true
    }

    fn parent_of(&mut self, ppid: u32, child_start_ns: u64) -> Option<ProcessInfo> {
        let limit = child_start_ns.saturating_add(self.tolerance_ns());
        if let Some(found) =
            self.entries.get(&ppid).and_then(|v| v.iter().rev().find(|p| p.start_time_ns <= limit))
        {
            return Some(found.clone());
        }
        let info = self.read_matching(ppid, child_start_ns)?;
        self.upsert_from_proc(info.clone());
        Some(info)
    }

    /// `/proc` view of `pid` if that process started by `time_ns` (is not a later owner).
    fn read_matching(&self, pid: u32, time_ns: u64) -> Option<ProcessInfo> {
        let info = self.proc.read(pid).ok()?;
        (info.start_time_ns <= time_ns.saturating_add(self.tolerance_ns())).then_some(info)
    }

    /// Start times from `/proc` have clock-tick resolution, those from events nanoseconds.
    fn tolerance_ns(&self) -> u64 {
        2 * self.proc.start_time_resolution_ns()
    }

    fn upsert_from_proc(&mut self, info: ProcessInfo) {
        let tolerance = self.tolerance_ns();
        if let Some(entry) = self.entries.get_mut(&info.pid).and_then(|v| v.last_mut())
            && entry.start_time_ns.abs_diff(info.start_time_ns) <= tolerance
        {
            if entry.is_alive() {
                let keep_hash = (entry.exe == info.exe).then(|| entry.exe_sha256.take());
                let start_time_ns = entry.start_time_ns;
                *entry = ProcessInfo { start_time_ns, exe_sha256: keep_hash.flatten(), ..info };
            }
            return;
        }
        let start = info.start_time_ns;
        self.push_new(info, start);
    }

    /// Adds a process as the current holder of its pid. A previous holder still marked alive
    /// has exited unseen; it is closed at `time_ns`.
    fn push_new(&mut self, info: ProcessInfo, time_ns: u64) {
        let list = self.entries.entry(info.pid).or_default();
        if let Some(previous) = list.last_mut()
            && previous.is_alive()
        {
            previous.exited = Some(time_ns);
            self.exits.push_back((time_ns, previous.pid, previous.start_time_ns));
        }
        list.push(info);
    }
}

/// The comm the kernel gives a process that executed `exe`.
fn comm_of(exe: &Path) -> String {
    let name = exe.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let mut end = name.len().min(COMM_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}
