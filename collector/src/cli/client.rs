//! Finding and calling the collector's API from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use keywatch_proto::v1::api_service_client::ApiServiceClient;
use tonic::{
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::serve::{ADMIN_TOKEN_FILE, API_ADDR_FILE};

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
}

/// `--server` or `DATA/api.addr`; `--token`/`KEYWATCH_TOKEN` or `DATA/admin.token`.
pub fn resolve(
    server: Option<String>,
    token: Option<String>,
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
    Ok(Target { server, token })
}

/// Connects to the API.
pub async fn connect(target: &Target) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(target.server.clone())
        .with_context(|| format!("invalid server address {:?}", target.server))?
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach the collector at {} (is `keywatch serve` running?)",
                target.server
            )
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
