//! Byte layout of segment files and their records (see the module docs for the table).
//!
//! Everything here is pure: it encodes into and decodes from byte slices, so the recovery
//! rules can be tested without a file system.

/// First eight bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"KWSPOOL\0";
/// Segment format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the segment file header.
pub const SEGMENT_HEADER_LEN: usize = 32;

/// Marks the start of every record, so a reader can find the next record after a damaged
/// one. The first byte is not ASCII, which makes the marker rare in text-like payloads; a
/// candidate is only believed when the checksum behind it holds too.
pub const RECORD_MAGIC: [u8; 4] = [0xC5, b'K', b'W', b'R'];
/// Size of a record header: magic, crc, length, seq.
pub const RECORD_HEADER_LEN: usize = 20;
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
    Valid { base_seq: u64 },
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
    if version != FORMAT_VERSION {
        return SegmentHeader::Unsupported { version };
    }
    SegmentHeader::Valid { base_seq: le_u64(&h[16..24]) }
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

/// The outcome of reading a record at the start of a byte slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A record whose checksum holds; the payload is `bytes[RECORD_HEADER_LEN..total]`.
    Record { seq: u64, total: usize },
    /// The slice ends inside the record. `header_ok` tells whether a plausible header
    /// (magic, length within bounds) was read, and then `seq` is the seq it claims.
    Incomplete { header_ok: bool, seq: u64, total: usize },
    /// Not a record: bad magic, impossible length, or a checksum that does not hold. When
    /// only the checksum failed, `seq` is what the header claims (not to be trusted alone).
    Invalid { header_ok: bool, seq: u64 },
}

/// Reads the record at the start of `bytes` without trusting anything unchecked.
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

/// Finds the next offset at or after `from` where a complete, checksummed record with a seq
/// of at least `min_seq` starts. Returns its offset, seq and total length.
///
/// A valid record needs the 4-byte marker and a matching CRC-32C over length, seq and
/// payload, so random bytes pass for one with odds of about 2^-64 per position.
pub fn resync(bytes: &[u8], from: usize, min_seq: u64) -> Option<(usize, u64, usize)> {
    let mut pos = from;
    while pos + RECORD_HEADER_LEN <= bytes.len() {
        let rel = memchr_magic(&bytes[pos..])?;
        pos += rel;
        if let Parsed::Record { seq, total } = parse_record(&bytes[pos..])
            && seq >= min_seq
        {
            return Some((pos, seq, total));
        }
        pos += 1;
    }
    None
}

/// Offset of the next record marker in `bytes`.
fn memchr_magic(bytes: &[u8]) -> Option<usize> {
    bytes.windows(RECORD_MAGIC.len()).position(|w| w == RECORD_MAGIC)
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

    #[test]
    fn segment_header() {
        let h = encode_segment_header(7);
        assert_eq!(decode_segment_header(&h), SegmentHeader::Valid { base_seq: 7 });
        assert_eq!(decode_segment_header(&h[..10]), SegmentHeader::Short);
        let mut bad = h;
        bad[17] ^= 1;
        assert_eq!(decode_segment_header(&bad), SegmentHeader::Damaged);
        let mut future = h;
        future[8] = 2;
        let crc = crc32c::crc32c(&future[0..28]);
        future[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_segment_header(&future), SegmentHeader::Unsupported { version: 2 });
    }
}
