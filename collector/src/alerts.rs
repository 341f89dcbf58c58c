//! Alerts: the context an alert carries, its grouping key and its lifecycle.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    correlate::{Registry, RevisionRef},
    declarations::model::ApprovedChange,
    detect::{Finding, Resource},
    event::{Event, Host, Process},
    route::{self, RouteTeam, Routing},
    rule::{Frameworks, Rule, Severity},
    table,
};

/// Shown where an alert has no declared workload or owner.
pub const UNDECLARED: &str = "undeclared";

/// Where alerts without an owner go until routing is configured.
pub const DEFAULT_ROUTE: &str = "secops";

/// Lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Open,
    Acknowledged,
    Resolved,
}

impl AlertStatus {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }

    /// Parses a name (`ack` is accepted for acknowledged).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(Self::Open),
            "acknowledged" | "ack" | "acked" => Some(Self::Acknowledged),
            "resolved" => Some(Self::Resolved),
            _ => None,
        }
    }

    /// Whether the lifecycle allows going from `self` to `to`: open → acknowledged → resolved,
    /// and open → resolved.
    pub fn can_become(self, to: AlertStatus) -> bool {
        matches!(
            (self, to),
            (Self::Open, Self::Acknowledged)
                | (Self::Open, Self::Resolved)
                | (Self::Acknowledged, Self::Resolved)
        )
    }
}

impl fmt::Display for AlertStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The host part of an alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostRef {
    pub id: String,
    pub labels: BTreeMap<String, String>,
}

/// An approved change as alerts show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRef {
    pub name: String,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub reason: String,
    pub covers: Vec<Rule>,
}

impl From<&ApprovedChange> for ChangeRef {
    fn from(c: &ApprovedChange) -> Self {
        Self {
            name: c.name.clone(),
            from: c.from,
            until: c.until,
            reason: c.reason.clone(),
            covers: c.covers.clone(),
        }
    }
}

/// A workload that declares the watch an undeclared process used, and its owning team.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredBy {
    pub workload: String,
    pub owner: String,
}

/// One lifecycle step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub time: DateTime<Utc>,
    /// Who: the token's name and role.
    pub actor: String,
    pub from: AlertStatus,
    pub to: AlertStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// An alert with everything a responder needs to act.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Assigned by the store; 0 before it is stored.
    pub id: i64,
    pub rule: Rule,
    pub severity: Severity,
    pub status: AlertStatus,
    /// Why the rule fired, in one sentence.
    pub summary: String,
    /// The workload's identity type, or `undeclared`.
    pub identity_type: String,
    /// The workload, or `undeclared`.
    pub workload: String,
    /// The owning team, or `undeclared`.
    pub owner: String,
    pub host: HostRef,
    /// The process and its ancestry, from the first event.
    pub process: Process,
    pub resource: Resource,
    /// The workload's windows, each in its own time zone (empty: any time or undeclared).
    pub expected_windows: Vec<String>,
    /// The first event's time on the clock of the workload's (first window's) zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_time: Option<String>,
    /// The approved change in force at the first event, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_change: Option<ChangeRef>,
    /// The workload's change that ended most recently before the first event, when no change
    /// was in force and that change covered this rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_expired_change: Option<ChangeRef>,
    /// Recent changes to the workload's declaration, newest first.
    pub recent_revisions: Vec<RevisionRef>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Events folded into this alert (sensor-folded repeats included).
    pub count: u64,
    /// ATT&CK techniques and the OWASP NHI entry of the rule.
    #[serde(default)]
    pub frameworks: Frameworks,
    /// For `unknown-identity`: the workloads that declare the watch used, with their owners
    /// (who receive the alert too). Empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub declared_by: Vec<DeclaredBy>,
    /// The teams the alert was routed to when raised, and why (escalations add deliveries).
    #[serde(default)]
    pub routes: Vec<RouteTeam>,
    /// Every delivery: team, sink, status, attempts, last error (filled from the outbox when
    /// read; a team without a route shows as `no-route`).
    #[serde(default, deserialize_with = "routed_to_lenient")]
    pub routed_to: Vec<Routing>,
    /// `(host, seq)` of the first event.
    pub first_event_seq: u64,
    /// Lifecycle history, oldest first.
    #[serde(default)]
    pub transitions: Vec<Transition>,
}

/// Alerts stored before delivery tracking carried `routed_to` as one string; read it as nothing.
fn routed_to_lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Routing>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<Routing>),
        Old(#[expect(dead_code, reason = "only accepted, not used")] String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(l) => l,
        Either::Old(_) => Vec::new(),
    })
}

impl Alert {
    /// Repeats with the same key fold into one alert: (rule, workload, host, resource).
    pub fn group_key(&self) -> String {
        format!("{}|{}|{}|{}", self.rule, self.workload, self.host.id, self.resource.group_part())
    }

    /// Folds one more event into this alert.
    pub fn add_event(&mut self, count: u32, time: DateTime<Utc>) {
        self.count += u64::from(count.max(1));
        self.first_seen = self.first_seen.min(time);
        self.last_seen = self.last_seen.max(time);
    }

    /// Builds the alert for one finding on one event.
    pub fn build(reg: &Registry, host: &Host, event: &Event, finding: &Finding) -> Self {
        let workload = finding.workload.as_deref().and_then(|n| reg.workload(n));
        let (identity_type, owner) = match workload {
            Some(w) => (w.workload.identity_type.as_str().to_owned(), w.workload.owner.clone()),
            None => (UNDECLARED.to_owned(), UNDECLARED.to_owned()),
        };
        let declared_by: Vec<DeclaredBy> = match (&finding.resource.watch, workload) {
            (Some(watch), None) if finding.rule == Rule::UnknownIdentity => reg
                .declaring(watch)
                .into_iter()
                .map(|w| DeclaredBy {
                    workload: w.workload.name.clone(),
                    owner: w.workload.owner.clone(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let victim = finding.resource.target_workload.as_deref().and_then(|n| reg.workload(n));
        let affected_owners: Vec<&str> = declared_by
            .iter()
            .map(|d| d.owner.as_str())
            .chain(victim.map(|v| v.workload.owner.as_str()))
            .collect();
        let routes = route::alert_teams(
            finding.rule,
            workload.map(|w| w.workload.owner.as_str()),
            &affected_owners,
        );
        let name = finding.workload.clone().unwrap_or_else(|| UNDECLARED.to_owned());
        let in_force = finding.workload.as_deref().and_then(|w| reg.change_in_force(w, event.time));
        let expired = if in_force.is_none() {
            // Only a change that would have silenced this rule is worth showing.
            finding
                .workload
                .as_deref()
                .and_then(|w| reg.last_expired_change(w, event.time))
                .filter(|c| c.covers.contains(&finding.rule))
        } else {
            None
        };
        let local_time = workload.and_then(|w| w.windows.first()).map(|w| {
            event
                .time
                .with_timezone(&w.tz)
                .format(&format!("%a %Y-%m-%d %H:%M:%S %Z ({})", w.tz.name()))
                .to_string()
        });
        Self {
            id: 0,
            rule: finding.rule,
            severity: finding.severity,
            status: AlertStatus::Open,
            summary: finding.reason.clone(),
            identity_type,
            owner,
            host: HostRef { id: host.id.clone(), labels: host.labels.clone() },
            process: event.process.clone(),
            resource: finding.resource.clone(),
            expected_windows: workload.map(|w| w.rendered_windows()).unwrap_or_default(),
            local_time,
            approved_change: in_force.map(ChangeRef::from),
            last_expired_change: expired.map(ChangeRef::from),
            recent_revisions: reg.revisions.get(&name).cloned().unwrap_or_default(),
            first_seen: event.time,
            last_seen: event.time,
            count: u64::from(event.count.max(1)),
            frameworks: finding.rule.frameworks(),
            routes,
            declared_by,
            routed_to: Vec::new(),
            first_event_seq: event.seq,
            transitions: Vec::new(),
            workload: name,
        }
    }

    /// The team that owns the alert first, then every other team it was routed or escalated
    /// to, each once.
    pub fn teams(&self) -> Vec<String> {
        let mut teams = vec![self.owner.clone()];
        let others =
            self.routes.iter().map(|r| &r.team).chain(self.routed_to.iter().map(|r| &r.team));
        for team in others {
            if !teams.contains(team) {
                teams.push(team.clone());
            }
        }
        teams
    }

    /// Folds a repeat (same group key) into this alert.
    pub fn fold(&mut self, other: &Alert) {
        self.count += other.count;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }

    /// Multi-line description for `keywatch alerts show`.
    pub fn render_details(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<18}{v}\n"));
        line("alert", format!("#{} {} [{}] {}", self.id, self.rule, self.severity, self.status));
        line("summary", self.summary.clone());
        line(
            "workload",
            format!(
                "{} (identity type {}, owner {})",
                self.workload, self.identity_type, self.owner
            ),
        );
        let labels: Vec<String> =
            self.host.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line("host", format!("{} {}", self.host.id, labels.join(",")));
        let p = &self.process;
        line(
            "process",
            format!(
                "pid {} {} uid {} euid {}{}{}",
                p.pid,
                if p.exe.is_empty() { &p.comm } else { &p.exe },
                p.uid,
                p.euid,
                p.login_uid.map(|u| format!(" loginuid {u}")).unwrap_or_default(),
                if p.tty.is_empty() { String::new() } else { format!(" tty {}", p.tty) }
            ),
        );
        if !p.cmdline.is_empty() {
            line("cmdline", p.cmdline.join(" "));
        }
        line("ancestry", p.ancestry_line());
        line("resource", format!("{} ({})", self.resource.render(), self.resource.kind));
        for d in &self.declared_by {
            line("declared by", format!("{} (owner {})", d.workload, d.owner));
        }
        line(
            "expected window",
            if self.expected_windows.is_empty() {
                "any time".into()
            } else {
                self.expected_windows.join("; ")
            },
        );
        if let Some(t) = &self.local_time {
            line("local time", t.clone());
        }
        let change = |c: &ChangeRef| {
            format!("{} {} to {} ({})", c.name, c.from.to_rfc3339(), c.until.to_rfc3339(), c.reason)
        };
        line("approved change", self.approved_change.as_ref().map_or("none".into(), change));
        if let Some(c) = &self.last_expired_change {
            line("last change ended", change(c));
        }
        line("first seen", self.first_seen.to_rfc3339());
        line("last seen", self.last_seen.to_rfc3339());
        line("count", self.count.to_string());
        line(
            "frameworks",
            format!(
                "ATT&CK {}; OWASP {}",
                self.frameworks.attack.join(", "),
                self.frameworks.owasp_nhi
            ),
        );
        if self.routed_to.is_empty() {
            let teams: Vec<&str> = self.routes.iter().map(|r| r.team.as_str()).collect();
            line("routed to", format!("{} (no delivery yet)", teams.join(", ")));
        }
        for r in &self.routed_to {
            line("routed to", r.render());
        }
        for r in &self.recent_revisions {
            line(
                "revision",
                format!("{} {} by {} at {}", r.revision, r.action, r.author, r.time.to_rfc3339()),
            );
        }
        for t in &self.transitions {
            line(
                "transition",
                format!(
                    "{} {} -> {} by {}{}",
                    t.time.to_rfc3339(),
                    t.from,
                    t.to,
                    t.actor,
                    t.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default()
                ),
            );
        }
        s
    }
}

/// Folds a list of new alerts by group key, keeping first-seen order.
pub fn fold_batch(alerts: Vec<Alert>) -> Vec<Alert> {
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out: Vec<Alert> = Vec::new();
    for a in alerts {
        match index.get(&a.group_key()) {
            Some(&i) => out[i].fold(&a),
            None => {
                index.insert(a.group_key(), out.len());
                out.push(a);
            }
        }
    }
    out
}

/// The alert list as an aligned table.
pub fn render_table(alerts: &[Alert]) -> String {
    let rows: Vec<Vec<String>> = alerts
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                a.severity.to_string(),
                a.rule.to_string(),
                a.status.to_string(),
                a.workload.clone(),
                a.owner.clone(),
                a.host.id.clone(),
                a.count.to_string(),
                a.last_seen.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                a.resource.render(),
            ]
        })
        .collect();
    table::render(
        &[
            "ID",
            "SEVERITY",
            "RULE",
            "STATUS",
            "WORKLOAD",
            "OWNER",
            "HOST",
            "COUNT",
            "LAST SEEN",
            "RESOURCE",
        ],
        &rows,
    )
}
