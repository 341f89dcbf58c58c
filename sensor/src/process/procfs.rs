//! Reading one process's identity from a procfs tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::cgroup::parse_cgroup_path;
use super::info::ProcessInfo;
use super::tty::tty_name;

/// Where procfs is normally mounted.
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// `/proc/PID/loginuid` when no login session set it.
const LOGINUID_UNSET: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum ProcReadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: &'static str },
}

impl ProcReadError {
    /// True when the process is simply gone (or never was), the common and harmless case.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Read { source, .. }
            if matches!(source.kind(), io::ErrorKind::NotFound) || source.raw_os_error() == Some(libc::ESRCH))
    }
}

/// A procfs tree and the constants needed to turn its stamps into Unix time.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
    /// Add to a boot-clock stamp to get Unix time; taken once so a start time reads the same
    /// every time it is computed (pid-reuse checks compare them).
    boot_to_unix_ns: i128,
    clock_ticks_per_sec: u64,
    /// Where the cgroup2 hierarchy is mounted, to learn a cgroup's id (its directory's inode).
    cgroup_root: Option<PathBuf>,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new(DEFAULT_PROC_ROOT)
    }
}

impl ProcFs {
    /// A procfs tree at `root` (normally [`DEFAULT_PROC_ROOT`]), with this host's clocks.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        // SAFETY: sysconf has no memory effects.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let mut proc = Self::with_clock(
            root,
            crate::system::boot_to_unix_offset_ns(),
            u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100),
        );
        proc.cgroup_root = crate::system::cgroup2_mount().ok();
        proc
    }

    /// A procfs tree with explicit clock constants (for fake trees in tests).
    pub fn with_clock(root: impl Into<PathBuf>, boot_to_unix_ns: i128, ticks_per_sec: u64) -> Self {
        Self {
            root: root.into(),
            boot_to_unix_ns,
            clock_ticks_per_sec: ticks_per_sec.max(1),
            cgroup_root: None,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolution of `/proc/PID/stat` start times, in nanoseconds (one clock tick).
    pub fn start_time_resolution_ns(&self) -> u64 {
        1_000_000_000 / self.clock_ticks_per_sec
    }

    /// Path of `/proc/PID/<name>` in this tree.
    pub fn path(&self, pid: u32, name: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(name)
    }

    /// Pids of every process in the tree.
    pub fn pids(&self) -> Result<Vec<u32>, ProcReadError> {
        let entries = fs::read_dir(&self.root)
            .map_err(|source| ProcReadError::Read { path: self.root.clone(), source })?;
        Ok(entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
    }

    /// Reads everything `/proc` knows about `pid`. Only `stat` and `status` are required; the
    /// rest (exe, cmdline, cgroup, loginuid) stays empty when unreadable (kernel threads,
    /// a race with exit).
    pub fn read(&self, pid: u32) -> Result<ProcessInfo, ProcReadError> {
        let stat = self.read_stat(pid)?;
        let status_path = self.path(pid, "status");
        let status = read_string(&status_path)?;
        let uids = status_ids(&status, "Uid:")
            .ok_or(ProcReadError::Parse { path: status_path.clone(), reason: "no Uid line" })?;
        let gids = status_ids(&status, "Gid:")
            .ok_or(ProcReadError::Parse { path: status_path, reason: "no Gid line" })?;
        let cgroup_path = self.read_cgroup(pid).unwrap_or_default();
        let identity = parse_cgroup_path(&cgroup_path);
        Ok(ProcessInfo {
            pid,
            ppid: stat.ppid,
            uid: uids.0,
            euid: uids.1,
            gid: gids.0,
            login_uid: self.read_login_uid(pid),
            comm: stat.comm,
            exe: self.read_exe(pid).unwrap_or_default(),
            exe_sha256: None,
            exe_file: self.exe_file(pid),
            cmdline: self.read_cmdline(pid).unwrap_or_default(),
            cgroup_id: self.cgroup_id(&cgroup_path),
            cgroup_path,
            container_id: identity.container_id,
            pod_uid: identity.pod_uid,
            systemd_unit: identity.systemd_unit,
            start_time_ns: self.ticks_to_unix_ns(stat.start_ticks),
            tty: tty_name(stat.tty_nr),
            exited: None,
        })
    }

    /// Device (the kernel's encoding) and inode of the file `pid` runs.
    pub fn exe_file(&self, pid: u32) -> Option<(u32, u64)> {
        fs::metadata(self.path(pid, "exe")).ok().map(|meta| super::kernel_file_id(&meta))
    }

    /// The kernel's id of the cgroup at `path` (as `/proc/PID/cgroup` gives it): on cgroup v2
    /// the inode number of its directory. 0 when unknown.
    pub fn cgroup_id(&self, path: &str) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        let Some(root) = &self.cgroup_root else { return 0 };
        fs::metadata(root.join(path.trim_start_matches('/'))).map_or(0, |m| m.ino())
    }

    /// The path of the cgroup whose kernel id is `id`, as `/proc/PID/cgroup` shows it
    /// (`/system.slice/x.service`); `None` when it cannot be found (gone, no cgroup v2).
    ///
    /// Found from the id alone, so it names the cgroup of a process that has exited since: a
    /// cgroup v2 id is the kernfs node id of its directory, which the file-handle API takes as
    /// a handle (`FILEID_KERNFS`) on the cgroup2 mount.
    pub fn cgroup_path_of_id(&self, id: u64) -> Option<String> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        /// `FILEID_KERNFS` (`include/linux/exportfs.h`).
        const FILEID_KERNFS: i32 = 0xfe;
        /// A `struct file_handle` with its 8 bytes of kernfs id.
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        let root = self.cgroup_root.as_ref().filter(|_| id != 0)?;
        let mount = fs::File::open(root).ok()?;
        let mut handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id };
        // SAFETY: `handle` is a file_handle header followed by its `handle_bytes` bytes; the
        // returned fd, when valid, is owned here.
        let dir = unsafe {
            let fd = libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&raw mut handle).cast::<libc::file_handle>(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return None;
            }
            OwnedFd::from_raw_fd(fd)
        };
        let path = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
        let inside = path.strip_prefix(root).ok()?;
        Some(format!("/{}", inside.display()))
    }

    /// The path of a file `pid` holds open that `wanted` accepts (given its metadata).
    pub fn open_file_where(
        &self,
        pid: u32,
        wanted: impl Fn(fs::Metadata) -> bool,
    ) -> Option<PathBuf> {
        let fds = fs::read_dir(self.path(pid, "fd")).ok()?;
        fds.flatten()
            .filter(|fd| fs::metadata(fd.path()).is_ok_and(&wanted))
            .find_map(|fd| fs::read_link(fd.path()).ok().filter(|p| p.is_absolute()))
    }

    /// The working directory of `pid` (`/proc/PID/cwd`).
    pub fn read_cwd(&self, pid: u32) -> Result<PathBuf, ProcReadError> {
        let path = self.path(pid, "cwd");
        fs::read_link(&path).map_err(|source| ProcReadError::Read { path, source })
    }

    /// Start time of `pid`, Unix ns, from `/proc/PID/stat` alone (cheap identity check).
    pub fn start_time_ns(&self, pid: u32) -> Result<u64, ProcReadError> {
        Ok(self.ticks_to_unix_ns(self.read_stat(pid)?.start_ticks))
    }

    /// The executable's path (`/proc/PID/exe`), without the ` (deleted)` marker.
    pub fn read_exe(&self, pid: u32) -> Result<PathBuf, ProcReadError> {
        let path = self.path(pid, "exe");
        let target = fs::read_link(&path).map_err(|source| ProcReadError::Read { path, source })?;
        Ok(match target.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(stripped) => PathBuf::from(stripped),
            None => target,
        })
    }

    pub fn read_cmdline(&self, pid: u32) -> Result<Vec<String>, ProcReadError> {
        let path = self.path(pid, "cmdline");
        let bytes = fs::read(&path).map_err(|source| ProcReadError::Read { path, source })?;
        Ok(split_cmdline(&bytes))
    }

    /// The cgroup v2 path of `pid`.
    pub fn read_cgroup(&self, pid: u32) -> Result<String, ProcReadError> {
        let text = read_string(&self.path(pid, "cgroup"))?;
        // cgroup v2 is the `0::` line, also present on hybrid hierarchies.
        Ok(text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_string())
    }

    fn read_login_uid(&self, pid: u32) -> Option<u32> {
        let text = read_string(&self.path(pid, "loginuid")).ok()?;
        text.trim().parse().ok().filter(|uid| *uid != LOGINUID_UNSET)
    }

    fn read_stat(&self, pid: u32) -> Result<Stat, ProcReadError> {
        let path = self.path(pid, "stat");
        let text = read_string(&path)?;
        parse_stat(&text).ok_or(ProcReadError::Parse { path, reason: "malformed stat line" })
    }

    fn ticks_to_unix_ns(&self, ticks: u64) -> u64 {
        let since_boot = i128::from(ticks) * 1_000_000_000 / i128::from(self.clock_ticks_per_sec);
        u64::try_from(since_boot + self.boot_to_unix_ns).unwrap_or(0)
    }
}

fn read_string(path: &Path) -> Result<String, ProcReadError> {
    fs::read_to_string(path)
        .map_err(|source| ProcReadError::Read { path: path.to_path_buf(), source })
}

/// The `/proc/PID/stat` fields the table needs.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    ppid: u32,
    tty_nr: u32,
    start_ticks: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split at the last `)`.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // Field n of proc(5) is fields[n - 3]: ppid is 4, tty_nr 7, starttime 22.
    Some(Stat {
        comm,
        ppid: fields.get(1)?.parse().ok()?,
        tty_nr: fields.get(4)?.parse::<i32>().ok()? as u32,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// Real and effective ids from a `Uid:`/`Gid:` line of `/proc/PID/status`.
fn status_ids(status: &str, key: &str) -> Option<(u32, u32)> {
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    let mut ids = line.split_whitespace().map(str::parse::<u32>);
    Some((ids.next()?.ok()?, ids.next()?.ok()?))
}

/// Arguments from NUL-separated bytes (`/proc/PID/cmdline`, an exec record).
pub fn split_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|b| *b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "4242 (my (odd) prog) S 1 4242 4242 34819 4242 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 200 18446744073709551615";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(
            stat,
            Stat { comm: "my (odd) prog".into(), ppid: 1, tty_nr: 34819, start_ticks: 123456 }
        );
        assert_eq!(parse_stat("1 (x) S 0"), None);
    }

    #[test]
    fn parses_status_ids() {
        let status = "Name:\tsudo\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(status_ids(status, "Uid:"), Some((1000, 0)));
        assert_eq!(status_ids(status, "Gid:"), Some((1000, 1000)));
        assert_eq!(status_ids(status, "Foo:"), None);
    }

    #[test]
    fn splits_cmdline() {
        assert_eq!(split_cmdline(b"sleep\x0030\x00"), vec!["sleep", "30"]);
        assert_eq!(split_cmdline(b"a\x00\x00b\x00"), vec!["a", "", "b"]);
        assert!(split_cmdline(b"").is_empty());
    }
}
