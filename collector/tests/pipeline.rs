//! Ingest → store: alert grouping, deduplication, restart, timeline ordering and pagination.

mod common;

use chrono::Duration;
use collector::{
    alerts::AlertStatus,
    auth::{Role, TokenRecord},
    declarations::Kind,
    event::{Event, EventKind},
    rule::Rule,
    store::AlertFilter,
    timeline::TimelineQuery,
};
use common::*;

fn burst(n: usize, start: &str, step_ms: i64) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let mut e = aws(process("/usr/bin/cat", 0), start);
            e.time += Duration::milliseconds(step_ms * i as i64);
            e
        })
        .collect()
}

#[test]
fn a_thousand_identical_accesses_in_a_minute_are_one_alert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _) = collector(dir.path(), "2026-12-01T12:00:00Z");
    let host = c.ingestor.hello(&hello("web-1")).expect("hello");
    // 1,000 reads within 59.94 s, in ten batches so folding happens in the store too.
    let events = burst(1_000, "2026-12-01T12:00:00Z", 60);
    for (i, chunk) in events.chunks(100).enumerate() {
        let report =
            c.ingestor.ingest(&host, batch("web-1", 1 + 100 * i as u64, chunk)).expect("ingest");
        assert_eq!(report.up_to, Some(100 * (i as u64 + 1)));
        assert_eq!(report.outcome.events_stored, 100);
    }
    let alerts = c.store.alerts(&AlertFilter::default()).expect("alerts");
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    assert_eq!((a.rule, a.count, a.status), (Rule::UnknownIdentity, 1_000, AlertStatus::Open));
    assert_eq!(a.first_seen, t("2026-12-01T12:00:00Z"));
    assert_eq!(a.last_seen, t("2026-12-01T12:00:59.940Z"));
    let log = std::fs::read_to_string(dir.path().join("alerts.jsonl")).expect("alerts.jsonl");
    assert_eq!(log.lines().count(), 1, "one new alert, one line");
    assert!(log.contains("\"rule\":\"unknown-identity\""));

    // After the grouping window (1h by default) a repeat is a new alert; so is a repeat after
    // the first is resolved.
    let later = burst(1, "2026-12-01T13:30:00Z", 0);
    c.ingestor.ingest(&host, batch("web-1", 1_001, &later)).expect("ingest");
    assert_eq!(c.store.alerts(&AlertFilter::default()).expect("alerts").len(), 2);
    let newest = c.store.alerts(&AlertFilter::default()).expect("alerts")[0].id;
    c.store
        .transition(newest, AlertStatus::Resolved, "tester", None, t("2026-12-01T13:31:00Z"))
        .expect("resolve");
    let again = burst(1, "2026-12-01T13:35:00Z", 0);
    c.ingestor.ingest(&host, batch("web-1", 1_002, &again)).expect("ingest");
    let all = c.store.alerts(&AlertFilter::default()).expect("alerts");
    assert_eq!(all.iter().map(|a| a.count).collect::<Vec<_>>(), vec![1, 1, 1_000]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("alerts.jsonl")).expect("log").lines().count(),
        3
    );
}

#[test]
fn sensor_folded_counts_add_up_and_duplicates_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _) = collector(dir.path(), "2026-12-01T12:00:00Z");
    let host = c.ingestor.hello(&hello("web-1")).expect("hello");
    let mut events = burst(3, "2026-12-01T12:00:00Z", 1_000);
    events[1].count = 40;
    let b = batch("web-1", 10, &events);
    let first = c.ingestor.ingest(&host, b.clone()).expect("ingest");
    assert_eq!((first.outcome.events_stored, first.duplicates), (3, 0));
    let resent = c.ingestor.ingest(&host, b).expect("resend");
    assert_eq!((resent.up_to, resent.outcome.events_stored, resent.duplicates), (Some(12), 0, 3));
    let alerts = c.store.alerts(&AlertFilter::default()).expect("alerts");
    assert_eq!(
        alerts.iter().map(|a| a.count).collect::<Vec<_>>(),
        vec![42],
        "the resend changed nothing"
    );
    // Same seqs from another host are other events.
    let other = c.ingestor.hello(&hello("web-2")).expect("hello");
    let r = c.ingestor.ingest(&other, batch("web-2", 10, &events)).expect("ingest");
    assert_eq!(r.outcome.events_stored, 3);
}

#[test]
fn a_new_spool_starts_its_seqs_again_and_nothing_of_it_is_taken_for_a_resend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _) = collector(dir.path(), "2026-12-01T12:00:00Z");
    let spool = |id: &str| {
        c.ingestor.hello(&keywatch_proto::v1::Hello { spool_id: id.into(), ..hello("web-1") })
    };
    let old = spool("00112233445566778899aabbccddeeff").expect("hello");
    let events = burst(5, "2026-12-01T12:00:00Z", 1_000);
    let r = c.ingestor.ingest(&old, batch("web-1", 1, &events)).expect("ingest");
    assert_eq!(r.outcome.events_stored, 5);
    // The host reinstalled: its sensor's new spool numbers from 1 again.
    let new = spool("ffeeddccbbaa99887766554433221100").expect("hello");
    let r = c.ingestor.ingest(&new, batch("web-1", 1, &events[..3])).expect("ingest");
    assert_eq!((r.outcome.events_stored, r.duplicates), (3, 0), "a new spool's events are new");
    // Resends are still found, per spool; a spool's later seqs are stored.
    let r = c.ingestor.ingest(&old, batch("web-1", 4, &events[3..])).expect("resend");
    assert_eq!((r.outcome.events_stored, r.duplicates), (0, 2));
    let r = c.ingestor.ingest(&new, batch("web-1", 3, &events[..3])).expect("overlap");
    assert_eq!((r.up_to, r.outcome.events_stored, r.duplicates), (Some(5), 2, 1));
    assert_eq!(c.store.stored_up_to("web-1", "ffeeddccbbaa99887766554433221100").unwrap(), 5);
    let page = c
        .store
        .timeline(&TimelineQuery { kinds: vec!["file-access".into()], ..query("web-1", 100, None) })
        .expect("timeline");
    let seqs: Vec<Option<u64>> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 10, "{seqs:?}");
    // A spool id that is not one is refused with the field named.
    let err = spool("../../etc").expect_err("bad spool id");
    assert!(err.to_string().contains("spool_id"), "{err}");
}

#[test]
fn the_store_keeps_the_record_the_sensor_sent() {
    use prost::Message as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _) = collector(dir.path(), "2026-12-01T12:00:00Z");
    let host = c.ingestor.hello(&hello("web-1")).expect("hello");
    let mut b = batch("web-1", 1, &burst(1, "2026-12-01T12:00:00Z", 0));
    // Fields the collector's model has no place for: device, inode, open flags, cgroup.
    let Some(keywatch_proto::v1::event::Kind::FileAccess(f)) = &mut b.events[0].kind else {
        panic!("a file access");
    };
    (f.dev, f.ino, f.flags) = (2049, 131_077, 0o2);
    b.events[0].process.as_mut().unwrap().cgroup_path = "/system.slice/cat.service".into();
    let sent = b.events[0].clone();
    c.ingestor.ingest(&host, b).expect("ingest");
    let db = rusqlite::Connection::open(dir.path().join("keywatch.db")).expect("db");
    let body: Vec<u8> = db.query_row("SELECT body FROM events", [], |r| r.get(0)).expect("row");
    assert_eq!(keywatch_proto::v1::Event::decode(body.as_slice()).expect("decode"), sent);
    // The timeline reads it back.
    let page = c
        .store
        .timeline(&TimelineQuery { kinds: vec!["file-access".into()], ..query("web-1", 10, None) })
        .expect("timeline");
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].process.exe, "/usr/bin/cat");
    assert!(page.entries[0].summary.contains(".aws/credentials"), "{}", page.entries[0].summary);
}

#[test]
fn a_batch_that_does_not_add_up_is_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _) = collector(dir.path(), "2026-12-01T12:00:00Z");
    let host = c.ingestor.hello(&hello("web-1")).expect("hello");
    let mut b = batch("web-1", 1, &burst(3, "2026-12-01T12:00:00Z", 1));
    b.events[2].seq = 9;
    let err = c.ingestor.ingest(&host, b).expect_err("gap");
    assert_eq!(err.to_string(), "batch: event 2 has seq 9, expected 3 (batches are contiguous)");
    let mut b = batch("web-1", 1, &burst(3, "2026-12-01T12:00:00Z", 1));
    b.events[1].count = 0;
    assert_eq!(
        c.ingestor.ingest(&host, b).expect_err("count").to_string(),
        "event seq 2: count must be at least 1"
    );
    let b = batch("web-9", 1, &burst(1, "2026-12-01T12:00:00Z", 1));
    assert!(
        c.ingestor
            .ingest(&host, b)
            .expect_err("host")
            .to_string()
            .contains("differs from the Hello")
    );
    let page = c.store.timeline(&query("web-1", 100, None)).expect("timeline");
    assert!(page.entries.is_empty(), "nothing from refused batches was stored");
}

fn query(host: &str, limit: usize, after: Option<&str>) -> TimelineQuery {
    TimelineQuery {
        host_id: host.into(),
        from: t("2026-01-01T00:00:00Z"),
        to: t("2027-01-01T00:00:00Z"),
        pid: None,
        kinds: vec![],
        after: after.map(|a| a.parse().expect("cursor")),
        limit,
    }
}

#[test]
fn restart_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let alert_id;
    {
        let (c, clock) = collector(dir.path(), "2026-12-01T12:00:00Z");
        let host = c.ingestor.hello(&hello("web-1")).expect("hello");
        // A declared read (activity), an undeclared read (alert), an exec.
        let mut exec = aws(payments(), "2026-12-01T12:00:02Z");
        exec.kind = EventKind::Exec { filename: "/usr/bin/cat".into(), argv: vec!["cat".into()] };
        let events = vec![
            aws(payments(), "2026-12-01T12:00:00Z"),
            aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:01Z"),
            exec,
        ];
        c.ingestor.ingest(&host, batch("web-1", 1, &events)).expect("ingest");
        alert_id = c.store.alerts(&AlertFilter::default()).expect("alerts")[0].id;
        clock.advance(Duration::minutes(5));
        c.store
            .transition(
                alert_id,
                AlertStatus::Acknowledged,
                "alice (responder)",
                Some("looking".into()),
                clock.now_for_test(),
            )
            .expect("ack");
        let token = TokenRecord {
            id: 0,
            name: "ci".into(),
            role: Role::Owner,
            team: Some("team-payments".into()),
            created: clock.now_for_test(),
            expires: None,
        };
        c.store.put_token(&token, "abc123").expect("token");
    }
    let (c, _) = collector(dir.path(), "2026-12-02T12:00:00Z");
    let snap = c.registry.snapshot();
    assert!(snap.workload("payments-api").is_some());
    assert_eq!(snap.of_kind(Kind::Watch).len(), 4);
    assert_eq!(
        c.store.history(Kind::Workload, "payments-api", 5).expect("history").len(),
        1,
        "no re-apply happened"
    );
    let host = c.store.host("web-1").expect("host").expect("stored host");
    assert_eq!(host.labels.get("env").map(String::as_str), Some("prod"));
    let page = c.store.timeline(&query("web-1", 100, None)).expect("timeline");
    let kinds: Vec<&str> = page.entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["file-access", "file-access", "alert", "exec"]);
    assert_eq!(page.entries[0].workload.as_deref(), Some("payments-api"));
    let alert = c.store.alert(alert_id).expect("alert").expect("stored alert");
    assert_eq!(alert.status, AlertStatus::Acknowledged);
    assert_eq!(alert.transitions.len(), 1);
    assert_eq!(alert.transitions[0].actor, "alice (responder)");
    assert_eq!(alert.transitions[0].note.as_deref(), Some("looking"));
    assert_eq!(
        c.store.token("abc123").expect("token").map(|t| (t.role, t.team)),
        Some((Role::Owner, Some("team-payments".into())))
    );
    assert_eq!(
        c.store.activity().expect("activity").get("payments-api"),
        Some(&t("2026-12-01T12:00:00Z"))
    );
    // Dedup survives the restart.
    let host = c.ingestor.hello(&hello("web-1")).expect("hello");
    let r = c
        .ingestor
        .ingest(
            &host,
            batch("web-1", 1, &[aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:01Z")]),
        )
        .expect("ingest");
    assert_eq!((r.outcome.events_stored, r.duplicates), (0, 1));
}

#[test]
fn timeline_pages_are_stable_under_equal_timestamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (c, _) = collector(dir.path(), "2026-12-01T12:00:00Z");
    let host = c.ingestor.hello(&hello("web-1")).expect("hello");
    // 30 events at the very same nanosecond (10 of them raise one folded alert), then 5 later.
    let same = "2026-12-01T12:00:00Z";
    let mut events = Vec::new();
    for i in 0..30u32 {
        let mut p = payments();
        p.pid = 1_000 + i;
        let mut e = aws(p, same);
        if i % 3 == 0 {
            e.process.exe = "/usr/bin/cat".into();
            e.process.uid = 0;
        } else {
            e.kind = EventKind::Exec { filename: "/bin/true".into(), argv: vec![] };
        }
        events.push(e);
    }
    events.extend(burst(5, "2026-12-01T12:00:01Z", 0));
    // Two batches so row ids interleave with the alert's id.
    c.ingestor.ingest(&host, batch("web-1", 1, &events[..20])).expect("ingest");
    c.ingestor.ingest(&host, batch("web-1", 21, &events[20..])).expect("ingest");

    let whole = c.store.timeline(&query("web-1", 1_000, None)).expect("timeline");
    assert_eq!(whole.entries.len(), 36, "35 events and 1 alert");
    assert!(whole.next.is_none());
    let keys: Vec<(i64, u8, i64)> = whole
        .entries
        .iter()
        .map(|e| (e.time.timestamp_nanos_opt().unwrap_or(0), u8::from(e.source == "alert"), e.id))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "ordered by (time, source, id)");
    assert_eq!(whole.entries[30].kind, "alert", "the alert sorts after the events of its instant");

    for page_size in [1, 7, 35] {
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page =
                c.store.timeline(&query("web-1", page_size, after.as_deref())).expect("page");
            assert!(page.entries.len() <= page_size);
            seen.extend(page.entries.iter().map(|e| (e.source.clone(), e.id)));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let expected: Vec<(String, i64)> =
            whole.entries.iter().map(|e| (e.source.clone(), e.id)).collect();
        assert_eq!(seen, expected, "page size {page_size}");
    }

    // Filters.
    let mut q = query("web-1", 100, None);
    q.pid = Some(1_003);
    let by_pid = c.store.timeline(&q).expect("pid");
    assert_eq!(by_pid.entries.iter().map(|e| e.pid).collect::<Vec<_>>(), vec![1_003]);
    let mut q = query("web-1", 100, None);
    q.kinds = vec!["alert".into()];
    assert_eq!(c.store.timeline(&q).expect("alerts").entries.len(), 1);
    let mut q = query("web-1", 100, None);
    q.kinds = vec!["exec".into()];
    assert_eq!(c.store.timeline(&q).expect("exec").entries.len(), 20);
    let mut q = query("web-1", 100, None);
    q.from = t("2026-12-01T12:00:01Z");
    assert_eq!(c.store.timeline(&q).expect("range").entries.len(), 5);
    assert!(collector::timeline::render_table(&whole.entries).lines().all(|l| !l.is_empty()));
}

trait NowForTest {
    fn now_for_test(&self) -> chrono::DateTime<chrono::Utc>;
}

impl NowForTest for collector::clock::ManualClock {
    fn now_for_test(&self) -> chrono::DateTime<chrono::Utc> {
        use collector::clock::Clock as _;
        self.now()
    }
}

#[test]
fn host_workloads_follow_stored_events_through_retention() {
    use collector::store::{Store as _, WriteBatch, sqlite::SqliteStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).expect("store");
    let at = |seq: u64, time: &str, host: &str| {
        let mut e = aws(process("/usr/bin/cat", 0), time);
        e.host_id = host.into();
        e.seq = seq;
        e
    };
    let write = |events: Vec<(Event, Option<String>)>| {
        store.write_batch(WriteBatch { events, ..WriteBatch::default() }).expect("write")
    };
    write(vec![
        (at(1, "2026-12-01T10:00:00Z", "web-1"), Some("old".into())),
        (at(2, "2026-12-01T10:00:00Z", "web-1"), Some("both".into())),
        (at(3, "2026-12-01T12:00:00Z", "web-1"), Some("both".into())),
        (at(4, "2026-12-01T12:00:00Z", "web-1"), None),
        (at(1, "2026-12-01T12:00:00Z", "web-2"), Some("other-host".into())),
    ]);
    // A duplicate (host, seq) is not stored and does not count.
    let again = write(vec![(at(4, "2026-12-01T13:00:00Z", "web-1"), Some("dup".into()))]);
    assert_eq!(again.events_stored, 0);
    assert_eq!(store.host_workloads("web-1").expect("workloads"), ["both", "old"]);
    assert_eq!(store.host_workloads("web-2").expect("workloads"), ["other-host"]);
    store.prune("2026-12-01T11:00:00Z".parse().expect("time")).expect("prune");
    assert_eq!(store.host_workloads("web-1").expect("workloads"), ["both"]);
    store.prune("2026-12-01T12:00:01Z".parse().expect("time")).expect("prune");
    assert!(store.host_workloads("web-1").expect("workloads").is_empty());
}
