//! The uplink: observations to the collector, losslessly.
//!
//! ```text
//! observations ─▶ batcher (encode, 1,000 events / 1 MiB / 50 ms) ─▶ spool thread (append,
//!   group commit, fsync) ─▶ sender (read unacked in seq order, EventBatch) ─▶ collector
//!                                  ▲                                   │
//!                                  └──────── spool.ack ◀── Ack{up_to} ─┘   Policy ─▶ watches
//! ```
//!
//! Every stage is joined to the next by a bounded channel: when the disk or the collector
//! cannot keep up, the observation channel fills, the agent stops draining the ring buffer and
//! the kernel counts what it drops (reported in heartbeats). Once a batch is synced, the spool
//! thread reports its highest observation mark durable, and only then does the ring reader
//! release the records behind it (see [`crate::reader`]). An event is acked by the collector
//! only after it is stored, and released from the spool only then; after any reconnect or
//! restart the sender starts again at the first unacked seq.
//!
//! Security: enrollment with a join token (see [`enroll`]), then mTLS; or, with
//! [`Security::Insecure`], plaintext (logged loudly).

pub mod batcher;
pub mod enroll;
pub mod spooler;
pub mod stream;
pub mod tls;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64},
    },
    time::{Duration, Instant},
};

use keywatch_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    observation::Observation,
    ring::{RingCheckpoint, RingIdentity},
    spool::{OpenReport, Spool, SpoolError, SpoolOptions, SyncPolicy},
};
pub use enroll::JoinToken;
pub use spooler::SpoolStats;
pub use tls::Target;

/// The collector's sensor port.
pub const DEFAULT_PORT: u16 = 7480;
/// Default state directory: identity, last policy, spool.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/keywatch-sensor";
/// The last policy received, used at start while the collector is unreachable.
pub const POLICY_FILE: &str = "policy.json";

/// When the batcher closes a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    /// A batch goes at most this long after its first event.
    pub max_delay: Duration,
}

impl Default for BatchLimits {
    /// 1,000 events or 1 MiB keep a batch well under the collector's 16 MiB message limit and
    /// in the size range where its store commits fastest; 50 ms bounds the delay a quiet host
    /// adds to an alert.
    fn default() -> Self {
        Self { max_events: 1000, max_bytes: 1024 * 1024, max_delay: Duration::from_millis(50) }
    }
}

/// How the sensor proves who it is and checks the collector.
#[derive(Debug, Clone)]
pub enum Security {
    /// Plaintext, no enrollment. Both sides must say `--insecure`.
    Insecure,
    /// mTLS with the identity in `state_dir`, enrolling with `token` first when there is none.
    Mtls { state_dir: PathBuf, token: Option<JoinToken> },
}

/// Everything [`Uplink::start`] needs.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    pub target: Target,
    pub security: Security,
    /// Sent as the Hello (its `host_id` names this host in every batch).
    pub hello: pb::Hello,
    pub spool_dir: PathBuf,
    pub spool: SpoolOptions,
    pub batch: BatchLimits,
    pub heartbeat: Duration,
    /// Wait between attempts while the collector refuses this sensor.
    pub refused_retry: Duration,
    /// Events held in memory while the disk is full, at most (bytes).
    pub max_held_bytes: usize,
}

impl UplinkConfig {
    /// Defaults for everything but where to connect and who this is.
    pub fn new(target: Target, security: Security, hello: pb::Hello, spool_dir: PathBuf) -> Self {
        Self {
            target,
            security,
            hello,
            spool_dir,
            spool: SpoolOptions {
                // Records are sendable once synced: sync often, and at once when idle.
                sync: SyncPolicy::Interval(Duration::from_millis(10)),
                ..SpoolOptions::default()
            },
            batch: BatchLimits::default(),
            heartbeat: Duration::from_secs(10),
            refused_retry: Duration::from_secs(180),
            max_held_bytes: spooler::SpoolerOptions::default().max_held_bytes,
        }
    }
}

/// Why the uplink could not start.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot open the spool in {dir}")]
    Spool {
        dir: PathBuf,
        #[source]
        source: SpoolError,
    },
    #[error(transparent)]
    Enroll(#[from] enroll::EnrollError),
    #[error("cannot start the spool thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Counters of the sender.
#[derive(Debug, Default)]
pub struct UplinkCounters {
    pub connected: AtomicBool,
    pub reconnects: AtomicU64,
    pub batches_sent: AtomicU64,
    /// Highest `Ack.up_to` received.
    pub acked: AtomicU64,
    /// Events in batches the collector refused as malformed (dropped).
    pub rejected_events: AtomicU64,
}

/// A running uplink. Dropping the observation sender and then calling [`Uplink::shutdown`]
/// flushes, waits briefly for outstanding acks and stops.
pub struct Uplink {
    cancel: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    spool_thread: Option<std::thread::JoinHandle<()>>,
    acked: watch::Receiver<u64>,
    policy: watch::Receiver<Option<pb::Policy>>,
    kernel_lost: watch::Sender<Vec<(String, u64)>>,
    /// What the spool found when it opened.
    pub open_report: OpenReport,
    pub spool_stats: Arc<SpoolStats>,
    pub counters: Arc<UplinkCounters>,
}

impl Uplink {
    /// Opens the spool, enrolls when needed and possible (a collector that cannot be reached is
    /// retried in the background; a refusal or a CA mismatch is an error) and starts the
    /// pipeline reading `observations`.
    pub async fn start(
        config: UplinkConfig,
        observations: mpsc::Receiver<Observation>,
    ) -> Result<Self, UplinkError> {
        Self::start_tracked(config, observations, Arc::default(), None).await
    }

    /// [`Uplink::start`], storing in `durable_mark` the highest [`Observation::mark`] that is
    /// in the spool and synced (everything before it is too): what the ring reader may release.
    ///
    /// With `ring` (the ring buffer the observations come from), each batch is spooled with
    /// the ring position it reaches, and observations from records the spool already holds
    /// (a sensor killed between spooling and releasing them) are not spooled twice.
    pub async fn start_tracked(
        config: UplinkConfig,
        observations: mpsc::Receiver<Observation>,
        durable_mark: Arc<crate::reader::DurableMark>,
        ring: Option<RingIdentity>,
    ) -> Result<Self, UplinkError> {
        let mut identity = None;
        match &config.security {
            Security::Insecure => {
                tracing::warn!(collector = %config.target.authority, "INSECURE: events go to the collector in plaintext, unauthenticated (--insecure)");
            }
            Security::Mtls { state_dir, token } => {
                enroll::prepare_state_dir(state_dir)?;
                identity = enroll::load_identity(state_dir)?;
                match (&identity, token) {
                    (None, None) => {
                        return Err(
                            enroll::EnrollError::NoIdentity { dir: state_dir.clone() }.into()
                        );
                    }
                    (None, Some(token)) => {
                        match enroll::enroll(
                            &config.target,
                            token,
                            &config.hello.host_id,
                            state_dir,
                        )
                        .await
                        {
                            Ok(id) => identity = Some(id),
                            Err(e) if e.is_transient() => {
                                tracing::warn!(error = %e, "enrollment postponed; events are spooled meanwhile");
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    (Some(_), Some(_)) => {
                        tracing::info!(state_dir = %state_dir.display(), "already enrolled; the join token is not needed any more");
                    }
                    (Some(_), None) => {}
                }
            }
        }

        let dir = config.spool_dir.clone();
        let open_dir = dir.clone();
        let opts = config.spool;
        let (spool, report) = tokio::task::spawn_blocking(move || Spool::open(&open_dir, opts))
            .await
            .map_err(|e| UplinkError::Thread(std::io::Error::other(e)))?
            .map_err(|source| UplinkError::Spool { dir: dir.clone(), source })?;
        log_open_report(&dir, &report);
        let spooled_through = spooled_through(&report, ring);
        // Heartbeats count evictions from this base: evictions a previous run could not report
        // (the collector was away) count as new in this run's first heartbeat.
        let unreported: u64 = spool
            .pending_gaps()
            .iter()
            .filter(|g| g.cause == crate::spool::GapCause::Evicted)
            .map(|g| g.events)
            .sum();
        let evicted_base = report.evicted_total.saturating_sub(unreported);

        let (appends_tx, appends_rx) = mpsc::channel(4);
        let spooler_opts =
            spooler::SpoolerOptions { max_held_bytes: config.max_held_bytes, ..Default::default() };
        let (handle, spool_thread) =
            spooler::spawn(spool, &report, appends_rx, spooler_opts, durable_mark, ring)
                .map_err(UplinkError::Thread)?;

        let cancel = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let (kernel_lost, kernel_lost_rx) = watch::channel(Vec::new());
        let (policy_tx, policy) = watch::channel(None);
        let counters = Arc::new(UplinkCounters::default());
        tasks.spawn(batcher::run(observations, appends_tx, config.batch, spooled_through));
        let sender = stream::Sender {
            target: config.target.clone(),
            security: config.security.clone(),
            host_id: Arc::from(config.hello.host_id.as_str()),
            hello: pb::Hello { spool_id: report.spool_id.clone(), ..config.hello.clone() },
            spool: handle.clone(),
            kernel_lost: kernel_lost_rx,
            policy: policy_tx,
            limits: config.batch,
            heartbeat: config.heartbeat,
            refused_retry: config.refused_retry,
            started: Instant::now(),
            counters: counters.clone(),
            identity,
            evicted_base,
            kernel_counters_id: ring.map(|r| r.to_string()).unwrap_or_default(),
        };
        tasks.spawn(sender.run(cancel.clone()));
        if matches!(config.security, Security::Insecure) {
            let (cancel, target) = (cancel.clone(), config.target.authority.clone());
            tasks.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                every.tick().await;
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        _ = every.tick() => tracing::warn!(collector = %target, "INSECURE: the uplink is plaintext and unauthenticated (--insecure)"),
                    }
                }
            });
        }
        tasks.close();
        Ok(Self {
            cancel,
            tasks,
            spool_thread: Some(spool_thread),
            acked: handle.acked.clone(),
            policy,
            kernel_lost,
            open_report: report,
            spool_stats: handle.stats.clone(),
            counters,
        })
    }

    /// The acked watermark: every seq up to it is stored by the collector.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked.clone()
    }

    /// The latest policy the collector sent (`None` before the first).
    pub fn policy(&self) -> watch::Receiver<Option<pb::Policy>> {
        self.policy.clone()
    }

    /// The kernel's loss counters per kind, for the next heartbeats.
    pub fn set_kernel_lost(&self, lost: Vec<(String, u64)>) {
        self.kernel_lost.send_replace(lost);
    }

    /// Waits until every seq up to `seq` is acked, or `within` passes; returns the watermark.
    pub async fn wait_acked(&self, seq: u64, within: Duration) -> u64 {
        let mut acked = self.acked.clone();
        let _ = tokio::time::timeout(within, acked.wait_for(|&a| a >= seq)).await;
        *acked.borrow()
    }

    /// Stops: the batcher flushes what it has once its input is closed, the sender waits
    /// briefly for acks in flight, the spool syncs.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.tasks.wait().await;
        if let Some(thread) = self.spool_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The end of the ring records whose events the spool already holds, when the spool's last
/// checkpoint is in this very ring (same boot, same map): the reader starts at the kernel's
/// consumer position, which lags behind that point when the last sensor died after a spool
/// write and before it released the records.
fn spooled_through(report: &OpenReport, ring: Option<RingIdentity>) -> Option<u64> {
    let Some(bytes) = report.last_checkpoint.as_ref() else {
        tracing::debug!("the spool holds no ring checkpoint");
        return None;
    };
    let checkpoint = RingCheckpoint::from_bytes(bytes)?;
    if Some(checkpoint.ring) != ring {
        tracing::info!("the spool's ring checkpoint is from another ring or boot; not used");
        return None;
    }
    tracing::info!(
        ring_pos = checkpoint.pos,
        "the spool holds events up to this ring position; they are not spooled again"
    );
    Some(checkpoint.pos)
}

fn log_open_report(dir: &Path, r: &OpenReport) {
    if r.torn_records > 0 {
        tracing::warn!(spool = %dir.display(), torn_records = r.torn_records, truncated_bytes = r.truncated_bytes, "spool: dropped a torn record (a write cut short by a crash); continuing");
    }
    if r.corrupt_records > 0 {
        tracing::warn!(spool = %dir.display(), corrupt_records = r.corrupt_records, "spool: skipped damaged records; reported as a gap");
    }
    if r.state_reset {
        tracing::warn!(spool = %dir.display(), "spool: state file rebuilt from the segments; some acked events may be sent again");
    }
    tracing::info!(
        spool = %dir.display(),
        unacked = r.recovered_events,
        first_unacked_seq = r.first_unacked_seq,
        next_seq = r.next_seq,
        evicted_total = r.evicted_total,
        "spool open"
    );
}

/// The policy persisted in `state_dir`, if any and readable.
pub fn load_policy(state_dir: &Path) -> Option<pb::Policy> {
    let path = state_dir.join(POLICY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the last policy");
            return None;
        }
    };
    match serde_json::from_str::<PolicyFile>(&text) {
        Ok(f) => Some(f.into()),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "ignoring a damaged policy file");
            None
        }
    }
}

/// Persists an applied policy (its watches already converted and validated) as
/// `state_dir/policy.json` (0600, replaced atomically).
pub fn save_policy(
    state_dir: &Path,
    version: u64,
    watches: &[crate::watch::WatchSpec],
) -> std::io::Result<()> {
    let file = PolicyFile { version, watches: watches.to_vec() };
    let json = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    enroll::write_private(&state_dir.join(POLICY_FILE), &json)
}

/// `policy.json`: the version and the watches in the config-file shape.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u64,
    watches: Vec<crate::watch::WatchSpec>,
}

impl From<PolicyFile> for pb::Policy {
    fn from(f: PolicyFile) -> Self {
        Self { version: f.version, watches: f.watches.into_iter().map(Into::into).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let policy = pb::Policy {
            version: 7,
            watches: vec![pb::WatchSpec {
                name: "aws".into(),
                category: pb::WatchCategory::Credential as i32,
                paths: vec!["~/.aws/credentials".into()],
                endpoints: vec![],
                unix_sockets: vec![],
            }],
        };
        assert!(load_policy(dir.path()).is_none());
        let set = crate::convert::policy_watch_set(&policy).unwrap();
        let specs: Vec<_> = set.iter().map(|w| w.spec.clone()).collect();
        save_policy(dir.path(), policy.version, &specs).unwrap();
        assert_eq!(load_policy(dir.path()), Some(policy));
        std::fs::write(dir.path().join(POLICY_FILE), "{ not json").unwrap();
        assert!(load_policy(dir.path()).is_none(), "a damaged file is ignored");
    }
}
