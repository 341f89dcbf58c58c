//! Joins each decoded event with the process table and the watch view: the exact process
//! (exe, hash, parent chain, container, unit, session) and the watched resource's name and
//! path. Lifecycle events keep the table exact and are passed on only when asked for.

use std::path::Path;

use sensor_ebpf::{FileKey, NO_WATCH};

/// `O_DIRECTORY`: opening a directory is listing it, not reading a credential.
const O_DIRECTORY: u32 = 0o200000;

use crate::{
    event::{Detail, Event, ProcessRef, file_match_name, opens_for_write},
    held::Holding,
    observation::{Identity, Observation, What},
    process::{ExeHasher, ExecFacts, ProcessInfo, ProcessTable},
    watch_sync::SharedView,
};

/// Parent-chain depth reported with each observation.
const ANCESTRY_DEPTH: usize = 8;

/// Ids the kernel last reported for a process: fresher than anything read from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Creds {
    uid: u32,
    euid: u32,
    gid: u32,
    /// Effective capabilities, when an exec or credential record told them.
    caps: Option<u64>,
}

impl Creds {
    const UNKNOWN: Creds = Creds { uid: u32::MAX, euid: u32::MAX, gid: u32::MAX, caps: None };

    fn ids(&self) -> (u32, u32, u32) {
        (self.uid, self.euid, self.gid)
    }

    fn caps_gained(&self, after: &Creds) -> bool {
        matches!((self.caps, after.caps), (Some(old), Some(new)) if new & !old != 0)
    }
}

/// A privilege change from `before` to `after`; unknown old capabilities are reported equal to
/// the new ones, so no gain is claimed that was not seen.
fn privilege_change(via: &'static str, before: Creds, after: Creds) -> What {
    let new_caps = after.caps.unwrap_or(0);
    What::PrivilegeChange {
        via,
        old_uid: before.uid,
        old_euid: before.euid,
        new_uid: after.uid,
        new_euid: after.euid,
        old_gid: before.gid,
        new_gid: after.gid,
        old_cap_effective: before.caps.unwrap_or(new_caps),
        new_cap_effective: new_caps,
    }
}

pub struct Enricher {
    table: ProcessTable,
    creds: rustc_hash::FxHashMap<u32, Creds>,
    hasher: ExeHasher,
    view: SharedView,
    /// Pass exec/fork/exit observations on too.
    pub lifecycle: bool,
}

impl Enricher {
    pub fn new(table: ProcessTable, hasher: ExeHasher, view: SharedView) -> Self {
        Self { table, creds: Default::default(), hasher, view, lifecycle: false }
    }

    /// Turns one event into zero, one or two observations (an exec that raised privileges
    /// yields the exec and a privilege change). The last observation carries the event's mark.
    pub fn enrich(&mut self, event: Event) -> Vec<Observation> {
        let mark = event.mark;
        let mut out = self.observations(event);
        if let Some(last) = out.last_mut() {
            last.mark = mark;
        }
        out
    }

    /// Observations for watched files found open at the sensor's start ([`crate::held`]): each
    /// its holder's file access, marked held, at `now_unix_ns`.
    pub fn held_at_start(&mut self, holdings: Vec<Holding>, now_unix_ns: u64) -> Vec<Observation> {
        let mut out = Vec::new();
        for h in holdings {
            let Some(info) = self.table.get_or_load(h.pid) else { continue };
            let process = ProcessRef {
                pid: h.pid,
                tid: h.pid,
                ppid: info.ppid,
                uid: info.uid,
                gid: info.gid,
                euid: info.euid,
                login_uid: info.login_uid,
                comm: info.comm.clone(),
                cgroup_id: info.cgroup_id,
            };
            let detail = Detail::FileOpen {
                watch_id: h.watch_id,
                matched: file_match_name(h.matched),
                name: h.name,
                dev: h.file.dev,
                ino: h.file.ino,
                parent_ino: h.parent_ino,
                flags: h.flags,
                write: opens_for_write(h.flags),
                held: true,
            };
            let event = Event {
                time_ns: now_unix_ns,
                count: 1,
                process,
                detail,
                fold: None,
                mark: 0,
                ring_pos: 0,
            };
            out.extend(self.enrich(event));
        }
        out
    }

    fn observations(&mut self, mut event: Event) -> Vec<Observation> {
        let pid = event.process.pid;
        let before = self.creds_before(pid);
        let mut out = Vec::new();
        if !matches!(event.detail, Detail::CredChange { .. } | Detail::Exec { .. }) {
            let egid = before.map_or(event.process.gid, |b| b.gid);
            self.sync_creds(&event.process, egid, None);
        }
        match &event.detail {
            &Detail::Fork { child_pid } => {
                self.table.on_fork(pid, child_pid, event.time_ns);
                self.push_lifecycle(&mut out, &event, || What::Fork { child_pid });
            }
            &Detail::Exec { egid, cap_effective, exe_mode, .. } => {
                let facts = take_exec_facts(&mut event);
                let filename = self.lifecycle.then(|| facts.filename.clone());
                self.table.on_exec(pid, facts, event.time_ns);
                let after = self.sync_creds(&event.process, egid, Some(cap_effective));
                self.push_lifecycle(&mut out, &event, || What::Exec {
                    filename: filename.unwrap_or_default(),
                });
                let setid = exe_mode & 0o6000 != 0;
                if let Some(before) = before.filter(|b| setid && b.ids() != after.ids()) {
                    let change = privilege_change("exec-setuid", before, after);
                    out.push(self.observe(&event, change));
                }
            }
            &Detail::Exit { exit_code } => {
                self.push_lifecycle(&mut out, &event, || What::Exit { exit_code });
                self.table.on_exit(pid, event.time_ns);
                self.creds.remove(&pid);
            }
            Detail::CredChange { syscall, egid, cap_effective } => {
                let after = self.sync_creds(&event.process, *egid, Some(*cap_effective));
                let before = before.unwrap_or(Creds::UNKNOWN);
                if before.ids() != after.ids() || before.caps_gained(&after) {
                    out.push(self.observe(&event, privilege_change(syscall, before, after)));
                }
            }
            Detail::FileOpen {
                watch_id,
                matched,
                name,
                dev,
                ino,
                parent_ino,
                flags,
                write,
                held,
            } => {
                if flags & O_DIRECTORY != 0 {
                    return out; // a watched directory listed, not a credential read
                }
                let view = self.view.read().expect("watch view");
                let dir = FileKey { dev: *dev, _pad0: 0, ino: *parent_ino };
                let in_dir = || view.kernel.dir_rules.get(&dir).map(|r| r.path.join(name));
                let (watch_id, path) = match *matched {
                    "dir" => match view.kernel.glob_watch(&dir, name) {
                        Some(id) => (id, in_dir()),
                        None => return out, // a name the watch's glob does not match
                    },
                    "name" => (*watch_id, in_dir()),
                    _ => {
                        let file = FileKey { dev: *dev, _pad0: 0, ino: *ino };
                        // A fold tail whose records were all lost names no watch: the inode does.
                        let id = match *watch_id {
                            NO_WATCH => view.kernel.files.get(&file).copied().unwrap_or(NO_WATCH),
                            id => id,
                        };
                        (id, view.kernel.paths.get(&file).cloned().or_else(in_dir))
                    }
                };
                let path = path.map_or_else(|| name.clone(), |p| p.display().to_string());
                let watch = watch_name(&view.set, watch_id);
                let category = view.set.category(watch_id);
                drop(view);
                out.push(self.observe(
                    &event,
                    What::FileOpen {
                        watch,
                        category,
                        path,
                        dev: *dev,
                        ino: *ino,
                        flags: *flags,
                        write: *write,
                        held: *held,
                    },
                ));
            }
            Detail::Secret { method, target_pid, detail, ns_pid, .. } => {
                let target =
                    (*target_pid != 0).then(|| Box::new(self.identity_of(*target_pid, None)));
                // Another thread of the same process is not another process.
                if target.as_ref().is_some_and(|t| t.pid == pid && t.start_time_ns != 0) {
                    return out;
                }
                let (watch, path) = if *method == "unix_socket" {
                    let view = self.view.read().expect("watch view");
                    let found = view.kernel.sockets.iter().find(|(k, _)| k.ino == *detail);
                    (
                        found.map(|(_, id)| watch_name(&view.set, *id)),
                        found
                            .and_then(|(k, _)| view.kernel.paths.get(k))
                            .map(|p| p.display().to_string()),
                    )
                } else {
                    (None, None)
                };
                out.push(self.observe(
                    &event,
                    What::SecretAccess {
                        method,
                        target_pid: *target_pid,
                        target_ns_pid: (*ns_pid != 0).then_some(*ns_pid),
                        target,
                        watch,
                        path,
                        detail: *detail,
                    },
                ));
            }
            Detail::Connect { watch_id, protocol, address, port } => {
                let view = self.view.read().expect("watch view");
                let watch = watch_name(&view.set, *watch_id);
                let category = view.set.category(*watch_id);
                drop(view);
                out.push(self.observe(
                    &event,
                    What::Connect { watch, category, address: *address, port: *port, protocol },
                ));
            }
        }
        out
    }

    fn push_lifecycle(
        &mut self,
        out: &mut Vec<Observation>,
        event: &Event,
        what: impl FnOnce() -> What,
    ) {
        if self.lifecycle {
            let observation = self.observe(event, what());
            out.push(observation);
        }
    }

    /// Remembers the ids the kernel just reported for `p` (capabilities and effective gid
    /// only come with exec and credential records; others keep what was known).
    fn sync_creds(&mut self, p: &ProcessRef, egid: u32, caps: Option<u64>) -> Creds {
        let known = self.creds.get(&p.pid).copied();
        let creds = Creds {
            uid: p.uid,
            euid: p.euid,
            gid: egid,
            caps: caps.or(known.and_then(|c| c.caps)),
        };
        self.creds.insert(p.pid, creds);
        creds
    }

    /// The ids `pid` had before this event: the kernel's last report, else the table's.
    fn creds_before(&mut self, pid: u32) -> Option<Creds> {
        if let Some(c) = self.creds.get(&pid) {
            return Some(*c);
        }
        self.table.get_or_load(pid).map(|i| Creds {
            uid: i.uid,
            euid: i.euid,
            gid: i.gid,
            caps: None,
        })
    }

    fn observe(&mut self, event: &Event, what: What) -> Observation {
        Observation {
            time_ns: event.time_ns,
            count: event.count,
            process: self.identity_of(event.process.pid, Some(&event.process)),
            what,
            mark: 0,
            ring_pos: event.ring_pos,
        }
    }

    /// The identity of `pid`: the kernel's view at the event (`kernel`) wins for ids; the
    /// table fills in exe, hash, command line, cgroup, session and ancestry.
    fn identity_of(&mut self, pid: u32, kernel: Option<&ProcessRef>) -> Identity {
        let known = self.table.get_or_load(pid).is_some();
        if let Some(k) = kernel
            && known
        {
            // The cgroup the kernel saw at the event, which a process may have moved to since
            // its exec (and left again, or exited, before anyone looked at /proc).
            self.table.follow_cgroup(pid, k.cgroup_id);
        }
        let info = self.table.get(pid).cloned();
        let ancestors = self.table.ancestors(pid, ANCESTRY_DEPTH);
        let mut id = Identity { pid, ancestors, ..Identity::default() };
        if let Some(info) = &info {
            id.ppid = info.ppid;
            id.uid = info.uid;
            id.euid = info.euid;
            id.gid = info.gid;
            id.login_uid = info.login_uid;
            id.comm = info.comm.clone();
            id.exe = info.exe.display().to_string();
            id.cmdline = info.cmdline.clone();
            id.cgroup_path = info.cgroup_path.clone();
            id.container_id = info.container_id.clone();
            id.pod_uid = info.pod_uid.clone();
            id.systemd_unit = info.systemd_unit.clone();
            id.start_time_ns = info.start_time_ns;
            id.tty = info.tty.clone();
            id.exe_sha256 = info.exe_sha256.clone().or_else(|| self.hash(info));
        }
        if let Some(k) = kernel {
            id.tid = k.tid;
            id.ppid = k.ppid;
            id.uid = k.uid;
            id.euid = k.euid;
            id.gid = k.gid;
            id.login_uid = k.login_uid;
            id.cgroup_id = k.cgroup_id;
            if id.comm.is_empty() {
                id.comm = k.comm.clone();
            }
        } else {
            id.tid = pid;
        }
        id
    }

    fn hash(&mut self, info: &ProcessInfo) -> Option<String> {
        if info.exe.as_os_str().is_empty() {
            return None;
        }
        let hash = self.hasher.hash_process(
            self.table.proc_fs(),
            info.pid,
            Path::new(&info.exe),
            info.exe_file,
        );
        if let Some(h) = &hash {
            self.table.set_exe_sha256(info.pid, info.start_time_ns, &info.exe, h.clone());
        }
        hash
    }
}

/// The table's view of an exec record, its strings taken out of the record (nothing after
/// the table needs them).
fn take_exec_facts(event: &mut Event) -> ExecFacts {
    let Detail::Exec { filename, exe_dev, exe_ino, exe_name, args, args_cut, .. } =
        &mut event.detail
    else {
        return ExecFacts::default();
    };
    let p = &event.process;
    ExecFacts {
        filename: std::mem::take(filename),
        exe: (*exe_ino != 0).then_some((*exe_dev, *exe_ino)),
        exe_name: std::mem::take(exe_name),
        args: std::mem::take(args),
        args_cut: *args_cut,
        comm: p.comm.clone(),
        uid: p.uid,
        euid: p.euid,
        gid: p.gid,
        login_uid: p.login_uid,
        cgroup_id: p.cgroup_id,
    }
}

fn watch_name(set: &crate::watch::WatchSet, id: u32) -> String {
    if id == NO_WATCH {
        return "unknown".to_string();
    }
    set.name(id).map_or_else(|| format!("watch-{id}"), str::to_string)
}
