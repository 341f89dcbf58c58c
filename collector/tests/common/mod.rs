//! Helpers shared by the collector's integration tests.
#![allow(dead_code, reason = "each test crate uses a different subset")]

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use collector::{
    correlate::Registry,
    declarations::{Objects, parse_file, validate},
    detect::{self, Context},
    event::{Ancestor, Event, EventKind, Host, Process, SecretMethod},
    rule::Rule,
};

pub const DETECT_YAML: &str = include_str!("../fixtures/detect.yaml");
pub const EXAMPLE_YAML: &str = include_str!("../fixtures/example.yaml");

/// Parses and validates YAML into declarations; panics on any problem.
pub fn objects(yaml: &str) -> Objects {
    let (mut parsed, mut problems) = (Vec::new(), Vec::new());
    parse_file("test.yaml", yaml, &mut parsed, &mut problems);
    problems.extend(validate(&Objects::new(), &parsed));
    assert!(problems.is_empty(), "fixture has problems: {problems:#?}");
    parsed
        .into_iter()
        .map(|p| ((p.declaration.kind(), p.declaration.name().to_owned()), p.declaration))
        .collect()
}

pub fn registry(yaml: &str) -> Registry {
    Registry::build(objects(yaml), HashMap::new())
}

pub fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("bad time {s}: {e}"))
        .with_timezone(&Utc)
}

pub fn host(id: &str, labels: &[(&str, &str)]) -> Host {
    Host {
        id: id.into(),
        labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect::<BTreeMap<_, _>>(),
        ..Host::default()
    }
}

pub fn prod() -> Host {
    host("web-1", &[("env", "prod")])
}

pub fn process(exe: &str, uid: u32) -> Process {
    Process {
        pid: 4242,
        ppid: 1,
        uid,
        euid: uid,
        comm: exe.rsplit('/').next().unwrap_or(exe).chars().take(15).collect(),
        exe: exe.into(),
        ancestors: vec![Ancestor {
            pid: 1,
            exe: "/usr/lib/systemd/systemd".into(),
            comm: "systemd".into(),
        }],
        ..Process::default()
    }
}

pub fn payments() -> Process {
    process("/usr/local/bin/payments-api", 1001)
}

/// One event of host web-1, seq 1.
pub fn event(process: Process, at: &str, kind: EventKind) -> Event {
    Event {
        host_id: "web-1".into(),
        seq: 1,
        time: t(at),
        count: 1,
        process,
        kind,
        record: Vec::new(),
    }
}

pub fn read(p: Process, at: &str, path: &str) -> Event {
    let watch = if path.contains(".aws") { "aws-credentials" } else { "" };
    event(
        p,
        at,
        EventKind::FileAccess { watch: watch.into(), path: path.into(), write: false, held: false },
    )
}

pub fn aws(p: Process, at: &str) -> Event {
    read(p, at, "/srv/payments/.aws/credentials")
}

pub fn connect(p: Process, at: &str, address: &str, port: u16) -> Event {
    event(
        p,
        at,
        EventKind::Connect {
            watch: String::new(),
            address: address.into(),
            port,
            protocol: "tcp".into(),
        },
    )
}

pub fn secret(p: Process, at: &str, method: SecretMethod) -> Event {
    event(
        p,
        at,
        EventKind::SecretAccess {
            method,
            target_pid: 77,
            target_ns_pid: None,
            target: None,
            watch: String::new(),
            path: "/proc/77/environ".into(),
        },
    )
}

pub fn setuid(p: Process, at: &str, new_uid: u32, caps: u64) -> Event {
    let old = p.uid;
    event(
        p,
        at,
        EventKind::PrivilegeChange {
            via: "setresuid".into(),
            old_uid: old,
            old_euid: old,
            new_uid,
            new_euid: new_uid,
            old_cap_effective: 0,
            new_cap_effective: caps,
        },
    )
}

/// Rules that fire for `event` on `host`, sorted, with the workload each names.
pub fn fired(
    reg: &Registry,
    host: &Host,
    event: &Event,
    last_active: Option<DateTime<Utc>>,
) -> Vec<(Rule, Option<String>)> {
    let workload = reg.correlate(host, &event.process);
    let mut out: Vec<(Rule, Option<String>)> =
        detect::detect(reg, Context { host, workload, last_active }, event)
            .into_iter()
            .map(|f| (f.rule, f.workload))
            .collect();
    out.sort();
    out
}

pub fn rules(reg: &Registry, host: &Host, event: &Event) -> Vec<Rule> {
    fired(reg, host, event, None).into_iter().map(|(r, _)| r).collect()
}

/// A collector in `dir` with a manual clock and the detection registry applied.
pub fn collector(
    dir: &std::path::Path,
    now: &str,
) -> (collector::serve::Collector, collector::clock::ManualClock) {
    let clock = collector::clock::ManualClock::new(t(now));
    let c = collector::serve::Collector::open(dir, std::sync::Arc::new(clock.clone()))
        .expect("open collector");
    if c.registry.snapshot().objects.is_empty() {
        c.registry
            .apply(&[("detect.yaml".into(), DETECT_YAML.into())], "test", false, &|_, _| Ok(()))
            .expect("apply fixture");
    }
    (c, clock)
}

pub fn hello(host_id: &str) -> keywatch_proto::v1::Hello {
    keywatch_proto::v1::Hello {
        host_id: host_id.into(),
        sensor_version: "test".into(),
        kernel: "6.18".into(),
        labels: [("env".to_owned(), "prod".to_owned())].into_iter().collect(),
        ..Default::default()
    }
}

/// A wire batch of `events`, renumbered from `first_seq`.
pub fn batch(host_id: &str, first_seq: u64, events: &[Event]) -> keywatch_proto::v1::EventBatch {
    keywatch_proto::v1::EventBatch {
        host_id: host_id.into(),
        first_seq,
        events: events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut e = e.clone();
                e.seq = first_seq + i as u64;
                collector::convert::event_to_proto(&e)
            })
            .collect(),
    }
}
