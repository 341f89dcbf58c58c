//! Sinks for events. Standalone mode writes one JSON object per line to stdout.

use std::io::Write;

use serde::Serialize;

/// Writes `item` as one JSON line.
pub fn write_json_line(out: &mut impl Write, item: &impl Serialize) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, item)?;
    out.write_all(b"\n")
}
