//! The whole chain on the real kernel: kernel object built, loaded, attached; a child's exec
//! read back from the ring buffer with the right pid, parent, uid and file name.

use std::{os::unix::fs::PermissionsExt as _, process::Command, time::Duration};

use keywatch_tests::{start_sensor, wait_for};
use sensor::{event::Detail, loader::LoadOptions};

#[tokio::test]
async fn exec_of_a_child_is_reported_with_its_pid_and_filename() {
    let Some(mut sensor) = start_sensor(&LoadOptions::default()) else {
        return;
    };

    // A uniquely named program, so no other exec on the host can satisfy the assertion.
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join(format!("kw-exec-probe-{}", std::process::id()));
    std::fs::copy("/bin/true", &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();

    let status_and_pid = {
        let mut child = Command::new(&program).spawn().unwrap();
        let pid = child.id();
        assert!(child.wait().unwrap().success());
        pid
    };

    let expected = program.to_str().unwrap().to_string();
    let event = wait_for(
        &mut sensor,
        Duration::from_secs(5),
        |e| matches!(&e.detail, Detail::Exec { filename, .. } if *filename == expected),
    )
    .await
    .unwrap_or_else(|| panic!("no exec event for {expected} within 5 s"));

    assert_eq!(event.process.pid, status_and_pid, "pid of the exec'd child");
    assert_eq!(event.process.ppid, std::process::id(), "parent is this test process");
    // SAFETY: getuid has no preconditions.
    assert_eq!(event.process.uid, unsafe { libc::getuid() });
    assert_eq!(event.count, 1);
}
