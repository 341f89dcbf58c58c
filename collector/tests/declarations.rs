//! Declarations: the bad-declaration corpus, all-or-nothing apply, every problem at once,
//! revisions with author and diff, and delete refusals.

mod common;

use std::{path::Path, sync::Arc};

use collector::{
    clock::{Clock, ManualClock},
    declarations::{Declaration, Kind, Objects},
    registry::{RegistryError, RegistryHandle},
    store::{Store, sqlite::SqliteStore},
};
use common::*;

fn allow_all(_: &Declaration, _: &Objects) -> Result<(), String> {
    Ok(())
}

fn handle(dir: &Path) -> (Arc<dyn Store>, RegistryHandle) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir).expect("open store"));
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(t("2026-11-30T09:00:00Z")));
    let reg = RegistryHandle::load(store.clone(), clock).expect("load registry");
    (store, reg)
}

fn apply(
    reg: &RegistryHandle,
    name: &str,
    text: &str,
) -> Result<Vec<collector::registry::ObjectChange>, RegistryError> {
    reg.apply(&[(name.to_owned(), text.to_owned())], "alice (admin)", false, &allow_all)
}

#[test]
fn every_bad_declaration_is_refused_with_its_message_and_nothing_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, reg) = handle(dir.path());
    apply(&reg, "example.yaml", EXAMPLE_YAML).expect("the example applies");
    let before = store.declarations().expect("declarations");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-declarations");
    let mut files: Vec<_> =
        std::fs::read_dir(&corpus).expect("corpus").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus has {} files", files.len());
    let mut failures = Vec::new();
    for path in files {
        let file = path.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
        let text = std::fs::read_to_string(&path).expect("read");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{file}: no `# expect:` line"));
        match apply(&reg, &file, &text) {
            Ok(changes) => failures.push(format!("{file}: accepted ({changes:?})")),
            Err(RegistryError::Invalid(problems)) => {
                let shown: Vec<String> =
                    problems.iter().map(|p| format!("{}: {}", p.field, p.message)).collect();
                if !shown.iter().any(|s| s.contains(expect)) {
                    failures.push(format!("{file}: expected {expect:?}, got {shown:#?}"));
                }
                if problems.iter().any(|p| p.file != file || p.document == 0) {
                    failures.push(format!(
                        "{file}: problems must name the file and document: {problems:#?}"
                    ));
                }
            }
            Err(other) => failures.push(format!("{file}: wrong error {other}")),
        }
        if store.declarations().expect("declarations") != before {
            failures.push(format!("{file}: something was applied"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn all_problems_are_reported_at_once_with_document_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, reg) = handle(dir.path());
    let text = "
kind: Team
name: t
---
kind: Watch
name: w
category: credential
paths: [relative]
---
kind: Workload
name: a
owner: nobody
identity_type: workload
match: {exe: /bin/a}
expect:
  windows: [{from: '25:00', to: '18:00', tz: Nowhere/City}]
";
    let Err(RegistryError::Invalid(problems)) = apply(&reg, "multi.yaml", text) else {
        panic!("should be refused")
    };
    let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        vec![
            "multi.yaml: document 2 (Watch w): paths[0]: `relative` must be absolute or start with `~/`".to_owned(),
            "multi.yaml: document 3 (Workload a): owner: team \"nobody\" is not declared; expected the name of a Team".to_owned(),
            "multi.yaml: document 3 (Workload a): expect.windows[0].from: expected HH:MM (00:00 to 23:59), got \"25:00\"".to_owned(),
        ],
        "the tz is checked once `from` parses; the rest are all there"
    );
    assert!(reg.snapshot().objects.is_empty(), "nothing applied, not even the good Team");
}

#[test]
fn changes_are_revisions_with_author_time_and_diff() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, reg) = handle(dir.path());
    let first = apply(&reg, "example.yaml", EXAMPLE_YAML).expect("apply");
    assert!(first.iter().all(|c| c.action == "created" && c.revision > 0), "{first:?}");
    let again = apply(&reg, "example.yaml", EXAMPLE_YAML).expect("re-apply");
    assert!(again.iter().all(|c| c.action == "unchanged" && c.revision == 0), "{again:?}");
    let edited = EXAMPLE_YAML.replace("to: \"18:00\"", "to: \"19:00\"");
    let changes = apply(&reg, "example.yaml", &edited).expect("edit");
    let updated: Vec<_> =
        changes.iter().filter(|c| c.action == "updated").map(|c| c.name.as_str()).collect();
    assert_eq!(updated, vec!["payments-api"]);
    let history = store.history(Kind::Workload, "payments-api", 10).expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].action, "update");
    assert_eq!(history[0].author, "alice (admin)");
    assert_eq!(history[0].time, t("2026-11-30T09:00:00Z"));
    assert!(
        history[0].diff.contains("-     to: 18:00\n+     to: 19:00\n"),
        "diff: {}",
        history[0].diff
    );
    // The registry the detectors see has the new window.
    let snap = reg.snapshot();
    assert_eq!(
        snap.workload("payments-api").map(|w| w.rendered_windows()),
        Some(vec!["mon-fri 08:00-19:00 Europe/London".into()])
    );
    assert_eq!(snap.revisions.get("payments-api").map(Vec::len), Some(2));
}

#[test]
fn delete_is_refused_while_referenced_and_recorded_when_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, reg) = handle(dir.path());
    apply(&reg, "example.yaml", EXAMPLE_YAML).expect("apply");
    let err = reg.delete(Kind::Team, "team-payments", "bob", &allow_all).expect_err("referenced");
    assert_eq!(
        err.to_string(),
        "Team team-payments is still referred to by Workload payments-api; change or delete those first"
    );
    let err =
        reg.delete(Kind::Workload, "payments-api", "bob", &allow_all).expect_err("referenced");
    assert!(err.to_string().contains("ApprovedChange CHG-1042"), "{err}");
    reg.delete(Kind::ApprovedChange, "CHG-1042", "bob", &allow_all).expect("delete change");
    let deleted =
        reg.delete(Kind::Workload, "payments-api", "bob", &allow_all).expect("delete workload");
    assert_eq!(deleted.action, "deleted");
    assert!(reg.snapshot().workload("payments-api").is_none());
    let history = store.history(Kind::Workload, "payments-api", 10).expect("history");
    assert_eq!(
        history.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
        vec!["delete", "create"]
    );
    assert_eq!(history[0].author, "bob");
}

#[test]
fn the_authorization_callback_refuses_per_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, reg) = handle(dir.path());
    let only_watches = |d: &Declaration, _: &Objects| {
        if d.kind() == Kind::Watch {
            Ok(())
        } else {
            Err(format!("role iam may not change {} declarations", d.kind()))
        }
    };
    let Err(RegistryError::Invalid(problems)) =
        reg.apply(&[("example.yaml".into(), EXAMPLE_YAML.into())], "iam", false, &only_watches)
    else {
        panic!("should be refused")
    };
    assert_eq!(problems.len(), 5, "{problems:#?}");
    assert!(problems.iter().all(|p| p.message.starts_with("role iam may not change")));
    assert!(reg.snapshot().objects.is_empty());
}
