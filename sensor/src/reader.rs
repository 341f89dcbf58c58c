//! Drains the kernel ring buffer on its own thread and hands decoded events downstream.
//!
//! The kernel submits records without waking the reader (a wakeup per record costs several
//! times the event), so the reader polls the ring on a short timer; an explicit wakeup still
//! ends the wait early.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc;

use crate::{
    event::{Clock, Event, decode},
    fold::FoldTracker,
    kernel_maps::FoldMap,
};

/// Longest time a record waits in the ring before the reader looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How often fold tails (occurrences no record carried) are collected from the kernel.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// Counters of the reader, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct ReaderStats {
    pub records: AtomicU64,
    pub undecodable: AtomicU64,
    /// Occurrences delivered (records plus fold tails, weighted by their counts).
    pub occurrences: AtomicU64,
}

/// A running reader thread; [`ReaderHandle::stop`] or drop ends it.
pub struct ReaderHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<ReaderStats>,
}

impl ReaderHandle {
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

/// Starts draining `ring` into `tx`. Sending blocks when downstream is full, which leaves
/// records in the ring (where the kernel counts any it cannot queue) rather than in memory.
pub fn spawn(
    mut ring: RingBuf<MapData>,
    mut fold_map: FoldMap,
    mut folds: FoldTracker,
    tx: mpsc::Sender<Event>,
    clock: Clock,
) -> ReaderHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ReaderStats::default());
    let thread = {
        let stop = Arc::clone(&stop);
        let stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || {
                let send = |event: Event| {
                    stats.occurrences.fetch_add(u64::from(event.count), Ordering::Relaxed);
                    tx.blocking_send(event).is_ok()
                };
                let reported = fold_map.reported();
                if !reported.is_empty() {
                    tracing::info!(
                        keys = reported.len(),
                        "continuing fold counts from the previous sensor"
                    );
                }
                folds.seed(&reported);
                let mut last_sweep = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    while let Some(record) = ring.next() {
                        stats.records.fetch_add(1, Ordering::Relaxed);
                        match decode(&record, &clock) {
                            Ok(event) => {
                                let Some(event) = folds.on_event(event) else { continue };
                                if !send(event) {
                                    return; // downstream gone: the sensor is stopping
                                }
                            }
                            Err(error) => {
                                stats.undecodable.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%error, "undecodable ring buffer record dropped");
                            }
                        }
                    }
                    // Checkpoint what was reported, so a restarted sensor does not repeat it.
                    let dirty = folds.take_dirty();
                    if !dirty.is_empty() {
                        fold_map.checkpoint(&dirty);
                    }
                    if last_sweep.elapsed() >= SWEEP_INTERVAL {
                        last_sweep = std::time::Instant::now();
                        let entries = fold_map.entries();
                        let tails = folds.sweep(&entries, clock.now_unix_ns(), boot_now_ns());
                        for tail in tails {
                            if !send(tail) {
                                return;
                            }
                        }
                    }
                    wait_readable(&ring, POLL_INTERVAL);
                }
            })
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

fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut pfd = libc::pollfd { fd: ring.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; the result only shortens the wait.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
}
