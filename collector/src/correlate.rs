//! Correlation: which declared workload is behind an event, and which watch it touched.
//!
//! A workload matches a process when **every** selector it gives holds. When several match, the
//! most specific wins, decided in this order (the first difference decides):
//!
//! 1. more selectors given (each host label counts as one selector);
//! 2. more exact selectors (an `exe`, `container_image` or `k8s_pod` without glob characters is
//!    exact; the other selectors are always exact);
//! 3. more literal characters in the glob selectors (`/opt/pay/*` beats `/opt/*`);
//! 4. the name, alphabetically.
//!
//! The order is total, so the result never depends on declaration or storage order.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
};

use chrono::{DateTime, Utc};
use globset::GlobMatcher;

use crate::watchspec::{Endpoint, PathSet, parse_endpoint};
use serde::{Deserialize, Serialize};

use crate::{
    declarations::{
        Declaration, Kind, Objects,
        model::{ApprovedChange, Detections, Team, Watch, WatchCategory, Workload},
        validate::glob,
    },
    detect::window::CompiledWindow,
    event::{Host, Process},
    rule::{Rule, Severity},
};

/// A summary of one stored revision, as alerts show them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRef {
    pub revision: i64,
    pub author: String,
    pub time: DateTime<Utc>,
    pub action: String,
    /// Changed lines only.
    pub diff: String,
}

/// A watch ready for matching (the sensor's syntax: see [`crate::watchspec`]).
#[derive(Debug, Clone)]
pub struct CompiledWatch {
    pub watch: Watch,
    paths: PathSet,
    endpoints: Vec<Endpoint>,
}

impl CompiledWatch {
    fn new(watch: Watch) -> Self {
        let paths = PathSet::new(&watch.paths);
        let endpoints = watch.endpoints.iter().filter_map(|e| parse_endpoint(e).ok()).collect();
        Self { watch, paths, endpoints }
    }

    /// Whether `path` is one this watch guards (`~/` is any home: `/root`, `/home/*`).
    pub fn covers_path(&self, path: &str) -> bool {
        self.paths.matches(path)
    }

    /// Whether `address:port` is one this watch guards (any protocol).
    pub fn covers_endpoint(&self, address: &str, port: u16) -> bool {
        self.endpoints.iter().any(|e| e.covers(address, port, ""))
    }
}

/// Precedence key of a workload; larger wins (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Specificity {
    pub selectors: usize,
    pub exact: usize,
    pub literal_chars: usize,
}

/// A workload ready for matching.
#[derive(Debug, Clone)]
pub struct CompiledWorkload {
    pub workload: Workload,
    pub windows: Vec<CompiledWindow>,
    pub specificity: Specificity,
    exe: Option<GlobMatcher>,
    image: Option<GlobMatcher>,
    pod: Option<GlobMatcher>,
    /// The windows rendered once (alert reasons and bodies quote them).
    rendered: Vec<String>,
    rendered_joined: String,
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

impl CompiledWorkload {
    fn new(workload: Workload) -> Self {
        let s = &workload.selector;
        let compile = |o: &Option<String>| o.as_deref().and_then(|p| glob(p).ok());
        let globs = [&s.exe, &s.container_image, &s.k8s_pod];
        let glob_count = globs.iter().filter(|g| g.as_deref().is_some_and(is_glob)).count();
        let literal_chars = globs
            .iter()
            .filter_map(|g| g.as_deref())
            .map(|g| g.chars().filter(|c| !"*?[]{}".contains(*c)).count())
            .sum();
        let selectors = s.host_labels.len() + s.single_selectors();
        let windows = workload
            .expect
            .windows
            .iter()
            .filter_map(|w| CompiledWindow::compile(w).ok())
            .collect::<Vec<_>>();
        let rendered: Vec<String> = windows.iter().map(CompiledWindow::render).collect();
        Self {
            rendered_joined: rendered.join("; "),
            rendered,
            exe: compile(&s.exe),
            image: compile(&s.container_image),
            pod: compile(&s.k8s_pod),
            windows,
            specificity: Specificity { selectors, exact: selectors - glob_count, literal_chars },
            workload,
        }
    }

    /// Whether every selector holds for this process on this host.
    pub fn matches(&self, host: &Host, p: &Process) -> bool {
        let s = &self.workload.selector;
        let glob_ok = |g: &Option<GlobMatcher>, v: &str| {
            g.as_ref().is_none_or(|g| !v.is_empty() && g.is_match(v))
        };
        // A conjunction of pure tests: the cheap comparisons go first, the globs last.
        s.uid.is_none_or(|u| p.uid == u)
            && s.systemd_unit.as_ref().is_none_or(|u| *u == p.systemd_unit)
            && s.k8s_namespace.as_ref().is_none_or(|n| *n == p.k8s_namespace)
            && s.container_id.as_ref().is_none_or(|id| {
                !p.container_id.is_empty() && p.container_id.starts_with(id.as_str())
            })
            && s.exe_sha256.as_ref().is_none_or(|h| h.eq_ignore_ascii_case(&p.exe_sha256))
            && s.host_labels.iter().all(|(k, v)| host.labels.get(k) == Some(v))
            && s.user.as_ref().is_none_or(|u| {
                p.user.as_deref() == Some(u.as_str()) || u.parse::<u32>().ok() == Some(p.uid)
            })
            && glob_ok(&self.exe, &p.exe)
            && glob_ok(&self.image, &p.container_image)
            && glob_ok(&self.pod, &p.k8s_pod)
    }

    /// The window texts in the workload's zones, or `any time` when it declares none.
    pub fn rendered_windows(&self) -> Vec<String> {
        self.rendered.clone()
    }

    /// [`CompiledWorkload::rendered_windows`] joined with `; `.
    pub fn rendered_windows_joined(&self) -> &str {
        &self.rendered_joined
    }

    /// Whether `t` is inside a declared window (no windows: always).
    pub fn in_window(&self, t: DateTime<Utc>) -> bool {
        self.windows.is_empty() || self.windows.iter().any(|w| w.contains(t))
    }
}

/// Effective detection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub detections: Detections,
}

impl Settings {
    /// Severity of `rule`, or `None` when the rule is disabled.
    pub fn severity(&self, rule: Rule) -> Option<Severity> {
        let s = self.detections.rules.get(rule.as_str());
        if s.and_then(|s| s.enabled) == Some(false) {
            return None;
        }
        Some(s.and_then(|s| s.severity).unwrap_or_else(|| rule.default_severity()))
    }

    /// Repeats closer than this fold into one alert.
    pub fn grouping_window(&self) -> chrono::Duration {
        self.detections.grouping_window.map_or(chrono::Duration::hours(1), |d| d.0)
    }

    /// Dormancy period for workloads that set none.
    pub fn default_dormancy(&self) -> chrono::Duration {
        self.detections.default_dormancy.map_or(chrono::Duration::days(30), |d| d.0)
    }
}

/// The registry compiled for correlation and detection; rebuilt after every apply or delete.
#[derive(Debug, Clone)]
pub struct Registry {
    pub objects: Objects,
    pub watches: HashMap<String, CompiledWatch>,
    /// In precedence order: the first match wins.
    pub workloads: Vec<CompiledWorkload>,
    pub teams: HashMap<String, Team>,
    /// By workload, ordered by start.
    pub changes: HashMap<String, Vec<ApprovedChange>>,
    pub settings: Settings,
    /// Recent revisions of each workload's declaration, newest first.
    pub revisions: HashMap<String, Vec<RevisionRef>>,
    /// When each workload was first declared (start of its dormancy clock).
    pub declared_at: HashMap<String, DateTime<Utc>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::build(Objects::new(), HashMap::new())
    }
}

impl Registry {
    /// Compiles validated declarations. `revisions` holds each workload's recent revisions,
    /// newest first (the oldest listed is taken as its declaration time).
    pub fn build(objects: Objects, revisions: HashMap<String, Vec<RevisionRef>>) -> Self {
        let mut watches = HashMap::new();
        let mut workloads = Vec::new();
        let mut teams = HashMap::new();
        let mut changes: HashMap<String, Vec<ApprovedChange>> = HashMap::new();
        let mut detections = Detections { name: "default".into(), ..Detections::default() };
        for decl in objects.values() {
            match decl {
                Declaration::Watch(w) => {
                    watches.insert(w.name.clone(), CompiledWatch::new(w.clone()));
                }
                Declaration::Team(t) => {
                    teams.insert(t.name.clone(), t.clone());
                }
                Declaration::Workload(w) => workloads.push(CompiledWorkload::new(w.clone())),
                Declaration::ApprovedChange(c) => {
                    changes.entry(c.workload.clone()).or_default().push(c.clone())
                }
                Declaration::Detections(d) => detections = d.clone(),
            }
        }
        workloads.sort_by(|a, b| {
            Reverse(a.specificity)
                .cmp(&Reverse(b.specificity))
                .then_with(|| a.workload.name.cmp(&b.workload.name))
        });
        for list in changes.values_mut() {
            list.sort_by(|a, b| a.from.cmp(&b.from).then_with(|| a.name.cmp(&b.name)));
        }
        let declared_at = revisions
            .iter()
            .filter_map(|(name, revs)| revs.iter().map(|r| r.time).min().map(|t| (name.clone(), t)))
            .collect();
        Self {
            objects,
            watches,
            workloads,
            teams,
            changes,
            settings: Settings { detections },
            revisions,
            declared_at,
        }
    }

    /// The workload behind a process on a host: the most specific match, if any.
    pub fn correlate(&self, host: &Host, process: &Process) -> Option<&CompiledWorkload> {
        self.workloads.iter().find(|w| w.matches(host, process))
    }

    /// Every workload that matches, most specific first (for explanations).
    pub fn all_matches(&self, host: &Host, process: &Process) -> Vec<&CompiledWorkload> {
        self.workloads.iter().filter(|w| w.matches(host, process)).collect()
    }

    /// A workload by name.
    pub fn workload(&self, name: &str) -> Option<&CompiledWorkload> {
        self.workloads.iter().find(|w| w.workload.name == name)
    }

    /// The watch an opened file belongs to: the name the sensor gave when the registry knows it,
    /// otherwise the first watch (by name) whose paths cover the file.
    pub fn watch_for_path(&self, named: &str, path: &str) -> Option<&CompiledWatch> {
        self.watches.get(named).or_else(|| {
            let mut hits: Vec<&CompiledWatch> =
                self.watches.values().filter(|w| w.covers_path(path)).collect();
            hits.sort_by(|a, b| a.watch.name.cmp(&b.watch.name));
            hits.into_iter().next()
        })
    }

    /// The watch an outbound connection belongs to (same rule as [`Self::watch_for_path`]).
    pub fn watch_for_endpoint(
        &self,
        named: &str,
        address: &str,
        port: u16,
    ) -> Option<&CompiledWatch> {
        self.watches.get(named).or_else(|| {
            let mut hits: Vec<&CompiledWatch> =
                self.watches.values().filter(|w| w.covers_endpoint(address, port)).collect();
            hits.sort_by(|a, b| a.watch.name.cmp(&b.watch.name));
            hits.into_iter().next()
        })
    }

    /// The approved change of `workload` in force at `t` that covers `rule`.
    pub fn active_change(
        &self,
        workload: &str,
        t: DateTime<Utc>,
        rule: Rule,
    ) -> Option<&ApprovedChange> {
        self.changes
            .get(workload)?
            .iter()
            .find(|c| c.from <= t && t < c.until && c.covers.contains(&rule))
    }

    /// Any approved change of `workload` in force at `t`, whatever it covers.
    pub fn change_in_force(&self, workload: &str, t: DateTime<Utc>) -> Option<&ApprovedChange> {
        self.changes.get(workload)?.iter().find(|c| c.from <= t && t < c.until)
    }

    /// The change of `workload` that ended most recently before `t`.
    pub fn last_expired_change(&self, workload: &str, t: DateTime<Utc>) -> Option<&ApprovedChange> {
        self.changes.get(workload)?.iter().filter(|c| c.until <= t).max_by_key(|c| c.until)
    }

    /// Workloads that declare `watch` among their credentials, auth endpoints or secrets, by
    /// name.
    pub fn declaring(&self, watch: &str) -> Vec<&CompiledWorkload> {
        let mut out: Vec<&CompiledWorkload> = self
            .workloads
            .iter()
            .filter(|w| {
                let e = &w.workload.expect;
                e.credentials.iter().chain(&e.auth_endpoints).chain(&e.secrets).any(|n| n == watch)
            })
            .collect();
        out.sort_by(|a, b| a.workload.name.cmp(&b.workload.name));
        out
    }

    /// Non-human workloads that declare `watch` (the credential's owners), by name.
    pub fn nhi_owners_of(&self, watch: &str) -> Vec<&CompiledWorkload> {
        let mut out = self.declaring(watch);
        out.retain(|w| w.workload.identity_type.is_nhi());
        out
    }

    /// The category of a watch the registry knows.
    pub fn category(&self, watch: &str) -> Option<WatchCategory> {
        self.watches.get(watch).map(|w| w.watch.category)
    }

    /// Declarations of one kind, by name.
    pub fn of_kind(&self, kind: Kind) -> BTreeMap<&str, &Declaration> {
        self.objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, n), d)| (n.as_str(), d))
            .collect()
    }
}
