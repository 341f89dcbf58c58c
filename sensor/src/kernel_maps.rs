//! Userspace handles on the kernel's watch and fold maps. Watches change live: entries are
//! inserted and removed without reloading any program.

use std::net::IpAddr;

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key};
use sensor_ebpf::{
    EndpointKey, EndpointValue, FILTER_WORDS, FileKey, FoldKey, FoldState, NameKey, filter_slot,
};

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
    pub(crate) ports: PortFilter,
    pub(crate) filter: WatchFilter,
}

/// The sensor's side of the kernel's `ENDPOINT_PORTS`: a port is marked before the first
/// endpoint entry with it goes into the trie and cleared after the last one has left, so the
/// kernel never has an entry the filter hides. Marks a previous sensor left (adopted pinned
/// maps) stay: they cost a trie look-up on that port, nothing more.
pub struct PortFilter {
    map: Array<MapData, u8>,
    /// Trie entries behind each port this process marked.
    refs: std::collections::HashMap<u16, u32>,
}

impl PortFilter {
    pub fn new(map: Array<MapData, u8>) -> Self {
        Self { map, refs: Default::default() }
    }

    fn add(&mut self, port: u16) -> Result<(), MapError> {
        let refs = self.refs.entry(port).or_default();
        if *refs == 0 {
            self.map.set(u32::from(port), 1, 0)?;
        }
        *refs += 1;
        Ok(())
    }

    fn remove(&mut self, port: u16) -> Result<(), MapError> {
        let Some(refs) = self.refs.get_mut(&port) else { return Ok(()) };
        *refs -= 1;
        if *refs == 0 {
            self.refs.remove(&port);
            self.map.set(u32::from(port), 0, 0)?;
        }
        Ok(())
    }
}

/// The sensor's side of the kernel's `WATCH_FILTER`: one bit per inode number of every watched
/// file and directory. A bit is set before the first entry needing it goes into a hash map and
/// cleared after the last one has left, so the kernel never has an entry its filter hides.
pub struct WatchFilter {
    map: Array<MapData, u64>,
    words: Vec<u64>,
    /// Bits already set when the map was opened (by a previous sensor whose pinned maps this
    /// one adopted): kept, since their entries are not known here. They cost only look-ups.
    inherited: Vec<u64>,
    /// Hash-map entries behind each bit this process set, by (word, bit).
    refs: std::collections::HashMap<(u32, u64), u32>,
}

impl WatchFilter {
    pub fn open(map: Array<MapData, u64>) -> Result<Self, MapError> {
        let words = (0..FILTER_WORDS).map(|i| map.get(&i, 0)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { inherited: words.clone(), words, map, refs: Default::default() })
    }

    fn set_word(&mut self, word: u32, value: u64) -> Result<(), MapError> {
        self.map.set(word, value, 0)?;
        self.words[word as usize] = value;
        Ok(())
    }

    fn add(&mut self, ino: u64) -> Result<(), MapError> {
        let (word, bit) = filter_slot(ino);
        let value = self.words[word as usize];
        if value & bit == 0 {
            self.set_word(word, value | bit)?;
        }
        *self.refs.entry((word, bit)).or_default() += 1;
        Ok(())
    }

    fn remove(&mut self, ino: u64) -> Result<(), MapError> {
        let (word, bit) = filter_slot(ino);
        let Some(refs) = self.refs.get_mut(&(word, bit)) else {
            return Ok(());
        };
        *refs -= 1;
        if *refs > 0 {
            return Ok(());
        }
        self.refs.remove(&(word, bit));
        if self.inherited[word as usize] & bit != 0 {
            return Ok(());
        }
        self.set_word(word, self.words[word as usize] & !bit)
    }

    /// True when the bit of `ino` is set (what the kernel side tests).
    fn contains(&self, ino: u64) -> bool {
        let (word, bit) = filter_slot(ino);
        self.words[word as usize] & bit != 0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("updating kernel map {map}: {source}")]
pub struct MapUpdateError {
    map: &'static str,
    source: aya::maps::MapError,
}

impl WatchMaps {
    pub fn insert_file(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        let new = self.files.get(&key, 0).is_err();
        self.filtered_insert(new, key.ino, "WATCHED_FILES", |m| m.files.insert(key, watch_id, 0))
    }

    pub fn remove_file(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.filtered_remove(key.ino, "WATCHED_FILES", |m| m.files.remove(key))
    }

    pub fn insert_dir(&mut self, key: FileKey, watch_id: u32) -> Result<(), MapUpdateError> {
        let new = self.dirs.get(&key, 0).is_err();
        self.filtered_insert(new, key.ino, "WATCHED_DIRS", |m| m.dirs.insert(key, watch_id, 0))
    }

    pub fn remove_dir(&mut self, key: &FileKey) -> Result<(), MapUpdateError> {
        self.filtered_remove(key.ino, "WATCHED_DIRS", |m| m.dirs.remove(key))
    }

    pub fn insert_name(&mut self, key: NameKey, watch_id: u32) -> Result<(), MapUpdateError> {
        let new = self.names.get(&key, 0).is_err();
        self.filtered_insert(new, key.dir_ino, "WATCHED_NAMES", |m| {
            m.names.insert(key, watch_id, 0)
        })
    }

    pub fn remove_name(&mut self, key: &NameKey) -> Result<(), MapUpdateError> {
        self.filtered_remove(key.dir_ino, "WATCHED_NAMES", |m| m.names.remove(key))
    }

    /// True when the kernel's watch filter lets opens of inode `ino` (or of files in the
    /// directory `ino`) through to the hash maps.
    pub fn filter_passes(&self, ino: u64) -> bool {
        self.filter.contains(ino)
    }

    /// Inserts into a filtered map: a new entry's filter bit goes in first.
    fn filtered_insert(
        &mut self,
        new: bool,
        ino: u64,
        map: &'static str,
        insert: impl FnOnce(&mut Self) -> Result<(), MapError>,
    ) -> Result<(), MapUpdateError> {
        if new {
            self.filter
                .add(ino)
                .map_err(|source| MapUpdateError { map: "WATCH_FILTER", source })?;
        }
        insert(self).map_err(|source| {
            if new {
                let _ = self.filter.remove(ino);
            }
            MapUpdateError { map, source }
        })
    }

    /// Removes from a filtered map: the filter bit goes after the last entry needing it.
    fn filtered_remove(
        &mut self,
        ino: u64,
        map: &'static str,
        remove: impl FnOnce(&mut Self) -> Result<(), MapError>,
    ) -> Result<(), MapUpdateError> {
        remove(self).map_err(|source| MapUpdateError { map, source })?;
        self.filter.remove(ino).map_err(|source| MapUpdateError { map: "WATCH_FILTER", source })
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
        let ports = |source| MapUpdateError { map: "ENDPOINT_PORTS", source };
        self.ports.add(e.port).map_err(ports)?;
        self.endpoints.insert(&e.key(), value, 0).map_err(|source| {
            let _ = self.ports.remove(e.port);
            MapUpdateError { map: "ENDPOINTS", source }
        })
    }

    pub fn remove_endpoint(&mut self, e: &EndpointEntry) -> Result<(), MapUpdateError> {
        self.endpoints
            .remove(&e.key())
            .map_err(|source| MapUpdateError { map: "ENDPOINTS", source })?;
        self.ports.remove(e.port).map_err(|source| MapUpdateError { map: "ENDPOINT_PORTS", source })
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
