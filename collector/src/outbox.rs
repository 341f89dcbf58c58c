//! The delivery worker: claims due deliveries from the persisted outbox, sends each to its sink,
//! and records every attempt; fires escalation timers that are due.
//!
//! Row life: `pending` (attempts, last_error, next_attempt_at) → `delivered`. A failed attempt
//! is due again after a jittered exponential backoff; a claimed row is leased, so deliveries
//! claimed by a worker that died come back after the lease. Every body carries a
//! `delivery_id` (also the `Keywatch-Delivery` and `Idempotency-Key` headers): delivery is at
//! least once, and receivers dedupe on that id.

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::{
    clock::Clock,
    registry::RegistryHandle,
    route::{self, Sink, TeamRoute},
    store::{ClaimedDelivery, Store, StoreError},
};

/// Timing of the delivery worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// How often the outbox and the escalation timers are looked at (default 1 s).
    pub poll: Duration,
    /// Backoff after the first failed attempt (default 2 s); doubles, with jitter.
    pub min_delay: Duration,
    /// Longest backoff (default 5 min): a sink that is down gets its deliveries within this
    /// long of coming back.
    pub max_delay: Duration,
    /// How long a claimed delivery is reserved for the worker that claimed it (default 2 min).
    pub lease: Duration,
    /// Timeout of one HTTP attempt (default 10 s).
    pub timeout: Duration,
    /// Deliveries claimed per pass (default 64).
    pub batch: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            min_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(300),
            lease: Duration::from_secs(120),
            timeout: Duration::from_secs(10),
            batch: 64,
        }
    }
}

impl OutboxConfig {
    /// The wait after the `attempts`-th failed attempt (1-based): exponential with jitter.
    pub fn backoff(&self, attempts: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay)
            .min(self.max_delay.saturating_mul(2))
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub escalated: usize,
    pub delivered: usize,
    pub failed: usize,
}

/// The worker.
pub struct Dispatcher {
    store: Arc<dyn Store>,
    registry: Arc<RegistryHandle>,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    config: OutboxConfig,
    /// Ends the wait for the next poll early (new alerts were stored).
    wake: Arc<tokio::sync::Notify>,
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for deliveries")]
pub struct HttpClientError(#[from] reqwest::Error);

impl Dispatcher {
    /// A worker over the store's outbox.
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<RegistryHandle>,
        clock: Arc<dyn Clock>,
        config: OutboxConfig,
    ) -> Result<Self, HttpClientError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("keywatch/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { store, registry, clock, http, config, wake: Arc::default() })
    }

    /// Runs a pass as soon as `wake` is notified, not only every `poll`.
    pub fn with_wake(mut self, wake: Arc<tokio::sync::Notify>) -> Self {
        self.wake = wake;
        self
    }

    /// Runs passes every `poll`, and at once when woken, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                () = self.wake.notified() => {}
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "delivery pass failed; retrying");
            }
        }
    }

    /// One pass: fires due escalations, then attempts every due delivery once.
    pub async fn pass(&self) -> Result<Pass, StoreError> {
        let mut pass = Pass { escalated: self.escalate().await?, ..Pass::default() };
        let (store, now) = (self.store.clone(), self.clock.now());
        let lease = chrono::Duration::from_std(self.config.lease).unwrap_or_default();
        let batch = self.config.batch;
        let claimed = blocking(move || store.claim_deliveries(now, lease, batch)).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for d in claimed {
            let http = self.http.clone();
            tasks.spawn(async move {
                let result = send(&http, &d).await;
                (d, result)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((d, result)) = joined else { continue };
            let at = self.clock.now();
            let attempts = d.attempts + 1;
            let retry_at =
                at + chrono::Duration::from_std(self.config.backoff(attempts)).unwrap_or_default();
            match &result {
                Ok(()) => {
                    pass.delivered += 1;
                    tracing::info!(delivery = %d.delivery_id, team = %d.team, sink = %d.sink.describe(), attempts, "delivered");
                }
                Err(e) => {
                    pass.failed += 1;
                    tracing::warn!(delivery = %d.delivery_id, team = %d.team, sink = %d.sink.describe(), attempts, error = %e, retry_at = %retry_at, "delivery failed; will retry");
                }
            }
            let store = self.store.clone();
            blocking(move || store.finish_delivery(d.id, result.err(), at, retry_at)).await?;
        }
        Ok(pass)
    }

    async fn escalate(&self) -> Result<usize, StoreError> {
        let (store, now) = (self.store.clone(), self.clock.now());
        let due = blocking(move || store.due_escalations(now, 256)).await?;
        let mut fired = 0;
        for e in due {
            let reg = self.registry.snapshot();
            let to = reg.teams.get(&e.to_team).map(TeamRoute::of).unwrap_or_default();
            let store = self.store.clone();
            let e2 = e.clone();
            if blocking(move || store.fire_escalation(&e2, to.sinks, to.escalate, now)).await? {
                fired += 1;
                tracing::warn!(alert = e.alert_id, from = %e.from_team, to = %e.to_team, level = e.level, "alert not acknowledged in time; escalated");
            }
        }
        Ok(fired)
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| StoreError::Closed)?
}

/// One attempt at one delivery.
async fn send(http: &reqwest::Client, d: &ClaimedDelivery) -> Result<(), String> {
    let (url, body) = match &d.sink {
        Sink::Webhook { url } => (url, d.payload.clone()),
        Sink::Slack { url } => (url, route::slack_body(&d.payload)),
        Sink::Pagerduty { url, routing_key } => {
            (url, route::pagerduty_body(&d.payload, routing_key))
        }
        Sink::Jsonl { path } => return append_line(path, &d.payload).await,
    };
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let response = http
        .post(url.as_str())
        .header("content-type", "application/json")
        .header("keywatch-delivery", &d.delivery_id)
        .header("idempotency-key", &d.delivery_id)
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let e = e.without_url();
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            msg
        })?;
    let status = response.status();
    if status.is_success() { Ok(()) } else { Err(format!("HTTP {status}")) }
}

async fn append_line(path: &str, body: &serde_json::Value) -> Result<(), String> {
    let mut line = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    f.write_all(&line).await.map_err(|e| format!("cannot append to {path}: {e}"))?;
    f.flush().await.map_err(|e| format!("cannot append to {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = OutboxConfig {
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            ..OutboxConfig::default()
        };
        assert!(c.backoff(1) >= Duration::from_secs(1) && c.backoff(1) <= Duration::from_secs(2));
        assert!(c.backoff(4) >= Duration::from_secs(8));
        assert!(c.backoff(40) <= Duration::from_secs(120));
    }
}
