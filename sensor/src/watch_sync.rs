//! Keeps the kernel's watch maps in line with the watch set and the file system: resolves paths
//! to inodes and host names to addresses, then follows changes (inotify for files created
//! later or replaced by atomic rename, periodic DNS refresh) and applies only the differences,
//! live, without reloading a program.
//!
//! What goes into the kernel for a path watch:
//! - the real inode of every file found (hard links and symlinked paths resolve to it);
//! - the directory each file's name lives in, with its literal names (so a file replaced by
//!   atomic rename, whose inode is new, still matches before the next re-resolution);
//! - for a glob name (`id_*`), the directory with "any name": the sensor keeps only names the
//!   glob matches.
//!
//! A watched file moved away (`mv ~/.aws/credentials /tmp/x`) is the same credential under
//! another name: its inode stays watched, at its new path, for as long as it has a name at
//! all. The sensor holds an `O_PATH` handle to every watched file to tell (it pins nothing
//! but the inode, and the kernel programs skip the sensor's own opens).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use globset::{Glob, GlobMatcher};
use sensor_ebpf::{DIR_ANY_NAME, FileKey, NameKey, PROTO_TCP, PROTO_UDP, name_hash_of};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    kernel_maps::{EndpointEntry, MapUpdateError, WatchMaps},
    watch::{
        DEFAULT_DEBOUNCE, EndpointRefresher, EndpointRule, FileId, FileWatcher, Protocol,
        ResolvedEndpoints, ResolvedFiles, WatchSet, resolve_files, resolve_unix_sockets,
    },
};

/// A watched directory: where it is and which names in it belong to which watch.
#[derive(Debug, Clone)]
pub struct DirRule {
    pub path: PathBuf,
    /// Glob names (reported by the kernel for any name, filtered here).
    pub globs: Vec<(GlobMatcher, u32)>,
}

/// Everything the kernel maps should hold, and what the enricher needs to name a match.
#[derive(Debug, Clone, Default)]
pub struct KernelWatches {
    pub files: BTreeMap<FileKey, u32>,
    pub dirs: BTreeMap<FileKey, u32>,
    pub names: BTreeMap<NameKey, u32>,
    pub sockets: BTreeMap<FileKey, u32>,
    /// Path of each watched file or socket, by key.
    pub paths: HashMap<FileKey, PathBuf>,
    pub dir_rules: HashMap<FileKey, DirRule>,
    /// Directories inotify should follow, and the names whose change matters there.
    pub follow: BTreeMap<PathBuf, BTreeSet<String>>,
    /// An `O_PATH` handle to each watched file, to follow it when it is moved away.
    pub handles: HashMap<FileKey, Arc<File>>,
}

fn key(id: &FileId) -> FileKey {
    FileKey { dev: id.kernel_dev, _pad0: 0, ino: id.ino }
}

fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '[', '{'])
}

impl KernelWatches {
    /// Resolves every watch of `set` against the file system now (blocking I/O).
    pub fn resolve(set: &WatchSet) -> Self {
        let mut out = Self::default();
        let homes = set.homes();
        for watch in set.iter() {
            // One watch at a time, so every directory and name is tied to its own watch.
            let Ok(single) = WatchSet::from_specs([watch.spec.clone()]) else {
                continue;
            };
            let single = single.with_homes(homes.clone());
            out.add_files(&resolve_files(&single), watch.id);
            out.add_sockets(&resolve_unix_sockets(&single), watch.id);
        }
        out
    }

    fn add_files(&mut self, r: &ResolvedFiles, watch_id: u32) {
        for (id, w) in &r.files {
            self.files.entry(key(id)).or_insert(watch_id);
            self.paths.entry(key(id)).or_insert_with(|| w.path.clone());
            if !self.handles.contains_key(&key(id))
                && let Some(handle) = open_handle(&w.path, id)
            {
                self.handles.insert(key(id), Arc::new(handle));
            }
        }
        let dir_ids: BTreeSet<FileKey> = r.dirs.keys().map(key).collect();
        for (path, names) in &r.watch_dirs {
            merge_follow(&mut self.follow, path, names);
            let Ok(id) = FileId::of(path) else { continue };
            let dir = key(&id);
            if !dir_ids.contains(&dir) {
                continue; // an ancestor followed for creations, not a directory of names
            }
            let rule = self
                .dir_rules
                .entry(dir)
                .or_insert_with(|| DirRule { path: path.clone(), globs: Vec::new() });
            let mut any_name = false;
            for name in names {
                if is_glob(name) {
                    if let Ok(glob) = Glob::new(name) {
                        rule.globs.push((glob.compile_matcher(), watch_id));
                        any_name = true;
                    }
                } else {
                    let name_key = NameKey {
                        dev: dir.dev,
                        _pad0: 0,
                        dir_ino: dir.ino,
                        hash: name_hash_of(name.as_bytes()),
                    };
                    self.names.entry(name_key).or_insert(watch_id);
                }
            }
            let value = self.dirs.entry(dir).or_insert(watch_id);
            if any_name {
                *value |= DIR_ANY_NAME;
            }
        }
    }

    fn add_sockets(&mut self, r: &ResolvedFiles, watch_id: u32) {
        for (id, w) in &r.files {
            self.sockets.entry(key(id)).or_insert(watch_id);
            self.paths.entry(key(id)).or_insert_with(|| w.path.clone());
        }
        for (path, names) in &r.watch_dirs {
            merge_follow(&mut self.follow, path, names);
        }
    }

    /// Keeps watching the files of `old` that this resolution no longer found but that still
    /// have a name somewhere (moved away, not deleted or replaced), at their new path.
    fn keep_moved_away(&mut self, old: &KernelWatches) {
        for (k, &watch_id) in &old.files {
            if self.files.contains_key(k) {
                continue;
            }
            let Some(handle) = old.handles.get(k) else { continue };
            let Some(now_at) = linked_path(handle) else { continue };
            tracing::warn!(
                watch_id,
                from = %old.paths.get(k).map_or_else(String::new, |p| p.display().to_string()),
                to = %now_at.display(),
                "a watched file was moved away; it stays watched where it is now"
            );
            self.files.insert(*k, watch_id);
            self.paths.insert(*k, now_at);
            self.handles.insert(*k, Arc::clone(handle));
        }
    }

    /// The watch a directory match belongs to, if `name` is one of its globs.
    pub fn glob_watch(&self, dir: &FileKey, name: &str) -> Option<u32> {
        let rule = self.dir_rules.get(dir)?;
        rule.globs.iter().find(|(g, _)| g.is_match(name)).map(|(_, id)| *id)
    }
}

/// An `O_PATH` handle to the file at `path`, if it still is the inode `id` (not a socket: its
/// handle would say nothing more).
fn open_handle(path: &Path, id: &FileId) -> Option<File> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(path).ok()?;
    let meta = file.metadata().ok()?;
    (meta.ino() == id.ino && meta.dev() == id.st_dev).then_some(file)
}

/// Where the file behind `handle` is now, if it still has a name (not deleted, not replaced by
/// a rename over it).
fn linked_path(handle: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd as _;
    if handle.metadata().ok()?.nlink() == 0 {
        return None;
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", handle.as_raw_fd())).ok()?;
    // A name the kernel cannot give as a path (another mount namespace) is no place to show.
    path.is_absolute().then_some(path)
}

fn merge_follow(
    follow: &mut BTreeMap<PathBuf, BTreeSet<String>>,
    path: &std::path::Path,
    names: &BTreeSet<String>,
) {
    follow.entry(path.to_path_buf()).or_default().extend(names.iter().cloned());
}

type Insert<K> = fn(&mut WatchMaps, K, u32) -> Result<(), MapUpdateError>;
type Remove<K> = fn(&mut WatchMaps, &K) -> Result<(), MapUpdateError>;

/// Applies the changes from `old` to `new` to one map.
fn sync_map<K: Ord + Copy>(
    maps: &mut WatchMaps,
    old: &BTreeMap<K, u32>,
    new: &BTreeMap<K, u32>,
    insert: Insert<K>,
    remove: Remove<K>,
) {
    for k in old.keys().filter(|k| !new.contains_key(k)) {
        if let Err(error) = remove(maps, k) {
            tracing::warn!(%error, "could not remove a watch entry");
        }
    }
    for (k, v) in new.iter().filter(|(k, v)| old.get(k) != Some(v)) {
        if let Err(error) = insert(maps, *k, *v) {
            tracing::warn!(%error, "could not add a watch entry");
        }
    }
}

fn apply(maps: &mut WatchMaps, old: &KernelWatches, new: &KernelWatches) {
    sync_map(maps, &old.files, &new.files, WatchMaps::insert_file, WatchMaps::remove_file);
    sync_map(maps, &old.dirs, &new.dirs, WatchMaps::insert_dir, WatchMaps::remove_dir);
    sync_map(maps, &old.names, &new.names, WatchMaps::insert_name, WatchMaps::remove_name);
    sync_map(maps, &old.sockets, &new.sockets, WatchMaps::insert_socket, WatchMaps::remove_socket);
}

fn entry(rule: &EndpointRule) -> EndpointEntry {
    EndpointEntry {
        addr: rule.addr,
        prefix_len: rule.prefix_len,
        port: rule.port,
        protocols: match rule.protocol {
            Protocol::Any => PROTO_TCP | PROTO_UDP,
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        watch_id: rule.watch_id,
    }
}

fn apply_endpoints(maps: &mut WatchMaps, old: &[EndpointRule], new: &ResolvedEndpoints) {
    let old: BTreeSet<_> = old.iter().copied().collect();
    let new_set: BTreeSet<_> = new.rules.iter().copied().collect();
    for gone in old.difference(&new_set) {
        if let Err(error) = maps.remove_endpoint(&entry(gone)) {
            tracing::warn!(%error, "could not remove an endpoint");
        }
    }
    for added in new_set.difference(&old) {
        if let Err(error) = maps.insert_endpoint(&entry(added)) {
            tracing::warn!(%error, addr = %added.addr, "could not watch an endpoint");
        }
    }
    if !new.unresolved.is_empty() {
        let hosts: Vec<&str> = new.unresolved.iter().map(|h| h.host.as_str()).collect();
        tracing::warn!(hosts = %hosts.join(", "), "watched host names did not resolve; retrying later");
    }
}

/// What the enricher reads: the set and what it resolved to.
#[derive(Debug, Clone)]
pub struct WatchView {
    pub set: WatchSet,
    pub kernel: KernelWatches,
}

/// Shared, read by the enricher, written by [`WatchSync`].
pub type SharedView = Arc<RwLock<WatchView>>;

/// The task that owns the watch maps.
pub struct WatchSync {
    maps: WatchMaps,
    view: SharedView,
    rules: Vec<EndpointRule>,
    refresh: Duration,
}

async fn resolve_blocking(set: &WatchSet) -> KernelWatches {
    let set = set.clone();
    tokio::task::spawn_blocking(move || KernelWatches::resolve(&set)).await.unwrap_or_default()
}

impl WatchSync {
    /// Resolves `set` now and fills the maps; returns the task and the view to share. Host
    /// names are resolved later, by [`WatchSync::run`], so a slow resolver delays nothing.
    pub async fn start(
        mut maps: WatchMaps,
        set: WatchSet,
        refresh: Duration,
    ) -> (Self, SharedView) {
        let kernel = resolve_blocking(&set).await;
        apply(&mut maps, &KernelWatches::default(), &kernel);
        // Literal addresses need no resolver: in force from the start.
        let mut literal =
            crate::watch::resolve_endpoints_with(&set, &NoNames, Duration::ZERO).await;
        literal.unresolved.clear();
        apply_endpoints(&mut maps, &[], &literal);
        tracing::info!(
            files = kernel.files.len(),
            dirs = kernel.dirs.len(),
            names = kernel.names.len(),
            sockets = kernel.sockets.len(),
            endpoint_rules = literal.rules.len(),
            "watches in force"
        );
        let view = Arc::new(RwLock::new(WatchView { set, kernel }));
        let sync = Self { maps, view: Arc::clone(&view), rules: literal.rules, refresh };
        (sync, view)
    }

    /// Follows file system and DNS changes, and takes over each new watch set from `policies`
    /// (the collector's policy), until cancelled.
    pub async fn run(mut self, cancel: CancellationToken, mut policies: mpsc::Receiver<WatchSet>) {
        let (mut watcher, mut changed): (Option<FileWatcher>, mpsc::Receiver<()>) =
            match FileWatcher::new(DEFAULT_DEBOUNCE) {
                Ok((w, rx)) => (Some(w), rx),
                Err(error) => {
                    tracing::error!(%error, "inotify unavailable: files created or replaced later are not watched until restart");
                    (None, mpsc::channel(1).1)
                }
            };
        self.follow(watcher.as_mut());
        // The refresher's first answer comes at once: host names resolve then.
        let set = self.view.read().expect("watch view").set.clone();
        let mut refresher = EndpointRefresher::new(set, self.refresh);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                Some(set) = policies.recv() => {
                    self.replace_set(set, watcher.as_mut()).await;
                    let set = self.view.read().expect("watch view").set.clone();
                    refresher = EndpointRefresher::new(set, self.refresh);
                }
                Some(()) = changed.recv() => self.reresolve(watcher.as_mut()).await,
                endpoints = refresher.changed() => {
                    apply_endpoints(&mut self.maps, &self.rules, &endpoints);
                    self.rules = endpoints.rules;
                }
            }
        }
    }

    fn follow(&self, watcher: Option<&mut FileWatcher>) {
        let Some(watcher) = watcher else { return };
        let view = self.view.read().expect("watch view");
        watcher.update_dirs(view.kernel.follow.iter().map(|(d, n)| (d.as_path(), n)));
    }

    /// Switches to a new watch set: the kernel maps get the differences, and the set and what
    /// it resolved to change together in the view, so the enricher never names a match with
    /// the other set's ids. Host names follow with the next refresher answer.
    async fn replace_set(&mut self, set: WatchSet, watcher: Option<&mut FileWatcher>) {
        let kernel = resolve_blocking(&set).await;
        let mut literal =
            crate::watch::resolve_endpoints_with(&set, &NoNames, Duration::ZERO).await;
        literal.unresolved.clear();
        {
            let mut view = self.view.write().expect("watch view");
            apply(&mut self.maps, &view.kernel, &kernel);
            apply_endpoints(&mut self.maps, &self.rules, &literal);
            tracing::info!(
                watches = set.len(),
                files = kernel.files.len(),
                dirs = kernel.dirs.len(),
                sockets = kernel.sockets.len(),
                endpoint_rules = literal.rules.len(),
                "new watch set in force"
            );
            view.set = set;
            view.kernel = kernel;
        }
        self.rules = literal.rules;
        self.follow(watcher);
    }

    async fn reresolve(&mut self, watcher: Option<&mut FileWatcher>) {
        let set = self.view.read().expect("watch view").set.clone();
        let mut kernel = resolve_blocking(&set).await;
        {
            let mut view = self.view.write().expect("watch view");
            kernel.keep_moved_away(&view.kernel);
            apply(&mut self.maps, &view.kernel, &kernel);
            view.kernel = kernel;
        }
        self.follow(watcher);
    }
}

/// A resolver that knows no names: only literal addresses resolve.
struct NoNames;

impl crate::watch::HostResolver for NoNames {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Vec<std::net::IpAddr>>> + Send + 'a>,
    > {
        Box::pin(async move { Err(std::io::Error::other(format!("{host}: resolved later"))) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{Category, WatchSpec};

    fn resolve(path: &Path) -> KernelWatches {
        let spec = WatchSpec {
            name: "key".into(),
            category: Category::Credential,
            paths: vec![path.display().to_string()],
            endpoints: Vec::new(),
            unix_sockets: Vec::new(),
        };
        KernelWatches::resolve(&WatchSet::from_specs([spec]).expect("valid spec"))
    }

    #[test]
    fn moved_away_files_stay_watched_and_replaced_or_deleted_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("credentials");
        std::fs::write(&cred, "secret").unwrap();
        let before = resolve(&cred);
        let (&k, &watch_id) = before.files.iter().next().expect("the file is watched");

        // Moved away: the same inode, watched at its new path.
        let moved = dir.path().join("elsewhere");
        std::fs::rename(&cred, &moved).unwrap();
        let mut after = resolve(&cred);
        assert!(after.files.is_empty(), "nothing at the watched path any more");
        after.keep_moved_away(&before);
        assert_eq!(after.files.get(&k), Some(&watch_id));
        assert_eq!(after.paths.get(&k), Some(&moved));

        // Still followed on the next resolution, and dropped once the inode has no name.
        let mut again = resolve(&cred);
        again.keep_moved_away(&after);
        assert_eq!(again.files.get(&k), Some(&watch_id));
        std::fs::remove_file(&moved).unwrap();
        let mut gone = resolve(&cred);
        gone.keep_moved_away(&again);
        assert!(gone.files.is_empty(), "a deleted credential is not watched");

        // Replaced by a rename over it: the old inode is gone, the new one is watched by path.
        std::fs::write(&cred, "v1").unwrap();
        let v1 = resolve(&cred);
        let tmp = dir.path().join(".tmp");
        std::fs::write(&tmp, "v2").unwrap();
        std::fs::rename(&tmp, &cred).unwrap();
        let mut v2 = resolve(&cred);
        v2.keep_moved_away(&v1);
        assert_eq!(v2.files.len(), 1, "only the new inode: {:?}", v2.files);
        assert!(!v2.files.contains_key(v1.files.keys().next().unwrap()));
    }
}
