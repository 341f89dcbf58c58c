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
    /// Events the kernel could not queue, per kind, since its counters were created (see
    /// `kernel_counters_id`).
    pub kernel_lost: BTreeMap<String, u64>,
    /// Names the kernel's counters, which outlive sensor restarts; empty when the sensor did
    /// not say (its kernel counters then count from its start).
    #[serde(default)]
    pub kernel_counters_id: String,
    pub spool_events: u64,
    pub spool_bytes: u64,
    /// Events evicted from a full spool since the sensor started.
    pub spool_evicted: u64,
    /// Events the sensor process lost since it started, per cause.
    #[serde(default)]
    pub sensor_lost: BTreeMap<String, u64>,
    /// Events held in the sensor's memory because its spool's disk is full (not lost yet).
    #[serde(default)]
    pub spool_held: u64,
    /// Events found damaged in the sensor's spool, over the spool's life.
    #[serde(default)]
    pub spool_corrupt_total: u64,
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
            "spool-corrupt" => {
                format!("{} event(s) lost: found damaged in the sensor's spool", self.lost)
            }
            "spool-write-error" => {
                format!("{} event(s) lost: the sensor could not write them to its spool", self.lost)
            }
            "rejected-by-collector" => {
                format!("{} event(s) lost: refused by the collector as malformed", self.lost)
            }
            other => format!("{} event(s) lost ({other})", self.lost),
        }
    }
}

/// The gaps a heartbeat reveals, given the previous one of the same host.
///
/// Each counter is turned into "lost since the previous heartbeat" by its own lifetime (see the
/// `Heartbeat` message): per-process counters start again when the uptime goes down; the
/// kernel's counters outlive sensor restarts and start again only under a new
/// `kernel_counters_id`; the spool's corrupt total lives as long as the spool (a lower value
/// means a new spool). So a restarted sensor re-reporting the pinned kernel totals adds nothing.
pub fn gaps_between(
    host_id: &str,
    previous: Option<&HeartbeatRecord>,
    now: &HeartbeatRecord,
) -> Vec<Gap> {
    let restarted = previous.is_none_or(|p| now.uptime_s < p.uptime_s);
    let since_start =
        |before: u64, after: u64| if restarted { after } else { after.saturating_sub(before) };
    // A counter that may only grow while it is the same counter: lower means a new one.
    let cumulative = |before: Option<u64>, after: u64| match before {
        Some(b) if after >= b => after - b,
        _ => after,
    };
    let mut lost = Vec::new();
    lost.push((
        "spool-evicted",
        since_start(previous.map_or(0, |p| p.spool_evicted), now.spool_evicted),
    ));
    let kernel_before = previous.map(HeartbeatRecord::kernel_lost_total);
    let kernel = if now.kernel_counters_id.is_empty() {
        since_start(kernel_before.unwrap_or(0), now.kernel_lost_total())
    } else {
        let same = previous.filter(|p| p.kernel_counters_id == now.kernel_counters_id);
        cumulative(same.map(HeartbeatRecord::kernel_lost_total), now.kernel_lost_total())
    };
    lost.push(("kernel-lost", kernel));
    lost.push((
        "spool-corrupt",
        cumulative(previous.map(|p| p.spool_corrupt_total), now.spool_corrupt_total),
    ));
    for (kind, cause) in [
        ("spool_write_error", "spool-write-error"),
        ("rejected_by_collector", "rejected-by-collector"),
    ] {
        let count = |b: &HeartbeatRecord| b.sensor_lost.get(kind).copied().unwrap_or(0);
        lost.push((cause, since_start(previous.map_or(0, count), count(now))));
    }
    lost.into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(cause, n)| Gap {
            host_id: host_id.into(),
            time: now.at,
            cause: cause.into(),
            lost: n,
        })
        .collect()
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

    fn causes(g: &[Gap]) -> Vec<(&str, u64)> {
        g.iter().map(|g| (g.cause.as_str(), g.lost)).collect()
    }

    #[test]
    fn pinned_kernel_counters_are_not_counted_again_after_a_sensor_restart() {
        let pinned = |uptime_s, lost| HeartbeatRecord {
            kernel_counters_id: "boot-a-17".into(),
            ..beat(uptime_s, 0, lost)
        };
        assert_eq!(causes(&gaps_between("h", None, &pinned(5, 40))), [("kernel-lost", 40)]);
        // The sensor restarts (uptime down) but the pinned counters went on: 40 → 45.
        let g = gaps_between("h", Some(&pinned(500, 40)), &pinned(3, 45));
        assert_eq!(causes(&g), [("kernel-lost", 5)]);
        // New counters (reboot, or a replaced ring): everything they hold is new.
        let fresh = HeartbeatRecord { kernel_counters_id: "boot-b-3".into(), ..beat(3, 0, 2) };
        assert_eq!(
            causes(&gaps_between("h", Some(&pinned(500, 45)), &fresh)),
            [("kernel-lost", 2)]
        );
    }

    #[test]
    fn spool_and_sensor_losses_have_their_own_gaps_and_lifetimes() {
        let with = |uptime_s, corrupt, write_errors| HeartbeatRecord {
            spool_corrupt_total: corrupt,
            sensor_lost: [("spool_write_error".to_owned(), write_errors)].into_iter().collect(),
            spool_held: 1000,
            ..beat(uptime_s, 0, 0)
        };
        let g = gaps_between("h", Some(&with(10, 2, 0)), &with(20, 5, 3));
        assert_eq!(causes(&g), [("spool-corrupt", 3), ("spool-write-error", 3)]);
        // Restart: the spool's corrupt total is the spool's (no new corruption), the write
        // errors are the new process's; held events are not a loss.
        let g = gaps_between("h", Some(&with(20, 5, 3)), &with(1, 5, 1));
        assert_eq!(causes(&g), [("spool-write-error", 1)]);
        assert!(g.iter().all(|g| !g.summary().is_empty()));
    }
}
