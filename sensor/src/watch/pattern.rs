//! Path patterns: `~` expansion and per-component globs.
//!
//! Patterns are matched one component at a time while walking the file system from `/`, so
//! the walk only lists directories a pattern can reach, and each directory it passes is known
//! (the file watcher needs them).

use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use keywatch_proto::watchspec::is_glob;

/// One component of a path pattern.
#[derive(Debug, Clone)]
pub(crate) enum Part {
    Literal(OsString),
    Glob { pattern: String, matcher: GlobMatcher },
}

impl Part {
    /// This component as a glob, literals escaped: what the file watcher matches names with.
    pub(crate) fn as_glob(&self) -> String {
        match self {
            Self::Literal(name) => globset::escape(&name.to_string_lossy()),
            Self::Glob { pattern, .. } => pattern.clone(),
        }
    }
}

/// An absolute pattern split into components.
#[derive(Debug, Clone)]
pub(crate) struct PathPattern {
    pub parts: Vec<Part>,
}

/// A path or socket entry of a watch, as written: include or exclude, home-relative or not.
#[derive(Debug, Clone)]
pub(crate) struct RawPattern {
    pub exclude: bool,
    home_relative: bool,
    /// Without `!` and `~/`.
    rest: String,
}

/// Checks one entry of `paths` / `unix_sockets` (the syntax the collector checks too).
pub(crate) fn parse(raw: &str) -> Result<RawPattern, String> {
    let spec = keywatch_proto::watchspec::parse_path(raw)?;
    Ok(RawPattern { exclude: spec.exclude, home_relative: spec.home_relative, rest: spec.rest })
}

impl RawPattern {
    /// The concrete absolute patterns: one per home directory when home-relative.
    pub(crate) fn expand(&self, homes: &[PathBuf]) -> Vec<PathPattern> {
        let tail = components(&self.rest);
        if !self.home_relative {
            return vec![PathPattern { parts: tail }];
        }
        homes
            .iter()
            .map(|home| {
                let mut parts: Vec<Part> = home
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(name) => Some(Part::Literal(name.to_os_string())),
                        _ => None,
                    })
                    .collect();
                parts.extend(tail.iter().cloned());
                PathPattern { parts }
            })
            .collect()
    }

    /// The expanded pattern as one full-path glob (for exclusions).
    fn full_globs(&self, homes: &[PathBuf]) -> Vec<String> {
        if !self.home_relative {
            return vec![self.rest.clone()];
        }
        homes
            .iter()
            .map(|h| {
                format!(
                    "{}/{}",
                    globset::escape(&h.to_string_lossy()).trim_end_matches('/'),
                    self.rest
                )
            })
            .collect()
    }
}

fn components(rest: &str) -> Vec<Part> {
    rest.split('/')
        .filter(|c| !c.is_empty())
        .map(|c| {
            if is_glob(c) {
                match Glob::new(c) {
                    Ok(glob) => {
                        Part::Glob { pattern: c.to_string(), matcher: glob.compile_matcher() }
                    }
                    // Checked by `parse`; a literal never matches a glob-looking name wrongly.
                    Err(_) => Part::Literal(c.into()),
                }
            } else {
                Part::Literal(c.into())
            }
        })
        .collect()
}

/// Full-path matcher for the exclusions of one watch.
pub(crate) fn exclusions(patterns: &[RawPattern], homes: &[PathBuf]) -> GlobSet {
    let mut builder = GlobSetBuilder::new();
    for glob in patterns.iter().filter(|p| p.exclude).flat_map(|p| p.full_globs(homes)) {
        if let Ok(glob) = GlobBuilder::new(&glob).literal_separator(true).build() {
            builder.add(glob);
        }
    }
    builder.build().unwrap_or_else(|_| GlobSet::empty())
}

/// Home directories `~` stands for: every existing home in `/etc/passwd`, and `/root`.
pub fn system_homes() -> Vec<PathBuf> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut homes = parse_passwd_homes(&passwd);
    homes.push(PathBuf::from("/root"));
    homes.retain(|h| h.is_dir());
    homes.sort();
    homes.dedup();
    homes
}

/// Home fields of a passwd file, except `/` (a service account's "no home").
fn parse_passwd_homes(passwd: &str) -> Vec<PathBuf> {
    passwd
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(':').nth(5))
        .map(|home| Path::new(home).to_path_buf())
        .filter(|home| home.is_absolute() && home != Path::new("/"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert!(parse("~/.aws/credentials").is_ok_and(|p| !p.exclude));
        assert!(parse("!~/.ssh/*.pub").is_ok_and(|p| p.exclude));
        assert!(parse("/etc/ssh/ssh_host_*_key").is_ok());
        assert!(parse("relative/path").is_err());
        assert!(parse("/home/**/x").is_err());
        assert!(parse("/etc/../shadow").is_err());
        assert!(parse("/etc/[").is_err());
        assert!(parse("/").is_err());
    }

    #[test]
    fn expands_home_per_user() {
        let homes = [PathBuf::from("/home/alice"), PathBuf::from("/root")];
        let expanded = parse("~/.aws/credentials").expect("valid").expand(&homes);
        let rendered: Vec<String> = expanded
            .iter()
            .map(|p| p.parts.iter().map(Part::as_glob).collect::<Vec<_>>().join("/"))
            .collect();
        assert_eq!(rendered, ["home/alice/.aws/credentials", "root/.aws/credentials"]);
    }

    #[test]
    fn excludes_public_keys() {
        let homes = [PathBuf::from("/home/a")];
        let raw = [parse("~/.ssh/id_*").expect("valid"), parse("!~/.ssh/*.pub").expect("valid")];
        let set = exclusions(&raw, &homes);
        assert!(set.is_match("/home/a/.ssh/id_ed25519.pub"));
        assert!(!set.is_match("/home/a/.ssh/id_ed25519"));
    }

    #[test]
    fn passwd_homes() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbin:x:2:2::/:/usr/sbin/nologin\n\
                      alice:x:1000:1000::/home/alice:/bin/sh\nbad line\n";
        assert_eq!(
            parse_passwd_homes(passwd),
            [PathBuf::from("/root"), PathBuf::from("/home/alice")]
        );
    }
}
