//! Join tokens (`kwj1.<id>.<secret>.<ca_fp>`) and `SensorService.Enroll`: a valid token and a
//! CSR become a client certificate bound to the host id.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use keywatch_proto::v1 as pb;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use tonic::Status;

use crate::{
    clock::Clock,
    hosts::{Hosts, JoinToken},
    pki::{Pki, PkiError},
    store::StoreError,
};

/// The token format's prefix (and version).
pub const PREFIX: &str = "kwj1";

/// A join token as handed to an operator: id, secret and the CA fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenText {
    /// 12 lowercase hex characters.
    pub id: String,
    /// 43 characters of base64url (32 bytes, no padding).
    pub secret: String,
    /// Lowercase hex SHA-256 of the CA certificate's DER.
    pub ca_fp: String,
}

impl fmt::Debug for JoinTokenText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinTokenText").field("id", &self.id).field("ca_fp", &self.ca_fp).finish()
    }
}

impl fmt::Display for JoinTokenText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_fp)
    }
}

/// Why a token string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed join token: {0}")]
pub struct MalformedToken(pub &'static str);

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for JoinTokenText {
    type Err = MalformedToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('.');
        if parts.next() != Some(PREFIX) {
            return Err(MalformedToken("it does not start with kwj1."));
        }
        let (Some(id), Some(secret), Some(ca_fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedToken("expected kwj1.<id>.<secret>.<ca_fp>"));
        };
        if !is_lower_hex(id, 12) {
            return Err(MalformedToken("the id must be 12 lowercase hex characters"));
        }
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(secret);
        if secret.len() != 43 || decoded.map(|d| d.len()) != Ok(32) {
            return Err(MalformedToken("the secret must be 43 base64url characters"));
        }
        if !is_lower_hex(ca_fp, 64) {
            return Err(MalformedToken("the CA fingerprint must be 64 lowercase hex characters"));
        }
        Ok(Self { id: id.into(), secret: secret.into(), ca_fp: ca_fp.into() })
    }
}

impl JoinTokenText {
    /// A fresh random token for the CA with fingerprint `ca_fp`.
    pub fn generate(ca_fp: &str) -> Self {
        let mut id = [0u8; 6];
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut id);
        rand::rng().fill_bytes(&mut secret);
        Self {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            secret: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
            ca_fp: ca_fp.to_owned(),
        }
    }

    /// SHA-256 of the secret, hex: what the store keeps.
    pub fn secret_hash(&self) -> String {
        Sha256::digest(self.secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What a new join token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJoinToken {
    pub labels: BTreeMap<String, String>,
    pub ttl: chrono::Duration,
    pub uses: u32,
    pub creator: String,
}

/// Enrollment: checks join tokens, signs CSRs, records hosts.
pub struct Enroller {
    pki: Arc<Pki>,
    hosts: Arc<Hosts>,
    clock: Arc<dyn Clock>,
}

impl Enroller {
    pub fn new(pki: Arc<Pki>, hosts: Arc<Hosts>, clock: Arc<dyn Clock>) -> Self {
        Self { pki, hosts, clock }
    }

    /// The CA fingerprint join tokens carry.
    pub fn ca_fingerprint(&self) -> String {
        self.pki.ca_fingerprint()
    }

    /// Creates and stores a join token; returns the token string and its record. Blocking.
    pub fn create_token(
        &self,
        store: &dyn crate::store::Store,
        new: NewJoinToken,
    ) -> Result<(JoinTokenText, JoinToken), StoreError> {
        let text = JoinTokenText::generate(&self.pki.ca_fingerprint());
        let now = self.clock.now();
        let record = JoinToken {
            id: text.id.clone(),
            role: "sensor".into(),
            labels: new.labels,
            created: now,
            expires: now + new.ttl,
            uses_left: new.uses,
            creator: new.creator,
            revoked: None,
        };
        store.put_join_token(&record, &text.secret_hash())?;
        Ok((text, record))
    }

    /// `SensorService.Enroll`. Blocking.
    pub fn enroll(&self, req: &pb::EnrollRequest) -> Result<pb::EnrollResponse, Status> {
        let token: JoinTokenText = req
            .token
            .parse()
            .map_err(|e: MalformedToken| Status::unauthenticated(e.to_string()))?;
        if token.ca_fp != self.pki.ca_fingerprint() {
            return Err(Status::unauthenticated("join token was issued for another collector CA"));
        }
        let issued = self.pki.sign_client_csr(&req.csr_pem, &req.host_id).map_err(|e| match e {
            PkiError::BadCsr(_) | PkiError::BadHostId(_) => Status::invalid_argument(e.to_string()),
            other => {
                tracing::error!(error = %other, "signing a client certificate failed");
                Status::internal("internal error")
            }
        })?;
        let now: DateTime<Utc> = self.clock.now();
        match self.hosts.enroll(&token.id, &token.secret_hash(), &req.host_id, &issued.serial, now)
        {
            Ok(e) => {
                tracing::info!(host = %e.host_id, serial = %e.serial, token = %token.id, labels = ?e.labels, "host enrolled");
                Ok(pb::EnrollResponse {
                    certificate_pem: issued.certificate_pem,
                    ca_pem: self.pki.ca_pem().to_owned(),
                })
            }
            Err(StoreError::JoinRefused(r)) => {
                tracing::warn!(host = %req.host_id, refusal = %r, "enrollment refused");
                Err(Status::unauthenticated(r.to_string()))
            }
            Err(StoreError::Closed) => Err(Status::unavailable("collector shutting down")),
            Err(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "recording an enrollment failed");
                Err(Status::unavailable("storage failed; retry"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_refusals() {
        let fp = "ab".repeat(32);
        let t = JoinTokenText::generate(&fp);
        let s = t.to_string();
        assert!(s.starts_with("kwj1."));
        assert_eq!(t.id.len(), 12);
        assert_eq!(t.secret.len(), 43);
        assert_eq!(s.parse::<JoinTokenText>(), Ok(t.clone()));
        for bad in [
            "",
            "kwj2.a.b.c",
            &s.replace("kwj1.", "kwj1.x"),
            &format!("kwj1.{}.{}.{}", t.id, "short", fp),
            &format!("kwj1.ABCDEF012345.{}.{}", t.secret, fp),
            &format!("{s}.extra"),
        ] {
            assert!(bad.parse::<JoinTokenText>().is_err(), "{bad} parsed");
        }
    }
}
