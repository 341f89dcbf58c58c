//! The watch config file (YAML), validated whole: every problem is reported with its place.
//!
//! ```yaml
//! builtin: true            # default; false starts from an empty catalog
//! disable: [ldap]          # built-in watches to drop
//! watches:
//!   - name: payments-db-password
//!     category: credential
//!     paths: ["/etc/payments/db.pass"]
//! ```

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::catalog::builtin_catalog;
use super::set::{SpecProblem, WatchSet};
use super::spec::WatchSpec;

/// The watch config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchConfig {
    /// Start from the built-in catalog. Default `true`: a host is covered before anyone
    /// writes a config.
    #[serde(default = "default_builtin")]
    pub builtin: bool,
    /// Built-in watches to drop, by name. Default empty.
    #[serde(default)]
    pub disable: Vec<String>,
    /// Watches to add. One named like a built-in replaces it. Default empty.
    #[serde(default)]
    pub watches: Vec<WatchSpec>,
}

fn default_builtin() -> bool {
    true
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self { builtin: true, disable: Vec::new(), watches: Vec::new() }
    }
}

impl WatchConfig {
    /// The specs in force: the catalog (unless turned off) minus disabled and replaced
    /// watches, then the config's own, in that order (which fixes the ids).
    pub fn specs(&self) -> Vec<WatchSpec> {
        let own: HashSet<&str> = self.watches.iter().map(|w| w.name.as_str()).collect();
        let mut specs: Vec<WatchSpec> = if self.builtin { builtin_catalog() } else { Vec::new() };
        specs.retain(|s| !self.disable.contains(&s.name) && !own.contains(s.name.as_str()));
        specs.extend(self.watches.iter().cloned());
        specs
    }

    /// The watch set this config describes.
    pub fn watch_set(&self) -> Result<WatchSet, Vec<SpecProblem>> {
        WatchSet::from_specs(self.specs())
    }
}

/// One problem in a config file, with its place when it could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Path of the field (`watches[2].paths[0]`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}")?;
            if let Some(column) = self.column {
                write!(f, " column {column}")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read watch config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid watch config {path}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid { path: PathBuf, problems: Vec<ConfigProblem> },
}

/// Reads and validates a watch config file.
pub fn load_config(path: impl AsRef<Path>) -> Result<WatchConfig, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse_config(&text, path)
}

/// Parses and validates config text; `path` only names it in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<WatchConfig, ConfigError> {
    let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
    if text.trim().is_empty() {
        return Ok(WatchConfig::default());
    }
    let config: WatchConfig =
        serde_norway::from_str(text).map_err(|e| invalid(vec![syntax_problem(&e)]))?;
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    for (i, watch) in config.watches.iter().enumerate() {
        if !seen.insert(watch.name.as_str()) {
            let (line, column) = locate_last(text, &watch.name);
            problems.push(ConfigProblem {
                line,
                column,
                field: format!("watches[{i}].name"),
                message: format!("duplicate name `{}`", watch.name),
            });
        }
    }
    let catalog: HashSet<String> = builtin_catalog().into_iter().map(|s| s.name).collect();
    for (i, name) in config.disable.iter().enumerate() {
        if !catalog.contains(name) {
            let (line, column) = locate(text, name);
            problems.push(ConfigProblem {
                line,
                column,
                field: format!("disable[{i}]"),
                message: format!("no built-in watch is named `{name}`"),
            });
        }
    }
    // The config's watches come last in `specs()`; map problems back to their entries.
    let offset = config.specs().len() - config.watches.len();
    if let Err(spec_problems) = config.watch_set() {
        for p in spec_problems {
            if p.message.starts_with("duplicate name") {
                continue; // reported above, with the config's own index
            }
            let index = p.index.saturating_sub(offset);
            let (line, column) = match &p.value {
                Some(v) => locate(text, v),
                None => locate(text, &p.name),
            };
            problems.push(ConfigProblem {
                line,
                column,
                field: format!("watches[{index}].{}", p.field),
                message: p.message,
            });
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        problems.sort_by_key(|p| (p.line, p.column));
        Err(invalid(problems))
    }
}

fn syntax_problem(e: &serde_norway::Error) -> ConfigProblem {
    let location = e.location();
    let message = e.to_string();
    // The library appends " at line L column C"; the problem carries those separately.
    let message = match message.rsplit_once(" at line ") {
        Some((head, _)) if location.is_some() => head.to_string(),
        _ => message,
    };
    // Field paths come first as `watches[0].category: …`.
    let (field, message) = match message.split_once(": ") {
        Some((field, rest)) if !field.contains(' ') => (field.to_string(), rest.to_string()),
        _ => ("(document)".to_string(), message),
    };
    ConfigProblem {
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        field,
        message,
    }
}

/// Best-effort place of a value in the text (validation works on parsed data, which has
/// no positions): its first occurrence.
fn locate(text: &str, needle: &str) -> (Option<usize>, Option<usize>) {
    text.lines()
        .enumerate()
        .find_map(|(n, l)| l.find(needle).map(|c| (Some(n + 1), Some(c + 1))))
        .unwrap_or((None, None))
}

/// Like [`locate`], the last occurrence (a duplicate is the later one).
fn locate_last(text: &str, needle: &str) -> (Option<usize>, Option<usize>) {
    text.lines()
        .enumerate()
        .filter_map(|(n, l)| l.find(needle).map(|c| (Some(n + 1), Some(c + 1))))
        .last()
        .unwrap_or((None, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WatchConfig, ConfigError> {
        parse_config(text, Path::new("watches.yaml"))
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_is_the_builtin_catalog() {
        let config = parse("").expect("valid");
        assert!(config.builtin);
        assert_eq!(config.specs(), builtin_catalog());
    }

    #[test]
    fn adds_replaces_and_disables() {
        let config = parse(
            "disable: [ldap, kerberos]\nwatches:\n  - name: app-secret\n    category: secret\n    paths: [/etc/app/secret]\n  - name: vault-api\n    category: auth-endpoint\n    endpoints: ['vault.internal:8200']\n",
        )
        .expect("valid");
        let set = config.watch_set().expect("valid set");
        assert_eq!(set.id_of("ldap"), None);
        assert_eq!(set.id_of("kerberos"), None);
        let vault = set.id_of("vault-api").expect("replaced");
        assert_eq!(
            set.get(vault).map(|w| w.spec.endpoints.clone()),
            Some(vec!["vault.internal:8200".to_string()])
        );
        assert_eq!(set.id_of("app-secret"), Some(u32::try_from(set.len() - 2).expect("small")));

        let only_own =
            parse("builtin: false\nwatches:\n  - {name: x, category: credential, paths: [/x]}\n")
                .expect("valid");
        assert_eq!(only_own.watch_set().expect("valid").len(), 1);
    }

    #[test]
    fn syntax_errors_name_line_column_and_field() {
        let p = problems("watches:\n  - name: a\n    category: credential\n    pathz: [/x]\n");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, Some(4), "{p:?}");
        assert!(p[0].field.starts_with("watches[0]"), "{p:?}");
        assert!(p[0].message.contains("pathz"), "{p:?}");

        let p = problems("watches:\n  - name: a\n    category: password\n    paths: [/x]\n");
        assert_eq!(p[0].line, Some(3), "{p:?}");
        assert!(p[0].message.contains("password"), "{p:?}");

        let p = problems("builtin: maybe\n");
        assert_eq!(p[0].line, Some(1), "{p:?}");
    }

    #[test]
    fn validation_reports_every_problem_with_place() {
        let text = "\
disable: [no-such-watch]
watches:
  - name: dup
    category: credential
    paths: [/etc/a]
  - name: dup
    category: credential
    paths: [relative/path]
  - name: empty
    category: secret
  - name: net
    category: auth-endpoint
    endpoints: ['host:99999']
";
        let p = problems(text);
        let got: Vec<(Option<usize>, &str)> =
            p.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(1), "disable[0]"),
                (Some(6), "watches[1].name"),
                (Some(8), "watches[1].paths[0]"),
                (Some(9), "watches[2].name"),
                (Some(13), "watches[3].endpoints[0]"),
            ]
        );
        let err = parse(text).expect_err("invalid").to_string();
        assert!(
            err.starts_with("invalid watch config watches.yaml: line 1 column 11: disable[0]"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_names_it() {
        let err = load_config("/nonexistent/watches.yaml").expect_err("missing");
        assert_eq!(err.to_string(), "cannot read watch config /nonexistent/watches.yaml");
    }
}
