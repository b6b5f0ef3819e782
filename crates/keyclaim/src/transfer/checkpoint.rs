//! A checkpoint file: the last device a copy or an import finished, so that
//! an interrupted run resumes after it (`keyclaim migrate --checkpoint`,
//! `keyclaim import --checkpoint`).

use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::ids::{Device, DeviceId, UserId};

/// A checkpoint file holding one device.
///
/// Written as JSON (`{"user_id": ..., "device_id": ...}`) through a
/// temporary file and a rename, so that a crash while saving leaves the
/// previous checkpoint whole. Reads the older two-line form (user ID, then
/// device ID) too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    path: PathBuf,
}

impl Checkpoint {
    /// A checkpoint kept in `path` (nothing is read or written yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device saved, or `None` when there is no checkpoint file.
    ///
    /// # Errors
    /// [`Error::Storage`] when the file cannot be read,
    /// [`Error::InvalidConfig`] when it does not hold a device.
    pub fn load(&self) -> Result<Option<Device>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::storage("checkpoint", "load", false, e)),
        };
        let bad =
            |why: &str| Error::invalid_config(format!("checkpoint {}: {why}", self.path.display()));
        let (user, device) = if text.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(&text).map_err(|_| bad("not JSON"))?;
            match (v["user_id"].as_str(), v["device_id"].as_str()) {
                (Some(u), Some(d)) => (u.to_owned(), d.to_owned()),
                _ => return Err(bad("no user_id and device_id")),
            }
        } else {
            let mut lines = text.lines();
            match (lines.next(), lines.next()) {
                (Some(u), Some(d)) => (u.to_owned(), d.to_owned()),
                _ => return Err(bad("expected a user ID line and a device ID line")),
            }
        };
        let user = UserId::parse(user).map_err(|e| bad(&e.to_string()))?;
        let device = DeviceId::parse(device).map_err(|e| bad(&e.to_string()))?;
        Ok(Some(Device::new(user, device)))
    }

    /// Saves `device` as the last one finished.
    ///
    /// # Errors
    /// [`Error::Storage`] when the file cannot be written.
    pub fn save(&self, device: &Device) -> Result<()> {
        let text = json!({
            "user_id": device.user_id.as_str(),
            "device_id": device.device_id.as_str(),
        })
        .to_string();
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, text + "\n")
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| Error::storage("checkpoint", "save", false, e))
    }

    /// Removes the checkpoint (after a run that finished and verified).
    ///
    /// # Errors
    /// [`Error::Storage`] when the file exists and cannot be removed.
    pub fn clear(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::storage("checkpoint", "clear", false, e))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn round_trips_and_reads_the_two_line_form() {
        let dir = std::env::temp_dir().join(format!("keyclaim-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cp = Checkpoint::new(dir.join("cp"));
        assert_eq!(cp.load().unwrap(), None);
        // A device ID with a newline survives (the two-line form could not hold it).
        let d = Device::parse("@u:x", "DEV\nICE").unwrap();
        cp.save(&d).unwrap();
        assert_eq!(cp.load().unwrap(), Some(d));
        std::fs::write(cp.path(), "@v:x\nOLD\n").unwrap();
        assert_eq!(
            cp.load().unwrap(),
            Some(Device::parse("@v:x", "OLD").unwrap())
        );
        std::fs::write(cp.path(), "garbage").unwrap();
        assert!(matches!(cp.load(), Err(Error::InvalidConfig { .. })));
        cp.clear().unwrap();
        cp.clear().unwrap();
        assert_eq!(cp.load().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
