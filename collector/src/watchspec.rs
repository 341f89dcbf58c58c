//! The watch syntax the sensors enforce, checked and matched on the collector. Parsing is the
//! sensors' own ([`keywatch_proto::watchspec`]); matching events against it is the collector's. Watches are sent
//! to every sensor as its policy, so the collector accepts exactly what a sensor accepts:
//!
//! - paths: absolute, or `~/…` (every home directory: `/root` and `/home/*`); a leading `!`
//!   excludes (`!~/.ssh/*.pub`); globs within one component (`*`, `?`, `[..]`, `{a,b}`); no
//!   `**`, no `.` or `..` components, not a directory;
//! - endpoints: `[tcp://|udp://]ADDRESS[:PORT]`, where ADDRESS is empty or `*` (any address), a
//!   host name, an IP address, a CIDR network, or an IPv6 address or network in brackets; no
//!   port means any port (but not with any address).

use globset::GlobMatcher;
pub use keywatch_proto::watchspec::{Endpoint, EndpointHost, Protocol, parse_endpoint};

use crate::declarations::validate::glob;

/// The home directories `~/` stands for on the collector's side of matching.
pub const HOMES: [&str; 2] = ["/root", "/home/*"];

/// One parsed entry of `paths`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern(keywatch_proto::watchspec::PathSpec);

/// Checks one entry of `paths` exactly as a sensor does.
pub fn parse_path(raw: &str) -> Result<PathPattern, String> {
    keywatch_proto::watchspec::parse_path(raw).map(PathPattern)
}

impl PathPattern {
    /// `!`: an exclusion.
    pub fn exclude(&self) -> bool {
        self.0.exclude
    }

    /// `~/`: below every home directory.
    pub fn home_relative(&self) -> bool {
        self.0.home_relative
    }

    /// Absolute globs: one per home directory when home-relative.
    pub fn globs(&self) -> Vec<String> {
        if self.0.home_relative {
            HOMES.iter().map(|h| format!("{h}/{}", self.0.rest)).collect()
        } else {
            vec![self.0.rest.clone()]
        }
    }
}

/// A watch's paths ready for matching: included by one pattern and excluded by none.
#[derive(Debug, Clone, Default)]
pub struct PathSet {
    include: Vec<GlobMatcher>,
    exclude: Vec<GlobMatcher>,
}

impl PathSet {
    /// Compiles valid patterns (invalid ones were refused at apply).
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a String>) -> Self {
        let mut set = Self::default();
        for p in paths.into_iter().filter_map(|p| parse_path(p).ok()) {
            let matchers = p.globs().into_iter().filter_map(|g| glob(&g).ok());
            if p.exclude() { set.exclude.extend(matchers) } else { set.include.extend(matchers) }
        }
        set
    }

    /// Whether `path` is covered.
    pub fn matches(&self, path: &str) -> bool {
        self.include.iter().any(|g| g.is_match(path))
            && !self.exclude.iter().any(|g| g.is_match(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_as_the_sensor_takes_them() {
        assert!(parse_path("~/.aws/credentials").is_ok_and(|p| !p.exclude() && p.home_relative()));
        assert!(parse_path("!~/.ssh/*.pub").is_ok_and(|p| p.exclude()));
        for bad in ["aws/credentials", "/home/**/x", "/etc/../shadow", "~/", "/root/[x"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
        let set = PathSet::new(&["~/.ssh/id_*".to_owned(), "!~/.ssh/*.pub".to_owned()]);
        assert!(set.matches("/root/.ssh/id_ed25519"));
        assert!(set.matches("/home/alice/.ssh/id_rsa"));
        assert!(!set.matches("/home/alice/.ssh/id_rsa.pub"));
        assert!(!set.matches("/home/alice/x/.ssh/id_rsa"));
        assert!(!set.matches("/srv/.ssh/id_rsa"));
    }

    #[test]
    fn endpoints_as_the_sensor_takes_them() {
        let any_8200 = parse_endpoint(":8200").expect("valid");
        assert!(
            any_8200.covers("10.1.2.3", 8200, "tcp") && !any_8200.covers("10.1.2.3", 8201, "tcp")
        );
        assert!(parse_endpoint("*:88").is_ok_and(|e| e.host == EndpointHost::Any));
        let sts = parse_endpoint("sts.amazonaws.com").expect("any port");
        assert!(sts.covers("STS.amazonaws.com", 443, "tcp"));
        let udp = parse_endpoint("udp://10.0.0.0/8:88").expect("valid");
        assert!(udp.covers("10.9.9.9", 88, "udp") && !udp.covers("10.9.9.9", 88, "tcp"));
        let v6 = parse_endpoint("[fd00::/8]:443").expect("valid");
        assert!(v6.covers("fd12::1", 443, "tcp"));
        assert!(parse_endpoint("[::1]").is_ok_and(|e| e.port == 0));
        for bad in ["*", "", "http://x:1", "10.0.0.0/40:443", "[10.0.0.1]:1", "a:0"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
