//! Weekly time windows in IANA time zones.
//!
//! A window is wall-clock time in its zone: `08:00`–`18:00` Europe/London means 08:00 to 18:00 as
//! the clocks in London show it, in winter (UTC+0) and summer (UTC+1) alike, on the DST switch
//! days too. `from` is inclusive, `to` exclusive (17:59:59 is inside, 18:00:00 outside). When
//! `from` is later than `to` the window crosses midnight: it starts on a listed day and ends the
//! next morning.

use chrono::{DateTime, Datelike as _, Timelike as _, Utc};
use chrono_tz::Tz;

use crate::declarations::model::{Day, Window};

/// Minutes since local midnight for `HH:MM`; `24:00` only when `allow_end_of_day`.
pub fn parse_hhmm(s: &str, allow_end_of_day: bool) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if allow_end_of_day => Some(1_440),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// A window ready to test instants against.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledWindow {
    /// Monday = index 0.
    pub days: [bool; 7],
    /// Minutes since local midnight.
    pub from: u32,
    /// Minutes since local midnight (exclusive), 1440 for end of day.
    pub to: u32,
    pub tz: Tz,
}

/// Why a window is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("expected HH:MM (00:00 to 23:59), got {0:?}")]
    From(String),
    #[error("expected HH:MM (00:00 to 24:00), got {0:?}")]
    To(String),
    #[error("unknown time zone {0:?}; expected an IANA name such as Europe/London or UTC")]
    Tz(String),
    #[error(
        "`from` and `to` are both {0}: the window would be empty (use 00:00 to 24:00 for a whole day)"
    )]
    Empty(String),
    #[error("`days` is empty; leave it out for every day")]
    NoDays,
    #[error("{0} is listed twice")]
    DuplicateDay(&'static str),
}

/// Which field of the window a [`WindowError`] concerns.
impl WindowError {
    pub fn field(&self) -> &'static str {
        match self {
            Self::From(_) => "from",
            Self::To(_) | Self::Empty(_) => "to",
            Self::Tz(_) => "tz",
            Self::NoDays | Self::DuplicateDay(_) => "days",
        }
    }
}

impl CompiledWindow {
    /// Checks and compiles a declared window.
    pub fn compile(w: &Window) -> Result<Self, WindowError> {
        let from = parse_hhmm(&w.from, false).ok_or_else(|| WindowError::From(w.from.clone()))?;
        let to = parse_hhmm(&w.to, true).ok_or_else(|| WindowError::To(w.to.clone()))?;
        let tz: Tz = w.tz.parse().map_err(|_| WindowError::Tz(w.tz.clone()))?;
        if from == to {
            return Err(WindowError::Empty(w.from.clone()));
        }
        let mut days = [false; 7];
        match &w.days {
            None => days = [true; 7],
            Some(list) if list.is_empty() => return Err(WindowError::NoDays),
            Some(list) => {
                for d in list {
                    if std::mem::replace(&mut days[d.index() as usize], true) {
                        return Err(WindowError::DuplicateDay(d.as_str()));
                    }
                }
            }
        }
        Ok(Self { days, from, to, tz })
    }

    /// Whether `t` falls inside the window.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        let local = t.with_timezone(&self.tz);
        let day = local.weekday().num_days_from_monday() as usize;
        let secs = local.num_seconds_from_midnight();
        let (from, to) = (self.from * 60, self.to * 60);
        if from < to {
            self.days[day] && from <= secs && secs < to
        } else {
            (self.days[day] && secs >= from) || (self.days[(day + 6) % 7] && secs < to)
        }
    }

    /// Minute-of-week intervals `[start, end)` the window covers (end may exceed a week; callers
    /// wrap). Used to find overlaps between windows of one zone.
    pub fn week_intervals(&self) -> Vec<(u32, u32)> {
        let len =
            if self.from < self.to { self.to - self.from } else { 1_440 - self.from + self.to };
        (0..7u32)
            .filter(|d| self.days[*d as usize])
            .map(|d| (d * 1_440 + self.from, d * 1_440 + self.from + len))
            .collect()
    }

    /// Whether two windows of the same zone share any minute.
    pub fn overlaps(&self, other: &CompiledWindow) -> bool {
        const WEEK: u32 = 7 * 1_440;
        let a = self.week_intervals();
        let b = other.week_intervals();
        a.iter().any(|&(s1, e1)| {
            b.iter().any(|&(s2, e2)| {
                // Compare with the second interval shifted a week either way to catch wrap-around.
                [0i64, WEEK as i64, -(WEEK as i64)].iter().any(|shift| {
                    let (s2, e2) = (s2 as i64 + shift, e2 as i64 + shift);
                    (s1 as i64) < e2 && s2 < e1 as i64
                })
            })
        })
    }

    /// `mon-fri 08:00-18:00 Europe/London`.
    pub fn render(&self) -> String {
        let hhmm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        format!(
            "{} {}-{} {}",
            render_days(&self.days),
            hhmm(self.from),
            hhmm(self.to),
            self.tz.name()
        )
    }
}

fn render_days(days: &[bool; 7]) -> String {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    if days.iter().all(|d| *d) {
        return "daily".to_owned();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < 7 {
        if !days[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i + 1 < 7 && days[i + 1] {
            i += 1;
        }
        parts.push(if i - start >= 2 {
            format!("{}-{}", NAMES[start], NAMES[i])
        } else if i > start {
            format!("{},{}", NAMES[start], NAMES[i])
        } else {
            NAMES[start].to_owned()
        });
        i += 1;
    }
    parts.join(",")
}

/// Day from its index (Monday = 0); used by tests and renderers.
pub fn day_from_index(i: u32) -> Option<Day> {
    [Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri, Day::Sat, Day::Sun].get(i as usize).copied()
}
