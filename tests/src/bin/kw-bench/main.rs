//! What the sensor costs the host it watches: `cargo xtask bench sensor`.
//!
//! Runs the real `keywatch-sensor` release binary as a child process and measures, in this
//! process, against a baseline taken in the same run:
//!
//! 1. per-operation cost of `openat+close` (unwatched and watched file), `getppid`,
//!    `fork+exec /bin/true` and a loopback TCP connect, in alternating detached/attached rounds
//!    (the order flips every round, so drift on a noisy machine hits both sides); each figure is
//!    the median over rounds of the attached/detached ratio, with its spread;
//! 2. how many watched accesses per second the sensor delivers with every occurrence accounted
//!    for (delivered counts plus counted losses equal what was produced);
//! 3. the sensor's RSS and CPU at idle and under 10,000 watched accesses per second.
//!
//! With `--interleave N`, only the first, with one sensor in this process whose programs are
//! detached and attached again in place between measurements (see `interleave`).
//!
//! Prints figures and targets; it never fails on a missed target. Needs root.

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader, Read as _},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// What the sensor logs on stderr once every program is attached and the watches are in force.
const READY_LINE: &str = "writing observations to stdout";
/// Files in the burst directory; each driver process opens each of them once.
const BURST_FILES: usize = 10_000;

/// When this process started, for the progress lines.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, stamped with the seconds since start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[{:6.1} s] {}",
            $crate::STARTED.get_or_init(std::time::Instant::now).elapsed().as_secs_f64(),
            format_args!($($arg)*)
        )
    };
}

mod interleave;

fn main() -> ExitCode {
    STARTED.get_or_init(Instant::now);
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kw-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Command line: `kw-bench --sensor PATH [--quick] [--json] [--rounds N] [--program-cost]
/// [--only KEY,…] [--interleave N]`.
struct Args {
    sensor: PathBuf,
    quick: bool,
    /// Only these overhead workloads, nothing else (for a focused comparison).
    only: Option<Vec<Workload>>,
    /// Only the file-open program's own cost per run (seconds, for tuning the kernel side).
    program_cost: bool,
    /// Only what the sensor adds per operation (kernel programs, its threads), per program,
    /// for fork+exec and connect (or the `--only` workloads).
    op_cost: bool,
    json: bool,
    rounds: Option<usize>,
    /// Pairs of the quick alternation (`--interleave`), if asked for.
    interleave: Option<usize>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sensor: PathBuf::from("target/release/keywatch-sensor"),
        quick: false,
        only: None,
        program_cost: false,
        op_cost: false,
        json: false,
        rounds: None,
        interleave: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sensor" => args.sensor = it.next().context("--sensor needs a path")?.into(),
            "--quick" => args.quick = true,
            "--json" => args.json = true,
            "--program-cost" => args.program_cost = true,
            "--op-cost" | "--fork-cost" => args.op_cost = true,
            "--only" => {
                let keys = it.next().context("--only needs workload keys")?;
                let only =
                    keys.split(',').map(Workload::from_key).collect::<anyhow::Result<_>>()?;
                args.only = Some(only);
            }
            "--rounds" => {
                args.rounds = Some(it.next().context("--rounds needs a number")?.parse()?);
            }
            "--interleave" => {
                args.interleave =
                    Some(it.next().context("--interleave needs a number of pairs")?.parse()?);
            }
            "-h" | "--help" => {
                println!(
                    "kw-bench --sensor PATH [--quick] [--json] [--rounds N] [--program-cost] [--only KEY,...] [--interleave N]\n\n\
                     Overhead of keywatch-sensor on this host, as ratios against a baseline\n\
                     measured in the same run. Needs root.\n\n\
                     --program-cost  only the file-open program's own nanoseconds per run\n\
                     \x20               (kernel run-time statistics), in a few seconds\n\
                     --op-cost       only what the sensor adds to one fork+exec and one\n\
                     \x20               connect (or the --only workloads): each kernel\n\
                     \x20               program's and the sensor threads' nanoseconds\n\
                     --rounds N      attached/detached rounds (12; 4 with --quick). Each\n\
                     \x20               ratio comes with a 95% interval of its median; on a\n\
                     \x20               noisy machine, more rounds narrow it\n\
                     --only KEYS     only these overhead workloads, no delivery or resource\n\
                     \x20               passes; keys: {}\n\
                     --interleave N  only the overhead workloads (or --only ones), in N pairs\n\
                     \x20               of blocks with the programs detached and attached in\n\
                     \x20               place, milliseconds apart: tighter intervals than\n\
                     \x20               sensor start/stop rounds on a noisy machine",
                    Workload::ALL.map(Workload::key).join(", ")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(args)
}

/// How much of everything to do.
struct Plan {
    rounds: usize,
    /// The overhead workloads measured.
    workloads: Vec<Workload>,
    getppid_iters: u64,
    open_iters: u64,
    connect_iters: u64,
    fork_iters: u64,
    /// Paced rates of the delivery sweep; `None` is "as fast as one driver goes".
    rates: Vec<Option<u64>>,
    step: Duration,
    idle: Duration,
    load: Duration,
}

impl Plan {
    /// Operations per timed measurement of `w`.
    fn iters(&self, w: Workload) -> u64 {
        match w {
            Workload::OpenUnwatched | Workload::OpenWatched => self.open_iters,
            Workload::Getppid => self.getppid_iters,
            Workload::ForkExec => self.fork_iters,
            Workload::Connect => self.connect_iters,
        }
    }

    fn new(args: &Args) -> Self {
        let mut plan = if args.quick {
            Self {
                rounds: 4,
                workloads: Workload::ALL.to_vec(),
                getppid_iters: 250_000,
                open_iters: 40_000,
                connect_iters: 4_000,
                fork_iters: 60,
                rates: vec![Some(50_000), Some(200_000), None],
                step: Duration::from_millis(500),
                idle: Duration::from_secs(2),
                load: Duration::from_secs(2),
            }
        } else {
            Self {
                rounds: 12,
                workloads: Workload::ALL.to_vec(),
                getppid_iters: 1_000_000,
                open_iters: 200_000,
                connect_iters: 100_000,
                fork_iters: 1_500,
                rates: vec![
                    Some(25_000),
                    Some(50_000),
                    Some(100_000),
                    Some(150_000),
                    Some(200_000),
                    None,
                ],
                step: Duration::from_secs(2),
                idle: Duration::from_secs(5),
                load: Duration::from_secs(5),
            }
        };
        if let Some(rounds) = args.rounds {
            plan.rounds = rounds.max(1);
        }
        if let Some(only) = &args.only {
            plan.workloads = only.clone();
        }
        plan
    }
}

fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root: the sensor loads kernel programs");
    }
    let sensor = std::fs::canonicalize(&args.sensor)
        .with_context(|| format!("sensor binary {}", args.sensor.display()))?;
    let plan = Plan::new(&args);
    progress!("creating {BURST_FILES} watched files");
    let bench = Workspace::create()?;
    let started = Instant::now();
    if args.program_cost {
        for (w, ns) in open_program_cost(&sensor, &bench, &plan)? {
            println!("{:<34} {ns:>6.0} ns/run", w.label());
        }
        return Ok(());
    }
    if let Some(pairs) = args.interleave {
        let samples = interleave::interleaved(&bench, &plan, pairs.max(1))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&interleave::json(&samples))?);
        } else {
            print!("{}", interleave::table(&samples));
        }
        return Ok(());
    }
    if args.op_cost {
        let workloads = match &args.only {
            Some(only) => only.clone(),
            None => vec![Workload::ForkExec, Workload::Connect],
        };
        for w in workloads {
            op_cost(&sensor, &bench, &plan, w)?;
        }
        return Ok(());
    }

    let overhead = overhead_rounds(&sensor, &bench, &plan)?;
    let full = args.only.is_none();
    let open_program = if full { open_program_cost(&sensor, &bench, &plan)? } else { Vec::new() };
    let delivery = if full { delivery_sweep(&sensor, &bench, &plan)? } else { Vec::new() };
    let resources = if full { resources(&sensor, &bench, &plan)? } else { Vec::new() };
    let report = Report {
        overhead,
        open_program,
        delivery,
        resources,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        print!("{}", report.table());
    }
    progress!("removing the watched files");
    drop(bench);
    progress!("done");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The files and the watch config.

/// A temporary directory with an unwatched file, a watched file, a directory of burst files
/// watched by a glob, and the sensor's watch config naming them.
struct Workspace {
    /// Removed on drop.
    _dir: tempfile::TempDir,
    unwatched: CString,
    watched: CString,
    burst_dir: PathBuf,
    burst: Vec<CString>,
    config: PathBuf,
}

impl Workspace {
    fn create() -> anyhow::Result<Self> {
        // tmpfs when there is one: creating and removing thousands of files on a disk file
        // system under load takes seconds and adds journal noise to the timed loops.
        let shm = Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("kw-bench.");
        let dir = if shm.is_dir() { builder.tempdir_in(shm)? } else { builder.tempdir()? };
        let root = dir.path();
        // Separate directories: the unwatched file's parent must not be a watched directory,
        // or its opens would take the directory lookup's slower path.
        for sub in ["unwatched", "watched", "burst"] {
            std::fs::create_dir(root.join(sub))?;
        }
        let unwatched = root.join("unwatched/plain.txt");
        let watched = root.join("watched/token");
        std::fs::write(&unwatched, b"plain\n")?;
        std::fs::write(&watched, b"secret\n")?;
        let burst_dir = root.join("burst");
        let mut burst = Vec::with_capacity(BURST_FILES);
        for i in 0..BURST_FILES {
            let path = burst_dir.join(format!("k{i:05}"));
            std::fs::write(&path, b"k\n")?;
            burst.push(cstring(&path)?);
        }
        let config = root.join("watch.yaml");
        std::fs::write(
            &config,
            format!(
                "builtin: true\n\
                 watches:\n  \
                   - name: bench-token\n    category: credential\n    paths: [{:?}]\n  \
                   - name: bench-burst\n    category: credential\n    paths: [{:?}]\n",
                watched.display().to_string(),
                burst_dir.join("*").display().to_string(),
            ),
        )?;
        Ok(Self {
            unwatched: cstring(&unwatched)?,
            watched: cstring(&watched)?,
            burst_dir,
            burst,
            config,
            _dir: dir,
        })
    }

    fn watched_path(&self) -> &[u8] {
        self.watched.as_bytes()
    }
}

fn cstring(path: &Path) -> anyhow::Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

// ---------------------------------------------------------------------------------------------
// The sensor as a child process.

/// Occurrences the sensor reported, from its JSON lines.
#[derive(Default)]
struct Counts {
    /// Sum of `count` over file opens of the watched file.
    watched: AtomicU64,
    /// Sum of `count` over file opens in the burst directory.
    burst: AtomicU64,
}

/// A running `keywatch-sensor run --stdout`.
struct SensorProcess {
    child: Child,
    counts: Arc<Counts>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    start_ms: f64,
}

impl SensorProcess {
    /// Starts the sensor and returns once it says it is attached.
    fn start(sensor: &Path, config: Option<&Path>, bench: &Workspace) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut cmd = Command::new(sensor);
        // Unpinned: a stopped sensor must leave nothing attached, or the detached rounds would
        // measure pinned programs.
        cmd.args(["run", "--stdout", "--no-pin"]);
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        let mut child = cmd
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", sensor.display()))?;
        let counts = Arc::new(Counts::default());
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let readers = vec![
            {
                let counts = Arc::clone(&counts);
                let watched = bench.watched_path().to_vec();
                let mut burst = bench.burst_dir.as_os_str().as_bytes().to_vec();
                burst.push(b'/');
                std::thread::spawn(move || count_observations(out, &counts, &watched, &burst))
            },
            {
                let stderr = Arc::clone(&stderr);
                std::thread::spawn(move || {
                    for line in BufReader::new(err).lines() {
                        let Ok(line) = line else { break };
                        if line.contains(READY_LINE) {
                            let _ = ready_tx.send(());
                        }
                        stderr.lock().expect("stderr lines").push(line);
                    }
                })
            },
        ];
        let mut sensor = Self { child, counts, stderr, readers, start_ms: 0.0 };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                break;
            }
            if let Some(status) = sensor.child.try_wait()? {
                sensor.join_readers();
                bail!(
                    "keywatch-sensor exited ({status}) before attaching:\n{}",
                    sensor.stderr_tail()
                );
            }
            if Instant::now() > deadline {
                sensor.stop()?;
                bail!("keywatch-sensor did not attach within 90 s");
            }
        }
        sensor.start_ms = started.elapsed().as_secs_f64() * 1e3;
        // Let the first watch sync, the process-table seed, the first executable hashes and
        // the first DNS refresh settle: measuring while they run would charge start-up work
        // to the workloads.
        std::thread::sleep(Duration::from_millis(500));
        sensor.wait_idle();
        Ok(sensor)
    }

    /// Waits (at most 10 s) until the sensor's threads use under 2 % of a CPU over 100 ms.
    fn wait_idle(&self) {
        const WINDOW: Duration = Duration::from_millis(100);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut before = SensorThreads::take(self.pid());
        while Instant::now() < deadline {
            std::thread::sleep(WINDOW);
            let now = SensorThreads::take(self.pid());
            if now.since(&before) < WINDOW.as_nanos() as u64 / 50 {
                return;
            }
            before = now;
        }
        progress!("keywatch-sensor still busy 10 s after start; measuring anyway");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, wait, and return the file-open records the kernel could not queue (from the
    /// exit log; the accesses the bench produces are all file opens, and the sensor's own
    /// count of every kind would also hold the forks, execs and exits around them).
    fn stop(mut self) -> anyhow::Result<u64> {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("keywatch-sensor ignored SIGTERM for 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.join_readers();
        let lines = self.stderr.lock().expect("stderr lines");
        let stopped =
            lines.iter().rev().find(|l| l.contains("lost_records")).with_context(|| {
                format!("keywatch-sensor did not report its lost records:\n{}", lines.join("\n"))
            })?;
        Ok(lost_file_opens(stopped))
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().expect("stderr lines");
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Reads JSON lines and adds up `count` per file of interest. A light scan, not a parse: the
/// sensor writes a line per observation and this reader must keep up with it on a shared CPU.
fn count_observations(out: impl std::io::Read, counts: &Counts, watched: &[u8], burst: &[u8]) {
    let mut reader = BufReader::with_capacity(1 << 20, out);
    let mut line = Vec::with_capacity(4096);
    let watched_field = format!("\"path\":\"{}\"", String::from_utf8_lossy(watched));
    let burst_field = format!("\"path\":\"{}", String::from_utf8_lossy(burst));
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        if !text.contains("\"kind\":\"file_open\"") {
            continue;
        }
        // `count` is the second field of every observation, before any nested object.
        let count =
            text.find("\"count\":").and_then(|at| leading_u64(&line[at + 8..])).unwrap_or(1);
        if text.contains(burst_field.as_str()) {
            counts.burst.fetch_add(count, Ordering::Relaxed);
        } else if text.contains(watched_field.as_str()) {
            counts.watched.fetch_add(count, Ordering::Relaxed);
        }
    }
}

fn leading_u64(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&bytes[..digits]).ok()?.parse().ok()
}

/// `name=123` anywhere in a log line, colours or not.
/// File-open records lost and not recovered, from the sensor's stop line
/// (`lost_by_kind=file_open=N …`, absent when none were; `recovered_by_sweep=M`: lost records
/// of keys with no record delivered, whose occurrences the sensor reported from the kernel's
/// fold counts instead).
fn lost_file_opens(stopped: &str) -> u64 {
    let lost = field_u64(stopped, "file_open=").unwrap_or(0);
    lost.saturating_sub(field_u64(stopped, "recovered_by_sweep=").unwrap_or(0))
}

fn field_u64(line: &str, name: &str) -> Option<u64> {
    let plain = strip_ansi(line);
    let at = plain.find(name)?;
    leading_u64(&plain.as_bytes()[at + name.len()..])
}

/// `line` without ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Per-operation overhead.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    OpenUnwatched,
    OpenWatched,
    Getppid,
    ForkExec,
    Connect,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::OpenUnwatched,
        Workload::OpenWatched,
        Workload::Getppid,
        Workload::ForkExec,
        Workload::Connect,
    ];

    fn label(self) -> &'static str {
        match self {
            Workload::OpenUnwatched => "openat+close, unwatched file",
            Workload::OpenWatched => "openat+close, watched file",
            Workload::Getppid => "getppid (unrelated syscall)",
            Workload::ForkExec => "fork+exec /bin/true, waited",
            Workload::Connect => "TCP connect, loopback, unwatched",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Workload::OpenUnwatched => "openat_close_unwatched",
            Workload::OpenWatched => "openat_close_watched",
            Workload::Getppid => "getppid",
            Workload::ForkExec => "fork_exec",
            Workload::Connect => "connect_loopback",
        }
    }

    fn from_key(key: &str) -> anyhow::Result<Self> {
        Self::ALL.into_iter().find(|w| w.key() == key).with_context(|| {
            format!("unknown workload {key:?}; known: {}", Self::ALL.map(Self::key).join(", "))
        })
    }

    /// Largest acceptable attached/detached ratio.
    fn target(self) -> f64 {
        match self {
            Workload::OpenUnwatched => 1.20,
            Workload::OpenWatched | Workload::Getppid => 1.40,
            Workload::ForkExec => 1.02,
            Workload::Connect => 1.03,
        }
    }
}

/// Everything a timed loop needs, prepared before timing.
struct Workloads<'a> {
    bench: &'a Workspace,
    plan: &'a Plan,
    listener: Listener,
}

impl Workloads<'_> {
    /// Nanoseconds per operation of one timed loop: wall clock, and CPU time spent on the host
    /// for it (see [`CpuSnapshot`]; `sensor` is the running sensor's pid, if any).
    fn measure(&self, w: Workload, sensor: Option<u32>) -> anyhow::Result<(f64, f64)> {
        self.measure_n(w, self.plan.iters(w), sensor)
    }

    /// [`Self::measure`] of a loop of `iters` operations.
    fn measure_n(
        &self,
        w: Workload,
        iters: u64,
        sensor: Option<u32>,
    ) -> anyhow::Result<(f64, f64)> {
        // A short warm-up of the same loop, untimed.
        self.run(w, (iters / 50).max(2))?;
        let cpu = CpuSnapshot::take(sensor);
        let started = Instant::now();
        self.run(w, iters)?;
        let wall = started.elapsed().as_nanos() as f64;
        let cpu = CpuSnapshot::take(sensor).since(&cpu) as f64;
        Ok((wall / iters as f64, cpu / iters as f64))
    }

    fn run(&self, w: Workload, iters: u64) -> anyhow::Result<()> {
        match w {
            Workload::OpenUnwatched => open_close(&self.bench.unwatched, iters),
            Workload::OpenWatched => open_close(&self.bench.watched, iters),
            Workload::Getppid => {
                for _ in 0..iters {
                    // SAFETY: no preconditions.
                    std::hint::black_box(unsafe { libc::getppid() });
                }
                Ok(())
            }
            Workload::ForkExec => fork_exec_true(iters),
            Workload::Connect => self.listener.connect_loop(iters),
        }
    }
}

/// CPU time spent on the host at one moment: this process and its waited-for children, and
/// every thread of the sensor (`/proc/PID/task/*/schedstat`). Kernel programs run in the
/// context of the task that triggers them, so their cost is in the first; the sensor's own
/// work in the second. Less noisy than wall time on a virtual machine, where waking an idle
/// CPU costs a variable delay.
struct CpuSnapshot {
    own_ns: u64,
    sensor: SensorThreads,
}

impl CpuSnapshot {
    fn take(sensor: Option<u32>) -> Self {
        let rusage_ns = |who| {
            // SAFETY: plain syscall filling a zeroed struct.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: valid `who` and out-pointer.
            unsafe { libc::getrusage(who, &mut usage) };
            let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
            ns(usage.ru_utime) + ns(usage.ru_stime)
        };
        let own_ns = rusage_ns(libc::RUSAGE_SELF) + rusage_ns(libc::RUSAGE_CHILDREN);
        Self { own_ns, sensor: sensor.map(SensorThreads::take).unwrap_or_default() }
    }

    /// Nanoseconds of CPU spent on the host since `earlier`.
    fn since(&self, earlier: &Self) -> u64 {
        self.own_ns.saturating_sub(earlier.own_ns) + self.sensor.since(&earlier.sensor)
    }
}

/// CPU time of each thread of the sensor, by thread id.
#[derive(Default)]
struct SensorThreads(std::collections::HashMap<String, u64>);

impl SensorThreads {
    fn take(pid: u32) -> Self {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten();
        Self(
            tasks
                .flatten()
                .filter_map(|t| {
                    let line = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
                    let ns = line.split_whitespace().next()?.parse::<u64>().ok()?;
                    Some((t.file_name().to_string_lossy().into_owned(), ns))
                })
                .collect(),
        )
    }

    /// Nanoseconds the sensor's threads ran since `earlier`. Per thread, so a thread that ended
    /// in between (an idle worker let go) does not take its whole past off the total; new
    /// threads count from zero.
    fn since(&self, earlier: &Self) -> u64 {
        self.0
            .iter()
            .map(|(tid, ns)| ns.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum()
    }
}

fn open_close(path: &CString, iters: u64) -> anyhow::Result<()> {
    for _ in 0..iters {
        // SAFETY: NUL-terminated path; the fd is closed right away.
        let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("openat");
        }
        // SAFETY: fd was just opened.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn fork_exec_true(iters: u64) -> anyhow::Result<()> {
    let prog = c"/bin/true";
    let argv = [prog.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    for _ in 0..iters {
        // SAFETY: the child only calls execve and _exit, both async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            // SAFETY: NUL-terminated program, NULL-terminated argv/envp, prepared before fork.
            unsafe {
                libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        wait_ok(pid, "/bin/true")?;
    }
    Ok(())
}

fn wait_ok(pid: libc::pid_t, what: &str) -> anyhow::Result<()> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(std::io::Error::last_os_error()).context("waitpid");
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{what} failed (wait status {status:#x})");
    }
    Ok(())
}

/// A TCP listener on 127.0.0.1 with a thread accepting and closing every connection.
struct Listener {
    addr: libc::sockaddr_in,
}

impl Listener {
    fn open() -> anyhow::Result<Self> {
        // SAFETY: plain socket calls on an fd this function owns; the accept thread keeps it.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("socket");
            }
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::bind(fd, (&raw const addr).cast(), len) != 0 || libc::listen(fd, 4096) != 0 {
                return Err(std::io::Error::last_os_error()).context("bind/listen 127.0.0.1");
            }
            let mut len = len;
            libc::getsockname(fd, (&raw mut addr).cast(), &mut len);
            std::thread::spawn(move || {
                loop {
                    let conn = libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    );
                    if conn >= 0 {
                        libc::close(conn);
                    } else {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            });
            Ok(Self { addr })
        }
    }

    /// socket + connect + close, closed with a reset so no TIME_WAIT piles up across rounds.
    fn connect_loop(&self, iters: u64) -> anyhow::Result<()> {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        let addr_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        for _ in 0..iters {
            // SAFETY: an fd this loop owns, a valid address and option value.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error()).context("socket");
                }
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
                if libc::connect(fd, (&raw const self.addr).cast(), addr_len) != 0 {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    return Err(e).context("connect 127.0.0.1");
                }
                libc::close(fd);
            }
        }
        Ok(())
    }
}

/// Per workload and round: (detached ns/op, attached ns/op).
struct Overhead {
    /// Wall clock.
    samples: Vec<(Workload, Vec<(f64, f64)>)>,
    /// CPU time spent on the host (see [`CpuSnapshot`]).
    cpu_samples: Vec<(Workload, Vec<(f64, f64)>)>,
    sensor_start_ms: Vec<f64>,
    /// Most keywatch file programs loaded by others at any measurement (0 for a clean run).
    foreign: usize,
    /// Per round: no other sensor was loaded while it ran.
    clean: Vec<bool>,
}

impl Overhead {
    /// The rounds the figures come from: the clean ones when there are at least two.
    fn used(&self) -> Vec<bool> {
        if self.clean.iter().filter(|&&c| c).count() >= 2 {
            self.clean.clone()
        } else {
            vec![true; self.clean.len()]
        }
    }
}

/// How many loaded BPF programs carry `name` (the kernel keeps the first 15 bytes).
fn loaded_programs_named(name: &[u8]) -> usize {
    let name = &name[..name.len().min(15)];
    loaded_programs().iter().filter(|p| p.name.as_bytes() == name).count()
}

/// One loaded kernel program and its run-time statistics (zero unless enabled).
struct LoadedProgram {
    name: String,
    /// `enum bpf_prog_type`.
    kind: u32,
    run_time_ns: u64,
    run_count: u64,
}

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;

fn bpf(cmd: libc::c_long, attr: &mut [u32; 8]) -> libc::c_long {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of the size passed.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 32usize) }
}

/// Every kernel program loaded on the host, by name (truncated to 15 bytes by the kernel).
fn loaded_programs() -> Vec<LoadedProgram> {
    /// `struct bpf_prog_info`: `type` at byte 0, `name[16]` at 64, `run_time_ns` at 192,
    /// `run_cnt` at 200.
    const INFO_NAME: usize = 64;
    const INFO_RUN_TIME: usize = 192;
    const INFO_RUN_COUNT: usize = 200;
    let mut found = Vec::new();
    let mut id = 0u32;
    loop {
        let mut attr = [id, 0, 0, 0, 0, 0, 0, 0];
        if bpf(BPF_PROG_GET_NEXT_ID, &mut attr) != 0 {
            return found;
        }
        id = attr[1];
        let mut attr = [id, 0, 0, 0, 0, 0, 0, 0];
        let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue;
        }
        let mut info = [0u8; 256];
        let ptr = info.as_mut_ptr() as u64;
        let mut attr = [fd as u32, info.len() as u32, ptr as u32, (ptr >> 32) as u32, 0, 0, 0, 0];
        let ok = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) == 0;
        // SAFETY: closing the fd just obtained.
        unsafe { libc::close(fd as i32) };
        if !ok {
            continue;
        }
        let name = &info[INFO_NAME..INFO_NAME + 16];
        let len = name.iter().position(|&b| b == 0).unwrap_or(16);
        let u64_at = |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().expect("8 bytes"));
        found.push(LoadedProgram {
            name: String::from_utf8_lossy(&name[..len]).into_owned(),
            kind: u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes")),
            run_time_ns: u64_at(INFO_RUN_TIME),
            run_count: u64_at(INFO_RUN_COUNT),
        });
    }
}

/// The sensor's own name for a loaded program: the kernel keeps 15 bytes of it, which leaves
/// `sched_process_exec` and `sched_process_exit` alike; their program types tell them apart.
fn full_program_name(p: &LoadedProgram) -> String {
    const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
    const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    let mut candidates = sensor::loader::PROGRAMS.iter().filter(|spec| {
        let kind = match spec.attach {
            sensor::loader::Attach::TracePoint { .. } => BPF_PROG_TYPE_TRACEPOINT,
            sensor::loader::Attach::RawTracePoint { .. } => BPF_PROG_TYPE_RAW_TRACEPOINT,
            sensor::loader::Attach::CgroupSockAddr { .. } => BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        };
        kind == p.kind && spec.name.starts_with(&p.name)
    });
    match (candidates.next(), candidates.next()) {
        (Some(spec), None) => spec.name.to_string(),
        _ => p.name.clone(),
    }
}

/// Sum of run time and runs over the programs named `name`.
fn program_totals(name: &str) -> (u64, u64) {
    loaded_programs()
        .iter()
        .filter(|p| p.name == name)
        .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_count))
}

/// Nanoseconds per run of the file-open program, per open workload, from the kernel's own
/// run-time statistics (enabled only for this pass: they add two clock reads to every run, so
/// the overhead rounds run without them).
fn open_program_cost(
    sensor: &Path,
    bench: &Workspace,
    plan: &Plan,
) -> anyhow::Result<Vec<(Workload, f64)>> {
    progress!("open program: kernel run-time statistics");
    with_program_stats(sensor, bench, |_| {
        let workloads = Workloads { bench, plan, listener: Listener::open()? };
        let mut costs = Vec::new();
        for w in [Workload::OpenUnwatched, Workload::OpenWatched] {
            let (t0, c0) = program_totals("sys_exit_openat");
            workloads.run(w, plan.open_iters)?;
            let (t1, c1) = program_totals("sys_exit_openat");
            costs.push((w, (t1 - t0) as f64 / (c1 - c0).max(1) as f64));
        }
        Ok(costs)
    })
}

/// Runs `f` with a sensor attached and the kernel's run-time statistics on (only for such a
/// pass: they add two clock reads to every program run).
fn with_program_stats<R>(
    sensor: &Path,
    bench: &Workspace,
    f: impl FnOnce(&SensorProcess) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let s = SensorProcess::start(sensor, Some(&bench.config), bench)?;
    let mut attr = [0u32; 8]; // BPF_STATS_RUN_TIME
    let stats_fd = bpf(BPF_ENABLE_STATS, &mut attr);
    if stats_fd < 0 {
        s.stop()?;
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    let result = f(&s);
    // SAFETY: closing the stats fd obtained above turns the statistics off again.
    unsafe { libc::close(stats_fd as i32) };
    s.stop()?;
    result
}

/// What the sensor adds to one operation of `w`, measured directly rather than as a wall-clock
/// ratio: each kernel program's run time (kernel statistics) and the sensor threads' CPU time.
fn op_cost(sensor: &Path, bench: &Workspace, plan: &Plan, w: Workload) -> anyhow::Result<()> {
    let totals = || {
        let mut by_name = std::collections::BTreeMap::<String, (u64, u64)>::new();
        for p in loaded_programs() {
            let entry = by_name.entry(full_program_name(&p)).or_default();
            entry.0 += p.run_time_ns;
            entry.1 += p.run_count;
        }
        by_name
    };
    let workloads = Workloads { bench, plan, listener: Listener::open()? };
    let iters = 10 * plan.iters(w);
    let (before, after, sensor, wall_ns) = with_program_stats(sensor, bench, |s| {
        let sensor_ns = || SensorThreads::take(s.child.id());
        let (before, sensor_before, started) = (totals(), sensor_ns(), Instant::now());
        workloads.run(w, iters)?;
        let (after, sensor_after) = (totals(), sensor_ns());
        let wall_ns = started.elapsed().as_nanos() as f64 / iters as f64;
        let sensor = sensor_after.since(&sensor_before) as f64 / iters as f64;
        Ok((before, after, sensor, wall_ns))
    })?;
    let mut sum = 0.0;
    println!("{}: {iters} operations, sensor attached", w.label());
    println!("  {:<26} {:>10} {:>12}", "program", "runs/op", "ns/op");
    for (name, (t1, c1)) in &after {
        let (t0, c0) = before.get(name).copied().unwrap_or_default();
        if c1 > &c0 {
            let ns = (t1 - t0) as f64 / iters as f64;
            sum += ns;
            println!("  {name:<26} {:>10.2} {ns:>12.1}", (c1 - c0) as f64 / iters as f64);
        }
    }
    println!("  {:<26} {:>10} {sum:>12.1}", "all programs", "");
    println!("  {:<26} {:>10} {sensor:>12.1}", "sensor threads", "");
    println!(
        "  one operation took {wall_ns:.0} ns; programs + sensor threads = {:.2}% of it",
        (sum + sensor) / wall_ns * 100.0
    );
    Ok(())
}

fn overhead_rounds(sensor: &Path, bench: &Workspace, plan: &Plan) -> anyhow::Result<Overhead> {
    let workloads = Workloads { bench, plan, listener: Listener::open()? };
    let mut samples: Vec<(Workload, Vec<(f64, f64)>)> =
        plan.workloads.iter().map(|&w| (w, Vec::new())).collect();
    let mut cpu_samples = samples.clone();
    let mut running: Option<SensorProcess> = None;
    let mut sensor_start_ms = Vec::new();
    let mut foreign = 0;
    let mut clean = Vec::new();
    let mut round = 0;
    // A round during which another sensor was loaded is kept but not used while there are
    // clean ones; up to half as many extra rounds again are run to collect enough clean ones.
    let most = plan.rounds + plan.rounds / 2;
    while clean.iter().filter(|&&c| c).count() < plan.rounds && round < most {
        let mut others_seen = 0;
        // Alternate the order (D A, A D, D A, …): the sensor starts once per two rounds and
        // slow drift on the machine lands on both sides alike.
        let order = if round % 2 == 0 { [false, true] } else { [true, false] };
        let first_on = order[0];
        let mut detached = vec![(0.0, 0.0); plan.workloads.len()];
        let mut attached = vec![(0.0, 0.0); plan.workloads.len()];
        for on in order {
            match (on, running.is_some()) {
                (true, false) => {
                    let s = SensorProcess::start(sensor, Some(&bench.config), bench)?;
                    sensor_start_ms.push(s.start_ms);
                    running = Some(s);
                }
                (false, true) => {
                    running.take().expect("running sensor").stop()?;
                }
                _ => {}
            }
            progress!(
                "round {}/{}: sensor {}",
                round + 1,
                plan.rounds.max(round + 1).min(most),
                if on { "attached" } else { "detached" }
            );
            // Any other sensor loaded on this host (a test, a pinned leftover) taxes both
            // sides and shrinks every ratio: say so rather than print a quiet wrong figure.
            // Checked while detached, when any keywatch file program is someone else's (the
            // sensor itself may hold a second, unattached copy).
            let others = || if on { 0 } else { loaded_programs_named(b"sys_exit_openat") };
            // A stopped sensor's programs are freed a moment after it exits: wait for that.
            let settle = Instant::now() + Duration::from_secs(3);
            while others() > 0 && Instant::now() < settle {
                std::thread::sleep(Duration::from_millis(50));
            }
            others_seen = others_seen.max(others());
            let into = if on { &mut attached } else { &mut detached };
            let sensor_pid = running.as_ref().map(|s| s.child.id());
            // The second half of a round runs the workloads in reverse, so each workload's two
            // measurements sit either side of the sensor's start or stop, as close in time as
            // they can be: this machine's speed drifts within seconds.
            let mut order: Vec<usize> = (0..plan.workloads.len()).collect();
            if on != first_on {
                order.reverse();
            }
            for i in order {
                into[i] = workloads.measure(plan.workloads[i], sensor_pid)?;
            }
            others_seen = others_seen.max(others());
        }
        if others_seen > 0 {
            progress!(
                "round {}: {others_seen} other keywatch sensor(s) loaded meanwhile",
                round + 1
            );
        }
        foreign = foreign.max(others_seen);
        clean.push(others_seen == 0);
        round += 1;
        for (i, (_, per_round)) in samples.iter_mut().enumerate() {
            per_round.push((detached[i].0, attached[i].0));
        }
        for (i, (_, per_round)) in cpu_samples.iter_mut().enumerate() {
            per_round.push((detached[i].1, attached[i].1));
        }
    }
    if let Some(s) = running {
        s.stop()?;
    }
    Ok(Overhead { samples, cpu_samples, sensor_start_ms, foreign, clean })
}

// ---------------------------------------------------------------------------------------------
// Delivery: watched accesses per second with every occurrence accounted for.

/// One step of the sweep.
struct Step {
    /// Paced rate asked for; `None` for unpaced.
    target: Option<u64>,
    /// "distinct" (every access its own event) or "one file" (a single process hammering one
    /// file: folded in the kernel).
    shape: &'static str,
    produced: u64,
    achieved_per_s: f64,
    delivered: u64,
    lost: u64,
    /// Time from the last access until the counts stopped moving.
    drain_ms: f64,
}

impl Step {
    fn verdict(&self) -> &'static str {
        if self.delivered == self.produced {
            "exact"
        } else if self.delivered > self.produced {
            "OVERCOUNT"
        } else if self.delivered + self.lost >= self.produced {
            "counted loss"
        } else {
            "UNCOUNTED LOSS"
        }
    }

    fn accounted(&self) -> bool {
        matches!(self.verdict(), "exact" | "counted loss")
    }
}

fn delivery_sweep(sensor: &Path, bench: &Workspace, plan: &Plan) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    for &rate in &plan.rates {
        progress!(
            "delivery: distinct accesses at {}",
            rate.map_or("full speed".to_string(), |r| format!("{r}/s"))
        );
        steps.push(delivery_step(sensor, bench, rate, plan.step, false)?);
    }
    progress!("delivery: one process hammering one file at full speed");
    steps.push(delivery_step(sensor, bench, None, plan.step, true)?);
    Ok(steps)
}

/// One sensor run: drive, wait until the counts stop moving, stop, compare.
fn delivery_step(
    sensor: &Path,
    bench: &Workspace,
    rate: Option<u64>,
    length: Duration,
    hammer: bool,
) -> anyhow::Result<Step> {
    let s = SensorProcess::start(sensor, Some(&bench.config), bench)?;
    let started = Instant::now();
    let produced = if hammer {
        hammer_one(&bench.burst[0], length)?
    } else {
        drive_distinct(&bench.burst, rate, length)?
    };
    let driven = started.elapsed();
    let done = Instant::now();
    let drain_ms = wait_settled(&s.counts.burst, produced).duration_since(done).as_secs_f64() * 1e3;
    let delivered = s.counts.burst.load(Ordering::Relaxed);
    let lost = s.stop()?;
    Ok(Step {
        target: rate,
        shape: if hammer { "one file" } else { "distinct" },
        produced,
        achieved_per_s: produced as f64 / driven.as_secs_f64(),
        delivered,
        lost,
        drain_ms,
    })
}

/// Waits until `counter` reaches `expected` (then a little longer, to see any overcount) or
/// stops moving for 3 s; returns when it last moved.
fn wait_settled(counter: &AtomicU64, expected: u64) -> Instant {
    let mut last = counter.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        if now >= expected {
            // Fold tails arrive with the sensor's sweep (every 500 ms): wait out one more.
            std::thread::sleep(Duration::from_millis(1200));
            return last_change;
        }
        if last_change.elapsed() > Duration::from_secs(3) {
            return last_change;
        }
    }
}

/// Opens `files` at `rate` per second for `length`, each file once per driver process, one
/// fresh driver process after another: every access is a distinct (process, file) fold key, so
/// each one is its own event. Returns how many opens were made.
fn drive_distinct(files: &[CString], rate: Option<u64>, length: Duration) -> anyhow::Result<u64> {
    let total = match rate {
        Some(r) => (r as f64 * length.as_secs_f64()) as u64,
        // Unpaced: stop after `length`, counted by the drivers in the shared page below.
        None => u64::MAX,
    };
    let counter = SharedCounter::new()?;
    let t0 = Instant::now();
    let mut done = 0u64;
    while done < total && t0.elapsed() < length {
        let n = (total - done).min(files.len() as u64);
        // SAFETY: the child only makes syscalls on memory prepared before the fork, and exits
        // with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            let code = drive_child(files, n as usize, done, rate, t0, length, &counter);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        wait_ok(pid, "driver process")?;
        done += counter.take();
    }
    Ok(done)
}

/// In a forked driver: open `files[..n]` once each, paced so that open number `first + i`
/// happens no earlier than `t0 + (first + i) / rate`; stop early at `t0 + length`.
fn drive_child(
    files: &[CString],
    n: usize,
    first: u64,
    rate: Option<u64>,
    t0: Instant,
    length: Duration,
    counter: &SharedCounter,
) -> i32 {
    let mut opened = 0u64;
    for (i, path) in files[..n].iter().enumerate() {
        if i % 32 == 0 {
            let elapsed = t0.elapsed();
            if elapsed >= length {
                break;
            }
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64((first + i as u64) as f64 / rate as f64);
                // Sleeping overshoots by tens of microseconds: only sleep when well ahead.
                if due > elapsed + Duration::from_micros(200) {
                    std::thread::sleep(due - elapsed);
                }
            }
        }
        // SAFETY: NUL-terminated path prepared before the fork.
        let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            counter.add(opened);
            return 1;
        }
        // SAFETY: fd was just opened.
        unsafe { libc::close(fd) };
        opened += 1;
    }
    counter.add(opened);
    0
}

/// A single driver process opening one watched file as fast as it can: folded in the kernel.
fn hammer_one(file: &CString, length: Duration) -> anyhow::Result<u64> {
    let counter = SharedCounter::new()?;
    // SAFETY: as in `drive_distinct`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        let t0 = Instant::now();
        let mut opened = 0u64;
        let mut code = 0;
        while t0.elapsed() < length {
            for _ in 0..256 {
                // SAFETY: NUL-terminated path prepared before the fork.
                let fd = unsafe { libc::openat(libc::AT_FDCWD, file.as_ptr(), libc::O_RDONLY) };
                if fd < 0 {
                    code = 1;
                    break;
                }
                // SAFETY: fd was just opened.
                unsafe { libc::close(fd) };
                opened += 1;
            }
        }
        counter.add(opened);
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    wait_ok(pid, "hammer process")?;
    Ok(counter.take())
}

/// A counter in a shared anonymous page, written by forked drivers, read by this process.
struct SharedCounter {
    page: *mut AtomicU64,
}

impl SharedCounter {
    fn new() -> anyhow::Result<Self> {
        // SAFETY: a fresh anonymous shared mapping, zero-filled, one page.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        Ok(Self { page: page.cast() })
    }

    fn add(&self, n: u64) {
        // SAFETY: the page lives as long as `self` and holds an aligned u64.
        unsafe { (*self.page).fetch_add(n, Ordering::SeqCst) };
    }

    fn take(&self) -> u64 {
        // SAFETY: as in `add`.
        unsafe { (*self.page).swap(0, Ordering::SeqCst) }
    }
}

impl Drop for SharedCounter {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in `new`.
        unsafe { libc::munmap(self.page.cast(), 4096) };
    }
}

// ---------------------------------------------------------------------------------------------
// Resources: RSS and CPU of the sensor process.

struct Usage {
    state: &'static str,
    seconds: f64,
    rss_kib: u64,
    hwm_kib: u64,
    cpu_percent: f64,
    /// For the loaded state: accesses made and delivered.
    accesses: Option<(u64, u64)>,
}

fn resources(sensor: &Path, bench: &Workspace, plan: &Plan) -> anyhow::Result<Vec<Usage>> {
    progress!("resources: idle, built-in catalog");
    let idle = {
        let s = SensorProcess::start(sensor, None, bench)?;
        std::thread::sleep(Duration::from_millis(500));
        let before = cpu_ticks(s.pid())?;
        let t = Instant::now();
        std::thread::sleep(plan.idle);
        let usage = usage_since(s.pid(), "idle", before, t)?;
        s.stop()?;
        usage
    };
    progress!("resources: 10,000 watched accesses/s");
    let loaded = {
        let s = SensorProcess::start(sensor, Some(&bench.config), bench)?;
        let before = cpu_ticks(s.pid())?;
        let t = Instant::now();
        let produced = drive_distinct(&bench.burst, Some(10_000), plan.load)?;
        let mut usage = usage_since(s.pid(), "10k accesses/s", before, t)?;
        wait_settled(&s.counts.burst, produced);
        usage.accesses = Some((produced, s.counts.burst.load(Ordering::Relaxed)));
        s.stop()?;
        usage
    };
    Ok(vec![idle, loaded])
}

fn usage_since(pid: u32, state: &'static str, before: u64, t: Instant) -> anyhow::Result<Usage> {
    let ticks = cpu_ticks(pid)? - before;
    let seconds = t.elapsed().as_secs_f64();
    // SAFETY: no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Usage {
        state,
        seconds,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        cpu_percent: ticks as f64 / hz / seconds * 100.0,
        accesses: None,
    })
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let mut stat = String::new();
    std::fs::File::open(format!("/proc/{pid}/stat"))?.read_to_string(&mut stat)?;
    // Fields after the parenthesised comm: state is the first, utime the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').context("malformed /proc/PID/stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short /proc/PID/stat")?.parse::<u64>()?)
    };
    Ok(field(11)? + field(12)?)
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report {
    overhead: Overhead,
    /// Nanoseconds per run of the file-open program, per open workload.
    open_program: Vec<(Workload, f64)>,
    delivery: Vec<Step>,
    resources: Vec<Usage>,
    seconds: f64,
}

/// Median and range of a sample.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    (median, v[0], v[n - 1])
}

/// A 95 % confidence interval for the median of `v`, free of any assumption about how the
/// values are distributed (this machine's noise is not normal: it comes in slow spells): the
/// order statistics `k` from either end, `k` from the binomial(n, ½) distribution of how many
/// values fall below the true median. `None` under six values, where no such interval exists.
fn median_ci95(mut v: Vec<f64>) -> Option<(f64, f64)> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let k = ((n as f64 - 1.96 * (n as f64).sqrt()) / 2.0).floor() as usize;
    (k >= 1).then(|| (v[k - 1], v[n - k]))
}

/// Whether a workload's ratio meets its target given the interval around its median: "ok"
/// when the whole interval is at or under it, "MISS" when the whole interval is over it, and
/// "noise" when this run cannot tell (more rounds narrow the interval).
fn verdict(median: f64, ci: Option<(f64, f64)>, target: f64) -> &'static str {
    match ci {
        Some((_, hi)) if hi <= target => "ok",
        Some((lo, _)) if lo > target => "MISS",
        Some(_) => "noise",
        None => mark(median <= target),
    }
}

/// Delivery target: watched accesses per second, delivered or folded, none unaccounted.
const DELIVERY_TARGET: f64 = 200_000.0;
/// Idle RSS target, MiB.
const IDLE_RSS_TARGET_MIB: f64 = 40.0;

fn mark(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

impl Report {
    fn ratios(&self, per_round: &[(f64, f64)]) -> ((f64, f64, f64), f64, f64) {
        let rounds = self.used_rounds(per_round);
        let ratios = stats(rounds.iter().map(|(d, a)| a / d).collect());
        let detached = stats(rounds.iter().map(|(d, _)| *d).collect()).0;
        let attached = stats(rounds.iter().map(|(_, a)| *a).collect()).0;
        (ratios, detached, attached)
    }

    /// 95 % interval of the median attached/detached ratio (see [`median_ci95`]).
    fn ratio_ci95(&self, per_round: &[(f64, f64)]) -> Option<(f64, f64)> {
        median_ci95(self.used_rounds(per_round).iter().map(|(d, a)| a / d).collect())
    }

    /// The rounds the figures come from (see [`Overhead::used`]).
    fn used_rounds(&self, per_round: &[(f64, f64)]) -> Vec<(f64, f64)> {
        let used = self.overhead.used();
        per_round.iter().zip(&used).filter(|(_, u)| **u).map(|(r, _)| *r).collect()
    }

    /// Highest achieved rate of a step with every access accounted for, per shape.
    fn best(&self, shape: &str) -> Option<f64> {
        self.delivery
            .iter()
            .filter(|s| s.shape == shape && s.accounted())
            .map(|s| s.achieved_per_s)
            .max_by(f64::total_cmp)
    }

    /// Highest achieved rate of a distinct-events step delivered in full (nothing lost).
    fn best_exact(&self) -> Option<f64> {
        self.delivery
            .iter()
            .filter(|s| s.shape == "distinct" && s.verdict() == "exact")
            .map(|s| s.achieved_per_s)
            .max_by(f64::total_cmp)
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "keywatch-sensor overhead: {} alternating rounds (detached/attached order flips each \
             round); ratio = attached / detached, median over rounds, its 95% interval and the \
             spread [min-max]",
            self.overhead.clean.len()
        ));
        line(format!(
            "{:<34} {:>12} {:>12} {:>8} {:>15} {:>15} {:>8}       {:>9} {:>15}",
            "workload",
            "detached ns",
            "attached ns",
            "ratio",
            "95% interval",
            "spread",
            "target",
            "CPU ratio",
            "CPU spread"
        ));
        for ((w, per_round), (_, cpu)) in
            self.overhead.samples.iter().zip(&self.overhead.cpu_samples)
        {
            let ((median, lo, hi), d, a) = self.ratios(per_round);
            let ((cpu_median, cpu_lo, cpu_hi), _, _) = self.ratios(cpu);
            let ci = self.ratio_ci95(per_round);
            line(format!(
                "{:<34} {:>12.0} {:>12.0} {:>7.3}x {:>15} {:>15} {:>7} {:<5} {:>8.3}x {:>15}",
                w.label(),
                d,
                a,
                median,
                ci.map_or("-".to_string(), |(l, h)| format!("{l:.3}-{h:.3}x")),
                format!("{lo:.3}-{hi:.3}x"),
                format!("<={:.2}x", w.target()),
                verdict(median, ci, w.target()),
                cpu_median,
                format!("{cpu_lo:.3}-{cpu_hi:.3}x"),
            ));
        }
        line(
            "ratio: wall clock per operation; CPU ratio: CPU time spent on the host per operation \
             (this process, its children and the sensor's threads); target verdict on the 95% \
             interval: ok (all of it under), MISS (all over), noise (cannot tell; add --rounds)"
                .to_string(),
        );
        let used = self.overhead.used().iter().filter(|&&u| u).count();
        let clean = self.overhead.clean.iter().filter(|&&c| c).count();
        if clean < self.overhead.clean.len() {
            line(format!(
                "{} of {} rounds had another keywatch sensor loaded (up to {}); figures from {used} \
                 round(s){}",
                self.overhead.clean.len() - clean,
                self.overhead.clean.len(),
                self.overhead.foreign,
                if clean >= 2 {
                    " without one"
                } else {
                    ": WARNING, another sensor taxed both sides and the ratios understate the cost"
                }
            ));
        }
        if !self.open_program.is_empty() {
            line(format!(
                "file-open program alone (kernel run-time statistics, separate pass): {}",
                self.open_program
                    .iter()
                    .map(|(w, ns)| format!("{ns:.0} ns/run on {}", w.label()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !self.delivery.is_empty() {
            line(String::new());
            line(format!(
                "watched-access delivery: distinct = fresh driver processes each opening {BURST_FILES} \
                 watched files once (every access its own event); one file = one process, one file \
                 (folded in the kernel)"
            ));
            line(format!(
                "{:<9} {:>10} {:>12} {:>10} {:>10} {:>8} {:>9}  {}",
                "shape",
                "asked/s",
                "achieved/s",
                "produced",
                "delivered",
                "lost",
                "drain ms",
                "result"
            ));
            for s in &self.delivery {
                line(format!(
                    "{:<9} {:>10} {:>12.0} {:>10} {:>10} {:>8} {:>9.0}  {}",
                    s.shape,
                    s.target.map_or("max".to_string(), |r| r.to_string()),
                    s.achieved_per_s,
                    s.produced,
                    s.delivered,
                    s.lost,
                    s.drain_ms,
                    s.verdict()
                ));
            }
            let distinct = self.best("distinct").unwrap_or(0.0);
            let folded = self.best("one file").unwrap_or(0.0);
            line(format!(
                "highest rate with zero uncounted loss: {distinct:.0}/s distinct events, \
                 {folded:.0}/s one file folded (target >= {DELIVERY_TARGET:.0}/s delivered or folded) {}",
                mark(distinct.max(folded) >= DELIVERY_TARGET)
            ));
            line(format!(
                "highest distinct rate delivered in full (no record lost): {:.0}/s",
                self.best_exact().unwrap_or(0.0)
            ));
        }
        if !self.resources.is_empty() {
            line(String::new());
            line("keywatch-sensor resources (VmRSS at the end; CPU = utime+stime over the interval, % of one CPU)".to_string());
            line(format!(
                "{:<16} {:>8} {:>9} {:>9} {:>7}  {}",
                "state", "seconds", "RSS MiB", "peak MiB", "CPU %", "note"
            ));
            for u in &self.resources {
                let rss = u.rss_kib as f64 / 1024.0;
                let note = match (u.state, u.accesses) {
                    ("idle", _) => format!(
                        "target RSS <= {IDLE_RSS_TARGET_MIB:.0} MiB {}",
                        mark(rss <= IDLE_RSS_TARGET_MIB)
                    ),
                    (_, Some((made, delivered))) => {
                        format!("{made} accesses, {delivered} delivered")
                    }
                    _ => String::new(),
                };
                line(format!(
                    "{:<16} {:>8.1} {:>9.1} {:>9.1} {:>7.1}  {note}",
                    u.state,
                    u.seconds,
                    rss,
                    u.hwm_kib as f64 / 1024.0,
                    u.cpu_percent
                ));
            }
        }
        line(String::new());
        let starts = &self.overhead.sensor_start_ms;
        line(format!(
            "sensor start to attached: median {:.0} ms over {} starts; total bench time {:.0} s",
            stats(starts.clone()).0,
            starts.len(),
            self.seconds
        ));
        out
    }

    fn json(&self) -> Value {
        let overhead: Vec<Value> = self
            .overhead
            .samples
            .iter()
            .zip(&self.overhead.cpu_samples)
            .map(|((w, per_round), (_, cpu))| {
                let ((median, lo, hi), d, a) = self.ratios(per_round);
                let ((cpu_median, _, _), cpu_d, cpu_a) = self.ratios(cpu);
                json!({
                    "workload": w.key(),
                    "detached_ns_per_op": d,
                    "attached_ns_per_op": a,
                    "ratio_median": median,
                    "ratio_ci95": self.ratio_ci95(per_round).map(|(l, h)| [l, h]),
                    "verdict": verdict(median, self.ratio_ci95(per_round), w.target()),
                    "ratio_min": lo,
                    "ratio_max": hi,
                    "cpu_ratio_median": cpu_median,
                    "detached_cpu_ns_per_op": cpu_d,
                    "attached_cpu_ns_per_op": cpu_a,
                    "target_max_ratio": w.target(),
                    "meets_target": median <= w.target(),
                    "rounds": per_round.iter().zip(&self.overhead.clean).map(|((d, a), clean)| json!({"detached_ns": d, "attached_ns": a, "no_other_sensor": clean})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let delivery: Vec<Value> = self
            .delivery
            .iter()
            .map(|s| {
                json!({
                    "shape": s.shape,
                    "asked_per_s": s.target,
                    "achieved_per_s": s.achieved_per_s,
                    "produced": s.produced,
                    "delivered": s.delivered,
                    "lost_file_opens": s.lost,
                    "drain_ms": s.drain_ms,
                    "result": s.verdict(),
                })
            })
            .collect();
        let resources: Vec<Value> = self
            .resources
            .iter()
            .map(|u| {
                json!({
                    "state": u.state,
                    "seconds": u.seconds,
                    "rss_kib": u.rss_kib,
                    "peak_rss_kib": u.hwm_kib,
                    "cpu_percent": u.cpu_percent,
                    "accesses": u.accesses.map(|(m, _)| m),
                    "delivered": u.accesses.map(|(_, d)| d),
                })
            })
            .collect();
        let distinct = self.best("distinct").unwrap_or(0.0);
        let folded = self.best("one file").unwrap_or(0.0);
        json!({
            "rounds": self.overhead.clean.len(),
            "rounds_used": self.overhead.used().iter().filter(|&&u| u).count(),
            "overhead": overhead,
            "open_program_ns_per_run": self.open_program.iter().map(|(w, ns)| (w.key().to_string(), json!(ns))).collect::<serde_json::Map<_, _>>(),
            "other_sensors_loaded": self.overhead.foreign,
            "delivery": {
                "steps": delivery,
                "best_distinct_per_s": distinct,
                "best_one_file_per_s": folded,
                "best_distinct_in_full_per_s": self.best_exact().unwrap_or(0.0),
                "target_per_s": DELIVERY_TARGET,
                "meets_target": distinct.max(folded) >= DELIVERY_TARGET,
            },
            "resources": resources,
            "idle_rss_target_mib": IDLE_RSS_TARGET_MIB,
            "sensor_start_ms": self.overhead.sensor_start_ms,
            "seconds": self.seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lost_records_with_or_without_colours() {
        let plain = "2026-01-01T00:00:00Z  INFO sensor::run: sensor stopped lost_records=42";
        let coloured = "\u{1b}[32m INFO\u{1b}[0m sensor stopped \u{1b}[3mlost_records\u{1b}[0m\u{1b}[2m=\u{1b}[0m7";
        assert_eq!(field_u64(plain, "lost_records="), Some(42));
        assert_eq!(field_u64(coloured, "lost_records="), Some(7));
        assert_eq!(field_u64("sensor stopped", "lost_records="), None);
        let stopped = "INFO sensor::run: sensor stopped lost_records=9 lost_by_kind=exec=2 file_open=7 \
                       recovered_by_sweep=3";
        assert_eq!(lost_file_opens(stopped), 4);
        let none = "sensor stopped lost_records=2 lost_by_kind=exec=2 recovered_by_sweep=0";
        assert_eq!(lost_file_opens(none), 0);
    }

    #[test]
    fn counts_file_opens_by_path_weighted_by_count() {
        let lines = concat!(
            r#"{"time_ns":1,"count":3,"process":{"pid":1,"ancestors":[]},"kind":"file_open","watch":"bench-burst","path":"/b/burst/k00001"}"#,
            "\n",
            r#"{"time_ns":2,"count":1,"process":{"pid":1},"kind":"file_open","watch":"bench-token","path":"/b/watched/token"}"#,
            "\n",
            r#"{"time_ns":3,"count":5,"process":{"pid":1},"kind":"exec","filename":"/b/burst/k00001"}"#,
            "\n",
            r#"{"time_ns":4,"count":2,"process":{"pid":1},"kind":"file_open","watch":"x","path":"/b/watched/token2"}"#,
            "\n",
        );
        let counts = Counts::default();
        count_observations(lines.as_bytes(), &counts, b"/b/watched/token", b"/b/burst/");
        assert_eq!(counts.burst.load(Ordering::Relaxed), 3);
        assert_eq!(counts.watched.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn median_interval_uses_the_binomial_order_statistics() {
        // n = 16: k = floor((16 - 1.96 * 4) / 2) = 4, so the 4th smallest and the 4th largest.
        let v: Vec<f64> = (1..=16).rev().map(f64::from).collect();
        assert_eq!(median_ci95(v), Some((4.0, 13.0)));
        assert_eq!(median_ci95(vec![1.0, 2.0, 3.0, 4.0, 5.0]), None);
    }

    #[test]
    fn verdict_needs_the_whole_interval_on_one_side() {
        assert_eq!(verdict(1.01, Some((1.00, 1.019)), 1.02), "ok");
        assert_eq!(verdict(1.01, Some((1.00, 1.03)), 1.02), "noise");
        assert_eq!(verdict(1.05, Some((1.021, 1.08)), 1.02), "MISS");
        assert_eq!(verdict(1.01, None, 1.02), "ok");
    }
}
