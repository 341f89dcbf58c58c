//! Decoding ring-buffer records into sensor events. Checked: a short or unknown record is an
//! error, never a transmute.

use std::mem::size_of;

use sensor_ebpf::{EventHeader, EventKind, ExecEvent};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {kind} layout ({need} bytes)")]
    Short {
        kind: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
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
    },
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

    fn unix_ns(&self, boot_ns: u64) -> u64 {
        (boot_ns as i128 + self.boot_to_unix_ns).max(0) as u64
    }
}

fn read<T: Copy>(bytes: &[u8], kind: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            kind,
            len: bytes.len(),
            need,
        });
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
        comm: text(&h.comm, h.comm.len() as u32),
        cgroup_id: h.cgroup_id,
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8], clock: &Clock) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes, "header")?;
    let kind = EventKind::try_from(header.kind).map_err(DecodeError::UnknownKind)?;
    let detail = match kind {
        EventKind::Exec => {
            let e: ExecEvent = read(bytes, "exec")?;
            Detail::Exec {
                filename: text(&e.filename, e.filename_len),
                old_pid: e.old_pid,
            }
        }
    };
    Ok(Event {
        time_ns: clock.unix_ns(header.ktime_ns),
        count: header.count.max(1),
        process: process(&header),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use sensor_ebpf::{COMM_LEN, PATH_LEN};

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
            _pad0: 0,
            cgroup_id: 77,
            comm,
        }
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_exec_record() {
        let mut filename = [0u8; PATH_LEN];
        filename[..9].copy_from_slice(b"/bin/true");
        let rec = ExecEvent {
            header: header(1),
            old_pid: 11,
            filename_len: 9,
            filename,
        };
        let event = decode(&bytes_of(&rec), &Clock::new(1_000)).unwrap();
        assert_eq!(event.time_ns, 6_000);
        assert_eq!(event.process.pid, 10);
        assert_eq!(event.process.tid, 11);
        assert_eq!(event.process.comm, "true");
        assert_eq!(
            event.detail,
            Detail::Exec {
                filename: "/bin/true".into(),
                old_pid: 11
            }
        );
    }

    #[test]
    fn refuses_short_and_unknown_records() {
        let rec = header(1);
        let err = decode(&bytes_of(&rec), &Clock::new(0)).unwrap_err();
        assert!(
            matches!(err, DecodeError::Short { kind: "exec", .. }),
            "{err}"
        );
        let err = decode(&bytes_of(&header(999)), &Clock::new(0)).unwrap_err();
        assert_eq!(err, DecodeError::UnknownKind(999));
        let err = decode(&[0u8; 3], &Clock::new(0)).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Short {
                kind: "header",
                len: 3,
                ..
            }
        ));
    }
}
