//! The declarative shape of one watch, shared by the built-in catalog, the config file and the
//! collector's policy.

use serde::{Deserialize, Serialize};

/// What kind of thing a watch protects; carried into events and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// A file whose content lets its reader act as an identity (keys, tokens, password hashes).
    Credential,
    /// Something that hands out another identity's secrets (agent sockets, runtime sockets).
    Secret,
    /// A service where an identity authenticates or fetches credentials.
    AuthEndpoint,
}

/// One watch: a named set of files, endpoints and sockets.
///
/// Path syntax (`paths`, `unix_sockets`): absolute, or `~/…` for every home directory (from
/// `/etc/passwd`, plus `/root`). Each component may be a glob (`*`, `?`, `[…]`, `{a,b}`);
/// `**` is not supported (it would make the sensor walk whole trees). A leading `!` excludes
/// what it matches (`!~/.ssh/*.pub`).
///
/// Endpoint syntax: `[tcp://|udp://]ADDRESS[:PORT]` where ADDRESS is a host name, an IP
/// address, a CIDR (`10.0.0.0/8`), a bracketed IPv6 address or CIDR (`[fd00:ec2::254]`), or
/// empty / `*` for any address (`:6443`). No port means any port; no scheme means TCP and UDP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// Stable name; events, alerts and workload declarations refer to it.
    pub name: String,
    /// What kind of thing this protects.
    pub category: Category,
    /// Files to watch (globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Network endpoints whose connection (TCP) or send (UDP) is reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Unix sockets whose connection is reported (globs), e.g. ssh-agent or docker.sock.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unix_sockets: Vec<String>,
}

impl WatchSpec {
    /// True when the watch names nothing at all.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.endpoints.is_empty() && self.unix_sockets.is_empty()
    }
}
