//! Decoding ring-buffer records into sensor events. Checked: a short or unknown record is an
//! error, never a transmute.

use std::mem::size_of;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sensor_ebpf::{
    ConnectEvent, CredChangeEvent, CredSyscall, EventHeader, EventKind, ExecEvent, ExitEvent,
    FileMatch, FileOpenEvent, FoldKey, ForkEvent, SecretEvent, SecretMethod,
};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {kind} layout ({need} bytes)")]
    Short { kind: &'static str, len: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("unknown {what} {value}")]
    UnknownValue { what: &'static str, value: u32 },
}

/// The process that caused an event, as the kernel saw it at that moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessRef {
    /// Process id (thread-group id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Audit login uid; `None` when unset (not a login session).
    pub login_uid: Option<u32>,
    pub comm: String,
    pub cgroup_id: u64,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Detail {
    /// A program was executed.
    Exec {
        /// The file name the kernel executed.
        filename: String,
        /// Thread id before exec (differs from `pid` when a non-leader thread execs).
        old_pid: u32,
        /// Mode bits of the executed file (setuid 0o4000, setgid 0o2000).
        exe_mode: u32,
        /// Device (kernel encoding) and inode of the executed file; 0 when unknown.
        exe_dev: u32,
        exe_ino: u64,
        /// The executed file's own name (`memfd:NAME` for a program run from memory).
        exe_name: String,
        /// Arguments as the kernel saw them at exec, `argv[0]` first.
        args: Vec<String>,
        /// The record carried only the first bytes of the arguments.
        args_cut: bool,
        egid: u32,
        cap_effective: u64,
    },
    /// A new process.
    Fork { child_pid: u32 },
    /// A process exited.
    Exit { exit_code: u32 },
    /// A watched file (or a file in a watched directory) was opened.
    FileOpen {
        watch_id: u32,
        /// `file` (the inode is watched) or `dir` (its directory is).
        matched: &'static str,
        /// The opened file's own name (the dentry the kernel opened).
        name: String,
        dev: u32,
        ino: u64,
        parent_ino: u64,
        /// open(2) flags.
        flags: u32,
        /// Opened for writing (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC or O_APPEND).
        write: bool,
        /// Found open at the sensor's start (see [`crate::held`]), not an open the kernel saw.
        held: bool,
    },
    /// Another process's secrets were touched.
    Secret {
        method: &'static str,
        target_pid: u32,
        /// ptrace request, keyctl key serial…
        detail: u64,
        flags: u32,
        /// The caller's own number for the target, where its pid namespace is not the host's
        /// (0 otherwise); `target_pid` is then the host pid found for it, or 0.
        ns_pid: u32,
    },
    /// A connect or UDP send to a watched endpoint.
    Connect { watch_id: u32, protocol: &'static str, address: IpAddr, port: u16 },
    /// A credential syscall succeeded; `process` holds the ids after it.
    CredChange { syscall: &'static str, egid: u32, cap_effective: u64 },
}

/// One sensor event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Unix time in nanoseconds.
    pub time_ns: u64,
    /// Repeats folded into this event in the kernel.
    pub count: u32,
    pub process: ProcessRef,
    #[serde(flatten)]
    pub detail: Detail,
    /// For folded kinds: the key and the cumulative total the kernel reported.
    #[serde(skip)]
    pub fold: Option<(FoldKey, u64)>,
    /// The reader's number for this event (see [`crate::reader::Progress`]); 0 before it is
    /// sent.
    #[serde(skip)]
    pub mark: u64,
    /// Ring position just past the record this event came from, 0 for events no record
    /// carried (fold tails). A sink that stores it with the event knows, after a crash, which
    /// records of the pinned ring it already holds.
    #[serde(skip)]
    pub ring_pos: u64,
}

/// Converts kernel boot-clock stamps to Unix time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    boot_to_unix_ns: i128,
}

impl Clock {
    pub fn new(boot_to_unix_ns: i128) -> Self {
        Self { boot_to_unix_ns }
    }

    pub fn from_system() -> Self {
        Self::new(crate::system::boot_to_unix_offset_ns())
    }

    /// The current Unix time in nanoseconds.
    pub fn now_unix_ns(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }

    fn unix_ns(&self, boot_ns: u64) -> u64 {
        (boot_ns as i128 + self.boot_to_unix_ns).max(0) as u64
    }
}

fn read<T: Copy>(bytes: &[u8], kind: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short { kind, len: bytes.len(), need });
    }
    // SAFETY: length checked above; T is a plain-old-data ABI type valid for any bit pattern;
    // the read is unaligned-safe.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Bytes up to `len` (and the first NUL) as text, lossily.
fn text(bytes: &[u8], len: u32) -> String {
    let bytes = &bytes[..(len as usize).min(bytes.len())];
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn process(h: &EventHeader) -> ProcessRef {
    ProcessRef {
        pid: h.tgid,
        tid: h.pid,
        ppid: h.ppid,
        uid: h.uid,
        gid: h.gid,
        euid: h.euid,
        login_uid: (h.login_uid != u32::MAX).then_some(h.login_uid),
        comm: text(&h.comm, h.comm.len() as u32),
        cgroup_id: h.cgroup_id,
    }
}

const O_ACCMODE: u32 = 0o3;
const O_WRITE_INTENT: u32 = 0o100 | 0o1000 | 0o2000; // O_CREAT | O_TRUNC | O_APPEND

/// Whether open(2) `flags` ask for writing.
pub fn opens_for_write(flags: u32) -> bool {
    flags & O_ACCMODE != 0 || flags & O_WRITE_INTENT != 0
}

/// [`Detail::FileOpen::matched`] of a kernel match.
pub(crate) fn file_match_name(m: FileMatch) -> &'static str {
    match m {
        FileMatch::File => "file",
        FileMatch::Dir => "dir",
        FileMatch::Name => "name",
    }
}

pub(crate) fn secret_method(m: SecretMethod) -> &'static str {
    match m {
        SecretMethod::ProcEnviron => "proc_environ",
        SecretMethod::ProcMem => "proc_mem",
        SecretMethod::Ptrace => "ptrace",
        SecretMethod::ProcessVmReadv => "process_vm_readv",
        SecretMethod::ProcessVmWritev => "process_vm_writev",
        SecretMethod::Keyctl => "keyctl",
        SecretMethod::UnixSocket => "unix_socket",
    }
}

/// The address connected to; an IPv4-mapped one from an IPv6 socket is the IPv4 host it is.
fn ip_of(family: u32, addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    match (family, v6.to_ipv4_mapped()) {
        (_, Some(v4)) => IpAddr::V4(v4),
        (2, None) => IpAddr::V4(Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15])),
        _ => IpAddr::V6(v6),
    }
}

impl Event {
    /// Only keeps the process table exact (a fork, an exit, an exec that changes no ids): it
    /// can wait a little for company before going downstream, since nothing is reported from
    /// it unless lifecycle output is asked for.
    pub fn is_bookkeeping(&self) -> bool {
        match &self.detail {
            Detail::Fork { .. } | Detail::Exit { .. } => true,
            Detail::Exec { exe_mode, .. } => exe_mode & 0o6000 == 0,
            _ => false,
        }
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8], clock: &Clock) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes, "header")?;
    let kind = EventKind::try_from(header.kind).map_err(DecodeError::UnknownKind)?;
    let unknown = |what, value| DecodeError::UnknownValue { what, value };
    let mut fold = None;
    let detail = match kind {
        EventKind::Exec => {
            let e: ExecEvent = read(bytes, "exec")?;
            let args_len = (e.args_len as usize).min(e.args.len());
            Detail::Exec {
                filename: text(&e.filename, e.filename_len),
                old_pid: e.old_pid,
                exe_mode: e.exe_mode,
                exe_dev: e.exe_dev,
                exe_ino: e.exe_ino,
                exe_name: text(&e.exe_name, e.exe_name_len),
                args: crate::process::split_cmdline(&e.args[..args_len]),
                args_cut: e.args_total > e.args_len,
                egid: e.egid,
                cap_effective: e.cap_effective,
            }
        }
        EventKind::Fork => {
            let e: ForkEvent = read(bytes, "fork")?;
            Detail::Fork { child_pid: e.child_tgid }
        }
        EventKind::Exit => {
            let e: ExitEvent = read(bytes, "exit")?;
            Detail::Exit { exit_code: e.exit_code }
        }
        EventKind::FileOpen => {
            let e: FileOpenEvent = read(bytes, "file_open")?;
            fold = Some((FoldKey::file(header.tgid, e.dev, e.ino), e.total));
            Detail::FileOpen {
                watch_id: e.watch_id,
                matched: FileMatch::try_from(e.matched)
                    .map(file_match_name)
                    .map_err(|other| unknown("file match", other))?,
                name: text(&e.name, e.name_len),
                dev: e.dev,
                ino: e.ino,
                parent_ino: e.parent_ino,
                flags: e.flags,
                write: opens_for_write(e.flags),
                held: false,
            }
        }
        EventKind::Secret => {
            let e: SecretEvent = read(bytes, "secret")?;
            let method =
                SecretMethod::try_from(e.method).map_err(|v| unknown("secret method", v))?;
            let key = FoldKey::secret(header.tgid, e.method, e.target_pid, e.ns_pid, e.detail);
            fold = Some((key, e.total));
            Detail::Secret {
                method: secret_method(method),
                target_pid: e.target_pid,
                detail: e.detail,
                flags: e.flags,
                ns_pid: e.ns_pid,
            }
        }
        EventKind::Connect => {
            let e: ConnectEvent = read(bytes, "connect")?;
            fold = Some((FoldKey::connect(header.tgid, &e.addr, e.protocol, e.port), e.total));
            Detail::Connect {
                watch_id: e.watch_id,
                protocol: if e.protocol == 17 { "udp" } else { "tcp" },
                address: ip_of(e.family, e.addr),
                port: e.port as u16,
            }
        }
        EventKind::CredChange => {
            let e: CredChangeEvent = read(bytes, "cred_change")?;
            let syscall = CredSyscall::try_from(e.syscall).map_err(|v| unknown("syscall", v))?;
            Detail::CredChange {
                syscall: syscall.name(),
                egid: e.egid,
                cap_effective: e.cap_effective,
            }
        }
    };
    Ok(Event {
        time_ns: clock.unix_ns(header.ktime_ns),
        count: header.count.max(1),
        process: process(&header),
        detail,
        fold,
        mark: 0,
        ring_pos: 0,
    })
}

#[cfg(test)]
mod tests {
    use sensor_ebpf::{ARGS_LEN, COMM_LEN, EXE_NAME_LEN, PATH_LEN};

    use super::*;

    fn header(kind: u32) -> EventHeader {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"true");
        EventHeader {
            kind,
            count: 1,
            ktime_ns: 5_000,
            pid: 11,
            tgid: 10,
            ppid: 1,
            uid: 1000,
            gid: 100,
            euid: 1000,
            login_uid: u32::MAX,
            _pad0: 0,
            cgroup_id: 77,
            comm,
        }
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn exe_name_of(name: &str) -> [u8; EXE_NAME_LEN] {
        let mut out = [0u8; EXE_NAME_LEN];
        out[..name.len()].copy_from_slice(name.as_bytes());
        out
    }

    #[test]
    fn decodes_exec_record() {
        let mut filename = [0u8; PATH_LEN];
        filename[..9].copy_from_slice(b"/bin/true");
        let mut args = [0u8; ARGS_LEN];
        args[..12].copy_from_slice(b"true\0--help\0");
        let rec = ExecEvent {
            header: header(1),
            old_pid: 11,
            filename_len: 9,
            exe_mode: 0o4755,
            egid: 100,
            cap_effective: 0,
            exe_ino: 77,
            exe_dev: 8 << 20,
            args_len: 12,
            args_total: 40,
            exe_name_len: 4,
            filename,
            args,
            exe_name: exe_name_of("true"),
        };
        let event = decode(&bytes_of(&rec), &Clock::new(1_000)).unwrap();
        assert_eq!(event.time_ns, 6_000);
        assert_eq!(event.process.pid, 10);
        assert_eq!(event.process.tid, 11);
        assert_eq!(event.process.comm, "true");
        assert_eq!(event.process.login_uid, None);
        assert!(matches!(
            &event.detail,
            Detail::Exec { filename, old_pid: 11, exe_mode: 0o4755, exe_ino: 77, exe_name, args, args_cut: true, .. }
                if filename == "/bin/true" && args == &["true", "--help"] && exe_name == "true"
        ));
        // A setuid exec may be a privilege change: never held back as bookkeeping.
        assert!(!event.is_bookkeeping());
        let plain = Event {
            detail: Detail::Exec {
                filename: "/bin/true".into(),
                old_pid: 11,
                exe_mode: 0o755,
                exe_dev: 0,
                exe_ino: 0,
                exe_name: "true".into(),
                args: Vec::new(),
                args_cut: false,
                egid: 0,
                cap_effective: 0,
            },
            ..event.clone()
        };
        assert!(plain.is_bookkeeping());
        assert!(Event { detail: Detail::Fork { child_pid: 12 }, ..event }.is_bookkeeping());
    }

    #[test]
    fn decodes_connect_and_write_flags() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[169, 254, 169, 254]);
        let rec = ConnectEvent {
            header: header(6),
            watch_id: 3,
            protocol: 6,
            family: 2,
            port: 80,
            addr,
            total: 5,
        };
        let event = decode(&bytes_of(&rec), &Clock::new(0)).unwrap();
        assert_eq!(
            event.detail,
            Detail::Connect {
                watch_id: 3,
                protocol: "tcp",
                address: "169.254.169.254".parse().unwrap(),
                port: 80
            }
        );
        assert_eq!(event.fold.unwrap().1, 5);
        assert!(!opens_for_write(0)); // O_RDONLY
        assert!(opens_for_write(1)); // O_WRONLY
        assert!(opens_for_write(0o1000)); // O_TRUNC
    }

    #[test]
    fn refuses_short_and_unknown_records() {
        let rec = header(1);
        let err = decode(&bytes_of(&rec), &Clock::new(0)).unwrap_err();
        assert!(matches!(err, DecodeError::Short { kind: "exec", .. }), "{err}");
        let err = decode(&bytes_of(&header(999)), &Clock::new(0)).unwrap_err();
        assert_eq!(err, DecodeError::UnknownKind(999));
        let err = decode(&[0u8; 3], &Clock::new(0)).unwrap_err();
        assert!(matches!(err, DecodeError::Short { kind: "header", len: 3, .. }));
    }
}
