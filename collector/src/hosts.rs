//! Enrolled hosts: join tokens, enrollments, revocation, heartbeats and gaps — and the mTLS
//! [`PeerIdentity`] that binds a stream to the host its client certificate names.
//!
//! [`Hosts`] keeps the enrollments in memory (loaded from the store, updated by enroll and
//! revoke through it), so checking a stream's certificate never waits on storage, and a
//! revocation reaches open streams at once through [`Hosts::subscribe`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::Status;

use crate::{
    ingest::{AuthenticatedPeer, PeerIdentity},
    pki,
    store::{Store, StoreError},
};

/// A join token as stored (its secret only as a hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// 12 lowercase hex characters.
    pub id: String,
    /// The role it enrolls as (`sensor`).
    pub role: String,
    /// Labels every host enrolled with it gets.
    pub labels: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
    pub uses_left: u32,
    /// Who created it (the API token's actor).
    pub creator: String,
    pub revoked: Option<DateTime<Utc>>,
}

/// Why a join token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    #[error("unknown join token {0}")]
    Unknown(String),
    #[error("join token {0} does not match (forged?)")]
    Forged(String),
    #[error("join token {0} expired at {1}")]
    Expired(String, String),
    #[error("join token {0} has no uses left")]
    UsedUp(String),
    #[error("join token {0} was revoked")]
    Revoked(String),
}

/// A host's enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub host_id: String,
    /// Serial of its current certificate, lowercase hex.
    pub serial: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_at: DateTime<Utc>,
    /// The join token id it enrolled with.
    pub enrolled_by: String,
    pub revoked: Option<DateTime<Utc>>,
}

/// What one heartbeat reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    /// When it arrived.
    pub at: DateTime<Utc>,
    pub uptime_s: u64,
    /// Events the kernel could not queue, per kind, since the sensor started.
    pub kernel_lost: BTreeMap<String, u64>,
    pub spool_events: u64,
    pub spool_bytes: u64,
    /// Events evicted from a full spool since the sensor started.
    pub spool_evicted: u64,
}

impl HeartbeatRecord {
    /// Total kernel-lost events.
    pub fn kernel_lost_total(&self) -> u64 {
        self.kernel_lost.values().sum()
    }
}

/// Events a host lost, as a timeline entry of kind `gap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub host_id: String,
    pub time: DateTime<Utc>,
    /// `spool-evicted` or `kernel-lost`.
    pub cause: String,
    pub lost: u64,
}

impl Gap {
    /// One line for the timeline.
    pub fn summary(&self) -> String {
        match self.cause.as_str() {
            "spool-evicted" => {
                format!("{} event(s) lost: evicted from the sensor's full spool", self.lost)
            }
            "kernel-lost" => {
                format!("{} event(s) lost in the kernel (ring buffer full)", self.lost)
            }
            other => format!("{} event(s) lost ({other})", self.lost),
        }
    }
}

/// The gaps a heartbeat reveals, given the previous one of the same host. A lower uptime means
/// the sensor restarted and its counters started again from zero.
pub fn gaps_between(
    host_id: &str,
    previous: Option<&HeartbeatRecord>,
    now: &HeartbeatRecord,
) -> Vec<Gap> {
    let restarted = previous.is_none_or(|p| now.uptime_s < p.uptime_s);
    let grown =
        |before: u64, after: u64| if restarted { after } else { after.saturating_sub(before) };
    let mut gaps = Vec::new();
    let evicted = grown(previous.map_or(0, |p| p.spool_evicted), now.spool_evicted);
    if evicted > 0 {
        gaps.push(Gap {
            host_id: host_id.into(),
            time: now.at,
            cause: "spool-evicted".into(),
            lost: evicted,
        });
    }
    let lost =
        grown(previous.map_or(0, HeartbeatRecord::kernel_lost_total), now.kernel_lost_total());
    if lost > 0 {
        gaps.push(Gap { host_id: host_id.into(), time: now.at, cause: "kernel-lost".into(), lost });
    }
    gaps
}

/// One line of `keywatch hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSummary {
    pub host_id: String,
    /// Enrollment labels over the last Hello's.
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
    #[serde(default)]
    pub sensor_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatRecord>,
}

/// Enrollments in memory, kept in step with the store.
pub struct Hosts {
    store: Arc<dyn Store>,
    enrolled: RwLock<HashMap<String, Enrollment>>,
    changed: watch::Sender<u64>,
}

impl Hosts {
    /// Loads every enrollment.
    pub fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let enrolled = store.enrollments()?.into_iter().map(|e| (e.host_id.clone(), e)).collect();
        Ok(Self { store, enrolled: RwLock::new(enrolled), changed: watch::Sender::new(0) })
    }

    fn set(&self, e: Enrollment) {
        self.enrolled.write().unwrap_or_else(|e| e.into_inner()).insert(e.host_id.clone(), e);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Consumes one use of the token and records the host with `serial`, in one transaction.
    /// Blocking.
    pub fn enroll(
        &self,
        token_id: &str,
        secret_hash: &str,
        host_id: &str,
        serial: &str,
        at: DateTime<Utc>,
    ) -> Result<Enrollment, StoreError> {
        let e = self.store.enroll(token_id, secret_hash, host_id, serial, at)?;
        self.set(e.clone());
        let actor = crate::audit::Actor {
            token_id: None,
            name: format!("join token {token_id}"),
            role: "sensor".into(),
            team: None,
        };
        let details = serde_json::json!({"serial": e.serial, "labels": e.labels});
        let record = crate::audit::AuditRecord::new(
            at,
            "host-enrolled",
            actor,
            format!("host {host_id}"),
            details,
        );
        if let Err(err) = self.store.append_audit(vec![record]) {
            tracing::error!(error = %err, "cannot record the enrollment in the audit trail");
        }
        Ok(e)
    }

    /// Revokes a host: open streams end, new ones are refused. Blocking.
    pub fn revoke(&self, host_id: &str, at: DateTime<Utc>) -> Result<Enrollment, StoreError> {
        let e = self.store.revoke_host(host_id, at)?;
        self.set(e.clone());
        Ok(e)
    }

    /// Re-reads enrollments from the store (another replica may have changed them). Blocking.
    pub fn refresh(&self) -> Result<(), StoreError> {
        let fresh: HashMap<String, Enrollment> =
            self.store.enrollments()?.into_iter().map(|e| (e.host_id.clone(), e)).collect();
        let mut map = self.enrolled.write().unwrap_or_else(|e| e.into_inner());
        if *map != fresh {
            *map = fresh;
            drop(map);
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// The enrollment of a host.
    pub fn get(&self, host_id: &str) -> Option<Enrollment> {
        self.enrolled.read().unwrap_or_else(|e| e.into_inner()).get(host_id).cloned()
    }

    /// Ticks whenever an enrollment changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether a certificate with this host id and serial may stream now.
    pub fn check(&self, host_id: &str, serial: &str) -> Result<Enrollment, Status> {
        let e = self
            .get(host_id)
            .ok_or_else(|| Status::permission_denied(format!("host {host_id} is not enrolled")))?;
        if e.revoked.is_some() {
            return Err(Status::permission_denied(format!("host {host_id} is revoked")));
        }
        if e.serial != serial {
            return Err(Status::permission_denied(format!(
                "certificate of host {host_id} was replaced by a later enrollment"
            )));
        }
        Ok(e)
    }
}

/// mTLS: the host is the client certificate's CN, and must be enrolled with that serial and not
/// revoked.
pub struct MtlsPeers {
    hosts: Arc<Hosts>,
}

impl MtlsPeers {
    pub fn new(hosts: Arc<Hosts>) -> Self {
        Self { hosts }
    }
}

impl PeerIdentity for MtlsPeers {
    fn authenticated_host(
        &self,
        extensions: &tonic::Extensions,
    ) -> Result<Option<AuthenticatedPeer>, Status> {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let certs = extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("a client certificate is required; enroll first")
            })?;
        let id = pki::client_identity(&certs[0]).ok_or_else(|| {
            Status::unauthenticated("the client certificate names no host (no subject CN)")
        })?;
        let e = self.hosts.check(&id.host_id, &id.serial)?;
        Ok(Some(AuthenticatedPeer { host_id: id.host_id, serial: id.serial, labels: e.labels }))
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.hosts.subscribe())
    }

    fn recheck(&self, peer: &AuthenticatedPeer) -> Result<(), Status> {
        self.hosts.check(&peer.host_id, &peer.serial).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(uptime_s: u64, evicted: u64, lost: u64) -> HeartbeatRecord {
        HeartbeatRecord {
            at: DateTime::UNIX_EPOCH,
            uptime_s,
            kernel_lost: [("file-access".to_owned(), lost)].into_iter().collect(),
            spool_evicted: evicted,
            ..HeartbeatRecord::default()
        }
    }

    #[test]
    fn gaps_follow_counter_growth_and_restarts() {
        assert!(gaps_between("h", None, &beat(5, 0, 0)).is_empty());
        let g = gaps_between("h", Some(&beat(5, 0, 0)), &beat(10, 7, 0));
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].cause.as_str(), g[0].lost), ("spool-evicted", 7));
        assert!(gaps_between("h", Some(&beat(10, 7, 0)), &beat(15, 7, 0)).is_empty());
        // Restarted sensor: its counters begin again, so everything it reports is new.
        let g = gaps_between("h", Some(&beat(100, 7, 3)), &beat(2, 4, 1));
        assert_eq!(
            g.iter().map(|g| (g.cause.as_str(), g.lost)).collect::<Vec<_>>(),
            [("spool-evicted", 4), ("kernel-lost", 1)]
        );
    }
}
