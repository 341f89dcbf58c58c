//! Resolving path watches to inodes, the keys the kernel programs match opens on.
//!
//! Paths are resolved here, once, and the kernel compares inodes: a credential opened through a
//! relative path, `..`, a symlink, a hard link, `openat(dirfd, …)` or `/proc/self/root/…` is
//! the same inode. Symlinks are followed to the real file (Kubernetes projected tokens are
//! `token -> ..data/token`, `..data -> ..2024_01_01_…`), and every directory the walk passes is
//! recorded for the [file watcher](super::FileWatcher), so a rename, a rotation or a file
//! created later leads to a re-resolution.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use globset::GlobSet;
use serde::Serialize;

use super::pattern::{self, Part, PathPattern, RawPattern};
use super::set::WatchSet;

/// Symlinks followed per path before giving up (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Kernel-internal `dev_t` from a userspace `st_dev`: `(major << 20) | minor`, which is what
/// `inode->i_sb->s_dev` holds and what the kernel maps are keyed with. Userspace `st_dev` uses
/// the glibc encoding (`major` in bits 8-19 and 32-63, `minor` in bits 0-7 and 20-31).
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & 0xffff_f000);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & 0xffff_ff00);
    ((major << 20) | (minor & 0xf_ffff)) as u32
}

/// A file's identity, with the device in both encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FileId {
    /// Device as `stat(2)` gives it.
    pub st_dev: u64,
    /// Device as the kernel stores it ([`kernel_dev`]).
    pub kernel_dev: u32,
    pub ino: u64,
}

impl FileId {
    pub fn from_metadata(meta: &Metadata) -> Self {
        Self { st_dev: meta.dev(), kernel_dev: kernel_dev(meta.dev()), ino: meta.ino() }
    }

    /// Identity of the file at `path`, symlinks followed.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        fs::metadata(path).map(|m| Self::from_metadata(&m))
    }
}

/// A watched file: which watch, and the path it was found at (symlinks not resolved, so it
/// reads like the pattern).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WatchedFile {
    pub watch_id: u32,
    pub path: PathBuf,
}

/// What the kernel maps should hold for the current file system state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedFiles {
    /// Watched files by real inode. A file in several watches belongs to the lowest id.
    pub files: BTreeMap<FileId, WatchedFile>,
    /// Directories whose entries are watched (a pattern's last component is matched there),
    /// by real inode: opens and creations in them catch files that appear or are replaced
    /// between two resolutions. A directory shared by several watches maps to the lowest id;
    /// the event's file name tells which watch it is.
    pub dirs: BTreeMap<FileId, u32>,
    /// Directories to watch for changes (for [`super::FileWatcher`]) and, for each, the child
    /// names (globs, literals escaped) whose change calls for a re-resolution. Includes the
    /// first existing ancestor of paths that do not exist yet and the directories holding
    /// symlinks that were followed.
    pub watch_dirs: BTreeMap<PathBuf, BTreeSet<String>>,
}

/// Changes between two resolutions, to apply to the kernel maps without reloading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileDiff {
    /// New entries, or entries whose watch changed (insert or overwrite).
    pub added: Vec<(FileId, WatchedFile)>,
    /// Entries to delete.
    pub removed: Vec<FileId>,
    /// Directory entries to insert or overwrite.
    pub dirs_added: Vec<(FileId, u32)>,
    /// Directory entries to delete.
    pub dirs_removed: Vec<FileId>,
}

impl FileDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.dirs_added.is_empty()
            && self.dirs_removed.is_empty()
    }
}

impl ResolvedFiles {
    /// What to change to go from `old` to `new`. A file whose path changed but whose inode and
    /// watch did not is not a change (the kernel keys on the inode).
    pub fn diff(old: &Self, new: &Self) -> FileDiff {
        FileDiff {
            added: new
                .files
                .iter()
                .filter(|(k, v)| old.files.get(k).is_none_or(|o| o.watch_id != v.watch_id))
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            removed: old.files.keys().filter(|k| !new.files.contains_key(k)).copied().collect(),
            dirs_added: new
                .dirs
                .iter()
                .filter(|(k, v)| old.dirs.get(k) != Some(v))
                .map(|(k, v)| (*k, *v))
                .collect(),
            dirs_removed: old.dirs.keys().filter(|k| !new.dirs.contains_key(k)).copied().collect(),
        }
    }
}

/// Resolves every `paths` entry of `set` against the file system now. Blocking I/O (stat,
/// readdir, readlink): run it off the async event path, e.g. in `spawn_blocking`.
pub fn resolve_files(set: &WatchSet) -> ResolvedFiles {
    resolve(set, Kind::File)
}

/// Resolves every `unix_sockets` entry to socket inodes, the same way as [`resolve_files`]
/// (the kernel matches a `connect()` on the socket file's inode).
pub fn resolve_unix_sockets(set: &WatchSet) -> ResolvedFiles {
    resolve(set, Kind::Socket)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Socket,
}

fn resolve(set: &WatchSet, kind: Kind) -> ResolvedFiles {
    let homes = set.homes();
    let mut walker = Walker { kind, out: ResolvedFiles::default() };
    if set.homes_from_system() {
        // `~` means the homes in /etc/passwd: a new user calls for a re-resolution.
        walker.interest(Path::new("/etc"), "passwd".to_string());
    }
    for watch in set.iter() {
        let raws: &[RawPattern] = match kind {
            Kind::File => &watch.paths,
            Kind::Socket => &watch.sockets,
        };
        let excluded = pattern::exclusions(raws, &homes);
        for raw in raws.iter().filter(|r| !r.exclude) {
            for pattern in raw.expand(&homes) {
                walker.walk(watch.id, &pattern, &excluded);
            }
        }
    }
    walker.out
}

struct Walker {
    kind: Kind,
    out: ResolvedFiles,
}

/// A directory reached by the walk: where it really is, and how the pattern spells it.
struct Reached {
    real: PathBuf,
    shown: PathBuf,
}

impl Walker {
    fn walk(&mut self, watch_id: u32, pattern: &PathPattern, excluded: &GlobSet) {
        let mut frontier = vec![Reached { real: PathBuf::from("/"), shown: PathBuf::from("/") }];
        let count = pattern.parts.len();
        for (i, part) in pattern.parts.iter().enumerate() {
            let last = i + 1 == count;
            let mut next = Vec::new();
            for dir in &frontier {
                self.interest(&dir.real, part.as_glob());
                if last && let Ok(meta) = fs::metadata(&dir.real) {
                    self.out.dirs.entry(FileId::from_metadata(&meta)).or_insert(watch_id);
                }
                for name in self.children(&dir.real, part) {
                    let shown = dir.shown.join(&name);
                    let Some(real) = self.follow(&dir.real, &name) else {
                        continue;
                    };
                    let Ok(meta) = fs::metadata(&real) else {
                        continue;
                    };
                    if !last {
                        if meta.is_dir() {
                            next.push(Reached { real, shown });
                        }
                    } else if self.wanted(&meta) && !excluded.is_match(&shown) {
                        self.leaf(watch_id, &real, &meta, shown);
                    }
                }
            }
            frontier = next;
        }
    }

    fn leaf(&mut self, watch_id: u32, real: &Path, meta: &Metadata, shown: PathBuf) {
        self.out
            .files
            .entry(FileId::from_metadata(meta))
            .or_insert(WatchedFile { watch_id, path: shown });
        // The real file's directory, when a symlink led elsewhere (projected tokens).
        if let Some(parent) = real.parent()
            && let Ok(meta) = fs::metadata(parent)
        {
            self.out.dirs.entry(FileId::from_metadata(&meta)).or_insert(watch_id);
        }
    }

    fn wanted(&self, meta: &Metadata) -> bool {
        match self.kind {
            Kind::File => !meta.is_dir(),
            Kind::Socket => meta.file_type().is_socket(),
        }
    }

    /// Names in `dir` the pattern part matches (a literal is returned whether or not it
    /// exists; following it tells).
    fn children(&self, dir: &Path, part: &Part) -> Vec<OsString> {
        match part {
            Part::Literal(name) => vec![name.clone()],
            Part::Glob { matcher, .. } => match fs::read_dir(dir) {
                Ok(entries) => {
                    let mut names: Vec<OsString> = entries
                        .filter_map(|e| e.ok().map(|e| e.file_name()))
                        .filter(|n| matcher.is_match(Path::new(n)))
                        .collect();
                    names.sort();
                    names
                }
                Err(_) => Vec::new(),
            },
        }
    }

    /// Real path of `dir/name` (`dir` already real), following symlinks like the kernel does
    /// and recording each link's directory and name as worth watching. `None` when missing,
    /// dangling or looping.
    fn follow(&mut self, dir: &Path, name: &OsStr) -> Option<PathBuf> {
        let mut pending: Vec<OsString> = vec![name.to_os_string()];
        let mut current = dir.to_path_buf();
        let mut links = 0;
        while let Some(component) = pending.pop() {
            if component == "." || component.is_empty() {
                continue;
            }
            if component == ".." {
                current.pop();
                continue;
            }
            let next = current.join(&component);
            let Ok(meta) = fs::symlink_metadata(&next) else {
                // Missing: watch for it to appear where the walk stopped.
                self.interest(&current, globset::escape(&component.to_string_lossy()));
                return None;
            };
            if !meta.file_type().is_symlink() {
                current = next;
                continue;
            }
            links += 1;
            if links > MAX_SYMLINKS {
                return None;
            }
            self.interest(&current, globset::escape(&component.to_string_lossy()));
            let target = fs::read_link(&next).ok()?;
            if target.is_absolute() {
                current = PathBuf::from("/");
            }
            let mut parts: Vec<OsString> = target
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(n) => Some(n.to_os_string()),
                    std::path::Component::ParentDir => Some("..".into()),
                    _ => None,
                })
                .collect();
            parts.reverse();
            pending.extend(parts);
        }
        Some(current)
    }

    fn interest(&mut self, dir: &Path, name_glob: String) {
        self.out.watch_dirs.entry(dir.to_path_buf()).or_default().insert(name_glob);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::watch::{Category, WatchSpec};
    use std::os::unix::fs::symlink;

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(0, 45)), 45);
        assert_eq!(kernel_dev(libc::makedev(259, 70000)), (259 << 20) | 70000);
        assert_eq!(kernel_dev(libc::makedev(4095, 0xf_ffff)), 0xffff_ffff);

        // The root file system's device as mountinfo (the kernel's view) prints it.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = mountinfo
            .lines()
            .map(|l| l.split(' ').collect::<Vec<_>>())
            .find(|f| f.get(4) == Some(&"/"))
            .expect("root mount");
        let (major, minor) = root[2].split_once(':').expect("major:minor");
        let (major, minor): (u32, u32) =
            (major.parse().expect("major"), minor.parse().expect("minor"));
        let st_dev = fs::metadata("/").expect("stat /").dev();
        assert_eq!(kernel_dev(st_dev), (major << 20) | minor);
    }

    pub(crate) fn set_in(dir: &Path, specs: Vec<WatchSpec>) -> WatchSet {
        WatchSet::from_specs(specs)
            .expect("valid specs")
            .with_homes(vec![dir.join("home/alice"), dir.join("root")])
    }

    pub(crate) fn spec(name: &str, paths: &[String]) -> WatchSpec {
        WatchSpec {
            name: name.into(),
            category: Category::Credential,
            paths: paths.to_vec(),
            endpoints: Vec::new(),
            unix_sockets: Vec::new(),
        }
    }

    #[test]
    fn resolves_globs_homes_exclusions_and_symlinks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = tmp.path().canonicalize().expect("real tempdir");
        let ssh = t.join("home/alice/.ssh");
        fs::create_dir_all(&ssh).expect("mkdir");
        fs::create_dir_all(t.join("root")).expect("mkdir");
        fs::write(ssh.join("id_ed25519"), "key").expect("write");
        fs::write(ssh.join("id_ed25519.pub"), "pub").expect("write");
        fs::write(ssh.join("known_hosts"), "x").expect("write");
        // Projected token layout.
        let sa = t.join("sa");
        fs::create_dir_all(sa.join("..2024_01_01_00_00_00.1")).expect("mkdir");
        fs::write(sa.join("..2024_01_01_00_00_00.1/token"), "jwt").expect("write");
        symlink("..2024_01_01_00_00_00.1", sa.join("..data")).expect("symlink");
        symlink("..data/token", sa.join("token")).expect("symlink");

        let set = set_in(
            &t,
            vec![
                spec("ssh-private-keys", &["~/.ssh/id_*".into(), "!~/.ssh/*.pub".into()]),
                spec("aws-credentials", &["~/.aws/credentials".into()]),
                spec("token", &[format!("{}/sa/token", t.display())]),
            ],
        );
        let r = resolve_files(&set);
        let key = FileId::of(&ssh.join("id_ed25519")).expect("stat");
        assert_eq!(r.files.get(&key).map(|f| f.watch_id), Some(0));
        assert!(!r.files.contains_key(&FileId::of(&ssh.join("id_ed25519.pub")).expect("stat")));
        let token = FileId::of(&sa.join("..2024_01_01_00_00_00.1/token")).expect("stat");
        assert_eq!(r.files.get(&token), Some(&WatchedFile { watch_id: 2, path: sa.join("token") }));
        assert_eq!(r.files.len(), 2, "{r:#?}");

        // Directories: the .ssh dir for the kernel; missing ~/.aws watched from its home.
        assert_eq!(r.dirs.get(&FileId::of(&ssh).expect("stat")), Some(&0));
        assert!(r.watch_dirs[&t.join("home/alice")].contains(".aws"));
        assert!(r.watch_dirs[&t.join("root")].contains(".aws"));
        let sa_names = &r.watch_dirs[&sa];
        assert!(sa_names.contains("token") && sa_names.contains("..data"), "{sa_names:?}");
    }

    #[test]
    fn diff_follows_atomic_replacement_and_rotation() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = tmp.path().canonicalize().expect("real tempdir");
        let aws = t.join("root/.aws");
        fs::create_dir_all(&aws).expect("mkdir");
        fs::create_dir_all(t.join("home/alice")).expect("mkdir");
        fs::write(aws.join("credentials"), "v1").expect("write");
        let sa = t.join("sa");
        fs::create_dir_all(sa.join("..v1")).expect("mkdir");
        fs::write(sa.join("..v1/token"), "jwt1").expect("write");
        symlink("..v1", sa.join("..data")).expect("symlink");
        symlink("..data/token", sa.join("token")).expect("symlink");
        let set = set_in(
            &t,
            vec![
                spec("aws-credentials", &["~/.aws/credentials".into()]),
                spec("token", &[format!("{}/sa/token", t.display())]),
            ],
        );
        let before = resolve_files(&set);
        let old = FileId::of(&aws.join("credentials")).expect("stat");
        let old_token = FileId::of(&sa.join("token")).expect("stat");

        // Keep the old inode allocated so the file system cannot hand its number to a file
        // created below (a reused number is one key with a new watch, not a removal).
        fs::hard_link(aws.join("credentials"), t.join("old-credentials")).expect("link");
        // AWS CLI style: write a temporary file, rename it over the credential.
        fs::write(aws.join("credentials.tmp"), "v2").expect("write");
        fs::rename(aws.join("credentials.tmp"), aws.join("credentials")).expect("rename");
        // kubelet style: new timestamped dir, swap `..data` atomically.
        fs::create_dir_all(sa.join("..v2")).expect("mkdir");
        fs::write(sa.join("..v2/token"), "jwt2").expect("write");
        symlink("..v2", sa.join("..data_tmp")).expect("symlink");
        fs::rename(sa.join("..data_tmp"), sa.join("..data")).expect("rename");
        fs::remove_dir_all(sa.join("..v1")).expect("cleanup");

        let after = resolve_files(&set);
        let new = FileId::of(&aws.join("credentials")).expect("stat");
        let new_token = FileId::of(&sa.join("token")).expect("stat");
        let diff = ResolvedFiles::diff(&before, &after);
        let added: BTreeSet<FileId> = diff.added.iter().map(|(k, _)| *k).collect();
        assert_eq!(added, BTreeSet::from([new, new_token]));
        assert_eq!(
            diff.removed.iter().copied().collect::<BTreeSet<_>>(),
            BTreeSet::from([old, old_token])
        );
        assert!(ResolvedFiles::diff(&after, &resolve_files(&set)).is_empty());
    }

    #[test]
    fn resolves_unix_sockets() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = tmp.path().canonicalize().expect("real tempdir");
        let agent_dir = t.join("ssh-XYZ");
        fs::create_dir_all(&agent_dir).expect("mkdir");
        let _listener =
            std::os::unix::net::UnixListener::bind(agent_dir.join("agent.123")).expect("bind");
        fs::write(agent_dir.join("agent.not-a-socket"), "").expect("write");
        let mut agent = spec("ssh-agent", &[]);
        agent.unix_sockets = vec![format!("{}/ssh-*/agent.*", t.display())];
        let set = set_in(&t, vec![agent]);
        let r = resolve_unix_sockets(&set);
        assert_eq!(r.files.len(), 1, "{r:#?}");
        let sock = FileId::of(&agent_dir.join("agent.123")).expect("stat");
        assert_eq!(r.files.get(&sock).map(|f| f.watch_id), Some(0));
        assert!(resolve_files(&set).files.is_empty());
    }
}
