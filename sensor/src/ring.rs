//! Our own consumer of the kernel's BPF ring buffer, with reading and releasing kept apart.
//!
//! aya's `RingBuf` releases a record's space (advances the kernel's `consumer_pos`) as soon as
//! the record is dropped, before anything derived from it is durable, so a sensor killed at the
//! wrong moment loses what it had read. [`Ring`] keeps two cursors: the read cursor (records
//! decoded so far) and the commit cursor (space handed back to the kernel). Records between the
//! two stay in the pinned ring: a sensor that dies before committing them leaves them for the
//! next one, which starts reading at the committed position.
//!
//! Layout of a ring buffer map as `mmap` shows it (`kernel/bpf/ringbuf.c`):
//!
//! ```text
//! offset 0          consumer page, read-write: consumer_pos (u64)
//! offset page       producer page, read-only:  producer_pos (u64)
//! offset 2 * page   data area (size bytes), mapped twice in a row so a record that wraps
//!                   around the end reads as one contiguous slice
//! ```
//!
//! Each record starts at an 8-byte aligned position with an 8-byte header: `len` (u32, with
//! [`BUSY_BIT`] while the producer still writes it and [`DISCARD_BIT`] when it was discarded)
//! and `pg_off` (u32, kernel bookkeeping), then `len` bytes of data. Positions are byte
//! counters that only grow; `pos & (size - 1)` is the offset in the data area. The producer
//! publishes `producer_pos` with release semantics and commits a record by clearing its busy bit
//! with a full barrier, so the consumer reads `producer_pos` and each header with acquire; the
//! consumer publishes `consumer_pos` with release, which the kernel pairs with an acquire load
//! before reusing the space.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

/// Set in a record's `len` while the producer has reserved but not yet committed it.
pub const BUSY_BIT: u32 = 1 << 31;
/// Set in a record's `len` when the producer discarded it.
pub const DISCARD_BIT: u32 = 1 << 30;
/// Bytes of a record header.
pub const HEADER_BYTES: u64 = 8;

/// Which ring buffer, in which boot: ring positions mean something only within one (a ring
/// replaced by an incompatible sensor, or a reboot, starts again from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIdentity {
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: [u8; 16],
    /// The kernel's id of the ring buffer map (unique among the maps of one boot).
    pub map_id: u32,
}

impl RingIdentity {
    /// The identity of the map with id `map_id` in the running boot; `None` when the boot id
    /// cannot be read.
    pub fn of_map(map_id: u32) -> Option<Self> {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(Self { boot_id: parse_boot_id(&text)?, map_id })
    }
}

/// `BOOTID-MAPID` in hex: names the ring (and the loss counters pinned with it) in reports.
impl std::fmt::Display for RingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.boot_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:x}", self.map_id)
    }
}

/// "0f1e…-…" (a UUID as the kernel prints it) as 16 bytes.
fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (byte, pair) in id.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

/// A position in an identified ring: what the spool stores with each batch (as the batch's
/// opaque 32-byte checkpoint), so that after a crash the next sensor knows which records of
/// the pinned ring are already spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingCheckpoint {
    pub ring: RingIdentity,
    /// Every record ending at or before this position is accounted for.
    pub pos: u64,
}

/// First bytes of an encoded [`RingCheckpoint`]: a tag and layout version.
const CHECKPOINT_TAG: [u8; 4] = *b"RNG1";

impl RingCheckpoint {
    /// Layout: tag `RNG1` (4) | map id u32 LE (4) | boot id (16) | position u64 LE (8).
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&CHECKPOINT_TAG);
        b[4..8].copy_from_slice(&self.ring.map_id.to_le_bytes());
        b[8..24].copy_from_slice(&self.ring.boot_id);
        b[24..32].copy_from_slice(&self.pos.to_le_bytes());
        b
    }

    /// `None` for bytes of another layout.
    pub fn from_bytes(b: &[u8; 32]) -> Option<Self> {
        if b[0..4] != CHECKPOINT_TAG {
            return None;
        }
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&b[8..24]);
        let map_id = u32::from_le_bytes(b[4..8].try_into().ok()?);
        let pos = u64::from_le_bytes(b[24..32].try_into().ok()?);
        Some(Self { ring: RingIdentity { boot_id, map_id }, pos })
    }
}

/// One record as read: its data and the position just past it (what a commit of this record
/// writes to `consumer_pos`).
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub data: &'a [u8],
    pub end: u64,
}

/// Memory the consumer works on: the kernel's mapping, or a fake one in tests.
struct Mapping {
    consumer: NonNull<u8>,
    consumer_len: usize,
    producer: NonNull<u8>,
    producer_len: usize,
    /// Unmap on drop (false for memory the caller owns).
    owned: bool,
}

/// A consumer of one BPF ring buffer map.
pub struct Ring {
    mapping: Mapping,
    /// Offset of the data area in the producer mapping.
    data_offset: usize,
    /// Size of the data area (a power of two).
    size: u64,
    read: u64,
    committed: u64,
    identity: Option<RingIdentity>,
    // Keeps the map (and so the mapping's backing) alive.
    _map: Option<Box<dyn Send>>,
}

// SAFETY: the mapping is shared memory accessed through atomics and plain reads of committed
// records; the ring is used from one thread at a time (`&mut self` for every access).
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring buffer `map` (a `BPF_MAP_TYPE_RINGBUF`). Reading starts at the kernel's
    /// consumer position: whatever a previous consumer read but did not commit is read again.
    pub fn from_map(map: aya::maps::MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: the fd is a ring buffer map kept alive by `map`, stored in the ring.
        let mut ring = unsafe { Self::from_fd(BorrowedFd::borrow_raw(fd), info.max_entries())? };
        ring._map = Some(Box::new(map));
        ring.identity = RingIdentity::of_map(info.id());
        Ok(ring)
    }

    /// Maps the ring buffer map behind `fd`, whose data area is `size` bytes.
    ///
    /// # Safety
    /// `fd` must be a ring buffer map of that size, open for as long as the ring lives.
    pub unsafe fn from_fd(fd: BorrowedFd<'_>, size: u32) -> io::Result<Self> {
        if !size.is_power_of_two() {
            return Err(io::Error::other(format!("ring size {size} is not a power of two")));
        }
        let page = page_size();
        let raw = fd.as_raw_fd();
        let map = |len: usize, prot: i32, offset: usize| -> io::Result<NonNull<u8>> {
            // SAFETY: a fresh shared mapping of the map's pages; checked for failure.
            let ptr = unsafe {
                libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, raw, offset as i64)
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(NonNull::new(ptr.cast()).expect("mmap returned null"))
        };
        let consumer = map(page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer_len = page + 2 * size as usize;
        let producer = match map(producer_len, libc::PROT_READ, page) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the consumer page mapped just above.
                unsafe { libc::munmap(consumer.as_ptr().cast(), page) };
                return Err(e);
            }
        };
        let mapping = Mapping { consumer, consumer_len: page, producer, producer_len, owned: true };
        Ok(Self::with_mapping(mapping, page, u64::from(size)))
    }

    /// A consumer over memory laid out like the kernel's mapping: `consumer` holds
    /// `consumer_pos`; `producer` holds `producer_pos` at offset 0 and the data area, twice,
    /// from `data_offset`.
    ///
    /// # Safety
    /// Both regions must be valid, 8-byte aligned and outlive the ring; the producer region
    /// must span `data_offset + 2 * size` bytes.
    pub unsafe fn from_raw(
        consumer: NonNull<u8>,
        producer: NonNull<u8>,
        data_offset: usize,
        size: u64,
    ) -> Self {
        let mapping = Mapping {
            consumer,
            consumer_len: 8,
            producer,
            producer_len: data_offset + 2 * size as usize,
            owned: false,
        };
        Self::with_mapping(mapping, data_offset, size)
    }

    fn with_mapping(mapping: Mapping, data_offset: usize, size: u64) -> Self {
        let mut ring =
            Self { mapping, data_offset, size, read: 0, committed: 0, identity: None, _map: None };
        let start = ring.consumer_pos().load(Ordering::Acquire);
        ring.read = start;
        ring.committed = start;
        ring
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the consumer page starts with the 8-byte aligned consumer position.
        unsafe { self.mapping.consumer.cast::<AtomicU64>().as_ref() }
    }

    /// Which ring this is (`None` for memory that is not a kernel map, or an unknown boot).
    pub fn identity(&self) -> Option<RingIdentity> {
        self.identity
    }

    /// The producer's position: every record before it is reserved (maybe still busy).
    pub fn producer_pos(&self) -> u64 {
        // SAFETY: the producer page starts with the 8-byte aligned producer position.
        unsafe { self.mapping.producer.cast::<AtomicU64>().as_ref() }.load(Ordering::Acquire)
    }

    /// The read cursor: records before it have been returned by [`Ring::next`].
    pub fn read_pos(&self) -> u64 {
        self.read
    }

    /// The commit cursor: space before it is back in the kernel's hands.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The next committed record after the read cursor, advancing the read cursor only.
    /// `None` when the ring holds nothing more, or the next record is still being written.
    /// Discarded records are skipped.
    #[expect(clippy::should_implement_trait, reason = "the record borrows the ring")]
    pub fn next(&mut self) -> Option<Record<'_>> {
        let producer = self.producer_pos();
        while self.read != producer {
            let (offset, header) = self.head();
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = u64::from(header & !(BUSY_BIT | DISCARD_BIT));
            let total = (HEADER_BYTES + len).next_multiple_of(8);
            if len > self.size || self.read + total > producer {
                // Never happens with a sane kernel; stop rather than read out of bounds.
                tracing::error!(len, read = self.read, producer, "malformed ring buffer record");
                return None;
            }
            self.read += total;
            if header & DISCARD_BIT != 0 {
                continue;
            }
            let data_at = offset + HEADER_BYTES as usize;
            debug_assert!(data_at + len as usize <= self.mapping.producer_len);
            // SAFETY: the record lies inside the doubly mapped data area (len ≤ size), and
            // the producer does not touch it again before the consumer position passes it.
            let data = unsafe {
                std::slice::from_raw_parts(
                    self.mapping.producer.add(data_at).as_ptr(),
                    len as usize,
                )
            };
            return Some(Record { data, end: self.read });
        }
        None
    }

    /// Offset in the mapping and header word of the record at the read cursor (which must be
    /// behind the producer).
    fn head(&self) -> (usize, u32) {
        let offset = self.data_offset + (self.read & (self.size - 1)) as usize;
        // SAFETY: offset < data_offset + size and the header is 8-byte aligned inside the
        // producer mapping.
        let header = unsafe {
            self.mapping.producer.add(offset).cast::<AtomicU32>().as_ref().load(Ordering::Acquire)
        };
        (offset, header)
    }

    /// A finished record waits at the read cursor.
    fn record_waiting(&self) -> bool {
        self.read != self.producer_pos() && self.head().1 & BUSY_BIT == 0
    }

    /// Hands the space before `upto` back to the kernel (at most up to the read cursor; never
    /// backwards).
    pub fn commit(&mut self, upto: u64) {
        let upto = upto.min(self.read);
        if upto > self.committed {
            self.committed = upto;
            self.consumer_pos().store(upto, Ordering::Release);
        }
    }

    /// Waits until `also` is readable or `timeout` passes; returns at once while records are
    /// waiting to be read.
    ///
    /// Records are submitted without wakeups, so this is a timer. The ring's own descriptor is
    /// deliberately not polled: it reads as ready while any record is uncommitted, which is
    /// the case for as long as downstream works on what was read, and polling it would turn
    /// every such wait into a busy loop.
    pub fn wait(&self, timeout: std::time::Duration, also: Option<RawFd>) {
        if self.record_waiting() {
            return;
        }
        let Some(fd) = also else {
            std::thread::sleep(timeout);
            return;
        };
        let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; the result only shortens the wait.
        unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) };
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.mapping.owned {
            // SAFETY: both regions were mapped by `from_fd` with these lengths.
            unsafe {
                libc::munmap(self.mapping.consumer.as_ptr().cast(), self.mapping.consumer_len);
                libc::munmap(self.mapping.producer.as_ptr().cast(), self.mapping.producer_len);
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake ring in ordinary memory: consumer word, producer word + data twice.
    struct Fake {
        consumer: Box<[u64; 1]>,
        producer: Vec<u64>,
        size: u64,
        prod: u64,
    }

    const DATA_OFFSET: usize = 64;

    impl Fake {
        fn new(size: u64) -> Self {
            let words = (DATA_OFFSET + 2 * size as usize) / 8;
            Self { consumer: Box::new([0]), producer: vec![0; words], size, prod: 0 }
        }

        fn ring(&mut self) -> Ring {
            let c = NonNull::new(self.consumer.as_mut_ptr().cast::<u8>()).unwrap();
            let p = NonNull::new(self.producer.as_mut_ptr().cast::<u8>()).unwrap();
            // SAFETY: both regions live as long as the fake, which outlives the ring in tests.
            unsafe { Ring::from_raw(c, p, DATA_OFFSET, self.size) }
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the vector's words viewed as bytes.
            unsafe {
                std::slice::from_raw_parts_mut(
                    self.producer.as_mut_ptr().cast::<u8>(),
                    self.producer.len() * 8,
                )
            }
        }

        /// Writes a byte into both copies of the data area.
        fn put(&mut self, pos: u64, b: u8) {
            let off = (pos & (self.size - 1)) as usize;
            let size = self.size as usize;
            let bytes = self.bytes();
            bytes[DATA_OFFSET + off] = b;
            if off < size {
                bytes[DATA_OFFSET + size + off] = b;
            }
        }

        /// Reserves and writes a record; returns its start position.
        fn produce(&mut self, data: &[u8], flags: u32) -> u64 {
            let start = self.prod;
            let len = data.len() as u32 | flags;
            for (i, b) in len.to_le_bytes().iter().chain(&[0u8; 4]).enumerate() {
                self.put(start + i as u64, *b);
            }
            for (i, b) in data.iter().enumerate() {
                self.put(start + HEADER_BYTES + i as u64, *b);
            }
            self.prod = start + (HEADER_BYTES + data.len() as u64).next_multiple_of(8);
            self.producer[0] = self.prod;
            start
        }

        fn set_flags(&mut self, start: u64, data_len: usize, flags: u32) {
            let len = data_len as u32 | flags;
            for (i, b) in len.to_le_bytes().iter().enumerate() {
                self.put(start + i as u64, *b);
            }
        }
    }

    #[test]
    fn checkpoints_round_trip_and_boot_ids_parse() {
        let boot_id = parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n").unwrap();
        assert_eq!(boot_id[0], 0x0f);
        assert_eq!(boot_id[15], 0xf0);
        assert_eq!(parse_boot_id("not-a-uuid"), None);
        let cp = RingCheckpoint { ring: RingIdentity { boot_id, map_id: 77 }, pos: 1 << 40 };
        assert_eq!(RingCheckpoint::from_bytes(&cp.to_bytes()), Some(cp));
        assert_eq!(RingCheckpoint::from_bytes(&[0u8; 32]), None, "another layout");
    }

    #[test]
    fn reading_does_not_release_and_commit_does() {
        let mut fake = Fake::new(64);
        fake.produce(b"one", 0);
        fake.produce(b"two-two", 0);
        let mut ring = fake.ring();
        let a = ring.next().unwrap();
        assert_eq!((a.data, a.end), (&b"one"[..], 16));
        let b = ring.next().unwrap();
        assert_eq!((b.data, b.end), (&b"two-two"[..], 32));
        assert!(ring.next().is_none());
        assert_eq!(fake.consumer[0], 0, "nothing released before commit");
        ring.commit(16);
        assert_eq!(fake.consumer[0], 16);
        ring.commit(8);
        assert_eq!(fake.consumer[0], 16, "never backwards");
        ring.commit(1000);
        assert_eq!(fake.consumer[0], 32, "never past the read cursor");
        drop(ring);
    }

    #[test]
    fn a_new_consumer_rereads_what_was_not_committed() {
        let mut fake = Fake::new(64);
        fake.produce(b"a", 0);
        fake.produce(b"b", 0);
        let mut ring = fake.ring();
        ring.next().unwrap();
        ring.next().unwrap();
        ring.commit(16);
        drop(ring);
        let mut again = fake.ring();
        assert_eq!(again.read_pos(), 16);
        assert_eq!(again.next().unwrap().data, b"b");
        assert!(again.next().is_none());
    }

    #[test]
    fn busy_stops_discarded_is_skipped_and_wrapping_reads_whole() {
        let mut fake = Fake::new(64);
        let busy = fake.produce(b"xyz", BUSY_BIT);
        fake.produce(b"after", 0);
        let mut ring = fake.ring();
        assert!(ring.next().is_none(), "a busy record holds back the ones after it");
        fake.set_flags(busy, 3, DISCARD_BIT);
        assert_eq!(ring.next().unwrap().data, b"after", "discarded skipped");
        ring.commit(ring.read_pos());
        // Fill up to the end so the next record wraps around the data area.
        let filler = vec![7u8; 64 - 32 - 8 - 8];
        fake.produce(&filler, 0);
        ring.next().unwrap();
        ring.commit(ring.read_pos());
        let wrapped: Vec<u8> = (0..20).collect();
        let start = fake.produce(&wrapped, 0);
        assert!(start % 64 + 8 + 20 > 64, "the record crosses the end");
        let r = ring.next().unwrap();
        assert_eq!(r.data, &wrapped[..]);
    }
}
