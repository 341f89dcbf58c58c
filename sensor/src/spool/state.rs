//! The small state file: watermarks and counters that must outlive the segments they describe.
//!
//! It is replaced whole (write to `state.tmp`, fsync, rename over `state`, fsync the
//! directory), so a crash leaves either the old or the new version, never a mix; a checksum
//! catches the rest.

use super::format::{le_u32, le_u64};

const STATE_MAGIC: [u8; 8] = *b"KWSTATE\0";
const STATE_VERSION: u32 = 1;
/// Most gaps kept while unreported; beyond it the oldest two merge into one, so the file stays
/// small even when nobody confirms gaps for a long time.
pub const MAX_PENDING_GAPS: usize = 1024;

/// Why events are missing from the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapCause {
    /// The spool was full and its oldest segment was dropped before the collector acked it.
    Evicted,
    /// The records failed their checksum (bit rot, a damaged disk) and were skipped.
    Corrupt,
}

impl GapCause {
    fn code(self) -> u32 {
        match self {
            Self::Evicted => 1,
            Self::Corrupt => 2,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Evicted),
            2 => Some(Self::Corrupt),
            _ => None,
        }
    }
}

/// A run of sequence numbers whose events the collector will never receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gap {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Events lost inside the range (fewer than the range's width when parts of it were
    /// reported as another gap).
    pub events: u64,
    pub cause: GapCause,
}

/// Everything in the state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Every seq up to this one is stored by the collector (0: none yet).
    pub acked: u64,
    /// Every seq up to this one was evicted or acked: records at or below it are gone.
    pub evicted_through: u64,
    /// The next seq to assign, as of the last write: never handed out again.
    pub next_seq: u64,
    pub evicted_total: u64,
    pub corrupt_total: u64,
    /// Gaps not yet confirmed as reported by the transport.
    pub gaps: Vec<Gap>,
    /// Seq ranges already counted as damaged, so that finding the same damage again (on the
    /// next open, or on a reread) does not count or report it twice. Ranges at or below the
    /// floor are dropped: nothing reads there any more.
    pub known_holes: Vec<(u64, u64)>,
}

impl State {
    /// The last seq that is gone from the spool for good (acked or evicted).
    pub fn floor(&self) -> u64 {
        self.acked.max(self.evicted_through)
    }

    /// Records a gap, merging it into the previous one when they touch, have one cause and
    /// `merge` allows it (the caller forbids it once the previous gap was handed out).
    pub fn push_gap(&mut self, gap: Gap, merge: bool) {
        if merge
            && let Some(last) = self.gaps.last_mut()
            && last.cause == gap.cause
            && last.last_seq.saturating_add(1) >= gap.first_seq
        {
            last.last_seq = last.last_seq.max(gap.last_seq);
            last.events += gap.events;
            return;
        }
        self.gaps.push(gap);
        if self.gaps.len() > MAX_PENDING_GAPS {
            let second = self.gaps.remove(1);
            let first = &mut self.gaps[0];
            first.last_seq = second.last_seq;
            first.events += second.events;
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.gaps.len() * 32);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        for v in [
            self.acked,
            self.evicted_through,
            self.next_seq,
            self.evicted_total,
            self.corrupt_total,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.gaps.len() as u32).to_le_bytes());
        for g in &self.gaps {
            out.extend_from_slice(&g.first_seq.to_le_bytes());
            out.extend_from_slice(&g.last_seq.to_le_bytes());
            out.extend_from_slice(&g.events.to_le_bytes());
            out.extend_from_slice(&g.cause.code().to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        out.extend_from_slice(&(self.known_holes.len() as u32).to_le_bytes());
        for &(a, b) in &self.known_holes {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Whether the seq range `a..=b` was already counted as damaged.
    pub fn hole_known(&self, a: u64, b: u64) -> bool {
        self.known_holes.iter().any(|&(x, y)| x <= a && b <= y)
    }

    /// Remembers a counted hole (bounded: the oldest is forgotten first).
    pub fn remember_hole(&mut self, a: u64, b: u64) {
        self.known_holes.push((a, b));
        if self.known_holes.len() > MAX_PENDING_GAPS {
            self.known_holes.remove(0);
        }
    }

    /// `None` when the bytes are not a state file this build wrote (damaged or newer).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        const FIXED: usize = 8 + 4 + 5 * 8 + 4;
        if bytes.len() < FIXED + 4 || bytes[0..8] != STATE_MAGIC {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != le_u32(crc) || le_u32(&body[8..12]) != STATE_VERSION {
            return None;
        }
        let u = |i: usize| le_u64(&body[12 + i * 8..]);
        let count = le_u32(&body[52..56]) as usize;
        let gaps_end = FIXED.checked_add(count.checked_mul(32)?)?;
        if body.len() < gaps_end + 4 {
            return None;
        }
        let holes = le_u32(&body[gaps_end..]) as usize;
        if body.len() != gaps_end + 4 + holes.checked_mul(16)? {
            return None;
        }
        let known_holes = body[gaps_end + 4..]
            .chunks_exact(16)
            .map(|c| (le_u64(&c[0..]), le_u64(&c[8..])))
            .collect();
        let mut gaps = Vec::with_capacity(count);
        for chunk in body[FIXED..gaps_end].chunks_exact(32) {
            gaps.push(Gap {
                first_seq: le_u64(&chunk[0..]),
                last_seq: le_u64(&chunk[8..]),
                events: le_u64(&chunk[16..]),
                cause: GapCause::from_code(le_u32(&chunk[24..]))?,
            });
        }
        Some(Self {
            acked: u(0),
            evicted_through: u(1),
            next_seq: u(2),
            evicted_total: u(3),
            corrupt_total: u(4),
            gaps,
            known_holes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut s = State {
            acked: 10,
            evicted_through: 20,
            next_seq: 31,
            evicted_total: 9,
            corrupt_total: 1,
            gaps: Vec::new(),
            known_holes: vec![(3, 4)],
        };
        s.push_gap(Gap { first_seq: 11, last_seq: 15, events: 5, cause: GapCause::Evicted }, true);
        s.push_gap(Gap { first_seq: 16, last_seq: 20, events: 4, cause: GapCause::Evicted }, true);
        assert_eq!(s.gaps.len(), 1, "touching gaps merge");
        assert_eq!(s.gaps[0].events, 9);
        let bytes = s.encode();
        assert_eq!(State::decode(&bytes), Some(s.clone()));
        assert!(s.hole_known(3, 3) && !s.hole_known(3, 5));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 4;
            assert_eq!(State::decode(&bad), None, "flip at {i}");
        }
        assert_eq!(State::decode(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn gap_list_stays_bounded() {
        let mut s = State::default();
        for i in 0..(MAX_PENDING_GAPS as u64 + 10) {
            s.push_gap(
                Gap {
                    first_seq: i * 10,
                    last_seq: i * 10 + 1,
                    events: 2,
                    cause: GapCause::Evicted,
                },
                true,
            );
        }
        assert_eq!(s.gaps.len(), MAX_PENDING_GAPS);
        assert_eq!(
            s.gaps.iter().map(|g| g.events).sum::<u64>(),
            2 * (MAX_PENDING_GAPS as u64 + 10)
        );
    }
}
