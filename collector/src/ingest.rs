//! Ingest: decode → dedup → correlate → detect → store, then acknowledge. The transport (mTLS,
//! or plaintext with `--insecure`) wraps [`Ingestor::ingest`]; nothing is acknowledged before it
//! returns.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{File, OpenOptions},
    io::Write as _,
    path::Path,
    pin::Pin,
    sync::{Arc, Condvar, Mutex, Weak},
};

use chrono::{DateTime, Utc};
use keywatch_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{
    alerts::Alert,
    clock::Clock,
    convert::{self, ConvertError},
    detect::{self, Context},
    enroll::Enroller,
    event::{Event, Host},
    hosts::{Gap, HeartbeatRecord},
    registry::RegistryHandle,
    store::{Store, StoreError, WriteBatch, WriteOutcome},
};

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Invalid(#[from] ConvertError),
    #[error("cannot store the batch")]
    Store(#[from] StoreError),
    #[error("the ingest worker stopped")]
    Worker,
}

impl From<IngestError> for Status {
    /// The one mapping from ingest failures to gRPC codes: a sensor retries `unavailable`, drops
    /// `invalid_argument`.
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::Invalid(e) => Status::invalid_argument(e.to_string()),
            IngestError::Store(StoreError::Closed) | IngestError::Worker => {
                Status::unavailable("collector shutting down")
            }
            IngestError::Store(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "storing a batch failed");
                Status::unavailable("storage failed; retry")
            }
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestReport {
    /// Highest seq of the batch (everything up to it is stored), `None` for an empty batch.
    pub up_to: Option<u64>,
    /// Events skipped as already stored.
    pub duplicates: usize,
    pub outcome: WriteOutcome,
}

/// Appends every new alert to `alerts.jsonl`.
pub struct AlertLog(Mutex<File>);

impl AlertLog {
    /// Opens (creating) the log for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self(Mutex::new(OpenOptions::new().create(true).append(true).open(path)?)))
    }

    fn append(&self, alerts: &[Alert]) {
        let mut file = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for a in alerts {
            let line = serde_json::to_string(a).unwrap_or_default();
            if let Err(e) = writeln!(file, "{line}") {
                tracing::warn!(error = %e, alert = a.id, "cannot append to alerts.jsonl");
            }
        }
    }
}

/// The ingest pipeline shared by all sensor streams.
pub struct Ingestor {
    store: Arc<dyn Store>,
    registry: Arc<RegistryHandle>,
    clock: Arc<dyn Clock>,
    activity: Mutex<HashMap<String, DateTime<Utc>>>,
    host_locks: Arc<HostLocks>,
    alert_log: Option<AlertLog>,
    /// Woken when a batch adds alerts, so their deliveries go out at once rather than at the
    /// delivery worker's next poll.
    new_alerts: Arc<tokio::sync::Notify>,
}

/// Hosts whose batches are being deduplicated, evaluated or stored: one holder per host at a
/// time, so batches of one host from different streams stay serialized.
#[derive(Default)]
struct HostLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

impl HostLocks {
    /// Waits until no one holds `host_id`, then holds it until the lease drops. Blocking.
    fn acquire(self: &Arc<Self>, host_id: &str) -> HostLease {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while busy.contains(host_id) {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.insert(host_id.to_owned());
        HostLease { locks: self.clone(), host_id: host_id.to_owned() }
    }
}

/// A host held in [`HostLocks`]; released on drop.
struct HostLease {
    locks: Arc<HostLocks>,
    host_id: String,
}

impl Drop for HostLease {
    fn drop(&mut self) {
        self.locks.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.host_id);
        self.locks.freed.notify_all();
    }
}

/// A batch evaluated and handed to the store but perhaps not committed yet: the next batch of
/// its stream is deduplicated and evaluated as if it were (its seqs count as stored, its
/// activity as recorded), and takes over its host lease if it is still being written.
pub(crate) struct InFlight {
    /// Held (strongly) only by the batch's write and the next batch's preparation, which both
    /// hold a permit: a lease never waits on a permit.
    lease: Weak<HostLease>,
    /// The stream's seq watermark once the batch is stored.
    stored_up_to: u64,
    activity: Vec<(String, DateTime<Utc>)>,
}

/// A batch decoded, deduplicated and evaluated, ready for [`Ingestor::write`].
pub(crate) struct Prepared {
    write: WriteBatch,
    up_to: Option<u64>,
    duplicates: usize,
    /// The batch's host, held until it is written (`None` for an empty batch).
    lease: Option<Arc<HostLease>>,
    /// `None` for an empty batch (nothing to write or acknowledge).
    in_flight: Option<Arc<InFlight>>,
}

impl Ingestor {
    /// A pipeline over `store`; `alert_log` receives every new alert.
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<RegistryHandle>,
        clock: Arc<dyn Clock>,
        alert_log: Option<AlertLog>,
    ) -> Result<Self, StoreError> {
        let activity = store.activity()?;
        Ok(Self {
            store,
            registry,
            clock,
            activity: Mutex::new(activity),
            host_locks: Arc::default(),
            alert_log,
            new_alerts: Arc::default(),
        })
    }

    /// Notified whenever a stored batch added alerts (their deliveries are due now).
    pub fn new_alerts_signal(&self) -> Arc<tokio::sync::Notify> {
        self.new_alerts.clone()
    }

    /// Records a sensor's Hello and returns its host.
    pub fn hello(&self, hello: &pb::Hello) -> Result<Host, IngestError> {
        let host = convert::host_from_hello(hello)?;
        self.store.upsert_host(&host, self.clock.now())?;
        tracing::info!(host = %host.id, version = %hello.sensor_version, kernel = %hello.kernel, "sensor connected");
        Ok(host)
    }

    /// Stores a heartbeat and the gaps it reveals (events the sensor lost). Blocking.
    pub fn heartbeat(&self, host: &Host, hb: &pb::Heartbeat) -> Result<Vec<Gap>, IngestError> {
        let beat = HeartbeatRecord {
            at: self.clock.now(),
            uptime_s: hb.uptime_s,
            kernel_lost: per_kind(&hb.kernel_lost),
            kernel_counters_id: hb.kernel_counters_id.clone(),
            spool_events: hb.spool_events,
            spool_bytes: hb.spool_bytes,
            spool_evicted: hb.spool_evicted,
            sensor_lost: per_kind(&hb.sensor_lost),
            spool_held: hb.spool_held,
            spool_corrupt_total: hb.spool_corrupt_total,
        };
        let gaps = self.store.record_heartbeat(&host.id, &beat)?;
        for g in &gaps {
            tracing::warn!(host = %host.id, cause = %g.cause, lost = g.lost, "sensor lost events; gap recorded on its timeline");
        }
        Ok(gaps)
    }

    /// Decodes, deduplicates, correlates, detects and stores one batch; returns once it is
    /// committed. Batches of one host are processed one at a time. Blocking.
    pub fn ingest(&self, host: &Host, batch: pb::EventBatch) -> Result<IngestReport, IngestError> {
        self.write(self.prepare(host, batch, None)?)
    }

    /// Decodes, deduplicates, correlates and detects one batch, holding its host (taking it over
    /// from `ahead`, the stream's previous batch still being written, when there is one: its
    /// seqs count as known and its activity as recorded). Blocking.
    pub(crate) fn prepare(
        &self,
        host: &Host,
        batch: pb::EventBatch,
        ahead: Option<&InFlight>,
    ) -> Result<Prepared, IngestError> {
        let events = convert::events_from_batch(&host.id, batch)?;
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(Prepared {
                write: WriteBatch::default(),
                up_to: None,
                duplicates: 0,
                lease: None,
                in_flight: None,
            });
        };
        let lease = ahead
            .and_then(|a| a.lease.upgrade())
            .unwrap_or_else(|| Arc::new(self.host_locks.acquire(&host.id)));
        // A sensor sends its seqs in order: at or below the watermark is a resend.
        let stored_up_to = self
            .store
            .stored_up_to(&host.id, &host.spool_id)?
            .max(ahead.map_or(0, |a| a.stored_up_to));
        let (total, events_first) = (events.len(), events[0].seq);
        let fresh: Vec<Event> = events.into_iter().filter(|e| e.seq > stored_up_to).collect();
        let duplicates = total - fresh.len();
        if stored_up_to.saturating_sub(last) > RESEND_WINDOW {
            // More than a sensor ever has unacknowledged: not a resend but seqs that went back
            // (a spool restored from a copy, a sensor bug). Said, since they are not stored.
            tracing::warn!(
                host = %host.id, spool = %host.spool_id, first = events_first, last, stored_up_to,
                "a batch far below the seqs already stored from this spool was taken for a resend and not stored"
            );
        }
        let write = self.evaluate_after(host, fresh, ahead.map(|a| a.activity.as_slice()));
        let in_flight = InFlight {
            lease: Arc::downgrade(&lease),
            stored_up_to: stored_up_to.max(last),
            activity: write.activity.clone(),
        };
        Ok(Prepared {
            write,
            up_to: Some(last),
            duplicates,
            lease: Some(lease),
            in_flight: Some(Arc::new(in_flight)),
        })
    }

    /// Stores a prepared batch; returns once it is committed. Blocking.
    pub(crate) fn write(&self, prepared: Prepared) -> Result<IngestReport, IngestError> {
        let Prepared { write, up_to, duplicates, lease, in_flight } = prepared;
        let Some(in_flight) = in_flight else {
            return Ok(IngestReport::default());
        };
        let outcome = self.store.write_batch(write)?;
        {
            let mut map = self.activity.lock().unwrap_or_else(|e| e.into_inner());
            for (w, t) in &in_flight.activity {
                let slot = map.entry(w.clone()).or_insert(*t);
                *slot = (*slot).max(*t);
            }
        }
        if let Some(log) = &self.alert_log {
            log.append(&outcome.new_alerts);
        }
        if !outcome.new_alerts.is_empty() {
            self.new_alerts.notify_one();
        }
        for a in &outcome.new_alerts {
            tracing::warn!(alert = a.id, rule = %a.rule, severity = %a.severity, workload = %a.workload, host = %a.host.id, "{}", a.summary);
        }
        drop(lease);
        Ok(IngestReport { up_to, duplicates, outcome })
    }

    /// Correlates and detects: the write a batch of new events turns into. Pure apart from
    /// reading the activity map.
    pub fn evaluate(&self, host: &Host, events: Vec<Event>) -> WriteBatch {
        self.evaluate_after(host, events, None)
    }

    /// [`Ingestor::evaluate`] with `pending` (activity of a batch not yet recorded) counted as
    /// recorded.
    fn evaluate_after(
        &self,
        host: &Host,
        events: Vec<Event>,
        pending: Option<&[(String, DateTime<Utc>)]>,
    ) -> WriteBatch {
        let registry = self.registry.snapshot();
        let mut known_activity = self.activity.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (w, t) in pending.unwrap_or_default() {
            let slot = known_activity.entry(w.clone()).or_insert(*t);
            *slot = (*slot).max(*t);
        }
        let mut activity: HashMap<String, DateTime<Utc>> = HashMap::new();
        // Alerts of this batch by group key; repeats fold here before reaching the store.
        let mut alerts: Vec<Alert> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        // Correlation is a pure function of the process's selector fields within one snapshot,
        // so it runs once per distinct set of them (keys borrow from the events: no copies).
        // Runs of events from one process are common: the previous event's key is tried first
        // (comparing is cheaper than hashing).
        let indexes: Vec<Option<usize>> = {
            let mut matched: HashMap<MatchKey<'_>, Option<usize>> = HashMap::new();
            let mut previous: Option<(MatchKey<'_>, Option<usize>)> = None;
            events
                .iter()
                .map(|event| {
                    let key = MatchKey::of(&event.process);
                    if let Some((k, index)) = previous
                        && k == key
                    {
                        return index;
                    }
                    let index = *matched.entry(key).or_insert_with(|| {
                        registry.workloads.iter().position(|w| w.matches(host, &event.process))
                    });
                    previous = Some((key, index));
                    index
                })
                .collect()
        };
        let mut stored = Vec::with_capacity(events.len());
        let mut seen = HashSet::new();
        for (event, index) in events.into_iter().zip(indexes) {
            if !seen.insert(event.seq) {
                continue;
            }
            let workload = index.map(|i| &registry.workloads[i]);
            let name = workload.map(|w| w.workload.name.clone());
            let last_active = name.as_ref().and_then(|n| {
                activity
                    .get(n)
                    .or_else(|| known_activity.get(n))
                    .or_else(|| registry.declared_at.get(n))
                    .copied()
            });
            let ctx = Context { host, workload, last_active };
            for finding in detect::detect(&registry, ctx, &event) {
                let key = finding.group_key(&host.id);
                match by_key.get(&key) {
                    Some(&i) => alerts[i].add_event(event.count, event.time),
                    None => {
                        by_key.insert(key, alerts.len());
                        alerts.push(Alert::build(&registry, host, &event, &finding));
                    }
                }
            }
            if let Some(n) = &name
                && detect::is_use(&event.kind)
            {
                let slot = activity.entry(n.clone()).or_insert(event.time);
                *slot = (*slot).max(event.time);
            }
            stored.push((event, name));
        }
        let alerts_empty = alerts.is_empty();
        WriteBatch {
            events: stored,
            spool_id: host.spool_id.clone(),
            activity: activity.into_iter().collect(),
            alerts,
            grouping_window: registry.settings.grouping_window(),
            routes: if alerts_empty { HashMap::new() } else { crate::route::routes(&registry) },
            now: self.clock.now(),
        }
    }
}

/// The process fields workload selectors look at (host labels are fixed per batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MatchKey<'a> {
    uid: u32,
    user: Option<&'a str>,
    exe: &'a str,
    exe_sha256: &'a str,
    systemd_unit: &'a str,
    container_id: &'a str,
    container_image: &'a str,
    k8s_namespace: &'a str,
    k8s_pod: &'a str,
}

impl<'a> MatchKey<'a> {
    fn of(p: &'a crate::event::Process) -> Self {
        Self {
            uid: p.uid,
            user: p.user.as_deref(),
            exe: &p.exe,
            exe_sha256: &p.exe_sha256,
            systemd_unit: &p.systemd_unit,
            container_id: &p.container_id,
            container_image: &p.container_image,
            k8s_namespace: &p.k8s_namespace,
            k8s_pod: &p.k8s_pod,
        }
    }
}

/// A sensor the transport authenticated (mTLS: its client certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedPeer {
    /// The host id bound to the credential (the certificate's CN).
    pub host_id: String,
    /// The credential's serial, to re-check it later.
    pub serial: String,
    /// Labels from enrollment; they win over the Hello's.
    pub labels: BTreeMap<String, String>,
}

/// How the transport vouches for a sensor. Plaintext (`--insecure`) trusts the Hello; mTLS
/// returns the host bound to the client certificate, and a Hello claiming another id is refused.
pub trait PeerIdentity: Send + Sync + 'static {
    /// The peer the transport authenticated, `None` when it authenticates nothing, or the status
    /// refusing the stream.
    fn authenticated_host(
        &self,
        extensions: &tonic::Extensions,
    ) -> Result<Option<AuthenticatedPeer>, Status>;

    /// Ticks when credentials may have changed (revocation, re-enrollment); open streams then
    /// call [`PeerIdentity::recheck`].
    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Whether an open stream of `peer` may go on; the status ends it.
    fn recheck(&self, _peer: &AuthenticatedPeer) -> Result<(), Status> {
        Ok(())
    }
}

/// Trusts the host id in the Hello (plaintext, `--insecure`).
#[derive(Debug, Default, Clone, Copy)]
pub struct TrustHello;

impl PeerIdentity for TrustHello {
    fn authenticated_host(
        &self,
        _: &tonic::Extensions,
    ) -> Result<Option<AuthenticatedPeer>, Status> {
        Ok(None)
    }
}

/// Seqs a sensor may resend behind what is stored: far more than it ever has unacknowledged
/// (16 batches of at most 1,000 events).
const RESEND_WINDOW: u64 = 100_000;

/// Largest message a sensor may send (decoded); larger ones end the stream with
/// `resource_exhausted`.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Batches being stored at once across all streams; further streams wait (and so their
/// senders, through HTTP/2 flow control).
pub const MAX_CONCURRENT_BATCHES: usize = 32;

/// The `SensorService` implementation over an [`Ingestor`].
pub struct SensorIngest {
    ingestor: Arc<Ingestor>,
    peer: Arc<dyn PeerIdentity>,
    enroller: Option<Arc<Enroller>>,
    shutdown: CancellationToken,
    permits: Arc<Semaphore>,
}

impl SensorIngest {
    /// The service; wrap it in [`pb::sensor_service_server::SensorServiceServer`] (see
    /// [`SensorIngest::into_server`]).
    pub fn new(ingestor: Arc<Ingestor>, peer: Arc<dyn PeerIdentity>) -> Self {
        Self {
            ingestor,
            peer,
            enroller: None,
            shutdown: CancellationToken::new(),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_BATCHES)),
        }
    }

    /// Answers `Enroll` with `enroller` (without one, `Enroll` is `unimplemented`).
    pub fn with_enroller(mut self, enroller: Arc<Enroller>) -> Self {
        self.enroller = Some(enroller);
        self
    }

    /// When `shutdown` is cancelled, every stream finishes the batch it is storing, acknowledges
    /// it, and ends with `unavailable`.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The tonic server, with the message size limit set.
    pub fn into_server(self) -> pb::sensor_service_server::SensorServiceServer<SensorIngest> {
        pb::sensor_service_server::SensorServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The tonic server for sensors, with message size limits set (no enrollment).
pub fn sensor_server(
    ingestor: Arc<Ingestor>,
    peer: Arc<dyn PeerIdentity>,
) -> pb::sensor_service_server::SensorServiceServer<SensorIngest> {
    SensorIngest::new(ingestor, peer).into_server()
}

/// The status a broken inbound stream ends with, or `None` when the sensor went away.
fn inbound_error(status: &Status) -> Option<Status> {
    match status.code() {
        Code::OutOfRange if status.message().contains("too large") => {
            Some(Status::resource_exhausted(format!(
                "message larger than {MAX_MESSAGE_BYTES} bytes; send smaller batches"
            )))
        }
        Code::Internal if status.message().contains("decode") => {
            Some(Status::invalid_argument(format!("malformed message: {}", status.message())))
        }
        _ => None,
    }
}

/// Resolves when `changes` ticks; never without one.
async fn changed(changes: &mut Option<watch::Receiver<u64>>) {
    match changes {
        Some(rx) => {
            if rx.changed().await.is_err() {
                *changes = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Everything one stream needs.
struct StreamCtx {
    ingestor: Arc<Ingestor>,
    peer: Arc<dyn PeerIdentity>,
    authenticated: Option<AuthenticatedPeer>,
    shutdown: CancellationToken,
    permits: Arc<Semaphore>,
}

type CollectorStream = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

fn policy(ingestor: &Ingestor) -> pb::CollectorMessage {
    let reg = ingestor.registry.snapshot();
    let mut watches: Vec<pb::WatchSpec> = reg
        .watches
        .values()
        .map(|w| {
            use crate::declarations::model::WatchCategory as C;
            // Secret watches name unix sockets (ssh-agent, docker.sock); the sensor watches
            // their connects rather than opens.
            let (paths, unix_sockets) = match w.watch.category {
                C::Secret => (Vec::new(), w.watch.paths.clone()),
                _ => (w.watch.paths.clone(), Vec::new()),
            };
            pb::WatchSpec {
                name: w.watch.name.clone(),
                category: match w.watch.category {
                    C::Credential => pb::WatchCategory::Credential,
                    C::Secret => pb::WatchCategory::Secret,
                    C::AuthEndpoint => pb::WatchCategory::AuthEndpoint,
                } as i32,
                paths,
                endpoints: w.watch.endpoints.clone(),
                unix_sockets,
            }
        })
        .collect();
    watches.sort_by(|a, b| a.name.cmp(&b.name));
    let version = reg.objects.len() as u64;
    pb::CollectorMessage {
        msg: Some(pb::collector_message::Msg::Policy(pb::Policy { version, watches })),
    }
}

async fn run_stream(
    ctx: StreamCtx,
    mut inbound: Streaming<pb::SensorMessage>,
    tx: mpsc::Sender<Result<pb::CollectorMessage, Status>>,
) {
    use pb::sensor_message::Msg;
    let StreamCtx { ingestor, peer, authenticated, shutdown, permits } = ctx;
    let mut changes = authenticated.as_ref().and_then(|_| peer.changes());
    let first = tokio::select! {
        () = shutdown.cancelled() => {
            let _ = tx.send(Err(Status::unavailable("collector shutting down"))).await;
            return;
        }
        m = inbound.message() => m,
    };
    let host = match first {
        Ok(Some(pb::SensorMessage { msg: Some(Msg::Hello(mut hello)) })) => {
            if let Some(p) = &authenticated {
                if p.host_id != hello.host_id {
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "the Hello names host {} but the certificate is for {}",
                            hello.host_id, p.host_id
                        ))))
                        .await;
                    return;
                }
                // Enrollment labels win over the sensor's own.
                hello.labels.extend(p.labels.clone());
            }
            let ing = ingestor.clone();
            match tokio::task::spawn_blocking(move || ing.hello(&hello)).await {
                Ok(Ok(host)) => host,
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
                Err(_) => {
                    let _ = tx.send(Err(Status::internal("internal error"))).await;
                    return;
                }
            }
        }
        Ok(Some(_)) => {
            let _ =
                tx.send(Err(Status::failed_precondition("the first message must be Hello"))).await;
            return;
        }
        Ok(None) => return,
        Err(status) => {
            tracing::debug!(%status, "sensor stream ended before Hello");
            if let Some(reply) = inbound_error(&status) {
                let _ = tx.send(Err(reply)).await;
            }
            return;
        }
    };
    if tx.send(Ok(policy(&ingestor))).await.is_err() {
        return;
    }
    let host = Arc::new(host);
    // Three stages, each on its own batch: the stream reads (TLS, decoding) a batch while the
    // batch before it is prepared and the one before that is written. Acks go out in order,
    // each after its batch committed.
    let mut stages = Stages::default();
    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                if settle(&mut stages.writing, &tx, &host).await {
                    let _ = tx.send(Err(Status::unavailable("collector shutting down"))).await;
                }
                break;
            }
            result = written(&mut stages.writing) => {
                stages.writing = None;
                if !reply(result, &tx, &host).await {
                    break;
                }
                stages.write_ready(&ingestor);
                continue;
            }
            result = prepared(&mut stages.preparing) => {
                if !stages.on_prepared(result, &ingestor, &shutdown, &tx, &host).await {
                    break;
                }
                continue;
            }
            () = changed(&mut changes) => {
                if let Some(p) = &authenticated
                    && let Err(status) = peer.recheck(p)
                {
                    tracing::warn!(host = %host.id, %status, "ending the stream of a host no longer allowed");
                    if settle(&mut stages.writing, &tx, &host).await {
                        let _ = tx.send(Err(status)).await;
                    }
                    break;
                }
                continue;
            }
            m = inbound.message() => m,
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => {
                // The sensor sent its last batch: store and acknowledge everything received.
                stages.drain(&ingestor, &shutdown, &tx, &host).await;
                break;
            }
            Err(status) => {
                tracing::debug!(host = %host.id, %status, "sensor stream broke");
                if settle(&mut stages.writing, &tx, &host).await
                    && let Some(reply) = inbound_error(&status)
                {
                    tracing::warn!(host = %host.id, status = %reply, "sensor stream refused");
                    let _ = tx.send(Err(reply)).await;
                }
                break;
            }
        };
        match msg.msg {
            Some(Msg::Batch(batch)) => {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                // The batch ahead must be prepared first (its seqs and activity count for this
                // one), and at most one prepared batch waits for the writer.
                if !stages.finish_preparing(&ingestor, &shutdown, &tx, &host).await {
                    break;
                }
                if stages.ready.is_some() {
                    if !settle(&mut stages.writing, &tx, &host).await {
                        break;
                    }
                    stages.write_ready(&ingestor);
                }
                let ahead = stages.writing.as_ref().map(|w| w.in_flight.clone());
                let (ing, h) = (ingestor.clone(), host.clone());
                let task =
                    tokio::task::spawn_blocking(move || ing.prepare(&h, batch, ahead.as_deref()));
                stages.preparing = Some(Preparing { task, permit });
            }
            Some(Msg::Heartbeat(hb)) => {
                if !settle(&mut stages.writing, &tx, &host).await {
                    break;
                }
                stages.write_ready(&ingestor);
                let (ing, h) = (ingestor.clone(), host.clone());
                match tokio::task::spawn_blocking(move || ing.heartbeat(&h, &hb)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(host = %host.id, error = %e, "cannot store a heartbeat")
                    }
                    Err(_) => tracing::warn!(host = %host.id, "heartbeat worker failed"),
                }
            }
            Some(Msg::Hello(_)) => {
                if settle(&mut stages.writing, &tx, &host).await {
                    let _ = tx
                        .send(Err(Status::failed_precondition(
                            "Hello may only be sent once per stream",
                        )))
                        .await;
                }
                break;
            }
            None => {}
        }
    }
}

/// A batch of a stream being written.
struct Writing {
    task: tokio::task::JoinHandle<Result<IngestReport, IngestError>>,
    in_flight: Arc<InFlight>,
}

/// A batch of a stream being prepared, with its share of [`MAX_CONCURRENT_BATCHES`].
struct Preparing {
    task: tokio::task::JoinHandle<Result<Prepared, IngestError>>,
    permit: OwnedSemaphorePermit,
}

/// A stream's batches past reading: at most one being prepared, one prepared and waiting for
/// the writer, one being written. A batch is written only after the one before it committed.
#[derive(Default)]
struct Stages {
    preparing: Option<Preparing>,
    ready: Option<(Prepared, Arc<InFlight>, OwnedSemaphorePermit)>,
    writing: Option<Writing>,
}

impl Stages {
    /// Starts writing the prepared batch, if there is one and nothing is being written.
    fn write_ready(&mut self, ingestor: &Arc<Ingestor>) {
        if self.writing.is_some() {
            return;
        }
        if let Some((prepared, in_flight, permit)) = self.ready.take() {
            let ing = ingestor.clone();
            let task = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                ing.write(prepared)
            });
            self.writing = Some(Writing { task, in_flight });
        }
    }

    /// Takes a batch's preparation: queues it for the writer, or (refused) answers the batches
    /// ahead of it and ends the stream with why; whether the stream goes on.
    async fn on_prepared(
        &mut self,
        result: (Result<Prepared, IngestError>, OwnedSemaphorePermit),
        ingestor: &Arc<Ingestor>,
        shutdown: &CancellationToken,
        tx: &mpsc::Sender<Result<pb::CollectorMessage, Status>>,
        host: &Host,
    ) -> bool {
        match result {
            (Err(e), _) => {
                // The batches ahead are stored and acknowledged first: a sensor takes a refusal
                // for its oldest unacknowledged batch.
                if settle(&mut self.writing, tx, host).await {
                    self.write_ready(ingestor);
                    if settle(&mut self.writing, tx, host).await {
                        reply(Err(e), tx, host).await;
                    }
                }
                false
            }
            (Ok(prepared), permit) => {
                // An empty batch has nothing to store or acknowledge; shutting down, a batch not
                // yet being stored is neither written nor acknowledged.
                if let Some(in_flight) = prepared.in_flight.clone()
                    && !shutdown.is_cancelled()
                {
                    self.ready = Some((prepared, in_flight, permit));
                    self.write_ready(ingestor);
                }
                true
            }
        }
    }

    /// Waits for the batch being prepared, if any, and takes it ([`Stages::on_prepared`]);
    /// whether the stream goes on.
    async fn finish_preparing(
        &mut self,
        ingestor: &Arc<Ingestor>,
        shutdown: &CancellationToken,
        tx: &mpsc::Sender<Result<pb::CollectorMessage, Status>>,
        host: &Host,
    ) -> bool {
        if self.preparing.is_none() {
            return true;
        }
        let result = prepared(&mut self.preparing).await;
        self.on_prepared(result, ingestor, shutdown, tx, host).await
    }

    /// Prepares, writes and acknowledges every batch received.
    async fn drain(
        &mut self,
        ingestor: &Arc<Ingestor>,
        shutdown: &CancellationToken,
        tx: &mpsc::Sender<Result<pb::CollectorMessage, Status>>,
        host: &Host,
    ) {
        if !self.finish_preparing(ingestor, shutdown, tx, host).await {
            return;
        }
        if settle(&mut self.writing, tx, host).await {
            self.write_ready(ingestor);
            settle(&mut self.writing, tx, host).await;
        }
    }
}

/// The batch being prepared, once it is, with its permit; never without one.
async fn prepared(
    preparing: &mut Option<Preparing>,
) -> (Result<Prepared, IngestError>, OwnedSemaphorePermit) {
    match preparing {
        Some(p) => {
            let result = (&mut p.task).await.unwrap_or(Err(IngestError::Worker));
            let permit = preparing.take().expect("a batch being prepared").permit;
            (result, permit)
        }
        None => std::future::pending().await,
    }
}

/// The result of the batch being written once it is; never without one.
async fn written(writing: &mut Option<Writing>) -> Result<IngestReport, IngestError> {
    match writing {
        Some(w) => (&mut w.task).await.unwrap_or(Err(IngestError::Worker)),
        None => std::future::pending().await,
    }
}

/// Waits for the batch being written, if any, and answers it (see [`reply`]).
async fn settle(
    writing: &mut Option<Writing>,
    tx: &mpsc::Sender<Result<pb::CollectorMessage, Status>>,
    host: &Host,
) -> bool {
    match writing.take() {
        Some(w) => reply(w.task.await.unwrap_or(Err(IngestError::Worker)), tx, host).await,
        None => true,
    }
}

/// Acknowledges a stored batch, or ends the stream with why it was refused; whether the stream
/// goes on.
async fn reply(
    result: Result<IngestReport, IngestError>,
    tx: &mpsc::Sender<Result<pb::CollectorMessage, Status>>,
    host: &Host,
) -> bool {
    match result {
        Ok(IngestReport { up_to: Some(up_to), .. }) => {
            let ack = pb::CollectorMessage {
                msg: Some(pb::collector_message::Msg::Ack(pb::Ack { up_to })),
            };
            tx.send(Ok(ack)).await.is_ok()
        }
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(host = %host.id, error = %e, "batch refused");
            let _ = tx.send(Err(e.into())).await;
            false
        }
    }
}

#[tonic::async_trait]
impl pb::sensor_service_server::SensorService for SensorIngest {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let Some(enroller) = self.enroller.clone() else {
            return Err(Status::unimplemented("this collector does not enroll sensors"));
        };
        let req = request.into_inner();
        tokio::task::spawn_blocking(move || enroller.enroll(&req))
            .await
            .map_err(|_| Status::internal("internal error"))?
            .map(Response::new)
    }

    type StreamStream = CollectorStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::SensorMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let authenticated = self.peer.authenticated_host(request.extensions())?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let ctx = StreamCtx {
            ingestor: self.ingestor.clone(),
            peer: self.peer.clone(),
            authenticated,
            shutdown: self.shutdown.clone(),
            permits: self.permits.clone(),
        };
        tokio::spawn(run_stream(ctx, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Loss counters by kind (a kind repeated in one message adds up).
fn per_kind(counters: &[pb::LossCounter]) -> BTreeMap<String, u64> {
    counters.iter().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(l.kind.clone()).or_insert(0) += l.lost;
        m
    })
}
