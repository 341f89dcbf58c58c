//! Table-driven detection tests: every rule, window edges, midnight, DST, approved changes,
//! selector precedence, and the Detections settings.

mod common;

use collector::{
    alerts::Alert,
    declarations::model::{Declaration, Detections, RuleSetting},
    event::{Ancestor, EventKind, SecretMethod},
    rule::{Rule, Severity},
};
use common::*;

use Rule::*;

struct Case {
    name: &'static str,
    event: collector::event::Event,
    want: Vec<Rule>,
}

fn case(name: &'static str, event: collector::event::Event, want: &[Rule]) -> Case {
    Case { name, event, want: want.to_vec() }
}

fn run(cases: Vec<Case>) {
    let reg = registry(DETECT_YAML);
    let mut failures = Vec::new();
    for c in cases {
        let got = rules(&reg, &prod(), &c.event);
        let mut want = c.want.clone();
        want.sort();
        if got != want {
            failures.push(format!("{}: want {want:?}, got {got:?}", c.name));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn window_edges_are_inclusive_then_exclusive() {
    // 2026-12-01 is a Tuesday; London is on GMT (UTC+0) in December.
    run(vec![
        case("07:59:59 before the window", aws(payments(), "2026-12-01T07:59:59Z"), &[OutOfWindow]),
        case("08:00:00 first second inside", aws(payments(), "2026-12-01T08:00:00Z"), &[]),
        case("12:00 inside", aws(payments(), "2026-12-01T12:00:00Z"), &[]),
        case("17:59:59 last second inside", aws(payments(), "2026-12-01T17:59:59Z"), &[]),
        case(
            "18:00:00 first second outside",
            aws(payments(), "2026-12-01T18:00:00Z"),
            &[OutOfWindow],
        ),
        case("Saturday noon", aws(payments(), "2026-12-12T12:00:00Z"), &[OutOfWindow]),
        case(
            "auth endpoint out of window",
            connect(payments(), "2026-12-01T19:00:00Z", "169.254.169.254", 80),
            &[OutOfWindow],
        ),
        case(
            "auth endpoint via cidr watch",
            connect(payments(), "2026-12-01T12:00:00Z", "10.20.3.4", 443),
            &[],
        ),
    ]);
}

#[test]
fn windows_follow_dst_in_london() {
    // BST starts Sunday 2026-03-29 01:00 UTC; ends Sunday 2026-10-25 01:00 UTC.
    let p = || process("/opt/ldn/run", 0);
    let w = || process("/usr/local/bin/payments-api", 1001);
    run(vec![
        case(
            "switch day 06:59:59Z is 07:59:59 BST",
            aws(p(), "2026-03-29T06:59:59Z"),
            &[OutOfWindow],
        ),
        case("switch day 07:00Z is 08:00 BST", aws(p(), "2026-03-29T07:00:00Z"), &[]),
        case("switch day 16:59:59Z is 17:59:59 BST", aws(p(), "2026-03-29T16:59:59Z"), &[]),
        case("switch day 17:00Z is 18:00 BST", aws(p(), "2026-03-29T17:00:00Z"), &[OutOfWindow]),
        case("day before: 07:30Z is 07:30 GMT", aws(p(), "2026-03-28T07:30:00Z"), &[OutOfWindow]),
        case(
            "autumn switch day 07:59:59Z is 07:59:59 GMT",
            aws(p(), "2026-10-25T07:59:59Z"),
            &[OutOfWindow],
        ),
        case("autumn switch day 08:00Z is 08:00 GMT", aws(p(), "2026-10-25T08:00:00Z"), &[]),
        case("day before autumn switch 07:00Z is 08:00 BST", aws(p(), "2026-10-24T07:00:00Z"), &[]),
        case(
            "Monday after spring switch 17:30Z is 18:30 BST",
            aws(w(), "2026-03-30T17:30:00Z"),
            &[OutOfWindow],
        ),
        case(
            "Monday after spring switch 07:30Z is 08:30 BST",
            aws(w(), "2026-03-30T07:30:00Z"),
            &[],
        ),
    ]);
}

#[test]
fn windows_cross_midnight_and_follow_dst_in_new_york() {
    // nightly-batch: daily 22:00-02:00 America/New_York. EST = UTC-5, EDT = UTC-4.
    // DST starts Sunday 2026-03-08 02:00 local; ends Sunday 2026-11-01 02:00 local.
    let p = || process("/opt/batch/run", 0);
    run(vec![
        case("winter 21:59:59 EST", aws(p(), "2026-12-02T02:59:59Z"), &[OutOfWindow]),
        case("winter 22:00 EST", aws(p(), "2026-12-02T03:00:00Z"), &[]),
        case("winter 00:00 EST, after midnight", aws(p(), "2026-12-02T05:00:00Z"), &[]),
        case("winter 01:59:59 EST", aws(p(), "2026-12-02T06:59:59Z"), &[]),
        case("winter 02:00 EST", aws(p(), "2026-12-02T07:00:00Z"), &[OutOfWindow]),
        case("spring switch 01:59:59 EST", aws(p(), "2026-03-08T06:59:59Z"), &[]),
        case(
            "spring switch 03:00 EDT (02:00 skipped)",
            aws(p(), "2026-03-08T07:00:00Z"),
            &[OutOfWindow],
        ),
        case(
            "spring switch evening 21:59:59 EDT",
            aws(p(), "2026-03-09T01:59:59Z"),
            &[OutOfWindow],
        ),
        case("spring switch evening 22:00 EDT", aws(p(), "2026-03-09T02:00:00Z"), &[]),
        case("autumn switch first 01:30 EDT", aws(p(), "2026-11-01T05:30:00Z"), &[]),
        case("autumn switch second 01:30 EST", aws(p(), "2026-11-01T06:30:00Z"), &[]),
        case("autumn switch 02:00 EST", aws(p(), "2026-11-01T07:00:00Z"), &[OutOfWindow]),
    ]);
}

#[test]
fn a_window_crossing_midnight_ends_on_the_next_day_only() {
    // friday-night: fri 22:00-02:00 Europe/London; 2026-12-04 is a Friday.
    let p = || process("/opt/fri/run", 0);
    run(vec![
        case("Friday 21:59:59", aws(p(), "2026-12-04T21:59:59Z"), &[OutOfWindow]),
        case("Friday 22:00", aws(p(), "2026-12-04T22:00:00Z"), &[]),
        case("Saturday 01:59:59", aws(p(), "2026-12-05T01:59:59Z"), &[]),
        case("Saturday 02:00", aws(p(), "2026-12-05T02:00:00Z"), &[OutOfWindow]),
        case("Saturday 23:00", aws(p(), "2026-12-05T23:00:00Z"), &[OutOfWindow]),
        case("Sunday 01:00", aws(p(), "2026-12-06T01:00:00Z"), &[OutOfWindow]),
        case("Thursday 23:00", aws(p(), "2026-12-03T23:00:00Z"), &[OutOfWindow]),
    ]);
}

#[test]
fn every_rule_fires_on_its_case() {
    let mut tty = payments();
    tty.tty = "pts/3".into();
    let mut over_ssh = payments();
    over_ssh
        .ancestors
        .insert(0, Ancestor { pid: 900, exe: "/usr/sbin/sshd".into(), comm: "sshd".into() });
    let mut human_cat = process("/usr/bin/cat", 0);
    human_cat.login_uid = Some(1000);
    run(vec![
        case(
            "unknown identity",
            aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:00Z"),
            &[UnknownIdentity],
        ),
        case(
            "unknown identity on an endpoint",
            connect(process("/usr/bin/curl", 0), "2026-12-01T12:00:00Z", "169.254.169.254", 80),
            &[UnknownIdentity],
        ),
        case(
            "out of pattern",
            read(payments(), "2026-12-01T12:00:00Z", "/home/payments/.ssh/id_ed25519"),
            &[OutOfPattern],
        ),
        case("out of window", aws(payments(), "2026-12-01T20:00:00Z"), &[OutOfWindow]),
        case(
            "secret misuse by a workload",
            secret(payments(), "2026-12-01T12:00:00Z", SecretMethod::ProcEnviron),
            &[SecretMisuse],
        ),
        case(
            "secret misuse by an undeclared process",
            secret(process("/tmp/x", 0), "2026-12-01T12:00:00Z", SecretMethod::ProcessVmReadv),
            &[SecretMisuse],
        ),
        case(
            "declared ptrace",
            secret(process("/usr/sbin/backup", 0), "2026-12-01T12:00:00Z", SecretMethod::Ptrace),
            &[],
        ),
        case(
            "declared process_vm_writev",
            secret(
                process("/usr/sbin/backup", 0),
                "2026-12-01T12:00:00Z",
                SecretMethod::ProcessVmWritev,
            ),
            &[],
        ),
        case(
            "process_vm_writev by an undeclared process",
            secret(process("/tmp/x", 0), "2026-12-01T12:00:00Z", SecretMethod::ProcessVmWritev),
            &[SecretMisuse],
        ),
        case(
            "undeclared method of a declaring workload",
            secret(process("/usr/sbin/backup", 0), "2026-12-01T12:00:00Z", SecretMethod::ProcMem),
            &[SecretMisuse],
        ),
        case(
            "privilege escalation to root",
            setuid(payments(), "2026-12-01T12:00:00Z", 0, 0),
            &[PrivilegeEscalation],
        ),
        case(
            "capabilities gained",
            setuid(payments(), "2026-12-01T12:00:00Z", 1001, 1 << 21),
            &[PrivilegeEscalation],
        ),
        case(
            "capset raises effective capabilities within the permitted set",
            privilege(process("/usr/bin/setpriv", 1000), "capset", (1000, 1000), (1000, 1000)),
            &[],
        ),
        case(
            "root going back to euid 0 after a temporary drop",
            privilege(process("/usr/sbin/daemon", 0), "setresuid", (0, 1000), (0, 0)),
            &[],
        ),
        case(
            "a setuid-root exec by a user is still an escalation",
            privilege(process("/tmp/suid-copy", 1000), "exec", (1000, 1000), (1000, 0)),
            &[PrivilegeEscalation],
        ),
        case(
            "dropping privileges is fine",
            setuid(process("/usr/bin/x", 1000), "2026-12-01T12:00:00Z", 1001, 0),
            &[],
        ),
        case(
            "declared escalation",
            setuid(process("/usr/sbin/backup", 5), "2026-12-01T12:00:00Z", 0, 0),
            &[],
        ),
        case("service account from a tty", aws(tty, "2026-12-01T12:00:00Z"), &[HumanUseOfNhi]),
        case("service account under sshd", aws(over_ssh, "2026-12-01T12:00:00Z"), &[HumanUseOfNhi]),
        case(
            "someone logged in reads a service account's credential",
            aws(human_cat, "2026-12-01T12:00:00Z"),
            &[UnknownIdentity, HumanUseOfNhi],
        ),
        case(
            "a machine identity from a tty is not NHI misuse",
            {
                let mut p = process("/usr/sbin/backup", 0);
                p.tty = "pts/1".into();
                read(p, "2026-12-01T12:00:00Z", "/root/.ssh/id_rsa")
            },
            &[],
        ),
        case(
            "exec is bookkeeping",
            {
                let mut e = aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:00Z");
                e.kind = collector::event::EventKind::Exec {
                    filename: "/usr/bin/cat".into(),
                    argv: vec![],
                };
                e
            },
            &[],
        ),
    ]);
}

#[test]
fn dormant_identity_uses_the_workload_period() {
    let reg = registry(DETECT_YAML);
    let ev = read(process("/usr/sbin/backup", 0), "2026-12-10T12:00:00Z", "/root/.ssh/id_rsa");
    let eight_days = Some(t("2026-12-02T11:00:00Z"));
    let six_days = Some(t("2026-12-04T12:00:00Z"));
    assert_eq!(
        fired(&reg, &prod(), &ev, eight_days),
        vec![(DormantIdentity, Some("backup-agent".into()))]
    );
    assert_eq!(fired(&reg, &prod(), &ev, six_days), vec![]);
    // payments-api takes the default 30 days.
    let ev = aws(payments(), "2026-12-10T12:00:00Z");
    assert_eq!(
        fired(&reg, &prod(), &ev, Some(t("2026-11-09T12:00:00Z"))),
        vec![(DormantIdentity, Some("payments-api".into()))]
    );
    assert_eq!(fired(&reg, &prod(), &ev, Some(t("2026-11-12T12:00:00Z"))), vec![]);
}

#[test]
fn an_approved_change_covers_only_its_interval_mid_burst() {
    // Saturday 2026-12-05: a burst every 10 minutes from 09:40 to 10:50; CHG-1 runs 10:00-10:30.
    let reg = registry(DETECT_YAML);
    let got: Vec<(String, Vec<Rule>)> =
        ["09:40", "09:50", "09:59:59", "10:00", "10:10", "10:29:59", "10:30", "10:40"]
            .iter()
            .map(|hm| {
                let at = if hm.len() == 5 {
                    format!("2026-12-05T{hm}:00Z")
                } else {
                    format!("2026-12-05T{hm}Z")
                };
                (hm.to_string(), rules(&reg, &prod(), &aws(payments(), &at)))
            })
            .collect();
    let want: Vec<(String, Vec<Rule>)> = [
        ("09:40", vec![OutOfWindow]),
        ("09:50", vec![OutOfWindow]),
        ("09:59:59", vec![OutOfWindow]),
        ("10:00", vec![]),
        ("10:10", vec![]),
        ("10:29:59", vec![]),
        ("10:30", vec![OutOfWindow]),
        ("10:40", vec![OutOfWindow]),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect();
    assert_eq!(got, want);

    // The change covers out-of-window only: an undeclared credential inside it still alerts,
    // and the alert names the change in force.
    let ev = read(payments(), "2026-12-05T10:10:00Z", "/home/payments/.ssh/id_rsa");
    let wl = reg.correlate(&prod(), &ev.process);
    let findings = collector::detect::detect(
        &reg,
        collector::detect::Context { host: &prod(), workload: wl, last_active: None },
        &ev,
    );
    assert_eq!(findings.len(), 1);
    let alert = Alert::build(&reg, &prod(), &ev, &findings[0]);
    assert_eq!(alert.rule, OutOfPattern);
    assert_eq!(alert.approved_change.as_ref().map(|c| c.name.as_str()), Some("CHG-1"));
    assert_eq!(alert.last_expired_change, None);

    // After it ends, the alert names the change that expired most recently.
    let ev = aws(payments(), "2026-12-05T10:40:00Z");
    let wl = reg.correlate(&prod(), &ev.process);
    let findings = collector::detect::detect(
        &reg,
        collector::detect::Context { host: &prod(), workload: wl, last_active: None },
        &ev,
    );
    let alert = Alert::build(&reg, &prod(), &ev, &findings[0]);
    assert_eq!(alert.approved_change, None);
    assert_eq!(alert.last_expired_change.as_ref().map(|c| c.name.as_str()), Some("CHG-1"));
    assert_eq!(alert.expected_windows, vec!["mon-fri 08:00-18:00 Europe/London".to_owned()]);
    assert_eq!(alert.local_time.as_deref(), Some("Sat 2026-12-05 10:40:00 GMT (Europe/London)"));
    assert_eq!(alert.owner, "team-payments");
    assert_eq!(alert.identity_type, "service-account");
    assert_eq!(
        alert.routes,
        vec![collector::route::RouteTeam {
            team: "team-payments".into(),
            reason: collector::route::Reason::Owner
        }]
    );
    assert_eq!(alert.frameworks.owasp_nhi, "NHI7 Long-Lived Secrets");
    assert_eq!(alert.resource.watch.as_deref(), Some("aws-credentials"));
    assert_eq!(alert.resource.path.as_deref(), Some("/srv/payments/.aws/credentials"));
    assert_eq!(alert.host.labels.get("env").map(String::as_str), Some("prod"));
    assert_eq!(alert.process.ancestors[0].comm, "systemd");
}

#[test]
fn undeclared_alerts_say_so() {
    let reg = registry(DETECT_YAML);
    let ev = aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:00Z");
    let findings = collector::detect::detect(
        &reg,
        collector::detect::Context { host: &prod(), workload: None, last_active: None },
        &ev,
    );
    let alert = Alert::build(&reg, &prod(), &ev, &findings[0]);
    assert_eq!(
        (alert.workload.as_str(), alert.owner.as_str(), alert.identity_type.as_str()),
        ("undeclared", "undeclared", "undeclared")
    );
    assert_eq!(alert.severity, Severity::High);
    assert_eq!(alert.routes[0].team, "secops");
    assert_eq!(alert.routes[0].reason, collector::route::Reason::Undeclared);
    assert_eq!(alert.frameworks.attack, vec!["T1552.001", "T1078", "T1528"]);
}

#[test]
fn a_secret_misuse_names_whose_secrets_and_the_callers_own_number() {
    let reg = registry(DETECT_YAML);
    let mut ev = secret(process("/tmp/x", 0), "2026-12-01T12:00:00Z", SecretMethod::Ptrace);
    let mut vault = process("/usr/bin/vault", 0);
    vault.pid = 13520;
    vault.container_id = "3f2a9c0d1e4b5a6978c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3".into();
    ev.kind = EventKind::SecretAccess {
        method: SecretMethod::Ptrace,
        target_pid: 13520,
        target_ns_pid: Some(2),
        target: Some(Box::new(vault)),
        watch: String::new(),
        path: String::new(),
    };
    let context = collector::detect::Context { host: &prod(), workload: None, last_active: None };
    let findings = collector::detect::detect(&reg, context, &ev);
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].rule, SecretMisuse);
    assert_eq!(
        findings[0].reason,
        "an undeclared process (/tmp/x) read secrets of pid 13520 (/usr/bin/vault, container \
         3f2a9c0d1e4b, pid 2 in the caller's namespace) via ptrace"
    );
    assert_eq!(
        ev.kind.summary(),
        "ptrace of pid 13520 (/usr/bin/vault, container 3f2a9c0d1e4b, pid 2 in the caller's \
         namespace)"
    );
    // No process had the number any more: said so, with the number the caller gave.
    let EventKind::SecretAccess { target_pid, target, .. } = &mut ev.kind else { unreachable!() };
    (*target_pid, *target) = (0, None);
    assert_eq!(
        ev.kind.secret_target().as_deref(),
        Some("an unknown process (pid 2 in the caller's namespace)")
    );
}

#[test]
fn selector_precedence_is_most_specific_first() {
    let reg = registry(DETECT_YAML);
    let name = |h: &collector::event::Host, p: &collector::event::Process| {
        reg.correlate(h, p).map(|w| w.workload.name.clone())
    };
    // payments-api (3 selectors) and payments-any (1) both match: the more specific wins.
    assert_eq!(name(&prod(), &payments()).as_deref(), Some("payments-api"));
    assert_eq!(reg.all_matches(&prod(), &payments()).len(), 2);
    // Without the prod label only payments-any matches.
    assert_eq!(
        name(&host("dev-1", &[("env", "dev")]), &payments()).as_deref(),
        Some("payments-any")
    );
    // No match at all.
    assert_eq!(name(&prod(), &process("/usr/bin/cat", 0)), None);

    // Equal selector counts: exact beats glob, a longer glob beats a shorter one, then the name.
    let yaml = "
kind: Team
name: t
---
kind: Workload
name: zz-exact
owner: t
identity_type: workload
match: {exe: /usr/local/bin/tool}
---
kind: Workload
name: aa-glob
owner: t
identity_type: workload
match: {exe: /usr/local/bin/*}
---
kind: Workload
name: bb-short-glob
owner: t
identity_type: workload
match: {exe: /usr/**}
---
kind: Workload
name: b-same
owner: t
identity_type: workload
match: {uid: 7}
---
kind: Workload
name: a-same
owner: t
identity_type: workload
match: {user: '7'}
";
    let reg = registry(yaml);
    let h = host("h", &[]);
    let pick = |exe: &str, uid: u32| {
        reg.correlate(&h, &process(exe, uid)).map(|w| w.workload.name.clone())
    };
    assert_eq!(pick("/usr/local/bin/tool", 0).as_deref(), Some("zz-exact"));
    assert_eq!(pick("/usr/local/bin/other", 0).as_deref(), Some("aa-glob"));
    assert_eq!(pick("/usr/share/x/y", 0).as_deref(), Some("bb-short-glob"));
    assert_eq!(pick("/opt/x", 7).as_deref(), Some("a-same"));
    // `*` does not cross `/`.
    assert_eq!(pick("/usr/local/bin/sub/tool", 0).as_deref(), Some("bb-short-glob"));
}

#[test]
fn detections_settings_change_severity_and_disable_rules() {
    let mut objects = objects(DETECT_YAML);
    let mut d = Detections { name: "default".into(), ..Detections::default() };
    d.rules.insert("out-of-window".into(), RuleSetting { severity: None, enabled: Some(false) });
    d.rules.insert(
        "unknown-identity".into(),
        RuleSetting { severity: Some(Severity::Critical), enabled: None },
    );
    objects.insert(
        (collector::declarations::Kind::Detections, "default".into()),
        Declaration::Detections(d),
    );
    let reg = collector::correlate::Registry::build(objects, Default::default());
    assert_eq!(rules(&reg, &prod(), &aws(payments(), "2026-12-01T20:00:00Z")), vec![]);
    let ev = aws(process("/usr/bin/cat", 0), "2026-12-01T12:00:00Z");
    let f = collector::detect::detect(
        &reg,
        collector::detect::Context { host: &prod(), workload: None, last_active: None },
        &ev,
    );
    assert_eq!(
        f.iter().map(|f| (f.rule, f.severity)).collect::<Vec<_>>(),
        vec![(UnknownIdentity, Severity::Critical)]
    );
    // Defaults when nothing is set.
    assert_eq!(Rule::ALL.map(|r| r.default_severity()).len(), 7);
    assert_eq!(SecretMisuse.default_severity(), Severity::Critical);
}

/// A privilege change `via` from (uid, euid) `old` to `new`, gaining every capability.
fn privilege(
    p: collector::event::Process,
    via: &str,
    old: (u32, u32),
    new: (u32, u32),
) -> collector::event::Event {
    let mut e = setuid(p, "2026-12-01T12:00:00Z", new.0, 0);
    e.kind = collector::event::EventKind::PrivilegeChange {
        via: via.into(),
        old_uid: old.0,
        old_euid: old.1,
        new_uid: new.0,
        new_euid: new.1,
        old_cap_effective: 0,
        new_cap_effective: 0x1ff_ffff_ffff,
    };
    e
}
