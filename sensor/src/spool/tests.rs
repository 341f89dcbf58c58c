//! Spool tests: real files in temporary directories, content checked record by record.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::{FileExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use super::*;

fn opts(segment_bytes: u64, max_bytes: u64, sync: SyncPolicy) -> SpoolOptions {
    SpoolOptions { max_bytes, segment_bytes, sync }
}

fn small() -> SpoolOptions {
    opts(64 * 1024, 1024 * 1024, SyncPolicy::EveryAppend)
}

/// The payload event `seq` carries: its content names the seq, its length varies.
fn payload(seq: u64) -> Vec<u8> {
    let mut p = format!("event-{seq}:").into_bytes();
    let len = 20 + (seq % 61) as usize;
    while p.len() < len {
        p.push(b'a' + (seq % 26) as u8);
    }
    p
}

fn append_seqs(spool: &mut Spool, n: u64) -> RangeInclusive<u64> {
    let first = spool.next_seq();
    let payloads: Vec<Vec<u8>> = (first..first + n).map(payload).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let range = spool.append(&refs).expect("append");
    assert_eq!(range, first..=first + n - 1);
    range
}

/// Everything readable from the first unacked seq on.
fn read_all(spool: &mut Spool) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut from = spool.first_unacked_seq();
    loop {
        let batch = spool.read_from(from, 97, 8 * 1024).expect("read");
        let Some(last) = batch.last() else {
            return out;
        };
        from = last.0 + 1;
        out.extend(batch);
    }
}

fn assert_contents(records: &[(u64, Vec<u8>)], seqs: impl IntoIterator<Item = u64>) {
    let seqs: Vec<u64> = seqs.into_iter().collect();
    let got: Vec<u64> = records.iter().map(|r| r.0).collect();
    assert_eq!(got, seqs);
    for (seq, p) in records {
        assert_eq!(p, &payload(*seq), "payload of seq {seq}");
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Offset of record `seq` in a segment whose records are `first..` with [`payload`]s.
fn offset_of(first: u64, seq: u64) -> u64 {
    SEGMENT_HEADER_LEN as u64 + (first..seq).map(|s| record_len(payload(s).len())).sum::<u64>()
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn a_spool_keeps_its_id_and_a_new_spool_gets_another() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool");
    let first = {
        let (mut spool, report) = Spool::open(&path, small()).unwrap();
        append_seqs(&mut spool, 3);
        report.spool_id
    };
    assert!(first.len() == 32 && first.bytes().all(|b| b.is_ascii_hexdigit()), "{first:?}");
    let mode = fs::metadata(path.join(ID_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let (_, report) = Spool::open(&path, small()).unwrap();
    assert_eq!((report.spool_id.as_str(), report.next_seq), (first.as_str(), 4));
    drop(report);

    // Wiped (a reinstall): seqs start again, under a new id.
    fs::remove_dir_all(&path).unwrap();
    let (_, report) = Spool::open(&path, small()).unwrap();
    assert_eq!(report.next_seq, 1);
    assert_ne!(report.spool_id, first);

    // State and records lost, the id file left: seqs start again, so the id changes too (the
    // collector would take the new seqs for resends of the old ones).
    let kept = report.spool_id.clone();
    {
        let (mut spool, _) = Spool::open(&path, small()).unwrap();
        append_seqs(&mut spool, 2);
    }
    for entry in fs::read_dir(&path).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().is_some_and(|n| n != ID_FILE) {
            fs::remove_file(p).unwrap();
        }
    }
    let (_, report) = Spool::open(&path, small()).unwrap();
    assert_eq!(report.next_seq, 1);
    assert_ne!(report.spool_id, kept);

    // A damaged id is replaced, not trusted.
    let (spool, _) = Spool::open(dir.path().join("damaged"), small()).unwrap();
    drop(spool);
    fs::write(dir.path().join("damaged").join(ID_FILE), "not an id\n").unwrap();
    let (_, report) = Spool::open(dir.path().join("damaged"), small()).unwrap();
    assert_eq!(report.spool_id.len(), 32);
}

#[test]
fn a_spool_from_before_ids_keeps_the_empty_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool");
    {
        let (mut spool, _) = Spool::open(&path, small()).unwrap();
        append_seqs(&mut spool, 5);
    }
    fs::remove_file(path.join(ID_FILE)).unwrap();
    let (_, report) = Spool::open(&path, small()).unwrap();
    assert_eq!((report.spool_id.as_str(), report.next_seq), ("", 6));
    let (_, report) = Spool::open(&path, small()).unwrap();
    assert_eq!(report.spool_id, "", "kept across opens");
}

#[test]
fn round_trip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool");
    {
        let (mut spool, report) = Spool::open(&path, small()).unwrap();
        assert_eq!(report.next_seq, 1);
        assert_eq!(report.recovered_events, 0);
        append_seqs(&mut spool, 10);
        append_seqs(&mut spool, 1);
        append_seqs(&mut spool, 30);
        assert_eq!(spool.depth_events(), 41);
        assert_contents(&read_all(&mut spool), 1..=41);
        // Reads in small steps continue where the previous one stopped.
        let first = spool.read_from(5, 3, usize::MAX).unwrap();
        assert_contents(&first, 5..=7);
        assert_contents(&spool.read_from(8, 2, usize::MAX).unwrap(), 8..=9);
        // A byte budget stops early but always yields one record.
        assert_eq!(spool.read_from(1, 100, 1).unwrap().len(), 1);
        spool.ack(12).unwrap();
        assert_eq!(spool.depth_events(), 29);
        assert_contents(&spool.read_from(1, 5, usize::MAX).unwrap(), 13..=17);
        assert!(matches!(spool.ack(42), Err(SpoolError::AckBeyondEnd { up_to: 42, last: 41 })));
        spool.ack(3).unwrap(); // a stale ack changes nothing
        assert_eq!(spool.acked(), 12);
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o700);
    assert_eq!(mode(&path.join("state")), 0o600);
    for f in segment_files(&path) {
        assert_eq!(mode(&f), 0o600);
    }

    let (mut spool, report) = Spool::open(&path, small()).unwrap();
    assert_eq!(
        report,
        OpenReport {
            recovered_events: 29,
            first_unacked_seq: 13,
            next_seq: 42,
            segments: 1,
            spool_id: fs::read_to_string(path.join(ID_FILE)).unwrap().trim().to_owned(),
            ..OpenReport::default()
        }
    );
    assert_contents(&read_all(&mut spool), 13..=41);
    assert_eq!(append_seqs(&mut spool, 2), 42..=43);
    assert_contents(&read_all(&mut spool), 13..=43);
}

#[test]
fn second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_spool, _) = Spool::open(dir.path(), small()).unwrap();
    let err = Spool::open(dir.path(), small()).unwrap_err();
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use by another process"));
}

#[test]
fn seqs_continue_after_everything_is_acked_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1024, 8 * 1024, SyncPolicy::EveryAppend);
    {
        let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
        for _ in 0..10 {
            append_seqs(&mut spool, 5);
        }
        spool.ack(50).unwrap();
        assert_eq!(spool.depth_events(), 0);
        assert_eq!(segment_files(dir.path()).len(), 1, "sealed acked segments deleted");
    }
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!((report.next_seq, report.recovered_events), (51, 0));
    assert_eq!(append_seqs(&mut spool, 1), 51..=51);
    spool.ack(51).unwrap();
    drop(spool);
    // Even with every segment gone, the state file's high-water mark holds.
    for f in segment_files(dir.path()) {
        fs::remove_file(f).unwrap();
    }
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!(report.next_seq, 52);
    assert_eq!(append_seqs(&mut spool, 1), 52..=52);
    assert_contents(&read_all(&mut spool), [52]);
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        for _ in 0..5 {
            append_seqs(&mut spool, 10);
        }
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    assert_eq!(len, offset_of(1, 51));
    // Cut the last record (seq 50) in the middle of its payload.
    fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 7).unwrap();

    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!(report.torn_records, 1);
    assert_eq!(report.truncated_bytes, record_len(payload(50).len()) - 7);
    assert_eq!(report.corrupt_records, 0);
    assert_eq!(report.next_seq, 50, "the torn record's seq was never handed out");
    assert_eq!(report.recovered_events, 49);
    assert_contents(&read_all(&mut spool), 1..=49);
    assert_eq!(fs::metadata(&seg).unwrap().len(), offset_of(1, 50));
    append_seqs(&mut spool, 3);
    assert_contents(&read_all(&mut spool), 1..=52);
    drop(spool);
    let (_, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.next_seq), (0, 53));
}

#[test]
fn cut_inside_a_record_header_is_a_torn_tail_too() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_seqs(&mut spool, 4);
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(offset_of(1, 4) + 6).unwrap();
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.truncated_bytes, report.next_seq), (1, 6, 4));
    assert_contents(&read_all(&mut spool), 1..=3);
}

#[test]
fn garbage_after_a_valid_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_seqs(&mut spool, 20);
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    let mut rng = XorShift(7);
    let mut garbage: Vec<u8> = (0..300).map(|_| rng.next() as u8).collect();
    // Make it look like a record start, to be sure the checksum is what rejects it.
    garbage[..4].copy_from_slice(&format::RECORD_MAGIC);
    fs::OpenOptions::new().write(true).open(&seg).unwrap().write_all_at(&garbage, len).unwrap();

    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.truncated_bytes), (1, 300));
    assert_eq!((report.corrupt_records, report.next_seq), (0, 21));
    assert_contents(&read_all(&mut spool), 1..=20);
    assert_eq!(fs::metadata(&seg).unwrap().len(), len);
}

#[test]
fn flipped_byte_mid_segment_is_skipped_and_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_seqs(&mut spool, 100);
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&seg).unwrap();
    let at = offset_of(1, 40) + RECORD_HEADER_LEN as u64 + 3;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();

    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.corrupt_records, report.torn_records), (1, 0));
    assert_eq!(report.corrupt_bytes, record_len(payload(40).len()));
    assert_eq!((report.recovered_events, report.next_seq), (99, 101));
    assert_contents(&read_all(&mut spool), (1..=39).chain(41..=100));
    let gap = Gap { first_seq: 40, last_seq: 40, events: 1, cause: GapCause::Corrupt };
    assert_eq!(spool.take_evictions(), vec![gap]);
    assert_eq!(spool.take_evictions(), vec![], "handed out once");
    assert_eq!(spool.corrupt_total(), 1);
    append_seqs(&mut spool, 1);
    drop(spool);

    // The same damage found again is neither recounted nor reported twice.
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.corrupt_records, report.recovered_events), (0, 100));
    assert_eq!(spool.take_evictions(), vec![gap], "unconfirmed gaps survive a restart");
    spool.gap_reported(&[gap]).unwrap();
    assert_eq!(spool.corrupt_total(), 1);
    assert_contents(&read_all(&mut spool), (1..=39).chain(41..=101));
    drop(spool);
    let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
    assert!(spool.take_evictions().is_empty());
}

#[test]
fn damage_found_while_reading_is_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
    append_seqs(&mut spool, 50);
    let seg = segment_files(dir.path()).pop().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    // Damage the length field of seq 20 after open checked everything.
    f.write_all_at(&[0xff, 0xff, 0xff, 0x7f], offset_of(1, 20) + 8).unwrap();
    assert_contents(&read_all(&mut spool), (1..=19).chain(21..=50));
    assert_eq!(spool.corrupt_total(), 1);
    assert_eq!(spool.depth_events(), 49);
    let gaps = spool.take_evictions();
    assert_eq!(
        gaps,
        vec![Gap { first_seq: 20, last_seq: 20, events: 1, cause: GapCause::Corrupt }]
    );
    // Reading again meets the known damage without counting it again.
    assert_contents(&read_all(&mut spool), (1..=19).chain(21..=50));
    assert_eq!(spool.corrupt_total(), 1);
    drop(spool);
    let (_, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.corrupt_records, report.recovered_events), (0, 49));
}

#[test]
fn complete_tail_record_with_bad_checksum_retires_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_seqs(&mut spool, 10);
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(b"X", offset_of(1, 10) + RECORD_HEADER_LEN as u64).unwrap();
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.corrupt_records), (1, 1));
    assert_eq!(report.next_seq, 11, "seq 10 may have been sent: never reused");
    append_seqs(&mut spool, 2);
    assert_contents(&read_all(&mut spool), (1..=9).chain(11..=12));
    assert_eq!(spool.depth_events(), 11);
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.recovered_events, report.next_seq, report.corrupt_records), (11, 13, 0));
    assert_contents(&read_all(&mut spool), (1..=9).chain(11..=12));
}

#[test]
fn eviction_at_the_size_limit_is_counted_reported_and_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(4096, 16 * 1024, SyncPolicy::EveryAppend);
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    for _ in 0..100 {
        append_seqs(&mut spool, 7);
        assert!(spool.depth_bytes() <= o.max_bytes, "{}", spool.depth_bytes());
    }
    let evicted = spool.evicted_total();
    assert!(evicted > 0);
    let gaps = spool.take_evictions();
    assert_eq!(gaps.len(), 1, "evictions of consecutive segments merge: {gaps:?}");
    let gap = gaps[0];
    assert_eq!((gap.first_seq, gap.events, gap.cause), (1, evicted, GapCause::Evicted));
    assert_eq!(gap.last_seq, evicted);
    let rest = read_all(&mut spool);
    assert_contents(&rest, evicted + 1..=700);
    assert_eq!(spool.depth_events(), 700 - evicted);
    assert_eq!(spool.first_unacked_seq(), evicted + 1);
    assert_eq!(
        spool.depth_bytes(),
        segment_files(dir.path()).iter().map(|p| fs::metadata(p).unwrap().len()).sum::<u64>()
    );

    // A later eviction, after the first gap was handed out, is a new gap.
    for _ in 0..60 {
        append_seqs(&mut spool, 5);
    }
    let more = spool.take_evictions();
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].first_seq, evicted + 1);
    assert_eq!(spool.evicted_total(), evicted + more[0].events);
    let total = spool.evicted_total();
    drop(spool);

    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!(report.evicted_total, total);
    assert_eq!(report.next_seq, 1001);
    assert_eq!(report.first_unacked_seq, more[0].last_seq + 1);
    assert_eq!(spool.pending_gaps(), &[gap, more[0]]);
    assert_eq!(spool.take_evictions(), vec![gap, more[0]]);
    spool.gap_reported(&[gap]).unwrap();
    spool.requeue_gaps();
    assert_eq!(spool.take_evictions(), vec![more[0]]);
    spool.gap_reported(&[more[0]]).unwrap();
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!(report.evicted_total, total, "the total outlives the reported gaps");
    assert!(spool.take_evictions().is_empty());
    assert_contents(&read_all(&mut spool), more[0].last_seq + 1..=1000);
}

#[test]
fn acked_data_is_evicted_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(4096, 16 * 1024, SyncPolicy::EveryAppend);
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    for _ in 0..40 {
        append_seqs(&mut spool, 5);
        let last = spool.next_seq() - 1;
        spool.ack(last).unwrap();
    }
    assert_eq!(spool.evicted_total(), 0);
    assert!(spool.take_evictions().is_empty());
    let err = spool.append(&[&vec![0u8; 17 * 1024]]).unwrap_err();
    assert!(matches!(err, SpoolError::BatchTooLarge { .. }), "{err}");
}

#[test]
fn segments_roll_over_and_go_once_acked() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(2048, 1024 * 1024, SyncPolicy::EveryAppend);
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    for _ in 0..30 {
        append_seqs(&mut spool, 10);
    }
    let files = segment_files(dir.path());
    assert!(files.len() > 5, "{}", files.len());
    // Segment files are named by their first seq and hold whole batches.
    let bases: Vec<u64> = files
        .iter()
        .map(|p| parse_segment_name(p.file_name().unwrap().to_str().unwrap()).unwrap())
        .collect();
    assert_eq!(bases[0], 1);
    assert!(bases.iter().all(|b| b % 10 == 1), "{bases:?}");
    for p in &files {
        assert!(fs::metadata(p).unwrap().len() <= 2048);
    }
    spool.ack(150).unwrap();
    let left = segment_files(dir.path());
    let left_bases: Vec<u64> = left
        .iter()
        .map(|p| parse_segment_name(p.file_name().unwrap().to_str().unwrap()).unwrap())
        .collect();
    // Exactly the segments holding nothing above 150 are gone.
    assert!(left_bases[0] <= 151 && left_bases[1] > 151, "{left_bases:?}");
    assert_eq!(left_bases[..], bases[bases.len() - left_bases.len()..]);
    assert_contents(&spool.read_from(1, 5, usize::MAX).unwrap(), 151..=155);
    assert_contents(&read_all(&mut spool), 151..=300);
    spool.ack(300).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1, "the active segment stays");
    assert_eq!(spool.depth_events(), 0);
    drop(spool);
    let (_, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!((report.next_seq, report.recovered_events, report.segments), (301, 0, 1));
}

#[test]
fn interval_policy_reads_only_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(64 * 1024, 1024 * 1024, SyncPolicy::Interval(Duration::from_secs(3600)));
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    append_seqs(&mut spool, 5);
    assert!(spool.read_from(1, 10, usize::MAX).unwrap().is_empty());
    assert!(!spool.sync_if_due().unwrap());
    spool.sync().unwrap();
    assert_contents(&spool.read_from(1, 10, usize::MAX).unwrap(), 1..=5);
    drop(spool);
    // Dropping syncs: a restart finds everything.
    let (_, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!(report.recovered_events, 5);
}

#[test]
fn bad_options_and_oversized_payloads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Spool::open(dir.path(), opts(4096, 4096, SyncPolicy::EveryAppend)).unwrap_err();
    assert!(matches!(err, SpoolError::InvalidOptions { .. }), "{err}");
    let (mut spool, _) =
        Spool::open(dir.path(), opts(1 << 20, 1 << 26, SyncPolicy::EveryAppend)).unwrap();
    let big = vec![0u8; MAX_PAYLOAD_LEN + 1];
    let err = spool.append(&[b"ok", &big]).unwrap_err();
    assert!(matches!(err, SpoolError::PayloadTooLarge { index: 1, .. }), "{err}");
    assert_eq!(spool.next_seq(), 1, "nothing of a refused batch is spooled");
    assert_eq!(spool.append(&[]).unwrap().count(), 0);
}

#[test]
fn newer_format_is_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_seqs(&mut spool, 3);
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut header = format::encode_segment_header(1);
    header[8] = 9;
    let crc = crc32c::crc32c(&header[..28]);
    header[28..].copy_from_slice(&crc.to_le_bytes());
    fs::OpenOptions::new().write(true).open(&seg).unwrap().write_all_at(&header, 0).unwrap();
    let err = Spool::open(dir.path(), small()).unwrap_err();
    assert!(matches!(err, SpoolError::UnsupportedVersion { version: 9, .. }), "{err}");
    assert!(err.to_string().contains(&seg.display().to_string()));
}

#[test]
fn damaged_state_file_resends_rather_than_loses() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_seqs(&mut spool, 10);
        spool.ack(4).unwrap();
    }
    fs::write(dir.path().join("state"), b"not a state file").unwrap();
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert!(report.state_reset);
    assert_eq!((report.next_seq, report.first_unacked_seq), (11, 1));
    assert_contents(&read_all(&mut spool), 1..=10);
}

#[test]
fn failed_write_left_on_disk_is_cut_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
    append_seqs(&mut spool, 5);
    // What a half-done write that could not be cut back leaves behind.
    let a = spool.active();
    a.file.write_all_at(&[0xAB; 1000], a.len).unwrap();
    spool.tail_dirty = true;
    append_seqs(&mut spool, 2);
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.corrupt_records), (0, 0));
    assert_contents(&read_all(&mut spool), 1..=7);
}

#[test]
fn disk_full_is_a_typed_error_and_leaves_the_spool_consistent() {
    let err = io_err(
        "write",
        Path::new("/spool/00000000000000000001.seg"),
        io::Error::from_raw_os_error(libc::ENOSPC),
    );
    assert!(matches!(err, SpoolError::DiskFull { .. }));
    assert_eq!(err.to_string(), "disk full writing /spool/00000000000000000001.seg");

    // A real full file system needs a small tmpfs, which needs root.
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = TmpfsMount::new(dir.path(), 64 * 1024) else {
        println!("skipped the real disk-full half: mounting a tmpfs needs root");
        return;
    };
    let o = opts(8 * 1024, 1024 * 1024, SyncPolicy::EveryAppend);
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    let big = vec![7u8; 1000];
    let mut stored = 0u64;
    let err = loop {
        match spool.append(&[&big, &big]) {
            Ok(r) => stored = *r.end(),
            Err(e) => break e,
        }
        assert!(stored < 200, "tmpfs never filled");
    };
    assert!(matches!(err, SpoolError::DiskFull { .. }), "{err:?}");
    assert!(err.to_string().starts_with("disk full writing "), "{err}");
    assert_eq!(spool.next_seq(), stored + 1, "the failed batch took no seqs");
    assert_eq!(spool.read_from(1, 1000, usize::MAX).unwrap().len() as u64, stored);
    // Freeing space (the collector acks) makes appends work again.
    spool.ack(stored).unwrap();
    let r = spool.append(&[b"after"]).unwrap();
    assert_eq!(*r.start(), stored + 1);
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!((report.torn_records, report.corrupt_records), (0, 0));
    assert_eq!(spool.read_from(1, 10, usize::MAX).unwrap(), vec![(stored + 1, b"after".to_vec())]);
}

/// A tmpfs mounted for one test, unmounted on drop.
struct TmpfsMount(std::ffi::CString);

impl TmpfsMount {
    fn new(at: &Path, bytes: u64) -> Option<Self> {
        use std::os::unix::ffi::OsStrExt as _;
        let target = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
        let data = std::ffi::CString::new(format!("size={bytes},mode=0700")).ok()?;
        // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        (rc == 0).then_some(Self(target))
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        // SAFETY: the path is a valid NUL-terminated string.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Random batches, acks and restarts against a model of what was appended.
#[test]
fn random_operations_match_a_model() {
    for seed in 1..=6u64 {
        let dir = tempfile::tempdir().unwrap();
        let sync = if seed % 2 == 0 {
            SyncPolicy::EveryAppend
        } else {
            SyncPolicy::Interval(Duration::ZERO)
        };
        let o = opts(3000, 12_000, sync);
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut model_checkpoint = None;
        let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
        for step in 0..400 {
            match rng.below(10) {
                0..=5 => {
                    let checkpointed = rng.below(2) == 0;
                    let n = rng.below(40) as usize + usize::from(!checkpointed);
                    let payloads: Vec<Vec<u8>> = (0..n)
                        .map(|_| {
                            let len = rng.below(120) as usize;
                            (0..len).map(|_| rng.next() as u8).collect()
                        })
                        .collect();
                    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                    let r = if checkpointed {
                        model_checkpoint = Some(cp(step));
                        spool.append_with_checkpoint(&refs, &cp(step)).unwrap()
                    } else {
                        spool.append(&refs).unwrap()
                    };
                    assert_eq!(r.clone().count(), n);
                    for (seq, p) in r.zip(payloads) {
                        model.insert(seq, p);
                    }
                }
                6 | 7 => {
                    let next = spool.next_seq();
                    if next > 1 {
                        let acked = spool.acked();
                        let up_to = acked + rng.below(next - acked);
                        spool.ack(up_to).unwrap();
                    }
                }
                8 => {
                    drop(spool);
                    let report;
                    (spool, report) = Spool::open(dir.path(), o).unwrap();
                    assert_eq!((report.torn_records, report.corrupt_records), (0, 0));
                    assert_eq!(report.next_seq, model.keys().next_back().map_or(1, |s| s + 1));
                    assert_eq!(report.last_checkpoint, model_checkpoint, "seed {seed} step {step}");
                }
                _ => {}
            }
            assert!(spool.depth_bytes() <= o.max_bytes, "seed {seed} step {step}");
            assert_eq!(spool.last_checkpoint(), model_checkpoint, "seed {seed} step {step}");
            let floor = spool.acked();
            let got = read_all(&mut spool);
            let gaps = spool.pending_gaps().to_vec();
            assert_eq!(got.len() as u64, spool.depth_events(), "seed {seed} step {step}");
            let mut expect = model.range(floor + 1..).map(|(s, _)| *s).peekable();
            for (seq, p) in &got {
                assert_eq!(Some(p), model.get(seq), "seed {seed} seq {seq}");
                // Everything skipped on the way is inside a reported gap.
                while let Some(&e) = expect.peek() {
                    if e >= *seq {
                        break;
                    }
                    assert!(
                        gaps.iter().any(|g| g.first_seq <= e && e <= g.last_seq),
                        "seed {seed} step {step}: seq {e} missing without a gap"
                    );
                    expect.next();
                }
                expect.next();
            }
            assert_eq!(expect.next(), None, "seed {seed} step {step}: unread tail");
            let evicted: u64 = gaps.iter().map(|g| g.events).sum();
            assert_eq!(evicted, spool.evicted_total(), "seed {seed} step {step}");
        }
    }
}

const CHILD_ENV: &str = "KEYWATCH_SPOOL_TEST_CHILD_DIR";

fn kill_opts() -> SpoolOptions {
    opts(32 * 1024, 256 * 1024 * 1024, SyncPolicy::Interval(Duration::from_millis(2)))
}

/// Not a test on its own: the body of the child that [`sigkill_mid_append_recovers`] starts
/// and kills. Without the variable it returns at once.
#[test]
fn sigkill_child_helper() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mut spool, _) = Spool::open(&dir, kill_opts()).expect("child: open");
    let mut rng = XorShift(u64::from(std::process::id()) | 1);
    loop {
        // Each batch's checkpoint names its last seq, as a ring position would name its end.
        let n = 1 + rng.below(400);
        append_checkpointed(&mut spool, n);
        if rng.below(8) == 0 {
            let (acked, last) = (spool.acked(), spool.next_seq() - 1);
            spool.ack(acked + (last - acked) / 2).expect("child: ack");
        }
        // The parent holds us to every seq printed here.
        println!("appended {}", spool.next_seq() - 1);
    }
}

#[test]
fn sigkill_mid_append_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    for round in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "spool::tests::sigkill_child_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut confirmed = 0u64;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while let Some(Ok(line)) = lines.next() {
            if let Some(v) = line.strip_prefix("appended ") {
                confirmed = v.parse().unwrap();
                seen += 1;
                if seen >= 40 + round * 23 {
                    break;
                }
            }
        }
        assert!(seen > 0, "the child never appended");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let (mut spool, report) = Spool::open(dir.path(), kill_opts()).unwrap();
        println!("round {round}: confirmed {confirmed}, {report:?}");
        assert_eq!(report.corrupt_records, 0, "{report:?}");
        assert!(report.torn_records <= 1, "{report:?}");
        assert!(report.next_seq > confirmed, "lost a confirmed append: {report:?} {confirmed}");
        // Exactly once: the checkpoint names the last event spooled, no more and no less.
        assert_eq!(report.last_checkpoint, Some(cp(report.next_seq - 1)), "{report:?}");
        let got = read_all(&mut spool);
        assert_eq!(got.len() as u64, report.recovered_events);
        if let Some(first) = got.first() {
            assert_eq!(first.0, report.first_unacked_seq);
        }
        assert_contents(&got, report.first_unacked_seq..report.next_seq);
    }
}

/// A source position naming `n` (a stand-in for a ring buffer position).
fn cp(n: u64) -> SourceCheckpoint {
    let mut c = [0xA5; 32];
    c[..8].copy_from_slice(&n.to_le_bytes());
    c
}

/// Appends `n` events carrying [`payload`]s, with the checkpoint `cp(last seq of the batch)`.
/// Returns the offset of the batch's checkpoint record.
fn append_checkpointed(spool: &mut Spool, n: u64) -> u64 {
    let first = spool.next_seq();
    let payloads: Vec<Vec<u8>> = (first..first + n).map(payload).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let range = spool.append_with_checkpoint(&refs, &cp(first + n - 1)).expect("append");
    assert_eq!(range, first..=first + n - 1);
    assert_eq!(spool.last_checkpoint(), Some(cp(first + n - 1)));
    // The whole batch, checkpoint first, ends the active segment.
    let batch_bytes = CHECKPOINT_LEN as u64
        + (first..first + n).map(|s| record_len(payload(s).len())).sum::<u64>();
    let a = spool.active();
    assert!(a.len >= SEGMENT_HEADER_LEN as u64 + batch_bytes);
    a.len - batch_bytes
}

fn set_len(path: &Path, len: u64) {
    fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

fn flip_bit(path: &Path, at: u64, mask: u8) {
    let f = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ mask], at).unwrap();
}

#[test]
fn checkpoints_round_trip_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
        assert_eq!((report.last_checkpoint, spool.last_checkpoint()), (None, None));
        append_checkpointed(&mut spool, 5);
        append_checkpointed(&mut spool, 1);
        append_checkpointed(&mut spool, 30);
        assert_eq!(spool.depth_events(), 36);
        // Exactly the events: no checkpoint bytes in a payload, seqs contiguous.
        assert_contents(&read_all(&mut spool), 1..=36);
        assert_contents(&spool.read_from(5, 3, usize::MAX).unwrap(), 5..=7);
        assert_contents(&spool.read_from(8, 2, usize::MAX).unwrap(), 8..=9);
        assert_eq!(
            spool.depth_bytes(),
            segment_files(dir.path()).iter().map(|p| fs::metadata(p).unwrap().len()).sum::<u64>()
        );
    }
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!(
        report,
        OpenReport {
            recovered_events: 36,
            first_unacked_seq: 1,
            next_seq: 37,
            segments: 1,
            last_checkpoint: Some(cp(36)),
            spool_id: fs::read_to_string(dir.path().join(ID_FILE)).unwrap().trim().to_owned(),
            ..OpenReport::default()
        }
    );
    assert_eq!(spool.last_checkpoint(), Some(cp(36)));
    assert_contents(&read_all(&mut spool), 1..=36);
    // Every seq is found by seeking too (backwards, so no read continues the previous one).
    for seq in (1..=36).rev() {
        assert_contents(&spool.read_from(seq, 1, usize::MAX).unwrap(), [seq]);
    }
    append_checkpointed(&mut spool, 2);
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.last_checkpoint, report.next_seq, report.segments), (Some(cp(38)), 39, 1));
    assert_contents(&read_all(&mut spool), 1..=38);
}

#[test]
fn a_checkpoint_alone_moves_the_position_on() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(64 * 1024, 1024 * 1024, SyncPolicy::Interval(Duration::from_secs(3600)));
    {
        let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
        append_checkpointed(&mut spool, 3);
        spool.sync().unwrap();
        let r = spool.append_with_checkpoint(&[], &cp(100)).unwrap();
        assert_eq!((r.clone().count(), *r.start()), (0, 4));
        assert_eq!((spool.last_checkpoint(), spool.next_seq()), (Some(cp(100)), 4));
        // It takes no seq, but still waits for a sync like any write.
        assert!(spool.unsynced);
        assert!(spool.sync_if_due().is_ok());
        spool.sync().unwrap();
        assert!(!spool.unsynced);
        assert_contents(&read_all(&mut spool), 1..=3);
        // Plain empty batches write nothing at all.
        let before = spool.depth_bytes();
        spool.append(&[]).unwrap();
        assert_eq!(spool.depth_bytes(), before);
    }
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!(
        (report.last_checkpoint, report.next_seq, report.torn_records),
        (Some(cp(100)), 4, 0)
    );
    assert_contents(&read_all(&mut spool), 1..=3);
}

#[test]
fn plain_and_checkpointed_appends_mix() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_seqs(&mut spool, 3);
        assert_eq!(spool.last_checkpoint(), None);
        append_checkpointed(&mut spool, 4);
        append_seqs(&mut spool, 5);
        assert_eq!(spool.last_checkpoint(), Some(cp(7)), "a plain batch leaves the position");
        append_checkpointed(&mut spool, 0);
        assert_eq!(spool.last_checkpoint(), Some(cp(12)));
        append_seqs(&mut spool, 2);
        assert_contents(&read_all(&mut spool), 1..=14);
    }
    // A torn plain batch is a torn tail as before; the checkpoint before it stands.
    let seg = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    set_len(&seg, len - 5);
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!(
        (report.torn_records, report.truncated_bytes),
        (1, record_len(payload(14).len()) - 5)
    );
    assert_eq!((report.last_checkpoint, report.next_seq), (Some(cp(12)), 14));
    assert_contents(&read_all(&mut spool), 1..=13);
    append_seqs(&mut spool, 1);
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.last_checkpoint, report.next_seq), (Some(cp(12)), 15));
    assert_contents(&read_all(&mut spool), 1..=14);
}

#[test]
fn torn_batch_after_a_checkpoint_goes_whole() {
    // Where the crash cut the second batch: inside a record, at a record boundary, right
    // after its checkpoint.
    let cuts: [fn(u64) -> u64; 3] = [
        |cp_at| {
            cp_at
                + CHECKPOINT_LEN as u64
                + (11..15).map(|s| record_len(payload(s).len())).sum::<u64>()
                + 7
        },
        |cp_at| {
            cp_at
                + CHECKPOINT_LEN as u64
                + (11..19).map(|s| record_len(payload(s).len())).sum::<u64>()
        },
        |cp_at| cp_at + CHECKPOINT_LEN as u64,
    ];
    for cut in cuts {
        let dir = tempfile::tempdir().unwrap();
        let cp_at = {
            let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
            append_checkpointed(&mut spool, 10);
            append_checkpointed(&mut spool, 10)
        };
        let seg = segment_files(dir.path()).pop().unwrap();
        let at = cut(cp_at);
        set_len(&seg, at);

        let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
        assert_eq!((report.torn_records, report.truncated_bytes), (1, at - cp_at), "cut at {at}");
        assert_eq!(report.corrupt_records, 0);
        assert_eq!(report.last_checkpoint, Some(cp(10)));
        assert_eq!(report.next_seq, 11, "the batch's seqs are handed out again");
        assert_eq!(report.recovered_events, 10);
        assert_eq!(fs::metadata(&seg).unwrap().len(), cp_at);
        assert_contents(&read_all(&mut spool), 1..=10);
        append_checkpointed(&mut spool, 3);
        assert_contents(&read_all(&mut spool), 1..=13);
        drop(spool);
        let (_, report) = Spool::open(dir.path(), small()).unwrap();
        assert_eq!(
            (report.torn_records, report.last_checkpoint, report.next_seq),
            (0, Some(cp(13)), 14)
        );
    }
}

#[test]
fn cut_inside_a_checkpoint_record_is_a_torn_tail() {
    for keep in [1, 3, 4, 9, 30, CHECKPOINT_LEN as u64 - 1] {
        let dir = tempfile::tempdir().unwrap();
        let cp_at = {
            let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
            append_checkpointed(&mut spool, 10);
            append_checkpointed(&mut spool, 4)
        };
        let seg = segment_files(dir.path()).pop().unwrap();
        set_len(&seg, cp_at + keep);
        let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
        assert_eq!((report.torn_records, report.truncated_bytes), (1, keep), "keep {keep}");
        assert_eq!((report.last_checkpoint, report.next_seq), (Some(cp(10)), 11));
        assert_contents(&read_all(&mut spool), 1..=10);
    }
}

#[test]
fn damaged_checkpoint_mid_log_is_skipped_and_its_events_kept() {
    // Its batch's records are intact and checked: they are read. Only the position is lost,
    // so the previous checkpoint stands (the source may spool that batch again: duplicates,
    // never a loss).
    for (damaged, expect) in [(1, cp(30)), (2, cp(20))] {
        let dir = tempfile::tempdir().unwrap();
        let cps: Vec<u64> = {
            let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
            (0..3).map(|_| append_checkpointed(&mut spool, 10)).collect()
        };
        let seg = segment_files(dir.path()).pop().unwrap();
        flip_bit(&seg, cps[damaged] + 9, 0x04); // the count field
        let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
        assert_eq!((report.corrupt_records, report.corrupt_bytes), (0, CHECKPOINT_LEN as u64));
        assert_eq!((report.torn_records, report.recovered_events, report.next_seq), (0, 30, 31));
        assert_eq!(report.last_checkpoint, Some(expect), "checkpoint {damaged} damaged");
        assert_contents(&read_all(&mut spool), 1..=30);
        assert!(spool.take_evictions().is_empty(), "no event is missing");
        assert_eq!(spool.corrupt_total(), 0);
    }

    // Damage found while reading (after open checked everything) is stepped over the same way.
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
    let cps: Vec<u64> = (0..3).map(|_| append_checkpointed(&mut spool, 10)).collect();
    let seg = segment_files(dir.path()).pop().unwrap();
    flip_bit(&seg, cps[1] + 40, 0x80); // the body
    assert_contents(&read_all(&mut spool), 1..=30);
    assert_eq!(spool.corrupt_total(), 0);
    assert!(spool.take_evictions().is_empty());
}

#[test]
fn damaged_last_record_of_a_checkpointed_batch_retires_its_seq() {
    // A complete tail record that fails its checksum may have been durable and sent: as for
    // plain batches its seq is retired, and its batch's good records stay. The batch is not
    // whole, so its checkpoint is not believed.
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_checkpointed(&mut spool, 10);
        append_checkpointed(&mut spool, 10);
    }
    let seg = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    flip_bit(&seg, len - 1, 0x01);
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.corrupt_records), (1, 1));
    assert_eq!((report.next_seq, report.last_checkpoint), (21, Some(cp(10))));
    assert_contents(&read_all(&mut spool), 1..=19);
}

/// A version-1 segment as the previous build wrote it: its header, then records with a
/// 20-byte header, no checkpoints.
fn v1_segment(base: u64, seqs: RangeInclusive<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"KWSPOOL\0");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&32u32.to_le_bytes());
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    for seq in seqs {
        let p = payload(seq);
        let mut checked = Vec::new();
        checked.extend_from_slice(&(p.len() as u32).to_le_bytes());
        checked.extend_from_slice(&seq.to_le_bytes());
        checked.extend_from_slice(&p);
        out.extend_from_slice(&[0xC5, b'K', b'W', b'R']);
        out.extend_from_slice(&crc32c::crc32c(&checked).to_le_bytes());
        out.extend_from_slice(&checked);
    }
    out
}

#[test]
fn version_1_segment_is_read_and_not_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let old = v1_segment(1, 1..=5);
    fs::write(dir.path().join("00000000000000000001.seg"), &old).unwrap();
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.corrupt_records, report.corrupt_bytes), (0, 0, 0));
    assert_eq!((report.recovered_events, report.next_seq), (5, 6));
    assert_eq!((report.segments, report.last_checkpoint), (2, None));
    assert_contents(&read_all(&mut spool), 1..=5);
    append_checkpointed(&mut spool, 3);
    append_seqs(&mut spool, 2);
    assert_contents(&read_all(&mut spool), 1..=10);
    drop(spool);

    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2);
    assert_eq!(fs::read(&files[0]).unwrap(), old, "the version-1 segment is left as it was");
    let new = fs::read(&files[1]).unwrap();
    assert_eq!(files[1].file_name().unwrap(), "00000000000000000006.seg");
    assert_eq!(new[8..12], format::FORMAT_VERSION.to_le_bytes());
    assert_eq!(new[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + 4], format::CHECKPOINT_MAGIC);

    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.segments, report.next_seq, report.last_checkpoint), (2, 11, Some(cp(8))));
    assert_contents(&read_all(&mut spool), 1..=10);
    spool.ack(5).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1, "the acked version-1 segment goes");
}

#[test]
fn eviction_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(4096, 16 * 1024, SyncPolicy::EveryAppend);
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    for _ in 0..100 {
        append_checkpointed(&mut spool, 7);
        assert!(spool.depth_bytes() <= o.max_bytes, "{}", spool.depth_bytes());
    }
    assert!(spool.evicted_total() > 0);
    // Plain batches then push out every segment a checkpointed batch was written to.
    for _ in 0..60 {
        append_seqs(&mut spool, 5);
        assert!(spool.depth_bytes() <= o.max_bytes, "{}", spool.depth_bytes());
    }
    assert!(spool.pending_gaps().iter().all(|g| g.first_seq > 700 || g.last_seq >= 700));
    assert_eq!(spool.last_checkpoint(), Some(cp(700)));
    assert_eq!(
        spool.depth_bytes(),
        segment_files(dir.path()).iter().map(|p| fs::metadata(p).unwrap().len()).sum::<u64>()
    );
    let first = spool.first_unacked_seq();
    assert!(first > 700, "{first}");
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!((report.last_checkpoint, report.next_seq), (Some(cp(700)), 1001));
    assert_contents(&read_all(&mut spool), first..=1000);
}

#[test]
fn checkpoint_survives_ack_deleting_its_segment() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(2048, 1024 * 1024, SyncPolicy::EveryAppend);
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    for _ in 0..10 {
        append_checkpointed(&mut spool, 10);
    }
    for _ in 0..10 {
        append_seqs(&mut spool, 10);
    }
    assert!(segment_files(dir.path()).len() > 3);
    spool.ack(200).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1, "sealed acked segments deleted");
    assert_eq!(spool.last_checkpoint(), Some(cp(100)));
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!(
        (report.last_checkpoint, report.next_seq, report.recovered_events),
        (Some(cp(100)), 201, 0)
    );
    append_seqs(&mut spool, 1);
    drop(spool);
    let (_, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!((report.last_checkpoint, report.next_seq), (Some(cp(100)), 202));
}

#[test]
fn new_active_segment_on_open_carries_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_checkpointed(&mut spool, 10);
        spool.ack(10).unwrap();
    }
    // A crash while creating the next segment left a file without a complete header: open
    // cannot append to it (it lacks the checkpoint), so it starts a new segment in its place,
    // with the checkpoint, and drops the old, all-acked one.
    fs::write(dir.path().join("00000000000000000011.seg"), b"KWSP").unwrap();
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!((report.torn_records, report.truncated_bytes), (1, 4));
    assert_eq!((report.last_checkpoint, report.next_seq, report.segments), (Some(cp(10)), 11, 1));
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].file_name().unwrap(), "00000000000000000011.seg");
    assert_eq!(
        fs::metadata(&files[0]).unwrap().len(),
        (SEGMENT_HEADER_LEN + CHECKPOINT_LEN) as u64
    );
    append_seqs(&mut spool, 2);
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), small()).unwrap();
    assert_eq!(
        (report.last_checkpoint, report.next_seq, report.torn_records),
        (Some(cp(10)), 13, 0)
    );
    assert_contents(&read_all(&mut spool), 11..=12);
}

#[test]
fn checkpoints_at_segment_edges_are_stepped_over() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1024, 1024 * 1024, SyncPolicy::EveryAppend);
    let (last, checkpointed_last) = {
        let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
        let mut checkpointed_last = 0;
        for i in 0..60u64 {
            // Batches of 0 to 3 events: a count-0 checkpoint may end a segment.
            append_checkpointed(&mut spool, i % 4);
            checkpointed_last = spool.next_seq() - 1;
            if i % 5 == 0 {
                append_seqs(&mut spool, 2);
            }
        }
        (spool.next_seq() - 1, checkpointed_last)
    };
    let files = segment_files(dir.path());
    assert!(files.len() > 5, "{}", files.len());
    let mut ends_with_checkpoint = 0;
    for f in &files {
        // Each segment starts with a checkpoint: its first batch's or the copy it carries.
        let bytes = fs::read(f).unwrap();
        assert_eq!(bytes[SEGMENT_HEADER_LEN..SEGMENT_HEADER_LEN + 4], format::CHECKPOINT_MAGIC);
        let tail = &bytes[bytes.len() - CHECKPOINT_LEN..];
        if matches!(format::parse_checkpoint(tail), format::Parsed::Checkpoint(_)) {
            ends_with_checkpoint += 1;
        }
    }
    assert!(ends_with_checkpoint > 0, "no segment ends with a count-0 checkpoint");
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!((report.torn_records, report.corrupt_records, report.corrupt_bytes), (0, 0, 0));
    assert_eq!(report.last_checkpoint, Some(cp(checkpointed_last)));
    assert_contents(&read_all(&mut spool), 1..=last);
    for seq in (1..=last).rev() {
        assert_contents(&spool.read_from(seq, 1, usize::MAX).unwrap(), [seq]);
    }
    // Reads continuing from where the last one stopped cross every edge too.
    for seq in 1..=last {
        assert_contents(&spool.read_from(seq, 1, usize::MAX).unwrap(), [seq]);
    }
}

#[test]
fn checkpoints_alone_roll_over_and_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1024, 4096, SyncPolicy::EveryAppend);
    let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
    for i in 0..500 {
        spool.append_with_checkpoint(&[], &cp(i)).unwrap();
        assert!(spool.depth_bytes() <= o.max_bytes);
    }
    // No event ever took a seq, so a new segment would have the active one's name: the
    // active one is replaced instead, holding just the newest checkpoint.
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    assert!(fs::metadata(&files[0]).unwrap().len() <= 1024);
    assert_eq!((spool.evicted_total(), spool.next_seq()), (0, 1));
    // Reads meet only checkpoints; then an event, and more checkpoints, roll over as usual.
    assert!(read_all(&mut spool).is_empty());
    append_seqs(&mut spool, 1);
    for i in 500..1000 {
        spool.append_with_checkpoint(&[], &cp(i)).unwrap();
        assert!(spool.depth_bytes() <= o.max_bytes);
    }
    assert_contents(&read_all(&mut spool), [1]);
    assert!(spool.take_evictions().is_empty());
    drop(spool);
    let (mut spool, report) = Spool::open(dir.path(), o).unwrap();
    assert_eq!((report.last_checkpoint, report.next_seq), (Some(cp(999)), 2));
    assert_eq!(spool.evicted_total(), 0);
    assert_contents(&read_all(&mut spool), [1]);
}

/// A payload of `len` bytes that names its seq in its first eight.
fn sized_payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
    let n = len.min(8);
    p[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    p
}

#[test]
fn read_window_boundary_inside_a_checkpoint() {
    // The first read of a segment fills the window from its first event record, right after
    // the first batch's checkpoint.
    let window_start = (SEGMENT_HEADER_LEN + CHECKPOINT_LEN) as u64;
    let boundary = window_start + READ_CHUNK as u64;
    for inside in [1, 3, 4, 8, 30, CHECKPOINT_LEN as u64 - 1] {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(4 << 20, 16 << 20, SyncPolicy::Interval(Duration::from_secs(3600)));
        let (mut spool, _) = Spool::open(dir.path(), o).unwrap();
        let mut model: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut add = |spool: &mut Spool, len: usize| {
            let seq = spool.next_seq();
            let p = sized_payload(seq, len);
            spool.append_with_checkpoint(&[&p], &cp(seq)).unwrap();
            model.push((seq, p));
        };
        // Small batches up to just short of the boundary, then one sized so that the next
        // checkpoint starts `inside` bytes before it.
        let target = boundary - inside;
        let per_batch = |len: usize| (CHECKPOINT_LEN + RECORD_HEADER_LEN + len) as u64;
        while spool.active().len + 2 * per_batch(100) <= target {
            add(&mut spool, 100);
        }
        let filler = target - spool.active().len - per_batch(0);
        add(&mut spool, filler as usize);
        assert_eq!(spool.active().len, target);
        for _ in 0..20 {
            add(&mut spool, 50);
        }
        spool.sync().unwrap();

        assert_eq!(spool.read_from(1, 1, usize::MAX).unwrap(), model[..1]);
        assert_eq!((spool.read_buf.start, spool.read_buf.data.len()), (window_start, READ_CHUNK));
        let mut got = Vec::new();
        let mut from = 1;
        loop {
            let batch = spool.read_from(from, 97, 8 * 1024).unwrap();
            let Some(last) = batch.last() else { break };
            from = last.0 + 1;
            got.extend(batch);
        }
        assert_eq!(got, model, "checkpoint {inside} bytes before the window's end");
        assert_eq!(spool.read_buf.start, target, "the window was refilled at the checkpoint");
        assert_eq!(spool.corrupt_total(), 0);
        drop(spool);
        let (_, report) = Spool::open(dir.path(), o).unwrap();
        assert_eq!((report.corrupt_bytes, report.torn_records), (0, 0));
        assert_eq!(report.last_checkpoint, Some(cp(model.last().unwrap().0)));
    }
}
