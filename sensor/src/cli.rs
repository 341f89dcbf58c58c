//! Command-line interface of `keywatch-sensor`.

use std::collections::BTreeSet;

use clap::{Args, Parser, Subcommand};

use crate::{
    loader::{self, LoadOptions, ProgramStatus},
    run::AgentOptions,
    watch::WatchSet,
};

/// Keywatch host sensor: sees, in the kernel, which process reads a credential, touches
/// another process's secrets or calls an authentication endpoint.
///
/// Needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN for mounts) and a kernel with BTF
/// (/sys/kernel/btf/vmlinux). Run `keywatch-sensor probe` first to see what this kernel supports.
#[derive(Debug, Parser)]
#[command(name = "keywatch-sensor", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the kernel programs and report events.
    ///
    /// Example: `keywatch-sensor run --stdout` prints one JSON object per event.
    Run(RunArgs),
    /// Detach the programs a stopped sensor left pinned, and free their maps.
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = crate::pins::DEFAULT_PIN_DIR)]
        pin_dir: std::path::PathBuf,
    },
    /// Report, per kernel program, whether it attaches on this host and why not.
    Probe {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Standalone mode: write events to stdout as JSON lines.
    #[arg(long, required = true)]
    pub stdout: bool,
    /// Accept that these programs do not attach (comma-separated names from `probe`).
    #[arg(long, value_delimiter = ',')]
    pub allow_missing: Vec<String>,
    /// Kernel ring buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 8)]
    pub ring_mib: u32,
    /// Watch config (YAML): extra watches, `builtin: false`, `disable: [names]`. Without it
    /// the built-in catalog is watched.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Also report process lifecycle (exec, fork, exit), not only accesses.
    #[arg(long)]
    pub lifecycle: bool,
    /// Where programs and maps are pinned, so capture goes on while the sensor restarts; the
    /// next sensor adopts them and drains what accumulated.
    #[arg(long, value_name = "DIR", default_value = crate::pins::DEFAULT_PIN_DIR)]
    pub pin_dir: std::path::PathBuf,
    /// Do not pin: the programs stop with this process (a blind window on restart).
    #[arg(long)]
    pub no_pin: bool,
}

impl RunArgs {
    /// Everything `run` needs, with the watch config read and validated.
    pub fn agent_options(&self) -> anyhow::Result<AgentOptions> {
        let watches = match &self.config {
            Some(path) => crate::watch::load_config(path)?.watch_set().map_err(|problems| {
                let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
                anyhow::anyhow!("invalid watch config {}: {}", path.display(), list.join("; "))
            })?,
            None => WatchSet::builtin(),
        };
        let mut opts = AgentOptions::new(watches);
        opts.load = self.load_options();
        opts.lifecycle = self.lifecycle;
        Ok(opts)
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            allow_missing: self.allow_missing.iter().cloned().collect::<BTreeSet<_>>(),
            ring_bytes: self.ring_mib.saturating_mul(1024 * 1024),
            pin_dir: (!self.no_pin).then(|| self.pin_dir.clone()),
            ..LoadOptions::default()
        }
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => crate::run::run_stdout(&args.agent_options()?).await,
        Command::Uninstall { pin_dir } => {
            crate::pins::uninstall(&pin_dir)?;
            println!("removed the pinned programs and maps under {}", pin_dir.display());
            Ok(())
        }
        Command::Probe { json } => {
            let report = loader::probe()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", probe_table(&report));
            }
            Ok(())
        }
    }
}

/// The probe report as an aligned table.
pub fn probe_table(report: &[ProgramStatus]) -> String {
    let width = |f: &dyn Fn(&ProgramStatus) -> usize, title: &str| {
        report.iter().map(f).chain([title.len()]).max().unwrap_or(0)
    };
    let w_prog = width(&|s| s.program.len(), "PROGRAM");
    let w_attach = width(&|s| s.attach.len(), "ATTACH");
    let mut out =
        format!("{:w_prog$}  {:w_attach$}  {:8}  DETAIL\n", "PROGRAM", "ATTACH", "STATUS");
    for s in report {
        let (status, detail) = if s.attached {
            ("attached", s.purpose.to_string())
        } else {
            ("MISSING", s.reason.clone().unwrap_or_default())
        };
        out.push_str(&format!(
            "{:w_prog$}  {:w_attach$}  {status:8}  {detail}\n",
            s.program, s.attach
        ));
    }
    out
}

/// The `keywatch-sensor` program: parse, log to stderr, run, exit code.
pub fn main() -> std::process::ExitCode {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("keywatch-sensor: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keywatch-sensor: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
