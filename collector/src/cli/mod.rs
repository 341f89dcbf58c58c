//! Command-line interface of `keywatch`: the collector (`serve`) and the client commands that
//! talk to it over gRPC.

mod client;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use keywatch_proto::v1 as pb;

use crate::{
    alerts::{self, Alert},
    declarations::Declaration,
    duration::HumanDuration,
    serve::{self, ServeConfig},
    table,
    timeline::{self, TimelineEntry},
};

/// Keywatch: which process, on which host, just used which credential — and was it supposed to?
///
/// Start the collector with `keywatch serve`; in the same directory every other command finds it
/// with no flags (it reads ./keywatch-data/api.addr and ./keywatch-data/admin.token).
#[derive(Debug, Parser)]
#[command(name = "keywatch", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// How client commands find the collector.
#[derive(Debug, Args)]
pub struct Global {
    /// Collector data directory: where `serve` keeps its database, and where client commands
    /// look for api.addr and admin.token.
    #[arg(long, global = true, env = "KEYWATCH_DATA", default_value = "./keywatch-data")]
    pub data: PathBuf,
    /// API address, e.g. http://127.0.0.1:7481 (default: read from DATA/api.addr).
    #[arg(long, global = true, env = "KEYWATCH_SERVER")]
    pub server: Option<String>,
    /// API token (default: DATA/admin.token).
    #[arg(long, global = true, env = "KEYWATCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to trust for the API (default: DATA/ca/ca.pem).
    #[arg(long, global = true, env = "KEYWATCH_CA")]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the collector: SQLite under --data, sensor and API endpoints on loopback.
    ///
    /// On first start it creates an admin token in DATA/admin.token (mode 0600; only its hash is
    /// stored). New alerts are also appended to DATA/alerts.jsonl.
    Serve(ServeArgs),
    /// Validate and apply declarations from YAML files or directories, all or nothing.
    ///
    /// Every problem in every file is reported (file, document number, field); if there is one,
    /// nothing is applied. Each changed declaration becomes a new revision with author, time and diff.
    Apply(ApplyArgs),
    /// Show declarations: keywatch get workloads, keywatch get workload payments-api -o yaml.
    Get(GetArgs),
    /// Delete a declaration (refused while others refer to it).
    Delete(DeleteArgs),
    /// Show the revisions of a declaration, newest first, with diffs.
    History(DeleteArgs),
    /// List alerts, or show one: keywatch alerts --status open; keywatch alerts show 12.
    Alerts(AlertsArgs),
    /// Acknowledge an alert (open → acknowledged).
    Ack(TransitionArgs),
    /// Resolve an alert (open or acknowledged → resolved).
    Resolve(TransitionArgs),
    /// A host's events and alerts in time order, with each process's ancestry.
    ///
    /// Examples: keywatch timeline --host web-1 --since 2h;
    /// keywatch timeline --host web-1 --from 2026-12-01T10:00:00Z --to 2026-12-01T11:00:00Z --pid 4242 --json
    Timeline(TimelineArgs),
    /// Manage API tokens and sensor join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List enrolled hosts, or revoke one: keywatch hosts; keywatch hosts revoke web-1.
    Hosts(HostsArgs),
    /// Show who the current token belongs to.
    Whoami,
    /// The audit trail: declaration changes, token operations, acks, resolutions, escalations,
    /// host enrollment and revocation — who, when, what.
    ///
    /// Examples: keywatch audit --since 1d; keywatch audit --kind declaration --json
    Audit(AuditArgs),
    /// The detection rules: default severity, MITRE ATT&CK techniques, OWASP NHI Top 10 entry.
    Rules {
        /// One JSON object per rule.
        #[arg(long)]
        json: bool,
    },
    /// Print the version and the gRPC schema this keywatch speaks.
    Version,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where sensors connect.
    #[arg(long, default_value = serve::DEFAULT_SENSOR_LISTEN)]
    pub sensor_listen: std::net::SocketAddr,
    /// Where the CLI connects.
    #[arg(long, default_value = serve::DEFAULT_API_LISTEN)]
    pub api_listen: std::net::SocketAddr,
    /// How long events are kept (alerts are kept); e.g. 30d, 12h.
    #[arg(long, default_value = "30d")]
    pub retention: HumanDuration,
    /// Plaintext sensor port: no TLS, no enrollment; the sensor's Hello is trusted. Logged
    /// loudly at start and every minute.
    #[arg(long)]
    pub insecure: bool,
    /// With --insecure, accept a non-loopback sensor address (events travel unencrypted).
    #[arg(long, requires = "insecure")]
    pub allow_plaintext_remote: bool,
    /// A name or address sensors dial, added to the server certificate (repeatable).
    #[arg(long = "advertise", value_name = "NAME|IP")]
    pub advertise: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// YAML file or directory (every *.yaml / *.yml below it, in name order); repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Validate and show what would change, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Watch, Team, Workload, ApprovedChange or Detections (any case, singular or plural).
    pub kind: String,
    /// One name; all of the kind when left out.
    pub name: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The declaration's kind.
    pub kind: String,
    /// Its name.
    pub name: String,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AlertsArgs {
    #[command(subcommand)]
    pub show: Option<AlertsCommand>,
    /// open, acknowledged or resolved.
    #[arg(long)]
    pub status: Option<String>,
    /// Owning team.
    #[arg(long)]
    pub owner: Option<String>,
    /// Rule name, e.g. out-of-window.
    #[arg(long)]
    pub rule: Option<String>,
    /// Host id.
    #[arg(long)]
    pub host: Option<String>,
    /// Workload name (or `undeclared`).
    #[arg(long)]
    pub workload: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 200)]
    pub limit: u32,
    /// JSON lines, one full alert per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// Everything about one alert: context, approved changes, revisions, lifecycle.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct TransitionArgs {
    /// Alert id.
    pub id: i64,
    /// Why; recorded with the transition.
    #[arg(long)]
    pub note: Option<String>,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only records newer than this, e.g. 1h, 7d.
    #[arg(long)]
    pub since: Option<HumanDuration>,
    /// Only these kinds or kind prefixes (repeatable): declaration, token, join-token, alert,
    /// alert-escalated, host…
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
    /// At most the newest this many.
    #[arg(long, default_value_t = 1_000)]
    pub limit: u32,
    /// JSON lines, one record per line (with diffs).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TimelineArgs {
    /// Host id as its sensor reports it.
    #[arg(long)]
    pub host: String,
    /// Window ending now, e.g. 15m, 2h, 1d (default 1h unless --from is given).
    #[arg(long, conflicts_with_all = ["from"])]
    pub since: Option<HumanDuration>,
    /// Start, RFC 3339 (inclusive).
    #[arg(long)]
    pub from: Option<DateTime<Utc>>,
    /// End, RFC 3339 (exclusive; default now).
    #[arg(long, requires = "from")]
    pub to: Option<DateTime<Utc>>,
    /// Only this process.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only these kinds (repeatable): file-access, secret-access, connect, exec, exit, fork,
    /// privilege-change, alert, gap (events the sensor lost).
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
    /// Stop after this many entries (the last line then tells how to continue).
    #[arg(long, default_value_t = 1_000)]
    pub limit: usize,
    /// Continue from a page token printed by an earlier run.
    #[arg(long)]
    pub after: Option<String>,
    /// JSON lines, one entry per line, with process and ancestry.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once on stdout (only its hash is stored), details on stderr.
    ///
    /// `--role sensor` creates a join token for `keywatch-sensor run --join-token`:
    /// TOKEN=$(keywatch token create --role sensor --labels env=prod --ttl 1h --uses 1)
    Create {
        /// admin, iam, secops, owner, responder or sensor (a join token).
        #[arg(long)]
        role: String,
        /// The team, for owner tokens.
        #[arg(long)]
        team: Option<String>,
        /// Who holds it (recorded as the author of their changes).
        #[arg(long)]
        name: Option<String>,
        /// Join tokens: labels every host enrolled with it gets, k=v,k=v.
        #[arg(long)]
        labels: Option<String>,
        /// How long the token works, e.g. 90d (API tokens: until revoked when left out; join
        /// tokens: 1h when left out).
        #[arg(long)]
        ttl: Option<HumanDuration>,
        /// Join tokens: how many hosts can enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List API tokens and join tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: a number for an API token, 12 hex characters for a join token.
    Revoke { id: String },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HostsArgs {
    #[command(subcommand)]
    pub command: Option<HostsCommand>,
    /// JSON lines, one host per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Revoke a host: its open streams end within a second, new ones are refused. Enroll it
    /// again with a new join token to let it back in.
    Revoke { host: String },
}

/// Parses `k=v,k=v`.
fn parse_labels(s: &str) -> anyhow::Result<std::collections::HashMap<String, String>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => bail!("--labels: expected k=v,k=v, got {p:?}"),
        })
        .collect()
}

/// The `keywatch` binary: parses the command line, starts logging to stderr (`info` for
/// `serve`, `warn` otherwise; `RUST_LOG` overrides), runs the command, and turns the outcome
/// into an exit code.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = cli.global;
    let target = || client::resolve(g.server.clone(), g.token.clone(), g.ca.clone(), &g.data);
    match cli.command {
        Command::Version => {
            println!("keywatch {} (keywatch.v1)", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(a) => {
            let mut config = ServeConfig::new(&g.data);
            config.sensor_addr = a.sensor_listen;
            config.api_addr = a.api_listen;
            config.retention = a.retention.0;
            config.insecure = a.insecure;
            config.allow_plaintext_remote = a.allow_plaintext_remote;
            config.advertise = a.advertise;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                serve::shutdown_signal().await;
                tracing::info!("shutting down");
                stop.cancel();
            });
            serve::serve(config, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply(a) => apply(&mut client::connect(&target()?).await?, a).await,
        Command::Get(a) => get(&mut client::connect(&target()?).await?, a).await,
        Command::Delete(a) => {
            let mut c = client::connect(&target()?).await?;
            let r = c
                .delete(pb::DeleteRequest { kind: a.kind.clone(), name: a.name.clone() })
                .await
                .map_err(client::explain)?
                .into_inner();
            println!("{} {} deleted (revision {})", a.kind, a.name, r.revision);
            Ok(ExitCode::SUCCESS)
        }
        Command::History(a) => {
            let mut c = client::connect(&target()?).await?;
            let r = c
                .history(pb::HistoryRequest { kind: a.kind, name: a.name, limit: 50 })
                .await
                .map_err(client::explain)?
                .into_inner();
            for rev in r.revisions {
                let t = DateTime::from_timestamp_nanos(rev.time_ns as i64);
                println!(
                    "revision {} {} by {} at {}",
                    rev.revision,
                    rev.action,
                    rev.author,
                    t.to_rfc3339()
                );
                for line in rev.diff.lines().filter(|l| !l.starts_with("  ")) {
                    println!("    {line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Alerts(a) => alerts_cmd(&mut client::connect(&target()?).await?, a).await,
        Command::Ack(a) => {
            transition(&mut client::connect(&target()?).await?, a, "acknowledged").await
        }
        Command::Resolve(a) => {
            transition(&mut client::connect(&target()?).await?, a, "resolved").await
        }
        Command::Timeline(a) => timeline_cmd(&mut client::connect(&target()?).await?, a).await,
        Command::Token(TokenCommand::Create { role, team, name, labels, ttl, uses }) => {
            let labels = labels.as_deref().map(parse_labels).transpose()?.unwrap_or_default();
            let mut c = client::connect(&target()?).await?;
            let r = c
                .create_token(pb::CreateTokenRequest {
                    role: role.clone(),
                    team: team.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    labels,
                    ttl_s: ttl.map_or(0, |t| t.0.num_seconds().max(1) as u64),
                    uses,
                })
                .await
                .map_err(client::explain)?
                .into_inner();
            if r.join_token_id.is_empty() {
                let expires = if r.expires_ns == 0 {
                    "until revoked".to_owned()
                } else {
                    format!("expires {}", when(r.expires_ns))
                };
                eprintln!("token {} created ({expires}); it is shown only this once:", r.id);
            } else {
                let expires = DateTime::from_timestamp_nanos(r.expires_ns as i64);
                eprintln!(
                    "join token {} created: {uses} use(s), expires {}; it is shown only this once:",
                    r.join_token_id,
                    expires.to_rfc3339()
                );
            }
            println!("{}", r.token);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::List { json }) => {
            let mut c = client::connect(&target()?).await?;
            let r = c
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(client::explain)?
                .into_inner();
            tokens_out(&r.tokens, json)
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            let mut c = client::connect(&target()?).await?;
            c.revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(client::explain)?;
            println!("token {id} revoked");
            Ok(ExitCode::SUCCESS)
        }
        Command::Hosts(HostsArgs { command: Some(HostsCommand::Revoke { host }), .. }) => {
            let mut c = client::connect(&target()?).await?;
            c.revoke_host(pb::RevokeHostRequest { host_id: host.clone() })
                .await
                .map_err(client::explain)?;
            println!("host {host} revoked; its streams are ended and new ones refused");
            Ok(ExitCode::SUCCESS)
        }
        Command::Hosts(HostsArgs { command: None, json }) => {
            let mut c = client::connect(&target()?).await?;
            let r =
                c.list_hosts(pb::ListHostsRequest {}).await.map_err(client::explain)?.into_inner();
            hosts_out(&r.hosts, json)
        }
        Command::Rules { json } => rules_out(json),
        Command::Audit(a) => {
            let mut c = client::connect(&target()?).await?;
            let since = a.since.map(|d| Utc::now() - d.0);
            let r = c
                .list_audit(pb::ListAuditRequest {
                    since_ns: since
                        .map_or(0, |t| t.timestamp_nanos_opt().unwrap_or_default().max(0) as u64),
                    kinds: a.kinds,
                    limit: a.limit,
                })
                .await
                .map_err(client::explain)?
                .into_inner();
            let records: Vec<crate::audit::AuditRecord> = r
                .records
                .iter()
                .map(|r| serde_json::from_str(&r.json).context("decoding an audit record"))
                .collect::<anyhow::Result<_>>()?;
            if a.json {
                for rec in &records {
                    println!("{}", serde_json::to_string(rec)?);
                }
            } else if records.is_empty() {
                eprintln!("no audit records match");
            } else {
                print!("{}", crate::audit::render_table(&records));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Whoami => {
            let mut c = client::connect(&target()?).await?;
            let r = c.who_am_i(pb::WhoAmIRequest {}).await.map_err(client::explain)?.into_inner();
            let team =
                if r.team.is_empty() { String::new() } else { format!(" (team {})", r.team) };
            println!("{} — role {}{team}", r.name, r.role);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rules_out(json: bool) -> anyhow::Result<ExitCode> {
    use crate::rule::Rule;
    if json {
        for r in Rule::ALL {
            let v = serde_json::json!({
                "rule": r.as_str(),
                "default_severity": r.default_severity().as_str(),
                "description": r.description(),
                "attack": r.attack().iter().map(|(id, name)| serde_json::json!({"id": id, "name": name})).collect::<Vec<_>>(),
                "owasp_nhi": {"id": r.owasp_nhi().0, "name": r.owasp_nhi().1},
            });
            println!("{v}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = Rule::ALL
        .iter()
        .map(|r| {
            vec![
                r.as_str().to_owned(),
                r.default_severity().to_string(),
                r.attack().iter().map(|(id, _)| *id).collect::<Vec<_>>().join(", "),
                format!("{} {}", r.owasp_nhi().0, r.owasp_nhi().1),
                r.description().to_owned(),
            ]
        })
        .collect();
    print!("{}", table::render(&["RULE", "SEVERITY", "ATT&CK", "OWASP NHI", "FIRES WHEN"], &rows));
    Ok(ExitCode::SUCCESS)
}

fn when(ns: u64) -> String {
    if ns == 0 {
        "-".into()
    } else {
        DateTime::from_timestamp_nanos(ns as i64).format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }
}

fn labels_text<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut v: Vec<String> = labels.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    if v.is_empty() { "-".into() } else { v.join(",") }
}

fn tokens_out(tokens: &[pb::TokenInfo], json: bool) -> anyhow::Result<ExitCode> {
    if json {
        for t in tokens {
            let v = serde_json::json!({
                "kind": t.kind, "id": t.id, "name": t.name, "role": t.role, "team": t.team,
                "created": when(t.created_ns), "revoked": (t.revoked_ns != 0).then(|| when(t.revoked_ns)),
                "expires": (t.expires_ns != 0).then(|| when(t.expires_ns)),
                "uses_left": t.uses_left, "creator": t.creator, "labels": t.labels,
            });
            println!("{v}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let detail = if t.kind == "join" {
                format!(
                    "uses left {}, expires {}, labels {}, by {}",
                    t.uses_left,
                    when(t.expires_ns),
                    labels_text(&t.labels),
                    t.creator
                )
            } else {
                format!(
                    "{}{}",
                    t.name,
                    if t.team.is_empty() { String::new() } else { format!(" (team {})", t.team) }
                )
            };
            vec![
                t.kind.clone(),
                t.id.clone(),
                t.role.clone(),
                when(t.created_ns),
                when(t.revoked_ns),
                detail,
            ]
        })
        .collect();
    print!("{}", table::render(&["KIND", "ID", "ROLE", "CREATED", "REVOKED", "DETAIL"], &rows));
    Ok(ExitCode::SUCCESS)
}

fn hosts_out(hosts: &[pb::HostInfo], json: bool) -> anyhow::Result<ExitCode> {
    let list: Vec<crate::hosts::HostSummary> = hosts
        .iter()
        .map(|h| serde_json::from_str(&h.json).context("decoding a host"))
        .collect::<anyhow::Result<_>>()?;
    if json {
        for h in &list {
            println!("{}", serde_json::to_string(h)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        eprintln!("no hosts enrolled or connected yet");
        return Ok(ExitCode::SUCCESS);
    }
    let t = |d: Option<DateTime<Utc>>| {
        d.map_or_else(|| "-".into(), |d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|h| {
            let hb = h.heartbeat.as_ref().map_or_else(
                || "-".into(),
                |b| {
                    format!(
                        "{} ev / {} B, evicted {}, kernel lost {}",
                        b.spool_events,
                        b.spool_bytes,
                        b.spool_evicted,
                        b.kernel_lost_total()
                    )
                },
            );
            vec![
                h.host_id.clone(),
                labels_text(&h.labels),
                t(h.enrolled_at),
                t(h.last_seen),
                h.revoked.map_or_else(|| "no".into(), |r| format!("yes ({})", t(Some(r)))),
                h.cert_serial.clone().unwrap_or_else(|| "- (not enrolled)".into()),
                hb,
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &["HOST", "LABELS", "ENROLLED", "LAST SEEN", "REVOKED", "CERT SERIAL", "SPOOL / LOSS"],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// Collects YAML files: files as given, directories walked in name order.
pub fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut files)
                .with_context(|| format!("cannot read directory {}", p.display()))?;
        } else {
            files.push(p.clone());
        }
    }
    if files.is_empty() {
        bail!(
            "no .yaml or .yml files found in {}",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            Ok((p.display().to_string(), text))
        })
        .collect()
}

async fn apply(c: &mut client::Client, a: ApplyArgs) -> anyhow::Result<ExitCode> {
    let files = collect_files(&a.files)?;
    let r = c
        .apply(pb::ApplyRequest {
            files: files
                .into_iter()
                .map(|(name, content)| pb::SourceFile { name, content })
                .collect(),
            dry_run: a.dry_run,
        })
        .await
        .map_err(client::explain)?
        .into_inner();
    if !r.problems.is_empty() {
        for p in &r.problems {
            let object =
                if p.object.is_empty() { String::new() } else { format!(" ({})", p.object) };
            eprintln!(
                "error: {}: document {}{object}: {}: {}",
                p.file, p.document, p.field, p.message
            );
        }
        eprintln!("{} problem(s); nothing was applied", r.problems.len());
        return Ok(ExitCode::from(2));
    }
    for ch in &r.changes {
        let rev =
            if ch.revision > 0 { format!(" (revision {})", ch.revision) } else { String::new() };
        let action = if a.dry_run && ch.action != "unchanged" {
            format!("would be {}", ch.action)
        } else {
            ch.action.clone()
        };
        println!("{} {} {action}{rev}", ch.kind, ch.name);
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(c: &mut client::Client, a: GetArgs) -> anyhow::Result<ExitCode> {
    let r = c
        .get(pb::GetRequest { kind: a.kind, name: a.name.unwrap_or_default() })
        .await
        .map_err(client::explain)?
        .into_inner();
    let decls: Vec<(Declaration, i64)> = r
        .objects
        .iter()
        .map(|o| Ok((serde_json::from_str(&o.json).context("decoding a declaration")?, o.revision)))
        .collect::<anyhow::Result<_>>()?;
    match a.output {
        Output::Json => {
            let list: Vec<&Declaration> = decls.iter().map(|(d, _)| d).collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        Output::Yaml => {
            let docs: Vec<String> = decls.iter().map(|(d, _)| d.to_yaml()).collect();
            print!("{}", docs.join("---\n"));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = decls
                .iter()
                .map(|(d, rev)| {
                    vec![d.kind().to_string(), d.name().to_owned(), rev.to_string(), describe(d)]
                })
                .collect();
            print!("{}", table::render(&["KIND", "NAME", "REVISION", "SUMMARY"], &rows));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(d: &Declaration) -> String {
    match d {
        Declaration::Watch(w) => format!(
            "{} {}",
            w.category.as_str(),
            [w.paths.clone(), w.endpoints.clone()].concat().join(", ")
        ),
        Declaration::Team(t) => t
            .route
            .as_ref()
            .map(|r| {
                let esc = match (&r.escalate_after, &r.escalate_to) {
                    (Some(a), Some(t)) => format!(", escalate to {t} after {a}"),
                    _ => String::new(),
                };
                let team = crate::declarations::model::Team {
                    name: t.name.clone(),
                    route: Some(r.clone()),
                    description: None,
                };
                let sinks: Vec<String> = crate::route::TeamRoute::of(&team)
                    .sinks
                    .iter()
                    .map(crate::route::Sink::describe)
                    .collect();
                format!(
                    "{}{esc}",
                    if sinks.is_empty() { "no sinks".into() } else { sinks.join(", ") }
                )
            })
            .unwrap_or_else(|| "no route".into()),
        Declaration::Workload(w) => format!("{} owned by {}", w.identity_type.as_str(), w.owner),
        Declaration::ApprovedChange(c) => format!(
            "{} {} to {}: {}",
            c.workload,
            c.from.to_rfc3339(),
            c.until.to_rfc3339(),
            c.reason
        ),
        Declaration::Detections(d) => format!("{} rule settings", d.rules.len()),
    }
}

fn decode_alert(a: &pb::Alert) -> anyhow::Result<Alert> {
    serde_json::from_str(&a.json).context("decoding an alert")
}

async fn alerts_cmd(c: &mut client::Client, a: AlertsArgs) -> anyhow::Result<ExitCode> {
    if let Some(AlertsCommand::Show { id, json }) = a.show {
        let r =
            c.get_alert(pb::GetAlertRequest { id }).await.map_err(client::explain)?.into_inner();
        let alert = decode_alert(&r)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&alert)?);
        } else {
            print!("{}", alert.render_details());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let r = c
        .list_alerts(pb::ListAlertsRequest {
            status: a.status.unwrap_or_default(),
            owner: a.owner.unwrap_or_default(),
            rule: a.rule.unwrap_or_default(),
            host: a.host.unwrap_or_default(),
            workload: a.workload.unwrap_or_default(),
            limit: a.limit,
        })
        .await
        .map_err(client::explain)?
        .into_inner();
    let list: Vec<Alert> = r.alerts.iter().map(decode_alert).collect::<anyhow::Result<_>>()?;
    if a.json {
        for alert in &list {
            println!("{}", serde_json::to_string(alert)?);
        }
    } else if list.is_empty() {
        eprintln!("no alerts match");
    } else {
        print!("{}", alerts::render_table(&list));
    }
    Ok(ExitCode::SUCCESS)
}

async fn transition(
    c: &mut client::Client,
    a: TransitionArgs,
    to: &str,
) -> anyhow::Result<ExitCode> {
    let r = c
        .transition_alert(pb::TransitionAlertRequest {
            id: a.id,
            status: to.into(),
            note: a.note.unwrap_or_default(),
        })
        .await
        .map_err(client::explain)?
        .into_inner();
    println!("alert {} is now {}", r.id, r.status);
    Ok(ExitCode::SUCCESS)
}

async fn timeline_cmd(c: &mut client::Client, a: TimelineArgs) -> anyhow::Result<ExitCode> {
    let now = Utc::now();
    let (from, to) = match (a.from, a.since) {
        (Some(from), _) => (from, a.to.unwrap_or(now)),
        (None, since) => (now - since.map_or(chrono::Duration::hours(1), |d| d.0), now),
    };
    let ns = |t: DateTime<Utc>| t.timestamp_nanos_opt().unwrap_or_default().max(0) as u64;
    let mut token = a.after.unwrap_or_default();
    let mut entries: Vec<TimelineEntry> = Vec::new();
    let mut more = String::new();
    while entries.len() < a.limit {
        let page_size = (a.limit - entries.len()).min(1_000) as u32;
        let r = c
            .timeline(pb::TimelineRequest {
                host: a.host.clone(),
                from_ns: ns(from),
                to_ns: ns(to),
                pid: a.pid,
                kinds: a.kinds.clone(),
                page_size,
                page_token: token.clone(),
            })
            .await
            .map_err(client::explain)?
            .into_inner();
        for e in &r.entries {
            entries.push(serde_json::from_str(&e.json).context("decoding a timeline entry")?);
        }
        more = r.next_page_token.clone();
        if more.is_empty() {
            break;
        }
        token = more.clone();
    }
    if a.json {
        for e in &entries {
            println!("{}", serde_json::to_string(e)?);
        }
    } else if entries.is_empty() {
        eprintln!("nothing on {} between {} and {}", a.host, from.to_rfc3339(), to.to_rfc3339());
    } else {
        print!("{}", timeline::render_table(&entries));
    }
    if !more.is_empty() {
        eprintln!("more entries follow; continue with --after {more}");
    }
    Ok(ExitCode::SUCCESS)
}
