//! Capture that outlives the sensor: the real sensor binary is killed with SIGKILL; credential
//! reads made while no sensor runs are delivered, exactly once, by the next one.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use keywatch_tests::{Pins, in_ci};

/// A sensor process with its stdout parsed on a thread.
struct SensorProcess {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl SensorProcess {
    fn start(config: &Path, pin_dir: &Path) -> Option<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kw-sensor"))
            .args(["run", "--stdout", "--config"])
            .arg(config)
            .arg("--pin-dir")
            .arg(pin_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the sensor");
        let (ready_tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("writing observations") {
                    let _ = ready_tx.send(Ok(()));
                } else if line.starts_with("keywatch-sensor:") {
                    let _ = ready_tx.send(Err(line));
                }
            }
        });
        match ready.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) if !in_ci() => {
                eprintln!("SKIPPED: the sensor cannot run here: {error}");
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sensor did not start: {other:?}");
            }
        }
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Some(Self { child, lines })
    }

    /// Observations of file opens by `pid` seen within `within`.
    fn opens_by(&self, pids: &[u32], within: Duration) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + within;
        let mut found = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let Ok(v) = self.lines.recv_timeout(left) else { break };
            let pid = v["process"]["pid"].as_u64().unwrap_or(0) as u32;
            if v["kind"] == "file_open" && pids.contains(&pid) {
                found.push(v);
            }
        }
        found
    }

    fn kill(mut self) {
        self.kill_now();
    }

    /// SIGKILL: no cleanup of any kind.
    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SensorProcess {
    /// A failing test must not leave a sensor running (it would hold the pins' lock and keep
    /// its programs attached).
    fn drop(&mut self) {
        self.kill_now();
    }
}

fn read(path: &Path) -> u32 {
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_kw-actor")).arg("read").arg(path).spawn().unwrap();
    let pid = child.id();
    assert!(child.wait().unwrap().success());
    pid
}

#[test]
fn reads_while_no_sensor_runs_are_delivered_once_by_the_next_sensor() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cred = dir.path().join("credentials");
    std::fs::write(&cred, "secret").unwrap();
    let config = dir.path().join("watches.yaml");
    std::fs::write(
        &config,
        format!(
            "builtin: false\nwatches:\n  - name: test-cred\n    category: credential\n    paths: [\"{}\"]\n",
            cred.display()
        ),
    )
    .unwrap();
    let pins = Pins::new(
        env!("CARGO_BIN_EXE_kw-sensor"),
        PathBuf::from(format!("/sys/fs/bpf/keywatch-test-{}", std::process::id())),
    );

    let Some(first) = SensorProcess::start(&config, pins.dir()) else { return };
    let before = read(&cred);
    assert_eq!(first.opens_by(&[before], Duration::from_secs(5)).len(), 1, "seen while running");
    first.kill();

    // No sensor process now: the pinned programs keep recording.
    let while_down = [read(&cred), read(&cred)];

    let second = SensorProcess::start(&config, pins.dir()).expect("restart");
    let seen = second.opens_by(&[before, while_down[0], while_down[1]], Duration::from_secs(3));
    let pids: Vec<u64> = seen.iter().map(|v| v["process"]["pid"].as_u64().unwrap()).collect();
    assert_eq!(
        pids.iter().filter(|&&p| p == u64::from(while_down[0])).count(),
        1,
        "first read while down delivered once: {seen:?}"
    );
    assert_eq!(pids.iter().filter(|&&p| p == u64::from(while_down[1])).count(), 1, "{seen:?}");
    assert!(!pids.contains(&u64::from(before)), "nothing repeated from before the kill: {seen:?}");
    for v in &seen {
        assert_eq!(v["watch"], "test-cred");
        assert_eq!(v["path"], cred.display().to_string());
    }
    second.kill();
}
