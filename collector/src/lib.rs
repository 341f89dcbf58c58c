//! Keywatch collector: receives sensor event streams, correlates them with declared workload
//! identities, raises and routes alerts, and serves the API behind the `keywatch` CLI.

pub mod cli;
