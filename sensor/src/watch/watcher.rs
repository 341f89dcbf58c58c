//! Live file updates: inotify on every directory a resolution passed through, turned into a
//! debounced "re-resolve" signal.
//!
//! The `inotify` crate is used directly rather than `notify`: only Linux matters here, the
//! watches are per directory with a name filter of our own, and `notify`'s cross-platform
//! layer (its own thread, recursive-mode bookkeeping) would add nothing but weight.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::files::ResolvedFiles;

/// Default quiet time before a change is signalled: an atomic replacement is a create, a write
/// and a rename, and a token rotation several renames; one re-resolution covers them all.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// What happens in a directory that can change what a pattern resolves to.
fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

type Interest = Arc<Mutex<HashMap<i32, GlobSet>>>;

/// Watches the directories of a [`ResolvedFiles`] and signals when a re-resolution is due.
///
/// Use: create it inside a tokio runtime, keep the receiver, then loop:
///
/// ```ignore
/// let (mut watcher, mut changed) = FileWatcher::new(DEFAULT_DEBOUNCE)?;
/// let mut current = resolve_files(&set);
/// apply_to_kernel_maps(&ResolvedFiles::diff(&ResolvedFiles::default(), &current));
/// watcher.update(&current);
/// while changed.recv().await.is_some() {
///     let next = spawn_blocking(move || resolve_files(&set)).await?;
///     apply_to_kernel_maps(&ResolvedFiles::diff(&current, &next));
///     watcher.update(&next);
///     current = next;
/// }
/// ```
///
/// [`FileWatcher::update`] signals by itself when it starts watching a new directory, since a
/// file may have appeared there between the resolution and the watch; the loop above therefore
/// settles on its own. Signals coalesce: at most one is pending.
#[derive(Debug)]
pub struct FileWatcher {
    watches: Watches,
    by_path: HashMap<PathBuf, WatchDescriptor>,
    interest: Interest,
    signal: mpsc::Sender<()>,
    task: JoinHandle<()>,
}

impl FileWatcher {
    /// Starts the inotify reader task; must run inside a tokio runtime.
    pub fn new(debounce: Duration) -> io::Result<(Self, mpsc::Receiver<()>)> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let stream = inotify.into_event_stream(vec![0u8; 16 * 1024])?;
        let interest: Interest = Arc::default();
        let (signal, receiver) = mpsc::channel(1);
        let task = tokio::spawn(read_events(stream, interest.clone(), signal.clone(), debounce));
        Ok((Self { watches, by_path: HashMap::new(), interest, signal, task }, receiver))
    }

    /// Watches exactly the directories of `resolved` (adding and removing inotify watches).
    /// Returns how many directories were newly watched; when any were, a re-resolution is
    /// signalled.
    pub fn update(&mut self, resolved: &ResolvedFiles) -> usize {
        self.update_dirs(resolved.watch_dirs.iter().map(|(d, n)| (d.as_path(), n)))
    }

    /// [`Self::update`] for several resolutions at once (files and unix sockets).
    pub fn update_dirs<'a>(
        &mut self,
        dirs: impl IntoIterator<Item = (&'a Path, &'a BTreeSet<String>)>,
    ) -> usize {
        let mut added = 0;
        let mut vanished = false;
        let mut next: HashMap<PathBuf, WatchDescriptor> = HashMap::new();
        let mut names: HashMap<i32, BTreeSet<String>> = HashMap::new();
        for (dir, globs) in dirs {
            let wd = match self.by_path.get(dir) {
                Some(wd) => wd.clone(),
                None => match self.watches.add(dir, mask()) {
                    Ok(wd) => {
                        added += 1;
                        wd
                    }
                    Err(e) => {
                        // Gone since the resolution (re-resolve), or out of inotify watches.
                        if e.kind() == io::ErrorKind::NotFound {
                            vanished = true;
                        } else {
                            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory");
                        }
                        continue;
                    }
                },
            };
            names.entry(wd.get_watch_descriptor_id()).or_default().extend(globs.iter().cloned());
            next.insert(dir.to_path_buf(), wd);
        }
        let kept: HashSet<i32> =
            next.values().map(WatchDescriptor::get_watch_descriptor_id).collect();
        for (_, wd) in self.by_path.drain() {
            if !kept.contains(&wd.get_watch_descriptor_id()) {
                // Fails only when the directory is already gone, which removed the watch.
                let _ = self.watches.remove(wd);
            }
        }
        self.by_path = next;
        let compiled = names.into_iter().map(|(id, globs)| (id, name_matcher(&globs))).collect();
        *self.interest.lock().unwrap_or_else(|p| p.into_inner()) = compiled;
        if added > 0 || vanished {
            let _ = self.signal.try_send(());
        }
        added
    }

    /// Number of directories watched.
    pub fn watched(&self) -> usize {
        self.by_path.len()
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn name_matcher(globs: &BTreeSet<String>) -> GlobSet {
    let mut builder = GlobSetBuilder::new();
    for glob in globs {
        if let Ok(glob) = Glob::new(glob) {
            builder.add(glob);
        }
    }
    builder.build().unwrap_or_else(|_| GlobSet::empty())
}

async fn read_events(
    mut stream: inotify::EventStream<Vec<u8>>,
    interest: Interest,
    signal: mpsc::Sender<()>,
    debounce: Duration,
) {
    loop {
        let relevant = match stream.next().await {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "inotify read failed; re-resolving");
                true
            }
            Some(Ok(event)) => is_relevant(
                &interest,
                event.wd.get_watch_descriptor_id(),
                event.mask,
                event.name.as_deref(),
            ),
        };
        if !relevant {
            continue;
        }
        // Let the rest of a burst (rename, rotation) arrive, then signal once.
        let deadline = Instant::now() + debounce;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                event = stream.next() => if event.is_none() { return },
            }
        }
        if let Err(mpsc::error::TrySendError::Closed(())) = signal.try_send(()) {
            return;
        }
    }
}

fn is_relevant(interest: &Interest, wd: i32, mask: EventMask, name: Option<&OsStr>) -> bool {
    if mask.intersects(EventMask::Q_OVERFLOW | EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
        return true;
    }
    if mask.contains(EventMask::IGNORED) {
        return false; // a watch we removed, or one whose *_SELF event came first
    }
    let Some(name) = name else {
        return true;
    };
    let interest = interest.lock().unwrap_or_else(|p| p.into_inner());
    interest.get(&wd).is_none_or(|globs| globs.is_match(Path::new(name)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;

    use super::*;
    use crate::watch::files::tests::{set_in, spec};
    use crate::watch::{FileId, WatchSet, resolve_files};

    /// Follows signals until none comes for a while, re-resolving like the pipeline does;
    /// returns the inodes added and removed overall.
    async fn settle(
        watcher: &mut FileWatcher,
        rx: &mut mpsc::Receiver<()>,
        set: &WatchSet,
        current: &mut ResolvedFiles,
    ) -> (BTreeSet<FileId>, BTreeSet<FileId>) {
        let (mut added, mut removed) = (BTreeSet::new(), BTreeSet::new());
        while let Ok(Some(())) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            let next = resolve_files(set);
            let diff = ResolvedFiles::diff(current, &next);
            for (k, _) in diff.added {
                removed.remove(&k);
                added.insert(k);
            }
            for k in diff.removed {
                if !added.remove(&k) {
                    removed.insert(k);
                }
            }
            watcher.update(&next);
            *current = next;
        }
        (added, removed)
    }

    async fn start(set: &WatchSet) -> (FileWatcher, mpsc::Receiver<()>, ResolvedFiles) {
        let (mut watcher, mut rx) = FileWatcher::new(DEFAULT_DEBOUNCE).expect("inotify");
        let mut current = resolve_files(set);
        assert!(watcher.update(&current) > 0);
        let (added, _) = settle(&mut watcher, &mut rx, set, &mut current).await;
        assert!(added.is_empty(), "nothing changed yet");
        (watcher, rx, current)
    }

    #[tokio::test]
    async fn atomic_rename_replacement_is_seen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = tmp.path().canonicalize().expect("real tempdir");
        let aws = t.join("root/.aws");
        fs::create_dir_all(&aws).expect("mkdir");
        fs::write(aws.join("credentials"), "v1").expect("write");
        let set = set_in(&t, vec![spec("aws-credentials", &["~/.aws/credentials".into()])]);
        let (mut watcher, mut rx, mut current) = start(&set).await;
        let old = FileId::of(&aws.join("credentials")).expect("stat");

        fs::write(aws.join("credentials.tmp"), "v2").expect("write");
        fs::rename(aws.join("credentials.tmp"), aws.join("credentials")).expect("rename");
        let new = FileId::of(&aws.join("credentials")).expect("stat");
        let (added, removed) = settle(&mut watcher, &mut rx, &set, &mut current).await;
        assert_eq!(added, BTreeSet::from([new]));
        assert_eq!(removed, BTreeSet::from([old]));
    }

    #[tokio::test]
    async fn file_created_later_matching_a_glob_is_seen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = tmp.path().canonicalize().expect("real tempdir");
        let ssh = t.join("home/alice/.ssh");
        fs::create_dir_all(&ssh).expect("mkdir");
        let set = set_in(
            &t,
            vec![spec("ssh-private-keys", &["~/.ssh/id_*".into(), "!~/.ssh/*.pub".into()])],
        );
        let (mut watcher, mut rx, mut current) = start(&set).await;

        // Unrelated names do not wake the resolver.
        fs::write(ssh.join("known_hosts"), "x").expect("write");
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err());

        fs::write(ssh.join("id_ed25519"), "key").expect("write");
        fs::write(ssh.join("id_ed25519.pub"), "pub").expect("write");
        let (added, removed) = settle(&mut watcher, &mut rx, &set, &mut current).await;
        assert_eq!(added, BTreeSet::from([FileId::of(&ssh.join("id_ed25519")).expect("stat")]));
        assert!(removed.is_empty());
    }

    #[tokio::test]
    async fn directory_created_later_then_file_is_seen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = tmp.path().canonicalize().expect("real tempdir");
        fs::create_dir_all(t.join("root")).expect("mkdir");
        let set = set_in(&t, vec![spec("aws-credentials", &["~/.aws/credentials".into()])]);
        let (mut watcher, mut rx, mut current) = start(&set).await;

        // Slow: the directory, a re-resolution, then the file.
        fs::create_dir(t.join("root/.aws")).expect("mkdir");
        let (added, _) = settle(&mut watcher, &mut rx, &set, &mut current).await;
        assert!(added.is_empty());
        fs::write(t.join("root/.aws/credentials"), "k").expect("write");
        let (added, _) = settle(&mut watcher, &mut rx, &set, &mut current).await;
        assert_eq!(
            added,
            BTreeSet::from([FileId::of(&t.join("root/.aws/credentials")).expect("stat")])
        );

        // Fast: directory and file before any re-resolution (the watch on the new directory
        // comes too late to see the file; the self-signal of `update` covers it).
        fs::create_dir_all(t.join("home/alice/.aws")).expect("mkdir");
        fs::write(t.join("home/alice/.aws/credentials"), "k").expect("write");
        let (added, _) = settle(&mut watcher, &mut rx, &set, &mut current).await;
        assert_eq!(
            added,
            BTreeSet::from([FileId::of(&t.join("home/alice/.aws/credentials")).expect("stat")])
        );
    }
}
