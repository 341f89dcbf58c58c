//! The process table: who a pid is, exactly, at the moment of an event.
//!
//! The kernel reports a pid with each event; by the time userspace reads it the process may have
//! exec'd, exited, or its pid may belong to someone else. [`ProcessTable`] is kept exact by the
//! `sched_process_fork/exec/exit` events and seeded from `/proc` at start, remembers exited
//! processes for a retention period (so a credential read just before exit still resolves to the
//! right exe and parent chain), and stores each process's start time so a recycled pid is never
//! mistaken for the process that had it before.
//!
//! Hashing executables is slow I/O and lives apart in [`ExeHasher`], to be called from a blocking
//! task; the table never blocks on it.

mod cgroup;
mod hash;
mod info;
mod procfs;
mod table;
mod tty;

#[cfg(test)]
mod tests;

pub use cgroup::{CgroupIdentity, parse_cgroup_path};
pub use hash::{DEFAULT_MAX_HASH_SIZE, ExeHasher};
pub use info::{Ancestor, ProcessInfo, kernel_file_id};
pub use procfs::{DEFAULT_PROC_ROOT, ProcFs, ProcReadError, split_cmdline};
pub use table::{DEFAULT_RETENTION_NS, ExecFacts, ProcessTable};
pub use tty::tty_name;
