//! Per-host timelines: events and alerts in time order, with each process's ancestry.
//!
//! Order is `(time, source, id)` where events sort before alerts, and alerts before gaps (events
//! a sensor reported lost), at the same instant; the
//! cursor carries all three, so pages are stable even when many entries share a timestamp.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{event::Process, table};

/// Where a page resumes: the last entry returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Cursor {
    pub time_ns: i64,
    /// 0 for events, 1 for alerts, 2 for gaps.
    pub source: u8,
    pub id: i64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.time_ns, self.source, self.id)
    }
}

/// A page token that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid page token {0:?}")]
pub struct BadCursor(pub String);

impl FromStr for Cursor {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCursor(s.to_owned());
        let mut parts = s.split('.');
        let mut next = || parts.next().ok_or_else(bad);
        let c = Cursor {
            time_ns: next()?.parse().map_err(|_| bad())?,
            source: next()?.parse().map_err(|_| bad())?,
            id: next()?.parse().map_err(|_| bad())?,
        };
        if parts.next().is_some() || c.source > 2 {
            return Err(bad());
        }
        Ok(c)
    }
}

/// What to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineQuery {
    pub host_id: String,
    /// Inclusive.
    pub from: DateTime<Utc>,
    /// Exclusive.
    pub to: DateTime<Utc>,
    pub pid: Option<u32>,
    /// Event kind names (`file-access`, `exec`, …, `alert` and `gap`); empty: all.
    pub kinds: Vec<String>,
    pub after: Option<Cursor>,
    pub limit: usize,
}

/// One line of a timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub time: DateTime<Utc>,
    /// `event`, `alert` or `gap`.
    pub source: String,
    /// Event row id, alert id or gap id.
    pub id: i64,
    /// Event kind, `alert` or `gap`.
    pub kind: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub summary: String,
    /// Events lost, for a gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
    /// The process and its ancestry (empty for a gap).
    pub process: Process,
}

/// One page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TimelinePage {
    pub entries: Vec<TimelineEntry>,
    /// Present when more entries may follow.
    pub next: Option<String>,
}

/// Aligned table, one line per entry.
pub fn render_table(entries: &[TimelineEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                e.pid.to_string(),
                e.kind.clone(),
                e.workload.clone().unwrap_or_else(|| "-".into()),
                e.process.ancestry_line(),
                e.summary.clone(),
            ]
        })
        .collect();
    table::render(&["TIME", "PID", "KIND", "WORKLOAD", "PROCESS < ANCESTORS", "WHAT"], &rows)
}
