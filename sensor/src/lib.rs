//! Keywatch host sensor.
//!
//! Data path: kernel programs ([`loader`]) → ring buffer ([`ring`]) → [`reader`] (decode) →
//! sink ([`output`]), joined by bounded channels so pressure propagates instead of memory
//! growing. Ring records are released only once what came of them is durable.

pub mod btf;
pub mod cli;
pub mod convert;
pub mod enrich;
pub mod event;
pub mod fault;
pub mod fold;
pub mod held;
pub mod kernel_maps;
pub mod kfunc;
pub mod loader;
pub mod observation;
pub mod output;
pub mod pins;
pub mod process;
pub mod reader;
pub mod ring;
pub mod run;
pub mod spool;
pub mod system;
pub mod uplink;
pub mod watch;
pub mod watch_sync;

/// The eBPF object built by `build.rs` from the `sensor-ebpf` crate (empty when the build ran
/// with `AYA_BUILD_SKIP=1`).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/keywatch-ebpf"));
