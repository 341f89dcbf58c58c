//! Test, run and build tasks.

use std::process::Command;

use crate::setup::{self, sh};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Everything CI checks: setup, formatting, lints, all tests.
pub fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    sh(cargo().args(["fmt", "--all", "--", "--check"]))?;
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    sh(cargo()
        .args(["test", "--workspace", "--no-fail-fast"])
        .arg("--")
        .args(extra))?;
    println!("xtask test: all checks passed");
    Ok(())
}

pub fn build() -> anyhow::Result<()> {
    setup::run()?;
    sh(cargo().args([
        "build",
        "--release",
        "--bin",
        "keywatch-sensor",
        "--bin",
        "keywatch",
    ]))
}

pub fn run() -> anyhow::Result<()> {
    build()?;
    println!("keywatch-sensor: watching this host; events follow as JSON lines (Ctrl-C stops)");
    sh(Command::new("target/release/keywatch-sensor").args(["run", "--stdout"]))
}
