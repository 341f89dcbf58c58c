//! Quick alternation (`--interleave`): one sensor, its programs detached and attached again in
//! place between measurements instead of the sensor being started and stopped. A pair of
//! measurements then sits milliseconds apart, so this machine's slow spells (seconds long)
//! fall on both sides of a pair alike, and hundreds of pairs fit in minutes.
//!
//! The sensor runs in this process; the timed loops run in a small worker process forked
//! before it starts, so the sensor's memory does not make each fork of the loop dearer (a
//! fork copies its parent's page tables).

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::fd::FromRawFd as _,
    time::Duration,
};

use anyhow::{Context as _, bail};
use sensor::run::{Agent, AgentOptions};

use super::{
    Listener, Plan, Workload, Workloads, Workspace, loaded_programs_named, median_ci95, stats,
    verdict,
};

/// Operations per timed block: a few hundred milliseconds each.
fn block_iters(w: Workload) -> u64 {
    match w {
        Workload::OpenUnwatched | Workload::OpenWatched => 40_000,
        Workload::Getppid => 300_000,
        Workload::ForkExec => 250,
        Workload::Connect => 10_000,
    }
}

/// The timed loops' process: told a workload and a count, it answers nanoseconds per op.
struct Worker {
    pid: libc::pid_t,
    /// Closed first on drop: the worker stops at the end of its input.
    to: Option<File>,
    from: File,
}

impl Worker {
    /// Forks the worker; call before any thread of this process exists.
    fn spawn(bench: &Workspace, plan: &Plan) -> anyhow::Result<Self> {
        let (mut down, mut up) = ([0; 2], [0; 2]);
        // SAFETY: pipe fills two fds each; fork in a process that has no other thread yet.
        let pid = unsafe {
            if libc::pipe(down.as_mut_ptr()) != 0 || libc::pipe(up.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error()).context("pipe");
            }
            libc::fork()
        };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            // SAFETY: the ends this side uses, owned from here on; the parent's closed, or the
            // input would never end.
            let (from, to) = unsafe {
                libc::close(down[1]);
                libc::close(up[0]);
                (File::from_raw_fd(down[0]), File::from_raw_fd(up[1]))
            };
            let code = match serve(bench, plan, from, to) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("kw-bench worker: {e:#}");
                    1
                }
            };
            // SAFETY: leaving without running the parent's destructors (its workspace).
            unsafe { libc::_exit(code) };
        }
        // SAFETY: the parent's ends, owned from here on; the child's ends closed.
        unsafe {
            libc::close(down[0]);
            libc::close(up[1]);
            Ok(Self { pid, to: Some(File::from_raw_fd(down[1])), from: File::from_raw_fd(up[0]) })
        }
    }

    fn measure(&mut self, w: Workload) -> anyhow::Result<f64> {
        let index = Workload::ALL.iter().position(|&k| k == w).expect("a known workload");
        self.to.as_mut().expect("the worker's input").write_all(&[index as u8])?;
        let mut answer = [0u8; 8];
        self.from.read_exact(&mut answer).context("the worker stopped")?;
        match f64::from_le_bytes(answer) {
            ns if ns.is_nan() => bail!("the worker's {} loop failed", w.key()),
            ns => Ok(ns),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.to.take());
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The worker's loop: one byte (a workload) in, wall-clock nanoseconds per operation of its
/// block out (NaN when the loop failed).
fn serve(bench: &Workspace, plan: &Plan, mut from: File, mut to: File) -> anyhow::Result<()> {
    let workloads = Workloads { bench, plan, listener: Listener::open()? };
    let mut asked = [0u8; 1];
    while from.read_exact(&mut asked).is_ok() {
        let w = Workload::ALL[asked[0] as usize];
        let ns = workloads.measure_n(w, block_iters(w), None).map_or(f64::NAN, |(wall, _)| wall);
        to.write_all(&ns.to_le_bytes())?;
    }
    Ok(())
}

/// Per workload: (detached, attached) nanoseconds per operation of each pair.
pub(crate) type Pairs = Vec<(Workload, Vec<(f64, f64)>)>;

/// `pairs` pairs of blocks per workload, the programs detached for one and attached for the
/// other, in alternating order.
pub(crate) fn interleaved(bench: &Workspace, plan: &Plan, pairs: usize) -> anyhow::Result<Pairs> {
    let mut worker = Worker::spawn(bench, plan)?;
    if loaded_programs_named(b"sys_exit_openat") > 0 {
        bail!("another keywatch sensor is loaded: it would tax both sides (stop it first)");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let watches = sensor::watch::load_config(&bench.config)?
        .watch_set()
        .map_err(|problems| anyhow::anyhow!("bench watch config: {problems:?}"))?;
    progress!("starting the sensor in this process");
    let mut agent = runtime.block_on(Agent::start(&AgentOptions::new(watches)))?;
    let mut observations = agent.take_observations();
    runtime.spawn(async move { while observations.recv().await.is_some() {} });
    let mut samples: Pairs = plan.workloads.iter().map(|&w| (w, Vec::new())).collect();
    for pair in 0..pairs {
        if pair % 10 == 0 {
            progress!("pair {}/{pairs}", pair + 1);
        }
        let order = if pair % 2 == 0 { [false, true] } else { [true, false] };
        let mut times = vec![[0.0; 2]; samples.len()];
        for (half, on) in order.into_iter().enumerate() {
            agent.set_attached(on)?;
            // Detaching frees the programs' tracepoint state a moment later.
            std::thread::sleep(Duration::from_millis(20));
            // The second half in reverse: each workload's two blocks sit side by side.
            let mut indices: Vec<usize> = (0..samples.len()).collect();
            if half == 1 {
                indices.reverse();
            }
            for i in indices {
                times[i][usize::from(on)] = worker.measure(samples[i].0)?;
            }
        }
        for (i, (_, per_pair)) in samples.iter_mut().enumerate() {
            per_pair.push((times[i][0], times[i][1]));
        }
    }
    agent.set_attached(true)?;
    drop(worker);
    Ok(samples)
}

/// One workload's figures over its pairs.
struct Summary {
    detached: f64,
    attached: f64,
    ratio: f64,
    ci: Option<(f64, f64)>,
}

fn summary(pairs: &[(f64, f64)]) -> Summary {
    let ratios: Vec<f64> = pairs.iter().map(|(d, a)| a / d).collect();
    Summary {
        detached: stats(pairs.iter().map(|p| p.0).collect()).0,
        attached: stats(pairs.iter().map(|p| p.1).collect()).0,
        ratio: stats(ratios.clone()).0,
        ci: median_ci95(ratios),
    }
}

/// The table of an interleaved run.
pub(crate) fn table(samples: &Pairs) -> String {
    let mut out = format!(
        "{:<34} {:>5} {:>12} {:>12} {:>7} {:>15} {:>7}  verdict\n",
        "workload", "pairs", "detached ns", "attached ns", "ratio", "95% interval", "target"
    );
    for (w, pairs) in samples {
        let s = summary(pairs);
        let interval = s.ci.map_or("-".to_owned(), |(lo, hi)| format!("{lo:.3}–{hi:.3}"));
        out.push_str(&format!(
            "{:<34} {:>5} {:>12.0} {:>12.0} {:>6.3}× {interval:>15} {:>6.2}×  {}\n",
            w.label(),
            pairs.len(),
            s.detached,
            s.attached,
            s.ratio,
            w.target(),
            verdict(s.ratio, s.ci, w.target()),
        ));
    }
    out
}

/// The same as JSON.
pub(crate) fn json(samples: &Pairs) -> serde_json::Value {
    let rows: Vec<_> = samples
        .iter()
        .map(|(w, pairs)| {
            let s = summary(pairs);
            serde_json::json!({
                "workload": w.key(),
                "pairs": pairs.len(),
                "detached_ns": s.detached,
                "attached_ns": s.attached,
                "ratio": s.ratio,
                "ci95": s.ci.map(|(lo, hi)| [lo, hi]),
                "target": w.target(),
                "verdict": verdict(s.ratio, s.ci, w.target()),
            })
        })
        .collect();
    serde_json::json!({ "interleaved": rows })
}
