//! Observations → encoded events → batches for the spool: a batch goes when it is full (events
//! or bytes) or [`BatchLimits::max_delay`] after its first event, whichever comes first, so a
//! lone event is on its way within the delay and a burst is written in large group commits.

use tokio::{sync::mpsc, time::Instant};

use super::{BatchLimits, spooler::Batch};
use crate::{convert::encode_observation, observation::Observation};

/// Runs until `observations` closes (then flushes) or the spool thread is gone. Each batch
/// carries the highest mark and ring position of its observations, for the spool thread to
/// checkpoint and report durable.
///
/// Observations made from ring records that end at or before `spooled_through` are already in
/// the spool (a previous sensor was killed after writing them and before releasing their
/// records): they are dropped here, their marks still passed on so that the ring is released.
pub async fn run(
    mut observations: mpsc::Receiver<Observation>,
    appends: mpsc::Sender<Batch>,
    limits: BatchLimits,
    spooled_through: Option<u64>,
) {
    let mut batch = Batch::with_capacity(limits.max_events);
    let mut bytes = 0usize;
    let mut deadline: Option<Instant> = None;
    let mut already_spooled = 0u64;
    let mut add = |batch: &mut Batch, o: &Observation| {
        batch.mark = batch.mark.max(o.mark);
        batch.ring_pos = batch.ring_pos.max(o.ring_pos);
        if spooled_through.is_some_and(|end| o.ring_pos != 0 && o.ring_pos <= end) {
            if already_spooled == 0 {
                tracing::info!("skipping events a previous sensor had already spooled");
            }
            already_spooled += 1;
            return 0;
        }
        let skipped = std::mem::take(&mut already_spooled);
        if skipped > 0 {
            tracing::info!(
                events = skipped,
                "skipped events a previous sensor had already spooled"
            );
        }
        batch.events.push(encode_observation(o));
        batch.events.last().map_or(0, Vec::len)
    };
    loop {
        let flush = tokio::select! {
            o = observations.recv() => match o {
                Some(o) => {
                    bytes += add(&mut batch, &o);
                    deadline.get_or_insert_with(|| Instant::now() + limits.max_delay);
                    // Take whatever else is already queued without waiting.
                    while batch.events.len() < limits.max_events && bytes < limits.max_bytes {
                        let Ok(o) = observations.try_recv() else { break };
                        bytes += add(&mut batch, &o);
                    }
                    batch.events.len() >= limits.max_events || bytes >= limits.max_bytes
                }
                None => {
                    if !batch.is_empty() {
                        let _ = appends.send(std::mem::take(&mut batch)).await;
                    }
                    break;
                }
            },
            () = sleep_until(deadline) => true,
        };
        if flush && !batch.is_empty() {
            let full = std::mem::replace(&mut batch, Batch::with_capacity(limits.max_events));
            bytes = 0;
            deadline = None;
            if appends.send(full).await.is_err() {
                break;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::observation::{Identity, What};

    fn obs(i: u32) -> Observation {
        Observation {
            time_ns: 1,
            count: 1,
            process: Identity { pid: i + 1, ..Default::default() },
            what: What::Fork { child_pid: i },
            mark: u64::from(i) + 1,
            ring_pos: u64::from(i) * 16 + 16,
        }
    }

    fn limits() -> BatchLimits {
        BatchLimits { max_events: 10, max_bytes: 1 << 20, max_delay: Duration::from_millis(50) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_event_goes_after_the_delay() {
        let (tx, rx) = mpsc::channel(100);
        let (atx, mut arx) = mpsc::channel(4);
        tokio::spawn(run(rx, atx, limits(), None));
        let start = Instant::now();
        tx.send(obs(1)).await.unwrap();
        let batch = arx.recv().await.unwrap();
        assert_eq!((batch.events.len(), batch.mark), (1, 2));
        assert_eq!(start.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once() {
        let (tx, rx) = mpsc::channel(100);
        let (atx, mut arx) = mpsc::channel(4);
        for i in 0..25 {
            tx.send(obs(i)).await.unwrap();
        }
        tokio::spawn(run(rx, atx, limits(), None));
        let start = Instant::now();
        let first = arx.recv().await.unwrap();
        assert_eq!((first.events.len(), first.mark), (10, 10));
        assert_eq!(arx.recv().await.unwrap().events.len(), 10);
        assert_eq!(start.elapsed(), Duration::ZERO);
        drop(tx);
        assert_eq!(arx.recv().await.unwrap().events.len(), 5, "the rest is flushed on close");
        assert!(arx.recv().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn events_already_spooled_are_dropped_but_their_marks_pass() {
        let (tx, rx) = mpsc::channel(100);
        let (atx, mut arx) = mpsc::channel(4);
        // Observations 0..5 end at ring positions 16..=80; the spool holds up to 48 (0, 1, 2).
        for i in 0..5 {
            tx.send(obs(i)).await.unwrap();
        }
        drop(tx);
        tokio::spawn(run(rx, atx, limits(), Some(48)));
        let batch = arx.recv().await.unwrap();
        assert_eq!(batch.events.len(), 2, "only observations 3 and 4 are new");
        assert_eq!((batch.mark, batch.ring_pos), (5, 80));

        let (tx, rx) = mpsc::channel(100);
        let (atx, mut arx) = mpsc::channel(4);
        tx.send(obs(0)).await.unwrap();
        tokio::spawn(run(rx, atx, limits(), Some(48)));
        let batch = arx.recv().await.unwrap();
        assert!(batch.events.is_empty(), "nothing new to spool");
        assert_eq!(batch.mark, 1, "but the mark still goes on, to release the ring");
    }
}
