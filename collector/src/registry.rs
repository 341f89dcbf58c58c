//! The live registry: applies and deletes declarations (validate everything, then commit all or
//! nothing as new revisions), and hands a compiled snapshot to ingest.

use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::{
    clock::Clock,
    correlate::Registry,
    declarations::{
        Declaration, Kind, Objects, Parsed, Problem, diff::line_diff, parse_file, validate,
        validate::referrers,
    },
    store::{DeclarationChange, Store, StoreError},
};

/// Revisions per workload that alerts show.
pub const REVISIONS_IN_ALERTS: usize = 3;

/// What happened to one declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectChange {
    pub kind: Kind,
    pub name: String,
    /// created | updated | unchanged | deleted.
    pub action: String,
    /// The new revision; 0 when nothing was stored.
    pub revision: i64,
}

/// Why an apply or delete failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{} problem(s); nothing was applied", .0.len())]
    Invalid(Vec<Problem>),
    #[error("{0}")]
    Refused(String),
    /// The caller's role may not change the declaration.
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Shared handle to the registry.
pub struct RegistryHandle {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    current: RwLock<Arc<Registry>>,
    /// Serialises validate-then-commit.
    writing: Mutex<()>,
}

impl RegistryHandle {
    /// Loads the registry from the store.
    pub fn load(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let handle = Self {
            store,
            clock,
            current: RwLock::new(Arc::new(Registry::default())),
            writing: Mutex::new(()),
        };
        handle.reload()?;
        Ok(handle)
    }

    /// The current compiled snapshot.
    pub fn snapshot(&self) -> Arc<Registry> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rebuilds the snapshot from the store.
    pub fn reload(&self) -> Result<(), StoreError> {
        let objects: Objects = self
            .store
            .declarations()?
            .into_iter()
            .map(|d| ((d.declaration.kind(), d.declaration.name().to_owned()), d.declaration))
            .collect();
        let revisions = self.store.workload_revisions(REVISIONS_IN_ALERTS)?;
        let registry = Registry::build(objects, revisions);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(registry);
        Ok(())
    }

    /// Parses, validates and (unless `dry_run`) commits `files` as one unit. `allowed` is asked
    /// about every declaration (with the objects as they would be after the apply) and returns
    /// why the caller may not change it.
    pub fn apply(
        &self,
        files: &[(String, String)],
        author: &str,
        dry_run: bool,
        allowed: &dyn Fn(&Declaration, &Objects) -> Result<(), String>,
    ) -> Result<Vec<ObjectChange>, RegistryError> {
        let _guard = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut parsed: Vec<Parsed> = Vec::new();
        let mut problems = Vec::new();
        for (name, text) in files {
            parse_file(name, text, &mut parsed, &mut problems);
        }
        let existing = self.snapshot().objects.clone();
        problems.extend(validate(&existing, &parsed));
        let mut merged = existing.clone();
        for p in &parsed {
            merged.insert(
                (p.declaration.kind(), p.declaration.name().to_owned()),
                p.declaration.clone(),
            );
        }
        for p in &parsed {
            if let Err(why) = allowed(&p.declaration, &merged) {
                let object = format!("{} {}", p.declaration.kind(), p.declaration.name());
                problems.push(Problem::at(&p.source, object, "(document)", why));
            }
        }
        if parsed.is_empty() && problems.is_empty() {
            problems.push(Problem {
                file: files.first().map(|f| f.0.clone()).unwrap_or_else(|| "(none)".into()),
                document: 0,
                object: String::new(),
                field: "(document)".into(),
                message: "no declarations found".into(),
            });
        }
        if !problems.is_empty() {
            return Err(RegistryError::Invalid(problems));
        }
        let mut out = Vec::new();
        let mut changes = Vec::new();
        for p in parsed {
            let (kind, name) = (p.declaration.kind(), p.declaration.name().to_owned());
            let old = existing.get(&(kind, name.clone()));
            if old == Some(&p.declaration) {
                out.push(ObjectChange { kind, name, action: "unchanged".into(), revision: 0 });
                continue;
            }
            let diff = line_diff(
                &old.map(Declaration::to_yaml).unwrap_or_default(),
                &p.declaration.to_yaml(),
            );
            let action = if old.is_some() { "updated" } else { "created" };
            out.push(ObjectChange { kind, name: name.clone(), action: action.into(), revision: 0 });
            changes.push(DeclarationChange { kind, name, new: Some(p.declaration), diff });
        }
        if dry_run || changes.is_empty() {
            return Ok(out);
        }
        let revisions = self.store.commit_declarations(changes, author, self.clock.now())?;
        let mut revs = revisions.into_iter();
        for change in out.iter_mut().filter(|c| c.action != "unchanged") {
            change.revision = revs.next().map_or(0, |r| r.revision);
        }
        self.reload()?;
        Ok(out)
    }

    /// Deletes one declaration, refusing while others refer to it.
    pub fn delete(
        &self,
        kind: Kind,
        name: &str,
        author: &str,
        allowed: &dyn Fn(&Declaration, &Objects) -> Result<(), String>,
    ) -> Result<ObjectChange, RegistryError> {
        let _guard = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = self.snapshot();
        let Some(old) = snapshot.objects.get(&(kind, name.to_owned())) else {
            return Err(RegistryError::Store(StoreError::NotFound(format!("{kind} {name}"))));
        };
        allowed(old, &snapshot.objects).map_err(RegistryError::Forbidden)?;
        let users = referrers(&snapshot.objects, kind, name);
        if !users.is_empty() {
            return Err(RegistryError::Refused(format!(
                "{kind} {name} is still referred to by {}; change or delete those first",
                users.join(", ")
            )));
        }
        let diff = line_diff(&old.to_yaml(), "");
        let change = DeclarationChange { kind, name: name.to_owned(), new: None, diff };
        let revs = self.store.commit_declarations(vec![change], author, self.clock.now())?;
        self.reload()?;
        Ok(ObjectChange {
            kind,
            name: name.to_owned(),
            action: "deleted".into(),
            revision: revs.first().map_or(0, |r| r.revision),
        })
    }
}
