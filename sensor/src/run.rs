//! The running sensor.
//!
//! - [`Sensor`]: kernel programs attached and a reader draining them — raw, decoded events.
//! - [`Agent`]: a sensor plus everything that makes its events useful: watches resolved into
//!   the kernel maps and kept current, and each event joined with the exact process identity.

use std::{io::Write as _, time::Duration};

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
    process::{ExeHasher, ProcFs, ProcessTable},
    reader::{self, ReaderHandle},
    watch::WatchSet,
    watch_sync::{SharedView, WatchSync},
};

/// Events buffered between stages.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// A started sensor. Dropping it stops the reader and detaches every program.
pub struct Sensor {
    // Field order is drop order: stop the reader before the maps and programs go.
    reader: ReaderHandle,
    loaded: Loaded,
    events: mpsc::Receiver<Event>,
    watch_maps: Option<WatchMaps>,
}

impl Sensor {
    /// Loads and attaches the kernel programs and starts draining events.
    pub fn start(opts: &LoadOptions) -> Result<Self, LoadError> {
        let mut loaded = loader::load(opts)?;
        let ring = loaded.take_events()?;
        let fold_map = loaded.take_fold_map()?;
        let watch_maps = loaded.take_watch_maps()?;
        let (tx, events) = mpsc::channel(CHANNEL_CAPACITY);
        let folds = FoldTracker::new(opts.fold_window);
        let reader = reader::spawn(ring, fold_map, folds, tx, Clock::from_system());
        Ok(Self { reader, loaded, events, watch_maps: Some(watch_maps) })
    }

    /// The next event; `None` once the reader has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
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
pub struct Agent {
    observations: mpsc::Receiver<Observation>,
    view: SharedView,
    cancel: CancellationToken,
    // Dropped last: the kernel side outlives the stages that read from it.
    sensor: Sensor,
}

impl Agent {
    /// Attaches the programs, resolves the watches into the kernel maps and starts enriching.
    pub async fn start(opts: &AgentOptions) -> Result<Self, LoadError> {
        let mut sensor = Sensor::start(&opts.load)?;
        let maps = sensor.watch_maps.take().expect("fresh sensor has its maps");
        let (sync, view) = WatchSync::start(maps, opts.watches.clone(), opts.dns_refresh).await;
        let cancel = CancellationToken::new();
        tokio::spawn(sync.run(cancel.clone()));

        let mut table = ProcessTable::new(ProcFs::default());
        match table.seed_from_proc() {
            Ok(n) => tracing::info!(processes = n, "process table seeded from /proc"),
            Err(error) => tracing::warn!(%error, "process table not seeded"),
        }
        let mut enricher = Enricher::new(table, ExeHasher::default(), view.clone());
        enricher.lifecycle = opts.lifecycle;

        let (tx, observations) = mpsc::channel(CHANNEL_CAPACITY);
        let mut events = std::mem::replace(&mut sensor.events, mpsc::channel(1).1);
        std::thread::Builder::new()
            .name("enricher".into())
            .spawn(move || {
                while let Some(event) = events.blocking_recv() {
                    for observation in enricher.enrich(event) {
                        if tx.blocking_send(observation).is_err() {
                            return;
                        }
                    }
                }
            })
            .expect("spawning the enricher thread");
        Ok(Self { observations, view, cancel, sensor })
    }

    /// The next observation; `None` once the sensor has stopped.
    pub async fn next(&mut self) -> Option<Observation> {
        self.observations.recv().await
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

    /// The watch set and what it resolved to, as of now.
    pub fn view(&self) -> &SharedView {
        &self.view
    }

    /// The underlying sensor (program report, loss counters, reader statistics).
    pub fn sensor(&self) -> &Sensor {
        &self.sensor
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
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
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            observation = agent.next() => {
                let Some(observation) = observation else { break };
                output::write_json_line(&mut stdout, &observation)?;
                stdout.flush()?;
            }
        }
    }
    let lost = agent.sensor().loaded().lost_counts().unwrap_or_default();
    let lost: u64 = lost.iter().map(|(_, n)| n).sum();
    tracing::info!(lost_records = lost, "sensor stopped");
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
