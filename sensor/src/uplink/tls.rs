//! TLS for the uplink: the two ways the sensor checks the collector, and the connector tonic
//! dials through.
//!
//! - Enrollment ([`pinned_ca_config`]): the sensor has no CA yet, only the join token's
//!   fingerprint. The collector presents its chain; the certificate whose DER SHA-256 equals the
//!   fingerprint becomes the only root the leaf is validated against (webpki, per connection).
//! - Afterwards ([`mtls_config`]): the stored CA is the only root, and the sensor presents its
//!   enrolled certificate.

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use hyper_util::rt::TokioIo;
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};
use tonic::transport::{Channel, Endpoint};

/// The crypto the sensor uses (ring: no C toolchain needed to build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Lowercase hex SHA-256 of a certificate's DER: the `ca_fp` of a join token.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the last handshake with a [`PinnedCaVerifier`] failed, when it was the fingerprint.
pub type MismatchSlot = Arc<Mutex<Option<String>>>;

/// Accepts the collector when its chain holds the CA the join token names, and the leaf
/// validates against that CA alone.
pub struct PinnedCaVerifier {
    ca_fp: String,
    provider: Arc<CryptoProvider>,
    mismatch: MismatchSlot,
}

impl fmt::Debug for PinnedCaVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCaVerifier").field("ca_fp", &self.ca_fp).finish_non_exhaustive()
    }
}

impl PinnedCaVerifier {
    pub fn new(ca_fp: &str, provider: Arc<CryptoProvider>) -> (Self, MismatchSlot) {
        let mismatch = MismatchSlot::default();
        (Self { ca_fp: ca_fp.to_ascii_lowercase(), provider, mismatch: mismatch.clone() }, mismatch)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = std::iter::once(end_entity)
            .chain(intermediates)
            .find(|c| fingerprint(c.as_ref()) == self.ca_fp);
        let Some(ca) = ca else {
            let message = format!(
                "collector's CA does not match the join token (expected fingerprint {})",
                self.ca_fp
            );
            *self.mismatch.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
            return Err(rustls::Error::General(message));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("collector CA: {e}")))?;
        let rest: Vec<CertificateDer<'_>> =
            intermediates.iter().filter(|c| *c != ca).cloned().collect();
        inner.verify_server_cert(end_entity, &rest, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS setup problem (bad stored files, unusable key).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("{0}")]
    Pem(String),
}

fn with_alpn(mut config: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The enrollment config: no client certificate, the server checked against `ca_fp`.
pub fn pinned_ca_config(
    ca_fp: &str,
) -> Result<(Arc<rustls::ClientConfig>, MismatchSlot), TlsError> {
    let provider = provider();
    let (verifier, slot) = PinnedCaVerifier::new(ca_fp, provider.clone());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { what: "TLS versions", source })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((with_alpn(config), slot))
}

/// The mTLS config: `ca_pem` the only root, `cert_pem`/`key_pem` the sensor's identity.
pub fn mtls_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Pem(format!("ca.pem: {e}")))?;
        roots.add(cert).map_err(|source| TlsError::Rustls { what: "ca.pem", source })?;
    }
    if roots.is_empty() {
        return Err(TlsError::Pem("ca.pem holds no certificate".into()));
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("cert.pem: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Pem("cert.pem holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(format!("key.pem: {e}")))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls { what: "TLS versions", source })?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| TlsError::Rustls { what: "client certificate", source })?;
    Ok(with_alpn(config))
}

/// Where the collector is: the address to dial and the name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` as given.
    pub authority: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Target {
    /// Parses `https://HOST:PORT`, `http://HOST:PORT` or `HOST:PORT` (TLS unless `insecure`).
    pub fn parse(url: &str, insecure: bool) -> Result<Self, String> {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, url),
        };
        let tls = match scheme {
            Some("https") | None => !insecure,
            Some("http") if insecure => false,
            Some("http") => {
                return Err(format!(
                    "{url}: plaintext needs --insecure (and the collector started with --insecure)"
                ));
            }
            Some(other) => return Err(format!("{url}: unknown scheme {other:?}; use https://")),
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            return Err(format!("{url}: expected HOST:PORT, without a path"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| format!("{url}: bad port {p:?}"))?)
            }
            _ => (authority, crate::uplink::DEFAULT_PORT),
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let authority =
            if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Ok(Self { authority, host, port, tls })
    }

    fn server_name(&self) -> Result<ServerName<'static>, String> {
        ServerName::try_from(self.host.clone())
            .map_err(|e| format!("{}: not a valid TLS server name: {e}", self.host))
    }

    /// A channel to the collector: plaintext, or TLS with `config`. The handshake happens on
    /// the first request.
    pub fn channel(
        &self,
        config: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Channel, tonic::transport::Error> {
        // The scheme is http: TLS, when on, is done by the connector below, not by tonic.
        let endpoint = Endpoint::from_shared(format!("http://{}", self.authority))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(std::time::Duration::from_secs(20))
            .keep_alive_timeout(std::time::Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let Some(config) = config else {
            return Ok(endpoint.connect_lazy());
        };
        let authority = self.authority.clone();
        let name = self.server_name();
        let connector = tower::service_fn(move |_: http::Uri| {
            let (authority, name, config) = (authority.clone(), name.clone(), config.clone());
            async move {
                let name = name.map_err(std::io::Error::other)?;
                let tcp = tokio::net::TcpStream::connect(&authority).await?;
                tcp.set_nodelay(true)?;
                let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("https://collector.example:7480", false).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("collector.example", 7480, true));
        let t = Target::parse("127.0.0.1:9000", false).unwrap();
        assert_eq!((t.authority.as_str(), t.tls), ("127.0.0.1:9000", true));
        let t = Target::parse("http://127.0.0.1:9000", true).unwrap();
        assert!(!t.tls);
        let t = Target::parse("https://[::1]:7480/", false).unwrap();
        assert_eq!((t.host.as_str(), t.authority.as_str()), ("::1", "[::1]:7480"));
        let t = Target::parse("https://10.0.0.1", false).unwrap();
        assert_eq!(t.port, crate::uplink::DEFAULT_PORT);
        assert!(Target::parse("http://127.0.0.1:9000", false).unwrap_err().contains("--insecure"));
        assert!(Target::parse("ftp://x:1", false).is_err());
        assert!(Target::parse("https://x:port", false).is_err());
    }

    #[test]
    fn fingerprint_is_lowercase_hex_sha256() {
        assert_eq!(
            fingerprint(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
