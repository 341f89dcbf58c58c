//! Generates the keywatch.v1 tonic/prost code from `keywatch/v1/*.proto` with a vendored protoc
//! (an explicit `PROTOC` in the environment wins).

use std::{env, path::PathBuf};

use anyhow::Context as _;

const PROTOS: &[&str] =
    &["keywatch/v1/events.proto", "keywatch/v1/sensor.proto", "keywatch/v1/api.proto"];

fn main() -> anyhow::Result<()> {
    let protoc = match env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path().context("locating the vendored protoc")?,
    };
    println!("cargo:rerun-if-env-changed=PROTOC");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .compile_with_config(config, PROTOS, &["."])
        .context("compiling keywatch.v1 protos")?;
    Ok(())
}
