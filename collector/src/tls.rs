//! TLS for both listeners (rustls with the ring provider): the server presents `[leaf, CA]`;
//! on the sensor port a client certificate is optional at the handshake (enrollment has none) and,
//! when present, must chain to the collector CA. Handshakes run concurrently, each bounded in
//! time, so a slow or plaintext client cannot hold up the others.

use std::{sync::Arc, time::Duration};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject as _};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::pki::{self, Pki};

/// How long a client may take to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot read a PEM key")]
    Pem(#[from] rustls_pki_types::pem::Error),
}

/// The crypto provider everything here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration: chain `[leaf, CA]`, ALPN h2; with `client_auth`, a client certificate
/// is verified against the CA when the client offers one (optional at the handshake).
pub fn server_config(pki: &Pki, client_auth: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain = pki::certs_from_pem(&pki.server_chain_pem);
    let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes())?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if client_auth {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_der().clone())?;
        let verifier: Arc<dyn ClientCertVerifier> =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()?;
        builder.with_client_cert_verifier(verifier).with_single_cert(chain, key)?
    } else {
        builder.with_no_client_auth().with_single_cert(chain, key)?
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and yields those that complete the TLS handshake; failed handshakes
/// (plaintext clients, unknown client certificates) are logged and dropped. Stops accepting
/// when `shutdown` is cancelled.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else { break };
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts plaintext TCP connections (`--insecure`) until `shutdown` is cancelled.
pub fn plain_incoming(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TcpStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    if tx.send(Ok(tcp)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
