//! Wire (keywatch.v1) ↔ domain conversions, all checked, all in this module.

use chrono::DateTime;
use keywatch_proto::v1 as pb;

use crate::event::{Ancestor, Event, EventKind, Host, Process, SecretMethod};

/// A message that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("hello: {0}")]
    Hello(String),
    #[error("batch: {0}")]
    Batch(String),
    #[error("event seq {seq}: {reason}")]
    Event { seq: u64, reason: String },
}

const MAX_HOST_ID: usize = 253;
const MAX_SPOOL_ID: usize = 64;

/// The host a Hello introduces.
pub fn host_from_hello(h: &pb::Hello) -> Result<Host, ConvertError> {
    if h.host_id.is_empty()
        || h.host_id.len() > MAX_HOST_ID
        || h.host_id.chars().any(|c| c.is_control())
    {
        return Err(ConvertError::Hello(format!(
            "host_id must be 1 to {MAX_HOST_ID} printable characters"
        )));
    }
    if h.spool_id.len() > MAX_SPOOL_ID || !h.spool_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ConvertError::Hello(format!(
            "spool_id must be at most {MAX_SPOOL_ID} ASCII letters and digits"
        )));
    }
    Ok(Host {
        id: h.host_id.clone(),
        labels: h.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        sensor_version: h.sensor_version.clone(),
        kernel: h.kernel.clone(),
        spool_id: h.spool_id.clone(),
    })
}

/// The events of a batch from `host_id`, each with its record as sent: the batch must name
/// that host, start at `first_seq` and be contiguous.
pub fn events_from_batch(host_id: &str, batch: pb::EventBatch) -> Result<Vec<Event>, ConvertError> {
    if !batch.host_id.is_empty() && batch.host_id != host_id {
        return Err(ConvertError::Batch(format!(
            "host_id {:?} differs from the Hello's {host_id:?}",
            batch.host_id
        )));
    }
    batch
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let expected = batch.first_seq + i as u64;
            if e.seq != expected {
                return Err(ConvertError::Batch(format!(
                    "event {i} has seq {}, expected {expected} (batches are contiguous)",
                    e.seq
                )));
            }
            // Kept as sent, for the store (see `Event::record`).
            let record = prost::Message::encode_to_vec(&e);
            event_from_proto(host_id, e).map(|event| Event { record, ..event })
        })
        .collect()
}

/// One event.
pub fn event_from_proto(host_id: &str, e: pb::Event) -> Result<Event, ConvertError> {
    let seq = e.seq;
    let bad = |reason: &str| ConvertError::Event { seq, reason: reason.to_owned() };
    let time_ns = i64::try_from(e.time_ns).map_err(|_| bad("time_ns out of range"))?;
    if time_ns == 0 {
        return Err(bad("time_ns is 0"));
    }
    if e.count == 0 {
        return Err(bad("count must be at least 1"));
    }
    let process = Process::try_from(e.process.ok_or_else(|| bad("process is missing"))?)
        .map_err(|r| bad(&r))?;
    let kind =
        EventKind::try_from(e.kind.ok_or_else(|| bad("kind is missing"))?).map_err(|r| bad(&r))?;
    Ok(Event {
        host_id: host_id.to_owned(),
        seq,
        time: DateTime::from_timestamp_nanos(time_ns),
        count: e.count,
        process,
        kind,
        record: Vec::new(),
    })
}

impl TryFrom<pb::ProcessIdentity> for Process {
    type Error = String;

    fn try_from(p: pb::ProcessIdentity) -> Result<Self, Self::Error> {
        if p.pid == 0 {
            return Err("process pid is 0".into());
        }
        if !p.exe_sha256.is_empty()
            && (p.exe_sha256.len() != 64 || !p.exe_sha256.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err("exe_sha256 is not 64 hex digits".into());
        }
        Ok(Process {
            pid: p.pid,
            ppid: p.ppid,
            uid: p.uid,
            euid: p.euid,
            gid: p.gid,
            login_uid: p.login_uid.filter(|u| *u != u32::MAX),
            user: None,
            comm: p.comm,
            exe: p.exe,
            exe_sha256: p.exe_sha256.to_ascii_lowercase(),
            cmdline: p.cmdline,
            container_id: p.container_id,
            container_image: String::new(),
            k8s_namespace: String::new(),
            k8s_pod: String::new(),
            pod_uid: p.pod_uid,
            systemd_unit: p.systemd_unit,
            tty: p.tty,
            start_time_ns: p.start_time_ns,
            ancestors: p
                .ancestors
                .into_iter()
                .map(|a| Ancestor { pid: a.pid, exe: a.exe, comm: a.comm })
                .collect(),
        })
    }
}

impl TryFrom<pb::SecretMethod> for SecretMethod {
    type Error = String;

    fn try_from(m: pb::SecretMethod) -> Result<Self, Self::Error> {
        Ok(match m {
            pb::SecretMethod::Unspecified => return Err("secret method unspecified".into()),
            pb::SecretMethod::ProcEnviron => Self::ProcEnviron,
            pb::SecretMethod::ProcMem => Self::ProcMem,
            pb::SecretMethod::Ptrace => Self::Ptrace,
            pb::SecretMethod::ProcessVmReadv => Self::ProcessVmReadv,
            pb::SecretMethod::Keyctl => Self::Keyctl,
            pb::SecretMethod::UnixSocket => Self::UnixSocket,
            pb::SecretMethod::ProcessVmWritev => Self::ProcessVmWritev,
        })
    }
}

impl TryFrom<pb::event::Kind> for EventKind {
    type Error = String;

    fn try_from(k: pb::event::Kind) -> Result<Self, Self::Error> {
        use pb::event::Kind as K;
        Ok(match k {
            K::FileAccess(f) => {
                if f.path.is_empty() {
                    return Err("file access without a path".into());
                }
                EventKind::FileAccess { watch: f.watch, path: f.path, write: f.write, held: f.held }
            }
            K::SecretAccess(s) => {
                let method = pb::SecretMethod::try_from(s.method)
                    .map_err(|_| format!("unknown secret method {}", s.method))?;
                EventKind::SecretAccess {
                    method: method.try_into()?,
                    target_pid: s.target_pid,
                    target_ns_pid: (s.target_ns_pid != 0).then_some(s.target_ns_pid),
                    target: s
                        .target
                        .map(Process::try_from)
                        .transpose()
                        .map_err(|e| format!("secret access target: {e}"))?
                        .map(Box::new),
                    watch: s.watch,
                    path: s.path,
                }
            }
            K::Connect(c) => {
                let port =
                    u16::try_from(c.port).map_err(|_| format!("port {} out of range", c.port))?;
                if c.address.parse::<std::net::IpAddr>().is_err() {
                    return Err(format!("address {:?} is not an IP literal", c.address));
                }
                let protocol = match pb::Protocol::try_from(c.protocol) {
                    Ok(pb::Protocol::Tcp) => "tcp",
                    Ok(pb::Protocol::Udp) => "udp",
                    Ok(pb::Protocol::Unspecified) => "ip",
                    Err(_) => return Err(format!("unknown protocol {}", c.protocol)),
                };
                EventKind::Connect {
                    watch: c.watch,
                    address: c.address,
                    port,
                    protocol: protocol.into(),
                }
            }
            K::Exec(x) => EventKind::Exec { filename: x.filename, argv: x.argv },
            K::Exit(x) => EventKind::Exit { exit_code: x.exit_code },
            K::Fork(x) => EventKind::Fork { child_pid: x.child_pid },
            K::PrivilegeChange(p) => EventKind::PrivilegeChange {
                via: p.via,
                old_uid: p.old_uid,
                old_euid: p.old_euid,
                new_uid: p.new_uid,
                new_euid: p.new_euid,
                old_cap_effective: p.old_cap_effective,
                new_cap_effective: p.new_cap_effective,
            },
        })
    }
}

/// Domain → wire, for tests, benchmarks and tools that replay stored events.
pub fn event_to_proto(e: &Event) -> pb::Event {
    use pb::event::Kind as K;
    let p = &e.process;
    let kind = match &e.kind {
        EventKind::FileAccess { watch, path, write, held } => K::FileAccess(pb::FileAccess {
            held: *held,
            watch: watch.clone(),
            path: path.clone(),
            write: *write,
            ..Default::default()
        }),
        EventKind::SecretAccess { method, target_pid, target_ns_pid, target, watch, path } => {
            K::SecretAccess(pb::SecretAccess {
                method: match method {
                    SecretMethod::ProcEnviron => pb::SecretMethod::ProcEnviron,
                    SecretMethod::ProcMem => pb::SecretMethod::ProcMem,
                    SecretMethod::Ptrace => pb::SecretMethod::Ptrace,
                    SecretMethod::ProcessVmReadv => pb::SecretMethod::ProcessVmReadv,
                    SecretMethod::Keyctl => pb::SecretMethod::Keyctl,
                    SecretMethod::UnixSocket => pb::SecretMethod::UnixSocket,
                    SecretMethod::ProcessVmWritev => pb::SecretMethod::ProcessVmWritev,
                } as i32,
                target_pid: *target_pid,
                target_ns_pid: target_ns_pid.unwrap_or(0),
                target: target.as_deref().map(process_to_proto),
                watch: watch.clone(),
                path: path.clone(),
                detail: 0,
            })
        }
        EventKind::Connect { watch, address, port, protocol } => K::Connect(pb::Connect {
            watch: watch.clone(),
            address: address.clone(),
            port: u32::from(*port),
            protocol: match protocol.as_str() {
                "tcp" => pb::Protocol::Tcp,
                "udp" => pb::Protocol::Udp,
                _ => pb::Protocol::Unspecified,
            } as i32,
        }),
        EventKind::Exec { filename, argv } => {
            K::Exec(pb::Exec { filename: filename.clone(), argv: argv.clone(), old_pid: 0 })
        }
        EventKind::Exit { exit_code } => K::Exit(pb::Exit { exit_code: *exit_code }),
        EventKind::Fork { child_pid } => K::Fork(pb::Fork { child_pid: *child_pid }),
        EventKind::PrivilegeChange {
            via,
            old_uid,
            old_euid,
            new_uid,
            new_euid,
            old_cap_effective,
            new_cap_effective,
        } => K::PrivilegeChange(pb::PrivilegeChange {
            via: via.clone(),
            old_uid: *old_uid,
            old_euid: *old_euid,
            new_uid: *new_uid,
            new_euid: *new_euid,
            old_cap_effective: *old_cap_effective,
            new_cap_effective: *new_cap_effective,
            ..Default::default()
        }),
    };
    pb::Event {
        seq: e.seq,
        time_ns: e.time.timestamp_nanos_opt().unwrap_or_default() as u64,
        count: e.count,
        process: Some(process_to_proto(p)),
        kind: Some(kind),
    }
}

/// A process back on the wire.
fn process_to_proto(p: &Process) -> pb::ProcessIdentity {
    pb::ProcessIdentity {
        pid: p.pid,
        tid: p.pid,
        ppid: p.ppid,
        uid: p.uid,
        euid: p.euid,
        gid: p.gid,
        login_uid: p.login_uid,
        comm: p.comm.clone(),
        exe: p.exe.clone(),
        exe_sha256: p.exe_sha256.clone(),
        cmdline: p.cmdline.clone(),
        container_id: p.container_id.clone(),
        pod_uid: p.pod_uid.clone(),
        systemd_unit: p.systemd_unit.clone(),
        start_time_ns: p.start_time_ns,
        tty: p.tty.clone(),
        ancestors: p
            .ancestors
            .iter()
            .map(|a| pb::Ancestor {
                pid: a.pid,
                exe: a.exe.clone(),
                comm: a.comm.clone(),
                start_time_ns: 0,
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire_event(kind: pb::event::Kind) -> pb::Event {
        pb::Event {
            seq: 1,
            time_ns: 1_796_000_000_000_000_000,
            count: 1,
            process: Some(pb::ProcessIdentity {
                pid: 40,
                exe: "/usr/bin/gdb".into(),
                ..Default::default()
            }),
            kind: Some(kind),
        }
    }

    #[test]
    fn a_secret_access_keeps_its_target_and_the_callers_number() {
        let target =
            pb::ProcessIdentity { pid: 13520, exe: "/usr/bin/vault".into(), ..Default::default() };
        let access = pb::SecretAccess {
            method: pb::SecretMethod::Ptrace as i32,
            target_pid: 13520,
            target_ns_pid: 2,
            target: Some(target),
            ..Default::default()
        };
        let event = event_from_proto("h", wire_event(pb::event::Kind::SecretAccess(access)))
            .expect("valid event");
        let EventKind::SecretAccess { target_pid, target_ns_pid, target, .. } = &event.kind else {
            panic!("{:?}", event.kind);
        };
        assert_eq!((*target_pid, *target_ns_pid), (13520, Some(2)));
        assert_eq!(target.as_deref().map(|t| t.exe.as_str()), Some("/usr/bin/vault"));
        // Back on the wire unchanged, and through the store's JSON.
        let Some(pb::event::Kind::SecretAccess(back)) = event_to_proto(&event).kind else {
            panic!("not a secret access");
        };
        assert_eq!((back.target_ns_pid, back.target.map(|t| t.pid)), (2, Some(13520)));
        let json = serde_json::to_string(&event.kind).unwrap();
        assert_eq!(serde_json::from_str::<EventKind>(&json).unwrap(), event.kind);
        // A host-named target carries no namespace number; older stored rows have neither.
        let old =
            r#"{"type":"secret-access","method":"ptrace","target_pid":9,"watch":"","path":""}"#;
        let EventKind::SecretAccess { target_ns_pid, target, .. } =
            serde_json::from_str(old).unwrap()
        else {
            panic!("not a secret access");
        };
        assert_eq!((target_ns_pid, target), (None, None));
    }

    #[test]
    fn a_malformed_target_names_itself() {
        let access = pb::SecretAccess {
            method: pb::SecretMethod::ProcEnviron as i32,
            target_pid: 9,
            target: Some(pb::ProcessIdentity::default()),
            ..Default::default()
        };
        let err = event_from_proto("h", wire_event(pb::event::Kind::SecretAccess(access)))
            .expect_err("a target with pid 0");
        assert!(err.to_string().contains("secret access target: process pid is 0"), "{err}");
    }
}
