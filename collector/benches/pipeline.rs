//! Ingest throughput (decode → correlate → detect → store) with 200 workloads and 50 watches,
//! as a ratio against bare SQLite inserts of the same rows measured in the same run; then
//! timeline query latency for one host. Prints; never asserts.
//!
//! `cargo bench -p collector --bench pipeline` (KEYWATCH_BENCH_EVENTS sets the event count).

use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use collector::{
    clock::ManualClock,
    convert::event_to_proto,
    event::{Ancestor, Event, EventKind, Host, Process},
    serve::Collector,
    timeline::TimelineQuery,
};
use keywatch_proto::v1 as pb;
use prost::Message as _;

const WORKLOADS: usize = 200;
const WATCHES: usize = 50;
const HOSTS: usize = 10;
const BATCH: usize = 1_000;

fn registry_yaml() -> String {
    let mut y = String::new();
    for t in 0..10 {
        let _ = write!(y, "kind: Team\nname: team-{t}\n---\n");
    }
    for w in 0..WATCHES {
        let _ = write!(
            y,
            "kind: Watch\nname: watch-{w}\ncategory: credential\npaths: [\"/srv/w{w}/creds/*\"]\n---\n"
        );
    }
    for i in 0..WORKLOADS {
        let _ = write!(
            y,
            "kind: Workload\nname: wl-{i}\nowner: team-{}\nidentity_type: service-account\n\
             match: {{host_labels: {{env: prod}}, uid: {}, exe: \"/opt/app{i}/bin/*\"}}\n\
             expect:\n  credentials: [watch-{}]\n  windows: [{{days: [mon, tue, wed, thu, fri], from: \"08:00\", to: \"18:00\", tz: Europe/London}}]\n---\n",
            i % 10,
            2_000 + i,
            i % WATCHES
        );
    }
    y
}

fn event(i: usize, start: DateTime<Utc>) -> Event {
    let wl = i % WORKLOADS;
    let undeclared = i.is_multiple_of(20);
    let off_pattern = i % 10 == 3;
    let watch = if off_pattern { (wl + 1) % WATCHES } else { wl % WATCHES };
    let (uid, exe) = if undeclared {
        (0, "/usr/bin/cat".to_owned())
    } else {
        (2_000 + wl as u32, format!("/opt/app{wl}/bin/server"))
    };
    Event {
        host_id: String::new(),
        seq: 0,
        time: start + chrono::Duration::milliseconds(10 * i as i64),
        count: 1,
        process: Process {
            pid: 10_000 + (i % 5_000) as u32,
            ppid: 1,
            uid,
            euid: uid,
            comm: "server".into(),
            exe,
            cmdline: vec!["server".into(), "--port".into(), "8080".into()],
            systemd_unit: format!("app{wl}.service"),
            ancestors: vec![Ancestor {
                pid: 1,
                exe: "/usr/lib/systemd/systemd".into(),
                comm: "systemd".into(),
            }],
            ..Process::default()
        },
        kind: EventKind::FileAccess {
            watch: format!("watch-{watch}"),
            path: format!("/srv/w{watch}/creds/key"),
            write: false,
            held: false,
        },
        record: Vec::new(),
    }
}

fn main() {
    let n: usize =
        std::env::var("KEYWATCH_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(300_000);
    let start: DateTime<Utc> = "2026-12-01T07:50:00Z".parse().expect("time");
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(start);
    let c = Collector::open(dir.path(), Arc::new(clock)).expect("collector");
    c.registry
        .apply(&[("bench.yaml".into(), registry_yaml())], "bench", false, &|_, _| Ok(()))
        .expect("apply");
    let hosts: Vec<Host> = (0..HOSTS)
        .map(|h| {
            let hello = pb::Hello {
                host_id: format!("web-{h}"),
                labels: [("env".to_owned(), "prod".to_owned())].into_iter().collect(),
                ..Default::default()
            };
            c.ingestor.hello(&hello).expect("hello")
        })
        .collect();

    // Encoded batches, as they arrive off the wire; each batch from one host.
    let mut seqs = [1u64; HOSTS];
    let mut wire: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut bodies: Vec<(String, u64, i64, String)> = Vec::with_capacity(n);
    for (b, chunk_start) in (0..n).step_by(BATCH).enumerate() {
        let h = b % HOSTS;
        let first_seq = seqs[h];
        let events: Vec<pb::Event> = (chunk_start..(chunk_start + BATCH).min(n))
            .enumerate()
            .map(|(k, i)| {
                let mut e = event(i, start);
                e.host_id = hosts[h].id.clone();
                e.seq = first_seq + k as u64;
                bodies.push((
                    e.host_id.clone(),
                    e.seq,
                    e.time.timestamp_nanos_opt().unwrap_or(0),
                    serde_json::to_string(&e).expect("json"),
                ));
                event_to_proto(&e)
            })
            .collect();
        seqs[h] += events.len() as u64;
        let batch = pb::EventBatch { host_id: hosts[h].id.clone(), first_seq, events };
        wire.push((h, batch.encode_to_vec()));
    }
    let wire_bytes: usize = wire.iter().map(|(_, b)| b.len()).sum();

    // Baseline: bare inserts of the same rows, same table shape, 1,000-row transactions.
    let base_dir = tempfile::tempdir().expect("tempdir");
    let conn = rusqlite::Connection::open(base_dir.path().join("bare.db")).expect("sqlite");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL").expect("sync");
    conn.execute_batch(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, host_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ns INTEGER NOT NULL,
         pid INTEGER NOT NULL, kind TEXT NOT NULL, workload TEXT, body TEXT NOT NULL, UNIQUE (host_id, seq));
         CREATE INDEX events_by_host_time ON events (host_id, time_ns, id);",
    )
    .expect("schema");
    let t0 = Instant::now();
    for chunk in bodies.chunks(BATCH) {
        let tx = conn.unchecked_transaction().expect("tx");
        {
            let mut st = tx
                .prepare_cached("INSERT INTO events (host_id, seq, time_ns, pid, kind, workload, body) VALUES (?1, ?2, ?3, 1, 'file-access', NULL, ?4)")
                .expect("prepare");
            for (host, seq, time, body) in chunk {
                st.execute(rusqlite::params![host, *seq as i64, time, body]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let bare = t0.elapsed();

    // The pipeline.
    let t0 = Instant::now();
    let mut alerts_new = 0;
    let mut folded = 0;
    for (h, bytes) in &wire {
        let batch = pb::EventBatch::decode(bytes.as_slice()).expect("decode");
        let report = c.ingestor.ingest(&hosts[*h], batch).expect("ingest");
        alerts_new += report.outcome.new_alerts.len();
        folded += report.outcome.folded_into.len();
    }
    let pipeline = t0.elapsed();

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "ingest: {n} events, {HOSTS} hosts, {WORKLOADS} workloads, {WATCHES} watches, batches of {BATCH}, {} MB on the wire",
        wire_bytes / 1_000_000
    );
    println!(
        "  bare SQLite inserts (same rows, 2 indexes): {:>10.0} events/s  ({:.2?})",
        rate(bare),
        bare
    );
    println!(
        "  decode → correlate → detect → store:         {:>10.0} events/s  ({:.2?})",
        rate(pipeline),
        pipeline
    );
    println!("  ratio pipeline / bare: {:.2}", rate(pipeline) / rate(bare));
    println!("  alerts: {alerts_new} created, {folded} batch folds into existing alerts");

    // Timeline latency for one host.
    let per_host = n / HOSTS;
    let host = "web-3".to_owned();
    let span = chrono::Duration::milliseconds(10 * n as i64);
    let mid = start + span / 2;
    let mut lat = Vec::new();
    for k in 0..200 {
        let from = mid + chrono::Duration::seconds(k);
        let q = TimelineQuery {
            host_id: host.clone(),
            from,
            to: from + chrono::Duration::hours(1),
            pid: None,
            kinds: vec![],
            after: None,
            limit: 500,
        };
        let t0 = Instant::now();
        let page = c.store.timeline(&q).expect("timeline");
        lat.push(t0.elapsed());
        assert!(!page.entries.is_empty() || k > 0, "empty timeline page");
    }
    lat.sort();
    let mut pages = 0;
    let mut rows = 0;
    let mut after = None;
    let t0 = Instant::now();
    loop {
        let q = TimelineQuery {
            host_id: host.clone(),
            from: start,
            to: start + span + chrono::Duration::hours(1),
            pid: None,
            kinds: vec![],
            after,
            limit: 1_000,
        };
        let page = c.store.timeline(&q).expect("timeline");
        pages += 1;
        rows += page.entries.len();
        match page.next {
            Some(n) => after = Some(n.parse().expect("cursor")),
            None => break,
        }
    }
    let full = t0.elapsed();
    println!("timeline: store of {n} events ({per_host} on host {host}), pages of 500 over 1 h:");
    println!(
        "  p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
    println!("  whole host, pages of 1,000: {rows} entries in {pages} pages, {full:.2?}");
    let db = std::fs::metadata(dir.path().join("keywatch.db")).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(dir.path().join("keywatch.db-wal")).map(|m| m.len()).unwrap_or(0);
    println!("  database size {} MB", db / 1_000_000);
}
