//! What to watch: credentials, secrets and authentication endpoints, resolved to what the
//! kernel programs match on (inodes and addresses).
//!
//! - [`WatchSpec`]s come from the [built-in catalog](builtin_catalog), a [config
//!   file](load_config) or the collector's policy; [`WatchSet::from_specs`] validates them all
//!   the same way and numbers them (the ids kernel maps carry).
//! - [`resolve_files`] / [`resolve_unix_sockets`] turn path watches into inodes (with the
//!   device in both userspace and kernel encodings, see [`kernel_dev`]); [`ResolvedFiles::diff`]
//!   says what to change in the kernel maps after a re-resolution.
//! - [`FileWatcher`] signals when a re-resolution is due (inotify, debounced).
//! - [`resolve_endpoints`] turns endpoint watches into address rules; [`EndpointRefresher`]
//!   re-resolves host names periodically and yields rule sets when they change.

mod catalog;
mod config;
mod dns;
mod endpoint;
mod files;
mod pattern;
mod set;
mod spec;
mod watcher;

pub use catalog::builtin_catalog;
pub use config::{ConfigError, ConfigProblem, WatchConfig, load_config, parse_config};
pub use dns::{
    DEFAULT_LOOKUP_TIMEOUT, DEFAULT_REFRESH_INTERVAL, EndpointRefresher, EndpointRule,
    HostResolver, ResolvedEndpoints, SystemResolver, UnresolvedHost, resolve_endpoints,
    resolve_endpoints_with,
};
pub use endpoint::{Endpoint, EndpointHost, Protocol, parse_endpoint};
pub use files::{
    FileDiff, FileId, ResolvedFiles, WatchedFile, kernel_dev, resolve_files, resolve_unix_sockets,
};
pub use pattern::system_homes;
pub use set::{SpecProblem, Watch, WatchSet};
pub use spec::{Category, WatchSpec};
pub use watcher::{DEFAULT_DEBOUNCE, FileWatcher};
