//! `keywatch serve`: the embedded collector — SQLite under the data directory, the sensor
//! endpoint and the API endpoint, both on loopback unless told otherwise.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    api::{Api, api_server},
    auth::{self, Role, TokenRecord},
    clock::{Clock, SystemClock},
    ingest::{AlertLog, Ingestor, PeerIdentity, TrustHello, sensor_server},
    registry::RegistryHandle,
    store::{Store, StoreError, sqlite::SqliteStore},
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

/// TLS material for one endpoint (the enrollment/mTLS work fills this in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that client certificates must chain to (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// One listening endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    /// `None`: plaintext, allowed on loopback only unless `allow_plaintext_remote`.
    pub tls: Option<TlsFiles>,
}

/// Everything `serve` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub sensor: Listen,
    pub api: Listen,
    /// Events older than this are deleted (alerts are kept).
    pub retention: chrono::Duration,
    /// Allow plaintext on non-loopback addresses (tokens and events then cross the network in clear).
    pub allow_plaintext_remote: bool,
}

impl ServeConfig {
    /// Defaults for a data directory: loopback endpoints, 30 days of events.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let parse = |s: &str| s.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            data_dir: data_dir.into(),
            sensor: Listen { addr: parse(DEFAULT_SENSOR_LISTEN), tls: None },
            api: Listen { addr: parse(DEFAULT_API_LISTEN), tls: None },
            retention: chrono::Duration::days(30),
            allow_plaintext_remote: false,
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
        "{0} is not a loopback address and TLS is not configured; pass --allow-plaintext-remote to accept that risk"
    )]
    PlaintextRemote(SocketAddr),
    #[error("TLS on {0} is not available in this build yet")]
    TlsUnavailable(SocketAddr),
    #[error("server error")]
    Transport(#[from] tonic::transport::Error),
}

/// The collector's parts, wired together; tests build this in-process.
pub struct Collector {
    pub store: Arc<dyn Store>,
    pub registry: Arc<RegistryHandle>,
    pub ingestor: Arc<Ingestor>,
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
        Ok(Self { store, registry, ingestor, clock })
    }

    /// The API service over this collector.
    pub fn api(&self) -> Api {
        Api::new(self.store.clone(), self.registry.clone(), self.clock.clone())
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

fn check_listen(l: &Listen, allow_remote: bool) -> Result<(), ServeError> {
    if l.tls.is_some() {
        return Err(ServeError::TlsUnavailable(l.addr));
    }
    if !l.addr.ip().is_loopback() && !allow_remote {
        return Err(ServeError::PlaintextRemote(l.addr));
    }
    Ok(())
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

/// Runs the collector until `shutdown` is cancelled. Prints where everything is.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    check_listen(&config.sensor, config.allow_plaintext_remote)?;
    check_listen(&config.api, config.allow_plaintext_remote)?;
    let data = config.data_dir.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let collector = {
        let (data, clock) = (data.clone(), clock.clone());
        tokio::task::spawn_blocking(move || Collector::open(&data, clock))
            .await
            .map_err(|e| ServeError::Write(config.data_dir.clone(), std::io::Error::other(e)))??
    };
    let created = collector.ensure_admin_token(&data)?;

    let sensor_listener = TcpListener::bind(config.sensor.addr)
        .await
        .map_err(|e| ServeError::Bind(config.sensor.addr, e))?;
    let api_listener = TcpListener::bind(config.api.addr)
        .await
        .map_err(|e| ServeError::Bind(config.api.addr, e))?;
    let sensor_addr =
        sensor_listener.local_addr().map_err(|e| ServeError::Bind(config.sensor.addr, e))?;
    let api_addr = api_listener.local_addr().map_err(|e| ServeError::Bind(config.api.addr, e))?;
    for (file, addr) in [(API_ADDR_FILE, api_addr), (SENSOR_ADDR_FILE, sensor_addr)] {
        let path = data.join(file);
        std::fs::write(&path, format!("http://{addr}\n"))
            .map_err(|e| ServeError::Write(path, e))?;
    }

    println!("keywatch collector {}", env!("CARGO_PKG_VERSION"));
    println!(
        "  data dir     {} (SQLite keywatch.db, WAL; events kept {} days)",
        data.display(),
        config.retention.num_days()
    );
    println!("  sensors      http://{sensor_addr}  (plaintext; TLS and enrollment not configured)");
    println!(
        "  api          http://{api_addr}  (written to {})",
        data.join(API_ADDR_FILE).display()
    );
    println!(
        "  admin token  {} (mode 0600{}; the CLI reads it when run next to the data dir)",
        data.join(ADMIN_TOKEN_FILE).display(),
        if created { ", created now" } else { "" }
    );
    println!("  alerts       {} (one JSON line per new alert)", data.join(ALERTS_FILE).display());

    let tracker = TaskTracker::new();
    let peer: Arc<dyn PeerIdentity> = Arc::new(TrustHello);
    let sensor_svc = sensor_server(collector.ingestor.clone(), peer);
    let api_svc = api_server(collector.api());
    let stop = shutdown.clone();
    let sensor_task = tracker.spawn(
        tonic::transport::Server::builder()
            .add_service(sensor_svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(sensor_listener), async move {
                stop.cancelled().await
            }),
    );
    let stop = shutdown.clone();
    let api_task = tracker.spawn(
        tonic::transport::Server::builder()
            .add_service(api_svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(api_listener), async move {
                stop.cancelled().await
            }),
    );
    let (store, stop, retention) = (collector.store.clone(), shutdown.clone(), config.retention);
    let clock2 = clock.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3_600));
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
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
    let result = tokio::select! {
        r = sensor_task => r,
        r = api_task => r,
    };
    shutdown.cancel();
    tracker.wait().await;
    match result {
        Ok(r) => Ok(r?),
        Err(e) => Err(ServeError::Write(data, std::io::Error::other(e))),
    }
}
