//! Helpers for the privileged tests: starting a real sensor, deciding whether a host that cannot
//! run BPF skips (outside CI, with the reason printed) or fails (in CI), and waiting for events.

use std::time::Duration;

pub mod btrfs;

use sensor::{
    event::Event,
    loader::{LoadError, LoadOptions},
    run::Sensor,
};

/// True when running under CI, where every privileged test must really run.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Starts a sensor with `opts`, or returns `None` after printing why this host cannot run it.
/// Under CI a sensor that cannot start fails the test.
pub fn start_sensor(opts: &LoadOptions) -> Option<Sensor> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match Sensor::start(opts) {
        Ok(sensor) => Some(sensor),
        Err(error) => skip_or_fail(root, &error),
    }
}

fn skip_or_fail(root: bool, error: &LoadError) -> Option<Sensor> {
    let why = if root { format!("{error}") } else { format!("not root ({error})") };
    if in_ci() {
        panic!("BPF must load under CI, but the sensor did not start: {why}");
    }
    eprintln!("SKIPPED: the sensor cannot run here: {why}");
    None
}

/// Waits up to `within` for an event matching `pred`, returning it.
pub async fn wait_for(
    sensor: &mut Sensor,
    within: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Option<Event> {
    tokio::time::timeout(within, async {
        while let Some(event) = sensor.next_event().await {
            if pred(&event) {
                return Some(event);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Waits up to `within` for `fut`, `None` on timeout or when it yields nothing.
pub async fn wait_until<T>(
    within: Duration,
    fut: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    tokio::time::timeout(within, fut).await.ok().flatten()
}

/// A sensor pin directory, uninstalled (programs detached, maps freed) however the test ends,
/// so a failing test never leaves programs attached to the host.
pub struct Pins {
    sensor: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Pins {
    /// `sensor` is the sensor binary that runs `uninstall`.
    pub fn new(sensor: impl Into<std::path::PathBuf>, dir: impl Into<std::path::PathBuf>) -> Self {
        Self { sensor: sensor.into(), dir: dir.into() }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.sensor)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The sensor and API URLs a `keywatch serve` started with `--data data` writes once it
/// listens (`sensor.addr`, `api.addr`), after checking the API port accepts connections; an
/// error after `patience`.
pub fn collector_urls(
    data: &std::path::Path,
    patience: Duration,
) -> Result<(String, String), &'static str> {
    let deadline = std::time::Instant::now() + patience;
    let read = |f: &str| std::fs::read_to_string(data.join(f)).ok().map(|s| s.trim().to_owned());
    let (sensor_url, api_url) = loop {
        if let (Some(s), Some(a)) = (read("sensor.addr"), read("api.addr"))
            && !s.is_empty()
            && !a.is_empty()
        {
            break (s, a);
        }
        if std::time::Instant::now() >= deadline {
            return Err("the collector did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let api_port = api_url.rsplit(':').next().unwrap_or_default().to_owned();
    while std::net::TcpStream::connect(format!("127.0.0.1:{api_port}")).is_err() {
        if std::time::Instant::now() >= deadline {
            return Err("the collector did not listen");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((sensor_url, api_url))
}
