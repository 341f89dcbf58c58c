//! Program entry points, maps and the helpers they share.

mod exec;
mod maps;
mod task;
