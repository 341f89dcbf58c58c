//! Installs the eBPF toolchain: nightly with rust-src, Debian's LLVM 22 development files and
//! bpf-linker 0.13 built against them. Every step checks first and says what it does.

use std::process::Command;

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "zlib1g-dev", "libzstd-dev"];

pub fn run() -> anyhow::Result<()> {
    disk_space();
    nightly_rust_src()?;
    bpf_linker()?;
    println!("setup: complete");
    Ok(())
}

/// Runs `cmd`, echoing it, and fails naming it.
pub fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    println!("+ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn nightly_rust_src() -> anyhow::Result<()> {
    which::which("rustup").context(
        "rustup not found: the kernel programs need a nightly toolchain managed by rustup",
    )?;
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => {
            println!("setup: nightly with rust-src: present");
            Ok(())
        }
        Some(_) => {
            println!("setup: installing rust-src for nightly");
            sh(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        }
        None => {
            println!("setup: installing the nightly toolchain with rust-src");
            sh(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }
    }
}

fn bpf_linker() -> anyhow::Result<()> {
    let current = output(Command::new("bpf-linker").arg("--version"));
    if current.as_deref().is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    llvm_dev()?;
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (several minutes)");
    let path = format!("/usr/lib/llvm-22/bin:{}", std::env::var("PATH").unwrap_or_default());
    sh(Command::new("cargo")
        .env("PATH", path)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked"])
        .args(["--no-default-features", "--features", "llvm-22", "--force"]))
}

fn llvm_dev() -> anyhow::Result<()> {
    debian_packages("LLVM 22 development files", LLVM_PACKAGES)
}

/// What the privileged tests use besides the kernel: `mkfs.btrfs`, to test credentials on a
/// btrfs file system (made in a file, mounted through a loop device). Required under CI;
/// elsewhere a test that needs a missing tool skips, saying why.
pub fn test_tools() -> anyhow::Result<()> {
    match debian_packages("test tools (mkfs.btrfs)", &["btrfs-progs"]) {
        Err(e) if std::env::var_os("CI").is_none() => {
            println!("setup: WARNING {e:#}; the tests that need them will skip");
            Ok(())
        }
        done => done,
    }
}

/// Installs the Debian `packages` not installed yet (`purpose` says what they are for).
fn debian_packages(purpose: &str, packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("setup: {purpose}: present");
        return Ok(());
    }
    if which::which("apt-get").is_err() {
        bail!(
            "missing {}: install the {purpose} with your package manager (this setup knows \
             Debian's apt-get)",
            missing.join(" ")
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing {}: run as root (apt-get install needs it)", missing.join(" "));
    }
    println!("setup: installing {}", missing.join(" "));
    sh(Command::new("apt-get").arg("update").arg("-q"))?;
    sh(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}

/// What a clean build and test run takes in `target/` (measured: about 3 GiB), plus headroom.
const DISK_NEEDED_GIB: u64 = 4;

/// Says how much disk the build has left, loudly when it is short: a full disk otherwise shows up
/// as a linker crash halfway through the build.
fn disk_space() {
    let Some(free) = free_bytes(".") else { return };
    let gib = free / (1 << 30);
    if gib < DISK_NEEDED_GIB {
        println!(
            "setup: WARNING only {gib} GiB free here; a clean build and test run needs about \
             {DISK_NEEDED_GIB} GiB (free space or run `cargo clean`)"
        );
    } else {
        println!("setup: {gib} GiB free for the build");
    }
}

fn free_bytes(path: &str) -> Option<u64> {
    let path = std::ffi::CString::new(path).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `st` is written by statvfs before it is read.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}
