//! `EIO` on write or on sync for the file-based backends (R10.8), through an
//! `LD_PRELOAD` shim (`shim/eio.c`): no root, no kernel module, no change to
//! the backends.
//!
//! The shim intercepts `write`, `pwrite`, `pwrite64`, `writev`, `fsync` and
//! `fdatasync`. At each call it reads a control file (named by the
//! environment variable [`CONTROL_ENV`]) holding `<mode> <directory>`: in
//! mode `write` the writes of files under the directory fail with `EIO` and
//! write nothing; in mode `sync` their syncs fail with `EIO` and lose what
//! was written to the file since the fault came on (the shim puts back the
//! bytes those writes overwrote, and the file's length): Linux may drop the
//! dirty pages of a failed `fsync`, and a store that carried on as if the
//! data were there would then answer differently from its file.
//! [`EioFault`] switches the mode as the scenario's [`Fault`].
//!
//! A preloaded library must be there when the process starts, so the
//! scenario runs in a child process: the `eio` binary, started by
//! `tests/storage_faults.rs` with the shim that [`build_shim`] compiled.
//!
//! ```text
//! cargo test -p keyclaim-reliability --test storage_faults eio
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::faults::Fault;

/// The environment variable naming the shim's control file.
pub const CONTROL_ENV: &str = "KEYCLAIM_EIO_CONTROL";

/// The environment variable naming the file the shim appends a byte to for
/// every failure it injects.
pub const COUNT_ENV: &str = "KEYCLAIM_EIO_COUNT";

/// The environment variable naming the file the shim appends a byte to for
/// every write that a failed sync loses (puts back).
pub const LOST_ENV: &str = "KEYCLAIM_EIO_LOST";

/// The shim's C source.
pub const SHIM_SOURCE: &str = include_str!("../shim/eio.c");

/// Compiles the shim into `dir` with the system's C compiler (`cc`, as the
/// bundled SQLite build needs one anyway) and returns the library's path.
///
/// # Errors
/// When `cc` is missing or fails.
pub fn build_shim(dir: &Path) -> io::Result<PathBuf> {
    let source = dir.join("keyclaim_eio.c");
    let library = dir.join("libkeyclaim_eio.so");
    std::fs::write(&source, SHIM_SOURCE)?;
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-pthread", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "cc failed to build the EIO shim: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(library)
}

/// What fails while the fault is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EioMode {
    /// Writes (`write`, `pwrite`, `pwrite64`, `writev`) fail with `EIO`.
    Write,
    /// Syncs (`fsync`, `fdatasync`) fail with `EIO`.
    Sync,
}

impl EioMode {
    /// `write` or `sync`, as the shim's control file and the `eio` binary
    /// spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Sync => "sync",
        }
    }

    /// Parses `write` or `sync`.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Write, Self::Sync]
            .into_iter()
            .find(|m| m.as_str() == text)
    }
}

impl fmt::Display for EioMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `EIO` on the files of a directory, switched through the shim's control
/// file. Only has an effect in a process started with the shim preloaded.
#[derive(Debug)]
pub struct EioFault {
    mode: EioMode,
    control: PathBuf,
    dir: PathBuf,
    name: String,
}

impl EioFault {
    /// A fault of `mode` on the files under `dir` (made canonical: the shim
    /// compares it with the paths the kernel reports for open files),
    /// controlled through the file `control`, which is written "off" now.
    ///
    /// # Errors
    /// When `dir` does not exist or `control` cannot be written.
    pub fn new(mode: EioMode, control: PathBuf, dir: &Path) -> io::Result<Self> {
        let dir = dir.canonicalize()?;
        std::fs::write(&control, "off -\n")?;
        Ok(Self {
            mode,
            control,
            dir,
            name: format!("EIO on {mode} (LD_PRELOAD shim)"),
        })
    }
}

impl Fault for EioFault {
    fn name(&self) -> &str {
        &self.name
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn inject(&mut self) -> io::Result<()> {
        std::fs::write(
            &self.control,
            format!("{} {}\n", self.mode, self.dir.display()),
        )
    }

    fn clear(&mut self) -> io::Result<()> {
        std::fs::write(&self.control, "off -\n")
    }

    fn retryable(&self) -> bool {
        true
    }
}
