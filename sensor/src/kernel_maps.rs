//! Userspace handles on the kernel's watch and fold maps. Watches change live: entries are
//! inserted and removed without reloading any program.

use std::net::IpAddr;

use aya::maps::{HashMap, LpmTrie, MapData, lpm_trie::Key};
use sensor_ebpf::{EndpointKey, EndpointValue, FileKey, FoldKey, FoldState, NameKey};

use crate::watch::kernel_dev;

/// The (dev, ino) key of a file as the kernel sees it, after following symlinks.
pub fn file_key(path: &std::path::Path) -> std::io::Result<FileKey> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path)?;
    Ok(FileKey { dev: kernel_dev(meta.dev()), _pad0: 0, ino: meta.ino() })
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
            IpAddr::V4(v4) => {
                (v4.to_ipv6_mapped().octets(), 96 + u32::from(self.prefix_len.min(32)))
            }
            IpAddr::V6(v6) => (v6.octets(), u32::from(self.prefix_len.min(128))),
        };
        Key::new(
            16 + addr_bits,
            EndpointKey { port_be: self.port.to_be_bytes(), addr, _pad0: [0; 2] },
        )
    }
}

/// The watched-file, watched-directory and endpoint maps.
pub struct WatchMaps {
    pub(crate) files: HashMap<MapData, FileKey, u32>,
    pub(crate) dirs: HashMap<MapData, FileKey, u32>,
    pub(crate) sockets: HashMap<MapData, FileKey, u32>,
    pub(crate) names: HashMap<MapData, NameKey, u32>,
    pub(crate) endpoints: LpmTrie<MapData, EndpointKey, EndpointValue>,
}

#[derive(Debug, thiserror::Error)]
#[error("updating kernel map {map}: {source}")]
pub struct MapUpdateError {
    map: &'static str,
    source: aya::maps::MapError,
}

impl WatchMaps {
    pub fn insert_file(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.files
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError { map: "WATCHED_FILES", source })
    }

    pub fn remove_file(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.files.remove(key).map_err(|source| MapUpdateError { map: "WATCHED_FILES", source })
    }

    pub fn insert_dir(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.dirs
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError { map: "WATCHED_DIRS", source })
    }

    pub fn remove_dir(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.dirs.remove(key).map_err(|source| MapUpdateError { map: "WATCHED_DIRS", source })
    }

    pub fn insert_name(&mut self, key: NameKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.names
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError { map: "WATCHED_NAMES", source })
    }

    pub fn remove_name(&mut self, key: &NameKey) -> Result<(), MapUpdateError> {
        self.names.remove(key).map_err(|source| MapUpdateError { map: "WATCHED_NAMES", source })
    }

    pub fn insert_socket(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        self.sockets
            .insert(key, watch_id, 0)
            .map_err(|source| MapUpdateError { map: "WATCHED_SOCKETS", source })
    }

    pub fn remove_socket(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.sockets.remove(key).map_err(|source| MapUpdateError { map: "WATCHED_SOCKETS", source })
    }

    pub fn insert_endpoint(&mut self, e: &EndpointEntry) -> Result<(), MapUpdateError> {
        let value = EndpointValue { watch_id: e.watch_id, protocols: e.protocols };
        self.endpoints
            .insert(&e.key(), value, 0)
            .map_err(|source| MapUpdateError { map: "ENDPOINTS", source })
    }

    pub fn remove_endpoint(&mut self, e: &EndpointEntry) -> Result<(), MapUpdateError> {
        self.endpoints
            .remove(&e.key())
            .map_err(|source| MapUpdateError { map: "ENDPOINTS", source })
    }
}

/// The in-kernel fold map, read to report fold tails that no record carried.
pub struct FoldMap {
    pub(crate) map: HashMap<MapData, FoldKey, FoldState>,
    /// Written by the sensor only: the totals it has reported, for the next sensor.
    pub(crate) reported: HashMap<MapData, FoldKey, u64>,
}

impl FoldMap {
    /// The totals a previous sensor reported (see [`FoldMap::checkpoint`]).
    pub fn reported(&self) -> Vec<(FoldKey, u64)> {
        self.reported.iter().filter_map(Result::ok).collect()
    }

    /// Records totals as reported, so a restarted sensor continues from them.
    pub fn checkpoint(&mut self, totals: &[(FoldKey, u64)]) {
        tracing::debug!(keys = totals.len(), "fold checkpoint");
        for (key, total) in totals {
            if let Err(error) = self.reported.insert(key, total, 0) {
                tracing::debug!(%error, "fold checkpoint not written");
            }
        }
    }

    /// Every fold entry currently in the kernel.
    pub fn entries(&self) -> Vec<(FoldKey, FoldState)> {
        self.map.iter().filter_map(Result::ok).collect()
    }
}
