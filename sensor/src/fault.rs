//! Crash points for tests: `KEYWATCH_CRASH_AT=NAME` makes the sensor SIGKILL itself the first
//! time it passes the point called NAME, so a test can stop it in exactly the state a crash
//! at the worst moment leaves (for example, events synced to the spool but their ring records
//! not yet released). Unset, a crash point costs one cached comparison.

use std::sync::OnceLock;

/// The environment variable naming the crash point to stop at.
pub const CRASH_AT_ENV: &str = "KEYWATCH_CRASH_AT";

/// After a spool sync made new events durable, before anything acts on it.
pub const AFTER_SPOOL_SYNC: &str = "after-spool-sync";

/// Stops the process with SIGKILL if `KEYWATCH_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var(CRASH_AT_ENV).ok());
    if armed.as_deref() == Some(point) {
        eprintln!(
            "keywatch-sensor: crash point {point} reached ({CRASH_AT_ENV}); stopping with SIGKILL"
        );
        // SAFETY: kill has no memory preconditions; the target is this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
