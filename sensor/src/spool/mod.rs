//! The sensor's durable spool: every event is appended to an on-disk, checksummed log before
//! it is sent, and released only once the collector has acked it.
//!
//! An identity sensor that loses the one event that mattered is worse than none, so the spool
//! survives restarts and `SIGKILL` mid-write, reports what it had to throw away instead of
//! hiding it, and never parses damaged bytes as an event.
//!
//! # Use
//!
//! [`Spool::open`] recovers the log and says what it found ([`OpenReport`]). The transport then
//! [`append`](Spool::append)s each batch of encoded `keywatch.v1.Event`s (group commit: one
//! write and at most one fsync per call), [`read_from`](Spool::read_from) the first unacked seq
//! to send, and calls [`ack`](Spool::ack) when the collector's `Ack` arrives. A full spool drops
//! its oldest segment, acked or not, and keeps the [`Gap`] for
//! [`take_evictions`](Spool::take_evictions) until the transport confirms it with
//! [`gap_reported`](Spool::gap_reported).
//!
//! # Source checkpoints
//!
//! Whatever feeds the spool (the kernel ring buffer) can be told, with
//! [`append_with_checkpoint`](Spool::append_with_checkpoint), where it stood after a batch: a
//! [`SourceCheckpoint`] written in the same write as the batch, just before its records. A
//! checkpoint counts only once every record of its batch is found intact, so after a crash
//! [`last_checkpoint`](Spool::last_checkpoint) (also in [`OpenReport`]) names exactly the
//! source position whose events are all spooled: the source skips what is at or before it and
//! spools the rest, each event once. A checkpoint is durable with its batch (when
//! `append_with_checkpoint` returns under [`SyncPolicy::EveryAppend`], else after the next
//! [`sync`](Spool::sync)); only then may the source release what it names. The active segment
//! always holds the newest checkpoint (a new segment starts with a copy of it), so deleting
//! acked or evicted segments never loses it.
//!
//! # Threads
//!
//! The spool is a single-owner value (`&mut self` everywhere, no locks): the transport owns it
//! in one task. Appends under [`SyncPolicy::EveryAppend`], acks and open all fsync, so run them
//! off the async runtime (`tokio::task::spawn_blocking` handing the spool back, or a dedicated
//! thread fed by a bounded channel). A `LOCK` file (`flock`) keeps a second process out of the
//! same directory.
//!
//! # Durability and sequence numbers
//!
//! Seqs start at 1, are contiguous and never reused, across restarts too: the next seq is the
//! largest of what the segments hold and the high-water mark in the state file, which outlives
//! acked and evicted segments. [`read_from`](Spool::read_from) returns only records that are
//! fsynced: under [`SyncPolicy::Interval`] a record becomes readable at the next sync (due in
//! `append`, or on [`sync_if_due`](Spool::sync_if_due) from the transport's timer). So the
//! collector never holds a seq that a power loss could take back; a record whose write was torn
//! by a crash was never returned to anyone, and its seq is handed out again.
//!
//! # Files
//!
//! The directory (mode 0700; files 0600) holds `LOCK`, `state` and segments named by the first
//! seq they were created for, `{base_seq:020}.seg`. Integers are little-endian.
//!
//! Segment header, 32 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KWSPOOL\0` |
//! | 8 | 4 | format version: 2 (1 is read too) |
//! | 12 | 4 | header length, 32 |
//! | 16 | 8 | base seq: the seq the segment's first record gets |
//! | 24 | 4 | reserved, 0 |
//! | 28 | 4 | CRC-32C of bytes 0..28 |
//!
//! Then records of two kinds, back to back. An event record:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | record marker `C5 4B 57 52` |
//! | 4 | 4 | CRC-32C of bytes 8..20+len (length, seq, payload) |
//! | 8 | 4 | payload length `len` (at most 16 MiB) |
//! | 12 | 8 | seq |
//! | 20 | len | payload, opaque (a prost-encoded `keywatch.v1.Event`) |
//!
//! A checkpoint record (version 2 only), 56 bytes, directly before the batch it belongs to:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | checkpoint marker `C5 4B 57 43` |
//! | 4 | 4 | CRC-32C of bytes 8..56 |
//! | 8 | 4 | count: event records of the batch that follows (0: a position alone) |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | first seq of that batch (the next seq, when count is 0) |
//! | 24 | 32 | the [`SourceCheckpoint`], opaque |
//!
//! Version 1 segments are version 2 without checkpoint records; this build reads them but
//! never appends to one (open starts a new segment instead). A segment whose header has a
//! valid checksum but a version outside 1..=2 is refused ([`SpoolError::UnsupportedVersion`]),
//! never guessed at.
//!
//! CRC-32C (the `crc32c` crate) rather than the zlib CRC-32 of `crc32fast`: the Castagnoli
//! polynomial keeps a larger Hamming distance at record sizes, which is why ext4, btrfs,
//! iSCSI, Kafka and RocksDB use it, and x86-64 (SSE4.2) and ARMv8 compute it in hardware, so
//! checking every record on open and on every read costs next to nothing.
//!
//! The state file (replaced whole by write, fsync, rename, fsync of the directory) holds the
//! acked watermark, the evicted watermark, the next-seq high-water mark, the evicted and
//! corrupt totals, the unreported gaps, and the damage already counted; it ends with a CRC-32C.
//!
//! # Recovery
//!
//! Open reads every segment and checks every record. Bytes that are not a valid record, with
//! valid records after them, are damage in the middle of the log (bit rot): the reader skips
//! to the next record marker whose checksum holds, counts the seqs that vanished as corrupt and
//! records a [`GapCause::Corrupt`] gap. Bytes with no valid record after them are a torn tail
//! (a write cut short by a crash): the file is truncated at the last good record and the
//! report counts one torn record. A tail record that is complete and claims the next seq but
//! fails its checksum was durable and then damaged, so its seq is retired rather than reused.
//!
//! Checkpoint records follow the same rules, with their batch:
//!
//! | found on open | what happens |
//! |---|---|
//! | checkpoint, then `count` intact records with seqs from its first seq on | the checkpoint is confirmed; the newest confirmed one (later segment, later offset) is [`OpenReport::last_checkpoint`] |
//! | checkpoint whose batch is cut short by a torn tail or the end of the file | the whole batch was never synced: the segment is cut at the checkpoint (one torn record), its complete records go too and their seqs are handed out again, as the source still has the events |
//! | that, but the tail is a complete record failing its checksum (see above) | the batch may have been durable and sent: its good records stay, the damaged seq is retired, the checkpoint is not confirmed |
//! | damage in the middle of a batch (resynced past) | its checkpoint is not confirmed; the previous one stands; nothing is cut |
//! | checkpoint cut short at the tail | a torn tail like any other |
//! | checkpoint failing its checksum with valid records after it | damage: skipped (its bytes count as corrupt bytes, no seqs are lost), its batch's events are read, the checkpoint is not confirmed |
//!
//! An unconfirmed checkpoint only ever makes the source spool some events again; a checkpoint
//! past what is spooled would lose them, so none is ever believed without its batch. When
//! open starts a new active segment, it writes the newest confirmed checkpoint into it (as a
//! count-0 checkpoint, fsynced) before deleting older segments.

mod format;
mod state;
#[cfg(test)]
mod tests;

use std::{
    collections::VecDeque,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write as _},
    ops::RangeInclusive,
    os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use format::{
    CHECKPOINT_LEN, Checkpoint, FORMAT_VERSION, MAX_PAYLOAD_LEN, MIN_READ_VERSION, Parsed,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader, decode_segment_header, encode_checkpoint,
    encode_record, encode_segment_header, parse_entry, record_len, resync,
};
pub use state::{Gap, GapCause};
use state::{MAX_PENDING_GAPS, State};

/// A sparse index entry is kept every this many bytes of a segment, so a read that does not
/// continue where the last one stopped scans at most this much to find its first record.
const INDEX_STRIDE: u64 = 64 * 1024;
/// Bytes read from a segment at a time when sending.
const READ_CHUNK: usize = 256 * 1024;
const STATE_FILE: &str = "state";
const STATE_TMP: &str = "state.tmp";
/// A new segment is written here and then renamed into place.
const SEGMENT_TMP: &str = "segment.tmp";
const LOCK_FILE: &str = "LOCK";
/// The spool's identity (see [`OpenReport::spool_id`]).
const ID_FILE: &str = "id";
const ID_TMP: &str = "id.tmp";
/// How long [`Spool::open`] waits for the directory lock before reporting it in use.
const LOCK_WAIT: Duration = Duration::from_millis(500);
const SEGMENT_SUFFIX: &str = ".seg";

/// Where the source that feeds the spool stood after a batch (for the sensor, its position in
/// the kernel ring buffer). Opaque to the spool: it stores the bytes with the batch and hands
/// back the newest one whose batch is wholly spooled ([`Spool::last_checkpoint`]).
pub type SourceCheckpoint = [u8; 32];

/// When appended records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync once per [`Spool::append`] call, before it returns.
    EveryAppend,
    /// fsync at most once per interval (in `append` or [`Spool::sync_if_due`]): far more
    /// throughput, and records become readable (sendable) only once synced.
    Interval(Duration),
}

/// Sizes and durability of a spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Upper bound of the segment files' total size; past it the oldest segment is evicted.
    /// At least two segments' worth, so that eviction never has to drop the segment being
    /// written.
    pub max_bytes: u64,
    /// A segment is sealed and a new one started once the next batch would take it past this
    /// size (a single larger batch still goes into one segment: one write per batch).
    pub segment_bytes: u64,
    pub sync: SyncPolicy,
}

impl Default for SpoolOptions {
    /// 256 MiB holds about a million typical events (an hour of a busy host, days of a quiet
    /// one) while the collector is away; 8 MiB segments make eviction and deletion steps small;
    /// a 50 ms sync interval keeps fsyncs to 20 a second and delays sending by no more.
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            segment_bytes: 8 * 1024 * 1024,
            sync: SyncPolicy::Interval(Duration::from_millis(50)),
        }
    }
}

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Torn tails truncated (at most one per segment): writes a crash cut short.
    pub torn_records: u64,
    /// Bytes removed with those tails.
    pub truncated_bytes: u64,
    /// Events newly found damaged in the middle of the log and skipped (also reported as
    /// [`GapCause::Corrupt`] gaps).
    pub corrupt_records: u64,
    /// Bytes skipped over with them.
    pub corrupt_bytes: u64,
    /// Unacked events in the spool, to be sent.
    pub recovered_events: u64,
    /// Where the sender starts reading.
    pub first_unacked_seq: u64,
    /// The seq the next appended event gets.
    pub next_seq: u64,
    /// Events evicted from a full spool, over the spool's whole life.
    pub evicted_total: u64,
    /// The state file was damaged and rebuilt from the segments: acked events may be sent
    /// again (the collector drops duplicates) and `evicted_total` restarted from zero.
    pub state_reset: bool,
    /// Segment files in use.
    pub segments: usize,
    /// The newest confirmed source checkpoint (see [`Spool::last_checkpoint`]).
    pub last_checkpoint: Option<SourceCheckpoint>,
    /// Random, made with the spool and kept for its life: the space its seqs are unique in. A
    /// new spool (its directory wiped, the host reinstalled) starts again at seq 1 under a new
    /// id, so the collector cannot mistake its events for resends of the old spool's. Empty
    /// for a spool made before spools had ids (its seqs continue the collector's old space).
    pub spool_id: String,
}

/// Failures of the spool. After any of them the spool is still consistent and usable: a write
/// that failed half-way is cut back, and the events of a failed `append` were not spooled.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("disk full writing {path}")]
    DiskFull {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool directory {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error(
        "segment {path} has format version {version}; this build reads versions {min} to {supported}",
        min = MIN_READ_VERSION
    )]
    UnsupportedVersion { path: PathBuf, version: u32, supported: u32 },
    #[error("invalid spool options: {reason}")]
    InvalidOptions { reason: &'static str },
    #[error("payload {index} of the batch has {len} bytes, more than the record limit of {max}")]
    PayloadTooLarge { index: usize, len: usize, max: usize },
    #[error("batch of {bytes} bytes does not fit in a spool of {max_bytes} bytes")]
    BatchTooLarge { bytes: u64, max_bytes: u64 },
    #[error("ack up to seq {up_to} is beyond the last assigned seq {last}")]
    AckBeyondEnd { up_to: u64, last: u64 },
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> SpoolError {
    let full = source.kind() == io::ErrorKind::StorageFull
        || source.kind() == io::ErrorKind::QuotaExceeded
        || matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
    if full {
        SpoolError::DiskFull { path: path.to_owned(), source }
    } else {
        SpoolError::Io { op, path: path.to_owned(), source }
    }
}

/// One segment file and what is known about its records.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    base_seq: u64,
    /// Format version of the file; `None` when its header is damaged. Only a segment of
    /// [`FORMAT_VERSION`] is appended to.
    version: Option<u32>,
    /// Valid event records in the file; `first_seq`/`last_seq` mean nothing while it is 0.
    records: u64,
    first_seq: u64,
    last_seq: u64,
    /// Logical end: everything before it was written by this spool or checked on open.
    len: u64,
    /// `(seq, offset)` of a record every [`INDEX_STRIDE`] bytes.
    index: Vec<(u64, u64)>,
    /// Byte ranges `[start, end)` known to be damaged; readers jump over them.
    skips: Vec<(u64, u64)>,
    /// Seq ranges inside `first_seq..=last_seq` with no record (damaged or retired).
    holes: Vec<(u64, u64)>,
    /// The newest confirmed checkpoint in the file.
    checkpoint: Option<SourceCheckpoint>,
}

impl Segment {
    /// A segment of which nothing past the header is known yet.
    fn new(path: PathBuf, file: File, base_seq: u64, version: Option<u32>) -> Self {
        Self {
            path,
            file,
            base_seq,
            version,
            records: 0,
            first_seq: 0,
            last_seq: 0,
            len: SEGMENT_HEADER_LEN as u64,
            index: Vec::new(),
            skips: Vec::new(),
            holes: Vec::new(),
            checkpoint: None,
        }
    }

    /// Forgets what a scan found, to scan the file again from its header.
    fn clear(&mut self) {
        self.records = 0;
        self.first_seq = 0;
        self.last_seq = 0;
        self.len = SEGMENT_HEADER_LEN as u64;
        self.index.clear();
        self.skips.clear();
        self.holes.clear();
        self.checkpoint = None;
    }

    /// Whether the segment holds an event above `floor` (one not acked or evicted).
    fn holds_live(&self, floor: u64) -> bool {
        self.records > 0 && self.last_seq > floor
    }

    /// The seq the next record appended here would naturally get.
    fn next_seq(&self) -> u64 {
        let after_holes = self.holes.iter().map(|&(_, b)| b + 1).max().unwrap_or(0);
        let after_records = if self.records == 0 { self.base_seq } else { self.last_seq + 1 };
        after_records.max(after_holes)
    }

    /// Events with a seq above `floor`.
    fn live_events(&self, floor: u64) -> u64 {
        if self.records == 0 || self.last_seq <= floor {
            return 0;
        }
        let from = self.first_seq.max(floor + 1);
        let holes: u64 = self
            .holes
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(from), b.min(self.last_seq));
                if a <= b { b - a + 1 } else { 0 }
            })
            .sum();
        (self.last_seq - from + 1).saturating_sub(holes)
    }

    fn add_record(&mut self, seq: u64, offset: u64, total: u64) {
        if self.records == 0 {
            self.first_seq = seq;
        }
        let last_indexed = self.index.last().map(|&(_, o)| o);
        if last_indexed.is_none_or(|o| offset >= o + INDEX_STRIDE) {
            self.index.push((seq, offset));
        }
        self.records += 1;
        self.last_seq = seq;
        self.len = offset + total;
    }

    /// Offset of the latest indexed record at or before `seq`, with that record's seq.
    fn seek(&self, seq: u64) -> (u64, u64) {
        let i = self.index.partition_point(|&(s, _)| s <= seq);
        match i {
            0 => (self.base_seq, SEGMENT_HEADER_LEN as u64),
            _ => self.index[i - 1],
        }
    }
}

/// Where the last read stopped, so the next one continues without searching.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    seq: u64,
    base_seq: u64,
    offset: u64,
}

/// A window of one segment's bytes, reused across reads.
#[derive(Debug, Default)]
struct ReadBuf {
    base_seq: u64,
    start: u64,
    data: Vec<u8>,
}

impl ReadBuf {
    /// The buffered bytes from `pos` on, if `pos` is inside the window.
    fn at(&self, base_seq: u64, pos: u64) -> Option<&[u8]> {
        if self.base_seq != base_seq || pos < self.start {
            return None;
        }
        let rel = usize::try_from(pos - self.start).ok()?;
        self.data.get(rel..).filter(|s| !s.is_empty())
    }

    fn fill(&mut self, seg: &Segment, pos: u64, want: usize) -> io::Result<()> {
        let avail = usize::try_from(seg.len.saturating_sub(pos)).unwrap_or(usize::MAX);
        let n = want.max(READ_CHUNK).min(avail);
        self.data.resize(n, 0);
        self.base_seq = seg.base_seq;
        self.start = pos;
        seg.file.read_exact_at(&mut self.data, pos)
    }

    /// Parses the record (of either kind) at `pos` of `seg`, reading from the file when the
    /// window does not hold all of it: the first read learns the record's length, the second
    /// reads it whole. A record reaching past the segment's end stays incomplete.
    fn parse_at(&mut self, seg: &Segment, pos: u64) -> io::Result<Parsed> {
        let mut parsed = parse_entry(self.at(seg.base_seq, pos).unwrap_or_default());
        for _ in 0..2 {
            match parsed {
                Parsed::Incomplete { total, .. } if pos + total as u64 <= seg.len => {
                    self.fill(seg, pos, total)?;
                    parsed = parse_entry(self.at(seg.base_seq, pos).unwrap_or_default());
                }
                _ => break,
            }
        }
        Ok(parsed)
    }
}

/// The spool. See the module docs.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    /// Held (flock) for the spool's life.
    _lock: File,
    /// Oldest first; never empty; the last one is written to.
    segments: VecDeque<Segment>,
    state: State,
    next_seq: u64,
    /// Records below this seq are fsynced and may be read.
    durable_next: u64,
    /// Bytes were written to the active segment since its last fsync (a checkpoint alone
    /// takes no seq, so `durable_next` cannot tell).
    unsynced: bool,
    last_sync: Instant,
    total_bytes: u64,
    /// Bytes past the active segment's logical end may hold a failed write that could not be
    /// cut back; the next append retries the cut before writing.
    tail_dirty: bool,
    write_buf: Vec<u8>,
    read_buf: ReadBuf,
    cursor: Option<Cursor>,
    /// Gaps handed out by [`Spool::take_evictions`] and not yet confirmed.
    in_flight: Vec<Gap>,
    /// The newest confirmed checkpoint; the active segment holds it.
    last_checkpoint: Option<SourceCheckpoint>,
}

fn segment_path(dir: &Path, base_seq: u64) -> PathBuf {
    dir.join(format!("{base_seq:020}{SEGMENT_SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err("fsync directory", dir, e))
}

fn write_state_file(dir: &Path, state: &State) -> Result<(), SpoolError> {
    let tmp = dir.join(STATE_TMP);
    let bytes = state.encode();
    let write = || -> io::Result<()> {
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", &tmp, e));
    }
    let path = dir.join(STATE_FILE);
    fs::rename(&tmp, &path).map_err(|e| io_err("rename state file to", &path, e))?;
    sync_dir(dir)
}

/// The spool's id: read from its file, or made (random, 128 bits, hex) and made durable. A
/// spool whose seqs start again (`restart`) always gets a new one, whatever its file says. A
/// spool that has a state file but no id predates ids and keeps the empty id. A damaged id
/// is replaced: the collector then sees a new seq space (a resent event may be stored twice,
/// none is mistaken for a duplicate).
fn read_or_make_id(dir: &Path, legacy: bool, restart: bool) -> Result<String, SpoolError> {
    let path = dir.join(ID_FILE);
    match fs::read_to_string(&path) {
        _ if restart => {}
        Ok(text) => {
            let id = text.trim();
            if id.is_empty() || (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())) {
                return Ok(id.to_owned());
            }
            tracing::warn!(path = %path.display(), "spool id damaged; the spool takes a new one");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("read", &path, e)),
    }
    let id = if legacy && !restart && !path.exists() {
        String::new()
    } else {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)
            .map_err(|e| io_err("draw random bytes for", &path, io::Error::other(e)))?;
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let tmp = dir.join(ID_TMP);
    let write = || -> io::Result<()> {
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", &tmp, e));
    }
    fs::rename(&tmp, &path).map_err(|e| io_err("rename spool id to", &path, e))?;
    sync_dir(dir)?;
    Ok(id)
}

/// Size of a new segment: its header, and the copy of the newest checkpoint if there is one.
fn fresh_segment_len(carry: Option<&SourceCheckpoint>) -> u64 {
    (SEGMENT_HEADER_LEN + if carry.is_some() { CHECKPOINT_LEN } else { 0 }) as u64
}

/// Creates a segment holding its header and, when `carry` is set, a count-0 copy of the newest
/// checkpoint (so deleting the older segments cannot lose it), and makes it durable, directory
/// entry included.
///
/// The file is written aside and renamed into place, so a crash leaves no such segment or a
/// whole one. That also replaces, atomically, an existing segment of the same name: one that
/// holds no events (a segment with events has a base seq below the next seq).
fn create_segment(
    dir: &Path,
    base_seq: u64,
    carry: Option<&SourceCheckpoint>,
) -> Result<Segment, SpoolError> {
    let path = segment_path(dir, base_seq);
    let tmp = dir.join(SEGMENT_TMP);
    let mut bytes = encode_segment_header(base_seq).to_vec();
    if let Some(c) = carry {
        encode_checkpoint(&mut bytes, 0, base_seq, c);
    }
    let create = || -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all_at(&bytes, 0)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(file)
    };
    let file = match create() {
        Ok(f) => f,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("create segment", &path, e));
        }
    };
    sync_dir(dir)?;
    let mut seg = Segment::new(path, file, base_seq, Some(FORMAT_VERSION));
    seg.len = bytes.len() as u64;
    seg.checkpoint = carry.copied();
    Ok(seg)
}

/// Whether open may append to `seg`, the newest segment: it must be of this build's format
/// (an older build would take checkpoints for damage), its seqs must continue into `next_seq`,
/// and it must hold the newest checkpoint if there is one.
fn reusable(seg: &Segment, next_seq: u64, any_checkpoint: bool) -> bool {
    seg.version == Some(FORMAT_VERSION)
        && seg.next_seq() == next_seq
        && (seg.checkpoint.is_some() || !any_checkpoint)
}

/// Deletes the sealed segments (all but the last) that hold no event above `floor`; returns
/// the rest and whether any file went.
fn drop_dead_segments(
    segments: VecDeque<Segment>,
    floor: u64,
) -> Result<(VecDeque<Segment>, bool), SpoolError> {
    let active = segments.len().saturating_sub(1);
    let mut kept = VecDeque::with_capacity(segments.len());
    let mut removed = false;
    for (i, seg) in segments.into_iter().enumerate() {
        if i == active || seg.holds_live(floor) {
            kept.push_back(seg);
            continue;
        }
        fs::remove_file(&seg.path).map_err(|e| io_err("remove segment", &seg.path, e))?;
        removed = true;
    }
    Ok((kept, removed))
}

/// Damage found while scanning or reading, in seq terms.
struct Damage {
    first: u64,
    last: u64,
}

/// What scanning one segment on open found.
#[derive(Default)]
struct ScanOutcome {
    torn: u64,
    truncated_bytes: u64,
    corrupt_bytes: u64,
    damage: Vec<Damage>,
}

/// Where the valid part of a segment's bytes ends before the bytes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Nothing valid follows this offset: a torn tail.
    Tail(usize),
    /// The batch whose checkpoint starts at this offset is cut short at the tail: it was never
    /// synced whole, so it goes whole.
    Batch(usize),
}

/// What one walk over a segment's bytes found, besides what it recorded in the segment.
#[derive(Default)]
struct Walk {
    corrupt_bytes: u64,
    damage: Vec<Damage>,
    cut: Option<Cut>,
}

/// A checkpoint whose batch is still being matched against the records after it.
struct OpenBatch {
    /// Where the checkpoint record starts.
    offset: usize,
    next_seq: u64,
    left: u32,
    body: SourceCheckpoint,
}

impl OpenBatch {
    /// Starts matching the batch of checkpoint `c`, found at `offset`. A checkpoint of no
    /// events is confirmed at once (into `confirmed`) and leaves nothing to match.
    fn start(
        offset: usize,
        c: Checkpoint,
        confirmed: &mut Option<SourceCheckpoint>,
    ) -> Option<Self> {
        Self { offset, next_seq: c.first_seq, left: c.count, body: c.body }.settle(confirmed)
    }

    /// Matches the next intact record: a seq out of line ends the batch unconfirmed, the
    /// batch's last record confirms it.
    fn matched(mut self, seq: u64, confirmed: &mut Option<SourceCheckpoint>) -> Option<Self> {
        if seq != self.next_seq {
            return None;
        }
        self.next_seq += 1;
        self.left -= 1;
        self.settle(confirmed)
    }

    fn settle(self, confirmed: &mut Option<SourceCheckpoint>) -> Option<Self> {
        if self.left == 0 {
            *confirmed = Some(self.body);
            return None;
        }
        Some(self)
    }
}

/// Checks every record in `bytes` (a segment file, header included) in order, and records in
/// `seg` the valid event records, the damage skipped and the newest confirmed checkpoint. Stops
/// at a torn tail; see the recovery rules in the module docs.
fn walk_segment(seg: &mut Segment, bytes: &[u8]) -> Walk {
    let mut walk = Walk::default();
    let mut expected = seg.base_seq;
    let mut batch: Option<OpenBatch> = None;
    let mut pos = SEGMENT_HEADER_LEN;
    while pos < bytes.len() {
        let parsed = parse_entry(&bytes[pos..]);
        match parsed {
            Parsed::Record { seq, total } if seq >= expected => {
                if seq > expected && seg.records > 0 {
                    // A seq retired by an earlier open (its record failed at the tail).
                    seg.holes.push((expected, seq - 1));
                }
                seg.add_record(seq, pos as u64, total as u64);
                batch = batch.and_then(|b| b.matched(seq, &mut seg.checkpoint));
                expected = seq + 1;
                pos += total;
                continue;
            }
            Parsed::Checkpoint(c) if c.first_seq >= expected => {
                batch = OpenBatch::start(pos, c, &mut seg.checkpoint);
                pos += CHECKPOINT_LEN;
                continue;
            }
            _ => {}
        }
        if let Some((next, seq, _)) = resync(bytes, pos + 1, expected) {
            // Damage in the middle: the batch it interrupts is never confirmed, nor cut.
            batch = None;
            walk.corrupt_bytes += (next - pos) as u64;
            seg.skips.push((pos as u64, next as u64));
            if seq > expected {
                seg.holes.push((expected, seq - 1));
                walk.damage.push(Damage { first: expected, last: seq - 1 });
            }
            expected = seq;
            pos = next;
            continue;
        }
        // Nothing valid after this point: a torn tail.
        if let Parsed::Invalid { header_ok: true, seq } = parsed
            && seq == expected
        {
            // Complete, claims the next seq, fails its checksum: it was written whole (and may
            // have been sent), so its seq is retired, not handed out again. Its batch may have
            // been sent too: the batch's good records stay, its checkpoint unconfirmed.
            seg.holes.push((seq, seq));
            walk.damage.push(Damage { first: seq, last: seq });
            batch = None;
        }
        walk.cut = Some(Cut::Tail(pos));
        break;
    }
    if let Some(b) = batch {
        walk.cut = Some(Cut::Batch(b.offset));
    }
    seg.len = seg.len.max(pos.min(bytes.len()) as u64);
    walk
}

/// Reads and checks every record of one segment file, truncating a torn tail (and with it a
/// batch the tail cut short).
fn scan_segment(dir: &Path, name_base: u64) -> Result<(Segment, ScanOutcome), SpoolError> {
    let path = segment_path(dir, name_base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io_err("open segment", &path, e))?;
    let bytes = fs::read(&path).map_err(|e| io_err("read segment", &path, e))?;
    let mut out = ScanOutcome::default();
    let (base_seq, version) = match decode_segment_header(&bytes) {
        SegmentHeader::Valid { base_seq, version } => (base_seq, Some(version)),
        SegmentHeader::Unsupported { version } => {
            return Err(SpoolError::UnsupportedVersion {
                path,
                version,
                supported: FORMAT_VERSION,
            });
        }
        SegmentHeader::Short => {
            // Created but its header never completed: nothing was ever written to it.
            file.set_len(0)
                .and_then(|()| file.write_all_at(&encode_segment_header(name_base), 0))
                .and_then(|()| file.sync_all())
                .map_err(|e| io_err("rewrite segment header of", &path, e))?;
            if !bytes.is_empty() {
                out.torn = 1;
                out.truncated_bytes = bytes.len() as u64;
            }
            (name_base, Some(FORMAT_VERSION))
        }
        SegmentHeader::Damaged => {
            tracing::warn!(path = %path.display(), "spool segment header damaged; using the seq in its name");
            (name_base, None)
        }
    };
    let mut seg = Segment::new(path, file, base_seq, version);
    let mut end = bytes.len();
    let walk = loop {
        let walk = walk_segment(&mut seg, &bytes[..end]);
        match walk.cut {
            // The batch's records were recorded already: walk again, up to its checkpoint.
            Some(Cut::Batch(at)) => {
                end = at;
                seg.clear();
            }
            Some(Cut::Tail(at)) => {
                end = at;
                break walk;
            }
            None => break walk,
        }
    };
    out.corrupt_bytes = walk.corrupt_bytes;
    out.damage = walk.damage;
    if end < bytes.len() {
        out.torn += 1;
        out.truncated_bytes += (bytes.len() - end) as u64;
        seg.file
            .set_len(end as u64)
            .and_then(|()| seg.file.sync_all())
            .map_err(|e| io_err("truncate torn tail of", &seg.path, e))?;
    }
    Ok((seg, out))
}

impl Spool {
    /// Opens (creating when absent) the spool in `dir` and recovers it; see the module docs.
    pub fn open(
        dir: impl AsRef<Path>,
        opts: SpoolOptions,
    ) -> Result<(Self, OpenReport), SpoolError> {
        let dir = dir.as_ref().to_owned();
        if opts.segment_bytes < (SEGMENT_HEADER_LEN + RECORD_HEADER_LEN) as u64 {
            return Err(SpoolError::InvalidOptions {
                reason: "segment_bytes is smaller than one empty record",
            });
        }
        if opts.max_bytes < opts.segment_bytes.saturating_mul(2) {
            return Err(SpoolError::InvalidOptions {
                reason: "max_bytes must hold at least two segments",
            });
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_err("create directory", &dir, e))?;
        // The events name credentials and processes: nobody else reads them.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("set permissions of", &dir, e))?;

        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_err("open", &lock_path, e))?;
        // A lock still held for a moment is retried: a child forked by this process keeps the
        // previous owner's descriptor (and its lock) until it execs.
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(SpoolError::Locked { path: dir });
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path, e)),
            }
        }

        for name in [STATE_TMP, SEGMENT_TMP, ID_TMP] {
            let tmp = dir.join(name);
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("remove", &tmp, e));
                }
                _ => {}
            }
        }
        let state_path = dir.join(STATE_FILE);
        let mut report = OpenReport::default();
        let state_existed = state_path.exists();
        let mut state = match fs::read(&state_path) {
            Ok(bytes) => State::decode(&bytes).unwrap_or_else(|| {
                tracing::warn!(path = %state_path.display(), "spool state file damaged; rebuilding it from the segments");
                report.state_reset = true;
                State::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err("read", &state_path, e)),
        };

        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io_err("list", &dir, e))? {
            let entry = entry.map_err(|e| io_err("list", &dir, e))?;
            if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();

        let mut segments = VecDeque::with_capacity(bases.len() + 1);
        let mut new_damage = Vec::new();
        for base in bases {
            let (seg, out) = scan_segment(&dir, base)?;
            report.torn_records += out.torn;
            report.truncated_bytes += out.truncated_bytes;
            report.corrupt_bytes += out.corrupt_bytes;
            new_damage.extend(out.damage);
            segments.push_back(seg);
        }
        if report.state_reset {
            // Resend everything that is left rather than lose anything.
            state.acked = segments.iter().find(|s| s.records > 0).map_or(0, |s| s.first_seq - 1);
        }

        // `ack` deletes segments before it writes the state file, so a crash in between leaves
        // the watermark behind the oldest segment: only acked events were before it.
        if let Some(oldest) = segments.front() {
            state.acked = state.acked.max(oldest.base_seq.saturating_sub(1));
        }
        let mut next_seq = state.next_seq.max(state.floor() + 1).max(1);
        for seg in &segments {
            next_seq = next_seq.max(seg.next_seq());
        }

        // Seqs begin again at 1 (a new spool, or one whose state and records are all gone):
        // a new seq space, under a new id.
        let spool_id = read_or_make_id(&dir, state_existed, next_seq == 1)?;

        let floor = state.floor();
        let mut dirty_state = report.state_reset || state.next_seq != next_seq;
        for d in new_damage {
            let first = d.first.max(floor + 1);
            if first > d.last || state.hole_known(first, d.last) {
                continue;
            }
            let events = d.last - first + 1;
            report.corrupt_records += events;
            state.corrupt_total += events;
            state.push_gap(
                Gap { first_seq: first, last_seq: d.last, events, cause: GapCause::Corrupt },
                true,
            );
            state.remember_hole(first, d.last);
            dirty_state = true;
        }

        // Later segments and later offsets are newer.
        let last_checkpoint = segments.iter().rev().find_map(|s| s.checkpoint);
        let reuse =
            segments.back().is_some_and(|s| reusable(s, next_seq, last_checkpoint.is_some()));
        if !reuse {
            // A newest segment already named for `next_seq` holds no records (one would take
            // `next_seq` past its base): the new segment replaces it in place.
            if segments.back().is_some_and(|s| s.base_seq == next_seq) {
                segments.pop_back();
            }
            segments.push_back(create_segment(&dir, next_seq, last_checkpoint.as_ref())?);
        }
        // Only now that the active segment holds the newest checkpoint may the sealed segments
        // that hold nothing live go.
        let (segments, removed) = drop_dead_segments(segments, floor)?;
        if removed {
            sync_dir(&dir)?;
        }
        // Whatever was recovered is made durable now, so it may be sent.
        if let Some(active) = segments.back() {
            active.file.sync_all().map_err(|e| io_err("fsync", &active.path, e))?;
        }
        if dirty_state {
            state.next_seq = next_seq;
            write_state_file(&dir, &state)?;
        }

        let total_bytes = segments.iter().map(|s| s.len).sum();
        let spool = Self {
            dir,
            opts,
            _lock: lock,
            segments,
            state,
            next_seq,
            durable_next: next_seq,
            unsynced: false,
            last_sync: Instant::now(),
            total_bytes,
            tail_dirty: false,
            write_buf: Vec::new(),
            read_buf: ReadBuf::default(),
            cursor: None,
            in_flight: Vec::new(),
            last_checkpoint,
        };
        report.last_checkpoint = last_checkpoint;
        report.recovered_events = spool.depth_events();
        report.first_unacked_seq = spool.first_unacked_seq();
        report.next_seq = spool.next_seq;
        report.evicted_total = spool.state.evicted_total;
        report.segments = spool.segments.len();
        report.spool_id = spool_id;
        if report.torn_records + report.corrupt_records > 0 || report.state_reset {
            tracing::warn!(?report, "spool recovered with repairs");
        }
        Ok((spool, report))
    }

    fn active(&self) -> &Segment {
        self.segments.back().expect("a spool always has an active segment")
    }

    /// Appends a batch, assigning it the next contiguous seqs, with one write and (under
    /// [`SyncPolicy::EveryAppend`]) one fsync. When the spool would outgrow `max_bytes`, its
    /// oldest segments are evicted first (see [`Spool::take_evictions`]).
    ///
    /// On error nothing of the batch is spooled and no seq is consumed: the caller counts the
    /// batch's events as lost.
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<RangeInclusive<u64>, SpoolError> {
        self.append_batch(payloads, None)
    }

    /// [`append`](Spool::append) with the source's position after this batch: a checkpoint
    /// record written in the same write, just before the batch's records, so the two reach the
    /// disk together or not at all. It is [`last_checkpoint`](Spool::last_checkpoint) from now
    /// on, and after a crash once every record of the batch is found intact. An empty batch
    /// writes the checkpoint alone, to move the position on when the source yielded no events.
    ///
    /// The checkpoint is durable with the batch (see the module docs); on error neither is
    /// spooled.
    pub fn append_with_checkpoint(
        &mut self,
        payloads: &[&[u8]],
        checkpoint: &SourceCheckpoint,
    ) -> Result<RangeInclusive<u64>, SpoolError> {
        self.append_batch(payloads, Some(checkpoint))
    }

    fn append_batch(
        &mut self,
        payloads: &[&[u8]],
        checkpoint: Option<&SourceCheckpoint>,
    ) -> Result<RangeInclusive<u64>, SpoolError> {
        let first = self.next_seq;
        if payloads.is_empty() && checkpoint.is_none() {
            // The empty range just before the next seq.
            return Ok(first..=first - 1);
        }
        let batch_bytes = self.batch_len(payloads, checkpoint.is_some())?;
        self.make_room(batch_bytes)?;

        let mut buf = std::mem::take(&mut self.write_buf);
        buf.clear();
        buf.reserve(usize::try_from(batch_bytes).unwrap_or(0));
        if let Some(c) = checkpoint {
            // `batch_len` refused batches whose count does not fit.
            encode_checkpoint(&mut buf, payloads.len() as u32, first, c);
        }
        for (i, p) in payloads.iter().enumerate() {
            encode_record(&mut buf, first + i as u64, p);
        }
        let result = self.write_batch(&buf);
        self.write_buf = buf;
        let synced = result?;

        let start = self.active().len;
        let seg = self.segments.back_mut().expect("active segment");
        let mut offset = start;
        if let Some(c) = checkpoint {
            seg.checkpoint = Some(*c);
            offset += CHECKPOINT_LEN as u64;
        }
        for (i, p) in payloads.iter().enumerate() {
            let total = record_len(p.len());
            seg.add_record(first + i as u64, offset, total);
            offset += total;
        }
        seg.len = start + batch_bytes;
        self.total_bytes += batch_bytes;
        self.next_seq = first + payloads.len() as u64;
        if let Some(c) = checkpoint {
            self.last_checkpoint = Some(*c);
        }
        if synced {
            self.durable_next = self.next_seq;
        }
        Ok(first..=self.next_seq - 1)
    }

    /// Bytes a batch takes on disk, its checkpoint included. Refuses a payload over the record
    /// limit, and a batch that would not fit in the spool even alone in a new segment.
    fn batch_len(&self, payloads: &[&[u8]], with_checkpoint: bool) -> Result<u64, SpoolError> {
        let mut bytes = if with_checkpoint { CHECKPOINT_LEN as u64 } else { 0 };
        for (index, p) in payloads.iter().enumerate() {
            if p.len() > MAX_PAYLOAD_LEN {
                return Err(SpoolError::PayloadTooLarge {
                    index,
                    len: p.len(),
                    max: MAX_PAYLOAD_LEN,
                });
            }
            bytes += record_len(p.len());
        }
        // A checkpoint counts its batch in a u32 (4 billion records: far past any max_bytes).
        let count_fits = !with_checkpoint || u32::try_from(payloads.len()).is_ok();
        if !count_fits
            || bytes + fresh_segment_len(self.last_checkpoint.as_ref()) > self.opts.max_bytes
        {
            return Err(SpoolError::BatchTooLarge { bytes, max_bytes: self.opts.max_bytes });
        }
        Ok(bytes)
    }

    /// Makes room for `batch_bytes` more at the active segment's end: cuts back a failed write
    /// left there, rolls over when the batch would take the segment past its size, and evicts
    /// while the spool would outgrow `max_bytes`.
    fn make_room(&mut self, batch_bytes: u64) -> Result<(), SpoolError> {
        if self.tail_dirty {
            let a = self.active();
            a.file.set_len(a.len).map_err(|e| io_err("truncate failed write in", &a.path, e))?;
            self.tail_dirty = false;
        }
        let a = self.active();
        // Rolling over only helps when the segment holds more than a new one would.
        if a.len > fresh_segment_len(self.last_checkpoint.as_ref())
            && a.len + batch_bytes > self.opts.segment_bytes
        {
            self.roll_over()?;
        }
        while self.total_bytes + batch_bytes > self.opts.max_bytes && self.segments.len() > 1 {
            self.evict_oldest()?;
        }
        Ok(())
    }

    /// Writes `buf` at the active segment's end and syncs as the policy says (returning whether
    /// it did); on failure cuts the file back so the log on disk stays what memory says it is.
    fn write_batch(&mut self, buf: &[u8]) -> Result<bool, SpoolError> {
        let sync_now = match self.opts.sync {
            SyncPolicy::EveryAppend => true,
            SyncPolicy::Interval(d) => self.last_sync.elapsed() >= d,
        };
        let a = self.active();
        let res =
            a.file.write_all_at(buf, a.len).map_err(|e| io_err("write", &a.path, e)).and_then(
                |()| {
                    if sync_now {
                        a.file.sync_data().map_err(|e| io_err("fsync", &a.path, e))
                    } else {
                        Ok(())
                    }
                },
            );
        match res {
            Ok(()) => {
                if sync_now {
                    self.last_sync = Instant::now();
                }
                self.unsynced = !sync_now;
                Ok(sync_now)
            }
            Err(e) => {
                if a.file.set_len(a.len).is_err() {
                    self.tail_dirty = true;
                }
                Err(e)
            }
        }
    }
}

impl Spool {
    /// Seals the active segment (synced, so everything before the new one is durable) and
    /// starts a new one at the next seq, holding a copy of the newest checkpoint.
    fn roll_over(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        let seg = create_segment(&self.dir, self.next_seq, self.last_checkpoint.as_ref())?;
        if self.active().base_seq == seg.base_seq {
            // The active segment held checkpoints only (no event took a seq since it began),
            // of which the new one carries the newest: it replaced the file.
            let old = self.segments.pop_back().expect("active segment");
            self.total_bytes -= old.len;
            self.read_buf = ReadBuf::default();
            self.cursor = None;
        }
        self.total_bytes += seg.len;
        self.segments.push_back(seg);
        Ok(())
    }

    /// Drops the oldest (sealed) segment, acked or not, recording the unacked events in it as
    /// a gap. The state file says so before the file goes, so a crash in between cannot bring
    /// the events back as if nothing happened.
    fn evict_oldest(&mut self) -> Result<(), SpoolError> {
        let seg = &self.segments[0];
        let floor = self.state.floor();
        let live = seg.live_events(floor);
        let mut state = self.state.clone();
        if live > 0 {
            let gap = Gap {
                first_seq: seg.first_seq.max(floor + 1),
                last_seq: seg.last_seq,
                events: live,
                cause: GapCause::Evicted,
            };
            // A gap already handed out is not widened: the transport would never see the rest.
            let merge = !state.gaps.last().is_some_and(|g| self.in_flight.contains(g));
            state.push_gap(gap, merge);
            state.evicted_total += live;
            tracing::warn!(
                first_seq = gap.first_seq,
                last_seq = gap.last_seq,
                events = live,
                "spool full: evicted unacked events"
            );
        }
        let through = seg.next_seq().saturating_sub(1);
        state.evicted_through = state.evicted_through.max(through);
        state.next_seq = self.next_seq;
        self.commit_state(state)?;
        let seg = &self.segments[0];
        fs::remove_file(&seg.path).map_err(|e| io_err("remove segment", &seg.path, e))?;
        self.total_bytes -= seg.len;
        self.segments.pop_front();
        sync_dir(&self.dir)
    }

    /// Writes `state` to disk and only then adopts it.
    fn commit_state(&mut self, mut state: State) -> Result<(), SpoolError> {
        let floor = state.floor();
        state.known_holes.retain(|&(_, b)| b > floor);
        write_state_file(&self.dir, &state)?;
        self.state = state;
        Ok(())
    }

    /// Up to `max_events` records with seq ≥ `from`, in seq order, whose payloads add up to at
    /// most `max_bytes` (one record is returned even if larger, so nothing can stall the
    /// sender). Only durable records are returned, and none at or below the acked or evicted
    /// watermark.
    ///
    /// Seqs are contiguous except across a [`Gap`]: the transport starts a new `EventBatch`
    /// wherever `seq` is not the previous one plus one. Damage found while reading is skipped,
    /// counted and reported like damage found on open.
    pub fn read_from(
        &mut self,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let mut out = Vec::new();
        let want = from.max(self.state.floor() + 1);
        let end = self.durable_next;
        if want >= end || max_events == 0 {
            return Ok(out);
        }
        let mut i = self.segments.partition_point(|s| s.base_seq <= want).saturating_sub(1);
        let (mut prev_seq, mut pos) = match self.cursor {
            Some(c) if c.seq == want && self.segments[i].base_seq == c.base_seq => {
                (want.saturating_sub(1), c.offset)
            }
            _ => {
                let (seq, offset) = self.segments[i].seek(want);
                (seq.saturating_sub(1), offset)
            }
        };
        let mut bytes = 0usize;
        let mut rb = std::mem::take(&mut self.read_buf);
        let result = loop {
            if i >= self.segments.len() {
                break Ok(());
            }
            let seg = &self.segments[i];
            if pos >= seg.len {
                i += 1;
                pos = SEGMENT_HEADER_LEN as u64;
                prev_seq = self.segments.get(i).map_or(0, |s| s.base_seq.saturating_sub(1));
                continue;
            }
            if let Some(&(_, skip_end)) = seg.skips.iter().find(|&&(a, b)| a <= pos && pos < b) {
                pos = skip_end;
                continue;
            }
            let parsed = match rb.parse_at(seg, pos) {
                Ok(p) => p,
                Err(e) => break Err(io_err("read", &seg.path, e)),
            };
            match parsed {
                // Not an event: stepped over where it stands (`skips` are for damage only).
                Parsed::Checkpoint(_) => pos += CHECKPOINT_LEN as u64,
                Parsed::Record { seq, total } if seq > prev_seq => {
                    if seq >= end {
                        break Ok(());
                    }
                    if seq >= want {
                        let len = total - RECORD_HEADER_LEN;
                        if out.len() >= max_events || (!out.is_empty() && bytes + len > max_bytes) {
                            self.cursor = Some(Cursor { seq, base_seq: seg.base_seq, offset: pos });
                            break Ok(());
                        }
                        let rec = rb.at(seg.base_seq, pos).unwrap_or_default();
                        out.push((seq, rec[RECORD_HEADER_LEN..total].to_vec()));
                        bytes += len;
                    }
                    prev_seq = seq;
                    pos += total as u64;
                }
                _ => match self.recover_read_damage(i, pos, prev_seq + 1) {
                    Ok(next) => pos = next,
                    Err(e) => break Err(e),
                },
            }
        };
        self.read_buf = rb;
        result.map(|()| out)
    }

    /// Damage met while reading segment `i` at `pos`: skips to the next valid record, counts
    /// and reports the seqs lost (once), and returns where reading goes on.
    fn recover_read_damage(
        &mut self,
        i: usize,
        pos: u64,
        expected: u64,
    ) -> Result<u64, SpoolError> {
        let seg = &self.segments[i];
        let n = usize::try_from(seg.len - pos).unwrap_or(usize::MAX);
        let mut rest = vec![0u8; n];
        seg.file.read_exact_at(&mut rest, pos).map_err(|e| io_err("read", &seg.path, e))?;
        let (skip_end, lost) = match resync(&rest, 1, expected) {
            Some((rel, seq, _)) => (pos + rel as u64, (expected, seq.saturating_sub(1))),
            None => (seg.len, (expected, seg.last_seq)),
        };
        tracing::warn!(
            path = %seg.path.display(),
            offset = pos,
            bytes = skip_end - pos,
            "spool record damaged; skipped"
        );
        let seg = &mut self.segments[i];
        seg.skips.push((pos, skip_end));
        let (a, b) = (lost.0.max(self.state.floor() + 1), lost.1);
        if a <= b {
            seg.holes.push((a, b));
            if !self.state.hole_known(a, b) {
                let mut state = self.state.clone();
                let events = b - a + 1;
                state.corrupt_total += events;
                state.push_gap(
                    Gap { first_seq: a, last_seq: b, events, cause: GapCause::Corrupt },
                    false,
                );
                state.remember_hole(a, b);
                state.next_seq = self.next_seq;
                self.commit_state(state)?;
            }
        }
        self.cursor = None;
        Ok(skip_end)
    }

    /// The collector stored every event up to `up_to`: persists that, and deletes the sealed
    /// segments it frees. Acks at or below the current watermark are ignored (they repeat
    /// after a reconnect).
    pub fn ack(&mut self, up_to: u64) -> Result<(), SpoolError> {
        if up_to >= self.next_seq {
            return Err(SpoolError::AckBeyondEnd { up_to, last: self.next_seq - 1 });
        }
        if up_to <= self.state.acked {
            return Ok(());
        }
        // Segments go before the state file is written: their events are stored by the
        // collector whatever the file says, and on a full disk the space they free is what
        // lets the state file be written at all.
        self.state.acked = up_to;
        let floor = self.state.floor();
        let mut removed = false;
        while self.segments.len() > 1 {
            let front = &self.segments[0];
            if front.holds_live(floor) {
                break;
            }
            fs::remove_file(&front.path).map_err(|e| io_err("remove segment", &front.path, e))?;
            self.total_bytes -= front.len;
            self.segments.pop_front();
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        let mut state = self.state.clone();
        state.next_seq = self.next_seq;
        self.commit_state(state)
    }

    /// Gaps (evicted or damaged events) not handed out yet by this call. They stay on disk
    /// until [`Spool::gap_reported`] confirms them; after a reconnect,
    /// [`Spool::requeue_gaps`] hands the unconfirmed ones out again.
    pub fn take_evictions(&mut self) -> Vec<Gap> {
        let new: Vec<Gap> =
            self.state.gaps.iter().filter(|g| !self.in_flight.contains(g)).copied().collect();
        self.in_flight.extend_from_slice(&new);
        new
    }

    /// Makes every unconfirmed gap available to [`Spool::take_evictions`] again.
    pub fn requeue_gaps(&mut self) {
        self.in_flight.clear();
    }

    /// Gaps not yet confirmed, handed out or not.
    pub fn pending_gaps(&self) -> &[Gap] {
        &self.state.gaps
    }

    /// The collector has recorded these gaps: forgets them for good.
    pub fn gap_reported(&mut self, gaps: &[Gap]) -> Result<(), SpoolError> {
        if !self.state.gaps.iter().any(|g| gaps.contains(g)) {
            return Ok(());
        }
        let mut state = self.state.clone();
        state.gaps.retain(|g| !gaps.contains(g));
        state.next_seq = self.next_seq;
        self.commit_state(state)?;
        self.in_flight.retain(|g| !gaps.contains(g));
        Ok(())
    }

    /// Makes everything appended durable now: records become readable, and checkpoints safe
    /// to release the source by.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.unsynced {
            let a = self.active();
            a.file.sync_data().map_err(|e| io_err("fsync", &a.path, e))?;
            self.durable_next = self.next_seq;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Under [`SyncPolicy::Interval`], syncs if the interval has passed since the last sync;
    /// the transport calls this on its timer so the tail of a quiet stream gets sent. Returns
    /// whether it synced.
    pub fn sync_if_due(&mut self) -> Result<bool, SpoolError> {
        let due = match self.opts.sync {
            SyncPolicy::EveryAppend => true,
            SyncPolicy::Interval(d) => self.last_sync.elapsed() >= d,
        };
        if due && self.unsynced {
            self.sync()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Unacked events still in the spool.
    pub fn depth_events(&self) -> u64 {
        let floor = self.state.floor();
        self.segments.iter().map(|s| s.live_events(floor)).sum()
    }

    /// Size of the segment files: what `max_bytes` bounds (it includes acked records that
    /// share the newest segment with unacked ones).
    pub fn depth_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Events evicted from a full spool over its whole life (persisted across restarts).
    pub fn evicted_total(&self) -> u64 {
        self.state.evicted_total
    }

    /// Events lost to damaged records over the spool's life.
    pub fn corrupt_total(&self) -> u64 {
        self.state.corrupt_total
    }

    /// The seq the next appended event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The newest confirmed source checkpoint: after open, the newest one on disk whose batch
    /// is wholly there; after each [`append_with_checkpoint`](Spool::append_with_checkpoint),
    /// that batch's. `None` when none was ever written (or all were lost to damage).
    pub fn last_checkpoint(&self) -> Option<SourceCheckpoint> {
        self.last_checkpoint
    }

    /// The acked watermark (0 before the first ack).
    pub fn acked(&self) -> u64 {
        self.state.acked
    }

    /// Where the sender starts reading after a (re)connect.
    pub fn first_unacked_seq(&self) -> u64 {
        (self.state.floor() + 1).min(self.next_seq)
    }

    /// Records below this seq are durable and readable.
    pub fn durable_next_seq(&self) -> u64 {
        self.durable_next
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Spool {
    /// A clean shutdown leaves nothing unsynced; a failure here can only be logged.
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::warn!(error = %e, "spool: final fsync failed");
        }
    }
}

const _: () = assert!(MAX_PENDING_GAPS > 1);
