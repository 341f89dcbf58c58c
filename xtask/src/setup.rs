//! Installs the eBPF toolchain: nightly with rust-src, Debian's LLVM 22 development files and
//! bpf-linker 0.13 built against them. Every step checks first and says what it does.

use std::process::Command;

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "zlib1g-dev", "libzstd-dev"];

pub fn run() -> anyhow::Result<()> {
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
    let missing: Vec<&str> = LLVM_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("setup: LLVM 22 development files: present");
        return Ok(());
    }
    if which::which("apt-get").is_err() {
        bail!(
            "missing {}: install LLVM 22 development files with your package manager \
             (this setup knows Debian's apt-get)",
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
