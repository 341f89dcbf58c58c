//! Userspace handles on the kernel's watch and fold maps. Watches change live: entries are
//! inserted and removed without reloading any program.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use sensor_ebpf::{EndpointKey, EndpointValue, FileKey, FoldKey, FoldState, NameKey};

use crate::{loader::LoadError, watch::kernel_dev};

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, LoadError> {
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    convert(map).map_err(|source| LoadError::Map { name, source })
}

/// The (dev, ino) key of a file as the kernel sees it, after following symlinks.
pub fn file_key(path: &std::path::Path) -> std::io::Result<FileKey> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path)?;
    Ok(FileKey {
        dev: kernel_dev(meta.dev()),
        _pad0: 0,
        ino: meta.ino(),
    })
}

/// An endpoint to watch: an address prefix, a port (0 for any) and the protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointEntry {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub port: u16,
    /// [`sensor_ebpf::PROTO_TCP`] | [`sensor_ebpf::PROTO_UDP`].
    pub protocols: u32,
    pub watch_id: u32,
}

impl EndpointEntry {
    fn key(&self) -> Key<EndpointKey> {
        let (addr, addr_bits) = match self.addr {
            IpAddr::V4(v4) => (
                v4.to_ipv6_mapped().octets(),
                96 + u32::from(self.prefix_len.min(32)),
            ),
            IpAddr::V6(v6) => (v6.octets(), u32::from(self.prefix_len.min(128))),
        };
        Key::new(
            16 + addr_bits,
            EndpointKey {
                port_be: self.port.to_be_bytes(),
                addr,
                _pad0: [0; 2],
            },
        )
    }
}

/// The watched-file, watched-directory and endpoint maps.
pub struct WatchMaps {
    files: HashMap<MapData, FileKey, u32>,
    dirs: HashMap<MapData, FileKey, u32>,
    sockets: HashMap<MapData, FileKey, u32>,
    names: HashMap<MapData, NameKey, u32>,
    endpoints: LpmTrie<MapData, EndpointKey, EndpointValue>,
}

#[derive(Debug, thiserror::Error)]
#[error("updating kernel map {map}: {source}")]
pub struct MapUpdateError {
    map: &'static str,
    source: aya::maps::MapError,
}

impl WatchMaps {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            files: take(ebpf, "WATCHED_FILES", HashMap::try_from)?,
            dirs: take(ebpf, "WATCHED_DIRS", HashMap::try_from)?,
            sockets: take(ebpf, "WATCHED_SOCKETS", HashMap::try_from)?,
            names: take(ebpf, "WATCHED_NAMES", HashMap::try_from)?,
            endpoints: take(ebpf, "ENDPOINTS", LpmTrie::try_from)?,
        })
    }

    pub fn insert_file(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.files
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError {
                map: "WATCHED_FILES",
                source,
            })
    }

    pub fn remove_file(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.files.remove(key).map_err(|source| MapUpdateError {
            map: "WATCHED_FILES",
            source,
        })
    }

    pub fn insert_dir(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.dirs
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError {
                map: "WATCHED_DIRS",
                source,
            })
    }

    pub fn remove_dir(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.dirs.remove(key).map_err(|source| MapUpdateError {
            map: "WATCHED_DIRS",
            source,
        })
    }

    pub fn insert_name(&mut self, key: NameKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.names
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError {
                map: "WATCHED_NAMES",
                source,
            })
    }

    pub fn remove_name(&mut self, key: &NameKey) -> Result<(), MapUpdateError> {
        self.names.remove(key).map_err(|source| MapUpdateError {
            map: "WATCHED_NAMES",
            source,
        })
    }

    pub fn insert_socket(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.sockets
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError {
                map: "WATCHED_SOCKETS",
                source,
            })
    }

    pub fn remove_socket(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.sockets.remove(key).map_err(|source| MapUpdateError {
            map: "WATCHED_SOCKETS",
            source,
        })
    }

    pub fn insert_endpoint(&mut self, e: &EndpointEntry) -> Result<(), MapUpdateError> {
        let value = EndpointValue {
            watch_id: e.watch_id,
            protocols: e.protocols,
        };
        self.endpoints
            .insert(&e.key(), value, 0)
            .map_err(|source| MapUpdateError {
                map: "ENDPOINTS",
                source,
            })
    }

    pub fn remove_endpoint(&mut self, e: &EndpointEntry) -> Result<(), MapUpdateError> {
        self.endpoints
            .remove(&e.key())
            .map_err(|source| MapUpdateError {
                map: "ENDPOINTS",
                source,
            })
    }
}

/// The in-kernel fold map, read to report fold tails that no record carried.
pub struct FoldMap {
    map: HashMap<MapData, FoldKey, FoldState>,
}

impl FoldMap {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            map: take(ebpf, "FOLD", HashMap::try_from)?,
        })
    }

    /// Every fold entry currently in the kernel.
    pub fn entries(&self) -> Vec<(FoldKey, FoldState)> {
        self.map.iter().filter_map(Result::ok).collect()
    }
}
