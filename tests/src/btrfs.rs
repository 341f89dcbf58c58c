//! A scratch btrfs file system: an image file, formatted and mounted through a loop device for
//! one test, unmounted when dropped.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A mounted scratch btrfs.
pub struct ScratchBtrfs {
    mount: PathBuf,
    // Dropped after the unmount: holds the image and the mount point.
    _dir: tempfile::TempDir,
}

impl ScratchBtrfs {
    /// Formats and mounts a fresh btrfs, or returns `None` after printing why this host cannot
    /// (outside CI; under CI that fails the test: `cargo xtask test` installs the tools).
    pub fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (image, mount) = (dir.path().join("btrfs.img"), dir.path().join("mnt"));
        std::fs::create_dir(&mount).expect("mount point");
        // Sparse; mkfs.btrfs wants at least about 110 MiB.
        std::fs::File::create(&image).and_then(|f| f.set_len(256 << 20)).expect("image file");
        let made = run(Command::new("mkfs.btrfs").arg("-q").arg(&image))
            .and_then(|()| run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount)));
        match made {
            Ok(()) => Some(Self { mount, _dir: dir }),
            Err(why) if crate::in_ci() => panic!("a scratch btrfs is needed under CI: {why}"),
            Err(why) => {
                eprintln!("SKIPPED: no scratch btrfs here: {why}");
                None
            }
        }
    }

    /// The file system's top-level directory.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// A new subvolume `name` under the top level: its files number their inodes anew.
    pub fn subvolume(&self, name: &str) -> PathBuf {
        let path = self.mount.join(name);
        run(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(&path))
            .expect("btrfs subvolume create");
        path
    }
}

impl Drop for ScratchBtrfs {
    fn drop(&mut self) {
        // The loop device goes with the mount (`-o loop` sets it to clear itself).
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// Runs `cmd`; what went wrong, when it did.
fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}
