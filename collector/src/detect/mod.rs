//! Detections: given one event, its host, its workload (if any) and the registry, which rules
//! fire. Pure functions of their inputs: time comes from the event, never from a clock.

pub mod window;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    correlate::{CompiledWorkload, Registry},
    declarations::model::WatchCategory,
    event::{Event, EventKind, Host, SecretMethod, endpoint},
    rule::{Rule, Severity},
};

/// What an alert is about: the watch and path, endpoint, or cross-process target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Resource {
    /// credential | secret | auth-endpoint | process | privilege.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pid: Option<u32>,
    /// The declared workload of the process whose secrets were read (its owners are told).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_workload: Option<String>,
}

impl Resource {
    /// The part of the grouping key that names the resource (target pids are left out so a
    /// scraper walking every process still folds into one alert — per victim workload, each
    /// of whose owners hears of it).
    pub fn group_part(&self) -> String {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        let mut part = format!(
            "{}|{}|{}|{}|{}",
            self.kind,
            o(&self.watch),
            o(&self.path),
            o(&self.endpoint),
            o(&self.method)
        );
        if let Some(workload) = &self.target_workload {
            part.push_str(&format!("|{workload}"));
        }
        part
    }

    /// `aws-credentials /root/.aws/credentials`, `aws-sts 169.254.169.254:80`, `ptrace pid 42`.
    pub fn render(&self) -> String {
        let mut parts = Vec::new();
        parts.extend(self.watch.clone());
        parts.extend(self.method.clone());
        parts.extend(self.path.clone());
        parts.extend(self.endpoint.clone());
        parts.extend(self.target_pid.map(|p| format!("pid {p}")));
        parts.extend(self.target_workload.as_ref().map(|w| format!("of workload {w}")));
        if parts.is_empty() { self.kind.clone() } else { parts.join(" ") }
    }
}

/// One rule that fired for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub rule: Rule,
    pub severity: Severity,
    /// The workload the alert is about; `None`: undeclared.
    pub workload: Option<String>,
    pub resource: Resource,
    /// Why, in one sentence.
    pub reason: String,
}

impl Finding {
    /// The grouping key of the alert this finding raises on `host_id`: repeats of the same
    /// (rule, workload, host, resource) fold into one alert.
    pub fn group_key(&self, host_id: &str) -> String {
        let workload = self.workload.as_deref().unwrap_or(crate::alerts::UNDECLARED);
        format!("{}|{workload}|{host_id}|{}", self.rule, self.resource.group_part())
    }
}

/// Per-event context detection needs besides the registry.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub host: &'a Host,
    /// The matched workload.
    pub workload: Option<&'a CompiledWorkload>,
    /// When the matched workload was last active before this event (or declared, if never).
    pub last_active: Option<DateTime<Utc>>,
}

/// Whether the event is a use of an identity (as opposed to process bookkeeping).
pub fn is_use(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::FileAccess { .. } | EventKind::Connect { .. } | EventKind::SecretAccess { .. }
    )
}

/// Every rule that fires for `event`.
pub fn detect(reg: &Registry, ctx: Context<'_>, event: &Event) -> Vec<Finding> {
    let mut out = Vec::new();
    let t = event.time;
    let wl = ctx.workload;
    let wl_name = wl.map(|w| w.workload.name.clone());
    let mut push = |rule: Rule, workload: Option<String>, resource: &Resource, reason: String| {
        if let Some(severity) = reg.settings.severity(rule) {
            // An approved change of the workload silences the rules it covers, while it lasts.
            if let Some(w) = &workload
                && reg.active_change(w, t, rule).is_some()
            {
                return;
            }
            out.push(Finding { rule, severity, workload, resource: resource.clone(), reason });
        }
    };

    match &event.kind {
        EventKind::FileAccess { watch, .. } | EventKind::Connect { watch, .. } => {
            let (resource, category) = match &event.kind {
                EventKind::Connect { address, port, .. } => {
                    let w = reg.watch_for_endpoint(watch, address, *port);
                    let name = w.map_or(watch.clone(), |w| w.watch.name.clone());
                    let category = w.map_or(WatchCategory::AuthEndpoint, |w| w.watch.category);
                    let r = Resource {
                        kind: category.as_str().into(),
                        watch: Some(name).filter(|n| !n.is_empty()),
                        endpoint: Some(endpoint(address, *port)),
                        ..Resource::default()
                    };
                    (r, category)
                }
                EventKind::FileAccess { path, .. } => {
                    let w = reg.watch_for_path(watch, path);
                    let name = w.map_or(watch.clone(), |w| w.watch.name.clone());
                    let category = w.map_or(WatchCategory::Credential, |w| w.watch.category);
                    let r = Resource {
                        kind: category.as_str().into(),
                        watch: Some(name).filter(|n| !n.is_empty()),
                        path: Some(path.clone()),
                        ..Resource::default()
                    };
                    (r, category)
                }
                _ => unreachable!("matched above"),
            };
            let watch_name = resource.watch.clone().unwrap_or_default();
            let what = resource.render();
            match wl {
                None => push(
                    Rule::UnknownIdentity,
                    None,
                    &resource,
                    format!("{} used {what} and matches no declared workload", event.process.exe),
                ),
                Some(w) => {
                    let e = &w.workload.expect;
                    let declared = match category {
                        WatchCategory::Credential => &e.credentials,
                        WatchCategory::AuthEndpoint => &e.auth_endpoints,
                        WatchCategory::Secret => &e.secrets,
                    }
                    .contains(&watch_name);
                    if !declared {
                        push(
                            Rule::OutOfPattern,
                            wl_name.clone(),
                            &resource,
                            format!(
                                "workload {} does not declare {} {watch_name}",
                                w.workload.name,
                                category.as_str()
                            ),
                        );
                    } else if !w.in_window(t) {
                        push(
                            Rule::OutOfWindow,
                            wl_name.clone(),
                            &resource,
                            format!(
                                "{} used {what} at {} outside its windows ({})",
                                w.workload.name,
                                t.to_rfc3339(),
                                w.rendered_windows_joined()
                            ),
                        );
                    }
                }
            }
            human_use(reg, ctx, event, &watch_name, &resource, &mut push);
            dormant(reg, ctx, event, &resource, &mut push);
        }
        EventKind::SecretAccess { method, target_pid, target, watch, path, .. } => {
            let unix = *method == SecretMethod::UnixSocket;
            let victim = target.as_deref().and_then(|t| reg.correlate(ctx.host, t));
            let resource = Resource {
                kind: if unix { "secret".into() } else { "process".into() },
                watch: Some(watch.clone()).filter(|w| !w.is_empty()),
                path: Some(path.clone()).filter(|p| !p.is_empty()),
                method: Some(method.as_str().into()),
                target_pid: Some(*target_pid),
                target_workload: victim.map(|v| v.workload.name.clone()),
                ..Resource::default()
            };
            let declared = wl.is_some_and(|w| {
                let e = &w.workload.expect;
                if unix { e.secrets.contains(watch) } else { e.cross_process.contains(method) }
            });
            if !declared {
                let who = wl.map_or("an undeclared process".to_owned(), |w| {
                    format!("workload {}", w.workload.name)
                });
                let of =
                    victim.map_or(String::new(), |v| format!(" of workload {}", v.workload.name));
                push(
                    Rule::SecretMisuse,
                    wl_name.clone(),
                    &resource,
                    format!(
                        "{who} ({}) read secrets of {}{of} via {}",
                        event.process.exe,
                        event.kind.secret_target().unwrap_or_default(),
                        method.as_str()
                    ),
                );
            }
            if unix {
                human_use(reg, ctx, event, watch, &resource, &mut push);
            }
            dormant(reg, ctx, event, &resource, &mut push);
        }
        EventKind::PrivilegeChange {
            via,
            old_uid,
            old_euid,
            new_uid,
            new_euid,
            old_cap_effective,
            new_cap_effective,
        } => {
            // Without CAP_SETUID the setuid family only switches among the ids a process
            // already has: one whose real uid is root going back to euid 0 gains nothing.
            let restores_root = via != "exec" && *old_uid == 0;
            let became_root = (*new_uid == 0 && *old_uid != 0)
                || (*new_euid == 0 && *old_euid != 0 && !restores_root);
            // capset only moves capabilities within the permitted set, which it can never
            // grow, and going back to euid 0 refills the effective set from it: either way
            // the process uses privilege it already held (setpriv, daemons), it gains none.
            let uses_held = via == "capset" || restores_root;
            let gained_caps = if uses_held { 0 } else { new_cap_effective & !old_cap_effective };
            if (became_root || gained_caps != 0)
                && !wl.is_some_and(|w| w.workload.expect.privilege_escalation)
            {
                let resource = Resource {
                    kind: "privilege".into(),
                    method: Some(via.clone()),
                    ..Resource::default()
                };
                let what = if became_root {
                    format!("uid {old_uid}/{old_euid} -> {new_uid}/{new_euid}")
                } else {
                    format!("gained capabilities {gained_caps:#x}")
                };
                let who = wl.map_or("an undeclared process".to_owned(), |w| {
                    format!("workload {}", w.workload.name)
                });
                push(
                    Rule::PrivilegeEscalation,
                    wl_name.clone(),
                    &resource,
                    format!("{who} ({}) escalated via {via}: {what}", event.process.exe),
                );
            }
        }
        EventKind::Exec { .. } | EventKind::Exit { .. } | EventKind::Fork { .. } => {}
    }
    out
}

fn human_use(
    reg: &Registry,
    ctx: Context<'_>,
    event: &Event,
    watch: &str,
    resource: &Resource,
    push: &mut impl FnMut(Rule, Option<String>, &Resource, String),
) {
    let Some(why) = event.process.interactive_reason() else {
        return;
    };
    // The identity whose credential this is: the matched workload when it is non-human, or else
    // the non-human workload that declares the credential.
    let owner = match ctx.workload {
        Some(w) if w.workload.identity_type.is_nhi() => Some(w),
        Some(_) => None,
        None => reg.nhi_owners_of(watch).into_iter().next(),
    };
    if let Some(w) = owner {
        push(
            Rule::HumanUseOfNhi,
            Some(w.workload.name.clone()),
            resource,
            format!(
                "{} credential of {} used from an interactive session ({why}) by {}",
                w.workload.identity_type.as_str(),
                w.workload.name,
                event.process.exe
            ),
        );
    }
}

fn dormant(
    reg: &Registry,
    ctx: Context<'_>,
    event: &Event,
    resource: &Resource,
    push: &mut impl FnMut(Rule, Option<String>, &Resource, String),
) {
    let (Some(w), Some(last)) = (ctx.workload, ctx.last_active) else {
        return;
    };
    let period = w.workload.dormancy.map_or_else(|| reg.settings.default_dormancy(), |d| d.0);
    let silent = event.time - last;
    if silent > period {
        push(
            Rule::DormantIdentity,
            Some(w.workload.name.clone()),
            resource,
            format!(
                "{} was silent for {} days (dormancy period {} days) and is active again",
                w.workload.name,
                silent.num_days(),
                period.num_days()
            ),
        );
    }
}
