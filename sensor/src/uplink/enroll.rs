//! Enrollment: a join token and a CSR exchanged for a client certificate, kept in the state
//! directory so restarts need no token.
//!
//! State directory (mode 0700): `key.pem` (ECDSA P-256, PKCS#8), `cert.pem` (the certificate
//! the collector issued for this host id), `ca.pem` (the collector's CA, checked against the
//! token's fingerprint); files 0600. `policy.json` and `spool/` live there too.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use keywatch_proto::v1 as pb;

use super::tls::{self, Target};

/// Prefix of every join token.
const TOKEN_PREFIX: &str = "kwj1";

/// A join token: `kwj1.<id>.<secret>.<ca_fp>`, where `ca_fp` is the lowercase hex SHA-256 of
/// the collector CA's DER. `keywatch token create --role sensor` prints one.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    raw: String,
    /// The CA fingerprint the collector must present.
    pub ca_fp: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("JoinToken").field("ca_fp", &self.ca_fp).finish_non_exhaustive()
    }
}

impl std::str::FromStr for JoinToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let parts: Vec<&str> = s.split('.').collect();
        let expected = "expected kwj1.<id>.<secret>.<ca-fingerprint>, as printed by \
                        `keywatch token create --role sensor`";
        if parts.len() != 4 || parts[0] != TOKEN_PREFIX {
            return Err(format!("malformed join token: {expected}"));
        }
        if parts[1].is_empty() || parts[2].is_empty() {
            return Err(format!("malformed join token (empty id or secret): {expected}"));
        }
        let fp = parts[3];
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!(
                "malformed join token: the CA fingerprint must be 64 lowercase hex digits; {expected}"
            ));
        }
        Ok(Self { raw: s.to_owned(), ca_fp: fp.to_owned() })
    }
}

/// Why enrollment or loading the identity failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("state directory {path} is not usable: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not enrolled: {dir} holds no certificate; give --join-token (from `keywatch token create --role sensor` on the collector)"
    )]
    NoIdentity { dir: PathBuf },
    #[error("{0}")]
    CaMismatch(String),
    #[error("the collector refused the enrollment: {message} ({code:?})")]
    Refused { code: tonic::Code, message: String },
    #[error("cannot reach the collector at {target} to enroll: {message}")]
    Unreachable { target: String, message: String },
    #[error("cannot create the key or CSR: {0}")]
    Key(String),
    #[error("stored identity in {dir}: {source}")]
    Tls {
        dir: PathBuf,
        #[source]
        source: tls::TlsError,
    },
}

impl EnrollError {
    /// Worth trying again later (the collector may come back); the others need an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// The sensor's enrolled identity, as PEM.
#[derive(Debug, Clone)]
pub struct Identity {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

const KEY: &str = "key.pem";
const CERT: &str = "cert.pem";
const CA: &str = "ca.pem";

/// Creates the state directory (0700) and checks it is writable.
pub fn prepare_state_dir(dir: &Path) -> Result<(), EnrollError> {
    let err = |source| EnrollError::StateDir { path: dir.to_owned(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    let probe = dir.join(".write-test");
    write_private(&probe, b"").map_err(err)?;
    fs::remove_file(&probe).map_err(err)?;
    Ok(())
}

/// Writes `bytes` to `path` (mode 0600) durably: a temporary file, fsync, rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The identity stored in `dir`, if the sensor enrolled before.
pub fn load_identity(dir: &Path) -> Result<Option<Identity>, EnrollError> {
    let read = |name: &str| match fs::read_to_string(dir.join(name)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EnrollError::StateDir { path: dir.join(name), source }),
    };
    match (read(KEY)?, read(CERT)?, read(CA)?) {
        (Some(key_pem), Some(cert_pem), Some(ca_pem)) => {
            Ok(Some(Identity { key_pem, cert_pem, ca_pem }))
        }
        _ => Ok(None),
    }
}

fn store_identity(dir: &Path, id: &Identity) -> Result<(), EnrollError> {
    // The certificate is written last: its presence means the identity is complete.
    for (name, content) in [(KEY, &id.key_pem), (CA, &id.ca_pem), (CERT, &id.cert_pem)] {
        write_private(&dir.join(name), content.as_bytes())
            .map_err(|source| EnrollError::StateDir { path: dir.join(name), source })?;
    }
    Ok(())
}

/// A fresh ECDSA P-256 key and a CSR for `host_id` (the CN and a DNS-style SAN).
pub fn key_and_csr(host_id: &str) -> Result<(String, String), EnrollError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, host_id);
    let csr = params.serialize_request(&key).map_err(|e| EnrollError::Key(e.to_string()))?;
    let csr_pem = csr.pem().map_err(|e| EnrollError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Enrolls with the collector at `target` and stores the identity in `dir`.
pub async fn enroll(
    target: &Target,
    token: &JoinToken,
    host_id: &str,
    dir: &Path,
) -> Result<Identity, EnrollError> {
    let (config, mismatch) = tls::pinned_ca_config(&token.ca_fp)
        .map_err(|source| EnrollError::Tls { dir: dir.to_owned(), source })?;
    let (key_pem, csr_pem) = key_and_csr(host_id)?;
    let unreachable =
        |message: String| EnrollError::Unreachable { target: target.authority.clone(), message };
    let channel = target.channel(Some(config)).map_err(|e| unreachable(e.to_string()))?;
    let mut client = pb::sensor_service_client::SensorServiceClient::new(channel);
    let request =
        pb::EnrollRequest { token: token.raw.clone(), host_id: host_id.to_owned(), csr_pem };
    let response = match client.enroll(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Some(message) = mismatch.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(EnrollError::CaMismatch(message));
            }
            return Err(match status.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
                    unreachable(super::stream::status_text(&status))
                }
                code => EnrollError::Refused { code, message: status.message().to_owned() },
            });
        }
    };
    // The CA the collector hands back must be the one the token pinned.
    let ca_ok = {
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        CertificateDer::pem_slice_iter(response.ca_pem.as_bytes())
            .filter_map(Result::ok)
            .any(|c| tls::fingerprint(c.as_ref()) == token.ca_fp)
    };
    if !ca_ok {
        return Err(EnrollError::CaMismatch(format!(
            "the CA in the enrollment answer does not match the join token (expected fingerprint {})",
            token.ca_fp
        )));
    }
    let identity =
        Identity { key_pem, cert_pem: response.certificate_pem, ca_pem: response.ca_pem };
    // Refuse to store what cannot be used.
    tls::mtls_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)
        .map_err(|source| EnrollError::Tls { dir: dir.to_owned(), source })?;
    store_identity(dir, &identity)?;
    tracing::info!(host_id, state_dir = %dir.display(), "enrolled with the collector; restarts need no join token");
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn tokens_parse() {
        let t: JoinToken = format!("kwj1.abc.s3cret.{FP}").parse().unwrap();
        assert_eq!(t.ca_fp, FP);
        assert!(!format!("{t:?}").contains("s3cret"));
        for bad in [
            String::new(),
            "kwj1.abc.s3cret".into(),
            format!("kwj2.abc.s3cret.{FP}"),
            format!("kwj1..s3cret.{FP}"),
            format!("kwj1.abc.s3cret.{}", FP.to_uppercase()),
            "kwj1.abc.s3cret.1234".into(),
        ] {
            let err = bad.parse::<JoinToken>().unwrap_err();
            assert!(err.contains("malformed join token"), "{bad}: {err}");
        }
    }

    #[test]
    fn csr_is_pem() {
        let (key, csr) = key_and_csr("web-1").unwrap();
        assert!(key.contains("BEGIN PRIVATE KEY"), "{key}");
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"), "{csr}");
    }

    #[test]
    fn identity_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        prepare_state_dir(&state).unwrap();
        assert!(load_identity(&state).unwrap().is_none());
        let id = Identity { key_pem: "k".into(), cert_pem: "c".into(), ca_pem: "a".into() };
        store_identity(&state, &id).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        for f in [KEY, CERT, CA] {
            assert_eq!(mode(&state.join(f)), 0o600, "{f}");
        }
        assert_eq!(load_identity(&state).unwrap().unwrap().cert_pem, "c");
    }
}
