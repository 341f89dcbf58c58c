//! The spool's own thread: it owns the [`Spool`] (single owner, blocking I/O) and serves the
//! batcher (appends) and the sender (reads, acks, gaps) through bounded channels.
//!
//! Appends are group commits: one `append` per batch, and an fsync when no further batch is
//! waiting or the sync interval has passed, so a quiet stream is durable at once and a busy one
//! syncs a bounded number of times a second. Records become sendable once synced; the thread
//! publishes that point ([`SpoolHandle::durable`]).
//!
//! A full disk does not lose events at once: batches are held in memory (up to a bound) and
//! retried every second; past the bound the thread stops taking batches, the channels behind
//! it fill up and the kernel counts what it cannot queue.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    convert::append_seq,
    ring::{RingCheckpoint, RingIdentity},
    spool::{Gap, OpenReport, Spool, SpoolError},
};

/// Counters the heartbeat reports, updated by the spool thread.
#[derive(Debug, Default)]
pub struct SpoolStats {
    pub depth_events: AtomicU64,
    pub depth_bytes: AtomicU64,
    pub evicted_total: AtomicU64,
    pub corrupt_total: AtomicU64,
    /// Events that met a full disk and were held in memory (over the process's life).
    pub disk_full_events: AtomicU64,
    /// Events held in memory right now, waiting for disk space.
    pub held_events: AtomicU64,
    /// Events a write error other than a full disk lost.
    pub write_lost_events: AtomicU64,
    pub appended_events: AtomicU64,
    pub acked: AtomicU64,
}

/// A batch of events encoded without their seq, the highest mark of the observations in it
/// (0 for none), reported durable once the batch is synced, and the highest ring position they
/// came from (0 for none), stored with the batch as its checkpoint.
///
/// A batch may carry a mark and no events: observations that were already spooled, whose
/// marks only need to pass.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Vec<u8>>,
    pub mark: u64,
    pub ring_pos: u64,
}

impl Batch {
    pub fn with_capacity(n: usize) -> Self {
        Self { events: Vec::with_capacity(n), mark: 0, ring_pos: 0 }
    }

    /// Neither events nor a mark: nothing to do.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.mark == 0
    }

    fn bytes(&self) -> usize {
        self.events.iter().map(Vec::len).sum()
    }
}

/// Requests from the sender.
enum Request {
    Read { from: u64, max_events: usize, max_bytes: usize, reply: oneshot::Sender<ReadResult> },
    FirstUnacked { reply: oneshot::Sender<u64> },
    Ack { up_to: u64 },
    TakeGaps { reply: oneshot::Sender<Vec<Gap>> },
    RequeueGaps,
    GapReported { gaps: Vec<Gap> },
}

pub type ReadResult = Result<Vec<(u64, Vec<u8>)>, SpoolError>;

/// The sender's side of the spool thread.
#[derive(Clone)]
pub struct SpoolHandle {
    requests: mpsc::Sender<Request>,
    /// Records below this seq are durable and may be sent.
    pub durable: watch::Receiver<u64>,
    /// The acked watermark, as the spool recorded it.
    pub acked: watch::Receiver<u64>,
    pub stats: Arc<SpoolStats>,
}

/// The spool thread stopped (it only stops when every handle is gone).
#[derive(Debug, thiserror::Error)]
#[error("the spool thread stopped")]
pub struct Stopped;

impl SpoolHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn read(
        &self,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<ReadResult, Stopped> {
        self.ask(|reply| Request::Read { from, max_events, max_bytes, reply }).await
    }

    pub async fn first_unacked(&self) -> Result<u64, Stopped> {
        self.ask(|reply| Request::FirstUnacked { reply }).await
    }

    pub async fn ack(&self, up_to: u64) -> Result<(), Stopped> {
        self.requests.send(Request::Ack { up_to }).await.map_err(|_| Stopped)
    }

    pub async fn take_gaps(&self) -> Result<Vec<Gap>, Stopped> {
        self.ask(|reply| Request::TakeGaps { reply }).await
    }

    pub async fn requeue_gaps(&self) -> Result<(), Stopped> {
        self.requests.send(Request::RequeueGaps).await.map_err(|_| Stopped)
    }

    pub async fn gap_reported(&self, gaps: Vec<Gap>) -> Result<(), Stopped> {
        self.requests.send(Request::GapReported { gaps }).await.map_err(|_| Stopped)
    }
}

/// Tuning of the spool thread.
#[derive(Debug, Clone, Copy)]
pub struct SpoolerOptions {
    /// Events held in memory while the disk is full, at most.
    pub max_held_bytes: usize,
    /// How often held batches are retried.
    pub retry_interval: Duration,
}

impl Default for SpoolerOptions {
    /// 64 MiB holds about 150,000 typical events: minutes of a busy host while an operator
    /// frees space.
    fn default() -> Self {
        Self { max_held_bytes: 64 * 1024 * 1024, retry_interval: Duration::from_secs(1) }
    }
}

/// Starts the spool thread; `appends` carries batches of events encoded without their seq.
/// The thread ends once `appends` is closed (after writing what it held) and every
/// [`SpoolHandle`] is gone. The highest mark of the batches that are synced is stored in
/// `durable_mark`. With `ring`, every batch is stored with its [`RingCheckpoint`].
pub fn spawn(
    spool: Spool,
    report: &OpenReport,
    appends: mpsc::Receiver<Batch>,
    opts: SpoolerOptions,
    durable_mark: Arc<crate::reader::DurableMark>,
    ring: Option<RingIdentity>,
) -> std::io::Result<(SpoolHandle, std::thread::JoinHandle<()>)> {
    let (requests_tx, requests) = mpsc::channel(64);
    let (durable_tx, durable) = watch::channel(spool.durable_next_seq());
    let (acked_tx, acked) = watch::channel(spool.acked());
    let stats = Arc::new(SpoolStats::default());
    stats.evicted_total.store(report.evicted_total, Ordering::Relaxed);
    let mut worker = Worker {
        spool,
        held: VecDeque::new(),
        held_bytes: 0,
        last_retry: Instant::now(),
        opts,
        stats: stats.clone(),
        durable: durable_tx,
        acked: acked_tx,
        marks: VecDeque::new(),
        durable_mark,
        ring,
    };
    worker.publish();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let thread = std::thread::Builder::new()
        .name("spool".into())
        .spawn(move || runtime.block_on(worker.run(appends, requests)))?;
    Ok((SpoolHandle { requests: requests_tx, durable, acked, stats }, thread))
}

struct Worker {
    spool: Spool,
    /// Batches that met a full disk, oldest first.
    held: VecDeque<Batch>,
    held_bytes: usize,
    last_retry: Instant,
    opts: SpoolerOptions,
    stats: Arc<SpoolStats>,
    durable: watch::Sender<u64>,
    acked: watch::Sender<u64>,
    /// Marks of appended batches not yet synced: (the seq after the batch, its mark).
    marks: VecDeque<(u64, u64)>,
    durable_mark: Arc<crate::reader::DurableMark>,
    /// The ring the events come from: each batch is appended with its ring checkpoint.
    ring: Option<RingIdentity>,
}

impl Worker {
    async fn run(
        mut self,
        mut appends: mpsc::Receiver<Batch>,
        mut requests: mpsc::Receiver<Request>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut appends_open, mut requests_open) = (true, true);
        while appends_open || requests_open || !self.held.is_empty() {
            let room = self.held_bytes < self.opts.max_held_bytes;
            tokio::select! {
                biased;
                request = requests.recv(), if requests_open => match request {
                    Some(r) => self.serve(r),
                    None => requests_open = false,
                },
                batch = appends.recv(), if appends_open && room => match batch {
                    Some(b) => {
                        self.append_or_hold(b);
                        // Group commit: sync once nothing else is waiting to be written.
                        if appends.is_empty() {
                            self.sync();
                        }
                    }
                    None => appends_open = false,
                },
                _ = tick.tick() => {
                    if !self.held.is_empty() && self.last_retry.elapsed() >= self.opts.retry_interval {
                        self.retry_held();
                    }
                    if let Err(error) = self.spool.sync_if_due() {
                        tracing::warn!(%error, "spool sync failed");
                    }
                    if !appends_open && !self.held.is_empty() && !requests_open {
                        // Nobody will ever read them; give the disk one more chance, then stop.
                        self.retry_held();
                        if !self.held.is_empty() {
                            tracing::error!(events = self.held_events(), "stopping with events the full disk could not take");
                            break;
                        }
                    }
                    self.publish();
                }
            }
        }
        self.sync();
    }

    fn held_events(&self) -> u64 {
        self.held.iter().map(|b| b.events.len() as u64).sum()
    }

    fn sync(&mut self) {
        if let Err(error) = self.spool.sync() {
            tracing::warn!(%error, "spool sync failed");
        }
        self.publish();
    }

    fn publish(&mut self) {
        let s = &self.stats;
        s.depth_events.store(self.spool.depth_events(), Ordering::Relaxed);
        s.depth_bytes.store(self.spool.depth_bytes(), Ordering::Relaxed);
        s.evicted_total.store(self.spool.evicted_total(), Ordering::Relaxed);
        s.corrupt_total.store(self.spool.corrupt_total(), Ordering::Relaxed);
        s.held_events.store(self.held_events(), Ordering::Relaxed);
        s.acked.store(self.spool.acked(), Ordering::Relaxed);
        let durable_next = self.spool.durable_next_seq();
        if self.durable.send_if_modified(|v| std::mem::replace(v, durable_next) != durable_next) {
            crate::fault::crash_point(crate::fault::AFTER_SPOOL_SYNC);
        }
        let mut mark = None;
        while let Some(&(_, m)) = self.marks.front().filter(|(end, _)| *end <= durable_next) {
            mark = Some(m);
            self.marks.pop_front();
        }
        if let Some(m) = mark {
            self.durable_mark.advance(m);
        }
        self.acked.send_if_modified(|v| {
            let new = self.spool.acked();
            std::mem::replace(v, new) != new
        });
    }

    fn serve(&mut self, request: Request) {
        match request {
            Request::Read { from, max_events, max_bytes, reply } => {
                let _ = reply.send(self.spool.read_from(from, max_events, max_bytes));
            }
            Request::FirstUnacked { reply } => {
                let _ = reply.send(self.spool.first_unacked_seq());
            }
            Request::Ack { up_to } => {
                if let Err(error) = self.spool.ack(up_to) {
                    tracing::warn!(%error, up_to, "spool ack failed");
                }
                self.publish();
            }
            Request::TakeGaps { reply } => {
                let _ = reply.send(self.spool.take_evictions());
            }
            Request::RequeueGaps => self.spool.requeue_gaps(),
            Request::GapReported { gaps } => {
                if let Err(error) = self.spool.gap_reported(&gaps) {
                    tracing::warn!(%error, "spool: recording reported gaps failed");
                }
            }
        }
    }

    fn append_or_hold(&mut self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        if !self.held.is_empty() {
            self.hold(batch);
            return;
        }
        if let Err(batch) = self.append(batch) {
            self.stats.disk_full_events.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
            tracing::error!(
                events = batch.events.len(),
                "disk full: holding events in memory until the spool can write them"
            );
            self.hold(batch);
        }
    }

    fn hold(&mut self, batch: Batch) {
        self.held_bytes += batch.bytes();
        self.held.push_back(batch);
        self.stats.held_events.store(self.held_events(), Ordering::Relaxed);
    }

    fn retry_held(&mut self) {
        self.last_retry = Instant::now();
        while let Some(batch) = self.held.pop_front() {
            let bytes = batch.bytes();
            match self.append(batch) {
                Ok(()) => self.held_bytes -= bytes,
                Err(batch) => {
                    self.held.push_front(batch);
                    break;
                }
            }
        }
        if self.held.is_empty() {
            tracing::info!("spool writes again after a full disk");
        }
        self.sync();
    }

    /// Appends one batch, numbering it; gives it back when the disk is full. Other write
    /// errors lose the batch: counted and logged (and its mark passes, so the ring is not held
    /// up forever by events that are gone).
    fn append(&mut self, mut batch: Batch) -> Result<(), Batch> {
        let base = self.spool.next_seq();
        if batch.events.is_empty() {
            // Only marks of events already in the spool: done once what is written is synced.
            self.note_mark(base, batch.mark);
            return Ok(());
        }
        let lens: Vec<usize> = batch.events.iter().map(Vec::len).collect();
        for (i, payload) in batch.events.iter_mut().enumerate() {
            append_seq(payload, base + i as u64);
        }
        let refs: Vec<&[u8]> = batch.events.iter().map(Vec::as_slice).collect();
        let checkpoint = self
            .ring
            .filter(|_| batch.ring_pos > 0)
            .map(|ring| RingCheckpoint { ring, pos: batch.ring_pos }.to_bytes());
        let result = match &checkpoint {
            Some(cp) => self.spool.append_with_checkpoint(&refs, cp),
            None => self.spool.append(&refs),
        };
        match result {
            Ok(range) => {
                debug_assert_eq!(*range.start(), base, "the spool numbers batches contiguously");
                let events = batch.events.len() as u64;
                self.stats.appended_events.fetch_add(events, Ordering::Relaxed);
                self.note_mark(base + events, batch.mark);
                Ok(())
            }
            Err(SpoolError::DiskFull { .. }) => {
                for (payload, len) in batch.events.iter_mut().zip(lens) {
                    payload.truncate(len);
                }
                Err(batch)
            }
            Err(error) => {
                let events = batch.events.len();
                self.stats.write_lost_events.fetch_add(events as u64, Ordering::Relaxed);
                tracing::error!(%error, events, "spool write failed; these events are lost");
                self.note_mark(self.spool.next_seq(), batch.mark);
                Ok(())
            }
        }
    }

    /// `mark` is durable once every seq before `end` is.
    fn note_mark(&mut self, end: u64, mark: u64) {
        if mark > 0 {
            self.marks.push_back((end, mark));
        }
    }
}
