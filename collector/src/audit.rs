//! The audit trail: who (token identity), when and what, for every declaration change, token
//! operation, alert acknowledgement or resolution, escalation, and host enrollment or revocation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{auth::TokenRecord, table};

/// Kinds of audit records (`keywatch audit --kind`; a prefix such as `token` matches every
/// `token-…` kind).
pub const KINDS: &[&str] = &[
    "declaration-created",
    "declaration-updated",
    "declaration-deleted",
    "token-created",
    "token-revoked",
    "join-token-created",
    "join-token-revoked",
    "alert-acknowledged",
    "alert-resolved",
    "alert-escalated",
    "host-enrolled",
    "host-revoked",
];

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The API token's id; `None` for the collector itself and for join tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<i64>,
    /// The token's name, the join token id, or `keywatch` for the collector itself.
    pub name: String,
    /// admin | iam | secops | owner | responder | sensor | system.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
}

impl Actor {
    /// The collector itself (escalation timers).
    pub fn system() -> Self {
        Self { token_id: None, name: "keywatch".into(), role: "system".into(), team: None }
    }

    /// The holder of an API token.
    pub fn token(t: &TokenRecord) -> Self {
        Self {
            token_id: Some(t.id),
            name: t.name.clone(),
            role: t.role.to_string(),
            team: t.team.clone(),
        }
    }

    /// `name #id (role[:team])`.
    pub fn render(&self) -> String {
        let id = self.token_id.map(|i| format!(" #{i}")).unwrap_or_default();
        match &self.team {
            Some(t) => format!("{}{id} ({}:{t})", self.name, self.role),
            None => format!("{}{id} ({})", self.name, self.role),
        }
    }
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Assigned by the store.
    pub id: i64,
    pub time: DateTime<Utc>,
    /// One of [`KINDS`].
    pub kind: String,
    pub actor: Actor,
    /// What it was done to: `Workload payments-api`, `token 4`, `alert 12`, `host web-1`.
    pub object: String,
    /// The declaration revision, for declaration changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// What: the diff, the token's role and team, the note, the escalation's teams.
    pub details: Value,
}

impl AuditRecord {
    /// A record to append (id assigned by the store).
    pub fn new(
        time: DateTime<Utc>,
        kind: &str,
        actor: Actor,
        object: impl Into<String>,
        details: Value,
    ) -> Self {
        Self {
            id: 0,
            time,
            kind: kind.into(),
            actor,
            object: object.into(),
            revision: None,
            details,
        }
    }
}

/// Which audit records to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub since: Option<DateTime<Utc>>,
    /// Kinds or kind prefixes (`token` matches `token-created`); empty: all.
    pub kinds: Vec<String>,
    /// At most this many, newest first (0: 1000).
    pub limit: usize,
}

impl AuditFilter {
    /// Whether a record of `kind` is wanted.
    pub fn wants(&self, kind: &str) -> bool {
        self.kinds.is_empty()
            || self.kinds.iter().any(|k| {
                kind == k || kind.strip_prefix(k.as_str()).is_some_and(|r| r.starts_with('-'))
            })
    }
}

/// The records as a table, oldest first.
pub fn render_table(records: &[AuditRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let detail = match &r.details {
                Value::Object(o) => o
                    .iter()
                    .filter(|(k, _)| k.as_str() != "diff")
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                other => other.to_string(),
            };
            vec![
                r.id.to_string(),
                r.time.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                r.kind.clone(),
                r.actor.render(),
                r.object.clone(),
                r.revision.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                detail,
            ]
        })
        .collect();
    table::render(&["ID", "TIME", "KIND", "ACTOR", "OBJECT", "REVISION", "DETAILS"], &rows)
}
