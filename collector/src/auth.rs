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

/// Something an API caller wants to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create or change a declaration; `team` is the owning team for workloads and changes.
    WriteDeclaration {
        kind: Kind,
        team: Option<String>,
    },
    ReadDeclarations,
    ReadAlerts,
    /// Acknowledge or resolve an alert owned by `team`.
    TransitionAlert {
        team: String,
    },
    ReadTimeline,
    CreateToken,
    /// List enrolled hosts.
    ReadHosts,
    /// Revoke a host (SecOps: response).
    RevokeHost,
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role {role} may not {action}")]
pub struct Denied {
    pub role: Role,
    pub action: String,
}

/// The authorization matrix. Every API method calls this and nothing else decides.
pub fn authorize(who: &TokenRecord, action: &Action) -> Result<(), Denied> {
    use Action as A;
    use Role as R;
    let own_team = |team: &Option<String>| team.is_some() && who.team.as_ref() == team.as_ref();
    let allowed = match (who.role, action) {
        (R::Admin, _) => true,
        (R::Sensor, _) => false,
        (_, A::ReadDeclarations | A::ReadAlerts) => true,
        (R::Iam, A::WriteDeclaration { kind: Kind::Watch, .. }) => true,
        (R::Secops, A::WriteDeclaration { kind: Kind::Team | Kind::Detections, .. }) => true,
        (R::Owner, A::WriteDeclaration { kind: Kind::Workload | Kind::ApprovedChange, team }) => {
            own_team(team)
        }
        (R::Secops | R::Responder, A::TransitionAlert { .. } | A::ReadTimeline | A::ReadHosts) => {
            true
        }
        (R::Secops, A::RevokeHost) => true,
        (R::Owner, A::TransitionAlert { team }) => own_team(&Some(team.clone())),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        let action = match action {
            A::WriteDeclaration { kind, team } => {
                format!(
                    "change {kind} declarations{}",
                    team.as_ref().map(|t| format!(" of team {t}")).unwrap_or_default()
                )
            }
            A::ReadDeclarations => "read declarations".into(),
            A::ReadAlerts => "read alerts".into(),
            A::TransitionAlert { team } => format!("acknowledge or resolve alerts of {team}"),
            A::ReadTimeline => "read host timelines".into(),
            A::CreateToken => "create tokens".into(),
            A::ReadHosts => "list hosts".into(),
            A::RevokeHost => "revoke hosts".into(),
        };
        Err(Denied { role: who.role, action })
    }
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
        }
    }

    #[test]
    fn matrix() {
        let wl =
            |team: &str| Action::WriteDeclaration { kind: Kind::Workload, team: Some(team.into()) };
        assert!(authorize(&token(Role::Admin, None), &Action::CreateToken).is_ok());
        assert!(authorize(&token(Role::Owner, Some("pay")), &wl("pay")).is_ok());
        let denied = authorize(&token(Role::Owner, Some("pay")), &wl("web")).unwrap_err();
        assert_eq!(
            denied.to_string(),
            "role owner may not change Workload declarations of team web"
        );
        assert!(
            authorize(
                &token(Role::Iam, None),
                &Action::WriteDeclaration { kind: Kind::Watch, team: None }
            )
            .is_ok()
        );
        assert!(authorize(&token(Role::Iam, None), &wl("pay")).is_err());
        assert!(authorize(&token(Role::Sensor, None), &Action::ReadAlerts).is_err());
        assert!(authorize(&token(Role::Responder, None), &Action::ReadTimeline).is_ok());
        assert!(authorize(&token(Role::Secops, None), &Action::CreateToken).is_err());
    }
}
