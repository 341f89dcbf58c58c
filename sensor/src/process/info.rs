//! What the sensor knows about one process.

use std::path::PathBuf;

use serde::Serialize;

/// Identity of one process, as far as the table knows it (see the "Identity of a process" part
/// of the design brief). Fields the sensor could not read stay empty rather than guessed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// Process id (thread-group id).
    pub pid: u32,
    /// Parent process id at the time of the last fork/exec/read.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// Audit login uid; `None` when unset (`4294967295`), i.e. not part of a login session.
    pub login_uid: Option<u32>,
    /// Kernel command name (at most 15 bytes).
    pub comm: String,
    /// Executable path; for an exec event, the path the kernel executed.
    pub exe: PathBuf,
    /// Hex SHA-256 of the executable, once [`super::ExeHasher`] has computed it.
    pub exe_sha256: Option<String>,
    /// The executed file itself: device (the kernel's encoding) and inode, from the exec
    /// record or `/proc/PID/exe`; `None` when unknown. Whatever `exe` names now, only this file
    /// is hashed as the process's program.
    pub exe_file: Option<(u32, u64)>,
    /// Arguments, `argv[0]` first.
    pub cmdline: Vec<String>,
    /// cgroup v2 path (the `0::` line of `/proc/PID/cgroup`).
    pub cgroup_path: String,
    /// The kernel's id of that cgroup, once an event told it (0 until then).
    pub cgroup_id: u64,
    /// Container id found in the cgroup path (docker, containerd, cri-o, podman).
    pub container_id: Option<String>,
    /// Kubernetes pod UID found in the cgroup path.
    pub pod_uid: Option<String>,
    /// systemd unit (`.service` or `.scope`) nearest the leaf of the cgroup path.
    pub systemd_unit: Option<String>,
    /// Start time, Unix nanoseconds. Distinguishes a recycled pid from its previous owner.
    pub start_time_ns: u64,
    /// Controlling terminal (`pts/3`, `tty1`), `None` without one.
    pub tty: Option<String>,
    /// Exit time, Unix nanoseconds; `Some` for an exited process kept for late lookups.
    pub exited: Option<u64>,
}

impl ProcessInfo {
    /// An entry known only from an event, before (or without) anything read from `/proc`.
    pub fn minimal(pid: u32, start_time_ns: u64) -> Self {
        Self {
            pid,
            ppid: 0,
            uid: 0,
            euid: 0,
            gid: 0,
            login_uid: None,
            comm: String::new(),
            exe: PathBuf::new(),
            exe_sha256: None,
            exe_file: None,
            cmdline: Vec::new(),
            cgroup_path: String::new(),
            cgroup_id: 0,
            container_id: None,
            pod_uid: None,
            systemd_unit: None,
            start_time_ns,
            tty: None,
            exited: None,
        }
    }

    /// True while the process has not been seen exiting.
    pub fn is_alive(&self) -> bool {
        self.exited.is_none()
    }
}

/// One link of a parent chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: PathBuf,
    pub comm: String,
    /// Start time, Unix nanoseconds.
    pub start_time_ns: u64,
}

impl From<&ProcessInfo> for Ancestor {
    fn from(info: &ProcessInfo) -> Self {
        Self {
            pid: info.pid,
            exe: info.exe.clone(),
            comm: info.comm.clone(),
            start_time_ns: info.start_time_ns,
        }
    }
}

/// A file as the kernel's records name it: device in the kernel's encoding, and inode — what
/// [`ProcessInfo::exe_file`] and an exec record's executed file hold.
pub fn kernel_file_id(meta: &std::fs::Metadata) -> (u32, u64) {
    use std::os::unix::fs::MetadataExt as _;
    (crate::watch::kernel_dev(meta.dev()), meta.ino())
}
