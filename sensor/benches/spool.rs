//! Spool append throughput: 200-byte events in batches of 1,000, under each sync policy, next
//! to the same bytes written with a plain `write_all` and one fsync per batch. Prints figures,
//! never asserts: disks differ too much for a threshold to mean anything.
//!
//! `AYA_BUILD_SKIP=1 cargo bench -p sensor --bench spool` (`SPOOL_BENCH_BATCHES=N` to change
//! the run length; the default writes about 44 MB per case).

use std::{
    fs::File,
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use sensor::spool::{Spool, SpoolOptions, SyncPolicy};

const PAYLOAD_BYTES: usize = 200;
const BATCH: usize = 1_000;
/// Record header the spool adds to each payload; the baseline writes the same number of bytes.
const RECORD_OVERHEAD: usize = 20;

fn main() {
    let batches: usize =
        std::env::var("SPOOL_BENCH_BATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let events = (batches * BATCH) as f64;
    let payloads: Vec<Vec<u8>> =
        (0..BATCH).map(|i| (0..PAYLOAD_BYTES).map(|j| (i * 31 + j) as u8).collect()).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let root = tempfile::tempdir().expect("temporary directory");

    let baseline = baseline(&root.path().join("baseline"), batches);
    let every = spool_case(&root.path().join("every"), batches, &refs, SyncPolicy::EveryAppend);
    let interval = spool_case(
        &root.path().join("interval"),
        batches,
        &refs,
        SyncPolicy::Interval(Duration::from_millis(50)),
    );

    println!(
        "spool append, {batches} batches x {BATCH} events of {PAYLOAD_BYTES} bytes (target >= 200000 events/s batched)"
    );
    let rate = |d: Duration| events / d.as_secs_f64();
    println!("  {:<38} {:>10.0} events/s", "baseline: write_all + fsync per batch", rate(baseline));
    for (name, d) in [("spool: EveryAppend", every), ("spool: Interval(50ms)", interval)] {
        println!(
            "  {name:<38} {:>10.0} events/s  ({:.2}x baseline)",
            rate(d),
            rate(d) / rate(baseline)
        );
    }
}

fn baseline(path: &Path, batches: usize) -> Duration {
    let buf = vec![0x5a_u8; BATCH * (PAYLOAD_BYTES + RECORD_OVERHEAD)];
    let mut f = File::create(path).expect("create baseline file");
    let start = Instant::now();
    for _ in 0..batches {
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fsync");
    }
    start.elapsed()
}

fn spool_case(dir: &Path, batches: usize, refs: &[&[u8]], sync: SyncPolicy) -> Duration {
    let opts = SpoolOptions { max_bytes: 1 << 30, segment_bytes: 64 << 20, sync };
    let (mut spool, _) = Spool::open(dir, opts).expect("open spool");
    let start = Instant::now();
    for _ in 0..batches {
        spool.append(refs).expect("append");
    }
    spool.sync().expect("final sync");
    start.elapsed()
}
