//! The embedded store: SQLite in WAL mode, versioned migrations, one writer thread that groups
//! whatever writes are waiting into a single transaction, and a small pool of read connections.

use std::{
    collections::{HashMap, HashSet},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::{Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension as _, params};

use super::{
    AlertFilter, ApiTokenRow, ClaimedDelivery, DeclarationChange, DueEscalation, Store, StoreError,
    StoredDeclaration, WriteBatch, WriteOutcome,
};
use crate::{
    alerts::{Alert, AlertStatus, Transition},
    audit::{Actor, AuditFilter, AuditRecord},
    auth::{Role, TokenRecord},
    correlate::RevisionRef,
    declarations::Kind,
    event::{Event, Host},
    hosts::{self, Enrollment, Gap, HeartbeatRecord, HostSummary, JoinRefusal, JoinToken},
    route::{self, NewDelivery, Reason, Routing, Sink},
    timeline::{Cursor, TimelineEntry, TimelinePage, TimelineQuery},
};

/// Schema migrations; `PRAGMA user_version` holds how many are applied. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "
    CREATE TABLE declarations (
        kind TEXT NOT NULL, name TEXT NOT NULL, revision INTEGER NOT NULL, spec TEXT NOT NULL,
        PRIMARY KEY (kind, name));
    CREATE TABLE revisions (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, action TEXT NOT NULL,
        author TEXT NOT NULL, time_ns INTEGER NOT NULL, spec TEXT, diff TEXT NOT NULL);
    CREATE INDEX revisions_by_object ON revisions (kind, name, id);
    CREATE TABLE hosts (
        id TEXT PRIMARY KEY, labels TEXT NOT NULL, sensor_version TEXT NOT NULL, kernel TEXT NOT NULL,
        first_seen_ns INTEGER NOT NULL, last_seen_ns INTEGER NOT NULL);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY, host_id TEXT NOT NULL, seq INTEGER NOT NULL, time_ns INTEGER NOT NULL,
        pid INTEGER NOT NULL, kind TEXT NOT NULL, workload TEXT, body TEXT NOT NULL,
        UNIQUE (host_id, seq));
    CREATE INDEX events_by_host_time ON events (host_id, time_ns, id);
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY, group_key TEXT NOT NULL, rule TEXT NOT NULL, severity TEXT NOT NULL,
        status TEXT NOT NULL, workload TEXT NOT NULL, owner TEXT NOT NULL, host_id TEXT NOT NULL,
        pid INTEGER NOT NULL, first_seen_ns INTEGER NOT NULL, last_seen_ns INTEGER NOT NULL,
        count INTEGER NOT NULL, body TEXT NOT NULL);
    CREATE INDEX alerts_by_group ON alerts (group_key, last_seen_ns);
    CREATE INDEX alerts_by_host_time ON alerts (host_id, first_seen_ns, id);
    CREATE TABLE alert_transitions (
        id INTEGER PRIMARY KEY, alert_id INTEGER NOT NULL REFERENCES alerts (id), time_ns INTEGER NOT NULL,
        actor TEXT NOT NULL, from_status TEXT NOT NULL, to_status TEXT NOT NULL, note TEXT);
    CREATE INDEX transitions_by_alert ON alert_transitions (alert_id, id);
    CREATE TABLE activity (workload TEXT PRIMARY KEY, last_seen_ns INTEGER NOT NULL);
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL, role TEXT NOT NULL,
        team TEXT, created_ns INTEGER NOT NULL, revoked_ns INTEGER);
    ",
    // 2: enrollment (join tokens, enrolled hosts), heartbeats and gaps.
    "
    CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY, hash TEXT NOT NULL, role TEXT NOT NULL, labels TEXT NOT NULL,
        created_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL, uses_left INTEGER NOT NULL,
        creator TEXT NOT NULL, revoked_ns INTEGER);
    CREATE TABLE enrollments (
        host_id TEXT PRIMARY KEY, serial TEXT NOT NULL, labels TEXT NOT NULL,
        enrolled_ns INTEGER NOT NULL, enrolled_by TEXT NOT NULL, revoked_ns INTEGER);
    CREATE TABLE heartbeats (
        host_id TEXT PRIMARY KEY, time_ns INTEGER NOT NULL, body TEXT NOT NULL);
    CREATE TABLE gaps (
        id INTEGER PRIMARY KEY, host_id TEXT NOT NULL, time_ns INTEGER NOT NULL,
        cause TEXT NOT NULL, lost INTEGER NOT NULL);
    CREATE INDEX gaps_by_host_time ON gaps (host_id, time_ns, id);
    ",
    // 3: token expiry, audit trail, delivery outbox, escalation timers.
    "
    ALTER TABLE tokens ADD COLUMN expires_ns INTEGER;
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, kind TEXT NOT NULL, actor TEXT NOT NULL,
        object TEXT NOT NULL, revision INTEGER, details TEXT NOT NULL);
    CREATE INDEX audit_by_time ON audit (time_ns, id);
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY, delivery_id TEXT NOT NULL UNIQUE, alert_id INTEGER, team TEXT NOT NULL,
        reason TEXT NOT NULL, sink TEXT NOT NULL, payload TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'delivered')),
        attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, next_attempt_ns INTEGER NOT NULL,
        created_ns INTEGER NOT NULL, delivered_ns INTEGER);
    CREATE INDEX deliveries_due ON deliveries (state, next_attempt_ns);
    CREATE INDEX deliveries_by_alert ON deliveries (alert_id, id);
    CREATE TABLE escalations (
        id INTEGER PRIMARY KEY, alert_id INTEGER NOT NULL REFERENCES alerts (id),
        from_team TEXT NOT NULL, to_team TEXT NOT NULL, level INTEGER NOT NULL,
        due_ns INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'fired', 'cancelled')), done_ns INTEGER);
    CREATE INDEX escalations_due ON escalations (state, due_ns);
    CREATE INDEX events_by_host_workload ON events (host_id, workload);
    ",
    // 4: the workloads each host's stored events were correlated to, as a summary kept with
    // the events (latest event time per pair, so retention drops a pair with its last event)
    // instead of an index every event insert had to update at one of host × workload places.
    "
    CREATE TABLE host_workloads (
        host_id TEXT NOT NULL, workload TEXT NOT NULL, last_event_ns INTEGER NOT NULL,
        PRIMARY KEY (host_id, workload)) WITHOUT ROWID;
    INSERT INTO host_workloads (host_id, workload, last_event_ns)
        SELECT host_id, workload, max(time_ns) FROM events WHERE workload IS NOT NULL
        GROUP BY host_id, workload;
    DROP INDEX events_by_host_workload;
    ",
    // 5: events keyed by an integer host key (integer compares in the index every insert
    // updates), resends found by a seq watermark per (host, sensor spool) instead of a unique
    // (host_id, seq) index, and bodies that are the sensor's own records (protobuf; rows of
    // earlier versions keep their JSON text). Existing seqs form each host's spool ''.
    "
    CREATE TABLE host_keys (key INTEGER PRIMARY KEY, host_id TEXT NOT NULL UNIQUE);
    INSERT INTO host_keys (host_id) SELECT id FROM hosts UNION SELECT host_id FROM events;
    CREATE TABLE seq_watermarks (
        host INTEGER NOT NULL, spool_id TEXT NOT NULL, stored_up_to INTEGER NOT NULL,
        PRIMARY KEY (host, spool_id)) WITHOUT ROWID;
    INSERT INTO seq_watermarks (host, spool_id, stored_up_to)
        SELECT k.key, '', max(e.seq) FROM events e JOIN host_keys k ON k.host_id = e.host_id
        GROUP BY k.key;
    CREATE TABLE events_v5 (
        id INTEGER PRIMARY KEY, host INTEGER NOT NULL, seq INTEGER NOT NULL,
        time_ns INTEGER NOT NULL, pid INTEGER NOT NULL, kind TEXT NOT NULL, workload TEXT,
        body NOT NULL);
    INSERT INTO events_v5 (id, host, seq, time_ns, pid, kind, workload, body)
        SELECT e.id, k.key, e.seq, e.time_ns, e.pid, e.kind, e.workload, e.body
        FROM events e JOIN host_keys k ON k.host_id = e.host_id;
    DROP TABLE events;
    ALTER TABLE events_v5 RENAME TO events;
    CREATE INDEX events_by_host_time ON events (host, time_ns, id);
    ",
];

/// Escalation chains longer than this stop (loops are refused at apply; this is a backstop).
const MAX_ESCALATION_LEVEL: u32 = 16;

fn insert_delivery(
    conn: &Connection,
    d: &NewDelivery,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO deliveries (delivery_id, alert_id, team, reason, sink, payload, state, next_attempt_ns, created_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7)",
    )?
    .execute(params![
        d.delivery_id,
        d.alert_id,
        d.team,
        d.reason.as_str(),
        serde_json::to_string(&d.sink)?,
        serde_json::to_string(&d.payload)?,
        ns(at)
    ])?;
    Ok(())
}

fn insert_audit(conn: &Connection, r: &AuditRecord) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit (time_ns, kind, actor, object, revision, details) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        ns(r.time),
        r.kind,
        serde_json::to_string(&r.actor)?,
        r.object,
        r.revision,
        serde_json::to_string(&r.details)?
    ])?;
    Ok(())
}

/// Outbox rows of an alert, plus its teams without a route, as the alert shows them.
fn routing(conn: &Connection, alert: &Alert) -> Result<Vec<Routing>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT team, reason, sink, state, attempts, last_error, delivered_ns, next_attempt_ns, delivery_id
         FROM deliveries WHERE alert_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([alert.id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, Option<i64>>(6)?,
            r.get::<_, i64>(7)?,
            r.get::<_, String>(8)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (team, reason, sink, state, attempts, last_error, delivered, next, delivery_id) = row?;
        let sink: Sink = serde_json::from_str(&sink)?;
        let pending = state == "pending";
        out.push(Routing {
            team,
            reason: Reason::parse(&reason).unwrap_or(Reason::Owner),
            target: sink.describe(),
            status: state,
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            last_error,
            delivered_at: delivered.map(from_ns),
            next_attempt_at: pending.then(|| from_ns(next)),
            delivery_id: Some(delivery_id),
        });
    }
    for rt in &alert.routes {
        if !out.iter().any(|r| r.team == rt.team) {
            out.push(Routing {
                team: rt.team.clone(),
                reason: rt.reason,
                target: "none".into(),
                status: "no-route".into(),
                attempts: 0,
                last_error: None,
                delivered_at: None,
                next_attempt_at: None,
                delivery_id: None,
            });
        }
    }
    Ok(out)
}

/// The columns of one event row, encoded before it reaches the writer.
struct EventRow {
    host_id: String,
    seq: u64,
    time_ns: i64,
    pid: u32,
    kind: &'static str,
    workload: Option<String>,
    /// The sensor's record (protobuf `keywatch.v1.Event`).
    body: Vec<u8>,
}

/// Where a host's spool stands in one write: its host key, and the highest seq stored.
struct SeqSpace {
    host: i64,
    stored_up_to: u64,
    /// Whether this write stored past the watermark it read.
    advanced: bool,
}

/// The integer key of `host_id`, if it has one.
fn find_host_key(conn: &Connection, host_id: &str) -> Result<Option<i64>, rusqlite::Error> {
    conn.prepare_cached("SELECT key FROM host_keys WHERE host_id = ?1")?
        .query_row([host_id], |r| r.get(0))
        .optional()
}

/// The integer key of `host_id`, made on first use.
fn host_key(conn: &Connection, host_id: &str) -> Result<i64, rusqlite::Error> {
    match find_host_key(conn, host_id)? {
        Some(key) => Ok(key),
        None => {
            conn.prepare_cached("INSERT INTO host_keys (host_id) VALUES (?1)")?
                .execute([host_id])?;
            Ok(conn.last_insert_rowid())
        }
    }
}

/// The highest seq stored from spool `spool_id` of the host with key `host` (0: none).
fn stored_up_to(conn: &Connection, host: i64, spool_id: &str) -> Result<u64, rusqlite::Error> {
    let found: Option<i64> = conn
        .prepare_cached(
            "SELECT stored_up_to FROM seq_watermarks WHERE host = ?1 AND spool_id = ?2",
        )?
        .query_row(params![host, spool_id], |r| r.get(0))
        .optional()?;
    Ok(found.map_or(0, |s| s as u64))
}

/// A JSON body (alerts, gaps).
fn text_body(body: rusqlite::types::Value) -> Result<String, StoreError> {
    match body {
        rusqlite::types::Value::Text(text) => Ok(text),
        other => Err(StoreError::Corrupt(format!("a JSON body of type {:?}", other.data_type()))),
    }
}

/// An event row's body: the sensor's record (protobuf), or JSON from before version 5.
fn decode_event_body(
    host_id: &str,
    body: rusqlite::types::ValueRef<'_>,
) -> Result<Event, StoreError> {
    use rusqlite::types::ValueRef;
    match body {
        ValueRef::Blob(bytes) => {
            let record = <keywatch_proto::v1::Event as prost::Message>::decode(bytes)
                .map_err(|e| StoreError::Corrupt(format!("event record: {e}")))?;
            crate::convert::event_from_proto(host_id, record)
                .map_err(|e| StoreError::Corrupt(format!("event record: {e}")))
        }
        ValueRef::Text(text) => Ok(serde_json::from_slice(text)?),
        other => Err(StoreError::Corrupt(format!("event body of type {:?}", other.data_type()))),
    }
}

/// `value` as JSON, encoded through `scratch` (reused across calls, so it stops regrowing).
fn to_json<T: serde::Serialize>(
    scratch: &mut Vec<u8>,
    value: &T,
) -> Result<String, serde_json::Error> {
    scratch.clear();
    serde_json::to_writer(&mut *scratch, value)?;
    // serde_json writes UTF-8 only: this borrows, then copies once into an exact allocation.
    Ok(String::from_utf8_lossy(scratch).into_owned())
}

/// Writes waiting longer than this many jobs per transaction start a new one.
const MAX_JOBS_PER_TRANSACTION: usize = 64;

type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;
/// A write: given the connection and whether it is alone in its transaction, runs and returns
/// how to answer its caller once the transaction ends, and whether it succeeded.
type Job = Box<dyn FnOnce(&Connection, bool) -> (Finish, bool) + Send>;

/// SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::SyncSender<Job>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<thread::JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
}

fn ns(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

fn from_ns(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(n)
}

fn open_connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Brings the schema up to date, one transaction per migration.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew { found: version, known });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    Ok(())
}

/// The writer checkpoints the WAL itself only past this many pages (16 MiB): the checkpoint
/// thread normally does it long before, off the writer's path, but under a sustained flood the
/// WAL is never wholly copied (so never restarted) while the writer goes on. Bigger bounds make
/// this one checkpoint a long stall (64 MiB: ~100 ms).
const WRITER_CHECKPOINT_PAGES: i64 = 4_096;
/// Checkpoints start at most this often (each one syncs the WAL and the database).
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// Copies committed pages from the WAL into the database (a PASSIVE checkpoint: it never blocks
/// the writer or readers) after commits, at most every [`CHECKPOINT_INTERVAL`], so the writer
/// does not stop to do it at a commit. Ends (after a last checkpoint) when `commits` closes.
fn checkpoint_loop(conn: Connection, commits: mpsc::Receiver<()>) {
    let checkpoint = || {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; the writer will checkpoint itself");
        }
    };
    while commits.recv().is_ok() {
        let started = Instant::now();
        while commits.try_recv().is_ok() {}
        checkpoint();
        thread::sleep(CHECKPOINT_INTERVAL.saturating_sub(started.elapsed()));
    }
    checkpoint();
}

fn writer_loop(conn: Connection, jobs: mpsc::Receiver<Job>, commits: mpsc::SyncSender<()>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_JOBS_PER_TRANSACTION {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let begin = conn.execute_batch("BEGIN IMMEDIATE");
        // A job alone in its transaction needs no savepoint (whose statement journal copies
        // every page the job touches first): if it fails, the whole transaction rolls back.
        let alone = batch.len() == 1 && begin.is_ok();
        let mut all_ok = true;
        let finishes: Vec<Finish> = batch
            .into_iter()
            .map(|job| {
                let (finish, ok) = job(&conn, alone);
                all_ok &= ok;
                finish
            })
            .collect();
        let result = match begin {
            Err(e) => Err(e.to_string()),
            // Rolled back below; the job answers with its own error.
            Ok(()) if !all_ok && alone => Err("the transaction's only write failed".to_owned()),
            Ok(()) => conn.execute_batch("COMMIT").map_err(|e| e.to_string()),
        };
        if result.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        // Wakes the checkpoint thread (unless already woken).
        let _ = commits.try_send(());
        for finish in finishes {
            finish(result.clone());
        }
    }
}

impl SqliteStore {
    /// Opens (creating when needed) `DIR/keywatch.db` and migrates it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("keywatch.db");
        let mut conn = open_connection(&path)?;
        migrate(&mut conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
        let checkpoint_conn = open_connection(&path)?;
        let (commits_tx, commits_rx) = mpsc::sync_channel::<()>(1);
        let checkpointer = thread::Builder::new()
            .name("keywatch-store-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_conn, commits_rx))?;
        let (tx, rx) = mpsc::sync_channel::<Job>(1_024);
        let writer = thread::Builder::new()
            .name("keywatch-store-writer".into())
            .spawn(move || writer_loop(conn, rx, commits_tx))?;
        Ok(Self {
            path,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some(checkpointer)),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` on the writer inside the next transaction; returns once that transaction has
    /// committed (or failed).
    fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let (done_tx, done_rx) = mpsc::sync_channel::<Result<R, StoreError>>(1);
        let job: Job = Box::new(move |conn: &Connection, alone: bool| {
            let result = if alone {
                f(conn)
            } else {
                match conn.execute_batch("SAVEPOINT job") {
                    Err(e) => Err(StoreError::from(e)),
                    Ok(()) => match f(conn) {
                        Ok(v) => {
                            conn.execute_batch("RELEASE job").map(|()| v).map_err(StoreError::from)
                        }
                        Err(e) => {
                            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
                            Err(e)
                        }
                    },
                }
            };
            let ok = result.is_ok();
            let finish: Finish = Box::new(move |commit: Result<(), String>| {
                let outcome = match (result, commit) {
                    (Ok(v), Ok(())) => Ok(v),
                    (Err(e), _) => Err(e),
                    (Ok(_), Err(e)) => Err(StoreError::Conflict(format!("commit failed: {e}"))),
                };
                let _ = done_tx.send(outcome);
            });
            (finish, ok)
        });
        let sender = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Closed)?;
        sender.send(job).map_err(|_| StoreError::Closed)?;
        done_rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a pooled read connection.
    fn read<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(c) => c,
            None => open_connection(&self.path)?,
        };
        let result = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        result
    }

    /// Stops the writer after the queued writes; later writes fail with [`StoreError::Closed`].
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
        // The writer's end closed its side: a last checkpoint, then the thread ends.
        if let Some(handle) = self.checkpointer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn revision_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RevisionRef> {
    Ok(RevisionRef {
        revision: r.get(0)?,
        author: r.get(1)?,
        time: from_ns(r.get(2)?),
        action: r.get(3)?,
        diff: r.get(4)?,
    })
}

fn alert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, i64, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
}

const ALERT_COLUMNS: &str = "body, status, first_seen_ns, last_seen_ns, count, id";

fn decode_alert(
    conn: &Connection,
    row: (String, String, i64, i64, i64, i64),
    with_transitions: bool,
) -> Result<Alert, StoreError> {
    let (body, status, first, last, count, id) = row;
    let mut alert: Alert = serde_json::from_str(&body)?;
    alert.id = id;
    alert.status = AlertStatus::parse(&status).unwrap_or(AlertStatus::Open);
    alert.first_seen = from_ns(first);
    alert.last_seen = from_ns(last);
    alert.count = count as u64;
    alert.routed_to = routing(conn, &alert)?;
    if with_transitions {
        let mut stmt = conn.prepare_cached(
            "SELECT time_ns, actor, from_status, to_status, note FROM alert_transitions WHERE alert_id = ?1 ORDER BY id",
        )?;
        alert.transitions = stmt
            .query_map([id], |r| {
                Ok(Transition {
                    time: from_ns(r.get(0)?),
                    actor: r.get(1)?,
                    from: AlertStatus::parse(&r.get::<_, String>(2)?).unwrap_or(AlertStatus::Open),
                    to: AlertStatus::parse(&r.get::<_, String>(3)?).unwrap_or(AlertStatus::Open),
                    note: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
    }
    Ok(alert)
}

fn get_alert(conn: &Connection, id: i64) -> Result<Option<Alert>, StoreError> {
    let row = conn
        .query_row(&format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?1"), [id], alert_row)
        .optional()?;
    row.map(|row| decode_alert(conn, row, true)).transpose()
}

const ENROLLMENT_SELECT: &str =
    "SELECT host_id, serial, labels, enrolled_ns, enrolled_by, revoked_ns FROM enrollments";

/// An enrollment and its labels still as JSON.
fn enrollment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Enrollment, String)> {
    Ok((
        Enrollment {
            host_id: r.get(0)?,
            serial: r.get(1)?,
            labels: Default::default(),
            enrolled_at: from_ns(r.get(3)?),
            enrolled_by: r.get(4)?,
            revoked: r.get::<_, Option<i64>>(5)?.map(from_ns),
        },
        r.get(2)?,
    ))
}

/// A join token and its labels still as JSON.
fn join_token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(JoinToken, String)> {
    Ok((
        JoinToken {
            id: r.get(0)?,
            role: r.get(1)?,
            labels: Default::default(),
            created: from_ns(r.get(3)?),
            expires: from_ns(r.get(4)?),
            uses_left: u32::try_from(r.get::<_, i64>(5)?.max(0)).unwrap_or(u32::MAX),
            creator: r.get(6)?,
            revoked: r.get::<_, Option<i64>>(7)?.map(from_ns),
        },
        r.get(2)?,
    ))
}

impl Store for SqliteStore {
    fn declarations(&self) -> Result<Vec<StoredDeclaration>, StoreError> {
        self.read(|conn| {
            let mut stmt =
                conn.prepare("SELECT spec, revision FROM declarations ORDER BY kind, name")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (spec, revision) = row?;
                out.push(StoredDeclaration { declaration: serde_json::from_str(&spec)?, revision });
            }
            Ok(out)
        })
    }

    fn commit_declarations(
        &self,
        changes: Vec<DeclarationChange>,
        author: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<RevisionRef>, StoreError> {
        let author = author.to_owned();
        self.write(move |conn| {
            let mut out = Vec::new();
            for c in changes {
                let spec = c.new.as_ref().map(serde_json::to_string).transpose()?;
                let action = match (&c.new, conn.query_row(
                    "SELECT 1 FROM declarations WHERE kind = ?1 AND name = ?2",
                    params![c.kind.as_str(), c.name],
                    |_| Ok(()),
                ).optional()?) {
                    (None, None) => return Err(StoreError::NotFound(format!("{} {}", c.kind, c.name))),
                    (None, Some(())) => "delete",
                    (Some(_), None) => "create",
                    (Some(_), Some(())) => "update",
                };
                conn.execute(
                    "INSERT INTO revisions (kind, name, action, author, time_ns, spec, diff) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![c.kind.as_str(), c.name, action, author, ns(at), spec, c.diff],
                )?;
                let revision = conn.last_insert_rowid();
                match spec {
                    Some(spec) => conn.execute(
                        "INSERT INTO declarations (kind, name, revision, spec) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (kind, name) DO UPDATE SET revision = excluded.revision, spec = excluded.spec",
                        params![c.kind.as_str(), c.name, revision, spec],
                    )?,
                    None => conn.execute(
                        "DELETE FROM declarations WHERE kind = ?1 AND name = ?2",
                        params![c.kind.as_str(), c.name],
                    )?,
                };
                out.push(RevisionRef { revision, author: author.clone(), time: at, action: action.into(), diff: c.diff });
            }
            Ok(out)
        })
    }

    fn history(
        &self,
        kind: Kind,
        name: &str,
        limit: usize,
    ) -> Result<Vec<RevisionRef>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, author, time_ns, action, diff FROM revisions WHERE kind = ?1 AND name = ?2 ORDER BY id DESC LIMIT ?3",
            )?;
            Ok(stmt.query_map(params![kind.as_str(), name, limit as i64], revision_row)?.collect::<Result<_, _>>()?)
        })
    }

    fn workload_revisions(
        &self,
        per_workload: usize,
    ) -> Result<HashMap<String, Vec<RevisionRef>>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, author, time_ns, action, diff, name FROM revisions WHERE kind = 'Workload' ORDER BY name, id DESC",
            )?;
            let mut out: HashMap<String, Vec<RevisionRef>> = HashMap::new();
            let mut first: HashMap<String, RevisionRef> = HashMap::new();
            let rows = stmt.query_map([], |r| Ok((revision_row(r)?, r.get::<_, String>(5)?)))?;
            for row in rows {
                let (rev, name) = row?;
                let list = out.entry(name.clone()).or_default();
                if list.len() < per_workload {
                    list.push(rev);
                } else {
                    // Keep the oldest too: the registry takes it as the declaration time.
                    first.insert(name, rev);
                }
            }
            for (name, rev) in first {
                if let Some(list) = out.get_mut(&name) {
                    list.push(rev);
                }
            }
            Ok(out)
        })
    }

    fn upsert_host(&self, host: &Host, at: DateTime<Utc>) -> Result<(), StoreError> {
        let host = host.clone();
        let labels = serde_json::to_string(&host.labels)?;
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO hosts (id, labels, sensor_version, kernel, first_seen_ns, last_seen_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (id) DO UPDATE SET labels = excluded.labels, sensor_version = excluded.sensor_version,
                   kernel = excluded.kernel, last_seen_ns = excluded.last_seen_ns",
                params![host.id, labels, host.sensor_version, host.kernel, ns(at)],
            )?;
            Ok(())
        })
    }

    fn host(&self, id: &str) -> Result<Option<Host>, StoreError> {
        self.read(|conn| {
            let row = conn
                .query_row(
                    "SELECT labels, sensor_version, kernel FROM hosts WHERE id = ?1",
                    [id],
                    |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                    },
                )
                .optional()?;
            row.map(|(labels, sensor_version, kernel)| {
                Ok(Host {
                    id: id.to_owned(),
                    labels: serde_json::from_str(&labels)?,
                    sensor_version,
                    kernel,
                    spool_id: String::new(),
                })
            })
            .transpose()
        })
    }

    fn stored_up_to(&self, host_id: &str, spool_id: &str) -> Result<u64, StoreError> {
        self.read(|conn| match find_host_key(conn, host_id)? {
            Some(host) => Ok(stored_up_to(conn, host, spool_id)?),
            None => Ok(0),
        })
    }

    fn known_seqs(
        &self,
        host_id: &str,
        seqs: RangeInclusive<u64>,
    ) -> Result<HashSet<u64>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT seq FROM events WHERE host = (SELECT key FROM host_keys WHERE host_id = ?1)
                   AND seq BETWEEN ?2 AND ?3",
            )?;
            let rows = stmt
                .query_map(params![host_id, *seqs.start() as i64, *seqs.end() as i64], |r| {
                    r.get::<_, i64>(0)
                })?;
            Ok(rows.map(|r| r.map(|s| s as u64)).collect::<Result<_, _>>()?)
        })
    }

    fn write_batch(&self, batch: WriteBatch) -> Result<WriteOutcome, StoreError> {
        // Rows are made (and the decoded events freed) outside the writer, so the single
        // writer only does database work.
        let events: Vec<EventRow> = batch
            .events
            .into_iter()
            .map(|(e, workload)| EventRow {
                body: if e.record.is_empty() {
                    prost::Message::encode_to_vec(&crate::convert::event_to_proto(&e))
                } else {
                    e.record
                },
                seq: e.seq,
                time_ns: ns(e.time),
                pid: e.process.pid,
                kind: e.kind.name(),
                workload,
                host_id: e.host_id,
            })
            .collect();
        let spool_id = batch.spool_id;
        let mut scratch = Vec::with_capacity(1024);
        let alerts: Vec<(Alert, String)> = batch
            .alerts
            .into_iter()
            .map(|a| to_json(&mut scratch, &a).map(|b| (a, b)))
            .collect::<Result<_, _>>()?;
        let window = ns(DateTime::UNIX_EPOCH + batch.grouping_window);
        let activity = batch.activity;
        let (routes, now) = (batch.routes, batch.now);
        self.write(move |conn| {
            let mut outcome = WriteOutcome::default();
            {
                let mut insert = conn.prepare_cached(
                    "INSERT INTO events (host, seq, time_ns, pid, kind, workload, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?;
                // The host's spool as this transaction found it: events at or below its
                // watermark were stored before (a resend after a lost ack).
                let mut spaces: HashMap<&str, SeqSpace> = HashMap::new();
                // Latest stored event per (host, workload) of this batch.
                let mut pairs: HashMap<(&str, &str), i64> = HashMap::new();
                for e in &events {
                    let space = match spaces.entry(&e.host_id) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            let host = host_key(conn, &e.host_id)?;
                            let stored_up_to = stored_up_to(conn, host, &spool_id)?;
                            v.insert(SeqSpace { host, stored_up_to, advanced: false })
                        }
                    };
                    if e.seq <= space.stored_up_to {
                        continue;
                    }
                    insert.execute(params![
                        space.host, e.seq as i64, e.time_ns, e.pid, e.kind, e.workload, e.body
                    ])?;
                    (space.stored_up_to, space.advanced) = (e.seq, true);
                    outcome.events_stored += 1;
                    if let Some(w) = &e.workload {
                        let t = pairs.entry((&e.host_id, w)).or_insert(e.time_ns);
                        *t = (*t).max(e.time_ns);
                    }
                }
                let mut mark = conn.prepare_cached(
                    "INSERT INTO seq_watermarks (host, spool_id, stored_up_to) VALUES (?1, ?2, ?3)
                     ON CONFLICT (host, spool_id) DO UPDATE SET stored_up_to = max(stored_up_to, excluded.stored_up_to)",
                )?;
                for space in spaces.values().filter(|s| s.advanced) {
                    mark.execute(params![space.host, spool_id, space.stored_up_to as i64])?;
                }
                let mut pair = conn.prepare_cached(
                    "INSERT INTO host_workloads (host_id, workload, last_event_ns) VALUES (?1, ?2, ?3)
                     ON CONFLICT (host_id, workload) DO UPDATE SET last_event_ns = max(last_event_ns, excluded.last_event_ns)",
                )?;
                for ((host_id, workload), t) in pairs {
                    pair.execute(params![host_id, workload, t])?;
                }
            }
            {
                let mut upsert = conn.prepare_cached(
                    "INSERT INTO activity (workload, last_seen_ns) VALUES (?1, ?2)
                     ON CONFLICT (workload) DO UPDATE SET last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)",
                )?;
                for (workload, at) in &activity {
                    upsert.execute(params![workload, ns(*at)])?;
                }
            }
            let mut find = conn.prepare_cached(
                "SELECT id FROM alerts WHERE group_key = ?1 AND status != 'resolved' AND last_seen_ns >= ?2
                 ORDER BY last_seen_ns DESC LIMIT 1",
            )?;
            let mut fold = conn.prepare_cached(
                "UPDATE alerts SET count = count + ?2, first_seen_ns = min(first_seen_ns, ?3), last_seen_ns = max(last_seen_ns, ?4)
                 WHERE id = ?1",
            )?;
            let mut insert = conn.prepare_cached(
                "INSERT INTO alerts (group_key, rule, severity, status, workload, owner, host_id, pid, first_seen_ns, last_seen_ns, count, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for (mut alert, body) in alerts {
                let key = alert.group_key();
                let existing: Option<i64> =
                    find.query_row(params![key, ns(alert.first_seen).saturating_sub(window)], |r| r.get(0)).optional()?;
                match existing {
                    Some(id) => {
                        fold.execute(params![id, alert.count as i64, ns(alert.first_seen), ns(alert.last_seen)])?;
                        outcome.folded_into.push(id);
                    }
                    None => {
                        insert.execute(params![
                            key,
                            alert.rule.as_str(),
                            alert.severity.as_str(),
                            alert.status.as_str(),
                            alert.workload,
                            alert.owner,
                            alert.host.id,
                            alert.process.pid,
                            ns(alert.first_seen),
                            ns(alert.last_seen),
                            alert.count as i64,
                            body
                        ])?;
                        alert.id = conn.last_insert_rowid();
                        for rt in &alert.routes {
                            for sink in routes.get(&rt.team).map(|r| r.sinks.as_slice()).unwrap_or_default() {
                                let delivery_id = route::new_delivery_id();
                                let payload = route::alert_body(&delivery_id, &rt.team, rt.reason, &alert, None);
                                let d = NewDelivery {
                                    delivery_id,
                                    alert_id: Some(alert.id),
                                    team: rt.team.clone(),
                                    reason: rt.reason,
                                    sink: sink.clone(),
                                    payload,
                                };
                                insert_delivery(conn, &d, now)?;
                            }
                        }
                        let first = alert.routes.first().map(|r| r.team.as_str()).unwrap_or_default();
                        if let Some((after, to)) = routes.get(first).and_then(|r| r.escalate.as_ref()) {
                            conn.prepare_cached(
                                "INSERT INTO escalations (alert_id, from_team, to_team, level, due_ns, state) VALUES (?1, ?2, ?3, 1, ?4, 'pending')",
                            )?
                            .execute(params![alert.id, first, to, ns(now + *after)])?;
                        }
                        outcome.new_alerts.push(alert);
                    }
                }
            }
            Ok(outcome)
        })
    }

    fn activity(&self) -> Result<HashMap<String, DateTime<Utc>>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare("SELECT workload, last_seen_ns FROM activity")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, from_ns(r.get(1)?))))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError> {
        self.read(|conn| {
            let mut sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1");
            let mut args: Vec<String> = Vec::new();
            for (column, value) in [
                ("status", filter.status.map(|s| s.as_str().to_owned())),
                ("owner", filter.owner.clone()),
                ("rule", filter.rule.clone()),
                ("host_id", filter.host.clone()),
                ("workload", filter.workload.clone()),
            ] {
                if let Some(v) = value {
                    args.push(v);
                    sql.push_str(&format!(" AND {column} = ?{}", args.len()));
                }
            }
            if let Some(team) = &filter.team {
                args.push(team.clone());
                let n = args.len();
                sql.push_str(&format!(
                    " AND (owner = ?{n} \
                     OR EXISTS (SELECT 1 FROM json_each(body, '$.routes') \
                                WHERE json_extract(value, '$.team') = ?{n}) \
                     OR EXISTS (SELECT 1 FROM deliveries d WHERE d.alert_id = alerts.id AND d.team = ?{n}))"
                ));
            }
            let limit = if filter.limit == 0 { 1_000 } else { filter.limit };
            sql.push_str(&format!(" ORDER BY last_seen_ns DESC, id DESC LIMIT {limit}"));
            let mut stmt = conn.prepare(&sql)?;
            let rows: Vec<_> = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), alert_row)?
                .collect::<Result<_, _>>()?;
            rows.into_iter().map(|row| decode_alert(conn, row, false)).collect()
        })
    }

    fn alert(&self, id: i64) -> Result<Option<Alert>, StoreError> {
        self.read(|conn| get_alert(conn, id))
    }

    fn transition(
        &self,
        id: i64,
        to: AlertStatus,
        actor: &str,
        note: Option<String>,
        at: DateTime<Utc>,
    ) -> Result<Alert, StoreError> {
        let actor = actor.to_owned();
        self.write(move |conn| {
            let status: Option<String> =
                conn.query_row("SELECT status FROM alerts WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            let from = status
                .as_deref()
                .and_then(AlertStatus::parse)
                .ok_or_else(|| StoreError::NotFound(format!("alert {id}")))?;
            if !from.can_become(to) {
                return Err(StoreError::Conflict(format!("alert {id} is {from}; it cannot become {to}")));
            }
            conn.execute("UPDATE alerts SET status = ?2 WHERE id = ?1", params![id, to.as_str()])?;
            conn.execute(
                "INSERT INTO alert_transitions (alert_id, time_ns, actor, from_status, to_status, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![id, ns(at), actor, from.as_str(), to.as_str(), note],
            )?;
            get_alert(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("alert {id}")))
        })
    }

    fn timeline(&self, q: &TimelineQuery) -> Result<TimelinePage, StoreError> {
        self.read(|conn| {
            let want = |k: &str| q.kinds.is_empty() || q.kinds.iter().any(|x| x == k);
            let event_kinds: Vec<&String> =
                q.kinds.iter().filter(|k| k.as_str() != "alert" && k.as_str() != "gap").collect();
            let include_events = q.kinds.is_empty() || !event_kinds.is_empty();
            let after = q.after.unwrap_or(Cursor { time_ns: i64::MIN, source: 0, id: i64::MIN });
            let limit = q.limit.clamp(1, 10_000);
            let pid_clause = if q.pid.is_some() { " AND pid = ?7" } else { "" };
            let kind_clause = if event_kinds.is_empty() {
                String::new()
            } else {
                let quoted: Vec<String> = event_kinds.iter().map(|k| format!("'{}'", k.replace('\'', ""))).collect();
                format!(" AND kind IN ({})", quoted.join(","))
            };
            let mut parts = Vec::new();
            if include_events {
                parts.push(format!(
                    "SELECT time_ns, 0 AS src, id, kind, workload, body FROM events
                     WHERE host = (SELECT key FROM host_keys WHERE host_id = ?1) AND time_ns >= ?2 AND time_ns < ?3{pid_clause}{kind_clause}
                       AND (time_ns, 0, id) > (?4, ?5, ?6)"
                ));
            }
            if want("alert") {
                parts.push(format!(
                    "SELECT first_seen_ns AS time_ns, 1 AS src, id, 'alert' AS kind, workload, body FROM alerts
                     WHERE host_id = ?1 AND first_seen_ns >= ?2 AND first_seen_ns < ?3{pid_clause}
                       AND (first_seen_ns, 1, id) > (?4, ?5, ?6)"
                ));
            }
            // Gaps belong to no process: a --pid filter leaves them out.
            if want("gap") && q.pid.is_none() {
                parts.push(
                    "SELECT time_ns, 2 AS src, id, 'gap' AS kind, NULL AS workload,
                            json_object('cause', cause, 'lost', lost) AS body FROM gaps
                     WHERE host_id = ?1 AND time_ns >= ?2 AND time_ns < ?3
                       AND (time_ns, 2, id) > (?4, ?5, ?6)"
                        .to_owned(),
                );
            }
            if parts.is_empty() {
                return Ok(TimelinePage::default());
            }
            let sql = format!("{} ORDER BY time_ns, src, id LIMIT {}", parts.join(" UNION ALL "), limit + 1);
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut args: Vec<rusqlite::types::Value> = vec![
                q.host_id.clone().into(),
                ns(q.from).into(),
                ns(q.to).into(),
                after.time_ns.into(),
                i64::from(after.source).into(),
                after.id.into(),
            ];
            if let Some(pid) = q.pid {
                args.push(i64::from(pid).into());
            }
            let rows: Vec<(i64, i64, i64, String, Option<String>, rusqlite::types::Value)> = stmt
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })?
                .collect::<Result<_, _>>()?;
            let more = rows.len() > limit;
            let mut entries = Vec::with_capacity(rows.len().min(limit));
            for (time_ns, src, id, kind, workload, body) in rows.into_iter().take(limit) {
                entries.push(if src == 2 {
                    #[derive(serde::Deserialize)]
                    struct GapBody {
                        cause: String,
                        lost: u64,
                    }
                    let g: GapBody = serde_json::from_str(&text_body(body)?)?;
                    let gap = Gap { host_id: q.host_id.clone(), time: from_ns(time_ns), cause: g.cause, lost: g.lost };
                    TimelineEntry {
                        time: gap.time,
                        source: "gap".into(),
                        id,
                        kind,
                        pid: 0,
                        seq: None,
                        workload,
                        summary: gap.summary(),
                        lost: Some(gap.lost),
                        process: crate::event::Process::default(),
                    }
                } else if src == 0 {
                    let e = decode_event_body(&q.host_id, (&body).into())?;
                    TimelineEntry {
                        time: from_ns(time_ns),
                        source: "event".into(),
                        id,
                        kind,
                        pid: e.process.pid,
                        seq: Some(e.seq),
                        workload,
                        summary: e.kind.summary(),
                        lost: None,
                        process: e.process,
                    }
                } else {
                    let a: Alert = serde_json::from_str(&text_body(body)?)?;
                    TimelineEntry {
                        time: from_ns(time_ns),
                        source: "alert".into(),
                        id,
                        kind,
                        pid: a.process.pid,
                        seq: Some(a.first_event_seq),
                        workload,
                        summary: format!("#{id} {} [{}] {}", a.rule, a.severity, a.summary),
                        lost: None,
                        process: a.process,
                    }
                });
            }
            let next = if more {
                entries.last().map(|e| {
                    let source = match e.source.as_str() {
                        "alert" => 1,
                        "gap" => 2,
                        _ => 0,
                    };
                    Cursor { time_ns: ns(e.time), source, id: e.id }.to_string()
                })
            } else {
                None
            };
            Ok(TimelinePage { entries, next })
        })
    }

    fn put_token(&self, record: &TokenRecord, hash: &str) -> Result<i64, StoreError> {
        let (record, hash) = (record.clone(), hash.to_owned());
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO tokens (hash, name, role, team, created_ns, expires_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![hash, record.name, record.role.as_str(), record.team, ns(record.created), record.expires.map(ns)],
            )?;
            Ok(conn.last_insert_rowid())
        })
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT id, name, role, team, created_ns, expires_ns FROM tokens WHERE hash = ?1 AND revoked_ns IS NULL",
                    [hash],
                    |r| {
                        let role: String = r.get(2)?;
                        Ok(TokenRecord {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            role: Role::parse(&role).unwrap_or(Role::Sensor),
                            team: r.get(3)?,
                            created: from_ns(r.get(4)?),
                            expires: r.get::<_, Option<i64>>(5)?.map(from_ns),
                        })
                    },
                )
                .optional()?)
        })
    }

    fn api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, name, role, team, created_ns, revoked_ns, expires_ns FROM tokens ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                let role: String = r.get(2)?;
                Ok((
                    TokenRecord {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        role: Role::parse(&role).unwrap_or(Role::Sensor),
                        team: r.get(3)?,
                        created: from_ns(r.get(4)?),
                        expires: r.get::<_, Option<i64>>(6)?.map(from_ns),
                    },
                    r.get::<_, Option<i64>>(5)?.map(from_ns),
                ))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn revoke_api_token(&self, id: i64, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.write(move |conn| {
            let n = conn.execute(
                "UPDATE tokens SET revoked_ns = coalesce(revoked_ns, ?2) WHERE id = ?1",
                params![id, ns(at)],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("API token {id}")));
            }
            Ok(())
        })
    }

    fn put_join_token(&self, token: &JoinToken, hash: &str) -> Result<(), StoreError> {
        let (t, hash) = (token.clone(), hash.to_owned());
        let labels = serde_json::to_string(&t.labels)?;
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO join_tokens (id, hash, role, labels, created_ns, expires_ns, uses_left, creator, revoked_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL)",
                params![t.id, hash, t.role, labels, ns(t.created), ns(t.expires), t.uses_left, t.creator],
            )?;
            Ok(())
        })
    }

    fn join_tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT id, role, labels, created_ns, expires_ns, uses_left, creator, revoked_ns
                 FROM join_tokens ORDER BY created_ns DESC, id",
            )?;
            let rows: Vec<(JoinToken, String)> =
                stmt.query_map([], join_token_row)?.collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(mut t, labels)| {
                    t.labels = serde_json::from_str(&labels)?;
                    Ok(t)
                })
                .collect()
        })
    }

    fn revoke_join_token(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |conn| {
            let n = conn.execute(
                "UPDATE join_tokens SET revoked_ns = coalesce(revoked_ns, ?2) WHERE id = ?1",
                params![id, ns(at)],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("join token {id}")));
            }
            Ok(())
        })
    }

    fn enroll(
        &self,
        token_id: &str,
        hash: &str,
        host_id: &str,
        serial: &str,
        at: DateTime<Utc>,
    ) -> Result<Enrollment, StoreError> {
        let (token_id, hash, host_id, serial) =
            (token_id.to_owned(), hash.to_owned(), host_id.to_owned(), serial.to_owned());
        self.write(move |conn| {
            let row = conn
                .query_row(
                    "SELECT hash, labels, expires_ns, uses_left, revoked_ns FROM join_tokens WHERE id = ?1",
                    [&token_id],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, Option<i64>>(4)?,
                        ))
                    },
                )
                .optional()?;
            let Some((stored, labels, expires, uses_left, revoked)) = row else {
                return Err(JoinRefusal::Unknown(token_id).into());
            };
            use subtle::ConstantTimeEq as _;
            if !bool::from(stored.as_bytes().ct_eq(hash.as_bytes())) {
                return Err(JoinRefusal::Forged(token_id).into());
            }
            if revoked.is_some() {
                return Err(JoinRefusal::Revoked(token_id).into());
            }
            if ns(at) >= expires {
                return Err(JoinRefusal::Expired(token_id, from_ns(expires).to_rfc3339()).into());
            }
            if uses_left <= 0 {
                return Err(JoinRefusal::UsedUp(token_id).into());
            }
            conn.execute(
                "UPDATE join_tokens SET uses_left = uses_left - 1 WHERE id = ?1",
                [&token_id],
            )?;
            conn.execute(
                "INSERT INTO enrollments (host_id, serial, labels, enrolled_ns, enrolled_by, revoked_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL)
                 ON CONFLICT (host_id) DO UPDATE SET serial = excluded.serial, labels = excluded.labels,
                   enrolled_ns = excluded.enrolled_ns, enrolled_by = excluded.enrolled_by, revoked_ns = NULL",
                params![host_id, serial, labels, ns(at), token_id],
            )?;
            Ok(Enrollment {
                host_id,
                serial,
                labels: serde_json::from_str(&labels)?,
                enrolled_at: at,
                enrolled_by: token_id,
                revoked: None,
            })
        })
    }

    fn enrollments(&self) -> Result<Vec<Enrollment>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!("{ENROLLMENT_SELECT} ORDER BY host_id"))?;
            let rows: Vec<(Enrollment, String)> =
                stmt.query_map([], enrollment_row)?.collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(mut e, labels)| {
                    e.labels = serde_json::from_str(&labels)?;
                    Ok(e)
                })
                .collect()
        })
    }

    fn revoke_host(&self, host_id: &str, at: DateTime<Utc>) -> Result<Enrollment, StoreError> {
        let host_id = host_id.to_owned();
        self.write(move |conn| {
            let n = conn.execute(
                "UPDATE enrollments SET revoked_ns = coalesce(revoked_ns, ?2) WHERE host_id = ?1",
                params![host_id, ns(at)],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("enrolled host {host_id}")));
            }
            let (mut e, labels) = conn.query_row(
                &format!("{ENROLLMENT_SELECT} WHERE host_id = ?1"),
                [&host_id],
                enrollment_row,
            )?;
            e.labels = serde_json::from_str(&labels)?;
            Ok(e)
        })
    }

    fn record_heartbeat(
        &self,
        host_id: &str,
        beat: &HeartbeatRecord,
    ) -> Result<Vec<Gap>, StoreError> {
        let (host_id, beat) = (host_id.to_owned(), beat.clone());
        let body = serde_json::to_string(&beat)?;
        self.write(move |conn| {
            let previous: Option<String> = conn
                .query_row("SELECT body FROM heartbeats WHERE host_id = ?1", [&host_id], |r| r.get(0))
                .optional()?;
            let previous: Option<HeartbeatRecord> =
                previous.map(|b| serde_json::from_str(&b)).transpose()?;
            let gaps = hosts::gaps_between(&host_id, previous.as_ref(), &beat);
            conn.execute(
                "INSERT INTO heartbeats (host_id, time_ns, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (host_id) DO UPDATE SET time_ns = excluded.time_ns, body = excluded.body",
                params![host_id, ns(beat.at), body],
            )?;
            conn.execute(
                "UPDATE hosts SET last_seen_ns = max(last_seen_ns, ?2) WHERE id = ?1",
                params![host_id, ns(beat.at)],
            )?;
            let mut insert = conn.prepare_cached(
                "INSERT INTO gaps (host_id, time_ns, cause, lost) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for g in &gaps {
                insert.execute(params![g.host_id, ns(g.time), g.cause, g.lost as i64])?;
            }
            Ok(gaps)
        })
    }

    fn host_summaries(&self) -> Result<Vec<HostSummary>, StoreError> {
        let enrolled = self.enrollments()?;
        self.read(|conn| {
            let mut out: std::collections::BTreeMap<String, HostSummary> = Default::default();
            let blank = |id: &str| HostSummary {
                host_id: id.to_owned(),
                labels: Default::default(),
                enrolled_at: None,
                enrolled_by: None,
                cert_serial: None,
                revoked: None,
                last_seen: None,
                sensor_version: String::new(),
                heartbeat: None,
            };
            let mut stmt =
                conn.prepare("SELECT id, labels, sensor_version, last_seen_ns FROM hosts")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            for row in rows {
                let (id, labels, version, last) = row?;
                let mut s = blank(&id);
                s.labels = serde_json::from_str(&labels)?;
                s.sensor_version = version;
                s.last_seen = Some(from_ns(last));
                out.insert(id, s);
            }
            for e in enrolled {
                let s = out.entry(e.host_id.clone()).or_insert_with(|| blank(&e.host_id));
                s.labels.extend(e.labels);
                s.enrolled_at = Some(e.enrolled_at);
                s.enrolled_by = Some(e.enrolled_by);
                s.cert_serial = Some(e.serial);
                s.revoked = e.revoked;
            }
            let mut stmt = conn.prepare("SELECT host_id, body FROM heartbeats")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (id, body) = row?;
                let beat: HeartbeatRecord = serde_json::from_str(&body)?;
                let s = out.entry(id.clone()).or_insert_with(|| blank(&id));
                s.last_seen = s.last_seen.max(Some(beat.at));
                s.heartbeat = Some(beat);
            }
            Ok(out.into_values().collect())
        })
    }

    fn prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let deleted = conn.execute("DELETE FROM events WHERE time_ns < ?1", [ns(before)])?;
            // A pair whose latest event is gone has no stored event left.
            conn.execute("DELETE FROM host_workloads WHERE last_event_ns < ?1", [ns(before)])?;
            Ok(deleted as u64)
        })
    }

    fn host_workloads(&self, host_id: &str) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT workload FROM host_workloads WHERE host_id = ?1 ORDER BY workload",
            )?;
            let rows = stmt.query_map([host_id], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn append_audit(&self, records: Vec<AuditRecord>) -> Result<(), StoreError> {
        self.write(move |conn| {
            for r in &records {
                insert_audit(conn, r)?;
            }
            Ok(())
        })
    }

    fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(|conn| {
            let limit = if filter.limit == 0 { 1_000 } else { filter.limit };
            let mut stmt = conn.prepare(
                "SELECT id, time_ns, kind, actor, object, revision, details FROM audit
                 WHERE time_ns >= ?1 ORDER BY id DESC",
            )?;
            let since = filter.since.map_or(i64::MIN, ns);
            let rows = stmt.query_map([since], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, time, kind, actor, object, revision, details) = row?;
                if !filter.wants(&kind) {
                    continue;
                }
                let actor: Actor = serde_json::from_str(&actor)?;
                out.push(AuditRecord {
                    id,
                    time: from_ns(time),
                    kind,
                    actor,
                    object,
                    revision,
                    details: serde_json::from_str(&details)?,
                });
                if out.len() == limit {
                    break;
                }
            }
            out.reverse();
            Ok(out)
        })
    }

    fn enqueue(&self, deliveries: Vec<NewDelivery>, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.write(move |conn| {
            for d in &deliveries {
                insert_delivery(conn, d, at)?;
            }
            Ok(())
        })
    }

    fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
        limit: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        self.write(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, delivery_id, team, sink, payload, attempts FROM deliveries
                 WHERE state = 'pending' AND next_attempt_ns <= ?1 ORDER BY next_attempt_ns, id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![ns(now), limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, delivery_id, team, sink, payload, attempts) = row?;
                out.push(ClaimedDelivery {
                    id,
                    delivery_id,
                    team,
                    sink: serde_json::from_str(&sink)?,
                    payload: serde_json::from_str(&payload)?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                });
            }
            let mut lease_stmt =
                conn.prepare_cached("UPDATE deliveries SET next_attempt_ns = ?2 WHERE id = ?1")?;
            for d in &out {
                lease_stmt.execute(params![d.id, ns(now + lease)])?;
            }
            Ok(out)
        })
    }

    fn finish_delivery(
        &self,
        id: i64,
        error: Option<String>,
        at: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            match &error {
                None => conn.execute(
                    "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, delivered_ns = ?2 WHERE id = ?1",
                    params![id, ns(at)],
                )?,
                Some(e) => conn.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, last_error = ?2, next_attempt_ns = ?3 WHERE id = ?1",
                    params![id, e, ns(retry_at)],
                )?,
            };
            Ok(())
        })
    }

    fn due_escalations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueEscalation>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, alert_id, from_team, to_team, level FROM escalations
                 WHERE state = 'pending' AND due_ns <= ?1 ORDER BY due_ns, id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![ns(now), limit as i64], |r| {
                Ok(DueEscalation {
                    id: r.get(0)?,
                    alert_id: r.get(1)?,
                    from_team: r.get(2)?,
                    to_team: r.get(3)?,
                    level: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn fire_escalation(
        &self,
        e: &DueEscalation,
        sinks: Vec<Sink>,
        next: Option<(chrono::Duration, String)>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let e = e.clone();
        self.write(move |conn| {
            let state: Option<String> = conn
                .query_row("SELECT state FROM escalations WHERE id = ?1", [e.id], |r| r.get(0))
                .optional()?;
            if state.as_deref() != Some("pending") {
                return Ok(false);
            }
            let alert = get_alert(conn, e.alert_id)?;
            let Some(alert) = alert.filter(|a| a.status == AlertStatus::Open) else {
                conn.execute(
                    "UPDATE escalations SET state = 'cancelled', done_ns = ?2 WHERE id = ?1",
                    params![e.id, ns(at)],
                )?;
                return Ok(false);
            };
            let info = serde_json::json!({
                "from_team": e.from_team, "to_team": e.to_team, "level": e.level,
                "open_since": alert.first_seen,
            });
            for sink in sinks {
                let delivery_id = route::new_delivery_id();
                let payload = route::alert_body(
                    &delivery_id,
                    &e.to_team,
                    Reason::Escalation,
                    &alert,
                    Some(info.clone()),
                );
                let d = NewDelivery {
                    delivery_id,
                    alert_id: Some(alert.id),
                    team: e.to_team.clone(),
                    reason: Reason::Escalation,
                    sink,
                    payload,
                };
                insert_delivery(conn, &d, at)?;
            }
            conn.execute(
                "UPDATE escalations SET state = 'fired', done_ns = ?2 WHERE id = ?1",
                params![e.id, ns(at)],
            )?;
            if let Some((after, to)) = next.filter(|_| e.level < MAX_ESCALATION_LEVEL) {
                conn.execute(
                    "INSERT INTO escalations (alert_id, from_team, to_team, level, due_ns, state) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
                    params![alert.id, e.to_team, to, e.level + 1, ns(at + after)],
                )?;
            }
            insert_audit(
                conn,
                &AuditRecord::new(at, "alert-escalated", Actor::system(), format!("alert {}", alert.id), info),
            )?;
            Ok(true)
        })
    }
}

#[cfg(test)]
mod tests;
