//! Sinks for events. Standalone mode writes one JSON object per line to stdout.

use std::io::Write;

use crate::event::Event;

/// Writes `event` as one JSON line.
pub fn write_json_line(out: &mut impl Write, event: &Event) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, event)?;
    out.write_all(b"\n")
}
