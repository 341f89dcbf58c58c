//! The sensor → collector transport with real processes and TLS on: the collector (`keywatch
//! serve`, built by `cargo build -p collector` next to these binaries) is killed and restarted,
//! the uplink (`kw-uplink-load`, the real uplink fed synthetic observations) spools and resends,
//! and the collector's store is read back to check that every event is there exactly once.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The collector binary: `keywatch`, next to this crate's binaries in the target directory.
fn collector_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWATCH_COLLECTOR_BIN") {
        return p.into();
    }
    let dir = Path::new(env!("CARGO_BIN_EXE_kw-uplink-load")).parent().expect("target dir");
    let bin = dir.join("keywatch");
    assert!(
        bin.exists(),
        "{} is missing: build the collector first (cargo build -p collector)",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A collector process on fresh ports; killed (SIGKILL) on drop.
struct Collector {
    child: Option<Child>,
    dir: PathBuf,
    sensor_port: u16,
    api_port: u16,
}

impl Collector {
    fn start(dir: &Path, sensor_port: u16, api_port: u16) -> Self {
        let child = Command::new(collector_bin())
            .args(["--data", &dir.join("keywatch-data").to_string_lossy(), "serve"])
            .args(["--sensor-listen", &format!("127.0.0.1:{sensor_port}")])
            .args(["--api-listen", &format!("127.0.0.1:{api_port}")])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("collector.log")).unwrap())
            .spawn()
            .expect("starting the collector");
        let c = Self { child: Some(child), dir: dir.to_owned(), sensor_port, api_port };
        // Up once both listeners accept and the API address is written for the CLI (written
        // after the sensor listener binds: a test asking for a token in between would fail).
        let deadline = Instant::now() + Duration::from_secs(30);
        let api_addr = dir.join("keywatch-data/api.addr");
        let listening = |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        while !(listening(sensor_port) && listening(api_port) && api_addr.exists()) {
            assert!(Instant::now() < deadline, "the collector did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.sensor_port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        *self = Self::start(&self.dir.clone(), self.sensor_port, self.api_port);
    }

    fn join_token(&self) -> String {
        let out = Command::new(collector_bin())
            .args(["--data", &self.dir.join("keywatch-data").to_string_lossy()])
            .args(["token", "create", "--role", "sensor"])
            .current_dir(&self.dir)
            .output()
            .expect("keywatch token create");
        assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Seqs stored for `host`, in the order they were stored.
    fn stored_seqs(&self, host: &str) -> Vec<u64> {
        let db = self.dir.join("keywatch-data/keywatch.db");
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT seq FROM events WHERE host = (SELECT key FROM host_keys WHERE host_id = ?1)
                 ORDER BY id",
            )
            .unwrap();
        stmt.query_map([host], |r| r.get::<_, i64>(0)).unwrap().map(|s| s.unwrap() as u64).collect()
    }

    /// Events the collector recorded as lost for `host` (gaps on its timeline).
    fn gap_events(&self, host: &str) -> u64 {
        let db = self.dir.join("keywatch-data/keywatch.db");
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        conn.query_row("SELECT COALESCE(SUM(lost), 0) FROM gaps WHERE host_id = ?1", [host], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as u64
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `kw-uplink-load` run.
fn load(args: &[&str], state: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kw-uplink-load"))
        .args(args)
        .args(["--state-dir", &state.to_string_lossy()])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("starting kw-uplink-load")
}

fn finish(child: Child, within: Duration) -> serde_json::Value {
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let deadline = Instant::now() + within;
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            // SAFETY: kill has no memory preconditions; pid is our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("kw-uplink-load did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = waiter.join().unwrap().unwrap();
    assert!(out.status.success(), "kw-uplink-load failed");
    serde_json::from_slice(&out.stdout).expect("summary line")
}

#[test]
fn hundred_thousand_events_survive_two_collector_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let mut collector = Collector::start(tmp.path(), free_port(), free_port());
    let token = collector.join_token();
    let url = collector.url();
    let host = "kill-twice";
    let child = load(
        &["--collector", &url, "--join-token", &token, "--host-id", host, "--events", "100000"]
            .into_iter()
            .chain(["--rate", "25000"])
            .collect::<Vec<_>>(),
        &tmp.path().join("state"),
        &tmp.path().join("load.log"),
    );
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        collector.kill();
        std::thread::sleep(Duration::from_millis(700));
        collector.restart();
    }
    let summary = finish(child, Duration::from_secs(300));
    assert_eq!(summary["acked"], 100_000, "{summary}");
    collector.kill();
    let seqs = collector.stored_seqs(host);
    assert_eq!(seqs.len(), 100_000, "every event stored exactly once");
    assert!(seqs.iter().copied().eq(1..=100_000), "stored in per-host sequence order");
}

#[test]
fn a_sensor_whose_spool_was_wiped_is_not_taken_for_a_resend() {
    let tmp = tempfile::tempdir().unwrap();
    let mut collector = Collector::start(tmp.path(), free_port(), free_port());
    let token = collector.join_token();
    let url = collector.url();
    let state = tmp.path().join("state");
    let host = "wiped";
    let run = |log: &str| {
        let args = ["--collector", &url, "--join-token", &token, "--host-id", host];
        let child =
            load(&[&args[..], &["--events", "300"]].concat(), &state, &tmp.path().join(log));
        finish(child, Duration::from_secs(120))
    };
    let first = run("load1.log");
    assert_eq!((first["first_seq"].as_u64(), first["acked"].as_u64()), (Some(1), Some(300)));
    // The spool is lost (a tmpfs after a reboot, a reinstall): the next run counts from 1.
    std::fs::remove_dir_all(state.join("spool")).unwrap();
    let second = run("load2.log");
    assert_eq!(second["first_seq"], 1, "{second}");
    collector.kill();
    let seqs = collector.stored_seqs(host);
    assert_eq!(seqs.len(), 600, "the new spool's 300 events are stored, not taken for resends");
    assert!(seqs.iter().copied().eq((1..=300).chain(1..=300)));
}

#[test]
fn torn_spool_record_is_reported_and_the_rest_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let (sensor_port, api_port) = (free_port(), free_port());
    let mut collector = Collector::start(tmp.path(), sensor_port, api_port);
    let token = collector.join_token();
    let url = collector.url();
    collector.kill();
    let state = tmp.path().join("state");
    let host = "torn";
    // Collector down: the events stay in the spool (enrollment waits).
    let child = load(
        &["--collector", &url, "--join-token", &token, "--host-id", host, "--events", "500"]
            .into_iter()
            .chain(["--no-wait", "--heartbeat-ms", "200"])
            .collect::<Vec<_>>(),
        &state,
        &tmp.path().join("load1.log"),
    );
    finish(child, Duration::from_secs(60));
    // A crash cut the next write short: half a record at the end of the segment.
    let seg = std::fs::read_dir(state.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .max()
        .expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let mut torn = vec![0xC5, 0x4B, 0x57, 0x52, 1, 2, 3, 4, 200, 0, 0, 0];
    torn.extend_from_slice(&501u64.to_le_bytes());
    torn.extend_from_slice(&[7; 40]);
    bytes.extend_from_slice(&torn);
    std::fs::write(&seg, bytes).unwrap();

    collector.restart();
    let log = tmp.path().join("load2.log");
    let child = load(
        &["--collector", &url, "--join-token", &token, "--host-id", host, "--events", "100"],
        &state,
        &log,
    );
    let summary = finish(child, Duration::from_secs(120));
    assert_eq!(summary["torn_records"], 1, "{summary}");
    assert_eq!(summary["first_seq"], 501, "the torn record's seq is handed out again");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("torn record"), "the torn record is reported: {text}");
    collector.kill();
    assert!(collector.stored_seqs(host).into_iter().eq(1..=600));
}

#[test]
fn spool_eviction_during_an_outage_is_counted_and_becomes_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let (sensor_port, api_port) = (free_port(), free_port());
    let mut collector = Collector::start(tmp.path(), sensor_port, api_port);
    let token = collector.join_token();
    let url = collector.url();
    let state = tmp.path().join("state");
    let host = "evicting";
    // Enroll and deliver a first event while the collector is up.
    let child = load(
        &["--collector", &url, "--join-token", &token, "--host-id", host, "--events", "1"],
        &state,
        &tmp.path().join("load0.log"),
    );
    finish(child, Duration::from_secs(60));
    collector.kill();
    // A long outage with a 1 MiB spool: the oldest segments go.
    let child = load(
        &["--collector", &url, "--host-id", host, "--events", "30000", "--no-wait"]
            .into_iter()
            .chain(["--spool-max-mib", "1"])
            .collect::<Vec<_>>(),
        &state,
        &tmp.path().join("load1.log"),
    );
    finish(child, Duration::from_secs(120));

    collector.restart();
    let child = load(
        &["--collector", &url, "--host-id", host, "--events", "1", "--spool-max-mib", "1"]
            .into_iter()
            .chain(["--heartbeat-ms", "200"])
            .collect::<Vec<_>>(),
        &state,
        &tmp.path().join("load2.log"),
    );
    let after = finish(child, Duration::from_secs(120));
    assert_eq!(after["acked"], after["last_seq"], "{after}");
    let evicted = after["evicted_at_open"].as_u64().unwrap();
    assert!(evicted > 0, "the spool evicted during the outage: {after}");
    collector.kill();
    let seqs = collector.stored_seqs(host);
    let last = after["last_seq"].as_u64().unwrap();
    assert_eq!(seqs.len() as u64 + evicted, last, "stored + evicted = every event");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(seqs.windows(2).any(|w| w[1] > w[0] + 1), "a jump in seqs where events were evicted");
    // The collector records the eviction reported in the heartbeat as a gap.
    let gap = collector.gap_events(host);
    assert!(gap > 0, "a gap on the timeline");
}
