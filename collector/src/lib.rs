//! Keywatch collector: receives sensor event streams, correlates them with declared workload
//! identities, raises alerts, and serves the API behind the `keywatch` CLI.
//!
//! Data path: [`ingest`] (gRPC `SensorService`) → [`convert`] (checked wire → domain) →
//! [`correlate`] (event → workload) → [`detect`] (rules) → [`alerts`] (context, grouping) →
//! [`store`] (one trait; SQLite today). People drive it through [`cli`] → [`api`].

pub mod alerts;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod convert;
pub mod correlate;
pub mod declarations;
pub mod detect;
pub mod duration;
pub mod enroll;
pub mod event;
pub mod hosts;
pub mod ingest;
pub mod outbox;
pub mod pki;
pub mod registry;
pub mod route;
pub mod rule;
pub mod store;
pub mod table;
pub mod timeline;
pub mod tls;
pub mod watchspec;

pub mod api;
pub mod cli;
pub mod serve;
