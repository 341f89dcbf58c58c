//! Finding and calling the collector's API from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use keywatch_proto::v1::api_service_client::ApiServiceClient;
use tonic::{
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig},
};

use crate::{
    pki::{CA_CERT_FILE, CA_DIR},
    serve::{ADMIN_TOKEN_FILE, API_ADDR_FILE},
};

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// The API client the CLI uses.
pub type Client = ApiServiceClient<InterceptedService<Channel, Bearer>>;

/// Where to connect and with which token.
#[derive(Debug, Clone)]
pub struct Target {
    pub server: String,
    pub token: String,
    /// CA certificate to trust for an https:// server.
    pub ca: Option<PathBuf>,
}

/// `--server` or `DATA/api.addr`; `--token`/`KEYWATCH_TOKEN` or `DATA/admin.token`;
/// `--ca`/`KEYWATCH_CA` or `DATA/ca/ca.pem` when it exists.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
    ca: Option<PathBuf>,
    data: &Path,
) -> anyhow::Result<Target> {
    let read = |file: &str| -> anyhow::Result<String> {
        let path: PathBuf = data.join(file);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}; start `keywatch serve --data {}` first, or pass --server/--token (or --data DIR)",
                path.display(),
                data.display()
            )
        })?;
        Ok(text.trim().to_owned())
    };
    let server = match server {
        Some(s) => s,
        None => read(API_ADDR_FILE)?,
    };
    let token = match token {
        Some(t) => t,
        None => read(ADMIN_TOKEN_FILE)?,
    };
    if token.is_empty() {
        bail!("the token is empty");
    }
    let ca = ca.or_else(|| Some(data.join(CA_DIR).join(CA_CERT_FILE)).filter(|p| p.exists()));
    Ok(Target { server, token, ca })
}

/// Connects to the API.
pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    let mut endpoint = Channel::from_shared(target.server.clone())
        .with_context(|| format!("invalid server address {:?}", target.server))?;
    if target.server.starts_with("https://") {
        let Some(ca) = &target.ca else {
            bail!(
                "{} uses TLS: pass --ca FILE (the collector's DATA/ca/ca.pem) or --data DIR",
                target.server
            );
        };
        let pem = std::fs::read_to_string(ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .context("TLS configuration")?;
    }
    let channel = endpoint.connect().await.with_context(|| {
        format!("cannot reach the collector at {} (is `keywatch serve` running?)", target.server)
    })?;
    let value: MetadataValue<_> = format!("Bearer {}", target.token)
        .parse()
        .context("the token contains characters not allowed in a header")?;
    Ok(ApiServiceClient::with_interceptor(channel, Bearer(value))
        .max_decoding_message_size(64 * 1024 * 1024))
}

/// Turns a gRPC status into a one-line error for people.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let what = match status.code() {
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        Code::NotFound => "not found",
        Code::InvalidArgument => "invalid request",
        Code::FailedPrecondition => "refused",
        Code::Unavailable => "collector unavailable",
        _ => "collector error",
    };
    anyhow::anyhow!("{what}: {}", status.message())
}
