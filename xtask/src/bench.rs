//! Benchmarks: `cargo xtask bench sensor` (what the sensor costs the host it watches) and
//! `cargo xtask bench spool` (the spool's append path), `cargo xtask bench uplink` (sensor →
//! collector throughput and ack latency against a bare tonic stream).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

use crate::setup::{self, sh};

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs the benchmark named `what`, passing `args` to it.
pub fn bench(what: &str, args: &[String]) -> anyhow::Result<()> {
    let root = workspace_root();
    match what {
        "sensor" => sensor(&root, args),
        "spool" => sh(cargo()
            .current_dir(&root)
            .args(["bench", "-p", "sensor", "--bench", "spool"])
            .args(args)),
        "uplink" => uplink(&root, args),
        other => bail!("unknown benchmark {other:?}: expected `sensor`, `spool` or `uplink`"),
    }
}

/// Builds the release sensor and the bench driver, then runs the driver against the sensor.
/// With `--json`, everything but the report goes to stderr so stdout stays machine-readable.
fn sensor(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let json = args.iter().any(|a| a == "--json");
    let build = || -> anyhow::Result<()> {
        setup::run()?;
        sh(cargo().current_dir(root).args([
            "build",
            "--release",
            "-p",
            "sensor",
            "--bin",
            "keywatch-sensor",
            "-p",
            "keywatch-tests",
            "--bin",
            "kw-bench",
        ]))
    };
    if json {
        with_stdout_on_stderr(build)??;
    } else {
        build()?;
    }
    let bin = root.join("target/release");
    let status = Command::new(bin.join("kw-bench"))
        .current_dir(root)
        .arg("--sensor")
        .arg(bin.join("keywatch-sensor"))
        .args(args)
        .status()?;
    if !status.success() {
        bail!("kw-bench failed ({status})");
    }
    Ok(())
}

/// The sensor → collector uplink: release collector and bench driver, then the driver (it starts
/// the collector itself, over loopback with mTLS).
fn uplink(root: &Path, args: &[String]) -> anyhow::Result<()> {
    sh(cargo().current_dir(root).args([
        "build",
        "--release",
        "-p",
        "collector",
        "--bin",
        "keywatch",
        "-p",
        "keywatch-tests",
        "--bin",
        "kw-uplink-bench",
    ]))?;
    let bin = root.join("target/release");
    let status = Command::new(bin.join("kw-uplink-bench"))
        .current_dir(root)
        .arg("--collector-bin")
        .arg(bin.join("keywatch"))
        .args(args)
        .status()?;
    if !status.success() {
        bail!("kw-uplink-bench failed ({status})");
    }
    Ok(())
}

/// Runs `f` with this process's stdout (fd 1) pointing at stderr.
fn with_stdout_on_stderr<T>(f: impl FnOnce() -> T) -> anyhow::Result<T> {
    use std::io::Write as _;
    std::io::stdout().flush()?;
    // SAFETY: duplicating and restoring this process's own standard descriptors.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(2, 1) } < 0 {
        bail!("redirecting stdout: {}", std::io::Error::last_os_error());
    }
    let out = f();
    std::io::stdout().flush()?;
    // SAFETY: as above; `saved` is ours to close.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    Ok(out)
}
