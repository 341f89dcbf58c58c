//! `cargo xtask run`: Keywatch on this host, end to end. A collector on its embedded default
//! (`./keywatch-demo/collector`), a sensor enrolled with it, the declarations in `examples/`,
//! and the alerts printed as they arrive. Ctrl-C stops both (SIGTERM, then wait) and removes
//! the demo's pins; the data stays for the next run (`--reset` starts afresh).

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

const DEMO_DIR: &str = "keywatch-demo";
const PIN_DIR: &str = "/sys/fs/bpf/keywatch-demo";
/// The embedded default's sensor port.
const SENSOR_URL: &str = "https://127.0.0.1:7480";
const SENSOR: &str = "target/release/keywatch-sensor";
const COLLECTOR: &str = "target/release/keywatch";
/// A credential the example declarations watch (`backup-db-password`) and declare for the
/// nightly backup job only: any other reader raises `unknown-identity`.
const DEMO_CREDENTIAL: &str = "/etc/backup/db.password";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A child process started by the demo, stopped by its handle: SIGTERM, then wait.
struct Proc {
    name: &'static str,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let out = File::create(log)?; // A fresh log per run: readiness is read from it.
        let child = cmd
            .env("NO_COLOR", "1")
            // Its own process group: Ctrl-C reaches the demo only, which stops children in order.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        Ok(Self { name, child: Some(child) })
    }

    fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                eprintln!("the {} did not stop within 15 s; killing it", self.name);
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        println!("stopped the {}", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn keywatch(data: &Path) -> Command {
    let mut cmd = Command::new(COLLECTOR);
    cmd.arg("--data").arg(data);
    cmd
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Waits until `log` contains `needle`; fails when `proc` exits first or after `within`.
fn wait_for_log(proc: &mut Proc, log: &Path, needle: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
            return Ok(());
        }
        if proc.exited() {
            bail!("the {} stopped:\n{}", proc.name, tail(log));
        }
        if STOP.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!("the {} did not get ready within {within:?}:\n{}", proc.name, tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The demo. Expects the release binaries to be built.
pub fn run(reset: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the sensor loads kernel programs: run as root (sudo -E cargo xtask run)");
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let demo = PathBuf::from(DEMO_DIR);
    if demo.exists() && reset {
        std::fs::remove_dir_all(&demo).context("removing ./keywatch-demo")?;
        println!("--reset: removed ./{DEMO_DIR}; starting afresh");
    } else if demo.exists() {
        println!(
            "reusing ./{DEMO_DIR} (collector data, sensor enrollment); `cargo xtask run --reset` starts afresh"
        );
    } else {
        println!("new demo state in ./{DEMO_DIR}");
    }
    let data = demo.join("collector");
    let state = demo.join("sensor");
    std::fs::create_dir_all(&demo)?;
    let credential = Path::new(DEMO_CREDENTIAL);
    if !credential.exists() {
        std::fs::create_dir_all(credential.parent().expect("parent"))?;
        std::fs::write(credential, "demo-only: not a real password\n")?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(credential, std::fs::Permissions::from_mode(0o600))?;
        println!(
            "created the demo credential {DEMO_CREDENTIAL} (example watch backup-db-password)"
        );
    }

    let collector_log = demo.join("collector.log");
    for f in ["api.addr", "sensor.addr"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    let mut serve = Command::new(COLLECTOR);
    serve.arg("--data").arg(&data).arg("serve");
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    if !(free(7480) && free(7481)) {
        // Another collector (or anything else) holds the embedded default's ports.
        println!("127.0.0.1:7480/7481 are in use; the demo collector takes free ports instead");
        serve.args(["--sensor-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]);
    }
    let mut collector = Proc::spawn("collector", &mut serve, &collector_log)?;
    wait_for_log(&mut collector, &collector_log, "  alerts ", Duration::from_secs(30))?;
    let sensor_url = std::fs::read_to_string(data.join("sensor.addr"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| SENSOR_URL.to_owned());
    println!(
        "collector: keywatch serve --data {} (sensors {sensor_url}; log {})",
        data.display(),
        collector_log.display()
    );

    let out = keywatch(&data)
        .args(["apply", "-f", "examples/declarations"])
        .output()
        .context("keywatch apply")?;
    if !out.status.success() {
        bail!("keywatch apply -f examples/declarations: {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("applied examples/declarations (watches, teams, workloads, approved change)");

    let sensor_log = demo.join("sensor.log");
    let mut sensor_cmd = Command::new(SENSOR);
    sensor_cmd
        .args(["run", "--collector", &sensor_url, "--state-dir"])
        .arg(&state)
        .args(["--pin-dir", PIN_DIR]);
    if state.join("cert.pem").exists() {
        println!("sensor: already enrolled (certificate in {})", state.display());
    } else {
        let out = keywatch(&data)
            .args(["token", "create", "--role", "sensor", "--name", "demo"])
            .output()
            .context("keywatch token create")?;
        if !out.status.success() {
            bail!("keywatch token create --role sensor: {}", String::from_utf8_lossy(&out.stderr));
        }
        let token = String::from_utf8(out.stdout)?.trim().to_owned();
        sensor_cmd.args(["--join-token", &token]);
        println!("sensor: enrolling with a join token from `keywatch token create --role sensor`");
    }
    let mut sensor = Proc::spawn("sensor", &mut sensor_cmd, &sensor_log)?;
    let ready = wait_for_log(
        &mut sensor,
        &sensor_log,
        // Logged on every connection; the watches change (if they do) right after.
        "policy received from the collector",
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(500));
    if let Err(e) = ready {
        sensor.stop();
        uninstall_pins();
        collector.stop();
        return Err(e);
    }
    println!("sensor: streaming to {sensor_url} (log {})", sensor_log.display());
    println!();
    println!("Try, in another shell:  sudo cat {DEMO_CREDENTIAL}");
    println!(
        "  (only the nightly backup job may read it: an unknown-identity alert for secops and team-platform)"
    );
    println!("Alerts appear below as they arrive; Ctrl-C stops.");
    println!();

    let result = watch_alerts(&data, &mut sensor, &mut collector);
    println!();
    sensor.stop();
    uninstall_pins();
    collector.stop();
    println!(
        "data kept in ./{DEMO_DIR}: collector {} (keywatch --data {} alerts), sensor {}; logs {}, {}",
        data.display(),
        data.display(),
        state.display(),
        collector_log.display(),
        sensor_log.display()
    );
    result
}

/// `keywatch-sensor uninstall` of the demo's pin directory (it says what it removed).
fn uninstall_pins() {
    let _ = Command::new(SENSOR).args(["uninstall", "--pin-dir", PIN_DIR]).status();
}

/// Polls `keywatch alerts --json` about every second and prints each new alert in one line
/// (and repeats folded into one, when its count grows) until Ctrl-C.
fn watch_alerts(data: &Path, sensor: &mut Proc, collector: &mut Proc) -> anyhow::Result<()> {
    let mut seen: HashMap<i64, u64> = HashMap::new();
    let mut first = true;
    while !STOP.load(Ordering::SeqCst) {
        if sensor.exited() || collector.exited() {
            bail!(
                "the {} stopped; see its log in ./{DEMO_DIR}",
                if sensor.exited() { "sensor" } else { "collector" }
            );
        }
        let out = keywatch(data).args(["alerts", "--json", "--limit", "1000"]).output()?;
        if out.status.success() {
            let mut alerts: Vec<Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            alerts.sort_by_key(|a| a["id"].as_i64().unwrap_or_default());
            if first && !alerts.is_empty() {
                println!(
                    "({} alerts from earlier runs: keywatch --data {} alerts)",
                    alerts.len(),
                    data.display()
                );
            }
            for a in &alerts {
                let id = a["id"].as_i64().unwrap_or_default();
                let count = a["count"].as_u64().unwrap_or(1);
                match seen.insert(id, count) {
                    None if !first => println!("{}", line(a)),
                    Some(before) if count > before => {
                        println!(
                            "  #{id} again: {count} times now (last {})",
                            short_time(&a["last_seen"])
                        )
                    }
                    _ => {}
                }
            }
            first = false;
        }
        for _ in 0..10 {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn short_time(v: &Value) -> String {
    let s = v.as_str().unwrap_or("");
    // 2026-11-29T12:26:48.000834991Z -> 12:26:48
    s.get(11..19).unwrap_or(s).to_owned()
}

/// `12:26:48 #3 unknown-identity [high] undeclared (owner undeclared; told team-platform)
/// /usr/bin/cat (pid 4242) read backup-db-password /etc/backup/db.password on host web-1`.
fn line(a: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let r = &a["resource"];
    let resource = [&r["watch"], &r["path"], &r["endpoint"], &r["method"]]
        .iter()
        .filter_map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let p = &a["process"];
    let exe =
        p["exe"].as_str().filter(|e| !e.is_empty()).unwrap_or(p["comm"].as_str().unwrap_or("?"));
    let told: Vec<String> = a["routes"]
        .as_array()
        .map(|r| r.iter().map(|t| s(&t["team"])).collect())
        .unwrap_or_default();
    format!(
        "{} #{} {} [{}] workload {} (owner {}; routed to {}) {} (pid {}) {} on host {}",
        short_time(&a["first_seen"]),
        a["id"],
        s(&a["rule"]),
        s(&a["severity"]),
        s(&a["workload"]),
        s(&a["owner"]),
        if told.is_empty() { "-".to_owned() } else { told.join(", ") },
        exe,
        p["pid"],
        resource,
        s(&a["host"]["id"]),
    )
}
