//! The users' journeys, end to end, with the real binaries as separate processes: the collector
//! (`keywatch serve`, as `kw-collector`) on its own data directory and free ports, TLS on; the
//! sensor (`kw-sensor run --collector`, enrolled with a join token) on its own pin directory;
//! workloads declared in YAML by their owners; real processes (`kw-actor`, `cat`) reading a
//! credential; a real HTTP receiver for the teams' webhooks; and the `keywatch` CLI with the
//! token of each role. Windows and approved changes are computed from the current time (UTC),
//! so the journeys pass at any hour.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, http::Uri};
use chrono::{DateTime, Utc};
use keywatch_tests::{Pins, in_ci};
use serde_json::Value;

const ACTOR: &str = env!("CARGO_BIN_EXE_kw-actor");
const SENSOR: &str = env!("CARGO_BIN_EXE_kw-sensor");
const COLLECTOR: &str = env!("CARGO_BIN_EXE_kw-collector");

/// The declared workload's user (any uid works: `setpriv` needs no account).
const PAYMENTS_UID: u32 = 41_001;
/// The watch the journeys declare.
const WATCH: &str = "journey-cloud-key";
/// How long anything asynchronous may take before a journey fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// `{CRED}`, `{HOOK}`, `{ACTOR}`, `{UID}` and `{WINDOW}` are filled in per journey.
const DECLARATIONS: &str = r#"
# IAM: the credential.
kind: Watch
name: journey-cloud-key
category: credential
paths: ["{CRED}"]
---
kind: Team
name: secops
route: {webhook: "{HOOK}/secops"}
---
kind: Team
name: team-payments
route: {webhook: "{HOOK}/payments"}
---
kind: Team
name: team-web
route: {webhook: "{HOOK}/web"}
---
# SecOps: a CI runner's session may carry a login uid or a terminal, which would make every
# read here `human-use-of-nhi`; that rule has its own tests in the collector.
kind: Detections
name: default
rules:
  human-use-of-nhi: {enabled: false}
---
# The owner: the payments service account reads the key, as its user and executable only.
kind: Workload
name: payments-api
owner: team-payments
identity_type: service-account
match:
  host_labels: {env: journey}
  uid: {UID}
  exe: "{ACTOR}"
expect:
  credentials: [journey-cloud-key]
  windows: [{WINDOW}]
"#;

fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A daily UTC window from `now + from` to `now + to` (minutes; it may cross midnight).
fn window(from_min: i64, to_min: i64) -> String {
    let now = Utc::now();
    let at = |m: i64| (now + chrono::Duration::minutes(m)).format("%H:%M").to_string();
    format!("{{from: \"{}\", to: \"{}\", tz: UTC}}", at(from_min), at(to_min))
}

/// A window that holds now (and the next two hours).
fn window_now() -> String {
    window(-120, 120)
}

/// A window that does not hold now.
fn window_later() -> String {
    window(180, 240)
}

// ---------------------------------------------------------------------------------------------
// The owners' webhook receiver.

/// One notice the receiver got: when, on which path, the JSON body.
#[derive(Debug, Clone)]
struct Notice {
    at: Instant,
    path: String,
    body: Value,
}

type Notices = Arc<Mutex<Vec<Notice>>>;

/// A real HTTP server on 127.0.0.1:0 recording every POST, as a team's webhook would.
struct Receiver {
    _rt: tokio::runtime::Runtime,
    base: String,
    got: Notices,
}

impl Receiver {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let got: Notices = Arc::default();
        async fn hook(State(got): State<Notices>, uri: Uri, body: Bytes) -> StatusCode {
            let at = Instant::now();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            got.lock().expect("lock").push(Notice { at, path: uri.path().to_owned(), body });
            StatusCode::ACCEPTED
        }
        let app = Router::new().fallback(hook).with_state(got.clone());
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        rt.spawn(async move { axum::serve(listener, app).await.expect("receiver") });
        Self { _rt: rt, base: format!("http://{addr}"), got }
    }

    fn on(&self, path: &str) -> Vec<Notice> {
        self.got.lock().expect("lock").iter().filter(|n| n.path == path).cloned().collect()
    }

    /// Waits for a notice on `path` matching `pred`.
    fn wait(&self, path: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Notice {
        let deadline = Instant::now() + within;
        loop {
            if let Some(n) = self.on(path).into_iter().find(|n| pred(&n.body)) {
                return n;
            }
            assert!(Instant::now() < deadline, "no matching notice on {path} within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The collector process.

/// `keywatch serve` on its own data directory; killed (SIGKILL) on drop.
struct Collector {
    child: Option<Child>,
    data: PathBuf,
    log: PathBuf,
    sensor_url: String,
    api_url: String,
}

impl Collector {
    /// Starts on free ports (`listen` `None`) or on the ports of an earlier start.
    fn start(dir: &Path, listen: Option<(&str, &str)>) -> Self {
        let data = dir.join("keywatch-data");
        for f in ["sensor.addr", "api.addr"] {
            let _ = std::fs::remove_file(data.join(f));
        }
        let (sensor, api) = listen.unwrap_or(("127.0.0.1:0", "127.0.0.1:0"));
        let log = dir.join("collector.log");
        let child = Command::new(COLLECTOR)
            .arg("--data")
            .arg(&data)
            .args(["serve", "--sensor-listen", sensor, "--api-listen", api])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log"))
            .spawn()
            .expect("starting the collector");
        let (sensor_url, api_url) = keywatch_tests::collector_urls(&data, PATIENCE)
            .unwrap_or_else(|why| panic!("{why}: {}", tail(&log)));
        Self { child: Some(child), data, log, sensor_url, api_url }
    }

    /// `host:port` of both listeners, to restart on the same ones.
    fn listen_addrs(&self) -> (String, String) {
        let strip =
            |u: &str| u.trim_start_matches("https://").trim_start_matches("http://").to_owned();
        (strip(&self.sensor_url), strip(&self.api_url))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The CLI, with `token` (admin when `None`).
    fn cli(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(COLLECTOR);
        cmd.arg("--data").arg(&self.data);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.args(args).output().expect("running the keywatch CLI")
    }

    /// The CLI's stdout; panics when it fails.
    fn ok(&self, token: Option<&str>, args: &[&str]) -> String {
        let out = self.cli(token, args);
        assert!(
            out.status.success(),
            "keywatch {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn token(&self, role: &str, team: Option<&str>) -> String {
        let mut args = vec!["token", "create", "--role", role];
        if let Some(t) = team {
            args.extend(["--team", t]);
        }
        if role == "sensor" {
            args.extend(["--labels", "env=journey"]);
        }
        self.ok(None, &args).trim().to_owned()
    }

    fn apply(&self, token: Option<&str>, file: &Path) {
        self.ok(token, &["apply", "-f", &file.to_string_lossy()]);
    }

    fn alerts(&self) -> Vec<Value> {
        json_lines(&self.ok(None, &["alerts", "--json"]))
    }

    fn timeline(&self, token: Option<&str>, host: &str, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["timeline", "--host", host, "--since", "30m", "--json"];
        args.extend(extra);
        json_lines(&self.ok(token, &args))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("collector log:\n{}", tail(&self.log));
        }
    }
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// The sensor process.

/// `keywatch-sensor run --collector …`, stopped with SIGTERM on drop (before its pins go).
struct Sensor {
    child: Child,
    log: PathBuf,
    _pins: Pins,
}

impl Sensor {
    /// Enrolls with a join token and waits until the collector's policy is in force; `None`
    /// (outside CI, with the reason printed) when BPF cannot load here.
    fn start(dir: &Path, collector: &Collector, host: &str) -> Option<Self> {
        let pins = Pins::new(SENSOR, PathBuf::from(format!("/sys/fs/bpf/kw-journey-{host}")));
        let token = collector.token("sensor", None);
        let log = dir.join("sensor.log");
        let mut child = Command::new(SENSOR)
            .args(["run", "--collector", &collector.sensor_url, "--join-token", &token])
            .args(["--host-id", host, "--state-dir"])
            .arg(dir.join("sensor"))
            .arg("--pin-dir")
            .arg(pins.dir())
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("starting the sensor");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("applying the collector's policy") {
                return Some(Self { child, log, _pins: pins });
            }
            let exited = child.try_wait().expect("wait").is_some();
            let refused = text.lines().any(|l| l.starts_with("keywatch-sensor:"));
            if exited || refused {
                let _ = child.kill();
                let _ = child.wait();
                assert!(!in_ci(), "BPF must load under CI, but the sensor did not start:\n{text}");
                eprintln!("SKIPPED: the sensor cannot run here:\n{}", tail(&log));
                return None;
            }
            assert!(Instant::now() < deadline, "the sensor did not get its policy:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("sensor log:\n{}", tail(&self.log));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One journey's world.

struct Journey {
    dir: tempfile::TempDir,
    host: String,
    cred: PathBuf,
    hooks: Receiver,
    // Dropped in this order: the sensor first, then the collector.
    sensor: Option<Sensor>,
    collector: Collector,
}

impl Journey {
    /// A collector with the declarations (the workload's window given), a webhook receiver, a
    /// credential file, and an enrolled sensor with the policy in force. `None`: skipped.
    fn start(name: &str, window: &str) -> Option<Self> {
        let dir = tempfile::Builder::new().prefix("kw-journey-").tempdir().expect("tempdir");
        // Readable by the declared workload's user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cred = dir.path().join("creds").join("cloud-key");
        std::fs::create_dir_all(cred.parent().unwrap()).unwrap();
        std::fs::set_permissions(cred.parent().unwrap(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(&cred, "[default]\naws_access_key_id = AKIAJOURNEY\n").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).unwrap();
        let hooks = Receiver::start();
        let collector = Collector::start(dir.path(), None);
        let host = format!("{name}-{}", std::process::id());
        let mut j = Self { dir, host, cred, hooks, sensor: None, collector };
        j.declare(window);
        j.sensor = Some(Sensor::start(j.dir.path(), &j.collector, &j.host)?);
        j.wait_until_watched();
        Some(j)
    }

    fn declarations(&self, window: &str) -> String {
        DECLARATIONS
            .replace("{CRED}", &self.cred.display().to_string())
            .replace("{HOOK}", &self.hooks.base)
            .replace("{ACTOR}", ACTOR)
            .replace("{UID}", &PAYMENTS_UID.to_string())
            .replace("{WINDOW}", window)
    }

    fn write(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Applies the declarations with the workload's window set to `window` (admin).
    fn declare(&self, window: &str) {
        let file = self.write("declarations.yaml", &self.declarations(window));
        self.collector.apply(None, &file);
    }

    /// The declared workload reads its credential (its user, its executable); returns the pid
    /// once the read is done.
    fn declared_read(&self) -> u32 {
        // kw-actor drops to the workload's user and execs itself: the pid that reads is the
        // one spawned here.
        let mut child = Command::new(ACTOR)
            .args(["as-user", &PAYMENTS_UID.to_string(), ACTOR, "read"])
            .arg(&self.cred)
            .spawn()
            .expect("kw-actor");
        let pid = child.id();
        assert!(child.wait().unwrap().success(), "the declared read failed");
        pid
    }

    /// A process no workload declares (`cat`, as root) reads the credential; returns its pid.
    fn undeclared_read(&self) -> u32 {
        let mut child =
            Command::new("cat").arg(&self.cred).stdout(Stdio::null()).spawn().expect("cat");
        let pid = child.id();
        assert!(child.wait().unwrap().success(), "cat failed");
        pid
    }

    /// The timeline's file accesses (admin token).
    fn reads(&self) -> Vec<Value> {
        self.collector.timeline(None, &self.host, &["--kind", "file-access", "--limit", "10000"])
    }

    /// Waits until the collector has stored the read of `pid`.
    fn wait_stored(&self, pid: u32) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(e) = self.reads().into_iter().find(|e| e["pid"] == pid) {
                return e;
            }
            assert!(Instant::now() < deadline, "the read of pid {pid} never reached the timeline");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The policy reaches the kernel maps just after the sensor logs it: the declared workload
    /// reads until one of its reads is stored (those reads raise nothing).
    fn wait_until_watched(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let pid = self.declared_read();
            let until = Instant::now() + Duration::from_millis(700);
            while Instant::now() < until {
                if self.reads().iter().any(|e| e["pid"] == pid) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(Instant::now() < deadline, "the credential never became watched");
        }
    }

    fn alerts_by_rule(&self, rule: &str) -> Vec<Value> {
        self.collector.alerts().into_iter().filter(|a| a["rule"] == rule).collect()
    }

    /// Waits for an alert of `rule` whose process is `pid`.
    fn wait_alert(&self, rule: &str, pid: u32) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(a) =
                self.alerts_by_rule(rule).into_iter().find(|a| a["process"]["pid"] == pid)
            {
                return a;
            }
            assert!(Instant::now() < deadline, "no {rule} alert for pid {pid}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn this_exe() -> String {
    std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap().display().to_string()
}

fn cat_exe() -> String {
    let out = Command::new("sh").args(["-c", "command -v cat"]).output().expect("sh");
    let path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    std::fs::canonicalize(path).unwrap().display().to_string()
}

// ---------------------------------------------------------------------------------------------
// The journeys.

/// Owner declares, sensor sees, collector judges: the declared process inside its window raises
/// nothing; an undeclared process reading the same credential raises `unknown-identity`, which
/// reaches SecOps and the credential's owner with the full context within 2 seconds.
#[test]
fn owner_declares_sensor_sees_collector_judges() {
    let Some(j) = Journey::start("judges", &window_now()) else { return };
    let c = &j.collector;

    let declared = j.declared_read();
    let event = j.wait_stored(declared);
    assert_eq!(event["workload"], "payments-api", "{event}");
    assert_eq!(event["process"]["exe"], ACTOR);
    assert_eq!(event["process"]["uid"], PAYMENTS_UID);
    assert!(c.alerts().is_empty(), "a declared read in its window alerted: {:?}", c.alerts());
    assert!(j.hooks.got.lock().unwrap().is_empty(), "nothing is delivered for a declared read");

    let read_done = Instant::now();
    let pid = j.undeclared_read();
    let notice = j.hooks.wait("/payments", PATIENCE, |b| b["alert"]["process"]["pid"] == pid);
    let latency = notice.at.saturating_duration_since(read_done);
    println!("unknown-identity alert at the owner's webhook {latency:?} after the read");
    assert!(latency <= Duration::from_secs(2), "the owner heard of it after {latency:?}");

    let b = &notice.body;
    assert_eq!((b["type"].as_str(), b["team"].as_str()), (Some("alert"), Some("team-payments")));
    assert_eq!(b["reason"], "credential-owner");
    let a = &b["alert"];
    assert_eq!(a["rule"], "unknown-identity");
    assert_eq!(a["severity"], "high");
    assert_eq!(
        (a["workload"].as_str(), a["owner"].as_str()),
        (Some("undeclared"), Some("undeclared"))
    );
    assert_eq!(a["declared_by"][0]["workload"], "payments-api", "{a}");
    assert_eq!(a["declared_by"][0]["owner"], "team-payments");
    assert_eq!(a["host"]["id"], j.host.as_str());
    assert_eq!(a["host"]["labels"]["env"], "journey");
    assert_eq!(a["process"]["exe"], cat_exe().as_str());
    assert_eq!(a["process"]["uid"], 0);
    assert_eq!(a["process"]["ancestors"][0]["exe"], this_exe().as_str(), "{}", a["process"]);
    assert_eq!(a["resource"]["kind"], "credential");
    assert_eq!(a["resource"]["watch"], WATCH);
    assert_eq!(a["resource"]["path"], j.cred.display().to_string().as_str());
    assert_eq!(a["count"], 1);
    assert!(a["frameworks"]["attack"].as_array().is_some_and(|t| !t.is_empty()));

    // SecOps gets it too (undeclared identity); the other team does not.
    let s = j.hooks.wait("/secops", PATIENCE, |b| b["alert"]["process"]["pid"] == pid);
    assert_eq!(s.body["reason"], "undeclared");
    assert!(j.hooks.on("/web").is_empty());
    // The collector's view agrees.
    let stored = j.wait_alert("unknown-identity", pid);
    assert_eq!(stored["id"], a["id"]);
}

/// Out of window, then an approved change: the declared read outside its window alerts; under
/// an `ApprovedChange` covering now it does not; after the change expires, a later alert names
/// the change that expired.
#[test]
fn out_of_window_then_approved_change() {
    let Some(j) = Journey::start("window", &window_now()) else { return };
    let c = &j.collector;
    let owner = c.token("owner", Some("team-payments"));
    j.declare(&window_later());

    let pid = j.declared_read();
    let first = j.wait_alert("out-of-window", pid);
    assert_eq!(
        (first["workload"].as_str(), first["owner"].as_str()),
        (Some("payments-api"), Some("team-payments"))
    );
    assert!(first["approved_change"].is_null() && first["last_expired_change"].is_null());
    assert!(first["expected_windows"][0].as_str().is_some_and(|w| w.contains("UTC")), "{first}");
    j.hooks.wait("/payments", PATIENCE, |b| b["alert"]["id"] == first["id"]);

    // The owner approves a change covering now, ending a few seconds from now.
    let until = Utc::now() + chrono::Duration::seconds(5);
    let change = format!(
        "kind: ApprovedChange\nname: CHG-7001\nworkload: payments-api\nfrom: {}\nuntil: {}\n\
         reason: key rotation outside business hours\ncovers: [out-of-window]\n",
        utc(Utc::now() - chrono::Duration::minutes(1)),
        utc(until)
    );
    c.apply(Some(&owner), &j.write("change.yaml", &change));
    let covered = j.declared_read();
    j.wait_stored(covered);
    let ow = j.alerts_by_rule("out-of-window");
    assert_eq!(ow.len(), 1, "a read under the approved change alerted: {ow:?}");
    assert_eq!(ow[0]["count"], 1, "a read under the approved change was counted: {ow:?}");

    // The owner resolves the first alert, so the next read opens a new one (not a repeat).
    c.ok(Some(&owner), &["resolve", &first["id"].to_string(), "--note", "window fixed"]);
    while Utc::now() <= until + chrono::Duration::milliseconds(200) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let later = j.declared_read();
    let again = j.wait_alert("out-of-window", later);
    assert_ne!(again["id"], first["id"]);
    assert!(again["approved_change"].is_null(), "{again}");
    assert_eq!(again["last_expired_change"]["name"], "CHG-7001", "{again}");
    assert_eq!(again["last_expired_change"]["reason"], "key rotation outside business hours");
    let notice = j.hooks.wait("/payments", PATIENCE, |b| b["alert"]["id"] == again["id"]);
    assert_eq!(notice.body["alert"]["last_expired_change"]["name"], "CHG-7001");
}

/// The responder pulls the host's timeline: the read, its process ancestry and the alert, in
/// order.
#[test]
fn responder_timeline_shows_read_ancestry_and_alert_in_order() {
    let Some(j) = Journey::start("responder", &window_now()) else { return };
    let c = &j.collector;
    let responder = c.token("responder", None);

    // A shell that runs cat: the ancestry is cat < sh < this test.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("cat {} >/dev/null; true", j.cred.display()))
        .spawn()
        .expect("sh");
    let sh_pid = child.id();
    assert!(child.wait().unwrap().success());
    let deadline = Instant::now() + PATIENCE;
    let (read, alert) = loop {
        let entries = c.timeline(Some(&responder), &j.host, &[]);
        let read = entries.iter().position(|e| {
            e["kind"] == "file-access" && e["process"]["ancestors"][0]["pid"] == sh_pid
        });
        if let Some(r) = read {
            let pid = entries[r]["pid"].clone();
            if let Some(a) = entries.iter().position(|e| e["kind"] == "alert" && e["pid"] == pid) {
                assert!(r < a, "the read comes before its alert: {entries:#?}");
                break (entries[r].clone(), entries[a].clone());
            }
        }
        assert!(Instant::now() < deadline, "no read and alert on the timeline: {entries:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let p = &read["process"];
    assert_eq!(p["exe"], cat_exe().as_str());
    let ancestry: Vec<&str> = p["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["exe"].as_str().unwrap_or(""))
        .collect();
    assert!(ancestry.len() >= 2, "{ancestry:?}");
    assert!(ancestry[0].ends_with("sh"), "{ancestry:?}");
    assert_eq!(ancestry[1], this_exe(), "{ancestry:?}");
    assert!(read["summary"].as_str().unwrap().contains(&j.cred.display().to_string()), "{read}");
    assert!(alert["summary"].as_str().unwrap().contains("unknown-identity"), "{alert}");
    assert!(read["time"].as_str() <= alert["time"].as_str());
}

/// No loss across restarts: many distinct processes read while the collector is killed
/// (SIGKILL) and restarted; the timeline then holds every read exactly once.
#[test]
fn no_loss_when_the_collector_is_killed_during_a_burst() {
    const READERS: usize = 200;
    let Some(mut j) = Journey::start("burst", &window_now()) else { return };
    let before: Vec<u32> =
        j.reads().iter().filter_map(|e| e["pid"].as_u64()).map(|p| p as u32).collect();
    let (sensor_addr, api_addr) = j.collector.listen_addrs();

    let started = Instant::now();
    let mut pids = Vec::with_capacity(READERS);
    for i in 0..READERS {
        if i == READERS / 2 {
            j.collector.kill();
        }
        if i == READERS * 3 / 4 {
            j.collector = Collector::start(j.dir.path(), Some((&sensor_addr, &api_addr)));
        }
        let mut child = Command::new(ACTOR).args(["read"]).arg(&j.cred).spawn().expect("kw-actor");
        pids.push(child.id());
        assert!(child.wait().unwrap().success());
    }
    println!(
        "{READERS} reads in {:?}, the collector killed and restarted among them",
        started.elapsed()
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let counts = loop {
        let mut counts = std::collections::BTreeMap::<u32, usize>::new();
        for e in j.reads() {
            let pid = e["pid"].as_u64().unwrap() as u32;
            if !before.contains(&pid) {
                *counts.entry(pid).or_default() += 1;
            }
        }
        if counts.len() >= READERS || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let missing: Vec<u32> = pids.iter().copied().filter(|p| !counts.contains_key(p)).collect();
    assert!(missing.is_empty(), "{} reads missing after the restart: {missing:?}", missing.len());
    let twice: Vec<(&u32, &usize)> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "reads stored more than once: {twice:?}");
    assert_eq!(counts.len(), READERS, "unexpected readers: {counts:?}");
    // Detection ran once per read too: the undeclared reads fold into alerts counting each once.
    // (Only those about this journey's credential: until the collector's policy arrives, the
    // sensor watches the built-in catalog, where other processes may be seen.)
    let cred = j.cred.display().to_string();
    let alerts: Vec<Value> = j
        .alerts_by_rule("unknown-identity")
        .into_iter()
        .filter(|a| a["resource"]["path"] == cred.as_str())
        .collect();
    let total: u64 = alerts.iter().filter_map(|a| a["count"].as_u64()).sum();
    assert_eq!(total, READERS as u64, "unknown-identity alerts: {alerts:#?}");
}

/// Decision rights: an owner of another team can neither change the workload nor acknowledge
/// its alert (`permission denied`); the owning team can.
#[test]
fn decision_rights_of_owners() {
    let Some(j) = Journey::start("rights", &window_now()) else { return };
    let c = &j.collector;
    let payments = c.token("owner", Some("team-payments"));
    let web = c.token("owner", Some("team-web"));
    j.declare(&window_later());

    let pid = j.declared_read();
    let alert = j.wait_alert("out-of-window", pid);
    let id = alert["id"].to_string();

    // team-web widens payments-api's window: refused whole, nothing changes.
    let widened =
        j.write("widened.yaml", j.declarations(&window_now()).split("\n---\n").last().unwrap());
    let before = c.ok(None, &["get", "workload", "payments-api", "-o", "yaml"]);
    let out = c.cli(Some(&web), &["apply", "-f", &widened.to_string_lossy()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("permission denied"), "{err}");
    assert!(err.contains("team-web") && err.contains("team-payments"), "{err}");
    assert_eq!(c.ok(None, &["get", "workload", "payments-api", "-o", "yaml"]), before);

    let out = c.cli(Some(&web), &["ack", &id, "--note", "not ours"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("permission denied"), "{err}");
    let shown = json_lines(&c.ok(Some(&web), &["alerts", "--json"]));
    assert!(shown.iter().all(|a| a["owner"] == "team-web"), "team-web sees others' alerts");

    c.ok(Some(&payments), &["ack", &id, "--note", "on it"]);
    let now: Value =
        serde_json::from_str(&c.ok(None, &["alerts", "show", &id, "--json"])).expect("json");
    assert_eq!(now["status"], "acknowledged");
    let actor = now["transitions"][0]["actor"].as_str().unwrap_or_default();
    assert!(actor.contains("owner"), "{now}");

    // The owning team may change its own workload.
    c.apply(Some(&payments), &widened);
    assert_ne!(c.ok(None, &["get", "workload", "payments-api", "-o", "yaml"]), before);
}
