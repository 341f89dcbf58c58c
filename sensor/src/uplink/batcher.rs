//! Observations → encoded events → batches for the spool: a batch goes when it is full (events
//! or bytes) or [`BatchLimits::max_delay`] after its first event, whichever comes first, so a
//! lone event is on its way within the delay and a burst is written in large group commits.

use tokio::{sync::mpsc, time::Instant};

use super::{BatchLimits, spooler::Batch};
use crate::{convert::encode_observation, observation::Observation};

/// Runs until `observations` closes (then flushes) or the spool thread is gone. Each batch
/// carries the highest mark of its observations, for the spool thread to report durable.
pub async fn run(
    mut observations: mpsc::Receiver<Observation>,
    appends: mpsc::Sender<Batch>,
    limits: BatchLimits,
) {
    let mut batch = Batch::with_capacity(limits.max_events);
    let mut bytes = 0usize;
    let mut deadline: Option<Instant> = None;
    let add = |batch: &mut Batch, o: &Observation| {
        let encoded = encode_observation(o);
        batch.mark = batch.mark.max(o.mark);
        batch.events.push(encoded);
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
                    return;
                }
            },
            () = sleep_until(deadline) => true,
        };
        if flush && !batch.is_empty() {
            let full = std::mem::replace(&mut batch, Batch::with_capacity(limits.max_events));
            bytes = 0;
            deadline = None;
            if appends.send(full).await.is_err() {
                return;
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
        }
    }

    fn limits() -> BatchLimits {
        BatchLimits { max_events: 10, max_bytes: 1 << 20, max_delay: Duration::from_millis(50) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_event_goes_after_the_delay() {
        let (tx, rx) = mpsc::channel(100);
        let (atx, mut arx) = mpsc::channel(4);
        tokio::spawn(run(rx, atx, limits()));
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
        tokio::spawn(run(rx, atx, limits()));
        let start = Instant::now();
        let first = arx.recv().await.unwrap();
        assert_eq!((first.events.len(), first.mark), (10, 10));
        assert_eq!(arx.recv().await.unwrap().events.len(), 10);
        assert_eq!(start.elapsed(), Duration::ZERO);
        drop(tx);
        assert_eq!(arx.recv().await.unwrap().events.len(), 5, "the rest is flushed on close");
        assert!(arx.recv().await.is_none());
    }
}
