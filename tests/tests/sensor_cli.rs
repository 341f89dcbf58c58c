//! The sensor's command line as an operator meets it: the probe report, and a clear refusal
//! when run without the privileges BPF needs.

use std::process::Command;

use keywatch_tests::in_ci;

fn sensor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kw-sensor"))
}

#[test]
fn probe_reports_every_program_with_its_attach_point() {
    let out = sensor().args(["probe", "--json"]).output().unwrap();
    if !out.status.success() && !in_ci() {
        eprintln!("SKIPPED: probe cannot run here: {}", String::from_utf8_lossy(&out.stderr));
        return;
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let programs = report.as_array().expect("a list of programs");
    let exec = programs.iter().find(|p| p["program"] == "sched_process_exec").expect("exec row");
    assert_eq!(exec["attach"], "tracepoint/sched/sched_process_exec");
    assert_eq!(exec["attached"], true);
    for name in ["sys_exit_openat", "connect4", "sys_exit_setuid"] {
        assert!(programs.iter().any(|p| p["program"] == name), "{name} missing from the report");
    }
    // Secret-access syscall hooks read their arguments at exit where the kernel allows
    // (no enter tracepoint then), at entry elsewhere: one of the two, never both.
    let has = |name: &str| programs.iter().any(|p| p["program"] == name);
    assert!(has("sys_exit_ptrace") != has("sys_enter_ptrace"), "one ptrace hook: {report}");
    let table = sensor().arg("probe").output().unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("PROGRAM"), "a table with a header: {text}");
    assert!(text.contains("kernel struct reads: "), "says how kernel memory is read: {text}");
    assert!(
        text.contains("not seen on this kernel:"),
        "says what this kernel leaves unseen: {text}"
    );
}

#[test]
fn without_privileges_the_sensor_refuses_and_names_what_is_missing() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root to drop to an unprivileged user");
        return;
    }
    let exe = env!("CARGO_BIN_EXE_kw-sensor");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", exe])
        .args(["run", "--stdout", "--no-pin"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root") && err.contains("CAP_BPF"), "unclear refusal: {err}");
}

#[test]
fn the_example_watch_config_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sensor/watches.yaml");
    let config = sensor::watch::load_config(&path).expect("example config parses");
    let set = config.watch_set().expect("example config validates");
    assert!(set.id_of("payments-db-password").is_some());
    assert!(set.id_of("aws-credentials").is_some(), "the built-in catalog is kept");
    assert!(set.id_of("gnupg-private-keys").is_none(), "disabled");
}
