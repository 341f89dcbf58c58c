//! Endpoint watches resolved to address rules for the kernel's LPM trie, with a periodic
//! refresh: host names move (CDNs, failover), and a name that does not resolve at start (no
//! network yet) must start being watched once it does.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::endpoint::{EndpointHost, Protocol, mask};
use super::set::WatchSet;

/// How long one host name may take to resolve.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Default period of [`EndpointRefresher`]: a typical DNS TTL for these services.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);

/// One entry for the kernel's endpoint map: a prefix, a port and a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct EndpointRule {
    /// Network address, host bits cleared.
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// Destination port; 0 means any.
    pub port: u16,
    pub protocol: Protocol,
    pub watch_id: u32,
}

/// A host name that did not resolve this time; reported, not fatal, retried by the refresher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnresolvedHost {
    pub watch_id: u32,
    pub host: String,
    pub error: String,
}

/// The rules in force and the names that could not be resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResolvedEndpoints {
    /// Sorted and deduplicated, so two resolutions compare equal when nothing changed.
    pub rules: Vec<EndpointRule>,
    pub unresolved: Vec<UnresolvedHost>,
}

/// Name resolution, replaceable in tests.
pub trait HostResolver: Send + Sync {
    /// Addresses of `host`.
    fn lookup<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system resolver (`getaddrinfo` through `tokio::net::lookup_host`: `/etc/hosts`, DNS).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl HostResolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// Resolves every endpoint of `set` with the system resolver and [`DEFAULT_LOOKUP_TIMEOUT`].
pub async fn resolve_endpoints(set: &WatchSet) -> ResolvedEndpoints {
    resolve_endpoints_with(set, &SystemResolver, DEFAULT_LOOKUP_TIMEOUT).await
}

/// Resolves every endpoint of `set`; names are looked up concurrently, each at most `timeout`.
pub async fn resolve_endpoints_with(
    set: &WatchSet,
    resolver: &dyn HostResolver,
    timeout: Duration,
) -> ResolvedEndpoints {
    resolve(set, resolver, timeout, &mut HashMap::new()).await
}

/// `known` holds the last good addresses of each name: a name that fails now keeps them (a
/// DNS outage should not silently drop a watch) and is still reported as unresolved.
async fn resolve(
    set: &WatchSet,
    resolver: &dyn HostResolver,
    timeout: Duration,
    known: &mut HashMap<String, Vec<IpAddr>>,
) -> ResolvedEndpoints {
    let mut names: Vec<&str> = set
        .iter()
        .flat_map(|w| &w.endpoints)
        .filter_map(|e| match &e.host {
            EndpointHost::Name(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    let lookups = names.iter().map(|name| async move {
        let result = match tokio::time::timeout(timeout, resolver.lookup(name)).await {
            Ok(Ok(addrs)) if addrs.is_empty() => Err("no addresses".to_string()),
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        (*name, result)
    });
    let mut failures: HashMap<&str, String> = HashMap::new();
    for (name, result) in futures_util::future::join_all(lookups).await {
        match result {
            Ok(mut addrs) => {
                addrs.sort_unstable();
                addrs.dedup();
                known.insert(name.to_string(), addrs);
            }
            Err(error) => {
                failures.insert(name, error);
            }
        }
    }

    let mut out = ResolvedEndpoints::default();
    for watch in set.iter() {
        for endpoint in &watch.endpoints {
            let rule = |addr: IpAddr, prefix_len: u8| EndpointRule {
                addr: mask(addr, prefix_len),
                prefix_len,
                port: endpoint.port,
                protocol: endpoint.protocol,
                watch_id: watch.id,
            };
            match &endpoint.host {
                EndpointHost::Any => {
                    out.rules.push(rule(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
                    out.rules.push(rule(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0));
                }
                EndpointHost::Net { addr, prefix_len } => out.rules.push(rule(*addr, *prefix_len)),
                EndpointHost::Name(name) => {
                    if let Some(error) = failures.get(name.as_str()) {
                        out.unresolved.push(UnresolvedHost {
                            watch_id: watch.id,
                            host: name.clone(),
                            error: error.clone(),
                        });
                    }
                    for addr in known.get(name).into_iter().flatten() {
                        let full = if addr.is_ipv4() { 32 } else { 128 };
                        out.rules.push(rule(*addr, full));
                    }
                }
            }
        }
    }
    out.rules.sort_unstable();
    out.rules.dedup();
    out
}

/// Re-resolves endpoints periodically and yields rule sets when they change.
///
/// ```ignore
/// let mut refresher = EndpointRefresher::new(set, DEFAULT_REFRESH_INTERVAL);
/// loop {
///     let resolved = refresher.changed().await; // first call: at once
///     for host in &resolved.unresolved { warn!(...) }
///     replace_endpoint_map(&resolved.rules);
/// }
/// ```
pub struct EndpointRefresher {
    set: WatchSet,
    resolver: Arc<dyn HostResolver>,
    interval: Duration,
    timeout: Duration,
    ticker: Option<tokio::time::Interval>,
    known: HashMap<String, Vec<IpAddr>>,
    last: Option<ResolvedEndpoints>,
}

impl EndpointRefresher {
    /// A refresher for `set`, with the system resolver.
    pub fn new(set: WatchSet, interval: Duration) -> Self {
        Self {
            set,
            resolver: Arc::new(SystemResolver),
            interval: interval.max(Duration::from_millis(1)),
            timeout: DEFAULT_LOOKUP_TIMEOUT,
            ticker: None,
            known: HashMap::new(),
            last: None,
        }
    }

    pub fn with_resolver(mut self, resolver: Arc<dyn HostResolver>) -> Self {
        self.resolver = resolver;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Waits for the next resolution that differs from the last one returned (rules or
    /// unresolved names); the first call resolves at once. Cancel-safe between refreshes.
    pub async fn changed(&mut self) -> ResolvedEndpoints {
        let interval = self.interval;
        let ticker = self.ticker.get_or_insert_with(|| {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        loop {
            ticker.tick().await;
            let resolved =
                resolve(&self.set, self.resolver.as_ref(), self.timeout, &mut self.known).await;
            if self.last.as_ref() != Some(&resolved) {
                self.last = Some(resolved.clone());
                return resolved;
            }
        }
    }
}

impl std::fmt::Debug for EndpointRefresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRefresher")
            .field("watches", &self.set.len())
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::watch::{Category, WatchSpec};

    fn set(endpoints: &[(&str, &[&str])]) -> WatchSet {
        WatchSet::from_specs(endpoints.iter().map(|(name, list)| WatchSpec {
            name: (*name).into(),
            category: Category::AuthEndpoint,
            paths: Vec::new(),
            endpoints: list.iter().map(|s| s.to_string()).collect(),
            unix_sockets: Vec::new(),
        }))
        .expect("valid")
    }

    fn rule(
        addr: &str,
        prefix_len: u8,
        port: u16,
        protocol: Protocol,
        watch_id: u32,
    ) -> EndpointRule {
        EndpointRule { addr: addr.parse().expect("address"), prefix_len, port, protocol, watch_id }
    }

    /// Answers from a table the test changes; unknown names fail, `hang` never answers.
    #[derive(Default)]
    struct FakeResolver(Mutex<HashMap<String, Vec<IpAddr>>>);

    impl FakeResolver {
        fn set(&self, host: &str, addrs: &[&str]) {
            let addrs = addrs.iter().map(|a| a.parse().expect("address")).collect();
            self.0.lock().expect("lock").insert(host.into(), addrs);
        }
    }

    impl HostResolver for FakeResolver {
        fn lookup<'a>(
            &'a self,
            host: &'a str,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
            let answer = self.0.lock().expect("lock").get(host).cloned();
            Box::pin(async move {
                if host == "hang" {
                    std::future::pending::<()>().await;
                }
                answer.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
            })
        }
    }

    #[tokio::test]
    async fn literals_networks_and_any_address() {
        let s = set(&[
            ("cloud-metadata", &["169.254.169.254:80", "[fd00:ec2::254]:80"]),
            ("kubernetes-api", &[":6443"]),
            ("corp", &["udp://10.9.8.7/16:88"]),
        ]);
        let r = resolve_endpoints(&s).await;
        assert!(r.unresolved.is_empty());
        assert_eq!(
            r.rules,
            [
                rule("0.0.0.0", 0, 6443, Protocol::Any, 1),
                rule("10.9.0.0", 16, 88, Protocol::Udp, 2),
                rule("169.254.169.254", 32, 80, Protocol::Any, 0),
                rule("::", 0, 6443, Protocol::Any, 1),
                rule("fd00:ec2::254", 128, 80, Protocol::Any, 0),
            ]
        );
    }

    #[tokio::test]
    async fn builtin_catalog_resolves_without_network() {
        let r = resolve_endpoints_with(
            &WatchSet::builtin(),
            &FakeResolver::default(),
            Duration::from_millis(100),
        )
        .await;
        let metadata = WatchSet::builtin().id_of("cloud-metadata").expect("catalog");
        assert!(r.rules.contains(&rule("169.254.169.254", 32, 80, Protocol::Any, metadata)));
        assert!(r.unresolved.iter().any(|u| u.host == "sts.amazonaws.com"));
    }

    #[tokio::test]
    async fn localhost_through_the_system_resolver() {
        let s = set(&[("local", &["localhost:8200"])]);
        let r = resolve_endpoints(&s).await;
        assert!(r.unresolved.is_empty(), "{r:?}");
        assert!(
            r.rules.iter().any(|x| x.addr.is_loopback()
                && x.port == 8200
                && x.prefix_len == if x.addr.is_ipv4() { 32 } else { 128 }),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn unresolvable_names_are_reported_not_fatal() {
        let s = set(&[("a", &["nonexistent.invalid:443", "127.0.0.1:1"])]);
        let r = resolve_endpoints_with(&s, &SystemResolver, Duration::from_secs(5)).await;
        assert_eq!(r.rules, [rule("127.0.0.1", 32, 1, Protocol::Any, 0)]);
        assert_eq!(r.unresolved.len(), 1);
        assert_eq!(r.unresolved[0].host, "nonexistent.invalid");
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_time_out() {
        let s = set(&[("a", &["hang:443"])]);
        let r = resolve_endpoints_with(&s, &FakeResolver::default(), Duration::from_secs(2)).await;
        assert!(r.rules.is_empty());
        assert!(r.unresolved[0].error.contains("timed out"), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn refresher_yields_only_changes_and_keeps_last_known() {
        let resolver = Arc::new(FakeResolver::default());
        let s = set(&[("vault", &["vault.internal:8200"])]);
        let mut refresher =
            EndpointRefresher::new(s, Duration::from_secs(60)).with_resolver(resolver.clone());

        // Not resolvable at start: reported, no rules.
        let first = refresher.changed().await;
        assert!(first.rules.is_empty());
        assert_eq!(first.unresolved.len(), 1);

        // Nothing changes: nothing yielded.
        assert!(tokio::time::timeout(Duration::from_secs(150), refresher.changed()).await.is_err());

        // The name starts resolving: the next refresh yields it.
        resolver.set("vault.internal", &["10.0.0.5"]);
        let second = refresher.changed().await;
        assert_eq!(second.rules, [rule("10.0.0.5", 32, 8200, Protocol::Any, 0)]);
        assert!(second.unresolved.is_empty());

        // It moves.
        resolver.set("vault.internal", &["10.0.0.6", "fd00::6"]);
        let third = refresher.changed().await;
        assert_eq!(
            third.rules,
            [
                rule("10.0.0.6", 32, 8200, Protocol::Any, 0),
                rule("fd00::6", 128, 8200, Protocol::Any, 0)
            ]
        );

        // DNS fails: reported, last known addresses kept.
        resolver.0.lock().expect("lock").clear();
        let fourth = refresher.changed().await;
        assert_eq!(fourth.rules, third.rules);
        assert_eq!(fourth.unresolved.len(), 1);
    }
}
