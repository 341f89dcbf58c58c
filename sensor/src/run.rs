//! The running sensor.
//!
//! - [`Sensor`]: kernel programs attached and a reader draining them — raw, decoded events.
//! - [`Agent`]: a sensor plus everything that makes its events useful: watches resolved into
//!   the kernel maps and kept current, and each event joined with the exact process identity.

use std::{io::Write as _, path::Path, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    enrich::Enricher,
    event::{Clock, Event},
    fold::FoldTracker,
    kernel_maps::WatchMaps,
    loader::{self, LoadError, LoadOptions, Loaded},
    observation::Observation,
    output,
    process::{DEFAULT_PROC_ROOT, ExeHasher, ProcFs, ProcessTable},
    reader::{self, Progress, ReaderHandle},
    ring::{Ring, RingIdentity},
    watch::WatchSet,
    watch_sync::{SharedView, WatchSync},
};

/// Events buffered between stages.
const CHANNEL_CAPACITY: usize = 16 * 1024;
/// Batches of events buffered between the reader and the next stage: as many events as
/// [`CHANNEL_CAPACITY`] when the batches are full, which they are whenever the stage lags.
const BATCH_CHANNEL_CAPACITY: usize = CHANNEL_CAPACITY / reader::BATCH_MAX;

/// A started sensor. Dropping it stops the reader and detaches every program.
///
/// Ring records are released to the kernel only as their events are done downstream (see
/// [`reader::Progress`]): for a bare sensor, an event is done once [`Sensor::next_event`] has
/// returned it; an [`Agent`] hands that duty to its sink.
pub struct Sensor {
    // Field order is drop order: stop the reader before the maps and programs go.
    reader: ReaderHandle,
    loaded: Loaded,
    events: mpsc::Receiver<Vec<Event>>,
    /// The rest of the batch [`Sensor::next_event`] is returning from.
    unreturned: std::vec::IntoIter<Event>,
    watch_maps: Option<WatchMaps>,
    progress: Arc<Progress>,
    ring: Option<RingIdentity>,
}

impl Sensor {
    /// Loads and attaches the kernel programs and starts draining events.
    pub fn start(opts: &LoadOptions) -> Result<Self, LoadError> {
        Self::start_with(opts, Progress::default())
    }

    fn start_with(opts: &LoadOptions, progress: Progress) -> Result<Self, LoadError> {
        let mut loaded = loader::load(opts)?;
        let ring = Ring::from_map(loaded.take_events()?).map_err(|io_error| LoadError::Map {
            name: "EVENTS",
            source: aya::sys::SyscallError { call: "mmap", io_error }.into(),
        })?;
        let ring_identity = ring.identity();
        let fold_map = loaded.take_fold_map()?;
        let watch_maps = loaded.take_watch_maps()?;
        let (tx, events) = mpsc::channel(BATCH_CHANNEL_CAPACITY);
        let folds = FoldTracker::new(opts.fold_window);
        let progress = Arc::new(progress);
        let reader =
            reader::spawn(ring, fold_map, folds, tx, Clock::from_system(), Arc::clone(&progress));
        Ok(Self {
            reader,
            loaded,
            events,
            unreturned: Vec::new().into_iter(),
            watch_maps: Some(watch_maps),
            progress,
            ring: ring_identity,
        })
    }

    /// The next event; `None` once the reader has stopped. Returning it makes it done: its ring
    /// record may be released.
    pub async fn next_event(&mut self) -> Option<Event> {
        let event = loop {
            if let Some(event) = self.unreturned.next() {
                break event;
            }
            self.unreturned = self.events.recv().await?.into_iter();
        };
        self.progress.durable(event.mark);
        Some(event)
    }

    /// Stops reading the ring; what was read is still committed as it becomes done.
    pub fn stop_reading(&self) {
        self.reader.stop_reading();
    }

    /// The kernel's watch maps, to add or remove watched files, directories and endpoints.
    ///
    /// # Panics
    /// After [`Agent::start`] took them over.
    pub fn watch_maps(&mut self) -> &mut WatchMaps {
        self.watch_maps.as_mut().expect("watch maps are owned by the agent")
    }

    pub fn report(&self) -> &[loader::ProgramStatus] {
        &self.loaded.report
    }

    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    /// Detaches every program or attaches them again (see [`Loaded::set_attached`]).
    pub fn set_attached(&mut self, attached: bool) -> Result<(), LoadError> {
        self.loaded.set_attached(attached)
    }

    /// The ring buffer events come from (see [`crate::ring::RingCheckpoint`]).
    pub fn ring_identity(&self) -> Option<RingIdentity> {
        self.ring
    }

    pub fn reader_stats(&self) -> &reader::ReaderStats {
        &self.reader.stats
    }
}

/// What an [`Agent`] watches and reports.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub load: LoadOptions,
    pub watches: WatchSet,
    /// Report exec/fork/exit as well as accesses.
    pub lifecycle: bool,
    /// How often watched host names are resolved again.
    pub dns_refresh: Duration,
}

impl AgentOptions {
    pub fn new(watches: WatchSet) -> Self {
        Self {
            load: LoadOptions::default(),
            watches,
            lifecycle: false,
            dns_refresh: crate::watch::DEFAULT_REFRESH_INTERVAL,
        }
    }
}

/// A sensor with its watches in force and its events enriched.
///
/// An observation is done (its ring record may be released) once its sink says so: with
/// [`Agent::next`], when the caller calls [`Agent::done`] or asks for the next one; after
/// [`Agent::take_observations`], through the counter of [`Agent::durable_counter`].
pub struct Agent {
    observations: mpsc::Receiver<Observation>,
    /// Mark of the observation [`Agent::next`] returned last.
    returned: Option<u64>,
    view: SharedView,
    policies: mpsc::Sender<WatchSet>,
    cancel: CancellationToken,
    // Dropped last: the kernel side outlives the stages that read from it.
    sensor: Sensor,
}

impl Agent {
    /// Attaches the programs, resolves the watches into the kernel maps and starts enriching.
    pub async fn start(opts: &AgentOptions) -> Result<Self, LoadError> {
        let mut sensor = Sensor::start_with(&opts.load, Progress::default().with_middle_stage())?;
        let maps = sensor.watch_maps.take().expect("fresh sensor has its maps");
        let (sync, view) = WatchSync::start(maps, opts.watches.clone(), opts.dns_refresh).await;
        let cancel = CancellationToken::new();
        let (policies, policies_rx) = mpsc::channel(4);
        tokio::spawn(sync.run(cancel.clone(), policies_rx));

        let mut table = ProcessTable::new(ProcFs::default());
        match table.seed_from_proc() {
            Ok(n) => tracing::info!(processes = n, "process table seeded from /proc"),
            Err(error) => tracing::warn!(%error, "process table not seeded"),
        }
        let mut enricher = Enricher::new(table, ExeHasher::default(), view.clone());
        enricher.lifecycle = opts.lifecycle;
        // Programs adopted from pins kept watching while no sensor ran; freshly attached ones
        // did not see what was opened before them.
        let look_for_held = !matches!(sensor.loaded().origin, loader::Origin::Adopted);
        let held_view = view.clone();

        let (tx, observations) = mpsc::channel(CHANNEL_CAPACITY);
        let mut events = std::mem::replace(&mut sensor.events, mpsc::channel(1).1);
        let progress = Arc::clone(&sensor.progress);
        std::thread::Builder::new()
            .name("enricher".into())
            .spawn(move || {
                if look_for_held {
                    for observation in held_at_start(&mut enricher, &held_view) {
                        if tx.blocking_send(observation).is_err() {
                            return;
                        }
                    }
                }
                for event in std::iter::from_fn(|| events.blocking_recv()).flatten() {
                    let mark = event.mark;
                    for observation in enricher.enrich(event) {
                        let carries = observation.mark;
                        if tx.blocking_send(observation).is_err() {
                            return;
                        }
                        if carries != 0 {
                            progress.stage_emitted(carries);
                        }
                    }
                    progress.stage_seen(mark);
                }
            })
            .expect("spawning the enricher thread");
        crate::system::release_freed_memory();
        Ok(Self { observations, returned: None, view, policies, cancel, sensor })
    }

    /// The next observation; `None` once the sensor has stopped. Asking for the next one makes
    /// every observation returned before it done.
    pub async fn next(&mut self) -> Option<Observation> {
        let observation = self.observations.recv().await?;
        if let Some(previous) = self.returned.replace(observation.mark).filter(|&m| m != 0) {
            self.sensor.progress.durable(previous);
        }
        Some(observation)
    }

    /// `observation` (and everything returned before it) is durable at the caller's end.
    pub fn done(&self, observation: &Observation) {
        self.sensor.progress.durable(observation.mark);
    }

    /// The counter a sink that took the observations ([`Agent::take_observations`]) stores
    /// the highest durable [`Observation::mark`] into.
    pub fn durable_counter(&self) -> Arc<reader::DurableMark> {
        self.sensor.progress.durable_counter()
    }

    /// Stops reading the ring: the stages drain and the observation stream ends; ring records
    /// are still released as their observations become durable, until the agent is dropped.
    pub fn stop_reading(&self) {
        self.sensor.stop_reading();
    }

    /// The next observation for which `pred` holds, skipping the others.
    pub async fn next_matching(
        &mut self,
        mut pred: impl FnMut(&Observation) -> bool,
    ) -> Option<Observation> {
        while let Some(o) = self.next().await {
            if pred(&o) {
                return Some(o);
            }
        }
        None
    }

    /// Replaces the watch set (a new policy): the kernel maps are refilled and the enricher
    /// names matches from the new set.
    pub async fn set_watches(&self, set: WatchSet) {
        let _ = self.policies.send(set).await;
    }

    /// Hands the observation stream to another consumer (the uplink); [`Agent::next`] then
    /// returns `None`.
    pub fn take_observations(&mut self) -> mpsc::Receiver<Observation> {
        std::mem::replace(&mut self.observations, mpsc::channel(1).1)
    }

    /// The watch set and what it resolved to, as of now.
    pub fn view(&self) -> &SharedView {
        &self.view
    }

    /// The underlying sensor (program report, loss counters, reader statistics).
    pub fn sensor(&self) -> &Sensor {
        &self.sensor
    }

    /// Detaches every program or attaches them again (see [`Loaded::set_attached`]).
    pub fn set_attached(&mut self, attached: bool) -> Result<(), LoadError> {
        self.sensor.set_attached(attached)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
        // Whatever the sink made durable is committed by the reader as it stops; nothing more
        // will become durable.
        self.sensor.progress.close();
    }
}

/// File accesses for the watched files processes hold open now (see [`crate::held`]).
fn held_at_start(enricher: &mut Enricher, view: &SharedView) -> Vec<Observation> {
    let started = std::time::Instant::now();
    let holdings = {
        let view = view.read().expect("watch view");
        crate::held::scan(Path::new(DEFAULT_PROC_ROOT), &view.kernel, std::process::id())
    };
    tracing::info!(
        held = holdings.len(),
        ms = started.elapsed().as_millis() as u64,
        "looked for watched files already open or mapped"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    enricher.held_at_start(holdings, now)
}

/// Standalone mode: every observation as a JSON line on stdout until SIGINT/SIGTERM.
pub async fn run_stdout(opts: &AgentOptions) -> anyhow::Result<()> {
    let mut agent = Agent::start(opts).await?;
    tracing::info!(
        programs = agent.sensor().report().len(),
        watches = opts.watches.len(),
        "sensor attached; writing observations to stdout"
    );
    let mut stdout = std::io::stdout().lock();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut stopping = false;
    loop {
        tokio::select! {
            () = &mut shutdown, if !stopping => {
                // Drain: what was read from the ring is written before the ring is committed.
                agent.stop_reading();
                stopping = true;
            }
            observation = agent.next() => {
                let Some(observation) = observation else { break };
                output::write_json_line(&mut stdout, &observation)?;
                stdout.flush()?;
                agent.done(&observation);
            }
        }
    }
    let lost = agent.sensor().loaded().lost_counts().unwrap_or_default();
    let total: u64 = lost.iter().map(|(_, n)| n).sum();
    let by_kind: Vec<String> = lost
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(kind, n)| format!("{}={n}", kind.name()))
        .collect();
    // A fold key whose records were all lost is still reported by a sweep, from the kernel's
    // counts: those records are in the losses above, their occurrences were delivered.
    let recovered =
        agent.sensor().reader_stats().recovered_records.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        lost_records = total,
        lost_by_kind = %by_kind.join(" "),
        recovered_by_sweep = recovered,
        "sensor stopped"
    );
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Where and how observations go to a collector (`run --collector`).
#[derive(Debug, Clone)]
pub struct UplinkOptions {
    pub config: crate::uplink::UplinkConfig,
    /// Identity, last policy and spool live here.
    pub state_dir: std::path::PathBuf,
    /// Also write each observation to stdout as a JSON line.
    pub stdout: bool,
}

/// The kernel release, for the Hello.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The Hello's capability report, from the program table.
pub fn capabilities(report: &[loader::ProgramStatus]) -> Vec<keywatch_proto::v1::Capability> {
    report
        .iter()
        .map(|s| keywatch_proto::v1::Capability {
            program: s.program.to_owned(),
            attach: s.attach.clone(),
            attached: s.attached,
            reason: s.reason.clone().unwrap_or_default(),
        })
        .collect()
}

/// The watch set to start with: the last policy the collector sent (kept in the state
/// directory, so a sensor that starts while the collector is away watches what it was told),
/// else the built-in catalog or `--config`.
fn initial_watches(state_dir: &std::path::Path, fallback: &WatchSet) -> (WatchSet, Option<u64>) {
    let Some(policy) = crate::uplink::load_policy(state_dir) else {
        return (fallback.clone(), None);
    };
    match crate::convert::policy_watch_set(&policy) {
        Ok(set) => {
            tracing::info!(
                version = policy.version,
                watches = set.len(),
                "watching the last policy received from the collector"
            );
            (set, Some(policy.version))
        }
        Err(error) => {
            tracing::warn!(%error, "the stored policy is not valid any more; using the local watches");
            (fallback.clone(), None)
        }
    }
}

/// Collector mode: observations go through the durable spool to the collector (and to stdout
/// too when asked) until SIGINT/SIGTERM; policies from the collector are applied live.
pub async fn run_uplink(opts: &AgentOptions, uplink: UplinkOptions) -> anyhow::Result<()> {
    use crate::uplink::Uplink;
    let mut opts = opts.clone();
    let (watches, mut policy_version) = initial_watches(&uplink.state_dir, &opts.watches);
    opts.watches = watches;
    let mut agent = Agent::start(&opts).await?;
    let mut config = uplink.config;
    config.hello.sensor_version = env!("CARGO_PKG_VERSION").to_owned();
    config.hello.kernel = kernel_release();
    config.hello.capabilities = capabilities(agent.sensor().report());
    let source = agent.take_observations();
    let ring = agent.sensor().ring_identity();
    let observations = if uplink.stdout {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || tee_stdout(source, tx))
            .expect("spawning the stdout thread");
        rx
    } else {
        source
    };
    let uplink_handle =
        Uplink::start_tracked(config.clone(), observations, agent.durable_counter(), ring).await?;
    tracing::info!(
        collector = %config.target.authority,
        host_id = %config.hello.host_id,
        programs = agent.sensor().report().len(),
        watches = opts.watches.len(),
        "sensor attached; streaming to the collector"
    );
    let mut policies = uplink_handle.policy();
    let mut losses = tokio::time::interval(Duration::from_secs(5));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = losses.tick() => {
                let lost = agent.sensor().loaded().lost_counts().unwrap_or_default();
                uplink_handle.set_kernel_lost(lost.into_iter().map(|(k, n)| (k.name().to_owned(), n)).collect());
            }
            changed = policies.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(policy) = policies.borrow_and_update().clone() else { continue };
                apply_policy(&agent, &uplink.state_dir, &policy, &mut policy_version).await;
            }
        }
    }
    // Stop reading: the stages drain and close the observation stream, which makes the batcher
    // flush and the spool sync; the uplink waits briefly for the acks in flight. Dropping the
    // agent then commits the ring up to what the spool holds; what the kernel still holds
    // stays in the pinned ring for the next run.
    agent.stop_reading();
    uplink_handle.shutdown().await;
    drop(agent);
    tracing::info!("sensor stopped");
    Ok(())
}

/// Applies a policy from the collector: a new watch set for the agent, persisted for the next
/// start. An invalid policy is refused whole (the watches in force stay).
async fn apply_policy(
    agent: &Agent,
    state_dir: &std::path::Path,
    policy: &keywatch_proto::v1::Policy,
    current: &mut Option<u64>,
) {
    if policy.watches.is_empty() {
        // A collector with no Watch declared yet: blanking the sensor would hide everything.
        tracing::warn!(
            version = policy.version,
            "the collector's policy declares no watches; keeping the watches in force"
        );
        return;
    }
    let set = match crate::convert::policy_watch_set(policy) {
        Ok(set) => set,
        Err(error) => {
            tracing::error!(%error, "refusing the collector's policy; the watches in force stay");
            return;
        }
    };
    let specs: Vec<_> = set.iter().map(|w| w.spec.clone()).collect();
    let same = {
        let view = agent.view().read().expect("watch view");
        *current == Some(policy.version) && view.set.iter().map(|w| &w.spec).eq(specs.iter())
    };
    if same {
        return;
    }
    tracing::info!(
        version = policy.version,
        watches = set.len(),
        "applying the collector's policy"
    );
    agent.set_watches(set).await;
    *current = Some(policy.version);
    if let Err(error) = crate::uplink::save_policy(state_dir, policy.version, &specs) {
        tracing::warn!(%error, "cannot persist the policy; the next start uses the local watches until the collector answers");
    }
}

/// Writes each observation to stdout and passes it on.
fn tee_stdout(mut source: mpsc::Receiver<Observation>, tx: mpsc::Sender<Observation>) {
    let mut stdout = std::io::stdout().lock();
    while let Some(observation) = source.blocking_recv() {
        if output::write_json_line(&mut stdout, &observation).and_then(|()| stdout.flush()).is_err()
        {
            tracing::warn!("stdout closed; observations go to the collector only");
        }
        if tx.blocking_send(observation).is_err() {
            return;
        }
    }
}
