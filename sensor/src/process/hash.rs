//! SHA-256 of executables, cached by file identity.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::procfs::ProcFs;

/// Executables larger than this are not hashed: hashing a multi-gigabyte binary would stall
/// the hashing task for seconds.
pub const DEFAULT_MAX_HASH_SIZE: u64 = 64 * 1024 * 1024;

/// Cache entries kept before the cache is cleared; a host runs far fewer distinct binaries.
const MAX_ENTRIES: usize = 16 * 1024;

/// Identity of a file's content: a replaced or rewritten binary changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    size: u64,
}

#[derive(Debug, Clone)]
enum Cached {
    Hash(String),
    /// Not hashed (too large); kept so the reason is logged once per file.
    Skipped,
}

/// Computes and caches executable hashes.
///
/// Hashing reads the whole file, so it must not run on the event path: call
/// [`ExeHasher::hash_process`] from `tokio::task::spawn_blocking` (or a dedicated thread) with
/// an `Arc<ExeHasher>`, then store the result with
/// [`super::ProcessTable::set_exe_sha256`]. A cache hit costs one `stat`. The sensor's own
/// reads of the binaries are not reported because the kernel programs skip the sensor's tgid.
#[derive(Debug)]
pub struct ExeHasher {
    max_size: u64,
    cache: Mutex<HashMap<FileKey, Cached>>,
}

impl Default for ExeHasher {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_HASH_SIZE)
    }
}

impl ExeHasher {
    /// A hasher that skips files larger than `max_size` bytes.
    pub fn new(max_size: u64) -> Self {
        Self { max_size, cache: Mutex::new(HashMap::new()) }
    }

    /// Hash of the executable of a running process, read through `/proc/PID/exe` so it works
    /// when the file was deleted or replaced after exec, and falling back to `exe` when the
    /// process is gone — only if the file there is `executed` (device in the kernel's encoding,
    /// inode), when that is known: a binary replaced since, or a path that named another file
    /// in the process's own mount namespace (a binary bind-mounted over a trusted one's path),
    /// must not lend the process the trusted binary's hash. `None` when neither can be read,
    /// the file is not the one executed, or it is over the size cap.
    pub fn hash_process(
        &self,
        proc: &ProcFs,
        pid: u32,
        exe: &Path,
        executed: Option<(u32, u64)>,
    ) -> Option<String> {
        let via_proc = proc.path(pid, "exe");
        // A recycled pid would hash someone else's binary: only trust /proc while it still
        // names the same exe.
        if proc.read_exe(pid).is_ok_and(|p| p == exe)
            && let Ok(hash) = self.hash_file(&via_proc)
        {
            return hash;
        }
        // A relative name would be looked up from the sensor's own directory, and a
        // descriptor's (`/dev/fd/3`) would open the sensor's own descriptor.
        if !exe.is_absolute() || super::table::names_a_descriptor(exe) {
            return None;
        }
        match self.hash_file_if(exe, executed) {
            Ok(hash) => hash,
            Err(e) => {
                tracing::debug!(pid, exe = %exe.display(), error = %e, "cannot hash executable");
                None
            }
        }
    }

    /// Hash of the file at `path` (symlinks followed); `Ok(None)` when over the size cap.
    pub fn hash_file(&self, path: &Path) -> io::Result<Option<String>> {
        self.hash_file_if(path, None)
    }

    /// [`Self::hash_file`], when the file opened is `expected` (device in the kernel's
    /// encoding, inode) if that is given; an error otherwise.
    fn hash_file_if(
        &self,
        path: &Path,
        expected: Option<(u32, u64)>,
    ) -> io::Result<Option<String>> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        if expected.is_some_and(|e| e != super::kernel_file_id(&meta)) {
            return Err(io::Error::other("the file there is not the one the process executed"));
        }
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            size: meta.size(),
        };
        if let Some(cached) = self.lock().get(&key).cloned() {
            return Ok(match cached {
                Cached::Hash(h) => Some(h),
                Cached::Skipped => None,
            });
        }
        let value = if key.size > self.max_size {
            tracing::info!(
                path = %path.display(),
                size = key.size,
                max = self.max_size,
                "executable not hashed: larger than the size cap"
            );
            Cached::Skipped
        } else {
            Cached::Hash(sha256_hex(&mut file)?)
        };
        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(key, value.clone());
        Ok(match value {
            Cached::Hash(h) => Some(h),
            Cached::Skipped => None,
        })
    }

    /// Number of cached files (hashed or skipped).
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, Cached>> {
        // A panic while holding the lock cannot leave the map inconsistent: keep using it.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn sha256_hex(reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Hash of a file's content, uncached.
#[cfg(test)]
pub(crate) fn sha256_file(path: &Path) -> io::Result<String> {
    sha256_hex(&mut File::open(path)?)
}
