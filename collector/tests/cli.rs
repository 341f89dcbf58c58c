//! The `keywatch` binary end to end: `serve` in a directory, client commands in the same
//! directory with no flags.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn keywatch(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keywatch"))
        .args(args)
        .current_dir(dir)
        .env_remove("KEYWATCH_TOKEN")
        .env_remove("KEYWATCH_SERVER")
        .env_remove("KEYWATCH_DATA")
        .output()
        .expect("run keywatch")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn serve_then_client_commands_with_no_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_keywatch"))
            .args(["serve", "--sensor-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve"),
    );
    let addr = dir.path().join("keywatch-data/api.addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !addr.exists() {
        assert!(Instant::now() < deadline, "serve did not write api.addr");
        std::thread::sleep(Duration::from_millis(50));
    }
    let token = dir.path().join("keywatch-data/admin.token");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&token).expect("token").permissions().mode() & 0o777, 0o600);

    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/example.yaml");
    let fixture = fixture.to_str().expect("utf-8 path");
    let out = keywatch(dir.path(), &["apply", "-f", fixture]);
    assert!(out.status.success(), "apply failed: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Workload payments-api created (revision 5)"),
        "{}",
        text(&out.stdout)
    );

    let bad =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-declarations/unknown-team.yaml");
    let out = keywatch(dir.path(), &["apply", "-f", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr)
            .contains("document 1 (Workload reports): owner: team \"team-nobody\" is not declared"),
        "{}",
        text(&out.stderr)
    );

    let out = keywatch(dir.path(), &["get", "workload", "payments-api", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list[0]["kind"], "Workload");
    assert_eq!(list[0]["expect"]["windows"][0]["tz"], "Europe/London");

    let out = keywatch(dir.path(), &["alerts", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");

    let out = keywatch(dir.path(), &["--token", "kw_wrong", "whoami"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not authenticated"), "{}", text(&out.stderr));

    // Join tokens: only the token on stdout, details on stderr; listed, revocable.
    let out = keywatch(
        dir.path(),
        &["token", "create", "--role", "sensor", "--labels", "env=prod,tier=web", "--uses", "2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout);
    let parts: Vec<&str> = token.trim().split('.').collect();
    assert_eq!(parts.len(), 4, "{token}");
    assert_eq!((parts[0], parts[1].len(), parts[2].len(), parts[3].len()), ("kwj1", 12, 43, 64));
    assert_eq!(token.lines().count(), 1);
    assert!(text(&out.stderr).contains("2 use(s)"), "{}", text(&out.stderr));
    let out = keywatch(dir.path(), &["token", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(parts[1]), "{}", text(&out.stdout));
    let out = keywatch(dir.path(), &["token", "revoke", parts[1]]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = keywatch(dir.path(), &["hosts"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = keywatch(dir.path(), &["hosts", "revoke", "nobody"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not found"), "{}", text(&out.stderr));
    drop(server);
}
