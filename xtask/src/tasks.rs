//! Test, run and build tasks.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::bail;

use crate::setup::{self, sh};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Everything CI checks: setup, formatting, lints, all tests.
pub fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    setup::test_tools()?;
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        // A one-off build gains nothing from incremental state, which costs gigabytes of disk.
        // SAFETY: single-threaded here; the variable is read only by the cargo children.
        unsafe { std::env::set_var("CARGO_INCREMENTAL", "0") };
    }
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // `--locked`: what CI builds is exactly the committed lock file; a dependency change
    // without its lock file update fails here instead of resolving something else.
    sh(cargo().args([
        "clippy",
        "--locked",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel programs, linted for the target they run on.
    sh(Command::new("rustup")
        .args(["run", "nightly", "cargo", "clippy", "--locked", "-p", "sensor-ebpf", "--bins"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"]))?;
    let summary = cargo_test(
        cargo().args(["test", "--locked", "--workspace", "--no-fail-fast"]).arg("--").args(extra),
    )?;
    println!(
        "summary: {} passed, {} failed, {} skipped",
        summary.passed, summary.failed, summary.ignored
    );
    if summary.failed > 0 || !summary.success {
        bail!("tests failed");
    }
    Ok(())
}

/// Totals over every `test result:` line of a cargo test run.
#[derive(Debug, Default)]
struct TestSummary {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

/// Runs cargo test, passing its output through, and adds up the results of every test binary.
fn cargo_test(cmd: &mut Command) -> anyhow::Result<TestSummary> {
    println!("+ cargo test --workspace");
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut summary = TestSummary::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            add_result_line(&mut summary, rest);
        }
    }
    summary.success = child.wait()?.success();
    Ok(summary)
}

/// Adds "ok. 3 passed; 0 failed; 1 ignored; …" to the totals.
fn add_result_line(summary: &mut TestSummary, rest: &str) {
    for part in rest.split(['.', ';']) {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => summary.passed += n,
            "failed" => summary.failed += n,
            "ignored" => summary.ignored += n,
            _ => {}
        }
    }
}

pub fn build() -> anyhow::Result<()> {
    setup::run()?;
    sh(cargo().args(["build", "--release", "--bin", "keywatch-sensor", "--bin", "keywatch"]))
}

/// The demo (collector, enrolled sensor, example declarations, alerts), or with `standalone`
/// the sensor alone printing observations.
pub fn run(standalone: bool, reset: bool) -> anyhow::Result<()> {
    build()?;
    if !standalone {
        return crate::demo::run(reset);
    }
    println!("keywatch-sensor: watching this host; events follow as JSON lines (Ctrl-C stops)");
    sh(Command::new("target/release/keywatch-sensor").args(["run", "--stdout"]))
}
