//! The process table, kept exact by lifecycle events.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;

use super::cgroup::parse_cgroup_path;
use super::info::{Ancestor, ProcessInfo};
use super::procfs::{ProcFs, ProcReadError};

/// What the kernel reported about one exec (see [`ProcessTable::on_exec`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecFacts {
    /// The file name the kernel executed, as the caller gave it.
    pub filename: String,
    /// Device (kernel encoding) and inode of the executed file, when known.
    pub exe: Option<(u32, u64)>,
    /// The executed file's own name (`memfd:NAME` for a program run from memory).
    pub exe_name: String,
    /// Arguments, `argv[0]` first.
    pub args: Vec<String>,
    /// `args` holds only the first bytes of longer arguments.
    pub args_cut: bool,
    /// comm after the exec.
    pub comm: String,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub login_uid: Option<u32>,
    /// The cgroup the process runs in.
    pub cgroup_id: u64,
}

/// How long an exited process stays resolvable: events are read from the ring buffer in batches
/// and may name a process that has exited since.
pub const DEFAULT_RETENTION_NS: u64 = 60 * 1_000_000_000;
/// Most exited processes kept at once, whatever their age: a host starting thousands of short
/// processes a second (a build, a fork bomb) would otherwise grow the table by ~1.5 KiB each
/// for the whole retention period. Events are read within milliseconds, so the newest of these
/// are the ones that can still be named.
pub const DEFAULT_MAX_EXITED: usize = 8 * 1024;

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
    max_exited: usize,
    /// Per pid, the processes that held it, oldest first. Only the last can be alive.
    entries: FxHashMap<u32, Vec<ProcessInfo>>,
    /// Exited processes in exit order: (exit time, pid, start time), for garbage collection.
    exits: VecDeque<(u64, u32, u64)>,
    /// Cgroup paths by kernel id, each looked up once ([`ProcFs::cgroup_path_of_id`]); ids
    /// are never reused, so an entry never goes stale — nor does a miss (a cgroup removed, or
    /// no right to open by handle), which would otherwise cost a lookup per event.
    cgroup_paths: FxHashMap<u64, Option<String>>,
}

/// Most cgroup paths remembered by id; the cache starts over beyond it (a host creating
/// cgroups endlessly, one per container or job, must not grow the sensor).
const CGROUP_PATHS_MAX: usize = 4096;

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
            max_exited: DEFAULT_MAX_EXITED,
            entries: FxHashMap::default(),
            exits: VecDeque::new(),
            cgroup_paths: FxHashMap::default(),
        }
    }

    /// Keeps exited processes for `retention_ns` instead of the default.
    pub fn with_retention(mut self, retention_ns: u64) -> Self {
        self.retention_ns = retention_ns;
        self
    }

    /// Keeps at most `max_exited` exited processes instead of [`DEFAULT_MAX_EXITED`].
    pub fn with_max_exited(mut self, max_exited: usize) -> Self {
        self.max_exited = max_exited;
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

    /// `pid` executed a program; `exec` is what the kernel reported at that moment, which is
    /// authoritative: it stays right for a process that is gone before anyone looks at `/proc`.
    /// The rest (tty, session, cgroup while its id is unchanged) is inherited from the fork;
    /// `/proc` is read only for what the record cannot tell: a cgroup the process moved to, a
    /// relative file name, arguments longer than the record holds, or a process whose fork was
    /// missed.
    pub fn on_exec(&mut self, pid: u32, exec: ExecFacts, time_ns: u64) {
        self.gc(time_ns);
        let alive = self.entries.get(&pid).and_then(|v| v.last()).is_some_and(|e| e.is_alive());
        if !alive {
            // Unknown, or the pid was recycled and its fork was missed.
            let tolerance = self.tolerance_ns();
            let base = self
                .proc
                .read(pid)
                .ok()
                .filter(|f| f.start_time_ns <= time_ns + tolerance)
                .unwrap_or_else(|| ProcessInfo::minimal(pid, time_ns));
            self.push_new(base, time_ns);
        }
        let Some((ppid, moved)) = self.get(pid).map(|e| (e.ppid, e.cgroup_id != exec.cgroup_id))
        else {
            return;
        };
        let exe = self.exe_path(pid, ppid, &exec);
        let cmdline = match exec.args_cut {
            // /proc has them whole while the process lives and still runs these arguments.
            true => self
                .proc
                .read_cmdline(pid)
                .ok()
                .filter(|full| full.len() >= exec.args.len() && full.first() == exec.args.first())
                .unwrap_or(exec.args),
            false => exec.args,
        };
        let Some(entry) = self.entries.get_mut(&pid).and_then(|v| v.last_mut()) else { return };
        entry.comm = if exec.comm.is_empty() { comm_of(&exe) } else { exec.comm };
        entry.exe = exe;
        entry.exe_sha256 = None;
        entry.exe_file = exec.exe;
        entry.cmdline = cmdline;
        entry.uid = exec.uid;
        entry.euid = exec.euid;
        entry.gid = exec.gid;
        entry.login_uid = exec.login_uid;
        // Not found by id (gone already, or no cgroup v2 mount): where /proc says the process
        // is now, with that cgroup's own id so that the two always agree.
        if moved
            && exec.cgroup_id != 0
            && let Some((path, id)) = self.locate_cgroup(pid, exec.cgroup_id)
            && let Some(entry) = self.entries.get_mut(&pid).and_then(|v| v.last_mut())
        {
            set_cgroup(entry, path, id);
        }
    }

    /// The kernel saw `pid` in cgroup `id` (an event's record): when the table has it
    /// elsewhere — it moved, with or without an exec — its cgroup, container, pod and unit
    /// follow, found from the id alone, so a process that has exited since is still placed
    /// right; where the id cannot be opened (no right to open by handle), `/proc` says, if the
    /// process is still in that very cgroup. False when neither could tell (the entry is left
    /// as it was, its old id included, so that the next event tries again).
    pub fn follow_cgroup(&mut self, pid: u32, id: u64) -> bool {
        let Some(known) = self.get(pid).map(|e| e.cgroup_id) else { return false };
        if id == 0 || known == id {
            return true;
        }
        let Some((path, _)) = self.locate_cgroup(pid, id).filter(|&(_, at)| at == id) else {
            return false;
        };
        if let Some(entry) = self.entries.get_mut(&pid).and_then(|v| v.last_mut()) {
            set_cgroup(entry, path, id);
        }
        true
    }

    /// Where `pid` runs, the kernel having seen it in cgroup `id`: that cgroup's path, found
    /// from the id; else `/proc/PID/cgroup` with the id of the path read there (another one
    /// when the process has moved again since).
    fn locate_cgroup(&mut self, pid: u32, id: u64) -> Option<(String, u64)> {
        if let Some(path) = self.cgroup_path(id) {
            return Some((path, id));
        }
        let path = self.proc.read_cgroup(pid).ok()?;
        let at = self.proc.cgroup_id(&path);
        Some((path, at))
    }

    /// The path of cgroup `id`, remembered once looked up.
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if let Some(known) = self.cgroup_paths.get(&id) {
            return known.clone();
        }
        let path = self.proc.cgroup_path_of_id(id);
        if self.cgroup_paths.len() >= CGROUP_PATHS_MAX {
            self.cgroup_paths.clear();
        }
        self.cgroup_paths.insert(id, path.clone());
        path
    }

    /// The path of the file `pid` executed. The kernel's file name when it is one from the
    /// root; a name relative to the caller's directory, or a descriptor's (`/dev/fd/N`,
    /// `/proc/self/fd/N`: `fexecve`, `execveat`), says little, so then `/proc`'s link (while
    /// the process lives), else the name under the parent's working directory — each only
    /// when it is the very file the kernel executed — else, for a program run from memory,
    /// `/memfd:NAME` as `/proc` shows it, else for a descriptor's name the file the parent
    /// holds open if it is the one executed. The name as given when none of these is.
    fn exe_path(&self, pid: u32, ppid: u32, exec: &ExecFacts) -> PathBuf {
        let name = Path::new(&exec.filename);
        let by_fd = names_a_descriptor(name);
        if name.is_absolute() && !by_fd {
            return name.to_path_buf();
        }
        let is_executed = |meta: std::fs::Metadata| exec.exe == Some(super::kernel_file_id(&meta));
        // A deleted or memfd program has no path to check: its link is taken as the kernel's.
        if let Ok(linked) = self.proc.read_exe(pid)
            && std::fs::metadata(&linked).map_or(true, is_executed)
        {
            return linked;
        }
        if !by_fd && let Ok(cwd) = self.proc.read_cwd(ppid) {
            // `components` drops the `.` of `./name`.
            let joined: PathBuf = cwd.join(name).components().collect();
            if std::fs::metadata(&joined).is_ok_and(is_executed) {
                return joined;
            }
        }
        if exec.exe_name.starts_with("memfd:") {
            return PathBuf::from(format!("/{}", exec.exe_name));
        }
        // `fexecve` of a file the parent opened before forking: the parent often still has it.
        if by_fd && let Some(held) = self.proc.open_file_where(ppid, is_executed) {
            return held;
        }
        name.to_path_buf()
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

    /// Drops exited processes whose retention ended before `now_ns` (Unix ns), and the oldest
    /// exited ones beyond the cap ([`Self::with_max_exited`]). The lifecycle calls run this
    /// themselves; call it on a timer when events are rare.
    pub fn gc(&mut self, now_ns: u64) {
        while let Some(&(exit_ns, pid, start)) = self.exits.front() {
            let expired = exit_ns.saturating_add(self.retention_ns) <= now_ns;
            if !expired && self.exits.len() <= self.max_exited {
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

/// `entry` runs in the cgroup at `path`, whose kernel id is `id`.
fn set_cgroup(entry: &mut ProcessInfo, path: String, id: u64) {
    let identity = parse_cgroup_path(&path);
    entry.cgroup_path = path;
    entry.cgroup_id = id;
    entry.container_id = identity.container_id;
    entry.pod_uid = identity.pod_uid;
    entry.systemd_unit = identity.systemd_unit;
}

/// True for a path that names an open descriptor (`/dev/fd/N`, `/proc/PID/fd/N`): meaningful
/// only to the process that held it.
pub fn names_a_descriptor(path: &Path) -> bool {
    let mut parts = path.components().skip(1).map(|c| c.as_os_str());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(dev), Some(fd), _) if dev == "dev" && fd == "fd" => true,
        (Some(proc), Some(_), Some(fd)) if proc == "proc" && fd == "fd" => true,
        _ => false,
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
