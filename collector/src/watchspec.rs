//! The watch syntax the sensors enforce, checked and matched on the collector. Watches are sent
//! to every sensor as its policy, so the collector accepts exactly what a sensor accepts:
//!
//! - paths: absolute, or `~/…` (every home directory: `/root` and `/home/*`); a leading `!`
//!   excludes (`!~/.ssh/*.pub`); globs within one component (`*`, `?`, `[..]`, `{a,b}`); no
//!   `**`, no `.` or `..` components, not a directory;
//! - endpoints: `[tcp://|udp://]ADDRESS[:PORT]`, where ADDRESS is empty or `*` (any address), a
//!   host name, an IP address, a CIDR network, or an IPv6 address or network in brackets; no
//!   port means any port (but not with any address).

use std::net::IpAddr;

use globset::{Glob, GlobMatcher};

use crate::declarations::validate::glob;

/// The home directories `~/` stands for on the collector's side of matching.
pub const HOMES: [&str; 2] = ["/root", "/home/*"];

/// One parsed entry of `paths`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    /// `!`: an exclusion.
    pub exclude: bool,
    /// `~/`: below every home directory.
    pub home_relative: bool,
    /// Without `!` and `~/`.
    rest: String,
}

fn is_glob(component: &str) -> bool {
    component.contains(['*', '?', '[', '{', '\\'])
}

/// Checks one entry of `paths`.
pub fn parse_path(raw: &str) -> Result<PathPattern, String> {
    let (exclude, body) = match raw.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    let (home_relative, rest) = if let Some(rest) = body.strip_prefix("~/") {
        (true, rest)
    } else if body.starts_with('/') {
        (false, body)
    } else {
        return Err(format!("`{raw}` must be absolute or start with `~/`"));
    };
    for component in rest.split('/').filter(|c| !c.is_empty()) {
        if component.contains("**") {
            return Err(format!("`{raw}`: `**` is not supported, name each level"));
        }
        if component == "." || component == ".." {
            return Err(format!("`{raw}`: `.` and `..` components are not allowed"));
        }
        if is_glob(component) {
            Glob::new(component).map_err(|e| format!("`{raw}`: {e}"))?;
        }
    }
    if rest.trim_matches('/').is_empty() {
        return Err(format!("`{raw}` names a directory, not a file"));
    }
    Ok(PathPattern { exclude, home_relative, rest: rest.to_owned() })
}

impl PathPattern {
    /// Absolute globs: one per home directory when home-relative.
    pub fn globs(&self) -> Vec<String> {
        if self.home_relative {
            HOMES.iter().map(|h| format!("{h}/{}", self.rest)).collect()
        } else {
            vec![self.rest.clone()]
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
            if p.exclude { set.exclude.extend(matchers) } else { set.include.extend(matchers) }
        }
        set
    }

    /// Whether `path` is covered.
    pub fn matches(&self, path: &str) -> bool {
        self.include.iter().any(|g| g.is_match(path))
            && !self.exclude.iter().any(|g| g.is_match(path))
    }
}

/// Transport an endpoint applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
}

/// Where an endpoint points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointHost {
    /// Every address.
    Any,
    /// An address or network.
    Net { addr: IpAddr, prefix_len: u8 },
    /// A DNS name (lowercase); matched against the address as the event reports it.
    Name(String),
}

/// One parsed entry of `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: EndpointHost,
    /// 0: any port.
    pub port: u16,
    pub protocol: Protocol,
}

fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn net(text: &str, raw: &str, v6_only: bool) -> Result<EndpointHost, String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr =
        addr.parse().map_err(|_| format!("`{raw}`: `{addr}` is not an IP address"))?;
    if v6_only && addr.is_ipv4() {
        return Err(format!("`{raw}`: brackets are for IPv6 addresses"));
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{raw}`: prefix length must be 0-{max}"))?,
    };
    Ok(EndpointHost::Net { addr, prefix_len })
}

/// Parses one `endpoints` entry as a sensor does; the error says what is wrong with it.
pub fn parse_endpoint(raw: &str) -> Result<Endpoint, String> {
    let lower = raw.trim().to_ascii_lowercase();
    let (protocol, rest) = if let Some(rest) = lower.strip_prefix("tcp://") {
        (Protocol::Tcp, rest)
    } else if let Some(rest) = lower.strip_prefix("udp://") {
        (Protocol::Udp, rest)
    } else if lower.contains("://") {
        return Err(format!("`{raw}`: only tcp:// and udp:// are known"));
    } else {
        (Protocol::Any, lower.as_str())
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (addr, after) =
            inner.split_once(']').ok_or_else(|| format!("`{raw}`: `[` without `]`"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("`{raw}`: expected `:PORT` after `]`"))?,
            ),
        };
        (net(addr, raw, true)?, port)
    } else if rest.matches(':').count() > 1 {
        (net(rest, raw, true)?, None)
    } else {
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        let host = match host {
            "" | "*" => EndpointHost::Any,
            h if h.parse::<IpAddr>().is_ok() || h.contains('/') => net(h, raw, false)?,
            h if is_host_name(h) => EndpointHost::Name(h.to_owned()),
            h => return Err(format!("`{raw}`: `{h}` is not an address, network or host name")),
        };
        (host, port)
    };
    let port = match port {
        None => 0,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(format!("`{raw}`: port must be 1-65535 (omit it for any port)"));
            }
            Ok(p) => p,
        },
    };
    if host == EndpointHost::Any && port == 0 {
        return Err(format!("`{raw}`: any address on any port would match every connection"));
    }
    Ok(Endpoint { host, port, protocol })
}

fn in_net(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask =
                if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

impl Endpoint {
    /// Whether a connection to `address:port` over `protocol` (`tcp`, `udp`; anything else
    /// counts as unknown) is covered.
    pub fn covers(&self, address: &str, port: u16, protocol: &str) -> bool {
        let proto_ok = match self.protocol {
            Protocol::Any => true,
            Protocol::Tcp => !protocol.eq_ignore_ascii_case("udp"),
            Protocol::Udp => !protocol.eq_ignore_ascii_case("tcp"),
        };
        let address = address.trim_start_matches('[').trim_end_matches(']');
        let host_ok = match &self.host {
            EndpointHost::Any => true,
            EndpointHost::Name(n) => n.eq_ignore_ascii_case(address),
            EndpointHost::Net { addr, prefix_len } => {
                address.parse::<IpAddr>().is_ok_and(|ip| in_net(ip, *addr, *prefix_len))
            }
        };
        proto_ok && host_ok && (self.port == 0 || self.port == port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_as_the_sensor_takes_them() {
        assert!(parse_path("~/.aws/credentials").is_ok_and(|p| !p.exclude && p.home_relative));
        assert!(parse_path("!~/.ssh/*.pub").is_ok_and(|p| p.exclude));
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
        for bad in ["*", "", "http://x:1", "10.0.0.0/40:443", "x_y:1", "[10.0.0.1]:1", "a:0"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
