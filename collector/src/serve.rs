//! `keywatch serve`: the embedded collector — SQLite under the data directory, the collector CA,
//! the sensor endpoint (mTLS, enrollment) and the API endpoint (TLS), both on loopback unless
//! told otherwise.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{Api, api_server},
    auth::{self, Role, TokenRecord},
    clock::{Clock, SystemClock},
    enroll::Enroller,
    hosts::{Hosts, MtlsPeers},
    ingest::{AlertLog, Ingestor, PeerIdentity, SensorIngest, TrustHello},
    outbox::{Dispatcher, OutboxConfig},
    pki::{self, Pki},
    registry::RegistryHandle,
    store::{Store, StoreError, sqlite::SqliteStore},
    tls,
};

/// Default sensor endpoint.
pub const DEFAULT_SENSOR_LISTEN: &str = "127.0.0.1:7480";
/// Default API endpoint.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7481";
/// Files in the data directory.
pub const API_ADDR_FILE: &str = "api.addr";
pub const SENSOR_ADDR_FILE: &str = "sensor.addr";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const ALERTS_FILE: &str = "alerts.jsonl";

/// Everything `serve` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Where sensors connect (TLS unless `insecure`).
    pub sensor_addr: SocketAddr,
    /// Where the CLI connects (always TLS).
    pub api_addr: SocketAddr,
    /// Events older than this are deleted (alerts are kept).
    pub retention: chrono::Duration,
    /// Plaintext on the sensor port: no enrollment check, the Hello's host id is trusted.
    pub insecure: bool,
    /// With `insecure`, allow the sensor port on a non-loopback address.
    pub allow_plaintext_remote: bool,
    /// Extra names and addresses for the server certificate (sensors dial these).
    pub advertise: Vec<String>,
    /// Timing of alert deliveries and escalations.
    pub outbox: OutboxConfig,
}

impl ServeConfig {
    /// Defaults for a data directory: loopback endpoints, TLS, 30 days of events.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let parse = |s: &str| s.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            data_dir: data_dir.into(),
            sensor_addr: parse(DEFAULT_SENSOR_LISTEN),
            api_addr: parse(DEFAULT_API_LISTEN),
            retention: chrono::Duration::days(30),
            insecure: false,
            allow_plaintext_remote: false,
            advertise: Vec::new(),
            outbox: OutboxConfig::default(),
        }
    }
}

/// Why the collector could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the store in {0}")]
    Store(PathBuf, #[source] StoreError),
    #[error("cannot listen on {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error(
        "{0} is not a loopback address and --insecure turns TLS off; pass --allow-plaintext-remote to accept that risk"
    )]
    PlaintextRemote(SocketAddr),
    #[error("cannot set up the collector CA or server certificate")]
    Pki(#[from] crate::pki::PkiError),
    #[error("cannot set up TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error("server error")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Http(#[from] crate::outbox::HttpClientError),
}

/// The collector's parts, wired together; tests build this in-process.
pub struct Collector {
    pub store: Arc<dyn Store>,
    pub registry: Arc<RegistryHandle>,
    pub ingestor: Arc<Ingestor>,
    pub hosts: Arc<Hosts>,
    pub clock: Arc<dyn Clock>,
}

impl Collector {
    /// Opens the store in `data_dir` and wires ingest, registry and API to it.
    pub fn open(data_dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, ServeError> {
        let err = |e| ServeError::Store(data_dir.to_owned(), e);
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data_dir).map_err(err)?);
        let registry = Arc::new(RegistryHandle::load(store.clone(), clock.clone()).map_err(err)?);
        let log_path = data_dir.join(ALERTS_FILE);
        let log = AlertLog::open(&log_path).map_err(|e| ServeError::Write(log_path, e))?;
        let ingestor = Arc::new(
            Ingestor::new(store.clone(), registry.clone(), clock.clone(), Some(log))
                .map_err(err)?,
        );
        let hosts = Arc::new(Hosts::load(store.clone()).map_err(err)?);
        Ok(Self { store, registry, ingestor, hosts, clock })
    }

    /// The API service over this collector (join tokens and host revocation through `enroller`).
    pub fn api(&self, enroller: Option<Arc<Enroller>>) -> Api {
        let api = Api::new(self.store.clone(), self.registry.clone(), self.clock.clone());
        match enroller {
            Some(e) => api.with_enrollment(e, self.hosts.clone()),
            None => api,
        }
    }

    /// The delivery worker over this collector's outbox.
    pub fn dispatcher(&self, config: OutboxConfig) -> Result<Dispatcher, ServeError> {
        let dispatcher =
            Dispatcher::new(self.store.clone(), self.registry.clone(), self.clock.clone(), config)?;
        Ok(dispatcher.with_wake(self.ingestor.new_alerts_signal()))
    }

    /// Makes sure `DATA/admin.token` holds a valid admin token; creates one when it does not.
    /// Returns whether a new token was created.
    pub fn ensure_admin_token(&self, data_dir: &Path) -> Result<bool, ServeError> {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        if let Ok(existing) = std::fs::read_to_string(&path)
            && self.store.token(&auth::hash_secret(existing.trim())).ok().flatten().is_some()
        {
            return Ok(false);
        }
        let secret = auth::new_secret();
        let record = TokenRecord {
            id: 0,
            name: "admin".into(),
            role: Role::Admin,
            team: None,
            created: self.clock.now(),
            expires: None,
        };
        self.store
            .put_token(&record, &auth::hash_secret(&secret))
            .map_err(|e| ServeError::Store(data_dir.to_owned(), e))?;
        write_private(&path, &format!("{secret}\n")).map_err(|e| ServeError::Write(path, e))?;
        Ok(true)
    }
}

/// Writes a file readable by its owner only (mode 0600), replacing it atomically.
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// A collector that is running: where it listens, and its parts (tests reach into them).
pub struct Running {
    pub sensor_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub store: Arc<dyn Store>,
    pub hosts: Arc<Hosts>,
    pub enroller: Arc<Enroller>,
    pub pki: Arc<Pki>,
    done: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// Waits until the collector has stopped (after `shutdown` is cancelled, or a listener failed).
    pub async fn wait(self) -> Result<(), ServeError> {
        self.done
            .await
            .map_err(|e| ServeError::Write(PathBuf::from("."), std::io::Error::other(e)))?
    }
}

/// The address clients should dial for a listening address (loopback for a wildcard).
fn dial_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// Runs the collector until `shutdown` is cancelled. Prints where everything is.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    start(config, shutdown).await?.wait().await
}

/// Starts the collector: opens the store, the CA and both listeners, and returns once they
/// accept connections. It runs until `shutdown` is cancelled.
pub async fn start(
    config: ServeConfig,
    shutdown: CancellationToken,
) -> Result<Running, ServeError> {
    if config.insecure && !config.sensor_addr.ip().is_loopback() && !config.allow_plaintext_remote {
        return Err(ServeError::PlaintextRemote(config.sensor_addr));
    }
    let data = config.data_dir.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (collector, pki) = {
        let (data, clock, advertise) = (data.clone(), clock.clone(), config.advertise.clone());
        tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
            let collector = Collector::open(&data, clock)?;
            let pki = Pki::load_or_create(&data, &advertise)?;
            Ok((collector, Arc::new(pki)))
        })
        .await
        .map_err(|e| ServeError::Write(config.data_dir.clone(), std::io::Error::other(e)))??
    };
    let created = collector.ensure_admin_token(&data)?;
    let enroller =
        Arc::new(Enroller::new(pki.clone(), collector.hosts.clone(), collector.clock.clone()));

    let sensor_listener = TcpListener::bind(config.sensor_addr)
        .await
        .map_err(|e| ServeError::Bind(config.sensor_addr, e))?;
    let api_listener = TcpListener::bind(config.api_addr)
        .await
        .map_err(|e| ServeError::Bind(config.api_addr, e))?;
    let sensor_addr =
        sensor_listener.local_addr().map_err(|e| ServeError::Bind(config.sensor_addr, e))?;
    let api_addr = api_listener.local_addr().map_err(|e| ServeError::Bind(config.api_addr, e))?;
    let sensor_scheme = if config.insecure { "http" } else { "https" };
    for (file, scheme, addr) in
        [(API_ADDR_FILE, "https", api_addr), (SENSOR_ADDR_FILE, sensor_scheme, sensor_addr)]
    {
        // Written aside and renamed into place: a CLI reading it meanwhile sees the old
        // address or the new one, never a half-written file.
        let path = data.join(file);
        let partial = data.join(format!("{file}.partial"));
        std::fs::write(&partial, format!("{scheme}://{}\n", dial_addr(addr)))
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| ServeError::Write(path, e))?;
    }

    println!("keywatch collector {}", env!("CARGO_PKG_VERSION"));
    println!(
        "  data dir     {} (SQLite keywatch.db, WAL; events kept {} days)",
        data.display(),
        config.retention.num_days()
    );
    println!(
        "  CA           {} (sha256 {})",
        data.join(pki::CA_DIR).join(pki::CA_CERT_FILE).display(),
        pki.ca_fingerprint()
    );
    if config.insecure {
        println!(
            "  sensors      http://{sensor_addr}  (PLAINTEXT: --insecure; no enrollment check)"
        );
    } else {
        println!(
            "  sensors      https://{sensor_addr}  (mTLS; enroll with `keywatch token create --role sensor`)"
        );
    }
    println!(
        "  api          https://{api_addr}  (written to {})",
        data.join(API_ADDR_FILE).display()
    );
    println!(
        "  admin token  {} (mode 0600{}; the CLI reads it when run next to the data dir)",
        data.join(ADMIN_TOKEN_FILE).display(),
        if created { ", created now" } else { "" }
    );
    println!("  alerts       {} (one JSON line per new alert)", data.join(ALERTS_FILE).display());

    let tracker = TaskTracker::new();
    let peer: Arc<dyn PeerIdentity> = if config.insecure {
        Arc::new(TrustHello)
    } else {
        Arc::new(MtlsPeers::new(collector.hosts.clone()))
    };
    let sensor_svc = SensorIngest::new(collector.ingestor.clone(), peer)
        .with_enroller(enroller.clone())
        .with_shutdown(shutdown.clone())
        .into_server();
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<SensorServer>().await;
    let api_svc = api_server(collector.api(Some(enroller.clone())));
    let builder = || {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
    };
    let stop = shutdown.clone();
    let sensor_router = builder().add_service(health_svc.clone()).add_service(sensor_svc);
    let sensor_task = if config.insecure {
        tracing::warn!(addr = %sensor_addr, "INSECURE: the sensor port is plaintext; host ids are not authenticated and events travel in clear");
        let stop2 = shutdown.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop2.cancelled() => break,
                    _ = tick.tick() => tracing::warn!(addr = %sensor_addr, "INSECURE: the sensor port is still plaintext (--insecure)"),
                }
            }
        });
        let incoming = tls::plain_incoming(sensor_listener, shutdown.clone());
        tracker.spawn(
            sensor_router
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        )
    } else {
        let incoming =
            tls::incoming(sensor_listener, tls::server_config(&pki, true)?, shutdown.clone());
        tracker.spawn(
            sensor_router
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        )
    };
    let stop = shutdown.clone();
    let api_incoming =
        tls::incoming(api_listener, tls::server_config(&pki, false)?, shutdown.clone());
    let api_task = tracker.spawn(
        builder()
            .add_service(health_svc)
            .add_service(api_svc)
            .serve_with_incoming_shutdown(api_incoming, async move { stop.cancelled().await }),
    );
    // Deliveries and escalation timers; what a stop interrupts stays in the outbox.
    tracker.spawn(collector.dispatcher(config.outbox.clone())?.run(shutdown.clone()));
    let (store, stop, retention) = (collector.store.clone(), shutdown.clone(), config.retention);
    let (clock2, hosts) = (clock.clone(), collector.hosts.clone());
    tracker.spawn(async move {
        let mut prune = tokio::time::interval(Duration::from_secs(3_600));
        // Another replica sharing the store may have enrolled or revoked hosts.
        let mut refresh = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = refresh.tick() => {
                    let hosts = hosts.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || hosts.refresh()).await {
                        tracing::warn!(error = %e, "cannot re-read enrollments");
                    }
                }
                _ = prune.tick() => {
                    let (store, cutoff) = (store.clone(), clock2.now() - retention);
                    match tokio::task::spawn_blocking(move || store.prune(cutoff)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, "retention: pruned old events"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "retention: pruning failed"),
                        _ => {}
                    }
                }
            }
        }
    });
    tracker.close();
    let (store, hosts) = (collector.store.clone(), collector.hosts.clone());
    let done = tokio::spawn(async move {
        let result = tokio::select! {
            r = sensor_task => r,
            r = api_task => r,
        };
        health.set_not_serving::<SensorServer>().await;
        shutdown.cancel();
        // Streams finish the batch they are storing; give them a bounded time.
        if tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await.is_err() {
            tracing::warn!("some connections did not close within 30 s");
        }
        match result {
            Ok(r) => Ok(r?),
            Err(e) => Err(ServeError::Write(data, std::io::Error::other(e))),
        }
    });
    Ok(Running { sensor_addr, api_addr, store, hosts, enroller, pki, done })
}

type SensorServer = keywatch_proto::v1::sensor_service_server::SensorServiceServer<SensorIngest>;
