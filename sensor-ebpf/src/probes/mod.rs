//! Program entry points, maps and the helpers they share.
//!
//! Every entry point calls a `try_*` function and maps its `Result` to the return code the hook
//! expects; a failed kernel read drops the event rather than reporting garbage.

mod cred;
mod exec;
mod file;
mod fold;
mod kfunc;
mod kread;
mod lifecycle;
mod maps;
mod net;
mod pidns;
mod secret;
mod task;
