//! Project tasks. `cargo xtask setup | test | run | build | bench`.

mod bench;
mod demo;
mod setup;
mod tasks;

use clap::{Parser, Subcommand};

/// Keywatch project tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building the kernel programs needs (nightly rust-src, LLVM 22, bpf-linker).
    /// Idempotent: quick when everything is present.
    Setup,
    /// Setup, then formatting, lints and every test (privileged ones included; run as root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Setup, build, and run Keywatch on this host: a collector (./keywatch-demo), an enrolled
    /// sensor, the declarations in examples/, and alerts as they arrive. Needs root; Ctrl-C
    /// stops it. `--standalone` runs the sensor alone (observations as JSON lines).
    Run {
        /// The sensor alone, in standalone mode: every observation as a JSON line.
        #[arg(long, conflicts_with = "reset")]
        standalone: bool,
        /// Wipe ./keywatch-demo (collector data, sensor enrollment) first.
        #[arg(long)]
        reset: bool,
    },
    /// Setup, then build every binary in release mode.
    Build,
    /// Benchmarks: `sensor` (overhead of the running sensor on this host, needs root; add
    /// `--quick` for a short run, `--json` for machines) or `spool` (`cargo bench`).
    Bench {
        /// `sensor` or `spool`.
        what: String,
        /// Passed to the benchmark, e.g. `--quick`, `--json`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { cargo_args } => tasks::test(&cargo_args),
        Task::Run { standalone, reset } => tasks::run(standalone, reset),
        Task::Build => tasks::build(),
        Task::Bench { what, args } => bench::bench(&what, &args),
    }
}
