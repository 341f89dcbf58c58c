//! Process table against the real `/proc` (children this test spawns) and a fake tree.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{SystemTime, UNIX_EPOCH};

use super::hash::sha256_file;
use super::*;

const SEC: u64 = 1_000_000_000;

/// An exec record naming only the file.
fn ran(filename: &str) -> ExecFacts {
    ExecFacts { filename: filename.into(), ..ExecFacts::default() }
}

/// The kernel's identity of the file at `path` ([`super::kernel_file_id`]).
fn kernel_file_id(path: &Path) -> (u32, u64) {
    super::kernel_file_id(&fs::metadata(path).expect("stat"))
}

/// A copy of `sleep` named `name` in a fresh directory (kept while the directory lives).
fn copy_of_sleep(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join(name);
    fs::copy(sleep_binary(), &copy).expect("copy sleep");
    (dir, copy)
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A child process killed and reaped on drop.
struct Spawned(Child);

impl Spawned {
    fn new(program: &str, args: &[&str]) -> Self {
        // A binary just written may be briefly busy (ETXTBSY) while another test thread's
        // fork still holds the write descriptor; retry.
        for _ in 0..50 {
            match Command::new(program).args(args).spawn() {
                Ok(child) => return Self(child),
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("spawn {program}: {e}"),
            }
        }
        panic!("spawn {program}: text file busy");
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

fn sleep_binary() -> PathBuf {
    let found = ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("sleep binary");
    fs::canonicalize(found).expect("canonical sleep")
}

/// Waits until the child has finished exec'ing: /proc shows the new exe early in exec, the
/// new command line only once the binary is loaded (where `sched_process_exec` fires).
fn wait_exec(pid: u32, exe: &Path) {
    let proc = ProcFs::default();
    for _ in 0..200 {
        let loaded = fs::read(proc.path(pid, "cmdline")).is_ok_and(|c| !c.is_empty());
        if loaded && proc.read_exe(pid).is_ok_and(|e| e == exe) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("child {pid} did not exec {}", exe.display());
}

#[test]
fn seed_reads_a_spawned_child() {
    let before = now_ns();
    let child = Spawned::new("sleep", &["30"]);
    let sleep = sleep_binary();
    wait_exec(child.pid(), &sleep);

    let mut table = ProcessTable::default();
    let count = table.seed_from_proc().expect("seed");
    assert!(count > 1, "seeded only {count} processes");

    let info = table.get(child.pid()).expect("child in table");
    assert_eq!(info.exe, sleep);
    assert_eq!(info.cmdline, vec!["sleep", "30"]);
    assert_eq!(info.comm, "sleep");
    assert_eq!(info.ppid, std::process::id());
    // SAFETY: plain syscalls.
    let (uid, euid, gid) = unsafe { (libc::getuid(), libc::geteuid(), libc::getgid()) };
    assert_eq!((info.uid, info.euid, info.gid), (uid, euid, gid));
    // Tick resolution and clock offsets: allow a second either side.
    assert!(
        info.start_time_ns + SEC >= before && info.start_time_ns <= now_ns() + SEC,
        "start time {} not near {before}",
        info.start_time_ns
    );
    assert!(info.is_alive());
    assert!(
        !info.cgroup_path.is_empty() || !Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
    );
    // The cgroup's id is its directory's inode, which the kernel's events carry.
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = Path::new("/sys/fs/cgroup").join(info.cgroup_path.trim_start_matches('/'));
        assert_eq!(info.cgroup_id, fs::metadata(dir).expect("cgroup directory").ino());
        assert_ne!(info.cgroup_id, 0);
    }

    let me = table.get(std::process::id()).expect("test process in table");
    assert_eq!(me.exe, std::env::current_exe().expect("current exe"));
}

#[test]
fn fork_exec_exit_then_retention_and_gc() {
    let me = std::process::id();
    let my_exe = std::env::current_exe().expect("current exe");
    let mut table = ProcessTable::default().with_retention(60 * SEC);
    assert!(table.get_or_load(me).is_some());

    let mut child = Spawned::new("sleep", &["30"]);
    let pid = child.pid();
    let sleep = sleep_binary();
    // The kernel stamps the fork event within microseconds of the task's start time; /proc
    // shows that start truncated to a clock tick.
    let t0 = ProcFs::default().start_time_ns(pid).expect("child start time") + 1_000_000;

    // Fork: the child is a copy of the parent until it execs.
    table.on_fork(me, pid, t0);
    let forked = table.get(pid).expect("forked child");
    assert_eq!(forked.exe, my_exe);
    assert_eq!(forked.ppid, me);
    assert_eq!(forked.start_time_ns, t0);

    // Exec: what the kernel reported is what the entry says.
    wait_exec(pid, &sleep);
    let exec = ExecFacts {
        args: vec!["sleep".into(), "30".into()],
        comm: "sleep".into(),
        ..ran(sleep.to_str().expect("utf-8 path"))
    };
    table.on_exec(pid, exec.clone(), t0 + 1000);
    let execd = table.get(pid).expect("exec'd child");
    assert_eq!(execd.exe, sleep);
    assert_eq!(execd.cmdline, vec!["sleep", "30"]);
    assert_eq!(execd.comm, "sleep");
    assert_eq!(execd.start_time_ns, t0, "exec keeps the fork's start time");

    // Exit: gone from /proc, still resolvable with its ancestry.
    child.kill();
    let t_exit = now_ns();
    table.on_exit(pid, t_exit);
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || table.get(pid).is_some());
    let exited = table.get_or_load(pid).expect("exited child still resolves");
    assert_eq!(exited.exited, Some(t_exit));
    assert_eq!(exited.exe, sleep);
    let chain = table.ancestors(pid, 8);
    assert_eq!(chain.first().map(|a| a.pid), Some(me));
    assert_eq!(chain.first().map(|a| a.exe.clone()), Some(my_exe));

    // Within retention it stays, after it a later call collects it.
    table.on_exit(999_999_999, t_exit + 59 * SEC);
    assert!(table.get(pid).is_some());
    table.gc(t_exit + 61 * SEC);
    assert!(table.get(pid).is_none());
}

#[test]
fn exec_after_the_process_is_gone_keeps_inherited_info() {
    // Pids above the kernel's pid_max limit (4194304) never exist in /proc.
    let (parent, child) = (5_000_001, 5_000_002);
    let mut table = ProcessTable::default();
    table.on_fork(1, parent, 10 * SEC);
    table.on_fork(parent, child, 11 * SEC);
    table.on_exec(child, ran("/usr/bin/curl"), 12 * SEC);
    let info = table.get(child).expect("child");
    assert_eq!(info.exe, Path::new("/usr/bin/curl"));
    assert_eq!(info.comm, "curl");
    assert_eq!(info.ppid, parent);
    assert!(info.cmdline.is_empty(), "an inherited cmdline would be the parent's");
    // The record's arguments are the command line, whether or not /proc still shows them.
    let exec = ExecFacts { args: vec!["curl".into(), "-s".into()], ..ran("/usr/bin/curl") };
    table.on_exec(child, exec.clone(), 12 * SEC + 1);
    assert_eq!(table.get(child).map(|i| i.cmdline.clone()), Some(vec!["curl".into(), "-s".into()]));
    // Long names are cut like the kernel cuts comm.
    table.on_exec(child, ran("/opt/bin/a-very-long-program-name"), 13 * SEC);
    assert_eq!(table.get(child).map(|i| i.comm.as_str()), Some("a-very-long-pro"));
}

#[test]
fn recycled_pid_is_never_confused() {
    let (old_parent, pid, grandchild) = (5_000_011, 5_000_012, 5_000_013);
    let mut table = ProcessTable::default();
    // First holder of `pid`: a shell that starts a child, then exits.
    table.on_fork(1, old_parent, SEC);
    table.on_fork(old_parent, pid, 2 * SEC);
    table.on_exec(pid, ran("/bin/bash"), 2 * SEC + 1);
    table.on_fork(pid, grandchild, 3 * SEC);
    table.on_exec(grandchild, ran("/usr/bin/aws"), 3 * SEC + 1);
    table.on_exit(pid, 4 * SEC);

    // The pid is recycled by an unrelated process.
    table.on_fork(1, pid, 5 * SEC);
    table.on_exec(pid, ran("/usr/sbin/cron"), 5 * SEC + 1);

    let current = table.get(pid).expect("new holder");
    assert_eq!(current.exe, Path::new("/usr/sbin/cron"));
    assert!(current.is_alive());
    assert_eq!(table.get_at(pid, 3 * SEC).map(|p| p.exe.clone()), Some("/bin/bash".into()));

    // The grandchild's parent is the bash that started it, not cron.
    let chain = table.ancestors(grandchild, 4);
    assert_eq!(chain.first().map(|a| a.exe.clone()), Some(PathBuf::from("/bin/bash")));
    assert_eq!(chain.get(1).map(|a| a.pid), Some(old_parent));

    // An exec for a pid whose entry has exited is a new process too (its fork was missed).
    table.on_exit(grandchild, 6 * SEC);
    table.on_exec(grandchild, ran("/usr/bin/true"), 7 * SEC);
    assert!(table.get(grandchild).is_some_and(|p| p.is_alive() && p.start_time_ns == 7 * SEC));
    assert!(
        table.get_at(grandchild, 3 * SEC + 5).is_some_and(|p| p.exe == Path::new("/usr/bin/aws"))
    );

    // A fork for a pid still marked alive means its exit was missed: the old one is closed.
    table.on_fork(1, grandchild, 8 * SEC);
    assert_eq!(table.get(grandchild).map(|p| p.start_time_ns), Some(8 * SEC));
    assert!(table.get_at(grandchild, 7 * SEC).is_some_and(|p| p.exited == Some(8 * SEC)));
}

#[test]
fn reads_a_fake_proc_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("4242");
    fs::create_dir(&p).expect("mkdir");
    let id = "3f2a0e7c5b1d4a6f8e9c0b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e";
    // starttime 500 ticks at 100 Hz = 5 s after boot; tty_nr 34819 = pts/3.
    fs::write(
        p.join("stat"),
        "4242 (payments api) S 17 4242 4242 34819 4242 0 0 0 0 0 0 0 0 0 20 0 1 0 500 0 0",
    )
    .expect("stat");
    fs::write(p.join("status"), "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1001\t1001\t1001\t1001\n")
        .expect("status");
    fs::write(p.join("cmdline"), "/usr/local/bin/payments-api\0--port\08080\0").expect("cmdline");
    fs::write(p.join("loginuid"), "1000").expect("loginuid");
    fs::write(p.join("cgroup"), format!("0::/system.slice/docker-{id}.scope\n")).expect("cgroup");
    symlink("/usr/local/bin/payments-api (deleted)", p.join("exe")).expect("exe link");

    let proc = ProcFs::with_clock(dir.path(), 1_000 * SEC as i128, 100);
    let info = proc.read(4242).expect("read");
    assert_eq!(info.ppid, 17);
    assert_eq!((info.uid, info.euid, info.gid), (1000, 0, 1001));
    assert_eq!(info.login_uid, Some(1000));
    assert_eq!(info.comm, "payments api");
    assert_eq!(info.exe, Path::new("/usr/local/bin/payments-api"));
    assert_eq!(info.cmdline, vec!["/usr/local/bin/payments-api", "--port", "8080"]);
    assert_eq!(info.container_id.as_deref(), Some(id));
    assert_eq!(info.systemd_unit, Some(format!("docker-{id}.scope")));
    assert_eq!(info.start_time_ns, 1_005 * SEC);
    assert_eq!(info.tty.as_deref(), Some("pts/3"));

    fs::write(p.join("loginuid"), "4294967295").expect("loginuid");
    assert_eq!(proc.read(4242).expect("read").login_uid, None);
    assert!(proc.read(1).is_err_and(|e| e.is_not_found()));
    assert_eq!(proc.pids().expect("pids"), vec![4242]);
}

#[test]
fn hashes_a_running_exe_even_when_deleted() {
    let (_dir, copy) = copy_of_sleep("sleep-copy");
    let expected = sha256_file(&copy).expect("hash file");
    let child = Spawned::new(copy.to_str().expect("utf-8"), &["30"]);
    wait_exec(child.pid(), &copy);
    fs::remove_file(&copy).expect("delete running binary");

    let hasher = ExeHasher::default();
    let proc = ProcFs::default();
    assert_eq!(hasher.hash_process(&proc, child.pid(), &copy, None), Some(expected.clone()));
    assert_eq!(hasher.cached(), 1);
    // Second call is a cache hit (same dev/ino/mtime/size).
    assert_eq!(hasher.hash_process(&proc, child.pid(), &copy, None), Some(expected.clone()));
    assert_eq!(hasher.cached(), 1);

    let mut table = ProcessTable::default();
    let start = table.get_or_load(child.pid()).expect("child").start_time_ns;
    assert!(table.set_exe_sha256(child.pid(), start, &copy, expected.clone()));
    assert_eq!(table.get(child.pid()).and_then(|p| p.exe_sha256.clone()), Some(expected));
    assert!(!table.set_exe_sha256(child.pid(), start, Path::new("/other"), "x".into()));
}

/// A process gone before it was hashed: its path is hashed only while it holds the file the
/// process executed — not a binary replaced since, nor another one a private mount namespace
/// showed at that path.
#[test]
fn a_gone_process_is_hashed_from_its_path_only_if_the_file_there_is_the_one_it_ran() {
    let (dir, path) = copy_of_sleep("payments-api");
    let ran = kernel_file_id(&path);
    let original = sha256_file(&path).expect("hash");
    let gone = 4_000_000; // beyond pid_max: /proc has no such process
    let (hasher, proc) = (ExeHasher::default(), ProcFs::default());
    assert_eq!(hasher.hash_process(&proc, gone, &path, Some(ran)), Some(original));

    let other = dir.path().join("other");
    fs::write(&other, b"#!/bin/sh\n").expect("write");
    fs::rename(&other, &path).expect("replace");
    assert_eq!(hasher.hash_process(&proc, gone, &path, Some(ran)), None, "another file's hash");
    let now = sha256_file(&path).expect("hash");
    assert_eq!(hasher.hash_process(&proc, gone, &path, Some(kernel_file_id(&path))), Some(now));
}

#[test]
fn size_cap_skips_large_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big");
    fs::write(&big, vec![0u8; 4096]).expect("write");
    let hasher = ExeHasher::new(1024);
    assert_eq!(hasher.hash_file(&big).expect("stat"), None);
    assert_eq!(hasher.hash_file(&big).expect("stat"), None);
    let small = dir.path().join("small");
    fs::write(&small, b"abc").expect("write");
    assert_eq!(
        hasher.hash_file(&small).expect("hash").as_deref(),
        Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    );
}

#[test]
fn relative_exec_resolves_to_the_file_the_kernel_ran() {
    let (dir, copy) = copy_of_sleep("renamed-sleep");
    let id = kernel_file_id(&copy);
    let copy = fs::canonicalize(&copy).expect("canonical copy");
    let me = std::process::id();
    let mut table = ProcessTable::default();

    // Alive: /proc's link names it.
    let mut child = Spawned::new(copy.to_str().expect("utf-8"), &["30"]);
    wait_exec(child.pid(), &copy);
    table.on_fork(me, child.pid(), now_ns());
    let exec = ExecFacts { exe: Some(id), ..ran("./renamed-sleep") };
    table.on_exec(child.pid(), exec.clone(), now_ns());
    assert_eq!(table.get(child.pid()).map(|i| i.exe.clone()), Some(copy.clone()));
    child.kill();

    // Gone: the name under the parent's working directory, since it is the same file. The
    // parent here is a process started in that directory.
    let parent = Command::new("sleep").arg("30").current_dir(dir.path()).spawn().expect("spawn");
    let mut parent = Spawned(parent);
    let gone = 5_000_101;
    table.on_fork(parent.pid(), gone, now_ns());
    table.on_exec(gone, exec.clone(), now_ns());
    assert_eq!(table.get(gone).map(|i| i.exe.clone()), Some(copy.clone()));

    // A different file of that name is not taken for it: the name stays as given.
    let other = ExecFacts { exe: Some((id.0, id.1 + 1)), ..ran("./renamed-sleep") };
    table.on_exec(gone, other.clone(), now_ns());
    assert_eq!(table.get(gone).map(|i| i.exe.clone()), Some(PathBuf::from("./renamed-sleep")));
    parent.kill();
}

#[test]
fn long_arguments_come_whole_from_proc_and_a_new_cgroup_is_read() {
    // sleep adds up its arguments: a 700-digit zero keeps it sleeping 30 s.
    let long = "0".repeat(700);
    let mut child = Spawned::new("sleep", &["30", &long]);
    let sleep = sleep_binary();
    wait_exec(child.pid(), &sleep);
    let mut table = ProcessTable::default();
    table.on_fork(std::process::id(), child.pid(), now_ns());
    // The record holds a cut copy; the cgroup id is one the table has not seen for it, and
    // no cgroup has (not found by id: then /proc says where the process is).
    let exec = ExecFacts {
        args: vec!["sleep".into(), "30".into(), "0".repeat(100)],
        args_cut: true,
        cgroup_id: u64::MAX - 1,
        ..ran(sleep.to_str().expect("utf-8"))
    };
    table.on_exec(child.pid(), exec.clone(), now_ns());
    let info = table.get(child.pid()).expect("child");
    assert_eq!(info.cmdline, vec!["sleep".to_string(), "30".into(), long]);
    let cgroup = ProcFs::default().read_cgroup(child.pid()).expect("cgroup");
    assert_eq!(info.cgroup_path, cgroup);
    assert_eq!(info.cgroup_id, ProcFs::default().cgroup_id(&cgroup), "the id of the path read");
    child.kill();
}

#[test]
fn exited_processes_are_capped_by_count_as_well_as_by_age() {
    let mut table = ProcessTable::default().with_retention(3600 * SEC).with_max_exited(2);
    // Pids above pid_max: never in /proc.
    let pids = [5_000_201, 5_000_202, 5_000_203];
    for (i, &pid) in pids.iter().enumerate() {
        let t = (i as u64 + 1) * SEC;
        table.on_fork(1, pid, t);
        table.on_exec(pid, ran("/usr/bin/true"), t + 1);
        table.on_exit(pid, t + 2);
    }
    // The cap applies at the next event: the oldest exited process goes first.
    table.on_fork(1, 5_000_204, 10 * SEC);
    assert!(table.get(pids[0]).is_none(), "oldest exited process dropped");
    assert!(table.get(pids[1]).is_some() && table.get(pids[2]).is_some());
    assert!(table.get(5_000_204).is_some_and(|p| p.is_alive()), "live processes are never dropped");
}

#[test]
fn a_program_run_from_memory_is_named_as_proc_names_it() {
    assert!(table::names_a_descriptor(Path::new("/dev/fd/3")));
    assert!(table::names_a_descriptor(Path::new("/proc/self/fd/7")));
    assert!(table::names_a_descriptor(Path::new("/proc/4242/fd/7")));
    assert!(!table::names_a_descriptor(Path::new("/usr/bin/fd")));
    assert!(!table::names_a_descriptor(Path::new("/proc/self/exe")));
    // Gone before anyone looked (a pid above pid_max): the record's dentry name tells.
    let mut table = ProcessTable::default();
    let pid = 5_000_301;
    table.on_fork(1, pid, SEC);
    let exec = ExecFacts { exe_name: "memfd:payload".into(), ..ran("/dev/fd/3") };
    table.on_exec(pid, exec.clone(), SEC + 1);
    assert_eq!(table.get(pid).map(|p| p.exe.clone()), Some(PathBuf::from("/memfd:payload")));
    // A descriptor's name is never hashed: it would open the sensor's own descriptor.
    let hasher = ExeHasher::default();
    assert_eq!(hasher.hash_process(table.proc_fs(), pid, Path::new("/dev/fd/3"), None), None);
}

#[test]
fn a_program_run_through_a_descriptor_is_named_by_the_file_its_parent_holds() {
    use std::os::fd::AsRawFd as _;
    let (_dir, copy) = copy_of_sleep("loader-payload");
    let id = kernel_file_id(&copy);
    let copy = fs::canonicalize(&copy).expect("canonical copy");
    // This test is the parent: it holds the file open, as a loader does before `fexecve`.
    let held = fs::File::open(&copy).expect("open the copy");
    let name = format!("/dev/fd/{}", held.as_raw_fd());
    let mut table = ProcessTable::default();
    let gone = 5_000_401;
    table.on_fork(std::process::id(), gone, now_ns());
    table.on_exec(gone, ExecFacts { exe: Some(id), ..ran(&name) }, now_ns());
    assert_eq!(table.get(gone).map(|p| p.exe.clone()), Some(copy));
    // Another file under that descriptor number is not taken for it.
    let other = ExecFacts { exe: Some((id.0, id.1 + 1)), ..ran(&name) };
    table.on_exec(gone, other, now_ns());
    assert_eq!(table.get(gone).map(|p| p.exe.clone()), Some(PathBuf::from(&name)));
    drop(held);
}

#[test]
fn a_cgroup_is_found_by_its_id_alone() {
    use std::os::unix::fs::MetadataExt as _;
    let proc = ProcFs::default();
    assert_eq!(proc.cgroup_path_of_id(0), None, "0 is no cgroup");
    assert_eq!(proc.cgroup_path_of_id(u64::MAX - 1), None, "no cgroup has this id");
    // SAFETY: plain syscall.
    let root = match crate::system::cgroup2_mount() {
        Ok(root) if unsafe { libc::geteuid() } == 0 => root,
        _ => {
            eprintln!("SKIPPED (the rest): needs root and a cgroup v2 hierarchy");
            return;
        }
    };
    let root = root.as_path();
    let name = format!("kw-test-{}", std::process::id());
    let dir = root.join(&name).join("inner.scope");
    fs::create_dir_all(&dir).expect("creating cgroups");
    let id = fs::metadata(&dir).expect("cgroup").ino();
    let found = proc.cgroup_path_of_id(id);
    let root_id = fs::metadata(root).expect("cgroup root").ino();
    let found_root = proc.cgroup_path_of_id(root_id);
    fs::remove_dir(&dir).expect("removing cgroup");
    fs::remove_dir(root.join(&name)).expect("removing cgroup");
    assert_eq!(found.as_deref(), Some(format!("/{name}/inner.scope").as_str()));
    assert_eq!(found_root.as_deref(), Some("/"), "the root cgroup, as /proc/PID/cgroup shows it");
    assert_eq!(proc.cgroup_path_of_id(id), None, "a removed cgroup is gone");
}
