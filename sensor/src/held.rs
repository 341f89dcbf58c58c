//! Credentials already open when the sensor starts watching.
//!
//! The kernel programs see opens, not reads: a process that opened a credential before any
//! program was attached (a first install, or a start after `uninstall`) can go on reading it
//! unseen. At such a start the sensor looks through every process's descriptors in `/proc`
//! and reports each watched file found open there once, as a file access marked `held` — or
//! mapped into its memory, which stays readable after the descriptor is closed.
//! (After a restart that adopted pinned programs nothing was unwatched, and nothing is
//! reported.)

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use sensor_ebpf::{DIR_ANY_NAME, FileKey, FileMatch, NameKey, name_hash_of};

use crate::{kernel_maps::file_key, watch::kernel_dev, watch_sync::KernelWatches};

/// A watched file some process holds open, as the file-open hook would have matched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub pid: u32,
    pub file: FileKey,
    pub parent_ino: u64,
    /// The file's own name.
    pub name: String,
    /// The descriptor's open flags (`/proc/PID/fdinfo/FD`).
    pub flags: u32,
    pub matched: FileMatch,
    /// The watch, for `File` and `Name` matches (a `Dir` match is named by the enricher, which
    /// holds the directory's globs).
    pub watch_id: u32,
}

/// Every watched file open in a process under `proc_root` other than `own_pid`, once per
/// (process, file).
pub fn scan(proc_root: &Path, watches: &KernelWatches, own_pid: u32) -> Vec<Holding> {
    let mut found = Vec::new();
    let mut parents: HashMap<PathBuf, Option<FileKey>> = HashMap::new();
    let watched_inos: HashSet<u64> = watches.files.keys().map(|k| k.ino).collect();
    for pid in numeric_entries(proc_root).filter(|&pid| pid != own_pid) {
        let mut seen = HashSet::new();
        let dir = proc_root.join(pid.to_string());
        let mut hold = |file: FileKey, path: &Path, flags: &dyn Fn() -> u32| {
            if seen.contains(&file) {
                return;
            }
            let parent = path
                .parent()
                .and_then(|p| *parents.entry(p.to_path_buf()).or_insert_with(|| file_key(p).ok()));
            let name = path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
            let Some((matched, watch_id)) = match_held(watches, &file, parent.as_ref(), &name)
            else {
                return;
            };
            let flags = flags();
            if flags & libc::O_PATH as u32 != 0 {
                // A handle that cannot read, as the kernel hook skips it (this is how a
                // sensor follows the files it watches); another descriptor may still read.
                return;
            }
            seen.insert(file);
            found.push(Holding {
                pid,
                file,
                parent_ino: parent.map_or(0, |p| p.ino),
                name: String::from_utf8_lossy(&name).into_owned(),
                flags,
                matched,
                watch_id,
            });
        };
        for fd in numeric_entries(&dir.join("fd")) {
            let link = dir.join("fd").join(fd.to_string());
            // Credentials are regular files; sockets, pipes and devices are skipped unread.
            let Ok(meta) = fs::metadata(&link) else { continue };
            if !meta.is_file() {
                continue;
            }
            let Ok(path) = fs::read_link(&link) else { continue };
            let file = FileKey { dev: kernel_dev(meta.dev()), _pad0: 0, ino: meta.ino() };
            let fdinfo = dir.join("fdinfo").join(fd.to_string());
            hold(file, &path, &|| open_flags(&fdinfo).unwrap_or(0));
        }
        let maps = fs::read_to_string(dir.join("maps")).unwrap_or_default();
        for (file, path, flags) in maps.lines().filter_map(mapped_file) {
            // maps gives the superblock's device; btrfs files are watched by their
            // subvolume's (what `stat` says): for a watched inode number, the file at the path
            // decides when it is this one.
            let file = match watched_inos.contains(&file.ino) {
                true => file_key(&path).ok().filter(|k| k.ino == file.ino).unwrap_or(file),
                false => file,
            };
            hold(file, &path, &|| flags);
        }
    }
    found
}

/// The file a `/proc/PID/maps` line maps, and open flags saying whether the mapping can write
/// it back (shared and writable); `None` for anonymous and special mappings.
fn mapped_file(line: &str) -> Option<(FileKey, PathBuf, u32)> {
    let mut fields = line.splitn(6, ' ');
    let (_range, perms, _offset) = (fields.next()?, fields.next()?, fields.next()?);
    let (dev, ino) = (fields.next()?, fields.next()?.parse::<u64>().ok()?);
    let path = fields.next()?.trim_start();
    if ino == 0 || !path.starts_with('/') {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    let (major, minor) =
        (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?);
    let file = FileKey { dev: kernel_dev(libc::makedev(major, minor)), _pad0: 0, ino };
    let writes_back = perms.contains('w') && perms.contains('s');
    let flags = if writes_back { libc::O_RDWR as u32 } else { libc::O_RDONLY as u32 };
    Some((file, PathBuf::from(path), flags))
}

/// What the kernel's file-open hook would have matched: the inode itself, or its directory
/// (any name, or this name).
fn match_held(
    watches: &KernelWatches,
    file: &FileKey,
    parent: Option<&FileKey>,
    name: &[u8],
) -> Option<(FileMatch, u32)> {
    if let Some(&id) = watches.files.get(file) {
        return Some((FileMatch::File, id));
    }
    let parent = parent.filter(|p| p.dev == file.dev)?;
    let dir = *watches.dirs.get(parent)?;
    if dir & DIR_ANY_NAME != 0 {
        return Some((FileMatch::Dir, dir & !DIR_ANY_NAME));
    }
    let key = NameKey { dev: parent.dev, _pad0: 0, dir_ino: parent.ino, hash: name_hash_of(name) };
    watches.names.get(&key).map(|&id| (FileMatch::Name, id))
}

/// The `flags:` line of an fdinfo file (octal).
fn open_flags(fdinfo: &Path) -> Option<u32> {
    let text = fs::read_to_string(fdinfo).ok()?;
    let flags = text.lines().find_map(|l| l.strip_prefix("flags:"))?;
    u32::from_str_radix(flags.trim(), 8).ok()
}

fn numeric_entries(dir: &Path) -> impl Iterator<Item = u32> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file `name` in a fresh directory, watched as `watch_id`.
    fn watched_file(
        name: &str,
        watch_id: u32,
    ) -> (tempfile::TempDir, PathBuf, FileKey, KernelWatches) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        fs::write(&path, "-----BEGIN PRIVATE KEY-----").unwrap();
        let key = file_key(&path).unwrap();
        let mut watches = KernelWatches::default();
        watches.files.insert(key, watch_id);
        (dir, path, key, watches)
    }

    fn open_path_only(path: &Path) -> fs::File {
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(path).unwrap()
    }

    /// What `scan` finds held by this process.
    fn held_here(watches: &KernelWatches) -> Vec<Holding> {
        let me = std::process::id();
        scan(Path::new("/proc"), watches, 0).into_iter().filter(|h| h.pid == me).collect()
    }

    #[test]
    fn a_watched_file_held_open_is_found_once_with_its_flags() {
        let (dir, cred, key, watches) = watched_file("credentials", 4);
        let other = dir.path().join("notes");
        fs::write(&other, "x").unwrap();
        // A handle that cannot read the file alone is no holding.
        let path_only = open_path_only(&cred);
        assert!(held_here(&watches).is_empty(), "an O_PATH handle counted as a holding");
        // This process holds it twice more (read, and read-write) and an unwatched file once.
        let _a = fs::File::open(&cred).unwrap();
        let _b = fs::OpenOptions::new().read(true).write(true).open(&cred).unwrap();
        let _c = fs::File::open(&other).unwrap();
        let held = held_here(&watches);
        assert_eq!(held.len(), 1, "{held:?}");
        let h = &held[0];
        assert_eq!(
            (h.file, h.matched, h.watch_id, h.name.as_str()),
            (key, FileMatch::File, 4, "credentials")
        );
        assert_eq!(h.flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32, "the first fd's flags");
        drop(path_only);
        // Its own process is skipped.
        let me = std::process::id();
        assert!(scan(Path::new("/proc"), &watches, me).iter().all(|h| h.pid != me));
    }

    #[test]
    fn a_watched_file_mapped_after_its_descriptor_closed_is_found() {
        use std::os::fd::AsRawFd as _;
        let (_dir, cred, key, watches) = watched_file("key.pem", 6);
        let file = fs::File::open(&cred).unwrap();
        // SAFETY: a private read-only mapping of the file's first page; unmapped below.
        let map = unsafe {
            let (prot, flags) = (libc::PROT_READ, libc::MAP_PRIVATE);
            libc::mmap(std::ptr::null_mut(), 4096, prot, flags, file.as_raw_fd(), 0)
        };
        assert_ne!(map, libc::MAP_FAILED);
        drop(file);
        let held = held_here(&watches);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(map, 4096) };
        assert_eq!(held.len(), 1, "{held:?}");
        let h = &held[0];
        assert_eq!((h.file, h.watch_id, h.flags), (key, 6, libc::O_RDONLY as u32));
    }

    #[test]
    fn maps_lines_name_their_file_and_whether_it_can_be_written_back() {
        let line = "7f1c2a000000-7f1c2a001000 rw-s 00000000 fd:01 1835012          /srv/my key.pem";
        let (file, path, flags) = mapped_file(line).expect("a file mapping");
        assert_eq!((file.dev, file.ino), ((0xfd << 20) | 1, 1835012));
        assert_eq!((path.to_str(), flags), (Some("/srv/my key.pem"), libc::O_RDWR as u32));
        let stack = "7ffd5a1e0000-7ffd5a201000 rw-p 00000000 00:00 0          [stack]";
        assert!(mapped_file(stack).is_none());
        assert!(mapped_file("7f1c2a000000-7f1c2a001000 r--p 00000000 00:00 0").is_none());
    }

    #[test]
    fn a_file_in_a_watched_directory_matches_by_any_name_or_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        fs::write(&token, "t").unwrap();
        let file = file_key(&token).unwrap();
        let parent = file_key(dir.path()).unwrap();
        let mut watches = KernelWatches::default();
        watches.dirs.insert(parent, 9 | DIR_ANY_NAME);
        assert_eq!(match_held(&watches, &file, Some(&parent), b"token"), Some((FileMatch::Dir, 9)));
        watches.dirs.insert(parent, 0);
        let name = NameKey {
            dev: parent.dev,
            _pad0: 0,
            dir_ino: parent.ino,
            hash: name_hash_of(b"token"),
        };
        watches.names.insert(name, 11);
        assert_eq!(
            match_held(&watches, &file, Some(&parent), b"token"),
            Some((FileMatch::Name, 11))
        );
        assert_eq!(match_held(&watches, &file, Some(&parent), b"other"), None);
    }
}
