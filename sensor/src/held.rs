//! Credentials already open when the sensor starts watching.
//!
//! The kernel programs see opens, not reads: a process that opened a credential before any
//! program was attached (a first install, or a start after `uninstall`) can go on reading it
//! unseen. At such a start the sensor looks through every process's descriptors in `/proc`
//! and reports each watched file found open there once, as a file access marked `held`.
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
    for pid in numeric_entries(proc_root).filter(|&pid| pid != own_pid) {
        let mut seen = HashSet::new();
        let dir = proc_root.join(pid.to_string());
        for fd in numeric_entries(&dir.join("fd")) {
            let link = dir.join("fd").join(fd.to_string());
            // Credentials are regular files; sockets, pipes and devices are skipped unread.
            let Ok(meta) = fs::metadata(&link) else { continue };
            if !meta.is_file() {
                continue;
            }
            let file = FileKey { dev: kernel_dev(meta.dev()), _pad0: 0, ino: meta.ino() };
            if seen.contains(&file) {
                continue;
            }
            let Ok(path) = fs::read_link(&link) else { continue };
            let parent = path
                .parent()
                .and_then(|p| *parents.entry(p.to_path_buf()).or_insert_with(|| file_key(p).ok()));
            let name = path.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
            let Some((matched, watch_id)) = match_held(watches, &file, parent.as_ref(), &name)
            else {
                continue;
            };
            seen.insert(file);
            found.push(Holding {
                pid,
                file,
                parent_ino: parent.map_or(0, |p| p.ino),
                name: String::from_utf8_lossy(&name).into_owned(),
                flags: open_flags(&dir.join("fdinfo").join(fd.to_string())).unwrap_or(0),
                matched,
                watch_id,
            });
        }
    }
    found
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

    #[test]
    fn a_watched_file_held_open_is_found_once_with_its_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("credentials");
        fs::write(&cred, "key").unwrap();
        let other = dir.path().join("notes");
        fs::write(&other, "x").unwrap();
        let key = file_key(&cred).unwrap();
        let mut watches = KernelWatches::default();
        watches.files.insert(key, 4);
        // This process holds it twice (read, and read-write) and an unwatched file once.
        let _a = fs::File::open(&cred).unwrap();
        let _b = fs::OpenOptions::new().read(true).write(true).open(&cred).unwrap();
        let _c = fs::File::open(&other).unwrap();
        let me = std::process::id();
        let held: Vec<_> =
            scan(Path::new("/proc"), &watches, 0).into_iter().filter(|h| h.pid == me).collect();
        assert_eq!(held.len(), 1, "{held:?}");
        let h = &held[0];
        assert_eq!(
            (h.file, h.matched, h.watch_id, h.name.as_str()),
            (key, FileMatch::File, 4, "credentials")
        );
        assert_eq!(h.flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32, "the first fd's flags");
        // Its own process is skipped.
        assert!(scan(Path::new("/proc"), &watches, me).iter().all(|h| h.pid != me));
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
