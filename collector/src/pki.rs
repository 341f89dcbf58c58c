//! The collector's certificate authority: created once in `DATA/ca/`, it issues the server
//! certificate (anew at every start) and signs the client certificates sensors ask for when they
//! enroll. ECDSA P-256 throughout.

use std::{
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};

/// Files under the data directory.
pub const CA_DIR: &str = "ca";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const TLS_DIR: &str = "tls";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";

/// How long certificates live.
const CA_DAYS: i64 = 3_650;
const LEAF_DAYS: i64 = 365;
/// A client certificate's SAN URI is this prefix and the host id.
pub const HOST_URI_PREFIX: &str = "urn:keywatch:host:";

/// PKI failures.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read or write {0}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("cannot create or use a certificate")]
    Cert(#[from] rcgen::Error),
    #[error("{0} holds no usable PEM certificate")]
    BadPem(PathBuf),
    #[error("the certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error(
        "host id {0:?} cannot go into a certificate (printable ASCII without spaces, 1 to 253 characters)"
    )]
    BadHostId(String),
}

/// The collector CA and the server certificate it issued.
pub struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// `[server leaf, CA]` as PEM, what the server presents.
    pub server_chain_pem: String,
    /// The server's private key, PEM.
    pub server_key_pem: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("ca_fp", &self.ca_fingerprint())
            .finish()
    }
}

/// A client certificate issued at enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub certificate_pem: String,
    /// Serial as lowercase hex without leading zero bytes (as [`serial_hex`] prints it).
    pub serial: String,
}

/// Lowercase hex SHA-256 of DER bytes: a certificate's fingerprint.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// A serial number as lowercase hex, leading zero bytes dropped, so rcgen's serial and the one
/// x509-parser reads back compare equal.
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a host id can be a certificate CN and part of a URI SAN.
pub fn valid_host_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 253 && id.bytes().all(|b| b.is_ascii_graphic())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |e| PkiError::Io(path.to_owned(), e)
}

/// Creates `dir` with mode 0700 (and tightens an existing one).
fn private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// Writes `content` to `path` atomically with `mode`.
fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(content.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive and without a leading zero byte, so every representation agrees.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keywatch");
    dn.push(DnType::CommonName, cn);
    dn
}

/// The machine's hostname, if it has one.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    std::str::from_utf8(&buf[..end]).ok().map(str::to_owned).filter(|h| !h.is_empty())
}

impl Pki {
    /// Loads the CA from `DATA/ca/`, creating it on first use, and issues a fresh server
    /// certificate into `DATA/tls/` for localhost, 127.0.0.1, ::1, the hostname and `advertise`.
    pub fn load_or_create(data_dir: &Path, advertise: &[String]) -> Result<Self, PkiError> {
        let ca_dir = data_dir.join(CA_DIR);
        private_dir(&ca_dir)?;
        let (cert_path, key_path) = (ca_dir.join(CA_CERT_FILE), ca_dir.join(CA_KEY_FILE));
        if !cert_path.exists() || !key_path.exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = dn("keywatch collector CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(CA_DAYS);
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key)?;
            write_file(&key_path, &key.serialize_pem(), 0o600)?;
            write_file(&cert_path, &cert.pem(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "created the collector CA");
        }
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&key_path))?;
        let ca_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let ca_der = first_cert_der(&ca_pem).ok_or_else(|| PkiError::BadPem(cert_path.clone()))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)?;

        let tls_dir = data_dir.join(TLS_DIR);
        private_dir(&tls_dir)?;
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("keywatch collector");
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        names.extend(hostname());
        names.extend(advertise.iter().cloned());
        let mut sans = Vec::new();
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(LEAF_DAYS);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let server = params.signed_by(&server_key, &issuer)?;
        let server_chain_pem = format!("{}{}", server.pem(), ca_pem);
        let server_key_pem = server_key.serialize_pem();
        write_file(&tls_dir.join(SERVER_KEY_FILE), &server_key_pem, 0o600)?;
        write_file(&tls_dir.join(SERVER_CERT_FILE), &server_chain_pem, 0o644)?;
        Ok(Self { ca_pem, ca_der, issuer, server_chain_pem, server_key_pem, dir: data_dir.into() })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// Lowercase hex SHA-256 of the CA certificate's DER: the `ca_fp` of join tokens.
    pub fn ca_fingerprint(&self) -> String {
        fingerprint(&self.ca_der)
    }

    /// Signs a sensor's CSR: only its public key is taken (after checking the CSR's
    /// signature); subject `CN=host_id`, SAN URI `urn:keywatch:host:<host_id>`, EKU clientAuth,
    /// 365 days, random serial.
    pub fn sign_client_csr(&self, csr_pem: &str, host_id: &str) -> Result<Issued, PkiError> {
        if !valid_host_id(host_id) {
            return Err(PkiError::BadHostId(host_id.to_owned()));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(host_id);
        let uri = format!("{HOST_URI_PREFIX}{host_id}");
        params.subject_alt_names = vec![SanType::URI(
            uri.as_str().try_into().map_err(|_| PkiError::BadHostId(host_id.to_owned()))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(LEAF_DAYS);
        let serial = random_serial();
        let serial_text = serial_hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        Ok(Issued { certificate_pem: cert.pem(), serial: serial_text })
    }
}

/// The first certificate of a PEM text, as DER.
pub fn first_cert_der(pem_text: &str) -> Option<CertificateDer<'static>> {
    certs_from_pem(pem_text).into_iter().next()
}

/// Every certificate of a PEM text, as DER.
pub fn certs_from_pem(pem_text: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem_text.as_bytes()).filter_map(Result::ok).collect()
}

/// What a client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject CN: the host id.
    pub host_id: String,
    /// Serial, as [`serial_hex`] prints it.
    pub serial: String,
}

/// Reads CN and serial from a client certificate (already verified by rustls).
pub fn client_identity(der: &[u8]) -> Option<ClientIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let host_id = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(ClientIdentity { host_id, serial: serial_hex(cert.raw_serial()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_signs_csrs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(dir.path(), &["collector.example".into()]).expect("pki");
        let fp = pki.ca_fingerprint();
        assert_eq!(fp.len(), 64);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("ca")), 0o700);
        assert_eq!(mode(&dir.path().join("ca/ca.key")), 0o600);
        assert_eq!(mode(&dir.path().join("tls/server.key")), 0o600);
        assert_eq!(certs_from_pem(&pki.server_chain_pem).len(), 2);
        let again = Pki::load_or_create(dir.path(), &[]).expect("reload");
        assert_eq!(again.ca_fingerprint(), fp);

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut asked = CertificateParams::new(vec!["evil.example".into()]).expect("params");
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = asked.serialize_request(&key).expect("csr").pem().expect("pem");
        let issued = pki.sign_client_csr(&csr, "web-1").expect("sign");
        let der = first_cert_der(&issued.certificate_pem).expect("der");
        let id = client_identity(&der).expect("identity");
        assert_eq!(id, ClientIdentity { host_id: "web-1".into(), serial: issued.serial.clone() });
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert!(!cert.is_ca());
        let sans = cert.subject_alternative_name().expect("san").expect("present");
        assert_eq!(format!("{:?}", sans.value.general_names), "[URI(\"urn:keywatch:host:web-1\")]");
        assert!(pki.sign_client_csr("not a csr", "web-1").is_err());
        assert!(pki.sign_client_csr(&csr, "has space").is_err());
    }
}
