//! Schema migrations over data written by earlier versions.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::{MIGRATIONS, SqliteStore};
use crate::{
    event::{Event, EventKind, Process},
    store::{Store as _, WriteBatch},
    timeline::TimelineQuery,
};

fn at(s: &str) -> DateTime<Utc> {
    s.parse().expect("time")
}

fn event(seq: u64) -> Event {
    Event {
        host_id: "web-1".into(),
        seq,
        time: at("2026-12-01T12:00:00Z") + chrono::Duration::seconds(seq as i64),
        count: 1,
        process: Process {
            pid: 4242,
            uid: 1000,
            comm: "cat".into(),
            exe: "/usr/bin/cat".into(),
            ..Process::default()
        },
        kind: EventKind::FileAccess {
            watch: "aws-credentials".into(),
            path: "/home/dev/.aws/credentials".into(),
            write: false,
            held: false,
        },
        record: Vec::new(),
    }
}

/// A database as version 4 left it: events keyed by host name, JSON bodies.
fn version_4(dir: &std::path::Path) {
    let mut conn = Connection::open(dir.join("keywatch.db")).expect("db");
    let tx = conn.transaction().expect("tx");
    for sql in &MIGRATIONS[..4] {
        tx.execute_batch(sql).expect("migration");
    }
    tx.pragma_update(None, "user_version", 4).expect("version");
    tx.execute(
        "INSERT INTO hosts (id, labels, sensor_version, kernel, first_seen_ns, last_seen_ns)
         VALUES ('web-1', '{}', 'old', '6.18', 0, 0)",
        [],
    )
    .expect("host");
    for seq in 1..=3 {
        let e = event(seq);
        tx.execute(
            "INSERT INTO events (host_id, seq, time_ns, pid, kind, workload, body)
             VALUES ('web-1', ?1, ?2, 4242, 'file-access', NULL, ?3)",
            params![
                seq as i64,
                e.time.timestamp_nanos_opt().unwrap(),
                serde_json::to_string(&e).unwrap()
            ],
        )
        .expect("event");
    }
    tx.commit().expect("commit");
}

#[test]
fn events_of_version_4_are_kept_read_and_their_seqs_stay_known() {
    let dir = tempfile::tempdir().expect("tempdir");
    version_4(dir.path());
    let store = SqliteStore::open(dir.path()).expect("open and migrate");

    // The old seqs form the host's spool '' (sensors from before spool ids).
    assert_eq!(store.stored_up_to("web-1", "").unwrap(), 3);
    assert_eq!(store.stored_up_to("web-1", "0123456789abcdef0123456789abcdef").unwrap(), 0);
    assert_eq!(store.known_seqs("web-1", 1..=10).unwrap(), [1, 2, 3].into_iter().collect());

    // A resend of seq 3 is dropped; seq 4 is stored after it, as the sensor's record.
    let batch =
        WriteBatch { events: vec![(event(3), None), (event(4), None)], ..WriteBatch::default() };
    assert_eq!(store.write_batch(batch).unwrap().events_stored, 1);

    let page = store
        .timeline(&TimelineQuery {
            host_id: "web-1".into(),
            from: at("2026-12-01T00:00:00Z"),
            to: at("2026-12-02T00:00:00Z"),
            pid: None,
            kinds: vec![],
            after: None,
            limit: 100,
        })
        .expect("timeline");
    let seqs: Vec<Option<u64>> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![Some(1), Some(2), Some(3), Some(4)]);
    // JSON rows and protobuf rows read alike.
    assert!(page.entries.iter().all(|e| e.process.exe == "/usr/bin/cat" && e.pid == 4242));
    assert_eq!(page.entries[0].summary, page.entries[3].summary);
}
