//! Host preparation: the filesystems the sensor needs (tracefs, bpffs), the cgroup2 mount, and
//! resource limits.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

/// Where tracefs is expected; tracepoint attach reads event ids from it.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where bpffs is expected; pinned maps and links live under it.
pub const BPFFS: &str = "/sys/fs/bpf";

const TRACEFS_MAGIC: i64 = 0x7472_6163;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("cannot mount {fstype} at {target}: {source}")]
    Mount { fstype: &'static str, target: String, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("no cgroup2 mount in /proc/self/mountinfo")]
    NoCgroup2,
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

fn mount(fstype: &'static str, target: &str) -> Result<(), SystemError> {
    let err = |source| SystemError::Mount { fstype, target: target.to_string(), source };
    fs::create_dir_all(target).map_err(err)?;
    let src = CString::new(fstype).expect("no NUL");
    let dst = CString::new(target).expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    tracing::info!(fstype, target, "mounted");
    Ok(())
}

/// Mounts tracefs at [`TRACEFS`] unless it is already there.
pub fn ensure_tracefs() -> Result<(), SystemError> {
    if fs_magic(Path::new(TRACEFS)) == Some(TRACEFS_MAGIC) {
        return Ok(());
    }
    mount("tracefs", TRACEFS)
}

/// Mounts bpffs at [`BPFFS`] unless it is already there.
pub fn ensure_bpffs() -> Result<(), SystemError> {
    if fs_magic(Path::new(BPFFS)) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    mount("bpf", BPFFS)
}

/// Lifts RLIMIT_MEMLOCK for kernels that still charge BPF maps against it (before 5.11).
pub fn raise_memlock_limit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// The cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, SystemError> {
    let path = "/proc/self/mountinfo";
    let text = fs::read_to_string(path)
        .map_err(|source| SystemError::Read { path: path.to_string(), source })?;
    parse_cgroup2_mount(&text).ok_or(SystemError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // Fields: id parent major:minor root mount-point options [optional…] - fstype source super
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Capabilities the sensor needs that this process lacks (empty for root). CAP_SYS_ADMIN
/// mounts tracefs/bpffs and attaches cgroup programs; CAP_BPF and CAP_PERFMON load and attach.
pub fn missing_capabilities() -> Vec<&'static str> {
    const NEEDED: [(u32, &str); 3] = [(21, "CAP_SYS_ADMIN"), (38, "CAP_PERFMON"), (39, "CAP_BPF")];
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    NEEDED.iter().filter(|(bit, _)| effective & (1 << bit) == 0).map(|(_, name)| *name).collect()
}

/// Hands memory freed after start-up (BTF parsing, the object image, /proc walks) back to the
/// system: glibc keeps it otherwise, and an idle sensor's footprint is what operators see.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Kernel release (`uname -r`).
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Offset to add to a `CLOCK_BOOTTIME` nanosecond stamp to get Unix time.
pub fn boot_to_unix_offset_ns() -> i128 {
    fn now(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: valid clock id and out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    }
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_BOOTTIME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount_among_others() {
        let info = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
35 24 0:30 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
36 24 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("22 1 0:21 / /proc rw - proc proc rw\n"), None);
    }
}
