//! Drains the kernel ring buffer on its own thread and hands decoded events downstream.
//!
//! The kernel submits records without waking the reader (a wakeup per record costs several
//! times the event), so the reader polls the ring on a short timer; an explicit wakeup still
//! ends the wait early.
//!
//! A record's space is handed back to the kernel only once everything derived from it is
//! durable downstream (in the spool and synced, or written to stdout and flushed): until then
//! it stays in the pinned ring, and a sensor killed in between leaves it to the next one. Every
//! event the reader sends carries a mark (a number that grows by one per event); the stages
//! report, through [`Progress`], how far marks are done, and the reader commits the ring up to
//! the record behind the highest done mark. Fold totals are checkpointed at the same moment,
//! just before the commit, so the checkpoint never runs ahead of what is durable.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use sensor_ebpf::FoldKey;
use tokio::sync::mpsc;

use crate::{
    event::{Clock, Event, decode},
    fold::FoldTracker,
    kernel_maps::FoldMap,
    ring::Ring,
};

/// Longest time a record waits in the ring before the reader looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Most events handed downstream in one batch. Events go downstream in batches, one per
/// drain of the ring at most this large, so the next stage wakes once per drain rather than
/// once per event (a thread wakeup costs more than the event it carries).
pub const BATCH_MAX: usize = 256;
/// Longest a batch holding only bookkeeping events ([`Event::is_bookkeeping`]) waits for an
/// event worth reporting before it goes downstream anyway: a host that starts processes by
/// the thousand then wakes the next stage a few times a second, not at every drain.
pub const BOOKKEEPING_DELAY: Duration = Duration::from_millis(100);
/// Longest time a record waits in the ring while the reader holds only bookkeeping: under a
/// fork storm every drain brings bookkeeping alone, and polling at [`POLL_INTERVAL`] would
/// wake the reader a hundred times a second for it. An event worth reporting then waits at
/// most this long before it is read.
pub const HELD_POLL_INTERVAL: Duration = Duration::from_millis(40);
/// How often fold tails (occurrences no record carried) are collected from the kernel.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// On stop, how long the reader waits for downstream to make what it read durable.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Counters of the reader, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ReaderStats {
    pub records: AtomicU64,
    pub undecodable: AtomicU64,
    /// Occurrences delivered (records plus fold tails, weighted by their counts).
    pub occurrences: AtomicU64,
    /// Ring position handed back to the kernel.
    pub committed_pos: AtomicU64,
    /// Records the kernel counted as lost whose occurrences a fold sweep still reported (keys
    /// with no record delivered at all).
    pub recovered_records: AtomicU64,
}

/// The highest mark a sink has made durable, and a wakeup for the reader so it commits at
/// once (the window in which a killed sensor leaves records that are durable but not yet
/// committed, which the next one would deliver again, stays as short as it can).
#[derive(Debug)]
pub struct DurableMark {
    mark: AtomicU64,
    wake: Option<OwnedFd>,
}

impl Default for DurableMark {
    fn default() -> Self {
        // SAFETY: eventfd has no memory preconditions; a negative result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        // SAFETY: a fresh descriptor that nothing else owns.
        let wake = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        Self { mark: AtomicU64::new(0), wake }
    }
}

impl DurableMark {
    /// Everything up to `mark` is durable.
    pub fn advance(&self, mark: u64) {
        if mark > self.mark.fetch_max(mark, Ordering::AcqRel)
            && let Some(fd) = &self.wake
        {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
            unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }

    pub fn get(&self) -> u64 {
        self.mark.load(Ordering::Acquire)
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.wake.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// Clears a pending wakeup.
    fn reset(&self) {
        if let Some(fd) = &self.wake {
            let mut n = 0u64;
            // SAFETY: reads 8 bytes into a valid u64 from a non-blocking eventfd we own.
            unsafe { libc::read(fd.as_raw_fd(), (&raw mut n).cast(), 8) };
        }
    }
}

/// How far downstream has got with the events the reader sent, by mark.
///
/// Two stages: an optional middle stage (the enricher: one event in, zero or more observations
/// out, in order) and the sink. The middle stage stores `emitted` (the mark of the last
/// observation it sent, which carries its event's mark on the last observation made from it)
/// and then `seen` (the mark of the last event it finished); the sink stores `durable` (the
/// highest mark it has made durable). Every hop is a FIFO, so a mark is done when the sink has
/// made it durable, or when the middle stage has seen it and everything it emitted is durable.
#[derive(Debug, Default)]
pub struct Progress {
    middle: AtomicBool,
    seen: AtomicU64,
    emitted: AtomicU64,
    durable: Arc<DurableMark>,
    /// The sink is gone: nothing will become durable any more.
    closed: AtomicBool,
}

impl Progress {
    /// There is a middle stage (see [`Progress::stage_emitted`], [`Progress::stage_seen`]).
    pub fn with_middle_stage(self) -> Self {
        self.middle.store(true, Ordering::Relaxed);
        self
    }

    /// The middle stage sent an observation carrying `mark`.
    pub fn stage_emitted(&self, mark: u64) {
        self.emitted.store(mark, Ordering::Release);
    }

    /// The middle stage finished the event with `mark` (after any [`Progress::stage_emitted`]).
    pub fn stage_seen(&self, mark: u64) {
        self.seen.store(mark, Ordering::Release);
    }

    /// The sink made everything up to `mark` durable.
    pub fn durable(&self, mark: u64) {
        self.durable.advance(mark);
    }

    /// What the sink advances.
    pub fn durable_counter(&self) -> Arc<DurableMark> {
        Arc::clone(&self.durable)
    }

    /// The sink will make nothing more durable.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Every mark up to the result is done.
    pub fn done(&self) -> u64 {
        if !self.middle.load(Ordering::Relaxed) {
            return self.durable.get();
        }
        // Order matters: `seen` first, then `emitted`, then `durable` (see the type's docs).
        let seen = self.seen.load(Ordering::Acquire);
        let emitted = self.emitted.load(Ordering::Acquire);
        let durable = self.durable.get();
        if durable >= emitted { seen } else { durable }
    }
}

/// A running reader thread; [`ReaderHandle::stop`] or drop ends it.
pub struct ReaderHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<ReaderStats>,
}

impl ReaderHandle {
    /// Stops reading new records and closes the event channel; the thread keeps committing
    /// what downstream makes durable until everything read is, or the sink closes. Returns at
    /// once; [`ReaderHandle::stop`] waits.
    pub fn stop_reading(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stop(&mut self) {
        self.stop_reading();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ReaderHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An event sent but not yet done: where the ring may be committed to once it is, and the
/// fold total to checkpoint then.
struct Pending {
    mark: u64,
    ring_pos: u64,
    fold: Option<(FoldKey, u64)>,
}

struct Reader {
    ring: Ring,
    fold_map: FoldMap,
    folds: FoldTracker,
    tx: Option<mpsc::Sender<Vec<Event>>>,
    /// Events read but not yet handed downstream.
    batch: Vec<Event>,
    /// When the batch got its first event, and whether it holds one worth reporting.
    batch_started: Instant,
    batch_urgent: bool,
    clock: Clock,
    progress: Arc<Progress>,
    stats: Arc<ReaderStats>,
    pending: VecDeque<Pending>,
    next_mark: u64,
}

impl Reader {
    /// Queues `event` with the next mark, handing the batch downstream when it is full;
    /// false when downstream is gone.
    fn send(&mut self, mut event: Event, ring_pos: u64) -> bool {
        if self.tx.is_none() {
            return false;
        }
        self.next_mark += 1;
        event.mark = self.next_mark;
        self.pending.push_back(Pending { mark: event.mark, ring_pos, fold: event.fold });
        self.stats.occurrences.fetch_add(u64::from(event.count), Ordering::Relaxed);
        if self.batch.is_empty() {
            self.batch_started = Instant::now();
        }
        self.batch_urgent |= !event.is_bookkeeping();
        self.batch.push(event);
        self.batch.len() < BATCH_MAX || self.flush()
    }

    /// Hands the queued events downstream unless they are only bookkeeping younger than
    /// [`BOOKKEEPING_DELAY`]; false when downstream is gone.
    fn flush_due(&mut self) -> bool {
        if self.batch_urgent || self.batch_started.elapsed() >= BOOKKEEPING_DELAY {
            self.flush()
        } else {
            self.tx.is_some()
        }
    }

    /// How long to wait for the ring before draining it again: [`POLL_INTERVAL`], or up to
    /// [`HELD_POLL_INTERVAL`] while a batch of bookkeeping alone is held, but never past the
    /// moment that batch is due downstream.
    fn poll_interval(&self) -> Duration {
        if self.batch.is_empty() || self.batch_urgent {
            return POLL_INTERVAL;
        }
        let due = BOOKKEEPING_DELAY.saturating_sub(self.batch_started.elapsed());
        due.clamp(POLL_INTERVAL, HELD_POLL_INTERVAL)
    }

    /// Hands the queued events downstream; false when downstream is gone.
    fn flush(&mut self) -> bool {
        let Some(tx) = &self.tx else { return false };
        if self.batch.is_empty() {
            return true;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_MAX));
        self.batch_urgent = false;
        tx.blocking_send(batch).is_ok()
    }

    /// Drains the ring; false when downstream is gone or the reader is told to stop.
    fn drain(&mut self, stop: &AtomicBool) -> bool {
        while !stop.load(Ordering::Relaxed) {
            let Some(record) = self.ring.next() else { return self.flush_due() };
            let end = record.end;
            self.stats.records.fetch_add(1, Ordering::Relaxed);
            match decode(record.data, &self.clock) {
                Ok(mut event) => {
                    event.ring_pos = end;
                    let Some(event) = self.folds.on_event(event) else { continue };
                    if !self.send(event, end) {
                        return false;
                    }
                }
                Err(error) => {
                    self.stats.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "undecodable ring buffer record dropped");
                }
            }
        }
        false
    }

    /// Reports fold tails no record carried; false when downstream is gone.
    fn sweep(&mut self) -> bool {
        let entries = self.fold_map.entries();
        let tails = self.folds.sweep(&entries, self.clock.now_unix_ns(), boot_now_ns());
        self.stats.recovered_records.store(self.folds.recovered_records(), Ordering::Relaxed);
        // A tail covers no record: every record before the read cursor was sent before it.
        let pos = self.ring.read_pos();
        tails.into_iter().all(|tail| self.send(tail, pos)) && self.flush()
    }

    /// Commits the ring up to what downstream has made durable, checkpointing the fold totals
    /// that came with it first. Returns true when nothing sent is outstanding.
    fn commit(&mut self) -> bool {
        let done = self.progress.done();
        let mut upto = None;
        let mut checkpoint = Vec::new();
        while let Some(p) = self.pending.front().filter(|p| p.mark <= done) {
            upto = Some(p.ring_pos);
            checkpoint.extend(p.fold);
            self.pending.pop_front();
        }
        // Nothing outstanding: records read after the last event sent were dropped here.
        let upto = if self.pending.is_empty() { Some(self.ring.read_pos()) } else { upto };
        if !checkpoint.is_empty() {
            self.fold_map.checkpoint(&checkpoint);
        }
        if let Some(pos) = upto {
            self.ring.commit(pos);
            self.stats.committed_pos.store(self.ring.committed(), Ordering::Relaxed);
        }
        self.pending.is_empty()
    }

    fn run(mut self, stop: &AtomicBool) {
        let reported = self.fold_map.reported();
        if !reported.is_empty() {
            tracing::info!(
                keys = reported.len(),
                "continuing fold counts from the previous sensor"
            );
        }
        self.folds.seed(&reported);
        if self.ring.read_pos() != self.ring.producer_pos() {
            tracing::info!(
                bytes = self.ring.producer_pos() - self.ring.read_pos(),
                "draining what the ring kept while no sensor ran"
            );
        }
        let mut last_sweep = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if !self.drain(stop) {
                break;
            }
            if last_sweep.elapsed() >= SWEEP_INTERVAL {
                last_sweep = Instant::now();
                if !self.sweep() {
                    break;
                }
            }
            self.commit();
            self.ring.wait(self.poll_interval(), self.progress.durable.wake_fd());
            self.progress.durable.reset();
        }
        // Hand over what is held back, close the channel so the stages flush, then commit what
        // they make durable.
        self.flush();
        self.tx = None;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let closed = self.progress.is_closed();
            if self.commit() || closed {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    events = self.pending.len(),
                    "stopping with events not yet durable; they stay in the ring for the next start"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Starts draining `ring` into `tx`, in batches of at most [`BATCH_MAX`] events. Sending
/// blocks when downstream is full, which leaves records in the ring (where the kernel counts
/// any it cannot queue) rather than in memory. The ring is committed as `progress` reports
/// events done.
pub fn spawn(
    ring: Ring,
    fold_map: FoldMap,
    folds: FoldTracker,
    tx: mpsc::Sender<Vec<Event>>,
    clock: Clock,
    progress: Arc<Progress>,
) -> ReaderHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ReaderStats::default());
    let reader = Reader {
        ring,
        fold_map,
        folds,
        tx: Some(tx),
        batch: Vec::with_capacity(BATCH_MAX),
        batch_started: Instant::now(),
        batch_urgent: false,
        clock,
        progress,
        stats: Arc::clone(&stats),
        pending: VecDeque::new(),
        next_mark: 0,
    };
    let thread = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || reader.run(&stop))
            .expect("spawning the ring reader thread")
    };
    ReaderHandle { stop, thread: Some(thread), stats }
}

/// `CLOCK_BOOTTIME` in nanoseconds: the clock the kernel stamps records with.
fn boot_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid clock id and out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
