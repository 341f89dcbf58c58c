//! Builds the kernel programs (`sensor-ebpf`, target bpfel-unknown-none) with nightly and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! With `AYA_BUILD_SKIP=1` the kernel build is skipped and an empty stand-in object is written,
//! so `cargo check`, clippy and unit tests work on machines without the eBPF toolchain; such a
//! binary refuses to load programs and says why.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "sensor-ebpf";
const EBPF_OBJECT: &str = "keywatch-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(EBPF_OBJECT);
    if skip_requested() {
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        return Ok(());
    }
    // Rebuild when bpf-linker is replaced (it is not a cargo dependency).
    let linker = which::which("bpf-linker").map_err(|_| {
        anyhow!(
            "bpf-linker not found on PATH: run `cargo xtask setup` (or set AYA_BUILD_SKIP=1 to \
             build without kernel programs)"
        )
    })?;
    println!("cargo:rerun-if-changed={}", linker.display());

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("package {EBPF_PACKAGE} not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn skip_requested() -> bool {
    env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}
