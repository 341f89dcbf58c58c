//! Uplink benchmark (prints, never asserts):
//!
//! 1. throughput: events/s from one uplink (spool on, mTLS after enrollment) to a real
//!    collector (`keywatch serve`) over loopback, counted to the last ack — once with every
//!    event undeclared (each one a new alert: the collector's worst case) and once with the
//!    events declared by a workload (nothing to alert on: the common case);
//! 2. latency: p50/p99 from an event entering the uplink to its ack, at 1,000 events/s;
//! 3. the uplink alone against a server that acks without storing, plaintext and with mTLS
//!    (the collector's own CA and TLS set-up), which separates the transport from the store;
//! 4. baseline: a bare tonic stream of similar events (plaintext, a server that acks without
//!    storing) in the same run, and the ratio.
//!
//! `kw-uplink-bench --collector-bin PATH [--events N] [--seconds S]`; `cargo xtask bench uplink`
//! builds everything in release and runs it.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use keywatch_proto::v1 as pb;
use prost::Message as _;
use sensor::{
    observation::{Identity, Observation, What},
    uplink::{Security, Target, Uplink, UplinkConfig},
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

fn observation(i: u64) -> Observation {
    Observation {
        time_ns: now_ns(),
        count: 1,
        process: Identity {
            pid: (i % 60_000) as u32 + 1,
            tid: (i % 60_000) as u32 + 1,
            ppid: 1,
            uid: 1000,
            euid: 1000,
            gid: 1000,
            comm: "bench".into(),
            exe: "/usr/bin/bench".into(),
            cmdline: vec!["bench".into()],
            cgroup_path: "/system.slice/bench.service".into(),
            systemd_unit: Some("bench.service".into()),
            start_time_ns: 1,
            ..Default::default()
        },
        what: What::FileOpen {
            watch: "bench".into(),
            category: None,
            path: format!("/bench/{i}"),
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

struct Collector(Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_collector(bin: &Path, dir: &Path) -> anyhow::Result<(Collector, String, String)> {
    let (sp, ap) = (free_port(), free_port());
    let data = dir.join("keywatch-data");
    let child = Command::new(bin)
        .args(["--data", &data.to_string_lossy(), "serve"])
        .args(["--sensor-listen", &format!("127.0.0.1:{sp}")])
        .args(["--api-listen", &format!("127.0.0.1:{ap}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the collector")?;
    let c = Collector(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", sp)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the collector did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(bin)
        .args([
            "--data",
            &data.to_string_lossy(),
            "token",
            "create",
            "--role",
            "sensor",
            "--uses",
            "3",
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "token create failed");
    Ok((c, format!("https://127.0.0.1:{sp}"), String::from_utf8(out.stdout)?.trim().to_owned()))
}

/// What the bench's events are expected to be: its credential watch and a workload whose
/// process (exe, uid) may read it at any time.
const DECLARATIONS: &str = r#"
kind: Watch
name: bench
category: credential
paths: ["/bench/*"]
---
kind: Team
name: bench-team
---
kind: Workload
name: bench-service
owner: bench-team
identity_type: service-account
match:
  exe: /usr/bin/bench
  uid: 1000
expect:
  credentials: [bench]
"#;

fn declare(bin: &Path, dir: &Path) -> anyhow::Result<()> {
    let file = dir.join("declarations.yaml");
    std::fs::write(&file, DECLARATIONS)?;
    let data = dir.join("keywatch-data");
    let out = Command::new(bin)
        .args(["--data", &data.to_string_lossy(), "apply", "-f", &file.to_string_lossy()])
        .output()?;
    anyhow::ensure!(out.status.success(), "apply failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Events/s from a fresh uplink to the collector, to the last ack.
async fn throughput(
    url: &str,
    token: &str,
    state: &Path,
    host: &str,
    events: u64,
) -> anyhow::Result<(f64, f64)> {
    let (up, tx, first) = uplink(url, token, state, host).await?;
    drive(up, tx, first, events).await
}

/// Sends `events` observations through `up` and waits for the last ack; events/s and seconds.
async fn drive(
    up: Uplink,
    tx: mpsc::Sender<Observation>,
    first: u64,
    events: u64,
) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    for i in 0..events {
        tx.send(observation(i)).await?;
    }
    let acked = up.wait_acked(first + events - 1, Duration::from_secs(600)).await;
    let secs = start.elapsed().as_secs_f64();
    drop(tx);
    up.shutdown().await;
    Ok(((acked + 1 - first) as f64 / secs, secs))
}

async fn uplink(
    url: &str,
    token: &str,
    state: &Path,
    host: &str,
) -> anyhow::Result<(Uplink, mpsc::Sender<Observation>, u64)> {
    let target = Target::parse(url, false).map_err(anyhow::Error::msg)?;
    let security = Security::Mtls {
        state_dir: state.to_owned(),
        token: Some(token.parse().map_err(anyhow::Error::msg)?),
    };
    let hello =
        pb::Hello { host_id: host.into(), sensor_version: "bench".into(), ..Default::default() };
    let config = UplinkConfig::new(target, security, hello, state.join("spool"));
    let (tx, rx) = mpsc::channel(16 * 1024);
    let up = Uplink::start(config, rx).await?;
    let first = up.open_report.next_seq;
    Ok((up, tx, first))
}

/// A server that acks every batch at once, storing nothing: the baseline.
struct Bare;

#[tonic::async_trait]
impl pb::sensor_service_server::SensorService for Bare {
    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }

    type StreamStream = Pin<Box<dyn Stream<Item = Result<pb::CollectorMessage, Status>> + Send>>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::SensorMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                if let Some(pb::sensor_message::Msg::Batch(b)) = m.msg {
                    let up_to = b.first_seq + b.events.len() as u64 - 1;
                    let ack = pb::CollectorMessage {
                        msg: Some(pb::collector_message::Msg::Ack(pb::Ack { up_to })),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Starts the acking server on a free port; its URL.
async fn spawn_bare() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::sensor_service_server::SensorServiceServer::new(Bare))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(format!("http://{addr}"))
}

/// Starts the acking server behind the collector's own TLS set-up (a server certificate from
/// the collector's CA in `data`, client certificates verified), so an enrolled uplink streams
/// to it with mTLS exactly as to the collector: the transport without the store.
async fn spawn_bare_mtls(data: &Path) -> anyhow::Result<String> {
    let pki = collector::pki::Pki::load_or_create(data, &[])?;
    let config = collector::tls::server_config(&pki, true)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming =
        collector::tls::incoming(listener, config, tokio_util::sync::CancellationToken::new());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::sensor_service_server::SensorServiceServer::new(Bare))
            .serve_with_incoming(incoming),
    );
    Ok(format!("https://{addr}"))
}

/// Events/s from an uplink configured with `target` and `security` to whatever acks it.
async fn uplink_alone(
    target: Target,
    security: Security,
    host: &str,
    spool: PathBuf,
    events: u64,
) -> anyhow::Result<f64> {
    let hello = pb::Hello { host_id: host.into(), ..Default::default() };
    let config = UplinkConfig::new(target, security, hello, spool);
    let (tx, rx) = mpsc::channel(16 * 1024);
    let up = Uplink::start(config, rx).await?;
    let first = up.open_report.next_seq;
    Ok(drive(up, tx, first, events).await?.0)
}

async fn bare_baseline(events: u64) -> anyhow::Result<f64> {
    let url = spawn_bare().await?;
    let mut client = pb::sensor_service_client::SensorServiceClient::connect(url).await?;
    let (tx, rx) = mpsc::channel(16);
    let start = Instant::now();
    let mut acks = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    tokio::spawn(async move {
        let mut seq = 1;
        while seq <= events {
            let n = 1000.min(events - seq + 1);
            let batch: Vec<pb::Event> = (0..n)
                .map(|i| {
                    let mut e = pb::Event::from(&observation(seq + i));
                    e.seq = seq + i;
                    e
                })
                .collect();
            let msg = pb::SensorMessage {
                msg: Some(pb::sensor_message::Msg::Batch(pb::EventBatch {
                    host_id: "bare".into(),
                    first_seq: seq,
                    events: batch,
                })),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            seq += n;
        }
    });
    while let Some(m) = acks.message().await? {
        if let Some(pb::collector_message::Msg::Ack(a)) = m.msg
            && a.up_to >= events
        {
            break;
        }
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut collector_bin: Option<PathBuf> = None;
    let (mut events, mut seconds) = (300_000u64, 10u64);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--collector-bin" => collector_bin = it.next().map(Into::into),
            "--events" => events = it.next().context("--events N")?.parse()?,
            "--seconds" => seconds = it.next().context("--seconds S")?.parse()?,
            "-h" | "--help" => {
                println!(
                    "kw-uplink-bench [--collector-bin PATH] [--events N] [--seconds S]\n\n\
                     Sensor -> collector throughput and latency over loopback: a real collector\n\
                     (mTLS, store), the sensor's uplink (spool, batching), then the uplink alone\n\
                     against a server that only acknowledges, and a bare tonic stream as the\n\
                     baseline measured in the same run. Prints; asserts nothing.\n\n\
                     --collector-bin PATH  the collector (default: keywatch next to this binary)\n\
                     --events N            events per throughput run (default 300000)\n\
                     --seconds S           length of the 1,000 events/s latency run (default 10)"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown flag {other} (see --help)"),
        }
    }
    let bin = collector_bin
        .unwrap_or_else(|| std::env::current_exe().unwrap().parent().unwrap().join("keywatch"));
    let tmp = tempfile::tempdir()?;
    let (_collector, url, token) = start_collector(&bin, tmp.path())?;
    let size = pb::Event::from(&observation(1)).encoded_len();
    println!("uplink benchmark: events of {size} bytes, loopback, collector {}", bin.display());

    // 1. Throughput: undeclared (an alert each), then declared (no alerts).
    let (alerting, secs) =
        throughput(&url, &token, &tmp.path().join("s0"), "bench-undeclared", events).await?;
    println!(
        "throughput   {events} events, mTLS + spool + store, undeclared (alert each): {alerting:>8.0} events/s ({secs:.2} s)"
    );
    declare(&bin, tmp.path())?;
    let (rate, secs) =
        throughput(&url, &token, &tmp.path().join("s1"), "bench-declared", events).await?;
    println!(
        "throughput   {events} events, mTLS + spool + store, declared (no alerts):   {rate:>8.0} events/s ({secs:.2} s)"
    );

    // 2. Latency at 1,000 events/s.
    let (up, tx, first) = uplink(&url, &token, &tmp.path().join("s2"), "bench-latency").await?;
    let n = seconds * 1000;
    let mut acked_rx = up.acked();
    let sent_at =
        std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::with_capacity(n as usize)));
    let feeder = {
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            for i in 0..n {
                tokio::time::sleep_until((start + Duration::from_millis(i)).into()).await;
                sent_at.lock().unwrap().push(Instant::now());
                if tx.send(observation(i)).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut delays = Vec::with_capacity(n as usize);
    let mut done = first - 1;
    while done < first + n - 1 {
        if tokio::time::timeout(Duration::from_secs(30), acked_rx.changed()).await.is_err() {
            break;
        }
        let up_to = *acked_rx.borrow_and_update();
        let now = Instant::now();
        let sent = sent_at.lock().unwrap();
        while done < up_to && ((done + 1 - first) as usize) < sent.len() {
            delays.push(now - sent[(done + 1 - first) as usize]);
            done += 1;
        }
    }
    feeder.await?;
    up.shutdown().await;
    delays.sort();
    let pct = |p: f64| {
        delays
            .get(((delays.len() as f64 * p) as usize).min(delays.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "latency      at 1,000 events/s, {} events, entry to ack:     p50 {:>6.1} ms   p99 {:>6.1} ms",
        delays.len(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );

    // 1b. The uplink alone against a server that only acknowledges: plaintext, then mTLS with
    // the identity the declared run enrolled (same CA, so the same handshake as the collector's).
    // (After the declarations, the latency run above measured the declared, common case.)
    let target = Target::parse(&spawn_bare().await?, true).map_err(anyhow::Error::msg)?;
    let spool = tmp.path().join("s3/spool");
    let plain = uplink_alone(target, Security::Insecure, "bench-spool", spool, events).await?;
    println!("uplink only  spool + batching + stream, acking server:      {plain:>10.0} events/s");
    let data = tmp.path().join("keywatch-data");
    let target =
        Target::parse(&spawn_bare_mtls(&data).await?, false).map_err(anyhow::Error::msg)?;
    let state = tmp.path().join("s1");
    let security = Security::Mtls { state_dir: state.clone(), token: None };
    let mtls =
        uplink_alone(target, security, "bench-declared", state.join("spool"), events).await?;
    println!("uplink mTLS  spool + batching + mTLS stream, acking server: {mtls:>10.0} events/s");

    // 3. Baseline.
    let bare = bare_baseline(events).await?;
    println!("baseline     bare tonic stream, no TLS, no spool, no store: {bare:>10.0} events/s");
    println!(
        "ratio        baseline / declared end to end: {:.1}x   (targets: >= 200,000 events/s; p99 <= 100 ms)",
        bare / rate
    );
    Ok(())
}
