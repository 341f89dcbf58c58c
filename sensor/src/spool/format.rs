//! Byte layout of segment files and their records (see the module docs for the table).
//!
//! Everything here is pure: it encodes into and decodes from byte slices, so the recovery
//! rules can be tested without a file system.

use super::SourceCheckpoint;

/// First eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"KWSPOOL\0";
/// Segment format this build writes and the newest it reads. Version 2 added checkpoint
/// records.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest segment format this build reads (version 1: records only).
pub const MIN_READ_VERSION: u32 = 1;
/// Size of the segment file header.
pub const SEGMENT_HEADER_LEN: usize = 32;

/// Marks the start of every record, so a reader can find the next record after a damaged
/// one. The first byte is not ASCII, which makes the marker rare in text-like payloads; a
/// candidate is only believed when the checksum behind it holds too.
pub const RECORD_MAGIC: [u8; 4] = [0xC5, b'K', b'W', b'R'];
/// Size of a record header: magic, crc, length, seq.
pub const RECORD_HEADER_LEN: usize = 20;
/// Marks a checkpoint record (format version 2). It shares its first three bytes with
/// [`RECORD_MAGIC`], so one search finds both kinds when resynchronising.
pub const CHECKPOINT_MAGIC: [u8; 4] = [0xC5, b'K', b'W', b'C'];
/// Size of a checkpoint record: magic, crc, count, reserved, first seq, body.
pub const CHECKPOINT_LEN: usize = 56;
/// The bytes both markers start with.
const MARKER_PREFIX: [u8; 3] = [0xC5, b'K', b'W'];
const _: () = assert!(CHECKPOINT_LEN == 24 + size_of::<SourceCheckpoint>());
/// Largest payload a record may carry. A length field above it is garbage, not a record;
/// events are a few hundred bytes and a gRPC message is 4 MiB at most by default.
pub const MAX_PAYLOAD_LEN: usize = 16 * 1024 * 1024;

/// Size on disk of a record with a payload of `payload_len` bytes.
pub const fn record_len(payload_len: usize) -> u64 {
    (RECORD_HEADER_LEN + payload_len) as u64
}

/// Builds a segment file header for a segment whose first record gets `base_seq`.
pub fn encode_segment_header(base_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&base_seq.to_le_bytes());
    // 24..28 reserved, zero.
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What the first bytes of a segment file say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentHeader {
    /// A valid header of a version this build reads.
    Valid { base_seq: u64, version: u32 },
    /// A valid header (magic and checksum hold) of a newer format: refuse rather than
    /// misread it.
    Unsupported { version: u32 },
    /// Fewer bytes than a header: the file was created but its header never fully written.
    Short,
    /// Bytes that are not a header (bad magic or checksum).
    Damaged,
}

pub fn decode_segment_header(bytes: &[u8]) -> SegmentHeader {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return SegmentHeader::Short;
    }
    let h = &bytes[..SEGMENT_HEADER_LEN];
    if h[0..8] != SEGMENT_MAGIC || crc32c::crc32c(&h[0..28]) != le_u32(&h[28..32]) {
        return SegmentHeader::Damaged;
    }
    let version = le_u32(&h[8..12]);
    if !(MIN_READ_VERSION..=FORMAT_VERSION).contains(&version) {
        return SegmentHeader::Unsupported { version };
    }
    SegmentHeader::Valid { base_seq: le_u64(&h[16..24]), version }
}

/// Appends one record to `out`.
pub fn encode_record(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_PAYLOAD_LEN);
    let len = (payload.len() as u32).to_le_bytes();
    let seq_bytes = seq.to_le_bytes();
    let crc =
        crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&len), &seq_bytes), payload);
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&len);
    out.extend_from_slice(&seq_bytes);
    out.extend_from_slice(payload);
}

/// Appends one checkpoint record to `out`: `body` is where the source stands once the `count`
/// events that follow it, starting at `first_seq`, are spooled.
pub fn encode_checkpoint(out: &mut Vec<u8>, count: u32, first_seq: u64, body: &SourceCheckpoint) {
    let start = out.len();
    out.extend_from_slice(&CHECKPOINT_MAGIC);
    out.extend_from_slice(&[0; 4]); // crc, filled in below
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A checkpoint record whose checksum holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Event records of the batch that follows it.
    pub count: u32,
    /// Seq of the batch's first record (the next seq, for an empty batch).
    pub first_seq: u64,
    pub body: SourceCheckpoint,
}

/// The outcome of reading a record at the start of a byte slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A record whose checksum holds; the payload is `bytes[RECORD_HEADER_LEN..total]`.
    Record { seq: u64, total: usize },
    /// A checkpoint record whose checksum holds; it is [`CHECKPOINT_LEN`] bytes long.
    Checkpoint(Checkpoint),
    /// The slice ends inside the record. `header_ok` tells whether a plausible header
    /// (magic, length within bounds) was read, and then `seq` is the seq it claims.
    Incomplete { header_ok: bool, seq: u64, total: usize },
    /// Not a record: bad magic, impossible length, or a checksum that does not hold. When
    /// only the checksum failed, `seq` is what the header claims (not to be trusted alone).
    Invalid { header_ok: bool, seq: u64 },
}

/// Reads the record of either kind at the start of `bytes`.
pub fn parse_entry(bytes: &[u8]) -> Parsed {
    if bytes.starts_with(&CHECKPOINT_MAGIC) { parse_checkpoint(bytes) } else { parse_record(bytes) }
}

/// Reads the checkpoint record at the start of `bytes` without trusting anything unchecked.
pub fn parse_checkpoint(bytes: &[u8]) -> Parsed {
    if bytes.len() < CHECKPOINT_LEN {
        let magic_ok = bytes.starts_with(&CHECKPOINT_MAGIC) || CHECKPOINT_MAGIC.starts_with(bytes);
        return if magic_ok {
            Parsed::Incomplete { header_ok: false, seq: 0, total: CHECKPOINT_LEN }
        } else {
            Parsed::Invalid { header_ok: false, seq: 0 }
        };
    }
    let c = &bytes[..CHECKPOINT_LEN];
    // A non-zero reserved field was written by a format this build does not know.
    if c[0..4] != CHECKPOINT_MAGIC
        || crc32c::crc32c(&c[8..]) != le_u32(&c[4..8])
        || le_u32(&c[12..16]) != 0
    {
        return Parsed::Invalid { header_ok: false, seq: 0 };
    }
    let mut body: SourceCheckpoint = [0; 32];
    body.copy_from_slice(&c[24..]);
    Parsed::Checkpoint(Checkpoint { count: le_u32(&c[8..12]), first_seq: le_u64(&c[16..24]), body })
}

/// Reads the event record at the start of `bytes` without trusting anything unchecked.
pub fn parse_record(bytes: &[u8]) -> Parsed {
    if bytes.len() < RECORD_HEADER_LEN {
        let magic_ok = bytes.len() >= 4 && bytes[0..4] == RECORD_MAGIC;
        return if magic_ok || RECORD_MAGIC.starts_with(bytes) {
            Parsed::Incomplete { header_ok: false, seq: 0, total: RECORD_HEADER_LEN }
        } else {
            Parsed::Invalid { header_ok: false, seq: 0 }
        };
    }
    if bytes[0..4] != RECORD_MAGIC {
        return Parsed::Invalid { header_ok: false, seq: 0 };
    }
    let len = le_u32(&bytes[8..12]) as usize;
    let seq = le_u64(&bytes[12..20]);
    if len > MAX_PAYLOAD_LEN {
        return Parsed::Invalid { header_ok: false, seq: 0 };
    }
    let total = RECORD_HEADER_LEN + len;
    if bytes.len() < total {
        return Parsed::Incomplete { header_ok: true, seq, total };
    }
    let crc = crc32c::crc32c(&bytes[8..total]);
    if crc != le_u32(&bytes[4..8]) {
        return Parsed::Invalid { header_ok: true, seq };
    }
    Parsed::Record { seq, total }
}

/// Finds the next offset at or after `from` where a complete, checksummed record of either
/// kind starts: an event record with a seq of at least `min_seq`, or a checkpoint whose batch
/// starts at `min_seq` or later. Returns its offset, that seq and its total length.
///
/// A valid record needs the 4-byte marker and a matching CRC-32C over the rest, so random
/// bytes pass for one with odds of about 2^-64 per position.
pub fn resync(bytes: &[u8], from: usize, min_seq: u64) -> Option<(usize, u64, usize)> {
    let mut pos = from;
    while pos + RECORD_HEADER_LEN <= bytes.len() {
        let rel = find_marker(&bytes[pos..])?;
        pos += rel;
        match parse_entry(&bytes[pos..]) {
            Parsed::Record { seq, total } if seq >= min_seq => return Some((pos, seq, total)),
            Parsed::Checkpoint(c) if c.first_seq >= min_seq => {
                return Some((pos, c.first_seq, CHECKPOINT_LEN));
            }
            _ => {}
        }
        pos += 1;
    }
    None
}

/// Offset of the next place in `bytes` where a marker of either kind may start.
fn find_marker(bytes: &[u8]) -> Option<usize> {
    bytes.windows(MARKER_PREFIX.len()).position(|w| w == MARKER_PREFIX)
}

pub fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_damage() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 42, b"hello");
        assert_eq!(buf.len() as u64, record_len(5));
        assert_eq!(parse_record(&buf), Parsed::Record { seq: 42, total: 25 });
        assert_eq!(&buf[RECORD_HEADER_LEN..], b"hello");
        for cut in 0..buf.len() {
            assert!(matches!(parse_record(&buf[..cut]), Parsed::Incomplete { .. }), "cut at {cut}");
        }
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(
                !matches!(parse_record(&bad), Parsed::Record { .. }),
                "flip at {i} still parsed"
            );
        }
    }

    #[test]
    fn resync_finds_next_record() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, b"aaaa");
        let second = buf.len();
        encode_record(&mut buf, 2, b"bbbb");
        buf[2] ^= 0xff;
        assert_eq!(resync(&buf, 1, 1), Some((second, 2, 24)));
        assert_eq!(resync(&buf, 1, 3), None);
    }

    fn checkpoint_bytes() -> Vec<u8> {
        let body: SourceCheckpoint = std::array::from_fn(|i| i as u8 * 7);
        let mut buf = Vec::new();
        encode_checkpoint(&mut buf, 3, 42, &body);
        buf
    }

    #[test]
    fn checkpoint_round_trip() {
        let buf = checkpoint_bytes();
        assert_eq!(buf.len(), CHECKPOINT_LEN);
        assert_eq!(buf[0..4], CHECKPOINT_MAGIC);
        let Parsed::Checkpoint(c) = parse_checkpoint(&buf) else { panic!("not parsed") };
        assert_eq!((c.count, c.first_seq), (3, 42));
        assert_eq!(c.body, std::array::from_fn::<u8, 32, _>(|i| i as u8 * 7));
        assert_eq!(parse_entry(&buf), Parsed::Checkpoint(c));
        // Bytes after it are the next record's business.
        let mut longer = buf.clone();
        encode_record(&mut longer, 42, b"x");
        assert_eq!(parse_entry(&longer), Parsed::Checkpoint(c));
        assert_eq!(parse_entry(&longer[CHECKPOINT_LEN..]), Parsed::Record { seq: 42, total: 21 });
    }

    #[test]
    fn checkpoint_damage_is_rejected() {
        let buf = checkpoint_bytes();
        for i in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                !matches!(parse_entry(&bad), Parsed::Checkpoint(_) | Parsed::Record { .. }),
                "flip of bit {i} still parsed"
            );
        }
        // A reserved field this build does not know, even with a checksum that holds.
        let mut future = buf.clone();
        future[12] = 1;
        let crc = crc32c::crc32c(&future[8..]);
        future[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(parse_checkpoint(&future), Parsed::Invalid { .. }));
    }

    #[test]
    fn truncated_checkpoint_is_incomplete() {
        let buf = checkpoint_bytes();
        for cut in 0..buf.len() {
            assert!(matches!(parse_entry(&buf[..cut]), Parsed::Incomplete { .. }), "cut at {cut}");
        }
        // Once the marker is in, the whole checkpoint is what must be read.
        assert!(matches!(
            parse_entry(&buf[..10]),
            Parsed::Incomplete { total: CHECKPOINT_LEN, .. }
        ));
    }

    #[test]
    fn resync_finds_checkpoints_too() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, b"aaaa");
        let second = buf.len();
        encode_checkpoint(&mut buf, 1, 2, &[9; 32]);
        encode_record(&mut buf, 2, b"bbbb");
        buf[2] ^= 0xff;
        assert_eq!(resync(&buf, 1, 2), Some((second, 2, CHECKPOINT_LEN)));
        // A checkpoint whose batch starts below the wanted seq is not a place to resume.
        assert_eq!(resync(&buf, 1, 3), None);
    }

    #[test]
    fn segment_header() {
        let h = encode_segment_header(7);
        assert_eq!(
            decode_segment_header(&h),
            SegmentHeader::Valid { base_seq: 7, version: FORMAT_VERSION }
        );
        assert_eq!(decode_segment_header(&h[..10]), SegmentHeader::Short);
        let mut bad = h;
        bad[17] ^= 1;
        assert_eq!(decode_segment_header(&bad), SegmentHeader::Damaged);
        let with_version = |v: u32| {
            let mut h = h;
            h[8..12].copy_from_slice(&v.to_le_bytes());
            let crc = crc32c::crc32c(&h[0..28]);
            h[28..32].copy_from_slice(&crc.to_le_bytes());
            h
        };
        assert_eq!(
            decode_segment_header(&with_version(1)),
            SegmentHeader::Valid { base_seq: 7, version: 1 }
        );
        assert_eq!(
            decode_segment_header(&with_version(3)),
            SegmentHeader::Unsupported { version: 3 }
        );
        assert_eq!(
            decode_segment_header(&with_version(0)),
            SegmentHeader::Unsupported { version: 0 }
        );
    }
}
