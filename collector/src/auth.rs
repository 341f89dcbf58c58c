//! API tokens, roles and the one authorization function every API method goes through.

use std::fmt;

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::declarations::Kind;

/// What a token may do. See [`authorize`] for the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including creating tokens.
    Admin,
    /// Identity and access management: watches.
    Iam,
    /// Security operations: teams (routing), detection settings, triage.
    Secops,
    /// A workload owner: its team's workloads and approved changes, its team's alerts.
    Owner,
    /// Incident response: read alerts and timelines, acknowledge and resolve.
    Responder,
    /// A sensor; no API access.
    Sensor,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] =
        [Role::Admin, Role::Iam, Role::Secops, Role::Owner, Role::Responder, Role::Sensor];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Iam => "iam",
            Self::Secops => "secops",
            Self::Owner => "owner",
            Self::Responder => "responder",
            Self::Sensor => "sensor",
        }
    }

    /// Parses a lowercase name.
    pub fn parse(s: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored token (the secret itself is only ever stored hashed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: i64,
    /// Who holds it; recorded as the author of changes and transitions.
    pub name: String,
    pub role: Role,
    /// The team, for the `owner` role.
    pub team: Option<String>,
    pub created: DateTime<Utc>,
    /// When the token stops working; `None`: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<DateTime<Utc>>,
}

impl TokenRecord {
    /// `name (role[:team])`, as recorded in audit trails.
    pub fn actor(&self) -> String {
        match &self.team {
            Some(t) => format!("{} ({}:{t})", self.name, self.role),
            None => format!("{} ({})", self.name, self.role),
        }
    }
}

/// A fresh random token secret: `kw_` and 64 hex digits.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("kw_{}", hex(&bytes))
}

/// SHA-256 of a token secret, hex; what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Something an API caller wants to do. Every API method maps to exactly one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create, change or delete a declaration; `team` is the owning team for workloads and
    /// approved changes.
    WriteDeclaration { kind: Kind, team: Option<String> },
    /// Read declarations and their history.
    ReadDeclarations,
    /// List alerts (owners see those their team owns or was sent only).
    ListAlerts,
    /// Read one alert; `teams`: the team that owns it (`undeclared` for alerts without a
    /// workload) first, then every other team it was sent to (the credential's or the
    /// target's owners, escalations), who may read it too.
    ReadAlert { teams: Vec<String> },
    /// Acknowledge or resolve an alert owned by `team`.
    TransitionAlert { team: String },
    /// Read a host's timeline; `teams` own the workloads the host runs (see
    /// [`crate::store::Store::host_workloads`]).
    ReadTimeline { host: String, teams: Vec<String> },
    /// Create, list or revoke API and join tokens.
    ManageTokens,
    /// List enrolled hosts.
    ReadHosts,
    /// Revoke a host (SecOps: response).
    RevokeHost,
    /// Read the audit trail.
    ReadAudit,
    /// Ask who the token belongs to.
    WhoAmI,
}

impl Action {
    fn describe(&self) -> String {
        match self {
            Self::WriteDeclaration { kind, team } => format!(
                "change {kind} declarations{}",
                team.as_ref().map(|t| format!(" of team {t}")).unwrap_or_default()
            ),
            Self::ReadDeclarations => "read declarations".into(),
            Self::ListAlerts => "list alerts".into(),
            Self::ReadAlert { teams } => {
                format!("read alerts of {}", teams.first().map_or("", String::as_str))
            }
            Self::TransitionAlert { team } => format!("acknowledge or resolve alerts of {team}"),
            Self::ReadTimeline { host, .. } => format!("read the timeline of host {host}"),
            Self::ManageTokens => "manage tokens".into(),
            Self::ReadHosts => "list hosts".into(),
            Self::RevokeHost => "revoke hosts".into(),
            Self::ReadAudit => "read the audit trail".into(),
            Self::WhoAmI => "call the API".into(),
        }
    }

    /// The owning teams the action concerns (an owner token of one of them may be allowed).
    fn teams(&self) -> Vec<String> {
        match self {
            Self::WriteDeclaration { team, .. } => team.iter().cloned().collect(),
            Self::TransitionAlert { team } => vec![team.clone()],
            Self::ReadAlert { teams } | Self::ReadTimeline { teams, .. } => teams.clone(),
            _ => Vec::new(),
        }
    }
}

/// Why an action was refused, naming the roles that would be allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {role} may not {action}; needs role {needed}")]
pub struct Denied {
    /// The caller's role (with its team for owners).
    pub role: String,
    pub action: String,
    /// `owner of team-a, secops or admin`.
    pub needed: String,
}

fn allowed(role: Role, team: Option<&str>, action: &Action) -> bool {
    use Action as A;
    use Role as R;
    let own = |t: &str| team == Some(t);
    match (role, action) {
        (R::Admin, _) => true,
        (R::Sensor, _) => false,
        (_, A::WhoAmI | A::ReadDeclarations) => true,
        (R::Iam | R::Secops | R::Responder, A::ListAlerts | A::ReadAlert { .. }) => true,
        (R::Iam | R::Secops | R::Responder, A::ReadTimeline { .. } | A::ReadHosts) => true,
        (R::Iam | R::Secops, A::ReadAudit) => true,
        (R::Iam, A::WriteDeclaration { kind: Kind::Watch, .. }) => true,
        (R::Secops, A::WriteDeclaration { kind: Kind::Team | Kind::Detections, .. }) => true,
        (R::Secops, A::TransitionAlert { .. } | A::RevokeHost) => true,
        (R::Owner, A::ListAlerts) => true,
        (R::Owner, A::WriteDeclaration { kind: Kind::Workload | Kind::ApprovedChange, team }) => {
            team.as_deref().is_some_and(own)
        }
        (R::Owner, A::TransitionAlert { team }) => own(team),
        (R::Owner, A::ReadAlert { teams } | A::ReadTimeline { teams, .. }) => {
            teams.iter().any(|t| own(t))
        }
        _ => false,
    }
}

/// The authorization matrix (the table in the collector README). Every API method calls this
/// and nothing else decides.
pub fn authorize(who: &TokenRecord, action: &Action) -> Result<(), Denied> {
    let team = if who.role == Role::Owner { who.team.as_deref() } else { None };
    if allowed(who.role, team, action) {
        return Ok(());
    }
    let mut needed: Vec<String> = Vec::new();
    for role in Role::ALL {
        if role == Role::Owner {
            let teams = action.teams();
            let ok: Vec<&String> =
                teams.iter().filter(|t| allowed(role, Some(t.as_str()), action)).collect();
            match ok.as_slice() {
                [] => {}
                [t] => needed.push(format!("owner of {t}")),
                _ => needed.push(format!(
                    "owner of one of {}",
                    ok.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
                )),
            }
        } else if allowed(role, None, action) {
            needed.push(role.as_str().to_owned());
        }
    }
    // admin last: "secops or admin".
    needed.sort_by_key(|r| r == "admin");
    let needed = match needed.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "admin".into(),
    };
    let role = match &who.team {
        Some(t) if who.role == Role::Owner => format!("owner (team {t})"),
        _ => who.role.to_string(),
    };
    Err(Denied { role, action: action.describe(), needed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(role: Role, team: Option<&str>) -> TokenRecord {
        TokenRecord {
            id: 1,
            name: "t".into(),
            role,
            team: team.map(Into::into),
            created: DateTime::UNIX_EPOCH,
            expires: None,
        }
    }

    #[test]
    fn refusals_name_the_roles_needed() {
        let wl =
            |team: &str| Action::WriteDeclaration { kind: Kind::Workload, team: Some(team.into()) };
        assert!(authorize(&token(Role::Admin, None), &Action::ManageTokens).is_ok());
        assert!(authorize(&token(Role::Owner, Some("pay")), &wl("pay")).is_ok());
        let denied = authorize(&token(Role::Owner, Some("pay")), &wl("web")).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "role owner (team pay) may not change Workload declarations of team web; needs role owner of web or admin"
        );
        let watch = Action::WriteDeclaration { kind: Kind::Watch, team: None };
        assert!(authorize(&token(Role::Iam, None), &watch).is_ok());
        assert_eq!(
            authorize(&token(Role::Secops, None), &watch).unwrap_err().to_string(),
            "role secops may not change Watch declarations; needs role iam or admin"
        );
        let ack = Action::TransitionAlert { team: "web".into() };
        assert_eq!(
            authorize(&token(Role::Responder, None), &ack).unwrap_err().needed,
            "secops, owner of web or admin"
        );
        assert!(authorize(&token(Role::Sensor, None), &Action::ListAlerts).is_err());
        assert!(authorize(&token(Role::Responder, None), &Action::ReadHosts).is_ok());
        assert_eq!(
            authorize(&token(Role::Secops, None), &Action::ManageTokens).unwrap_err().needed,
            "admin"
        );
    }
}
