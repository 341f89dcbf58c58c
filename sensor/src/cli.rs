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
    /// Attach the kernel programs and report events: to a collector, to stdout, or both.
    ///
    /// First start on a host (enrolls, then uses mTLS; the token is not needed again):
    ///
    ///   keywatch-sensor run --collector https://collector.example:7480 --join-token kwj1.…
    ///
    /// The join token comes from `keywatch token create --role sensor` on the collector.
    /// Restarts: `keywatch-sensor run --collector https://collector.example:7480`.
    /// Standalone: `keywatch-sensor run --stdout` prints one JSON object per event.
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
#[command(group(clap::ArgGroup::new("output").required(true).multiple(true).args(["stdout", "collector"])))]
pub struct RunArgs {
    /// Write events to stdout as JSON lines (standalone mode, or alongside --collector).
    #[arg(long)]
    pub stdout: bool,
    /// Send events to this collector: https://HOST:PORT (the collector's sensor port, 7480 by
    /// default). Events are spooled on disk first and released only once the collector has
    /// stored them, so collector outages and sensor restarts lose nothing.
    #[arg(long, value_name = "URL", env = "KEYWATCH_COLLECTOR")]
    pub collector: Option<String>,
    /// One-time join token from `keywatch token create --role sensor` (kwj1.…). It pins the
    /// collector's CA by fingerprint; the sensor enrolls with it and keeps the issued
    /// certificate in --state-dir, so restarts need no token.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KEYWATCH_JOIN_TOKEN",
        hide_env_values = true,
        requires = "collector"
    )]
    pub join_token: Option<crate::uplink::JoinToken>,
    /// This host's id at the collector (bound into its certificate). Default: the hostname.
    #[arg(long, value_name = "ID", requires = "collector")]
    pub host_id: Option<String>,
    /// Where the sensor keeps its key, certificate, the collector's CA, the last policy and
    /// the event spool (created 0700; files 0600).
    #[arg(long, value_name = "DIR", default_value = crate::uplink::DEFAULT_STATE_DIR)]
    pub state_dir: std::path::PathBuf,
    /// Plaintext to the collector, no enrollment, no authentication: for a lab on loopback
    /// only. The collector must run with --insecure too. Logged loudly.
    #[arg(long, requires = "collector")]
    pub insecure: bool,
    /// Most disk space the spool may use while the collector is unreachable; past it the
    /// oldest events are dropped, counted and reported to the collector as a gap.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub spool_max_mib: u64,
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
    /// Also report process lifecycle (exec, fork, exit), not only accesses. These lines may
    /// trail by up to 100 ms: the sensor holds a batch of them for company to save wakeups.
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

    /// The uplink's settings, when `--collector` is given.
    pub fn uplink_options(&self) -> anyhow::Result<Option<crate::run::UplinkOptions>> {
        use crate::uplink::{Security, Target, UplinkConfig};
        let Some(url) = &self.collector else { return Ok(None) };
        let target =
            Target::parse(url, self.insecure).map_err(|e| anyhow::anyhow!("--collector {e}"))?;
        if self.insecure && self.join_token.is_some() {
            anyhow::bail!("--insecure does not enroll: drop --join-token, or drop --insecure");
        }
        let host_id = match &self.host_id {
            Some(id) => id.clone(),
            None => hostname()?,
        };
        if host_id.is_empty() || host_id.len() > 253 || host_id.chars().any(char::is_control) {
            anyhow::bail!("host id {host_id:?} must be 1 to 253 printable characters (--host-id)");
        }
        let security = if self.insecure {
            Security::Insecure
        } else {
            Security::Mtls { state_dir: self.state_dir.clone(), token: self.join_token.clone() }
        };
        if self.insecure {
            crate::uplink::enroll::prepare_state_dir(&self.state_dir)?;
        }
        let hello = keywatch_proto::v1::Hello { host_id, ..Default::default() };
        let mut config = UplinkConfig::new(target, security, hello, self.state_dir.join("spool"));
        let max_bytes = self.spool_max_mib.saturating_mul(1024 * 1024);
        config.spool.max_bytes = max_bytes;
        // At least four segments, so eviction drops a small part of the spool at a time.
        config.spool.segment_bytes = config.spool.segment_bytes.min(max_bytes / 4);
        Ok(Some(crate::run::UplinkOptions {
            config,
            state_dir: self.state_dir.clone(),
            stdout: self.stdout,
        }))
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
        Command::Run(args) => {
            let agent = args.agent_options()?;
            match args.uplink_options()? {
                Some(uplink) => crate::run::run_uplink(&agent, uplink).await,
                None => crate::run::run_stdout(&agent).await,
            }
        }
        Command::Uninstall { pin_dir } => {
            crate::pins::uninstall(&pin_dir)?;
            println!("removed the pinned programs and maps under {}", pin_dir.display());
            Ok(())
        }
        Command::Probe { json } => {
            let report = loader::probe()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report.programs)?);
            } else {
                print!("{}", probe_table(&report.programs));
                println!("\nkernel struct reads: {}", report.mode.reads());
                match report.gaps.as_slice() {
                    [] => println!("not seen on this kernel: nothing"),
                    gaps => {
                        println!("not seen on this kernel:");
                        gaps.iter().for_each(|gap| println!("  - {gap}"));
                    }
                }
            }
            Ok(())
        }
    }
}

/// This machine's host name.
fn hostname() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        anyhow::bail!(
            "cannot read the host name ({}); give --host-id",
            std::io::Error::last_os_error()
        );
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
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
