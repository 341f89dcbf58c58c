//! What the sensor reports: an event joined with the identity of the process behind it and the
//! name of the watched resource. This is the JSON line of `run --stdout` and what the uplink
//! sends; every field is documented in the README.

use std::net::IpAddr;

use serde::Serialize;

use crate::{process::Ancestor, watch::Category};

/// The process behind an observation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Identity {
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    pub gid: u32,
    pub login_uid: Option<u32>,
    pub comm: String,
    pub exe: String,
    pub exe_sha256: Option<String>,
    pub cmdline: Vec<String>,
    pub cgroup_id: u64,
    pub cgroup_path: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub systemd_unit: Option<String>,
    pub start_time_ns: u64,
    pub tty: Option<String>,
    /// Parent chain, nearest first.
    pub ancestors: Vec<Ancestor>,
}

/// What was observed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// A watched credential or secret file was opened.
    FileOpen {
        watch: String,
        category: Option<Category>,
        path: String,
        dev: u32,
        ino: u64,
        flags: u32,
        write: bool,
        /// Found open at the sensor's start, opened before anything watched (present only
        /// then).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        held: bool,
    },
    /// Another process's secrets were touched.
    SecretAccess {
        method: &'static str,
        /// Host pid (0 when not known).
        target_pid: u32,
        /// The target as the caller named it, in its own pid namespace (a container's), where
        /// that is not the host's.
        #[serde(skip_serializing_if = "Option::is_none")]
        target_ns_pid: Option<u32>,
        target: Option<Box<Identity>>,
        /// For unix sockets: the watch and the socket path.
        watch: Option<String>,
        path: Option<String>,
        detail: u64,
    },
    /// A connect or UDP send to a watched auth endpoint.
    Connect {
        watch: String,
        category: Option<Category>,
        address: IpAddr,
        port: u16,
        protocol: &'static str,
    },
    /// uid/euid/gid or capabilities changed.
    PrivilegeChange {
        via: &'static str,
        old_uid: u32,
        old_euid: u32,
        new_uid: u32,
        new_euid: u32,
        old_gid: u32,
        new_gid: u32,
        old_cap_effective: u64,
        new_cap_effective: u64,
    },
    /// A program was executed.
    Exec { filename: String },
    /// A new process.
    Fork { child_pid: u32 },
    /// A process exited.
    Exit { exit_code: u32 },
}

impl What {
    /// Lifecycle observations keep the process table exact; they are not accesses.
    pub fn is_lifecycle(&self) -> bool {
        matches!(self, What::Exec { .. } | What::Fork { .. } | What::Exit { .. })
    }
}

/// One observation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    /// Unix time, nanoseconds.
    pub time_ns: u64,
    /// Occurrences this observation stands for (repeats folded in the kernel).
    pub count: u32,
    pub process: Identity,
    #[serde(flatten)]
    pub what: What,
    /// The mark of the event this observation completes (the last observation made from an
    /// event carries it), 0 for the others: what the sink reports durable so that the ring
    /// record behind it can be released (see [`crate::reader::Progress`]).
    #[serde(skip)]
    pub mark: u64,
    /// [`crate::event::Event::ring_pos`] of the event it was made from (every observation of
    /// the event carries it).
    #[serde(skip)]
    pub ring_pos: u64,
}
