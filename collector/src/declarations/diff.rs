//! Line diffs between two renderings of a declaration, for the revision history, and whether a
//! workload's declaration was widened.

use std::collections::BTreeSet;

use super::model::{Window, Workload};

/// A unified-style diff (`-` removed, `+` added, ` ` kept) of two texts, by lines.
pub fn line_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence table; declarations are small.
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] =
                if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

/// How `new` allows more than `old`: added credentials, endpoints, secrets or cross-process
/// methods, privilege escalation turned on, or time that no old window covered (a window added
/// or lengthened, or windows removed altogether, which means any time). Empty: not widened.
pub fn widened(old: &Workload, new: &Workload) -> Vec<String> {
    let mut out = Vec::new();
    let (o, n) = (&old.expect, &new.expect);
    for (field, old_list, new_list) in [
        ("credentials", &o.credentials, &n.credentials),
        ("auth_endpoints", &o.auth_endpoints, &n.auth_endpoints),
        ("secrets", &o.secrets, &n.secrets),
    ] {
        let added: Vec<&str> =
            new_list.iter().filter(|x| !old_list.contains(x)).map(String::as_str).collect();
        if !added.is_empty() {
            out.push(format!("{field} added: {}", added.join(", ")));
        }
    }
    let added: Vec<&str> = n
        .cross_process
        .iter()
        .filter(|m| !o.cross_process.contains(m))
        .map(|m| m.as_str())
        .collect();
    if !added.is_empty() {
        out.push(format!("cross_process added: {}", added.join(", ")));
    }
    if n.privilege_escalation && !o.privilege_escalation {
        out.push("privilege_escalation turned on".into());
    }
    if !o.windows.is_empty() {
        if n.windows.is_empty() {
            out.push("windows removed: use is now expected at any time".into());
        } else {
            let covered = week_minutes(&o.windows);
            let wider: Vec<String> = n
                .windows
                .iter()
                .filter(|w| !week_minutes(std::slice::from_ref(w)).is_subset(&covered))
                .map(|w| {
                    let days = w.days.as_ref().map_or("every day".into(), |d| {
                        d.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(",")
                    });
                    format!("{}-{} {} {}", w.from, w.to, w.tz, days)
                })
                .collect();
            if !wider.is_empty() {
                out.push(format!("windows widened: {}", wider.join("; ")));
            }
        }
    }
    out
}

/// The minutes of the week (in each window's own zone) the windows cover.
fn week_minutes(windows: &[Window]) -> BTreeSet<(String, u32)> {
    const WEEK: u32 = 7 * 1440;
    let minute = |s: &str| -> Option<u32> {
        let (h, m) = s.split_once(':')?;
        Some(h.parse::<u32>().ok()? * 60 + m.parse::<u32>().ok()?)
    };
    let mut set = BTreeSet::new();
    for w in windows {
        let (Some(from), Some(to)) = (minute(&w.from), minute(&w.to)) else { continue };
        let len = if to > from { to - from } else { 1440 - from + to };
        let days: Vec<u32> =
            w.days.as_ref().map_or((0..7).collect(), |d| d.iter().map(|d| d.index()).collect());
        for day in days {
            for m in 0..len {
                set.insert((w.tz.clone(), (day * 1440 + from + m) % WEEK));
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::declarations::{Declaration, Parsed, parse_file};

    fn workload(expect: &str) -> Workload {
        let yaml = format!(
            "kind: Workload\nname: w\nowner: t\nidentity_type: workload\nmatch: {{uid: 1}}\nexpect:\n{expect}"
        );
        let (mut parsed, mut problems): (Vec<Parsed>, _) = (Vec::new(), Vec::new());
        parse_file("w.yaml", &yaml, &mut parsed, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        match parsed.remove(0).declaration {
            Declaration::Workload(w) => w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn widening() {
        let base = workload(
            "  credentials: [a]\n  windows: [{days: [mon], from: \"08:00\", to: \"18:00\", tz: UTC}]\n",
        );
        assert!(widened(&base, &base).is_empty());
        let more = workload(
            "  credentials: [a, b]\n  windows: [{days: [mon], from: \"08:00\", to: \"18:00\", tz: UTC}]\n",
        );
        assert_eq!(widened(&base, &more), vec!["credentials added: b"]);
        assert!(widened(&more, &base).is_empty(), "narrowing is not widening");
        let longer = workload(
            "  credentials: [a]\n  windows: [{days: [mon], from: \"07:00\", to: \"18:00\", tz: UTC}]\n",
        );
        assert_eq!(widened(&base, &longer), vec!["windows widened: 07:00-18:00 UTC mon"]);
        let shorter = workload(
            "  credentials: [a]\n  windows: [{days: [mon], from: \"09:00\", to: \"17:00\", tz: UTC}]\n",
        );
        assert!(widened(&base, &shorter).is_empty());
        let any = workload("  credentials: [a]\n  privilege_escalation: true\n");
        assert_eq!(
            widened(&base, &any),
            vec![
                "privilege_escalation turned on",
                "windows removed: use is now expected at any time"
            ]
        );
    }

    #[test]
    fn shows_changed_lines() {
        let d = super::line_diff("a\nb\nc\n", "a\nB\nc\nd\n");
        assert_eq!(d, "  a\n- b\n+ B\n  c\n+ d\n");
    }
}
