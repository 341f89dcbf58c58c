//! Turns the kernel's cumulative fold totals into per-event counts, and reports the tails that
//! no record carried (a burst that stopped inside the fold window), so that delivered counts
//! plus kernel-counted losses add up to every occurrence.

use std::collections::HashMap;

use sensor_ebpf::FoldKey;

use crate::event::Event;

/// Per fold key: what has been reported and the last event, used as the template for tails.
#[derive(Debug, Default)]
pub struct FoldTracker {
    keys: HashMap<FoldKey, Reported>,
    window_ns: u64,
}

#[derive(Debug)]
struct Reported {
    total: u64,
    last: Event,
}

impl FoldTracker {
    pub fn new(window: std::time::Duration) -> Self {
        Self {
            keys: HashMap::new(),
            window_ns: window.as_nanos() as u64,
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
        self.keys.insert(
            key,
            Reported {
                total,
                last: event.clone(),
            },
        );
        Some(event)
    }

    /// Events for occurrences that the kernel counted but no record carried, given the
    /// kernel's current totals. Keys the kernel no longer holds are forgotten.
    pub fn sweep(&mut self, kernel_totals: &[(FoldKey, u64)], now_ns: u64) -> Vec<Event> {
        let mut tails = Vec::new();
        let mut live = std::collections::HashSet::with_capacity(kernel_totals.len());
        for &(key, total) in kernel_totals {
            live.insert(key);
            let Some(reported) = self.keys.get_mut(&key) else {
                continue;
            };
            if total <= reported.total {
                continue;
            }
            let mut tail = reported.last.clone();
            tail.count = u32::try_from(total - reported.total).unwrap_or(u32::MAX);
            tail.time_ns = now_ns;
            tail.fold = Some((key, total));
            reported.total = total;
            reported.last = tail.clone();
            tails.push(tail);
        }
        self.keys.retain(|k, _| live.contains(k));
        tails
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
        let tails = t.sweep(&[(key, 400)], 3_000_000_000);
        assert_eq!(tails.len(), 1);
        assert_eq!(tails[0].count, 250);
        assert!(t.sweep(&[(key, 400)], 4_000_000_000).is_empty());
        // The key left the kernel map: forgotten, and a fresh entry counts from scratch.
        assert!(t.sweep(&[], 5_000_000_000).is_empty());
        assert_eq!(t.on_event(event(1, 6_000_000_000)).unwrap().count, 1);
    }
}
