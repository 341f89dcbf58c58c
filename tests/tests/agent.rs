//! The whole sensor (kernel programs, watch resolution, process table) on the real kernel:
//! observations carry the watch name, the path and the exact process, including for files
//! replaced or created after start and for processes that are gone by the time they are read.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command, time::Duration};

use keywatch_tests::{in_ci, wait_until};
use sensor::{
    observation::{Observation, What},
    run::{Agent, AgentOptions},
    watch::{Category, WatchSet, WatchSpec},
};

const WAIT: Duration = Duration::from_secs(5);

fn actor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kw-actor"))
}

fn act(args: &[&str]) -> u32 {
    let mut child = actor().args(args).spawn().expect("spawning kw-actor");
    let pid = child.id();
    assert!(child.wait().unwrap().success(), "kw-actor {args:?}");
    pid
}

fn spec(name: &str, paths: &[String]) -> WatchSpec {
    WatchSpec {
        name: name.into(),
        category: Category::Credential,
        paths: paths.to_vec(),
        endpoints: Vec::new(),
        unix_sockets: Vec::new(),
    }
}

async fn agent(specs: Vec<WatchSpec>) -> Option<Agent> {
    let set = WatchSet::from_specs(specs).expect("valid test watches");
    match Agent::start(&AgentOptions::new(set)).await {
        Ok(agent) => Some(agent),
        Err(error) if !in_ci() => {
            eprintln!("SKIPPED: the sensor cannot run here: {error}");
            None
        }
        Err(error) => panic!("BPF must load under CI: {error}"),
    }
}

async fn file_open_by(agent: &mut Agent, pid: u32) -> Option<Observation> {
    wait_until(
        WAIT,
        agent.next_matching(|o| o.process.pid == pid && matches!(o.what, What::FileOpen { .. })),
    )
    .await
}

/// A fresh credential file `token` in a temporary directory, and an agent watching it.
async fn agent_watching_a_token() -> Option<(tempfile::TempDir, std::path::PathBuf, Agent)> {
    let dir = tempdir();
    let cred = dir.path().join("token");
    std::fs::write(&cred, "t").unwrap();
    let agent = agent(vec![spec("token", &[cred.display().to_string()])]).await?;
    Some((dir, cred, agent))
}

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn path_of(o: &Observation) -> (&str, &str) {
    match &o.what {
        What::FileOpen { watch, path, .. } => (watch, path),
        other => panic!("not a file open: {other:?}"),
    }
}

#[tokio::test]
async fn a_credential_replaced_by_atomic_rename_is_still_watched() {
    let dir = tempdir();
    let cred = dir.path().join("credentials");
    std::fs::write(&cred, "old").unwrap();
    let Some(mut agent) = agent(vec![spec("cloud-key", &[cred.display().to_string()])]).await
    else {
        return;
    };
    // The way the AWS CLI and kubelet write: a new file, renamed over the old one.
    let tmp = dir.path().join(".credentials.tmp");
    std::fs::write(&tmp, "new").unwrap();
    std::fs::rename(&tmp, &cred).unwrap();
    // Read at once: before any re-resolution could have seen the new inode.
    let pid = act(&["read", cred.to_str().unwrap()]);
    let o = file_open_by(&mut agent, pid).await.expect("read of the replaced file observed");
    assert_eq!(path_of(&o), ("cloud-key", cred.to_str().unwrap()));
}

#[tokio::test]
async fn a_credential_moved_away_stays_watched_at_its_new_place() {
    let dir = tempdir();
    let elsewhere = tempdir();
    let cred = dir.path().join("credentials");
    std::fs::write(&cred, "secret").unwrap();
    let Some(mut agent) = agent(vec![spec("cloud-key", &[cred.display().to_string()])]).await
    else {
        return;
    };
    // `mv` out of the watched place, then read it there: the inode is the credential still.
    let moved = elsewhere.path().join("innocent.txt");
    std::fs::rename(&cred, &moved).unwrap();
    // Past inotify's debounce: the watch set has been re-resolved without the old path.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = act(&["read", moved.to_str().unwrap()]);
    let o = file_open_by(&mut agent, pid).await.expect("read of the moved credential observed");
    assert_eq!(path_of(&o), ("cloud-key", moved.to_str().unwrap()));
}

/// A holder of `path` (`kw-actor hold`), once its file is open.
fn holder(path: &Path) -> std::process::Child {
    use std::io::BufRead as _;
    let mut child = actor()
        .args(["hold", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawning kw-actor");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.trim().parse::<u32>().is_ok(), "the holder prints its fd: {line:?}");
    child
}

#[tokio::test]
async fn a_credential_held_open_before_the_start_is_reported_once_at_start() {
    let dir = tempdir();
    let key = dir.path().join("id_ed25519");
    std::fs::write(&key, "key").unwrap();
    let other = dir.path().join("known_hosts");
    std::fs::write(&other, "host").unwrap();
    let mut holding = holder(&key);
    let mut bystander = holder(&other);
    let pattern = dir.path().join("id_*").display().to_string();
    let started = agent(vec![spec("ssh-keys", &[pattern])]).await;
    let Some(mut agent) = started else {
        let _ = (holding.kill(), bystander.kill(), holding.wait(), bystander.wait());
        return;
    };
    let o = file_open_by(&mut agent, holding.id()).await;
    let noise = wait_until(
        Duration::from_millis(700),
        agent.next_matching(|o| {
            o.process.pid == bystander.id() && matches!(o.what, What::FileOpen { .. })
        }),
    )
    .await;
    let _ = (holding.kill(), bystander.kill(), holding.wait(), bystander.wait());
    let o = o.expect("the held key is reported at start");
    assert_eq!(path_of(&o), ("ssh-keys", key.to_str().unwrap()));
    assert!(matches!(o.what, What::FileOpen { held: true, write: false, .. }), "{:?}", o.what);
    assert_eq!((o.process.ppid, o.process.comm.as_str()), (std::process::id(), "kw-actor"));
    assert!(o.process.exe.ends_with("kw-actor"), "{}", o.process.exe);
    assert!(noise.is_none(), "an unwatched file held open was reported: {noise:?}");
}

#[tokio::test]
async fn a_file_matching_a_glob_created_after_start_is_watched_and_others_are_not() {
    let dir = tempdir();
    let pattern = dir.path().join("id_*").display().to_string();
    let Some(mut agent) = agent(vec![spec("ssh-keys", &[pattern])]).await else {
        return;
    };
    let key = dir.path().join("id_new");
    std::fs::write(&key, "key").unwrap();
    let other = dir.path().join("known_hosts");
    std::fs::write(&other, "host").unwrap();

    let pid = act(&["read", key.to_str().unwrap()]);
    let o = file_open_by(&mut agent, pid).await.expect("read of the new key observed");
    assert_eq!(path_of(&o), ("ssh-keys", key.to_str().unwrap()));

    let pid = act(&["read", other.to_str().unwrap()]);
    let noise = wait_until(
        Duration::from_millis(700),
        agent.next_matching(|o| o.process.pid == pid && matches!(o.what, What::FileOpen { .. })),
    )
    .await;
    assert!(noise.is_none(), "a name outside the glob was reported: {noise:?}");
}

#[tokio::test]
async fn a_credential_in_a_directory_created_after_start_is_watched() {
    let home = tempdir();
    let cred = home.path().join(".aws").join("credentials");
    let Some(mut agent) = agent(vec![spec("aws", &[cred.display().to_string()])]).await else {
        return;
    };
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(&cred, "[default]").unwrap();
    // inotify sees the directory, then the file; the watch follows within moments.
    let deadline = tokio::time::Instant::now() + WAIT;
    let found = loop {
        let pid = act(&["read", cred.to_str().unwrap()]);
        if let Some(o) = wait_until(
            Duration::from_millis(300),
            agent
                .next_matching(|o| o.process.pid == pid && matches!(o.what, What::FileOpen { .. })),
        )
        .await
        {
            break Some(o);
        }
        if tokio::time::Instant::now() > deadline {
            break None;
        }
    };
    let o = found.expect("the credential created later is watched");
    assert_eq!(path_of(&o), ("aws", cred.to_str().unwrap()));
}

#[tokio::test]
async fn a_process_that_reads_and_exits_at_once_is_attributed_exactly() {
    let Some((_dir, cred, mut agent)) = agent_watching_a_token().await else { return };
    // kw-actor execs, reads and exits within a millisecond: long gone when the event is read.
    let pid = act(&["read", cred.to_str().unwrap()]);
    let o = file_open_by(&mut agent, pid).await.expect("read observed");
    let actor = Path::new(env!("CARGO_BIN_EXE_kw-actor"));
    assert_eq!(Path::new(&o.process.exe), actor, "exe of the short-lived process");
    let cmdline = [actor.to_str().unwrap(), "read", cred.to_str().unwrap()];
    assert_eq!(o.process.cmdline, cmdline, "command line of the short-lived process");
    assert_eq!(o.process.ppid, std::process::id());
    let parent = o.process.ancestors.first().expect("ancestry");
    assert_eq!(parent.pid, std::process::id(), "nearest ancestor is the test");
    assert_eq!(parent.exe, std::env::current_exe().unwrap());
    assert!(o.process.exe_sha256.as_ref().is_some_and(|h| h.len() == 64), "exe hashed");
}

#[tokio::test]
async fn a_program_run_by_a_relative_name_is_named_by_its_full_path() {
    let Some((dir, _cred, mut agent)) = agent_watching_a_token().await else { return };
    let copy = dir.path().join("renamed-actor");
    std::fs::copy(env!("CARGO_BIN_EXE_kw-actor"), &copy).unwrap();
    // `./renamed-actor` is all the kernel's exec record names; the shell (its parent) stays a
    // while, the program itself is gone at once. A copy just written can be briefly busy
    // (another test's fork may hold its descriptor): retry.
    let script = format!(
        "cd '{}' && for i in 1 2 3 4 5; do ./renamed-actor read token && break; sleep 0.1; done; sleep 2",
        dir.path().display()
    );
    let mut shell = Command::new("/bin/sh").args(["-c", &script]).spawn().unwrap();
    let o = wait_until(
        WAIT,
        agent.next_matching(|o| {
            o.process.comm == "renamed-actor" && matches!(o.what, What::FileOpen { .. })
        }),
    )
    .await
    .expect("read by the renamed program observed");
    let full = std::fs::canonicalize(&copy).unwrap();
    assert_eq!(Path::new(&o.process.exe), full, "exe named by its full path");
    assert_eq!(o.process.cmdline, ["./renamed-actor", "read", "token"]);
    assert_eq!(o.process.ppid, shell.id(), "parent is the shell");
    assert!(o.process.exe_sha256.as_ref().is_some_and(|h| h.len() == 64), "exe hashed");
    shell.kill().unwrap();
    shell.wait().unwrap();
}

#[tokio::test]
async fn a_program_run_from_memory_is_named_as_such_and_never_hashed_wrongly() {
    let Some((_dir, cred, mut agent)) = agent_watching_a_token().await else { return };
    // fexecve of a memfd: the kernel's file name is `/dev/fd/N`; the process reads and exits.
    let pid = act(&["from-memory", cred.to_str().unwrap()]);
    let o = file_open_by(&mut agent, pid).await.expect("read by the program run from memory");
    assert_eq!(o.process.exe, "/memfd:kw-fileless", "exe of a program with no file");
    assert_eq!(o.process.cmdline, ["kw-fileless", "read", cred.to_str().unwrap()]);
    // Hashed through /proc while it lived, or not at all: never some other file's hash.
    if let Some(hash) = &o.process.exe_sha256 {
        let out = Command::new("sha256sum").arg(env!("CARGO_BIN_EXE_kw-actor")).output().unwrap();
        let actor_hash = String::from_utf8_lossy(&out.stdout);
        assert!(actor_hash.starts_with(hash.as_str()), "hash {hash} is not the program's");
    }
}

#[tokio::test]
async fn privilege_changes_report_ids_before_and_after() {
    let Some(mut agent) = agent(vec![]).await else {
        return;
    };
    let dir = tempdir();
    let suid = dir.path().join("kw-suid-true");
    std::fs::copy("/bin/true", &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let pid = act(&["as-user", "65534", suid.to_str().unwrap()]);
    // setgid, setuid, then the exec of the setuid copy: three changes, in that order.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let o = wait_until(
            WAIT,
            agent.next_matching(|o| {
                o.process.pid == pid && matches!(o.what, What::PrivilegeChange { .. })
            }),
        )
        .await
        .unwrap_or_else(|| panic!("privilege changes missing; seen {seen:?}"));
        let What::PrivilegeChange { via, old_uid, old_euid, new_uid, new_euid, .. } = o.what else {
            unreachable!()
        };
        seen.push((via, old_uid, old_euid, new_uid, new_euid));
    }
    assert!(seen.contains(&("setuid", 0, 0, 65534, 65534)), "{seen:?}");
    assert!(seen.contains(&("exec-setuid", 65534, 65534, 65534, 0)), "{seen:?}");
}

/// A cgroup named the way docker names a container's under the systemd driver
/// (`docker-<64 hex>.scope`), directly under the cgroup2 root; removed when dropped.
struct ContainerCgroup {
    dir: std::path::PathBuf,
    id: String,
}

impl ContainerCgroup {
    fn new() -> Option<Self> {
        let root = match sensor::system::cgroup2_mount() {
            Ok(root) => root,
            Err(e) => {
                assert!(!in_ci(), "CI has a cgroup v2 hierarchy: {e}");
                eprintln!("SKIPPED: no cgroup v2 hierarchy: {e}");
                return None;
            }
        };
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        let id = format!("{:032x}{:032x}", nanos.as_nanos(), std::process::id());
        let dir = root.join(format!("docker-{id}.scope"));
        std::fs::create_dir(&dir).expect("creating a cgroup");
        Some(Self { dir, id })
    }

    /// `sh -c` running `script` after moving itself into this cgroup; returns the shell's pid.
    fn run(&self, script: &str) -> u32 {
        let procs = self.dir.join("cgroup.procs");
        let line = format!("echo $$ > {} && {script}", procs.display());
        let mut child = Command::new("/bin/sh").args(["-c", &line]).spawn().expect("sh");
        let pid = child.id();
        assert!(child.wait().unwrap().success(), "sh -c {line}");
        pid
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        // The shell has been reaped; its cgroup empties a moment later.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[tokio::test]
async fn a_process_that_moves_into_a_container_reads_and_exits_is_placed_in_it() {
    let Some((_dir, cred, mut agent)) = agent_watching_a_token().await else { return };
    let Some(cgroup) = ContainerCgroup::new() else { return };
    let scope = format!("/docker-{}.scope", cgroup.id);
    let cred = cred.to_str().unwrap();

    // As `docker exec` does: moved into the container's cgroup, then exec, read, exit — gone
    // long before its exec record is read, so /proc can no longer say where it ran.
    let actor = env!("CARGO_BIN_EXE_kw-actor");
    let pid = cgroup.run(&format!("exec {actor} read {cred}"));
    let o = file_open_by(&mut agent, pid).await.expect("read observed");
    assert_eq!(o.process.exe, actor);
    assert_eq!(o.process.cgroup_path, scope, "cgroup of a process gone before it was looked up");
    assert_eq!(o.process.container_id.as_deref(), Some(cgroup.id.as_str()));
    assert_eq!(o.process.systemd_unit.as_deref(), Some(&scope[1..]));

    // Moved without an exec: the shell reads the file itself (a redirection) and exits.
    let pid = cgroup.run(&format!(": < {cred}"));
    let o = file_open_by(&mut agent, pid).await.expect("read observed");
    assert_eq!(o.process.exe, "/bin/sh", "the shell itself");
    assert_eq!(o.process.cgroup_path, scope, "cgroup the kernel saw at the read");
    assert_eq!(o.process.container_id.as_deref(), Some(cgroup.id.as_str()));
}
