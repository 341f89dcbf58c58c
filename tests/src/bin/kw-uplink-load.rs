//! Drives the real uplink (spool, batching, stream, acks, TLS) with synthetic observations, so
//! transport tests and benchmarks can push many events fast without a kernel.
//!
//! ```text
//! kw-uplink-load --collector URL --state-dir DIR --host-id ID --events N
//!                [--join-token T | --insecure] [--rate EV_PER_S] [--spool-max-mib N]
//!                [--heartbeat-ms MS] [--no-wait]
//! ```
//!
//! Event `i` (0-based) is a file access to `/load/<i>` by pid `i % 60000 + 1`, stamped now. Prints, as one JSON
//! line on stdout: the seqs the events got, the acked watermark and the counters.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensor::{
    observation::{Identity, Observation, What},
    uplink::{Security, Target, Uplink, UplinkConfig},
};
use tokio::sync::mpsc;

struct Args {
    collector: String,
    state_dir: std::path::PathBuf,
    host_id: String,
    events: u64,
    token: Option<String>,
    insecure: bool,
    rate: u64,
    spool_max_mib: u64,
    heartbeat_ms: u64,
    wait: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        collector: String::new(),
        state_dir: std::path::PathBuf::new(),
        host_id: "load-host".into(),
        events: 1000,
        token: None,
        insecure: false,
        rate: 0,
        spool_max_mib: 256,
        heartbeat_ms: 10_000,
        wait: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--collector" => a.collector = value()?,
            "--state-dir" => a.state_dir = value()?.into(),
            "--host-id" => a.host_id = value()?,
            "--events" => a.events = value()?.parse()?,
            "--join-token" => a.token = Some(value()?),
            "--insecure" => a.insecure = true,
            "--rate" => a.rate = value()?.parse()?,
            "--spool-max-mib" => a.spool_max_mib = value()?.parse()?,
            "--heartbeat-ms" => a.heartbeat_ms = value()?.parse()?,
            "--no-wait" => a.wait = false,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// Synthetic observation number `i`, stamped `now_ns` (recent: the collector prunes old events).
pub fn observation(i: u64, now_ns: u64) -> Observation {
    Observation {
        time_ns: now_ns,
        count: 1,
        process: Identity {
            pid: (i % 60_000) as u32 + 1,
            tid: (i % 60_000) as u32 + 1,
            ppid: 1,
            uid: 1000,
            euid: 1000,
            gid: 1000,
            comm: "load".into(),
            exe: "/usr/bin/load".into(),
            cmdline: vec!["load".into(), "--fast".into()],
            cgroup_path: "/system.slice/load.service".into(),
            systemd_unit: Some("load.service".into()),
            start_time_ns: 1_700_000_000_000_000_000,
            ..Default::default()
        },
        what: What::FileOpen {
            watch: "load-watch".into(),
            category: None,
            path: format!("/load/{i}"),
            dev: 2049,
            ino: i + 1,
            flags: 0,
            write: false,
            held: false,
        },
        mark: 0,
        ring_pos: 0,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = args()?;
    let target = Target::parse(&a.collector, a.insecure).map_err(anyhow::Error::msg)?;
    let security = if a.insecure {
        Security::Insecure
    } else {
        let token = a.token.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?;
        Security::Mtls { state_dir: a.state_dir.clone(), token }
    };
    let hello = keywatch_proto::v1::Hello {
        host_id: a.host_id.clone(),
        sensor_version: "load".into(),
        ..Default::default()
    };
    let mut config = UplinkConfig::new(target, security, hello, a.state_dir.join("spool"));
    config.spool.max_bytes = a.spool_max_mib * 1024 * 1024;
    config.spool.segment_bytes = config.spool.segment_bytes.min(config.spool.max_bytes / 4);
    config.heartbeat = Duration::from_millis(a.heartbeat_ms);
    config.refused_retry = Duration::from_secs(1);
    let (tx, rx) = mpsc::channel(16 * 1024);
    let uplink = Uplink::start(config, rx).await?;
    let first_seq = uplink.open_report.next_seq;
    let start = Instant::now();
    for i in 0..a.events {
        if a.rate > 0 {
            let due = start + Duration::from_secs_f64(i as f64 / a.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        tx.send(observation(i, now_ns)).await?;
    }
    drop(tx);
    let last_seq = first_seq + a.events - 1;
    let acked =
        if a.wait { uplink.wait_acked(last_seq, Duration::from_secs(600)).await } else { 0 };
    let elapsed = start.elapsed();
    let stats = &uplink.spool_stats;
    use std::sync::atomic::Ordering::Relaxed;
    let out = serde_json::json!({
        "first_seq": first_seq,
        "last_seq": last_seq,
        "acked": acked,
        "seconds": elapsed.as_secs_f64(),
        "evicted_total": stats.evicted_total.load(Relaxed),
        "spool_events": stats.depth_events.load(Relaxed),
        "reconnects": uplink.counters.reconnects.load(Relaxed),
        "torn_records": uplink.open_report.torn_records,
        "evicted_at_open": uplink.open_report.evicted_total,
    });
    // Give the heartbeat that carries the final counters a chance to go out.
    if !a.wait {
        tokio::time::sleep(Duration::from_millis(a.heartbeat_ms.min(5000) + 500)).await;
    }
    uplink.shutdown().await;
    println!("{out}");
    if a.wait && acked < last_seq {
        anyhow::bail!("only {acked} of seqs up to {last_seq} acked");
    }
    Ok(())
}
