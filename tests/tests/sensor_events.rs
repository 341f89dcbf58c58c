//! The sensor on the real kernel: each test performs a real access in a child process and
//! asserts the event's process and resource.

use std::{
    net::{TcpListener, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use keywatch_tests::{start_sensor, wait_for};
use sensor::{
    event::{Detail, Event},
    kernel_maps::{EndpointEntry, file_key},
    loader::LoadOptions,
    run::Sensor,
};
use sensor_ebpf::{DIR_ANY_NAME, EventKind, NameKey, PROTO_TCP, PROTO_UDP, name_hash_of};

const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(700);

fn actor() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kw-actor"))
}

/// Runs the actor to completion; returns its pid.
fn act(args: &[&str]) -> u32 {
    let mut child = actor().args(args).spawn().expect("spawning kw-actor");
    let pid = child.id();
    let status = child.wait().unwrap();
    assert!(status.success(), "kw-actor {args:?} failed: {status}");
    pid
}

/// A temp dir with one credential file in it.
struct Creds {
    dir: tempfile::TempDir,
}

impl Creds {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("credentials"), "[default]\nkey=AKIA\n").unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cred(&self) -> PathBuf {
        self.path("credentials")
    }
}

fn sensor() -> Option<Sensor> {
    start_sensor(&LoadOptions::default())
}

/// The file-open path runs as plain loads through BTF pointers on kernels that allow it, and
/// as helper reads elsewhere; secret-access syscall arguments are read at exit, or at entry
/// elsewhere. Tests of what they match run once each way (helper reads imply entry hooks).
macro_rules! on_both_read_paths {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                use super::*;

                #[tokio::test]
                async fn btf_pointers() {
                    super::$test(LoadOptions::default()).await
                }

                #[tokio::test]
                async fn helper_reads() {
                    super::$test(LoadOptions { helper_reads: true, ..LoadOptions::default() })
                        .await
                }
            }
        )*
    };
}

on_both_read_paths!(
    credential_reads_resolve_to_the_inode_whatever_the_path,
    names_in_a_watched_directory_match_by_name_or_by_any_name,
    unwatched_opens_and_the_sensors_own_reads_produce_nothing,
    environ_of_another_process_by_relative_path_is_a_secret_access,
    a_process_in_its_own_pid_namespace_is_reported_with_host_pids,
    ptrace_and_process_memory_reads_and_writes_are_secret_accesses,
    a_connect_to_a_watched_unix_socket_names_the_listening_process,
);

fn watch(sensor: &mut Sensor, path: &Path, id: u32) {
    sensor.watch_maps().insert_file(file_key(path).unwrap(), id).unwrap();
}

async fn file_open_by(sensor: &mut Sensor, pid: u32, within: Duration) -> Option<Event> {
    wait_for(sensor, within, |e| {
        e.process.pid == pid && matches!(e.detail, Detail::FileOpen { .. })
    })
    .await
}

/// The next secret access by `pid` within [`WAIT`].
async fn secret_by(sensor: &mut Sensor, pid: u32) -> Option<Event> {
    wait_for(sensor, WAIT, |e| e.process.pid == pid && matches!(e.detail, Detail::Secret { .. }))
        .await
}

/// A unix socket this test listens on, like an ssh-agent, watched as `watch_id`; the socket's
/// directory and listener are kept while the returned values live.
fn watched_agent_socket(
    sensor: &mut Sensor,
    watch_id: u32,
) -> (tempfile::TempDir, PathBuf, std::os::unix::net::UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    sensor.watch_maps().insert_socket(file_key(&path).unwrap(), watch_id).unwrap();
    (dir, path, listener)
}

fn assert_file_open(event: &Event, path: &Path, watch: u32) {
    let key = file_key(path).unwrap();
    let Detail::FileOpen { watch_id, ino, dev, matched, .. } = &event.detail else {
        panic!("not a file open: {event:?}");
    };
    assert_eq!((*watch_id, *ino, *dev, *matched), (watch, key.ino, key.dev, "file"));
    assert_eq!(event.process.ppid, std::process::id(), "parent is the test");
    assert_eq!(event.process.comm, "kw-actor");
    assert_eq!(event.process.uid, 0);
}

async fn credential_reads_resolve_to_the_inode_whatever_the_path(opts: LoadOptions) {
    let Some(mut sensor) = start_sensor(&opts) else { return };
    let creds = Creds::new();
    let cred = creds.cred();
    watch(&mut sensor, &cred, 7);
    let dir = creds.dir.path().to_str().unwrap().to_string();
    std::fs::create_dir(creds.path("sub")).unwrap();
    std::os::unix::fs::symlink(&cred, creds.path("link")).unwrap();
    std::fs::hard_link(&cred, creds.path("hardlink")).unwrap();
    let proc_root = format!("/proc/self/root{}", cred.display());

    let cases: Vec<(&str, Vec<String>)> = vec![
        ("absolute", vec!["read".into(), cred.display().to_string()]),
        ("relative after chdir", vec!["read-in".into(), dir.clone(), "credentials".into()]),
        ("through ..", vec!["read-in".into(), format!("{dir}/sub"), "../credentials".into()]),
        ("through a symlink", vec!["read".into(), creds.path("link").display().to_string()]),
        ("through a hard link", vec!["read".into(), creds.path("hardlink").display().to_string()]),
        ("openat(dirfd)", vec!["openat".into(), dir.clone(), "credentials".into()]),
        ("/proc/self/root", vec!["read".into(), proc_root]),
        (
            "through an overlay mount",
            vec!["overlay-read".into(), dir.clone(), "credentials".into()],
        ),
        ("reopened from an O_PATH handle", vec!["reopen-path".into(), cred.display().to_string()]),
    ];
    for (what, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = act(&args);
        let event = file_open_by(&mut sensor, pid, WAIT)
            .await
            .unwrap_or_else(|| panic!("{what}: no file event for pid {pid}"));
        assert_file_open(&event, &cred, 7);
        assert_eq!(event.count, 1, "{what}");
        let Detail::FileOpen { write, .. } = event.detail else { unreachable!() };
        assert!(!write, "{what}: a read is not a write");
    }
}

/// Watches a fresh credential as `id`, runs kw-actor `action` on it and returns the credential
/// and the actor's file event.
async fn act_on_a_watched_credential(sensor: &mut Sensor, action: &str, id: u32) -> (Creds, Event) {
    let creds = Creds::new();
    watch(sensor, &creds.cred(), id);
    let pid = act(&[action, creds.cred().to_str().unwrap()]);
    let event = file_open_by(sensor, pid, WAIT)
        .await
        .unwrap_or_else(|| panic!("no file event for kw-actor {action} (pid {pid})"));
    (creds, event)
}

/// The benchmark's quick alternation: programs detached see nothing, attached again see all.
#[tokio::test]
async fn programs_detached_see_nothing_and_attached_again_see_everything() {
    let Some(mut sensor) = sensor() else { return };
    let creds = Creds::new();
    watch(&mut sensor, &creds.cred(), 13);
    let cred = creds.cred().to_str().unwrap().to_owned();
    sensor.set_attached(false).expect("detach");
    let unseen = act(&["read", &cred]);
    assert!(file_open_by(&mut sensor, unseen, QUIET).await.is_none(), "a detached program saw");
    sensor.set_attached(true).expect("attach again");
    let seen = act(&["read", &cred]);
    let event = file_open_by(&mut sensor, seen, WAIT).await.expect("attached again: reported");
    assert_file_open(&event, &creds.cred(), 13);
    // A second round works the same (the links were replaced, not leaked).
    sensor.set_attached(false).expect("detach again");
    let unseen = act(&["read", &cred]);
    assert!(file_open_by(&mut sensor, unseen, QUIET).await.is_none(), "detached again, saw");
}

#[tokio::test]
async fn a_credential_opened_through_io_uring_is_reported() {
    let Some(mut sensor) = sensor() else { return };
    let (creds, event) = act_on_a_watched_credential(&mut sensor, "uring-read", 9).await;
    let key = file_key(&creds.cred()).unwrap();
    let Detail::FileOpen { watch_id, ino, dev, write, .. } = &event.detail else {
        panic!("not a file open: {event:?}");
    };
    assert_eq!((*watch_id, *ino, *dev, *write), (9, key.ino, key.dev, false));
    assert_eq!(event.process.ppid, std::process::id(), "parent is the test");
    // The open may complete on one of io_uring's worker threads of the same process.
    let comm = &event.process.comm;
    assert!(comm == "kw-actor" || comm.starts_with("iou-wrk"), "comm {comm:?}");
}

#[tokio::test]
async fn a_credential_opened_or_read_through_an_io_uring_fixed_slot_is_reported() {
    let Some(mut sensor) = sensor() else { return };
    // A slot the program names, and one the kernel picks: the open's result is no fd then.
    // And an open, a read and a close of one slot in one submission, whose completions are
    // posted together once the slot is empty again: the read's own file tells; or the slot's
    // file given an fd in that submission, then read through the fd.
    let cases = [
        (&["uring-read-fixed", "5"][..], 12),
        (&["uring-read-fixed", "auto"], 13),
        (&["uring-batch-fixed"], 14),
        (&["uring-install-fixed"], 15),
    ];
    for (action, id) in cases {
        let creds = Creds::new();
        let cred = creds.cred();
        watch(&mut sensor, &cred, id);
        let mut args = vec![action[0], cred.to_str().unwrap()];
        args.extend(&action[1..]);
        let pid = act(&args);
        let case = action.join(" ");
        let event = file_open_by(&mut sensor, pid, WAIT)
            .await
            .unwrap_or_else(|| panic!("no file event for kw-actor {case}"));
        let key = file_key(&cred).unwrap();
        let Detail::FileOpen { watch_id, ino, dev, .. } = &event.detail else {
            panic!("not a file open: {event:?}");
        };
        assert_eq!((*watch_id, *ino, *dev), (id, key.ino, key.dev), "{case}");
        assert_eq!(event.process.ppid, std::process::id(), "parent is the test");
    }
}

#[tokio::test]
async fn a_credential_opened_by_file_handle_is_reported() {
    let Some(mut sensor) = sensor() else { return };
    let (creds, event) = act_on_a_watched_credential(&mut sensor, "by-handle", 11).await;
    assert_file_open(&event, &creds.cred(), 11);
}

#[tokio::test]
async fn a_credential_fd_taken_from_another_process_is_reported() {
    let Some(mut sensor) = sensor() else { return };
    let creds = Creds::new();
    let cred = creds.cred();
    watch(&mut sensor, &cred, 12);
    let taker = take_from_a_holder("hold", &cred);
    let event = file_open_by(&mut sensor, taker, WAIT)
        .await
        .unwrap_or_else(|| panic!("no file event for the fd taken by pid {taker}"));
    assert_file_open(&event, &cred, 12);
}

/// An ssh-agent connection taken over: the taker never connects, yet uses the agent.
#[tokio::test]
async fn an_agent_socket_taken_from_another_process_is_a_secret_access() {
    let Some(mut sensor) = sensor() else { return };
    let (_dir, path, listener) = watched_agent_socket(&mut sensor, 32);
    let taker = take_from_a_holder("hold-unix", &path);
    let event = secret_by(&mut sensor, taker)
        .await
        .unwrap_or_else(|| panic!("no secret event for the socket taken by pid {taker}"));
    drop(listener);
    let Detail::Secret { method, target_pid, detail, .. } = event.detail else { unreachable!() };
    assert_eq!((method, target_pid), ("unix_socket", std::process::id()), "the listener");
    assert_eq!(detail, file_key(&path).unwrap().ino);
}

/// kw-actor `hold_action` opens `path` and holds it; another kw-actor takes the descriptor
/// (`pidfd_getfd`). Returns the taker's pid.
fn take_from_a_holder(hold_action: &str, path: &Path) -> u32 {
    let mut holder = actor()
        .args([hold_action, path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawning the holder");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let fd = line.trim().to_owned();
    let taker = act(&["take", &holder.id().to_string(), &fd]);
    let _ = holder.kill();
    let _ = holder.wait();
    taker
}

/// btrfs numbers the inodes of each subvolume anew and gives each subvolume a device of its own
/// (the one `stat` shows, not its superblock's): a credential there is matched by that device,
/// and the file with the same inode number in another subvolume is not it.
#[tokio::test]
async fn credentials_on_btrfs_are_told_apart_per_subvolume() {
    let Some(mut sensor) = sensor() else { return };
    let Some(fs) = keywatch_tests::btrfs::ScratchBtrfs::mount() else { return };
    let cred = fs.path().join("credentials");
    std::fs::write(&cred, "[default]").unwrap();
    let twin = fs.subvolume("other").join("credentials");
    std::fs::write(&twin, "[default]").unwrap();
    let (key, twin_key) = (file_key(&cred).unwrap(), file_key(&twin).unwrap());
    assert_eq!(key.ino, twin_key.ino, "each subvolume numbers its inodes from 256");
    watch(&mut sensor, &cred, 33);

    let pid = act(&["read", twin.to_str().unwrap()]);
    assert!(file_open_by(&mut sensor, pid, QUIET).await.is_none(), "another subvolume's file");
    let pid = act(&["read", cred.to_str().unwrap()]);
    let event = file_open_by(&mut sensor, pid, WAIT).await.expect("the watched credential");
    assert_file_open(&event, &cred, 33);
}

/// An append, and the legacy `creat` that truncates the credential (a syscall of its own).
#[tokio::test]
async fn a_write_to_a_credential_is_flagged() {
    let Some(mut sensor) = sensor() else { return };
    for (action, id) in [("write", 3), ("creat", 4)] {
        let (creds, event) = act_on_a_watched_credential(&mut sensor, action, id).await;
        assert_file_open(&event, &creds.cred(), id);
        let Detail::FileOpen { write, flags, .. } = event.detail else { unreachable!() };
        assert!(write, "{action}: flags {flags:#o} should say write");
        if action == "creat" {
            assert_eq!(std::fs::metadata(creds.cred()).unwrap().len(), 0, "creat truncated it");
        }
    }
}

async fn names_in_a_watched_directory_match_by_name_or_by_any_name(opts: LoadOptions) {
    let Some(mut sensor) = start_sensor(&opts) else { return };
    let creds = Creds::new();
    let dir = file_key(creds.dir.path()).unwrap();
    // Only "token" is watched by name: it matches whatever inode it has when opened.
    sensor.watch_maps().insert_dir(dir, 9).unwrap();
    let name_key =
        NameKey { dev: dir.dev, _pad0: 0, dir_ino: dir.ino, hash: name_hash_of(b"token") };
    sensor.watch_maps().insert_name(name_key, 9).unwrap();
    let token = creds.path("token");
    std::fs::write(&token, "secret").unwrap();
    let other = creds.path("other");
    std::fs::write(&other, "x").unwrap();

    let pid = act(&["read", token.to_str().unwrap()]);
    let event = file_open_by(&mut sensor, pid, WAIT).await.expect("file event");
    let Detail::FileOpen { watch_id, matched, name, .. } = &event.detail else { unreachable!() };
    assert_eq!((*watch_id, *matched, name.as_str()), (9, "name", "token"));

    let pid = act(&["read", other.to_str().unwrap()]);
    assert!(file_open_by(&mut sensor, pid, QUIET).await.is_none(), "an unwatched name matched");

    // "Any name" (a glob watch): every name is reported, the sensor filters by glob.
    sensor.watch_maps().insert_dir(dir, 4 | DIR_ANY_NAME).unwrap();
    let pid = act(&["read", other.to_str().unwrap()]);
    let event = file_open_by(&mut sensor, pid, WAIT).await.expect("any-name event");
    let Detail::FileOpen { watch_id, matched, name, .. } = &event.detail else { unreachable!() };
    assert_eq!((*watch_id, *matched, name.as_str()), (4, "dir", "other"));
}

async fn unwatched_opens_and_the_sensors_own_reads_produce_nothing(opts: LoadOptions) {
    let Some(mut sensor) = start_sensor(&opts) else { return };
    let creds = Creds::new();
    watch(&mut sensor, &creds.cred(), 1);
    let other = creds.path("hostname");
    std::fs::write(&other, "host").unwrap();
    let pid = act(&["read", other.to_str().unwrap()]);
    // An O_PATH handle to the credential cannot read it: not an access either.
    let handle = act(&["open-path", creds.cred().to_str().unwrap()]);
    // This test process is the sensor: its own read of the watched file is not an access.
    std::fs::read(creds.cred()).unwrap();
    let me = std::process::id();
    let noise = wait_for(&mut sensor, QUIET, |e| {
        [pid, handle, me].contains(&e.process.pid) && matches!(e.detail, Detail::FileOpen { .. })
    })
    .await;
    assert!(noise.is_none(), "unexpected event: {noise:?}");
}

#[tokio::test]
async fn a_removed_watch_stops_matching_and_leaves_the_filter() {
    let Some(mut sensor) = sensor() else { return };
    let creds = Creds::new();
    let (a, b) = (creds.cred(), creds.path("second"));
    std::fs::write(&b, "x").unwrap();
    let (key_a, key_b) = (file_key(&a).unwrap(), file_key(&b).unwrap());
    watch(&mut sensor, &a, 3);
    watch(&mut sensor, &b, 3);
    watch(&mut sensor, &a, 5); // a changed watch id: still one entry
    let pid = act(&["read", a.to_str().unwrap()]);
    let event = file_open_by(&mut sensor, pid, WAIT).await.expect("watched read");
    assert_file_open(&event, &a, 5);

    sensor.watch_maps().remove_file(&key_a).unwrap();
    assert!(!sensor.watch_maps().filter_passes(key_a.ino), "the filter kept a removed inode");
    assert!(sensor.watch_maps().filter_passes(key_b.ino), "the filter lost a watched inode");
    let pid = act(&["read", a.to_str().unwrap()]);
    assert!(file_open_by(&mut sensor, pid, QUIET).await.is_none(), "a removed watch matched");
    let pid = act(&["read", b.to_str().unwrap()]);
    let event = file_open_by(&mut sensor, pid, WAIT).await.expect("the other watch still matches");
    assert_file_open(&event, &b, 3);
}

async fn environ_of_another_process_by_relative_path_is_a_secret_access(opts: LoadOptions) {
    let Some(mut sensor) = start_sensor(&opts) else { return };
    let mut target = Command::new("sleep").arg("30").spawn().unwrap();
    let target_pid = target.id();
    let pid = act(&["environ", &target_pid.to_string()]);
    let event = secret_by(&mut sensor, pid).await.expect("secret event for the environ read");
    target.kill().unwrap();
    let _ = target.wait();
    let Detail::Secret { method, target_pid: t, .. } = event.detail else { unreachable!() };
    assert_eq!((method, t), ("proc_environ", target_pid));
    assert_eq!(event.process.ppid, std::process::id());
}

/// A container's processes name each other by their own namespace's pids, and see their own
/// `/proc`: targets are still reported by host pid, and a process touching itself not at all.
async fn a_process_in_its_own_pid_namespace_is_reported_with_host_pids(opts: LoadOptions) {
    let Some(mut sensor) = start_sensor(&opts) else { return };
    // (action, method, the caller's number for the target in the record): the actor runs as
    // pid 2 of a new namespace; its target, pid 1 there, is the namespace's init. A procfs
    // file's target comes from its inode, with no number of the caller's.
    let cases = [
        (["environ", "1"], "proc_environ", 0),
        (["vm-readv", "1"], "process_vm_readv", 1),
        (["ptrace", "1"], "ptrace", 1),
    ];
    for (action, method, ns_pid) in cases {
        let init = act_in_pid_namespace(&action);
        let event = wait_for(&mut sensor, WAIT, |e| {
            e.process.ppid == init && matches!(e.detail, Detail::Secret { .. })
        })
        .await
        .unwrap_or_else(|| panic!("no secret event for {action:?} in a pid namespace"));
        let Detail::Secret { method: m, target_pid, ns_pid: n, .. } = event.detail else {
            unreachable!()
        };
        assert_eq!((m, target_pid, n), (method, init, ns_pid), "{action:?}");
        assert_eq!(event.process.comm, "kw-actor");
    }
    // Its own environ through its own /proc, and its own memory by its own number (2).
    for action in [["environ", "self"], ["vm-readv", "2"]] {
        let init = act_in_pid_namespace(&action);
        let own = wait_for(&mut sensor, QUIET, |e| {
            e.process.ppid == init && matches!(e.detail, Detail::Secret { .. })
        })
        .await;
        assert!(own.is_none(), "{action:?} of itself reported: {own:?}");
    }
}

/// Runs kw-actor's `action` as pid 2 of a new pid namespace; returns the host pid of that
/// namespace's init (pid 1 there, the actor's parent).
fn act_in_pid_namespace(action: &[&str]) -> u32 {
    let output = actor().arg("in-pid-namespace").args(action).output().expect("spawning kw-actor");
    assert!(
        output.status.success(),
        "kw-actor in-pid-namespace {action:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().parse().expect("the init's host pid")
}

async fn ptrace_and_process_memory_reads_and_writes_are_secret_accesses(opts: LoadOptions) {
    let Some(mut sensor) = start_sensor(&opts) else { return };
    let cases = [
        ("ptrace", "ptrace"),
        ("vm-readv", "process_vm_readv"),
        ("vm-writev", "process_vm_writev"),
    ];
    for (action, method) in cases {
        let mut target = Command::new("sleep").arg("30").spawn().unwrap();
        let target_pid = target.id();
        let pid = act(&[action, &target_pid.to_string()]);
        let event = wait_for(&mut sensor, WAIT, |e| {
            e.process.pid == pid
                && matches!(e.detail, Detail::Secret { method: m, .. } if m == method)
        })
        .await
        .unwrap_or_else(|| panic!("no secret event for {action}"));
        target.kill().unwrap();
        let _ = target.wait();
        let Detail::Secret { method: m, target_pid: t, .. } = event.detail else { unreachable!() };
        assert_eq!((m, t), (method, target_pid), "{action}");
    }
}

#[tokio::test]
async fn connects_and_udp_sends_to_watched_endpoints_are_reported() {
    let Some(mut sensor) = sensor() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = listener.local_addr().unwrap();
    let udp_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = udp_sock.local_addr().unwrap();
    let unwatched_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let unwatched = unwatched_listener.local_addr().unwrap();
    let entry = |port: u16, protocols: u32, watch_id: u32| EndpointEntry {
        addr: "127.0.0.1".parse().unwrap(),
        prefix_len: 32,
        port,
        protocols,
        watch_id,
    };
    sensor.watch_maps().insert_endpoint(&entry(tcp.port(), PROTO_TCP, 21)).unwrap();
    sensor.watch_maps().insert_endpoint(&entry(udp.port(), PROTO_UDP, 22)).unwrap();

    let tcp_event = |watch_id| Detail::Connect {
        watch_id,
        protocol: "tcp",
        address: tcp.ip(),
        port: tcp.port(),
    };
    let seen = connect_seen(&mut sensor, "connect", tcp, WAIT).await;
    assert_eq!(seen, Some(tcp_event(21)));
    let seen = connect_seen(&mut sensor, "udp", udp, WAIT).await;
    assert_eq!(
        seen,
        Some(Detail::Connect {
            watch_id: 22,
            protocol: "udp",
            address: udp.ip(),
            port: udp.port()
        })
    );
    let seen = connect_seen(&mut sensor, "connect", unwatched, QUIET).await;
    assert_eq!(seen, None, "unwatched endpoint reported");
    // The same endpoint from an IPv6 socket (IPv4-mapped), and by TCP Fast Open (no connect
    // call at all).
    for action in ["connect-mapped", "fastopen"] {
        let seen = connect_seen(&mut sensor, action, tcp, WAIT).await;
        assert_eq!(seen, Some(tcp_event(21)), "{action}");
    }

    // An entry for any port of the address (port 0): now that connect is watched too.
    let any_port = entry(0, PROTO_TCP, 24);
    sensor.watch_maps().insert_endpoint(&any_port).unwrap();
    let seen = connect_seen(&mut sensor, "connect", unwatched, WAIT).await;
    let address = unwatched.ip();
    assert_eq!(
        seen,
        Some(Detail::Connect { watch_id: 24, protocol: "tcp", address, port: unwatched.port() })
    );

    // Another entry on the watched TCP port comes and goes: the port stays watched for the
    // entry still there. Then the any-port entry goes, and the other port is quiet again.
    let wider = EndpointEntry { prefix_len: 8, ..entry(tcp.port(), PROTO_TCP, 25) };
    sensor.watch_maps().insert_endpoint(&wider).unwrap();
    sensor.watch_maps().remove_endpoint(&wider).unwrap();
    sensor.watch_maps().remove_endpoint(&any_port).unwrap();
    let seen = connect_seen(&mut sensor, "connect", tcp, WAIT).await;
    assert_eq!(seen, Some(tcp_event(21)), "connect after the removals");
    let seen = connect_seen(&mut sensor, "connect", unwatched, QUIET).await;
    assert_eq!(seen, None, "endpoint reported after its entry was removed");
}

/// Has a child run `action` (`connect` or `udp`) against `addr`; its endpoint event, if one
/// comes within `wait`.
async fn connect_seen(
    sensor: &mut Sensor,
    action: &str,
    addr: std::net::SocketAddr,
    wait: Duration,
) -> Option<Detail> {
    let pid = act(&[action, &addr.to_string()]);
    let is_connect = |e: &Event| e.process.pid == pid && matches!(e.detail, Detail::Connect { .. });
    wait_for(sensor, wait, is_connect).await.map(|e| e.detail)
}

async fn a_connect_to_a_watched_unix_socket_names_the_listening_process(opts: LoadOptions) {
    unix_socket_connect_is_a_secret_access(&opts, "unix").await;
}

#[tokio::test]
async fn a_connect_to_a_watched_unix_socket_through_io_uring_is_seen() {
    unix_socket_connect_is_a_secret_access(&LoadOptions::default(), "uring-unix").await;
}

/// kw-actor `action` connects to a watched socket this test listens on, like an ssh-agent.
async fn unix_socket_connect_is_a_secret_access(opts: &LoadOptions, action: &str) {
    let Some(mut sensor) = start_sensor(opts) else { return };
    let (_dir, path, listener) = watched_agent_socket(&mut sensor, 31);
    let pid = act(&[action, path.to_str().unwrap()]);
    let event = secret_by(&mut sensor, pid)
        .await
        .unwrap_or_else(|| panic!("{action}: no secret event for the unix socket connect"));
    drop(listener);
    let Detail::Secret { method, target_pid, detail, .. } = event.detail else { unreachable!() };
    assert_eq!(method, "unix_socket");
    assert_eq!(target_pid, std::process::id(), "the listening process");
    assert_eq!(detail, file_key(&path).map(|k| k.ino).unwrap_or(0));
}

#[tokio::test]
async fn exec_of_a_setuid_binary_by_an_unprivileged_user_shows_the_new_euid() {
    let Some(mut sensor) = sensor() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let suid = dir.path().join("kw-suid-true");
    std::fs::copy("/bin/true", &suid).unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let target = suid.to_str().unwrap().to_string();
    let pid = act(&["as-user", "65534", &target]);
    // Two events, in this order: setuid(65534) in the actor, then the exec of the setuid copy.
    let (mut exec, mut change) = (None, None);
    while exec.is_none() || change.is_none() {
        let event = wait_for(&mut sensor, WAIT, |e| e.process.pid == pid)
            .await
            .unwrap_or_else(|| panic!("missing events: exec {exec:?}, setuid {change:?}"));
        match &event.detail {
            Detail::Exec { filename, .. } if *filename == target => exec = Some(event),
            Detail::CredChange { syscall: "setuid", .. } => change = Some(event),
            _ => {}
        }
    }
    let (exec, change) = (exec.unwrap(), change.unwrap());
    let Detail::Exec { exe_mode, .. } = exec.detail else { unreachable!() };
    assert_eq!((exec.process.uid, exec.process.euid), (65534, 0), "real uid kept, euid root");
    assert_ne!(exe_mode & 0o4000, 0, "setuid bit seen");
    assert_eq!((change.process.uid, change.process.euid), (65534, 65534), "ids after setuid");
}

#[tokio::test]
async fn a_flood_on_one_credential_is_folded_and_fully_counted() {
    let Some(mut sensor) = sensor() else { return };
    let creds = Creds::new();
    watch(&mut sensor, &creds.cred(), 1);
    let other = creds.path("other");
    std::fs::write(&other, "x").unwrap();
    watch(&mut sensor, &other, 2);

    const N: u64 = 100_000;
    let mut flood =
        actor().args(["repeat", creds.cred().to_str().unwrap(), &N.to_string()]).spawn().unwrap();
    let flood_pid = flood.id();
    // During the flood, another process reads another credential: it must get through.
    let reader_pid = act(&["read", other.to_str().unwrap()]);
    assert!(flood.wait().unwrap().success());

    let mut counted = 0u64;
    let mut other_seen = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counted < N && tokio::time::Instant::now() < deadline {
        let Some(event) = wait_for(&mut sensor, Duration::from_secs(2), |e| {
            (e.process.pid == flood_pid || e.process.pid == reader_pid)
                && matches!(e.detail, Detail::FileOpen { .. })
        })
        .await
        else {
            continue;
        };
        if event.process.pid == reader_pid {
            other_seen = true;
        } else {
            counted += u64::from(event.count);
        }
    }
    assert_eq!(counted, N, "every open is delivered, in records or folded into their counts");
    assert_eq!(lost_file_records(&sensor), 0, "no record was lost");
    let records = sensor.reader_stats().records.load(std::sync::atomic::Ordering::Relaxed);
    assert!(records < N / 10, "the flood was folded in the kernel ({records} records)");
    if !other_seen {
        other_seen = wait_for(&mut sensor, WAIT, |e| e.process.pid == reader_pid).await.is_some();
    }
    assert!(other_seen, "the read of the other credential during the flood was delivered");
}

#[tokio::test]
async fn without_folding_a_small_ring_counts_every_loss() {
    let opts = LoadOptions {
        ring_bytes: 64 * 1024,
        fold_window: Duration::ZERO,
        ..LoadOptions::default()
    };
    let Some(mut sensor) = start_sensor(&opts) else {
        return;
    };
    let creds = Creds::new();
    watch(&mut sensor, &creds.cred(), 1);
    const N: u64 = 50_000;
    let pid = act(&["repeat", creds.cred().to_str().unwrap(), &N.to_string()]);
    let mut delivered = 0u64;
    while let Some(event) = wait_for(&mut sensor, Duration::from_secs(2), |e| {
        e.process.pid == pid && matches!(e.detail, Detail::FileOpen { .. })
    })
    .await
    {
        delivered += u64::from(event.count);
    }
    // 50,000 records cannot pass through a 64 KiB ring polled every few milliseconds: records
    // are lost, and counted. Each record carries its key's running total, so the next record
    // (or the sweep) still accounts for the opens whose records were lost.
    let lost = lost_file_records(&sensor);
    assert!(lost > 0, "the ring overflowed, and the loss was counted");
    assert_eq!(delivered, N, "opens accounted for despite {lost} lost records");
}

fn lost_file_records(sensor: &Sensor) -> u64 {
    sensor
        .loaded()
        .lost_counts()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| *k == EventKind::FileOpen)
        .map(|(_, n)| n)
        .sum()
}
