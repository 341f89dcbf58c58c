//! Human durations such as `90s`, `15m`, `2h`, `30d`, `1w` (also combined: `1h30m`).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written the way people write them in YAML and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub chrono::Duration);

/// Why a duration did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected a duration such as 90s, 15m, 2h, 30d or 1h30m, got {0:?}")]
pub struct DurationError(pub String);

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError(s.to_owned());
        let text = s.trim();
        if text.is_empty() {
            return Err(err());
        }
        let mut total = chrono::Duration::zero();
        let mut digits = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: i64 = digits.parse().map_err(|_| err())?;
            digits.clear();
            let part = match c {
                's' => chrono::Duration::try_seconds(n),
                'm' => chrono::Duration::try_minutes(n),
                'h' => chrono::Duration::try_hours(n),
                'd' => chrono::Duration::try_days(n),
                'w' => chrono::Duration::try_weeks(n),
                _ => None,
            }
            .ok_or_else(err)?;
            total = total.checked_add(&part).ok_or_else(err)?;
        }
        if !digits.is_empty() || total <= chrono::Duration::zero() {
            return Err(err());
        }
        Ok(Self(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut secs = self.0.num_seconds();
        if secs == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (text, secs, shown) in [
            ("90s", 90, "1m30s"),
            ("15m", 900, "15m"),
            ("2h", 7_200, "2h"),
            ("1h30m", 5_400, "1h30m"),
            ("30d", 2_592_000, "30d"),
            ("1w", 604_800, "7d"),
        ] {
            let d: HumanDuration = text.parse().unwrap();
            assert_eq!(d.0.num_seconds(), secs, "{text}");
            assert_eq!(d.to_string(), shown);
        }
        for bad in ["", "15", "m", "1x", "-5m", "0s"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad:?} should be refused");
        }
    }
}
