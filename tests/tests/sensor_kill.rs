//! The sensor killed with SIGKILL mid-stream and restarted, with a real collector (TLS,
//! enrolled): every credential read, including those made while no sensor process ran, is
//! stored exactly once. The ring keeps what the sensor read until it is durable in the spool,
//! so a killed sensor leaves it to the next one.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use keywatch_tests::{Pins, in_ci};
use serde_json::Value;

const ACTOR: &str = env!("CARGO_BIN_EXE_kw-actor");
const SENSOR: &str = env!("CARGO_BIN_EXE_kw-sensor");
const COLLECTOR: &str = env!("CARGO_BIN_EXE_kw-collector");
const PATIENCE: Duration = Duration::from_secs(20);

const WATCH: &str = r#"
kind: Watch
name: kill-test-key
category: credential
paths: ["{CRED}"]
"#;

/// `keywatch serve` on free ports, TLS on; killed on drop.
struct Collector {
    child: Child,
    data: PathBuf,
    sensor_url: String,
}

impl Collector {
    fn start(dir: &Path) -> Self {
        let data = dir.join("keywatch-data");
        let child = Command::new(COLLECTOR)
            .arg("--data")
            .arg(&data)
            .args(["serve", "--sensor-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("collector.log")).expect("log"))
            .spawn()
            .expect("starting the collector");
        let (sensor_url, _) =
            keywatch_tests::collector_urls(&data, PATIENCE).unwrap_or_else(|why| panic!("{why}"));
        Self { child, data, sensor_url }
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(COLLECTOR)
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("running the keywatch CLI");
        assert!(
            out.status.success(),
            "keywatch {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Pids of the host's file accesses, one entry per stored event.
    fn read_pids(&self, host: &str) -> Vec<u32> {
        let out = self.ok(&[
            "timeline",
            "--host",
            host,
            "--since",
            "30m",
            "--json",
            "--kind",
            "file-access",
            "--limit",
            "10000",
        ]);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<Value>(l).expect("json"))
            .filter_map(|e| e["pid"].as_u64().map(|p| p as u32))
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `kw-sensor run --collector` process; SIGKILLed by [`SensorProcess::kill`], SIGTERMed
/// on drop.
struct SensorProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl SensorProcess {
    /// Starts a sensor (`token` for the first start only) and waits until it streams; `None`
    /// (outside CI) when BPF cannot load here.
    fn start(
        dir: &Path,
        run: usize,
        c: &Collector,
        host: &str,
        token: Option<&str>,
        pins: &Pins,
    ) -> Option<Self> {
        let log = dir.join(format!("sensor-{run}.log"));
        let mut cmd = Command::new(SENSOR);
        cmd.args(["run", "--collector", &c.sensor_url, "--host-id", host, "--state-dir"])
            .arg(dir.join("sensor"))
            .arg("--pin-dir")
            .arg(pins.dir());
        if let Some(t) = token {
            cmd.args(["--join-token", t]);
        }
        let mut child = cmd
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("starting the sensor");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("streaming to the collector") {
                return Some(Self { child: Some(child), log });
            }
            let exited = child.try_wait().expect("wait").is_some();
            if exited || text.lines().any(|l| l.starts_with("keywatch-sensor:")) {
                let _ = child.kill();
                let _ = child.wait();
                assert!(!in_ci(), "BPF must load under CI, but the sensor did not start:\n{text}");
                eprintln!("SKIPPED: the sensor cannot run here:\n{text}");
                return None;
            }
            assert!(Instant::now() < deadline, "the sensor did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a sensor armed to SIGKILL itself right after its first spool sync, before it
    /// releases the ring records of what it synced: the worst moment for a crash.
    fn start_crashing(dir: &Path, run: usize, c: &Collector, host: &str, pins: &Pins) -> Self {
        let log = dir.join(format!("sensor-{run}.log"));
        let child = Command::new(SENSOR)
            .args(["run", "--collector", &c.sensor_url, "--host-id", host, "--state-dir"])
            .arg(dir.join("sensor"))
            .arg("--pin-dir")
            .arg(pins.dir())
            .env("NO_COLOR", "1")
            .env("KEYWATCH_CRASH_AT", "after-spool-sync")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("starting the sensor");
        Self { child: Some(child), log }
    }

    /// Waits for a sensor from [`SensorProcess::start_crashing`] to stop itself.
    fn await_crash(&mut self) {
        let mut child = self.child.take().expect("a crashing sensor");
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "the sensor never reached its crash point");
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "sensor exit {status}:\n{text}");
        assert!(text.contains("crash point after-spool-sync reached"), "sensor log:\n{text}");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SensorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("sensor log {}:\n{text}", self.log.display());
        }
    }
}

fn read(cred: &Path) -> u32 {
    let mut child = Command::new(ACTOR).arg("read").arg(cred).spawn().expect("kw-actor");
    let pid = child.id();
    assert!(child.wait().unwrap().success(), "the read failed");
    pid
}

#[test]
fn no_loss_and_no_duplicate_when_the_sensor_is_killed_mid_stream() {
    const READERS: usize = 300;
    // (kill before read i, restart before read j): reads in between run with no sensor.
    const KILLS: [(usize, usize); 3] = [(60, 100), (160, 190), (240, 250)];
    // The sensor restarted at read 100 kills itself right after its first spool sync (the
    // reads made while none ran are then in the spool and still in the ring); the one started
    // at this read must deliver them once.
    const AFTER_CRASH: usize = 130;
    let dir = tempfile::Builder::new().prefix("kw-sensor-kill-").tempdir().expect("tempdir");
    let cred = dir.path().join("cloud-key");
    std::fs::write(&cred, "[default]\naws_access_key_id = AKIAKILLTEST\n").unwrap();
    let c = Collector::start(dir.path());
    let watch = dir.path().join("watch.yaml");
    std::fs::write(&watch, WATCH.replace("{CRED}", &cred.display().to_string())).unwrap();
    c.ok(&["apply", "-f", &watch.to_string_lossy()]);
    let host = format!("kill-{}", std::process::id());
    let pins = Pins::new(SENSOR, PathBuf::from(format!("/sys/fs/bpf/kw-kill-{host}")));
    let token = c.ok(&["token", "create", "--role", "sensor"]).trim().to_owned();
    let mut run = 0;
    let Some(mut sensor) = SensorProcess::start(dir.path(), run, &c, &host, Some(&token), &pins)
    else {
        return;
    };

    // The policy reaches the kernel shortly after the start: read until one read is stored.
    let deadline = Instant::now() + PATIENCE;
    let before = loop {
        let pid = read(&cred);
        std::thread::sleep(Duration::from_millis(300));
        let stored = c.read_pids(&host);
        if stored.contains(&pid) {
            break stored;
        }
        assert!(Instant::now() < deadline, "the credential never became watched");
    };

    let started = Instant::now();
    let mut pids = Vec::with_capacity(READERS);
    let mut sensor_opt = Some(sensor);
    for i in 0..READERS {
        for &(kill, restart) in &KILLS {
            if i == kill {
                let mut s = sensor_opt.take().expect("a sensor runs");
                s.kill();
                drop(s);
            }
            if i == restart && restart == KILLS[0].1 {
                run += 1;
                sensor_opt = Some(SensorProcess::start_crashing(dir.path(), run, &c, &host, &pins));
            } else if i == restart {
                run += 1;
                sensor_opt = Some(
                    SensorProcess::start(dir.path(), run, &c, &host, None, &pins)
                        .expect("the sensor restarts"),
                );
            }
        }
        if i == AFTER_CRASH {
            sensor_opt.take().expect("the crashing sensor").await_crash();
            run += 1;
            let s = SensorProcess::start(dir.path(), run, &c, &host, None, &pins)
                .expect("the sensor restarts after its crash");
            sensor_opt = Some(s);
        }
        pids.push(read(&cred));
    }
    sensor = sensor_opt.expect("a sensor runs at the end");
    println!(
        "{READERS} reads in {:?}, the sensor SIGKILLed {} times among them",
        started.elapsed(),
        KILLS.len()
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let counts = loop {
        let mut counts = BTreeMap::<u32, usize>::new();
        for pid in c.read_pids(&host) {
            if !before.contains(&pid) {
                *counts.entry(pid).or_default() += 1;
            }
        }
        if counts.len() >= READERS || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("all stored {:?} after the burst began", started.elapsed());
    let missing: Vec<u32> = pids.iter().copied().filter(|p| !counts.contains_key(p)).collect();
    assert!(missing.is_empty(), "{} reads missing: {missing:?}", missing.len());
    let twice: Vec<(&u32, &usize)> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "{} reads stored more than once: {twice:?}", twice.len());
    assert_eq!(counts.len(), READERS, "unexpected readers: {counts:?}");
    let log = |run: usize| {
        std::fs::read_to_string(dir.path().join(format!("sensor-{run}.log"))).unwrap_or_default()
    };
    assert!(
        log(2).contains("skipping events a previous sensor had already spooled"),
        "the sensor after the crash did not skip what the spool held:\n{}\n---\n{}",
        log(1),
        log(2)
    );
    drop(sensor);
}
