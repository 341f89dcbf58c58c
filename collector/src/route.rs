//! Routing: which teams an alert goes to, the sinks of a team's route, and the body each sink
//! receives. Deliveries themselves go through the persisted outbox ([`crate::outbox`]).
//!
//! Every alert goes to its owning team; alerts about undeclared identities go to `secops`, and
//! an `unknown-identity` alert also to the owners of the workloads that declare the watch used
//! (their credential is being used by someone else), a `secret-misuse` alert also to the
//! owners of the workload whose secrets were read; `dormant-identity` also goes to `iam`. A team route may escalate an alert that is still open
//! after `escalate_after` to `escalate_to` (whose own escalation then applies: chains).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    alerts::{Alert, DEFAULT_ROUTE},
    correlate::Registry,
    declarations::model::Team,
    rule::{Rule, Severity},
};

/// The team that receives `dormant-identity` alerts besides the owner (identity lifecycle).
pub const IAM_TEAM: &str = "iam";

/// One place a team's notices are delivered to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Sink {
    /// The generic JSON body (see the collector README), POSTed.
    Webhook { url: String },
    /// A Slack incoming webhook: `{"text", "blocks"}`.
    Slack { url: String },
    /// PagerDuty Events API v2 (`url` is the enqueue endpoint).
    Pagerduty { url: String, routing_key: String },
    /// One generic JSON body per line, appended to a file on the collector.
    Jsonl { path: String },
}

impl Sink {
    /// How people see the sink (never the PagerDuty routing key).
    pub fn describe(&self) -> String {
        match self {
            Self::Webhook { url } => format!("webhook {url}"),
            Self::Slack { url } => format!("slack {url}"),
            Self::Pagerduty { url, .. } => format!("pagerduty {url}"),
            Self::Jsonl { path } => format!("jsonl {path}"),
        }
    }
}

/// A team's route, compiled from its declaration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TeamRoute {
    pub sinks: Vec<Sink>,
    /// `(escalate_after, escalate_to)`.
    pub escalate: Option<(chrono::Duration, String)>,
}

impl TeamRoute {
    /// The route a Team declares (no route: no sinks, no escalation).
    pub fn of(team: &Team) -> Self {
        let Some(r) = &team.route else { return Self::default() };
        let mut sinks = Vec::new();
        if let Some(url) = &r.webhook {
            sinks.push(Sink::Webhook { url: url.clone() });
        }
        if let Some(url) = &r.slack_webhook {
            sinks.push(Sink::Slack { url: url.clone() });
        }
        if let Some(pd) = &r.pagerduty {
            sinks
                .push(Sink::Pagerduty { url: pd.url.clone(), routing_key: pd.routing_key.clone() });
        }
        if let Some(path) = &r.jsonl {
            sinks.push(Sink::Jsonl { path: path.clone() });
        }
        let escalate = match (&r.escalate_after, &r.escalate_to) {
            (Some(after), Some(to)) => Some((after.0, to.clone())),
            _ => None,
        };
        Self { sinks, escalate }
    }
}

/// Every declared team's route, by team name.
pub fn routes(reg: &Registry) -> HashMap<String, TeamRoute> {
    reg.teams.iter().map(|(name, t)| (name.clone(), TeamRoute::of(t))).collect()
}

/// Why a team receives an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// The team owns the workload.
    Owner,
    /// No declared workload: SecOps.
    Undeclared,
    /// `dormant-identity` also goes to IAM.
    Dormant,
    /// An undeclared process used a watch this team's workloads declare.
    CredentialOwner,
    /// Another process read the secrets of this team's workload.
    TargetOwner,
    /// The alert was not acknowledged in time.
    Escalation,
    /// A workload declaration was widened.
    DeclarationChanged,
}

impl Reason {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Undeclared => "undeclared",
            Self::Dormant => "dormant",
            Self::CredentialOwner => "credential-owner",
            Self::TargetOwner => "target-owner",
            Self::Escalation => "escalation",
            Self::DeclarationChanged => "declaration-changed",
        }
    }

    /// Parses a kebab-case name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Owner,
            Self::Undeclared,
            Self::Dormant,
            Self::CredentialOwner,
            Self::TargetOwner,
            Self::Escalation,
            Self::DeclarationChanged,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// A team an alert is routed to, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTeam {
    pub team: String,
    pub reason: Reason,
}

/// The teams a new alert goes to: the owner (or `secops` when undeclared); also
/// `affected_owners`, each once — for `unknown-identity` the owning teams of the workloads that
/// declare the watch used, for `secret-misuse` those of the workload whose secrets were read;
/// and `iam` as well for `dormant-identity`. The first one's escalation applies.
pub fn alert_teams(rule: Rule, owner: Option<&str>, affected_owners: &[&str]) -> Vec<RouteTeam> {
    let mut out = vec![match owner {
        Some(team) => RouteTeam { team: team.to_owned(), reason: Reason::Owner },
        None => RouteTeam { team: DEFAULT_ROUTE.to_owned(), reason: Reason::Undeclared },
    }];
    let affected = match rule {
        Rule::UnknownIdentity if owner.is_none() => Some(Reason::CredentialOwner),
        Rule::SecretMisuse => Some(Reason::TargetOwner),
        _ => None,
    };
    if let Some(reason) = affected {
        for team in affected_owners {
            if !out.iter().any(|r| r.team == *team) {
                out.push(RouteTeam { team: (*team).to_owned(), reason });
            }
        }
    }
    if rule == Rule::DormantIdentity && out[0].team != IAM_TEAM {
        out.push(RouteTeam { team: IAM_TEAM.to_owned(), reason: Reason::Dormant });
    }
    out
}

/// A delivery (or a team without a route) as the alert shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    pub team: String,
    pub reason: Reason,
    /// `webhook https://…`, `slack …`, `pagerduty …`, `jsonl /path`, or `none` when the team
    /// declares no route.
    pub target: String,
    /// pending | delivered | no-route.
    pub status: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The id receivers dedupe on (`Keywatch-Delivery` header, `delivery_id` field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
}

impl Routing {
    /// One line for `keywatch alerts show`.
    pub fn render(&self) -> String {
        let mut s =
            format!("{} ({}) {} {}", self.team, self.reason.as_str(), self.target, self.status);
        if self.attempts > 0 {
            s.push_str(&format!(", {} attempt(s)", self.attempts));
        }
        if let Some(t) = self.delivered_at {
            s.push_str(&format!(" at {}", t.to_rfc3339()));
        } else if let Some(t) = self.next_attempt_at {
            s.push_str(&format!(", next {}", t.to_rfc3339()));
        }
        if let Some(e) = &self.last_error {
            s.push_str(&format!(", last error: {e}"));
        }
        s
    }
}

/// A delivery to put in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    pub delivery_id: String,
    pub alert_id: Option<i64>,
    pub team: String,
    pub reason: Reason,
    pub sink: Sink,
    /// The generic body ([`alert_body`], [`declaration_changed_body`]).
    pub payload: Value,
}

/// A fresh delivery id: `kwd_` and 32 hex digits.
pub fn new_delivery_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    format!("kwd_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The generic body of an alert notice (`type` `alert` or `escalation`).
pub fn alert_body(
    delivery_id: &str,
    team: &str,
    reason: Reason,
    alert: &Alert,
    escalation: Option<Value>,
) -> Value {
    let mut alert_json = serde_json::to_value(alert).unwrap_or(Value::Null);
    if let Some(o) = alert_json.as_object_mut() {
        // Delivery state changes after the body is written; receivers get it from the API.
        o.remove("routed_to");
        o.remove("transitions");
    }
    let mut body = json!({
        "delivery_id": delivery_id,
        "type": if reason == Reason::Escalation { "escalation" } else { "alert" },
        "team": team,
        "reason": reason.as_str(),
        "alert": alert_json,
    });
    if let Some(e) = escalation {
        body["escalation"] = e;
    }
    body
}

/// The generic body of a `declaration-changed` notice.
pub fn declaration_changed_body(delivery_id: &str, team: &str, change: &Value) -> Value {
    json!({
        "delivery_id": delivery_id,
        "type": "declaration-changed",
        "team": team,
        "reason": Reason::DeclarationChanged.as_str(),
        "change": change,
    })
}

fn one_line(body: &Value) -> String {
    let ty = body["type"].as_str().unwrap_or("alert");
    if ty == "declaration-changed" {
        let c = &body["change"];
        return format!(
            "Keywatch: declaration of workload {} widened by {} (revision {}): {}",
            c["workload"].as_str().unwrap_or("?"),
            c["actor"].as_str().unwrap_or("?"),
            c["revision"],
            c["widened"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join("; "))
                .unwrap_or_default()
        );
    }
    let a = &body["alert"];
    format!(
        "Keywatch{} #{} {} [{}] {} on {}: {}",
        if ty == "escalation" { " ESCALATION" } else { "" },
        a["id"],
        a["rule"].as_str().unwrap_or("?"),
        a["severity"].as_str().unwrap_or("?"),
        a["workload"].as_str().unwrap_or("?"),
        a["host"]["id"].as_str().unwrap_or("?"),
        a["summary"].as_str().unwrap_or("")
    )
}

/// Slack incoming-webhook body: `text` (the fallback line) and `blocks`.
pub fn slack_body(body: &Value) -> Value {
    let line = one_line(body);
    let mut fields = Vec::new();
    let a = &body["alert"];
    if a.is_object() {
        for (label, value) in [
            ("Rule", a["rule"].clone()),
            ("Severity", a["severity"].clone()),
            ("Workload", a["workload"].clone()),
            ("Owner", a["owner"].clone()),
            ("Host", a["host"]["id"].clone()),
            ("Resource", a["resource"].clone()),
            (
                "Process",
                json!(format!(
                    "pid {} {}",
                    a["process"]["pid"],
                    a["process"]["exe"].as_str().unwrap_or("")
                )),
            ),
            ("ATT&CK", a["frameworks"]["attack"].clone()),
            ("OWASP NHI", a["frameworks"]["owasp_nhi"].clone()),
        ] {
            let text = match value {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            fields.push(json!({"type": "mrkdwn", "text": format!("*{label}*\n{text}")}));
        }
    }
    let mut blocks = vec![json!({"type": "section", "text": {"type": "mrkdwn", "text": line}})];
    for chunk in fields.chunks(10) {
        blocks.push(json!({"type": "section", "fields": chunk}));
    }
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
        "team {} ({}) · delivery {}",
        body["team"].as_str().unwrap_or(""),
        body["reason"].as_str().unwrap_or(""),
        body["delivery_id"].as_str().unwrap_or("")
    )}]}));
    json!({"text": line, "blocks": blocks})
}

fn pagerduty_severity(s: &str) -> &'static str {
    match Severity::parse(s) {
        Some(Severity::Critical) => "critical",
        Some(Severity::High) => "error",
        Some(Severity::Medium) => "warning",
        _ => "info",
    }
}

/// PagerDuty Events API v2 `trigger` body. `dedup_key` is per alert (escalations of the same
/// alert update the same incident), per workload revision for declaration changes.
pub fn pagerduty_body(body: &Value, routing_key: &str) -> Value {
    let a = &body["alert"];
    let (dedup_key, severity, source) = if a.is_object() {
        (
            format!("keywatch-alert-{}", a["id"]),
            pagerduty_severity(a["severity"].as_str().unwrap_or("")),
            a["host"]["id"].as_str().unwrap_or("keywatch").to_owned(),
        )
    } else {
        let c = &body["change"];
        (
            format!(
                "keywatch-declaration-{}-{}",
                c["workload"].as_str().unwrap_or(""),
                c["revision"]
            ),
            "warning",
            "keywatch".to_owned(),
        )
    };
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": {
            "summary": one_line(body).chars().take(1024).collect::<String>(),
            "severity": severity,
            "source": source,
            "component": a["workload"].as_str().unwrap_or("keywatch"),
            "class": a["rule"].as_str().unwrap_or(body["type"].as_str().unwrap_or("")),
            "custom_details": body,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teams_for_rules() {
        let t = alert_teams(Rule::OutOfWindow, Some("pay"), &[]);
        assert_eq!(t, vec![RouteTeam { team: "pay".into(), reason: Reason::Owner }]);
        let t = alert_teams(Rule::UnknownIdentity, None, &[]);
        assert_eq!(t, vec![RouteTeam { team: "secops".into(), reason: Reason::Undeclared }]);
        let t = alert_teams(Rule::DormantIdentity, Some("pay"), &[]);
        assert_eq!(t[1], RouteTeam { team: "iam".into(), reason: Reason::Dormant });
        // An undeclared process using a declared credential: secops and the credential's
        // owners, each once (secops owning a declaring workload is not told twice).
        let t = alert_teams(Rule::UnknownIdentity, None, &["pay", "secops", "pay", "web"]);
        assert_eq!(
            t,
            vec![
                RouteTeam { team: "secops".into(), reason: Reason::Undeclared },
                RouteTeam { team: "pay".into(), reason: Reason::CredentialOwner },
                RouteTeam { team: "web".into(), reason: Reason::CredentialOwner },
            ]
        );
        // Other rules about declared workloads keep their owner.
        let t = alert_teams(Rule::OutOfPattern, Some("web"), &["pay"]);
        assert_eq!(t, vec![RouteTeam { team: "web".into(), reason: Reason::Owner }]);
        // A workload reading another's secrets: its owner, and the victim's (once).
        let t = alert_teams(Rule::SecretMisuse, Some("web"), &["pay"]);
        assert_eq!(t[1], RouteTeam { team: "pay".into(), reason: Reason::TargetOwner });
        assert_eq!(alert_teams(Rule::SecretMisuse, Some("pay"), &["pay"]).len(), 1);
    }

    #[test]
    fn pagerduty_shape() {
        let body = json!({"type": "alert", "delivery_id": "kwd_1", "team": "pay", "reason": "owner",
            "alert": {"id": 7, "rule": "out-of-window", "severity": "high", "workload": "w",
                      "host": {"id": "web-1"}, "summary": "s"}});
        let pd = pagerduty_body(&body, "RK");
        assert_eq!(pd["routing_key"], "RK");
        assert_eq!(pd["event_action"], "trigger");
        assert_eq!(pd["dedup_key"], "keywatch-alert-7");
        assert_eq!(pd["payload"]["severity"], "error");
        assert_eq!(pd["payload"]["source"], "web-1");
        assert_eq!(pd["payload"]["custom_details"]["delivery_id"], "kwd_1");
    }
}
