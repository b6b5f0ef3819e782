//! A full disk on demand: a size-limited `tmpfs` and a filler file.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `ENOSPC`: no space left on the device.
const ENOSPC: i32 = 28;

/// A size-limited `tmpfs` mounted on a fresh temp dir: put a store in
/// [`DiskFull::dir`], then [`DiskFull::fill`] makes its writes fail with
/// `ENOSPC` and [`DiskFull::clear`] gives room back. Unmounted on drop.
///
/// Mounting needs root (or `CAP_SYS_ADMIN`) and `mount`; CI runs as root.
#[derive(Debug)]
pub struct DiskFull {
    mount: tempfile::TempDir,
    filler: PathBuf,
    size: u64,
}

impl DiskFull {
    /// Mounts a `tmpfs` of `size_bytes` on a fresh temp dir.
    ///
    /// # Errors
    /// Why mounting is not possible here (not root, no `mount`, a sandbox
    /// that forbids it), for [`crate::require`].
    pub fn mount(size_bytes: u64) -> Result<Self, String> {
        let mount = tempfile::Builder::new()
            .prefix("keyclaim-diskfull-")
            .tempdir()
            .map_err(|e| format!("no temp dir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=0700"))
            .arg("keyclaim-fault")
            .arg(mount.path())
            .output()
            .map_err(|e| format!("cannot run mount (needs root): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (needs root) ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let filler = mount.path().join("filler");
        Ok(Self {
            mount,
            filler,
            size: size_bytes,
        })
    }

    /// The mounted dir.
    pub fn dir(&self) -> &Path {
        self.mount.path()
    }

    /// Fills the file system: a filler file grows until a write fails with
    /// `ENOSPC`.
    ///
    /// # Errors
    /// Any other I/O error.
    pub fn fill(&mut self) -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)?;
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(ENOSPC) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes the filler and grows the file system eightfold (as an
    /// operator adding space would), so that the writes after the fault do
    /// not fill it again.
    ///
    /// # Errors
    /// When the filler cannot be removed or the remount fails.
    pub fn clear(&mut self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.filler) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
        self.size *= 8;
        let status = Command::new("mount")
            .arg("-o")
            .arg(format!("remount,size={}", self.size))
            .arg(self.mount.path())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("remount failed: {status}")))
        }
    }
}

impl Drop for DiskFull {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount.path())
            .status();
    }
}
