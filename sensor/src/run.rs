//! The running sensor: kernel programs attached, a reader draining them, events out.

use std::io::Write as _;

use tokio::sync::mpsc;

use crate::{
    event::{Clock, Event},
    fold::FoldTracker,
    kernel_maps::WatchMaps,
    loader::{self, LoadError, LoadOptions, Loaded},
    output,
    reader::{self, ReaderHandle},
};

/// Events buffered between the reader and the sink.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// A started sensor. Dropping it stops the reader and detaches every program.
pub struct Sensor {
    // Field order is drop order: stop the reader before the maps and programs go.
    reader: ReaderHandle,
    loaded: Loaded,
    events: mpsc::Receiver<Event>,
    watch_maps: WatchMaps,
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
        Ok(Self {
            reader,
            loaded,
            events,
            watch_maps,
        })
    }

    /// The next event; `None` once the reader has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The kernel's watch maps, to add or remove watched files, directories and endpoints.
    pub fn watch_maps(&mut self) -> &mut WatchMaps {
        &mut self.watch_maps
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

/// Standalone mode: every event as a JSON line on stdout until SIGINT/SIGTERM.
pub async fn run_stdout(opts: &LoadOptions) -> anyhow::Result<()> {
    let mut sensor = Sensor::start(opts)?;
    tracing::info!(
        programs = sensor.report().len(),
        "sensor attached; writing events to stdout"
    );
    let mut stdout = std::io::stdout().lock();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = sensor.next_event() => {
                let Some(event) = event else { break };
                output::write_json_line(&mut stdout, &event)?;
                stdout.flush()?;
            }
        }
    }
    tracing::info!("sensor stopped");
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
