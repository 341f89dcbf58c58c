//! Declarations: the registry of watches, teams, workloads, approved changes and detection
//! settings that people keep in version control and `keywatch apply`.

pub mod diff;
pub mod model;
pub mod parse;
pub mod validate;

pub use model::{Declaration, Kind};
pub use parse::{Parsed, Problem, Source, parse_file};
pub use validate::{Objects, validate};
