//! Turns the kernel's cumulative fold totals into per-event counts, and reports the tails that
//! no record carried (a burst that stopped inside the fold window), so that delivered counts
//! plus kernel-counted losses add up to every occurrence.

use std::collections::HashMap;

use sensor_ebpf::{EventKind, FoldKey, FoldState, NO_WATCH, SECRET_NS_NAMED, SecretMethod};

use crate::event::{Detail, Event, ProcessRef, secret_method};

/// A kernel entry this recent may still have its record in flight in the ring.
const IN_FLIGHT_NS: u64 = 100_000_000;
/// A key with nothing reported whose record the kernel did not lose has that record in the
/// ring still, carrying everything the key alone cannot tell (path, watch): it is waited for,
/// up to this long behind the reader (a stalled downstream), before the key speaks for it.
const UNLOST_IN_FLIGHT_NS: u64 = 10_000_000_000;

/// Per fold key: what has been reported and the last event, used as the template for tails.
#[derive(Debug, Default)]
pub struct FoldTracker {
    keys: HashMap<FoldKey, Reported>,
    window_ns: u64,
    /// Lost records (ring full) of keys reported by a sweep alone: their occurrences were
    /// delivered after all, from the kernel's counts.
    recovered_records: u64,
}

#[derive(Debug)]
struct Reported {
    total: u64,
    last: Event,
}

impl FoldTracker {
    pub fn new(window: std::time::Duration) -> Self {
        Self { keys: HashMap::new(), window_ns: window.as_nanos() as u64, recovered_records: 0 }
    }

    /// Records the kernel counted as lost whose occurrences a sweep reported nonetheless, for
    /// keys that had no record delivered at all, so far.
    pub fn recovered_records(&self) -> u64 {
        self.recovered_records
    }

    /// Continues from the totals a previous sensor reported (its checkpoint), so occurrences
    /// it already reported are not reported again.
    ///
    /// The checkpoint is written by the reader only once the events carrying those totals are
    /// durable (`event.fold` is the key and total to checkpoint), so it never runs ahead.
    pub fn seed(&mut self, reported: &[(FoldKey, u64)]) {
        for &(key, total) in reported {
            self.keys.insert(key, Reported { total, last: event_from_key(&key, 0) });
        }
    }

    /// Sets `event.count` to the occurrences it newly accounts for; `None` when it accounts for
    /// none (a record overtaken by a later total, e.g. from another CPU).
    pub fn on_event(&mut self, mut event: Event) -> Option<Event> {
        let Some((key, total)) = event.fold else {
            return Some(event);
        };
        let delta = match self.keys.get(&key) {
            None => total,
            Some(prev) if total > prev.total => total - prev.total,
            // The kernel dropped and re-created the entry (LRU): a fresh count.
            Some(prev) if event.time_ns > prev.last.time_ns + self.window_ns => total,
            Some(_) => return None,
        };
        event.count = u32::try_from(delta).unwrap_or(u32::MAX);
        self.keys.insert(key, Reported { total, last: event.clone() });
        Some(event)
    }

    /// Events for occurrences that the kernel counted but no record carried, given the
    /// kernel's fold entries. Keys the kernel no longer holds are forgotten. A key whose every
    /// record was lost (ring full) is still reported, from what the key itself says.
    pub fn sweep(
        &mut self,
        entries: &[(FoldKey, FoldState)],
        now_unix_ns: u64,
        now_boot_ns: u64,
    ) -> Vec<Event> {
        let mut tails = Vec::new();
        let mut live = std::collections::HashSet::with_capacity(entries.len());
        for &(key, state) in entries {
            live.insert(key);
            let reported_total = match self.keys.get(&key) {
                Some(r) => r.total,
                None => {
                    let wait =
                        if state.lost_records > 0 { IN_FLIGHT_NS } else { UNLOST_IN_FLIGHT_NS };
                    if now_boot_ns.saturating_sub(state.last_emit_ns) < wait {
                        continue;
                    }
                    0
                }
            };
            if state.total <= reported_total {
                continue;
            }
            let mut tail = match self.keys.get(&key) {
                Some(r) => r.last.clone(),
                None => {
                    self.recovered_records += state.lost_records;
                    event_from_key(&key, now_unix_ns)
                }
            };
            tail.count = u32::try_from(state.total - reported_total).unwrap_or(u32::MAX);
            tail.time_ns = now_unix_ns;
            tail.fold = Some((key, state.total));
            self.keys.insert(key, Reported { total: state.total, last: tail.clone() });
            tails.push(tail);
        }
        self.keys.retain(|k, _| live.contains(k));
        tails
    }
}

/// The most an orphaned fold key says: who, what kind, which object.
fn event_from_key(key: &FoldKey, now_unix_ns: u64) -> Event {
    let detail = match EventKind::try_from(key.kind) {
        Ok(EventKind::Secret) => {
            let (method, target) = (key.object as u32, (key.object >> 32) as u32);
            let unresolved = method & SECRET_NS_NAMED != 0;
            Detail::Secret {
                method: SecretMethod::try_from(method & !SECRET_NS_NAMED)
                    .map_or("unix_socket", secret_method),
                target_pid: if unresolved { 0 } else { target },
                detail: key.qualifier,
                flags: 0,
                ns_pid: if unresolved { target } else { 0 },
            }
        }
        Ok(EventKind::Connect) => Detail::Connect {
            watch_id: NO_WATCH,
            protocol: if key.qualifier >> 16 == 17 { "udp" } else { "tcp" },
            address: std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            port: key.qualifier as u16,
        },
        _ => Detail::FileOpen {
            watch_id: NO_WATCH,
            matched: "file",
            name: String::new(),
            dev: key.qualifier as u32,
            ino: key.object,
            parent_ino: 0,
            flags: 0,
            write: false,
            held: false,
        },
    };
    Event {
        time_ns: now_unix_ns,
        count: 0,
        process: ProcessRef {
            pid: key.tgid,
            tid: key.tgid,
            ppid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
            euid: u32::MAX,
            login_uid: None,
            comm: String::new(),
            cgroup_id: 0,
        },
        detail,
        fold: None,
        mark: 0,
        ring_pos: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Detail, ProcessRef};

    fn event(total: u64, time_ns: u64) -> Event {
        Event {
            time_ns,
            count: 1,
            process: ProcessRef {
                pid: 10,
                tid: 10,
                ppid: 1,
                uid: 0,
                gid: 0,
                euid: 0,
                login_uid: None,
                comm: "cat".into(),
                cgroup_id: 1,
            },
            detail: Detail::Fork { child_pid: 0 },
            fold: Some((FoldKey::file(10, 1, 42), total)),
            mark: 0,
            ring_pos: 0,
        }
    }

    #[test]
    fn counts_add_up_to_the_kernel_totals() {
        let mut t = FoldTracker::new(std::time::Duration::from_secs(1));
        assert_eq!(t.on_event(event(1, 0)).unwrap().count, 1);
        // 99 folded opens, then a record after the window carrying total 150.
        assert_eq!(t.on_event(event(150, 2_000_000_000)).unwrap().count, 149);
        // A stale record (another CPU) is dropped, not double counted.
        assert!(t.on_event(event(120, 2_000_000_001)).is_none());
        // The burst goes on to 400 and stops: the sweep reports the tail once.
        let key = FoldKey::file(10, 1, 42);
        let state = |total| FoldState { total, last_emit_ns: 0, lost_records: 0 };
        let tails = t.sweep(&[(key, state(400))], 3_000_000_000, 10_000_000_000);
        assert_eq!(tails.len(), 1);
        assert_eq!(tails[0].count, 250);
        assert_eq!(t.recovered_records(), 0, "a tail of a key with records is no recovery");
        assert!(t.sweep(&[(key, state(400))], 4_000_000_000, 10_000_000_000).is_empty());
        // The key left the kernel map: forgotten, and a fresh entry counts from scratch.
        assert!(t.sweep(&[], 5_000_000_000, 10_000_000_000).is_empty());
        assert_eq!(t.on_event(event(1, 6_000_000_000)).unwrap().count, 1);
    }

    #[test]
    fn a_key_whose_records_were_all_lost_is_still_counted() {
        let mut t = FoldTracker::new(std::time::Duration::from_secs(1));
        let key = FoldKey::file(77, 5, 9);
        // Too recent: its record may still be in the ring.
        let fresh = FoldState { total: 30, last_emit_ns: 9_990_000_000, lost_records: 2 };
        assert!(t.sweep(&[(key, fresh)], 1, 10_000_000_000).is_empty());
        // Its record was not lost: it is still in the ring, and has more to say than the key.
        let unlost = FoldState { total: 30, last_emit_ns: 1_000_000_000, lost_records: 0 };
        assert!(t.sweep(&[(key, unlost)], 1, 10_000_000_000).is_empty());
        let old = FoldState { lost_records: 2, ..unlost };
        let tails = t.sweep(&[(key, old)], 1, 10_000_000_000);
        assert_eq!(tails.len(), 1);
        assert_eq!((tails[0].count, tails[0].process.pid), (30, 77));
        assert!(matches!(tails[0].detail, Detail::FileOpen { ino: 9, dev: 5, .. }));
        assert_eq!(t.recovered_records(), 2, "reported from the key alone");
        // One whose record never came at all, long after: the key speaks for it.
        let key = FoldKey::file(78, 5, 9);
        let never = FoldState { total: 1, last_emit_ns: 1_000_000_000, lost_records: 0 };
        assert_eq!(t.sweep(&[(key, never)], 1, 12_000_000_000).len(), 1);
        assert_eq!(t.recovered_records(), 2);
    }

    #[test]
    fn a_lost_secret_access_is_told_from_its_key_with_the_callers_number() {
        let ptrace = SecretMethod::Ptrace as u32;
        let lost = FoldState { total: 1, last_emit_ns: 0, lost_records: 1 };
        let at = |key| match event_from_key(&key, 1).detail {
            Detail::Secret { method, target_pid, ns_pid, detail, .. } => {
                (method, target_pid, ns_pid, detail)
            }
            other => panic!("{other:?}"),
        };
        // Host pid found: the key holds it (the caller's own number is not kept).
        assert_eq!(at(FoldKey::secret(5, ptrace, 812, 2, 16)), ("ptrace", 812, 0, 16));
        // None found: the caller's number, marked, never taken for a host pid.
        let unresolved = FoldKey::secret(5, ptrace, 0, 2, 16);
        assert_ne!(unresolved, FoldKey::secret(5, ptrace, 2, 0, 16));
        assert_eq!(at(unresolved), ("ptrace", 0, 2, 16));
        let mut t = FoldTracker::new(std::time::Duration::from_secs(1));
        assert_eq!(t.sweep(&[(unresolved, lost)], 1, 10_000_000_000).len(), 1);
    }
}
