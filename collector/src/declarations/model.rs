//! The declaration kinds, exactly as owners write them in YAML.
//!
//! Ownership: IAM owns `Watch`, SecOps owns `Team` (routing) and `Detections`, workload owners
//! own `Workload` and `ApprovedChange`.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    duration::HumanDuration,
    event::SecretMethod,
    rule::{Rule, Severity},
};

/// The kind of a declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Watch,
    Team,
    Workload,
    ApprovedChange,
    Detections,
}

impl Kind {
    /// Every kind, in dependency order (a kind only refers to kinds before it).
    pub const ALL: [Kind; 5] =
        [Kind::Watch, Kind::Team, Kind::Workload, Kind::ApprovedChange, Kind::Detections];

    /// The name used in YAML `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Watch => "Watch",
            Self::Team => "Team",
            Self::Workload => "Workload",
            Self::ApprovedChange => "ApprovedChange",
            Self::Detections => "Detections",
        }
    }

    /// Parses a kind as people type it on the command line: `Workload`, `workload`, `workloads`,
    /// `approved-change`, `approvedchanges`…
    pub fn parse_loose(s: &str) -> Option<Kind> {
        let norm: String =
            s.chars().filter(|c| *c != '-' && *c != '_').collect::<String>().to_ascii_lowercase();
        let singular = norm
            .strip_suffix("es")
            .filter(|n| n.ends_with("watch"))
            .or_else(|| norm.strip_suffix('s'));
        Self::ALL.into_iter().find(|k| {
            let name = k.as_str().to_ascii_lowercase();
            name == norm || Some(name.as_str()) == singular
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One declaration of any kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
#[expect(
    clippy::large_enum_variant,
    reason = "declarations are few and short-lived; boxing buys nothing"
)]
pub enum Declaration {
    Watch(Watch),
    Team(Team),
    Workload(Workload),
    ApprovedChange(ApprovedChange),
    Detections(Detections),
}

impl Declaration {
    /// The declaration's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Watch(_) => Kind::Watch,
            Self::Team(_) => Kind::Team,
            Self::Workload(_) => Kind::Workload,
            Self::ApprovedChange(_) => Kind::ApprovedChange,
            Self::Detections(_) => Kind::Detections,
        }
    }

    /// The declaration's name, unique within its kind.
    pub fn name(&self) -> &str {
        match self {
            Self::Watch(d) => &d.name,
            Self::Team(d) => &d.name,
            Self::Workload(d) => &d.name,
            Self::ApprovedChange(d) => &d.name,
            Self::Detections(d) => &d.name,
        }
    }

    /// YAML text of the declaration, `kind:` first.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// What a watch guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchCategory {
    /// A credential file (keys, tokens, cloud CLI credentials).
    Credential,
    /// A secret reachable through another process or a socket (ssh-agent, docker.sock).
    Secret,
    /// A network endpoint where credentials are presented (STS, IMDS, Vault, Kerberos).
    AuthEndpoint,
}

impl WatchCategory {
    /// The YAML name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Credential => "credential",
            Self::Secret => "secret",
            Self::AuthEndpoint => "auth-endpoint",
        }
    }
}

/// IAM: what counts as a credential, secret or auth endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// Unique name; workloads and alerts refer to it.
    pub name: String,
    /// credential | secret | auth-endpoint.
    pub category: WatchCategory,
    /// Absolute paths; `*`, `?`, `[..]` and `**` globs allowed. For credential and secret watches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// `host:port` or `cidr:port` (IPv6 in brackets). For auth-endpoint watches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// SecOps: a team and where its alerts go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Team {
    /// Unique name; workloads name their owner team by it.
    pub name: String,
    /// Where alerts for this team's workloads are delivered. No route: alerts stay in the API only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Delivery and escalation of a team's alerts. Every sink given receives every notice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `http://` or `https://` URL that receives each notice as the generic JSON body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Slack incoming-webhook URL (`https://hooks.slack.com/services/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack_webhook: Option<String>,
    /// PagerDuty Events API v2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagerduty: Option<PagerDuty>,
    /// Absolute path of a file on the collector; one JSON notice per line is appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jsonl: Option<String>,
    /// An alert still open this long after it was raised escalates. Needs `escalate_to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_after: Option<HumanDuration>,
    /// The team that receives escalations; must be a declared Team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<String>,
}

/// A PagerDuty Events API v2 destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagerDuty {
    /// The enqueue endpoint (default `https://events.pagerduty.com/v2/enqueue`).
    #[serde(default = "default_pagerduty_url")]
    pub url: String,
    /// The integration's routing key.
    pub routing_key: String,
}

fn default_pagerduty_url() -> String {
    "https://events.pagerduty.com/v2/enqueue".into()
}

/// What kind of identity a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityType {
    ServiceAccount,
    Workload,
    Human,
    Machine,
}

impl IdentityType {
    /// The YAML name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServiceAccount => "service-account",
            Self::Workload => "workload",
            Self::Human => "human",
            Self::Machine => "machine",
        }
    }

    /// Non-human identities, whose use from an interactive session is `human-use-of-nhi`.
    pub fn is_nhi(self) -> bool {
        matches!(self, Self::ServiceAccount | Self::Workload)
    }
}

/// Owner: what normal looks like for one identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Unique name.
    pub name: String,
    /// The owning Team (must be declared); its route receives this workload's alerts.
    pub owner: String,
    /// service-account | workload | human | machine.
    pub identity_type: IdentityType,
    /// Which processes are this workload. Every selector given must hold.
    #[serde(rename = "match")]
    pub selector: Selector,
    /// What the workload is expected to do.
    #[serde(default)]
    pub expect: Expect,
    /// Silence longer than this, then activity, raises `dormant-identity`
    /// (default: the Detections `default_dormancy`, 30d unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dormancy: Option<HumanDuration>,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Process selectors; all given must match. At least one is required.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Every label must be present on the host with this value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_labels: BTreeMap<String, String>,
    /// User name of the process's real uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Real uid of the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Executable path; a glob (`*` does not cross `/`, `**` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// SHA-256 of the executable, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<String>,
    /// systemd unit, e.g. `payments-api.service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    /// Container id (full, or a prefix of at least 12 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Container image reference; a glob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_image: Option<String>,
    /// Kubernetes namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<String>,
    /// Kubernetes pod name; a glob (pods carry generated suffixes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod: Option<String>,
}

impl Selector {
    /// How many single-valued selectors are given (every one but `host_labels`): what
    /// validation requires and what correlation's precedence counts.
    pub fn single_selectors(&self) -> usize {
        let strings = [
            &self.user,
            &self.exe,
            &self.exe_sha256,
            &self.systemd_unit,
            &self.container_id,
            &self.container_image,
            &self.k8s_namespace,
            &self.k8s_pod,
        ];
        strings.iter().filter(|o| o.is_some()).count() + usize::from(self.uid.is_some())
    }
}

/// Declared normal behaviour.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Watches of category `credential` this workload may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
    /// Watches of category `auth-endpoint` this workload may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_endpoints: Vec<String>,
    /// Watches of category `secret` (sockets such as ssh-agent) this workload may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Cross-process reads this workload may perform:
    /// proc-environ | proc-mem | ptrace | process-vm-readv | process-vm-writev | keyctl.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cross_process: Vec<SecretMethod>,
    /// Whether gaining root or capabilities is normal for this workload (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privilege_escalation: bool,
    /// When use is expected. No windows: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
}

/// Day of the week in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    /// Monday = 0.
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The YAML name.
    pub fn as_str(self) -> &'static str {
        ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][self as usize]
    }
}

/// A weekly time window in a time zone. `to` is exclusive; `from` after `to` crosses midnight
/// (the window then starts on the listed day and ends the next morning).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days the window starts on (default: every day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<Vec<Day>>,
    /// Start, `HH:MM` local time, inclusive.
    pub from: String,
    /// End, `HH:MM` local time, exclusive; `24:00` is the end of the day.
    pub to: String,
    /// IANA time zone, e.g. `Europe/London`.
    pub tz: String,
}

/// Owner: a time-boxed exception tied to a change record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovedChange {
    /// The change record id, e.g. `CHG-1042`.
    pub name: String,
    /// The Workload this exception covers.
    pub workload: String,
    /// Start, RFC 3339 (inclusive).
    pub from: DateTime<Utc>,
    /// End, RFC 3339 (exclusive).
    pub until: DateTime<Utc>,
    /// Why; shown in alerts.
    pub reason: String,
    /// Rules the exception silences (default: out-of-window only).
    #[serde(default = "default_covers")]
    pub covers: Vec<Rule>,
}

fn default_covers() -> Vec<Rule> {
    vec![Rule::OutOfWindow]
}

/// SecOps: detection tuning. One object, named `default`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detections {
    /// Always `default`.
    pub name: String,
    /// Per-rule settings, keyed by rule name (`out-of-window`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, RuleSetting>,
    /// Repeats of the same (rule, workload, host, resource) closer than this fold into one alert
    /// (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grouping_window: Option<HumanDuration>,
    /// Dormancy period for workloads that do not set one (default 30d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_dormancy: Option<HumanDuration>,
}

/// Settings of one rule.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetting {
    /// low | medium | high | critical (default: the rule's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// false turns the rule off (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}
