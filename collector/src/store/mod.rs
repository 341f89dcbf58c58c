//! Storage behind one trait, so a PostgreSQL back-end can follow without touching detection,
//! ingest or API code. The embedded default is [`sqlite::SqliteStore`].
//!
//! Methods are blocking; async callers use `tokio::task::spawn_blocking`. A method that returns
//! `Ok` has committed: ingest acknowledges a batch only after [`Store::write_batch`] returns.

pub mod sqlite;

use std::{collections::HashMap, collections::HashSet, ops::RangeInclusive};

use chrono::{DateTime, Utc};

use crate::{
    alerts::{Alert, AlertStatus},
    audit::{AuditFilter, AuditRecord},
    auth::TokenRecord,
    correlate::RevisionRef,
    declarations::{Declaration, Kind},
    event::{Event, Host},
    hosts::{Enrollment, Gap, HeartbeatRecord, HostSummary, JoinRefusal, JoinToken},
    route::{NewDelivery, Sink, TeamRoute},
    timeline::{TimelinePage, TimelineQuery},
};

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot encode or decode a stored record")]
    Codec(#[from] serde_json::Error),
    #[error("a stored record is damaged: {0}")]
    Corrupt(String),
    #[error("the database schema is version {found}; this keywatch knows up to {known}")]
    TooNew { found: i64, known: i64 },
    #[error("the store's writer has stopped")]
    Closed,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("cannot create the data directory")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    JoinRefused(#[from] JoinRefusal),
}

/// A declaration in force and its current revision.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeclaration {
    pub declaration: Declaration,
    pub revision: i64,
}

/// One change to commit; `new: None` deletes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclarationChange {
    pub kind: Kind,
    pub name: String,
    pub new: Option<Declaration>,
    pub diff: String,
}

/// One ingest batch to commit in one transaction.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// New events with the workload each was correlated to. Events at or below the stored
    /// seq watermark of their (host, `spool_id`) are ignored as resends.
    pub events: Vec<(Event, Option<String>)>,
    /// The sensor spool the events come from (see [`Host::spool_id`]).
    pub spool_id: String,
    /// Latest activity per workload.
    pub activity: Vec<(String, DateTime<Utc>)>,
    /// New alerts, already folded within the batch; each folds into a stored alert with the same
    /// group key that is not resolved and was last seen within `grouping_window` of it.
    pub alerts: Vec<Alert>,
    pub grouping_window: chrono::Duration,
    /// Every team's route: each new alert gets an outbox row per sink of each team it is routed
    /// to, and an escalation timer when its first team's route escalates.
    pub routes: HashMap<String, TeamRoute>,
    /// The collector's clock when the batch was evaluated (outbox and escalation times).
    pub now: DateTime<Utc>,
}

/// A delivery claimed from the outbox: due, and leased to the caller for a while.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub delivery_id: String,
    pub team: String,
    pub sink: Sink,
    pub payload: serde_json::Value,
    /// Attempts before this one.
    pub attempts: u32,
}

/// An escalation timer that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueEscalation {
    pub id: i64,
    pub alert_id: i64,
    pub from_team: String,
    pub to_team: String,
    /// 1 for the first escalation of an alert, 2 for the next in a chain…
    pub level: u32,
}

/// What a batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteOutcome {
    pub events_stored: usize,
    /// Alerts created by this batch, with their ids.
    pub new_alerts: Vec<Alert>,
    /// Ids of stored alerts that repeats folded into.
    pub folded_into: Vec<i64>,
}

/// Which alerts to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFilter {
    pub status: Option<AlertStatus>,
    pub owner: Option<String>,
    pub rule: Option<String>,
    pub host: Option<String>,
    pub workload: Option<String>,
    /// Owned by this team or sent to it (routed or escalated).
    pub team: Option<String>,
    /// At most this many, newest first (0: 1000).
    pub limit: usize,
}

/// An API token and when it was revoked, if it was.
pub type ApiTokenRow = (TokenRecord, Option<DateTime<Utc>>);

/// The storage interface.
pub trait Store: Send + Sync + 'static {
    /// Declarations in force.
    fn declarations(&self) -> Result<Vec<StoredDeclaration>, StoreError>;
    /// Commits all changes, each as a new revision by `author`, in one transaction.
    fn commit_declarations(
        &self,
        changes: Vec<DeclarationChange>,
        author: &str,
        at: DateTime<Utc>,
    ) -> Result<Vec<RevisionRef>, StoreError>;
    /// Revisions of one declaration, newest first.
    fn history(&self, kind: Kind, name: &str, limit: usize)
    -> Result<Vec<RevisionRef>, StoreError>;
    /// The latest `per_workload` revisions of every workload, newest first.
    fn workload_revisions(
        &self,
        per_workload: usize,
    ) -> Result<HashMap<String, Vec<RevisionRef>>, StoreError>;

    /// Records a host's Hello.
    fn upsert_host(&self, host: &Host, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// A host by id.
    fn host(&self, id: &str) -> Result<Option<Host>, StoreError>;
    /// Highest seq stored from `host_id`'s spool `spool_id` (0: none). A sensor sends its
    /// seqs in order, so every seq up to it was stored, evicted or lost before sending.
    fn stored_up_to(&self, host_id: &str, spool_id: &str) -> Result<u64, StoreError>;
    /// Which of `seqs` are stored for `host_id`, from any spool. For inspection and tests: it
    /// scans the host's events.
    fn known_seqs(
        &self,
        host_id: &str,
        seqs: RangeInclusive<u64>,
    ) -> Result<HashSet<u64>, StoreError>;
    /// Commits events, activity and alerts together.
    fn write_batch(&self, batch: WriteBatch) -> Result<WriteOutcome, StoreError>;
    /// Last activity of every workload.
    fn activity(&self) -> Result<HashMap<String, DateTime<Utc>>, StoreError>;

    /// Alerts, newest first.
    fn alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>, StoreError>;
    /// One alert with its transitions.
    fn alert(&self, id: i64) -> Result<Option<Alert>, StoreError>;
    /// Moves an alert along its lifecycle, recording who and why.
    fn transition(
        &self,
        id: i64,
        to: AlertStatus,
        actor: &str,
        note: Option<String>,
        at: DateTime<Utc>,
    ) -> Result<Alert, StoreError>;

    /// One page of a host's timeline.
    fn timeline(&self, query: &TimelineQuery) -> Result<TimelinePage, StoreError>;

    /// Stores a token by the hash of its secret; returns its id.
    fn put_token(&self, record: &TokenRecord, hash: &str) -> Result<i64, StoreError>;
    /// The token whose secret hashes to `hash`.
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// API tokens, revoked ones included (with when).
    fn api_tokens(&self) -> Result<Vec<ApiTokenRow>, StoreError>;
    /// Revokes an API token.
    fn revoke_api_token(&self, id: i64, at: DateTime<Utc>) -> Result<(), StoreError>;

    /// Stores a join token by the hash of its secret.
    fn put_join_token(&self, token: &JoinToken, hash: &str) -> Result<(), StoreError>;
    /// Every join token, newest first.
    fn join_tokens(&self) -> Result<Vec<JoinToken>, StoreError>;
    /// Revokes a join token.
    fn revoke_join_token(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// In one transaction: checks the join token (`hash` of its secret, expiry, uses, revocation),
    /// consumes one use, and records `host_id` as enrolled with certificate `serial` and the
    /// token's labels (replacing an earlier enrollment of that host). A refused token is
    /// [`StoreError::JoinRefused`].
    fn enroll(
        &self,
        token_id: &str,
        hash: &str,
        host_id: &str,
        serial: &str,
        at: DateTime<Utc>,
    ) -> Result<Enrollment, StoreError>;
    /// Every enrollment.
    fn enrollments(&self) -> Result<Vec<Enrollment>, StoreError>;
    /// Marks an enrolled host revoked.
    fn revoke_host(&self, host_id: &str, at: DateTime<Utc>) -> Result<Enrollment, StoreError>;
    /// Stores a host's heartbeat and records the gaps it reveals (see
    /// [`crate::hosts::gaps_between`]); returns them.
    fn record_heartbeat(
        &self,
        host_id: &str,
        beat: &HeartbeatRecord,
    ) -> Result<Vec<Gap>, StoreError>;
    /// Enrolled hosts and hosts that connected, with their last heartbeat.
    fn host_summaries(&self) -> Result<Vec<HostSummary>, StoreError>;

    /// Deletes events before `before` (retention); returns how many.
    fn prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Workloads a host runs: those its stored events were correlated to (within retention).
    fn host_workloads(&self, host_id: &str) -> Result<Vec<String>, StoreError>;

    /// Appends audit records.
    fn append_audit(&self, records: Vec<AuditRecord>) -> Result<(), StoreError>;
    /// Audit records, oldest first (the newest `limit`).
    fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;

    /// Puts deliveries in the outbox, due at `at`.
    fn enqueue(&self, deliveries: Vec<NewDelivery>, at: DateTime<Utc>) -> Result<(), StoreError>;
    /// Claims up to `limit` pending deliveries due at `now`; they are not due again before
    /// `now + lease` (so a crashed worker's claims come back).
    fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: chrono::Duration,
        limit: usize,
    ) -> Result<Vec<ClaimedDelivery>, StoreError>;
    /// Records one attempt: delivered (`error: None`), or failed and due again at `retry_at`.
    fn finish_delivery(
        &self,
        id: i64,
        error: Option<String>,
        at: DateTime<Utc>,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Escalation timers due at `now`.
    fn due_escalations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DueEscalation>, StoreError>;
    /// In one transaction: if the alert is still open, puts an escalation delivery per sink in
    /// the outbox, records the escalation (audit, by the collector), marks the timer fired and
    /// starts `next` (the receiving team's own escalation); otherwise cancels the timer.
    /// Returns whether it escalated.
    fn fire_escalation(
        &self,
        escalation: &DueEscalation,
        sinks: Vec<Sink>,
        next: Option<(chrono::Duration, String)>,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;
}
