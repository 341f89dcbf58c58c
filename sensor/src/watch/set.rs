//! The watch set: validated watches with stable numeric ids, as the kernel maps key them.

use std::collections::HashMap;
use std::path::PathBuf;

use super::catalog::builtin_catalog;
use super::endpoint::{Endpoint, parse_endpoint};
use super::pattern::{self, RawPattern, system_homes};
use super::spec::{Category, WatchSpec};

/// One validated watch.
#[derive(Debug, Clone)]
pub struct Watch {
    /// Index in the set; what kernel maps and events carry instead of the name.
    pub id: u32,
    pub spec: WatchSpec,
    pub endpoints: Vec<Endpoint>,
    pub(crate) paths: Vec<RawPattern>,
    pub(crate) sockets: Vec<RawPattern>,
}

/// Something wrong with one watch: `index` is its position in the input, `field` names the
/// entry (`paths[1]`), `value` the offending text when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("watch {index} ({name}): {field}: {message}")]
pub struct SpecProblem {
    pub index: usize,
    pub name: String,
    pub field: String,
    pub value: Option<String>,
    pub message: String,
}

/// Every watch in force, with ids that are their indexes.
///
/// Ids are stable for a given list of specs (built-in catalog order, then the config's or the
/// policy's order); a new policy builds a new set and the kernel maps are refilled from it.
#[derive(Debug, Clone)]
pub struct WatchSet {
    watches: Vec<Watch>,
    by_name: HashMap<String, u32>,
    /// Fixed home directories for `~`; `None` reads `/etc/passwd` at each resolution so new
    /// users are picked up.
    homes: Option<Vec<PathBuf>>,
}

impl WatchSet {
    /// Builds a set from specs, the one path used by the built-in catalog, the config file and
    /// the collector's policy. Every problem is reported, not just the first.
    pub fn from_specs(
        specs: impl IntoIterator<Item = WatchSpec>,
    ) -> Result<Self, Vec<SpecProblem>> {
        let mut problems = Vec::new();
        let mut watches = Vec::new();
        let mut by_name = HashMap::new();
        for (index, spec) in specs.into_iter().enumerate() {
            let mut problem = |field: String, value: Option<&str>, message: String| {
                problems.push(SpecProblem {
                    index,
                    name: spec.name.clone(),
                    field,
                    value: value.map(str::to_string),
                    message,
                });
            };
            if !valid_name(&spec.name) {
                problem(
                    "name".into(),
                    Some(&spec.name),
                    "must be non-empty lowercase letters, digits, `-`, `_` or `.`".into(),
                );
            }
            let id = u32::try_from(watches.len()).unwrap_or(u32::MAX);
            if by_name.insert(spec.name.clone(), id).is_some() {
                problem("name".into(), Some(&spec.name), format!("duplicate name `{}`", spec.name));
            }
            if spec.is_empty() {
                problem(
                    "name".into(),
                    Some(&spec.name),
                    "watches nothing: give paths, endpoints or unix_sockets".into(),
                );
            }
            let mut patterns = |field: &str, list: &[String]| {
                let mut out = Vec::new();
                for (i, raw) in list.iter().enumerate() {
                    match pattern::parse(raw) {
                        Ok(p) => out.push(p),
                        Err(message) => problem(format!("{field}[{i}]"), Some(raw), message),
                    }
                }
                if !list.is_empty() && out.iter().all(|p| p.exclude) && out.len() == list.len() {
                    problem(
                        field.to_string(),
                        None,
                        "only exclusions (`!…`), nothing to include".into(),
                    );
                }
                out
            };
            let paths = patterns("paths", &spec.paths);
            let sockets = patterns("unix_sockets", &spec.unix_sockets);
            let mut endpoints = Vec::new();
            for (i, raw) in spec.endpoints.iter().enumerate() {
                match parse_endpoint(raw) {
                    Ok(e) => endpoints.push(e),
                    Err(message) => problem(format!("endpoints[{i}]"), Some(raw), message),
                }
            }
            watches.push(Watch { id, spec, endpoints, paths, sockets });
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self { watches, by_name, homes: None })
    }

    /// The built-in catalog alone (standalone mode).
    pub fn builtin() -> Self {
        match Self::from_specs(builtin_catalog()) {
            Ok(set) => set,
            // The catalog is tested to be valid; an empty set beats a crash if it ever is not.
            Err(problems) => {
                tracing::error!(?problems, "built-in watch catalog is invalid");
                Self::from_specs(Vec::new()).unwrap_or_else(|_| unreachable!("empty set is valid"))
            }
        }
    }

    /// Uses these directories for `~` instead of reading `/etc/passwd` at each resolution.
    pub fn with_homes(mut self, homes: Vec<PathBuf>) -> Self {
        self.homes = Some(homes);
        self
    }

    /// Directories `~` stands for right now.
    pub fn homes(&self) -> Vec<PathBuf> {
        self.homes.clone().unwrap_or_else(system_homes)
    }

    /// True when `~` is read from `/etc/passwd` (so its changes matter).
    pub(crate) fn homes_from_system(&self) -> bool {
        self.homes.is_none()
    }

    pub fn get(&self, id: u32) -> Option<&Watch> {
        self.watches.get(usize::try_from(id).ok()?)
    }

    /// Name of watch `id`, for events coming back from the kernel.
    pub fn name(&self, id: u32) -> Option<&str> {
        self.get(id).map(|w| w.spec.name.as_str())
    }

    pub fn category(&self, id: u32) -> Option<Category> {
        self.get(id).map(|w| w.spec.category)
    }

    pub fn id_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Watch> {
        self.watches.iter()
    }

    pub fn len(&self) -> usize {
        self.watches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }
}

impl Category {
    /// From the `WatchCategory` enum of `keywatch.v1` (`UNSPECIFIED` and unknown are `None`).
    pub fn from_proto(value: i32) -> Option<Self> {
        match value {
            1 => Some(Self::Credential),
            2 => Some(Self::Secret),
            3 => Some(Self::AuthEndpoint),
            _ => None,
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, paths: &[&str], endpoints: &[&str]) -> WatchSpec {
        WatchSpec {
            name: name.into(),
            category: Category::Credential,
            paths: paths.iter().map(|s| s.to_string()).collect(),
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            unix_sockets: Vec::new(),
        }
    }

    #[test]
    fn builtin_catalog_is_valid_and_named_stably() {
        let set = WatchSet::from_specs(builtin_catalog()).expect("catalog is valid");
        for name in [
            "aws-credentials",
            "ssh-private-keys",
            "k8s-service-account-token",
            "shadow",
            "cloud-metadata",
            "kubernetes-api",
            "kerberos",
            "ldap",
        ] {
            let id = set.id_of(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(set.name(id), Some(name));
        }
        assert_eq!(set.id_of("aws-credentials"), Some(0));
        assert_eq!(set.len(), builtin_catalog().len());
    }

    #[test]
    fn reports_every_problem() {
        let problems = WatchSet::from_specs(vec![
            spec("ok", &["/etc/shadow"], &[]),
            spec("ok", &["relative"], &["nope:0"]),
            spec("Bad Name", &[], &[]),
            spec("only-excludes", &["!/etc/*.pub"], &[]),
        ])
        .expect_err("invalid");
        let fields: Vec<(usize, &str)> =
            problems.iter().map(|p| (p.index, p.field.as_str())).collect();
        assert_eq!(
            fields,
            [
                (1, "name"),
                (1, "paths[0]"),
                (1, "endpoints[0]"),
                (2, "name"),
                (2, "name"),
                (3, "paths")
            ]
        );
        assert!(problems[0].message.contains("duplicate"));
        assert!(problems[4].message.contains("watches nothing"));
    }

    #[test]
    fn proto_categories() {
        assert_eq!(Category::from_proto(3), Some(Category::AuthEndpoint));
        assert_eq!(Category::from_proto(0), None);
    }
}
