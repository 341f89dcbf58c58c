//! Checks a set of declarations against each other and the stored registry. Every problem is
//! collected; the caller applies nothing unless the list is empty.

use std::collections::{BTreeMap, HashMap};

use globset::GlobBuilder;

use super::{
    model::{ApprovedChange, Declaration, Kind, Team, Watch, WatchCategory, Workload},
    parse::{Parsed, Problem, Source},
};
use crate::{detect::window::CompiledWindow, event::SecretMethod, rule::Rule};

/// The declarations in force, by kind and name.
pub type Objects = BTreeMap<(Kind, String), Declaration>;

/// Longest approved change; anything longer is a window, not a change.
pub const MAX_CHANGE_DAYS: i64 = 31;

/// Compiles a path-like glob the way selectors and watches use them: `*` stays inside one path
/// component, `**` crosses them.
pub fn glob(pattern: &str) -> Result<globset::GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(pattern).literal_separator(true).build()?.compile_matcher())
}

/// Validates `incoming` on top of `existing`. Returns every problem found.
pub fn validate(existing: &Objects, incoming: &[Parsed]) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut merged = existing.clone();
    let mut sources: HashMap<(Kind, String), &Source> = HashMap::new();
    for p in incoming {
        let key = (p.declaration.kind(), p.declaration.name().to_owned());
        if let Some(first) = sources.get(&key) {
            problems.push(Problem::at(
                &p.source,
                object(&p.declaration),
                "name",
                format!("declared twice; also in {} document {}", first.file, first.document),
            ));
            continue;
        }
        sources.insert(key.clone(), &p.source);
        merged.insert(key, p.declaration.clone());
    }
    let stored = Source { file: "(stored)".to_owned(), document: 0 };
    for (key, decl) in &merged {
        let source = sources.get(key).copied().unwrap_or(&stored);
        let is_incoming = sources.contains_key(key);
        for (field, message) in check(decl, &merged) {
            // Stored objects were valid when applied; report them only when this apply breaks them.
            let message = if is_incoming {
                message
            } else {
                format!("{message} (a stored declaration this apply would break)")
            };
            problems.push(Problem::at(source, object(decl), field, message));
        }
    }
    problems
}

/// Why `kind/name` cannot be deleted: the declarations that still refer to it.
pub fn referrers(objects: &Objects, kind: Kind, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for decl in objects.values() {
        match decl {
            Declaration::Workload(w) => {
                let e = &w.expect;
                let uses_watch = e
                    .credentials
                    .iter()
                    .chain(&e.auth_endpoints)
                    .chain(&e.secrets)
                    .any(|n| n == name);
                if (kind == Kind::Team && w.owner == name) || (kind == Kind::Watch && uses_watch) {
                    out.push(object(decl));
                }
            }
            Declaration::ApprovedChange(c) if kind == Kind::Workload && c.workload == name => {
                out.push(object(decl))
            }
            Declaration::Team(t)
                if kind == Kind::Team
                    && t.name != name
                    && t.route.as_ref().and_then(|r| r.escalate_to.as_deref()) == Some(name) =>
            {
                out.push(object(decl))
            }
            _ => {}
        }
    }
    out
}

fn object(d: &Declaration) -> String {
    format!("{} {}", d.kind(), d.name())
}

type Found = Vec<(String, String)>;

fn check(decl: &Declaration, all: &Objects) -> Found {
    let mut found = Found::new();
    check_name(decl.kind(), decl.name(), &mut found);
    match decl {
        Declaration::Watch(w) => check_watch(w, &mut found),
        Declaration::Team(t) => check_team(t, all, &mut found),
        Declaration::Workload(w) => check_workload(w, all, &mut found),
        Declaration::ApprovedChange(c) => check_change(c, all, &mut found),
        Declaration::Detections(d) => {
            for name in d.rules.keys() {
                if Rule::parse(name).is_none() {
                    let known: Vec<&str> = Rule::ALL.iter().map(|r| r.as_str()).collect();
                    found.push((
                        format!("rules.{name}"),
                        format!("unknown rule `{name}`; expected one of {}", known.join(", ")),
                    ));
                }
            }
            if d.name != "default" {
                found.push((
                    "name".into(),
                    format!(
                        "expected `default` (there is one Detections object), got {:?}",
                        d.name
                    ),
                ));
            }
        }
    }
    found
}

fn check_name(kind: Kind, name: &str, found: &mut Found) {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 128 || !ok_chars || !starts_ok {
        found.push((
            "name".into(),
            format!(
                "{kind} name {name:?} is invalid; expected 1 to 128 letters, digits, `-`, `_` or `.`, starting with a letter or digit"
            ),
        ));
    }
}

fn check_watch(w: &Watch, found: &mut Found) {
    match w.category {
        WatchCategory::Credential | WatchCategory::Secret => {
            if w.paths.is_empty() {
                found.push((
                    "paths".into(),
                    format!("a {} watch needs at least one path", w.category.as_str()),
                ));
            }
            if !w.endpoints.is_empty() {
                found.push((
                    "endpoints".into(),
                    "only auth-endpoint watches have endpoints; use `paths`".into(),
                ));
            }
        }
        WatchCategory::AuthEndpoint => {
            if w.endpoints.is_empty() {
                found.push((
                    "endpoints".into(),
                    "an auth-endpoint watch needs at least one endpoint".into(),
                ));
            }
            if !w.paths.is_empty() {
                found.push((
                    "paths".into(),
                    "auth-endpoint watches have endpoints, not paths".into(),
                ));
            }
        }
    }
    // The sensor's syntax: watches are sent to sensors as their policy.
    let (mut includes, mut excludes) = (0, 0);
    for (i, path) in w.paths.iter().enumerate() {
        match crate::watchspec::parse_path(path) {
            Ok(p) if p.exclude() => excludes += 1,
            Ok(_) => includes += 1,
            Err(e) => found.push((format!("paths[{i}]"), e)),
        }
    }
    if includes == 0 && excludes > 0 {
        found.push(("paths".into(), "only exclusions (`!…`); name what to watch".into()));
    }
    for (i, ep) in w.endpoints.iter().enumerate() {
        if let Err(msg) = crate::watchspec::parse_endpoint(ep) {
            found.push((format!("endpoints[{i}]"), msg));
        }
    }
}

fn team_exists(all: &Objects, name: &str) -> bool {
    all.contains_key(&(Kind::Team, name.to_owned()))
}

/// Checks an `http://` or `https://` URL with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    let host = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
    match host {
        Some(h) if !h.is_empty() && !h.contains(char::is_whitespace) && !url.contains(' ') => {
            Ok(())
        }
        _ => Err(format!("expected an http:// or https:// URL with a host, got {url:?}")),
    }
}

/// The escalation chain starting at `team`, when it comes back to a team already in it.
fn escalation_cycle(all: &Objects, team: &str) -> Option<Vec<String>> {
    let mut chain = vec![team.to_owned()];
    let mut at = team.to_owned();
    loop {
        let next = match all.get(&(Kind::Team, at.clone())) {
            Some(Declaration::Team(t)) => t.route.as_ref().and_then(|r| r.escalate_to.clone()),
            _ => None,
        }?;
        if let Some(i) = chain.iter().position(|t| *t == next) {
            chain.push(next);
            return (i == 0).then_some(chain);
        }
        chain.push(next.clone());
        at = next;
    }
}

fn check_team(t: &Team, all: &Objects, found: &mut Found) {
    let Some(route) = &t.route else { return };
    for (field, url) in [
        ("route.webhook", route.webhook.as_ref()),
        ("route.slack_webhook", route.slack_webhook.as_ref()),
        ("route.pagerduty.url", route.pagerduty.as_ref().map(|p| &p.url)),
    ] {
        if let Some(Err(e)) = url.map(|u| check_url(u)) {
            found.push((field.into(), e));
        }
    }
    if let Some(pd) = &route.pagerduty
        && pd.routing_key.trim().is_empty()
    {
        found.push(("route.pagerduty.routing_key".into(), "empty routing key".into()));
    }
    if let Some(path) = &route.jsonl
        && (!path.starts_with('/') || path.ends_with('/'))
    {
        found.push((
            "route.jsonl".into(),
            format!("expected the absolute path of a file on the collector, got {path:?}"),
        ));
    }
    match (&route.escalate_after, &route.escalate_to) {
        (Some(_), None) => found.push((
            "route.escalate_to".into(),
            "`escalate_after` is set; name the team to escalate to".into(),
        )),
        (None, Some(_)) => found.push((
            "route.escalate_after".into(),
            "`escalate_to` is set; say after how long (e.g. 15m)".into(),
        )),
        (Some(after), Some(_)) if after.0 <= chrono::Duration::zero() => {
            found.push(("route.escalate_after".into(), "must be longer than zero".into()))
        }
        _ => {}
    }
    if let Some(to) = &route.escalate_to {
        if to == &t.name {
            found.push(("route.escalate_to".into(), "a team cannot escalate to itself".into()));
        } else if !team_exists(all, to) {
            found.push((
                "route.escalate_to".into(),
                format!("team {to:?} is not declared; declare it as a Team first"),
            ));
        } else if let Some(cycle) = escalation_cycle(all, &t.name) {
            found.push((
                "route.escalate_to".into(),
                format!("escalation loop: {}; an escalation chain must end", cycle.join(" -> ")),
            ));
        }
    }
}

fn check_workload(w: &Workload, all: &Objects, found: &mut Found) {
    if !team_exists(all, &w.owner) {
        found.push((
            "owner".into(),
            format!("team {:?} is not declared; expected the name of a Team", w.owner),
        ));
    }
    let s = &w.selector;
    let given = usize::from(!s.host_labels.is_empty()) + s.single_selectors();
    if given == 0 {
        found.push(("match".into(), "at least one selector is required (host_labels, user, uid, exe, exe_sha256, systemd_unit, container_id, container_image, k8s_namespace, k8s_pod); an empty match would claim every process".into()));
    }
    if let Some(exe) = &s.exe {
        if !(exe.starts_with('/') || exe.starts_with('*')) {
            found.push((
                "match.exe".into(),
                format!("expected an absolute path or glob, got {exe:?}"),
            ));
        } else if let Err(e) = glob(exe) {
            found.push(("match.exe".into(), format!("not a valid glob: {e}")));
        }
    }
    for (field, value) in
        [("match.container_image", &s.container_image), ("match.k8s_pod", &s.k8s_pod)]
    {
        if let Some(Err(e)) = value.as_deref().map(glob) {
            found.push((field.into(), format!("not a valid glob: {e}")));
        }
    }
    if let Some(sha) = &s.exe_sha256
        && (sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()))
    {
        found.push(("match.exe_sha256".into(), format!("expected 64 hex digits, got {sha:?}")));
    }
    if let Some(id) = &s.container_id
        && (id.len() < 12 || !id.chars().all(|c| c.is_ascii_hexdigit()))
    {
        found.push((
            "match.container_id".into(),
            format!("expected at least 12 hex digits, got {id:?}"),
        ));
    }
    if s.user.as_deref() == Some("") {
        found.push(("match.user".into(), "empty user name".into()));
    }
    let e = &w.expect;
    for (field, list, category) in [
        ("expect.credentials", &e.credentials, WatchCategory::Credential),
        ("expect.auth_endpoints", &e.auth_endpoints, WatchCategory::AuthEndpoint),
        ("expect.secrets", &e.secrets, WatchCategory::Secret),
    ] {
        for (i, name) in list.iter().enumerate() {
            match all.get(&(Kind::Watch, name.clone())) {
                Some(Declaration::Watch(watch)) if watch.category != category => found.push((
                    format!("{field}[{i}]"),
                    format!(
                        "watch {name:?} has category {}; expected a {} watch here",
                        watch.category.as_str(),
                        category.as_str()
                    ),
                )),
                Some(_) => {}
                None => found.push((
                    format!("{field}[{i}]"),
                    format!("watch {name:?} is not declared; expected the name of a Watch"),
                )),
            }
        }
    }
    for (i, m) in e.cross_process.iter().enumerate() {
        if *m == SecretMethod::UnixSocket {
            found.push((
                format!("expect.cross_process[{i}]"),
                "unix sockets are declared as `secrets` (watch names)".into(),
            ));
        }
    }
    let mut compiled: Vec<(usize, CompiledWindow)> = Vec::new();
    for (i, w) in e.windows.iter().enumerate() {
        match CompiledWindow::compile(w) {
            Ok(c) => compiled.push((i, c)),
            Err(err) => {
                found.push((format!("expect.windows[{i}].{}", err.field()), err.to_string()))
            }
        }
    }
    for (a, (i, wa)) in compiled.iter().enumerate() {
        for (j, wb) in compiled.iter().skip(a + 1) {
            if wa.tz == wb.tz && wa.overlaps(wb) {
                found.push((
                    format!("expect.windows[{j}]"),
                    format!(
                        "overlaps windows[{i}] ({} and {}); merge them into one window",
                        wa.render(),
                        wb.render()
                    ),
                ));
            }
        }
    }
}

fn check_change(c: &ApprovedChange, all: &Objects, found: &mut Found) {
    if !all.contains_key(&(Kind::Workload, c.workload.clone())) {
        found.push((
            "workload".into(),
            format!("workload {:?} is not declared; expected the name of a Workload", c.workload),
        ));
    }
    if c.until <= c.from {
        found.push(("until".into(), format!("must be after `from` ({})", c.from.to_rfc3339())));
    } else if c.until - c.from > chrono::Duration::days(MAX_CHANGE_DAYS) {
        found.push((
            "until".into(),
            format!("the change lasts more than {MAX_CHANGE_DAYS} days; declare a window on the workload instead"),
        ));
    }
    if c.reason.trim().is_empty() {
        found.push(("reason".into(), "say why (it is shown in alerts and the audit log)".into()));
    }
    if c.covers.is_empty() {
        found.push(("covers".into(), "empty; leave it out to cover out-of-window".into()));
    }
}
