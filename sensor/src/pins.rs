//! Capture that outlives the sensor process: maps and program links pinned in bpffs, so the
//! kernel keeps recording while the sensor restarts (upgrade, crash, SIGKILL) and the next
//! sensor drains what accumulated.
//!
//! Layout under the pin directory: `maps/<NAME>` and `links/<program>`. The `META` map says
//! which ABI version and object made them: a sensor adopts pins it is compatible with and
//! replaces any others (saying so, since whatever they held is lost).

use std::{
    fs, io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData};
use sensor_ebpf::{ABI_VERSION, PinMeta};
use sha2::{Digest as _, Sha256};

/// Every map of the object, pinned by name.
pub const MAPS: &[&str] = &[
    "EVENTS",
    "LOST",
    "WATCH_FILTER",
    "WATCHED_FILES",
    "WATCHED_DIRS",
    "WATCHED_NAMES",
    "WATCHED_SOCKETS",
    "ENDPOINT_PORTS",
    "ENDPOINTS",
    "FOLD",
    "FOLD_REPORTED",
    "CONNECT_FDS",
    "NAME_SCRATCH",
    "RUNTIME",
    "META",
];

/// Where the sensor pins by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/keywatch";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("another keywatch-sensor already uses pin directory {dir} (lock {lock})")]
    Busy { dir: String, lock: String },
    #[error("pin directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("pinned map {name}: {source}")]
    Map { name: String, source: aya::maps::MapError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io { path: path.display().to_string(), source }
}

/// The pin directory of one sensor, locked for this process's lifetime.
#[derive(Debug)]
pub struct PinDir {
    dir: PathBuf,
    _lock: fs::File,
}

/// What the pin directory held when the sensor started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinState {
    Empty,
    /// Made by this very object: adopt.
    Compatible,
    /// Made by another object or ABI: replace.
    Incompatible(String),
}

/// The identity of this sensor's kernel object.
pub fn this_object_meta() -> PinMeta {
    let digest = Sha256::digest(crate::EBPF_OBJECT);
    PinMeta { abi_version: ABI_VERSION, _pad0: 0, object_sha256: digest.into() }
}

impl PinDir {
    /// Creates (if needed) and locks `dir`; one sensor per pin directory.
    pub fn lock(dir: &Path) -> Result<Self, PinError> {
        let lock_dir = Path::new("/run/keywatch");
        fs::create_dir_all(lock_dir).map_err(io_err(lock_dir))?;
        let name: String = dir.display().to_string().replace('/', "_");
        let lock_path = lock_dir.join(format!("pins{name}.lock"));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(PinError::Busy {
                dir: dir.display().to_string(),
                lock: lock_path.display().to_string(),
            });
        }
        for sub in ["maps", "links"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { dir: dir.to_path_buf(), _lock: lock })
    }

    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    pub fn link_path(&self, program: &str) -> PathBuf {
        self.dir.join("links").join(program)
    }

    /// What the directory holds now.
    pub fn state(&self) -> PinState {
        let meta_path = self.map_path("META");
        if !meta_path.exists() {
            let leftovers = fs::read_dir(self.dir.join("links")).map(|d| d.count()).unwrap_or(0)
                + fs::read_dir(self.dir.join("maps")).map(|d| d.count()).unwrap_or(0);
            return if leftovers == 0 {
                PinState::Empty
            } else {
                PinState::Incompatible("pins without a META map".into())
            };
        }
        let meta = MapData::from_pin(&meta_path)
            .ok()
            .and_then(|m| Map::from_map_data(m).ok())
            .and_then(|m| Array::<_, PinMeta>::try_from(m).ok())
            .and_then(|a| a.get(&0, 0).ok());
        match meta {
            Some(m) if m == this_object_meta() => {
                let missing = MAPS.iter().find(|name| !self.map_path(name).exists());
                match missing {
                    Some(name) => PinState::Incompatible(format!("pinned map {name} missing")),
                    None => PinState::Compatible,
                }
            }
            Some(m) if m.abi_version != ABI_VERSION => PinState::Incompatible(format!(
                "ABI version {} (this sensor: {ABI_VERSION})",
                m.abi_version
            )),
            Some(_) => {
                PinState::Incompatible("made by another build of the kernel programs".into())
            }
            None => PinState::Incompatible("unreadable META map".into()),
        }
    }

    /// Removes every pin: detaches programs whose only holder was a pinned link, frees maps.
    pub fn clear(&self) -> Result<(), PinError> {
        for sub in ["links", "maps"] {
            let d = self.dir.join(sub);
            for entry in fs::read_dir(&d).map_err(io_err(&d))? {
                let path = entry.map_err(io_err(&d))?.path();
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }

    /// Opens every pinned map by name.
    pub fn open_maps(&self) -> Result<std::collections::HashMap<String, Map>, PinError> {
        MAPS.iter()
            .map(|&name| {
                let map_err = |source| PinError::Map { name: name.to_string(), source };
                let data = MapData::from_pin(self.map_path(name)).map_err(map_err)?;
                Ok((name.to_string(), Map::from_map_data(data).map_err(map_err)?))
            })
            .collect()
    }
}

/// Removes the pins of `dir` (detaching the kernel programs a stopped sensor left running).
pub fn uninstall(dir: &Path) -> Result<(), PinError> {
    let pins = PinDir::lock(dir)?;
    pins.clear()?;
    let _ = fs::remove_dir(dir.join("links"));
    let _ = fs::remove_dir(dir.join("maps"));
    let _ = fs::remove_dir(dir);
    Ok(())
}
