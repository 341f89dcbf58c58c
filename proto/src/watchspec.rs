//! The watch syntax both ends agree on: the collector validates and matches what every sensor
//! enforces, from one parser. Watches travel as strings in `keywatch.v1.WatchSpec`.
//!
//! - paths (and unix sockets): absolute, or `~/…` (every home directory); a leading `!`
//!   excludes (`!~/.ssh/*.pub`); globs within one component (`*`, `?`, `[..]`, `{a,b}`); no
//!   `**`, no `.` or `..` components, never a bare directory;
//! - endpoints: `[tcp://|udp://]ADDRESS[:PORT]`, where ADDRESS is empty or `*` (any address), a
//!   host name, an IP address, a CIDR network, or an IPv6 address or network in brackets; no
//!   port means any port (but not together with any address).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use globset::Glob;
use serde::Serialize;

/// One parsed entry of `paths` or `unix_sockets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSpec {
    /// `!`: an exclusion.
    pub exclude: bool,
    /// `~/`: below every home directory.
    pub home_relative: bool,
    /// Without `!` and `~/`: the absolute pattern, or the part below each home directory.
    pub rest: String,
}

/// Whether a path component is a glob rather than a literal name.
pub fn is_glob(component: &str) -> bool {
    component.contains(['*', '?', '[', '{', '\\'])
}

/// Checks one entry of `paths` / `unix_sockets`; the error says what is wrong with it.
pub fn parse_path(raw: &str) -> Result<PathSpec, String> {
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
    Ok(PathSpec { exclude, home_relative, rest: rest.to_owned() })
}

/// Transport an endpoint rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
}

/// Where an endpoint points before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointHost {
    /// Every address, IPv4 and IPv6.
    Any,
    /// An address or network (host bits cleared).
    Net { addr: IpAddr, prefix_len: u8 },
    /// A DNS name (lowercase), resolved by the sensor.
    Name(String),
}

/// One parsed entry of `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: EndpointHost,
    /// 0 means any port.
    pub port: u16,
    pub protocol: Protocol,
}

/// Parses one `endpoints` entry; the error says what is wrong with it.
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
        // Bare IPv6 address or network: no port possible.
        (net(rest, raw, true)?, None)
    } else {
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        let host = match host {
            "" | "*" => EndpointHost::Any,
            h if h.parse::<IpAddr>().is_ok() || h.contains('/') => net(h, raw, false)?,
            h if is_host_name(h) => EndpointHost::Name(h.to_string()),
            h => {
                return Err(format!("`{raw}`: `{h}` is not an address, network or host name"));
            }
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
    Ok(EndpointHost::Net { addr: mask(addr, prefix_len), prefix_len })
}

/// Clears host bits, as an LPM trie key must have them.
pub fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix_len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix_len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

fn is_host_name(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
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

    fn ok(raw: &str) -> Endpoint {
        parse_endpoint(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn net(addr: &str, prefix_len: u8) -> EndpointHost {
        EndpointHost::Net { addr: addr.parse().expect("address"), prefix_len }
    }

    #[test]
    fn parses_every_form() {
        let e = ok("169.254.169.254:80");
        assert_eq!((e.host, e.port, e.protocol), (net("169.254.169.254", 32), 80, Protocol::Any));
        let e = ok("[fd00:ec2::254]:80");
        assert_eq!((e.host, e.port), (net("fd00:ec2::254", 128), 80));
        let e = ok("fd00:ec2::254");
        assert_eq!((e.host, e.port), (net("fd00:ec2::254", 128), 0));
        let e = ok("[fd00::/8]:443");
        assert_eq!((e.host, e.port), (net("fd00::", 8), 443));
        let e = ok("10.1.2.3/8:443");
        assert_eq!((e.host, e.port), (net("10.0.0.0", 8), 443));
        let e = ok(":6443");
        assert_eq!((e.host, e.port), (EndpointHost::Any, 6443));
        let e = ok("*:8200");
        assert_eq!((e.host, e.port), (EndpointHost::Any, 8200));
        let e = ok("udp://:88");
        assert_eq!((e.host, e.port, e.protocol), (EndpointHost::Any, 88, Protocol::Udp));
        let e = ok("tcp://STS.amazonaws.com:443");
        assert_eq!(
            (e.host, e.port, e.protocol),
            (EndpointHost::Name("sts.amazonaws.com".into()), 443, Protocol::Tcp)
        );
        let e = ok("vault.internal");
        assert_eq!((e.host, e.port), (EndpointHost::Name("vault.internal".into()), 0));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            ":",
            "*",
            "host:0",
            "host:70000",
            "[::1",
            "[1.2.3.4]:80",
            "10.0.0.0/33:80",
            "http://x:80",
            "bad host:80",
            "[::1]80",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn paths_in_every_form() {
        let p = parse_path("~/.aws/credentials").expect("valid");
        assert!(!p.exclude && p.home_relative && p.rest == ".aws/credentials");
        assert!(parse_path("!~/.ssh/*.pub").is_ok_and(|p| p.exclude));
        assert!(
            parse_path("/etc/shadow").is_ok_and(|p| !p.home_relative && p.rest == "/etc/shadow")
        );
        for bad in ["aws/credentials", "/home/**/x", "/etc/../shadow", "~/", "/root/[x", "/"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_cover_what_they_name() {
        let any_8200 = parse_endpoint(":8200").expect("valid");
        assert!(
            any_8200.covers("10.1.2.3", 8200, "tcp") && !any_8200.covers("10.1.2.3", 8201, "tcp")
        );
        let sts = parse_endpoint("sts.amazonaws.com").expect("any port");
        assert!(sts.covers("STS.amazonaws.com", 443, "tcp"));
        let udp = parse_endpoint("udp://10.0.0.0/8:88").expect("valid");
        assert!(udp.covers("10.9.9.9", 88, "udp") && !udp.covers("10.9.9.9", 88, "tcp"));
        let v6 = parse_endpoint("[fd00::/8]:443").expect("valid");
        assert!(v6.covers("fd12::1", 443, "tcp"));
        assert!(parse_endpoint("_srv.internal:88").is_ok(), "underscores appear in real names");
        assert!(parse_endpoint("-bad.example:1").is_err());
    }
}
