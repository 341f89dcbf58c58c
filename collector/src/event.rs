//! The collector's own event model: what a sensor reported, checked and decoded from the wire
//! (see `convert`). Detection, storage and the timeline work on these types only.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A host as its sensor introduced itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Host {
    /// Stable host id chosen by the sensor (later: bound to its client certificate).
    pub id: String,
    /// Labels such as `env: prod`; workloads select hosts by them.
    pub labels: BTreeMap<String, String>,
    /// Sensor version string.
    #[serde(default)]
    pub sensor_version: String,
    /// Kernel release.
    #[serde(default)]
    pub kernel: String,
    /// The sensor's spool its events come from (the Hello's `spool_id`): seqs are unique per
    /// (host, spool). A property of the stream, not of the host: never stored or shown.
    #[serde(skip)]
    pub spool_id: String,
}

/// One ancestor of a process, nearest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: String,
    pub comm: String,
}

/// The process behind an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    /// Audit login uid; `None` when unset (not part of a login session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_uid: Option<u32>,
    /// User name, when the sensor resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub comm: String,
    pub exe: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exe_sha256: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmdline: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_image: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub k8s_namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub k8s_pod: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub systemd_unit: String,
    /// Controlling terminal, empty when none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tty: String,
    #[serde(default)]
    pub start_time_ns: u64,
    /// Parent chain, nearest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<Ancestor>,
}

/// Executables whose presence among the ancestors marks an interactive session.
const INTERACTIVE_ANCESTORS: &[&str] =
    &["sshd", "login", "sshd-session", "su", "sudo", "tmux: server", "screen"];

impl Process {
    /// Why this process looks like part of an interactive (human) session, if it does:
    /// a login uid, a controlling terminal, or an sshd / login-shell ancestor.
    pub fn interactive_reason(&self) -> Option<String> {
        if !self.tty.is_empty() {
            return Some(format!("controlling terminal {}", self.tty));
        }
        if let Some(uid) = self.login_uid {
            return Some(format!("login uid {uid}"));
        }
        self.ancestors.iter().find_map(|a| {
            let base = a.exe.rsplit('/').next().unwrap_or(&a.exe);
            let login_shell = a.comm.starts_with('-');
            (INTERACTIVE_ANCESTORS.contains(&base)
                || INTERACTIVE_ANCESTORS.contains(&a.comm.as_str())
                || login_shell)
                .then(|| {
                    format!(
                        "ancestor {} (pid {})",
                        if a.exe.is_empty() { &a.comm } else { &a.exe },
                        a.pid
                    )
                })
        })
    }

    /// `exe ← parent ← grandparent …`, for one-line displays.
    pub fn ancestry_line(&self) -> String {
        let name = |exe: &str, comm: &str| {
            if exe.is_empty() {
                comm.to_owned()
            } else {
                exe.rsplit('/').next().unwrap_or(exe).to_owned()
            }
        };
        let mut parts = vec![format!("{}[{}]", name(&self.exe, &self.comm), self.pid)];
        parts
            .extend(self.ancestors.iter().map(|a| format!("{}[{}]", name(&a.exe, &a.comm), a.pid)));
        parts.join(" < ")
    }
}

/// How another process's secrets were touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretMethod {
    ProcEnviron,
    ProcMem,
    Ptrace,
    ProcessVmReadv,
    Keyctl,
    UnixSocket,
    ProcessVmWritev,
}

impl SecretMethod {
    /// The name used in declarations and alerts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProcEnviron => "proc-environ",
            Self::ProcMem => "proc-mem",
            Self::Ptrace => "ptrace",
            Self::ProcessVmReadv => "process-vm-readv",
            Self::Keyctl => "keyctl",
            Self::UnixSocket => "unix-socket",
            Self::ProcessVmWritev => "process-vm-writev",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EventKind {
    /// A watched file was opened.
    FileAccess {
        watch: String,
        path: String,
        write: bool,
        /// Found open when the sensor started watching (opened before it could see).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        held: bool,
    },
    /// Another process's secrets were touched.
    SecretAccess {
        method: SecretMethod,
        /// Host pid (0 when the sensor found no process with the number the caller gave).
        target_pid: u32,
        /// The number the caller gave, in its own pid namespace (a container's), where that is
        /// not the host's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_ns_pid: Option<u32>,
        /// The process whose secrets were touched, as the sensor knew it (for a socket: the
        /// listener).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<Box<Process>>,
        watch: String,
        path: String,
    },
    /// An outbound connection to a watched endpoint.
    Connect {
        watch: String,
        address: String,
        port: u16,
        protocol: String,
    },
    Exec {
        filename: String,
        argv: Vec<String>,
    },
    Exit {
        exit_code: i32,
    },
    Fork {
        child_pid: u32,
    },
    /// Credentials changed.
    PrivilegeChange {
        via: String,
        old_uid: u32,
        old_euid: u32,
        new_uid: u32,
        new_euid: u32,
        old_cap_effective: u64,
        new_cap_effective: u64,
    },
}

impl EventKind {
    /// The short name used in timelines and `--kind` filters.
    pub fn name(&self) -> &'static str {
        match self {
            Self::FileAccess { .. } => "file-access",
            Self::SecretAccess { .. } => "secret-access",
            Self::Connect { .. } => "connect",
            Self::Exec { .. } => "exec",
            Self::Exit { .. } => "exit",
            Self::Fork { .. } => "fork",
            Self::PrivilegeChange { .. } => "privilege-change",
        }
    }

    /// Every kind name, for help texts and validation of filters.
    pub const NAMES: &'static [&'static str] = &[
        "file-access",
        "secret-access",
        "connect",
        "exec",
        "exit",
        "fork",
        "privilege-change",
        "alert",
        "gap",
    ];

    /// Whose secrets a secret access touched, in words: `pid 812 (/usr/bin/vault, container
    /// 3f2a…)`, with the caller's own number where it named the target from a pid namespace.
    pub fn secret_target(&self) -> Option<String> {
        let Self::SecretAccess { target_pid, target_ns_pid, target, .. } = self else {
            return None;
        };
        let mut words = match target_pid {
            0 => "an unknown process".to_owned(),
            pid => format!("pid {pid}"),
        };
        let mut about = Vec::new();
        if let Some(t) = target.as_deref() {
            about.extend((!t.exe.is_empty()).then(|| t.exe.clone()));
            let container = short_id(&t.container_id);
            about.extend((!container.is_empty()).then(|| format!("container {container}")));
        }
        about.extend(target_ns_pid.map(|n| format!("pid {n} in the caller's namespace")));
        if !about.is_empty() {
            words.push_str(&format!(" ({})", about.join(", ")));
        }
        Some(words)
    }

    /// One line describing the event.
    pub fn summary(&self) -> String {
        match self {
            Self::FileAccess { watch, path, write, held } => {
                let how = if *write { "write" } else { "read" };
                let held = if *held { ", held open when the sensor started" } else { "" };
                format!("{how} {path} (watch {watch}{held})")
            }
            Self::SecretAccess { method, path, .. } => format!(
                "{} of {} {path}",
                method.as_str(),
                self.secret_target().unwrap_or_default()
            )
            .trim_end()
            .to_owned(),
            Self::Connect { watch, address, port, protocol } => {
                format!("{protocol} {} (watch {watch})", endpoint(address, *port))
            }
            Self::Exec { filename, argv } => {
                format!("exec {filename} {}", argv.join(" ")).trim_end().to_owned()
            }
            Self::Exit { exit_code } => format!("exit {exit_code}"),
            Self::Fork { child_pid } => format!("fork child {child_pid}"),
            Self::PrivilegeChange {
                via,
                old_uid,
                old_euid,
                new_uid,
                new_euid,
                old_cap_effective,
                new_cap_effective,
            } => {
                format!(
                    "{via}: uid {old_uid}->{new_uid} euid {old_euid}->{new_euid} caps {old_cap_effective:#x}->{new_cap_effective:#x}"
                )
            }
        }
    }
}

/// `address:port`, bracketing IPv6 literals.
pub fn endpoint(address: &str, port: u16) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

/// One event from one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub host_id: String,
    /// Per-host sequence number assigned by the sensor; `(host_id, seq)` is unique.
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// Repeats the sensor folded into this event (at least 1).
    pub count: u32,
    pub process: Process,
    pub kind: EventKind,
    /// The record exactly as the sensor sent it (protobuf `keywatch.v1.Event`), which is what
    /// the store keeps: it has what this model leaves out (device and inode, open flags,
    /// cgroup, thread). Empty for events made in code; the store then encodes this model.
    #[serde(skip)]
    pub record: Vec<u8>,
}

/// The first 12 characters of a container id, as container tools print it.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
